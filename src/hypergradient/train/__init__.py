"""The training-loop level: bilevel training around a user's model, data and optimizer."""

from .loop import BatchStream as BatchStream
from .loop import BilevelTrainer as BilevelTrainer
from .real_time import RealTimeTrainer as RealTimeTrainer

__all__ = ["BatchStream", "BilevelTrainer", "RealTimeTrainer"]
