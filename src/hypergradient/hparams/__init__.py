"""Hyperparameter kinds the bilevel training loop knows how to differentiate.

Each kind (:class:`AbstractHyperparameter`) makes the hyperparameter tensors from the model's
parameters and defines the training loss they enter; any hypergradient method then
differentiates that loss.

Examples:
    >>> import torch
    >>> import hypergradient as hg
    >>> params = dict(torch.nn.Linear(3, 2).named_parameters())
    >>> kind = hg.hparams.WeightDecay("per_tensor")  # one decay per parameter tensor
    >>> sorted(kind.init(params))
    ['log_wd.bias', 'log_wd.weight']
    >>> isinstance(kind, hg.hparams.AbstractHyperparameter)
    True
"""

from ._base import AbstractHyperparameter as AbstractHyperparameter
from ._base import SplitTrainingLoss as SplitTrainingLoss
from ._base import per_example_loss as per_example_loss
from .augment import AugmentationNet as AugmentationNet
from .combined import Combined as Combined
from .distill import DistilledData as DistilledData
from .distill import evaluate_distilled as evaluate_distilled
from .distill import fresh_params as fresh_params
from .distill import retrain_on_distilled as retrain_on_distilled
from .example_weights import ExampleWeights as ExampleWeights
from .example_weights import IndexedBatches as IndexedBatches
from .example_weights import IndexedDataset as IndexedDataset
from .example_weights import indexed_loader as indexed_loader
from .reweight_net import LossReweightNet as LossReweightNet
from .task_weights import TaskWeights as TaskWeights
from .weight_decay import WeightDecay as WeightDecay
from .weight_decay import max_stable_decay as max_stable_decay

__all__ = [
    "AbstractHyperparameter",
    "AugmentationNet",
    "Combined",
    "DistilledData",
    "ExampleWeights",
    "IndexedBatches",
    "IndexedDataset",
    "LossReweightNet",
    "SplitTrainingLoss",
    "TaskWeights",
    "WeightDecay",
    "evaluate_distilled",
    "fresh_params",
    "indexed_loader",
    "max_stable_decay",
    "per_example_loss",
    "retrain_on_distilled",
]
