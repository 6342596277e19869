r"""Finite-sum bilevel problems with a known solution, for tests and benchmarks.

:func:`ridge_problem` is the CPU target of Dagréou et al. (2022) at small scale: ridge
regression whose single penalty :math:`e^x` is tuned on a validation set.  Its solution
:math:`x^*` is computed by bisection on the closed-form hypergradient to machine
precision (a grid would only resolve it to the grid's spacing).

Examples:
    >>> import torch
    >>> from hypergradient.stochastic.problems import ridge_problem
    >>> t = ridge_problem(n_inner=10, n_outer=10, dim=3, batch_size=5)
    >>> t.problem.n_inner_batches, tuple(t.z0.shape), t.x0.dtype
    (2, (3,), torch.float64)
    >>> inner_full = t.problem.full_batch()[0]  # G(z, x), the mean over all inner samples
    >>> z = t.z_star(t.x_star).requires_grad_(True)
    >>> (grad,) = torch.autograd.grad(inner_full(z, t.x_star), z)
    >>> bool(grad.abs().max() < 1e-10), bool(t.hypergradient(t.x_star).abs() < 1e-10)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .._errors import HypergradientError
from ._problem import FiniteSumBilevelProblem


@dataclass(frozen=True)
class StochasticTestProblem:
    r"""A :class:`FiniteSumBilevelProblem` with its exact solution.

    Attributes:
        problem: the finite-sum problem.
        z0, x0: a starting point.
        x_star: the exact minimiser of :math:`h(x) = F(z^*(x), x)`.
        z_star: ``z_star(x)``, the exact inner solution :math:`z^*(x)`.
        v_star: ``v_star(x)``, :math:`-[\nabla^2_{zz}G]^{-1}\nabla_z F` at :math:`z^*(x)`.
        hypergradient: ``hypergradient(x)``, the exact :math:`h'(x)` (closed form).
        value: ``value(x)``, :math:`h(x)`.
        data: the problem's constants.
    """

    problem: FiniteSumBilevelProblem
    z0: torch.Tensor
    x0: torch.Tensor
    x_star: torch.Tensor
    z_star: Callable[[torch.Tensor], torch.Tensor]
    v_star: Callable[[torch.Tensor], torch.Tensor]
    hypergradient: Callable[[torch.Tensor], torch.Tensor]
    value: Callable[[torch.Tensor], torch.Tensor]
    data: dict = field(default_factory=dict)


def ridge_problem(
    n_inner: int = 50,
    n_outer: int = 50,
    dim: int = 10,
    noise: float = 2.0,
    batch_size: int = 5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> StochasticTestProblem:
    r"""Ridge regression with a scalar log-penalty :math:`x`, tuned on validation data.

    .. math::

        g_i(z, x) = \tfrac12 (a_i^\top z - b_i)^2 + \tfrac12 e^{x}\lVert z\rVert^2,\qquad
        f_j(z, x) = \tfrac12 (c_j^\top z - d_j)^2 .

    With :math:`H = A^\top A/n + e^x I`: :math:`z^* = H^{-1}A^\top b/n`,
    :math:`\partial z^*/\partial x = -e^x H^{-1} z^*`, so with
    :math:`r = \nabla_z F(z^*) = C^\top(Cz^* - d)/m`,
    :math:`v^* = -H^{-1} r` and :math:`h'(x) = -e^x\, z^{*\top} H^{-1} r = e^x z^{*\top} v^*`.
    Data: Gaussian features, :math:`b = A w + \text{noise}\cdot\epsilon` (same for the
    validation set); the noise makes the optimal penalty interior.  The defaults (50 + 50
    samples, 10 features, batches of 5) keep a run of a few thousand steps to about a
    second; Dagréou et al.'s target is ``n_inner=n_outer=100, dim=50, noise=5,
    batch_size=10``.  The solution is found
    by bisection of :math:`h'` on :math:`[-12, 12]` (error below 1e-13); a problem whose
    optimum is outside raises :class:`~hypergradient.HypergradientError`.

    Examples:
        >>> from hypergradient.stochastic.problems import ridge_problem
        >>> t = ridge_problem()
        >>> abs(float(t.hypergradient(t.x_star))) < 1e-12, round(float(t.x_star), 3)
        (True, -1.687)
    """
    gen = torch.Generator().manual_seed(seed)
    device = torch.empty(0).device  # the default device; the data is drawn on the CPU

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype, device="cpu").to(device)

    A, C, w = randn(n_inner, dim), randn(n_outer, dim), randn(dim)
    b = A @ w + noise * randn(n_inner)
    d = C @ w + noise * randn(n_outer)

    def inner_loss(z, x, idx):
        r = A[idx] @ z - b[idx]
        return 0.5 * (r @ r) / len(idx) + 0.5 * torch.exp(x) * (z @ z)

    def outer_loss(z, x, idx):
        r = C[idx] @ z - d[idx]
        return 0.5 * (r @ r) / len(idx)

    gram, rhs = A.T @ A / n_inner, A.T @ b / n_inner
    eye = torch.eye(dim, dtype=dtype)

    def z_star(x):
        return torch.linalg.solve(gram + torch.exp(x) * eye, rhs)

    def v_star(x):
        z = z_star(x)
        return -torch.linalg.solve(gram + torch.exp(x) * eye, C.T @ (C @ z - d) / n_outer)

    def hypergradient(x):
        return torch.exp(x) * (z_star(x) @ v_star(x))

    def value(x):
        r = C @ z_star(x) - d
        return 0.5 * (r @ r) / n_outer

    lo, hi = torch.tensor(-12.0, dtype=dtype), torch.tensor(12.0, dtype=dtype)
    if not (hypergradient(lo) < 0 < hypergradient(hi)):
        slopes = f"h'(-12)={float(hypergradient(lo)):.3e}, h'(12)={float(hypergradient(hi)):.3e}"
        raise HypergradientError(
            f"hypergradient.stochastic.problems.ridge_problem(noise={noise!r}, seed={seed!r}): "
            f"the optimal log-penalty is not inside [-12, 12] ({slopes}); change noise or seed."
        )
    for _ in range(200):  # bisection: h' < 0 left of x*, > 0 right of it
        mid = 0.5 * (lo + hi)
        if hypergradient(mid) < 0:
            lo = mid
        else:
            hi = mid
        if float(hi - lo) < 1e-14:
            break
    x_star = 0.5 * (lo + hi)
    problem = FiniteSumBilevelProblem(
        inner_loss,
        outer_loss,
        n_inner,
        n_outer,
        inner_batch_size=batch_size,
        outer_batch_size=batch_size,
    )
    return StochasticTestProblem(
        problem=problem,
        z0=torch.zeros(dim, dtype=dtype),
        x0=torch.tensor(0.0, dtype=dtype),
        x_star=x_star,
        z_star=z_star,
        v_star=v_star,
        hypergradient=hypergradient,
        value=value,
        data={"A": A, "b": b, "C": C, "d": d, "w": w},
    )
