"""Grids, kernels and the problem statement of analytic continuation.

Quantum Monte Carlo measures a Green's function on imaginary time ``tau`` in ``[0, beta]``; the
physics is in the real-frequency spectral function ``A(w) >= 0``:

    G(tau) = integral dw K(tau, w) A(w),   K(tau, w) = exp(-tau w) / (1 + exp(-beta w))  (fermions).

On a real-frequency :class:`Grid` with quadrature weights this becomes ``G = A @ K_w.T`` with
``K_w[i, j] = K(tau_i, w_j) * weights[j]`` (:attr:`Problem.matrix`). ``K_w``'s singular values
decay exponentially (:meth:`Problem.svd`), so recovering ``A`` from a noisy ``G`` is ill-posed.
:func:`check_green` is the input check every routine of the subpackage uses.

Everything is float64 by default and runs on torch tensors.

Examples:
    >>> import torch
    >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
    >>> grid = uniform_grid(-8.0, 8.0, 401)
    >>> problem = Problem(tau=tau_grid(10.0, 101), beta=10.0, grid=grid)
    >>> A = torch.exp(-grid.omega**2 / 2) / (2 * torch.pi) ** 0.5  # normalised Gaussian
    >>> G = problem.forward(A)
    >>> G.shape, G.dtype
    (torch.Size([101]), torch.float64)
    >>> round(float(G[0] + G[-1]), 6)  # G(0) + G(beta) = integral A = 1 for fermions
    1.0
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from hypergradient._errors import HypergradientError

__all__ = [
    "Grid",
    "Problem",
    "ReducedKernel",
    "bosonic_kernel",
    "check_green",
    "fermionic_kernel",
    "matsubara_kernel",
    "nonuniform_grid",
    "tau_grid",
    "uniform_grid",
]

STATISTICS = ("fermionic", "bosonic")


# --------------------------------------------------------------------------------------------
# grids


@dataclass(frozen=True, eq=False)
class Grid:
    """A real-frequency grid with quadrature weights.

    ``integral f(w) dw ~= (weights * f(omega)).sum()``. A spectrum on the grid is the tensor
    ``A (..., n_w)`` of its values ``A(omega_j)`` (a density, not multiplied by the weights);
    a normalised one has ``(weights * A).sum(-1) == 1``.

    Attributes:
        omega: ``(n_w,)`` strictly increasing frequencies.
        weights: ``(n_w,)`` finite, non-negative quadrature weights.

    Construction checks both (O(n_w)) and raises :class:`~hypergradient.HypergradientError`
    on a mismatch. Equality is identity (tensors do not compare to one bool).

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Grid
        >>> grid = Grid(omega=torch.tensor([-1.0, 0.0, 1.0]), weights=torch.tensor([0.5, 1.0, 0.5]))
        >>> len(grid), round(float(grid.weights.sum()), 12)  # integral of 1 over [-1, 1]
        (3, 2.0)
        >>> Grid(omega=torch.tensor([0.0, 1.0]), weights=torch.ones(3))
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: Grid: omega has 2 points but weights has 3, ...
    """

    omega: Tensor
    weights: Tensor

    def __post_init__(self):
        _check_grid(self, "Grid")

    def __len__(self) -> int:
        return int(self.omega.shape[0])

    def integrate(self, values: Tensor) -> Tensor:
        """``(weights * values).sum(-1)``: the integral over the grid of ``values (..., n_w)``.

        Examples:
            >>> from hypergradient.continuation.kernels import uniform_grid
            >>> grid = uniform_grid(0.0, 1.0, 11)
            >>> round(float(grid.integrate(grid.omega)), 12)  # trapezoid is exact for lines
            0.5
        """
        return (self.weights * values).sum(-1)


def uniform_grid(w_min: float, w_max: float, n: int, *, dtype=torch.float64) -> Grid:
    """``n`` equally spaced frequencies on ``[w_min, w_max]`` (both ends) with trapezoid weights.

    ``omega_j = w_min + j h``, ``h = (w_max - w_min) / (n - 1)``; weights ``h`` inside and
    ``h / 2`` at the two ends. The rule is exact for linear functions; for smooth ``f`` its
    error is ``h^2 / 12 (f'(w_max) - f'(w_min)) + O(h^4)`` (Euler-Maclaurin), so for a
    function that decays to zero with all its derivatives at both ends (a Gaussian well
    inside) it converges faster than any power of ``h``. ``w_min = -w_max`` gives a grid that is
    exactly symmetric. Cost O(n).

    Examples:
        >>> from hypergradient.continuation.kernels import uniform_grid
        >>> grid = uniform_grid(-2.0, 2.0, 5)
        >>> grid.omega.tolist(), grid.weights.tolist()
        ([-2.0, -1.0, 0.0, 1.0, 2.0], [0.5, 1.0, 1.0, 1.0, 0.5])
    """
    where = f"uniform_grid(w_min={w_min!r}, w_max={w_max!r}, n={n!r})"
    n = _check_count(where, "n", n, minimum=2)
    if not (math.isfinite(w_min) and math.isfinite(w_max) and w_max > w_min):
        raise HypergradientError(
            f"{where}: expected finite w_min < w_max; give the frequency window in increasing "
            f"order, e.g. uniform_grid(-8.0, 8.0, 401)."
        )
    j = torch.arange(n, dtype=dtype)
    # a convex combination of the ends: both ends exact, and exactly symmetric if w_min = -w_max
    omega = (w_min * (n - 1 - j) + w_max * j) / (n - 1)
    step = (w_max - w_min) / (n - 1)
    weights = torch.full((n,), step, dtype=dtype)
    weights[0] = weights[-1] = step / 2
    return Grid(omega=omega, weights=weights)


def nonuniform_grid(w_max: float, n: int, *, spread: float = 3.0, dtype=torch.float64) -> Grid:
    """A symmetric grid on ``[-w_max, w_max]``, denser near ``w = 0``.

    ``omega_j = w_max sinh(a x_j) / sinh(a)`` on ``n`` equally spaced ``x_j`` in ``[-1, 1]``
    with ``a = spread``; the weights are the trapezoid weights in ``x`` times the mapping's
    derivative ``d omega / dx = w_max a cosh(a x) / sinh(a)``, so
    ``integral f dw = integral f(omega(x)) omega'(x) dx`` is done by the trapezoid rule in ``x``.
    The spacing at ``w = 0`` is ``cosh(a)`` times smaller than at the ends (about 10 for the
    default ``a = 3``). Cost O(n).

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import nonuniform_grid
        >>> grid = nonuniform_grid(8.0, 201)
        >>> bool(torch.equal(grid.omega, -grid.omega.flip(0)))  # exactly symmetric
        True
        >>> float(grid.omega[0]), float(grid.omega[-1])
        (-8.0, 8.0)
        >>> spacing = grid.omega.diff()
        >>> bool(spacing[100] < spacing[0] / 9)  # about cosh(3) = 10 times denser at 0
        True
        >>> gauss = torch.exp(-grid.omega**2 / 2) / (2 * torch.pi) ** 0.5
        >>> bool(abs(grid.integrate(gauss) - 1) < 1e-10)
        True
    """
    where = f"nonuniform_grid(w_max={w_max!r}, n={n!r}, spread={spread!r})"
    n = _check_count(where, "n", n, minimum=2)
    if not (math.isfinite(w_max) and w_max > 0):
        raise HypergradientError(
            f"{where}: expected a finite w_max > 0 (the grid spans [-w_max, w_max]); "
            f"pass e.g. w_max=8.0."
        )
    if not (math.isfinite(spread) and 0 < spread <= 50):
        raise HypergradientError(
            f"{where}: expected 0 < spread <= 50 (the sinh mapping's steepness); pass e.g. "
            f"spread=3.0, or use uniform_grid for equal spacing."
        )
    j = torch.arange(n, dtype=dtype)
    # integer numerators: x is exactly antisymmetric, so is omega
    x = (2 * j - (n - 1)) / (n - 1)
    a = float(spread)
    # vectorised sinh/cosh need not give bit-equal values at mirrored points (SIMD lanes vs the
    # tail loop): evaluate at |x| and average with the mirror image, then restore the sign
    stretch = torch.sinh(a * x.abs())
    stretch = (stretch + stretch.flip(0)) / 2
    slope = torch.cosh(a * x.abs())
    slope = (slope + slope.flip(0)) / 2
    omega = torch.sign(x) * (w_max * stretch / math.sinh(a))
    omega[0], omega[-1] = -w_max, w_max
    h = 2.0 / (n - 1)
    trapezoid = torch.full((n,), h, dtype=dtype)
    trapezoid[0] = trapezoid[-1] = h / 2
    weights = trapezoid * (w_max * a / math.sinh(a)) * slope
    return Grid(omega=omega, weights=weights)


def tau_grid(beta: float, n_tau: int, *, dtype=torch.float64) -> Tensor:
    """``n_tau`` equally spaced imaginary times on ``[0, beta]``, both ends included.

    ``tau_i = beta i / (n_tau - 1)``; ``tau[0] == 0`` and ``tau[-1] == beta`` exactly.
    Cost O(n_tau).

    Examples:
        >>> from hypergradient.continuation.kernels import tau_grid
        >>> tau_grid(2.0, 5).tolist()
        [0.0, 0.5, 1.0, 1.5, 2.0]
    """
    where = f"tau_grid(beta={beta!r}, n_tau={n_tau!r})"
    n_tau = _check_count(where, "n_tau", n_tau, minimum=2)
    _check_beta(where, beta)
    return float(beta) * (torch.arange(n_tau, dtype=dtype) / (n_tau - 1))


# --------------------------------------------------------------------------------------------
# kernels


def fermionic_kernel(tau: Tensor, omega: Tensor, beta: float) -> Tensor:
    """The fermionic imaginary-time kernel ``K(tau, w) = exp(-tau w) / (1 + exp(-beta w))``.

    ``G(tau) = integral dw K(tau, w) A(w)`` with ``A >= 0``, ``integral A = 1``; this ``G`` is
    positive, i.e. it is ``-G_phys(tau) = <c(tau) c^dagger>`` of the usual sign convention, and
    ``G(0) + G(beta) = integral A``. It is evaluated in the stable form

        w >= 0:  exp(-tau w) / (1 + exp(-beta w)),
        w <  0:  exp((beta - tau) w) / (1 + exp(beta w)),

    in which no exponent is positive, so it is finite (in ``[0, 1]``) for any ``beta |w|``,
    and so are its derivatives. ``K(tau, -w) = K(beta - tau, w)``.

    Args:
        tau: ``(n_tau,)`` imaginary times in ``[0, beta]``.
        omega: ``(n_w,)`` real frequencies.
        beta: inverse temperature, ``> 0``.

    Returns:
        ``(n_tau, n_w)`` in the promoted dtype of ``tau`` and ``omega``. Cost O(n_tau n_w).

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import fermionic_kernel
        >>> tau = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
        >>> K = fermionic_kernel(tau, torch.tensor([-1e4, 0.0, 1e4], dtype=torch.float64), 2.0)
        >>> K.tolist()  # at w = 0 the kernel is 1/2; huge |w| does not overflow
        [[0.0, 0.5, 1.0], [0.0, 0.5, 0.0], [1.0, 0.5, 0.0]]
    """
    tau, omega = _check_kernel_args("fermionic_kernel", tau, omega, beta)
    w = omega[None, :]
    magnitude = w.abs()
    # w < 0 uses beta - tau: the exponent -(time) * |w| is never positive
    time = torch.where(w >= 0, tau[:, None], beta - tau[:, None])
    return torch.exp(-time * magnitude) / (1 + torch.exp(-beta * magnitude))


def bosonic_kernel(tau: Tensor, omega: Tensor, beta: float) -> Tensor:
    """The bosonic imaginary-time kernel ``K(tau, w) = w exp(-tau w) / (1 - exp(-beta w))``.

    Convention: the bosonic spectral function ``A(w) = -Im G(w + i0) / pi`` is odd with
    ``A(w) / w >= 0``; the kernel acts on ``B(w) = A(w) / w``, the non-negative spectrum the
    continuation solves for:

        G(tau) = integral dw exp(-tau w) / (1 - exp(-beta w)) A(w)
               = integral dw [w exp(-tau w) / (1 - exp(-beta w))] B(w)

    (the ``time_bosonic`` kernel of ``ana-cont``). ``K`` is positive, ``K(tau, 0) = 1 / beta``
    (the limit), ``K(tau, -w) = K(beta - tau, w)``, and it is evaluated in the stable form

        K = |w| exp(-t |w|) / (1 - exp(-beta |w|)),   t = tau (w >= 0) or beta - tau (w < 0),

    with ``expm1`` for small ``beta |w|``, finite for any ``beta |w|``.

    Args:
        tau: ``(n_tau,)`` imaginary times in ``[0, beta]``.
        omega: ``(n_w,)`` real frequencies.
        beta: inverse temperature, ``> 0``.

    Returns:
        ``(n_tau, n_w)`` in the promoted dtype of ``tau`` and ``omega``. Cost O(n_tau n_w).

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import bosonic_kernel
        >>> tau = torch.tensor([0.0, 1.0], dtype=torch.float64)
        >>> K = bosonic_kernel(tau, torch.tensor([-1e4, 0.0, 1e4], dtype=torch.float64), 4.0)
        >>> K.tolist()  # 1 / beta at w = 0; K(0, w) -> w for w -> +inf
        [[0.0, 0.25, 10000.0], [0.0, 0.25, 0.0]]
    """
    tau, omega = _check_kernel_args("bosonic_kernel", tau, omega, beta)
    w = omega[None, :]
    x = beta * w.abs()  # >= 0
    time = torch.where(w >= 0, tau[:, None], beta - tau[:, None])
    # x / (1 - exp(-x)) -> 1 as x -> 0; evaluated at a safe x where x == 0 so that neither the
    # value nor the gradient sees 0 / 0
    nonzero = x > 0
    x_safe = torch.where(nonzero, x, torch.ones_like(x))
    ratio = torch.where(nonzero, x_safe / -torch.expm1(-x_safe), torch.ones_like(x))
    return (ratio / beta) * torch.exp(-time * w.abs())


def matsubara_kernel(
    n: int | Tensor, omega: Tensor, beta: float, statistics: str = "fermionic"
) -> Tensor:
    """The Matsubara-frequency kernel ``K(i w_n, w) = 1 / (i w_n - w)``.

    ``G(i w_n) = integral dw A(w) / (i w_n - w)`` with ``w_n = (2n + 1) pi / beta`` (fermions)
    or ``2 n pi / beta`` (bosons); on a grid ``G = (A * weights) @ K.T``. Relation to the
    imaginary-time kernels: ``integral_0^beta dtau exp(i w_n tau) K_tau(tau, w) = -1 / (i w_n -
    w)`` for :func:`fermionic_kernel`, and ``= -w / (i w_n - w)`` for :func:`bosonic_kernel`
    (whose spectrum is ``B = A / w``: apply this kernel to ``A = w B``). It is evaluated as
    ``(-w - i w_n) / (w^2 + w_n^2)``.

    Args:
        n: an int ``N`` (the indices ``0 .. N - 1``) or a 1-D integer tensor of indices (any sign).
        omega: ``(n_w,)`` real frequencies.
        beta: inverse temperature, ``> 0``.
        statistics: ``"fermionic"`` or ``"bosonic"``. For bosons ``w_0 = 0`` and the kernel is
            singular at ``w = 0``: that combination raises.

    Returns:
        complex ``(n_freq, n_w)``: complex128 for float64 ``omega`` (complex64 for float32).
        Cost O(n_freq n_w).

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import matsubara_kernel
        >>> omega = torch.tensor([0.0, 1.0], dtype=torch.float64)
        >>> K = matsubara_kernel(2, omega, beta=torch.pi)  # w_n = 1, 3
        >>> K.shape, K.dtype
        (torch.Size([2, 2]), torch.complex128)
        >>> bool(torch.allclose(K[0], torch.tensor([1 / 1j, 1 / (1j - 1)], dtype=torch.complex128)))
        True
    """
    where = f"matsubara_kernel(statistics={statistics!r})"
    _check_statistics(where, statistics)
    omega = _check_vector(where, "omega", omega)
    _check_beta(where, beta)
    if isinstance(n, numbers.Integral) and not isinstance(n, bool):
        n = int(n)
        if n < 1:
            raise HypergradientError(
                f"{where}: n={n} asks for no frequencies, expected a count >= 1; pass e.g. n=64 "
                f"or a 1-D tensor of Matsubara indices."
            )
        index = torch.arange(n, dtype=omega.dtype, device=omega.device)
    elif isinstance(n, Tensor) and n.ndim == 1 and not (n.is_floating_point() or n.is_complex()):
        index = n.to(dtype=omega.dtype, device=omega.device)
    else:
        got = f"tensor of shape {tuple(n.shape)}, dtype {n.dtype}" if isinstance(n, Tensor) else n
        raise HypergradientError(
            f"{where}: n is {got!r}, expected an int count or a 1-D integer tensor of Matsubara "
            f"indices; pass e.g. 64 or torch.arange(64)."
        )
    shift = 1.0 if statistics == "fermionic" else 0.0
    w_n = (2 * index + shift) * (math.pi / float(beta))
    if statistics == "bosonic" and bool((w_n == 0).any()) and bool((omega == 0).any()):
        raise HypergradientError(
            f"{where}: the bosonic kernel 1 / (i w_0 - w) is infinite at w_0 = 0, w = 0 (n and "
            f"omega contain both), expected no such pair; leave out n = 0 or use a grid "
            f"without w = 0 (e.g. an even number of points)."
        )
    w_n, w = w_n[:, None], omega[None, :]
    denominator = w**2 + w_n**2
    return torch.complex(-w / denominator, -w_n / denominator)


# --------------------------------------------------------------------------------------------
# the problem


class ReducedKernel(NamedTuple):
    """The truncated SVD ``K_w ~= U diag(s) V^T`` of :attr:`Problem.matrix`.

    Attributes:
        U: ``(n_tau, r)`` orthonormal columns (the data space).
        s: ``(r,)`` singular values, decreasing, all ``> cutoff * s_max``.
        V: ``(n_w, r)`` orthonormal columns (the spectrum space; Bryan's MaxEnt writes
            ``A = D exp(V u)``).

    A named tuple: ``U, s, V = problem.svd()`` unpacks it. Each column pair ``(U[:, k],
    V[:, k])`` has the sign that makes the largest-magnitude entry of ``V[:, k]`` positive, so
    the result does not depend on the LAPACK build.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> problem = Problem(tau=tau_grid(10.0, 51), beta=10.0, grid=uniform_grid(-5, 5, 101))
        >>> reduced = problem.svd(cutoff=0.0)
        >>> reduced.U.shape, reduced.s.shape, reduced.V.shape
        (torch.Size([51, 51]), torch.Size([51]), torch.Size([101, 51]))
        >>> bool(torch.allclose(reduced.matrix(), problem.matrix, rtol=0, atol=1e-12))
        True
    """

    U: Tensor
    s: Tensor
    V: Tensor

    @property
    def rank(self) -> int:
        """``r``, the number of singular values kept.

        Examples:
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> grid = uniform_grid(-5, 5, 101)
            >>> Problem(tau=tau_grid(10.0, 51), beta=10.0, grid=grid).svd(cutoff=1e-6).rank < 51
            True
        """
        return int(self.s.shape[0])

    def matrix(self) -> Tensor:
        """``U diag(s) V^T``, ``(n_tau, n_w)``: ``K_w`` up to the dropped singular values.

        Cost O(n_tau n_w r).

        Examples:
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> problem = Problem(tau=tau_grid(10.0, 51), beta=10.0, grid=uniform_grid(-5, 5, 101))
            >>> problem.svd().matrix().shape
            torch.Size([51, 101])
        """
        return (self.U * self.s) @ self.V.T


@dataclass(frozen=True, eq=False)
class Problem:
    """An analytic-continuation problem: imaginary times, temperature, frequency grid, statistics.

    ``G(tau_i) = sum_j K(tau_i, w_j) weights_j A(w_j)``, i.e. ``G = A @ matrix.T`` with the
    kernel :func:`fermionic_kernel` or :func:`bosonic_kernel` (whose spectrum is ``A(w) / w``).
    Construction checks the fields (``beta > 0``; ``tau`` 1-D, finite and in ``[0, beta]``; the
    grid; ``statistics``) and raises :class:`~hypergradient.HypergradientError`; ``tau`` is
    converted to the grid's dtype and ``beta`` to a float.

    :attr:`matrix` and the SVD behind :meth:`svd` are computed once and cached on the instance:
    treat the returned tensors as read-only. Equality is identity.

    Attributes:
        tau: ``(n_tau,)`` imaginary times in ``[0, beta]``.
        beta: inverse temperature.
        grid: the real-frequency :class:`Grid`, ``n_w`` points.
        statistics: ``"fermionic"`` (default) or ``"bosonic"``.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> grid = uniform_grid(-8.0, 8.0, 161)
        >>> problem = Problem(tau=tau_grid(20.0, 41), beta=20.0, grid=grid)
        >>> problem.matrix.shape, problem.n_tau, problem.n_w
        (torch.Size([41, 161]), 41, 161)
        >>> A = torch.exp(-((grid.omega - 1) ** 2) / 2) / (2 * torch.pi) ** 0.5
        >>> problem.forward(torch.stack([A, A.flip(0)])).shape  # batched over leading dims
        torch.Size([2, 41])
        >>> Problem(tau=tau_grid(20.0, 41), beta=-1.0, grid=grid)
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: Problem: beta=-1.0, expected ...
    """

    tau: Tensor
    beta: float
    grid: Grid
    statistics: str = "fermionic"

    def __post_init__(self):
        if isinstance(self.grid, Grid) and isinstance(self.tau, Tensor):
            object.__setattr__(self, "tau", self.tau.to(self.grid.omega.dtype))
        if isinstance(self.beta, Tensor) and self.beta.numel() == 1:
            object.__setattr__(self, "beta", float(self.beta))
        _check_problem(self, "Problem")
        object.__setattr__(self, "beta", float(self.beta))

    @property
    def n_tau(self) -> int:
        """The number of imaginary times.

        Examples:
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> Problem(tau=tau_grid(5.0, 11), beta=5.0, grid=uniform_grid(-1, 1, 3)).n_tau
            11
        """
        return int(self.tau.shape[0])

    @property
    def n_w(self) -> int:
        """The number of real frequencies.

        Examples:
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> Problem(tau=tau_grid(5.0, 11), beta=5.0, grid=uniform_grid(-1, 1, 3)).n_w
            3
        """
        return len(self.grid)

    @functools.cached_property
    def matrix(self) -> Tensor:
        """``K_w (n_tau, n_w)``: ``kernel(tau, omega) * weights``, so that ``G = A @ K_w.T``.

        Computed once (O(n_tau n_w)) and cached; do not modify it in place.

        Examples:
            >>> import torch
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> grid = uniform_grid(-1.0, 1.0, 3)
            >>> problem = Problem(tau=tau_grid(2.0, 2), beta=2.0, grid=grid)
            >>> problem.matrix.shape
            torch.Size([2, 3])
            >>> float(problem.matrix[0, 1])  # K(0, 0) * weight = 1/2 * 1
            0.5
        """
        kernel = fermionic_kernel if self.statistics == "fermionic" else bosonic_kernel
        return kernel(self.tau, self.grid.omega, self.beta) * self.grid.weights

    def forward(self, A: Tensor) -> Tensor:
        """``G = A @ K_w.T``: the Green's function ``(..., n_tau)`` of spectra ``A (..., n_w)``.

        Batched over the leading dimensions; the result has the promoted dtype of ``A`` and
        the problem. Cost O(batch n_tau n_w).

        Examples:
            >>> import torch
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> grid = uniform_grid(-4.0, 4.0, 81)
            >>> problem = Problem(tau=tau_grid(10.0, 21), beta=10.0, grid=grid)
            >>> flat = torch.full((3, 81), 1 / 8, dtype=torch.float64)
            >>> problem.forward(flat).shape
            torch.Size([3, 21])
        """
        if not isinstance(A, Tensor) or A.ndim < 1 or A.shape[-1] != self.n_w:
            got = f"shape {tuple(A.shape)}" if isinstance(A, Tensor) else type(A).__name__
            raise HypergradientError(
                f"Problem.forward: expected a spectrum tensor of shape (..., n_w={self.n_w}), "
                f"got {got}; evaluate A on problem.grid.omega."
            )
        matrix = self.matrix
        dtype = torch.promote_types(A.dtype, matrix.dtype)
        return A.to(dtype) @ matrix.to(dtype).T

    @functools.cached_property
    def _full_svd(self) -> ReducedKernel:
        U, s, Vh = torch.linalg.svd(self.matrix, full_matrices=False)
        V = Vh.T
        # fix each singular pair's sign (largest |V| entry positive): LAPACK builds differ
        pivot = V.abs().argmax(dim=0)
        sign = torch.sign(V.gather(0, pivot[None, :]))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return ReducedKernel(U=U * sign, s=s, V=V * sign)

    def svd(self, cutoff: float = 1e-12) -> ReducedKernel:
        """The SVD of :attr:`matrix`, keeping the singular values ``s > cutoff * s_max``.

        ``K_w = U diag(s) V^T + (dropped part, of norm <= cutoff * s_max)``; ``r`` is the number
        kept (a few tens above ``1e-10 * s_max`` for ``beta ~ 10-50``: the kernel's singular
        values decay exponentially). ``cutoff=0`` keeps every non-zero one. The full SVD costs
        O(n_tau^2 n_w) (for ``n_tau <= n_w``) once and is cached; each call slices it.

        Args:
            cutoff: relative threshold in ``[0, 1)``.

        Examples:
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> grid = uniform_grid(-8.0, 8.0, 401)
            >>> problem = Problem(tau=tau_grid(20.0, 101), beta=20.0, grid=grid)
            >>> U, s, V = problem.svd(cutoff=1e-10)
            >>> 10 < len(s) < 60, U.shape[1] == V.shape[1] == len(s)
            (True, True)
        """
        if not (isinstance(cutoff, (int, float)) and 0 <= cutoff < 1):
            raise HypergradientError(
                f"Problem.svd: cutoff={cutoff!r}, expected a relative threshold in [0, 1); "
                f"pass e.g. cutoff=1e-12 (keep s > cutoff * s_max)."
            )
        U, s, V = self._full_svd
        keep = int((s > cutoff * s[0]).sum())
        return ReducedKernel(U=U[:, :keep], s=s[:keep], V=V[:, :keep])


# --------------------------------------------------------------------------------------------
# input checks


def check_green(
    G: Tensor, problem: Problem, covariance: Tensor | None = None, *, where: str = "check_green"
) -> None:
    """Check a Green's function (and its noise covariance) against a problem; raise if bad.

    Raises one one-line :class:`~hypergradient.HypergradientError` (what was given, what was
    expected, how to fix it) for: a ``problem`` that is not a :class:`Problem` or whose fields
    are bad (``beta <= 0``; ``tau`` not 1-D, not finite or outside ``[0, beta]``; ``omega`` and
    ``weights`` of different lengths, ``omega`` not strictly increasing, non-finite or negative
    weights; unknown ``statistics``); ``G`` not a real floating tensor, ``G.shape[-1] !=
    len(tau)``, NaN/inf in ``G``; a ``covariance`` that is not ``(n_tau, n_tau)``, not finite,
    not symmetric (to ``1e3 * eps * max|C|``) or not positive definite (its Cholesky fails).
    ``G`` may have leading batch dimensions. Returns None. Cost O(n_tau n_w + batch n_tau) and
    O(n_tau^3) for a covariance.

    Args:
        G: ``(..., n_tau)`` imaginary-time Green's function.
        problem: the :class:`Problem` it belongs to.
        covariance: optional ``(n_tau, n_tau)`` noise covariance of ``G``.
        where: the name of the calling routine, put at the start of the message.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, check_green, tau_grid
        >>> from hypergradient.continuation.kernels import uniform_grid
        >>> problem = Problem(tau=tau_grid(10.0, 11), beta=10.0, grid=uniform_grid(-4, 4, 41))
        >>> check_green(torch.full((11,), 0.5, dtype=torch.float64), problem)  # fine: None
        >>> check_green(torch.ones(12, dtype=torch.float64), problem, where="maxent")
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: maxent: G has shape (12,) but the problem ...
    """
    if not isinstance(problem, Problem):
        raise HypergradientError(
            f"{where}: expected a continuation Problem, got {type(problem).__name__}; build "
            f"one with Problem(tau=tau_grid(beta, n_tau), beta=beta, grid=uniform_grid(...))."
        )
    _check_problem(problem, where)
    n_tau = problem.n_tau
    if not isinstance(G, Tensor):
        raise HypergradientError(
            f"{where}: G is a {type(G).__name__}, expected a torch.Tensor of shape "
            f"(..., {n_tau}); convert it with torch.as_tensor(G, dtype=torch.float64)."
        )
    if not G.is_floating_point():
        raise HypergradientError(
            f"{where}: G has dtype {G.dtype}, expected a real floating dtype (float64); "
            f"convert it with G.double() (pass the real imaginary-time data, not G(i w_n))."
        )
    if G.ndim < 1 or G.shape[-1] != n_tau:
        raise HypergradientError(
            f"{where}: G has shape {tuple(G.shape)} but the problem has len(tau) = {n_tau}, "
            f"expected (..., {n_tau}); give G on problem.tau (one value per imaginary time)."
        )
    if not bool(torch.isfinite(G).all()):
        bad = int((~torch.isfinite(G)).sum())
        raise HypergradientError(
            f"{where}: G (shape {tuple(G.shape)}) contains {bad} NaN/inf value(s), expected "
            f"finite data; drop or repair those measurements first."
        )
    if covariance is not None:
        _check_covariance(where, covariance, n_tau)


def _check_covariance(where: str, covariance: Tensor, n_tau: int) -> None:
    if not isinstance(covariance, Tensor) or not covariance.is_floating_point():
        got = covariance.dtype if isinstance(covariance, Tensor) else type(covariance).__name__
        raise HypergradientError(
            f"{where}: covariance is {got}, expected a real floating tensor of shape "
            f"({n_tau}, {n_tau}); convert it with torch.as_tensor(C, dtype=torch.float64)."
        )
    if covariance.shape != (n_tau, n_tau):
        raise HypergradientError(
            f"{where}: covariance has shape {tuple(covariance.shape)}, expected "
            f"({n_tau}, {n_tau}) (one row and column per imaginary time); pass the covariance "
            f"of G's n_tau values."
        )
    if not bool(torch.isfinite(covariance).all()):
        raise HypergradientError(
            f"{where}: covariance contains NaN/inf, expected finite values; re-estimate it "
            f"from the Monte Carlo bins."
        )
    scale = float(covariance.abs().max())
    asymmetry = float((covariance - covariance.T).abs().max())
    if asymmetry > 1e3 * torch.finfo(covariance.dtype).eps * scale:
        raise HypergradientError(
            f"{where}: covariance is not symmetric (max |C - C^T| = {asymmetry:.3g}, "
            f"max |C| = {scale:.3g}), expected a symmetric matrix; use (C + C.T) / 2."
        )
    _, info = torch.linalg.cholesky_ex(covariance)
    if int(info) != 0:
        raise HypergradientError(
            f"{where}: covariance is not positive definite (its Cholesky factorisation fails "
            f"at column {int(info)}), expected a symmetric positive definite matrix; add a "
            f"small diagonal (C + eps * I) or use more Monte Carlo bins than tau points."
        )


def _check_problem(problem: Problem, where: str) -> None:
    _check_statistics(where, problem.statistics)
    _check_beta(where, problem.beta)
    if not isinstance(problem.grid, Grid):
        raise HypergradientError(
            f"{where}: grid is a {type(problem.grid).__name__}, expected a Grid; build one with "
            f"uniform_grid(w_min, w_max, n) or nonuniform_grid(w_max, n)."
        )
    _check_grid(problem.grid, where)
    tau = _check_vector(where, "tau", problem.tau)
    beta = float(problem.beta)
    if bool((tau < 0).any()) or bool((tau > beta).any()):
        raise HypergradientError(
            f"{where}: tau spans [{float(tau.min())!r}, {float(tau.max())!r}], expected values "
            f"in [0, beta] = [0, {beta!r}]; use tau_grid(beta, n_tau) or check beta."
        )


def _check_grid(grid: Grid, where: str) -> None:
    omega, weights = grid.omega, grid.weights
    for name, value in (("omega", omega), ("weights", weights)):
        if not isinstance(value, Tensor) or value.ndim != 1 or not value.is_floating_point():
            got = (
                f"shape {tuple(value.shape)}, dtype {value.dtype}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise HypergradientError(
                f"{where}: grid {name} is {got}, expected a 1-D real floating tensor; build "
                f"the grid with uniform_grid or nonuniform_grid."
            )
    if omega.shape[0] != weights.shape[0]:
        raise HypergradientError(
            f"{where}: omega has {omega.shape[0]} points but weights has {weights.shape[0]}, "
            f"expected one weight per frequency; give both the same length."
        )
    if omega.shape[0] < 2:
        raise HypergradientError(
            f"{where}: the grid has {omega.shape[0]} point(s), expected at least 2; use "
            f"uniform_grid(w_min, w_max, n) with n >= 2."
        )
    if not (bool(torch.isfinite(omega).all()) and bool(torch.isfinite(weights).all())):
        raise HypergradientError(
            f"{where}: grid omega or weights contain NaN/inf, expected finite values; build the "
            f"grid on a finite window."
        )
    steps = omega.diff()
    if bool((steps <= 0).any()):
        first = int((steps <= 0).nonzero()[0, 0])
        raise HypergradientError(
            f"{where}: grid omega is not strictly increasing (omega[{first}] = "
            f"{float(omega[first])!r} >= omega[{first + 1}] = {float(omega[first + 1])!r}), "
            f"expected increasing frequencies; sort it (and its weights) with omega.argsort() "
            f"and drop duplicates."
        )
    if bool((weights < 0).any()):
        raise HypergradientError(
            f"{where}: grid weights have {int((weights < 0).sum())} negative value(s), expected "
            f"non-negative quadrature weights; use trapezoid weights (uniform_grid)."
        )


def _check_kernel_args(where: str, tau, omega, beta) -> tuple[Tensor, Tensor]:
    tau = _check_vector(where, "tau", tau)
    omega = _check_vector(where, "omega", omega)
    _check_beta(where, beta)
    return tau, omega


def _check_vector(where: str, name: str, value) -> Tensor:
    if not isinstance(value, Tensor) or value.ndim != 1 or not value.is_floating_point():
        got = (
            f"shape {tuple(value.shape)}, dtype {value.dtype}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise HypergradientError(
            f"{where}: {name} is {got}, expected a 1-D real floating tensor; convert it with "
            f"torch.as_tensor({name}, dtype=torch.float64).reshape(-1)."
        )
    if not bool(torch.isfinite(value).all()):
        raise HypergradientError(
            f"{where}: {name} contains NaN/inf, expected finite values; check how it was built."
        )
    return value


def _check_beta(where: str, beta) -> None:
    try:
        if isinstance(beta, (str, bytes)):
            raise TypeError
        value = float(beta)
    except (TypeError, ValueError, RuntimeError):
        raise HypergradientError(
            f"{where}: beta is a {type(beta).__name__}, expected a positive number; pass e.g. "
            f"beta=10.0."
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise HypergradientError(
            f"{where}: beta={value!r}, expected a finite inverse temperature > 0; pass "
            f"beta = 1 / T, e.g. beta=10.0."
        )


def _check_statistics(where: str, statistics) -> None:
    if statistics not in STATISTICS:
        raise HypergradientError(
            f"{where}: statistics={statistics!r}, expected one of {STATISTICS}; pass "
            f"statistics='fermionic' or 'bosonic'."
        )


def _check_count(where: str, name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HypergradientError(
            f"{where}: {name}={value!r}, expected an int >= {minimum}; pass e.g. {name}=101."
        )
    return value
