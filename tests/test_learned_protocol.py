"""The learned-optimizer protocol: splits, baselines, the meta-test guard, paired tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hypergradient import learned
from hypergradient._errors import HypergradientError

RESULT = Path(__file__).resolve().parents[1] / "benchmarks/results/learned_optimizer_protocol.json"


@pytest.fixture(scope="module")
def splits():
    return learned.make_splits(seed=0)


def test_splits_are_deterministic_disjoint_and_hundreds(splits):
    again = learned.make_splits(seed=0)
    assert again.hashes() == splits.hashes()
    assert again.meta_test == splits.meta_test
    other = learned.make_splits(seed=1)
    assert all(other.hashes()[s] != splits.hashes()[s] for s in learned.SPLITS)
    sizes = [len(splits[s]) for s in learned.SPLITS]
    assert sizes == [300, 60, 90]
    ids = [splits.ids(s) for s in learned.SPLITS]
    assert sum(len(i) for i in ids) == sum(sizes)  # no duplicate configuration anywhere
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    archs = [{c.architecture for c in splits[s]} for s in learned.SPLITS]
    # held-out configurations: no architecture is shared between splits
    assert not (archs[0] & archs[1] or archs[0] & archs[2] or archs[1] & archs[2])
    # the distribution is varied: both models, several widths, depths and batch sizes
    train = splits.meta_train
    assert {c.model for c in train} == {"mlp", "cnn"}
    assert len({c.width for c in train}) >= 5 and len({c.batch_size for c in train}) == 4
    assert {c.depth for c in train if c.model == "mlp"} == {1, 2, 3}


def test_held_out_families_only_in_meta_test(splits):
    for split in ("meta_train", "meta_valid"):
        assert {c.dataset for c in splits[split]} == {"digits", "mnist"}
        assert {c.activation for c in splits[split]} == {"relu", "tanh"}
    test = splits.meta_test
    assert sum(c.dataset == "fashion-mnist" for c in test) == 30
    assert sum(c.activation == "gelu" and c.dataset != "fashion-mnist" for c in test) == 30
    with pytest.raises(HypergradientError, match="both in distribution and held out"):
        learned.make_splits(seed=0, activations=("relu", "gelu"))


def test_configs_and_splits_round_trip_through_json(splits):
    for config in splits.meta_test[::7]:
        assert learned.TaskConfig.from_json(config.to_json()) == config
        assert learned.TaskConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    record = json.loads(json.dumps(splits.to_dict()))
    back = learned.ProtocolSplits.from_dict(record)
    assert back.hashes() == splits.hashes() and back.meta_valid == splits.meta_valid
    record["meta_valid"][0]["width"] += 1  # edited after writing: the hash says so
    with pytest.raises(HypergradientError, match="do not match"):
        learned.ProtocolSplits.from_dict(record)
    with pytest.raises(HypergradientError, match="unknown keys"):
        learned.TaskConfig.from_dict({**splits.meta_train[0].to_dict(), "lr": 0.1})
    # a config builds its family and a deterministic task
    config = learned.TaskConfig("digits", "mlp", 8, 1, "gelu", 16, seed=5)
    assert config.family().name == "digits-mlp-w8-gelu-b16"
    a, b = config.task(3), config.task(3)
    assert torch.equal(a.data["batches"], b.data["batches"])
    assert not torch.equal(a.data["batches"], config.task(3, replicate=1).data["batches"])


def test_warmup_cosine_schedule_values():
    lr, horizon = 0.2, 40
    base = learned.Baseline("sgdm", "warmup_cosine", lr=lr, momentum=0.0)
    warmup = 2  # round(0.05 * 40)
    rates = [base.rate(t, horizon) for t in range(horizon + 1)]
    assert rates[0] == pytest.approx(lr / 2, abs=1e-15) and rates[1] == pytest.approx(lr)
    assert rates[warmup] == pytest.approx(lr)  # cosine starts at the peak
    assert rates[warmup + 19] == pytest.approx(lr / 2)  # halfway through the decay
    expected_last = 0.5 * lr * (1 + math.cos(math.pi * 37 / 38))
    assert rates[horizon - 1] == pytest.approx(expected_last, rel=1e-12)
    assert rates[horizon] == 0.0
    assert all(x >= y for x, y in zip(rates[warmup:], rates[warmup + 1 :]))
    assert learned.Baseline("adam", "constant", lr=lr).rate(17, horizon) == lr
    # the transform applies exactly these rates: SGD without momentum on a unit gradient
    tx = base.transform(horizon)
    params = {"w": torch.zeros((), dtype=torch.float64)}
    state = tx.init(params)
    for t in range(horizon):
        updates, state = tx.update({"w": torch.ones((), dtype=torch.float64)}, state, params)
        assert float(updates["w"]) == pytest.approx(-rates[t], rel=1e-12, abs=1e-15)
    with pytest.raises(HypergradientError, match="0 <= warmup_steps < horizon"):
        learned.warmup_cosine(1.0, horizon=5, warmup_steps=5)


def test_tuning_reads_only_meta_validation(splits, monkeypatch):
    built = []
    original = learned.TaskConfig.task

    def spy(self, *args, **kwargs):
        built.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(learned.TaskConfig, "task", spy)
    valid = [c for c in splits.meta_valid if c.dataset == "digits" and c.model == "mlp"][:2]
    log = learned.SelectionLog(splits)
    result = learned.tune_baseline(
        learned.Baseline("adam", "warmup_cosine"), [1e-4, 1e-2, 30.0], valid, 8, log
    )
    assert {splits.split_of(c) for c in built} == {"meta_valid"} and len(built) == 6
    assert result.baseline.lr == 1e-2 and set(result.medians) == {1e-4, 1e-2, 30.0}
    assert result.medians[1e-2] < result.medians[1e-4]
    assert log.selections[0].split == "meta_valid" and log.selections[0].value == 1e-2
    built.clear()
    test_config = next(c for c in splits.meta_test if c.dataset == "digits")
    with pytest.raises(HypergradientError, match="read 1 meta-test configuration"):
        learned.tune_baseline(
            learned.Baseline("adam", "constant"), [1e-2], [*valid, test_config], 8, log
        )
    assert built == []  # refused before any training
    stray = learned.TaskConfig("digits", "mlp", 8, 1, "relu", 16, seed=1)
    with pytest.raises(HypergradientError, match="in no split"):
        log.record("x", 1, [stray])
    assert len(log.selections) == 1


def test_check_selections_on_a_synthetic_record(splits, tmp_path):
    log = learned.SelectionLog(splits)
    log.record("adam-constant.lr", 0.01, splits.meta_valid[:3], {"medians": {}})
    log.record("meta_lr", 3e-3, splits.meta_train[:2])
    full = log.to_dict()
    compact = {  # what a benchmark writes: settings and hashes, not the 450 configurations
        "protocol": {"settings": dict(splits.settings), "hashes": splits.hashes()},
        "selections": full["selections"],
    }
    path = tmp_path / "record.json"
    path.write_text(json.dumps(compact))
    assert learned.check_selections(path) == ["adam-constant.lr", "meta_lr"]
    assert learned.check_selections(full) == ["adam-constant.lr", "meta_lr"]

    def broken(edit):
        record = json.loads(json.dumps(compact))
        edit(record)
        return record

    leak = broken(lambda r: r["selections"][1]["config_ids"].append(splits.meta_test[4].config_id))
    with pytest.raises(HypergradientError, match="'meta_lr' read meta-test"):
        learned.check_selections(leak)
    labelled = broken(lambda r: r["selections"][0].update(split="meta_test"))
    with pytest.raises(HypergradientError, match="made on 'meta_test'"):
        learned.check_selections(labelled)
    stray = broken(lambda r: r["selections"][0]["config_ids"].append("000000000000"))
    with pytest.raises(HypergradientError, match="in\nno split|in no split"):
        learned.check_selections(stray)
    other = broken(lambda r: r["protocol"]["hashes"].update(meta_test="0" * 64))
    with pytest.raises(HypergradientError, match="does not reproduce"):
        learned.check_selections(other)


@pytest.mark.skipif(not RESULT.exists(), reason="benchmark result not written yet")
def test_benchmark_result_selected_nothing_on_meta_test():
    record = json.loads(RESULT.read_text())
    names = learned.check_selections(record)
    assert len(names) == 4 * record["seeds"]  # four baselines tuned per seed
    test_ids = learned.make_splits(**record["protocol"]["settings"]).ids("meta_test")
    assert set(record["meta_test_used"]) <= test_ids


def test_paired_comparison_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for wins, losses in [(9, 1), (12, 5), (3, 3), (0, 7), (20, 11)]:
        expected = stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert learned.sign_test(wins, losses) == pytest.approx(expected, rel=1e-12)
    # scipy's documented example: exact two-sided Wilcoxon p = 0.041259765625
    d = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    result = learned.paired_comparison([float(x) for x in d], [0.0] * len(d))
    assert result.wilcoxon_p == pytest.approx(0.041259765625, rel=1e-12)
    assert (result.wins, result.losses, result.ties) == (2, 13, 0)
    assert result.sign_test_p == pytest.approx(2 * (1 + 15 + 105) / 2**15, rel=1e-12)
    assert result.median_difference == 24.0  # the 8th of 15 sorted differences
    tied = learned.paired_comparison([1.0, math.inf, 2.0], [1.0, 3.0, math.inf])
    assert (tied.wins, tied.losses, tied.ties) == (1, 1, 1)
    with pytest.raises(HypergradientError, match="equal length"):
        learned.paired_comparison([1.0], [1.0, 2.0])


def test_train_and_score_reports_divergence_as_inf():
    config = learned.TaskConfig("digits", "mlp", 8, 1, "relu", 16, seed=2)
    (good,) = learned.evaluate_baseline(learned.Baseline("sgdm", "constant", lr=0.1), [config], 20)
    (bad,) = learned.evaluate_baseline(learned.Baseline("sgdm", "constant", lr=1e300), [config], 20)
    initial = float(config.task(1).eval_loss(config.task(1).params))
    assert good.train_loss < initial and math.isfinite(good.heldout_loss)
    assert bad.train_loss == math.inf and bad.heldout_loss == math.inf
