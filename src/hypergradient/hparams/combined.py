r"""Several hyperparameter kinds at once: one defines the training loss, the others add
penalties (e.g. a learned augmentation network *and* per-layer weight decay).

.. math::

    L(w, \lambda_0, \lambda_1, \dots) = L_0(w, \lambda_0; \text{batch})
        + \sum_{i \ge 1} R_i(w, \lambda_i)

where :math:`L_0` is the first kind's :meth:`training_loss` and :math:`R_i` the ``penalty`` of
each further kind (:class:`~hypergradient.hparams.WeightDecay` has one).  The hyperparameter
dicts are merged (their keys must differ: ``aug.*``, ``log_wd.*``), so every method
differentiates all of them in one hypergradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .._errors import HypergradientError
from ._base import AbstractHyperparameter


class Combined(AbstractHyperparameter):
    """``Combined(data_kind, *penalty_kinds)``: see the module docstring.

    Args:
        data_kind: the kind whose training loss reads the batch (e.g. ``AugmentationNet``).
        penalty_kinds: kinds with ``penalty(params, hparams) -> scalar`` (``WeightDecay``).

    Cost: the data kind's, plus each penalty (one pass over the weights).

    Examples:
        >>> import math
        >>> import torch
        >>> import hypergradient as hg
        >>> kind = hg.hparams.Combined(hg.hparams.ExampleWeights(4),
        ...                            hg.hparams.WeightDecay("per_tensor", initial=1.0))
        >>> params = {"w": torch.ones(2, 3)}
        >>> hparams = kind.init(params)
        >>> sorted(hparams)
        ['example_weights', 'log_wd.w']
        >>> batch = (torch.zeros(4, 2), torch.tensor([0, 1, 2, 0]), torch.arange(4))
        >>> loss = kind.training_loss(lambda p, x: x @ p["w"], params, hparams, batch)
        >>> bool(torch.isclose(loss, torch.tensor(math.log(3) + 3.0)))  # data + 0.5 * 6 ones
        True
    """

    def __init__(self, data_kind: AbstractHyperparameter, *penalty_kinds: AbstractHyperparameter):
        kinds = (data_kind, *penalty_kinds)
        for kind in kinds:
            if not isinstance(kind, AbstractHyperparameter):
                raise HypergradientError(
                    f"hg.hparams.Combined(...): expected hyperparameter kinds such as "
                    f"hg.hparams.WeightDecay(), got {type(kind).__name__}."
                )
        for kind in penalty_kinds:
            if not callable(getattr(kind, "penalty", None)):
                raise HypergradientError(
                    f"hg.hparams.Combined(...): {type(kind).__name__} has no penalty(params, "
                    f"hparams); after the first kind (which defines the training loss) only "
                    f"penalty kinds such as WeightDecay can be added."
                )
        self.data_kind = data_kind
        self.penalty_kinds = penalty_kinds
        self.uses_training_data = data_kind.uses_training_data
        self._keys: list[list[str]] = []

    def init(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        merged: dict[str, torch.Tensor] = {}
        self._keys = []
        for kind in (self.data_kind, *self.penalty_kinds):
            part = kind.init(params)
            clash = sorted(set(part) & set(merged))
            if clash:
                raise HypergradientError(
                    f"hg.hparams.Combined: {type(kind).__name__} and an earlier kind both name "
                    f"the hyperparameters {clash}; combine kinds whose names differ."
                )
            merged.update(part)
            self._keys.append(list(part))
        return merged

    def _parts(self, hparams: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if not self._keys:  # init not called (hparams built elsewhere): split by each kind
            raise HypergradientError(
                "hg.hparams.Combined: call init(params) first (BilevelTrainer does), so the "
                "combination knows which hyperparameters belong to which kind."
            )
        return [{k: hparams[k] for k in keys} for keys in self._keys]

    def training_loss(
        self, forward, params, hparams, batch: Any, criterion=F.cross_entropy
    ) -> torch.Tensor:
        parts = self._parts(hparams)
        loss = self.data_kind.training_loss(forward, params, parts[0], batch, criterion)
        for kind, part in zip(self.penalty_kinds, parts[1:]):
            loss = loss + kind.penalty(params, part)
        return loss

    def project(self, hparams) -> None:
        for kind, part in zip((self.data_kind, *self.penalty_kinds), self._parts(hparams)):
            kind.project(part)  # the parts hold the same tensors: projected in place

    def describe(self, hparams) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, part in zip((self.data_kind, *self.penalty_kinds), self._parts(hparams)):
            out.update(kind.describe(part))
        return out
