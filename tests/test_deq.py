"""Equilibrium layers: forward solvers, the exact implicit backward, phantom gradients.

References used below, all in float64 on layers small enough to do everything densely:

* the exact gradient of a loss of z* = f(z*, x) is u^T df/dtheta with (I - J)^T u = g; we
  form J per sample with torch.func.jacrev and solve the dense system;
* autograd through a long unroll of the fixed-point iteration from z0 = 0 converges to the
  same gradient (the unrolled derivative is a truncated Neumann series, error ~ rho^T);
* central finite differences of the loss with the forward solved to 1e-14.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

import _readme
import hypergradient as hg
from hypergradient.deq import (
    Anderson,
    Broyden,
    EquilibriumLayer,
    FixedPointIteration,
    ImplicitBackward,
    NeumannPhantomBackward,
    PhantomBackward,
)


class TanhMap(nn.Module):
    """f(z, x) = tanh(W z + U x + b) with W symmetric, eigenvalues spread over [-rho, rho].

    ||df/dz|| = ||diag(tanh') W|| <= ||W|| = rho < 1: a contraction in the 2-norm.
    """

    def __init__(self, d: int, p: int, rho: float, seed: int = 0, positive: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        eig = torch.linspace(0.0 if positive else -rho, rho, d)
        self.W = nn.Parameter(q @ torch.diag(eig) @ q.T)
        self.U = nn.Parameter(0.5 * torch.randn(d, p, generator=g))
        self.b = nn.Parameter(0.1 * torch.randn(d, generator=g))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class LinearMap(nn.Module):
    """f(z, x) = z A^T + x: J = A everywhere, so phantom gradients have a closed form."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(a.clone())

    def forward(self, z, x):
        return z @ self.A.T + x


def _data(batch=4, p=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, p, generator=g), torch.randn(batch, 5, generator=g)


def _loss(z, target):
    return 0.5 * ((z - target) ** 2).sum() + z[:, 0].pow(3).sum()


def _layer_grads(f, backward, x, target, solver=None):
    """Gradients of _loss(layer(x)) for f's parameters and x (in that order)."""
    layer = EquilibriumLayer(
        f,
        solver if solver is not None else Anderson(tol=1e-14, atol=1e-15, max_steps=200),
        backward,
        state_shape=(target.shape[1],),
    )
    x = x.clone().requires_grad_(True)
    f.zero_grad()
    loss = _loss(layer(x), target)
    loss.backward()
    return [p.grad.clone() for p in f.parameters()] + [x.grad.clone()], layer


def _dense_reference(f, x, target):
    """Exact gradient by the dense implicit function theorem, sample by sample."""
    z = torch.zeros_like(target)
    with torch.no_grad():
        for _ in range(2000):  # rho = 0.6: 0.6^2000 underflows; z is exact to rounding
            z = f(z, x)
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad(_loss(z, target), z)[0]
    jac = vmap(jacrev(lambda zi, xi: f(zi[None], xi[None])[0]))(z.detach(), x)  # (B, d, d)
    eye = torch.eye(z.shape[1])
    u = torch.linalg.solve((eye - jac).transpose(1, 2), g[..., None])[..., 0]
    xx = x.clone().requires_grad_(True)
    out = f(z.detach(), xx)
    return list(torch.autograd.grad(out, [*f.parameters(), xx], u))


def _unrolled_reference(f, x, target, steps=400):
    """Autograd through `steps` plain iterations from zero (no implicit differentiation)."""
    xx = x.clone().requires_grad_(True)
    z = torch.zeros_like(target)
    for _ in range(steps):
        z = f(z, xx)
    return list(torch.autograd.grad(_loss(z, target), [*f.parameters(), xx]))


def _cos(a, b):
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    return float(a @ b / (a.norm() * b.norm()))


# --------------------------------------------------------------------------------------
# exact implicit backward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "linear_solver",
    [
        hg.linalg.Dense(),
        hg.linalg.GMRES(tol=1e-14, max_steps=100),
        hg.linalg.Neumann(alpha=1.0, tol=1e-14, max_steps=500),
    ],
    ids=["dense", "gmres", "neumann_to_tol"],
)
def test_exact_backward_matches_dense_ift_and_long_unroll(linear_solver):
    f = TanhMap(5, 3, rho=0.6)
    x, target = _data()
    got, layer = _layer_grads(f, ImplicitBackward(linear_solver), x, target)
    dense = _dense_reference(f, x, target)
    unrolled = _unrolled_reference(f, x, target)
    for a, b, c in zip(got, dense, unrolled):
        # float64 throughout; the forward is solved to 1e-14 and the linear solve to 1e-14,
        # so agreement to 1e-10 leaves four orders of magnitude for conditioning
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        # the unroll truncates the series after 400 terms: 0.6^400 ~ 1e-89
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert layer.backward_stats.converged
    assert layer.backward_stats.extra["backward"] == "exact"


@pytest.mark.parametrize(
    "solver",
    [
        FixedPointIteration(tol=1e-14, atol=1e-15, max_steps=500),
        Anderson(tol=1e-14, atol=1e-15, max_steps=200),
        Broyden(tol=1e-14, atol=1e-15, max_steps=200),
    ],
    ids=["fixed_point", "anderson", "broyden"],
)
def test_exact_backward_does_not_depend_on_the_forward_solver(solver):
    f = TanhMap(5, 3, rho=0.6)
    x, target = _data()
    got, layer = _layer_grads(f, ImplicitBackward(hg.linalg.Dense()), x, target, solver)
    assert layer.forward_stats.converged
    for a, b in zip(got, _dense_reference(f, x, target)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_exact_backward_matches_central_finite_differences():
    f = TanhMap(4, 3, rho=0.8, seed=3)
    x, target = _data(batch=3, p=3, seed=4)
    target = target[:, :4]
    got, _ = _layer_grads(f, ImplicitBackward(hg.linalg.GMRES(tol=1e-14)), x, target)
    layer = EquilibriumLayer(
        f, Anderson(tol=1e-15, atol=1e-16, max_steps=300), "exact", state_shape=(4,)
    )

    def loss_at() -> float:
        with torch.no_grad():
            return float(_loss(layer(x), target))

    h = 1e-5
    # central differences: error O(h^2 * f''') ~ 1e-10 plus rounding 1e-16 / h ~ 1e-11
    entries = [
        (f.W, got[0], [(0, 1), (2, 0), (3, 3)]),
        (f.U, got[1], [(0, 0), (3, 2)]),
        (f.b, got[2], [(0,), (3,)]),
    ]
    for param, grad, indices in entries:
        for index in indices:
            with torch.no_grad():
                old = param[index].item()
                param[index] = old + h
                up = loss_at()
                param[index] = old - h
                down = loss_at()
                param[index] = old
            fd = (up - down) / (2 * h)
            assert math.isclose(grad[index].item(), fd, rel_tol=1e-6, abs_tol=1e-8)
    for index in [(0, 0), (2, 1)]:
        x_up, x_down = x.clone(), x.clone()
        x_up[index] += h
        x_down[index] -= h
        with torch.no_grad():
            fd = (float(_loss(layer(x_up), target)) - float(_loss(layer(x_down), target))) / (2 * h)
        assert math.isclose(got[3][index].item(), fd, rel_tol=1e-6, abs_tol=1e-8)


def test_exact_backward_in_a_network_with_a_head_and_warm_start():
    # gradients reach parameters before and after the layer, and a warm start from the
    # previous fixed point changes nothing but the number of forward iterations
    torch.manual_seed(0)
    encoder, head = nn.Linear(6, 3), nn.Linear(5, 2)
    f = TanhMap(5, 3, rho=0.7)
    layer = EquilibriumLayer(
        f, Anderson(tol=1e-13, max_steps=200), ImplicitBackward(hg.linalg.Dense())
    )
    inputs, labels = torch.randn(7, 6), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    z0 = torch.zeros(7, 5)
    loss = F.cross_entropy(head(layer(encoder(inputs), z0)), labels)
    first_steps = layer.forward_stats.num_steps
    grads = torch.autograd.grad(loss, [*encoder.parameters(), *f.parameters()])
    z_star = layer(encoder(inputs), z0).detach()
    loss_warm = F.cross_entropy(head(layer(encoder(inputs), z_star)), labels)
    assert layer.forward_stats.num_steps < first_steps
    grads_warm = torch.autograd.grad(loss_warm, [*encoder.parameters(), *f.parameters()])
    for a, b in zip(grads, grads_warm):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_no_grad_returns_the_detached_fixed_point_and_attaches_nothing():
    f = TanhMap(5, 3, rho=0.6)
    x, _ = _data()
    layer = EquilibriumLayer(f, "anderson", "exact", state_shape=(5,))
    with torch.no_grad():
        z = layer(x)
    assert not z.requires_grad and layer.backward_stats is None
    assert layer.forward_stats.converged
    torch.testing.assert_close(f(z, x), z, rtol=0, atol=1e-4)  # default tol 1e-5 relative


# --------------------------------------------------------------------------------------
# phantom gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damping", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("kind", [PhantomBackward, NeumannPhantomBackward])
def test_phantom_gradients_on_a_linear_map_are_the_damped_neumann_sum(kind, damping):
    # For f(z, x) = A z + x the Jacobian is A everywhere, so both phantom gradients w.r.t. x
    # are exactly  lam * sum_{t<k} (lam A + (1 - lam) I)^{T t} g  (Geng et al., eq. for A_k).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g)
    a = 0.9 * a / torch.linalg.matrix_norm(a, 2)
    x = torch.randn(3, 4, generator=g)
    c = torch.randn(3, 4, generator=g)
    f = LinearMap(a)
    for k in (1, 2, 5):
        layer = EquilibriumLayer(f, Anderson(tol=1e-14, max_steps=100), kind(k, damping))
        xx = x.clone().requires_grad_(True)
        (layer(xx) * c).sum().backward()
        m = damping * a + (1 - damping) * torch.eye(4)
        expected = torch.zeros_like(c)
        term = c.clone()
        for _ in range(k):
            expected = expected + damping * term
            term = term @ m  # row vectors: u^T M  ==  (M^T u)^T
        torch.testing.assert_close(xx.grad, expected, rtol=1e-10, atol=1e-12)


def test_phantom_cosine_is_high_at_one_step_and_approaches_the_exact_gradient():
    # Geng et al.'s claim at CPU scale (papers.md section 7): cos(phantom, exact) > 0.9 at
    # k = 1 and -> 1 as k grows.  Measured on the parameters of f; at k = 1 the phantom
    # gradient is lam * (df/dtheta)^T g, so its direction does not depend on lam.
    f = TanhMap(16, 8, rho=0.95)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    head = torch.randn(4, 16, generator=g)
    labels = torch.randint(0, 4, (32,), generator=g)

    def grads(backward):
        layer = EquilibriumLayer(f, Anderson(tol=1e-12, max_steps=200), backward, state_shape=(16,))
        f.zero_grad()
        F.cross_entropy(layer(x) @ head.T, labels).backward()
        return [p.grad.clone() for p in f.parameters()]

    exact = grads(ImplicitBackward(hg.linalg.GMRES(tol=1e-13, max_steps=300)))
    ks = (1, 2, 5, 10, 20)
    for damping in (0.5, 1.0):
        for kind in (PhantomBackward, NeumannPhantomBackward):
            cos = [_cos(grads(kind(k, damping)), exact) for k in ks]
            # calibrated at 0.93 (k=1) rising to 0.9999 (k=20) for both dampings
            assert cos[0] >= 0.9, (kind.__name__, damping, cos)
            assert all(b >= a - 0.01 for a, b in zip(cos, cos[1:])), cos
            assert cos[-1] >= 0.999, cos
    # UPG and NPG coincide when the unroll starts at an exact fixed point (it stays there)
    torch.testing.assert_close(
        grads(PhantomBackward(5, 0.5)), grads(NeumannPhantomBackward(5, 0.5)), rtol=1e-8, atol=0
    )


def test_phantom_gradient_converges_to_exact_for_many_steps():
    f = TanhMap(5, 3, rho=0.6)
    x, target = _data()
    exact = _dense_reference(f, x, target)
    for backward in (PhantomBackward(60, 0.8), NeumannPhantomBackward(60, 0.8)):
        # contraction of the damped map <= 0.8 * 0.6 + 0.2 = 0.68; 0.68^60 ~ 1e-10
        got, layer = _layer_grads(f, backward, x, target)
        for a, b in zip(got, exact):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
        assert layer.backward_stats.extra["backward"] == backward.name


def test_phantom_training_step_decreases_the_loss():
    # a phantom gradient is a descent direction: a few Adam steps lower the training loss
    f = TanhMap(8, 5, rho=0.9, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g)
    labels = (x[:, 0] > 0).long()
    head = nn.Linear(8, 2)
    layer = EquilibriumLayer(f, "anderson", PhantomBackward(1, 1.0), state_shape=(8,))
    opt = torch.optim.Adam([*f.parameters(), *head.parameters()], lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(head(layer(x)), labels)
        loss.backward()
        opt.step()
        with torch.no_grad():  # keep f a contraction, as Geng et al.'s DEQs do
            f.W.mul_((0.9 / torch.linalg.matrix_norm(f.W, 2)).clamp(max=1.0))
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------------------
# forward solvers
# --------------------------------------------------------------------------------------


def test_fixed_point_iteration_converges_at_the_contraction_rate():
    # f(z) = rho z + c: the residual after t steps is rho^t * ||c||, so the relative
    # residual r_t / ||f(z_t)|| falls by about rho per step and the stop comes after
    # ~ log(tol) / log(rho) steps.
    rho, tol = 0.5, 1e-10
    c = torch.tensor([[1.0, -2.0, 3.0]])
    z, stats = FixedPointIteration(tol=tol, max_steps=200).solve(lambda z: rho * z + c, 0 * c)
    torch.testing.assert_close(z, c / (1 - rho), rtol=1e-9, atol=0)
    history = stats.extra["residual_history"]
    ratios = [b / a for a, b in zip(history[1:], history[2:])]
    assert all(abs(r - rho) < 0.05 for r in ratios[2:])
    assert stats.converged and stats.residual_norm <= tol
    assert abs(stats.num_steps - math.log(tol) / math.log(rho)) <= 3
    assert stats.num_matvecs == stats.num_steps + 1
    assert stats.extra["solver"] == "fixed_point" and len(history) == stats.num_steps + 1


def test_anderson_and_broyden_need_fewer_evaluations_than_iteration():
    f = TanhMap(16, 8, rho=0.95)
    x = torch.randn(20, 8)
    z0 = torch.zeros(20, 16)

    def fn(z):
        return f(z, x)

    with torch.no_grad():
        runs = {
            s.name: s.solve(fn, z0)
            for s in (
                FixedPointIteration(tol=1e-10, max_steps=1000),
                Anderson(tol=1e-10, max_steps=200),
                Broyden(tol=1e-10, max_steps=200),
            )
        }
        reference = runs["fixed_point"].value
        for name, (z, stats) in runs.items():
            assert stats.converged, name
            assert stats.residual_norm <= 1e-10
            # relative residual 1e-10 and contraction 0.95: distance to z* <= 1e-10/0.05
            torch.testing.assert_close(z, reference, rtol=0, atol=1e-8)
            torch.testing.assert_close(fn(z), z, rtol=0, atol=1e-9)
    assert runs["anderson"].stats.num_matvecs < runs["fixed_point"].stats.num_matvecs
    assert runs["broyden"].stats.num_matvecs < runs["fixed_point"].stats.num_matvecs


def test_solver_stats_are_recorded_per_call_and_max_steps_warns():
    f = TanhMap(6, 3, rho=0.95)
    x, _ = _data(batch=5)
    layer = EquilibriumLayer(f, FixedPointIteration(max_steps=3, tol=1e-12), state_shape=(6,))
    with pytest.warns(hg.ConvergenceWarning, match=r"max_steps.*Raise max_steps \(now 3\)"):
        layer(x)
    stats = layer.forward_stats
    assert stats.result is hg.Result.MAX_STEPS_REACHED and stats.num_steps == 3
    assert stats.num_matvecs == 4 and len(stats.extra["residual_history"]) == 4
    strict = EquilibriumLayer(
        f, FixedPointIteration(max_steps=3, tol=1e-12), state_shape=(6,), throw=True
    )
    with pytest.raises(hg.ConvergenceError, match=r"FixedPointIteration.*max_steps=6"):
        strict(x)


def test_samples_converge_independently_and_a_zero_fixed_point_needs_atol():
    # per-sample stopping: a sample already at its fixed point does not hold the rest back;
    # z* = 0 has no relative accuracy, atol accepts it
    def fn(z):
        return 0.5 * z

    _, stats = Anderson(tol=1e-8, max_steps=5).solve(fn, torch.ones(2, 3))
    assert stats.result is hg.Result.MAX_STEPS_REACHED  # relative residual stays at 1
    z, stats = FixedPointIteration(tol=1e-8, atol=1e-10, max_steps=100).solve(fn, torch.ones(2, 3))
    assert stats.converged and float(z.abs().max()) < 1e-9


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


class Expanding(nn.Module):
    def forward(self, z, x):
        return 1.5 * z + x  # |J| = 1.5: iteration runs away from the fixed point -2x


def test_non_contractive_map_raises_convergence_error_naming_the_fix():
    layer = EquilibriumLayer(Expanding(), FixedPointIteration(max_steps=100))
    with pytest.raises(hg.ConvergenceError, match=r"diverged.*grew.*contraction.*spectral_norm"):
        layer(torch.ones(2, 3))
    assert layer.forward_stats.result is hg.Result.DIVERGED


def test_nan_in_the_map_raises():
    class Log(nn.Module):
        def forward(self, z, x):
            return torch.log(z - 1.0) + x  # log of a negative number at z0 = 0

    with pytest.raises(hg.ConvergenceError, match="NaN"):
        EquilibriumLayer(Log())(torch.ones(2, 3))


def test_backward_solve_failures():
    f = TanhMap(6, 3, rho=0.95)
    x, _ = _data(batch=5)
    starved = ImplicitBackward(hg.linalg.GMRES(max_steps=1, restart=1, tol=1e-14))
    layer = EquilibriumLayer(f, "anderson", starved, state_shape=(6,))
    with pytest.warns(hg.ConvergenceWarning, match=r"backward linear solve.*spectral_norm"):
        layer(x).sum().backward()
    assert layer.backward_stats.result is hg.Result.MAX_STEPS_REACHED
    strict = EquilibriumLayer(
        f, "anderson", ImplicitBackward(starved.linear_solver, throw=True), state_shape=(6,)
    )
    with pytest.raises(hg.ConvergenceError, match=r"backward linear solve.*phantom"):
        strict(x).sum().backward()

    class Identity(nn.Module):  # every z is a fixed point: I - J = 0 is singular
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, z, x):
            return self.w * z

    singular = EquilibriumLayer(Identity(), "anderson", ImplicitBackward(hg.linalg.Dense()))
    with pytest.raises(hg.ConvergenceError, match="broke down"):
        singular(torch.ones(2, 3)).sum().backward()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: EquilibriumLayer(lambda z, x: z), r"f must be a torch.nn.Module"),
        (lambda: EquilibriumLayer(Expanding(), solver="newton"), r"solver='newton'.*anderson"),
        (lambda: EquilibriumLayer(Expanding(), backward="jfb"), r"backward='jfb'.*phantom"),
        (lambda: EquilibriumLayer(Expanding(), state_shape=(0,)), r"state_shape"),
        (lambda: EquilibriumLayer(Expanding(), throw=1), r"throw must be a bool"),
        (lambda: PhantomBackward(steps=0), r"steps must be an integer >= 1"),
        (lambda: PhantomBackward(damping=0.0), r"damping \(lambda\).*\(0, 1\]"),
        (lambda: NeumannPhantomBackward(damping=1.5), r"damping \(lambda\)"),
        (lambda: ImplicitBackward("gmres"), r"AbstractLinearSolver"),
        (lambda: ImplicitBackward(throw="yes"), r"throw must be a bool"),
        (lambda: Anderson(memory=0), r"memory.*>= 1"),
        (lambda: Anderson(ridge=0.0), r"ridge"),
        (lambda: FixedPointIteration(mixing=0.0), r"mixing"),
        (lambda: FixedPointIteration(max_steps=0), r"max_steps"),
        (lambda: Broyden(tol=-1.0), r"tol"),
        (lambda: Broyden(atol=math.nan), r"atol"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(hg.HypergradientError, match=match):
        make()


def test_shape_errors_say_how_to_fix_them():
    f = TanhMap(5, 3, rho=0.5)
    x = torch.ones(4, 3)
    with pytest.raises(hg.HypergradientError, match=r"state_shape=\(\.\.\.\)"):
        EquilibriumLayer(f)(x)  # z guessed shaped like x: (4, 3) but W is 5 x 5

    class Wrong(nn.Module):
        def forward(self, z, x):
            return z.sum(dim=1)

    with pytest.raises(hg.HypergradientError, match=r"returned shape \(4,\).*shaped like z"):
        EquilibriumLayer(Wrong())(x)
    with pytest.raises(hg.HypergradientError, match=r"z0 must be a tensor.*batch size of x"):
        EquilibriumLayer(f)(x, torch.zeros(3, 5))
    with pytest.raises(hg.HypergradientError, match=r"batch dimension"):
        Anderson().solve(lambda z: z, torch.tensor(1.0))


README_EXAMPLE = _readme.example("hg.deq.EquilibriumLayer(cell", cos="cos")


def test_readme_deq_example_runs():
    # in a fresh interpreter, as a reader pastes it (float32; tests/_readme.py)
    assert README_EXAMPLE.run().values["cos"] > 0.9
