r"""Hyper-representation learning (Franceschi, Frasconi, Salzo, Grazzi, Pontil 2018).

Meta-learning as bilevel programming: the shared representation :math:`h_\theta` (the
layers below the classifier) is the *hyperparameter*, and each episode fits its own linear
head :math:`(W, b)` on top of it -- the inner problem --

.. math::

    (W, b)^*_T(\theta) = \text{$T$ gradient steps from } 0 \text{ on }\
        \hat L(W, b; \theta) = \ell\big(h_\theta(X_s) W^\top + b,\ y_s\big)
        + \frac{\rho}{2}\|W\|^2,

while the outer problem minimises the query loss
:math:`L(\theta) = \ell(h_\theta(X_q) W_T^\top + b_T,\ y_q)` over :math:`\theta`.  The
hypergradient is the exact derivative of this :math:`T`-step approximation, by reverse mode
through the head's steps (reverse-HG, Franceschi et al. 2017), as the paper does; with
:math:`\rho > 0` the inner problem is strongly convex, so the approximation converges to the
bilevel problem as :math:`T \to \infty` (their Theorem 3.2).

Cost: the representation is evaluated once on the support set and once on the query set;
the ``T`` inner steps (with ``create_graph``) act on the head only, on
``(n_support, features)`` inputs, so they are cheap next to one pass through the network.
Memory: one graph of the network on each set plus ``T`` small head steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._errors import HypergradientError
from ._base import (
    AbstractMetaLearner,
    LossFn,
    MetaGradient,
    Params,
    accuracy,
    check_float,
    check_int,
    default_loss,
    leaves_requiring_grad,
)
from .episodes import Episode

__all__ = ["HyperRepresentation"]

Representation = Callable[[Params, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HyperRepresentation(AbstractMetaLearner):
    r"""Shared representation as hyperparameters, a linear head per episode.

    Args:
        representation: ``representation(theta, x) -> (n, features)``, e.g.
            :meth:`hypergradient.meta.ConvNet.features` or ``MLP.features``.
        inner_steps: ``T >= 1`` gradient steps on the head.
        inner_lr: their step size.
        head_l2: :math:`\rho \ge 0`, ridge penalty on the head's weights.
        loss: ``loss(output, target) -> scalar`` (default: cross-entropy for integer
            targets, mean squared error otherwise).  The head has ``ways`` outputs for
            classification, ``y.shape[1]`` for regression.

    Examples:
        >>> import torch
        >>> from hypergradient.meta import MLP, HyperRepresentation, LinearTasks
        >>> net = MLP(3, (4,))
        >>> theta = net.init(torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> episode = LinearTasks(dim=3, dtype=torch.float64).sample(
        ...     torch.Generator().manual_seed(1))
        >>> learner = HyperRepresentation(net.features, inner_steps=10, inner_lr=0.1)
        >>> learner.adapt(theta, episode)["weight"].shape  # one output: regression
        torch.Size([1, 4])

    References:
        Franceschi, Frasconi, Salzo, Grazzi, Pontil (2018), Bilevel Programming for
        Hyperparameter Optimization and Meta-Learning.
    """

    representation: Representation
    inner_steps: int = 50
    inner_lr: float = 0.1
    head_l2: float = 0.0
    loss: LossFn = default_loss

    def __post_init__(self) -> None:
        where = "hypergradient.meta.HyperRepresentation(...)"
        if not callable(self.representation):
            raise HypergradientError(
                f"{where}: representation must be a callable representation(theta, x) -> "
                f"(n, features), got {type(self.representation).__name__}."
            )
        if not callable(self.loss):
            raise HypergradientError(
                f"{where}: loss must be a callable loss(output, target) -> scalar, got "
                f"{type(self.loss).__name__}."
            )
        check_int(where, "inner_steps", self.inner_steps, 1)
        check_float(where, "inner_lr", self.inner_lr)
        check_float(where, "head_l2", self.head_l2, positive=False)

    def _features(self, theta: Params, x: torch.Tensor) -> torch.Tensor:
        features = self.representation(theta, x)
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            got = (
                f"shape {tuple(features.shape)}"
                if isinstance(features, torch.Tensor)
                else type(features).__name__
            )
            raise HypergradientError(
                f"hypergradient.meta.HyperRepresentation: representation(theta, x) must "
                f"return a (n, features) tensor, got {got}."
            )
        return features

    def _fit_head(
        self, features: torch.Tensor, episode: Episode, *, create_graph: bool
    ) -> dict[str, torch.Tensor]:
        """``T`` gradient steps on the head from zero (with ``create_graph``: differentiable
        in ``features``, hence in ``theta``)."""
        y = episode.y_support
        outputs = episode.ways if episode.ways is not None else y.shape[1]
        weight = torch.zeros(outputs, features.shape[1], dtype=features.dtype,
                             device=features.device, requires_grad=True)  # fmt: skip
        bias = torch.zeros(outputs, dtype=features.dtype, device=features.device,
                           requires_grad=True)  # fmt: skip
        for _ in range(self.inner_steps):
            with torch.enable_grad():
                inner = self.loss(F.linear(features, weight, bias), y)
                if self.head_l2:
                    inner = inner + 0.5 * self.head_l2 * (weight**2).sum()
                g_w, g_b = torch.autograd.grad(inner, [weight, bias], create_graph=create_graph)
            if not torch.isfinite(inner):
                raise HypergradientError(
                    f"HyperRepresentation inner problem: the support loss became "
                    f"{float(inner.detach())}; lower inner_lr (now {self.inner_lr})."
                )
            weight = weight - self.inner_lr * g_w
            bias = bias - self.inner_lr * g_b
            if not create_graph:
                weight = weight.detach().requires_grad_(True)
                bias = bias.detach().requires_grad_(True)
        return {"weight": weight, "bias": bias}

    def adapt(self, theta: Params, episode: Episode) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            features = self._features(theta, episode.x_support)
        head = self._fit_head(features, episode, create_graph=False)
        return {k: v.detach() for k, v in head.items()}

    def predict(self, theta: Params, phi: Params, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._features(theta, x), phi["weight"], phi["bias"])

    def meta_gradient(self, theta: Params, episode: Episode) -> MetaGradient:
        leaves = leaves_requiring_grad(theta, "hypergradient.meta.HyperRepresentation")
        with torch.enable_grad():
            support = self._features(leaves, episode.x_support)
            head = self._fit_head(support, episode, create_graph=True)
            out = self.predict(leaves, head, episode.x_query)
            query_loss = self.loss(out, episode.y_query)
            grads = torch.autograd.grad(query_loss, list(leaves.values()), allow_unused=True)
        return MetaGradient(
            grad={
                k: torch.zeros_like(v) if g is None else g.detach()
                for (k, v), g in zip(leaves.items(), grads)
            },
            query_loss=float(query_loss.detach()),
            query_accuracy=accuracy(out.detach(), episode.y_query),
        )
