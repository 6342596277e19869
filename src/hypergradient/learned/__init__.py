r"""Learned optimizers: architectures, a task suite, and meta-training by the estimators.

Vocabulary of ``learned_optimization`` (Metz et al.):

* an architecture (:class:`MLPLearnedOptimizer`, :class:`HierarchicalLearnedOptimizer`) has
  ``init(generator) -> theta`` (a flat ``dict[str, Tensor]``), a pure
  ``update(theta, grads, params, state, inputs) -> (updates, state)`` and
  ``opt_fn(theta)``, a ``torch.optim`` constructor (:class:`LearnedOptim`);
* a :class:`Task` is one problem and a task family (:class:`ClassifierFamily`,
  :class:`NoisyQuadraticFamily`, :class:`FredholmFamily`) samples tasks of one shape; its
  :meth:`~AbstractTaskFamily.unrolled_system` is what the gradient estimators of
  :mod:`hypergradient.estimators` differentiate;
* :func:`meta_train` fits ``theta`` with truncated back-propagation, ES, PES or the mixed
  estimator, a truncation schedule, Adam and gradient clipping, with checkpoints;
  :func:`evaluate_learned` / :func:`tune_adam` compare it with Adam on held-out tasks;
* the protocol (:mod:`hypergradient.learned.protocol`): :func:`make_splits` declares
  meta-train / meta-validation / meta-test :class:`TaskConfig` lists before any training,
  :func:`tune_baseline` tunes Adam and SGD-momentum (constant or :func:`warmup_cosine`) on
  meta-validation, :class:`SelectionLog` / :func:`check_selections` prove nothing was
  selected on meta-test, :func:`paired_comparison` scores paired wins.

Example (a few seconds)::

    Examples:
        >>> import torch
        >>> from hypergradient import learned
        >>> lopt = learned.MLPLearnedOptimizer(hidden=8)
        >>> family = learned.NoisyQuadraticFamily(dim=4, noise=0.0)
        >>> result = learned.meta_train(
        ...     lopt, [family], num_steps=30, estimator="tbptt", num_pairs=2, meta_lr=3e-2,
        ...     schedule=learned.TruncationSchedule(horizon=10, truncation_length=5))
        >>> losses = [r["loss"] for r in result.history]
        >>> sum(losses[-5:]) < sum(losses[:5])
        True

    Reverse engineering (:mod:`hypergradient.learned.analysis`, Maheswaranathan et al. 2021):
    fixed points, linearised dynamics (effective momentum), update-vs-gradient saturation and
    effective learning-rate schedules of any component-wise optimizer, e.g. the component-wise
    :class:`GRULearnedOptimizer`.

    Self-training (:mod:`hypergradient.learned.self_training`, Metz et al. 2021):
    :func:`self_train` outer-trains a random population of :class:`LinearLearnedOptimizer`
    with the learned optimizer of its own best member, ES meta-gradients and population-based
    training.
"""

from . import analysis as analysis
from .architectures import ARCHITECTURES as ARCHITECTURES
from .architectures import TIMESCALES as TIMESCALES
from .architectures import AbstractLearnedOptimizer as AbstractLearnedOptimizer
from .architectures import HierarchicalLearnedOptimizer as HierarchicalLearnedOptimizer
from .architectures import LearnedOptim as LearnedOptim
from .architectures import MLPLearnedOptimizer as MLPLearnedOptimizer
from .architectures import StepInputs as StepInputs
from .architectures import loss_features as loss_features
from .architectures import num_meta_parameters as num_meta_parameters
from .architectures import second_moment_normalize as second_moment_normalize
from .architectures import step_inputs as step_inputs
from .meta_training import ESTIMATORS as ESTIMATORS
from .meta_training import Evaluation as Evaluation
from .meta_training import MetaTrainResult as MetaTrainResult
from .meta_training import TruncationSchedule as TruncationSchedule
from .meta_training import evaluate_adam as evaluate_adam
from .meta_training import evaluate_learned as evaluate_learned
from .meta_training import make_estimator as make_estimator
from .meta_training import meta_train as meta_train
from .meta_training import plot_history as plot_history
from .meta_training import sample_tasks as sample_tasks
from .meta_training import tune_adam as tune_adam
from .protocol import BASELINE_OPTIMIZERS as BASELINE_OPTIMIZERS
from .protocol import BASELINE_SCHEDULES as BASELINE_SCHEDULES
from .protocol import SPLITS as SPLITS
from .protocol import Baseline as Baseline
from .protocol import PairedComparison as PairedComparison
from .protocol import ProtocolSplits as ProtocolSplits
from .protocol import Scores as Scores
from .protocol import Selection as Selection
from .protocol import SelectionLog as SelectionLog
from .protocol import TaskConfig as TaskConfig
from .protocol import TuningResult as TuningResult
from .protocol import check_selections as check_selections
from .protocol import evaluate_baseline as evaluate_baseline
from .protocol import make_splits as make_splits
from .protocol import paired_comparison as paired_comparison
from .protocol import sign_test as sign_test
from .protocol import train_and_score as train_and_score
from .protocol import tune_baseline as tune_baseline
from .protocol import warmup_cosine as warmup_cosine
from .recurrent import GRULearnedOptimizer as GRULearnedOptimizer
from .self_training import OUTER_RULES as OUTER_RULES
from .self_training import LinearLearnedOptimizer as LinearLearnedOptimizer
from .self_training import PBTEvent as PBTEvent
from .self_training import SelfTrainingResult as SelfTrainingResult
from .self_training import evaluate_population as evaluate_population
from .self_training import outer_update as outer_update
from .self_training import pbt_exploit_explore as pbt_exploit_explore
from .self_training import plot_self_training as plot_self_training
from .self_training import rank_members as rank_members
from .self_training import self_train as self_train
from .self_training import self_training_families as self_training_families
from .tasks import AbstractTaskFamily as AbstractTaskFamily
from .tasks import ClassifierFamily as ClassifierFamily
from .tasks import FredholmFamily as FredholmFamily
from .tasks import InnerTrainingSystem as InnerTrainingSystem
from .tasks import NoisyQuadraticFamily as NoisyQuadraticFamily
from .tasks import Task as Task
from .tasks import clipped_log_loss as clipped_log_loss
from .tasks import digits_mlp_suite as digits_mlp_suite
from .tasks import train_task as train_task

__all__ = [
    "ARCHITECTURES",
    "BASELINE_OPTIMIZERS",
    "BASELINE_SCHEDULES",
    "ESTIMATORS",
    "OUTER_RULES",
    "SPLITS",
    "TIMESCALES",
    "AbstractLearnedOptimizer",
    "AbstractTaskFamily",
    "Baseline",
    "ClassifierFamily",
    "Evaluation",
    "FredholmFamily",
    "GRULearnedOptimizer",
    "HierarchicalLearnedOptimizer",
    "InnerTrainingSystem",
    "LearnedOptim",
    "LinearLearnedOptimizer",
    "MLPLearnedOptimizer",
    "MetaTrainResult",
    "NoisyQuadraticFamily",
    "PBTEvent",
    "PairedComparison",
    "ProtocolSplits",
    "Scores",
    "Selection",
    "SelectionLog",
    "SelfTrainingResult",
    "StepInputs",
    "Task",
    "TaskConfig",
    "TruncationSchedule",
    "TuningResult",
    "check_selections",
    "clipped_log_loss",
    "digits_mlp_suite",
    "evaluate_adam",
    "evaluate_baseline",
    "evaluate_learned",
    "evaluate_population",
    "loss_features",
    "make_estimator",
    "make_splits",
    "meta_train",
    "num_meta_parameters",
    "outer_update",
    "paired_comparison",
    "pbt_exploit_explore",
    "plot_history",
    "plot_self_training",
    "rank_members",
    "sample_tasks",
    "second_moment_normalize",
    "self_train",
    "self_training_families",
    "sign_test",
    "step_inputs",
    "train_and_score",
    "train_task",
    "tune_adam",
    "tune_baseline",
    "warmup_cosine",
]
