"""The recipe interface and registry behind ``hypergradient <recipe>``.

A recipe is a complete experiment (data, model, hyperparameter kind, bilevel training,
evaluation) with a typed dataclass config.  The command line builds the config (defaults,
``--config file.toml``, ``--set key=value``), makes the run folder, writes ``config.toml``
there and calls :meth:`AbstractRecipe.run`, which must:

* show progress (a rich progress bar) when ``progress`` is true;
* checkpoint at least once per hyper-step into ``run_dir`` and, when ``resume`` is true,
  continue from the last checkpoint (losing at most one hyper-step);
* write ``results.json`` and at least one PNG plot into ``run_dir``;
* return the results dict (also printed as a table by the recipe).
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console

_RECIPES: dict[str, type[AbstractRecipe]] = {}


class AbstractRecipe(abc.ABC):
    """One ``hypergradient <name>`` sub-command; see the module docstring for the contract."""

    name: ClassVar[str]
    help: ClassVar[str]
    config_cls: ClassVar[type]

    @abc.abstractmethod
    def run(
        self, config: Any, run_dir: Path, *, resume: bool, progress: bool, console: Console
    ) -> dict[str, Any]:
        """Run the experiment described by ``config`` in ``run_dir``; see the module docstring."""


def register_recipe(cls: type[AbstractRecipe]) -> type[AbstractRecipe]:
    _RECIPES[cls.name] = cls
    return cls


def available_recipes() -> dict[str, type[AbstractRecipe]]:
    return dict(sorted(_RECIPES.items()))


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    path = Path(run_dir) / "results.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    return path
