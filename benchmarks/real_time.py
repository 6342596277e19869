"""Real-time hyperparameter optimisation (RTHO) against a 3 x 3 grid on MNIST.

Franceschi et al. (2017): forward-mode tangents carried along one training run let the
learning rate and momentum be tuned *during* that run.  Question: does one RTHO run reach a
validation loss no worse than the best of a 9-point grid (3 learning rates x 3 momenta), at
no more than 2x the cost of one plain run?

Setup: an MLP 784-100-10 (ReLU, float32, PyTorch's default init) on an MNIST subset
(``--n-train`` training and ``--n-val`` validation images from MNIST's training split, one
fixed split), heavy-ball SGD (``torch.optim.SGD``), batch 100, ``--steps`` steps.

* Grid: ``lr`` in ``--grid-lrs`` x ``momentum`` in ``--grid-momenta``, plain training, each
  scored by the final cross-entropy on the whole validation split; "best of grid" is the
  lowest per seed (an oracle pick: the grid is given its best point for every seed).
* RTHO: ``hg.train.RealTimeTrainer`` from ``lr = --init-lr``, ``momentum = --init-momentum``,
  tuning ``log lr`` and ``logit momentum`` with Adam every ``--hyper-every`` steps on a fresh
  validation batch of ``--val-batch`` images; the tangents run from step 0 to the end, the
  model is never restarted.  Its hyper learning rate is chosen from ``--hyper-lrs`` by the
  final validation loss on the selection seeds (``--selection-seeds``), never on a report
  seed or on the test set.
* The test split (MNIST's 10,000 test images) is read once, at the end, for the RTHO model
  and the grid's validation-selected model of every report seed.

Cost is counted in inner training steps (RTHO: one run of ``--steps`` steps, each with a
tangent update, plus one validation gradient per hyper-step) and in wall time; the arms run
interleaved in one process on the same batches order per seed (one thread).

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/real_time.py          # ~13 minutes
    OMP_NUM_THREADS=1 python benchmarks/real_time.py --quick  # one seed, short runs

Writes ``<out>/real_time.json``, ``<out>/real_time.md`` and ``<out>/real_time.png``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_source, machine_info, rerun_command  # noqa: E402

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
SPLIT_SEED = 0  # the one fixed train/validation split


def mlp(seed: int, hidden: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def load_split(args):
    images, labels = hg.data.load_mnist(args.data_dir, split="train")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    x = images.reshape(len(labels), -1).float() / 255.0
    pick_train, pick_val = perm[: args.n_train], perm[args.n_train : args.n_train + args.n_val]
    return (x[pick_train], labels[pick_train]), (x[pick_val], labels[pick_val])


def loader(pair, batch_size: int):
    data = torch.utils.data.TensorDataset(*pair)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)


@torch.no_grad()
def evaluate(model: nn.Module, pair) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole split."""
    out = model(pair[0])
    loss = float(F.cross_entropy(out, pair[1]))
    return loss, float((out.argmax(1) == pair[1]).float().mean())


def plain_run(args, seed: int, lr: float, momentum: float, train) -> tuple[nn.Module, float]:
    """``--steps`` steps of torch.optim.SGD; the batches in the order BatchStream(seed) draws."""
    model = mlp(seed, args.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    stream = hg.train.BatchStream(loader(train, args.batch), seed)
    start = time.perf_counter()
    for _ in range(args.steps):
        x, y = stream.next()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, time.perf_counter() - start


def rtho_run(args, seed: int, hyper_lr: float, train, val):
    model = mlp(seed, args.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=args.init_lr, momentum=args.init_momentum)
    trainer = hg.train.RealTimeTrainer(
        model,
        loader(train, args.batch),
        loader(val, args.val_batch),
        opt,
        hyper_every=args.hyper_every,
        hyper_optimizer=lambda hp: torch.optim.Adam(hp, lr=hyper_lr),
        seed=seed,
    )
    start = time.perf_counter()
    try:
        history = trainer.fit(args.steps // args.hyper_every)
    except hg.HypergradientError as err:  # a diverged run scores inf; the message is kept
        print(f"RTHO run diverged (seed {seed}, hyper lr {hyper_lr:g}): {err}")
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        history = trainer.history
    seconds = time.perf_counter() - start
    curve = [{k: r[k] for k in ("inner_step", "val_loss", "lr", "momentum")} for r in history]
    return model, seconds, curve


def finite_json(value):
    """``value`` with every non-finite float (a diverged run's loss) written as ``None``
    (strict JSON has no Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def mean_std(values):
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def select(args, train, val, log):
    """The RTHO hyper learning rate, by final validation loss on the selection seeds."""
    candidates = []
    for hyper_lr in args.hyper_lrs:
        losses = []
        for seed in args.selection_seeds:
            model, _, _ = rtho_run(args, seed, hyper_lr, train, val)
            loss = evaluate(model, val)[0]
            losses.append(loss if math.isfinite(loss) else float("inf"))
        candidates.append({"hyper_lr": hyper_lr, "val_losses": losses})
        log(f"selection: hyper_lr={hyper_lr:g} val losses {[round(v, 4) for v in losses]}")
    chosen = min(
        range(len(candidates)), key=lambda i: statistics.fmean(candidates[i]["val_losses"])
    )
    return {"candidates": candidates, "chosen": chosen}


def run_seed(args, seed: int, hyper_lr: float, train, val, log):
    grid, models = [], {}
    rtho = None
    configs = [(lr, mu) for lr in args.grid_lrs for mu in args.grid_momenta]
    # interleave: the RTHO run sits in the middle of the grid runs (same load on both)
    order = configs[: len(configs) // 2] + ["rtho"] + configs[len(configs) // 2 :]
    for item in order:
        if item == "rtho":
            model, seconds, curve = rtho_run(args, seed, hyper_lr, train, val)
            val_loss, val_acc = evaluate(model, val)
            val_loss = val_loss if math.isfinite(val_loss) else float("inf")
            rtho = {"val_loss": val_loss, "val_acc": val_acc, "seconds": seconds, "curve": curve}
            models["rtho"] = model
            log(f"seed {seed} RTHO: val {val_loss:.4f} in {seconds:.1f}s, final lr "
                f"{curve[-1]['lr']:.4g} momentum {curve[-1]['momentum']:.3f}")  # fmt: skip
            continue
        lr, mu = item
        model, seconds = plain_run(args, seed, lr, mu, train)
        val_loss, val_acc = evaluate(model, val)
        if not math.isfinite(val_loss):
            val_loss = float("inf")
        grid.append({"lr": lr, "momentum": mu, "val_loss": val_loss, "val_acc": val_acc,
                     "seconds": seconds})  # fmt: skip
        models[(lr, mu)] = model
        log(f"seed {seed} grid lr={lr:g} mu={mu:g}: val {val_loss:.4f} in {seconds:.1f}s")
    best = min(grid, key=lambda r: r["val_loss"])
    return {
        "seed": seed,
        "grid": grid,
        "grid_best": {k: best[k] for k in ("lr", "momentum", "val_loss", "val_acc")},
        "rtho": rtho,
        "plain_seconds": statistics.fmean(r["seconds"] for r in grid),
        "_models": {"rtho": models["rtho"], "grid_best": models[(best["lr"], best["momentum"])]},
    }


def markdown(result: dict) -> str:
    a, s = result["args"], result["summary"]
    runs = result["runs"]
    sel = result["selection"]
    lines = [
        "# Real-time hyperparameter optimisation (RTHO) vs a 3 x 3 grid on MNIST",
        "",
        f"MLP 784-{a['hidden']}-10 (ReLU, float32), heavy-ball SGD, batch {a['batch']}, "
        f"{a['steps']} steps; {a['n_train']} training / {a['n_val']} validation images from "
        f"MNIST's training split (one fixed split); test: MNIST's 10,000 test images, read once "
        f"at the end. Report seeds {a['seeds']} (initialisation and batch order).",
        "",
        "| seed | grid best (lr, momentum) | grid best val loss | RTHO val loss | RTHO final "
        "lr, momentum | grid-selected test loss / acc | RTHO test loss / acc | RTHO wall / "
        "plain run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        g, t = r["grid_best"], r["rtho"]
        last = t["curve"][-1]
        lines.append(
            f"| {r['seed']} | {g['lr']:g}, {g['momentum']:g} | {g['val_loss']:.4f} | "
            f"{t['val_loss']:.4f} | {last['lr']:.3g}, {last['momentum']:.3f} | "
            f"{r['test']['grid_best'][0]:.4f} / {r['test']['grid_best'][1]:.4f} | "
            f"{r['test']['rtho'][0]:.4f} / {r['test']['rtho'][1]:.4f} | "
            f"{t['seconds'] / r['plain_seconds']:.2f}x |"
        )
    lines += [
        "",
        "| | grid (9 runs), best point per seed | RTHO (one run) |",
        "|---|---|---|",
        f"| validation loss, mean +- std | {s['grid_val'][0]:.4f} +- {s['grid_val'][1]:.4f} | "
        f"{s['rtho_val'][0]:.4f} +- {s['rtho_val'][1]:.4f} |",
        f"| test accuracy, mean +- std | {s['grid_test_acc'][0]:.4f} +- "
        f"{s['grid_test_acc'][1]:.4f} | {s['rtho_test_acc'][0]:.4f} +- "
        f"{s['rtho_test_acc'][1]:.4f} |",
        f"| inner training steps | {9 * a['steps']:,} | {a['steps']:,} (each with a tangent "
        f"update) + {a['steps'] // a['hyper_every']} validation gradients |",
        f"| wall time, x one plain run (mean +- std) | 9 | {s['wall_ratio'][0]:.2f} +- "
        f"{s['wall_ratio'][1]:.2f} |",
        "",
        f"- Claim 1, RTHO validation loss <= best of the grid (per seed, every seed): "
        f"**{'HOLDS' if s['val_no_worse_every_seed'] else 'FAILS'}** "
        f"(mean {s['rtho_val'][0]:.4f} vs {s['grid_val'][0]:.4f}).",
        f"- Claim 2, cost <= 2x one plain run: in training steps "
        f"**HOLDS** (1 run of {a['steps']} steps + {a['steps'] // a['hyper_every']} validation "
        f"gradients vs 9 runs); in wall time **{'HOLDS' if s['wall_ratio'][0] <= 2 else 'FAILS'}** "
        f"({s['wall_ratio'][0]:.2f}x: each RTHO step is a vmap of 2 forward-over-reverse JVPs).",
        "",
        "How each choice was made: the grid is fixed in advance "
        f"(lr {a['grid_lrs']} x momentum {a['grid_momenta']}) and scored on the validation "
        f"split; RTHO starts at lr {a['init_lr']:g}, momentum {a['init_momentum']:g} "
        f"(the grid's centre, fixed in advance), hyper-optimizer Adam every "
        f"{a['hyper_every']} steps on validation batches of {a['val_batch']}; its hyper "
        f"learning rate was chosen from "
        f"{a['hyper_lrs']} on the selection seeds {a['selection_seeds']} by final validation "
        f"loss: "
        + ", ".join(
            f"{c['hyper_lr']:g} -> {statistics.fmean(c['val_losses']):.4f}"
            for c in sel["candidates"]
        )
        + f" (chosen {sel['candidates'][sel['chosen']]['hyper_lr']:g}). The test split was "
        "not used for any choice.",
        "",
        f"Machine: {result['machine']['cpu_model']}, torch {result['machine']['torch']}, "
        f"{result['machine']['torch_threads']} thread(s), load average at start "
        f"{result['machine']['load_average_at_start']}; {result['machine']['date']}.",
        "",
        f"Rerun: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for r in runs:
        curve = r["rtho"]["curve"]
        steps = [c["inner_step"] for c in curve]
        axes[0].plot(steps, [c["lr"] for c in curve], label=f"seed {r['seed']}")
        axes[1].plot(steps, [c["momentum"] for c in curve], label=f"seed {r['seed']}")
        (line,) = axes[2].plot(
            steps, [c["val_loss"] for c in curve], label=f"RTHO seed {r['seed']}"
        )
        axes[2].axhline(r["grid_best"]["val_loss"], color=line.get_color(), ls="--", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("learning rate")
    axes[1].set_ylabel("momentum")
    axes[2].set_ylabel("validation loss")
    axes[2].set_title("RTHO on validation batches; dashed: best grid point", fontsize=8)
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("inner step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, short runs (a smoke test)")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-val", type=int, default=5_000)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--val-batch", type=int, default=500)
    p.add_argument("--steps", type=int, default=1_000)
    p.add_argument("--hyper-every", type=int, default=10)
    p.add_argument("--grid-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    p.add_argument("--grid-momenta", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    p.add_argument("--init-lr", type=float, default=0.03)
    p.add_argument("--init-momentum", type=float, default=0.5)
    p.add_argument("--hyper-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="report seeds")
    p.add_argument("--selection-seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ "
                   "(default: $HYPERGRADIENT_DATA)")  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val, args.steps, args.hidden = 1000, 500, 60, 32
        args.seeds, args.selection_seeds, args.hyper_lrs = [0], [100], [0.03, 0.1]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train, val = load_split(args)
    result = {
        "machine": machine_info(),
        "command": rerun_command("real_time.py", sys.argv[1:] if argv is None else argv),
        "data": data_source(args.data_dir),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")},
        "runs": [],
    }
    result["selection"] = select(args, train, val, print)
    hyper_lr = result["selection"]["candidates"][result["selection"]["chosen"]]["hyper_lr"]
    for seed in args.seeds:
        result["runs"].append(run_seed(args, seed, hyper_lr, train, val, print))
    # the test split, read once, for the two models of every report seed
    images, labels = hg.data.load_mnist(args.data_dir, split="test")
    test = (images.reshape(len(labels), -1).float() / 255.0, labels)
    for r in result["runs"]:
        models = r.pop("_models")
        r["test"] = {name: evaluate(model, test) for name, model in models.items()}
    runs = result["runs"]
    result["summary"] = {
        "grid_val": mean_std(r["grid_best"]["val_loss"] for r in runs),
        "rtho_val": mean_std(r["rtho"]["val_loss"] for r in runs),
        "grid_test_acc": mean_std(r["test"]["grid_best"][1] for r in runs),
        "rtho_test_acc": mean_std(r["test"]["rtho"][1] for r in runs),
        "wall_ratio": mean_std(r["rtho"]["seconds"] / r["plain_seconds"] for r in runs),
        "val_no_worse_every_seed": all(
            r["rtho"]["val_loss"] <= r["grid_best"]["val_loss"] for r in runs
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "real_time_quick" if args.quick else "real_time"
    (args.out / f"{stem}.json").write_text(json.dumps(finite_json(result), indent=1))
    (args.out / f"{stem}.md").write_text(markdown(result))
    plot(result, args.out / f"{stem}.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
