"""Self-training run long: does the improvement rate accelerate?  Three outer loops.

Metz, Freeman, Maheswaranathan, Sohl-Dickstein (2021) at CPU scale (papers.md section 16).
A population of N = 8 tiny per-parameter linear learned optimizers
(``hypergradient.learned.LinearLearnedOptimizer``: features g, m_0.9, m_0.99, rms_0.99 ->
direction and log-magnitude, 10 meta-parameters, update ``a * d * exp(b * m)`` with the
defaults a = 1e-2, b = 0.1), drawn at random, is outer-trained on digits MLPs (64-8-10
batch 32 and 64-16-10 tanh batch 16 in turn, random 128-example subsets, T inner steps,
meta-loss = mean clipped log full training loss over the episode) with antithetic ES over
whole episodes (``--pairs`` pairs, sigma 0.1, all members in one vmapped batch:
``self_train(batch_population=True)``) and PBT every 20 outer steps.  Three outer loops,
all from the same random initial population per seed, at *equal compute*: every outer
step of every loop costs the same 2 S N T inner training steps (the ES estimate; the outer
update itself is negligible), so equal outer steps are equal inner-step counts; wall time
is recorded too.

* ``self``: the best member's learned optimizer performs every member's outer update (no
  learning rate);
* ``adam``: Adam on the ES estimate (the paper's Adam-outer-trained comparison);
* ``sgd``: plain SGD on the ES estimate (the paper's control).

Protocol (nothing chosen on the scored tasks):

* meta-validation: the Adam and SGD learning rates are tuned by short runs
  (``--tune-steps``) of a separate tuning population (seed 100) scored on
  meta-validation tasks (held-out tasks drawn with seed 777);
* meta-test: the long runs (``--steps``, seeds ``--seeds``) are evaluated every
  ``--eval-every`` steps on other held-out tasks (seed 12345), never trained on and never
  used for a choice.

The rate of improvement: per run, the ordinary least-squares slope of the held-out
meta-loss (a mean log loss: log space) against outer steps over the first and the last
third of the run; acceleration = late slope - early slope (< 0: the loss falls faster late
than early, the paper's positive feedback).  95% confidence intervals by bootstrap over
seeds (2000 resamples of the seed-mean curve).

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/self_training.py --seeds 0 1 2
    PYTHONPATH=src python benchmarks/self_training.py --quick --out /tmp/q  # smoke run

Writes ``<out>/self_training.{json,md,png}``; finished runs are kept in ``--work`` and
reused (so seeds can be run by parallel processes first, then assembled).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

try:
    from hypergradient import learned
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hypergradient import learned
from _common import load_cache, machine_info, rerun_command, save_cache

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "hypergradient-self-training"
GRIDS = {"sgd": (0.1, 0.3, 1.0, 3.0, 10.0), "adam": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)}
TUNE_SEED = 100  # the tuning population
VAL_TASKS_SEED = 777  # meta-validation tasks (tuning)
TEST_TASKS_SEED = 12345  # meta-test tasks (the scored curves)
OUTERS = ("self", "adam", "sgd")
#: what defines a run (a cached run with other values is not reused)
SETTINGS = ("steps", "population", "horizon", "pairs", "pbt_every", "eval_every", "seed")


def run(args, label: str, work: Path, **kwargs) -> learned.SelfTrainingResult:
    """One self_train run; a finished run is kept in ``work`` and reused by a later call
    with the same settings."""
    cache = work / (label.replace(" ", "_").replace("=", "").replace(",", "") + ".pt")
    if cache.is_file() and "checkpoint" not in kwargs:
        saved = load_cache(cache)
        if all(saved["args"].get(k) == getattr(args, k) for k in SETTINGS):
            print(f"{label:>28}: reused {cache}", flush=True)
            return saved["result"]
    common = {
        "population_size": args.population,
        "num_steps": args.steps,
        "horizon": args.horizon,
        "num_pairs": args.pairs,
        "pbt_every": args.pbt_every,
        "eval_every": args.eval_every,
        "eval_tasks": 4,
        "batch_population": True,
        "progress": not args.no_progress,
        "generator": torch.Generator().manual_seed(args.seed),
    }
    common.update(kwargs)
    result = learned.self_train(**common)
    print(
        f"{label:>28}: best held-out meta-loss {result.evaluations[-1]['best']:+.3f}, "
        f"mean {result.evaluations[-1]['mean']:+.3f} ({seconds(result):.0f} s)",
        flush=True,
    )
    work.mkdir(parents=True, exist_ok=True)
    save_cache({"args": {k: getattr(args, k) for k in SETTINGS}, "result": result}, cache)
    return result


def seconds(result: learned.SelfTrainingResult) -> float:
    """The outer steps' own time (evaluations excluded)."""
    return sum(r["seconds"] for r in result.history)


def update_norm(result: learned.SelfTrainingResult, *, early: bool) -> float:
    """Mean outer-step size over the members and the first (last) tenth of the steps."""
    tenth = max(1, len(result.history) // 10)
    records = result.history[:tenth] if early else result.history[-tenth:]
    return float(np.mean([np.mean(r["update_norm"]) for r in records]))


def tune(args, work: Path) -> dict:
    """Adam and SGD learning rates on meta-validation tasks: short runs of the tuning
    population, the lowest final population-mean meta-validation loss wins."""
    tune_args = argparse.Namespace(**{**vars(args), "steps": args.tune_steps, "seed": TUNE_SEED})
    out = {}
    for outer, grid in GRIDS.items():
        scores = {}
        for lr in grid:
            result = run(
                tune_args,
                f"tune {outer} lr={lr}",
                work / "tune",
                outer=outer,
                outer_lr=lr,
                eval_seed=VAL_TASKS_SEED,
            )
            scores[lr] = result.evaluations[-1]["mean"]
        best = min(grid, key=lambda lr: scores[lr] if math.isfinite(scores[lr]) else math.inf)
        out[outer] = {"lr": best, "scores": {str(lr): s for lr, s in scores.items()}}
    return out


def window_slopes(steps: np.ndarray, losses: np.ndarray) -> tuple[float, float, float]:
    """OLS slopes (per outer step) of ``losses`` over the first, middle and last third."""
    third = steps[-1] / 3
    windows = (
        steps <= third,
        (steps >= third) & (steps <= 2 * third),
        steps >= 2 * third,
    )
    return tuple(float(np.polyfit(steps[w], losses[w], 1)[0]) for w in windows)


def rate_fit(curves: np.ndarray, steps: np.ndarray, *, resamples: int = 2000) -> dict:
    """Early/late slopes of the seed-mean curve, their difference, and bootstrap CIs over
    seeds; ``curves`` is ``(seeds, points)``."""
    rng = np.random.default_rng(0)
    early, middle, late = window_slopes(steps, curves.mean(axis=0))
    boot = []
    for _ in range(resamples):
        pick = rng.integers(0, len(curves), len(curves))
        e, m, l = window_slopes(steps, curves[pick].mean(axis=0))
        boot.append((e, m, l, l - e))
    lo, hi = np.percentile(np.array(boot), [2.5, 97.5], axis=0)
    per_seed = [window_slopes(steps, c) for c in curves]
    return {
        "early": early,
        "middle": middle,
        "late": late,
        "acceleration": late - early,
        "early_ci": [float(lo[0]), float(hi[0])],
        "middle_ci": [float(lo[1]), float(hi[1])],
        "late_ci": [float(lo[2]), float(hi[2])],
        "acceleration_ci": [float(lo[3]), float(hi[3])],
        "per_seed": [list(p) for p in per_seed],
        "seeds_accelerating": sum(p[2] < p[0] for p in per_seed),
    }


def verdict_for(fit: dict) -> str:
    lo, hi = fit["acceleration_ci"]
    if hi < 0:
        return "accelerates"
    if lo > 0:
        return "decelerates"
    return "no significant change"


def plot(report: dict, curves: dict, steps: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, which in zip(axes[:2], ("mean", "best")):
        for c, outer in enumerate(OUTERS):
            data = curves[outer][which]
            for row in data:
                ax.plot(steps, row, color=f"C{c}", lw=0.6, alpha=0.4)
            label = outer if outer == "self" else f"{outer} (lr {report['tuned'][outer]['lr']})"
            ax.plot(steps, data.mean(axis=0), color=f"C{c}", lw=2, label=label)
        ax.set_xlabel("outer step (equal inner-step compute per step in every loop)")
        ax.set_ylabel("meta-test meta-loss (mean clipped log loss)")
        ax.set_title("population mean" if which == "mean" else "best member")
        ax.legend(fontsize=8)
    ax = axes[2]
    for c, outer in enumerate(OUTERS):
        fit = report["fits"][outer]["mean"]
        for k, window in enumerate(("early", "middle", "late")):
            lo, hi = fit[f"{window}_ci"]
            x = c + 0.2 * (k - 1)
            ax.errorbar(
                x,
                fit[window],
                yerr=[[fit[window] - lo], [hi - fit[window]]],
                fmt="o^s"[k],
                color=f"C{c}",
                capsize=3,
            )
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(range(len(OUTERS)), [f"{o}\n(thirds: o, ^, s)" for o in OUTERS])
    ax.set_ylabel("slope of population-mean meta-loss per outer step (95% CI)")
    ax.set_title("rate of improvement: first, middle, last third")
    fig.suptitle(
        f"Self-training vs Adam-outer vs SGD-outer, {len(report['config']['seeds'])} seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        f"Self-training at equal compute: N = {config['population']} members, "
        f"{config['steps']} outer steps, T = {config['horizon']} inner steps, "
        f"{config['pairs']} ES pairs (sigma 0.1), PBT every {config['pbt_every']}; every outer "
        f"step of every loop costs {config['inner_steps_per_outer_step']} inner training steps "
        f"(ES over whole episodes), {config['inner_steps_per_outer_step'] * config['steps']:,} "
        f"per run. Tasks: {config['families']}. Meta-loss: mean clipped log full training loss "
        f"over the episode, on 4 meta-test tasks per family (held-out seed "
        f"{TEST_TASKS_SEED}), lower is better. Seeds {config['seeds']} (one random initial "
        f"population each, shared by the three loops).",
        "",
        f"Learning rates tuned on meta-validation tasks (held-out seed {VAL_TASKS_SEED}), by "
        f"{config['tune_steps']}-step runs of a separate population (seed {TUNE_SEED}); "
        f"criterion: final population-mean meta-validation loss. Self-training has no "
        f"learning rate (a = 1e-2, b = 0.1, the library defaults).",
        "",
    ]
    for outer, t in report["tuned"].items():
        grid = ", ".join(f"{lr}: {s:+.3f}" for lr, s in t["scores"].items())
        lines.append(f"- {outer}: grid {grid} -> **{t['lr']}**")
    lines += [
        "",
        "| outer loop | start mean | end mean (seeds) | end best (seeds) | outer-step wall "
        "time (s, mean) | early slope (95% CI) | middle slope (95% CI) | late slope (95% CI) "
        "| late - early (95% CI) | seeds late < early | rate | outer-step size, first -> last "
        "tenth |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for outer in OUTERS:
        row = report["rows"][outer]
        fit = report["fits"][outer]["mean"]
        lines.append(
            f"| {outer} | {row['start_mean']:+.3f} | {row['end_mean']:+.3f} "
            f"({', '.join(f'{v:+.2f}' for v in row['end_mean_seeds'])}) | "
            f"{row['end_best']:+.3f} ({', '.join(f'{v:+.2f}' for v in row['end_best_seeds'])}) "
            f"| {row['seconds']:.0f} | {1e3 * fit['early']:+.2f} "
            f"[{1e3 * fit['early_ci'][0]:+.2f}, {1e3 * fit['early_ci'][1]:+.2f}] | "
            f"{1e3 * fit['middle']:+.2f} [{1e3 * fit['middle_ci'][0]:+.2f}, "
            f"{1e3 * fit['middle_ci'][1]:+.2f}] | "
            f"{1e3 * fit['late']:+.2f} [{1e3 * fit['late_ci'][0]:+.2f}, "
            f"{1e3 * fit['late_ci'][1]:+.2f}] | {1e3 * fit['acceleration']:+.2f} "
            f"[{1e3 * fit['acceleration_ci'][0]:+.2f}, {1e3 * fit['acceleration_ci'][1]:+.2f}] "
            f"| {fit['seeds_accelerating']} of {len(config['seeds'])} | {verdict_for(fit)} "
            f"| {row['update_norm_first']:.3f} -> {row['update_norm_last']:.3f} |"
        )
    lines += [
        "",
        "Slopes are x 1e-3 nats per outer step of the population-mean meta-test meta-loss "
        "(OLS over the first, middle and last third of the run; CI: bootstrap over seeds; "
        "with 3 seeds the bootstrap has only 10 distinct resamples, so read the per-seed count "
        "too). Best "
        "member (selected on the meta-test tasks, so optimistic for every loop alike): "
        + "; ".join(
            f"{o} late - early {1e3 * report['fits'][o]['best']['acceleration']:+.2f} "
            f"[{1e3 * report['fits'][o]['best']['acceleration_ci'][0]:+.2f}, "
            f"{1e3 * report['fits'][o]['best']['acceleration_ci'][1]:+.2f}]"
            for o in OUTERS
        )
        + ".",
        "",
        report["verdict"],
        "",
        f"Rerun: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny everything")
    parser.add_argument("--steps", type=int, default=200, help="outer steps (default 200)")
    parser.add_argument("--tune-steps", type=int, default=50, help="tuning run length")
    parser.add_argument("--population", type=int, default=8, help="members (default 8)")
    parser.add_argument("--horizon", type=int, default=30, help="inner steps T (default 30)")
    parser.add_argument("--pairs", type=int, default=4, help="ES pairs (default 4)")
    parser.add_argument("--pbt-every", type=int, default=20, help="PBT interval (default 20)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluation interval")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    parser.add_argument(
        "--only", choices=("tune", "runs"), help="fill the cache only (for parallel processes)"
    )
    parser.add_argument(
        "--outers", nargs="+", choices=OUTERS, default=list(OUTERS), help="with --only runs"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="finished runs (reused)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.tune_steps, args.pairs, args.pbt_every = 6, 3, 1, 3
        args.eval_every, args.population, args.horizon = 1, 4, 5
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    machine = machine_info(threads=args.threads)
    work = Path(args.work)
    tuned = {} if args.outers == ["self"] else tune(args, work)
    if args.only == "tune":
        return tuned
    results: dict[str, list[learned.SelfTrainingResult]] = {o: [] for o in OUTERS}
    for seed in args.seeds:
        run_args = argparse.Namespace(**{**vars(args), "seed": seed})
        for outer in OUTERS if args.only is None else args.outers:
            lr = None if outer == "self" else tuned[outer]["lr"]
            label = outer if lr is None else f"{outer} lr={lr}"
            results[outer].append(
                run(
                    run_args,
                    label,
                    work / f"seed{seed}",
                    outer=outer,
                    outer_lr=lr,
                    eval_seed=TEST_TASKS_SEED,
                )
            )
    if args.only == "runs":
        return {}

    steps = np.array(results["self"][0].curve("mean")[0], dtype=float)
    curves = {
        o: {w: np.array([r.curve(w)[1] for r in results[o]]) for w in ("mean", "best")}
        for o in OUTERS
    }
    fits = {o: {w: rate_fit(curves[o][w], steps) for w in ("mean", "best")} for o in OUTERS}
    rows = {
        o: {
            "start_mean": float(curves[o]["mean"][:, 0].mean()),
            "end_mean": float(curves[o]["mean"][:, -1].mean()),
            "end_mean_seeds": curves[o]["mean"][:, -1].tolist(),
            "end_best": float(curves[o]["best"][:, -1].mean()),
            "end_best_seeds": curves[o]["best"][:, -1].tolist(),
            "seconds": float(np.mean([seconds(r) for r in results[o]])),
            # the size of the outer steps, first and last tenth of the run (mean over
            # members, steps and seeds): does the outer optimizer take bigger steps late?
            "update_norm_first": float(np.mean([update_norm(r, early=True) for r in results[o]])),
            "update_norm_last": float(np.mean([update_norm(r, early=False) for r in results[o]])),
        }
        for o in OUTERS
    }
    self_fit = fits["self"]["mean"]
    order = sorted(OUTERS, key=lambda o: rows[o]["end_mean"])
    verdict = (
        f"Acceleration (the paper's positive feedback phase), population mean, late - early "
        f"slope: self-training {verdict_for(self_fit)} "
        f"({1e3 * self_fit['acceleration']:+.2f} [{1e3 * self_fit['acceleration_ci'][0]:+.2f}, "
        f"{1e3 * self_fit['acceleration_ci'][1]:+.2f}] x 1e-3 per step; late slope steeper "
        f"than early in {self_fit['seeds_accelerating']} of {len(args.seeds)} seeds); "
        f"Adam-outer {verdict_for(fits['adam']['mean'])}; SGD-outer "
        f"{verdict_for(fits['sgd']['mean'])}. Final population-mean meta-test loss, best first: "
        + ", ".join(f"{o} {rows[o]['end_mean']:+.3f}" for o in order)
        + "."
    )
    print(verdict)
    report = {
        "command": rerun_command("self_training.py", argv),
        "machine": machine,
        "config": {
            "steps": args.steps,
            "tune_steps": args.tune_steps,
            "population": args.population,
            "horizon": args.horizon,
            "pairs": args.pairs,
            "pbt_every": args.pbt_every,
            "eval_every": args.eval_every,
            "seeds": args.seeds,
            "grids": {k: list(v) for k, v in GRIDS.items()},
            "tune_seed": TUNE_SEED,
            "val_tasks_seed": VAL_TASKS_SEED,
            "test_tasks_seed": TEST_TASKS_SEED,
            "inner_steps_per_outer_step": 2 * args.pairs * args.population * args.horizon,
            "families": ", ".join(f.name for f in learned.self_training_families()),
        },
        "tuned": tuned,
        "rows": rows,
        "fits": fits,
        "steps": steps.tolist(),
        "curves": {o: {w: c.tolist() for w, c in v.items()} for o, v in curves.items()},
        "updaters": [[r["updater"] for r in res.history] for res in results["self"]],
        "verdict": verdict,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "self_training.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "self_training.md").write_text(markdown(report))
    plot(report, curves, steps, out / "self_training.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
