"""Dataset files in a local folder: checked by md5, downloaded on request.

A loader names the files it needs as :class:`RemoteFile` entries (file name, URL, md5).
:func:`fetch_files` finds them in a folder, verifies each one's md5, and - only when the
caller passes ``download=True`` - downloads the missing ones first. Nothing is ever fetched
behind the user's back, and a file whose md5 does not match is never used.

The default folder is :func:`default_data_dir`: ``$HYPERGRADIENT_DATA`` when set, else
``~/.cache/hypergradient``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._errors import HypergradientError

ENV_VAR = "HYPERGRADIENT_DATA"
_CHUNK = 1 << 20

# How every message names the two settings, for library calls and the recipes' command line
# (``hypergradient <recipe> --set data_dir=... download=true``) alike.
DATA_DIR_HINT = f"data_dir= (command line: --set data_dir=...; or set ${ENV_VAR})"
DOWNLOAD_HINT = "download=True (command line: --set download=true)"

# Indirection so that tests (and callers behind a proxy) can swap the opener.
_urlopen = urllib.request.urlopen


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its name in the data folder, where to get it, its md5.

    Examples:
        >>> import hashlib, tempfile
        >>> from pathlib import Path
        >>> import hypergradient as hg
        >>> md5 = hashlib.md5(b"hi").hexdigest()
        >>> f = hg.data.RemoteFile("a.txt", "https://example.com/a.txt", md5)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / f.name).write_bytes(b"hi")  # a local copy, so nothing is downloaded
        ...     paths = hg.data.fetch_files([f], d, download=False, where="demo")
        >>> f.name, [p.name for p in paths]
        ('a.txt', ['a.txt'])
    """

    name: str
    url: str
    md5: str


def default_data_dir() -> Path:
    """The folder datasets live in: ``$HYPERGRADIENT_DATA``, else ``~/.cache/hypergradient``.

    Examples:
        >>> import os
        >>> from pathlib import Path
        >>> from unittest import mock
        >>> import hypergradient as hg
        >>> with mock.patch.dict(os.environ, {"HYPERGRADIENT_DATA": "/srv/datasets"}):
        ...     print(hg.data.default_data_dir().as_posix())
        /srv/datasets
        >>> with mock.patch.dict(os.environ, {"HYPERGRADIENT_DATA": ""}):  # unset or empty
        ...     print(hg.data.default_data_dir().relative_to(Path.home()).as_posix())
        .cache/hypergradient
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "hypergradient"


def md5_of(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_hint(url: str, dest: Path) -> str:
    return (
        f"download {url} yourself (a browser or `curl -L -O {url}`) and put it at {dest}, "
        f"or point {DATA_DIR_HINT} at a folder that holds it"
    )


def verify_md5(path: Path, md5: str, *, url: str | None = None, where: str = "fetch") -> None:
    """Raise :class:`HypergradientError` unless the file at ``path`` has this md5."""
    try:
        actual = md5_of(path)
    except OSError as exc:
        raise HypergradientError(
            f"{where}: cannot read {path} to check its md5 ({exc}). Check the file's "
            f"permissions, or delete it and fetch it again."
        ) from exc
    if actual != md5.lower():
        source = f" from {url}" if url else ""
        raise HypergradientError(
            f"{where}: {path} has md5 {actual}, but the expected md5 is {md5.lower()}, so "
            f"the file is damaged (e.g. a cut-off download) or is a different file. Delete "
            f"it and load again with {DOWNLOAD_HINT}, or point {DATA_DIR_HINT} at a "
            f"folder that holds a good copy{source}."
        )


def fetch(
    url: str,
    dest: Path,
    md5: str,
    *,
    download: bool,
    timeout: float = 60.0,
    progress: bool = True,
    where: str = "fetch",
) -> Path:
    """Make sure ``dest`` holds the file at ``url`` with this md5, and return ``dest``.

    An existing ``dest`` is only verified. A missing one is downloaded when ``download`` is
    true: streamed to a temporary file beside ``dest`` (with a progress bar on stderr when
    the server tells the size), checked, then renamed into place atomically, so an
    interrupted download never leaves a partial file under the final name. ``timeout`` is
    the socket timeout in seconds for connecting and for each read. Every failure raises
    :class:`HypergradientError` saying which file, what went wrong, and how to fix it.

    Examples:
        >>> import hashlib, tempfile
        >>> from pathlib import Path
        >>> import hypergradient as hg
        >>> url, md5 = "https://example.com/a.txt", hashlib.md5(b"hi").hexdigest()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     dest = Path(d) / "a.txt"
        ...     _ = dest.write_bytes(b"hi")
        ...     print(hg.data.fetch(url, dest, md5, download=False) == dest)  # md5 checked
        True
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +ELLIPSIS
        ...     hg.data.fetch(url, Path(d) / "a.txt", md5, download=False)
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: fetch: .../a.txt does not exist. Pass ...
    """
    dest = Path(dest)
    if dest.is_file():
        verify_md5(dest, md5, url=url, where=where)
        return dest
    if dest.exists():
        raise HypergradientError(
            f"{where}: {dest} exists but is not a file. Remove it or point {DATA_DIR_HINT} "
            f"at another folder."
        )
    if not download:
        raise HypergradientError(
            f"{where}: {dest} does not exist. Pass {DOWNLOAD_HINT} to fetch it from {url}, "
            f"or {_manual_hint(url, dest)}."
        )
    _download(url, dest, md5, timeout=timeout, progress=progress, where=where)
    return dest


def fetch_files(
    files: Sequence[RemoteFile],
    folder: Path,
    *,
    download: bool,
    where: str,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[Path]:
    """:func:`fetch` each file into ``folder``; with ``download=False`` one error names all
    the missing files (and where to get them) instead of stopping at the first.

    Examples:
        >>> import tempfile
        >>> import hypergradient as hg
        >>> files = [hg.data.RemoteFile(n, "https://example.com/" + n, "0" * 32) for n in "ab"]
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +ELLIPSIS
        ...     hg.data.fetch_files(files, d, download=False, where="demo")
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: demo: the folder ... lacks 2 of the 2 file(s) ...
          a  (md5 00000000000000000000000000000000, from https://example.com/a)
          b  (md5 00000000000000000000000000000000, from https://example.com/b)
        Pass download=True ...
    """
    folder = Path(folder)
    if not download:
        missing = [f for f in files if not (folder / f.name).is_file()]
        if missing:
            listing = "\n".join(f"  {f.name}  (md5 {f.md5}, from {f.url})" for f in missing)
            raise HypergradientError(
                f"{where}: the folder {folder} lacks {len(missing)} of the {len(files)} "
                f"file(s) it needs:\n{listing}\nPass {DOWNLOAD_HINT} to fetch them into "
                f"that folder, or download them yourself from the URLs above and put them "
                f"there under exactly these names, or point {DATA_DIR_HINT} at a folder that "
                f"holds them."
            )
    return [
        fetch(
            f.url,
            folder / f.name,
            f.md5,
            download=download,
            timeout=timeout,
            progress=progress,
            where=where,
        )
        for f in files
    ]


def _download(url: str, dest: Path, md5: str, *, timeout: float, progress: bool, where: str):
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise HypergradientError(
            f"{where}: cannot write into {dest.parent} to download {dest.name} ({exc}). "
            f"Point {DATA_DIR_HINT} at a writable folder."
        ) from exc
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        try:
            with os.fdopen(fd, "wb") as out, _urlopen(url, timeout=timeout) as response:
                total = _content_length(response)
                bar = _progress_bar(dest.name, total) if progress and total else None
                try:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar[0].update(bar[1], completed=received)
                finally:
                    if bar is not None:
                        bar[0].stop()
                if total is not None and received != total:
                    raise HypergradientError(
                        f"{where}: the download of {url} stopped after {received} of {total} "
                        f"bytes. Run again (the partial file was removed), or "
                        f"{_manual_hint(url, dest)}."
                    )
        except HypergradientError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = _describe(exc)
            raise HypergradientError(
                f"{where}: downloading {url} failed after {received} bytes: {reason}. Check "
                f"the network connection (and any proxy: urllib honours $https_proxy), or "
                f"{_manual_hint(url, dest)}."
            ) from exc
        actual = digest.hexdigest()
        if actual != md5.lower():
            raise HypergradientError(
                f"{where}: the file downloaded from {url} ({received} bytes) has md5 "
                f"{actual}, but the expected md5 is {md5.lower()}; it was not kept. The "
                f"download was damaged or the server now serves a different file: run again, "
                f"or {_manual_hint(url, dest)}."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _content_length(response) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        size = int(value) if value is not None else None
    except ValueError:
        return None
    return size if size and size > 0 else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{exc.reason}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _progress_bar(name: str, total: int):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(f"downloading {name}", total=total)
    bar.start()
    return bar, task
