"""The analytic-continuation benchmark chooses by the error of A, never by the residual in G
alone (a solution that fits the noise has a small residual and a bad A), and its quick run
writes its table, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from hypergradient import continuation as ac

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import analytic_continuation as bench  # noqa: E402


def _validation():
    problem = ac.Problem(ac.tau_grid(10.0, 21), 10.0, ac.uniform_grid(-6.0, 6.0, 61))
    return problem, ac.make_dataset(problem, ("gaussians",), 4, 1e-2, seed=3)


def test_selection_reads_the_error_of_a_not_the_residual():
    problem, val = _validation()
    candidates = {
        "the truth": lambda G, sigma: val.A.clone(),
        # nearly unregularised least squares: fits the noise, so a smaller residual, worse A
        "fits the noise": bench.tikhonov_solver(problem, 1e-9),
    }
    chosen, scores = bench.select(candidates, val, problem)
    assert scores["fits the noise"]["val_residual"] < scores["the truth"]["val_residual"]
    assert scores["fits the noise"]["val_l1"] > scores["the truth"]["val_l1"]
    assert chosen == "the truth"


def test_metrics_on_a_known_shift():
    problem, val = _validation()
    A = val.A
    assert torch.allclose(bench.l1_error(problem, A, A), torch.zeros(len(val)), atol=1e-12)
    shifted = torch.roll(A, 5, dims=-1)  # 5 grid points = 1.0 in frequency
    position, _ = bench.peak_errors(problem, shifted, A)
    assert torch.allclose(position, torch.full_like(position, 1.0), atol=1e-12)


def test_the_quick_run_writes_its_table_json_and_plot(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "analytic_continuation.py"), "--quick",
         "--out", str(tmp_path), "--threads", "1"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "analytic_continuation_quick.json").read_text())
    methods = {row["method"] for row in result["rows"].values()}
    assert methods == {"learned optimizer", "MaxEnt, flat default", "MaxEnt, neural default",
                       "Tikhonov NNLS", "fully connected network"}  # fmt: skip
    assert {c["noise"] for c in result["claims"]} == set(result["args"]["noise"])
    assert (tmp_path / "analytic_continuation_quick.png").stat().st_size > 0
    # the test set went through its checksum
    manifest = json.loads((tmp_path / "analytic_continuation_test" / "manifest.json").read_text())
    assert len(manifest["sha256"]) == 64
