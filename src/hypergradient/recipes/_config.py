"""Typed dataclass configs for recipes: TOML files, ``--set key=value`` overrides, help text.

Every recipe declares its options as a dataclass whose fields carry a help string
(``field(default=..., metadata={"help": "..."})``) and whose ``validate()`` raises
:class:`~hypergradient.HypergradientError` naming the offending option.  This module turns
such a dataclass into ``--help`` text, reads a TOML file into it and applies overrides with
type checking, so every bad value becomes a one-line error that names the option.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

from .._errors import HypergradientError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def help_text(text: str) -> dict[str, str]:
    """A config field's metadata: ``field(default=..., metadata=help_text("..."))``."""
    return {"help": text}


def threads_field() -> Any:
    """The ``threads`` option every recipe has: torch's intra-op threads during the run."""
    return dataclasses.field(
        default=1,
        metadata=help_text(
            "torch intra-op threads during the run (0: leave torch's setting). The recipes' "
            "tensors are small: one thread is about as fast, and on a busy 2-core machine two "
            "threads spin-wait and make every step several times slower"
        ),
    )


def option_help(cls) -> list[tuple[str, str, Any]]:
    """``(name, help, default)`` for every field of a config dataclass."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((f.name, f.metadata.get("help", ""), default))
    return out


def _field_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(option: str, value: Any, typ) -> Any:
    """Convert ``value`` (from TOML or from a ``--set`` string) to ``typ`` or raise."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        last = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(option, value, arg)
            except HypergradientError as err:
                last = err
        raise last if last else HypergradientError(f"option {option!r}: bad value {value!r}")
    if origin in (list, tuple):
        (inner,) = args[:1] or (str,)
        if isinstance(value, str):
            items = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise HypergradientError(
                f"option {option!r}: expected a list (e.g. {option}=0.1,0.01), got {value!r}."
            )
        return [_coerce(option, v.strip() if isinstance(v, str) else v, inner) for v in items]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise HypergradientError(f"option {option!r}: expected true or false, got {value!r}.")
    if typ is int:
        if isinstance(value, bool):
            raise HypergradientError(f"option {option!r}: expected an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 10)
        except ValueError:
            raise HypergradientError(
                f"option {option!r}: expected an integer, got {value!r}."
            ) from None
    if typ is float:
        if isinstance(value, bool):
            raise HypergradientError(f"option {option!r}: expected a number, got {value!r}.")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise HypergradientError(
                f"option {option!r}: expected a number, got {value!r}."
            ) from None
        if not math.isfinite(result):
            raise HypergradientError(f"option {option!r}: expected a finite number, got {value!r}.")
        return result
    if typ is str:
        if not isinstance(value, str):
            raise HypergradientError(f"option {option!r}: expected a string, got {value!r}.")
        return value
    return value


def build_config(cls, toml_path: str | Path | None = None, overrides: list[str] = ()):
    """Defaults <- TOML file <- ``key=value`` overrides, type-checked, then ``validate()``.

    Args:
        cls: the recipe's config dataclass.
        toml_path: a TOML file of ``option = value`` lines (``--config``), or ``None``.
        overrides: ``"key=value"`` strings (``--set``), applied after the file; values are
            converted to the field's type.

    Returns:
        ``cls(...)`` with the defaults replaced; every bad option or value raises one
        :class:`~hypergradient.HypergradientError` naming it.

    Examples:
        >>> import dataclasses, tempfile
        >>> from pathlib import Path
        >>> from hypergradient.recipes import build_config
        >>> @dataclasses.dataclass
        ... class Config:
        ...     lr: float = 0.1
        ...     steps: int = 100
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "config.toml"
        ...     _ = path.write_text("steps = 10")
        ...     build_config(Config, path, ["lr=0.5"])  # defaults <- file <- overrides
        Config(lr=0.5, steps=10)
        >>> build_config(Config, overrides=["steps=ten"])
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: option 'steps': expected an integer, got 'ten'.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            raise HypergradientError(f"--config {str(path)!r}: no such file.")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise HypergradientError(f"--config {str(path)!r}: not valid TOML ({err}).") from None
        for key, value in raw.items():
            key = key.replace("-", "_")
            if key not in names:
                raise HypergradientError(
                    f"--config {str(path)!r}: unknown option {key!r}; valid options: "
                    f"{sorted(names)}."
                )
            values[key] = _coerce(key, value, _field_type(cls, key))
    for item in overrides:
        if "=" not in item:
            raise HypergradientError(
                f"--set {item!r}: expected key=value (e.g. --set hyper_lr=0.01)."
            )
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in names:
            raise HypergradientError(
                f"--set {item!r}: unknown option {key!r}; valid options: {sorted(names)}."
            )
        values[key] = _coerce(key, value.strip(), _field_type(cls, key))
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def to_toml(config) -> str:
    """The config as TOML text (what a run folder's ``config.toml`` contains)."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue  # TOML has no null: an absent key means the default (None)
        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


# ----------------------------------------------------------------------------- validation
def check_positive_int(option: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HypergradientError(
            f"option {option!r}: expected an integer >= {minimum}, got {value!r}."
        )


def check_positive(option: str, value, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise HypergradientError(f"option {option!r}: expected a number {bound}, got {value!r}.")


def check_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise HypergradientError(
            f"option {option!r}: expected one of {list(choices)}, got {value!r}."
        )


def check_fraction(option: str, value, *, open_right: bool = True) -> None:
    ok = (
        isinstance(value, (int, float)) and value >= 0 and (value < 1 if open_right else value <= 1)
    )
    if not ok:
        bound = "[0, 1)" if open_right else "[0, 1]"
        raise HypergradientError(f"option {option!r}: expected a number in {bound}, got {value!r}.")


def check_data_dir(value, *, holds: str) -> None:
    """``data_dir`` is none or a folder path (not an existing file); ``holds`` names what the
    folder should contain, for the message."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise HypergradientError(f"option 'data_dir': expected a folder path, got {value!r}.")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise HypergradientError(
            f"option 'data_dir': {value!r} is a file, expected a folder (the one holding {holds})."
        )
