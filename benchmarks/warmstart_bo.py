"""Warm-started vs cold-started Bayesian optimisation on held-out tasks (Kim et al. 2017;
papers.md section 13).

Meta-dataset: binary tasks from scikit-learn's shipped datasets (45 digit pairs, breast_cancer
subsamples, wine and iris class pairs / one-vs-rest, diabetes thresholds) and, when the IDX
files are found in ``--data-dir`` (default ``$HYPERGRADIENT_DATA``), class pairs of MNIST
and Fashion-MNIST (14 x 14 pooled images).  Each task's response surface is the 3-fold CV
error of a standardised RBF-SVM on a shared 10 x 10 grid of log10 C x log10(gamma d)
(``search.svm_surface``).

Leave-family-out: for every family, a DeepSets meta-feature network is trained with the
Siamese loss on the *other* families (``search.train_meta_features``); each task of the
held-out family is then searched with Optuna's GPSampler (GP + log EI, deterministic
objective) for 20 evaluations:

* ``cold``: 3 random initial configurations, then GP-EI;
* ``warm (learned)``: the best configurations of the 3 nearest meta-training tasks by learned
  meta-feature (``search.warm_start_configs``), enqueued as the first 3 trials;
* ``warm (pooled, untrained)``: an ablation - the same, with neighbours found by the
  network's *input* pooled without training (mean of the standardised instance features);
* ``warm (mean surface)``: a baseline without meta-features - the 3 best cells of the mean
  surface of all meta-training tasks (a "good default" prior), enqueued the same way.

Reported: mean normalised regret ``(best so far - min) / (max - min)`` against evaluations
(standard errors over tasks x seeds), at 1/3/5/10/20 evaluations; and, over every held-out
task, the surface distance to the nearest meta-training task by learned meta-feature vs by
pooled untrained features vs a random meta-training task vs the true nearest (oracle).
Also the regret after the 3 initial configurations of a ``warm (random neighbours)`` arm
(best cells of 3 random training tasks).

Run from the repository root::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/warmstart_bo.py            # ~5 CPU min
    OMP_NUM_THREADS=1 python benchmarks/warmstart_bo.py --quick             # ~1 CPU min
    python benchmarks/warmstart_bo.py --data-dir /path/with/mnist --cache /tmp/ws.pt

Writes ``<out>/warmstart_bo.{json,md,png}`` (``--out``, default ``benchmarks/results``).
Target (papers.md): mean normalised regret after 5 evaluations >= 20% lower warm than cold;
learned nearest neighbours' surface distance below random neighbours'.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import hypergradient  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import data_source, load_cache, save_cache
from hypergradient import HypergradientError
from hypergradient.search import warmstart as ws

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
REPORT_AT = (1, 3, 5, 10, 20)
ARMS = ("cold", "warm (learned)", "warm (pooled, untrained)", "warm (mean surface)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(args) -> tuple[ws.MetaDataset, list[str]]:
    """The meta-dataset (from the cache when it matches the arguments) and notes."""
    notes = []
    key = (args.quick, str(args.data_dir), args.no_images, args.image_pairs, args.image_rows)
    if args.cache and Path(args.cache).is_file():
        cached = load_meta_cache(args.cache, key)
        if cached is not None:
            log(f"meta-dataset from cache {args.cache}")
            return cached
    grid = ws.SurfaceGrid()
    max_rows = 120 if args.quick else 300
    tasks = ws.sklearn_tasks(seed=0, max_rows=max_rows)
    if args.quick:  # every other task: a minute instead of several
        tasks = tasks[::3]
    for family in () if args.no_images else ws.IMAGE_FAMILIES:
        try:
            found = ws.image_pair_tasks(
                family,
                args.data_dir,
                pairs=6 if args.quick else args.image_pairs,
                rows=120 if args.quick else args.image_rows,
                seed=0,
            )
        except HypergradientError as exc:
            notes.append(f"{family}: not used ({str(exc).splitlines()[0][:160]})")
            continue
        notes.append(f"{family}: {len(found)} class-pair tasks from {data_source(args.data_dir)}")
        tasks += found
    if args.no_images:
        notes.append("MNIST / Fashion-MNIST: not used (--no-images)")
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 20 == 0 or done == total:
            log(f"surfaces {done}/{total} ({time.perf_counter() - start:.0f} s)")

    meta = ws.build_meta_dataset(tasks=tasks, grid=grid, progress=progress)
    if args.cache:
        save_meta_cache(args.cache, key, meta, notes)
    return meta, notes


def save_meta_cache(path, key, meta: ws.MetaDataset, notes: list[str]) -> None:
    """The meta-dataset as plain tensors and JSON text (no pickled objects: a cache file can
    never run code when it is read back by :func:`load_meta_cache`)."""

    def tensor(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    save_cache(
        {
            "key": json.dumps(list(key)),
            "notes": list(notes),
            "grid": json.dumps(dataclasses.asdict(meta.grid)),
            "tasks": [
                {
                    "name": t.name,
                    "family": t.family,
                    "x": tensor(t.x),
                    "y": tensor(t.y),
                    "surface": tensor(t.surface),
                }  # fmt: skip
                for t in meta.tasks
            ],
        },
        path,
    )


def load_meta_cache(path, key) -> tuple[ws.MetaDataset, list[str]] | None:
    """``(meta, notes)`` from a cache written by :func:`save_meta_cache` for the same ``key``
    (None for another key); read with ``weights_only=True``, so a planted file is refused."""
    cached = load_cache(path)
    if json.loads(cached["key"]) != json.loads(json.dumps(list(key))):
        return None
    grid_fields = json.loads(cached["grid"])
    grid = ws.SurfaceGrid(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in grid_fields.items()})  # fmt: skip
    tasks = tuple(
        ws.Task(
            t["name"],
            t["family"],
            t["x"].numpy(),
            t["y"].numpy(),
            None if t["surface"] is None else t["surface"].numpy(),
        )  # fmt: skip
        for t in cached["tasks"]
    )
    return ws.MetaDataset(tasks, grid), list(cached["notes"])


def mean_surface_configs(starter: ws.WarmStarter, k: int) -> list[dict[str, int]]:
    """The ``k`` best cells of the mean meta-training surface (no meta-features)."""
    mean = np.mean([t.surface for t in starter.tasks], axis=0)
    order = np.argsort(mean, axis=None, kind="stable")[:k]
    return [starter.grid.params(np.unravel_index(int(i), mean.shape)) for i in order]


def random_neighbour_configs(starter, rng, k: int) -> list[dict[str, int]]:
    order = [starter.tasks[int(i)] for i in rng.permutation(len(starter.tasks))]
    return distinct_best_cells(starter.grid, order, k)


def pooled_order(starter: ws.WarmStarter, task: ws.Task, cache: dict) -> list[ws.Task]:
    """Training tasks nearest first by the *untrained* meta-feature: the mean of the
    standardised instance features (the network's input, pooled, on the scale it sees)."""

    def pooled(t: ws.Task) -> torch.Tensor:
        if t.name not in cache:
            cache[t.name] = ws.instance_features(t.x, t.y).mean(dim=0)
        return (cache[t.name] - starter.net.shift) / starter.net.scale

    train = torch.stack([pooled(t) for t in starter.tasks])
    dist = torch.linalg.vector_norm(train - pooled(task), dim=-1)
    return [starter.tasks[int(i)] for i in torch.argsort(dist, stable=True)]


def distinct_best_cells(grid: ws.SurfaceGrid, tasks, k: int) -> list[dict[str, int]]:
    """The first ``k`` distinct best cells of ``tasks`` in order (as warm_start_configs)."""
    cells: list[tuple[int, int]] = []
    for task in tasks:
        if task.best_cell() not in cells:
            cells.append(task.best_cell())
        if len(cells) == k:
            break
    return [grid.params(c) for c in cells]


def initial_regret(task: ws.Task, configs) -> float:
    values = [task.surface[c[ws.C_PARAM], c[ws.GAMMA_PARAM]] for c in configs]
    return float(ws.normalised_regret(np.array([min(values)]), task.surface)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with mnist/ and fashion-mnist/ IDX files (default: $HYPERGRADIENT_DATA, "
        "else ~/.cache/hypergradient)",
    )
    parser.add_argument("--no-images", action="store_true", help="scikit-learn tasks only")
    parser.add_argument("--image-pairs", type=int, default=20)
    parser.add_argument("--image-rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=400, help="meta-training steps")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--bo-tasks", type=int, default=10, help="searched tasks per family")
    parser.add_argument("--seeds", type=int, default=3, help="BO seeds per searched task")
    parser.add_argument(
        "--cache",
        type=str,
        default=None,
        help="cache file of the meta-dataset (tensors + JSON; reused when the options match)",
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.bo_tasks, args.seeds = 300, 3, 1
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started, cpu_started = time.perf_counter(), time.process_time()
    meta, notes = build(args)
    build_s = time.perf_counter() - started
    families = meta.families
    log(f"{len(meta.tasks)} tasks in families {[(f, len(meta.family(f))) for f in families]}")
    sampler_name = type(ws.gp_sampler()).__name__

    curves = {arm: [] for arm in ARMS}
    curve_family: list[str] = []
    neighbour_rows = []
    init_random_nb, init_learned, init_mean, init_pooled = [], [], [], []
    pooled_cache: dict = {}
    per_family = {}
    train_s = search_s = 0.0
    for fi, family in enumerate(families):
        t0 = time.perf_counter()
        starter = ws.train_meta_features(meta, exclude_families=[family], steps=args.steps)
        train_s += time.perf_counter() - t0
        held = meta.family(family)
        rng = np.random.default_rng(100 + fi)
        fam_nb = []
        for task in held:
            nearest = starter.nearest(task, 1)[0][0]
            dists = [ws.surface_distance(task.surface, t.surface) for t in starter.tasks]
            row = {
                "task": task.name,
                "learned_nn": ws.surface_distance(task.surface, nearest.surface),
                "random": float(np.mean(dists)),
                "oracle_nn": float(np.min(dists)),
                "pooled_nn": ws.surface_distance(
                    task.surface, pooled_order(starter, task, pooled_cache)[0].surface
                ),
            }
            neighbour_rows.append(row)
            fam_nb.append(row)
            init_random_nb.append(initial_regret(task, random_neighbour_configs(starter, rng, 3)))
            init_learned.append(initial_regret(task, ws.warm_start_configs(starter, task, 3)))
            init_mean.append(initial_regret(task, mean_surface_configs(starter, 3)))
            pooled_configs = distinct_best_cells(
                meta.grid, pooled_order(starter, task, pooled_cache), 3
            )
            init_pooled.append(initial_regret(task, pooled_configs))
        chosen = rng.choice(len(held), size=min(args.bo_tasks, len(held)), replace=False)
        t0 = time.perf_counter()
        fam_curves = {arm: [] for arm in ARMS}
        for index in sorted(chosen.tolist()):
            task = held[index]
            starts = {
                "cold": (),
                "warm (learned)": ws.warm_start_configs(starter, task, 3),
                "warm (pooled, untrained)": distinct_best_cells(
                    meta.grid, pooled_order(starter, task, pooled_cache), 3
                ),
                "warm (mean surface)": mean_surface_configs(starter, 3),
            }
            for seed in range(args.seeds):
                for arm, configs in starts.items():
                    best = ws.surface_search(
                        task.surface,
                        meta.grid,
                        warm_start=configs,
                        n_trials=args.trials,
                        seed=1000 * index + seed,
                    )
                    regret = ws.normalised_regret(best, task.surface)
                    curves[arm].append(regret)
                    fam_curves[arm].append(regret)
                curve_family.append(family)
        search_s += time.perf_counter() - t0
        at5 = {arm: float(np.mean([c[4] for c in fam_curves[arm]])) for arm in ARMS}
        per_family[family] = {
            "tasks": len(held),
            "searched": len(chosen),
            "final_siamese_loss": float(np.mean(starter.losses[-50:])),
            "nn_distance": {
                k: float(np.mean([r[k] for r in fam_nb]))
                for k in ("learned_nn", "random", "oracle_nn", "pooled_nn")
            },
            "regret_at_5": at5,
        }
        log(
            f"held out {family:14s} ({len(held)} tasks): NN dist learned "
            f"{per_family[family]['nn_distance']['learned_nn']:.3f} random "
            f"{per_family[family]['nn_distance']['random']:.3f}; regret@5 "
            + ", ".join(f"{a} {v:.3f}" for a, v in at5.items())
        )

    # rows are (task, seed) in task-major order; GP-EI on the 100-cell grid is deterministic
    # given its first trials, so a warm search does not vary with the seed: standard errors
    # are over tasks, of the mean over each task's seeds
    def per_task(arm: str) -> np.ndarray:
        runs = np.array(curves[arm])
        return runs.reshape(-1, args.seeds, runs.shape[-1]).mean(axis=1)

    summary = {}
    for arm in ARMS:
        c = per_task(arm)
        summary[arm] = {
            "mean": c.mean(axis=0).tolist(),
            "se": (c.std(axis=0, ddof=1) / np.sqrt(len(c))).tolist(),
            "tasks": len(c),
            "runs": len(curves[arm]),
        }
    cold5 = summary["cold"]["mean"][4]
    reduction = {
        arm: (1.0 - summary[arm]["mean"][4] / cold5) if cold5 > 0 else float("nan")
        for arm in ARMS[1:]
    }
    # paired over the same (task, seed): cold minus warm regret after n evaluations
    paired = {}
    for arm in ARMS[1:]:
        diff = per_task("cold") - per_task(arm)
        paired[arm] = {
            str(n): {
                "mean": float(diff[:, n - 1].mean()),
                "se": float(diff[:, n - 1].std(ddof=1) / np.sqrt(len(diff))),
                "warm_better": float(np.mean(diff[:, n - 1] > 0)),
                "cold_better": float(np.mean(diff[:, n - 1] < 0)),
            }
            for n in REPORT_AT
            if n <= args.trials
        }
    nb = {
        k: float(np.mean([r[k] for r in neighbour_rows])) for k in neighbour_rows[0] if k != "task"
    }
    nb_win = float(np.mean([r["learned_nn"] < r["random"] for r in neighbour_rows]))
    init = {
        "warm (learned)": float(np.mean(init_learned)),
        "warm (pooled, untrained)": float(np.mean(init_pooled)),
        "warm (mean surface)": float(np.mean(init_mean)),
        "warm (random neighbours)": float(np.mean(init_random_nb)),
        "cold (expected, 3 random cells)": None,
    }
    init["cold (expected, 3 random cells)"] = float(
        np.mean([expected_min_regret(t.surface, 3) for f in families for t in meta.family(f)])
    )
    total_s = time.perf_counter() - started
    result = {
        "benchmark": "warmstart_bo",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "quick": args.quick,
        "sampler": sampler_name,
        "data": notes,
        "families": {f: len(meta.family(f)) for f in families},
        "grid": {
            "log10_C": meta.grid.log10_C,
            "log10_gamma_d": meta.grid.log10_gamma_d,
            "folds": meta.grid.folds,
        },
        "meta_training_steps": args.steps,
        "trials": args.trials,
        "seeds": args.seeds,
        "curves": summary,
        "reduction_at_5": reduction,
        "paired_cold_minus_warm": paired,
        "nearest_neighbour_surface_distance": nb,
        "learned_nn_beats_random_fraction": nb_win,
        "initial_3_regret": init,
        "per_family": per_family,
        "seconds": {
            "surfaces": build_s,
            "meta_training": train_s,
            "search": search_s,
            "total": total_s,
            "total_cpu": time.process_time() - cpu_started,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warmstart_bo.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "warmstart_bo.md").write_text(markdown(result))
    plot(result, args.out / "warmstart_bo.png")
    print(markdown(result))


def expected_min_regret(surface: np.ndarray, draws: int) -> float:
    """Expected normalised regret of the best of ``draws`` distinct uniformly random cells."""
    regret = np.sort(ws.normalised_regret(surface.ravel(), surface))[::-1]  # worst first
    g = len(regret)
    # P(best of the draws is the r-th best cell) from the hypergeometric tail
    from math import comb

    total = comb(g, draws)
    expected = 0.0
    for rank in range(g):  # rank 0 = worst; the min is at rank r when all draws are <= r
        p = (comb(rank + 1, draws) - comb(rank, draws)) / total
        expected += p * regret[rank]
    return expected


def markdown(r: dict) -> str:
    c = r["curves"]
    lines = [
        "# Warm-started Bayesian optimisation (Kim, Kim, Choi 2017; papers.md section 13)",
        "",
        f"{r['date']}, {r['machine']}; total {r['seconds']['total']:.0f} s wall, "
        f"{r['seconds']['total_cpu']:.0f} s CPU (wall: surfaces "
        f"{r['seconds']['surfaces']:.0f} s, meta-training {r['seconds']['meta_training']:.0f} s, "
        f"search {r['seconds']['search']:.0f} s){' (quick)' if r['quick'] else ''}.",
        f"Sampler: Optuna {r['sampler']}; {r['trials']} evaluations; leave-family-out.",
        "Families (tasks): " + ", ".join(f"{k} ({v})" for k, v in r["families"].items()) + ".",
        "Image data: " + ("; ".join(r["data"]) if r["data"] else "-") + ".",
        "",
        f"Mean normalised regret over {c['cold']['runs']} searches ({c['cold']['tasks']} "
        f"held-out tasks x {r['seeds']} seeds; ± standard error over tasks):",
        "",
        "| start | " + " | ".join(f"{n} eval" for n in REPORT_AT) + " |",
        "|---|" + "---:|" * len(REPORT_AT),
    ]
    for arm, s in c.items():
        cells = [
            f"{s['mean'][n - 1]:.4f} ± {s['se'][n - 1]:.4f}"
            for n in REPORT_AT
            if n <= len(s["mean"])
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Reduction of the regret after 5 evaluations vs cold: "
        + ", ".join(f"{a} {100 * v:.1f}%" for a, v in r["reduction_at_5"].items())
        + " (target >= 20% for warm (learned)).",
        "",
        "Paired over the same tasks, cold minus warm regret (± SE over tasks; share of tasks "
        "where warm / cold is strictly better, seeds averaged):",
        "",
        "| start | " + " | ".join(f"{n} eval" for n in REPORT_AT) + " |",
        "|---|" + "---:|" * len(REPORT_AT),
    ]
    for arm, rows in r["paired_cold_minus_warm"].items():
        cells = [
            f"{v['mean']:+.4f} ± {v['se']:.4f} ({100 * v['warm_better']:.0f}% / "
            f"{100 * v['cold_better']:.0f}%)"
            for v in rows.values()
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Surface distance (mean |e_i - e_j| over the 100 cells) from each held-out task to a "
        "meta-training task (all held-out tasks):",
        "",
        "| neighbour | distance |",
        "|---|---:|",
    ]
    nb = r["nearest_neighbour_surface_distance"]
    lines += [
        f"| nearest by learned meta-feature | {nb['learned_nn']:.4f} |",
        f"| nearest by pooled instance features (untrained) | {nb['pooled_nn']:.4f} |",
        f"| random | {nb['random']:.4f} |",
        f"| nearest by true surface (oracle) | {nb['oracle_nn']:.4f} |",
        "",
        f"Learned nearest neighbour closer than the random average on "
        f"{100 * r['learned_nn_beats_random_fraction']:.0f}% of held-out tasks.",
        "",
        "Regret of the best of the 3 initial configurations (all held-out tasks): "
        + ", ".join(f"{a} {v:.4f}" for a, v in r["initial_3_regret"].items())
        + ".",
        "",
        "Per held-out family (regret after 5 evaluations; surface distance of the learned / "
        "random neighbour):",
        "",
        "| family | tasks | searched | cold | warm (learned) | warm (pooled) | warm (mean surface) "
        "| NN learned | NN random |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fam, v in r["per_family"].items():
        a = v["regret_at_5"]
        lines.append(
            f"| {fam} | {v['tasks']} | {v['searched']} | {a['cold']:.4f} | "
            f"{a['warm (learned)']:.4f} | {a['warm (pooled, untrained)']:.4f} | "
            f"{a['warm (mean surface)']:.4f} | "
            f"{v['nn_distance']['learned_nn']:.4f} | {v['nn_distance']['random']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm, style in zip(ARMS, ("-", "-", ":", "--"), strict=True):
        mean, se = np.array(r["curves"][arm]["mean"]), np.array(r["curves"][arm]["se"])
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, mean, style, label=arm, marker="o", ms=3)
        # a log axis: the band's lower edge is clipped where it would reach zero
        ax.fill_between(x, np.maximum(mean - se, 1e-4), mean + se, alpha=0.25)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("mean normalised regret (± SE)")
    ax.set_yscale("log")
    ax.set_xticks(REPORT_AT)
    ax.set_title(f"GP-EI on held-out families ({r['curves']['cold']['tasks']} tasks)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
