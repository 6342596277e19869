r"""``hypergradient hidden-units``: a sum of sigmoids' units from clustered gradient estimates.

The claim (Ioannidis & Montanari 2017, arXiv:1708.06678; the method is in
:mod:`hypergradient.sigmoid_units`): estimate the gradient of a black-box regression function
:math:`f(x) = c + \sum_j a_j\sigma(w_j^\top x + b_j)` at random points and cluster the
estimates; the cluster centres are the hidden units' parameter vectors (here: their
directions, up to sign; steepness, biases and amplitudes follow from a 1-D fit per cluster
and a least-squares polish).  It holds when at most one unit is in its transition region at
most points, i.e. when the units are steep compared with the spread of the inputs: the
recipe measures that regime too.

The experiment, for every seed in ``seeds`` and every query-noise level in ``noise``:

1. A random target: ``units`` unit directions in ``dim`` dimensions (Gaussian, normalised),
   steepness :math:`\lVert w_j\rVert \sim U[` ``min_norm``, ``max_norm`` :math:`]`, biases
   :math:`U[-1, 1]`, amplitudes :math:`\pm U[1, 2]`, offset 0.  Queries at
   :math:`x \sim N(0, I)` return :math:`f(x) + \varepsilon`, :math:`\varepsilon \sim N(0,
   \text{noise}^2)`.
2. Gradients at ``n_points`` points by central differences (step ``fd_step``, default
   :math:`\max(10^{-4}, 5\,\text{noise})`: truncation :math:`O(h^2)` against noise
   :math:`\text{noise}/h`), :math:`2 \cdot` ``dim`` queries each.
3. The number of units from the gap in the gradient matrix's singular values; the directions
   by spherical k-means on the normalised gradients, moved to the density peaks; every
   unit's steepness, bias and amplitude from its cluster's 1-D profile; then L-BFGS on all
   parameters against every queried value (``fit_iters`` iterations).
4. The baseline: the same network (with the estimated number of units) fitted by the same
   L-BFGS from ``restarts`` random initialisations (PyTorch's ``nn.Linear`` init).

Reported: the estimated number of units, :math:`\min_j |\cos|` between true and recovered
directions (best matching, sign-invariant) for the k-means centres, the peaks and the fitted
network, the relative test RMSE (RMSE / std of :math:`f` on ``n_test`` fresh points), and for
the random initialisations how many recover every direction (:math:`|\cos| > 0.99`) and
their median RMSE.  A steepness study (``study_norms``: units with :math:`\lVert
w_j\rVert \in [s, 2s]`, noiseless, clustering only) shows where the method stops working.

Cost per (seed, noise): ``2 * dim * n_points`` queries, an SVD, the clustering (well under
a second) and ``1 + restarts`` L-BFGS fits on ``2 * dim * n_points`` values (about 1 s
each on one core at the defaults).

Files in the run folder: ``results.json``, ``hidden_units.png`` (singular values; the
normalised gradients' cosine to the nearest true direction; recovery against steepness),
``runs.json`` (finished runs, reused by ``--resume``), ``config.toml``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from .. import sigmoid_units as su
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
from ._config import check_positive, check_positive_int, help_text, threads_field

SUCCESS_COS = 0.99  # a fit "recovers every direction" when min_j |cos| exceeds this


@dataclass
class HiddenUnitsConfig:
    """Options of ``hypergradient hidden-units`` (defaults: about 30 s on one CPU core)."""

    dim: int = field(default=10, metadata=help_text("input dimension d"))
    units: int = field(default=4, metadata=help_text("hidden units k of the target (1 <= k < dim)"))
    min_norm: float = field(
        default=4.0, metadata=help_text("smallest steepness |w_j| of a target unit (> 0)")
    )
    max_norm: float = field(
        default=8.0, metadata=help_text("largest steepness |w_j| of a target unit (>= min_norm)")
    )
    noise: list[float] = field(
        default_factory=lambda: [0.0, 0.01],
        metadata=help_text("standard deviations of the query noise to compare (>= 0)"),
    )
    n_points: int = field(
        default=1000, metadata=help_text("points with a gradient estimate (2 * dim queries each)")
    )
    fd_step: float | None = field(
        default=None,
        metadata=help_text(
            "central-difference step h (none: max(1e-4, 5 * noise) per noise level)"
        ),
    )
    fit_iters: int = field(
        default=500, metadata=help_text("L-BFGS iterations of every least-squares fit")
    )
    restarts: int = field(
        default=3, metadata=help_text("random initialisations of the baseline fit per run")
    )
    n_test: int = field(default=5000, metadata=help_text("fresh points for the test RMSE"))
    study_norms: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0],
        metadata=help_text(
            "steepness study: for each s, targets with |w_j| in [s, 2s], noiseless, "
            "clustering only (empty list: no study)"
        ),
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata=help_text("one target (and query set) per seed"),
    )
    threads: int = threads_field()

    def validate(self) -> None:
        for name in ("dim", "units", "n_points", "fit_iters", "restarts", "n_test"):
            check_positive_int(name, getattr(self, name), minimum=0 if name == "restarts" else 1)
        if self.dim < 2:
            raise HypergradientError(f"option 'dim': expected an integer >= 2, got {self.dim}.")
        if self.units >= self.dim:
            raise HypergradientError(
                f"option 'units': expected 1 <= units < dim (the units are counted by the rank "
                f"of the gradient matrix, at most dim - 1), got units={self.units}, "
                f"dim={self.dim}."
            )
        if self.n_points < 2 * self.units:
            raise HypergradientError(
                f"option 'n_points': expected at least 2 * units = {2 * self.units} points, "
                f"got {self.n_points}."
            )
        check_positive("min_norm", self.min_norm)
        check_positive("max_norm", self.max_norm)
        if self.max_norm < self.min_norm:
            raise HypergradientError(
                f"option 'max_norm': expected >= min_norm = {self.min_norm}, got {self.max_norm}."
            )
        _check_list("noise", self.noise, allow_empty=False)
        for value in self.noise:
            check_positive("noise", value, allow_zero=True)
        if self.fd_step is not None:
            check_positive("fd_step", self.fd_step)
        _check_list("study_norms", self.study_norms, allow_empty=True)
        for value in self.study_norms:
            check_positive("study_norms", value)
        _check_list("seeds", self.seeds, allow_empty=False)
        for seed in self.seeds:
            check_positive_int("seeds", seed, minimum=0)
        check_positive_int("threads", self.threads, minimum=0)

    def step_for(self, noise: float) -> float:
        return self.fd_step if self.fd_step is not None else max(1e-4, 5.0 * noise)


def _check_list(option: str, value: object, *, allow_empty: bool) -> None:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise HypergradientError(
            f"option {option!r}: expected a {'' if allow_empty else 'non-empty '}list "
            f"(e.g. {option}=1,2), got {value!r}."
        )
    if len(set(value)) != len(value):
        raise HypergradientError(f"option {option!r}: expected distinct values, got {value!r}.")


# ----------------------------------------------------------------------------- target


def make_target(dim: int, units: int, min_norm: float, max_norm: float, seed: int):
    """The random target network (float64) of the module docstring, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(units, dim, generator=gen, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    norms = min_norm + (max_norm - min_norm) * torch.rand(units, generator=gen, dtype=torch.float64)
    bias = 2 * torch.rand(units, generator=gen, dtype=torch.float64) - 1
    signs = torch.where(torch.rand(units, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    amplitude = (1 + torch.rand(units, generator=gen, dtype=torch.float64)) * signs
    return su.SumOfSigmoids(directions * norms[:, None], bias, amplitude, 0.0).requires_grad_(False)


def _relative_rmse(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean().sqrt() / y.std())


def _min_cos(estimated: torch.Tensor, true: torch.Tensor) -> float:
    return float(su.match_directions(estimated.detach(), true).min())


# ----------------------------------------------------------------------------- one run


def run_one(config: HiddenUnitsConfig, seed: int, noise: float, on_fit=None) -> dict[str, Any]:
    """One target, one noise level: gradients, count, clustering, fits, baseline."""
    target = make_target(config.dim, config.units, config.min_norm, config.max_norm, seed)
    true_w = target.weight.detach()
    gen = torch.Generator().manual_seed(10_000 + seed)

    def black_box(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return target(z) + noise * torch.randn(len(z), generator=gen, dtype=z.dtype)

    x = torch.randn(config.n_points, config.dim, generator=gen, dtype=torch.float64)
    x_test = torch.randn(config.n_test, config.dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y_test = target(x_test)

    start = time.perf_counter()
    grads, queries, values = su.finite_difference_gradients(black_box, x, config.step_for(noise))
    k_hat, singular_values = su.count_units(grads)
    clusters = su.cluster_directions(grads, k_hat, generator=gen)
    model = su.initial_units(x, grads, clusters)
    clustered_seconds = time.perf_counter() - start
    with torch.no_grad():
        model.offset += (values - model(queries)).mean()
    init_rmse = _relative_rmse(model, x_test, y_test)
    trace = su.fit(model, queries, values, max_iter=config.fit_iters)
    if not all(math.isfinite(v) for v in trace):
        raise HypergradientError(
            f"hidden-units: the least-squares fit diverged (seed {seed}, noise {noise}); "
            f"lower option 'fit_iters' or raise 'n_points'."
        )
    if on_fit is not None:
        on_fit(1)
    ours_seconds = time.perf_counter() - start

    # how concentrated the normalised gradients are: cosine to the nearest true direction
    norms = grads.norm(dim=1).clamp_min(1e-300)
    nearest = ((grads / norms[:, None]) @ (true_w / true_w.norm(dim=1, keepdim=True)).T).abs()
    baseline = []
    for r in range(config.restarts):
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 * seed + r)
            layer = torch.nn.Linear(config.dim, k_hat, dtype=torch.float64)
            amplitude = torch.randn(k_hat, dtype=torch.float64) / math.sqrt(k_hat)
        net = su.SumOfSigmoids(layer.weight.detach(), layer.bias.detach(), amplitude, 0.0)
        su.fit(net, queries, values, max_iter=config.fit_iters)
        baseline.append(
            {
                "min_cos": _min_cos(net.weight, true_w),
                "test_rel_rmse": _relative_rmse(net, x_test, y_test),
                "seconds": time.perf_counter() - t0,
            }
        )
        if on_fit is not None:
            on_fit(1)
    return {
        "seed": seed,
        "noise": noise,
        "fd_step": config.step_for(noise),
        "queries": int(len(values)),
        "units_estimated": k_hat,
        "singular_values": singular_values.tolist(),
        "min_cos": {
            "kmeans": _min_cos(clusters.kmeans_centers, true_w),
            "peaks": _min_cos(clusters.centers, true_w),
            "fitted": _min_cos(model.weight, true_w),
        },
        "steepness": {
            "true": sorted(true_w.norm(dim=1).tolist()),
            "initial": sorted(model.weight.detach().norm(dim=1).tolist()),
        },
        "test_rel_rmse": {"initial": init_rmse, "fitted": _relative_rmse(model, x_test, y_test)},
        "gradient_cos_to_nearest_unit": nearest.max(1).values.tolist(),
        "baseline": baseline,
        "seconds": {"clustering": clustered_seconds, "clustering_and_fit": ours_seconds},
    }


def run_study(config: HiddenUnitsConfig, seed: int, scale: float) -> dict[str, Any]:
    """Clustering only, noiseless, units with steepness in ``[scale, 2 scale]``."""
    target = make_target(config.dim, config.units, scale, 2 * scale, seed)
    gen = torch.Generator().manual_seed(20_000 + seed)
    x = torch.randn(config.n_points, config.dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        grads, _, _ = su.finite_difference_gradients(target, x, 1e-4)
    k_hat, _ = su.count_units(grads)
    clusters = su.cluster_directions(grads, k_hat, generator=gen)
    true_w = target.weight.detach()
    return {
        "seed": seed,
        "scale": scale,
        "units_estimated": k_hat,
        "min_cos_kmeans": _min_cos(clusters.kmeans_centers, true_w),
        "min_cos_peaks": _min_cos(clusters.centers, true_w),
    }


# Options that change a run; cached runs are reused only if they all match.
_RUN_KEYS = ("dim", "units", "min_norm", "max_norm", "n_points", "fd_step", "fit_iters",
             "restarts", "n_test")  # fmt: skip


def run_all(config: HiddenUnitsConfig, cache: RunCache, *, on_fit=None):
    """Every (seed, noise) run and every study point, kept in ``cache`` as they finish."""
    runs, study = [], []
    jobs = [("run", seed, float(noise)) for seed in config.seeds for noise in config.noise]
    jobs += [("study", seed, float(s)) for s in config.study_norms for seed in config.seeds]
    for kind, seed, value in jobs:
        key = f"{kind},seed={seed},value={value!r}"
        if key not in cache:
            if kind == "run":
                cache.put(key, run_one(config, seed, value, on_fit))
            else:
                cache.put(key, run_study(config, seed, value))
                if on_fit is not None:
                    on_fit(1)
        elif on_fit is not None:
            on_fit(1 + config.restarts if kind == "run" else 1)
        (runs if kind == "run" else study).append(cache[key])
    return runs, study


def summarize(config: HiddenUnitsConfig, runs: list[dict], study: list[dict]) -> dict[str, Any]:
    """Per noise level: worst case over seeds of our recovery, and the baseline's record."""
    per_noise = {}
    for noise in config.noise:
        rows = [r for r in runs if r["noise"] == float(noise)]
        fits = [b for r in rows for b in r["baseline"]]
        per_noise[repr(float(noise))] = {
            "units_correct": sum(r["units_estimated"] == config.units for r in rows),
            "runs": len(rows),
            "worst_min_cos": {
                key: min(r["min_cos"][key] for r in rows) for key in ("kmeans", "peaks", "fitted")
            },
            "worst_test_rel_rmse": max(r["test_rel_rmse"]["fitted"] for r in rows),
            "median_initial_rel_rmse": statistics.median(
                r["test_rel_rmse"]["initial"] for r in rows
            ),
            "ours_recovered": sum(r["min_cos"]["fitted"] > SUCCESS_COS for r in rows),
            "ours_seconds": statistics.mean(r["seconds"]["clustering_and_fit"] for r in rows),
            "baseline_recovered": sum(b["min_cos"] > SUCCESS_COS for b in fits),
            "baseline_fits": len(fits),
            "baseline_median_rel_rmse": statistics.median(b["test_rel_rmse"] for b in fits)
            if fits
            else None,
            "baseline_seconds": statistics.mean(b["seconds"] for b in fits) if fits else None,
        }
    per_scale = {}
    for scale in config.study_norms:
        rows = [r for r in study if r["scale"] == float(scale)]
        per_scale[repr(float(scale))] = {
            "units_correct": sum(r["units_estimated"] == config.units for r in rows),
            "runs": len(rows),
            "median_min_cos_kmeans": statistics.median(r["min_cos_kmeans"] for r in rows),
            "median_min_cos_peaks": statistics.median(r["min_cos_peaks"] for r in rows),
            "worst_min_cos_peaks": min(r["min_cos_peaks"] for r in rows),
        }
    return {"per_noise": per_noise, "per_scale": per_scale}


# ----------------------------------------------------------------------------- the recipe


@register_recipe
class HiddenUnitsRecipe(ThreadedRecipe):
    """Recover the hidden units of a black-box sum of sigmoids f(x) = sum_j a_j
    sigmoid(w_j . x + b_j) (random target with known parameters) by estimating its gradient at
    random points (central differences), counting the units from the gradient matrix's
    singular values and clustering the normalised gradients (Ioannidis & Montanari 2017);
    then fit steepness, biases and amplitudes and polish by least squares. Compared with the
    same least-squares fit from random initialisations, at several query-noise levels, plus
    a study of how steep the units must be.

    Writes config.toml, results.json, hidden_units.png and runs.json (finished runs;
    --resume reuses them) into the run folder.
    """

    name = "hidden-units"
    help = "hidden units of a sum of sigmoids by clustering gradient estimates"
    config_cls = HiddenUnitsConfig

    def _run(self, config, run_dir, *, resume, progress, console):
        run_dir.mkdir(parents=True, exist_ok=True)
        cache = RunCache(
            run_dir, {k: getattr(config, k) for k in _RUN_KEYS}, resume=resume, console=console
        )
        start = time.perf_counter()
        n_runs = len(config.seeds) * len(config.noise)
        total = n_runs * (1 + config.restarts) + len(config.seeds) * len(config.study_norms)
        with progress_bar(console, progress) as bar:
            task = bar.add_task(f"{n_runs} targets x noise levels (fits)", total=total)
            runs, study = run_all(config, cache, on_fit=lambda n: bar.advance(task, n))
        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": machine(),
            "success_cos": SUCCESS_COS,
            "summary": summarize(config, runs, study),
            "runs": runs,
            "study": study,
            "seconds": time.perf_counter() - start,
        }
        write_results(run_dir, results)
        plot(results, run_dir / "hidden_units.png")
        console.print(results_table(results))
        if config.study_norms:
            console.print(study_table(results))
        console.print(f"Wrote results.json and hidden_units.png to {run_dir}.")
        return results


def results_table(results: dict) -> Table:
    config, per_noise = results["config"], results["summary"]["per_noise"]
    n = len(config["seeds"])
    table = Table(
        title=f"Hidden units of a sum of {config['units']} sigmoids in {config['dim']} "
        f"dimensions (|w_j| in [{config['min_norm']:g}, {config['max_norm']:g}]), "
        f"{config['n_points']} gradient estimates, worst of {n} seeds"
    )
    columns = ("noise", "units found", "min|cos| k-means", "min|cos| peaks", "min|cos| fitted",
               "test rel. RMSE", "recovered", "random init: recovered", "median rel. RMSE",
               "time ours / random")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right")
    for noise, row in per_noise.items():
        base = row["baseline_median_rel_rmse"]
        base_time = row["baseline_seconds"]
        table.add_row(
            f"{float(noise):g}",
            f"{row['units_correct']}/{row['runs']}",
            f"{row['worst_min_cos']['kmeans']:.4f}",
            f"{row['worst_min_cos']['peaks']:.4f}",
            f"{row['worst_min_cos']['fitted']:.6f}",
            f"{row['worst_test_rel_rmse']:.1e}",
            f"{row['ours_recovered']}/{row['runs']}",
            f"{row['baseline_recovered']}/{row['baseline_fits']}",
            "-" if base is None else f"{base:.1e}",
            f"{row['ours_seconds']:.1f}s / " + ("-" if base_time is None else f"{base_time:.1f}s"),
        )
    table.caption = (
        f"recovered: every direction with |cos| > {results['success_cos']}; rel. RMSE = "
        f"RMSE / std f on {config['n_test']} fresh points; min|cos| over units, worst seed"
    )
    return table


def study_table(results: dict) -> Table:
    config, per_scale = results["config"], results["summary"]["per_scale"]
    table = Table(
        title=f"How steep must the units be? Noiseless, clustering only, {len(config['seeds'])} "
        f"seeds"
    )
    for col in ("|w_j| in", "units found", "median min|cos| k-means", "median min|cos| peaks",
                "worst min|cos| peaks"):  # fmt: skip
        table.add_column(col, justify="right")
    for scale, row in per_scale.items():
        s = float(scale)
        table.add_row(
            f"[{s:g}, {2 * s:g}]",
            f"{row['units_correct']}/{row['runs']}",
            f"{row['median_min_cos_kmeans']:.4f}",
            f"{row['median_min_cos_peaks']:.4f}",
            f"{row['worst_min_cos_peaks']:.4f}",
        )
    return table


def plot(results: dict, path: Path) -> None:
    """Singular values of the gradient matrix; how concentrated the normalised gradients are;
    recovery against steepness."""
    plt = pyplot()
    config = results["config"]
    first_seed = config["seeds"][0]
    runs = [r for r in results["runs"] if r["seed"] == first_seed]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    ax = axes[0]
    for i, run in enumerate(runs):
        values = run["singular_values"]
        ax.semilogy(range(1, len(values) + 1), values, marker="o", color=f"C{i}",
                    label=f"noise {run['noise']:g}")  # fmt: skip
    ax.axvline(config["units"] + 0.5, color="k", ls=":", lw=0.8, label="true number of units")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value of the gradient matrix")
    ax.set_title(f"Seed {first_seed}: the rank counts the units")
    ax.legend(fontsize=8)

    ax = axes[1]
    for i, run in enumerate(runs):
        ax.hist(run["gradient_cos_to_nearest_unit"], bins=50, range=(0, 1), histtype="step",
                color=f"C{i}", label=f"noise {run['noise']:g}")  # fmt: skip
    ax.set_xlabel("|cos| of a normalised gradient to the nearest true unit")
    ax.set_ylabel("gradients")
    ax.set_yscale("log")
    ax.set_title("Gradients concentrate at the units' directions")
    ax.legend(fontsize=8)

    ax = axes[2]
    per_scale = results["summary"]["per_scale"]
    if per_scale:
        scales = [float(s) for s in per_scale]
        for key, label, color in (
            ("median_min_cos_kmeans", "k-means centres (median)", "C1"),
            ("median_min_cos_peaks", "density peaks (median)", "C0"),
            ("worst_min_cos_peaks", "density peaks (worst seed)", "C2"),
        ):
            ax.plot(scales, [row[key] for row in per_scale.values()], marker="o", color=color,
                    label=label)  # fmt: skip
        ax.axhline(results["success_cos"], color="k", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    ax.set_xlabel("steepness scale s (|w_j| in [s, 2s])")
    ax.set_ylabel("min over units of |cos|")
    ax.set_title("Recovery needs steep units (noiseless)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
