"""Shared checks for tests of the ``hypergradient`` command line."""

from __future__ import annotations


def one_line_error(capsys) -> str:
    """The captured stderr, asserted to be ONE line starting ``error: `` (the CLI's contract
    for bad input: what was given, what was expected, how to fix it, and no traceback)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err
