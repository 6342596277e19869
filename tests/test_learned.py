"""Learned optimizers: architectures, tasks, meta-training.

* As a ``torch.optim`` optimizer (param groups, ``state_dict``) the learned optimizer
  matches its functional update step by step, for both architectures.
* The output parametrisation ``scale_dir * d * exp(scale_mag * m)``: zero output layer, zero
  update; linear in ``scale_dir``; log-linear in ``m`` with slope ``scale_mag``.
* The per-parameter features are invariant to the scale of the gradients; the hierarchical
  optimizer reads the losses.
* Every task family's loss falls under Adam; the unrolled system runs under vmap.
* Meta-training with each estimator lowers the meta-loss on a tiny quadratic family;
  checkpoint/resume reproduces an uninterrupted run bit for bit; bad inputs raise
  ``HypergradientError`` with a message saying what to do.
"""

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _readme
import hypergradient as hg
from _datasets import DATASETS, needs_mnist
from hypergradient import learned
from hypergradient.estimators import PES

ARCHS = {
    "mlp": lambda: learned.MLPLearnedOptimizer(hidden=8),
    "lstm": lambda: learned.HierarchicalLearnedOptimizer(hidden=8, rnn_hidden=6, cond=3),
    "gru": lambda: learned.HierarchicalLearnedOptimizer(hidden=8, rnn_hidden=6, cond=3, cell="gru"),
}


def _random_theta(lopt, seed=1, scale=0.3):
    """Initial theta plus noise everywhere (the zero output layer would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    theta = lopt.init(gen)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in theta.items()}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batch(t):
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)


# ------------------------------------------------------------------------- torch.optim


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_torch_optim_matches_functional_update_step_by_step(arch):
    lopt = ARCHS[arch]()
    theta = _random_theta(lopt)
    model = _model()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    groups = [
        {"params": [model[0].weight, model[0].bias]},
        {"params": [model[2].weight, model[2].bias]},
    ]
    opt = lopt.opt_fn(theta)(groups, num_steps=6)
    state = lopt.init_state(params)
    for t in range(6):
        x, y = _batch(t)
        valid = torch.tensor(0.5 + 0.1 * t)  # a validation loss the hierarchical one reads
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss, valid_loss=valid)

        def f(p, x=x, y=y):
            return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

        grads, ref_loss = torch.func.grad_and_value(f)(params)
        inputs = learned.step_inputs(t / 6, ref_loss, valid)
        updates, state = lopt.update(theta, grads, params, state, inputs)
        params = {k: params[k] + updates[k] for k in params}
        for k, p in model.named_parameters():
            # the same float64 operations in the same order: equal to rounding
            torch.testing.assert_close(p.detach(), params[k], rtol=1e-12, atol=1e-14)
        assert max(u.abs().max() for u in updates.values()) > 1e-4  # it does move


@pytest.mark.parametrize("arch", ["mlp", "lstm"])
def test_state_dict_round_trip_continues_identically(arch):
    lopt = ARCHS[arch]()
    theta = _random_theta(lopt)
    model = _model()
    opt = lopt.opt_fn(theta)(model.parameters(), num_steps=8)

    def train(m, o, steps):
        for t in steps:
            x, y = _batch(t)
            o.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step(loss=loss)

    train(model, opt, range(3))
    # the optimizer never mutates its state tensors, so its state_dict is a snapshot; the
    # model's parameters are updated in place, so copy them
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), opt.state_dict()
    assert "global" in saved_opt["state"]  # step counter and loss statistics
    train(model, opt, range(3, 6))

    other = _model()
    other.load_state_dict(saved_model)
    other_opt = lopt.opt_fn(theta)(other.parameters(), num_steps=8)
    other_opt.load_state_dict(saved_opt)
    train(other, other_opt, range(3, 6))
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_group_lr_multiplies_the_update_and_closure_gives_the_loss():
    lopt = learned.MLPLearnedOptimizer(hidden=8)
    theta = _random_theta(lopt)
    x, y = _batch(0)
    updates = []
    for lr in (1.0, 0.5, 0.0):
        model = _model()
        before = [p.detach().clone() for p in model.parameters()]
        opt = lopt.opt_fn(theta)(model.parameters(), num_steps=5, lr=lr)

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert torch.isclose(loss, F.cross_entropy(_model()(x), y))
        updates.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    for full, half, zero in zip(*updates):
        torch.testing.assert_close(half, 0.5 * full)
        assert torch.equal(zero, torch.zeros_like(zero))


def test_parameters_without_gradient_are_left_alone():
    lopt = learned.MLPLearnedOptimizer(hidden=8)
    model = _model()
    opt = lopt.opt_fn(_random_theta(lopt))(model.parameters(), num_steps=5)
    frozen = model[2].weight.detach().clone()
    x, _ = _batch(0)
    model[0](x).sum().backward()  # only the first layer gets gradients
    opt.step()
    assert torch.equal(model[2].weight, frozen)
    assert model[2].weight not in opt.state and model[0].weight in opt.state


# ------------------------------------------------------------------------- output scales


def _single_update(lopt, theta, grad_scale=1.0, steps=1):
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    state = lopt.init_state(params)
    for t in range(steps):
        grads = {k: grad_scale * torch.randn(v.shape, generator=gen) for k, v in params.items()}
        updates, state = lopt.update(theta, grads, params, state, learned.step_inputs(t / 10))
        params = {k: params[k] + updates[k] for k in params}
    return updates


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_initial_theta_gives_the_zero_update(arch):
    lopt = ARCHS[arch]()
    updates = _single_update(lopt, lopt.init(torch.Generator().manual_seed(0)), steps=3)
    assert all(torch.equal(u, torch.zeros_like(u)) for u in updates.values())


def _constant_output(lopt, direction, magnitude):
    """theta whose MLP outputs exactly (direction, magnitude) everywhere."""
    theta = lopt.init(torch.Generator().manual_seed(0))
    theta["mlp.b3"] = torch.tensor([direction, magnitude])
    return theta


@pytest.mark.parametrize("scale_dir", [1e-3, 1e-2])
@pytest.mark.parametrize("scale_mag", [1e-3, 1e-1])
def test_output_parametrisation_scales(scale_dir, scale_mag):
    lopt = learned.MLPLearnedOptimizer(hidden=8, scale_dir=scale_dir, scale_mag=scale_mag)
    for d, m in [(1.0, 0.0), (-2.0, 0.0), (1.0, 5.0), (1.0, -30.0)]:
        updates = _single_update(lopt, _constant_output(lopt, d, m))
        expected = scale_dir * d * math.exp(scale_mag * m)  # Delta = a d exp(b m)
        for u in updates.values():
            torch.testing.assert_close(u, torch.full_like(u, expected), rtol=1e-12, atol=0)
    # a meta-step of 1 on the magnitude changes the step by exp(scale_mag) only: stable
    small = _single_update(lopt, _constant_output(lopt, 1.0, 0.0))["w"]
    moved = _single_update(lopt, _constant_output(lopt, 1.0, 1.0))["w"]
    torch.testing.assert_close(moved / small, torch.full_like(small, math.exp(scale_mag)))


def test_hierarchical_per_tensor_magnitude_adds_to_the_mlp_magnitude():
    lopt = learned.HierarchicalLearnedOptimizer(hidden=8, rnn_hidden=6, cond=3, scale_mag=0.1)
    theta = _constant_output(lopt, 1.0, 2.0)
    theta["rnn.b_out"] = torch.tensor([0.0, 0.0, 0.0, 3.0])  # last entry: tensor magnitude
    updates = _single_update(lopt, theta)
    expected = lopt.scale_dir * math.exp(0.1 * (2.0 + 3.0))
    for u in updates.values():
        torch.testing.assert_close(u, torch.full_like(u, expected))


# ------------------------------------------------------------------------- features


def test_mlp_updates_do_not_depend_on_the_gradient_scale():
    lopt = learned.MLPLearnedOptimizer(hidden=8)
    theta = _random_theta(lopt)
    base = _single_update(lopt, theta, grad_scale=1.0, steps=4)
    for scale in (0.1, 10.0, 1e3):
        scaled = _single_update(lopt, theta, grad_scale=scale, steps=4)
        for k in base:
            # exact but for the 1e-12 added to the mean squares: the smallest feature, the
            # 0.999-momentum after 4 steps, is about 0.004 * scale (mean square ~1e-7 at
            # scale 0.1); measured relative differences: 4e-5 at 0.1, 4e-7 at 10 and 1e3
            torch.testing.assert_close(scaled[k], base[k], rtol=1e-4, atol=1e-12)


def test_second_moment_normalize_is_scale_invariant_per_column():
    x = torch.randn(50, 3)
    y = x * torch.tensor([1e-2, 1.0, 1e3])
    torch.testing.assert_close(
        learned.second_moment_normalize(x), learned.second_moment_normalize(y), rtol=1e-4, atol=0
    )
    assert torch.allclose(learned.second_moment_normalize(x).square().mean(0), torch.ones(3))


def test_loss_features_track_first_minimum_and_unknown_losses():
    stats = torch.zeros(4)
    f, stats = learned.loss_features(torch.tensor(2.0), stats)
    torch.testing.assert_close(f, torch.tensor([0.0, 0.0, 0.0, 1.0]))  # first sighting
    f, stats = learned.loss_features(torch.tensor(1.0), stats)
    log2 = math.log(2.0)
    # [l - first, l - min, l - ema], ema was log 2
    torch.testing.assert_close(f, torch.tensor([-log2, 0.0, -log2, 1.0]))
    f_nan, stats_nan = learned.loss_features(torch.tensor(float("nan")), stats)
    torch.testing.assert_close(f_nan, torch.zeros(4))
    torch.testing.assert_close(stats_nan, stats)
    f, _ = learned.loss_features(torch.tensor(1e6), stats)
    assert f[0] == 5.0  # clipped


def test_hierarchical_reads_the_validation_loss_and_the_mlp_does_not():
    for arch, reads in (("lstm", True), ("mlp", False)):
        lopt = ARCHS[arch]()
        theta = _random_theta(lopt)
        params = {"w": torch.ones(3, 2)}
        grads = {"w": torch.arange(6.0).reshape(3, 2)}
        state = lopt.init_state(params)
        a, _ = lopt.update(theta, grads, params, state, learned.step_inputs(0.1, 1.0, None))
        b, _ = lopt.update(theta, grads, params, state, learned.step_inputs(0.1, 1.0, 3.0))
        assert (not torch.equal(a["w"], b["w"])) == reads, arch


# ------------------------------------------------------------------------- tasks


FAMILIES = {
    "digits-mlp": lambda: learned.ClassifierFamily(width=16, batch_size=32, num_examples=256),
    "digits-cnn": lambda: learned.ClassifierFamily(
        model="cnn", width=4, batch_size=32, num_examples=256
    ),
    "digits-mlp-deep-tanh": lambda: learned.ClassifierFamily(
        width=16, depth=2, activation="tanh", num_examples=256
    ),
    "quadratic": lambda: learned.NoisyQuadraticFamily(dim=10),
    "fredholm": lambda: learned.FredholmFamily(n=24),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_task_losses_decrease_under_adam(name):
    family = FAMILIES[name]()
    tasks = learned.sample_tasks(family, 2, 60, seed=0)
    final = learned.evaluate_adam(tasks, 3e-2, 60)
    for task, loss in zip(tasks, final.final_losses):
        initial = float(task.eval_loss(task.params))
        # classifiers start near log(10) = 2.3 and reach < 1 in 60 steps; the quadratic
        # and the inverse problem lose more than half of their initial loss
        assert loss < 0.5 * initial, (name, initial, loss)


@needs_mnist
def test_mnist_family_when_the_files_are_there():
    family = learned.ClassifierFamily(
        "mnist", width=16, data_dir=DATASETS, downsample=2, num_examples=256
    )
    tasks = learned.sample_tasks(family, 1, 40, seed=0)
    assert learned.evaluate_adam(tasks, 3e-2, 40).final_losses[0] < 1.5


def test_tasks_are_seeded_and_modules_match_the_functional_loss():
    family = FAMILIES["digits-cnn"]()
    a, b = (learned.sample_tasks(family, 2, 5, seed=7) for _ in range(2))
    for s, t in zip(a, b):
        assert all(torch.equal(s.data[k], t.data[k]) for k in s.data)
        assert all(torch.equal(s.params[k], t.params[k]) for k in s.params)
    assert not torch.equal(a[0].data["batches"], a[1].data["batches"])
    task = a[0]
    idx = task.data["examples"]
    x, y = family._pool[0][idx], family._pool[1][idx]
    torch.testing.assert_close(F.cross_entropy(task.module()(x), y), task.eval_loss(task.params))
    with pytest.raises(hg.HypergradientError, match="not a network"):
        learned.sample_tasks(FAMILIES["quadratic"](), 1, 5, seed=0)[0].module()


def test_fredholm_problem_is_ill_conditioned():
    family = learned.FredholmFamily(n=32)
    s = torch.linalg.svdvals(family.kernel(0.05))
    # rows sum to about 1; the singular values decay like exp(-2 (pi k l)^2): k = 16 at
    # l = 0.05 gives 3e-6
    assert s[0] < 1.1 and s[0] / s[-1] > 1e4


@pytest.mark.parametrize("arch", ["mlp", "lstm"])
def test_unrolled_system_runs_the_same_under_vmap(arch):
    lopt = ARCHS[arch]()
    theta = _random_theta(lopt, scale=0.1)
    system = FAMILIES["digits-mlp"]().unrolled_system(lopt, horizon=6, meta_loss="valid")
    grads = []
    for vectorize in (False, True):
        est = PES(system, sigma=0.01, num_pairs=2, truncation_length=3, vectorize=vectorize)
        gen = torch.Generator().manual_seed(0)
        state = est.init(theta, gen)
        out, state = est.estimate(theta, state, gen)
        grads.append(out.grad)
    for k in theta:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-8, atol=1e-10)


def test_clipped_log_loss_caps_divergence():
    cap = torch.tensor(1.0)
    assert learned.clipped_log_loss(torch.tensor(float("nan")), cap) == 1.0
    assert learned.clipped_log_loss(torch.tensor(1e9), cap) == 1.0
    assert learned.clipped_log_loss(torch.tensor(0.5), cap) == math.log(0.5)
    assert learned.clipped_log_loss(torch.tensor(0.0), cap) == math.log(1e-8)


# ------------------------------------------------------------------------- meta-training


def _tiny_run(estimator, num_steps, **kwargs):
    lopt = learned.MLPLearnedOptimizer(hidden=8)
    family = learned.NoisyQuadraticFamily(dim=4, condition=10.0, noise=0.0)
    schedule = learned.TruncationSchedule(horizon=10, truncation_length=5)
    options = {"num_pairs": 4, "meta_lr": 3e-2, "sigma": 0.05, "schedule": schedule} | kwargs
    return (
        lopt,
        family,
        learned.meta_train(lopt, [family], num_steps, estimator=estimator, **options),
    )


@pytest.mark.parametrize("estimator", learned.ESTIMATORS)
def test_meta_training_with_each_estimator_reduces_the_meta_loss(estimator):
    lopt, family, result = _tiny_run(estimator, 40)
    # the meta-loss on fixed held-out tasks: mean log loss after 10 steps
    tasks = learned.sample_tasks(family, 8, 10, seed=99)
    before = learned.evaluate_learned(lopt, result.initial_theta, tasks, 10)
    after = learned.evaluate_learned(lopt, result.theta, tasks, 10)
    # the initial optimizer is the zero update (loss unchanged); 40 meta-steps of any
    # estimator find descent: at least 25% lower loss (measured: the final loss is 0.02x
    # the initial with tbptt, 0.04x mixed, 0.53x ES, 0.60x PES)
    assert after.mean < 0.75 * before.mean, (estimator, before.mean, after.mean)
    assert len(result.history) == 40 and {r["family"] for r in result.history} == {family.name}


def test_growing_horizon_schedule():
    s = learned.TruncationSchedule(horizon=50, truncation_length=10, initial_horizon=10,
                                   growth_steps=40)  # fmt: skip
    horizons = [s.at(i)[0] for i in range(0, 60, 5)]
    assert horizons[0] == 10 and horizons[-1] == 50
    assert horizons == sorted(horizons) and all(h % 10 == 0 for h in horizons)
    assert learned.TruncationSchedule(horizon=8, truncation_length=8).at(3) == (8, 8)
    _, _, result = _tiny_run("pes", 6, schedule=learned.TruncationSchedule(
        horizon=10, truncation_length=5, initial_horizon=5, growth_steps=4))  # fmt: skip
    assert [r["horizon"] for r in result.history] == [5, 5, 10, 10, 10, 10]


def test_meta_train_accepts_an_estimator_factory():
    made = []

    def factory(system, truncation_length):
        made.append((system.horizon, truncation_length))
        return PES(system, sigma=0.05, num_pairs=2, truncation_length=truncation_length)

    _, family, result = _tiny_run(factory, 4, vectorize=False)
    assert made == [(10, 5)]  # one estimator per (family, horizon, truncation), reused
    assert len(result.history) == 4 and all(math.isfinite(r["loss"]) for r in result.history)


@pytest.mark.parametrize("estimator", ["pes", "tbptt"])
def test_checkpoint_resume_reproduces_an_uninterrupted_run(tmp_path, estimator):
    suite = [
        learned.NoisyQuadraticFamily(dim=4, condition=10.0),
        learned.FredholmFamily(n=8),
    ]
    lopt = learned.MLPLearnedOptimizer(hidden=8)
    schedule = learned.TruncationSchedule(horizon=6, truncation_length=4)
    options = {"estimator": estimator, "num_pairs": 2, "schedule": schedule, "seed": 5}
    full = learned.meta_train(lopt, suite, 7, checkpoint=tmp_path / "full.pt", **options)

    def stop_after_three(step, record, theta):
        return step == 2

    path = tmp_path / "cut.pt"
    first = learned.meta_train(lopt, suite, 7, checkpoint=path, callback=stop_after_three,
                               **options)  # fmt: skip
    assert len(first.history) == 3
    history = tmp_path / "history.json"
    plot = tmp_path / "meta_loss.png"
    resumed = learned.meta_train(
        lopt, suite, 7, checkpoint=path, resume=True, history_path=history, plot_path=plot,
        **options,
    )  # fmt: skip
    for k in full.theta:
        assert torch.equal(full.theta[k], resumed.theta[k]), k
    assert [r["loss"] for r in full.history] == [r["loss"] for r in resumed.history]
    assert len(json.loads(history.read_text())) == 7
    assert plot.stat().st_size > 1000
    # a checkpoint from other options is refused
    with pytest.raises(hg.HypergradientError, match=r"other options \(meta_lr differ"):
        learned.meta_train(lopt, suite, 8, checkpoint=path, resume=True,
                           meta_lr=0.1, **options)  # fmt: skip


# ------------------------------------------------------------------------- errors


def _error_cases():
    mlp = learned.MLPLearnedOptimizer(hidden=8)
    theta = mlp.init(torch.Generator().manual_seed(0))
    quad = learned.NoisyQuadraticFamily(dim=3)
    params = [nn.Parameter(torch.zeros(2))]
    return [
        (lambda: learned.MLPLearnedOptimizer(scale_dir=0.0), r"scale_dir must be a finite"),
        (lambda: learned.MLPLearnedOptimizer(scale_mag=float("inf")), r"scale_mag must be"),
        (lambda: learned.MLPLearnedOptimizer(decays=(0.9, 1.0)), r"decays must be .* \[0, 1\)"),
        (lambda: learned.MLPLearnedOptimizer(hidden=0), r"hidden must be an int >= 1"),
        (lambda: learned.HierarchicalLearnedOptimizer(cell="rnn"), r"cell must be 'lstm'"),
        (
            lambda: learned.HierarchicalLearnedOptimizer().opt_fn(theta),
            r"theta` does not fit this HierarchicalLearnedOptimizer: missing keys \['rnn",
        ),
        (
            lambda: learned.MLPLearnedOptimizer(hidden=4).opt_fn(theta),
            r"theta\['mlp.w1'\] has shape \(22, 8\), .* expects \(22, 4\)",
        ),
        (lambda: mlp.opt_fn(theta)(params), r"pass num_steps=<planned number"),
        (lambda: mlp.opt_fn(theta)(params, num_steps=0), r"num_steps must be an int >= 1"),
        (lambda: mlp.opt_fn(theta)(params, num_steps=5, lr=-1.0), r"lr \(update multiplier\)"),
        (lambda: learned.LearnedOptim(params, "adam", theta), r"must be an AbstractLearned"),
        (lambda: mlp.init_state({}), r"params` must be a non-empty dict"),
        (lambda: learned.ClassifierFamily(dataset="cifar"), r"dataset must be one of"),
        (lambda: learned.ClassifierFamily(model="rnn"), r"model must be 'mlp' or 'cnn'"),
        (lambda: learned.ClassifierFamily(width=0), r"width must be an int >= 1"),
        (lambda: learned.ClassifierFamily(num_examples=5000), r"exceeds the training pool"),
        (
            lambda: learned.ClassifierFamily("mnist", data_dir="/nonexistent/hg"),
            r"dataset 'mnist' is not available",
        ),
        (lambda: learned.NoisyQuadraticFamily(condition=0.5), r"condition must be >= 1"),
        (lambda: learned.NoisyQuadraticFamily(noise=-1.0), r"noise must be a finite number >= 0"),
        (lambda: learned.FredholmFamily(kernel_widths=(0.1, 0.01)), r"kernel_widths must be"),
        (lambda: quad.sample(0, 5), r"generator` must be a torch.Generator"),
        (lambda: quad.sample(torch.Generator(), 0), r"num_steps must be an int >= 1"),
        (lambda: learned.InnerTrainingSystem(quad, mlp, 5, "test"), r"meta_loss must be one of"),
        (lambda: learned.InnerTrainingSystem("quad", mlp, 5), r"family must be an Abstract"),
        (lambda: learned.InnerTrainingSystem(quad, "adam", 5), r"optimizer must be an Abstract"),
        (lambda: learned.TruncationSchedule(10, 20), r"truncation_length=20 exceeds horizon=10"),
        (lambda: learned.TruncationSchedule(10, 5, initial_horizon=20), r"horizons only grow"),
        (lambda: learned.meta_train(mlp, [quad], 5, estimator="sgd"), r"estimator must be one"),
        (lambda: learned.meta_train(mlp, [], 5), r"non-empty list of AbstractTaskFamily"),
        (lambda: learned.meta_train(mlp, [quad], 0), r"num_steps must be an int >= 1"),
        (lambda: learned.meta_train(mlp, [quad], 5, meta_lr=0.0), r"meta_lr must be a number"),
        (lambda: learned.meta_train(mlp, [quad], 5, clip_norm=-1.0), r"clip_norm must be"),
        (lambda: learned.meta_train(mlp, [quad], 5, resume=True), r"resume=True needs"),
        (lambda: learned.make_estimator("sgd", None, 5), r"unknown estimator"),
        (lambda: learned.tune_adam([], [], 5), r"lrs must be a non-empty list"),
    ]


@pytest.mark.parametrize("case", range(len(_error_cases())))
def test_errors_say_what_to_do(case):
    call, pattern = _error_cases()[case]
    with pytest.raises(hg.HypergradientError, match=pattern):
        call()


def test_unreadable_checkpoint_is_reported(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(hg.HypergradientError, match="could not read the checkpoint"):
        learned.meta_train(learned.MLPLearnedOptimizer(hidden=4),
                           [learned.NoisyQuadraticFamily(dim=2)], 2, checkpoint=path,
                           resume=True)  # fmt: skip


# ------------------------------------------------------------------------- the recipe

TINY = ["suite=quadratic,fredholm", "unseen=mlp:8:32", "steps=6", "horizon=6", "truncation=3",
        "particles=2", "hidden=4", "eval_tasks=2", "adam_grid=0.01,0.1",
        "checkpoint_every=2"]  # fmt: skip


def _recipe(out, *extra):
    from hypergradient.cli import main

    return main(["learned-opt", "--out", str(out), "--no-progress", "--set", *TINY, *extra])


def _without_seconds(tree):
    if isinstance(tree, dict):
        return {k: _without_seconds(v) for k, v in tree.items() if "seconds" not in k}
    if isinstance(tree, list):
        return [_without_seconds(v) for v in tree]
    return tree


def test_recipe_tiny_run_writes_its_files_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert _recipe(out) == 0
    assert "learned optimizer below tuned Adam on" in capsys.readouterr().out
    for name in ("meta_loss.png", "comparison.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    rows = results["families"]
    assert [r["unseen"] for r in rows] == [False, False, True]
    assert rows[2]["family"] == "digits-mlp-w8-b32"
    for r in rows:
        assert r["adam_best_mean"] == min(r["adam_by_lr"].values())
        assert r["ratio"] == r["learned_mean"] / r["adam_best_mean"]
        assert 0 <= r["wins"] <= 2
    assert len(json.loads((out / "history.json").read_text())) == 6
    theta = torch.load(out / "theta.pt")
    assert set(theta) == set(learned.MLPLearnedOptimizer(hidden=4).theta_shapes())
    # --resume of a finished run: the same theta and results
    assert _recipe(out, "--resume") == 0
    again = json.loads((out / "results.json").read_text())
    assert _without_seconds(again) == _without_seconds(results)


def test_recipe_suite_weights_repeat_a_family_per_cycle(tmp_path):
    out = tmp_path / "run"
    assert _recipe(out, "suite=quadratic*2,fredholm") == 0
    history = json.loads((out / "history.json").read_text())
    # cycle quadratic, fredholm, quadratic: 6 outer steps = 4 + 2
    assert [r["family"][0] for r in history] == ["q", "f", "q", "q", "f", "q"]
    rows = json.loads((out / "results.json").read_text())["families"]
    assert [r["unseen"] for r in rows] == [False, False, True]  # each family evaluated once


@pytest.mark.parametrize(
    ("setting", "pattern"),
    [
        ("estimator=sgd", r"option 'estimator': expected one of"),
        ("architecture=rnn", r"option 'architecture': expected one of"),
        ("suite=mlp:0:32", r"option 'suite': expected mlp:WIDTH:BATCH"),
        ("suite=", r"option 'suite': expected a list of families"),
        ("suite=quadratic*0", r"option 'suite': expected FAMILY\*N with N an integer >= 1"),
        ("unseen=resnet", r"option 'unseen': expected mlp:WIDTH:BATCH"),
        ("truncation=50", r"option 'truncation': expected at most horizon = 6"),
        ("initial_horizon=10", r"option 'initial_horizon': expected at most horizon"),
        ("meta_lr=0", r"option 'meta_lr'"),
        ("meta_lr_final=0.1", r"option 'meta_lr_final': expected at most meta_lr"),
        ("adam_grid=0.1,-1", r"option 'adam_grid'"),
        ("meta_loss=test", r"option 'meta_loss': expected one of"),
    ],
)
def test_recipe_bad_options_give_one_line_errors(setting, pattern, tmp_path, capsys):
    out = tmp_path / "run"
    assert _recipe(out, setting) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert not out.exists()


README_EXAMPLE = _readme.example(
    "lopt.opt_fn(theta)(model.parameters()",
    theta_complete="set(theta) == set(lopt.theta_shapes())",
    final="final",
)


def test_readme_learned_optimizer_example_runs():
    run = README_EXAMPLE.run()  # in a fresh (float32) interpreter, as a reader pastes it
    assert run.values["theta_complete"]
    # 60 meta-steps (3 s) give an optimizer that trains a new width from 2.3 to 0.09-0.17
    # (measured over 4 seeds)
    assert run.values["final"] < 0.5
    assert "training loss after 50 steps" in run.stdout
