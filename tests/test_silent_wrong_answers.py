"""Issue 14, item 3: answers that were silently wrong now warn, raise, or are guarded.

* ``implicit_hypergrad`` at a point that is not an inner optimum warns
  (:class:`hg.NonStationaryWarning`) naming the measured gradient norm; there the
  hypergradient is indeed far off, so the warning is meaningful; at the optimum it is silent,
  and ``stationarity_tol=None`` opts out.
* ``hg.as_function`` refuses a params dict that lacks a trainable parameter (it used to
  fall back to the module's own tensor).
* Weight decays are clipped below the SGD stability limit ``2 / lr`` (the ``weight-decay``
  recipe says how often), and ``BilevelTrainer`` stops early, with one clear line, when the
  inner training diverges as the hyperparameters move; ``lr-schedule`` names the hyper-step
  whose learned rates broke the training run.
"""

import math
import re
import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg
from hypergradient.recipes import weight_decay as wd_recipe
from hypergradient.testing import relative_error, ridge_problem


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grad_norm(problem, params) -> float:
    w = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(problem.inner_loss(w, problem.hparams), list(w.values()))
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


def _away_from_optimum(problem, distance: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    w = problem.params["w"]
    step = torch.randn(w.shape, generator=gen, dtype=w.dtype)
    return {"w": w + distance * step / step.norm()}


# ----------------------------------------------------------------------------- stationarity


def test_warns_at_non_stationary_point_naming_the_gradient_norm():
    p = ridge_problem()
    params = _away_from_optimum(p, 0.75)
    norm = _grad_norm(p, params)
    assert 0.3 < norm < 0.8  # the first case had 0.56
    with pytest.warns(hg.NonStationaryWarning) as record:
        got, stats = hg.implicit_hypergrad(
            p.inner_loss, p.outer_loss, params, p.hparams, solver="exact", return_stats=True
        )
    assert len(record) == 1
    message = str(record[0].message)
    assert f"= {norm:.3g}" in message  # the measured norm, as computed independently
    assert "stationarity_tol=0.001" in message
    assert "implicit function theorem assumes grad_w inner_loss(params, hparams) = 0" in message
    assert "stationarity_tol=None" in message and "unrolled_hypergrad" in message
    assert stats.extra["inner_grad_norm"] == pytest.approx(norm, rel=1e-9)
    # the warning is meaningful: the hypergradient there is far from the true one at w*
    assert relative_error(got, p.hypergrad) > 1.0


def test_error_grows_with_the_gradient_norm_and_is_small_under_the_default_tol():
    p = ridge_problem()
    errors = {}
    for distance in (1e-4, 1e-2, 1.0):
        params = _away_from_optimum(p, distance)
        got = hg.implicit_hypergrad(
            p.inner_loss, p.outer_loss, params, p.hparams, solver="exact", stationarity_tol=None
        )
        errors[_grad_norm(p, params)] = relative_error(got, p.hypergrad)
    norms = sorted(errors)
    assert norms[0] < 1e-3 < norms[-1]
    assert errors[norms[0]] < 0.02  # under the default tolerance: ~1% or less
    assert errors[norms[-1]] > 5.0  # the "5,400% off" regime
    assert errors[norms[0]] < errors[norms[1]] < errors[norms[2]]


def test_silent_at_the_exact_optimum():
    p = ridge_problem()  # float64, params = the closed-form optimum
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.NonStationaryWarning)
        got, stats = hg.implicit_hypergrad(
            p.inner_loss, p.outer_loss, p.params, p.hparams, solver="exact", return_stats=True
        )
    assert stats.extra["inner_grad_norm"] < 1e-12
    assert relative_error(got, p.hypergrad) < 1e-10


def test_opt_out_silences_the_warning_and_changes_nothing_else():
    p = ridge_problem()
    params = _away_from_optimum(p, 0.75)
    with pytest.warns(hg.NonStationaryWarning):
        warned = hg.implicit_hypergrad(p.inner_loss, p.outer_loss, params, p.hparams)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.NonStationaryWarning)
        quiet = hg.implicit_hypergrad(
            p.inner_loss, p.outer_loss, params, p.hparams, stationarity_tol=None
        )
        loose = hg.implicit_hypergrad(
            p.inner_loss, p.outer_loss, params, p.hparams, stationarity_tol=10.0
        )
    torch.testing.assert_close(warned, quiet, rtol=0, atol=0)
    torch.testing.assert_close(warned, loose, rtol=0, atol=0)


def test_fixed_point_form_warns_with_the_residual():
    lam = torch.tensor([1.0])
    phi = hg.FixedPoint(lambda p, h: {"w": 0.5 * p["w"] + h["lam"]})  # w* = 2 lam

    def outer(p, h):
        return p["w"].sum()

    with pytest.warns(hg.NonStationaryWarning, match=r"residual .* = 0\.5 exceeds"):
        hg.implicit_hypergrad(phi, outer, {"w": torch.tensor([3.0])}, {"lam": lam})
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.NonStationaryWarning)
        g, stats = hg.implicit_hypergrad(
            phi, outer, {"w": 2 * lam}, {"lam": lam}, solver="exact", return_stats=True
        )
    assert float(g["lam"]) == pytest.approx(2.0)
    assert stats.extra["fixed_point_residual"] == 0.0


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "1e-3", True])
def test_bad_stationarity_tol_is_refused(bad):
    p = ridge_problem()
    with pytest.raises(hg.HypergradientError, match="stationarity_tol must be a positive"):
        hg.implicit_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, stationarity_tol=bad)


def test_pretrain_hypergrad_passes_the_check_through():
    lam = torch.tensor([2.0])

    def run(theta, **options):
        return hg.pretrain.pretrain_hypergrad(
            lambda th, h: 0.5 * ((th["w"] - h["lam"]) ** 2).sum(),  # optimum th = lam
            lambda phi, th: 0.5 * ((phi["w"] - 1) ** 2).sum(),
            lambda phi, th: phi["w"].sum(),
            {"w": theta},
            {"lam": lam},
            lambda th: {"w": th["w"]},
            solver="exact",
            **options,
        )

    with pytest.warns(hg.NonStationaryWarning, match=r"= 1 exceeds"):
        run(lam + 1.0)
    run(lam + 1.0, stationarity_tol=None)  # silent
    run(lam.clone())  # at the optimum: silent


def _tiny_trainer(hyper, *, lr=0.1, method=None, callbacks=(), **options):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    xv, yv = torch.randn(20, 5, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    train = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8, shuffle=True)
    val = torch.utils.data.DataLoader(list(zip(xv, yv)), batch_size=10, shuffle=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    return hg.BilevelTrainer(
        model,
        hyper,
        train,
        val,
        torch.optim.SGD(model.parameters(), lr=lr),
        method=method,
        hyper_every=5,
        callbacks=callbacks,
        **options,
    )


def test_trainer_implicit_is_silent_by_default_and_logs_the_gradient_norm():
    trainer = _tiny_trainer(hg.hparams.WeightDecay("per_tensor"), method=hg.Implicit())
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.NonStationaryWarning)
        history = trainer.fit(3)
    norms = [r["inner_grad_norm"] for r in history]
    assert all(math.isfinite(n) and n > 1e-3 for n in norms)  # warm start: not converged
    # opting back in warns, as implicit_hypergrad would
    loud = _tiny_trainer(
        hg.hparams.WeightDecay("per_tensor"), method=hg.Implicit(stationarity_tol=1e-3)
    )
    with pytest.warns(hg.NonStationaryWarning, match="inner gradient norm"):
        loud.fit(1)


# ----------------------------------------------------------------------------- as_function


def test_as_function_refuses_a_params_dict_missing_a_parameter():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    f = hg.as_function(net)
    x = torch.randn(5, 3)
    params = hg.params_of(net)
    f(params, x)  # complete: fine; buffers come from the module
    partial = {k: v for k, v in params.items() if k != "2.bias"}
    with pytest.raises(
        hg.HypergradientError, match=r"lacks the trainable parameter\(s\) \['2.bias'\]"
    ):
        f(partial, x)
    typo = dict(partial, **{"2.bais": params["2.bias"]})
    with pytest.raises(hg.HypergradientError, match=r"\['2.bias'\] \(unknown keys \['2.bais'\]"):
        f(typo, x)


def test_as_function_takes_frozen_parameters_and_buffers_from_the_module():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net[0].bias.requires_grad_(False)
    f = hg.as_function(net)
    x = torch.randn(5, 3)
    params = hg.params_of(net)
    assert "0.bias" not in params
    net.eval()
    torch.testing.assert_close(f(params, x), net(x))


# ----------------------------------------------------------------------------- stability


def test_max_stable_decay_is_the_sgd_stability_limit():
    w = torch.zeros(2, requires_grad=True)
    limit = hg.hparams.max_stable_decay
    assert limit(torch.optim.SGD([w], lr=0.1)) == pytest.approx(0.9 * 20)
    assert limit(torch.optim.SGD([w], lr=0.1, momentum=0.5)) == pytest.approx(0.9 * 30)
    assert limit(torch.optim.SGD([w], lr=0.1, momentum=0.5, nesterov=True)) == pytest.approx(
        0.9 * 2 * 1.5 / (2 * 0.1)
    )
    assert limit(torch.optim.SGD([w], lr=0.1, weight_decay=1.0), safety=0.5) == pytest.approx(9)
    assert limit(torch.optim.Adam([w])) is None
    with pytest.raises(hg.HypergradientError, match="safety=1"):
        limit(torch.optim.SGD([w], lr=0.1), safety=1)

    # the limit is real: just under it SGD on decay * w^2 / 2 contracts, just over it explodes
    def final(decay, **kw):
        p = torch.ones(1, requires_grad=True)
        opt = torch.optim.SGD([p], **kw)
        for _ in range(500):
            opt.zero_grad()
            (0.5 * decay * p**2).sum().backward()
            opt.step()
        return float(p.detach().abs())

    for kw in (
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    ):
        edge = limit(torch.optim.SGD([w], **kw)) / 0.9
        assert final(0.99 * edge, **kw) < 1e-2 and final(1.01 * edge, **kw) > 1e2


def test_weight_decay_max_decay_clips_and_counts():
    hyper = hg.hparams.WeightDecay("per_weight", initial=1.0, max_decay=5.0)
    hp = hyper.init({"a": torch.zeros(2, 3), "b": torch.zeros(3)})
    with torch.no_grad():
        hp["log_wd.a"][0, 0] = 10.0
        hp["log_wd.b"][1] = math.log(5.0) + 1e-3
        hyper.project(hp)
    assert float(hp["log_wd.a"].exp().max()) == pytest.approx(5.0)
    assert hyper.describe(hp)["wd_at_bound"] == 2
    assert "wd_at_bound" not in hg.hparams.WeightDecay().describe(hp)
    with pytest.raises(hg.HypergradientError, match="exceeds the bound"):
        hg.hparams.WeightDecay(initial=10.0, max_decay=5.0)
    with pytest.raises(hg.HypergradientError, match="max_decay"):
        hg.hparams.WeightDecay(max_decay=-1.0)


def _bump_decay(trainer, record):
    """Moves the global decay up by 10% per hyper-step, whatever the hypergradient says."""
    with torch.no_grad():
        trainer.hparams["log_wd"].add_(math.log(1.1))


def test_trainer_stops_early_with_one_clear_line_when_the_inner_step_diverges():
    lr = 0.1  # SGD on the decay term is unstable once decay > 2 / lr = 20
    trainer = _tiny_trainer(
        hg.hparams.WeightDecay("global", initial=12.0),
        lr=lr,
        hyper_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        callbacks=[_bump_decay],
    )
    with pytest.raises(hg.HypergradientError) as info:
        trainer.fit(100)
    message = str(info.value)
    assert "\n" not in message
    crossed = math.ceil(math.log(20 / 12) / math.log(1.1))  # hyper-steps until decay > 20
    failed = trainer.hyper_step + 1
    # the loss grows ~70x per hyper-step once unstable: 1000x its level within a few
    assert crossed < failed <= crossed + 5
    assert f"diverged during hyper-step {failed}" in message
    assert "over 1000 x its running level" in message
    assert "wd_max=" in message
    assert "lower the hyper learning rate, bound the hyperparameter" in message
    # stopped long before the losses reach 1e31 (or a misleading Neumann error)
    assert max(r["train_loss"] for r in trainer.history) < 1e3


def test_trainer_stops_at_once_on_an_exploding_first_block():
    trainer = _tiny_trainer(hg.hparams.WeightDecay("global", initial=1e-3), lr=1e30)
    with pytest.raises(hg.HypergradientError, match=r"hyper-step 1 \(inner step [1-5]\)"):
        trainer.fit(2)


def test_trainer_divergence_guard_can_be_disabled_and_is_checked():
    with pytest.raises(hg.HypergradientError, match="divergence_factor"):
        _tiny_trainer(hg.hparams.WeightDecay(), divergence_factor=0.5)
    trainer = _tiny_trainer(
        hg.hparams.WeightDecay("global", initial=12.0),
        hyper_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        callbacks=[_bump_decay],
        divergence_factor=None,
    )
    trainer.fit(10)  # diverging, but only a non-finite loss would stop it now
    assert trainer.history[-1]["train_loss"] > 1e3


def _tiny_recipe_config(**changes):
    # hyper_lr and inner_lr chosen so that per-weight decays race past 2 / inner_lr = 4
    options = dict(
        n_train=100, n_val=50, val_sizes=[], hidden=16, batch_size=50, hyper_lr=1.0,
        inner_lr=0.5, init_weight_decay=0.5, hyper_steps=12, grid=[0.0],
    )  # fmt: skip
    options.update(changes)
    config = wd_recipe.WeightDecayConfig(**options)
    config.validate()
    return config


def test_weight_decay_recipe_clips_decays_below_the_stability_limit(tmp_path):
    config = _tiny_recipe_config()
    data = wd_recipe.load_data(config)
    result = wd_recipe.run_tuned(config, data, config.n_val, tmp_path / "run", resume=False)
    clip = result["decay_clipping"]
    assert clip["max_decay"] == pytest.approx(0.9 * 2 / config.inner_lr)
    assert clip["hyper_steps_clipped"] >= 5 and clip["decays_at_bound_max"] > 0
    assert result["weight_decay_quantiles"]["0.95"] <= clip["max_decay"] * (1 + 1e-6)
    assert math.isfinite(result["train_loss"]) and result["train_loss"] < 5
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < 5


def test_weight_decay_recipe_without_the_clip_fails_early_and_clearly(tmp_path, monkeypatch):
    # the same run with the bound lifted: decays pass 2 / inner_lr and the trainer stops
    monkeypatch.setattr(wd_recipe.WeightDecayConfig, "max_decay", property(lambda self: 1e30))
    config = _tiny_recipe_config()
    data = wd_recipe.load_data(config)
    with pytest.raises(hg.HypergradientError, match=r"diverged during hyper-step ([2-9]|1[0-2]) "):
        wd_recipe.run_tuned(config, data, config.n_val, tmp_path / "run", resume=False)


def test_weight_decay_recipe_refuses_an_unstable_initial_decay():
    with pytest.raises(hg.HypergradientError, match="option 'init_weight_decay'.*exceeds"):
        _tiny_recipe_config(init_weight_decay=5.0)
    with pytest.raises(hg.HypergradientError, match="option 'decay_safety'"):
        _tiny_recipe_config(decay_safety=1.0)


def test_the_guard_is_quiet_on_an_ordinary_run():
    trainer = _tiny_trainer(hg.hparams.WeightDecay("per_weight", initial=1e-2))
    history = trainer.fit(5)
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 2


def test_lr_schedule_says_which_hyper_step_diverged_and_what_to_lower(tmp_path, capsys):
    from hypergradient.cli import main

    tiny = ["hidden=6", "n_train=80", "n_val=40", "steps=12", "knots=4", "hyper_steps=10"]
    argv = ["lr-schedule", "--out", str(tmp_path / "run"), "--no-progress", "--set", *tiny]
    assert main([*argv, "hyper_lr=3.0"]) == 2  # the learned rates climb until training blows up
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(r"the training run of hyper-step \d+ failed with learning rates up to", err)
    assert "lower option 'hyper_lr' (now 3.0)" in err
