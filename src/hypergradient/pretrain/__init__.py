"""Meta-learning to improve pre-training (Raghu, Lorraine, Kornblith, McDermott, Duvenaud 2021).

Pre-training hyperparameters (per-task loss weights of multitask pre-training, an
augmentation network's weights, ...) are tuned on the validation loss *after fine-tuning*:

* :func:`pretrain_hypergrad` - the hypergradient: unrolled differentiation through
  fine-tuning gives :math:`dE/d\\theta` at the pre-trained weights, implicit differentiation
  through pre-training turns it into :math:`dE/d\\lambda`;
* :class:`MetaPretrainer` - Raghu et al.'s Algorithm 1: one warm-started pre-training run
  with a hyper-step every ``period`` steps;
* :func:`synthetic_multitask`, :class:`MultitaskMLP`, :func:`linear_probe`,
  :func:`fine_tune`, :func:`downstream_scores` - a multitask problem in which some
  pre-training tasks share the downstream task's structure and some are label noise
  (the ``hypergradient meta-pretrain`` recipe).
"""

from .hypergrad import PretrainHypergrad as PretrainHypergrad
from .hypergrad import pretrain_hypergrad as pretrain_hypergrad
from .hypergrad import used_by_finetuning as used_by_finetuning
from .loop import MetaPretrainer as MetaPretrainer
from .synthetic import MultitaskData as MultitaskData
from .synthetic import MultitaskMLP as MultitaskMLP
from .synthetic import accuracy as accuracy
from .synthetic import downstream_scores as downstream_scores
from .synthetic import fine_tune as fine_tune
from .synthetic import linear_probe as linear_probe
from .synthetic import synthetic_multitask as synthetic_multitask

__all__ = [
    "MetaPretrainer",
    "MultitaskData",
    "MultitaskMLP",
    "PretrainHypergrad",
    "accuracy",
    "downstream_scores",
    "fine_tune",
    "linear_probe",
    "pretrain_hypergrad",
    "synthetic_multitask",
    "used_by_finetuning",
]
