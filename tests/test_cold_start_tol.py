"""``BilevelTrainer(warm_start=False, cold_start_tol=...)``: a cold start that re-solves the
inner problem to a stated gradient norm before every hyper-step (Vicol et al. 2022, Alg. 1),
checked against the closed forms of ``hg.problem.LinearBilevel`` in float64."""

import math

import pytest
import torch

import hypergradient as hg
from hypergradient.problem import LinearBilevel, run_bilevel

D, M, N_VAL = 6, 3, 2
ALPHA = 1.0 / 1.96  # 1 / lambda_max(X X^T)


class LearnedTargets(hg.hparams.AbstractHyperparameter):
    """Inner loss 0.5 ||X w - u||^2 with the targets u as the hyperparameter."""

    uses_training_data = False

    def __init__(self, x, u0):
        self.x, self.u0 = x, u0

    def init(self, params):
        return {"u": self.u0.clone()}

    def training_loss(self, forward, params, hparams, batch, criterion=None):
        return 0.5 * torch.sum((forward(params, self.x).squeeze(-1) - hparams["u"]) ** 2)


def squared_error(out, y, reduction="none"):
    return 0.5 * (out.squeeze(-1) - y) ** 2


def _setup(**options):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    X = torch.tensor([1.0, 1.2, 1.4], dtype=torch.float64)[:, None] * q[:M]
    V = torch.randn(N_VAL, D, generator=g, dtype=torch.float64)
    y = torch.randn(N_VAL, generator=g, dtype=torch.float64)
    u0 = torch.randn(M, generator=g, dtype=torch.float64)
    w0 = torch.randn(D, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0[None])
    beta = 0.3
    trainer = hg.BilevelTrainer(
        model, LearnedTargets(X, u0), None, [(V, y)],
        torch.optim.SGD(model.parameters(), lr=ALPHA),
        # the trainer's validation loss is the mean over the N_VAL examples: N_VAL x beta
        hyper_optimizer=lambda hp: torch.optim.SGD(hp, lr=N_VAL * beta),
        method=hg.Implicit(solver="identity"), criterion=squared_error, divergence_factor=None,
        **{"warm_start": False, **options},
    )  # fmt: skip
    return trainer, LinearBilevel(X, V, y), u0, w0, beta


def test_cold_start_resolves_to_the_tolerance_and_matches_the_closed_form():
    tol = 1e-10
    trainer, prob, u0, w0, beta = _setup(cold_start_tol=tol)
    history = trainer.fit(hyper_steps=4)
    for record in history:
        assert record["cold_start_converged"] is True
        assert record["cold_start_grad_norm"] <= tol
        assert record["cold_start_steps_taken"] > 10  # from w0 every time, not a warm start
    # the same algorithm written out in closed-form-checked code takes the same path
    run = run_bilevel(
        prob, u0, w0, warm_start=False, method=hg.Implicit(solver="identity"), outer_lr=beta,
        outer_steps=4, inner_lr=ALPHA, inner_tol=tol,
    )  # fmt: skip
    assert torch.allclose(trainer.hparams["u"].detach(), run.u, rtol=0, atol=1e-10)
    # the weights the last hypergradient was taken at: the inner solution closest to w0,
    # within tol / lambda_min(X X^T) = 1e-10
    w_expected = prob.inner_solution(run.u_path[-2], w0)
    assert torch.allclose(trainer.model.weight.detach()[0], w_expected, rtol=0, atol=1e-9)
    assert history[-1]["cold_start_steps_taken"] == run.inner_steps[-1]


def test_the_step_guard_warns_and_records_it():
    trainer, *_ = _setup(cold_start_tol=1e-10, cold_start_max_steps=3)
    with pytest.warns(hg.ConvergenceWarning, match=r"cold_start_max_steps=3\): hyper-step 1: .*"):
        record = trainer.step()
    assert record["cold_start_converged"] is False
    assert record["cold_start_steps_taken"] == 3
    assert record["cold_start_grad_norm"] > 1e-10 and math.isfinite(record["cold_start_grad_norm"])


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"cold_start_tol": 0.0}, r"cold_start_tol=0.0\): expected a finite number > 0"),
        ({"cold_start_tol": -1e-3}, r"cold_start_tol=-0.001\): expected a finite number > 0"),
        ({"cold_start_tol": float("nan")}, r"cold_start_tol=nan\): expected a finite number"),
        ({"cold_start_tol": True}, r"cold_start_tol=True\): expected a finite number"),
        ({"cold_start_tol": "1e-6"}, r"cold_start_tol='1e-6'\): expected a finite number"),
        ({"cold_start_tol": 1e-6, "warm_start": True}, r"warm_start=True\).*pass warm_start=F"),
        ({"cold_start_tol": 1e-6, "autocast": torch.float16}, r"float16 loss scaling"),
        ({"cold_start_tol": 1e-6, "cold_start_max_steps": 0}, r"cold_start_max_steps=0\)"),
    ],
)
def test_bad_tolerances_get_one_clear_error(options, pattern):
    with pytest.raises(hg.HypergradientError, match=pattern):
        _setup(**options)
