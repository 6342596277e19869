"""What does a hypergradient cost?  The library against hand-written torch.autograd code.

Two problems, both on scikit-learn's ``load_digits``:

A. An MLP 64-256-256-10 (tanh), float32, full batch, with one log weight decay per weight
   (85,002 hyperparameters).  Every hypergradient method of the library is timed next to a
   baseline written the way a careful person writes it with plain ``torch.autograd``
   (double backward: the gradient graph is built once and every Hessian-vector product is
   one more backward through it), and next to CG with *recomputed* Hessian-vector products
   (``torch.func.jvp(torch.func.grad(f))``), as several existing libraries do it.
B. Its convex twin, multinomial logistic regression in float64, solved to machine precision
   by Newton, where the exact hypergradient is known: how many CG steps, and how much time,
   does a relative error below 1e-4 take?

All timings run in ONE process, repetitions of all methods interleaved (the order rotates
every repeat) so that a noisy machine slows every method alike; we report medians.  Peak
memory is measured per method in a fresh subprocess (``--memory-probe METHOD``).

Run from the repository root::

    PYTHONPATH=src python benchmarks/hypergrad_cost.py            # full run, ~3-4 minutes
    PYTHONPATH=src python benchmarks/hypergrad_cost.py --quick    # smoke test

Writes ``<out>/hypergrad_cost.json`` and ``<out>/hypergrad_cost.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from torch.func import grad as func_grad
from torch.func import jacrev, jvp, vjp

from _common import load_cache, machine_info, reset_peak_rss, status_kib

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"

# Problem A settings (the brief of the benchmark).
HIDDEN = (256, 256)
INNER_LR = 0.1
INNER_TRAIN_STEPS = 200
LOG_WD = math.log(1e-3)  # initial value of every log weight decay
NEUMANN_ALPHA = INNER_LR  # fixed, so no power iteration is timed
RTOL_AGREE = 1e-4  # library vs baseline, float32

# Problem B settings.
LOG_L2_B = -6.0
B_STEPS = (10, 20, 30, 40, 50, 60, 80)
B_TARGET = 1e-4


# ======================================================================================
# Data and models
# ======================================================================================


def digits_split(sizes: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    """Digits features / 16 and labels, shuffled with a fixed seed and cut into ``sizes``.

    The last piece is whatever is left (the test set, unused here).
    """
    data = load_digits()
    x = torch.as_tensor(data.data / 16.0, dtype=dtype)
    y = torch.as_tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    pieces, start = [], 0
    for n in (*sizes, len(y) - sum(sizes)):
        pieces.append((x[start : start + n], y[start : start + n]))
        start += n
    return pieces


def mlp_init(sizes: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """``nn.Linear``-style init (uniform +-1/sqrt(fan_in)) from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = 1.0 / math.sqrt(fan_in)
        params[f"w{i}"] = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound
        params[f"b{i}"] = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
    return params


def mlp_forward(params: dict, x: torch.Tensor) -> torch.Tensor:
    n_layers = len(params) // 2
    h = x
    for i in range(n_layers):
        h = F.linear(h, params[f"w{i}"], params[f"b{i}"])
        if i < n_layers - 1:
            h = torch.tanh(h)
    return h


@dataclass
class ProblemA:
    """Trained MLP weights, their hyperparameters and the two losses."""

    params: dict[str, torch.Tensor]
    hparams: dict[str, torch.Tensor]  # one log weight decay per weight
    hparams_per_tensor: dict[str, torch.Tensor]  # one per parameter tensor (forward mode)
    inner_loss: Callable
    outer_loss: Callable


def make_problem_a(trained: dict[str, torch.Tensor] | None = None) -> ProblemA:
    """The MLP problem; ``trained`` skips the inner training (memory probes reuse it)."""
    (x_tr, y_tr), (x_val, y_val), _ = digits_split((1200, 300), torch.float32)

    def inner_loss(p, h):
        # The same function serves per-weight and per-tensor hparams (broadcasting).
        reg = sum(torch.sum(torch.exp(h[f"log_wd_{k}"]) * v**2) for k, v in p.items())
        return F.cross_entropy(mlp_forward(p, x_tr), y_tr) + 0.5 * reg

    def outer_loss(p, h):
        return F.cross_entropy(mlp_forward(p, x_val), y_val)

    params = mlp_init((64, *HIDDEN, 10))
    hparams = {f"log_wd_{k}": torch.full_like(v, LOG_WD) for k, v in params.items()}
    per_tensor = {f"log_wd_{k}": torch.tensor(LOG_WD) for k in params}
    if trained is not None:
        params = trained
    else:
        for _ in range(INNER_TRAIN_STEPS):
            params = sgd_step(inner_loss, params, hparams)
    return ProblemA(params, hparams, per_tensor, inner_loss, outer_loss)


def sgd_step(loss_fn, params, hparams):
    """One forward + backward + SGD update (out of place: the weights stay as they are)."""
    w = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(loss_fn(w, hparams), list(w.values()))
    with torch.no_grad():
        return {k: v - INNER_LR * g for (k, v), g in zip(w.items(), grads)}


# ======================================================================================
# Hand-written baselines (plain torch.autograd / torch.func, lists of tensors)
# ======================================================================================


def _dot(a, b):
    return sum(torch.sum(x * y) for x, y in zip(a, b))


def cg(hvp, b, steps):
    """Textbook conjugate gradients from x = 0, exactly ``steps`` iterations."""
    x = [torch.zeros_like(t) for t in b]
    r, p = list(b), list(b)
    rr = _dot(r, r)
    for _ in range(steps):
        ap = hvp(p)
        alpha = rr / _dot(p, ap)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap)]
        rr_new = _dot(r, r)
        p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p)]
        rr = rr_new
    return x


def neumann(hvp, b, steps, alpha):
    """``alpha * sum_{k=0}^{steps} (I - alpha H)^k b``."""
    v, total = list(b), list(b)
    for _ in range(steps):
        v = [vi - alpha * hi for vi, hi in zip(v, hvp(v))]
        total = [t + vi for t, vi in zip(total, v)]
    return [alpha * t for t in total]


def baseline_implicit(prob, solve):
    """Implicit hypergradient by double backward: one gradient graph, reused by every HVP."""
    w = {k: v.detach().requires_grad_(True) for k, v in prob.params.items()}
    h = {k: v.detach().requires_grad_(True) for k, v in prob.hparams.items()}
    w_list, h_list = list(w.values()), list(h.values())
    v = torch.autograd.grad(prob.outer_loss(w, h), w_list)
    g = torch.autograd.grad(prob.inner_loss(w, h), w_list, create_graph=True)
    q = solve(lambda u: torch.autograd.grad(g, w_list, u, retain_graph=True), v)
    mixed = torch.autograd.grad(g, h_list, q)
    # The validation loss does not use the hparams: no direct term.
    return {k: -m for k, m in zip(h, mixed)}


def baseline_unrolled(prob, hparams, steps, truncate=None):
    """Reverse-mode hypergradient through ``steps`` SGD steps (a create_graph loop)."""
    h = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    w = [v.detach() for v in prob.params.values()]
    keys = list(prob.params)
    keep = steps if truncate is None else truncate
    for _ in range(steps - keep):  # untracked prefix of truncated back-propagation
        w = [v.requires_grad_(True) for v in w]
        g = torch.autograd.grad(prob.inner_loss(dict(zip(keys, w)), hparams), w)
        with torch.no_grad():
            w = [wi - INNER_LR * gi for wi, gi in zip(w, g)]
    w = [v.detach().requires_grad_(True) for v in w]
    for _ in range(keep):
        g = torch.autograd.grad(prob.inner_loss(dict(zip(keys, w)), h), w, create_graph=True)
        w = [wi - INNER_LR * gi for wi, gi in zip(w, g)]
    grads = torch.autograd.grad(prob.outer_loss(dict(zip(keys, w)), h), list(h.values()))
    return dict(zip(h, grads))


def plain_implicit_recompute(inner_loss, outer_loss, params, hparams, steps):
    """Implicit CG hypergradient with every HVP recomputed: ``jvp(grad(f))``.

    This is how several existing libraries do it: each product runs a forward, a backward
    and their tangents again, instead of one backward through a retained graph.
    """
    keys = list(params)
    grad_w = func_grad(inner_loss)  # d inner / d params, as a function of (params, hparams)

    def hvp(u):
        tangent = dict(zip(keys, u))
        _, hu = jvp(lambda w: grad_w(w, hparams), (params,), (tangent,))
        return [hu[k] for k in keys]

    v = func_grad(outer_loss)(params, hparams)
    q = cg(hvp, [v[k] for k in keys], steps)
    _, pullback = vjp(lambda h: grad_w(params, h), hparams)
    (mixed,) = pullback(dict(zip(keys, q)))
    return {k: -m for k, m in mixed.items()}


# ======================================================================================
# The rows of problem A
# ======================================================================================


@dataclass
class Row:
    name: str
    fn: Callable[[], object]
    baseline: str | None = None  # the row this one is compared with
    library: bool = True
    note: str = ""


def problem_a_rows(prob: ProblemA) -> list[Row]:
    ihg, uhg = hg.implicit_hypergrad, hg.unrolled_hypergrad
    args = (prob.inner_loss, prob.outer_loss, prob.params, prob.hparams)
    per_tensor = (prob.inner_loss, prob.outer_loss, prob.params, prob.hparams_per_tensor)
    return [
        Row(
            "train_step",
            lambda: sgd_step(prob.inner_loss, prob.params, prob.hparams),
            library=False,
            note="the unit: one forward + backward + SGD update of the inner loss",
        ),
        Row(
            "implicit_cg10",
            lambda: ihg(*args, solver="cg", max_steps=10, tol=0.0),
            "baseline_cg10",
        ),
        Row(
            "baseline_cg10",
            lambda: baseline_implicit(prob, lambda hvp, b: cg(hvp, b, 10)),
            library=False,
        ),
        Row(
            "plain_cg10_recompute",
            lambda: plain_implicit_recompute(*args, steps=10),
            library=False,
            note="HVP = jvp(grad(f)) recomputed each time",
        ),
        Row(
            "implicit_neumann10",
            lambda: ihg(*args, solver="neumann", max_steps=10, tol=0.0, alpha=NEUMANN_ALPHA),
            "baseline_neumann10",
            note=f"alpha={NEUMANN_ALPHA} fixed: no power iteration",
        ),
        Row(
            "baseline_neumann10",
            lambda: baseline_implicit(prob, lambda hvp, b: neumann(hvp, b, 10, NEUMANN_ALPHA)),
            library=False,
        ),
        Row("implicit_identity", lambda: ihg(*args, solver="identity"), note="alpha=1"),
        Row(
            "unrolled_reverse_T10",
            lambda: uhg(*args, steps=10, lr=INNER_LR, mode="reverse"),
            "baseline_reverse_T10",
        ),
        Row(
            "baseline_reverse_T10",
            lambda: baseline_unrolled(prob, prob.hparams, 10),
            library=False,
        ),
        Row(
            "unrolled_reverse_T50",
            lambda: uhg(*args, steps=50, lr=INNER_LR, mode="reverse"),
            "baseline_reverse_T50",
        ),
        Row(
            "baseline_reverse_T50",
            lambda: baseline_unrolled(prob, prob.hparams, 50),
            library=False,
        ),
        Row(
            "unrolled_truncated_T50_K10",
            lambda: uhg(*args, steps=50, lr=INNER_LR, mode="reverse", truncate=10),
            "baseline_truncated_T50_K10",
        ),
        Row(
            "baseline_truncated_T50_K10",
            lambda: baseline_unrolled(prob, prob.hparams, 50, truncate=10),
            library=False,
        ),
        Row(
            "unrolled_forward_T10_per_tensor",
            lambda: uhg(*per_tensor, steps=10, lr=INNER_LR, mode="forward"),
            note="6 per-TENSOR hparams (one JVP each)",
        ),
    ]


def rel_diff(a: dict, b: dict) -> float:
    num = math.sqrt(sum(float(torch.sum((a[k] - b[k]) ** 2)) for k in b))
    den = math.sqrt(sum(float(torch.sum(b[k] ** 2)) for k in b))
    return num / den


def verify_problem_a(prob: ProblemA, rows: dict[str, Row]) -> dict[str, float]:
    """Every library method must agree with its baseline before anything is timed."""
    checks = {}
    results = {name: row.fn() for name, row in rows.items() if name != "train_step"}
    for name, row in rows.items():
        if row.baseline:
            checks[f"{name} vs {row.baseline}"] = rel_diff(results[name], results[row.baseline])
    checks["plain_cg10_recompute vs baseline_cg10"] = rel_diff(
        results["plain_cg10_recompute"], results["baseline_cg10"]
    )
    # Identity: H^{-1} ~ I, so dE/dlambda = -(d^2 L / d lambda dw) v = -exp(lambda) * w * v.
    w = {k: v.detach().requires_grad_(True) for k, v in prob.params.items()}
    v = torch.autograd.grad(prob.outer_loss(w, prob.hparams), list(w.values()))
    closed_form = {
        f"log_wd_{k}": -torch.exp(prob.hparams[f"log_wd_{k}"]) * prob.params[k] * vk
        for k, vk in zip(w, v)
    }
    checks["implicit_identity vs closed form"] = rel_diff(results["implicit_identity"], closed_form)
    # Forward mode (per-tensor hparams) against the reverse-mode baseline on the same hparams.
    checks["unrolled_forward_T10_per_tensor vs baseline reverse"] = rel_diff(
        results["unrolled_forward_T10_per_tensor"],
        baseline_unrolled(prob, prob.hparams_per_tensor, 10),
    )
    bad = {k: d for k, d in checks.items() if not d < RTOL_AGREE}
    if bad:
        raise AssertionError(f"library and baseline disagree (rel. diff >= {RTOL_AGREE}): {bad}")
    return checks


# ======================================================================================
# Timing
# ======================================================================================


def time_interleaved(fns: dict[str, Callable], repeats: int, warmup: int) -> dict[str, list]:
    """Seconds per call of every function, repetitions interleaved.

    The order rotates every repeat and runs backwards every other repeat: a call is slowed
    or sped up by what ran just before it (e.g. whether the allocator still holds the
    pages a big graph needs), so a library row must not always follow the same neighbour.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        for name in order[::-1] if r % 2 else order:
            gc.collect()  # a collection inside a timed call would land on whoever is unlucky
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


# ======================================================================================
# Peak memory, one fresh subprocess per method
# ======================================================================================


def memory_probe(method: str, weights: Path | None) -> dict:
    """Peak RSS increase during the first call of ``method`` over the RSS right before it.

    ``ru_maxrss`` cannot do this in a child process: it never goes down, and it starts at
    the *parent's* peak (the kernel carries the high-water mark across fork/exec), so any
    method smaller than the benchmark process would read as 0.  On Linux we instead reset
    the kernel's high-water mark (``VmHWM``) right before the call and read it after; the
    ``ru_maxrss`` difference is only the fallback elsewhere.
    """
    trained = load_cache(weights) if weights else None
    rows = {row.name: row for row in problem_a_rows(make_problem_a(trained))}
    fn = rows[method].fn
    gc.collect()
    rss_before = status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    reset = reset_peak_rss()
    fn()
    hwm_after = status_kib("VmHWM")
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if reset and rss_before is not None and hwm_after is not None:
        peak, how = hwm_after - rss_before, "VmHWM (reset right before) - VmRSS before"
    else:
        peak, how = maxrss_after - maxrss_before, "ru_maxrss after - before (a lower bound)"
    return {
        "method": method,
        "peak_increase_mib": peak / 1024,
        "rss_before_mib": None if rss_before is None else rss_before / 1024,
        "how": how,
    }


def run_memory_probes(methods: list[str], trained: dict[str, torch.Tensor]) -> dict[str, dict]:
    # Tensors above 64 KiB get their own mmap, returned to the OS when freed: the RSS right
    # before the call is then live memory, not glibc's cache of the setup's garbage.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parents[1] / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"  # the children skip the 200 training steps
        torch.save(trained, weights)
        for method in methods:
            proc = subprocess.run(
                [sys.executable, str(HERE), "--memory-probe", method, "--weights", str(weights)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe {method} failed:\n{proc.stderr}")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# ======================================================================================
# Problem A: everything together
# ======================================================================================


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a/b, each pair timed back to back in the same repeat.

    More robust than a ratio of medians when the machine's speed drifts during the run.
    """
    return statistics.median(x / y for x, y in zip(a, b))


def run_problem_a(repeats: int, warmup: int, memory: str, console: Console) -> dict:
    console.print("[bold]A[/bold]: training the MLP (200 SGD steps) ...")
    prob = make_problem_a()
    rows = {row.name: row for row in problem_a_rows(prob)}
    checks = verify_problem_a(prob, rows)
    console.print(f"   agreement checks passed (max rel. diff {max(checks.values()):.1e})")
    probe = {"all": list(rows), "some": ["train_step", "implicit_cg10"], "none": []}[memory]
    console.print(f"   memory: {len(probe)} fresh subprocesses ...")
    mem = run_memory_probes(probe, prob.params) if probe else {}
    console.print(f"   timing: {repeats} interleaved repeats after {warmup} warm-up ...")
    samples = time_interleaved({n: r.fn for n, r in rows.items()}, repeats, warmup)
    medians = {n: statistics.median(s) for n, s in samples.items()}
    unit = medians["train_step"]
    table = []
    for name, row in rows.items():
        entry = {
            "method": name,
            "library": row.library,
            "median_s": medians[name],
            "x_train_step": medians[name] / unit,
            "baseline": row.baseline,
            "vs_baseline": medians[name] / medians[row.baseline] if row.baseline else None,
            "vs_baseline_paired": (
                paired_ratio(samples[name], samples[row.baseline]) if row.baseline else None
            ),
            "peak_mib": mem.get(name, {}).get("peak_increase_mib"),
            "note": row.note,
            "samples_s": samples[name],
        }
        table.append(entry)
    n_hparams = sum(v.numel() for v in prob.hparams.values())
    return {
        "setup": {
            "model": "MLP 64-256-256-10, tanh, float32, full batch",
            "data": "load_digits / 16, seed-0 permutation, 1200 train / 300 val / 297 test",
            "hparams": f"{n_hparams} per-weight log weight decays, all {LOG_WD:.4f} (wd=1e-3)",
            "inner_loss": "CE(train) + 0.5 * sum(exp(log_wd) * w**2)",
            "outer_loss": "CE(val)",
            "inner_weights": f"{INNER_TRAIN_STEPS} SGD steps at lr {INNER_LR}, seed-0 init",
            "neumann_alpha": NEUMANN_ALPHA,
        },
        "agreement_rel_diff": checks,
        "rows": table,
        "memory_probes": mem,
        "implicit_cg10_vs_plain_recompute": medians["implicit_cg10"]
        / medians["plain_cg10_recompute"],
    }


# ======================================================================================
# Problem B: convex twin with an exact answer
# ======================================================================================


def make_problem_b():
    (x_tr, y_tr), (x_val, y_val), _ = digits_split((1000, 400), torch.float64)

    def inner_loss(p, h):
        reg = 0.5 * torch.sum(torch.exp(h["log_l2"]) * p["W"] ** 2) + 0.5e-4 * p["b"].pow(2).sum()
        return F.cross_entropy(x_tr @ p["W"] + p["b"], y_tr) + reg

    def outer_loss(p, h):
        return F.cross_entropy(x_val @ p["W"] + p["b"], y_val)

    hparams = {"log_l2": torch.full((64, 10), LOG_L2_B, dtype=torch.float64)}
    return inner_loss, outer_loss, hparams


def newton_solve(inner_loss, hparams, max_iter: int = 50):
    """Minimise the inner loss to machine precision (dense Hessian of the 650-vector)."""

    def unflatten(theta):
        return {"W": theta[:640].reshape(64, 10), "b": theta[640:]}

    def f(theta):
        return inner_loss(unflatten(theta), hparams)

    theta = torch.zeros(650, dtype=torch.float64)
    history = []
    for _ in range(max_iter):
        g = func_grad(f)(theta)
        history.append(float(g.norm()))
        if history[-1] < 1e-14:
            break
        step = torch.linalg.solve(jacrev(jacrev(f))(theta), g)
        # Backtracking keeps Newton safe far from the optimum; near it the full step is taken.
        t, f0 = 1.0, f(theta)
        while f(theta - t * step) > f0 - 0.25 * t * torch.dot(g, step) and t > 1e-8:
            t *= 0.5
        theta = theta - t * step
    return {k: v.clone() for k, v in unflatten(theta).items()}, history


def run_problem_b(repeats: int, warmup: int, console: Console) -> dict:
    console.print("[bold]B[/bold]: logistic regression, Newton to machine precision ...")
    inner_loss, outer_loss, hparams = make_problem_b()
    params, grad_norms = newton_solve(inner_loss, hparams)
    args = (inner_loss, outer_loss, params, hparams)
    exact = hg.implicit_hypergrad(*args, solver="exact")

    fns = {"exact": lambda: hg.implicit_hypergrad(*args, solver="exact")}
    for k in B_STEPS:
        fns[f"ours_cg{k}"] = lambda k=k: hg.implicit_hypergrad(
            *args, solver="cg", max_steps=k, tol=0.0
        )
        fns[f"plain_cg{k}"] = lambda k=k: plain_implicit_recompute(*args, steps=k)
    fns["neumann50"] = lambda: hg.implicit_hypergrad(*args, solver="neumann", max_steps=50)
    errors = {name: rel_diff(fn(), exact) for name, fn in fns.items()}

    console.print(f"   timing: {repeats} interleaved repeats ...")
    samples = time_interleaved(fns, repeats, warmup)
    medians = {n: statistics.median(s) for n, s in samples.items()}

    def first_below(prefix):
        for k in B_STEPS:
            if errors[f"{prefix}_cg{k}"] < B_TARGET:
                return k
        return None

    k_ours, k_plain = first_below("ours"), first_below("plain")
    summary = {
        "target_rel_err": B_TARGET,
        "ours_k": k_ours,
        "ours_s": medians[f"ours_cg{k_ours}"] if k_ours else None,
        "plain_k": k_plain,
        "plain_s": medians[f"plain_cg{k_plain}"] if k_plain else None,
    }
    if k_ours and k_plain:
        summary["plain_over_ours"] = summary["plain_s"] / summary["ours_s"]
    per_k = [
        {
            "k": k,
            "ours_s": medians[f"ours_cg{k}"],
            "ours_rel_err": errors[f"ours_cg{k}"],
            "plain_s": medians[f"plain_cg{k}"],
            "plain_rel_err": errors[f"plain_cg{k}"],
        }
        for k in B_STEPS
    ]
    return {
        "setup": {
            "model": "multinomial logistic regression 64->10, float64",
            "data": "load_digits / 16, seed-0 permutation, 1000 train / 400 val",
            "inner_loss": "CE(train) + 0.5*sum(exp(log_l2)*W**2) + 0.5e-4*||b||^2",
            "log_l2": LOG_L2_B,
            "newton_grad_norms": grad_norms,
        },
        "exact_s": medians["exact"],
        "per_k": per_k,
        "summary": summary,
        "neumann50": {
            "s": medians["neumann50"],
            "rel_err": errors["neumann50"],
            "alpha": "default (1/lambda_max by 20 power steps, timed)",
        },
        "samples_s": samples,
    }


# ======================================================================================
# Reporting
# ======================================================================================


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _opt(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_report(result: dict) -> str:
    m, a, b = result["machine"], result["problem_a"], result["problem_b"]
    load = m["load_average_at_start"][0] if m["load_average_at_start"] else None
    lines = [
        "### Hypergradient cost (`benchmarks/hypergrad_cost.py`)",
        "",
        f"{m['date']}; {m['cpu_model'] or m['processor']}, {m['cpu_count']} CPUs, "
        f"{m['platform']}; torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}. Median of {m['repeats']} interleaved repeats; 1-minute load "
        f"average at the start {_opt(load, '.2f')}.",
        "",
        f"**A.** {a['setup']['model']}; {a['setup']['hparams']}; "
        f"weights after {a['setup']['inner_weights']}.",
        "",
        "| method | median | × train step | library / baseline | paired | peak memory (MiB) "
        "| note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in a["rows"]:
        name = f"`{r['method']}`" if r["library"] else r["method"]
        lines.append(
            f"| {name} | {_ms(r['median_s'])} | {r['x_train_step']:.1f} | "
            f"{_opt(r['vs_baseline'], '.2f')} | {_opt(r['vs_baseline_paired'], '.2f')} | "
            f"{_opt(r['peak_mib'], '.1f')} | {r['note']} |"
        )
    lines += [
        "",
        f"`implicit_cg10` / `plain_cg10_recompute` = "
        f"{a['implicit_cg10_vs_plain_recompute']:.2f} (graph reuse vs recomputed HVPs). "
        f"Library rows in `code`; baselines are hand-written `torch.autograd` (double "
        f"backward, one retained gradient graph). library / baseline is the ratio of the "
        f"medians; *paired* is the median of the per-repeat ratios (the two calls run back "
        f"to back), less sensitive to a drifting machine. Every library result agrees with "
        f"its baseline to a relative difference < {RTOL_AGREE:g} (checked before timing). "
        f"Peak memory: one fresh subprocess per method, peak RSS during its first call minus "
        f"the RSS right before it.",
        "",
        f"**B.** {b['setup']['model']}, log_l2 = {b['setup']['log_l2']:g} per weight; inner "
        f"problem solved by Newton (final gradient norm "
        f'{b["setup"]["newton_grad_norms"][-1]:.1e}); reference = `solver="exact"` '
        f"({_ms(b['exact_s'])}).",
        "",
        "| CG steps k | ours (graph reuse) | rel. error | plain (recomputed HVP) | rel. error |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in b["per_k"]:
        lines.append(
            f"| {r['k']} | {_ms(r['ours_s'])} | {r['ours_rel_err']:.1e} | "
            f"{_ms(r['plain_s'])} | {r['plain_rel_err']:.1e} |"
        )
    s = b["summary"]
    lines.append("")
    if s.get("plain_over_ours"):
        lines.append(
            f"Relative error < {s['target_rel_err']:g}: ours needs k = {s['ours_k']} "
            f"({_ms(s['ours_s'])}), plain recompute k = {s['plain_k']} ({_ms(s['plain_s'])}): "
            f"**{s['plain_over_ours']:.2f}x** the time. "
        )
    else:
        lines.append(f"Relative error < {s['target_rel_err']:g} not reached: {s}. ")
    n = b["neumann50"]
    lines[-1] += f"Neumann, 50 terms, default alpha: {_ms(n['s'])}, rel. error {n['rel_err']:.1e}."
    return "\n".join(lines) + "\n"


def print_rich(result: dict, console: Console) -> None:
    a, b = result["problem_a"], result["problem_b"]
    t = Table(title="A. MLP 64-256-256-10 (tanh), 85k per-weight hparams, float32")
    cols = ("method", "median", "x train step", "lib / baseline", "paired", "peak MiB", "note")
    for col in cols:
        t.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in a["rows"]:
        ratio = r["vs_baseline"]
        ratio_txt = _opt(ratio, ".2f")
        if ratio is not None and ratio > 1.1:
            ratio_txt = f"[red]{ratio_txt}[/red]"
        t.add_row(
            r["method"] if r["library"] else f"[dim]{r['method']}[/dim]",
            _ms(r["median_s"]),
            f"{r['x_train_step']:.1f}",
            ratio_txt,
            _opt(r["vs_baseline_paired"], ".2f"),
            _opt(r["peak_mib"], ".1f"),
            r["note"],
        )
    console.print(t)
    t = Table(title="B. logistic regression, float64: CG-k vs exact")
    for col in ("k", "ours", "ours rel. err", "plain recompute", "plain rel. err"):
        t.add_column(col, justify="right")
    for r in b["per_k"]:
        t.add_row(
            str(r["k"]),
            _ms(r["ours_s"]),
            f"{r['ours_rel_err']:.1e}",
            _ms(r["plain_s"]),
            f"{r['plain_rel_err']:.1e}",
        )
    console.print(t)
    console.print(markdown_report(result).splitlines()[-1])


# ======================================================================================
# Entry point
# ======================================================================================


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 11)")
    parser.add_argument(
        "--quick", action="store_true", help="3 repeats, 2 memory probes: a smoke test"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    parser.add_argument("--memory-probe", metavar="METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.weights)))
        return 0
    repeats = args.repeats or (3 if args.quick else 11)
    warmup = 1 if args.quick else 2
    console = Console(width=max(Console().width, 150))  # wide tables even in a pipe
    started = time.perf_counter()
    result = {"machine": machine_info(repeats=repeats)}
    memory = "none" if args.skip_memory else ("some" if args.quick else "all")
    result["problem_a"] = run_problem_a(repeats, warmup, memory, console)
    result["problem_b"] = run_problem_b(repeats, warmup, console)
    result["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hypergrad_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "hypergrad_cost.md").write_text(markdown_report(result))
    print_rich(result, console)
    console.print(f"wrote {args.out}/hypergrad_cost.{{json,md}} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
