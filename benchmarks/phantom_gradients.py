"""Phantom gradients for equilibrium models (Geng et al., NeurIPS 2021) on scikit-learn digits.

The model is a small deep-equilibrium classifier: z* = tanh(W z* + U x + b) (hidden 64,
initial ||W||_2 = 0.9, clipped to <= 0.95 after every optimizer step so the map stays a
contraction), then a linear head.  Three questions:

A. How well does the phantom gradient point?  Cosine similarity with the exact implicit
   gradient for k = 1, 2, 5, 10, 20 phantom steps and damping lambda in {0.5, 0.8, 1.0}
   (float64, 256 training images, the forward solved to 1e-12, the exact gradient by GMRES
   to 1e-12), at initialisation and after training; over the parameters of f (W, U, b) and
   over all parameters (the head's gradient is the same for every method).
B. What does the backward cost?  The gradient part of a training step (the applications
   of f with graph, the loss, ``backward()``) for every backward method, timed side by side
   in one process (interleaved repeats, medians), float32, on the trained model.
C. Does training with phantom gradients reach the accuracy of exact gradients?  Adam, a few
   epochs of mini-batches, several seeds; test accuracy of each method.

Run from the repository root (one torch thread; small ops are fastest that way)::

    python benchmarks/phantom_gradients.py            # ~3-4 minutes on a loaded 2-core box
    python benchmarks/phantom_gradients.py --quick    # < 1 minute smoke run

Writes ``<out>/phantom_gradients.{json,md,png}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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
from hypergradient.deq import (
    Anderson,
    EquilibriumLayer,
    ImplicitBackward,
    NeumannPhantomBackward,
    PhantomBackward,
)

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"

HIDDEN = 64
INIT_NORM = 0.9  # ||W||_2 at initialisation
CLIP_NORM = 0.95  # ||W||_2 <= this after every optimizer step
KS = (1, 2, 5, 10, 20)
DAMPINGS = (0.5, 0.8, 1.0)
PAPER_K, PAPER_DAMPING = 5, 0.5  # official MDEQ config: PG_STEPS 5, TAU 0.5
N_TRAIN, N_VAL = 1000, 300  # test = the remaining 497 digits
BATCH = 64
LR = 5e-3
COS_BATCH = 256


def methods() -> dict[str, hg.deq.AbstractEquilibriumBackward]:
    """The backward methods compared in B and C (float32 tolerances)."""
    return {
        "exact (GMRES)": ImplicitBackward(hg.linalg.GMRES(max_steps=200, restart=40, tol=1e-5)),
        f"phantom UPG k={PAPER_K} lam={PAPER_DAMPING}": PhantomBackward(PAPER_K, PAPER_DAMPING),
        f"phantom NPG k={PAPER_K} lam={PAPER_DAMPING}": NeumannPhantomBackward(
            PAPER_K, PAPER_DAMPING
        ),
        "Jacobian-free k=1 lam=1": PhantomBackward(1, 1.0),
    }


# ======================================================================================
# Model
# ======================================================================================


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x + b); ||df/dz|| <= ||W||_2 since |tanh'| <= 1."""

    def __init__(self, hidden: int, inputs: int, generator: torch.Generator):
        super().__init__()
        w = torch.randn(hidden, hidden, generator=generator)
        self.W = nn.Parameter(INIT_NORM * w / torch.linalg.matrix_norm(w, 2))
        self.U = nn.Parameter(torch.randn(hidden, inputs, generator=generator) / inputs**0.5)
        self.b = nn.Parameter(torch.zeros(hidden))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)

    @torch.no_grad()
    def clip(self, max_norm: float = CLIP_NORM) -> None:
        self.W.mul_((max_norm / torch.linalg.matrix_norm(self.W, 2)).clamp(max=1.0))


class DEQClassifier(nn.Module):
    def __init__(self, seed: int, backward, solver: Anderson):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.f = TanhCell(HIDDEN, 64, g)
        self.head = nn.Linear(HIDDEN, 10)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(10, HIDDEN, generator=g) / HIDDEN**0.5)
            self.head.bias.zero_()
        self.deq = EquilibriumLayer(self.f, solver, backward, state_shape=(HIDDEN,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(x))


# ======================================================================================
# A. Cosine similarity with the exact gradient
# ======================================================================================


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def jacobian_spectrum(f: TanhCell, z: torch.Tensor) -> dict:
    """Spectral radius and norm of J_i = diag(1 - z_i^2) W at each sample's fixed point."""
    jac = (1 - z**2)[:, :, None] * f.W.detach()[None]
    radius = torch.linalg.eigvals(jac).abs().amax(dim=1)
    norm = torch.linalg.matrix_norm(jac, 2)
    return {
        "spectral_radius_mean": float(radius.mean()),
        "spectral_radius_max": float(radius.max()),
        "norm_max": float(norm.max()),
        "W_norm": float(torch.linalg.matrix_norm(f.W.detach(), 2)),
    }


def cosine_table(model: DEQClassifier, x: torch.Tensor, y: torch.Tensor) -> dict:
    """cos(phantom, exact) over k and lambda, for f's parameters and for all parameters."""
    model = copy.deepcopy(model).double()
    x = x.double()
    f_params = list(model.f.parameters())
    all_params = f_params + list(model.head.parameters())
    solver = Anderson(tol=1e-12, max_steps=300)

    def grads(backward) -> tuple[torch.Tensor, torch.Tensor]:
        layer = EquilibriumLayer(model.f, solver, backward, state_shape=(HIDDEN,))
        out = layer(x)
        loss = F.cross_entropy(model.head(out), y)
        g = torch.autograd.grad(loss, all_params)
        return _flat(g[: len(f_params)]), _flat(g)

    exact_f, exact_all = grads(ImplicitBackward(hg.linalg.GMRES(tol=1e-12, max_steps=500)))
    with torch.no_grad():
        z = EquilibriumLayer(model.f, solver, "exact", state_shape=(HIDDEN,))(x)
    table: dict = {"jacobian": jacobian_spectrum(model.f, z), "upg": {}, "npg": {}}
    for kind, cls in (("upg", PhantomBackward), ("npg", NeumannPhantomBackward)):
        for lam in DAMPINGS:
            rows = {"f_params": [], "all_params": [], "norm_ratio": []}
            for k in KS:
                g_f, g_all = grads(cls(k, lam))
                rows["f_params"].append(_cos(g_f, exact_f))
                rows["all_params"].append(_cos(g_all, exact_all))
                rows["norm_ratio"].append(float(g_f.norm() / exact_f.norm()))
            table[kind][str(lam)] = rows
    return table


# ======================================================================================
# C. Training
# ======================================================================================


@dataclass
class TrainResult:
    method: str
    seed: int
    test_acc: float
    val_acc: float
    test_acc_per_epoch: list[float]
    seconds: float
    backward_seconds: float
    forward_steps_mean: float
    forward_not_converged: int
    backward_warnings: int


def accuracy(model: DEQClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ConvergenceWarning)
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(name: str, backward, seed: int, data, epochs: int) -> tuple[TrainResult, DEQClassifier]:
    torch.manual_seed(seed)
    solver = Anderson(tol=1e-5, max_steps=50)
    model = DEQClassifier(seed, backward, solver)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(1000 + seed)
    n = data.x_train.shape[0]
    per_epoch, steps_used, not_converged, bwd_warn = [], [], 0, 0
    backward_time = 0.0
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, BATCH):
            idx = order[i : i + BATCH]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", hg.ConvergenceWarning)
                opt.zero_grad()
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                t0 = time.perf_counter()
                loss.backward()
                backward_time += time.perf_counter() - t0
            stats = model.deq.forward_stats
            steps_used.append(stats.num_steps)
            not_converged += int(not stats.converged)
            bwd_warn += sum("backward linear solve" in str(w.message) for w in caught)
            opt.step()
            model.f.clip()
        per_epoch.append(accuracy(model, data.x_test, data.y_test))
    seconds = time.perf_counter() - start
    result = TrainResult(
        method=name,
        seed=seed,
        test_acc=per_epoch[-1],
        val_acc=accuracy(model, data.x_val, data.y_val),
        test_acc_per_epoch=per_epoch,
        seconds=seconds,
        backward_seconds=backward_time,
        forward_steps_mean=statistics.fmean(steps_used),
        forward_not_converged=not_converged,
        backward_warnings=bwd_warn,
    )
    return result, model


def run_training(seeds: list[int], epochs: int, data, console) -> tuple[list[dict], dict]:
    results, trained = [], {}
    for seed in seeds:
        for name, backward in methods().items():
            result, model = train(name, backward, seed, data, epochs)
            results.append(result.__dict__)
            if seed == seeds[0]:
                trained[name] = model
            console(
                f"  seed {seed} {name:32s} test acc {result.test_acc:.4f} "
                f"({result.seconds:.1f} s, backward {result.backward_seconds:.1f} s, "
                f"forward {result.forward_steps_mean:.1f} Anderson steps)"
            )
    return results, trained


def summarize_training(results: list[dict]) -> dict:
    by_method: dict[str, list[dict]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    exact = {r["seed"]: r["test_acc"] for r in by_method["exact (GMRES)"]}
    summary = {}
    for name, rows in by_method.items():
        accs = [r["test_acc"] for r in rows]
        diffs = [r["test_acc"] - exact[r["seed"]] for r in rows]
        summary[name] = {
            "seeds": [r["seed"] for r in rows],
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "val_acc_mean": statistics.fmean(r["val_acc"] for r in rows),
            "diff_vs_exact_mean_points": 100 * statistics.fmean(diffs),
            "diff_vs_exact_min_points": 100 * min(diffs),
            # the target: phantom training reaches the exact-gradient accuracy within 1 point
            "within_1_point": 100 * statistics.fmean(diffs) >= -1.0,
            "seconds_mean": statistics.fmean(r["seconds"] for r in rows),
            "backward_seconds_mean": statistics.fmean(r["backward_seconds"] for r in rows),
            "forward_steps_mean": statistics.fmean(r["forward_steps_mean"] for r in rows),
            "forward_not_converged": sum(r["forward_not_converged"] for r in rows),
            "backward_warnings": sum(r["backward_warnings"] for r in rows),
            "test_acc_per_epoch_mean": [
                statistics.fmean(col) for col in zip(*(r["test_acc_per_epoch"] for r in rows))
            ],
        }
    return summary


# ======================================================================================
# B. Backward time, side by side
# ======================================================================================


def time_interleaved(fns: dict[str, Callable], repeats: int, warmup: int) -> dict[str, list]:
    """Seconds per call of every function; repeats interleaved, order rotating."""
    names = list(fns)
    # Objects alive now (torch, sklearn, the trained models) go to a permanent generation,
    # so the collection before each call below is fast (a full one takes ~0.5 s here).
    gc.collect()
    gc.freeze()
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        for name in order[::-1] if r % 2 else order:
            gc.collect()
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    gc.unfreeze()
    return samples


def backward_timing(model: DEQClassifier, data, batch: int, repeats: int) -> dict:
    """Time the gradient part of a step for every method on one fixed batch and fixed z*."""
    x, y = data.x_train[:batch], data.y_train[:batch]
    forward_solver = Anderson(tol=1e-5, max_steps=50)
    layer = EquilibriumLayer(model.f, forward_solver, "exact", state_shape=(HIDDEN,))
    with torch.no_grad():
        z_star = layer(x)
    forward_stats = layer.forward_stats
    params = list(model.parameters())
    record: dict = {}

    def gradient_part(backward) -> Callable[[], None]:
        def run() -> None:
            out = backward.attach(model.f, z_star, x, lambda s: record.__setitem__("s", s))
            loss = F.cross_entropy(model.head(out), y)
            torch.autograd.grad(loss, params)

        return run

    def forward_solve() -> None:
        with torch.no_grad():
            layer(x)

    fns = {name: gradient_part(b) for name, b in methods().items()}
    fns["forward solve (Anderson, no graph)"] = forward_solve
    # backward statistics of the exact solve at this point (GMRES iterations = VJPs)
    gradient_part(methods()["exact (GMRES)"])()
    exact_stats = record["s"]
    samples = time_interleaved(fns, repeats, warmup=2)
    exact_median = statistics.median(samples["exact (GMRES)"])
    rows = {}
    for name, s in samples.items():
        median = statistics.median(s)
        paired = statistics.median(
            a / b for a, b in zip(s, samples["exact (GMRES)"])
        )  # per-repeat ratio: robust to a machine whose speed drifts
        rows[name] = {
            "median_s": median,
            "ratio_to_exact": median / exact_median,
            "paired_ratio_to_exact": paired,
            "speedup_vs_exact": exact_median / median,
        }
    return {
        "batch": batch,
        "rows": rows,
        "forward_steps": forward_stats.num_steps,
        "exact_gmres_steps": exact_stats.num_steps,
        "exact_vjps": exact_stats.num_matvecs,
        "exact_residual": exact_stats.residual_norm,
    }


# ======================================================================================
# Report
# ======================================================================================


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown_report(result: dict) -> str:
    m = result["machine"]
    load = m["load_average_at_start"][0] if m["load_average_at_start"] else None
    cfg = result["config"]
    lines = [
        "# Phantom gradients (Geng et al. 2021) on a digits DEQ",
        "",
        f"{m['date']}; {m['platform']}, {m['cpu_count']} CPUs; torch {m['torch']} "
        f"({m['torch_threads']} thread), Python {m['python']}; 1-minute load average at "
        f"the start {load:.2f}. Command: `{result['command']}` ({result['wall_s']:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result["section_s"].items())
        + ").",
        "",
        f"Model: z* = tanh(W z* + U x + b), hidden {HIDDEN}, linear head; ||W||_2 = "
        f"{INIT_NORM} at init, clipped to <= {CLIP_NORM} after each step; forward: Anderson "
        f"(m=5), tol 1e-5 (float32) / 1e-12 (float64).",
        "",
        "## A. cos(phantom gradient, exact implicit gradient)",
        "",
        f"Float64, {COS_BATCH} training digits, cross-entropy; exact = GMRES to 1e-12. "
        "*f params* = W, U, b (what the phantom changes); *all params* adds the head, whose "
        "gradient is the same for every method. Rows: UPG (unrolled phantom); NPG (Neumann "
        "phantom) coincides with UPG to 4 digits here because the unroll starts at an exact "
        "fixed point and stays there, so both use the Jacobian at z*.",
        "",
    ]
    for state, table in result["cosine"].items():
        j = table["jacobian"]
        lines += [
            f"**{state}** (||W||_2 = {j['W_norm']:.3f}; Jacobian at z*: spectral radius "
            f"mean {j['spectral_radius_mean']:.3f}, max {j['spectral_radius_max']:.3f}; "
            f"max ||J||_2 = {j['norm_max']:.3f})",
            "",
            "| method | lambda | params | " + " | ".join(f"k={k}" for k in KS) + " |",
            "|---|---:|---|" + "---:|" * len(KS),
        ]
        for kind in ("upg", "npg"):
            for lam in DAMPINGS:
                if kind == "npg" and lam != PAPER_DAMPING:
                    continue
                rows = table[kind][str(lam)]
                for which in ("f_params", "all_params"):
                    cells = " | ".join(f"{c:.4f}" for c in rows[which])
                    lines.append(
                        f"| {kind.upper()} | {lam} | {which.replace('_', ' ')} | {cells} |"
                    )
        ratio = table["upg"][str(PAPER_DAMPING)]["norm_ratio"]
        lines += [
            "",
            f"||phantom|| / ||exact|| on f params, UPG lambda={PAPER_DAMPING}: "
            + ", ".join(f"k={k}: {r:.3f}" for k, r in zip(KS, ratio)),
            "",
        ]
    t = result["timing"]
    lines += [
        "## B. Backward time (the gradient part of a step), side by side",
        "",
        f"Float32, the model trained with exact gradients (seed {cfg['seeds'][0]}), one "
        "fixed batch and a fixed z*; each call = the backward method's applications of f "
        "with graph + head + loss + `torch.autograd.grad` for all parameters. Median of "
        f"{m['repeats']} interleaved repeats.",
        "",
    ]
    for timing in t:
        lines += [
            f"Batch {timing['batch']}: forward solve {timing['forward_steps']} Anderson steps; "
            f"exact backward: {timing['exact_gmres_steps']} GMRES steps "
            f"({timing['exact_vjps']} VJPs), residual {timing['exact_residual']:.1e}.",
            "",
            "| method | median | / exact | paired / exact | speed-up vs exact |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in timing["rows"].items():
            lines.append(
                f"| {name} | {_ms(row['median_s'])} | {row['ratio_to_exact']:.2f} | "
                f"{row['paired_ratio_to_exact']:.2f} | {row['speedup_vs_exact']:.2f}x |"
            )
        lines.append("")
    s = result["training"]["summary"]
    exact = s["exact (GMRES)"]
    lines += verdicts(result)
    lines += [
        "## C. Training: test accuracy, phantom vs exact",
        "",
        f"Float32; digits split {N_TRAIN}/{N_VAL}/rest (test = 497); Adam lr {LR}, batch "
        f"{BATCH}, {cfg['epochs']} epochs; seeds {cfg['seeds']} (the seed sets the "
        "initialisation and the batch order; every method sees the same ones).",
        "",
        "| method | test acc (mean ± sd) | - exact (points, mean) | worst seed | >= exact - 1 "
        "point | val acc | train time | backward time | forward steps | not converged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in s.items():
        lines.append(
            f"| {name} | {row['test_acc_mean']:.4f} ± {row['test_acc_std']:.4f} | "
            f"{row['diff_vs_exact_mean_points']:+.2f} | {row['diff_vs_exact_min_points']:+.2f} | "
            f"{'yes' if row['within_1_point'] else 'NO'} | {row['val_acc_mean']:.4f} | "
            f"{row['seconds_mean']:.1f} s | {row['backward_seconds_mean']:.2f} s | "
            f"{row['forward_steps_mean']:.1f} | {row['forward_not_converged']} |"
        )
    lines += [
        "",
        f"*backward time* = the `loss.backward()` calls only (for UPG the k applications of f "
        f"with graph happen in the forward pass and are not in it; section B includes them). "
        f"Exact backward: {exact['backward_warnings']} GMRES solves stopped at max_steps. "
        "*not converged* = forward solves that stopped at max_steps (of all steps, all seeds).",
        "",
    ]
    return "\n".join(lines)


def verdicts(result: dict) -> list[str]:
    """The brief's targets, each with the measured numbers."""
    lines = ["## Targets", ""]
    for state, table in result["cosine"].items():
        k1_f = {lam: table["upg"][str(lam)]["f_params"][0] for lam in DAMPINGS}
        k1_all = {lam: table["upg"][str(lam)]["all_params"][0] for lam in DAMPINGS}
        ok_all = [lam for lam, c in k1_all.items() if c >= 0.9]
        last = min(table["upg"][str(lam)]["f_params"][-1] for lam in DAMPINGS)
        monotone = all(
            b >= a - 0.01
            for lam in DAMPINGS
            for which in ("f_params", "all_params")
            for a, b in zip(table["upg"][str(lam)][which], table["upg"][str(lam)][which][1:])
        )
        lines.append(
            f"* cos >= 0.9 at k=1, {state}: f params {k1_f[DAMPINGS[0]]:.4f} for every lambda "
            f"({'yes' if min(k1_f.values()) >= 0.9 else 'NO'}; at k=1 the phantom gradient "
            f"is lambda (df/dtheta)^T g, so its direction does not depend on lambda); all "
            f"params "
            + ", ".join(f"lambda={lam}: {c:.4f}" for lam, c in k1_all.items())
            + f" (>= 0.9 for lambda in {ok_all}: the head's exact gradient is mixed with a "
            f"phantom part shrunk by lambda). -> 1 as k grows: min over lambda at k=20 "
            f"{last:.4f}; cos(k+1) >= cos(k) - 0.01 everywhere: "
            f"{'yes' if monotone else 'NO'}."
        )
    for timing in result["timing"]:
        rows = timing["rows"]
        upg = rows[f"phantom UPG k={PAPER_K} lam={PAPER_DAMPING}"]
        npg = rows[f"phantom NPG k={PAPER_K} lam={PAPER_DAMPING}"]
        lines.append(
            f"* backward time, batch {timing['batch']}: exact "
            f"{_ms(rows['exact (GMRES)']['median_s'])}, UPG k={PAPER_K} "
            f"{_ms(upg['median_s'])} ({upg['speedup_vs_exact']:.1f}x faster), NPG "
            f"{_ms(npg['median_s'])} ({npg['speedup_vs_exact']:.1f}x)."
        )
    summary = result["training"]["summary"]
    exact = summary["exact (GMRES)"]
    for name, row in summary.items():
        if name == "exact (GMRES)":
            continue
        lines.append(
            f"* accuracy parity, {name}: {row['test_acc_mean']:.4f} vs exact "
            f"{exact['test_acc_mean']:.4f} ({row['diff_vs_exact_mean_points']:+.2f} points, "
            f"worst seed {row['diff_vs_exact_min_points']:+.2f}): "
            f"{'yes' if row['within_1_point'] else 'NO'} (target: no more than 1 point below)."
        )
    return [*lines, ""]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for state, style in zip(result["cosine"], ("--", "-")):
        for i, lam in enumerate(DAMPINGS):
            ax.plot(
                KS,
                result["cosine"][state]["upg"][str(lam)]["f_params"],
                style,
                color=f"C{i}",
                marker="o",
                label=f"{state}, lambda={lam}",
            )
    ax.axhline(0.9, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(KS, [str(k) for k in KS])
    ax.set_xlabel("phantom steps k")
    ax.set_ylabel("cos(UPG, exact), f params")
    ax.set_title("A. phantom vs exact gradient")
    ax.legend(fontsize=7)
    ax = axes[1]
    for name, row in result["training"]["summary"].items():
        curve = row["test_acc_per_epoch_mean"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title("C. training on digits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ======================================================================================
# Entry point
# ======================================================================================


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, 5 repeats")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds (default 5)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 10)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 31)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds or (1 if args.quick else 5)))
    epochs = args.epochs or (3 if args.quick else 10)
    repeats = args.repeats or (5 if args.quick else 31)
    started = time.perf_counter()
    result: dict = {
        "machine": machine_info(repeats=repeats),
        "command": "python benchmarks/phantom_gradients.py" + (" --quick" if args.quick else ""),
        "config": {"seeds": seeds, "epochs": epochs, "hidden": HIDDEN, "ks": list(KS)},
    }
    data = hg.data.load_digits_split(N_TRAIN, N_VAL, seed=0, dtype=torch.float32)
    section_s: dict[str, float] = {}
    print(f"C. training {len(methods())} methods x {len(seeds)} seed(s) x {epochs} epochs")
    t0 = time.perf_counter()
    runs, trained = run_training(seeds, epochs, data, print)
    result["training"] = {"runs": runs, "summary": summarize_training(runs)}
    section_s["training"] = time.perf_counter() - t0

    print("A. cosine similarity with the exact gradient")
    t0 = time.perf_counter()
    xc, yc = data.x_train[:COS_BATCH], data.y_train[:COS_BATCH]
    init_model = DEQClassifier(seeds[0], "exact", Anderson())
    result["cosine"] = {
        "at init": cosine_table(init_model, xc, yc),
        "after training (exact)": cosine_table(trained["exact (GMRES)"], xc, yc),
    }
    for state, table in result["cosine"].items():
        row = table["upg"][str(PAPER_DAMPING)]["f_params"]
        print(f"  {state}: UPG lam={PAPER_DAMPING} " + " ".join(f"{c:.4f}" for c in row))

    section_s["cosine"] = time.perf_counter() - t0
    print("B. backward timing")
    t0 = time.perf_counter()
    model = trained["exact (GMRES)"]
    result["timing"] = [backward_timing(model, data, batch, repeats) for batch in (BATCH, N_TRAIN)]
    section_s["timing"] = time.perf_counter() - t0
    result["section_s"] = section_s
    result["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "phantom_gradients.json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown_report(result)
    (args.out / "phantom_gradients.md").write_text(report)
    plot(result, args.out / "phantom_gradients.png")
    print(report)
    print(f"wrote {args.out}/phantom_gradients.{{json,md,png}} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
