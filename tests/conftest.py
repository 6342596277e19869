"""Strict numerics for every test: float64 default, seeded generators, deterministic ops.

Warnings are errors (pyproject ``filterwarnings``), so a test that expects one must say so
with ``pytest.warns``.

``HYPERGRADIENT_TEST_DEVICE=cuda`` runs the tests with that default device (every tensor a
test makes without naming a device lands there): the portability check on a GPU machine.

``HYPERGRADIENT_TEST_THREADS`` (default 1) is torch's intra-op thread count in every test:
reductions split over 2 threads sum in another order, so ``=2`` is one of the numerics paths
the portability job checks (with ``ATEN_CPU_CAPABILITY`` and ``MKL_CBWR``).

Marker ``numeric``: every test whose outcome depends on floating-point results, i.e. every
test outside ``NON_NUMERIC_MODULES`` below, and every doctest in ``src``.  ``.ci/run`` runs
``pytest -m numeric`` once per numerics path (see there).  A new test module is numeric
unless it is added to that list.
"""

import os
import random

import numpy as np
import pytest
import torch

# Plumbing only (command lines, option parsing, files, resume bookkeeping, data loading,
# worker processes): their outcome does not depend on rounding, so the per-numerics-path
# portability runs skip them.  Everything else, and every doctest, is marked ``numeric``.
NON_NUMERIC_MODULES = frozenset(
    {
        "test_data.py",  # dataset files and loaders
        "test_demo.py",  # demo smoke run and its command-line errors
        "test_reliability.py",  # checkpoint safety, run-folder locks, Ctrl-C
        "test_search_workers.py",  # SQLite study creation under concurrent workers
        "test_readme_standalone.py",  # README blocks in fresh interpreters (exit codes)
        "test_docs_site.py",  # mkdocs build --strict and the API reference's anchors
        "test_package_map.py",  # import paths and deprecation warnings
        # end-to-end recipe runs and the command line: what they compute is checked by the
        # unit tests of the pieces they call, which are numeric
        "test_recipes_cli.py",
        "test_meta_recipes.py",
        "test_meta_pretrain_recipe.py",
        "test_towers_recipe.py",
        "test_noisy_labels_recipe.py",
        "test_hidden_units_recipe.py",
        "test_continuation_recipe.py",
        "test_hpo_recipe.py",
        "test_lr_schedule.py",
        "test_hyperclean.py",
        "test_augment.py",
        "test_distill.py",
        "test_distributed.py",  # torchrun subprocesses: their own thread settings
    }
)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name not in NON_NUMERIC_MODULES:
            item.add_marker(pytest.mark.numeric)


def _test_threads() -> int:
    raw = os.environ.get("HYPERGRADIENT_TEST_THREADS", "1").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"HYPERGRADIENT_TEST_THREADS must be an integer >= 1, got {raw!r}")
    return int(raw)


TEST_THREADS = _test_threads()


def pytest_report_header(config):
    # where the dataset files were found, or why the tests that need them will skip
    from _datasets import report_line

    return report_line()


def pytest_collection_finish(session):
    # the README blocks the selected tests will ask for run ahead, in fresh interpreters
    # (tests/_readme.py)
    import _readme

    _readme.select(session.items)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    # the tests' problems are tiny: intra-op threads only add spin-waiting, which on a busy
    # 2-core machine makes every op many times slower; hence 1 unless the portability job
    # asks for more (HYPERGRADIENT_TEST_THREADS)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _strict_numerics():
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    # per test: a test (or a recipe it runs) may change the count and not restore it
    torch.set_num_threads(TEST_THREADS)
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
