"""The GPU check: run it when a CUDA machine is available (under 5 minutes).

1. Hypergradients on CUDA against CPU float64 references: implicit (exact, CG, Neumann) and
   unrolled reverse mode on the ridge and logistic test problems, in float64 on the GPU.
2. The trainer on CUDA: a BatchNorm + dropout network, per-tensor weight decay; the
   hypergradients of a few hyper-steps against the same run on the CPU (float32, so within
   float32 reassociation), and the module's running statistics untouched by hypergradients.
3. Autocast on CUDA: bfloat16 and float16 (with a gradient scaler) training steps against a
   float32 CUDA run, relative error of the hypergradients after 2 hyper-steps, against a
   bound of twice the format's roundoff (what ``tests/test_autocast.py`` bounds on the CPU).
4. The cost table on the GPU: milliseconds of one training step and of one hypergradient
   (Neumann 10 / amortized CG) for an MLP 784-1024-1024-10 on random data, and their ratio.

Without a CUDA device it prints one line saying so and exits 0 (nothing to check here)::

    python benchmarks/gpu_check.py            # writes <out>/gpu_check.{json,md}

Exit status 1 when a check fails (the report says which).
"""

from __future__ import annotations

import argparse
import json
import math
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

from _common import machine_info

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"


def rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k].double().cpu() - b[k].double().cpu()) ** 2).sum()) for k in b)
    den = sum(float((b[k].double().cpu() ** 2).sum()) for k in b)
    return math.sqrt(num / max(den, 1e-300))


def to(tree: dict, device) -> dict:
    return {k: v.to(device) for k, v in tree.items()}


# ----------------------------------------------------------------------------- 1. functional
def check_functional(device) -> list[dict]:
    rows = []
    for name, make in (("ridge", hg.testing.ridge_problem),
                       ("logistic", hg.testing.logistic_problem)):  # fmt: skip
        cpu = make()
        gpu = make(device=device)
        exact = cpu.hypergrad  # closed form (ridge) or the Newton-converged one (logistic)
        reference = hg.implicit_hypergrad(
            cpu.inner_loss, cpu.outer_loss, cpu.params, cpu.hparams, solver="exact",
            stationarity_tol=None,
        )  # fmt: skip
        rows.append({"check": f"{name}: CPU exact solve vs the problem's hypergradient",
                     "rel_error": rel(reference, exact), "bound": 1e-8})  # fmt: skip
        for solver, steps, bound in (("exact", 0, 1e-10), ("cg", 200, 1e-8)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g = hg.implicit_hypergrad(
                    gpu.inner_loss, gpu.outer_loss, gpu.params, gpu.hparams, solver=solver,
                    max_steps=steps or 50, tol=1e-14, stationarity_tol=None,
                )  # fmt: skip
            rows.append({"check": f"{name}: implicit {solver} on {device}",
                         "rel_error": rel(g, reference), "bound": bound})  # fmt: skip
        neumann_cpu = hg.implicit_hypergrad(
            cpu.inner_loss, cpu.outer_loss, cpu.params, cpu.hparams, solver="neumann",
            max_steps=20, alpha=0.1, stationarity_tol=None,
        )  # fmt: skip
        neumann_gpu = hg.implicit_hypergrad(
            gpu.inner_loss, gpu.outer_loss, gpu.params, gpu.hparams, solver="neumann",
            max_steps=20, alpha=0.1, stationarity_tol=None,
        )  # fmt: skip
        rows.append({"check": f"{name}: Neumann-20 on {device} vs CPU",
                     "rel_error": rel(neumann_gpu, neumann_cpu), "bound": 1e-10})  # fmt: skip
        unrolled = [
            hg.unrolled_hypergrad(
                p.inner_loss, p.outer_loss, p.params, p.hparams, steps=20, lr=0.1
            )  # fmt: skip
            for p in (cpu, gpu)
        ]
        rows.append({"check": f"{name}: unrolled reverse T=20 on {device} vs CPU",
                     "rel_error": rel(unrolled[1], unrolled[0]), "bound": 1e-10})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- 2./3. trainer
def _trainer_run(device, autocast=None, hyper_steps=3, dropout=0.2):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 32, generator=gen)
    y = (x[:, :5].argmax(1) + (x[:, 5] > 1).long()) % 5
    train = torch.utils.data.DataLoader(
        list(zip(x[:384].to(device), y[:384].to(device))), batch_size=64, shuffle=True
    )
    val = torch.utils.data.DataLoader(
        list(zip(x[384:].to(device), y[384:].to(device))), batch_size=128, shuffle=True
    )
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(dropout),
                        nn.Linear(64, 5)).to(device)  # fmt: skip
    grads: list[dict] = []
    trainer = hg.BilevelTrainer(
        net, hg.hparams.WeightDecay("per_tensor", initial=1e-3), train, val,
        torch.optim.SGD(net.parameters(), lr=0.1), hyper_every=10, autocast=autocast,
        callbacks=[lambda t, r: grads.append({k: v.grad.clone() for k, v in t.hparams.items()})],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(hyper_steps)
    return trainer, grads


def check_trainer(device) -> list[dict]:
    rows = []
    # without dropout (the devices' generators differ): the same run on both, float32
    _, cpu = _trainer_run("cpu", dropout=0.0, hyper_steps=1)
    _, gpu = _trainer_run(device, dropout=0.0, hyper_steps=1)
    rows.append({"check": f"trainer (BatchNorm) on {device} vs CPU, float32, first hyper-step",
                 "rel_error": rel(gpu[0], cpu[0]), "bound": 1e-3})  # fmt: skip
    gpu_trainer, _ = _trainer_run(device)  # with dropout
    before = {k: v.clone() for k, v in gpu_trainer.model.state_dict().items()}
    with gpu_trainer._hypergradient_rng():
        gpu_trainer.hypergradient()
    after = gpu_trainer.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    rows.append({"check": f"trainer on {device}: a hypergradient leaves the module's buffers "
                          f"and weights as they were",
                 "rel_error": float(len(changed)), "bound": 0.5})  # fmt: skip
    _, fp32 = _trainer_run(device, hyper_steps=2)
    for dtype, u in ((torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)):
        _, mixed = _trainer_run(device, autocast=dtype, hyper_steps=2)
        rows.append({"check": f"autocast {str(dtype).split('.')[-1]} on {device} vs float32, "
                              f"2 hyper-steps",
                     "rel_error": max(rel(m, f) for m, f in zip(mixed, fp32)),
                     "bound": 2 * u})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- 4. cost
def cost_table(device, repeats: int = 20, width: int = 1024) -> list[dict]:
    torch.manual_seed(0)
    device = torch.device(device)
    net = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                        nn.Linear(width, 10)).to(device)  # fmt: skip
    x, y = torch.randn(256, 784, device=device), torch.randint(0, 10, (256,), device=device)
    xv, yv = torch.randn(256, 784, device=device), torch.randint(0, 10, (256,), device=device)
    f = hg.as_function(net)
    decay = hg.hparams.WeightDecay("per_weight", initial=1e-3)
    params = hg.params_of(net)
    hparams = decay.init(params)

    def inner(p, h):
        return F.cross_entropy(f(p, x), y) + decay.penalty(p, h)

    def outer(p, h):
        return F.cross_entropy(f(p, xv), yv)

    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def train_step():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    methods = {
        "train step": train_step,
        "implicit Neumann 10": lambda: hg.Implicit().hypergrad(
            inner, outer, params, hparams, lr=0.1
        ),  # fmt: skip
        "amortized CG 2 (Gauss-Newton)": None,
    }
    amortized = hg.AmortizedImplicit(max_steps=2, hessian="gauss_newton", damping=0.01)
    gn = decay.gauss_newton_loss(f, (x, y))
    methods["amortized CG 2 (Gauss-Newton)"] = lambda: amortized.hypergrad(
        gn, outer, params, hparams, lr=0.1
    )
    rows = []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for name, fn in methods.items():
        for _ in range(3):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        rows.append({"what": name, "ms": 1e3 * (time.perf_counter() - start) / repeats})
    unit = rows[0]["ms"]
    for row in rows:
        row["x_train_step"] = row["ms"] / unit
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a GPU machine.")  # fmt: skip
        return 0
    device = torch.device(args.device)
    start = time.perf_counter()
    checks = check_functional(device) + check_trainer(device)
    costs = cost_table(device)
    for row in checks:
        row["ok"] = bool(row["rel_error"] <= row["bound"])
    result = {"machine": machine_info(device=str(device)), "checks": checks, "costs": costs,
              "seconds": time.perf_counter() - start}  # fmt: skip
    lines = [f"# GPU check ({result['machine']['gpu']}, torch {result['machine']['torch']})", "",
             "| check | relative error | bound | ok |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['check']} | {r['rel_error']:.3g} | {r['bound']:.3g} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in checks]  # fmt: skip
    lines += ["", "| what | ms | x train step |", "|---|---|---|"]
    lines += [f"| {r['what']} | {r['ms']:.2f} | {r['x_train_step']:.1f} |" for r in costs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
