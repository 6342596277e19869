r"""A small network that maps each example's loss to its weight (Meta-Weight-Net).

Shu et al. (2019) learn the weighting *function* instead of one weight per example:

.. math::

    L(w, \theta) = \frac{1}{B}\sum_{i\in\text{batch}} V\big(\operatorname{sg}[\ell_i(w)];
    \theta\big)\,\ell_i(w),
    \qquad V(\ell; \theta) = \sigma\big(W_2\, \mathrm{ReLU}(W_1 \ell + b_1) + b_2\big)
    \in (0, 1),

where :math:`\operatorname{sg}` stops the gradient (the loss is the network's *input*, as in
the reference implementation) and :math:`\theta = (W_1, b_1, W_2, b_2)` are the
hyperparameters.  The number of hyperparameters is ``3 * hidden + 1`` whatever the size of
the training set, so it generalises to examples never seen by a hypergradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._errors import HypergradientError
from ._base import AbstractHyperparameter, per_example_loss

_WHERE = "hypergradient.hparams.LossReweightNet"
_KEYS = ("mwn.w1", "mwn.b1", "mwn.w2", "mwn.b2")


@dataclass
class LossReweightNet(AbstractHyperparameter):
    r"""Meta-Weight-Net: an MLP ``1 -> hidden -> 1`` from a loss value to a weight in (0, 1).

    Args:
        hidden: width of the hidden layer (Shu et al. use 100).
        seed: seeds the initial network (PyTorch's default ``nn.Linear`` initialisation).
        normalize: divide the weighted sum by :math:`\sum_i V_i` of the batch instead of
            its size (the normalised variant of the paper).
        detach_input: feed the network the loss value without its gradient (default, as in
            the reference code); ``False`` also differentiates the weights through the loss.

    Batches are ``(x, y, ...)``; only ``x`` and ``y`` are read.  The hyperparameters are the
    network's weights ``hparams["mwn.w1"]`` ``(hidden, 1)``, ``"mwn.b1"`` ``(hidden,)``,
    ``"mwn.w2"`` ``(1, hidden)``, ``"mwn.b2"`` ``(1,)``; :meth:`weight_fn` is the network as
    a pure function of them.

    Cost: ``3 * hidden + 1`` hyperparameters; per loss evaluation one extra tiny MLP pass
    over ``B`` scalars (O(B * hidden)).

    Examples:
        >>> import torch
        >>> kind = LossReweightNet(hidden=8)
        >>> h = kind.init({"w": torch.zeros(1, dtype=torch.float64)})
        >>> v = kind.weight_fn(h, torch.tensor([0.1, 2.0, 5.0], dtype=torch.float64))
        >>> v.shape, bool(((v > 0) & (v < 1)).all())
        (torch.Size([3]), True)
    """

    hidden: int = 100
    seed: int = 0
    normalize: bool = False
    detach_input: bool = True

    def __post_init__(self):
        h = self.hidden
        if not isinstance(h, int) or isinstance(h, bool) or h < 1:
            raise HypergradientError(f"{_WHERE}(hidden={h!r}): expected an int >= 1.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise HypergradientError(f"{_WHERE}(seed={self.seed!r}): expected an int.")

    def init(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = next(iter(params.values())).dtype
        gen = torch.Generator().manual_seed(self.seed)

        def uniform(shape, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound

        values = (
            uniform((self.hidden, 1), 1),
            uniform((self.hidden,), 1),
            uniform((1, self.hidden), self.hidden),
            uniform((1,), self.hidden),
        )
        return {k: v.to(dtype) for k, v in zip(_KEYS, values)}

    def weight_fn(self, hparams: Mapping[str, torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
        """:math:`V(\\ell; \\theta)` for a ``(B,)`` tensor of losses: ``(B,)`` weights in (0, 1)."""
        missing = [k for k in _KEYS if k not in hparams]
        if missing:
            raise HypergradientError(
                f"{_WHERE}: hparams lacks {missing}; build them with LossReweightNet.init(...)."
            )
        z = losses.reshape(-1, 1)
        hidden = torch.relu(z @ hparams["mwn.w1"].T + hparams["mwn.b1"])
        return torch.sigmoid(hidden @ hparams["mwn.w2"].T + hparams["mwn.b2"]).reshape(-1)

    def training_loss(self, forward, params, hparams, batch, criterion=F.cross_entropy):
        losses = per_example_loss(criterion, forward(params, batch[0]), batch[1])
        v = self.weight_fn(hparams, losses.detach() if self.detach_input else losses)
        if self.normalize:
            return (v * losses).sum() / v.sum()
        return (v * losses).mean()

    def describe(self, hparams):
        grid = torch.tensor([0.1, 1.0, 3.0], dtype=hparams["mwn.w1"].dtype)
        v = self.weight_fn({k: t.detach() for k, t in hparams.items()}, grid)
        return {
            "weight_at_loss_0.1": float(v[0]),
            "weight_at_loss_1": float(v[1]),
            "weight_at_loss_3": float(v[2]),
        }
