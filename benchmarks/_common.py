"""What every benchmark records about the machine, and how the memory benchmarks read peak RSS.

Benchmarks are run as scripts (``python benchmarks/<name>.py``), so this directory is on
``sys.path`` and they import ``from _common import ...``.
"""

from __future__ import annotations

import datetime
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
