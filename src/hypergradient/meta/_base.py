r"""The meta-learner interface: adapt to a task, and the meta-gradient of the query loss.

Gradient-based meta-learning is a bilevel problem over a distribution of tasks
:math:`\mathcal T_i`, each with a support loss :math:`\hat L_i` and a query loss :math:`L_i`:

.. math::

    \min_\theta\ \frac1B \sum_{i=1}^{B} L_i\big(\varphi_i(\theta)\big), \qquad
    \varphi_i(\theta) = \mathrm{Alg}\big(\theta, \hat L_i\big),

where :math:`\mathrm{Alg}` adapts the meta-parameters to the task: ``K`` gradient steps
(MAML), the minimiser of a proximal problem (iMAML), or the fit of a linear head on a
representation :math:`\theta` (hyper-representation).  Every learner answers three
questions -- :meth:`AbstractMetaLearner.adapt` (the task parameters),
:meth:`AbstractMetaLearner.predict` (outputs of the adapted model) and
:meth:`AbstractMetaLearner.meta_gradient` (:math:`dL_i/d\theta` for one task) -- and gets
:meth:`~AbstractMetaLearner.batch_meta_gradient` and :meth:`~AbstractMetaLearner.evaluate`
from them.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .._errors import HypergradientError, check_tree
from .episodes import Episode
from .models import AbstractModel

Params = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MetaGradient:
    """The meta-gradient of one task (or the mean over a batch of tasks).

    ``grad``: dict shaped like the meta-parameters, :math:`dL_{query}/d\\theta` (detached);
    ``query_loss``: the query loss of the adapted model (the objective being differentiated);
    ``query_accuracy``: its query accuracy for classification, else ``None``;
    ``stats``: method-specific numbers (e.g. CG residuals), averaged over a batch.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> net = hg.meta.MLP(2, (), out_features=1)  # a linear model y = x w + b
        >>> theta = net.init(torch.Generator().manual_seed(0))
        >>> episode = hg.meta.LinearTasks(dim=2).sample(torch.Generator().manual_seed(1))
        >>> g = hg.meta.MAML(net, inner_steps=1, inner_lr=0.1).meta_gradient(theta, episode)
        >>> {k: tuple(v.shape) for k, v in g.grad.items()}
        {'layers.0.weight': (1, 2), 'layers.0.bias': (1,)}
        >>> type(g.query_loss).__name__, g.query_accuracy  # regression: no accuracy
        ('float', None)
    """

    grad: dict[str, torch.Tensor]
    query_loss: float
    query_accuracy: float | None = None
    stats: dict[str, float] = field(default_factory=dict)


def default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer targets (classification), mean squared error otherwise.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> float(hg.meta.default_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])))
        2.5
        >>> round(float(hg.meta.default_loss(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))), 4)
        0.6931
    """
    if target.is_floating_point():
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


def accuracy(output: torch.Tensor, target: torch.Tensor) -> float | None:
    """Fraction of ``argmax(output) == target`` for integer targets, ``None`` otherwise."""
    if target.is_floating_point():
        return None
    return float((output.argmax(dim=1) == target).double().mean())


class AbstractMetaLearner(abc.ABC):
    """Adapts meta-parameters to a task and differentiates the query loss through that.

    Attributes every learner has: ``loss`` (``loss(output, target) -> scalar``, by default
    :func:`default_loss`).

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> net = hg.meta.MLP(2, (4,), out_features=1)
        >>> learner = hg.meta.MAML(net, inner_steps=2, inner_lr=0.1)
        >>> isinstance(learner, hg.meta.AbstractMetaLearner)
        True
        >>> theta = net.init(torch.Generator().manual_seed(0))
        >>> tasks = hg.meta.LinearTasks(dim=2, shots=5, queries=5)
        >>> episodes = tasks.sample_batch(3, torch.Generator().manual_seed(1))
        >>> learner.adapt(theta, episodes[0])["layers.1.weight"].shape
        torch.Size([1, 4])
        >>> scores = learner.evaluate(theta, episodes)
        >>> scores["accuracy"], len(scores["per_episode"])  # regression: losses per episode
        (None, 3)
    """

    loss: LossFn

    @abc.abstractmethod
    def adapt(self, theta: Params, episode: Episode) -> dict[str, torch.Tensor]:
        """The task parameters :math:`\\varphi(\\theta)` fitted on ``episode``'s support set
        (detached; no graph is kept)."""

    @abc.abstractmethod
    def predict(self, theta: Params, phi: Params, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the model adapted to a task (task parameters ``phi`` from
        :meth:`adapt`, meta-parameters ``theta``) on the inputs ``x``."""

    @abc.abstractmethod
    def meta_gradient(self, theta: Params, episode: Episode) -> MetaGradient:
        """:math:`dL_{query}(\\varphi(\\theta))/d\\theta` for one episode; see the method's
        class for what is exact and what is approximated."""

    def batch_meta_gradient(self, theta: Params, episodes: Sequence[Episode]) -> MetaGradient:
        """The mean of :meth:`meta_gradient` over ``episodes`` (one after the other, so the
        memory is that of one episode)."""
        if len(episodes) == 0:
            raise HypergradientError(
                f"{type(self).__name__}.batch_meta_gradient(theta, episodes): episodes is "
                f"empty; pass at least one Episode."
            )
        total: dict[str, torch.Tensor] = {}
        losses, accuracies, stats = [], [], {}
        for episode in episodes:
            result = self.meta_gradient(theta, episode)
            for k, g in result.grad.items():
                total[k] = g if k not in total else total[k] + g
            losses.append(result.query_loss)
            accuracies.append(result.query_accuracy)
            for k, v in result.stats.items():
                stats[k] = stats.get(k, 0.0) + v
        n = len(episodes)
        return MetaGradient(
            grad={k: g / n for k, g in total.items()},
            query_loss=sum(losses) / n,
            query_accuracy=None if accuracies[0] is None else sum(accuracies) / n,
            stats={k: v / n for k, v in stats.items()},
        )

    def evaluate(self, theta: Params, episodes: Sequence[Episode]) -> dict[str, Any]:
        """Adapt to every episode and score the query set.

        Returns ``{"loss": mean, "accuracy": mean or None, "accuracy_ci95": half-width of
        the normal 95% interval of the mean accuracy over episodes (or None),
        "per_episode": [accuracy or loss of each episode]}``.
        """
        losses, accuracies = [], []
        for episode in episodes:
            phi = self.adapt(theta, episode)
            with torch.no_grad():
                out = self.predict(theta, phi, episode.x_query)
                losses.append(float(self.loss(out, episode.y_query)))
                accuracies.append(accuracy(out, episode.y_query))
        n = len(losses)
        if n == 0:
            raise HypergradientError(
                f"{type(self).__name__}.evaluate(theta, episodes): episodes is empty."
            )
        classify = accuracies[0] is not None
        mean_acc = sum(accuracies) / n if classify else None
        ci = None
        if classify and n > 1:
            var = sum((a - mean_acc) ** 2 for a in accuracies) / (n - 1)
            ci = 1.96 * math.sqrt(var / n)
        return {
            "loss": sum(losses) / n,
            "accuracy": mean_acc,
            "accuracy_ci95": ci,
            "per_episode": accuracies if classify else losses,
        }


# ----------------------------------------------------------------------------- helpers


def leaves_requiring_grad(theta: Params, where: str) -> dict[str, torch.Tensor]:
    """Detached copies of ``theta`` that require grad (checked: a dict of finite float tensors)."""
    check_tree(where, "theta", theta)
    return {k: v.detach().requires_grad_(True) for k, v in theta.items()}


def pull_back(
    phi0: Params, theta: dict[str, torch.Tensor], cotangent: Params
) -> dict[str, torch.Tensor]:
    """``(d phi0 / d theta)^T cotangent``: a vector-Jacobian product through the map from the
    meta-parameters to a task's starting point (zeros for parameters it ignores)."""
    keys = [k for k in phi0 if phi0[k].requires_grad]
    if not keys:
        return {k: torch.zeros_like(v) for k, v in theta.items()}
    grads = torch.autograd.grad(
        [phi0[k] for k in keys],
        list(theta.values()),
        grad_outputs=[cotangent[k] for k in keys],
        allow_unused=True,
    )
    return {
        k: torch.zeros_like(v) if g is None else g.detach()
        for (k, v), g in zip(theta.items(), grads)
    }


def check_int(where: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HypergradientError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")


def check_float(where: str, name: str, value: Any, *, positive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise HypergradientError(f"{where}: {name} must be a finite float {bound}, got {value!r}.")


def check_model_and_loss(where: str, model: Any, loss: Any) -> None:
    if not isinstance(model, AbstractModel):
        raise HypergradientError(
            f"{where}: model must be a hypergradient.meta.AbstractModel (MLP, ConvNet, or "
            f"ModuleModel(module) for any nn.Module), got {type(model).__name__}."
        )
    if not callable(loss):
        raise HypergradientError(
            f"{where}: loss must be a callable loss(output, target) -> scalar, got "
            f"{type(loss).__name__}."
        )
