r"""Optuna objectives for the ``weight-decay`` recipe's MLP, with compute accounting.

:func:`weight_decay_objective` turns the recipe's setup (data, MLP, SGD, batch order) into
``objective(trial) -> validation loss``.  A trial may set

* hyperparameters that hypergradients **cannot reach**: ``hidden`` (the MLP's width) and
  ``batch_size`` - discrete, and they change the model or the data stream;
* hyperparameters that hypergradients **can** reach, as a black-box baseline for them:
  ``weight_decay`` (one global decay, ``torch.optim.SGD(weight_decay=...)``) and
  ``inner_lr`` (SGD's learning rate);
* with ``decay="hypergradient"`` (the *hybrid*), the decays are not searched but fitted
  inside each trial by the recipe's hypergradient run (``granularity`` decays, Adam with
  ``hyper_lr``), and ``hyper_lr`` / ``init_weight_decay`` may be searched instead.

Every trial trains for the recipe's budget - ``hyper_steps * hyper_every`` reference steps
worth of examples, so the number of *epochs* is the same at every batch size - and reports
the validation loss every ``report_every`` reference steps (``trial.report(loss, r)``, what
Hyperband and successive halving prune on).  The objective's value is the lowest reported
validation loss (early stopping at report points).

Compute is counted in reference training steps (:mod:`~hypergradient.search.compute`):
every SGD step, every validation evaluation and (hybrid) every hypergradient.  The trial
stores it in its user attributes (``"compute"``, and ``"reports"``: one
``[compute so far, validation loss, test loss]`` per report), so :func:`compute_curve` can
put any study on the compute axis afterwards.  The test loss is a diagnostic: measured, not
counted, never seen by the search.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .._errors import HypergradientError
from .compute import StepUnit, hypergradient_cost
from .space import SearchSpace, check_space, suggest

if TYPE_CHECKING:  # the recipe imports this package: import it lazily at run time
    from ..data import Split
    from ..recipes.weight_decay import WeightDecayConfig

SGD_PARAMS = ("weight_decay", "inner_lr", "hidden", "batch_size")
HYBRID_PARAMS = ("inner_lr", "hidden", "batch_size", "hyper_lr", "init_weight_decay")
DECAY_MODES = ("sgd", "hypergradient")


def mlp_weights(num_features: int, hidden: int, num_classes: int) -> int:
    """Weights (and biases) of the recipe's MLP ``features -> hidden -> classes``.

    Examples:
        >>> import torch
        >>> from hypergradient import search
        >>> search.mlp_weights(num_features=64, hidden=32, num_classes=10)
        2410
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 10))
        >>> sum(p.numel() for p in mlp.parameters())
        2410
    """
    return num_features * hidden + hidden + hidden * num_classes + num_classes


def reference_unit(config: WeightDecayConfig, data: Split) -> StepUnit:
    """The compute unit of a recipe config: one SGD step of its batch through its MLP.

    Examples:
        >>> from hypergradient import search
        >>> from hypergradient.recipes import weight_decay
        >>> config = weight_decay.WeightDecayConfig(hidden=32, batch_size=64)
        >>> data = weight_decay.load_data(config)  # scikit-learn's digits: 64 features
        >>> search.reference_unit(config, data)
        StepUnit(batch_size=64, num_weights=2410)
    """
    return StepUnit(
        batch_size=config.batch_size,
        num_weights=mlp_weights(data.num_features, config.hidden, data.num_classes),
    )


@torch.no_grad()
def _loss(model, x, y) -> float:
    return float(F.cross_entropy(model(x), y))


def _check_params(names, allowed, where: str) -> None:
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise HypergradientError(f"{where}: cannot set {unknown}; a trial may set {list(allowed)}.")


def weight_decay_objective(
    config: WeightDecayConfig,
    data: Split,
    space: SearchSpace,
    *,
    fixed: Mapping[str, Any] | None = None,
    decay: str = "sgd",
    report_every: int = 100,
    unit: StepUnit | None = None,
    on_report: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[Any], float]:
    """``objective(trial) -> lowest validation loss`` of the recipe's MLP (module docstring).

    Args:
        config: the recipe's config (data split, model, SGD, budget, seed); a trial's
            values replace its fields.
        data: the recipe's data (``weight_decay.load_data(config)``).
        space: what the trials choose (``{"hidden": search.Choice((16, 64)), ...}``; ``{}``:
            every trial trains ``config`` with ``fixed``).
        fixed: values every trial uses (e.g. ``{"weight_decay": 1e-3}``); default for
            ``weight_decay``: ``config.init_weight_decay``.
        decay: ``"sgd"`` (one global decay in SGD) or ``"hypergradient"`` (the hybrid).
        report_every: reference SGD steps between validation reports (the pruners' rungs).
        unit: the compute unit (default :func:`reference_unit` of ``config``).
        on_report: called with every report (``trial``, ``report``, ``compute``,
            ``val_loss``, ``test_loss``, ``params``), e.g. to draw a live curve.

    Cost of one trial (unpruned): the budget's SGD steps (``hyper_steps * hyper_every``
    reference steps), one validation pass per report, and for the hybrid one hypergradient
    per ``hyper_every`` steps.
    """
    where = "search.weight_decay_objective"
    space = check_space(space, where, allow_empty=True)
    fixed = dict(fixed or {})
    if decay not in DECAY_MODES:
        raise HypergradientError(f"{where}(decay={decay!r}): expected one of {list(DECAY_MODES)}.")
    allowed = SGD_PARAMS if decay == "sgd" else HYBRID_PARAMS
    _check_params(list(space) + list(fixed), allowed, where)
    both = sorted(set(space) & set(fixed))
    if both:
        raise HypergradientError(f"{where}: {both} are both searched and fixed; pick one.")
    if not isinstance(report_every, int) or isinstance(report_every, bool) or report_every < 1:
        raise HypergradientError(f"{where}(report_every={report_every!r}): expected an int >= 1.")
    unit = reference_unit(config, data) if unit is None else unit
    budget_examples = config.inner_budget * config.batch_size
    report_examples = report_every * config.batch_size
    n_val = config.n_val
    x_val, y_val = data.x_val[:n_val], data.y_val[:n_val]

    def objective(trial) -> float:
        import optuna

        params = {**fixed, **suggest(trial, space)}
        fields = {k: v for k, v in params.items() if k != "weight_decay"}
        cfg = dataclasses.replace(config, **fields)
        cfg.validate()
        weights = mlp_weights(data.num_features, cfg.hidden, data.num_classes)
        step_cost = unit.train_step(cfg.batch_size, weights)
        eval_cost = unit.evaluation(n_val, weights)
        total_steps = max(1, math.ceil(budget_examples / cfg.batch_size))
        per_report = max(1, round(report_examples / cfg.batch_size))
        reports: list[list[float]] = []
        state = {"compute": 0.0, "best": math.inf}
        start = time.perf_counter()

        def report(model, step: int) -> None:
            state["compute"] += eval_cost
            val = _loss(model, x_val, y_val)
            test = _loss(model, data.x_test, data.y_test)
            val = val if math.isfinite(val) else math.inf
            reports.append([state["compute"], val, test])
            state["best"] = min(state["best"], val)
            trial.set_user_attr("compute", state["compute"])
            trial.set_user_attr("reports", reports)
            if on_report is not None:
                on_report(
                    {
                        "trial": trial.number,
                        "report": step,
                        "compute": state["compute"],
                        "val_loss": val,
                        "test_loss": test,
                        "params": params,
                    }  # fmt: skip
                )
            if not math.isfinite(val):  # a diverged run: stop it, like a pruned one
                trial.set_user_attr("diverged", True)
                raise optuna.TrialPruned(f"training diverged before report {step}")
            trial.report(val, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at report {step}")

        try:
            if decay == "sgd":
                _train_sgd(cfg, data, params, total_steps, per_report, step_cost, state, report)
            else:
                _train_hybrid(cfg, data, total_steps, per_report, step_cost, state, report)
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - start)
        trial.set_user_attr("compute", state["compute"])
        return state["best"]

    return objective


def _train_sgd(cfg, data, params, total_steps, per_report, step_cost, state, report) -> None:
    """Plain SGD with one global decay: the recipe's grid run (same init, batch order)."""
    from ..recipes import weight_decay as recipe
    from ..train import BatchStream

    wd = float(params.get("weight_decay", cfg.init_weight_decay))
    model = recipe.build_model(cfg, data)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.inner_lr, weight_decay=wd)
    stream = BatchStream(recipe.train_loader(cfg, data), cfg.seed)
    step, r = 0, 0
    while step < total_steps:
        chunk = min(per_report, total_steps - step)
        for _ in range(chunk):
            x, y = stream.next()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        step += chunk
        state["compute"] += step_cost * chunk
        r += 1
        report(model, r)


def _train_hybrid(cfg, data, total_steps, per_report, step_cost, state, report) -> None:
    """The recipe's hypergradient run (decays fitted inside the trial), reported every
    ``per_report`` SGD steps rounded to whole hyper-steps."""
    from ..recipes import weight_decay as recipe

    trainer = recipe.build_trainer(cfg, data, cfg.n_val)
    weights = sum(p.numel() for p in trainer.model.parameters())
    num_hparams = sum(v.numel() for v in trainer.hparams.values())
    hyper_cost = hypergradient_cost(trainer.method, num_weights=weights, num_hparams=num_hparams)
    hyper_steps = max(1, math.ceil(total_steps / cfg.hyper_every))
    every = max(1, round(per_report / cfg.hyper_every))
    r = 0
    while trainer.hyper_step < hyper_steps:
        trainer.step()
        state["compute"] += step_cost * (cfg.hyper_every + hyper_cost)
        if trainer.hyper_step % every == 0 or trainer.hyper_step == hyper_steps:
            r += 1
            report(trainer.model, r)


def compute_curve(trials) -> list[dict[str, Any]]:
    """Every report of ``trials`` (Optuna frozen trials of :func:`weight_decay_objective`)
    on one compute axis, with the best validation loss so far.

    The trials are taken in number order, as one worker runs them: a report's ``compute``
    is the compute of all earlier trials plus its own trial's so far.  Trials without
    reports (failed before the first) add their recorded compute, if any.
    Returns dicts ``trial``, ``compute``, ``val_loss``, ``test_loss``, ``best_val_loss``,
    ``best_test_loss`` (test loss of the best-so-far model) and ``state``.

    Examples:
        Two trials of 2 reference steps each, reporting after every step:

        >>> import optuna
        >>> from hypergradient import search
        >>> study = optuna.create_study()
        >>> for reports in ([[1.0, 0.9, 1.0], [2.0, 0.6, 0.7]], [[1.0, 0.5, 0.4], [2.0, 0.8, 0.9]]):
        ...     attrs = {"compute": 2.0, "reports": reports}
        ...     study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs=attrs))
        >>> curve = search.compute_curve(study.trials)
        >>> [(row["trial"], row["compute"], row["best_val_loss"]) for row in curve]
        [(0, 1.0, 0.9), (0, 2.0, 0.6), (1, 3.0, 0.5), (1, 4.0, 0.5)]
    """
    rows: list[dict[str, Any]] = []
    spent, best_val, best_test = 0.0, math.inf, math.nan
    for trial in sorted(trials, key=lambda t: t.number):
        reports = trial.user_attrs.get("reports", [])
        for compute, val, test in reports:
            if val < best_val:
                best_val, best_test = val, test
            rows.append(
                {
                    "trial": trial.number,
                    "compute": spent + compute,
                    "val_loss": val,
                    "test_loss": test,
                    "best_val_loss": best_val,
                    "best_test_loss": best_test,
                    "state": trial.state.name,
                }  # fmt: skip
            )
        spent += float(trial.user_attrs.get("compute", reports[-1][0] if reports else 0.0))
    return rows


def best_at(curve: list[dict[str, Any]], compute: float) -> dict[str, float]:
    """The best-so-far validation loss (and that model's test loss) of a :func:`compute_curve`
    once ``compute`` reference steps are spent (``inf`` before its first report).

    Examples:
        >>> from hypergradient import search
        >>> curve = [
        ...     {"compute": 1.0, "best_val_loss": 0.9, "best_test_loss": 1.0},
        ...     {"compute": 3.0, "best_val_loss": 0.4, "best_test_loss": 0.5},
        ... ]
        >>> search.best_at(curve, 2.0)  # the report at 3.0 steps is not paid for yet
        {'val_loss': 0.9, 'test_loss': 1.0, 'compute': 1.0}
        >>> search.best_at(curve, 0.5)["val_loss"]
        inf
    """
    best = {"val_loss": math.inf, "test_loss": math.nan, "compute": 0.0}
    for row in curve:
        if row["compute"] > compute * (1 + 1e-9):
            break
        best = {
            "val_loss": row["best_val_loss"],
            "test_loss": row["best_test_loss"],
            "compute": row["compute"],
        }
    return best
