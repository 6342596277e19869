"""The fully connected network baseline of hypergradient.continuation (networks.py).

Tolerances: the softmax-with-weights output is ``e / sum(w e)``, so ``sum(w A) - 1`` is a few
float64 roundings of an n_w-term sum (1e-12 allowed; n_w <= 201 here). Values recomputed by
hand from the same forward pass agree to the rounding of a mean over a few hundred rows
(relative 1e-12). A batched forward pass and a row-by-row one run different matrix-product
kernels: they agree to relative 1e-12. Training runs are compared bit for bit (same seeds,
same machine, same thread count).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hypergradient._errors import HypergradientError
from hypergradient.continuation.kernels import Problem, nonuniform_grid, tau_grid, uniform_grid
from hypergradient.continuation.networks import FullyConnectedContinuation, train_network
from hypergradient.continuation.spectra import FAMILIES, make_dataset

N_TAU, N_W = 31, 81


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem(tau=tau_grid(10.0, N_TAU), beta=10.0, grid=uniform_grid(-8.0, 8.0, N_W))


@pytest.fixture(scope="module")
def data(problem):
    train = make_dataset(problem, FAMILIES[:3], 64, 1e-3, seed=0)
    val = make_dataset(problem, FAMILIES[:3], 16, 1e-3, seed=1)
    return train, val


def integrate(problem: Problem, values: torch.Tensor) -> torch.Tensor:
    return (problem.grid.weights * values.detach()).sum(-1)


def l1(problem: Problem, A: torch.Tensor, A_true: torch.Tensor) -> float:
    return float(integrate(problem, (A - A_true).abs()).mean())


# --------------------------------------------------------------------------------------------
# the network


GRIDS = {
    "uniform": lambda: uniform_grid(-8.0, 8.0, 81),
    "nonuniform": lambda: nonuniform_grid(8.0, 201),
    "asymmetric": lambda: uniform_grid(-5.0, 10.0, 61),
}


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
@pytest.mark.parametrize(
    "hidden,activation", [((), "elu"), ((32,), "relu"), ((16, 16), "tanh"), ((8,), "softplus")]
)
def test_output_is_a_normalised_density(grid_name, hidden, activation):
    grid = GRIDS[grid_name]()
    problem = Problem(tau=tau_grid(20.0, 21), beta=20.0, grid=grid)
    model = FullyConnectedContinuation(problem, hidden, activation=activation, seed=3)
    data = make_dataset(problem, FAMILIES, 4, 1e-2, seed=0)
    junk = 10 * torch.randn(8, 21, generator=torch.Generator().manual_seed(1))
    for G in (data.G_noisy, junk, data.G_noisy[0]):
        A = model(G)
        assert A.shape == (*G.shape[:-1], len(grid)) and A.dtype == torch.float64
        assert bool(torch.isfinite(A).all()) and bool((A >= 0).all())
        assert float((integrate(problem, A) - 1).abs().max()) <= 1e-12
    # logits spread over thousands: most entries underflow to 0, nothing overflows
    with torch.no_grad():
        last = model.layers[-1]
        last.bias.copy_(torch.linspace(-3000.0, 3000.0, len(grid)).roll(len(grid) // 3))
        last.weight.mul_(1e3)
    A = model(torch.cat([data.G_noisy, junk]))
    assert bool(torch.isfinite(A).all()) and bool((A >= 0).all())
    assert float((integrate(problem, A) - 1).abs().max()) <= 1e-12


@pytest.mark.parametrize("hidden", [(), (7,), (64, 32), (5, 6, 7)])
def test_parameter_count_formula(problem, hidden):
    model = FullyConnectedContinuation(problem, hidden)
    sizes = (N_TAU, *hidden, N_W)
    formula = sum((d_in + 1) * d_out for d_in, d_out in zip(sizes[:-1], sizes[1:]))
    assert model.sizes == sizes
    assert model.num_parameters() == formula == sum(p.numel() for p in model.parameters())
    # the input standardisation and the grid's weights are buffers, not parameters
    assert sorted(name for name, _ in model.named_buffers()) == [
        "input_scale",
        "input_shift",
        "weights",
    ]


def test_parameter_count_by_hand(problem):
    model = FullyConnectedContinuation(problem, hidden=(64, 32))
    assert model.num_parameters() == 31 * 64 + 64 + 64 * 32 + 32 + 32 * 81 + 81 == 6801


def test_default_initialisation_follows_nn_linear(problem):
    model = FullyConnectedContinuation(problem, hidden=(400,), seed=0)
    first, last = model.layers[0], model.layers[-1]
    for layer, fan_in in ((first, N_TAU), (last, 400)):
        bound = 1 / math.sqrt(fan_in)
        for value in (layer.weight.detach(), layer.bias.detach()):
            assert value.dtype == torch.float64
            assert float(value.abs().max()) <= bound
            # uniform on [-bound, bound]: mean 0 (standard deviation bound / sqrt(3 n)), and
            # the weights (>= 12400 draws) reach the ends
            assert abs(float(value.mean())) < 5 * bound / math.sqrt(3 * value.numel())
        assert float(layer.weight.detach().abs().max()) > 0.99 * bound


def test_shapes_and_batching(problem, data):
    model = FullyConnectedContinuation(problem, hidden=(32, 32), seed=1)
    G = data[1].G_noisy[:6]
    A = model(G).detach()
    assert A.shape == (6, N_W)
    rows = torch.stack([model(g) for g in G]).detach()
    assert rows.shape == (6, N_W)
    assert torch.allclose(rows, A, rtol=1e-12, atol=1e-14 * float(A.max()))
    assert torch.equal(model(G.reshape(2, 3, N_TAU)), A.reshape(2, 3, N_W))
    assert model(G[0]).shape == (N_W,)
    # float32 data is promoted to the network's float64
    A32 = model(G.float())
    assert A32.dtype == torch.float64 and A32.shape == (6, N_W)
    # sigma is accepted (the learned optimizer's signature) and does not change the result
    sigma = data[1].sigma[:6]
    assert torch.equal(model(G, sigma), A)
    assert torch.equal(model(G, sigma[:, 0]), A)
    # gradients reach every parameter
    model(G).pow(2).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_construction_does_not_touch_the_global_rng(problem):
    state = torch.random.get_rng_state()
    one = FullyConnectedContinuation(problem, hidden=(16,), seed=5)
    two = FullyConnectedContinuation(problem, hidden=(16,), seed=5)
    other = FullyConnectedContinuation(problem, hidden=(16,), seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, value in one.state_dict().items():
        assert torch.equal(value, two.state_dict()[name])
    assert not torch.equal(one.layers[0].weight, other.layers[0].weight)


def test_network_input_errors(problem):
    model = FullyConnectedContinuation(problem, hidden=(8,))
    G = torch.full((3, N_TAU), 0.5)
    with pytest.raises(HypergradientError, match=r"G has shape \(3, 30\)"):
        model(G[:, :-1])
    with pytest.raises(HypergradientError, match="NaN/inf"):
        model(torch.full((N_TAU,), math.nan))
    with pytest.raises(HypergradientError, match="real floating dtype"):
        model(torch.ones(N_TAU, dtype=torch.int64))
    with pytest.raises(HypergradientError, match=r"sigma has shape \(3, 5\)"):
        model(G, torch.ones(3, 5))
    with pytest.raises(HypergradientError, match=r"sigma has shape \(4,\)"):
        model(G, torch.ones(4))
    with pytest.raises(HypergradientError, match="negative"):
        model(G, -torch.ones(3))
    with pytest.raises(HypergradientError, match="sigma is float"):
        model(G, 1e-3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"hidden": (32, 0)}, r"hidden=\(32, 0\)"),
        ({"hidden": (32.0,)}, r"hidden=\(32.0,\)"),
        ({"hidden": 32}, "hidden=32"),
        ({"hidden": (True,)}, "hidden"),
        ({"activation": "gelu"}, "activation='gelu'"),
        ({"seed": -1}, "seed=-1"),
        ({"seed": 1.5}, "seed=1.5"),
    ],
)
def test_construction_errors(problem, kwargs, message):
    with pytest.raises(HypergradientError, match=message):
        FullyConnectedContinuation(problem, **kwargs)


def test_construction_needs_a_problem():
    with pytest.raises(HypergradientError, match="expected a continuation Problem"):
        FullyConnectedContinuation("problem")


# --------------------------------------------------------------------------------------------
# training


def test_training_lowers_validation_l1(problem, data):
    train, val = data
    model = FullyConnectedContinuation(problem, hidden=(64, 64), seed=0)
    history = train_network(model, train, val, steps=200, lr=3e-3, batch_size=32, seed=0)
    assert history["step"] == list(range(0, 201, 20))
    assert len(history["train_loss"]) == len(history["val_l1"]) == 11
    # from about 1.2 (a random softmax) to about 0.4 on this set
    assert history["best_val_l1"] < 0.5 * history["val_l1"][0]
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history["best_val_l1"] == min(history["val_l1"])
    assert history["loss"] == "l1" and history["steps"] == 200
    assert history["num_parameters"] == model.num_parameters()
    # the model leaves with its best validation state
    with torch.no_grad():
        assert math.isclose(
            l1(problem, model(val.G_noisy), val.A), history["best_val_l1"], rel_tol=1e-12
        )
    assert model.training


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_losses_are_errors_of_the_spectrum(problem, data, loss):
    train, val = data
    model = FullyConnectedContinuation(problem, hidden=(16,), seed=2)
    initial = copy.deepcopy(model)
    history = train_network(
        model, train, val, steps=30, lr=1e-3, batch_size=16, seed=0, loss=loss, standardize=False
    )
    with torch.no_grad():
        A_train, A_val = initial(train.G_noisy), initial(val.G_noisy)
    power = 1 if loss == "l1" else 2
    expected = float(integrate(problem, (A_train - train.A).abs() ** power).mean())
    assert math.isclose(history["train_loss"][0], expected, rel_tol=1e-12)
    # validation is judged by the L1 error of A whatever the training loss
    assert math.isclose(history["val_l1"][0], l1(problem, A_val, val.A), rel_tol=1e-12)
    assert history["train_loss"][-1] < history["train_loss"][0]
    # not the residual in G
    residual = float((problem.forward(A_train) - train.G_noisy).abs().pow(power).sum(-1).mean())
    assert not math.isclose(history["train_loss"][0], residual, rel_tol=1e-3)


def test_standardize_sets_the_input_scaling(problem, data):
    train, val = data
    model = FullyConnectedContinuation(problem, hidden=(8,))
    train_network(model, train, val, steps=1, lr=1e-3, batch_size=8, seed=0)
    assert torch.allclose(model.input_shift, train.G_noisy.mean(0), rtol=1e-12, atol=0)
    assert torch.allclose(model.input_scale, train.G_noisy.std(0, correction=0), rtol=1e-12)
    untouched = FullyConnectedContinuation(problem, hidden=(8,))
    train_network(untouched, train, val, steps=1, lr=1e-3, batch_size=8, seed=0, standardize=False)
    assert bool((untouched.input_shift == 0).all()) and bool((untouched.input_scale == 1).all())


def run(problem, data, *, model_seed=0, seed=0, steps=40, lr=3e-3, **kwargs):
    model = FullyConnectedContinuation(problem, hidden=(32,), seed=model_seed)
    history = train_network(model, *data, steps=steps, lr=lr, batch_size=16, seed=seed, **kwargs)
    return model, history


def test_training_is_deterministic_from_the_seeds(problem, data):
    state = torch.random.get_rng_state()
    model_a, history_a = run(problem, data)
    model_b, history_b = run(problem, data)
    assert torch.equal(torch.random.get_rng_state(), state)  # only its own generators
    assert history_a == history_b
    for name, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[name]), name
    # another minibatch order, another initialisation: other runs
    _, history_c = run(problem, data, seed=1)
    _, history_d = run(problem, data, model_seed=1)
    assert history_c["val_l1"][0] == history_a["val_l1"][0]  # same initial network
    assert history_c["val_l1"][1:] != history_a["val_l1"][1:]
    assert history_d["val_l1"][0] != history_a["val_l1"][0]


def test_the_best_validation_state_is_kept(problem, data):
    # 6 training spectra and a large learning rate: the network overfits, and the validation
    # L1 falls and then rises again (best near step 50 of 200 when this was written)
    few = make_dataset(problem, FAMILIES[:3], 2, 1e-3, seed=0)
    kwargs = {"steps": 200, "lr": 1e-2, "eval_every": 10}
    model, history = run(problem, (few, data[1]), **kwargs)
    best = history["best_step"]
    index = history["step"].index(best)
    assert history["val_l1"][index] == history["best_val_l1"] == min(history["val_l1"])
    assert history["val_l1"].index(history["best_val_l1"]) == index  # the first on ties
    assert 0 < best < 200 and history["val_l1"][-1] > history["best_val_l1"]
    # the same run stopped at the best step ends in the same state, bit for bit
    stopped, _ = run(problem, (few, data[1]), **{**kwargs, "steps": best})
    for name, value in model.state_dict().items():
        assert torch.equal(value, stopped.state_dict()[name]), name
    with torch.no_grad():
        assert math.isclose(
            l1(problem, model(data[1].G_noisy), data[1].A), history["best_val_l1"], rel_tol=1e-12
        )


def test_batch_size_larger_than_the_training_set(problem, data):
    train, val = data
    model = FullyConnectedContinuation(problem, hidden=(8,))
    history = train_network(model, train, val, steps=3, lr=1e-3, batch_size=10_000, seed=0)
    assert history["step"] == [0, 1, 2, 3]


def test_progress_bar(problem, data):
    model = FullyConnectedContinuation(problem, hidden=(8,))
    history = train_network(model, *data, steps=3, lr=1e-3, batch_size=8, seed=0, progress=True)
    assert len(history["val_l1"]) == 4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"steps": 0}, "steps=0"),
        ({"steps": 2.0}, "steps=2.0"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": math.inf}, "lr=inf"),
        ({"lr": "1e-3"}, "lr='1e-3'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"seed": -3}, "seed=-3"),
        ({"loss": "residual"}, "loss='residual'"),
        ({"eval_every": 0}, "eval_every=0"),
    ],
)
def test_training_option_errors(problem, data, kwargs, message):
    model = FullyConnectedContinuation(problem, hidden=(8,))
    options = {"steps": 2, "lr": 1e-3, "batch_size": 8, "seed": 0, **kwargs}
    with pytest.raises(HypergradientError, match=message):
        train_network(model, *data, **options)


def test_training_data_errors(problem, data):
    train, val = data
    model = FullyConnectedContinuation(problem, hidden=(8,))
    options = {"steps": 2, "lr": 1e-3, "batch_size": 8, "seed": 0}
    other_grid = Problem(tau=tau_grid(10.0, N_TAU), beta=10.0, grid=uniform_grid(-8, 8, 61))
    other_tau = Problem(tau=tau_grid(10.0, 21), beta=10.0, grid=uniform_grid(-8, 8, N_W))
    wrong_w = make_dataset(other_grid, "gaussians", 4, 1e-3, seed=0)
    wrong_tau = make_dataset(other_tau, "gaussians", 4, 1e-3, seed=0)
    with pytest.raises(HypergradientError, match=r"train\.A has 61 frequencies"):
        train_network(model, wrong_w, val, **options)
    with pytest.raises(HypergradientError, match=r"val\.A has 61 frequencies"):
        train_network(model, train, wrong_w, **options)
    with pytest.raises(HypergradientError, match=r"train_network\(val\.G_noisy\): G has shape"):
        train_network(model, train, wrong_tau, **options)
    with pytest.raises(HypergradientError, match="train is a tuple"):
        train_network(model, (train.G_noisy, train.A), val, **options)
    empty = type(train)(
        A=train.A[:0], G=train.G[:0], G_noisy=train.G_noisy[:0], sigma=train.sigma[:0],
        family=[], rel_sigma=train.rel_sigma,
    )  # fmt: skip
    with pytest.raises(HypergradientError, match="val has no rows"):
        train_network(model, train, empty, **options)
    with pytest.raises(HypergradientError, match="expected a FullyConnectedContinuation"):
        train_network(torch.nn.Linear(N_TAU, N_W), train, val, **options)
