"""Weight decay as hyperparameters: global, one per tensor, or one per weight."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._errors import HypergradientError
from ._base import AbstractHyperparameter, SplitTrainingLoss, per_example_loss

_GRANULARITIES = ("global", "per_tensor", "per_weight")


def _data_loss(forward, params, batch, criterion=F.cross_entropy) -> torch.Tensor:
    x, y = batch[0], batch[1]
    return per_example_loss(criterion, forward(params, x), y).mean()


@dataclass
class WeightDecay(AbstractHyperparameter):
    r"""L2 penalty :math:`\tfrac12\sum_i e^{\lambda_i} w_i^2` with log-parametrised decays.

    Args:
        granularity: ``"global"`` (one :math:`\lambda`), ``"per_tensor"`` (one per parameter
            tensor) or ``"per_weight"`` (one per scalar weight: as many hyperparameters as
            weights, Lorraine et al. 2020).
        initial: initial decay :math:`e^{\lambda}` (> 0).
        include_biases: decay 1-d parameters (biases, norms) too.

    Cost: the penalty is O(#weights) per loss evaluation; per-weight decay stores one extra
    tensor the size of the model.  Hyperparameter names are ``"log_wd"`` (global) or
    ``"log_wd.<param name>"``.
    """

    granularity: str = "per_weight"
    initial: float = 1e-3
    include_biases: bool = True

    def __post_init__(self):
        if self.granularity not in _GRANULARITIES:
            raise HypergradientError(
                f"WeightDecay(granularity={self.granularity!r}): expected one of "
                f"{list(_GRANULARITIES)}."
            )
        ok = isinstance(self.initial, (int, float)) and math.isfinite(self.initial)
        if not ok or self.initial <= 0:
            raise HypergradientError(
                f"WeightDecay(initial={self.initial!r}): the initial decay must be a positive "
                f"number (it is stored as its logarithm)."
            )

    def decayed(self, params: Mapping[str, torch.Tensor]) -> list[str]:
        return [k for k, v in params.items() if self.include_biases or v.dim() > 1]

    def init(self, params):
        value = math.log(self.initial)
        names = self.decayed(params)
        if not names:
            raise HypergradientError(
                "WeightDecay: the model has no parameter to decay (include_biases=False and no "
                "parameter has more than one dimension)."
            )
        dtype = next(iter(params.values())).dtype
        if self.granularity == "global":
            return {"log_wd": torch.tensor(value, dtype=dtype)}
        if self.granularity == "per_tensor":
            return {f"log_wd.{k}": torch.tensor(value, dtype=dtype) for k in names}
        return {f"log_wd.{k}": torch.full_like(params[k], value) for k in names}

    def penalty(self, params, hparams) -> torch.Tensor:
        total = None
        for k in self.decayed(params):
            log_wd = hparams["log_wd"] if self.granularity == "global" else hparams[f"log_wd.{k}"]
            term = 0.5 * torch.sum(log_wd.exp() * params[k] ** 2)
            total = term if total is None else total + term
        return total

    def training_loss(self, forward, params, hparams, batch, criterion=F.cross_entropy):
        return _data_loss(forward, params, batch, criterion) + self.penalty(params, hparams)

    def split_training_loss(self, hparams):
        r"""At fixed decays :math:`\nabla_w` of the penalty is :math:`e^{\lambda} \odot w`.

        The decays :math:`e^{\lambda}` are computed once here (once per block of training
        steps) instead of inside every step's autograd graph; each step then adds
        :math:`e^{\lambda}\odot w` to the gradient in place, as ``torch.optim.SGD``'s own
        ``weight_decay`` does: one fused multiply-add per tensor, no extra memory.
        """
        with torch.no_grad():
            exp = {k: v.detach().exp() for k, v in hparams.items()}

        def decay_of(name: str) -> torch.Tensor:
            return exp["log_wd"] if self.granularity == "global" else exp[f"log_wd.{name}"]

        def add_penalty_gradient(params) -> None:
            with torch.no_grad():
                for k in self.decayed(params):
                    p = params[k]
                    if p.grad is None:
                        p.grad = decay_of(k) * p
                    else:
                        p.grad.addcmul_(decay_of(k), p)

        def penalty(params) -> torch.Tensor:
            with torch.no_grad():
                return sum(
                    0.5 * torch.sum(decay_of(k) * params[k] ** 2) for k in self.decayed(params)
                )

        return SplitTrainingLoss(_data_loss, add_penalty_gradient, penalty)

    def describe(self, hparams):
        decays = torch.cat([v.detach().exp().reshape(-1) for v in hparams.values()]).double()
        return {
            "wd_median": float(decays.median()),
            "wd_min": float(decays.min()),
            "wd_max": float(decays.max()),
        }
