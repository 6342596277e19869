"""Baselines of the learned-optimizer protocol: tuned Adam and SGD-momentum on meta-test.

The protocol (``hypergradient.learned.make_splits(seed=0)``, papers.md sections 15-18):
300 meta-train, 60 meta-validation and 90 meta-test task configurations (digits / MNIST
MLPs and CNNs with relu or tanh; meta-test adds held-out architectures, the held-out
activation gelu and the held-out data set Fashion-MNIST).  Four baselines: Adam and SGD
with momentum 0.9, each at a constant rate and with linear warm-up (5% of the run) plus
cosine decay to the run's last step.  Each baseline's rate is picked on meta-validation
configurations only (``tune_baseline``: log grid, median over tasks of the final full
training loss after T steps), per seed; every choice is recorded in a ``SelectionLog`` and
the written JSON passes ``check_selections``.  Then, once, every baseline trains every
meta-test configuration for T, 5T and 10T steps (the schedule stretched to the run, the
rate tuned at T) and we report the final training loss and the held-out loss (the data
set's validation pool, which no task trains on).  Seeds = independent task instances
(example subset, initialisation, batch order) of the same configurations.

Run from the repository root::

    PYTHONPATH=src python benchmarks/learned_optimizer_protocol.py --quick   # ~10 minutes
    # the size the headline table (learned_optimizer_headline.py) reads, ~30 minutes:
    PYTHONPATH=src python benchmarks/learned_optimizer_protocol.py --horizon 50 \
        --valid-tasks 24 --per-part 12

Writes ``<out>/learned_optimizer_protocol.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
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
from _common import data_source, machine_info, rerun_command

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
GRIDS = {
    "adam": [1e-4 * 10 ** (k / 2) for k in range(8)],  # 1e-4 ... 3e-1
    "sgdm": [1e-3 * 10 ** (k / 2) for k in range(8)],  # 1e-3 ... 3
}
BASELINES = [
    learned.Baseline("adam", "constant"),
    learned.Baseline("adam", "warmup_cosine"),
    learned.Baseline("sgdm", "constant"),
    learned.Baseline("sgdm", "warmup_cosine"),
]


def first_of_each_part(configs, per_part: int, num_test: int) -> list:
    """The first ``per_part`` configurations of each third of meta-test (held-out
    configurations, held-out activation, held-out data set), in the declared order."""
    third = num_test // 3
    bounds = [(0, num_test - 2 * third), (num_test - 2 * third, num_test - third)]
    bounds.append((num_test - third, num_test))
    return [c for lo, hi in bounds for c in configs[lo:hi][:per_part]]


def part_of(config, splits_settings) -> str:
    if config.dataset in splits_settings["held_out_datasets"]:
        return "held-out data set"
    if config.activation in splits_settings["held_out_activations"]:
        return "held-out activation"
    return "held-out configuration"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and a shorter T")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=None, help="T (default 100; quick 50)")
    parser.add_argument(
        "--valid-tasks",
        type=int,
        default=None,
        help="meta-validation configurations tuned on (default 60; quick 12)",
    )
    parser.add_argument(
        "--per-part",
        type=int,
        default=None,
        help="meta-test configurations per part (default 30; quick 8)",
    )
    parser.add_argument("--data-dir", default=None, help="MNIST / Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)

    horizon = args.horizon or (50 if args.quick else 100)
    num_valid_used = args.valid_tasks or (12 if args.quick else 60)
    per_part = args.per_part or (8 if args.quick else 30)
    splits = learned.make_splits(seed=0)
    valid = list(splits.meta_valid[:num_valid_used])
    test = first_of_each_part(list(splits.meta_test), per_part, len(splits.meta_test))
    horizons = [horizon, 5 * horizon, 10 * horizon]
    log = learned.SelectionLog(splits)
    started = time.perf_counter()

    # 1. tune on meta-validation, per seed
    tuned: dict[str, list[float]] = {b.name: [] for b in BASELINES}
    tuning_evidence: dict[str, list[dict]] = {b.name: [] for b in BASELINES}
    for seed in range(args.seeds):
        for base in BASELINES:
            result = learned.tune_baseline(
                base,
                GRIDS[base.optimizer],
                valid,
                horizon,
                log,
                data_dir=args.data_dir,
                replicate=seed,
            )
            tuned[base.name].append(result.baseline.lr)
            tuning_evidence[base.name].append({f"{lr:.4g}": m for lr, m in result.medians.items()})
            print(f"seed {seed} {base.name}: lr {result.baseline.lr:.4g}", flush=True)
    tuning_seconds = time.perf_counter() - started
    learned.check_selections(log.to_dict())  # nothing was selected on meta-test

    # 2. meta-test, once
    test_scores: dict[str, dict[int, list[list[dict]]]] = {}
    for base in BASELINES:
        test_scores[base.name] = {}
        for steps in horizons:
            per_seed = []
            for seed in range(args.seeds):
                chosen = base.with_lr(tuned[base.name][seed])
                scores = learned.evaluate_baseline(
                    chosen, test, steps, data_dir=args.data_dir, replicate=seed
                )
                per_seed.append(
                    [{"train": s.train_loss, "heldout": s.heldout_loss} for s in scores]
                )
            test_scores[base.name][steps] = per_seed
            print(f"{base.name} at {steps} steps done", flush=True)
    total_seconds = time.perf_counter() - started

    # 3. summaries: per seed the median over meta-test tasks, then mean and std over seeds
    def summary(name: str, steps: int, key: str, subset=None) -> dict:
        medians = []
        for runs in test_scores[name][steps]:
            values = [r[key] for c, r in zip(test, runs) if subset is None or subset(c)]
            medians.append(statistics.median(values))
        return {
            "per_seed": medians,
            "mean": statistics.fmean(medians),
            "std": statistics.stdev(medians) if len(medians) > 1 else 0.0,
        }

    table = {
        name: {
            str(steps): {key: summary(name, steps, key) for key in ("train", "heldout")}
            for steps in horizons
        }
        for name in tuned
    }
    parts = sorted({part_of(c, splits.settings) for c in test})
    by_part = {
        name: {
            part: summary(
                name, horizon, "train", lambda c, part=part: part_of(c, splits.settings) == part
            )
            for part in parts
        }
        for name in tuned
    }
    # paired: schedule vs constant, per optimizer, pooled over seeds and tasks at each horizon
    paired = {}
    for opt in ("adam", "sgdm"):
        for steps in horizons:
            a = [r["train"] for runs in test_scores[f"{opt}-warmup_cosine"][steps] for r in runs]
            b = [r["train"] for runs in test_scores[f"{opt}-constant"][steps] for r in runs]
            cmp = learned.paired_comparison(a, b)
            paired[f"{opt}: warmup_cosine vs constant, {steps} steps"] = cmp.__dict__

    argv = sys.argv[1:]
    record = {
        "benchmark": "learned_optimizer_protocol",
        "machine": machine_info(),
        "command": rerun_command("learned_optimizer_protocol.py", argv),
        "data": data_source(args.data_dir),
        "horizon": horizon,
        "horizons": horizons,
        "seeds": args.seeds,
        "grids": GRIDS,
        "meta_valid_used": [c.config_id for c in valid],
        "meta_test_used": [c.config_id for c in test],
        "protocol": {"settings": dict(splits.settings), "hashes": splits.hashes()},
        "selections": [s.to_dict() for s in log.selections],
        "tuned_lr": tuned,
        "tuning_medians": tuning_evidence,
        "meta_test": table,
        "meta_test_by_part_at_T": by_part,
        "paired": paired,
        "meta_test_scores": test_scores,
        "tuning_seconds": tuning_seconds,
        "total_seconds": total_seconds,
    }
    learned.check_selections(record)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learned_optimizer_protocol.json").write_text(json.dumps(record, indent=1))

    def fmt(s: dict) -> str:
        return f"{s['mean']:.3f} ± {s['std']:.3f}"

    lines = [
        "# Protocol baselines: tuned Adam and SGD-momentum on meta-test",
        "",
        f"Protocol `make_splits(seed=0)`: hashes meta-train `{splits.hashes()['meta_train'][:12]}`,"
        f" meta-valid `{splits.hashes()['meta_valid'][:12]}`, meta-test "
        f"`{splits.hashes()['meta_test'][:12]}`. Tuned on the first {len(valid)} meta-validation"
        f" configurations (rate grid {len(GRIDS['adam'])} points per optimizer, log-spaced by "
        f"half decades: Adam 1e-4 to 3e-1, SGD-momentum 1e-3 to 3; choice = lowest median over "
        f"tasks of the final full training loss after T = {horizon} steps; per seed). Scored once"
        f" on {len(test)} meta-test configurations ({per_part} each: held-out configurations, "
        f"held-out activation gelu, held-out data set Fashion-MNIST), at T, 5T and 10T steps "
        f"(schedules stretched to the run, rate tuned at T). Entries: median over meta-test "
        f"tasks, then mean ± std over {args.seeds} seeds (task instances). Held-out loss: "
        f"cross-entropy on the data set's validation pool, which no task trains on. "
        f"`check_selections` passes on the JSON (no value chosen on meta-test).",
        "",
        "| baseline | tuned lr per seed | "
        + " | ".join(f"train {s} | held-out {s}" for s in horizons)
        + " |",
        "|---|---|" + "---|---|" * len(horizons),
    ]
    for name in tuned:
        lrs = ", ".join(f"{lr:.3g}" for lr in tuned[name])
        cells = " | ".join(
            f"{fmt(table[name][str(s)]['train'])} | {fmt(table[name][str(s)]['heldout'])}"
            for s in horizons
        )
        lines.append(f"| {name} | {lrs} | {cells} |")
    lines += ["", f"Final training loss at T = {horizon} by meta-test part:", ""]
    lines += ["| baseline | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for name in tuned:
        lines.append(f"| {name} | " + " | ".join(fmt(by_part[name][p]) for p in parts) + " |")
    lines += [
        "",
        "Warm-up + cosine against constant rate (final training loss, pairs pooled over seeds"
        " and tasks):",
        "",
        "| comparison | wins | losses | ties | sign test p | Wilcoxon p | median diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, c in paired.items():
        lines.append(
            f"| {key} | {c['wins']} | {c['losses']} | {c['ties']} | {c['sign_test_p']:.3g} | "
            f"{c['wilcoxon_p']:.3g} | {c['median_difference']:.4f} |"
        )
    info = record["machine"]
    lines += [
        "",
        f"{info['date']}, {info['cpu_model']}, torch {info['torch']}, 1 thread, load "
        f"{info['load_average_at_start']}; {total_seconds / 60:.1f} minutes. Rerun: "
        f"`{record['command']}`",
    ]
    (args.out / "learned_optimizer_protocol.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
