"""Hyper-optimizer towers (Chandra et al. 2022): exactness, hypergradients, ergonomics.

* (a) With hyper-learning rates 0, a tower IS its base ``torch.optim`` optimizer, step by
  step, for each of SGD, SGD with momentum, Adam, AdaGrad and RMSProp.
* (b) The hypergradients: analytic for SGD on a quadratic (-g_t . g_{t-1}, and its product
  rule one level up), central finite differences of torch.optim runs for the others.
* (c) Every level of towers of height 1..4 receives non-zero hypergradients and moves
  (the trap: hyperparameters created without requires_grad stop a tower at height 2).
* (d) lr schedulers, state_dict round trip (bit for bit), closures, errors.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _readme
from hypergradient import HypergradientError
from hypergradient.diffopt import alias
from hypergradient.optimizers import towers


def regression(seed: int = 0, dead_feature: bool = True):
    """A 4-6-2 tanh MLP on random regression data.  With ``dead_feature`` the first input is
    identically zero, so a column of the first layer's weight gets exactly-zero gradients
    (zero second moments: the square-root trap for Adam/RMSProp/AdaGrad hypergradients)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 4, generator=gen)
    y = torch.randn(24, 2, generator=gen)
    if dead_feature:
        x[:, 0] = 0.0

    def make_model() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))

    def loss_fn(model: nn.Module) -> torch.Tensor:
        return F.mse_loss(model(x), y)

    return make_model, loss_fn


def train_step(opt, model, loss_fn):
    opt.zero_grad()
    loss = loss_fn(model)
    loss.backward()
    opt.step()
    return loss.detach()


# (id, tower class, torch.optim class, options accepted by both)
BASES = [
    ("sgd", towers.SGD, torch.optim.SGD, {"lr": 0.1}),
    ("sgd-momentum", towers.SGD, torch.optim.SGD,
     {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("sgd-nesterov", towers.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    ("adam", towers.Adam, torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99),
                                             "weight_decay": 0.01}),
    ("adam-amsgrad", towers.Adam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    ("adagrad", towers.AdaGrad, torch.optim.Adagrad,
     {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("rmsprop", towers.RMSProp, torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.9}),
    ("rmsprop-centered-momentum", towers.RMSProp, torch.optim.RMSprop,
     {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.01}),
]  # fmt: skip
BASE_IDS = [b[0] for b in BASES]


# ------------------------------------------------------------- (a) equal to torch.optim


@pytest.mark.parametrize("name,tower_cls,torch_cls,config", BASES, ids=BASE_IDS)
def test_tower_with_zero_hyper_lr_is_torch_optim(name, tower_cls, torch_cls, config):
    make_model, loss_fn = regression()
    model, ref_model, nudged_model = make_model(), make_model(), make_model()
    # height 3, two different hyper-optimizers, all hyper-learning rates 0
    opt = tower_cls(model.parameters(), **config,
                    optimizer=towers.SGD(lr=0.0, optimizer=towers.Adam(lr=0.0)))  # fmt: skip
    ref = torch_cls(ref_model.parameters(), foreach=False, **config)
    # The tower does the same operations as torch.optim but `p + (-lr * d)` instead of
    # torch's fused `p.add_(d, alpha=-lr)`: one rounding (relative eps) apart per step.  How
    # far that carries depends on the run's condition: where RMSProp's sqrt(v) shrinks
    # below lr x curvature (steps ~25-35 here) each step multiplies a deviation by ~3, 1e4
    # in all.  Measure it: `nudged` is torch.optim started one rounding away (x (1 + eps)).
    # Each of the 60 steps' roundings is amplified at most like that one, so the tolerance
    # is 60 x the nudged run's largest deviation so far; 1e-12 where nothing is amplified.
    with torch.no_grad():
        for q in nudged_model.parameters():
            q.mul_(1 + torch.finfo(q.dtype).eps)
    nudged = torch_cls(nudged_model.parameters(), foreach=False, **config)
    start = opt.hparams
    spread = 0.0
    for step in range(60):
        train_step(opt, model, loss_fn)
        train_step(ref, ref_model, loss_fn)
        train_step(nudged, nudged_model, loss_fn)
        with torch.no_grad():
            pairs = zip(ref_model.parameters(), nudged_model.parameters())
            spread = max(spread, *(float((q - r).abs().max()) for q, r in pairs))
        tol = max(1e-12, 60 * spread)
        for (k, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=tol, msg=f"{name} {step} {k}")
    for p, q in zip(model.parameters(), ref_model.parameters()):  # same state, same names
        for key, value in ref.state[q].items():
            if key != "step":
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-12, atol=tol)
    assert opt.hparams == start  # nothing moved the hyperparameters...
    grads = opt.last_hypergradients[0]
    assert all(g is not None and g != 0.0 for g in grads.values()), grads  # ...yet it ran
    assert opt.levels[1].last_hypergradients[0]["lr"] != 0.0


def test_height_one_is_torch_optim_without_any_graph():
    make_model, loss_fn = regression()
    model, ref_model = make_model(), make_model()
    opt = towers.Adam(model.parameters(), lr=0.01)
    ref = torch.optim.Adam(ref_model.parameters(), lr=0.01, foreach=False)
    for _ in range(20):
        train_step(opt, model, loss_fn)
        train_step(ref, ref_model, loss_fn)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)  # see the test above
    assert opt._pending is None and opt._record is None  # plain optimizer: nothing kept
    assert opt.levels == (opt,) and opt.last_hypergradients == [{}]


# ------------------------------------------------------------- (b) the hypergradients


def test_sgd_tower_hypergradients_are_analytic_on_a_quadratic():
    # L(w) = 1/2 (w - c)^T A (w - c), gradient g = A (w - c).  Level 0 moved
    # w_t = w_{t-1} - lr g_{t-1}, so dL_t/dlr = -g_t . g_{t-1} (Baydin et al.).  Level 1
    # moved lr_{t-1} = lr' - k1 * hg0_{t-1}, so dL_t/dk1 = hg0_t * (-hg0_{t-1}).
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=gen)
    a = m @ m.T / 5 + 0.1 * torch.eye(5)
    c = torch.randn(5, generator=gen)
    w = nn.Parameter(torch.zeros(5))
    opt = towers.SGD([w], lr=0.05, optimizer=towers.SGD(lr=1e-3, optimizer=towers.SGD(lr=1e-4)))
    grads, hg0, lrs, k1s = [], [], [], []
    for t in range(12):
        opt.zero_grad()
        (0.5 * (w - c) @ a @ (w - c)).backward()
        grads.append(w.grad.clone())
        opt.step()
        hg0.append(opt.last_hypergradients[0]["lr"])
        lrs.append(opt.param_groups[0]["lr"])
        k1s.append(opt.levels[1].param_groups[0]["lr"])
        if t == 0:
            assert hg0[0] is None  # no previous update yet
            continue
        expected = -float(grads[t] @ grads[t - 1])
        assert math.isclose(hg0[t], expected, rel_tol=1e-12), (t, hg0[t], expected)
        # lr_t = lr_{t-1} - k1_t * hg0_t with the level-1 lr already updated this step
        assert math.isclose(lrs[t], lrs[t - 1] - k1s[t] * hg0[t], rel_tol=1e-12)
        hg1 = opt.levels[1].last_hypergradients[0]["lr"]
        if t == 1:
            assert hg1 is None  # level 1 has not moved lr yet: no path to k1
        else:
            assert math.isclose(hg1, hg0[t] * -hg0[t - 1], rel_tol=1e-12), (t, hg1)
    assert lrs[-1] != lrs[0] and k1s[-1] != k1s[0]


FD_CASES = [b for b in BASES if b[0] not in ("sgd",)]


@pytest.mark.parametrize("name,tower_cls,torch_cls,config", FD_CASES, ids=[b[0] for b in FD_CASES])
def test_hypergradients_match_finite_differences_of_torch_optim(name, tower_cls, torch_cls, config):
    make_model, loss_fn = regression()
    model, ref_model = make_model(), make_model()
    opt = tower_cls(model.parameters(), **config, optimizer=towers.SGD(lr=0.0))
    tune = opt.tune  # the defaults: all but a momentum that is 0 (torch keeps no buffer then)
    ref = torch_cls(ref_model.parameters(), foreach=False, **config)
    for _ in range(4):
        train_step(opt, model, loss_fn)
        train_step(ref, ref_model, loss_fn)
    weights = [p.detach().clone() for p in ref_model.parameters()]
    saved = copy.deepcopy(ref.state_dict())
    train_step(opt, model, loss_fn)  # update 5, with hyperparameters h
    train_step(opt, model, loss_fn)  # its hypergradient: dL(w_6)/dh through update 5
    hypergrads = opt.last_hypergradients[0]

    def loss_after_update_5(hparam: str, delta: float) -> float:
        probe = make_model()
        with torch.no_grad():
            for p, w in zip(probe.parameters(), weights):
                p.copy_(w)
        probe_opt = torch_cls(probe.parameters(), foreach=False, **config)
        probe_opt.load_state_dict(copy.deepcopy(saved))
        group = probe_opt.param_groups[0]
        opt._put(group, hparam, opt._read(group, hparam) + delta)
        train_step(probe_opt, probe, loss_fn)
        return float(loss_fn(probe).detach())

    assert set(hypergrads) == set(tune)
    eps = 1e-6
    for hparam in tune:
        fd = (loss_after_update_5(hparam, eps) - loss_after_update_5(hparam, -eps)) / (2 * eps)
        # central differences in float64: truncation ~eps^2, rounding ~1e-16/eps = 1e-10
        assert math.isclose(hypergrads[hparam], fd, rel_tol=1e-6, abs_tol=1e-8), (
            hparam, hypergrads[hparam], fd)  # fmt: skip
        assert hypergrads[hparam] != 0.0


def test_adam_hypergradients_stay_finite_where_the_second_moment_is_zero(monkeypatch):
    # The dead input feature gives weights whose gradient, m and v are exactly 0.
    # d sqrt(v)/dv = inf there, and inf * 0 = NaN would reach d update / d beta2.
    make_model, loss_fn = regression(dead_feature=True)

    def run() -> list:
        model = make_model()
        top = towers.Adam(lr=1e-3, optimizer=towers.Adam(lr=1e-4))
        opt = towers.Adam(model.parameters(), lr=0.01, optimizer=top)
        for _ in range(8):
            train_step(opt, model, loss_fn)
        return [g for level in opt.levels[:-1] for g in level.last_hypergradients[0].values()]

    assert all(math.isfinite(g) and g != 0.0 for g in run())
    # the contrast that makes this test meaningful: with torch.sqrt the tower breaks
    monkeypatch.setattr(alias, "safe_sqrt", torch.sqrt)
    with pytest.raises(HypergradientError, match=r"betas\[1\]` of level 0 .* became nan"):
        run()


# ------------------------------------------------------------- (c) every level moves


def sgd_tower(params, height: int):
    lrs = [0.05, 1e-2, 1e-3, 1e-4]
    return towers.stack([towers.SGD(params, lr=lrs[0])] + [towers.SGD(lr=v) for v in lrs[1:height]])


def mixed_tower(params, kinds: str):
    makers = {
        "sgd": lambda p, lr: towers.SGD(p, lr=lr, momentum=0.5),
        "adam": lambda p, lr: towers.Adam(p, lr=lr, betas=(0.8, 0.9)),
        "adagrad": lambda p, lr: towers.AdaGrad(p, lr=lr),
        "rmsprop": lambda p, lr: towers.RMSProp(p, lr=lr, alpha=0.9),
    }
    lrs = [0.01, 1e-3, 1e-4, 1e-5]
    names = kinds.split("/")
    levels = [makers[names[0]](params, lrs[0])]
    levels += [makers[n](None, lr) for n, lr in zip(names[1:], lrs[1:])]
    return towers.stack(levels)


TOWERS = [(f"sgd-height-{h}", lambda p, h=h: sgd_tower(p, h)) for h in (1, 2, 3, 4)] + [
    (kinds, lambda p, kinds=kinds: mixed_tower(p, kinds))
    for kinds in (
        "adam/rmsprop/sgd/adagrad",
        "rmsprop/adagrad/adam/sgd",
        "adagrad/sgd/rmsprop/adam",
    )
]


@pytest.mark.parametrize("build", [t[1] for t in TOWERS], ids=[t[0] for t in TOWERS])
def test_every_level_below_the_top_receives_hypergradients_and_moves(build):
    make_model, loss_fn = regression()
    model = make_model()
    opt = build(model.parameters())
    start = [level.hparams[0] for level in opt.levels]
    losses = [train_step(opt, model, loss_fn) for _ in range(8)]  # level k starts at step k+2
    height = len(opt.levels)
    for k, level in enumerate(opt.levels):
        now = level.hparams[0]
        if k == height - 1:  # the top level is fixed and nothing differentiates it
            assert now == start[k] and level.last_hypergradients == [{}]
            continue
        for name in level.tune:
            grad = level.last_hypergradients[0][name]
            assert grad is not None and math.isfinite(grad) and grad != 0.0, (k, name, grad)
            assert now[name] != start[k][name], (k, name)
    assert losses[-1] < losses[0]


def test_a_third_level_changes_the_run():
    # the failure mode of the calibration: a height-3 tower identical to height 2
    make_model, loss_fn = regression()
    finals = []
    for height in (2, 3):
        model = make_model()
        opt = sgd_tower(model.parameters(), height)
        for _ in range(10):
            train_step(opt, model, loss_fn)
        finals.append((opt.param_groups[0]["lr"], next(model.parameters()).detach().clone()))
    assert finals[0][0] != finals[1][0]
    assert not torch.equal(finals[0][1], finals[1][1])


def test_tuned_values_are_projected_into_their_range():
    # L = w^2 / 2 from w = 1 with lr = 1.5 overshoots: g_2 . g_1 = -0.5, so the hyper-step
    # lr - 10 * 0.5 = -3.5 is projected to 0; the step after, lr = 0 + 10 * 0.25 = 2.5.
    w = nn.Parameter(torch.ones(()))
    opt = towers.SGD([w], lr=1.5, optimizer=towers.SGD(lr=10.0))
    lrs = []
    for _ in range(3):
        opt.zero_grad()
        (0.5 * w**2).backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.5, 0.0, 2.5]
    # a momentum pushed past 1 stays at 1 - 1e-6 (and at 0 from below)
    make_model, loss_fn = regression()
    model = make_model()
    opt = towers.SGD(model.parameters(), lr=0.01, momentum=0.5, tune="momentum",
                     optimizer=towers.SGD(lr=1e4))  # fmt: skip
    momenta = []
    for _ in range(6):
        train_step(opt, model, loss_fn)
        momenta.append(opt.param_groups[0]["momentum"])
    assert all(0.0 <= m <= 1 - 1e-6 for m in momenta)
    assert {0.0, 1 - 1e-6} & set(momenta), momenta


# ------------------------------------------------------------- (d) ergonomics


def test_step_lr_scheduler_on_a_zero_hyper_lr_tower_is_torch():
    make_model, loss_fn = regression()
    model, ref_model = make_model(), make_model()
    opt = towers.SGD(model.parameters(), lr=0.1, momentum=0.9, optimizer=towers.SGD(lr=0.0))
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt, ref)]
    for _ in range(10):
        for o, m, s in zip((opt, ref), (model, ref_model), schedules):
            train_step(o, m, loss_fn)
            s.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    assert ref.param_groups[0]["lr"] == 0.1 * 0.5**3
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)  # see the (a) test


def test_a_multiplicative_scheduler_scales_the_learned_lr():
    make_model, loss_fn = regression()
    model = make_model()
    kappa = 0.05
    opt = towers.SGD(model.parameters(), lr=0.1, optimizer=towers.SGD(lr=kappa))
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    for t in range(6):
        before = opt.param_groups[0]["lr"]  # the value the scheduler left
        weights = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss_fn(model).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        learned = opt.param_groups[0]["lr"]
        hg = opt.last_hypergradients[0]["lr"]
        # the hyper-step starts from the scheduled value ...
        expected = before if t == 0 else before - kappa * hg
        assert math.isclose(learned, expected, rel_tol=1e-14)
        # ... and the weights move with the learned lr
        for p, w, g in zip(model.parameters(), weights, grads):
            torch.testing.assert_close(p, w - learned * g, rtol=1e-13, atol=1e-14)
        schedule.step()
        assert math.isclose(opt.param_groups[0]["lr"], 0.8 * learned, rel_tol=1e-15)
        assert schedule.get_last_lr() == [opt.param_groups[0]["lr"]]


def full_tower(params):
    # Adam with weight decay at the base (the record then keeps the weights), a momentum
    # SGD and an RMSProp above it
    return towers.Adam(params, lr=0.01, weight_decay=0.01,
                       optimizer=towers.SGD(lr=1e-3, momentum=0.5,
                                            optimizer=towers.RMSProp(lr=1e-4)))  # fmt: skip


def test_state_dict_round_trip_continues_bit_for_bit():
    make_model, loss_fn = regression()
    model = make_model()
    opt = full_tower(model.parameters())
    for _ in range(5):
        train_step(opt, model, loss_fn)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors, floats, lists, dicts
    restored_model = make_model()
    restored_model.load_state_dict(saved["model"])
    restored = full_tower(restored_model.parameters())
    restored.load_state_dict(saved["opt"])
    assert set(restored.state[next(restored_model.parameters())]) == {"step", "exp_avg",
                                                                      "exp_avg_sq"}  # fmt: skip
    for _ in range(5):
        train_step(opt, model, loss_fn)
        train_step(restored, restored_model, loss_fn)
        for p, q in zip(model.parameters(), restored_model.parameters()):
            assert torch.equal(p, q)
        assert [lv.hparams for lv in opt.levels] == [lv.hparams for lv in restored.levels]
        assert [lv.last_hypergradients for lv in opt.levels] == [
            lv.last_hypergradients for lv in restored.levels
        ]


def test_deepcopy_of_model_and_tower_continues_identically():
    make_model, loss_fn = regression()
    model = make_model()
    opt = full_tower(model.parameters())
    for _ in range(3):
        train_step(opt, model, loss_fn)
    model2, opt2 = copy.deepcopy((model, opt))
    for _ in range(3):
        train_step(opt, model, loss_fn)
        train_step(opt2, model2, loss_fn)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.levels[2].param_groups[0]["params"] is opt2.levels[1]._slots


def test_closure_and_create_graph_give_the_same_run_as_a_plain_loop():
    make_model, loss_fn = regression()
    runs = []
    for mode in ("plain", "closure", "create_graph"):
        model = make_model()
        opt = full_tower(model.parameters())
        for _ in range(6):
            if mode == "closure":

                def closure(model=model, opt=opt):
                    opt.zero_grad()
                    loss = loss_fn(model)
                    loss.backward()
                    return loss

                assert torch.is_tensor(opt.step(closure))
            else:
                opt.zero_grad()
                with warnings.catch_warnings():  # torch warns about the grad <-> param cycle
                    warnings.filterwarnings("ignore", message=".*create_graph=True")
                    loss_fn(model).backward(create_graph=mode == "create_graph")
                opt.step()
        runs.append([p.detach().clone() for p in model.parameters()] + [opt.hparams[0]["lr"]])
        for p in model.parameters():
            p.grad = None  # a create_graph gradient references itself: free the cycle
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_zero_grad_without_set_to_none_does_not_corrupt_the_kept_graph():
    make_model, loss_fn = regression()
    results = []
    for set_to_none in (True, False):
        model = make_model()
        opt = full_tower(model.parameters())
        for _ in range(5):
            opt.zero_grad(set_to_none=set_to_none)  # False zeroes .grad in place
            loss_fn(model).backward()
            opt.step()
        results.append(opt.hparams[0])
    assert results[0] == results[1]


def test_a_param_group_added_later_is_tuned_too():
    make_model, loss_fn = regression()
    model = make_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = towers.SGD(first, lr=0.05, optimizer=towers.SGD(lr=1e-2))
    train_step(opt, model, loss_fn)
    opt.add_param_group({"params": second, "lr": 0.02})
    assert len(opt.levels[1].param_groups[0]["params"]) == 2
    for _ in range(4):
        train_step(opt, model, loss_fn)
    assert opt.param_groups[1]["lr"] != 0.02
    assert opt.last_hypergradients[1]["lr"] not in (None, 0.0)


README_EXAMPLE = _readme.example(
    "from hypergradient.optimizers import towers",
    levels="[type(level).__name__ for level in opt.levels]",
    lr="opt.param_groups[0]['lr']",
)


def test_readme_towers_example_runs():
    values = README_EXAMPLE.run().values  # in a fresh interpreter, as a reader pastes it
    assert values["levels"] == ["SGD", "Adam", "SGD"]
    assert values["lr"] != 0.01  # the tower moved the learning rate


# ------------------------------------------------------------- errors


def _params():
    return [nn.Parameter(torch.zeros(3))]


def _reuse_hyper():
    hyper = towers.SGD(lr=1e-3)
    towers.SGD(_params(), optimizer=hyper)
    towers.SGD(_params(), optimizer=hyper)


def _stacked():
    base = towers.SGD(_params(), optimizer=towers.SGD(lr=1e-3))
    return base


ERRORS = [
    (lambda: towers.SGD(_params(), lr=-0.1), r"`lr` must be in \[0, inf\), got -0.1"),
    (lambda: towers.SGD(_params(), lr=torch.tensor(0.1)), r"`lr` must be a Python float, got Ten"),
    (lambda: towers.SGD(_params(), lr=True), r"`lr` must be a Python float, got bool"),
    (lambda: towers.SGD(_params(), lr=math.nan), r"`lr` must be in \[0, inf\), got nan"),
    (lambda: towers.SGD(_params(), momentum=1.0), r"`momentum` must be in \[0, 1\), got 1.0"),
    (lambda: towers.SGD(_params(), nesterov=True), r"nesterov=True needs momentum > 0"),
    (lambda: towers.SGD(_params(), nesterov=1), r"`nesterov` must be a bool, got int"),
    (lambda: towers.Adam(_params(), betas=(0.9, 1.0)), r"`betas\[1\]` must be in \[0, 1\)"),
    (lambda: towers.Adam(_params(), betas=0.9), r"`betas` must be a pair"),
    (lambda: towers.Adam(_params(), eps=-1.0), r"`eps` must be in \[0, inf\)"),
    (lambda: towers.AdaGrad(_params(), lr_decay=-1.0), r"`lr_decay` must be in"),
    (lambda: towers.RMSProp(_params(), alpha=1.0), r"`alpha` must be in \[0, 1\)"),
    (lambda: towers.RMSProp(_params(), centered="yes"), r"`centered` must be a bool"),
    (lambda: towers.SGD([{"params": _params()}, {"params": _params(), "lr": -1.0}]),
     r"param group 1: `lr` must be in"),
    (lambda: towers.Adam(_params(), tune=("gamma",)),
     r"unknown hyperparameter 'gamma'; Adam can tune \('lr', 'beta1', 'beta2'\)"),
    (lambda: towers.Adam(_params(), tune=("lr", "lr")), r"a name appears twice"),
    (lambda: towers.Adam(_params(), tune=5), r"`tune` must be a tuple of names"),
    (lambda: towers.SGD(_params(), momentum=0.9999999, optimizer=towers.SGD()),
     r"`momentum` = 0.9999999 is tuned .* keeps it in \[0, 0.999999\]"),
    (lambda: towers.SGD(_params(), tune=(), optimizer=towers.SGD()), r"nothing to tune \(tune="),
    (lambda: towers.SGD(_params(), optimizer=torch.optim.SGD(_params())),
     r"got torch.optim.sgd.SGD. A torch.optim optimizer cannot tune"),
    (lambda: towers.SGD(_params(), optimizer=towers.SGD(_params())), r"was built with params"),
    (_reuse_hyper, r"already tunes another optimizer"),
    (lambda: towers.SGD([]), r"`params` is empty"),
    (lambda: towers.SGD(nn.Parameter(torch.zeros(2))), r"got a single tensor"),
    (lambda: towers.SGD(5), r"`params` must be an iterable .* got int"),
    (lambda: towers.SGD(lr=1e-3).step(), r"built without params, so it can only tune"),
    (lambda: _stacked().levels[1].step(), r"this is level 1 of a tower; call step\(\) on"),
    (lambda: _stacked().levels[1].add_param_group({"params": []}), r"exactly one param group"),
    (lambda: towers.stack([]), r"`levels` is empty"),
    (lambda: towers.stack([towers.SGD(lr=0.1), towers.SGD()]), r"levels\[0\] must be built"),
    (lambda: towers.stack([towers.SGD(_params()), "sgd"]), r"levels\[1\] must be a hyper"),
    (lambda: towers.stack([_stacked().levels[1]]), r"levels\[0\] .* is already part of a tower"),
]  # fmt: skip


@pytest.mark.parametrize("make,message", ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_bad_inputs_raise_clear_errors(make, message):
    with pytest.raises(HypergradientError, match=message):
        make()


def test_load_state_dict_of_another_tower_is_refused():
    make_model, _ = regression()
    model = make_model()
    saved = full_tower(model.parameters()).state_dict()
    with pytest.raises(
        HypergradientError, match=r"saved from a tower \['Adam', 'SGD', 'RMSProp'\]"
    ):
        towers.Adam(model.parameters(), optimizer=towers.SGD()).load_state_dict(saved)
    with pytest.raises(HypergradientError, match=r"saved from a tower \['\(plain\)'\]"):
        full_tower(model.parameters()).load_state_dict(
            torch.optim.Adam(model.parameters()).state_dict()
        )


def test_a_diverging_hypergradient_is_reported_not_propagated():
    make_model, loss_fn = regression()
    model = make_model()
    opt = towers.SGD(model.parameters(), lr=0.05, optimizer=towers.SGD(lr=1e-3))
    train_step(opt, model, loss_fn)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fn(model).backward()
    next(model.parameters()).grad[0, 0] = math.nan
    with pytest.raises(
        HypergradientError, match=r"`lr` of level 0 .* became nan .* lower the lear"
    ):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing applied
    assert opt.param_groups[0]["lr"] == 0.05


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(5, 2, sparse=True)
    opt = towers.SGD(emb.parameters(), lr=0.1, optimizer=towers.SGD(lr=1e-3))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(HypergradientError, match="sparse gradient"):
        opt.step()
