"""Mixed precision: training steps under torch.autocast, hypergradients in float32.

Two runs from the same init on the same batches, one in float32 and one with its training
steps' forward passes in bfloat16 (or float16 with a gradient scaler); the hypergradients of
the mixed-precision run, computed in float32 at its own weights, are compared with those of
the float32 run.  The weights themselves stay float32 (autocast changes the arithmetic of
the forward pass, not the stored tensors), so the difference is the accumulated rounding of
the forward passes: a few units of the low precision's roundoff ``u`` per run of training
steps, not ``u`` itself (bfloat16: ``u = 2^-8``; float16: ``2^-11``).
``benchmarks/autocast_accuracy.py`` reports the same on more steps and seeds.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg

pytestmark = pytest.mark.filterwarnings("ignore")


def _run(autocast, hyper_steps=5, seed=0):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(320, 16, generator=gen, dtype=torch.float32)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    train = torch.utils.data.DataLoader(list(zip(x[:256], y[:256])), batch_size=32, shuffle=True)
    val = torch.utils.data.DataLoader(list(zip(x[256:], y[256:])), batch_size=64, shuffle=True)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).float()
    grads: list[dict] = []
    trainer = hg.BilevelTrainer(
        net, hg.hparams.WeightDecay("per_tensor", initial=1e-3), train, val,
        torch.optim.SGD(net.parameters(), lr=0.1), hyper_every=10, autocast=autocast,
        callbacks=[lambda t, r: grads.append({k: v.grad.clone() for k, v in t.hparams.items()})],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(hyper_steps)
    return trainer, grads


def _rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    return math.sqrt(num / sum(float((b[k].double() ** 2).sum()) for k in b))


@pytest.mark.parametrize(("dtype", "u"), [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_mixed_precision_hypergradients_stay_within_a_few_roundoffs_of_float32(dtype, u):
    reference, exact = _run(None, hyper_steps=2)
    mixed, approx = _run(dtype, hyper_steps=2)
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    errors = [_rel(g, h) for g, h in zip(approx, exact)]
    # 2 hyper-steps of 10 training steps each: the weights drift apart by accumulated
    # forward-pass rounding (measured: at most 0.16u for bfloat16, 0.33u for float16); the
    # drift then grows with the run, as two trainings from one init part ways (about 3x per
    # hyper-step here: the benchmark's table), so only the start of a run is bounded by u
    # alone
    assert max(errors) < 2 * u, errors
    assert min(errors) > 0  # the training steps did run in the lower precision
    assert mixed.history[0]["train_loss"] != reference.history[0]["train_loss"]


def test_autocast_options_are_checked_and_saved(tmp_path):
    with pytest.raises(hg.HypergradientError, match="autocast"):
        _run(torch.float64)
    trainer, _ = _run(torch.float16, hyper_steps=2)
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] > 0
    assert trainer.signature()["autocast"] == "torch.float16"
