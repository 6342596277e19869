"""Bias and variance of the meta-gradient estimators on toy unrolled problems with exact answers.

Three experiments, all in float64 on the CPU, every particle vmapped (``vectorize=True``):

A. **Truncation bias.**  ``AffineRecurrence``: x_{t+1} = 0.9 x_t + theta + noise, loss
   (x_{t+1} - 1)^2 / 2, T = 20 steps per episode, truncations of K = 5, theta = 0.  The
   meta-objective is quadratic, so every Gaussian smoothing has the exact gradient -6.047 as
   its gradient.  Each estimator produces many independent per-episode estimates (one per
   particle or antithetic pair, averaged over the episode's truncations); we report their
   mean, the bias against the exact gradient in standard errors, and the variance of one
   estimate built from S = 8 particles (or pairs).
B. **Which objective.**  ``PowerRecurrence``: x_{t+1} = a x_t, loss x^2/2, a = 0.9,
   sigma = 0.2, T = 8.  Not quadratic: ES converges to the gradient of the objective smoothed
   with one perturbation per episode, PES (K = 2) to the one smoothed with one perturbation
   per truncation, neither to the plain gradient.  All three are closed forms.
C. **Back-propagation vs ES (Metz et al. 2019).**  ``LogisticMap`` with rate r = 2.8
   (stable) and 3.8 (chaotic), T = 5..40, sigma = 0.05, S = 16 pairs: the empirical variance
   of the back-propagated (reparameterisation) estimate, of antithetic ES and of their
   inverse-variance mix, over independent repetitions.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/estimator_bias_variance.py      # about 1 minute
    OMP_NUM_THREADS=1 python benchmarks/estimator_bias_variance.py --quick

Writes ``<out>/estimator_bias_variance.{json,md,png}`` (``--out``, default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import hypergradient.estimators as E
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient.estimators as E

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
S = 8  # particles (or antithetic pairs) per estimate in experiment A's variance column


def _z(samples: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float, float]:
    """mean, SE, (mean - exact)/SE and the per-sample variance of i.i.d. samples (S, 1)."""
    samples = samples.reshape(samples.shape[0], -1)[:, 0]
    mean, var = float(samples.mean()), float(samples.var())
    se = math.sqrt(var / samples.shape[0])
    return mean, se, (mean - float(exact)) / se, var


def episode_samples(estimator, theta, windows: int, seed: int, key=None) -> torch.Tensor:
    """One estimate per particle (or pair), averaged over ``windows`` truncations."""
    gen = torch.Generator().manual_seed(seed)
    state = estimator.init(theta, gen)
    total = None
    for _ in range(windows):
        out, state = estimator.estimate(theta, state, gen)
        samples = out.samples if key is None else out.samples[key]
        total = samples if total is None else total + samples
    return total / windows


def mixed_repeats_with_components(
    estimator, theta, windows: int, repeats: int, seed: int
) -> dict[str, torch.Tensor]:
    """``repeats`` independent mixed estimates and their two components, each averaged over
    ``windows`` truncations: ``{"mixed", "backprop", "es"}``, each of shape (repeats,)."""
    out = {"mixed": [], "backprop": [], "es": []}
    for r in range(repeats):
        gen = torch.Generator().manual_seed(seed + r)
        state = estimator.init(theta, gen)
        total = {key: 0.0 for key in out}
        for _ in range(windows):
            est, state = estimator.estimate(theta, state, gen)
            total["mixed"] = total["mixed"] + est.grad
            total["backprop"] = total["backprop"] + est.extras["backprop"]
            total["es"] = total["es"] + est.extras["es"]
        for key in out:
            out[key].append(total[key].reshape(()) / windows)
    return {key: torch.stack(v) for key, v in out.items()}


# ======================================================================================
# A. Truncation bias
# ======================================================================================


def run_bias_variance(n: int, mixed_repeats: int) -> dict:
    horizon, k, sigma = 20, 5, 0.1
    system = E.AffineRecurrence(horizon=horizon, a=0.9, noise_scale=0.5)
    theta = torch.zeros(1)
    exact = system.gradient(theta)
    truncated = system.truncated_backprop_gradient(theta, k)
    windows = horizon // k
    rows = []
    cases = [
        ("FullBackprop", "grad L", E.FullBackprop(system, n, vectorize=True), 1, S * horizon),
        (
            f"TruncatedBackprop(K={k})",
            "grad L",
            E.TruncatedBackprop(system, k, n, vectorize=True),
            windows,
            S * horizon,
        ),
        (
            "AntitheticES (whole episodes)",
            "grad E L(theta+eps)",
            E.AntitheticES(system, sigma, n, vectorize=True),
            1,
            2 * S * horizon,
        ),
        (
            f"AntitheticES(K={k}) (truncated ES)",
            "grad E L(theta+eps)",
            E.AntitheticES(system, sigma, n, truncation_length=k, vectorize=True),
            windows,
            2 * S * horizon,
        ),
        (
            f"PES(K={k})",
            "grad E L(theta+eps_1..4)",
            E.PES(system, sigma, n, truncation_length=k, vectorize=True),
            windows,
            2 * S * horizon,
        ),
    ]
    for name, target, est, w, steps in cases:
        started = time.perf_counter()
        samples = episode_samples(est, theta, w, seed=0)
        mean, se, z, var = _z(samples, exact)
        rows.append(
            {
                "estimator": name,
                "target": target,
                "mean": mean,
                "se": se,
                "bias": mean - float(exact),
                "bias_over_se": z,
                "variance_S8": var / S,
                "system_steps_per_episode_S8": steps,
                "backward_pass": "Backprop" in name,
                "samples": samples.shape[0],
                "wall_s": time.perf_counter() - started,
            }
        )
    for label, length, w in (("whole episodes", None, 1), (f"K={k}", k, windows)):
        started = time.perf_counter()
        est = E.MixedEstimator(system, sigma, S, truncation_length=length, vectorize=True)
        parts = mixed_repeats_with_components(est, theta, w, mixed_repeats, seed=10_000)
        mean, se, z, var = _z(parts["mixed"], exact)
        var_bp, var_es = float(parts["backprop"].var()), float(parts["es"].var())
        rows.append(
            {
                "estimator": f"MixedEstimator ({label})",
                "target": "grad E L(theta+eps)",
                "mean": mean,
                "se": se,
                "bias": mean - float(exact),
                "bias_over_se": z,
                "variance_S8": var,  # already the variance of an S = 8 estimate
                "variance_S8_backprop_component": var_bp,
                "variance_S8_es_component": var_es,
                "mixed_over_min_component": var / min(var_bp, var_es),
                "system_steps_per_episode_S8": 2 * S * horizon,
                "backward_pass": True,
                "samples": mixed_repeats,
                "wall_s": time.perf_counter() - started,
            }
        )
    return {
        "setup": (
            f"AffineRecurrence(horizon={horizon}, a=0.9, noise_scale=0.5), theta = 0, "
            f"sigma = {sigma}, truncations K = {k}"
        ),
        "exact_gradient": float(exact),
        "truncated_backprop_closed_form": float(truncated),
        "rows": rows,
    }


# ======================================================================================
# B. Which smoothed objective
# ======================================================================================


def _z_or_none(mean: float, target: float, se: float) -> float | None:
    """(mean - target) / se; for a deterministic estimator (se = 0): 0 if it hits the
    target to rounding, else None."""
    if se > 1e-12 * max(1.0, abs(mean)):
        return (mean - target) / se
    return 0.0 if abs(mean - target) <= 1e-12 * max(1.0, abs(target)) else None


def run_smoothing(n: int) -> dict:
    horizon, k, sigma = 8, 2, 0.2
    system = E.PowerRecurrence(horizon=horizon)
    theta = {"a": torch.tensor(0.9)}
    targets = {
        "plain gradient": system.smoothed_gradient(theta, 0.0)["a"],
        "one perturbation per episode": system.smoothed_gradient(theta, sigma)["a"],
        f"one perturbation per truncation (K={k})": system.smoothed_gradient(theta, sigma, k)["a"],
    }
    cases = [
        ("FullBackprop", E.FullBackprop(system, n, vectorize=True), 1),
        ("AntitheticES (whole episodes)", E.AntitheticES(system, sigma, n, vectorize=True), 1),
        (
            f"PES(K={k})",
            E.PES(system, sigma, n, truncation_length=k, vectorize=True),
            horizon // k,
        ),
        (
            f"AntitheticES(K={k}) (truncated ES)",
            E.AntitheticES(system, sigma, n, truncation_length=k, vectorize=True),
            horizon // k,
        ),
    ]
    rows = []
    for name, est, w in cases:
        samples = episode_samples(est, theta, w, seed=1, key="a")
        mean = float(samples.mean())
        se = float(samples.std()) / math.sqrt(samples.shape[0])
        rows.append(
            {
                "estimator": name,
                "mean": mean,
                "se": se,
                "z": {label: _z_or_none(mean, float(v), se) for label, v in targets.items()},
            }
        )
    return {
        "setup": f"PowerRecurrence(horizon={horizon}), a = 0.9, sigma = {sigma}",
        "targets": {label: float(v) for label, v in targets.items()},
        "rows": rows,
    }


# ======================================================================================
# C. Back-propagation vs ES, and their mix
# ======================================================================================


def _variance_row(problem: str, horizon: int, estimator, theta, repeats: int) -> dict:
    parts = mixed_repeats_with_components(estimator, theta, 1, repeats, seed=100 * horizon)
    var = {key: float(v.var()) for key, v in parts.items()}
    return {
        "problem": problem,
        "horizon": horizon,
        "pairs": estimator.num_pairs,
        "var_backprop": var["backprop"],
        "var_es": var["es"],
        "var_mixed": var["mixed"],
        "mixed_over_min": var["mixed"] / min(var["backprop"], var["es"]),
        "mean_mixed": float(parts["mixed"].mean()),
        "mean_backprop": float(parts["backprop"].mean()),
        "mean_es": float(parts["es"].mean()),
    }


def run_crossover(horizons: list[int], repeats: int) -> dict:
    sigma, pairs = 0.05, 16
    rows = []
    for rate in (2.8, 3.8):
        theta = E.LogisticMap.theta_for_rate(rate)
        for horizon in horizons:
            est = E.MixedEstimator(E.LogisticMap(horizon), sigma, pairs, vectorize=True)
            rows.append(_variance_row(f"logistic map r={rate}", horizon, est, theta, repeats))
    # A problem where the two components are strongly correlated (both are driven by the
    # same noise draw and perturbation): inverse-variance weights, which assume
    # independence, are no longer optimal.
    affine = E.AffineRecurrence(horizon=20, a=0.9, noise_scale=0.5)
    for n in (8, 16):
        est = E.MixedEstimator(affine, 0.1, n, vectorize=True)
        rows.append(_variance_row("noisy affine recurrence", 20, est, torch.zeros(1), repeats))
    return {
        "setup": (
            f"LogisticMap (r = 4 sigmoid(theta)), sigma = {sigma}; AffineRecurrence(horizon=20, "
            f"a=0.9, noise_scale=0.5), sigma = 0.1; {repeats} independent repetitions per row, "
            f"whole episodes"
        ),
        "rows": rows,
    }


# ======================================================================================
# Reporting
# ======================================================================================


def machine_info() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def _z_cell(z: float | None) -> str:
    if z is None:
        return "off, SE = 0"
    return "exact" if z == 0.0 else f"{z:+.1f}"


def markdown_report(result: dict) -> str:
    m, a, b, c = (result[k] for k in ("machine", "bias_variance", "smoothing", "crossover"))
    lines = [
        "### Meta-gradient estimators: bias and variance (`benchmarks/estimator_bias_variance.py`)",
        "",
        f"{m['date']}; {m['platform']}; torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}; {result['wall_s']:.0f} s. Command: `{result['command']}`.",
        "",
        f"**A. Truncation bias.** {a['setup']}. Exact gradient {a['exact_gradient']:.3f} "
        f"(every smoothing of this quadratic objective has it); truncated back-propagation's "
        f"closed-form limit {a['truncated_backprop_closed_form']:.3f}.",
        "",
        "| estimator | mean | bias | bias / SE | variance (S = 8) | steps per episode (S = 8) "
        "| backward | estimates |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in a["rows"]:
        lines.append(
            f"| {r['estimator']} | {r['mean']:.3f} | {r['bias']:+.3f} | "
            f"{r['bias_over_se']:+.1f} | {r['variance_S8']:.3g} | "
            f"{r['system_steps_per_episode_S8']} | {'yes' if r['backward_pass'] else 'no'} | "
            f"{r['samples']} |"
        )
    for r in a["rows"]:
        if "mixed_over_min_component" in r:
            lines.append(
                f"\n{r['estimator']}: variance of its back-propagation component "
                f"{r['variance_S8_backprop_component']:.3g}, of its ES component "
                f"{r['variance_S8_es_component']:.3g}; mixed / min = "
                f"{r['mixed_over_min_component']:.2f}."
            )
    labels = list(b["targets"])
    lines += [
        "",
        "*bias / SE* = (mean - exact) / standard error of the mean of the independent "
        "per-episode estimates (their number in the last column: one per particle or pair; "
        "for the mixed estimator, one per repetition of S = 8 pairs). |bias / SE| < 4 is "
        "consistent with no bias.",
        "",
        f"**B. Which objective.** {b['setup']}. Exact targets: "
        + "; ".join(f"{label} {v:.3f}" for label, v in b["targets"].items())
        + ". Entries: (mean - target) / SE.",
        "",
        "| estimator | mean ± SE | " + " | ".join(labels) + " |",
        "|---|---:|" + "---:|" * len(labels),
    ]
    for r in b["rows"]:
        cells = " | ".join(_z_cell(r["z"][label]) for label in labels)
        lines.append(f"| {r['estimator']} | {r['mean']:.3f} ± {r['se']:.3f} | {cells} |")
    lines += [
        "",
        f"**C. Back-propagation vs ES, and their mix.** {c['setup']}. Empirical variances of "
        f"the estimate over the repetitions.",
        "",
        "| problem | T | pairs S | var backprop | var ES | var mixed | mixed / min |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in c["rows"]:
        lines.append(
            f"| {r['problem']} | {r['horizon']} | {r['pairs']} | {r['var_backprop']:.3g} | "
            f"{r['var_es']:.3g} | {r['var_mixed']:.3g} | {r['mixed_over_min']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, c = result["bias_variance"], result["crossover"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    names = [r["estimator"] for r in a["rows"]]
    y = range(len(names))
    ax1.barh(y, [r["bias"] for r in a["rows"]], xerr=[4 * r["se"] for r in a["rows"]])
    ax1.axvline(0, color="k", lw=0.8)
    ax1.set_yticks(list(y), names, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("bias vs exact gradient (error bars: ±4 SE)")
    ax1.set_title("A. truncation bias (T=20, K=5)")
    ax2.barh(y, [r["variance_S8"] for r in a["rows"]])
    ax2.set_xscale("log")
    ax2.set_yticks(list(y), [])
    ax2.invert_yaxis()
    ax2.set_xlabel("variance of one estimate (S = 8)")
    ax2.set_title("A. variance")
    for rate, style in ((2.8, "--"), (3.8, "-")):
        rows = [r for r in c["rows"] if r["problem"] == f"logistic map r={rate}"]
        t = [r["horizon"] for r in rows]
        for key, color in (("var_backprop", "C0"), ("var_es", "C1"), ("var_mixed", "C2")):
            ax3.plot(
                t,
                [r[key] for r in rows],
                style,
                color=color,
                marker="o",
                label=f"{key[4:]} (r={rate})",
            )
    ax3.set_yscale("log")
    ax3.set_xlabel("unroll length T")
    ax3.set_ylabel("variance of the estimate")
    ax3.set_title("C. logistic map: backprop vs ES vs mixed")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples: a smoke test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny ops: one thread is fastest on a loaded 2-core machine
    torch.set_default_dtype(torch.float64)
    started = time.perf_counter()
    result = {
        "machine": machine_info(),
        "command": "python benchmarks/estimator_bias_variance.py"
        + (" --quick" if args.quick else ""),
    }
    n, mixed_repeats, repeats = (400, 50, 40) if args.quick else (4000, 400, 200)
    horizons = [5, 10, 20] if args.quick else [5, 10, 20, 40]
    result["bias_variance"] = run_bias_variance(n, mixed_repeats)
    print("A done", f"{time.perf_counter() - started:.0f} s", flush=True)
    result["smoothing"] = run_smoothing(n)
    print("B done", f"{time.perf_counter() - started:.0f} s", flush=True)
    result["crossover"] = run_crossover(horizons, repeats)
    result["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimator_bias_variance.json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown_report(result)
    (args.out / "estimator_bias_variance.md").write_text(report)
    plot(result, args.out / "estimator_bias_variance.png")
    print(report)
    print(f"wrote {args.out}/estimator_bias_variance.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
