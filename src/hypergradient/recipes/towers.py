r"""``hypergradient towers``: taller hyper-optimizer towers forget their initial step size.

The study of Chandra et al. (2022, "Gradient Descent: The Ultimate Optimizer") at CPU
scale, on scikit-learn's digits:

1. An MLP ``64 -> hidden (tanh) -> 10`` is trained for ``steps`` mini-batch steps (the same
   initial weights and the same batches for every run) by a tower of height ``H`` for every
   ``H`` in ``heights`` and every initial step size ``v`` in ``step_sizes``: the base
   optimizer (``base``, learning rate ``v``) has its learning rate tuned online by a
   ``hyper`` optimizer, whose learning rate is tuned by another, ... (``H - 1``
   hyper-optimizers; :mod:`hypergradient.optimizers.towers`).  Every level starts at the same ``v``
   (the paper's protocol), or, with ``hyper_init`` set, the levels above the base all start
   at ``hyper_init``.  Only learning rates are tuned.
2. The *spread* of a height is ``max_v - min_v`` of the final full-training-set
   cross-entropy: how much the result still depends on the hand-chosen ``v``.  Plain SGD
   (``H = 1``) is very sensitive to it; taller towers much less.

Features are standardised (zero mean, unit variance per pixel over the training set) by
default.  With the raw ``[0, 1]`` pixels (``features = "scaled"``) the hypergradients
:math:`g_t \cdot g_{t-1}` at small ``v`` are about 7x smaller (level 1's, products of two,
about 50x), and hyper-learning rates equal to ``v`` barely move the step size in 300 steps:
a tower only helps when the hyper-learning rates match the size of the hypergradients (the
paper's pitfall).

Cost: ``len(heights) * len(step_sizes)`` training runs of ``steps`` steps; a tower step
costs about one extra elementwise pass over the weights per step and a few scalar ops per
level (the default study: 20 runs of 300 steps, about 15 s on one CPU core).

Files in the run folder: ``results.json``, ``towers.png`` (final loss against ``v`` per
height; spread against height; the base learning rate over training),
``runs.json`` (finished runs, reused by ``--resume``), ``config.toml``.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table
from torch import nn

from .._errors import HypergradientError
from ..data import load_digits_split
from ..optimizers import towers
from ._base import AbstractRecipe, RunCache, register_recipe, write_results
from ._config import check_choice, check_positive, check_positive_int, threads_field

_OPTIMIZERS: dict[str, type[towers.AbstractTowerOptimizer]] = {
    "sgd": towers.SGD,
    "adam": towers.Adam,
    "adagrad": towers.AdaGrad,
    "rmsprop": towers.RMSProp,
}
_FEATURES = ("standardized", "scaled")
_DIGITS_TOTAL, _DIGITS_KEPT = 1797, 101  # load_digits_split keeps >= 100 test + 1 validation
_CURVE_POINTS = 60  # points of the learning-rate / loss curves kept per run

# papers.md section 19 (calibration of the paper's claim on digits: MLP 64-32-10 tanh, 300
# steps, batch 64, every level of an SGD tower starting at v); final full-train CE per v
CALIBRATION = {
    "source": "docs/papers.md section 19, digits calibration ('tower.py same 0')",
    "step_sizes": [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
    "final_loss": {
        "1": [2.27, 2.20, 1.66, 0.30, 0.05],
        "2": [2.02, 0.86, 0.22, 0.15, 0.18],
        "3": [1.14, 0.32, 0.16, 0.16, 0.18],
        "4": [0.99, 0.30, 0.16, 0.16, 0.18],
    },
    # as published (max - min of the rounded losses can differ by 0.01)
    "spread": {"1": 2.22, "2": 1.87, "3": 0.97, "4": 0.83},
    "spread_without_smallest": {"1": 2.15, "2": 0.71, "3": 0.16, "4": 0.14},
}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TowersConfig:
    """Options of ``hypergradient towers`` (defaults: about 15 s on one CPU core)."""

    heights: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4],
        metadata=_help("tower heights to compare (1 = the base optimizer alone, untuned)"),
    )
    step_sizes: list[float] = field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        metadata=_help("initial learning rates v of the base (> 0); one run per height and v"),
    )
    hyper_init: float | None = field(
        default=None,
        metadata=_help(
            "initial learning rate of every level above the base (none: the same v as the "
            "base, the paper's protocol; a number: only the base's v varies)"
        ),
    )
    base: str = field(
        default="sgd", metadata=_help("base optimizer: sgd, adam, adagrad or rmsprop")
    )
    hyper: str = field(
        default="sgd",
        metadata=_help("optimizer of every level above the base: sgd, adam, adagrad or rmsprop"),
    )
    features: str = field(
        default="standardized",
        metadata=_help(
            "standardized (zero mean, unit variance per pixel over the training set) or "
            "scaled (pixels / 16 in [0, 1]: several times smaller hypergradients)"
        ),
    )
    n_train: int = field(
        default=1000,
        metadata=_help("training examples (the final loss is on all of them); the rest held out"),
    )
    hidden: int = field(default=32, metadata=_help("hidden width of the MLP 64 -> hidden -> 10"))
    batch_size: int = field(default=64, metadata=_help("mini-batch size"))
    steps: int = field(default=300, metadata=_help("training steps per run"))
    seed: int = field(
        default=0, metadata=_help("seed of the data split, the initial weights and batch order")
    )
    threads: int = threads_field()

    def validate(self) -> None:
        _check_list("heights", self.heights, int, "heights=1,2,3")
        for h in self.heights:
            check_positive_int("heights", h)
        _check_list("step_sizes", self.step_sizes, float, "step_sizes=0.001,0.01,0.1")
        for v in self.step_sizes:
            check_positive("step_sizes", v)
        if self.hyper_init is not None:
            check_positive("hyper_init", self.hyper_init)
        check_choice("base", self.base, tuple(_OPTIMIZERS))
        check_choice("hyper", self.hyper, tuple(_OPTIMIZERS))
        check_choice("features", self.features, _FEATURES)
        for name in ("n_train", "hidden", "batch_size", "steps"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("seed", self.seed, minimum=0)
        check_positive_int("threads", self.threads, minimum=0)
        limit = _DIGITS_TOTAL - _DIGITS_KEPT
        if self.n_train > limit:
            raise HypergradientError(
                f"option 'n_train': digits has {_DIGITS_TOTAL} examples and keeps at least "
                f"{_DIGITS_KEPT} out of training; expected at most {limit}, got {self.n_train}."
            )
        if self.batch_size > self.n_train:
            raise HypergradientError(
                f"option 'batch_size': expected at most n_train = {self.n_train} (one batch "
                f"must fit in the training set), got {self.batch_size}."
            )


def _check_list(option: str, value: object, kind: type, example: str) -> None:
    if not isinstance(value, list) or not value:
        raise HypergradientError(
            f"option {option!r}: expected a non-empty list (e.g. {example}), got {value!r}."
        )
    if len(set(value)) != len(value):
        raise HypergradientError(
            f"option {option!r}: expected distinct values (e.g. {example}), got {value!r}."
        )
    for item in value:
        ok = isinstance(item, (int, float) if kind is float else int)
        if isinstance(item, bool) or not ok:
            raise HypergradientError(
                f"option {option!r}: expected {kind.__name__}s (e.g. {example}), got {item!r} "
                f"in {value!r}."
            )


# ----------------------------------------------------------------------------- data, model


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor


def load_data(config: TowersConfig) -> Data:
    """Digits: ``n_train`` training examples, every other one held out; float32 features."""
    split = load_digits_split(config.n_train, 1, seed=config.seed, dtype=torch.float32)
    x_train = split.x_train
    x_held = torch.cat([split.x_val, split.x_test])
    y_held = torch.cat([split.y_val, split.y_test])
    if config.features == "standardized":
        mean, std = x_train.mean(0), x_train.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant (border) pixels
        x_train, x_held = (x_train - mean) / std, (x_held - mean) / std
    return Data(x_train, split.y_train, x_held, y_held)


def build_model(config: TowersConfig) -> nn.Module:
    """The MLP ``64 -> hidden (tanh) -> 10``, float32, seeded from ``config.seed`` (inside a
    forked RNG: every run starts from the same weights and the caller's RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return nn.Sequential(
            nn.Linear(64, config.hidden, dtype=torch.float32),
            nn.Tanh(),
            nn.Linear(config.hidden, 10, dtype=torch.float32),
        )


def batch_order(config: TowersConfig, n: int) -> list[torch.Tensor]:
    """The ``steps`` mini-batches (index tensors) every run sees: reshuffled each epoch,
    incomplete last batches dropped."""
    gen = torch.Generator().manual_seed(config.seed)
    per_epoch = n // config.batch_size
    batches: list[torch.Tensor] = []
    while len(batches) < config.steps:
        perm = torch.randperm(n, generator=gen)
        batches.extend(perm[: per_epoch * config.batch_size].split(config.batch_size))
    return batches[: config.steps]


def build_tower(
    config: TowersConfig, model: nn.Module, height: int, step_size: float
) -> towers.AbstractTowerOptimizer:
    """``base`` at lr ``step_size`` under ``height - 1`` ``hyper`` levels; learning rates only."""
    hyper_lr = step_size if config.hyper_init is None else config.hyper_init
    levels = [_OPTIMIZERS[config.base](model.parameters(), lr=step_size, tune="lr")]
    levels += [_OPTIMIZERS[config.hyper](lr=hyper_lr, tune="lr") for _ in range(height - 1)]
    return towers.stack(levels)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def run_one(
    config: TowersConfig, data: Data, height: int, step_size: float, on_step=None
) -> dict[str, Any]:
    """Train one model with one tower; a diverging run is recorded, not raised."""
    start = time.perf_counter()
    model = build_model(config)
    opt = build_tower(config, model, height, step_size)
    stride = max(1, config.steps // _CURVE_POINTS)
    curve: dict[str, list] = {"step": [], "batch_loss": [], "lrs": []}
    diverged = None
    batches = batch_order(config, len(data.y_train))
    for step, index in enumerate(batches, start=1):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = f"training loss {value} at step {step}"
        else:
            loss.backward()
            try:
                opt.step()
            except HypergradientError as err:  # a tuned learning rate became NaN/inf
                diverged = f"step {step}: {err}"
        if step % stride == 0 or step == config.steps or diverged:
            curve["step"].append(step)
            curve["batch_loss"].append(value)
            curve["lrs"].append([level.param_groups[0]["lr"] for level in opt.levels])
        if on_step is not None:
            on_step(1 if not diverged else config.steps - step + 1)
        if diverged:
            break
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train)
    held_loss, held_acc = evaluate(model, data.x_held, data.y_held)
    finite = diverged is None and math.isfinite(train_loss)
    return {
        "height": height,
        "step_size": step_size,
        "final_train_loss": train_loss if finite else None,
        "final_train_acc": train_acc if finite else None,
        "heldout_loss": held_loss if finite and math.isfinite(held_loss) else None,
        "heldout_acc": held_acc if finite else None,
        "final_lrs": [level.param_groups[0]["lr"] for level in opt.levels],
        "diverged": diverged or (None if finite else f"final training loss {train_loss}"),
        "curve": curve,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- study


# Options that change a run; cached runs are reused only if they all match.
_RUN_KEYS = ("hyper_init", "base", "hyper", "features", "n_train", "hidden", "batch_size",
             "steps", "seed")  # fmt: skip


def _run_key(height: int, step_size: float) -> str:
    return f"height={height},step_size={float(step_size)!r}"


def run_all(config: TowersConfig, data: Data, cache: RunCache, *, on_step=None) -> list[dict]:
    """Every (height, step size) run, each kept in ``cache`` (``runs.json``) as it finishes."""
    rows = []
    for height in config.heights:
        for v in config.step_sizes:
            key = _run_key(height, v)
            if key not in cache:
                cache.put(key, run_one(config, data, height, float(v), on_step))
            elif on_step is not None:
                on_step(config.steps)
            rows.append(cache[key])
    return rows


def spread(losses: list[float | None]) -> float | None:
    """``max - min`` of the final losses (None if a run diverged or fewer than 2 values)."""
    if len(losses) < 2 or any(x is None for x in losses):
        return None
    return max(losses) - min(losses)


def summarize(config: TowersConfig, runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Per height: the final loss per step size and three spreads: over all step sizes,
    without the largest and without the smallest one."""
    order = sorted(config.step_sizes)
    out = {}
    for h in config.heights:
        by_v = {r["step_size"]: r["final_train_loss"] for r in runs if r["height"] == h}
        losses = [by_v[float(v)] for v in order]
        out[str(h)] = {
            "final_loss": losses,
            "spread": spread(losses),
            "spread_without_largest": spread(losses[:-1]),
            "spread_without_smallest": spread(losses[1:]),
        }
    return out


def checks(config: TowersConfig, per_height: dict[str, dict]) -> dict[str, bool | None]:
    """The calibration's pass criteria (papers.md section 19), where they apply."""
    spreads = [per_height[str(h)]["spread"] for h in sorted(config.heights)]
    non_increasing = None
    if all(s is not None for s in spreads) and len(spreads) > 1:
        # 0.01: a flat tail (heights 3 and 4 at ~0.1) may wobble by rounding noise
        non_increasing = all(b <= a + 0.01 for a, b in zip(spreads, spreads[1:]))
    h1, h3 = per_height.get("1", {}), per_height.get("3", {})
    s1, s3 = h1.get("spread"), h3.get("spread_without_smallest")
    return {
        "spread_non_increasing_with_height": non_increasing,
        "spread_h1_above_1.5": None if s1 is None else s1 > 1.5,
        "spread_h3_without_smallest_below_0.3": None if s3 is None else s3 < 0.3,
    }


@register_recipe
class TowersRecipe(AbstractRecipe):
    """Train a digits MLP with hyper-optimizer towers of several heights from several initial
    step sizes (every level starting at the same value, as in Chandra et al. 2022) and
    measure the spread (max - min over the initial step sizes) of the final training loss
    per height: plain SGD depends strongly on its step size, taller towers much less.

    Writes config.toml, results.json, towers.png and runs.json (one entry per finished run;
    --resume reuses them) into the run folder.
    """

    name = "towers"
    help = "hyper-optimizer towers: final loss vs initial step size, per tower height"
    config_cls = TowersConfig

    def run(self, config, run_dir, *, resume, progress, console):
        config.validate()
        old_threads = torch.get_num_threads()
        if config.threads:
            torch.set_num_threads(config.threads)
        try:
            return self._run(config, Path(run_dir), resume=resume, progress=progress,
                             console=console)  # fmt: skip
        finally:
            torch.set_num_threads(old_threads)

    def _run(self, config, run_dir, *, resume, progress, console):
        run_dir.mkdir(parents=True, exist_ok=True)
        cache = RunCache(
            run_dir, {k: getattr(config, k) for k in _RUN_KEYS}, resume=resume, console=console
        )
        data = load_data(config)
        columns = (
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        total = len(config.heights) * len(config.step_sizes) * config.steps
        start = time.perf_counter()
        with Progress(*columns, console=console, disable=not progress) as bar:
            task = bar.add_task(
                f"{len(config.heights) * len(config.step_sizes)} towers (steps)", total=total
            )
            runs = run_all(config, data, cache, on_step=lambda n: bar.advance(task, n))
        per_height = summarize(config, runs)
        default_grid = sorted(config.step_sizes) == CALIBRATION["step_sizes"]
        paper_protocol = config.base == config.hyper == "sgd" and config.hyper_init is None
        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "data": {"n_train": len(data.y_train), "n_heldout": len(data.y_held)},
            "per_height": per_height,
            "checks": checks(config, per_height),
            "calibration": CALIBRATION if default_grid and paper_protocol else None,
            "runs": runs,
            "seconds": time.perf_counter() - start,
        }
        write_results(run_dir, results)
        plot(results, run_dir / "towers.png")
        console.print(results_table(results))
        for name, ok in results["checks"].items():
            if ok is not None:
                console.print(f"{name}: {'yes' if ok else 'NO'}")
        console.print(f"Wrote results.json and towers.png to {run_dir}.")
        return results


def _fmt(x: float | None) -> str:
    if x is None:
        return "diverged"
    return f"{x:.2f}" if abs(x) < 100 else f"{x:.3g}"


def results_table(results: dict) -> Table:
    config = results["config"]
    order = sorted(config["step_sizes"])
    cal = results["calibration"]
    table = Table(
        title=f"Final training loss of a digits MLP after {config['steps']} steps, "
        f"{config['base']} under {config['hyper']} hyper-optimizers ({config['features']} "
        f"features)"
    )
    table.add_column("height", justify="right")
    for v in order:
        table.add_column(f"v={v:g}", justify="right")
    low, high = f"{order[0]:g}", f"{order[-1]:g}"
    table.add_column("spread", justify="right")
    if len(order) > 2:
        table.add_column(f"spread v<={order[-2]:g}", justify="right")
        table.add_column(f"spread v>={order[1]:g}", justify="right")
    if cal:
        table.add_column("paper cal. spread", justify="right")
        table.add_column(f"cal. v>={order[1]:g}", justify="right")
    for h in config["heights"]:
        row = results["per_height"][str(h)]
        cells = [str(h), *(_fmt(x) for x in row["final_loss"]), _fmt(row["spread"])]
        if len(order) > 2:
            cells += [_fmt(row["spread_without_largest"]), _fmt(row["spread_without_smallest"])]
        if cal:
            known = str(h) in cal["spread"]
            cells += [_fmt(cal[key][str(h)]) if known else "-"
                      for key in ("spread", "spread_without_smallest")]  # fmt: skip
        table.add_row(*cells)
    table.caption = f"spread = max - min over v in [{low}, {high}] (every level starts at v)"
    if config["hyper_init"] is not None:
        table.caption = (
            f"spread = max - min over the base's v in [{low}, {high}]; levels above start "
            f"at {config['hyper_init']:g}"
        )
    return table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: dict, path: Path) -> None:
    """Three panels: final loss vs v per height; spread vs height; base lr over training."""
    plt = _pyplot()
    config = results["config"]
    order = sorted(config["step_sizes"])
    heights = config["heights"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    ax = axes[0]
    for i, h in enumerate(heights):
        losses = results["per_height"][str(h)]["final_loss"]
        points = [(v, x) for v, x in zip(order, losses) if x is not None]
        ax.plot(*zip(*points), marker="o", color=f"C{i}", label=f"height {h}")
    ax.set_xscale("log")
    ax.set_xlabel("initial step size v (every level)")
    ax.set_ylabel("final training cross-entropy")
    ax.set_title("Final loss vs initial step size")
    ax.legend()

    ax = axes[1]
    labels = {"spread": f"all v in [{order[0]:g}, {order[-1]:g}]"}
    if len(order) > 2:
        labels["spread_without_largest"] = f"v <= {order[-2]:g}"
        labels["spread_without_smallest"] = f"v >= {order[1]:g}"
    for j, (key, label) in enumerate(labels.items()):
        pts = [(h, results["per_height"][str(h)][key]) for h in heights]
        pts = [(h, s) for h, s in pts if s is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=f"C{j}", label=f"this run, {label}")
    cal = results["calibration"]
    if cal:
        for j, key in ((0, "spread"), (2, "spread_without_smallest")):
            ch = [int(h) for h in cal[key]]
            ax.plot(ch, list(cal[key].values()), ls=":", marker="x", color=f"C{j}",
                    label=f"paper calibration, {labels[key]}")  # fmt: skip
    ax.set_xticks(heights)
    ax.set_xlabel("tower height (1 = plain optimizer)")
    ax.set_ylabel("spread of the final loss (max - min)")
    ax.set_title("Sensitivity to the initial step size")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)

    ax = axes[2]
    top = max(heights)
    for i, run in enumerate(r for r in results["runs"] if r["height"] == top):
        curve = run["curve"]
        ax.plot(curve["step"], [lrs[0] for lrs in curve["lrs"]], color=f"C{i}",
                label=f"v={run['step_size']:g}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("learning rate of the base")
    ax.set_title(f"Height {top}: the learned step size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
