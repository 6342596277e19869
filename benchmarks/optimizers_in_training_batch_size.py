"""The best learning rate against the batch size (Granziol, Zohren & Roberts 2022), for SGD and
Adam on Fashion-MNIST, against the linear and square-root rules and the Lanczos-based proposal.

* Model: an MLP 784-``--hidden``-10 (ReLU), float32, PyTorch's default initialisation (seeded).
* Data: ``--n-train`` training and ``--n-val`` validation images drawn once (seed 0) from
  Fashion-MNIST's training file, pixels standardised; the 10,000 test images are read once,
  at the end, to report the test accuracy of the runs already chosen.
* Budget: ``--epochs`` passes over the training subset at every batch size ``B`` (so
  ``epochs * n_train / B`` steps: fewer, larger steps as ``B`` grows), the
  rate decayed linearly from its peak to zero (``--schedule linear``; at a constant rate the
  last iterate's noise made the validation argmin vary 2x between seeds in a first run), plain
  SGD (no momentum) or Adam (PyTorch defaults, betas 0.9, 0.999).  "The rate" is the peak.
* Grid: learning rates on the lattice ``2^(k/2)`` (a factor sqrt(2) apart).  For every
  (optimizer, ``B``, seed) the grid grows around a start point until the rate with the lowest
  final *validation* loss has two evaluated neighbours on either side (or a diverged one above
  it); the argmin is then refined by the vertex of the parabola through it and its two
  neighbours, in log-rate (within half a grid step by construction).  A run is *diverged* if
  its training loss becomes non-finite or exceeds 100; its validation loss is then infinite.
* Seeds (``--seeds``, at least 3): each seed changes the initialisation and the batch order
  (the same for every rate of one cell: common random numbers make the argmin less noisy).
* Exponent: least squares of log2(best rate) on log2(B) over every (B, seed) point, with a
  95% t-interval on the slope, and a bootstrap interval (2,000 resamples of the seeds within
  each ``B``, slope of the per-``B`` means); over all ``B``, ``B <= anchor`` and ``B >= anchor``.
* Rules: linear ``lr(B) = lr(A) B / A`` and square-root ``lr(A) sqrt(B / A)``, anchored at each
  seed's grid-best rate at ``A = --anchor``; both land on the lattice, so every rule's rate is
  trained (the validation loss it costs is reported, and its test accuracy).
* Proposal: ``hypergradient.optimizers.propose_learning_rate`` (safety 1: the stability bound
  ``2 / lambda_B`` for SGD, ``2 (1 + b1) / ((1 - b1) lambda_B(D^-1/2 H D^-1/2))`` for Adam;
  10 mini-batches, 20 Lanczos steps, Hessian) at every ``B``, on the first
  ``--proposal-examples`` training images, measured after a warm-up of one epoch at
  ``B = anchor`` at the seed's grid-best rate there, constant (at initialisation the bound is
  far too large: progressive sharpening, see ``benchmarks/lr_proposal.py``).

Run from the repository root::

    export HYPERGRADIENT_DATA=/path/to/datasets
    python benchmarks/optimizers_in_training_batch_size.py            # 26 min (busy 2 cores)
    python benchmarks/optimizers_in_training_batch_size.py --quick    # a check of the script
    python benchmarks/optimizers_in_training_batch_size.py --from-json \
        benchmarks/results/optimizers_in_training_batch_size.json     # redraw table and plot

Writes ``<out>/optimizers_in_training_batch_size.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg

from _common import data_source, machine_info, rerun_command, write_outputs

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
STEM = "optimizers_in_training_batch_size"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (0-1 scale)
OPTIMIZERS = ("sgd", "adam")
# lattice index of the first rate tried at the smallest batch (2^(k/2): 0.044 and 0.00098)
START_K = {"sgd": -9, "adam": -20}
DIVERGED_LOSS = 100.0
MAX_POINTS = 16  # a cell's grid never grows beyond this many rates


def lattice_lr(k: int) -> float:
    return 2.0 ** (k / 2)


def load_split(args) -> dict:
    images, labels = hg.data.load_fashion_mnist(args.data_dir, split="train")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    x = ((images.float() / 255.0 - MEAN) / STD).reshape(len(images), -1)
    train = perm[: args.n_train]
    val = perm[args.n_train : args.n_train + args.n_val]
    return {"train": (x[train], labels[train]), "val": (x[val], labels[val])}


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = hg.data.load_fashion_mnist(ARGS.data_dir, split="test")
    return ((images.float() / 255.0 - MEAN) / STD).reshape(len(images), -1), labels


def build_model(args, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(784, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.Adam(model.parameters(), lr=lr)


@torch.no_grad()
def evaluate(model: nn.Module, pair, chunk: int = 4096) -> tuple[float, float]:
    x, y = pair
    loss, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(x[i : i + chunk])
        loss += float(F.cross_entropy(out, y[i : i + chunk], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + chunk]).sum())
    return loss / len(y), correct / len(y)


def train(
    args, data, opt_name: str, batch_size: int, lr: float, seed: int, epochs: float,
    schedule: str = "constant",
):  # fmt: skip
    """``epochs`` passes with peak rate ``lr`` (``schedule``: constant, or a linear decay to
    zero); the batch order depends on ``seed`` only."""
    model = build_model(args, seed)
    opt = make_optimizer(opt_name, model, lr)
    x, y = data["train"]
    n = len(y)
    gen = torch.Generator().manual_seed(10_000 + seed)
    steps_per_epoch = n // batch_size
    total = max(1, round(epochs * steps_per_epoch))
    step, diverged = 0, False
    while step < total and not diverged:
        perm = torch.randperm(n, generator=gen)
        for j in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[j * batch_size : (j + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            value = loss.item()
            if not math.isfinite(value) or value > DIVERGED_LOSS:
                diverged = True
                break
            if schedule == "linear":  # decay to zero: the last iterate is not a noisy one
                for group in opt.param_groups:
                    group["lr"] = lr * (1.0 - step / total)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model, diverged, step


def run_cell_point(args, data, cache, opt_name, batch_size, seed, k):
    key = (opt_name, batch_size, seed, k)
    if key not in cache:
        start = time.perf_counter()
        model, diverged, steps = train(
            args, data, opt_name, batch_size, lattice_lr(k), seed, args.epochs, args.schedule
        )
        val_loss, val_acc = evaluate(model, data["val"])
        if diverged or not math.isfinite(val_loss):
            val_loss, val_acc = math.inf, 0.1
        cache[key] = {
            "optimizer": opt_name,
            "batch_size": batch_size,
            "seed": seed,
            "k": k,
            "lr": lattice_lr(k),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "diverged": diverged,
            "steps": steps,
            "seconds": round(time.perf_counter() - start, 3),
            "_state": {n: t.clone() for n, t in model.state_dict().items()},
        }
    return cache[key]


def sweep(args, data, cache, opt_name, batch_size, seed, k0) -> dict[int, dict]:
    """Grow the grid around ``k0`` until its validation argmin has two neighbours each side
    (or a diverged rate above it)."""
    points = {}
    for k in (k0 - 1, k0, k0 + 1):
        points[k] = run_cell_point(args, data, cache, opt_name, batch_size, seed, k)
    while len(points) < MAX_POINTS:
        best = min(points, key=lambda k: (points[k]["val_loss"], k))
        lo, hi = min(points), max(points)
        if best - lo < 2:
            k = lo - 1
        elif hi - best < 2 and not points[hi]["diverged"]:
            k = hi + 1
        else:
            break
        points[k] = run_cell_point(args, data, cache, opt_name, batch_size, seed, k)
    return points


def refine(points: dict[int, dict]) -> tuple[int, float]:
    """(grid argmin k, refined log2 rate): the vertex of the parabola through the argmin
    and its neighbours in log-rate; the grid point itself if a neighbour diverged."""
    best = min(points, key=lambda k: (points[k]["val_loss"], k))
    left, right = points.get(best - 1), points.get(best + 1)
    log2_lr = best / 2
    if left and right and math.isfinite(left["val_loss"]) and math.isfinite(right["val_loss"]):
        fl, f0, fr = left["val_loss"], points[best]["val_loss"], right["val_loss"]
        curvature = fl - 2 * f0 + fr
        if curvature > 0:
            log2_lr += 0.5 * (fl - fr) / (2 * curvature)  # within +-1/4 (half a grid step)
    return best, log2_lr


def slope_fit(xs, ys) -> dict:
    """Least squares y = a + b x with a 95% t-interval on b."""
    from scipy import stats

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    res = stats.linregress(x, y)
    t = stats.t.ppf(0.975, len(x) - 2)
    return {
        "exponent": float(res.slope),
        "ci95_t": [float(res.slope - t * res.stderr), float(res.slope + t * res.stderr)],
        "intercept_log2": float(res.intercept),
        "points": len(x),
    }


def bootstrap_slope(per_b: dict[int, list[float]], draws: int = 2000, seed: int = 0) -> list:
    """95% percentile interval of the slope of the per-B means, seeds resampled within B."""
    rng = np.random.default_rng(seed)
    bs = sorted(per_b)
    x = np.log2(bs)
    means = np.stack(
        [
            np.asarray(per_b[b])[rng.integers(0, len(per_b[b]), (draws, len(per_b[b])))].mean(1)
            for b in bs
        ],
        axis=1,
    )  # (draws, len(bs))
    xc = x - x.mean()
    slopes = (means - means.mean(1, keepdims=True)) @ xc / (xc @ xc)
    return [float(np.percentile(slopes, 2.5)), float(np.percentile(slopes, 97.5))]


def exponent_fits(best_log2: dict, anchor: int) -> dict:
    """Fits over all B, B <= anchor and B >= anchor; best_log2[(B, seed)] = log2 best lr."""
    out = {}
    for name, keep in (
        ("all", lambda b: True),
        ("small", lambda b: b <= anchor),
        ("large", lambda b: b >= anchor),
    ):
        items = [(b, s, v) for (b, s), v in best_log2.items() if keep(b)]
        if len({b for b, _, _ in items}) < 2 or len(items) < 3:
            continue
        fit = slope_fit([math.log2(b) for b, _, _ in items], [v for _, _, v in items])
        per_b: dict[int, list[float]] = {}
        for b, _, v in items:
            per_b.setdefault(b, []).append(v)
        fit["ci95_bootstrap"] = bootstrap_slope(per_b)
        fit["batch_sizes"] = sorted(per_b)
        out[name] = fit
    return out


def measure_proposals(args, data, opt_name, seed, anchor_k, log) -> dict:
    """Warm up one epoch at B = anchor with the seed's grid-best rate there, then run the
    Lanczos proposal at every batch size from those weights."""
    model, _, _ = train(args, data, opt_name, args.anchor, lattice_lr(anchor_k), seed, 1)
    x, y = data["train"]
    sub = (x[: args.proposal_examples], y[: args.proposal_examples])
    rows = {}
    for b in args.batch_sizes:
        start = time.perf_counter()
        p = hg.optimizers.propose_learning_rate(
            model, F.cross_entropy, sub, b, opt_name, num_batches=10, num_steps=20,
            density=False, seed=seed,
        )  # fmt: skip
        rows[b] = {
            "lr_max": p.lr_max,
            "lambda_batch": p.lambda_batch,
            "lambda_full": p.lambda_full,
            "lr_max_full": p.lr_max_full,
            "seconds": round(time.perf_counter() - start, 3),
        }
        log(f"  proposal {opt_name} seed {seed} B={b}: lr_max {p.lr_max:.4g}")
    return rows


def analyse(args, cache, cells, proposals) -> dict:
    out = {}
    for opt_name in OPTIMIZERS:
        best_log2, grid_k = {}, {}
        for (o, b, s), points in cells.items():
            if o != opt_name:
                continue
            grid_k[(b, s)], best_log2[(b, s)] = refine(points)
        fits = exponent_fits(best_log2, args.anchor)
        rules = {}
        for s in args.seeds:
            ka = grid_k[(args.anchor, s)]
            for b in args.batch_sizes:
                doublings = round(math.log2(b / args.anchor))
                rules[("linear", b, s)] = ka + 2 * doublings
                rules[("sqrt", b, s)] = ka + doublings
        prop_fit = None
        if proposals.get(opt_name):
            prop_fit = slope_fit(
                [math.log2(b) for s in args.seeds for b in args.batch_sizes],
                [
                    math.log2(proposals[opt_name][s][b]["lr_max"])
                    for s in args.seeds
                    for b in args.batch_sizes
                ],
            )
        out[opt_name] = {
            "best_log2": best_log2,
            "grid_k": grid_k,
            "fits": fits,
            "rule_k": rules,
            "proposal_fit": prop_fit,
        }
    return out


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def proposal_fits(result, opt_name: str) -> dict:
    """Exponent fits of the proposal's lr_max, from the result's (JSON-shaped) proposals."""
    per_seed = result["proposals"][opt_name]
    log2_lr = {
        (int(b), int(s)): math.log2(row["lr_max"])
        for s, rows in per_seed.items()
        for b, row in rows.items()
    }
    return exponent_fits(log2_lr, result["args"]["anchor"])


def markdown(result) -> str:
    a = result["args"]
    m = result["machine"]
    lines = [
        "### Best learning rate against batch size "
        "(`benchmarks/optimizers_in_training_batch_size.py`)",
        "",
        f"{m['date']}; {m['platform']}; torch {m['torch']} ({m['torch_threads']} thread), "
        f"load average at start {m['load_average_at_start']}; {result['seconds']:.0f} s.  "
        f"Fashion-MNIST: {a['n_train']} training and {a['n_val']} validation images from the "
        f"training file (seed 0), the 10,000 test images read once at the end.  MLP 784-"
        f"{a['hidden']}-10 (ReLU), {a['epochs']} epochs at every batch size, "
        f"{'a rate decayed linearly to zero' if a['schedule'] == 'linear' else 'a constant rate'}"
        f" (the rate named is its peak); "
        f"plain SGD (no momentum) and Adam (betas 0.9, 0.999).  Seeds {a['seeds']} "
        f"(initialisation and batch order).",
        "",
        "**How each choice was made.** Every rate is chosen on the validation split: for each "
        "(optimizer, B, seed) the grid 2^(k/2) is grown until the rate with the lowest final "
        "validation cross-entropy has two evaluated neighbours on each side (or a diverged rate "
        "above it); the reported best rate is the vertex of the parabola through that point and "
        "its neighbours in log-rate.  The rules are anchored at each seed's grid-best rate at "
        f"B = {a['anchor']}.  The proposal is `propose_learning_rate` (safety 1, Hessian, 10 "
        "mini-batches x 20 Lanczos steps) on the weights after one warm-up epoch at "
        f"B = {a['anchor']}.  Test accuracy is of the run each row names, read once after all "
        "choices were made.",
        "",
    ]
    for opt_name in OPTIMIZERS:
        r = result["analysis"][opt_name]
        fits = r["fits"]
        lines += [f"**{opt_name.upper()}.**", ""]
        lines += [
            "| B | best lr, mean [min, max] over seeds | linear rule | sqrt rule | proposal "
            "(lr_max) | best / proposal | val loss: best / linear / sqrt | test acc: best / "
            "linear / sqrt |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in r["table"]:
            lines.append(
                f"| {row['B']} | {row['best_lr_mean']:.3g} [{row['best_lr_min']:.3g}, "
                f"{row['best_lr_max']:.3g}] | {row['linear_lr']:.3g} | {row['sqrt_lr']:.3g} | "
                f"{row['proposal_lr']:.3g} | {row['best_over_proposal']:.2f} | "
                f"{row['val_best']:.4f} / {row['val_linear']:.4f} / {row['val_sqrt']:.4f} | "
                f"{row['test_best']:.4f} / {row['test_linear']:.4f} / {row['test_sqrt']:.4f} |"
            )
        lines.append("")
        lines.append(
            "Rates: geometric mean over seeds for the rules and the proposal; val loss and test "
            "accuracy: mean over seeds (a diverged run counts as val loss inf, accuracy 0.1)."
        )
        lines.append("")
        lines.append(
            "| fit of log2(best lr) on log2(B) | exponent | 95% CI (t) | 95% CI (bootstrap) |"
        )
        lines.append("|---|---:|---:|---:|")
        for name, label in (("all", "all B"), ("small", f"B <= {a['anchor']}"),
                            ("large", f"B >= {a['anchor']}")):  # fmt: skip
            if name in fits:
                f = fits[name]
                lines.append(
                    f"| {label} ({f['points']} points) | {f['exponent']:.2f} | "
                    f"{fmt_ci(f['ci95_t'])} | {fmt_ci(f['ci95_bootstrap'])} |"
                )
        pfits = proposal_fits(result, opt_name)
        for name, label in (("all", "all B"), ("small", f"B <= {a['anchor']}"),
                            ("large", f"B >= {a['anchor']}")):  # fmt: skip
            if name in pfits:
                f = pfits[name]
                lines.append(
                    f"| proposal lr_max, {label} ({f['points']} points) | {f['exponent']:.2f} | "
                    f"{fmt_ci(f['ci95_t'])} | {fmt_ci(f['ci95_bootstrap'])} |"
                )
        lines.append("")
    lines += [
        "Fits: t = least squares of log2(rate) on log2(B) over every (B, seed) point, 95% "
        "t-interval on the slope; bootstrap = seeds resampled within each B (2,000 draws), "
        "slope of the per-B means, 2.5-97.5 percentiles; with 3 seeds a B has only 10 distinct "
        "resamples, so that interval is the narrower, less reliable one.  `proposal lr_max` "
        "rows fit the Lanczos bound itself.",
        "",
        f"Rerun: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result["args"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, opt_name in zip(axes, OPTIMIZERS):
        r = result["analysis"][opt_name]
        rows = r["table"]
        bs = [row["B"] for row in rows]
        mean = np.array([row["best_lr_mean"] for row in rows])
        lo = np.array([row["best_lr_min"] for row in rows])
        hi = np.array([row["best_lr_max"] for row in rows])
        ax.errorbar(bs, mean, yerr=[mean - lo, hi - mean], fmt="o-", color="k", capsize=3,
                    label="best lr (validation), seeds min-max")  # fmt: skip
        ax.plot(bs, [row["linear_lr"] for row in rows], "--", color="C0", label="linear rule")
        ax.plot(bs, [row["sqrt_lr"] for row in rows], "--", color="C1", label="square-root rule")
        ax.plot(bs, [row["proposal_lr"] for row in rows], ":s", color="C2",
                label="Lanczos proposal (lr_max)")  # fmt: skip
        for name, color, where in (("small", "C3", "B <= "), ("large", "C4", "B >= ")):
            if name not in r["fits"]:
                continue
            fit = r["fits"][name]
            xs = np.array(fit["batch_sizes"], float)[[0, -1]]
            ax.plot(xs, 2.0 ** (fit["intercept_log2"] + fit["exponent"] * np.log2(xs)), "-",
                    color=color, alpha=0.7, lw=2.5,
                    label=f"fit {where}{a['anchor']}: exponent {fit['exponent']:.2f}, 95% CI "
                    f"{fmt_ci(fit['ci95_t'])}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("learning rate")
        ax.set_title(
            f"{opt_name.upper()}: best peak rate, Fashion-MNIST MLP, {a['epochs']:g} epochs",
            fontsize=10,
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="default: $HYPERGRADIENT_DATA")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the script")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+",
                   default=[16, 32, 64, 128, 256, 512, 1024])  # fmt: skip
    p.add_argument("--anchor", type=int, default=128, help="batch size the rules start from")
    p.add_argument("--n-train", type=int, default=8192)
    p.add_argument("--n-val", type=int, default=4096)
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--schedule", choices=("linear", "constant"), default="linear",
                   help="the rate over a run: decayed linearly to zero, or constant")  # fmt: skip
    p.add_argument("--proposal-examples", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-json", type=Path, default=None,
                   help="rewrite a finished run's table and plot; trains nothing")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.batch_sizes, args.anchor = [0], [16, 128, 1024], 128
        args.n_train, args.n_val, args.epochs, args.proposal_examples = 2048, 1024, 1, 1024
    if args.anchor not in args.batch_sizes:
        p.error(f"--anchor {args.anchor} must be one of --batch-sizes {args.batch_sizes}")
    return args


ARGS = None


def main(argv=None) -> int:
    global ARGS
    args = ARGS = parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        stem = args.from_json.stem
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.md").write_text(markdown(result))
        plot(result, args.out / f"{stem}.png")
        print(markdown(result))
        return 0
    torch.set_num_threads(args.threads)
    log = print
    started = time.perf_counter()
    result = {
        "machine": machine_info(),
        "command": rerun_command(HERE.name, sys.argv[1:] if argv is None else list(argv)),
        "data": data_source(args.data_dir),
        # the output folder is left out: a result names no folder of the machine it ran on
        "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"
        },  # fmt: skip
    }
    data = load_split(args)
    cache: dict = {}
    cells: dict = {}
    for opt_name in OPTIMIZERS:
        for seed in args.seeds:
            k0 = START_K[opt_name]
            for b in sorted(args.batch_sizes):
                # start where the square-root rule points from the previous batch size
                points = sweep(args, data, cache, opt_name, b, seed, k0)
                cells[(opt_name, b, seed)] = points
                best, log2_lr = refine(points)
                log(
                    f"{opt_name} seed {seed} B={b}: best lr {2**log2_lr:.4g} (grid "
                    f"{lattice_lr(best):.4g}, val loss {points[best]['val_loss']:.4f}; "
                    f"{len(points)} rates; {time.perf_counter() - started:.0f} s)"
                )
                k0 = best + 1
    analysis = analyse(args, cache, cells, {})
    # the rules' rates, where the grid did not reach them
    for opt_name in OPTIMIZERS:
        for (_, b, s), k in analysis[opt_name]["rule_k"].items():
            run_cell_point(args, data, cache, opt_name, b, s, k)
    proposals: dict = {o: {} for o in OPTIMIZERS}
    for opt_name in OPTIMIZERS:
        for s in args.seeds:
            ka = analysis[opt_name]["grid_k"][(args.anchor, s)]
            proposals[opt_name][s] = measure_proposals(args, data, opt_name, s, ka, log)
    analysis = analyse(args, cache, cells, proposals)
    # the test set, read once: the chosen (grid-best) run and each rule's run per cell
    x_test, y_test = load_test()
    model = build_model(args, 0)
    test_acc = {}

    def test_of(opt_name, b, s, k):
        key = (opt_name, b, s, k)
        if key not in test_acc:
            entry = cache[key]
            if entry["diverged"]:
                test_acc[key] = 0.1
            else:
                model.load_state_dict(entry["_state"])
                test_acc[key] = evaluate(model, (x_test, y_test))[1]
        return test_acc[key]

    for opt_name in OPTIMIZERS:
        r = analysis[opt_name]
        table = []
        for b in sorted(args.batch_sizes):
            best = [2 ** r["best_log2"][(b, s)] for s in args.seeds]
            gk = [r["grid_k"][(b, s)] for s in args.seeds]
            lin = [r["rule_k"][("linear", b, s)] for s in args.seeds]
            sq = [r["rule_k"][("sqrt", b, s)] for s in args.seeds]
            prop = [proposals[opt_name][s][b]["lr_max"] for s in args.seeds]

            def gmean(v):
                return 2 ** statistics.fmean(math.log2(t) for t in v)

            def val(ks, bb=b, o=opt_name):
                return statistics.fmean(
                    cache[(o, bb, s, k)]["val_loss"] for s, k in zip(args.seeds, ks)
                )

            def test(ks, bb=b, o=opt_name):
                return statistics.fmean(test_of(o, bb, s, k) for s, k in zip(args.seeds, ks))

            table.append({
                "B": b,
                "best_lr_mean": gmean(best),
                "best_lr_min": min(best),
                "best_lr_max": max(best),
                "best_lr_per_seed": best,
                "linear_lr": gmean([lattice_lr(k) for k in lin]),
                "sqrt_lr": gmean([lattice_lr(k) for k in sq]),
                "proposal_lr": gmean(prop),
                "best_over_proposal": gmean(best) / gmean(prop),
                "val_best": val(gk),
                "val_linear": val(lin),
                "val_sqrt": val(sq),
                "test_best": test(gk),
                "test_linear": test(lin),
                "test_sqrt": test(sq),
            })  # fmt: skip
        r["table"] = table
    result["seconds"] = time.perf_counter() - started
    result["runs"] = [{k: v for k, v in e.items() if k != "_state"} for e in cache.values()]
    result["proposals"] = {
        o: {str(s): {str(b): v for b, v in rows.items()} for s, rows in per.items()}
        for o, per in proposals.items()
    }
    for opt_name in OPTIMIZERS:
        r = analysis[opt_name]
        r["best_log2"] = {f"B={b},seed={s}": v for (b, s), v in r["best_log2"].items()}
        r["grid_k"] = {f"B={b},seed={s}": v for (b, s), v in r["grid_k"].items()}
        r["rule_k"] = {f"{n},B={b},seed={s}": v for (n, b, s), v in r["rule_k"].items()}
    result["analysis"] = analysis
    stem = f"{STEM}_quick" if args.quick else STEM
    write_outputs(args.out, stem, result, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
