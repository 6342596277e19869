"""The demo end to end at a tiny size, and its command-line errors.

A smoke run proves the wiring (files written, table printed), not correctness: the
hypergradient itself is checked against exact answers in test_implicit.py.
"""

import json

import pytest
from rich.console import Console

from hypergradient.cli import main
from hypergradient.demo import DemoConfig, run_demo


def test_demo_tiny_run_writes_results(tmp_path):
    config = DemoConfig(
        hidden=16,
        n_train=200,
        n_val=100,
        total_steps=60,
        hyper_every=10,
        neumann_terms=3,
        grid=[0.0, 1e-3],
        out=str(tmp_path / "run"),
    )
    console = Console(record=True, width=120)
    result = run_demo(config, show_progress=False, console=console)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["per_weight"]["num_hparams"] == 64 * 16 + 16 + 16 * 10 + 10
    assert len(saved["per_weight"]["history"]["val_loss"]) == 6
    assert json.loads((out / "config.json").read_text())["hidden"] == 16
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["best_grid"]["weight_decay"] in (0.0, 1e-3)
    assert "per-weight (implicit)" in console.export_text()


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--hidden", "0"], r"--hidden must be an int >= 1, got 0"),
        (["--inner-lr", "-1"], r"--inner-lr must be a positive number, got -1.0"),
        (["--grid", "-0.1"], r"--grid must be a non-empty list of weight decays >= 0"),
        (["--hyper-every", "50", "--total-steps", "10"], r"--hyper-every \(50\) must not"),
        (["--neumann-terms", "-2"], r"--neumann-terms must be an int >= 0"),
    ],
)
def test_demo_bad_values_give_one_line_errors(argv, pattern, capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(pattern, err)


def test_demo_bad_type_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--hidden", "wide"])
    assert "--hidden: invalid int value: 'wide'" in capsys.readouterr().err
