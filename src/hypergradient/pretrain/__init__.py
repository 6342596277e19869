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

Examples:
    The hypergradient of the validation loss after fine-tuning a fresh head w.r.t. the
    pre-training task weights (softmax-parametrized: it moves weight between tasks, so its
    entries sum to zero):

    >>> import torch
    >>> import torch.nn.functional as F
    >>> import hypergradient as hg
    >>> data = hg.pretrain.synthetic_multitask(num_useful=2, num_noise=2, dim=5, n_test=10)
    >>> model = hg.pretrain.MultitaskMLP(dim=5, hidden=3, num_tasks=4, num_classes=3)
    >>> kind, theta = hg.hparams.TaskWeights(4), model.init(seed=0)
    >>> pt_loss = model.pretrain_loss(kind)
    >>> g = hg.pretrain.pretrain_hypergrad(
    ...     lambda th, h: pt_loss(th, h, data.x_pretrain, data.y_pretrain),
    ...     lambda head, th: F.cross_entropy(model.logits(head, th, data.x_train), data.y_train),
    ...     lambda head, th: F.cross_entropy(model.logits(head, th, data.x_val), data.y_val),
    ...     theta, kind.init(theta), model.fresh_head(), finetune_steps=2,
    ...     solver="neumann", max_steps=1, alpha=0.1, stationarity_tol=None)
    >>> g["task_logits"].shape, abs(float(g["task_logits"].sum())) < 1e-12
    (torch.Size([4]), True)
"""

from .hypergrad import CurvatureDamped as CurvatureDamped
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
    "CurvatureDamped",
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
