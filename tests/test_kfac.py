"""K-FAC (Martens & Grosse 2015): factors, the Gauss-Newton step, preconditioning, optimizer.

* (a) The factors A, G equal the Kronecker-factored Fisher built densely from per-example
  quantities computed without hooks (``torch.func`` on a functional copy of the model), for
  Linear, a 2-layer MLP, Linear on sequences and Conv2d (patches cut out by explicit loops);
  for one example the Fisher block IS ``A kron G``.
* (b) One K-FAC step (lr 1, no damping, no momentum) on linear least squares is the
  Gauss-Newton step, i.e. lands on the least-squares solution.
* (c) K-FAC-preconditioned CG needs fewer iterations than plain CG for an implicit
  hypergradient of an ill-conditioned logistic-regression twin; the K-FAC inverse alone is
  the exact inverse Hessian when the Hessian is exactly Kronecker (multi-output ridge).
* (d) The optimizer: running averages, inverse schedule, param groups, state_dict round
  trip, lr schedulers, skipped/unsupported layers, errors.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import hypergradient as hg
from hypergradient import HypergradientError
from hypergradient.optimizers.kfac import (
    KFAC,
    KFACPreconditioner,
    KFACSolver,
    KroneckerBlock,
    curvature_factors,
)

# Every exact identity below holds to rounding; float64 sums of a few hundred terms stay
# within ~1e-14 relative, so 1e-10 leaves a wide margin while catching any wrong scaling.
EXACT = {"rtol": 1e-10, "atol": 1e-12}


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Drawn on the CPU generator, then moved to the default device (portable test data)."""
    return torch.randn(*shape, generator=gen, device="cpu").to(torch.get_default_device())


def randint(gen: torch.Generator, high: int, n: int) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=gen, device="cpu").to(torch.get_default_device())


def seeded(module_fn, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module_fn()


def with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1)], dim=-1)


def categorical_G(grad_fn, logits: torch.Tensor) -> torch.Tensor:
    """``sum_y p(y) g_y g_y^T`` with ``g_y = grad_fn(e_y - p)``-style per-class gradients.

    ``grad_fn(y)`` returns the gradient of ``-log p(y)`` w.r.t. the pre-activation of the
    layer, computed by ``torch.func`` (no hooks).
    """
    p = torch.softmax(logits, dim=-1)
    return sum(p[c] * torch.outer(grad_fn(c), grad_fn(c)) for c in range(p.numel()))


# ======================================================================================
# (a) factors against dense per-example quantities
# ======================================================================================


def test_linear_factors_equal_dense_per_example_fisher_factors():
    net = seeded(lambda: nn.Linear(4, 3))
    X = torch.randn(7, 4)
    W, b = net.weight.detach(), net.bias.detach()
    # Dense, per example i: a_i = [x_i, 1]; g_{i,y} = d(-log softmax(s)_y)/ds at s = W x_i + b,
    # by jacrev of log_softmax (not the closed form p - e_y the library uses).
    A_dense = sum(torch.outer(with_ones(x), with_ones(x)) for x in X) / len(X)
    G_dense = 0
    for x in X:
        s = W @ x + b
        jac = jacrev(lambda s: -F.log_softmax(s, dim=0))(s)  # row y = g_y
        G_dense = G_dense + categorical_G(lambda c, jac=jac: jac[c], s)
    G_dense = G_dense / len(X)

    block = curvature_factors(net, X)[""]
    torch.testing.assert_close(block.A, A_dense, **EXACT)
    torch.testing.assert_close(block.G, G_dense, **EXACT)
    assert (block.weight, block.bias) == ("weight", "bias")

    # the optimizer's first curvature update stores the same factors (no averaging yet)
    opt = KFAC(net, fisher="exact")
    opt.update_curvature(net(X))
    state = opt.state[net.weight]
    torch.testing.assert_close(state["A"], A_dense, **EXACT)
    torch.testing.assert_close(state["G"], G_dense, **EXACT)


def test_single_example_fisher_block_is_exactly_A_kron_G():
    net = seeded(lambda: nn.Linear(3, 4))
    x = torch.randn(1, 3)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def log_p(p, y):
        return F.log_softmax(functional_call(net, p, (x,)), dim=1)[0, y]

    def wbar_grad(y):  # d log p(y|x) / d [W, b], shape (4, 3 + 1)
        g = jacrev(log_p)(params, y)
        return torch.cat([g["weight"], g["bias"][:, None]], dim=1)

    probs = torch.softmax(net(x), dim=1)[0].detach()
    grads = [wbar_grad(y) for y in range(4)]
    # true Fisher of theta = vec(W_bar), column-stacking vec (W_bar.T.reshape(-1)) ...
    F_col = sum(p * torch.outer(g.T.reshape(-1), g.T.reshape(-1)) for p, g in zip(probs, grads))
    # ... and PyTorch's row-major flatten
    F_row = sum(p * torch.outer(g.reshape(-1), g.reshape(-1)) for p, g in zip(probs, grads))

    block = curvature_factors(net, x)[""]
    torch.testing.assert_close(F_col, torch.kron(block.A, block.G), **EXACT)
    torch.testing.assert_close(F_row, torch.kron(block.G, block.A), **EXACT)

    # with several examples the block is NOT Kronecker (K-FAC's independence assumption):
    # the exact block differs from A kron G, which is why K-FAC is an approximation
    X = torch.randn(6, 3)
    F_many = 0
    for i in range(6):
        p = torch.softmax(net(X[i : i + 1]), dim=1)[0].detach()
        for y in range(4):
            g = jacrev(
                lambda q, i=i, y=y: F.log_softmax(functional_call(net, q, (X[i : i + 1],)), 1)[0, y]
            )(params)
            v = torch.cat([g["weight"], g["bias"][:, None]], dim=1).T.reshape(-1)
            F_many = F_many + p[y] * torch.outer(v, v) / 6
    many = curvature_factors(net, X)[""]
    gap = torch.linalg.norm(F_many - torch.kron(many.A, many.G)) / torch.linalg.norm(F_many)
    assert 1e-3 < gap < 0.5  # measured 0.22: close, not equal


def test_two_layer_mlp_factors_equal_dense_per_example_quantities():
    net = seeded(lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)))
    X = torch.randn(9, 5)
    W1, b1 = net[0].weight.detach(), net[0].bias.detach()
    W2, b2 = net[2].weight.detach(), net[2].bias.detach()

    def nll_from_s1(s1, y):  # -log p(y) as a function of layer 1's pre-activation
        return -F.log_softmax(W2 @ torch.tanh(s1) + b2, dim=0)[y]

    def nll_from_s2(s2, y):
        return -F.log_softmax(s2, dim=0)[y]

    A1 = A2 = G1 = G2 = 0
    G1_emp = G2_emp = 0
    targets = randint(torch.Generator().manual_seed(5), 3, 9)
    for x, t in zip(X, targets):
        s1 = W1 @ x + b1
        h = torch.tanh(s1)
        s2 = W2 @ h + b2
        A1 = A1 + torch.outer(with_ones(x), with_ones(x))
        A2 = A2 + torch.outer(with_ones(h), with_ones(h))
        G1 = G1 + categorical_G(lambda c, s1=s1: jacrev(nll_from_s1)(s1, c), s2)
        G2 = G2 + categorical_G(lambda c, s2=s2: jacrev(nll_from_s2)(s2, c), s2)
        g1, g2 = jacrev(nll_from_s1)(s1, t), jacrev(nll_from_s2)(s2, t)
        G1_emp, G2_emp = G1_emp + torch.outer(g1, g1), G2_emp + torch.outer(g2, g2)
    n = len(X)

    blocks = curvature_factors(net, X)
    assert list(blocks) == ["0", "2"]
    assert (blocks["0"].weight, blocks["2"].bias) == ("0.weight", "2.bias")
    for name, A, G in (("0", A1, G1), ("2", A2, G2)):
        torch.testing.assert_close(blocks[name].A, A / n, **EXACT)
        torch.testing.assert_close(blocks[name].G, G / n, **EXACT)

    # empirical Fisher: the training targets instead of the expectation over y
    emp = curvature_factors(net, X, fisher="empirical", targets=targets)
    torch.testing.assert_close(emp["0"].G, G1_emp / n, **EXACT)
    torch.testing.assert_close(emp["2"].G, G2_emp / n, **EXACT)

    # sampled Fisher: y ~ p(y|x) drawn with the given generator; redraw the same y here
    sampled = curvature_factors(
        net, X, fisher="sampled", generator=torch.Generator().manual_seed(3)
    )
    p = torch.softmax(net(X), dim=1).detach()
    y = torch.multinomial(p.cpu(), 1, generator=torch.Generator().manual_seed(3))[:, 0].to(p.device)
    G2_s = sum(torch.outer(p[i] - F.one_hot(y[i], 3), p[i] - F.one_hot(y[i], 3)) for i in range(n))
    torch.testing.assert_close(sampled["2"].G, G2_s / n, **EXACT)


def test_sampled_fisher_is_an_unbiased_estimate_of_the_exact_one():
    net = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    X = torch.randn(5, 3)
    exact = curvature_factors(net, X)
    # 4000 copies of the batch: one sample each, so the Monte Carlo error of G is about
    # 1/sqrt(4000) = 1.6% of its scale; 8% is five standard errors
    sampled = curvature_factors(
        net, X.repeat(4000, 1), fisher="sampled", generator=torch.Generator().manual_seed(0)
    )
    for name in exact:
        G, G_mc = exact[name].G, sampled[name].G
        assert float(torch.linalg.norm(G_mc - G) / torch.linalg.norm(G)) < 0.08


def test_linear_on_sequences_averages_A_over_positions_and_sums_G_per_example():
    net = seeded(lambda: nn.Linear(3, 2))
    X = torch.randn(4, 5, 3)  # (N, T, d): 4 examples of 5 positions
    opt = KFAC(net, fisher="exact", likelihood="gaussian")
    out = net(X).sum(1)  # one Gaussian output vector per example
    # pooled model: d out / d s_{i,t} = d out / d out for every t, so with the exact Gaussian
    # Fisher the output gradients are the unit vectors e_k at each of the T positions:
    # G = (1/N) sum_i sum_t sum_k e_k e_k^T = T I;  A = mean over all N*T rows
    opt.update_curvature(out)
    state = opt.state[net.weight]
    rows = with_ones(X.reshape(-1, 3))
    torch.testing.assert_close(state["A"], rows.T @ rows / 20, **EXACT)
    torch.testing.assert_close(state["G"], 5 * torch.eye(2), **EXACT)


def _patches_by_loops(x, conv: nn.Conv2d) -> torch.Tensor:
    """Receptive fields cut out of the zero-padded input with plain Python loops."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
    else:
        ph, pw = conv.padding
        x = F.pad(x, (pw, pw, ph, ph))
    rows = []
    N, _, H, W = x.shape
    for n in range(N):
        for i in range(0, H - dh * (kh - 1), sh):
            for j in range(0, W - dw * (kw - 1), sw):
                rows.append(x[n, :, i : i + dh * kh : dh, j : j + dw * kw : dw].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "options",
    [
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": (2, 3), "padding": "same", "dilation": 2},
        {"kernel_size": 2, "bias": False},
    ],
    ids=["stride2-pad1", "same-even-dilated", "nobias"],
)
def test_conv2d_factors_equal_dense_patch_quantities(options):
    conv = seeded(lambda: nn.Conv2d(2, 3, **options))
    head = seeded(lambda: nn.Linear(3, 4), seed=1)

    def model_fn(x):  # conv -> tanh -> mean over pixels -> linear logits
        return head(torch.tanh(conv(x)).mean((2, 3)))

    net = nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    X = torch.randn(2, 2, 6, 5)
    torch.testing.assert_close(net(X), model_fn(X), **EXACT)

    patches = _patches_by_loops(X, conv)
    rows = with_ones(patches) if conv.bias is not None else patches
    A_dense = rows.T @ rows / len(rows)  # mean over every example and output position
    # G: per example, the sum over output positions t of E_y[g_t g_t^T], g_t = d(-log p)/d s_t
    G_dense = 0
    for n in range(len(X)):
        s = conv(X[n : n + 1]).detach()

        def nll(s, y):
            return -F.log_softmax(head(torch.tanh(s).mean((2, 3))), dim=1)[0, y]

        p = torch.softmax(head(torch.tanh(s).mean((2, 3))), dim=1)[0]
        for y in range(4):
            g = jacrev(nll)(s, y)[0].reshape(3, -1)  # (C_out, positions)
            G_dense = G_dense + p[y] * g @ g.T
    G_dense = G_dense / len(X)

    blocks = curvature_factors(net, X)
    torch.testing.assert_close(blocks["0"].A, A_dense, **EXACT)
    torch.testing.assert_close(blocks["0"].G, G_dense, **EXACT)
    assert blocks["0"].bias == ("0.bias" if conv.bias is not None else None)


def test_conv_covering_its_whole_input_is_a_linear_layer():
    conv = seeded(lambda: nn.Conv2d(2, 3, kernel_size=(3, 4)))
    lin = nn.Linear(24, 3)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(3, -1))
        lin.bias.copy_(conv.bias)
    X = torch.randn(6, 2, 3, 4)
    bc = curvature_factors(nn.Sequential(conv, nn.Flatten()), X)["0"]
    bl = curvature_factors(lin, X.reshape(6, -1))[""]
    torch.testing.assert_close(bc.A, bl.A, **EXACT)
    torch.testing.assert_close(bc.G, bl.G, **EXACT)


# ======================================================================================
# (b) one K-FAC step on linear least squares is the Gauss-Newton step
# ======================================================================================


@pytest.mark.parametrize("damping_mode", ["factored", "tikhonov"])
def test_one_kfac_step_on_least_squares_is_the_gauss_newton_step(damping_mode):
    # Model s_i = W_bar a_i (a_i = [x_i, 1]), loss L = (1/N) sum_i 0.5 ||s_i - y_i||^2, i.e.
    # the mean negative log-likelihood of a unit-variance Gaussian.  Its Hessian (= its
    # Gauss-Newton matrix = the Fisher) in column-stacking vec is
    #     H = (1/N) sum_i (a_i a_i^T) kron I = A kron I,
    # and the exact output Fisher of the Gaussian is I, so G = I and K-FAC's block is exact.
    # The step W_bar - grad A^-1 G^-1 with grad = (1/N) sum_i (s_i - y_i) a_i^T is then the
    # Gauss-Newton (= Newton) step, which lands on the least-squares solution
    # W_bar* = Y^T A_bar (A_bar^T A_bar)^-1 for any starting point.
    gen = torch.Generator().manual_seed(0)
    X = randn(gen, 30, 4) * torch.tensor([1.0, 3.0, 0.1, 1.0])
    Y = randn(gen, 30, 3)
    net = seeded(lambda: nn.Linear(4, 3))
    opt = KFAC(
        net, lr=1.0, damping=0.0, damping_mode=damping_mode, fisher="exact", likelihood="gaussian"
    )
    out = net(X)
    opt.update_curvature(out)
    torch.testing.assert_close(opt.state[net.weight]["G"], torch.eye(3), **EXACT)
    (0.5 * ((out - Y) ** 2).sum(1).mean()).backward()
    opt.step()

    solution = torch.linalg.lstsq(with_ones(X), Y).solution.T  # (3, 5) = [W*, b*]
    got = torch.cat([net.weight, net.bias[:, None]], dim=1).detach()
    assert float(torch.linalg.norm(got - solution) / torch.linalg.norm(solution)) < 1e-10
    # ... and the gradient there vanishes
    net.zero_grad()
    (0.5 * ((net(X) - Y) ** 2).sum(1).mean()).backward()
    assert float(net.weight.grad.norm()) < 1e-12


def test_tiny_damping_step_approaches_the_gauss_newton_step():
    gen = torch.Generator().manual_seed(1)
    X, Y = randn(gen, 20, 3), randn(gen, 20, 2)
    net = seeded(lambda: nn.Linear(3, 2))
    opt = KFAC(net, lr=1.0, damping=1e-8, fisher="exact", likelihood="gaussian")
    out = net(X)
    opt.update_curvature(out)
    (0.5 * ((out - Y) ** 2).sum(1).mean()).backward()
    opt.step()
    solution = torch.linalg.lstsq(with_ones(X), Y).solution.T
    got = torch.cat([net.weight, net.bias[:, None]], dim=1).detach()
    # damping 1e-8 perturbs the inverse by about sqrt(1e-8)/lambda_min relative
    assert float(torch.linalg.norm(got - solution) / torch.linalg.norm(solution)) < 1e-3


# ======================================================================================
# (c) K-FAC in implicit hypergradients
# ======================================================================================


def scaled_logistic_twin(n=240, dim=16, classes=4, seed=0):
    """Multinomial logistic regression with correlated, badly scaled features.

    Features ``X = Z diag(logspace(0, -2)) Q^T`` (Q a random rotation: the bad scaling is
    not axis-aligned, so a diagonal preconditioner cannot see it), one log-L2 per weight
    around -6.  Inner problem solved by Newton to machine precision; the exact hypergradient
    is the dense solve ``solver="exact"``.
    """
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(randn(gen, dim, dim))[0]
    scales = torch.logspace(0, -2, dim)
    W_true = randn(gen, dim, classes) * 2
    Z, Zv = randn(gen, n, dim), randn(gen, n, dim)
    X, Xv = Z * scales @ Q.T, Zv * scales @ Q.T
    y = torch.argmax(Z @ W_true / 5 + randn(gen, n, classes), 1)
    yv = torch.argmax(Zv @ W_true / 5 + randn(gen, n, classes), 1)
    hparams = {"log_l2": -6.0 + 0.5 * randn(gen, dim, classes)}

    def inner(p, h):
        reg = 0.5 * torch.sum(h["log_l2"].exp() * p["W"] ** 2) + 5e-3 * p["b"] @ p["b"]
        return F.cross_entropy(X @ p["W"] + p["b"], y) + reg

    def outer(p, h):
        return F.cross_entropy(Xv @ p["W"] + p["b"], yv)

    def unflat(v):
        return {"W": v[: dim * classes].reshape(dim, classes), "b": v[dim * classes :]}

    def f(v):
        return inner(unflat(v), hparams)

    v = torch.zeros(dim * classes + classes)
    for _ in range(50):
        g = jacrev(f)(v)
        if float(g.norm()) < 1e-13:
            break
        step = torch.linalg.solve(jacrev(jacrev(f))(v), g)
        t = 1.0
        while f(v - t * step) > f(v) - 0.25 * t * (g @ step) and t > 1e-8:
            t *= 0.5
        v = v - t * step
    params = unflat(v)
    exact = hg.implicit_hypergrad(inner, outer, params, hparams, solver="exact")
    return inner, outer, params, hparams, exact, X


def logistic_preconditioner(X, params, damping, mode="tikhonov"):
    """K-FAC of the logistic model: an nn.Linear holding W.T, b, factors by hooks."""
    W, b = params["W"], params["b"]
    net = nn.Linear(*W.shape, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        net.weight.copy_(W.T)
        net.bias.copy_(b)
    block = curvature_factors(net, X)[""]
    return KFACPreconditioner(
        [KroneckerBlock(block.A, block.G, "W", "b", weight_layout="in_out")],
        damping=damping,
        damping_mode=mode,
    )


def test_kfac_preconditioned_cg_needs_fewer_iterations_on_the_logistic_twin():
    inner, outer, params, hparams, exact, X = scaled_logistic_twin()
    # H = F_CE + diag(exp(log_l2)): K-FAC models F_CE, the isotropic part of the penalty
    # goes into the Tikhonov damping (its mean coefficient)
    P = logistic_preconditioner(X, params, float(hparams["log_l2"].exp().mean()))

    def iterations_to(target, preconditioner, limit=120):
        for k in range(1, limit):
            g = hg.implicit_hypergrad(
                inner, outer, params, hparams, "cg", k, 0.0, preconditioner=preconditioner
            )
            if hg.testing.relative_error(g, exact) < target:
                return k
        return limit

    plain, kfac = iterations_to(1e-4, None), iterations_to(1e-4, P)
    # measured: plain 36, K-FAC 9
    assert kfac < plain / 2, (plain, kfac)
    g = hg.implicit_hypergrad(inner, outer, params, hparams, tol=1e-12, preconditioner=P)
    assert hg.testing.relative_error(g, exact) < 1e-8


def test_kfac_inverse_is_exact_when_the_hessian_is_kronecker():
    # Multi-output ridge: L = (1/N) sum_i 0.5 ||W_bar a_i - y_i||^2 + 0.5 exp(lam) ||W_bar||^2
    # has H = A kron I + exp(lam) I exactly; K-FAC (exact Gaussian Fisher: G = I) with
    # Tikhonov damping exp(lam) inverts it exactly, so KFACSolver (zero Hessian-vector
    # products) gives the exact implicit hypergradient.
    gen = torch.Generator().manual_seed(2)
    X, Y = randn(gen, 25, 4), randn(gen, 25, 3)
    Xv, Yv = randn(gen, 10, 4), randn(gen, 10, 3)
    net = nn.Linear(4, 3)
    hparams = {"log_lam": torch.tensor(-1.0)}

    def inner(p, h):
        r = functional_call(net, p, (X,)) - Y
        reg = p["weight"].pow(2).sum() + p["bias"].pow(2).sum()
        return 0.5 * r.pow(2).sum(1).mean() + 0.5 * h["log_lam"].exp() * reg

    def outer(p, h):
        return 0.5 * (functional_call(net, p, (Xv,)) - Yv).pow(2).sum(1).mean()

    Abar = with_ones(X)
    sol = torch.linalg.solve(Abar.T @ Abar / 25 + math.exp(-1.0) * torch.eye(5), Abar.T @ Y / 25)
    params = {"weight": sol[:4].T.contiguous(), "bias": sol[4].clone()}
    exact = hg.implicit_hypergrad(inner, outer, params, hparams, solver="exact")

    blocks = curvature_factors(net, X, likelihood="gaussian")
    P = KFACPreconditioner(blocks, damping=math.exp(-1.0), damping_mode="tikhonov")
    g, stats = hg.implicit_hypergrad(
        inner, outer, params, hparams, solver=KFACSolver(P), return_stats=True
    )
    assert stats.num_matvecs == 0
    assert hg.testing.relative_error(g, exact) < 1e-10
    # the factored damping is a different (over-damped) matrix: close, not exact
    Pf = KFACPreconditioner(blocks, damping=math.exp(-1.0), damping_mode="factored")
    g_f = hg.implicit_hypergrad(inner, outer, params, hparams, solver=KFACSolver(Pf))
    assert 1e-4 < hg.testing.relative_error(g_f, exact) < 0.5
    # any SPD callable works, through the generic linear-solve entry point too
    x, st = hg.linalg.solve(lambda v: v, exact["log_lam"], KFACSolver(lambda v: 2 * v))
    assert float(x) == 2 * float(exact["log_lam"]) and st.converged


def test_kfac_solver_on_the_logistic_twin_beats_the_identity_approximation():
    prob = hg.testing.logistic_problem(device=torch.get_default_device())
    P = logistic_preconditioner(
        prob.data["X"], prob.params, float(prob.hparams["log_l2"].exp().mean())
    )
    args = (prob.inner_loss, prob.outer_loss, prob.params, prob.hparams)
    kfac, stats = hg.implicit_hypergrad(
        *args, solver=KFACSolver(P, compute_residual=True), return_stats=True
    )
    identity = hg.implicit_hypergrad(*args, solver="identity")
    err_kfac = hg.testing.relative_error(kfac, prob.hypergrad)
    err_id = hg.testing.relative_error(identity, prob.hypergrad)
    assert stats.num_matvecs == 1 and math.isfinite(stats.residual_norm)
    assert err_kfac < 0.3 and err_kfac < err_id / 2, (err_kfac, err_id)  # measured 0.18, 0.61


# ======================================================================================
# the preconditioner itself
# ======================================================================================


def random_block(d_in=3, d_out=2, bias=True, seed=0, weight="w", layout="out_in"):
    gen = torch.Generator().manual_seed(seed)
    a = randn(gen, 10, d_in + bias)
    g = randn(gen, 10, d_out)
    return KroneckerBlock(a.T @ a / 10, g.T @ g / 10, weight, "b" if bias else None, layout)


def col_vec(u, block):
    return block.to_matrix("test", u).T.reshape(-1)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_preconditioner_is_the_inverse_of_the_damped_kronecker_matrix(layout):
    blk = random_block(layout=layout)
    A, G = blk.A, blk.G
    gamma = 0.3
    pi = math.sqrt((torch.trace(A) / 4) / (torch.trace(G) / 2))
    dense = {
        "tikhonov": torch.kron(A, G) + gamma * torch.eye(8),
        "factored": torch.kron(
            A + pi * math.sqrt(gamma) * torch.eye(4), G + math.sqrt(gamma) / pi * torch.eye(2)
        ),
    }
    shape = (2, 3) if layout == "out_in" else (3, 2)
    u = {"w": torch.randn(shape), "b": torch.randn(2), "other": torch.randn(5)}
    for mode, M in dense.items():
        P = KFACPreconditioner([blk], gamma, damping_mode=mode, passthrough=4.0)
        out = P(u)
        assert list(out) == ["w", "b", "other"]
        torch.testing.assert_close(col_vec(out, blk), torch.linalg.solve(M, col_vec(u, blk)))
        torch.testing.assert_close(col_vec(P.matvec(u), blk), M @ col_vec(u, blk))
        torch.testing.assert_close(out["other"], 4.0 * u["other"])
        back = P.matvec(out)
        for k in u:
            torch.testing.assert_close(back[k], u[k])


def test_singular_block_check_is_relative_to_the_block_scale():
    """A smallest eigenvalue at round-off size is singular, whatever its sign or the scale.

    eigh returns each eigenvalue of an n x n factor to about n * eps * its largest, so a
    block's smallest eigenvalue at or below (dim_A + dim_G) * eps = 6 * 2.2e-16 = 1.3e-15 of
    its largest is an exact zero blurred by rounding: on one CPU it comes out 0 (clamped), on
    another 1.9e-20 (whose inverse, 5e19, would then scale the step).  Diagonal factors make
    eigh exact, so the test does not depend on the CPU either.
    """
    for scale in (1.0, 1e-30, 1e30):  # relative: the same verdict at any curvature scale
        roundoff = KroneckerBlock(
            scale * torch.diag(torch.tensor([1.0, 0.5, 0.25, 1.5e-17])), torch.eye(2), "w", "b"
        )
        for mode in ("factored", "tikhonov"):
            with pytest.raises(HypergradientError, match=r"singular.*1\.5e-17 x its largest"):
                KFACPreconditioner([roundoff], 0.0, damping_mode=mode)
        with pytest.raises(HypergradientError, match="singular.*Raise damping: .* well above"):
            KFACPreconditioner([roundoff], 1e-40 * scale, damping_mode="tikhonov")
        # genuinely ill-conditioned (1e-12 relative, far above 1.3e-15) is still accepted,
        # and damping well above the round-off level makes the round-off block usable
        ill = KroneckerBlock(
            scale * torch.diag(torch.tensor([1.0, 0.5, 0.25, 1e-12])), torch.eye(2), "w", "b"
        )
        KFACPreconditioner([ill], 0.0)
        KFACPreconditioner([roundoff], 1e-3 * scale, damping_mode="tikhonov")
        KFACPreconditioner([roundoff], 1e-3 * scale, damping_mode="factored")


def test_preconditioner_errors():
    blk = random_block()
    with pytest.raises(HypergradientError, match=r"no K-FAC block covers \['extra'\]"):
        KFACPreconditioner([blk], 0.1)({"w": torch.ones(2, 3), "b": torch.ones(2), "extra": 1})
    with pytest.raises(HypergradientError, match=r"'w' has shape \(3, 3\).*expects 2 outputs x 3"):
        KFACPreconditioner([blk], 0.1)({"w": torch.ones(3, 3), "b": torch.ones(2)})
    with pytest.raises(HypergradientError, match="no entry 'b'"):
        KFACPreconditioner([blk], 0.1)({"w": torch.ones(2, 3)})
    with pytest.raises(HypergradientError, match="expected a dict"):
        KFACPreconditioner([blk], 0.1)(torch.ones(8))
    with pytest.raises(HypergradientError, match="covered by two blocks"):
        KFACPreconditioner([blk, random_block(seed=1)], 0.1)
    singular = KroneckerBlock(torch.zeros(4, 4), torch.eye(2), "w", "b")
    with pytest.raises(HypergradientError, match="singular.*Pass damping > 0"):
        KFACPreconditioner([singular], 0.0)
    with pytest.raises(HypergradientError, match="damping_mode='bogus'"):
        KFACPreconditioner([blk], 0.1, damping_mode="bogus")
    with pytest.raises(HypergradientError, match="`damping` must be a finite number >= 0"):
        KFACPreconditioner([blk], -1.0)
    with pytest.raises(HypergradientError, match="passthrough=0"):
        KFACPreconditioner([blk], 0.1, passthrough=0)
    with pytest.raises(HypergradientError, match="`blocks` is empty"):
        KFACPreconditioner([], 0.1)
    with pytest.raises(HypergradientError, match="must be a hypergradient.optimizers.kfac.Kron"):
        KFACPreconditioner([torch.eye(2)], 0.1)
    with pytest.raises(HypergradientError, match=r"`A` must be a non-empty square matrix"):
        KroneckerBlock(torch.ones(2, 3), torch.eye(2), "w")
    with pytest.raises(HypergradientError, match="weight_layout='row'"):
        KroneckerBlock(torch.eye(2), torch.eye(2), "w", weight_layout="row")
    with pytest.raises(HypergradientError, match="expected a callable"):
        KFACSolver(3)


# ======================================================================================
# (d) the optimizer
# ======================================================================================


def classification(seed=0, n=32):
    gen = torch.Generator().manual_seed(seed)
    X = randn(gen, n, 5)
    y = randint(gen, 3, n)
    return X, y


def mlp(seed=0):
    return seeded(lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), seed)


def kfac_step(opt, net, X, y, *, targets=None):
    opt.zero_grad()
    out = net(X)
    opt.update_curvature(out, targets)
    loss = F.cross_entropy(out, y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_step_is_the_preconditioned_gradient_with_running_average_factors():
    net = mlp()
    X, y = classification()
    opt = KFAC(net, lr=0.5, damping=0.1, fisher="exact", factor_decay=0.9)
    # two curvature updates: the first takes the batch factors, the second averages with
    # epsilon = min(1 - 1/2, 0.9) = 0.5
    b1 = curvature_factors(net, X[:16])
    b2 = curvature_factors(net, X[16:])
    net(X[:16]).sum()  # a forward pass without update_curvature: nothing is folded in
    opt.update_curvature(net(X[:16]))
    out = net(X[16:])
    opt.update_curvature(out)
    for name, module in (("0", net[0]), ("2", net[2])):
        torch.testing.assert_close(opt.state[module.weight]["A"], 0.5 * (b1[name].A + b2[name].A))
        torch.testing.assert_close(opt.state[module.weight]["G"], 0.5 * (b1[name].G + b2[name].G))
    F.cross_entropy(out, y[16:]).backward()
    expected = {}
    P = KFACPreconditioner(opt.blocks(), damping=0.1)
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    for k, d in P(grads).items():
        expected[k] = dict(net.named_parameters())[k].detach() - 0.5 * d
    opt.step()
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k])


def test_eigendecompositions_are_recomputed_every_inverse_every_steps():
    X, y = classification()
    schedules = {}
    for warmup in (0, None, 5):
        net = mlp()
        opt = KFAC(
            net, lr=0.05, damping=0.1, inverse_every=3, inverse_warmup=warmup, fisher="exact"
        )
        seen = []
        for _ in range(8):
            kfac_step(opt, net, X, y)
            seen.append(opt.state[net[2].weight]["vecs_A"].clone())
        schedules[warmup] = [not torch.equal(seen[i], seen[i - 1]) for i in range(1, 8)]
    # recomputed (zero-based steps) at 0, 3, 6 (the paper's schedule); with the default
    # warm-up (= inverse_every) also at 1, 2; with inverse_warmup=5 at each of 0..4, then 6
    assert schedules[0] == [False, False, True, False, False, True, False]
    assert schedules[None] == [True, True, True, False, False, True, False]
    assert schedules[5] == [True, True, True, True, False, True, False]


def test_param_groups_scale_their_own_steps():
    X, y = classification()
    ref, net = mlp(), mlp()
    opt_ref = KFAC(ref, lr=1.0, damping=0.1, fisher="exact")
    groups = [
        {"params": net[0].parameters(), "lr": 0.1},
        {"params": net[2].parameters(), "lr": 0.01},
    ]
    opt = KFAC(net, groups, lr=1.0, damping=0.1, fisher="exact")
    before = [p.detach().clone() for p in net.parameters()]
    kfac_step(opt_ref, ref, X, y)
    kfac_step(opt, net, X, y)
    for p0, p_ref, p, lr in zip(before, ref.parameters(), net.parameters(), [0.1, 0.1, 0.01, 0.01]):
        torch.testing.assert_close(p - p0, lr * (p_ref - p0))


def test_state_dict_round_trip_continues_bit_for_bit():
    X, y = classification()
    net = mlp()
    opt = KFAC(net, lr=0.2, damping=0.05, momentum=0.9, inverse_every=3, fisher="exact")
    for _ in range(4):
        kfac_step(opt, net, X, y)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    state = saved["opt"]["state"][0]
    assert {"A", "G", "vecs_A", "vals_G", "step", "curvature_updates", "momentum_buffer"} <= set(
        state
    )

    restored_net = mlp(seed=7)  # different weights, overwritten by the checkpoint
    restored_net.load_state_dict(saved["model"])
    restored = KFAC(
        restored_net, lr=0.2, damping=0.05, momentum=0.9, inverse_every=3, fisher="exact"
    )
    restored.load_state_dict(saved["opt"])
    # the next steps cross an eigendecomposition (step 6): a lost step counter would
    # recompute at the wrong time, a lost momentum buffer would change the first step
    for _ in range(4):
        kfac_step(opt, net, X, y)
        kfac_step(restored, restored_net, X, y)
    for p, q in zip(net.parameters(), restored_net.parameters()):
        assert torch.equal(p, q)

    # and a fresh optimizer without the checkpoint would differ
    other_net = mlp(seed=7)
    other_net.load_state_dict(saved["model"])
    other = KFAC(other_net, lr=0.2, damping=0.05, momentum=0.9, inverse_every=3, fisher="exact")
    kfac_step(other, other_net, X, y)
    assert not torch.equal(other_net[0].weight, restored_net[0].weight)


def test_lr_schedulers_drive_the_step_size():
    X, y = classification()
    net, ref = mlp(), mlp()
    opt = KFAC(net, lr=1.0, damping=0.1, fisher="exact")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    opt_ref = KFAC(ref, lr=1.0, damping=0.1, fisher="exact")
    lrs = []
    for t in range(5):
        opt_ref.param_groups[0]["lr"] = 0.5 ** (t // 2)  # what StepLR should do
        kfac_step(opt, net, X, y)
        kfac_step(opt_ref, ref, X, y)
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25]
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # schedulers that cycle momentum find it in the groups
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        KFAC(mlp(), lr=0.1, momentum=0.9), max_lr=0.1, total_steps=10
    )
    assert one_cycle.optimizer.param_groups[0]["momentum"] == pytest.approx(0.95)


def test_kfac_trains_a_small_classifier_where_sgd_at_its_lr_crawls():
    X, y = classification(n=64)
    net = mlp()
    opt = KFAC(net, lr=0.3, damping=0.01, momentum=0.5, generator=torch.Generator().manual_seed(0))
    losses = [kfac_step(opt, net, X, y) for _ in range(40)]
    sgd_net = mlp()
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=0.3, momentum=0.5)
    for _ in range(40):
        sgd.zero_grad()
        sgd_loss = F.cross_entropy(sgd_net(X), y)
        sgd_loss.backward()
        sgd.step()
    # measured (sampled Fisher): K-FAC 1.105 -> 0.224; SGD with the same lr/momentum 0.95
    # (SGD needs lr 3 to reach 0.28): a smoke test of the whole loop, not a benchmark
    assert losses[-1] < 0.3 * losses[0]
    assert float(sgd_loss.detach()) > 2 * losses[-1]


def test_conv_net_step_matches_its_kronecker_blocks():
    net = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 16, 3)
        )
    )
    X = torch.randn(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = KFAC(net, lr=1.0, damping=0.1, damping_mode="tikhonov", fisher="exact")
    opt.zero_grad()
    out = net(X)
    opt.update_curvature(out)
    F.cross_entropy(out, y).backward()
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    direction = KFACPreconditioner(opt.blocks(), 0.1, damping_mode="tikhonov")(grads)
    opt.step()
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), before[k] - direction[k])


def test_unsupported_layers_are_rejected_by_name_or_skipped():
    net = seeded(lambda: nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)))
    with pytest.raises(
        HypergradientError,
        match=r"layer '1' \(BatchNorm1d\) is not a supported layer type.*"
        r"unsupported='skip'.*\['1.weight', '1.bias'\]",
    ):
        KFAC(net)
    X, y = classification()
    opt = KFAC(net, lr=0.1, unsupported="skip", fisher="exact")
    assert opt.skipped_layers == ["1"] and opt.layers == ["0", "2"]
    opt.zero_grad()
    out = net(X)
    opt.update_curvature(out)
    F.cross_entropy(out, y).backward()
    bn_before, bn_grad = net[1].weight.detach().clone(), net[1].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(net[1].weight.detach(), bn_before - 0.1 * bn_grad)  # plain SGD
    # leaving the unsupported layer out of the optimizer is fine too
    KFAC(net, list(net[0].parameters()) + list(net[2].parameters()))

    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2))
    with pytest.raises(HypergradientError, match=r"layer '0' \(Conv2d\) has groups=2"):
        KFAC(grouped)
    circular = nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")
    with pytest.raises(
        HypergradientError, match=r"'<root module>' \(Conv2d\) has padding_mode='circular'"
    ):
        KFAC(circular)


def test_optimizer_errors():
    net = mlp()
    X, y = classification()
    with pytest.raises(HypergradientError, match="first argument is the model"):
        KFAC(net.parameters())
    for kwargs, pattern in [
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"damping": -1.0}, "`damping` must be a finite number >= 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"weight_decay": -0.1}, "weight_decay must be"),
        ({"factor_decay": 1.0}, r"factor_decay must be in \[0, 1\)"),
        ({"inverse_every": 0}, "inverse_every must be an integer >= 1"),
        ({"inverse_warmup": -1}, "inverse_warmup must be an integer >= 0"),
        ({"fisher": "true"}, "fisher='true'; expected 'sampled'"),
        ({"likelihood": "poisson"}, "likelihood='poisson'"),
        ({"damping_mode": "eigen"}, "damping_mode='eigen'"),
        ({"unsupported": "ignore"}, "unsupported='ignore'"),
    ]:
        with pytest.raises(HypergradientError, match=pattern):
            KFAC(net, **kwargs)
    with pytest.raises(HypergradientError, match="different parameter groups"):
        KFAC(net, [{"params": [net[0].weight]}, {"params": [net[0].bias, *net[2].parameters()]}])
    with pytest.raises(HypergradientError, match="weight is given to K-FAC but its bias is not"):
        KFAC(net, [net[0].weight])
    with pytest.raises(HypergradientError, match="not parameters of the model"):
        KFAC(net, [*net.parameters(), nn.Parameter(torch.ones(2))])
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(HypergradientError, match="tied weights"):
        KFAC(tied)

    opt = KFAC(net)
    F.cross_entropy(net(X), y).backward()
    with pytest.raises(HypergradientError, match="call opt.update_curvature\\(outputs\\)"):
        opt.step()
    with pytest.raises(HypergradientError, match="has no curvature yet"):
        opt.blocks()
    with pytest.raises(HypergradientError, match="does not require grad"):
        opt.update_curvature(net(X).detach())
    with pytest.raises(HypergradientError, match="targets were given"):
        opt.update_curvature(net(X), y)
    with pytest.raises(HypergradientError, match=r"logits of shape \(N, C\)"):
        opt.update_curvature(net(X)[None])
    with pytest.raises(HypergradientError, match="not the loss"):
        opt.update_curvature(F.cross_entropy(net(X), y))
    emp = KFAC(net, fisher="empirical")
    with pytest.raises(HypergradientError, match="needs the training targets"):
        emp.update_curvature(net(X))
    with pytest.raises(HypergradientError, match=r"integer class targets of shape \(32,\)"):
        emp.update_curvature(net(X), y.double())
    fresh = KFAC(mlp())
    with pytest.raises(HypergradientError, match="no K-FAC layer recorded a forward pass"):
        fresh.update_curvature(net(X))

    inplace = seeded(lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)))
    opt_inplace = KFAC(inplace)
    with pytest.raises(HypergradientError, match=r"layer '0' \(Linear\) was modified in place"):
        opt_inplace.update_curvature(inplace(X))

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            self.b(x)  # computed but unused
            return self.a(x)

    heads = TwoHeads()
    with pytest.raises(HypergradientError, match=r"layer 'b' \(Linear\) does not influence"):
        KFAC(heads).update_curvature(heads(X))

    singular = KFAC(net, damping=0.0, fisher="exact")  # softmax: G is singular along 1
    singular.update_curvature(net(X))
    with pytest.raises(HypergradientError, match="singular.*Pass damping > 0"):
        singular.step()

    removed = KFAC(net)
    removed.remove_hooks()
    with pytest.raises(HypergradientError, match="hooks were removed"):
        removed.update_curvature(net(X))


def test_empirical_fisher_and_weight_decay_in_the_optimizer():
    X, y = classification()
    net = mlp()
    opt = KFAC(net, lr=0.1, damping=0.1, weight_decay=0.01, fisher="empirical")
    opt.zero_grad()
    out = net(X)
    opt.update_curvature(out, y)
    torch.testing.assert_close(
        opt.state[net[2].weight]["G"],
        curvature_factors(net, X, fisher="empirical", targets=y)["2"].G,
    )
    F.cross_entropy(out, y).backward()
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    grads = {k: p.grad + 0.01 * p.detach() for k, p in net.named_parameters()}
    direction = KFACPreconditioner(opt.blocks(), 0.1)(grads)
    opt.step()
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), before[k] - 0.1 * direction[k])


def test_gaussian_empirical_and_sampled_fisher_shapes():
    net = seeded(lambda: nn.Linear(3, 2))
    X, Y = torch.randn(8, 3), torch.randn(8, 2)
    emp = curvature_factors(net, X, fisher="empirical", likelihood="gaussian", targets=Y)[""]
    r = (net(X) - Y).detach()
    torch.testing.assert_close(emp.G, r.T @ r / 8, **EXACT)
    with pytest.raises(HypergradientError, match=r"targets shaped like outputs \(8, 2\)"):
        curvature_factors(net, X, fisher="empirical", likelihood="gaussian", targets=Y[:, 0])
    gen = torch.Generator().manual_seed(4)
    sampled = curvature_factors(net, X, fisher="sampled", likelihood="gaussian", generator=gen)[""]
    noise = randn(torch.Generator().manual_seed(4), 8, 2)
    torch.testing.assert_close(sampled.G, noise.T @ noise / 8, **EXACT)
    with pytest.raises(HypergradientError, match="must be a torch.nn.Module"):
        curvature_factors(lambda x: x, X)
    with pytest.raises(HypergradientError, match="no nn.Linear or nn.Conv2d"):
        curvature_factors(nn.Tanh(), X)


def test_add_param_group_after_construction_maps_the_new_layer():
    net = mlp()
    X, y = classification()
    opt = KFAC(net, list(net[0].parameters()), lr=0.1, damping=0.1, fisher="exact")
    assert opt.layers == ["0"]
    opt.add_param_group({"params": list(net[2].parameters()), "lr": 0.05})
    assert opt.layers == ["0", "2"]
    kfac_step(opt, net, X, y)
    assert "vecs_A" in opt.state[net[2].weight]
    assert copy.deepcopy(opt.state_dict())["param_groups"][1]["lr"] == 0.05


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_kfac_runs_on_the_inputs_device_and_matches_the_cpu(device):
    X, y = classification()
    X, y = X.cpu(), y.cpu()

    def run(where):
        net = mlp().to(where)
        blocks = curvature_factors(net, X.to(where))
        sampled = curvature_factors(
            net, X.to(where), fisher="sampled", generator=torch.Generator().manual_seed(1)
        )
        # a CPU generator drives the sampling whatever the device: same targets, same G
        opt = KFAC(net, lr=0.1, damping=0.05, momentum=0.5, generator=torch.Generator())
        opt.generator.manual_seed(2)
        for _ in range(3):
            kfac_step(opt, net, X.to(where), y.to(where))
        return blocks, sampled, [p.detach() for p in net.parameters()]

    (blocks_c, sampled_c, params_c), (blocks_d, sampled_d, params_d) = run("cpu"), run(device)
    for name in blocks_c:
        assert blocks_d[name].A.device.type == device
        torch.testing.assert_close(blocks_d[name].G.cpu(), blocks_c[name].G)
        torch.testing.assert_close(sampled_d[name].G.cpu(), sampled_c[name].G)
    for p, q in zip(params_d, params_c):
        assert p.device.type == device
        torch.testing.assert_close(p.cpu(), q)

    prob = hg.testing.logistic_problem(device=device)
    P = logistic_preconditioner(
        prob.data["X"], prob.params, float(prob.hparams["log_l2"].exp().mean())
    )
    args = (prob.inner_loss, prob.outer_loss, prob.params, prob.hparams)
    g = hg.implicit_hypergrad(*args, tol=1e-12, preconditioner=P)
    assert g["log_l2"].device.type == device
    assert hg.testing.relative_error(g, prob.hypergrad) < 1e-8
