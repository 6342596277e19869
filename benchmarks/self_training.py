"""Self-training: a population of learned optimizers trains its own meta-parameters.

Metz, Freeman, Maheswaranathan, Sohl-Dickstein (2021) at CPU scale (papers.md section 16).
A population of N = 8 tiny per-parameter linear learned optimizers
(``hypergradient.learned.LinearLearnedOptimizer``: features g, m_0.9, m_0.99, rms_0.99 ->
direction and log-magnitude, 10 meta-parameters, update ``a * d * exp(b * m)``), drawn at
random, is outer-trained on digits MLPs (64-8-10 batch 32 and 64-16-10 tanh batch 16 in
turn, random 128-example subsets, T = 50 inner steps, meta-loss = mean clipped log full
training loss) with antithetic ES over whole episodes (8 pairs, sigma 0.1) and PBT every
20 outer steps (the worst 25% copy the best 25%, perturbed by 10% of their rms).  Runs,
all from the *same* random initial population (one per seed of ``--seeds``):

* ``self``: the best member's learned optimizer performs every member's outer update
  (a = 1e-2, b = 0.1: the defaults);
* ``sgd``: the control, plain SGD on the ES estimate, its learning rate tuned on a grid
  (every rate run for the first half, the best continued from its checkpoint);
* ``pbt-only``: no outer gradient step at all: selection and perturbation alone;
* ``self, a = b = 1e-3``: self-training with Metz et al.'s output scales;
* ``self, a = 3e-2``: a 3x larger step multiplier (how sensitive the self-trained loop is
  to its one scale).

The baseline is the fixed random initial population (the step-0 evaluation of every run).
Every curve is the held-out meta-loss (4 fixed held-out tasks per family, never trained on)
of the best member and of the population mean.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 5 python benchmarks/self_training.py --seeds 0 1
    PYTHONPATH=src python benchmarks/self_training.py --quick --out /tmp/q  # smoke run

Writes ``<out>/self_training.{json,md,png}`` (the plot shows the first seed); finished
runs are kept in ``--work`` and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

try:
    from hypergradient import learned
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hypergradient import learned
from _common import load_cache, machine_info, save_cache

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "hypergradient-self-training"
SGD_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: what defines a run (a cached run with other values is not reused)
SETTINGS = ("steps", "population", "horizon", "pairs", "pbt_every", "eval_every", "seed")


def run(args, label: str, work: Path, **kwargs) -> learned.SelfTrainingResult:
    """One self_train run from the common random population.

    A finished run is kept in ``work`` (``--work``) and reused by a later call with the same
    settings (runs with a checkpoint resume from it), so an interrupted benchmark restarts
    where it stopped."""
    cache = work / (label.replace(" ", "_").replace("=", "").replace(",", "") + ".pt")
    if cache.is_file() and "checkpoint" not in kwargs:
        saved = load_cache(cache)
        if all(saved["args"].get(k) == getattr(args, k) for k in SETTINGS):
            print(f"{label:>20}: reused {cache}", flush=True)
            return saved["result"]
    common = {
        "population_size": args.population,
        "horizon": args.horizon,
        "num_pairs": args.pairs,
        "pbt_every": args.pbt_every,
        "eval_every": args.eval_every,
        "progress": not args.no_progress,
        "generator": torch.Generator().manual_seed(args.seed),
    }
    common.update(kwargs)
    result = learned.self_train(**common)
    best = result.evaluations[-1]["best"]
    print(f"{label:>20}: best held-out meta-loss {best:+.3f} ({seconds(result):.0f} s)", flush=True)
    if "checkpoint" not in kwargs:
        save_cache({"args": {k: getattr(args, k) for k in SETTINGS}, "result": result}, cache)
    return result


def seconds(result: learned.SelfTrainingResult) -> float:
    """The outer steps' own time (evaluations excluded; kept through checkpoints)."""
    return sum(r["seconds"] for r in result.history)


def summary(label: str, result: learned.SelfTrainingResult, base: dict) -> dict:
    """A table row: start/end held-out meta-loss and the ratio of geometric-mean losses."""
    end = result.evaluations[-1]
    steps, best = result.curve("best")
    return {
        "run": label,
        "outer": result.outer,
        "start_best": result.evaluations[0]["best"],
        "start_mean": result.evaluations[0]["mean"],
        "end_best": end["best"],
        "end_mean": end["mean"],
        # exp(meta-loss) is the geometric mean of the training loss over the run, so this
        # is "how much lower", free of the sign of a log loss
        "ratio_vs_init_best": math.exp(end["best"] - base["best"]),
        "ratio_vs_init_mean": math.exp(end["best"] - base["mean"]),
        "curve_steps": steps,
        "curve_best": best,
        "curve_mean": result.curve("mean")[1],
        "updaters": [r["updater"] for r in result.history],
        "copies": [[r["step"], r["copies"]] for r in result.history if r["copies"]],
        "mean_update_norm": [sum(r["update_norm"]) / len(r["update_norm"]) for r in result.history],
        "seconds": seconds(result),
    }


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        f"Self-training, N = {config['population']}, {config['steps']} outer steps, "
        f"T = {config['horizon']}, {config['pairs']} ES pairs, PBT every "
        f"{config['pbt_every']}. Held-out meta-loss: mean clipped log full training loss over "
        f"the run, on {config['families']} (lower is better). Geo-mean loss ratio = "
        f"exp(end - start): the run's geometric-mean training loss relative to the random "
        f"initial population's best member (or mean).",
    ]
    for seed in report["seeds"]:
        base = seed["random_init"]
        lines += [
            "",
            f"Seed {seed['seed']}. Fixed random initial population: best member "
            f"{base['best']:+.3f}, mean {base['mean']:+.3f}.",
            "",
            "| run | outer update | best member, start | best member, end | mean, end | "
            "geo-mean loss vs best random init | vs mean random init | outer-step time |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in seed["runs"]:
            lines.append(
                f"| {r['run']} | {r['outer']} | {r['start_best']:+.3f} | {r['end_best']:+.3f} | "
                f"{r['end_mean']:+.3f} | "
                f"{r['ratio_vs_init_best']:.2f}x | {r['ratio_vs_init_mean']:.2f}x | "
                f"{r['seconds']:.0f} s |"
            )
        grid = ", ".join(f"{lr}: {best:+.3f}" for lr, best in seed["sgd_grid"].items())
        lines += ["", f"SGD learning-rate grid, best member at the half: {grid}."]
    lines += ["", report["verdict"], ""]
    return "\n".join(lines)


def run_seed(args, work: Path) -> dict:
    """Every run for ``args.seed``: results, the SGD grid and the table rows."""
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, learned.SelfTrainingResult] = {}
    results["self"] = run(args, "self", work, num_steps=args.steps, outer="self")
    # SGD control: every rate for the first half, the best continued (resume) to the end
    half = max(1, args.steps // 2)
    grid: dict[float, learned.SelfTrainingResult] = {}
    for lr in SGD_GRID:
        grid[lr] = run(
            args,
            f"sgd lr={lr} (half)",
            work,
            num_steps=half,
            outer="sgd",
            outer_lr=lr,
            checkpoint=work / f"sgd-{lr}-half.pt",
            resume=True,
        )
    best_lr = min(grid, key=lambda lr: grid[lr].evaluations[-1]["best"])
    full = work / f"sgd-{best_lr}-full.pt"
    if not full.is_file():
        shutil.copyfile(work / f"sgd-{best_lr}-half.pt", full)
    results[f"sgd (lr {best_lr}, tuned)"] = run(
        args,
        f"sgd lr={best_lr}",
        work,
        num_steps=args.steps,
        outer="sgd",
        outer_lr=best_lr,
        checkpoint=full,
        resume=True,
    )
    results["pbt-only"] = run(args, "pbt-only", work, num_steps=args.steps, outer="none")
    spec = learned.LinearLearnedOptimizer(scale_dir=1e-3, scale_mag=1e-3)
    results["self, a = b = 1e-3"] = run(
        args, "self, a=b=1e-3", work, optimizer=spec, num_steps=args.steps, outer="self"
    )
    larger = learned.LinearLearnedOptimizer(scale_dir=3e-2)
    results["self, a = 3e-2"] = run(
        args, "self, a=3e-2", work, optimizer=larger, num_steps=args.steps, outer="self"
    )

    base = results["self"].evaluations[0]
    rows = [summary(label, r, base) for label, r in results.items()]
    return {
        "seed": args.seed,
        "random_init": {"best": base["best"], "mean": base["mean"], "losses": base["losses"]},
        "sgd_grid": {str(lr): g.evaluations[-1]["best"] for lr, g in grid.items()},
        "sgd_lr": best_lr,
        "runs": rows,
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 members, 4 steps, 1 pair"
    )
    parser.add_argument("--steps", type=int, default=40, help="outer steps (default 40)")
    parser.add_argument("--population", type=int, default=8, help="members (default 8)")
    parser.add_argument("--horizon", type=int, default=50, help="inner steps T (default 50)")
    parser.add_argument("--pairs", type=int, default=8, help="ES pairs (default 8)")
    parser.add_argument("--pbt-every", type=int, default=20, help="PBT interval (default 20)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluation interval")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="generator seeds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="finished runs (reused)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.pairs, args.pbt_every, args.eval_every = 4, 1, 2, 2
        args.population, args.horizon = 4, 10
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(threads=args.threads)
    seeds = []
    for seed in args.seeds:
        run_args = argparse.Namespace(**vars(args), seed=seed)
        seeds.append(run_seed(run_args, Path(args.work) / f"seed{seed}"))
    met = [s["runs"][0]["ratio_vs_init_best"] < 0.8 for s in seeds]
    ratios = ", ".join(f"{s['runs'][0]['ratio_vs_init_best']:.2f}x" for s in seeds)
    sgd = ", ".join(f"{s['runs'][1]['ratio_vs_init_best']:.2f}x" for s in seeds)
    pbt = ", ".join(f"{s['runs'][2]['ratio_vs_init_best']:.2f}x" for s in seeds)
    verdict = (
        f"Self-training from random initialisation (seeds {args.seeds}): the best member's "
        f"geometric-mean training loss ends at {ratios} that of the best random-init "
        f"optimizer (target < 0.8x: met on {sum(met)} of {len(met)} seeds); SGD-outer "
        f"control with a tuned learning rate: {sgd}; PBT alone: {pbt}."
    )
    print(verdict)

    report = {
        "command": "python benchmarks/self_training.py "
        + " ".join(a for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine,
        "config": {
            "steps": args.steps,
            "population": args.population,
            "horizon": args.horizon,
            "pairs": args.pairs,
            "pbt_every": args.pbt_every,
            "eval_every": args.eval_every,
            "seeds": args.seeds,
            "sgd_grid": list(SGD_GRID),
            "families": ", ".join(f.name for f in learned.self_training_families()),
        },
        "seeds": [{k: v for k, v in s.items() if k != "results"} for s in seeds],
        "target_met": met,
        "verdict": verdict,
    }
    (out / "self_training.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "self_training.md").write_text(markdown(report))
    learned.plot_self_training(
        seeds[0]["results"],
        out / "self_training.png",
        title=f"Self-training learned optimizers (held-out meta-loss, seed {args.seeds[0]})",
    )
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
