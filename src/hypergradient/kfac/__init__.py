"""Deprecated: moved to :mod:`hypergradient.optimizers.kfac` (this path works, with a
``DeprecationWarning``, until the next release; see the site's architecture page)."""

from .._deprecation import moved

moved(__name__, submodules=("_blocks", "_capture", "optimizer", "preconditioner"))
