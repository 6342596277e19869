r"""``hypergradient hpo-vs-gradient``: black-box search (Optuna) against hypergradients.

Two scenarios on the ``weight-decay`` recipe's MLP (digits by default), each method given
the same compute, counted in **training-step equivalents** (one SGD step of the recipe's
MLP and batch; a hypergradient counts its backward passes: ``solver_steps + 3`` for the
implicit method; see :mod:`hypergradient.search.compute`):

1. **continuous** - the hyperparameter is the weight decay, which gradients reach.

   * *gradient*: the recipe's hypergradient run (``granularity`` decays: one per weight by
     default, as many hyperparameters as weights), warm start, ``hyper_steps`` hyper-steps
     of ``hyper_every`` SGD steps.  Its validation loss at every hyper-step is a point on
     the compute axis (the implicit hypergradient evaluates it anyway, on the whole
     validation set).
   * *search*: each sampler in ``samplers`` (TPE by default) tunes one global log decay in
     ``[decay_low, decay_high]``; every trial is the recipe's plain-SGD run for the same SGD
     budget, reporting its validation loss every ``report_every`` steps to the ``pruner``
     (Hyperband).  The first trial is the starting decay ``init_weight_decay``, where the
     hypergradient run starts too.

2. **discrete** - the hyperparameters are the hidden width and the batch size
   (``hidden_choices`` x ``batch_choices``), which gradients cannot reach; the decay stays
   at ``init_weight_decay`` (one global decay) for every run.

   * *start*: the starting configuration (``hidden``, ``batch_size``) trained once: a
     gradient method cannot move either, so this is what it has.
   * *search*: the samplers over width and batch size; trials train for the same number of
     epochs (a batch of 16 does four times the steps of a batch of 64, each a quarter of
     the compute); the first trial is the starting configuration.
   * *hybrid* (``hybrid = true``): the search picks width and batch size and each trial
     fits its ``granularity`` decays by hypergradients (the two combined).

Every search runs until it has spent ``budget_factor`` times the gradient run's compute
(the trial running when it runs out is stopped at its next report); *equal compute* in the
table is the gradient run's.  The best-so-far validation loss of
every method is plotted against compute.  Test losses (of the model with the best
validation loss so far) are measured for the table, never seen by a method.

Files in the run folder: ``results.json``, ``best_so_far.png``, ``study.db`` (every Optuna
study, SQLite; ``storage`` names another database), ``checkpoint.pt`` and
``hyper_steps.jsonl`` (the gradient run), ``start.json`` (the starting configuration's run).
``--resume`` continues the gradient run from its checkpoint and every study from its
database (a trial that was running when the run was killed is marked failed and not
counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from .._errors import HypergradientError
from ..search import compute as compute_mod
from ..search import objectives as objectives_mod
from ..search import space as space_mod
from ..search import study as study_mod
from . import weight_decay as wd_recipe
from ._base import (
    AbstractRecipe,
    machine,
    progress_bar,
    pyplot,
    register_recipe,
    resume_or_start_over,
    torch_threads,
    write_json_atomic,
    write_results,
)
from ._config import check_choice, check_positive, check_positive_int, help_text, threads_field

_SCENARIOS = ("continuous", "discrete")


@dataclass
class HpoVsGradientConfig:
    """Options of ``hypergradient hpo-vs-gradient`` (defaults: 2-8 minutes on a loaded 2-core
    machine)."""

    dataset: str = field(
        default="digits", metadata=help_text("digits, mnist or fashion-mnist (as weight-decay)")
    )
    data_dir: str | None = field(
        default=None,
        metadata=help_text("folder of the MNIST/Fashion-MNIST files (as weight-decay)"),
    )
    download: bool = field(default=False, metadata=help_text("fetch missing MNIST files"))
    n_train: int = field(default=500, metadata=help_text("training examples"))
    n_val: int = field(default=300, metadata=help_text("validation examples"))
    hidden: int = field(
        default=128, metadata=help_text("hidden width of the MLP (the discrete start)")
    )
    batch_size: int = field(
        default=64,
        metadata=help_text("training batch size (the discrete start, and the compute unit)"),
    )
    inner_lr: float = field(default=0.1, metadata=help_text("SGD learning rate of the weights"))
    hyper_every: int = field(default=10, metadata=help_text("SGD steps between hyper-steps"))
    hyper_steps: int = field(
        default=150,
        metadata=help_text(
            "hyper-steps of the gradient run; every run's SGD budget = hyper_steps * hyper_every"
        ),
    )
    granularity: str = field(
        default="per_weight",
        metadata=help_text("decays fitted by hypergradients: global, per_tensor, per_weight"),
    )
    init_weight_decay: float = field(
        default=1e-3,
        metadata=help_text("starting decay of every method (and the discrete scenario's decay)"),
    )
    method: str = field(default="implicit", metadata=help_text("implicit or unrolled"))
    solver: str = field(
        default="neumann", metadata=help_text("implicit linear solver (as weight-decay)")
    )
    solver_steps: int = field(
        default=10, metadata=help_text("Neumann terms / CG iterations per hypergradient")
    )
    unroll_steps: int = field(default=5, metadata=help_text("look-ahead steps of unrolled"))
    hyper_lr: float = field(default=0.03, metadata=help_text("Adam learning rate of the decays"))
    scenarios: list[str] = field(
        default_factory=lambda: list(_SCENARIOS),
        metadata=help_text("which comparisons to run: continuous, discrete"),
    )
    samplers: list[str] = field(
        default_factory=lambda: ["tpe"],
        metadata=help_text("Optuna samplers to compare: tpe, random, cmaes, grid"),
    )
    pruner: str = field(
        default="hyperband", metadata=help_text("pruner of the searches: hyperband, halving, none")
    )
    budget_factor: float = field(
        default=5.0,
        metadata=help_text("each search's compute, in multiples of the gradient run's (>= 1)"),
    )
    report_every: int = field(
        default=100,
        metadata=help_text("SGD steps (reference batch) between a trial's validation reports"),
    )
    startup_trials: int = field(
        default=5, metadata=help_text("random trials before TPE / CMA-ES model the results")
    )
    decay_low: float = field(default=1e-6, metadata=help_text("lowest decay searched (log scale)"))
    decay_high: float = field(default=1e-1, metadata=help_text("highest decay searched"))
    hidden_choices: list[int] = field(
        default_factory=lambda: [16, 32, 64, 128, 256, 512],
        metadata=help_text("hidden widths the discrete search chooses from"),
    )
    batch_choices: list[int] = field(
        default_factory=lambda: [16, 32, 64, 128, 256],
        metadata=help_text("batch sizes the discrete search chooses from"),
    )
    hybrid: bool = field(
        default=True,
        metadata=help_text(
            "discrete scenario: also search width/batch with decays by hypergradient"
        ),
    )
    storage: str | None = field(
        default=None,
        metadata=help_text("Optuna database URL (none: sqlite:///<run folder>/study.db)"),
    )
    seed: int = field(default=0, metadata=help_text("seed of data split, init, batches, samplers"))
    threads: int = threads_field()

    def weight_decay_config(self, **changes) -> wd_recipe.WeightDecayConfig:
        """The ``weight-decay`` recipe's config of the gradient run (and of every trial)."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        keep = {f.name for f in dataclasses.fields(wd_recipe.WeightDecayConfig)}
        values = {k: v for k, v in base.items() if k in keep}
        values.update(val_sizes=[], val_batch_size=None, grid=[0.0])
        values.update(changes)
        return wd_recipe.WeightDecayConfig(**values)

    def validate(self) -> None:
        for name in ("n_train", "n_val", "hidden", "batch_size", "hyper_every", "hyper_steps"):
            check_positive_int(name, getattr(self, name))
        for name in ("solver_steps", "seed", "threads"):
            check_positive_int(name, getattr(self, name), minimum=0)
        check_positive_int("unroll_steps", self.unroll_steps)
        check_positive_int("report_every", self.report_every)
        check_positive_int("startup_trials", self.startup_trials)
        self.weight_decay_config().validate()  # data, model, method and solver options
        for name, items, choices in (
            ("scenarios", self.scenarios, _SCENARIOS),
            ("samplers", self.samplers, study_mod.SAMPLERS),
        ):
            if not isinstance(items, list) or not items or len(set(items)) != len(items):
                raise HypergradientError(
                    f"option {name!r}: expected a non-empty list of distinct values from "
                    f"{list(choices)}, got {items!r}."
                )
            for item in items:
                check_choice(name, item, choices)
        check_choice("pruner", self.pruner, study_mod.PRUNERS)
        check_positive("budget_factor", self.budget_factor)
        if self.budget_factor < 1:
            raise HypergradientError(
                f"option 'budget_factor': expected a number >= 1 (a search gets at least the "
                f"gradient run's compute), got {self.budget_factor!r}."
            )
        for name in ("init_weight_decay", "decay_low", "decay_high"):
            check_positive(name, getattr(self, name))
        if self.decay_low >= self.decay_high:
            raise HypergradientError(
                f"options 'decay_low' < 'decay_high' expected, got {self.decay_low!r} >= "
                f"{self.decay_high!r}."
            )
        for name in ("hidden_choices", "batch_choices"):
            values = getattr(self, name)
            ok = isinstance(values, list) and values and len(set(values)) == len(values)
            if not ok or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
            ):
                raise HypergradientError(
                    f"option {name!r}: expected a non-empty list of distinct integers >= 1, got "
                    f"{values!r}."
                )
        if max(self.batch_choices) > self.n_train:
            raise HypergradientError(
                f"option 'batch_choices': {max(self.batch_choices)} exceeds n_train = "
                f"{self.n_train}; drop it or raise n_train."
            )
        if not isinstance(self.hybrid, bool):
            raise HypergradientError(
                f"option 'hybrid': expected true or false, got {self.hybrid!r}."
            )
        if self.storage is not None and (
            not isinstance(self.storage, str) or "://" not in self.storage
        ):
            raise HypergradientError(
                f"option 'storage': expected a database URL such as 'sqlite:///study.db', got "
                f"{self.storage!r}."
            )


# ----------------------------------------------------------------------------- the gradient run


def gradient_run(
    config: HpoVsGradientConfig, data, run_dir: Path, *, resume: bool, on_step=None
) -> dict[str, Any]:
    """The hypergradient run with its compute counted; checkpointed in ``run_dir``.

    Compute per hyper-step: ``hyper_every`` SGD steps + one hypergradient
    (:func:`~hypergradient.search.compute.hypergradient_cost`), + one validation pass for
    methods that do not evaluate the validation loss at the weights themselves.
    """
    wd_config = config.weight_decay_config()
    unit = objectives_mod.reference_unit(wd_config, data)
    x_test, y_test = data.x_test, data.y_test

    trainer = wd_recipe.build_trainer(wd_config, data, config.n_val, log_dir=run_dir)
    weights = sum(p.numel() for p in trainer.model.parameters())
    hparams = sum(v.numel() for v in trainer.hparams.values())
    per_step = config.hyper_every * unit.train_step() + compute_mod.hypergradient_cost(
        trainer.method, num_weights=weights, num_hparams=hparams
    )
    if not trainer.method.outer_at_params:  # the trainer evaluates the validation loss anew
        per_step += unit.evaluation(config.n_val)

    def record_compute(trainer, record: dict) -> None:
        record["compute"] = record["hyper_step"] * per_step
        # diagnostic only (not counted): the test loss of the model the record describes
        record["test_loss"] = wd_recipe.evaluate(trainer.model, x_test, y_test)[0]
        if on_step is not None:
            on_step(per_step)

    trainer.callbacks.append(record_compute)
    trainer.fit(config.hyper_steps, checkpoint=run_dir / "checkpoint.pt", resume=resume)
    history = trainer.history
    curve, best, best_test = [], math.inf, math.nan
    for r in history:
        if r["val_loss"] < best:
            best, best_test = r["val_loss"], r["test_loss"]
        curve.append(
            {
                "compute": r["compute"],
                "val_loss": r["val_loss"],
                "test_loss": r["test_loss"],
                "best_val_loss": best,
                "best_test_loss": best_test,
            }  # fmt: skip
        )
    return {
        "num_hparams": int(hparams),
        "compute": curve[-1]["compute"],
        "seconds": sum(r["seconds"] for r in history),
        "curve": curve,
    }


# ----------------------------------------------------------------------------- the searches


def _spaces(config: HpoVsGradientConfig) -> dict[str, dict]:
    return {
        "continuous": {
            "weight_decay": space_mod.Float(config.decay_low, config.decay_high, log=True)
        },
        "discrete": {
            "hidden": space_mod.Choice(tuple(config.hidden_choices)),
            "batch_size": space_mod.Choice(tuple(config.batch_choices)),
        },
    }


def _start(config: HpoVsGradientConfig, scenario: str) -> dict[str, Any]:
    """The starting point of a search: where the gradient run starts."""
    if scenario == "continuous":
        return {"weight_decay": config.init_weight_decay}
    return {"hidden": config.hidden, "batch_size": config.batch_size}


def _study_spent(study) -> float:
    return float(sum(t.user_attrs.get("compute", 0.0) for t in study.get_trials(deepcopy=False)))


def search_run(
    config: HpoVsGradientConfig,
    data,
    name: str,
    scenario: str,
    sampler: str,
    budget: float,
    storage: str,
    *,
    decay: str = "sgd",
    resume: bool,
    on_compute=None,
) -> dict[str, Any]:
    """One Optuna study until it has spent ``budget`` training-step equivalents."""
    optuna = study_mod.require_optuna()
    if not resume:
        with contextlib.suppress(KeyError):  # KeyError: no earlier study of this name
            optuna.delete_study(study_name=name, storage=storage)
    space = _spaces(config)[scenario]
    reports_per_trial = math.ceil(config.hyper_steps * config.hyper_every / config.report_every)
    study = study_mod.create_study(
        name,
        storage=storage,
        sampler=sampler,
        pruner=config.pruner,
        space=space,
        seed=config.seed,
        startup_trials=config.startup_trials,
        max_resource=reports_per_trial,
    )
    study_mod.fail_running_trials(study)  # a resumed run's trial that was cut off
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(_start(config, scenario))
    fixed = {"weight_decay": config.init_weight_decay} if scenario == "discrete" else {}
    if decay == "hypergradient":
        fixed = {}

    def on_report(report: dict) -> None:
        spent = _study_spent(study)  # this trial's compute so far included
        if on_compute is not None:
            on_compute(name, spent)
        if spent >= budget:  # the budget ran out inside this trial: stop it here
            raise optuna.TrialPruned(f"search budget of {budget:.0f} spent")

    objective = objectives_mod.weight_decay_objective(
        config.weight_decay_config(),
        data,
        space,
        fixed=fixed,
        decay=decay,
        report_every=config.report_every,
        on_report=on_report,
    )
    start = time.perf_counter()
    study_mod.optimize(study, objective, stop=lambda s: _study_spent(s) >= budget)
    trials = study.get_trials(deepcopy=False)
    curve = objectives_mod.compute_curve(trials)
    states = [t.state.name for t in trials]
    best = min((r for r in curve), key=lambda r: r["val_loss"], default=None)
    best_trial = None if best is None else study.trials[best["trial"]]
    return {
        "study": name,
        "scenario": scenario,
        "sampler": sampler,
        "decay": decay,
        "compute": _study_spent(study),
        "trials": len(trials),
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "best_params": None if best_trial is None else best_trial.params,
        "seconds": time.perf_counter() - start,
        "curve": curve,
    }


def _start_run(config: HpoVsGradientConfig, data, run_dir: Path, *, resume: bool) -> dict:
    """The discrete scenario's starting configuration trained once (cached in start.json)."""
    optuna = study_mod.require_optuna()
    path = run_dir / "start.json"
    signature = asdict(config) | {"threads": None, "storage": None}
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("signature") == signature:
            return saved["result"]
    objective = objectives_mod.weight_decay_objective(
        config.weight_decay_config(),
        data,
        {},  # nothing searched: the starting configuration itself
        fixed={"weight_decay": config.init_weight_decay},
        report_every=config.report_every,
    )
    trial = optuna.trial.FixedTrial({})
    start = time.perf_counter()
    objective(trial)
    reports = trial.user_attrs["reports"]
    curve, best, best_test = [], math.inf, math.nan
    for compute, val, test in reports:
        if val < best:
            best, best_test = val, test
        curve.append(
            {
                "compute": compute,
                "val_loss": val,
                "test_loss": test,
                "best_val_loss": best,
                "best_test_loss": best_test,
            }  # fmt: skip
        )
    result = {
        "compute": trial.user_attrs["compute"],
        "seconds": time.perf_counter() - start,
        "curve": curve,
    }
    write_json_atomic(path, {"signature": signature, "result": result})
    return result


# ----------------------------------------------------------------------------- the recipe

# Options a resumed run must agree on (the others - threads, storage - do not change results).
_RESUME_EXCLUDE = ("threads", "storage")


def _row(
    label: str, scenario: str, tunes: str, curve: list[dict], equal: float, budget: float, **extra
) -> dict:
    """One table row: the best so far at equal compute and once the search budget is spent
    (a search's last trial may run past its budget: what it finds there is not counted)."""
    at_equal = objectives_mod.best_at(curve, equal)
    at_budget = objectives_mod.best_at(curve, budget)
    return {
        "scenario": scenario,
        "method": label,
        "tunes": tunes,
        "val_at_equal_compute": at_equal["val_loss"],
        "test_at_equal_compute": at_equal["test_loss"],
        "best_val_loss": at_budget["val_loss"],
        "best_test_loss": at_budget["test_loss"],
        **extra,
    }


@register_recipe
class HpoVsGradientRecipe(AbstractRecipe):
    """Black-box search (Optuna: TPE by default, Hyperband pruning) against hypergradients
    at equal compute, counted in training-step equivalents, on the weight-decay recipe's
    MLP: (1) the weight decay, which gradients reach (one decay per weight by
    hypergradients vs one global decay by search); (2) hidden width and batch size, which
    they cannot (the starting configuration vs the search, and optionally the two combined).

    Writes config.toml, results.json, best_so_far.png, study.db (Optuna, SQLite),
    checkpoint.pt and hyper_steps.jsonl (the gradient run) and start.json into the run
    folder; --resume continues the gradient run and every study.
    """

    name = "hpo-vs-gradient"
    help = "Optuna search vs hypergradients at equal compute (decay; width and batch size)"
    config_cls = HpoVsGradientConfig

    def run(self, config, run_dir, *, resume, progress, console):
        config.validate()
        optuna = study_mod.require_optuna()
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says enough
        try:
            with torch_threads(config.threads):
                return self._run(
                    config, Path(run_dir), resume=resume, progress=progress, console=console
                )
        finally:
            optuna.logging.set_verbosity(verbosity)

    def _run(self, config, run_dir, *, resume, progress, console):
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in asdict(config).items() if k not in _RESUME_EXCLUDE}
        resuming = resume_or_start_over(
            run_dir, meta, resume=resume, stale=["hyper_steps.jsonl", "start.json"]
        )
        if resume and not resuming:
            console.print(f"no checkpoint in {run_dir}: starting from the beginning")
        storage = config.storage or study_mod.default_storage(run_dir)
        data = wd_recipe.load_data(config.weight_decay_config())
        searches = [(s, m) for s in config.scenarios for m in config.samplers]
        hybrid = config.hybrid and "discrete" in config.scenarios
        with progress_bar(console, progress) as bar:
            task = bar.add_task(f"gradient run ({config.granularity} decay), compute", total=None)
            gradient = gradient_run(
                config, data, run_dir, resume=resuming,
                on_step=lambda c: bar.advance(task, c),
            )  # fmt: skip
            bar.update(task, total=gradient["compute"], completed=gradient["compute"])
            budget = config.budget_factor * gradient["compute"]
            start = None
            if "discrete" in config.scenarios:
                start = _start_run(config, data, run_dir, resume=resuming)
            runs = []
            jobs = [(f"{s}-{m}", s, m, "sgd") for s, m in searches]
            if hybrid:
                jobs += [(f"discrete-hybrid-{m}", "discrete", m, "hypergradient")
                         for m in config.samplers]  # fmt: skip
            for name, scenario, sampler, decay in jobs:
                task = bar.add_task(f"{name}, compute", total=budget)

                def on_compute(_name, spent, task=task):
                    bar.update(task, completed=min(spent, budget))

                runs.append(
                    search_run(
                        config,
                        data,
                        name,
                        scenario,
                        sampler,
                        budget,
                        storage,
                        decay=decay,
                        resume=resuming,
                        on_compute=on_compute,
                    )
                )
                bar.update(task, completed=budget)

        equal = gradient["compute"]
        rows = []
        if "continuous" in config.scenarios:
            rows.append(
                _row(
                    f"hypergradient ({config.granularity}, {config.method})",
                    "continuous",
                    f"{gradient['num_hparams']:,} decays",
                    gradient["curve"],
                    equal,
                    budget,
                    compute=gradient["compute"],
                    trials="1 run",
                    seconds=gradient["seconds"],
                )
            )
        if start is not None:
            rows.append(
                _row(
                    f"start: hidden {config.hidden}, batch {config.batch_size}",
                    "discrete",
                    "nothing (gradients cannot move them)",
                    start["curve"],
                    equal,
                    budget,
                    compute=start["compute"],
                    trials="1 run",
                    seconds=start["seconds"],
                )
            )
        for run in runs:
            label = run["sampler"] + (" + hypergradient decays" if run["decay"] != "sgd" else "")
            tunes = "global decay" if run["scenario"] == "continuous" else "width, batch size"
            rows.append(
                _row(
                    label,
                    run["scenario"],
                    tunes,
                    run["curve"],
                    equal,
                    budget,
                    compute=run["compute"],
                    seconds=run["seconds"],
                    trials=f"{run['trials']} ({run['pruned']} pruned)",
                )
            )
        rows.sort(key=lambda r: _SCENARIOS.index(r["scenario"]))
        verdicts = _verdicts(rows, equal, budget)
        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": machine(),
            "storage": storage,
            "unit": {
                "batch_size": config.batch_size,
                "num_weights": objectives_mod.reference_unit(
                    config.weight_decay_config(), data
                ).num_weights,
                "hypergradient_cost": (gradient["compute"] / config.hyper_steps)
                - config.hyper_every,
                "note": "compute = training-step equivalents of the reference MLP and batch",
            },
            "equal_compute": equal,
            "search_budget": budget,
            "rows": rows,
            "verdicts": verdicts,
            "gradient": gradient,
            "start": start,
            "searches": runs,
        }
        write_results(run_dir, results)
        _plot(results, run_dir / "best_so_far.png")
        console.print(results_table(results))
        for line in verdicts.values():
            console.print(line)
        console.print(f"Wrote results.json, best_so_far.png and study.db to {run_dir}.")
        return results


def _verdicts(rows: list[dict], equal: float, budget: float) -> dict[str, str]:
    """One sentence per scenario: the lowest validation loss at equal compute and once the
    searches' budget is spent (a gradient run, or the start, cannot use more compute)."""
    out = {}
    for scenario in _SCENARIOS:
        mine = [r for r in rows if r["scenario"] == scenario]
        if len(mine) < 2:
            continue
        parts = []
        for key, where in (
            ("val_at_equal_compute", f"at equal compute ({equal:,.0f})"),
            ("best_val_loss", f"at the search budget ({budget:,.0f})"),
        ):
            best = min(mine, key=lambda r: r[key])
            others = ", ".join(f"{r['method']} {r[key]:.4f}" for r in mine if r is not best)
            parts.append(f"{where}: {best['method']} {best[key]:.4f} (vs {others})")
        out[scenario] = f"{scenario}: lowest validation loss " + "; ".join(parts) + "."
    return out


def results_table(results: dict) -> Table:
    table = Table(
        title=f"Search vs hypergradients on {results['config']['dataset']}: best validation "
        f"loss so far; equal compute = {results['equal_compute']:,.0f} training-step "
        f"equivalents (the gradient run's)"
    )
    columns = ("scenario", "method", "tunes", "compute", "val @ equal", "test @ equal",
               "best val", "its test", "trials", "time")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("scenario", "method", "tunes") else "right")
    previous = None
    for r in results["rows"]:
        table.add_row(
            r["scenario"] if r["scenario"] != previous else "",
            r["method"],
            r["tunes"],
            f"{r['compute']:,.0f}",
            f"{r['val_at_equal_compute']:.4f}",
            f"{r['test_at_equal_compute']:.4f}",
            f"{r['best_val_loss']:.4f}",
            f"{r['best_test_loss']:.4f}",
            str(r["trials"]),
            f"{r['seconds']:.0f}s",
        )
        previous = r["scenario"]
    return table


def _plot(results: dict, path: Path) -> None:
    """Best-so-far validation loss against compute, one panel per scenario."""
    plt = pyplot()
    scenarios = [s for s in _SCENARIOS if s in results["config"]["scenarios"]]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.2 * len(scenarios), 4.4), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        lines = []
        if scenario == "continuous":
            lines.append(("hypergradient", results["gradient"]["curve"], "k"))
        elif results["start"] is not None:  # it cannot improve: held flat up to the budget
            held = results["start"]["curve"] + [
                {**results["start"]["curve"][-1], "compute": results["search_budget"]}
            ]
            lines.append(("start config (gradients cannot move it)", held, "k"))
        for i, run in enumerate(r for r in results["searches"] if r["scenario"] == scenario):
            label = run["sampler"] + (" + hypergradient decays" if run["decay"] != "sgd" else "")
            lines.append((label, run["curve"], f"C{i}"))
        for label, curve, color in lines:
            xs = [p["compute"] for p in curve if math.isfinite(p["best_val_loss"])]
            ys = [p["best_val_loss"] for p in curve if math.isfinite(p["best_val_loss"])]
            style = "--" if label.startswith("start") else "-"
            ax.step(xs, ys, where="post", color=color, ls=style, label=label, zorder=3)
        ax.axvline(results["equal_compute"], color="0.5", ls=":", lw=1, label="equal compute")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute (training-step equivalents)")
        ax.set_ylabel("best validation loss so far")
        ax.set_title(f"{scenario}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
