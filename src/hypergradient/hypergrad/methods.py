"""Hypergradient *methods* as objects: how a bilevel problem is differentiated.

The functional entry points (:func:`implicit_hypergrad`, :func:`unrolled_hypergrad`) take
everything as arguments; the training loop instead holds one method object and calls
:meth:`AbstractHypergradientMethod.hypergrad` at every hyper-step with the current inner
weights.  Keeping the method separate from the inner problem (the losses) and from the inner
solver (the user's ``torch.optim`` optimizer) is what lets any method drive any recipe.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .._errors import HypergradientError
from .implicit import ConvergenceWarning, implicit_hypergrad
from .reversible import _reversible
from .unrolled import unrolled_hypergrad

Loss = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]

_METHODS: dict[str, type[AbstractHypergradientMethod]] = {}


class AbstractHypergradientMethod(abc.ABC):
    """Compute ``dE/dhparams`` given the losses and the current inner weights.

    Contract of :meth:`hypergrad`: ``inner_loss``/``outer_loss`` are pure functions
    ``loss(params, hparams) -> scalar``; ``params`` are the current inner weights (detached,
    not modified); ``lr`` and ``momentum`` describe the user's inner optimizer (used by methods
    that differentiate through optimizer steps, ignored by the others).  Returns a dict shaped
    like ``hparams``.

    Examples:
        >>> import hypergradient as hg
        >>> p = hg.testing.ridge_problem(dim=3)  # exact hypergradient in p.hypergrad
        >>> method = hg.hypergrad.get_method("implicit", solver="cg", max_steps=20, tol=1e-10)
        >>> isinstance(method, hg.hypergrad.AbstractHypergradientMethod)
        True
        >>> g, info = method.hypergrad_and_info(
        ...     p.inner_loss, p.outer_loss, p.params, p.hparams, lr=0.1)
        >>> hg.testing.relative_error(g, p.hypergrad) < 1e-8, sorted(info)
        (True, ['inner_grad_norm'])
    """

    name: ClassVar[str]
    #: Does the method evaluate ``outer_loss`` at the given ``params`` (so a caller that wants
    #: the validation loss there can record it instead of paying another forward pass)?
    outer_at_params: ClassVar[bool] = False

    @property
    def train_batches(self) -> int | None:
        """How many training mini-batches one hypergradient trains on.  ``None`` (default):
        ``inner_loss(params, hparams)`` is on one batch.  ``K``: the caller (e.g.
        :class:`~hypergradient.BilevelTrainer`) draws ``K`` batches and passes
        ``batches=t -> batch`` for ``t`` in ``[0, K)``, with ``inner_loss(params, hparams,
        batch)``; see :class:`Unrolled`'s ``fresh_batches``."""
        return None

    @abc.abstractmethod
    def hypergrad(
        self,
        inner_loss: Loss,
        outer_loss: Loss,
        params: Mapping[str, torch.Tensor],
        hparams: Mapping[str, torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """See the class docstring."""

    def hypergrad_and_info(
        self,
        inner_loss: Loss,
        outer_loss: Loss,
        params: Mapping[str, torch.Tensor],
        hparams: Mapping[str, torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        **batches,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """:meth:`hypergrad` and a few numbers it measured on the way, worth logging
        (default: none; :class:`Implicit` gives ``inner_grad_norm``).  The training loop
        calls this one, so a subclass that only implements :meth:`hypergrad` still works.
        ``batches=t -> batch`` is passed only to a method with :attr:`train_batches` set,
        and on to its :meth:`hypergrad`."""
        grads = self.hypergrad(
            inner_loss, outer_loss, params, hparams, lr=lr, momentum=momentum, **batches
        )
        return grads, {}

    def state_dict(self) -> dict:
        """What the method carries from one hyper-step to the next (default: nothing), for
        the training loop's checkpoints; tensors, numbers and containers only."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`'s result (default: nothing to restore)."""


def register_method(cls):
    _METHODS[cls.name] = cls
    return cls


def get_method(method: str | AbstractHypergradientMethod, **options) -> AbstractHypergradientMethod:
    """A method object from its name (``"implicit"``, ``"unrolled"``) and options.

    Examples:
        >>> import hypergradient as hg
        >>> hg.hypergrad.get_method("unrolled", steps=3)
        Unrolled(steps=3, mode='reverse', fresh_batches=False)
        >>> hg.hypergrad.get_method("newton")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: get_method(method='newton'): unknown ...
    """
    if isinstance(method, AbstractHypergradientMethod):
        return method
    if method not in _METHODS:
        raise HypergradientError(
            f"get_method(method={method!r}): unknown hypergradient method; expected one of "
            f"{sorted(_METHODS)} or an AbstractHypergradientMethod instance."
        )
    return _METHODS[method](**options)


@register_method
@dataclass(frozen=True)
class Implicit(AbstractHypergradientMethod):
    """Implicit differentiation at the current weights (treated as an inner optimum).

    Options are those of :func:`~hypergradient.implicit_hypergrad`.  ``alpha=None`` with
    ``solver="neumann"`` uses the inner optimizer's learning rate (Lorraine et al.'s choice:
    stable whenever the inner SGD is).  Cost per hyper-step: about ``max_steps + 3`` backward
    passes on one training batch and one validation batch.

    ``stationarity_tol`` defaults to ``None`` here (no :class:`NonStationaryWarning`): in
    warm-start bilevel training the current weights are *by design* not an optimum of the
    mini-batch training loss, and the implicit hypergradient there is the intended
    approximation.  The measured gradient norm is still returned by
    :meth:`hypergrad_and_info` and logged by the training loop as ``inner_grad_norm``; pass a
    float to be warned as :func:`~hypergradient.implicit_hypergrad` would.

    Examples:
        >>> import hypergradient as hg
        >>> p = hg.testing.ridge_problem(dim=3)  # params at the inner optimum, exact hypergrad
        >>> method = hg.Implicit(solver="cg", max_steps=20, tol=1e-10)
        >>> g = method.hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, lr=0.1)
        >>> tuple(g["log_l2"].shape), hg.testing.relative_error(g, p.hypergrad) < 1e-8
        ((3,), True)
        >>> # the default: 10 Neumann terms with step alpha = lr, an approximation
        >>> g = hg.Implicit().hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, lr=1.0)
        >>> hg.testing.relative_error(g, p.hypergrad) < 0.1
        True
    """

    name: ClassVar[str] = "implicit"
    outer_at_params: ClassVar[bool] = True
    solver: str = "neumann"
    max_steps: int = 10
    tol: float = 0.0
    alpha: float | None = None
    damping: float = 0.0
    stationarity_tol: float | None = None
    hessian: str = "exact"

    def __post_init__(self):
        _check_hessian("Implicit", self.hessian)
        if self.solver not in ("exact", "cg", "neumann", "identity", "minres", "gmres"):
            raise HypergradientError(
                f"Implicit(solver={self.solver!r}): expected one of 'exact', 'cg', 'neumann', "
                f"'identity', 'minres', 'gmres'."
            )
        if not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise HypergradientError(
                f"Implicit(max_steps={self.max_steps!r}): expected an int >= 0."
            )

    def hypergrad(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0):
        return self.hypergrad_and_info(
            inner_loss, outer_loss, params, hparams, lr=lr, momentum=momentum
        )[0]

    def hypergrad_and_info(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0):
        alpha = self.alpha
        if alpha is None and self.solver in ("neumann", "identity"):
            alpha = float(lr)
        result, stats = implicit_hypergrad(
            inner_loss,
            outer_loss,
            params,
            hparams,
            solver=self.solver,
            max_steps=self.max_steps,
            tol=self.tol,
            alpha=alpha,
            damping=self.damping,
            hessian=self.hessian,
            stationarity_tol=self.stationarity_tol,
            return_stats=True,
        )
        keys = ("inner_grad_norm", "fixed_point_residual")
        return result, {k: stats.extra[k] for k in keys if k in stats.extra}


def _check_hessian(where: str, hessian: str) -> None:
    if hessian not in ("exact", "gauss_newton"):
        raise HypergradientError(
            f"{where}(hessian={hessian!r}): expected 'exact' or 'gauss_newton' (the positive "
            f"semi-definite Gauss-Newton matrix, for training losses split as a "
            f"GaussNewtonLoss)."
        )


@register_method
@dataclass(frozen=True)
class Unrolled(AbstractHypergradientMethod):
    r"""Differentiate through ``steps`` look-ahead SGD(+momentum) steps from the current weights.

    In a warm-started loop this is truncated back-propagation (``mode="reverse"``), its
    forward-mode twin (``mode="forward"``, one JVP per scalar hyperparameter: few
    hyperparameters only), or exact reversible learning (``mode="reversible"``, Maclaurin et
    al. 2015: the same hypergradient as ``"reverse"`` to rounding, but the run is reversed
    instead of stored, so memory does not grow with ``steps`` beyond about
    :math:`\log_2(1/\mu)` bits per weight and step; see
    :func:`~hypergradient.reversible_hypergrad`).  The look-ahead steps use the inner
    optimizer's learning rate and momentum (``torch.optim.SGD`` steps, momentum buffer
    starting at zero); they are discarded afterwards.

    ``fresh_batches=False``: every look-ahead step trains on the same training batch.
    ``fresh_batches=True``: look-ahead step ``t`` trains on a batch of its own, as mini-batch
    SGD does (Maclaurin et al.'s setting): :class:`~hypergradient.BilevelTrainer` draws
    ``steps`` fresh training batches per hyper-step and passes them as ``batches``
    (:attr:`train_batches` is ``steps``); called directly, pass ``batches=t -> batch`` and an
    ``inner_loss(params, hparams, batch)`` (without ``batches`` every step uses
    ``inner_loss(params, hparams)``).  In the trainer, ``mode="reversible"`` needs a
    ``torch.optim.SGD`` inner optimizer (one learning rate and momentum, dampening 0, no
    Nesterov, no ``weight_decay``: put decay in the hyperparameters) and refuses any other.

    Cost: ``steps`` double-backward passes (``"reversible"``: plus ``steps`` gradients and
    integer bookkeeping); memory grows with ``steps`` in ``"reverse"`` mode only.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> # L = (w - lam)^2 / 2, E = w^2 / 2 at w = 1, lam = 0; with lr 0.5 one look-ahead
        >>> # step gives w1 = (w + lam) / 2, two give w2 = w / 4 + 3 lam / 4, so
        >>> # dE(w1)/dlam = w1 / 2 = 1/4 and dE(w2)/dlam = w2 * 3/4 = 3/16
        >>> inner = lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum()
        >>> outer = lambda p, h: 0.5 * (p["w"] ** 2).sum()
        >>> w, lam = {"w": torch.ones(1)}, {"lam": torch.zeros(1)}
        >>> for steps, exact in ((1, 1 / 4), (2, 3 / 16)):
        ...     g = hg.Unrolled(steps=steps).hypergrad(inner, outer, w, lam, lr=0.5)
        ...     print(steps, bool(torch.allclose(g["lam"], torch.tensor([exact]))))
        1 True
        2 True
        >>> # mini-batch t gives L_t = (w - lam - t)^2 / 2; two steps of lr 0.5, momentum 0.5
        >>> # from w0: w1 = (w0 + lam) / 2, b2 = w0 - lam - 1, w2 = w1 - b2 / 2 = lam + 1/2,
        >>> # so dE(w2)/dlam = w2 = 1/2 at lam = 0, reversed exactly (as mode="reverse" gives)
        >>> step_loss = lambda p, h, t: 0.5 * ((p["w"] - h["lam"] - t) ** 2).sum()
        >>> w64, lam64 = {"w": torch.ones(1).double()}, {"lam": torch.zeros(1).double()}
        >>> method = hg.Unrolled(steps=2, mode="reversible", fresh_batches=True)
        >>> method.train_batches  # what BilevelTrainer draws per hyper-step
        2
        >>> g = method.hypergrad(step_loss, outer, w64, lam64, lr=0.5, momentum=0.5,
        ...                      batches=lambda t: t)
        >>> float(g["lam"])
        0.5
    """

    name: ClassVar[str] = "unrolled"
    steps: int = 5
    mode: str = "reverse"
    fresh_batches: bool = False

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise HypergradientError(f"Unrolled(steps={self.steps!r}): expected an int >= 1.")
        if self.mode not in ("reverse", "forward", "reversible"):
            raise HypergradientError(
                f"Unrolled(mode={self.mode!r}): expected 'reverse', 'forward' or 'reversible'."
            )
        if not isinstance(self.fresh_batches, bool):
            raise HypergradientError(
                f"Unrolled(fresh_batches={self.fresh_batches!r}): expected True (one training "
                f"batch per look-ahead step) or False (one batch for all of them)."
            )

    @property
    def train_batches(self) -> int | None:
        return self.steps if self.fresh_batches else None

    def hypergrad(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0, batches=None):
        return unrolled_hypergrad(
            inner_loss,
            outer_loss,
            params,
            hparams,
            steps=self.steps,
            lr=float(lr),
            momentum=float(momentum),
            mode=self.mode,
            batches=batches,
        )

    def hypergrad_and_info(
        self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0, batches=None
    ):
        r""":meth:`hypergrad`; with ``mode="reversible"`` also what the reversal kept:
        ``reversible_bits_per_weight_step`` (about :math:`\log_2(1/\mu)`) and
        ``reversible_buffer_bytes`` (its peak), for the training loop's history."""
        if self.mode != "reversible":
            return super().hypergrad_and_info(
                inner_loss, outer_loss, params, hparams, lr=lr, momentum=momentum, batches=batches
            )
        result = _reversible(
            inner_loss,
            outer_loss,
            params,
            hparams,
            self.steps,
            float(lr),
            float(momentum),
            batches=batches,
            where="hypergradient.Unrolled(mode='reversible')",
        )
        info = {
            "reversible_bits_per_weight_step": result.stats.bits_per_weight_per_step,
            "reversible_buffer_bytes": result.stats.buffer_bytes,
        }
        return result.hypergrad, info


class AmortizationResetWarning(UserWarning):
    """:class:`AmortizedImplicit` dropped its kept solution because reusing it would be wrong
    (the hyperparameters or the model changed shape, the kept solution holds NaN/inf, or the
    hyperparameters jumped); the solve started from zero instead.

    Examples:
        >>> import warnings
        >>> import hypergradient as hg
        >>> p = hg.testing.ridge_problem(dim=3)
        >>> method = hg.AmortizedImplicit()
        >>> _ = method.hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, lr=0.1)
        >>> jumped = {"log_l2": 3 * p.hparams["log_l2"]}  # relative change 2 > reset_jump
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = method.hypergrad(p.inner_loss, p.outer_loss, p.params, jumped, lr=0.1)
        >>> [c.category.__name__ for c in caught], "jumped" in str(caught[0].message)
        (['AmortizationResetWarning'], True)
    """


def pedregosa_tolerance(tol: float = 0.1, power: float = 1.5) -> Callable[[int], float]:
    r"""The inexact-hypergradient schedule of Pedregosa (2016, HOAG): the linear solve of
    hyper-step :math:`k` (0-based) stops at relative residual :math:`\epsilon_k =
    \texttt{tol}\,(k+1)^{-\texttt{power}}`; with ``power > 1`` the tolerances are summable,
    the condition under which HOAG's outer iterates converge.

    Examples:
        >>> [round(pedregosa_tolerance(0.1, 2.0)(k), 4) for k in range(3)]
        [0.1, 0.025, 0.0111]
    """
    if not (tol > 0 and power > 0):
        raise HypergradientError(
            f"pedregosa_tolerance(tol={tol!r}, power={power!r}): expected tol > 0 and power > 0 "
            f"(power > 1 for a summable schedule)."
        )
    return lambda k: tol * (k + 1) ** (-power)


@register_method
@dataclass(eq=False)
class AmortizedImplicit(AbstractHypergradientMethod):
    r"""Implicit hypergradients whose linear solve is warm-started from the previous
    hyper-step's solution: along a training run the weights and hyperparameters move a
    little per hyper-step, so the adjoint :math:`q = H^{-1}\nabla_w E` moves a little too,
    and a few Hessian-vector products per hyper-step keep it accurate.

    At hyper-step :math:`k` the solver starts from :math:`q_{k-1}` and stops after
    ``max_steps`` iterations or at relative residual ``tol(k)`` (a number, or a schedule such
    as :func:`pedregosa_tolerance`, the default: tolerances decreasing with the outer
    iterations, summable).  The kept solution is reset, with an
    :class:`AmortizationResetWarning`, when it would be wrong to reuse: the hyperparameters
    or the model's parameters changed names or shapes, it holds NaN/inf, or the
    hyperparameters jumped by more than ``reset_jump`` relative to their previous value.

    Args:
        solver: ``"cg"`` (needs a positive definite ``H + damping I`` along the iterates),
            ``"minres"`` (symmetric indefinite) or ``"neumann"`` (Richardson iteration with
            step ``alpha``, default the inner learning rate).
        max_steps: most solver iterations per hyper-step.  CG and MINRES pay one more
            Hessian-vector product for the warm start's initial residual.
        tol: relative residual at which a solve stops early: a float or ``k -> float``.
        alpha: Neumann's step (``None``: the inner optimizer's learning rate).
        damping: solve :math:`(H + \delta I) q = \nabla_w E`.
        hessian: ``"exact"`` or ``"gauss_newton"``: :math:`H` is then the generalised
            Gauss-Newton matrix plus the regulariser's exact Hessian, positive semi-definite
            (CG never breaks down), where a network's mini-batch Hessian is indefinite away
            from a minimum.  :class:`~hypergradient.BilevelTrainer` builds the split loss from
            the hyperparameter kind (``gauss_newton_loss``).
        preconditioner: ``None``, or ``r -> M^{-1} r`` on dicts shaped like the weights
            (e.g. :func:`hypergradient.linalg.diagonal_preconditioner`, or K-FAC's
            ``KFACPreconditioner(...).apply``), or
            :class:`hypergradient.linalg.NystromPreconditioner` (a low-rank sketch of the
            operator itself, rebuilt every ``refresh_every`` hyper-steps: its matvecs count
            in ``solve_hvps``); CG only.
        reset_jump: relative change of the hyperparameters (in the 2-norm over all of them)
            above which the kept solution is dropped.

    Cost per hyper-step: that of :class:`Implicit` with ``max_steps`` (+1) Hessian-vector
    products; memory: one extra vector the size of the weights (the kept solution).
    :meth:`state_dict` / :meth:`load_state_dict` carry the kept solution through a
    checkpoint, so a resumed run continues bit for bit.

    Examples:
        >>> import hypergradient as hg
        >>> p = hg.testing.ridge_problem(dim=3)  # exact hypergradient in p.hypergrad
        >>> method = hg.AmortizedImplicit(max_steps=2, tol=1e-10)
        >>> hvps = []
        >>> for _ in range(5):  # each hyper-step continues the previous solve
        ...     g, info = method.hypergrad_and_info(
        ...         p.inner_loss, p.outer_loss, p.params, p.hparams, lr=0.1)
        ...     hvps.append(info["solve_hvps"])
        >>> hvps, info["warm_started"], hg.testing.relative_error(g, p.hypergrad) < 1e-6
        ([2, 3, 3, 3, 3], True, True)

    References:
        Pedregosa (2016), Hyperparameter optimization with approximate gradient (HOAG);
        Lorraine, Vicol, Duvenaud (2020).
    """

    name: ClassVar[str] = "amortized"
    outer_at_params: ClassVar[bool] = True
    solver: str = "cg"
    max_steps: int = 2
    tol: float | Callable[[int], float] = field(default_factory=pedregosa_tolerance)
    alpha: float | None = None
    damping: float = 0.0
    hessian: str = "exact"
    preconditioner: Callable | None = None
    reset_jump: float = 0.5
    _kept: dict | None = field(default=None, init=False, repr=False)
    _calls: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        where = "AmortizedImplicit"
        _check_hessian(where, self.hessian)
        if self.solver not in ("cg", "minres", "neumann"):
            raise HypergradientError(
                f"{where}(solver={self.solver!r}): expected 'cg', 'minres' or 'neumann' (the "
                f"solvers that start from a given solution)."
            )
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool):
            raise HypergradientError(f"{where}(max_steps={self.max_steps!r}): expected an int.")
        if self.max_steps < 1:
            raise HypergradientError(f"{where}(max_steps={self.max_steps!r}): expected >= 1.")
        if self.preconditioner is not None and self.solver != "cg":
            raise HypergradientError(
                f"{where}(preconditioner=..., solver={self.solver!r}): a preconditioner is used "
                f"by solver='cg' only."
            )
        if not (isinstance(self.reset_jump, (int, float)) and self.reset_jump > 0):
            raise HypergradientError(
                f"{where}(reset_jump={self.reset_jump!r}): expected a positive number."
            )
        if not callable(self.tol) and not (
            isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol >= 0
        ):
            raise HypergradientError(
                f"{where}(tol={self.tol!r}): expected a float >= 0 or a schedule k -> float."
            )

    # ------------------------------------------------------------------ kept solution
    def reset(self) -> None:
        """Forget the kept solution: the next solve starts from zero."""
        self._kept = None

    def state_dict(self) -> dict:
        kept = self._kept
        state = {"calls": self._calls, "kept": None if kept is None else dict(kept)}
        if hasattr(self.preconditioner, "state_dict"):  # e.g. a Nystrom sketch
            state["preconditioner"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        self._calls = int(state["calls"])
        self._kept = None if state["kept"] is None else dict(state["kept"])
        if "preconditioner" in state and hasattr(self.preconditioner, "load_state_dict"):
            self.preconditioner.load_state_dict(state["preconditioner"])

    def _initial_guess(self, params, hparams) -> dict | None:
        kept = self._kept
        if kept is None:
            return None
        reason = None
        q, last_hparams = kept["adjoint"], kept["hparams"]
        if set(q) != set(params) or any(q[k].shape != params[k].shape for k in params):
            reason = "the model's parameters changed names or shapes"
        elif set(last_hparams) != set(hparams) or any(
            last_hparams[k].shape != hparams[k].shape for k in hparams
        ):
            reason = "the hyperparameters changed names or shapes"
        elif not all(bool(torch.isfinite(t).all()) for t in q.values()):
            reason = "the kept solution holds NaN/inf"
        else:
            sq_diff = sum(float(torch.sum((hparams[k].double() - last_hparams[k]) ** 2))
                          for k in hparams)  # fmt: skip
            sq_norm = sum(float(torch.sum(last_hparams[k] ** 2)) for k in hparams)
            jump = math.sqrt(sq_diff) / max(math.sqrt(sq_norm), 1e-12)
            if jump > self.reset_jump:
                reason = (
                    f"the hyperparameters jumped (relative change {jump:.3g} > reset_jump="
                    f"{self.reset_jump:g})"
                )
        if reason is not None:
            warnings.warn(
                f"AmortizedImplicit: {reason}; the kept solution is dropped and this solve "
                f"starts from zero.",
                AmortizationResetWarning,
                stacklevel=4,
            )
            self._kept = None
            return None
        return q

    # ------------------------------------------------------------------ the method
    def hypergrad(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0):
        return self.hypergrad_and_info(
            inner_loss, outer_loss, params, hparams, lr=lr, momentum=momentum
        )[0]

    def hypergrad_and_info(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0):
        x0 = self._initial_guess(params, hparams)
        tol = float(self.tol(self._calls)) if callable(self.tol) else float(self.tol)
        alpha = self.alpha
        if alpha is None and self.solver == "neumann":
            alpha = float(lr)
        with warnings.catch_warnings():
            # stopping at max_steps above tol is this method's point, not a failure
            warnings.simplefilter("ignore", ConvergenceWarning)
            result, stats = implicit_hypergrad(
                inner_loss,
                outer_loss,
                params,
                hparams,
                solver=self.solver,
                max_steps=self.max_steps,
                tol=tol,
                alpha=alpha,
                damping=self.damping,
                hessian=self.hessian,
                preconditioner=self.preconditioner,
                stationarity_tol=None,  # warm start: the weights are not an optimum by design
                x0=x0,
                return_stats=True,
            )
        self._kept = {
            "adjoint": stats.extra["adjoint"],
            "hparams": {k: v.detach().double().clone() for k, v in hparams.items()},
        }
        self._calls += 1
        info = {
            "inner_grad_norm": stats.extra["inner_grad_norm"],
            "solve_hvps": stats.num_matvecs,
            "solve_residual": stats.residual_norm,
            "solve_tol": tol,
            "warm_started": x0 is not None,
        }
        return result, info


@dataclass(eq=False)
class MeasuredMethod(AbstractHypergradientMethod):
    r"""Any method, plus a check of its accuracy along a real run: at the hyper-steps where
    ``at(k)`` is true (0-based calls), a converged reference hypergradient is computed from
    scratch at the same weights, hyperparameters and batches (implicit differentiation, CG
    to relative residual ``reference_tol``; MINRES where CG breaks down on an indefinite
    Hessian), and the info returned to the training loop (its history) gets

    * ``ref_rel_error`` :math:`\lVert g - g_\mathrm{ref}\rVert / \lVert g_\mathrm{ref}\rVert`,
    * ``ref_cosine`` :math:`\langle g, g_\mathrm{ref}\rangle / (\lVert g\rVert
      \lVert g_\mathrm{ref}\rVert)`,
    * ``ref_hvps``, ``ref_solver``, ``ref_converged`` of the reference solve.

    The reference solves the same linear system as the wrapped method: the same batches and
    the same damping :math:`(H + \delta I) q = \nabla_w E` (``reference_damping``, default
    the method's own ``damping``) and the same curvature (the method's ``hessian``: exact or
    Gauss-Newton), so a method is judged on the system it approximates.
    It costs up to ``reference_steps`` Hessian-vector products per measured step and changes
    nothing in the run: the wrapped method's hypergradient is what is returned.

    ``compare_with`` (name -> stateless method, e.g. ``{"neumann10": hg.Implicit()}``) also
    judges other methods at the same measured points (same weights, hyperparameters and
    batches) against the same reference: ``ref_rel_error.<name>`` and ``ref_cosine.<name>``.
    """

    method: AbstractHypergradientMethod
    at: Callable[[int], bool] = field(default=lambda k: k % 10 == 0)
    reference_tol: float = 1e-8
    reference_steps: int = 2000
    reference_damping: float | None = None
    compare_with: Mapping[str, AbstractHypergradientMethod] = field(default_factory=dict)
    _calls: int = field(default=0, init=False, repr=False)

    name: ClassVar[str] = "measured"

    def __post_init__(self):
        # The reference is an implicit solve on one training batch; a method that trains on
        # several fresh batches per hypergradient solves another problem, and this wrapper
        # would also hide its train_batches from the loop (it would silently get one batch).
        for label, wrapped in (("method", self.method), *self.compare_with.items()):
            if getattr(wrapped, "train_batches", None) is not None:
                raise HypergradientError(
                    f"MeasuredMethod({label}={wrapped!r}): it trains on "
                    f"{wrapped.train_batches} fresh batches per hypergradient, while the "
                    f"reference is an implicit solve on one batch; measure it with "
                    f"fresh_batches=False, or compare it with reverse mode over the same "
                    f"batches (hg.unrolled_hypergrad(..., batches=...))."
                )

    @property
    def outer_at_params(self) -> bool:  # type: ignore[override]
        return self.method.outer_at_params

    @property
    def hessian(self) -> str:
        """The wrapped method's curvature (a training loop builds the loss it needs)."""
        return getattr(self.method, "hessian", "exact")

    def state_dict(self) -> dict:
        return {"calls": self._calls, "method": self.method.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self._calls = int(state.get("calls", 0))
        self.method.load_state_dict(state.get("method", {}))

    def hypergrad(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0):
        return self.hypergrad_and_info(
            inner_loss, outer_loss, params, hparams, lr=lr, momentum=momentum
        )[0]

    def hypergrad_and_info(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0):
        grads, info = self.method.hypergrad_and_info(
            inner_loss, outer_loss, params, hparams, lr=lr, momentum=momentum
        )
        if self.at(self._calls):
            others = {
                name: other.hypergrad(
                    inner_loss, outer_loss, params, hparams, lr=lr, momentum=momentum
                )
                for name, other in self.compare_with.items()
            }
            info = {
                **info,
                **self.compare(inner_loss, outer_loss, params, hparams, grads, others=others),
            }
        self._calls += 1
        return grads, info

    def compare(self, inner_loss, outer_loss, params, hparams, grads, others=None) -> dict:
        """The reference at ``params`` and the accuracy of ``grads`` (and of each of
        ``others``: name -> hypergradient at the same point) against it."""
        from .._errors import ConvergenceError

        damping = self.reference_damping
        if damping is None:
            damping = float(getattr(self.method, "damping", 0.0) or 0.0)

        def reference(solver: str):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                return implicit_hypergrad(
                    inner_loss,
                    outer_loss,
                    params,
                    hparams,
                    solver=solver,
                    max_steps=self.reference_steps,
                    tol=self.reference_tol,
                    damping=damping,
                    hessian=getattr(self.method, "hessian", "exact"),
                    stationarity_tol=None,
                    return_stats=True,
                )

        try:
            ref, stats, solver = *reference("cg"), "cg"
        except ConvergenceError:  # CG met negative curvature: the Hessian is indefinite here
            ref, stats, solver = *reference("minres"), "minres"

        def accuracy(g) -> tuple[float, float]:
            dot = sum(float(torch.sum(g[k].double() * ref[k].double())) for k in ref)
            sq_ref = sum(float(torch.sum(ref[k].double() ** 2)) for k in ref)
            sq_g = sum(float(torch.sum(g[k].double() ** 2)) for k in ref)
            sq_diff = sum(float(torch.sum((g[k].double() - ref[k].double()) ** 2)) for k in ref)
            tiny = 1e-300
            return (
                math.sqrt(sq_diff) / max(math.sqrt(sq_ref), tiny),
                dot / max(math.sqrt(sq_ref * sq_g), tiny),
            )

        rel_error, cosine = accuracy(grads)
        record = {
            "ref_rel_error": rel_error,
            "ref_cosine": cosine,
            "ref_hvps": stats.num_matvecs,
            "ref_solver": solver,
            "ref_converged": stats.converged,
        }
        for name, other in (others or {}).items():
            record[f"ref_rel_error.{name}"], record[f"ref_cosine.{name}"] = accuracy(other)
        return record
