"""SketchySGD (defaults) vs. an SGD learning-rate grid on ill-conditioned logistic regression.

Problem (papers.md section 10): l2-regularised logistic regression on scikit-learn's
breast_cancer data with the *raw, unscaled* features plus a bias column (n = 569, d = 31),

    f(w) = mean_i log(1 + exp(-y_i x_i^T w)) + mu/2 ||w||^2,   y_i in {-1, +1},  mu = 1e-3,

whose Hessian at w = 0 has condition number about 4e8 (feature scales range from 1e-3 to
4e3).  f* comes from Newton's method with backtracking in float64 (gradient norm < 1e-12).

Methods, all from w = 0, gradient batch 32, the same shuffled batches, 30 epochs:

* **SketchySGD** with its defaults: rank 10, rho = 1e-3, lr (the multiplier alpha of the
  automatic step 1/lambda_max) = 0.5, 10 Hessian-vector products for lambda_max, the
  preconditioner rebuilt once per epoch (update_freq = steps per epoch) from Hessian
  batches of b_H = floor(sqrt(n)) = 23 examples.  No tuning.
* **SketchySGD, lr = 0.1**: the same with a smaller multiplier (one knob, not tuned
  further), because the defaults are not stable to 30 epochs on this problem (see below).
* **SGD** (``torch.optim.SGD``) at 19 learning rates 1e-8 ... 10 (half decades).  "Best SGD
  at epoch e" is, for each horizon e separately, the rate with the lowest median
  suboptimality at that epoch - an oracle-tuned baseline.

Suboptimality f(w) - f* is recorded after every epoch for 10 seeds (batch order, Hessian
batches, sketches); tables show medians over seeds and how many seeds ended worse than the
starting point w = 0 ("diverged").  A negative control repeats everything on standardised
features, where plain SGD is well conditioned and most of the gap should close.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/sketchy_logreg.py          # about 3 minutes (CPU)
    OMP_NUM_THREADS=1 python benchmarks/sketchy_logreg.py --quick  # 3 seeds

Writes ``<out>/sketchy_logreg.{json,md,png}`` (``--out``, default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_breast_cancer

try:
    from hypergradient.optimizers.sketchy import SketchySGD
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hypergradient.optimizers.sketchy import SketchySGD

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
MU = 1e-3
BATCH = 32
EPOCHS = 30
SGD_GRID = [10.0 ** (k / 2) for k in range(-16, 3)]  # 1e-8 ... 10, 19 rates
REPORT_EPOCHS = (5, 10, 20, 30)
SKETCHY = {"SketchySGD (defaults)": {}, "SketchySGD, lr = 0.1": {"lr": 0.1}}


# --------------------------------------------------------------------------------------
# problem
# --------------------------------------------------------------------------------------


def make_problem(standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n, d + 1) with a bias column, labels in {-1, +1}, float64."""
    data = load_breast_cancer()
    x = torch.as_tensor(data.data, dtype=torch.float64)
    if standardize:
        x = (x - x.mean(0)) / x.std(0)
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    y = torch.as_tensor(data.target, dtype=torch.float64) * 2.0 - 1.0
    return x, y


def objective(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(-y * (x @ w)).mean() + 0.5 * MU * w.dot(w)


def hessian(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(y * (x @ w))
    return (x.T * (s * (1 - s))) @ x / x.shape[0] + MU * torch.eye(x.shape[1], dtype=x.dtype)


def newton_optimum(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Damped Newton in float64 until the gradient norm is below 1e-12."""

    def value_and_grad(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        w = w.clone().requires_grad_(True)
        f = objective(w, x, y)
        (g,) = torch.autograd.grad(f, w)
        return float(f.detach()), g

    w = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(200):
        f, g = value_and_grad(w)
        if float(g.norm()) < 1e-12:
            break
        step = torch.linalg.solve(hessian(w, x, y), g)
        t = 1.0
        while float(objective(w - t * step, x, y)) > f - 0.25 * t * float(g.dot(step)):
            t *= 0.5
        w = w - t * step
    f, g = value_and_grad(w)
    return w, f, float(g.norm())


# --------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------


def run(
    x: torch.Tensor,
    y: torch.Tensor,
    f_star: float,
    seed: int,
    *,
    sgd_lr: float | None = None,
    sketchy: dict | None = None,
) -> list[float]:
    """Suboptimality after each epoch (index 0: the start); batches depend on the seed only."""
    n = x.shape[0]
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    batch_gen = torch.Generator().manual_seed(seed)
    hessian_closure = None
    if sketchy is not None:
        hess_gen = torch.Generator().manual_seed(10_000 + seed)
        b_h = math.isqrt(n)

        def hessian_closure() -> torch.Tensor:
            idx = torch.randperm(n, generator=hess_gen)[:b_h]  # a fresh Hessian batch
            return objective(w, x[idx], y[idx])

        opt = SketchySGD(
            [w],
            update_freq=math.ceil(n / BATCH),  # once per epoch
            generator=torch.Generator().manual_seed(20_000 + seed),
            **sketchy,
        )
    else:
        opt = torch.optim.SGD([w], lr=sgd_lr)
    curve = [float(objective(w.detach(), x, y)) - f_star]
    for _ in range(EPOCHS):
        for idx in torch.randperm(n, generator=batch_gen).split(BATCH):
            opt.zero_grad()
            objective(w, x[idx], y[idx]).backward()
            if hessian_closure is None:
                opt.step()
            else:
                opt.step(hessian_closure=hessian_closure)
        value = float(objective(w.detach(), x, y))
        if not math.isfinite(value):
            curve += [math.inf] * (EPOCHS + 1 - len(curve))
            break
        curve.append(value - f_star)
    return curve


def median_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.median(c[e] for c in curves) for e in range(EPOCHS + 1)]


def experiment(standardize: bool, seeds: list[int]) -> dict:
    x, y = make_problem(standardize)
    w_star, f_star, grad_norm = newton_optimum(x, y)
    eig0 = torch.linalg.eigvalsh(hessian(torch.zeros_like(w_star), x, y))
    eig_star = torch.linalg.eigvalsh(hessian(w_star, x, y))
    sketchy = {}
    for name, options in SKETCHY.items():
        t0 = time.perf_counter()
        curves = [run(x, y, f_star, s, sketchy=options) for s in seeds]
        start = curves[0][0]
        sketchy[name] = {
            "options": options,
            "per_seed": curves,
            "median": median_curve(curves),
            "diverged_at": {e: sum(c[e] > start for c in curves) for e in REPORT_EPOCHS},
            "seconds_per_run": (time.perf_counter() - t0) / len(seeds),
        }
    sgd = {lr: [run(x, y, f_star, s, sgd_lr=lr) for s in seeds] for lr in SGD_GRID}
    sgd_median = {lr: median_curve(c) for lr, c in sgd.items()}
    best = {e: min(SGD_GRID, key=lambda lr, e=e: sgd_median[lr][e]) for e in REPORT_EPOCHS}
    return {
        "standardize": standardize,
        "n": x.shape[0],
        "d": x.shape[1],
        "f_star": f_star,
        "subopt_at_start": float(objective(torch.zeros_like(w_star), x, y)) - f_star,
        "newton_grad_norm": grad_norm,
        "cond_hessian_at_0": float(eig0[-1] / eig0[0]),
        "cond_hessian_at_opt": float(eig_star[-1] / eig_star[0]),
        "sketchy": sketchy,
        "sgd": {f"{lr:.3g}": {"per_seed": sgd[lr], "median": sgd_median[lr]} for lr in SGD_GRID},
        "best_sgd_lr_at_epoch": {e: best[e] for e in REPORT_EPOCHS},
        "best_sgd_at_epoch": {e: sgd_median[best[e]][e] for e in REPORT_EPOCHS},
    }


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------


def fmt(v: float) -> str:
    return "inf" if not math.isfinite(v) else f"{v:.2e}"


def markdown(result: dict, header: str) -> str:
    lines = [
        "### SketchySGD vs. tuned SGD: ill-conditioned logistic regression "
        "(`benchmarks/sketchy_logreg.py`)",
        "",
        header,
        "",
    ]
    for exp in result["experiments"]:
        name = "standardised features (negative control)" if exp["standardize"] else "raw features"
        seeds = len(result["seeds"])
        lines += [
            f"**breast_cancer, {name}.** n = {exp['n']}, d = {exp['d']} (with the bias "
            f"column), mu = {MU:g}; cond(H(0)) = {exp['cond_hessian_at_0']:.2g}, cond(H(w*)) "
            f"= {exp['cond_hessian_at_opt']:.2g}; f* = {exp['f_star']:.10f} (Newton, "
            f"gradient norm {exp['newton_grad_norm']:.1e}); f(0) - f* = "
            f"{exp['subopt_at_start']:.3f}.  Median suboptimality f(w) - f* over {seeds} "
            f"seeds (in brackets: seeds worse than w = 0):",
            "",
            "| method | " + " | ".join(f"epoch {e}" for e in REPORT_EPOCHS) + " |",
            "|---|" + "---:|" * len(REPORT_EPOCHS),
        ]
        for label, res in exp["sketchy"].items():
            cells = [
                f"{fmt(res['median'][e])} ({res['diverged_at'][e]}/{seeds})" for e in REPORT_EPOCHS
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        cells = [
            f"{fmt(exp['best_sgd_at_epoch'][e])} (lr {exp['best_sgd_lr_at_epoch'][e]:.3g})"
            for e in REPORT_EPOCHS
        ]
        lines.append("| best SGD of the grid, tuned per column | " + " | ".join(cells) + " |")
        default = exp["sketchy"]["SketchySGD (defaults)"]["median"]
        ratios = ", ".join(
            f"epoch {e}: {default[e] / exp['best_sgd_at_epoch'][e]:.3g}" for e in REPORT_EPOCHS
        )
        lines += [
            "",
            f"SketchySGD (defaults) / best SGD: {ratios}.",
            "",
            "SGD grid, median suboptimality at epoch 30: "
            + ", ".join(
                f"{lr:.3g}: {fmt(exp['sgd'][f'{lr:.3g}']['median'][-1])}" for lr in SGD_GRID
            )
            + ".",
            "",
        ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = result["experiments"]
    fig, axes = plt.subplots(1, len(exps), figsize=(6.5 * len(exps), 4.5), squeeze=False)
    epochs = list(range(EPOCHS + 1))
    for ax, exp in zip(axes[0], exps):
        final_best = exp["best_sgd_lr_at_epoch"][EPOCHS]
        for lr in SGD_GRID:
            curve = exp["sgd"][f"{lr:.3g}"]["median"]
            if lr != final_best and max(curve) < 10 * curve[0]:
                ax.semilogy(epochs, curve, color="0.8", lw=0.8)
        ax.semilogy([], [], color="0.8", lw=0.8, label="SGD, other grid rates (median)")
        ax.semilogy(
            epochs,
            exp["sgd"][f"{final_best:.3g}"]["median"],
            "C0",
            lw=2,
            label=f"best SGD at epoch {EPOCHS} (lr={final_best:.3g}, median)",
        )
        for color, (label, res) in zip(("C3", "C2"), exp["sketchy"].items()):
            for curve in res["per_seed"]:
                ax.semilogy(epochs, curve, color=color, lw=0.5, alpha=0.35)
            ax.semilogy(epochs, res["median"], color=color, lw=2, label=f"{label}, median")
        ax.set_ylim(1e-4, 1e3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("f(w) - f*  (thin: single seeds)")
        kind = "standardised (control)" if exp["standardize"] else "raw features"
        ax.set_title(f"breast_cancer logistic, {kind}")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="3 seeds instead of 10")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(3 if args.quick else 10))
    t0 = time.perf_counter()
    experiments = [experiment(False, seeds), experiment(True, seeds)]
    seconds = time.perf_counter() - t0
    command = "python benchmarks/sketchy_logreg.py" + (" --quick" if args.quick else "")
    header = (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; "
        f"{platform.platform()}; torch {torch.__version__} ({torch.get_num_threads()} "
        f"thread), Python {platform.python_version()}; {seconds:.0f} s. Command: "
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} {command}`."
    )
    result = {
        "benchmark": "sketchy_logreg",
        "command": command,
        "seconds": seconds,
        "seeds": seeds,
        "config": {
            "mu": MU,
            "batch": BATCH,
            "epochs": EPOCHS,
            "sgd_grid": SGD_GRID,
            "sketchy_defaults": {
                "rank": 10,
                "rho": 1e-3,
                "lr": 0.5,
                "eig_iters": 10,
                "hessian_batch": "floor(sqrt(n))",
                "update_freq": "steps per epoch",
            },
            "sketchy_variants": SKETCHY,
        },
        "experiments": experiments,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sketchy_logreg.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "sketchy_logreg.md").write_text(markdown(result, header) + "\n")
    plot(result, args.out / "sketchy_logreg.png")
    print(markdown(result, header))
    print(f"wrote {args.out}/sketchy_logreg.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
