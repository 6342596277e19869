"""Estimator study: truncated backprop, ES, PES and the mixed estimator meta-training the MLP
learned optimizer at equal compute, meta-loss on meta-validation tasks against wall time.

Issue 21, part 3 (Metz et al. 2019, papers.md section 15).  Protocol (``hg.learned``):

* meta-train families: the first ``--families`` digits MLP configurations (depth 1, width <= 32)
  of ``make_splits(0).meta_train``; meta-validation tasks: the first ``--valid-tasks`` digits
  MLP configurations of ``make_splits(0).meta_valid``.  Meta-test is never read.
* equal compute = the same number of inner training steps per outer step and the same number
  of outer steps: truncated backprop runs ``2S`` particles, ES / PES / mixed ``S`` antithetic
  pairs (``2S`` particles), each for ``K`` inner steps per outer step.  Wall time (outer steps
  only, evaluation excluded) is measured and is the x axis of the plot.
* each estimator's meta learning rate (Adam on theta, half-cosine decay to a tenth) is chosen
  from ``--lr-grid`` by a run on a separate selection seed, scored by the mean final training
  loss of the learned optimizer on the meta-validation tasks (instance ``replicate=0``); the
  choice is recorded with ``SelectionLog`` and audited by ``check_selections``.
* the reported runs use seeds 1..``--seeds`` and meta-validation instances ``replicate=1``
  (the same configurations, fresh example subsets / initialisations / batch orders).

Run from the repository root::

    python benchmarks/learned_optimizer_estimators.py          # ~11 minutes on 1 thread
    python benchmarks/learned_optimizer_estimators.py --quick  # ~20 s smoke run

Writes ``<out>/learned_optimizer_estimators.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from hypergradient import learned
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hypergradient import learned
from _common import machine_info, rerun_command, write_outputs

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
NAME = "learned_optimizer_estimators"
SELECTION_SEED = 0


def protocol_tasks(num_families: int, num_valid: int, split_seed: int = 0):
    """The protocol splits, the meta-train configurations and the meta-validation ones."""
    splits = learned.make_splits(split_seed)
    train = [
        c
        for c in splits.meta_train
        if c.dataset == "digits" and c.model == "mlp" and c.depth == 1 and c.width <= 32
    ]
    valid = [c for c in splits.meta_valid if c.dataset == "digits" and c.model == "mlp"]
    # distinct families (the same architecture twice would be one family)
    seen: set = set()
    train_unique = []
    for c in train:
        if c.architecture not in seen:
            seen.add(c.architecture)
            train_unique.append(c)
    return splits, train_unique[:num_families], valid[:num_valid]


def run_one(
    estimator: str,
    meta_lr: float,
    seed: int,
    lopt: learned.AbstractLearnedOptimizer,
    families,
    valid_tasks,
    *,
    horizon: int,
    truncation: int,
    pairs: int,
    outer_steps: int,
    eval_every: int,
    sigma: float,
) -> dict:
    """Meta-train a fresh ``lopt`` on ``families`` with ``estimator``; every ``eval_every``
    outer steps, the mean final training loss of ``valid_tasks`` trained for ``horizon``
    steps.  Returns the curve, the final theta and the run's meta-training seconds."""
    torch.manual_seed(seed)
    schedule = learned.TruncationSchedule(horizon=horizon, truncation_length=truncation)
    # equal inner steps per outer step: 2S particles for truncated backprop, S pairs otherwise
    num_pairs = 2 * pairs if estimator == "tbptt" else pairs
    curve = {"step": [], "seconds": [], "valid_loss": []}
    clock = {"seconds": 0.0}

    def evaluate(step: int, theta) -> None:
        ev = learned.evaluate_learned(lopt, theta, valid_tasks, horizon)
        curve["step"].append(step)
        curve["seconds"].append(clock["seconds"])
        curve["valid_loss"].append(ev.mean if math.isfinite(ev.mean) else float("inf"))

    def callback(step, record, theta):
        clock["seconds"] += record["seconds"]
        if (step + 1) % eval_every == 0 or step + 1 == outer_steps:
            evaluate(step + 1, theta)

    evaluate(0, lopt.init(torch.Generator().manual_seed(seed)))
    result = learned.meta_train(
        lopt,
        families,
        outer_steps,
        estimator=estimator,
        schedule=schedule,
        sigma=sigma,
        num_pairs=num_pairs,
        meta_lr=meta_lr,
        meta_lr_final=meta_lr / 10,
        clip_norm=1.0,
        seed=seed,
        callback=callback,
    )
    return {
        "estimator": estimator,
        "meta_lr": meta_lr,
        "seed": seed,
        "particles": 2 * pairs,
        "inner_steps": outer_steps * 2 * pairs * truncation,
        "meta_train_seconds": clock["seconds"],
        "curve": curve,
        "final_valid_loss": curve["valid_loss"][-1],
        "train_meta_loss": [r["loss"] for r in result.history],
        "theta": {k: v.detach().clone() for k, v in result.theta.items()},
    }


def study(args) -> dict:
    splits, train_configs, valid_configs = protocol_tasks(args.families, args.valid_tasks)
    select_tasks = [c.task(args.horizon, replicate=0) for c in valid_configs]
    report_tasks = [c.task(args.horizon, replicate=1) for c in valid_configs]
    log = learned.SelectionLog(splits)
    common = dict(
        horizon=args.horizon,
        truncation=args.truncation,
        pairs=args.pairs,
        outer_steps=args.outer_steps,
        eval_every=args.eval_every,
        sigma=args.sigma,
    )
    lopt = learned.MLPLearnedOptimizer(hidden=args.hidden)
    families = [c.family() for c in train_configs]
    selection_runs, chosen = [], {}
    for estimator in learned.ESTIMATORS:
        scores = {}
        for lr in args.lr_grid:
            run = run_one(estimator, lr, SELECTION_SEED, lopt, families, select_tasks, **common)
            del run["theta"]
            selection_runs.append(run)
            scores[f"{lr:g}"] = run["final_valid_loss"]
            print(f"select {estimator:>5} lr={lr:g}: meta-valid loss {run['final_valid_loss']:.4f}")
        best = min(args.lr_grid, key=lambda lr: scores[f"{lr:g}"])
        chosen[estimator] = best
        log.record(
            f"{estimator}.meta_lr",
            best,
            valid_configs,
            {"final_valid_loss_by_lr": scores, "seed": SELECTION_SEED, "replicate": 0},
        )
    runs = []
    for seed in range(1, args.seeds + 1):
        for estimator in learned.ESTIMATORS:  # interleaved: machine load hits all alike
            run = run_one(
                estimator, chosen[estimator], seed, lopt, families, report_tasks, **common
            )
            del run["theta"]
            runs.append(run)
            print(
                f"seed {seed} {estimator:>5}: meta-valid loss {run['final_valid_loss']:.4f} "
                f"({run['meta_train_seconds']:.1f} s)"
            )
    summary = {}
    for estimator in learned.ESTIMATORS:
        rows = [r for r in runs if r["estimator"] == estimator]
        finals = [r["final_valid_loss"] for r in rows]
        secs = [r["meta_train_seconds"] for r in rows]
        summary[estimator] = {
            "meta_lr": chosen[estimator],
            "final_valid_mean": statistics.fmean(finals),
            "final_valid_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "initial_valid_mean": statistics.fmean(r["curve"]["valid_loss"][0] for r in rows),
            "best_valid_mean": statistics.fmean(min(r["curve"]["valid_loss"]) for r in rows),
            "seconds_mean": statistics.fmean(secs),
            "seconds_std": statistics.stdev(secs) if len(secs) > 1 else 0.0,
        }
    record = log.to_dict()
    return {
        "protocol": {"settings": record["protocol"]["settings"], "hashes": splits.hashes()},
        "selections": record["selections"],
        "meta_train_configs": [c.to_dict() for c in train_configs],
        "meta_train_families": [c.family().name for c in train_configs],
        "meta_valid_configs": [c.to_dict() for c in valid_configs],
        "summary": summary,
        "runs": runs,
        "selection_runs": selection_runs,
    }


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# Estimator study: meta-training the MLP learned optimizer (issue 21, part 3)",
        "",
        f"Meta-train families ({len(result['meta_train_families'])}, from "
        f"`make_splits(0).meta_train`): {', '.join(result['meta_train_families'])}. "
        f"Meta-validation: {len(result['meta_valid_configs'])} digits MLP configurations of "
        f"`make_splits(0).meta_valid`; meta-test never read.",
        "",
        f"Equal compute = equal inner training steps: every outer step runs "
        f"{2 * cfg['pairs']} particles x K = {cfg['truncation']} inner steps (truncated backprop "
        f"{2 * cfg['pairs']} particles; ES / PES / mixed {cfg['pairs']} antithetic pairs, "
        f"sigma = {cfg['sigma']:g}), {cfg['outer_steps']} outer steps per run, episodes of "
        f"T = {cfg['horizon']}; MLP learned optimizer (hidden {cfg['hidden']}), Adam on theta "
        f"with half-cosine decay to a tenth, clipping 1. Wall time counts outer steps only "
        f"(evaluation excluded), 1 thread.",
        "",
        f"Meta learning rate per estimator: chosen from {cfg['lr_grid']} by a run on selection "
        f"seed {SELECTION_SEED}, scored by the final mean training loss (after T steps of the "
        f"learned optimizer) on the meta-validation tasks, instance replicate 0. Reported runs: "
        f"seeds 1..{cfg['seeds']} on fresh instances (replicate 1) of the same "
        f"meta-validation configurations; mean +- standard deviation over seeds. "
        f"`check_selections` passes on this record.",
        "",
        "| estimator | meta lr (selected) | meta-valid loss at start | final meta-valid loss "
        "| best along run | meta-train wall s |",
        "|---|---|---|---|---|---|",
    ]
    for est, s in result["summary"].items():
        lines.append(
            f"| {est} | {s['meta_lr']:g} | {s['initial_valid_mean']:.4f} | "
            f"{s['final_valid_mean']:.4f} +- {s['final_valid_std']:.4f} | "
            f"{s['best_valid_mean']:.4f} | {s['seconds_mean']:.1f} +- {s['seconds_std']:.1f} |"
        )
    lines += [
        "",
        "Selection (final meta-valid loss by meta learning rate, selection seed):",
        "",
        "| estimator | " + " | ".join(f"lr {lr:g}" for lr in cfg["lr_grid"]) + " |",
        "|---|" + "---|" * len(cfg["lr_grid"]),
    ]
    for sel in result["selections"]:
        by = sel["evidence"]["final_valid_loss_by_lr"]
        lines.append(
            f"| {sel['name'].split('.')[0]} | "
            + " | ".join(f"{by[f'{lr:g}']:.4f}" for lr in cfg["lr_grid"])
            + " |"
        )
    lines += [
        "",
        f"Total benchmark wall time {result['wall_seconds']:.0f} s; load average at start "
        f"{result['machine']['load_average_at_start']}.",
        "",
        f"Rerun: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for est in result["summary"]:
        rows = [r for r in result["runs"] if r["estimator"] == est]
        n = min(len(r["curve"]["seconds"]) for r in rows)
        x = [statistics.fmean(r["curve"]["seconds"][i] for r in rows) for i in range(n)]
        ys = [[r["curve"]["valid_loss"][i] for r in rows] for i in range(n)]
        mean = [statistics.fmean(y) for y in ys]
        std = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
        (line,) = ax.plot(x, mean, label=f"{est} (lr {result['summary'][est]['meta_lr']:g})")
        ax.fill_between(
            x,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            color=line.get_color(),
            alpha=0.2,
        )
    ax.set_xlabel("meta-training wall time (s, 1 thread)")
    ax.set_ylabel("meta-valid loss (final train loss after T)")
    ax.set_yscale("log")
    ax.set_title(f"Estimators at equal inner steps, {len(result['config']['seeds_list'])} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--families", type=int, default=3)
    parser.add_argument("--valid-tasks", type=int, default=4)
    parser.add_argument("--horizon", type=int, default=50)
    parser.add_argument("--truncation", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=2, help="S antithetic pairs (tbptt: 2S)")
    parser.add_argument("--outer-steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--data-dir", default=None, help="unused: digits ship with the library")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.outer_steps, args.eval_every, args.lr_grid = 12, 6, args.lr_grid[:2]
        args.seeds, args.horizon = 2, 20
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = study(args)
    result["config"] = {
        k: getattr(args, k)
        for k in (
            "seeds",
            "families",
            "valid_tasks",
            "horizon",
            "truncation",
            "pairs",
            "outer_steps",
            "eval_every",
            "hidden",
            "sigma",
            "lr_grid",
            "quick",
        )
    }
    result["config"]["seeds_list"] = list(range(1, args.seeds + 1))
    result["config"]["equal_compute"] = "same inner training steps per outer step and outer steps"
    result["wall_seconds"] = time.perf_counter() - t0
    result["machine"] = machine_info()
    result["command"] = rerun_command(f"{NAME}.py", argv)
    learned.check_selections(result)  # nothing tuned on meta-test
    stem = NAME + ("_quick" if args.quick else "")
    write_outputs(args.out, stem, result, markdown, plot)
    return result


if __name__ == "__main__":
    main()
