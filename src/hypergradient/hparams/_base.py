"""The hyperparameter-kind interface: what is tuned and how it enters the training loss.

A *kind* owns three decisions and nothing else:

* :meth:`~AbstractHyperparameter.init` - the hyperparameter tensors, in unconstrained
  coordinates (log weight decay, logit example weight, network weights...);
* :meth:`~AbstractHyperparameter.training_loss` - the inner loss they define, as a pure
  function of ``(params, hparams, batch)`` so any hypergradient method can differentiate it;
* :meth:`~AbstractHyperparameter.project` - an optional projection after each hyper-step.

How the inner problem is solved (the user's ``torch.optim`` optimizer) and how it is
differentiated (:class:`~hypergradient.hypergrad.methods.AbstractHypergradientMethod`) are
separate arguments of the training loop.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

Forward = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]
Criterion = Callable[..., torch.Tensor]


def per_example_loss(criterion: Criterion, outputs: torch.Tensor, targets) -> torch.Tensor:
    """``criterion(outputs, targets, reduction="none")``: one loss per example, shape ``(B,)``.

    Examples:
        >>> import math
        >>> import torch
        >>> import torch.nn.functional as F
        >>> import hypergradient as hg
        >>> outputs, targets = torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])  # uniform logits
        >>> losses = hg.hparams.per_example_loss(F.cross_entropy, outputs, targets)
        >>> tuple(losses.shape), bool(torch.allclose(losses, torch.full((4,), math.log(3))))
        ((4,), True)
    """
    return criterion(outputs, targets, reduction="none")


class SplitTrainingLoss(NamedTuple):
    """The training loss at *fixed* hyperparameters, split as ``data_loss + penalty``.

    Ordinary training steps (where the hyperparameters are constants) may back-propagate only
    ``data_loss`` and then call ``add_penalty_gradient(params)``, which adds
    :math:`\nabla_w \text{penalty}` to every ``param.grad`` in place from a closed form.  The
    step is the same as back-propagating :meth:`AbstractHyperparameter.training_loss`, minus the
    autograd graph of the penalty (for per-weight decay that graph costs as much as the
    model's own backward pass).  ``penalty(params)`` gives its value (for logging).

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> kind = hg.hparams.WeightDecay("global", initial=0.5)
        >>> w = torch.ones(3, requires_grad=True)
        >>> split = kind.split_training_loss(kind.init({"w": w}))
        >>> split.add_penalty_gradient({"w": w})  # w.grad += 0.5 * w, no autograd graph
        >>> bool(torch.allclose(w.grad, torch.full((3,), 0.5)))
        True
        >>> round(float(split.penalty({"w": w})), 4)  # 0.5 * 0.5 * (1 + 1 + 1)
        0.75
    """

    data_loss: Callable[[Forward, Mapping[str, torch.Tensor], Any, Criterion], torch.Tensor]
    add_penalty_gradient: Callable[[Mapping[str, torch.Tensor]], None]
    penalty: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


class AbstractHyperparameter(abc.ABC):
    """A kind of hyperparameter the bilevel training loop knows how to differentiate.

    Contract: :meth:`training_loss` must be a pure function of its tensor arguments (no
    in-place updates of ``hparams``, no ``.item()``) so that implicit, unrolled and forward
    hypergradients can all differentiate it; it receives the hyperparameters as given
    (unconstrained coordinates) and returns a scalar.  ``batch`` is whatever the training data
    loader yields (``(x, y)``; kinds that need example indices say so).

    Examples:
        >>> import math
        >>> import torch
        >>> import torch.nn.functional as F
        >>> import hypergradient as hg
        >>> class LogitScale(hg.hparams.AbstractHyperparameter):  # a learned temperature
        ...     def init(self, params):
        ...         return {"log_scale": torch.zeros(())}
        ...     def training_loss(self, forward, params, hparams, batch, criterion=F.cross_entropy):
        ...         outputs = hparams["log_scale"].exp() * forward(params, batch[0])
        ...         return criterion(outputs, batch[1])
        >>> kind, params = LogitScale(), {"w": torch.zeros(2, 3)}
        >>> batch = (torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
        >>> loss = kind.training_loss(lambda p, x: x @ p["w"], params, kind.init(params), batch)
        >>> bool(torch.isclose(loss, torch.tensor(math.log(3))))  # uniform over 3 classes
        True
    """

    #: Does the training loss read the real training batch?  (Distilled data does not.)
    uses_training_data: bool = True

    @abc.abstractmethod
    def init(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Initial hyperparameter tensors, given the model's parameters (names, shapes, dtype)."""

    @abc.abstractmethod
    def training_loss(
        self,
        forward: Forward,
        params: Mapping[str, torch.Tensor],
        hparams: Mapping[str, torch.Tensor],
        batch: Any,
        criterion: Criterion = F.cross_entropy,
    ) -> torch.Tensor:
        """The inner (training) loss defined by these hyperparameters; see the class docstring."""

    def project(self, hparams: Mapping[str, torch.Tensor]) -> None:  # noqa: B027
        """Project ``hparams`` in place onto their feasible set after a hyper-step (default:
        unconstrained, nothing to do)."""

    def split_training_loss(self, hparams: Mapping[str, torch.Tensor]) -> SplitTrainingLoss | None:
        """Optional fast path for training steps at these fixed ``hparams`` (default: none).

        Kinds whose training loss is a data loss plus a penalty with a cheap closed-form
        gradient return a :class:`SplitTrainingLoss`; the training loop then uses it for its
        ordinary steps.  Hypergradients always differentiate :meth:`training_loss` itself.
        """
        return None

    def gauss_newton_loss(
        self, forward: Forward, batch: Any, criterion: Criterion = F.cross_entropy
    ):
        """Optional: :meth:`training_loss` on ``batch`` split as a
        :class:`~hypergradient.linalg.GaussNewtonLoss` (the model's outputs, a loss convex in
        them, a regulariser), for hypergradients with ``hessian="gauss_newton"``, whose
        Gauss-Newton matrix is positive semi-definite where the Hessian of a network is not.
        Default: ``None`` (this kind offers no split)."""
        return None

    def describe(self, hparams: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """A few numbers worth logging about the current values (default: none)."""
        return {}
