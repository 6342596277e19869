"""Strict numerics for every test: float64 default, seeded generators, deterministic ops.

Warnings are errors (pyproject ``filterwarnings``), so a test that expects one must say so
with ``pytest.warns``.

``HYPERGRADIENT_TEST_DEVICE=cuda`` runs the tests with that default device (every tensor a
test makes without naming a device lands there): the portability check on a GPU machine.
"""

import os
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # the tests' problems are tiny: intra-op threads only add spin-waiting, which on a busy
    # 2-core machine makes every op many times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _strict_numerics():
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch.use_deterministic_algorithms(True)
    device = os.environ.get("HYPERGRADIENT_TEST_DEVICE")
    if device:
        torch.set_default_device(device)
    yield
    if device:
        torch.set_default_device(None)
    torch.use_deterministic_algorithms(False)
    torch.set_default_dtype(old_dtype)
