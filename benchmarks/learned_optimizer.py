"""A learned optimizer meta-trained on a small task suite against Adam tuned per family.

Metz et al. (2019, 2020) at CPU scale (papers.md sections 15 and 17).  The learned optimizer
is ``hypergradient.learned.MLPLearnedOptimizer`` (a per-parameter MLP over gradient,
weight, momentum and second-moment features at 4 decays and the training progress; stable
output ``1e-2 * d * exp(1e-2 * m)``), meta-trained by truncated back-propagation (T = 100
inner steps per episode, truncations of K = 25, 4 particles per family, Adam on theta from
3e-3 down to 3e-4 along a half cosine, global-norm clipping 1, meta-loss = mean log full
training loss) on the suite

* digits MLPs 64-16-10 (batch 32), 64-32-10 (batch 128), 64-64-10 (batch 32);
* a digits CNN (two 3x3 convolutions with 8 channels, batch 32);
* noisy quadratics (d = 20, curvatures log-uniform over [1e-2, 1], target noise 0.3);
* Fredholm deblurring (48 unknowns, Gaussian kernel of width 0.04-0.1, 5% noise),

the narrowest MLP and the CNN two outer steps per cycle of 8, the other families one
(``--weights``), for 1,500 outer steps.  (With one step per family and cycle and 900 outer
steps, tuned Adam kept the lower mean on the narrowest MLP and the CNN.)  Evaluation on 10
*held-out* tasks per family (new random example subsets, initialisations and batch orders;
a seed meta-training never used):
the full training loss after T = 100 steps of the learned optimizer against Adam with each
learning rate of a 7-point grid (1e-3 ... 1), the best one picked per family on those very
tasks (generous to Adam).  Generalisation: the same comparison on a digits MLP 64-128-10,
a width never seen in meta-training (and, with ``--data-dir``, a Fashion-MNIST MLP).

``--compare`` adds a study of the estimators: a fresh optimizer meta-trained on one family
(digits MLP 64-32-10, batch 32) for the same number of outer steps and inner steps per
step by truncated backprop, truncated ES, PES and the mixed estimator (and the
hierarchical architecture by truncated backprop).

Run from the repository root::

    PYTHONPATH=src python benchmarks/learned_optimizer.py --compare   # ~18 minutes
    PYTHONPATH=src python benchmarks/learned_optimizer.py --quick     # ~2 minutes

Writes ``<out>/learned_optimizer.{json,md,png}``; the meta-training checkpoint and the
final theta go to ``--work`` (default: a folder in the temporary directory), where
``--resume`` continues an interrupted meta-training.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from hypergradient import learned
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hypergradient import learned
from _common import machine_info
from hypergradient.learned.meta_training import smoothed
from hypergradient.recipes.learned_opt import weighted_cycle as recipe_cycle

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "hypergradient-learned-optimizer"
ADAM_GRID = [1e-3 * 10 ** (k / 2) for k in range(7)]  # 1e-3 ... 1, half decades
EVAL_SEED = 10_000  # held-out tasks; meta-training draws from a generator seeded 0


def suite() -> list[learned.AbstractTaskFamily]:
    return [
        learned.ClassifierFamily("digits", "mlp", width=16, batch_size=32),
        learned.ClassifierFamily("digits", "mlp", width=32, batch_size=128),
        learned.ClassifierFamily("digits", "mlp", width=64, batch_size=32),
        learned.ClassifierFamily("digits", "cnn", width=8, batch_size=32),
        learned.NoisyQuadraticFamily(dim=20),
        learned.FredholmFamily(n=48),
    ]


def unseen(data_dir: str | None) -> list[learned.AbstractTaskFamily]:
    families: list[learned.AbstractTaskFamily] = [
        learned.ClassifierFamily("digits", "mlp", width=128, batch_size=32)
    ]
    if data_dir is not None:
        families.append(
            learned.ClassifierFamily(
                "fashion-mnist", "mlp", width=32, batch_size=32, data_dir=data_dir, downsample=2
            )
        )
    return families


def compare_one(
    lopt: learned.AbstractLearnedOptimizer, theta: dict, family, tasks, horizon: int
) -> dict:
    """Learned optimizer vs Adam over the grid on the same held-out tasks."""
    t0 = time.perf_counter()
    ev = learned.evaluate_learned(lopt, theta, tasks, horizon)
    learned_seconds = time.perf_counter() - t0
    best_lr, by_lr = learned.tune_adam(tasks, ADAM_GRID, horizon)
    best = by_lr[best_lr]
    init = [float(t.eval_loss(t.params)) for t in tasks]
    wins = sum(a < b for a, b in zip(ev.final_losses, best.final_losses))
    return {
        "family": family.name,
        "initial_loss": statistics.fmean(init),
        "learned": ev.final_losses,
        "learned_mean": ev.mean,
        "learned_std": statistics.stdev(ev.final_losses),
        "learned_valid_mean": statistics.fmean(ev.final_valid_losses),
        "adam_best_lr": best_lr,
        "adam_best": best.final_losses,
        "adam_best_mean": best.mean,
        "adam_best_std": statistics.stdev(best.final_losses),
        "adam_best_valid_mean": statistics.fmean(best.final_valid_losses),
        "adam_by_lr": {f"{lr:.4g}": e.mean for lr, e in by_lr.items()},
        "ratio": ev.mean / best.mean,
        "wins": wins,
        "num_tasks": len(tasks),
        "learned_curve": [statistics.fmean(c[t] for c in ev.curves) for t in range(horizon)],
        "adam_curve": [statistics.fmean(c[t] for c in best.curves) for t in range(horizon)],
        "learned_eval_seconds": learned_seconds,
    }


def weighted_cycle(
    families: list[learned.AbstractTaskFamily], weights: list[int]
) -> list[learned.AbstractTaskFamily]:
    """The order the outer steps visit the families in: family ``i`` ``weights[i]`` times per
    cycle, round-robin (the recipe's ``FAMILY*N`` suite entries)."""
    if len(weights) != len(families) or any(w < 1 for w in weights):
        raise SystemExit(
            f"--weights needs {len(families)} integers >= 1 (one per family of the suite: "
            f"{', '.join(f.name for f in families)}), got {weights}."
        )
    return recipe_cycle(families, weights)


def meta_train_main(args) -> tuple:
    lopt = learned.MLPLearnedOptimizer(hidden=args.hidden)
    families = suite()
    schedule = learned.TruncationSchedule(horizon=args.horizon, truncation_length=args.truncation)
    t0 = time.perf_counter()
    result = learned.meta_train(
        lopt,
        weighted_cycle(families, args.weights),
        args.steps,
        estimator="tbptt",
        schedule=schedule,
        num_pairs=args.particles,
        meta_lr=args.meta_lr,
        meta_lr_final=args.meta_lr / 10,
        clip_norm=1.0,
        seed=0,
        checkpoint=Path(args.work) / "checkpoint.pt",
        resume=args.resume,
        progress=not args.no_progress,
    )
    wall = time.perf_counter() - t0
    return lopt, families, result, wall


def estimator_study(args) -> list[dict]:
    """Each estimator meta-trains a fresh optimizer on one family for the same budget."""
    family = learned.ClassifierFamily("digits", "mlp", width=32, batch_size=32)
    tasks = learned.sample_tasks(family, args.tasks, args.horizon, EVAL_SEED)
    schedule = learned.TruncationSchedule(horizon=args.horizon, truncation_length=args.truncation)
    runs = [
        ("tbptt", "mlp", {"num_pairs": args.particles}),
        ("es", "mlp", {"num_pairs": args.particles, "sigma": 0.01}),
        ("pes", "mlp", {"num_pairs": args.particles, "sigma": 0.01}),
        ("mixed", "mlp", {"num_pairs": args.particles, "sigma": 0.01}),
        ("tbptt", "hierarchical", {"num_pairs": args.particles}),
    ]
    best_lr, by_lr = learned.tune_adam(tasks, ADAM_GRID, args.horizon)
    rows = []
    for estimator, arch, kwargs in runs:
        lopt = (
            learned.MLPLearnedOptimizer(hidden=args.hidden)
            if arch == "mlp"
            else learned.HierarchicalLearnedOptimizer(hidden=args.hidden)
        )
        t0 = time.perf_counter()
        result = learned.meta_train(
            lopt,
            [family],
            args.compare_steps,
            estimator=estimator,
            schedule=schedule,
            meta_lr=args.meta_lr,
            meta_lr_final=args.meta_lr / 10,
            clip_norm=1.0,
            seed=0,
            progress=not args.no_progress,
            **kwargs,
        )
        seconds = time.perf_counter() - t0
        ev = learned.evaluate_learned(lopt, result.theta, tasks, args.horizon)
        rows.append(
            {
                "estimator": estimator,
                "architecture": arch,
                "num_meta_parameters": learned.num_meta_parameters(lopt),
                "particles": kwargs["num_pairs"] * (1 if estimator == "tbptt" else 2),
                "outer_steps": args.compare_steps,
                "truncation": args.truncation,
                "seconds": seconds,
                "held_out_mean": ev.mean,
                "held_out_std": statistics.stdev(ev.final_losses),
                "meta_loss": [r["loss"] for r in result.history],
            }
        )
        print(f"{estimator:>6} {arch:>12}: held-out loss {ev.mean:.4f}  ({seconds:.0f} s)")
    return [
        {
            "family": family.name,
            "adam_best_lr": best_lr,
            "adam_best_mean": by_lr[best_lr].mean,
            "runs": rows,
        }
    ]


# ------------------------------------------------------------------------------ reporting


def _fmt(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.2e}"


def markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    load = m["load_average_at_start"][0] if m["load_average_at_start"] else float("nan")
    lines = [
        "### Learned optimizer vs tuned Adam (`benchmarks/learned_optimizer.py`)",
        "",
        f"{m['date']}; {m['cpu_model']}, {m['cpu_count']} CPUs; torch {m['torch']} "
        f"({m['torch_threads']} thread), Python {m['python']}; 1-minute load average at the "
        f"start {load:.2f}. Command: `{result['command']}`.",
        "",
        f"Meta-training: {cfg['steps']} outer steps of truncated backprop (T = {cfg['horizon']}, "
        f"K = {cfg['truncation']}, {cfg['particles']} particles, Adam {cfg['meta_lr']:g} -> "
        f"{cfg['meta_lr'] / 10:g}, clip 1) over {len(result['suite'])} families, "
        f"{result['meta_train_seconds']:.0f} s wall; "
        f"{result['num_meta_parameters']:,} meta-parameters.  Final full training loss "
        f"after {cfg['horizon']} steps, mean ± sd over {cfg['tasks']} held-out tasks per "
        f"family; Adam's learning rate is the best of {len(ADAM_GRID)} (1e-3 ... 1) on those "
        f"tasks.",
        "",
        "| family | initial | learned | Adam, best lr | best lr | learned / Adam | tasks won |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["comparison"]:
        name = row["family"] + (" (never seen)" if row["unseen"] else "")
        lines.append(
            f"| {name} | {_fmt(row['initial_loss'])} | {_fmt(row['learned_mean'])} ± "
            f"{_fmt(row['learned_std'])} | {_fmt(row['adam_best_mean'])} ± "
            f"{_fmt(row['adam_best_std'])} | {row['adam_best_lr']:.3g} | {row['ratio']:.2f} | "
            f"{row['wins']}/{row['num_tasks']} |"
        )
    lines += ["", result["verdict"], ""]
    if result.get("estimators"):
        study = result["estimators"][0]
        lines += [
            f"Estimators: a fresh optimizer meta-trained on {study['family']} only, "
            f"{cfg['compare_steps']} outer steps each (truncated backprop: {cfg['particles']} "
            f"particles with a backward pass; ES, PES, mixed: {cfg['particles']} antithetic "
            f"pairs; sigma 0.01), held-out final loss (Adam with the best lr "
            f"{study['adam_best_lr']:.3g}: {_fmt(study['adam_best_mean'])}):",
            "",
            "| estimator | architecture | particles | held-out loss | meta-train time |",
            "|---|---|---:|---:|---:|",
        ]
        for r in study["runs"]:
            lines.append(
                f"| {r['estimator']} | {r['architecture']} ({r['num_meta_parameters']:,}) | "
                f"{r['particles']} | {_fmt(r['held_out_mean'])} ± {_fmt(r['held_out_std'])} | "
                f"{r['seconds']:.0f} s |"
            )
        lines.append("")
    return "\n".join(lines)


def episode_window(rows: list[dict]) -> int:
    """A smoothing window of whole episodes (the meta-loss of a truncation depends on where
    in its episode it falls), about 1/20 of the run."""
    per_episode = math.ceil(rows[-1]["horizon"] / rows[-1]["truncation"]) if rows else 1
    return per_episode * max(1, len(rows) // (20 * per_episode))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(11.5, 8.6))
    axes = grid.reshape(-1)
    ax = axes[0]
    history = result["history"]
    for i, name in enumerate(result["suite"]):
        rows = [r for r in history if r["family"] == name]
        window = episode_window(rows)
        ax.plot(
            [r["step"] for r in rows],
            smoothed([r["loss"] for r in rows], window),
            color=f"C{i}",
            label=name,
        )
    ax.set_xlabel("outer step")
    ax.set_ylabel("meta-loss (mean log full training loss)")
    ax.set_title("Meta-training (truncated backprop)")
    ax.legend(fontsize=7)

    ax = axes[1]
    rows = result["comparison"]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["learned_mean"] for r in rows], 0.4, label="learned")
    ax.bar([x + 0.2 for x in xs], [r["adam_best_mean"] for r in rows], 0.4, label="Adam, best lr")
    ax.set_yscale("log")
    ax.set_xticks(
        list(xs),
        [r["family"] + ("*" if r["unseen"] else "") for r in rows],
        rotation=35,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel(f"training loss after {result['config']['horizon']} steps")
    ax.set_title("Held-out tasks (* never seen)")
    ax.legend(fontsize=8)

    ax = axes[2]
    for i, row in enumerate(r for r in rows if r["unseen"] or r["family"].startswith("digits")):
        color = f"C{i}"
        ax.plot(row["learned_curve"], color=color, label=f"{row['family']}: learned")
        ax.plot(row["adam_curve"], color=color, ls=":", label=f"Adam {row['adam_best_lr']:.2g}")
    ax.set_yscale("log")
    ax.set_xlabel("inner step")
    ax.set_ylabel("mini-batch training loss (mean of tasks)")
    ax.set_title("Training curves (dotted: tuned Adam)")
    ax.legend(fontsize=6)

    if result.get("estimators"):
        ax = axes[3]
        study = result["estimators"][0]
        for i, r in enumerate(study["runs"]):
            window = episode_window(
                [{"horizon": result["config"]["horizon"], "truncation": r["truncation"]}]
                * len(r["meta_loss"])
            )
            ax.plot(
                smoothed(r["meta_loss"], window),
                color=f"C{i}",
                label=f"{r['estimator']} ({r['architecture']})",
            )
        ax.set_xlabel("outer step")
        ax.set_ylabel("meta-loss of the truncations")
        ax.set_title(f"Estimators on {study['family']}")
        ax.legend(fontsize=8)
    else:
        axes[3].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="120 outer steps, 5 tasks")
    parser.add_argument("--steps", type=int, default=None, help="outer steps (default 1500)")
    parser.add_argument("--horizon", type=int, default=100, help="inner steps T (default 100)")
    parser.add_argument("--truncation", type=int, default=25, help="truncation K (default 25)")
    parser.add_argument("--particles", type=int, default=4, help="particles (default 4)")
    parser.add_argument("--hidden", type=int, default=32, help="MLP width (default 32)")
    parser.add_argument("--meta-lr", type=float, default=3e-3, help="Adam lr on theta")
    parser.add_argument(
        "--weights",
        type=lambda text: [int(w) for w in text.split(",")],
        default=[2, 1, 1, 2, 1, 1],
        help="outer steps per cycle for each family of the suite, comma-separated "
        "(default 2,1,1,2,1,1: the narrowest MLP and the CNN twice)",
    )
    parser.add_argument("--tasks", type=int, default=None, help="held-out tasks (default 10)")
    parser.add_argument("--compare", action="store_true", help="also compare the estimators")
    parser.add_argument("--compare-steps", type=int, default=150, help="outer steps each")
    parser.add_argument("--data-dir", default=None, help="MNIST/Fashion-MNIST folder")
    parser.add_argument("--resume", action="store_true", help="continue the meta-training")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    parser.add_argument(
        "--work", default=str(DEFAULT_WORK), help="checkpoint and theta folder (--resume)"
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (120 if args.quick else 1500)
    args.tasks = args.tasks or (5 if args.quick else 10)
    if args.quick:
        args.compare_steps = min(args.compare_steps, 30)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    machine = machine_info(threads=args.threads)

    lopt, families, result, wall = meta_train_main(args)
    # the outer steps' own time, kept in the checkpoint (a resumed run reports it whole)
    meta_seconds = sum(r["seconds"] for r in result.history)
    comparison = []
    for family in families + unseen(args.data_dir):
        tasks = learned.sample_tasks(family, args.tasks, args.horizon, EVAL_SEED)
        row = compare_one(lopt, result.theta, family, tasks, args.horizon)
        row["unseen"] = family not in families
        comparison.append(row)
        print(
            f"{family.name:>24}: learned {row['learned_mean']:.4g}  "
            f"Adam({row['adam_best_lr']:.2g}) {row['adam_best_mean']:.4g}  "
            f"ratio {row['ratio']:.2f}  wins {row['wins']}"
        )
    beaten = [r["family"] for r in comparison if r["ratio"] < 1]
    lost = [r["family"] for r in comparison if r["ratio"] >= 1]
    verdict = (
        f"The learned optimizer has the lower mean final training loss on "
        f"{len(beaten)} of {len(comparison)} families"
        + (f" ({', '.join(beaten)})" if beaten else "")
        + (f"; tuned Adam wins on {', '.join(lost)}." if lost else "; on every family.")
    )
    print(verdict)
    report = {
        "command": "python benchmarks/learned_optimizer.py "
        + " ".join(a for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine,
        "config": {
            "steps": args.steps,
            "horizon": args.horizon,
            "truncation": args.truncation,
            "particles": args.particles,
            "hidden": args.hidden,
            "meta_lr": args.meta_lr,
            "weights": args.weights,
            "tasks": args.tasks,
            "compare_steps": args.compare_steps,
            "adam_grid": ADAM_GRID,
        },
        "suite": [f.name for f in families],
        "num_meta_parameters": learned.num_meta_parameters(lopt),
        "meta_train_seconds": meta_seconds,
        "meta_train_wall_seconds_this_call": wall,
        "history": result.history,
        "comparison": comparison,
        "verdict": verdict,
    }
    if args.compare:
        report["estimators"] = estimator_study(args)
    torch.save(result.theta, Path(args.work) / "theta.pt")
    (out / "learned_optimizer.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "learned_optimizer.md").write_text(markdown(report))
    plot(report, out / "learned_optimizer.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
