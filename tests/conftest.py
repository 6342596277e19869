"""Strict numerics for every test: float64 default, seeded generators, deterministic ops.

Warnings are errors (pyproject ``filterwarnings``), so a test that expects one must say so
with ``pytest.warns``.
"""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _strict_numerics():
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_default_dtype(old_dtype)
