"""The GPU check script: on a machine without CUDA it says so in one line and exits 0; its
checks themselves run here on the CPU (device "cpu"), so a GPU session finds them working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: it would run")
def test_without_cuda_the_script_skips_with_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("gpu_check: skipped: no CUDA device here")
    assert not list(tmp_path.iterdir())


def test_the_checks_run_and_pass_on_the_cpu():
    rows = gpu_check.check_functional(torch.device("cpu")) + gpu_check.check_trainer("cpu")
    failed = [r for r in rows if not r["rel_error"] <= r["bound"]]
    assert not failed, failed
    costs = gpu_check.cost_table("cpu", repeats=1, width=32)
    assert [r["what"] for r in costs][0] == "train step" and all(r["ms"] > 0 for r in costs)
