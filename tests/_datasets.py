"""Where the tests find the shared dataset files (MNIST, Fashion-MNIST, Omniglot).

``$HYPERGRADIENT_TEST_DATA`` names the folder (then it is the only one tried); otherwise
``shared/datasets`` beside the repository or one level up. Tests that need the files are
marked ``needs_mnist`` / ``needs_omniglot`` and skip with a reason when they are absent
(e.g. on a clone under /tmp).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

OMNIGLOT_FILES = ("images_background_small1.zip", "images_background_small2.zip", "all_runs.zip")


def find_shared_datasets(*, omniglot: bool = False) -> Path | None:
    """The first candidate folder holding ``mnist/`` (or, with ``omniglot``, its three zips)."""
    env = os.environ.get("HYPERGRADIENT_TEST_DATA", "").strip()
    here = Path(__file__).resolve()
    candidates = (
        [Path(env)]
        if env
        else [here.parents[2] / "shared" / "datasets", here.parents[1] / "shared" / "datasets"]
    )
    for folder in candidates:
        if omniglot:
            if all((folder / "omniglot" / name).is_file() for name in OMNIGLOT_FILES):
                return folder
        elif (folder / "mnist").is_dir():
            return folder
    return None


DATASETS = find_shared_datasets()
OMNIGLOT_DATASETS = find_shared_datasets(omniglot=True)
needs_mnist = pytest.mark.skipif(
    DATASETS is None,
    reason="MNIST files not found: set HYPERGRADIENT_TEST_DATA, or keep shared/datasets "
    "(with mnist/) beside the repository",
)
needs_omniglot = pytest.mark.skipif(
    OMNIGLOT_DATASETS is None,
    reason="Omniglot files not found: set HYPERGRADIENT_TEST_DATA, or keep shared/datasets "
    "(with omniglot/) beside the repository",
)
