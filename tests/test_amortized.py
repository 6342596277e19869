"""Amortized implicit hypergradients: a warm-started linear solve kept across hyper-steps.

Float64, against the closed-form ridge hypergradient: repeated calls at the same point
converge to the exact answer with a few Hessian-vector products each (the warm start carries
the solve), a kept solution that would be wrong is dropped with a warning, and the state
survives a trainer checkpoint.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg
from hypergradient.hypergrad.methods import MeasuredMethod
from hypergradient.testing import relative_error, ridge_problem


def _call(method, prob, hparams=None, params=None):
    return method.hypergrad_and_info(
        prob.inner_loss,
        prob.outer_loss,
        prob.params if params is None else params,
        prob.hparams if hparams is None else hparams,
        lr=0.5,
    )


@pytest.mark.parametrize(("solver", "steps"), [("cg", 2), ("minres", 2), ("neumann", 3)])
def test_repeated_calls_converge_to_the_exact_hypergradient(solver, steps):
    prob = ridge_problem()  # SPD Hessian, eigenvalues 0.29 .. 1.1 (alpha = 0.5 is stable)
    method = hg.AmortizedImplicit(solver=solver, max_steps=steps, tol=0.0)
    errors, hvps = [], []
    for _ in range(60):  # Richardson (neumann) contracts by 1 - 0.5 * 0.29 per product
        grads, info = _call(method, prob)
        errors.append(relative_error(grads, prob.hypergrad))
        hvps.append(info["solve_hvps"])
    # each call continues the previous solve: the error falls far below one call's
    assert errors[0] > 1e-3 and errors[-1] < 1e-10, errors
    assert all(info["warm_started"] for info in [_call(method, prob)[1]])
    assert max(hvps) <= steps + 1  # the warm start's initial residual is one product


def test_a_pedregosa_schedule_stops_early_once_the_kept_solution_is_good():
    prob = ridge_problem()
    method = hg.AmortizedImplicit(
        solver="cg", max_steps=8, tol=hg.hypergrad.pedregosa_tolerance(0.1, 2)
    )
    hvps = [_call(method, prob)[1]["solve_hvps"] for _ in range(6)]
    assert hvps[0] > hvps[-1]  # later calls start below their tolerance: one product


def test_a_kept_solution_that_would_be_wrong_is_reset_with_a_warning():
    prob = ridge_problem()
    method = hg.AmortizedImplicit(max_steps=2)
    _call(method, prob)
    bigger = {"log_l2": torch.zeros(9, dtype=torch.float64)}
    with pytest.warns(hg.AmortizationResetWarning, match="hyperparameters changed"):
        method._initial_guess(prob.params, bigger)
    _call(method, prob)
    other_params = {"w": torch.zeros(5, dtype=torch.float64)}
    with pytest.warns(hg.AmortizationResetWarning, match="model's parameters changed"):
        method._initial_guess(other_params, prob.hparams)
    _call(method, prob)
    method._kept["adjoint"]["w"][0] = float("nan")
    with pytest.warns(hg.AmortizationResetWarning, match="NaN"), warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ConvergenceWarning)
        grads, info = _call(method, prob)
    assert not info["warm_started"] and torch.isfinite(grads["log_l2"]).all()
    jumped = {k: v + 10.0 for k, v in prob.hparams.items()}
    with pytest.warns(hg.AmortizationResetWarning, match="jumped"):
        method._initial_guess(prob.params, jumped)


def test_bad_options_are_refused_in_one_line():
    with pytest.raises(hg.HypergradientError, match=r"solver='exact'\).*'cg', 'minres'"):
        hg.AmortizedImplicit(solver="exact")
    with pytest.raises(hg.HypergradientError, match="max_steps=0"):
        hg.AmortizedImplicit(max_steps=0)
    with pytest.raises(hg.HypergradientError, match="preconditioner is used by solver='cg'"):
        hg.AmortizedImplicit(solver="neumann", preconditioner=lambda r: r)
    with pytest.raises(hg.HypergradientError, match=r"x0\['w'\] has shape \(3,\)"):
        prob = ridge_problem()
        hg.implicit_hypergrad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                              x0={"w": torch.zeros(3, dtype=torch.float64)})  # fmt: skip


def test_the_measured_method_reports_the_accuracy_it_kept():
    prob = ridge_problem()
    exact = MeasuredMethod(hg.Implicit(solver="exact"), at=lambda k: True)
    _, info = _call(exact, prob)
    assert info["ref_rel_error"] < 1e-8 and info["ref_cosine"] > 1 - 1e-12
    rough = MeasuredMethod(hg.Implicit(solver="identity"), at=lambda k: True)
    _, info = _call(rough, prob)
    assert info["ref_rel_error"] > 1e-2 and info["ref_converged"] and info["ref_solver"] == "cg"


def _trainer(method):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    data = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    return hg.BilevelTrainer(
        model,
        hg.hparams.WeightDecay("per_weight", initial=1e-1),
        data,
        data,
        torch.optim.SGD(model.parameters(), lr=0.1),
        method=method,
        hyper_every=2,
    )


def test_the_kept_solution_survives_a_trainer_checkpoint_bit_for_bit(tmp_path):
    whole = _trainer(hg.AmortizedImplicit(solver="minres", max_steps=2))
    whole.fit(6)
    checkpoint = tmp_path / "ck.pt"
    _trainer(hg.AmortizedImplicit(solver="minres", max_steps=2)).fit(3, checkpoint=checkpoint)
    resumed = _trainer(hg.AmortizedImplicit(solver="minres", max_steps=2))
    resumed.fit(6, checkpoint=checkpoint, resume=True)
    for k in whole.hparams:
        assert torch.equal(whole.hparams[k], resumed.hparams[k])
    assert [r["solve_hvps"] for r in whole.history] == [r["solve_hvps"] for r in resumed.history]
    assert whole.history[0]["warm_started"] is False and whole.history[1]["warm_started"]


# ---------------------------------------------------------------------------- Nystrom


def _spd(n, eigenvalues, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    return basis @ torch.diag(eigenvalues) @ basis.T


def test_nystrom_makes_a_low_rank_plus_shift_operator_the_identity_times_the_shift():
    # A = G + mu I with rank(G) = 5 <= rank of the sketch: the Nystrom approximation of G is
    # exact, so M^{-1} A = mu I (every eigenvalue equal) and CG needs one step.
    n, mu = 60, 0.3
    eig = torch.zeros(n, dtype=torch.float64)
    eig[:5] = torch.tensor([50.0, 20.0, 9.0, 4.0, 2.0], dtype=torch.float64)
    g = _spd(n, eig)
    pre = hg.linalg.NystromPreconditioner(rank=8, refresh_every=1)
    assert pre.prepare(lambda v: g @ v, torch.zeros(n, dtype=torch.float64), shift=mu) == 8
    a = g + mu * torch.eye(n, dtype=torch.float64)
    m_inv = torch.stack([pre(e) for e in torch.eye(n, dtype=torch.float64)], dim=1)
    assert torch.allclose(m_inv, m_inv.T, atol=1e-12)
    assert torch.allclose(m_inv @ a, mu * torch.eye(n, dtype=torch.float64), atol=1e-9)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solution = hg.linalg.CG(max_steps=3, tol=1e-12, preconditioner=pre).solve(lambda v: a @ v, b)
    assert solution.stats.num_steps <= 2
    assert torch.allclose(solution.value, torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)


def test_nystrom_preconditioned_cg_solves_a_decaying_spectrum_in_fewer_steps():
    n = 200
    eig = torch.cat([torch.logspace(3, 0, 30, dtype=torch.float64),
                     1.0 + torch.linspace(0, 1, n - 30, dtype=torch.float64)])  # fmt: skip
    a = _spd(n, eig, seed=2)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = torch.linalg.solve(a, b)
    plain = hg.linalg.CG(max_steps=500, tol=1e-10).solve(lambda v: a @ v, b)
    pre = hg.linalg.NystromPreconditioner(rank=30, refresh_every=1)
    pre.prepare(lambda v: a @ v, b)
    fast = hg.linalg.CG(max_steps=500, tol=1e-10, preconditioner=pre).solve(lambda v: a @ v, b)
    for solution in (plain, fast):
        assert torch.linalg.norm(solution.value - exact) <= 1e-8 * torch.linalg.norm(exact)
    # the 30 large eigenvalues are deflated: the rest spans [1, 2], about 15 steps to 1e-10
    assert fast.stats.num_steps < 0.5 * plain.stats.num_steps


def test_nystrom_refreshes_on_schedule_and_on_new_shapes():
    a = _spd(20, torch.linspace(1, 10, 20, dtype=torch.float64))
    pre = hg.linalg.NystromPreconditioner(rank=4, refresh_every=3)
    like = torch.zeros(20, dtype=torch.float64)
    spent = [pre.prepare(lambda v: a @ v, like) for _ in range(7)]
    assert spent == [4, 0, 0, 4, 0, 0, 4]
    assert pre.prepare(lambda v: v, torch.zeros(5, dtype=torch.float64)) == 4  # new shape
    with pytest.raises(hg.HypergradientError, match="rank"):
        hg.linalg.NystromPreconditioner(rank=0)
    with pytest.raises(hg.HypergradientError, match="not positive definite"):
        pre.sketch(lambda v: -v, like)


def test_implicit_hypergrad_with_a_nystrom_preconditioner_is_exact_and_counts_its_matvecs():
    prob = ridge_problem()
    pre = hg.linalg.NystromPreconditioner(rank=3, refresh_every=1)
    grads, stats = hg.implicit_hypergrad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver="cg",
        max_steps=50, tol=1e-13, damping=0.05, preconditioner=pre, stationarity_tol=None,
        return_stats=True,
    )  # fmt: skip
    exact = hg.implicit_hypergrad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver="exact",
        damping=0.05, stationarity_tol=None,
    )  # fmt: skip
    assert relative_error(grads, exact) < 1e-9
    assert stats.extra["preconditioner_matvecs"] == 3
    assert stats.num_matvecs == stats.num_steps + 3


# ---------------------------------------------------------------------------- trainer


def _mlp_trainer(method, resample=1, wrap_loss=None, hyper=None):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=gen)
    data = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return hg.BilevelTrainer(
        model,
        hyper or hg.hparams.WeightDecay("per_weight", initial=1e-2),
        data,
        data,
        torch.optim.SGD(model.parameters(), lr=0.1),
        method=method,
        hyper_every=2,
        hypergrad_resample_every=resample,
        wrap_loss=wrap_loss,
    )


def test_the_trainer_solves_the_gauss_newton_system_of_the_kept_batches():
    """A converged Gauss-Newton solve in the trainer equals the dense Gauss-Newton
    hypergradient on the batches it kept (float64)."""
    method = hg.AmortizedImplicit(
        solver="cg", max_steps=200, tol=1e-13, hessian="gauss_newton", damping=0.1
    )
    trainer = _mlp_trainer(method, resample=3)
    trainer.fit(4)
    batches = trainer._hypergrad_batches
    assert trainer._hypergrad_batches_drawn_at == 3  # drawn at hyper-steps 0 and 3
    train_batch, val_batch = batches
    params = {k: v.detach() for k, v in trainer.model.named_parameters()}
    hparams = trainer._detached_hparams()
    loss = trainer.hyper.gauss_newton_loss(trainer.forward, train_batch, trainer.criterion)

    def outer(p, h):
        return torch.nn.functional.cross_entropy(trainer.forward(p, val_batch[0]), val_batch[1])

    grads, info = method.hypergrad_and_info(loss, outer, params, hparams, lr=0.1)
    dense = hg.implicit_hypergrad(
        loss, outer, params, hparams, solver="exact", hessian="gauss_newton", damping=0.1,
        stationarity_tol=None,
    )  # fmt: skip
    assert relative_error(grads, dense) < 1e-9
    # the Gauss-Newton system differs from the (indefinite) Hessian one away from a minimum
    hessian = hg.implicit_hypergrad(
        loss, outer, params, hparams, solver="exact", damping=0.1, stationarity_tol=None
    )
    assert relative_error(hessian, dense) > 1e-6


def test_kept_hypergradient_batches_are_reused_then_redrawn():
    seen = []
    trainer = _mlp_trainer(hg.AmortizedImplicit(max_steps=2, hessian="gauss_newton"), resample=2)
    original = trainer.hyper.gauss_newton_loss

    def spy(forward, batch, criterion):
        seen.append(batch[0])
        return original(forward, batch, criterion)

    trainer.hyper.gauss_newton_loss = spy
    trainer.fit(5)
    same = [torch.equal(seen[i], seen[i + 1]) for i in range(4)]
    assert same == [True, False, True, False]


def test_gauss_newton_without_a_split_or_with_a_wrapped_loss_is_one_clear_error():
    method = hg.AmortizedImplicit(hessian="gauss_newton")
    with pytest.raises(hg.HypergradientError, match="wrap_loss"):
        _mlp_trainer(method, wrap_loss=lambda loss, n: loss).fit(1)

    class NoSplit(hg.hparams.WeightDecay):
        def gauss_newton_loss(self, forward, batch, criterion):
            return None

    with pytest.raises(hg.HypergradientError, match="no Gauss-Newton split"):
        _mlp_trainer(method, hyper=NoSplit("per_weight")).fit(1)
    with pytest.raises(hg.HypergradientError, match="hessian='fisher'"):
        hg.AmortizedImplicit(hessian="fisher")
    with pytest.raises(hg.HypergradientError, match="hypergrad_resample_every"):
        _mlp_trainer(method, resample=0)


def test_the_reference_solves_the_methods_own_damped_gauss_newton_system():
    method = hg.AmortizedImplicit(
        solver="cg", max_steps=100, tol=1e-13, hessian="gauss_newton", damping=0.5
    )
    measured = MeasuredMethod(method, at=lambda k: True, reference_tol=1e-12)
    trainer = _mlp_trainer(measured, resample=4)
    trainer.fit(3)
    assert all(r["ref_rel_error"] < 1e-8 for r in trainer.history)
    assert all(r["ref_converged"] and r["ref_solver"] == "cg" for r in trainer.history)


@pytest.mark.parametrize("source", ["random", "krylov"])
def test_gauss_newton_nystrom_and_kept_batches_resume_bit_for_bit(tmp_path, source):
    def method():
        pre = hg.linalg.NystromPreconditioner(rank=4, refresh_every=3, source=source)
        return hg.AmortizedImplicit(
            max_steps=2, tol=0.0, hessian="gauss_newton", damping=0.1, preconditioner=pre
        )

    whole = _mlp_trainer(method(), resample=3)
    whole.fit(7)
    checkpoint = tmp_path / "ck.pt"
    _mlp_trainer(method(), resample=3).fit(4, checkpoint=checkpoint)
    resumed = _mlp_trainer(method(), resample=3)
    resumed.fit(7, checkpoint=checkpoint, resume=True)
    for k in whole.hparams:
        assert torch.equal(whole.hparams[k], resumed.hparams[k])
    assert [r["solve_hvps"] for r in whole.history] == [r["solve_hvps"] for r in resumed.history]
    sketch = 4 if source == "random" else 0  # recycled directions cost no matvec
    hvps = [r["solve_hvps"] for r in whole.history][:4]
    assert hvps == [2 + sketch, 3, 3, 3 + sketch]  # sketches at hyper-steps 0 and 3


def test_other_methods_are_judged_at_the_same_points_against_the_same_reference():
    prob = ridge_problem()
    measured = MeasuredMethod(
        hg.Implicit(solver="exact"),
        at=lambda k: True,
        compare_with={"identity": hg.Implicit(solver="identity"), "exact": hg.Implicit("exact")},
    )
    _, info = _call(measured, prob)
    assert info["ref_rel_error.exact"] < 1e-8
    alone = MeasuredMethod(hg.Implicit(solver="identity"), at=lambda k: True)
    _, info_alone = _call(alone, prob)
    assert info["ref_rel_error.identity"] == pytest.approx(info_alone["ref_rel_error"], rel=1e-12)
    assert info["ref_cosine.identity"] == pytest.approx(info_alone["ref_cosine"], rel=1e-12)


def test_krylov_recycling_costs_no_matvec_and_speeds_up_later_solves():
    # as along a training run: many short solves (4 CG steps each, new right-hand sides)
    # leave their directions behind; a later solve preconditioned with them needs fewer
    # steps, and its answer is still torch.linalg.solve's
    n = 200
    eig = torch.cat([torch.logspace(3, 0, 20, dtype=torch.float64),
                     1.0 + torch.linspace(0, 1, n - 20, dtype=torch.float64)])  # fmt: skip
    a = _spd(n, eig, seed=4)
    gen = torch.Generator().manual_seed(5)
    pre = hg.linalg.NystromPreconditioner(rank=40, refresh_every=1, source="krylov")
    like = torch.zeros(n, dtype=torch.float64)
    for _ in range(10):
        assert pre.prepare(lambda v: a @ v, like) == 0
        b = torch.randn(n, dtype=torch.float64, generator=gen)
        hg.linalg.CG(max_steps=4, tol=0.0, preconditioner=pre).solve(lambda v: a @ v, b)
    pre.prepare(lambda v: a @ v, like)
    b = torch.randn(n, dtype=torch.float64, generator=gen)
    exact = torch.linalg.solve(a, b)
    plain = hg.linalg.CG(max_steps=500, tol=1e-10).solve(lambda v: a @ v, b)
    fast = hg.linalg.CG(max_steps=500, tol=1e-10, preconditioner=pre).solve(lambda v: a @ v, b)
    for solution in (plain, fast):
        assert torch.linalg.norm(solution.value - exact) <= 1e-8 * torch.linalg.norm(exact)
    assert fast.stats.num_steps < 0.6 * plain.stats.num_steps
    with pytest.raises(hg.HypergradientError, match="source"):
        hg.linalg.NystromPreconditioner(source="lanczos")


def test_the_weight_decay_recipe_offers_the_amortized_method():
    from hypergradient.recipes import weight_decay as recipe

    config = recipe.WeightDecayConfig(
        method="amortized", solver="cg", solver_steps=2, hessian="gauss_newton", damping=0.1,
        hypergrad_resample_every=3, hyper_steps=4, n_train=120, n_val=60, val_sizes=[],
    )  # fmt: skip
    config.validate()
    data = recipe.load_data(config)
    trainer = recipe.build_trainer(config, data, config.n_val)
    assert isinstance(trainer.method, hg.AmortizedImplicit)
    assert trainer.method.hessian == "gauss_newton" and trainer.method.damping == 0.1
    assert trainer.hypergrad_resample_every == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(4)
    assert [r["solve_hvps"] for r in trainer.history] == [2, 3, 3, 3]
    for bad, match in (
        ({"solver": "exact"}, "solver"),
        ({"hessian": "fisher"}, "hessian"),
        ({"damping": -1.0}, "damping"),
        ({"hypergrad_resample_every": 0}, "hypergrad_resample_every"),
    ):
        with pytest.raises(hg.HypergradientError, match=match):
            recipe.WeightDecayConfig(method="amortized", **bad).validate()
