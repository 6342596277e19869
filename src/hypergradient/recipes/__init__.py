"""Complete experiments behind ``hypergradient <recipe>``: importing this package registers them.

Each recipe module registers itself with :func:`register_recipe` on import.  The sibling
recipes are imported one by one and a recipe whose module does not exist (yet) is skipped, so
the command line keeps working with whichever recipes are present; any other import error
(a bug inside a recipe module, a missing dependency of it) still surfaces.
"""

from __future__ import annotations

import importlib

from . import weight_decay as weight_decay
from ._base import AbstractRecipe as AbstractRecipe
from ._base import available_recipes as available_recipes
from ._base import register_recipe as register_recipe
from ._base import write_results as write_results
from ._config import build_config as build_config

for _name in (
    "distill", "hyperclean", "reweight", "augment", "lr_schedule", "towers", "hpo", "maml",
    "meta_pretrain", "learned_opt", "noisy_labels", "hidden_units", "analytic_continuation",
):  # fmt: skip
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"{__name__}.{_name}":  # the module exists but lacks a dependency
            raise
del _name

__all__ = ["AbstractRecipe", "available_recipes", "build_config", "register_recipe"]
