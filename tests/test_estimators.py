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
# The mixed estimator (Metz et al. 2019).


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


@pytest.mark.parametrize(
    ("rate", "horizon", "winner"),
    [(2.8, 10, "backprop"), (3.8, 10, None), (3.8, 20, "es")],
)
def test_mixed_variance_is_never_above_the_smaller_one(rate, horizon, winner):
    # Logistic map: stable at r = 2.8 (back-propagation far better), chaotic at r = 3.8
    # (back-propagated gradients grow like e^{0.43 T}: comparable at T = 10, ES far better
    # at T = 20). Empirical variances over 150 independent estimates of 16 pairs each;
    # the 10% margin covers the weights being estimated from 16 samples (Metz et al.'s
    # O(1/S) effect) and the noise of the variance estimates themselves.
    system = LogisticMap(horizon=horizon)
    theta = LogisticMap.theta_for_rate(rate)
    est = MixedEstimator(system, sigma=0.05, num_pairs=16, vectorize=True)
    gen = _gen(2)
    state = est.init(theta, gen)
    mixed, backprop, es = [], [], []
    for _ in range(150):
        out, state = est.estimate(theta, state, gen)
        mixed.append(out.grad)
        backprop.append(out.extras["backprop"])
        es.append(out.extras["es"])
    var_mixed, var_bp, var_es = (float(torch.stack(x).var()) for x in (mixed, backprop, es))
    assert var_mixed <= 1.1 * min(var_bp, var_es)
    if winner == "backprop":
        assert var_bp < 0.1 * var_es
    elif winner == "es":
        assert var_es < 0.1 * var_bp
    else:
        assert 0.1 < var_bp / var_es < 10
        assert var_mixed < 0.9 * min(var_bp, var_es)  # here mixing beats both


def test_mixed_estimate_is_its_components_combined_and_unbiased():
    # Both components estimate the gradient of the smoothed objective (4.011 at a = 0.9,
    # sigma = 0.3, T = 4): the back-propagated one at the perturbed points a +- eps.
    system = PowerRecurrence(horizon=4)
    theta = {"a": torch.tensor(0.9)}
    est = MixedEstimator(system, sigma=0.3, num_pairs=4000, vectorize=True)
    out, _ = est.estimate(theta, est.init(theta, _gen()), _gen())
    x = out.extras
    combined, weight = inverse_variance_combine(
        x["backprop"], x["backprop_variance"], x["es"], x["es_variance"]
    )
    assert torch.equal(out.grad["a"], combined["a"])
    assert torch.equal(x["backprop_weight"]["a"], weight["a"])
    assert torch.allclose(out.samples["a"].mean(), out.grad["a"])
    smoothed = system.smoothed_gradient(theta, sigma=0.3)["a"]
    for samples in (x["backprop_samples"]["a"], x["es_samples"]["a"], out.samples["a"]):
        assert float(_z(samples, smoothed).abs()) < 4
    raw = system.smoothed_gradient(theta, sigma=0.0)["a"]
    assert float(_z(x["backprop_samples"]["a"], raw).abs()) > 8


def _nan_gradient_system(horizon=3):
    # The classic torch.where trap: the forward pass is finite, the backward pass through
    # the unselected sqrt branch is NaN (0 * NaN).
    def step(x, theta, t):
        x = x + torch.where(theta > 100, torch.sqrt(theta - 100), theta**2)
        return x, x

    return UnrolledSystem(lambda g: torch.zeros(()), step, horizon=horizon)


def test_mixed_falls_back_on_es_when_backprop_fails():
    system = _nan_gradient_system()
    theta = torch.tensor(0.5)
    est = MixedEstimator(system, sigma=0.01, num_pairs=64)
    out, _ = est.estimate(theta, est.init(theta, _gen()), _gen())
    assert bool(torch.isnan(out.extras["backprop"]))
    assert float(out.extras["backprop_weight"]) == 0.0
    assert torch.equal(out.grad, out.extras["es"]) and bool(torch.isfinite(out.grad))
    # loss = mean_t (t+1) theta^2 = 2 theta^2 -> gradient 4 theta = 2, unbiased ES
    assert abs(float(out.grad) - 2.0) < 4 * float(out.standard_error())
    with pytest.raises(hg.HypergradientError, match=r"NaN/inf gradients.*MixedEstimator"):
        tbptt = TruncatedBackprop(system)
        tbptt.estimate(theta, tbptt.init(theta, _gen()), _gen())


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
