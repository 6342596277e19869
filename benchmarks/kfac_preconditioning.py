"""Does K-FAC cut the CG iterations of an implicit hypergradient?  The logistic-regression twin.

The implicit hypergradient solves ``H q = dE/dw`` with CG (``hg.implicit_hypergrad``);
here ``H`` is the Hessian of multinomial logistic regression with one log-L2 penalty per
weight, ``H = F_CE + diag(exp(log_l2))``.  We count the CG iterations needed for a relative
error below 1e-4 of the hypergradient against the exact one (dense Hessian solve), with

* plain CG;
* Jacobi-PCG: the exact Hessian diagonal (closed form) as ``diagonal_preconditioner``;
* K-FAC-PCG: ``hg.optimizers.kfac.KFACPreconditioner`` with the factors of the model at the inner
  optimum (``curvature_factors``, exact Fisher), Tikhonov damping = the mean penalty
  coefficient (the isotropic part of the penalty; no tuning), ``damping_mode="tikhonov"``
  and, for comparison, the paper's ``"factored"`` damping with the same value.

Three instances:

1. ``hg.testing.logistic_problem()`` as it is (5 features, 3 classes, 80 examples):
   isotropic Gaussian features, so the Hessian is already well conditioned;
2. a harder twin with *correlated, badly scaled* features ``X = Z diag(logspace(0, -2)) Q^T``
   (Q a random rotation), 40 features, 8 classes, 600 examples, log-L2 around -6;
3. the digits twin of ``benchmarks/hypergrad_cost.py`` (B): ``load_digits`` 64 -> 10,
   1000 train / 400 val, log-L2 = -6 (real, correlated pixel features).

Then the Lorraine et al. (2020) comparison of inverse-Hessian approximations at equal
numbers of Hessian-vector products: identity, Neumann, CG, the K-FAC inverse alone
(``hg.optimizers.kfac.KFACSolver``: zero products) and K-FAC-PCG.

Timings: median of interleaved repeats in one process, 1 thread.  Run from the repository
root::

    PYTHONPATH=src python benchmarks/kfac_preconditioning.py          # about 1 minute
    PYTHONPATH=src python benchmarks/kfac_preconditioning.py --quick  # smoke test

Writes ``<out>/kfac_preconditioning.json`` and ``<out>/kfac_preconditioning.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch.func import jacrev  # noqa: E402

from _common import machine_info

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TARGET = 1e-4  # relative error of the hypergradient
BUDGETS = (0, 5, 10, 20, 40)  # Hessian-vector products, for the Lorraine comparison
DTYPE = torch.float64


# ======================================================================================
# the instances
# ======================================================================================


@dataclass
class Twin:
    """A logistic-regression bilevel problem with its exact hypergradient."""

    name: str
    description: str
    inner_loss: Callable
    outer_loss: Callable
    params: dict
    hparams: dict
    exact: dict
    X: torch.Tensor
    bias_penalty: float  # inner loss has bias_penalty * ||b||^2
    hessian_cond: float


def make_twin(name, description, X, y, Xv, yv, log_l2, bias_penalty) -> Twin:
    """Newton to machine precision, then the exact hypergradient by a dense solve.

    ``dE/dlam = -M^T H^{-1} dE/dw`` with the dense Hessian ``H`` and mixed Jacobian ``M``
    formed by ``torch.func`` (independent of the library's operators and solvers).
    """
    dim, classes = log_l2.shape

    def inner(p, h):
        reg = 0.5 * torch.sum(h["log_l2"].exp() * p["W"] ** 2) + bias_penalty * p["b"] @ p["b"]
        return F.cross_entropy(X @ p["W"] + p["b"], y) + reg

    def outer(p, h):
        return F.cross_entropy(Xv @ p["W"] + p["b"], yv)

    def unflat(v):
        return {"W": v[: dim * classes].reshape(dim, classes), "b": v[dim * classes :]}

    def f(v, lam):
        return inner(unflat(v), {"log_l2": lam})

    v = torch.zeros(dim * classes + classes, dtype=DTYPE)
    for _ in range(60):
        g = jacrev(f)(v, log_l2)
        if float(g.norm()) < 1e-13:
            break
        step = torch.linalg.solve(jacrev(jacrev(f))(v, log_l2), g)
        t, f0 = 1.0, f(v, log_l2)
        # backtracking keeps Newton safe far from the optimum; near it the full step is taken
        while f(v - t * step, log_l2) > f0 - 0.25 * t * (g @ step) and t > 1e-8:
            t *= 0.5
        v = v - t * step
    H = jacrev(jacrev(f, argnums=0), argnums=0)(v, log_l2)
    M = jacrev(jacrev(f, argnums=0), argnums=1)(v, log_l2).reshape(v.numel(), -1)
    gv = jacrev(lambda vv: outer(unflat(vv), {}))(v)
    exact = {"log_l2": -(M.T @ torch.linalg.solve(H, gv)).reshape(log_l2.shape)}
    eig = torch.linalg.eigvalsh(H)
    params = {k: t.clone() for k, t in unflat(v).items()}
    return Twin(
        name,
        description,
        inner,
        outer,
        params,
        {"log_l2": log_l2},
        exact,
        X,
        bias_penalty,
        float(eig[-1] / eig[0]),
    )


def default_twin() -> Twin:
    prob = hg.testing.logistic_problem()
    d = prob.data
    return make_twin(
        "logistic_problem",
        "hg.testing.logistic_problem() defaults: 5 features -> 3 classes, 80 train / 60 val, "
        "isotropic Gaussian features, log_l2 ~ -2 +- 0.5",
        d["X"],
        d["y"],
        d["X_val"],
        d["y_val"],
        prob.hparams["log_l2"],
        5e-3,
    )


def scaled_twin(n=600, dim=40, classes=8, seed=0) -> Twin:
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=DTYPE))[0]
    scales = torch.logspace(0, -2, dim, dtype=DTYPE)
    W_true = torch.randn(dim, classes, generator=gen, dtype=DTYPE) * 2
    Z = torch.randn(n, dim, generator=gen, dtype=DTYPE)
    Zv = torch.randn(n // 2, dim, generator=gen, dtype=DTYPE)
    X, Xv = Z * scales @ Q.T, Zv * scales @ Q.T
    y = torch.argmax(Z @ W_true / 5 + torch.randn(n, classes, generator=gen, dtype=DTYPE), 1)
    yv = torch.argmax(Zv @ W_true / 5 + torch.randn(n // 2, classes, generator=gen, dtype=DTYPE), 1)
    log_l2 = -6.0 + 0.5 * torch.randn(dim, classes, generator=gen, dtype=DTYPE)
    return make_twin(
        "scaled",
        f"correlated, badly scaled features X = Z diag(logspace(0,-2)) Q^T: {dim} features -> "
        f"{classes} classes, {n} train / {n // 2} val, log_l2 ~ -6 +- 0.5",
        X,
        y,
        Xv,
        yv,
        log_l2,
        5e-3,
    )


def digits_twin(standardize: bool = False) -> Twin:
    """The digits twin, pixels divided by 16 (as ``hypergrad_cost.py`` B), or standardised:
    each pixel centred and scaled to unit variance on the 1000 training images (constant
    pixels left at 0), which removes most of the ill-conditioning a preconditioner could
    otherwise take away."""
    data = load_digits()
    x = torch.as_tensor(data.data / 16.0, dtype=DTYPE)
    y = torch.as_tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    if standardize:
        mean, std = x[:1000].mean(0), x[:1000].std(0)
        x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
        return make_twin(
            "digits_standardized",
            "load_digits, each pixel standardised on the training images (seed-0 "
            "permutation): 64 pixels -> 10 classes, 1000 train / 400 val, log_l2 = -6 per "
            "weight",
            x[:1000],
            y[:1000],
            x[1000:1400],
            y[1000:1400],
            torch.full((64, 10), -6.0, dtype=DTYPE),
            0.5e-4,
        )
    return make_twin(
        "digits",
        "load_digits / 16 (seed-0 permutation): 64 pixels -> 10 classes, 1000 train / 400 val, "
        "log_l2 = -6 per weight (the twin of hypergrad_cost.py B)",
        x[:1000],
        y[:1000],
        x[1000:1400],
        y[1000:1400],
        torch.full((64, 10), -6.0, dtype=DTYPE),
        0.5e-4,
    )


# ======================================================================================
# preconditioners
# ======================================================================================


def kfac_preconditioner(twin: Twin, mode: str) -> hg.optimizers.kfac.KFACPreconditioner:
    """Factors of ``softmax(X W + b)`` at the inner optimum, by hooks on an nn.Linear."""
    W, b = twin.params["W"], twin.params["b"]
    net = torch.nn.Linear(*W.shape, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        net.weight.copy_(W.T)
        net.bias.copy_(b)
    block = hg.optimizers.kfac.curvature_factors(net, twin.X, fisher="exact")[""]
    return hg.optimizers.kfac.KFACPreconditioner(
        [hg.optimizers.kfac.KroneckerBlock(block.A, block.G, "W", "b", weight_layout="in_out")],
        damping=float(twin.hparams["log_l2"].exp().mean()),
        damping_mode=mode,
    )


def jacobi_preconditioner(twin: Twin):
    """Exact Hessian diagonal: mean_i xbar_ij^2 p_ic (1 - p_ic) + the penalty's."""
    W, b = twin.params["W"], twin.params["b"]
    p = torch.softmax(twin.X @ W + b, dim=1)
    v = p * (1 - p)
    diag_W = (twin.X**2).T @ v / len(twin.X) + twin.hparams["log_l2"].exp()
    diag_b = v.mean(0) + 2 * twin.bias_penalty
    return hg.linalg.diagonal_preconditioner({"W": diag_W, "b": diag_b})


PRECONDITIONERS: dict[str, Callable[[Twin], Callable | None]] = {
    "cg": lambda twin: None,
    "jacobi_pcg": jacobi_preconditioner,
    "kfac_pcg": lambda twin: kfac_preconditioner(twin, "tikhonov"),
    "kfac_pcg_factored": lambda twin: kfac_preconditioner(twin, "factored"),
}
LABELS = {
    "cg": "CG",
    "jacobi_pcg": "Jacobi-PCG (exact diag)",
    "kfac_pcg": "K-FAC-PCG (tikhonov)",
    "kfac_pcg_factored": "K-FAC-PCG (factored)",
}


def hypergrad(twin: Twin, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0: a fixed number of steps, no warning wanted
        return hg.implicit_hypergrad(
            twin.inner_loss, twin.outer_loss, twin.params, twin.hparams, return_stats=True, **kwargs
        )


def rel_err(g, twin: Twin) -> float:
    return hg.testing.relative_error(g, twin.exact)


def cosine(g, twin: Twin) -> float:
    a, b = g["log_l2"].reshape(-1), twin.exact["log_l2"].reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


def iterations_to_target(twin: Twin, preconditioner, limit: int) -> tuple[int | None, list]:
    """Smallest k with rel. error < TARGET (CG with exactly k steps), and the error curve."""
    curve = []
    for k in range(1, limit + 1):
        g, _ = hypergrad(twin, solver="cg", max_steps=k, tol=0.0, preconditioner=preconditioner)
        curve.append(rel_err(g, twin))
        if curve[-1] < TARGET:
            return k, curve
    return None, curve


def median_time(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median wall time of each function, repeats interleaved (order rotated each round)."""
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        fns[n]()
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    return {n: statistics.median(s) for n, s in samples.items()}


# ======================================================================================
# the runs
# ======================================================================================


def run_twin(twin: Twin, repeats: int, limit: int) -> dict:
    print(f"[{twin.name}] cond(H) = {twin.hessian_cond:.3g}", flush=True)
    built = {name: make(twin) for name, make in PRECONDITIONERS.items()}
    rows = {}
    for name, P in built.items():
        k, curve = iterations_to_target(twin, P, limit)
        rows[name] = {"iterations": k, "curve": curve}
        print(f"   {LABELS[name]:<26} iterations to {TARGET:g}: {k}", flush=True)

    fns: dict[str, Callable] = {}
    for name, row in rows.items():
        k = row["iterations"]
        if k is None:
            continue
        P = built[name]
        fns[f"solve:{name}"] = lambda k=k, P=P: hypergrad(
            twin, solver="cg", max_steps=k, tol=0.0, preconditioner=P
        )
        if name != "cg":
            fns[f"build:{name}"] = lambda name=name: PRECONDITIONERS[name](twin)
    times = median_time(fns, repeats)
    for name, row in rows.items():
        if row["iterations"] is None:
            continue
        _, stats = hypergrad(
            twin, solver="cg", max_steps=row["iterations"], tol=0.0, preconditioner=built[name]
        )
        row["hvps"] = stats.extra["num_hvps"]
        row["solve_s"] = times[f"solve:{name}"]
        row["build_s"] = times.get(f"build:{name}", 0.0)
        row["total_s"] = row["solve_s"] + row["build_s"]

    # Lorraine et al. (2020): inverse-Hessian approximations at equal HVP budgets
    kfac = built["kfac_pcg"]
    lorraine = []

    def record(method, budget, **kwargs):
        g, stats = hypergrad(twin, **kwargs)
        lorraine.append(
            {
                "method": method,
                "budget": budget,
                "hvps": stats.extra["num_hvps"],
                "rel_err": rel_err(g, twin),
                "cosine": cosine(g, twin),
            }
        )

    record("identity (T1-T2)", 0, solver="identity")
    record("K-FAC inverse (KFACSolver)", 0, solver=hg.optimizers.kfac.KFACSolver(kfac))
    for k in BUDGETS[1:]:
        # alpha = 1/lambda_max from 20 power iterations (counted in the HVPs column)
        record("Neumann", k, solver="neumann", max_steps=k)
        record("CG", k, solver="cg", max_steps=k, tol=0.0)
        record("K-FAC-PCG", k, solver="cg", max_steps=k, tol=0.0, preconditioner=kfac)
    return {
        "name": twin.name,
        "description": twin.description,
        "unknowns": sum(t.numel() for t in twin.params.values()),
        "hessian_cond": twin.hessian_cond,
        "damping": kfac.damping,
        "rows": rows,
        "lorraine": lorraine,
    }


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{1e3 * s:.1f} ms"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "### K-FAC preconditioning of implicit hypergradients "
        "(`benchmarks/kfac_preconditioning.py`)",
        "",
        f"{m['date']}; {m['platform']}; torch {m['torch']} ({m['torch_threads']} thread), "
        f"Python {m['python']}; median of {m['repeats']} interleaved repeats; 1-minute load "
        f"average at the start {m['load_average_at_start'][0]:.2f}.",
        "",
        f"CG iterations until the implicit hypergradient is within relative error {TARGET:g} "
        f"of the exact one (dense Hessian solve); *solve* = one `implicit_hypergrad` call with "
        f"that many CG steps, *build* = computing the preconditioner. K-FAC damping = mean "
        f"penalty coefficient exp(log_l2) (not tuned).",
        "",
        "| instance | unknowns | cond(H) | method | iterations | HVPs | solve | build | total |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for inst in result["instances"]:
        for name, row in inst["rows"].items():
            lines.append(
                f"| {inst['name']} | {inst['unknowns']} | {inst['hessian_cond']:.3g} | "
                f"{LABELS[name]} | {row['iterations'] if row['iterations'] else '> limit'} | "
                f"{row.get('hvps', '-')} | {_ms(row.get('solve_s'))} | "
                f"{_ms(row.get('build_s')) if name != 'cg' else '-'} | {_ms(row.get('total_s'))} |"
            )
    lines += ["", "Instances:", ""]
    for inst in result["instances"]:
        lines.append(f"* **{inst['name']}**: {inst['description']}.")
    lines += [
        "",
        "Inverse-Hessian approximations at equal budgets of Hessian-vector products "
        "(Lorraine et al. 2020), relative error / cosine to the exact hypergradient. "
        "Neumann's HVP count includes the 20 power iterations that pick alpha = 1/lambda_max.",
        "",
    ]
    for inst in result["instances"]:
        lines += [
            f"**{inst['name']}**",
            "",
            "| method | budget k | HVPs | rel. error | cosine |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in inst["lorraine"]:
            lines.append(
                f"| {r['method']} | {r['budget']} | {r['hvps']} | {r['rel_err']:.2e} | "
                f"{r['cosine']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two instances, 3 repeats")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--limit", type=int, default=200, help="max CG iterations scanned")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small ops: one thread is faster and steadier on a busy machine
    repeats = 3 if args.quick else args.repeats
    makers = [default_twin, scaled_twin]
    if not args.quick:
        makers += [digits_twin, lambda: digits_twin(standardize=True)]
    result = {"machine": machine_info(repeats=repeats), "target_rel_err": TARGET, "instances": []}
    for make in makers:
        result["instances"].append(run_twin(make(), repeats, args.limit))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kfac_preconditioning.json").write_text(json.dumps(result, indent=1))
    report = markdown(result)
    (args.out / "kfac_preconditioning.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
