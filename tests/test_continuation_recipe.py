"""``hypergradient analytic-continuation``: options, a tiny run, resume, and the selection.

* Every option rejects a bad value with ONE line naming it (exit 2), before anything is
  written.
* A tiny run writes results.json, both plots and the test set with its manifest (read back
  through its checksum); the rows split seen and unseen families.
* ``--resume`` of a finished run trains nothing and reproduces the results; a run
  interrupted after its first round of meta-training resumes to the uninterrupted history
  and model, running only the rounds that were missing.
* Tikhonov's lambda is chosen by the validation L1 error of A through ``select``, not by
  the residual in G.
"""

import dataclasses
import json
import re

import pytest
import torch

from _cli import assert_rejected, one_line_error
from hypergradient import continuation as ac
from hypergradient.cli import _default_text, main
from hypergradient.recipes import analytic_continuation as recipe
from hypergradient.recipes import available_recipes, build_config
from hypergradient.recipes._config import option_help
from hypergradient.recipes.analytic_continuation import AnalyticContinuationConfig

NAME = "analytic-continuation"

BAD_VALUES = {
    "beta": "0",
    "n_tau": "1",
    "n_w": "many",
    "w_max": "-8",
    "noise": "1e-3,-1",
    "families": "gaussians,triangles",
    "unseen": "gaussians",  # also a training family
    "n_train": "0",
    "n_val": "-1",
    "n_val_select": "0",
    "n_test": "0",
    "n_iter": "0",
    "filter_width": "4",
    "rho": "0",
    "meta_steps": "0",
    "lr": "nan",
    "batch_size": "0",
    "truncate": "0",
    "eval_every": "0",
    "checkpoint_every": "0",
    "maxent_alpha": "lcurve",
    "default_mix": "1",
    "tikhonov_lams": "0.1,0",
    "plot_cases": "999",
    "seed": "-1",
    "threads": "-2",
}


def test_every_option_has_a_bad_value_case():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(AnalyticContinuationConfig)}


@pytest.mark.parametrize("option", sorted(BAD_VALUES))
def test_bad_option_value_gives_one_line_error_naming_it(option, tmp_path, capsys):
    assert_rejected(NAME, option, BAD_VALUES[option], tmp_path / "run", capsys)


@pytest.mark.parametrize(
    ("setting", "pattern"),
    [
        ("truncate=11", r"option 'truncate': expected at most n_iter = 10"),
        ("n_val_select=30", r"option 'n_val_select': expected at most n_val = 20"),
        ("noise=0.01,0.01", r"option 'noise': expected distinct values"),
        ("families=", r"option 'families': expected a non-empty list"),
    ],
)
def test_cross_option_errors(setting, pattern, tmp_path, capsys):
    assert main([NAME, "--out", str(tmp_path / "run"), "--set", setting]) == 2
    assert re.search(pattern, one_line_error(capsys))


def test_help_lists_every_option(capsys):
    assert NAME in available_recipes()
    with pytest.raises(SystemExit) as exit_info:
        main([NAME, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, help_text, default in option_help(AnalyticContinuationConfig):
        assert re.search(rf"{name} \([^)]*, default {re.escape(_default_text(default))}\)", text)
        assert " ".join(help_text.split()) in text, name


# 2 rounds of 3 Adam steps (checkpoint_every=3), 2 noise levels, a seen and an unseen family
TINY = ["beta=10", "n_tau=11", "n_w=41", "w_max=6", "noise=1e-2,1e-3",
        "families=gaussians,gapped", "n_train=4", "n_val=2", "n_val_select=1", "n_test=2",
        "n_iter=2", "meta_steps=6", "checkpoint_every=3", "eval_every=1", "batch_size=4",
        "tikhonov_lams=0.01,1", "plot_cases=0,5"]  # fmt: skip


def _run(out, *extra) -> int:
    return main([NAME, "--out", str(out), "--no-progress", "--set", *TINY, *extra])


def _without_seconds(tree):
    if isinstance(tree, dict):
        return {
            k: _without_seconds(v)
            for k, v in tree.items()
            if k not in ("seconds", "seconds_per_spectrum", "ms_per_spectrum")
        }
    if isinstance(tree, list):
        return [_without_seconds(v) for v in tree]
    return tree


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny run, shared by the tests that only read it (or resume a copy of it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _run(out) == 0
    return out


def test_tiny_run_writes_results_plots_and_the_test_set(finished, capsys):
    results = json.loads((finished / "results.json").read_text())
    for plot in ("reconstructions.png", "meta_training.png"):
        assert (finished / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((finished / "test_set" / "manifest.json").read_text())
    assert manifest["families"] == ["gaussians", "gapped", "quasiparticle"]
    assert manifest["rel_sigmas"] == [1e-2, 1e-3] and manifest["n_per_family"] == 2
    assert results["test_set"]["sha256"] == manifest["sha256"]
    _, sets = ac.load_test_set(finished / "test_set")  # the checksum still holds
    assert sorted(sets) == [1e-3, 1e-2] and sets[1e-3].family[4:] == ["quasiparticle"] * 2

    rows = results["rows"]
    assert {(r["method"], r["noise"], r["families"]) for r in rows} == {
        (m, rel, label) for m in recipe.METHODS for rel in (1e-2, 1e-3)
        for label in ("seen", "unseen")
    }  # fmt: skip
    for r in rows:
        assert r["n"] == (4 if r["families"] == "seen" else 2)
        assert r["l1_mean"] >= 0 and r["ms_per_spectrum"] > 0
    # the table's means are those of the per-spectrum errors of the families they name
    ev = results["evaluations"][f"Tikhonov NNLS @ {1e-3!r}"]
    seen = next(r for r in rows if r["method"] == "Tikhonov NNLS" and r["noise"] == 1e-3)
    assert seen["l1_mean"] == pytest.approx(sum(ev["l1"][:4]) / 4, rel=1e-12)
    assert (
        sorted(results["truth"]) == ["0", "5"] and results["case_families"]["5"] == "quasiparticle"
    )

    history = json.loads((finished / "history.json").read_text())
    assert history["step"] == [0, 1, 2, 3, 4, 5, 6] and len(history["rounds"]) == 2
    assert results["meta_training"]["best_val_l1"] == min(history["val_l1"])
    assert results["selection"][f"tikhonov @ {1e-2!r}"]["lam"] in (0.01, 1.0)
    config = build_config(AnalyticContinuationConfig, finished / "config.toml")
    assert config.noise == [1e-2, 1e-3] and config.plot_cases == [0, 5]


def test_resume_of_a_finished_run_trains_and_solves_nothing(finished, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    before = json.loads((out / "results.json").read_text())

    def must_not_run(*args, **kwargs):
        raise AssertionError("--resume of a finished run did this again")

    monkeypatch.setattr(recipe, "meta_train", must_not_run)
    monkeypatch.setattr(recipe, "evaluate", must_not_run)
    assert main([NAME, "--out", str(out), "--no-progress", "--resume"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert _without_seconds(after) == _without_seconds(before)


def test_interrupted_meta_training_resumes_to_the_uninterrupted_run(
    finished, tmp_path, capsys, monkeypatch
):
    meta_train, calls = recipe.meta_train, []

    def counted(*args, **kwargs):
        calls.append(kwargs["seed"])  # seed + round index
        if len(calls) == 2 and interrupt:  # as if Ctrl-C arrived in the second round
            raise KeyboardInterrupt
        return meta_train(*args, **kwargs)

    monkeypatch.setattr(recipe, "meta_train", counted)
    interrupt = True
    out = tmp_path / "killed"
    assert _run(out) == 130
    assert "--resume" in capsys.readouterr().err
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(saved["history"]["rounds"]) == 1 and saved["history"]["step"][-1] == 3
    assert (out / "test_set" / "manifest.json").is_file()  # written before the training
    calls.clear()
    interrupt = False
    # the options come from the run folder's config.toml
    assert main([NAME, "--out", str(out), "--no-progress", "--resume"]) == 0
    assert calls == [1]  # only the missing round
    expected = json.loads((finished / "history.json").read_text())
    got = json.loads((out / "history.json").read_text())
    assert _without_seconds(got) == _without_seconds(expected)
    for key, value in torch.load(finished / "learned_continuation.pt", weights_only=True).items():
        assert torch.equal(
            torch.load(out / "learned_continuation.pt", weights_only=True)[key], value
        ), key


def test_resume_with_other_options_is_one_line(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    argv = [NAME, "--out", str(out), "--no-progress", "--resume", "--set", *TINY, "n_iter=3"]
    assert main(argv) == 2
    assert "n_iter: 2 -> 3" in one_line_error(capsys)


def test_tikhonov_lambda_is_chosen_by_the_l1_error_through_select(monkeypatch):
    problem = ac.Problem(ac.tau_grid(10.0, 21), 10.0, ac.uniform_grid(-6.0, 6.0, 61))
    val = ac.make_dataset(problem, ("gaussians",), 4, 1e-2, seed=3)
    used = []

    def spy(candidates, data, prob):
        used.append(sorted(candidates))
        return ac.select(candidates, data, prob)

    monkeypatch.setattr(recipe, "select", spy)
    lam, scores = recipe.choose_tikhonov_lambda(problem, val, [1e-9, 1.0])
    assert used == [["lam=1.0", "lam=1e-09"]]
    # the nearly unregularised fit has the smaller residual and the larger error: it loses
    noisy, regular = scores["lam=1e-09"], scores["lam=1.0"]
    assert noisy["val_residual"] < regular["val_residual"]
    assert noisy["val_l1"] > regular["val_l1"]
    assert lam == 1.0
