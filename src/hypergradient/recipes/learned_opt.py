r"""``hypergradient learned-opt``: meta-train a learned optimizer, then race it against Adam.

The experiment (Metz et al. 2019/2020 at CPU scale; :mod:`hypergradient.learned`):

1. **Meta-training.**  A learned optimizer (``architecture``: the per-parameter MLP or the
   hierarchical LSTM + MLP) is meta-trained on the task suite ``suite`` for ``steps`` outer
   steps, one family per step in turn (a family written ``SPEC*N`` takes ``N`` turns per
   cycle), by ``estimator`` (truncated backprop, ES, PES or the
   mixed estimator) over episodes of ``horizon`` inner steps cut into truncations of
   ``truncation`` steps (growing from ``initial_horizon`` over ``growth_steps`` when set),
   with Adam on :math:`\theta` (its learning rate decaying from ``meta_lr`` to
   ``meta_lr_final`` along a half cosine) and global-norm gradient clipping.
2. **Evaluation.**  For every family of ``suite`` and of ``unseen`` (families never used in
   meta-training, e.g. a wider network): ``eval_tasks`` held-out tasks (a seed meta-training
   does not use) are trained for ``horizon`` steps by the learned optimizer and by Adam with
   every learning rate of ``adam_grid``; the table compares the mean final full training
   loss with Adam's at its best learning rate for that family.

Suite entries: ``mlp:W:B`` (an MLP with one hidden layer of ``W`` units, batch ``B``, on
``dataset``), ``cnn:C:B`` (the small CNN with ``C`` channels), ``quadratic`` (20-d noisy
quadratics), ``fredholm`` (48-point Fredholm deblurring); a suffix ``*N`` gives a family of
the suite ``N`` outer steps per cycle instead of one (the default suite trains the narrowest
MLP and the CNN, the two families tuned Adam is hardest to beat on, twice as often).

Cost: each outer step is one truncation of one family (``particles * truncation`` inner
steps with their backward pass for ``tbptt``, twice as many forward-only steps for the ES
estimators); the defaults (``benchmarks/learned_optimizer.py``'s main run) took 7.5
minutes of meta-training on a lightly loaded 2-core machine, the evaluation 1.5 minutes more.

Files in the run folder: ``results.json``, ``meta_loss.png`` (meta-loss per family),
``comparison.png`` (final loss, learned vs tuned Adam, per family), ``history.json``,
``checkpoint.pt`` (``--resume`` continues the meta-training), ``theta.pt`` (the learned
optimizer: ``torch.load`` it and pass it to ``opt_fn``), ``config.toml``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from .. import learned
from .._errors import HypergradientError
from ._base import (
    ThreadedRecipe,
    machine,
    progress_bar,
    pyplot,
    register_recipe,
    write_results,
)
from ._config import (
    check_choice,
    check_data_dir,
    check_positive,
    check_positive_int,
    help_text,
    threads_field,
)

_EVAL_SEED = 10_000


@dataclass
class LearnedOptConfig:
    """Options of ``hypergradient learned-opt`` (defaults: about 9 minutes on 2 CPU cores)."""

    architecture: str = field(
        default="mlp",
        metadata=help_text("mlp (per-parameter MLP) or hierarchical (per-tensor LSTM + MLP)"),
    )
    hidden: int = field(default=32, metadata=help_text("width of the per-parameter MLP"))
    estimator: str = field(
        default="tbptt", metadata=help_text("meta-gradient estimator: tbptt, es, pes or mixed")
    )
    suite: list[str] = field(
        default_factory=lambda: [
            "mlp:16:32*2",
            "mlp:32:128",
            "mlp:64:32",
            "cnn:8:32*2",
            "quadratic",
            "fredholm",
        ],
        metadata=help_text(
            "meta-training families: mlp:WIDTH:BATCH, cnn:CHANNELS:BATCH (on dataset), "
            "quadratic, fredholm; FAMILY*N: N outer steps per cycle instead of 1"
        ),
    )
    unseen: list[str] = field(
        default_factory=lambda: ["mlp:128:32"],
        metadata=help_text("families only evaluated, never meta-trained on (same syntax)"),
    )
    dataset: str = field(
        default="digits",
        metadata=help_text("images of the mlp/cnn families: digits, mnist or fashion-mnist"),
    )
    data_dir: str | None = field(
        default=None,
        metadata=help_text("folder of the MNIST/Fashion-MNIST files (unused for digits)"),
    )
    downsample: int = field(
        default=1, metadata=help_text("average-pool the images by this factor (2: 14x14 MNIST)")
    )
    steps: int = field(default=1500, metadata=help_text("outer (meta) steps in total"))
    horizon: int = field(default=100, metadata=help_text("inner steps per episode"))
    truncation: int = field(default=25, metadata=help_text("inner steps per truncation"))
    initial_horizon: int | None = field(
        default=None,
        metadata=help_text("grow the horizon from this (none: constant horizon)"),
    )
    growth_steps: int = field(
        default=0, metadata=help_text("outer steps over which the horizon grows")
    )
    particles: int = field(
        default=4,
        metadata=help_text("tbptt: particles per family; es/pes/mixed: antithetic pairs"),
    )
    sigma: float = field(default=0.01, metadata=help_text("ES/PES/mixed perturbation scale"))
    meta_lr: float = field(default=3e-3, metadata=help_text("Adam learning rate on theta"))
    meta_lr_final: float | None = field(
        default=3e-4,
        metadata=help_text(
            "Adam's learning rate at the end of a half-cosine decay (none: constant)"
        ),
    )
    clip_norm: float = field(
        default=1.0, metadata=help_text("global-norm clipping of the meta-gradient")
    )
    meta_loss: str = field(
        default="full",
        metadata=help_text("meta-objective: full (training set), train (mini-batch), valid"),
    )
    eval_tasks: int = field(default=10, metadata=help_text("held-out tasks per family"))
    adam_grid: list[float] = field(
        default_factory=lambda: [1e-3 * 10 ** (k / 2) for k in range(7)],
        metadata=help_text("Adam learning rates of the baseline grid (1e-3 ... 1, half decades)"),
    )
    checkpoint_every: int = field(default=10, metadata=help_text("outer steps between saves"))
    seed: int = field(default=0, metadata=help_text("seed of theta's init and every task draw"))
    threads: int = threads_field()

    def validate(self) -> None:
        check_choice("architecture", self.architecture, sorted(learned.ARCHITECTURES))
        check_choice("estimator", self.estimator, learned.ESTIMATORS)
        check_choice("dataset", self.dataset, ("digits", "mnist", "fashion-mnist"))
        check_choice("meta_loss", self.meta_loss, ("full", "train", "valid"))
        check_data_dir(self.data_dir, holds="mnist/ or fashion-mnist/")
        for name in ("hidden", "downsample", "steps", "horizon", "truncation", "particles",
                     "eval_tasks", "checkpoint_every"):  # fmt: skip
            check_positive_int(name, getattr(self, name))
        check_positive_int("growth_steps", self.growth_steps, minimum=0)
        check_positive_int("seed", self.seed, minimum=0)
        check_positive_int("threads", self.threads, minimum=0)
        for name in ("sigma", "meta_lr", "clip_norm"):
            check_positive(name, getattr(self, name))
        if self.meta_lr_final is not None:
            check_positive("meta_lr_final", self.meta_lr_final)
            if self.meta_lr_final > self.meta_lr:
                raise HypergradientError(
                    f"option 'meta_lr_final': expected at most meta_lr = {self.meta_lr}, got "
                    f"{self.meta_lr_final}."
                )
        if self.truncation > self.horizon:
            raise HypergradientError(
                f"option 'truncation': expected at most horizon = {self.horizon}, got "
                f"{self.truncation}."
            )
        if self.initial_horizon is not None:
            check_positive_int("initial_horizon", self.initial_horizon)
            if self.initial_horizon > self.horizon:
                raise HypergradientError(
                    f"option 'initial_horizon': expected at most horizon = {self.horizon}, "
                    f"got {self.initial_horizon}."
                )
        if self.estimator == "mixed" and self.particles < 2:
            raise HypergradientError(
                "option 'particles': the mixed estimator needs at least 2 pairs, got "
                f"{self.particles}."
            )
        for option in ("suite", "unseen"):
            specs = getattr(self, option)
            if not isinstance(specs, list) or (option == "suite" and not specs):
                raise HypergradientError(
                    f"option {option!r}: expected a list of families such as "
                    f"mlp:32:128,quadratic, got {specs!r}."
                )
            for spec in specs:
                parse_family(option, split_weight(option, spec)[0] if option == "suite" else spec)
        if not isinstance(self.adam_grid, list) or not self.adam_grid:
            raise HypergradientError(
                f"option 'adam_grid': expected a non-empty list of learning rates, got "
                f"{self.adam_grid!r}."
            )
        for lr in self.adam_grid:
            check_positive("adam_grid", lr)


def split_weight(option: str, spec: object) -> tuple[object, int]:
    """``"cnn:8:32*2"`` -> ``("cnn:8:32", 2)`` (two outer steps per cycle); no suffix: 1."""
    if not isinstance(spec, str) or "*" not in spec:
        return spec, 1
    family, _, count = spec.rpartition("*")
    if not count.isdigit() or int(count) < 1:
        raise HypergradientError(
            f"option {option!r}: expected FAMILY*N with N an integer >= 1 (outer steps per "
            f"cycle), got {spec!r}."
        )
    return family, int(count)


def weighted_cycle(
    families: list[learned.AbstractTaskFamily], weights: list[int]
) -> list[learned.AbstractTaskFamily]:
    """The families in the order the outer steps visit them: family ``i`` ``weights[i]``
    times per cycle, round-robin (``[a, b]`` with weights ``[2, 1]``: ``[a, b, a]``), as in
    ``benchmarks/learned_optimizer.py``; ``meta_train`` takes entry ``step % len(cycle)``."""
    return [f for r in range(max(weights)) for f, w in zip(families, weights) if w > r]


def parse_family(option: str, spec: object) -> tuple[str, int, int]:
    """``"mlp:32:128"`` -> ``("mlp", 32, 128)``; ``"quadratic"`` -> ``("quadratic", 0, 0)``."""
    usage = "mlp:WIDTH:BATCH, cnn:CHANNELS:BATCH, quadratic or fredholm"
    if not isinstance(spec, str):
        raise HypergradientError(f"option {option!r}: expected {usage}, got {spec!r}.")
    parts = spec.split(":")
    if parts[0] in ("quadratic", "fredholm") and len(parts) == 1:
        return parts[0], 0, 0
    if parts[0] in ("mlp", "cnn") and len(parts) == 3:
        try:
            width, batch = int(parts[1]), int(parts[2])
        except ValueError:
            width = batch = 0
        if width >= 1 and batch >= 1:
            return parts[0], width, batch
    raise HypergradientError(f"option {option!r}: expected {usage}, got {spec!r}.")


def build_family(config: LearnedOptConfig, spec: str) -> learned.AbstractTaskFamily:
    kind, width, batch = parse_family("suite", spec)
    if kind == "quadratic":
        return learned.NoisyQuadraticFamily(dim=20)
    if kind == "fredholm":
        return learned.FredholmFamily(n=48)
    try:
        return learned.ClassifierFamily(
            config.dataset,
            kind,
            width=width,
            batch_size=batch,
            data_dir=config.data_dir,
            downsample=config.downsample,
        )
    except HypergradientError as err:
        raise HypergradientError(
            f"option 'dataset' = {config.dataset!r} (family {spec!r}): {err}"
        ) from None


def build_optimizer(config: LearnedOptConfig) -> learned.AbstractLearnedOptimizer:
    return learned.ARCHITECTURES[config.architecture](hidden=config.hidden)


@register_recipe
class LearnedOptRecipe(ThreadedRecipe):
    """Meta-train a learned optimizer (per-parameter MLP or hierarchical LSTM + MLP) on a
    suite of small tasks (digits MLPs and CNNs of several widths and batch sizes, noisy
    quadratics, Fredholm deblurring) with truncated backprop, ES, PES or the mixed
    estimator; then train held-out tasks of every family, and of families never seen, with
    it and with Adam at every learning rate of a grid, and compare the final training loss
    with Adam's at its best learning rate.

    Writes config.toml, results.json, meta_loss.png, comparison.png, history.json,
    checkpoint.pt and theta.pt into the run folder; --resume continues the meta-training
    from its checkpoint.
    """

    name = "learned-opt"
    help = "meta-train a learned optimizer on a task suite and race it against tuned Adam"
    config_cls = LearnedOptConfig

    def _run(self, config, run_dir, *, resume, progress, console):
        run_dir.mkdir(parents=True, exist_ok=True)
        weighted = [split_weight("suite", s) for s in config.suite]
        families = [build_family(config, spec) for spec, _ in weighted]
        held_out = [build_family(config, s) for s in config.unseen]
        lopt = build_optimizer(config)
        checkpoint = run_dir / "checkpoint.pt"
        if resume and not checkpoint.is_file():
            console.print(f"no checkpoint in {run_dir}: starting from the beginning")
        schedule = learned.TruncationSchedule(
            config.horizon, config.truncation, config.initial_horizon, config.growth_steps
        )
        with progress_bar(console, progress) as bar:
            task = bar.add_task("meta-training (outer steps)", total=config.steps)

            def on_step(step, record, theta):
                bar.update(task, completed=step + 1)

            result = learned.meta_train(
                lopt,
                weighted_cycle(families, [weight for _, weight in weighted]),
                config.steps,
                estimator=config.estimator,
                schedule=schedule,
                sigma=config.sigma,
                num_pairs=config.particles,
                meta_lr=config.meta_lr,
                meta_lr_final=config.meta_lr_final,
                clip_norm=config.clip_norm,
                meta_loss=config.meta_loss,
                seed=config.seed,
                checkpoint=checkpoint,
                checkpoint_every=config.checkpoint_every,
                resume=resume,
                history_path=run_dir / "history.json",
                plot_path=run_dir / "meta_loss.png",
                callback=on_step,
            )
            torch.save(result.theta, run_dir / "theta.pt")
            everything = families + held_out
            task = bar.add_task("evaluation (families)", total=len(everything))
            rows = []
            for family in everything:
                rows.append(evaluate_family(config, lopt, result.theta, family))
                rows[-1]["unseen"] = family not in families
                bar.advance(task)
        beaten = [r["family"] for r in rows if r["ratio"] < 1]
        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": machine(),
            "num_meta_parameters": learned.num_meta_parameters(lopt),
            "meta_train_seconds": sum(r["seconds"] for r in result.history),
            "final_meta_loss": {f.name: _last_mean(result.history, f.name) for f in families},
            "families": rows,
            "beats_tuned_adam_on": beaten,
        }
        write_results(run_dir, results)
        plot_comparison(results, run_dir / "comparison.png")
        console.print(results_table(results))
        console.print(
            f"learned optimizer below tuned Adam on {len(beaten)} of {len(rows)} families. "
            f"Wrote results.json, meta_loss.png, comparison.png, theta.pt to {run_dir}."
        )
        return results


def _last_mean(history: list[dict], family: str) -> float | None:
    losses = [r["loss"] for r in history if r["family"] == family]
    tail = losses[-max(1, len(losses) // 10) :]
    return statistics.fmean(tail) if tail else None


def evaluate_family(
    config: LearnedOptConfig, lopt: learned.AbstractLearnedOptimizer, theta, family
) -> dict[str, Any]:
    """Learned optimizer and Adam over the grid on ``eval_tasks`` held-out tasks."""
    tasks = learned.sample_tasks(family, config.eval_tasks, config.horizon, _EVAL_SEED)
    ev = learned.evaluate_learned(lopt, theta, tasks, config.horizon)
    best_lr, by_lr = learned.tune_adam(tasks, config.adam_grid, config.horizon)
    best = by_lr[best_lr]
    return {
        "family": family.name,
        "initial_loss": statistics.fmean(float(t.eval_loss(t.params)) for t in tasks),
        "learned_mean": ev.mean,
        "learned": ev.final_losses,
        "adam_best_lr": best_lr,
        "adam_best_mean": best.mean,
        "adam_best": best.final_losses,
        "adam_by_lr": {repr(lr): e.mean for lr, e in by_lr.items()},
        "ratio": ev.mean / best.mean if best.mean > 0 else float("inf"),
        "wins": sum(a < b for a, b in zip(ev.final_losses, best.final_losses)),
    }


def results_table(results: dict) -> Table:
    config = results["config"]
    table = Table(
        title=f"Learned optimizer ({config['architecture']}, {config['estimator']}, "
        f"{config['steps']} meta-steps) vs Adam with the best of {len(config['adam_grid'])} "
        f"learning rates: training loss after {config['horizon']} steps, mean of "
        f"{config['eval_tasks']} held-out tasks"
    )
    for col in ("family", "initial", "learned", "Adam (best lr)", "best lr", "ratio", "won"):
        table.add_column(col, justify="left" if col == "family" else "right")
    for r in results["families"]:
        table.add_row(
            r["family"] + (" (unseen)" if r["unseen"] else ""),
            f"{r['initial_loss']:.4g}",
            f"{r['learned_mean']:.4g}",
            f"{r['adam_best_mean']:.4g}",
            f"{r['adam_best_lr']:g}",
            f"{r['ratio']:.2f}",
            f"{r['wins']}/{config['eval_tasks']}",
        )
    return table


def plot_comparison(results: dict, path: Path) -> None:
    """Final training loss per family: learned optimizer against Adam at its best lr."""
    plt = pyplot()
    rows = results["families"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 4.3))
    ax.bar([x - 0.2 for x in xs], [r["learned_mean"] for r in rows], 0.4, label="learned")
    ax.bar([x + 0.2 for x in xs], [r["adam_best_mean"] for r in rows], 0.4, label="Adam, best lr")
    labels = [r["family"] + (" *" if r["unseen"] else "") for r in rows]
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"training loss after {results['config']['horizon']} steps")
    ax.set_title("Held-out tasks (* never seen in meta-training)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
