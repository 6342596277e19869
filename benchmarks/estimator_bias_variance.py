"""Bias and variance of the meta-gradient estimators on toy unrolled problems with exact answers.

Three experiments, all in float64 on the CPU, every particle vmapped (``vectorize=True``):

A. **Truncation bias.**  ``AffineRecurrence``: x_{t+1} = 0.9 x_t + theta + noise, loss
   (x_{t+1} - 1)^2 / 2, T = 20 steps per episode, truncations of K = 5, theta = 0.  The
   meta-objective is quadratic, so every Gaussian smoothing has the exact gradient -6.047 as
   its gradient.  Each estimator produces many independent per-episode estimates (one per
   particle or antithetic pair, averaged over the episode's truncations); we report their
   mean, the bias against the exact gradient in standard errors, and the variance of one
   estimate built from S = 8 particles (or pairs).  The mixed estimator's rows are one
   estimate of S = 8 pairs each, for both weightings.
B. **Which objective.**  ``PowerRecurrence``: x_{t+1} = a x_t, loss x^2/2, a = 0.9,
   sigma = 0.2, T = 8.  Not quadratic: ES converges to the gradient of the objective smoothed
   with one perturbation per episode, PES (K = 2) to the one smoothed with one perturbation
   per truncation, neither to the plain gradient.  All three are closed forms.
C. **Back-propagation vs ES, and their mix (Metz et al. 2019).**  ``LogisticMap`` with rate
   r = 2.8 (stable) and 3.8 (chaotic), T = 5..40, sigma = 0.05, S = 16 pairs; the noisy
   affine recurrence with S = 8 and 16; ``PowerRecurrence`` (T = 4, sigma = 0.3, known
   smoothed gradient); and correlated Gaussian pairs with a known covariance.  Per row: the
   variance of the back-propagated (reparameterisation) estimate, of antithetic ES, and of
   the mixed estimate, for Metz's weighting and for the cross-fitted covariance weighting
   on its first truncation (no history) and once its moment history has built up (a
   meta-training loop at a fixed theta, after 30 truncations), as ratios to the smaller
   component's variance, with the Monte-Carlo standard error of each ratio.

   The mixed estimates are computed by the estimator's own combination functions
   (``cross_fitted_combine``, ``inverse_variance_combine``) over "chains" of truncations
   whose per-pair samples were drawn in bulk: one ``MixedEstimator.estimate`` call over
   ``chains x truncations x S`` fresh whole episodes (their states built as one batch, which
   is much faster than ``init``'s one-by-one loop), dealt into truncations of S pairs.  Every
   truncation of the estimator is exactly such a combination of S fresh pairs.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/estimator_bias_variance.py      # about 1 minute
    OMP_NUM_THREADS=1 python benchmarks/estimator_bias_variance.py --quick

Writes ``<out>/estimator_bias_variance.{json,md,png}`` (``--out``, default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

try:
    import hypergradient.estimators as E
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient.estimators as E
from _common import machine_info
from hypergradient.estimators import EstimatorState

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
S = 8  # particles (or antithetic pairs) per estimate in experiment A's variance column
WARM = 60  # truncations before the covariance weighting's history counts as built up
DECAY = 0.95  # MixedEstimator's default history decay


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


def mixed_episodes(
    estimator, theta, windows: int, repeats: int, episodes: int, seed: int
) -> dict[str, torch.Tensor]:
    """``repeats`` independent runs of ``episodes`` episodes of ``windows`` truncations each;
    per episode, the mean of its truncations' mixed estimates and components:
    ``{"mixed", "backprop", "es"}``, each of shape (episodes, repeats)."""
    out = {"mixed": [], "backprop": [], "es": []}
    for r in range(repeats):
        gen = torch.Generator().manual_seed(seed + r)
        state = estimator.init(theta, gen)
        run = {key: [] for key in out}
        for _ in range(episodes):
            total = {key: 0.0 for key in out}
            for _ in range(windows):
                est, state = estimator.estimate(theta, state, gen)
                total["mixed"] = total["mixed"] + est.grad
                total["backprop"] = total["backprop"] + est.extras["backprop"]
                total["es"] = total["es"] + est.extras["es"]
            for key in out:
                run[key].append(total[key].reshape(()) / windows)
        for key in out:
            out[key].append(torch.stack(run[key]))
    return {key: torch.stack(v, dim=1) for key, v in out.items()}


# --------------------------------------------------------------------------------------
# Mixed estimator: per-pair samples in bulk, then chains of truncations.


def batched_init(system, n: int, gen: torch.Generator):
    """``n`` fresh episodes of a toy system as one stacked state (what ``init_particles``
    builds one by one with ``vectorize=True``), drawn from the toys' ``init`` distributions."""
    if isinstance(system, E.LogisticMap):
        return {"x": 0.2 + 0.6 * torch.rand(n, generator=gen)}
    if isinstance(system, E.AffineRecurrence):
        noise = torch.randn((n, system.horizon, system.dim), generator=gen)
        return {
            "x": torch.full((n, system.dim), float(system.x_init)),
            "noise": system.noise_scale * noise,
        }
    if isinstance(system, E.PowerRecurrence):
        return torch.full((n,), float(system.x_init))
    raise TypeError(f"no batched init for {type(system).__name__}")


def pair_samples(system, theta, sigma: float, n: int, seed: int):
    """``n`` independent pairs' samples ``(backprop, es)``, each of shape (n,) (scalar theta):
    one whole-episode ``MixedEstimator`` truncation over ``n`` fresh episodes."""
    gen = torch.Generator().manual_seed(seed)
    est = E.MixedEstimator(system, sigma, n, vectorize=True)
    state = EstimatorState("MixedEstimator", batched_init(system, n, gen), 0, 1)
    out, _ = est.estimate(theta, state, gen)
    flat = [out.extras[k] for k in ("backprop_samples", "es_samples")]
    flat = [next(iter(x.values())) if isinstance(x, dict) else x for x in flat]
    return tuple(x.reshape(n) for x in flat)


def gaussian_pairs(var_a: float, var_b: float, rho: float, mean: float, n: int, seed: int):
    """``n`` pairs from a bivariate normal with the given variances and correlation."""
    gen = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn((2, n), generator=gen)
    a = mean + math.sqrt(var_a) * z1
    b = mean + math.sqrt(var_b) * (rho * z1 + math.sqrt(1 - rho**2) * z2)
    return a, b


def chain_estimates(
    a: torch.Tensor, b: torch.Tensor, pairs: int, chains: int, weighting: str, decay=DECAY
) -> dict[str, torch.Tensor]:
    """Run ``chains`` independent meta-training loops at a fixed theta over the samples
    (dealt into truncations of ``pairs`` pairs); every chain is one coordinate of the
    combination functions, so its weights and history are its own.

    Returns ``{"mixed", "backprop", "es"}``, each of shape (truncations, chains).
    """
    calls = a.shape[0] // (pairs * chains)
    a = a[: calls * pairs * chains].reshape(calls, pairs, chains)
    b = b[: calls * pairs * chains].reshape(calls, pairs, chains)
    mixed, moments = [], None
    for k in range(calls):
        if weighting == "metz":
            c, _ = E.inverse_variance_combine(
                a[k].mean(0), a[k].var(0) / pairs, b[k].mean(0), b[k].var(0) / pairs
            )
        else:
            fit = E.cross_fitted_combine(a[k], b[k], moments, decay=decay)
            c, moments = fit.grad, fit.moments
        mixed.append(c)
    return {"mixed": torch.stack(mixed), "backprop": a.mean(1), "es": b.mean(1)}


def variance_ratio(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Var(x) / Var(y) over paired draws and its delta-method standard error: with
    u = x - mean(x), v = y - mean(y), the ratio of mean(u^2) to mean(v^2) has relative
    variance Var(u^2/mean(u^2) - v^2/mean(v^2)) / N (pairing removes the shared noise)."""
    x, y = x.reshape(-1), y.reshape(-1)
    u2, v2 = (x - x.mean()) ** 2, (y - y.mean()) ** 2
    ratio = float(u2.mean() / v2.mean())
    influence = u2 / u2.mean() - v2 / v2.mean()
    return ratio, ratio * float(influence.std()) / math.sqrt(x.numel())


def paired_bias(x: torch.Tensor, reference: torch.Tensor | float) -> tuple[float, float]:
    """mean(x - reference) and its z-score (reference: a number or paired draws)."""
    d = (x - reference).reshape(-1)
    se = float(d.std()) / math.sqrt(d.numel())
    return float(d.mean()), (float(d.mean()) / se if se > 0 else 0.0)


def mixed_row(a, b, pairs: int, chains: int, exact: float | None) -> dict:
    """Variances and bias of Metz's weighting and the covariance weighting (first
    truncation, and after ``WARM`` truncations of history) on the samples ``a, b``."""
    metz = chain_estimates(a, b, pairs, chains, "metz")
    cold = chain_estimates(a, b, pairs, chains, "covariance", decay=0.0)  # no history
    warm = chain_estimates(a, b, pairs, chains, "covariance")
    warm = {key: v[WARM:] for key, v in warm.items()}
    var = {key: float(metz[key].var()) for key in ("backprop", "es")}
    better = min(var, key=var.get)
    va, vb = float(a.var()), float(b.var())
    cov = float(((a - a.mean()) * (b - b.mean())).mean())
    w_star = min(max((vb - cov) / (va + vb - 2 * cov), 0.0), 1.0)
    q_star = w_star**2 * va + (1 - w_star) ** 2 * vb + 2 * w_star * (1 - w_star) * cov
    row = {
        "pairs": pairs,
        "chains": chains,
        "truncations": metz["mixed"].shape[0],
        "var_backprop": var["backprop"],
        "var_es": var["es"],
        "correlation": cov / math.sqrt(va * vb),
        "better": better,
        "w_star": w_star,
        "oracle_over_min": q_star / min(va, vb),
    }
    for name, est in (("metz", metz), ("covariance_first", cold), ("covariance_warm", warm)):
        ratio, se = variance_ratio(est["mixed"], est[better])
        reference = exact if exact is not None else est[better]
        bias, z = paired_bias(est["mixed"], reference)
        row[name] = {
            "var_mixed": float(est["mixed"].var()),
            "mixed_over_min": ratio,
            "mixed_over_min_se": se,
            "mean": float(est["mixed"].mean()),
            "bias": bias,
            "bias_over_se": z,
            "estimates": est["mixed"].numel(),
        }
    row["bias_reference"] = "exact" if exact is not None else f"paired {better} component"
    return row


# ======================================================================================
# A. Truncation bias
# ======================================================================================


def run_bias_variance(
    n: int, mixed_repeats: int, mixed_episodes_n: int, mixed_chains: int, mixed_calls: int
) -> dict:
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
    # Whole episodes: one estimate of S = 8 pairs per truncation, from chains of truncations
    # (see mixed_row); the covariance weighting on its first truncation and once its history
    # has built up.
    started = time.perf_counter()
    a, b = pair_samples(system, theta, sigma, mixed_chains * mixed_calls * S, seed=20_000)
    for label, weighting, decay, skip in (
        ("metz weighting", "metz", DECAY, 0),
        ("covariance, first truncation", "covariance", 0.0, 0),
        (f"covariance, after {WARM} truncations", "covariance", DECAY, WARM),
    ):
        est = chain_estimates(a, b, S, mixed_chains, weighting, decay)
        mixed = est["mixed"][skip:].reshape(-1)
        mean, se, z, var = _z(mixed.unsqueeze(1), exact)
        rows.append(
            {
                "estimator": f"MixedEstimator, {label} (whole episodes)",
                "target": "grad E L(theta+eps)",
                "mean": mean,
                "se": se,
                "bias": mean - float(exact),
                "bias_over_se": z,
                "variance_S8": var,  # already the variance of an S = 8 estimate
                "variance_S8_backprop_component": float(est["backprop"][skip:].var()),
                "variance_S8_es_component": float(est["es"][skip:].var()),
                "system_steps_per_episode_S8": 2 * S * horizon,
                "backward_pass": True,
                "samples": mixed.numel(),
                "wall_s": time.perf_counter() - started,
            }
        )
    # Truncated (K = 5): the estimator itself, `mixed_repeats` independent runs of
    # `mixed_episodes` episodes (4 truncations each) at theta = 0; one estimate per episode
    # (the mean of its truncations'). The covariance weighting's history spans episodes,
    # so its first episode and its later ones are reported apart.
    for weighting in ("metz", "covariance"):
        started = time.perf_counter()
        est = E.MixedEstimator(
            system, sigma, S, truncation_length=k, vectorize=True, weighting=weighting
        )
        parts = mixed_episodes(est, theta, windows, mixed_repeats, mixed_episodes_n, 10_000)
        skip = mixed_episodes_n // 2
        cases = [("metz weighting", 0, None)]
        if weighting == "covariance":
            cases = [
                ("covariance, first episode", 0, 1),
                (f"covariance, episodes > {skip}", skip, None),
            ]
        for label, first, stop in cases:
            part = {key: v[first:stop].reshape(-1) for key, v in parts.items()}
            mean, se, z, var = _z(part["mixed"].unsqueeze(1), exact)
            rows.append(
                {
                    "estimator": f"MixedEstimator, {label} (K={k})",
                    "target": "grad E L(theta+eps)",
                    "mean": mean,
                    "se": se,
                    "bias": mean - float(exact),
                    "bias_over_se": z,
                    "variance_S8": var,
                    "variance_S8_backprop_component": float(part["backprop"].var()),
                    "variance_S8_es_component": float(part["es"].var()),
                    "system_steps_per_episode_S8": 2 * S * horizon,
                    "backward_pass": True,
                    "samples": part["mixed"].numel(),
                    "wall_s": time.perf_counter() - started,
                }
            )
    for row in rows:
        if "variance_S8_backprop_component" in row:
            smaller = min(row["variance_S8_backprop_component"], row["variance_S8_es_component"])
            row["mixed_over_min_component"] = row["variance_S8"] / smaller
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


GAUSSIAN_CASES = (  # (var_a, var_b, correlation): w* = 1 (a boundary), 0.8, 1/2
    (1.0, 4.0, 0.5),
    (1.0, 4.0, 0.0),
    (1.0, 1.0, -0.5),
)


def run_crossover(horizons: list[int], chains: int, calls: int) -> dict:
    sigma, pairs = 0.05, 16
    rows = []

    def add(problem: str, horizon, pairs_: int, a, b, exact, started):
        row = mixed_row(a, b, pairs_, chains, exact)
        row.update(problem=problem, horizon=horizon, wall_s=time.perf_counter() - started)
        rows.append(row)
        print(f"  {problem} T={horizon} S={pairs_}: {time.perf_counter() - started:.1f} s")

    for rate in (2.8, 3.8):
        theta = E.LogisticMap.theta_for_rate(rate)
        for horizon in horizons:
            started = time.perf_counter()
            n = chains * calls * pairs
            a, b = pair_samples(E.LogisticMap(horizon), theta, sigma, n, seed=100 * horizon)
            add(f"logistic map r={rate}", horizon, pairs, a, b, None, started)
    # The components are strongly correlated here (both are driven by the same noise draw
    # and perturbation): inverse-variance weights, which assume independence, are not
    # optimal, and the weights estimated from the samples they weigh bias the estimate.
    affine = E.AffineRecurrence(horizon=20, a=0.9, noise_scale=0.5)
    exact = float(affine.gradient(torch.zeros(1)))
    for n_pairs in (8, 16):
        started = time.perf_counter()
        n = chains * calls * n_pairs
        a, b = pair_samples(affine, torch.zeros(1), 0.1, n, seed=7 + n_pairs)
        add("noisy affine recurrence", 20, n_pairs, a, b, exact, started)
    power = E.PowerRecurrence(horizon=4)
    theta = {"a": torch.tensor(0.9)}
    exact = float(power.smoothed_gradient(theta, sigma=0.3)["a"])
    started = time.perf_counter()
    a, b = pair_samples(power, theta, 0.3, chains * calls * 8, seed=3)
    add("power recurrence (sigma=0.3)", 4, 8, a, b, exact, started)
    for var_a, var_b, rho in GAUSSIAN_CASES:
        started = time.perf_counter()
        a, b = gaussian_pairs(var_a, var_b, rho, 1.0, chains * calls * 8, seed=11)
        add(f"Gaussian pairs Va={var_a:g} Vb={var_b:g} rho={rho:g}", None, 8, a, b, 1.0, started)
    return {
        "setup": (
            f"LogisticMap (r = 4 sigmoid(theta)), sigma = {sigma}; AffineRecurrence(horizon=20, "
            f"a=0.9, noise_scale=0.5), sigma = 0.1; PowerRecurrence(horizon=4), a = 0.9, "
            f"sigma = 0.3; Gaussian pairs with known covariance (mean 1). Whole episodes; "
            f"{chains} independent chains of {calls} truncations at a fixed theta per row"
        ),
        "warm_after": WARM,
        "decay": DECAY,
        "rows": rows,
    }


# ======================================================================================
# Reporting
# ======================================================================================


def _z_cell(z: float | None) -> str:
    if z is None:
        return "off, SE = 0"
    return "exact" if z == 0.0 else f"{z:+.1f}"


def _ratio_cell(r: dict) -> str:
    return f"{r['mixed_over_min']:.3f} ± {r['mixed_over_min_se']:.3f}"


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
    lines.append("")
    for r in a["rows"]:
        if "mixed_over_min_component" in r:
            lines.append(
                f"- {r['estimator']}: variance of its back-propagation component "
                f"{r['variance_S8_backprop_component']:.3g}, of its ES component "
                f"{r['variance_S8_es_component']:.3g}; mixed / min = "
                f"{r['mixed_over_min_component']:.3f}."
            )
    labels = list(b["targets"])
    lines += [
        "",
        "*bias / SE* = (mean - exact) / standard error of the mean of the independent "
        "per-episode estimates (their number in the last column: one per particle or pair; "
        "for the mixed estimator, one per truncation of S = 8 pairs). |bias / SE| < 4 is "
        f"consistent with no bias. The whole-episode mixed rows come from chains of "
        f"truncations at theta = 0 (experiment C's method); 'after {WARM} truncations' pools "
        f"the truncations after the {WARM}th. The K = 5 rows run the estimator itself over "
        f"runs of several episodes (4 truncations each; one estimate per episode); the "
        f"covariance weighting's history spans episodes, so its first episode (at most 3 "
        f"truncations of history) is reported apart from the later ones.",
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
        f"**C. Back-propagation vs ES, and their mix.** {c['setup']}. *var backprop*, *var "
        f"ES*: variances of the two components' estimates (S pairs); *rho*: the correlation "
        f"of their per-pair samples; *oracle*: q(w\\*) / min, the variance with the exact "
        f"minimum-variance weight. The three *mixed / min* columns: the mixed estimate's "
        f"variance over the smaller component's (paired draws, ± one Monte-Carlo standard "
        f"error, delta method) for Metz's weighting (every truncation alike), the "
        f"covariance weighting on a first truncation (no history: cross-fitted "
        f"leave-one-out weights from the current pairs only) and after {c['warm_after']} "
        f"truncations (history decay {c['decay']}, the default). *bias / SE*: of the "
        f"covariance-weighted estimate after {c['warm_after']} truncations, against the exact "
        f"gradient where known, else against the better component (paired).",
        "",
        "| problem | T | S | var backprop | var ES | rho | oracle | mixed / min: Metz "
        "| covariance, first | covariance, warm | bias / SE: Metz | covariance, warm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in c["rows"]:
        horizon = "" if r["horizon"] is None else r["horizon"]
        lines.append(
            f"| {r['problem']} | {horizon} | {r['pairs']} | {r['var_backprop']:.3g} | "
            f"{r['var_es']:.3g} | {r['correlation']:+.2f} | {r['oracle_over_min']:.2f} | "
            f"{_ratio_cell(r['metz'])} | {_ratio_cell(r['covariance_first'])} | "
            f"{_ratio_cell(r['covariance_warm'])} | {r['metz']['bias_over_se']:+.1f} | "
            f"{r['covariance_warm']['bias_over_se']:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, c = result["bias_variance"], result["crossover"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    (ax1, ax2), (ax3, ax4) = axes
    names = [r["estimator"] for r in a["rows"]]
    y = range(len(names))
    ax1.barh(y, [r["bias"] for r in a["rows"]], xerr=[4 * r["se"] for r in a["rows"]])
    ax1.axvline(0, color="k", lw=0.8)
    ax1.set_yticks(list(y), names, fontsize=7)
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
        for label, values, color in (
            ("backprop", [r["var_backprop"] for r in rows], "C0"),
            ("ES", [r["var_es"] for r in rows], "C1"),
            ("mixed, Metz", [r["metz"]["var_mixed"] for r in rows], "C3"),
            ("mixed, covariance (warm)", [r["covariance_warm"]["var_mixed"] for r in rows], "C2"),
        ):
            ax3.plot(t, values, style, color=color, marker="o", label=f"{label} (r={rate})")
    ax3.set_yscale("log")
    ax3.set_xlabel("unroll length T")
    ax3.set_ylabel("variance of the estimate (S = 16)")
    ax3.set_title("C. logistic map: backprop vs ES vs mixed")
    ax3.legend(fontsize=7)
    labels = [
        f"{r['problem']}"
        + ("" if r["horizon"] is None else f" T={r['horizon']}")
        + f" S={r['pairs']}"
        for r in c["rows"]
    ]
    y = torch.arange(len(labels), dtype=torch.float64)
    for offset, key, color, name in (
        (-0.27, "metz", "C3", "Metz"),
        (0.0, "covariance_first", "C7", "covariance, first truncation"),
        (0.27, "covariance_warm", "C2", f"covariance, after {c['warm_after']} truncations"),
    ):
        ratios = [min(r[key]["mixed_over_min"], 5.0) for r in c["rows"]]
        errors = [r[key]["mixed_over_min_se"] for r in c["rows"]]
        ax4.barh(y + offset, ratios, height=0.26, xerr=errors, color=color, label=name)
    ax4.axvline(1.0, color="k", lw=0.8)
    ax4.set_yticks(y.tolist(), labels, fontsize=7)
    ax4.invert_yaxis()
    ax4.set_xlabel("variance of the mix / smaller component's (clipped at 5; ±1 SE)")
    ax4.set_title("C. mixed / min by weighting")
    ax4.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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
    # mixed estimator, truncated: runs x episodes per run
    n, mixed_repeats, mixed_episodes_n = (400, 10, 4) if args.quick else (4000, 100, 10)
    # chains x truncations per chain of the mixed estimator's rows
    chains, calls = (20, WARM + 10) if args.quick else (100, WARM + 30)
    horizons = [5, 10, 20] if args.quick else [5, 10, 20, 40]
    result["bias_variance"] = run_bias_variance(n, mixed_repeats, mixed_episodes_n, chains, calls)
    print("A done", f"{time.perf_counter() - started:.0f} s", flush=True)
    result["smoothing"] = run_smoothing(n)
    print("B done", f"{time.perf_counter() - started:.0f} s", flush=True)
    result["crossover"] = run_crossover(horizons, chains, calls)
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
