"""Amortized implicit hypergradients: the accuracy they keep, the Hessian-vector products and
the time they save, and what a hyper-training run then costs next to plain training.

The method (``hg.AmortizedImplicit``): the linear system of the implicit hypergradient,
:math:`(G + \\delta I) q = \\nabla_w E` with :math:`G` the Gauss-Newton matrix of the training
batch plus the decay penalty's Hessian (positive definite, where a network's mini-batch
Hessian is indefinite away from a minimum: CG breaks down on it even at ``damping=0.1``), is
solved by a few CG steps warm-started from the previous hyper-step's solution.  Three parts:

1. **Accuracy along a run** (MNIST MLP 784-256-10, 203,530 per-weight decays; digits when
   MNIST is absent).  At every ``--measure-every``-th hyper-step a converged reference (CG
   from zero to relative residual 1e-8 on the same system: same weights, hyperparameters,
   batches and damping) is computed, and the relative error and cosine of what the run used
   are recorded, together with those of today's default (``hg.Implicit()``: Neumann, 10 terms,
   exact Hessian) at the same points.  The hypergradient's batches are kept for 10
   hyper-steps (``hypergrad_resample_every=10``), so the system changes with the weights.
2. **Cost and validation loss** (MNIST, 5 seeds).  Every choice (damping, SGD steps between
   hyper-steps, Adam's rate on the log decays, how often the hypergradient's batches are
   redrawn) is made on two *selection* seeds (other data splits, inits and batch orders):
   the amortized configuration with the lowest selection validation loss among those whose
   measured cost is at most 1.5x plain training; today's method is tuned on the same grid
   (with and without that cost limit).  Then 5 fresh seeds: plain SGD and each chosen
   configuration on the same batches for the same number of SGD steps, timed back to back
   (paired ratio); validation loss on the 1000 validation examples; the test loss read once.
3. **Hessian-vector products to a fixed accuracy** on the 85,002-hyperparameter MLP
   64-256-256-10 (digits, full batch, the setup of ``hypergrad_cost.py`` and of the peer
   comparison).  Along a run of hyper-steps each contender is stopped as soon as its
   hypergradient is within the target relative error of the converged reference: CG from
   zero and Neumann from zero (what TorchOpt's and Betty's implicit solvers do at every
   hyper-step), and the warm-started solve (with and without a Nystrom preconditioner built
   from recycled CG directions).  Table: matvecs, ms and the accuracy reached.

All in one process, one torch thread.  Run from the repository root::

    HYPERGRADIENT_DATA=/path/to/datasets python benchmarks/amortized.py   # ~12 minutes
    python benchmarks/amortized.py --quick                                 # smoke test

Writes ``<out>/amortized.json`` and ``<out>/amortized.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg

import joint_training_cost
from _common import data_source, machine_info, rerun_command
from hypergradient.hypergrad.methods import AbstractHypergradientMethod, MeasuredMethod
from hypergradient.recipes import weight_decay as recipe
from hypergradient.recipes.weight_decay import WeightDecayConfig

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
COST_TARGET = 1.5
ERROR_TARGET, COSINE_TARGET, HVP_TARGET = 1e-2, 0.99, 3.0

MNIST = {"dataset": "mnist", "hidden": 256, "batch_size": 128, "n_train": 10_000,
         "n_val": 1_000, "val_batch_size": 128}  # fmt: skip
TODAY = {"method": "implicit", "solver": "neumann", "solver_steps": 10, "damping": 0.0,
         "hessian": "exact", "hypergrad_resample_every": 1}  # fmt: skip
AMORTIZED = {"method": "amortized", "solver": "cg", "solver_steps": 2,
             "hessian": "gauss_newton"}  # fmt: skip


def base_config(data_dir: str | None) -> WeightDecayConfig:
    """MNIST where its files are found, else the digits default."""
    config = WeightDecayConfig(**MNIST, data_dir=data_dir, val_sizes=[])
    try:
        config.validate()
        hg.data.load_mnist(data_dir, split="test", limit=1)
        return config
    except hg.HypergradientError:
        return WeightDecayConfig(val_sizes=[])


def with_options(config: WeightDecayConfig, **options) -> WeightDecayConfig:
    out = dataclasses.replace(config, **options)
    out.validate()
    return out


@contextlib.contextmanager
def quiet():
    """Warm-started runs are not at an optimum and solves stop at max_steps by design."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ======================================================================================
# Part 1: accuracy along a run
# ======================================================================================

ACCURACY_VARIANTS = {
    # name: (CG steps per hyper-step, Krylov-recycled Nystrom rank or None)
    "warm-started CG, 2 steps": (2, None),
    "warm-started CG, 2 steps, recycled Nystrom (rank 10)": (2, 10),
    "warm-started CG, 3 steps": (3, None),
}
ACCURACY_DAMPINGS = (1.0, 0.1, 0.01)  # 0.01: what part 2 chose on validation


def amortized_method(steps: int, damping: float, nystrom: int | None) -> hg.AmortizedImplicit:
    pre = None
    if nystrom is not None:
        pre = hg.linalg.NystromPreconditioner(rank=nystrom, refresh_every=1, source="krylov")
    return hg.AmortizedImplicit(
        solver="cg", max_steps=steps, damping=damping, hessian="gauss_newton", preconditioner=pre
    )


def accuracy_run(config, data, steps, damping, nystrom, hyper_steps, every) -> dict:
    config = with_options(config, **AMORTIZED, damping=damping, hypergrad_resample_every=10)
    trainer = recipe.build_trainer(config, data, config.n_val)
    trainer.method = MeasuredMethod(
        amortized_method(steps, damping, nystrom),
        at=lambda k: k % every == every - 1,
        reference_tol=1e-8,
        reference_steps=3000,
        compare_with={"today": hg.Implicit()},
    )
    start = time.perf_counter()
    with quiet():
        trainer.fit(hyper_steps)
    seconds = time.perf_counter() - start
    measured = [r for r in trainer.history if "ref_rel_error" in r]
    pick = lambda key: [r[key] for r in measured]  # noqa: E731
    return {
        "cg_steps": steps,
        "damping": damping,
        "nystrom_rank": nystrom,
        "hyper_steps": hyper_steps,
        "mean_hvps": statistics.mean(r["solve_hvps"] for r in trainer.history),
        "rel_error": pick("ref_rel_error"),
        "cosine": pick("ref_cosine"),
        "today_rel_error": pick("ref_rel_error.today"),
        "today_cosine": pick("ref_cosine.today"),
        "reference_hvps": pick("ref_hvps"),
        "reference_converged": sum(pick("ref_converged")),
        "measured_points": len(measured),
        "seconds_with_references": seconds,
    }


def run_accuracy(config, data, hyper_steps, every, console) -> list[dict]:
    rows = []
    for damping in ACCURACY_DAMPINGS:
        for name, (steps, nystrom) in ACCURACY_VARIANTS.items():
            row = {"variant": name, **accuracy_run(config, data, steps, damping, nystrom,
                                                    hyper_steps, every)}  # fmt: skip
            console.print(
                f"  accuracy  damping={damping:g}  {name}: median rel. error "
                f"{statistics.median(row['rel_error']):.3g}, HVPs/step {row['mean_hvps']:.2f}; "
                f"today's {statistics.median(row['today_rel_error']):.3g}"
            )
            rows.append(row)
    return rows


# ======================================================================================
# Part 1b: how far the system moves between hyper-steps (why the target is hard)
# ======================================================================================

DRIFT_CG_STEPS = (1, 2, 3)  # + 1 HVP each for the warm start's residual: 2, 3, 4 HVPs


def _grad_at(outer_loss, params, hparams) -> dict:
    """The right-hand side of the adjoint system: the validation gradient in the weights."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        grads = torch.autograd.grad(outer_loss(leaves, hparams), list(leaves.values()),
                                    allow_unused=True)  # fmt: skip
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}


class DriftProbe(AbstractHypergradientMethod):
    """Runs the amortized method unchanged, and at two consecutive hyper-steps every
    ``every`` computes the converged adjoint :math:`q_k` of both systems.  Records how far
    the right-hand side :math:`b = \\nabla_w E` and the adjoint move between them, and the
    error left by the *best possible* warm start (the previous step's exact adjoint) after
    1, 2 and 3 CG steps: a floor for any warm-started solve at that budget."""

    name = "drift-probe"
    outer_at_params = True
    hessian = "gauss_newton"

    def __init__(self, inner: hg.AmortizedImplicit, every: int):
        self.inner, self.every, self.calls = inner, every, 0
        self.previous: tuple[dict, dict] | None = None
        self.records: list[dict] = []

    def hypergrad(self, *args, **kwargs):
        return self.hypergrad_and_info(*args, **kwargs)[0]

    def _solve(self, inner_loss, outer_loss, params, hparams, **options):
        with quiet():
            return hg.implicit_hypergrad(
                inner_loss, outer_loss, params, hparams, solver="cg",
                damping=self.inner.damping, hessian="gauss_newton", stationarity_tol=None,
                return_stats=True, **options,
            )  # fmt: skip

    def hypergrad_and_info(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0):
        k, self.calls = self.calls, self.calls + 1
        out = self.inner.hypergrad_and_info(inner_loss, outer_loss, params, hparams, lr=lr,
                                            momentum=momentum)  # fmt: skip
        if k % self.every not in (self.every - 2, self.every - 1):
            return out
        args = (inner_loss, outer_loss, params, hparams)
        reference, stats = self._solve(*args, max_steps=3000, tol=1e-8)
        adjoint, rhs = stats.extra["adjoint"], _grad_at(outer_loss, params, hparams)
        if k % self.every == self.every - 1 and self.previous is not None:
            last_adjoint, last_rhs = self.previous
            record = {"hyper_step": k, "rhs_change": _rel(rhs, last_rhs),
                      "adjoint_change": _rel(adjoint, last_adjoint)}  # fmt: skip
            for n in DRIFT_CG_STEPS:
                grads, _ = self._solve(*args, max_steps=n, tol=0.0, x0=last_adjoint)
                record[f"best_warm_error_{n + 1}_hvps"] = _rel(grads, reference)
            self.records.append(record)
        self.previous = (adjoint, rhs)
        return out


def run_drift(config, data, sgd_steps: int, probes: int, console) -> list[dict]:
    rows = []
    for hyper_every in (1, 10):
        cfg = with_options(config, **AMORTIZED, damping=1.0, hypergrad_resample_every=10,
                           hyper_every=hyper_every)  # fmt: skip
        trainer = recipe.build_trainer(cfg, data, cfg.n_val)
        hyper_steps = sgd_steps // hyper_every
        probe = DriftProbe(amortized_method(2, 1.0, None), every=max(hyper_steps // probes, 2))
        trainer.method = probe
        with quiet():
            trainer.fit(hyper_steps)
        records = probe.records
        row = {"hyper_every": hyper_every, "damping": 1.0, "sgd_steps": sgd_steps,
               "records": records,
               **{f"median_{key}": statistics.median(r[key] for r in records)
                  for key in records[0] if key != "hyper_step"}}  # fmt: skip
        console.print(
            f"  drift  {hyper_every} SGD step(s) per hyper-step: validation gradient moves "
            f"{row['median_rhs_change']:.3f}, adjoint {row['median_adjoint_change']:.3f}; best "
            f"warm start at 3 HVPs {row['median_best_warm_error_3_hvps']:.3g}"
        )
        rows.append(row)
    return rows


# ======================================================================================
# Part 2: cost and validation loss
# ======================================================================================


def plain_run(config: WeightDecayConfig, data) -> nn.Module:
    """Plain SGD with one global decay (the recipe's initial one), the tuned runs' batches:
    ``joint_training_cost.py``'s plain run, returning its model."""
    keep: list = []
    joint_training_cost.plain_run(config, data, keep=keep)
    return keep[0]


def tuned_run(config: WeightDecayConfig, data) -> tuple[nn.Module, dict]:
    trainer = recipe.build_trainer(config, data, config.n_val)
    spent = {"hypergradient": 0.0}
    inner = trainer.hypergradient

    def timed():
        start = time.perf_counter()
        try:
            return inner()
        finally:
            spent["hypergradient"] += time.perf_counter() - start

    trainer.hypergradient = timed
    with quiet():
        trainer.fit(config.hyper_steps)
    hvps = [r.get("solve_hvps") for r in trainer.history]
    spent["hvps_per_step"] = None if None in hvps else statistics.mean(hvps)
    return trainer.model, spent


def evaluate(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def grid(budget: int) -> dict[str, dict]:
    """name -> options of every candidate (today's method and the amortized one)."""
    out = {}
    for every, lr in itertools.product((10, 30), (0.03, 0.1)):
        out[f"today he={every} lr={lr:g}"] = {**TODAY, "hyper_every": every, "hyper_lr": lr,
                                              "hyper_steps": budget // every}  # fmt: skip
    for damping, every, lr, resample in itertools.product(
        (0.01, 0.1, 1.0), (10, 30), (0.03, 0.1), (1, 10)
    ):
        out[f"amortized d={damping:g} he={every} lr={lr:g} rs={resample}"] = {
            **AMORTIZED, "damping": damping, "hyper_every": every, "hyper_lr": lr,
            "hypergrad_resample_every": resample, "hyper_steps": budget // every,
        }  # fmt: skip
    return out


def select(config, budget, seeds, console) -> dict:
    """Every candidate on the selection seeds: validation loss and cost ratio."""
    results = {}
    plain_seconds = {}
    for seed in seeds:
        cfg = with_options(config, seed=seed, hyper_every=10, hyper_steps=budget // 10)
        data = recipe.load_data(cfg)
        plain_seconds[seed] = statistics.median(timed(plain_run, cfg, data)[1] for _ in range(2))
    for name, options in grid(budget).items():
        losses, ratios = [], []
        for seed in seeds:
            cfg = with_options(config, seed=seed, **options)
            data = recipe.load_data(cfg)
            (model, _), seconds = timed(tuned_run, cfg, data)
            losses.append(evaluate(model, data.x_val[: cfg.n_val], data.y_val[: cfg.n_val]))
            ratios.append(seconds / plain_seconds[seed])
        results[name] = {"options": options, "val_loss": statistics.mean(losses),
                         "cost_ratio": statistics.median(ratios)}  # fmt: skip
        console.print(
            f"  select  {name}: val {results[name]['val_loss']:.4f}, "
            f"{results[name]['cost_ratio']:.2f}x"
        )
    return results


def best(results: dict, prefix: str, max_ratio: float | None) -> str | None:
    names = [n for n in results if n.startswith(prefix)]
    if max_ratio is not None:
        names = [n for n in names if results[n]["cost_ratio"] <= max_ratio]
    return min(names, key=lambda n: results[n]["val_loss"]) if names else None


def report_runs(config, budget, chosen: dict[str, dict], seeds, console) -> dict:
    """Each chosen configuration on the report seeds, paired with plain training."""
    rows = {name: {"ratio": [], "val_loss": [], "test_loss": [], "hypergradient_ms": [],
                   "hvps_per_step": []} for name in chosen}  # fmt: skip
    rows["plain SGD"] = {"val_loss": [], "test_loss": [], "seconds": []}
    for seed in seeds:
        for name, options in chosen.items():
            cfg = with_options(config, seed=seed, **options)
            data = recipe.load_data(cfg)
            # back to back, the order alternating: plain, tuned / tuned, plain
            if seed % 2 == 0:
                plain_model, plain_s = timed(plain_run, cfg, data)
                (model, spent), tuned_s = timed(tuned_run, cfg, data)
            else:
                (model, spent), tuned_s = timed(tuned_run, cfg, data)
                plain_model, plain_s = timed(plain_run, cfg, data)
            row = rows[name]
            row["ratio"].append(tuned_s / plain_s)
            row["val_loss"].append(evaluate(model, data.x_val[: cfg.n_val],
                                            data.y_val[: cfg.n_val]))  # fmt: skip
            row["test_loss"].append(evaluate(model, data.x_test, data.y_test))
            row["hypergradient_ms"].append(1e3 * spent["hypergradient"] / cfg.hyper_steps)
            row["hvps_per_step"].append(spent["hvps_per_step"])
            rows["plain SGD"]["seconds"].append(plain_s)
        plain = rows["plain SGD"]
        plain["val_loss"].append(evaluate(plain_model, data.x_val[: cfg.n_val],
                                          data.y_val[: cfg.n_val]))  # fmt: skip
        plain["test_loss"].append(evaluate(plain_model, data.x_test, data.y_test))
        console.print(f"  report  seed {seed} done")
    return rows


def run_cost(config, budget, selection_seeds, report_seeds, console) -> dict:
    selection = select(config, budget, selection_seeds, console)
    chosen_names = {
        "today's default (he=10, lr=0.03)": "today he=10 lr=0.03",
        f"today, tuned, <= {COST_TARGET}x": best(selection, "today", COST_TARGET),
        "today, tuned, any cost": best(selection, "today", None),
        f"amortized, tuned, <= {COST_TARGET}x": best(selection, "amortized", COST_TARGET),
        "amortized, same schedule as today's default": best(
            {n: r for n, r in selection.items() if "he=10 lr=0.03" in n}, "amortized", None
        ),
    }
    chosen = {label: selection[name]["options"] for label, name in chosen_names.items() if name}
    rows = report_runs(config, budget, chosen, report_seeds, console)
    return {
        "inner_steps": budget,
        "selection_seeds": selection_seeds,
        "report_seeds": report_seeds,
        "selection": selection,
        "chosen": {label: name for label, name in chosen_names.items()},
        "rows": rows,
    }


# ======================================================================================
# Part 3: matvecs to a fixed accuracy on the 85k-hyperparameter MLP
# ======================================================================================


def _rel(a: dict, b: dict) -> float:
    num = sum(float(torch.sum((a[k].double() - b[k].double()) ** 2)) for k in b)
    den = sum(float(torch.sum(b[k].double() ** 2)) for k in b)
    return math.sqrt(num / max(den, 1e-300))


class FixedAccuracyTable(AbstractHypergradientMethod):
    """At every hyper-step: the converged reference, then for each contender the fewest
    iterations that bring its hypergradient within ``target`` of it (doubling, then
    bisection), timed once at that count.  The run itself follows the warm-started solve."""

    name = "fixed-accuracy-table"
    outer_at_params = True

    def __init__(self, damping: float, target: float, lr: float, cap: int = 2048):
        self.damping, self.target, self.lr, self.cap = damping, target, lr, cap
        self.kept: dict[str, dict | None] = {
            "warm-started CG": None,
            "warm-started CG + recycled Nystrom": None,
        }
        self.nystrom = hg.linalg.NystromPreconditioner(rank=10, refresh_every=1, source="krylov")
        self.records: list[dict] = []

    def _solve(self, name, n, inner_loss, outer_loss, params, hparams):
        options = {"damping": self.damping, "hessian": "gauss_newton", "stationarity_tol": None,
                   "return_stats": True, "max_steps": n, "tol": 0.0}  # fmt: skip
        if name == "Neumann from zero":
            options.update(solver="neumann", alpha=self.lr)
        else:
            options.update(solver="cg")
        if name.startswith("warm-started"):
            options["x0"] = self.kept[name]
        if name.endswith("Nystrom"):
            options["preconditioner"] = self.nystrom
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hg.implicit_hypergrad(inner_loss, outer_loss, params, hparams, **options)

    def _fewest(self, name, ref, *args) -> tuple[int | None, float]:
        """Fewest iterations within target (None past ``cap``) and the error there."""
        if name.endswith("Nystrom"):  # its preconditioner changes with every solve: no search
            n = 1
            while n <= self.cap:
                saved = self.nystrom.state_dict()
                grads, _ = self._solve(name, n, *args)
                if _rel(grads, ref) <= self.target:
                    return n, _rel(grads, ref)
                self.nystrom.load_state_dict(saved)
                n += 1
            return None, math.nan
        low, n = 0, 1
        while True:
            grads, _ = self._solve(name, n, *args)
            if _rel(grads, ref) <= self.target:
                break
            if n >= self.cap:
                return None, _rel(grads, ref)
            low, n = n, min(2 * n, self.cap)
        high = n
        while high - low > 1:
            mid = (low + high) // 2
            grads, _ = self._solve(name, mid, *args)
            if _rel(grads, ref) <= self.target:
                high = mid
            else:
                low = mid
        grads, _ = self._solve(name, high, *args)
        return high, _rel(grads, ref)

    def hypergrad_and_info(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0):
        args = (inner_loss, outer_loss, params, hparams)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = hg.implicit_hypergrad(
                *args, solver="cg", max_steps=5000, tol=1e-10, damping=self.damping,
                hessian="gauss_newton", stationarity_tol=None,
            )  # fmt: skip
        record = {}
        result = None
        for name in ("CG from zero", "Neumann from zero", "warm-started CG",
                     "warm-started CG + recycled Nystrom"):  # fmt: skip
            saved = self.nystrom.state_dict()
            n, error = self._fewest(name, ref, *args)
            if n is None:
                record[name] = {"iterations": None, "matvecs": None, "ms": None, "error": error}
                continue
            if name.endswith("Nystrom"):
                self.nystrom.load_state_dict(saved)
            start = time.perf_counter()
            grads, stats = self._solve(name, n, *args)
            ms = 1e3 * (time.perf_counter() - start)
            record[name] = {"iterations": n, "matvecs": stats.num_matvecs, "ms": ms,
                            "error": _rel(grads, ref)}  # fmt: skip
            if name.startswith("warm-started"):
                self.kept[name] = stats.extra["adjoint"]
            if name == "warm-started CG":
                result = grads
        self.records.append(record)
        return (ref if result is None else result), {}

    def hypergrad(self, *args, **kwargs):
        return self.hypergrad_and_info(*args, **kwargs)[0]


def mlp_85k(data) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(data.num_features, 256), nn.Tanh(), nn.Linear(256, 256),
                             nn.Tanh(), nn.Linear(256, data.num_classes))  # fmt: skip


def run_fixed_accuracy(hyper_steps: int, damping: float, targets, console) -> dict:
    config = WeightDecayConfig(val_sizes=[])  # digits: 500 training, 300 validation examples
    data = recipe.load_data(config)
    out = {}
    for target in targets:
        model = mlp_85k(data)
        n_train = len(data.x_train[: config.n_train])
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data.x_train[:n_train], data.y_train[:n_train]),
            batch_size=n_train,
        )
        val = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data.x_val[: config.n_val], data.y_val[: config.n_val]),
            batch_size=config.n_val,
        )
        table = FixedAccuracyTable(damping, target, lr=config.inner_lr)
        trainer = hg.BilevelTrainer(
            model, hg.hparams.WeightDecay("per_weight", initial=config.init_weight_decay),
            loader, val, torch.optim.SGD(model.parameters(), lr=config.inner_lr),
            hyper_optimizer=lambda hp: torch.optim.Adam(hp, lr=config.hyper_lr),
            method=table, hyper_every=10, threads=1,
        )  # fmt: skip
        table.hessian = "gauss_newton"
        with quiet():
            trainer.fit(hyper_steps)
        summary = {}
        records = table.records[1:]  # the first step: no warm start yet for anyone
        for name in table.records[0]:
            done = [r[name] for r in records if r[name]["matvecs"] is not None]
            summary[name] = {
                "reached": f"{len(done)}/{len(records)}",
                "mean_matvecs": statistics.mean(r["matvecs"] for r in done) if done else None,
                "mean_ms": statistics.mean(r["ms"] for r in done) if done else None,
                "median_error": statistics.median(r["error"] for r in done) if done else None,
            }
            console.print(f"  85k  target {target:g}  {name}: {summary[name]}")
        out[f"{target:g}"] = {"summary": summary, "records": table.records}
    return {
        "model": "MLP 64-256-256-10 (tanh), float32, digits, full batch (500 examples)",
        "num_hyperparameters": sum(p.numel() for p in mlp_85k(data).parameters()),
        "damping": damping,
        "hyper_steps": hyper_steps,
        "targets": out,
    }


# ======================================================================================
# Report
# ======================================================================================


def _mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def markdown(result: dict) -> str:
    lines = ["# Amortized implicit hypergradients", ""]
    m = result["machine"]
    lines += [f"{m['date']}, {m['cpu_model']}, torch {m['torch']}, {m['torch_threads']} "
              f"thread(s), load average at start {m['load_average_at_start']}.", "",
              f"Rerun: `{result['command']}`", ""]  # fmt: skip
    acc = result.get("accuracy")
    if acc:
        lines += [f"## 1. Accuracy along a run ({result['accuracy_setup']})", "",
                  f"Target: median relative error < {ERROR_TARGET:g} and cosine > "
                  f"{COSINE_TARGET} with at most {HVP_TARGET:g} Hessian-vector products per "
                  f"hyper-step on average.  Reference: CG from zero to 1e-8 on the same "
                  f"(damped Gauss-Newton) system.  *Today* is `hg.Implicit()` (Neumann, 10 "
                  f"terms, exact Hessian, 10 HVPs) at the same points.  The variants and "
                  f"dampings were fixed beforehand (no choice made from these numbers); no "
                  f"test data is read in this part.", "",
                  "| damping | variant | HVPs / step | median rel. error | 90th pct | "
                  "median cosine | target met | today: median rel. error | today: cosine | "
                  "reference CG steps |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in acc:
            errors = sorted(row["rel_error"])
            p90 = errors[min(len(errors) - 1, int(0.9 * len(errors)))]
            med, cos = statistics.median(errors), statistics.median(row["cosine"])
            met = med < ERROR_TARGET and cos > COSINE_TARGET and row["mean_hvps"] <= HVP_TARGET
            lines.append(
                f"| {row['damping']:g} | {row['variant']} | {row['mean_hvps']:.2f} | {med:.3g} "
                f"| {p90:.3g} | {cos:.4f} | {'yes' if met else 'NO'} | "
                f"{statistics.median(row['today_rel_error']):.3g} | "
                f"{statistics.median(row['today_cosine']):.3f} | "
                f"{statistics.median(row['reference_hvps']):.0f} |"
            )
        lines.append("")
    drift = result.get("drift")
    if drift:
        first = drift[0]
        lines += ["### 1b. How far the system moves between hyper-steps", "",
                  f"Same MNIST model and batches (damping {first['damping']:g}, the "
                  f"hypergradient's batches kept for 10 hyper-steps), runs of "
                  f"{first['sgd_steps']} SGD steps; at {len(first['records'])} points, the "
                  "converged adjoints of two consecutive hyper-steps.  *Best warm start*: CG "
                  "started from the previous step's *exact* adjoint (a run only keeps an "
                  "approximation of it), its hypergradient's relative error against the "
                  "converged one: what warm starting reaches at that budget when the "
                  "previous solve was exact.  Medians over the points; nothing was tuned.", "",
                  "| SGD steps per hyper-step | validation gradient moves | adjoint moves | "
                  "best warm start, 2 HVPs | 3 HVPs | 4 HVPs |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for row in drift:
            lines.append(
                f"| {row['hyper_every']} | {row['median_rhs_change']:.3f} | "
                f"{row['median_adjoint_change']:.3f} | "
                + " | ".join(f"{row[f'median_best_warm_error_{n + 1}_hvps']:.3g}"
                             for n in DRIFT_CG_STEPS)
                + " |"
            )  # fmt: skip
        lines.append("")
    cost = result.get("cost")
    if cost:
        lines += [f"## 2. Cost and validation loss ({cost['inner_steps']} SGD steps, seeds "
                  f"{cost['report_seeds']}; choices made on seeds {cost['selection_seeds']})",
                  "",
                  "| run | chosen configuration | paired time ratio (median, min-max) | "
                  f"<= {COST_TARGET}x | validation loss | test loss | hypergradient ms | "
                  "HVPs / hyper-step |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        plain = cost["rows"]["plain SGD"]
        lines.append(
            f"| plain SGD | decay {result['plain_decay']:g} | 1 | - | "
            f"{_mean_sd(plain['val_loss'])} | {_mean_sd(plain['test_loss'])} | - | - |"
        )
        for label, row in cost["rows"].items():
            if label == "plain SGD":
                continue
            ratio = statistics.median(row["ratio"])
            hvps = [v for v in row["hvps_per_step"] if v is not None]
            lines.append(
                f"| {label} | {cost['chosen'][label]} | {ratio:.2f} ({min(row['ratio']):.2f}-"
                f"{max(row['ratio']):.2f}) | {'yes' if ratio <= COST_TARGET else 'NO'} | "
                f"{_mean_sd(row['val_loss'])} | {_mean_sd(row['test_loss'])} | "
                f"{statistics.median(row['hypergradient_ms']):.1f} | "
                f"{statistics.mean(hvps) if hvps else 10:.2f} |"
            )
        lines += ["", "Every configuration was chosen on the selection seeds' validation "
                  "losses and costs (table below); the report seeds' test sets were read once, "
                  "at the end of each reported run.", "",
                  "Selection (mean of the selection seeds):", "",
                  "| candidate | validation loss | cost ratio |", "|---|---|---|"]  # fmt: skip
        for name, row in sorted(cost["selection"].items(), key=lambda kv: kv[1]["val_loss"]):
            lines.append(f"| {name} | {row['val_loss']:.4f} | {row['cost_ratio']:.2f} |")
        lines.append("")
    fixed = result.get("fixed_accuracy")
    if fixed:
        lines += [f"## 3. To a fixed accuracy: {fixed['model']}, "
                  f"{fixed['num_hyperparameters']:,} per-weight decays, damping "
                  f"{fixed['damping']:g}, {fixed['hyper_steps']} hyper-steps", "",
                  "Damping, targets and the Neumann step (the inner learning rate) were fixed "
                  "beforehand; each contender stops at the first iteration count within the "
                  "target (an oracle stop, the same for all); no test data is read.", "",
                  "| target rel. error | method | reached | mean matvecs | mean ms | "
                  "median rel. error |", "|---|---|---|---|---|---|"]  # fmt: skip
        for target, block in fixed["targets"].items():
            for name, s in block["summary"].items():
                fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
                lines.append(f"| {target} | {name} | {s['reached']} | "
                             f"{fmt(s['mean_matvecs'], '.1f')} | {fmt(s['mean_ms'], '.1f')} | "
                             f"{fmt(s['median_error'], '.3g')} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of each part")
    parser.add_argument("--parts", nargs="+", choices=("accuracy", "drift", "cost", "fixed"),
                        default=["accuracy", "drift", "cost", "fixed"],
                        help="parts to run; the others' results are kept from the last "
                             "run's JSON")  # fmt: skip
    parser.add_argument("--data-dir", default=None, help="folder holding mnist/ "
                        "(default: $HYPERGRADIENT_DATA)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console()
    torch.set_num_threads(1)
    config = base_config(args.data_dir)
    quick = args.quick
    result = {
        "machine": machine_info(threads=1),
        "command": rerun_command("amortized.py", sys.argv[1:] if argv is None else list(argv)),
        "data": data_source(args.data_dir),
        "plain_decay": config.init_weight_decay,
    }
    if "accuracy" in args.parts:
        data = recipe.load_data(config)
        result["accuracy_setup"] = (
            f"{config.dataset}, MLP {data.num_features}-{config.hidden}-{data.num_classes}, "
            f"batches of {config.batch_size}, {config.hyper_every} SGD steps per hyper-step"
        )
        result["accuracy"] = run_accuracy(
            config, data, hyper_steps=10 if quick else 100, every=5, console=console
        )
    if "drift" in args.parts:
        data = recipe.load_data(config)
        result["drift"] = run_drift(config, data, sgd_steps=60 if quick else 1000,
                                    probes=2 if quick else 10, console=console)  # fmt: skip
    if "cost" in args.parts:
        result["cost"] = run_cost(
            config, budget=60 if quick else 1500,
            selection_seeds=[100] if quick else [100, 101],
            report_seeds=[0, 1] if quick else [0, 1, 2, 3, 4], console=console,
        )  # fmt: skip
    if "fixed" in args.parts:
        result["fixed_accuracy"] = run_fixed_accuracy(
            hyper_steps=4 if quick else 20, damping=0.1,
            targets=(1e-1,) if quick else (1e-1, 1e-2), console=console,
        )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "amortized_quick" if quick else "amortized"
    previous = args.out / f"{stem}.json"
    if set(args.parts) != {"accuracy", "drift", "cost", "fixed"} and previous.exists():
        # a rerun of some parts keeps the others' results (each part records its own setup)
        kept = json.loads(previous.read_text())
        for key in ("accuracy", "accuracy_setup", "drift", "cost", "fixed_accuracy"):
            if key in kept and key not in result:
                result[key] = kept[key]
        result["parts_rerun"] = {"parts": args.parts, "machine": result["machine"]}
        result["machine"] = kept.get("machine", result["machine"])
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{stem}.md").write_text(markdown(result))
    console.print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
