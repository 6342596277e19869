r"""``hypergradient noisy-labels``: a classifier trained on flipped labels, threshold corrected.

The claim (Natarajan et al. 2013, Thm. 9; Menon et al. 2015, Secs. 4 and 6; the math is in
:mod:`hypergradient.label_noise`): under class-conditional label noise with flip rates
:math:`\rho_+ = P(\tilde y = 0 \mid y = 1)` and :math:`\rho_- = P(\tilde y = 1 \mid y = 0)`,
the noisy posterior is :math:`\tilde\eta = \rho_- + (1 - \rho_+ - \rho_-)\,\eta`, so

* the clean Bayes classifier is :math:`1[\tilde\eta(x) > (1 - \rho_+ + \rho_-)/2]`, and the
  naive threshold :math:`1/2` is wrong whenever :math:`\rho_+ \ne \rho_-`;
* the balanced-error Bayes classifier is :math:`1[\tilde\eta(x) > \tilde\pi]` (the fraction of
  noisy labels 1): no rates needed;
* :math:`\min\tilde\eta = \rho_-` and :math:`\max\tilde\eta = 1 - \rho_+` when the clean
  classes have regions of certainty, so a probabilistic classifier trained on the noisy
  labels alone estimates the rates, and with them the clean prior and the threshold.

The experiment, on synthetic data with known ground truth, for every seed in ``seeds``:

1. Two Gaussian classes in ``dim`` dimensions, :math:`N(\pm\tfrac{\Delta}{2} e_1, I)` with
   :math:`\Delta` = ``separation`` and prior ``prior`` = :math:`P(y = 1)`: the clean
   posterior is :math:`\eta(x) = \sigma(\Delta x_1 + \log\frac{\pi}{1 - \pi})` and the Bayes
   error is :math:`\pi\Phi(-\tfrac{\Delta}{2} - \tfrac{r}{\Delta}) + (1 - \pi)
   \Phi(-\tfrac{\Delta}{2} + \tfrac{r}{\Delta})`, :math:`r = \log\frac{\pi}{1 - \pi}`
   (balanced: :math:`\Phi(-\Delta/2)`).  ``n_train`` training labels are flipped with rates
   ``rho_pos``, ``rho_neg``; the ``n_test`` test labels stay clean.
2. An MLP ``dim -> hidden (tanh) -> 1`` is fitted (full-batch Adam, binary cross-entropy) to
   the noisy labels of a fraction ``1 - holdout`` of the training set.  On the held-out
   noisy part (never fitted: the extremes of fitted points are over-fitted) the rates are
   read off the ``quantile`` and ``1 - quantile`` quantiles of its posterior; the prior
   comes from them and the fraction of noisy labels 1 (all ``n_train``).
3. Clean test error and balanced error of the noisy model thresholded at: 1/2 (naive);
   :math:`(1 - \hat\rho_+ + \hat\rho_-)/2` (corrected, estimated rates); the same with the
   true rates (oracle); :math:`\hat{\tilde\pi}` (balanced-error rule); next to the same MLP
   trained on the clean labels and the Bayes classifier (true posterior).

Cost per seed: two MLP fits of ``steps`` full-batch steps on ``n_train * (1 - holdout)``
points (about 2 s each on one core at the defaults) and a few evaluations.

Files in the run folder: ``results.json``, ``noisy_labels.png`` (estimated vs true noisy
posterior along :math:`x_1` with the thresholds; clean test error per rule),
``seeds.json`` (finished seeds, reused by ``--resume``), ``config.toml``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from .. import label_noise
from .._errors import HypergradientError
from ._base import (
    RunCache,
    ThreadedRecipe,
    machine,
    progress_bar,
    pyplot,
    register_recipe,
    write_results,
)
from ._config import check_fraction, check_positive, check_positive_int, help_text, threads_field

# the rules compared, in table order: (key, label)
RULES = (
    ("clean_model", "MLP on clean labels, threshold 1/2 (reference)"),
    ("naive", "noisy labels, threshold 1/2 (naive)"),
    ("corrected", "noisy labels, threshold from estimated rates"),
    ("oracle", "noisy labels, threshold from true rates"),
    ("balanced", "noisy labels, threshold = fraction of noisy 1s"),
    ("bayes", "Bayes classifier (true posterior)"),
)


@dataclass
class NoisyLabelsConfig:
    """Options of ``hypergradient noisy-labels`` (defaults: about 15 s on one CPU core)."""

    rho_pos: float = field(
        default=0.4, metadata=help_text("flip rate P(noisy 0 | clean 1), in [0, 1)")
    )
    rho_neg: float = field(
        default=0.1, metadata=help_text("flip rate P(noisy 1 | clean 0); rho_pos + rho_neg < 1")
    )
    prior: float = field(default=0.35, metadata=help_text("clean class prior P(y = 1), in (0, 1)"))
    separation: float = field(
        default=2.5, metadata=help_text("distance between the two Gaussian class means (> 0)")
    )
    dim: int = field(default=2, metadata=help_text("input dimension (the classes differ in x_1)"))
    n_train: int = field(
        default=5000, metadata=help_text("noisy training examples (fit + held-out parts)")
    )
    holdout: float = field(
        default=0.3,
        metadata=help_text(
            "fraction of the noisy training set kept out of the fit to estimate the rates "
            "and the prior, in (0, 1)"
        ),
    )
    n_test: int = field(default=20000, metadata=help_text("clean test examples"))
    hidden: int = field(
        default=32, metadata=help_text("hidden width of the MLP dim -> hidden -> 1")
    )
    steps: int = field(default=500, metadata=help_text("full-batch Adam steps per fit"))
    lr: float = field(default=0.01, metadata=help_text("Adam learning rate"))
    weight_decay: float = field(
        default=1e-3, metadata=help_text("Adam weight decay (>= 0): keeps the extremes tame")
    )
    quantile: float = field(
        default=0.05,
        metadata=help_text(
            "rates from the quantile and 1 - quantile of the held-out noisy posterior, in "
            "[0, 0.5) (0: min and max, which over-fit)"
        ),
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata=help_text("one run per seed (data, noise, init); the table shows mean +- std"),
    )
    threads: int = threads_field()

    def validate(self) -> None:
        for name in ("rho_pos", "rho_neg"):
            check_fraction(name, getattr(self, name))
        if self.rho_pos + self.rho_neg >= 1:
            raise HypergradientError(
                f"options 'rho_pos' + 'rho_neg': expected a sum < 1 (else the noisy labels "
                f"carry no information about the clean ones), got {self.rho_pos} + "
                f"{self.rho_neg}."
            )
        for name in ("prior", "holdout"):
            value = getattr(self, name)
            check_fraction(name, value)
            if value == 0:
                raise HypergradientError(f"option {name!r}: expected a number in (0, 1), got 0.")
        for name in ("separation", "lr"):
            check_positive(name, getattr(self, name))
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        for name in ("dim", "n_train", "n_test", "hidden", "steps"):
            check_positive_int(name, getattr(self, name))
        if self.n_train < 20:
            raise HypergradientError(
                f"option 'n_train': expected at least 20 examples (fit and held-out parts), "
                f"got {self.n_train}."
            )
        if not isinstance(self.quantile, (int, float)) or not 0 <= self.quantile < 0.5:
            raise HypergradientError(
                f"option 'quantile': expected a number in [0, 0.5), got {self.quantile!r}."
            )
        if (
            not isinstance(self.seeds, list)
            or not self.seeds
            or len(set(self.seeds)) != len(self.seeds)
        ):
            raise HypergradientError(
                f"option 'seeds': expected a non-empty list of distinct integers >= 0 (e.g. "
                f"seeds=0,1,2), got {self.seeds!r}."
            )
        for seed in self.seeds:
            check_positive_int("seeds", seed, minimum=0)
        check_positive_int("threads", self.threads, minimum=0)


# ----------------------------------------------------------------------------- ground truth


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def bayes_errors(separation: float, prior: float) -> dict[str, float]:
    """Closed forms for :math:`N(\\pm\\tfrac{\\Delta}{2} e_1, I)` with prior ``prior``: the
    Bayes 0-1 error and the Bayes balanced error (module docstring)."""
    r = math.log(prior / (1.0 - prior))
    half = separation / 2.0
    error = prior * _normal_cdf(-half - r / separation) + (1 - prior) * _normal_cdf(
        -half + r / separation
    )
    return {"error": error, "balanced_error": _normal_cdf(-half)}


def sample_gaussians(
    config: NoisyLabelsConfig, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points ``(n, dim)`` float64 and clean labels ``(n,)`` in ``{0, 1}``."""
    y = (torch.rand(n, generator=generator, dtype=torch.float64) < config.prior).long()
    x = torch.randn(n, config.dim, generator=generator, dtype=torch.float64)
    x[:, 0] += (y.double() - 0.5) * config.separation
    return x, y


def true_posterior(config: NoisyLabelsConfig, x: torch.Tensor) -> torch.Tensor:
    """:math:`\\eta(x) = \\sigma(\\Delta x_1 + \\log\\frac{\\pi}{1-\\pi})` (Bayes' rule on the
    two unit-covariance Gaussians)."""
    log_odds = math.log(config.prior / (1.0 - config.prior))
    return torch.sigmoid(config.separation * x[:, 0] + log_odds)


# ----------------------------------------------------------------------------- model


def fit_posterior(
    config: NoisyLabelsConfig, x: torch.Tensor, y: torch.Tensor, seed: int, on_step=None
) -> nn.Module:
    """The MLP ``dim -> hidden (tanh) -> 1`` (float64) fitted to labels ``y`` by full-batch
    Adam on the binary cross-entropy; its sigmoid estimates :math:`P(y = 1 \\mid x)`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(config.dim, config.hidden, dtype=torch.float64),
            nn.Tanh(),
            nn.Linear(config.hidden, 1, dtype=torch.float64),
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    target = y.double()
    for step in range(1, config.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), target)
        loss.backward()
        optimizer.step()
        if on_step is not None and (step % 50 == 0 or step == config.steps):
            on_step(50 if step % 50 == 0 else step % 50)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise HypergradientError(
            f"noisy-labels: the MLP fit diverged (loss {value}); lower option 'lr' (now "
            f"{config.lr})."
        )
    return model


@torch.no_grad()
def posterior(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(model(x).squeeze(1))


def errors(predicted: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """0-1 error and balanced error (mean of the two class-conditional error rates)."""
    wrong = (predicted != y).double()
    per_class = [float(wrong[y == c].mean()) for c in (0, 1)]
    return {"error": float(wrong.mean()), "balanced_error": 0.5 * sum(per_class)}


# ----------------------------------------------------------------------------- one seed


def run_seed(config: NoisyLabelsConfig, seed: int, on_step=None) -> dict[str, Any]:
    """Data, noise, both fits, the rate estimates and every rule's clean test errors."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    x, y = sample_gaussians(config, config.n_train, gen)
    y_noisy = label_noise.flip_labels(y, config.rho_pos, config.rho_neg, generator=gen)
    x_test, y_test = sample_gaussians(config, config.n_test, gen)
    n_held = max(2, round(config.holdout * config.n_train))
    x_fit, y_fit, y_fit_clean = x[n_held:], y_noisy[n_held:], y[n_held:]
    x_held = x[:n_held]

    noisy_model = fit_posterior(config, x_fit, y_fit, seed, on_step)
    clean_model = fit_posterior(config, x_fit, y_fit_clean, seed, on_step)
    # the rates from held-out points only (the fit over-fits its own extremes); the fraction
    # of noisy 1s is a plain mean, best over every noisy label
    rates = label_noise.estimate_noise_rates(
        posterior(noisy_model, x_held), y_noisy, quantile=config.quantile
    )
    thresholds = {
        "naive": 0.5,
        "corrected": label_noise.clean_threshold(rates.rho_pos, rates.rho_neg),
        "oracle": label_noise.clean_threshold(config.rho_pos, config.rho_neg),
        "balanced": float(y_noisy.double().mean()),
    }
    eta_noisy_test = posterior(noisy_model, x_test)
    rules: dict[str, dict[str, float]] = {}
    rules["clean_model"] = errors((posterior(clean_model, x_test) > 0.5).long(), y_test)
    for key, t in thresholds.items():
        rules[key] = errors((eta_noisy_test > t).long(), y_test) | {"threshold": t}
    rules["bayes"] = errors((true_posterior(config, x_test) > 0.5).long(), y_test)

    # the noisy posterior along x_1 (other coordinates 0), estimated and true, for the plot
    grid = torch.zeros(121, config.dim, dtype=torch.float64)
    grid[:, 0] = torch.linspace(-4.0, 4.0, 121, dtype=torch.float64)
    true_noisy = label_noise.noisy_posterior(
        true_posterior(config, grid), config.rho_pos, config.rho_neg
    )
    return {
        "seed": seed,
        "estimated": {"rho_pos": rates.rho_pos, "rho_neg": rates.rho_neg, "prior": rates.prior},
        "flipped_fraction": float((y_noisy != y).double().mean()),
        "rules": rules,
        "curve": {
            "x1": grid[:, 0].tolist(),
            "estimated_noisy_posterior": posterior(noisy_model, grid).tolist(),
            "true_noisy_posterior": true_noisy.tolist(),
        },
        "seconds": time.perf_counter() - start,
    }


# Options that change a seed's run; cached seeds are reused only if they all match.
_RUN_KEYS = ("rho_pos", "rho_neg", "prior", "separation", "dim", "n_train", "holdout", "n_test",
             "hidden", "steps", "lr", "weight_decay", "quantile")  # fmt: skip


def run_all(config: NoisyLabelsConfig, cache: RunCache, *, on_step=None) -> list[dict[str, Any]]:
    """Every seed, each kept in ``cache`` (``seeds.json``) as soon as it finishes."""
    runs = []
    for seed in config.seeds:
        key = str(seed)
        if key not in cache:
            cache.put(key, run_seed(config, seed, on_step))
        elif on_step is not None:
            on_step(2 * config.steps)
        runs.append(cache[key])
    return runs


def _mean_std(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return {"mean": mean, "std": math.sqrt(var)}


def summarize(config: NoisyLabelsConfig, runs: list[dict]) -> dict[str, Any]:
    """Mean and std over seeds of every estimate and every rule's errors."""
    estimated = {
        k: _mean_std([r["estimated"][k] for r in runs]) for k in ("rho_pos", "rho_neg", "prior")
    }
    rules = {}
    for key, _ in RULES:
        rules[key] = {
            m: _mean_std([r["rules"][key][m] for r in runs]) for m in ("error", "balanced_error")
        }
        if "threshold" in runs[0]["rules"][key]:
            rules[key]["threshold"] = _mean_std([r["rules"][key]["threshold"] for r in runs])
    worst = {
        k: max(abs(r["estimated"][k] - getattr(config, k)) for r in runs)
        for k in ("rho_pos", "rho_neg", "prior")
    }
    return {"estimated": estimated, "rules": rules, "max_abs_estimation_error": worst}


# ----------------------------------------------------------------------------- the recipe


@register_recipe
class NoisyLabelsRecipe(ThreadedRecipe):
    """Train a classifier on labels flipped with class-conditional rates (two Gaussian classes,
    known ground truth), estimate the flip rates and the clean prior from the range of its
    posterior on held-out noisy data (Menon et al. 2015), and move the decision threshold to
    (1 - rho_pos + rho_neg) / 2 (Natarajan et al. 2013). Reports clean test error and balanced
    error for the naive threshold 1/2, the corrected one, the one with the true rates, the
    balanced-error rule, an MLP trained on clean labels and the Bayes classifier.

    Writes config.toml, results.json, noisy_labels.png and seeds.json (finished seeds;
    --resume reuses them) into the run folder.
    """

    name = "noisy-labels"
    help = "class-conditional label noise: estimate the flip rates, correct the threshold"
    config_cls = NoisyLabelsConfig

    def _run(self, config, run_dir, *, resume, progress, console):
        run_dir.mkdir(parents=True, exist_ok=True)
        cache = RunCache(
            run_dir,
            {k: getattr(config, k) for k in _RUN_KEYS},
            resume=resume,
            console=console,
            name="seeds.json",
        )
        start = time.perf_counter()
        with progress_bar(console, progress) as bar:
            task = bar.add_task(
                f"{len(config.seeds)} seeds x 2 fits (Adam steps)",
                total=2 * config.steps * len(config.seeds),
            )
            runs = run_all(config, cache, on_step=lambda n: bar.advance(task, n))
        summary = summarize(config, runs)
        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": machine(),
            "truth": {
                "rho_pos": config.rho_pos,
                "rho_neg": config.rho_neg,
                "prior": config.prior,
                "noisy_prior": label_noise.noisy_prior(
                    config.prior, config.rho_pos, config.rho_neg
                ),
                "bayes": bayes_errors(config.separation, config.prior),
                "oracle_threshold": label_noise.clean_threshold(config.rho_pos, config.rho_neg),
            },
            "summary": summary,
            "runs": runs,
            "seconds": time.perf_counter() - start,
        }
        write_results(run_dir, results)
        plot(results, run_dir / "noisy_labels.png")
        console.print(rates_table(results))
        console.print(results_table(results))
        rules = summary["rules"]
        gain = rules["naive"]["error"]["mean"] - rules["corrected"]["error"]["mean"]
        excess = rules["corrected"]["error"]["mean"] - results["truth"]["bayes"]["error"]
        console.print(
            f"corrected threshold: clean test error {gain:+.4f} below the naive one, "
            f"{excess:+.4f} above the Bayes error. Wrote results.json and noisy_labels.png "
            f"to {run_dir}."
        )
        return results


def _pm(stat: dict[str, float], digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def rates_table(results: dict) -> Table:
    summary, truth = results["summary"], results["truth"]
    table = Table(title=f"Estimated noise over {len(results['runs'])} seeds (mean ± std)")
    for col in ("quantity", "true", "estimated", "max |error|"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    names = {
        "rho_pos": "rho_pos = P(noisy 0 | clean 1)",
        "rho_neg": "rho_neg = P(noisy 1 | clean 0)",
        "prior": "clean prior P(y = 1)",
    }
    for key, label in names.items():
        table.add_row(
            label,
            f"{truth[key]:.4f}",
            _pm(summary["estimated"][key]),
            f"{summary['max_abs_estimation_error'][key]:.4f}",
        )
    return table


def results_table(results: dict) -> Table:
    config, truth, rules = results["config"], results["truth"], results["summary"]["rules"]
    table = Table(
        title=f"Clean test error, {config['n_test']} test points, rho_pos={config['rho_pos']:g}, "
        f"rho_neg={config['rho_neg']:g}, prior={config['prior']:g}, separation="
        f"{config['separation']:g} (mean ± std over {len(results['runs'])} seeds)"
    )
    for col in ("classifier", "threshold on noisy posterior", "error", "balanced error"):
        table.add_column(col, justify="left" if col == "classifier" else "right")
    for key, label in RULES:
        row = rules[key]
        threshold = _pm(row["threshold"], 3) if "threshold" in row else "-"
        table.add_row(label, threshold, _pm(row["error"]), _pm(row["balanced_error"]))
    bayes = truth["bayes"]
    table.add_row(
        "Bayes (closed form)", "-", f"{bayes['error']:.4f}", f"{bayes['balanced_error']:.4f}"
    )
    table.caption = (
        f"true thresholds: error (1 - rho_pos + rho_neg)/2 = {truth['oracle_threshold']:.3f}, "
        f"balanced error = noisy prior {truth['noisy_prior']:.3f}"
    )
    return table


def plot(results: dict, path: Path) -> None:
    """Left: the first seed's estimated noisy posterior along x_1 against the true one, with
    the estimated range and the thresholds.  Right: clean test error per rule."""
    plt = pyplot()
    run, truth = results["runs"][0], results["truth"]
    curve = run["curve"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    ax.plot(curve["x1"], curve["true_noisy_posterior"], color="k", label="true noisy posterior")
    ax.plot(curve["x1"], curve["estimated_noisy_posterior"], color="C0",
            label="MLP on noisy labels")  # fmt: skip
    est = run["estimated"]
    ax.axhline(est["rho_neg"], color="C0", ls=":", lw=1, label="estimated rho_neg, 1 - rho_pos")
    ax.axhline(1 - est["rho_pos"], color="C0", ls=":", lw=1)
    ax.axhline(0.5, color="C3", ls="--", lw=1, label="naive threshold 1/2")
    ax.axhline(run["rules"]["corrected"]["threshold"], color="C2", ls="--", lw=1,
               label="corrected threshold")  # fmt: skip
    ax.axhline(truth["oracle_threshold"], color="k", ls="--", lw=0.8, label="true-rate threshold")
    ax.set_xlabel("x_1 (the other coordinates 0)")
    ax.set_ylabel("P(noisy label = 1 | x)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Seed {run['seed']}: noisy posterior and thresholds")
    ax.legend(fontsize=8)

    ax = axes[1]
    rules = results["summary"]["rules"]
    keys = [k for k, _ in RULES]
    means = [rules[k]["error"]["mean"] for k in keys]
    stds = [rules[k]["error"]["std"] for k in keys]
    colors = ["0.6", "C3", "C2", "k", "C1", "0.3"]
    ax.bar(range(len(keys)), means, yerr=stds, color=colors)
    ax.axhline(truth["bayes"]["error"], color="k", lw=0.8, ls=":", label="Bayes error")
    ax.set_xticks(range(len(keys)), ["clean\nmodel", "naive", "corrected", "true\nrates",
                                     "balanced\nrule", "Bayes"])  # fmt: skip
    low = min(means) - 0.02
    ax.set_ylim(max(0.0, low), max(means) + 0.02)
    ax.set_ylabel("clean test error")
    ax.set_title("Clean test error per decision rule")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
