"""Dataset loaders: the real files in shared/datasets, and every failure path on small
files made here (corrupt copies, fake downloads served from file:// URLs)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import hypergradient.data as hd
from _datasets import ALL_DATASETS as DATASETS
from _datasets import needs_all_datasets as needs_data
from hypergradient import HypergradientError
from hypergradient.data import download as dl
from hypergradient.data import vision

# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def mnist_train():
    return hd.load_mnist(DATASETS, split="train")


@pytest.fixture(scope="module")
def omniglot_small1():
    return hd.load_omniglot(DATASETS, subset="background_small1")


@needs_data
def test_mnist_train(mnist_train):
    x, y = mnist_train
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert y[:5].tolist() == [5, 0, 4, 1, 9]
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert y.bincount().tolist() == counts
    assert abs(x.double().mean().item() / 255 - 0.1307) < 1e-3  # the usual normalisation mean
    assert x[:, 0, 0].max() == 0 and x.max() == 255  # black border, white digits


@needs_data
def test_mnist_test_and_limit():
    x, y = hd.load_mnist(DATASETS, split="test")
    assert x.shape == (10000, 28, 28) and y.min() == 0 and y.max() == 9
    assert y[:5].tolist() == [7, 2, 1, 0, 4]
    xl, yl = hd.load_mnist(DATASETS, split="test", limit=100)
    assert xl.shape == (100, 28, 28) and torch.equal(xl, x[:100]) and torch.equal(yl, y[:100])


@needs_data
def test_fashion_mnist():
    x, y = hd.load_fashion_mnist(DATASETS, split="train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.bincount().tolist() == [6000] * 10
    xt, yt = hd.load_fashion_mnist(DATASETS, split="test")
    assert xt.shape == (10000, 28, 28) and yt.bincount().tolist() == [1000] * 10
    mnist_x, _ = hd.load_mnist(DATASETS, split="test", limit=10)
    assert not torch.equal(xt[:10], mnist_x)


@needs_data
def test_md5s_of_shared_files_match():
    for table, sub in [
        (vision.MNIST_FILES, "mnist"),
        (vision.FASHION_MNIST_FILES, "fashion-mnist"),
    ]:
        files = [f for pair in table.values() for f in pair]
        paths = hd.fetch_files(files, DATASETS / sub, download=False, where="test")
        assert [p.name for p in paths] == [f.name for f in files]
    omni = [*vision.OMNIGLOT_FILES.values(), vision.OMNIGLOT_RUNS_FILE]
    hd.fetch_files(omni, DATASETS / "omniglot", download=False, where="test")


@needs_data
def test_data_dir_may_hold_the_files_directly():
    x, y = hd.load_mnist(DATASETS / "mnist", split="test", limit=3)
    assert y.tolist() == [7, 2, 1]


@needs_data
def test_omniglot_small1(omniglot_small1):
    o = omniglot_small1
    assert o.images.shape == (2720, 105, 105) and o.images.dtype == torch.uint8
    assert o.alphabet_names == ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")
    assert set(o.images.unique().tolist()) == {0, 255}
    ink = (o.images > 0).double().mean().item()
    assert 0.02 < ink < 0.2  # ink is 255 and sparse
    assert o.alphabets.unique().tolist() == [0, 1, 2, 3, 4]
    assert o.characters.bincount().tolist() == [20] * 136
    assert o.drawers.bincount().tolist() == [136] * 20
    # characters are numbered in alphabet order
    assert bool((o.alphabets[1:] >= o.alphabets[:-1]).all())
    assert bool((o.characters[1:] >= o.characters[:-1]).all())


@needs_data
def test_omniglot_small2_resized():
    o = hd.load_omniglot(DATASETS, subset="background_small2", size=28)
    assert o.images.shape == (3120, 28, 28) and o.images.dtype == torch.uint8
    assert len(o.alphabet_names) == 5 and int(o.characters.max()) == 155


@needs_data
def test_omniglot_runs():
    runs = hd.load_omniglot_runs(DATASETS)
    assert len(runs) == 20
    accuracy = []
    for run in runs:
        assert run.train_images.shape == (20, 105, 105) and run.test_images.shape == (20, 105, 105)
        assert sorted(run.targets.tolist()) == list(range(20))
        a = run.train_images.double().flatten(1)
        b = run.test_images.double().flatten(1)
        accuracy.append((torch.cdist(b, a).argmin(1) == run.targets).double().mean().item())
    assert runs[0].targets[:4].tolist() == [7, 8, 1, 18]  # run01: item01 -> class08, ...
    # Pixel nearest neighbour is far above chance (5%) only if the targets are right.
    assert np.mean(accuracy) > 0.12


@needs_data
def test_corrupt_copy_is_refused_by_md5(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]:
        shutil.copy(DATASETS / "mnist" / name, folder / name)
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-100])  # cut off
    with pytest.raises(HypergradientError) as info:
        hd.load_mnist(tmp_path, split="test")
    msg = str(info.value)
    assert str(bad) in msg and "ec29112dd5afa0611ce80d1b7f02629c" in msg
    assert hashlib.md5(bad.read_bytes()).hexdigest() in msg and "Delete it" in msg
    # a flipped byte, same size
    data = bytearray((DATASETS / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    data[-20] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(HypergradientError, match="md5"):
        hd.load_mnist(tmp_path, split="test")


@needs_data
def test_corrupt_omniglot_zip(tmp_path, monkeypatch):
    src = DATASETS / "omniglot" / "all_runs.zip"
    bad = tmp_path / "omniglot" / "all_runs.zip"
    bad.parent.mkdir()
    bad.write_bytes(src.read_bytes()[:50_000])
    with pytest.raises(HypergradientError, match="md5"):
        hd.load_omniglot_runs(tmp_path)
    # past the md5 check (a table naming this file's md5): the zip reader's error is wrapped
    fake = dl.RemoteFile("all_runs.zip", "file:///nowhere", dl.md5_of(bad))
    monkeypatch.setattr(vision, "OMNIGLOT_RUNS_FILE", fake)
    with pytest.raises(HypergradientError, match="not a readable zip file") as info:
        hd.load_omniglot_runs(tmp_path)
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------- small IDX files


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_idx(tmp_path):
    """A 7-example IDX dataset on a fake 'server' folder, and a table pointing at it."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    server = tmp_path / "server"
    server.mkdir()
    (server / "img.gz").write_bytes(_idx_bytes(2051, images))
    (server / "lab.gz").write_bytes(_idx_bytes(2049, labels))

    def table(md5_images=None, md5_labels=None, image_src="img.gz", label_src="lab.gz"):
        def rf(name, src, md5):
            return dl.RemoteFile(name, (server / src).as_uri(), md5 or dl.md5_of(server / src))

        return {
            "train": (
                rf("train-images-idx3-ubyte.gz", image_src, md5_images),
                rf("train-labels-idx1-ubyte.gz", label_src, md5_labels),
            )
        }

    return images, labels, server, table


def _load(table, data_dir, **kw):
    kw.setdefault("download", False)
    return vision._load_idx_dataset(
        "load_mnist", "mnist", table, data_dir, split="train", limit=None, **kw
    )


def test_download_via_file_url(tiny_idx, tmp_path, capsys):
    images, labels, _, table = tiny_idx
    cache = tmp_path / "cache"
    x, y = _load(table(), cache, download=True)
    assert torch.equal(x, torch.from_numpy(images)) and y.tolist() == labels.tolist()
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]  # no temporary .part files left
    # second call: found and verified, nothing fetched (the server may be gone)
    x2, _ = _load(table(), cache, download=False)
    assert torch.equal(x, x2)


def test_missing_files_without_download_lists_them(tmp_path):
    with pytest.raises(HypergradientError) as info:
        hd.load_mnist(tmp_path, split="train")
    msg = str(info.value)
    assert "load_mnist" in msg and str(tmp_path / "mnist") in msg and "download=True" in msg
    for f in vision.MNIST_FILES["train"]:
        assert f.name in msg and f.url in msg and f.md5 in msg
    assert "t10k" not in msg  # only the files this call needs
    with pytest.raises(HypergradientError, match=r"cifar-10-python\.tar\.gz") as info:
        hd.load_cifar10(tmp_path)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(info.value)
    with pytest.raises(HypergradientError, match="images_background_small1.zip"):
        hd.load_omniglot(tmp_path)
    with pytest.raises(HypergradientError, match="one-shot-classification/all_runs.zip"):
        hd.load_omniglot_runs(tmp_path)


def test_fetch_single_missing_file(tmp_path):
    with pytest.raises(HypergradientError, match="does not exist.*download=True.*curl"):
        dl.fetch("https://example.invalid/f.bin", tmp_path / "f.bin", "0" * 32, download=False)


def test_download_with_wrong_md5_keeps_nothing(tiny_idx, tmp_path):
    _, _, _, table = tiny_idx
    cache = tmp_path / "cache"
    with pytest.raises(HypergradientError, match="downloaded from .* has md5 .*not kept") as info:
        _load(table(md5_images="0" * 32), cache, download=True)
    assert "0" * 32 in str(info.value)
    assert list((cache / "mnist").iterdir()) == []


def test_download_network_failure(tmp_path):
    url = (tmp_path / "not-there.gz").as_uri()
    with pytest.raises(HypergradientError) as info:
        dl.fetch(url, tmp_path / "dest" / "f.gz", "0" * 32, download=True, where="load_x")
    msg = str(info.value)
    assert msg.startswith("load_x: downloading " + url + " failed")
    assert str(tmp_path / "dest" / "f.gz") in msg  # where to put it by hand
    assert list((tmp_path / "dest").iterdir()) == []


def test_download_timeout_and_http_error(tmp_path, monkeypatch):
    seen = {}

    def timing_out(url, timeout):
        seen["timeout"] = timeout
        raise TimeoutError("timed out")

    monkeypatch.setattr(dl, "_urlopen", timing_out)
    with pytest.raises(HypergradientError, match="failed after 0 bytes: timed out"):
        dl.fetch("https://example.invalid/a", tmp_path / "a", "0" * 32, download=True, timeout=3)
    assert seen["timeout"] == 3

    def http_404(url, timeout):
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)

    monkeypatch.setattr(dl, "_urlopen", http_404)
    with pytest.raises(HypergradientError, match="HTTP 404 Not Found"):
        dl.fetch("https://example.invalid/a", tmp_path / "a", "0" * 32, download=True)
    assert list(tmp_path.iterdir()) == []


class _FakeResponse(io.BytesIO):
    def __init__(self, body: bytes, length: int):
        super().__init__(body)
        self.headers = {"Content-Length": str(length)}


def test_download_cut_short(tmp_path, monkeypatch):
    body = b"x" * 1000
    monkeypatch.setattr(dl, "_urlopen", lambda url, timeout: _FakeResponse(body[:600], 1000))
    md5 = hashlib.md5(body).hexdigest()
    with pytest.raises(HypergradientError, match="stopped after 600 of 1000 bytes"):
        dl.fetch("https://example.invalid/b", tmp_path / "b", md5, download=True)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(dl, "_urlopen", lambda url, timeout: _FakeResponse(body, 1000))
    path = dl.fetch("https://example.invalid/b", tmp_path / "b", md5, download=True)
    assert path.read_bytes() == body


def test_parse_errors_past_the_md5_check(tiny_idx, tmp_path):
    images, labels, server, table = tiny_idx
    # truncated gzip, with its own md5 in the table
    (server / "cut.gz").write_bytes((server / "img.gz").read_bytes()[:-30])
    with pytest.raises(HypergradientError, match="is not a valid gzip file") as info:
        _load(table(image_src="cut.gz"), tmp_path / "a", download=True)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    # images and labels swapped
    with pytest.raises(HypergradientError, match="magic number 2049, expected 2051"):
        _load(table(image_src="lab.gz", label_src="img.gz"), tmp_path / "b", download=True)
    # a header that claims more data than there is
    raw = gzip.decompress((server / "img.gz").read_bytes())
    (server / "short.gz").write_bytes(gzip.compress(raw[:-28]))
    with pytest.raises(HypergradientError, match=r"declares shape \(7, 28, 28\)"):
        _load(table(image_src="short.gz"), tmp_path / "c", download=True)
    # different counts of images and labels
    (server / "lab5.gz").write_bytes(_idx_bytes(2049, labels[:5]))
    with pytest.raises(HypergradientError, match="7 images but .* 5 labels"):
        _load(table(label_src="lab5.gz"), tmp_path / "d", download=True)


def test_bad_arguments(tmp_path):
    with pytest.raises(HypergradientError, match="unknown split"):
        hd.load_mnist(tmp_path, split="val")
    with pytest.raises(HypergradientError, match="limit must be a positive int"):
        hd.load_fashion_mnist(tmp_path, limit=0)
    with pytest.raises(HypergradientError, match="unknown subset"):
        hd.load_omniglot(tmp_path, subset="evaluation")
    with pytest.raises(HypergradientError, match="size must be a positive int"):
        hd.load_omniglot(tmp_path, size=0)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERGRADIENT_DATA", str(tmp_path))
    assert hd.default_data_dir() == tmp_path
    with pytest.raises(HypergradientError, match=str(tmp_path / "mnist")):
        hd.load_mnist()
    monkeypatch.delenv("HYPERGRADIENT_DATA")
    assert hd.default_data_dir() == Path.home() / ".cache" / "hypergradient"


# --------------------------------------------------------------------------- CIFAR-10 layout


def _cifar_tar(path: Path, per_batch: int = 3, evil: bool = False) -> dict:
    rng = np.random.default_rng(1)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:

        def add(name, obj):
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        add("batches.meta", {b"label_names": [b"airplane"] * 10})
        for name in ["test_batch", *[f"data_batch_{i}" for i in range(5, 0, -1)]]:
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, size=per_batch).tolist()
            batches[name] = (data, labels)
            payload = {b"batch_label": b"x", b"labels": labels, b"data": data}
            if evil and name == "data_batch_1":
                payload = {b"data": os.getcwd, b"labels": labels}  # a callable: refused
            add(name, payload)
    return batches


def test_cifar10_from_synthetic_archive(tmp_path):
    server = tmp_path / "server" / "cifar-10-python.tar.gz"
    server.parent.mkdir()
    batches = _cifar_tar(server)
    file = dl.RemoteFile("cifar-10-python.tar.gz", server.as_uri(), dl.md5_of(server))
    kw = dict(split="train", download=True, limit=None, file=file)
    x, y = vision._load_cifar10(tmp_path / "cache", channels_last=True, **kw)
    assert x.shape == (15, 32, 32, 3) and x.dtype == torch.uint8 and y.dtype == torch.int64
    first = batches["data_batch_1"][0][0]  # R plane, G plane, B plane, each 32x32 row-major
    assert x[0, 0, 0].tolist() == [first[0], first[1024], first[2048]]
    assert x[0, 1, 2, 1].item() == first[1024 + 32 + 2]
    order = [f"data_batch_{i}" for i in range(1, 6)]  # batches 1..5 though stored 5..1
    assert y.tolist() == [v for b in order for v in batches[b][1]]
    xc, _ = vision._load_cifar10(tmp_path / "cache", channels_last=False, **kw)
    assert xc.shape == (15, 3, 32, 32) and torch.equal(xc.permute(0, 2, 3, 1), x)
    xt, yt = vision._load_cifar10(
        tmp_path / "cache", split="test", download=False, limit=2, channels_last=True, file=file
    )
    assert xt.shape == (2, 32, 32, 3) and yt.tolist() == batches["test_batch"][1][:2]
    # the public loader keeps the real md5: this synthetic archive is refused
    with pytest.raises(HypergradientError, match="c58f30108f718f92721af3b95e74349a"):
        hd.load_cifar10(tmp_path / "cache")


def test_cifar10_refuses_code_in_pickles(tmp_path):
    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    path.parent.mkdir()
    _cifar_tar(path, evil=True)
    file = dl.RemoteFile(path.name, "file:///nowhere", dl.md5_of(path))
    with pytest.raises(HypergradientError, match="data_batch_1 .* not a CIFAR-10 pickle"):
        vision._load_cifar10(
            tmp_path, split="train", download=False, limit=None, channels_last=True, file=file
        )


def test_omniglot_layout_from_synthetic_zip(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "omniglot" / "images_background_small1.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as z:
        for alphabet, char, drawer in [("B", "character02", 2), ("A", "character01", 1)]:
            im = Image.new("1", (105, 105), 1)
            im.putpixel((drawer, 0), 0)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            z.writestr(
                f"images_background_small1/{alphabet}/{char}/0001_{drawer:02d}.png", buf.getvalue()
            )
    fake = dl.RemoteFile(path.name, "file:///nowhere", dl.md5_of(path))
    monkeypatch.setitem(vision.OMNIGLOT_FILES, "background_small1", fake)
    o = hd.load_omniglot(tmp_path)
    assert o.alphabet_names == ("A", "B") and o.alphabets.tolist() == [0, 1]
    assert o.characters.tolist() == [0, 1] and o.drawers.tolist() == [0, 1]
    assert o.images[0, 0, 1] == 255 and o.images[1, 0, 2] == 255 and int(o.images.sum()) == 510
    small = hd.load_omniglot(tmp_path, size=21)  # 5x5 boxes: one ink pixel -> 255 / 25
    assert small.images.shape == (2, 21, 21) and small.images[0, 0, 0].item() == round(255 / 25)


# --------------------------------------------------------------------------- splits and noise


def test_to_float_split():
    images = torch.arange(50, dtype=torch.uint8).repeat_interleave(4).reshape(50, 2, 2) * 5
    labels = torch.arange(50) % 5
    s = hd.to_float_split(images, labels, n_train=20, n_val=10, n_test=5, seed=3)
    assert s.x_train.shape == (20, 4) and s.x_val.shape == (10, 4) and s.x_test.shape == (5, 4)
    assert s.x_train.dtype == torch.float32 and s.num_classes == 5
    ids = torch.cat([s.x_train[:, 0], s.x_val[:, 0], s.x_test[:, 0]]) * 255 / 5
    assert len(set(ids.round().long().tolist())) == 35  # disjoint
    assert torch.equal(torch.cat([s.y_train, s.y_val, s.y_test]), ids.round().long() % 5)
    again = hd.to_float_split(images, labels, n_train=20, n_val=10, n_test=5, seed=3)
    assert torch.equal(again.x_val, s.x_val)
    other = hd.to_float_split(images, labels, n_train=20, n_val=10, n_test=5, seed=4)
    assert not torch.equal(other.y_train, s.y_train)
    rest = hd.to_float_split(images, labels, 20, 10, flatten=False, dtype=torch.float64)
    assert rest.x_test.shape == (20, 2, 2) and rest.x_test.dtype == torch.float64
    assert float(rest.x_train.max()) <= 1.0
    with pytest.raises(HypergradientError, match="the data has 50 examples"):
        hd.to_float_split(images, labels, 40, 10)
    with pytest.raises(HypergradientError, match="must lie in"):
        hd.to_float_split(images.double(), labels, 20, 10)


@needs_data
def test_to_float_split_on_mnist(mnist_train):
    x, y = mnist_train
    s = hd.to_float_split(x, y, n_train=1000, n_val=500, n_test=500, seed=0)
    assert s.x_train.shape == (1000, 784) and s.num_classes == 10
    assert float(s.x_train.min()) == 0.0 and float(s.x_train.max()) == 1.0


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_label_noise_exact_fraction(fraction):
    labels = torch.arange(1000) % 10
    noisy, flipped = hd.add_label_noise(labels, fraction, 10, seed=0)
    assert int(flipped.sum()) == round(fraction * 1000)
    assert bool((noisy[flipped] != labels[flipped]).all())
    assert torch.equal(noisy[~flipped], labels[~flipped])
    assert noisy.dtype == labels.dtype and noisy.min() >= 0 and noisy.max() <= 9


def test_label_noise_seeded_and_uniform():
    labels = torch.zeros(9000, dtype=torch.long)
    a = hd.add_label_noise(labels, 0.9, 10, seed=5)
    b = hd.add_label_noise(labels, 0.9, 10, seed=5)
    c = hd.add_label_noise(labels, 0.9, 10, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    counts = a[0][a[1]].bincount(minlength=10)
    assert counts[0] == 0 and int(counts[1:].min()) > 800  # 900 expected for each other class
    two = hd.add_label_noise(torch.tensor([0, 1, 0, 1]), 1.0, 2, seed=0)[0]
    assert two.tolist() == [1, 0, 1, 0]


def test_label_noise_bad_input():
    with pytest.raises(HypergradientError, match="fraction must lie in"):
        hd.add_label_noise(torch.zeros(3, dtype=torch.long), 1.5, 3)
    with pytest.raises(HypergradientError, match="num_classes"):
        hd.add_label_noise(torch.zeros(3, dtype=torch.long), 0.5, 1)
    with pytest.raises(HypergradientError, match="labels range over"):
        hd.add_label_noise(torch.tensor([0, 3]), 0.5, 3)
    with pytest.raises(HypergradientError, match="must be integers"):
        hd.add_label_noise(torch.zeros(3), 0.5, 3)
