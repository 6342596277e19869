r"""Search spaces for black-box tuning: what a trial may choose, independent of the engine.

A search space is a mapping ``name -> parameter`` with three kinds of parameter:

* :class:`Float` - a real interval :math:`[\mathrm{low}, \mathrm{high}]`, sampled uniformly
  or, with ``log=True``, uniformly in :math:`\log` (decays, learning rates: Bischl et al.
  2023 recommend log scales for every positive scale parameter);
* :class:`Int` - integers in ``[low, high]`` (optionally on a log scale);
* :class:`Choice` - a finite set of values (hidden widths, batch sizes, solver names).

:func:`suggest` draws one configuration from an Optuna trial; :func:`grid_of` turns a space
into the finite grid that :class:`optuna.samplers.GridSampler` needs (``Choice`` and small
``Int`` ranges whole, ``Float`` as ``points`` evenly spaced, on the log scale when ``log``).

Examples:
    >>> space = {"weight_decay": Float(1e-6, 1e-1, log=True), "hidden": Choice((16, 64))}
    >>> grid = grid_of(space, points=3)
    >>> [f"{v:.0e}" for v in grid["weight_decay"]], grid["hidden"]
    (['1e-06', '3e-04', '1e-01'], [16, 64])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import HypergradientError


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Float:
    """A real hyperparameter in ``[low, high]`` (``log=True``: uniform in log, ``low > 0``).

    Examples:
        >>> from hypergradient import search
        >>> search.Float(1e-6, 1e-1, log=True)
        Float(low=1e-06, high=0.1, log=True)
        >>> search.Float(0.0, 1.0, log=True)
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: search.Float(...): a log scale needs low > 0; ...
    """

    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        if not (_is_number(self.low) and _is_number(self.high)) or self.low >= self.high:
            raise HypergradientError(
                f"search.Float(low={self.low!r}, high={self.high!r}): expected two finite "
                f"numbers with low < high."
            )
        if self.log and self.low <= 0:
            raise HypergradientError(
                f"search.Float(low={self.low!r}, log=True): a log scale needs low > 0; use a "
                f"small positive lower end (e.g. 1e-8) or log=False."
            )


@dataclass(frozen=True)
class Int:
    """An integer hyperparameter in ``[low, high]`` (``log=True``: uniform in log).

    Examples:
        >>> from hypergradient import search
        >>> space = {"layers": search.Int(1, 3), "hidden": search.Int(8, 512, log=True)}
        >>> search.grid_of(space, points=4)  # small ranges whole, large ones spread in log
        {'layers': [1, 2, 3], 'hidden': [8, 32, 128, 512]}
        >>> search.Int(1, 2.5)
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: search.Int(low=1, high=2.5): expected two integers ...
    """

    low: int
    high: int
    log: bool = False

    def __post_init__(self):
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high))
        if not ints or self.low > self.high:
            raise HypergradientError(
                f"search.Int(low={self.low!r}, high={self.high!r}): expected two integers "
                f"with low <= high."
            )
        if self.log and self.low < 1:
            raise HypergradientError(
                f"search.Int(low={self.low!r}, log=True): a log scale needs low >= 1."
            )


@dataclass(frozen=True)
class Choice:
    """One of finitely many values (numbers, strings, booleans or None).

    Examples:
        >>> from hypergradient import search
        >>> search.Choice([16, 64, 256]).choices  # any sequence, stored as a tuple
        (16, 64, 256)
        >>> search.Choice(("relu", "relu"))
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: search.Choice(...): values repeat.
    """

    choices: tuple

    def __post_init__(self):
        choices = tuple(self.choices)
        object.__setattr__(self, "choices", choices)
        if not choices:
            raise HypergradientError("search.Choice(choices=()): give at least one value.")
        for value in choices:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise HypergradientError(
                    f"search.Choice: the value {value!r} ({type(value).__name__}) cannot be "
                    f"stored by Optuna; use numbers, strings, booleans or None (and map them "
                    f"to objects inside the objective)."
                )
        if len(set(choices)) != len(choices):
            raise HypergradientError(f"search.Choice(choices={choices!r}): values repeat.")


Param = Float | Int | Choice
SearchSpace = Mapping[str, Param]


def check_space(space: object, where: str = "search", *, allow_empty: bool = False) -> dict:
    """``space`` as a dict, or a :class:`~hypergradient.HypergradientError` naming the entry
    (``allow_empty``: ``{}`` is accepted, a trial then chooses nothing)."""
    if not isinstance(space, Mapping) or not (space or allow_empty):
        raise HypergradientError(
            f"{where}: the search space must be a non-empty dict name -> search.Float / "
            f"search.Int / search.Choice, got {space!r}."
        )
    for name, param in space.items():
        if not isinstance(name, str) or not isinstance(param, (Float, Int, Choice)):
            raise HypergradientError(
                f"{where}: search space entry {name!r}: {param!r} is not a search.Float, "
                f"search.Int or search.Choice."
            )
    return dict(space)


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """One configuration drawn from ``space`` by an Optuna ``trial`` (in the space's order).

    Examples:
        >>> import optuna
        >>> from hypergradient import search
        >>> space = {"lr": search.Float(1e-4, 1.0, log=True), "hidden": search.Choice((16, 64))}
        >>> trial = optuna.trial.FixedTrial({"lr": 0.01, "hidden": 64})  # a trial with set values
        >>> search.suggest(trial, space)
        {'lr': 0.01, 'hidden': 64}
    """
    out: dict[str, Any] = {}
    for name, param in check_space(space, allow_empty=True).items():
        if isinstance(param, Float):
            out[name] = trial.suggest_float(name, param.low, param.high, log=param.log)
        elif isinstance(param, Int):
            out[name] = trial.suggest_int(name, param.low, param.high, log=param.log)
        else:
            out[name] = trial.suggest_categorical(name, list(param.choices))
    return out


def grid_of(space: SearchSpace, points: int = 5) -> dict[str, list]:
    """The finite grid of ``space`` for a grid search.

    ``Choice``: its values; ``Int``: every integer when there are at most ``points`` of them,
    else ``points`` values spread evenly (in log when ``log``), rounded and deduplicated;
    ``Float``: ``points`` values from ``low`` to ``high`` inclusive (geometric when ``log``).
    The grid has ``prod(len(axis))`` cells.

    Examples:
        >>> from hypergradient import search
        >>> space = {
        ...     "lr": search.Float(1e-3, 1e-1, log=True),
        ...     "layers": search.Int(1, 2),
        ...     "act": search.Choice(("relu", "tanh")),
        ... }
        >>> grid = search.grid_of(space, points=3)
        >>> [round(v, 6) for v in grid["lr"]], grid["layers"], grid["act"]
        ([0.001, 0.01, 0.1], [1, 2], ['relu', 'tanh'])
    """
    if not isinstance(points, int) or isinstance(points, bool) or points < 2:
        raise HypergradientError(
            f"search.grid_of(points={points!r}): expected an integer >= 2 (grid values per "
            f"continuous hyperparameter)."
        )
    grid: dict[str, list] = {}
    for name, param in check_space(space, "search.grid_of").items():
        if isinstance(param, Choice):
            grid[name] = list(param.choices)
            continue
        if isinstance(param, Int) and param.high - param.low + 1 <= points:
            grid[name] = list(range(param.low, param.high + 1))
            continue
        lo, hi = param.low, param.high
        if param.log:
            lo, hi = math.log(lo), math.log(hi)
        values = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
        values = [math.exp(v) for v in values] if param.log else values
        if isinstance(param, Int):
            values = sorted({min(param.high, max(param.low, round(v))) for v in values})
        else:  # exact end points (exp(log(x)) may differ from x in the last bit)
            values[0], values[-1] = param.low, param.high
        grid[name] = values
    return grid
