"""Hyperparameter kinds the bilevel training loop knows how to differentiate."""

from ._base import AbstractHyperparameter as AbstractHyperparameter
from ._base import per_example_loss as per_example_loss
from .weight_decay import WeightDecay as WeightDecay

__all__ = ["AbstractHyperparameter", "WeightDecay", "per_example_loss"]
