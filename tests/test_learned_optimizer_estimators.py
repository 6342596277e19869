"""The estimator study (``benchmarks/learned_optimizer_estimators.py``): its core at toy size
selects on meta-validation only, and the committed result passes ``check_selections``."""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import pytest

from hypergradient import learned
from hypergradient._errors import HypergradientError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import learned_optimizer_estimators as bench  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "learned_optimizer_estimators.json"


def test_study_at_toy_size_selects_on_meta_valid_and_matches_compute():
    args = argparse.Namespace(
        families=1,
        valid_tasks=1,
        horizon=4,
        truncation=2,
        pairs=2,
        outer_steps=1,
        eval_every=1,
        hidden=4,
        sigma=0.01,
        lr_grid=[1e-3, 1e-2],
        seeds=1,
    )
    result = bench.study(args)
    assert learned.check_selections(result) == [f"{e}.meta_lr" for e in learned.ESTIMATORS]
    splits = learned.make_splits(0)
    valid_ids = splits.ids("meta_valid")
    for sel in result["selections"]:
        assert sel["split"] == "meta_valid" and set(sel["config_ids"]) <= valid_ids
        by_lr = sel["evidence"]["final_valid_loss_by_lr"]
        assert sel["value"] == min(args.lr_grid, key=lambda lr: by_lr[f"{lr:g}"])
    # equal compute: every estimator runs the same inner steps; curves start at step 0
    assert {r["inner_steps"] for r in result["runs"]} == {1 * 2 * 2 * 2}
    for run in result["runs"]:
        assert run["curve"]["step"] == [0, 1]
        assert all(math.isfinite(v) for v in run["curve"]["valid_loss"])
    # the meta-train families come from meta-train only
    train_ids = splits.ids("meta_train")
    configs = [learned.TaskConfig.from_dict(c) for c in result["meta_train_configs"]]
    assert {c.config_id for c in configs} <= train_ids
    # a record whose selection read a meta-test task is refused
    bad = copy.deepcopy(result)
    bad["selections"][0]["config_ids"].append(splits.meta_test[0].config_id)
    with pytest.raises(HypergradientError, match="meta-test"):
        learned.check_selections(bad)


@pytest.mark.skipif(not RESULT.exists(), reason="benchmark result not written yet")
def test_committed_result_selected_nothing_on_meta_test():
    record = json.loads(RESULT.read_text())
    assert learned.check_selections(record) == [f"{e}.meta_lr" for e in learned.ESTIMATORS]
    assert len(record["runs"]) == len(learned.ESTIMATORS) * record["config"]["seeds"] >= 12
    assert len({r["inner_steps"] for r in record["runs"]}) == 1  # equal compute
