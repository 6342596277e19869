"""Class-conditional label noise (``hypergradient.label_noise``) and ``hypergradient noisy-labels``.

* The threshold formulas are exact: on any clean posterior, thresholding the noisy posterior
  at the moved threshold gives the very same classifier as the clean Bayes rule.
* The rates are recovered exactly from an exact noisy posterior, and within a stated
  tolerance from an MLP trained on noisy labels (the recipe, two seeds).
* The paper's claim on synthetic data with known Bayes error: the corrected threshold's clean
  error is within 0.01 of the Bayes classifier's, and clearly below the naive threshold's
  when the noise is asymmetric (and the same as the naive one when it is symmetric).
* Every option rejects a bad value with one line naming it; ``--resume`` recomputes nothing.
"""

import dataclasses
import json
import math
import re

import pytest
import torch

import _readme
from _cli import assert_rejected, one_line_error
from hypergradient import HypergradientError, label_noise
from hypergradient.cli import main
from hypergradient.recipes import available_recipes, build_config
from hypergradient.recipes import noisy_labels as recipe
from hypergradient.recipes.noisy_labels import NoisyLabelsConfig

# ----------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize(("rho_pos", "rho_neg"), [(0.4, 0.1), (0.05, 0.3), (0.2, 0.2), (0, 0)])
def test_moved_threshold_on_noisy_posterior_is_the_clean_bayes_rule(rho_pos, rho_neg):
    eta = torch.rand(100_000)
    eta_noisy = label_noise.noisy_posterior(eta, rho_pos, rho_neg)
    torch.testing.assert_close(label_noise.clean_posterior(eta_noisy, rho_pos, rho_neg), eta)
    # 0-1 error: the Bayes rule is eta > 1/2 (ties have probability 0 with continuous eta)
    t = label_noise.clean_threshold(rho_pos, rho_neg)
    assert t == pytest.approx((1 - rho_pos + rho_neg) / 2, abs=1e-15)
    assert torch.equal(eta_noisy > t, eta > 0.5)
    # balanced error: the Bayes rule is eta > prior; the moved threshold is the noisy prior
    prior = 0.3
    t_bal = label_noise.clean_threshold(rho_pos, rho_neg, measure="balanced", prior=prior)
    assert t_bal == pytest.approx(label_noise.noisy_prior(prior, rho_pos, rho_neg), abs=1e-15)
    assert torch.equal(eta_noisy > t_bal, eta > prior)
    assert label_noise.clean_prior(t_bal, rho_pos, rho_neg) == pytest.approx(prior, abs=1e-12)


def test_naive_threshold_is_wrong_exactly_when_the_noise_is_asymmetric():
    eta = torch.linspace(0.0, 1.0, 10_001)
    for rho_pos, rho_neg, same in [(0.3, 0.3, True), (0.4, 0.1, False)]:
        eta_noisy = label_noise.noisy_posterior(eta, rho_pos, rho_neg)
        assert torch.equal(eta_noisy > 0.5, eta > 0.5) is same


def test_rates_and_prior_are_exact_from_an_exact_noisy_posterior():
    # clean posterior reaching 0 and 1 (the identifiability condition), noisy labels with a
    # known fraction of 1s: 0.1 + 0.5 * 0.4 = 0.3 for a clean prior 0.4
    eta_noisy = label_noise.noisy_posterior(torch.rand(1000) ** 2, 0.4, 0.1)
    eta_noisy[:2] = torch.tensor([0.1, 0.6])  # the two certain regions
    labels = torch.tensor([1] * 3 + [0] * 7)
    rates = label_noise.estimate_noise_rates(eta_noisy, labels)
    assert rates.rho_pos == pytest.approx(0.4, abs=1e-12)
    assert rates.rho_neg == pytest.approx(0.1, abs=1e-12)
    assert rates.prior == pytest.approx(0.4, abs=1e-12)
    assert label_noise.estimate_noise_rates(eta_noisy).prior is None


def test_flip_labels_flips_at_the_class_conditional_rates():
    y = torch.tensor([0, 1] * 20_000)
    noisy = label_noise.flip_labels(y, 0.4, 0.1, generator=torch.Generator().manual_seed(1))
    # 20000 draws per class: binomial std <= 0.0035, so 0.015 is > 4 std
    assert float((noisy[y == 1] == 0).double().mean()) == pytest.approx(0.4, abs=0.015)
    assert float((noisy[y == 0] == 1).double().mean()) == pytest.approx(0.1, abs=0.015)
    assert noisy.dtype == y.dtype


def test_closed_form_bayes_errors_match_monte_carlo():
    config = NoisyLabelsConfig(prior=0.35, separation=2.5)
    x, y = recipe.sample_gaussians(config, 400_000, torch.Generator().manual_seed(2))
    eta = recipe.true_posterior(config, x)
    closed = recipe.bayes_errors(config.separation, config.prior)
    mc_error = recipe.errors((eta > 0.5).long(), y)["error"]
    mc_balanced = recipe.errors((eta > config.prior).long(), y)["balanced_error"]
    # 400000 draws: the standard error of an error rate near 0.1 is below 0.0005
    assert mc_error == pytest.approx(closed["error"], abs=0.002)
    assert mc_balanced == pytest.approx(closed["balanced_error"], abs=0.002)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: label_noise.noisy_posterior(torch.rand(3), 0.6, 0.5), r"rho_pos \+ rho_neg < 1"),
        (lambda: label_noise.noisy_posterior(torch.rand(3), -0.1, 0.1), r"`rho_pos` must be"),
        (lambda: label_noise.clean_posterior(torch.rand(3), 0.1, 1.0), r"`rho_neg` must be"),
        (lambda: label_noise.noisy_prior(1.5, 0.1, 0.1), r"`prior` must be a probability"),
        (lambda: label_noise.clean_prior(-0.5, 0.1, 0.1), r"`noisy_prior` must be"),
        (lambda: label_noise.clean_threshold(0.1, 0.1, prior=0.3), r"does not use `prior`"),
        (lambda: label_noise.clean_threshold(0.1, 0.1, measure="balanced"), r"needs the clean"),
        (lambda: label_noise.clean_threshold(0.1, 0.1, measure="f1"), r"`measure` must be"),
        (lambda: label_noise.estimate_noise_rates(torch.rand(3, 2)), r"1-D tensor of at least"),
        (lambda: label_noise.estimate_noise_rates(torch.randn(5) + 3), r"probabilities in"),
        (lambda: label_noise.estimate_noise_rates(torch.rand(5), quantile=0.5), r"`quantile`"),
        (lambda: label_noise.estimate_noise_rates(torch.full((5,), 0.3)), r"posterior is flat"),
        (
            lambda: label_noise.estimate_noise_rates(torch.rand(5), torch.tensor([0, 2])),
            r"`noisy_labels` must be",
        ),
        (lambda: label_noise.flip_labels(torch.tensor([0, 3]), 0.1, 0.1), r"0s and 1s only"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, pattern):
    with pytest.raises(HypergradientError, match=pattern):
        call()


# ----------------------------------------------------------------------------- the recipe

BAD_VALUES = {
    "rho_pos": "1.0",
    "rho_neg": "-0.1",
    "prior": "0",
    "separation": "0",
    "dim": "0",
    "n_train": "10",
    "holdout": "1.5",
    "n_test": "0",
    "hidden": "2.5",
    "steps": "0",
    "lr": "-1",
    "weight_decay": "-1",
    "quantile": "0.5",
    "seeds": "0,0",
    "threads": "-1",
}


def test_every_option_has_a_bad_value_case():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(NoisyLabelsConfig)}


@pytest.mark.parametrize("option", sorted(BAD_VALUES))
def test_bad_option_value_gives_one_line_error_naming_it(option, tmp_path, capsys):
    assert_rejected("noisy-labels", option, BAD_VALUES[option], tmp_path / "run", capsys)


def test_rates_that_sum_to_one_are_rejected(tmp_path, capsys):
    argv = ["noisy-labels", "--out", str(tmp_path / "r"), "--set", "rho_pos=0.6", "rho_neg=0.4"]
    assert main(argv) == 2
    assert re.search(r"'rho_pos' \+ 'rho_neg': expected a sum < 1", one_line_error(capsys))


def test_recipe_recovers_the_rates_and_the_bayes_error_and_resumes(tmp_path, capsys, monkeypatch):
    """The paper's claim at the recipe's defaults (asymmetric noise 0.4 / 0.1, prior 0.35),
    two seeds."""
    assert "noisy-labels" in available_recipes()
    out = tmp_path / "run"
    assert main(["noisy-labels", "--out", str(out), "--no-progress", "--set", "seeds=0,1"]) == 0
    printed = capsys.readouterr().out
    assert "threshold from estimated rates" in printed
    assert (out / "noisy_labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert build_config(NoisyLabelsConfig, out / "config.toml").seeds == [0, 1]
    results = json.loads((out / "results.json").read_text())
    for run in results["runs"]:
        est, rules = run["estimated"], run["rules"]
        # the rates from 1500 held-out points of a 3500-point MLP fit: within 0.05 of the truth
        # (the recipe's 3 seeds are off by at most 0.03); the prior inherits both errors
        assert est["rho_pos"] == pytest.approx(0.4, abs=0.05)
        assert est["rho_neg"] == pytest.approx(0.1, abs=0.05)
        assert est["prior"] == pytest.approx(0.35, abs=0.06)
        # Bayes error 0.099: the corrected rule is within 0.01 of the Bayes classifier on the
        # same 20000 clean test points, and at least 0.02 below the naive rule (0.128 in
        # closed form, 0.029 worse than Bayes)
        assert rules["corrected"]["error"] - rules["bayes"]["error"] < 0.01
        assert rules["naive"]["error"] - rules["corrected"]["error"] > 0.02
        assert rules["corrected"]["threshold"] == pytest.approx(0.35, abs=0.03)
        # balanced error: the rate-free rule (threshold = fraction of noisy 1s) is within 0.01
        # of the Bayes balanced error and well below the naive rule's
        bayes_balanced = results["truth"]["bayes"]["balanced_error"]
        assert rules["balanced"]["balanced_error"] - bayes_balanced < 0.01
        assert rules["naive"]["balanced_error"] - rules["balanced"]["balanced_error"] > 0.05
    assert results["truth"]["bayes"]["error"] == pytest.approx(0.0990, abs=1e-4)

    # --resume of a finished study: nothing is recomputed, the same numbers come out
    def refuse(*args, **kwargs):
        raise AssertionError("a finished seed was recomputed")

    monkeypatch.setattr(recipe, "run_seed", refuse)
    argv = ["noisy-labels", "--out", str(out), "--no-progress", "--resume", "--set", "seeds=0,1"]
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["summary"] == results["summary"]


def test_symmetric_noise_needs_no_correction(tmp_path):
    """rho_pos = rho_neg: the corrected threshold stays near 1/2 and both rules agree."""
    config = NoisyLabelsConfig(rho_pos=0.2, rho_neg=0.2, seeds=[3], n_test=10_000)
    run = recipe.run_seed(config, 3)
    rules = run["rules"]
    assert rules["oracle"]["threshold"] == 0.5
    assert rules["corrected"]["threshold"] == pytest.approx(0.5, abs=0.03)
    assert abs(rules["corrected"]["error"] - rules["naive"]["error"]) < 0.01
    assert rules["naive"]["error"] - rules["bayes"]["error"] < 0.01
    assert math.isfinite(run["estimated"]["prior"])


README_EXAMPLE = _readme.example(
    "label_noise.flip_labels",
    rho_pos="rates.rho_pos",
    rho_neg="rates.rho_neg",
    threshold="threshold",
    naive="float(((eta_noisy > 0.5).long() != y).float().mean())",
    corrected="float(((eta_noisy > threshold).long() != y).float().mean())",
)


def test_readme_example_runs():
    """The README's label-noise example, as written, in a fresh (float32) interpreter."""
    run = README_EXAMPLE.run()
    values = run.values
    # the exact posterior on [-2, 2] reaches sigmoid(-8) = 3e-4 of certainty: rates within 1e-3
    assert values["rho_pos"] == pytest.approx(0.4, abs=1e-3)
    assert values["rho_neg"] == pytest.approx(0.1, abs=1e-3)
    assert values["threshold"] == pytest.approx(0.35, abs=1e-3)
    assert values["naive"] - values["corrected"] > 0.02
    assert "corrected" in run.stdout


def test_help_lists_every_option(capsys):
    from hypergradient.cli import _default_text
    from hypergradient.recipes._config import option_help

    with pytest.raises(SystemExit) as exit_info:
        main(["noisy-labels", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, help_text, default in option_help(NoisyLabelsConfig):
        assert re.search(rf"{name} \([^)]*, default {re.escape(_default_text(default))}\)", text)
        assert " ".join(help_text.split()) in text, name
