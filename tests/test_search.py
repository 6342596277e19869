"""``hypergradient.search``: spaces, compute accounting, Optuna studies and workers,
nested resampling and racing.

* Spaces and compute units against hand-computed values; a trial's recorded compute equals
  its SGD steps and evaluations converted by the documented rule.
* Studies live in SQLite under the run folder and re-open by name; every sampler and pruner
  runs; a grid search stops when its grid is exhausted.
* Two threads racing for the last trials finish exactly the budget.  Worker processes that
  start together on a new study, or are SIGKILLed mid-trial: tests/test_search_workers.py.
* Nested CV: tuning never sees a row of its outer test fold; on labels that are pure noise
  the non-nested estimate is optimistic and the nested one is not.
* Racing: of configurations with known quality, the worst are dropped after a few folds and
  the race costs fewer evaluations than full cross-validation.
"""

import threading
import time

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

import _readme  # noqa: E402
from hypergradient import HypergradientError, Implicit, Unrolled, search  # noqa: E402
from hypergradient.search import study as study_mod  # noqa: E402
from hypergradient.search.racing import friedman_eliminations  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    yield
    optuna.logging.set_verbosity(verbosity)


# ----------------------------------------------------------------------------- spaces


def test_grid_of_spreads_floats_in_log_and_keeps_choices():
    space = {
        "wd": search.Float(1e-4, 1e-0, log=True),
        "lr": search.Float(0.0, 1.0),
        "width": search.Int(1, 3),
        "big": search.Int(1, 1000, log=True),
        "act": search.Choice(("tanh", "relu")),
    }
    grid = search.grid_of(space, points=5)
    np.testing.assert_allclose(grid["wd"], [1e-4, 1e-3, 1e-2, 1e-1, 1.0], rtol=1e-12)
    np.testing.assert_allclose(grid["lr"], [0.0, 0.25, 0.5, 0.75, 1.0])
    assert grid["width"] == [1, 2, 3]  # at most `points` integers: all of them
    assert grid["big"] == [1, 6, 32, 178, 1000]  # 1000**(i/4), rounded
    assert grid["act"] == ["tanh", "relu"]


def test_suggest_reads_every_kind_from_a_trial():
    space = {"a": search.Float(0.0, 1.0), "b": search.Int(1, 4), "c": search.Choice((8, 16))}
    trial = optuna.trial.FixedTrial({"a": 0.25, "b": 3, "c": 16})
    assert search.suggest(trial, space) == {"a": 0.25, "b": 3, "c": 16}


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: search.Float(1.0, 1.0), r"low < high"),
        (lambda: search.Float(0.0, 1.0, log=True), r"log scale needs low > 0"),
        (lambda: search.Int(0, 5, log=True), r"log scale needs low >= 1"),
        (lambda: search.Int(1.5, 3), r"two integers"),
        (lambda: search.Choice(()), r"at least one value"),
        (lambda: search.Choice((1, 1)), r"values repeat"),
        (lambda: search.Choice(([1],)), r"cannot be stored by Optuna"),
        (lambda: search.grid_of({}, 3), r"non-empty dict"),
        (lambda: search.grid_of({"x": 3}, 3), r"'x': 3 is not a search.Float"),
        (lambda: search.grid_of({"x": search.Float(0, 1)}, 1), r"points=1"),
    ],
)
def test_space_errors(build, pattern):
    with pytest.raises(HypergradientError, match=pattern):
        build()


# ----------------------------------------------------------------------------- compute


def test_step_unit_scales_with_batch_and_weights():
    unit = search.StepUnit(batch_size=64, num_weights=1000)
    assert unit.train_step() == 1.0
    assert unit.train_step(batch_size=16) == 0.25
    assert unit.train_step(batch_size=128, num_weights=4000) == 8.0
    # forward only: a third of a step per batch of examples
    assert unit.evaluation(192) == pytest.approx(1.0)
    assert unit.evaluation(192, num_weights=500) == pytest.approx(0.5)


def test_hypergradient_cost_counts_backward_passes():
    assert search.hypergradient_cost(Implicit(solver="neumann", max_steps=10)) == 13.0
    assert search.hypergradient_cost(Implicit(solver="cg", max_steps=4)) == 7.0
    assert search.hypergradient_cost(Implicit(solver="identity", max_steps=10)) == 3.0
    assert search.hypergradient_cost(Implicit(solver="exact"), num_weights=50) == 53.0
    assert search.hypergradient_cost(Unrolled(steps=10)) == 22.0
    assert search.hypergradient_cost(Unrolled(steps=3, mode="forward"), num_hparams=4) == 24.0
    # reversal recomputes each step's gradient: one more per step than reverse mode, and no
    # dependence on the number of hyperparameters (it is a reverse sweep)
    assert search.hypergradient_cost(Unrolled(steps=10, mode="reversible"), num_hparams=9) == 32.0
    with pytest.raises(HypergradientError, match=r"pass num_weights="):
        search.hypergradient_cost(Implicit(solver="exact"))
    with pytest.raises(HypergradientError, match=r"pass num_hparams="):
        search.hypergradient_cost(Unrolled(steps=3, mode="forward"), num_hparams=0)
    with pytest.raises(HypergradientError, match=r"expected hg.Implicit"):
        search.hypergradient_cost("implicit")


def test_compute_meter_adds_by_kind():
    meter = search.ComputeMeter()
    meter.add("train", 1.0, count=10)
    assert meter.add("hypergradient", 13.0) == 23.0
    assert meter.by_kind == {"train": 10.0, "hypergradient": 13.0}
    with pytest.raises(HypergradientError, match=r"finite number >= 0"):
        meter.add("train", -1.0)
    with pytest.raises(HypergradientError, match=r"count must be an integer"):
        meter.add("train", 1.0, count=-2)
    with pytest.raises(HypergradientError, match=r"`batch_size` must be a positive number"):
        search.StepUnit(batch_size=0, num_weights=10)


@pytest.fixture(scope="module")
def tiny():
    from hypergradient.recipes import weight_decay as recipe

    # 20 SGD steps of batch 16 on 96 examples; MLP 64-8-10
    config = recipe.WeightDecayConfig(
        n_train=96, n_val=40, val_sizes=[], hidden=8, batch_size=16, hyper_every=4,
        hyper_steps=5, solver_steps=2,
    )  # fmt: skip
    return config, recipe.load_data(config)


def test_trial_compute_is_its_steps_and_evaluations(tiny):
    config, data = tiny
    unit = search.reference_unit(config, data)
    assert unit.num_weights == 64 * 8 + 8 + 8 * 10 + 10
    objective = search.weight_decay_objective(
        config, data, {"batch_size": search.Choice((8, 32))}, report_every=10
    )
    for batch in (8, 32):
        trial = optuna.trial.FixedTrial({"batch_size": batch})
        value = objective(trial)
        # the budget is 20 steps of 16 = 320 examples: 40 steps of 8 or 10 steps of 32
        steps = 320 // batch
        reports = trial.user_attrs["reports"]
        assert len(reports) == 2  # every 10 reference steps = 160 examples
        expected = steps * unit.train_step(batch) + 2 * unit.evaluation(config.n_val)
        assert trial.user_attrs["compute"] == pytest.approx(expected, rel=1e-12)
        assert value == min(r[1] for r in reports)


def test_hybrid_trial_counts_its_hypergradients(tiny):
    config, data = tiny
    objective = search.weight_decay_objective(
        config, data, {"hidden": search.Choice((8, 16))}, decay="hypergradient", report_every=8
    )
    trial = optuna.trial.FixedTrial({"hidden": 16})
    objective(trial)
    unit = search.reference_unit(config, data)
    weights = search.mlp_weights(64, 16, 10)
    step = unit.train_step(16, weights)
    # 5 hyper-steps of (4 SGD steps + Neumann with 2 terms: 2 + 3), 3 reports (every 2
    # hyper-steps and at the end)
    expected = 5 * (4 + 5) * step + 3 * unit.evaluation(config.n_val, weights)
    assert trial.user_attrs["compute"] == pytest.approx(expected, rel=1e-12)
    assert len(trial.user_attrs["reports"]) == 3


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"space": {"depth": search.Int(1, 3)}}, r"cannot set \['depth'\]"),
        (
            {
                "space": {"weight_decay": search.Float(1e-5, 1e-1, log=True)},
                "decay": "hypergradient",
            },
            r"cannot set \['weight_decay'\]",
        ),  # fmt: skip
        ({"space": {"hidden": search.Choice((8,))}, "fixed": {"hidden": 8}}, r"both searched"),
        ({"space": {}, "decay": "adam"}, r"decay='adam'"),
        ({"space": {}, "report_every": 0}, r"report_every=0"),
    ],
)
def test_objective_errors(tiny, kwargs, pattern):
    config, data = tiny
    with pytest.raises(HypergradientError, match=pattern):
        search.weight_decay_objective(config, data, **kwargs)


def test_compute_curve_puts_trials_end_to_end():
    frozen = [
        optuna.trial.create_trial(
            value=v,
            params={},
            distributions={},
            user_attrs={"compute": c, "reports": reports},
        )  # fmt: skip
        for v, c, reports in [
            (0.5, 10.0, [[5.0, 0.7, 0.8], [10.0, 0.5, 0.6]]),
            (0.6, 4.0, [[4.0, 0.6, 0.9]]),
            (0.3, 10.0, [[5.0, 0.4, 0.45], [10.0, 0.3, 0.35]]),
        ]
    ]
    for number, trial in enumerate(frozen):
        trial.number = number
    curve = search.compute_curve(frozen)
    assert [r["compute"] for r in curve] == [5.0, 10.0, 14.0, 19.0, 24.0]
    assert [r["best_val_loss"] for r in curve] == [0.7, 0.5, 0.5, 0.4, 0.3]
    assert [r["best_test_loss"] for r in curve] == [0.8, 0.6, 0.6, 0.45, 0.35]
    assert search.best_at(curve, 14.0) == {"val_loss": 0.5, "test_loss": 0.6, "compute": 14.0}
    assert search.best_at(curve, 4.0)["val_loss"] == float("inf")


# ----------------------------------------------------------------------------- studies


def _quadratic(trial):
    x = trial.suggest_float("x", -2.0, 2.0)
    return (x - 0.5) ** 2


def test_study_defaults_to_sqlite_in_run_folder_and_reopens(tmp_path):
    study = search.create_study("s", run_dir=tmp_path, sampler="random", seed=1)
    search.optimize(study, _quadratic, n_trials=3)
    assert (tmp_path / "study.db").is_file()
    again = search.create_study("s", run_dir=tmp_path, sampler="random", seed=1)
    assert len(again.trials) == 3
    assert [t.value for t in again.trials] == [t.value for t in study.trials]
    # optimize counts the finished trials already there: 1 more to reach 4
    search.optimize(again, _quadratic, n_trials=4)
    assert len(search.finished_trials(again)) == 4


@pytest.mark.parametrize("sampler", ["random", "tpe", "cmaes"])
def test_samplers_run_and_improve_on_the_first_trial(sampler):
    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    # in memory: the samplers are under test here, not the database
    study = optuna.create_study(sampler=search.make_sampler(sampler, seed=0, startup_trials=3))
    trials = search.optimize(study, _quadratic, n_trials=12)
    assert len(trials) == 12
    assert study.best_value < trials[0].value
    assert study.best_value < 0.05


def test_grid_sampler_stops_when_the_grid_is_exhausted():
    space = {"x": search.Float(-2.0, 2.0)}
    study = optuna.create_study(sampler=search.make_sampler("grid", space=space, grid_points=5))
    trials = search.optimize(study, _quadratic, n_trials=50)
    assert sorted(t.params["x"] for t in trials) == [-2.0, -1.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("pruner", ["hyperband", "halving"])
def test_pruners_stop_bad_trials_on_reported_values(pruner):
    study = optuna.create_study(
        sampler=search.make_sampler("random", seed=0),
        pruner=search.make_pruner(pruner, max_resource=9),
    )

    def objective(trial):
        x = trial.suggest_float("x", -2.0, 2.0)
        for step in range(1, 10):  # a learning curve that converges to (x - 0.5)^2
            trial.report((x - 0.5) ** 2 + 1.0 / step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return (x - 0.5) ** 2

    trials = search.optimize(study, objective, n_trials=30)
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert len(trials) == 30 and len(pruned) >= 5
    # pruned trials stopped early (on average), and were worse than the best trial
    assert np.mean([len(t.intermediate_values) for t in pruned]) < 6
    best = min(abs(t.params["x"] - 0.5) for t in trials)
    assert all(abs(t.params["x"] - 0.5) > best for t in pruned)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda d: search.create_study("s"), r"exactly one of run_dir"),
        (lambda d: search.create_study("s", run_dir=d, storage="sqlite://"), r"exactly one"),
        (lambda d: search.create_study("", run_dir=d), r"non-empty str"),
        (lambda d: search.create_study("s", run_dir=d, direction="up"), r"direction='up'"),
        (lambda d: search.create_study("s", run_dir=d, sampler="bohb"), r"unknown sampler"),
        (lambda d: search.create_study("s", run_dir=d, sampler="grid"), r"needs the search"),
        (lambda d: search.create_study("s", run_dir=d, pruner="median"), r"unknown pruner"),
        (lambda d: search.make_pruner("hyperband", reduction_factor=1), r"reduction_factor=1"),
        (
            lambda d: search.make_pruner("hyperband", min_resource=3, max_resource=2),
            r"max_resource=2 < min_resource=3",
        ),  # fmt: skip
        (lambda d: search.make_storage("study.db"), r"expected a database URL"),
        (
            lambda d: search.make_storage(
                f"sqlite:///{d}/x.db", heartbeat_interval=None, max_retry=2
            ),
            r"heartbeat_interval",
        ),  # fmt: skip
        (
            lambda d: search.make_storage(f"sqlite:///{d}/x.db", max_retry=-1),
            r"max_retry=-1\)",
        ),  # fmt: skip
        (
            lambda d: search.make_storage(f"sqlite:///{d}/x.db", heartbeat_interval=0),
            r"heartbeat_interval=0\)",
        ),  # fmt: skip
        (lambda d: search.make_sampler("tpe", startup_trials=0), r"startup_trials=0"),
        (lambda d: search.optimize(None, _quadratic), r"never ends"),
        (lambda d: search.optimize(None, _quadratic, n_trials=0), r"n_trials=0"),
        (lambda d: search.optimize(None, _quadratic, n_trials=1, max_wait=-1), r"max_wait=-1"),
    ],
)
def test_study_errors(tmp_path, call, pattern):
    with pytest.raises(HypergradientError, match=pattern):
        call(tmp_path)


def test_optimize_waits_for_trials_other_workers_hold(tmp_path):
    # no heartbeat: a trial made by hand with ask() (Optuna warns with one)
    study = search.create_study("w", run_dir=tmp_path, sampler="random", heartbeat_interval=None)
    search.optimize(study, _quadratic, n_trials=2)
    held = study.ask()  # another worker's running trial: the budget of 3 is held
    trials = search.optimize(study, _quadratic, n_trials=3, timeout=0.5, poll_interval=0.05)
    assert len(trials) == 2
    assert study.trials[held.number].state.name == "RUNNING"
    assert search.fail_running_trials(study) == [held.number]
    assert len(search.optimize(study, _quadratic, n_trials=3)) == 3


def test_threads_racing_for_the_last_trials_finish_exactly_the_budget(tmp_path):
    study = search.create_study("t", storage=search.default_storage(tmp_path), sampler="random")

    def objective(trial):
        time.sleep(0.01)
        return _quadratic(trial)

    def worker():
        search.optimize(study, objective, n_trials=8, poll_interval=0.01)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 8
    # any other trial is one that lost the race for the last slot and was never run
    extra = [t for t in study.trials if t.state.name != "COMPLETE"]
    assert all(t.state.name == "FAIL" and t.user_attrs[study_mod.SURPLUS_ATTR] for t in extra)


# ----------------------------------------------------------------------------- resampling


def test_kfold_partitions_the_given_rows_and_stratifies():
    rows = np.arange(100, 160)
    labels = np.zeros(200, dtype=int)
    labels[rows[:20]] = 1  # a third of these rows are class 1
    folds = search.kfold(rows, 5, seed=3, labels=labels)
    tests = np.concatenate([f.test for f in folds])
    assert sorted(tests.tolist()) == rows.tolist()  # each row tested exactly once
    for f in folds:
        assert not set(f.train) & set(f.test)
        assert sorted(np.concatenate([f.train, f.test]).tolist()) == rows.tolist()
        assert labels[f.test].sum() == 4  # 20 positives / 5 folds
    rare = np.zeros(200, dtype=int)
    rare[rows[:3]] = 1  # a class with 3 rows cannot be spread over 5 folds
    with pytest.raises(HypergradientError, match=r"has only 3 rows .* fewer than the folds"):
        search.kfold(rows, 5, labels=rare)
    with pytest.raises(HypergradientError, match=r"2 <= k <= the number of rows \(3\)"):
        search.kfold(3, 4)
    with pytest.raises(HypergradientError, match=r"indices repeat"):
        search.kfold([1, 1, 2, 3], 2)


def test_nested_cv_tuning_never_sees_the_outer_test_fold():
    calls = []

    def evaluate(config, train, test):
        calls.append((config, set(train.tolist()), set(test.tolist())))
        return abs(config - 2) + 0.01 * len(test)

    result = search.nested_cv(evaluate, search.grid_tuner([0, 1, 2, 3]), 40, outer=4, inner=3)
    per_outer = 4 * 3 + 1  # grid x inner folds, then the refit on the outer training part
    assert result.evaluations == len(calls) == 4 * per_outer
    for o, outer in enumerate(result.outer):
        held_out = set(outer.fold.test.tolist())
        tuning = calls[o * per_outer : (o + 1) * per_outer - 1]
        seen = set().union(*(train | test for _, train, test in tuning))
        assert not seen & held_out  # the tuning never touched the outer test rows
        assert seen == set(outer.fold.train.tolist())  # ... and used all training rows
        assert outer.config == 2
        refit = calls[(o + 1) * per_outer - 1]
        assert refit[1] == set(outer.fold.train.tolist()) and refit[2] == held_out


def test_non_nested_estimate_is_optimistic_on_noise_and_nested_is_not():
    # 60 rows with coin-flip labels; a "configuration" is a fixed random guesser, so every
    # configuration's true error is 0.5 and the best CV error is low only by luck
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=60)
    guesses = rng.integers(0, 2, size=(40, 60))

    def evaluate(config, train, test):
        return float(np.mean(guesses[config, test] != labels[test]))

    tuner = search.grid_tuner(range(40))
    biased, nested = [], []
    for seed in range(10):
        biased.append(search.non_nested_cv(evaluate, tuner, 60, folds=5, seed=seed).score)
        nested.append(search.nested_cv(evaluate, tuner, 60, outer=5, inner=3, seed=seed).estimate)
    assert np.mean(biased) < 0.42  # the minimum of 40 noisy estimates of 0.5
    assert abs(np.mean(nested) - 0.5) < 0.05  # the outer folds are new data to the winner


def test_race_and_optuna_tuners_plug_into_nested_cv():
    def evaluate(config, train, test):
        x = config["x"] if isinstance(config, dict) else config
        return (x - 0.3) ** 2 + 0.001 * (test.sum() % 7)

    raced = search.nested_cv(evaluate, search.race_tuner(np.linspace(0, 1, 11)), 50, inner=5)
    assert all(abs(o.config - 0.3) < 1e-9 for o in raced.outer)
    assert raced.evaluations < 5 * (11 * 5 + 1)
    space = {"x": search.Float(0.0, 1.0)}
    tuned = search.nested_cv(evaluate, search.optuna_tuner(space, n_trials=15), 50, inner=3)
    assert all(abs(o.config["x"] - 0.3) < 0.15 for o in tuned.outer)
    assert tuned.evaluations == 5 * (15 * 3 + 1)


# ----------------------------------------------------------------------------- racing


def test_race_drops_the_worst_configurations_after_few_folds():
    # 8 configurations with true losses 0.0, 0.1, ..., 0.7; each fold adds a shared
    # difficulty (the same for all) and per-configuration noise of sd 0.1
    rng = np.random.default_rng(1)
    k, n = 8, 20
    losses = np.arange(k) / 10 + rng.normal(0, 1, size=(n, 1)) + rng.normal(0, 0.1, size=(n, k))
    result = search.race(range(k), lambda c, b: losses[b, c], range(n), first_test=3)
    assert result.best == 0
    assert result.evaluations < result.full_evaluations == k * n
    # the clearly bad half goes within the first few folds
    assert all(result.eliminated_after[j] <= 5 for j in (4, 5, 6, 7))
    assert min(result.eliminated_after.values()) >= 3  # never before the first test
    # worse configurations are dropped no later than better ones
    after = [result.eliminated_after.get(j, n + 1) for j in range(1, k)]
    assert after == sorted(after, reverse=True)


def test_halving_race_keeps_the_best_fraction_at_each_rung():
    values = np.array([5.0, 1.0, 3.0, 0.0, 4.0, 2.0, 7.0, 6.0])  # best: index 3, then 1, 5
    result = search.race(
        range(8), lambda c, b: values[c] + 0.01 * b, range(12), method="halving", first_test=2
    )
    # rungs after 2 blocks (keep 4), 4 blocks (keep 2), 8 blocks (keep 1)
    assert result.eliminated_after == {0: 2, 4: 2, 6: 2, 7: 2, 2: 4, 5: 4, 1: 8}
    assert result.survivors == [3] and result.best == 3
    assert result.evaluations == 8 * 2 + 4 * 2 + 2 * 4 == 32


def test_friedman_eliminates_on_evidence_only():
    same = np.tile([1.0, 2.0, 3.0], (10, 1))
    # every block ranks them 1, 2, 3: Conover's critical difference is 0, both others go
    assert friedman_eliminations(same, 0.05) == [1, 2]
    rng = np.random.default_rng(0)
    assert friedman_eliminations(rng.normal(size=(4, 5)), 0.05) == []  # 4 noisy blocks
    assert friedman_eliminations(np.ones((10, 3)), 0.05) == []  # all tied


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"method": "irace"}, r"method='irace'"),
        ({"candidates": []}, r"no candidates"),
        ({"blocks": []}, r"no blocks"),
        ({"first_test": 0}, r"first_test=0"),
        ({"alpha": 1.5}, r"alpha=1.5"),
        ({"eta": 1}, r"eta=1"),
        ({"evaluate": lambda c, b: float("nan")}, r"must be finite"),
    ],
)
def test_race_errors(kwargs, pattern):
    args = {"candidates": [1, 2], "evaluate": lambda c, b: float(c), "blocks": [0, 1, 2]}
    args.update(kwargs)
    with pytest.raises(HypergradientError, match=pattern):
        search.race(args.pop("candidates"), args.pop("evaluate"), args.pop("blocks"), **args)


README_EXAMPLE = _readme.example(
    "search.nested_cv(evaluate",
    finished="len(search.finished_trials(study))",
    nested="nested.estimate",
    flat="flat.score",
    evaluations="raced.evaluations",
    full_evaluations="raced.full_evaluations",
)


def test_readme_search_example_runs():
    run = README_EXAMPLE.run()  # in a fresh interpreter, as a reader pastes it
    # the example writes its study in the working directory
    assert (run.cwd / "hypergradient-runs/search-demo/study.db").is_file()
    assert run.values["finished"] == 20
    assert run.values["nested"] > run.values["flat"]  # optimism, on noise
    assert run.values["evaluations"] < run.values["full_evaluations"]
    assert "nested" in run.stdout
