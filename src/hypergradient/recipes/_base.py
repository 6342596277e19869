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

The helpers below are what every recipe needs for that: the progress bar, atomic checkpoint
and JSON writes, the resume check, the thread count, the plotting backend and the machine
description that goes into ``results.json``.
"""

from __future__ import annotations

import abc
import json
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from .._errors import HypergradientError
from .._io import load_checkpoint as load_checkpoint  # re-exported for the recipes
from .._io import save_atomic as save_atomic
from .._io import write_json_atomic
from .._threads import torch_threads as torch_threads  # re-exported for the recipes

_RECIPES: dict[str, type[AbstractRecipe]] = {}


class AbstractRecipe(abc.ABC):
    """One ``hypergradient <name>`` sub-command; see the module docstring for the contract.

    A subclass sets ``name`` (the sub-command), ``help`` (its one-line description) and
    ``config_cls`` (its dataclass config) and implements :meth:`run`.

    Examples:
        >>> import dataclasses, tempfile
        >>> from pathlib import Path
        >>> from rich.console import Console
        >>> from hypergradient.recipes import AbstractRecipe
        >>> @dataclasses.dataclass
        ... class SquareConfig:
        ...     x: float = 3.0
        >>> class Square(AbstractRecipe):
        ...     name, help, config_cls = "square", "square a number", SquareConfig
        ...     def run(self, config, run_dir, *, resume, progress, console):
        ...         return {"x_squared": config.x**2}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Square().run(SquareConfig(), Path(tmp), resume=False, progress=False,
        ...                  console=Console())
        {'x_squared': 9.0}
    """

    name: ClassVar[str]
    help: ClassVar[str]
    config_cls: ClassVar[type]

    @abc.abstractmethod
    def run(
        self, config: Any, run_dir: Path, *, resume: bool, progress: bool, console: Console
    ) -> dict[str, Any]:
        """Run the experiment described by ``config`` in ``run_dir``; see the module docstring."""


class ThreadedRecipe(AbstractRecipe):
    """A recipe whose config has ``validate()`` and ``threads``: :meth:`run` validates the
    config, sets torch's intra-op threads for the run (restored after; tiny ops run many times
    faster on one thread of a busy machine) and calls :meth:`_run` with ``run_dir`` as a Path.
    """

    def run(
        self, config: Any, run_dir: Path, *, resume: bool, progress: bool, console: Console
    ) -> dict[str, Any]:
        config.validate()
        with torch_threads(config.threads):
            return self._run(
                config, Path(run_dir), resume=resume, progress=progress, console=console
            )

    @abc.abstractmethod
    def _run(
        self, config: Any, run_dir: Path, *, resume: bool, progress: bool, console: Console
    ) -> dict[str, Any]:
        """The experiment itself, with a validated config and the threads set."""


def register_recipe(cls: type[AbstractRecipe]) -> type[AbstractRecipe]:
    """Class decorator: make ``cls`` the sub-command ``hypergradient <cls.name>``.

    Returns ``cls`` unchanged; a later class with the same ``name`` replaces it.

    Examples:
        >>> import dataclasses
        >>> from hypergradient.recipes import AbstractRecipe, available_recipes, register_recipe
        >>> @register_recipe
        ... class Echo(AbstractRecipe):
        ...     name, help = "echo", "return the config as the results"
        ...     config_cls = dataclasses.make_dataclass("EchoConfig", [("text", str, "hi")])
        ...     def run(self, config, run_dir, *, resume, progress, console):
        ...         return dataclasses.asdict(config)
        >>> available_recipes()["echo"] is Echo
        True
        >>> import hypergradient.recipes._base as base
        >>> del base._RECIPES["echo"]  # undo (for this example only)
    """
    _RECIPES[cls.name] = cls
    return cls


def available_recipes() -> dict[str, type[AbstractRecipe]]:
    """The registered recipes, ``{name: recipe class}`` sorted by name (importing
    :mod:`hypergradient.recipes` registers the built-in ones).

    Examples:
        >>> from hypergradient.recipes import available_recipes
        >>> recipes = available_recipes()
        >>> recipes["weight-decay"].__name__, recipes["weight-decay"].config_cls.__name__
        ('WeightDecayRecipe', 'WeightDecayConfig')
        >>> list(recipes) == sorted(recipes)
        True
    """
    return dict(sorted(_RECIPES.items()))


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    path = Path(run_dir) / "results.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    return path


# ----------------------------------------------------------------------------- run helpers


def machine() -> dict[str, Any]:
    """Where the numbers were measured, for ``results.json``: platform, torch, threads."""
    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def progress_bar(console: Console, progress: bool) -> Progress:
    """The recipes' rich progress bar: description, bar, ``done/total``, elapsed time
    (``progress`` false: nothing is shown, the tasks are still counted)."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, imported on first use (only the
    plots need matplotlib, and it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- checkpoints


class RunCache:
    """Finished runs of a study, one JSON file in the run folder (``runs.json``), so that
    ``--resume`` recomputes only what is missing.

    Runs are kept under string keys with the ``signature`` (the options that change a run);
    a cache written under another signature is ignored, and a fresh (not resumed) study
    deletes it, so runs of an earlier study never mix in. Every :meth:`put` rewrites the file
    atomically: a killed study loses at most the run in progress.
    """

    def __init__(
        self,
        run_dir: Path,
        signature: dict[str, Any],
        *,
        resume: bool,
        console: Console | None = None,
        name: str = "runs.json",
    ):
        self.path = Path(run_dir) / name
        self.signature = signature
        self.runs: dict[str, Any] = {}
        if not resume:
            self.path.unlink(missing_ok=True)
        elif not self.path.is_file():
            if console is not None:
                console.print(f"no {name} in {run_dir}: starting from the beginning")
        else:
            saved = json.loads(self.path.read_text())
            if saved.get("signature") == json.loads(json.dumps(signature, default=float)):
                self.runs = dict(saved["runs"])

    def __contains__(self, key: str) -> bool:
        return key in self.runs

    def __getitem__(self, key: str) -> Any:
        return self.runs[key]

    def put(self, key: str, run: Any) -> Any:
        """Keep ``run`` under ``key`` and rewrite the file; returns ``run``."""
        self.runs[key] = run
        write_json_atomic(self.path, {"signature": self.signature, "runs": self.runs})
        return run


def check_resumable(meta_path: Path, meta: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint made with other options: ``meta`` (this run's) against
    those saved in ``meta_path`` (nothing to compare when that file does not exist)."""
    if not meta_path.is_file():
        return
    saved = json.loads(meta_path.read_text())
    changed = [k for k in meta if saved.get(k) != meta[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {meta[k]!r}" for k in changed)
        raise HypergradientError(
            f"--resume: the checkpoint in {str(meta_path.parent)!r} was made with other options "
            f"({diffs}); resume with the run folder's config.toml (--config), or start over "
            f"without --resume or in a new --out folder."
        )


def resume_or_start_over(
    folder: Path, meta: dict[str, Any], *, resume: bool, stale: Iterable[str] = ()
) -> bool:
    """Prepare ``folder`` for a run that checkpoints into ``folder/checkpoint.pt``.

    Resuming (``resume`` and the checkpoint exists): :func:`check_resumable` against the
    options saved next to it.  Starting over: the checkpoint and the ``stale`` files of an
    earlier run in this folder are deleted, so that nothing of it mixes in.  Either way
    ``meta`` (the options a resume must agree with) is saved in
    ``folder/checkpoint_options.json``.  Returns whether the run resumes.
    """
    checkpoint = folder / "checkpoint.pt"
    meta_path = folder / "checkpoint_options.json"
    resuming = resume and checkpoint.is_file()
    if resuming:
        check_resumable(meta_path, meta)
    else:
        for name in ("checkpoint.pt", *stale):
            (folder / name).unlink(missing_ok=True)
    meta_path.write_text(json.dumps(meta))
    return resuming
