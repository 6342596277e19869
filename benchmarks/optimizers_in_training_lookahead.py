"""Lookahead (Zhang et al. 2019) in training: robustness to the learning rate, and its cost.

The paper's robustness claim: wrapped in Lookahead, an optimizer's final accuracy depends less
on its learning rate (and on (k, alpha)) than the bare optimizer's, at no loss of the best
accuracy.  Tested here on Fashion-MNIST with a small CNN, for SGD with momentum and for Adam:

* Model: conv 5x5 (1 -> 8) - ReLU - maxpool 2 - conv 5x5 (8 -> 16) - ReLU - maxpool 2 -
  linear (784 -> 10); 11,274 weights, no BatchNorm (so the slow weights are the whole state
  that is evaluated).
* Data: per seed, ``--n-train`` training and ``--n-val`` validation images drawn without
  overlap from Fashion-MNIST's training set (the split, the initial weights and the batch
  order depend on the seed and are the same for every arm of that seed: paired runs);
  pixels standardised.  The 10,000 test images are read once, at the end, for the
  configurations chosen on validation.
* Arms, per base optimizer: the bare optimizer and ``Lookahead(optimizer, k, alpha)`` for
  every (k, alpha) of ``--k-alpha`` (the paper's k in {5, 10}, alpha in {0.5, 0.8}), each at
  every learning rate of ``--sgd-lrs`` / ``--adam-lrs``; ``--steps`` steps of batch
  ``--batch-size`` at a constant rate; Lookahead is evaluated on its slow weights (the
  paper's choice).  Final validation accuracy and loss of every run.
* Robustness: per seed and arm, the spread of the final validation accuracy across the
  learning rates (max - min, and the standard deviation over the rates); reported as mean
  and standard deviation over the seeds.  The best accuracy of an arm is its best learning
  rate's (per seed, and of the seed mean).
* Choice on validation (the test set read once): per base optimizer, the bare optimizer's
  learning rate, and Lookahead's (learning rate, k, alpha), each by the highest validation
  accuracy averaged over the seeds; their saved final weights are then scored on the test
  set.
* Overhead: bare and Lookahead (k=5) steps interleaved on the same batches, in one process,
  after the grid: the time of ``optimizer.step()`` alone and of the whole iteration (forward,
  backward, step), per base optimizer.

Run from the repository root::

    HYPERGRADIENT_DATA=/path/to/datasets python benchmarks/optimizers_in_training_lookahead.py
    HYPERGRADIENT_DATA=/path/to/datasets python benchmarks/optimizers_in_training_lookahead.py \
        --quick

Writes ``<out>/optimizers_in_training_lookahead.json``, ``.md`` and ``.png`` (``--quick``:
``optimizers_in_training_lookahead_quick.*``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg

from _common import data_source, machine_info, rerun_command, write_outputs

Lookahead = hg.optimizers.Lookahead

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
STEM = "optimizers_in_training_lookahead"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (0-1 scale)
BASES = ("sgd", "adam")
BASE_NAMES = {"sgd": "SGD (momentum 0.9)", "adam": "Adam"}


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )  # fmt: skip


def build_model(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return small_cnn()


def standardise(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def load_split(args, seed: int) -> dict:
    """Training and validation images of one seed, both from Fashion-MNIST's training set."""
    images, labels = hg.data.load_fashion_mnist(args.data_dir, split="train")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, val = perm[: args.n_train], perm[args.n_train : args.n_train + args.n_val]
    x = standardise(images)
    return {"train": (x[train], labels[train]), "val": (x[val], labels[val])}


def batch_order(args, seed: int) -> torch.Tensor:
    """``steps x batch_size`` indices into the training images: shuffled epochs, one seed."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    epochs = math.ceil(args.steps * args.batch_size / args.n_train) + 1
    order = torch.cat([torch.randperm(args.n_train, generator=gen) for _ in range(epochs)])
    return order[: args.steps * args.batch_size].reshape(args.steps, args.batch_size)


def make_optimizer(base: str, params, lr: float) -> torch.optim.Optimizer:
    if base == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def arm_name(k_alpha) -> str:
    return "bare" if k_alpha is None else f"LA k={k_alpha[0]} alpha={k_alpha[1]}"


@torch.no_grad()
def evaluate(model: nn.Module, pair, chunk: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy; a non-finite loss stays non-finite (diverged)."""
    x, y = pair
    loss, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(x[i : i + chunk])
        loss += float(F.cross_entropy(out, y[i : i + chunk], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + chunk]).sum())
    return loss / len(y), correct / len(y)


def train_run(args, data, order, seed: int, base: str, lr: float, k_alpha) -> tuple[dict, dict]:
    """One run; returns its record and its final (slow) weights for the test at the end."""
    model = build_model(seed)
    opt = make_optimizer(base, model.parameters(), lr)
    if k_alpha is not None:
        opt = Lookahead(opt, k=k_alpha[0], alpha=k_alpha[1])
    x, y = data["train"]
    tail = []
    start = time.perf_counter()
    for step in range(args.steps):
        idx = order[step]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step >= args.steps - args.tail:
            tail.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    # Lookahead is scored on its slow weights (the paper's choice); outside the context the
    # fast weights are restored, so the weights saved for the test are the slow ones too
    if k_alpha is not None:
        with opt.slow_weights():
            val_loss, val_acc = evaluate(model, data["val"])
            weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    else:
        val_loss, val_acc = evaluate(model, data["val"])
        weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    record = {
        "seed": seed, "base": base, "arm": arm_name(k_alpha), "lr": lr,
        "val_acc": val_acc, "val_loss": finite_or_none(val_loss),
        "train_loss_tail": finite_or_none(statistics.mean(tail)), "seconds": seconds,
    }  # fmt: skip
    return record, weights


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a diverged run's loss is written as null."""
    return value if math.isfinite(value) else None


def time_steps(args, data, order, base: str) -> dict:
    """Bare and Lookahead(k=5, alpha=0.5) iterations interleaved on the same batches."""
    lr = {"sgd": 0.03, "adam": 1e-3}[base]
    models = {arm: build_model(0) for arm in ("bare", "lookahead")}
    opts = {
        "bare": make_optimizer(base, models["bare"].parameters(), lr),
        "lookahead": Lookahead(
            make_optimizer(base, models["lookahead"].parameters(), lr), k=5, alpha=0.5
        ),
    }
    step_s: dict[str, list[float]] = {"bare": [], "lookahead": []}
    sync_s: list[float] = []  # Lookahead's steps that end with a synchronisation
    iter_s: dict[str, list[float]] = {"bare": [], "lookahead": []}
    x, y = data["train"]
    for step in range(args.timing_steps):
        idx = order[step % len(order)]
        arms = ("bare", "lookahead") if step % 2 == 0 else ("lookahead", "bare")
        for arm in arms:  # alternate which arm goes first: neither gets a warmer cache
            opt, model = opts[arm], models[arm]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if step >= args.timing_warmup:
                step_s[arm].append(t2 - t1)
                iter_s[arm].append(t2 - t0)
                if arm == "lookahead" and (step + 1) % 5 == 0:
                    sync_s.append(t2 - t1)
    out = {"lr": lr, "steps_timed": len(step_s["bare"])}
    for arm in ("bare", "lookahead"):
        out[f"{arm}_step_us_median"] = 1e6 * statistics.median(step_s[arm])
        out[f"{arm}_step_us_mean"] = 1e6 * statistics.mean(step_s[arm])
        out[f"{arm}_iteration_ms_median"] = 1e3 * statistics.median(iter_s[arm])
    out["lookahead_sync_step_us_median"] = 1e6 * statistics.median(sync_s)
    out["step_ratio_median"] = out["lookahead_step_us_median"] / out["bare_step_us_median"]
    out["step_ratio_mean"] = out["lookahead_step_us_mean"] / out["bare_step_us_mean"]
    out["iteration_ratio_median"] = (
        out["lookahead_iteration_ms_median"] / out["bare_iteration_ms_median"]
    )
    return out


def mean_sd(values) -> tuple[float, float]:
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


CHANCE_PLUS = 0.2  # accuracy above which a run trained (chance is 0.1 on ten classes)


def trained_rates(args, runs: list[dict]) -> dict[str, list[float]]:
    """Per base, the rates at which every arm trained in every seed (accuracy > 0.2).

    Added after the first full run showed most runs of every arm diverge at SGD's largest
    rate, where the spread is set by divergence: the claim is also checked without such
    rates (a post-hoc view, labelled so in the table)."""
    out = {}
    for base in BASES:
        lrs = args.sgd_lrs if base == "sgd" else args.adam_lrs
        out[base] = [
            lr
            for lr in lrs
            if all(r["val_acc"] > CHANCE_PLUS for r in runs if r["base"] == base and r["lr"] == lr)
        ]
    return out


def summarise(args, runs: list[dict]) -> dict:
    """Per base and arm: accuracy/loss per rate, spread across rates, best rate (per seed)."""
    summary: dict = {}
    trained = trained_rates(args, runs)
    for base in BASES:
        lrs = args.sgd_lrs if base == "sgd" else args.adam_lrs
        summary[base] = {}
        for arm in [arm_name(None), *(arm_name(ka) for ka in args.k_alpha)]:
            cell = {(r["seed"], r["lr"]): r for r in runs if r["base"] == base and r["arm"] == arm}
            acc = {lr: [cell[(s, lr)]["val_acc"] for s in args.seeds] for lr in lrs}
            loss = {lr: [cell[(s, lr)]["val_loss"] for s in args.seeds] for lr in lrs}
            per_seed = [[cell[(s, lr)]["val_acc"] for lr in lrs] for s in args.seeds]
            ranges = [max(a) - min(a) for a in per_seed]
            on_trained = [[cell[(s, lr)]["val_acc"] for lr in trained[base]] for s in args.seeds]
            ranges_trained = [max(a) - min(a) if a else 0.0 for a in on_trained]
            sds = [statistics.pstdev(a) for a in per_seed]
            bests = [max(a) for a in per_seed]
            means = {lr: statistics.mean(acc[lr]) for lr in lrs}
            summary[base][arm] = {
                "val_acc": {str(lr): mean_sd(acc[lr]) for lr in lrs},
                "val_loss": {
                    str(lr): (mean_sd(v) if None not in v else (None, None))
                    for lr, v in loss.items()
                },
                "range_across_lrs": mean_sd(ranges),
                "sd_across_lrs": mean_sd(sds),
                "best_per_seed": mean_sd(bests),
                "best_lr_of_mean": max(lrs, key=lambda lr: means[lr]),
                "best_of_mean": max(means.values()),
                "ranges_per_seed": ranges,
                "range_across_trained_lrs": mean_sd(ranges_trained),
                "ranges_trained_per_seed": ranges_trained,
                "bests_per_seed": bests,
            }
    return summary


def verdicts(args, summary: dict) -> dict:
    """The claim, per base and Lookahead arm: a smaller spread (max - min across the rates,
    mean over seeds) than bare, and a best accuracy (per seed) not worse than bare's beyond
    the seeds' noise (paired difference of the per-seed bests >= -1 standard error)."""
    out: dict = {}
    n = len(args.seeds)
    for base in BASES:
        bare = summary[base]["bare"]
        out[base] = {}
        for ka in args.k_alpha:
            arm = summary[base][arm_name(ka)]
            spread_diff = [a - b for a, b in zip(arm["ranges_per_seed"], bare["ranges_per_seed"])]
            best_diff = [a - b for a, b in zip(arm["bests_per_seed"], bare["bests_per_seed"])]
            d_best, sd_best = mean_sd(best_diff)
            d_spread, sd_spread = mean_sd(spread_diff)
            trained_diff = [
                a - b
                for a, b in zip(arm["ranges_trained_per_seed"], bare["ranges_trained_per_seed"])
            ]
            d_trained, sd_trained = mean_sd(trained_diff)
            smaller = d_spread < 0
            no_worse = d_best >= -sd_best / math.sqrt(n)
            out[base][arm_name(ka)] = {
                "spread_diff": (d_spread, sd_spread), "best_diff": (d_best, sd_best),
                "smaller_spread": smaller, "no_worse_best": no_worse,
                "holds": smaller and no_worse,
                "spread_diff_trained": (d_trained, sd_trained),
                "holds_trained": d_trained < 0 and no_worse,
            }  # fmt: skip
    return out


def choose_and_test(args, runs: list[dict], weights: dict) -> dict:
    """Per base: bare's rate and Lookahead's (rate, k, alpha) with the highest validation
    accuracy averaged over the seeds; then their final weights on the test set (read here
    only)."""
    images, labels = hg.data.load_fashion_mnist(args.data_dir, split="test")
    test = (standardise(images), labels)
    chosen: dict = {}
    for base in BASES:
        chosen[base] = {}
        for family in ("bare", "lookahead"):
            configs: dict[tuple, list[dict]] = {}
            for r in runs:
                if r["base"] == base and (r["arm"] == "bare") == (family == "bare"):
                    configs.setdefault((r["arm"], r["lr"]), []).append(r)
            (arm, lr), rs = max(
                configs.items(), key=lambda kv: statistics.mean(r["val_acc"] for r in kv[1])
            )
            tests = []
            for r in rs:
                model = small_cnn()
                model.load_state_dict(weights[(r["seed"], base, arm, lr)])
                tests.append(evaluate(model, test))
            chosen[base][family] = {
                "arm": arm, "lr": lr, "configs_compared": len(configs),
                "val_acc": mean_sd(r["val_acc"] for r in rs),
                "test_acc": mean_sd(a for _, a in tests),
                "test_loss": mean_sd(v for v, _ in tests),
                "test_acc_per_seed": [a for _, a in tests],
            }  # fmt: skip
    return chosen


def pm(pair, digits: int = 4) -> str:
    mean, sd = pair
    if mean is None:
        return "diverged"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown(result: dict) -> str:
    a, summary, verdict = result["args"], result["summary"], result["verdicts"]
    lines = [
        "# Lookahead in training: robustness to the learning rate (Fashion-MNIST, small CNN)",
        "",
        f"{result['machine']['date']}, {result['machine']['cpu_model']}, torch "
        f"{result['machine']['torch']}, {result['machine']['torch_threads']} thread(s), load "
        f"average at start {result['machine']['load_average_at_start']}.  CNN with "
        f"{result['num_weights']:,} weights; per seed {a['n_train']} training and {a['n_val']} "
        f"validation images drawn from the training set; {a['steps']} steps of batch "
        f"{a['batch_size']} ({a['steps'] * a['batch_size'] / a['n_train']:.1f} epochs) at a "
        f"constant rate; seeds {a['seeds']} (each seed: its own split, initial weights and "
        f"batch order, shared by all arms).  Lookahead is evaluated on its slow weights.  "
        f"Every entry is mean ± standard deviation over the seeds.  Rerun: "
        f"`{result['command']}`",
        "",
    ]
    for base in BASES:
        lrs = a["sgd_lrs"] if base == "sgd" else a["adam_lrs"]
        lines += [
            f"## {BASE_NAMES[base]}: final validation accuracy",
            "",
            "| arm | "
            + " | ".join(f"lr {lr:g}" for lr in lrs)
            + " | best lr (of mean) | best acc per seed | spread max-min across lrs | "
            "sd across lrs |",
            "|---|" + "---|" * (len(lrs) + 4),
        ]
        for arm, s in summary[base].items():
            lines.append(
                f"| {arm} | "
                + " | ".join(pm(s["val_acc"][str(lr)]) for lr in lrs)
                + f" | {s['best_lr_of_mean']:g} | {pm(s['best_per_seed'])} | "
                f"{pm(s['range_across_lrs'])} | {pm(s['sd_across_lrs'])} |"
            )
        lines += [
            "",
            f"Final validation loss ({BASE_NAMES[base]}):",
            "",
            "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
            "|---|" + "---|" * len(lrs),
        ]
        for arm, s in summary[base].items():
            lines.append(
                f"| {arm} | " + " | ".join(pm(s["val_loss"][str(lr)]) for lr in lrs) + " |"
            )
        lines.append("")
    lines += [
        "## The claim: smaller spread across learning rates, no worse best accuracy",
        "",
        "Per seed, Lookahead's spread (max - min of the final validation accuracy across the "
        "rates) minus bare's, and Lookahead's best accuracy minus bare's (paired: same seed); "
        "mean ± sd over seeds.  *Smaller spread*: the mean difference is < 0.  *No worse "
        "best*: the mean best difference is >= -1 standard error (sd / sqrt(seeds)).",
        "",
        "| base | Lookahead arm | spread difference | best-accuracy difference | smaller "
        "spread | no worse best | claim | spread difference, rates where all trained | claim "
        "there |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for base in BASES:
        for arm, v in verdict[base].items():
            lines.append(
                f"| {BASE_NAMES[base]} | {arm} | {pm(v['spread_diff'])} | {pm(v['best_diff'])} | "
                f"{'yes' if v['smaller_spread'] else 'no'} | "
                f"{'yes' if v['no_worse_best'] else 'no'} | "
                f"{'HOLDS' if v['holds'] else 'FAILS'} | {pm(v['spread_diff_trained'])} | "
                f"{'HOLDS' if v['holds_trained'] else 'FAILS'} |"
            )
    lines += [
        "",
        f"The last two columns (added after this run's tables showed most runs diverge at "
        f"SGD's largest rate, so not chosen in advance) use only the rates at which every arm "
        f"trained (validation accuracy > {CHANCE_PLUS} in every seed): SGD "
        f"{result['trained_lrs']['sgd']}, Adam {result['trained_lrs']['adam']}.",
        "",
        f"Runs that did not train (validation accuracy <= {CHANCE_PLUS}), of "
        f"{len(a['seeds'])} seeds:",
        "",
    ]
    for base in BASES:
        lrs = a["sgd_lrs"] if base == "sgd" else a["adam_lrs"]
        lines += [
            f"| {BASE_NAMES[base]} | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
            "|---|" + "---|" * len(lrs),
        ]
        for arm in result["summary"][base]:
            failed = [
                sum(
                    r["val_acc"] <= CHANCE_PLUS
                    for r in result["runs"]
                    if r["base"] == base and r["arm"] == arm and r["lr"] == lr
                )
                for lr in lrs
            ]
            lines.append(f"| {arm} | " + " | ".join(str(f) for f in failed) + " |")
        lines.append("")
    lines += [
        "",
        "## Chosen on validation, then the test set (read once)",
        "",
        "Per base optimizer, the configuration with the highest validation accuracy averaged "
        "over the seeds: bare over its rates, Lookahead over rates x (k, alpha) (more "
        "configurations compared, so a slight selection advantage).",
        "",
        "| base | family | chosen | configurations compared | validation accuracy | test "
        "accuracy | test loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for base in BASES:
        for family, c in result["chosen"][base].items():
            lines.append(
                f"| {BASE_NAMES[base]} | {family} | {c['arm']}, lr {c['lr']:g} | "
                f"{c['configs_compared']} | {pm(c['val_acc'])} | {pm(c['test_acc'])} | "
                f"{pm(c['test_loss'])} |"
            )
    lines += [
        "",
        "## Overhead per step",
        "",
        f"Bare and Lookahead (k=5, alpha=0.5) iterations interleaved on the same batches "
        f"(batch {a['batch_size']}), after {a['timing_warmup']} warm-up steps; medians.",
        "",
        "| base | steps timed | bare step (us) | Lookahead step (us) | Lookahead step with "
        "the sync (us) | step ratio (median) | step ratio (mean, includes the sync every k) | "
        "bare iteration (ms) | Lookahead iteration (ms) | iteration ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for base in BASES:
        t = result["timing"][base]
        lines.append(
            f"| {BASE_NAMES[base]} | {t['steps_timed']} | {t['bare_step_us_median']:.0f} | "
            f"{t['lookahead_step_us_median']:.0f} | {t['lookahead_sync_step_us_median']:.0f} | "
            f"{t['step_ratio_median']:.2f} | "
            f"{t['step_ratio_mean']:.2f} | {t['bare_iteration_ms_median']:.2f} | "
            f"{t['lookahead_iteration_ms_median']:.2f} | {t['iteration_ratio_median']:.3f} |"
        )
    lines += [
        "",
        f"How each choice was made: the learning-rate grids (half-decade steps) and the (k, "
        f"alpha) grid (the paper's values) were fixed before the run; the reported "
        f"configurations were chosen on validation accuracy; the test set was read once, for "
        f"those.  Grid wall time {result['grid_seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result["args"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, base in zip(axes, BASES):
        lrs = a["sgd_lrs"] if base == "sgd" else a["adam_lrs"]
        for arm, s in result["summary"][base].items():
            means = [s["val_acc"][str(lr)][0] for lr in lrs]
            sds = [s["val_acc"][str(lr)][1] for lr in lrs]
            style = {"color": "black", "linewidth": 2.5} if arm == "bare" else {"alpha": 0.85}
            ax.errorbar(lrs, means, yerr=sds, marker="o", capsize=3, label=arm, **style)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation accuracy")
        ax.set_title(f"{BASE_NAMES[base]} (mean ± sd, {len(a['seeds'])} seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def k_alpha_pair(text: str) -> tuple[int, float]:
    try:
        k, alpha = text.split(",")
        return int(k), float(alpha)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--k-alpha expects pairs written 'k,alpha' such as 5,0.5; got {text!r}"
        ) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the script")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-val", type=int, default=2_000)
    p.add_argument("--steps", type=int, default=250, help="steps of every run (a multiple of k)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tail", type=int, default=50, help="last steps averaged as training loss")
    p.add_argument("--sgd-lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3])
    p.add_argument("--adam-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    p.add_argument(
        "--k-alpha",
        type=k_alpha_pair,
        nargs="+",
        default=[(5, 0.5), (5, 0.8), (10, 0.5), (10, 0.8)],
        help="Lookahead settings as k,alpha pairs",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--timing-steps", type=int, default=200)
    p.add_argument("--timing-warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--data-dir", default=None, help="folder holding fashion-mnist/ "
                   "(default: $HYPERGRADIENT_DATA)")  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--resummarise",
        type=Path,
        default=None,
        help="rebuild the tables and plot of this saved JSON from its runs (no training)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val, args.steps, args.tail = 512, 256, 20, 5
        args.sgd_lrs, args.adam_lrs, args.k_alpha = [0.01, 0.1], [1e-3, 1e-2], [(5, 0.5)]
        args.seeds, args.timing_steps, args.timing_warmup = [0, 1], 20, 5
    for k, alpha in args.k_alpha:
        if args.steps % k:
            p.error(f"--steps {args.steps} must be a multiple of every k (got k={k}), so that "
                    f"every run ends on a synchronisation")  # fmt: skip
        if k < 1 or not 0 < alpha <= 1:
            p.error(f"--k-alpha needs k >= 1 and alpha in (0, 1]; got {k},{alpha}")
    return args


def write(result: dict, out: Path, stem: str) -> None:
    write_outputs(out, stem, result, markdown, plot)


def resummarise(path: Path, out: Path) -> int:
    """Recompute the summary, verdicts, table and plot of a saved result from its runs (no
    training, no data read): for a change of the report, not of the experiment."""
    result = json.loads(path.read_text())
    args = argparse.Namespace(**result["args"])
    result["trained_lrs"] = trained_rates(args, result["runs"])
    result["summary"] = summarise(args, result["runs"])
    result["verdicts"] = verdicts(args, result["summary"])
    write(result, out, path.stem)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.resummarise is not None:
        return resummarise(args.resummarise, args.out)
    torch.set_num_threads(args.threads)
    result = {
        "machine": machine_info(),
        "command": rerun_command(f"{STEM}.py", sys.argv[1:] if argv is None else argv),
        "data": data_source(args.data_dir),
        # the output folder is left out: a result names no folder of the machine it ran on
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "num_weights": sum(p.numel() for p in small_cnn().parameters()),
        "runs": [],
    }
    weights: dict = {}
    start = time.perf_counter()
    for seed in args.seeds:
        data = load_split(args, seed)
        order = batch_order(args, seed)
        for base in BASES:
            for lr in args.sgd_lrs if base == "sgd" else args.adam_lrs:
                for k_alpha in [None, *args.k_alpha]:
                    record, w = train_run(args, data, order, seed, base, lr, k_alpha)
                    result["runs"].append(record)
                    weights[(seed, base, record["arm"], lr)] = w
                    print(
                        f"seed {seed} {base} lr {lr:g} {record['arm']}: val acc "
                        f"{record['val_acc']:.4f} loss {record['val_loss']} "
                        f"({record['seconds']:.1f} s)",
                        flush=True,
                    )
    result["grid_seconds"] = time.perf_counter() - start
    result["trained_lrs"] = trained_rates(args, result["runs"])
    result["summary"] = summarise(args, result["runs"])
    result["verdicts"] = verdicts(args, result["summary"])
    data = load_split(args, args.seeds[0])
    order = batch_order(args, args.seeds[0])
    result["timing"] = {base: time_steps(args, data, order, base) for base in BASES}
    result["chosen"] = choose_and_test(args, result["runs"], weights)
    write(result, args.out, f"{STEM}_quick" if args.quick else STEM)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
