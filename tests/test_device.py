"""Device portability: every hypergradient lands on the inputs' device and equals the CPU's.

The ``cpu`` cases always run (they check that nothing moves to another device); the ``cuda``
cases run where a GPU is present (skipped in CI, which has none) and compare against the
same computation on the CPU in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg
from hypergradient.testing import logistic_problem, ridge_problem

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


def _assert_on(tree: dict, device: str) -> None:
    for k, v in tree.items():
        assert v.device.type == device, (k, v.device)


def _close_to_cpu(tree: dict, reference: dict, rtol: float = 1e-9) -> None:
    for k in reference:
        torch.testing.assert_close(tree[k].cpu(), reference[k], rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["exact", "cg", "neumann", "minres", "gmres"])
def test_implicit_hypergrad_on_device(device, solver):
    options = {"max_steps": 200, "tol": 1e-12} if solver != "exact" else {}
    if solver == "neumann":
        options = {"max_steps": 3000, "tol": 1e-13}
    results = []
    for where in ("cpu", device):
        problem = logistic_problem(device=where)
        results.append(
            hg.implicit_hypergrad(
                problem.inner_loss,
                problem.outer_loss,
                problem.params,
                problem.hparams,
                solver=solver,
                **options,
            )
        )
    _assert_on(results[1], device)
    _close_to_cpu(results[1], results[0], rtol=1e-7)
    exact = logistic_problem().hypergrad
    assert hg.testing.relative_error({k: v.cpu() for k, v in results[1].items()}, exact) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_unrolled_hypergrad_on_device(device, mode):
    results = []
    for where in ("cpu", device):
        problem = ridge_problem(device=where)
        w0 = {"w": torch.zeros_like(problem.params["w"])}
        results.append(
            hg.unrolled_hypergrad(
                problem.inner_loss,
                problem.outer_loss,
                w0,
                problem.hparams,
                steps=20,
                lr=0.5,
                momentum=0.5,
                mode=mode,
            )
        )
    _assert_on(results[1], device)
    _close_to_cpu(results[1], results[0])


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_hypergradient_on_device(device):
    gen = torch.Generator(device="cpu").manual_seed(5)
    x, y = torch.randn(30, 4, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    xv, yv = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    grads = []
    for where in ("cpu", device):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(where)
        trainer = hg.BilevelTrainer(
            model,
            hg.hparams.WeightDecay("per_weight", initial=0.05),
            [(x.to(where), y.to(where))],
            [(xv.to(where), yv.to(where))],
            torch.optim.SGD(model.parameters(), lr=0.2),
            method=hg.Implicit(),  # Neumann, as the recipes use it
            criterion=F.cross_entropy,
        )
        trainer.inner_steps(5)
        g, _ = trainer.hypergradient()
        grads.append(g)
        trainer.step()  # an outer step runs end to end on the device
        _assert_on(trainer.hparams, where)
    _assert_on(grads[1], device)
    _close_to_cpu(grads[1], grads[0], rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "adagrad"])
def test_functional_optimizer_step_on_device(device, name):
    info = hg.diffopt.OPTIMIZERS[name]
    config = info.configs[-1]
    updated = []
    for where in ("cpu", device):
        gen = torch.Generator(device="cpu").manual_seed(1)
        params = {"w": torch.randn(5, generator=gen).to(where)}
        grads = {"w": torch.randn(5, generator=gen).to(where)}
        tx = info.factory(**config)
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, params)
            params = hg.diffopt.apply_updates(params, updates)
        updated.append(params)
    _assert_on(updated[1], device)
    _close_to_cpu(updated[1], updated[0])
