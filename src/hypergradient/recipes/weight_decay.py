r"""``hypergradient weight-decay``: one weight decay per weight, fitted by hypergradients.

The experiment (Lorraine, Vicol & Duvenaud 2020, Sec. 5.1, at CPU scale):

1. **Grid baseline.**  The MLP is trained once per *global* decay in ``grid`` with plain
   ``torch.optim.SGD(weight_decay=wd)`` for the same inner step budget
   (``hyper_steps * hyper_every`` mini-batch steps, the same batch order) as the tuned run.
   SGD's ``weight_decay=wd`` adds :math:`wd\,w` to the gradient: exactly the gradient of the
   penalty :math:`\tfrac12 wd \lVert w\rVert^2` the tuned run starts from.
2. **Tuned run.**  :class:`~hypergradient.BilevelTrainer` with
   :class:`~hypergradient.hparams.WeightDecay` (``granularity``: one decay, one per tensor,
   or one per weight: as many hyperparameters as weights).  Warm start: every
   ``hyper_every`` SGD steps, one hyper-step (implicit or unrolled hypergradient on a fresh
   training batch and a validation batch) moves the log decays with Adam.  The decays are
   clipped after every hyper-step to ``decay_safety`` (0.9) times the largest decay the inner
   SGD step is stable with, ``2 / inner_lr`` (:func:`~hypergradient.hparams.max_stable_decay`):
   hypergradients can push a decay without limit (a weight the validation loss dislikes is
   best at zero), and past ``2 / inner_lr`` its weight oscillates with growing amplitude and
   the training loss explodes.  ``results.json`` reports how often the bound was hit.
3. **Split-size study.**  Step 2 is repeated for every validation-set size in
   ``val_sizes`` (the first ``k`` examples of one validation pool; the training and test sets
   stay the same).  Thousands of hyperparameters fitted on a small validation set over-fit
   it: the gap between test and validation loss grows as the validation set shrinks.  The
   grid is not retrained (its training does not see the validation set); its best decay is
   re-selected on each validation subset.

Cost: the grid is ``len(grid)`` plain training runs; each tuned run is the same number of
SGD steps plus ``hyper_steps`` hypergradients (implicit Neumann: about ``solver_steps + 3``
backward passes each, on one mini-batch; see ``benchmarks/joint_training_cost.py``).
Memory: the model, as many decays as weights (per-weight) and their Adam state.

Files in the run folder: ``results.json``, ``losses.png`` (validation/test loss per
hyper-step), ``split_size.png`` (test - validation gap per validation size),
``checkpoint.pt`` + ``hyper_steps.jsonl`` of the main run (other validation sizes in
``val_size_<k>/``), ``grid.json`` (finished grid runs, reused by ``--resume``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .._errors import HypergradientError
from ..data import Split, load_digits_split, load_fashion_mnist, load_mnist, to_float_split
from ..hparams import WeightDecay, max_stable_decay
from ..hypergrad.methods import (
    AbstractHypergradientMethod,
    AmortizedImplicit,
    Implicit,
    Unrolled,
)
from ..train import BatchStream, BilevelTrainer
from ._base import (
    ThreadedRecipe,
    machine,
    progress_bar,
    pyplot,
    register_recipe,
    resume_or_start_over,
    write_json_atomic,
    write_results,
)
from ._config import (
    check_choice,
    check_data_dir,
    check_positive,
    check_positive_int,
    help_text,
    threads_field,
)

_DATASETS = ("digits", "mnist", "fashion-mnist")
_SOLVERS = ("neumann", "cg", "exact", "identity", "minres", "gmres")
_DIGITS_TOTAL, _DIGITS_MIN_TEST = 1797, 100
_MNIST_TRAIN_TOTAL = 60_000
# Loss curves are evaluated (whole validation and test sets) at about this many hyper-steps:
# every hyper-step would cost more than the training itself on MNIST's 10000 test images.
_CURVE_POINTS = 100


@dataclass
class WeightDecayConfig:
    """Options of ``hypergradient weight-decay`` (defaults: 1-2 minutes on 2 CPU cores)."""

    dataset: str = field(
        default="digits",
        metadata=help_text(
            "digits (scikit-learn's 8x8 digits, shipped, no download), mnist or fashion-mnist "
            "(original IDX files in data_dir; test set = the official 10000 test images)"
        ),
    )
    data_dir: str | None = field(
        default=None,
        metadata=help_text(
            "folder holding the MNIST/Fashion-MNIST files (default: $HYPERGRADIENT_DATA, "
            "else ~/.cache/hypergradient); unused for digits"
        ),
    )
    download: bool = field(
        default=False, metadata=help_text("fetch missing MNIST/Fashion-MNIST files (md5-checked)")
    )
    n_train: int = field(default=500, metadata=help_text("training examples"))
    n_val: int = field(
        default=300,
        metadata=help_text("validation examples of the main run (what the table leads)"),
    )
    val_sizes: list[int] = field(
        default_factory=lambda: [50, 300],
        metadata=help_text(
            "split-size study: validation-set sizes to repeat the tuned run with (the first k "
            "examples of one validation pool; empty list: no study)"
        ),
    )
    hidden: int = field(
        default=128, metadata=help_text("hidden width of the MLP in -> hidden -> 10")
    )
    granularity: str = field(
        default="per_weight",
        metadata=help_text(
            "tuned decays: global (1), per_tensor (1 per tensor), per_weight (1 each)"
        ),
    )
    init_weight_decay: float = field(
        default=1e-3, metadata=help_text("initial value of every tuned decay (> 0)")
    )
    inner_lr: float = field(
        default=0.1, metadata=help_text("SGD learning rate of the weights (also the Neumann step)")
    )
    batch_size: int = field(default=64, metadata=help_text("training mini-batch size"))
    val_batch_size: int | None = field(
        default=None,
        metadata=help_text("validation batch size per hyper-step (none: the whole validation set)"),
    )
    hyper_every: int = field(default=10, metadata=help_text("SGD steps between two hyper-steps"))
    hyper_steps: int = field(
        default=300,
        metadata=help_text("hyper-steps per tuned run; inner budget = hyper_steps * hyper_every"),
    )
    method: str = field(
        default="implicit",
        metadata=help_text(
            "hypergradient: implicit (at the current weights), amortized (implicit, the "
            "linear solve warm-started from the previous hyper-step's; solver cg, minres or "
            "neumann) or unrolled (reverse-mode through unroll_steps look-ahead SGD steps)"
        ),
    )
    solver: str = field(
        default="neumann",
        metadata=help_text(
            "implicit linear solver: neumann, cg, exact (dense Hessian: tiny models only), "
            "identity, minres, gmres"
        ),
    )
    solver_steps: int = field(
        default=10,
        metadata=help_text(
            "Neumann terms / CG iterations (Hessian-vector products) per hyper-step"
        ),
    )
    damping: float = field(
        default=0.0,
        metadata=help_text("implicit/amortized: solve (H + damping I) q = dE/dw (>= 0)"),
    )
    hessian: str = field(
        default="exact",
        metadata=help_text(
            "implicit/amortized curvature: exact (the mini-batch Hessian, indefinite away "
            "from a minimum) or gauss_newton (positive semi-definite)"
        ),
    )
    hypergrad_resample_every: int = field(
        default=1,
        metadata=help_text(
            "hyper-steps between fresh draws of the hypergradient's training and validation "
            "batch (1: fresh every hyper-step)"
        ),
    )
    unroll_steps: int = field(default=5, metadata=help_text("look-ahead steps of method=unrolled"))
    hyper_lr: float = field(
        default=0.03, metadata=help_text("Adam learning rate of the log decays")
    )
    decay_safety: float = field(
        default=0.9,
        metadata=help_text(
            "tuned decays are clipped to decay_safety * 2 / inner_lr, this fraction of the "
            "largest decay the SGD step is stable with (in (0, 1))"
        ),
    )
    grid: list[float] = field(
        default_factory=lambda: [0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
        metadata=help_text("global weight decays of the baseline grid (>= 0)"),
    )
    seed: int = field(
        default=0, metadata=help_text("seed of the data split, the init and batch order")
    )
    threads: int = threads_field()

    @property
    def inner_budget(self) -> int:
        return self.hyper_steps * self.hyper_every

    @property
    def max_decay(self) -> float:
        """The bound the tuned decays are clipped to: ``decay_safety * 2 / inner_lr``."""
        w = torch.zeros(1, requires_grad=True)
        return max_stable_decay(torch.optim.SGD([w], lr=self.inner_lr), self.decay_safety)

    def on_curve(self, hyper_step: int) -> bool:
        """Is ``hyper_step`` one of the (about ``_CURVE_POINTS``) evaluated points?"""
        stride = -(-self.hyper_steps // _CURVE_POINTS)
        return hyper_step % stride == 0 or hyper_step == self.hyper_steps

    def run_sizes(self) -> list[int]:
        """Validation sizes with a tuned run: ``n_val`` first, then ``val_sizes``, no repeats."""
        sizes = [self.n_val]
        for k in self.val_sizes:
            if k not in sizes:
                sizes.append(k)
        return sizes

    def validate(self) -> None:
        check_choice("dataset", self.dataset, _DATASETS)
        check_data_dir(self.data_dir, holds="mnist/ or fashion-mnist/")
        if not isinstance(self.download, bool):
            raise HypergradientError(
                f"option 'download': expected true or false, got {self.download!r}."
            )
        for name in ("n_train", "n_val", "hidden", "batch_size", "hyper_every", "hyper_steps"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("unroll_steps", self.unroll_steps)
        check_positive_int("solver_steps", self.solver_steps, minimum=0)
        check_positive_int("seed", self.seed, minimum=0)
        check_positive_int("threads", self.threads, minimum=0)
        if self.val_batch_size is not None:
            check_positive_int("val_batch_size", self.val_batch_size)
        if not isinstance(self.val_sizes, list):
            raise HypergradientError(
                f"option 'val_sizes': expected a list of integers >= 1 (e.g. val_sizes=50,300), "
                f"got {self.val_sizes!r}."
            )
        for k in self.val_sizes:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise HypergradientError(
                    f"option 'val_sizes': expected integers >= 1 (e.g. val_sizes=50,300), got "
                    f"{k!r} in {self.val_sizes!r}."
                )
        check_choice("granularity", self.granularity, ("global", "per_tensor", "per_weight"))
        check_choice("method", self.method, ("implicit", "amortized", "unrolled"))
        check_choice("solver", self.solver, _SOLVERS)
        if self.method == "amortized" and self.solver not in ("cg", "minres", "neumann"):
            raise HypergradientError(
                f"option 'solver': method=amortized warm-starts an iterative solve, so it "
                f"needs cg, minres or neumann, got {self.solver!r}; e.g. --set solver=cg."
            )
        if self.method == "amortized":
            check_positive_int("solver_steps", self.solver_steps)
        check_choice("hessian", self.hessian, ("exact", "gauss_newton"))
        check_positive_int("hypergrad_resample_every", self.hypergrad_resample_every)
        if not (
            isinstance(self.damping, (int, float))
            and not isinstance(self.damping, bool)
            and math.isfinite(self.damping)
            and self.damping >= 0
        ):
            raise HypergradientError(
                f"option 'damping': expected a number >= 0 (e.g. damping=0.1), got "
                f"{self.damping!r}."
            )
        for name in ("init_weight_decay", "inner_lr", "hyper_lr"):
            check_positive(name, getattr(self, name))
        check_positive("decay_safety", self.decay_safety)
        if self.decay_safety >= 1:
            raise HypergradientError(
                f"option 'decay_safety': expected a number in (0, 1) (a fraction of the SGD "
                f"stability limit 2 / inner_lr), got {self.decay_safety!r}."
            )
        if self.init_weight_decay > self.max_decay:
            raise HypergradientError(
                f"option 'init_weight_decay' = {self.init_weight_decay!r} exceeds the stable "
                f"bound decay_safety * 2 / inner_lr = {self.max_decay:.4g}: SGD would diverge; "
                f"lower init_weight_decay or inner_lr."
            )
        if not isinstance(self.grid, list) or not self.grid:
            raise HypergradientError(
                f"option 'grid': expected a non-empty list of weight decays >= 0 (e.g. "
                f"grid=0,1e-4,1e-2), got {self.grid!r}."
            )
        for wd in self.grid:
            check_positive("grid", wd, allow_zero=True)
        pool = max(self.run_sizes())
        if self.dataset == "digits":
            limit = _DIGITS_TOTAL - _DIGITS_MIN_TEST
            where = f"digits has {_DIGITS_TOTAL} examples and keeps >= {_DIGITS_MIN_TEST} to test"
        else:
            limit, where = _MNIST_TRAIN_TOTAL, f"{self.dataset} has {_MNIST_TRAIN_TOTAL} training"
        if self.n_train + pool > limit:
            raise HypergradientError(
                f"options 'n_train' + max('n_val', 'val_sizes') = {self.n_train} + {pool} "
                f"exceeds {limit} ({where} images); lower n_train, n_val or val_sizes."
            )


# ----------------------------------------------------------------------------- data, model


def load_data(config: WeightDecayConfig) -> Split:
    """Train / validation pool / test tensors (float32, flattened, pixels in [0, 1]).

    The validation pool holds ``max(n_val, *val_sizes)`` examples; a run with validation size
    ``k`` uses its first ``k``.  Digits: the test set is every remaining example; MNIST and
    Fashion-MNIST: the official test split.
    """
    pool = max(config.run_sizes())
    if config.dataset == "digits":
        return load_digits_split(config.n_train, pool, seed=config.seed, dtype=torch.float32)
    loader = load_mnist if config.dataset == "mnist" else load_fashion_mnist
    try:
        images, labels = loader(config.data_dir, split="train", download=config.download)
        test_images, test_labels = loader(config.data_dir, split="test", download=config.download)
    except HypergradientError as err:
        raise HypergradientError(
            f"option 'dataset' = {config.dataset!r} needs its files: {err} (options "
            f"'data_dir' = {config.data_dir!r}, 'download' = {config.download})."
        ) from None
    # n_test=1 only satisfies to_float_split: the test set is the official one below
    part = to_float_split(images, labels, config.n_train, pool, n_test=1, seed=config.seed)
    x_test = test_images.reshape(len(test_images), -1).to(torch.float32) / 255.0
    return Split(part.x_train, part.y_train, part.x_val, part.y_val, x_test, test_labels.long(), 10)


def build_model(config: WeightDecayConfig, data: Split) -> nn.Module:
    """The MLP ``features -> hidden (tanh) -> classes``, float32, seeded from ``config.seed``.

    The init is drawn inside a forked RNG so that building a model leaves the caller's global
    random state alone (every run of the recipe starts from the same weights).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return nn.Sequential(
            nn.Linear(data.num_features, config.hidden, dtype=torch.float32),
            nn.Tanh(),
            nn.Linear(config.hidden, data.num_classes, dtype=torch.float32),
        )


def train_loader(config: WeightDecayConfig, data: Split) -> DataLoader:
    return DataLoader(
        TensorDataset(data.x_train, data.y_train), batch_size=config.batch_size, shuffle=True
    )


def val_loader(config: WeightDecayConfig, data: Split, n_val: int) -> DataLoader:
    size = n_val if config.val_batch_size is None else min(config.val_batch_size, n_val)
    dataset = TensorDataset(data.x_val[:n_val], data.y_val[:n_val])
    return DataLoader(dataset, batch_size=size, shuffle=True)


def build_method(config: WeightDecayConfig) -> AbstractHypergradientMethod:
    if config.method == "unrolled":
        return Unrolled(steps=config.unroll_steps, mode="reverse")
    if config.method == "amortized":
        return AmortizedImplicit(
            solver=config.solver,
            max_steps=config.solver_steps,
            damping=config.damping,
            hessian=config.hessian,
        )
    return Implicit(
        solver=config.solver,
        max_steps=config.solver_steps,
        damping=config.damping,
        hessian=config.hessian,
    )


def build_trainer(
    config: WeightDecayConfig,
    data: Split,
    n_val: int,
    *,
    log_dir: Path | None = None,
    callbacks: Iterable[Callable] = (),
) -> BilevelTrainer:
    """A fresh model, SGD and the bilevel trainer of one tuned run (validation size ``n_val``)."""
    model = build_model(config, data)
    hyper_lr = config.hyper_lr
    return BilevelTrainer(
        model,
        WeightDecay(
            config.granularity, initial=config.init_weight_decay, max_decay=config.max_decay
        ),
        train_loader(config, data),
        val_loader(config, data, n_val),
        torch.optim.SGD(model.parameters(), lr=config.inner_lr),
        hyper_optimizer=lambda hp: torch.optim.Adam(hp, lr=hyper_lr),
        method=build_method(config),
        hyper_every=config.hyper_every,
        hypergrad_resample_every=config.hypergrad_resample_every,
        callbacks=callbacks,
        log_dir=log_dir,
        seed=config.seed,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


# ----------------------------------------------------------------------------- grid baseline

# Options that change a grid run's training; a cached run is reused only if they all match.
_GRID_KEYS = ("dataset", "n_train", "hidden", "inner_lr", "batch_size", "seed")


def _grid_signature(config: WeightDecayConfig) -> dict[str, Any]:
    sig = {k: getattr(config, k) for k in _GRID_KEYS}
    sig.update(inner_budget=config.inner_budget, hyper_every=config.hyper_every)
    sig.update(val_sizes=config.run_sizes())  # what the cached evaluations cover
    return sig


def run_grid_value(config: WeightDecayConfig, data: Split, wd: float, on_step=None) -> dict:
    """Plain mini-batch SGD with global decay ``wd``; the tuned runs' batch order and budget.

    Validation (main size) and test loss are recorded at the inner steps where a tuned run
    evaluates its curve (every ``hyper_every`` steps, thinned to about 100 points).
    """
    start = time.perf_counter()
    model = build_model(config, data)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.inner_lr, weight_decay=wd)
    stream = BatchStream(train_loader(config, data), config.seed)  # the trainer's batch order
    n_main = config.n_val
    curve: dict[str, list[float]] = {"inner_step": [], "val_loss": [], "test_loss": []}
    for step in range(1, config.inner_budget + 1):
        x, y = stream.next()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step % config.hyper_every == 0 and config.on_curve(step // config.hyper_every):
            eval_start = time.perf_counter()
            curve["inner_step"].append(step)
            curve["val_loss"].append(evaluate(model, data.x_val[:n_main], data.y_val[:n_main])[0])
            curve["test_loss"].append(evaluate(model, data.x_test, data.y_test)[0])
            # like a tuned run's time, the grid's counts training only, not the curve
            start += time.perf_counter() - eval_start
        if on_step is not None and step % config.hyper_every == 0:
            on_step(config.hyper_every)
    seconds = time.perf_counter() - start
    last_loss = float(loss.detach())
    if not math.isfinite(last_loss):
        raise HypergradientError(
            f"weight-decay grid: training with weight decay {wd:g} diverged (loss "
            f"{last_loss}); lower option 'inner_lr' (now {config.inner_lr})."
        )
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train)
    val = {}
    for k in config.run_sizes():
        loss_k, acc_k = evaluate(model, data.x_val[:k], data.y_val[:k])
        val[str(k)] = {"loss": loss_k, "acc": acc_k}
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    return {
        "weight_decay": wd,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val": val,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "curve": curve,
        "seconds": seconds,
    }


def run_grid(config, data, run_dir: Path, *, resume: bool, on_step=None) -> list[dict]:
    """Every grid value, each cached in ``grid.json`` as soon as it finishes."""
    cache_path = run_dir / "grid.json"
    signature = _grid_signature(config)
    cached: dict[str, dict] = {}
    if resume and cache_path.is_file():
        saved = json.loads(cache_path.read_text())
        if saved.get("signature") == signature:
            cached = saved["runs"]
    rows = []
    for wd in config.grid:
        key = repr(float(wd))
        if key not in cached:
            cached[key] = run_grid_value(config, data, float(wd), on_step)
            write_json_atomic(cache_path, {"signature": signature, "runs": cached})
        elif on_step is not None:
            on_step(config.inner_budget)
        rows.append(cached[key])
    return rows


# ----------------------------------------------------------------------------- tuned runs


def _run_paths(run_dir: Path, n_val: int, main: bool) -> Path:
    return run_dir if main else run_dir / f"val_size_{n_val}"


# Options a checkpoint must agree on to be resumed (hyper_steps may grow: fit() continues).
_RESUME_KEYS = (
    "dataset", "n_train", "hidden", "granularity", "init_weight_decay", "inner_lr",
    "batch_size", "val_batch_size", "hyper_every", "method", "solver", "solver_steps",
    "unroll_steps", "hyper_lr", "decay_safety", "seed",
)  # fmt: skip


def run_tuned(
    config: WeightDecayConfig,
    data: Split,
    n_val: int,
    folder: Path,
    *,
    resume: bool,
    on_step=None,
) -> dict:
    """One tuned run with validation size ``n_val``; checkpoint and log in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "checkpoint.pt"
    meta = {k: getattr(config, k) for k in _RESUME_KEYS} | {"n_val": n_val}
    resume_or_start_over(folder, meta, resume=resume, stale=["hyper_steps.jsonl"])
    x_val, y_val = data.x_val[:n_val], data.y_val[:n_val]

    def evaluate_on_curve(trainer: BilevelTrainer, record: dict) -> None:
        # whole validation and test loss for the plot; the record is the one kept in
        # trainer.history, so it lands in the checkpoint and survives a resume
        if config.on_curve(record["hyper_step"]):
            model = trainer.model
            record["eval_val_loss"], record["eval_val_acc"] = evaluate(model, x_val, y_val)
            record["test_loss"], record["test_acc"] = evaluate(model, data.x_test, data.y_test)
        if on_step is not None:
            on_step(1)

    trainer = build_trainer(config, data, n_val, log_dir=folder, callbacks=[evaluate_on_curve])
    trainer.fit(config.hyper_steps, checkpoint=checkpoint, resume=resume)
    history = trainer.history
    model = trainer.model
    val_loss, val_acc = evaluate(model, x_val, y_val)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train)
    decays = torch.cat([v.detach().exp().reshape(-1) for v in trainer.hparams.values()]).double()
    at_bound = [int(r.get("wd_at_bound", 0)) for r in history]
    return {
        "n_val": n_val,
        "num_hparams": int(decays.numel()),
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "gap": test_loss - val_loss,
        "weight_decay_quantiles": {
            str(q): float(torch.quantile(decays, q)) for q in (0.05, 0.5, 0.95)
        },
        # the stability guard: decays clipped to max_decay after a hyper-step
        "decay_clipping": {
            "max_decay": config.max_decay,
            "hyper_steps_clipped": sum(1 for n in at_bound if n > 0),
            "hyper_steps": len(at_bound),
            "decays_at_bound_max": max(at_bound, default=0),
            "decays_at_bound_final": at_bound[-1] if at_bound else 0,
        },
        # the hyper-steps' own time (kept in the checkpoint: a resumed run reports it whole)
        "seconds": sum(r["seconds"] for r in history),
        "history": {
            key: [r[key] for r in history if "test_loss" in r]
            for key in ("hyper_step", "inner_step", "eval_val_loss", "test_loss", "wd_median")
        },
    }


# ----------------------------------------------------------------------------- the recipe


def _best_grid(grid: list[dict], n_val: int) -> dict:
    best = min(grid, key=lambda r: r["val"][str(n_val)]["loss"])
    val = best["val"][str(n_val)]
    return {
        "weight_decay": best["weight_decay"],
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "test_loss": best["test_loss"],
        "test_acc": best["test_acc"],
        "gap": best["test_loss"] - val["loss"],
    }


@register_recipe
class WeightDecayRecipe(ThreadedRecipe):
    """Tune one weight decay per weight (or per tensor, or one global) of an MLP by
    hypergradients, next to a grid of global decays trained with plain torch.optim.SGD for
    the same number of SGD steps; then repeat the tuned run for every validation-set size in
    val_sizes to show how a small validation set gets over-fitted (test - validation gap).

    Writes config.toml, results.json, losses.png, split_size.png, checkpoint.pt and
    hyper_steps.jsonl (other validation sizes in val_size_<k>/) into the run folder;
    --resume continues a killed run from its checkpoints.
    """

    name = "weight-decay"
    help = "tune one weight decay per weight of an MLP vs a grid of global decays"
    config_cls = WeightDecayConfig

    def _run(self, config, run_dir, *, resume, progress, console):
        run_dir.mkdir(parents=True, exist_ok=True)
        data = load_data(config)
        sizes = config.run_sizes()
        if resume and not (run_dir / "checkpoint.pt").is_file():
            console.print(f"no checkpoint in {run_dir}: starting from the beginning")
        with progress_bar(console, progress) as bar:
            task = bar.add_task(
                f"grid of {len(config.grid)} global decays (SGD steps)",
                total=config.inner_budget * len(config.grid),
            )
            grid = run_grid(
                config, data, run_dir, resume=resume, on_step=lambda n: bar.advance(task, n)
            )
            tuned = []
            for k in sizes:
                task = bar.add_task(
                    f"{config.granularity} decay, {k} validation examples (hyper-steps)",
                    total=config.hyper_steps,
                )

                def on_step(n, task=task):
                    bar.advance(task, n)

                folder = _run_paths(run_dir, k, main=k == config.n_val)
                result = run_tuned(config, data, k, folder, resume=resume, on_step=on_step)
                bar.update(task, completed=config.hyper_steps)
                tuned.append(result)

        by_size = []
        for result in tuned:
            best = _best_grid(grid, result["n_val"])
            by_size.append({"n_val": result["n_val"], "best_grid": best, "tuned": result})
        main = by_size[0]
        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": machine(),
            "data": {
                "n_train": len(data.y_train),
                "val_pool": len(data.y_val),
                "n_test": len(data.y_test),
            },
            "grid": grid,
            "runs": by_size,
            "tuned_beats_grid_on_validation": (
                main["tuned"]["val_loss"] < main["best_grid"]["val_loss"]
            ),
        }
        write_results(run_dir, results)
        _plot_losses(results, run_dir / "losses.png")
        _plot_split_sizes(results, run_dir / "split_size.png")
        console.print(results_table(results))
        for run in by_size:
            clip = run["tuned"]["decay_clipping"]
            if clip["hyper_steps_clipped"]:
                console.print(
                    f"n_val={run['n_val']}: decays clipped to the stability bound "
                    f"{clip['max_decay']:.4g} (decay_safety * 2 / inner_lr) after "
                    f"{clip['hyper_steps_clipped']} of {clip['hyper_steps']} hyper-steps (up to "
                    f"{clip['decays_at_bound_max']} decays at once)."
                )
        verdict = "lower" if results["tuned_beats_grid_on_validation"] else "NOT lower"
        console.print(
            f"{config.granularity} decay: validation loss {verdict} than the best global decay "
            f"(n_val={config.n_val}). Wrote results.json, losses.png, split_size.png to {run_dir}."
        )
        return results


def results_table(results: dict) -> Table:
    config = results["config"]
    table = Table(
        title=f"Weight decay on {config['dataset']}: {config['granularity']} ({config['method']}) "
        f"vs best global decay, {config['hyper_steps'] * config['hyper_every']} SGD steps each"
    )
    columns = ("n_val", "method", "#hparams", "val loss", "val acc", "test loss", "test acc")
    for col in (*columns, "test-val gap", "time"):
        table.add_column(col, justify="left" if col == "method" else "right")
    grid_seconds = sum(r["seconds"] for r in results["grid"])
    for run in results["runs"]:
        best, tuned = run["best_grid"], run["tuned"]
        table.add_row(
            str(run["n_val"]),
            f"best global wd={best['weight_decay']:g}",
            "1",
            f"{best['val_loss']:.4f}",
            f"{best['val_acc']:.3f}",
            f"{best['test_loss']:.4f}",
            f"{best['test_acc']:.3f}",
            f"{best['gap']:+.4f}",
            f"{grid_seconds:.0f}s/{len(results['grid'])} runs",
        )
        table.add_row(
            "",
            f"{config['granularity']} ({config['method']})",
            f"{tuned['num_hparams']:,}",
            f"{tuned['val_loss']:.4f}",
            f"{tuned['val_acc']:.3f}",
            f"{tuned['test_loss']:.4f}",
            f"{tuned['test_acc']:.3f}",
            f"{tuned['gap']:+.4f}",
            f"{tuned['seconds']:.0f}s",
            end_section=True,
        )
    return table


def _plot_losses(results: dict, path: Path) -> None:
    """Validation and test loss per hyper-step: tuned run vs the best global decay."""
    plt = pyplot()
    main = results["runs"][0]
    hist = main["tuned"]["history"]
    best_wd = main["best_grid"]["weight_decay"]
    best = next(r for r in results["grid"] if r["weight_decay"] == best_wd)
    every = results["config"]["hyper_every"]
    steps = [s // every for s in best["curve"]["inner_step"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    label = results["config"]["granularity"]
    ax.plot(hist["hyper_step"], hist["eval_val_loss"], color="C0", label=f"{label}: validation")
    ax.plot(hist["hyper_step"], hist["test_loss"], color="C0", ls=":", label=f"{label}: test")
    ax.plot(steps, best["curve"]["val_loss"], color="k", label=f"global {best_wd:g}: validation")
    ax.plot(steps, best["curve"]["test_loss"], color="k", ls=":", label=f"global {best_wd:g}: test")
    ax.set_xlabel(f"hyper-step ({every} SGD steps each)")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title(f"Tuned weight decay, {main['n_val']} validation examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_split_sizes(results: dict, path: Path) -> None:
    """Test - validation loss gap per validation-set size (over-fitting of the validation set)."""
    plt = pyplot()
    runs = sorted(results["runs"], key=lambda r: r["n_val"])
    xs = range(len(runs))
    width = 0.38
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.bar([x - width / 2 for x in xs], [r["best_grid"]["gap"] for r in runs], width,
           color="0.5", label="best global decay")  # fmt: skip
    ax.bar([x + width / 2 for x in xs], [r["tuned"]["gap"] for r in runs], width,
           color="C0", label=f"{results['config']['granularity']} decay")  # fmt: skip
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), [str(r["n_val"]) for r in runs])
    ax.set_xlabel("validation examples")
    ax.set_ylabel("test loss - validation loss")
    ax.set_title("Smaller validation set, more over-fitting of the hyperparameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
