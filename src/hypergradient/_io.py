"""Files that survive a kill and cannot run code: atomic checkpoint and JSON writes,
checkpoint reads that refuse anything but tensors and plain containers, run signatures, and
a lock that keeps a second process out of a run folder. Shared by the training loop, the
recipes, meta-training and the benchmarks.

Why each piece:

* **No code from a file.** a full ``torch.load`` unpickles arbitrary objects, so a
  planted ``checkpoint.pt`` can run a shell command on ``--resume``. Every checkpoint here is
  read with ``weights_only=True`` (tensors, numbers, strings, lists, tuples, dicts); nothing
  the project saves needs more.
* **Signatures.** A checkpoint carries the options that define its run (a JSON string under
  :data:`SIGNATURE_KEY`); resuming with other options, or from another run's file, is refused
  with one line that lists what differs.
* **Unique temporary names.** Two writers of one file never share a temporary file; the
  ``os.replace`` at the end is atomic, so a reader sees the old or the new file, never a mix.
* **One process per run folder.** :class:`RunLock` takes an exclusive ``flock`` on a lock
  file; the kernel drops it when the process dies (even by SIGKILL), so a lock can never be
  left stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ._errors import HypergradientError

#: key of the run signature (a JSON string) inside a checkpoint dict
SIGNATURE_KEY = "hypergradient_signature"

#: the project's own plain-data classes that checkpoints may hold besides tensors and
#: containers (see :func:`checkpoint_type`); loading rebuilds them field by field, no code runs
_CHECKPOINT_TYPES: list[type] = []


def checkpoint_type(cls: type) -> type:
    """Class decorator: let checkpoints hold instances of ``cls``, a plain-data class of this
    project (a dataclass of tensors, numbers and containers) whose rebuilding runs no code."""
    _CHECKPOINT_TYPES.append(cls)
    return cls


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A fresh, uniquely named temporary file in ``path``'s folder, removed unless replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def signature_text(signature: Any) -> str:
    """The canonical JSON text of a run signature (sorted keys; numbers it cannot write as
    floats, such as numpy scalars, as floats)."""
    return json.dumps(signature, sort_keys=True, default=float)


def save_atomic(
    state: dict[str, Any], path: str | os.PathLike, *, signature: Any | None = None
) -> None:
    """``torch.save`` to a unique temporary file beside ``path``, then ``os.replace``: a kill
    mid-write keeps the old file, and two writers never mix. ``signature`` (any JSON-able
    value, normally a dict of the options that define the run) is stored with the state and
    checked by :func:`load_checkpoint`."""
    path = Path(path)
    if signature is not None:
        state = {**state, SIGNATURE_KEY: signature_text(signature)}
    with _temporary_beside(path) as tmp:
        torch.save(state, tmp)
        os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` into ``path`` through a unique temporary file and ``os.replace``."""
    path = Path(path)
    with _temporary_beside(path) as tmp:
        tmp.write_text(text)
        os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """``data`` as JSON (numbers it cannot write as floats), replacing ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, default=float))


def load_tensors(path: str | os.PathLike | BinaryIO, where: str, *, what: str = "") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain containers,
    never code.  ``path`` may also be an open binary file (e.g. ``io.BytesIO`` of bytes whose
    checksum was just verified, so that the bytes checked are the bytes loaded).  A file that
    needs anything else (a planted pickle) is refused with a
    :class:`~hypergradient.HypergradientError` that starts with ``where``; so is a truncated or
    foreign file (``what``, e.g. ``"the checkpoint"``, names it in the message). Nothing in
    the file runs either way."""
    if hasattr(path, "read"):  # an open file: it has no name to show
        source, label = path, what or "the file"
    else:
        source = Path(path)
        label = f"{what} {str(path)!r}" if what else repr(str(path))
    try:
        with warnings.catch_warnings():
            # a plain pickle (not torch's zip format) makes torch warn about its protocol
            # before the restricted unpickler refuses it; the error below says it all
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(_CHECKPOINT_TYPES):
                return torch.load(source, weights_only=True)
    except Exception as err:
        # the restricted unpickler names the first global it refused ("GLOBAL posix.system")
        found = re.search(r"GLOBAL (\S+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and found:
            raise HypergradientError(
                f"{where}: refused to load {label}: it holds Python objects other than tensors "
                f"and plain containers ({found.group(1)}), and unpickling them could run code. "
                f"hypergradient never writes such files; delete it (or move it away) to start "
                f"over."
            ) from None
        raise HypergradientError(
            f"{where}: could not read {label} ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]}). Delete it to start over."
        ) from None


def load_checkpoint(
    path: str | os.PathLike, where: str, *, signature: Any | None = None
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (see :func:`load_tensors`; never runs
    code). With ``signature``, the checkpoint must carry the same signature: one that belongs
    to another run, or carries none, is refused with one line listing what differs. The
    signature entry is removed from the returned dict."""
    state = load_tensors(path, where, what="the checkpoint")
    if not isinstance(state, dict):
        raise HypergradientError(
            f"{where}: {str(path)!r} holds a {type(state).__name__}, not a hypergradient "
            f"checkpoint (a dict). Delete it to start over."
        )
    saved = state.pop(SIGNATURE_KEY, None)
    if signature is not None:
        check_signature(saved, signature, path, where)
    return state


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (``{"model": {"0.weight": ...}}`` ->
    ``{"model.0.weight": ...}``), so that a difference names the leaf that differs."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _describe_differences(saved: Any, expected: Any) -> str:
    saved, expected = _flatten(saved), _flatten(expected)
    missing = object()
    # the kind of run first (a recipe's name, a trainer's model), then the options
    keys = sorted(set(saved) | set(expected))
    keys.sort(key=lambda k: k.split(".")[0] not in ("recipe", "trainer", "model"))
    parts = [
        f"{k}: {saved.get(k, '(none)')!r} -> {expected.get(k, '(none)')!r}"
        for k in keys
        if saved.get(k, missing) != expected.get(k, missing)
    ]
    more = f" and {len(parts) - 4} more" if len(parts) > 4 else ""
    return ", ".join(parts[:4]) + more


def check_signature(saved: str | None, signature: Any, path: str | os.PathLike, where: str):
    """Refuse a checkpoint whose stored signature (``saved``, JSON text or ``None``) is not
    ``signature``, with one line: which file, what differs (checkpoint -> this run), the fix."""
    expected = json.loads(signature_text(signature))
    if saved is None:
        raise HypergradientError(
            f"{where}: {str(path)!r} carries no run signature, so it was not written by this "
            f"run (another program or an older version); delete it or start in a new folder."
        )
    try:
        found = json.loads(saved)
    except (TypeError, ValueError):
        found = saved
    if found != expected:
        raise HypergradientError(
            f"{where}: {str(path)!r} belongs to another run ("
            f"{_describe_differences(found, expected)}); resume with the options it was made "
            f"with, or start over without resuming or in a new folder."
        )


#: the lock file that keeps a second process out of a run folder (see :class:`RunLock`)
LOCK_NAME = ".hypergradient.lock"
LOCK_HINT = ", or pass another --out"


def make_run_folder(folder: Path, option: str) -> None:
    """Create the run folder ``folder`` (given by the command-line ``option``), or say in one
    line why not: a file in the way, or a folder that cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise HypergradientError(
            f"{option} {str(folder)!r}: is a file, expected a folder (created if missing); "
            f"pass another {option}."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise HypergradientError(
            f"{option} {str(folder)!r}: cannot write there ({err.strerror or err}); pass a "
            f"writable folder with {option}."
        ) from None


class RunLock:
    """An exclusive lock on ``path`` (a lock file, created if needed) for as long as the
    ``with`` block runs: a second process that tries to take it gets one
    :class:`~hypergradient.HypergradientError` naming the process that holds it.

    Uses ``fcntl.flock`` (``msvcrt.locking`` on Windows): the operating system releases the
    lock when the holder exits or is killed, so no stale lock survives a crash. Locks are held
    per open file, so one process must not nest two locks on the same path.
    """

    def __init__(self, path: str | os.PathLike, where: str, *, hint: str = ""):
        self.path = Path(path)
        self.where = where
        self.hint = hint
        self._file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is held
        try:
            _lock_file(handle)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise HypergradientError(
                f"{self.where}: another process (pid {holder}) is running in "
                f"{str(self.path.parent)!r} (it holds {self.path.name}); wait for it to "
                f"finish{self.hint}."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                _unlock_file(self._file)
            self._file.close()
            self._file = None


try:
    import fcntl

    def _lock_file(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_file(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _lock_file(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock_file(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
