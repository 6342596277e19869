"""The linear solvers: CG, MINRES, GMRES, truncated Neumann series, identity and dense.

Every solver implements :class:`~hypergradient.linalg._base.AbstractLinearSolver`: it sees
the operator ``A`` only through ``matvec(x) = A x``, works on a plain tensor or a dict of
tensors (a *tree*), and reports in :class:`~hypergradient._results.SolveStats` how the solve
ended; none of them fails silently.

Which one to use:

* ``"cg"`` (:class:`CG`): symmetric positive definite ``A`` (a Hessian at a strict
  minimum, a Gauss-Newton matrix, anything damped enough).  The default.
* ``"minres"`` (:class:`MINRES`): symmetric but possibly indefinite ``A`` (a Hessian at a
  saddle point or with negative curvature).
* ``"gmres"`` (:class:`GMRES`): any non-singular ``A``, symmetric or not (e.g. the
  Jacobian of a fixed-point map).
* ``"neumann"`` (:class:`Neumann`): a truncated Neumann series, the cheap approximate
  inverse used by hypergradient methods that want a fixed cost.
* ``"identity"`` (:class:`Identity`): ``A^{-1} ~= alpha I``, zero matvecs.
* ``"exact"`` (:class:`Dense`): materialise ``A`` and solve directly; small problems and
  tests only.

The scalar recurrences of CG, MINRES and GMRES are kept as 0-d tensors, so a solve can be
differentiated through with autograd when ``b`` or the operator carries a graph; the loops
synchronise with the host once per step (to test convergence).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import HypergradientError
from .._results import Result, Solution, SolveStats
from .._tree import (
    Tree,
    tree_axpy,
    tree_detach,
    tree_dot,
    tree_flatten_vector,
    tree_leaves,
    tree_map,
    tree_norm,
    tree_scale,
    tree_size,
    tree_sub,
    tree_unflatten_vector,
    tree_zeros_like,
)
from ._base import AbstractLinearSolver, MatVec, register_solver

__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "Dense",
    "Identity",
    "Neumann",
    "diagonal_preconditioner",
    "estimate_lambda_max",
]

# A term of the Neumann series this many times larger than the right-hand side means the
# series diverges (0 < alpha * lambda < 2 is violated for some eigenvalue lambda).
_DIVERGENCE_FACTOR = 1e6
# MINRES / GMRES: a new diagonal entry of the triangular factor below this many machine
# epsilons times its column's norm means the projected matrix is singular to working precision.
_SINGULAR_EPS = 16.0


# --------------------------------------------------------------------------------------
# option checks
# --------------------------------------------------------------------------------------


def _check_int(where: str, name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise HypergradientError(
            f"{where}: `{name}` must be an integer >= {minimum}, got {value!r}. {fix}"
        )


def _check_float(
    where: str,
    name: str,
    value: Any,
    fix: str,
    *,
    minimum: float = 0.0,
    strict: bool = False,
) -> None:
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = is_real and math.isfinite(float(value))
    if ok:
        ok = float(value) > minimum if strict else float(value) >= minimum
    if not ok:
        relation = ">" if strict else ">="
        raise HypergradientError(
            f"{where}: `{name}` must be a finite number {relation} {minimum:g}, got "
            f"{value!r}. {fix}"
        )


def _check_common(
    where: str, max_steps: Any, tol: Any, atol: Any | None = None, damping: Any | None = None
):
    _check_int(where, "max_steps", max_steps, 0, "Pass e.g. max_steps=100.")
    _check_float(where, "tol", tol, "Pass a relative tolerance such as tol=1e-8.")
    if atol is not None:
        _check_float(where, "atol", atol, "Pass an absolute tolerance such as atol=0.0.")
    if damping is not None:
        _check_float(
            where,
            "damping",
            damping,
            "damping adds damping * I to the operator; pass 0.0 for none or a small "
            "positive value such as 1e-3.",
        )


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _damped(matvec: MatVec, damping: float) -> MatVec:
    """``v -> A v + damping * v`` (``matvec`` itself when ``damping == 0``)."""
    if damping == 0.0:
        return matvec
    return lambda v: tree_axpy(damping, v, matvec(v))


def _floats(*scalars: torch.Tensor) -> list[float]:
    """Copy a few 0-d tensors to Python floats in one host synchronisation."""
    return torch.stack([s.detach().reshape(()) for s in scalars]).tolist()


def _stats(result: Result, steps: int, residual: float, matvecs: int, **extra: Any) -> SolveStats:
    return SolveStats(
        result=result,
        num_steps=steps,
        residual_norm=float(residual),
        num_matvecs=matvecs,
        extra=extra,
    )


def _initial_residual(matvec: MatVec, b: Tree, x0: Tree | None) -> tuple[Tree, Tree, int]:
    """``(x, r = b - A x, matvecs)`` with ``x = x0`` or zeros (zeros cost no matvec)."""
    if x0 is None:
        return tree_zeros_like(b), b, 0
    return x0, tree_sub(b, matvec(x0)), 1


# --------------------------------------------------------------------------------------
# power iteration and preconditioners
# --------------------------------------------------------------------------------------


def estimate_lambda_max(
    matvec: MatVec,
    like: Tree,
    num_steps: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    """Estimate the largest-magnitude eigenvalue ``|lambda|_max`` of ``A`` by power iteration.

    Starting from a random unit vector ``v`` (drawn on the CPU from ``generator``, by default
    ``torch.Generator().manual_seed(0)`` so the estimate is deterministic, then moved to the
    device and dtype of ``like``), repeat ``w = A v; rho = v^T w; v = w / ||w||`` and return
    ``|rho|``, the Rayleigh quotient of the last iterate.  For a symmetric ``A`` the
    relative error of ``rho`` decays like ``(lambda_2 / lambda_1)^(2 k)``, and it never
    exceeds ``lambda_max`` for a positive semi-definite ``A``.

    Args:
        matvec: ``v -> A v`` on trees shaped like ``like``.
        like: a tree giving the structure, shapes, dtype and device of the vectors.
        num_steps: number of power steps (``>= 1``).
        generator: CPU random generator for the starting vector.

    Cost: ``num_steps`` matvecs, 3 vectors of memory, one host synchronisation.

    Examples:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 10.0], dtype=torch.float64))
        >>> round(estimate_lambda_max(lambda v: A @ v, torch.zeros(3, dtype=A.dtype), 60), 6)
        10.0
    """
    where = "hypergradient.linalg.estimate_lambda_max"
    _check_int(where, "num_steps", num_steps, 1, "Pass e.g. num_steps=20.")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    v = tree_map(
        lambda t: torch.randn(t.shape, generator=generator, dtype=torch.float64).to(
            device=t.device, dtype=t.dtype
        ),
        like,
    )
    v = tree_scale(v, 1.0 / tree_norm(v))
    rho = torch.zeros((), dtype=tree_leaves(like)[0].dtype)
    for _ in range(num_steps):
        w = matvec(v)
        rho = tree_dot(v, w)
        # Divide by ||w|| clamped away from 0: a zero w (A v = 0) gives v = 0, rho = 0.
        v = tree_scale(w, 1.0 / tree_norm(w).clamp_min(torch.finfo(rho.dtype).tiny))
    return abs(float(rho.detach()))


def diagonal_preconditioner(diagonal: Tree, floor: float = 0.0) -> Callable[[Tree], Tree]:
    """Jacobi preconditioner ``u -> u / max(diagonal, floor)`` (leaf-wise) for :class:`CG`.

    ``M = diag(d)`` approximates ``A`` by its diagonal; CG then works on the rescaled system
    ``M^{-1/2} A M^{-1/2}``, which removes badly scaled coordinates (e.g. parameters with
    very different curvatures) from the condition number.

    Args:
        diagonal: a tree shaped like the unknowns holding (an estimate of) ``diag(A)``.
        floor: entries below ``floor`` are raised to it.  With ``floor == 0`` every entry
            must be positive; pass a small positive ``floor`` to accept estimates that can be
            zero or negative (e.g. a Hutchinson estimate of the Hessian diagonal).

    Cost per application: one element-wise multiply; memory: one tree.

    Examples:
        >>> d = torch.tensor([1.0, 100.0], dtype=torch.float64)
        >>> diagonal_preconditioner(d)(torch.tensor([1.0, 1.0], dtype=torch.float64)).tolist()
        [1.0, 0.01]
    """
    where = "hypergradient.linalg.diagonal_preconditioner"
    _check_float(where, "floor", floor, "Pass floor=0.0 or a small positive value like 1e-6.")
    leaves = diagonal.items() if isinstance(diagonal, dict) else [("", diagonal)]
    for key, leaf in leaves:
        label = f"diagonal[{key!r}]" if key else "diagonal"
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            raise HypergradientError(
                f"{where}: `{label}` must be a floating-point torch.Tensor, got "
                f"{type(leaf).__name__}"
                f"{'' if not isinstance(leaf, torch.Tensor) else ' of dtype ' + str(leaf.dtype)}"
                f". Pass the diagonal of the operator as a tensor or dict of tensors."
            )
        if not bool(torch.isfinite(leaf).all()):
            raise HypergradientError(
                f"{where}: `{label}` contains NaN/inf values; the diagonal must be finite. "
                f"Check how the diagonal was estimated."
            )
        if floor == 0.0 and not bool((leaf > 0).all()):
            bad = int((leaf <= 0).sum())
            raise HypergradientError(
                f"{where}: `{label}` has {bad} non-positive entr{'y' if bad == 1 else 'ies'} "
                f"(min {float(leaf.min()):.3e}); a Jacobi preconditioner needs a positive "
                f"diagonal. Pass floor=<small positive value> to clip it, or add damping."
            )
    inverse = tree_map(
        lambda d: 1.0 / (d.clamp_min(floor) if floor > 0.0 else d), tree_detach(diagonal)
    )
    return lambda u: tree_map(torch.mul, u, inverse)


# --------------------------------------------------------------------------------------
# conjugate gradients
# --------------------------------------------------------------------------------------


@register_solver
@dataclass(frozen=True)
class CG(AbstractLinearSolver):
    """Preconditioned conjugate gradients for a symmetric positive definite ``A``.

    Solves ``(A + damping I) x = b``.  With ``z = M^{-1} r`` (``M^{-1}`` is the optional
    ``preconditioner``), starting from ``r_0 = b - A x_0``, ``p_0 = z_0``::

        alpha_k = (r_k^T z_k) / (p_k^T A p_k)
        x_{k+1} = x_k + alpha_k p_k
        r_{k+1} = r_k - alpha_k A p_k
        beta_k  = (r_{k+1}^T z_{k+1}) / (r_k^T z_k)
        p_{k+1} = z_{k+1} + beta_k p_k

    and stops when ``||r_k|| <= max(tol * ||b||, atol)``.  The reported residual is the
    recursively updated ``r_k`` (equal to ``b - A x_k`` up to rounding).

    Outcomes: ``SUCCESSFUL``; ``MAX_STEPS_REACHED``; ``BREAKDOWN`` when ``p^T A p <= 0``
    (``A`` is not positive definite along the search direction ``p``) or
    ``r^T M^{-1} r <= 0`` (the preconditioner is not positive definite) -- the iterate
    before the failing step is returned and ``stats.extra["reason"]`` says which;
    ``NONFINITE`` when NaN/inf appear (the last finite iterate is returned).

    Args:
        max_steps: maximum number of CG iterations (``>= 0``).
        tol: relative tolerance on the residual norm (``>= 0``).
        atol: absolute tolerance on the residual norm (``>= 0``).
        preconditioner: ``r -> M^{-1} r`` for a symmetric positive definite ``M ~= A``, or
            ``None``; see :func:`diagonal_preconditioner`.
        damping: ``>= 0``; solve ``(A + damping I) x = b``.

    Cost: one matvec per iteration (plus one for the initial residual when ``x0`` is
    given), one preconditioner application per iteration, 4 vectors of memory (5 with a
    preconditioner), one host synchronisation per iteration.

    Examples:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x, stats = CG(tol=1e-12).solve(lambda v: A @ v, b)
        >>> stats.converged, stats.num_matvecs
        (True, 2)
    """

    max_steps: int = 50
    tol: float = 1e-10
    atol: float = 0.0
    preconditioner: Callable[[Tree], Tree] | None = None
    damping: float = 0.0

    name = "cg"
    requires_symmetric = True

    def __post_init__(self) -> None:
        where = f"hypergradient.linalg.CG({self._args()})"
        _check_common(where, self.max_steps, self.tol, self.atol, self.damping)
        if self.preconditioner is not None and not callable(self.preconditioner):
            raise HypergradientError(
                f"{where}: `preconditioner` must be a callable r -> M^{{-1}} r or None, got "
                f"{type(self.preconditioner).__name__}. Build one with "
                f"hypergradient.linalg.diagonal_preconditioner(diag)."
            )

    def _args(self) -> str:
        return (
            f"max_steps={self.max_steps!r}, tol={self.tol!r}, atol={self.atol!r}, "
            f"damping={self.damping!r}"
        )

    def solve(self, matvec: MatVec, b: Tree, *, x0: Tree | None = None) -> Solution:
        A = _damped(matvec, self.damping)
        M = self.preconditioner
        x, r, matvecs = _initial_residual(A, b, x0)
        if M is None:
            z = r
            rz = rr = tree_dot(r, r)
        else:
            z = M(r)
            rz, rr = tree_dot(r, z), tree_dot(r, r)
        b_norm, rr_f, rz_f = _floats(tree_norm(b), rr, rz)
        if not (math.isfinite(b_norm) and math.isfinite(rr_f) and math.isfinite(rz_f)):
            return Solution(x, _stats(Result.NONFINITE, 0, math.nan, matvecs))
        threshold = max(self.tol * b_norm, self.atol)
        r_norm = math.sqrt(rr_f)
        if r_norm <= threshold:
            return Solution(x, _stats(Result.SUCCESSFUL, 0, r_norm, matvecs))
        if rz_f <= 0.0:
            return Solution(
                x,
                _stats(
                    Result.BREAKDOWN,
                    0,
                    r_norm,
                    matvecs,
                    reason="the preconditioner is not positive definite (r^T M^-1 r <= 0)",
                ),
            )
        p = z
        observe = getattr(M, "observe", None)  # e.g. a preconditioner recycling directions
        for step in range(self.max_steps):
            Ap = A(p)
            matvecs += 1
            if observe is not None:
                observe(p, Ap)
            pAp = tree_dot(p, Ap)
            alpha = rz / pAp
            x_new = tree_axpy(alpha, p, x)
            r_new = tree_axpy(-alpha, Ap, r)
            if M is None:
                z_new = r_new
                rz_new = rr_new = tree_dot(r_new, r_new)
            else:
                z_new = M(r_new)
                rz_new, rr_new = tree_dot(r_new, z_new), tree_dot(r_new, r_new)
            pAp_f, rr_f, rz_f = _floats(pAp, rr_new, rz_new)
            if pAp_f <= 0.0:  # before the NaN check: alpha = rz / 0 is inf
                return Solution(
                    x,
                    _stats(
                        Result.BREAKDOWN,
                        step,
                        r_norm,
                        matvecs,
                        reason=f"p^T A p = {pAp_f:.3e} <= 0 at step {step}: the operator is "
                        f"not positive definite along the search direction",
                        curvature=pAp_f,
                    ),
                )
            if not (math.isfinite(pAp_f) and math.isfinite(rr_f) and math.isfinite(rz_f)):
                return Solution(x, _stats(Result.NONFINITE, step, r_norm, matvecs))
            x, r, r_norm = x_new, r_new, math.sqrt(rr_f)
            if r_norm <= threshold:
                return Solution(x, _stats(Result.SUCCESSFUL, step + 1, r_norm, matvecs))
            if rz_f <= 0.0:
                return Solution(
                    x,
                    _stats(
                        Result.BREAKDOWN,
                        step + 1,
                        r_norm,
                        matvecs,
                        reason="the preconditioner is not positive definite (r^T M^-1 r <= 0)",
                    ),
                )
            beta = rz_new / rz
            p = tree_axpy(beta, p, z_new)
            rz = rz_new
        return Solution(x, _stats(Result.MAX_STEPS_REACHED, self.max_steps, r_norm, matvecs))


# --------------------------------------------------------------------------------------
# MINRES
# --------------------------------------------------------------------------------------


@register_solver
@dataclass(frozen=True)
class MINRES(AbstractLinearSolver):
    """MINRES (Paige and Saunders) for a symmetric, possibly indefinite ``A``.

    Solves ``(A + damping I) x = b``.  The Lanczos process builds an orthonormal basis
    ``V_k`` of the Krylov space ``K_k(A, r_0)`` with ``A V_k = V_{k+1} T_k`` (``T_k``
    tridiagonal, ``(k+1) x k``); MINRES picks ``x_k = x_0 + V_k y_k`` minimising
    ``||r_0|| e_1 - T_k y||``, which is ``||b - A x_k||``.  The QR factorisation of ``T_k``
    is updated with one Givens rotation per step, so ``x_k`` is updated with a three-term
    recurrence and the residual norm ``|phi_k|`` is known at every step without an extra
    matvec.  Stops when ``|phi_k| <= max(tol * ||b||, atol)``; ``|phi_k|`` is the reported
    residual (equal to ``||b - A x_k||`` up to rounding, which grows with the condition
    number).

    Outcomes: ``SUCCESSFUL``; ``MAX_STEPS_REACHED``; ``BREAKDOWN`` if the projected
    tridiagonal matrix is singular (``A`` singular and ``b`` not in its range);
    ``NONFINITE`` (the last finite iterate is returned).

    Args:
        max_steps: maximum number of Lanczos steps (``>= 0``).
        tol: relative tolerance on ``||b - A x||`` (``>= 0``).
        atol: absolute tolerance on ``||b - A x||`` (``>= 0``).
        damping: ``>= 0``; solve ``(A + damping I) x = b``.

    Cost: one matvec per step (plus one for ``x0``), 6 vectors of memory, one host
    synchronisation per step.

    Examples:
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)  # indefinite
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> x, stats = MINRES(tol=1e-12).solve(lambda v: A @ v, b)
        >>> stats.converged and bool(torch.allclose(A @ x, b))
        True
    """

    max_steps: int = 50
    tol: float = 1e-10
    atol: float = 0.0
    damping: float = 0.0

    name = "minres"
    requires_symmetric = True

    def __post_init__(self) -> None:
        where = (
            f"hypergradient.linalg.MINRES(max_steps={self.max_steps!r}, tol={self.tol!r}, "
            f"atol={self.atol!r}, damping={self.damping!r})"
        )
        _check_common(where, self.max_steps, self.tol, self.atol, self.damping)

    def solve(self, matvec: MatVec, b: Tree, *, x0: Tree | None = None) -> Solution:
        A = _damped(matvec, self.damping)
        x, r, matvecs = _initial_residual(A, b, x0)
        beta1 = tree_norm(r)
        b_norm, beta1_f = _floats(tree_norm(b), beta1)
        if not (math.isfinite(b_norm) and math.isfinite(beta1_f)):
            return Solution(x, _stats(Result.NONFINITE, 0, math.nan, matvecs))
        threshold = max(self.tol * b_norm, self.atol)
        if beta1_f <= threshold:
            return Solution(x, _stats(Result.SUCCESSFUL, 0, beta1_f, matvecs))

        v = tree_scale(r, 1.0 / beta1)
        v_prev: Tree | None = None
        w_prev: Tree | None = None  # w_{k-1}
        w_prev2: Tree | None = None  # w_{k-2}
        beta = torch.zeros_like(beta1)  # off-diagonal T[k-1, k]
        beta_f = 0.0
        singular_rtol = _SINGULAR_EPS * torch.finfo(beta1.dtype).eps
        c_prev2 = c_prev = torch.ones_like(beta1)  # rotations G_{k-2}, G_{k-1}
        s_prev2 = s_prev = torch.zeros_like(beta1)
        phi_bar = beta1
        res = beta1_f
        for step in range(self.max_steps):
            # Lanczos: A v_k = beta_k v_{k-1} + alpha_k v_k + beta_{k+1} v_{k+1}.
            p = A(v)
            matvecs += 1
            alpha = tree_dot(v, p)
            p = tree_axpy(-alpha, v, p)
            if v_prev is not None:
                p = tree_axpy(-beta, v_prev, p)
            beta_next = tree_norm(p)
            # Previous rotations on the new column (0, beta_k, alpha_k, beta_{k+1}).
            epsilon = s_prev2 * beta
            delta_bar = c_prev2 * beta
            delta = c_prev * delta_bar + s_prev * alpha
            gamma_bar = c_prev * alpha - s_prev * delta_bar
            # New rotation zeroing beta_{k+1}.
            gamma = torch.sqrt(gamma_bar * gamma_bar + beta_next * beta_next)
            safe_gamma = torch.where(gamma > 0, gamma, torch.ones_like(gamma))
            c, s = gamma_bar / safe_gamma, beta_next / safe_gamma
            tau = c * phi_bar
            phi_bar = -s * phi_bar
            # w_k = (v_k - delta_k w_{k-1} - epsilon_k w_{k-2}) / gamma_k; x_k += tau_k w_k.
            w = v
            if w_prev is not None:
                w = tree_axpy(-delta, w_prev, w)
            if w_prev2 is not None:
                w = tree_axpy(-epsilon, w_prev2, w)
            w = tree_scale(w, 1.0 / safe_gamma)
            x_new = tree_axpy(tau, w, x)
            gamma_f, phi_f, beta_next_f, alpha_f = _floats(gamma, phi_bar, beta_next, alpha)
            if not all(map(math.isfinite, (gamma_f, phi_f, beta_next_f, alpha_f))):
                return Solution(x, _stats(Result.NONFINITE, step, res, matvecs))
            # gamma_k is the last diagonal entry of the triangular factor of T_k; relative
            # to the norm of the column of T_k it is O(eps) only if T_k is singular.
            column_norm = math.sqrt(beta_f * beta_f + alpha_f * alpha_f + beta_next_f**2)
            if gamma_f <= singular_rtol * column_norm:
                return Solution(
                    x,
                    _stats(
                        Result.BREAKDOWN,
                        step,
                        res,
                        matvecs,
                        reason="the projected tridiagonal matrix is (numerically) singular: "
                        "the operator is singular and b is not in its range",
                    ),
                )
            x, res = x_new, abs(phi_f)
            if res <= threshold:
                return Solution(x, _stats(Result.SUCCESSFUL, step + 1, res, matvecs))
            if beta_next_f == 0.0:
                # Invariant Krylov subspace: x is the least-squares solution already.
                return Solution(
                    x,
                    _stats(
                        Result.BREAKDOWN,
                        step + 1,
                        res,
                        matvecs,
                        reason="invariant Krylov subspace reached with a nonzero residual: "
                        "the operator is singular and b is not in its range",
                    ),
                )
            v_prev, v = v, tree_scale(p, 1.0 / beta_next)
            w_prev2, w_prev = w_prev, w
            beta, beta_f = beta_next, beta_next_f
            c_prev2, s_prev2, c_prev, s_prev = c_prev, s_prev, c, s
        return Solution(x, _stats(Result.MAX_STEPS_REACHED, self.max_steps, res, matvecs))


# --------------------------------------------------------------------------------------
# GMRES
# --------------------------------------------------------------------------------------


@register_solver
@dataclass(frozen=True)
class GMRES(AbstractLinearSolver):
    """Restarted GMRES(m) for a general (non-symmetric) non-singular ``A``.

    Solves ``(A + damping I) x = b``.  Each cycle runs up to ``restart`` steps of the
    Arnoldi process (modified Gram-Schmidt) from ``r = b - A x``, building an orthonormal
    basis ``V_{j+1}`` and the Hessenberg ``H_j`` with ``A V_j = V_{j+1} H_j``; the least
    squares problem ``min_y ||beta e_1 - H_j y||`` is solved by Givens rotations updated
    each step (which gives the residual norm for free), then ``x += V_j y``.  At the start
    of every cycle the true residual ``b - A x`` is recomputed (one matvec) and tested
    against ``max(tol * ||b||, atol)``, so the reported residual is the true one.

    Outcomes: ``SUCCESSFUL``; ``MAX_STEPS_REACHED`` once ``max_steps`` Arnoldi steps have
    been spent; ``BREAKDOWN`` if the Hessenberg matrix is singular (stagnation on a
    singular ``A``); ``NONFINITE``.

    Args:
        max_steps: total budget of Arnoldi steps over all cycles (``>= 0``).
        restart: Krylov dimension ``m`` of a cycle (``>= 1``).
        tol: relative tolerance on ``||b - A x||`` (``>= 0``).
        atol: absolute tolerance on ``||b - A x||`` (``>= 0``).
        damping: ``>= 0``; solve ``(A + damping I) x = b``.

    Cost: one matvec per Arnoldi step plus one per cycle for the true residual (the first
    cycle's is free when ``x0`` is not given); ``restart + 2`` vectors of memory;
    ``O(restart)`` inner products per step; one host synchronisation per step.

    Examples:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)  # non-symmetric
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> x, stats = GMRES(tol=1e-12).solve(lambda v: A @ v, b)
        >>> stats.converged and bool(torch.allclose(A @ x, b))
        True
    """

    max_steps: int = 50
    restart: int = 20
    tol: float = 1e-10
    atol: float = 0.0
    damping: float = 0.0

    name = "gmres"
    requires_symmetric = False

    def __post_init__(self) -> None:
        where = (
            f"hypergradient.linalg.GMRES(max_steps={self.max_steps!r}, "
            f"restart={self.restart!r}, tol={self.tol!r}, atol={self.atol!r}, "
            f"damping={self.damping!r})"
        )
        _check_common(where, self.max_steps, self.tol, self.atol, self.damping)
        _check_int(where, "restart", self.restart, 1, "Pass e.g. restart=20.")

    def solve(self, matvec: MatVec, b: Tree, *, x0: Tree | None = None) -> Solution:
        A = _damped(matvec, self.damping)
        x, r, matvecs = _initial_residual(A, b, x0)
        b_norm = float(tree_norm(b).detach())
        if not math.isfinite(b_norm):
            return Solution(x, _stats(Result.NONFINITE, 0, math.nan, matvecs))
        threshold = max(self.tol * b_norm, self.atol)
        steps = 0
        first_cycle = True
        breakdown = False
        while True:
            if not first_cycle:
                r = tree_sub(b, A(x))
                matvecs += 1
            first_cycle = False
            beta = tree_norm(r)
            res = float(beta.detach())
            if not math.isfinite(res):
                return Solution(x, _stats(Result.NONFINITE, steps, math.nan, matvecs))
            if res <= threshold:
                return Solution(x, _stats(Result.SUCCESSFUL, steps, res, matvecs))
            if breakdown:
                return Solution(
                    x,
                    _stats(
                        Result.BREAKDOWN,
                        steps,
                        res,
                        matvecs,
                        reason="the Arnoldi Hessenberg matrix is (numerically) singular: the "
                        "operator is singular and b is not in its range",
                    ),
                )
            if steps >= self.max_steps:
                return Solution(x, _stats(Result.MAX_STEPS_REACHED, steps, res, matvecs))
            x_new, taken, breakdown = self._cycle(A, r, beta, x, threshold, steps)
            steps += taken
            matvecs += taken
            if x_new is None:
                return Solution(x, _stats(Result.NONFINITE, steps, res, matvecs))
            x = x_new

    def _cycle(
        self, A: MatVec, r: Tree, beta: torch.Tensor, x: Tree, threshold: float, steps: int
    ) -> tuple[Tree | None, int, bool]:
        """One cycle from residual ``r``: ``(new x or None on NaN, steps taken, breakdown)``."""
        basis = [tree_scale(r, 1.0 / beta)]
        columns: list[list[torch.Tensor]] = []  # triangular factor R, column by column
        cosines: list[torch.Tensor] = []
        sines: list[torch.Tensor] = []
        g = [beta]  # rotated right-hand side beta e_1
        taken = 0
        breakdown = False
        singular_rtol = _SINGULAR_EPS * torch.finfo(beta.dtype).eps
        for _ in range(min(self.restart, self.max_steps - steps)):
            j = len(columns)
            w = A(basis[j])
            taken += 1
            h: list[torch.Tensor] = []
            for v in basis:  # modified Gram-Schmidt
                h_ij = tree_dot(w, v)
                w = tree_axpy(-h_ij, v, w)
                h.append(h_ij)
            h_next = tree_norm(w)
            for i in range(j):  # previous rotations
                h[i], h[i + 1] = (
                    cosines[i] * h[i] + sines[i] * h[i + 1],
                    cosines[i] * h[i + 1] - sines[i] * h[i],
                )
            gamma = torch.sqrt(h[j] * h[j] + h_next * h_next)
            safe_gamma = torch.where(gamma > 0, gamma, torch.ones_like(gamma))
            c, s = h[j] / safe_gamma, h_next / safe_gamma
            g_next = -s * g[j]
            column_norm = torch.sqrt(torch.stack(h).square().sum() + h_next * h_next)
            gamma_f, h_next_f, res_est, column_f = _floats(gamma, h_next, g_next, column_norm)
            if not all(map(math.isfinite, (gamma_f, h_next_f, res_est, column_f))):
                return None, taken, False
            if gamma_f <= singular_rtol * column_f:
                # (numerically) singular Hessenberg matrix: keep the previous columns only
                breakdown = True
                break
            h[j] = gamma
            g[j] = c * g[j]
            g.append(g_next)
            columns.append(h)
            cosines.append(c)
            sines.append(s)
            if abs(res_est) <= threshold or h_next_f == 0.0:
                break
            basis.append(tree_scale(w, 1.0 / h_next))
        k = len(columns)
        if k > 0:
            zero = torch.zeros_like(g[0])
            R = torch.stack([torch.stack(col + [zero] * (k - len(col))) for col in columns], dim=1)
            y = torch.linalg.solve_triangular(R, torch.stack(g[:k]).unsqueeze(1), upper=True)
            for i in range(k):
                x = tree_axpy(y[i, 0], basis[i], x)
        return x, taken, breakdown


# --------------------------------------------------------------------------------------
# Neumann series and identity
# --------------------------------------------------------------------------------------


@register_solver
@dataclass(frozen=True)
class Neumann(AbstractLinearSolver):
    """Truncated Neumann series ``x = alpha * sum_{k=0}^{K} (I - alpha A)^k b``, ``K = max_steps``.

    Since ``A^{-1} = alpha * sum_{k>=0} (I - alpha A)^k`` whenever every eigenvalue of
    ``I - alpha A`` lies in ``(-1, 1)`` (for a symmetric positive definite ``A``:
    ``0 < alpha < 2 / lambda_max``), the truncated sum is an approximate inverse whose
    cost is fixed in advance; ``max_steps=0`` gives ``alpha * b``.  It equals ``K + 1``
    steps of Richardson iteration from ``x_0``: with ``x0`` the series is applied to
    ``r_0 = b - A x0`` and added to ``x0``.

    The terms ``v_k = (I - alpha A)^k r_0`` are formed with one matvec each.  The
    residual of the partial sum ``x_k = alpha * sum_{j<=k} v_j`` is exactly the next term
    ``v_{k+1}``, so:

    * ``tol == 0`` (default): exactly ``K`` matvecs; the result is ``SUCCESSFUL`` once all
      ``K`` terms are summed (a truncated series is what was asked for) and the residual is
      *not* computed: ``stats.residual_norm`` is NaN and
      ``stats.extra["residual_computed"]`` is ``False``.
    * ``tol > 0``: the next term is formed before each term is added; when its norm (the
      residual of the current sum) is ``<= tol * ||b||`` the sum is returned as
      ``SUCCESSFUL``.  After ``K`` terms one extra matvec gives the final residual, and the
      result is ``MAX_STEPS_REACHED`` if it is still above ``tol * ||b||``.

    Divergence: when a term's norm exceeds ``1e6 * max(||b||, ||r_0||)`` the series is
    stopped and reported ``DIVERGED``; the sum before that term is returned, its residual
    (the term's norm) is reported, and ``stats.extra["lambda_max"]`` holds the Rayleigh
    quotient of the diverging term, an estimate of the eigenvalue ``lambda`` with
    ``|1 - alpha * lambda| > 1`` (negative if ``A`` is indefinite).  A NaN/inf term is
    reported ``NONFINITE``.

    ``stats.extra`` always holds ``"alpha"``, ``"lambda_max"`` (``None`` unless estimated)
    and ``"residual_computed"``.

    Args:
        max_steps: ``K >= 0``, the highest power of the series.
        alpha: step ``> 0``; ``None`` uses ``1 / lambda_max`` with ``lambda_max`` from
            :func:`estimate_lambda_max` (``power_steps`` extra matvecs, deterministic).
        tol: ``>= 0``; relative tolerance for early stopping (see above).
        power_steps: power-iteration steps used when ``alpha is None`` (``>= 1``).

    Cost: ``K`` matvecs (``+ power_steps`` when ``alpha is None``, ``+ 1`` when
    ``tol > 0`` or ``x0`` is given), 3 vectors of memory, one host synchronisation per
    term.

    Examples:
        >>> A = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> b = torch.ones(2, dtype=torch.float64)
        >>> x, stats = Neumann(max_steps=1, alpha=0.5).solve(lambda v: A @ v, b)
        >>> x.tolist()  # 0.5 * (b + (I - 0.5 A) b)
        [0.75, 0.5]
    """

    max_steps: int = 50
    alpha: float | None = None
    tol: float = 0.0
    power_steps: int = 20

    name = "neumann"
    requires_symmetric = True

    def __post_init__(self) -> None:
        where = (
            f"hypergradient.linalg.Neumann(max_steps={self.max_steps!r}, "
            f"alpha={self.alpha!r}, tol={self.tol!r}, power_steps={self.power_steps!r})"
        )
        _check_common(where, self.max_steps, self.tol)
        if self.alpha is not None:
            _check_float(
                where,
                "alpha",
                self.alpha,
                "Pass alpha=None to use 1/lambda_max, or a step with 0 < alpha < 2/lambda_max.",
                strict=True,
            )
        _check_int(where, "power_steps", self.power_steps, 1, "Pass e.g. power_steps=20.")

    def solve(self, matvec: MatVec, b: Tree, *, x0: Tree | None = None) -> Solution:
        matvecs = 0
        lambda_max: float | None = None
        if self.alpha is None:
            lambda_max = estimate_lambda_max(matvec, b, self.power_steps)
            matvecs += self.power_steps
            if not math.isfinite(lambda_max) or lambda_max <= 0.0:
                result = Result.NONFINITE if not math.isfinite(lambda_max) else Result.BREAKDOWN
                return Solution(
                    tree_zeros_like(b) if x0 is None else x0,
                    _stats(
                        result,
                        0,
                        math.nan,
                        matvecs,
                        alpha=None,
                        lambda_max=lambda_max,
                        residual_computed=False,
                        reason=f"power iteration estimated lambda_max = {lambda_max}; pass "
                        f"an explicit alpha > 0",
                    ),
                )
            alpha = 1.0 / lambda_max
        else:
            alpha = float(self.alpha)

        _, r0, init = _initial_residual(matvec, b, x0)
        matvecs += init
        b_norm, r0_norm = _floats(tree_norm(b), tree_norm(r0))

        def finish(total: Tree, result: Result, steps: int, residual: float | None, **extra):
            x = tree_scale(total, alpha)
            if x0 is not None:
                x = tree_map(torch.add, x0, x)
            stats = _stats(
                result,
                steps,
                math.nan if residual is None else residual,
                matvecs,
                alpha=alpha,
                lambda_max=lambda_max,
                residual_computed=residual is not None,
                **extra,
            )
            return Solution(x, stats)

        if not (math.isfinite(b_norm) and math.isfinite(r0_norm)):
            return finish(r0, Result.NONFINITE, 0, None)
        limit = _DIVERGENCE_FACTOR * max(b_norm, r0_norm)
        threshold = self.tol * b_norm
        check = self.tol > 0.0
        v, v_norm, total = r0, r0_norm, r0
        # Step k forms v_k = (I - alpha A) v_{k-1}, the residual of the sum of v_0..v_{k-1}.
        for k in range(1, self.max_steps + 1 + int(check)):
            w = tree_axpy(-alpha, matvec(v), v)
            matvecs += 1
            w_norm = float(tree_norm(w).detach())
            if not math.isfinite(w_norm):
                return finish(total, Result.NONFINITE, k - 1, None)
            if w_norm > limit:
                # The growing term is dominated by an eigenvector with |1 - alpha lam| > 1:
                # its Rayleigh quotient (v^T v - v^T w) / (alpha v^T v) estimates lam.
                if self.alpha is not None:
                    vw = float(tree_dot(v, w).detach())
                    lambda_max = (v_norm**2 - vw) / (alpha * v_norm**2)
                return finish(total, Result.DIVERGED, k - 1, w_norm)
            if check and w_norm <= threshold:
                return finish(total, Result.SUCCESSFUL, k - 1, w_norm)
            if k > self.max_steps:  # the extra residual-only step when tol > 0
                return finish(total, Result.MAX_STEPS_REACHED, k - 1, w_norm)
            total = tree_map(torch.add, total, w)
            v, v_norm = w, w_norm
        return finish(total, Result.SUCCESSFUL, self.max_steps, None)


@register_solver
@dataclass(frozen=True)
class Identity(AbstractLinearSolver):
    """``x = alpha * b``: the approximation ``A^{-1} ~= alpha I``.

    This is the cheapest possible "solve", used by one-step / T1-T2 style hypergradient
    approximations; it is the ``max_steps=0`` Neumann series.  The result is always
    ``SUCCESSFUL`` (the approximation is what was asked for); the residual is not computed
    (``stats.residual_norm`` is NaN, ``stats.extra["residual_computed"]`` is ``False``)
    and ``x0`` is ignored.

    Args:
        alpha: the scale, ``> 0`` (e.g. the inner learning rate).

    Cost: no matvec, one vector of memory.

    Examples:
        >>> Identity(alpha=0.1).solve(lambda v: v, torch.ones(2)).value
        tensor([0.1000, 0.1000])
    """

    alpha: float = 1.0

    name = "identity"
    requires_symmetric = False

    def __post_init__(self) -> None:
        _check_float(
            f"hypergradient.linalg.Identity(alpha={self.alpha!r})",
            "alpha",
            self.alpha,
            "Pass a positive scale such as the inner learning rate, e.g. alpha=0.01.",
            strict=True,
        )

    def solve(self, matvec: MatVec, b: Tree, *, x0: Tree | None = None) -> Solution:
        x = tree_scale(b, float(self.alpha))
        return Solution(
            x,
            _stats(
                Result.SUCCESSFUL,
                0,
                math.nan,
                0,
                alpha=float(self.alpha),
                residual_computed=False,
            ),
        )


# --------------------------------------------------------------------------------------
# dense direct solve
# --------------------------------------------------------------------------------------


@register_solver
@dataclass(frozen=True)
class Dense(AbstractLinearSolver):
    """Materialise ``A`` column by column and solve ``(A + damping I) x = b`` directly.

    Column ``i`` of ``A`` is ``matvec(e_i)`` for the ``n`` basis vectors ``e_i`` of the
    flattened unknowns (``n`` = total number of entries of ``b``); the dense system is then
    solved with ``torch.linalg.solve`` (LU with partial pivoting).  Exact up to rounding for
    any non-singular ``A`` (symmetric or not), so it is the reference solver for tests and
    small problems.  ``x0`` is ignored.

    Outcomes: ``SUCCESSFUL`` (the reported residual ``||b - A x||`` uses the materialised
    matrix, no extra matvec); ``BREAKDOWN`` when the matrix is exactly singular
    (``stats.extra["reason"]`` explains; zeros are returned); ``NONFINITE`` when the
    matrix or the solution contains NaN/inf.

    Args:
        damping: ``>= 0``; solve ``(A + damping I) x = b``.
        max_size: refuse problems with more than ``max_size`` unknowns (the matrix takes
            ``n^2`` numbers of memory).

    Cost: ``n`` matvecs, ``n^2`` memory, ``O(n^3)`` flops.

    Examples:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> x, stats = Dense().solve(lambda v: A @ v, torch.tensor([3.0, 3.0], dtype=A.dtype))
        >>> x.tolist()
        [1.0, 1.0]
    """

    damping: float = 0.0
    max_size: int = 20000

    name = "exact"
    requires_symmetric = False

    def __post_init__(self) -> None:
        where = f"hypergradient.linalg.Dense(damping={self.damping!r}, max_size={self.max_size!r})"
        _check_float(
            where,
            "damping",
            self.damping,
            "Pass 0.0 for none or a small positive value such as 1e-3.",
        )
        _check_int(where, "max_size", self.max_size, 1, "Pass e.g. max_size=20000.")

    def solve(self, matvec: MatVec, b: Tree, *, x0: Tree | None = None) -> Solution:
        n = tree_size(b)
        if n > self.max_size:
            raise HypergradientError(
                f"hypergradient.linalg.Dense(max_size={self.max_size}): the system has "
                f"n={n} unknowns, more than max_size; materialising it would take n^2 = "
                f"{n * n:.3e} numbers. Use an iterative solver such as 'cg' (or 'minres' / "
                f"'gmres'), or raise max_size if the memory is available."
            )
        b_flat = tree_flatten_vector(b)
        columns = []
        for i in range(n):
            e = torch.zeros(n, dtype=b_flat.dtype, device=b_flat.device)
            e[i] = 1.0
            columns.append(tree_flatten_vector(matvec(tree_unflatten_vector(e, b))))
        matrix = torch.stack(columns, dim=1)
        if self.damping != 0.0:
            matrix = matrix + self.damping * torch.eye(n, dtype=matrix.dtype, device=matrix.device)
        if not bool(torch.isfinite(matrix).all()):
            return Solution(
                tree_zeros_like(b),
                _stats(Result.NONFINITE, n, math.nan, n, reason="the operator matrix has NaN/inf"),
            )
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
        # An exactly zero pivot is rare in floating point: a singular matrix (e.g. the Hessian
        # of an overparameterised inner problem) usually leaves pivots at rounding level,
        # ~n * eps * max|pivot|, and the solve then returns a finite but meaningless x.
        # LU with partial pivoting is backward stable even then, so the residual cannot tell;
        # the pivots' spread can (a heuristic: it flags numerical rank deficiency, not every
        # ill-conditioned matrix).
        diag = lu.diagonal().abs()
        largest = float(diag.max()) if n else 0.0
        smallest = float(diag.min()) if n else 0.0
        eps = torch.finfo(matrix.dtype).eps
        if int(info) != 0 or (n and smallest <= n * eps * largest):
            where = (
                f"LU pivot {int(info)} is zero"
                if int(info) != 0
                else (
                    f"smallest LU pivot {smallest:.3g} <= n * eps * largest "
                    f"({n * eps * largest:.3g})"
                )
            )
            return Solution(
                tree_zeros_like(b),
                _stats(
                    Result.BREAKDOWN,
                    n,
                    float(torch.linalg.vector_norm(b_flat)),
                    n,
                    reason=f"the {n}x{n} operator matrix is numerically singular ({where}); "
                    f"add damping or use 'minres'/'gmres' for a least-squares answer",
                ),
            )
        x_flat = torch.linalg.lu_solve(lu, pivots, b_flat.unsqueeze(-1)).squeeze(-1)
        residual = float(torch.linalg.vector_norm(b_flat - matrix @ x_flat).detach())
        result = Result.SUCCESSFUL if math.isfinite(residual) else Result.NONFINITE
        return Solution(tree_unflatten_vector(x_flat, b), _stats(result, n, residual, n))
