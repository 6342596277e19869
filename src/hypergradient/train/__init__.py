"""The training-loop level: bilevel training around a user's model, data and optimizer."""

from .loop import BatchStream as BatchStream
from .loop import BilevelTrainer as BilevelTrainer

__all__ = ["BatchStream", "BilevelTrainer"]
