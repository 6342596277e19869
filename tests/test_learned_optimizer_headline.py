"""The headline learned-optimizer benchmark selected nothing on meta-test.

Reads ``benchmarks/results/learned_optimizer_headline.json`` (the committed result of
``benchmarks/learned_optimizer_headline.py``) and the baseline record it compared with, and
fails if any tuned value (estimator, meta learning rates, baseline rates) or the
meta-training set came from a meta-test configuration; then shows the audit fails on a
record that leaks one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from hypergradient import learned
from hypergradient._errors import HypergradientError

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks/results"
HEADLINE = RESULTS / "learned_optimizer_headline.json"
BASELINES = RESULTS / "learned_optimizer_protocol.json"

pytestmark = pytest.mark.skipif(not HEADLINE.exists(), reason="benchmark result not written yet")


@pytest.fixture(scope="module")
def record():
    return json.loads(HEADLINE.read_text())


@pytest.fixture(scope="module")
def splits(record):
    return learned.make_splits(**record["protocol"]["settings"])


def test_every_selection_is_audited_and_off_meta_test(record, splits):
    names = learned.check_selections(record)
    assert names == [
        "meta_training_set",
        "hierarchical.estimator",
        "hierarchical.meta_lr",
        "mlp.meta_lr",
    ]
    by_name = {s["name"]: s for s in record["selections"]}
    # theta was fitted on meta-train only; every hyperparameter was chosen on meta-validation
    assert by_name["meta_training_set"]["split"] == "meta_train"
    assert set(by_name["meta_training_set"]["config_ids"]) <= splits.ids("meta_train")
    for name in ("hierarchical.estimator", "hierarchical.meta_lr", "mlp.meta_lr"):
        assert by_name[name]["split"] == "meta_valid"
        assert set(by_name[name]["config_ids"]) <= splits.ids("meta_valid")
    # what the runs used is what the selections say
    assert (
        record["chosen"]["hierarchical"]["estimator"] == by_name["hierarchical.estimator"]["value"]
    )
    assert record["chosen"]["hierarchical"]["meta_lr"] == by_name["hierarchical.meta_lr"]["value"]
    assert record["chosen"]["mlp"]["meta_lr"] == by_name["mlp.meta_lr"]["value"]
    assert record["meta_train_configs"] == by_name["meta_training_set"]["config_ids"]
    for model, runs in record["runs"].items():
        for run in runs:
            assert run["settings"]["estimator"] == record["chosen"][model]["estimator"]
            assert run["settings"]["meta_lr"] == record["chosen"][model]["meta_lr"]
    # the evidence behind the estimator choice: the lowest meta-validation loss of the grid
    scores = by_name["hierarchical.estimator"]["evidence"]["final_valid_loss"]
    estimator, lr = by_name["hierarchical.estimator"]["value"], by_name["hierarchical.meta_lr"]
    assert min(scores, key=scores.get) == f"{estimator}@{lr['value']:g}"


def test_meta_test_is_the_baselines_and_only_scored(record, splits):
    baselines = json.loads(BASELINES.read_text())
    learned.check_selections(baselines)  # the baseline rates came from meta-validation too
    assert record["baseline_record"]["tuned_lr"] == baselines["tuned_lr"]
    assert record["meta_test_used"] == baselines["meta_test_used"][: len(record["meta_test_used"])]
    assert set(record["meta_test_used"]) <= splits.ids("meta_test")
    used_elsewhere = set(record["meta_train_configs"]) | set(record["meta_valid_used"])
    assert not used_elsewhere & set(record["meta_test_used"])
    assert record["horizon"] == baselines["horizon"]


def test_audit_fails_on_a_record_that_read_meta_test(record, splits):
    leaked = copy.deepcopy(record)
    leaked["selections"][2]["config_ids"].append(splits.meta_test[0].config_id)
    with pytest.raises(HypergradientError, match="read meta-test configuration"):
        learned.check_selections(leaked)
    named = copy.deepcopy(record)
    named["selections"][0]["split"] = "meta_test"
    with pytest.raises(HypergradientError, match="made on 'meta_test'"):
        learned.check_selections(named)
