"""K-FAC's quadratic model (Martens & Grosse 2015, Secs. 6.5 and 7) against dense float64 algebra.

* The rescaled step ``alpha Delta + mu delta_0`` is the minimiser of the exact damped quadratic
  model ``g^T d + d^T (F + (lambda + eta) I) d / 2`` over span{Delta, delta_0}: compared with
  a 2x2 solve built from the dense Fisher ``J^T H J`` (``J`` the full Jacobian of the network
  outputs, ``H`` the Hessian of the loss in the outputs, both by ``torch.autograd``), for an
  MLP (Bernoulli outputs, weight decay) and a conv net (categorical outputs).
* The reduction ratio ``rho`` is ``(h(theta + d) - h(theta)) / (M_0(d) - M_0(0))`` with the
  undamped dense model, and the damping moves by the Levenberg-Marquardt rule; on linear least
  squares the model is exact, so ``rho = 1``.
* The Bernoulli likelihood's factors, the output-Hessian bilinear form, and the errors.

Tolerances: every identity is exact up to float64 rounding of sums of at most a few thousand
terms (relative error ~1e-14); 1e-9 leaves a wide margin while catching any wrong factor.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hypergradient import HypergradientError
from hypergradient.optimizers.kfac import KFAC
from hypergradient.optimizers.kfac._capture import output_fisher_form

TIGHT = {"rtol": 1e-9, "atol": 1e-11}


def seeded(module_fn, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module_fn()


def mean_loss(likelihood: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if likelihood == "categorical":
        return F.cross_entropy(z, y)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(z, y, reduction="sum") / z.shape[0]
    return 0.5 * ((z - y) ** 2).sum() / z.shape[0]


class Dense:
    """Flat-vector view of a model at its current parameters: loss, gradient, exact Fisher."""

    def __init__(self, net: nn.Module, X: torch.Tensor, y: torch.Tensor, likelihood: str):
        self.net, self.X, self.y, self.likelihood = net, X, y, likelihood
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = [p.shape for _, p in net.named_parameters()]
        self.theta = self.flat({n: p.detach() for n, p in net.named_parameters()})

    def flat(self, tree) -> torch.Tensor:
        return torch.cat([tree[n].reshape(-1) for n in self.names])

    def unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for n, shape in zip(self.names, self.shapes):
            size = shape.numel()
            out[n] = v[start : start + size].reshape(shape)
            start += size
        return out

    def outputs(self, v: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        X = self.X if rows is None else self.X[:rows]
        return functional_call(self.net, self.unflat(v), (X,))

    def loss(self, v: torch.Tensor) -> torch.Tensor:
        return mean_loss(self.likelihood, self.outputs(v), self.y)

    def grad(self) -> torch.Tensor:
        return torch.autograd.functional.jacobian(self.loss, self.theta)

    def fisher(self, rows: int | None = None) -> torch.Tensor:
        """``J^T H J`` of the mean loss over the (first ``rows``) examples."""
        y = self.y if rows is None else self.y[:rows]
        out = self.outputs(self.theta, rows)
        J = torch.autograd.functional.jacobian(lambda v: self.outputs(v, rows), self.theta)
        J = J.reshape(-1, self.theta.numel())
        H = torch.autograd.functional.hessian(
            lambda z: mean_loss(self.likelihood, z.reshape(out.shape), y), out.reshape(-1)
        )
        return J.T @ H @ J


def params_of(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def clone(net: nn.Module, factory) -> nn.Module:
    """A hook-free copy (``deepcopy`` would copy K-FAC's hooks and their records)."""
    twin = factory()
    twin.load_state_dict(net.state_dict())
    return twin


def one_step(net, opt, X, y, likelihood, **step_kwargs) -> None:
    opt.zero_grad()
    out = net(X)
    opt.update_curvature(out)
    mean_loss(likelihood, out, y).backward()
    opt.step(**step_kwargs)


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def conv():
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)
    )


def mlp_case():
    net = seeded(mlp)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(12, 4, generator=gen)
    y = torch.rand(12, 3, generator=gen)  # soft Bernoulli targets in [0, 1]
    return net, X, y, "bernoulli", 0.01


def conv_case():
    net = seeded(conv)
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(6, 2, 3, 3, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    return net, X, y, "categorical", 0.0


@pytest.mark.parametrize("case", [mlp_case, conv_case], ids=["mlp-bernoulli", "conv-categorical"])
def test_rescaled_step_minimises_the_exact_damped_model_over_the_two_directions(case):
    net, X, y, likelihood, wd = case()
    damping = 0.3
    common = {"damping": damping, "weight_decay": wd, "fisher": "exact", "likelihood": likelihood}
    # factor_decay=0, inverse_every=1: the factors are the current batch's, so a fresh plain
    # K-FAC (lr 1, no momentum) on a copy of the model gives the same direction Delta
    opt = KFAC(net, rescale=True, factor_decay=0.0, inverse_every=1, **common)
    previous = None
    for _ in range(3):
        twin = clone(net, mlp if likelihood == "bernoulli" else conv)
        one_step(twin, KFAC(twin, lr=1.0, **common), X, y, likelihood)
        dense = Dense(net, X, y, likelihood)
        Delta = params_of(twin) - dense.theta
        one_step(net, opt, X, y, likelihood)
        delta = params_of(net) - dense.theta

        C = dense.fisher() + (damping + wd) * torch.eye(dense.theta.numel())
        g = dense.grad() + wd * dense.theta
        basis = torch.stack([Delta] if previous is None else [Delta, previous], dim=1)
        coef = torch.linalg.solve(basis.T @ C @ basis, -basis.T @ g)
        torch.testing.assert_close(delta, basis @ coef, **TIGHT)
        assert opt.last_step["alpha"] == pytest.approx(float(coef[0]), rel=1e-9)
        assert opt.last_step["mu"] == pytest.approx(0.0 if previous is None else float(coef[1]))
        model = g @ delta + 0.5 * delta @ C @ delta
        assert opt.last_step["damped_change"] == pytest.approx(float(model), rel=1e-9)
        # a minimiser over the span: no nearby point of the span has a lower model value
        for shift in torch.eye(basis.shape[1]) * 1e-3:
            for sign in (1, -1):
                d = basis @ (coef + sign * shift)
                assert g @ d + 0.5 * d @ C @ d > model
        previous = delta


def test_reduction_ratio_matches_its_definition_and_moves_the_damping_by_the_lm_rule():
    net, X, y, likelihood, wd = mlp_case()
    omega = 0.8
    opt = KFAC(
        net,
        lr=0.5,
        damping=0.05,
        momentum=0.5,
        weight_decay=wd,
        fisher="exact",
        likelihood=likelihood,
        adapt_damping=True,
        adapt_every=1,
        damping_decay=omega,
    )

    def objective(v: torch.Tensor, dense: Dense) -> float:
        return float(dense.loss(v) + 0.5 * wd * v @ v)

    seen = set()
    for lr in [0.5, 0.5, 40.0, 40.0, 0.5, 2.0, 4.0, 6.0, 8.0]:  # large rates overshoot
        opt.param_groups[0]["lr"] = lr
        dense = Dense(net, X, y, likelihood)
        before = opt.param_groups[0]["damping"]
        one_step(net, opt, X, y, likelihood, loss_fn=lambda: mean_loss(likelihood, net(X), y))
        u = params_of(net) - dense.theta
        g = dense.grad() + wd * dense.theta
        predicted = g @ u + 0.5 * u @ (dense.fisher() + wd * torch.eye(u.numel())) @ u
        actual = objective(dense.theta + u, dense) - objective(dense.theta, dense)
        info = opt.last_step
        assert info["predicted_change"] == pytest.approx(float(predicted), rel=1e-9)
        assert info["actual_change"] == pytest.approx(actual, rel=1e-9, abs=1e-13)
        if predicted < 0:
            rho = actual / float(predicted)
            assert info["rho"] == pytest.approx(rho, rel=1e-8)
            factor = omega if rho > 0.75 else (1 / omega if rho < 0.25 else 1.0)
        else:  # the step left the region where the model predicts a decrease: raise damping
            assert info["rho"] != info["rho"]  # nan
            factor = 1 / omega
        assert opt.param_groups[0]["damping"] == pytest.approx(before * factor, rel=1e-12)
        seen.add(factor)
    assert seen == {omega, 1.0, 1 / omega}  # all three branches of the rule were exercised


def test_rho_is_one_on_linear_least_squares_where_the_model_is_exact():
    gen = torch.Generator().manual_seed(3)
    X, Y = torch.randn(20, 4, generator=gen), torch.randn(20, 2, generator=gen)
    net = seeded(lambda: nn.Linear(4, 2))
    opt = KFAC(
        net, damping=1.0, fisher="exact", likelihood="gaussian", rescale=True, adapt_damping=True,
        adapt_every=2,
    )  # fmt: skip
    dampings = []
    for _ in range(6):
        one_step(net, opt, X, Y, "gaussian", loss_fn=lambda: mean_loss("gaussian", net(X), Y))
        dampings.append(opt.param_groups[0]["damping"])
        if opt.last_step["rho"] is not None:
            assert opt.last_step["rho"] == pytest.approx(1.0, rel=1e-9)
    # adapted on steps 1, 3, 5 (every 2nd, starting with the first): down by (19/20)^2 each
    omega = (19 / 20) ** 2
    expected = [omega, omega, omega**2, omega**2, omega**3, omega**3]
    assert dampings == pytest.approx(expected, rel=1e-12)


def test_model_rows_evaluates_the_fisher_on_the_first_rows_only():
    net, X, y, likelihood, wd = mlp_case()
    opt = KFAC(net, damping=0.3, fisher="exact", likelihood=likelihood, rescale=True, model_rows=5)
    twin = clone(net, mlp)
    one_step(twin, KFAC(twin, lr=1.0, damping=0.3, fisher="exact", likelihood=likelihood), X, y,
             likelihood)  # fmt: skip
    dense = Dense(net, X, y, likelihood)
    Delta = params_of(twin) - dense.theta
    one_step(net, opt, X, y, likelihood)
    g = dense.grad()
    alpha = -(g @ Delta) / (Delta @ dense.fisher(rows=5) @ Delta + 0.3 * Delta @ Delta)
    assert opt.last_step["alpha"] == pytest.approx(float(alpha), rel=1e-9)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian", "bernoulli"])
def test_output_fisher_form_is_the_loss_hessian_in_the_outputs(likelihood):
    gen = torch.Generator().manual_seed(4)
    z, u, v = (torch.randn(5, 3, generator=gen) for _ in range(3))
    y = (
        torch.randint(0, 3, (5,), generator=gen)
        if likelihood == "categorical"
        else torch.rand(5, 3)
    )
    H = torch.autograd.functional.hessian(
        lambda w: mean_loss(likelihood, w.reshape(5, 3), y), z.reshape(-1)
    )
    expected = u.reshape(-1) @ H @ v.reshape(-1)
    torch.testing.assert_close(output_fisher_form(likelihood, z, u, v), expected, **TIGHT)


def test_bernoulli_factors_of_a_linear_layer_are_the_exact_fisher_factors():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(7, 3, generator=gen)
    net = seeded(lambda: nn.Linear(3, 4))
    opt = KFAC(net, fisher="exact", likelihood="bernoulli")
    opt.update_curvature(net(X))
    block = opt.blocks()[""]
    p = torch.sigmoid(net(X)).detach()
    Xb = torch.cat([X, torch.ones(7, 1)], dim=1)
    torch.testing.assert_close(block.A, Xb.T @ Xb / 7, **TIGHT)
    # the layer's output IS the logits: G = E_n diag(p (1 - p))
    torch.testing.assert_close(block.G, torch.diag((p * (1 - p)).mean(0)), **TIGHT)


def test_state_dict_round_trip_continues_the_adapted_damping_and_previous_step():
    net, X, y, likelihood, _ = mlp_case()
    kwargs = {"damping": 0.2, "fisher": "exact", "likelihood": likelihood, "rescale": True,
              "adapt_damping": True, "adapt_every": 2}  # fmt: skip
    opt = KFAC(net, **kwargs)

    def loss_fn(model):
        return lambda: mean_loss(likelihood, model(X), y)

    for _ in range(3):
        one_step(net, opt, X, y, likelihood, loss_fn=loss_fn(net))
    buffer = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other = seeded(mlp, seed=7)
    other.load_state_dict(saved["net"])
    other_opt = KFAC(other, **kwargs)
    other_opt.load_state_dict(saved["opt"])
    for _ in range(3):
        one_step(net, opt, X, y, likelihood, loss_fn=loss_fn(net))
        one_step(other, other_opt, X, y, likelihood, loss_fn=loss_fn(other))
    torch.testing.assert_close(params_of(other), params_of(net), rtol=0, atol=0)
    assert other_opt.param_groups[0]["damping"] == opt.param_groups[0]["damping"] != 0.2


def test_quadratic_model_errors():
    net, X, y, likelihood, _ = mlp_case()
    for kwargs, pattern in [
        ({"damping": -0.1, "adapt_damping": True}, "`damping` must be a finite number >= 0"),
        ({"rescale": True, "momentum": 0.9}, "momentum=0.9 with rescale=True"),
        ({"rescale": 1}, "rescale must be True or False"),
        ({"adapt_every": 0}, "adapt_every must be an integer >= 1"),
        ({"damping_decay": 1.0}, r"damping_decay must be in \(0, 1\)"),
        ({"damping_decay": 0.0}, r"damping_decay must be in \(0, 1\)"),
        ({"min_damping": -1.0}, "`min_damping` must be a finite number >= 0"),
        ({"model_rows": 0}, "model_rows must be an integer >= 1 or None"),
    ]:
        with pytest.raises(HypergradientError, match=pattern):
            KFAC(net, likelihood=likelihood, **kwargs)

    adapting = KFAC(net, likelihood=likelihood, adapt_damping=True)
    adapting.zero_grad()
    out = net(X)
    adapting.update_curvature(out)
    mean_loss(likelihood, out, y).backward()
    with pytest.raises(HypergradientError, match=r"adapt_damping=True needs .*step\(loss_fn="):
        adapting.step()
    with pytest.raises(HypergradientError, match="loss_fn\\(\\) must return the mini-batch loss"):
        adapting.step(loss_fn=lambda: float("nan"))

    rescaling = KFAC(net, likelihood=likelihood, rescale=True)
    net(X)
    rescaling.update_curvature(net(X))
    rescaling.remove_hooks()
    with pytest.raises(HypergradientError, match="no forward pass .* was recorded"):
        rescaling.step()

    # a factor update when K-FAC captured no layer at all
    only_embedding = nn.Sequential(nn.Embedding(5, 3))
    skipped = KFAC(only_embedding, unsupported="skip")
    with pytest.raises(HypergradientError, match=r"captures no layer .*skipped.*\['0'\]"):
        skipped.update_curvature(only_embedding(torch.tensor([0, 1, 2])))

    with pytest.raises(HypergradientError, match="likelihood='bernoulli' with fisher='empirical'"):
        KFAC(net, likelihood="bernoulli", fisher="empirical").update_curvature(net(X), y[:, :2])


def test_factored_singularity_check_is_per_factor_so_float32_blocks_pass():
    """The factored block is inverted factor by factor: two float32 factors of condition
    number 250 are each accurate (250 << 1 / (100 eps) = 8e4), although their Kronecker
    product's condition number 6e4 exceeds the block-wide round-off level 1 / (201 eps) =
    4e4.  The benchmark's autoencoder stopped on that false alarm before the check was per
    factor.  A factor with a zero eigenvalue is still refused."""
    from hypergradient.optimizers.kfac import KFACPreconditioner, KroneckerBlock

    A = torch.diag(torch.linspace(1.0, 1 / 250, 101, dtype=torch.float32))
    G = torch.diag(torch.linspace(1.0, 1 / 250, 100, dtype=torch.float32))
    block = KroneckerBlock(A, G, "w", "b")
    P = KFACPreconditioner([block], damping=0.0, damping_mode="factored")
    u = {"w": torch.ones(100, 100, dtype=torch.float32), "b": torch.ones(100, dtype=torch.float32)}
    expected = 1 / (torch.diag(G)[:, None] * torch.diag(A)[None, :])  # diagonal factors
    torch.testing.assert_close(P(u)["w"], expected[:, :100], rtol=1e-5, atol=0)
    with pytest.raises(HypergradientError, match="singular .*damped block"):
        KFACPreconditioner([block], damping=0.0, damping_mode="tikhonov")
    singular = KroneckerBlock(A, torch.diag(torch.diag(G) * (torch.arange(100) > 0)), "w", "b")
    with pytest.raises(HypergradientError, match="singular .*damped output factor G"):
        KFACPreconditioner([singular], damping=0.0, damping_mode="factored")
