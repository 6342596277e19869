"""K-FAC against tuned SGD-momentum and Adam on the MNIST deep autoencoder, for equal wall time.

Martens & Grosse (2015), Sec. 13: the 784-1000-500-250-30-250-500-1000-784 autoencoder
(logistic units, a linear 30-unit code, logistic outputs trained with the Bernoulli
cross-entropy, sparse initialisation of Martens 2010), where K-FAC with the Levenberg-
Marquardt damping and the quadratic-model rescaling is "much faster than SGD with momentum".
The error reported is the papers' one: the squared reconstruction error, summed over the 784
pixels and averaged over images.

Arms, all from the same initial weights and the same mini-batches, run interleaved in one
process (the arm that has used the least optimizer time steps next) until each has used the
same optimizer time, so machine load hits them alike; the error evaluations are not timed:

- ``kfac``: the paper's K-FAC (``rescale=True, adapt_damping=True``; sampled Fisher, factored
  damping, T1 = 5, T3 = 20);
- ``kfac_fixed_damping``: the same without the Levenberg-Marquardt adaptation (damping fixed);
- ``kfac_no_rescale``: the same without the rescaling (fixed ``lr`` and momentum 0.9);
- ``sgd``: SGD with momentum; ``adam``: Adam.

Every choice (SGD's rate and momentum, Adam's rate, K-FAC's initial damping, the fixed damping
and the no-rescale rate) is the best validation error after ``--tune-seconds`` of optimizer
time on seed 100, on a validation split of the MNIST training file disjoint from the training
subset; the test file is read once, for the final models.  The headline compares iterations
and seconds to reach the error tuned SGD-momentum ends at (per seed).

Usage::

    HYPERGRADIENT_DATA=/path/to/datasets python benchmarks/optimizers_in_training_kfac.py
    HYPERGRADIENT_DATA=/path/to/datasets python benchmarks/optimizers_in_training_kfac.py --quick
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

import hypergradient as hg
from _common import data_source, machine_info, rerun_command, write_outputs

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
LAYERS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
ARMS = ("kfac", "kfac_fixed_damping", "kfac_no_rescale", "sgd", "adam")


# --------------------------------------------------------------------------- model and data


def autoencoder(seed: int, sizes=LAYERS, fan_in: int = 15) -> nn.Sequential:
    """Logistic units, a linear code layer (the middle), logit outputs; Martens' sparse init:
    each unit gets ``fan_in`` nonzero incoming weights drawn from N(0, 1), biases 0."""
    gen = torch.Generator().manual_seed(seed)
    modules: list[nn.Module] = []
    code = len(sizes) // 2
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = nn.Linear(d_in, d_out)
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.zero_()
            for row in range(d_out):
                cols = torch.randperm(d_in, generator=gen)[: min(fan_in, d_in)]
                layer.weight[row, cols] = torch.randn(len(cols), generator=gen)
        modules.append(layer)
        if i + 1 != code and i + 1 != len(sizes) - 1:
            modules.append(nn.Sigmoid())
    return nn.Sequential(*modules)


def bernoulli_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over pixels, mean over images (what K-FAC's likelihood assumes)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


@torch.no_grad()
def squared_error(model: nn.Module, x: torch.Tensor, chunk: int = 2000) -> float:
    """Squared reconstruction error, summed over pixels, mean over images."""
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk]
        total += float(((torch.sigmoid(model(xb)) - xb) ** 2).sum())
    return total / x.shape[0]


def load_data(args) -> dict[str, torch.Tensor]:
    images, _ = hg.data.load_mnist(args.data_dir, split="train")
    x = images.reshape(images.shape[0], -1).float() / 255.0
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1234))
    train = x[perm[: args.n_train]]
    val = x[perm[args.n_train : args.n_train + args.n_val]]
    eval_rows = torch.randperm(args.n_train, generator=torch.Generator().manual_seed(99))
    return {"train": train, "val": val, "train_eval": train[eval_rows[: args.n_eval]]}


def load_test(args) -> torch.Tensor:
    images, _ = hg.data.load_mnist(args.data_dir, split="test")
    return images.reshape(images.shape[0], -1).float() / 255.0


def batches(x: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled mini-batches (the same sequence for every arm of a seed)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0] - batch_size + 1, batch_size):
            yield x[perm[start : start + batch_size]]


# --------------------------------------------------------------------------- one arm


class Arm:
    """One optimizer on its own copy of the model, stepping on its own batch stream."""

    def __init__(self, name: str, config: dict, args, seed: int, train: torch.Tensor):
        self.name, self.config = name, dict(config)
        self.model = autoencoder(seed)
        self.batches = batches(train, args.batch_size, seed + 1000)
        self.kfac = name.startswith("kfac")
        if self.kfac:
            self.opt = hg.optimizers.kfac.KFAC(
                self.model,
                likelihood="bernoulli",
                fisher="sampled",
                inverse_every=20,
                inverse_warmup=args.inverse_warmup,
                model_rows=args.model_rows,
                generator=torch.Generator().manual_seed(seed + 2000),
                **config,
            )
        elif name == "sgd":
            self.opt = torch.optim.SGD(self.model.parameters(), **config)
        else:
            self.opt = torch.optim.Adam(self.model.parameters(), **config)
        self.steps, self.seconds, self.diverged = 0, 0.0, False
        self.curve: list[tuple[int, float, float]] = []  # (steps, seconds, train error)
        self.dampings: list[float] = []

    def step(self) -> None:
        x = next(self.batches)
        start = time.perf_counter()
        self.opt.zero_grad()
        out = self.model(x)
        if self.kfac:
            self.opt.update_curvature(out)
        loss = bernoulli_loss(out, x)
        loss.backward()
        if self.kfac:
            self.opt.step(loss_fn=lambda: bernoulli_loss(self.model(x), x))
        else:
            self.opt.step()
        self.seconds += time.perf_counter() - start
        self.steps += 1
        if self.kfac and self.steps % 20 == 0:
            self.dampings.append(self.opt.param_groups[0]["damping"])
        if not math.isfinite(float(loss)):
            self.diverged = True

    def record(self, x_eval: torch.Tensor) -> None:
        err = squared_error(self.model, x_eval) if not self.diverged else float("inf")
        if not math.isfinite(err):
            self.diverged = True
        self.curve.append((self.steps, self.seconds, err))


def race(arms: list[Arm], seconds: float, x_eval: torch.Tensor, eval_every: int) -> None:
    """Step the arm that has used the least optimizer time until each has used ``seconds``."""
    for arm in arms:
        arm.record(x_eval)
    while True:
        live = [a for a in arms if a.seconds < seconds and not a.diverged]
        if not live:
            return
        arm = min(live, key=lambda a: a.seconds)
        try:
            arm.step()
        except hg.HypergradientError as exc:  # e.g. a singular block once damping collapsed
            print(f"  {arm.name}: stopped: {exc}", flush=True)
            arm.diverged = True
        # every eval_every steps and at least every seconds / 25 of the arm's time
        due = arm.steps % eval_every == 0 or arm.seconds - arm.curve[-1][1] >= seconds / 25
        if due or arm.seconds >= seconds or arm.diverged:
            arm.record(x_eval)


# --------------------------------------------------------------------------- tuning


def candidates(args) -> dict[str, list[dict]]:
    return {
        "sgd": [{"lr": lr, "momentum": m} for m in args.sgd_momenta for lr in args.sgd_lrs],
        "adam": [{"lr": lr} for lr in args.adam_lrs],
        "kfac": [
            {"damping": d, "rescale": True, "adapt_damping": True} for d in args.kfac_dampings
        ],
        "kfac_fixed_damping": [
            {"damping": d, "rescale": True, "adapt_damping": False} for d in args.fixed_dampings
        ],
        "kfac_no_rescale": [
            {"damping": d0, "lr": lr, "momentum": 0.9, "adapt_damping": True}
            for lr in args.no_rescale_lrs
            for d0 in args.kfac_dampings[:1]
        ],
    }


def tune(args, data, log) -> dict:
    """Each arm's configuration with the lowest validation error after ``tune_seconds``."""
    chosen, table = {}, {}
    for name, configs in candidates(args).items():
        arms = [Arm(name, c, args, args.tune_seed, data["train"]) for c in configs]
        if len(arms) > 1:
            race(arms, args.tune_seconds, data["train_eval"], eval_every=10**9)
        else:
            chosen[name] = configs[0]
            table[name] = [{"config": configs[0], "val_error": None, "steps": 0}]
            continue
        rows = []
        for arm in arms:
            val = float("inf") if arm.diverged else squared_error(arm.model, data["val"])
            rows.append({"config": arm.config, "val_error": val, "steps": arm.steps})
            log(f"  tune {name} {arm.config}: val error {val:.2f} after {arm.steps} steps")
        best = min(range(len(rows)), key=lambda i: rows[i]["val_error"])
        chosen[name] = rows[best]["config"]
        table[name] = rows
    return {"chosen": chosen, "candidates": table}


# --------------------------------------------------------------------------- the runs


def crossing(curve, target: float):
    """First (steps, seconds) at which the recorded error is <= target, or None."""
    for steps, seconds, err in curve:
        if err <= target:
            return steps, seconds
    return None


def run_seed(args, seed: int, chosen: dict, data, x_test, log) -> dict:
    arms = [Arm(name, chosen[name], args, seed, data["train"]) for name in ARMS]
    race(arms, args.seconds, data["train_eval"], args.eval_every)
    out = {"seed": seed, "arms": {}}
    for arm in arms:
        final = arm.curve[-1][2]
        out["arms"][arm.name] = {
            "steps": arm.steps,
            "seconds": arm.seconds,
            "curve": arm.curve,
            "final_train_eval_error": final,
            "final_train_error": squared_error(arm.model, data["train"]),
            "test_error": squared_error(arm.model, x_test),
            "dampings": arm.dampings,
            "diverged": arm.diverged,
        }
        log(f"  seed {seed} {arm.name}: {arm.steps} steps in {arm.seconds:.1f} s, "
            f"train error {final:.2f}")  # fmt: skip
    sgd = out["arms"]["sgd"]
    target = sgd["final_train_eval_error"]
    sgd_hit = crossing(sgd["curve"], target)
    out["target"] = target
    out["reach"] = {}
    for name in ARMS:
        hit = crossing(out["arms"][name]["curve"], target)
        out["reach"][name] = None if hit is None else {"steps": hit[0], "seconds": hit[1]}
    if sgd_hit is not None:
        out["reach"]["sgd"] = {"steps": sgd_hit[0], "seconds": sgd_hit[1]}
    return out


def summary(result) -> dict:
    rows = {}
    for name in ARMS:
        finals = [r["arms"][name]["final_train_eval_error"] for r in result["runs"]]
        full = [r["arms"][name]["final_train_error"] for r in result["runs"]]
        tests = [r["arms"][name]["test_error"] for r in result["runs"]]
        steps = [r["arms"][name]["steps"] for r in result["runs"]]
        reach = [r["reach"][name] for r in result["runs"]]
        sgd = [r["reach"]["sgd"] for r in result["runs"]]
        iter_ratio = [s["steps"] / x["steps"] for s, x in zip(sgd, reach) if x and x["steps"]]
        time_ratio = [s["seconds"] / x["seconds"] for s, x in zip(sgd, reach) if x and x["seconds"]]
        rows[name] = {
            "final": finals,
            "final_full": full,
            "test": tests,
            "steps": steps,
            "reached": sum(x is not None for x in reach),
            "stopped": sum(bool(r["arms"][name]["diverged"]) for r in result["runs"]),
            "iter_ratio": iter_ratio,
            "time_ratio": time_ratio,
        }
    return rows


def mean_std(values) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def markdown(result) -> str:
    args, rows = result["args"], result["summary"]
    seeds = [r["seed"] for r in result["runs"]]
    lines = [
        "# K-FAC on the MNIST deep autoencoder (Martens & Grosse 2015)",
        "",
        f"{result['machine']['date']}, {result['machine']['cpu_model']}, torch "
        f"{result['machine']['torch']}, {result['machine']['torch_threads']} thread(s), load "
        f"average at start {result['machine']['load_average_at_start']}.",
        "",
        f"784-1000-500-250-30-250-500-1000-784 autoencoder, sparse init; training subset of "
        f"{args['n_train']} MNIST training images, batch {args['batch_size']}; every arm "
        f"{args['seconds']:.0f} s of optimizer time (interleaved, same batches). Training error "
        f"= squared reconstruction error (sum over pixels, mean over images) on {args['n_eval']} "
        f"fixed training images, every {args['eval_every']} steps; seeds {seeds} (mean ± std).",
        "",
        f"Target: the error tuned SGD-momentum reaches after {args['seconds']:.0f} s (per seed, "
        f"mean {mean_std([r['target'] for r in result['runs']])}). Speed-up = SGD's steps "
        f"(seconds) to reach it / the arm's.",
        "",
        "| arm | configuration (chosen on validation) | steps | final train error | "
        "full train set | test error | stopped early | reached target | speed-up in steps | "
        "speed-up in seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ARMS:
        r = rows[name]
        cfg = ", ".join(f"{k}={v}" for k, v in result["selection"]["chosen"][name].items())
        lines.append(
            f"| {name} | {cfg} | {mean_std(r['steps'])} | {mean_std(r['final'])} | "
            f"{mean_std(r['final_full'])} | {mean_std(r['test'])} | {r['stopped']}/{len(seeds)} | "
            f"{r['reached']}/{len(seeds)} | "
            f"{mean_std(r['iter_ratio'])} | {mean_std(r['time_ratio'])} |"
        )
    lines += [
        "",
        "A stopped arm (a non-finite loss, or an error such as a singular block) keeps its "
        "last parameters; its final train error is then left out of the mean (n/a if all "
        "stopped), the full-train and test errors are of those parameters.",
        "",
        "Choices: each arm's configuration is the one with the lowest validation error "
        f"(squared error on {args['n_val']} held-out training-file images) after "
        f"{args['tune_seconds']:.0f} s of optimizer time on seed {args['tune_seed']}, from:",
        "",
    ]
    for name, cands in result["selection"]["candidates"].items():
        parts = []
        for c in cands:
            cfg = ", ".join(f"{k}={v}" for k, v in c["config"].items())
            val = "—" if c["val_error"] is None else f"{c['val_error']:.2f}"
            parts.append(f"({cfg}: {val})")
        lines.append(f"- {name}: " + "; ".join(parts))
    lines += ["", f"Rerun: `{result['command']}`", ""]
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(ARMS, ["C3", "C1", "C4", "C0", "C2"]))
    for run_index, run in enumerate(result["runs"]):
        for name in ARMS:
            curve = run["arms"][name]["curve"]
            steps = [c[0] for c in curve]
            secs = [c[1] for c in curve]
            errs = [c[2] for c in curve]
            label = name if run_index == 0 else None
            axes[0].plot(steps, errs, color=colors[name], alpha=0.8, lw=1, label=label)
            axes[1].plot(secs, errs, color=colors[name], alpha=0.8, lw=1, label=label)
    for ax, xlabel in zip(axes, ["iterations", "optimizer seconds"]):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training squared error")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[1].legend()
    fig.suptitle("MNIST deep autoencoder: K-FAC vs tuned SGD-momentum and Adam (3 seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget, one seed (a smoke test)")
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seconds", type=float, default=100.0, help="optimizer time per arm")
    p.add_argument("--tune-seconds", type=float, default=30.0)
    p.add_argument("--tune-seed", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--inverse-warmup", type=int, default=0)
    p.add_argument("--model-rows", type=int, default=125, help="rows of K-FAC's quadratic model")
    p.add_argument("--sgd-lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--sgd-momenta", type=float, nargs="+", default=[0.9, 0.99])
    p.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--kfac-dampings", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--fixed-dampings", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--no-rescale-lrs", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ "
                   "(default: $HYPERGRADIENT_DATA)")  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val, args.n_eval, args.batch_size = 500, 200, 200, 100
        args.model_rows = 50
        args.seconds, args.tune_seconds, args.seeds = 2.0, 1.0, [0]
        args.sgd_lrs, args.sgd_momenta, args.adam_lrs = [1e-3], [0.9], [1e-3]
        args.kfac_dampings, args.fixed_dampings, args.no_rescale_lrs = [10.0], [10.0], [0.1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    log = lambda message: print(message, flush=True)  # noqa: E731
    result = {
        "machine": machine_info(),
        "command": rerun_command(
            "optimizers_in_training_kfac.py", sys.argv[1:] if argv is None else argv
        ),
        "data": data_source(args.data_dir),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": [],
    }
    data = load_data(args)
    result["selection"] = tune(args, data, log)
    log(f"chosen: {result['selection']['chosen']}")
    x_test = load_test(args)  # read once, for the final models only
    args.out.mkdir(parents=True, exist_ok=True)  # the partial record is written per seed
    stem = "optimizers_in_training_kfac_quick" if args.quick else "optimizers_in_training_kfac"
    for seed in args.seeds:
        result["runs"].append(
            run_seed(args, seed, result["selection"]["chosen"], data, x_test, log)
        )
        (args.out / f"{stem}.partial.json").write_text(json.dumps(result))
    (args.out / f"{stem}.partial.json").unlink()
    result["summary"] = summary(result)
    write_outputs(args.out, stem, result, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
