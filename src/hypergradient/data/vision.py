"""Image datasets in their original file formats: MNIST, Fashion-MNIST, CIFAR-10, Omniglot.

Each loader reads the files the dataset's authors distribute, from
``data_dir/<dataset>/`` (``data_dir`` defaults to :func:`~.download.default_data_dir`;
a ``data_dir`` that holds the files itself also works). Every file's md5 is checked before
it is parsed; ``download=True`` fetches missing files first. The loaders return raw
``uint8`` images and ``int64`` labels; :func:`to_float_split` turns them into a seeded
train/validation/test :class:`~.embedded.Split` scaled to [0, 1], and
:func:`add_label_noise` flips a fixed fraction of labels.

| subfolder | files |
| --- | --- |
| ``mnist/`` | ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` |
| ``fashion-mnist/`` | the same four names, Fashion-MNIST's files |
| ``cifar10/`` | ``cifar-10-python.tar.gz`` |
| ``omniglot/`` | ``images_background_small{1,2}.zip``, ``all_runs.zip`` |
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import re
import tarfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .._errors import HypergradientError
from .download import DOWNLOAD_HINT, RemoteFile, default_data_dir, fetch_files
from .embedded import Split

# --------------------------------------------------------------------------- file tables

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"


def _idx_table(base: str, md5s: Mapping[str, str]) -> dict[str, tuple[RemoteFile, RemoteFile]]:
    def f(name: str) -> RemoteFile:
        return RemoteFile(name, base + name, md5s[name])

    return {
        "train": (f("train-images-idx3-ubyte.gz"), f("train-labels-idx1-ubyte.gz")),
        "test": (f("t10k-images-idx3-ubyte.gz"), f("t10k-labels-idx1-ubyte.gz")),
    }


MNIST_FILES = _idx_table(
    _MNIST_URL,
    {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
)
FASHION_MNIST_FILES = _idx_table(
    _FASHION_URL,
    {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
)
CIFAR10_FILE = RemoteFile(
    "cifar-10-python.tar.gz", _CIFAR10_URL, "c58f30108f718f92721af3b95e74349a"
)
OMNIGLOT_FILES = {
    "background_small1": RemoteFile(
        "images_background_small1.zip",
        _OMNIGLOT_URL + "images_background_small1.zip",
        "e704a628b5459e08445c13499850abc4",
    ),
    "background_small2": RemoteFile(
        "images_background_small2.zip",
        _OMNIGLOT_URL + "images_background_small2.zip",
        "b75a71a51d3b13f821f212756fe481fd",
    ),
}
OMNIGLOT_RUNS_FILE = RemoteFile(
    "all_runs.zip",
    _OMNIGLOT_URL + "one-shot-classification/all_runs.zip",
    "e8996daecdf12afeeb4a53a179f06b19",
)


def _folder(data_dir: str | Path | None, subdir: str, names: Sequence[str]) -> Path:
    """``data_dir/subdir``, or ``data_dir`` itself when it holds one of the files directly."""
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    nested = root / subdir
    if not any((nested / n).is_file() for n in names) and any((root / n).is_file() for n in names):
        return root
    return nested


# --------------------------------------------------------------------------- MNIST formats


def load_mnist(
    data_dir: str | Path | None = None,
    *,
    split: str = "train",
    download: bool = False,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits from the original IDX files in ``data_dir/mnist/``.

    Returns ``(images, labels)``: ``uint8`` images of shape ``(N, 28, 28)`` (white digit on
    black, 0-255) and ``int64`` labels 0-9; ``N`` is 60000 for ``split="train"`` and 10000
    for ``split="test"``, or ``limit`` when given (the first ``limit`` examples).

    Examples:
        Without the files (and without ``download=True``) the error lists what to fetch:

        >>> import tempfile
        >>> import hypergradient as hg
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +ELLIPSIS
        ...     images, labels = hg.data.load_mnist(d, split="test", limit=100)
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: load_mnist: the folder .../mnist lacks 2 of ...
          t10k-images-idx3-ubyte.gz  (md5 9fb629c4189551a2d022fa330f9573f3, from https://...)
          t10k-labels-idx1-ubyte.gz  (md5 ec29112dd5afa0611ce80d1b7f02629c, from https://...)
        Pass download=True ...

        With them, ``images.shape`` is ``(100, 28, 28)`` (``uint8``) and ``labels.shape``
        ``(100,)``.
    """
    return _load_idx_dataset(
        "load_mnist", "mnist", MNIST_FILES, data_dir, split=split, download=download, limit=limit
    )


def load_fashion_mnist(
    data_dir: str | Path | None = None,
    *,
    split: str = "train",
    download: bool = False,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zalando's Fashion-MNIST from the original IDX files in ``data_dir/fashion-mnist/``.

    Same shapes and dtypes as :func:`load_mnist`; labels 0-9 are T-shirt/top, Trouser,
    Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot.

    Examples:
        Without the files (and without ``download=True``) the error lists what to fetch:

        >>> import tempfile
        >>> import hypergradient as hg
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +ELLIPSIS
        ...     images, labels = hg.data.load_fashion_mnist(d, split="train")
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: load_fashion_mnist: ...fashion-mnist lacks 2 ...
          train-images-idx3-ubyte.gz  (md5 8d4fb7e6c68d591d4c3dfef9ec88bf0d, from http://...)
          train-labels-idx1-ubyte.gz  (md5 25c81989df183df01b3e8a0aad5dffbe, from http://...)
        Pass download=True ...
    """
    return _load_idx_dataset(
        "load_fashion_mnist",
        "fashion-mnist",
        FASHION_MNIST_FILES,
        data_dir,
        split=split,
        download=download,
        limit=limit,
    )


def _load_idx_dataset(
    where: str,
    subdir: str,
    table: Mapping[str, tuple[RemoteFile, RemoteFile]],
    data_dir: str | Path | None,
    *,
    split: str,
    download: bool,
    limit: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of the IDX loaders; ``table`` maps split -> (images file, labels file)."""
    if split not in table:
        raise HypergradientError(
            f"{where}(split={split!r}): unknown split; use one of {sorted(table)}."
        )
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise HypergradientError(
            f"{where}(limit={limit!r}): limit must be a positive int (or None for all)."
        )
    files = table[split]
    folder = _folder(data_dir, subdir, [f.name for f in files])
    image_path, label_path = fetch_files(files, folder, download=download, where=where)
    images = _read_idx(where, image_path, magic=2051, ndim=3)
    labels = _read_idx(where, label_path, magic=2049, ndim=1)
    if len(images) != len(labels):
        raise HypergradientError(
            f"{where}: {image_path} holds {len(images)} images but {label_path} holds "
            f"{len(labels)} labels; they must be the same split of the same dataset. Replace "
            f"the files with the originals."
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _read_idx(where: str, path: Path, *, magic: int, ndim: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes (magic 0x801 labels / 0x803 images)."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise HypergradientError(
            f"{where}: {path} is not a valid gzip file ({type(exc).__name__}: {exc}); it is "
            f"damaged or cut off. Delete it and fetch it again ({DOWNLOAD_HINT})."
        ) from None
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else f"<{len(raw)} bytes>"
    if found != magic:
        kind = "images" if magic == 2051 else "labels"
        raise HypergradientError(
            f"{where}: {path} starts with IDX magic number {found}, expected {magic} (an "
            f"IDX {kind} file); it is the wrong file (images and labels swapped?). Put the "
            f"original file under this name."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise HypergradientError(
            f"{where}: {path} decompresses to {len(raw)} bytes, too short for an IDX header "
            f"({header} bytes). Delete it and fetch it again ({DOWNLOAD_HINT})."
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise HypergradientError(
            f"{where}: {path} declares shape {tuple(dims)}, i.e. {expected} bytes, but "
            f"decompresses to {len(raw)} bytes; it is damaged or cut off. Delete it and fetch "
            f"it again ({DOWNLOAD_HINT})."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR10_BATCHES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}


def load_cifar10(
    data_dir: str | Path | None = None,
    *,
    split: str = "train",
    download: bool = False,
    limit: int | None = None,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from the original ``cifar-10-python.tar.gz`` in ``data_dir/cifar10/``.

    The pickled batches are read straight out of the archive (nothing is extracted).
    Returns ``(images, labels)``: ``uint8`` images of shape ``(N, 32, 32, 3)`` (RGB,
    ``channels_last=True``) or ``(N, 3, 32, 32)`` (``channels_last=False``, PyTorch's conv
    layout) and ``int64`` labels 0-9 (airplane, automobile, bird, cat, deer, dog, frog,
    horse, ship, truck). ``N`` is 50000 (``split="train"``, batches 1-5 in order), 10000
    (``"test"``), or ``limit``.

    Examples:
        Without the archive (and without ``download=True``) the error says what to fetch:

        >>> import tempfile
        >>> import hypergradient as hg
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +ELLIPSIS
        ...     images, labels = hg.data.load_cifar10(d, channels_last=False)
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: load_cifar10: the folder .../cifar10 lacks 1 ...
          cifar-10-python.tar.gz  (md5 c58f30108f718f92721af3b95e74349a, from https://...)
        Pass download=True ...

        With it, ``images.shape`` is ``(50000, 3, 32, 32)`` (``uint8``).
    """
    return _load_cifar10(
        data_dir,
        split=split,
        download=download,
        limit=limit,
        channels_last=channels_last,
        file=CIFAR10_FILE,
    )


def _load_cifar10(
    data_dir: str | Path | None,
    *,
    split: str,
    download: bool,
    limit: int | None,
    channels_last: bool,
    file: RemoteFile,
) -> tuple[torch.Tensor, torch.Tensor]:
    where = "load_cifar10"
    if split not in _CIFAR10_BATCHES:
        raise HypergradientError(
            f"{where}(split={split!r}): unknown split; use one of {sorted(_CIFAR10_BATCHES)}."
        )
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise HypergradientError(
            f"{where}(limit={limit!r}): limit must be a positive int (or None for all)."
        )
    folder = _folder(data_dir, "cifar10", [file.name])
    (path,) = fetch_files([file], folder, download=download, where=where)
    wanted = _CIFAR10_BATCHES[split]
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        # Stream mode: one pass through the gzip stream, nothing written to disk.
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    found[base] = _parse_cifar_batch(where, path, base, tar.extractfile(member))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise HypergradientError(
            f"{where}: {path} is not a readable tar.gz archive ({type(exc).__name__}: {exc}); "
            f"it is damaged or cut off. Delete it and fetch it again ({DOWNLOAD_HINT})."
        ) from None
    missing = [b for b in wanted if b not in found]
    if missing:
        raise HypergradientError(
            f"{where}: {path} has no member(s) named {missing}; it is not the CIFAR-10 python "
            f"archive (cifar-10-batches-py/...). Put the original {file.name} there."
        )
    data = [found[b][0] for b in wanted]
    labels = [found[b][1] for b in wanted]
    images = np.concatenate(data).reshape(-1, 3, 32, 32)
    targets = np.concatenate(labels)
    if limit is not None:
        images, targets = images[:limit], targets[:limit]
    if channels_last:
        images = images.transpose(0, 2, 3, 1)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(targets)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: never arbitrary callables."""

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _np_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _np_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _parse_cifar_batch(where: str, path: Path, batch: str, stream) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _ArrayUnpickler(io.BytesIO(stream.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise HypergradientError(
            f"{where}: member {batch} of {path} is not a CIFAR-10 pickle "
            f"({type(exc).__name__}: {exc}). Put the original cifar-10-python.tar.gz there."
        ) from None
    if not isinstance(d, dict):
        d = {}
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise HypergradientError(
            f"{where}: member {batch} of {path} lacks the 'data' and 'labels' entries of a "
            f"CIFAR-10 batch. Put the original cifar-10-python.tar.gz there."
        )
    x = np.asarray(d["data"])
    y = np.asarray(d["labels"], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),):
        raise HypergradientError(
            f"{where}: member {batch} of {path} holds data of shape {x.shape} ({x.dtype}) "
            f"and {y.size} labels; expected (n, 3072) uint8 and n labels. Put the original "
            f"cifar-10-python.tar.gz there."
        )
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise HypergradientError(
            f"{where}: member {batch} of {path} has labels outside 0-9. Put the original "
            f"cifar-10-python.tar.gz there."
        )
    return x, y


# --------------------------------------------------------------------------- Omniglot

_OMNIGLOT_SIDE = 105


class OmniglotImages(NamedTuple):
    """Omniglot character images with their alphabet, character and drawer indices.

    ``images`` is ``uint8`` ``(N, S, S)`` with ink 255 on background 0 (like MNIST);
    ``alphabets``, ``characters`` (numbered across all alphabets of the subset) and
    ``drawers`` (0-19) are ``int64`` ``(N,)``; ``alphabet_names[i]`` names alphabet ``i``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> data = hg.data.OmniglotImages(
        ...     images=torch.zeros(4, 28, 28, dtype=torch.uint8),
        ...     alphabets=torch.tensor([0, 0, 1, 1]), characters=torch.tensor([0, 0, 1, 1]),
        ...     drawers=torch.tensor([0, 1, 0, 1]), alphabet_names=("Greek", "Latin"))
        >>> data.alphabet_names[int(data.alphabets[2])]
        'Latin'
        >>> data.images[data.characters == 1].shape  # every drawing of character 1
        torch.Size([2, 28, 28])
    """

    images: torch.Tensor
    alphabets: torch.Tensor
    characters: torch.Tensor
    drawers: torch.Tensor
    alphabet_names: tuple[str, ...]


class OneShotRun(NamedTuple):
    """One 20-way one-shot classification run: ``test_images[i]`` shows the same character
    as ``train_images[targets[i]]``. Images as in :class:`OmniglotImages`.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> train = torch.arange(3, dtype=torch.uint8)[:, None, None].expand(3, 2, 2)
        >>> run = hg.data.OneShotRun(train, train[[2, 0, 1]], targets=torch.tensor([2, 0, 1]))
        >>> bool((run.train_images[run.targets] == run.test_images).all())
        True
    """

    train_images: torch.Tensor
    test_images: torch.Tensor
    targets: torch.Tensor


_PNG_PATH = re.compile(r"^(?:.*/)?([^/]+)/([^/]+)/([^/]+)_(\d+)\.png$")
_RUN = re.compile(r"run\d+")


def load_omniglot(
    data_dir: str | Path | None = None,
    *,
    subset: str = "background_small1",
    download: bool = False,
    size: int | None = None,
) -> OmniglotImages:
    """Omniglot's official "minimal" background sets, read from the zip in ``data_dir/omniglot/``.

    ``subset="background_small1"``: 5 alphabets, 136 characters, 2720 images;
    ``"background_small2"``: 5 alphabets, 156 characters, 3120 images. Images are
    105x105, or ``size`` x ``size`` when given (PIL's area-averaging resize, so ``size=28``
    gives grey edges). Examples are ordered by alphabet name, character, drawer.

    Examples:
        Without the zip (and without ``download=True``) the error says what to fetch:

        >>> import tempfile
        >>> import hypergradient as hg
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +ELLIPSIS
        ...     data = hg.data.load_omniglot(d, subset="background_small1", size=28)
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: load_omniglot: the folder .../omniglot lacks 1 ...
          images_background_small1.zip  (md5 e704a628b5459e08445c13499850abc4, from https://...)
        Pass download=True ...

        With it, ``data.images.shape`` is ``(2720, 28, 28)``.
    """
    where = "load_omniglot"
    if subset not in OMNIGLOT_FILES:
        raise HypergradientError(
            f"{where}(subset={subset!r}): unknown subset; use one of {sorted(OMNIGLOT_FILES)}."
        )
    size = _check_size(where, size)
    file = OMNIGLOT_FILES[subset]
    (path,) = fetch_files(
        [file], _folder(data_dir, "omniglot", [file.name]), download=download, where=where
    )
    entries = []
    for name, data in _zip_pngs(where, path):
        m = _PNG_PATH.match(name)
        if m is None:
            raise HypergradientError(
                f"{where}: {path} holds {name!r}, not laid out as "
                f"<alphabet>/<character>/<id>_<drawer>.png; it is not an Omniglot images zip. "
                f"Put the original {file.name} there."
            )
        alphabet, character, _, drawer = m.groups()
        entries.append((alphabet, character, int(drawer), name, data))
    if not entries:
        raise HypergradientError(
            f"{where}: {path} holds no PNG images. Put the original {file.name} there."
        )
    entries.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
    alphabet_names = tuple(sorted({e[0] for e in entries}))
    char_keys = sorted({(e[0], e[1]) for e in entries})
    char_index = {k: i for i, k in enumerate(char_keys)}
    alpha_index = {a: i for i, a in enumerate(alphabet_names)}
    images = np.stack([_decode_png(where, path, e[3], e[4], size) for e in entries])
    return OmniglotImages(
        images=torch.from_numpy(images),
        alphabets=torch.tensor([alpha_index[e[0]] for e in entries], dtype=torch.int64),
        characters=torch.tensor([char_index[(e[0], e[1])] for e in entries], dtype=torch.int64),
        drawers=torch.tensor([e[2] - 1 for e in entries], dtype=torch.int64),
        alphabet_names=alphabet_names,
    )


def load_omniglot_runs(
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    size: int | None = None,
) -> list[OneShotRun]:
    """The 20 one-shot classification runs of Lake et al. (2015), from ``all_runs.zip``.

    Each run has 20 training images (one per character, ``training/class01..20.png`` in
    order), 20 test images (``test/item01..20.png`` in order) and, from the run's
    ``class_labels.txt``, the index of the training image that shows each test character.
    Images as in :func:`load_omniglot`.

    Examples:
        Without the zip (and without ``download=True``) the error says what to fetch:

        >>> import tempfile
        >>> import hypergradient as hg
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +ELLIPSIS
        ...     runs = hg.data.load_omniglot_runs(d, size=28)
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: load_omniglot_runs: the folder .../omniglot ...
          all_runs.zip  (md5 e8996daecdf12afeeb4a53a179f06b19, from https://...)
        Pass download=True ...

        With it, ``len(runs)`` is 20 and ``runs[0].train_images.shape`` is ``(20, 28, 28)``.
    """
    where = "load_omniglot_runs"
    size = _check_size(where, size)
    file = OMNIGLOT_RUNS_FILE
    (path,) = fetch_files(
        [file], _folder(data_dir, "omniglot", [file.name]), download=download, where=where
    )
    runs: dict[str, dict] = {}
    for name, data in _zip_members(where, path):
        parts = name.split("/")
        if len(parts) >= 2 and parts[-1] == "class_labels.txt" and _RUN.fullmatch(parts[-2]):
            runs.setdefault(parts[-2], {})["labels"] = data
        elif (
            len(parts) >= 3
            and parts[-2] in ("training", "test")
            and _RUN.fullmatch(parts[-3])
            and parts[-1].lower().endswith(".png")
        ):
            runs.setdefault(parts[-3], {}).setdefault(parts[-2], {})[parts[-1]] = (name, data)
    if len(runs) != 20:
        raise HypergradientError(
            f"{where}: {path} holds {len(runs)} run folders ({sorted(runs)}), expected 20 "
            f"(run01..run20). Put the original all_runs.zip there."
        )
    result = []
    for run_name in sorted(runs):
        run = runs[run_name]
        train, test = run.get("training", {}), run.get("test", {})
        if len(train) != 20 or len(test) != 20 or "labels" not in run:
            raise HypergradientError(
                f"{where}: {path}: {run_name} has {len(train)} training and {len(test)} test "
                f"images{'' if 'labels' in run else ' and no class_labels.txt'}; expected 20 "
                f"and 20 and class_labels.txt. Put the original all_runs.zip there."
            )
        train_names, test_names = sorted(train), sorted(test)
        train_pos = {n: i for i, n in enumerate(train_names)}
        pairs = {}
        for line in run["labels"].decode("utf-8", "replace").splitlines():
            if not line.strip():
                continue
            cols = line.split()
            if len(cols) != 2:
                raise HypergradientError(
                    f"{where}: {path}: {run_name}/class_labels.txt has the line {line!r}; "
                    f"expected '<test image> <training image>'. Put the original "
                    f"all_runs.zip there."
                )
            pairs[cols[0].rsplit("/", 1)[-1]] = cols[1].rsplit("/", 1)[-1]
        missing = [n for n in test_names if pairs.get(n) not in train_pos]
        if missing:
            raise HypergradientError(
                f"{where}: {path}: {run_name}/class_labels.txt gives no valid training image "
                f"for {missing}. Put the original all_runs.zip there."
            )
        result.append(
            OneShotRun(
                train_images=torch.from_numpy(
                    np.stack([_decode_png(where, path, *train[n], size) for n in train_names])
                ),
                test_images=torch.from_numpy(
                    np.stack([_decode_png(where, path, *test[n], size) for n in test_names])
                ),
                targets=torch.tensor([train_pos[pairs[n]] for n in test_names]),
            )
        )
    return result


def _check_size(where: str, size: int | None) -> int | None:
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise HypergradientError(
            f"{where}(size={size!r}): size must be a positive int (e.g. 28), or None for the "
            f"original {_OMNIGLOT_SIDE}x{_OMNIGLOT_SIDE}."
        )
    return None if size == _OMNIGLOT_SIDE else size


def _zip_members(where: str, path: Path) -> list[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as z:
            return [(info.filename, z.read(info)) for info in z.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError) as exc:
        raise HypergradientError(
            f"{where}: {path} is not a readable zip file ({type(exc).__name__}: {exc}); it is "
            f"damaged or cut off. Delete it and fetch it again ({DOWNLOAD_HINT})."
        ) from None


def _zip_pngs(where: str, path: Path) -> list[tuple[str, bytes]]:
    return [(n, d) for n, d in _zip_members(where, path) if n.lower().endswith(".png")]


def _decode_png(where: str, path: Path, name: str, data: bytes, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            grey = im.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise HypergradientError(
            f"{where}: {name} in {path} is not a readable PNG ({type(exc).__name__}: {exc}). "
            f"Put the original {path.name} there."
        ) from None
    if grey.size != (_OMNIGLOT_SIDE, _OMNIGLOT_SIDE):
        raise HypergradientError(
            f"{where}: {name} in {path} is {grey.size[0]}x{grey.size[1]} pixels, expected "
            f"{_OMNIGLOT_SIDE}x{_OMNIGLOT_SIDE}. Put the original {path.name} there."
        )
    # Omniglot draws black strokes on white; invert so ink is 255, as in MNIST.
    ink = Image.eval(grey, lambda v: 255 - v)
    if size is not None:
        ink = ink.resize((size, size), getattr(Image, "Resampling", Image).BOX)
    return np.asarray(ink, dtype=np.uint8).copy()


# --------------------------------------------------------------------------- splits, noise


def to_float_split(
    images: torch.Tensor,
    labels: torch.Tensor,
    n_train: int,
    n_val: int,
    n_test: int | None = None,
    *,
    seed: int = 0,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
    num_classes: int | None = None,
) -> Split:
    """Shuffle with ``seed`` and cut into train/validation/test, pixels scaled to [0, 1].

    ``images`` is ``uint8`` (divided by 255), ``bool`` (0/1) or floating with values
    already in [0, 1]; its first axis is the example axis. The first ``n_train`` shuffled
    examples train, the next ``n_val`` validate, and the next ``n_test`` (all the rest when
    ``None``) test. ``flatten=True`` gives ``x`` of shape ``(n, features)``; ``False`` keeps
    the image axes. ``num_classes`` defaults to ``labels.max() + 1``.

    Examples:
        >>> import torch
        >>> s = to_float_split(torch.full((10, 2, 2), 255, dtype=torch.uint8),
        ...                    torch.arange(10) % 3, n_train=5, n_val=3)
        >>> s.x_train.shape, len(s.x_val), len(s.x_test), s.num_classes, s.x_test.max().item()
        (torch.Size([5, 4]), 3, 2, 3, 1.0)
    """
    where = "to_float_split"
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise HypergradientError(
            f"{where}: images and labels must be torch tensors, got "
            f"{type(images).__name__} and {type(labels).__name__}. Convert them with "
            f"torch.as_tensor(...)."
        )
    if images.ndim < 1 or labels.ndim != 1 or len(images) != len(labels):
        raise HypergradientError(
            f"{where}: images of shape {tuple(images.shape)} and labels of shape "
            f"{tuple(labels.shape)}; need labels of shape (N,) with N the first axis of "
            f"images."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise HypergradientError(
            f"{where}: labels have dtype {labels.dtype}; class labels must be integers. "
            f"Convert them with `.long()`."
        )
    total = len(labels)
    rest = total - n_train - n_val
    n_test_ = rest if n_test is None else n_test
    if n_train < 1 or n_val < 1 or n_test_ < 1 or n_train + n_val + n_test_ > total:
        raise HypergradientError(
            f"{where}(n_train={n_train}, n_val={n_val}, n_test={n_test}): the data has "
            f"{total} examples; need each part >= 1 and n_train + n_val + n_test <= {total}."
        )
    if not dtype.is_floating_point:
        raise HypergradientError(
            f"{where}(dtype={dtype}): dtype must be floating, e.g. torch.float32."
        )
    if images.dtype == torch.uint8:
        scale = 255.0
    elif images.dtype == torch.bool:
        scale = 1.0
    elif images.is_floating_point():
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= 0.0 and hi <= 1.0):
            raise HypergradientError(
                f"{where}: floating images must lie in [0, 1], got values in [{lo}, {hi}]. "
                f"Pass the raw uint8 images, or rescale them first."
            )
        scale = 1.0
    else:
        raise HypergradientError(
            f"{where}: images have dtype {images.dtype}; expected uint8 (0-255), bool, or "
            f"floating in [0, 1]."
        )
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise HypergradientError(
            f"{where}: labels range over [{int(labels.min())}, {int(labels.max())}] but "
            f"num_classes={num_classes}; labels must lie in [0, num_classes)."
        )
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    perm = perm[: n_train + n_val + n_test_]
    x = images[perm].to(dtype) / scale
    if flatten:
        x = x.reshape(len(x), -1)
    y = labels[perm].long()
    a, b = n_train, n_train + n_val
    return Split(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], num_classes=num_classes)


def add_label_noise(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(fraction * N)`` labels, each to a uniformly random other class.

    Which labels flip and what they become depend only on ``seed``. Returns
    ``(noisy_labels, flipped)`` where ``flipped`` is the ``bool`` mask of changed entries
    (``noisy_labels[flipped] != labels[flipped]`` everywhere, equal elsewhere).

    Examples:
        >>> import torch
        >>> noisy, flipped = add_label_noise(torch.zeros(10, dtype=torch.long), 0.3, 4, seed=1)
        >>> int(flipped.sum()), bool((noisy[flipped] != 0).all())
        (3, True)
        >>> bool((noisy[~flipped] == 0).all())
        True
    """
    where = "add_label_noise"
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        got = type(labels).__name__
        if isinstance(labels, torch.Tensor):
            got += f" of shape {tuple(labels.shape)}"
        raise HypergradientError(
            f"{where}: labels must be a 1-D torch.Tensor of class indices, got {got}."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise HypergradientError(
            f"{where}: labels have dtype {labels.dtype}; class labels must be integers. "
            f"Convert them with `.long()`."
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise HypergradientError(
            f"{where}(num_classes={num_classes!r}): need an int >= 2 so that a label can "
            f"change to a different class."
        )
    if not 0.0 <= float(fraction) <= 1.0:
        raise HypergradientError(
            f"{where}(fraction={fraction!r}): fraction must lie in [0, 1] (e.g. 0.2 flips "
            f"20% of the labels)."
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise HypergradientError(
            f"{where}: labels range over [{int(labels.min())}, {int(labels.max())}] but "
            f"num_classes={num_classes}; labels must lie in [0, num_classes)."
        )
    n = len(labels)
    k = round(float(fraction) * n)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[:k]
    offset = torch.randint(1, num_classes, (k,), generator=gen)
    noisy = labels.clone().long()
    noisy[chosen] = (noisy[chosen] + offset) % num_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    return noisy.to(labels.dtype), flipped
