"""Implicit hypergradients against exact answers (float64).

Reference hypergradients come from hypergradient.testing, which computes them without the
library's operators: closed forms (ridge, quadratic) or dense torch.func Hessian solves
(logistic).  Tolerances: the exact/CG paths solve the same linear system as the reference
to ~1e-12, so 1e-6 relative error leaves a wide margin for round-off accumulation.
"""

import math

import pytest
import torch

import hypergradient as hg
from hypergradient.testing import (
    finite_difference_hypergrad,
    logistic_problem,
    quadratic_problem,
    relative_error,
    ridge_problem,
)

PROBLEMS = {
    "ridge": ridge_problem,
    "logistic": logistic_problem,
    "quadratic": quadratic_problem,
}


@pytest.fixture(scope="module")
def problems():
    return {name: make() for name, make in PROBLEMS.items()}


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("solver", ["exact", "cg", "minres", "gmres"])
def test_exact_solvers_match_closed_form(problems, name, solver):
    p = problems[name]
    got = hg.implicit_hypergrad(
        p.inner_loss, p.outer_loss, p.params, p.hparams, solver=solver, max_steps=200, tol=1e-13
    )
    assert relative_error(got, p.hypergrad) < 1e-6


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_closed_form_matches_finite_differences(problems, name):
    # Independent check of the references themselves: central differences of the
    # response E(w*(lambda)) with eps=1e-5 have truncation error O(eps^2) ~ 1e-10.
    p = problems[name]
    fd = finite_difference_hypergrad(p.outer_at_optimum, p.hparams, eps=1e-5)
    assert relative_error(fd, p.hypergrad) < 1e-6
    got = hg.implicit_hypergrad(
        p.inner_loss, p.outer_loss, p.params, p.hparams, "cg", max_steps=200, tol=1e-13
    )
    assert relative_error(got, fd) < 1e-6


def _dense_hessian_and_mixed(p):
    """H (n x n) and the mixed Jacobian M (n x m) of grad_w L, by torch.func, flattened."""
    keys = list(p.params)
    sizes = [p.params[k].numel() for k in keys]

    def unflat(v):
        out, i = {}, 0
        for k, n in zip(keys, sizes):
            out[k] = v[i : i + n].reshape(p.params[k].shape)
            i += n
        return out

    hkeys = list(p.hparams)
    hsizes = [p.hparams[k].numel() for k in hkeys]

    def unflat_h(v):
        out, i = {}, 0
        for k, n in zip(hkeys, hsizes):
            out[k] = v[i : i + n].reshape(p.hparams[k].shape)
            i += n
        return out

    w = torch.cat([p.params[k].reshape(-1) for k in keys])
    lam = torch.cat([p.hparams[k].reshape(-1) for k in hkeys])
    f = lambda v, l: p.inner_loss(unflat(v), unflat_h(l))  # noqa: E731
    H = torch.func.hessian(f, argnums=0)(w, lam)
    M = torch.func.jacrev(torch.func.jacrev(f, argnums=0), argnums=1)(w, lam)
    gw = torch.func.jacrev(lambda v: p.outer_loss(unflat(v), p.hparams))(w)
    direct = torch.func.jacrev(lambda l: p.outer_loss(p.params, unflat_h(l)))(lam)
    return H, M, gw, direct, unflat_h


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("terms", [0, 1, 5, 30])
def test_neumann_equals_dense_truncated_series(problems, name, terms):
    # Neumann with K terms computes  alpha * sum_{k=0..K} (I - alpha H)^k v  exactly; evaluate
    # that polynomial densely and compare (this is the method's own theory, not the IFT).
    p = problems[name]
    H, M, gw, direct, unflat_h = _dense_hessian_and_mixed(p)
    alpha = 0.9 / float(torch.linalg.eigvalsh(H).max())
    n = H.shape[0]
    P = torch.zeros_like(H)
    term = torch.eye(n)
    for _ in range(terms + 1):
        P = P + term
        term = term @ (torch.eye(n) - alpha * H)
    expected = unflat_h(direct - M.T @ (alpha * P @ gw))
    got = hg.implicit_hypergrad(
        p.inner_loss, p.outer_loss, p.params, p.hparams, "neumann", max_steps=terms, alpha=alpha
    )
    assert relative_error(got, expected) < 1e-10


def test_neumann_converges_to_exact_with_many_terms(problems):
    p = problems["ridge"]
    got = hg.implicit_hypergrad(
        p.inner_loss, p.outer_loss, p.params, p.hparams, "neumann", max_steps=3000
    )
    # alpha defaults to 1/lambda_max (power iteration); the error after K terms is
    # (1 - alpha*lambda_min)^K ~ exp(-K/cond): cond(H) ~ 100 here, so K=3000 reaches ~1e-12.
    assert relative_error(got, p.hypergrad) < 1e-6


def test_identity_is_one_step_unrolled(problems):
    # H^{-1} ~ alpha I equals the hypergradient of ONE SGD step of size alpha taken from w*
    # (w* treated as a constant), i.e. Luketina's T1-T2 direction.
    p = problems["logistic"]
    lr = 0.3
    got = hg.implicit_hypergrad(
        p.inner_loss, p.outer_loss, p.params, p.hparams, "identity", alpha=lr
    )
    ref = hg.unrolled_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, steps=1, lr=lr)
    assert relative_error(got, ref) < 1e-10


def test_neumann_equals_unrolling_from_optimum_on_quadratic(problems):
    # Lorraine et al.: K Neumann terms with alpha = lr equal differentiating K+1 unrolled SGD
    # steps started at w* (exact for a quadratic inner loss, whose Hessian is constant),
    # up to the first step's own direct contribution -- both have the same mixed term here.
    p = problems["quadratic"]
    lr = 0.2
    for k in (0, 3, 10):
        neu = hg.implicit_hypergrad(
            p.inner_loss, p.outer_loss, p.params, p.hparams, "neumann", max_steps=k, alpha=lr
        )
        unr = hg.unrolled_hypergrad(
            p.inner_loss, p.outer_loss, p.params, p.hparams, steps=k + 1, lr=lr
        )
        assert relative_error(neu, unr) < 1e-10


def test_fixed_point_form_matches_stationary_form(problems):
    p = problems["logistic"]
    H = _dense_hessian_and_mixed(p)[0]
    step = 1.0 / float(torch.linalg.eigvalsh(H).max())  # makes d phi/dw = I - step*H a contraction

    def phi(w, h):
        g = torch.autograd.grad(p.inner_loss(w, h), list(w.values()), create_graph=True)
        return {k: w[k] - step * gk for k, gk in zip(w, g)}

    for solver in ("exact", "cg", "gmres"):
        got = hg.implicit_hypergrad(
            hg.FixedPoint(phi), p.outer_loss, p.params, p.hparams, solver, max_steps=300, tol=1e-13
        )
        assert relative_error(got, p.hypergrad) < 1e-6
    # Neumann on a fixed point sums (d phi/dw)^k with alpha = 1; the contraction factor is
    # 1 - lambda_min/lambda_max, so enough terms reach 1e-6.
    cond = float(torch.linalg.cond(H))
    got = hg.implicit_hypergrad(
        hg.FixedPoint(phi), p.outer_loss, p.params, p.hparams, "neumann", max_steps=int(16 * cond)
    )
    assert relative_error(got, p.hypergrad) < 1e-6


def test_gauss_newton_is_exact_for_linear_model(problems):
    # For a model linear in w, J^T H_l J + Hess(R) IS the Hessian, so GN must be exact.
    p = problems["logistic"]
    X, y = p.data["X"], p.data["y"]
    gn = hg.GaussNewtonLoss(
        predict=lambda w, h: X @ w["W"] + w["b"],
        output_loss=lambda out, h: torch.nn.functional.cross_entropy(out, y),
        regularizer=lambda w, h: (
            0.5 * torch.sum(h["log_l2"].exp() * w["W"] ** 2) + 5e-3 * w["b"] @ w["b"]
        ),
    )
    assert torch.allclose(gn(p.params, p.hparams), p.inner_loss(p.params, p.hparams))
    got = hg.implicit_hypergrad(
        gn,
        p.outer_loss,
        p.params,
        p.hparams,
        "cg",
        max_steps=200,
        tol=1e-13,
        hessian="gauss_newton",
    )
    assert relative_error(got, p.hypergrad) < 1e-6


def test_return_stats_and_preconditioner(problems):
    p = problems["ridge"]
    _, plain = hg.implicit_hypergrad(
        p.inner_loss,
        p.outer_loss,
        p.params,
        p.hparams,
        "cg",
        max_steps=200,
        tol=1e-12,
        return_stats=True,
    )
    # Jacobi preconditioner: the diagonal of the ridge Hessian, known in closed form here.
    X_diag = torch.diag(
        torch.func.hessian(lambda w: p.inner_loss({"w": w}, p.hparams))(p.params["w"])
    )
    pre = hg.linalg.diagonal_preconditioner({"w": X_diag})
    got, stats = hg.implicit_hypergrad(
        p.inner_loss,
        p.outer_loss,
        p.params,
        p.hparams,
        "cg",
        max_steps=200,
        tol=1e-12,
        preconditioner=pre,
        return_stats=True,
    )
    assert stats.converged and plain.converged
    assert stats.num_steps <= plain.num_steps
    assert stats.extra["num_hvps"] >= stats.num_steps
    assert relative_error(got, p.hypergrad) < 1e-6


def test_damping_changes_the_system_as_documented(problems):
    p = problems["ridge"]
    H, M, gw, direct, unflat_h = _dense_hessian_and_mixed(p)
    d = 0.7
    expected = unflat_h(direct - M.T @ torch.linalg.solve(H + d * torch.eye(H.shape[0]), gw))
    got = hg.implicit_hypergrad(
        p.inner_loss, p.outer_loss, p.params, p.hparams, "cg", max_steps=200, tol=1e-13, damping=d
    )
    assert relative_error(got, expected) < 1e-8


def test_module_as_function_matches_closed_form():
    # Ridge through an nn.Linear via functional_call: the bridge from modules to pure losses.
    p = ridge_problem()
    net = torch.nn.Linear(8, 1, bias=False).double()
    f = hg.as_function(net)
    gen = torch.Generator().manual_seed(0)
    # Reuse the closure-based problem's losses by mapping the module param name to "w".
    inner = lambda w, h: p.inner_loss({"w": w["weight"].reshape(-1)}, h)  # noqa: E731
    outer = lambda w, h: p.outer_loss({"w": w["weight"].reshape(-1)}, h)  # noqa: E731
    params = {"weight": p.params["w"].reshape(1, -1)}
    assert f(params, torch.randn(2, 8, generator=gen)).shape == (2, 1)
    got = hg.implicit_hypergrad(inner, outer, params, p.hparams, "exact")
    assert relative_error(got, p.hypergrad) < 1e-8


# ----------------------------------------------------------------------------- bad input


def _ridge():
    return ridge_problem()


def test_error_non_scalar_loss():
    p = _ridge()
    with pytest.raises(hg.HypergradientError, match=r"implicit_hypergrad.*scalar loss.*shape"):
        hg.implicit_hypergrad(lambda w, h: w["w"] * h["log_l2"], p.outer_loss, p.params, p.hparams)


def test_error_dtype_mismatch_between_params_and_loss():
    p = _ridge()
    with pytest.raises(hg.HypergradientError, match=r"returned dtype torch.float32.*float64"):
        hg.implicit_hypergrad(
            lambda w, h: p.inner_loss(w, h).float(), p.outer_loss, p.params, p.hparams
        )
    with pytest.raises(hg.HypergradientError, match=r"hparams\['log_l2'\] has dtype"):
        hg.implicit_hypergrad(
            p.inner_loss, p.outer_loss, p.params, {"log_l2": p.hparams["log_l2"].float()}
        )


def test_error_shape_mismatch_fixed_point():
    p = _ridge()
    with pytest.raises(hg.HypergradientError, match=r"phi\(params, hparams\)\['w'\] has shape"):
        hg.implicit_hypergrad(
            hg.FixedPoint(lambda w, h: {"w": w["w"][:3]}),
            p.outer_loss,
            p.params,
            p.hparams,
            "exact",
        )


def test_error_ignored_hparam():
    p = _ridge()
    hp = dict(p.hparams, unused=torch.ones(2))
    with pytest.raises(hg.HypergradientError, match=r"\['unused'\].*silently zero"):
        hg.implicit_hypergrad(p.inner_loss, p.outer_loss, p.params, hp, "exact")


def test_error_optimizer_hparam_points_to_unrolled():
    p = _ridge()
    hp = dict(p.hparams, lr=torch.tensor(0.1))
    with pytest.raises(hg.HypergradientError, match=r"\['lr'\].*unrolled_hypergrad"):
        hg.implicit_hypergrad(p.inner_loss, p.outer_loss, p.params, hp, "exact")


def test_error_neumann_divergence_names_lambda_max():
    p = _ridge()
    H = torch.func.hessian(lambda w: p.inner_loss({"w": w}, p.hparams))(p.params["w"])
    lam_max = float(torch.linalg.eigvalsh(H).max())
    with pytest.raises(hg.HypergradientError, match=r"diverged.*lambda_max=") as info:
        hg.implicit_hypergrad(
            p.inner_loss,
            p.outer_loss,
            p.params,
            p.hparams,
            "neumann",
            max_steps=1000,
            alpha=2.5 / lam_max,
        )
    reported = float(str(info.value).split("lambda_max=")[1].split(",")[0])
    assert math.isclose(reported, lam_max, rel_tol=1e-2)


@pytest.mark.parametrize("where", ["params", "hparams"])
def test_error_nan_inputs(where):
    p = _ridge()
    params, hparams = dict(p.params), dict(p.hparams)
    bad = params if where == "params" else hparams
    key = next(iter(bad))
    bad[key] = bad[key].clone()
    bad[key][0] = float("nan")
    with pytest.raises(hg.HypergradientError, match=rf"{where}\[.*NaN/inf"):
        hg.implicit_hypergrad(p.inner_loss, p.outer_loss, params, hparams)


def test_error_nan_loss():
    p = _ridge()
    with pytest.raises(hg.HypergradientError, match=r"outer_loss.*not finite"):
        hg.implicit_hypergrad(
            p.inner_loss, lambda w, h: torch.tensor(float("inf")), p.params, p.hparams
        )


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"solver": "bogus"}, r"solver='bogus' is not known"),
        ({"max_steps": -1}, r"max_steps must be a non-negative int, got -1"),
        ({"tol": -1.0}, r"tol must be a finite float >= 0, got -1.0"),
        ({"solver": "neumann", "alpha": -0.1}, r"alpha must be a positive"),
        ({"solver": "cg", "alpha": 0.1}, r"alpha=0.1 is the step of the Neumann"),
        ({"damping": -1.0}, r"damping must be a float >= 0"),
        ({"hessian": "gauss_newton"}, r"GaussNewtonLoss"),
        ({"hessian": "nope"}, r"hessian='nope'"),
    ],
)
def test_error_bad_options(kwargs, pattern):
    p = _ridge()
    with pytest.raises(hg.HypergradientError, match=pattern):
        hg.implicit_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, **kwargs)


def test_error_not_a_dict():
    p = _ridge()
    with pytest.raises(hg.HypergradientError, match=r"`params` must be a dict.*Tensor"):
        hg.implicit_hypergrad(p.inner_loss, p.outer_loss, p.params["w"], p.hparams)
    with pytest.raises(hg.HypergradientError, match=r"`inner_loss` must be a callable"):
        hg.implicit_hypergrad(3, p.outer_loss, p.params, p.hparams)


def test_cg_breakdown_is_raised_not_silent():
    # A saddle: H = diag(1, -1). CG breaks down; the error names the cause and the fixes.
    inner = lambda w, h: 0.5 * (w["w"][0] ** 2 - w["w"][1] ** 2) - h["a"] @ w["w"]  # noqa: E731
    outer = lambda w, h: w["w"].sum()  # noqa: E731
    w_star = {"w": torch.tensor([1.0, -1.0])}  # the stationary point (a saddle) for a = 1
    with pytest.raises(hg.ConvergenceError, match=r"broke down.*damping"):
        hg.implicit_hypergrad(inner, outer, w_star, {"a": torch.ones(2)}, "cg")
    got = hg.implicit_hypergrad(inner, outer, w_star, {"a": torch.ones(2)}, "minres", tol=1e-12)
    # w* = (a0, -a1) so d(sum w*)/da = (1, -1)
    assert torch.allclose(got["a"], torch.tensor([1.0, -1.0]))


def test_cg_max_steps_warns():
    p = logistic_problem()
    with pytest.warns(hg.ConvergenceWarning, match=r"did not converge"):
        hg.implicit_hypergrad(
            p.inner_loss, p.outer_loss, p.params, p.hparams, "cg", max_steps=2, tol=1e-12
        )
