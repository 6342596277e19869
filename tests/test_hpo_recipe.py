"""``hypergradient hpo-vs-gradient``: options, a tiny run, its compute accounting, resume.

* Every option rejects a bad value with ONE line naming it, before anything is written.
* A tiny run writes its files; the gradient run's compute is its SGD steps plus one
  ``solver_steps + 3`` hypergradient per hyper-step; every search spends its budget (and
  stops the trial that runs past it); every best-so-far curve only goes down; the first
  trial of each search is the starting configuration, and the discrete scenario's start
  is exactly the weight-decay recipe's plain-SGD run of that configuration.
* ``--resume`` of a finished run recomputes nothing and reports the same table.
"""

import dataclasses
import json
import math
import re

import pytest
import torch

optuna = pytest.importorskip("optuna")

from _cli import assert_rejected, one_line_error  # noqa: E402
from hypergradient.cli import main  # noqa: E402
from hypergradient.recipes import available_recipes  # noqa: E402
from hypergradient.recipes import weight_decay as wd_recipe  # noqa: E402
from hypergradient.recipes.hpo import HpoVsGradientConfig, HpoVsGradientRecipe  # noqa: E402

BAD_VALUES = {
    "dataset": "cifar",
    "data_dir": "",
    "download": "maybe",
    "n_train": "0",
    "n_val": "-1",
    "hidden": "0",
    "batch_size": "0",
    "inner_lr": "0",
    "hyper_every": "0",
    "hyper_steps": "0",
    "granularity": "per_layer",
    "init_weight_decay": "-1",
    "method": "forward",
    "solver": "lu",
    "solver_steps": "-1",
    "unroll_steps": "0",
    "hyper_lr": "0",
    "scenarios": "both",
    "samplers": "bohb",
    "pruner": "median",
    "budget_factor": "0.5",
    "report_every": "0",
    "startup_trials": "0",
    "decay_low": "0",
    "decay_high": "-1",
    "hidden_choices": "0,16",
    "batch_choices": "16,16",
    "hybrid": "sometimes",
    "storage": "study.db",
    "seed": "-1",
    "threads": "-1",
}


def test_every_option_has_a_bad_value_case():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(HpoVsGradientConfig)}
    assert available_recipes()["hpo-vs-gradient"] is HpoVsGradientRecipe


@pytest.mark.parametrize("option", sorted(BAD_VALUES))
def test_bad_option_value_gives_one_line_error_naming_it(option, tmp_path, capsys):
    assert_rejected("hpo-vs-gradient", option, BAD_VALUES[option], tmp_path / "run", capsys)


@pytest.mark.parametrize(
    ("setting", "pattern"),
    [
        ("decay_high=1e-7", r"options 'decay_low' < 'decay_high'"),
        ("batch_choices=16,1000", r"option 'batch_choices': 1000 exceeds n_train"),
        ("samplers=tpe,tpe", r"option 'samplers': expected a non-empty list of distinct"),
    ],
)
def test_cross_option_errors(setting, pattern, tmp_path, capsys):
    assert main(["hpo-vs-gradient", "--out", str(tmp_path / "run"), "--set", setting]) == 2
    assert re.search(pattern, one_line_error(capsys))
    assert not (tmp_path / "run").exists()


TINY = [
    "n_train=96", "n_val=40", "hidden=8", "batch_size=16", "hyper_every=4", "hyper_steps=5",
    "solver_steps=2", "report_every=10", "budget_factor=2", "startup_trials=2",
    "hidden_choices=4,8", "batch_choices=8,16,32", "samplers=tpe,random",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hpo") / "run"
    assert main(["hpo-vs-gradient", "--no-progress", "--out", str(out), "--set", *TINY]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_tiny_run_writes_its_files_and_rows(tiny_run):
    out, results = tiny_run
    for name in ("results.json", "best_so_far.png", "study.db", "checkpoint.pt", "start.json"):
        assert (out / name).is_file(), name
    methods = [(r["scenario"], r["method"]) for r in results["rows"]]
    assert methods == [
        ("continuous", "hypergradient (per_weight, implicit)"),
        ("continuous", "tpe"),
        ("continuous", "random"),
        ("discrete", "start: hidden 8, batch 16"),
        ("discrete", "tpe"),
        ("discrete", "random"),
        ("discrete", "tpe + hypergradient decays"),
        ("discrete", "random + hypergradient decays"),
    ]
    assert set(results["verdicts"]) == {"continuous", "discrete"}


def test_compute_is_counted_as_documented(tiny_run):
    _, results = tiny_run
    # 5 hyper-steps of 4 SGD steps + one Neumann hypergradient with 2 terms (2 + 3)
    assert results["equal_compute"] == pytest.approx(5 * (4 + 2 + 3))
    assert results["unit"]["hypergradient_cost"] == pytest.approx(5.0)
    budget = results["search_budget"]
    assert budget == pytest.approx(2 * results["equal_compute"])
    for run in results["searches"]:
        curve = run["curve"]
        assert run["compute"] >= budget  # it spent its budget ...
        # ... and the trial that crossed it stopped at its next report
        steps = [b["compute"] - a["compute"] for a, b in zip(curve, curve[1:])]
        assert 0 <= curve[-1]["compute"] - budget <= max(steps)
        best = [r["best_val_loss"] for r in curve]
        assert best == sorted(best, reverse=True)  # best so far never goes up
        assert all(a["compute"] < b["compute"] for a, b in zip(curve, curve[1:]))
    gradient = [r["best_val_loss"] for r in results["gradient"]["curve"]]
    assert gradient == sorted(gradient, reverse=True)


def test_searches_start_where_the_gradient_run_starts(tiny_run):
    out, results = tiny_run
    config = HpoVsGradientConfig(**results["config"])
    url = f"sqlite:///{out.resolve() / 'study.db'}"
    for run in results["searches"]:
        study = optuna.load_study(study_name=run["study"], storage=url)
        first = study.trials[0].params
        if run["scenario"] == "continuous":
            assert first == {"weight_decay": config.init_weight_decay}
        else:
            assert first == {"hidden": config.hidden, "batch_size": config.batch_size}


def test_discrete_start_is_the_weight_decay_recipes_sgd_run(tiny_run):
    _, results = tiny_run
    config = HpoVsGradientConfig(**results["config"])
    wd_config = config.weight_decay_config()
    data = wd_recipe.load_data(wd_config)
    plain = wd_recipe.run_grid_value(wd_config, data, config.init_weight_decay)
    # 20 steps, reports every 10: the last report is the end of the run
    last = results["start"]["curve"][-1]
    assert last["val_loss"] == pytest.approx(plain["val"][str(config.n_val)]["loss"], rel=1e-6)
    assert last["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-6)


def test_resume_of_a_finished_run_recomputes_nothing(tiny_run, capsys):
    out, results = tiny_run
    url = f"sqlite:///{out.resolve() / 'study.db'}"
    counts = {
        r["study"]: len(optuna.load_study(study_name=r["study"], storage=url).trials)
        for r in results["searches"]
    }
    argv = ["hpo-vs-gradient", "--no-progress", "--resume", "--out", str(out), "--set", *TINY]
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    for study, count in counts.items():
        assert len(optuna.load_study(study_name=study, storage=url).trials) == count
    strip = ("seconds",)
    rows = [{k: v for k, v in r.items() if k not in strip} for r in results["rows"]]
    rows_again = [{k: v for k, v in r.items() if k not in strip} for r in again["rows"]]
    assert rows_again == rows
    assert math.isfinite(again["rows"][0]["best_val_loss"])
    capsys.readouterr()


def test_killed_run_resumes_without_redoing_finished_work(tmp_path, monkeypatch):
    from hypergradient.search import objectives as objectives_mod

    out = tmp_path / "run"
    argv = ["hpo-vs-gradient", "--no-progress", "--out", str(out), "--set", *TINY[:-1],
            "samplers=tpe", "hybrid=false"]  # fmt: skip
    real, calls = objectives_mod._train_sgd, {"n": 0}

    def killed_on_the_sixth_run(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # SystemExit passes through Optuna: the trial stays RUNNING
            raise SystemExit("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(objectives_mod, "_train_sgd", killed_on_the_sixth_run)
    with pytest.raises(SystemExit):
        main(argv)
    url = f"sqlite:///{out.resolve() / 'study.db'}"
    (cut,) = [
        (s.study_name, t.number)
        for s in optuna.get_all_study_summaries(url)
        for t in optuna.load_study(study_name=s.study_name, storage=url).trials
        if t.state.name == "RUNNING"
    ]
    before = optuna.load_study(study_name=cut[0], storage=url).trials[: cut[1]]
    gradient_before = torch.load(out / "checkpoint.pt", weights_only=True)["history"]

    monkeypatch.setattr(objectives_mod, "_train_sgd", real)
    assert main([*argv, "--resume"]) == 0
    results = json.loads((out / "results.json").read_text())
    study = optuna.load_study(study_name=cut[0], storage=url)
    assert study.trials[cut[1]].state.name == "FAIL"  # the cut-off trial, not counted twice
    for old, new in zip(before, study.trials):  # finished trials kept as they were
        assert (old.params, old.value, old.state) == (new.params, new.value, new.state)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["history"] == gradient_before
    for run in results["searches"]:
        assert run["compute"] >= results["search_budget"]
