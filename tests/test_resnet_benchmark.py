"""The ResNet benchmark runs end to end (``--quick``: a tiny ResNet-8, 20 SGD steps, one
seed) and writes its table, JSON and plot; its ResNet is what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _datasets import find_datasets, skip_reason

ROOT = Path(__file__).resolve().parents[1]
FASHION = find_datasets("fashion-mnist")
sys.path.insert(0, str(ROOT / "benchmarks"))

import resnet_fashion  # noqa: E402


def test_the_resnet_has_the_depth_and_size_of_its_name():
    # ResNet-20 (3 blocks per stage, width 16): 19 convolutions + the head, 272,186 weights
    net = resnet_fashion.resnet(3, 16)
    convs = [
        m for m in net.modules() if m.__class__.__name__ == "Conv2d" and m.kernel_size == (3, 3)
    ]
    assert len(convs) == 19
    assert sum(p.numel() for p in net.parameters()) == 272_186


def test_both_arms_share_a_cosine_staircase_that_ends_at_zero():
    args = resnet_fashion.parse_args(["--steps", "400", "--hyper-every", "20", "--lr", "0.05"])
    blocks = 400 // 20
    rates = [resnet_fashion.lr_at(args, b) for b in range(blocks + 1)]
    assert rates[0] == pytest.approx(0.05)
    assert rates[blocks // 2] == pytest.approx(0.025)
    assert rates[-1] == pytest.approx(0.0, abs=1e-15)
    assert all(a >= b for a, b in zip(rates, rates[1:]))


@pytest.mark.skipif(FASHION is None, reason=skip_reason("fashion-mnist"))
def test_the_quick_run_writes_its_table_json_and_plot(tmp_path):
    env = {**os.environ, "HYPERGRADIENT_DATA": str(FASHION)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "resnet_fashion.py"), "--quick",
         "--out", str(tmp_path), "--threads", "1"],
        capture_output=True, text=True, env=env, check=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "resnet_fashion_quick.json").read_text())
    (run,) = result["runs"]
    assert 0 < run["tuned_test_acc"] <= 1 and 0 < run["grid_test_acc"] <= 1
    assert run["grid_best"] in run["grid"]
    # the hypergradient arm's settings come from the selection seeds, not the report seeds
    selection = result["selection"]
    assert selection["chosen"] in selection["candidates"]
    assert not set(result["args"]["selection_seeds"]) & set(result["args"]["seeds"])
    assert (tmp_path / "resnet_fashion_quick.png").stat().st_size > 0
    assert "per-layer decay + augmentation" in (tmp_path / "resnet_fashion_quick.md").read_text()
