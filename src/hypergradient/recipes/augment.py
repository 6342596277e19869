r"""``hypergradient augment``: a data-augmentation network tuned by implicit hypergradients.

The experiment (Lorraine, Vicol & Duvenaud 2020, Sec. 5.3 - a network whose every weight is
a hyperparameter - at CPU scale on a small MNIST subset):

1. **No augmentation.**  A small CNN (or MLP) is trained with SGD + momentum on ``n_train``
   MNIST images for ``hyper_steps * hyper_every`` mini-batch steps.
2. **Hand-designed augmentation** (context).  The same model, steps, batch order and loss
   mix, with random affine warps drawn uniformly: shifts up to ``hand_shift`` pixels,
   rotations up to ``hand_rotation`` degrees, scalings up to ``1 +- hand_scale``.
3. **Learned augmentation.**  :class:`~hypergradient.hparams.augment.AugmentationNet`
   (default: a learned spatial transformer reading noise and a thumbnail of the image) in a
   :class:`~hypergradient.BilevelTrainer`.  Warm start: the classifier keeps training on
   ``clean_weight * clean loss + (1 - clean_weight) * augmented loss``; every
   ``hyper_every`` steps one implicit hypergradient of the *clean* validation loss (a
   validation batch) moves the augmentation net's weights with Adam.  Same model init,
   steps and learning-rate schedule as 1 and 2.
4. **Re-training** (diagnostic, ``retrain=true``): a fresh model trained with the final
   learned augmentation *frozen*.  Warm-start bilevel training lets the inner weights absorb
   information about the validation set through the changing augmentation (Vicol et al.
   2022); re-training tells how much of the gain the augmentation carries on its own.

Why Neumann (the default ``solver``): the CNN's training-loss Hessian at a warm-started,
unconverged iterate is indefinite.  CG assumes a positive-definite system; it needs damping
larger than the most negative eigenvalue (unknown, and biasing) or it breaks down.  A
``solver_steps``-term Neumann series with step = the inner learning rate equals
differentiating through that many SGD steps from the current weights (Lorraine et al.): it
costs exactly ``solver_steps`` Hessian-vector products, needs no damping, and never breaks
down - along negative curvature (or curvature above ``2 / inner_lr``, which SGD's momentum
tolerates) its terms grow at most like ``|1 - inner_lr * lambda| ** solver_steps``, a finite
outlier.  Such outliers do occur early in training (a hypergradient norm of 18000 against a
usual 0.1-3 at hyper-step 2 of seed 1); ``hyper_clip`` clips them before Adam (see
:class:`ClippedAdam`).  ``solver=cg`` with ``damping > 0`` is available to compare; on the
default run it broke down (a direction of non-positive curvature) at the very first
hyper-step with ``damping`` 0.1 and 1.0 alike.

Cost: each run is ``hyper_steps * hyper_every`` SGD steps; augmented runs do two
forward/backward passes per step (clean + augmented batch); the learned run adds one
hypergradient per hyper-step (about ``solver_steps + 3`` backward passes through the
classifier and the augmentation net on one batch).  Test accuracy (the official 10000
test images) is evaluated every ``eval_every`` hyper-steps for the curves.

Files in the run folder: ``results.json``, ``examples.png`` (clean, learned and
hand-designed augmentations of the same training images), ``test_accuracy.png`` (test
accuracy per SGD step of every run), ``checkpoint.pt`` + ``hyper_steps.jsonl`` of the
learned run, ``plain_runs.json`` (finished runs without hypergradients, reused by
``--resume``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .._errors import HypergradientError
from ..data import Split, load_mnist, to_float_split
from ..hparams.augment import AugmentationNet
from ..hypergrad.methods import Implicit
from ..train import BatchStream, BilevelTrainer
from ._base import (
    ThreadedRecipe,
    load_checkpoint,
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
    check_fraction,
    check_positive,
    check_positive_int,
    help_text,
    threads_field,
)

_MNIST_TRAIN_TOTAL, _MNIST_TEST_TOTAL = 60_000, 10_000
_MODELS = ("cnn", "mlp")
_TRANSFORMS = ("affine", "residual", "both")
_SOLVERS = ("neumann", "cg")
_SCHEDULES = ("cosine", "constant")
_LR_FLOOR = 0.05  # the cosine schedule ends at this fraction of inner_lr (Neumann needs > 0)


@dataclass
class AugmentConfig:
    """Options of ``hypergradient augment`` (defaults: about 3 minutes on 2 CPU cores)."""

    data_dir: str | None = field(
        default=None,
        metadata=help_text(
            "folder holding mnist/ with the original IDX files (default: $HYPERGRADIENT_DATA, "
            "else ~/.cache/hypergradient)"
        ),
    )
    download: bool = field(
        default=False, metadata=help_text("fetch missing MNIST files (md5-checked)")
    )
    n_train: int = field(
        default=500, metadata=help_text("training images (from MNIST's train split)")
    )
    n_val: int = field(
        default=2000, metadata=help_text("validation images (train split, disjoint from training)")
    )
    n_test: int = field(
        default=10_000,
        metadata=help_text("test images: the first n_test of the official test split"),
    )
    model: str = field(
        default="cnn",
        metadata=help_text(
            "classifier: cnn (two strided 5x5 convolutions 16 -> 32, linear head) or mlp "
            "(784 -> 256 -> 10)"
        ),
    )
    batch_size: int = field(default=100, metadata=help_text("training mini-batch size"))
    val_batch_size: int = field(
        default=200, metadata=help_text("validation batch per hyper-step (clean images)")
    )
    inner_lr: float = field(
        default=0.05,
        metadata=help_text("SGD learning rate of the classifier (also the Neumann step)"),
    )
    momentum: float = field(
        default=0.9, metadata=help_text("SGD momentum of the classifier, [0, 1)")
    )
    lr_schedule: str = field(
        default="cosine",
        metadata=help_text(
            "inner learning rate per hyper-step: cosine (from inner_lr down to 5% of it) or "
            "constant; the same schedule in every run"
        ),
    )
    hyper_every: int = field(default=10, metadata=help_text("SGD steps between two hyper-steps"))
    hyper_steps: int = field(
        default=200,
        metadata=help_text(
            "hyper-steps of the learned run; every run trains hyper_steps * hyper_every"
        ),
    )
    transform: str = field(
        default="affine",
        metadata=help_text(
            "augmentation net: affine (learned spatial transformer: noise + 7x7 thumbnail -> "
            "per-image affine warp), residual (3-layer conv net adding a bounded residual), both"
        ),
    )
    noise_dim: int = field(
        default=4, metadata=help_text("noise inputs of the augmentation net (0: deterministic)")
    )
    aug_hidden: int = field(
        default=32, metadata=help_text("width of the augmentation net (hidden units / channels)")
    )
    max_warp: float = field(
        default=0.5, metadata=help_text("bound of every learned affine coefficient (tanh), > 0")
    )
    max_change: float = field(
        default=0.5, metadata=help_text("bound of the learned residual per pixel (tanh), > 0")
    )
    clean_weight: float = field(
        default=0.5,
        metadata=help_text(
            "weight of the clean term in the training loss, [0, 1) (augmented: rest)"
        ),
    )
    hyper_lr: float = field(
        default=0.003, metadata=help_text("Adam learning rate of the augmentation net's weights")
    )
    hyper_clip: float = field(
        default=3.0,
        metadata=help_text(
            "clip every hypergradient to this total norm before Adam (0: no clipping); one "
            "outlier would otherwise inflate Adam's second moment and freeze the net"
        ),
    )
    solver: str = field(
        default="neumann",
        metadata=help_text(
            "implicit linear solver: neumann (stable on the indefinite Hessian of a CNN in "
            "mid-training: it is solver_steps look-ahead SGD steps) or cg (needs damping > 0 "
            "to make that Hessian positive definite; biased by it)"
        ),
    )
    solver_steps: int = field(
        default=10, metadata=help_text("Neumann terms / CG iterations (Hessian-vector products)")
    )
    damping: float = field(
        default=0.0, metadata=help_text("damping added to the Hessian (cg needs > 0; neumann: 0)")
    )
    hand_baseline: bool = field(
        default=True,
        metadata=help_text("also train with the hand-designed random affine augmentation"),
    )
    hand_shift: float = field(default=2.0, metadata=help_text("hand-designed: max shift in pixels"))
    hand_rotation: float = field(
        default=10.0, metadata=help_text("hand-designed: max rotation in degrees")
    )
    hand_scale: float = field(
        default=0.1, metadata=help_text("hand-designed: max relative scaling")
    )
    retrain: bool = field(
        default=False,
        metadata=help_text(
            "also re-train a fresh model with the final learned augmentation frozen"
        ),
    )
    eval_every: int = field(
        default=20, metadata=help_text("hyper-steps between two test-accuracy points of the curves")
    )
    seed: int = field(
        default=0, metadata=help_text("seed of the data split, the inits, noise and batch order")
    )
    threads: int = threads_field()

    @property
    def inner_budget(self) -> int:
        return self.hyper_steps * self.hyper_every

    def lr_at(self, hyper_step: int) -> float:
        """Inner learning rate during hyper-step ``hyper_step`` (0-based) of every run."""
        if self.lr_schedule == "constant":
            return self.inner_lr
        cos = 0.5 * (1 + math.cos(math.pi * min(hyper_step, self.hyper_steps) / self.hyper_steps))
        return self.inner_lr * (_LR_FLOOR + (1 - _LR_FLOOR) * cos)

    def on_curve(self, hyper_step: int) -> bool:
        return hyper_step % self.eval_every == 0 or hyper_step == self.hyper_steps

    def validate(self) -> None:
        check_data_dir(self.data_dir, holds="mnist/")
        for name in ("download", "hand_baseline", "retrain"):
            if not isinstance(getattr(self, name), bool):
                raise HypergradientError(
                    f"option {name!r}: expected true or false, got {getattr(self, name)!r}."
                )
        for name in ("n_train", "n_val", "n_test", "batch_size", "val_batch_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("hyper_every", "hyper_steps", "aug_hidden", "eval_every"):
            check_positive_int(name, getattr(self, name))
        for name in ("noise_dim", "solver_steps", "seed", "threads"):
            check_positive_int(name, getattr(self, name), minimum=0)
        check_choice("model", self.model, _MODELS)
        check_choice("transform", self.transform, _TRANSFORMS)
        check_choice("solver", self.solver, _SOLVERS)
        check_choice("lr_schedule", self.lr_schedule, _SCHEDULES)
        for name in ("inner_lr", "hyper_lr", "max_warp", "max_change"):
            check_positive(name, getattr(self, name))
        for name in ("damping", "hand_shift", "hand_rotation", "hand_scale", "hyper_clip"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_fraction("momentum", self.momentum)
        check_fraction("clean_weight", self.clean_weight)
        if self.hand_scale >= 1:
            raise HypergradientError(
                f"option 'hand_scale': expected a number in [0, 1) (scalings 1 +- hand_scale), "
                f"got {self.hand_scale!r}."
            )
        if self.solver == "cg" and self.damping <= 0:
            raise HypergradientError(
                "option 'damping': solver='cg' needs damping > 0 (the CNN's Hessian is "
                "indefinite away from a minimum), e.g. --set damping=1; CG can still break "
                "down on such a Hessian: solver=neumann is the robust choice."
            )
        if self.n_train + self.n_val > _MNIST_TRAIN_TOTAL:
            raise HypergradientError(
                f"options 'n_train' + 'n_val' = {self.n_train + self.n_val} exceeds the "
                f"{_MNIST_TRAIN_TOTAL} images of MNIST's train split."
            )
        if self.n_test > _MNIST_TEST_TOTAL:
            raise HypergradientError(
                f"option 'n_test': {self.n_test} exceeds the {_MNIST_TEST_TOTAL} images of "
                f"MNIST's test split."
            )


# ----------------------------------------------------------------------------- data, model


def load_data(config: AugmentConfig) -> Split:
    """Train / validation (MNIST train split, seeded shuffle) and test (official split)
    images as float32 ``(N, 1, 28, 28)`` in [0, 1]."""
    try:
        images, labels = load_mnist(config.data_dir, split="train", download=config.download)
        test_images, test_labels = load_mnist(
            config.data_dir, split="test", download=config.download, limit=config.n_test
        )
    except HypergradientError as err:
        raise HypergradientError(
            f"recipe 'augment' needs MNIST: {err} (options 'data_dir' = {config.data_dir!r}, "
            f"'download' = {config.download})."
        ) from None
    # n_test=1 only satisfies to_float_split: the test set is the official one below
    part = to_float_split(
        images, labels, config.n_train, config.n_val, n_test=1, seed=config.seed, flatten=False
    )
    x_test = test_images.to(torch.float32)[:, None] / 255.0
    return Split(
        part.x_train[:, None], part.y_train, part.x_val[:, None], part.y_val,
        x_test, test_labels.long(), 10,
    )  # fmt: skip


def build_model(config: AugmentConfig) -> nn.Module:
    """The classifier, float32, seeded from ``config.seed`` inside a forked RNG (every run
    starts from the same weights and the caller's random state is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        f32 = {"dtype": torch.float32}
        if config.model == "cnn":
            return nn.Sequential(
                nn.Conv2d(1, 16, 5, stride=2, padding=2, **f32),
                nn.ReLU(),
                nn.Conv2d(16, 32, 5, stride=2, padding=2, **f32),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(32 * 7 * 7, 10, **f32),
            )
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 256, **f32), nn.ReLU(), nn.Linear(256, 10, **f32)
        )


def build_kind(config: AugmentConfig) -> AugmentationNet:
    return AugmentationNet(
        image_shape=(1, 28, 28),
        transform=config.transform,
        noise_dim=config.noise_dim,
        hidden=config.aug_hidden,
        max_change=config.max_change,
        max_warp=config.max_warp,
        clean_weight=config.clean_weight,
        seed=config.seed,
    )


def train_loader(config: AugmentConfig, data: Split) -> DataLoader:
    return DataLoader(
        TensorDataset(data.x_train, data.y_train), batch_size=config.batch_size, shuffle=True
    )


def val_loader(config: AugmentConfig, data: Split) -> DataLoader:
    size = min(config.val_batch_size, len(data.y_val))
    return DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=size, shuffle=True)


def _sgd(config: AugmentConfig, model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=config.lr_at(0), momentum=config.momentum)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2500) -> float:
    """Accuracy of ``model`` on ``(x, y)`` (evaluated in chunks to bound memory)."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum())
        for i in range(0, len(y), chunk)
    )
    model.train(was_training)
    return correct / max(len(y), 1)


def hand_augment(
    config: AugmentConfig, x: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Uniform random shift (pixels), rotation (degrees) and scaling of every image."""
    b, width = len(x), x.shape[-1]

    def uniform(bound):
        return (2 * torch.rand(b, generator=generator, dtype=x.dtype) - 1) * bound

    angle = uniform(math.radians(config.hand_rotation))
    scale = 1 + uniform(config.hand_scale)
    shift = 2.0 / width * config.hand_shift  # affine_grid coordinates: 2/W per pixel
    tx, ty = uniform(shift), uniform(shift)
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------- plain runs

# Options that change a plain run; a cached run is reused only if they all match.
_PLAIN_KEYS = (
    "n_train", "n_val", "n_test", "model", "batch_size", "inner_lr", "momentum", "lr_schedule",
    "hyper_every", "hyper_steps", "clean_weight", "hand_shift", "hand_rotation", "hand_scale",
    "eval_every", "seed",
)  # fmt: skip


def run_plain(config: AugmentConfig, data: Split, augment=None, on_step=None) -> dict[str, Any]:
    """SGD without hypergradients for the learned run's budget, batch order and schedule.

    ``augment(x, generator) -> x'`` (or ``None``: no augmentation, loss on clean batches);
    with an augmentation the loss is the learned run's mix of clean and augmented terms.
    """
    start = time.perf_counter()
    model = build_model(config)
    optimizer = _sgd(config, model)
    stream = BatchStream(train_loader(config, data), config.seed)  # the trainer's batch order
    generator = torch.Generator().manual_seed(config.seed + 1)
    c = config.clean_weight
    curve: dict[str, list] = {"inner_step": [], "test_acc": []}
    eval_seconds = 0.0
    for step in range(config.inner_budget):
        block = step // config.hyper_every
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(block)
        x, y = stream.next()
        optimizer.zero_grad(set_to_none=True)
        if augment is None:
            loss = F.cross_entropy(model(x), y)
        else:
            aug = F.cross_entropy(model(augment(x, generator)), y)
            loss = aug if c == 0 else c * F.cross_entropy(model(x), y) + (1 - c) * aug
        loss.backward()
        optimizer.step()
        if (step + 1) % config.hyper_every == 0:
            if config.on_curve(block + 1):
                t0 = time.perf_counter()
                curve["inner_step"].append(step + 1)
                curve["test_acc"].append(accuracy(model, data.x_test, data.y_test))
                eval_seconds += time.perf_counter() - t0
            if on_step is not None:
                on_step(1)
    last = float(loss.detach())
    if not math.isfinite(last):
        raise HypergradientError(
            f"augment: plain training diverged (loss {last}); lower option 'inner_lr' (now "
            f"{config.inner_lr})."
        )
    return {
        "train_acc": accuracy(model, data.x_train, data.y_train),
        "val_acc": accuracy(model, data.x_val, data.y_val),
        "test_acc": accuracy(model, data.x_test, data.y_test),
        "curve": curve,
        "seconds": time.perf_counter() - start - eval_seconds,  # training only, like the trainer
    }


class _PlainCache:
    """Finished plain runs in ``plain_runs.json``, each saved as soon as it finishes."""

    def __init__(self, config: AugmentConfig, run_dir: Path, resume: bool):
        self.path = run_dir / "plain_runs.json"
        self.signature = {k: getattr(config, k) for k in _PLAIN_KEYS}
        self.runs: dict[str, dict] = {}
        if resume and self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("signature") == self.signature:
                self.runs = saved["runs"]
        elif not resume:
            self.path.unlink(missing_ok=True)

    def get(self, key: str, compute) -> dict:
        if key not in self.runs:
            self.runs[key] = compute()
            write_json_atomic(self.path, {"signature": self.signature, "runs": self.runs})
        return self.runs[key]


# ----------------------------------------------------------------------------- learned run

# Options a checkpoint must agree on to be resumed.
_RESUME_KEYS = (
    *_PLAIN_KEYS, "val_batch_size", "transform", "noise_dim", "aug_hidden", "max_warp",
    "max_change", "hyper_lr", "hyper_clip", "solver", "solver_steps", "damping",
)  # fmt: skip


class ClippedAdam(torch.optim.Adam):
    """Adam that first clips the gradients (here: hypergradients) to a total norm.

    Early in training the Hessian can have eigenvalues above ``2 / inner_lr``; a Neumann
    series with the inner learning rate as its step then grows over its few terms and one
    hypergradient comes out thousands of times larger than the others.  Unclipped, that
    one value dominates Adam's second-moment estimate for about ``1 / (1 - beta2)`` = 1000
    steps: the augmentation net stops learning while the classifier fits the training set
    (seen on MNIST with seed 1: a norm of 18000 at hyper-step 2, then no gain at all).
    """

    def __init__(self, params, lr: float, max_norm: float):
        super().__init__(params, lr=lr)
        self.max_norm = max_norm

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.max_norm and params:
            # as torch.nn.utils.clip_grad_norm_, but into new tensors: the caller's gradient
            # tensors (what the trainer logs as hypergrad_norm) keep their raw values
            norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
            coef = torch.clamp(self.max_norm / (torch.linalg.vector_norm(norms) + 1e-6), max=1.0)
            for p in params:
                p.grad = p.grad * coef
        return super().step(closure)


def build_trainer(
    config: AugmentConfig, data: Split, *, log_dir: Path | None = None, callbacks=()
) -> BilevelTrainer:
    """A fresh classifier, SGD and the bilevel trainer of the learned-augmentation run."""
    model = build_model(config)
    hyper_lr, clip = config.hyper_lr, config.hyper_clip
    method = Implicit(solver=config.solver, max_steps=config.solver_steps, damping=config.damping)
    return BilevelTrainer(
        model,
        build_kind(config),
        train_loader(config, data),
        val_loader(config, data),
        _sgd(config, model),
        hyper_optimizer=lambda hp: ClippedAdam(hp, lr=hyper_lr, max_norm=clip),
        method=method,
        hyper_every=config.hyper_every,
        callbacks=callbacks,
        log_dir=log_dir,
        seed=config.seed,
    )


def run_learned(
    config: AugmentConfig, data: Split, run_dir: Path, *, resume: bool, on_step=None
) -> tuple[BilevelTrainer, dict[str, Any]]:
    """The bilevel run; checkpoint after every hyper-step in ``run_dir/checkpoint.pt``."""
    checkpoint = run_dir / "checkpoint.pt"
    meta = {k: getattr(config, k) for k in _RESUME_KEYS}
    resume_or_start_over(run_dir, meta, resume=resume, stale=["hyper_steps.jsonl"])

    def schedule_and_evaluate(trainer: BilevelTrainer, record: dict) -> None:
        # the record is the one kept in trainer.history: it lands in the checkpoint
        step = record["hyper_step"]
        if config.on_curve(step):
            record["test_acc"] = accuracy(trainer.model, data.x_test, data.y_test)
        for group in trainer.optimizer.param_groups:  # saved with the optimizer's state
            group["lr"] = config.lr_at(step)
        if on_step is not None:
            on_step(1)

    trainer = build_trainer(config, data, log_dir=run_dir, callbacks=[schedule_and_evaluate])
    if on_step is not None and resume and checkpoint.is_file():
        saved = load_checkpoint(checkpoint, "--resume", signature=trainer.signature())
        on_step(int(saved["hyper_step"]))
    # the augmentation noise comes from the global RNG: seed it for this run only (a resumed
    # run restores the checkpoint's RNG state inside the fork)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        trainer.fit(config.hyper_steps, checkpoint=checkpoint, resume=resume)
    history = trainer.history
    model = trainer.model
    result = {
        "train_acc": accuracy(model, data.x_train, data.y_train),
        "val_acc": accuracy(model, data.x_val, data.y_val),
        "test_acc": accuracy(model, data.x_test, data.y_test),
        "curve": {
            "inner_step": [r["inner_step"] for r in history if "test_acc" in r],
            "test_acc": [r["test_acc"] for r in history if "test_acc" in r],
        },
        "history": {
            key: [r[key] for r in history]
            for key in ("hyper_step", "train_loss", "val_loss", "hypergrad_norm")
        },
        "num_hparams": int(sum(v.numel() for v in trainer.hparams.values())),
        "seconds": sum(r["seconds"] for r in history),  # kept in the checkpoint: whole on resume
    }
    return trainer, result


def _hparams_digest(hparams: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(hparams):
        h.update(k.encode())
        h.update(hparams[k].detach().double().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def describe_augmentation(
    config: AugmentConfig, kind: AugmentationNet, hparams: dict, x: torch.Tensor, draws: int = 8
) -> dict[str, float]:
    """What the learned net does to the training images, over ``draws`` noise draws each.

    ``mean_abs_pixel_change``: mean |a(x) - x|.  For affine nets: mean |shift| in pixels,
    |rotation| in degrees and scale (sqrt |det A|), each averaged over images and draws, and
    their spread over the noise (standard deviation across draws for one image, averaged):
    a spread near 0 means a deterministic per-image warp rather than a distribution.
    """
    generator = torch.Generator().manual_seed(config.seed + 2)
    change = [
        float((kind.augment(hparams, x, generator=generator) - x).abs().mean())
        for _ in range(draws)
    ]
    out = {"mean_abs_pixel_change": sum(change) / draws}
    if config.transform == "residual":
        return out
    thetas = torch.stack(
        [kind.affine_warps(hparams, x, generator=generator) for _ in range(draws)]
    )  # (draws, B, 2, 3)
    width = x.shape[-1]
    shift = thetas[..., 2].norm(dim=-1) * width / 2
    a = thetas[..., :2]
    rotation = torch.rad2deg(torch.atan2(a[..., 1, 0] - a[..., 0, 1], a[..., 0, 0] + a[..., 1, 1]))
    scale = torch.linalg.det(a).abs().sqrt()
    for name, value in (("shift_px", shift), ("rotation_deg", rotation), ("scale", scale)):
        mean = value.abs().mean() if name != "scale" else value.mean()
        out[f"mean_{'abs_' if name != 'scale' else ''}{name}"] = float(mean)
        out[f"noise_spread_{name}"] = float(value.std(dim=0).mean())
    return out


# ----------------------------------------------------------------------------- the recipe

_LABELS = {
    "none": "no augmentation",
    "hand": "hand-designed random affine",
    "learned": "learned augmentation net",
    "retrain": "re-trained with frozen learned net",
}


@register_recipe
class AugmentRecipe(ThreadedRecipe):
    """Learn a data-augmentation network (every weight a hyperparameter) by implicit
    hypergradients on a small MNIST subset, next to the same classifier trained without
    augmentation and with a hand-designed random affine augmentation, for the same SGD steps.
    Hypergradients: implicit, Neumann series by default (stable on the indefinite Hessian of
    a CNN in mid-training; CG would need damping); optionally a model re-trained from scratch
    with the final learned augmentation frozen (retrain=true).

    Writes config.toml, results.json, examples.png, test_accuracy.png, checkpoint.pt and
    hyper_steps.jsonl into the run folder; --resume continues a killed run.
    """

    name = "augment"
    help = "learn a data-augmentation network by implicit hypergradients (MNIST subset)"
    config_cls = AugmentConfig

    def _run(self, config, run_dir, *, resume, progress, console):
        run_dir.mkdir(parents=True, exist_ok=True)
        data = load_data(config)
        kind = build_kind(config)
        if resume and not (run_dir / "checkpoint.pt").is_file():
            console.print(f"no checkpoint in {run_dir}: starting from the beginning")
        cache = _PlainCache(config, run_dir, resume)
        runs: dict[str, dict] = {}
        with progress_bar(console, progress) as bar:

            def advance(task):
                return lambda n: bar.advance(task, n)

            plain = [("none", None)]
            if config.hand_baseline:
                plain.append(("hand", lambda x, g: hand_augment(config, x, g)))
            for key, augment in plain:
                task = bar.add_task(f"{_LABELS[key]} (hyper-step blocks)", total=config.hyper_steps)
                runs[key] = cache.get(
                    key, lambda a=augment, t=task: run_plain(config, data, a, advance(t))
                )
                bar.update(task, completed=config.hyper_steps)
            task = bar.add_task(f"{_LABELS['learned']} (hyper-steps)", total=config.hyper_steps)
            trainer, runs["learned"] = run_learned(
                config, data, run_dir, resume=resume, on_step=advance(task)
            )
            bar.update(task, completed=config.hyper_steps)
            hparams = {k: v.detach() for k, v in trainer.hparams.items()}
            if config.retrain:
                task = bar.add_task(f"{_LABELS['retrain']} (hyper-step blocks)",
                                    total=config.hyper_steps)  # fmt: skip

                def frozen(x, g):
                    with torch.no_grad():
                        return kind.augment(hparams, x, generator=g)

                runs["retrain"] = cache.get(
                    "retrain-" + _hparams_digest(hparams),
                    lambda: run_plain(config, data, frozen, advance(task)),
                )
                bar.update(task, completed=config.hyper_steps)

        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": machine(),
            "data": {
                "n_train": len(data.y_train),
                "n_val": len(data.y_val),
                "n_test": len(data.y_test),
            },
            "runs": runs,
            "test_acc": {k: r["test_acc"] for k, r in runs.items()},
            "gain_over_no_augmentation": runs["learned"]["test_acc"] - runs["none"]["test_acc"],
            "learned_augmentation": describe_augmentation(
                config, kind, hparams, data.x_train[:256]
            ),
        }
        write_results(run_dir, results)
        _plot_examples(config, kind, hparams, data, run_dir / "examples.png")
        _plot_curves(results, run_dir / "test_accuracy.png")
        console.print(results_table(results))
        gain = 100 * results["gain_over_no_augmentation"]
        console.print(
            f"learned augmentation: test accuracy {gain:+.2f} points over no augmentation. "
            f"Wrote results.json, examples.png, test_accuracy.png to {run_dir}."
        )
        return results


def results_table(results: dict) -> Table:
    config = results["config"]
    data = results["data"]
    table = Table(
        title=f"Augmentation on MNIST ({data['n_train']} train / {data['n_val']} val / "
        f"{data['n_test']} test, {config['model']}): "
        f"{config['hyper_steps'] * config['hyper_every']} SGD steps each"
    )
    for col in ("run", "#hparams", "train acc", "val acc", "test acc", "vs none", "time"):
        table.add_column(col, justify="left" if col == "run" else "right")
    none = results["runs"]["none"]["test_acc"]
    for key, run in results["runs"].items():
        label = _LABELS[key]
        if key == "learned":
            label += f" ({config['transform']}, {config['solver']})"
        table.add_row(
            label,
            f"{run['num_hparams']:,}" if "num_hparams" in run else "0",
            f"{run['train_acc']:.4f}",
            f"{run['val_acc']:.4f}",
            f"{run['test_acc']:.4f}",
            "" if key == "none" else f"{100 * (run['test_acc'] - none):+.2f} pts",
            f"{run['seconds']:.0f}s",
        )
    return table


@torch.no_grad()
def _plot_examples(config, kind, hparams, data: Split, path: Path) -> None:
    """One training image per class: clean, three learned draws, one hand-designed draw."""
    plt = pyplot()
    idx = [int((data.y_train == c).nonzero()[0]) for c in range(10) if (data.y_train == c).any()]
    x = data.x_train[idx]
    generator = torch.Generator().manual_seed(config.seed + 3)
    rows = [("clean", x)]
    rows += [(f"learned #{i + 1}", kind.augment(hparams, x, generator=generator)) for i in range(3)]
    rows.append(("hand-designed", hand_augment(config, x, generator)))
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(1.1 * len(idx), 1.2 * len(rows)))
    axes = [[a] for a in axes] if len(idx) == 1 else axes
    for r, (label, images) in enumerate(rows):
        for c in range(len(idx)):
            ax = axes[r][c]
            ax.imshow(images[c, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle("Training images and their augmentations")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"none": "k", "hand": "0.55", "learned": "C0", "retrain": "C1"}
    for key, run in results["runs"].items():
        label = f"{_LABELS[key]} ({run['test_acc']:.4f})"
        curve = run["curve"]
        ax.plot(curve["inner_step"], curve["test_acc"], color=styles[key], marker=".", label=label)
    ax.set_xlabel("SGD steps")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy during training (final value in the legend)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
