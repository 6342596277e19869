"""hypergradient: fit hyperparameters by gradient descent, with hypergradients proven exact.

The functional core differentiates a validation loss ``outer_loss(params, hparams)`` with
respect to ``hparams`` through the solution ``params`` of a training problem
``inner_loss(params, hparams)``:

* :func:`implicit_hypergrad` - implicit function theorem at an inner optimum, with a
  pluggable linear solver (exact, CG, Neumann, identity, MINRES, GMRES);
* :func:`unrolled_hypergrad` - through the training run itself (reverse mode, forward mode,
  truncated, and exact reversal: :func:`reversible_hypergrad`).

Sub-packages: :mod:`hypergradient.linalg` (linear solvers, curvature operators),
:mod:`hypergradient.diffopt` (differentiable optimizers), :mod:`hypergradient.testing`
(problems with exact hypergradients).
"""

from . import continuation as continuation
from . import data as data
from . import deq as deq
from . import diffopt as diffopt
from . import distributed as distributed
from . import estimators as estimators
from . import hparams as hparams
from . import label_noise as label_noise
from . import learned as learned
from . import linalg as linalg
from . import meta as meta
from . import optimizers as optimizers
from . import pretrain as pretrain
from . import search as search
from . import sigmoid_units as sigmoid_units
from . import stochastic as stochastic
from . import testing as testing
from ._errors import ConvergenceError as ConvergenceError
from ._errors import HypergradientError as HypergradientError
from ._results import Result as Result
from ._results import Solution as Solution
from ._results import SolveStats as SolveStats
from .hypergrad import AmortizationResetWarning as AmortizationResetWarning
from .hypergrad import AmortizedImplicit as AmortizedImplicit
from .hypergrad import ConvergenceWarning as ConvergenceWarning
from .hypergrad import EvoGrad as EvoGrad
from .hypergrad import FixedPoint as FixedPoint
from .hypergrad import Implicit as Implicit
from .hypergrad import NonStationaryWarning as NonStationaryWarning
from .hypergrad import ReversibleMemoryWarning as ReversibleMemoryWarning
from .hypergrad import Unrolled as Unrolled
from .hypergrad import evograd_hypergrad as evograd_hypergrad
from .hypergrad import implicit_hypergrad as implicit_hypergrad
from .hypergrad import reversible_hypergrad as reversible_hypergrad
from .hypergrad import unrolled_hypergrad as unrolled_hypergrad
from .linalg.operators import GaussNewtonLoss as GaussNewtonLoss
from .problem import as_function as as_function
from .problem import params_of as params_of
from .train import BilevelTrainer as BilevelTrainer

__version__ = "0.1.0"


def __getattr__(name: str):
    """``hg.optim``, ``hg.kfac``, ``hg.towers``: the old paths of moved packages, imported on
    first use with a :class:`DeprecationWarning` naming the new one (``_deprecation.py``)."""
    from ._deprecation import MOVED

    if name in MOVED:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AmortizationResetWarning",
    "AmortizedImplicit",
    "BilevelTrainer",
    "ConvergenceError",
    "ConvergenceWarning",
    "EvoGrad",
    "FixedPoint",
    "GaussNewtonLoss",
    "HypergradientError",
    "Implicit",
    "NonStationaryWarning",
    "ReversibleMemoryWarning",
    "Result",
    "Solution",
    "SolveStats",
    "Unrolled",
    "as_function",
    "continuation",
    "data",
    "deq",
    "diffopt",
    "distributed",
    "estimators",
    "evograd_hypergrad",
    "hparams",
    "implicit_hypergrad",
    "label_noise",
    "learned",
    "linalg",
    "meta",
    "optimizers",
    "params_of",
    "pretrain",
    "reversible_hypergrad",
    "search",
    "sigmoid_units",
    "stochastic",
    "testing",
    "unrolled_hypergrad",
]
