"""``hypergradient towers``: options, a tiny run, resume, and the study's bookkeeping.

* Every option rejects a bad value with ONE line naming it, before anything is written.
* A tiny run writes its files; its spreads are max - min of its own runs; a height-1 run
  keeps its step size while a height-2 run moves it.
* ``--resume`` of a finished study recomputes nothing; an interrupted one finishes with the
  results of an uninterrupted one (and only runs what was missing).
"""

import dataclasses
import json
import math
import re

import pytest
import torch

from _cli import assert_rejected, one_line_error
from hypergradient.cli import _default_text, main
from hypergradient.recipes import available_recipes, build_config
from hypergradient.recipes import towers as towers_recipe
from hypergradient.recipes._config import option_help
from hypergradient.recipes.towers import Data, TowersConfig

BAD_VALUES = {
    "heights": "1,0",
    "step_sizes": "0.1,-1",
    "hyper_init": "0",
    "base": "lbfgs",
    "hyper": "newton",
    "features": "raw",
    "n_train": "1697",
    "hidden": "1.5",
    "batch_size": "0",
    "steps": "-3",
    "seed": "-1",
    "threads": "-2",
}


def test_every_option_has_a_bad_value_case():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(TowersConfig)}


@pytest.mark.parametrize("option", sorted(BAD_VALUES))
def test_bad_option_value_gives_one_line_error_naming_it(option, tmp_path, capsys):
    assert_rejected("towers", option, BAD_VALUES[option], tmp_path / "run", capsys)


@pytest.mark.parametrize(
    ("setting", "pattern"),
    [
        ("heights=2,2", r"option 'heights': expected distinct values"),
        ("step_sizes=", r"option 'step_sizes': expected a non-empty list"),
        ("batch_size=300", r"option 'batch_size': expected at most n_train = 200"),
    ],
)
def test_list_and_cross_option_errors(setting, pattern, tmp_path, capsys):
    argv = ["towers", "--out", str(tmp_path / "run"), "--set", "n_train=200", setting]
    assert main(argv) == 2
    assert re.search(pattern, one_line_error(capsys))


def test_help_lists_every_option(capsys):
    assert "towers" in available_recipes()
    with pytest.raises(SystemExit) as exit_info:
        main(["towers", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, help_text, default in option_help(TowersConfig):
        assert re.search(rf"{name} \([^)]*, default {re.escape(_default_text(default))}\)", text)
        assert " ".join(help_text.split()) in text, name


TINY = ["heights=1,2", "step_sizes=0.01,0.1,1", "steps=30", "n_train=200", "hidden=8",
        "batch_size=32"]  # fmt: skip


def _run(out, *extra) -> int:
    return main(["towers", "--out", str(out), "--no-progress", "--set", *TINY, *extra])


def _without_seconds(tree):
    if isinstance(tree, dict):
        return {k: _without_seconds(v) for k, v in tree.items() if k != "seconds"}
    if isinstance(tree, list):
        return [_without_seconds(v) for v in tree]
    return tree


def test_tiny_study_writes_its_files_and_resume_recomputes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _run(out) == 0
    printed = capsys.readouterr().out
    assert "v=0.01" in printed and "spread" in printed
    assert (out / "towers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = build_config(TowersConfig, out / "config.toml")
    assert config.heights == [1, 2] and config.step_sizes == [0.01, 0.1, 1.0]
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == {"n_train": 200, "n_heldout": 1797 - 200}
    assert (
        len(results["runs"]) == 6 and len(json.loads((out / "runs.json").read_text())["runs"]) == 6
    )
    for h in ("1", "2"):
        losses = [r["final_train_loss"] for r in results["runs"] if str(r["height"]) == h]
        row = results["per_height"][h]
        assert row["final_loss"] == losses and all(math.isfinite(x) for x in losses)
        assert row["spread"] == max(losses) - min(losses)
        assert row["spread_without_largest"] == max(losses[:2]) - min(losses[:2])
    for run in results["runs"]:
        assert len(run["final_lrs"]) == run["height"]
        if run["height"] == 1:  # nothing tunes a lone optimizer
            assert run["final_lrs"] == [run["step_size"]]
        else:  # the base's step size moved, the top one did not
            assert run["final_lrs"][0] != run["step_size"]
            assert run["final_lrs"][1] == run["step_size"]
    assert results["calibration"] is None  # not the paper's grid of step sizes

    def must_not_run(*args, **kwargs):
        raise AssertionError("--resume of a finished study recomputed a run")

    monkeypatch.setattr(towers_recipe, "run_one", must_not_run)
    assert _run(out, "--resume") == 0
    assert _without_seconds(json.loads((out / "results.json").read_text())) == _without_seconds(
        results
    )


def test_interrupted_study_resumes_to_the_same_results(tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert _run(reference) == 0
    expected = json.loads((reference / "results.json").read_text())

    run_one = towers_recipe.run_one
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2:4])  # (height, step size)
        if len(calls) == 4 and interrupt:  # as if Ctrl-C arrived during the 4th run
            raise KeyboardInterrupt
        return run_one(*args, **kwargs)

    monkeypatch.setattr(towers_recipe, "run_one", counted)
    interrupt = True
    out = tmp_path / "killed"
    assert _run(out) == 130
    assert "--resume" in capsys.readouterr().err
    assert len(json.loads((out / "runs.json").read_text())["runs"]) == 3
    calls.clear()
    interrupt = False
    # options come from the run folder's config.toml
    assert main(["towers", "--out", str(out), "--no-progress", "--resume"]) == 0
    assert calls == [(2, 0.01), (2, 0.1), (2, 1.0)]  # only what was missing
    got = json.loads((out / "results.json").read_text())
    assert _without_seconds(got) == _without_seconds(expected)


def test_a_diverging_run_is_recorded_and_its_spread_is_undefined():
    config = TowersConfig(heights=[1, 2], step_sizes=[0.1, 1.0], steps=5, n_train=64, hidden=4)
    x = torch.randn(64, 64, dtype=torch.float32)
    x[0, 0] = math.nan  # every batch holding example 0 gives a NaN loss
    y = torch.randint(0, 10, (64,))
    data = Data(x, y, x[:8], y[:8])
    run = towers_recipe.run_one(config, data, 2, 0.1)
    assert run["diverged"] and "training loss nan" in run["diverged"]
    assert run["final_train_loss"] is None
    runs = [dict(run, height=h, step_size=v) for h in (1, 2) for v in (0.1, 1.0)]
    runs[0] = dict(runs[0], final_train_loss=0.5)
    runs[1] = dict(runs[1], final_train_loss=0.2)
    summary = towers_recipe.summarize(config, runs)
    assert summary["1"]["spread"] == pytest.approx(0.3) and summary["2"]["spread"] is None
    assert towers_recipe.checks(config, summary)["spread_non_increasing_with_height"] is None


def test_every_run_sees_the_same_batches():
    config = TowersConfig(n_train=100, batch_size=32, steps=7)
    first, second = towers_recipe.batch_order(config, 100), towers_recipe.batch_order(config, 100)
    assert len(first) == 7 and all(torch.equal(a, b) for a, b in zip(first, second))
    epoch = torch.cat(first[:3])  # 3 full batches per epoch, the 4 left over are dropped
    assert len(set(epoch.tolist())) == 96
