"""Warm-started Bayesian optimisation on held-out task families: learned meta-features
(Kim et al. 2017; papers.md section 13) against classical, untrained and random baselines.

Meta-dataset: binary tasks from scikit-learn's shipped datasets (45 digit pairs; breast_cancer,
wine, iris and diabetes tasks with ``--subsamples`` times their random subsamples) and, when
the IDX files are found in ``--data-dir`` (default ``$HYPERGRADIENT_DATA``), up to 45 class
pairs each of MNIST and Fashion-MNIST (14 x 14 pooled images).  Each task's response surface
is the 3-fold CV error of a standardised RBF-SVM on a shared 10 x 10 grid of log10 C x
log10(gamma d) (``search.svm_surface``).

Leave-family-out.  For every family F (the *test* family) the next family in the list is
its *validation* family V.  Every choice is made on V with F and V both left out: the
number of meta-training steps of the learned meta-features (``--step-choices``) and the
pymfe groups of the classical ones (all three, or one of statistical / info-theory /
landmarking), each by the mean regret of the best of the 3 warm-start configurations on V's
tasks.  Then the chosen settings are refitted on every family but F, and F's tasks are
searched (F is read once, at the end).  Starts, each the first 3 trials of Optuna's
GPSampler (GP + log EI) on the grid:

* ``cold``: 3 random cells, then GP-EI;
* ``learned``: the best cells of the 3 nearest meta-training tasks by the Siamese-trained
  DeepSets meta-features (``search.train_meta_features``, ``search.warm_start_configs``);
* ``classical (pymfe)``: the same, nearest by standardised pymfe meta-features
  (``search.classical_warm_starter``);
* ``untrained network``: the same network, not trained (``steps=0``, same seed);
* ``pooled inputs``: nearest by the network's standardised inputs, mean-pooled (no network);
* ``random neighbours``: the best cells of 3 random meta-training tasks;
* ``mean surface``: the 3 best cells of the mean meta-training surface (no meta-features).

Seeds (``--seeds``, 3): seed s trains / initialises the network with seed s, draws the random
neighbours and the cold start, and seeds the sampler.  Reported: regret
``(best so far - min) / (max - min)`` after 1/3/5/10 evaluations (mean over seeds per task,
± SE over tasks; per-seed means), paired differences learned minus each arm (± SE over
tasks, share of tasks where each side is strictly better); and, for every held-out task, the
surface distance to the nearest meta-training task and the rank correlation of meta-feature
distance with surface distance (``search.surface_rank_correlation``) for each meta-feature.

Run from the repository root::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/warmstart_bo.py --cache /tmp/ws.pt
    OMP_NUM_THREADS=1 python benchmarks/warmstart_bo.py --quick            # a few CPU minutes

Writes ``<out>/warmstart_bo.{json,md,png}`` (``--out``, default ``benchmarks/results``).
Claim tested: the learned meta-features warm-start better than the classical, untrained and
random-neighbour ones (papers.md: >= 20% lower regret after 5 evaluations than cold).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from math import comb
from pathlib import Path

import numpy as np
import torch

try:
    import hypergradient  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import data_source, load_cache, machine_info, rerun_command, save_cache
from hypergradient import HypergradientError
from hypergradient.search import warmstart as ws

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
REPORT_AT = (1, 3, 5, 10)
FEATURE_ARMS = ("learned", "classical (pymfe)", "untrained network", "pooled inputs")
ARMS = ("cold", *FEATURE_ARMS, "random neighbours", "mean surface")
GROUP_CHOICES = {
    "all three": ws.CLASSICAL_GROUPS,
    "statistical": ("statistical",),
    "info-theory": ("info-theory",),
    "landmarking": ("landmarking",),
}
WARM = 3  # warm-start configurations (papers.md: the 3 nearest tasks)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- data


def build(args) -> tuple[ws.MetaDataset, list[str]]:
    """The meta-dataset (from the cache when it matches the arguments) and notes."""
    notes = []
    key = (
        args.quick,
        str(args.data_dir),
        args.no_images,
        args.image_pairs,
        args.image_rows,
        args.subsamples,
    )
    if args.cache and Path(args.cache).is_file():
        cached = load_meta_cache(args.cache, key)
        if cached is not None:
            log(f"meta-dataset from cache {args.cache}")
            return cached
    grid = ws.SurfaceGrid()
    max_rows = 120 if args.quick else 300
    tasks = ws.sklearn_tasks(seed=0, max_rows=max_rows, subsamples=args.subsamples)
    if args.quick:  # every third task: minutes instead of a quarter of an hour
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


def classical_features(meta: ws.MetaDataset, args) -> dict[str, dict[str, np.ndarray]]:
    """Raw pymfe vectors of every task for every group choice (computed per group, so the
    "all three" vector is the concatenation), cached beside the meta-dataset."""
    path = Path(f"{args.cache}.classical") if args.cache else None
    names = [t.name for t in meta.tasks]
    if path is not None and path.is_file():
        cached = load_cache(path)
        if json.loads(cached["tasks"]) == names:
            log(f"classical meta-features from cache {path}")
            return {
                choice: {n: v.numpy() for n, v in zip(names, cached[choice], strict=True)}
                for choice in GROUP_CHOICES
            }
    start = time.perf_counter()
    per_group: dict[str, list[np.ndarray]] = {g: [] for g in ws.CLASSICAL_GROUPS}
    for done, task in enumerate(meta.tasks, 1):
        for group in ws.CLASSICAL_GROUPS:
            per_group[group].append(ws.classical_meta_features(task.x, task.y, [group]))
        if done % 20 == 0 or done == len(meta.tasks):
            log(f"pymfe {done}/{len(meta.tasks)} ({time.perf_counter() - start:.0f} s)")
    tables = {g: np.stack(v) for g, v in per_group.items()}  # the single-group choices
    tables["all three"] = np.concatenate([tables[g] for g in ws.CLASSICAL_GROUPS], axis=1)
    if path is not None:
        state = {choice: torch.from_numpy(tables[choice]) for choice in GROUP_CHOICES}
        save_cache({"tasks": json.dumps(names), **state}, path)
    return {c: dict(zip(names, tables[c], strict=True)) for c in GROUP_CHOICES}


# ----------------------------------------------------------------------------- starts


def distinct_best_cells(grid: ws.SurfaceGrid, tasks, k: int) -> list[dict[str, int]]:
    """The first ``k`` distinct best cells of ``tasks`` in order (as warm_start_configs)."""
    cells: list[tuple[int, int]] = []
    for task in tasks:
        if task.best_cell() not in cells:
            cells.append(task.best_cell())
        if len(cells) == k:
            break
    return [grid.params(c) for c in cells]


def mean_surface_configs(starter: ws.WarmStarter, k: int) -> list[dict[str, int]]:
    """The ``k`` best cells of the mean meta-training surface (no meta-features)."""
    mean = np.mean([t.surface for t in starter.tasks], axis=0)
    order = np.argsort(mean, axis=None, kind="stable")[:k]
    return [starter.grid.params(np.unravel_index(int(i), mean.shape)) for i in order]


def random_neighbour_configs(starter, rng, k: int) -> list[dict[str, int]]:
    order = [starter.tasks[int(i)] for i in rng.permutation(len(starter.tasks))]
    return distinct_best_cells(starter.grid, order, k)


def pooled_starter(starter: ws.WarmStarter, cache: dict) -> ws.WarmStarter:
    """Neighbours by the network's *input*, mean-pooled over examples and standardised as the
    network standardises it: the untrained-pooling ablation, no network at all."""

    def featurize(task) -> torch.Tensor:
        if task.name not in cache:
            cache[task.name] = ws.instance_features(task.x, task.y)
        return (cache[task.name].mean(dim=0) - starter.net.shift) / starter.net.scale

    embeddings = torch.stack([featurize(t) for t in starter.tasks])
    return ws.WarmStarter(None, starter.tasks, embeddings, starter.grid, featurize=featurize)


def initial_regret(task: ws.Task, configs) -> float:
    values = [task.surface[c[ws.C_PARAM], c[ws.GAMMA_PARAM]] for c in configs]
    return float(ws.normalised_regret(np.array([min(values)]), task.surface)[0])


def nn_distance(starter: ws.WarmStarter, task: ws.Task) -> float:
    return ws.surface_distance(task.surface, starter.nearest(task, 1)[0][0].surface)


def validation_score(starter: ws.WarmStarter, tasks) -> tuple[float, float]:
    """(mean regret of the best of the 3 warm-start configs, mean NN surface distance) on
    validation tasks; compared as a tuple, so the distance breaks ties."""
    regret = np.mean([initial_regret(t, ws.warm_start_configs(starter, t, WARM)) for t in tasks])
    return float(regret), float(np.mean([nn_distance(starter, t) for t in tasks]))


def expected_min_regret(surface: np.ndarray, draws: int) -> float:
    """Expected normalised regret of the best of ``draws`` distinct uniformly random cells."""
    regret = np.sort(ws.normalised_regret(surface.ravel(), surface))[::-1]  # worst first
    g = len(regret)
    total = comb(g, draws)
    expected = 0.0
    for rank in range(g):  # rank 0 = worst; the min is at rank r when all draws are <= r
        p = (comb(rank + 1, draws) - comb(rank, draws)) / total
        expected += p * regret[rank]
    return expected


# ----------------------------------------------------------------------------- run


def argv_key(args) -> list:
    """The options that change a test family's results (a saved family is reused only
    when they match)."""
    return [args.quick, args.step_choices, args.trials, args.bo_tasks, args.seeds]


def run_family(fi, family, meta, args, classical, inst_cache, step_choices, seconds):
    """Choices on the validation family, then the test family ``family``: returns the
    choices and one record per held-out task; adds to ``seconds``."""
    families = meta.families
    search_cache: dict = {}
    valid_family = families[(fi + 1) % len(families)]
    valid = meta.family(valid_family)
    # ------------------------------------------------ choices, made on the validation family
    t0 = time.perf_counter()
    out = [family, valid_family]
    step_scores = {}
    for steps in step_choices:
        starter = ws.train_meta_features(
            meta, exclude_families=out, steps=steps, seed=0, feature_cache=inst_cache
        )
        step_scores[steps] = validation_score(starter, valid)
    group_scores = {
        choice: validation_score(
            ws.classical_warm_starter(
                meta,
                exclude_families=out,
                groups=GROUP_CHOICES[choice],
                features=classical[choice],
            ),  # fmt: skip
            valid,
        )
        for choice in GROUP_CHOICES
    }
    steps = min(step_scores, key=step_scores.get)
    groups = min(group_scores, key=group_scores.get)
    seconds["selection"] += time.perf_counter() - t0
    choice = {
        "validation_family": valid_family,
        "steps": steps,
        "steps_scores": {str(k): v for k, v in step_scores.items()},
        "groups": groups,
        "groups_scores": group_scores,
    }
    log(f"test {family}: chose steps={steps}, pymfe groups={groups} on {valid_family}")
    # ------------------------------------------------ the test family, read once
    held = meta.family(family)
    chosen = np.random.default_rng(100 + fi).choice(
        len(held), size=min(args.bo_tasks, len(held)), replace=False
    )
    searched = {held[int(i)].name for i in chosen}
    classical_starter = ws.classical_warm_starter(
        meta, exclude_families=[family], groups=GROUP_CHOICES[groups],
        features=classical[groups],
    )  # fmt: skip
    fam_records = {t.name: {"task": t.name, "family": family, "searched": t.name in searched,
                            "seeds": []} for t in held}  # fmt: skip
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        learned = ws.train_meta_features(
            meta, exclude_families=[family], steps=steps, seed=seed, feature_cache=inst_cache
        )
        untrained = ws.train_meta_features(
            meta, exclude_families=[family], steps=0, seed=seed, feature_cache=inst_cache
        )
        seconds["meta_training"] += time.perf_counter() - t0
        starters = {
            "learned": learned,
            "classical (pymfe)": classical_starter,
            "untrained network": untrained,
            "pooled inputs": pooled_starter(learned, inst_cache),
        }
        rng = np.random.default_rng([seed, fi])
        t0 = time.perf_counter()
        for index, task in enumerate(held):
            starts = {arm: ws.warm_start_configs(st, task, WARM) for arm, st in starters.items()}
            starts["random neighbours"] = random_neighbour_configs(learned, rng, WARM)
            starts["mean surface"] = mean_surface_configs(learned, WARM)
            row = {
                "initial": {arm: initial_regret(task, c) for arm, c in starts.items()},
                "nn_distance": {arm: nn_distance(st, task) for arm, st in starters.items()},
                "rank_correlation": {
                    arm: ws.surface_rank_correlation(st, [task]) for arm, st in starters.items()
                },
            }
            dists = [ws.surface_distance(task.surface, t.surface) for t in learned.tasks]
            row["nn_distance"]["random"] = float(np.mean(dists))
            row["nn_distance"]["oracle"] = float(np.min(dists))
            if task.name in searched:
                row["curves"] = {}
                for arm in ARMS:
                    configs = starts.get(arm, ())
                    # the sampler's seed only draws the cold start's random trials; warm
                    # searches use one seed per task, so equal starts are equal searches
                    bo_seed = 1000 * (100 * fi + index) + (seed if arm == "cold" else 0)
                    key = (task.name, json.dumps(configs), bo_seed)
                    if key not in search_cache:  # arms that agree share one search
                        best = ws.surface_search(
                            task.surface, meta.grid, warm_start=configs,
                            n_trials=args.trials, seed=bo_seed,
                        )  # fmt: skip
                        search_cache[key] = ws.normalised_regret(best, task.surface).tolist()
                    row["curves"][arm] = search_cache[key]
            fam_records[task.name]["seeds"].append(row)
        seconds["search"] += time.perf_counter() - t0
    log(f"test {family}: {len(held)} tasks, {len(searched)} searched; " + ", ".join(
        f"{arm} {np.mean([r['seeds'][s]['curves'][arm][4] for r in fam_records.values() for s in range(args.seeds) if r['searched']]):.3f}"  # noqa: E501
        for arm in ARMS) + " (regret after 5)")  # fmt: skip
    return choice, list(fam_records.values())


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
    parser.add_argument("--image-pairs", type=int, default=30)
    parser.add_argument("--image-rows", type=int, default=200)
    parser.add_argument("--subsamples", type=int, default=2, help="see search.sklearn_tasks")
    parser.add_argument("--step-choices", default="100,400", help="meta-training steps")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--bo-tasks", type=int, default=15, help="searched tasks per family")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--families",
        default=None,
        help="comma-separated test families to run now (with --cache: each family's results "
        "are saved beside the cache and reused, so runs for different families can share "
        "the work; the report is written once every family is done)",
    )
    parser.add_argument(
        "--cache",
        type=str,
        default=None,
        help="cache file of the meta-dataset (tensors + JSON; reused when the options match); "
        "the pymfe vectors go to <cache>.classical",
    )
    args = parser.parse_args()
    argv = sys.argv[1:]
    if args.quick:
        args.step_choices, args.bo_tasks, args.subsamples = "100,400", 4, 1
    step_choices = [int(s) for s in args.step_choices.split(",")]
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    machine = machine_info()
    started, cpu_started = time.perf_counter(), time.process_time()
    meta, notes = build(args)
    seconds = {"surfaces": time.perf_counter() - started}
    families = meta.families
    log(f"{len(meta.tasks)} tasks in families {[(f, len(meta.family(f))) for f in families]}")
    t0 = time.perf_counter()
    classical = classical_features(meta, args)
    seconds["pymfe"] = time.perf_counter() - t0
    sampler_name = type(ws.gp_sampler()).__name__

    inst_cache: dict = {}
    for name in ("selection", "meta_training", "search"):
        seconds[name] = 0.0
    choices, records = {}, []
    partial_dir = Path(f"{args.cache}.families") if args.cache else None
    settings = json.dumps([argv_key(args), [t.name for t in meta.tasks]])
    only = set(args.families.split(",")) if args.families else set(families)
    for fi, family in enumerate(families):
        saved = partial_dir / f"{family}.json" if partial_dir else None
        if saved is not None and saved.is_file():
            part = json.loads(saved.read_text())
            if part["settings"] == settings:
                log(f"test {family}: results from {saved}")
                choices[family], records = part["choices"], records + part["records"]
                for name, value in part["seconds"].items():
                    seconds[name] += value
                continue
        if family not in only:
            continue
        spent = {"selection": 0.0, "meta_training": 0.0, "search": 0.0}
        choice, fam_records = run_family(
            fi, family, meta, args, classical, inst_cache, step_choices, spent
        )
        choices[family], records = choice, records + fam_records
        for name, value in spent.items():
            seconds[name] += value
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({"settings": settings, "choices": choice,
                                         "records": fam_records, "seconds": spent}))  # fmt: skip
    if set(choices) != set(families):
        log(f"done {sorted(choices)}; the report needs every family ({list(families)})")
        return

    seconds["phases"] = sum(seconds.values())
    seconds["total"] = time.perf_counter() - started
    seconds["total_cpu"] = time.process_time() - cpu_started
    result = summarise(records, args, families, meta)
    result.update(
        benchmark="warmstart_bo",
        machine=machine,
        rerun=rerun_command("warmstart_bo.py", argv),
        quick=args.quick,
        sampler=sampler_name,
        data=notes,
        families={f: len(meta.family(f)) for f in families},
        grid={
            "log10_C": meta.grid.log10_C,
            "log10_gamma_d": meta.grid.log10_gamma_d,
            "folds": meta.grid.folds,
        },  # fmt: skip
        step_choices=step_choices,
        group_choices={k: list(v) for k, v in GROUP_CHOICES.items()},
        choices=choices,
        trials=args.trials,
        seeds=args.seeds,
        seconds=seconds,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warmstart_bo.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "warmstart_bo.md").write_text(markdown(result))
    plot(result, args.out / "warmstart_bo.png")
    print(markdown(result))


def _mean_se(values) -> dict:
    values = np.asarray(values, dtype=float)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "se": float(se), "n": len(values)}


def summarise(records, args, families, meta) -> dict:
    searched = [r for r in records if r["searched"]]
    at = [n for n in REPORT_AT if n <= args.trials]
    # per task: the mean over seeds of the regret curve (rows: tasks, columns: evaluations)
    per_task = {
        arm: np.array([np.mean([s["curves"][arm] for s in r["seeds"]], axis=0) for r in searched])
        for arm in ARMS
    }
    per_seed = {
        arm: np.array([[r["seeds"][s]["curves"][arm] for r in searched] for s in range(args.seeds)])
        for arm in ARMS
    }
    curves = {
        arm: {
            "mean": per_task[arm].mean(axis=0).tolist(),
            "se": (per_task[arm].std(axis=0, ddof=1) / np.sqrt(len(searched))).tolist(),
            "seed_means": {str(n): per_seed[arm][:, :, n - 1].mean(axis=1).tolist() for n in at},
            "tasks": len(searched),
        }
        for arm in ARMS
    }
    paired = {}
    for arm in ARMS:
        if arm == "learned":
            continue
        diff = per_task["learned"] - per_task[arm]  # negative: learned has lower regret
        paired[arm] = {
            str(n): {
                **_mean_se(diff[:, n - 1]),
                "learned_better": float(np.mean(diff[:, n - 1] < 0)),
                "other_better": float(np.mean(diff[:, n - 1] > 0)),
            }
            for n in at
        }
    vs_cold = {}
    for arm in ARMS[1:]:
        diff = per_task[arm] - per_task["cold"]
        vs_cold[arm] = {
            str(n): {
                **_mean_se(diff[:, n - 1]),
                "warm_better": float(np.mean(diff[:, n - 1] < 0)),
                "cold_better": float(np.mean(diff[:, n - 1] > 0)),
            }
            for n in at
        }

    def task_mean(getter):
        return np.array([np.mean([getter(s) for s in r["seeds"]]) for r in records])

    nn_arms = (*FEATURE_ARMS, "random", "oracle")
    nn = {arm: task_mean(lambda s, a=arm: s["nn_distance"][a]) for arm in nn_arms}
    rank = {arm: task_mean(lambda s, a=arm: s["rank_correlation"][a]) for arm in FEATURE_ARMS}
    initial_arms = (*FEATURE_ARMS, "random neighbours", "mean surface")
    initial = {arm: task_mean(lambda s, a=arm: s["initial"][a]) for arm in initial_arms}
    initial["cold (expected, 3 random cells)"] = np.array(
        [
            expected_min_regret(
                meta.tasks[[t.name for t in meta.tasks].index(r["task"])].surface, WARM
            )
            for r in records
        ]  # fmt: skip
    )
    initial_paired = {
        arm: {
            **_mean_se(initial["learned"] - initial[arm]),
            "learned_better": float(np.mean(initial["learned"] < initial[arm])),
            "other_better": float(np.mean(initial["learned"] > initial[arm])),
        }  # fmt: skip
        for arm in initial
        if arm != "learned"
    }
    per_family = {}
    for family in families:
        rows = [i for i, r in enumerate(searched) if r["family"] == family]
        every = [i for i, r in enumerate(records) if r["family"] == family]
        per_family[family] = {
            "tasks": len(every),
            "searched": len(rows),
            "regret_at_5": {arm: float(per_task[arm][rows, 4].mean()) for arm in ARMS},
            "regret_at_10": {
                arm: float(per_task[arm][rows, min(9, args.trials - 1)].mean()) for arm in ARMS
            },  # fmt: skip
            "rank_correlation": {arm: float(rank[arm][every].mean()) for arm in FEATURE_ARMS},
        }
    return {
        "curves": curves,
        "paired_learned_minus_other": paired,
        "paired_arm_minus_cold": vs_cold,
        "nearest_neighbour_surface_distance": {a: _mean_se(v) for a, v in nn.items()},
        "rank_correlation": {a: _mean_se(v) for a, v in rank.items()},
        "rank_correlation_learned_minus": {
            a: {
                **_mean_se(rank["learned"] - rank[a]),
                "learned_better": float(np.mean(rank["learned"] > rank[a])),
            }  # fmt: skip
            for a in FEATURE_ARMS[1:]
        },
        "initial_3_regret": {a: _mean_se(v) for a, v in initial.items()},
        "initial_3_learned_minus": initial_paired,
        "held_out_tasks": len(records),
        "per_family": per_family,
    }


# ----------------------------------------------------------------------------- report


def _fmt(v: dict, digits: int = 4) -> str:
    return f"{v['mean']:.{digits}f} ± {v['se']:.{digits}f}"


def markdown(r: dict) -> str:
    c = r["curves"]
    at = [n for n in REPORT_AT if n <= r["trials"]]
    m = r["machine"]
    sec = r["seconds"]
    lines = [
        "# Warm-started Bayesian optimisation: learned vs classical vs untrained meta-features",
        "",
        "Kim, Kim, Choi 2017 (papers.md section 13); issue 21 part 5.",
        "",
        f"{m['date']}, {m['platform']}, {m['cpu_count']} cores, torch {m['torch']} "
        f"({m['torch_threads']} thread), load average at start "
        f"{', '.join(f'{v:.1f}' for v in m['load_average_at_start'] or [])}; "
        f"wall time {sec['phases']:.0f} s (surfaces {sec['surfaces']:.0f} s, pymfe "
        f"{sec['pymfe']:.0f} s, choices {sec['selection']:.0f} s, meta-training "
        f"{sec['meta_training']:.0f} s, search {sec['search']:.0f} s; summed over the processes "
        "that ran the families)"
        f"{' (quick)' if r['quick'] else ''}.",
        f"Rerun: `{r['rerun']}`.",
        "",
        f"Sampler: Optuna {r['sampler']}; {r['trials']} evaluations per search; {r['seeds']} "
        "seeds (seed s: network init and training, random neighbours, cold start, sampler).",
        "Families (tasks): " + ", ".join(f"{k} ({v})" for k, v in r["families"].items()) + ".",
        "Image data: " + ("; ".join(r["data"]) if r["data"] else "-") + ".",
        "",
        "**Protocol.** Leave-family-out: each family is the test family once. Its validation "
        "family is the next one in the list; with both left out, the meta-training steps "
        f"(from {r['step_choices']}) and the pymfe groups (from "
        f"{list(r['group_choices'])}) were chosen by the regret of the best of the 3 warm-start "
        "configurations on the validation tasks. Then the chosen settings were refitted on every "
        "family but the test family, whose tasks were read once. Choices: "
        + "; ".join(
            f"{f}: {v['steps']} steps, {v['groups']} (on {v['validation_family']})"
            for f, v in r["choices"].items()
        )
        + ".",
        "",
        f"## Regret after n evaluations ({c['cold']['tasks']} searched held-out tasks)",
        "",
        "Mean normalised regret (best so far - min) / (max - min); per task the mean over the "
        "seeds, ± standard error over tasks:",
        "",
        "| start | " + " | ".join(f"{n} eval" for n in at) + " |",
        "|---|" + "---:|" * len(at),
    ]
    for arm in ARMS:
        s = c[arm]
        cells = [f"{s['mean'][n - 1]:.4f} ± {s['se'][n - 1]:.4f}" for n in at]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean over tasks for each seed (the seed-to-seed spread), after 5 and 10 evaluations:",
        "",
        "| start | 5 eval, per seed | 10 eval, per seed |",
        "|---|---|---|",
    ]
    for arm in ARMS:
        sm = c[arm]["seed_means"]
        cells = [", ".join(f"{v:.4f}" for v in sm[str(n)]) for n in (5, 10) if str(n) in sm]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Paired: learned minus each other start",
        "",
        "Regret of learned minus the other start on the same task (negative: learned is better); "
        "± SE over tasks; (share of tasks where learned / the other is strictly better):",
        "",
        "| other start | " + " | ".join(f"{n} eval" for n in at) + " |",
        "|---|" + "---:|" * len(at),
    ]
    for arm, rows in r["paired_learned_minus_other"].items():
        cells = [
            f"{v['mean']:+.4f} ± {v['se']:.4f} ({100 * v['learned_better']:.0f}% / "
            f"{100 * v['other_better']:.0f}%)"
            for v in rows.values()
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each start minus cold (negative: the warm start is better; share warm / cold better):",
        "",
        "| start | " + " | ".join(f"{n} eval" for n in at) + " |",
        "|---|" + "---:|" * len(at),
    ]
    for arm, rows in r["paired_arm_minus_cold"].items():
        cells = [
            f"{v['mean']:+.4f} ± {v['se']:.4f} ({100 * v['warm_better']:.0f}% / "
            f"{100 * v['cold_better']:.0f}%)"
            for v in rows.values()
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    nb, rk, ini = (
        r["nearest_neighbour_surface_distance"],
        r["rank_correlation"],
        r["initial_3_regret"],
    )
    lines += [
        "",
        f"## Neighbour quality on all {r['held_out_tasks']} held-out tasks (seeds averaged)",
        "",
        "Surface distance (mean |e_i - e_j| over the 100 cells) to the nearest meta-training task; "
        "Spearman rank correlation of meta-feature distance with surface distance over the "
        "meta-training tasks (`search.surface_rank_correlation`, per held-out task); regret of "
        "the best of the 3 warm-start configurations (± SE over tasks):",
        "",
        "| meta-features | NN surface distance | rank correlation | best of first 3 |",
        "|---|---:|---:|---:|",
    ]
    for arm in FEATURE_ARMS:
        lines.append(f"| {arm} | {_fmt(nb[arm])} | {_fmt(rk[arm], 3)} | {_fmt(ini[arm])} |")
    lines += [
        f"| random neighbours | {_fmt(nb['random'])} (mean) | - | "
        f"{_fmt(ini['random neighbours'])} |",
        f"| mean surface | - | - | {_fmt(ini['mean surface'])} |",
        f"| oracle (true nearest surface) | {_fmt(nb['oracle'])} | 1 | - |",
        f"| cold (3 random cells, expected) | - | - | "
        f"{_fmt(ini['cold (expected, 3 random cells)'])} |",
        "",
        "Learned minus other, paired over tasks: rank correlation "
        + "; ".join(
            f"{a} {v['mean']:+.3f} ± {v['se']:.3f} (learned higher on "
            f"{100 * v['learned_better']:.0f}%)"
            for a, v in r["rank_correlation_learned_minus"].items()
        )
        + "; best of first 3 "
        + "; ".join(
            f"{a} {v['mean']:+.4f} ± {v['se']:.4f} ({100 * v['learned_better']:.0f}% / "
            f"{100 * v['other_better']:.0f}%)"
            for a, v in r["initial_3_learned_minus"].items()
        )
        + ".",
        "",
        "## Per held-out family (regret after 5 evaluations; rank correlation)",
        "",
        "| family | tasks | searched | "
        + " | ".join(ARMS)
        + " | rank corr. "
        + " / ".join(FEATURE_ARMS)
        + " |",
        "|---|---:|---:|" + "---:|" * len(ARMS) + "---|",
    ]
    for fam, v in r["per_family"].items():
        a = v["regret_at_5"]
        rc = " / ".join(f"{v['rank_correlation'][x]:.2f}" for x in FEATURE_ARMS)
        lines.append(
            f"| {fam} | {v['tasks']} | {v['searched']} | "
            + " | ".join(f"{a[arm]:.4f}" for arm in ARMS)
            + f" | {rc} |"
        )
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    styles = ("-", "-", "--", ":", ":", "-.", "--")
    for arm, style in zip(ARMS, styles, strict=True):
        mean, se = np.array(r["curves"][arm]["mean"]), np.array(r["curves"][arm]["se"])
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, mean, style, label=arm, marker="o", ms=3)
        # a log axis: the band's lower edge is clipped where it would reach zero
        ax.fill_between(x, np.maximum(mean - se, 1e-4), mean + se, alpha=0.15)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("mean normalised regret (± SE)")
    ax.set_yscale("log")
    ax.set_xticks([n for n in REPORT_AT if n <= r["trials"]])
    ax.set_title(f"GP-EI on held-out families ({r['curves']['cold']['tasks']} tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
