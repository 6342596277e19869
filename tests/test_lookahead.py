"""Lookahead: the noisy-quadratic variance law, exactness, state_dict, schedulers, errors.

* The closed form of Proposition 1 (Zhang et al. 2019), derived in
  ``noisy_quadratic_variance``'s docstring, reproduces the calibration table of
  papers.md section 8, and the ``Lookahead(torch.optim.SGD)`` class simulated on many
  independent noisy quadratics settles at that variance.
* ``alpha=1`` is the inner optimizer bit for bit; a hand-written loop of the paper's
  algorithm is reproduced step by step (Adam inside, pullback modes).
* ``state_dict`` saved mid-cycle and loaded into a fresh model/optimizer continues the
  same trajectory bit for bit; lr schedulers reach the inner optimizer.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hypergradient import HypergradientError
from hypergradient.optimizers import Lookahead, noisy_quadratic_variance


def regression(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=gen)
    y = torch.randn(32, 2, generator=gen)

    def make_model() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))

    def batch(t: int):
        # a deterministic "minibatch" sequence: different rows at every step
        idx = torch.arange(8) + (8 * t) % 24
        return x[idx], y[idx]

    return make_model, batch


def sgd_step(opt, model, batch, t):
    xb, yb = batch(t)
    opt.zero_grad()
    loss = F.mse_loss(model(xb), yb)
    loss.backward()
    opt.step()
    return loss.detach()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------------------------
# noisy quadratic: closed form and simulation
# --------------------------------------------------------------------------------------

# papers.md section 8: (k, alpha) -> V_LA / V_SGD from the formula, for h = 1, noise
# variance 1, lr = 0.5 (3 decimals as printed there)
CALIBRATION = {(5, 0.5): 0.340, (10, 0.5): 0.334, (5, 0.8): 0.673, (20, 0.2): 0.111}


@pytest.mark.parametrize(("k", "alpha"), list(CALIBRATION))
def test_closed_form_reproduces_the_calibration_table(k, alpha):
    v_sgd = noisy_quadratic_variance(1, 1.0, lr=0.5)
    assert v_sgd == pytest.approx(0.25 / 0.75, rel=1e-15)  # eta^2 s^2 / (1 - (1 - eta h)^2)
    ratio = noisy_quadratic_variance(k, alpha, lr=0.5) / v_sgd
    # the table prints 3 decimals: agreement to half a unit in the last place
    assert abs(ratio - CALIBRATION[(k, alpha)]) <= 5e-4


def test_closed_form_limits():
    # alpha = 1 is SGD whatever k; a huge k forgets the slow weights' past: the slow
    # weights are alpha * (an SGD sample), variance alpha^2 V_SGD / (1 - (1-alpha)^2)
    v_sgd = noisy_quadratic_variance(1, 1.0, lr=0.3, curvature=2.0, noise_variance=0.7)
    assert noisy_quadratic_variance(7, 1.0, 0.3, 2.0, 0.7) == pytest.approx(v_sgd, rel=1e-14)
    a = 0.5
    far = noisy_quadratic_variance(200, a, 0.3, 2.0, 0.7)
    assert far == pytest.approx(a * a * v_sgd / (1 - (1 - a) ** 2), rel=1e-12)


def simulate_slow_variance(k: int, alpha: float, *, chains: int, cycles: int, burn: int):
    """Empirical variance of Lookahead(SGD)'s slow weights on ``chains`` independent 1-D
    noisy quadratics 0.5 (x - c)^2, c ~ N(0, 1) fresh each step (h = 1, gradient noise
    variance 1), lr 0.5: pooled over chains and over ``cycles`` synchronisation points
    after ``burn`` cycles."""
    gen = torch.Generator().manual_seed(1234)
    x = nn.Parameter(torch.zeros(chains))
    opt = Lookahead(torch.optim.SGD([x], lr=0.5), k=k, alpha=alpha)
    samples = []
    for t in range(1, (burn + cycles) * k + 1):
        c = torch.randn(chains, generator=gen)
        opt.zero_grad()
        (0.5 * (x - c) ** 2).sum().backward()
        opt.step()
        if t % k == 0 and t > burn * k:
            samples.append(x.detach().clone())  # right after a sync: x is the slow weight
    s = torch.stack(samples)
    return float((s * s).mean())  # the mean is 0 (the optimum)


@pytest.mark.parametrize(("k", "alpha"), [*CALIBRATION, (5, 1.0)])
def test_simulated_steady_state_variance_matches_the_closed_form(k, alpha):
    # Burn-in: the slow weights' mean and variance contract by (1 - alpha + alpha a^k)^2
    # per cycle (0.64 at worst, k=20 alpha=0.2), so 25 cycles leave < 2e-5 of the start.
    # Precision: 20000 chains x 15 cycles = 3e5 samples; the sample variance of a
    # Gaussian has relative std sqrt(2 / n) = 0.0026, and the correlation between cycles
    # (lag-one correlation of x is 1 - alpha + alpha a^k <= 0.8, of x^2 <= 0.64) inflates
    # it by at most sqrt((1 + 0.64) / (1 - 0.64)) = 2.1: relative std <= 0.0055.  The 3%
    # tolerance is > 5 standard errors, and 3x tighter than the papers.md criterion
    # |sim - formula| < 0.03 on the ratio (0.34 for k=5, alpha=0.5: 9% relative).
    v = simulate_slow_variance(k, alpha, chains=20000, cycles=15, burn=25)
    v_sgd = noisy_quadratic_variance(1, 1.0, lr=0.5)
    expected = noisy_quadratic_variance(k, alpha, lr=0.5)
    assert v == pytest.approx(expected, rel=0.03)
    if alpha < 1:  # and the reduction is real: far outside the tolerance of SGD's value
        assert v < 0.9 * v_sgd


# --------------------------------------------------------------------------------------
# exactness
# --------------------------------------------------------------------------------------


def test_alpha_one_is_plain_sgd_bit_for_bit_with_a_scheduler():
    make_model, batch = regression()
    m1, m2 = make_model(), make_model()
    ref = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9)
    la = Lookahead(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), k=3, alpha=1.0)
    s1 = torch.optim.lr_scheduler.StepLR(ref, step_size=4, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(la, step_size=4, gamma=0.5)
    for t in range(13):
        l1 = sgd_step(ref, m1, batch, t)
        l2 = sgd_step(la, m2, batch, t)
        s1.step()
        s2.step()
        assert torch.equal(l1, l2)
        assert torch.equal(flat(m1), flat(m2)), f"differs after step {t + 1}"
    # the scheduler acted on the inner optimizer through the shared param_groups
    assert la.optimizer.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.1 * 0.5**3
    assert la.param_groups is la.optimizer.param_groups


def reference_lookahead(model, make_inner, batch, steps, k, alpha, pullback):
    """The paper's algorithm written out (papers.md section 8), for comparison."""
    inner = make_inner(model.parameters())
    slow = [p.detach().clone() for p in model.parameters()]
    slow_mom = [torch.zeros_like(p) for p in model.parameters()]
    trajectory = []
    for t in range(steps):
        sgd_step(inner, model, batch, t)
        if (t + 1) % k == 0:
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    slow[i] = slow[i] + alpha * (p - slow[i])
                    p.copy_(slow[i])
                    buf = inner.state[p].get("momentum_buffer")
                    if pullback == "reset":
                        buf.zero_()
                    elif pullback == "pullback":
                        buf.copy_(alpha * buf + (1 - alpha) * slow_mom[i])
                        slow_mom[i] = buf.clone()
        trajectory.append(flat(model))
    return trajectory


@pytest.mark.parametrize(
    ("inner", "pullback"),
    [
        (lambda ps: torch.optim.Adam(ps, lr=0.05), "none"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "none"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "reset"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "pullback"),
    ],
    ids=["adam", "sgd-momentum", "reset", "pullback"],
)
def test_matches_the_written_out_algorithm(inner, pullback):
    make_model, batch = regression()
    m_ref, m_la = make_model(), make_model()
    expected = reference_lookahead(m_ref, inner, batch, 12, k=4, alpha=0.6, pullback=pullback)
    opt = Lookahead(inner(m_la.parameters()), k=4, alpha=0.6, pullback_momentum=pullback)
    for t in range(12):
        sgd_step(opt, m_la, batch, t)
        # torch.lerp with a weight >= 0.5 computes end - (1 - alpha)(end - start), the
        # reference start + alpha (end - start): equal up to rounding
        torch.testing.assert_close(flat(m_la), expected[t], rtol=1e-13, atol=1e-14)


def test_closure_slow_weights_and_zero_grad():
    make_model, batch = regression()
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=3, alpha=0.5)
    start = flat(model)
    with opt.slow_weights():  # before any step the parameters are the slow weights
        assert torch.equal(flat(model), start)
    xb, yb = batch(0)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(xb), yb)
        loss.backward()
        return loss

    losses = [opt.step(closure) for _ in range(4)]  # one sync after step 3
    assert all(isinstance(v, torch.Tensor) for v in losses)
    assert losses[-1] < losses[0]
    fast = flat(model)
    slow = torch.cat([opt.state[p]["slow_weights"].reshape(-1) for p in model.parameters()])
    assert not torch.equal(fast, slow)
    with opt.slow_weights():
        assert torch.equal(flat(model), slow)
    assert torch.equal(flat(model), fast)  # fast weights restored
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------
# state_dict, copies, param groups
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pullback", ["none", "pullback"])
def test_state_dict_round_trip_mid_cycle_continues_the_same_trajectory(pullback):
    make_model, batch = regression()
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = Lookahead(inner, k=5, alpha=0.5, pullback_momentum=pullback)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
    for t in range(7):  # one sync at step 5, then two steps into the next cycle
        sgd_step(opt, model, batch, t)
        sched.step()
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
        buffer,
    )
    continued = []
    for t in range(7, 16):
        sgd_step(opt, model, batch, t)
        sched.step()
        continued.append(flat(model))

    buffer.seek(0)
    saved = torch.load(buffer)
    model2 = make_model()  # fresh weights, overwritten by the checkpoint
    model2.load_state_dict(saved["model"])
    opt2 = Lookahead(torch.optim.SGD(model2.parameters(), lr=123.0, momentum=0.9), k=2)
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, gamma=0.95)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert (opt2.k, opt2.alpha, opt2.fast_steps) == (5, 0.5, 7)
    assert opt2.param_groups is opt2.optimizer.param_groups
    for i, t in enumerate(range(7, 16)):
        sgd_step(opt2, model2, batch, t)
        sched2.step()
        assert torch.equal(flat(model2), continued[i]), f"differs at step {t + 1}"


def test_deepcopy_keeps_the_param_groups_shared():
    make_model, _ = regression()
    opt = Lookahead(torch.optim.SGD(make_model().parameters(), lr=0.1))
    clone = copy.deepcopy(opt)
    assert clone.param_groups is clone.optimizer.param_groups
    assert clone.optimizer is not opt.optimizer


def test_add_param_group_reaches_the_inner_optimizer():
    make_model, batch = regression()
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model[0].parameters(), lr=0.1), k=2, alpha=0.5)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
    assert len(opt.optimizer.param_groups) == 2
    before = model[2].weight.detach().clone()
    for t in range(2):
        sgd_step(opt, model, batch, t)
    assert not torch.equal(before, model[2].weight)
    assert "slow_weights" in opt.state[model[2].weight]
    assert "Lookahead(k=2, alpha=0.5" in repr(opt)


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def _param():
    return [nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "sgd"}, r"must be a torch\.optim\.Optimizer instance, got str"),
        ({"k": 0}, r"`k` \(inner steps per synchronisation\) must be an int >= 1, got 0"),
        ({"k": 2.5}, r"`k` .* got 2\.5"),
        ({"alpha": 0.0}, r"`alpha` must be a number in \(0, 1\], got 0\.0"),
        ({"alpha": 1.5}, r"`alpha` must be a number in \(0, 1\], got 1\.5"),
        ({"pullback_momentum": "avg"}, r"`pullback_momentum` must be one of"),
        (
            {"optimizer": "adam", "pullback_momentum": "reset"},
            r"Adam has no `momentum` setting",
        ),
    ],
)
def test_constructor_errors(kwargs, match):
    kwargs = dict(kwargs)
    inner = kwargs.pop("optimizer", None)
    if inner is None:
        inner = torch.optim.SGD(_param(), lr=0.1)
    elif inner == "adam":
        inner = torch.optim.Adam(_param(), lr=0.1)
    with pytest.raises(HypergradientError, match=match):
        Lookahead(inner, **kwargs)


def test_load_state_dict_errors():
    opt = Lookahead(torch.optim.SGD(_param(), lr=0.1))
    with pytest.raises(HypergradientError, match=r"keys \['inner', 'lookahead'\], got \['param"):
        opt.load_state_dict(torch.optim.SGD(_param(), lr=0.1).state_dict())
    bigger = Lookahead(torch.optim.SGD(_param() + _param(), lr=0.1))
    bigger.step()  # creates slow weights for both parameters
    with pytest.raises(HypergradientError, match=r"positions \[1\], but this optimizer has 1"):
        opt.load_state_dict(bigger.state_dict())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 0.5, 0.5), r"`k` must be an int >= 1, got 0"),
        ((5, 0.0, 0.5), r"`alpha` must be in \(0, 1\], got 0\.0"),
        ((5, 0.5, 0.5, -1.0), r"`curvature` and `noise_variance` must be > 0"),
        ((5, 0.5, 0.5, 1.0, 0.0), r"`curvature` and `noise_variance` must be > 0"),
        ((5, 0.5, 2.5), r"0 < lr \* curvature < 2, got lr \* curvature = 2\.5"),
    ],
)
def test_noisy_quadratic_variance_errors(args, match):
    with pytest.raises(HypergradientError, match=match):
        noisy_quadratic_variance(*args)


def test_variance_formula_is_below_sgd_for_every_setting():
    # Proposition 1's claim V_LA <= V_SGD, on a grid (including oscillating a = 1 - eta h < 0)
    for k in (1, 2, 5, 17):
        for alpha in (0.1, 0.5, 0.9):
            for lr in (0.1, 1.0, 1.9):
                v_sgd = noisy_quadratic_variance(1, 1.0, lr)
                v = noisy_quadratic_variance(k, alpha, lr)
                assert v <= v_sgd * (1 + 1e-12) and math.isfinite(v)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": True}, r"`k` .* got True"),
        ({"k": -3}, r"`k` .* must be an int >= 1, got -3"),
        ({"alpha": float("nan")}, r"`alpha` must be a number in \(0, 1\], got nan"),
        ({"alpha": -0.5}, r"`alpha` must be a number in \(0, 1\], got -0\.5"),
        ({"alpha": True}, r"`alpha` must be a number in \(0, 1\], got True"),
        ({"alpha": "0.5"}, r"`alpha` must be a number in \(0, 1\], got '0\.5'"),
        ({"pullback_momentum": None}, r"`pullback_momentum` must be one of .* got None"),
    ],
)
def test_more_constructor_errors(kwargs, match):
    # one line each, naming the call, what was expected and what was given
    with pytest.raises(HypergradientError, match=r"^Lookahead\(optimizer, k, alpha.*" + match):
        Lookahead(torch.optim.SGD(_param(), lr=0.1), **kwargs)


def test_numpy_numbers_are_accepted_for_k_and_alpha():
    np = pytest.importorskip("numpy")
    opt = Lookahead(torch.optim.SGD(_param(), lr=0.1), k=np.int64(3), alpha=np.float32(0.5))
    assert (type(opt.k), opt.k, type(opt.alpha), opt.alpha) == (int, 3, float, 0.5)


def test_load_state_dict_refuses_corrupted_lookahead_entries():
    opt = Lookahead(torch.optim.SGD(_param(), lr=0.1), k=2)
    opt.step()
    good = opt.state_dict()
    for key, value, match in [
        ("k", 0, r"\(the saved values\): `k` .* must be an int >= 1, got 0"),
        ("alpha", 2.0, r"\(the saved values\): `alpha` must be a number in \(0, 1\], got 2\.0"),
        ("pullback_momentum", "avg", r"saved pullback_momentum must be one of .* got 'avg'"),
    ]:
        bad = copy.deepcopy(good)
        bad["lookahead"][key] = value
        with pytest.raises(HypergradientError, match=match):
            opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    del bad["lookahead"]["fast_steps"]
    with pytest.raises(HypergradientError, match=r"must hold the keys \['alpha', 'fast_steps'"):
        opt.load_state_dict(bad)
    assert (opt.k, opt.fast_steps) == (2, 1)  # a refused dict changes nothing


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((5, "0.5", 0.5), r"`alpha` must be a finite real number, got '0\.5'"),
        ((5, 0.5, float("nan")), r"`lr` must be a finite real number, got nan"),
        ((5, 0.5, 0.5, float("inf")), r"`curvature` must be a finite real number, got inf"),
        ((5, 0.5, 0.5, 1.0, float("nan")), r"`noise_variance` must be a finite real"),
    ],
)
def test_noisy_quadratic_variance_refuses_non_numbers(args, match):
    with pytest.raises(HypergradientError, match=match):
        noisy_quadratic_variance(*args)


# --------------------------------------------------------------------------------------
# the step's bookkeeping: slow weights for every parameter, however they arrive
# --------------------------------------------------------------------------------------


def test_parameters_added_or_inspected_mid_run_get_slow_weights():
    # step() skips the per-parameter scan once every parameter has slow weights; a group
    # added mid-cycle, a defaultdict entry created by reading opt.state[p], or a state dict
    # loaded before any step must not make it skip a parameter.
    make_model, batch = regression()
    model = make_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = Lookahead(torch.optim.SGD(first, lr=0.1), k=3, alpha=0.5)
    _ = [opt.state[p] for p in first]  # an empty entry per parameter, as inspection leaves
    for t in range(2):
        sgd_step(opt, model, batch, t)
    added_at = [p.detach().clone() for p in second]
    opt.add_param_group({"params": second, "lr": 0.05})
    sgd_step(opt, model, batch, 2)  # the third step: a sync, second group's first step
    for p, start in zip(second, added_at):
        # slow weights taken when the group joined, moved half way to its one fast step
        fast = start.add(p.grad, alpha=-0.05)  # SGD's update, as SGD computes it
        torch.testing.assert_close(p.detach(), start.lerp(fast, 0.5), rtol=0, atol=0)
        assert torch.equal(opt.state[p]["slow_weights"], p.detach())
    fresh = Lookahead(torch.optim.SGD(make_model().parameters(), lr=0.1), k=2)
    fresh.load_state_dict(
        Lookahead(torch.optim.SGD(make_model().parameters(), lr=0.1)).state_dict()
    )
    fresh.step()  # no gradients: the weights stay, but slow weights must exist for the sync
    fresh.step()
    assert all("slow_weights" in fresh.state[p] for p in fresh._params())


def test_synchronisation_over_mixed_dtypes_is_the_per_tensor_lerp():
    # the fused lerp/copy runs over float32 and float64 parameters in one call
    gen = torch.Generator().manual_seed(3)
    a = nn.Parameter(torch.randn(4, generator=gen))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64, generator=gen))
    starts = [a.detach().clone(), b.detach().clone()]
    opt = Lookahead(torch.optim.SGD([a, b], lr=0.3), k=1, alpha=0.3)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    for p, start in zip([a, b], starts):
        expected = start.lerp(start - 0.3, 0.3)  # slow + alpha (fast - slow)
        assert p.dtype == start.dtype and torch.equal(p.detach(), expected)


def test_reading_the_state_before_the_first_step_keeps_the_start_as_slow_weights():
    # opt.state is a defaultdict: reading it adds an empty entry, which must not count as
    # slow weights (the docstring's example, with the state read first)
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = Lookahead(torch.optim.SGD([w], lr=0.5), k=2, alpha=0.5)
    assert opt.state[w] == {}
    for _ in range(2):
        opt.zero_grad()
        (0.5 * w**2).sum().backward()  # each fast step halves w: 1 -> 0.25
        opt.step()
    assert w.item() == 0.625  # 1 + 0.5 (0.25 - 1), exact in binary
