"""Hessian spectrum tools and Granziol's learning-rate rule.

* Lanczos (full reorthogonalisation) against dense eigensolvers: no ghost eigenvalues,
  exact breakdown, honest residual bounds; the top eigenvalue of a small network's Hessian
  and Gauss-Newton matrix within 1% of ``torch.linalg.eigvalsh`` of the dense matrices.
* Stochastic Lanczos quadrature: Gauss quadrature exactness, moments and mass of a known
  spectrum, the trace of a network's Hessian.
* ``propose_learning_rate``: the mini-batch top eigenvalue of spiked least squares matches
  the BBP prediction (papers.md section 9, calibration (a)); on streaming least squares the
  largest stable SGD rate grows ~linearly with the batch size, then saturates, and stays
  within a factor 2 of the bound (calibration (b)); Adam's preconditioned curvature against
  a dense computation; the model is left unchanged; on digits the proposed SGD rate trains
  an MLP while twice it blows the loss up (and then recovers: no divergence), and on a
  quadratic loss (least squares, linear model) the bound is the divergence threshold, so
  with ``safety=0.9`` the proposal trains stably and twice it diverges (the benchmark
  ``benchmarks/lr_proposal.py`` has the full study).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hypergradient import HypergradientError
from hypergradient.data import load_digits_split
from hypergradient.optimizers import (
    SymmetricOperator,
    curvature_operator,
    hessian_eigenvalues,
    hessian_spectral_density,
    lanczos,
    propose_learning_rate,
    scale_learning_rate,
    spectral_density,
    top_eigenvalues,
)


def random_symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return (q * eigenvalues) @ q.T


def small_problem(seed: int = 0):
    """A 4-6-3 tanh MLP (51 weights) with cross-entropy on 20 random points."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 4, generator=gen)
    y = torch.randint(0, 3, (20,), generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, x, y


def flat_function(model: nn.Module, fn):
    """``fn(outputs)`` as a function of the flat parameter vector (for torch.func)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def call(w):
        params = {k: piece.view(s) for k, piece, s in zip(names, torch.split(w, sizes), shapes)}
        return fn(params)

    return call, w0


def dense_hessian(model, x, y):
    f, w0 = flat_function(model, lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))
    return torch.func.hessian(f)(w0)


def dense_gauss_newton(model, x, y):
    out_fn, w0 = flat_function(model, lambda p: functional_call(model, p, (x,)))
    jac = torch.func.jacrev(out_fn)(w0).reshape(-1, w0.numel())  # (N*C, P)
    logits = out_fn(w0).detach()
    h_out = torch.func.hessian(lambda z: F.cross_entropy(z.view_as(logits), y))(logits.reshape(-1))
    return jac.T @ h_out @ jac


# --------------------------------------------------------------------------------------
# Lanczos
# --------------------------------------------------------------------------------------


def test_full_reorthogonalisation_leaves_no_ghost_eigenvalues():
    # Eigenvalues spread over 4 decades: plain Lanczos loses orthogonality as soon as the
    # top Ritz value converges and then repeats it ("ghosts").  With full
    # reorthogonalisation, n steps reproduce the spectrum one-to-one.
    eig = torch.logspace(0, 4, 80)
    op = SymmetricOperator.from_matrix(random_symmetric(eig))
    res = lanczos(op, torch.ones(80), num_steps=80)
    ritz, _ = res.ritz()
    # relative to ||A|| = 1e4, rounding level of a float64 Krylov process is ~1e-12
    torch.testing.assert_close(ritz, eig, rtol=0, atol=1e-8)
    assert res.num_matvecs == op.num_matvecs == 80


def test_breakdown_on_an_invariant_subspace_gives_exact_eigenvalues():
    # three distinct eigenvalues: the Krylov space of any vector has dimension 3
    a = torch.diag(torch.tensor([1.0] * 10 + [2.0] * 10 + [5.0] * 10))
    res = lanczos(SymmetricOperator.from_matrix(a), torch.ones(30), num_steps=20)
    assert res.num_matvecs == 3 and res.last_beta == 0.0
    torch.testing.assert_close(res.ritz()[0], torch.tensor([1.0, 2.0, 5.0]), rtol=0, atol=1e-12)
    ev = top_eigenvalues(SymmetricOperator.from_matrix(a), k=3, num_steps=20)
    assert torch.all(ev.residuals == 0)


def test_gauss_quadrature_is_exact_below_degree_2m():
    # sum_j tau_j theta_j^p = v^T A^p v for p < 2m (v normalised): the defining property
    # of the Lanczos quadrature that stochastic Lanczos quadrature averages
    a = random_symmetric(torch.linspace(0.5, 3.0, 40), seed=1)
    v = torch.randn(40, generator=torch.Generator().manual_seed(2))
    v = v / v.norm()
    res = lanczos(SymmetricOperator.from_matrix(a), v, num_steps=6)
    theta, s = res.ritz()
    tau = s[0] ** 2
    for p in range(12):
        exact = v @ torch.linalg.matrix_power(a, p) @ v
        assert float((tau * theta**p).sum()) == pytest.approx(float(exact), rel=1e-10)


def test_residuals_bound_the_distance_to_a_true_eigenvalue():
    eig = torch.linspace(1, 2, 200) ** 3
    op = SymmetricOperator.from_matrix(random_symmetric(eig, seed=3))
    ev = top_eigenvalues(op, k=4, num_steps=12)
    for value, residual in zip(ev.values, ev.residuals):
        distance = (eig - value).abs().min()
        assert distance <= residual + 1e-12  # the Kahan/Parlett bound, rigorous
    assert ev.residuals[0] < ev.residuals[-1]  # the top value converges first


def test_top_eigenvalue_of_a_network_hessian_within_one_percent_of_dense():
    model, x, y = small_problem()
    dense = torch.linalg.eigvalsh(dense_hessian(model, x, y))  # ascending, 51 values
    ev = hessian_eigenvalues(model, F.cross_entropy, (x, y), k=3, num_steps=20)
    # the brief's criterion is 1%; a separated top eigenvalue converges much faster than
    # that in 20 of the 51 possible steps (observed relative error ~1e-12)
    assert float(ev.values[0]) == pytest.approx(float(dense[-1]), rel=1e-2)
    assert float(ev.values[0]) == pytest.approx(float(dense[-1]), rel=1e-8)
    for value, residual in zip(ev.values, ev.residuals):
        assert (dense - value).abs().min() <= residual + 1e-10


def test_top_eigenvalue_of_the_gauss_newton_matrix_against_dense():
    model, x, y = small_problem(seed=4)
    dense = torch.linalg.eigvalsh(dense_gauss_newton(model, x, y))
    assert dense[0] > -1e-12  # positive semi-definite, unlike the Hessian
    ev = hessian_eigenvalues(model, F.cross_entropy, (x, y), num_steps=20, kind="gauss_newton")
    assert float(ev.values[0]) == pytest.approx(float(dense[-1]), rel=1e-8)


# --------------------------------------------------------------------------------------
# stochastic Lanczos quadrature
# --------------------------------------------------------------------------------------


def test_density_of_a_two_cluster_spectrum():
    # half the eigenvalues at 1, half at 10 (n = 400)
    eig = torch.cat([torch.ones(200), torch.full((200,), 10.0)])
    op = SymmetricOperator.from_matrix(random_symmetric(eig, seed=5))
    sd = spectral_density(op, num_vectors=20, num_steps=10, seed=0)
    assert sd.nodes.shape == sd.weights.shape == (20, 2)  # breakdown after 2 steps
    assert torch.allclose(sd.weights.sum(dim=1), torch.ones(20))
    # trapezoid rule of a density whose grid extends 5 sigma past every node
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-6)
    # Hutchinson-type estimates: std of moment(1) over one normalised Rademacher vector
    # is about sqrt(2 sum(lambda^2)) / n = 0.50, so 0.11 with 20 vectors; 0.5 is ~4.5 std
    assert sd.moment(1) == pytest.approx(5.5, abs=0.5)
    low = sd.grid < 5.5
    mass_low = float(torch.trapezoid(sd.density[low], sd.grid[low]))
    assert mass_low == pytest.approx(0.5, abs=0.05)  # same variance argument, / 9
    assert sd.evaluate(torch.tensor([1.0, 5.5, 10.0])).argmin() == 1  # two peaks


def test_density_of_a_network_hessian_estimates_its_trace():
    model, x, y = small_problem(seed=6)
    h = dense_hessian(model, x, y)
    sd = hessian_spectral_density(model, F.cross_entropy, (x, y), num_vectors=30, num_steps=25)
    # moment(1) = mean_v v^T H v / P-ish: its std for normalised Rademacher vectors is
    # sqrt(2 (||H||_F^2 - sum H_ii^2)) / P per vector; allow 5 standard errors
    p = h.shape[0]
    std = math.sqrt(2 * (float((h * h).sum()) - float((h.diagonal() ** 2).sum()))) / p
    assert sd.moment(1) == pytest.approx(float(h.trace()) / p, abs=5 * std / math.sqrt(30))
    # the Ritz values lie inside the spectrum
    dense = torch.linalg.eigvalsh(h)
    assert float(sd.nodes.min()) >= float(dense[0]) - 1e-8
    assert float(sd.nodes.max()) <= float(dense[-1]) + 1e-8
    assert sd.sigma == pytest.approx(0.01 * float(sd.nodes.max() - sd.nodes.min()))


# --------------------------------------------------------------------------------------
# learning rates
# --------------------------------------------------------------------------------------


def test_scaling_rules():
    # the measured defaults: exponent 2/3 for SGD, the square root for Adam (the evidence:
    # benchmarks/optimizers_in_training_batch_size.py; tests/test_batch_size_benchmark.py
    # checks them against its results); rule="linear" is Granziol's SGD rule, shipped before.
    # Ratios are powers of 2: exact up to the rounding of x ** (2 / 3).
    assert scale_learning_rate(0.1, 16, 128) == pytest.approx(0.4, rel=1e-14)
    assert scale_learning_rate(0.1, 128, 16, "sgd") == pytest.approx(0.025, rel=1e-14)
    assert scale_learning_rate(0.1, 32, 128) == pytest.approx(0.1 * 4 ** (2 / 3), rel=1e-15)
    assert scale_learning_rate(1e-3, 32, 128, "adam") == pytest.approx(2e-3, rel=1e-15)
    assert scale_learning_rate(0.1, 32, 128, rule="linear") == pytest.approx(0.4, rel=1e-15)
    assert scale_learning_rate(0.1, 32, 8, rule="linear") == pytest.approx(0.025, rel=1e-15)
    assert scale_learning_rate(1e-3, 32, 128, "adam", rule="linear") == pytest.approx(4e-3)
    assert scale_learning_rate(0.1, 32, 128, rule="sqrt") == pytest.approx(0.2, rel=1e-15)
    assert scale_learning_rate(0.1, 16, 1024, "adam", rule=0.0) == 0.1  # no scaling
    assert scale_learning_rate(0.3, 48, 48) == 0.3
    # a power law composes: B -> B' -> B'' equals B -> B'' for every rule
    for rule in (None, "linear", "sqrt", 0.37):
        via = scale_learning_rate(scale_learning_rate(0.1, 24, 80, rule=rule), 80, 500, rule=rule)
        assert via == pytest.approx(scale_learning_rate(0.1, 24, 500, rule=rule), rel=1e-14)
    # a numpy scalar is a number too; the result is a plain float
    assert type(scale_learning_rate(np.float32(0.5), 2, 8, rule="linear")) is float
    assert scale_learning_rate(np.float32(0.5), 2, 8, rule="linear") == 2.0


def test_minibatch_top_eigenvalue_follows_the_bbp_prediction():
    # papers.md section 9, calibration (a): least squares in P = 100 dimensions with
    # inputs x ~ N(0, I + 19 u u^T) (a spike l = 20); the mini-batch Hessian is
    # X_B^T X_B / B, whose top eigenvalue concentrates (BBP) at l + (P/B) l / (l - 1).
    # Calibrated means 25.6, 21.7, 20.7, 20.1 vs prediction 24.2, 22.1, 20.5, 20.1;
    # criterion: within 10%, decreasing toward l.
    p, n, spike = 100, 20000, 20.0
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(p, generator=gen)
    u = u / u.norm()
    x = (
        torch.randn(n, p, generator=gen)
        + math.sqrt(spike - 1) * torch.randn(n, 1, generator=gen) * u
    )
    model = nn.Linear(p, 1, bias=False)

    def half_mse(out, target):
        return 0.5 * ((out - target) ** 2).mean()

    data = (x, torch.zeros(n, 1))
    means, proposals = [], []
    for b in (25, 50, 200, 800):
        prop = propose_learning_rate(
            model, half_mse, data, b, num_batches=50, num_steps=15, density=False
        )
        predicted = spike + (p / b) * spike / (spike - 1)
        assert prop.lambda_batch == pytest.approx(predicted, rel=0.10), b
        assert prop.lr == pytest.approx(2 / prop.lambda_batch)
        means.append(prop.lambda_batch)
        proposals.append(prop)
    assert means == sorted(means, reverse=True)
    # the full-data Hessian is the sample covariance of 20000 points: top eigenvalue
    # l (1 +- sqrt(2 / n)) = 20 +- 1%
    assert proposals[0].lambda_full == pytest.approx(spike, rel=0.03)
    # Granziol's rule from the B = 25 measurement: linear below, capped at the
    # full-data bound 2 / lambda_full above (the mini-batch noise term has vanished)
    first = proposals[0]
    assert first.lr_for_batch_size(5, rule="linear") == pytest.approx(first.lr / 5)
    assert first.lr_for_batch_size(5) == pytest.approx(first.lr / 5 ** (2 / 3))  # default
    assert first.lr_for_batch_size(800, rule="linear") == pytest.approx(2 / first.lambda_full)
    assert first.lr_for_batch_size(800) == pytest.approx(2 / first.lambda_full)
    assert proposals[-1].lr == pytest.approx(2 / proposals[-1].lambda_batch)


def test_largest_stable_sgd_rate_grows_with_the_batch_then_saturates():
    # papers.md section 9, calibration (b): streaming least squares in P = 500 dimensions,
    # inputs x ~ N(0, I + 9 u u^T) (spike 10), noiseless targets x^T w*, w0 = 0, a fresh
    # batch every step.  The largest rate whose 300 SGD steps do not end above the starting
    # loss (bisection in log lr) grows about linearly with B for B <= 16 (criterion:
    # exponent in [0.5, 1.1]; observed 0.99, calibrated 0.67 with an unstated test)
    # and saturates near 2 / lambda_max(Sigma) = 0.2 (criterion: lr(512) / lr(128) in
    # [0.7, 1.3]; observed 1.01).  propose_learning_rate's bound 2 / mean lambda_max(H_B),
    # measured on a fixed sample of 4096 points, is within a factor 2 of that largest
    # stable rate at every B (observed ratios 1.04-1.41; the bisection starts from that
    # bracket): the mini-batch spectrum predicts where SGD diverges, in the noise-dominated
    # and in the saturated regime.
    p, spike, steps = 500, 10.0, 300
    f32 = {"dtype": torch.float32, "device": "cpu"}  # the simulation: float32 is plenty
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(p, generator=gen, **f32)
    u = u / u.norm()
    w_star = torch.randn(p, generator=gen, **f32) / math.sqrt(p)

    def sample(n, g):
        spiked = math.sqrt(spike - 1) * torch.randn(n, 1, generator=g, **f32) * u
        return torch.randn(n, p, generator=g, **f32) + spiked

    def excess(w):  # population loss 0.5 (w - w*)^T Sigma (w - w*)
        d = (w - w_star).double()
        return 0.5 * float(d @ d + (spike - 1) * (u.double() @ d) ** 2)

    def ends_below_start(lr, b):
        g = torch.Generator().manual_seed(b)
        w = torch.zeros(p, **f32)
        for _ in range(steps):
            x = sample(b, g)
            w = w - lr * (x.T @ (x @ (w - w_star))) / b
        return excess(w) <= excess(torch.zeros(p, **f32))  # False for NaN and inf too

    x_fixed = sample(4096, torch.Generator().manual_seed(4)).double()
    data = (x_fixed, (x_fixed @ w_star.double())[:, None])
    model = nn.Linear(p, 1, bias=False)

    def half_mse(out, target):
        return 0.5 * ((out - target) ** 2).mean()

    largest, bound = {}, {}
    for b in (1, 4, 16, 128, 512):
        bound[b] = propose_learning_rate(model, half_mse, data, b, density=False).lr
        lo, hi = math.log(bound[b] / 2), math.log(bound[b] * 2)
        # the largest stable rate lies within a factor 2 of the bound
        assert ends_below_start(math.exp(lo), b), b
        assert not ends_below_start(math.exp(hi), b), b
        for _ in range(5):  # resolution 4^(1/32): 4%
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ends_below_start(math.exp(mid), b) else (lo, mid)
        largest[b] = math.exp(lo)
    exponent = math.log(largest[16] / largest[1]) / math.log(16)
    assert 0.5 <= exponent <= 1.1
    assert 0.7 <= largest[512] / largest[128] <= 1.3


def test_adam_preconditioned_curvature_against_dense():
    # batch_size = N: every "mini-batch" is the whole data set (in another order), so
    # v = g^2 with the full gradient g, and the bound is 2 (1 + b1) / (1 - b1) divided by
    # the top eigenvalue of D^-1/2 H D^-1/2, D = sqrt(v) + eps
    model, x, y = small_problem(seed=8)
    f, w0 = flat_function(model, lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))
    g = torch.func.grad(f)(w0)
    d = (g.abs() + 1e-8).rsqrt()
    h = torch.func.hessian(f)(w0)
    expected = float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])
    prop = propose_learning_rate(
        model, F.cross_entropy, (x, y), 20, "adam", momentum=0.8, num_steps=40, density=False
    )
    assert prop.lambda_full == pytest.approx(expected, rel=1e-6)
    assert prop.lambda_batch == pytest.approx(expected, rel=1e-6)
    assert prop.lr == pytest.approx(2 * 1.8 / 0.2 / expected, rel=1e-6)
    assert prop.momentum == 0.8
    assert prop.lr_for_batch_size(5) == pytest.approx(prop.lr / 2)  # square-root rule


def test_measuring_leaves_the_model_unchanged():
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(30, 4, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model.train()  # BatchNorm updates its running statistics on every training forward
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prop = propose_learning_rate(model, F.cross_entropy, (x, y), 10, "adam", num_steps=10)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert prop.density is not None and prop.density.dim == 53
    assert prop.num_matvecs == 11 * 10 + 5 * 10


def test_momentum_enters_the_heavy_ball_bound():
    model, x, y = small_problem(seed=10)
    plain = propose_learning_rate(model, F.cross_entropy, (x, y), 10, density=False)
    heavy = propose_learning_rate(model, F.cross_entropy, (x, y), 10, momentum=0.5, density=False)
    assert heavy.lr == pytest.approx(1.5 * plain.lr)  # 2 (1 + mu) / lambda
    half = propose_learning_rate(model, F.cross_entropy, (x, y), 10, safety=0.5, density=False)
    assert half.lr == pytest.approx(0.5 * plain.lr) and half.lr_max == plain.lr_max


# --------------------------------------------------------------------------------------
# digits: the proposed rate trains, twice it blows the loss up
# --------------------------------------------------------------------------------------


def digits_mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
        )


def sgd_run(model, x, y, lr, steps, batch_size, seed, loss_fn=F.cross_entropy):
    """Plain SGD; returns the full training loss before and after every step (NaN as inf)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def full_loss():
        with torch.no_grad():
            value = float(loss_fn(model(x), y))
        return value if math.isfinite(value) else math.inf

    losses = [full_loss()]
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        losses.append(full_loss())
    return losses


def test_proposed_rate_trains_digits_and_twice_it_blows_up():
    # The protocol of benchmarks/lr_proposal.py (one seed, shorter runs).  With
    # cross-entropy the top Hessian eigenvalue grows ~5x in the first epochs
    # (progressive sharpening): measured at initialisation the bound is too large.  So:
    # warm up with SGD at 0.1x the rate proposed at initialisation until the eigenvalue
    # has plateaued (300 steps), measure there, then train from the warmed-up weights.
    # "Blows up" is precise: the full training loss rises above ln(10), the loss of the
    # uniform prediction, i.e. all the warm-up's progress is lost.
    split = load_digits_split(dtype=torch.float64)
    x, y = split.x_train, split.y_train
    batch_size, chance = 32, math.log(10)
    model = digits_mlp(seed=0)
    at_init = propose_learning_rate(model, F.cross_entropy, (x, y), batch_size, density=False)
    sgd_run(model, x, y, 0.1 * at_init.lr, 300, batch_size, seed=99)  # warm-up
    prop = propose_learning_rate(model, F.cross_entropy, (x, y), batch_size, density=False)
    assert prop.lambda_batch > 3 * at_init.lambda_batch  # the sharpening is real

    start = model.state_dict()
    runs = {}
    for factor, steps in ((1.0, 150), (2.0, 20)):
        m = digits_mlp(seed=0)
        m.load_state_dict(start)
        runs[factor] = sgd_run(m, x, y, factor * prop.lr, steps, batch_size, seed=10)
    proposed, doubled = runs[1.0], runs[2.0]
    loss0 = proposed[0]
    assert loss0 < 0.5  # the warm-up trained
    # proposed rate: finite, never back to the chance level, and decreasing: after 150
    # steps below half the start.  Observed over seeds 0-4 (this test: seed 0): max loss
    # 0.3-1.5 (the rate is at the stability edge, the loss spikes a little), last/first
    # 0.36-0.41.
    assert all(math.isfinite(v) for v in proposed)
    assert max(proposed) < chance
    assert proposed[-1] < 0.5 * loss0
    # twice the rate: above the chance level within 20 steps (observed max 6.4-10 over
    # seeds 0-4, 10.1 here: the top eigendirection grows by |1 - 2 lr lambda| = 3 a step).
    # This is a blow-up, not a divergence: over 400 steps the network "catapults" to a
    # flatter region and ends below the 1x run in 5/5 seeds (benchmark, table B); it
    # diverges for good from about 2.5-3x.
    assert max(doubled) > chance


def test_on_least_squares_the_bound_is_the_edge_and_twice_the_proposal_diverges():
    # The documented setting of the claim "the proposal trains stably, twice it diverges":
    # a linear model 64 -> 10 on digits with one-hot least squares.  The loss is quadratic,
    # the model the bound 2 / lambda_max(H_B) is derived for, so the bound is the edge
    # itself: at exactly 1x the top direction neither shrinks nor grows (|1 - lr lambda| =
    # 1) and the batch noise tips it over (benchmark: 1x ends above the start in 1/5 seeds
    # and never stays below it); 0.95x trains stably and 1.05x diverges in 5/5 seeds.  So
    # the proposal is taken with safety=0.9, a margin inside the edge: it trains stably and
    # twice it (1.8x the bound) diverges.  (On the tanh MLP no safety does this: 2x the
    # bound "catapults" and recovers; see the test above and benchmarks/lr_proposal.py.)
    split = load_digits_split(dtype=torch.float64)
    x, y = split.x_train, split.y_train

    def one_hot_mse(out, target):
        return 0.5 * ((out - F.one_hot(target, 10).to(out.dtype)) ** 2).sum(dim=1).mean()

    for seed in range(3):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            start = nn.Linear(64, 10)
        prop = propose_learning_rate(start, one_hot_mse, (x, y), 32, safety=0.9, density=False)
        assert prop.lr == pytest.approx(0.9 * prop.lr_max)
        # the mean offset of the pixels makes one outlier eigenvalue that batch noise
        # barely moves: lambda_B ~ 11.5, full data ~ 11.4
        assert prop.lambda_batch == pytest.approx(prop.lambda_full, rel=0.05)
        curves = {}
        for name, lr in (
            ("proposal", prop.lr),
            ("1.1x bound", 1.1 * prop.lr_max),
            ("twice", 2 * prop.lr),
        ):
            model = nn.Linear(64, 10)
            model.load_state_dict(start.state_dict())
            curves[name] = sgd_run(model, x, y, lr, 200, 32, seed=100 + seed, loss_fn=one_hot_mse)
        proposal = curves["proposal"]
        # stable: never above the starting loss, ends below half of it (observed 0.23-0.27)
        assert max(proposal) <= proposal[0] and proposal[-1] < 0.5 * proposal[0], seed
        # diverges: ends above the starting loss or not finite (observed 1e26 and 1e187)
        for name in ("1.1x bound", "twice"):
            assert not curves[name][-1] < curves[name][0], (seed, name)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ),
    ],
)
def test_results_on_the_model_device_equal_the_cpu(device):
    # random vectors and batches are drawn on the CPU: the same numbers on every device
    model, x, y = small_problem(seed=11)
    reference = propose_learning_rate(model, F.cross_entropy, (x, y), 10, "adam", num_steps=15)
    on = propose_learning_rate(
        model.to(device), F.cross_entropy, (x.to(device), y.to(device)), 10, "adam", num_steps=15
    )
    assert on.lr == pytest.approx(reference.lr, rel=1e-9)
    assert on.lambda_full == pytest.approx(reference.lambda_full, rel=1e-9)
    assert on.density.grid.device.type == device
    torch.testing.assert_close(on.density.density.cpu(), reference.density.density)


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def _op(n: int = 3) -> SymmetricOperator:
    return SymmetricOperator.from_matrix(torch.eye(n))


def _linear_data():
    return nn.Linear(2, 1), (torch.randn(6, 2), torch.randn(6, 1))


def _propose(**kwargs):
    model, data = _linear_data()
    args = {"model": model, "loss_fn": F.mse_loss, "data": data, "batch_size": 2}
    args.update(kwargs)
    return propose_learning_rate(**args, density=False, num_steps=2)


class _NoParams(nn.Module):
    def forward(self, x):
        return x


ERRORS = [
    (lambda: SymmetricOperator(3, 3, dtype=torch.float64), r"`matvec` must be callable"),
    (lambda: SymmetricOperator(lambda u: u, 0, dtype=torch.float64), r"`dim` must be an int"),
    (lambda: SymmetricOperator.from_matrix(torch.ones(2, 3)), r"square matrix, got shape"),
    (lambda: lanczos("op", torch.ones(3), 2), r"must be a SymmetricOperator, got str"),
    (lambda: lanczos(_op(), torch.ones(4), 2), r"`start` must have shape \(3,\), got \(4,\)"),
    (lambda: lanczos(_op(), torch.ones(3), 0), r"`num_steps` must be an int >= 1, got 0"),
    (lambda: lanczos(_op(), torch.zeros(3), 2), r"`start` must be finite and non-zero"),
    (
        lambda: lanczos(
            SymmetricOperator(lambda u: u * float("nan"), 3, dtype=torch.float64),
            torch.ones(3),
            2,
        ),
        r"returned NaN/inf at step 1",
    ),
    (lambda: top_eigenvalues(_op(), k=5, num_steps=4), r"`k` must be an int in \[1, num_steps"),
    (lambda: spectral_density(_op(), num_vectors=0), r"`num_vectors` must be an int >= 1"),
    (lambda: spectral_density(_op(), num_points=0), r"`num_points` must be an int >= 1"),
    (lambda: spectral_density(_op(), sigma=0.0), r"`sigma` must be > 0"),
    (lambda: scale_learning_rate(0.0, 1, 2), r"`lr` must be a finite number > 0.*got 0.0"),
    (lambda: scale_learning_rate(-0.1, 1, 2), r"`lr` must be a finite number > 0.*got -0.1"),
    (lambda: scale_learning_rate(math.nan, 1, 2), r"`lr` must be a finite number > 0.*got nan"),
    (lambda: scale_learning_rate(math.inf, 1, 2), r"`lr` must be a finite number > 0.*got inf"),
    (lambda: scale_learning_rate("0.1", 1, 2), r"`lr` must be a finite number > 0.*got '0.1'"),
    (lambda: scale_learning_rate(0.1, 0, 2), r"`batch_size` must be an int >= 1.*got 0\."),
    (lambda: scale_learning_rate(0.1, -8, 2), r"`batch_size` must be an int >= 1.*got -8"),
    (lambda: scale_learning_rate(0.1, 2, 0), r"`new_batch_size` must be an int >= 1.*got 0"),
    (lambda: scale_learning_rate(0.1, True, 2), r"`batch_size` must be an int >= 1.*got True"),
    (lambda: scale_learning_rate(0.1, 2, 4, rule="cubic"), r"`rule` must be 'linear', 'sqrt'"),
    (lambda: scale_learning_rate(0.1, 2, 4, rule=1.5), r"exponent in \[0, 1\].*got 1.5"),
    (lambda: scale_learning_rate(0.1, 2, 4, rule=math.nan), r"`rule` must be.*got nan"),
    (lambda: scale_learning_rate(0.1, 2, 4, rule=True), r"`rule` must be.*got True"),
    (lambda: scale_learning_rate(0.1, 2, 2.5), r"`new_batch_size` must be an int >= 1"),
    (lambda: scale_learning_rate(0.1, 2, 4, "lamb"), r"`optimizer` must be one of"),
    (
        lambda: curvature_operator("net", F.mse_loss, _linear_data()[1]),
        r"`model` must be an nn.Module",
    ),
    (
        lambda: curvature_operator(_NoParams(), F.mse_loss, _linear_data()[1]),
        r"has no trainable parameters",
    ),
    (
        lambda: curvature_operator(
            nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1).float()), F.mse_loss, _linear_data()[1]
        ),
        r"must share one floating dtype",
    ),
    (
        lambda: curvature_operator(nn.Linear(2, 1), F.mse_loss, torch.ones(3, 2)),
        r"`data` must be a pair \(inputs, targets\)",
    ),
    (
        lambda: curvature_operator(nn.Linear(2, 1), F.mse_loss, (torch.ones(3, 2), torch.ones(4))),
        r"same \(>= 1\) number of rows, got shapes \(3, 2\) and \(4,\)",
    ),
    (
        lambda: curvature_operator(nn.Linear(2, 1), F.mse_loss, _linear_data()[1], kind="fisher"),
        r"`kind` must be one of",
    ),
    (
        lambda: curvature_operator(nn.Linear(2, 1), "mse", _linear_data()[1]),
        r"`loss_fn` must be callable",
    ),
    (lambda: _propose(batch_size=0), r"`batch_size` must be an int >= 1, got 0"),
    (lambda: _propose(batch_size=-3), r"`batch_size` must be an int >= 1, got -3"),
    (lambda: _propose().lr_for_batch_size(0), r"`new_batch_size` must be an int >= 1.*got 0"),
    (lambda: _propose().lr_for_batch_size(8, rule="log"), r"`rule` must be 'linear', 'sqrt'"),
    (lambda: _propose(batch_size=7), r"batch_size=7 exceeds the 6 examples"),
    (lambda: _propose(optimizer="lbfgs"), r"`optimizer` must be one of \('sgd', 'adam'\)"),
    (lambda: _propose(momentum=1.0), r"`momentum` must be in \[0, 1\), got 1\.0"),
    (lambda: _propose(safety=0.0), r"`safety` must be in \(0, 1\], got 0\.0"),
    (lambda: _propose(num_batches=0), r"`num_batches` must be an int >= 1, got 0"),
    (
        lambda: _propose(loss_fn=lambda out, t: -(out**2).mean(), batch_size=6),
        r"top curvature eigenvalue is not positive .* kind='gauss_newton'",
    ),
]


@pytest.mark.parametrize(("call", "match"), ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_errors(call, match):
    with pytest.raises(HypergradientError, match=match):
        call()
