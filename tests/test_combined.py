"""Combined hyperparameter kinds: an augmentation network and per-layer weight decay tuned
together, every hyperparameter's hypergradient checked against central differences
(float64, unrolled SGD with the augmentation noise fixed by a seed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                        nn.Flatten(), nn.Linear(3 * 8 * 8, 4))  # fmt: skip
    kind = hg.hparams.Combined(
        hg.hparams.AugmentationNet(image_shape=(1, 8, 8), transform="affine", hidden=4,
                                   clean_weight=0.5),
        hg.hparams.WeightDecay("per_tensor", initial=1e-2),
    )  # fmt: skip
    params = hg.params_of(net)
    hparams = kind.init(params)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 8, 8, generator=gen), torch.arange(12) % 4
    xv, yv = torch.randn(8, 1, 8, 8, generator=gen), torch.arange(8) % 4
    return net, kind, params, hparams, (x, y), (xv, yv)


def test_the_combination_merges_the_kinds_and_differentiates_all_of_them():
    net, kind, params, hparams, batch, (xv, yv) = _setup()
    assert any(k.startswith("aug.") for k in hparams)
    assert any(k.startswith("log_wd.") for k in hparams)
    f_train, f_val = hg.as_function(net, mode="train"), hg.as_function(net, mode="eval")
    # the augmentation net starts at the identity warp with a zero last layer: move it off
    hparams = {k: v + 0.05 * torch.randn_like(v) for k, v in hparams.items()}

    def inner(p, h):
        torch.manual_seed(7)  # the same augmentation noise at every evaluation
        return kind.training_loss(f_train, p, h, batch)

    def outer(p, h):
        return F.cross_entropy(f_val(p, xv), yv)

    grads = hg.unrolled_hypergrad(inner, outer, params, hparams, steps=2, lr=0.1)

    def objective(h):
        p = dict(params)
        for _ in range(2):
            with torch.enable_grad():
                q = {k: v.detach().requires_grad_(True) for k, v in p.items()}
                g = torch.autograd.grad(inner(q, h), list(q.values()))
            p = {k: v.detach() - 0.1 * gk for (k, v), gk in zip(q.items(), g)}
        return float(outer(p, h))

    eps = 1e-6
    # central differences in float64: roundoff |E| u / eps (u = 1.1e-16) on top of the
    # O(eps^2) truncation; components far smaller than E are held to that absolute level
    roundoff = 10 * abs(objective(hparams)) * 1.1e-16 / eps
    for k in hparams:
        for i in range(min(hparams[k].numel(), 3)):
            shifted = [{kk: v.clone() for kk, v in hparams.items()} for _ in range(2)]
            shifted[0][k].view(-1)[i] += eps
            shifted[1][k].view(-1)[i] -= eps
            fd = (objective(shifted[0]) - objective(shifted[1])) / (2 * eps)
            assert fd == pytest.approx(float(grads[k].view(-1)[i]), rel=1e-5, abs=roundoff), k


def test_bad_combinations_are_one_clear_error():
    decay = hg.hparams.WeightDecay("global")
    with pytest.raises(hg.HypergradientError, match="penalty"):
        hg.hparams.Combined(decay, hg.hparams.AugmentationNet(image_shape=(1, 8, 8)))
    with pytest.raises(hg.HypergradientError, match="name"):
        hg.hparams.Combined(decay, hg.hparams.WeightDecay("global")).init({"w": torch.zeros(2, 2)})
    with pytest.raises(hg.HypergradientError, match="kinds"):
        hg.hparams.Combined(decay, "weight decay")
