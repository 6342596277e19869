"""Optimizers proven in ordinary training runs (issue 20): one entry point, three parts.

Each part is its own script, runnable alone, with its own options, results and table:

- ``kfac``: K-FAC (Martens & Grosse 2015) against tuned SGD-momentum and Adam on the MNIST deep
  autoencoder, with the damping and rescaling ablations
  (``optimizers_in_training_kfac.py`` -> ``results/optimizers_in_training_kfac.*``);
- ``lookahead``: Lookahead (Zhang et al. 2019) around SGD and Adam over a grid of learning rates
  and (k, alpha) on Fashion-MNIST (``optimizers_in_training_lookahead.py``);
- ``batch-size``: the best learning rate against batch size for SGD and Adam, with the linear
  and square-root rules and the Lanczos proposal (Granziol et al. 2022)
  (``optimizers_in_training_batch_size.py``).

Usage::

    python benchmarks/optimizers_in_training.py --part kfac [options of that part]
    python benchmarks/optimizers_in_training.py --part all --quick

``--part all`` runs the three one after another with the options given after it (only options
every part accepts, such as ``--quick`` and ``--data-dir``, make sense there).
"""

from __future__ import annotations

import argparse
import importlib
import sys

PARTS = {
    "kfac": "optimizers_in_training_kfac",
    "lookahead": "optimizers_in_training_lookahead",
    "batch-size": "optimizers_in_training_batch_size",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Options after --part go to that part's script; see its --help.",
    )
    parser.add_argument("--part", required=True, choices=[*PARTS, "all"])
    args, rest = parser.parse_known_args(argv)
    names = list(PARTS) if args.part == "all" else [args.part]
    for name in names:
        print(f"== optimizers_in_training: part {name}", flush=True)
        importlib.import_module(PARTS[name]).main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
