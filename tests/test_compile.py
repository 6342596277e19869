"""torch.compile: which paths work with a compiled model, and which stop with one clear error.

* ``BilevelTrainer(torch.compile(model))``: training steps run the compiled module;
  hypergradients call the original module eagerly (the backward of a compiled graph cannot be
  differentiated again); the run matches the uncompiled one.
* ``hg.as_function(compiled)`` / ``hg.params_of(compiled)``: the original module, names
  without ``_orig_mod.``; hypergradients through it work.
* A compiled *loss function* handed to ``implicit_hypergrad`` or ``unrolled_hypergrad``:
  one :class:`~hypergradient.HypergradientError` saying so and what to pass instead.

The ``aot_eager`` backend is used: it runs TorchDynamo and AOTAutograd (where the
double-backward limit lives) without needing a C++ compiler on the test machine.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg

pytestmark = pytest.mark.filterwarnings("ignore")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _data():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    return torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16, shuffle=True)


def _fit(model):
    data = _data()
    trainer = hg.BilevelTrainer(
        model, hg.hparams.WeightDecay("per_tensor", initial=1e-2), data, data,
        torch.optim.SGD(model.parameters(), lr=0.1), hyper_every=2,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(3)
    return trainer


def test_a_compiled_model_trains_compiled_and_gets_the_same_hypergradients():
    torch._dynamo.reset()
    compiled = torch.compile(_net(), backend="aot_eager")
    ours = _fit(compiled)
    plain = _fit(_net())
    assert not any("_orig_mod" in k for k in ours.hparams)
    assert set(ours.hparams) == set(plain.hparams)
    for k in plain.hparams:
        torch.testing.assert_close(ours.hparams[k], plain.hparams[k], rtol=1e-6, atol=1e-9)
    for a, b in zip(ours.history, plain.history):
        assert a["hypergrad_norm"] == pytest.approx(b["hypergrad_norm"], rel=1e-6)
    # the checkpoint holds the original module's names: it loads into an uncompiled model
    assert not any("_orig_mod" in k for k in ours.state_dict()["model"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile


def test_as_function_of_a_compiled_module_calls_the_original_eagerly():
    net = _net()
    compiled = torch.compile(net, backend="aot_eager")
    params = hg.params_of(compiled)
    assert set(params) == set(hg.params_of(net))
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    f = hg.as_function(compiled)

    def inner(p, h):
        return F.cross_entropy(f(p, x), y) + 0.5 * h["l"].exp() * sum(
            (v**2).sum() for v in p.values()
        )

    hparams = {"l": torch.tensor(-1.0)}
    args = (inner, lambda p, h: F.cross_entropy(f(p, x), y), params, hparams)
    ours = hg.implicit_hypergrad(*args, solver="exact", stationarity_tol=None)
    g = hg.as_function(net)
    reference = hg.implicit_hypergrad(
        lambda p, h: F.cross_entropy(g(p, x), y)
        + 0.5 * h["l"].exp() * sum((v**2).sum() for v in p.values()),
        lambda p, h: F.cross_entropy(g(p, x), y), params, hparams, solver="exact",
        stationarity_tol=None,
    )  # fmt: skip
    torch.testing.assert_close(ours["l"], reference["l"])


def test_a_compiled_loss_is_one_clear_error():
    torch._dynamo.reset()
    compiled = torch.compile(_net(), backend="aot_eager")
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    params = {k: v.detach() for k, v in compiled.named_parameters()}

    def inner(p, h):  # functional_call on the compiled module runs the compiled graph
        out = torch.func.functional_call(compiled, p, (x,))
        return F.cross_entropy(out, y) + h["l"].exp() * sum((v**2).sum() for v in p.values())

    def outer(p, h):
        return F.cross_entropy(torch.func.functional_call(compiled, p, (x,)), y)

    hparams = {"l": torch.tensor(-1.0)}
    with pytest.raises(hg.HypergradientError, match="torch.compile"):
        hg.implicit_hypergrad(inner, outer, params, hparams, solver="cg", max_steps=3,
                              stationarity_tol=None)  # fmt: skip
    with pytest.raises(hg.HypergradientError, match="as_function"):
        hg.unrolled_hypergrad(inner, outer, params, hparams, steps=2, lr=0.1)
