"""Functional optimizers: equal to torch.optim step by step, differentiable, finite."""

from __future__ import annotations

import math

import pytest
import torch

from hypergradient._errors import HypergradientError
from hypergradient.diffopt import (
    OPTIMIZERS,
    AdamState,
    GradientTransformation,
    SGDState,
    adagrad,
    adam,
    apply_updates,
    chain,
    detach_state,
    rmsprop,
    safe_sqrt,
    sgd,
)

DTYPE = torch.float64
CASES = [(name, i) for name, info in OPTIMIZERS.items() for i in range(len(info.configs))]
CASE_IDS = [f"{name}-{i}" for name, i in CASES]


def make_problem(seed: int = 0, dead_feature: bool = True):
    """A one-hidden-layer regression net.  With ``dead_feature`` the first input feature
    is identically 0 and so is the first row of ``w1``: that row gets an exactly-zero
    gradient at every step (also with weight decay), the trap for sqrt-based optimizers."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 4, generator=gen, dtype=DTYPE)
    y = torch.randn(24, 2, generator=gen, dtype=DTYPE)
    params = {
        "w1": 0.5 * torch.randn(4, 6, generator=gen, dtype=DTYPE),
        "b1": 0.1 * torch.randn(6, generator=gen, dtype=DTYPE),
        "w2": 0.5 * torch.randn(6, 2, generator=gen, dtype=DTYPE),
        "b2": torch.zeros(2, dtype=DTYPE),
    }
    if dead_feature:
        x[:, 0] = 0.0
        params["w1"][0] = 0.0

    def loss_fn(p):
        hidden = torch.tanh(x @ p["w1"] + p["b1"])
        return ((hidden @ p["w2"] + p["b2"] - y) ** 2).mean()

    return params, loss_fn


def grads_of(loss_fn, params, create_graph=False):
    if not create_graph:
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss = loss_fn(params)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return dict(zip(params, grads, strict=True))


def unroll(tx: GradientTransformation, params0, loss_fn, steps: int):
    """Meta-loss: training loss after ``steps`` differentiable updates from ``params0``."""
    params = {k: v.clone().requires_grad_() for k, v in params0.items()}
    state = tx.init(params)
    for _ in range(steps):
        grads = grads_of(loss_fn, params, create_graph=True)
        updates, state = tx.update(grads, state, params)
        params = apply_updates(params, updates)
    return loss_fn(params)


def as_tensors(config, requires_grad=False):
    """Every float hyperparameter of ``config`` as a 0-d float64 tensor."""

    def conv(v):
        if isinstance(v, float):
            return torch.tensor(v, dtype=DTYPE, requires_grad=requires_grad)
        if isinstance(v, tuple):
            return tuple(conv(x) for x in v)
        return v

    return {k: conv(v) for k, v in config.items()}


def tensor_leaves(config):
    out = []
    for v in config.values():
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, torch.Tensor):
                out.append(x)
    return out


def run_side_by_side(tx, opt, torch_params, params, loss_fn, steps=20, before_step=None):
    names = list(params)
    state = tx.init(params)
    for step in range(steps):
        if before_step is not None:
            before_step(step, opt)
        grads = grads_of(loss_fn, params)
        updates, state = tx.update(grads, state, params)
        params = apply_updates(params, updates)
        opt.zero_grad()
        loss_fn(dict(zip(names, torch_params, strict=True))).backward()
        opt.step()
        for name, theirs in zip(names, torch_params, strict=True):
            torch.testing.assert_close(
                params[name], theirs.detach(), atol=1e-12, rtol=0, msg=f"step {step} {name}"
            )
    return params


# ------------------------------------------------------------------ equal to torch.optim


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("name,idx", CASES, ids=CASE_IDS)
def test_matches_torch_optim_for_20_steps(name, idx, as_tensor):
    info = OPTIMIZERS[name]
    config = info.configs[idx]
    params0, loss_fn = make_problem()
    torch_params = [p.clone().requires_grad_() for p in params0.values()]
    opt = info.torch_cls(torch_params, foreach=False, **config)
    tx = info.factory(**(as_tensors(config, requires_grad=True) if as_tensor else config))
    params = run_side_by_side(tx, opt, torch_params, dict(params0), loss_fn)
    # The dead row never moves (its gradient is exactly zero at every step).
    assert torch.equal(params["w1"][0], torch.zeros(6, dtype=DTYPE))


def test_registry_shape():
    assert set(OPTIMIZERS) == {"sgd", "adam", "rmsprop", "adagrad"}
    for info in OPTIMIZERS.values():
        assert issubclass(info.torch_cls, torch.optim.Optimizer)
        assert len(info.configs) >= 3
        factory, torch_cls, configs = info  # unpacks like a tuple
        assert callable(factory) and configs is info.configs


def test_bare_tensor_params_equal_dict_params():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, generator=gen, dtype=DTYPE)
    g = torch.randn(5, generator=gen, dtype=DTYPE)
    tx = adam(lr=0.1, weight_decay=0.1, amsgrad=True)
    u_t, s_t = tx.update(g, tx.init(w), w)
    u_d, s_d = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
    assert isinstance(u_t, torch.Tensor)
    assert torch.equal(u_t, u_d["w"]) and torch.equal(s_t.exp_avg_sq, s_d.exp_avg_sq["w"])
    assert torch.equal(apply_updates(w, u_t), w + u_t)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_is_pure(name):
    """No input (params, grads, state buffers) is modified in place."""
    info = OPTIMIZERS[name]
    params, loss_fn = make_problem()
    tx = info.factory(**info.configs[-1])
    state = tx.init(params)
    for _ in range(2):
        grads = grads_of(loss_fn, params)
        watched = [*params.values(), *grads.values(), *_leaves(state)]
        versions = [t._version for t in watched]
        copies = [t.clone() for t in watched]
        updates, new_state = tx.update(grads, state, params)
        assert [t._version for t in watched] == versions
        assert all(torch.equal(a, b) for a, b in zip(watched, copies, strict=True))
        assert type(new_state) is type(state) and int(new_state.count) == int(state.count) + 1
        params, state = apply_updates(params, updates), new_state


def test_sgd_state_does_not_alias_the_caller_gradients():
    w = torch.ones(3, dtype=DTYPE)
    g = torch.full((3,), 2.0, dtype=DTYPE)
    tx = sgd(lr=0.1, momentum=0.9)
    _, state = tx.update(g, tx.init(w), w)
    g.zero_()  # e.g. `p.grad.zero_()` in a training loop
    assert torch.equal(state.momentum_buffer, torch.full((3,), 2.0, dtype=DTYPE))


def _leaves(state):
    out = []
    for field in state:
        if isinstance(field, torch.Tensor):
            out.append(field)
        elif isinstance(field, dict):
            out.extend(field.values())
    return out


# ------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_callable_lr_matches_lambda_lr(name):
    info = OPTIMIZERS[name]
    config = dict(info.configs[1])
    base = config.pop("lr")

    def factor(count):
        return 1.0 / (1.0 + 0.3 * count) if count % 4 else 0.5

    params0, loss_fn = make_problem()
    torch_params = [p.clone().requires_grad_() for p in params0.values()]
    opt = info.torch_cls(torch_params, lr=base, foreach=False, **config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    tx = info.factory(lr=lambda count: base * factor(count), **config)
    names = list(params0)
    params, state = dict(params0), tx.init(params0)
    for _ in range(20):
        updates, state = tx.update(grads_of(loss_fn, params), state, params)
        params = apply_updates(params, updates)
        opt.zero_grad()
        loss_fn(dict(zip(names, torch_params, strict=True))).backward()
        opt.step()
        sched.step()
        for k, theirs in zip(names, torch_params, strict=True):
            torch.testing.assert_close(params[k], theirs.detach(), atol=1e-12, rtol=0)


def test_scheduled_momentum_and_betas_match_torch_param_groups():
    """Non-lr schedules are read at every step, like editing ``param_groups`` in torch."""
    params0, loss_fn = make_problem()

    def mom(count):
        return 0.5 + 0.4 * (1 - 0.8**count)

    def betas(count):
        return (0.9 - 0.02 * (count % 3), 0.99 + 0.001 * (count % 5))

    cases = [
        (
            sgd(lr=0.05, momentum=mom, dampening=0.1),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, foreach=False),
            lambda step, opt: opt.param_groups[0].update(momentum=mom(step)),
        ),
        (
            adam(lr=0.01, betas=(lambda c: betas(c)[0], lambda c: torch.tensor(betas(c)[1]))),
            lambda p: torch.optim.Adam(p, lr=0.01, foreach=False),
            lambda step, opt: opt.param_groups[0].update(betas=betas(step)),
        ),
    ]
    for tx, make_opt, before_step in cases:
        torch_params = [p.clone().requires_grad_() for p in params0.values()]
        run_side_by_side(
            tx, make_opt(torch_params), torch_params, dict(params0), loss_fn, 12, before_step
        )


# --------------------------------------------------------------- finite second derivatives


@pytest.mark.parametrize("name,idx", CASES, ids=CASE_IDS)
def test_meta_gradient_is_finite_with_zero_gradient_entries(name, idx):
    info = OPTIMIZERS[name]
    config = as_tensors(info.configs[idx], requires_grad=True)
    hparams = tensor_leaves(config)
    params0, loss_fn = make_problem(dead_feature=True)
    assert torch.equal(grads_of(loss_fn, params0)["w1"][0], torch.zeros(6, dtype=DTYPE))
    meta = unroll(info.factory(**config), params0, loss_fn, steps=5)
    hypergrads = torch.autograd.grad(meta, hparams)
    for h in hypergrads:
        assert torch.isfinite(h).all()
    # ... and the lr actually matters.
    assert hypergrads[0] != 0


def _naive_adam(lr, beta1=0.9, beta2=0.999, eps=1e-8) -> GradientTransformation:
    """Adam written the obvious way with ``torch.sqrt`` (what torch.optim does)."""

    def init(params):
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return AdamState(torch.zeros((), dtype=torch.int64), zeros, zeros, None)

    def update(grads, state, params=None):
        step = int(state.count) + 1
        m = {k: torch.lerp(state.exp_avg[k], g, 1 - beta1) for k, g in grads.items()}
        v = {k: state.exp_avg_sq[k] * beta2 + (1 - beta2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - beta1**step, (1 - beta2**step) ** 0.5
        upd = {k: -(lr / c1) * (m[k] / (torch.sqrt(v[k]) / c2 + eps)) for k in grads}
        return upd, AdamState(state.count + 1, m, v, None)

    return GradientTransformation(init, update)


def test_naive_sqrt_gives_nan_hypergradient_and_safe_sqrt_does_not():
    """Why ``safe_sqrt`` exists: a gradient entry that is exactly 0 makes Adam's second
    moment 0, and backpropagating through ``torch.sqrt(0)`` computes ``0 / (2 * 0)``."""
    params0, loss_fn = make_problem(dead_feature=True)
    lr = torch.tensor(0.01, dtype=DTYPE, requires_grad=True)
    naive_meta = unroll(_naive_adam(lr), params0, loss_fn, steps=5)
    safe_meta = unroll(adam(lr=lr), params0, loss_fn, steps=5)
    torch.testing.assert_close(naive_meta, safe_meta, atol=1e-14, rtol=0)  # same forward
    (naive_grad,) = torch.autograd.grad(naive_meta, lr)
    (safe_grad,) = torch.autograd.grad(safe_meta, lr)
    assert torch.isnan(naive_grad)
    assert torch.isfinite(safe_grad)
    # Without dead entries the two agree, so safe_sqrt changes nothing else.
    params1, loss1 = make_problem(dead_feature=False)
    (g_naive,) = torch.autograd.grad(unroll(_naive_adam(lr), params1, loss1, 5), lr)
    (g_safe,) = torch.autograd.grad(unroll(adam(lr=lr), params1, loss1, 5), lr)
    torch.testing.assert_close(g_naive, g_safe, atol=1e-12, rtol=0)


def test_safe_sqrt_values_and_derivatives():
    x = torch.tensor([4.0, 2.0, 1e-300, 0.0, -1e-18, -3.0], dtype=DTYPE, requires_grad=True)
    y = safe_sqrt(x)
    expected = torch.sqrt(x.detach().clamp(min=0))
    assert torch.equal(y.detach()[:3], torch.sqrt(x.detach()[:3]))  # bit-identical
    torch.testing.assert_close(y.detach(), expected, atol=0, rtol=0)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    # (at x = 1e-300 the true second derivative -x**-1.5 / 4 overflows; skip that entry)
    assert torch.isfinite(g).all() and torch.isfinite(gg[[0, 1, 3, 4, 5]]).all()
    assert torch.equal(gg[3:], torch.zeros(3, dtype=DTYPE))
    assert torch.equal(g.detach()[3:], torch.zeros(3, dtype=DTYPE))
    torch.testing.assert_close(g.detach()[:2], 0.5 / torch.sqrt(x.detach()[:2]))
    assert torch.isnan(safe_sqrt(torch.tensor([float("nan")]))).all()  # NaN is not hidden


def test_eps_root_enters_inside_the_root():
    w, g = torch.ones(3, dtype=DTYPE), torch.tensor([1.0, 0.5, 0.0], dtype=DTYPE)
    u, _ = adam(lr=0.1, eps=0.0, eps_root=1e-4).update(g, adam().init(w), w)
    # step 1: m_hat = g, v_hat = g^2
    torch.testing.assert_close(u, -0.1 * g / torch.sqrt(g * g + 1e-4), atol=1e-15, rtol=0)


# -------------------------------------------------------------------------------- gradcheck

GRADCHECK = {
    "sgd": (
        {"lr": 0.1, "momentum": 0.8, "dampening": 0.2, "weight_decay": 0.01},
        ["lr", "momentum"],
    ),
    "sgd_nesterov": ({"lr": 0.1, "momentum": 0.8, "nesterov": True}, ["lr", "momentum"]),
    "adam": ({"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 0.01}, ["lr", "betas", "eps"]),
    "adam_amsgrad": ({"lr": 0.05, "amsgrad": True}, ["lr", "betas"]),
    "rmsprop": (
        {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "centered": True},
        ["lr", "alpha", "momentum"],
    ),
    "adagrad": ({"lr": 0.1, "lr_decay": 0.1, "initial_accumulator_value": 0.1}, ["lr", "lr_decay"]),
}


@pytest.mark.parametrize("case", list(GRADCHECK))
def test_gradcheck_through_3_unrolled_steps(case):
    config, wrt = GRADCHECK[case]
    factory = OPTIMIZERS[case.split("_")[0]].factory
    params0, loss_fn = make_problem(dead_feature=True)
    tensors = as_tensors({k: config[k] for k in wrt if k in config}, requires_grad=True)
    if "eps" in wrt and "eps" not in config:
        tensors["eps"] = torch.tensor(1e-3, dtype=DTYPE, requires_grad=True)
    if "betas" in wrt and "betas" not in config:
        tensors["betas"] = as_tensors({"b": (0.9, 0.999)}, requires_grad=True)["b"]
    names = list(tensors)
    flat = tensor_leaves(tensors)

    def meta(*values):
        it = iter(values)
        hp = {n: (next(it), next(it)) if n == "betas" else next(it) for n in names}
        return unroll(factory(**{**config, **hp}), params0, loss_fn, steps=3)

    assert torch.autograd.gradcheck(meta, tuple(flat))


def test_update_differentiable_wrt_grads_and_params_twice():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, generator=gen, dtype=DTYPE, requires_grad=True)
    g = torch.randn(4, generator=gen, dtype=DTYPE, requires_grad=True)
    for tx in (
        sgd(lr=0.1, momentum=0.9, weight_decay=0.1),
        adam(lr=0.1, weight_decay=0.1),
        rmsprop(lr=0.1, centered=True, momentum=0.3, weight_decay=0.1),
        adagrad(lr=0.1, weight_decay=0.1),
    ):

        def two_steps(g, w, tx=tx):
            u1, s = tx.update(g, tx.init(w), w)
            w1 = apply_updates(w, u1)
            u2, _ = tx.update(g * w1, s, w1)
            return apply_updates(w1, u2)

        assert torch.autograd.gradcheck(two_steps, (g, w))
        assert torch.autograd.gradgradcheck(two_steps, (g, w))


# ------------------------------------------------------------------------------ composition


def test_chain_threads_updates_and_states():
    params0, loss_fn = make_problem()

    def scale(factor):
        return GradientTransformation(
            lambda p: (), lambda u, s, p=None: ({k: factor * v for k, v in u.items()}, s)
        )

    single, chained = sgd(lr=0.1, momentum=0.9), chain(sgd(lr=1.0, momentum=0.9), scale(0.1))
    p1 = p2 = dict(params0)
    s1, s2 = single.init(p1), chained.init(p2)
    assert isinstance(s2, tuple) and isinstance(s2[0], SGDState)
    for _ in range(5):
        u1, s1 = single.update(grads_of(loss_fn, p1), s1, p1)
        u2, s2 = chained.update(grads_of(loss_fn, p2), s2, p2)
        p1, p2 = apply_updates(p1, u1), apply_updates(p2, u2)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], atol=1e-14, rtol=0)


def test_detach_state_keeps_structure():
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    params0, loss_fn = make_problem()
    tx = chain(adam(lr=lr, amsgrad=True))
    params = {k: v.clone().requires_grad_() for k, v in params0.items()}
    _, state = tx.update(grads_of(loss_fn, params, create_graph=True), tx.init(params), params)
    assert state[0].exp_avg["w1"].requires_grad
    detached = detach_state(state)
    assert isinstance(detached[0], AdamState)
    assert not detached[0].exp_avg["w1"].requires_grad
    assert torch.equal(detached[0].max_exp_avg_sq["b1"], state[0].max_exp_avg_sq["b1"])


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: sgd(lr=-0.1), r"sgd: `lr` must be in \[0, inf\), got -0\.1"),
        (lambda: sgd(lr=0.1, momentum=-1.0), r"`momentum` must be in \[0, inf\)"),
        (lambda: sgd(lr=0.1, dampening=1.5), r"`dampening` must be in \[0, 1\], got 1\.5"),
        (lambda: sgd(lr=0.1, nesterov=True), r"nesterov=True requires momentum > 0"),
        (
            lambda: sgd(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            r"nesterov=True requires dampening == 0, got dampening=0\.1",
        ),
        (lambda: sgd(lr=True), r"`lr` must be a float.*got the bool True"),
        (lambda: sgd(lr="0.1"), r"`lr` must be a float, a 0-d floating tensor.*got str"),
        (lambda: sgd(lr=torch.tensor([0.1])), r"`lr` must be a 0-d floating tensor, got .*\(1,\)"),
        (lambda: sgd(lr=torch.tensor(-1.0)), r"`lr` must be in \[0, inf\), got -1\.0 \(tensor"),
        (lambda: adam(betas=(0.9, 1.0)), r"adam: `betas\[1\]` must be in \[0, 1\), got 1\.0"),
        (lambda: adam(betas=(-0.1, 0.9)), r"`betas\[0\]` must be in \[0, 1\), got -0\.1"),
        (lambda: adam(betas=0.9), r"`betas` must be a pair \(beta1, beta2\), got 0\.9"),
        (lambda: adam(eps=float("nan")), r"`eps` must be in \[0, inf\), got nan"),
        (lambda: adam(eps_root=-1e-8), r"`eps_root` must be in \[0, inf\)"),
        (lambda: adam(amsgrad=1), r"`amsgrad` must be a bool"),
        (lambda: rmsprop(alpha=1.5), r"rmsprop: `alpha` must be in \[0, 1\], got 1\.5"),
        (lambda: rmsprop(weight_decay=-0.1), r"`weight_decay` must be in \[0, inf\)"),
        (lambda: adagrad(lr_decay=-0.1), r"adagrad: `lr_decay` must be in \[0, inf\)"),
        (
            lambda: adagrad(initial_accumulator_value=-1.0),
            r"`initial_accumulator_value` must be in \[0, inf\), got -1\.0",
        ),
        (lambda: chain(), r"chain\(\*transforms\): expected at least one"),
        (lambda: chain(sgd(lr=0.1), "adam"), r"transforms\[1\] must be a GradientTransformation"),
    ],
)
def test_invalid_arguments_raise(build, match):
    with pytest.raises(HypergradientError, match=match):
        build()


def test_invalid_update_inputs_raise():
    params = {"w": torch.ones(3, dtype=DTYPE), "b": torch.zeros(2, dtype=DTYPE)}
    grads = {"w": torch.ones(3, dtype=DTYPE), "b": torch.ones(2, dtype=DTYPE)}
    tx = adam(lr=0.1, weight_decay=0.1)
    state = tx.init(params)
    with pytest.raises(HypergradientError, match=r"adam\(\.\.\.\)\.update: `grads` must have"):
        tx.update({"w": grads["w"]}, state, params)
    with pytest.raises(HypergradientError, match=r"`grads\['b'\]` has shape \(3,\)"):
        tx.update({"w": grads["w"], "b": torch.ones(3, dtype=DTYPE)}, state, params)
    with pytest.raises(HypergradientError, match=r"`params` is required when weight_decay"):
        tx.update(grads, state)
    with pytest.raises(HypergradientError, match=r"`state` must be the AdamState .* got SGDState"):
        tx.update(grads, sgd(lr=0.1).init(params), params)
    with pytest.raises(HypergradientError, match=r"`grads` must be a tensor or a dict"):
        tx.update([grads["w"]], state, params)
    bad = sgd(lr=lambda count: -0.1 * count)
    s = bad.init(params)
    _, s = bad.update(grads, s, params)  # count 0: lr = -0.0 is allowed
    match = r"`lr` must be in \[0, inf\), got -0\.1 \(returned by the schedule at count=1\)"
    with pytest.raises(HypergradientError, match=match):
        bad.update(grads, s, params)
    odd = adam(lr=lambda count: "fast")
    with pytest.raises(HypergradientError, match=r"schedule for `lr` must return a float"):
        odd.update(grads, odd.init(params), params)
    with pytest.raises(HypergradientError, match=r"chain\(\*transforms\)\.update: `state` must be"):
        chain(sgd(lr=0.1)).update(grads, SGDState(torch.zeros((), dtype=torch.int64), None), params)
    with pytest.raises(HypergradientError, match=r"apply_updates.*`updates` must have the keys"):
        apply_updates(params, {"w": grads["w"]})


def test_zero_lr_schedule_and_float_lr_schedule_are_equivalent():
    params0, loss_fn = make_problem()
    grads = grads_of(loss_fn, params0)
    a, b = adagrad(lr=0.1, lr_decay=0.2), adagrad(lr=lambda c: 0.1, lr_decay=lambda c: 0.2)
    sa, sb = a.init(params0), b.init(params0)
    for _ in range(3):
        ua, sa = a.update(grads, sa, params0)
        ub, sb = b.update(grads, sb, params0)
        assert all(torch.equal(ua[k], ub[k]) for k in ua)
    assert math.isclose(float(sa.count), 3.0)
