r"""Hypergradients of pre-training hyperparameters through pre-training *and* fine-tuning.

Raghu, Lorraine, Kornblith, McDermott & Duvenaud (2021) tune the hyperparameters
:math:`\lambda` of pre-training (per-task loss weights, an augmentation network, ...) on what
they are for: the validation loss of the *fine-tuned* model.  Three problems are nested:

.. math::

    \theta^*(\lambda) = \arg\min_\theta L_{PT}(\theta, \lambda)
        \quad\text{(pre-training)},\qquad
    \phi_K(\theta) = \mathrm{FT}_K(\phi_0(\theta); \theta)
        \quad\text{(K fine-tuning steps)},\qquad
    E(\lambda) = L_{val}(\phi_K(\theta^*(\lambda)), \theta^*(\lambda)).

The hypergradient is the chain rule through both:

.. math::

    \frac{dE}{d\lambda}
      = \underbrace{\frac{dE}{d\theta}}_{\text{unrolled FT}}\,
        \underbrace{\frac{d\theta^*}{d\lambda}}_{\text{implicit PT}}
      = -\Big(\frac{\partial^2 L_{PT}}{\partial\lambda\,\partial\theta}\Big)\,
        H_{PT}^{-1}\,\frac{dE}{d\theta},
      \qquad H_{PT} = \nabla^2_{\theta\theta} L_{PT}(\theta^*, \lambda),

* :math:`dE/d\theta` is the *total* derivative of the validation loss after fine-tuning
  with respect to the pre-trained weights: through the fine-tuned weights' starting point
  :math:`\phi_0(\theta)` (the encoder is copied into the fine-tuned model) and through every
  fine-tuning step (reverse-mode :func:`~hypergradient.unrolled_hypergrad`);
* :math:`d\theta^*/d\lambda = -H_{PT}^{-1}\,\partial^2 L_{PT}/\partial\theta\,\partial\lambda`
  comes from the implicit function theorem at the pre-trained weights, treated as an
  optimum of the pre-training loss (:func:`~hypergradient.implicit_hypergrad`, whose
  linear system's right-hand side is the fine-tuning gradient).

The validation loss never reads :math:`\lambda` directly, so there is no direct term.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._errors import ConvergenceError, HypergradientError, check_scalar_loss, check_tree
from .._results import Result, Solution, SolveStats
from .._tree import tree_axpy, tree_zeros_like
from ..hypergrad._checks import check_callable, check_params_hparams
from ..hypergrad.implicit import DEFAULT_STATIONARITY_TOL, _build_solver, implicit_hypergrad
from ..hypergrad.unrolled import unrolled_hypergrad
from ..linalg import AbstractLinearSolver, estimate_lambda_max
from ..linalg._base import MatVec

_WHERE = "hypergradient.pretrain.pretrain_hypergrad(...)"
# The pre-trained tensors become the *hyperparameters* of the fine-tuning unroll; they are
# renamed there so that a fine-tuned tensor may carry the same name as the pre-trained one
# it starts from (the encoder's weights, typically).
_PREFIX = "pretrained:"

Tensors = dict[str, torch.Tensor]
PretrainLoss = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]
FinetuneLoss = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]
FinetuneInit = Mapping[str, torch.Tensor] | Callable[[Mapping[str, torch.Tensor]], Mapping]


class PretrainHypergrad(NamedTuple):
    """What :func:`pretrain_hypergrad` computed on the way (``return_info=True``).

    Attributes:
        hypergrad: :math:`dE/d\\lambda`, a dict shaped like ``hparams``.
        finetune_grad: :math:`dE/d\\theta`, shaped like ``pretrained`` (zero for the tensors
            the fine-tuning does not read, e.g. the pre-training heads).
        val_loss: :math:`E`, the validation loss after the ``finetune_steps`` steps (0-d).
        finetuned: the fine-tuned weights :math:`\\phi_K` (detached).
        transfer: the names of the pre-trained tensors the fine-tuning reads.
        stats: the implicit linear solve's :class:`~hypergradient.SolveStats`.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> # PT: th* = lam;  FT: one step of lr 0.5 on (phi - 1)^2/2 from phi0 = th;  E = phi1
        >>> lam = torch.tensor([2.0], dtype=torch.float64)
        >>> info = hg.pretrain.pretrain_hypergrad(
        ...     lambda th, h: 0.5 * ((th["w"] - h["lam"]) ** 2).sum(),
        ...     lambda phi, th: 0.5 * ((phi["w"] - 1) ** 2).sum(),
        ...     lambda phi, th: phi["w"].sum(),
        ...     {"w": lam.clone()}, {"lam": lam}, lambda th: {"w": th["w"]},
        ...     finetune_steps=1, finetune_lr=0.5, return_info=True)
        >>> info.transfer, float(info.val_loss), float(info.hypergrad["lam"])  # (2 + 1) / 2
        (('w',), 1.5, 0.5)
    """

    hypergrad: Tensors
    finetune_grad: Tensors
    val_loss: torch.Tensor
    finetuned: Tensors
    transfer: tuple[str, ...]
    stats: SolveStats


@dataclass(frozen=True)
class CurvatureDamped(AbstractLinearSolver):
    r"""Solve :math:`(A + \delta I)\,x = b` with the damping and step set by the curvature.

    :math:`\hat\lambda = |\lambda|_{\max}(A)` is estimated by ``power_steps`` power
    iterations (:func:`~hypergradient.linalg.estimate_lambda_max`), then
    :math:`\delta = \rho\,\hat\lambda` (``rho = relative_damping``) and ``inner`` solves the
    damped system; a Neumann series or the identity approximation gets the step
    :math:`\alpha = 1/(\hat\lambda + \delta)` unless ``alpha`` is given.  The damped
    operator's condition number is at most :math:`(1 + \rho)/\rho` when
    :math:`A \succeq 0`, so CG needs about :math:`\sqrt{1/\rho}\,\log(1/\epsilon)` steps
    and the Neumann series about :math:`(1/\rho)\log(1/\epsilon)` terms whatever the scale
    of :math:`A`.  An indefinite :math:`A` (a non-convex loss away from a minimum) is made
    positive definite when its most negative eigenvalue is above :math:`-\delta`.

    ``stats.extra`` adds ``"lambda_max"`` (:math:`\hat\lambda`), ``"damping"``
    (:math:`\delta`) and ``"alpha"`` (the step used, ``None`` for other solvers);
    ``stats.num_matvecs`` counts the power iterations too.

    Args:
        inner: ``"cg"``, ``"minres"``, ``"neumann"``, ``"identity"`` or ``"exact"``.
        relative_damping: :math:`\rho > 0`.
        max_steps, tol, alpha: ``inner``'s options, as in
            :func:`~hypergradient.implicit_hypergrad`.
        power_steps: power iterations for :math:`\hat\lambda` (``>= 1``).

    Cost: ``power_steps`` matvecs plus ``inner``'s.

    Examples:
        >>> import torch, hypergradient as hg
        >>> A = torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64))
        >>> b = torch.ones(2, dtype=torch.float64)
        >>> solver = hg.pretrain.CurvatureDamped("cg", relative_damping=0.01, power_steps=50)
        >>> x, stats = solver.solve(lambda v: A @ v, b)
        >>> round(stats.extra["damping"], 6), [round(v, 6) for v in x.tolist()]  # 1/(1+1), 1/101
        (1.0, [0.5, 0.009901])
    """

    inner: str = "cg"
    relative_damping: float = 0.01
    max_steps: int = 50
    tol: float = 1e-10
    alpha: float | None = None
    power_steps: int = 20

    name = "curvature_damped"

    def __post_init__(self) -> None:
        where = f"{_WHERE_SOLVER}(inner={self.inner!r}, relative_damping={self.relative_damping!r})"
        if self.inner not in _DAMPABLE:
            raise HypergradientError(
                f"{where}: inner must be one of {list(_DAMPABLE)} (a solver for the damped "
                f"symmetric system), got {self.inner!r}."
            )
        _check_positive(where, "relative_damping", self.relative_damping)
        if not isinstance(self.power_steps, int) or self.power_steps < 1:
            raise HypergradientError(
                f"{where}: power_steps must be an int >= 1 (e.g. 20), got {self.power_steps!r}."
            )
        self._inner_solver(1.0)  # validates max_steps, tol and alpha now

    def _inner_solver(self, alpha: float) -> AbstractLinearSolver:
        stepped = self.inner in ("neumann", "identity")
        if self.alpha is not None:
            alpha = self.alpha
        return _build_solver(
            self.inner, self.max_steps, self.tol, alpha if stepped else None, None, False
        )

    def solve(self, matvec: MatVec, b, *, x0=None) -> Solution:
        lambda_max = estimate_lambda_max(matvec, b, self.power_steps)
        if not math.isfinite(lambda_max) or lambda_max <= 0.0:
            result = Result.NONFINITE if not math.isfinite(lambda_max) else Result.BREAKDOWN
            stats = SolveStats(result, 0, math.nan, self.power_steps, {"lambda_max": lambda_max})
            return Solution(tree_zeros_like(b) if x0 is None else x0, stats)
        delta = self.relative_damping * lambda_max
        alpha = 1.0 / (lambda_max + delta) if self.alpha is None else self.alpha
        solver = self._inner_solver(alpha)
        solution = solver.solve(lambda u: tree_axpy(delta, u, matvec(u)), b, x0=x0)
        stats = solution.stats
        stats.num_matvecs += self.power_steps
        stats.extra.update(
            lambda_max=lambda_max,
            damping=delta,
            alpha=alpha if self.inner in ("neumann", "identity") else None,
        )
        return solution


_WHERE_SOLVER = "hypergradient.pretrain.CurvatureDamped"
_DAMPABLE = ("cg", "minres", "neumann", "identity", "exact")


def _check_positive(where: str, name: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise HypergradientError(
            f"{where}: {name} must be a finite float > 0, got {value!r}; pass e.g. {name}=0.01."
        )
    return float(value)


def _unprefix(h: Mapping[str, torch.Tensor]) -> Tensors:
    return {k[len(_PREFIX) :]: v for k, v in h.items()}


def _check_lr(name: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not torch.isfinite(torch.tensor(float(value))) or value < 0:
        raise HypergradientError(f"{_WHERE}: {name} must be a finite float >= 0, got {value!r}.")
    return float(value)


def _initial_finetune(finetune_init: FinetuneInit, transferred: Tensors) -> Tensors:
    """``phi_0``: the mapping itself, or ``finetune_init(transferred)`` (checked)."""
    if isinstance(finetune_init, Mapping):
        value = finetune_init
    elif callable(finetune_init):
        value = finetune_init(transferred)
        if not isinstance(value, Mapping):
            raise HypergradientError(
                f"{_WHERE}: finetune_init is a callable, so it must return the fine-tuned "
                f"model's starting weights as a dict (e.g. `lambda th: {{'W': th['W'], "
                f"'head': head0}}`), got {type(value).__name__}."
            )
    else:
        raise HypergradientError(
            f"{_WHERE}: finetune_init must be a dict of tensors (a fresh head, when only the "
            f"head is fine-tuned) or a callable `finetune_init(pretrained) -> dict` (the "
            f"encoder copied from the pre-trained weights plus a fresh head), got "
            f"{type(finetune_init).__name__}."
        )
    check_tree(_WHERE, "finetune_init", value)
    return dict(value)


def _curvature_solver(solver, relative_damping, max_steps, tol, alpha, power_steps):
    """The :class:`CurvatureDamped` solver of ``pretrain_hypergrad(relative_damping=...)``."""
    _check_positive(_WHERE, "relative_damping", relative_damping)
    if not isinstance(solver, str):
        raise HypergradientError(
            f"{_WHERE}: relative_damping needs solver given by name (one of "
            f"{list(_DAMPABLE)}), got a {type(solver).__name__} instance; pass "
            f"solver=CurvatureDamped(...) directly instead."
        )
    try:
        return CurvatureDamped(solver, relative_damping, max_steps, tol, alpha, power_steps)
    except HypergradientError as err:
        raise HypergradientError(f"{_WHERE}: {err}") from None


def used_by_finetuning(
    finetune_loss: FinetuneLoss,
    finetune_val_loss: FinetuneLoss,
    pretrained: Mapping[str, torch.Tensor],
    finetune_init: FinetuneInit,
) -> tuple[str, ...]:
    """Names of the pre-trained tensors that fine-tuning reads (structurally).

    One forward and backward pass of both fine-tuning losses at :math:`\\phi_0`: a tensor is
    *used* when it reaches either loss or the fine-tuned starting point.  A tensor that
    fine-tuning ignores at step 0 ignores it at every step (the steps only read the losses).

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> pretrained = {"encoder": torch.ones(2), "pretrain_head": torch.ones(2)}
        >>> hg.pretrain.used_by_finetuning(
        ...     lambda phi, th: ((th["encoder"] * phi["head"] - 1) ** 2).sum(),
        ...     lambda phi, th: (th["encoder"] * phi["head"]).sum(),
        ...     pretrained, {"head": torch.zeros(2)})
        ('encoder',)
    """
    theta = {k: v.detach().requires_grad_(True) for k, v in pretrained.items()}
    dtype = next(iter(theta.values())).dtype
    with torch.enable_grad():
        phi0 = _initial_finetune(finetune_init, theta)
        wrong = {k: str(v.dtype) for k, v in phi0.items() if v.dtype != dtype}
        if wrong:
            raise HypergradientError(
                f"{_WHERE}: the fine-tuned starting weights {wrong} do not have the pre-trained "
                f"weights' dtype {dtype}; build the fresh head with dtype={dtype}."
            )
        total = check_scalar_loss(_WHERE, "finetune_loss", finetune_loss(phi0, theta))
        total = total + check_scalar_loss(
            _WHERE, "finetune_val_loss", finetune_val_loss(phi0, theta)
        )
        for v in phi0.values():
            if v.requires_grad:
                total = total + v.sum()
        if not total.requires_grad:  # nothing on a path from theta
            return ()
        grads = torch.autograd.grad(total, list(theta.values()), allow_unused=True)
    return tuple(k for k, g in zip(theta, grads) if g is not None)


def pretrain_hypergrad(
    pretrain_loss: PretrainLoss,
    finetune_loss: FinetuneLoss,
    finetune_val_loss: FinetuneLoss,
    pretrained: Mapping[str, torch.Tensor],
    hparams: Mapping[str, torch.Tensor],
    finetune_init: FinetuneInit,
    *,
    finetune_steps: int = 1,
    finetune_lr: float = 0.1,
    finetune_momentum: float = 0.0,
    solver: str | AbstractLinearSolver = "cg",
    max_steps: int = 50,
    tol: float = 1e-10,
    alpha: float | None = None,
    damping: float = 0.0,
    relative_damping: float | None = None,
    power_steps: int = 20,
    stationarity_tol: float | None = DEFAULT_STATIONARITY_TOL,
    return_info: bool = False,
):
    r""":math:`dE/d\lambda` of the fine-tuned validation loss w.r.t. pre-training hyperparameters.

    .. math::

        \frac{dE}{d\lambda} = -\Big(\frac{\partial^2 L_{PT}}{\partial\lambda\,\partial\theta}
            \Big)\, q, \qquad
        \big(\nabla^2_{\theta\theta} L_{PT} + \delta I\big)\, q = \frac{dE}{d\theta},\qquad
        E = L_{val}\big(\phi_K(\theta), \theta\big),

    where :math:`\phi_K` is ``finetune_steps`` steps of SGD (``torch.optim.SGD`` with
    ``finetune_momentum``, dampening 0) on ``finetune_loss`` from
    :math:`\phi_0 = ` ``finetune_init(theta)``, and :math:`dE/d\theta` is differentiated
    through all of them (reverse mode).  See the module docstring for the derivation.

    Args:
        pretrain_loss: ``pretrain_loss(theta, hparams) -> scalar``, the pre-training loss
            (e.g. task-weighted multitask loss; any regulariser included).  Must read
            ``hparams``.
        finetune_loss: ``finetune_loss(phi, theta) -> scalar``, the downstream training loss
            of the fine-tuned weights ``phi``; ``theta`` (the pre-trained tensors that
            fine-tuning reads) is passed too, for a fine-tuning that keeps the encoder frozen
            and reads it directly.
        finetune_val_loss: ``finetune_val_loss(phi, theta) -> scalar``, the downstream
            validation loss :math:`E`, evaluated at :math:`\phi_K`.
        pretrained: dict name -> tensor, the pre-trained weights :math:`\theta` (encoder and
            pre-training heads), treated as a minimiser of ``pretrain_loss``.
        hparams: dict name -> tensor, the pre-training hyperparameters :math:`\lambda`.
        finetune_init: :math:`\phi_0`: a dict (e.g. a fresh head when only the head is
            fine-tuned; constant) or a callable ``finetune_init(theta) -> dict`` (e.g.
            ``lambda th: {"W": th["W"], "head": head0}`` to fine-tune the encoder too; the
            derivative flows through it).
        finetune_steps: ``K >= 1``.
        finetune_lr, finetune_momentum: the fine-tuning SGD's step size and momentum.
        solver, max_steps, tol, alpha, damping: the implicit linear solve, as in
            :func:`~hypergradient.implicit_hypergrad` (``"cg"``, ``"neumann"`` with
            ``alpha`` = the pre-training step size as in Raghu et al., ``"exact"``,
            ``"minres"``, ...).  A non-convex pre-training loss has an indefinite Hessian
            away from a minimum: use ``damping`` or a few Neumann terms then.
        relative_damping: :math:`\rho`: damping and step from the curvature instead
            (:class:`CurvatureDamped`): :math:`\delta = \rho\,\hat\lambda_{\max}`
            with :math:`\hat\lambda_{\max}` from ``power_steps`` power iterations on
            :math:`H_{PT}`, and for ``"neumann"`` / ``"identity"`` the step
            :math:`\alpha = 1/(\hat\lambda_{\max} + \delta)` (unless ``alpha`` is given).
            The damped system's condition number is then at most :math:`1 + 1/\rho`, so
            CG converges in a number of steps that does not depend on the scale of the
            pre-training loss.  ``None`` (default): ``damping`` as given.  Not together
            with ``damping > 0``.
        power_steps: power iterations for :math:`\hat\lambda_{\max}` (with
            ``relative_damping``).
        stationarity_tol: warn (:class:`~hypergradient.NonStationaryWarning`) when the
            gradient norm of ``pretrain_loss`` at ``pretrained`` exceeds this (the implicit
            function theorem assumes a minimiser); ``None``: no check (warm-start
            meta-pre-training, where the weights are by design not yet converged, passes
            it).  See :func:`~hypergradient.implicit_hypergrad`.
        return_info: return a :class:`PretrainHypergrad` (hypergradient, :math:`dE/d\theta`,
            :math:`E`, :math:`\phi_K`, solve statistics) instead of the dict.

    Returns:
        dict shaped like ``hparams`` (or a :class:`PretrainHypergrad`).

    Raises:
        HypergradientError: bad input (the message names it); errors raised while
            differentiating one of the two parts say which part.
        ConvergenceError: the implicit linear solve broke down (e.g. CG on an indefinite
            pre-training Hessian: add ``damping`` or use ``solver="minres"``).

    Cost: ``K`` fine-tuning forward/``create_graph`` backward passes and one backward
    through them (memory grows with ``K``), then the implicit solve: one ``create_graph``
    backward of ``pretrain_loss`` plus one Hessian-vector product per solver iteration and
    one more for the mixed term; and one forward/backward of the fine-tuning losses that finds
    the pre-trained tensors fine-tuning reads (the encoder: only those are unrolled; the
    others, e.g. the pre-training heads, get :math:`dE/d\theta = 0`).

    Examples:
        >>> import torch, hypergradient as hg
        >>> # PT: min_th (th - lam)^2/2 -> th* = lam;  FT: one step of lr 0.5 on
        >>> # (phi - 1)^2/2 from phi0 = th -> phi1 = (th + 1)/2;  E = phi1
        >>> # dE/dlam = dE/dth * dth*/dlam = 0.5 * 1
        >>> lam = torch.tensor([2.0], dtype=torch.float64)
        >>> g = hg.pretrain.pretrain_hypergrad(
        ...     lambda th, h: 0.5 * ((th["w"] - h["lam"]) ** 2).sum(),
        ...     lambda phi, th: 0.5 * ((phi["w"] - 1) ** 2).sum(),
        ...     lambda phi, th: phi["w"].sum(),
        ...     {"w": lam.clone()}, {"lam": lam}, lambda th: {"w": th["w"]},
        ...     finetune_steps=1, finetune_lr=0.5)
        >>> float(g["lam"])
        0.5

    References:
        Raghu, Lorraine, Kornblith, McDermott, Duvenaud (2021), Meta-Learning to Improve
        Pre-Training (NeurIPS), Algorithm 1.
    """
    for name, fn in (
        ("pretrain_loss", pretrain_loss),
        ("finetune_loss", finetune_loss),
        ("finetune_val_loss", finetune_val_loss),
    ):
        check_callable(_WHERE, name, fn)
    check_params_hparams(_WHERE, pretrained, hparams, params_name="pretrained")
    if (
        not isinstance(finetune_steps, int)
        or isinstance(finetune_steps, bool)
        or finetune_steps < 1
    ):
        raise HypergradientError(
            f"{_WHERE}: finetune_steps must be an int >= 1 (the fine-tuning steps "
            f"differentiated through), got {finetune_steps!r}."
        )
    lr = _check_lr("finetune_lr", finetune_lr)
    momentum = _check_lr("finetune_momentum", finetune_momentum)
    if not isinstance(return_info, bool):
        raise HypergradientError(f"{_WHERE}: return_info must be a bool, got {return_info!r}.")
    if relative_damping is not None:
        solver = _curvature_solver(solver, relative_damping, max_steps, tol, alpha, power_steps)
        if not isinstance(damping, (int, float)) or damping != 0:
            raise HypergradientError(
                f"{_WHERE}: damping={damping!r} and relative_damping={relative_damping!r} "
                f"were both given; pass one: damping (absolute) or relative_damping (a "
                f"fraction of the largest Hessian eigenvalue)."
            )
        alpha = None  # the step is CurvatureDamped's

    transfer = used_by_finetuning(finetune_loss, finetune_val_loss, pretrained, finetune_init)
    if not transfer:
        raise HypergradientError(
            f"{_WHERE}: fine-tuning reads none of the pre-trained tensors "
            f"{sorted(pretrained)}, so pre-training cannot change its result. Copy the "
            f"encoder in finetune_init (`lambda th: {{**encoder_of(th), **head0}}`) or read "
            f"it from the second argument of finetune_loss/finetune_val_loss."
        )

    # 1. dE/dtheta by reverse-mode unrolling of fine-tuning: the transferred pre-trained
    #    tensors are the "hyperparameters" of that unroll.
    theta = {_PREFIX + k: pretrained[k].detach() for k in transfer}
    params0 = (
        {k: v.detach() for k, v in finetune_init.items()}
        if isinstance(finetune_init, Mapping)
        else lambda h: _initial_finetune(finetune_init, _unprefix(h))
    )
    try:
        grad_theta, finetuned = unrolled_hypergrad(
            lambda phi, h: finetune_loss(phi, _unprefix(h)),
            lambda phi, h: finetune_val_loss(phi, _unprefix(h)),
            params0,
            theta,
            steps=finetune_steps,
            lr=lr,
            momentum=momentum,
            mode="reverse",
            return_params=True,
        )
    except HypergradientError as err:
        raise HypergradientError(
            f"{_WHERE}: while differentiating the fine-tuning run (the pre-trained tensors "
            f"appear there as '{_PREFIX}<name>'): {err}"
        ) from None
    with torch.no_grad():
        val_loss = finetune_val_loss(finetuned, {k: pretrained[k].detach() for k in transfer})
    finetune_grad = {
        k: grad_theta[_PREFIX + k] if k in transfer else torch.zeros_like(v)
        for k, v in pretrained.items()
    }

    # 2. Implicit differentiation through pre-training: the linear system's right-hand side is
    #    dE/dtheta.  A validation "loss" linear in theta with that gradient feeds it to
    #    implicit_hypergrad; it does not read hparams, so there is no direct term.
    rhs = {k: v.detach() for k, v in finetune_grad.items()}

    def linear_outer(p, h):
        return sum(torch.sum(rhs[k] * p[k]) for k in rhs)

    try:
        hypergrad, stats = implicit_hypergrad(
            pretrain_loss,
            linear_outer,
            pretrained,
            hparams,
            solver=solver,
            max_steps=max_steps,
            tol=tol,
            alpha=alpha,
            damping=damping,
            stationarity_tol=stationarity_tol,
            return_stats=True,
        )
    except (HypergradientError, ConvergenceError) as err:
        raise type(err)(
            f"{_WHERE}: while differentiating through pre-training (implicit function "
            f"theorem at `pretrained`): {err}"
        ) from None
    if not return_info:
        return hypergrad
    return PretrainHypergrad(
        hypergrad=hypergrad,
        finetune_grad=finetune_grad,
        val_loss=val_loss.detach(),
        finetuned=finetuned,
        transfer=tuple(transfer),
        stats=stats,
    )
