r"""The learned unrolled optimizer of Huang & Yang (PRB 105, 075112, 2022) for continuation.

The ill-posed inversion of :math:`G = K_w A` is replaced by a sequence of well-conditioned
convex surrogate problems: a fixed number of iterations of ADMM for

.. math::

    \min_{A \in C}\ \tfrac12 \lVert W (K_w A - G) \rVert^2, \qquad
    C = \{A \ge 0,\ \textstyle\sum_j w_j A_j = 1\}, \qquad W = \mathrm{diag}(1/\sigma),

each iteration with its own learned parameters (penalty :math:`\rho_k`, relaxation, dual step,
a small smoothing filter), trained on synthetic spectra by backpropagation through the
iterations so that the *last iterate* is close to the true spectrum in L1.

* :class:`LearnedContinuation` -- the unrolled iteration, an ``nn.Module`` with a few
  parameters per iteration; every iterate is :math:`\ge 0` and normalised.
* :func:`meta_train` -- Adam on the L1 (or L2) error of :math:`A` against the true spectrum
  (never the residual in :math:`G`), plain reverse mode through the unroll or truncated to the
  last ``k`` iterations, keeping the parameters of the best validation L1.
* :func:`continue_spectrum` -- ``G(tau), tau, beta -> (A(w), grid)`` with a trained model.

Examples:
    >>> import torch
    >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
    >>> from hypergradient.continuation.spectra import make_dataset
    >>> from hypergradient.continuation.unrolled_solver import LearnedContinuation
    >>> problem = Problem(tau_grid(10.0, 21), 10.0, uniform_grid(-6.0, 6.0, 61))
    >>> data = make_dataset(problem, ("gaussians",), 4, 1e-3, seed=0)
    >>> model = LearnedContinuation(problem, n_iter=5)
    >>> A = model(data.G_noisy, data.sigma)
    >>> A.shape, bool((A >= 0).all()), model.num_parameters()
    (torch.Size([4, 61]), True, 40)
    >>> bool(torch.allclose(problem.grid.integrate(A), torch.ones(4, dtype=A.dtype)))
    True
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import HypergradientError
from ..estimators import AbstractUnrolledSystem, FullBackprop, TruncatedBackprop
from .kernels import Grid, Problem, check_green
from .spectra import SpectralDataset

__all__ = ["ContinuationSystem", "LearnedContinuation", "continue_spectrum", "meta_train"]

_ESTIMATORS = ("full", "truncated")

_LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class _Data:
    """The fixed part of the A-update for a batch: ``M = W K diag(sqrt(w)) = U diag(s) V^T``
    per spectrum (``V`` shared by the batch when each spectrum has one ``sigma``)."""

    c: Tensor  # (..., r): diag(s) U^T W G
    lam: Tensor  # (..., r): s^2, the eigenvalues of M^T M
    V: Tensor  # (n_w, r) shared, or (..., n_w, r)
    shared: bool


class LearnedContinuation(nn.Module):
    r"""ADMM for the positive, normalised least-squares fit, unrolled with learned parameters.

    **The surrogate problems.** With the whitening :math:`W = \mathrm{diag}(1/\sigma)` and the
    weighted norm :math:`\lVert x\rVert_w^2 = \sum_j w_j x_j^2` of the grid's quadrature
    weights :math:`w` (so that every quantity approximates its continuum integral), iteration
    :math:`k = 0, \dots, n-1` does, from :math:`Z^0 = 1/\sum_j w_j` (flat) and the multiplier
    :math:`\lambda^0 = 0`:

    .. math::

        U^k &= \lambda^k / \rho_k \quad \text{(the scaled dual of ADMM at this penalty)} \\
        A^{k+1} &= \arg\min_A\ \tfrac12 \lVert W(K_w A - G)\rVert^2
            + \tfrac{\rho_k}{2} \lVert A - Z^k + U^k \rVert_w^2 \\
        \hat A &= \alpha_k A^{k+1} + (1 - \alpha_k) Z^k \\
        Z^{k+1} &= P_C\big(s_k * (\hat A + U^k)\big) \\
        \lambda^{k+1} &= \rho_k \big(U^k + \eta_k (\hat A - Z^{k+1})\big)

    and returns :math:`Z^n`. Each A-update is a well-conditioned linear system: in the
    variable :math:`x = \sqrt w \odot A` it reads :math:`(M^T M + \rho_k I)\, x = M^T W G +
    \rho_k \sqrt w \odot (Z^k - U^k)` with :math:`M = W K \mathrm{diag}(\sqrt w)` (so
    :math:`M^T M` is :math:`K_w^T W^2 K_w` in the weighted metric), whose eigenvalues are at
    least :math:`\rho_k > 0`. With the SVD :math:`M = U_M \mathrm{diag}(s) V^T` it is solved in
    closed form,

    .. math::

        x = V \frac{s \odot U_M^T W G + \rho_k V^T y}{s^2 + \rho_k} + (y - V V^T y), \qquad
        y = \sqrt w \odot (Z^k - U^k),

    so each iteration costs :math:`O(n_w r)` per spectrum, :math:`r = \min(n_\tau, n_w)`.
    The SVD is computed once per problem when each spectrum has one noise level (``sigma`` of
    shape ``(...)``, or ``(..., n_tau)`` constant along ``tau``: then :math:`M = K
    \mathrm{diag}(\sqrt w) / \sigma`), and once per spectrum and call otherwise
    (:math:`O(n_\tau^2 n_w)` each). Since :math:`W` whitens the noise, :math:`s^2` measures
    each singular direction's information against the noise: where :math:`s^2 \gg \rho_k` the
    data set the component, where :math:`s^2 \ll \rho_k` it stays that of :math:`Z^k - U^k`;
    :math:`\rho_k` means the same at every noise level.

    :math:`P_C` is the exact projection onto :math:`C` in the weighted norm,
    :math:`P_C(Y)_j = \max(Y_j - \theta, 0)` with the threshold :math:`\theta` that makes
    :math:`\sum_j w_j \max(Y_j - \theta, 0) = 1` (found by one sort, :math:`O(n_w \log n_w)`),
    so every iterate :math:`Z^k` is :math:`\ge 0` exactly and normalised to rounding (a final
    division by :math:`\sum_j w_j Z_j`, which is 1 up to rounding, makes sure of it).
    :math:`s_k *` is a 1-D convolution over the grid index with ``filter_width`` taps and
    replicated end values.

    **Learned parameters** (``3 + filter_width`` per iteration, ``n_iter * (3 +
    filter_width)`` in all: 80 for the defaults): ``log_rho`` (:math:`\log\rho_k`, initially
    ``log(rho)``), ``relaxation`` (:math:`\alpha_k`, initially 1), ``dual_step``
    (:math:`\eta_k`, initially 1) and ``filters`` (:math:`s_k`, initially the identity tap).
    At these initial values the iteration *is* plain scaled ADMM with a constant penalty, which
    converges to the positive normalised least-squares fit; training makes the ``n_iter``-step
    output a regularised solution instead. (The last iteration's dual step does not reach the
    output; it is kept so that every iteration has the same parameters.) Iteration :math:`k`
    reads only its own parameters (the multiplier :math:`\lambda`, not :math:`U`, is carried
    over, so a change of :math:`\rho` between iterations rescales :math:`U` as ADMM with a
    varying penalty should), which is what makes truncated backpropagation exact for the
    iterations it keeps.

    Args:
        problem: the :class:`~hypergradient.continuation.kernels.Problem` (tau, beta, grid,
            kernel); its grid weights must be positive. The model is float64 (the problem's
            dtype) and holds the kernel's SVD as buffers (moved by ``.to(device)``).
        n_iter: number of unrolled iterations (>= 1).
        rho: initial penalty of every iteration (> 0), in noise-whitened units. The default
            ``1e3`` starts from small proximal steps away from the flat default model: on
            held-out spectra (``beta = 10``, 51 tau points, 161 frequencies on ``[-8, 8]``,
            noise ``1e-3``) the untrained 10-iteration model had L1 0.29 with it and 1.2 with
            ``rho=1`` (plain ADMM runs to the noise-fitting least-squares solution fast).
        filter_width: taps of each smoothing filter (odd, >= 1; 1 means a learned scale).

    Shapes: ``forward(G, sigma)`` takes ``G (..., n_tau)`` and ``sigma`` of shape ``(...)``
    (one per spectrum), ``(..., n_tau)`` (one per point) or a number, and returns
    ``A (..., n_w)``, a density on ``problem.grid``.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.unrolled_solver import LearnedContinuation
        >>> problem = Problem(tau_grid(10.0, 21), 10.0, uniform_grid(-6.0, 6.0, 61))
        >>> A_true = torch.exp(-0.5 * (problem.grid.omega - 1.0) ** 2)
        >>> A_true = A_true / problem.grid.integrate(A_true)
        >>> G = problem.forward(A_true)
        >>> model = LearnedContinuation(problem, n_iter=8, filter_width=3)
        >>> A = model(G, 1e-3)
        >>> A.shape, bool((A >= 0).all()), model.num_parameters()
        (torch.Size([61]), True, 48)
        >>> [name for name, _ in model.named_parameters()]
        ['log_rho', 'relaxation', 'dual_step', 'filters']
    """

    def __init__(
        self, problem: Problem, n_iter: int = 10, *, rho: float = 1e3, filter_width: int = 5
    ):
        super().__init__()
        where = (
            f"LearnedContinuation(n_iter={n_iter!r}, rho={rho!r}, filter_width={filter_width!r})"
        )
        if not isinstance(problem, Problem):
            raise HypergradientError(
                f"{where}: problem is a {type(problem).__name__}, expected a continuation "
                f"Problem; build one with Problem(tau_grid(beta, n_tau), beta, uniform_grid(...))."
            )
        if isinstance(n_iter, bool) or not isinstance(n_iter, numbers.Integral) or n_iter < 1:
            raise HypergradientError(
                f"{where}: n_iter must be an int >= 1 (the unrolled iterations); pass e.g. "
                f"n_iter=10."
            )
        if (
            isinstance(rho, bool)
            or not isinstance(rho, numbers.Real)
            or not math.isfinite(rho)
            or rho <= 0
        ):
            raise HypergradientError(
                f"{where}: rho must be a finite number > 0 (the initial ADMM penalty in "
                f"noise-whitened units); pass e.g. rho=1e3."
            )
        if (
            isinstance(filter_width, bool)
            or not isinstance(filter_width, numbers.Integral)
            or filter_width < 1
            or filter_width % 2 == 0
        ):
            raise HypergradientError(
                f"{where}: filter_width must be an odd int >= 1 (a centred filter); pass e.g. "
                f"filter_width=5."
            )
        weights = problem.grid.weights
        if not bool((weights > 0).all()):
            raise HypergradientError(
                f"{where}: the grid has {int((weights <= 0).sum())} zero weight(s), expected "
                f"positive quadrature weights (the weighted projection divides by them); use "
                f"uniform_grid or nonuniform_grid."
            )
        self.problem = problem
        self.n_iter = int(n_iter)
        self.filter_width = int(filter_width)
        dtype = problem.grid.omega.dtype
        sqrt_w = weights.sqrt()
        # K diag(sqrt w) = K_w diag(1 / sqrt w): the kernel in the weighted metric
        kernel = problem.matrix / sqrt_w
        U, s, Vh = torch.linalg.svd(kernel, full_matrices=False)
        self.register_buffer("weights", weights.clone(), persistent=False)
        self.register_buffer("sqrt_weights", sqrt_w, persistent=False)
        self.register_buffer("kernel", kernel, persistent=False)
        self.register_buffer("kernel_U", U, persistent=False)
        self.register_buffer("kernel_s", s, persistent=False)
        self.register_buffer("kernel_V", Vh.mT.contiguous(), persistent=False)
        n = self.n_iter
        self.log_rho = nn.Parameter(torch.full((n,), math.log(rho), dtype=dtype))
        self.relaxation = nn.Parameter(torch.ones(n, dtype=dtype))
        self.dual_step = nn.Parameter(torch.ones(n, dtype=dtype))
        taps = torch.zeros(n, self.filter_width, dtype=dtype)
        taps[:, self.filter_width // 2] = 1.0
        self.filters = nn.Parameter(taps)

    def num_parameters(self) -> int:
        """The number of learned scalars, ``n_iter * (3 + filter_width)``.

        Examples:
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> from hypergradient.continuation.unrolled_solver import LearnedContinuation
            >>> problem = Problem(tau_grid(10.0, 21), 10.0, uniform_grid(-6.0, 6.0, 61))
            >>> LearnedContinuation(problem, n_iter=10, filter_width=5).num_parameters()
            80
        """
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------------------------------
    # pieces of one iteration

    def _prepare(self, G: Tensor, sigma, where: str) -> _Data:
        check_green(G, self.problem, where=where)
        G = G.to(self.kernel.dtype)
        batch = G.shape[:-1]
        scale = _check_sigma(sigma, G, where)
        n_tau = G.shape[-1]
        if scale.shape == batch:
            per_spectrum = scale
        elif bool((scale == scale[..., :1]).all()):
            per_spectrum = scale[..., 0]
        else:
            per_spectrum = None
        if per_spectrum is not None:
            s = self.kernel_s
            projected = (G @ self.kernel_U) / per_spectrum[..., None]  # U^T W G
            return _Data(
                c=(s / per_spectrum[..., None]) * projected,
                lam=(s / per_spectrum[..., None]) ** 2,
                V=self.kernel_V,
                shared=True,
            )
        # one noise level per point: M = diag(1/sigma) K diag(sqrt w), one SVD per spectrum
        scale = scale.expand(*batch, n_tau)
        M = self.kernel / scale[..., :, None]
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        projected = ((G / scale)[..., None, :] @ U).squeeze(-2)
        return _Data(c=s * projected, lam=s * s, V=Vh.mT, shared=False)

    def _solve(self, data: _Data, rho: Tensor, target: Tensor) -> Tensor:
        """``A`` of the A-update for ``target = Z - U``, in closed form (see the class)."""
        y = self.sqrt_weights * target
        p = _times(y, data.V, data.shared)  # V^T y
        coef = (data.c + rho * p) / (data.lam + rho)
        x = _times(coef - p, data.V.mT, data.shared) + y
        return x / self.sqrt_weights

    def _smooth(self, values: Tensor, taps: Tensor) -> Tensor:
        half = self.filter_width // 2
        if half == 0:
            return values * taps[0]
        shape = (*values.shape[:-1], half)
        padded = torch.cat(
            [values[..., :1].expand(shape), values, values[..., -1:].expand(shape)], dim=-1
        )
        return (padded.unfold(-1, self.filter_width, 1) * taps).sum(-1)

    def _project(self, values: Tensor) -> Tensor:
        return _project_weighted_simplex(values, self.weights)

    def _initial_state(self, batch: torch.Size) -> tuple[Tensor, Tensor]:
        flat = (1.0 / self.weights.sum()).expand(*batch, self.weights.shape[0])
        Z = flat.clone()
        return Z, torch.zeros_like(Z)

    def _iteration(self, k: int, data: _Data, Z: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
        """Iteration ``k`` from ``(Z^k, lambda^k)``; it reads only iteration ``k``'s parameters."""
        return self._admm_step(
            data, Z, Y, self.log_rho[k], self.relaxation[k], self.dual_step[k], self.filters[k]
        )

    def _admm_step(
        self,
        data: _Data,
        Z: Tensor,
        Y: Tensor,
        log_rho: Tensor,
        relaxation: Tensor,
        dual_step: Tensor,
        taps: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One iteration from ``(Z^k, lambda^k)`` with the given parameters of that iteration
        (0-d ``log_rho``, ``relaxation``, ``dual_step`` and ``(filter_width,)`` ``taps``): the
        one function both :meth:`forward` and :class:`ContinuationSystem` run."""
        rho = log_rho.exp()
        U = Y / rho
        A = self._solve(data, rho, Z - U)
        relaxed = relaxation * A + (1 - relaxation) * Z
        Z_next = self._project(self._smooth(relaxed + U, taps))
        U_next = U + dual_step * (relaxed - Z_next)
        return Z_next, rho * U_next

    def _run(self, G: Tensor, sigma, truncate, where: str, keep: bool):
        if truncate is not None and (
            isinstance(truncate, bool)
            or not isinstance(truncate, numbers.Integral)
            or not 1 <= truncate <= self.n_iter
        ):
            raise HypergradientError(
                f"{where}: truncate={truncate!r}, expected None (backpropagate through all "
                f"{self.n_iter} iterations) or an int in [1, {self.n_iter}] (only the last k)."
            )
        data = self._prepare(G, sigma, where)
        Z, Y = self._initial_state(data.c.shape[:-1])
        start = 0 if truncate is None else self.n_iter - int(truncate)
        iterates = []
        with torch.no_grad():
            for k in range(start):
                Z, Y = self._iteration(k, data, Z, Y)
                iterates.append(Z)
        for k in range(start, self.n_iter):
            Z, Y = self._iteration(k, data, Z, Y)
            iterates.append(Z)
        return iterates if keep else Z

    def forward(self, G: Tensor, sigma, *, truncate: int | None = None) -> Tensor:
        r"""The last iterate :math:`Z^n` for Green's functions ``G`` with noise ``sigma``.

        Args:
            G: ``(..., n_tau)`` on ``problem.tau`` (checked by
                :func:`~hypergradient.continuation.kernels.check_green`).
            sigma: the noise's standard deviation: a number, one per spectrum ``(...)``, or one
                per point ``(..., n_tau)`` (broadcastable to ``G``); all ``> 0``. A shape equal
                to ``G.shape[:-1]`` is read as one per spectrum.
            truncate: ``None`` (the autograd graph spans all iterations: reverse mode through
                the whole unroll) or ``k``: the first ``n_iter - k`` iterations run without a
                graph, so gradients reach only the last ``k`` iterations' parameters (the
                values are the same).

        Returns:
            ``A (..., n_w)``: ``>= 0``, ``integrate(A) = 1`` to rounding, float64.

        Cost: ``n_iter`` iterations of :math:`O(n_w r + n_w \log n_w)` per spectrum after
        :math:`O(n_\tau r)` for the data (plus one :math:`O(n_\tau^2 n_w)` SVD per spectrum
        when ``sigma`` varies along ``tau``).

        Examples:
            >>> import torch
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> from hypergradient.continuation.unrolled_solver import LearnedContinuation
            >>> problem = Problem(tau_grid(10.0, 21), 10.0, uniform_grid(-6.0, 6.0, 61))
            >>> model = LearnedContinuation(problem, n_iter=4)
            >>> G = problem.forward(torch.full((3, 61), 1 / 12, dtype=torch.float64))
            >>> A = model(G, torch.full((3,), 1e-3, dtype=torch.float64), truncate=2)
            >>> A.shape, bool((A >= 0).all())
            (torch.Size([3, 61]), True)
        """
        return self._run(G, sigma, truncate, "LearnedContinuation.forward", keep=False)

    def iterates(self, G: Tensor, sigma) -> Tensor:
        """Every iterate ``Z^1, ..., Z^n`` stacked: ``(n_iter, ..., n_w)``.

        The same computation as :meth:`forward` (whose result is the last row), for inspecting
        how the unrolled iteration approaches its output.

        Examples:
            >>> import torch
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> from hypergradient.continuation.unrolled_solver import LearnedContinuation
            >>> problem = Problem(tau_grid(10.0, 21), 10.0, uniform_grid(-6.0, 6.0, 61))
            >>> model = LearnedContinuation(problem, n_iter=4)
            >>> G = problem.forward(torch.full((61,), 1 / 12, dtype=torch.float64))
            >>> Z = model.iterates(G, 1e-3)
            >>> Z.shape, bool(torch.equal(Z[-1], model(G, 1e-3)))
            (torch.Size([4, 61]), True)
        """
        return torch.stack(self._run(G, sigma, None, "LearnedContinuation.iterates", keep=True))


def _times(rows: Tensor, matrix: Tensor, shared: bool) -> Tensor:
    """``rows (..., m) @ matrix``: one ``(m, p)`` matrix for all rows, or one per row."""
    if shared:
        return rows @ matrix
    return (rows[..., None, :] @ matrix).squeeze(-2)


def _project_weighted_simplex(values: Tensor, weights: Tensor) -> Tensor:
    r"""``argmin_Z sum_j w_j (Z_j - Y_j)^2`` over ``Z >= 0``, ``sum_j w_j Z_j = 1``.

    KKT: ``Z = max(Y - theta, 0)``. Sorting ``Y`` decreasingly, ``k`` entries are active where
    ``S_k = sum_{i<=k} w_i (y_i - y_k) < 1`` (non-decreasing in ``k``, so a prefix), and
    ``theta = (sum_{i<=k} w_i y_i - 1) / sum_{i<=k} w_i``."""
    ordered, order = torch.sort(values, dim=-1, descending=True)
    w = weights.expand_as(values).gather(-1, order)
    cum_wy = torch.cumsum(w * ordered, dim=-1)
    cum_w = torch.cumsum(w, dim=-1)
    with torch.no_grad():
        active = (cum_wy - ordered * cum_w) < 1
        count = torch.arange(1, values.shape[-1] + 1, device=values.device)
        last = (active * count).amax(dim=-1, keepdim=True) - 1
    theta = (cum_wy.gather(-1, last) - 1) / cum_w.gather(-1, last)
    Z = torch.clamp(values - theta, min=0)
    return Z / (weights * Z).sum(-1, keepdim=True)


def _check_sigma(sigma, G: Tensor, where: str) -> Tensor:
    if isinstance(sigma, bool) or not isinstance(sigma, (Tensor, numbers.Real)):
        raise HypergradientError(
            f"{where}: sigma is a {type(sigma).__name__}, expected a number or a tensor of shape "
            f"{tuple(G.shape[:-1])} (one per spectrum) or {tuple(G.shape)} (one per point); "
            f"pass the noise's standard deviation, e.g. dataset.sigma."
        )
    scale = torch.as_tensor(sigma, dtype=G.dtype, device=G.device)
    if scale.is_complex():
        raise HypergradientError(f"{where}: sigma is complex, expected real positive values.")
    batch = G.shape[:-1]
    if scale.shape != batch:
        try:
            torch.broadcast_shapes(scale.shape, G.shape)
            ok = torch.broadcast_shapes(scale.shape, G.shape) == G.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise HypergradientError(
                f"{where}: sigma has shape {tuple(scale.shape)}, expected {tuple(batch)} (one "
                f"per spectrum), {tuple(G.shape)} (one per point) or a shape broadcastable to "
                f"it; pass e.g. dataset.sigma for dataset.G_noisy."
            )
        scale = scale.expand(G.shape)
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise HypergradientError(
            f"{where}: sigma has a non-positive or non-finite entry (min "
            f"{float(scale.min()):.3g}), expected standard deviations > 0; pass the noise level "
            f"of G (e.g. 1e-3 * G.abs().max())."
        )
    return scale


# ---------------------------------------------------------------------------------------------
# the one-function interface


def continue_spectrum(
    G: Tensor,
    tau: Tensor,
    beta: float,
    *,
    model: LearnedContinuation,
    grid: Grid | None = None,
    sigma,
) -> tuple[Tensor, Grid]:
    r"""Continue ``G(tau)`` to the real-frequency spectrum ``A(w)`` with a trained model.

    Builds the :class:`~hypergradient.continuation.kernels.Problem` of ``tau``, ``beta`` and the
    grid (the model's when ``grid`` is None), checks ``G`` against it with
    :func:`~hypergradient.continuation.kernels.check_green`, checks that the model was built for
    the same ``tau``, ``beta``, grid and statistics (a model is trained for one kernel), and
    runs it.

    Args:
        G: ``(..., n_tau)`` imaginary-time Green's function(s), real float.
        tau: ``(n_tau,)`` the imaginary times of ``G``.
        beta: inverse temperature.
        model: a :class:`LearnedContinuation` (trained with :func:`meta_train`).
        grid: the frequency grid expected for ``A``; must be the model's (default: it).
        sigma: the noise's standard deviation, as in :meth:`LearnedContinuation.forward`.

    Returns:
        ``(A, grid)``: ``A (..., n_w) >= 0`` with ``grid.integrate(A) = 1``, and its grid.
        ``A`` carries no graph (computed under ``torch.no_grad()``): to differentiate, call
        the model itself.

    Cost: one :meth:`LearnedContinuation.forward` plus :math:`O(n_\tau n_w)` for the checks.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.unrolled_solver import (LearnedContinuation,
        ...                                                         continue_spectrum)
        >>> tau = tau_grid(10.0, 21)
        >>> model = LearnedContinuation(Problem(tau, 10.0, uniform_grid(-6.0, 6.0, 61)), 4)
        >>> G = model.problem.forward(torch.full((61,), 1 / 12, dtype=torch.float64))
        >>> A, grid = continue_spectrum(G, tau, 10.0, model=model, sigma=1e-3)
        >>> A.shape, len(grid)
        (torch.Size([61]), 61)
        >>> continue_spectrum(G[:-1], tau, 10.0, model=model, sigma=1e-3)
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: continue_spectrum: G has shape (20,) but ...
    """
    where = "continue_spectrum"
    if not isinstance(model, LearnedContinuation):
        raise HypergradientError(
            f"{where}: model is a {type(model).__name__}, expected a LearnedContinuation; build "
            f"one with LearnedContinuation(problem, n_iter) and train it with meta_train."
        )
    reference = model.problem
    grid = reference.grid if grid is None else grid
    if not isinstance(tau, Tensor):
        raise HypergradientError(
            f"{where}: tau is a {type(tau).__name__}, expected a 1-D float tensor; convert it "
            f"with torch.as_tensor(tau, dtype=torch.float64)."
        )
    try:
        problem = Problem(tau=tau, beta=beta, grid=grid, statistics=reference.statistics)
    except HypergradientError as err:
        raise HypergradientError(f"{where}: {err}") from None
    check_green(G, problem, where=where)
    same_grid = len(grid) == reference.n_w and (
        grid is reference.grid
        or (
            torch.equal(grid.omega.to(reference.grid.omega), reference.grid.omega)
            and torch.equal(grid.weights.to(reference.grid.weights), reference.grid.weights)
        )
    )
    if not same_grid:
        raise HypergradientError(
            f"{where}: grid ({len(grid)} points on [{float(grid.omega[0]):g}, "
            f"{float(grid.omega[-1]):g}]) is not the model's ({reference.n_w} points on "
            f"[{float(reference.grid.omega[0]):g}, {float(reference.grid.omega[-1]):g}]); pass "
            f"grid=None, or train a model on this grid."
        )
    tolerance = 1e-12 * reference.beta
    same_tau = problem.n_tau == reference.n_tau and bool(
        ((problem.tau - reference.tau).abs() <= tolerance).all()
    )
    if abs(problem.beta - reference.beta) > tolerance or not same_tau:
        raise HypergradientError(
            f"{where}: beta={problem.beta!r} with {problem.n_tau} tau points is not the model's "
            f"problem (beta={reference.beta!r}, {reference.n_tau} tau points); the model is "
            f"trained for one kernel: use the model of this beta and tau grid."
        )
    with torch.no_grad():  # the inference interface; call the module itself to differentiate
        A = model._run(G, sigma, None, where, keep=False)
    return A, grid


# ---------------------------------------------------------------------------------------------
# meta-training


def _check_dataset(name: str, data, problem: Problem, where: str) -> None:
    if not isinstance(data, SpectralDataset):
        raise HypergradientError(
            f"{where}: {name} is a {type(data).__name__}, expected a SpectralDataset; build it "
            f"with make_dataset(problem, families, n_per_family, rel_sigma, seed=...)."
        )
    if len(data) < 1 or data.A.shape[-1] != problem.n_w or data.G.shape[-1] != problem.n_tau:
        raise HypergradientError(
            f"{where}: {name} has {len(data)} rows of A {tuple(data.A.shape[1:])} and G "
            f"{tuple(data.G.shape[1:])}, expected >= 1 row with n_w={problem.n_w} and "
            f"n_tau={problem.n_tau} (the model's problem); make the dataset with the model's "
            f"problem."
        )


def _positive_int(where: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise HypergradientError(f"{where}: {name}={value!r}, expected an int >= {minimum}.")
    return int(value)


def _spectrum_loss(A: Tensor, A_true: Tensor, weights: Tensor, loss: str) -> Tensor:
    error = A - A_true
    per_spectrum = (weights * (error.abs() if loss == "l1" else error * error)).sum(-1)
    return per_spectrum.mean()


class ContinuationSystem(AbstractUnrolledSystem):
    r"""A :class:`LearnedContinuation` on a training set as an unrolled system of
    :mod:`hypergradient.estimators`: one ADMM iteration per step.

    An episode is one mini-batch of ``batch_size`` spectra run through the model's
    ``T = n_iter`` iterations. With :math:`\theta` the model's parameters as a flat dict
    (``log_rho`` ``(T,)``, ``relaxation`` ``(T,)``, ``dual_step`` ``(T,)``, ``filters``
    ``(T, filter_width)``: the names of ``model.named_parameters()``), step :math:`t` is
    iteration :math:`t` of :class:`LearnedContinuation` with the parameters of row :math:`t`
    of each entry (the same function :meth:`LearnedContinuation.forward` runs), and the losses
    are

    .. math::

        \ell_t = 0 \ (t < T-1), \qquad \ell_{T-1} = T \cdot \tfrac1B \sum_b \int
        |Z^T_b - A_b^{\text{true}}|\, d\omega \quad (\text{or the L2 error for
        } \texttt{loss="l2"}),

    so the estimators' objective :math:`\frac1T \sum_t \ell_t` is exactly the meta-loss of
    :func:`meta_train` on that batch, and :class:`~hypergradient.estimators.FullBackprop`'s
    gradient is its gradient (to rounding: :math:`(T \ell)/T`).

    ``init(generator)`` draws the batch, ``torch.randperm(len(train), generator)[:batch_size]``
    (distinct spectra within a batch, batches independent across episodes), prepares the
    batch's fixed data (the SVD quantities of the A-update, computed once per episode) and
    returns the state at iteration 0, a dict of tensors: ``Z`` ``(B, n_w)`` (flat),
    ``Y`` ``(B, n_w)`` (the multiplier, 0), the A-update's ``c``, ``lam`` ``(B, r)`` and ``V``
    (``(n_w, r)``, or ``(B, n_w, r)`` when sigma varies along tau), and the batch's ``A_true``
    ``(B, n_w)``, ``G`` ``(B, n_tau)``, ``sigma`` ``(B, n_tau)``. ``step`` is pure (it builds a
    new dict). A truncated window starting at step :math:`t_0` differentiates only the
    parameters of iterations :math:`\ge t_0`, as ``forward(truncate=T - t_0)`` does.

    Args:
        model: the :class:`LearnedContinuation` (its buffers and shapes are used; its own
            parameters are not: ``theta`` replaces them).
        train: the :class:`~hypergradient.continuation.spectra.SpectralDataset` the batches
            come from (of the model's problem).
        batch_size: spectra per episode (>= 1; capped at ``len(train)``).
        loss: ``"l1"`` (default) or ``"l2"``, as in :func:`meta_train`.

    Cost: ``init`` :math:`O(B\, n_\tau r)` (plus one SVD per spectrum when sigma varies along
    tau); each step :math:`O(B (n_w r + n_w \log n_w))`, as one model iteration.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.spectra import make_dataset
        >>> from hypergradient.continuation.unrolled_solver import (ContinuationSystem,
        ...                                                         LearnedContinuation)
        >>> from hypergradient.estimators import FullBackprop
        >>> problem = Problem(tau_grid(10.0, 21), 10.0, uniform_grid(-6.0, 6.0, 61))
        >>> train = make_dataset(problem, ("gaussians",), 4, 1e-3, seed=0)
        >>> model = LearnedContinuation(problem, n_iter=3)
        >>> system = ContinuationSystem(model, train, batch_size=4)
        >>> theta = {name: p.detach() for name, p in model.named_parameters()}
        >>> est, gen = FullBackprop(system), torch.Generator().manual_seed(0)
        >>> out, _ = est.estimate(theta, est.init(theta, gen), gen)
        >>> index = torch.randperm(4, generator=torch.Generator().manual_seed(0))
        >>> A = model(train.G_noisy[index], train.sigma[index])
        >>> meta_loss = (problem.grid.weights * (A - train.A[index]).abs()).sum(-1).mean()
        >>> meta_loss.backward()
        >>> system.horizon, bool(torch.allclose(out.grad["log_rho"], model.log_rho.grad))
        (3, True)
    """

    def __init__(
        self,
        model: LearnedContinuation,
        train: SpectralDataset,
        batch_size: int,
        *,
        loss: str = "l1",
    ):
        where = "ContinuationSystem(...)"
        if not isinstance(model, LearnedContinuation):
            raise HypergradientError(
                f"{where}: model is a {type(model).__name__}, expected a LearnedContinuation."
            )
        _check_dataset("train", train, model.problem, where)
        if loss not in _LOSSES:
            raise HypergradientError(f"{where}: loss={loss!r}, expected one of {_LOSSES}.")
        self.model = model
        self.horizon = model.n_iter
        self.batch_size = min(_positive_int(where, "batch_size", batch_size), len(train))
        self.loss = loss
        weights = model.weights
        self._train = tuple(
            t.to(device=weights.device, dtype=weights.dtype)
            for t in (train.A, train.G_noisy, train.sigma)
        )

    def init(self, generator: torch.Generator) -> dict[str, Tensor]:
        A_all, G_all, s_all = self._train
        index = torch.randperm(len(A_all), generator=generator)[: self.batch_size]
        index = index.to(A_all.device)
        G, sigma = G_all[index], s_all[index]
        data = self.model._prepare(G, sigma, "ContinuationSystem.init")
        Z, Y = self.model._initial_state(data.c.shape[:-1])
        return {
            "Z": Z,
            "Y": Y,
            "c": data.c,
            "lam": data.lam,
            "V": data.V,
            "A_true": A_all[index],
            "G": G,
            "sigma": sigma,
        }

    def step(
        self, state: dict[str, Tensor], theta: dict[str, Tensor], t: int
    ) -> tuple[dict[str, Tensor], Tensor]:
        V = state["V"]
        data = _Data(c=state["c"], lam=state["lam"], V=V, shared=V.dim() == 2)
        Z, Y = self.model._admm_step(
            data,
            state["Z"],
            state["Y"],
            theta["log_rho"][t],
            theta["relaxation"][t],
            theta["dual_step"][t],
            theta["filters"][t],
        )
        if t == self.horizon - 1:
            error = _spectrum_loss(Z, state["A_true"], self.model.weights, self.loss)
            loss = self.horizon * error
        else:
            loss = Z.new_zeros(())
        return {**state, "Z": Z, "Y": Y}, loss


def meta_train(
    model: LearnedContinuation,
    train: SpectralDataset,
    val: SpectralDataset,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    truncate: int | None = None,
    seed: int,
    progress: bool = False,
    loss: str = "l1",
    eval_every: int | None = None,
    estimator: str | None = None,
) -> dict:
    r"""Train the model's parameters by backpropagation through the unrolled iterations.

    Each step draws ``batch_size`` spectra of ``train`` (a fresh random permutation per pass
    over the data, from ``seed``), runs the model on their noisy ``G`` and ``sigma``, and takes
    an Adam step on the error of the output against the *true spectrum*,

    .. math::

        \text{L1} = \tfrac1B \sum_b \int |A_b - A_b^{\text{true}}|\, d\omega
        \quad\text{or}\quad \text{L2} = \tfrac1B \sum_b \int (A_b - A_b^{\text{true}})^2 d\omega

    (quadrature with the grid's weights) -- never the residual in :math:`G`, which a solution
    that fits the noise makes small. ``truncate=None`` differentiates through all iterations
    (reverse mode through the unroll); ``truncate=k`` through the last ``k`` only (the earlier
    iterations run without a graph, so only the last ``k`` iterations' parameters move in that
    step). Every ``eval_every`` steps (and before the first) the mean L1 on ``val`` is
    measured; at the end the model holds the parameters of the best one (selection on
    validation; the initial parameters are a candidate too).

    **Through the estimators.** ``estimator="full"`` or ``"truncated"`` runs the same Adam
    loop with each step's gradient from :class:`~hypergradient.estimators.FullBackprop` or
    :class:`~hypergradient.estimators.TruncatedBackprop` (``truncation_length=truncate``) on a
    :class:`ContinuationSystem` of ``train`` (one particle, one episode = one batch per step,
    the estimator's generator seeded with ``seed``). Differences from the default
    (``estimator=None``, direct backpropagation through the module):

    * batches: each episode draws ``randperm(len(train))[:batch_size]`` afresh instead of
      walking through one permutation per pass. The first batch is the same (the first draw
      of the same generator), and so is every batch's *set* when ``batch_size >= len(train)``
      (then only the order of the mean over the batch differs, a rounding-level change).
    * ``"full"``: the gradient equals the default's on the same batch to rounding
      (:math:`(T\ell)/T`); ``truncate`` must be None.
    * ``"truncated"``: the estimator's windows of ``k = truncate`` steps advance across its
      calls and each call differentiates the mean of *its own* window's losses from the
      window's first state held constant. The loss sits at the last step only, so a window
      that ends before it gives 0, and the last window gives :math:`(T/k)` times
      ``forward(truncate=k)``'s gradient. One Adam step here runs a whole episode, its
      :math:`T/k` windows, and takes their mean, which is exactly the default's
      ``truncate=k`` gradient; this needs ``k`` to divide ``n_iter`` (windows otherwise
      straddle episodes). ``truncate=None`` means whole episodes (as ``"full"``).

    Args:
        model: a :class:`LearnedContinuation`, trained in place.
        train, val: :class:`~hypergradient.continuation.spectra.SpectralDataset` of the
            model's problem.
        steps: Adam steps (>= 1).
        lr: Adam's learning rate (> 0).
        batch_size: spectra per step (>= 1; capped at ``len(train)``).
        truncate: ``None`` or the number of last iterations to backpropagate through.
        seed: int >= 0, the only source of randomness (the batch order).
        progress: show a ``rich`` progress bar.
        loss: ``"l1"`` (default) or ``"l2"``, the training loss above.
        eval_every: steps between validation measurements (default ``max(1, steps // 10)``).
        estimator: ``None`` (direct backpropagation through the module), ``"full"`` or
            ``"truncated"`` (see above).

    Returns:
        A dict: ``step``, ``train_loss`` (mean training loss over the steps since the previous
        measurement; ``nan`` at step 0), ``val_l1`` -- lists, one entry per measurement --
        and ``best_step``, ``best_val_l1``, ``loss``, ``truncate``, ``estimator``.

    Cost: ``steps`` forward and backward passes of ``batch_size`` spectra (time and memory
    :math:`O(\text{batch\_size} \cdot k \cdot n_w r)` for ``k`` differentiated iterations),
    plus ``steps / eval_every + 1`` forward passes over ``val``.

    Examples:
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.spectra import make_dataset
        >>> from hypergradient.continuation.unrolled_solver import LearnedContinuation, meta_train
        >>> problem = Problem(tau_grid(10.0, 21), 10.0, uniform_grid(-6.0, 6.0, 61))
        >>> train = make_dataset(problem, ("gaussians",), 8, 1e-3, seed=0)
        >>> val = make_dataset(problem, ("gaussians",), 4, 1e-3, seed=1)
        >>> model = LearnedContinuation(problem, n_iter=3)
        >>> history = meta_train(model, train, val, steps=4, lr=0.05, batch_size=4, seed=0)
        >>> sorted(history)  # doctest: +NORMALIZE_WHITESPACE
        ['best_step', 'best_val_l1', 'estimator', 'loss', 'step', 'train_loss', 'truncate',
         'val_l1']
        >>> history["step"], history["best_val_l1"] <= history["val_l1"][0]
        ([0, 1, 2, 3, 4], True)
        >>> other = LearnedContinuation(problem, n_iter=3)
        >>> _ = meta_train(other, train, val, steps=1, lr=0.05, batch_size=4, seed=0,
        ...                estimator="full", eval_every=1)
        >>> first = LearnedContinuation(problem, n_iter=3)
        >>> _ = meta_train(first, train, val, steps=1, lr=0.05, batch_size=4, seed=0,
        ...                eval_every=1)
        >>> float((other.log_rho - first.log_rho).detach().abs().max()) < 1e-10  # same batch
        True
    """
    where = "meta_train"
    if not isinstance(model, LearnedContinuation):
        raise HypergradientError(
            f"{where}: model is a {type(model).__name__}, expected a LearnedContinuation."
        )
    problem = model.problem
    _check_dataset("train", train, problem, where)
    _check_dataset("val", val, problem, where)
    steps = _positive_int(where, "steps", steps)
    batch_size = _positive_int(where, "batch_size", batch_size)
    seed = _positive_int(where, "seed", seed, minimum=0)
    eval_every = max(1, steps // 10) if eval_every is None else eval_every
    eval_every = _positive_int(where, "eval_every", eval_every)
    if (
        isinstance(lr, bool)
        or not isinstance(lr, numbers.Real)
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise HypergradientError(f"{where}: lr={lr!r}, expected a finite number > 0, e.g. 0.05.")
    if loss not in _LOSSES:
        raise HypergradientError(f"{where}: loss={loss!r}, expected one of {_LOSSES}.")
    if truncate is not None:
        truncate = _positive_int(where, "truncate", truncate)
        if truncate > model.n_iter:
            raise HypergradientError(
                f"{where}: truncate={truncate} exceeds n_iter={model.n_iter}; pass None or "
                f"an int in [1, {model.n_iter}]."
            )
    if estimator is not None and estimator not in _ESTIMATORS:
        raise HypergradientError(
            f"{where}: estimator={estimator!r}, expected None (direct backpropagation) or one "
            f"of {_ESTIMATORS}."
        )
    if estimator == "full" and truncate is not None:
        raise HypergradientError(
            f"{where}: estimator='full' with truncate={truncate}; pass truncate=None, or "
            f"estimator='truncated'."
        )
    if estimator == "truncated" and truncate is not None and model.n_iter % truncate:
        raise HypergradientError(
            f"{where}: estimator='truncated' needs truncate to divide n_iter={model.n_iter} "
            f"(got {truncate}; the windows would straddle episodes); use estimator=None."
        )
    weights = model.weights
    device, dtype = weights.device, weights.dtype

    def tensors(data: SpectralDataset):
        return tuple(t.to(device=device, dtype=dtype) for t in (data.A, data.G_noisy, data.sigma))

    A_train, G_train, s_train = tensors(train)
    A_val, G_val, s_val = tensors(val)
    batch_size = min(batch_size, len(train))

    def validate() -> float:
        with torch.no_grad():
            return float(_spectrum_loss(model(G_val, s_val), A_val, weights, "l1"))

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history: dict = {"step": [0], "train_loss": [math.nan], "val_l1": [validate()]}
    best_val, best_step = history["val_l1"][0], 0
    best_state = copy.deepcopy(model.state_dict())
    if estimator is None:
        order, position = torch.randperm(len(train), generator=generator), 0
    else:
        system = ContinuationSystem(model, train, batch_size, loss=loss)
        if estimator == "full":
            gradient_estimator = FullBackprop(system)
        else:
            gradient_estimator = TruncatedBackprop(system, truncation_length=truncate)
        windows = model.n_iter // (model.n_iter if truncate is None else truncate)
        named = dict(model.named_parameters())
        estimator_state = gradient_estimator.init(named, generator)
    running = []
    bar = _progress(progress, steps)
    try:
        for step in range(1, steps + 1):
            optimizer.zero_grad(set_to_none=True)
            if estimator is None:
                if position + batch_size > len(train):
                    order, position = torch.randperm(len(train), generator=generator), 0
                index = order[position : position + batch_size].to(device)
                position += batch_size
                A = model(G_train[index], s_train[index], truncate=truncate)
                value = _spectrum_loss(A, A_train[index], weights, loss)
                value_f = float(value.detach())
            else:
                # one episode (one batch): the mean of its windows' estimates (see above)
                grads, value_f = {}, 0.0
                for _ in range(windows):
                    estimate, estimator_state = gradient_estimator.estimate(
                        named, estimator_state, generator
                    )
                    for name, g in estimate.grad.items():
                        grads[name] = grads[name] + g if name in grads else g
                    value_f += float(estimate.loss) / windows
            if not math.isfinite(value_f):
                raise HypergradientError(
                    f"{where}: the training loss of step {step} is not finite; lower lr "
                    f"(now {lr!r}) or the number of iterations."
                )
            if estimator is None:
                value.backward()
            else:
                for name, p in named.items():
                    p.grad = (grads[name] / windows).to(p)
            optimizer.step()
            running.append(value_f)
            if bar is not None:
                bar[0].update(bar[1], advance=1, description=f"{loss} {value_f:.4f}")
            if step % eval_every == 0 or step == steps:
                val_l1 = validate()
                history["step"].append(step)
                history["train_loss"].append(sum(running) / len(running))
                history["val_l1"].append(val_l1)
                running = []
                if val_l1 < best_val:
                    best_val, best_step = val_l1, step
                    best_state = copy.deepcopy(model.state_dict())
    finally:
        if bar is not None:
            bar[0].stop()
    model.load_state_dict(best_state)
    history.update(
        best_step=best_step, best_val_l1=best_val, loss=loss, truncate=truncate, estimator=estimator
    )
    return history


def _progress(show: bool, total: int):
    if not show:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    task = bar.add_task("meta-training", total=total)
    bar.start()
    return bar, task
