"""Reverse-engineering tools (hypergradient.learned.analysis) and the component-wise GRU.

Closed forms: heavy ball s' = beta s + g, update = -lr s' has J = beta, B = 1, C = -lr beta,
D = -lr, impulse response c_k = -lr beta^k, fixed point s* = g / (1 - beta); Adam without
bias correction has m* = g, v* = g^2 and update*(g) = -lr g / (|g| + eps).
"""

import dataclasses
import json
import math

import pytest
import torch

import _readme
from hypergradient import ConvergenceError, HypergradientError
from hypergradient.learned import (
    GRULearnedOptimizer,
    HierarchicalLearnedOptimizer,
    MLPLearnedOptimizer,
    NoisyQuadraticFamily,
    TruncationSchedule,
    meta_train,
    step_inputs,
)
from hypergradient.learned.analysis import (
    AbstractStateSpaceOptimizer,
    AdamSystem,
    HeavyBallSystem,
    LearnedGRUSystem,
    LearnedMLPSystem,
    effective_lr_schedule,
    fixed_point,
    identify_impulse_response,
    impulse_momentum,
    impulse_response,
    linearize,
    report,
    saturation_ratio,
    state_space,
    trace,
    update_curve,
)


def _gru(hidden=6, seed=0):
    lopt = GRULearnedOptimizer(hidden=hidden)
    gen = torch.Generator().manual_seed(seed)
    theta = lopt.init(gen)
    theta["gru.w_out"] = torch.randn(hidden, generator=gen)  # a nonzero readout
    return lopt, theta


def _mlp(**kwargs):
    lopt = MLPLearnedOptimizer(hidden=8, **kwargs)
    gen = torch.Generator().manual_seed(1)
    theta = lopt.init(gen)
    theta["mlp.w3"] = torch.randn(8, 2, generator=gen)  # a nonzero output layer
    theta["mlp.b3"] = torch.randn(2, generator=gen)
    return lopt, theta


def _quadratic(w, t=0):
    return 0.5 * (torch.linspace(0.01, 1.0, w.numel()) * w.square()).sum()


# ---------------------------------------------------------------------- heavy ball: recovery


def test_heavy_ball_momentum_and_lr_recovered_from_the_linearisation():
    system = HeavyBallSystem(lr=0.1, momentum=0.9)
    for g in (0.0, 1.0, -3.0):
        fp = fixed_point(system, g)
        assert fp.converged
        # s* = g / (1 - beta); Newton polishes the iterate to rounding error
        assert float(fp.state[0]) == pytest.approx(g / 0.1, abs=1e-12)
        lin = linearize(system, fp.state, g)
        # the dynamics are linear, so every quantity is exact up to rounding (1e-12)
        assert abs(lin.effective_momentum - 0.9) < 1e-12
        assert abs(lin.top_eigenvalue - 0.9) < 1e-12
        assert lin.effective_lr == pytest.approx(0.1, abs=1e-12)
        assert lin.long_run_lr == pytest.approx(0.1 / (1 - 0.9), abs=1e-12)
        assert lin.timescale == pytest.approx(10.0, abs=1e-9)
        assert lin.impulse_momentum(30) == pytest.approx(0.9, abs=1e-12)
        expected = torch.tensor([-0.1 * 0.9**k for k in range(20)])
        torch.testing.assert_close(lin.impulse_response(20), expected, rtol=0, atol=1e-14)


def test_momentum_recovered_from_a_black_box_torch_sgd_run():
    # torch.optim.SGD(momentum=0.9) driven by random gradients; the analysis only sees the
    # recorded gradients and parameter differences
    steps, n = 400, 32
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(steps, n, generator=gen)
    w = torch.zeros(n, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    updates = []
    for g in grads:
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        updates.append(w.detach() - before)
    c = identify_impulse_response(grads, torch.stack(updates), num_lags=250)
    # 0.9^250 ~ 4e-12: the memory beyond the lags is far below the 1e-6 asked for
    assert abs(impulse_momentum(c) - 0.9) < 1e-6
    assert abs(-float(c[0]) - 0.1) < 1e-6
    assert abs(float(c[1] / c[0]) - 0.9) < 1e-6


def test_heavy_ball_system_matches_torch_sgd():
    system = HeavyBallSystem(lr=0.05, momentum=0.8)
    w = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.05, momentum=0.8)
    s = system.init_state((5,))
    ours = torch.zeros(5)
    for t in range(6):
        g = torch.randn(5)
        w.grad = g.clone()
        opt.step()
        s, u = system.step(s, g)
        ours = ours + u
        torch.testing.assert_close(ours, w.detach(), rtol=0, atol=1e-14, msg=f"step {t}")


def test_heavy_ball_update_is_linear():
    system = HeavyBallSystem(lr=0.1, momentum=0.9)
    curve = update_curve(system, [-2.0, -0.5, 0.0, 1.0, 4.0])
    assert bool(curve.converged.all())
    torch.testing.assert_close(curve.updates, -curve.gradients, rtol=0, atol=1e-12)
    assert saturation_ratio(system, 0.7) == pytest.approx(10.0, abs=1e-10)


# -------------------------------------------------------------------------- Adam saturates


def test_adam_update_saturates():
    system = AdamSystem(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    grid = torch.tensor([-100.0, -10.0, -1.0, -0.01, 0.0, 1e-3, 0.1, 1.0, 10.0, 100.0])
    curve = update_curve(system, grid)
    assert bool(curve.converged.all())
    closed = -1e-3 * grid / (grid.abs() + 1e-8)
    torch.testing.assert_close(curve.updates, closed, rtol=1e-10, atol=1e-15)
    ratio = saturation_ratio(system, 1.0)
    # (10 / (10 + eps)) / (1 / (1 + eps)) = 1 + 0.9 eps: a sign-like update
    assert ratio == pytest.approx(1.0, abs=1e-7)
    # the update never exceeds lr, while heavy ball's grows without bound
    assert float(curve.updates.abs().max()) <= 1e-3
    lin = linearize(system, fixed_point(system, 1.0).state, 1.0)
    torch.testing.assert_close(lin.eigenvalues.real, torch.tensor([0.999, 0.9]), rtol=0, atol=1e-12)


# ----------------------------------------------------------- dense Jacobians vs differences


def _finite_difference_jacobians(system, s, g, h=1e-6):
    size = s.numel()
    jac = torch.zeros(size, size)
    out_gain = torch.zeros(size)
    for i in range(size):
        e = torch.zeros(size)
        e[i] = h
        (fp, up), (fm, um) = system.step(s + e, g), system.step(s - e, g)
        jac[:, i] = (fp - fm) / (2 * h)
        out_gain[i] = (up - um) / (2 * h)
    (fp, up), (fm, um) = system.step(s, g + h), system.step(s, g - h)
    return jac, (fp - fm) / (2 * h), out_gain, float((up - um) / (2 * h))


@pytest.mark.parametrize("kind", ["gru", "mlp", "adam"])
def test_dense_jacobians_match_finite_differences(kind):
    gen = torch.Generator().manual_seed(3)
    if kind == "gru":
        system = LearnedGRUSystem(*_gru())
        s = 0.5 * torch.randn(system.state_size, generator=gen)
    elif kind == "mlp":
        lopt, theta = _mlp()
        scales = 0.5 + torch.rand(2 + 2 * len(lopt.decays), generator=gen)
        system = LearnedMLPSystem(lopt, theta, scales, weight=0.3, step_count=7.0)
        k = len(lopt.decays)
        s = torch.cat([torch.randn(k, generator=gen), 0.5 + torch.rand(k, generator=gen)])
    else:
        system = AdamSystem(lr=0.01)
        s = torch.tensor([0.2, 0.5])
    g = torch.tensor(0.37)
    lin = linearize(system, s, 0.37)
    jac, b, c, d = _finite_difference_jacobians(system, s, g)
    # central differences in float64 with h = 1e-6: truncation ~h^2, rounding ~1e-16/h
    torch.testing.assert_close(lin.jacobian, jac, rtol=0, atol=1e-8)
    torch.testing.assert_close(lin.input_gain, b, rtol=0, atol=1e-8)
    torch.testing.assert_close(lin.output_gain, c, rtol=0, atol=1e-8)
    assert lin.feedthrough == pytest.approx(d, abs=1e-8)


def test_gru_linearisation_predicts_impulse_and_fixed_point_slope():
    system = LearnedGRUSystem(*_gru(hidden=8, seed=2))
    fp = fixed_point(system, 0.2)
    lin = linearize(system, fp.state, 0.2)
    # the residues reproduce the impulse response: c_k = sum_i r_i lambda_i^(k-1)
    ks = torch.arange(1, 12)
    modes = (lin.residues[None, :] * lin.eigenvalues[None, :] ** (ks[:, None] - 1)).sum(1)
    torch.testing.assert_close(modes.real, lin.impulse_response(12)[1:], rtol=0, atol=1e-10)
    # small pulses: the nonlinear response is linear up to O(delta^2) (central differences)
    nonlinear = impulse_response(system, fp.state, 0.2, 12, delta=1e-5)
    torch.testing.assert_close(nonlinear, lin.impulse_response(12), rtol=0, atol=1e-8)
    # long-run lr = -(dUpdate*/dg): the slope of the fixed-point update curve
    h = 1e-5
    curve = update_curve(system, [0.2 - h, 0.2 + h], state=fp.state)
    slope = float(curve.updates[1] - curve.updates[0]) / (2 * h)
    assert -lin.long_run_lr == pytest.approx(slope, rel=1e-6)


class _TwoMomenta(AbstractStateSpaceOptimizer):
    """s1' = 0.5 s1 + g, s2' = 0.99 s2 + g, update = -(s1' + weight * s2')."""

    def __init__(self, weight):
        self.weight = weight

    @property
    def state_size(self):
        return 2

    def init_state(self, shape=()):
        return torch.zeros((*shape, 2))

    def step(self, state, g):
        new = torch.tensor([0.5, 0.99]) * state + g.unsqueeze(-1)
        return new, -(new[..., 0] + self.weight * new[..., 1])


@pytest.mark.parametrize(("weight", "expected"), [(1e-5, 0.5), (1e-2, 0.99)])
def test_effective_momentum_is_the_slowest_mode_the_update_reads(weight, expected):
    system = _TwoMomenta(weight)
    lin = linearize(system, fixed_point(system, 0.0).state, 0.0)
    assert abs(lin.top_eigenvalue - 0.99) < 1e-12
    # C = (-0.99 weight, -0.5), B = (1, 1) in the (slow, fast) eigenbasis: the residues
    # r/(1 - lambda) give 99 weight against 0.5/0.5 = 1 of the sustained response
    slow = 99 * weight / (1 + 99 * weight)
    torch.testing.assert_close(lin.mode_shares, torch.tensor([slow, 1 - slow]))
    # weight 1e-5: the slow mode carries 0.1% (< 1%), so the memory is the fast mode's
    assert lin.effective_momentum == pytest.approx(expected, abs=1e-12)
    assert lin.long_run_lr == pytest.approx(2 + 100 * weight, rel=1e-12)


# --------------------------------------------------------------- the learned optimizers


@pytest.mark.parametrize("bias_correction", [False, True])
def test_mlp_system_reproduces_the_learned_optimizer(bias_correction):
    lopt, theta = _mlp(bias_correction=bias_correction)
    n, steps, horizon = 7, 5, 20
    gen = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(n, generator=gen)}
    state = lopt.init_state(params)
    grads = torch.randn(steps, n, generator=gen)
    for t in range(steps):
        weights = params["w"]
        updates, state = lopt.update(
            theta, {"w": grads[t]}, params, state, step_inputs(t / horizon)
        )
        params = {"w": params["w"] + updates["w"]}
    system, states = LearnedMLPSystem.from_history(
        lopt, theta, grads, weights, progress=(steps - 1) / horizon
    )
    new_states, ours = system.step(states, grads[-1])
    torch.testing.assert_close(ours, updates["w"], rtol=1e-12, atol=1e-15)
    k = len(lopt.decays)
    expected = torch.cat([state["tensors"]["w"]["m"], state["tensors"]["w"]["v"]]).T
    torch.testing.assert_close(new_states, expected.reshape(n, 2 * k), rtol=0, atol=1e-15)
    # its state dynamics are the fixed decays: the eigenvalues are the decays, twice
    one = dataclasses.replace(system, weight=float(weights[0]))  # component 0 alone
    lin = linearize(one, states[0], float(grads[-1, 0]))
    decays = torch.tensor(sorted(lopt.decays * 2, reverse=True))
    torch.testing.assert_close(lin.eigenvalues.real, decays, rtol=0, atol=1e-12)


def test_gru_optimizer_update_and_meta_training():
    lopt = GRULearnedOptimizer(hidden=4)
    theta = lopt.init(torch.Generator().manual_seed(0))
    params = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    state = lopt.init_state(params)
    grads = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    updates, new = lopt.update(theta, grads, params, state, step_inputs())
    assert all(float(u.abs().max()) == 0 for u in updates.values())  # zero readout
    theta["gru.w_out"] = torch.randn(4)
    updates, new = lopt.update(theta, grads, params, state, step_inputs())
    h, u = lopt.cell(theta, torch.zeros(4, 4), grads["b"])
    torch.testing.assert_close(updates["b"], u)
    torch.testing.assert_close(new["tensors"]["b"]["h"], h)
    assert tuple(new["tensors"]["a"]["h"].shape) == (2, 3, 4)
    # as a torch.optim optimizer (no progress input: num_steps is not needed)
    w = torch.nn.Parameter(torch.ones(4))
    opt = lopt.opt_fn(theta)([w])
    w.grad = grads["b"].clone()
    opt.step()
    torch.testing.assert_close(w.detach(), 1 + u)
    # a few truncated-backprop meta-steps lower the meta-loss (it starts as the zero update)
    family = NoisyQuadraticFamily(dim=4, condition=10.0, noise=0.0)
    result = meta_train(
        GRULearnedOptimizer(hidden=4),
        [family],
        num_steps=24,
        estimator="tbptt",
        num_pairs=2,
        meta_lr=3e-2,
        schedule=TruncationSchedule(horizon=10, truncation_length=10),
    )
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.5


# ------------------------------------------------------------------ schedules and report


def test_trace_and_effective_lr_schedule():
    sgd = HeavyBallSystem(lr=0.3, momentum=0.0)
    run = trace(sgd, _quadratic, torch.ones(6), 15)
    # plain SGD: both schedules are the learning rate at every step
    torch.testing.assert_close(run.lr_ratio, torch.full((15,), 0.3), rtol=0, atol=1e-12)
    torch.testing.assert_close(run.instant_lr, torch.full((15,), 0.3), rtol=0, atol=1e-12)
    assert run.losses[-1] < run.losses[0]
    hb = trace(HeavyBallSystem(lr=0.3, momentum=0.9), _quadratic, torch.ones(6), 15)
    torch.testing.assert_close(hb.instant_lr, torch.full((15,), 0.3), rtol=0, atol=1e-12)
    # the ratio counts the momentum: at step 0 (empty buffer) it is the lr, later larger
    assert float(hb.lr_ratio[0]) == pytest.approx(0.3, abs=1e-12)
    assert float(hb.lr_ratio[1]) > 0.3
    ratio = effective_lr_schedule(torch.zeros(2, 3), torch.zeros(2, 3))
    assert bool(ratio.isnan().all())  # zero gradient: undefined, not 0


def test_report_writes_json_and_png(tmp_path):
    system = HeavyBallSystem(lr=0.1, momentum=0.9)
    run = trace(system, _quadratic, torch.ones(6), 20)
    result = report(system, g_typical=1.0, run=run, name="hb", out_dir=tmp_path, num_gradients=9)
    assert result["linearization"]["effective_momentum"] == pytest.approx(0.9, abs=1e-12)
    assert result["saturation_ratio"] == pytest.approx(10.0, abs=1e-9)
    saved = json.loads((tmp_path / "hb.json").read_text())
    assert saved["linearization"]["effective_lr"] == pytest.approx(0.1, abs=1e-12)
    assert len(saved["update_curve"]["gradients"]) == 9
    assert all(e["effective_momentum"] == pytest.approx(0.9) for e in saved["momentum_vs_g"])
    assert (tmp_path / "hb.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------- errors


def test_bad_inputs_raise():
    hb = HeavyBallSystem(lr=0.1)
    with pytest.raises(HypergradientError, match="momentum must be in"):
        HeavyBallSystem(lr=0.1, momentum=1.0)
    with pytest.raises(HypergradientError, match="lr must be > 0"):
        HeavyBallSystem(lr=0.0)
    with pytest.raises(HypergradientError, match="betas must be in"):
        AdamSystem(betas=(0.9, 1.0))
    with pytest.raises(HypergradientError, match="eps must be > 0"):
        AdamSystem(eps=0.0)
    with pytest.raises(HypergradientError, match="AbstractStateSpaceOptimizer"):
        fixed_point(torch.optim.SGD, 0.0)
    with pytest.raises(HypergradientError, match="one number"):
        fixed_point(hb, torch.ones(2))
    with pytest.raises(HypergradientError, match="finite number"):
        fixed_point(hb, math.nan)
    with pytest.raises(HypergradientError, match=r"state must be a \(1,\) tensor"):
        linearize(hb, torch.zeros(3), 0.0)
    with pytest.raises(HypergradientError, match="state is required"):
        linearize(hb, None, 0.0)
    with pytest.raises(HypergradientError, match="non-finite"):
        fixed_point(hb, 0.0, state=torch.tensor([math.inf]))
    with pytest.raises(HypergradientError, match="num_iters must be an int"):
        fixed_point(hb, 0.0, num_iters=-1)
    with pytest.raises(HypergradientError, match="tol must be"):
        fixed_point(hb, 0.0, tol=0.0)
    with pytest.raises(ConvergenceError, match="no fixed point found for g=1"):
        fixed_point(HeavyBallSystem(lr=0.1, momentum=0.99), 1.0, num_iters=3, newton_steps=0)
    slow = fixed_point(
        HeavyBallSystem(lr=0.1, momentum=0.99), 1.0, num_iters=3, newton_steps=0, throw=False
    )
    assert not slow.converged and slow.residual > 1e-3
    with pytest.raises(HypergradientError, match="g must be nonzero"):
        saturation_ratio(hb, 0.0)
    with pytest.raises(HypergradientError, match="num_steps must be an int >= 1"):
        impulse_response(hb, torch.zeros(1), 0.0, 0)
    with pytest.raises(HypergradientError, match="num_steps must be an int >= 1"):
        linearize(hb, torch.zeros(1), 0.0).impulse_response(0)
    with pytest.raises(HypergradientError, match="non-empty list of finite"):
        update_curve(hb, [])
    with pytest.raises(HypergradientError, match="same shape"):
        effective_lr_schedule(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(HypergradientError, match="num_lags must be an int in"):
        identify_impulse_response(torch.zeros(3, 2), torch.zeros(3, 2), 4)
    with pytest.raises(HypergradientError, match="equations for"):
        identify_impulse_response(torch.zeros(3, 1), torch.zeros(3, 1), 3)
    with pytest.raises(HypergradientError, match="at least 3"):
        impulse_momentum(torch.zeros(2))
    with pytest.raises(HypergradientError, match="w0 must be a floating"):
        trace(hb, _quadratic, torch.zeros(2, 2), 3)
    with pytest.raises(HypergradientError, match="g_typical must be > 0"):
        report(hb, g_typical=-1.0)
    with pytest.raises(HypergradientError, match="gradient_range must be"):
        report(hb, g_typical=1.0, gradient_range=(1.0, 0.5))
    with pytest.raises(HypergradientError, match="not component-wise"):
        state_space(HierarchicalLearnedOptimizer(), {})
    with pytest.raises(HypergradientError, match="GRULearnedOptimizer or an MLP"):
        state_space(object(), {})
    lopt, theta = _gru()
    with pytest.raises(HypergradientError, match="takes no options"):
        state_space(lopt, theta, weight=1.0)
    assert isinstance(state_space(lopt, theta), LearnedGRUSystem)
    assert isinstance(state_space(*_mlp(), feature_scales=torch.ones(10)), LearnedMLPSystem)
    with pytest.raises(HypergradientError, match="does not fit"):
        LearnedGRUSystem(lopt, {"x": torch.zeros(1)})
    with pytest.raises(HypergradientError, match="hidden must be an int"):
        GRULearnedOptimizer(hidden=0)
    mlp, mtheta = _mlp()
    with pytest.raises(HypergradientError, match="feature_scales must be a tensor of 10"):
        LearnedMLPSystem(mlp, mtheta, torch.ones(3))
    with pytest.raises(HypergradientError, match="feature_scales must be"):
        state_space(mlp, mtheta, feature_scales=-torch.ones(10))
    with pytest.raises(HypergradientError, match=r"gradients must be a \(T, N\) tensor"):
        LearnedMLPSystem.from_history(mlp, mtheta, torch.zeros(4))
    with pytest.raises(HypergradientError, match=r"weights must be an \(3,\) tensor"):
        LearnedMLPSystem.from_history(mlp, mtheta, torch.zeros(4, 3), torch.zeros(2))


README_EXAMPLE = _readme.example(
    "analysis.report(",
    momentum="lin.effective_momentum",
    lr="lin.effective_lr",
    saturation_ratio="rep['saturation_ratio']",
)


def test_readme_example_runs():
    run = README_EXAMPLE.run()  # in a fresh (float32) interpreter, as a reader pastes it
    # float32: the recovered momentum and lr are exact to rounding (1e-6)
    assert abs(run.values["momentum"] - 0.9) < 1e-6
    assert abs(run.values["lr"] - 0.1) < 1e-6
    assert math.isfinite(run.values["saturation_ratio"])
    # the example writes its report in the working directory
    assert (run.cwd / "reverse-engineering" / "gru.json").is_file()
    assert (run.cwd / "reverse-engineering" / "gru.png").is_file()
    assert "momentum 0.900000, lr 0.100000" in run.stdout
