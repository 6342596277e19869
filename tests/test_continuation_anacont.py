"""Our maximum entropy against the independent ``ana-cont`` package (Kaufmann & Held, PyPI) on
the same data, grid, noise and flat default model.

``ana-cont`` is a test dependency only, installed by ``.ci/run`` (its source build imports
Cython without declaring it: ``pip install Cython`` then ``pip install --no-build-isolation
ana-cont``); it calls ``np.trapz``, which numpy 2.4 removed, so the test aliases it to
``np.trapezoid`` while it runs.

What the comparison found (two Gaussians, beta = 20, 101 tau points, 401 frequencies on
[-8, 8], noise 1e-3 of max G): at ana-cont's own chi-squared-kink alpha the two spectra are
0.008 apart in L1, not below 1e-3.  The difference is ana-cont's: on the discretised MaxEnt
functional Q = chi2 / 2 - alpha S that both minimise (same trapezoid weights, same kernel),
our spectrum is a stationary point (relative gradient ~1e-12 in the full frequency space)
with the lower Q, while ana-cont's Newton iterate is not (relative gradient ~1).  The test
asserts exactly that explanation, so it fails if either side changes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypergradient import continuation as ac

ana_cont = pytest.importorskip(
    "ana_cont.continuation",
    reason="ana-cont is not installed: pip install Cython && pip install --no-build-isolation "
    "ana-cont (what .ci/run does)",
)


@pytest.fixture
def trapz(monkeypatch):
    if not hasattr(np, "trapz"):  # numpy >= 2.4 removed it; ana-cont still calls it
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


def _two_gaussians():
    beta = 20.0
    problem = ac.Problem(ac.tau_grid(beta, 101), beta, ac.uniform_grid(-8.0, 8.0, 401))
    w = problem.grid.omega
    a = 0.6 * torch.exp(-((w + 1.5) ** 2) / 0.5) + 0.4 * torch.exp(-((w - 2.0) ** 2) / 1.28)
    a = a / problem.grid.integrate(a)
    g = problem.forward(a)
    gen = torch.Generator().manual_seed(0)
    sigma = 1e-3 * float(g.abs().max()) * torch.ones_like(g)
    noisy = g + sigma * torch.randn(g.shape, generator=gen, dtype=g.dtype)
    flat = torch.ones_like(w) / problem.grid.integrate(torch.ones_like(w))
    return problem, a, noisy, sigma, flat


def _objective(problem, a, noisy, sigma, model, alpha):
    """chi2 / 2 - alpha S on the grid, and the relative norm of its gradient in A (divided
    by the quadrature weights): zero at the exact maximum-entropy solution."""
    residual = problem.forward(a) - noisy
    chi2 = float(((residual / sigma) ** 2).sum())
    log_ratio = torch.log(a / model)
    entropy = float(problem.grid.integrate(a - model - a * log_ratio))
    kernel = problem.matrix / problem.grid.weights  # K(tau, w), without the weights
    gradient = kernel.T @ (residual / sigma**2) + alpha * log_ratio
    return chi2 / 2 - alpha * entropy, float(gradient.norm() / (alpha * log_ratio).norm())


def test_maxent_matches_ana_cont_or_the_difference_is_ana_conts(trapz):
    problem, truth, noisy, sigma, flat = _two_gaussians()
    reference = ana_cont.AnalyticContinuationProblem(
        im_axis=problem.tau.numpy(), re_axis=problem.grid.omega.numpy(),
        im_data=noisy.numpy(), kernel_mode="time_fermionic", beta=problem.beta,
    )  # fmt: skip
    theirs, _ = reference.solve(
        method="maxent_svd", optimizer="newton", alpha_determination="chi2kink",
        stdev=sigma.numpy(), model=flat.numpy(), interactive=False, verbose=False,
    )  # fmt: skip
    alpha = float(theirs.alpha)
    ours = ac.maxent(noisy, problem, sigma=sigma, default_model=flat, alpha=alpha)
    a_theirs = torch.as_tensor(theirs.A_opt, dtype=torch.float64).clamp_min(1e-300)
    distance = float(problem.grid.integrate((ours.A - a_theirs).abs()))
    if distance < 1e-3:
        return
    # otherwise: close, and ours is the better solution of the functional both minimise
    assert distance < 0.05
    q_ours, grad_ours = _objective(problem, ours.A, noisy, sigma, flat, alpha)
    q_theirs, grad_theirs = _objective(problem, a_theirs, noisy, sigma, flat, alpha)
    assert grad_ours < 1e-8
    assert grad_theirs > 1e-3
    assert q_ours < q_theirs
    # both are sensible reconstructions of the truth
    for a in (ours.A, a_theirs):
        assert float(problem.grid.integrate((a - truth).abs())) < 0.5
