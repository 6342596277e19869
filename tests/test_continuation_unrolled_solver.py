"""The learned unrolled optimizer (continuation/unrolled_solver.py).

References are independent of the code under test: the A-update is solved as the dense linear
system ``(K_w^T W^2 K_w + rho diag(w)) A = K_w^T W^2 G + rho diag(w) (Z - U)`` with
``torch.linalg.solve`` (the model uses a closed form in the SVD of the whitened kernel), the
projection onto ``{A >= 0, sum w A = 1}`` by bisection on its threshold (the model sorts), the
smoothing filter by an explicit loop, and gradients by central differences. Tolerances: the
A-update's right-hand side is ``|K_w^T W^2 G| ~ 1e6`` at noise 1e-3 and the penalty term
``rho * w`` is ~1e2 at ``rho = 1e3``, so the two float64 solutions differ by about
``eps * 1e6 / 1e2 ~ 1e-12`` (measured: under 1e-11 on every CPU path) against a bound of
1e-10 on O(1) spectra. Central differences with h = 1e-5 have truncation and rounding errors
near 1e-10 relative (measured), against the 1e-6 asked for.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hypergradient._errors import HypergradientError
from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
from hypergradient.continuation.spectra import make_dataset
from hypergradient.continuation.unrolled_solver import (
    ContinuationSystem,
    LearnedContinuation,
    continue_spectrum,
    meta_train,
)
from hypergradient.estimators import FullBackprop, TruncatedBackprop

F64 = torch.float64
BETA = 10.0


def small_problem(n_w: int = 61, n_tau: int = 31) -> Problem:
    return Problem(tau=tau_grid(BETA, n_tau), beta=BETA, grid=uniform_grid(-6.0, 6.0, n_w))


@pytest.fixture(scope="module")
def problem() -> Problem:
    return small_problem()


@pytest.fixture(scope="module")
def data(problem):
    return make_dataset(problem, ("gaussians", "gapped"), 3, 1e-3, seed=11)


def perturb(model: LearnedContinuation, seed: int = 0, size: float = 0.3) -> LearnedContinuation:
    """Move every parameter away from its initial value (deterministically)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(size * (2 * torch.rand(p.shape, generator=generator, dtype=F64) - 1))
    return model


def varying_sigma(data, seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return data.sigma * (0.5 + torch.rand(data.sigma.shape, generator=generator, dtype=F64))


# --------------------------------------------------------------------------------------------
# references


def project_bisection(Y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """argmin sum w (Z - Y)^2 over Z >= 0, sum w Z = 1: Z = max(Y - theta, 0), theta by
    bisection on the decreasing mass(theta) = sum w max(Y - theta, 0)."""
    low = Y.min() - 1.0 / weights.sum() - 1.0  # mass(low) > 1
    high = Y.max()  # mass(high) = 0
    for _ in range(200):
        mid = (low + high) / 2
        if (weights * torch.clamp(Y - mid, min=0)).sum() > 1:
            low = mid
        else:
            high = mid
    return torch.clamp(Y - (low + high) / 2, min=0)


def smooth_loop(values: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    half = len(taps) // 2
    n = len(values)
    out = torch.zeros_like(values)
    for j in range(n):
        for t in range(len(taps)):
            out[j] += taps[t] * values[min(max(j + t - half, 0), n - 1)]
    return out


def reference_iterates(problem: Problem, model: LearnedContinuation, G, sigma) -> torch.Tensor:
    """The learned iteration for one spectrum, written out with dense solves (no SVD)."""
    K_w = problem.matrix
    w = problem.grid.weights
    W2 = torch.diag(1 / torch.as_tensor(sigma, dtype=F64).expand(problem.n_tau) ** 2)
    H = K_w.T @ W2 @ K_w
    b = K_w.T @ W2 @ G
    log_rho, relaxation = model.log_rho.detach(), model.relaxation.detach()
    dual_step, filters = model.dual_step.detach(), model.filters.detach()
    Z = torch.full_like(w, 1 / float(w.sum()))
    U = torch.zeros_like(w)
    out = []
    for k in range(model.n_iter):
        rho = math.exp(float(log_rho[k]))
        if k > 0:  # the scaled dual follows the penalty: U rho is carried over
            U = U * math.exp(float(log_rho[k - 1])) / rho
        A = torch.linalg.solve(H + rho * torch.diag(w), b + rho * w * (Z - U))
        alpha = float(relaxation[k])
        relaxed = alpha * A + (1 - alpha) * Z
        Z_new = project_bisection(smooth_loop(relaxed + U, filters[k]), w)
        U = U + float(dual_step[k]) * (relaxed - Z_new)
        Z = Z_new
        out.append(Z)
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# construction


def test_parameter_count_and_initial_values(problem):
    model = LearnedContinuation(problem, n_iter=7, rho=50.0, filter_width=5)
    assert model.num_parameters() == 7 * (3 + 5) == sum(p.numel() for p in model.parameters())
    assert torch.allclose(model.log_rho, torch.full((7,), math.log(50.0), dtype=F64))
    assert torch.equal(model.relaxation, torch.ones(7, dtype=F64))
    assert torch.equal(model.dual_step, torch.ones(7, dtype=F64))
    assert torch.equal(model.filters[:, 2], torch.ones(7, dtype=F64))
    assert float(model.filters.detach().abs().sum()) == 7.0
    # only the learned parameters are state: the kernel's SVD is rebuilt from the problem
    assert sorted(model.state_dict()) == ["dual_step", "filters", "log_rho", "relaxation"]
    assert all(p.dtype == F64 for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"n_iter": 0}, "n_iter must be an int >= 1"),
        ({"n_iter": 2.0}, "n_iter must be an int >= 1"),
        ({"rho": 0.0}, "rho must be a finite number > 0"),
        ({"rho": math.inf}, "rho must be a finite number > 0"),
        ({"filter_width": 4}, "filter_width must be an odd int"),
        ({"filter_width": 0}, "filter_width must be an odd int"),
    ],
)
def test_constructor_rejects_bad_arguments(problem, kwargs, fragment):
    with pytest.raises(HypergradientError, match=fragment):
        LearnedContinuation(problem, **kwargs)


def test_constructor_rejects_non_problem_and_zero_weights():
    with pytest.raises(HypergradientError, match="expected a continuation Problem"):
        LearnedContinuation("problem")
    grid = uniform_grid(-6.0, 6.0, 41)
    zero = type(grid)(omega=grid.omega, weights=torch.where(grid.omega > 5, 0.0, grid.weights))
    with pytest.raises(HypergradientError, match="zero weight"):
        LearnedContinuation(Problem(tau_grid(BETA, 11), BETA, zero))


# --------------------------------------------------------------------------------------------
# the iteration


@pytest.mark.parametrize("sigma_kind", ["per_spectrum", "per_point"])
def test_every_iterate_is_positive_and_normalised(problem, data, sigma_kind):
    model = perturb(LearnedContinuation(problem, n_iter=6, rho=20.0, filter_width=3), size=0.8)
    sigma = data.sigma[:, 0] if sigma_kind == "per_spectrum" else varying_sigma(data)
    with torch.no_grad():
        Z = model.iterates(data.G_noisy, sigma)
    assert Z.shape == (6, len(data), problem.n_w)
    assert bool((Z >= 0).all())
    mass = problem.grid.integrate(Z)
    assert torch.allclose(mass, torch.ones_like(mass), rtol=0, atol=1e-10)
    # the iterates do not sit at the flat start: the projection clips somewhere
    assert bool((Z[-1] == 0).any())


def test_initial_parameters_give_plain_admm(problem, data):
    """At the initial values the unrolled iteration is scaled ADMM with a constant penalty."""
    rho = 1e3
    model = LearnedContinuation(problem, n_iter=6, rho=rho)
    with torch.no_grad():
        Z = model.iterates(data.G_noisy, data.sigma)
    K_w, w = problem.matrix, problem.grid.weights
    for i in range(len(data)):
        G, s = data.G_noisy[i], float(data.sigma[i, 0])
        H, b = K_w.T @ K_w / s**2, K_w.T @ G / s**2
        A_admm, U = torch.full_like(w, 1 / float(w.sum())), torch.zeros_like(w)
        Z_admm = A_admm
        for k in range(6):
            A_admm = torch.linalg.solve(H + rho * torch.diag(w), b + rho * w * (Z_admm - U))
            Z_admm = project_bisection(A_admm + U, w)
            U = U + A_admm - Z_admm
            torch.testing.assert_close(Z[k, i], Z_admm, rtol=0, atol=1e-10)
    assert bool((Z == 0).any()) and bool((Z > 0).any())  # the projection is active


@pytest.mark.parametrize("sigma_kind", ["per_spectrum", "per_point"])
def test_learned_iteration_matches_dense_reference(problem, data, sigma_kind):
    model = perturb(LearnedContinuation(problem, n_iter=5, rho=1e3, filter_width=3), seed=3)
    sigma = data.sigma if sigma_kind == "per_spectrum" else varying_sigma(data)
    with torch.no_grad():
        Z = model.iterates(data.G_noisy, sigma)
    for i in range(len(data)):
        expected = reference_iterates(problem, model, data.G_noisy[i], sigma[i])
        torch.testing.assert_close(Z[:, i], expected, rtol=0, atol=1e-10)


def test_sigma_forms_and_batching_agree(problem, data):
    model = perturb(LearnedContinuation(problem, n_iter=4, filter_width=3), seed=1)
    with torch.no_grad():
        by_row = model(data.G_noisy, data.sigma)  # (n, n_tau), constant along tau
        by_spectrum = model(data.G_noisy, data.sigma[:, 0])  # (n,)
        single = torch.stack([model(g, float(s[0])) for g, s in zip(data.G_noisy, data.sigma)])
        batched = model(data.G_noisy.reshape(2, 3, -1), data.sigma.reshape(2, 3, -1))
    assert torch.equal(by_row, by_spectrum)
    torch.testing.assert_close(single, by_row, rtol=0, atol=1e-13)
    torch.testing.assert_close(batched.reshape(len(data), -1), by_row, rtol=0, atol=1e-13)
    # a shared sigma of shape (n_tau,) that varies along tau takes the per-spectrum SVD path
    sigma = varying_sigma(data)[0]
    with torch.no_grad():
        shared = model(data.G_noisy, sigma)
        rows = torch.stack([model(g, sigma) for g in data.G_noisy])
    torch.testing.assert_close(shared, rows, rtol=0, atol=1e-13)


def test_plain_admm_converges_to_the_constrained_least_squares_optimum():
    """Many iterations at the initial values reach the KKT point of min ||W(K_w A - G)||^2 / 2
    over A >= 0, sum w A = 1: the weighted gradient g_j / w_j equals a constant mu on the
    support and is >= mu off it."""
    problem = small_problem(n_w=41, n_tau=21)
    data = make_dataset(problem, ("gaussians",), 1, 1e-1, seed=4)
    model = LearnedContinuation(problem, n_iter=4000, rho=10.0, filter_width=1)
    with torch.no_grad():
        A = model(data.G_noisy[0], data.sigma[0])
    s = float(data.sigma[0, 0])
    K_w, w = problem.matrix, problem.grid.weights
    g = K_w.T @ (K_w @ A - data.G_noisy[0]) / s**2 / w
    support = A > 1e-8
    mu = g[support].mean()
    scale = float(g.abs().max())
    assert float((g[support] - mu).abs().max()) < 1e-6 * scale
    assert float((g[~support] - mu).min()) > -1e-6 * scale
    assert 0 < int(support.sum()) < problem.n_w


# --------------------------------------------------------------------------------------------
# gradients


def meta_loss(model, data, sigma, truncate=None):
    A = model(data.G_noisy, sigma, truncate=truncate)
    return (model.weights * (A - data.A).abs()).sum(-1).mean()


@pytest.mark.parametrize("sigma_kind", ["per_spectrum", "per_point"])
def test_meta_gradient_matches_central_differences(sigma_kind):
    problem = small_problem(n_w=61, n_tau=31)
    data = make_dataset(problem, ("gaussians", "lorentzians"), 1, 1e-3, seed=2)
    sigma = data.sigma if sigma_kind == "per_spectrum" else varying_sigma(data)
    model = perturb(LearnedContinuation(problem, n_iter=3, rho=300.0, filter_width=3), seed=7)
    params = list(model.parameters())
    grads = torch.autograd.grad(meta_loss(model, data, sigma), params)
    h = 1e-5
    for p, grad in zip(params, grads):
        fd = torch.zeros_like(p)
        for index in range(p.numel()):
            with torch.no_grad():
                flat = p.view(-1)
                flat[index] += h
                up = float(meta_loss(model, data, sigma))
                flat[index] -= 2 * h
                down = float(meta_loss(model, data, sigma))
                flat[index] += h
            fd.view(-1)[index] = (up - down) / (2 * h)
        scale = float(grad.abs().max())
        assert scale > 0
        assert float((fd - grad).abs().max()) <= 1e-6 * scale, (p.shape, fd, grad)
    # the last dual step does not reach the output
    assert float(grads[2][-1]) == 0.0


@pytest.mark.parametrize("k", [1, 3])
def test_truncation_keeps_values_and_cuts_gradient_to_last_k_iterations(problem, data, k):
    n = 5
    model = perturb(LearnedContinuation(problem, n_iter=n, filter_width=3), seed=9)
    params = list(model.parameters())
    full = meta_loss(model, data, data.sigma)
    full_grads = torch.autograd.grad(full, params)
    cut = meta_loss(model, data, data.sigma, truncate=k)
    # with k = 1 the last dual step, which does not reach the output, is all dual_step sees
    cut_grads = torch.autograd.grad(cut, params, allow_unused=True, materialize_grads=True)
    assert torch.equal(full.detach(), cut.detach())
    with torch.no_grad():
        assert torch.equal(
            model(data.G_noisy, data.sigma, truncate=k), model(data.G_noisy, data.sigma)
        )
    for g_full, g_cut in zip(full_grads, cut_grads):
        # the parameters are per iteration: iteration j's are row j
        assert float(g_cut[: n - k].abs().max()) == 0.0
        torch.testing.assert_close(g_cut[n - k :], g_full[n - k :], rtol=1e-12, atol=0)
        assert float(g_full[: n - k].abs().max()) > 0  # the full unroll does reach them
    # truncate=n_iter is the full unroll
    whole = torch.autograd.grad(meta_loss(model, data, data.sigma, truncate=n), params)
    for a, b in zip(whole, full_grads):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# meta-training


@pytest.fixture(scope="module")
def tiny_sets():
    problem = small_problem(n_w=61, n_tau=31)
    train = make_dataset(problem, ("gaussians", "gapped"), 24, 1e-3, seed=20)
    val = make_dataset(problem, ("gaussians", "gapped"), 8, 1e-3, seed=21)
    return problem, train, val


def val_l1(model, val) -> float:
    with torch.no_grad():
        A = model(val.G_noisy, val.sigma)
    return float(model.problem.grid.integrate((A - val.A).abs()).mean())


def test_meta_training_lowers_validation_l1_and_keeps_the_best_state(tiny_sets):
    problem, train, val = tiny_sets
    model = LearnedContinuation(problem, n_iter=6)
    before = val_l1(model, val)
    history = meta_train(model, train, val, steps=30, lr=0.05, batch_size=8, seed=0, eval_every=5)
    assert history["step"] == [0, 5, 10, 15, 20, 25, 30]
    assert history["val_l1"][0] == pytest.approx(before, rel=1e-12)
    assert math.isnan(history["train_loss"][0])
    assert all(math.isfinite(v) for v in history["train_loss"][1:])
    assert history["best_val_l1"] == min(history["val_l1"])
    assert history["best_val_l1"] < 0.9 * before
    # the model holds the best validation state
    assert val_l1(model, val) == pytest.approx(history["best_val_l1"], rel=1e-12)
    assert history["val_l1"][history["step"].index(history["best_step"])] == history["best_val_l1"]


def test_meta_training_is_deterministic_and_truncation_moves_only_the_last_iterations(tiny_sets):
    problem, train, val = tiny_sets
    runs = []
    for _ in range(2):
        model = LearnedContinuation(problem, n_iter=4, filter_width=3)
        history = meta_train(
            model, train, val, steps=6, lr=0.05, batch_size=8, seed=3, truncate=2, eval_every=3
        )
        runs.append((history, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
    initial = LearnedContinuation(problem, n_iter=4, filter_width=3)
    for trained, start in zip(runs[0][1], initial.parameters()):
        assert torch.equal(trained[:2], start[:2].detach())  # never differentiated
    if runs[0][0]["best_step"] > 0:  # the kept state was trained
        moved = [
            not torch.equal(t[2:], s[2:].detach()) for t, s in zip(runs[0][1], initial.parameters())
        ]
        assert any(moved)


def test_meta_training_l2_loss_runs(tiny_sets):
    problem, train, val = tiny_sets
    model = LearnedContinuation(problem, n_iter=3, filter_width=3)
    history = meta_train(model, train, val, steps=4, lr=0.05, batch_size=4, seed=0, loss="l2")
    assert history["loss"] == "l2" and len(history["val_l1"]) == 5


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"steps": 0}, "steps=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"seed": -1}, "seed=-1"),
        ({"loss": "residual"}, "loss='residual'"),
        ({"truncate": 9}, "truncate=9 exceeds n_iter=3"),
    ],
)
def test_meta_train_rejects_bad_arguments(tiny_sets, kwargs, fragment):
    problem, train, val = tiny_sets
    model = LearnedContinuation(problem, n_iter=3)
    arguments = {"steps": 2, "lr": 0.01, "batch_size": 4, "seed": 0, **kwargs}
    with pytest.raises(HypergradientError, match=f"meta_train: {fragment}"):
        meta_train(model, train, val, **arguments)


def test_meta_train_rejects_datasets_of_another_problem(tiny_sets):
    problem, train, _ = tiny_sets
    other = make_dataset(small_problem(n_w=41), ("gaussians",), 2, 1e-3, seed=0)
    model = LearnedContinuation(problem, n_iter=3)
    with pytest.raises(HypergradientError, match="meta_train: val has 2 rows"):
        meta_train(model, train, other, steps=1, lr=0.01, batch_size=2, seed=0)
    with pytest.raises(HypergradientError, match="expected a SpectralDataset"):
        meta_train(model, train, "val", steps=1, lr=0.01, batch_size=2, seed=0)


# --------------------------------------------------------------------------------------------
# inputs and the one-function interface


def test_forward_rejects_bad_green_and_sigma(problem, data):
    model = LearnedContinuation(problem, n_iter=2)
    with pytest.raises(HypergradientError, match=r"LearnedContinuation.forward: G has shape"):
        model(data.G_noisy[:, :-1], data.sigma[:, :-1])
    bad = data.G_noisy.clone()
    bad[0, 3] = math.nan
    with pytest.raises(HypergradientError, match="NaN/inf"):
        model(bad, data.sigma)
    with pytest.raises(HypergradientError, match="sigma has shape"):
        model(data.G_noisy, data.sigma[:2])
    with pytest.raises(HypergradientError, match="non-positive or non-finite"):
        model(data.G_noisy, torch.zeros(len(data), dtype=F64))
    with pytest.raises(HypergradientError, match="sigma is a str"):
        model(data.G_noisy, "1e-3")
    with pytest.raises(HypergradientError, match=r"truncate=0, expected None"):
        model(data.G_noisy, data.sigma, truncate=0)


def test_continue_spectrum_returns_the_model_output_and_its_grid(problem, data):
    model = perturb(LearnedContinuation(problem, n_iter=3, filter_width=3))
    with torch.no_grad():
        A, grid = continue_spectrum(
            data.G_noisy, problem.tau.clone(), BETA, model=model, sigma=data.sigma
        )
        expected = model(data.G_noisy, data.sigma)
    assert grid is problem.grid
    assert torch.equal(A, expected)
    with torch.no_grad():
        A_same, _ = continue_spectrum(
            data.G_noisy[0], tau_grid(BETA, problem.n_tau), BETA, model=model,
            grid=uniform_grid(-6.0, 6.0, problem.n_w), sigma=float(data.sigma[0, 0]),
        )  # fmt: skip
    torch.testing.assert_close(A_same, expected[0], rtol=0, atol=1e-13)


def test_continue_spectrum_input_errors_come_from_check_green(problem, data):
    model = LearnedContinuation(problem, n_iter=2)
    tau, G, sigma = problem.tau, data.G_noisy[0], data.sigma[0]
    cases = [
        ((G[:-1], tau, BETA), r"continue_spectrum: G has shape \(30,\) but the problem has"),
        ((G.to(torch.int64), tau, BETA), "continue_spectrum: G has dtype torch.int64"),
        ((torch.full_like(G, math.inf), tau, BETA), "continue_spectrum: G .* NaN/inf"),
        (([0.5] * 31, tau, BETA), "continue_spectrum: G is a list"),
        ((G, tau, -1.0), "continue_spectrum: Problem: beta=-1.0"),
        ((G, tau * 2, BETA), r"continue_spectrum: Problem: tau spans \[0.0, 20.0\]"),
    ]
    for args, fragment in cases:
        with pytest.raises(HypergradientError, match=fragment):
            continue_spectrum(*args, model=model, sigma=sigma)
    # a problem the model was not built for
    with pytest.raises(HypergradientError, match="is not the model's problem"):
        continue_spectrum(G, tau_grid(5.0, 31), 5.0, model=model, sigma=sigma)
    with pytest.raises(HypergradientError, match="is not the model's"):
        continue_spectrum(G, tau, BETA, model=model, grid=uniform_grid(-8, 8, 61), sigma=sigma)
    with pytest.raises(HypergradientError, match="expected a LearnedContinuation"):
        continue_spectrum(G, tau, BETA, model="model", sigma=sigma)
    with pytest.raises(HypergradientError, match="continue_spectrum: sigma has a non-positive"):
        continue_spectrum(G, tau, BETA, model=model, sigma=-1.0)


# --------------------------------------------------------------------------------------------
# the unrolled system of hypergradient.estimators
#
# The system runs the model's own per-iteration function (LearnedContinuation._admm_step), so
# these comparisons check the plumbing (batch drawing, theta rows, the loss scaling, the
# estimators' windows) against the module's direct backpropagation on the same batch; the
# iteration itself is checked against independent references above. Tolerance: the system's
# objective is (T * L) / T, one rounding away from L, so the gradients agree to ~1e-16
# relative (measured: bit-equal); 1e-10 is asked for.


def theta_of(model: LearnedContinuation) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def first_batch(n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch ContinuationSystem.init draws first from a generator seeded with ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch_size]


def direct_gradients(model, data, index, sigma, truncate=None) -> dict:
    subset_A, subset_G = data.A[index], data.G_noisy[index]
    A = model(subset_G, sigma[index], truncate=truncate)
    value = (model.weights * (A - subset_A).abs()).sum(-1).mean()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(
        value, list(params.values()), allow_unused=True, materialize_grads=True
    )
    return value.detach(), dict(zip(params, grads))


def assert_same_gradients(estimated: dict, direct: dict, rel: float = 1e-10) -> None:
    assert estimated.keys() == direct.keys()
    scale = max(float(g.abs().max()) for g in direct.values())
    assert scale > 0
    for name in direct:
        err = float((estimated[name] - direct[name]).abs().max())
        assert err <= rel * scale, (name, err, scale)


@pytest.mark.parametrize("sigma_kind", ["per_spectrum", "per_point"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_full_backprop_on_the_system_equals_the_module_gradient(
    problem, data, sigma_kind, vectorize
):
    sigma = data.sigma if sigma_kind == "per_spectrum" else varying_sigma(data)
    train = dataclasses.replace(data, sigma=sigma)
    model = perturb(LearnedContinuation(problem, n_iter=5, filter_width=3), seed=4)
    system = ContinuationSystem(model, train, batch_size=4)
    estimator = FullBackprop(system, vectorize=vectorize)
    theta, gen = theta_of(model), torch.Generator().manual_seed(8)
    out, state = estimator.estimate(theta, estimator.init(theta, gen), gen)
    value, direct = direct_gradients(model, train, first_batch(len(train), 4, 8), sigma)
    assert_same_gradients(out.grad, direct)
    assert abs(float(out.loss) - float(value)) <= 1e-14 * float(value)
    assert out.t == system.horizon == 5 and out.episodes_finished == 1
    # the per-point noise takes the per-spectrum SVD path (V has a batch dimension)
    states = state.particles
    V = states["V"][0] if vectorize else states[0]["V"]
    assert V.dim() == (2 if sigma_kind == "per_spectrum" else 3)


def test_system_steps_are_pure_and_the_loss_sits_at_the_last_step(problem, data):
    model = perturb(LearnedContinuation(problem, n_iter=3, filter_width=3), seed=1)
    system = ContinuationSystem(model, data, batch_size=10)  # capped at len(data) = 6
    state = system.init(torch.Generator().manual_seed(0))
    assert system.batch_size == 6 and state["Z"].shape == (6, problem.n_w)
    assert float(state["Y"].abs().max()) == 0.0
    theta = theta_of(model)
    kept = {k: v.clone() for k, v in state.items()}
    losses, current = [], state
    for t in range(3):
        current, loss = system.step(current, theta, t)
        losses.append(loss)
    again, _ = system.step(state, theta, 0)  # the same inputs give the same outputs
    first, _ = system.step(state, theta, 0)
    assert all(torch.equal(again[key], first[key]) for key in first)
    for key in kept:  # never modified in place
        assert torch.equal(state[key], kept[key])
    assert [float(x) for x in losses[:2]] == [0.0, 0.0]
    with torch.no_grad():
        A = model(state["G"], state["sigma"])
    assert torch.equal(current["Z"], A)  # the same iterations as forward, bit for bit
    l1 = float((model.weights * (A - state["A_true"]).abs()).sum(-1).mean())
    assert float(losses[2]) == pytest.approx(3 * l1, rel=1e-14)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_truncated_windows_average_to_the_module_truncated_gradient(problem, data, k):
    """TruncatedBackprop's windows advance across calls: with k | T the episode's T/k windows
    give 0 (no loss inside them) except the last, whose estimate is (T/k) times
    forward(truncate=k)'s gradient; their mean is that gradient."""
    n = 6
    model = perturb(LearnedContinuation(problem, n_iter=n, filter_width=3), seed=2)
    system = ContinuationSystem(model, data, batch_size=3)
    estimator = TruncatedBackprop(system, truncation_length=k)
    theta, gen = theta_of(model), torch.Generator().manual_seed(5)
    state = estimator.init(theta, gen)
    estimates = []
    for _ in range(n // k):
        out, state = estimator.estimate(theta, state, gen)
        estimates.append(out.grad)
    assert state.t == n
    for grads in estimates[:-1]:
        assert all(float(g.abs().max()) == 0.0 for g in grads.values())
    _, direct = direct_gradients(model, data, first_batch(len(data), 3, 5), data.sigma, truncate=k)
    assert_same_gradients({name: g * k / n for name, g in estimates[-1].items()}, direct)
    mean = {name: sum(e[name] for e in estimates) / len(estimates) for name in direct}
    assert_same_gradients(mean, direct)
    for g in direct.values():  # only the last k iterations' rows are reached
        assert float(g[: n - k].abs().max()) == 0.0


def parameters_after(tiny_sets, **kwargs) -> list[torch.Tensor]:
    problem, train, val = tiny_sets
    model = LearnedContinuation(problem, n_iter=4, filter_width=3)
    arguments = {"lr": 0.05, "seed": 3, "eval_every": 1, **kwargs}
    history = meta_train(model, train, val, **arguments)
    return [p.detach().clone() for p in model.parameters()], history


@pytest.mark.parametrize(
    "estimator, truncate", [("full", None), ("truncated", 2), ("truncated", None)]
)
def test_meta_train_through_the_estimators_matches_the_default_path(tiny_sets, estimator, truncate):
    """The batches differ after the first (the system draws randperm(n)[:B] per episode, the
    default path walks one permutation per pass), so: several steps with the whole training
    set as the batch (same sets; only the order of the batch mean differs, to rounding), and
    one step with a partial batch (the same first draw of the same generator)."""
    _, train, _ = tiny_sets
    for steps, batch_size in [(3, len(train)), (1, 5)]:
        default, history = parameters_after(
            tiny_sets, steps=steps, batch_size=batch_size, truncate=truncate
        )
        ours, history_ours = parameters_after(
            tiny_sets, steps=steps, batch_size=batch_size, truncate=truncate, estimator=estimator
        )
        # val_l1 after every step (eval_every=1) compares the parameters of every step
        assert history_ours["val_l1"] == pytest.approx(history["val_l1"], rel=1e-10)
        assert history_ours["best_step"] == history["best_step"]
        assert history_ours["estimator"] == estimator and history["estimator"] is None
        for a, b in zip(ours, default):
            assert float((a - b).abs().max()) <= 1e-10
        for a, b in zip(history_ours["train_loss"][1:], history["train_loss"][1:]):
            assert a == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"estimator": "pes"}, "estimator='pes', expected None"),
        ({"estimator": "full", "truncate": 2}, "estimator='full' with truncate=2"),
        (
            {"estimator": "truncated", "truncate": 2},
            "estimator='truncated' needs truncate to divide n_iter=3",
        ),
    ],
)
def test_meta_train_rejects_bad_estimator_arguments(tiny_sets, kwargs, fragment):
    problem, train, val = tiny_sets
    model = LearnedContinuation(problem, n_iter=3)
    with pytest.raises(HypergradientError, match=f"meta_train: {fragment}"):
        meta_train(model, train, val, steps=1, lr=0.01, batch_size=2, seed=0, **kwargs)


def test_continuation_system_rejects_bad_arguments(problem, data):
    model = LearnedContinuation(problem, n_iter=3)
    with pytest.raises(HypergradientError, match="ContinuationSystem.*expected a Learned"):
        ContinuationSystem("model", data, 2)
    with pytest.raises(HypergradientError, match="ContinuationSystem.*batch_size=0"):
        ContinuationSystem(model, data, 0)
    with pytest.raises(HypergradientError, match="ContinuationSystem.*loss='x'"):
        ContinuationSystem(model, data, 2, loss="x")
    with pytest.raises(HypergradientError, match="ContinuationSystem.*expected a SpectralData"):
        ContinuationSystem(model, "data", 2)


def test_continuation_system_doctest_is_fast():
    import doctest
    import time

    from hypergradient.continuation import unrolled_solver

    finder = doctest.DocTestFinder()
    (test,) = [t for t in finder.find(unrolled_solver) if t.name.endswith(".ContinuationSystem")]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    start = time.perf_counter()
    result = runner.run(test, out=lambda text: None)
    elapsed = time.perf_counter() - start
    assert result.failed == 0 and result.attempted > 5
    assert elapsed < 0.5, elapsed
