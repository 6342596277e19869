"""How far mixed-precision training moves the hypergradients: bfloat16 and float16 autocast
against float32.

``BilevelTrainer`` runs the training steps' forward passes under ``torch.autocast`` and
computes hypergradients in float32.  Two runs from one init on the same batches (digits,
MLP 64-128-10 with BatchNorm, per-tensor weight decay, a hyper-step every 10 SGD steps),
one in float32 and one mixed: the relative error of the mixed run's hypergradient against
the float32 run's at each hyper-step, for 3 seeds, in units of the format's roundoff ``u``
(bfloat16 ``2^-8``, float16 ``2^-11``).  The weights stay float32, so the error is the
rounding the forward passes accumulate in the weights, which then grows as any two
trainings from one init part ways.

Run from the repository root (``--device cuda`` on a GPU)::

    python benchmarks/autocast_accuracy.py      # about a minute on a CPU

Writes ``<out>/autocast_accuracy.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg

from _common import machine_info, rerun_command

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
FORMATS = {"bfloat16": (torch.bfloat16, 2.0**-8), "float16": (torch.float16, 2.0**-11)}


def run(autocast, seed: int, hyper_steps: int, device) -> list[dict]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(digits.target, device=device)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(device)
    x, y = x[perm], y[perm]
    train = torch.utils.data.DataLoader(list(zip(x[:1000], y[:1000])), batch_size=64,
                                        shuffle=True)  # fmt: skip
    val = torch.utils.data.DataLoader(list(zip(x[1000:1400], y[1000:1400])), batch_size=200,
                                      shuffle=True)  # fmt: skip
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                        nn.Linear(128, 10)).to(device)  # fmt: skip
    grads: list[dict] = []
    trainer = hg.BilevelTrainer(
        net, hg.hparams.WeightDecay("per_tensor", initial=1e-3), train, val,
        torch.optim.SGD(net.parameters(), lr=0.1), hyper_every=10, autocast=autocast, seed=seed,
        callbacks=[lambda t, r: grads.append({k: v.grad.clone() for k, v in t.hparams.items()})],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(hyper_steps)
    return grads


def rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    return math.sqrt(num / sum(float((b[k].double() ** 2).sum()) for k in b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hyper-steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    errors: dict[str, list[list[float]]] = {name: [] for name in FORMATS}
    for seed in args.seeds:
        reference = run(None, seed, args.hyper_steps, args.device)
        for name, (dtype, _) in FORMATS.items():
            mixed = run(dtype, seed, args.hyper_steps, args.device)
            errors[name].append([rel(m, r) for m, r in zip(mixed, reference)])
    result = {"machine": machine_info(threads=1, device=args.device),
              "command": rerun_command("autocast_accuracy.py",
                                       sys.argv[1:] if argv is None else argv),
              "seeds": args.seeds, "errors": errors}  # fmt: skip
    steps = [s for s in (1, 2, 3, 5, 10, 20) if s <= args.hyper_steps]
    lines = ["# Mixed-precision training: hypergradient relative error against float32", "",
             f"{result['machine']['date']}, {result['machine']['cpu_model']}, device "
             f"{args.device}, torch {result['machine']['torch']}; digits MLP 64-128-10 with "
             f"BatchNorm, per-tensor weight decay, 10 SGD steps per hyper-step, seeds "
             f"{args.seeds} (median, max over seeds; in units of roundoff u in brackets).  "
             f"Rerun: `{result['command']}`", "",
             "| format | " + " | ".join(f"hyper-step {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]  # fmt: skip
    for name, (_, u) in FORMATS.items():
        cells = []
        for s in steps:
            values = [e[s - 1] for e in errors[name]]
            med, top = statistics.median(values), max(values)
            cells.append(f"{med:.2g}, {top:.2g} ({med / u:.2g}u, {top / u:.2g}u)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autocast_accuracy.json").write_text(json.dumps(result, indent=1))
    (args.out / "autocast_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
