"""Exact reversible learning (Maclaurin et al. 2015): bit-exact reversal, the information
buffer, and hypergradients against reverse mode, forward mode and finite differences."""

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

import _readme
import hypergradient as hg
from hypergradient.hypergrad.reversible import ExactMomentumSGD, InfoBuffer, momentum_fraction
from hypergradient.testing import finite_difference_hypergrad, quadratic_problem, relative_error

# Parametrize lists are built at collection, before conftest makes float64 the default.
F64 = torch.float64

# ----------------------------------------------------------------------------- the buffer


def test_info_buffer_push_and_pop_are_exact_inverses():
    # Random bases up to 2**24 (powers of two, base 1, the maximum), runs of maximal and of
    # zero digits (the spills and refills at the edges of the state's range), and pops
    # interleaved with pushes, including pops with a base other than the one pushed (what
    # the exact multiplication does).  Undoing everything in LIFO order must restore every
    # state bit for bit and leave the buffer empty, with nothing but the per-weight state.
    rng = random.Random(0)
    size, max_base = 7, 2**24
    buf = InfoBuffer(size, max_base=max_base)
    empty_bytes = buf.nbytes
    log = []
    for i in range(1500):
        kind = i % 5
        base = [rng.randint(1, max_base), 2 ** rng.randint(0, 24), max_base, rng.randint(2, 12),
                rng.randint(2, 300)][kind]  # fmt: skip
        before = (buf.to_ints(), buf.bit_lengths().tolist()) if i % 50 == 0 else None
        if i % 40 == 7:  # whole int64 values (momentum 0), on a stack of their own
            values = [rng.randrange(-(2**63), 2**63) for _ in range(size)]
            buf.push_wide(torch.tensor(values))
            log.append(("wide", None, values, before))
        elif rng.random() < 0.6:
            style = rng.random()
            if style < 0.2:
                digits = [base - 1] * size
            elif style < 0.3:
                digits = [0] * size
            else:
                digits = [rng.randrange(base) for _ in range(size)]
            buf.push(torch.tensor(digits), base)
            log.append(("push", base, digits, before))
        else:
            digits = buf.pop(base).tolist()
            assert all(0 <= v < base for v in digits)
            log.append(("pop", base, digits, before))
    numbers = buf.to_ints()
    wide_bits = 64 * sum(op == "wide" for op, *_ in log)
    assert buf.bit_lengths().tolist() == [v.bit_length() + wide_bits for v in numbers]
    assert min(numbers).bit_length() > 2000  # deep stacks of words
    for op, base, digits, before in reversed(log):
        if op == "wide":
            assert buf.pop_wide().tolist() == digits
        elif op == "push":
            assert buf.pop(base).tolist() == digits
        else:
            buf.push(torch.tensor(digits), base)
        if before is not None:
            assert (buf.to_ints(), buf.bit_lengths().tolist()) == before
    assert buf.is_empty() and buf.to_ints() == [0] * size
    assert buf.nbytes == empty_bytes  # the words were freed on the way back
    # an empty number pops 0 and stays empty
    assert buf.pop(10).tolist() == [0] * size and buf.is_empty()


def test_info_buffer_exchange_is_pop_then_push():
    # The exact multiplication calls exchange(n, d, fn): pop a digit of base n, push fn's
    # digit of base d, minus the refill-then-spill pairs that cancel.  It must leave the
    # buffer bit for bit where pop-then-push leaves it, from every kind of state.
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    size = 400
    bases = [1, 2, 3, 9, 10, 17, 171, 190, 1000, 2**16 - 1, 2**16, 70001, 2**20 - 3, 2**24]
    buf = InfoBuffer(size, max_base=2**24)
    for i in range(400):
        pop_base, push_base = rng.choice(bases), rng.choice(bases)
        pushed = torch.randint(0, push_base, (size,), generator=gen)

        def fn(u, pushed=pushed, push_base=push_base):
            return (pushed + u) % push_base, u

        ref = copy.deepcopy(buf)
        u_ref = ref.pop(pop_base)
        ref.push(fn(u_ref)[0], push_base)
        assert torch.equal(buf.exchange(pop_base, push_base, fn), u_ref)
        assert torch.equal(buf._x, ref._x) and torch.equal(buf._depth, ref._depth), i
        if i % 100 == 0:
            assert buf.to_ints() == ref.to_ints()


@pytest.mark.parametrize(("push_base", "pop_base"), [(10, 9), (2**20, 2**20 - 3), (2, 1)])
def test_info_buffer_holds_what_the_digits_carry(push_base, pop_base):
    # T steps of "pop a digit of base n, push a uniform digit of base d" (the exact
    # multiplication by n/d) grow a number by log2(d/n) bits a step on average: uneven slots
    # cost at most 7e-4 bits per digit, and the first digits of an empty number cost about
    # log2(M) bits once (the larger precision M of the two bases: 2**(ceil(log2 b) + 4), or
    # b for a power of two); the numbers
    # scatter around that by a few bits (std ~2: which digits came, leading zeros).  Memory:
    # the information plus the state, the depth and a partly filled chunk of words, under
    # 2 words of 64 bits per number (measured 1.0-1.25).
    size, steps = 500, 600
    buf = InfoBuffer(size, max_base=2**24)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        buf.pop(pop_base)
        buf.push(torch.randint(0, push_base, (size,), generator=gen), push_base)
    bits = buf.bit_lengths().double()
    ideal = steps * math.log2(push_base / pop_base)
    one_off = max((b - 1).bit_length() + (4 if b & (b - 1) else 0) for b in (push_base, pop_base))
    assert ideal - 2 <= float(bits.mean()) <= ideal + one_off + 7e-4 * steps
    assert buf.nbytes * 8 < float(bits.sum()) + 2 * 64 * size


def test_info_buffer_bad_base():
    buf = InfoBuffer(3, max_base=2**16)
    with pytest.raises(hg.HypergradientError, match=r"base 65537 is outside \[1, max_base=65536\]"):
        buf.push(torch.zeros(3, dtype=torch.int64), 2**16 + 1)
    with pytest.raises(hg.HypergradientError, match=r"InfoBuffer\(size=0\)"):
        InfoBuffer(0)
    with pytest.raises(hg.HypergradientError, match=r"max_base=33554432\).*\[2, 2\*\*24\]"):
        InfoBuffer(3, max_base=2**25)


# ----------------------------------------------------------------- exact vs naive reversal


def _softmax_regression(n=500):
    """The paper's CPU target: softmax regression on 500 digits, w0 = 0.01 N(0, 1)."""
    split = hg.data.load_digits_split(n_train=n, n_val=100, dtype=torch.float64)
    x, y = split.x_train, split.y_train
    w0 = 0.01 * torch.randn(64 * 10 + 10, generator=torch.Generator().manual_seed(0))

    def grad(w):
        w = w.detach().requires_grad_(True)
        loss = F.cross_entropy(x @ w[:640].view(64, 10) + w[640:], y)
        return torch.autograd.grad(loss, w)[0]

    return grad, w0


def _naive_float_reversal_error(grad, w0, steps, lr, mom):
    """Run float64 SGD-momentum forward, undo it in float64, return max |w0 - w0_rebuilt|."""
    w, b = w0.clone(), torch.zeros_like(w0)
    for _ in range(steps):
        b = mom * b + grad(w)
        w = w - lr * b
    for _ in range(steps):
        w = w + lr * b
        b = (b - grad(w)) / mom  # divides the round-off by mom < 1 every step
    return float((w - w0).abs().max())


def test_exact_reversal_is_bit_for_bit_while_naive_float_reversal_diverges():
    # Maclaurin's alpha = 0.3, gamma = 0.9 (v <- gamma v - (1 - gamma) g, w <- w + alpha v)
    # is torch's form b <- 0.9 b + g, w <- w - 0.03 b.
    grad, w0 = _softmax_regression()
    steps, lr, mom = 1000, 0.03, 0.9
    sgd = ExactMomentumSGD([lr] * steps, [mom] * steps)
    state = sgd.init(w0)
    forward = [(state.w.clone(), state.b.clone())]
    for t in range(steps):
        sgd.step(state, grad(sgd.to_float(state.w, torch.float64)), t)
        forward.append((state.w.clone(), state.b.clone()))
    # the buffer holds ~0.152 bits per weight and step, not the trajectory
    assert 0.14 * steps < state.buffer.bit_lengths().double().mean() < 0.16 * steps
    for t in reversed(range(steps)):
        sgd.undo_position(state, t)
        sgd.undo_velocity(state, grad(sgd.to_float(state.w, torch.float64)), t)
        # integer equality of weights and velocity at every step
        assert torch.equal(state.w, forward[t][0]) and torch.equal(state.b, forward[t][1])
    assert state.buffer.is_empty()
    # w0 itself back, to the bit (w0 was rounded to the 2**-52 grid on the way in)
    assert torch.equal(sgd.to_float(state.w, torch.float64), sgd.to_float(forward[0][0], w0.dtype))

    # The same reversal in float64 arithmetic: the round-off of each step is divided by
    # 0.9 once per step back, 0.9**-1000 ~ 1e46, so w0 is lost (the paper's 5e9 at T=600).
    # Short runs still reverse well (paper: 6e-13 at T=100), which shows the cause.
    assert _naive_float_reversal_error(grad, w0, 100, lr, mom) < 1e-8
    naive = _naive_float_reversal_error(grad, w0, steps, lr, mom)
    assert not naive < 1e-3  # also true for NaN/inf


# ------------------------------------------------------------------ buffer growth rate


def test_buffer_grows_log2_one_over_mu_bits_per_weight_and_step():
    # Each step maps a weight's buffer number S to ~S * d / n: log2(d/n) = log2(1/mu) more
    # bits, plus at most 2 x 7e-4 bits once S passes 2**47 and its digits are coded with
    # slots of uneven size (see InfoBuffer).  On top of that each weight pays a one-off of
    # at most log2(d) + 1 bits while S is still small (the first pops find an empty buffer;
    # measured: 2.8 bits for 9/10, 14 for the schedule's d up to 1e5), so the rate per step
    # is within (log2(d_max) + 1) / T + 0.0014 of log2(1/mu): 0.152 +- 0.0057 for mu = 0.9
    # over T = 1000 steps.  (A weight whose velocity is exactly zero loses nothing, so the
    # problem keeps every velocity nonzero.)
    inner, outer, init = _mlp_problem(2)
    hparams = {"log_l2": torch.full((4, 6), -2.0), "init_scale": torch.tensor(0.5)}
    steps = 1000

    def one_off(momenta):
        max_d = max(momentum_fraction(m, 2**20)[1] for m in momenta)
        return (math.log2(max_d) + 1) / steps + 2 * 7e-4

    # mu = 0.9 through the public function and its statistics
    res = hg.reversible_hypergrad(inner, outer, init, hparams, steps, lr=0.05, momentum=0.9)
    stats = res.stats
    assert stats.idle_weights == 0
    assert stats.expected_bits_per_weight_per_step == pytest.approx(math.log2(1 / 0.9))
    assert stats.bits_per_weight_per_step == pytest.approx(0.152, abs=one_off([0.9]))
    # memory: the information plus, per weight, the 64-bit state, a 32-bit depth and a
    # partly filled chunk of 16-bit words (measured 1.45x the information at T = 1000), and
    # 1/100 of the float64 trajectory (2 x 64 bits per weight and step)
    assert stats.buffer_bytes * 8 < stats.buffer_bits + 2 * 64 * stats.num_weights
    assert stats.buffer_bytes < stats.trajectory_bytes / 100

    # a momentum schedule 0.5 -> 0.99: the forward pass alone fills the buffer
    momenta = [0.5 + 0.49 * (t / steps) for t in range(steps)]
    sgd = ExactMomentumSGD([0.05] * steps, momenta)
    layout_keys = ("w1", "b1", "w2")
    w0 = init(hparams)
    shapes = [w0[k].shape for k in layout_keys]
    state = sgd.init(torch.cat([w0[k].reshape(-1) for k in layout_keys]))
    for t in range(steps):
        flat = sgd.to_float(state.w, torch.float64).requires_grad_(True)
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        w = {k: p.view(s) for k, p, s in zip(layout_keys, parts, shapes)}
        sgd.step(state, torch.autograd.grad(inner(w, hparams), flat)[0], t)
    bits = state.buffer.bit_lengths().double()
    expected = sum(math.log2(1 / m) for m in momenta) / steps
    assert bool((bits > 0).all())
    assert float(bits.mean()) / steps == pytest.approx(expected, abs=one_off(momenta))


# ------------------------------------------------------- hypergradients vs other modes


def _mlp_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 4, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    Xv = torch.randn(30, 4, generator=gen)
    yv = torch.randint(0, 3, (30,), generator=gen)
    w_init = {
        "w1": torch.randn(4, 6, generator=gen),
        "b1": torch.zeros(6),
        "w2": torch.randn(6, 3, generator=gen),
    }

    def net(p, x):
        return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    def inner(p, h):  # per-weight L2 on the first layer
        return F.cross_entropy(net(p, X), y) + 0.5 * (h["log_l2"].exp() * p["w1"] ** 2).sum()

    def outer(p, h):
        return F.cross_entropy(net(p, Xv), yv)

    def init(h):  # w0 = scale * w_init: the initial scale is a hyperparameter
        return {k: h["init_scale"] * v for k, v in w_init.items()}

    return inner, outer, init


@pytest.mark.parametrize("generic_momenta", [False, True])
def test_reversible_equals_reverse_forward_and_finite_differences(generic_momenta):
    # How close must the modes be?  Reversible runs SGD on the fixed-point grid 2**-52: each
    # operation rounds to it (the momentum product with a dither from the buffer), at most
    # one grid unit, 2.2e-16 absolute, like float64 round-off; and it applies mu_t as the
    # fraction n/d with d <= 2**20, exact for the linspace schedule (d = 190) and within
    # ~1e-12 for generic floats.  The hypergradient is the derivative of the real-valued
    # update at those points, so on this non-chaotic problem the three modes differ by
    # round-off (~1e-14), and 1e-8 leaves a wide margin for the rounding of the trajectory.
    inner, outer, init = _mlp_problem()
    steps = 20
    if generic_momenta:
        gen = torch.Generator().manual_seed(1)
        mom = 0.6 + 0.3 * torch.rand(steps, generator=gen)
    else:
        mom = torch.linspace(0.5, 0.9, steps)
    hparams = {
        "log_l2": torch.full((4, 6), -2.0) + 0.2 * torch.arange(24.0).reshape(4, 6) / 24,
        "lr": torch.linspace(0.4, 0.1, steps),  # per-step learning-rate schedule
        "mom": mom,  # per-step momentum schedule
        "init_scale": torch.tensor(0.5),
    }
    kw = dict(steps=steps, lr="lr", momentum="mom")
    res = hg.reversible_hypergrad(inner, outer, init, hparams, **kw)
    if generic_momenta:
        assert 0 < res.stats.momentum_max_error < 1e-10
    else:
        assert res.stats.momentum_max_error < 1e-15
    via_mode = hg.unrolled_hypergrad(inner, outer, init, hparams, mode="reversible", **kw)
    rev, w_rev = hg.unrolled_hypergrad(
        inner, outer, init, hparams, mode="reverse", return_params=True, **kw
    )
    fwd = hg.unrolled_hypergrad(inner, outer, init, hparams, mode="forward", **kw)
    for key in hparams:  # each hyperparameter on its own, not drowned by a larger one
        assert relative_error({key: res.hypergrad[key]}, {key: rev[key]}) < 1e-8, key
        assert relative_error({key: res.hypergrad[key]}, {key: fwd[key]}) < 1e-8, key
    assert all(torch.equal(via_mode[k], res.hypergrad[k]) for k in hparams)
    assert relative_error(res.params, w_rev) < 1e-12  # the trajectories agree to round-off
    assert all(bool(v.ne(0).any()) for v in res.hypergrad.values())

    if not generic_momenta:

        def response(h):
            _, w = hg.unrolled_hypergrad(
                inner, outer, init, h, mode="reverse", return_params=True, **kw
            )
            return outer(w, h)

        fd = finite_difference_hypergrad(response, hparams, eps=1e-6)
        # central differences: O(eps^2) truncation + O(1e-16 / eps) round-off ~ 1e-9
        for key in hparams:
            assert relative_error({key: res.hypergrad[key]}, {key: fd[key]}) < 1e-6, key


def test_long_run_matches_reverse_mode():
    # 1000 steps through the public function: the reverse pass rebuilds w_0 exactly (it
    # raises otherwise) and the hypergradient still equals reverse mode's.
    inner, outer, init = _mlp_problem(1)
    hparams = {"log_l2": torch.full((4, 6), -3.0), "log_lr": torch.tensor(-2.5),
               "init_scale": torch.tensor(0.3)}  # fmt: skip
    kw = dict(steps=1000, lr=lambda h, t: h["log_lr"].exp(), momentum=0.9)
    res = hg.reversible_hypergrad(inner, outer, init, hparams, **kw)
    rev = hg.unrolled_hypergrad(inner, outer, init, hparams, mode="reverse", **kw)
    for key in hparams:
        assert relative_error({key: res.hypergrad[key]}, {key: rev[key]}) < 1e-8, key


def test_plain_sgd_and_float32():
    # mu = 0 forgets the velocity: the whole of it is kept (64 bits per weight and step),
    # which still reverses exactly, but stores as much as the float64 trajectory: a warning
    # names both sizes and the mode to use.  float32 weights: the same integer machinery;
    # the hypergradient then agrees with float32 reverse mode to float32 round-off.
    p = quadratic_problem()
    with pytest.warns(
        hg.ReversibleMemoryWarning,
        match=r"momentum is 0 at 30 of 30 steps, so the reversal buffer must hold 64\.0 bits "
        r"per weight and step: 0\.00144 MB for T=30 steps of 6 weights, no less than storing "
        r"the trajectory w_1\.\.w_T in float64 \(0\.00144 MB\)\..*use mode='reverse' \(with "
        r"truncate=K",
    ):
        res = hg.reversible_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, 30, 0.1, 0.0)
    rev = hg.unrolled_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, 30, 0.1)
    assert relative_error(res.hypergrad, rev) < 1e-12
    assert res.stats.expected_bits_per_weight_per_step == 64.0
    assert res.stats.bits_per_weight_per_step == 64.0

    # momentum 0 at every other step: the velocity is kept whole there and coded in between
    # (a mean of 32.1 bits per step: no warning for float64, one for float32)
    mom = torch.tensor([0.0, 0.8] * 15)
    hp = dict(p.hparams, mom=mom)
    args = (p.inner_loss, p.outer_loss, p.params, hp, 30, 0.1, "mom")
    res = hg.reversible_hypergrad(*args)
    rev = hg.unrolled_hypergrad(*args)
    assert relative_error(res.hypergrad, rev) < 1e-12
    assert res.stats.expected_bits_per_weight_per_step == pytest.approx((64 + math.log2(5 / 4)) / 2)

    data32 = {k: v.float() for k, v in p.data.items()}
    A, B, c = data32["A"], data32["B"], data32["c"]

    def inner32(w, h):
        return 0.5 * w["w"] @ A @ w["w"] + w["w"] @ (B @ h["lam"] + c)

    def outer32(w, h):
        return 0.5 * ((w["w"] - data32["target"]) ** 2).sum() + data32["e"] @ h["lam"]

    params32 = {"w": p.params["w"].float()}
    hp32 = {"lam": p.hparams["lam"].float()}
    res32 = hg.reversible_hypergrad(inner32, outer32, params32, hp32, 30, 0.1, 0.9)
    rev32 = hg.unrolled_hypergrad(inner32, outer32, params32, hp32, 30, 0.1, 0.9)
    assert res32.hypergrad["lam"].dtype == torch.float32
    assert relative_error(res32.hypergrad, rev32) < 1e-5
    with pytest.warns(hg.ReversibleMemoryWarning, match=r"0 at 15 of 30 steps.*in float32"):
        hg.unrolled_hypergrad(
            inner32, outer32, params32, hp32, 30, 0.1, mom.float(), mode="reversible"
        )


# ----------------------------------------------------------------------------- bad input


def test_error_truncate_with_reversible():
    p = quadratic_problem()
    with pytest.raises(hg.HypergradientError, match=r"truncate=3 with mode='reversible'"):
        hg.unrolled_hypergrad(
            p.inner_loss, p.outer_loss, p.params, p.hparams, 10, 0.1, 0.9,
            mode="reversible", truncate=3,
        )  # fmt: skip


def _call(**overrides):
    p = quadratic_problem()
    args = dict(
        inner_loss=p.inner_loss, outer_loss=p.outer_loss, params0=p.params, hparams=p.hparams,
        steps=10, lr=0.1, momentum=0.9,
    )  # fmt: skip
    args.update(overrides)
    return hg.reversible_hypergrad(**args)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"hparams": {"lam": torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=F64)}},
         r"hparams\['lam'\].*contains 1 NaN/inf"),
        ({"params0": {"w": torch.full((6,), 1e4, dtype=F64)}},
         r"largest magnitude in the initial weights is 1e\+04, outside the fixed-point "
         r"range \+-512 of fraction_bits=52\. Pass fewer fraction_bits"),
        ({"lr": 1e3}, r"outside the fixed-point range.*lower the learning rate"),
        ({"momentum": 1.5}, r"momentum at step 0 is 1.5; reversible mode needs momenta in "
         r"\[0, 1\]"),
        ({"momentum": lambda h, t: -0.1 if t == 4 else 0.9}, r"momentum at step 4 is -0.1"),
        ({"lr": lambda h, t: torch.ones(2)}, r"lr at step 0 has shape \(2,\); reversible mode "
         r"needs one scalar lr per step"),
        ({"lr": lambda h, t: float("inf")}, r"lr at step 0 is inf \(not finite\)"),
        ({"lr": "eta"}, r"reversible_hypergrad\(\.\.\.\): lr='eta' names a hyperparameter"),
        ({"steps": 0}, r"steps must be an int >= 1, got 0"),
        ({"fraction_bits": 62}, r"fraction_bits=62; expected 8\.\.60"),
        ({"max_denominator": 0}, r"max_denominator=0; expected an int in \[1, 2\*\*24\]"),
        ({"params0": lambda h: [h["lam"]]}, r"params0 is a callable, so it must return the "
         r"initial weights as a dict of tensors"),
        ({"hparams": {"lam": torch.ones(4, dtype=F64), "junk": torch.ones(2, dtype=F64)}},
         r"\['junk'\].*silently zero"),
        ({"inner_loss": 3}, r"`inner_loss` must be a callable"),
    ],
)  # fmt: skip
def test_error_bad_input(overrides, pattern):
    with pytest.raises(hg.HypergradientError, match=pattern):
        _call(**overrides)


def test_error_non_finite_gradient():
    # sqrt(|w|) at w = 0: a finite loss with an infinite gradient
    def inner(p, h):
        return p["w"].abs().sqrt().sum() + p["w"].sum() * h["lam"].sum()

    with pytest.raises(hg.HypergradientError, match=r"gradient at step 0 contains NaN/inf"):
        _call(inner_loss=inner, params0={"w": torch.zeros(6)})


def test_error_non_deterministic_inner_loss():
    # Fresh noise on every call: the reverse pass recomputes different gradients, so it
    # cannot rebuild w_0; this is detected and reported, never returned as a hypergradient.
    p = quadratic_problem()

    def noisy(w, h):
        return p.inner_loss(w, h) + 1e-3 * (torch.randn(6) * w["w"]).sum()

    with pytest.raises(hg.HypergradientError, match=r"did not reconstruct.*deterministic"):
        _call(inner_loss=noisy)


# ----------------------------------------------------------------------------- README


# the same derivative by reverse mode, in the example's interpreter
_REVERSE = """
rev = hg.unrolled_hypergrad(
    inner_loss, outer_loss, lambda h: {k: h["init_scale"] * v for k, v in w_init.items()},
    hp, T, "lr", "momentum", mode="reverse",
)
"""
README_EXAMPLE = _readme.example(
    "hg.reversible_hypergrad(",
    epilogue=_REVERSE,
    T="T",
    hypergrad="result.hypergrad",
    reverse="rev",
    bits="result.stats.bits_per_weight_per_step",
)


def test_readme_reversible_example_runs():
    # The README's reversible example, alone in a fresh interpreter: check the result against
    # reverse mode (the same derivative) and the buffer's size.
    run = README_EXAMPLE.run()
    T = run.values["T"]
    result = {k: torch.tensor(v, dtype=torch.float64) for k, v in run.values["hypergrad"].items()}
    rev = {k: torch.tensor(v, dtype=torch.float64) for k, v in run.values["reverse"].items()}
    assert result["lr"].shape == (T,)
    assert set(result) == set(rev) == {"log_l2", "lr", "momentum", "init_scale"}
    for key in rev:
        assert relative_error({key: result[key]}, {key: rev[key]}) < 1e-8, key
    # mu = 0.9 throughout: log2(1/0.9) = 0.152 bits per weight and step, plus the one-off
    # (<= log2(10) + 1 bits per weight) over T = 300 steps
    assert 0.152 - 4.4 / T <= run.values["bits"] <= 0.152 + 4.4 / T
    assert "torch.Size([300])" in run.stdout
