"""BatchNorm and dropout: a hypergradient never writes to the user's model.

Running statistics advance only on real training steps (as in plain training), no
validation example enters them, dropout masks of the training steps are those plain
training draws, the validation loss is taken in eval mode by default, and the
hypergradient is the derivative of that validation loss (float64 finite differences).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg


def _net(dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)
    )


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_hypergradient_through_as_function_leaves_the_module_as_it_was():
    # the reported case: an 8-16-3 MLP with BatchNorm1d, one implicit hypergradient
    net = _net()
    before = _state(net)
    f = hg.as_function(net)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    xv, yv = torch.randn(16, 8), torch.randint(0, 3, (16,))
    params = hg.params_of(net)
    hparams = {"log_wd": torch.tensor(-3.0)}

    def inner(p, h):
        return F.cross_entropy(f(p, x), y) + 0.5 * h["log_wd"].exp() * sum(
            (v**2).sum() for v in p.values()
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hg.implicit_hypergrad(
            inner, lambda p, h: F.cross_entropy(f(p, xv), yv), params, hparams,
            solver="minres", max_steps=5, stationarity_tol=None,
        )  # fmt: skip
    after = _state(net)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert int(after["1.num_batches_tracked"]) == 0


def test_as_function_modes_match_the_module_and_restore_its_flags():
    net = _net(dropout=0.0)
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(10, 8)
    params = hg.params_of(net)
    net[1].eval()  # a user's choice for one submodule, kept through every call
    flags = [m.training for m in net.modules()]
    out_eval = hg.as_function(net, mode="eval")(params, x)
    out_train = hg.as_function(net, mode="train")(params, x)
    assert [m.training for m in net.modules()] == flags
    reference = _net(dropout=0.0)
    reference.load_state_dict(net.state_dict())
    reference.eval()
    assert torch.equal(out_eval, reference(x))
    reference.train()
    assert torch.equal(out_train, reference(x))  # batch statistics
    with pytest.raises(hg.HypergradientError, match="mode"):
        hg.as_function(net, mode="inference")


def _loaders(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(96, 8, generator=gen), torch.randint(0, 3, (96,), generator=gen)
    xv = 3.0 + torch.randn(40, 8, generator=gen)  # shifted: its statistics would show
    yv = torch.randint(0, 3, (40,), generator=gen)
    train = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(list(zip(xv, yv)), batch_size=20, shuffle=True)
    return train, val


@pytest.mark.parametrize(
    "method",
    [
        hg.Implicit(),
        hg.Unrolled(steps=3),
        hg.AmortizedImplicit(max_steps=2, hessian="gauss_newton", damping=0.1),
    ],
)
def test_hyper_training_with_a_frozen_hyperparameter_is_plain_training_bit_for_bit(method):
    train, val = _loaders()
    decay = hg.hparams.WeightDecay("per_tensor", initial=1e-2)
    net = _net()
    torch.manual_seed(123)
    trainer = hg.BilevelTrainer(
        net, decay, train, val, torch.optim.SGD(net.parameters(), lr=0.1),
        hyper_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.0), method=method,
        hyper_every=2, seed=5, threads=torch.get_num_threads(),  # plain's count, for bitwise
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(6)
    assert all(r["hypergrad_norm"] > 0 for r in trainer.history)  # it did compute them

    # plain training: the same init, batches, dropout stream and decays, no hypergradient
    plain = _net()
    torch.manual_seed(123)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    stream = hg.train.BatchStream(train, 5)
    params = dict(plain.named_parameters())
    decays = {k: torch.tensor(1e-2).log().exp() for k in decay.decayed(params)}
    plain.train()
    for _ in range(12):
        x, y = stream.next()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y, reduction="none").mean().backward()
        with torch.no_grad():
            for k, d in decays.items():
                params[k].grad.addcmul_(d, params[k])
        opt.step()
    ours, theirs = _state(net), _state(plain)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    # and the statistics saw training batches only: 12 steps, means near the training data's
    assert int(ours["1.num_batches_tracked"]) == 12


def test_the_validation_loss_is_taken_in_eval_mode_unless_asked():
    train, val = _loaders()
    logged = {}
    for mode in ("eval", "train"):
        net = _net(dropout=0.0)
        trainer = hg.BilevelTrainer(
            net, hg.hparams.WeightDecay("global"), train, val,
            torch.optim.SGD(net.parameters(), lr=0.1), hyper_every=1, val_mode=mode,
        )  # fmt: skip
        trainer.fit(1)
        logged[mode] = trainer.history[0]["val_loss"]
    assert logged["eval"] != logged["train"]
    with pytest.raises(hg.HypergradientError, match="val_mode"):
        hg.BilevelTrainer(
            _net(), hg.hparams.WeightDecay("global"), train, val,
            torch.optim.SGD(_net().parameters(), lr=0.1), val_mode="test",
        )  # fmt: skip


def _newton_optimum(loss, params, hparams, steps=60):
    """The inner optimum in float64 by damped Newton on the flattened weights."""
    keys = list(params)
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]

    def unflat(theta):
        return {k: t.reshape(s) for k, t, s in zip(keys, theta.split(sizes), shapes)}

    def f(theta):
        return loss(unflat(theta), hparams)

    theta = torch.cat([params[k].reshape(-1) for k in keys]).detach()
    for _ in range(steps):
        g = torch.func.grad(f)(theta)
        if float(g.norm()) < 1e-13:
            break
        h = torch.func.hessian(f)(theta)
        theta = theta - torch.linalg.solve(h, g)
    return unflat(theta)


def test_the_hypergradient_through_batchnorm_is_the_derivative_of_the_eval_mode_loss():
    """Float64: implicit hypergradient (train-mode training loss at its optimum, eval-mode
    validation loss with the module's running statistics) against central differences of
    that validation loss, the inner problem re-solved by Newton at each perturbed value."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 4, generator=gen, dtype=torch.float64), torch.arange(30) % 3
    xv, yv = torch.randn(20, 4, generator=gen, dtype=torch.float64), torch.arange(20) % 3
    train_f, val_f = hg.as_function(net, mode="train"), hg.as_function(net, mode="eval")
    decay = hg.hparams.WeightDecay("per_tensor", include_biases=True)
    hparams = {k: torch.full_like(v, -1.5) for k, v in decay.init(hg.params_of(net)).items()}

    def inner(p, h):
        return F.cross_entropy(train_f(p, x), y) + decay.penalty(p, h)

    def outer(p, h):
        return F.cross_entropy(val_f(p, xv), yv)

    before = _state(net)
    optimum = _newton_optimum(inner, hg.params_of(net), hparams)
    grads = hg.implicit_hypergrad(inner, outer, optimum, hparams, solver="exact")
    eps = 1e-5
    for k in hparams:
        for i in range(hparams[k].numel()):
            values = []
            for sign in (1.0, -1.0):
                shifted = {kk: v.clone() for kk, v in hparams.items()}
                shifted[k].view(-1)[i] += sign * eps
                values.append(float(outer(_newton_optimum(inner, optimum, shifted), shifted)))
            fd = (values[0] - values[1]) / (2 * eps)
            assert fd == pytest.approx(float(grads[k].view(-1)[i]), rel=1e-5, abs=1e-9)
    after = _state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
