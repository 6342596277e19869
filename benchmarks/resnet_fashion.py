"""A ResNet with BatchNorm on Fashion-MNIST: per-layer weight decay and a learned
augmentation network tuned by hypergradients, against the best of a grid of global weight
decays at equal compute.

* Model: a ResNet in the style of He et al.'s CIFAR ResNet-20 (3x3 convolution, three stages
  of ``--blocks`` residual blocks of two 3x3 convolutions with BatchNorm, widths ``w, 2w, 4w``,
  stride 2 between stages, global average pooling, a linear head): ``--blocks 3`` is
  ResNet-20 (272k weights at width 16), the CPU-sized default ``--blocks 1`` is ResNet-8.
* Data: ``--n-train`` training and ``--n-val`` validation images drawn from Fashion-MNIST's
  training set (seeded), pixels standardised; the 10,000 test images read once per run at
  the end.  Files from ``--data-dir`` or ``$HYPERGRADIENT_DATA`` (md5-checked loaders).
* Both arms: SGD (momentum 0.9), the same batches, ``--steps`` steps, and the same cosine
  decay of the learning rate to zero as a staircase changed every ``--hyper-every`` steps
  (the trainer changes it between hyper-steps).  Without it, runs that end at a large
  constant rate left noisy BatchNorm statistics: the grid's test accuracy spread from 0.68
  to 0.82 over three seeds in this benchmark's first version.
* Grid arm: a global ``weight_decay`` from ``--grid``; the value with the lowest validation
  loss is the grid's answer, per seed.
* Hypergradient arm: ``BilevelTrainer`` with ``hg.hparams.Combined(AugmentationNet(affine),
  WeightDecay("per_tensor"))`` (a decay per layer tensor and the augmentation network's
  weights), implicit hypergradients (Neumann, ``--neumann-steps`` terms), a hyper-step every
  ``--hyper-every`` steps.  Its hyper learning rate and initial decay are chosen among
  ``--hyper-lrs`` x ``--init-decays`` on ``--selection-seeds`` (lowest mean validation
  loss; no test data read), then run once on each report seed.
* Equal compute: the grid's size is set so that the grid's total wall time is close to one
  hypergradient run's (both printed, with their ratio).
* Every number is reported per seed and as mean and spread over ``--seeds``; peak memory is
  the process's resident high-water mark during each run (reset before it).

Run from the repository root (``--device cuda`` on a GPU, unchanged)::

    HYPERGRADIENT_DATA=/path/to/datasets python benchmarks/resnet_fashion.py
    HYPERGRADIENT_DATA=/path/to/datasets python benchmarks/resnet_fashion.py --quick

Writes ``<out>/resnet_fashion.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg

from _common import (
    data_source,
    machine_info,
    rerun_command,
    reset_peak_rss,
    status_kib,
    write_outputs,
)

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (0-1 scale)


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (1x1 convolution when the shape
    changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


def resnet(blocks: int, width: int, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU()]  # fmt: skip
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for j in range(blocks):
            layers.append(Block(cin, cout, 2 if (j == 0 and stage > 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def load(args, seed: int, device):
    images, labels = hg.data.load_fashion_mnist(args.data_dir, split="train")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    x = ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)
    pick_train, pick_val = perm[: args.n_train], perm[args.n_train : args.n_train + args.n_val]
    test_images, test_labels = hg.data.load_fashion_mnist(args.data_dir, split="test")
    x_test = ((test_images.float() / 255.0 - MEAN) / STD).unsqueeze(1)
    return {
        "train": (x[pick_train].to(device), labels[pick_train].to(device)),
        "val": (x[pick_val].to(device), labels[pick_val].to(device)),
        "test": (x_test.to(device), test_labels.to(device)),
    }


def loader(pair, batch_size: int, shuffle: bool):
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*pair), batch_size=batch_size, shuffle=shuffle
    )


@torch.no_grad()
def evaluate(model: nn.Module, pair, chunk: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (running statistics)."""
    model.eval()
    x, y = pair
    loss, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(x[i : i + chunk])
        loss += float(F.cross_entropy(out, y[i : i + chunk], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + chunk]).sum())
    model.train()
    return loss / len(y), correct / len(y)


def build_model(args, seed: int, device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resnet(args.blocks, args.width).to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measured(fn, device):
    """(result, seconds, peak resident MiB during the call)."""
    sync(device)
    reset = reset_peak_rss()
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM") if reset else None
    return out, seconds, None if peak is None else peak / 1024


def lr_at(args, block: int) -> float:
    """Cosine decay of the SGD rate to zero, constant over each block of ``--hyper-every``
    steps (the hypergradient arm changes it between hyper-steps; the grid arm follows the
    same staircase): running statistics and weights settle at the end of every run."""
    blocks = max(args.steps // args.hyper_every, 1)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(block, blocks) / blocks))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grid_run(args, data, seed: int, decay: float, device) -> nn.Module:
    model = build_model(args, seed, device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=decay)
    stream = hg.train.BatchStream(loader(data["train"], args.batch_size, True), seed)
    model.train()
    torch.manual_seed(seed)
    for step in range(args.steps):
        if step % args.hyper_every == 0:
            set_lr(opt, lr_at(args, step // args.hyper_every))
        x, y = stream.next()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def tuned_run(args, data, seed: int, device, hyper_lr: float, init_decay: float):
    model = build_model(args, seed, device)
    kind = hg.hparams.Combined(
        hg.hparams.AugmentationNet(image_shape=(1, 28, 28), transform="affine"),
        hg.hparams.WeightDecay("per_tensor", initial=init_decay),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_at(args, 0), momentum=0.9)
    trainer = hg.BilevelTrainer(
        model, kind, loader(data["train"], args.batch_size, True),
        loader(data["val"], args.val_batch_size, True),
        optimizer, hyper_optimizer=lambda hp: torch.optim.Adam(hp, lr=hyper_lr),
        method=hg.Implicit(solver="neumann", max_steps=args.neumann_steps),
        hyper_every=args.hyper_every, seed=seed, threads=args.threads,
        callbacks=[lambda tr, record: set_lr(optimizer, lr_at(args, tr.hyper_step))],
    )  # fmt: skip
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(args.steps // args.hyper_every)
    return model, trainer


def select(args, device, console) -> dict:
    """The hypergradient arm's own settings, chosen on the selection seeds (other data
    splits, inits and batch orders than the report seeds): every (hyper learning rate,
    initial decay) pair, the lowest mean validation loss wins.  No test data is read."""
    candidates = {}
    for hyper_lr, init_decay in itertools.product(args.hyper_lrs, args.init_decays):
        losses, seconds = [], []
        for seed in args.selection_seeds:
            data = load(args, seed, device)
            run = functools.partial(tuned_run, args, data, seed, device, hyper_lr, init_decay)
            (model, _), took, _ = measured(run, device)
            losses.append(evaluate(model, data["val"])[0])
            seconds.append(took)
        name = f"hyper_lr={hyper_lr:g} init_decay={init_decay:g}"
        candidates[name] = {"hyper_lr": hyper_lr, "init_decay": init_decay,
                            "val_loss": statistics.mean(losses), "val_losses": losses,
                            "seconds": statistics.mean(seconds)}  # fmt: skip
        console(f"  select {name}: val loss {statistics.mean(losses):.4f}, "
                f"{statistics.mean(seconds):.1f} s")  # fmt: skip
    chosen = min(candidates, key=lambda n: candidates[n]["val_loss"])
    return {"candidates": candidates, "chosen": chosen}


def run_seed(args, seed: int, device, console, hyper_lr: float, init_decay: float) -> dict:
    data = load(args, seed, device)
    grid = {}
    for decay in args.grid:
        model, seconds, peak = measured(lambda d=decay: grid_run(args, data, seed, d, device),
                                        device)  # fmt: skip
        val_loss, val_acc = evaluate(model, data["val"])
        grid[f"{decay:g}"] = {"model": model, "val_loss": val_loss, "val_acc": val_acc,
                              "seconds": seconds, "peak_mib": peak}  # fmt: skip
        console(f"  seed {seed} grid decay {decay:g}: val loss {val_loss:.4f}, "
                f"acc {val_acc:.4f}, {seconds:.1f} s")  # fmt: skip
    best = min(grid, key=lambda k: grid[k]["val_loss"])
    (model, trainer), seconds, peak = measured(
        lambda: tuned_run(args, data, seed, device, hyper_lr, init_decay), device
    )
    val_loss, val_acc = evaluate(model, data["val"])
    console(f"  seed {seed} hypergradients: val loss {val_loss:.4f}, acc {val_acc:.4f}, "
            f"{seconds:.1f} s")  # fmt: skip
    # the test set, read once per run kept: the grid's chosen value and the tuned model
    grid_test = evaluate(grid[best]["model"], data["test"])
    tuned_test = evaluate(model, data["test"])
    decays = {
        k: float(v.detach().exp()) for k, v in trainer.hparams.items() if k.startswith("log_wd.")
    }
    return {
        "seed": seed,
        "grid": {k: {kk: vv for kk, vv in v.items() if kk != "model"} for k, v in grid.items()},
        "grid_best": best,
        "grid_test_loss": grid_test[0],
        "grid_test_acc": grid_test[1],
        "grid_seconds": sum(v["seconds"] for v in grid.values()),
        "grid_peak_mib": max((v["peak_mib"] or 0) for v in grid.values()) or None,
        "tuned_val_loss": val_loss,
        "tuned_val_acc": val_acc,
        "tuned_test_loss": tuned_test[0],
        "tuned_test_acc": tuned_test[1],
        "tuned_seconds": seconds,
        "tuned_peak_mib": peak,
        "tuned_decays": decays,
        "tuned_val_curve": [r["val_loss"] for r in trainer.history],
        "threads": trainer.history[-1]["threads"] if trainer.history else None,
    }


def mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def markdown(result: dict) -> str:
    runs, a = result["runs"], result["args"]
    lines = [
        "# ResNet with BatchNorm on Fashion-MNIST: hypergradients vs a grid", "",
        f"{result['machine']['date']}, {result['machine']['cpu_model']}, device "
        f"{a['device']}, torch {result['machine']['torch']}.  ResNet-{6 * a['blocks'] + 2} "
        f"(width {a['width']}, {result['num_weights']:,} weights), {a['n_train']} training / "
        f"{a['n_val']} validation images, {a['steps']} SGD steps of {a['batch_size']} "
        f"(lr {a['lr']}, momentum 0.9), seeds {a['seeds']}.  Rerun: `{result['command']}`", "",
        "| arm | validation loss | validation accuracy | test accuracy | test loss | wall time "
        "(s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    best_val = [r["grid"][r["grid_best"]] for r in runs]
    lines.append(
        f"| best of grid {a['grid']} (chosen on validation) | "
        f"{mean_sd(v['val_loss'] for v in best_val)} | {mean_sd(v['val_acc'] for v in best_val)}"
        f" | {mean_sd(r['grid_test_acc'] for r in runs)} | "
        f"{mean_sd(r['grid_test_loss'] for r in runs)} | "
        f"{statistics.mean(r['grid_seconds'] for r in runs):.0f} (all {len(a['grid'])} runs) | "
        f"{statistics.mean(r['grid_peak_mib'] or 0 for r in runs):.0f} |"
    )
    lines.append(
        f"| per-layer decay + augmentation net (hypergradients) | "
        f"{mean_sd(r['tuned_val_loss'] for r in runs)} | "
        f"{mean_sd(r['tuned_val_acc'] for r in runs)} | "
        f"{mean_sd(r['tuned_test_acc'] for r in runs)} | "
        f"{mean_sd(r['tuned_test_loss'] for r in runs)} | "
        f"{statistics.mean(r['tuned_seconds'] for r in runs):.0f} (1 run) | "
        f"{statistics.mean(r['tuned_peak_mib'] or 0 for r in runs):.0f} |"
    )
    sel = result["selection"]
    grid_s = statistics.mean(r["grid_seconds"] for r in runs)
    tuned_s = statistics.mean(r["tuned_seconds"] for r in runs)
    lines += ["", f"Compute: the whole grid took {grid_s:.0f} s per seed, the hypergradient run "
              f"{tuned_s:.0f} s ({tuned_s / grid_s:.2f}x the grid).  Both arms use the same "
              f"SGD, the same batches and the same cosine learning-rate staircase (changed "
              f"every {a['hyper_every']} steps).  The grid's decay is chosen per seed on "
              f"validation loss.  The hypergradient arm's hyper learning rate and initial "
              f"decay were chosen on the selection seeds {a['selection_seeds']} (other splits, "
              f"inits and batch orders; no test data read): {sel['chosen']}.  Each report "
              f"run's test set is read once, at the end.", "",
              "| candidate (selection) | mean validation loss | seconds per run |",
              "|---|---|---|"]  # fmt: skip
    for name, c in sorted(sel["candidates"].items(), key=lambda kv: kv[1]["val_loss"]):
        lines.append(f"| {name} | {c['val_loss']:.4f} | {c['seconds']:.0f} |")
    lines += ["", "Per seed (grid value chosen, test accuracy grid / tuned):", ""]  # fmt: skip
    for r in runs:
        lines.append(f"* seed {r['seed']}: decay {r['grid_best']}, {r['grid_test_acc']:.4f} / "
                     f"{r['tuned_test_acc']:.4f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    seeds = [r["seed"] for r in runs]
    width = 0.38
    left.bar([s - width / 2 for s in seeds], [r["grid_test_acc"] for r in runs], width,
             label="best global decay (grid)")  # fmt: skip
    left.bar([s + width / 2 for s in seeds], [r["tuned_test_acc"] for r in runs], width,
             label="per-layer decay + augmentation")  # fmt: skip
    lo = min(min(r["grid_test_acc"], r["tuned_test_acc"]) for r in runs)
    left.set_ylim(lo - 0.02, 1.0)
    left.set_xlabel("seed")
    left.set_ylabel("test accuracy")
    left.legend(fontsize=8)
    for r in runs:
        right.plot(r["tuned_val_curve"], label=f"seed {r['seed']}")
    right.set_xlabel("hyper-step")
    right.set_ylabel("validation loss (batch, eval mode)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the script")
    p.add_argument("--blocks", type=int, default=1, help="residual blocks per stage (3: ResNet-20)")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage")
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--steps", type=int, default=400, help="SGD steps of every run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-batch-size", type=int, default=250)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument(
        "--hyper-every",
        type=int,
        default=20,
        help="SGD steps between hyper-steps (and between learning-rate changes)",
    )
    p.add_argument("--neumann-steps", type=int, default=5, help="Neumann terms per hypergradient")
    p.add_argument(
        "--hyper-lrs",
        type=float,
        nargs="+",
        default=[0.01, 0.03],
        help="Adam rates of the hyperparameters, chosen on the selection seeds",
    )
    p.add_argument(
        "--init-decays",
        type=float,
        nargs="+",
        default=[1e-4, 1e-3],
        help="initial per-layer decays, chosen on the selection seeds",
    )
    p.add_argument("--grid", type=float, nargs="+", default=[0.0, 1e-4, 1e-3, 1e-2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="report seeds")
    p.add_argument("--selection-seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", default=None, help="folder holding fashion-mnist/ "
                   "(default: $HYPERGRADIENT_DATA)")  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.n_train, args.n_val, args.steps = 4, 256, 128, 20
        args.grid, args.seeds, args.hyper_every = [0.0, 1e-3], [0], 10
        args.hyper_lrs, args.init_decays, args.selection_seeds = [0.01, 0.03], [1e-4], [100]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "machine": machine_info(device=str(device)),
        "command": rerun_command("resnet_fashion.py", sys.argv[1:] if argv is None else argv),
        "data": data_source(args.data_dir),
        # the output folder is left out: a result names no folder of the machine it ran on
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "num_weights": sum(p.numel() for p in resnet(args.blocks, args.width).parameters()),
        "runs": [],
    }
    result["selection"] = select(args, device, print)
    chosen = result["selection"]["candidates"][result["selection"]["chosen"]]
    for seed in args.seeds:
        result["runs"].append(
            run_seed(args, seed, device, print, chosen["hyper_lr"], chosen["init_decay"])
        )
    stem = "resnet_fashion_quick" if args.quick else "resnet_fashion"
    write_outputs(args.out, stem, result, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
