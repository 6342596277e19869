"""Example weights, loss-reweighting network and task weights; the hyper-clean and reweight
recipes.

* every kind's training loss is the formula written out by hand;
* the hypergradient w.r.t. example weights through an unrolled run equals central finite
  differences, and at the optimum of a strongly convex inner problem it equals the implicit
  (dense-Hessian) hypergradient;
* a cheap digits hyper-cleaning run beats the noisy baseline and finds the flipped labels;
* task weights learn to down-weight a task of pure noise;
* both recipes write their files, and resuming a killed run gives the uninterrupted result.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import hypergradient as hg
from hypergradient import HypergradientError
from hypergradient.hparams.example_weights import (
    ExampleWeights,
    IndexedBatches,
    IndexedDataset,
    indexed_loader,
)
from hypergradient.hparams.reweight_net import LossReweightNet
from hypergradient.hparams.task_weights import TaskWeights
from hypergradient.recipes import build_config
from hypergradient.recipes import hyperclean as hc
from hypergradient.recipes.hyperclean import HyperCleanConfig, HyperCleanRecipe
from hypergradient.recipes.reweight import ReweightConfig, ReweightRecipe
from hypergradient.testing import finite_difference_hypergrad


def _quiet() -> Console:
    return Console(quiet=True)


def _linear(p, x):
    return x @ p["W"] + p["b"]


def _tiny_problem(n=8, d=3, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = 0.7 * torch.randn(n, d, generator=gen)
    y = torch.randint(0, c, (n,), generator=gen)
    xv = 0.7 * torch.randn(6, d, generator=gen)
    yv = torch.randint(0, c, (6,), generator=gen)
    params = {"W": 0.1 * torch.randn(d, c, generator=gen), "b": torch.zeros(c)}
    return x, y, xv, yv, params


# ----------------------------------------------------------------------------- the kinds


@pytest.mark.parametrize("normalize", [False, True])
def test_example_weights_loss_is_weighted_mean(normalize):
    x, y, _, _, params = _tiny_problem()
    kind = ExampleWeights(8, normalize=normalize)
    lam = torch.linspace(-2, 2, 8)
    idx = torch.tensor([5, 0, 3])
    got = kind.training_loss(_linear, params, {"example_weights": lam}, (x[idx], y[idx], idx))
    # by hand: w_i = 2 sigmoid(lambda_i); (1/B) sum_i w_i CE_i, or sum w_i CE_i / sum w_i
    w = [2 / (1 + torch.exp(-lam[i])) for i in idx]
    ce = [F.cross_entropy(_linear(params, x[i : i + 1]), y[i : i + 1]) for i in idx]
    num = sum(wi * ci for wi, ci in zip(w, ce))
    want = num / sum(w) if normalize else num / 3
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    # initial weights are 1: the plain mean cross-entropy
    h0 = kind.init(params)
    plain = kind.training_loss(_linear, params, h0, (x, y, torch.arange(8)))
    torch.testing.assert_close(plain, F.cross_entropy(_linear(params, x), y), rtol=1e-14, atol=0)


def test_example_weights_box_projection_and_describe():
    kind = ExampleWeights(4, parametrization="box", initial=1.0, max_weight=1.5)
    h = kind.init({"w": torch.zeros(1)})
    assert h["example_weights"].tolist() == [1.0] * 4
    h["example_weights"] = torch.tensor([-0.5, 0.2, 1.0, 3.0])
    kind.project(h)
    assert h["example_weights"].tolist() == [0.0, 0.2, 1.0, 1.5]
    # flagged: weight below max_weight / 2 = 0.75
    assert kind.flagged(h).tolist() == [True, True, False, False]
    d = kind.describe(h)
    assert d["frac_below_half"] == 0.5
    assert d["weight_mean"] == pytest.approx((0.2 + 1.0 + 1.5) / 4, rel=1e-15)


def test_loss_reweight_net_is_the_hand_written_mlp():
    x, y, _, _, params = _tiny_problem()
    kind = LossReweightNet(hidden=5, seed=3)
    h = kind.init(params)
    assert {k: tuple(v.shape) for k, v in h.items()} == {
        "mwn.w1": (5, 1),
        "mwn.b1": (5,),
        "mwn.w2": (1, 5),
        "mwn.b2": (1,),
    }
    got = kind.training_loss(_linear, params, h, (x, y))
    ce = F.cross_entropy(_linear(params, x), y, reduction="none")
    # V(l) = sigmoid(sum_j w2_j relu(w1_j l + b1_j) + b2), one example at a time
    v = torch.stack(
        [
            torch.sigmoid(
                sum(
                    h["mwn.w2"][0, j] * torch.relu(h["mwn.w1"][j, 0] * li + h["mwn.b1"][j])
                    for j in range(5)
                )
                + h["mwn.b2"][0]
            )
            for li in ce
        ]
    )
    torch.testing.assert_close(got, (v * ce).mean(), rtol=1e-13, atol=0)
    normalized = LossReweightNet(hidden=5, seed=3, normalize=True)
    torch.testing.assert_close(
        normalized.training_loss(_linear, params, h, (x, y)),
        (v * ce).sum() / v.sum(),
        rtol=1e-13,
        atol=0,
    )
    # the loss is the network's input, detached: the model gradient is sum_i V_i grad l_i / B
    p = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    g = torch.autograd.grad(kind.training_loss(_linear, p, h, (x, y)), [p["W"]])[0]
    ce_p = F.cross_entropy(_linear(p, x), y, reduction="none")
    g_want = torch.autograd.grad((v.detach() * ce_p).mean(), [p["W"]])[0]
    torch.testing.assert_close(g, g_want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("parametrization", ["softmax", "log"])
def test_task_weights_loss_is_weighted_sum_of_task_means(parametrization):
    x, y, _, _, params = _tiny_problem()
    kind = TaskWeights(3, parametrization=parametrization)
    lam = torch.tensor([0.3, -1.0, 0.8])
    task = torch.tensor([0, 0, 1, 0, 1, 1, 0, 0])  # task 2 absent from the batch: adds 0
    got = kind.training_loss(_linear, params, {"task_logits": lam}, (x, y, task))
    if parametrization == "softmax":
        w = 3 * torch.exp(lam) / torch.exp(lam).sum()
    else:
        w = torch.exp(lam)
    ce = F.cross_entropy(_linear(params, x), y, reduction="none")
    want = w[0] * ce[task == 0].mean() + w[1] * ce[task == 1].mean()
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert kind.weights(kind.init(params)).tolist() == [1.0, 1.0, 1.0]
    assert set(kind.describe({"task_logits": lam})) >= {"task_weight.0", "task_weight_max"}


def test_indexed_loaders_yield_indices():
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5) * 10
    torch.manual_seed(1)
    seen = []
    for xb, yb, idx in indexed_loader(x, y, batch_size=2):
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(5))
    task = torch.tensor([0, 1, 0, 1, 1])
    batches = list(IndexedBatches(x, y, task, batch_size=3, shuffle=False, drop_last=True))
    assert len(batches) == 1 and batches[0][2].tolist() == [0, 1, 0]
    assert batches[0][3].tolist() == [0, 1, 2]
    loader = torch.utils.data.DataLoader(IndexedDataset(x, y), batch_size=5)
    assert next(iter(loader))[2].tolist() == [0, 1, 2, 3, 4]


def test_kind_errors():
    with pytest.raises(HypergradientError, match=r"num_examples=0\): expected"):
        ExampleWeights(0)
    with pytest.raises(HypergradientError, match="parametrization='exp'"):
        ExampleWeights(3, parametrization="exp")
    with pytest.raises(HypergradientError, match="max_weight=0"):
        ExampleWeights(3, max_weight=0)
    with pytest.raises(HypergradientError, match=r"initial=2.0\): the initial weight must lie"):
        ExampleWeights(3, initial=2.0)
    with pytest.raises(HypergradientError, match=r"initial=3.0\).*\[0, max_weight=2.0\]"):
        ExampleWeights(3, parametrization="box", initial=3.0)
    x, y, _, _, params = _tiny_problem()
    kind = ExampleWeights(8)
    h = kind.init(params)
    with pytest.raises(HypergradientError, match=r"batches must be \(x, y, idx\).*2 elements"):
        kind.training_loss(_linear, params, h, (x, y))
    with pytest.raises(HypergradientError, match="int64 tensor of example indices"):
        kind.training_loss(_linear, params, h, (x, y, torch.zeros(8)))
    with pytest.raises(HypergradientError, match=r"range over \[0, 8\] but num_examples=8"):
        kind.training_loss(_linear, params, h, (x, y, torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])))
    with pytest.raises(HypergradientError, match=r"hidden=0\)"):
        LossReweightNet(hidden=0)
    with pytest.raises(HypergradientError, match=r"seed=1.5\)"):
        LossReweightNet(seed=1.5)
    with pytest.raises(HypergradientError, match="lacks"):
        LossReweightNet().weight_fn({}, torch.ones(2))
    with pytest.raises(HypergradientError, match=r"num_tasks=0\)"):
        TaskWeights(0)
    with pytest.raises(HypergradientError, match="parametrization='exp'"):
        TaskWeights(2, parametrization="exp")
    with pytest.raises(HypergradientError, match=r"task_position=1\)"):
        TaskWeights(2, task_position=1)
    tw = TaskWeights(2)
    ht = tw.init(params)
    with pytest.raises(HypergradientError, match="task id per example at position 2"):
        tw.training_loss(_linear, params, ht, (x, y))
    with pytest.raises(HypergradientError, match=r"batch\[2\] must be an int64 tensor"):
        tw.training_loss(_linear, params, ht, (x, y, torch.zeros(8)))
    with pytest.raises(HypergradientError, match=r"ids in \[0, num_tasks=2\)"):
        tw.training_loss(_linear, params, ht, (x, y, torch.full((8,), 2)))
    with pytest.raises(HypergradientError, match="first-axis lengths"):
        IndexedDataset(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(HypergradientError, match="every argument must be a torch.Tensor"):
        IndexedDataset(torch.zeros(3, 2), [0, 1, 2])
    with pytest.raises(HypergradientError, match=r"batch_size=0\)"):
        IndexedBatches(torch.zeros(3, 2), torch.zeros(3), batch_size=0)
    with pytest.raises(HypergradientError, match="make no full batch"):
        IndexedBatches(torch.zeros(3, 2), torch.zeros(3), batch_size=4, drop_last=True)


# ----------------------------------------------------------------------------- hypergradients


def _weighted_problem(l2: float):
    """Softmax regression on 8 examples with per-example weights and an L2 penalty (strongly
    convex in the weights for ``l2 > 0``)."""
    x, y, xv, yv, params = _tiny_problem()
    kind = ExampleWeights(8)
    idx = torch.arange(8)

    def inner(p, h):
        # L2 on the bias too: softmax logits shifted by a constant are the same model, so
        # without it the Hessian is singular along that direction
        penalty = 0.5 * l2 * ((p["W"] ** 2).sum() + (p["b"] ** 2).sum())
        return kind.training_loss(_linear, p, h, (x, y, idx)) + penalty

    def outer(p, h):
        return F.cross_entropy(_linear(p, xv), yv)

    lam = {"example_weights": torch.linspace(-1.0, 1.5, 8)}
    return inner, outer, params, lam


def _gd(inner, params, h, steps, lr):
    p = dict(params)
    for _ in range(steps):
        w = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        with torch.enable_grad():
            g = torch.autograd.grad(inner(w, h), list(w.values()))
        p = {k: (w[k] - lr * gk).detach() for k, gk in zip(w, g)}
    return p


def test_example_weight_hypergradient_matches_finite_differences():
    inner, outer, params, lam = _weighted_problem(l2=1e-2)
    got = hg.unrolled_hypergrad(inner, outer, params, lam, steps=15, lr=0.8)

    def response(h):
        return outer(_gd(inner, params, h, 15, 0.8), h)

    fd = finite_difference_hypergrad(response, lam, eps=1e-6)
    # central differences: O(eps^2) = 1e-12 truncation plus round-off ~1e-16/1e-6 = 1e-10
    torch.testing.assert_close(got["example_weights"], fd["example_weights"], rtol=1e-6, atol=1e-9)
    assert float(got["example_weights"].abs().max()) > 1e-3  # a real, non-zero signal


def test_example_weight_hypergradient_at_optimum_equals_implicit_exact():
    # Strongly convex inner problem (L2 0.3 >> 0): GD with lr 1 contracts by <= 1 - 0.3 per
    # step, so after 200 steps w_T = w* to ~1e-30 and the unrolled hypergradient equals the
    # IFT hypergradient up to the same contraction factor (the tangents converge too).
    inner, outer, params, lam = _weighted_problem(l2=0.3)
    unrolled, w_star = hg.unrolled_hypergrad(
        inner, outer, params, lam, steps=200, lr=1.0, return_params=True
    )
    grad_norm = torch.autograd.functional.jacobian(
        lambda W, b: inner({"W": W, "b": b}, lam), (w_star["W"], w_star["b"])
    )
    assert max(float(g.abs().max()) for g in grad_norm) < 1e-12  # at the optimum
    implicit = hg.implicit_hypergrad(inner, outer, w_star, lam, solver="exact")
    torch.testing.assert_close(
        implicit["example_weights"], unrolled["example_weights"], rtol=1e-9, atol=1e-12
    )


def test_task_weights_downweight_a_pure_noise_task():
    # Task 0: labels from a linear teacher; task 1: the same kind of inputs, random labels.
    # Validation data come from the teacher, so the noise task only hurts: its weight must
    # fall (softmax: the weights sum to 2, so task 0 gains what task 1 loses).
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 3, generator=gen)
    x = torch.randn(60, 4, generator=gen)
    task = (torch.arange(60) >= 30).long()
    y = torch.where(task == 0, (x @ teacher).argmax(1), torch.randint(0, 3, (60,), generator=gen))
    xv = torch.randn(40, 4, generator=gen)
    yv = (xv @ teacher).argmax(1)
    kind = TaskWeights(2)
    params0 = {"W": torch.zeros(4, 3), "b": torch.zeros(3)}

    def inner(p, h):
        return kind.training_loss(_linear, p, h, (x, y, task))

    def outer(p, h):
        return F.cross_entropy(_linear(p, xv), yv)

    lam = kind.init(params0)["task_logits"].requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=0.2)
    for _ in range(15):
        g = hg.unrolled_hypergrad(inner, outer, params0, {"task_logits": lam.detach()}, 30, 0.5)
        opt.zero_grad()
        lam.grad = g["task_logits"]
        opt.step()
    w = kind.weights({"task_logits": lam.detach()})
    # measured: w = [1.93, 0.07]; 0.5 leaves a wide margin
    assert float(w[1]) < 0.5 < 1.5 < float(w[0])


# ----------------------------------------------------------------------------- recipes


def _hc_config(**overrides) -> HyperCleanConfig:
    values = {
        "dataset": "digits",
        "n_train": 100,
        "n_val": 60,
        "n_test": 200,
        "inner_steps": 10,
        "inner_lr": 1.0,
        "hyper_steps": 4,
    }
    values.update(overrides)
    return HyperCleanConfig(**values)


def test_hyperclean_digits_beats_baseline_and_finds_flipped_labels(tmp_path):
    config = _hc_config(n_train=300, n_val=150, n_test=None, inner_steps=50, hyper_steps=10)
    results = HyperCleanRecipe().run(
        config, tmp_path, resume=False, progress=False, console=_quiet()
    )
    acc = results["test_acc"]
    # Measured (seeds 0, 1, 2): baseline 0.782/0.808/0.814, hyper-cleaning 0.897/0.903/0.906
    # (oracle 0.896/0.905/0.912), F1 0.927/0.903/0.931. Margins: +0.03 accuracy (measured
    # >= +0.09) and F1 0.8 (measured >= 0.90).
    assert acc["hyper-cleaning"] >= acc["baseline"] + 0.03
    assert results["detection"]["f1"] >= 0.8
    assert results["weights"]["mean_flipped"] < 0.5 < 1.5 < results["weights"]["mean_clean"]


def test_hyperclean_smoke_files(tmp_path):
    results = HyperCleanRecipe().run(
        _hc_config(), tmp_path, resume=False, progress=True, console=_quiet()
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_acc"] == results["test_acc"]
    assert set(saved["test_acc"]) == {"baseline", "hyper-cleaning", "oracle"}
    assert 0.0 <= saved["detection"]["f1"] <= 1.0
    assert len(saved["history"]) == 4 and saved["data"]["flipped"] == 50
    assert (tmp_path / "hyperclean.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoint.pt").is_file()


def test_hyperclean_resume_after_a_kill_equals_uninterrupted(tmp_path, monkeypatch):
    config = _hc_config(hyper_steps=5, hidden=4)  # the MLP path too
    whole = HyperCleanRecipe().run(
        config, tmp_path / "whole", resume=False, progress=False, console=_quiet()
    )
    real = hc.unrolled_hypergrad
    calls = {"n": 0}

    class Killed(Exception):
        pass

    def dies_on_third_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed  # the process dies during hyper-step 3
        return real(*args, **kwargs)

    monkeypatch.setattr(hc, "unrolled_hypergrad", dies_on_third_call)
    with pytest.raises(Killed):
        HyperCleanRecipe().run(
            config, tmp_path / "cut", resume=False, progress=False, console=_quiet()
        )
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    monkeypatch.setattr(hc, "unrolled_hypergrad", real)
    resumed = HyperCleanRecipe().run(
        config, tmp_path / "cut", resume=True, progress=False, console=_quiet()
    )
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert torch.equal(a["hparams"]["example_weights"], b["hparams"]["example_weights"])
    assert resumed["test_acc"] == whole["test_acc"]
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in whole["history"]]
    # a finished run resumed again recomputes no hyper-step
    again = HyperCleanRecipe().run(
        config, tmp_path / "cut", resume=True, progress=False, console=_quiet()
    )
    assert again["test_acc"] == whole["test_acc"]


def test_hyperclean_resume_refuses_other_options(tmp_path):
    HyperCleanRecipe().run(_hc_config(), tmp_path, resume=False, progress=False, console=_quiet())
    with pytest.raises(HypergradientError, match=r"other options \(hyper_lr: 0.3 -> 0.1\)"):
        HyperCleanRecipe().run(
            _hc_config(hyper_lr=0.1), tmp_path, resume=True, progress=False, console=_quiet()
        )


def _rw_config(**overrides) -> ReweightConfig:
    values = {
        "dataset": "digits",
        "n_train": 200,
        "n_val": 60,
        "n_test": 200,
        "hidden": 16,
        "batch_size": 50,
        "hyper_steps": 12,
        "net_hidden": 8,
        "eval_every": 4,
    }
    values.update(overrides)
    return ReweightConfig(**values)


def test_reweight_smoke_files(tmp_path):
    results = ReweightRecipe().run(
        _rw_config(), tmp_path, resume=False, progress=True, console=_quiet()
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_acc"] == results["test_acc"]
    assert set(saved["test_acc"]) == {"plain", "meta-weight-net", "oracle"}
    assert [r["inner_step"] for r in saved["curves"]["meta-weight-net"]] == [4, 8, 12]
    assert [r["inner_step"] for r in saved["curves"]["plain"]] == [4, 8, 12]
    assert (tmp_path / "reweight.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoint.pt").is_file()


def test_reweight_resume_equals_uninterrupted(tmp_path):
    whole = ReweightRecipe().run(
        _rw_config(), tmp_path / "whole", resume=False, progress=False, console=_quiet()
    )
    ReweightRecipe().run(
        _rw_config(hyper_steps=5), tmp_path / "cut", resume=False, progress=False, console=_quiet()
    )
    resumed = ReweightRecipe().run(
        _rw_config(), tmp_path / "cut", resume=True, progress=False, console=_quiet()
    )
    assert resumed["hparams"] == whole["hparams"]  # bit-identical network weights
    assert resumed["test_acc"] == whole["test_acc"]


@pytest.mark.parametrize(
    ("cls", "override", "message"),
    [
        (HyperCleanConfig, "dataset=cifar", r"option 'dataset': expected one of"),
        (HyperCleanConfig, "noise=1.0", r"option 'noise': expected a number in \[0, 1\)"),
        (HyperCleanConfig, "max_weight=1.0", r"option 'max_weight': expected a number > 1"),
        (HyperCleanConfig, "inner_steps=0", r"option 'inner_steps': expected an integer >= 1"),
        (HyperCleanConfig, "hidden=-1", r"option 'hidden': expected an integer >= 0"),
        (HyperCleanConfig, "l2=-1", r"option 'l2': expected a number >= 0"),
        (HyperCleanConfig, "n_train=70000", r"'n_train' \+ 'n_val' = 70000 \+ 1000 exceeds"),
        (HyperCleanConfig, "n_test=20000", r"option 'n_test' = 20000 exceeds the 10000"),
        (HyperCleanConfig, "data_dir= ", r"option 'data_dir': expected a folder path"),
        (ReweightConfig, "momentum=1.0", r"option 'momentum': expected a number in \[0, 1\)"),
        (ReweightConfig, "lookahead=0", r"option 'lookahead': expected an integer >= 1"),
        (ReweightConfig, "hyper_lr=0", r"option 'hyper_lr': expected a number > 0"),
    ],
)
def test_config_errors(cls, override, message):
    with pytest.raises(HypergradientError, match=message):
        build_config(cls, None, [override])


def test_config_errors_digits_sizes():
    with pytest.raises(HypergradientError, match=r"exceeds 1697 \(digits has 1797"):
        build_config(HyperCleanConfig, None, ["dataset=digits", "n_train=1600"])
    with pytest.raises(HypergradientError, match="digits has only 997 examples left"):
        build_config(HyperCleanConfig, None, ["dataset=digits", "n_test=998"])
    with pytest.raises(HypergradientError, match="flips no label of 600"):
        build_config(HyperCleanConfig, None, ["dataset=digits", "noise=0.0001"])
    with pytest.raises(HypergradientError, match="option 'normalize': expected true or false"):
        dataclasses.replace(ReweightConfig(), normalize=1).validate()
    with pytest.raises(HypergradientError, match="option 'download': expected true or false"):
        dataclasses.replace(HyperCleanConfig(), download="yes").validate()


def test_missing_mnist_files_name_the_options(tmp_path):
    config = HyperCleanConfig(data_dir=str(tmp_path))
    with pytest.raises(HypergradientError, match=r"option 'dataset' = 'mnist' needs its files"):
        HyperCleanRecipe().run(config, tmp_path / "run", resume=False, progress=False,
                               console=_quiet())  # fmt: skip


def test_command_line(tmp_path, capsys):
    from hypergradient.cli import main

    for name in ("hyper-clean", "reweight"):
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "options (set in the --config TOML file" in capsys.readouterr().out
    sets = ["dataset=digits", "n_train=100", "n_val=60", "n_test=100", "inner_steps=5",
            "hyper_steps=2"]  # fmt: skip
    out = tmp_path / "run"
    assert main(["hyper-clean", "--set", *sets, "--out", str(out), "--no-progress"]) == 0
    assert "hyper-cleaning" in capsys.readouterr().out
    assert (out / "config.toml").is_file() and (out / "results.json").is_file()
    assert main(["hyper-clean", "--set", "noise=2", "--out", str(out)]) == 2
    assert "option 'noise'" in capsys.readouterr().err


def test_bilevel_trainer_moves_only_the_weights_of_the_batch():
    # Warm start, one-step look-ahead: the hypergradient of a batch reaches exactly the
    # weights of its examples (the others do not enter the look-ahead step).
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    xv, yv = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    batches = []

    class Recording:  # the training loader, recording every batch it yields
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for batch in self.loader:
                batches.append(batch[2].tolist())
                yield batch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    trainer = hg.BilevelTrainer(
        model,
        ExampleWeights(40),
        Recording(indexed_loader(x, y, batch_size=8)),
        indexed_loader(xv, yv, batch_size=20),
        torch.optim.SGD(model.parameters(), lr=0.5),
        hyper_optimizer=lambda hp: torch.optim.SGD(hp, lr=1.0),
        method=hg.Unrolled(steps=1),
        hyper_every=1,
        seed=0,
    )
    trainer.fit(3)
    # each hyper-step: one inner step (a batch), then one hypergradient batch
    assert len(batches) == 6
    hyper_batches = {i for b in batches[1::2] for i in b}
    moved = set((trainer.hparams["example_weights"] != 0).nonzero().flatten().tolist())
    assert moved == hyper_batches
    assert trainer.history[-1]["weight_mean"] != 1.0
