"""EvoGrad (Bohdal, Yang, Hospedales 2021): exactness of the estimator, what it estimates, and
its use in the training loop.

* For fixed noise the estimate is the exact gradient of
  :math:`F(\\lambda) = E(\\theta + \\sum_k \\mathrm{softmax}(-\\ell(\\lambda)/\\tau)_k
  \\varepsilon_k, \\lambda)`: checked against autograd of :math:`F` written out here, against
  the chain rule assembled by hand, and against central finite differences of :math:`F`.
* Its expectation over the noise is, up to :math:`O(\\sigma^3)`, the one-step look-ahead
  hypergradient with step :math:`\\alpha = \\sigma^2 (K-1)/(K\\tau)` (derivation in
  :mod:`hypergradient.hypergrad.evograd`): checked by Monte Carlo against closed forms on
  problems from :mod:`hypergradient.testing`, with tolerances in standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _readme
import hypergradient as hg
from hypergradient import HypergradientError
from hypergradient.hparams import AbstractHyperparameter
from hypergradient.hypergrad.evograd import effective_step
from hypergradient.testing import quadratic_problem, ridge_problem

# ---------------------------------------------------------------------------------------
# A small nonlinear problem: an MLP whose training inputs are shifted by a learnable vector
# and whose weights carry a learnable log-decay; the validation loss also depends on the
# shift directly (so the direct term is exercised).
# ---------------------------------------------------------------------------------------


def _mlp_problem():
    g = torch.Generator().manual_seed(3)
    x, xv = torch.randn(20, 3, generator=g), torch.randn(15, 3, generator=g)
    y, yv = torch.randint(0, 2, (20,), generator=g), torch.randint(0, 2, (15,), generator=g)
    params = {
        "W1": 0.5 * torch.randn(3, 4, generator=g),
        "b1": 0.1 * torch.randn(4, generator=g),
        "W2": 0.5 * torch.randn(4, 2, generator=g),
    }
    hparams = {"shift": 0.3 * torch.randn(3, generator=g), "log_decay": torch.tensor(-2.0)}

    def net(p, inputs):
        return torch.tanh(inputs @ p["W1"] + p["b1"]) @ p["W2"]

    def inner_loss(p, h):
        decay = 0.5 * h["log_decay"].exp() * (p["W1"].square().sum() + p["W2"].square().sum())
        return F.cross_entropy(net(p, x + h["shift"]), y) + decay

    def outer_loss(p, h):
        return F.cross_entropy(net(p, xv), yv) + 0.01 * h["shift"].square().sum()

    return inner_loss, outer_loss, params, hparams


def _estimator_objective(inner_loss, outer_loss, params, perturbations, temperature):
    """F(hparams) = E(theta + sum_k softmax(-l/tau)_k eps_k, hparams), written out here."""

    def objective(h):
        losses = torch.stack(
            [inner_loss({k: params[k] + eps[k] for k in params}, h) for eps in perturbations]
        )
        w = torch.softmax(-losses / temperature, dim=0)
        combined = {
            k: params[k] + sum(w[i] * eps[k] for i, eps in enumerate(perturbations)) for k in params
        }
        return outer_loss(combined, h)

    return objective


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_estimate_is_the_exact_gradient_of_the_evograd_objective(noise):
    inner_loss, outer_loss, params, hparams = _mlp_problem()
    # a large sigma, a sharp softmax and three copies: the softmax path carries much of the
    # gradient (the identities below hold for any values)
    copies, sigma, temperature = 3, 0.3, 0.1
    got, details = hg.evograd_hypergrad(
        inner_loss,
        outer_loss,
        params,
        hparams,
        copies=copies,
        sigma=sigma,
        temperature=temperature,
        noise=noise,
        generator=torch.Generator().manual_seed(0),
        return_details=True,
    )
    eps = details.perturbations
    assert len(eps) == copies
    objective = _estimator_objective(inner_loss, outer_loss, params, eps, temperature)

    # (1) autograd of F, written independently of the library's code path
    hp = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
    value = objective(hp)
    reference = dict(zip(hp, torch.autograd.grad(value, list(hp.values()))))
    for k in hparams:
        # the same float64 quantity computed in another order: agreement to round-off
        torch.testing.assert_close(got[k], reference[k], rtol=1e-10, atol=1e-13)

    # (2) the chain rule by hand: g = dE/dlam - (1/tau) sum_k w_k (a_k - a_bar) dl_k/dlam,
    # a_k = grad_theta E(theta*) . eps_k
    w = details.weights
    theta_star = {k: params[k] + sum(w[i] * e[k] for i, e in enumerate(eps)) for k in params}
    th = {k: v.clone().requires_grad_(True) for k, v in theta_star.items()}
    hp = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
    grads = torch.autograd.grad(outer_loss(th, hp), [*th.values(), *hp.values()], allow_unused=True)
    g_theta = dict(zip(th, grads[: len(th)]))
    # E depends on the shift directly, not on the decay: a zero direct term for the decay
    direct = {k: torch.zeros_like(v) if gk is None else gk
              for (k, v), gk in zip(hp.items(), grads[len(th) :])}  # fmt: skip
    assert grads[len(th) + 1] is None
    a = torch.stack([sum(torch.sum(g_theta[k] * e[k]) for k in params) for e in eps])
    by_hand = {k: direct[k].clone() for k in hparams}
    for i, e in enumerate(eps):
        hp = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
        loss_i = inner_loss({k: params[k] + e[k] for k in params}, hp)
        grad_i = dict(zip(hp, torch.autograd.grad(loss_i, list(hp.values()))))
        for k in hparams:
            by_hand[k] -= w[i] * (a[i] - w @ a) / temperature * grad_i[k]
    for k in hparams:
        torch.testing.assert_close(got[k], by_hand[k], rtol=1e-10, atol=1e-13)

    # (3) central finite differences of F: O(h^2) truncation plus O(1e-16 / h) round-off
    fd = hg.testing.finite_difference_hypergrad(objective, hparams, eps=1e-6)
    assert hg.testing.relative_error(got, fd) < 1e-7

    # the details describe the same computation
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(w, torch.softmax(-details.losses / temperature, 0))
    torch.testing.assert_close(details.outer_value, objective(hparams).detach())
    # the softmax path is a sizeable part of the result, so (1)-(3) do test it
    assert hg.testing.relative_error(got, direct) > 0.3


def test_noise_is_seeded_and_has_the_requested_distribution():
    inner_loss, outer_loss, params, hparams = _mlp_problem()

    def estimate(gen):
        return hg.evograd_hypergrad(
            inner_loss, outer_loss, params, hparams, generator=gen, return_details=True
        )

    first, d1 = estimate(torch.Generator().manual_seed(7))
    again, _ = estimate(torch.Generator().manual_seed(7))
    for k in hparams:
        assert torch.equal(first[k], again[k])
    gen = torch.Generator().manual_seed(7)
    estimate(gen)
    later, d3 = estimate(gen)  # the generator has advanced: new noise
    assert not torch.equal(d3.perturbations[0]["W1"], d1.perturbations[0]["W1"])
    assert any(not torch.equal(later[k], first[k]) for k in hparams)
    # Rademacher (the default): every entry is exactly +-sigma
    for eps in d1.perturbations:
        for v in eps.values():
            assert torch.equal(v.abs(), torch.full_like(v, 1e-3))
    # Gaussian: N(0, sigma^2).  Over 2 x 500k draws the sample std's relative standard error
    # is 1/sqrt(2N) = 0.07%, so 0.5% is 7 of them; the mean's tolerance is 5 standard errors.
    n = 500_000
    _, details = hg.evograd_hypergrad(
        lambda p, h: (p["w"] * h["s"]).sum(), lambda p, h: p["w"].sum(),
        {"w": torch.zeros(n)}, {"s": torch.ones(n)}, noise="gaussian", sigma=0.01,
        generator=torch.Generator().manual_seed(0), return_details=True,
    )  # fmt: skip
    sample = torch.cat([e["w"] for e in details.perturbations])
    assert abs(float(sample.std()) / 0.01 - 1) < 5e-3
    assert abs(float(sample.mean())) < 5 * 0.01 / math.sqrt(sample.numel())


def test_params_and_hparams_are_not_modified():
    inner_loss, outer_loss, params, hparams = _mlp_problem()
    before = {k: v.clone() for k, v in {**params, **hparams}.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    got = hg.evograd_hypergrad(inner_loss, outer_loss, leaves, hparams)
    for k, v in {**leaves, **hparams}.items():
        assert torch.equal(v.detach(), before[k])
        assert v.grad is None
    for k, v in hparams.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype
        assert not got[k].requires_grad


# ---------------------------------------------------------------------------------------
# What EvoGrad estimates.  Theory (module docstring of hypergradient.hypergrad.evograd):
# for noise with covariance sigma^2 I and a fixed temperature tau,
#     E[g_hat] = d/dlam E(theta - alpha grad_theta L(theta, lam), lam) + O(sigma^3),
#     alpha = sigma^2 (K - 1) / (K tau),
# the one-step look-ahead hypergradient.  The checks average many estimates and compare
# them with that closed form component by component, in units of the Monte Carlo standard
# error.  With sigma = 1e-3 and tau = 0.05 the O(sigma^3) bias is about 1e-3 of the signal,
# far below the standard error (a few percent): a correct estimator passes, and a wrong step
# (checked below) or a wrong sign does not.
# ---------------------------------------------------------------------------------------

SIGMA, TAU, COPIES = 1e-3, 0.05, 2
ALPHA = effective_step(COPIES, SIGMA, TAU)


def _monte_carlo(problem, params, draws, noise="rademacher"):
    gen = torch.Generator().manual_seed(11)
    (key,) = problem.hparams
    samples = torch.stack([
        hg.evograd_hypergrad(
            problem.inner_loss, problem.outer_loss, params, problem.hparams, copies=COPIES,
            sigma=SIGMA, temperature=TAU, noise=noise, generator=gen,
        )[key]
        for _ in range(draws)
    ])  # fmt: skip
    return samples.mean(0), samples.std(0) / math.sqrt(draws)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_expectation_is_the_one_step_lookahead_hypergradient(noise):
    # Quadratic problem L = w'Aw/2 + w'B lam + c'w, E = |w - t|^2/2 + e'lam, evaluated away
    # from the inner optimum (grad_w L != 0) so that the look-ahead really moves w:
    #   w' = w - alpha (A w + B lam + c),  dE(w', lam)/dlam = e - alpha B'(w' - t).
    problem = quadratic_problem()
    d, lam = problem.data, problem.hparams["lam"]
    w0 = problem.params["w"]
    w = w0 + 0.5 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(5))

    def lookahead(step):
        w_next = w - step * (d["A"] @ w + d["B"] @ lam + d["c"])
        return d["e"] - step * d["B"].T @ (w_next - d["target"])

    mean, stderr = _monte_carlo(problem, {"w": w}, draws=1500, noise=noise)
    z = (mean - lookahead(ALPHA)) / stderr
    # 4 components; under the CLT P(max |z| > 4.5) < 3e-5
    assert float(z.abs().max()) < 4.5, z
    # the test tells the right step from one twice as large (sigma^2/tau, which forgets the
    # (K-1)/K of the mean-centred softmax): that one is many standard errors away
    assert float(((mean - lookahead(2 * ALPHA)) / stderr).abs().max()) > 8


def test_direction_correlates_with_the_exact_hypergradient_on_ridge():
    # Per-feature ridge at its exact optimum: grad_w L = 0, so the look-ahead hypergradient
    # is the "identity" approximation of the implicit one, h_id = -alpha e^lam * w * g with
    # g = grad_w E, while the exact one is h = -e^lam * w * (H^{-1} g).  Their directions
    # agree exactly when H is a multiple of I; how well they agree otherwise is a property of
    # the problem, computed here from the closed forms (not a theorem about EvoGrad).  What
    # is tested about EvoGrad: its mean is h_id (in standard errors), so its correlation with
    # the exact hypergradient is that of h_id.
    problem = ridge_problem()
    d, w, lam = problem.data, problem.params["w"], problem.hparams["log_l2"]
    g = d["X_val"].T @ (d["X_val"] @ w - d["y_val"]) / d["X_val"].shape[0]
    h_id = -ALPHA * lam.exp() * w * g
    exact = problem.hypergrad["log_l2"]

    def cosine(u, v):
        return float(u @ v / (u.norm() * v.norm()))

    assert cosine(h_id, exact) > 0.9  # the property of this problem that the test relies on
    mean, stderr = _monte_carlo(problem, problem.params, draws=1500)
    z = (mean - h_id) / stderr
    assert float(z.abs().max()) < 4.5, z  # 8 components: P(max |z| > 4.5) < 6e-5
    assert cosine(mean, exact) > 0.85


# ---------------------------------------------------------------------------------------
# In the training loop
# ---------------------------------------------------------------------------------------


class _InputScale(AbstractHyperparameter):
    """Training inputs are multiplied by exp(log_scale)."""

    def init(self, params):
        return {"log_scale": torch.zeros(())}

    def training_loss(self, forward, params, hparams, batch, criterion=F.cross_entropy):
        x, y = batch
        return criterion(forward(params, x * hparams["log_scale"].exp()), y).mean()


def _mse(outputs, targets, reduction="mean"):
    return F.mse_loss(outputs.squeeze(-1), targets, reduction=reduction)


def _scale_trainer(method):
    # Targets y = w'x; the validation inputs are 2x.  A linear model without bias trained on
    # (s x, y) learns w / s and predicts (w / s)'(2x): right exactly when s = 2, so the
    # unique best hyperparameter is log_scale = log 2 (it starts at 0).
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(4, generator=g)
    x, xv = torch.randn(256, 4, generator=g), torch.randn(256, 4, generator=g)
    data = torch.utils.data.TensorDataset
    train = torch.utils.data.DataLoader(data(x, x @ w_true), batch_size=32, shuffle=True)
    val = torch.utils.data.DataLoader(data(2 * xv, xv @ w_true), batch_size=64, shuffle=True)
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    return hg.BilevelTrainer(
        model, _InputScale(), train, val, torch.optim.SGD(model.parameters(), lr=0.1),
        method=method, hyper_every=1, criterion=_mse,
        hyper_optimizer=lambda h: torch.optim.Adam(h, lr=0.03),
    )  # fmt: skip


def test_bilevel_trainer_learns_the_input_scale_with_evograd():
    trainer = _scale_trainer(hg.EvoGrad(generator=torch.Generator().manual_seed(1)))
    history = trainer.fit(150)
    scale = float(trainer.hparams["log_scale"].detach().exp())
    assert abs(scale - 2.0) < 0.1, scale  # from 1.0
    assert history[-1]["val_loss"] < 1e-2 * history[0]["val_loss"]
    # the same seed replays the same run
    replay = _scale_trainer(hg.EvoGrad(generator=torch.Generator().manual_seed(1)))
    replay.fit(20)
    assert [r["val_loss"] for r in replay.history] == [r["val_loss"] for r in history[:20]]
    assert float(replay.hparams["log_scale"].detach()) != 0.0


def test_method_object_and_registry():
    method = hg.hypergrad.get_method("evograd", sigma=0.01, copies=4)
    assert isinstance(method, hg.EvoGrad)
    assert (method.sigma, method.copies, method.temperature) == (0.01, 4, 0.05)
    assert method.effective_step == pytest.approx(0.01**2 * 3 / (4 * 0.05))
    assert not method.outer_at_params  # E is evaluated at theta*, not at the given weights
    # the generator is not part of the options' identity
    assert hg.EvoGrad(generator=torch.Generator()) == hg.EvoGrad()
    inner_loss, outer_loss, params, hparams = _mlp_problem()
    seeded = hg.EvoGrad(generator=torch.Generator().manual_seed(2))
    via_method = seeded.hypergrad(inner_loss, outer_loss, params, hparams, lr=0.1, momentum=0.9)
    direct = hg.evograd_hypergrad(
        inner_loss, outer_loss, params, hparams, generator=torch.Generator().manual_seed(2)
    )
    for k in hparams:  # lr and momentum are not used by EvoGrad
        assert torch.equal(via_method[k], direct[k])


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"copies": 1}, r"copies=1; expected an int >= 2"),
        ({"copies": 2.0}, r"copies=2.0; expected an int >= 2"),
        ({"copies": True}, r"copies=True; expected an int >= 2"),
        ({"sigma": 0.0}, r"sigma=0.0; expected a positive finite float"),
        ({"sigma": -1e-3}, r"sigma=-0.001; expected a positive finite float"),
        ({"sigma": float("nan")}, r"sigma=nan; expected a positive finite float"),
        ({"sigma": "small"}, r"sigma='small'; expected a positive finite float"),
        ({"temperature": 0}, r"temperature=0; expected a positive finite float"),
        ({"temperature": float("inf")}, r"temperature=inf; expected a positive finite"),
        ({"noise": "uniform"}, r"noise='uniform'; expected one of \['rademacher', 'gaussian'\]"),
        ({"generator": 3}, r"generator must be a torch.Generator or None, got int"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(HypergradientError, match=r"hypergradient\.EvoGrad\(\.\.\.\): " + match):
        hg.EvoGrad(**options)
    inner_loss, outer_loss, params, hparams = _mlp_problem()
    with pytest.raises(HypergradientError, match=r"evograd_hypergrad\(\.\.\.\): " + match):
        hg.evograd_hypergrad(inner_loss, outer_loss, params, hparams, **options)


def test_effective_step_validates_its_options():
    assert effective_step(2, 1e-3, 0.05) == pytest.approx(1e-5)
    with pytest.raises(HypergradientError, match=r"effective_step\(\.\.\.\): copies=1"):
        effective_step(1, 1e-3, 0.05)


def test_bad_inputs_raise():
    inner_loss, outer_loss, params, hparams = _mlp_problem()
    with pytest.raises(HypergradientError, match=r"hparams \['unused'\] enter neither"):
        hg.evograd_hypergrad(inner_loss, outer_loss, params, {**hparams, "unused": torch.zeros(2)})
    with pytest.raises(HypergradientError, match=r"`inner_loss` must be a callable"):
        hg.evograd_hypergrad(None, outer_loss, params, hparams)
    with pytest.raises(HypergradientError, match=r"must return a scalar loss, got a tensor"):
        hg.evograd_hypergrad(lambda p, h: p["W1"] * h["shift"].sum(), outer_loss, params, hparams)
    with pytest.raises(HypergradientError, match=r"returned dtype torch.float32"):
        hg.evograd_hypergrad(inner_loss, lambda p, h: outer_loss(p, h).float(), params, hparams)
    with pytest.raises(HypergradientError, match=r"returned nan \(not finite\)"):
        hg.evograd_hypergrad(
            lambda p, h: inner_loss(p, h) * float("nan"), outer_loss, params, hparams
        )


README_EXAMPLE = _readme.example(
    "hg.EvoGrad(",
    g_keys="sorted(g)",
    g_finite="bool(torch.isfinite(g['log_l2']).all())",
    weights_sum="details.weights.sum()",
    effective_step="evograd.effective_step",
)


def test_readme_evograd_example_runs():
    run = README_EXAMPLE.run()  # in a fresh interpreter, as a reader pastes it
    assert run.values["g_keys"] == ["log_l2"] and run.values["g_finite"]
    torch.testing.assert_close(torch.tensor(run.values["weights_sum"]), torch.tensor(1.0))
    assert run.values["effective_step"] == pytest.approx(1e-5)
    assert "tensor([" in run.stdout  # the weights were printed
