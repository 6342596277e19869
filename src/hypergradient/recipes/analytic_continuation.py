r"""``hypergradient analytic-continuation``: a learned unrolled optimizer against MaxEnt and
Tikhonov on held-out spectra (Huang & Yang, PRB 105, 075112, 2022, at laptop scale).

The experiment (:mod:`hypergradient.continuation`; ``benchmarks/analytic_continuation.py``
is the full study):

1. **Problem and data.**  The fermionic kernel :math:`K(\tau, \omega) = e^{-\tau\omega} /
   (1 + e^{-\beta\omega})` on ``n_tau`` imaginary times and ``n_w`` frequencies on
   ``[-w_max, w_max]``.  Training (``n_train`` per family and noise level) and validation
   (``n_val``) spectra of the ``families`` (Gaussian mixtures, Lorentzians, gapped) with
   independent Gaussian noise, :math:`\sigma = \text{rel} \cdot \max|G|` for every ``rel`` of
   ``noise``; the ``unseen`` families (a quasiparticle peak on a background) are never used
   for training or choosing.
2. **Meta-training.**  :class:`~hypergradient.continuation.LearnedContinuation` (``n_iter``
   unrolled ADMM iterations with learned penalties, relaxations, dual steps and smoothing
   filters; :math:`n_\text{iter}(3 + \text{filter\_width})` parameters) is trained by
   :func:`~hypergradient.continuation.meta_train` on the L1 error of :math:`A` for
   ``meta_steps`` Adam steps, in rounds of ``checkpoint_every`` steps: each round starts from
   the best parameters so far (by validation L1), with a fresh Adam and its own batch order,
   and ends with a checkpoint.
3. **Choices, on validation only.**  Tikhonov's :math:`\lambda` per noise level: the
   ``tikhonov_lams`` entry with the lowest mean L1 error of :math:`A` on ``n_val_select``
   validation spectra per family (:func:`~hypergradient.continuation.select`; the residual
   in :math:`G` is recorded, never used).
4. **Test.**  ``n_test`` spectra per family (seen and unseen) and noise level, drawn with a
   seed of their own, written once to ``test_set/`` (tensors + a sha256 manifest) and read
   back with :func:`~hypergradient.continuation.load_test_set`; per method, noise level and
   seen/unseen families: the L1 error :math:`\int |A - A_\text{true}| d\omega`, the main
   peak's position and weight errors and the time per spectrum, for the learned optimizer,
   MaxEnt with a flat default model, MaxEnt with the learned optimizer's output as default
   model (``default_mix`` of it and the rest flat, so that it is positive everywhere) and
   non-negative Tikhonov.

Cost: meta-training is ``meta_steps`` forward and backward passes through ``n_iter``
iterations for ``batch_size`` spectra (:math:`O(\text{batch} \cdot n_\text{iter} \cdot n_w
n_\tau)` each); MaxEnt (about a quarter of a second per spectrum at the defaults) dominates
the test.  The defaults take about a minute on a 2-core laptop; for the paper's scale raise
``n_tau``, ``n_w``, ``n_train``, ``meta_steps``, ``n_test`` and add noise levels
(``--set noise=1e-2,1e-3,1e-4``).

Files in the run folder: ``config.toml``, ``results.json``, ``reconstructions.png`` (the
``plot_cases`` test spectra against the truth, one row per noise level),
``meta_training.png`` (training loss and validation L1 per Adam step), ``history.json``,
``test_set/`` (``test_set.pt`` and ``manifest.json``), ``learned_continuation.pt`` (the
learned parameters, a plain dict of tensors: read it with ``weights_only=True`` and pass it
to ``LearnedContinuation.load_state_dict``),
``checkpoint.pt`` and ``checkpoint_options.json`` (``--resume`` continues the
meta-training), ``evaluation.json`` (finished test rows; ``--resume`` reuses them).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .. import continuation as ac
from .._errors import HypergradientError
from .._io import write_json_atomic
from ..continuation.max_entropy import _ALPHA_RULES
from ..continuation.metrics import l1_error, peak_errors, residual, select
from ..continuation.unrolled_solver import meta_train
from ._base import (
    RunCache,
    ThreadedRecipe,
    load_checkpoint,
    machine,
    pyplot,
    register_recipe,
    resume_or_start_over,
    save_atomic,
    write_results,
)
from ._config import (
    check_choice,
    check_positive,
    check_positive_int,
    help_text,
    threads_field,
)

METHODS = ("learned optimizer", "MaxEnt, flat default", "MaxEnt, neural default", "Tikhonov NNLS")
TEST_SET = "test_set"
# the data sets' seeds, apart from each other (make_dataset derives every block from them)
_TRAIN_SEED, _VAL_SEED, _TEST_SEED = 1, 2, 1000


@dataclass
class AnalyticContinuationConfig:
    """Options of ``hypergradient analytic-continuation`` (defaults: about a minute on 2 CPU
    cores)."""

    beta: float = field(default=20.0, metadata=help_text("inverse temperature of the kernel"))
    n_tau: int = field(default=51, metadata=help_text("imaginary times on [0, beta]"))
    n_w: int = field(default=201, metadata=help_text("real frequencies on [-w_max, w_max]"))
    w_max: float = field(default=8.0, metadata=help_text("the frequency grid's half-width"))
    noise: list[float] = field(
        default_factory=lambda: [1e-3],
        metadata=help_text(
            "relative noise levels: sigma = noise * max|G| per spectrum; training and "
            "validation use all of them, the test reports each"
        ),
    )
    families: list[str] = field(
        default_factory=lambda: ["gaussians", "lorentzians", "gapped"],
        metadata=help_text(
            f"spectra families of training, validation and test: from {list(ac.FAMILIES)}"
        ),
    )
    unseen: list[str] = field(
        default_factory=lambda: ["quasiparticle"],
        metadata=help_text("families only in the test set (rows of their own); may be empty"),
    )
    n_train: int = field(
        default=200, metadata=help_text("training spectra per family and noise level")
    )
    n_val: int = field(
        default=20,
        metadata=help_text("validation spectra per family and noise level (meta-training)"),
    )
    n_val_select: int = field(
        default=4,
        metadata=help_text(
            "of those, per family: the spectra on which Tikhonov's lambda is chosen"
        ),
    )
    n_test: int = field(default=10, metadata=help_text("test spectra per family and noise level"))
    n_iter: int = field(default=10, metadata=help_text("unrolled iterations of the learned solver"))
    filter_width: int = field(
        default=5, metadata=help_text("taps of each iteration's smoothing filter (odd)")
    )
    rho: float = field(
        default=1e3, metadata=help_text("initial ADMM penalty of every iteration (whitened units)")
    )
    meta_steps: int = field(default=300, metadata=help_text("Adam steps of meta-training"))
    lr: float = field(default=1e-2, metadata=help_text("Adam's learning rate"))
    batch_size: int = field(default=32, metadata=help_text("training spectra per Adam step"))
    truncate: int | None = field(
        default=None,
        metadata=help_text(
            "backpropagate through the last this many iterations only (none: all of them)"
        ),
    )
    eval_every: int = field(
        default=10, metadata=help_text("Adam steps between validation L1 measurements")
    )
    checkpoint_every: int = field(
        default=25,
        metadata=help_text(
            "Adam steps per round: a checkpoint after each; a round restarts Adam from the "
            "best parameters so far"
        ),
    )
    maxent_alpha: str = field(
        default="chi2kink",
        metadata=help_text(f"MaxEnt's rule for alpha: one of {list(_ALPHA_RULES)}"),
    )
    default_mix: float = field(
        default=0.95,
        metadata=help_text(
            "neural default model = mix * learned output + (1 - mix) * flat, in (0, 1)"
        ),
    )
    tikhonov_lams: list[float] = field(
        default_factory=lambda: [1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4],
        metadata=help_text("Tikhonov weights to choose from on validation (by L1 of A)"),
    )
    plot_cases: list[int] | None = field(
        default=None,
        metadata=help_text(
            "test spectra to plot, as row indices of the test set (rows grouped by family, "
            "families then unseen, n_test each); none: the first of every family"
        ),
    )
    seed: int = field(default=0, metadata=help_text("seed of every data set and batch order"))
    threads: int = threads_field()

    @property
    def test_families(self) -> list[str]:
        return [*self.families, *self.unseen]

    def validate(self) -> None:
        for name in ("n_tau", "n_w"):
            check_positive_int(name, getattr(self, name), minimum=2)
        for name in ("n_train", "n_val", "n_val_select", "n_test", "n_iter", "meta_steps",
                     "batch_size", "eval_every", "checkpoint_every"):  # fmt: skip
            check_positive_int(name, getattr(self, name))
        check_positive_int("seed", self.seed, minimum=0)
        check_positive_int("threads", self.threads, minimum=0)
        for name in ("beta", "w_max", "rho", "lr"):
            check_positive(name, getattr(self, name))
        check_positive_int("filter_width", self.filter_width)
        if self.filter_width % 2 == 0:
            raise HypergradientError(
                f"option 'filter_width': expected an odd integer >= 1 (a centred filter), got "
                f"{self.filter_width!r}."
            )
        if self.truncate is not None:
            check_positive_int("truncate", self.truncate)
            if self.truncate > self.n_iter:
                raise HypergradientError(
                    f"option 'truncate': expected at most n_iter = {self.n_iter} (or none), got "
                    f"{self.truncate}."
                )
        if self.n_val_select > self.n_val:
            raise HypergradientError(
                f"option 'n_val_select': expected at most n_val = {self.n_val}, got "
                f"{self.n_val_select}."
            )
        check_choice("maxent_alpha", self.maxent_alpha, _ALPHA_RULES)
        if not (0 < self.default_mix < 1):
            raise HypergradientError(
                f"option 'default_mix': expected a number in (0, 1) (some flat model keeps the "
                f"default positive), got {self.default_mix!r}."
            )
        _check_list("noise", self.noise, "relative noise levels such as 1e-2,1e-3")
        _check_list("tikhonov_lams", self.tikhonov_lams, "Tikhonov weights such as 0.01,1")
        for option in ("noise", "tikhonov_lams"):
            for value in getattr(self, option):
                check_positive(option, value)
        _check_list("families", self.families, "family names such as gaussians,gapped")
        if not isinstance(self.unseen, list):
            raise HypergradientError(
                f"option 'unseen': expected a list of family names (or empty), got {self.unseen!r}."
            )
        for option in ("families", "unseen"):
            for name in getattr(self, option):
                check_choice(option, name, ac.FAMILIES)
        both = sorted(set(self.families) & set(self.unseen))
        if both:
            raise HypergradientError(
                f"option 'unseen': {both} also in option 'families'; an unseen family must "
                f"never be trained on, so list it in one of the two."
            )
        if self.plot_cases is not None:
            n = self.n_test * len(self.test_families)
            if not isinstance(self.plot_cases, list) or not self.plot_cases:
                raise HypergradientError(
                    f"option 'plot_cases': expected a non-empty list of test rows (or none), "
                    f"got {self.plot_cases!r}."
                )
            for case in self.plot_cases:
                if isinstance(case, bool) or not isinstance(case, int) or not 0 <= case < n:
                    raise HypergradientError(
                        f"option 'plot_cases': expected row indices in [0, {n}) (n_test = "
                        f"{self.n_test} per family, {len(self.test_families)} families), got "
                        f"{case!r}."
                    )


def _check_list(option: str, values: object, what: str) -> None:
    """``values`` is a non-empty list without repeats (``what``: an example for the message)."""
    if not isinstance(values, list) or not values:
        raise HypergradientError(f"option {option!r}: expected a non-empty list of {what}, got "
                                 f"{values!r}.")  # fmt: skip
    if len(set(values)) != len(values):
        raise HypergradientError(
            f"option {option!r}: expected distinct values, got {values!r}; remove the repeats."
        )


def plot_case_rows(config: AnalyticContinuationConfig) -> list[int]:
    """The test rows to plot: ``plot_cases``, or the first spectrum of every family."""
    if config.plot_cases is not None:
        return list(config.plot_cases)
    return [k * config.n_test for k in range(len(config.test_families))]


# ----------------------------------------------------------------------------- pieces


def build_problem(config: AnalyticContinuationConfig) -> ac.Problem:
    """The fermionic problem: ``n_tau`` times on ``[0, beta]``, ``n_w`` frequencies (trapezoid
    weights) on ``[-w_max, w_max]``."""
    return ac.Problem(
        ac.tau_grid(config.beta, config.n_tau),
        config.beta,
        ac.uniform_grid(-config.w_max, config.w_max, config.n_w),
    )


def concat(datasets: list[ac.SpectralDataset]) -> ac.SpectralDataset:
    """One dataset of the rows of ``datasets`` (several noise levels: ``rel_sigma`` None)."""
    return ac.SpectralDataset(
        A=torch.cat([d.A for d in datasets]),
        G=torch.cat([d.G for d in datasets]),
        G_noisy=torch.cat([d.G_noisy for d in datasets]),
        sigma=torch.cat([d.sigma for d in datasets]),
        family=[f for d in datasets for f in d.family],
        rel_sigma=datasets[0].rel_sigma if len(datasets) == 1 else None,
    )


def head(dataset: ac.SpectralDataset, n: int) -> ac.SpectralDataset:
    """The first ``n`` rows of every family of ``dataset``."""
    keep = []
    for family in dict.fromkeys(dataset.family):
        keep += [i for i, f in enumerate(dataset.family) if f == family][:n]
    index = torch.tensor(keep)
    return ac.SpectralDataset(
        A=dataset.A[index], G=dataset.G[index], G_noisy=dataset.G_noisy[index],
        sigma=dataset.sigma[index], family=[dataset.family[i] for i in keep],
        rel_sigma=dataset.rel_sigma,
    )  # fmt: skip


def build_model(config: AnalyticContinuationConfig, problem: ac.Problem) -> ac.LearnedContinuation:
    """The untrained solver: plain ADMM at penalty ``rho`` with identity filters,
    ``n_iter * (3 + filter_width)`` parameters (float64, the problem's dtype)."""
    return ac.LearnedContinuation(
        problem, n_iter=config.n_iter, rho=config.rho, filter_width=config.filter_width
    )


def per_spectrum(one: Callable, on_spectrum: Callable[[int], None] | None = None) -> Callable:
    """A batch solver ``(G (n, n_tau), sigma (n, n_tau)) -> A (n, n_w)`` from a one-spectrum
    one; ``on_spectrum(1)`` after each (the progress bar)."""

    def solve(G, sigma):
        out = []
        for i in range(G.shape[0]):
            out.append(one(G[i], sigma[i]))
            if on_spectrum is not None:
                on_spectrum(1)
        return torch.stack(out)

    return solve


def tikhonov_solver(problem: ac.Problem, lam: float, on_spectrum=None) -> Callable:
    """Non-negative Tikhonov at weight ``lam``, one spectrum at a time: ``min_A
    ||(K_w A - G) / sigma||^2 + lam ||A||^2`` subject to ``A >= 0`` (an active-set solve of
    the ``n_w x n_w`` normal equations per spectrum)."""
    return per_spectrum(lambda G, s: ac.tikhonov_nnls(G, problem, sigma=s, lam=lam), on_spectrum)


def learned_solver(model: ac.LearnedContinuation, on_spectrum=None) -> Callable:
    """The learned optimizer, batched: ``(G (n, n_tau), sigma) -> A (n, n_w)`` in one call,
    ``O(n * n_iter * n_w * r)`` with ``r = min(n_tau, n_w)``."""

    def solve(G, sigma):
        with torch.no_grad():
            A = model(G, sigma)
        if on_spectrum is not None:
            on_spectrum(G.shape[0])
        return A

    return solve


def maxent_solver(
    problem: ac.Problem, rule: str, default: Callable | None = None, *, mix: float = 0.95,
    on_spectrum=None,
) -> Callable:  # fmt: skip
    """MaxEnt per spectrum: a flat default model, or ``mix * default(G, sigma) + (1 - mix) *
    flat`` (a default model must be positive everywhere; the learned output has zeros).
    Cost: one MaxEnt alpha scan per spectrum (about 0.25 s at the defaults), plus one batched
    call of ``default``."""
    if default is None:
        return per_spectrum(lambda G, s: ac.maxent(G, problem, sigma=s, alpha=rule).A, on_spectrum)

    def solve(G, sigma):
        D = default(G, sigma)
        ones = torch.ones_like(D[0])
        D = mix * D + (1 - mix) * ones / problem.grid.integrate(ones)
        out = []
        for i in range(G.shape[0]):
            out.append(ac.maxent(G[i], problem, sigma=sigma[i], default_model=D[i], alpha=rule).A)
            if on_spectrum is not None:
                on_spectrum(1)
        return torch.stack(out)

    return solve


def choose_tikhonov_lambda(
    problem: ac.Problem, val: ac.SpectralDataset, lams: list[float], on_spectrum=None
) -> tuple[float, dict[str, dict[str, float]]]:
    """Tikhonov's ``lam`` of ``lams`` with the lowest mean L1 error of A on ``val``
    (:func:`~hypergradient.continuation.select`; the residual is recorded, never used).
    Returns ``(lam, scores)``, the scores keyed ``"lam=<value>"``. Cost: ``len(lams) *
    len(val)`` NNLS solves."""
    candidates = {f"lam={lam!r}": tikhonov_solver(problem, lam, on_spectrum) for lam in lams}
    name, scores = select(candidates, val, problem)
    return float(name.split("=", 1)[1]), scores


def timed(solve: Callable, G: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``solve(G, sigma)`` and its wall time per spectrum."""
    start = time.perf_counter()
    A = solve(G, sigma)
    return A, (time.perf_counter() - start) / G.shape[0]


def evaluate(problem, A, test: ac.SpectralDataset, seconds: float, cases: list[int]) -> dict:
    """One method at one noise level: per-spectrum metrics and the plotted reconstructions."""
    position, weight = peak_errors(problem, A, test.A)
    return {
        "seconds_per_spectrum": seconds,
        "family": list(test.family),
        "l1": l1_error(problem, A, test.A).tolist(),
        "peak_position": position.tolist(),
        "peak_weight": weight.tolist(),
        "residual": residual(problem, A, test.G_noisy, test.sigma).tolist(),
        "examples": {str(i): A[i].tolist() for i in cases},
    }


def summarize(config: AnalyticContinuationConfig, evaluations: dict) -> list[dict]:
    """The table's rows: per method, noise level and seen / unseen families, the mean and
    standard deviation of each metric over the test spectra."""
    rows = []
    for rel in config.noise:
        for method in METHODS:
            ev = evaluations[_eval_key(method, rel)]
            for label, names in (("seen", config.families), ("unseen", config.unseen)):
                keep = [i for i, f in enumerate(ev["family"]) if f in names]
                if not keep:
                    continue
                row = {"method": method, "noise": rel, "families": label, "n": len(keep),
                       "ms_per_spectrum": 1e3 * ev["seconds_per_spectrum"]}  # fmt: skip
                for metric in ("l1", "peak_position", "peak_weight", "residual"):
                    values = [ev[metric][i] for i in keep]
                    row[f"{metric}_mean"] = statistics.fmean(values)
                    row[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
                rows.append(row)
    return rows


def _eval_key(method: str, rel: float) -> str:
    return f"{method} @ {rel!r}"


def _progress_bar(console: Console, progress: bool) -> Progress:
    """The recipes' bar with an ETA column (the test's MaxEnt solves take a while)."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        "eta",
        TimeRemainingColumn(),
        console=console,
        disable=not progress,
    )


# ----------------------------------------------------------------------------- meta-training


def _rounds(config: AnalyticContinuationConfig) -> list[int]:
    """Adam steps of every round: ``checkpoint_every`` each, the last one what is left."""
    full, rest = divmod(config.meta_steps, config.checkpoint_every)
    return [config.checkpoint_every] * full + ([rest] if rest else [])


def train_rounds(
    config: AnalyticContinuationConfig,
    model: ac.LearnedContinuation,
    train: ac.SpectralDataset,
    val: ac.SpectralDataset,
    *,
    checkpoint: Path,
    signature: dict,
    history: dict,
    on_round: Callable[[int], None] | None = None,
) -> dict:
    """Meta-train ``model`` in place from round ``len(history["rounds"])`` on; after each round
    the model (the best by validation L1 so far: ``meta_train`` keeps it) and ``history`` go
    into ``checkpoint``. Round ``r`` draws its batches with seed ``seed + r``, so a resumed
    run takes the same steps as an uninterrupted one."""
    sizes = _rounds(config)
    for r in range(len(history["rounds"]), len(sizes)):
        steps = sizes[r]
        done = sum(sizes[:r])
        began = time.perf_counter()
        part = meta_train(
            model, train, val, steps=steps, lr=config.lr, batch_size=config.batch_size,
            truncate=config.truncate, seed=config.seed + r,
            eval_every=min(config.eval_every, steps),
        )  # fmt: skip
        # the round's first measurement is the previous round's best: keep it only once
        first = 0 if r == 0 else 1
        history["step"] += [done + s for s in part["step"][first:]]
        # nan (no step yet at the first measurement) as None: history.json is plain JSON
        history["train_loss"] += [
            v if math.isfinite(v) else None for v in part["train_loss"][first:]
        ]
        history["val_l1"] += part["val_l1"][first:]
        history["rounds"].append({"steps": steps, "best_step": done + part["best_step"],
                                  "best_val_l1": part["best_val_l1"],
                                  "seconds": time.perf_counter() - began})  # fmt: skip
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_atomic({"model": state, "history": history}, checkpoint, signature=signature)
        if on_round is not None:
            on_round(steps)
    return history


# ----------------------------------------------------------------------------- the recipe


@register_recipe
class AnalyticContinuationRecipe(ThreadedRecipe):
    """Analytic continuation of noisy imaginary-time Green's functions: meta-train the learned
    unrolled optimizer (ADMM with learned per-iteration parameters, Huang & Yang 2022) on
    synthetic spectra by the L1 error of A, choose Tikhonov's lambda on validation spectra by
    the same error, then compare it with MaxEnt (flat and neural default model) and
    non-negative Tikhonov on a held-out test set written once to the run folder: L1 error,
    peak position and weight errors and time per spectrum, on families seen in training and
    on one never seen.

    Writes config.toml, results.json, reconstructions.png, meta_training.png, history.json,
    test_set/, learned_continuation.pt and checkpoint.pt into the run folder; --resume
    continues the meta-training from its checkpoint and reuses finished test rows.
    """

    name = "analytic-continuation"
    help = "learned unrolled optimizer vs MaxEnt and Tikhonov for analytic continuation"
    config_cls = AnalyticContinuationConfig

    def _run(self, config, run_dir, *, resume, progress, console):
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        problem = build_problem(config)
        # every option but the threads and the plotted cases changes the checkpoint or the test
        meta = {"recipe": self.name} | {
            k: v for k, v in asdict(config).items() if k not in ("threads", "plot_cases")
        }
        checkpoint = run_dir / "checkpoint.pt"
        stale = ["history.json", "learned_continuation.pt", "evaluation.json"]
        model = build_model(config, problem)
        history: dict[str, list] = {"step": [], "train_loss": [], "val_l1": [], "rounds": []}
        if resume_or_start_over(run_dir, meta, resume=resume, stale=stale):
            state = load_checkpoint(checkpoint, "--resume", signature=meta)
            model.load_state_dict(state["model"])
            history = state["history"]
        elif resume:
            console.print(f"no checkpoint in {run_dir}: starting from the beginning")

        test_dir = run_dir / TEST_SET
        if not (resume and (test_dir / "manifest.json").is_file()):
            # written once, before any training, from a seed no training call uses
            ac.write_test_set(
                test_dir, problem, families=config.test_families, n_per_family=config.n_test,
                rel_sigmas=config.noise, seed=config.seed + _TEST_SEED,
            )  # fmt: skip
        train = concat(
            [
                ac.make_dataset(
                    problem, config.families, config.n_train, rel, seed=config.seed + _TRAIN_SEED
                )
                for rel in config.noise
            ]
        )
        vals = {
            rel: ac.make_dataset(
                problem, config.families, config.n_val, rel, seed=config.seed + _VAL_SEED
            )
            for rel in config.noise
        }
        val = concat(list(vals.values()))  # fmt: skip

        cases = plot_case_rows(config)
        cache = RunCache(run_dir, {**meta, "plot_cases": cases}, resume=resume,
                         console=None, name="evaluation.json")  # fmt: skip
        n_test = config.n_test * len(config.test_families)
        n_select = config.n_val_select * len(config.families) * len(config.tikhonov_lams)
        per_noise = n_select + len(METHODS) * n_test
        with _progress_bar(console, progress) as bar:
            task = bar.add_task("meta-training (Adam steps)", total=config.meta_steps,
                                completed=sum(r["steps"] for r in history["rounds"]))  # fmt: skip
            history = train_rounds(
                config, model, train, val, checkpoint=checkpoint, signature=meta,
                history=history, on_round=lambda n: bar.advance(task, n),
            )  # fmt: skip
            write_json_atomic(run_dir / "history.json", history)
            torch.save(model.state_dict(), run_dir / "learned_continuation.pt")

            # the test set is read here, once, after every choice is made
            _, test_sets = ac.load_test_set(test_dir)
            task = bar.add_task("test (spectra solved)", total=per_noise * len(config.noise))
            tick = lambda n: bar.advance(task, n)  # noqa: E731
            for rel in config.noise:
                key = f"tikhonov @ {rel!r}"
                if key not in cache:
                    lam, scores = choose_tikhonov_lambda(
                        problem, head(vals[rel], config.n_val_select), config.tikhonov_lams, tick
                    )
                    cache.put(key, {"lam": lam, "scores": scores})
                else:
                    tick(n_select)
                lam = cache[key]["lam"]
                learned = learned_solver(model)
                solvers = {
                    "learned optimizer": learned_solver(model, tick),
                    "MaxEnt, flat default": maxent_solver(problem, config.maxent_alpha,
                                                          on_spectrum=tick),
                    "MaxEnt, neural default": maxent_solver(
                        problem, config.maxent_alpha, learned, mix=config.default_mix,
                        on_spectrum=tick),
                    "Tikhonov NNLS": tikhonov_solver(problem, lam, tick),
                }  # fmt: skip
                test = test_sets[float(rel)]
                for method, solve in solvers.items():
                    if _eval_key(method, rel) in cache:
                        tick(n_test)
                        continue
                    A, seconds = timed(solve, test.G_noisy, test.sigma)
                    cache.put(_eval_key(method, rel), evaluate(problem, A, test, seconds, cases))

        manifest = json.loads((test_dir / "manifest.json").read_text())
        evaluations = {_eval_key(m, rel): cache[_eval_key(m, rel)]
                       for rel in config.noise for m in METHODS}  # fmt: skip
        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": machine(),
            "num_parameters": model.num_parameters(),
            "meta_training": {
                "steps": config.meta_steps,
                "initial_val_l1": history["val_l1"][0],
                "best_val_l1": min(history["val_l1"]),
                "seconds": sum(r["seconds"] for r in history["rounds"]),
            },
            "selection": {
                f"tikhonov @ {rel!r}": cache[f"tikhonov @ {rel!r}"] for rel in config.noise
            },  # fmt: skip
            "test_set": {
                "folder": TEST_SET,
                "sha256": manifest["sha256"],
                "spectra_per_noise": n_test,
            },  # fmt: skip
            "rows": summarize(config, evaluations),
            "evaluations": evaluations,
            "omega": problem.grid.omega.tolist(),
            "truth": {str(i): test_sets[float(config.noise[0])].A[i].tolist() for i in cases},
            "case_families": {str(i): test_sets[float(config.noise[0])].family[i] for i in cases},
            "seconds": time.perf_counter() - start,
        }
        write_results(run_dir, results)
        plot_reconstructions(results, run_dir / "reconstructions.png")
        plot_meta_training(history, run_dir / "meta_training.png")
        console.print(results_table(results))
        choices = ", ".join(f"noise {rel:g}: {v['lam']:g}" for rel, v in
                            zip(config.noise, results["selection"].values()))  # fmt: skip
        lams = sorted(config.tikhonov_lams)
        for rel, v in zip(config.noise, results["selection"].values()):
            if len(lams) > 1 and v["lam"] in (lams[0], lams[-1]):
                console.print(
                    f"note: noise {rel:g}: Tikhonov's lambda {v['lam']:g} is at the edge of "
                    f"option 'tikhonov_lams'; extend the grid past it to be sure of the choice."
                )
        console.print(
            f"Tikhonov lambda chosen on validation by the L1 error of A ({choices}); learned "
            f"optimizer: {results['num_parameters']} parameters, validation L1 "
            f"{results['meta_training']['initial_val_l1']:.4f} -> "
            f"{results['meta_training']['best_val_l1']:.4f}. Wrote results.json, "
            f"reconstructions.png, meta_training.png and {TEST_SET}/ to {run_dir}."
        )
        return results


# ----------------------------------------------------------------------------- report


def _mean_sd(row: dict, metric: str) -> str:
    return f"{row[f'{metric}_mean']:.3f} ± {row[f'{metric}_sd']:.3f}"


def results_table(results: dict) -> Table:
    c = results["config"]
    table = Table(
        title=f"Analytic continuation, fermionic kernel (beta {c['beta']:g}, {c['n_tau']} tau, "
        f"{c['n_w']} frequencies on [-{c['w_max']:g}, {c['w_max']:g}]): {c['n_test']} test "
        f"spectra per family and noise level, mean ± sd"
    )
    for col in ("method", "noise", "families", "L1 error", "peak position", "peak weight",
                "ms / spectrum"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("method", "families") else "right")
    for row in results["rows"]:
        table.add_row(
            row["method"],
            f"{row['noise']:g}",
            row["families"],
            _mean_sd(row, "l1"),
            _mean_sd(row, "peak_position"),
            _mean_sd(row, "peak_weight"),
            f"{row['ms_per_spectrum']:.2f}",
        )
    table.caption = (
        f"seen: {', '.join(c['families'])}; unseen (never trained on): "
        f"{', '.join(c['unseen']) or '-'}; MaxEnt alpha by {c['maxent_alpha']}"
    )
    return table


def plot_reconstructions(results: dict, path: Path) -> None:
    """One panel per plotted test spectrum (columns) and noise level (rows): the truth and
    every method's reconstruction."""
    plt = pyplot()
    noises = results["config"]["noise"]
    cases = list(results["truth"])
    omega = results["omega"]
    fig, axes = plt.subplots(
        len(noises), len(cases), figsize=(3.2 * len(cases), 2.8 * len(noises)), squeeze=False
    )
    for r, rel in enumerate(noises):
        for j, case in enumerate(cases):
            ax = axes[r][j]
            ax.plot(omega, results["truth"][case], "k", lw=2, label="truth")
            for method in METHODS:
                A = results["evaluations"][_eval_key(method, rel)]["examples"][case]
                # dashed: the learned output, else hidden under MaxEnt started from it
                style = "--" if method == "learned optimizer" else "-"
                ax.plot(omega, A, style, lw=1.2, label=method)
            family = results["case_families"][case]
            seen = family in results["config"]["families"]
            ax.set_title(f"{family}{'' if seen else ' (unseen)'} #{case}, noise {rel:g}",
                         fontsize=8)  # fmt: skip
            ax.set_xlabel("omega", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_meta_training(history: dict, path: Path) -> None:
    """Training loss (mean since the previous measurement) and validation L1 per Adam step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps, train = history["step"], history["train_loss"]
    points = [(s, v) for s, v in zip(steps, train) if v is not None]
    if points:
        ax.plot(*zip(*points), marker=".", label="training L1 (batch mean)")
    ax.plot(steps, history["val_l1"], marker="o", label="validation L1")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("L1 error of A")
    ax.set_title("Meta-training of the learned optimizer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
