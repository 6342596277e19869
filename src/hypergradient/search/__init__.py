"""Black-box hyperparameter search beside hypergradients (Optuna as the engine).

Hypergradients reach continuous hyperparameters that enter the training loss smoothly
(decays, learning rates, thousands of them at once); they cannot reach a hidden width or a
batch size.  This package covers the rest, and measures both on one compute axis:

* :mod:`~hypergradient.search.study` - Optuna studies in SQLite under the run folder (or
  any RDB URL), samplers ``random`` / ``grid`` / ``tpe`` / ``cmaes``, Hyperband and
  successive-halving pruning, and a worker loop whose workers may start together on a new
  study and survive SIGKILLed workers (a heartbeat and retry by default);
* :mod:`~hypergradient.search.space` - search spaces (:class:`Float`, :class:`Int`,
  :class:`Choice`);
* :mod:`~hypergradient.search.compute` - compute in training-step equivalents
  (a hypergradient counts its backward passes);
* :mod:`~hypergradient.search.objectives` - objectives for the ``weight-decay`` recipe's
  MLP (width, batch size, decay, learning rate; or decays by hypergradient inside trials);
* :mod:`~hypergradient.search.resampling` - nested vs non-nested cross-validation;
* :mod:`~hypergradient.search.racing` - F-race and successive halving over folds or seeds;
* :mod:`~hypergradient.search.warmstart` - warm-starting Bayesian optimisation from similar
  datasets (Kim et al. 2017): learned dataset meta-features, nearest tasks' best
  configurations enqueued as a study's first trials; classical pymfe meta-features as the
  baseline (``pip install "hypergradient[meta-features]"``).

Optuna is optional: ``pip install "hypergradient[hpo]"``.  Only the functions that need it
import it; resampling and racing do not.

Examples:
    >>> import math
    >>> import optuna
    >>> from hypergradient import search
    >>> space = {"lr": search.Float(1e-3, 1e-1, log=True), "hidden": search.Choice((16, 64))}
    >>> study = optuna.create_study(sampler=search.make_sampler("grid", space=space, grid_points=3))
    >>> def objective(trial):  # stands in for training: best at lr = 0.01, hidden = 64
    ...     p = search.suggest(trial, space)
    ...     return abs(math.log10(p["lr"]) + 2) + (p["hidden"] == 16)
    >>> trials = search.optimize(study, objective, n_trials=6)  # the whole 3 x 2 grid
    >>> len(trials), study.best_params["hidden"], round(study.best_params["lr"], 6)
    (6, 64, 0.01)
"""

from .compute import ComputeMeter as ComputeMeter
from .compute import StepUnit as StepUnit
from .compute import hypergradient_cost as hypergradient_cost
from .objectives import best_at as best_at
from .objectives import compute_curve as compute_curve
from .objectives import mlp_weights as mlp_weights
from .objectives import reference_unit as reference_unit
from .objectives import weight_decay_objective as weight_decay_objective
from .racing import RaceResult as RaceResult
from .racing import race as race
from .resampling import Fold as Fold
from .resampling import NestedResult as NestedResult
from .resampling import OuterFold as OuterFold
from .resampling import TuneResult as TuneResult
from .resampling import grid_tuner as grid_tuner
from .resampling import kfold as kfold
from .resampling import nested_cv as nested_cv
from .resampling import non_nested_cv as non_nested_cv
from .resampling import optuna_tuner as optuna_tuner
from .resampling import race_tuner as race_tuner
from .space import Choice as Choice
from .space import Float as Float
from .space import Int as Int
from .space import grid_of as grid_of
from .space import suggest as suggest
from .study import create_study as create_study
from .study import default_storage as default_storage
from .study import fail_running_trials as fail_running_trials
from .study import finished_trials as finished_trials
from .study import make_pruner as make_pruner
from .study import make_sampler as make_sampler
from .study import make_storage as make_storage
from .study import optimize as optimize
from .warmstart import MetaDataset as MetaDataset
from .warmstart import MetaFeatureNet as MetaFeatureNet
from .warmstart import SurfaceGrid as SurfaceGrid
from .warmstart import WarmStarter as WarmStarter
from .warmstart import build_meta_dataset as build_meta_dataset
from .warmstart import classical_meta_features as classical_meta_features
from .warmstart import classical_warm_starter as classical_warm_starter
from .warmstart import enqueue_warm_start as enqueue_warm_start
from .warmstart import gp_sampler as gp_sampler
from .warmstart import instance_features as instance_features
from .warmstart import surface_rank_correlation as surface_rank_correlation
from .warmstart import surface_search as surface_search
from .warmstart import svm_surface as svm_surface
from .warmstart import train_meta_features as train_meta_features
from .warmstart import warm_start_configs as warm_start_configs

__all__ = [
    "Choice",
    "ComputeMeter",
    "Float",
    "Fold",
    "Int",
    "MetaDataset",
    "MetaFeatureNet",
    "NestedResult",
    "OuterFold",
    "RaceResult",
    "StepUnit",
    "SurfaceGrid",
    "TuneResult",
    "WarmStarter",
    "best_at",
    "build_meta_dataset",
    "classical_meta_features",
    "classical_warm_starter",
    "compute_curve",
    "create_study",
    "default_storage",
    "enqueue_warm_start",
    "fail_running_trials",
    "finished_trials",
    "gp_sampler",
    "grid_of",
    "grid_tuner",
    "hypergradient_cost",
    "instance_features",
    "kfold",
    "make_pruner",
    "make_sampler",
    "make_storage",
    "mlp_weights",
    "nested_cv",
    "non_nested_cv",
    "optimize",
    "optuna_tuner",
    "race",
    "race_tuner",
    "reference_unit",
    "suggest",
    "surface_rank_correlation",
    "surface_search",
    "svm_surface",
    "train_meta_features",
    "warm_start_configs",
]
