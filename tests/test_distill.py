"""Dataset distillation: the DistilledData kind, its exact unrolled hypergradient, the
``distill`` / ``distill-warm-cold`` recipes (learned data vs random real data, Vicol et al.'s
warm > cold > retrain ordering, checkpoint/resume)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import hypergradient as hg
from _datasets import DATASETS, needs_mnist
from hypergradient import HypergradientError
from hypergradient.hparams.distill import (
    IMAGES,
    LABELS,
    DistilledData,
    accuracy,
    evaluate_distilled,
    fresh_params,
    retrain_on_distilled,
)
from hypergradient.recipes import distill as recipe
from hypergradient.recipes._base import available_recipes
from hypergradient.recipes._config import build_config
from hypergradient.testing import finite_difference_hypergrad, relative_error


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def _tiny(classes=3, features=5, per_class=1, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, features, generator=gen)
    y = torch.arange(40) % classes
    kind = DistilledData(
        classes, (features,), per_class=per_class, real_x=x, real_y=y, seed=seed, **kw
    )
    return kind, x, y


# ----------------------------------------------------------------------------- the kind


def test_training_loss_is_soft_cross_entropy_and_differentiable():
    kind, x, _ = _tiny(per_class=2)
    model = nn.Linear(5, 3)
    params = dict(model.named_parameters())
    hp = {k: v.requires_grad_(True) for k, v in kind.init(params).items()}
    assert hp[IMAGES].shape == (6, 5) and hp[LABELS].shape == (6, 3)
    f = hg.as_function(model)
    loss = kind.training_loss(f, params, hp, batch=None)
    # the definition, written out: mean_i sum_c -softmax(l_i)_c log softmax(f(x_i))_c
    probs = torch.softmax(hp[LABELS], -1)
    manual = -(probs * torch.log_softmax(model(hp[IMAGES]), -1)).sum(-1).mean()
    torch.testing.assert_close(loss, manual, rtol=1e-12, atol=0)  # same float64 ops
    g_img, g_lab = torch.autograd.grad(loss, [hp[IMAGES], hp[LABELS]])
    assert bool(g_img.abs().sum() > 0) and bool(g_lab.abs().sum() > 0)
    # gradcheck w.r.t. every pixel and every label logit (float64, finite differences)
    w = {k: v.detach() for k, v in params.items()}
    torch.autograd.gradcheck(
        lambda a, b: kind.training_loss(f, w, {IMAGES: a, LABELS: b}),
        (
            hp[IMAGES].detach().clone().requires_grad_(),
            hp[LABELS].detach().clone().requires_grad_(),
        ),
    )


def test_init_real_noise_and_labels():
    kind, x, y = _tiny(classes=3, per_class=2)
    hp = kind.init({"w": torch.zeros(1)})
    # every synthetic image is a real example of its class, no example used twice
    rows = [int(torch.nonzero((x == img).all(1)).flatten()[0]) for img in hp[IMAGES]]
    assert len(set(rows)) == 6
    assert [int(y[r]) for r in rows] == kind.classes().tolist() == [0, 0, 1, 1, 2, 2]
    probs = torch.softmax(hp[LABELS], -1)
    torch.testing.assert_close(probs.max(-1).values, torch.full((6,), 0.9))  # label_confidence
    assert probs.argmax(-1).tolist() == kind.classes().tolist()
    noise = DistilledData(3, (2, 2), num_examples=4, init_from="noise", noise_std=0.5, seed=1)
    hn = noise.init({"w": torch.zeros(1, dtype=torch.float32)})
    assert hn[IMAGES].shape == (4, 2, 2) and hn[IMAGES].dtype == torch.float32
    assert noise.classes().tolist() == [0, 1, 2, 0]
    torch.testing.assert_close(hn[IMAGES], noise.init({"w": torch.zeros(1)})[IMAGES].float())
    hard = DistilledData(3, (4,), init_from="noise", learn_labels=False)
    assert set(hard.init({"w": torch.zeros(1)})) == {IMAGES}
    clip = DistilledData(3, (4,), init_from="noise", noise_std=5.0, pixel_range=(0.0, 1.0))
    hc = clip.init({"w": torch.zeros(1)})
    clip.project(hc)
    assert float(hc[IMAGES].min()) >= 0 and float(hc[IMAGES].max()) <= 1
    assert {"pixel_rms", "label_entropy"} <= set(kind.describe(hp))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "at least 2 classes"),
        ({"per_class": 0}, r"per_class=0\): expected an int >= 1"),
        ({"num_examples": 0}, "num_examples=0"),
        ({"shape": (0,)}, "shape of one example"),
        ({"init_from": "zeros"}, "init_from='zeros'"),
        ({"init_from": "real"}, "pass the real examples"),
        ({"label_confidence": 1.0}, "label_confidence=1.0"),
        ({"label_confidence": 0.1}, r"\[1/num_classes, 1\)"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"pixel_range": (1.0, 0.0)}, "low < high"),
    ],
)
def test_kind_errors(kwargs, match):
    args = {"num_classes": 3, "shape": (4,), "init_from": "noise", **kwargs}
    with pytest.raises(HypergradientError, match=match):
        DistilledData(**args)


def test_kind_errors_real_data():
    x, y = torch.zeros(4, 5), torch.tensor([0, 0, 1, 1])
    with pytest.raises(HypergradientError, match="expected N examples of 4 features"):
        DistilledData(3, (4,), real_x=x, real_y=y)
    with pytest.raises(HypergradientError, match=r"too few examples of classes \[2\]"):
        DistilledData(3, (5,), real_x=x, real_y=y)


def test_trainer_accepts_no_training_data():
    """uses_training_data=False: BilevelTrainer runs with train_loader=None."""
    kind, x, y = _tiny()
    model = nn.Linear(5, 3)
    trainer = hg.BilevelTrainer(
        model, kind, None, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1),
        method=hg.Unrolled(steps=2), hyper_every=1,
    )  # fmt: skip
    before = trainer.hparams[IMAGES].clone()
    trainer.fit(2)
    assert not torch.equal(before, trainer.hparams[IMAGES])


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_unrolled_hypergradient_matches_finite_differences(momentum):
    """Cold-start distillation of a 3-class linear model through T=4 SGD steps, float64.

    unrolled_hypergrad differentiates w_T(images, labels) exactly; the response is computed
    independently by retrain_on_distilled (plain SGD, no graph) and differenced centrally with
    eps=1e-6: truncation O(eps^2) ~ 1e-12 and round-off O(1e-16 / 1e-6) ~ 1e-10 relative, so
    agreement to 1e-7 means the same derivative.
    """
    kind, x, y = _tiny(classes=3, features=5, per_class=1)
    model = nn.Linear(5, 3)
    f = hg.as_function(model)
    params0 = fresh_params(model, "random", seed=3)
    hp = kind.init(params0)
    steps, lr = 4, 0.5

    def inner(p, h):
        return kind.training_loss(f, p, h, None)

    def outer(p, h):
        return F.cross_entropy(f(p, x), y)

    got = hg.unrolled_hypergrad(inner, outer, params0, hp, steps=steps, lr=lr, momentum=momentum)

    def response(h):
        w = retrain_on_distilled(
            model, kind, h, steps=steps, lr=lr, momentum=momentum, init=params0
        )
        return outer(w, h)

    fd = finite_difference_hypergrad(response, hp, eps=1e-6)
    assert relative_error(got, fd) < 1e-7
    assert all(bool(g.abs().sum() > 0) for g in got.values())


def test_fresh_params_and_retrain():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = torch.get_rng_state()
    a, b, c = (fresh_params(model, "random", s) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["0.weight"], c["0.weight"])
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert all(bool((v == 0).all()) for v in fresh_params(model, "zeros").values())
    assert all(torch.equal(before[k], v) for k, v in fresh_params(model, "current").items())
    with pytest.raises(HypergradientError, match="init='ones'"):
        fresh_params(model, "ones")
    with pytest.raises(HypergradientError, match="reset_parameters"):
        fresh_params(nn.ReLU(), "random")
    kind = DistilledData(3, (4,), init_from="noise")
    with pytest.raises(HypergradientError, match="steps=-1"):
        retrain_on_distilled(model, kind, kind.init(a), steps=-1, lr=0.1)
    with pytest.raises(HypergradientError, match="at least one seed"):
        evaluate_distilled(model, kind, kind.init(a), a["0.weight"], a["0.bias"], steps=1,
                           lr=0.1, seeds=())  # fmt: skip
    # zero steps returns the initialisation itself
    w0 = retrain_on_distilled(model, kind, kind.init(a), steps=0, lr=0.1, seed=1)
    assert all(torch.equal(w0[k], a[k]) for k in a)


# ----------------------------------------------------------------------------- it works


def test_distilled_digits_beat_random_real_images():
    """10 learned 8x8 images (cold start, 40 hyper-steps) vs 10 random real ones (one per
    class), both training fresh linear models for 10 SGD steps. Calibration on 2 cores:
    0.88 vs 0.50 at 50 hyper-steps; the margin asserted is half of that gap."""
    data = recipe._load("digits", None, False, 0, _quiet())
    model = recipe._make_model("linear", data, 0, seed=0)
    kind = DistilledData(10, (64,), real_x=data.x_train, real_y=data.y_train)
    distiller = recipe.ColdStartDistiller(
        model, kind, data.x_train, data.y_train, steps=10, lr=0.2, hyper_lr=0.05,
        batch_size=512, init_for_step=lambda s: fresh_params(model, "random", 1000 + s),
    )  # fmt: skip
    distiller.fit(40)
    seeds = [0, 1, 2]
    learned = evaluate_distilled(model, kind, distiller.hparams, data.x_test, data.y_test,
                                 steps=10, lr=0.2, seeds=seeds)["accuracy"]  # fmt: skip
    real = []
    for draw in range(3):
        rk = DistilledData(10, (64,), real_x=data.x_train, real_y=data.y_train,
                           learn_labels=False, seed=50 + draw)  # fmt: skip
        r = evaluate_distilled(model, rk, rk.init(distiller.hparams), data.x_test, data.y_test,
                               steps=10, lr=0.2, seeds=seeds)  # fmt: skip
        real.append(r["accuracy"])
    baseline = sum(real) / len(real)
    assert learned > 0.8
    assert learned - baseline > 0.2, (learned, real)


def test_warm_beats_cold_beats_retrain(tmp_path):
    """Vicol et al. 2022 on digits (10 examples, linear, W=0): warm-start online weights >
    cold start > retraining from zero on the warm-start data. Calibration (100 warm / 20
    cold hyper-steps): 0.897 > 0.835 > 0.680."""
    cfg = build_config(
        recipe.WarmColdConfig, None, ["warm_steps=100", "cold_steps=20", "hyper_lr=0.02"]
    )
    res = recipe.WarmColdRecipe().run(cfg, tmp_path, resume=False, console=_quiet())
    assert (tmp_path / "accuracy.png").is_file() and (tmp_path / "warm_data.png").is_file()
    warm, cold, retrain = res["warm_accuracy"], res["cold_accuracy"], res["retrain_accuracy"]
    assert warm > cold + 0.02 and cold > retrain + 0.05, (warm, cold, retrain)
    assert res["ordering_warm_cold_retrain"]


# ----------------------------------------------------------------------------- the recipes


def _cfg(*sets):
    base = ["dataset=digits", "hyper_steps=4", "eval_seeds=2", "baseline_draws=2",
            "eval_every=2", "batch_size=64"]  # fmt: skip
    return build_config(recipe.DistillConfig, None, [*base, *sets])


def test_recipes_are_registered():
    recipes = available_recipes()
    assert recipes["distill"] is recipe.DistillRecipe
    assert recipes["distill-warm-cold"] is recipe.WarmColdRecipe


@pytest.mark.parametrize("sets", [(), ("method=warm", "model=mlp", "hidden=8")])
def test_distill_recipe_smoke(tmp_path, sets):
    res = recipe.DistillRecipe().run(_cfg(*sets), tmp_path, resume=False, console=_quiet())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["recipe"] == "distill" and saved["num_hparams"] == 10 * (64 + 10)
    for png in ("distilled_images.png", "accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res["history"]) == 4 and "test_acc" in res["history"][-1]
    assert 0 <= res["distilled"]["accuracy"] <= 1 and res["rows"][0]["test_accuracy"] >= 0
    assert (res["online"] is not None) == ("method=warm" in sets)


def _final_hparams(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "distilled.pt")


def test_distill_resume_equals_uninterrupted(tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    recipe.DistillRecipe().run(_cfg("hyper_steps=6"), full, resume=False, console=_quiet())
    # 1) stop after 3 hyper-steps (a shorter run), then resume to 6
    recipe.DistillRecipe().run(_cfg("hyper_steps=3"), part, resume=False, console=_quiet())
    res = recipe.DistillRecipe().run(_cfg("hyper_steps=6"), part, resume=True, console=_quiet())
    a, b = _final_hparams(full), _final_hparams(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["hyper_step"] for r in res["history"]] == [1, 2, 3, 4, 5, 6]
    # 2) a crash inside the 5th hyper-step, then resume=True: loses only that step
    crash = tmp_path / "crash"
    real = recipe.unrolled_hypergrad
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "unrolled_hypergrad", flaky)
    with pytest.raises(KeyboardInterrupt):
        recipe.DistillRecipe().run(_cfg("hyper_steps=6"), crash, resume=False, console=_quiet())
    state = torch.load(crash / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    recipe.DistillRecipe().run(_cfg("hyper_steps=6"), crash, resume=True, console=_quiet())
    c = _final_hparams(crash)
    assert all(torch.equal(a[k], c[k]) for k in a)
    # a checkpoint of another config is refused with a clear message
    other = _cfg("hyper_steps=6", "images_per_class=2")
    with pytest.raises(HypergradientError, match="was made with other options"):
        recipe.DistillRecipe().run(other, crash, resume=True, console=_quiet())


def test_warm_cold_resume(tmp_path):
    sets = ["warm_steps=6", "cold_steps=4", "cold_inner_steps=3", "retrain_steps=5"]
    cfg = build_config(recipe.WarmColdConfig, None, sets)
    full = recipe.WarmColdRecipe().run(cfg, tmp_path / "a", resume=False, console=_quiet())
    short = build_config(recipe.WarmColdConfig, None, [*sets[:1], "cold_steps=2", *sets[2:]])
    recipe.WarmColdRecipe().run(short, tmp_path / "b", resume=False, console=_quiet())
    again = recipe.WarmColdRecipe().run(cfg, tmp_path / "b", resume=True, console=_quiet())
    for key in ("warm_accuracy", "cold_accuracy", "retrain_accuracy"):
        assert full[key] == again[key]
    assert [r["hyper_step"] for r in again["history"]["cold"]] == [1, 2, 3, 4]


@needs_mnist
def test_distill_recipe_mnist_smoke(tmp_path):
    cfg = build_config(
        recipe.DistillConfig,
        None,
        [f"data_dir={DATASETS}", "hyper_steps=2", "eval_seeds=1", "baseline_draws=1",
         "batch_size=32", "inner_steps=2"],
    )  # fmt: skip
    res = recipe.DistillRecipe().run(cfg, tmp_path, resume=False, console=_quiet())
    assert res["dataset"] == {"name": "mnist", "train": 60000, "test": 10000, "features": 784}
    assert (tmp_path / "distilled_images.png").is_file()


def test_mnist_missing_falls_back_or_explains(tmp_path):
    cfg = build_config(recipe.DistillConfig, None, [f"data_dir={tmp_path}", "hyper_steps=1"])
    with pytest.raises(HypergradientError, match="fallback_to_digits=true"):
        recipe.DistillRecipe().run(cfg, tmp_path / "run", resume=False, console=_quiet())
    data = recipe._load("mnist", str(tmp_path), True, 0, _quiet())
    assert data.name == "digits" and data.features == 64


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["dataset=cifar"], "option 'dataset'"),
        (["model=cnn"], "option 'model'"),
        (["method=implicit"], "option 'method'"),
        (["param_init=ones"], "option 'param_init'"),
        (["inner_steps=0"], "option 'inner_steps'"),
        (["inner_lr=0"], "option 'inner_lr'"),
        (["init_images=zeros"], "option 'init_images'"),
        (["model=mlp", "param_init=zeros"], "symmetry"),
    ],
)
def test_distill_config_errors(sets, match):
    with pytest.raises(HypergradientError, match=match):
        build_config(recipe.DistillConfig, None, sets)


def test_warm_cold_config_errors():
    with pytest.raises(HypergradientError, match="option 'num_examples'"):
        build_config(recipe.WarmColdConfig, None, ["num_examples=0"])
    with pytest.raises(HypergradientError, match="option 'lookahead'"):
        build_config(recipe.WarmColdConfig, None, ["lookahead=0"])
    cfg = build_config(recipe.WarmColdConfig, None, ["num_examples=1"])
    assert cfg.num_examples == 1


def test_accuracy_helper():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    f = hg.as_function(model)
    assert accuracy(f, dict(model.named_parameters()), x, torch.tensor([0, 1, 1])) == 2 / 3


def test_cold_start_checkpoint_mismatch_and_threads(tmp_path):
    data = recipe._load("digits", None, False, 0, _quiet())
    model = recipe._make_model("linear", data, 0, seed=0)

    def distiller(per_class):
        kind = DistilledData(10, (64,), per_class=per_class, real_x=data.x_train,
                             real_y=data.y_train)  # fmt: skip
        return recipe.ColdStartDistiller(
            model, kind, data.x_train, data.y_train, steps=2, lr=0.1, hyper_lr=0.01,
            batch_size=16, init_for_step=lambda s: fresh_params(model, "zeros"),
        )  # fmt: skip

    path = tmp_path / "ck.pt"
    distiller(1).fit(1, checkpoint=path)
    with pytest.raises(HypergradientError, match="do not match this run"):
        distiller(2).fit(2, checkpoint=path, resume=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(HypergradientError, match="could not read the checkpoint"):
        distiller(1).fit(2, checkpoint=path, resume=True)
    # the recipe sets torch's thread count for the run only
    torch.set_num_threads(2)
    cfg = _cfg("hyper_steps=1", "threads=1", "eval_seeds=1", "baseline_draws=1")
    recipe.DistillRecipe().run(cfg, tmp_path / "run", resume=False, console=_quiet())
    assert torch.get_num_threads() == 2
