"""Real-time hyperparameter optimisation (RTHO): hg.hypergrad.RealTime, hg.train.RealTimeTrainer.

Exactness: with the hyperparameters held fixed, RTHO's hypergradient after t steps is the
forward-mode hypergradient of the first t steps (hg.unrolled_hypergrad(mode="forward") for
SGD and momentum; a torch.func.jvp through hg.diffopt.adam, an independent implementation,
for Adam), and matches central finite differences.  Tolerances: the references compute the
same float64 quantities by other operation orders, so they agree to ~1e-14 relative on these
well-conditioned problems (a few hundred ulps); 1e-8 is the issue's bound.  Finite
differences with h = 1e-5 have truncation error ~h^2 * |third derivative| ~ 1e-10 and
rounding ~1e-16 / h ~ 1e-11 relative: 1e-6 leaves margin.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.utils.data import DataLoader, TensorDataset

import hypergradient as hg
from hypergradient import HypergradientError
from hypergradient.hypergrad import RealTime

DT = torch.float64


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.randn(12, generator=g, dtype=DT)
    Xv = torch.randn(8, 3, generator=g, dtype=DT)
    yv = torch.randn(8, generator=g, dtype=DT)

    def inner(p, h):  # least squares plus a per-tensor decay on "w" (a hyperparameter)
        r = X @ p["w"] + p["b"] - y
        return 0.5 * (r**2).mean() + 0.5 * h["log_wd"].exp() * (p["w"] ** 2).sum()

    def outer(p, h):
        r = Xv @ p["w"] + p["b"] - yv
        return 0.5 * (r**2).mean()

    params0 = {"w": torch.randn(3, generator=g, dtype=DT), "b": torch.zeros(1, dtype=DT)}
    return inner, outer, params0


def _rel(a, b):
    num = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in b))
    return num / math.sqrt(sum(float((b[k] ** 2).sum()) for k in b))


def _lr(h, t):
    return h["log_lr"].exp()


def _run(rt, inner, params0, hparams, steps):
    state = rt.init(params0, hparams)
    for _ in range(steps):
        state = rt.step(state, inner, hparams)
    return state


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_matches_full_forward_mode_every_step(optimizer):
    inner, outer, params0 = _problem()
    hparams = {"log_lr": torch.tensor(-1.0, dtype=DT), "log_wd": torch.tensor(-2.0, dtype=DT)}
    momentum = None
    if optimizer == "momentum":
        hparams["mu"] = torch.tensor(0.7, dtype=DT)
        momentum = "mu"
    rt = RealTime(optimizer, lr=_lr, momentum=momentum)
    state = rt.init(params0, hparams)
    for t in range(1, 5):
        state = rt.step(state, inner, hparams)
        if t not in (1, 4):
            continue
        got = rt.hypergrad(state, outer, hparams)
        ref, w_ref = hg.unrolled_hypergrad(
            inner, outer, params0, hparams, steps=t, lr=_lr, momentum=momentum or 0.0,
            mode="forward", return_params=True,
        )  # fmt: skip
        assert _rel(got, ref) < 1e-8, (t, got, ref)
        assert _rel(state.params, w_ref) < 1e-12


def _adam_reference(inner, outer, params0, hparams, steps):
    """Forward mode through hg.diffopt.adam (torch.optim.Adam's rule), one JVP per hparam."""

    def objective(h):
        tx = hg.diffopt.adam(lr=h["log_lr"].exp(), betas=(h["beta1"], 0.99), eps=1e-8)
        w = dict(params0)
        state = tx.init(w)
        for _ in range(steps):
            grads = torch.func.grad(inner)(w, h)
            updates, state = tx.update(grads, state, w)
            w = hg.diffopt.apply_updates(w, updates)
        return outer(w, h)

    out = {}
    for k in hparams:
        tangent = {
            j: torch.zeros_like(v) if j != k else torch.ones_like(v) for j, v in hparams.items()
        }
        out[k] = jvp(objective, (hparams,), (tangent,))[1]
    return out


def test_adam_matches_full_forward_mode():
    inner, outer, params0 = _problem()
    hparams = {
        "log_lr": torch.tensor(-2.0, dtype=DT),
        "beta1": torch.tensor(0.8, dtype=DT),
        "log_wd": torch.tensor(-2.0, dtype=DT),
    }
    rt = RealTime("adam", lr=_lr, momentum="beta1", beta2=0.99, eps=1e-8)
    state = rt.init(params0, hparams)
    for t in range(1, 5):
        state = rt.step(state, inner, hparams)
        if t in (1, 4):
            ref = _adam_reference(inner, outer, params0, hparams, t)
            assert _rel(rt.hypergrad(state, outer, hparams), ref) < 1e-8, t


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_matches_central_finite_differences(optimizer):
    inner, outer, params0 = _problem()
    hparams = {"log_lr": torch.tensor(-1.5, dtype=DT), "log_wd": torch.tensor(-1.0, dtype=DT)}
    momentum = None
    if optimizer != "sgd":
        hparams["mu"] = torch.tensor(0.6, dtype=DT)
        momentum = "mu"
    rt = RealTime(optimizer, lr=_lr, momentum=momentum)
    steps = 3
    rt_state = _run(rt, inner, params0, hparams, steps)
    got = rt.hypergrad(rt_state, outer, hparams)

    def value(h):  # the same rule without tangents (the rule itself: test_steps_match_torch_optim)
        w = dict(params0)
        buffers = {b: {k: torch.zeros_like(v) for k, v in w.items()} for b in rt_state.buffers}
        lr_fn, mom_fn = rt._rules(h, DT, "test")
        for t in range(steps):
            w, buffers = rt._update(w, buffers, torch.func.grad(inner)(w, h), h, t, lr_fn, mom_fn)
        return float(outer(w, h))

    step = 1e-5
    for k in hparams:
        plus = {j: v + step if j == k else v for j, v in hparams.items()}
        minus = {j: v - step if j == k else v for j, v in hparams.items()}
        fd = (value(plus) - value(minus)) / (2 * step)
        assert abs(float(got[k]) - fd) <= 1e-6 * max(abs(fd), 1e-3), (k, float(got[k]), fd)


def test_steps_match_torch_optim():
    inner, _, params0 = _problem()
    hparams = {"log_wd": torch.tensor(-2.0, dtype=DT)}
    cases = [
        (RealTime("sgd", lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (
            RealTime("momentum", lr=0.1, momentum=0.9),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        ),
        (
            RealTime("adam", lr=0.05, momentum=0.8, beta2=0.99, eps=1e-6),
            lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99), eps=1e-6, foreach=False),
        ),
    ]  # fmt: skip
    for rt, make in cases:
        w = {k: v.clone().requires_grad_(True) for k, v in params0.items()}
        opt = make(list(w.values()))
        state = rt.init(params0, hparams)
        for _ in range(4):
            opt.zero_grad()
            inner(w, hparams).backward()
            opt.step()
            state = rt.step(state, inner, hparams)
        assert _rel(state.params, {k: v.detach() for k, v in w.items()}) < 1e-13, rt.optimizer


def test_changing_hparams_mid_run_is_the_derivative_of_the_piecewise_run():
    # RTHO keeps Z across hyper-updates: Z_t = dw_t/d(delta) for hyperparameters
    # lambda_s + delta at step s; the same run written with a per-step offset schedule.
    inner, outer, params0 = _problem()
    offsets = [0.0, 0.0, 0.3, 0.3, -0.2, -0.2]
    base = {"log_lr": torch.tensor(-1.2, dtype=DT), "log_wd": torch.tensor(-2.0, dtype=DT)}
    rt = RealTime("momentum", lr=_lr, momentum=0.5)
    state = rt.init(params0, base)
    for off in offsets:
        state = rt.step(state, inner, {**base, "log_lr": base["log_lr"] + off})
    got = rt.hypergrad(state, outer, base)
    ref = hg.unrolled_hypergrad(
        inner, outer, params0, base, steps=len(offsets),
        lr=lambda h, t: (h["log_lr"] + offsets[t]).exp(), momentum=0.5, mode="forward",
    )  # fmt: skip
    assert _rel(got, ref) < 1e-8


def test_hypergrad_at_step_zero_is_the_direct_term():
    inner, _, params0 = _problem()
    hparams = {"log_lr": torch.tensor(-1.0, dtype=DT), "scale": torch.tensor(2.0, dtype=DT)}

    def inner2(p, h):
        return inner(p, {"log_wd": torch.tensor(-2.0, dtype=DT)}) + 0 * h["scale"] * p["b"].sum()

    rt = RealTime("sgd", lr=_lr)
    state = rt.init(params0, hparams)
    g = rt.hypergrad(state, lambda p, h: h["scale"] ** 2 + p["w"].sum(), hparams)
    assert float(g["scale"]) == 4.0 and float(g["log_lr"]) == 0.0


# ------------------------------------------------------------------------ bad input


def test_unsupported_optimizer_is_refused():
    with pytest.raises(HypergradientError, match=r"optimizer='rmsprop'.*'sgd', 'momentum', 'adam'"):
        RealTime("rmsprop", lr=0.1)
    with pytest.raises(HypergradientError, match=r"plain SGD has no momentum"):
        RealTime("sgd", lr=0.1, momentum=0.9)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(HypergradientError, match=r"optimizer=RMSprop.*SGD.*Adam"):
        hg.train.RealTimeTrainer(model, [], [], torch.optim.RMSprop(model.parameters()))
    with pytest.raises(HypergradientError, match=r"nesterov"):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        hg.train.RealTimeTrainer(model, [], [], opt)


def test_unused_hyperparameter_is_refused():
    inner, outer, params0 = _problem()
    hparams = {"log_lr": torch.tensor(-1.0, dtype=DT), "log_wd": torch.tensor(-2.0, dtype=DT),
               "ghost": torch.tensor(1.0, dtype=DT)}  # fmt: skip
    rt = RealTime("momentum", lr=_lr, momentum=0.5)
    state = rt.step(rt.init(params0, hparams), inner, hparams)
    assert state.unused == ("ghost",)
    with pytest.raises(HypergradientError, match=r"\['ghost'\] affect neither"):
        rt.hypergrad(state, outer, hparams)


def test_nan_is_refused():
    inner, outer, params0 = _problem()
    rt = RealTime("sgd", lr=_lr)
    good = {"log_lr": torch.tensor(-1.0, dtype=DT), "log_wd": torch.tensor(-2.0, dtype=DT)}
    bad = {**good, "log_wd": torch.tensor(float("nan"), dtype=DT)}
    with pytest.raises(HypergradientError, match=r"hparams\['log_wd'\].*NaN"):
        rt.init(params0, bad)
    state = rt.init(params0, good)
    with pytest.raises(HypergradientError, match=r"hparams\['log_wd'\].*NaN"):
        rt.step(state, inner, bad)
    with pytest.raises(HypergradientError, match=r"params\['b'\].*NaN"):
        rt.init({**params0, "b": torch.full((1,), float("nan"), dtype=DT)}, good)

    def nan_loss(p, h):
        return inner(p, h) * float("nan")

    with pytest.raises(HypergradientError, match=r"inner_loss\(params, hparams\)` returned nan"):
        rt.step(state, nan_loss, good)  # first step: checked before tracing
    state = rt.step(state, inner, good)
    with pytest.raises(HypergradientError, match=r"loss at step 1 is nan \(not finite\)"):
        rt.step(state, nan_loss, good)  # later steps: checked on the traced value


def test_shape_and_schedule_errors():
    inner, _, params0 = _problem()
    hparams = {"log_lr": torch.tensor(-1.0, dtype=DT), "log_wd": torch.tensor(-2.0, dtype=DT)}
    rt = RealTime("sgd", lr=_lr)
    state = rt.init(params0, hparams)
    with pytest.raises(HypergradientError, match=r"'extra': \(3,\)\}.*not those.*2 rows"):
        rt.step(state, inner, {**hparams, "extra": torch.ones(3, dtype=DT)})
    renamed = {"log_lr": hparams["log_lr"], "log_decay": hparams["log_wd"]}
    with pytest.raises(HypergradientError, match=r"'log_decay': \(\)\} .*not those"):
        rt.hypergrad(state, lambda p, h: p["w"].sum(), renamed)
    schedule = {**hparams, "lrs": torch.full((5,), 0.1, dtype=DT)}
    with pytest.raises(HypergradientError, match=r"lr='lrs'.*must be a scalar"):
        RealTime("sgd", lr="lrs").init(params0, schedule)


# ------------------------------------------------------------------------ trainer


def _loaders():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g))
    return DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=24)


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_trainer_tunes_and_writes_back(kind):
    train, val = _loaders()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    if kind == "momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.999))
    trainer = hg.train.RealTimeTrainer(
        model, train, val, opt, hyper=hg.hparams.WeightDecay("per_tensor"), hyper_every=2,
        hyper_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
    )  # fmt: skip
    assert sorted(trainer.hparams) == ["log_lr", "log_wd.bias", "log_wd.weight", "logit_momentum"]
    start = {k: float(v.detach()) for k, v in trainer.hparams.items()}
    history = trainer.fit(2)
    assert [r["inner_step"] for r in history] == [2, 4]
    assert all(float(v.detach()) != start[k] for k, v in trainer.hparams.items())  # all moved
    for k, p in model.named_parameters():  # the model holds RTHO's weights
        assert torch.equal(p.detach(), trainer.state.params[k])
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(
        math.exp(float(trainer.hparams["log_lr"].detach())), rel=1e-6
    )
    mom = group["momentum"] if kind == "momentum" else group["betas"][0]
    assert mom == pytest.approx(
        1 / (1 + math.exp(-float(trainer.hparams["logit_momentum"].detach())))
    )


def test_trainer_bad_input():
    train, val = _loaders()
    model = torch.nn.Linear(4, 3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(HypergradientError, match=r"no momentum to tune"):
        hg.train.RealTimeTrainer(model, train, val, sgd)
    with pytest.raises(HypergradientError, match=r"tune=\('lr', 'decay'\)"):
        hg.train.RealTimeTrainer(model, train, val, sgd, tune=("lr", "decay"))
    with pytest.raises(HypergradientError, match=r"nothing to tune"):
        hg.train.RealTimeTrainer(model, train, val, sgd, tune=())
    with pytest.raises(HypergradientError, match=r"hyper_every=0"):
        hg.train.RealTimeTrainer(model, train, val, sgd, tune=("lr",), hyper_every=0)
    trainer = hg.train.RealTimeTrainer(model, train, val, sgd, tune=("lr",))
    with pytest.raises(HypergradientError, match=r"fit\(hyper_steps=-1\)"):
        trainer.fit(-1)
    assert F.cross_entropy is trainer.criterion
