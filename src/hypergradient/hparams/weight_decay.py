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


def max_stable_decay(optimizer: torch.optim.Optimizer, safety: float = 0.9) -> float | None:
    r"""``safety`` times the largest weight decay the inner optimizer's step stays stable with.

    On the penalty :math:`\tfrac12\lambda w^2` alone (curvature :math:`\lambda`), a step of
    ``torch.optim.SGD`` with learning rate :math:`\eta` is stable if and only if
    :math:`\eta\lambda < 2`; with heavy-ball ``momentum`` :math:`\mu` and ``dampening``
    :math:`d`, :math:`\eta(1-d)\lambda < 2(1+\mu)`; with ``nesterov=True``,
    :math:`\eta\lambda < 2(1+\mu)/(1+2\mu)`.  Past it the weights oscillate with growing
    amplitude and the training loss explodes geometrically.  The optimizer's own
    ``weight_decay`` adds to :math:`\lambda`, so it is subtracted; the tightest parameter
    group wins.  The data loss adds its own curvature, so the bound is necessary, not
    sufficient: ``safety < 1`` leaves a margin (default 0.9).

    Returns ``None`` for other optimizers (Adam-type steps are normalised and have no such
    threshold).

    Examples:
        >>> import torch, hypergradient as hg
        >>> w = torch.zeros(3, requires_grad=True)
        >>> round(hg.hparams.max_stable_decay(torch.optim.SGD([w], lr=0.1)), 6)
        18.0
    """
    if not (isinstance(safety, (int, float)) and 0 < safety < 1):
        raise HypergradientError(
            f"hypergradient.hparams.max_stable_decay(safety={safety!r}): expected a number in "
            f"(0, 1), the fraction of the stability limit to allow."
        )
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    bounds = []
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        mu = float(group.get("momentum", 0.0) or 0.0)
        if lr <= 0:
            continue
        if group.get("nesterov", False):
            limit = 2 * (1 + mu) / ((1 + 2 * mu) * lr)
        else:
            limit = 2 * (1 + mu) / ((1 - float(group.get("dampening", 0.0) or 0.0)) * lr)
        bounds.append(safety * limit - float(group.get("weight_decay", 0.0) or 0.0))
    return min(bounds) if bounds else None


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
        max_decay: optional upper bound on every decay :math:`e^{\lambda}`, enforced by
            :meth:`project` after every hyper-step (the log decays are clipped to
            :math:`\log` ``max_decay``).  Hypergradients can push decays without limit (a
            weight the validation loss dislikes is best at zero); past ``2 / lr`` the inner
            SGD step diverges.  :func:`max_stable_decay` gives a safe value for an optimizer.
            :meth:`describe` then reports ``wd_at_bound``, the number of decays held at it.

    Cost: the penalty is O(#weights) per loss evaluation; per-weight decay stores one extra
    tensor the size of the model.  Hyperparameter names are ``"log_wd"`` (global) or
    ``"log_wd.<param name>"``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> params = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
        >>> hparams = hg.hparams.WeightDecay(initial=0.5).init(params)  # per_weight
        >>> {k: tuple(v.shape) for k, v in hparams.items()}
        {'log_wd.weight': (2, 3), 'log_wd.bias': (2,)}
        >>> kind = hg.hparams.WeightDecay("global", initial=0.5)
        >>> round(float(kind.penalty(params, kind.init(params))), 4)  # 0.5 * 0.5 * 6 ones
        1.5
    """

    granularity: str = "per_weight"
    initial: float = 1e-3
    include_biases: bool = True
    max_decay: float | None = None

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
        if self.max_decay is not None:
            ok = isinstance(self.max_decay, (int, float)) and math.isfinite(self.max_decay)
            if not ok or self.max_decay <= 0:
                raise HypergradientError(
                    f"WeightDecay(max_decay={self.max_decay!r}): expected a positive finite "
                    f"number or None (no bound)."
                )
            if self.initial > self.max_decay:
                raise HypergradientError(
                    f"WeightDecay(initial={self.initial!r}, max_decay={self.max_decay!r}): "
                    f"the initial decay exceeds the bound; lower initial."
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

    def gauss_newton_loss(self, forward, batch, criterion=F.cross_entropy):
        r"""``criterion(f(w; x), y)`` (convex in the outputs) plus the decay penalty, whose
        Hessian :math:`\mathrm{diag}(e^{\lambda})` is kept exactly."""
        from ..linalg.operators import GaussNewtonLoss

        x, y = batch[0], batch[1]
        return GaussNewtonLoss(
            predict=lambda params, hparams: forward(params, x),
            output_loss=lambda outputs, hparams: per_example_loss(criterion, outputs, y).mean(),
            regularizer=self.penalty,
        )

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

    def project(self, hparams) -> None:
        """Clip the log decays to ``log(max_decay)`` (in place; nothing without a bound)."""
        if self.max_decay is None:
            return
        top = math.log(self.max_decay)
        for v in hparams.values():
            v.clamp_(max=top)

    def describe(self, hparams):
        decays = torch.cat([v.detach().exp().reshape(-1) for v in hparams.values()]).double()
        out = {
            "wd_median": float(decays.median()),
            "wd_min": float(decays.min()),
            "wd_max": float(decays.max()),
        }
        if self.max_decay is not None:
            # in log space: exp(log(max)) need not round-trip in float32
            near = math.log(self.max_decay) - 1e-6 * max(1.0, abs(math.log(self.max_decay)))
            out["wd_at_bound"] = sum(int((v.detach() >= near).sum()) for v in hparams.values())
        return out
