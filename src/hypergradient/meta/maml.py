r"""MAML (Finn, Abbeel, Levine 2017) and its first-order approximation.

For a task with support loss :math:`\hat L` and query loss :math:`L`, the task parameters
are ``K`` gradient steps from the (task-specific) starting point
:math:`\varphi_0 = \varphi_0(\theta)` (see :meth:`~.models.AbstractModel.task_params`):

.. math::

    \varphi_{k+1} = \varphi_k - \alpha \nabla \hat L(\varphi_k), \qquad k = 0..K-1,

and the meta-gradient is the exact derivative of :math:`L(\varphi_K)`, back-propagated
through the steps (second order: every step contributes a Hessian-vector product),

.. math::

    \frac{dL(\varphi_K)}{d\theta} = \Big(\frac{\partial\varphi_0}{\partial\theta}\Big)^{\!\top}
        \prod_{k=0}^{K-1}\big(I - \alpha \nabla^2 \hat L(\varphi_k)\big)\,
        \nabla L(\varphi_K)

(the product ordered from :math:`k = 0` on the left).  First-order MAML drops the Hessians:
:math:`(\partial\varphi_0/\partial\theta)^\top \nabla L(\varphi_K)`.

Memory: second-order MAML keeps the graph of all ``K`` steps (activations of ``K`` forward
and ``K`` backward passes on the support set): it grows linearly with ``K``.  First-order
MAML keeps one step's graph at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import HypergradientError
from ._base import (
    AbstractMetaLearner,
    LossFn,
    MetaGradient,
    Params,
    accuracy,
    check_float,
    check_int,
    check_model_and_loss,
    default_loss,
    leaves_requiring_grad,
)
from .episodes import Episode
from .models import AbstractModel

__all__ = ["MAML"]


def sgd_adapt(
    model: AbstractModel,
    loss: LossFn,
    phi: dict[str, torch.Tensor],
    episode: Episode,
    steps: int,
    lr: float,
    *,
    create_graph: bool,
) -> dict[str, torch.Tensor]:
    """``steps`` plain gradient steps on the support loss from ``phi``.

    ``create_graph=True`` keeps the graph of every step (second-order MAML);
    ``False`` treats each gradient as a constant, so ``phi_K`` depends on ``phi_0`` only
    through the identity (first-order MAML, and evaluation).
    """
    keys = list(phi)
    for _ in range(steps):
        with torch.enable_grad():
            leaves = [phi[k] if phi[k].requires_grad else phi[k].requires_grad_(True) for k in keys]
            support_loss = loss(model.predict(dict(zip(keys, leaves)), episode.x_support),
                                episode.y_support)  # fmt: skip
            if not torch.isfinite(support_loss):
                raise HypergradientError(
                    f"MAML adaptation: the support loss became "
                    f"{float(support_loss.detach())}; lower the inner learning rate (now {lr})."
                )
            grads = torch.autograd.grad(support_loss, leaves, create_graph=create_graph)
        phi = {k: p - lr * g for k, p, g in zip(keys, leaves, grads)}
    return phi


@dataclass(frozen=True)
class MAML(AbstractMetaLearner):
    r"""Model-agnostic meta-learning: ``inner_steps`` SGD steps of size ``inner_lr`` on the
    support set, meta-gradient back-propagated through them.

    Args:
        model: an :class:`~.models.AbstractModel` (e.g. :class:`~.models.ConvNet`).
        inner_steps: ``K >= 1`` adaptation steps (the same for training and evaluation;
            make a second learner with ``dataclasses.replace`` to evaluate with other ``K``).
        inner_lr: ``alpha > 0``.
        first_order: drop the second-order terms (FOMAML): the meta-gradient is the query
            gradient at :math:`\varphi_K`, pulled back through :math:`\varphi_0(\theta)`.
        loss: ``loss(output, target) -> scalar``; default cross-entropy for integer
            targets, mean squared error otherwise.

    Cost per task: ``K`` forward and backward passes on the support set (``create_graph``
    for second order), one forward on the query set, and one backward through everything
    (second order: about twice the forward work of the ``K`` steps again).

    Examples:
        >>> import torch
        >>> from hypergradient.meta import MLP, MAML, SinusoidTasks
        >>> net = MLP(1, (8,), out_features=1)
        >>> theta = net.init(torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> tasks = SinusoidTasks(dtype=torch.float64)
        >>> episode = tasks.sample(torch.Generator().manual_seed(1))
        >>> g = MAML(net, inner_steps=2, inner_lr=0.01).meta_gradient(theta, episode)
        >>> sorted(g.grad) == sorted(theta), g.query_accuracy is None
        (True, True)

    References:
        Finn, Abbeel, Levine (2017), Model-Agnostic Meta-Learning for Fast Adaptation of
        Deep Networks.
    """

    model: AbstractModel
    inner_steps: int = 5
    inner_lr: float = 0.4
    first_order: bool = False
    loss: LossFn = default_loss

    def __post_init__(self) -> None:
        where = "hypergradient.meta.MAML(...)"
        check_model_and_loss(where, self.model, self.loss)
        check_int(where, "inner_steps", self.inner_steps, 0)
        check_float(where, "inner_lr", self.inner_lr)
        if not isinstance(self.first_order, bool):
            raise HypergradientError(
                f"{where}: first_order must be True or False, got {self.first_order!r}."
            )

    def adapt(self, theta: Params, episode: Episode) -> dict[str, torch.Tensor]:
        phi0 = self.model.task_params({k: v.detach() for k, v in theta.items()}, episode.ways)
        phi = sgd_adapt(
            self.model, self.loss, phi0, episode, self.inner_steps, self.inner_lr,
            create_graph=False,
        )  # fmt: skip
        return {k: v.detach() for k, v in phi.items()}

    def predict(self, theta: Params, phi: Params, x: torch.Tensor) -> torch.Tensor:
        return self.model.predict(phi, x)

    def meta_gradient(self, theta: Params, episode: Episode) -> MetaGradient:
        leaves = leaves_requiring_grad(theta, "hypergradient.meta.MAML.meta_gradient")
        with torch.enable_grad():
            phi0 = self.model.task_params(leaves, episode.ways)
            phi = sgd_adapt(
                self.model, self.loss, phi0, episode, self.inner_steps, self.inner_lr,
                create_graph=not self.first_order,
            )  # fmt: skip
            out = self.model.predict(phi, episode.x_query)
            query_loss = self.loss(out, episode.y_query)
            grads = torch.autograd.grad(query_loss, list(leaves.values()), allow_unused=True)
        grad = {
            k: torch.zeros_like(v) if g is None else g.detach()
            for (k, v), g in zip(leaves.items(), grads)
        }
        return MetaGradient(
            grad=grad,
            query_loss=float(query_loss.detach()),
            query_accuracy=accuracy(out.detach(), episode.y_query),
        )
