"""Meta-gradient estimators over unrolled systems against exact (smoothed) gradients (float64).

Statistical tests compare a sample mean with an exact value in units of its standard error
(SE): "unbiased" means within 4 SE (a false alarm about once in 16,000 runs; the seeds are
fixed, so the outcome is deterministic), and every such test also shows that a *biased*
estimator lands far outside that band on the same problem, so it could fail.
"""

import math

import pytest
import torch

import hypergradient as hg
from hypergradient.estimators import (
    PES,
    AffineRecurrence,
    AntitheticES,
    EstimatorState,
    FullBackprop,
    GradientEstimate,
    LogisticMap,
    MixedEstimator,
    PowerRecurrence,
    TruncatedBackprop,
    UnrolledSystem,
    cross_fitted_combine,
    inverse_variance_combine,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _episode_samples(estimator, theta, windows, seed=0, key=None):
    """Per-particle estimates averaged over ``windows`` consecutive truncations: (S, ...).

    Over whole episodes, the average of the truncations' estimates is the estimate of the
    gradient of the episode's mean loss (every step is counted once).
    """
    gen = _gen(seed)
    state = estimator.init(theta, gen)
    total = None
    for _ in range(windows):
        out, state = estimator.estimate(theta, state, gen)
        samples = out.samples if key is None else out.samples[key]
        total = samples if total is None else total + samples
    return total / windows


def _z(samples, exact):
    """(mean - exact) / standard error, per coordinate."""
    se = samples.std(dim=0) / math.sqrt(samples.shape[0])
    return (samples.mean(dim=0) - exact) / se


# ----------------------------------------------------------------------------------------
# Back-propagation: exact when full, biased by a computable amount when truncated.


@pytest.mark.parametrize("vectorize", [False, True])
def test_full_backprop_is_the_exact_gradient(vectorize):
    system = AffineRecurrence(horizon=12, dim=3, a=0.9)
    theta = torch.tensor([0.0, 0.1, -0.2])
    est = FullBackprop(system, num_particles=2, vectorize=vectorize)
    gen = _gen()
    state = est.init(theta, gen)
    for episode in range(2):  # the second call starts a fresh episode
        out, state = est.estimate(theta, state, gen)
        # noise-free linear recurrence: every particle's gradient is the closed form
        assert torch.allclose(out.grad, system.gradient(theta), rtol=1e-12, atol=1e-14)
        assert torch.allclose(out.samples, system.gradient(theta).expand(2, 3), rtol=1e-12)
        assert (out.t, out.episodes_finished, out.system_steps) == (12, 1, 24)
        assert state.episodes == episode + 1


def test_truncated_backprop_bias_on_a_linear_recurrence():
    # x_{t+1} = 0.9 x_t + theta, loss (x_{t+1} - 1)^2 / 2, T = 20 split into K = 5.
    # Truncation sees dx_t/dtheta = S_{t - t0} = sum_{j < t - t0} 0.9^j instead of S_t
    # (AffineRecurrence docstring), so it recovers only 43% of the gradient at theta = 0:
    # closed forms -6.047 (full) and -2.629 (truncated), a bias of 3.42 in absolute value.
    system = AffineRecurrence(horizon=20, a=0.9)
    theta = torch.zeros(1)
    exact = system.gradient(theta)
    truncated = system.truncated_backprop_gradient(theta, 5)
    assert float((exact - truncated).abs()) > 3.0  # the stated bias threshold
    samples = _episode_samples(TruncatedBackprop(system, 5, num_particles=2), theta, 4)
    assert torch.allclose(samples.mean(dim=0), truncated, rtol=1e-12)  # noise-free: exact

    # With noise, more particles do not remove the bias: the mean settles on the truncated
    # closed form, many standard errors away from the true gradient.
    noisy = AffineRecurrence(horizon=20, a=0.9, noise_scale=0.5)
    est = TruncatedBackprop(noisy, 5, num_particles=400, vectorize=True)
    samples = _episode_samples(est, theta, 4)
    assert float(_z(samples, truncated).abs()) < 4
    assert float(_z(samples, exact).abs()) > 10


# ----------------------------------------------------------------------------------------
# ES and PES: unbiased for the Gaussian-smoothed objective.


@pytest.mark.parametrize("estimator", [AntitheticES, PES])
def test_es_is_unbiased_for_the_smoothed_objective(estimator):
    # L(a) = mean_t a^{2t}/2 over T = 4 steps is a polynomial, so E L(a + eps) is exact
    # (Gaussian moments). At a = 0.9, sigma = 0.3 smoothing moves the gradient from 1.51
    # to 4.01: the unsmoothed gradient, i.e. a biased estimator, fails by > 8 SE.
    system = PowerRecurrence(horizon=4)
    theta = {"a": torch.tensor(0.9)}
    est = estimator(system, sigma=0.3, num_pairs=4000, vectorize=True)
    samples = _episode_samples(est, theta, 1, key="a")
    smoothed = system.smoothed_gradient(theta, sigma=0.3)["a"]
    raw = system.smoothed_gradient(theta, sigma=0.0)["a"]
    assert float(_z(samples, smoothed).abs()) < 4
    assert float(_z(samples, raw).abs()) > 8


def test_pes_is_unbiased_under_truncation_for_the_per_truncation_smoothing():
    # T = 8 in K = 2: PES targets E L(a + eps_1, ..., a + eps_4), one perturbation per
    # truncation (PowerRecurrence.smoothed_loss with truncation_length=2): gradient 2.784.
    # Truncated ES (no accumulator) converges elsewhere (about 1.03) and fails by > 8 SE.
    system = PowerRecurrence(horizon=8)
    theta = {"a": torch.tensor(0.9)}
    exact = system.smoothed_gradient(theta, sigma=0.2, truncation_length=2)["a"]
    pes = PES(system, sigma=0.2, num_pairs=4000, truncation_length=2, vectorize=True)
    assert float(_z(_episode_samples(pes, theta, 4, key="a"), exact).abs()) < 4
    tes = AntitheticES(system, sigma=0.2, num_pairs=4000, truncation_length=2, vectorize=True)
    assert float(_z(_episode_samples(tes, theta, 4, key="a"), exact).abs()) > 8


@pytest.mark.parametrize("truncation_length", [5, 6])
def test_pes_is_unbiased_under_truncation_where_truncated_methods_are_not(truncation_length):
    # Noisy linear recurrence, quadratic loss: every Gaussian smoothing has the plain
    # gradient -6.047 (AffineRecurrence.gradient). K = 6 does not divide T = 20: windows
    # straddle episodes, and 10 windows cover 3 whole episodes (60 steps), so this also
    # checks the accumulator restart inside a truncation.
    system = AffineRecurrence(horizon=20, a=0.9, noise_scale=0.5)
    theta = torch.zeros(1)
    exact = system.gradient(theta)
    windows = 60 // truncation_length
    pes = PES(system, 0.1, num_pairs=2000, truncation_length=truncation_length, vectorize=True)
    assert float(_z(_episode_samples(pes, theta, windows), exact).abs()) < 4
    tes = AntitheticES(system, 0.1, 2000, truncation_length=truncation_length, vectorize=True)
    assert float(_z(_episode_samples(tes, theta, windows), exact).abs()) > 8
    tbptt = TruncatedBackprop(system, truncation_length, num_particles=400, vectorize=True)
    assert float(_z(_episode_samples(tbptt, theta, windows), exact).abs()) > 8


def test_loop_and_vectorized_particles_agree():
    # Same generator, same draws: running the particles one by one or vmapped is the same
    # computation (up to summation order).
    system = AffineRecurrence(horizon=6, dim=2, a=0.8, noise_scale=0.3)
    theta = torch.tensor([0.2, -0.1])
    for make in (
        lambda v: PES(system, 0.1, num_pairs=3, truncation_length=4, vectorize=v),
        lambda v: AntitheticES(system, 0.1, num_pairs=3, truncation_length=4, vectorize=v),
        lambda v: TruncatedBackprop(system, 4, num_particles=3, vectorize=v),
        lambda v: MixedEstimator(system, 0.1, num_pairs=3, truncation_length=4, vectorize=v),
    ):
        loop = _episode_samples(make(False), theta, 3)
        vmapped = _episode_samples(make(True), theta, 3)
        assert torch.allclose(loop, vmapped, rtol=1e-10, atol=1e-12)


def test_state_bookkeeping_across_truncations():
    system = AffineRecurrence(horizon=5, a=0.5)
    theta = torch.zeros(1)
    est = PES(system, 0.1, num_pairs=2, truncation_length=2)
    gen = _gen()
    state = est.init(theta, gen)
    assert (state.t, state.episodes, len(state.particles)) == (0, 1, 4)
    assert torch.equal(state.accumulators, torch.zeros(2, 1))
    seen = []
    for _ in range(5):  # 10 steps = 2 episodes; window 3 covers steps 4 and 0
        out, state = est.estimate(theta, state, gen)
        seen.append((out.t, out.episodes_finished, state.episodes, out.system_steps))
    assert seen == [(2, 0, 1, 8), (4, 0, 1, 8), (1, 1, 2, 8), (3, 0, 2, 8), (5, 1, 2, 8)]
    assert isinstance(out, GradientEstimate) and isinstance(state, EstimatorState)
    assert out.variance().shape == (1,) and out.standard_error().shape == (1,)


def test_python_states_run_one_by_one_but_not_vectorized():
    # A state with a non-tensor leaf (a step counter) is fine particle by particle.
    system = UnrolledSystem(
        lambda g: (torch.zeros(()), 0),
        lambda s, th, t: ((s[0] + th, s[1] + 1), (s[0] + th) ** 2),
        horizon=3,
    )
    theta = torch.tensor(0.5)
    out, _ = FullBackprop(system).estimate(theta, FullBackprop(system).init(theta, _gen()), _gen())
    # loss = mean over t of ((t+1) theta)^2 -> gradient 2 theta (1 + 4 + 9) / 3
    assert torch.allclose(out.grad, torch.tensor(2 * 0.5 * 14 / 3))
    with pytest.raises(hg.HypergradientError, match=r"vectorize=True.*int leaf"):
        FullBackprop(system, vectorize=True).init(theta, _gen())


def test_meta_training_with_pes_reaches_the_optimum_that_truncation_misses():
    # The loop a learned-optimizer meta-trainer runs: PES every K = 5 steps of T = 20, SGD on
    # theta. The objective is quadratic: its minimiser 0.1442 and the truncated gradient's
    # zero 0.1589 follow from the closed forms (gradients affine in theta).
    system = AffineRecurrence(horizon=20, a=0.9)

    def zero_of(gradient):
        g0, g1 = gradient(torch.zeros(1)), gradient(torch.ones(1))
        return -g0 / (g1 - g0)

    optimum = zero_of(system.gradient)
    truncated_zero = zero_of(lambda th: system.truncated_backprop_gradient(th, 5))
    assert float(truncated_zero - optimum) > 0.01

    def meta_train(estimator):
        theta, gen = torch.zeros(1), _gen()
        state = estimator.init(theta, gen)
        path = []
        for _ in range(120):  # 30 episodes
            out, state = estimator.estimate(theta, state, gen)
            theta = theta - 0.01 * out.grad
            path.append(theta)
        return torch.stack(path[-40:]).mean()  # average the last 10 episodes' iterates

    pes = meta_train(PES(system, 0.05, num_pairs=16, truncation_length=5, vectorize=True))
    tbptt = meta_train(TruncatedBackprop(system, 5))
    assert abs(float(pes - optimum)) < 0.003
    assert abs(float(tbptt - truncated_zero)) < 1e-3  # converges, to the wrong point


# ----------------------------------------------------------------------------------------
# The mixed estimator (Metz et al. 2019): Metz's inverse-variance weighting and the default
# cross-fitted covariance weighting.
#
# The variance tests run the estimator's combination functions over "chains" of
# truncations: a meta-training loop at a fixed theta, one chain per coordinate (every
# coordinate has its own weights and history, so chains are independent).  Their per-pair
# samples come from one whole-episode MixedEstimator truncation over chains x truncations x
# S fresh episodes whose states are built as one batch (init's one-by-one loop would take
# seconds); every truncation of the estimator is exactly such a combination of S fresh
# pairs (test_mixed_estimator_is_the_cross_fitted_combination_of_its_samples).


@pytest.mark.parametrize(("var_a", "var_b"), [(1.0, 4.0), (4.0, 1.0), (1.0, 1.0), (0.01, 100.0)])
def test_inverse_variance_combination_of_independent_estimates(var_a, var_b):
    # Known variances: Var(w a + (1 - w) b) = var_a var_b / (var_a + var_b) exactly.
    n, mu = 20000, 3.0
    gen = _gen(1)
    # drawn on the CPU generator's device, then moved (HYPERGRADIENT_TEST_DEVICE=cuda)
    device = torch.empty(0).device
    a = mu + math.sqrt(var_a) * torch.randn(n, generator=gen, device="cpu").to(device)
    b = mu + math.sqrt(var_b) * torch.randn(n, generator=gen, device="cpu").to(device)
    combined, weight = inverse_variance_combine(
        a, torch.full((n,), var_a), b, torch.full((n,), var_b)
    )
    expected = var_a * var_b / (var_a + var_b)
    assert torch.allclose(weight, torch.full((n,), var_b / (var_a + var_b)))
    # the sample variance of n Gaussians has relative SE sqrt(2/n) = 1%: 5% is 5 SE
    assert abs(float(combined.var()) / expected - 1) < 0.05
    assert float(combined.var()) <= 1.05 * min(var_a, var_b)
    assert abs(float(combined.mean()) - mu) < 4 * math.sqrt(expected / n)


def test_inverse_variance_combination_edge_cases():
    one, two = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])
    var_a = torch.tensor([0.0, float("nan"), 1.0, 1.0])
    var_b = torch.tensor([0.0, 1.0, float("inf"), 3.0])
    combined, weight = inverse_variance_combine(one, var_a, two, var_b)
    assert torch.equal(weight, torch.tensor([0.5, 0.0, 1.0, 0.75]))
    assert torch.equal(combined, torch.tensor([1.5, 2.0, 1.0, 1.25]))
    # a NaN/inf estimate never leaks into the result
    c, w = inverse_variance_combine(
        {"x": torch.tensor([float("inf")])},
        {"x": torch.tensor([1.0])},
        {"x": torch.tensor([2.0])},
        {"x": torch.tensor([1.0])},
    )
    assert float(c["x"]) == 2.0 and float(w["x"]) == 0.0
    with pytest.raises(hg.HypergradientError, match=r"`estimate_b` has shapes \[\(2,\)\]"):
        inverse_variance_combine(one, var_a, torch.zeros(2), var_b)


def _comoments(a, b):
    da, db = a - a.mean(dim=0), b - b.mean(dim=0)
    return torch.stack([(da * da).sum(0), (db * db).sum(0), (da * db).sum(0)])


@pytest.mark.parametrize(
    ("pairs", "folds"), [(2, None), (2, 2), (3, None), (3, 2), (3, 3), (8, None), (8, 2), (8, 3)]
)
def test_cross_fitted_weights_against_a_direct_computation(pairs, folds):
    # Reference: for every fold f, the co-moments of the pairs outside f computed directly,
    # plus the history; w = clip((B - C) / (A + B - 2C), 0, 1). The implementation gets them
    # by down-dating the totals instead (O(S d) rather than O(folds S d)).
    gen = _gen(3)
    device = torch.empty(0).device
    a = torch.randn(pairs, 4, 2, generator=gen, device="cpu").to(device)
    b = 0.3 * a + 2 * torch.randn(pairs, 4, 2, generator=gen, device="cpu").to(device)
    history = torch.rand(3, 4, 2, generator=gen, device="cpu").to(device)
    history[2] *= 0.1  # a valid (positive semi-definite) co-moment matrix
    out = cross_fitted_combine({"x": a}, {"x": b}, {"x": history}, folds=folds, decay=0.5)
    fold = torch.arange(pairs) % (pairs if folds is None else folds)
    expected = torch.empty_like(a)
    for f in fold.unique():
        aa, bb, ab = history + _comoments(a[fold != f], b[fold != f])
        expected[fold == f] = ((bb - ab) / (aa + bb - 2 * ab)).clamp(0, 1)
    assert torch.allclose(out.weights["x"], expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.samples["x"], expected * a + (1 - expected) * b, rtol=1e-12)
    assert torch.allclose(out.grad["x"], out.samples["x"].mean(dim=0), rtol=1e-12)
    assert torch.allclose(out.moments["x"], 0.5 * history + _comoments(a, b), rtol=1e-12)


def test_cross_fitted_combination_edge_cases():
    ones = torch.ones(4, 3)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).unsqueeze(1) * ones
    # column 0: a has zero variance (all 2.5): all weight on it, exactly;
    # column 1: b = a + 1 (Var(a - b) = 0, every weight is optimal): 1/2;
    # column 2: b = 2a: w* = (4 - 2) / (1 + 4 - 4) = 2 on every subset, clipped to 1.
    a[:, 0] = 2.5
    b = a.clone()
    b[:, 0] = torch.tensor([0.0, 5.0, 1.0, 4.0])
    b[:, 1] = a[:, 1] + 1
    b[:, 2] = 2 * a[:, 2]
    out = cross_fitted_combine(a, b)
    assert torch.equal(out.weights[:, 0], torch.ones(4)) and float(out.grad[0]) == 2.5
    assert torch.equal(out.weights[:, 1], torch.full((4,), 0.5))
    assert torch.equal(out.weights[:, 2], torch.ones(4)) and torch.equal(
        out.grad[2], a[:, 2].mean()
    )
    # a single pair per fold and no history: no information, equal weights
    two = cross_fitted_combine(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 5.0]))
    assert torch.equal(two.weights, torch.full((2,), 0.5))
    # a NaN back-propagation sample in coordinate 0 only: ES there, for every pair; the
    # history gains nothing there (only the decay) and stays finite
    a = torch.randn(6, 2, generator=_gen(4), device="cpu").to(torch.empty(0).device)
    b = a + 0.5
    b[:, 1] = 2 * a[:, 1]
    a[2, 0] = float("nan")
    history = torch.ones(3, 2)
    history[2] = 0.5
    out = cross_fitted_combine(a, b, history)
    assert torch.equal(out.weights[:, 0], torch.zeros(6))
    assert torch.equal(out.samples[:, 0], b[:, 0]) and bool(torch.isfinite(out.grad).all())
    assert torch.equal(out.moments[:, 0], 0.95 * history[:, 0])
    assert bool(torch.isfinite(out.moments).all()) and bool((out.weights[:, 1] > 0).all())
    # float32 samples: float64 statistics, float32 results
    out32 = cross_fitted_combine(a[:, 1:].float(), b[:, 1:].float())
    assert out32.grad.dtype == torch.float32 and out32.moments.dtype == torch.float64


# (var_a, var_b, correlation) of the per-pair samples: the exact minimum-variance weight w*
# sits on the boundary (w* = 1, b = a + noise), inside (0.8, independent), in the middle
# (1/2, anti-correlated).
_GAUSSIAN_CASES = [(1.0, 4.0, 0.5), (1.0, 4.0, 0.0), (1.0, 1.0, -0.5)]


def _gaussian_pairs(var_a, var_b, rho, n, seed):
    gen = _gen(seed)
    device = torch.empty(0).device
    z1, z2 = torch.randn((2, n), generator=gen, device="cpu").to(device)
    a = 1.0 + math.sqrt(var_a) * z1
    b = 1.0 + math.sqrt(var_b) * (rho * z1 + math.sqrt(1 - rho**2) * z2)
    return a, b


def _chain(a, b, pairs, chains, weighting="covariance", decay=0.95):
    """``chains`` meta-training loops over the per-pair samples ``a, b`` (shape (n,)), dealt
    into truncations of ``pairs`` pairs: (mixed, backprop, es), each (truncations, chains)."""
    calls = a.shape[0] // (pairs * chains)
    a = a[: calls * pairs * chains].reshape(calls, pairs, chains)
    b = b[: calls * pairs * chains].reshape(calls, pairs, chains)
    mixed, moments = [], None
    for k in range(calls):
        if weighting == "metz":
            c, _ = inverse_variance_combine(
                a[k].mean(0), a[k].var(0) / pairs, b[k].mean(0), b[k].var(0) / pairs
            )
        else:
            fit = cross_fitted_combine(a[k], b[k], moments, decay=decay)
            c, moments = fit.grad, fit.moments
        mixed.append(c)
    return torch.stack(mixed), a.mean(dim=1), b.mean(dim=1)


def _variance_ratio(x, y):
    """Var(x) / Var(y) over paired draws, and its Monte-Carlo standard error (delta method:
    with u = x - mean x, v = y - mean y, the ratio mean(u^2) / mean(v^2) has relative
    variance Var(u^2 / mean u^2 - v^2 / mean v^2) / N; pairing cancels the shared noise)."""
    x, y = x.reshape(-1), y.reshape(-1)
    u2, v2 = (x - x.mean()) ** 2, (y - y.mean()) ** 2
    ratio = float(u2.mean() / v2.mean())
    return ratio, ratio * float((u2 / u2.mean() - v2 / v2.mean()).std()) / math.sqrt(x.numel())


@pytest.mark.parametrize(("var_a", "var_b", "rho"), _GAUSSIAN_CASES)
def test_cross_fitted_combination_with_a_known_covariance(var_a, var_b, rho):
    # 1000 chains x 40 truncations of S = 8 pairs; the last 15 truncations of every chain
    # (history built up: sum_{j<25} 0.95^j = 14.5 truncations' worth) give N = 15000
    # estimates. Exact targets: min(var_a, var_b) / S and q(w*) / S, the variance with the
    # exact minimum-variance weight. The Monte-Carlo error of a variance over N estimates
    # is sqrt((kurtosis - 1) / N) relative (1.2% here); the tolerance is 3 of those.
    pairs, chains = 8, 1000
    a, b = _gaussian_pairs(var_a, var_b, rho, chains * 40 * pairs, seed=5)
    mixed, _, _ = _chain(a, b, pairs, chains)
    warm = mixed[25:].reshape(-1)
    u2 = (warm - warm.mean()) ** 2
    variance, rel_se = float(u2.mean()), float(u2.std() / u2.mean()) / math.sqrt(u2.numel())
    assert rel_se < 0.015
    cov = rho * math.sqrt(var_a * var_b)
    w = min(max((var_b - cov) / (var_a + var_b - 2 * cov), 0.0), 1.0)
    oracle = (w**2 * var_a + (1 - w) ** 2 * var_b + 2 * w * (1 - w) * cov) / pairs
    assert variance <= min(var_a, var_b) / pairs * (1 + 3 * rel_se)
    # ...and close to the oracle: estimated weights cost about q(w*) / (dof - 3) with
    # ~200 degrees of freedom behind them (0.5%), within the 3.6% Monte-Carlo band.
    assert variance <= oracle * (1 + 0.005 + 3 * rel_se)
    assert abs(float(warm.mean()) - 1.0) < 4 * math.sqrt(variance / warm.numel())
    # the first truncation of a chain (no history) is unbiased too
    cold, _, _ = _chain(a, b, pairs, chains, decay=0.0)
    assert abs(float(cold.mean()) - 1.0) < 4 * float(cold.std()) / math.sqrt(cold.numel())


def _batched_init(system, n, gen):
    """``n`` fresh episodes of a toy system as one stacked state, drawn from the toys'
    ``init`` distributions (``vectorize=True`` stacks the same thing one by one)."""
    device = torch.empty(0).device
    if isinstance(system, LogisticMap):
        return {"x": (0.2 + 0.6 * torch.rand(n, generator=gen, device="cpu")).to(device)}
    if isinstance(system, AffineRecurrence):
        noise = torch.randn((n, system.horizon, system.dim), generator=gen, device="cpu")
        return {
            "x": torch.full((n, system.dim), float(system.x_init)),
            "noise": (system.noise_scale * noise).to(device),
        }
    return torch.full((n,), float(system.x_init))  # PowerRecurrence


def _pair_samples(system, theta, sigma, n, seed):
    """``n`` independent pairs' (backprop, es) samples, shape (n,) each (scalar theta)."""
    gen = _gen(seed)
    est = MixedEstimator(system, sigma, n, vectorize=True)
    out, _ = est.estimate(
        theta, EstimatorState("MixedEstimator", _batched_init(system, n, gen), 0, 1), gen
    )
    found = [out.extras[k] for k in ("backprop_samples", "es_samples")]
    return tuple((x["a"] if isinstance(x, dict) else x).reshape(n) for x in found)


def _setting(name):
    """(system, theta, sigma, pairs, exact smoothed gradient or None) of a benchmark row."""
    if name.startswith("affine"):
        system = AffineRecurrence(horizon=20, a=0.9, noise_scale=0.5)
        theta = torch.zeros(1)
        return system, theta, 0.1, int(name[6:]), float(system.gradient(theta))
    if name == "power":
        system, theta = PowerRecurrence(horizon=4), {"a": torch.tensor(0.9)}
        return system, theta, 0.3, 8, float(system.smoothed_gradient(theta, sigma=0.3)["a"])
    rate, horizon = (float(x) for x in name[8:].split("_"))
    return LogisticMap(int(horizon)), LogisticMap.theta_for_rate(rate), 0.05, 16, None


@pytest.mark.parametrize(
    "setting",
    ["affine8", "affine16", "power"]
    + [f"logistic{r}_{t}" for r in (2.8, 3.8) for t in (5, 10, 20, 40)],
)
def test_mixed_variance_is_never_above_the_smaller_one(setting):
    # Every setting of the benchmark (benchmarks/estimator_bias_variance.py): the noisy
    # affine recurrence (S = 8, 16: strongly correlated components, where Metz's weighting
    # has 1.4x the smaller variance), the power recurrence, and the logistic map, stable
    # (r = 2.8: back-propagation far better) and chaotic (r = 3.8: comparable at T = 10,
    # where mixing beats both; ES far better from T = 20). 100 chains x 40 truncations;
    # the last 15 of each chain (N = 1500 estimates) once the weights' history is built up.
    # Tolerance: 3 Monte-Carlo standard errors of the paired variance ratio (required to
    # be < 0.04, so the test can fail). The weights' own noise costs 0.1-0.5% on these
    # problems at this history (benchmark, 3000 estimates per row), below this resolution.
    system, theta, sigma, pairs, exact = _setting(setting)
    chains = 100
    a, b = _pair_samples(system, theta, sigma, chains * 40 * pairs, seed=6)
    mixed, backprop, es = (x[25:] for x in _chain(a, b, pairs, chains))
    better = backprop if float(backprop.var()) <= float(es.var()) else es
    ratio, se = _variance_ratio(mixed, better)
    assert se < 0.04
    assert ratio <= 1 + 3 * se
    if setting == "logistic3.8_10":
        assert ratio < 0.8  # comparable components: the mix beats both
    # unbiased: against the exact smoothed gradient where known, else against the better
    # component (unbiased itself; the paired difference cancels most of the noise)
    diff = (mixed - (exact if exact is not None else better)).reshape(-1)
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(diff.numel())


def test_metz_weighting_is_biased_and_above_the_smaller_variance():
    # The documented defects of weighting="metz" on the noisy affine recurrence, S = 8 (the
    # samples of test_mixed_variance_is_never_above_the_smaller_one["affine8"]): weights
    # estimated from the samples they weigh pull the estimate towards zero by ~12%, and
    # ignoring the correlation costs ~1.4x the smaller variance.
    system, theta, sigma, pairs, exact = _setting("affine8")
    a, b = _pair_samples(system, theta, sigma, 100 * 40 * pairs, seed=6)
    mixed, backprop, es = _chain(a, b, pairs, 100, weighting="metz")
    ratio, se = _variance_ratio(mixed, backprop)
    assert ratio > 1 + 5 * se
    z = (float(mixed.mean()) - exact) / (float(mixed.std()) / math.sqrt(mixed.numel()))
    assert z > 6


@pytest.mark.parametrize(("folds", "vectorize"), [(None, True), (2, False)])
def test_mixed_estimator_is_the_cross_fitted_combination_of_its_samples(folds, vectorize):
    # The estimator's grad, weights and carried history are cross_fitted_combine applied to
    # its own per-pair samples with the previous truncation's history, truncation after
    # truncation (K = 2 of T = 5: windows straddle episodes); an odd number of pairs.
    system = AffineRecurrence(horizon=5, dim=2, a=0.8, noise_scale=0.3)
    theta = torch.tensor([0.2, -0.1])
    est = MixedEstimator(
        system, 0.1, num_pairs=5, truncation_length=2, vectorize=vectorize, folds=folds, decay=0.8
    )
    gen = _gen(7)
    state = est.init(theta, gen)
    assert state.moments is None
    for _ in range(4):
        previous = state.moments
        out, state = est.estimate(theta, state, gen)
        x = out.extras
        fit = cross_fitted_combine(
            x["backprop_samples"], x["es_samples"], previous, folds=folds, decay=0.8
        )
        assert torch.equal(out.grad, fit.grad) and torch.equal(state.moments, fit.moments)
        assert torch.equal(x["backprop_weights"], fit.weights)
        assert torch.equal(x["backprop_weight"], fit.weights.mean(dim=0))
        assert torch.allclose(out.samples.mean(dim=0), out.grad, rtol=1e-12)
    assert state.moments.shape == (3, 2) and bool((state.moments[:2] > 0).all())
    with pytest.raises(hg.HypergradientError, match=r"theta's structure .* changed since init"):
        est.estimate(torch.zeros(3), state, gen)


@pytest.mark.parametrize("weighting", ["covariance", "metz"])
def test_mixed_estimate_is_its_components_combined_and_unbiased(weighting):
    # Both components estimate the gradient of the smoothed objective (4.011 at a = 0.9,
    # sigma = 0.3, T = 4): the back-propagated one at the perturbed points a +- eps.
    system = PowerRecurrence(horizon=4)
    theta = {"a": torch.tensor(0.9)}
    est = MixedEstimator(system, sigma=0.3, num_pairs=4000, vectorize=True, weighting=weighting)
    out, state = est.estimate(theta, est.init(theta, _gen()), _gen())
    x = out.extras
    if weighting == "metz":
        combined, weight = inverse_variance_combine(
            x["backprop"], x["backprop_variance"], x["es"], x["es_variance"]
        )
        assert torch.equal(x["backprop_weight"]["a"], weight["a"])
        assert state.moments is None
    else:
        combined = cross_fitted_combine(x["backprop_samples"], x["es_samples"]).grad
    assert torch.equal(out.grad["a"], combined["a"])
    assert torch.allclose(out.samples["a"].mean(), out.grad["a"])
    # Var, Cov of the means from the pairs
    bp, es = x["backprop_samples"]["a"], x["es_samples"]["a"]
    assert torch.allclose(x["backprop_variance"]["a"], bp.var() / 4000)
    assert torch.allclose(x["covariance"]["a"], torch.cov(torch.stack([bp, es]))[0, 1] / 4000)
    smoothed = system.smoothed_gradient(theta, sigma=0.3)["a"]
    for samples in (bp, es, out.samples["a"]):
        assert float(_z(samples, smoothed).abs()) < 4
    raw = system.smoothed_gradient(theta, sigma=0.0)["a"]
    assert float(_z(bp, raw).abs()) > 8


def test_mixed_estimator_in_a_meta_training_loop_beats_both_components():
    # The estimator itself, 150 consecutive truncations at one theta (its history builds up
    # as in a meta-training loop): on the chaotic logistic map at T = 10 the two components
    # are comparable and nearly uncorrelated, and the mix has ~0.65 of the smaller variance
    # (the exact weights' 0.65; benchmark). The ratio's standard error over these 130
    # truncations is ~0.07: 0.9 is 3.5 of them above 0.65.
    system = LogisticMap(horizon=10)
    theta = LogisticMap.theta_for_rate(3.8)
    est = MixedEstimator(system, sigma=0.05, num_pairs=16, vectorize=True)
    gen = _gen(2)
    state = est.init(theta, gen)
    mixed, backprop, es = [], [], []
    for _ in range(150):
        out, state = est.estimate(theta, state, gen)
        mixed.append(out.grad)
        backprop.append(out.extras["backprop"])
        es.append(out.extras["es"])
    mixed, backprop, es = (torch.stack(x)[20:] for x in (mixed, backprop, es))
    assert 0.1 < float(backprop.var() / es.var()) < 10
    ratio, se = _variance_ratio(mixed, backprop if backprop.var() < es.var() else es)
    assert ratio < 0.9 and se < 0.1


def _nan_gradient_system(horizon=3):
    # The classic torch.where trap: the forward pass is finite, the backward pass through
    # the unselected sqrt branch is NaN (0 * NaN).
    def step(x, theta, t):
        x = x + torch.where(theta > 100, torch.sqrt(theta - 100), theta**2)
        return x, x

    return UnrolledSystem(lambda g: torch.zeros(()), step, horizon=horizon)


@pytest.mark.parametrize("weighting", ["covariance", "metz"])
def test_mixed_falls_back_on_es_when_backprop_fails(weighting):
    system = _nan_gradient_system()
    theta = torch.tensor(0.5)
    est = MixedEstimator(system, sigma=0.01, num_pairs=64, weighting=weighting)
    state = est.init(theta, _gen())
    for _ in range(2):  # the second truncation sees the first one's history
        out, state = est.estimate(theta, state, _gen())
        assert bool(torch.isnan(out.extras["backprop"]))
        assert float(out.extras["backprop_weight"]) == 0.0
        assert torch.equal(out.grad, out.extras["es"]) and bool(torch.isfinite(out.grad))
        # loss = mean_t (t+1) theta^2 = 2 theta^2 -> gradient 4 theta = 2, unbiased ES
        assert abs(float(out.grad) - 2.0) < 4 * float(out.standard_error())
    if weighting == "covariance":
        assert torch.equal(state.moments, torch.zeros(3))  # nothing learnt from NaN
    with pytest.raises(hg.HypergradientError, match=r"NaN/inf gradients.*MixedEstimator"):
        tbptt = TruncatedBackprop(system)
        tbptt.estimate(theta, tbptt.init(theta, _gen()), _gen())


def test_cross_fitted_combine_errors():
    a = torch.zeros(4, 2)
    with pytest.raises(hg.HypergradientError, match=r"`es_samples` has shapes \[\(4, 3\)\]"):
        cross_fitted_combine(a, torch.zeros(4, 3))
    with pytest.raises(hg.HypergradientError, match=r"at least 2 pairs.*\[\(1, 2\)\]"):
        cross_fitted_combine(a[:1], a[:1])
    with pytest.raises(hg.HypergradientError, match=r"folds must be None .* \[2, S=4\], got 5"):
        cross_fitted_combine(a, a, folds=5)
    with pytest.raises(hg.HypergradientError, match=r"decay must be a float in \[0, 1\), got 1"):
        cross_fitted_combine(a, a, decay=1.0)
    with pytest.raises(hg.HypergradientError, match=r"`moments` has shapes \[\(3,\)\]"):
        cross_fitted_combine(a, a, torch.zeros(3))


# ----------------------------------------------------------------------------------------
# Errors: every raise, with the message that says how to fix it.

_SYS = AffineRecurrence(horizon=4)


def _theta():
    # built inside the test, so it gets the test's float64 dtype and device
    return torch.zeros(1)


def _bad_step_system(step):
    return UnrolledSystem(lambda g: torch.zeros(1), step, horizon=2)


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: PES(object(), 0.1), r"must be an AbstractUnrolledSystem.*UnrolledSystem"),
        (lambda: PES(_SYS, 0.0), r"sigma .* must be a finite float > 0, got 0.0"),
        (lambda: PES(_SYS, float("nan")), r"sigma"),
        (lambda: PES(_SYS, True), r"sigma"),
        (lambda: PES(_SYS, 0.1, num_pairs=0), r"num_pairs must be an int >= 1, got 0"),
        (lambda: MixedEstimator(_SYS, 0.1, num_pairs=1), r"num_pairs must be an int >= 2"),
        (lambda: MixedEstimator(_SYS, 0.1, weighting="mean"), r"weighting must be one of"),
        (lambda: MixedEstimator(_SYS, 0.1, folds=1), r"folds must be an int >= 2, got 1"),
        (lambda: MixedEstimator(_SYS, 0.1, 4, folds=5), r"folds must be at most num_pairs=4"),
        (lambda: MixedEstimator(_SYS, 0.1, decay=-0.1), r"decay must be a float in \[0, 1\)"),
        (lambda: MixedEstimator(_SYS, 0.1, decay=True), r"decay must be a float"),
        (lambda: AntitheticES(_SYS, 0.1, truncation_length=5), r"\[1, horizon=4\], got 5"),
        (lambda: TruncatedBackprop(_SYS, 0), r"truncation_length .* got 0"),
        (lambda: FullBackprop(_SYS, num_particles=1.5), r"num_particles must be an int"),
        (lambda: FullBackprop(_SYS, vectorize=1), r"vectorize must be True or False"),
        (lambda: UnrolledSystem(None, lambda s, th, t: 0, 3), r"init_fn=.*expected a callable"),
        (lambda: UnrolledSystem(lambda g: 0, lambda s, th, t: 0, 0), r"horizon .* int >= 1"),
        (lambda: AffineRecurrence(horizon=3, dim=0), r"dim must be an int >= 1"),
        (lambda: AffineRecurrence(horizon=3, a=float("inf")), r"a must be a finite float"),
        (lambda: AffineRecurrence(horizon=3, noise_scale=-1.0), r"noise_scale .* >= 0"),
        (lambda: PowerRecurrence(horizon=3, x_init="1"), r"x_init must be a finite float"),
        (lambda: LogisticMap(horizon=-1), r"horizon .* int >= 1, got -1"),
        (lambda: LogisticMap.theta_for_rate(4.0), r"rate must be in \(0, 4\)"),
        (lambda: _SYS.truncated_backprop_gradient(_theta(), 3), r"must divide horizon=4"),
        (
            lambda: PowerRecurrence(horizon=4).smoothed_loss({"a": _theta()}, -0.1),
            r"sigma must be a finite float >= 0",
        ),
    ],
)
def test_construction_errors(build, pattern):
    with pytest.raises(hg.HypergradientError, match=pattern):
        build()


def test_call_errors():
    theta = _theta()
    est = PES(_SYS, 0.1, num_pairs=2, truncation_length=2)
    state = est.init(theta, _gen())
    with pytest.raises(hg.HypergradientError, match=r"PES.estimate.*`theta` must be a dict"):
        est.estimate([0.0], state, _gen())
    with pytest.raises(hg.HypergradientError, match=r"theta.*NaN/inf"):
        est.estimate(torch.tensor([float("nan")]), state, _gen())
    with pytest.raises(hg.HypergradientError, match=r"`generator` must be a torch.Generator"):
        est.estimate(theta, state, 0)
    with pytest.raises(hg.HypergradientError, match=r"`state` must be the EstimatorState"):
        est.estimate(theta, None, _gen())
    other = AntitheticES(_SYS, 0.1).init(theta, _gen())
    with pytest.raises(hg.HypergradientError, match=r"built by AntitheticES, not PES"):
        est.estimate(theta, other, _gen())
    with pytest.raises(hg.HypergradientError, match=r"theta's structure .* changed since init"):
        est.estimate(torch.zeros(2), state, _gen())
    single = FullBackprop(_SYS).estimate(theta, FullBackprop(_SYS).init(theta, _gen()), _gen())
    with pytest.raises(hg.HypergradientError, match=r"at least 2 independent samples, got 1"):
        single[0].variance()


@pytest.mark.parametrize(
    ("step", "pattern"),
    [
        (lambda s, th, t: s, r"must return a pair \(next_state, loss\), got Tensor"),
        (lambda s, th, t: (s, 1.0), r"loss a 0-d tensor, got loss of type float"),
        (lambda s, th, t: (s, s.expand(3) + th), r"loss of shape \(3,\).*\.mean\(\)"),
        (lambda s, th, t: (s, torch.ones((), dtype=torch.int64)), r"dtype torch.int64"),
        (lambda s, th, t: (s, th.sum() / 0.0), r"2 of the 2 losses.*NaN/inf.*nan_to_num"),
    ],
)
@pytest.mark.parametrize("vectorize", [False, True])
def test_step_contract_errors(step, pattern, vectorize):
    system = _bad_step_system(step)
    est = TruncatedBackprop(system, 1, num_particles=2, vectorize=vectorize)
    if "losses" in pattern:  # non-finite losses are checked by every estimator
        est = AntitheticES(system, 0.1, num_pairs=1, truncation_length=1, vectorize=vectorize)
    theta = torch.zeros(1)
    with pytest.raises(hg.HypergradientError, match=pattern):
        est.estimate(theta, est.init(theta, _gen()), _gen())
