"""Worker process for tests/test_search_workers.py: one Optuna worker on a shared study.

``python tests/_search_worker.py ROLE MARKS URL N_TRIALS [--rounds R] [--heartbeat S --grace S]``

Every worker calls ``search.create_study`` itself (so workers started together race to
create a new database) and then ``search.optimize(..., n_trials=N_TRIALS)``.  Files in the
folder ``MARKS`` tell the test where a worker is:

* ``racer``: for each round ``r``, touches ``ready-<r>-<pid>``, waits for the test's
  ``go-<r>``, then opens the study in ``URL.format(round=r)`` (a new file each round) and runs
  trials of 20 ms.
* ``victim``: touches ``victim-<trial number>`` inside its first trial, then sleeps until the
  test SIGKILLs it.
* ``survivor``: waits in each trial until a victim is inside one, then takes 0.1 s; every
  result is also stored as the user attribute ``result``.

Without ``--heartbeat`` the study gets the library's default heartbeat.  Every wait on a
file gives up after 120 s (exit status 3), so a worker never outlives a broken test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

WAIT_S = 120.0


def _wait_for(found, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not found():
        if time.monotonic() > deadline:
            print(f"_search_worker: gave up waiting for {what}", file=sys.stderr)
            sys.exit(3)
        time.sleep(0.001)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("racer", "victim", "survivor"))
    parser.add_argument("marks", type=Path)
    parser.add_argument("url")
    parser.add_argument("n_trials", type=int)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--heartbeat", type=int, default=None)
    parser.add_argument("--grace", type=int, default=None)
    args = parser.parse_args(argv)

    import optuna

    from hypergradient import search

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    marks, role = args.marks, args.role
    kwargs = {}
    if args.heartbeat is not None:
        kwargs = {"heartbeat_interval": args.heartbeat, "grace_period": args.grace}

    def objective(trial):
        x = trial.suggest_float("x", -1.0, 1.0)
        if role == "racer":
            time.sleep(0.02)
        elif role == "victim":
            (marks / f"victim-{trial.number}").touch()
            time.sleep(WAIT_S)  # the test kills it in here
        else:
            _wait_for(lambda: any(marks.glob("victim-*")), "the victim's trial")
            time.sleep(0.1)
        trial.set_user_attr("result", x * x)
        return x * x

    for r in range(args.rounds):
        if role == "racer":
            (marks / f"ready-{r}-{os.getpid()}").touch()
            go = marks / f"go-{r}"
            _wait_for(go.exists, go.name)
        study = search.create_study(
            "shared", storage=args.url.format(round=r), sampler="random", seed=None, **kwargs
        )
        search.optimize(study, objective, n_trials=args.n_trials, poll_interval=0.05)


if __name__ == "__main__":
    main()
