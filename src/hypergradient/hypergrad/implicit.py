r"""Implicit hypergradients: differentiate the *optimality condition*, not the training run.

At an inner optimum :math:`w^*(\lambda)` of the training loss :math:`L`,
:math:`\nabla_w L(w^*, \lambda) = 0`.  Differentiating this identity (implicit function
theorem) gives
:math:`\partial w^*/\partial\lambda = -H^{-1}\,\partial^2 L/\partial w\,\partial\lambda`
with :math:`H = \nabla^2_{ww} L`, so for the validation loss :math:`E(w, \lambda)`

.. math::

    \frac{dE}{d\lambda} = \nabla_\lambda E
        - \Big(\frac{\partial^2 L}{\partial\lambda\,\partial w}\Big)\, q,
    \qquad H q = \nabla_w E .

Only products with :math:`H` are needed; the linear system is solved by a pluggable solver
(:mod:`hypergradient.linalg`).  For a fixed-point statement :math:`w = \Phi(w, \lambda)`
the same theorem gives :math:`(I - \partial_w\Phi)^\top q = \nabla_w E` and
:math:`dE/d\lambda = \nabla_\lambda E + (\partial_\lambda \Phi)^\top q`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import torch

from .._errors import ConvergenceError, HypergradientError, check_scalar_loss
from .._results import Result, SolveStats
from .._tree import tree_axpy
from ..linalg import CG, GMRES, MINRES, AbstractLinearSolver, Dense, Identity, Neumann
from ..linalg.operators import (
    FixedPointOperator,
    GaussNewtonLoss,
    GaussNewtonOperator,
    HessianOperator,
)
from ._checks import (
    check_callable,
    check_loss_dtype,
    check_params_hparams,
    ignored_hparam_error,
)

_WHERE = "hypergradient.implicit_hypergrad(...)"
_SOLVER_NAMES = ("exact", "cg", "neumann", "identity", "minres", "gmres")


class ConvergenceWarning(UserWarning):
    """An iterative linear solve stopped at ``max_steps`` before reaching ``tol``.

    Examples:
        >>> import warnings
        >>> import hypergradient as hg
        >>> p = hg.testing.ridge_problem(dim=3)  # a 3 x 3 Hessian: CG needs 3 steps
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = hg.implicit_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams,
        ...                               solver="cg", max_steps=1, tol=1e-10)
        >>> [c.category.__name__ for c in caught]
        ['ConvergenceWarning']
    """


class NonStationaryWarning(UserWarning):
    r""":func:`implicit_hypergrad` was called at a point that is not an inner optimum.

    The implicit function theorem assumes :math:`\nabla_w L(w, \lambda) = 0` (or
    :math:`w = \Phi(w, \lambda)` for a :class:`FixedPoint`); when ``params`` is far from such
    a point the hypergradient it returns can be wrong by a large factor, with no other sign.
    The warning names the measured gradient norm (or fixed-point residual) and the
    ``stationarity_tol`` it exceeded.  Silence it deliberately with ``stationarity_tol=None``
    (e.g. the warm-start approximation of :class:`~hypergradient.Implicit`).

    Examples:
        >>> import warnings
        >>> import torch
        >>> import hypergradient as hg
        >>> inner = lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum()  # optimum: w = lam
        >>> outer = lambda p, h: 0.5 * (p["w"] ** 2).sum()
        >>> w, lam = {"w": torch.zeros(1)}, {"lam": torch.ones(1)}  # gradient norm 1 here
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = hg.implicit_hypergrad(inner, outer, w, lam, solver="cg", max_steps=1)
        ...     _ = hg.implicit_hypergrad(inner, outer, w, lam, solver="cg", max_steps=1,
        ...                               stationarity_tol=None)  # on purpose: no check
        >>> [c.category.__name__ for c in caught]
        ['NonStationaryWarning']
    """


#: Default ``stationarity_tol`` of :func:`implicit_hypergrad` (see its docstring).
DEFAULT_STATIONARITY_TOL = 1e-3


class FixedPoint:
    r"""Marks an inner problem stated as a fixed point ``w = phi(w, hparams)``.

    Pass ``hg.FixedPoint(phi)`` as ``inner_loss`` to :func:`implicit_hypergrad`.  ``phi`` maps
    the dicts ``(params, hparams)`` to a dict shaped like ``params`` (e.g. one step of an
    optimizer, a DEQ layer, a proximal map).

    Examples:
        >>> import torch, hypergradient as hg
        >>> # w = 0.5 w + lam  has the fixed point w* = 2 lam, so d(w*)/d lam = 2
        >>> phi = lambda p, h: {"w": 0.5 * p["w"] + h["lam"]}
        >>> lam = torch.tensor([1.0], dtype=torch.float64)
        >>> g = hg.implicit_hypergrad(hg.FixedPoint(phi), lambda p, h: p["w"].sum(),
        ...     {"w": 2 * lam}, {"lam": lam}, solver="exact")
        >>> float(g["lam"])
        2.0
    """

    def __init__(self, phi: Callable[[dict, dict], Mapping[str, torch.Tensor]]):
        if not callable(phi):
            raise HypergradientError(
                f"hypergradient.FixedPoint(phi): phi must be callable "
                f"`phi(params, hparams) -> dict like params`, got {type(phi).__name__}."
            )
        self.phi = phi

    def __repr__(self) -> str:
        return f"FixedPoint({getattr(self.phi, '__name__', repr(self.phi))})"


def _build_solver(
    solver: str | AbstractLinearSolver,
    max_steps: int,
    tol: float,
    alpha: float | None,
    preconditioner,
    fixed_point: bool,
) -> AbstractLinearSolver:
    if isinstance(solver, AbstractLinearSolver):
        return solver
    if solver not in _SOLVER_NAMES:
        raise HypergradientError(
            f"{_WHERE}: solver={solver!r} is not known; expected one of {list(_SOLVER_NAMES)} "
            f"or an instance of hypergradient.linalg.AbstractLinearSolver."
        )
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        raise HypergradientError(
            f"{_WHERE}: max_steps must be a non-negative int, got {max_steps!r}."
        )
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise HypergradientError(f"{_WHERE}: tol must be a finite float >= 0, got {tol!r}.")
    if alpha is not None and (
        not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0
    ):
        raise HypergradientError(
            f"{_WHERE}: alpha must be a positive finite float or None, got {alpha!r}."
        )
    if preconditioner is not None and solver != "cg":
        raise HypergradientError(
            f"{_WHERE}: preconditioner=... is only used by solver='cg', got solver={solver!r}."
        )
    if alpha is not None and solver not in ("neumann", "identity"):
        raise HypergradientError(
            f"{_WHERE}: alpha={alpha!r} is the step of the Neumann series and of the identity "
            f"approximation; solver={solver!r} does not use it. Remove alpha."
        )
    if solver == "cg":
        return CG(max_steps=max_steps, tol=tol, preconditioner=preconditioner)
    if solver == "minres":
        return MINRES(max_steps=max_steps, tol=tol)
    if solver == "gmres":
        return GMRES(max_steps=max_steps, tol=tol)
    if solver == "neumann":
        # For a fixed-point map the natural series is sum_k (d phi/dw)^k: alpha = 1.
        if alpha is None and fixed_point:
            alpha = 1.0
        return Neumann(max_steps=max_steps, alpha=alpha, tol=0.0)
    if solver == "identity":
        return Identity(alpha=1.0 if alpha is None else alpha)
    return Dense()


def implicit_hypergrad(
    inner_loss: Callable[[dict, dict], torch.Tensor] | FixedPoint,
    outer_loss: Callable[[dict, dict], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    hparams: Mapping[str, torch.Tensor],
    solver: str | AbstractLinearSolver = "cg",
    max_steps: int = 50,
    tol: float = 1e-10,
    alpha: float | None = None,
    *,
    damping: float = 0.0,
    hessian: str = "exact",
    preconditioner: Callable | None = None,
    stationarity_tol: float | None = DEFAULT_STATIONARITY_TOL,
    x0: Mapping[str, torch.Tensor] | None = None,
    return_stats: bool = False,
):
    r"""Hypergradient :math:`dE/d\lambda` at an inner optimum by the implicit function theorem.

    .. math::

        \frac{dE}{d\lambda} = \nabla_\lambda E(w^*, \lambda)
            - \partial^2_{\lambda w} L(w^*, \lambda)\,
              \big(\nabla^2_{ww} L(w^*, \lambda) + \delta I\big)^{-1} \nabla_w E(w^*, \lambda)

    Args:
        inner_loss: ``inner_loss(params, hparams) -> scalar`` (the training loss, including
            any regulariser that depends on ``hparams``), or ``hg.FixedPoint(phi)`` for an
            inner problem stated as ``w = phi(w, hparams)``, or a :class:`GaussNewtonLoss`.
        outer_loss: ``outer_loss(params, hparams) -> scalar`` (the validation loss).
        params: dict name -> tensor, an (approximate) inner optimum :math:`w^*`.  Detached
            internally; the result does not depend on how it was computed.
        hparams: dict name -> tensor, the hyperparameters :math:`\lambda` (same dtype).
        solver: ``"exact"`` (dense solve; small problems), ``"cg"`` (conjugate gradients;
            needs :math:`H \succ 0`), ``"neumann"`` (Lorraine et al. 2020: ``max_steps``
            terms of :math:`\alpha\sum_k (I-\alpha H)^k`), ``"identity"`` (:math:`H^{-1}
            \approx \alpha I`, the one-step/T1-T2 approximation; ``alpha`` defaults to 1),
            ``"minres"`` (symmetric indefinite), ``"gmres"`` (non-symmetric, e.g. a general
            fixed-point map), or any :class:`~hypergradient.linalg.AbstractLinearSolver`.
        max_steps: iterations of the solver (Neumann: number of terms).
        tol: relative residual at which CG/MINRES/GMRES stop.  ``tol=0`` asks for exactly
            ``max_steps`` iterations (no convergence warning then).
        alpha: Neumann / identity step.  ``None``: ``1/lambda_max(H)`` estimated by 20 power
            iterations for Neumann (1 for a fixed-point map), 1 for identity.
        damping: :math:`\delta \ge 0` added to the Hessian (for an indefinite Hessian of a
            non-convex model; biases the result).
        hessian: ``"exact"`` or ``"gauss_newton"`` (PSD approximation; ``inner_loss`` must
            be a :class:`GaussNewtonLoss`).
        preconditioner: for ``solver="cg"``, a function applying :math:`M^{-1}` to a dict
            shaped like ``params`` (e.g. ``hg.linalg.diagonal_preconditioner(diag)``), or
            one built from the operator such as
            :class:`~hypergradient.linalg.NystromPreconditioner`: its ``prepare(matvec,
            like)`` runs first and its matvecs count in ``stats.num_matvecs`` (and in
            ``stats.extra["preconditioner_matvecs"]``).
        stationarity_tol: warn (:class:`NonStationaryWarning`) when
            :math:`\lVert\nabla_w L(w, \lambda)\rVert` at ``params`` (for a
            :class:`FixedPoint`: the residual :math:`\lVert w - \Phi(w, \lambda)\rVert`)
            exceeds this.  The norm comes from the gradient already built for the
            Hessian-vector products: no extra pass.  ``None`` disables the check (for
            approximations at non-converged points on purpose, e.g. warm-start bilevel
            training).  The default ``1e-3`` is an absolute norm in the units of the inner
            loss, the ``gtol`` of an inner solve "run to convergence": the hypergradient's
            error grows linearly with this norm (to first order ``w - w^* \approx H^{-1}
            \nabla_w L``), and on ``hg.testing.ridge_problem()`` (a well-conditioned
            Hessian, eigenvalues 0.29 to 1.1) a norm of ``1e-3`` leaves about 1% relative
            error, ``1e-2`` about 13%, ``0.65`` more than 1000%, while float32 and float64
            solves of well-posed problems reach ``1e-5`` and below.  Ill-conditioned
            problems (small Hessian eigenvalues) or small hypergradients need a tighter
            value.
        x0: initial guess for the linear system's solution ``q`` (a dict shaped like
            ``params``), e.g. ``stats.extra["adjoint"]`` of the previous hyper-step: along a
            training run ``q`` changes slowly, so a warm-started solve needs few iterations
            (:class:`~hypergradient.AmortizedImplicit` keeps it for you).  Ignored by the
            ``"exact"`` and ``"identity"`` solvers.
        return_stats: also return the :class:`~hypergradient._results.SolveStats` of the
            linear solve (steps, residual, number of Hessian-vector products, the measured
            ``stats.extra["inner_grad_norm"]`` or, for a :class:`FixedPoint`,
            ``stats.extra["fixed_point_residual"]``, and the solution ``q`` as
            ``stats.extra["adjoint"]``).

    Returns:
        dict shaped like ``hparams`` (and the stats when ``return_stats``).

    Raises:
        HypergradientError: bad input (see the message), or a Neumann step that diverges.
        ConvergenceError: the linear solver broke down or produced NaN/inf.

    Warns:
        NonStationaryWarning: ``params`` is not stationary to ``stationarity_tol``.
        ConvergenceWarning: an iterative solver stopped at ``max_steps`` above ``tol``.

    Cost: one forward/backward of ``outer_loss``; one forward and one ``create_graph``
    backward of ``inner_loss``; then one Hessian-vector product (one backward through the
    retained gradient graph) per solver iteration, plus one more backward for the mixed
    term.  Memory: the retained graph plus a few vectors of the size of ``params``,
    independent of how the inner problem was solved.

    Examples:
        >>> import torch, hypergradient as hg
        >>> # inner: min_w (w - lam)^2 / 2  ->  w* = lam;  outer: w^2 / 2  ->  dE/dlam = lam
        >>> lam = torch.tensor([3.0], dtype=torch.float64)
        >>> g = hg.implicit_hypergrad(lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum(),
        ...     lambda p, h: 0.5 * (p["w"] ** 2).sum(), {"w": lam.clone()}, {"lam": lam})
        >>> float(g["lam"])
        3.0

    References:
        Lorraine, Vicol, Duvenaud (2020), Optimizing Millions of Hyperparameters by Implicit
        Differentiation; Rajeswaran et al. (2019), Meta-Learning with Implicit Gradients.
    """
    fixed_point = isinstance(inner_loss, FixedPoint)
    if not fixed_point:
        check_callable(_WHERE, "inner_loss", inner_loss)
    check_callable(_WHERE, "outer_loss", outer_loss)
    dtype = check_params_hparams(_WHERE, params, hparams)
    if hessian not in ("exact", "gauss_newton"):
        raise HypergradientError(
            f"{_WHERE}: hessian={hessian!r}; expected 'exact' or 'gauss_newton'."
        )
    if hessian == "gauss_newton" and not isinstance(inner_loss, GaussNewtonLoss):
        raise HypergradientError(
            f"{_WHERE}: hessian='gauss_newton' needs the inner loss split into prediction and "
            f"output loss: pass inner_loss=hg.GaussNewtonLoss(predict, output_loss, "
            f"regularizer), got {type(inner_loss).__name__}."
        )
    if not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise HypergradientError(f"{_WHERE}: damping must be a float >= 0, got {damping!r}.")
    if stationarity_tol is not None and (
        not isinstance(stationarity_tol, (int, float))
        or isinstance(stationarity_tol, bool)
        or not math.isfinite(stationarity_tol)
        or stationarity_tol <= 0
    ):
        raise HypergradientError(
            f"{_WHERE}: stationarity_tol must be a positive finite float or None (no check), "
            f"got {stationarity_tol!r}."
        )
    linear_solver = _build_solver(solver, max_steps, tol, alpha, preconditioner, fixed_point)

    # 1. Outer gradients: v = dE/dw and the direct term dE/dlambda, in one backward.
    param_keys, hparam_keys = list(params), list(hparams)
    w = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    hp = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    with torch.enable_grad():
        outer_value = check_scalar_loss(_WHERE, "outer_loss", outer_loss(w, hp))
        check_loss_dtype(_WHERE, "outer_loss", outer_value, dtype)
        grads = (
            torch.autograd.grad(outer_value, [*w.values(), *hp.values()], allow_unused=True)
            if outer_value.requires_grad
            else [None] * (len(w) + len(hp))
        )
    v = {k: torch.zeros_like(w[k]) if g is None else g for k, g in zip(param_keys, grads)}
    direct_grads = grads[len(w) :]
    outer_uses = {k: g is not None for k, g in zip(hparam_keys, direct_grads)}
    direct = {
        k: torch.zeros_like(hp[k]) if g is None else g for k, g in zip(hparam_keys, direct_grads)
    }

    # 2. The operator whose inverse we need, built once (graph reuse).
    if fixed_point:
        op = FixedPointOperator(inner_loss.phi, params, hparams, damping=damping, where=_WHERE)
    elif hessian == "gauss_newton":
        op = GaussNewtonOperator(inner_loss, params, hparams, damping=damping, where=_WHERE)
    else:
        op = HessianOperator(inner_loss, params, hparams, damping=damping, where=_WHERE)
    if not fixed_point:
        check_loss_dtype(_WHERE, "inner_loss", op.loss_value, dtype)
    # Is params stationary?  The gradient (or phi's output) is already built: no extra pass.
    if fixed_point:
        stationarity, stat_key = op.residual_norm(), "fixed_point_residual"
    else:
        sq = sum(torch.sum(g.detach().double() ** 2) for g in op.grads)
        stationarity, stat_key = float(torch.sqrt(sq)), "inner_grad_norm"
    if stationarity_tol is not None and not stationarity <= stationarity_tol:
        _warn_non_stationary(fixed_point, stationarity, stationarity_tol)

    # 3. Solve  A q = v  (A = H, or (I - d phi/dw)^T), from x0 when given (a warm start).
    if x0 is not None:
        x0 = _check_initial_guess(x0, v)
    # a preconditioner built from the operator (e.g. a Nystrom sketch) prepares itself here
    # from the undamped operator and the damping (a sketch of A + delta I with a small
    # sketch sees mostly delta I: randomized sketches need the spectrum to decay)
    prepare = getattr(getattr(linear_solver, "preconditioner", None), "prepare", None)
    sketch_matvecs = 0
    if callable(prepare):
        undamped = op.matvec if damping == 0 else (lambda u: tree_axpy(-damping, u, op.matvec(u)))
        sketch_matvecs = int(prepare(undamped, v, shift=float(damping)))
    solution = linear_solver.solve(op.matvec, v, x0=x0)
    stats = solution.stats
    stats.num_matvecs += sketch_matvecs
    stats.extra["preconditioner_matvecs"] = sketch_matvecs
    _raise_on_failure(linear_solver, stats, tol)
    q = solution.value

    # 4. Mixed term and assembly.
    mixed, ignored = op.mixed_vjp(q)
    silent = [k for k in ignored if not outer_uses[k]]
    if silent:
        raise ignored_hparam_error(_WHERE, silent, implicit=True)
    sign = 1.0 if fixed_point else -1.0
    result = {k: (direct[k] + sign * mixed[k]).detach() for k in hparam_keys}
    stats.extra["num_hvps"] = op.num_matvecs
    stats.extra[stat_key] = stationarity
    stats.extra["adjoint"] = {k: t.detach() for k, t in q.items()}
    if return_stats:
        return result, stats
    return result


def _check_initial_guess(x0: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor]) -> dict:
    """``x0`` must be shaped like ``params`` (the adjoint ``q`` of an earlier call)."""
    if not isinstance(x0, Mapping) or set(x0) != set(v):
        got = sorted(x0) if isinstance(x0, Mapping) else type(x0).__name__
        raise HypergradientError(
            f"{_WHERE}: x0 must be a dict with the keys of params {sorted(v)}, got {got}; pass "
            f"the stats.extra['adjoint'] of an earlier call on the same params, or None."
        )
    for k, t in v.items():
        if not isinstance(x0[k], torch.Tensor) or x0[k].shape != t.shape:
            shape = tuple(x0[k].shape) if isinstance(x0[k], torch.Tensor) else type(x0[k])
            raise HypergradientError(
                f"{_WHERE}: x0[{k!r}] has shape {shape}, expected {tuple(t.shape)} (the shape "
                f"of params[{k!r}]); pass None to solve from zero."
            )
    return {k: x0[k].detach().to(v[k]) for k in v}


def _warn_non_stationary(fixed_point: bool, norm: float, tol: float) -> None:
    if fixed_point:
        what = f"the fixed-point residual ||params - phi(params, hparams)|| = {norm:.3g}"
        assumes = "params = phi(params, hparams)"
        fix = "iterate phi further"
    else:
        what = f"the inner gradient norm ||grad_w inner_loss(params, hparams)|| = {norm:.3g}"
        assumes = "grad_w inner_loss(params, hparams) = 0"
        fix = "train the inner problem further"
    warnings.warn(
        f"{_WHERE}: params is not a stationary point of the inner problem: {what} exceeds "
        f"stationarity_tol={tol:g}. The implicit function theorem assumes {assumes}; away "
        f"from it the returned hypergradient can be wrong by a large factor (its error grows "
        f"with this norm). Fix: {fix} (to below stationarity_tol), use "
        f"hg.unrolled_hypergrad to differentiate the training run actually done, or pass "
        f"stationarity_tol=None if an approximation at a non-converged point is intended.",
        NonStationaryWarning,
        stacklevel=3,
    )


def _raise_on_failure(linear_solver: AbstractLinearSolver, stats: SolveStats, tol: float):
    result = stats.result
    if result is Result.SUCCESSFUL:
        return
    name = type(linear_solver).__name__
    if result is Result.DIVERGED and isinstance(linear_solver, Neumann):
        lam = stats.extra.get("lambda_max")
        a = stats.extra.get("alpha", linear_solver.alpha)
        lam_txt = f"{lam:.6g}" if isinstance(lam, (int, float)) else str(lam)
        suggestion = (
            f"use alpha < 2/lambda_max = {2 / lam:.6g} (e.g. alpha={1 / lam:.6g}), or "
            if isinstance(lam, (int, float)) and lam > 0
            else ""
        )
        raise HypergradientError(
            f"{_WHERE}: the Neumann series diverged with alpha={a!r}: the estimated largest "
            f"Hessian eigenvalue is lambda_max={lam_txt}, so alpha*lambda_max="
            f"{(a * lam) if isinstance(lam, (int, float)) and a is not None else '?'} is not "
            f"in (0, 2). Fix: {suggestion}leave alpha=None to use 1/lambda_max. If the "
            f"Hessian is indefinite (non-convex model) add damping or use hessian="
            f"'gauss_newton'."
        )
    if result is Result.MAX_STEPS_REACHED:
        if tol > 0 and not isinstance(linear_solver, Neumann):
            warnings.warn(
                f"{_WHERE}: {name} {result.message} (steps={stats.num_steps}, "
                f"residual={stats.residual_norm:.3e}). The hypergradient is approximate; "
                f"pass tol=0 to request a fixed number of steps without this warning.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return
    raise ConvergenceError(
        f"{_WHERE}: the linear solver {name} {result.message} after {stats.num_steps} steps "
        f"(residual {stats.residual_norm:.3e}). For a non-convex model whose Hessian is "
        f"indefinite use damping=..., hessian='gauss_newton', or solver='minres'."
    )
