"""Hypergradient *methods* as objects: how a bilevel problem is differentiated.

The functional entry points (:func:`implicit_hypergrad`, :func:`unrolled_hypergrad`) take
everything as arguments; the training loop instead holds one method object and calls
:meth:`AbstractHypergradientMethod.hypergrad` at every hyper-step with the current inner
weights.  Keeping the method separate from the inner problem (the losses) and from the inner
solver (the user's ``torch.optim`` optimizer) is what lets any method drive any recipe.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._errors import HypergradientError
from .implicit import implicit_hypergrad
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
    """

    name: ClassVar[str]
    #: Does the method evaluate ``outer_loss`` at the given ``params`` (so a caller that wants
    #: the validation loss there can record it instead of paying another forward pass)?
    outer_at_params: ClassVar[bool] = False

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
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """:meth:`hypergrad` and a few numbers it measured on the way, worth logging
        (default: none; :class:`Implicit` gives ``inner_grad_norm``).  The training loop
        calls this one, so a subclass that only implements :meth:`hypergrad` still works."""
        return self.hypergrad(inner_loss, outer_loss, params, hparams, lr=lr, momentum=momentum), {}


def register_method(cls):
    _METHODS[cls.name] = cls
    return cls


def get_method(method: str | AbstractHypergradientMethod, **options) -> AbstractHypergradientMethod:
    """A method object from its name (``"implicit"``, ``"unrolled"``) and options."""
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
    """

    name: ClassVar[str] = "implicit"
    outer_at_params: ClassVar[bool] = True
    solver: str = "neumann"
    max_steps: int = 10
    tol: float = 0.0
    alpha: float | None = None
    damping: float = 0.0
    stationarity_tol: float | None = None

    def __post_init__(self):
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
            stationarity_tol=self.stationarity_tol,
            return_stats=True,
        )
        keys = ("inner_grad_norm", "fixed_point_residual")
        return result, {k: stats.extra[k] for k in keys if k in stats.extra}


@register_method
@dataclass(frozen=True)
class Unrolled(AbstractHypergradientMethod):
    """Differentiate through ``steps`` look-ahead SGD(+momentum) steps from the current weights.

    In a warm-started loop this is truncated back-propagation (``mode="reverse"``) or its
    forward-mode twin (``mode="forward"``, one JVP per scalar hyperparameter: few
    hyperparameters only).  The look-ahead steps use the inner optimizer's learning rate and
    momentum and the same training batch; they are discarded afterwards.
    Cost: ``steps`` double-backward passes; memory grows with ``steps`` (reverse mode).
    """

    name: ClassVar[str] = "unrolled"
    steps: int = 5
    mode: str = "reverse"

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise HypergradientError(f"Unrolled(steps={self.steps!r}): expected an int >= 1.")
        if self.mode not in ("reverse", "forward"):
            raise HypergradientError(
                f"Unrolled(mode={self.mode!r}): expected 'reverse' or 'forward'."
            )

    def hypergrad(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0):
        return unrolled_hypergrad(
            inner_loss,
            outer_loss,
            params,
            hparams,
            steps=self.steps,
            lr=float(lr),
            momentum=float(momentum),
            mode=self.mode,
        )
