"""Stochastic bilevel solvers (hypergradient.stochastic): problem interface, oracles,
a registry-driven conformance suite over every solver, and the convergence claims.

References computed independently of the solvers: the closed forms of
``stochastic.problems.ridge_problem`` (x* by bisection to 1e-14), dense ``torch.func``
Hessians, and the core's full-batch ``implicit_hypergrad`` (solver="exact").
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, field

import pytest
import torch
from torch.func import hessian, jacrev

import _readme
import hypergradient as hg
from hypergradient import stochastic as st
from hypergradient.stochastic.problems import ridge_problem

# --------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------


def full_batch_version(problem: st.FiniteSumBilevelProblem) -> st.FiniteSumBilevelProblem:
    return st.FiniteSumBilevelProblem(
        problem.inner_loss,
        problem.outer_loss,
        problem.n_inner,
        problem.n_outer,
        inner_batch_size=None,
        outer_batch_size=None,
    )


@dataclass
class Logistic:
    """Binary logistic regression, one log-penalty per feature; z = {"w", "b"}, x tensor."""

    problem: st.FiniteSumBilevelProblem
    x: torch.Tensor
    z_star: dict = field(default_factory=dict)
    v_star: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=4)  # tests only read it; Newton with dense Hessians is not free
def logistic(n=40, m=30, dim=3, batch_size=8, seed=0) -> Logistic:
    gen = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, dim, generator=gen), torch.randn(m, dim, generator=gen)
    w_true = torch.randn(dim, generator=gen)
    y = (X @ w_true + 0.5 * torch.randn(n, generator=gen) > 0).double()
    yv = (Xv @ w_true + 0.5 * torch.randn(m, generator=gen) > 0).double()

    def inner_loss(z, x, idx):
        logits = X[idx] @ z["w"] + z["b"]
        data = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx])
        return data + 0.5 * torch.sum(torch.exp(x) * z["w"] ** 2)

    def outer_loss(z, x, idx):
        logits = Xv[idx] @ z["w"] + z["b"]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, yv[idx])

    problem = st.FiniteSumBilevelProblem(
        inner_loss, outer_loss, n, m, inner_batch_size=batch_size, outer_batch_size=batch_size
    )
    x = torch.linspace(-1.5, -0.5, dim)
    # z* by Newton on the flat vector (dense Hessian), v* = -H^{-1} grad_z F: both
    # independent of the library's oracles.
    all_in, all_out = torch.arange(n), torch.arange(m)

    def unflat(u):
        return {"w": u[:dim], "b": u[dim]}

    def inner_flat(u):
        return inner_loss(unflat(u), x, all_in)

    u = torch.zeros(dim + 1)
    for _ in range(30):
        grad = jacrev(inner_flat)(u)
        if float(grad.norm()) < 1e-14:
            break
        u = u - torch.linalg.solve(hessian(inner_flat)(u), grad)
    assert float(jacrev(inner_flat)(u).norm()) < 1e-13  # Newton converged (test setup)
    grad_f = jacrev(lambda uu: outer_loss(unflat(uu), x, all_out))(u)
    v = -torch.linalg.solve(hessian(inner_flat)(u), grad_f)
    return Logistic(problem, x, unflat(u), unflat(v))


# --------------------------------------------------------------------------------------
# the problem interface
# --------------------------------------------------------------------------------------


def test_partition_covers_every_sample_once_and_reweights_unequal_batches():
    problem = logistic(n=23, m=10, batch_size=5).problem  # 23 = 5 + 5 + 5 + 4 + 4
    sizes = [len(b) for b in problem.inner_batches]
    assert sorted(sizes) == [4, 4, 5, 5, 5]
    assert torch.equal(torch.sort(torch.cat(problem.inner_batches)).values, torch.arange(23))
    # weight |B_k| * n_batches / n makes the mean of the batch losses the full loss
    assert problem.inner_weights == tuple(s * 5 / 23 for s in sizes)
    assert problem.n_outer_batches == 2 and problem.outer_weights == (1.0, 1.0)


@pytest.mark.parametrize("tree", ["dict", "tensor"])
def test_mean_of_batch_losses_is_the_full_loss(tree):
    lg = logistic(n=23, m=17, batch_size=5)
    p, z, x = lg.problem, lg.z_star, lg.x
    if tree == "tensor":  # the same problem on a flat z
        base = p

        def flat(f):
            return lambda u, xx, idx: f({"w": u[:3], "b": u[3]}, xx, idx)

        p = st.FiniteSumBilevelProblem(
            flat(base.inner_loss),
            flat(base.outer_loss),
            23,
            17,
            inner_batch_size=5,
            outer_batch_size=5,
        )
        z = torch.cat([z["w"], z["b"].reshape(1)])
    inner, outer = p.full_batch()
    mean_in = sum(p.inner_batch_loss(z, x, k) for k in range(p.n_inner_batches))
    mean_out = sum(p.outer_batch_loss(z, x, k) for k in range(p.n_outer_batches))
    # same sum in another order: agreement to rounding
    torch.testing.assert_close(mean_in / p.n_inner_batches, inner(z, x), rtol=1e-14, atol=0)
    torch.testing.assert_close(mean_out / p.n_outer_batches, outer(z, x), rtol=1e-14, atol=0)


def test_problem_hypergradient_is_the_core_and_matches_the_ridge_closed_form():
    t = ridge_problem()
    x = torch.tensor(-1.0)
    got = t.problem.hypergradient(t.z_star(x), x)  # tensor trees, wrapped for the core
    # closed form h'(x) = e^x z*^T v*; dense solves on both sides: agreement to rounding
    torch.testing.assert_close(got, t.hypergradient(x), rtol=1e-12, atol=0)
    got_cg, stats = t.problem.hypergradient(
        t.z_star(x), x, solver="cg", tol=1e-13, max_steps=100, return_stats=True
    )
    assert stats.converged
    torch.testing.assert_close(got_cg, t.hypergradient(x), rtol=1e-10, atol=0)


def test_ridge_problem_solution_is_a_root_of_the_closed_form_and_a_minimum():
    t = ridge_problem()
    assert abs(float(t.hypergradient(t.x_star))) < 1e-12
    for dx in (-1e-3, 1e-3):
        assert t.value(t.x_star + dx) > t.value(t.x_star)


def test_ridge_problem_without_interior_optimum_raises():
    # without noise the validation loss prefers no penalty: x* = -inf
    with pytest.raises(hg.HypergradientError, match=r"not inside \[-12, 12\].*change noise"):
        ridge_problem(noise=0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inner_loss": 3}, r"`inner_loss` must be a callable `inner_loss\(params, hparams, idx"),
        ({"n_inner": 0}, r"`n_inner` must be a positive integer .*got 0"),
        ({"n_outer": 2.5}, r"`n_outer` must be a positive integer .*got 2.5"),
        ({"inner_batch_size": 0}, r"`inner_batch_size` must be a positive integer"),
        ({"partition_seed": "a"}, r"`partition_seed` must be an int or None, got 'a'"),
    ],
)
def test_problem_errors(kwargs, match):
    args = {
        "inner_loss": lambda z, x, i: z.sum(),
        "outer_loss": lambda z, x, i: z.sum(),
        "n_inner": 4,
        "n_outer": 4,
    }
    args.update(kwargs)
    with pytest.raises(hg.HypergradientError, match=match):
        st.FiniteSumBilevelProblem(**args)


def test_batch_draws_are_seeded_and_uniform():
    problem = logistic(n=23, m=10, batch_size=5).problem
    draws = [
        [problem.draw_inner(gen) for _ in range(2000)]
        for gen in (torch.Generator().manual_seed(4), torch.Generator().manual_seed(4))
    ]
    assert draws[0] == draws[1]
    counts = torch.bincount(torch.tensor(draws[0]), minlength=5)
    # 2000 uniform draws over 5 batches: 400 each, standard deviation ~18
    assert counts.min() > 320 and counts.max() < 480, counts
    gen = torch.Generator().manual_seed(0)
    assert {problem.draw_outer(gen) for _ in range(50)} == {0, 1}


def test_batch_size_at_least_n_means_one_full_batch():
    p = st.FiniteSumBilevelProblem(lambda z, x, i: z.sum(), lambda z, x, i: z.sum(), 4, 3)
    assert p.n_inner_batches == 1 and p.n_outer_batches == 1 and len(p.inner_batches[0]) == 4


# --------------------------------------------------------------------------------------
# oracles against dense torch.func derivatives
# --------------------------------------------------------------------------------------


def test_oracles_match_dense_derivatives():
    lg = logistic()
    p, x = lg.problem, lg.x
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(4, generator=gen)  # z as a flat vector
    a = torch.randn(4, generator=gen)  # v
    z, v = {"w": u[:3], "b": u[3]}, {"w": a[:3], "b": a[3]}

    def g(uu, xx):
        return p.inner_batch_loss({"w": uu[:3], "b": uu[3]}, xx, 2)

    def f(uu, xx):
        return p.outer_batch_loss({"w": uu[:3], "b": uu[3]}, xx, 1)

    grad = jacrev(g)(u, x)
    hvp = hessian(g)(u, x) @ a
    cross = jacrev(jacrev(g, argnums=0), argnums=1)(u, x).T @ a  # d/dx (grad_z g . v)
    got = st.inner_oracle(p, z, v, x, 2)
    flat = lambda t: torch.cat([t["w"], t["b"].reshape(1)])  # noqa: E731
    # two autograd routes to the same derivatives: agreement to rounding
    torch.testing.assert_close(flat(got.grad_z), grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(got.hvp), hvp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.cross, cross, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(st.inner_grad(p, z, x, 2)), grad, rtol=1e-12, atol=1e-14)
    out = st.outer_oracle(p, z, x, 1)
    torch.testing.assert_close(flat(out.grad_z), jacrev(f)(u, x), rtol=1e-12, atol=1e-14)
    assert torch.equal(out.grad_x, torch.zeros(3))  # the outer loss does not use x


def test_hypergradient_estimates_average_to_the_exact_hypergradient():
    # At (z*, v*) the mean of D_x over all (inner, outer) batch pairs is h'(x): the
    # estimate SOBA steps along is unbiased.
    lg = logistic()
    p = lg.problem
    total = torch.zeros(3)
    for i in range(p.n_inner_batches):
        for j in range(p.n_outer_batches):
            total += st.hypergradient_estimate(p, lg.z_star, lg.v_star, lg.x, i, j)
    mean = total / (p.n_inner_batches * p.n_outer_batches)
    exact = p.hypergradient(lg.z_star, lg.x)
    # z* to 1e-13 (Newton), a dense solve for v* and for the core: ~1e-12 relative
    torch.testing.assert_close(mean, exact, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------------------
# conformance: every registered solver
# --------------------------------------------------------------------------------------


@dataclass
class SolverInfo:
    """Options for the conformance tests and the error inputs of one solver."""

    # full-batch ridge: converges from |x0 - x*| = 1.69 to < 1e-3 within `steps` steps
    full_batch: dict
    steps: int
    # full batch at (z*, v*): the first direction is the exact hypergradient
    exact_direction: dict
    errors: list[tuple[dict, str]]
    cheap: dict = field(default_factory=dict)  # few inner iterations: fast smoke steps


STEP_ERRORS = [
    ({"inner_step": 0.0}, r"`inner_step` must be a finite step size > 0, got 0.0"),
    ({"outer_step": -1.0}, r"`outer_step` must be a finite step size > 0, got -1.0"),
    ({"outer_step": float("nan")}, r"`outer_step` must be a finite step size > 0, got nan"),
    ({"inner_step": True}, r"`inner_step` must be a finite step size > 0, got True"),
]

SOLVER_INFO = {
    "soba": SolverInfo(
        {"inner_step": 0.3, "outer_step": 1.0},
        150,
        {},
        [
            *STEP_ERRORS,
            ({"linear_step": 0}, r"`linear_step` must be a finite step size > 0"),
            ({"decreasing": 1}, r"`decreasing` must be True or False, got 1"),
        ],
    ),
    "saba": SolverInfo(
        {"inner_step": 0.3, "outer_step": 1.0},
        150,
        {},
        [
            *STEP_ERRORS,
            ({"init_memory": "random"}, r"`init_memory` must be 'full' .* or 'zeros'"),
        ],
    ),
    "stocbio": SolverInfo(
        {
            "inner_step": 0.3,
            "outer_step": 1.0,
            "inner_steps": 5,
            "neumann_steps": 30,
            "neumann_step": 0.45,
        },
        40,
        # the logistic problem's inner Hessian has eigenvalues in [0.21, 0.84]; with
        # eta = 1.2 the Neumann terms shrink by (1 - 1.2 * 0.21)^q: truncation < 1e-15
        {"neumann_steps": 120, "neumann_step": 1.2},
        [
            *STEP_ERRORS,
            ({"inner_steps": 0}, r"`inner_steps` must be an integer >= 1, got 0"),
            ({"neumann_steps": 2.0}, r"`neumann_steps` must be an integer >= 1, got 2.0"),
            ({"neumann_step": -0.1}, r"`neumann_step` must be a finite step size > 0"),
        ],
        {"inner_steps": 2, "neumann_steps": 2},
    ),
    "amigo": SolverInfo(
        {"inner_step": 0.3, "outer_step": 1.0, "inner_steps": 5, "linear_steps": 5},
        40,
        {},
        [
            *STEP_ERRORS,
            ({"linear_steps": 0}, r"`linear_steps` must be an integer >= 1, got 0"),
            ({"linear_step": "0.1"}, r"`linear_step` must be a finite step size > 0"),
        ],
        {"inner_steps": 2, "linear_steps": 2},
    ),
}
SOLVERS = st.available_solvers()


def test_every_registered_solver_has_conformance_info():
    assert sorted(SOLVER_INFO) == SOLVERS == ["amigo", "saba", "soba", "stocbio"]


@pytest.mark.parametrize("name", SOLVERS)
def test_shapes_and_trees(name):
    lg = logistic()
    solver = st.get_solver(name, **SOLVER_INFO[name].cheap)
    z0 = {"w": torch.zeros(3), "b": torch.tensor(0.0)}
    state = solver.init(lg.problem, z0, lg.x, seed=1)
    for _ in range(3):
        state = solver.step(lg.problem, state)
    assert state.num_steps == 3
    for tree in (state.z, state.v):
        assert set(tree) == {"w", "b"}
        assert tree["w"].shape == (3,) and tree["b"].shape == ()
        assert tree["w"].dtype == torch.float64 and not tree["w"].requires_grad
    assert state.x.shape == state.direction.shape == (3,)
    assert state.inner_samples > 0 and state.outer_samples > 0


@pytest.mark.parametrize("name", SOLVERS)
def test_step_is_pure_and_runs_are_reproducible(name):
    t = ridge_problem()
    solver = st.get_solver(name)
    state = solver.init(t.problem, t.z0, t.x0, seed=7)
    a, b = solver.step(t.problem, state), solver.step(t.problem, state)
    assert torch.equal(a.z, b.z) and torch.equal(a.v, b.v) and torch.equal(a.x, b.x)
    assert torch.equal(state.x, t.x0) and state.num_steps == 0  # the input is untouched
    runs = [st.run(solver, t.problem, t.z0, t.x0, num_steps=4, seed=s) for s in (7, 7, 8)]
    same, other = runs[0].state, runs[2].state
    assert torch.equal(same.x, runs[1].state.x) and torch.equal(same.z, runs[1].state.z)
    assert not torch.equal(same.x, other.x)  # another seed draws other batches


@pytest.mark.parametrize("name", SOLVERS)
def test_converges_on_the_full_batch_problem(name):
    # One batch makes every solver deterministic; each then converges to x*.
    info = SOLVER_INFO[name]
    t = ridge_problem()
    problem = full_batch_version(t.problem)
    out = st.run(st.get_solver(name, **info.full_batch), problem, t.z0, t.x0, num_steps=info.steps)
    assert abs(float(t.x0 - t.x_star)) > 1.5
    assert abs(float(out.state.x - t.x_star)) < 1e-3
    torch.testing.assert_close(out.state.z, t.z_star(out.state.x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", SOLVERS)
def test_direction_at_the_solution_is_the_exact_hypergradient(name):
    # Full batch, started at (z*(x), v*(x)): the inner loops stay there (their gradients
    # vanish), so the outer direction must be the core's full-batch implicit hypergradient.
    lg = logistic()
    problem = full_batch_version(lg.problem)
    solver = st.get_solver(name, **SOLVER_INFO[name].exact_direction)
    state = solver.init(problem, lg.z_star, lg.x, v0=lg.v_star)
    direction = solver.step(problem, state).direction
    exact = problem.hypergradient(lg.z_star, lg.x)
    assert float(exact.norm()) > 1e-2  # x is not stationary: the check is not 0 == 0
    # z*, v* and the core all at ~1e-13; StocBiO's Neumann truncation < 1e-15
    torch.testing.assert_close(direction, exact, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_saba_first_direction_with_minibatches_is_exact(seed):
    # Tables filled at (z*, v*, x): new_i - table_i + mean = mean = h'(x) for every batch.
    lg = logistic()
    state = st.SABA().init(lg.problem, lg.z_star, lg.x, v0=lg.v_star, seed=seed)
    direction = st.SABA().step(lg.problem, state).direction
    exact = lg.problem.hypergradient(lg.z_star, lg.x)
    torch.testing.assert_close(direction, exact, rtol=1e-10, atol=1e-13)


def test_saba_with_one_batch_is_soba():
    t = ridge_problem()
    problem = full_batch_version(t.problem)
    a = st.run(st.SABA(outer_step=0.1), problem, t.z0, t.x0, num_steps=20).state
    b = st.run(st.SOBA(outer_step=0.1), problem, t.z0, t.x0, num_steps=20).state
    torch.testing.assert_close(a.x, b.x, rtol=1e-12, atol=1e-14)  # new - old + old = new


def test_soba_decreasing_schedule():
    solver = st.SOBA(inner_step=0.2, outer_step=0.1, decreasing=True)
    rho, rho_v, gamma = solver.steps_at(31)  # t + 1 = 32 = 2^5
    assert (rho, rho_v, gamma) == pytest.approx((0.2 / 4, 0.2 / 4, 0.1 / 8))
    assert st.SOBA(inner_step=0.2, linear_step=0.05).steps_at(99) == (0.2, 0.05, 0.01)


@pytest.mark.parametrize("name", SOLVERS)
def test_option_errors(name):
    for options, match in SOLVER_INFO[name].errors:
        with pytest.raises(hg.HypergradientError, match=match):
            st.get_solver(name, **options)


@pytest.mark.parametrize("name", SOLVERS)
def test_init_errors(name):
    t = ridge_problem()
    solver = st.get_solver(name)
    with pytest.raises(hg.HypergradientError, match=r"`problem` must be a .*FiniteSumBilevelProb"):
        solver.init((t.problem.inner_loss, t.problem.outer_loss), t.z0, t.x0)
    with pytest.raises(hg.HypergradientError, match=r"z0 and x0 must share one floating dtype"):
        solver.init(t.problem, t.z0, t.x0.float())
    with pytest.raises(hg.HypergradientError, match=r"`v0` has shape \(3,\) but `z0` has shape"):
        solver.init(t.problem, t.z0, t.x0, v0=torch.zeros(3))
    with pytest.raises(hg.HypergradientError, match=r"x0 .* contains 1 NaN/inf"):
        solver.init(t.problem, t.z0, torch.tensor(float("nan")))
    with pytest.raises(hg.HypergradientError, match=r"`seed` must be an int, got 1.5"):
        solver.init(t.problem, t.z0, t.x0, seed=1.5)


@pytest.mark.parametrize("name", SOLVERS)
def test_loss_errors(name):
    t = ridge_problem()
    p = t.problem
    vector = st.FiniteSumBilevelProblem(
        lambda z, x, i: z * x, p.outer_loss, 50, 50, inner_batch_size=5
    )
    with pytest.raises(
        hg.HypergradientError,
        match=r"`inner_loss\(params, hparams, idx\)` must "
        r"return a scalar tensor .*got a tensor of shape \(10,\)",
    ):
        st.get_solver(name).init(vector, t.z0, t.x0)
    single = st.FiniteSumBilevelProblem(
        p.inner_loss, lambda z, x, i: p.outer_loss(z, x, i).float(), 50, 50
    )
    with pytest.raises(hg.HypergradientError, match=r"`outer_loss.*returned dtype torch.float32"):
        st.get_solver(name).init(single, t.z0, t.x0)
    overflow = st.FiniteSumBilevelProblem(
        p.inner_loss, lambda z, x, i: torch.exp(1e3 * x) + p.outer_loss(z, x, i), 50, 50
    )
    first_batch = r"`outer_loss\(z0, x0, idx\)` on the first batch returned inf"
    with pytest.raises(hg.HypergradientError, match=first_batch):
        st.get_solver(name).init(overflow, t.z0, torch.tensor(1.0))


def test_get_solver_errors():
    with pytest.raises(
        hg.HypergradientError,
        match=r"unknown stochastic bilevel solver; "
        r"expected one of \['amigo', 'saba', 'soba', 'stocbio'\]",
    ):
        st.get_solver("sgd")
    with pytest.raises(hg.HypergradientError, match=r"options can only be given with a solver "):
        st.get_solver(st.SABA(), inner_step=0.1)
    assert st.get_solver(st.SABA(outer_step=0.5)).outer_step == 0.5


# --------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------


def test_run_records_and_callback():
    t = ridge_problem()
    seen = []

    def callback(state):
        seen.append(state.num_steps)
        return {"err": abs(float(state.x - t.x_star))}

    out = st.run("soba", t.problem, t.z0, t.x0, num_steps=7, record_every=3, callback=callback)
    assert [r["step"] for r in out.records] == seen == [0, 3, 6, 7]
    assert out.status == "finished" and out.state.num_steps == 7
    last = out.records[-1]
    assert last["inner_samples"] == last["outer_samples"] == 7 * 5  # batches of 5
    assert last["epochs"] == pytest.approx(35 / 50)
    assert out.records[0]["err"] == pytest.approx(abs(float(t.x0 - t.x_star)))
    times = [r["time_s"] for r in out.records]
    assert times == sorted(times) and out.time_s == times[-1]
    # SABA's full memory costs one pass over the data at init
    saba = st.run("saba", t.problem, t.z0, t.x0, num_steps=0)
    assert saba.records[0]["inner_samples"] == 50 and saba.records[0]["epochs"] == 1.0


def test_run_stops_at_the_time_budget():
    t = ridge_problem()
    out = st.run("soba", t.problem, t.z0, t.x0, num_steps=10**6, max_time_s=0.05)
    assert 0 < out.state.num_steps < 10**6 and out.time_s >= 0.05
    assert out.status == "time_budget"
    ticks = iter(range(10**6))  # a fake clock: one second per call
    clock = lambda: next(ticks)  # noqa: E731
    out = st.run("soba", t.problem, t.z0, t.x0, num_steps=100, max_time_s=5, timer=clock)
    # init and each step read the clock twice (start, end): 1 s each; stop once >= 5 s
    assert out.state.num_steps == 4 and out.time_s == 5 and out.status == "time_budget"
    assert out.records[-1]["step"] == out.state.num_steps


def test_run_stops_when_the_callback_asks():
    t = ridge_problem()

    def callback(state):
        error = abs(float(state.x - t.x_star))
        return {"error": error, "stop": error < 1e-3}

    solver = st.SABA(outer_step=0.1)
    out = st.run(solver, t.problem, t.z0, t.x0, num_steps=5000, record_every=10, callback=callback)
    assert out.status == "stopped" and out.state.num_steps < 5000
    assert out.records[-1]["error"] < 1e-3 <= out.records[-2]["error"]
    assert out.records[-1]["step"] == out.state.num_steps


def test_run_reports_divergence():
    t = ridge_problem()
    # a batch's inner Hessian has eigenvalues up to ~7: a step of 1e3 multiplies z by
    # ~1e4 per step, which overflows float64 within ~80 steps
    solver = st.SOBA(inner_step=1e3)
    with pytest.raises(
        hg.ConvergenceError,
        match=r"SOBA produced NaN/inf iterates at step "
        r"\d+.*lower outer_step",
    ):
        st.run(solver, t.problem, t.z0 + 1, t.x0, num_steps=200)
    out = st.run(solver, t.problem, t.z0 + 1, t.x0, num_steps=200, throw=False)
    assert out.status == "nonfinite" and out.state.num_steps < 200
    assert torch.isfinite(out.state.x) and out.records[-1]["step"] == out.state.num_steps


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": -1}, r"`num_steps` must be an integer >= 0, got -1"),
        ({"num_steps": 1, "record_every": 0}, r"`record_every` must be an integer >= 1"),
        ({"num_steps": 1, "max_time_s": 0}, r"`max_time_s` must be a positive number"),
        ({"num_steps": 1, "callback": "print"}, r"`callback` must be a callable"),
        ({"num_steps": 1, "timer": 3.0}, r"`timer` must be a callable returning seconds"),
    ],
)
def test_run_errors(kwargs, match):
    t = ridge_problem()
    with pytest.raises(hg.HypergradientError, match=match):
        st.run("soba", t.problem, t.z0, t.x0, **kwargs)


# --------------------------------------------------------------------------------------
# the convergence claim: SABA converges linearly, SOBA stalls at a noise floor
# --------------------------------------------------------------------------------------


def test_saba_converges_linearly_while_soba_stalls_at_a_noise_floor():
    # Ridge with a scalar log-penalty (10 inner and 10 outer batches of 5), same constant
    # steps for both.  x* is the bisection root of the closed-form h' (error < 1e-14).
    t = ridge_problem()
    x_star = float(t.x_star)

    def errors(solver):
        out = st.run(
            solver,
            t.problem,
            t.z0,
            t.x0,
            num_steps=1500,
            record_every=10,
            callback=lambda s: {"err": abs(float(s.x) - x_star)},
        )
        return [r["err"] for r in out.records]

    saba = errors(st.SABA(inner_step=0.1, outer_step=0.1))
    soba = errors(st.SOBA(inner_step=0.1, outer_step=0.1))
    assert saba[0] == soba[0] > 1.5
    assert saba[-1] < 1e-6
    # linear: the error falls by a constant factor per block of 300 steps (geometric
    # decay), until it reaches rounding level (~1e-14)
    blocks = [saba[k] for k in range(0, 151, 30)]
    assert all(b < 1e-13 or b < 0.5 * a for a, b in zip(blocks, blocks[1:])), blocks
    last_saba = statistics.median(saba[len(saba) // 2 :])
    last_soba = statistics.median(soba[len(soba) // 2 :])
    assert last_soba > 10 * last_saba
    assert last_soba > 1e-2  # a noise floor, not slow convergence to x*


# --------------------------------------------------------------------------------------
# the README subsection runs as written
# --------------------------------------------------------------------------------------


README_EXAMPLE = _readme.example("st.SABA(", error="abs(float(out.state.x - t.x_star))")


def test_readme_stochastic_example_runs():
    run = README_EXAMPLE.run()  # in a fresh interpreter, as a reader pastes it
    assert run.values["error"] < 1e-6
    assert "SABA" in run.stdout
