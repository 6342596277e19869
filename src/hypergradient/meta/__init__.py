"""Gradient-based meta-learning: few-shot episodes, MAML, first-order MAML, iMAML and
Franceschi et al.'s hyper-representation, built on the core hypergradient machinery.

* :mod:`.episodes` -- task families (N-way K-shot Omniglot episodes with held-out alphabets
  and the 20 official one-shot runs; sinusoid and linear regression) and the
  nearest-neighbour baseline;
* :mod:`.models` -- networks as pure functions of a parameter dict (:class:`MLP`,
  :class:`ConvNet`, any ``nn.Module`` via :class:`ModuleModel`);
* :class:`MAML` (second order, or ``first_order=True``), :class:`IMAML` (proximal inner
  problem, conjugate gradients on :math:`I + H/\\lambda`) and :class:`HyperRepresentation`
  (shared layers as hyperparameters, per-episode linear heads), all
  :class:`AbstractMetaLearner` s: ``adapt``, ``predict``, ``meta_gradient``,
  ``batch_meta_gradient``, ``evaluate``;
* :class:`SavedTensorMeter` -- exact peak bytes held by autograd graphs (how the memory of
  MAML grows with the inner steps while iMAML's does not).

Example (one meta-step of MAML on sinusoid regression)::

    Examples:
        >>> import torch
        >>> from hypergradient import meta
        >>> net = meta.MLP(1, (40, 40), out_features=1)
        >>> theta = net.init(torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> learner = meta.MAML(net, inner_steps=1, inner_lr=0.01)
        >>> gen = torch.Generator().manual_seed(1)
        >>> batch = meta.SinusoidTasks(dtype=torch.float64).sample_batch(4, gen)
        >>> g = learner.batch_meta_gradient(theta, batch)
        >>> theta = {k: v - 0.001 * g.grad[k] for k, v in theta.items()}
        >>> learner.evaluate(theta, batch)["accuracy"] is None  # regression: no accuracy
        True
"""

from ._base import AbstractMetaLearner as AbstractMetaLearner
from ._base import MetaGradient as MetaGradient
from ._base import default_loss as default_loss
from .episodes import DEFAULT_HELDOUT_ALPHABETS as DEFAULT_HELDOUT_ALPHABETS
from .episodes import AbstractTaskFamily as AbstractTaskFamily
from .episodes import ClassificationTasks as ClassificationTasks
from .episodes import Episode as Episode
from .episodes import LinearTasks as LinearTasks
from .episodes import SinusoidTasks as SinusoidTasks
from .episodes import nearest_neighbour_predict as nearest_neighbour_predict
from .episodes import omniglot_one_shot_runs as omniglot_one_shot_runs
from .episodes import omniglot_tasks as omniglot_tasks
from .episodes import with_rotations as with_rotations
from .hyperrep import HyperRepresentation as HyperRepresentation
from .imaml import IMAML as IMAML
from .maml import MAML as MAML
from .memory import SavedTensorMeter as SavedTensorMeter
from .models import MLP as MLP
from .models import AbstractModel as AbstractModel
from .models import ConvNet as ConvNet
from .models import ModuleModel as ModuleModel

__all__ = [
    "DEFAULT_HELDOUT_ALPHABETS",
    "IMAML",
    "MAML",
    "MLP",
    "AbstractMetaLearner",
    "AbstractModel",
    "AbstractTaskFamily",
    "ClassificationTasks",
    "ConvNet",
    "Episode",
    "HyperRepresentation",
    "LinearTasks",
    "MetaGradient",
    "ModuleModel",
    "SavedTensorMeter",
    "SinusoidTasks",
    "default_loss",
    "nearest_neighbour_predict",
    "omniglot_one_shot_runs",
    "omniglot_tasks",
    "with_rotations",
]
