"""What every benchmark records about the machine, and how the memory benchmarks read peak RSS.

Benchmarks are run as scripts (``python benchmarks/<name>.py``), so this directory is on
``sys.path`` and they import ``from _common import ...``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

import torch


def cpu_model() -> str | None:
    """The CPU's marketing name from ``/proc/cpuinfo`` (Linux), or None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


DATA_ENV = "HYPERGRADIENT_DATA"  # the library's data folder (hypergradient.data.download)


def data_source(data_dir) -> str:
    """How a result names its data folder: ``--data-dir``'s value when one was given, else
    ``$HYPERGRADIENT_DATA`` (the default of every benchmark's ``--data-dir``; unset: the
    library's ``~/.cache/hypergradient``), so no machine's folder is written by default."""
    if data_dir is not None:
        return str(data_dir)
    return f"${DATA_ENV}" if os.environ.get(DATA_ENV, "").strip() else "~/.cache/hypergradient"


def rerun_command(script: str, argv: list[str]) -> str:
    """``python benchmarks/<script> <argv>`` as a result records it, prefixed with
    ``HYPERGRADIENT_DATA=/path/to/datasets`` when the data folder came from that variable."""
    words = ["python", f"benchmarks/{script}", *argv]
    given = any(a == "--data-dir" or a.startswith("--data-dir=") for a in argv)
    if not given and os.environ.get(DATA_ENV, "").strip():
        words.insert(0, f"{DATA_ENV}=/path/to/datasets")
    return " ".join(words)


def machine_info(*, threads: int | None = None, device: str = "cpu", **extra: Any) -> dict:
    """Date, platform, CPU, torch version and threads, load average, GPU name, plus ``extra``.

    ``threads`` defaults to ``torch.get_num_threads()``. The load average at start is kept
    because other jobs on a small shared machine slow torch badly: check it before trusting
    any time in the result.
    """
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads() if threads is None else threads,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if str(device).startswith("cuda") else None,
    }
    info.update(extra)
    return info


def status_kib(field_name: str) -> int | None:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``; Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: ``echo 5 > clear_refs``).

    ``ru_maxrss`` cannot be reset and is inherited across ``fork``, so a probe that wants the
    peak of one phase resets ``VmHWM`` here and reads :func:`status_kib` ``("VmHWM")`` after.
    Returns False where the kernel does not allow it (then callers fall back to differences).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_cache(path) -> Any:
    """A benchmark's cache file, read with ``torch.load(weights_only=True)`` (through
    :func:`hypergradient._io.load_tensors`): tensors, numbers, strings and containers only, so
    a planted file is refused with one line and runs no code."""
    from hypergradient._io import load_tensors

    return load_tensors(path, "benchmark cache", what="the cache")


def save_cache(state: dict[str, Any], path) -> None:
    """Write a cache that :func:`load_cache` reads: plain tensors and containers, atomically."""
    from hypergradient._io import save_atomic

    save_atomic(state, path)


def write_outputs(out, stem: str, result: dict, markdown, plot=None) -> str:
    """Write ``<out>/<stem>.json`` (the record), ``<stem>.md`` (``markdown(result)``) and,
    given ``plot(result, path)``, ``<stem>.png``; print the markdown and return it."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    if plot is not None:
        plot(result, out / f"{stem}.png")
    print(text)
    return text
