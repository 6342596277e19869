"""The learned optimizer against tuned, scheduled Adam on unseen tasks, under the protocol.

Issue 21's headline (Metz et al. 2020, papers.md sections 15-18): does a learned optimizer
beat tuned Adam with a schedule on tasks it never saw?  Protocol ``make_splits(seed=0)``
(``hypergradient.learned``), with every choice made before meta-test is read:

* **models** -- the hierarchical optimizer (``HierarchicalLearnedOptimizer``: per-tensor LSTM
  conditioning a per-parameter MLP, hidden 16, LSTM 16, conditioning 4) is the headline; the
  per-parameter MLP optimizer (hidden 16) is its ablation.  Sizes fixed before the run.
* **meta-training** -- on the first ``--train-configs`` meta-train configurations (in the
  split's declared, shuffled order: digits / MNIST, MLPs and CNNs, relu and tanh), each its
  own family, cycled uniformly (no suite weights); episodes of T steps, truncations of K = 10,
  meta-loss the log of the full training loss (fixed, not tuned), Adam on theta decaying
  along a half cosine to a tenth, clipping 1, ``--pairs`` antithetic pairs (truncated
  backprop: twice as many particles, so every estimator runs the same inner steps).
* **selection on meta-validation** -- the estimator (truncated backprop, ES, PES, mixed) and
  the meta learning rate of the hierarchical optimizer, then the MLP ablation's meta
  learning rate with that estimator, each by a ``--select-steps`` run on selection seed 100,
  scored by the mean final training loss after T steps on the first ``--valid-tasks``
  meta-validation configurations (instance ``replicate=0``).  Recorded in a
  ``SelectionLog``; so is the meta-training set (theta is "selected" on meta-train).
* **baselines** -- read from ``learned_optimizer_protocol.json`` (Adam and SGD-momentum,
  constant and warm-up + cosine, rates tuned on meta-validation per seed) and evaluated on
  the very same meta-test instances; this script refuses a record of another protocol,
  horizon or seed count.
* **meta-test, once** -- each reported seed's optimizer (meta-training seed s, s = 0, 1, 2)
  trains every meta-test configuration of the baseline record (instance ``replicate=s``,
  as the baselines' seed s) for T, 5T and 10T steps, progress t/T stretched to the run as
  the baselines' schedules are; final full training loss and the held-out loss (the data
  set's validation pool, never trained on).  Wall time per step against Adam is measured
  interleaved in one process on six meta-test configurations.

Run from the repository root (after the protocol's baselines)::

    HYPERGRADIENT_DATA=/path/to/datasets python benchmarks/learned_optimizer_headline.py
    python benchmarks/learned_optimizer_headline.py --quick      # ~3 minute smoke run

Writes ``<out>/learned_optimizer_headline.{json,md,png}`` (``_quick`` for ``--quick``).
Meta-trained thetas and selection runs are cached in ``--work`` (plain tensors, read with
``weights_only=True``), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
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
from _common import data_source, load_cache, machine_info, rerun_command, save_cache, write_outputs
from learned_optimizer_estimators import run_one
from learned_optimizer_protocol import part_of

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
NAME = "learned_optimizer_headline"
SELECTION_SEED = 100
MODELS = ("hierarchical", "mlp")
HEADLINE = "hierarchical"
REFERENCE = "adam-warmup_cosine"  # the claim: beat tuned Adam with a schedule


def make_optimizer(model: str) -> learned.AbstractLearnedOptimizer:
    if model == "hierarchical":
        return learned.HierarchicalLearnedOptimizer(hidden=16, rnn_hidden=16, cond=4)
    return learned.MLPLearnedOptimizer(hidden=16)


def read_baselines(path: Path, splits) -> dict:
    """The protocol benchmark's record, checked to be of this protocol."""
    if not path.exists():
        raise SystemExit(
            f"{path} does not exist; run benchmarks/learned_optimizer_protocol.py first (its "
            f"meta-test baselines are what the learned optimizer is compared with)."
        )
    record = json.loads(path.read_text())
    if record["protocol"]["hashes"] != splits.hashes():
        raise SystemExit(f"{path} was written under another protocol (split hashes differ).")
    learned.check_selections(record)
    return record


def meta_train_one(
    model: str,
    estimator: str,
    meta_lr: float,
    seed: int,
    families,
    eval_tasks,
    args,
    work: Path,
    tag: str,
) -> dict:
    """Meta-train (or load the cached result of) one run; returns theta and its curve."""
    settings = {
        "model": model,
        "estimator": estimator,
        "meta_lr": meta_lr,
        "seed": seed,
        "families": [f.name for f in families],
        "steps": args.select_steps if tag == "select" else args.outer_steps,
        "horizon": args.horizon,
        "truncation": args.truncation,
        "pairs": args.pairs,
        "sigma": args.sigma,
        "eval_every": args.eval_every,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = work / f"{tag}-{model}-{estimator}-{meta_lr:g}-s{seed}-{key}.pt"
    if cache.exists():
        state = load_cache(cache)
        return {"theta": state["theta"], **json.loads(state["record"])}
    run = run_one(
        estimator,
        meta_lr,
        seed,
        make_optimizer(model),
        families,
        eval_tasks,
        horizon=args.horizon,
        truncation=args.truncation,
        pairs=args.pairs,
        outer_steps=settings["steps"],
        eval_every=args.eval_every,
        sigma=args.sigma,
    )
    theta = run.pop("theta")
    record = {
        "settings": settings,
        **{
            k: run[k]
            for k in ("curve", "final_valid_loss", "meta_train_seconds", "train_meta_loss")
        },
    }
    save_cache({"theta": theta, "record": json.dumps(record)}, cache)
    return {"theta": theta, **record}


def select(args, splits, log, families, valid_configs, work: Path) -> tuple[dict, list]:
    """Estimator and meta learning rate of the headline model, then the ablation's rate."""
    select_tasks = [c.task(args.horizon, data_dir=args.data_dir) for c in valid_configs]
    runs = []
    scores: dict[str, float] = {}
    for estimator in args.estimators:
        for lr in args.lr_grid:
            run = meta_train_one(
                HEADLINE,
                estimator,
                lr,
                SELECTION_SEED,
                families,
                select_tasks,
                args,
                work,
                "select",
            )
            scores[f"{estimator}@{lr:g}"] = run["final_valid_loss"]
            runs.append({k: v for k, v in run.items() if k != "theta"})
            print(f"select {HEADLINE} {estimator} lr={lr:g}: {run['final_valid_loss']:.4f}")
    best = min(scores, key=scores.get)
    estimator, lr = best.split("@")[0], float(best.split("@")[1])
    evidence = {"final_valid_loss": scores, "seed": SELECTION_SEED, "replicate": 0}
    log.record(f"{HEADLINE}.estimator", estimator, valid_configs, evidence)
    log.record(f"{HEADLINE}.meta_lr", lr, valid_configs, evidence)
    chosen = {HEADLINE: {"estimator": estimator, "meta_lr": lr}}
    ablation_scores: dict[str, float] = {}
    for alr in args.lr_grid:
        run = meta_train_one(
            "mlp", estimator, alr, SELECTION_SEED, families, select_tasks, args, work, "select"
        )
        ablation_scores[f"{alr:g}"] = run["final_valid_loss"]
        runs.append({k: v for k, v in run.items() if k != "theta"})
        print(f"select mlp {estimator} lr={alr:g}: {run['final_valid_loss']:.4f}")
    best_lr = min(args.lr_grid, key=lambda v: ablation_scores[f"{v:g}"])
    log.record(
        "mlp.meta_lr",
        best_lr,
        valid_configs,
        {"final_valid_loss_by_lr": ablation_scores, "estimator": estimator, "seed": SELECTION_SEED},
    )
    chosen["mlp"] = {"estimator": estimator, "meta_lr": best_lr}
    return chosen, runs


def score_learned(model: str, theta, configs, steps: int, replicate: int, data_dir) -> list:
    lopt = make_optimizer(model)
    tasks = [c.task(steps, data_dir=data_dir, replicate=replicate) for c in configs]
    ev = learned.evaluate_learned(lopt, theta, tasks, steps)
    out = []
    for train, heldout in zip(ev.final_losses, ev.final_valid_losses):
        bad = not (math.isfinite(train) and math.isfinite(heldout))
        out.append({"train": math.inf if bad else train, "heldout": math.inf if bad else heldout})
    return out


def time_per_step(args, test_configs, settings, thetas: dict, baselines: dict) -> dict:
    """Seconds per training step of each optimizer over Adam's (constant rate), interleaved:
    each round trains every timed configuration once with every optimizer, order rotated."""
    parts = {}
    for c in test_configs:  # two configurations of each meta-test part
        parts.setdefault(part_of(c, settings), [])
        if len(parts[part_of(c, settings)]) < 2:
            parts[part_of(c, settings)].append(c)
    configs = [c for group in parts.values() for c in group]
    steps = args.timing_steps
    names = ["adam-constant", *baselines, *MODELS]
    names = list(dict.fromkeys(names))
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(args.timing_rounds):
        for c in configs:
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                t0 = time.perf_counter()
                if name in MODELS:
                    score_learned(name, thetas[name], [c], steps, 0, args.data_dir)
                else:
                    learned.evaluate_baseline(baselines[name], [c], steps, data_dir=args.data_dir)
                seconds[name].append((time.perf_counter() - t0) / steps)
    ratios = {}
    for name in names:
        per = [s / a for s, a in zip(seconds[name], seconds["adam-constant"])]
        ratios[name] = {
            "median_ratio": statistics.median(per),
            "ratio_quartiles": statistics.quantiles(per, n=4) if len(per) > 1 else per * 3,
            "median_seconds_per_step": statistics.median(seconds[name]),
        }
    return {"configs": [c.config_id for c in configs], "steps": steps, "ratios": ratios}


def summarize(scores_by_seed: list[list[dict]], key: str, mask=None) -> dict:
    """Per seed the median over tasks, then mean and std over seeds."""
    medians = []
    for runs in scores_by_seed:
        values = [r[key] for i, r in enumerate(runs) if mask is None or mask[i]]
        medians.append(statistics.median(values))
    return {
        "per_seed": medians,
        "mean": statistics.fmean(medians),
        "std": statistics.stdev(medians) if len(medians) > 1 else 0.0,
    }


def verdict(cmp: dict) -> str:
    if cmp["sign_test_p"] < 0.05 and cmp["wins"] > cmp["losses"]:
        return "learned better"
    if cmp["sign_test_p"] < 0.05 and cmp["losses"] > cmp["wins"]:
        return "baseline better"
    return "no significant difference"


def study(args) -> dict:
    splits = learned.make_splits(seed=0)
    base_record = read_baselines(args.baselines, splits)
    if base_record["horizon"] != args.horizon:
        raise SystemExit(
            f"the baseline record ran T = {base_record['horizon']}, this run T = "
            f"{args.horizon}; pass --horizon {base_record['horizon']}."
        )
    seeds = base_record["seeds"] if args.seeds is None else args.seeds
    if seeds > base_record["seeds"]:
        raise SystemExit(f"the baseline record has {base_record['seeds']} seeds, asked {seeds}.")
    by_id = {c.config_id: c for c in splits.meta_test}
    test_configs = [by_id[i] for i in base_record["meta_test_used"]][: args.test_tasks]
    num_test = len(test_configs)
    train_configs = list(splits.meta_train[: args.train_configs])
    valid_configs = list(splits.meta_valid[: args.valid_tasks])
    families = [c.family(args.data_dir) for c in train_configs]
    log = learned.SelectionLog(splits)
    log.record(
        "meta_training_set",
        [c.config_id for c in train_configs],
        train_configs,
        {"note": "theta of every learned optimizer is fitted on these configurations only"},
    )
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    chosen, selection_runs = select(args, splits, log, families, valid_configs, work)
    # reported runs: meta-validation curves on fresh instances (replicate 1)
    report_tasks = [
        c.task(args.horizon, data_dir=args.data_dir, replicate=1) for c in valid_configs
    ]
    runs: dict[str, list[dict]] = {m: [] for m in MODELS}
    train_seeds = range(seeds) if args.meta_train_seeds is None else args.meta_train_seeds
    for seed in train_seeds:
        for model in MODELS:  # interleaved, so machine load hits both alike
            c = chosen[model]
            run = meta_train_one(
                model,
                c["estimator"],
                c["meta_lr"],
                seed,
                families,
                report_tasks,
                args,
                work,
                "report",
            )
            runs[model].append(run)
            print(
                f"seed {seed} {model}: meta-valid {run['final_valid_loss']:.4f} "
                f"({run['meta_train_seconds']:.0f} s)",
                flush=True,
            )
    meta_train_seconds = time.perf_counter() - started
    if args.meta_train_only:
        raise SystemExit(f"meta-training cached in {work}; rerun without --meta-train-only.")

    # meta-test, once: every reported optimizer on the baselines' meta-test instances
    horizons = [args.horizon, 5 * args.horizon, 10 * args.horizon]
    scores: dict[str, dict[str, list[list[dict]]]] = {}
    for model in MODELS:
        scores[model] = {}
        for steps in horizons:
            scores[model][str(steps)] = [
                score_learned(model, runs[model][s]["theta"], test_configs, steps, s, args.data_dir)
                for s in range(seeds)
            ]
            print(f"meta-test {model} at {steps} steps done", flush=True)
    for name, by_steps in base_record["meta_test_scores"].items():
        scores[name] = {
            str(steps): [runs_[:num_test] for runs_ in by_steps[str(steps)][:seeds]]
            for steps in horizons
        }
    names = list(scores)

    tuned = {
        name: learned.Baseline(*name.split("-", 1), lr=base_record["tuned_lr"][name][0])
        for name in base_record["tuned_lr"]
    }
    thetas = {m: runs[m][0]["theta"] for m in MODELS}
    timing = time_per_step(args, test_configs, splits.settings, thetas, tuned)

    table = {
        name: {
            str(s): {k: summarize(scores[name][str(s)], k) for k in ("train", "heldout")}
            for s in horizons
        }
        for name in names
    }
    settings = splits.settings
    parts = sorted({part_of(c, settings) for c in test_configs})
    by_part = {
        name: {
            part: summarize(
                scores[name][str(args.horizon)],
                "train",
                [part_of(c, settings) == part for c in test_configs],
            )
            for part in parts
        }
        for name in names
    }
    paired = []
    for other in [n for n in names if n != HEADLINE]:
        for steps in horizons:
            for key in ("train", "heldout"):
                a = [r[key] for runs_ in scores[HEADLINE][str(steps)] for r in runs_]
                b = [r[key] for runs_ in scores[other][str(steps)] for r in runs_]
                cmp = learned.paired_comparison(a, b).__dict__
                paired.append(
                    {
                        "learned": HEADLINE,
                        "against": other,
                        "steps": steps,
                        "metric": key,
                        **cmp,
                        "verdict": verdict(cmp),
                    }
                )
    for steps in horizons:  # the ablation against the claim's baseline
        for key in ("train", "heldout"):
            a = [r[key] for runs_ in scores["mlp"][str(steps)] for r in runs_]
            b = [r[key] for runs_ in scores[REFERENCE][str(steps)] for r in runs_]
            cmp = learned.paired_comparison(a, b).__dict__
            paired.append(
                {
                    "learned": "mlp",
                    "against": REFERENCE,
                    "steps": steps,
                    "metric": key,
                    **cmp,
                    "verdict": verdict(cmp),
                }
            )
    record = log.to_dict()
    return {
        "benchmark": NAME,
        "protocol": {"settings": dict(splits.settings), "hashes": splits.hashes()},
        "selections": record["selections"],
        "chosen": chosen,
        "horizon": args.horizon,
        "horizons": horizons,
        "seeds": seeds,
        "meta_train_configs": [c.config_id for c in train_configs],
        "meta_train_families": [f.name for f in families],
        "meta_valid_used": [c.config_id for c in valid_configs],
        "meta_test_used": [c.config_id for c in test_configs],
        "baseline_record": {
            "file": args.baselines.name,
            "tuned_lr": base_record["tuned_lr"],
            "command": base_record["command"],
        },
        "selection_runs": selection_runs,
        "runs": {
            m: [{k: v for k, v in r.items() if k != "theta"} for r in runs[m]] for m in MODELS
        },
        "meta_test": table,
        "meta_test_by_part_at_T": by_part,
        "paired": paired,
        "timing": timing,
        "meta_test_scores": {n: scores[n] for n in MODELS},
        "meta_train_seconds": meta_train_seconds,
        "total_seconds": time.perf_counter() - started,
    }


def markdown(result: dict) -> str:
    cfg = result["config"]
    horizons = result["horizons"]
    chosen = result["chosen"]

    def fmt(s: dict) -> str:
        return f"{s['mean']:.3f} ± {s['std']:.3f}"

    base_lrs = result["baseline_record"]["tuned_lr"]
    hashes = result["protocol"]["hashes"]
    rates = "; ".join(f"{n} " + ", ".join(f"{v:.3g}" for v in base_lrs[n]) for n in base_lrs)
    lines = [
        "# Learned optimizers against tuned, scheduled baselines on meta-test (issue 21)",
        "",
        f"Protocol `make_splits(0)` (hashes meta-train `{hashes['meta_train'][:12]}`,"
        f" meta-valid `{hashes['meta_valid'][:12]}`, meta-test "
        f"`{hashes['meta_test'][:12]}`). Meta-trained on "
        f"{len(result['meta_train_configs'])} meta-train configurations "
        f"({', '.join(result['meta_train_families'])}), uniformly cycled, episodes of T = "
        f"{result['horizon']}, truncations K = {cfg['truncation']}, {cfg['pairs']} antithetic "
        f"pairs (truncated backprop {2 * cfg['pairs']} particles), {cfg['outer_steps']} outer "
        f"steps, meta-loss log full training loss, Adam on theta with half-cosine decay to a "
        f"tenth.",
        "",
        f"Chosen on meta-validation ({len(result['meta_valid_used'])} configurations, instance "
        f"replicate 0, {cfg['select_steps']}-step runs on selection seed {SELECTION_SEED}, "
        f"score = mean final training loss after T steps): hierarchical estimator "
        f"**{chosen['hierarchical']['estimator']}**, meta lr {chosen['hierarchical']['meta_lr']:g}"
        f" (grid: estimators {cfg['estimators']} x lr {cfg['lr_grid']}); MLP ablation, same "
        f"estimator, meta lr {chosen['mlp']['meta_lr']:g}. Baselines from "
        f"`{result['baseline_record']['file']}`: rates tuned per seed on meta-validation "
        f"({rates}). `check_selections` passes on "
        f"this record (nothing chosen on meta-test; theta fitted on meta-train only).",
        "",
        f"Meta-test, read once: {len(result['meta_test_used'])} configurations (held-out "
        f"configurations, held-out activation gelu, held-out data set Fashion-MNIST), trained "
        f"for T, 5T and 10T steps (learned optimizers read t over the run's length, baselines' "
        f"schedules are stretched to it; rates and theta fitted at T). Entries: median over "
        f"tasks, then mean ± std over {result['seeds']} seeds (meta-training seed s scores task "
        f"instance s, the instance the baselines' seed s trained). Held-out loss: cross-entropy "
        f"on the data set's validation pool. Time per step: median over "
        f"{len(result['timing']['configs'])} meta-test configurations x {cfg['timing_rounds']} "
        f"interleaved rounds of {result['timing']['steps']} steps, relative to Adam at a "
        f"constant rate (gradient included; the hierarchical optimizer also evaluates a "
        f"validation batch each step, which it reads).",
        "",
        "| optimizer | "
        + " | ".join(f"train {s} | held-out {s}" for s in horizons)
        + " | time / step vs Adam |",
        "|---|" + "---|---|" * len(horizons) + "---|",
    ]
    for name, row in result["meta_test"].items():
        label = {"hierarchical": "**hierarchical (learned)**", "mlp": "MLP (learned, ablation)"}
        cells = " | ".join(
            f"{fmt(row[str(s)]['train'])} | {fmt(row[str(s)]['heldout'])}" for s in horizons
        )
        ratio = result["timing"]["ratios"][name]["median_ratio"]
        lines.append(f"| {label.get(name, name)} | {cells} | {ratio:.2f}x |")
    lines += [
        "",
        f"Paired on meta-test ({len(result['meta_test_used'])} tasks x {result['seeds']} seeds; "
        f"win = lower loss for the learned optimizer; exact sign test and Wilcoxon signed-rank; "
        f"verdict at p < 0.05 by the sign test):",
        "",
        "| learned | against | steps | metric | wins | losses | ties | sign p | Wilcoxon p | "
        "median diff | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["paired"]:
        lines.append(
            f"| {p['learned']} | {p['against']} | {p['steps']} | {p['metric']} | {p['wins']} | "
            f"{p['losses']} | {p['ties']} | {p['sign_test_p']:.3g} | {p['wilcoxon_p']:.3g} | "
            f"{p['median_difference']:.4f} | {p['verdict']} |"
        )
    claim = [p for p in result["paired"] if p["learned"] == HEADLINE and p["against"] == REFERENCE]
    held = sum(p["verdict"] == "learned better" for p in claim)
    lost = sum(p["verdict"] == "baseline better" for p in claim)
    lines += [
        "",
        f"**The claim (the learned optimizer beats tuned Adam with warm-up + cosine on unseen "
        f"tasks):** of the {len(claim)} comparisons (3 horizons x training / held-out loss), the "
        f"hierarchical optimizer is significantly better in {held}, significantly worse in "
        f"{lost}, and not significantly different in {len(claim) - held - lost}.",
        "",
        f"Final training loss at T = {result['horizon']} by meta-test part:",
        "",
    ]
    parts = list(next(iter(result["meta_test_by_part_at_T"].values())))
    lines += ["| optimizer | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for name, row in result["meta_test_by_part_at_T"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(row[p]) for p in parts) + " |")
    lines += [
        "",
        "Selection runs (final meta-validation loss, selection seed):",
        "",
        "| model | estimator | meta lr | meta-valid loss | meta-train s |",
        "|---|---|---|---|---|",
    ]
    for run in result["selection_runs"]:
        s = run["settings"]
        lines.append(
            f"| {s['model']} | {s['estimator']} | {s['meta_lr']:g} | "
            f"{run['final_valid_loss']:.4f} | {run['meta_train_seconds']:.0f} |"
        )
    lines += [
        "",
        "Reported meta-training (meta-validation loss on fresh instances, replicate 1):",
        "",
        "| model | start | final (mean ± std over seeds) | meta-train s per run |",
        "|---|---|---|---|",
    ]
    for model, runs in result["runs"].items():
        finals = [r["final_valid_loss"] for r in runs]
        secs = [r["meta_train_seconds"] for r in runs]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        lines.append(
            f"| {model} | {statistics.fmean(r['curve']['valid_loss'][0] for r in runs):.4f} | "
            f"{statistics.fmean(finals):.4f} ± {std:.4f} | {statistics.fmean(secs):.0f} |"
        )
    info = result["machine"]
    lines += [
        "",
        f"{info['date']}, {info['cpu_model']}, torch {info['torch']}, 1 thread, load "
        f"{info['load_average_at_start']}; {result['total_seconds'] / 60:.1f} minutes. Rerun: "
        f"`{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    for model, runs in result["runs"].items():
        for i, run in enumerate(runs):
            ax.plot(
                run["curve"]["seconds"],
                run["curve"]["valid_loss"],
                color="C0" if model == "hierarchical" else "C1",
                alpha=0.8,
                label=model if i == 0 else None,
            )
    ax.set_xlabel("meta-training wall time (s, 1 thread)")
    ax.set_ylabel("meta-valid loss (train loss after T)")
    ax.set_yscale("log")
    ax.legend()
    for ax, key in zip(axes[1:], ("train", "heldout")):
        for name, row in result["meta_test"].items():
            means = [row[str(s)][key]["mean"] for s in result["horizons"]]
            stds = [row[str(s)][key]["std"] for s in result["horizons"]]
            ax.errorbar(result["horizons"], means, yerr=stds, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(result["horizons"], [str(h) for h in result["horizons"]])
        ax.minorticks_off()
        ax.set_xlabel("training steps on meta-test tasks (T, 5T, 10T)")
        ax.set_ylabel(f"median {'training' if key == 'train' else 'held-out'} loss")
    axes[2].legend(fontsize=7)
    fig.suptitle("Learned optimizers vs tuned baselines on meta-test")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def without_work(argv: list[str]) -> list[str]:
    """``argv`` less ``--work DIR``: the cache folder changes where runs are kept, not what
    they compute, and a result should not name a folder of the machine that wrote it."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--work":
            skip = True
        elif not arg.startswith("--work="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--seeds", type=int, default=None, help="default: the baselines' seeds")
    parser.add_argument("--horizon", type=int, default=50)
    parser.add_argument("--train-configs", type=int, default=12)
    parser.add_argument("--valid-tasks", type=int, default=12)
    parser.add_argument("--test-tasks", type=int, default=None, help="default: all the baselines'")
    parser.add_argument("--truncation", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--outer-steps", type=int, default=2000)
    parser.add_argument("--select-steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--estimators", nargs="+", default=list(learned.ESTIMATORS))
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--timing-steps", type=int, default=100)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument(
        "--baselines", type=Path, default=DEFAULT_OUT / "learned_optimizer_protocol.json"
    )
    parser.add_argument("--data-dir", default=None, help="MNIST / Fashion-MNIST IDX files")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "hg-lopt-headline"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--meta-train-seeds",
        type=int,
        nargs="+",
        default=None,
        help="with --meta-train-only: meta-train these seeds only (processes sharing --work "
        "can then split the seeds between them)",
    )
    parser.add_argument(
        "--meta-train-only",
        action="store_true",
        help="select and meta-train into --work, then stop (a later run reuses the cache)",
    )
    args = parser.parse_args(argv)
    if args.meta_train_seeds is not None and not args.meta_train_only:
        parser.error("--meta-train-seeds needs --meta-train-only (the report uses every seed)")
    if args.quick:
        args.outer_steps, args.select_steps, args.eval_every = 8, 4, 4
        args.train_configs, args.valid_tasks, args.test_tasks = 3, 2, 3
        args.seeds, args.estimators, args.lr_grid = 2, ["pes", "tbptt"], [1e-2]
        args.timing_steps, args.timing_rounds = 10, 1
        args.horizon = 50
    torch.set_num_threads(1)
    result = study(args)
    result["config"] = {
        k: getattr(args, k)
        for k in (
            "horizon",
            "train_configs",
            "valid_tasks",
            "test_tasks",
            "truncation",
            "pairs",
            "sigma",
            "outer_steps",
            "select_steps",
            "eval_every",
            "estimators",
            "lr_grid",
            "timing_steps",
            "timing_rounds",
            "quick",
        )
    }
    result["machine"] = machine_info()
    result["command"] = rerun_command(f"{NAME}.py", without_work(argv))
    result["data"] = data_source(args.data_dir)
    learned.check_selections(result)  # nothing tuned on meta-test
    stem = NAME + ("_quick" if args.quick else "")
    write_outputs(args.out, stem, result, markdown, plot)
    return result


if __name__ == "__main__":
    main()
