"""Self-training (Metz et al. 2021): a population of learned optimizers trains itself.

* The linear learned optimizer computes ``a * d * exp(b * m)`` from the normalised
  features ``[g, m_0.9, m_0.99, rms_0.99]``; zero meta-parameters give the zero update.
* From random initialisation, self-training lowers the best member's meta-loss on fixed
  held-out tasks by a stated margin, and the loop never builds a ``torch.optim`` optimizer.
* Every outer update comes from the best member's learned optimizer: an all-zero
  population never moves, and the recorded updater is the member with the best fitness.
* PBT: the worst copy the best (meta-parameters, optimizer state, fitness), perturbed by
  the stated relative amount; the SGD control is ``theta - lr * grad``.
* Checkpoint/resume reproduces an uninterrupted run bit for bit; JSON and PNG outputs;
  bad inputs raise ``HypergradientError``.
"""

import json
import math

import pytest
import torch

import _readme
from hypergradient import HypergradientError, learned
from hypergradient.learned import self_training as st


def _quadratics():
    return learned.NoisyQuadraticFamily(dim=6, condition=10.0, noise=0.1)


def _small(**kwargs):
    """A cheap run: 4 members, 2 pairs, 10 inner steps on 6-d noisy quadratics."""
    config = {
        "optimizer": learned.LinearLearnedOptimizer(scale_dir=0.1),
        "families": [_quadratics()],
        "population_size": 4,
        "num_steps": 4,
        "horizon": 10,
        "num_pairs": 2,
        "pbt_every": 2,
        "eval_every": 2,
        "eval_tasks": 2,
        "generator": torch.Generator().manual_seed(3),
    }
    config.update(kwargs)
    return learned.self_train(**config)


# ----------------------------------------------------------------------------------------
# The linear learned optimizer.


def test_linear_optimizer_is_the_stated_formula():
    lopt = learned.LinearLearnedOptimizer(scale_dir=0.02, scale_mag=0.5)
    gen = torch.Generator().manual_seed(0)
    theta = lopt.init(gen)
    params = {"a": torch.randn(3, 2, generator=gen), "b": torch.randn(5, generator=gen)}
    g1 = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    g2 = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    state = lopt.init_state(params)
    _, state = lopt.update(theta, g1, params, state, learned.step_inputs())
    updates, _ = lopt.update(theta, g2, params, state, learned.step_inputs())

    def rms_normalised(x):
        return x / torch.sqrt(x.square().mean() + 1e-12)

    for k in params:
        # moments from zero, no bias correction: m_b = b (1-b) g1 + (1-b) g2
        m9 = 0.9 * 0.1 * g1[k] + 0.1 * g2[k]
        m99 = 0.99 * 0.01 * g1[k] + 0.01 * g2[k]
        v99 = 0.99 * 0.01 * g1[k] ** 2 + 0.01 * g2[k] ** 2
        feats = torch.stack(
            [rms_normalised(x).reshape(-1) for x in (g2[k], m9, m99, v99.sqrt())], dim=1
        )
        out = feats @ theta["w"] + theta["b"]
        expected = 0.02 * out[:, 0] * torch.exp(0.5 * out[:, 1])
        torch.testing.assert_close(updates[k].reshape(-1), expected)


def test_linear_optimizer_zero_theta_is_the_zero_update_and_init_is_random():
    lopt = learned.LinearLearnedOptimizer()
    zero = {k: torch.zeros(s) for k, s in lopt.theta_shapes().items()}
    params = {"w": torch.randn(4)}
    updates, _ = lopt.update(
        zero, {"w": torch.randn(4)}, params, lopt.init_state(params), learned.step_inputs()
    )
    assert torch.equal(updates["w"], torch.zeros(4))
    theta = lopt.init(torch.Generator().manual_seed(1))
    # LeCun-normal over 4 features: std 1/2 (10 entries; a loose band, not a fit)
    std = torch.cat([v.reshape(-1) for v in theta.values()]).std()
    assert 0.2 < float(std) < 1.0
    assert learned.num_meta_parameters(lopt) == 10


def test_linear_optimizer_as_torch_optim_matches_the_functional_update():
    lopt = learned.LinearLearnedOptimizer()
    theta = lopt.init(torch.Generator().manual_seed(2))
    w = torch.nn.Parameter(torch.randn(5))
    params = {"0.0": w.detach().clone()}
    state = lopt.init_state(params)
    opt = lopt.opt_fn(theta)([w])  # no num_steps: it reads no progress
    for _ in range(3):
        opt.zero_grad()
        (w**4).sum().backward()
        grads = {"0.0": 4 * params["0.0"] ** 3}
        updates, state = lopt.update(theta, grads, params, state, learned.step_inputs())
        params = {"0.0": params["0.0"] + updates["0.0"]}
        opt.step()
        torch.testing.assert_close(w.detach(), params["0.0"])


# ----------------------------------------------------------------------------------------
# The outer update and the main claim.


def test_outer_update_applies_the_updaters_rule_to_theta():
    lopt = learned.LinearLearnedOptimizer(scale_dir=0.1)
    member = lopt.init(torch.Generator().manual_seed(4))
    grad = {k: torch.randn(v.shape) for k, v in member.items()}
    state = lopt.init_state(member)
    zero = {k: torch.zeros_like(v) for k, v in member.items()}
    same, _ = learned.outer_update(lopt, zero, member, grad, state)
    for k in member:
        assert torch.equal(same[k], member[k])
    # a sign-descent updater: d = -g / rms(g) per tensor, m = 0, so delta = -a g / rms(g)
    descent = {k: v.clone() for k, v in zero.items()}
    descent["w"][0, 0] = -1.0
    new, new_state = learned.outer_update(lopt, descent, member, grad, state)
    for k in member:
        rms = grad[k].square().mean().sqrt()
        torch.testing.assert_close(new[k], member[k] - 0.1 * grad[k] / rms)
    assert float(new_state["global"]["step"]) == 1.0


def test_self_training_from_random_init_lowers_the_held_out_meta_loss(monkeypatch):
    def no_torch_optim(self, *args, **kwargs):
        raise AssertionError("the self-training loop built a torch.optim optimizer")

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", no_torch_optim)
    result = learned.self_train(
        learned.LinearLearnedOptimizer(scale_dir=0.1),
        [_quadratics()],
        population_size=8,
        num_steps=10,
        horizon=20,
        num_pairs=4,
        pbt_every=5,
        eval_every=5,
        eval_tasks=8,
        generator=torch.Generator().manual_seed(0),
    )
    start, end = result.evaluations[0], result.evaluations[-1]
    assert [e["step"] for e in result.evaluations] == [0, 5, 10]
    # the held-out meta-loss is a mean log loss: a drop of 0.5 is a geometric-mean loss
    # 0.61x that of the best random member (seeds 0-3 drop by 0.67-1.22 here; the
    # population's mean falls by more, since most random members barely train)
    assert end["best"] < start["best"] - 0.5
    assert end["mean"] < start["mean"] - 1.0
    assert result.best == end["best_member"]
    assert result.curve("best") == ([0, 5, 10], [e["best"] for e in result.evaluations])
    # every outer step was done by the member with the best fitness at that step
    for record in result.history:
        assert record["updater"] == learned.rank_members(record["fitness"])[0]
        assert record["best_es_loss"] == min(record["es_loss"])


def test_an_all_zero_population_never_moves():
    """The outer updates come from the learned optimizer: with zero meta-parameters it
    outputs zero, so nothing else in the loop can move the members (PBT off)."""
    lopt = learned.LinearLearnedOptimizer()
    zeros = [{k: torch.zeros(s) for k, s in lopt.theta_shapes().items()} for _ in range(4)]
    result = _small(thetas=zeros, pbt_every=100)
    for theta in result.thetas:
        for v in theta.values():
            assert torch.equal(v, torch.zeros_like(v))
    assert all(u == 0.0 for r in result.history for u in r["update_norm"])
    # the same loop from random meta-parameters does move them
    moved = _small(pbt_every=100)
    assert all(u > 0 for r in moved.history for u in r["update_norm"])


def test_sgd_control_is_theta_minus_lr_times_the_estimate():
    result = _small(outer="sgd", outer_lr=0.05, pbt_every=100)
    for record in result.history:
        assert record["updater"] is None
        for grad, update in zip(record["grad_norm"], record["update_norm"]):
            assert update == pytest.approx(0.05 * grad, rel=1e-12)


def test_adam_outer_step_matches_torch_optim_adam():
    gen = torch.Generator().manual_seed(4)
    theta = {"w": torch.randn(4, 2, generator=gen, dtype=torch.float64)}
    param = torch.nn.Parameter(theta["w"].clone())
    reference = torch.optim.Adam([param], lr=0.03, betas=(0.9, 0.999), eps=1e-8)
    state = st._adam_init(theta)
    for _ in range(4):
        grad = {"w": torch.randn(4, 2, generator=gen, dtype=torch.float64)}
        theta, state = st._adam_step(theta, grad, state, 0.03)
        param.grad = grad["w"].clone()
        reference.step()
        torch.testing.assert_close(theta["w"], param.detach(), rtol=1e-12, atol=1e-14)
    assert state["t"] == 4


def test_adam_outer_loop_first_step_is_lr_times_the_sign_of_the_estimate():
    """Adam's first bias-corrected step is lr * g / |g|: every one of the 10
    meta-parameters moves by lr, whatever the size of the ES estimate."""
    result = _small(outer="adam", outer_lr=0.05, pbt_every=100, num_steps=2)
    first = result.history[0]
    assert first["updater"] is None
    for update in first["update_norm"]:
        assert update == pytest.approx(0.05 * math.sqrt(10), rel=1e-5)


def test_population_es_batch_is_each_members_antithetic_es():
    """All members in one vmapped batch give each member the estimate it gets alone from
    the same draws, and the estimate is unbiased for the smoothed gradient."""
    from hypergradient.estimators import PowerRecurrence

    system = PowerRecurrence(horizon=3)
    thetas = [{"a": torch.tensor(a, dtype=torch.float64)} for a in (0.9, -0.6)]
    together = st.population_antithetic_es(
        system, thetas, num_pairs=3, sigma=0.1, generator=torch.Generator().manual_seed(1)
    )
    gen = torch.Generator().manual_seed(1)
    alone = [
        st.population_antithetic_es(system, [th], num_pairs=3, sigma=0.1, generator=gen)[0]
        for th in thetas
    ]
    for (g1, l1), (g2, l2) in zip(together, alone):
        torch.testing.assert_close(g1["a"], g2["a"], rtol=1e-12, atol=1e-15)
        assert l1 == pytest.approx(l2, rel=1e-12)
    # unbiased: 20 independent batches of 200 pairs; their mean is within 4 standard
    # errors (from their spread) of the exact gradient of the smoothed loss
    gen = torch.Generator().manual_seed(2)
    batches = [
        st.population_antithetic_es(system, thetas, num_pairs=200, sigma=0.1, generator=gen)
        for _ in range(20)
    ]
    for i, theta in enumerate(thetas):
        draws = torch.stack([batch[i][0]["a"] for batch in batches])
        exact = system.smoothed_gradient(theta, sigma=0.1)["a"]
        assert float((draws.mean() - exact).abs()) < 4 * float(draws.std()) / 20**0.5
    with pytest.raises(HypergradientError, match="thetas must hold at least one member"):
        st.population_antithetic_es(system, [], num_pairs=1, sigma=0.1, generator=torch.Generator())


def test_batched_population_run_resumes_and_lowers_the_meta_loss(tmp_path):
    full = _small(num_steps=4, batch_population=True)
    ckpt = tmp_path / "run.pt"
    _small(
        num_steps=4,
        batch_population=True,
        checkpoint=ckpt,
        checkpoint_every=100,
        callback=lambda s, r, t: s == 1,
    )
    resumed = _small(num_steps=4, batch_population=True, checkpoint=ckpt, resume=True)
    assert _strip(resumed.history) == _strip(full.history)
    assert full.evaluations[-1]["mean"] < full.evaluations[0]["mean"]


# ----------------------------------------------------------------------------------------
# Population-based training.


def test_pbt_exploit_explore_copies_the_best_into_the_worst():
    gen = torch.Generator().manual_seed(5)
    thetas = [{"w": torch.randn(200, generator=gen)} for _ in range(8)]
    states = [{"m": torch.full((2,), float(i))} for i in range(8)]
    fitness = [0.5, 0.1, 0.9, 0.3, 0.7, float("nan"), 0.2, 0.8]
    # best: 1 (0.1), 6 (0.2); worst: 5 (nan), 2 (0.9); the worst takes the best
    new_thetas, new_states, event = learned.pbt_exploit_explore(
        thetas, states, fitness, fraction=0.25, perturb_scale=0.0, generator=gen
    )
    assert event.copies == ((5, 1), (2, 6))
    for dst, src in event.copies:
        assert torch.equal(new_thetas[dst]["w"], thetas[src]["w"])
        assert torch.equal(new_states[dst]["m"], states[src]["m"])
        assert new_states[dst]["m"] is not states[src]["m"]  # a copy, not an alias
    for i in (0, 1, 3, 4, 6, 7):
        assert new_thetas[i] is thetas[i] and new_states[i] is states[i]
    # explore: the copy differs from its source by perturb_scale * rms(source) * N(0, 1)
    perturbed, _, _ = learned.pbt_exploit_explore(
        thetas, states, fitness, fraction=0.25, perturb_scale=0.1, generator=gen
    )
    noise = (perturbed[5]["w"] - thetas[1]["w"]) / (0.1 * thetas[1]["w"].square().mean().sqrt())
    # 200 standard normals: sample std within 0.8-1.2 (about 4 standard errors)
    assert 0.8 < float(noise.std()) < 1.2
    assert abs(float(noise.mean())) < 0.3


def test_pbt_in_the_loop_copies_meta_parameters_and_fitness():
    result = _small(outer="none", perturb_scale=0.0, num_steps=2, pbt_every=2)
    (record,) = [r for r in result.history if r["copies"]]
    assert record["step"] == 1
    dst, src = record["copies"][0]
    order = learned.rank_members(record["fitness"])
    assert (dst, src) == (order[-1], order[0])
    # outer="none": meta-parameters change only by the copy
    for k, v in result.thetas[dst].items():
        assert torch.equal(v, result.initial_thetas[src][k])
    untouched = set(range(4)) - {dst}
    for i in untouched:
        for k, v in result.thetas[i].items():
            assert torch.equal(v, result.initial_thetas[i][k])


# ----------------------------------------------------------------------------------------
# Checkpoints, outputs, errors.


def _strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = _small(num_steps=5)
    ckpt = tmp_path / "run.pt"
    first = _small(
        num_steps=5, checkpoint=ckpt, checkpoint_every=100, callback=lambda s, r, t: s == 2
    )
    assert len(first.history) == 3
    resumed = _small(num_steps=5, checkpoint=ckpt, resume=True)
    assert _strip(resumed.history) == _strip(full.history)
    assert resumed.evaluations == full.evaluations
    for a, b in zip(resumed.thetas, full.thetas):
        for k in a:
            assert torch.equal(a[k], b[k])
    with pytest.raises(HypergradientError, match=r"other options \(num_pairs differ\)"):
        _small(num_steps=6, num_pairs=3, checkpoint=ckpt, resume=True)


def test_history_json_and_plot(tmp_path):
    result = _small(history_path=tmp_path / "h.json", plot_path=tmp_path / "p.png")
    saved = json.loads((tmp_path / "h.json").read_text())
    assert saved["outer"] == "self"
    assert [e["step"] for e in saved["evaluations"]] == [0, 2, 4]
    assert len(saved["history"]) == 4 and saved["history"][1]["copies"]
    assert (tmp_path / "p.png").stat().st_size > 1000
    learned.plot_self_training({"a": result, "b": result}, tmp_path / "two.png")
    assert (tmp_path / "two.png").is_file()


def test_evaluate_population_scores_members_on_fixed_tasks():
    lopt = learned.LinearLearnedOptimizer(scale_dir=0.1)
    theta = lopt.init(torch.Generator().manual_seed(6))
    bad = {k: torch.full_like(v, math.nan) for k, v in theta.items()}
    kwargs = {"horizon": 5, "num_tasks": 3}
    losses = learned.evaluate_population(lopt, [theta, theta, bad], [_quadratics()], **kwargs)
    assert losses[0] == losses[1] and math.isfinite(losses[0]) and losses[2] == math.inf
    again = learned.evaluate_population(lopt, [theta], [_quadratics()], **kwargs)
    assert again[0] == pytest.approx(losses[0], rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"outer": "rmsprop"}, r"outer must be one of \('self', 'sgd', 'adam', 'none'\)"),
        ({"outer": "sgd"}, r"outer='sgd' needs outer_lr"),
        ({"outer": "adam"}, r"outer='adam' needs outer_lr"),
        ({"outer_lr": 0.1}, r"outer_lr=0.1 is only used by outer='sgd' and 'adam'"),
        ({"batch_population": 1}, r"batch_population must be True or False"),
        ({"batch_population": True, "vectorize": False}, r"needs vectorize=True"),
        ({"population_size": 1}, r"population_size must be an int >= 2"),
        ({"pbt_fraction": 0.75}, r"pbt_fraction must be a number in \(0, 0.5\]"),
        ({"perturb_scale": -1.0}, r"perturb_scale must be a finite number >= 0"),
        ({"sigma": 0.0}, r"sigma must be a finite float > 0"),
        ({"num_pairs": 0}, r"num_pairs must be an int >= 1"),
        ({"families": []}, r"families must be a task family or a non-empty list"),
        ({"optimizer": "mlp"}, r"optimizer must be an AbstractLearnedOptimizer"),
        ({"generator": 0}, r"generator must be a torch.Generator"),
        ({"resume": True}, r"resume=True needs checkpoint"),
        ({"thetas": []}, r"thetas holds 0 members, population_size is 4"),
        ({"thetas": [{"w": torch.zeros(2)}] * 4}, r"thetas\[0\]\).*missing keys"),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(HypergradientError, match=match):
        _small(num_steps=1, **kwargs)


def test_other_bad_inputs_raise():
    with pytest.raises(HypergradientError, match=r"scale_mag must be a finite float > 0"):
        learned.LinearLearnedOptimizer(scale_mag=0.0)
    with pytest.raises(HypergradientError, match=r"init_scale must be a finite float > 0"):
        learned.LinearLearnedOptimizer(init_scale=-1.0)
    with pytest.raises(HypergradientError, match=r"fraction must be a number in \(0, 0.5\]"):
        learned.pbt_exploit_explore(
            [{}], [{}], [0.0], fraction=0.0, generator=torch.Generator().manual_seed(0)
        )
    with pytest.raises(HypergradientError, match=r"one entry per member, got 2, 1 and 2"):
        learned.pbt_exploit_explore(
            [{}, {}], [{}], [0.0, 1.0], generator=torch.Generator().manual_seed(0)
        )
    lopt = learned.LinearLearnedOptimizer()
    theta = lopt.init(torch.Generator().manual_seed(0))
    state = lopt.init_state(theta)
    with pytest.raises(HypergradientError, match=r"\(updater\).*missing keys \['b', 'w'\]"):
        learned.outer_update(lopt, {"x": torch.zeros(1)}, theta, theta, state)
    with pytest.raises(HypergradientError, match=r"grad must have the keys of theta"):
        learned.outer_update(lopt, theta, theta, {"w": theta["w"]}, state)
    with pytest.raises(HypergradientError, match=r"curve\(which='worst'\): use 'best'"):
        st.SelfTrainingResult([], 0, [], []).curve("worst")
    with pytest.raises(HypergradientError, match=r"give at least one run"):
        learned.plot_self_training({}, "unused.png")
    with pytest.raises(HypergradientError, match=r"thetas must hold at least one member"):
        learned.evaluate_population(
            learned.LinearLearnedOptimizer(), [], [_quadratics()], horizon=2
        )


README_EXAMPLE = _readme.example(
    "learned.self_train(", start_best="start['best']", end_best="end['best']"
)


def test_readme_example_runs():
    run = README_EXAMPLE.run()  # in a fresh (float32) interpreter, as a reader pastes it
    # 10 outer steps from random init: -1.42 -> -2.73 (float32); a margin of 0.5
    assert run.values["end_best"] < run.values["start_best"] - 0.5
    assert "best member:" in run.stdout
