"""Maximum entropy (Bryan's method) and the Tikhonov / NNLS baseline of
``hypergradient.continuation.max_entropy``.

Checked against what each method promises, computed independently in the tests: the MaxEnt
solve is a stationary point of ``Q = chi2 / 2 - alpha S`` (autograd gradient in the singular
space, and the closed-form condition ``alpha ln(A / D) = -B^T r`` on the grid), each
``alpha`` rule meets its own condition, correlated noise gives ``chi2 = r^T C^{-1} r``, and
the NNLS solution satisfies the KKT conditions and equals the normal-equations solve when no
constraint is active.  Test spectra are normalised Gaussian mixtures built here.
"""

from __future__ import annotations

import math

import pytest
import torch

from hypergradient import HypergradientError
from hypergradient.continuation import max_entropy as maxent_module
from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
from hypergradient.continuation.max_entropy import MaxEntResult, maxent, tikhonov_nnls

DTYPE = torch.float64
BETA, N_TAU, N_W = 10.0, 41, 161


def gaussian_mixture(omega, centres, widths, weights):
    """Normalised (on the grid, below) sum of Gaussians: a smooth test spectrum."""
    parts = [
        weight
        * torch.exp(-0.5 * ((omega - centre) / width) ** 2)
        / (width * math.sqrt(2 * math.pi))
        for centre, width, weight in zip(centres, widths, weights)
    ]
    return sum(parts)


@pytest.fixture(scope="module")
def setup():
    grid = uniform_grid(-6.0, 6.0, N_W)
    problem = Problem(tau=tau_grid(BETA, N_TAU), beta=BETA, grid=grid, statistics="fermionic")
    A_true = gaussian_mixture(grid.omega, (-1.5, 2.0), (0.6, 0.8), (0.6, 0.4))
    A_true = A_true / (grid.weights * A_true).sum()
    G_exact = problem.forward(A_true)
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn(N_TAU, generator=generator, dtype=DTYPE)
    sigma = 1e-3 * float(G_exact.abs().max())
    return {
        "grid": grid,
        "problem": problem,
        "A_true": A_true,
        "G_exact": G_exact,
        "G_noisy": G_exact + sigma * noise,
        "sigma": sigma,
    }


def l1(grid, A, B):
    return float((grid.weights * (A - B).abs()).sum())


def integral(grid, A):
    return float((grid.weights * A).sum())


# ------------------------------------------------------------------------------------------
# MaxEnt


@pytest.mark.parametrize("rule", ["historic", "chi2kink"])
def test_noiseless_two_gaussians_reproduced(setup, rule):
    # noiseless data with a tiny sigma: the information in G pins A down closely
    grid = setup["grid"]
    sigma = 1e-6 * float(setup["G_exact"].abs().max())
    result = maxent(setup["G_exact"], setup["problem"], sigma=sigma, alpha=rule)
    assert isinstance(result, MaxEntResult)
    assert result.A.shape == (N_W,) and result.A.dtype == DTYPE
    assert l1(grid, result.A, setup["A_true"]) < 0.05
    assert bool((result.A > 0).all())
    # the data fix the norm (G(0) + G(beta) = integral A for fermions) to about sigma
    assert abs(integral(grid, result.A) - 1.0) < 1e-4


def test_historic_chi2_equals_number_of_data(setup):
    result = maxent(setup["G_noisy"], setup["problem"], sigma=setup["sigma"], alpha="historic")
    assert result.rule_satisfied and result.converged
    # the root is refined to 1e-8 relative
    assert result.chi2 == pytest.approx(N_TAU, rel=1e-6)
    # ...and the reported chi2 is the spectrum's own misfit
    residual = (setup["problem"].forward(result.A) - setup["G_noisy"]) / setup["sigma"]
    assert float(residual.square().sum()) == pytest.approx(result.chi2, rel=1e-8)
    assert l1(setup["grid"], result.A, setup["A_true"]) < 0.3


@pytest.mark.parametrize("rule", ["historic", "classic", "chi2kink", "bryan"])
def test_every_rule_gives_a_positive_normalised_spectrum(setup, rule):
    grid = setup["grid"]
    result = maxent(setup["G_noisy"], setup["problem"], sigma=setup["sigma"], alpha=rule)
    assert result.method == rule
    assert bool(torch.isfinite(result.A).all()) and bool((result.A > 0).all())
    # relative noise 1e-3 on G(0) + G(beta) = 1 bounds the norm's error to a few 1e-3
    assert abs(integral(grid, result.A) - 1.0) < 1e-2
    assert l1(grid, result.A, setup["A_true"]) < 0.6
    assert float(result.alphas[-1]) <= result.alpha <= float(result.alphas[0])
    assert result.entropy <= 0.0
    n = len(result.alphas)
    assert result.chi2s.shape == result.entropies.shape == result.log_posterior.shape == (n,)
    # chi2 of the exact minimiser grows with alpha: it falls along the decreasing scan
    assert bool((result.alphas[1:] < result.alphas[:-1]).all())
    assert bool((result.chi2s[1:] <= result.chi2s[:-1] * (1 + 1e-6)).all())


def test_classic_condition_is_bracketed_by_the_scan(setup):
    result = maxent(setup["G_noisy"], setup["problem"], sigma=setup["sigma"], alpha="classic")
    assert result.rule_satisfied
    # -2 alpha S / N_g - 1 changes sign between the two scanned alphas around the choice
    condition = -2 * result.alphas * result.entropies / result.good_measurements - 1
    above = int((result.alphas > result.alpha).sum()) - 1
    assert condition[above] > 0 > condition[above + 1]


def test_newton_iteration_reaches_stationarity(setup):
    problem, grid, sigma = setup["problem"], setup["grid"], setup["sigma"]
    alpha = 100.0
    result = maxent(setup["G_noisy"], problem, sigma=sigma, alpha=alpha, tol=1e-10)
    assert result.converged and result.stationarity <= 1e-10 and result.alpha == alpha
    # Bryan's space, rebuilt here: B = (K_w / sigma) / weights = U diag(s) V^T
    data = setup["G_noisy"] / sigma
    B = problem.matrix / sigma / grid.weights
    _, s, Vh = torch.linalg.svd(B, full_matrices=False)
    V = Vh[s > 1e-12 * s[0]].T
    D, m = result.default_model, grid.weights * result.default_model
    log_ratio = torch.log(result.A / D)
    u = V.T @ log_ratio
    # A = D exp(V u): ln(A / D) lies in the span of V
    assert torch.allclose(V @ u, log_ratio, rtol=0, atol=1e-9 * float(log_ratio.abs().max()))
    u = u.clone().requires_grad_(True)
    f = m * torch.exp(V @ u)
    residual = B @ f - data
    entropy = (f - m - f * (V @ u)).sum()
    Q = 0.5 * residual.square().sum() - alpha * entropy
    (grad,) = torch.autograd.grad(Q, u)
    data_part = V.T @ (f.detach() * (B.T @ residual.detach()))
    assert float(grad.abs().max()) <= 1e-7 * float(data_part.abs().max())
    # the same condition on the grid: alpha ln(A / D) = -B^T r
    force = B.T @ residual.detach()
    assert torch.allclose(alpha * log_ratio, -force, rtol=0, atol=1e-7 * float(force.abs().max()))


def test_fixed_alpha_and_bryan_agree_on_a_one_point_scan(setup):
    args = (setup["G_noisy"], setup["problem"])
    alphas = torch.tensor([50.0], dtype=DTYPE)
    fixed = maxent(*args, sigma=setup["sigma"], alpha=50.0, alphas=alphas)
    bryan = maxent(*args, sigma=setup["sigma"], alpha="bryan", alphas=alphas)
    assert fixed.method == "fixed" and bryan.method == "bryan"
    # the posterior average over a single alpha is that alpha's spectrum
    assert torch.allclose(fixed.A, bryan.A, rtol=1e-12, atol=0)
    assert bryan.alpha == pytest.approx(50.0, rel=1e-12)


def test_explicit_flat_default_model_equals_the_default(setup):
    grid = setup["grid"]
    flat = torch.full((N_W,), 1.0 / float(grid.weights.sum()), dtype=DTYPE)
    args = (setup["G_noisy"], setup["problem"])
    implicit = maxent(*args, sigma=setup["sigma"], alpha=30.0)
    explicit = maxent(*args, sigma=setup["sigma"], alpha=30.0, default_model=flat)
    assert torch.equal(implicit.default_model, flat)
    assert torch.allclose(implicit.A, explicit.A, rtol=1e-12, atol=0)


def test_diagonal_covariance_equals_sigma(setup):
    sigma = setup["sigma"] * torch.linspace(0.5, 1.5, N_TAU, dtype=DTYPE)
    args = (setup["G_noisy"], setup["problem"])
    by_sigma = maxent(*args, sigma=sigma, alpha=30.0)
    by_covariance = maxent(*args, covariance=torch.diag(sigma**2), alpha=30.0)
    assert torch.allclose(by_sigma.A, by_covariance.A, rtol=1e-8, atol=0)
    assert by_covariance.chi2 == pytest.approx(by_sigma.chi2, rel=1e-8)


def test_correlated_noise_chi2_uses_the_inverse_covariance(setup):
    problem, grid = setup["problem"], setup["grid"]
    sigma = setup["sigma"]
    index = torch.arange(N_TAU, dtype=DTYPE)
    covariance = sigma**2 * 0.6 ** (index[:, None] - index[None, :]).abs()
    factor = torch.linalg.cholesky(covariance)
    generator = torch.Generator().manual_seed(7)
    G = setup["G_exact"] + factor @ torch.randn(N_TAU, generator=generator, dtype=DTYPE)
    result = maxent(G, problem, covariance=covariance, alpha="historic")
    assert result.rule_satisfied
    residual = problem.forward(result.A) - G
    chi2 = float(residual @ torch.cholesky_solve(residual[:, None], factor)[:, 0])
    assert chi2 == pytest.approx(result.chi2, rel=1e-8)
    assert chi2 == pytest.approx(N_TAU, rel=1e-6)
    assert bool((result.A > 0).all())
    assert l1(grid, result.A, setup["A_true"]) < 0.5


def test_maxent_is_deterministic(setup):
    first = maxent(setup["G_noisy"], setup["problem"], sigma=setup["sigma"], alpha="chi2kink")
    second = maxent(setup["G_noisy"], setup["problem"], sigma=setup["sigma"], alpha="chi2kink")
    assert torch.equal(first.A, second.A) and first.alpha == second.alpha


# ------------------------------------------------------------------------------------------
# Tikhonov / NNLS


def whitened(setup, sigma):
    K = setup["problem"].matrix / sigma[:, None]
    return K, setup["G_noisy"] / sigma


@pytest.mark.parametrize("lam", [1e2, 1e4])
def test_tikhonov_without_positivity_is_the_normal_equations(setup, lam):
    sigma = setup["sigma"] * torch.linspace(0.5, 1.5, N_TAU, dtype=DTYPE)
    K, data = whitened(setup, sigma)
    direct = torch.linalg.solve(K.T @ K + lam * torch.eye(N_W, dtype=DTYPE), K.T @ data)
    A = tikhonov_nnls(setup["G_noisy"], setup["problem"], sigma=sigma, lam=lam, positivity=False)
    assert torch.allclose(A, direct, rtol=0, atol=1e-8 * float(direct.abs().max()))


def test_tikhonov_with_inactive_positivity_is_the_normal_equations(setup):
    sigma = torch.full((N_TAU,), setup["sigma"], dtype=DTYPE)
    K, data = whitened(setup, sigma)
    lam = 1e7  # strong enough that the unconstrained solution is positive everywhere
    direct = torch.linalg.solve(K.T @ K + lam * torch.eye(N_W, dtype=DTYPE), K.T @ data)
    assert float(direct.min()) > 0
    A = tikhonov_nnls(setup["G_noisy"], setup["problem"], sigma=setup["sigma"], lam=lam)
    assert torch.allclose(A, direct, rtol=0, atol=1e-8 * float(direct.abs().max()))


@pytest.mark.parametrize("lam", [1e-6, 1e-2, 1.0, 1e2])
def test_tikhonov_nnls_satisfies_the_kkt_conditions(setup, lam):
    sigma = torch.full((N_TAU,), setup["sigma"], dtype=DTYPE)
    K, data = whitened(setup, sigma)
    A = tikhonov_nnls(setup["G_noisy"], setup["problem"], sigma=setup["sigma"], lam=lam)
    assert bool((A >= 0).all())
    unconstrained = tikhonov_nnls(
        setup["G_noisy"], setup["problem"], sigma=setup["sigma"], lam=lam, positivity=False
    )
    assert float(unconstrained.min()) < 0  # so the constraint is active
    assert int((A == 0).sum()) > 0
    # gradient of ||K A - d||^2 / 2 + lam ||A||^2 / 2: zero where A > 0, >= 0 where A = 0
    gradient = K.T @ (K @ A - data) + lam * A
    scale = float((K.T @ data).abs().max())
    positive = A > 0
    assert float(gradient[positive].abs().max()) <= 1e-9 * scale
    assert float(gradient[~positive].min()) >= -1e-9 * scale


def test_both_nnls_solvers_agree(setup):
    # the fast block pivoting and the robust Lawson-Hanson fallback give the same minimiser
    sigma = torch.full((N_TAU,), setup["sigma"], dtype=DTYPE)
    K, data = whitened(setup, sigma)
    lam = 1.0
    hessian = K.T @ K + lam * torch.eye(N_W, dtype=DTYPE)
    pivoting = maxent_module._nnls_block_pivoting(hessian, K.T @ data)
    lawson_hanson = maxent_module._nnls_lawson_hanson(K, data, lam, "test")
    assert pivoting is not None
    assert torch.equal(pivoting > 0, lawson_hanson > 0)
    assert torch.allclose(pivoting, lawson_hanson, rtol=0, atol=1e-8 * float(pivoting.max()))


def test_tikhonov_does_not_renormalise(setup):
    # a strong lam shrinks A: the integral is reported as computed, not forced to 1
    A = tikhonov_nnls(setup["G_exact"], setup["problem"], sigma=setup["sigma"], lam=1e9)
    assert 0 < integral(setup["grid"], A) < 0.9


# ------------------------------------------------------------------------------------------
# bad input


def test_bad_green_function_is_caught_by_check_green(setup):
    problem, sigma = setup["problem"], setup["sigma"]
    bad = setup["G_noisy"].clone()
    bad[3] = float("nan")
    with pytest.raises(HypergradientError, match=r"^maxent: .*NaN"):
        maxent(bad, problem, sigma=sigma)
    with pytest.raises(HypergradientError, match=r"^tikhonov_nnls: .*NaN"):
        tikhonov_nnls(bad, problem, lam=1.0)
    with pytest.raises(HypergradientError, match=r"^maxent: G has shape \(40,\)"):
        maxent(setup["G_noisy"][:-1], problem, sigma=sigma)
    not_spd = torch.ones(N_TAU, N_TAU, dtype=DTYPE)
    with pytest.raises(HypergradientError, match=r"^maxent: .*covariance"):
        maxent(setup["G_noisy"], problem, covariance=not_spd)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma": -1.0}, "sigma has a non-positive"),
        ({"sigma": torch.ones(3, dtype=DTYPE)}, r"sigma has shape \(3,\)"),
        ({}, "got neither sigma nor covariance"),
        ({"sigma": 1e-3, "covariance": torch.eye(N_TAU, dtype=DTYPE)}, "got both"),
        ({"sigma": 1e-3, "alpha": "best"}, "alpha='best' is not a known rule"),
        ({"sigma": 1e-3, "alpha": -2.0}, "alpha=-2.0, expected"),
        ({"sigma": 1e-3, "default_model": torch.ones(5, dtype=DTYPE)}, "default_model has shape"),
        ({"sigma": 1e-3, "default_model": torch.zeros(N_W, dtype=DTYPE)}, "non-positive"),
        ({"sigma": 1e-3, "alphas": torch.tensor([1.0, 2.0])}, "at least 5 for 'chi2kink'"),
        ({"sigma": 1e-3, "tol": 0.0}, "tol=0.0"),
    ],
)
def test_bad_maxent_arguments(setup, kwargs, match):
    with pytest.raises(HypergradientError, match=r"^maxent: .*" + match):
        maxent(setup["G_noisy"], setup["problem"], **kwargs)


def test_batched_input_is_refused(setup):
    batch = setup["G_noisy"].expand(2, N_TAU)
    with pytest.raises(HypergradientError, match="call once per spectrum"):
        maxent(batch, setup["problem"], sigma=1e-3)
    with pytest.raises(HypergradientError, match="call once per spectrum"):
        tikhonov_nnls(batch, setup["problem"], lam=1.0)


def test_bad_tikhonov_lam(setup):
    with pytest.raises(HypergradientError, match=r"^tikhonov_nnls: lam=-1.0"):
        tikhonov_nnls(setup["G_noisy"], setup["problem"], lam=-1.0)
    with pytest.raises(HypergradientError, match="expected lam > 0"):
        tikhonov_nnls(setup["G_noisy"], setup["problem"], lam=0.0)
    # lam = 0 without positivity is plain least squares: allowed
    A = tikhonov_nnls(setup["G_exact"], setup["problem"], lam=0.0, positivity=False)
    assert A.shape == (N_W,)
