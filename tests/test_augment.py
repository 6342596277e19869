"""AugmentationNet (a network whose weights are hyperparameters) and the ``augment`` recipe.

The validation loss never sees augmented images, so the augmentation's hypergradient has no
direct term: it flows only through the mixed derivative of the training loss.  The checks
below compare it with finite differences on tiny float64 instances (through an unrolled
training run, and at an exact inner optimum of a convex model).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import hypergradient as hg
from _datasets import DATASETS, needs_mnist
from hypergradient import HypergradientError
from hypergradient.hparams.augment import AugmentationNet

SHAPE = (1, 14, 14)


def _randomised(kind: AugmentationNet, scale: float = 0.3, seed: int = 1) -> dict:
    """Hyperparameters with every tensor (the zero last layers too) set to random values."""
    g = torch.Generator().manual_seed(seed)
    h = kind.init({"w": torch.zeros(1)})
    return {k: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in h.items()}


def _images(n: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g)


def _seeded(kind, forward, batch, criterion=F.cross_entropy, seed=5):
    """The kind's training loss with the same noise at every call (a deterministic function)."""

    def inner(p, h):
        torch.manual_seed(seed)
        return kind.training_loss(forward, p, h, batch, criterion)

    return inner


# ----------------------------------------------------------------------------- the kind


def test_init_identity_names_and_dtype():
    kind = AugmentationNet(image_shape=SHAPE, transform="both", noise_dim=2, hidden=4)
    h = kind.init({"w": torch.zeros(3, dtype=torch.float32)})
    assert all(k.startswith("aug.") for k in h)
    assert {"aug.affine.out.weight", "aug.residual.c3.weight"} <= set(h)
    assert all(v.dtype == torch.float32 for v in h.values())
    x = _images(3).float()
    assert torch.allclose(kind.augment(h, x), x, atol=1e-6)  # zero last layers: identity
    again = AugmentationNet(image_shape=SHAPE, transform="both", noise_dim=2, hidden=4)
    other = AugmentationNet(image_shape=SHAPE, transform="both", noise_dim=2, hidden=4, seed=1)
    key = "aug.affine.hidden.weight"
    assert torch.equal(
        again.init({"w": torch.zeros(1)})[key], kind.init({"w": torch.zeros(1)})[key]
    )
    assert not torch.equal(other.init({"w": torch.zeros(1)})[key], h[key].double())
    flat = kind.augment(h, x.reshape(3, -1))
    assert flat.shape == (3, 196) and torch.allclose(flat, x.reshape(3, -1), atol=1e-6)


def test_bad_options():
    with pytest.raises(HypergradientError, match="transform"):
        AugmentationNet(transform="crop")
    with pytest.raises(HypergradientError, match="clean_weight"):
        AugmentationNet(clean_weight=1.0)
    with pytest.raises(HypergradientError, match="image_shape"):
        AugmentationNet(image_shape=(28, 28))
    with pytest.raises(HypergradientError, match="noise_dim"):
        AugmentationNet(noise_dim=-1)
    with pytest.raises(HypergradientError, match="max_warp"):
        AugmentationNet(max_warp=0.0)
    kind = AugmentationNet(image_shape=SHAPE)
    with pytest.raises(HypergradientError, match="image_shape"):
        kind.augment(kind.init({"w": torch.zeros(1)}), torch.zeros(2, 1, 28, 28))


def _affine_by_hand(h, x, noise, max_warp):
    b = len(x)
    thumb = x.reshape(b, 1, 7, 2, 7, 2).mean(dim=(3, 5)).reshape(b, 49)
    hidden = torch.tanh(
        torch.cat([noise, thumb], 1) @ h["aug.affine.hidden.weight"].T + h["aug.affine.hidden.bias"]
    )
    out = hidden @ h["aug.affine.out.weight"].T + h["aug.affine.out.bias"]
    theta = torch.tensor([[1.0, 0, 0], [0, 1, 0]]) + max_warp * torch.tanh(out).reshape(b, 2, 3)
    # affine_grid, align_corners=False: pixel centres at (2j + 1) / W - 1
    coords = (2 * torch.arange(14) + 1) / 14 - 1
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(-1, 3)  # (HW, 3)
    grid = torch.einsum("bij,pj->bpi", theta, base).reshape(b, 14, 14, 2)
    return F.grid_sample(x, grid, align_corners=False)


def _residual_by_hand(h, x, noise, max_change):
    z = torch.cat([x, noise], 1)
    z = torch.relu(F.conv2d(z, h["aug.residual.c1.weight"], h["aug.residual.c1.bias"], padding=1))
    z = torch.relu(F.conv2d(z, h["aug.residual.c2.weight"], h["aug.residual.c2.bias"], padding=1))
    z = F.conv2d(z, h["aug.residual.c3.weight"], h["aug.residual.c3.bias"], padding=1)
    return x + max_change * torch.tanh(z)


@pytest.mark.parametrize("transform", ["affine", "residual", "both"])
def test_training_loss_equals_hand_written_formula(transform):
    kind = AugmentationNet(
        image_shape=SHAPE, transform=transform, noise_dim=3, hidden=5, clean_weight=0.3,
        max_change=0.4, max_warp=0.6,
    )  # fmt: skip
    h = _randomised(kind)
    x, y = _images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    model = nn.Sequential(nn.Flatten(), nn.Linear(196, 3))
    forward = hg.as_function(model)
    params = hg.params_of(model)
    torch.manual_seed(11)
    loss = kind.training_loss(forward, params, h, (x, y))
    # the same noise, drawn in the documented order: affine vector first, then residual maps
    torch.manual_seed(11)
    noise_a = torch.randn(6, 3) if transform in ("affine", "both") else None
    noise_r = torch.randn(6, 3, 14, 14) if transform in ("residual", "both") else None
    aug = x
    if noise_r is not None:
        aug = _residual_by_hand(h, aug, noise_r, 0.4)
    if noise_a is not None:
        aug = _affine_by_hand(h, aug, noise_a, 0.6)
    expected = 0.3 * F.cross_entropy(model(x), y) + 0.7 * F.cross_entropy(model(aug), y)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(kind.augment(h, x, {"affine": noise_a, "residual": noise_r}), aug)
    # clean_weight=0: the augmented term alone
    only = dataclasses.replace(kind, clean_weight=0.0)
    torch.manual_seed(11)
    assert torch.allclose(
        only.training_loss(forward, params, h, (x, y)), F.cross_entropy(model(aug), y)
    )


def test_affine_translation_moves_pixels():
    """A warp with translation (2/W, 0) samples x one pixel to the right: a shift left."""
    kind = AugmentationNet(image_shape=SHAPE, transform="affine", noise_dim=0, max_warp=1.0)
    h = {k: torch.zeros_like(v) for k, v in kind.init({"w": torch.zeros(1)}).items()}
    h["aug.affine.out.bias"] = torch.tensor([0, 0, math.atanh(2 / 14), 0, 0, 0])
    x = _images(2)
    out = kind.augment(h, x)
    shifted = torch.zeros_like(x)
    shifted[..., :-1] = x[..., 1:]
    assert torch.allclose(out, shifted, atol=1e-12)


# ----------------------------------------------------------------------------- hypergradients


def _directional_check(grad, response, h, n_dirs=3, eps=1e-5, seed=7):
    """``<grad, d>`` vs central differences of ``response`` along random unit directions."""
    g = torch.Generator().manual_seed(seed)
    predicted, measured = [], []
    for _ in range(n_dirs):
        d = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in h.items()}
        norm = math.sqrt(sum(float((v**2).sum()) for v in d.values()))
        d = {k: v / norm for k, v in d.items()}
        plus = {k: h[k] + eps * d[k] for k in h}
        minus = {k: h[k] - eps * d[k] for k in h}
        with torch.no_grad():
            measured.append(float(response(plus) - response(minus)) / (2 * eps))
        predicted.append(sum(float((grad[k] * d[k]).sum()) for k in h))
    predicted, measured = torch.tensor(predicted), torch.tensor(measured)
    return predicted, measured, float((predicted - measured).norm() / measured.norm())


def _norm(tree) -> float:
    return math.sqrt(sum(float((v**2).sum()) for v in tree.values()))


@pytest.mark.parametrize("transform", ["affine", "residual", "both"])
def test_unrolled_hypergradient_matches_finite_differences(transform):
    kind = AugmentationNet(
        image_shape=SHAPE, transform=transform, noise_dim=2, hidden=3, clean_weight=0.5
    )
    h = _randomised(kind, scale=0.3)
    x, y = _images(8), torch.arange(8) % 3
    xv, yv = _images(10, seed=3), torch.arange(10) % 3
    model = nn.Sequential(nn.Flatten(), nn.Linear(196, 6), nn.Tanh(), nn.Linear(6, 3))
    forward, params = hg.as_function(model), hg.params_of(model)
    inner = _seeded(kind, forward, (x, y))

    def outer(p, _h):  # clean validation images only: no direct term
        return F.cross_entropy(forward(p, xv), yv)

    steps, lr = 3, 0.5
    grad = hg.Unrolled(steps=steps).hypergrad(inner, outer, params, h, lr=lr)

    def response(hp):  # validation loss after `steps` SGD steps on the augmented loss
        w = dict(params)
        for _ in range(steps):
            with torch.enable_grad():
                wg = {k: v.detach().requires_grad_(True) for k, v in w.items()}
                g = torch.autograd.grad(inner(wg, hp), list(wg.values()))
            w = {k: v - lr * gk for (k, v), gk in zip(w.items(), g)}
        return outer(w, hp)

    assert _norm(grad) > 1e-3  # the hypergradient is not zero ...
    assert all(_norm({k: v}) > 0 for k, v in grad.items())  # ... for any tensor of the net
    predicted, measured, err = _directional_check(grad, response, h)
    assert err < 1e-6, (predicted, measured)


def test_implicit_exact_hypergradient_matches_finite_differences():
    """Convex inner problem (linear softmax + L2 on 7x7 images): the IFT hypergradient with
    solver='exact' equals central differences of the validation loss at the re-solved inner
    optimum (Newton's method to machine precision)."""
    shape = (1, 7, 7)
    kind = AugmentationNet(image_shape=shape, transform="affine", noise_dim=2, hidden=3)
    h = _randomised(kind, scale=0.3)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(12, *shape, generator=gen), torch.arange(12) % 3
    xv, yv = torch.rand(10, *shape, generator=gen), torch.arange(10) % 3
    model = nn.Sequential(nn.Flatten(), nn.Linear(49, 3))
    forward = hg.as_function(model)
    noise = kind.sample_noise(x, torch.Generator().manual_seed(5))
    kind.sample_noise = lambda *args, **kw: noise  # fixed noise (the Hessian below uses vmap)
    shapes = {k: v.shape for k, v in hg.params_of(model).items()}
    sizes = [s.numel() for s in shapes.values()]

    def unflatten(flat):
        return {k: t.reshape(s) for (k, s), t in zip(shapes.items(), flat.split(sizes))}

    def inner(p, hp):
        data = kind.training_loss(forward, p, hp, (x, y))
        return data + 0.05 * sum((v**2).sum() for v in p.values())

    def outer(p, _h):
        return F.cross_entropy(forward(p, xv), yv)

    def solve(hp):
        flat = torch.zeros(sum(sizes))
        for _ in range(30):
            f = lambda v: inner(unflatten(v), hp)  # noqa: E731
            g = torch.func.grad(f)(flat)
            flat = flat - torch.linalg.solve(torch.func.hessian(f)(flat), g)
            if float(g.norm()) < 1e-14:
                break
        return unflatten(flat)

    w_star = solve(h)
    grad = hg.Implicit(solver="exact").hypergrad(inner, outer, w_star, h, lr=0.1)
    assert _norm(grad) > 1e-3
    predicted, measured, err = _directional_check(grad, lambda hp: outer(solve(hp), hp), h)
    assert err < 1e-6, (predicted, measured)


# ----------------------------------------------------------------------------- the recipe

TINY = dict(
    n_train=60, n_val=40, n_test=200, batch_size=20, val_batch_size=20, hyper_steps=4,
    hyper_every=2, eval_every=2, solver_steps=3, aug_hidden=8,
)  # fmt: skip


@pytest.fixture
def recipe_module():
    from hypergradient.recipes import augment

    return augment


def _config(module, **extra):
    config = module.AugmentConfig(data_dir=str(DATASETS), **{**TINY, **extra})
    config.validate()
    return config


def _run(module, config, run_dir, resume=False):
    console = Console(width=140, record=True)
    results = module.AugmentRecipe().run(
        config, run_dir, resume=resume, progress=False, console=console
    )
    return results, console.export_text()


def _final_hparams(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["hparams"]


def _without_seconds(tree):
    if isinstance(tree, dict):
        return {k: _without_seconds(v) for k, v in tree.items() if k != "seconds"}
    if isinstance(tree, list):
        return [_without_seconds(v) for v in tree]
    return tree


def test_recipe_is_registered_and_validates_options(recipe_module):
    from hypergradient.recipes import available_recipes

    assert available_recipes()["augment"] is recipe_module.AugmentRecipe
    config = recipe_module.AugmentConfig()
    config.validate()
    bad = [
        ("model", "resnet"), ("transform", "crop"), ("solver", "exact"), ("clean_weight", 1.0),
        ("momentum", 1.0), ("n_val", 0), ("n_test", 10_001), ("hand_scale", 1.0),
        ("inner_lr", 0.0), ("download", "yes"), ("eval_every", 0), ("n_train", 59_000),
    ]  # fmt: skip
    for option, value in bad:
        with pytest.raises(HypergradientError, match=f"'{option}'"):
            dataclasses.replace(config, **{option: value}).validate()
    with pytest.raises(HypergradientError, match="'damping'"):
        dataclasses.replace(config, solver="cg").validate()
    dataclasses.replace(config, solver="cg", damping=0.1).validate()
    # the cosine schedule: inner_lr at the start, 5% of it at the end, and > 0 throughout
    assert config.lr_at(0) == config.inner_lr
    assert config.lr_at(config.hyper_steps) == pytest.approx(0.05 * config.inner_lr)


def test_clipped_adam_steps_like_adam_on_clipped_gradients(recipe_module):
    """One outlier hypergradient is clipped (into a copy: the caller's tensor keeps its raw
    value, which the trainer logs) before Adam sees it."""
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(5, generator=gen).requires_grad_(True) for _ in range(2)]
    b = [t.detach().clone().requires_grad_(True) for t in a]
    raw = [1000 * torch.randn(5, generator=gen) for _ in range(2)]
    for t, g in zip(a, raw):
        t.grad = g
    for t, g in zip(b, raw):
        t.grad = g.clone()
    clipped = recipe_module.ClippedAdam(a, lr=0.1, max_norm=3.0)
    torch.nn.utils.clip_grad_norm_(b, 3.0)
    reference = torch.optim.Adam(b, lr=0.1)
    clipped.step()
    reference.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert float(torch.stack([g.norm() for g in raw]).norm()) > 1000  # raw values kept
    # the outlier does not swamp Adam's second moment: a normal gradient still moves
    assert float(clipped.state[a[0]]["exp_avg_sq"].max()) <= 9 * (1 - 0.999) + 1e-12


@needs_mnist
def test_recipe_smoke_run_writes_results_and_plots(recipe_module, tmp_path):
    config = _config(recipe_module, retrain=True)
    results, printed = _run(recipe_module, config, tmp_path)
    assert "learned augmentation net (affine, neumann)" in printed
    assert "points over no augmentation" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_acc"] == results["test_acc"]
    assert set(saved["runs"]) == {"none", "hand", "learned", "retrain"}
    assert saved["data"] == {"n_train": 60, "n_val": 40, "n_test": 200}
    learned = saved["runs"]["learned"]
    assert learned["curve"]["inner_step"] == [4, 8]  # eval_every=2 hyper-steps of 2 SGD steps
    assert saved["runs"]["none"]["curve"]["inner_step"] == [4, 8]
    assert len(learned["history"]["hypergrad_norm"]) == 4
    assert all(g > 0 for g in learned["history"]["hypergrad_norm"])  # the net gets a signal
    assert 0 <= saved["learned_augmentation"]["mean_abs_pixel_change"] < 1
    for png in ("examples.png", "test_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hp = _final_hparams(tmp_path)
    assert sum(v.numel() for v in hp.values()) == learned["num_hparams"]
    assert len((tmp_path / "hyper_steps.jsonl").read_text().splitlines()) == 4


@needs_mnist
def test_recipe_resume_matches_uninterrupted_run(recipe_module, tmp_path, monkeypatch):
    config = _config(recipe_module, hand_baseline=False)
    reference, _ = _run(recipe_module, config, tmp_path / "reference")
    expected = _final_hparams(tmp_path / "reference")

    out = tmp_path / "killed"
    step = hg.BilevelTrainer.step

    def step_then_interrupt(trainer):
        if trainer.hyper_step == 2:  # as if the process died during the 3rd hyper-step
            raise KeyboardInterrupt
        return step(trainer)

    monkeypatch.setattr(hg.BilevelTrainer, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(recipe_module, config, out)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["hyper_step"] == 2
    monkeypatch.setattr(hg.BilevelTrainer, "step", step)
    resumed, _ = _run(recipe_module, config, out, resume=True)
    got = _final_hparams(out)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert _without_seconds(resumed["runs"]) == _without_seconds(reference["runs"])

    # resuming a finished run recomputes nothing
    def must_not_run(*args, **kwargs):
        raise AssertionError("--resume of a finished run recomputed something")

    monkeypatch.setattr(hg.BilevelTrainer, "step", must_not_run)
    monkeypatch.setattr(recipe_module, "run_plain", must_not_run)
    again, _ = _run(recipe_module, config, out, resume=True)
    assert again["runs"] == resumed["runs"]
