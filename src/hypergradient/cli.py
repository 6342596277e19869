"""Command line: ``hypergradient demo [options]``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ._errors import HypergradientError


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
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hypergradient",
        description="Fit hyperparameters by gradient descent (implicit and unrolled "
        "hypergradients for PyTorch).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _demo_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        values = {f.name: getattr(args, f.name) for f in fields(DemoConfig)}
        try:
            run_demo(DemoConfig(**values), show_progress=not args.no_progress)
        except HypergradientError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
