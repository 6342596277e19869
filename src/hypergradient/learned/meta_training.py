r"""Meta-training learned optimizers with the estimators of :mod:`hypergradient.estimators`,
and evaluating them against Adam.

:func:`meta_train` fits :math:`\theta` to a task suite (a list of families)::

    for i in range(num_steps):
        family = families[i % len(families)]           # round robin over the suite
        T, K = schedule.at(i)                           # episode horizon, truncation length
        estimate, states[family] = estimator(family, T, K).estimate(theta, states[family], gen)
        theta = Adam(clip(estimate.grad))               # global-norm clipping, then Adam

Each family keeps its own estimator state (its particles: inner training runs in flight,
PES's accumulators), so the particles of one estimator are tasks of one shape and run as one
:func:`torch.func.vmap` batch (``vectorize=True``).  The estimator is one of ``"tbptt"``
(:class:`~hypergradient.estimators.TruncatedBackprop`), ``"es"`` (truncated
:class:`~hypergradient.estimators.AntitheticES`), ``"pes"``
(:class:`~hypergradient.estimators.PES`) or ``"mixed"``
(:class:`~hypergradient.estimators.MixedEstimator`), or any callable
``(system, truncation_length) -> AbstractGradientEstimator``.

Everything random comes from one seeded generator, and a checkpoint holds
:math:`\theta`, Adam's state, every family's particles, the generator and the history, so a
resumed run reproduces an uninterrupted one bit for bit.

Evaluation: :func:`evaluate_learned` and :func:`evaluate_adam` train the same sampled tasks
(seeded) for a fixed number of steps and report the final full training loss;
:func:`tune_adam` picks Adam's best learning rate from a grid on those tasks.

Examples:
    >>> from hypergradient import learned
    >>> lopt = learned.LinearLearnedOptimizer()
    >>> family = learned.NoisyQuadraticFamily(dim=2, noise=0.0)
    >>> schedule = learned.TruncationSchedule(horizon=4, truncation_length=2)
    >>> result = learned.meta_train(lopt, [family], num_steps=2, estimator="es", num_pairs=1,
    ...                             schedule=schedule)
    >>> tasks = learned.sample_tasks(family, num_tasks=2, num_steps=4, seed=0)
    >>> learned_eval = learned.evaluate_learned(lopt, result.theta, tasks, num_steps=4)
    >>> best_lr, by_lr = learned.tune_adam(tasks, [0.01, 0.1], num_steps=4)
    >>> len(learned_eval.final_losses), sorted(by_lr)
    (2, [0.01, 0.1])
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import torch

from .._errors import HypergradientError
from .._io import load_checkpoint, save_atomic, write_json_atomic
from ..diffopt import adam
from ..estimators import (
    PES,
    AbstractGradientEstimator,
    AntitheticES,
    EstimatorState,
    MixedEstimator,
    TruncatedBackprop,
)
from .architectures import AbstractLearnedOptimizer, Theta, _check_theta, describe, step_inputs
from .tasks import AbstractTaskFamily, InnerTrainingSystem, Task, train_task

ESTIMATORS = ("tbptt", "es", "pes", "mixed")
"""The gradient estimators :func:`meta_train` and :func:`make_estimator` take by name:
truncated back-propagation, antithetic ES, PES and the mixed estimator.

Examples:
    >>> from hypergradient.learned import ESTIMATORS
    >>> ESTIMATORS
    ('tbptt', 'es', 'pes', 'mixed')
"""
EstimatorFactory = Callable[[InnerTrainingSystem, int], AbstractGradientEstimator]


@final
@dataclass(frozen=True)
class TruncationSchedule:
    r"""Episode horizon :math:`T_i` and truncation length :math:`K_i` at outer step :math:`i`.

    With ``initial_horizon`` the horizon grows linearly from it to ``horizon`` over the
    first ``growth_steps`` outer steps (short inner runs first: their meta-gradients are
    cheap and tame), rounded to a multiple of the truncation length; otherwise it is
    ``horizon`` throughout.  :math:`K_i = \min(K, T_i)`.

    Examples:
        >>> s = TruncationSchedule(horizon=100, truncation_length=10, initial_horizon=20,
        ...                        growth_steps=80)
        >>> s.at(0), s.at(40), s.at(80), s.at(1000)
        ((20, 10), (60, 10), (100, 10), (100, 10))
    """

    horizon: int = 100
    truncation_length: int = 10
    initial_horizon: int | None = None
    growth_steps: int = 0

    def __post_init__(self):
        where = "TruncationSchedule(...)"
        for name in ("horizon", "truncation_length"):
            _check_int(where, name, getattr(self, name))
        _check_int(where, "growth_steps", self.growth_steps, minimum=0)
        if self.truncation_length > self.horizon:
            raise HypergradientError(
                f"{where}: truncation_length={self.truncation_length} exceeds horizon="
                f"{self.horizon}; a truncation is part of one episode."
            )
        if self.initial_horizon is not None:
            _check_int(where, "initial_horizon", self.initial_horizon)
            if self.initial_horizon > self.horizon:
                raise HypergradientError(
                    f"{where}: initial_horizon={self.initial_horizon} exceeds horizon="
                    f"{self.horizon}; horizons only grow."
                )

    def at(self, step: int) -> tuple[int, int]:
        """``(horizon, truncation_length)`` at outer step ``step``."""
        horizon = self.horizon
        if self.initial_horizon is not None and step < self.growth_steps:
            frac = step / self.growth_steps
            grown = self.initial_horizon + frac * (self.horizon - self.initial_horizon)
            k = self.truncation_length
            horizon = min(self.horizon, max(self.initial_horizon, k * round(grown / k)))
        return horizon, min(self.truncation_length, horizon)


def _check_int(where: str, name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HypergradientError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")
    return value


def make_estimator(
    name: str,
    system: InnerTrainingSystem,
    truncation_length: int,
    *,
    sigma: float = 0.01,
    num_pairs: int = 8,
    vectorize: bool = True,
) -> AbstractGradientEstimator:
    """The estimator ``name`` (one of :data:`ESTIMATORS`) on ``system``.

    ``num_pairs`` is the number of antithetic pairs (ES, PES, mixed) or of particles
    (truncated back-propagation); ``sigma`` the perturbation scale of the ES estimators.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import ESTIMATORS, LinearLearnedOptimizer
        >>> from hypergradient.learned import NoisyQuadraticFamily, make_estimator
        >>> lopt = LinearLearnedOptimizer()
        >>> system = NoisyQuadraticFamily(dim=2).unrolled_system(lopt, horizon=4)
        >>> [type(make_estimator(name, system, 2, num_pairs=2)).__name__ for name in ESTIMATORS]
        ['TruncatedBackprop', 'AntitheticES', 'PES', 'MixedEstimator']
        >>> est = make_estimator("pes", system, truncation_length=2, sigma=0.1, num_pairs=2)
        >>> theta = lopt.init(torch.Generator().manual_seed(0))
        >>> gen = torch.Generator().manual_seed(1)
        >>> estimate, state = est.estimate(theta, est.init(theta, gen), gen)
        >>> {k: tuple(g.shape) for k, g in estimate.grad.items()}
        {'w': (4, 2), 'b': (2,)}
    """
    if name == "tbptt":
        return TruncatedBackprop(
            system, truncation_length, num_particles=num_pairs, vectorize=vectorize
        )
    if name == "es":
        return AntitheticES(
            system,
            sigma=sigma,
            num_pairs=num_pairs,
            truncation_length=truncation_length,
            vectorize=vectorize,
        )
    if name == "pes":
        return PES(
            system,
            sigma=sigma,
            num_pairs=num_pairs,
            truncation_length=truncation_length,
            vectorize=vectorize,
        )
    if name == "mixed":
        return MixedEstimator(
            system,
            sigma=sigma,
            num_pairs=num_pairs,
            truncation_length=truncation_length,
            vectorize=vectorize,
        )
    raise HypergradientError(
        f"meta_train(estimator={name!r}): unknown estimator; use one of {ESTIMATORS} or a "
        f"callable (system, truncation_length) -> AbstractGradientEstimator."
    )


@dataclass
class MetaTrainResult:
    """What :func:`meta_train` returns.

    Attributes:
        theta: the meta-trained parameters (detached).
        history: one record per outer step: ``step``, ``family`` (name), ``horizon``,
            ``truncation``, ``loss`` (the estimate's mean clipped log loss over its
            truncation), ``grad_norm`` (before clipping), ``seconds`` (of that step).
        initial_theta: where meta-training started.

    Examples:
        >>> import torch
        >>> from hypergradient import learned
        >>> family = learned.NoisyQuadraticFamily(dim=2)
        >>> result = learned.meta_train(
        ...     learned.LinearLearnedOptimizer(), [family], num_steps=2, estimator="es",
        ...     num_pairs=1, schedule=learned.TruncationSchedule(horizon=4, truncation_length=2))
        >>> isinstance(result, learned.MetaTrainResult), len(result.history)
        (True, 2)
        >>> sorted(result.history[0])
        ['family', 'grad_norm', 'horizon', 'loss', 'seconds', 'step', 'truncation']
        >>> torch.equal(result.theta["w"], result.initial_theta["w"])  # Adam moved theta
        False
    """

    theta: Theta
    history: list[dict[str, Any]]
    initial_theta: Theta = field(default_factory=dict)


def meta_train(
    optimizer: AbstractLearnedOptimizer,
    families: Sequence[AbstractTaskFamily],
    num_steps: int,
    *,
    estimator: str | EstimatorFactory = "pes",
    schedule: TruncationSchedule | None = None,
    sigma: float = 0.01,
    num_pairs: int = 8,
    vectorize: bool = True,
    meta_lr: float = 3e-3,
    meta_lr_final: float | None = None,
    clip_norm: float | None = 1.0,
    meta_loss: str = "full",
    theta: Theta | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 25,
    resume: bool = False,
    history_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: bool = False,
    callback: Callable[[int, dict[str, Any], Theta], bool | None] | None = None,
) -> MetaTrainResult:
    r"""Meta-train ``optimizer`` on ``families`` for ``num_steps`` outer steps.

    See the module docstring for the loop.  Each outer step costs one truncation of one
    family's estimator: :math:`2SK` inner steps for ES/PES/mixed (:math:`S` =
    ``num_pairs``), :math:`SK` forward plus one backward for ``"tbptt"``.

    Args:
        optimizer: the architecture.
        families: the task suite (each family's tasks share one shape).
        num_steps: outer (meta) steps in total; a resumed run continues up to it.
        estimator: one of :data:`ESTIMATORS` or a factory ``(system, K) -> estimator``.
        schedule: horizons and truncation lengths (default: ``T = 100``, ``K = 10``).
        sigma: ES/PES/mixed perturbation scale (in ``theta``'s coordinates).
        num_pairs: antithetic pairs, or particles for ``"tbptt"``.
        vectorize: run each family's particles as one vmapped batch.
        meta_lr: Adam's learning rate on ``theta``.
        meta_lr_final: with a value, Adam's learning rate decays from ``meta_lr`` to it
            along a half cosine over the ``num_steps`` outer steps (late meta-steps then
            refine instead of chasing the noise of the estimates); ``None``: constant.
        clip_norm: clip the estimate's global norm to this (``None``: no clipping).
        meta_loss: ``"full"``, ``"train"`` or ``"valid"`` (see
            :class:`~.tasks.InnerTrainingSystem`).
        theta: the starting point (default ``optimizer.init`` from ``seed``).
        seed: seeds the generator behind every random draw.
        checkpoint: file to save the run into every ``checkpoint_every`` steps and at the
            end; with ``resume=True`` an existing checkpoint is continued (it must come from
            a run with the same options, ``num_steps`` aside).
        history_path: JSON file for the history (written with every checkpoint and at the
            end).
        plot_path: PNG of the meta-loss per family (written at the end).
        progress: show a rich progress bar.
        callback: ``callback(step, record, theta)`` after every outer step; returning
            ``True`` stops the run (after a checkpoint).

    Returns:
        a :class:`MetaTrainResult`.

    Examples:
        >>> import torch
        >>> from hypergradient import learned
        >>> lopt = learned.MLPLearnedOptimizer(hidden=4)
        >>> families = [learned.NoisyQuadraticFamily(dim=2), learned.FredholmFamily(n=4)]
        >>> schedule = learned.TruncationSchedule(4, 2, initial_horizon=2, growth_steps=2)
        >>> result = learned.meta_train(lopt, families, num_steps=3, estimator="tbptt",
        ...                             num_pairs=2, schedule=schedule, meta_lr=1e-2)
        >>> [(r["family"], r["horizon"], r["truncation"]) for r in result.history]
        [('quadratic-d2-k100', 2, 2), ('fredholm-n4', 4, 2), ('quadratic-d2-k100', 4, 2)]
        >>> sorted(result.theta) == sorted(lopt.theta_shapes())
        True
    """
    where = "meta_train(...)"
    if not isinstance(optimizer, AbstractLearnedOptimizer):
        raise HypergradientError(
            f"{where}: optimizer must be an AbstractLearnedOptimizer (e.g. "
            f"MLPLearnedOptimizer()), got {type(optimizer).__name__}."
        )
    families = list(families) if isinstance(families, (list, tuple)) else [families]
    if not families or not all(isinstance(f, AbstractTaskFamily) for f in families):
        raise HypergradientError(
            f"{where}: families must be a non-empty list of AbstractTaskFamily, got "
            f"{[type(f).__name__ for f in families]}."
        )
    _check_int(where, "num_steps", num_steps)
    _check_int(where, "num_pairs", num_pairs)
    _check_int(where, "checkpoint_every", checkpoint_every)
    schedule = TruncationSchedule() if schedule is None else schedule
    if not isinstance(schedule, TruncationSchedule):
        raise HypergradientError(
            f"{where}: schedule must be a TruncationSchedule, got {type(schedule).__name__}."
        )
    if not callable(estimator) and estimator not in ESTIMATORS:
        raise HypergradientError(
            f"{where}: estimator must be one of {ESTIMATORS} or a callable (system, "
            f"truncation_length) -> AbstractGradientEstimator, got {estimator!r}."
        )
    if isinstance(meta_lr, bool) or not isinstance(meta_lr, (int, float)) or not meta_lr > 0:
        raise HypergradientError(f"{where}: meta_lr must be a number > 0, got {meta_lr!r}.")
    if meta_lr_final is not None and (
        isinstance(meta_lr_final, bool)
        or not isinstance(meta_lr_final, (int, float))
        or not 0 < meta_lr_final <= meta_lr
    ):
        raise HypergradientError(
            f"{where}: meta_lr_final must be None or a number in (0, meta_lr={meta_lr}], got "
            f"{meta_lr_final!r}."
        )
    if clip_norm is not None and (
        isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not clip_norm > 0
    ):
        raise HypergradientError(
            f"{where}: clip_norm must be a number > 0 or None, got {clip_norm!r}."
        )
    if resume and checkpoint is None:
        raise HypergradientError(
            f"{where}: resume=True needs checkpoint=<file> (where the run was saved)."
        )

    generator = torch.Generator().manual_seed(seed)
    if theta is None:
        theta = optimizer.init(generator)
    _check_theta(where, theta, optimizer)
    initial_theta = {k: v.detach().clone() for k, v in theta.items()}
    leaves = {k: v.detach().clone() for k, v in theta.items()}
    adam_opt = torch.optim.Adam(list(leaves.values()), lr=meta_lr)
    signature = {
        "optimizer": describe(optimizer),
        "families": [f.name for f in families],
        # a factory is named by its qualified name (its repr holds a memory address)
        "estimator": estimator
        if isinstance(estimator, str)
        else getattr(estimator, "__qualname__", type(estimator).__qualname__),
        "schedule": [
            schedule.horizon,
            schedule.truncation_length,
            schedule.initial_horizon,
            schedule.growth_steps,
        ],
        "sigma": sigma,
        "num_pairs": num_pairs,
        "vectorize": vectorize,
        "meta_lr": meta_lr,
        "meta_lr_final": meta_lr_final,
        "clip_norm": clip_norm,
        "meta_loss": meta_loss,
        "seed": seed,
    }
    states: dict[int, EstimatorState] = {}
    history: list[dict[str, Any]] = []
    start = 0
    checkpoint = None if checkpoint is None else Path(checkpoint)
    if resume and checkpoint is not None and checkpoint.is_file():
        saved = load_checkpoint(checkpoint, where)
        if saved["signature"] != _jsonable(signature):
            changed = sorted(
                k for k in signature if saved["signature"].get(k) != _jsonable(signature)[k]
            )
            raise HypergradientError(
                f"{where}: the checkpoint {str(checkpoint)!r} was made with other options "
                f"({', '.join(changed)} differ); resume with the same options or start over "
                f"with resume=False."
            )
        with torch.no_grad():
            for k, v in saved["theta"].items():
                leaves[k].copy_(v)
        adam_opt.load_state_dict(saved["adam"])
        states = saved["states"]
        generator.set_state(saved["generator"])
        history = saved["history"]
        initial_theta = saved["initial_theta"]
        start = saved["step"]

    systems: dict[tuple[int, int], InnerTrainingSystem] = {}
    estimators: dict[tuple[int, int, int], AbstractGradientEstimator] = {}

    def estimator_for(index: int, horizon: int, truncation: int) -> AbstractGradientEstimator:
        key = (index, horizon, truncation)
        if key not in estimators:
            if (index, horizon) not in systems:
                systems[index, horizon] = InnerTrainingSystem(
                    families[index], optimizer, horizon, meta_loss
                )
            system = systems[index, horizon]
            if isinstance(estimator, str):
                estimators[key] = make_estimator(
                    estimator,
                    system,
                    truncation,
                    sigma=sigma,
                    num_pairs=num_pairs,
                    vectorize=vectorize,
                )
            else:
                estimators[key] = estimator(system, truncation)
        return estimators[key]

    def save(step: int) -> None:
        if checkpoint is not None:
            save_atomic(
                {
                    "signature": _jsonable(signature),
                    "theta": {k: v.detach().clone() for k, v in leaves.items()},
                    "adam": adam_opt.state_dict(),
                    "states": states,
                    "generator": generator.get_state(),
                    "history": history,
                    "initial_theta": initial_theta,
                    "step": step,
                },
                checkpoint,
            )
        if history_path is not None:
            write_json_atomic(Path(history_path), history)

    bar = _progress(progress, num_steps, start)
    step = start
    try:
        for step in range(start, num_steps):
            t0 = time.perf_counter()
            index = step % len(families)
            horizon, truncation = schedule.at(step)
            est = estimator_for(index, horizon, truncation)
            theta_now = dict(leaves)
            if index not in states:
                states[index] = est.init(theta_now, generator)
            estimate, states[index] = est.estimate(theta_now, states[index], generator)
            grad = {k: estimate.grad[k].to(leaves[k]) for k in leaves}
            norm = math.sqrt(sum(float(g.double().square().sum()) for g in grad.values()))
            if not math.isfinite(norm):
                raise HypergradientError(
                    f"{where}: the meta-gradient of step {step} ({families[index].name}) is not "
                    f"finite. Lower meta_lr or sigma, or use estimator='pes'/'es'."
                )
            scale = 1.0 if clip_norm is None or norm <= clip_norm else clip_norm / norm
            for k, leaf in leaves.items():
                leaf.grad = grad[k] * scale
            if meta_lr_final is not None:
                cosine = 0.5 * (1 + math.cos(math.pi * step / num_steps))
                adam_opt.param_groups[0]["lr"] = meta_lr_final + (meta_lr - meta_lr_final) * cosine
            adam_opt.step()
            record = {
                "step": step,
                "family": families[index].name,
                "horizon": horizon,
                "truncation": truncation,
                "loss": float(estimate.loss),
                "grad_norm": norm,
                "seconds": time.perf_counter() - t0,
            }
            history.append(record)
            if bar is not None:
                bar[0].update(bar[1], advance=1, description=f"meta-loss {record['loss']:+.3f}")
            stop = callback is not None and bool(callback(step, record, dict(leaves)))
            done = step + 1
            if done % checkpoint_every == 0 or done == num_steps or stop:
                save(done)
            if stop:
                break
    finally:
        if bar is not None:
            bar[0].stop()
    if start >= num_steps:
        save(start)
    if plot_path is not None:
        plot_history(history, Path(plot_path))
    return MetaTrainResult(
        {k: v.detach().clone() for k, v in leaves.items()}, history, initial_theta
    )


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _progress(show: bool, total: int, completed: int):
    if not show:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    task = bar.add_task("meta-training", total=total, completed=completed)
    bar.start()
    return bar, task


def smoothed(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_history(history: Sequence[dict[str, Any]], path: Path, *, title: str | None = None):
    """PNG of the meta-loss (clipped log loss of the truncations) per family against the
    outer step, a trailing mean over whole episodes (about 1/20 of the run).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from hypergradient.learned import plot_history
        >>> history = [{"step": i, "family": "quadratic", "horizon": 4, "truncation": 2,
        ...             "loss": 1.0 / (i + 1)} for i in range(8)]
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_history(history, Path(folder) / "meta.png", title="tiny run")
        ...     print(sorted(p.name for p in Path(folder).iterdir()))
        ['meta.png']
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = list(dict.fromkeys(r["family"] for r in history))
    for i, name in enumerate(names):
        rows = [r for r in history if r["family"] == name]
        # whole episodes: a truncation's loss depends on where in its episode it falls
        per_episode = math.ceil(rows[-1]["horizon"] / rows[-1]["truncation"])
        window = per_episode * max(1, len(rows) // (20 * per_episode))
        ax.plot(
            [r["step"] for r in rows],
            smoothed([r["loss"] for r in rows], window),
            color=f"C{i % 10}",
            label=name,
        )
    ax.set_xlabel("outer step")
    ax.set_ylabel("meta-loss (mean log training loss of the truncation)")
    ax.set_title(title or "Meta-training")
    if names:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Evaluation.


@dataclass
class Evaluation:
    """Final full training losses of ``num_tasks`` seeded tasks, and their loss curves.

    Attributes:
        final_losses: per task, :meth:`Task.eval_loss` after ``num_steps`` updates.
        final_valid_losses: per task, the validation loss at the end (the family's
            ``eval_valid_loss`` when it has one, else the last step's validation loss).
        curves: per task, the mini-batch training loss of every step.

    Examples:
        >>> from hypergradient.learned import Evaluation
        >>> ev = Evaluation(final_losses=[1.0, 3.0], final_valid_losses=[1.5, 3.5],
        ...                 curves=[[2.0, 1.0], [4.0, 3.0]])
        >>> ev.mean, round(ev.mean_log, 2)  # mean final loss, mean log final loss (log 3 / 2)
        (2.0, 0.55)
    """

    final_losses: list[float]
    final_valid_losses: list[float]
    curves: list[list[float]]

    @property
    def mean(self) -> float:
        return sum(self.final_losses) / len(self.final_losses)

    @property
    def mean_log(self) -> float:
        return sum(math.log(max(x, 1e-30)) for x in self.final_losses) / len(self.final_losses)


def sample_tasks(
    family: AbstractTaskFamily, num_tasks: int, num_steps: int, seed: int
) -> list[Task]:
    """``num_tasks`` tasks of ``family`` from a generator seeded with ``seed`` (the same
    tasks for every optimizer compared).

    Examples:
        >>> import torch
        >>> from hypergradient.learned import NoisyQuadraticFamily, sample_tasks
        >>> family = NoisyQuadraticFamily(dim=3)
        >>> tasks = sample_tasks(family, num_tasks=2, num_steps=5, seed=0)
        >>> len(tasks), tasks[0].num_steps
        (2, 5)
        >>> again = sample_tasks(family, num_tasks=2, num_steps=5, seed=0)  # the same tasks
        >>> all(torch.equal(a.data["c"], b.data["c"]) for a, b in zip(tasks, again))
        True
    """
    where = "sample_tasks(...)"
    _check_int(where, "num_tasks", num_tasks)
    _check_int(where, "num_steps", num_steps)
    gen = torch.Generator().manual_seed(seed)
    return [family.sample(gen, num_steps) for _ in range(num_tasks)]


def _final(task: Task, params, num_steps: int) -> tuple[float, float]:
    with torch.no_grad():
        loss = float(task.eval_loss(params))
        family = task.family
        if hasattr(family, "eval_valid_loss"):
            valid = float(family.eval_valid_loss(params))
        else:
            valid = float(task.valid_loss(params, num_steps - 1))
    return (loss if math.isfinite(loss) else math.inf), valid


def evaluate_learned(
    optimizer: AbstractLearnedOptimizer,
    theta: Theta,
    tasks: Sequence[Task],
    num_steps: int,
) -> Evaluation:
    """Train every task for ``num_steps`` updates with the learned optimizer (functional
    update, progress :math:`t/T`, the losses it reads) and report the final losses.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import LinearLearnedOptimizer, NoisyQuadraticFamily
        >>> from hypergradient.learned import evaluate_learned, sample_tasks
        >>> tasks = sample_tasks(NoisyQuadraticFamily(dim=3, noise=0.0), 2, num_steps=10, seed=0)
        >>> lopt = LinearLearnedOptimizer()
        >>> zero = {"w": torch.zeros(4, 2), "b": torch.zeros(2)}  # the zero update
        >>> descent = {"w": torch.tensor([[-1.0, 0], [0, 0], [0, 0], [0, 0]]), "b": torch.zeros(2)}
        >>> before = evaluate_learned(lopt, zero, tasks, num_steps=10)
        >>> after = evaluate_learned(lopt, descent, tasks, num_steps=10)
        >>> before.final_losses == [task.eval_loss(task.params).item() for task in tasks]
        True
        >>> after.mean < before.mean
        True
    """
    _check_theta("evaluate_learned(...)", theta, optimizer)
    theta = {k: v.detach() for k, v in theta.items()}
    finals, valids, curves = [], [], []
    for task in tasks:
        state = {"opt": optimizer.init_state(task.params)}

        def update(params, grads, t, task=task, state=state):
            loss = task.loss(params, t)
            valid = task.valid_loss(params, t) if optimizer.uses_losses else None
            inputs = step_inputs(t / num_steps, loss, valid, like=loss)
            updates, state["opt"] = optimizer.update(theta, grads, params, state["opt"], inputs)
            return {k: params[k] + updates[k] for k in params}

        params, curve = train_task(task, update, num_steps)
        final, valid = _final(task, params, num_steps)
        finals.append(final)
        valids.append(valid)
        curves.append(curve)
    return Evaluation(finals, valids, curves)


def evaluate_adam(tasks: Sequence[Task], lr: float, num_steps: int) -> Evaluation:
    """Train every task for ``num_steps`` steps of Adam (``torch.optim.Adam``'s update,
    default betas) with learning rate ``lr``.

    Examples:
        >>> from hypergradient.learned import NoisyQuadraticFamily, evaluate_adam, sample_tasks
        >>> tasks = sample_tasks(NoisyQuadraticFamily(dim=3, noise=0.0), 2, num_steps=10, seed=0)
        >>> ev = evaluate_adam(tasks, lr=0.1, num_steps=10)
        >>> len(ev.final_losses), len(ev.curves[0])  # per task; per task and step
        (2, 10)
        >>> all(final < curve[0] for final, curve in zip(ev.final_losses, ev.curves))
        True
    """
    finals, valids, curves = [], [], []
    for task in tasks:
        tx = adam(lr=lr)
        state = {"opt": tx.init(task.params)}

        def update(params, grads, t, tx=tx, state=state):
            updates, state["opt"] = tx.update(grads, state["opt"], params)
            return {k: params[k] + updates[k] for k in params}

        params, curve = train_task(task, update, num_steps)
        final, valid = _final(task, params, num_steps)
        finals.append(final)
        valids.append(valid)
        curves.append(curve)
    return Evaluation(finals, valids, curves)


def tune_adam(
    tasks: Sequence[Task], lrs: Sequence[float], num_steps: int
) -> tuple[float, dict[float, Evaluation]]:
    """Adam with every learning rate of ``lrs`` on ``tasks``; the best is the one with the
    lowest mean final training loss (a diverged run counts as infinite).  Returns
    ``(best_lr, evaluations by lr)``.

    Examples:
        >>> from hypergradient.learned import NoisyQuadraticFamily, sample_tasks, tune_adam
        >>> tasks = sample_tasks(NoisyQuadraticFamily(dim=3, noise=0.0), 2, num_steps=10, seed=0)
        >>> best, results = tune_adam(tasks, [1e-3, 1e-1, 10.0], num_steps=10)
        >>> best, sorted(results)
        (0.1, [0.001, 0.1, 10.0])
    """
    if not lrs:
        raise HypergradientError("tune_adam(...): lrs must be a non-empty list of learning rates.")
    results = {float(lr): evaluate_adam(tasks, float(lr), num_steps) for lr in lrs}
    best = min(results, key=lambda lr: results[lr].mean)
    return best, results
