"""Checkpoint/resume of the training loop, its hypergradient, and ``hypergradient <recipe>``.

* A resumed :class:`~hypergradient.BilevelTrainer` (after a clean stop or an exception raised
  mid-run) ends with *bit-identical* hyperparameters to an uninterrupted run.
* The trainer's hypergradient is the functional core's, on a tiny model where the exact
  (dense-Hessian) implicit hypergradient is cheap.
* Every option of the ``weight-decay`` recipe rejects a bad value with ONE line naming it.
* A tiny ``weight-decay`` run writes its files; ``--resume`` recomputes nothing and
  reproduces the results; a run interrupted mid-way resumes to the uninterrupted results.
"""

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg
from _cli import one_line_error
from hypergradient.cli import _default_text, main
from hypergradient.recipes import available_recipes, build_config
from hypergradient.recipes import weight_decay as wd_recipe
from hypergradient.recipes.weight_decay import WeightDecayConfig

# ----------------------------------------------------------------------------- (a) resume


def _trainer(callbacks=()):
    """A small MLP, shuffled mini-batches (several epochs), SGD with momentum (state)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    xv, yv = torch.randn(20, 5, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    train = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8, shuffle=True)
    val = torch.utils.data.DataLoader(list(zip(xv, yv)), batch_size=10, shuffle=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    return hg.BilevelTrainer(
        model,
        hg.hparams.WeightDecay("per_weight", initial=1e-2),
        train,
        val,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        method=hg.Implicit(max_steps=5),
        hyper_every=3,
        callbacks=callbacks,
        seed=3,
    )


def _assert_same_state(a: hg.BilevelTrainer, b: hg.BilevelTrainer):
    assert a.hyper_step == b.hyper_step == 6 and a.inner_step == b.inner_step
    assert a.hparams.keys() == b.hparams.keys()
    for k in a.hparams:
        assert torch.equal(a.hparams[k], b.hparams[k]), k
    for (k, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), k
    assert [r["val_loss"] for r in a.history] == [r["val_loss"] for r in b.history]


@pytest.fixture
def uninterrupted(tmp_path):
    reference = _trainer()
    reference.fit(6, checkpoint=tmp_path / "reference.pt")
    return reference


def test_trainer_resume_after_stop_matches_uninterrupted_run(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt.pt"
    _trainer().fit(3, checkpoint=ckpt)
    torch.manual_seed(12345)  # a new process would start from another global RNG state
    resumed = _trainer()  # a new model, optimizer and trainer, as after a restart
    resumed.fit(6, checkpoint=ckpt, resume=True)
    _assert_same_state(resumed, uninterrupted)


def test_trainer_resume_after_exception_mid_run_matches(tmp_path, uninterrupted):
    class Killed(Exception):
        pass

    def kill_at_four(trainer, record):
        if record["hyper_step"] == 4:
            raise Killed

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Killed):
        _trainer(callbacks=[kill_at_four]).fit(6, checkpoint=ckpt)
    # the kill hit hyper-step 4 before its checkpoint: the file holds step 3
    assert torch.load(ckpt, weights_only=True)["hyper_step"] == 3
    torch.manual_seed(12345)
    resumed = _trainer()
    resumed.fit(6, checkpoint=ckpt, resume=True)
    _assert_same_state(resumed, uninterrupted)


# ----------------------------------------------------------------------------- (b) exactness


class _UnsplitWeightDecay(hg.hparams.WeightDecay):
    """The same kind without the closed-form fast path: the trainer back-propagates the whole
    training loss, penalty included."""

    def split_training_loss(self, hparams):
        return None


@pytest.mark.parametrize("granularity", ["global", "per_tensor", "per_weight"])
def test_split_training_loss_takes_the_same_steps_as_the_whole_loss(granularity):
    runs = []
    for kind in (hg.hparams.WeightDecay, _UnsplitWeightDecay):
        trainer = _trainer()
        trainer.hyper = kind(granularity, initial=0.05)
        trainer.hparams = {
            k: (v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(4)))
            for k, v in trainer.hyper.init(dict(trainer.model.named_parameters())).items()
        }
        loss = trainer.inner_steps(7)
        runs.append((loss, [p.detach().clone() for p in trainer.model.parameters()]))
    (loss_split, w_split), (loss_whole, w_whole) = runs
    assert loss_split == pytest.approx(loss_whole, rel=1e-12)
    for a, b in zip(w_split, w_whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_trainer_hypergradient_equals_functional_core():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    xv, yv = torch.randn(9, 4, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    model = nn.Linear(4, 3)
    trainer = hg.BilevelTrainer(
        model,
        hg.hparams.WeightDecay("per_weight", initial=0.1),
        [(x, y)],  # full batch: every draw is the whole training set
        [(xv, yv)],
        torch.optim.SGD(model.parameters(), lr=0.5),
        method=hg.Implicit(solver="exact"),
    )
    trainer.inner_steps(30)  # away from the initialisation (the method assumes an optimum)
    with torch.no_grad():  # distinct decays per weight, so a mix-up of names would show
        for v in trainer.hparams.values():
            v.add_(torch.linspace(-1.0, 1.0, v.numel()).reshape(v.shape))
    grads, val_loss = trainer.hypergradient()

    # the same bilevel problem written independently of the library's WeightDecay kind
    f = hg.as_function(model)

    def inner(p, h):
        penalty = sum(0.5 * torch.sum(h[f"log_wd.{k}"].exp() * w**2) for k, w in p.items())
        return F.cross_entropy(f(p, x), y) + penalty

    def outer(p, h):
        return F.cross_entropy(f(p, xv), yv)

    params = hg.params_of(model)
    hparams = {k: v.detach().clone() for k, v in trainer.hparams.items()}
    # 30 steps do not reach the optimum: the trainer's warm-start approximation, on purpose
    expected = hg.implicit_hypergrad(
        inner, outer, params, hparams, solver="exact", stationarity_tol=None
    )
    assert grads.keys() == expected.keys() == {"log_wd.weight", "log_wd.bias"}
    for k in expected:
        assert grads[k].dtype == torch.float64
        torch.testing.assert_close(grads[k], expected[k], rtol=1e-10, atol=1e-14)
    assert val_loss == pytest.approx(float(outer(params, hparams)), rel=1e-12)
    assert float(expected["log_wd.weight"].abs().max()) > 1e-6  # not trivially zero


# ----------------------------------------------------------------------------- (c) CLI errors

# one bad value per option; "<FILE>" becomes the path of an existing file
BAD_VALUES = {
    "dataset": "cifar10",
    "data_dir": "<FILE>",
    "download": "maybe",
    "n_train": "0",
    "n_val": "ten",
    "val_sizes": "50,0",
    "hidden": "1.5",
    "granularity": "per_neuron",
    "init_weight_decay": "0",
    "inner_lr": "-0.1",
    "batch_size": "0",
    "val_batch_size": "0",
    "hyper_every": "0",
    "hyper_steps": "-5",
    "method": "backprop",
    "solver": "lu",
    "solver_steps": "-1",
    "unroll_steps": "0",
    "hyper_lr": "nan",
    "decay_safety": "1.5",
    "grid": "0.1,-1",
    "seed": "-1",
    "threads": "-2",
    "damping": "-0.5",
    "hessian": "fisher",
    "hypergrad_resample_every": "0",
}


def test_every_option_has_a_bad_value_case():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(WeightDecayConfig)}


@pytest.mark.parametrize("option", sorted(BAD_VALUES))
def test_bad_option_value_gives_one_line_error_naming_it(option, tmp_path, capsys):
    value = BAD_VALUES[option]
    if value == "<FILE>":
        (tmp_path / "a-file").write_text("")
        value = str(tmp_path / "a-file")
    out = tmp_path / "run"
    assert main(["weight-decay", "--out", str(out), "--set", f"{option}={value}"]) == 2
    assert f"'{option}'" in one_line_error(capsys)
    assert not out.exists()  # rejected before anything is written


@pytest.mark.parametrize(
    ("args", "toml", "pattern"),
    [
        (["--set", "hiden=3"], None, r"--set 'hiden=3': unknown option 'hiden'"),
        (["--set", "hidden"], None, r"--set 'hidden': expected key=value"),
        (["--config", "missing.toml"], None, r"--config '.*missing.toml': no such file"),
        (["--config", "{toml}"], "hidden = [1,", r"--config '.*': not valid TOML"),
        (["--config", "{toml}"], 'hidden = "wide"', r"option 'hidden': expected an integer"),
        (["--config", "{toml}"], "hiden = 3", r"unknown option 'hiden'"),
        (["--set", "n_train=1600"], None, r"options 'n_train' \+ max\('n_val', 'val_sizes'\)"),
    ],
)
def test_config_errors_are_one_line(args, toml, pattern, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if toml is not None:
        (tmp_path / "c.toml").write_text(toml)
        args = [a.replace("{toml}", str(tmp_path / "c.toml")) for a in args]
    assert main(["weight-decay", "--out", str(tmp_path / "run"), *args]) == 2
    assert re.search(pattern, one_line_error(capsys))


def test_missing_dataset_files_giveone_line_error(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    argv = ["weight-decay", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*argv, "--set", "dataset=mnist", f"data_dir={empty}"]) == 2
    err = one_line_error(capsys)
    assert "option 'dataset' = 'mnist'" in err and "train-images-idx3-ubyte.gz" in err


def test_recipe_help_lists_every_option(capsys):
    assert "weight-decay" in available_recipes()
    with pytest.raises(SystemExit) as exit_info:
        main(["weight-decay", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, help_text, default in hg.recipes._config.option_help(WeightDecayConfig):
        assert re.search(rf"{name} \([^)]*, default {re.escape(_default_text(default))}\)", text)
        assert " ".join(help_text.split()) in text, name
    assert "hyper_lr (float, default 0.03)" in text
    assert "val_batch_size (int | None, default none)" in text
    assert "grid (list[float], default [0.0, 1e-05, 0.0001, 0.001, 0.01, 0.1])" in text


def test_demo_command_still_listed(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "weight-decay" in out


# ----------------------------------------------------------------------------- (d) smoke run

TINY = [
    "hidden=8",
    "n_train=120",
    "n_val=40",
    "val_sizes=20,40",
    "hyper_steps=6",
    "hyper_every=3",
    "batch_size=32",
    "solver_steps=3",
    "grid=0,1e-3",
]


def _run(out, *extra) -> int:
    return main(["weight-decay", "--out", str(out), "--no-progress", "--set", *TINY, *extra])


def _without_seconds(tree):
    if isinstance(tree, dict):
        return {k: _without_seconds(v) for k, v in tree.items() if k != "seconds"}
    if isinstance(tree, list):
        return [_without_seconds(v) for v in tree]
    return tree


def test_weight_decay_smoke_run_and_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _run(out) == 0
    printed = capsys.readouterr().out
    assert "per_weight (implicit)" in printed and "best global wd=" in printed
    results = json.loads((out / "results.json").read_text())
    config = build_config(WeightDecayConfig, out / "config.toml")
    assert config.hidden == 8 and config.val_sizes == [20, 40] and config.val_batch_size is None
    for png in ("losses.png", "split_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint.pt").is_file() and (out / "val_size_20" / "checkpoint.pt").is_file()
    assert len((out / "hyper_steps.jsonl").read_text().splitlines()) == 6
    assert [r["n_val"] for r in results["runs"]] == [40, 20]
    main_run = results["runs"][0]["tuned"]
    assert main_run["num_hparams"] == 64 * 8 + 8 + 8 * 10 + 10
    assert len(main_run["history"]["test_loss"]) == 6
    assert results["data"] == {"n_train": 120, "val_pool": 40, "n_test": 1797 - 160}

    # --resume of a finished run: nothing is recomputed, the results are identical
    def must_not_run(*args, **kwargs):
        raise AssertionError("--resume of a finished run recomputed something")

    monkeypatch.setattr(hg.BilevelTrainer, "step", must_not_run)
    monkeypatch.setattr(wd_recipe, "run_grid_value", must_not_run)
    assert _run(out, "--resume") == 0
    assert json.loads((out / "results.json").read_text()) == results
    assert len((out / "hyper_steps.jsonl").read_text().splitlines()) == 6


def test_weight_decay_interrupted_run_resumes_to_same_results(tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert _run(reference, "val_sizes=40") == 0
    expected = json.loads((reference / "results.json").read_text())

    out = tmp_path / "killed"
    step = hg.BilevelTrainer.step

    def step_then_interrupt(trainer):
        if trainer.hyper_step == 4:  # as if Ctrl-C arrived during the 5th hyper-step
            raise KeyboardInterrupt
        return step(trainer)

    monkeypatch.setattr(hg.BilevelTrainer, "step", step_then_interrupt)
    assert _run(out, "val_sizes=40") == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(hg.BilevelTrainer, "step", step)
    # options come from the run folder's config.toml
    assert main(["weight-decay", "--out", str(out), "--no-progress", "--resume"]) == 0
    got = json.loads((out / "results.json").read_text())
    assert _without_seconds(got) == _without_seconds(expected)
