r"""Forward solvers for an equilibrium :math:`z^\star = f(z^\star)`: iteration, Anderson, Broyden.

Every solver implements :class:`AbstractFixedPointSolver`: it sees the map only through
``fn(z) -> f(z)`` on a batch ``z`` of shape ``(batch, ...)``, runs without building an
autograd graph (the layer calls it under ``torch.no_grad()``), and reports in a
:class:`~hypergradient._results.SolveStats` how the solve ended.  None of them fails
silently.

Which one to use:

* ``"fixed_point"`` (:class:`FixedPointIteration`): :math:`z \leftarrow (1-\beta) z + \beta
  f(z)`.  Converges linearly, at the contraction rate of ``f``; the reference.
* ``"anderson"`` (:class:`Anderson`): Anderson acceleration (type II) over the last ``m``
  iterates.  The default; usually 3-10x fewer evaluations of ``f`` than plain iteration.
* ``"broyden"`` (:class:`Broyden`): Broyden's "good" quasi-Newton method on the residual
  :math:`g(z) = f(z) - z` (the DEQ default of Bai et al. 2019), with a low-rank inverse
  Jacobian of at most ``memory`` updates.

**Residual and convergence.**  For sample :math:`i` of the batch (dimension 0, flattened
over the other dimensions) the residual is :math:`r_i = \|f(z_i) - z_i\|`; the solve has
converged when :math:`r_i \le \max(\mathrm{tol}\,\|f(z_i)\|, \mathrm{atol})` for every
:math:`i`.  ``stats.residual_norm`` is :math:`\max_i r_i / \|f(z_i)\|` (relative),
``stats.extra["abs_residual"]`` is :math:`\max_i r_i`, ``stats.extra["residual_history"]``
lists the relative residual after each evaluation (``"abs_residual_history"`` the
absolute one) and ``stats.num_matvecs`` counts the
evaluations of ``f``.  Each sample keeps the iterate with its smallest residual seen, so a
non-monotone method (Broyden) never returns a worse point than it visited.

**Batches.**  Anderson and Broyden fit their coefficients per sample, which is right when
``f`` treats the samples of a batch independently (no batch norm across them).  For a map
that couples the samples, use :class:`FixedPointIteration` or pass the batch as one sample
(shape ``(1, ...)``).

Outcomes: ``SUCCESSFUL``; ``MAX_STEPS_REACHED``; ``DIVERGED`` when the largest residual
exceeds ``1e6`` times its initial value (``f`` is not a contraction around the iterates);
``NONFINITE`` when ``f`` returns NaN/inf.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._errors import HypergradientError
from .._results import Result, Solution, SolveStats

__all__ = [
    "AbstractFixedPointSolver",
    "Anderson",
    "Broyden",
    "FixedPointIteration",
    "get_fixed_point_solver",
]

Map = Callable[[torch.Tensor], torch.Tensor]

# A residual this many times its initial value means the iterates run away from any fixed
# point: stop early instead of spending max_steps evaluations on overflow.
_DIVERGENCE_FACTOR = 1e6


def _check_int(where: str, name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise HypergradientError(
            f"{where}: `{name}` must be an integer >= {minimum}, got {value!r}. {fix}"
        )


def _check_real(
    where: str, name: str, value: Any, low: float, high: float, fix: str, *, open_low: bool
) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if open_low else v >= low) and v <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise HypergradientError(
            f"{where}: `{name}` must be a number in {bracket}{low:g}, {high:g}], got "
            f"{value!r}. {fix}"
        )


def _check_tolerances(where: str, max_steps: Any, tol: Any, atol: Any) -> None:
    _check_int(where, "max_steps", max_steps, 1, "Pass e.g. max_steps=100.")
    _check_real(
        where,
        "tol",
        tol,
        0.0,
        math.inf,
        "Pass a relative tolerance such as tol=1e-5.",
        open_low=False,
    )
    _check_real(
        where,
        "atol",
        atol,
        0.0,
        math.inf,
        "Pass an absolute tolerance such as atol=0.0 or 1e-8.",
        open_low=False,
    )


class AbstractFixedPointSolver(abc.ABC):
    """Find ``z`` with ``fn(z) = z`` for a batch of independent samples.

    Contract of :meth:`solve` (documented once, here):

    * ``fn`` maps a tensor shaped like ``z0`` (dimension 0 is the batch) to a tensor of the
      same shape and dtype.  It is called without gradient tracking by the layer; a solver
      never differentiates through it.
    * ``z0`` is the starting point (zeros, or a warm start from a previous solve).
    * The returned ``Solution.value`` is shaped like ``z0``; ``Solution.stats`` says
      whether every sample converged (see the module docstring for the residual), how many
      iterations and evaluations of ``fn`` it took, and the history of the residual.

    Subclasses are final dataclasses with ``max_steps``, ``tol`` and ``atol`` fields that
    validate their options in ``__post_init__`` and set the class attribute ``name``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> class Picard(hg.deq.AbstractFixedPointSolver):  # z <- fn(z), max_steps times
        ...     name, max_steps, tol, atol = "picard", 60, 1e-5, 0.0
        ...     def solve(self, fn, z0):
        ...         z, n = z0, self.max_steps
        ...         for _ in range(n):
        ...             z = fn(z)
        ...         res = float((fn(z) - z).norm() / fn(z).norm())
        ...         ok = hg.Result.SUCCESSFUL if res <= self.tol else hg.Result.MAX_STEPS_REACHED
        ...         return hg.Solution(z, hg.SolveStats(ok, n, res, n + 1))
        >>> z, stats = Picard().solve(lambda z: 0.5 * z + 1.0, torch.zeros(4, 3))  # z* = 2
        >>> bool(torch.allclose(z, torch.full((4, 3), 2.0))), stats.converged
        (True, True)
    """

    name: ClassVar[str]
    max_steps: int
    tol: float
    atol: float

    @abc.abstractmethod
    def solve(self, fn: Map, z0: torch.Tensor) -> Solution:
        """Return ``Solution(z, stats)`` with ``fn(z) ~= z``; see the class docstring."""


class _Monitor:
    """Per-sample residuals, best iterates, history and the stopping decision (shared)."""

    def __init__(self, solver: AbstractFixedPointSolver, x: torch.Tensor, fx: torch.Tensor):
        self.solver = solver
        self.history: list[float] = []
        self.abs_history: list[float] = []
        self.evals = 1
        self.best_x = x.clone()
        self.best_r = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
        self.best_scale = torch.ones_like(self.best_r)
        self.initial_abs: float | None = None
        self.result: Result | None = None
        self.update(x, fx, counted=False)

    def update(self, x: torch.Tensor, fx: torch.Tensor, *, counted: bool = True) -> bool:
        """Record ``(x, f(x))`` (rows are samples); return True when the solve should stop."""
        if counted:
            self.evals += 1
        r = torch.linalg.vector_norm(fx - x, dim=1)
        scale = torch.linalg.vector_norm(fx, dim=1)
        finite = torch.isfinite(r)
        better = finite & (r < self.best_r)
        self.best_x = torch.where(better[:, None], x, self.best_x)
        self.best_r = torch.where(better, r, self.best_r)
        self.best_scale = torch.where(better, scale, self.best_scale)
        tiny = torch.finfo(r.dtype).tiny
        threshold = torch.clamp(self.solver.tol * self.best_scale, min=self.solver.atol)
        done = self.best_r <= threshold
        # One host synchronisation per step: everything the stopping test needs.
        all_finite, all_done, max_rel, max_abs = torch.stack(
            [
                finite.all().to(r.dtype),
                done.all().to(r.dtype),
                (r / scale.clamp_min(tiny)).max(),
                r.max(),
            ]
        ).tolist()
        self.history.append(max_rel)
        self.abs_history.append(max_abs)
        if not all_finite:
            self.result = Result.NONFINITE
        elif all_done:
            self.result = Result.SUCCESSFUL
        elif self.initial_abs is None:
            self.initial_abs = max_abs
        elif max_abs > _DIVERGENCE_FACTOR * max(self.initial_abs, tiny):
            self.result = Result.DIVERGED
        return self.result is not None

    def solution(self, shape: torch.Size, steps: int, **extra: Any) -> Solution:
        result = Result.MAX_STEPS_REACHED if self.result is None else self.result
        tiny = torch.finfo(self.best_r.dtype).tiny
        rel = self.best_r / self.best_scale.clamp_min(tiny)
        rel_f, abs_f = torch.stack([rel.max(), self.best_r.max()]).tolist()
        stats = SolveStats(
            result=result,
            num_steps=steps,
            residual_norm=rel_f,
            num_matvecs=self.evals,
            extra={
                "solver": self.solver.name,
                "abs_residual": abs_f,
                "initial_residual": self.history[0],
                "residual_history": list(self.history),
                "abs_residual_history": list(self.abs_history),
                "tol": self.solver.tol,
                "atol": self.solver.atol,
                **extra,
            },
        )
        return Solution(self.best_x.reshape(shape), stats)


def _flat_map(fn: Map, shape: torch.Size) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` on rows: ``(batch, d) -> (batch, d)`` for a map on tensors of ``shape``."""
    batch = shape[0]
    return lambda x: fn(x.reshape(shape)).reshape(batch, -1)


def _check_start(where: str, z0: Any) -> None:
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point() or z0.dim() < 1:
        got = (
            f"a tensor of dtype {z0.dtype} and shape {tuple(z0.shape)}"
            if isinstance(z0, torch.Tensor)
            else type(z0).__name__
        )
        raise HypergradientError(
            f"{where}.solve(fn, z0): z0 must be a floating-point tensor with a batch "
            f"dimension first, shape (batch, ...), got {got}. Add a batch dimension with "
            f"z0.unsqueeze(0)."
        )


# --------------------------------------------------------------------------------------
# plain (damped) fixed-point iteration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedPointIteration(AbstractFixedPointSolver):
    r"""Damped fixed-point (Picard / Krasnoselskii-Mann) iteration.

    .. math::

        z_{t+1} = (1 - \beta)\, z_t + \beta\, f(z_t)

    converges to the unique fixed point for any start when ``f`` is a contraction
    (:math:`\|f(a) - f(b)\| \le \rho \|a - b\|`, :math:`\rho < 1`) and :math:`\beta = 1`,
    with the error shrinking like :math:`\rho^t`: reaching a relative tolerance ``tol``
    takes about :math:`\log(\mathrm{tol}) / \log \rho` evaluations (220 for
    :math:`\rho = 0.95`, ``tol=1e-5``).  :math:`\beta < 1` helps a map whose Jacobian has
    eigenvalues near :math:`-1` (oscillation).

    Args:
        max_steps: maximum number of iterations (``>= 1``); one evaluation of ``f`` each.
        tol: relative tolerance (``>= 0``), see the module docstring.
        atol: absolute tolerance (``>= 0``): a sample whose residual is below it counts as
            converged whatever its scale (set it when a fixed point may be at zero, where
            the relative residual cannot shrink).
        mixing: :math:`\beta \in (0, 1]`.

    Cost: ``max_steps + 1`` evaluations of ``f`` at most; 3 batch-sized tensors of memory;
    one host synchronisation per step.

    Examples:
        >>> import torch
        >>> fn = lambda z: 0.5 * z + 1.0  # z* = 2
        >>> z, stats = FixedPointIteration(tol=1e-12).solve(fn, torch.zeros(3, 1))
        >>> bool(torch.allclose(z, torch.full((3, 1), 2.0))), stats.converged
        (True, True)
    """

    max_steps: int = 100
    tol: float = 1e-5
    atol: float = 0.0
    mixing: float = 1.0

    name: ClassVar[str] = "fixed_point"

    def __post_init__(self) -> None:
        where = (
            f"hypergradient.deq.FixedPointIteration(max_steps={self.max_steps!r}, "
            f"tol={self.tol!r}, atol={self.atol!r}, mixing={self.mixing!r})"
        )
        _check_tolerances(where, self.max_steps, self.tol, self.atol)
        _check_real(
            where,
            "mixing",
            self.mixing,
            0.0,
            1.0,
            "Pass mixing=1.0 (plain iteration) or a value such as 0.5 for an oscillating map.",
            open_low=True,
        )

    def solve(self, fn: Map, z0: torch.Tensor) -> Solution:
        _check_start("hypergradient.deq.FixedPointIteration", z0)
        g = _flat_map(fn, z0.shape)
        x = z0.reshape(z0.shape[0], -1)
        fx = g(x)
        monitor = _Monitor(self, x, fx)
        steps = 0
        while monitor.result is None and steps < self.max_steps:
            x = fx if self.mixing == 1.0 else torch.lerp(x, fx, self.mixing)
            fx = g(x)
            steps += 1
            monitor.update(x, fx)
        return monitor.solution(z0.shape, steps)


# --------------------------------------------------------------------------------------
# Anderson acceleration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anderson(AbstractFixedPointSolver):
    r"""Anderson acceleration (type II) of the fixed-point iteration, per sample.

    Keeps the last :math:`n \le m` iterates :math:`x_j` and their images :math:`f_j =
    f(x_j)` with residuals :math:`g_j = f_j - x_j`, and takes

    .. math::

        \alpha = \arg\min_{\sum_j \alpha_j = 1} \Big\|\sum_j \alpha_j g_j\Big\|^2, \qquad
        x_{\rm new} = \beta \sum_j \alpha_j f_j + (1 - \beta) \sum_j \alpha_j x_j .

    The constrained least squares problem is solved through its normal equations
    :math:`\alpha \propto D^{-1} (\hat G \hat G^\top + \epsilon I)^{-1} D^{-1}
    \mathbf 1`, where :math:`\hat G = D^{-1} G` holds the residuals scaled to unit norm
    (:math:`D = \mathrm{diag}(\|g_j\|)`), so the ridge :math:`\epsilon` is relative and
    the step does not degrade as the residuals shrink.
    On a linear map Anderson is equivalent to GMRES on :math:`(I - J) z = b`.

    Args:
        max_steps: maximum number of iterations (``>= 1``); one evaluation of ``f`` each.
        tol: relative tolerance (``>= 0``), see the module docstring.
        atol: absolute tolerance (``>= 0``).
        memory: :math:`m \ge 1`, the number of past iterates mixed.
        mixing: :math:`\beta \in (0, 1]`.
        ridge: :math:`\epsilon > 0`, relative regularisation of the normal equations.

    Cost per iteration: one evaluation of ``f``, :math:`O(m d)` flops per sample
    (:math:`d` = size of a sample) for one new row of the Gram matrix and the mixing, a
    batched :math:`m \times m` solve; memory :math:`3 m` batch-sized tensors; one host
    synchronisation.

    Examples:
        >>> import torch
        >>> fn = lambda z: 0.9 * z + 1.0  # z* = 10; plain iteration needs ~290 steps for 1e-12
        >>> z, stats = Anderson(tol=1e-12).solve(fn, torch.zeros(2, 4, dtype=torch.float64))
        >>> bool(torch.allclose(z, torch.full((2, 4), 10.0, dtype=torch.float64)))
        True
        >>> stats.num_steps < 10
        True

    References:
        Anderson (1965), Iterative procedures for nonlinear integral equations; Walker & Ni
        (2011), Anderson acceleration for fixed-point iterations.
    """

    max_steps: int = 50
    tol: float = 1e-5
    atol: float = 0.0
    memory: int = 5
    mixing: float = 1.0
    ridge: float = 1e-8

    name: ClassVar[str] = "anderson"

    def __post_init__(self) -> None:
        where = (
            f"hypergradient.deq.Anderson(max_steps={self.max_steps!r}, tol={self.tol!r}, "
            f"atol={self.atol!r}, memory={self.memory!r}, mixing={self.mixing!r}, "
            f"ridge={self.ridge!r})"
        )
        _check_tolerances(where, self.max_steps, self.tol, self.atol)
        _check_int(where, "memory", self.memory, 1, "Pass e.g. memory=5.")
        _check_real(where, "mixing", self.mixing, 0.0, 1.0, "Pass e.g. mixing=1.0.", open_low=True)
        _check_real(
            where,
            "ridge",
            self.ridge,
            0.0,
            1.0,
            "Pass a small relative ridge such as 1e-8.",
            open_low=True,
        )

    def solve(self, fn: Map, z0: torch.Tensor) -> Solution:
        _check_start("hypergradient.deq.Anderson", z0)
        g = _flat_map(fn, z0.shape)
        batch = z0.shape[0]
        x = z0.reshape(batch, -1)
        fx = g(x)
        monitor = _Monitor(self, x, fx)
        m = self.memory
        xs = x.new_zeros(batch, m, x.shape[1])
        fs = x.new_zeros(batch, m, x.shape[1])
        # Residuals g_j = f_j - x_j are kept as unit directions u_j and norms n_j, with the
        # Gram matrix of the directions updated one row per step: O(m d) work per sample
        # and step instead of O(m^2 d), and no squared norms that could underflow.
        us = x.new_zeros(batch, m, x.shape[1])
        ns = x.new_zeros(batch, m)
        gram = x.new_zeros(batch, m, m)
        eye = torch.eye(m, dtype=x.dtype, device=x.device)
        tiny, eps = torch.finfo(x.dtype).tiny, torch.finfo(x.dtype).eps

        def store(slot: int, x: torch.Tensor, fx: torch.Tensor) -> None:
            xs[:, slot], fs[:, slot] = x, fx
            g = fx - x
            norm = torch.linalg.vector_norm(g, dim=1)
            ns[:, slot] = norm
            us[:, slot] = g / norm.clamp_min(tiny)[:, None]
            row = (us @ us[:, slot, :, None])[:, :, 0]  # <u_j, u_slot>; unfilled slots give 0
            gram[:, slot, :] = row
            gram[:, :, slot] = row

        store(0, x, fx)
        steps = 0
        while monitor.result is None and steps < self.max_steps:
            n = min(steps + 1, m)  # points stored so far
            # alpha ~ (G G^T)^-1 1 = D^-1 (Gh Gh^T)^-1 D^-1 1 with rows Gh = D^-1 G of unit
            # norm: the ridge acts on the scaled rows, so it stays relative to the *smallest*
            # residuals and the accuracy does not stall at ridge * (oldest residual).  D is
            # floored at eps times the largest residual, so an exactly zero residual (a sample
            # already at its fixed point) gets a large but finite weight.
            norms = ns[:, :n]
            top = norms.amax(dim=1, keepdim=True).clamp_min(tiny)
            scale = (norms / top).clamp_min(eps)  # D / top
            c = norms / (scale * top)  # Gh_j = c_j u_j, c_j in [0, 1]
            H = gram[:, :n, :n] * (c[:, :, None] * c[:, None, :]) + self.ridge * eye[:n, :n]
            a = torch.linalg.solve(H, (1.0 / scale)[:, :, None]) / scale[:, :, None]
            alpha = a / a.sum(dim=1, keepdim=True)  # (batch, n, 1), sums to one
            mixed_f = (alpha * fs[:, :n]).sum(dim=1)
            if self.mixing == 1.0:
                x = mixed_f
            else:
                x = torch.lerp((alpha * xs[:, :n]).sum(dim=1), mixed_f, self.mixing)
            fx = g(x)
            steps += 1
            store(steps % m, x, fx)
            monitor.update(x, fx)
        return monitor.solution(z0.shape, steps, memory=m)


# --------------------------------------------------------------------------------------
# Broyden's method
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broyden(AbstractFixedPointSolver):
    r"""Broyden's "good" method on the residual :math:`g(z) = f(z) - z`, per sample.

    Keeps an approximation :math:`B \approx (\partial g / \partial z)^{-1}` as the identity
    guess :math:`-I` (exact when :math:`\partial f/\partial z = 0`) plus rank-one updates,
    :math:`B = -I + \sum_j u_j v_j^\top`, and iterates

    .. math::

        \Delta z = -B\, g(z), \quad z \leftarrow z + \Delta z, \quad
        B \leftarrow B + \frac{(\Delta z - B\,\Delta g)\,\Delta z^\top B}
                              {\Delta z^\top B\, \Delta g}

    (Sherman-Morrison form of the secant update).  The first step is a plain fixed-point
    step.  There is no line search (as in the DEQ reference implementation), so each
    sample keeps the iterate with its smallest residual.  After ``memory`` updates the
    approximation restarts from :math:`-I`; an update whose denominator is negligible is
    skipped for that sample.

    Args:
        max_steps: maximum number of iterations (``>= 1``); one evaluation of ``f`` each.
        tol: relative tolerance (``>= 0``), see the module docstring.
        atol: absolute tolerance (``>= 0``).
        memory: number of rank-one updates kept before a restart (``>= 1``).

    Cost per iteration: one evaluation of ``f`` and :math:`O(m d)` flops per sample for
    the two products with :math:`B`; memory :math:`2 m` batch-sized tensors; one host
    synchronisation.

    Examples:
        >>> import torch
        >>> fn = lambda z: 0.9 * z + 1.0  # linear: Broyden finds z* = 10 in a few steps
        >>> z, stats = Broyden(tol=1e-12).solve(fn, torch.zeros(2, 3, dtype=torch.float64))
        >>> bool(torch.allclose(z, torch.full((2, 3), 10.0, dtype=torch.float64)))
        True

    References:
        Broyden (1965), A class of methods for solving nonlinear simultaneous equations;
        Bai, Kolter, Koltun (2019), Deep Equilibrium Models.
    """

    max_steps: int = 50
    tol: float = 1e-5
    atol: float = 0.0
    memory: int = 30

    name: ClassVar[str] = "broyden"

    def __post_init__(self) -> None:
        where = (
            f"hypergradient.deq.Broyden(max_steps={self.max_steps!r}, tol={self.tol!r}, "
            f"atol={self.atol!r}, memory={self.memory!r})"
        )
        _check_tolerances(where, self.max_steps, self.tol, self.atol)
        _check_int(where, "memory", self.memory, 1, "Pass e.g. memory=30.")

    def solve(self, fn: Map, z0: torch.Tensor) -> Solution:
        _check_start("hypergradient.deq.Broyden", z0)
        f = _flat_map(fn, z0.shape)
        batch = z0.shape[0]
        x = z0.reshape(batch, -1)
        fx = f(x)
        monitor = _Monitor(self, x, fx)
        gx = fx - x
        d, m = x.shape[1], self.memory
        us = x.new_zeros(batch, d, m)  # B = -I + us @ vs^T
        vs = x.new_zeros(batch, d, m)
        count = 0  # rank-one terms in use
        eps = torch.finfo(x.dtype).eps

        def apply_b(v: torch.Tensor) -> torch.Tensor:  # B v, rows are samples
            low_rank = us[:, :, :count] @ (vs[:, :, :count].transpose(1, 2) @ v[:, :, None])
            return -v + low_rank[:, :, 0]

        def apply_bt(v: torch.Tensor) -> torch.Tensor:  # B^T v
            low_rank = vs[:, :, :count] @ (us[:, :, :count].transpose(1, 2) @ v[:, :, None])
            return -v + low_rank[:, :, 0]

        steps = 0
        while monitor.result is None and steps < self.max_steps:
            dx = -apply_b(gx)
            x = x + dx
            fx = f(x)
            steps += 1
            if monitor.update(x, fx):
                break
            g_new = fx - x
            dg = g_new - gx
            gx = g_new
            if count == m:  # restart the inverse-Jacobian approximation
                count = 0
                us.zero_()
                vs.zero_()
            b_dg = apply_b(dg)
            denom = (dx * b_dg).sum(dim=1)
            # Skip the update of a sample whose secant condition is numerically degenerate.
            scale = torch.linalg.vector_norm(dx, dim=1) * torch.linalg.vector_norm(b_dg, dim=1)
            ok = denom.abs() > 1e3 * eps * scale
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = torch.where(ok[:, None], (dx - b_dg) / safe[:, None], torch.zeros_like(dx))
            v = apply_bt(dx)
            us[:, :, count] = u
            vs[:, :, count] = v
            count += 1
        return monitor.solution(z0.shape, steps, memory=m)


_SOLVERS: dict[str, type[AbstractFixedPointSolver]] = {
    cls.name: cls for cls in (FixedPointIteration, Anderson, Broyden)
}


def get_fixed_point_solver(
    solver: str | AbstractFixedPointSolver, where: str = "hypergradient.deq"
) -> AbstractFixedPointSolver:
    """A solver from its name (with default options) or an instance passed through.

    Examples:
        >>> import hypergradient as hg
        >>> hg.deq.get_fixed_point_solver("broyden")
        Broyden(max_steps=50, tol=1e-05, atol=0.0, memory=30)
        >>> solver = hg.deq.Anderson(tol=1e-8)
        >>> hg.deq.get_fixed_point_solver(solver) is solver
        True
        >>> hg.deq.get_fixed_point_solver("newton")
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: hypergradient.deq: solver='newton' is not known; ...
    """
    if isinstance(solver, AbstractFixedPointSolver):
        return solver
    if isinstance(solver, str) and solver in _SOLVERS:
        return _SOLVERS[solver]()
    raise HypergradientError(
        f"{where}: solver={solver!r} is not known; expected one of {sorted(_SOLVERS)} or an "
        f"instance such as hypergradient.deq.Anderson(tol=1e-6, max_steps=100)."
    )
