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
