"""Hypergradient methods: implicit (IFT) and unrolled (reverse, forward, truncated)."""

from .implicit import ConvergenceWarning as ConvergenceWarning
from .implicit import FixedPoint as FixedPoint
from .implicit import implicit_hypergrad as implicit_hypergrad
from .unrolled import unrolled_hypergrad as unrolled_hypergrad

__all__ = ["ConvergenceWarning", "FixedPoint", "implicit_hypergrad", "unrolled_hypergrad"]
