"""``hypergradient lr-schedule``: learned schedules by exact reversal, files, resume, errors."""

import dataclasses
import json
import math

import pytest
import torch

import hypergradient as hg
from _cli import assert_rejected
from hypergradient.cli import main
from hypergradient.recipes.lr_schedule import LRScheduleConfig, Problem, interpolate

TINY = ["hidden=6", "n_train=80", "n_val=40", "steps=12", "knots=4", "hyper_steps=3"]


def _run(out, *extra) -> int:
    return main(["lr-schedule", "--out", str(out), "--no-progress", "--set", *TINY, *extra])


def _without_timings(results: dict) -> dict:
    drop = {"seconds", "hyper_seconds", "machine"}
    out = {k: v for k, v in results.items() if k not in drop}
    out["history"] = [{k: v for k, v in r.items() if k != "seconds"} for r in out["history"]]
    return out


def test_interpolation_passes_through_the_knots_and_is_linear_between():
    knots = torch.tensor([0.0, 3.0, 1.0])
    schedule = interpolate(knots, 5)
    torch.testing.assert_close(schedule, torch.tensor([0.0, 1.5, 3.0, 2.0, 1.0]))
    assert interpolate(knots, 3) is knots  # one knot per step: the knots themselves


def test_recipe_hypergradient_equals_reverse_mode_and_finite_differences():
    config = LRScheduleConfig(hidden=5, n_train=60, n_val=30, steps=15, knots=3)
    problem = Problem(config)
    hparams = {
        "log_lr": torch.tensor([math.log(0.3), math.log(0.5), math.log(0.2)]),
        "logit_momentum": torch.tensor([2.0, 1.0, 0.5]),
        "log_init_scale": torch.tensor([0.1, -0.2]),
    }
    reversible = problem.hypergrad(hparams).hypergrad
    reverse = hg.unrolled_hypergrad(
        problem.inner_loss,
        problem.outer_loss,
        problem.params0,
        hparams,
        steps=config.steps,
        lr=lambda h, t: interpolate(h["log_lr"], config.steps)[t].exp(),
        momentum=lambda h, t: torch.sigmoid(interpolate(h["logit_momentum"], config.steps)[t]),
        mode="reverse",
    )
    assert hg.testing.relative_error(reversible, reverse) < 1e-8

    def response(h):
        return problem.outer_loss(problem.hypergrad(h).params, h)

    fd = hg.testing.finite_difference_hypergrad(response, hparams, eps=1e-5)
    assert hg.testing.relative_error(reversible, fd) < 1e-5


def test_tiny_run_writes_its_files_lowers_the_validation_loss_and_resumes(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "hyper_lr=0.1") == 0
    for name in ("config.toml", "results.json", "schedules.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 3
    assert results["learned"]["val_loss"] < results["initial"]["val_loss"]
    assert len(results["schedules"]["learned_lr"]) == 12
    assert all(0 < m < 1 for m in results["schedules"]["learned_momentum"])
    # a rerun with --resume and more hyper-steps continues from the checkpoint: the same
    # result as one uninterrupted run of that length
    assert _run(out, "hyper_lr=0.1", "hyper_steps=5", "--resume") == 0
    resumed = json.loads((out / "results.json").read_text())
    fresh = tmp_path / "fresh"
    assert _run(fresh, "hyper_lr=0.1", "hyper_steps=5") == 0
    uninterrupted = json.loads((fresh / "results.json").read_text())
    assert _without_timings(resumed)["history"] == _without_timings(uninterrupted)["history"]
    assert resumed["schedules"] == uninterrupted["schedules"]


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    capsys.readouterr()
    assert _run(out, "init_lr=0.2", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "init_lr" in err


BAD_VALUES = {
    "dataset": "cifar10",
    "data_dir": "",
    "download": "maybe",
    "batch_size": "-1",
    "per_layer": "maybe",
    "init_decay": "-1e-3",
    "n_train": "0",
    "n_val": "1700",
    "hidden": "1.5",
    "steps": "0",
    "knots": "1",
    "init_lr": "-0.1",
    "init_momentum": "1.0",
    "learn_init_scale": "maybe",
    "hyper_steps": "-1",
    "hyper_lr": "nan",
    "fraction_bits": "60",
    "seed": "-1",
    "threads": "-2",
}


def test_every_option_has_a_bad_value_case():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(LRScheduleConfig)}


@pytest.mark.parametrize("option", sorted(BAD_VALUES))
def test_bad_option_value_gives_one_line_error_naming_it(option, tmp_path, capsys):
    assert_rejected("lr-schedule", option, BAD_VALUES[option], tmp_path / "run", capsys)
