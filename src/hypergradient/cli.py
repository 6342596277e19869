"""Command line: ``hypergradient demo [options]`` and ``hypergradient <recipe> [options]``.

Every registered recipe (see :mod:`hypergradient.recipes`) is a sub-command::

    hypergradient <recipe> [--config file.toml] [--set key=value ...] [--out DIR]
                           [--resume] [--no-progress]

The config is built as defaults <- TOML file <- ``--set`` overrides (type-checked, then the
recipe's ``validate()``); ``config.toml`` is written to the run folder before the run starts.
Every :class:`~hypergradient.HypergradientError` (a bad option, a missing file, a diverging
run) becomes one line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import textwrap
import typing
from dataclasses import fields
from pathlib import Path

from ._errors import HypergradientError
from ._io import LOCK_HINT, LOCK_NAME, RunLock, make_run_folder


def _demo_parser(sub) -> None:
    from .demo import DemoConfig

    helps = {
        "hidden": "hidden width of the 64-H-10 MLP",
        "n_train": "number of digits training examples",
        "n_val": "number of validation examples (the rest is the test set)",
        "total_steps": "full-batch SGD steps for every run",
        "inner_lr": "SGD learning rate (also the Neumann step alpha)",
        "hyper_every": "SGD steps between two hyper-steps (warm start)",
        "neumann_terms": "Neumann-series terms (Hessian-vector products) per hypergradient",
        "hyper_lr": "Adam learning rate on the log weight decays",
        "init_weight_decay": "initial value of every per-weight decay",
        "grid": "global weight decays of the baseline grid",
        "seed": "random seed (data split and initialisation)",
        "threads": "torch intra-op threads (0: chosen by model size; one for this small MLP, "
        "since on a busy machine a second thread only spin-waits)",
        "out": "output folder for results.json, config.json and losses.png",
    }
    p = sub.add_parser(
        "demo",
        help="tune one weight decay per weight of an MLP on digits (implicit hypergradients)",
        description="Tune one weight-decay coefficient per weight of an MLP on scikit-learn's "
        "digits by implicit hypergradients with warm-started training, next to the best of a "
        "grid of global weight decays. Prints a table; writes results.json, config.json and "
        "losses.png into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = DemoConfig()
    for f in fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "grid":
            p.add_argument(flag, type=float, nargs="+", default=default, help=helps[f.name])
        else:
            p.add_argument(flag, type=type(default), default=default, help=helps[f.name])
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted demo from the checkpoint in --out (same options)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _type_name(typ) -> str:
    """``int``, ``list[float]``, ``str | None``: a config field's type as the help shows it."""
    if isinstance(typ, type) and typing.get_origin(typ) is None:
        return typ.__name__
    return str(typ).replace("typing.", "").replace("NoneType", "None")


def _default_text(value) -> str:
    from .recipes._config import _toml_value

    return "none" if value is None else _toml_value(value)


def recipe_options_help(config_cls) -> str:
    """Every option of a recipe config: name, type, default and help (the ``--help`` epilog)."""
    from .recipes._config import option_help

    hints = typing.get_type_hints(config_cls)
    lines = ["options (set in the --config TOML file or with --set key=value):"]
    for name, text, default in option_help(config_cls):
        lines.append(f"  {name} ({_type_name(hints[name])}, default {_default_text(default)})")
        indent = " " * 6
        lines.extend(textwrap.wrap(text, width=88, initial_indent=indent, subsequent_indent=indent))
    lines.append("")
    lines.append(
        "lists: --set key=1,2,3 (or a TOML array); none: --set key=none; booleans: true/false."
    )
    return "\n".join(lines)


def _recipe_parser(sub, name: str, recipe_cls) -> None:
    doc = inspect.cleandoc(recipe_cls.__doc__ or recipe_cls.help)
    p = sub.add_parser(
        name,
        help=recipe_cls.help.replace("%", "%%"),  # argparse %-formats help text
        description=doc,
        epilog=recipe_options_help(recipe_cls.config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of options (key = value)")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="extend",
        nargs="+",
        default=[],
        help="override options: --set a=1 b=2 (repeatable; applied after --config)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help=f"run folder for config.toml, checkpoints, results.json and plots "
        f"(default hypergradient-runs/{name})",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in the run folder; without --config the options "
        "start from the run folder's config.toml",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _one_line(err: BaseException) -> str:
    # messages may list files on several lines; the contract is ONE line on stderr
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or logged: don't squeeze tables to 80 columns
        console = Console(width=120)
    return console


def _run_recipe(name: str, recipe_cls, args) -> int:
    from .recipes import build_config
    from .recipes._config import to_toml

    run_dir = Path(args.out if args.out is not None else Path("hypergradient-runs") / name)
    config_file = args.config
    saved = run_dir / "config.toml"
    if args.resume and config_file is None and saved.is_file():
        config_file = saved  # resuming continues the run as it was configured
    config = build_config(recipe_cls.config_cls, config_file, args.set)
    make_run_folder(run_dir, "--out")
    console = _console()
    # one process per run folder: a second one would interleave checkpoints and logs
    with RunLock(
        run_dir / LOCK_NAME, f"hypergradient {name} --out {str(run_dir)!r}", hint=LOCK_HINT
    ):
        if args.resume and saved.is_file() and saved.read_text() != to_toml(config):
            console.print(f"note: resuming {run_dir} with options changed from its config.toml")
        saved.write_text(to_toml(config))
        recipe_cls().run(
            config, run_dir, resume=args.resume, progress=not args.no_progress, console=console
        )
    return 0


def _os_error_line(err: OSError) -> str:
    """An operating-system error (disk full, permission, a file where a folder should be) as
    the one line the CLI prints."""
    where = f" {str(err.filename)!r}" if err.filename else ""
    return f"{err.strerror or err}{where}; check the path and free space, or pass another --out."


def main(argv: list[str] | None = None) -> int:
    from .recipes import available_recipes

    parser = argparse.ArgumentParser(
        prog="hypergradient",
        description="Fit hyperparameters by gradient descent (implicit and unrolled "
        "hypergradients for PyTorch).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _demo_parser(sub)
    recipes = {k: v for k, v in available_recipes().items() if k != "demo"}
    for name, recipe_cls in recipes.items():
        _recipe_parser(sub, name, recipe_cls)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command in recipes:
            return _run_recipe(args.command, recipes[args.command], args)
        from .demo import DemoConfig, run_demo

        values = {f.name: getattr(args, f.name) for f in fields(DemoConfig)}
        run_demo(DemoConfig(**values), show_progress=not args.no_progress, resume=args.resume)
        return 0
    except HypergradientError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {_one_line(_os_error_line(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = args.out if args.out is not None else f"hypergradient-runs/{args.command}"
        print(
            f"interrupted; finished work is kept in {out!r}: continue with "
            f"hypergradient {args.command} --resume (and the same options)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
