"""Tests of the linear solvers in hypergradient.linalg (float64, seeded, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from hypergradient._errors import ConvergenceError, HypergradientError
from hypergradient._results import Result, Solution, SolveStats
from hypergradient._tree import tree_flatten_vector, tree_unflatten_vector
from hypergradient.linalg import (
    CG,
    GMRES,
    MINRES,
    AbstractLinearSolver,
    Dense,
    Identity,
    Neumann,
    available_solvers,
    diagonal_preconditioner,
    estimate_lambda_max,
    get_solver,
    solve,
)

DT = torch.float64
N = 30
# dict layout of the 30 unknowns: two leaves of different shapes
LIKE = {"w": torch.zeros(4, 5, dtype=DT), "b": torch.zeros(10, dtype=DT)}


# --------------------------------------------------------------------------------------
# problem builders
# --------------------------------------------------------------------------------------


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    return q


def _from_eigs(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    q = _orthogonal(len(eigs), _gen(seed))
    a = q @ torch.diag(eigs.to(DT)) @ q.T
    return (a + a.T) / 2


def spd_matrix(seed: int = 1) -> torch.Tensor:
    return _from_eigs(torch.linspace(1.0, 10.0, N, dtype=DT), seed)


def indefinite_matrix(seed: int = 2) -> torch.Tensor:
    half = torch.linspace(1.0, 10.0, N // 2, dtype=DT)
    return _from_eigs(torch.cat([half, -half]), seed)


def ill_matrix(seed: int = 3) -> torch.Tensor:
    return _from_eigs(torch.logspace(0, 6, N, dtype=DT), seed)  # cond = 1e6


def rhs(seed: int = 4, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=_gen(seed), dtype=DT)


def as_problem(a: torch.Tensor, b: torch.Tensor, kind: str):
    """``(matvec, b)`` on a plain tensor or on a dict of two differently shaped tensors."""
    if kind == "tensor":
        return (lambda v: a @ v), b

    def matvec(tree):
        return tree_unflatten_vector(a @ tree_flatten_vector(tree), LIKE)

    return matvec, tree_unflatten_vector(b.clone(), LIKE)


def flat(x) -> torch.Tensor:
    return tree_flatten_vector(x)


def rel_err(x, x_true: torch.Tensor) -> float:
    return float(torch.linalg.norm(flat(x) - x_true) / torch.linalg.norm(x_true))


KINDS = ["tensor", "dict"]
ACCURATE = {
    "cg": lambda: CG(max_steps=200, tol=1e-12),
    "minres": lambda: MINRES(max_steps=200, tol=1e-12),
    "gmres": lambda: GMRES(max_steps=200, restart=N + 10, tol=1e-12),
    "exact": lambda: Dense(),
}


# --------------------------------------------------------------------------------------
# accuracy against torch.linalg.solve
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(ACCURATE))
def test_spd_system(name, kind):
    a, b = spd_matrix(), rhs()
    matvec, bt = as_problem(a, b, kind)
    x, stats = ACCURATE[name]().solve(matvec, bt)
    assert stats.result is Result.SUCCESSFUL
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-8
    assert type(x) is type(bt)
    if kind == "dict":
        assert {k: v.shape for k, v in x.items()} == {k: v.shape for k, v in bt.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["minres", "gmres", "exact"])
def test_indefinite_system_solved(name, kind):
    a, b = indefinite_matrix(), rhs()
    matvec, bt = as_problem(a, b, kind)
    x, stats = ACCURATE[name]().solve(matvec, bt)
    assert stats.converged
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-8


@pytest.mark.parametrize("kind", KINDS)
def test_cg_on_indefinite_solves_or_reports(kind):
    a, b = indefinite_matrix(), rhs()
    matvec, bt = as_problem(a, b, kind)
    x, stats = CG(max_steps=200, tol=1e-12).solve(matvec, bt)
    if stats.converged:
        assert rel_err(x, torch.linalg.solve(a, b)) < 1e-6
    else:
        assert stats.result in (Result.BREAKDOWN, Result.MAX_STEPS_REACHED)
        assert torch.isfinite(flat(x)).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(ACCURATE))
def test_ill_conditioned_spd(name, kind):
    a, b = ill_matrix(), rhs()
    matvec, bt = as_problem(a, b, kind)
    solver = {
        "cg": CG(max_steps=400, tol=1e-11),
        "minres": MINRES(max_steps=400, tol=1e-11),
        "gmres": GMRES(max_steps=400, restart=N + 10, tol=1e-11),
        "exact": Dense(),
    }[name]
    x, stats = solver.solve(matvec, bt)
    assert stats.converged
    # forward error <= cond * relative residual (+ rounding): cond = 1e6
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-6
    assert float(torch.linalg.norm(b - a @ flat(x))) < 1e-7 * float(torch.linalg.norm(b))


# --------------------------------------------------------------------------------------
# CG specifics
# --------------------------------------------------------------------------------------


def test_cg_breakdown_is_reported():
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    b = torch.tensor([1.0, 1.0], dtype=DT)  # p^T A p = 0 at the first step
    x, stats = CG().solve(lambda v: a @ v, b)
    assert stats.result is Result.BREAKDOWN
    assert not stats.converged
    assert stats.num_steps == 0 and stats.num_matvecs == 1
    assert "positive definite" in stats.extra["reason"]
    assert torch.equal(x, torch.zeros(2, dtype=DT))
    with pytest.raises(ConvergenceError, match="broke down.*not positive definite"):
        solve(lambda v: a @ v, b, "cg", throw=True)


def test_cg_breakdown_on_negative_definite_dict():
    matvec, bt = as_problem(-spd_matrix(), rhs(), "dict")
    _, stats = CG().solve(matvec, bt)
    assert stats.result is Result.BREAKDOWN
    assert stats.extra["curvature"] < 0


def test_cg_jacobi_preconditioner_cuts_steps():
    s = _from_eigs(torch.linspace(1.0, 5.0, N, dtype=DT), 5)
    d = torch.diag(torch.logspace(0, 3, N, dtype=DT))
    a = d @ s @ d  # badly scaled SPD
    b = rhs()
    x_true = torch.linalg.solve(a, b)
    for kind in KINDS:
        matvec, bt = as_problem(a, b, kind)
        diag = torch.diagonal(a).clone()
        diag_tree = diag if kind == "tensor" else tree_unflatten_vector(diag, bt)
        plain = CG(max_steps=1000, tol=1e-10).solve(matvec, bt)
        pre = CG(max_steps=1000, tol=1e-10, preconditioner=diagonal_preconditioner(diag_tree))
        prec = pre.solve(matvec, bt)
        assert plain.stats.converged and prec.stats.converged
        assert rel_err(prec.value, x_true) < 1e-8
        assert 3 * prec.stats.num_steps < plain.stats.num_steps


def test_cg_matvec_count_and_x0():
    a, b = spd_matrix(), rhs()
    calls = []

    def matvec(v):
        calls.append(1)
        return a @ v

    x_true = torch.linalg.solve(a, b)
    x, stats = CG(max_steps=100, tol=1e-12).solve(matvec, b)
    assert stats.num_matvecs == len(calls) == stats.num_steps
    calls.clear()
    _, stats = CG(tol=1e-8).solve(matvec, b, x0=x_true)
    assert stats.converged and stats.num_steps == 0 and stats.num_matvecs == 1 == len(calls)
    # a nearby x0 converges in fewer steps
    x_near = x_true + 1e-6 * rhs(7)
    _, near = CG(max_steps=100, tol=1e-12).solve(matvec, b, x0=x_near)
    _, cold = CG(max_steps=100, tol=1e-12).solve(matvec, b)
    assert near.converged and near.num_steps < cold.num_steps


def test_cg_zero_rhs_and_atol():
    a = spd_matrix()
    x, stats = CG().solve(lambda v: a @ v, torch.zeros(N, dtype=DT))
    assert stats.converged and stats.num_steps == 0 and torch.equal(x, torch.zeros(N, dtype=DT))
    _, stats = CG(tol=0.0, atol=1e-3).solve(lambda v: a @ v, rhs())
    assert stats.converged and stats.residual_norm <= 1e-3


def test_cg_nonfinite_is_reported():
    b = rhs()
    x, stats = CG().solve(lambda v: v * float("nan"), b)
    assert stats.result is Result.NONFINITE
    assert torch.isfinite(x).all()


def test_cg_non_pd_preconditioner_reported():
    a = spd_matrix()
    _, stats = CG(preconditioner=lambda r: -r).solve(lambda v: a @ v, rhs())
    assert stats.result is Result.BREAKDOWN and "preconditioner" in stats.extra["reason"]


def test_cg_differentiable_through_solve():
    a = spd_matrix()
    b = rhs().requires_grad_(True)
    x, stats = CG(max_steps=100, tol=1e-11).solve(lambda v: a @ v, b)
    assert stats.converged
    c = rhs(9)
    (g,) = torch.autograd.grad(torch.dot(c, x), b)
    assert torch.allclose(g, torch.linalg.solve(a, c), atol=1e-8)


# --------------------------------------------------------------------------------------
# non-convergence is never silent
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["cg", "minres", "gmres"])
def test_max_steps_reported(name, kind):
    a, b = ill_matrix(), rhs()
    matvec, bt = as_problem(a, b, kind)
    sol = get_solver(name, max_steps=3, tol=1e-12).solve(matvec, bt)
    assert sol.stats.result is Result.MAX_STEPS_REACHED
    assert sol.stats.num_steps == 3
    assert sol.stats.residual_norm > 1e-12 * float(torch.linalg.norm(b))
    with pytest.raises(ConvergenceError, match="did not converge within max_steps"):
        solve(matvec, bt, name, throw=True, max_steps=3, tol=1e-12)


def test_max_steps_zero():
    a, b = spd_matrix(), rhs()
    x, stats = CG(max_steps=0).solve(lambda v: a @ v, b)
    assert stats.result is Result.MAX_STEPS_REACHED and stats.num_matvecs == 0
    assert torch.equal(x, torch.zeros_like(b))


# --------------------------------------------------------------------------------------
# MINRES / GMRES specifics
# --------------------------------------------------------------------------------------


def test_minres_residual_is_true_residual():
    a, b = indefinite_matrix(), rhs()
    for steps in (3, 10):
        x, stats = MINRES(max_steps=steps).solve(lambda v: a @ v, b)
        assert math.isclose(stats.residual_norm, float(torch.linalg.norm(b - a @ x)), rel_tol=1e-8)


def test_minres_singular_compatible():
    a = torch.diag(torch.tensor([2.0, -1.0, 0.0], dtype=DT))
    b = torch.tensor([1.0, 1.0, 0.0], dtype=DT)
    x, stats = MINRES(tol=1e-12).solve(lambda v: a @ v, b)
    assert stats.converged and torch.allclose(a @ x, b)


@pytest.mark.parametrize("name", ["minres", "gmres"])
def test_singular_incompatible_reports_breakdown(name):
    q = _orthogonal(4, _gen(12))
    a = q @ torch.diag(torch.tensor([1.0, 0.0, 3.0, -2.0], dtype=DT)) @ q.T
    a = (a + a.T) / 2
    b = q @ torch.ones(4, dtype=DT)  # has a component (norm 1) in the null space
    x, stats = get_solver(name, tol=1e-12).solve(lambda v: a @ v, b)
    assert stats.result is Result.BREAKDOWN and "singular" in stats.extra["reason"]
    # what is returned is a least-squares solution, with its true residual
    assert torch.allclose(a @ x, a @ torch.linalg.pinv(a) @ b, atol=1e-8)
    assert math.isclose(stats.residual_norm, 1.0, rel_tol=1e-8)


@pytest.mark.parametrize("name", ["minres", "gmres", "exact"])
def test_nonfinite_reported(name):
    _, stats = get_solver(name).solve(lambda v: v * float("nan"), rhs())
    assert stats.result is Result.NONFINITE


@pytest.mark.parametrize("name", sorted(ACCURATE))
def test_float32(name):
    a, b = spd_matrix().float(), rhs().float()
    options = {"exact": {}, "gmres": {"tol": 1e-5, "restart": 40}}.get(name, {"tol": 1e-5})
    x, stats = get_solver(name, **options).solve(lambda v: a @ v, b)
    assert stats.converged and x.dtype == torch.float32
    assert rel_err(x.double(), torch.linalg.solve(a.double(), b.double())) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("restart", [5, 40])
def test_gmres_nonsymmetric(kind, restart):
    a = 4.0 * torch.eye(N, dtype=DT) + torch.randn(N, N, generator=_gen(11), dtype=DT) / 3
    b = rhs()
    assert not torch.allclose(a, a.T)
    matvec, bt = as_problem(a, b, kind)
    x, stats = GMRES(max_steps=300, restart=restart, tol=1e-12).solve(matvec, bt)
    assert stats.converged
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-9
    assert math.isclose(
        stats.residual_norm, float(torch.linalg.norm(b - a @ flat(x))), rel_tol=1e-6, abs_tol=1e-14
    )
    assert stats.num_matvecs >= stats.num_steps
    assert GMRES.requires_symmetric is False and CG.requires_symmetric is True


def test_gmres_x0_and_restart_count():
    a = 4.0 * torch.eye(N, dtype=DT) + torch.randn(N, N, generator=_gen(11), dtype=DT) / 3
    b = rhs()
    x_true = torch.linalg.solve(a, b)
    _, stats = GMRES().solve(lambda v: a @ v, b, x0=x_true)
    assert stats.converged and stats.num_steps == 0 and stats.num_matvecs == 1
    _, stats = GMRES(max_steps=12, restart=5, tol=1e-15).solve(lambda v: a @ v, b)
    assert stats.num_steps == 12 and stats.result is Result.MAX_STEPS_REACHED
    # 12 Arnoldi steps in cycles 5 + 5 + 2, plus the true residual after each cycle
    assert stats.num_matvecs == 12 + 3


def test_dense_singular_reported():
    a = torch.diag(torch.tensor([1.0, 0.0], dtype=DT))
    x, stats = Dense().solve(lambda v: a @ v, torch.ones(2, dtype=DT))
    assert stats.result is Result.BREAKDOWN and "singular" in stats.extra["reason"]


def test_dense_numerically_singular_is_reported_not_solved_to_garbage():
    # The Hessian X^T X of an overparameterised least-squares problem (rank 6 of 24): LU
    # leaves rounding-level pivots instead of an exact zero, and solving would return a
    # finite x of size ~1/eps.  A damped or well-conditioned system is still solved.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 24, generator=g, dtype=DT)
    hessian = x.T @ x
    b = hessian @ torch.randn(24, generator=g, dtype=DT)  # in the range: compatible
    _, stats = Dense().solve(lambda v: hessian @ v, b)
    assert stats.result is Result.BREAKDOWN
    assert "numerically singular" in stats.extra["reason"]
    assert "damping" in stats.extra["reason"]
    solution, stats = Dense(damping=1e-3).solve(lambda v: hessian @ v, b)
    assert stats.result is Result.SUCCESSFUL
    exact = torch.linalg.solve(hessian + 1e-3 * torch.eye(24, dtype=DT), b)
    assert torch.allclose(solution, exact, rtol=1e-8, atol=0)
    # ill-conditioned (cond 1e10) but not singular in float64: still solved
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=DT))
    ill = q @ torch.diag(torch.logspace(0, -10, 8, dtype=DT)) @ q.T
    rhs = torch.randn(8, generator=g, dtype=DT)
    solution, stats = Dense().solve(lambda v: ill @ v, rhs)
    assert stats.result is Result.SUCCESSFUL
    assert float((ill @ solution - rhs).norm() / rhs.norm()) < 1e-4


def test_dense_max_size():
    with pytest.raises(HypergradientError, match="max_size.*'cg'"):
        Dense(max_size=10).solve(lambda v: v, torch.ones(11, dtype=DT))


# --------------------------------------------------------------------------------------
# damping
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(ACCURATE))
def test_damping(name, kind):
    a, b = spd_matrix(), rhs()
    damping = 0.7
    matvec, bt = as_problem(a, b, kind)
    options = {"exact": {}, "gmres": {"restart": 40}}.get(name, {})
    if name != "exact":
        options.update(max_steps=200, tol=1e-12)
    x, stats = get_solver(name, damping=damping, **options).solve(matvec, bt)
    assert stats.converged
    x_true = torch.linalg.solve(a + damping * torch.eye(N, dtype=DT), b)
    assert rel_err(x, x_true) < 1e-9


# --------------------------------------------------------------------------------------
# Neumann / identity / power iteration
# --------------------------------------------------------------------------------------


def _dense_neumann(a, b, alpha, k):
    m = torch.eye(len(b), dtype=DT) - alpha * a
    term, total = b.clone(), b.clone()
    for _ in range(k):
        term = m @ term
        total = total + term
    return alpha * total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_neumann_equals_truncated_series(k, kind):
    a, b = spd_matrix(), rhs()
    alpha = 0.08
    matvec, bt = as_problem(a, b, kind)
    x, stats = Neumann(max_steps=k, alpha=alpha).solve(matvec, bt)
    expected = _dense_neumann(a, b, alpha, k)
    assert torch.allclose(flat(x), expected, rtol=0, atol=1e-12)
    assert stats.result is Result.SUCCESSFUL and stats.num_matvecs == k and stats.num_steps == k
    assert math.isnan(stats.residual_norm) and stats.extra["residual_computed"] is False
    assert stats.extra["alpha"] == alpha


def test_neumann_converges_for_valid_alpha():
    a, b = spd_matrix(), rhs()
    lam = float(torch.linalg.eigvalsh(a).max())
    x_true = torch.linalg.solve(a, b)
    x, stats = Neumann(max_steps=400, alpha=1.5 / lam).solve(lambda v: a @ v, b)
    assert stats.converged and rel_err(x, x_true) < 1e-9
    # tol > 0: early stop with the exact residual reported
    x, stats = Neumann(max_steps=1000, alpha=1.0 / lam, tol=1e-10).solve(lambda v: a @ v, b)
    assert stats.converged and stats.num_steps < 1000
    assert stats.extra["residual_computed"] is True
    assert math.isclose(stats.residual_norm, float(torch.linalg.norm(b - a @ x)), rel_tol=1e-6)
    assert stats.residual_norm <= 1e-10 * float(torch.linalg.norm(b))
    # tol > 0 but too few terms: reported, with the residual of the returned x
    x, stats = Neumann(max_steps=5, alpha=1.0 / lam, tol=1e-10).solve(lambda v: a @ v, b)
    assert stats.result is Result.MAX_STEPS_REACHED and stats.num_matvecs == 6
    assert torch.allclose(x, _dense_neumann(a, b, 1.0 / lam, 5), atol=1e-12)
    assert math.isclose(stats.residual_norm, float(torch.linalg.norm(b - a @ x)), rel_tol=1e-8)


def test_neumann_x0():
    a, b = spd_matrix(), rhs()
    lam = float(torch.linalg.eigvalsh(a).max())
    x_true = torch.linalg.solve(a, b)
    x, stats = Neumann(max_steps=3, alpha=1 / lam).solve(lambda v: a @ v, b, x0=x_true)
    assert torch.allclose(x, x_true, atol=1e-12) and stats.num_matvecs == 4


@pytest.mark.parametrize("kind", KINDS)
def test_neumann_diverges(kind):
    a, b = spd_matrix(), rhs()
    lam = float(torch.linalg.eigvalsh(a).max())
    matvec, bt = as_problem(a, b, kind)
    x, stats = Neumann(max_steps=1000, alpha=2.1 / lam).solve(matvec, bt)
    assert stats.result is Result.DIVERGED and not stats.converged
    assert stats.num_steps < 1000
    assert math.isclose(stats.extra["lambda_max"], lam, rel_tol=1e-6)
    assert math.isclose(stats.extra["alpha"], 2.1 / lam)
    assert stats.extra["residual_computed"] is True
    assert math.isclose(
        stats.residual_norm, float(torch.linalg.norm(b - a @ flat(x))), rel_tol=1e-6
    )
    with pytest.raises(ConvergenceError, match="diverged"):
        solve(matvec, bt, "neumann", throw=True, max_steps=1000, alpha=2.1 / lam)


def test_neumann_default_alpha_uses_power_iteration():
    a, b = spd_matrix(), rhs()
    matvec = lambda v: a @ v  # noqa: E731
    x, stats = Neumann(max_steps=10, power_steps=15).solve(matvec, b)
    lam_est = estimate_lambda_max(matvec, b, num_steps=15)
    assert stats.extra["lambda_max"] == lam_est
    assert stats.extra["alpha"] == 1.0 / lam_est
    assert stats.num_matvecs == 15 + 10
    assert torch.allclose(x, _dense_neumann(a, b, 1.0 / lam_est, 10), atol=1e-12)
    assert 0.5 < lam_est / float(torch.linalg.eigvalsh(a).max()) <= 1.0 + 1e-12


def test_neumann_nonfinite():
    _, stats = Neumann(alpha=0.1, max_steps=3).solve(lambda v: v * float("inf"), rhs())
    assert stats.result is Result.NONFINITE


@pytest.mark.parametrize("kind", KINDS)
def test_estimate_lambda_max(kind):
    eigs = torch.cat([torch.linspace(1.0, 5.0, N - 1, dtype=DT), torch.tensor([10.0], dtype=DT)])
    a = _from_eigs(eigs, 6)
    matvec, bt = as_problem(a, rhs(), kind)
    est = estimate_lambda_max(matvec, bt, num_steps=40)
    exact = float(torch.linalg.eigvalsh(a).max())
    assert abs(est - exact) <= 1e-6 * exact
    # deterministic by default, and a generator changes the start
    assert est == estimate_lambda_max(matvec, bt, num_steps=40)
    assert estimate_lambda_max(matvec, bt, 3) != estimate_lambda_max(matvec, bt, 3, _gen(5))


@pytest.mark.parametrize("kind", KINDS)
def test_identity(kind):
    _, bt = as_problem(spd_matrix(), rhs(), kind)

    def matvec(v):
        raise AssertionError("Identity must not call matvec")

    x, stats = Identity(alpha=0.3).solve(matvec, bt)
    assert torch.equal(flat(x), 0.3 * rhs())
    assert stats.converged and stats.num_matvecs == 0 and stats.num_steps == 0
    assert stats.extra["residual_computed"] is False
    assert torch.equal(flat(Identity().solve(matvec, bt).value), rhs())


# --------------------------------------------------------------------------------------
# option validation and the registry
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: CG(max_steps=-1), r"max_steps.*integer >= 0.*got -1"),
        (lambda: CG(max_steps=2.5), r"max_steps.*got 2.5"),
        (lambda: CG(max_steps=True), r"max_steps.*got True"),
        (lambda: CG(tol=-1e-3), r"tol.*>= 0.*got -0.001"),
        (lambda: CG(atol=float("nan")), r"atol.*finite.*got nan"),
        (lambda: CG(damping=-1.0), r"damping.*got -1.0"),
        (lambda: CG(preconditioner=3), r"preconditioner.*callable.*int"),
        (lambda: MINRES(tol=-1.0), r"MINRES.*tol"),
        (lambda: GMRES(restart=0), r"restart.*integer >= 1.*got 0"),
        (lambda: GMRES(max_steps=-5), r"GMRES.*max_steps"),
        (lambda: Neumann(alpha=0.0), r"alpha.*> 0.*got 0.0.*alpha=None"),
        (lambda: Neumann(alpha=-1.0), r"alpha"),
        (lambda: Neumann(power_steps=0), r"power_steps.*>= 1"),
        (lambda: Neumann(tol=-1.0), r"Neumann.*tol"),
        (lambda: Identity(alpha=0), r"Identity.*alpha.*> 0"),
        (lambda: Dense(max_size=0), r"max_size.*>= 1"),
        (lambda: Dense(damping=-0.1), r"damping"),
        (lambda: get_solver("conjugate"), r"unknown linear solver.*'cg'"),
        (lambda: get_solver(CG(), tol=1.0), r"options can only be given with a solver name"),
        (lambda: solve(lambda v: v, rhs(), "nope"), r"unknown linear solver"),
        (lambda: solve(lambda v: v, rhs(), "cg", max_steps=-2), r"max_steps"),
        (lambda: estimate_lambda_max(lambda v: v, rhs(), 0), r"num_steps"),
        (lambda: diagonal_preconditioner(torch.tensor([1.0, -2.0], dtype=DT)), r"non-positive"),
        (lambda: diagonal_preconditioner(torch.tensor([1.0, 2.0]), floor=-1.0), r"floor"),
        (lambda: diagonal_preconditioner({"a": torch.tensor([1, 2])}), r"diagonal\['a'\]"),
    ],
)
def test_bad_options_raise(factory, match):
    with pytest.raises(HypergradientError, match=match):
        factory()


def test_diagonal_preconditioner_floor_and_dict():
    d = {"a": torch.tensor([0.0, 4.0], dtype=DT), "b": torch.tensor([[-1.0]], dtype=DT)}
    apply = diagonal_preconditioner(d, floor=0.5)
    out = apply({"a": torch.ones(2, dtype=DT), "b": torch.ones(1, 1, dtype=DT)})
    assert torch.equal(out["a"], torch.tensor([2.0, 0.25], dtype=DT))
    assert torch.equal(out["b"], torch.tensor([[2.0]], dtype=DT))


def test_solvers_are_frozen_and_registered():
    assert set(available_solvers()) >= {"cg", "minres", "gmres", "neumann", "identity", "exact"}
    solver = CG()
    with pytest.raises(AttributeError):
        solver.tol = 1.0  # type: ignore[misc]
    assert get_solver(solver) is solver
    assert isinstance(get_solver("neumann", alpha=0.1), Neumann)


def _conformance_options(name: str) -> dict:
    return {
        "cg": {"max_steps": 200, "tol": 1e-12},
        "minres": {"max_steps": 200, "tol": 1e-12},
        "gmres": {"max_steps": 200, "restart": 40, "tol": 1e-12},
    }.get(name, {})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "name", [s for s in available_solvers() if s not in ("identity", "neumann")]
)
def test_registry_conformance(name, kind):
    a, b = spd_matrix(), rhs()
    matvec, bt = as_problem(a, b, kind)
    solver = get_solver(name, **_conformance_options(name))
    assert isinstance(solver, AbstractLinearSolver)
    assert type(solver).name == name
    sol = solve(matvec, bt, solver, throw=True)
    assert isinstance(sol, Solution) and isinstance(sol.stats, SolveStats)
    x, stats = sol
    assert isinstance(stats.result, Result) and stats.converged
    assert isinstance(stats.num_steps, int) and isinstance(stats.num_matvecs, int)
    assert isinstance(stats.residual_norm, float) and isinstance(stats.extra, dict)
    assert stats.num_matvecs >= 1
    assert stats.residual_norm <= 1e-10 * float(torch.linalg.norm(b))
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-8
    leaves_x = [x] if kind == "tensor" else list(x.values())
    leaves_b = [bt] if kind == "tensor" else list(bt.values())
    for leaf_x, leaf_b in zip(leaves_x, leaves_b, strict=True):
        assert leaf_x.shape == leaf_b.shape and leaf_x.dtype == DT
