"""``hypergradient meta-pretrain``: options, a tiny run and its files, resume, and errors.

* Every option rejects a bad value with ONE line naming it, before anything is written.
* A tiny run writes its files, learns weights that favour the useful tasks, and evaluates
  every pre-training run at the same steps.
* ``--resume`` after an interruption, or with more pre-training steps, ends with the results
  of an uninterrupted run; resuming with other options is refused.
"""

import dataclasses
import json
import re

import pytest
import torch

from _cli import assert_rejected, one_line_error
from hypergradient.cli import _default_text, main
from hypergradient.pretrain import MetaPretrainer
from hypergradient.recipes import available_recipes
from hypergradient.recipes._config import option_help
from hypergradient.recipes.meta_pretrain import MetaPretrainConfig, Problem

TINY = ["num_useful=3", "num_noise=3", "dim=10", "n_pretrain=40", "n_train=30", "n_val=30",
        "n_test=200", "hidden=4", "pretrain_steps=60", "warmup=10", "period=5", "eval_every=2",
        "full_finetune_steps=5"]  # fmt: skip


def _run(out, *extra) -> int:
    return main(["meta-pretrain", "--out", str(out), "--no-progress", "--set", *TINY, *extra])


def _without_timings(tree):
    if isinstance(tree, dict):
        return {k: _without_timings(v) for k, v in tree.items() if k not in ("seconds", "machine")}
    if isinstance(tree, list):
        return [_without_timings(v) for v in tree]
    return tree


def test_tiny_run_writes_its_files_and_learns_weights_that_favour_the_useful_tasks(
    tmp_path, capsys
):
    out = tmp_path / "run"
    assert _run(out, "hyper_lr=0.3") == 0
    printed = capsys.readouterr().out
    assert "meta-learned weights" in printed and "uniform weights" in printed
    for name in ("config.toml", "results.json", "meta_pretrain.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert (out / "meta_pretrain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    history = results["history"]
    assert [r["step"] for r in history] == list(range(15, 61, 5))  # warmup 10, period 5
    for record in history:
        # T softmax(lambda): the weights sum to the number of tasks
        assert sum(record["task_weights"]) == pytest.approx(6.0, rel=1e-12)
    runs = results["runs"]
    assert set(runs) == {"learned", "uniform", "useful_only", "random_encoder"}
    assert runs["uniform"]["task_weights"] == [1.0] * 6
    assert runs["useful_only"]["noise_weight"] == 0.0
    assert runs["learned"]["weight_ratio"] < 1.0  # 10 hyper-steps already move them apart
    # every pre-training run is evaluated at the same steps (every 2 hyper-steps, and the end)
    steps = [[p["step"] for p in runs[k]["curve"]] for k in ("learned", "uniform", "useful_only")]
    assert steps[0] == steps[1] == steps[2] == [20, 30, 40, 50, 60]
    for key in ("learned", "uniform", "useful_only", "random_encoder"):
        assert 0.0 <= runs[key]["linear_acc"] <= 1.0 and 0.0 <= runs[key]["full_acc"] <= 1.0
    assert results["gain_over_uniform"]["linear_acc"] == pytest.approx(
        runs["learned"]["linear_acc"] - runs["uniform"]["linear_acc"]
    )


def test_more_steps_with_resume_equal_one_uninterrupted_run(tmp_path):
    out = tmp_path / "run"
    assert _run(out) == 0
    assert _run(out, "pretrain_steps=90", "--resume") == 0
    resumed = json.loads((out / "results.json").read_text())
    fresh = tmp_path / "fresh"
    assert _run(fresh, "pretrain_steps=90") == 0
    uninterrupted = json.loads((fresh / "results.json").read_text())
    assert len(resumed["history"]) == 16
    assert _without_timings(resumed["history"]) == _without_timings(uninterrupted["history"])
    assert _without_timings(resumed["runs"]) == _without_timings(uninterrupted["runs"])


def test_interrupted_run_resumes_to_the_same_results(tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert _run(reference) == 0
    expected = json.loads((reference / "results.json").read_text())

    hyper_step = MetaPretrainer.hyper_step
    calls = []

    def interrupted(self):
        calls.append(self.step_count)
        if len(calls) == 4 and interrupt:  # as if Ctrl-C arrived during the 4th hyper-step
            raise KeyboardInterrupt
        return hyper_step(self)

    monkeypatch.setattr(MetaPretrainer, "hyper_step", interrupted)
    interrupt = True
    out = tmp_path / "killed"
    assert _run(out) == 130
    assert "--resume" in capsys.readouterr().err
    calls.clear()
    interrupt = False
    # the options come from the run folder's config.toml
    assert main(["meta-pretrain", "--out", str(out), "--no-progress", "--resume"]) == 0
    assert calls[0] == 30  # the three finished hyper-steps (15, 20, 25) are not redone
    got = json.loads((out / "results.json").read_text())
    assert _without_timings(got["history"]) == _without_timings(expected["history"])
    assert _without_timings(got["runs"]) == _without_timings(expected["runs"])


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    capsys.readouterr()
    assert _run(out, "hyper_lr=0.5", "--resume") == 2
    assert "hyper_lr" in one_line_error(capsys)


def test_full_finetuning_minres_and_minibatches_run_too(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "finetune=full", "finetune_steps=2", "solver=minres", "max_steps=5",
                "relative_damping=0.1", "batch_size=16", "full_finetune_steps=0") == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 10
    assert "full_acc" not in results["runs"]["learned"]


def test_a_conjugate_gradient_breakdown_is_one_line_with_advice(tmp_path, capsys):
    # far from a minimum the pre-training Hessian of the tanh network is indefinite
    assert _run(tmp_path / "run", "solver=cg", "max_steps=20") == 2
    err = one_line_error(capsys)
    assert "the implicit solve failed at pre-training step 15" in err
    assert "solver='minres'" in err


def test_absolute_and_relative_damping_together_are_one_line_error(tmp_path, capsys):
    assert _run(tmp_path / "run", "solver=cg", "damping=0.1", "relative_damping=0.1") == 2
    err = one_line_error(capsys)
    assert "option 'relative_damping'" in err and "use one" in err
    assert not (tmp_path / "run").exists()


def test_minibatches_are_a_function_of_the_step():
    problem = Problem(MetaPretrainConfig(n_pretrain=50, batch_size=8, seed=3))
    first, again = problem.batch(7), problem.batch(7)
    assert torch.equal(first, again) and len(set(first.tolist())) == 8
    assert not torch.equal(problem.batch(7), problem.batch(8))
    assert Problem(MetaPretrainConfig(n_test=5)).batch(7) is None  # full batch


def test_help_lists_every_option(capsys):
    assert "meta-pretrain" in available_recipes()
    with pytest.raises(SystemExit) as exit_info:
        main(["meta-pretrain", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, help_text, default in option_help(MetaPretrainConfig):
        assert re.search(rf"{name} \([^)]*, default {re.escape(_default_text(default))}\)", text)
        assert " ".join(help_text.split()) in text, name


BAD_VALUES = {
    "num_useful": "0",
    "num_noise": "-1",
    "dim": "1.5",
    "latent_dim": "40",
    "num_classes": "1",
    "n_pretrain": "0",
    "n_train": "zero",
    "n_val": "0",
    "n_test": "-5",
    "hidden": "0",
    "pretrain_steps": "0",
    "pretrain_lr": "-0.01",
    "weight_decay": "-1",
    "batch_size": "101",
    "period": "0",
    "warmup": "1995",
    "hyper_lr": "nan",
    "finetune": "encoder",
    "finetune_steps": "0",
    "finetune_lr": "0",
    "solver": "lbfgs",
    "max_steps": "0",
    "damping": "-0.1",
    "relative_damping": "nan",
    "eval_every": "0",
    "full_finetune_steps": "-1",
    "full_finetune_lr": "0",
    "seed": "-1",
    "threads": "-2",
}


def test_every_option_has_a_bad_value_case():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(MetaPretrainConfig)}


@pytest.mark.parametrize("option", sorted(BAD_VALUES))
def test_bad_option_value_gives_one_line_error_naming_it(option, tmp_path, capsys):
    assert_rejected("meta-pretrain", option, BAD_VALUES[option], tmp_path / "run", capsys)
