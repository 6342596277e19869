"""SketchySGD (defaults) vs. an SGD learning-rate grid on ill-conditioned logistic regression.

Problem (papers.md section 10): l2-regularised logistic regression on scikit-learn's
breast_cancer data with the *raw, unscaled* features plus a bias column (n = 569, d = 31),

    f(w) = mean_i log(1 + exp(-y_i x_i^T w)) + mu/2 ||w||^2,   y_i in {-1, +1},  mu = 1e-3,

whose Hessian at w = 0 has condition number about 4e8 (feature scales range from 1e-3 to
4e3).  f* comes from Newton's method with backtracking in float64 (gradient norm < 1e-12).

Methods, all from w = 0, gradient batch 32, the same shuffled batches, 30 epochs:

* **SketchySGD (defaults)**: rank 10, rho = 1e-3, lr (the multiplier alpha of the automatic
  step alpha / lambda_max) = 0.5, the preconditioner rebuilt once per epoch (update_freq =
  steps per epoch) from Hessian batches of b_H = floor(sqrt(n)) = 23 examples, and
  lambda_max the largest preconditioned top eigenvalue (10 Lanczos products each) of
  step_batches = 8 fresh batches of the gradient batch's size (``curvature_closure``).
  No tuning.
* **SketchySGD (defaults), no curvature_closure**: the 8 step batches are Hessian batches
  of 23 examples (what the optimizer does when only ``hessian_closure`` is given).
* **SketchySGD, the paper's step (step_batches=1)**: lambda_max of one further Hessian
  batch of 23, as in the paper and the authors' code; kept to show why the default changed.
* **SGD** (``torch.optim.SGD`` semantics, all rates at once) at 19 learning rates
  1e-8 ... 10 (half decades).  "Best SGD at epoch e" is, for each horizon e separately,
  the rate with the lowest median suboptimality at that epoch - an oracle-tuned baseline.

Suboptimality f(w) - f* is recorded after every epoch for 10 seeds (batch order, Hessian
batches, sketches); tables show medians over seeds, the worst seed, and how many seeds
ended worse than the starting point w = 0 ("diverged").  A negative control repeats
everything on standardised features, where plain SGD is well conditioned and most of the
gap should close; gradient batches of 8 and 128 check that the step rule is not tuned to
batch 32.  For every SketchySGD run the benchmark also records, per epoch, eta *
lambda_max(P^-1/2 H P^-1/2) of the *full-data* Hessian H right after the refresh and its
largest value over the epoch (P fixed, w moving): the evidence for why the paper's step
fails (above 2, even full-batch gradient descent with that step is unstable).

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/sketchy_logreg.py          # about 5 minutes (CPU)
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
# curvature_batch: size of the batches curvature_closure returns (None: no curvature_closure,
# the step comes from Hessian batches of floor(sqrt(n)) = 23)
SKETCHY = {
    "SketchySGD (defaults)": {"options": {}, "curvature_batch": "gradient"},
    "SketchySGD (defaults), no curvature_closure": {"options": {}, "curvature_batch": None},
    "SketchySGD, the paper's step (step_batches=1)": {
        "options": {"step_batches": 1},
        "curvature_batch": None,
    },
}


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


def preconditioned_full_curvature(opt: SketchySGD, w: torch.Tensor, x, y) -> float:
    """lambda_max(P^{-1/2} H(w) P^{-1/2}) of the full-data Hessian, dense (d = 31)."""
    approx, rho = opt.preconditioner, opt.rho
    root_h = approx.inverse_sqrt(hessian(w, x, y), rho)
    m = approx.inverse_sqrt(root_h.T.contiguous(), rho)
    return float(torch.linalg.eigvalsh(0.5 * (m + m.T))[-1])


def run_sketchy(
    x: torch.Tensor, y: torch.Tensor, f_star: float, seed: int, variant: dict, batch: int = BATCH
) -> dict:
    """SketchySGD from w = 0.  Gradient batches depend on the seed only (the same as SGD's).

    Returns the suboptimality after each epoch (``curve``, index 0: the start) and, per
    epoch, the step size and two diagnostics of it: eta * lambda_max of the *full-data*
    preconditioned Hessian right after the refresh (``gd_at_refresh``; above 2 even full-batch
    gradient descent with that step and preconditioner is unstable) and the largest value of
    it over the epoch's iterates with the preconditioner fixed (``gd_max_in_epoch``).
    """
    n = x.shape[0]
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    batch_gen = torch.Generator().manual_seed(seed)
    hess_gen = torch.Generator().manual_seed(10_000 + seed)
    b_h = math.isqrt(n)

    def fresh_batch_loss(size: int) -> torch.Tensor:
        idx = torch.randperm(n, generator=hess_gen)[:size]
        return objective(w, x[idx], y[idx])

    def hessian_closure() -> torch.Tensor:  # a fresh Hessian batch of sqrt(n) examples
        return fresh_batch_loss(b_h)

    closures = {"hessian_closure": hessian_closure}
    if variant["curvature_batch"] is not None:  # "gradient": the gradient batch's size
        size = batch if variant["curvature_batch"] == "gradient" else variant["curvature_batch"]
        closures["curvature_closure"] = lambda: fresh_batch_loss(size)
    opt = SketchySGD(
        [w],
        update_freq=math.ceil(n / batch),  # once per epoch
        generator=torch.Generator().manual_seed(20_000 + seed),
        **variant["options"],
    )
    out = {"curve": [float(objective(w.detach(), x, y)) - f_star], "step_size": []}
    out.update(gd_at_refresh=[], gd_max_in_epoch=[])
    for _ in range(EPOCHS):
        worst = 0.0
        for k, idx in enumerate(torch.randperm(n, generator=batch_gen).split(batch)):
            opt.zero_grad()
            objective(w, x[idx], y[idx]).backward()
            opt.step(**closures)  # refreshes at k = 0
            eta = opt.step_sizes[0]
            gd = eta * preconditioned_full_curvature(opt, w.detach(), x, y)
            if k == 0:
                out["gd_at_refresh"].append(gd)
                out["step_size"].append(eta)
            worst = max(worst, gd) if math.isfinite(gd) else math.inf
        out["gd_max_in_epoch"].append(worst)
        value = float(objective(w.detach(), x, y))
        if not math.isfinite(value):
            out["curve"] += [math.inf] * (EPOCHS + 1 - len(out["curve"]))
            break
        out["curve"].append(value - f_star)
    return out


def estimate_vs_full_data(runs: list[dict], alpha: float = 0.5) -> dict:
    """How the step's curvature estimate compares with the full-data one at the refreshes
    (those before f - f* exceeds 1, i.e. while the run is not yet lost):
    lambda_hat / lambda_max(P^-1/2 H_full P^-1/2) = alpha / gd_at_refresh.  Below alpha / 2
    the step is unstable even for full-batch gradient descent."""
    ratios = sorted(
        alpha / gd
        for r in runs
        for e, gd in enumerate(r["gd_at_refresh"])
        if r["curve"][e] < 1.0 and gd > 0
    )

    def quantile(q: float) -> float:
        return ratios[round(q * (len(ratios) - 1))]

    return {
        "refreshes": len(ratios),
        "min": ratios[0],
        "q05": quantile(0.05),
        "median": quantile(0.5),
        "q95": quantile(0.95),
        "fraction_below_alpha_over_2": sum(v < alpha / 2 for v in ratios) / len(ratios),
    }


def blow_up_analysis(runs: list[dict]) -> dict:
    """Epochs in which f - f* grew more than 10x (from below 1, i.e. not yet lost) against
    the others: medians of the two step diagnostics of :func:`run_sketchy`."""
    blow, calm = [], []
    for r in runs:
        c = r["curve"]
        for e in range(min(len(r["gd_at_refresh"]), EPOCHS)):
            if c[e] < 1.0:
                row = (r["gd_at_refresh"][e], r["gd_max_in_epoch"][e])
                (blow if c[e + 1] > 10 * c[e] else calm).append(row)

    def med(rows: list, i: int) -> float | None:
        return statistics.median(row[i] for row in rows) if rows else None

    return {
        "blow_up_epochs": len(blow),
        "other_epochs": len(calm),
        "median_gd_at_refresh": {"blow_up": med(blow, 0), "other": med(calm, 0)},
        "median_gd_max_in_epoch": {"blow_up": med(blow, 1), "other": med(calm, 1)},
        "other_epochs_with_gd_at_refresh_above_2": sum(row[0] > 2 for row in calm),
    }


def run_sgd_grid(
    x: torch.Tensor,
    y: torch.Tensor,
    f_star: float,
    seed: int,
    rates: list[float],
    batch: int = BATCH,
) -> list[list[float]]:
    """Plain SGD (``torch.optim.SGD`` without momentum: w <- w - lr g) at every rate at once,
    one row of ``w`` per rate, on the batches SketchySGD sees with this seed.  Returns one
    suboptimality curve per rate (inf once a row is no longer finite)."""
    n = x.shape[0]
    lrs = torch.tensor(rates, dtype=torch.float64)[:, None]
    ws = torch.zeros(len(rates), x.shape[1], dtype=torch.float64)
    batch_gen = torch.Generator().manual_seed(seed)

    def subopts(ws: torch.Tensor) -> list[float]:
        margins = -y * (ws @ x.T)  # (rates, n)
        f = torch.nn.functional.softplus(margins).mean(1) + 0.5 * MU * (ws * ws).sum(1)
        return [v - f_star if math.isfinite(v) else math.inf for v in f.tolist()]

    curves = [[v] for v in subopts(ws)]
    with torch.no_grad():
        for _ in range(EPOCHS):
            for idx in torch.randperm(n, generator=batch_gen).split(batch):
                xb, yb = x[idx], y[idx]
                # gradient of the batch objective, analytically: the same as autograd's
                s = torch.sigmoid(-yb * (ws @ xb.T))  # (rates, batch)
                ws = ws - lrs * (-(s * yb) @ xb / len(idx) + MU * ws)
            for curve, v in zip(curves, subopts(ws)):
                curve.append(v if math.isfinite(curve[-1]) else math.inf)
    return curves


def median_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.median(c[e] for c in curves) for e in range(EPOCHS + 1)]


def experiment(standardize: bool, seeds: list[int], batch: int = BATCH) -> dict:
    x, y = make_problem(standardize)
    w_star, f_star, grad_norm = newton_optimum(x, y)
    eig0 = torch.linalg.eigvalsh(hessian(torch.zeros_like(w_star), x, y))
    eig_star = torch.linalg.eigvalsh(hessian(w_star, x, y))
    sketchy = {}
    for name, variant in SKETCHY.items():
        t0 = time.perf_counter()
        runs = [run_sketchy(x, y, f_star, s, variant, batch) for s in seeds]
        curves = [r["curve"] for r in runs]
        start = curves[0][0]
        sketchy[name] = {
            "variant": variant,
            "per_seed": curves,
            "median": median_curve(curves),
            "diverged_at": {e: sum(c[e] > start for c in curves) for e in REPORT_EPOCHS},
            "seconds_per_run": (time.perf_counter() - t0) / len(seeds),
            "step_diagnostics_per_seed": [
                {k: r[k] for k in ("step_size", "gd_at_refresh", "gd_max_in_epoch")} for r in runs
            ],
            "blow_up_analysis": blow_up_analysis(runs),
            "estimate_vs_full_data": estimate_vs_full_data(runs, variant["options"].get("lr", 0.5)),
        }
    t0 = time.perf_counter()
    per_seed = [run_sgd_grid(x, y, f_star, s, SGD_GRID, batch) for s in seeds]
    sgd_seconds = (time.perf_counter() - t0) / len(seeds) / len(SGD_GRID)
    sgd = {lr: [rows[i] for rows in per_seed] for i, lr in enumerate(SGD_GRID)}
    sgd_median = {lr: median_curve(c) for lr, c in sgd.items()}
    best = {e: min(SGD_GRID, key=lambda lr, e=e: sgd_median[lr][e]) for e in REPORT_EPOCHS}
    return {
        "standardize": standardize,
        "batch": batch,
        "n": x.shape[0],
        "d": x.shape[1],
        "f_star": f_star,
        "subopt_at_start": float(objective(torch.zeros_like(w_star), x, y)) - f_star,
        "newton_grad_norm": grad_norm,
        "cond_hessian_at_0": float(eig0[-1] / eig0[0]),
        "cond_hessian_at_opt": float(eig_star[-1] / eig_star[0]),
        "sketchy": sketchy,
        "sgd": {f"{lr:.3g}": {"per_seed": sgd[lr], "median": sgd_median[lr]} for lr in SGD_GRID},
        "sgd_seconds_per_run": sgd_seconds,
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
    seeds = len(result["seeds"])
    for exp in result["experiments"]:
        name = "standardised features (negative control)" if exp["standardize"] else "raw features"
        lines += [
            f"**breast_cancer, {name}, gradient batch {exp['batch']}.** n = {exp['n']}, d = "
            f"{exp['d']} (with the bias column), mu = {MU:g}; cond(H(0)) = "
            f"{exp['cond_hessian_at_0']:.2g}, cond(H(w*)) = {exp['cond_hessian_at_opt']:.2g}; "
            f"f* = {exp['f_star']:.10f} (Newton, gradient norm {exp['newton_grad_norm']:.1e}); "
            f"f(0) - f* = {exp['subopt_at_start']:.3f}.  Median suboptimality f(w) - f* over "
            f"{seeds} seeds (in brackets: seeds worse than w = 0):",
            "",
            "| method | "
            + " | ".join(f"epoch {e}" for e in REPORT_EPOCHS)
            + f" | worst seed, epoch {EPOCHS} | s / run |",
            "|---|" + "---:|" * (len(REPORT_EPOCHS) + 2),
        ]
        for label, res in exp["sketchy"].items():
            cells = [
                f"{fmt(res['median'][e])} ({res['diverged_at'][e]}/{seeds})" for e in REPORT_EPOCHS
            ]
            worst = max(c[EPOCHS] for c in res["per_seed"])
            cells += [fmt(worst), f"{res['seconds_per_run']:.1f}"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        cells = [
            f"{fmt(exp['best_sgd_at_epoch'][e])} (lr {exp['best_sgd_lr_at_epoch'][e]:.3g})"
            for e in REPORT_EPOCHS
        ]
        cells += ["", f"{exp['sgd_seconds_per_run']:.2f}"]
        lines.append("| best SGD of the grid, tuned per column | " + " | ".join(cells) + " |")
        default = exp["sketchy"]["SketchySGD (defaults)"]["median"]
        ratios = ", ".join(
            f"epoch {e}: {default[e] / exp['best_sgd_at_epoch'][e]:.3g}" for e in REPORT_EPOCHS
        )
        lines += [
            "",
            f"SketchySGD (defaults) / best SGD: {ratios}.",
            "",
            "The step's curvature estimate lambda_hat over lambda_max(P^-1/2 H_full P^-1/2) of "
            "the full data, at the refreshes while f - f* < 1 (min / 5th percentile / median; "
            "share of refreshes below lr/2 = 1/4, where even full-batch gradient descent with "
            "that step is unstable): "
            + "; ".join(
                f"{label}: {q['min']:.3f} / {q['q05']:.2f} / {q['median']:.2f}; "
                f"{100 * q['fraction_below_alpha_over_2']:.1f} % of {q['refreshes']}"
                for label, q in (
                    (label, res["estimate_vs_full_data"]) for label, res in exp["sketchy"].items()
                )
            )
            + ".",
            "",
        ]
        for label, res in exp["sketchy"].items():
            a = res["blow_up_analysis"]
            if a["blow_up_epochs"]:
                at, mx = a["median_gd_at_refresh"], a["median_gd_max_in_epoch"]
                lines += [
                    f"{label}: {a['blow_up_epochs']} epochs in which f - f* grew more than "
                    f"10x (of {a['blow_up_epochs'] + a['other_epochs']}). Median eta * "
                    f"lambda_max(P^-1/2 H_full P^-1/2) right after their refresh "
                    f"{at['blow_up']:.2f} (other epochs {at['other']:.2f}; above 2 in "
                    f"{a['other_epochs_with_gd_at_refresh_above_2']} of them), largest over "
                    f"the epoch with P fixed {mx['blow_up']:.2f} (other epochs "
                    f"{mx['other']:.2f}).",
                    "",
                ]
        lines += [
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
    cols = 2
    rows = math.ceil(len(exps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    epochs = list(range(EPOCHS + 1))
    for ax, exp in zip(axes.flat, exps):
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
        for color, (label, res) in zip(("C2", "C1", "C3"), exp["sketchy"].items()):
            for curve in res["per_seed"]:
                ax.semilogy(epochs, curve, color=color, lw=0.5, alpha=0.35)
            ax.semilogy(epochs, res["median"], color=color, lw=2, label=f"{label}, median")
        ax.set_ylim(1e-4, 1e3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("f(w) - f*  (thin: single seeds)")
        kind = "standardised (control)" if exp["standardize"] else "raw features"
        ax.set_title(f"breast_cancer logistic, {kind}, batch {exp['batch']}", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compact(result: dict) -> dict:
    """The JSON record: floats to 4 significant digits, and SGD's per-seed curves (19 rates
    x 10 seeds per experiment) left out - their medians stay."""

    def squeeze(value):
        if isinstance(value, float):
            return float(f"{value:.4g}") if math.isfinite(value) else value
        if isinstance(value, dict):
            return {k: squeeze(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [squeeze(v) for v in value]
        return value

    out = squeeze(result)
    for exp in out["experiments"]:
        for record in exp["sgd"].values():
            record.pop("per_seed")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="3 seeds instead of 10")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(3 if args.quick else 10))
    t0 = time.perf_counter()
    experiments = [experiment(False, seeds), experiment(True, seeds)]
    # the rule is meant to hold for any gradient batch: raw features, batches 8 and 128
    experiments += [experiment(False, seeds, batch) for batch in (8, 128)]
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
                "step_batches": 8,
                "hessian_batch": "floor(sqrt(n))",
                "curvature_batch": "the gradient batch's size",
                "update_freq": "steps per epoch",
            },
            "sketchy_variants": SKETCHY,
        },
        "experiments": experiments,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sketchy_logreg.json").write_text(json.dumps(compact(result), indent=1) + "\n")
    (args.out / "sketchy_logreg.md").write_text(markdown(result, header) + "\n")
    plot(result, args.out / "sketchy_logreg.png")
    print(markdown(result, header))
    print(f"wrote {args.out}/sketchy_logreg.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
