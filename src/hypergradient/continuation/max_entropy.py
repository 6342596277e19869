"""Maximum entropy (Bryan's singular-space method) and a Tikhonov / NNLS baseline.

Both invert ``G = K_w A`` (see :class:`~hypergradient.continuation.kernels.Problem`) for a
spectrum ``A`` on the problem's real-frequency grid from a noisy ``G(tau)``:

- :func:`maxent` minimises ``Q = chi2 / 2 - alpha S`` with the misfit
  ``chi2 = ||(K_w A - G) / sigma||^2`` (or ``(K_w A - G)^T C^{-1} (K_w A - G)``) and the
  Shannon-Jaynes entropy ``S = integral (A - D - A ln(A / D)) dw`` relative to a default model
  ``D``, for each ``alpha`` of a scan, and picks ``alpha`` by one of four rules.  ``A > 0``
  always (``A = D exp(V u)``).
- :func:`tikhonov_nnls` minimises ``||(K_w A - G) / sigma||^2 + lam ||A||^2`` subject to
  ``A >= 0``: the linear baseline.

Examples:
    >>> import torch
    >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
    >>> from hypergradient.continuation.max_entropy import maxent, tikhonov_nnls
    >>> grid = uniform_grid(-6.0, 6.0, 41)
    >>> problem = Problem(tau=tau_grid(10.0, 21), beta=10.0, grid=grid, statistics="fermionic")
    >>> A_true = torch.exp(-0.5 * (grid.omega / 1.5) ** 2)
    >>> A_true = A_true / (grid.weights * A_true).sum()
    >>> G = problem.forward(A_true)
    >>> result = maxent(G, problem, sigma=1e-4, alpha="historic")
    >>> result.A.shape, bool((result.A > 0).all()), round(result.chi2)
    (torch.Size([41]), True, 21)
    >>> bool((tikhonov_nnls(G, problem, sigma=1e-4, lam=1e-2) >= 0).all())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._errors import HypergradientError
from .kernels import check_green

if TYPE_CHECKING:
    from .kernels import Problem

__all__ = ["MaxEntResult", "maxent", "tikhonov_nnls"]

_ALPHA_RULES = ("chi2kink", "classic", "bryan", "historic")


@dataclass(frozen=True)
class MaxEntResult:
    """What :func:`maxent` returns: the spectrum at the chosen ``alpha`` and the ``alpha`` scan.

    Attributes:
        A: ``(n_w,)`` the spectrum (a density on ``problem.grid``, ``A > 0``).
        alpha: the chosen regularisation weight (for ``"bryan"``: ``exp`` of the posterior mean
            of ``ln alpha``).
        chi2: ``chi2`` of ``A`` (in the noise-whitened data, i.e. ``N`` means a fit to the noise).
        entropy: ``S = integral (A - D - A ln(A / D)) dw <= 0`` of ``A``.
        alphas: ``(n_alpha,)`` the scanned ``alpha`` values, decreasing.
        chi2s: ``(n_alpha,)`` ``chi2`` at each scanned ``alpha`` (the curve ``"chi2kink"`` fits).
        entropies: ``(n_alpha,)`` ``S`` at each scanned ``alpha``.
        good_measurements: ``(n_alpha,)`` ``N_g = sum_i lambda_i / (alpha + lambda_i)`` at each
            ``alpha`` (``lambda_i`` the eigenvalues of ``diag(sqrt(w A)) B^T B diag(sqrt(w A))``,
            ``B`` the noise-whitened kernel without the quadrature weights ``w``).
        log_posterior: ``(n_alpha,)`` ``ln P(alpha | G)`` up to a constant, per unit of
            ``ln alpha`` (Jeffreys prior): ``sum_i ln(alpha / (alpha + lambda_i)) / 2 + alpha S
            - chi2 / 2``.
        iterations: Newton / Levenberg-Marquardt iterations of the whole call (scan and choice).
        converged: whether the solve that gave ``A`` reached ``stationarity <= tol`` (for
            ``"bryan"``: every solve of non-negligible posterior weight).
        stationarity: ``||alpha u + diag(s) U^T r|| / max(||alpha u||, ||diag(s) U^T r||)`` at
            the returned solve (``A = D exp(V u)``, ``B = U diag(s) V^T``, ``r`` the whitened
            residual): the relative violation of ``dQ/du = 0``.
        rule_satisfied: whether the ``alpha`` rule was met inside the scan (see :func:`maxent`).
        method: the ``alpha`` rule used.
        default_model: ``(n_w,)`` the default model ``D`` used.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.max_entropy import maxent
        >>> grid = uniform_grid(-6.0, 6.0, 41)
        >>> problem = Problem(tau=tau_grid(10.0, 21), beta=10.0, grid=grid, statistics="fermionic")
        >>> A_true = torch.exp(-0.5 * (grid.omega / 1.5) ** 2)
        >>> A_true = A_true / (grid.weights * A_true).sum()
        >>> result = maxent(problem.forward(A_true), problem, sigma=1e-4, alpha="historic")
        >>> result.method, result.converged, result.alphas.shape == result.chi2s.shape
        ('historic', True, True)
    """

    A: Tensor
    alpha: float
    chi2: float
    entropy: float
    alphas: Tensor
    chi2s: Tensor
    iterations: int
    entropies: Tensor
    good_measurements: Tensor
    log_posterior: Tensor
    converged: bool
    stationarity: float
    rule_satisfied: bool
    method: str
    default_model: Tensor


@dataclass(frozen=True)
class _SingularProblem:
    """The noise-whitened problem in the singular space of the whitened kernel.

    ``B = diag(1/sigma) W^T kernel = U diag(s) V^T`` (truncated), the data ``g = U^T G~``,
    ``m = weights * D``, and ``chi2_perp = ||G~ - U U^T G~||^2`` (the part of the data no
    spectrum can fit, a constant of ``chi2``)."""

    U: Tensor  # (n_data, r)
    s: Tensor  # (r,)
    V: Tensor  # (n_w, r)
    g: Tensor  # (r,)
    m: Tensor  # (n_w,)
    chi2_perp: float
    n_data: int


@dataclass(frozen=True)
class _Solve:
    alpha: float
    u: Tensor
    f: Tensor
    chi2: float
    entropy: float
    good_measurements: float
    log_posterior: float
    iterations: int
    converged: bool
    stationarity: float


def _fail(call: str, message: str) -> HypergradientError:
    return HypergradientError(f"{call}: {message}")


def _check_single(G: Tensor, call: str) -> None:
    if G.dim() != 1:
        raise _fail(
            call,
            f"G has shape {tuple(G.shape)}, expected one Green's function of shape (n_tau,); "
            "call once per spectrum (loop over the rows of a batch)",
        )


def _noise_scale(sigma, n_tau: int, like: Tensor, call: str) -> Tensor:
    """``sigma`` (a number or a ``(n_tau,)`` tensor) as a positive finite ``(n_tau,)`` tensor."""
    scale = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] not in (1, n_tau)):
        raise _fail(
            call,
            f"sigma has shape {tuple(scale.shape)}, expected a number or shape ({n_tau},) "
            "(one standard deviation per tau point); pass a scalar or a vector of len(tau)",
        )
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise _fail(
            call,
            f"sigma has a non-positive or non-finite entry (min {float(scale.min()):.3g}), "
            "expected standard deviations > 0; pass the noise level of G (e.g. 1e-3 * |G|.max())",
        )
    return scale.expand(n_tau)


def _whiten(G: Tensor, problem: Problem, sigma, covariance, call: str):
    """Checked ``(G~, K~)``: data and kernel (``K_w``) rotated into the covariance's eigenbasis
    and divided by the noise's standard deviation, so that ``chi2 = ||K~ A - G~||^2``."""
    check_green(G, problem, covariance, where=call)
    _check_single(G, call)
    K_w = problem.matrix
    G = G.to(K_w.dtype)
    if covariance is not None:
        if sigma is not None:
            raise _fail(
                call,
                "got both sigma and covariance, expected one of them; pass covariance for "
                "correlated noise or sigma for independent noise",
            )
        # chi2 = r^T C^{-1} r = ||diag(c)^{-1/2} W^T r||^2 with C = W diag(c) W^T
        variances, rotation = torch.linalg.eigh(covariance.to(K_w.dtype))
        scale = variances.sqrt()
        G, K_w = rotation.T @ G, rotation.T @ K_w
    elif sigma is not None:
        scale = _noise_scale(sigma, G.shape[0], G, call)
    else:
        raise _fail(
            call,
            "got neither sigma nor covariance, expected the noise level of G (chi2 and the "
            "choice of alpha depend on it); pass sigma= (a number or one per tau) or covariance=",
        )
    return G / scale, K_w / scale[:, None]


def _default_model(default_model, problem: Problem, like: Tensor, call: str) -> Tensor:
    weights = problem.grid.weights.to(like.dtype)
    if default_model is None:
        return torch.full_like(weights, 1.0 / float(weights.sum()))  # flat, integral 1
    D = torch.as_tensor(default_model, dtype=like.dtype, device=like.device)
    if D.shape != weights.shape:
        raise _fail(
            call,
            f"default_model has shape {tuple(D.shape)}, expected {tuple(weights.shape)} "
            "(one value per grid frequency); evaluate it on problem.grid.omega",
        )
    if not bool(torch.isfinite(D).all()) or not bool((D > 0).all()):
        raise _fail(
            call,
            f"default_model has a non-positive or non-finite entry (min {float(D.min()):.3g}), "
            "expected D > 0 everywhere (ln(A / D) must exist); add a small floor, e.g. "
            "D.clamp(min=1e-8 * D.max())",
        )
    return D


def _singular_problem(G_w: Tensor, K_w: Tensor, weights: Tensor, D: Tensor, cutoff: float):
    # The stationarity condition alpha w ln(A/D) = -K~^T r puts ln(A/D) in the row space of the
    # whitened kernel WITHOUT the quadrature weights (K~ = B diag(w)), so B is decomposed,
    # not K_w: then A = D exp(V u) holds the exact maximiser for any grid.
    B = K_w / weights
    U, s, Vh = torch.linalg.svd(B, full_matrices=False)
    keep = s > cutoff * s[0]
    U, s, V = U[:, keep], s[keep], Vh[keep].T
    g = U.T @ G_w
    chi2_perp = float((G_w - U @ g).square().sum())
    return _SingularProblem(U, s, V, g, weights * D, chi2_perp, G_w.shape[0])


def _objective(sp: _SingularProblem, alpha: float, u: Tensor):
    """``(Q, chi2, S, f, fit)`` at ``u``; ``f = m exp(V u)`` is ``weights * A``."""
    log_ratio = sp.V @ u
    f = sp.m * torch.exp(log_ratio)
    fit = sp.s * (sp.V.T @ f) - sp.g  # U^T (B f - G~)
    chi2 = float(fit.square().sum()) + sp.chi2_perp
    entropy = float((f - sp.m - f * log_ratio).sum())
    return 0.5 * chi2 - alpha * entropy, chi2, entropy, f, fit


def _curvature(sp: _SingularProblem, f: Tensor) -> Tensor:
    """``T = V^T diag(f) V`` (r, r)."""
    return sp.V.T @ (f[:, None] * sp.V)


def _stationarity(alpha: float, u: Tensor, data_force: Tensor) -> float:
    prior_force = alpha * u
    scale = max(float(prior_force.norm()), float(data_force.norm()))
    return 0.0 if scale == 0.0 else float((prior_force + data_force).norm()) / scale


def _newton_system(sp: _SingularProblem, f: Tensor):
    """Symmetric form of the Newton matrix ``alpha I + diag(s)^2 T`` (``T = V^T diag(f) V``).

    With ``T = P diag(t) P^T`` and ``T^{1/2} diag(s)^2 T^{1/2} = R diag(gamma) R^T`` the step
    ``((alpha + mu) I + diag(s)^2 T) du = -F`` is ``du = -T^{-1/2} R (R^T T^{1/2} F) / (alpha +
    mu + gamma)``: two symmetric eigendecompositions (backward stable, unlike an LU of the
    non-symmetric matrix whose condition number reaches ``s_max^2 / s_min^2``), reused for every
    ``mu``.  ``gamma`` are also the eigenvalues ``lambda_i`` of ``diag(s) T diag(s)``."""
    t, P = torch.linalg.eigh(_curvature(sp, f))
    t = t.clamp(min=torch.finfo(t.dtype).eps * float(t.max()))
    root = (P * t.sqrt()) @ P.T
    inverse_root = (P / t.sqrt()) @ P.T
    scaled = sp.s[:, None] * root
    gamma, R = torch.linalg.eigh(scaled.T @ scaled)
    return root, inverse_root, gamma.clamp(min=0), R


def _solve(sp: _SingularProblem, alpha: float, u: Tensor, max_iter: int, tol: float) -> _Solve:
    """Levenberg-Marquardt on ``F(u) = alpha u + diag(s) U^T r = 0`` (Bryan 1990).

    ``grad_u Q = T F`` and the Gauss-Newton Hessian is ``H = T (alpha I + diag(s)^2 T)``; the
    damped step ``((alpha + mu) I + diag(s)^2 T) du = -F`` is a descent direction of ``Q`` for
    every ``mu >= 0`` (``T ((alpha + mu) I + diag(s)^2 T)^{-1}`` is symmetric positive
    definite).  A step is kept when ``Q`` decreases; ``mu`` follows the gain ratio ``rho``
    (actual / predicted decrease of ``Q``; Nielsen's rule, as in Madsen, Nielsen & Tingleff,
    "Methods for non-linear least squares problems", 2004)."""
    Q, chi2, entropy, f, fit = _objective(sp, alpha, u)
    mu, growth, iterations, converged = 0.0, 2.0, 0, False
    data_force = sp.s * fit
    stationarity = _stationarity(alpha, u, data_force)
    eps = torch.finfo(u.dtype).eps
    while True:
        if stationarity <= tol:
            converged = True
            break
        if iterations >= max_iter:
            break
        iterations += 1
        F = alpha * u + data_force
        root, inverse_root, gamma, R = _newton_system(sp, f)
        projected = R.T @ (root @ F)
        gradient = root @ (root @ F)  # T F
        while True:
            step = -(inverse_root @ (R @ (projected / (alpha + mu + gamma))))
            # the quadratic model's decrease: -(g.du + du^T H du / 2), H = alpha T + T M T
            Tstep = root @ (root @ step)
            model = -(
                float(gradient @ step)
                + 0.5 * (alpha * float(step @ Tstep) + float((sp.s * Tstep).square().sum()))
            )
            trial = _objective(sp, alpha, u + step)
            trial_force = sp.s * trial[4]
            trial_stationarity = _stationarity(alpha, u + step, trial_force)
            gain = (Q - trial[0]) / model if model > 0 else -1.0
            # near the solution Q changes by less than its rounding error: then the smaller
            # stationarity residual decides
            slack = 64 * eps * abs(Q)
            if math.isfinite(trial[0]) and (
                gain > 0 or (trial[0] <= Q + slack and trial_stationarity < stationarity)
            ):
                mu = mu * max(1.0 / 3.0, 1.0 - (2.0 * min(gain, 1.0) - 1.0) ** 3)
                mu = 0.0 if mu < 1e-3 * alpha else mu
                growth = 2.0
                break
            mu = max(mu * growth, alpha)
            growth *= 2.0
            if mu > 1e40 * alpha:  # no step reduces Q: stuck at rounding level
                step = None
                break
        if step is None:
            break
        u = u + step
        Q, chi2, entropy, f, fit = trial
        data_force, stationarity = trial_force, trial_stationarity
    gamma = _newton_system(sp, f)[2]
    good = float((gamma / (alpha + gamma)).sum())
    log_post = 0.5 * float(torch.log(alpha / (alpha + gamma)).sum()) + alpha * entropy - 0.5 * chi2
    return _Solve(
        alpha, u, f, chi2, entropy, good, log_post, iterations, converged, stationarity
    )  # fmt: skip


def _default_alphas(sp: _SingularProblem, like: Tensor) -> Tensor:
    """60 values from ``100 lambda_max`` down to ``1e-14 lambda_max`` (``lambda`` at ``A = D``):
    from the default model (``N_g ~ 0``) to a fit of every singular component."""
    lam = torch.linalg.eigvalsh(sp.s[:, None] * _curvature(sp, sp.m) * sp.s[None, :])
    top = math.log10(float(lam.max())) + 2.0
    return torch.logspace(top, top - 16.0, 60, dtype=like.dtype, device=like.device)


def _find_root(sp, lower: _Solve, upper: _Solve, residual, max_iter, tol, count):
    """Illinois (modified regula falsi) in ``ln alpha`` for ``residual(solve) = 0`` between two
    scanned solves of opposite sign; each trial warm-starts from the nearer bracket end."""
    a, b = lower, upper
    ra, rb = residual(a), residual(b)
    side = 0
    best = a if abs(ra) < abs(rb) else b
    for _ in range(60):
        xa, xb = math.log(a.alpha), math.log(b.alpha)
        x = (xa * rb - xb * ra) / (rb - ra)
        near = a if abs(x - xa) < abs(x - xb) else b
        trial = _solve(sp, math.exp(x), near.u, max_iter, tol)
        count[0] += trial.iterations
        rt = residual(trial)
        if abs(rt) < abs(residual(best)):
            best = trial
        if abs(rt) <= 1e-8 or abs(xb - xa) <= 1e-12:
            break
        if (rt > 0) == (rb > 0):
            b, rb = trial, rt
            if side == -1:
                ra /= 2.0
            side = -1
        else:
            a, ra = trial, rt
            if side == 1:
                rb /= 2.0
            side = 1
    return best


def _select_by_root(sp, scan, residual, max_iter, tol, count) -> tuple[_Solve, bool]:
    """The solve where ``residual`` changes sign (refined by :func:`_find_root`) and True; without
    a sign change in the scan, the converged scanned solve of smallest ``|residual|`` and False."""
    values = [residual(solve) for solve in scan]
    for left, right, vl, vr in zip(scan, scan[1:], values, values[1:]):
        if vl == 0.0:
            return left, True
        if (vl > 0) != (vr > 0):
            return _find_root(sp, left, right, residual, max_iter, tol, count), True
    candidates = [i for i, solve in enumerate(scan) if solve.converged] or list(range(len(scan)))
    return scan[min(candidates, key=lambda i: abs(values[i]))], False


def _scan(sp: _SingularProblem, alphas: list[float], max_iter: int, tol: float, count):
    """Solves along decreasing ``alphas``, each warm-started from the previous one.

    Stops early once nothing more is to be learnt: two solves in a row that do not converge
    (``alpha`` so small that the fit is at the rounding level), or ``chi2`` on its low plateau
    (below 1/10 of its first value and within 1 % of ``chi2`` at ``10 alpha``)."""
    scan: list[_Solve] = []
    u = torch.zeros_like(sp.s)
    for value in alphas:
        solve = _solve(sp, value, u, max_iter, tol)
        count[0] += solve.iterations
        scan.append(solve)
        u = solve.u
        if len(scan) < 5:
            continue
        if not solve.converged and not scan[-2].converged:
            break
        above = [old for old in scan if old.alpha >= 10.0 * value]
        if (
            above
            and solve.chi2 < 0.1 * scan[0].chi2
            and above[-1].chi2 - solve.chi2 < 0.01 * solve.chi2
        ):
            break
    return scan


def _fit_kink(log_alpha: Tensor, log_chi2: Tensor) -> tuple[float, float]:
    """Least-squares fit of ``y = a + b / (1 + exp(-d (x - c)))`` (``x = log10 alpha``,
    ``y = log10 chi2``, Bergeron & Tremblay 2016) by Levenberg-Marquardt on the four
    parameters; returns ``(c, d)``.  Starts from the data's range (``a``, ``b``), the point
    where it crosses half way (``c``) and its steepest slope (``d = 4 slope / b``)."""
    order = torch.argsort(log_alpha)
    x, y = log_alpha[order], log_chi2[order]
    span = max(float(y.max() - y.min()), 1e-12)
    half = float(y.min()) + 0.5 * span
    crossing = int(torch.nonzero(y >= half)[0]) if bool((y >= half).any()) else len(y) // 2
    slope = float(((y[1:] - y[:-1]) / (x[1:] - x[:-1]).clamp(min=1e-12)).max())
    params = torch.tensor(
        [float(y.min()), span, float(x[crossing]), max(4.0 * slope / span, 1e-3)],
        dtype=x.dtype,
    )

    def residual_and_jacobian(p):
        a, b, c, d = p.tolist()
        sig = torch.sigmoid(d * (x - c))
        dsig = sig * (1.0 - sig)
        jacobian = torch.stack([torch.ones_like(x), sig, -b * d * dsig, b * (x - c) * dsig], 1)
        return a + b * sig - y, jacobian

    residual, jacobian = residual_and_jacobian(params)
    cost, mu = float(residual.square().sum()), 1e-3
    for _ in range(500):
        normal = jacobian.T @ jacobian
        damped = normal + mu * torch.diag(normal.diagonal().clamp(min=1e-12))
        trial_params = params - torch.linalg.solve(damped, jacobian.T @ residual)
        trial_residual, trial_jacobian = residual_and_jacobian(trial_params)
        trial_cost = float(trial_residual.square().sum())
        if math.isfinite(trial_cost) and trial_cost <= cost:
            done = cost - trial_cost <= 1e-14 * max(cost, 1e-300)
            params, residual, jacobian = trial_params, trial_residual, trial_jacobian
            cost = trial_cost
            mu = max(mu / 10.0, 1e-12)
            if done:
                break
        else:
            mu *= 10.0
            if mu > 1e12:
                break
    return float(params[2]), float(params[3])


def maxent(
    G: Tensor,
    problem: Problem,
    *,
    sigma: float | Tensor | None = None,
    covariance: Tensor | None = None,
    default_model: Tensor | None = None,
    alpha: str | float = "chi2kink",
    alphas: Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-8,
    svd_cutoff: float = 1e-12,
    kink_position: float = 2.5,
) -> MaxEntResult:
    """Maximum-entropy spectrum of one Green's function by Bryan's singular-space method.

    For each ``alpha`` minimises ``Q(A) = chi2 / 2 - alpha S`` over ``A > 0`` with

    - ``chi2 = ||(K_w A - G) / sigma||^2``, or ``(K_w A - G)^T C^{-1} (K_w A - G)`` with
      ``covariance=C``: then ``G`` and ``K_w`` are first rotated into ``C``'s eigenbasis
      (``C = W diag(c) W^T``, data ``W^T G / sqrt(c)``), which makes the noise independent;
    - ``S = sum_j w_j (A_j - D_j - A_j ln(A_j / D_j))`` (``w`` the grid's weights, ``D`` the
      default model; flat with integral 1 when ``None``).

    The minimiser satisfies ``alpha ln(A / D) = -B^T r`` with ``B`` the whitened kernel without
    the quadrature weights and ``r`` the whitened residual, so it lies in the span of ``B``'s
    right singular vectors: with ``B = U diag(s) V^T`` (singular values above
    ``svd_cutoff * s_max``, ``r`` of them) the search is over ``A = D exp(V u)``,
    ``u`` in ``R^r``, by Levenberg-Marquardt on ``alpha u + diag(s) U^T r = 0`` (Newton matrix
    ``alpha I + diag(s)^2 V^T diag(w A) V``; ``grad_u Q = V^T diag(w A) V (alpha u + diag(s)
    U^T r)``), warm-started along a decreasing ``alpha`` scan.  ``alpha`` is then chosen by

    - ``"chi2kink"`` (default; Bergeron & Tremblay, PRE 94, 023303, 2016): fit
      ``log10 chi2 = a + b / (1 + exp(-d (log10 alpha - c)))`` to the scan and take
      ``log10 alpha = c - kink_position / d``, where the curve leaves the noise-fitting plateau;
    - ``"classic"``: ``-2 alpha S = N_g``, the number of good measurements
      ``N_g = sum_i lambda_i / (alpha + lambda_i)`` (``lambda_i`` the eigenvalues of
      ``diag(s) V^T diag(w A) V diag(s)``);
    - ``"bryan"``: the average of ``A(alpha)`` over the scan weighted by the posterior
      ``P(alpha | G) ~ prod_i (alpha / (alpha + lambda_i))^(1/2) exp(alpha S - chi2 / 2) / alpha``
      (Jeffreys prior), trapezoid rule in ``ln alpha``;
    - ``"historic"``: ``chi2 = N`` (``N = len(tau)``);
    - a number: that ``alpha`` (the scan still runs: it supplies the warm start and the
      curves).

    The two root conditions are solved to ``1e-8`` (relative) by regula falsi in ``ln alpha``
    between the scanned values that bracket them.  ``result.rule_satisfied`` is False when the
    rule could not be met inside the scan: no bracket (then the converged scanned ``alpha``
    closest to the condition is used; e.g. ``"historic"`` when positivity keeps ``chi2`` above
    ``N``: ``sigma`` is too small or the spectrum has weight outside the grid), a kink outside
    the scan (clamped to its ends), or a posterior with weight at the scan's ends.

    The scan stops early once nothing more is to be learnt: two solves in a row that do not
    converge (``alpha`` so small that the fit is at the level of rounding), or ``chi2`` on its
    low plateau (below 1/10 of its first value and within 1 % of ``chi2`` at ``10 alpha``);
    ``result.alphas`` holds the values actually solved.

    ``A`` is not renormalised: for fermions the data fix ``integral A = G(0) + G(beta)`` to
    within the noise.  Everything is computed in the problem's dtype (float64 recommended: the
    kernel's singular values span many orders of magnitude).

    Args:
        G: ``(n_tau,)`` the Green's function on ``problem.tau`` (one spectrum per call).
        problem: the :class:`~hypergradient.continuation.kernels.Problem`.
        sigma: noise standard deviation, a number or ``(n_tau,)``; or give ``covariance``.
        covariance: ``(n_tau, n_tau)`` noise covariance (symmetric positive definite).
        default_model: ``(n_w,)`` ``D > 0`` on ``problem.grid``; flat, integral 1, when ``None``.
        alpha: ``"chi2kink"``, ``"classic"``, ``"bryan"``, ``"historic"`` or a positive number.
        alphas: the scan (any order; used decreasing); default 60 values, log-spaced from
            ``100 lambda_max`` down over 16 decades (``lambda_max`` at ``A = D``).
        max_iter: Levenberg-Marquardt iterations per ``alpha``.
        tol: stationarity tolerance, ``||alpha u + diag(s) U^T r|| <= tol * max(||alpha u||,
            ||diag(s) U^T r||)``.
        svd_cutoff: singular values kept, relative to the largest.
        kink_position: ``"chi2kink"``'s offset from the sigmoid's centre, in units of ``1/d``.

    Returns:
        :class:`MaxEntResult`.

    Cost: one SVD of the ``(n_tau, n_w)`` kernel, ``O(n_tau^2 n_w)``, then per iteration
    ``O(n_w r^2 + r^3)``; a few iterations per ``alpha`` along the warm-started scan while the
    fit is far from the noise, tens to a couple of hundred where it starts to fit the noise.
    About 0.1-0.5 s for ``n_tau = 101``, ``n_w = 401``, ``beta = 20`` on one CPU thread.

    Raises:
        HypergradientError: bad ``G``, ``covariance`` or ``problem`` (from ``check_green``), bad
            ``sigma``, ``default_model``, ``alpha`` or ``alphas``, or both/neither of ``sigma``
            and ``covariance``.

    Examples:
        A Gaussian spectrum from nearly noiseless data:

        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.max_entropy import maxent
        >>> grid = uniform_grid(-6.0, 6.0, 41)
        >>> problem = Problem(tau=tau_grid(10.0, 21), beta=10.0, grid=grid, statistics="fermionic")
        >>> A_true = torch.exp(-0.5 * (grid.omega / 1.5) ** 2)
        >>> A_true = A_true / (grid.weights * A_true).sum()
        >>> result = maxent(problem.forward(A_true), problem, sigma=1e-5, alpha="historic")
        >>> l1 = float((grid.weights * (result.A - A_true).abs()).sum())
        >>> l1 < 0.05, round(result.chi2), round(float((grid.weights * result.A).sum()), 3)
        (True, 21, 1.0)
    """
    call = "maxent"
    if not (isinstance(max_iter, int) and max_iter >= 1 and tol > 0 and 0 <= svd_cutoff < 1):
        raise _fail(
            call,
            f"max_iter={max_iter!r}, tol={tol!r}, svd_cutoff={svd_cutoff!r}, expected an integer "
            ">= 1, a number > 0 and a number in [0, 1); pass e.g. max_iter=200, tol=1e-8, "
            "svd_cutoff=1e-12",
        )
    G_w, K_w = _whiten(G, problem, sigma, covariance, call)
    weights = problem.grid.weights.to(K_w.dtype)
    D = _default_model(default_model, problem, K_w, call)
    fixed_alpha = None
    if isinstance(alpha, str):
        if alpha not in _ALPHA_RULES:
            raise _fail(
                call,
                f"alpha={alpha!r} is not a known rule, expected one of {_ALPHA_RULES} or a "
                "positive number; pick one of those",
            )
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0:
        fixed_alpha = float(alpha)
    else:
        raise _fail(
            call,
            f"alpha={alpha!r}, expected one of {_ALPHA_RULES} or a positive number; "
            "pass a rule name or a value > 0",
        )
    sp = _singular_problem(G_w, K_w, weights, D, svd_cutoff)
    if alphas is None:
        scan_alphas = _default_alphas(sp, K_w)
    else:
        scan_alphas = torch.as_tensor(alphas, dtype=K_w.dtype).flatten()
        if scan_alphas.numel() < (5 if alpha == "chi2kink" else 1) or not bool(
            (scan_alphas > 0).all() & torch.isfinite(scan_alphas).all()
        ):
            raise _fail(
                call,
                f"alphas has {scan_alphas.numel()} values "
                f"({scan_alphas.tolist()[:3]}...), expected finite values > 0 (at least 5 for "
                "'chi2kink'); pass e.g. torch.logspace(6, -4, 40)",
            )
        scan_alphas = scan_alphas.sort(descending=True).values
    count = [0]
    scan = _scan(sp, scan_alphas.tolist(), max_iter, tol, count)
    scan_alphas = scan_alphas[: len(scan)]

    def nearest(value: float) -> _Solve:
        return min(scan, key=lambda s: abs(math.log(s.alpha / value)))

    def solve_at(value: float) -> _Solve:
        solve = _solve(sp, value, nearest(value).u, max_iter, tol)
        count[0] += solve.iterations
        return solve

    satisfied = True
    if fixed_alpha is not None:
        chosen = solve_at(fixed_alpha)
    elif alpha == "historic":
        chosen, satisfied = _select_by_root(
            sp, scan, lambda s: s.chi2 / sp.n_data - 1.0, max_iter, tol, count
        )  # fmt: skip
    elif alpha == "classic":
        chosen, satisfied = _select_by_root(
            sp, scan, lambda s: -2.0 * s.alpha * s.entropy / s.good_measurements - 1.0,
            max_iter, tol, count,
        )  # fmt: skip
    elif alpha == "chi2kink":
        if len(scan) < 5:
            raise _fail(
                call,
                f"the alpha scan has {len(scan)} solves, expected at least 5 to fit the chi2 "
                "kink; pass more alphas (e.g. torch.logspace(6, -4, 40))",
            )
        log_chi2 = torch.log10(torch.tensor([s.chi2 for s in scan], dtype=K_w.dtype))
        centre, slope = _fit_kink(torch.log10(scan_alphas), log_chi2)
        value = 10.0 ** (centre - kink_position / abs(slope))
        low, high = float(scan_alphas[-1]), float(scan_alphas[0])
        satisfied = low <= value <= high
        chosen = solve_at(min(max(value, low), high))
    else:  # bryan
        log_post = torch.tensor([s.log_posterior for s in scan], dtype=K_w.dtype)
        x = torch.log(scan_alphas)
        # trapezoid weights in ln alpha (the scan is decreasing, so |dx|)
        trap = torch.ones_like(x)
        if len(scan) > 1:
            dx = (x[:-1] - x[1:]).abs()
            trap = torch.zeros_like(x)
            trap[:-1] += 0.5 * dx
            trap[1:] += 0.5 * dx
        weights_alpha = torch.softmax(log_post + torch.log(trap), dim=0)
        f = sum(p * s.f for p, s in zip(weights_alpha.tolist(), scan))
        relevant = [s for p, s in zip(weights_alpha.tolist(), scan) if p > 1e-6]
        # the posterior's mass at the scan's ends means the scan does not cover it
        satisfied = float(weights_alpha[0] + weights_alpha[-1]) < 1e-3
        # the averaged spectrum's own chi2 and S (it is not a stationary point of any Q)
        log_ratio = torch.log(f / sp.m)
        fit = sp.s * (sp.V.T @ f) - sp.g
        chosen = _Solve(
            alpha=math.exp(float((weights_alpha * x).sum())), u=sp.V.T @ log_ratio, f=f,
            chi2=float(fit.square().sum()) + sp.chi2_perp,
            entropy=float((f - sp.m - f * log_ratio).sum()), good_measurements=float("nan"),
            log_posterior=float("nan"), iterations=0,
            converged=all(s.converged for s in relevant),
            stationarity=max(s.stationarity for s in relevant),
        )  # fmt: skip
    return MaxEntResult(
        A=chosen.f / weights,
        alpha=chosen.alpha,
        chi2=chosen.chi2,
        entropy=chosen.entropy,
        alphas=scan_alphas,
        chi2s=torch.tensor([s.chi2 for s in scan], dtype=K_w.dtype),
        iterations=count[0],
        entropies=torch.tensor([s.entropy for s in scan], dtype=K_w.dtype),
        good_measurements=torch.tensor([s.good_measurements for s in scan], dtype=K_w.dtype),
        log_posterior=torch.tensor([s.log_posterior for s in scan], dtype=K_w.dtype),
        converged=chosen.converged,
        stationarity=chosen.stationarity,
        rule_satisfied=satisfied,
        method="fixed" if fixed_alpha is not None else alpha,
        default_model=D,
    )


def tikhonov_nnls(
    G: Tensor,
    problem: Problem,
    *,
    sigma: float | Tensor | None = None,
    lam: float,
    positivity: bool = True,
) -> Tensor:
    """Tikhonov-regularised (non-negative) least squares: the linear baseline.

    Solves ``min_A ||(K_w A - G) / sigma||^2 + lam ||A||^2`` (``||A||^2 = sum_j A_j^2``, plain
    sum over the grid points), i.e. with ``K~ = K_w / sigma``, ``G~ = G / sigma`` the normal
    equations ``(K~^T K~ + lam I) A = K~^T G~``:

    - ``positivity=True``: subject to ``A >= 0``, by block principal pivoting on the normal
      equations (Kim & Park, SIAM J. Sci. Comput. 33, 3261, 2011): an exact active-set method
      (no tolerance: the KKT conditions ``A_j >= 0``, ``(grad)_j >= 0``,
      ``A_j (grad)_j = 0`` hold to rounding), starting from every ``A_j`` free, so that when no
      constraint is active the answer is the plain normal-equations solution (one Cholesky
      solve).  Needs ``lam > 0``.
    - ``positivity=False``: least squares on the stacked system
      ``[K~; sqrt(lam) I] A = [G~; 0]`` (QR; ``lam = 0`` gives a least-squares solution of the
      rank-deficient kernel).

    ``A`` is not renormalised: its integral ``(problem.grid.weights * A).sum()`` is what the
    data and ``lam`` give (below 1 for a strong ``lam``); compute it to report it.

    Args:
        G: ``(n_tau,)`` the Green's function on ``problem.tau`` (one spectrum per call).
        problem: the :class:`~hypergradient.continuation.kernels.Problem`.
        sigma: noise standard deviation, a number or ``(n_tau,)``; ``None`` means 1.
        lam: the Tikhonov weight, ``> 0`` with ``positivity``, ``>= 0`` without.
        positivity: constrain ``A >= 0``.

    Returns:
        ``(n_w,)`` the spectrum on ``problem.grid``, in the problem's dtype.

    Cost: ``O(n_tau n_w^2)`` for ``K~^T K~``, then ``O(|F|^3)`` per pivoting step (``|F|`` the
    free variables), typically a handful of steps; ``O((n_tau + n_w) n_w^2)`` without
    positivity.

    Raises:
        HypergradientError: bad ``G`` or ``problem`` (from ``check_green``), bad ``sigma``,
            ``lam < 0`` (or ``lam == 0`` with ``positivity``).

    Examples:
        With a strong ``lam`` no constraint is active and the normal equations give the same:

        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.max_entropy import tikhonov_nnls
        >>> grid = uniform_grid(-6.0, 6.0, 41)
        >>> problem = Problem(tau=tau_grid(10.0, 21), beta=10.0, grid=grid, statistics="fermionic")
        >>> A_true = torch.exp(-0.5 * (grid.omega / 1.5) ** 2)
        >>> G = problem.forward(A_true / (grid.weights * A_true).sum())
        >>> A = tikhonov_nnls(G, problem, lam=0.1)
        >>> K = problem.matrix
        >>> direct = torch.linalg.solve(K.T @ K + 0.1 * torch.eye(41, dtype=K.dtype), K.T @ G)
        >>> A.shape, bool((A >= 0).all()), bool(torch.allclose(A, direct, atol=1e-10))
        (torch.Size([41]), True, True)
    """
    call = "tikhonov_nnls"
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam >= 0:
        raise _fail(
            call,
            f"lam={lam!r}, expected a number >= 0; pass the Tikhonov weight, e.g. lam=1e-3",
        )
    check_green(G, problem, where=call)
    _check_single(G, call)
    K_w = problem.matrix
    G = G.to(K_w.dtype)
    if sigma is not None:
        scale = _noise_scale(sigma, G.shape[0], G, call)
        G, K_w = G / scale, K_w / scale[:, None]
    n_w = K_w.shape[1]
    if not positivity:
        stacked = torch.cat([K_w, math.sqrt(lam) * torch.eye(n_w, dtype=K_w.dtype)])
        rhs = torch.cat([G, torch.zeros(n_w, dtype=K_w.dtype)])
        return torch.linalg.lstsq(stacked, rhs[:, None]).solution[:, 0]
    if lam <= 0:
        raise _fail(
            call,
            f"lam={lam!r} with positivity=True, expected lam > 0 (without it the kernel's "
            "null space leaves the non-negative solution undetermined); pass e.g. lam=1e-6",
        )
    hessian = K_w.T @ K_w + lam * torch.eye(n_w, dtype=K_w.dtype)
    solution = _nnls_block_pivoting(hessian, K_w.T @ G)
    if solution is None:  # rounding made the pivoting cycle: the slower, robust method
        solution = _nnls_lawson_hanson(K_w, G, lam, call)
    return solution


def _nnls_block_pivoting(hessian: Tensor, linear: Tensor) -> Tensor | None:
    """``argmin_{x >= 0} x^T H x / 2 - c^T x`` for symmetric positive definite ``H``.

    Block principal pivoting (Kim & Park, SIAM J. Sci. Comput. 33, 3261, 2011): split the
    variables into free ones (``x_F = H_FF^{-1} c_F``) and ones held at 0 (dual
    ``y = (H x - c)_G``); the KKT conditions are ``x_F >= 0``, ``y_G >= 0``.  All infeasible
    variables change sides at once; when that does not reduce their number three times in a
    row, only the last one does (which guarantees termination).  Starts with every variable
    free, so an inactive constraint set costs one Cholesky solve.  Each step costs
    ``O(|F|^3)``; typically a handful of steps.  Returns None when ``H_FF`` is not positive
    definite in floating point or rounding makes the exchanges cycle (an ill-conditioned
    ``H``, i.e. a small ``lam``)."""
    n = linear.shape[0]
    free = torch.ones(n, dtype=torch.bool, device=linear.device)
    best, chances = n + 1, 3
    scale = float(linear.abs().max()) or 1.0
    for _ in range(3 * n + 10):
        x = torch.zeros_like(linear)
        if bool(free.any()):
            block = hessian[free][:, free]
            factor, info = torch.linalg.cholesky_ex(block)
            if int(info) != 0:
                return None
            x[free] = torch.cholesky_solve(linear[free][:, None], factor)[:, 0]
        dual = hessian @ x - linear
        tolerance_x = 1e-13 * (float(x.abs().max()) or 1.0)
        tolerance_y = 1e-13 * scale
        infeasible = (free & (x < -tolerance_x)) | (~free & (dual < -tolerance_y))
        count = int(infeasible.sum())
        if count == 0:
            return x.clamp(min=0)
        if count < best:
            best, chances = count, 3
            free = free ^ infeasible
        elif chances > 0:
            chances -= 1
            free = free ^ infeasible
        else:
            last = int(torch.nonzero(infeasible)[-1])
            free[last] = ~free[last]
    return None


def _nnls_lawson_hanson(K: Tensor, data: Tensor, lam: float, call: str) -> Tensor:
    """``argmin_{x >= 0} ||K x - data||^2 + lam ||x||^2`` by Lawson & Hanson's active-set
    algorithm ("Solving least squares problems", 1974, ch. 23) on the stacked system
    ``[K; sqrt(lam) I]``, each passive-set solve by QR least squares (no normal equations, so
    it copes with the condition numbers that defeat :func:`_nnls_block_pivoting`).  One
    variable enters per outer step: ``O(n)`` steps of ``O((n_tau + k) k^2)``."""
    n = K.shape[1]
    root = math.sqrt(lam)
    passive = torch.zeros(n, dtype=torch.bool, device=K.device)
    x = torch.zeros(n, dtype=K.dtype, device=K.device)

    def passive_solution(mask: Tensor) -> Tensor:
        columns = K[:, mask]
        k = columns.shape[1]
        stacked = torch.cat([columns, root * torch.eye(k, dtype=K.dtype, device=K.device)])
        rhs = torch.cat([data, torch.zeros(k, dtype=K.dtype, device=K.device)])
        z = torch.zeros_like(x)
        z[mask] = torch.linalg.lstsq(stacked, rhs[:, None]).solution[:, 0]
        return z

    scale = float((K.T @ data).abs().max()) or 1.0
    tolerance = 10 * max(K.shape[0] + n, n) * torch.finfo(K.dtype).eps * scale
    for _ in range(3 * n):
        gradient = K.T @ (data - K @ x) - lam * x  # minus the gradient / 2
        candidates = torch.where(passive, torch.full_like(gradient, -math.inf), gradient)
        if float(candidates.max()) <= tolerance:
            return x
        passive[int(candidates.argmax())] = True
        z = passive_solution(passive)
        while bool((z[passive] <= 0).any()):
            blocking = passive & (z <= 0)
            step = float((x[blocking] / (x[blocking] - z[blocking])).min())
            x = x + step * (z - x)
            passive &= x > 0
            x = torch.where(passive, x, torch.zeros_like(x))
            z = passive_solution(passive)
        x = z
    raise _fail(
        call,
        f"the non-negative least-squares solve did not finish in {3 * n} steps, expected it "
        "to; increase lam (a better conditioned problem) or pass positivity=False",
    )
