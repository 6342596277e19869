"""Where the tests find the dataset files (MNIST, Fashion-MNIST, Omniglot).

One variable, the library's own: ``$HYPERGRADIENT_DATA`` names the data folder, and then it
is the only folder tried.  Without it the tests try ``shared/datasets`` beside the
repository, then in its root, then the library's default folder ``~/.cache/hypergradient``.
The folder's layout is the one the loaders read (:mod:`hypergradient.data.vision`)::

    mnist/          train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
                    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
    fashion-mnist/  the same four names, Fashion-MNIST's files
    omniglot/       images_background_small1.zip  images_background_small2.zip  all_runs.zip

``hypergradient.data.load_mnist(download=True)`` (on the command line ``hypergradient
<recipe> --set download=true``) fetches and md5-checks them into the data folder.
Tests that need the files are marked ``needs_mnist`` / ``needs_omniglot`` /
``needs_all_datasets`` and skip with a reason naming the variable and the layout when the
files are not found; the run's header line (``tests/conftest.py``) says where they were found.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypergradient.data.download import ENV_VAR
from hypergradient.data.vision import (
    FASHION_MNIST_FILES,
    MNIST_FILES,
    OMNIGLOT_FILES,
    OMNIGLOT_RUNS_FILE,
)

LAYOUT = {
    "mnist": tuple(f.name for pair in MNIST_FILES.values() for f in pair),
    "fashion-mnist": tuple(f.name for pair in FASHION_MNIST_FILES.values() for f in pair),
    "omniglot": (*(f.name for f in OMNIGLOT_FILES.values()), OMNIGLOT_RUNS_FILE.name),
}
_LAYOUT_TEXT = {
    "mnist": "mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
    "fashion-mnist": "fashion-mnist/ (the same 4 names)",
    "omniglot": "omniglot/{images_background_small1,images_background_small2,all_runs}.zip",
}


def candidate_folders() -> list[Path]:
    """``$HYPERGRADIENT_DATA`` alone when set; else the shared folder near the repository,
    then the library's default cache folder."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return [Path(env).expanduser()]
    here = Path(__file__).resolve()
    return [
        here.parents[2] / "shared" / "datasets",
        here.parents[1] / "shared" / "datasets",
        Path.home() / ".cache" / "hypergradient",
    ]


def find_datasets(*subfolders: str) -> Path | None:
    """The first candidate folder holding every file of these subfolders (``LAYOUT``)."""
    for folder in candidate_folders():
        if all((folder / sub / name).is_file() for sub in subfolders for name in LAYOUT[sub]):
            return folder
    return None


def skip_reason(*subfolders: str) -> str:
    """Why tests needing these subfolders skip: the variable, the layout, where we looked."""
    tried = ", ".join(str(p) for p in candidate_folders())
    wanted = ", ".join(_LAYOUT_TEXT[sub] for sub in subfolders)
    return (
        f"dataset files not found: set {ENV_VAR} to a folder holding {wanted} (tried "
        f"{tried}; `hypergradient <recipe> --set download=true` fetches them there)"
    )


DATASETS = find_datasets("mnist")
OMNIGLOT_DATASETS = find_datasets("omniglot")
ALL_DATASETS = find_datasets("mnist", "fashion-mnist", "omniglot")
needs_mnist = pytest.mark.skipif(DATASETS is None, reason=skip_reason("mnist"))
needs_omniglot = pytest.mark.skipif(OMNIGLOT_DATASETS is None, reason=skip_reason("omniglot"))
needs_all_datasets = pytest.mark.skipif(
    ALL_DATASETS is None, reason=skip_reason("mnist", "fashion-mnist", "omniglot")
)


def report_line() -> str:
    """One line for pytest's header: where the data was found, or why tests will skip."""
    if DATASETS == OMNIGLOT_DATASETS == ALL_DATASETS is not None:
        return f"datasets: {ALL_DATASETS} (mnist, fashion-mnist, omniglot)"
    kinds = (("mnist", DATASETS), ("omniglot", OMNIGLOT_DATASETS), ("all three", ALL_DATASETS))
    found = "; ".join(f"{k} in {v}" for k, v in kinds if v is not None) or "none found"
    tried = ", ".join(str(p) for p in candidate_folders())
    return (
        f"datasets: {found} (tried {tried}); the tests that need the missing files skip: set "
        f"{ENV_VAR} to a folder with mnist/, fashion-mnist/, omniglot/ (tests/_datasets.py)"
    )
