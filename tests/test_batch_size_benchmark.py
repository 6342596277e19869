"""The batch-size benchmark (``benchmarks/optimizers_in_training_batch_size.py``): its argmin
refinement, grid growth and exponent fit on known answers, and the shipped default rule of
``scale_learning_rate`` against the exponents the benchmark measured."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from hypergradient.optimizers import scale_learning_rate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import optimizers_in_training_batch_size as bench  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "optimizers_in_training_batch_size.json"


def _points(losses: dict[int, float]) -> dict[int, dict]:
    return {k: {"val_loss": v, "diverged": not math.isfinite(v)} for k, v in losses.items()}


def test_refine_finds_the_vertex_of_a_parabola_in_log_rate():
    # val loss = (log2 lr - c)^2 sampled on the grid log2 lr = k / 2: the three-point
    # parabola is exact, so the vertex is c up to rounding
    for c in (-3.1, -3.0, -2.8, -2.76):
        points = _points({k: (k / 2 - c) ** 2 for k in range(-9, -2)})
        best, log2_lr = bench.refine(points)
        assert best == round(2 * c)
        assert log2_lr == pytest.approx(c, abs=1e-12)


def test_refine_keeps_the_grid_point_next_to_a_diverged_rate():
    points = _points({-4: 0.9, -3: 0.5, -2: math.inf})
    assert bench.refine(points) == (-3, -1.5)


def test_sweep_grows_until_the_argmin_has_two_neighbours_each_side(monkeypatch):
    # a fake trainer: val loss (log2 lr + 2)^2, diverged from k = -1 upward
    calls = []

    def fake(args, data, cache, opt_name, batch_size, seed, k):
        calls.append(k)
        diverged = k >= -1
        return {"val_loss": math.inf if diverged else (k / 2 + 2) ** 2, "diverged": diverged}

    monkeypatch.setattr(bench, "run_cell_point", fake)
    points = bench.sweep(None, None, {}, "sgd", 16, 0, k0=-10)  # starts far below
    assert bench.refine(points) == (-4, -2.0)
    assert sorted(points) == list(range(-11, -1))  # grows up to the first diverged rate
    assert len(calls) == len(set(calls))  # no rate trained twice
    points = bench.sweep(None, None, {}, "sgd", 16, 0, k0=-4)
    assert sorted(points) == [-6, -5, -4, -3, -2]  # two evaluated on each side, then stop


def test_exponent_fit_on_a_power_law_with_noise():
    # log2 lr = -3 + 0.6 log2 B + noise over 7 batch sizes x 3 seeds (seeded): the estimate
    # is within a few standard errors of 0.6 and both intervals cover it; without noise the
    # fit is exact
    rng = np.random.default_rng(0)
    sizes = [16, 32, 64, 128, 256, 512, 1024]
    exact = {(b, s): -3 + 0.6 * math.log2(b) for b in sizes for s in range(3)}
    fit = bench.exponent_fits(exact, anchor=128)["all"]
    assert fit["exponent"] == pytest.approx(0.6, abs=1e-12)
    assert fit["ci95_t"][1] - fit["ci95_t"][0] < 1e-9
    noisy = {key: v + 0.2 * rng.standard_normal() for key, v in exact.items()}
    fits = bench.exponent_fits(noisy, anchor=128)
    assert set(fits) == {"all", "small", "large"}
    assert fits["small"]["batch_sizes"] == [16, 32, 64, 128]
    assert fits["all"]["points"] == 21
    for interval in (fits["all"]["ci95_t"], fits["all"]["ci95_bootstrap"]):
        assert interval[0] < 0.6 < interval[1]
        assert interval[1] - interval[0] < 0.4


def _fitted(result: dict, optimizer: str, name: str) -> dict:
    return result["analysis"][optimizer]["fits"][name]


def _interval(fit: dict, which: str = "ci95_t") -> str:
    lo, hi = fit[which]
    return f"[{lo:.2f}, {hi:.2f}]"


def test_the_shipped_rules_and_their_docstring_follow_the_measurement():
    # the committed result of benchmarks/optimizers_in_training_batch_size.py: the default
    # exponent of each family lies in the 95% t-interval of its best rates for B <= anchor
    # (where a power law holds); the linear rule lies outside SGD's; SGD's best rate saturates
    # above the anchor; and the docstring quotes those very numbers
    result = json.loads(RESULTS.read_text())
    doc = " ".join(scale_learning_rate.__doc__.split())  # line breaks as spaces
    for optimizer, shipped in (("sgd", 2 / 3), ("adam", 0.5)):
        # the exponent the default rule applies, read off the function itself
        applied = math.log2(scale_learning_rate(1.0, 64, 128, optimizer))
        assert applied == pytest.approx(shipped, rel=1e-12), optimizer
        small = _fitted(result, optimizer, "small")
        assert small["ci95_t"][0] <= applied <= small["ci95_t"][1], optimizer
        assert f"{small['exponent']:.2f} {_interval(small)}" in doc, optimizer
    sgd_small, sgd_large = _fitted(result, "sgd", "small"), _fitted(result, "sgd", "large")
    assert sgd_small["ci95_t"][1] < 1.0  # the linear rule is rejected ...
    assert sgd_small["ci95_bootstrap"][0] <= 2 / 3 <= sgd_small["ci95_bootstrap"][1]
    assert sgd_large["ci95_t"][1] < 2 / 3  # ... and the rate saturates: the cap is needed
    assert f"{sgd_large['exponent']:.2f} {_interval(sgd_large)}" in doc
    adam_all = _fitted(result, "adam", "all")
    assert adam_all["ci95_t"][0] <= 0.5 <= adam_all["ci95_t"][1]
    assert f"{adam_all['exponent']:.2f} {_interval(adam_all)}" in doc
    assert _interval(_fitted(result, "sgd", "small"), "ci95_bootstrap") in doc
    assert _interval(_fitted(result, "adam", "small"), "ci95_bootstrap") in doc
