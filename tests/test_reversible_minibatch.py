"""Reversible learning as Maclaurin et al. (2015) ran it: mini-batch SGD with per-tensor
learning-rate and momentum schedules, per-layer initial scales and decays.  The reversal is
bit for bit at every step, the hypergradient equals reverse mode and central differences,
and a batch schedule that changes between the two passes (or NaN) is refused."""

import math

import pytest
import torch
import torch.nn.functional as F

import hypergradient as hg
from hypergradient.hypergrad import SeededBatches
from hypergradient.hypergrad.reversible import ExactMomentumSGD
from hypergradient.testing import finite_difference_hypergrad, relative_error

F64 = torch.float64
KEYS = ("W1", "b1", "W2", "b2")
KNOTS = 3


def _mlp(p, x):
    return torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


class _Problem:
    """A tanh MLP 3-3-2 (20 weights) trained on 24 examples in batches of 6, with one
    learning-rate and one momentum schedule per tensor (3 knots each, linear in between),
    learned initial scales of the two weight matrices and a decay per weight matrix."""

    def __init__(self, steps: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.steps = steps
        self.x = torch.randn(24, 3, generator=gen, dtype=F64)
        self.y = torch.randint(0, 2, (24,), generator=gen)
        self.xv = torch.randn(16, 3, generator=gen, dtype=F64)
        self.yv = torch.randint(0, 2, (16,), generator=gen)
        self.w1 = torch.randn(3, 3, generator=gen, dtype=F64) / math.sqrt(3)
        self.w2 = torch.randn(3, 2, generator=gen, dtype=F64) / math.sqrt(3)
        self.batches = SeededBatches(self.x, self.y, batch_size=6, seed=seed)
        self.hparams = {
            "log_lr": math.log(0.4) + 0.2 * torch.randn(4, KNOTS, generator=gen, dtype=F64),
            "logit_momentum": 1.5 + 0.3 * torch.randn(4, KNOTS, generator=gen, dtype=F64),
            "log_init_scale": torch.tensor([0.1, -0.2], dtype=F64),
            "log_decay": torch.tensor([-3.0, -2.5], dtype=F64),
        }

    def knot(self, h, name, i, t):
        """Schedule ``name`` of tensor ``i`` at step ``t``: the knots linearly interpolated."""
        pos = t * (KNOTS - 1) / max(self.steps - 1, 1)
        left = min(int(pos), KNOTS - 2)
        frac = pos - left
        return h[name][i, left] * (1 - frac) + h[name][i, left + 1] * frac

    @property
    def lr(self):
        return {
            k: (lambda h, t, i=i: self.knot(h, "log_lr", i, t).exp()) for i, k in enumerate(KEYS)
        }

    @property
    def momentum(self):
        return {
            k: (lambda h, t, i=i: torch.sigmoid(self.knot(h, "logit_momentum", i, t)))
            for i, k in enumerate(KEYS)
        }

    def params0(self, h):
        return {
            "W1": h["log_init_scale"][0].exp() * self.w1,
            "b1": torch.zeros(3, dtype=F64),
            "W2": h["log_init_scale"][1].exp() * self.w2,
            "b2": torch.zeros(2, dtype=F64),
        }

    def inner_loss(self, p, h, batch):
        x, y = batch
        decay = h["log_decay"].exp()
        penalty = decay[0] * p["W1"].pow(2).sum() + decay[1] * p["W2"].pow(2).sum()
        return F.cross_entropy(_mlp(p, x), y) + 0.5 * penalty

    def outer_loss(self, p, h):
        return F.cross_entropy(_mlp(p, self.xv), self.yv)

    def reversible(self, hparams=None, **overrides):
        kwargs = dict(
            inner_loss=self.inner_loss,
            outer_loss=self.outer_loss,
            params0=self.params0,
            hparams=self.hparams if hparams is None else hparams,
            steps=self.steps,
            lr=self.lr,
            momentum=self.momentum,
            batches=self.batches,
        )
        kwargs.update(overrides)
        return hg.reversible_hypergrad(**kwargs)

    def unrolled_loss(self, h):
        """E(w_T(h)) by plain float64 SGD-momentum on the same batches (differentiable)."""
        lr, momentum = self.lr, self.momentum
        p = self.params0(h)
        b = {k: torch.zeros_like(v) for k, v in p.items()}
        for t in range(self.steps):
            p = {k: v if v.requires_grad else v.requires_grad_(True) for k, v in p.items()}
            loss = self.inner_loss(p, h, self.batches(t))
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            b = {k: momentum[k](h, t) * b[k] + g for k, g in zip(p, grads)}
            p = {k: p[k] - lr[k](h, t) * b[k] for k in p}
        return self.outer_loss(p, h)


def test_seeded_batches_are_a_function_of_the_step_alone():
    x = torch.arange(20.0, dtype=F64).reshape(10, 2)
    y = torch.arange(10)
    batches = SeededBatches(x, y, batch_size=3, seed=5)
    forward = [batches(t) for t in range(9)]
    for t in reversed(range(9)):  # the reverse pass's order: the same bits
        xb, yb = batches(t)
        assert torch.equal(xb, forward[t][0]) and torch.equal(yb, forward[t][1])
        assert torch.equal(xb, x[yb])  # rows stay paired with their labels
    # each epoch (3 batches of 3) draws 9 distinct examples; epochs are shuffled differently
    epochs = [torch.cat([forward[3 * e + i][1] for i in range(3)]) for e in range(3)]
    assert all(len(set(e.tolist())) == 9 for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])
    other = SeededBatches(x, y, batch_size=3, seed=6)
    assert not all(torch.equal(other(t)[1], forward[t][1]) for t in range(3))


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        ((), {"batch_size": 2}, r"expected the data as one or more tensors"),
        ((torch.zeros(4), torch.zeros(3)), {"batch_size": 2}, r"share a first dimension"),
        ((torch.zeros(4),), {"batch_size": 5}, r"batch_size=5; expected an int in \[1, N=4\]"),
        ((torch.zeros(4),), {"batch_size": 2, "seed": -1}, r"seed=-1; expected an int >= 0"),
    ],
)
def test_seeded_batches_bad_input(args, kwargs, pattern):
    with pytest.raises(hg.HypergradientError, match=pattern):
        SeededBatches(*args, **kwargs)
    with pytest.raises(hg.HypergradientError, match=r"step must be an int >= 0, got -1"):
        SeededBatches(torch.zeros(4), batch_size=2)(-1)


def test_minibatch_reversal_is_bit_exact_at_every_step_with_per_layer_schedules(monkeypatch):
    # Record the integer state (weights, velocity) of every tensor before each forward step
    # and after each reverse step: all T states must come back bit for bit.  (The 1,000-step
    # run on an MNIST MLP is in benchmarks/reversible_minibatch.py.)
    problem = _Problem(steps=120)
    forward, reverse = {}, {}
    step_fixed, undo_fixed = ExactMomentumSGD.step_fixed, ExactMomentumSGD.undo_velocity_fixed

    def recording_step(self, state, g, t):
        forward[id(self), t] = (state.w.clone(), state.b.clone())
        step_fixed(self, state, g, t)

    def recording_undo(self, state, g, t):
        undo_fixed(self, state, g, t)
        reverse[id(self), t] = (state.w.clone(), state.b.clone())

    monkeypatch.setattr(ExactMomentumSGD, "step_fixed", recording_step)
    monkeypatch.setattr(ExactMomentumSGD, "undo_velocity_fixed", recording_undo)
    result = problem.reversible()
    assert len(forward) == 4 * problem.steps  # one exact optimizer per tensor
    assert forward.keys() == reverse.keys()
    for key, (w, b) in forward.items():
        assert torch.equal(reverse[key][0], w) and torch.equal(reverse[key][1], b), key
    # the momenta (about 0.8 here) lose log2(1/mu) bits per weight and step; the buffer
    # holds them, plus a one-off of a few bits per weight, and the 4 tensors' buffers
    # together stay far below the trajectory
    stats = result.stats
    # the one-off per weight: about log2(M) bits of the precision M >= 16 d that a
    # fraction n/d (d <= 2**20) is coded with (see InfoBuffer), spread over the steps
    slack = 32 / problem.steps
    assert stats.expected_bits_per_weight_per_step - 0.01 < stats.bits_per_weight_per_step
    assert stats.bits_per_weight_per_step < stats.expected_bits_per_weight_per_step + slack
    assert stats.buffer_bytes * 20 < stats.trajectory_bytes


def test_minibatch_per_layer_hypergrad_equals_reverse_mode_and_finite_differences():
    problem = _Problem(steps=12)
    result = problem.reversible()
    assert set(result.hypergrad) == set(problem.hparams)
    hp = {k: v.clone().requires_grad_(True) for k, v in problem.hparams.items()}
    reverse = dict(zip(hp, torch.autograd.grad(problem.unrolled_loss(hp), list(hp.values()))))
    # The fixed-point run differs from float64 by one grid unit (2**-52) per operation and
    # by the momentum fractions n/d (d <= 2**20: |mu - n/d| ~ 1e-12): far below 1e-8.
    assert relative_error(result.hypergrad, reverse) < 1e-8
    for key in problem.hparams:  # every kind of hyperparameter, not only the largest
        assert relative_error({key: result.hypergrad[key]}, {key: reverse[key]}) < 1e-8, key

    def response(h):
        with torch.enable_grad():  # the inner gradients need autograd, whatever the caller
            return problem.unrolled_loss(h).detach()

    # central differences: truncation eps**2 * |f'''| ~ 1e-10, round-off 1e-16 / eps ~ 1e-11
    fd = finite_difference_hypergrad(response, problem.hparams, eps=1e-5)
    assert relative_error(result.hypergrad, fd) < 1e-6


def test_global_and_per_tensor_schedules_agree_when_the_schedules_are_equal():
    # A dict that gives every tensor the same hparams key is the global schedule: the same
    # weights bit for bit and the same hypergradient, the per-tensor adjoints summed.
    problem = _Problem(steps=10)
    hparams = {"lr": torch.tensor(0.3, dtype=F64), "mu": torch.tensor(0.85, dtype=F64)}
    hparams.update({k: problem.hparams[k] for k in ("log_init_scale", "log_decay")})
    common = problem.reversible(hparams, lr="lr", momentum="mu")
    split = problem.reversible(hparams, lr=dict.fromkeys(KEYS, "lr"), momentum={
        k: "mu" for k in KEYS})  # fmt: skip
    for key in KEYS:
        assert torch.equal(common.params[key], split.params[key])
    assert relative_error(split.hypergrad, common.hypergrad) < 1e-12


def test_error_batch_schedule_that_changes_between_the_passes():
    problem = _Problem(steps=6)

    def unseeded(t):  # drawn from the global random state: other batches the second time
        idx = torch.randint(0, 24, (6,))
        return problem.x[idx], problem.y[idx]

    with pytest.raises(hg.HypergradientError, match=r"batches\(5\) returned another batch in "
                       r"the reverse pass.*SeededBatches"):  # fmt: skip
        problem.reversible(batches=unseeded)

    seen = []

    def iterator_like(t):  # a stream: batch t is whatever comes next
        seen.append(t)
        return problem.batches(len(seen) - 1)

    with pytest.raises(hg.HypergradientError, match=r"batches\(5\) returned another batch"):
        problem.reversible(batches=iterator_like)


def test_error_nan():
    problem = _Problem(steps=4)
    bad_x = problem.x.clone()
    bad_x[problem.batches.indices(2)[1]] = float("nan")
    nan_batches = SeededBatches(bad_x, problem.y, batch_size=6, seed=0)
    with pytest.raises(hg.HypergradientError, match=r"batches\(2\)\[0\] \(shape \(6, 3\)\) "
                       r"contains 3 NaN/inf"):  # fmt: skip
        problem.reversible(batches=nan_batches)
    nan_hparams = dict(problem.hparams, log_decay=torch.tensor([-3.0, math.nan], dtype=F64))
    with pytest.raises(hg.HypergradientError, match=r"hparams\['log_decay'\].*NaN/inf"):
        problem.reversible(nan_hparams)
    nan_lr = dict(problem.lr, b1=lambda h, t: torch.tensor(math.nan, dtype=F64))
    with pytest.raises(hg.HypergradientError, match=r"lr\['b1'\] at step 0 is nan"):
        problem.reversible(lr=nan_lr)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"lr": {"W1": 0.1, "b1": 0.1}}, r"lr is a dict of per-tensor schedules.*no entry for "
         r"\['W2', 'b2'\]"),
        ({"momentum": {**dict.fromkeys(KEYS, 0.9), "W3": 0.9}}, r"unknown keys \['W3'\]"),
        ({"momentum": {**dict.fromkeys(KEYS, 0.9), "b2": 1.5}}, r"momentum\['b2'\] at step 0 "
         r"is 1.5; reversible mode needs momenta in \[0, 1\]"),
        ({"batches": [1, 2]}, r"batches must be a callable t -> batch"),
        ({"inner_loss": lambda p, h: p["b1"].sum()}, r"inner_loss is called as inner_loss\("
         r"params, hparams, batch\).*takes \(p, h\)"),
    ],
)  # fmt: skip
def test_error_bad_input(overrides, pattern):
    with pytest.raises(hg.HypergradientError, match=pattern):
        _Problem(steps=3).reversible(**overrides)


def test_error_non_deterministic_minibatch_loss_names_the_step():
    problem = _Problem(steps=5)

    def noisy(p, h, batch):  # the batch is the same, the loss is not
        return problem.inner_loss(p, h, batch) + 1e-3 * torch.randn(()) * p["b2"].sum()

    with pytest.raises(hg.HypergradientError, match=r"did not reconstruct the gradient of step "
                       r"4 exactly.*deterministic"):  # fmt: skip
        problem.reversible(inner_loss=noisy)


# ----------------------------------------------------------------------------- the recipe

TINY_MINIBATCH = ["hidden=5", "n_train=40", "n_val=30", "steps=8", "knots=3", "hyper_steps=2",
                  "batch_size=10", "per_layer=true", "init_decay=1e-3", "hyper_lr=0.1"]  # fmt: skip


def test_lr_schedule_recipe_learns_per_layer_schedules_on_minibatches(tmp_path):
    import json

    from hypergradient.cli import main
    from hypergradient.recipes.lr_schedule import LRScheduleConfig, Problem, initial_hparams

    out = tmp_path / "run"
    assert main(["lr-schedule", "--out", str(out), "--no-progress", "--set", *TINY_MINIBATCH]) == 0
    results = json.loads((out / "results.json").read_text())
    schedules = results["schedules"]
    assert set(schedules["learned_lr"]) == set(KEYS)  # one schedule per tensor
    assert all(len(v) == 8 for v in schedules["learned_momentum"].values())
    assert len(schedules["learned_init_scale"]) == len(schedules["learned_decay"]) == 2
    assert schedules["learned_decay"] != schedules["initial_decay"]
    assert results["learned"]["val_loss"] < results["initial"]["val_loss"]
    assert (out / "schedules.png").stat().st_size > 10_000

    # the recipe's hypergradient through its mini-batch run is the reverse-mode one
    config = LRScheduleConfig(
        hidden=4, n_train=30, n_val=20, steps=8, knots=2, batch_size=6, per_layer=True,
        init_decay=1e-3,
    )  # fmt: skip
    problem = Problem(config)
    hparams = initial_hparams(config)
    hparams["log_lr"] = hparams["log_lr"] + 0.1 * torch.arange(8, dtype=F64).reshape(4, 2)
    result = problem.hypergrad(hparams)
    hp = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
    p = {k: v.requires_grad_(True) for k, v in problem.params0(hp).items()}
    b = {k: torch.zeros_like(v) for k, v in p.items()}
    for t in range(config.steps):
        grads = torch.autograd.grad(
            problem.batch_loss(p, hp, problem.batches(t)), list(p.values()), create_graph=True
        )
        # two knots: log lr and logit momentum linear from the first to the second
        frac = t / (config.steps - 1)
        lr = (hp["log_lr"][:, 0] * (1 - frac) + hp["log_lr"][:, 1] * frac).exp()
        mu = torch.sigmoid(
            hp["logit_momentum"][:, 0] * (1 - frac) + hp["logit_momentum"][:, 1] * frac
        )
        b = {k: mu[i] * b[k] + g for i, (k, g) in enumerate(zip(KEYS, grads))}
        p = {k: p[k] - lr[i] * b[k] for i, k in enumerate(KEYS)}
    expected = dict(zip(hp, torch.autograd.grad(problem.outer_loss(p, hp), list(hp.values()))))
    assert relative_error(result.hypergrad, expected) < 1e-8


def test_lr_schedule_recipe_without_mnist_files_says_what_to_fetch(tmp_path, capsys):
    from hypergradient.cli import main

    out = tmp_path / "run"
    args = ["--set", "dataset=mnist", f"data_dir={tmp_path}", "hyper_steps=1"]
    assert main(["lr-schedule", "--out", str(out), "--no-progress", *args]) != 0
    err = capsys.readouterr().err.strip()
    assert "lr-schedule with dataset=mnist needs MNIST" in err and "train-images-idx3" in err
    assert "'download' = False" in err
