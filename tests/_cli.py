"""Shared checks for tests of the ``hypergradient`` command line."""

from __future__ import annotations


def one_line_error(capsys) -> str:
    """The captured stderr, asserted to be ONE line starting ``error: `` (the CLI's contract
    for bad input: what was given, what was expected, how to fix it, and no traceback)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def assert_rejected(recipe: str, option: str, value: str, out, capsys) -> str:
    """``hypergradient <recipe> --out out --set option=value`` exits 2 with ONE error line
    that names the option, before anything is written; returns that line."""
    from hypergradient.cli import main

    assert main([recipe, "--out", str(out), "--set", f"{option}={value}"]) == 2
    err = one_line_error(capsys)
    assert f"'{option}'" in err
    assert not out.exists()  # rejected before anything is written
    return err
