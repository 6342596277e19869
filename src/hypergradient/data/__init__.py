"""Datasets: small embedded ones that ship with scikit-learn (the default)."""

from .embedded import Split as Split
from .embedded import load_digits_split as load_digits_split

__all__ = ["Split", "load_digits_split"]
