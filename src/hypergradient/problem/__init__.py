"""Turning ``nn.Module``s into the pure functions the functional core differentiates."""

from ._functional import as_function as as_function
from ._functional import params_of as params_of

__all__ = ["as_function", "params_of"]
