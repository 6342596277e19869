"""Hypergradient methods: implicit (IFT); unrolled (reverse, forward, truncated, reversible)."""

from .evograd import EvoGrad as EvoGrad
from .evograd import evograd_hypergrad as evograd_hypergrad
from .implicit import ConvergenceWarning as ConvergenceWarning
from .implicit import FixedPoint as FixedPoint
from .implicit import NonStationaryWarning as NonStationaryWarning
from .implicit import implicit_hypergrad as implicit_hypergrad
from .methods import AbstractHypergradientMethod as AbstractHypergradientMethod
from .methods import AmortizationResetWarning as AmortizationResetWarning
from .methods import AmortizedImplicit as AmortizedImplicit
from .methods import Implicit as Implicit
from .methods import Unrolled as Unrolled
from .methods import get_method as get_method
from .methods import pedregosa_tolerance as pedregosa_tolerance
from .real_time import RealTime as RealTime
from .real_time import RealTimeState as RealTimeState
from .reversible import ReversibleMemoryWarning as ReversibleMemoryWarning
from .reversible import ReversibleResult as ReversibleResult
from .reversible import SeededBatches as SeededBatches
from .reversible import reversible_hypergrad as reversible_hypergrad
from .unrolled import unrolled_hypergrad as unrolled_hypergrad

__all__ = [
    "AbstractHypergradientMethod",
    "AmortizationResetWarning",
    "AmortizedImplicit",
    "ConvergenceWarning",
    "NonStationaryWarning",
    "EvoGrad",
    "FixedPoint",
    "Implicit",
    "Unrolled",
    "get_method",
    "pedregosa_tolerance",
    "RealTime",
    "RealTimeState",
    "ReversibleMemoryWarning",
    "ReversibleResult",
    "SeededBatches",
    "evograd_hypergrad",
    "implicit_hypergrad",
    "reversible_hypergrad",
    "unrolled_hypergrad",
]
