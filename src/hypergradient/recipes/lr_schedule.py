r"""``hypergradient lr-schedule``: learn learning-rate and momentum schedules by exact reversal.

Maclaurin, Duvenaud & Adams (2015, Sec. 3.1) at CPU scale: a tanh MLP (scikit-learn's
digits, or MNIST with ``dataset = "mnist"``) is trained by ``steps`` SGD-with-momentum steps
from a fixed random start, full-batch or on mini-batches of ``batch_size`` (batch :math:`t`
fixed by the seed, :class:`~hypergradient.hypergrad.SeededBatches`, so the reverse pass sees
it again bit for bit),

.. math::

    b_{t+1} = \mu_t b_t + \nabla_w L_t(w_t), \qquad w_{t+1} = w_t - \eta_t b_{t+1},
    \qquad w_0 = (s_1 W^{(1)}_0,\ 0,\ s_2 W^{(2)}_0,\ 0),

with :math:`L_t` the cross-entropy of batch :math:`t` plus, with ``init_decay > 0``, the
per-layer decays :math:`\tfrac12 \sum_l \lambda_l \|W^{(l)}\|^2`; and the validation loss
:math:`E(w_T)` is minimised over the hyperparameters

* :math:`\log\eta_t` and :math:`\operatorname{logit}\mu_t`, given at ``knots`` evenly spaced
  steps and linearly interpolated in between (``knots = 0``: one value per step, as in the
  paper); with ``per_layer``, one schedule of each per tensor (``W1, b1, W2, b2``), as in the
  paper's Figure 2;
* the log initial scales :math:`\log s_l` of the two weight matrices;
* with ``init_decay > 0``, the log decays :math:`\log\lambda_l` of the two weight matrices;

by Adam on the hypergradient of :func:`~hypergradient.reversible_hypergrad`: the training
run is reversed bit for bit instead of stored, so memory does not grow with ``steps`` (the
information buffer costs about :math:`\log_2(1/\mu)` bits per weight and step).

The validation set is larger than the training set on purpose: with 300 validation examples
the schedules learned to lower the validation loss (0.176 -> 0.137) while the test loss
rose (0.152 -> 0.159); with 700 both fall.

Reported: validation and test loss and accuracy of the run with the initial schedules
(constant ``init_lr``, ``init_momentum``) and with the learned ones; the buffer's bits per
weight per step against :math:`\log_2(1/\mu)`, and its bytes against those of storing the
trajectory.  Cost per hyper-step: ``steps`` gradients forward, ``steps`` gradients with
``create_graph`` and their backward passes in reverse.

The paper's MNIST meta-optimisation, at the shape it ran (per-layer schedules over a
100-step mini-batch run, learned initial scales and decays)::

    hypergradient lr-schedule --set dataset=mnist n_train=10000 n_val=5000 batch_size=100 \
        per_layer=true init_decay=1e-4 steps=100

Files in the run folder: ``results.json``, ``schedules.png`` (learned learning-rate and
momentum schedules against the initial ones, per tensor with ``per_layer``; the learned
initial scales and decays; validation loss per hyper-step),
``checkpoint.pt`` (hyperparameters, Adam state, history; written atomically after every
hyper-step) and ``checkpoint_options.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

from .._errors import HypergradientError
from ..data import Split, load_digits_split, load_mnist, to_float_split
from ..hypergrad.reversible import SeededBatches, reversible_hypergrad
from ._base import (
    ThreadedRecipe,
    load_checkpoint,
    machine,
    progress_bar,
    pyplot,
    register_recipe,
    resume_or_start_over,
    save_atomic,
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

TENSORS = ("W1", "b1", "W2", "b2")  # the MLP's tensors, in the order of per-layer schedules
_MNIST_TRAIN = 60_000


@dataclass
class LRScheduleConfig:
    """Options of ``hypergradient lr-schedule`` (defaults: about 2 minutes on 2 CPU cores)."""

    dataset: str = field(
        default="digits",
        metadata=help_text(
            "digits (scikit-learn's 8x8, embedded) or mnist (28x28, from data_dir; the paper's "
            "data)"
        ),
    )
    data_dir: str | None = field(
        default=None,
        metadata=help_text(
            "with dataset=mnist: folder holding mnist/ with the original IDX files (default: "
            "$HYPERGRADIENT_DATA, else ~/.cache/hypergradient)"
        ),
    )
    download: bool = field(
        default=False, metadata=help_text("with dataset=mnist: fetch missing files (md5-checked)")
    )
    n_train: int = field(default=500, metadata=help_text("training examples"))
    n_val: int = field(
        default=700,
        metadata=help_text(
            "validation examples (digits: with 300 the learned schedules over-fit them: the "
            "test loss rose while the validation loss fell)"
        ),
    )
    hidden: int = field(default=50, metadata=help_text("hidden width of the tanh MLP"))
    steps: int = field(
        default=100, metadata=help_text("SGD-momentum steps of every training run (T)")
    )
    batch_size: int = field(
        default=0,
        metadata=help_text(
            "mini-batch size of the training steps (batch t fixed by the seed); 0: full batch"
        ),
    )
    per_layer: bool = field(
        default=False,
        metadata=help_text(
            "one learning-rate and one momentum schedule per tensor (W1, b1, W2, b2), as in "
            "the paper; false: one of each for all weights"
        ),
    )
    knots: int = field(
        default=10,
        metadata=help_text(
            "schedule values per hyperparameter, linearly interpolated over the steps; "
            "0: one value per step"
        ),
    )
    init_lr: float = field(default=0.5, metadata=help_text("initial (constant) learning rate"))
    init_momentum: float = field(
        default=0.9, metadata=help_text("initial (constant) momentum, in (0, 1)")
    )
    learn_init_scale: bool = field(
        default=True, metadata=help_text("also learn the two weight matrices' initial scales")
    )
    init_decay: float = field(
        default=0.0,
        metadata=help_text(
            "initial L2 decay of each weight matrix, learned per layer (as a log); 0: no decay"
        ),
    )
    hyper_steps: int = field(default=40, metadata=help_text("hyper-steps (training runs)"))
    hyper_lr: float = field(
        default=0.05, metadata=help_text("Adam learning rate of the hyper-steps")
    )
    fraction_bits: int = field(
        default=52, metadata=help_text("fixed-point fraction bits of the exact training run")
    )
    seed: int = field(default=0, metadata=help_text("data split and initial weights"))
    threads: int = threads_field()

    @property
    def num_knots(self) -> int:
        return self.steps if self.knots == 0 else self.knots

    def validate(self) -> None:
        check_choice("dataset", self.dataset, ("digits", "mnist"))
        check_data_dir(self.data_dir, holds="mnist/")
        if not isinstance(self.download, bool):
            raise HypergradientError(
                f"option 'download': expected true or false, got {self.download!r}."
            )
        check_positive_int("n_train", self.n_train)
        check_positive_int("n_val", self.n_val)
        if self.dataset == "digits" and self.n_train + self.n_val > 1797 - 100:
            raise HypergradientError(
                f"options 'n_train' + 'n_val': digits has 1797 examples and keeps 100 for "
                f"testing, so n_train + n_val must be <= 1697, got {self.n_train + self.n_val}."
            )
        if self.dataset == "mnist" and self.n_train + self.n_val > _MNIST_TRAIN:
            raise HypergradientError(
                f"options 'n_train' + 'n_val': MNIST's training split has {_MNIST_TRAIN} "
                f"examples (the test split tests), so n_train + n_val must be <= "
                f"{_MNIST_TRAIN}, got {self.n_train + self.n_val}."
            )
        check_positive_int("batch_size", self.batch_size, minimum=0)
        if self.batch_size > self.n_train:
            raise HypergradientError(
                f"option 'batch_size': expected 0 (full batch) or an integer in [1, "
                f"n_train={self.n_train}], got {self.batch_size!r}."
            )
        if not isinstance(self.per_layer, bool):
            raise HypergradientError(
                f"option 'per_layer': expected true or false, got {self.per_layer!r}."
            )
        check_positive_int("hidden", self.hidden)
        check_positive_int("steps", self.steps)
        check_positive_int("knots", self.knots, minimum=0)
        if self.knots == 1 or self.knots > self.steps:
            raise HypergradientError(
                f"option 'knots': expected 0 (one value per step) or an integer in "
                f"[2, steps={self.steps}], got {self.knots!r}."
            )
        check_positive("init_lr", self.init_lr)
        check_fraction("init_momentum", self.init_momentum)
        if self.init_momentum <= 0:
            raise HypergradientError(
                f"option 'init_momentum': expected a number in (0, 1) (it is learned as a "
                f"logit), got {self.init_momentum!r}."
            )
        if not isinstance(self.learn_init_scale, bool):
            raise HypergradientError(
                f"option 'learn_init_scale': expected true or false, got {self.learn_init_scale!r}."
            )
        check_positive("init_decay", self.init_decay, allow_zero=True)
        check_positive_int("hyper_steps", self.hyper_steps, minimum=0)
        check_positive("hyper_lr", self.hyper_lr)
        check_positive_int("fraction_bits", self.fraction_bits, minimum=16)
        if self.fraction_bits > 56:
            raise HypergradientError(
                f"option 'fraction_bits': expected an integer in [16, 56] (int64 words leave "
                f"61 - fraction_bits bits for the integer part), got {self.fraction_bits!r}."
            )
        check_positive_int("seed", self.seed, minimum=0)
        check_positive_int("threads", self.threads, minimum=0)


# Options a checkpoint must agree on to be resumed (hyper_steps may grow).
_RESUME_KEYS = (
    "dataset", "n_train", "n_val", "hidden", "steps", "batch_size", "per_layer", "knots",
    "init_lr", "init_momentum", "learn_init_scale", "init_decay", "hyper_lr", "fraction_bits",
    "seed",
)  # fmt: skip


# ----------------------------------------------------------------------------- the problem


def forward(params, x: torch.Tensor) -> torch.Tensor:
    """Logits of the tanh MLP ``W1, b1, W2, b2``."""
    return torch.tanh(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]


def interpolate(knots: torch.Tensor, steps: int) -> torch.Tensor:
    """The ``(steps,)`` schedule through ``knots`` (evenly spaced, first and last step
    included), linear in between; differentiable in ``knots``.  As many knots as steps:
    the knots themselves."""
    if knots.numel() == steps:
        return knots
    position = torch.linspace(0, knots.numel() - 1, steps, dtype=knots.dtype)
    left = position.floor().long().clamp(max=knots.numel() - 2)
    frac = position - left
    return knots[left] * (1 - frac) + knots[left + 1] * frac


def initial_hparams(config: LRScheduleConfig) -> dict[str, torch.Tensor]:
    """``log_lr`` and ``logit_momentum`` of shape ``(knots,)``, or ``(4, knots)`` with
    ``per_layer`` (rows: ``W1, b1, W2, b2``); ``log_init_scale`` and ``log_decay`` ``(2,)``."""
    shape = (len(TENSORS), config.num_knots) if config.per_layer else (config.num_knots,)
    mu = config.init_momentum
    hp = {
        "log_lr": torch.full(shape, math.log(config.init_lr), dtype=torch.float64),
        "logit_momentum": torch.full(shape, math.log(mu / (1 - mu)), dtype=torch.float64),
    }
    if config.learn_init_scale:
        hp["log_init_scale"] = torch.zeros(2, dtype=torch.float64)
    if config.init_decay > 0:
        hp["log_decay"] = torch.full((2,), math.log(config.init_decay), dtype=torch.float64)
    return hp


def schedules(config: LRScheduleConfig, hparams) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step learning rates and momenta, each of shape ``(steps,)``, or
    ``(4, steps)`` with ``per_layer`` (rows: ``W1, b1, W2, b2``)."""
    if config.per_layer:
        rows = range(len(TENSORS))
        lr = torch.stack([interpolate(hparams["log_lr"][i], config.steps) for i in rows])
        logit = torch.stack([interpolate(hparams["logit_momentum"][i], config.steps) for i in rows])
        return lr.exp(), torch.sigmoid(logit)
    lr = interpolate(hparams["log_lr"], config.steps).exp()
    momentum = torch.sigmoid(interpolate(hparams["logit_momentum"], config.steps))
    return lr, momentum


def _schedule_fns(config: LRScheduleConfig):
    """``lr`` and ``momentum`` for :func:`~hypergradient.reversible_hypergrad`: callables
    ``(hparams, t) -> scalar``, or dicts of them per tensor with ``per_layer``."""
    steps = config.steps

    def lr_of(row):
        return lambda h, t: interpolate(h["log_lr"][row], steps)[t].exp()

    def momentum_of(row):
        return lambda h, t: torch.sigmoid(interpolate(h["logit_momentum"][row], steps)[t])

    if config.per_layer:
        return (
            {k: lr_of(i) for i, k in enumerate(TENSORS)},
            {k: momentum_of(i) for i, k in enumerate(TENSORS)},
        )
    every = slice(None)
    return lr_of(every), momentum_of(every)


def load_split(config: LRScheduleConfig) -> Split:
    """Float64 train / validation / test: digits (100 kept for testing), or MNIST (train and
    validation from its training split, shuffled by the seed; the official test split)."""
    if config.dataset == "digits":
        return load_digits_split(
            config.n_train, config.n_val, seed=config.seed, dtype=torch.float64
        )
    try:
        images, labels = load_mnist(config.data_dir, split="train", download=config.download)
        test_images, test_labels = load_mnist(
            config.data_dir, split="test", download=config.download
        )
    except HypergradientError as err:
        raise HypergradientError(
            f"lr-schedule with dataset=mnist needs MNIST: {err} (options 'data_dir' = "
            f"{config.data_dir!r}, 'download' = {config.download})."
        ) from None
    # n_test=1 only satisfies to_float_split: the test set is the official one below
    part = to_float_split(
        images, labels, config.n_train, config.n_val, n_test=1, seed=config.seed,
        dtype=torch.float64, num_classes=10,
    )  # fmt: skip
    x_test = test_images.reshape(len(test_images), -1).to(torch.float64) / 255.0
    return Split(part.x_train, part.y_train, part.x_val, part.y_val, x_test, test_labels.long(), 10)


class Problem:
    """Data, the fixed random start and the losses of one configuration."""

    def __init__(self, config: LRScheduleConfig):
        self.config = config
        self.data: Split = load_split(config)
        # batch t of the run, a function of t alone (the reverse pass asks for it again)
        self.batches = (
            SeededBatches(
                self.data.x_train, self.data.y_train, batch_size=config.batch_size, seed=config.seed
            )
            if config.batch_size
            else None
        )
        gen = torch.Generator().manual_seed(config.seed)
        d, h, c = self.data.num_features, config.hidden, self.data.num_classes
        # PyTorch's default Linear scale, 1/sqrt(fan_in): the scales s_l multiply it
        self.w1 = torch.randn(d, h, generator=gen, dtype=torch.float64) / math.sqrt(d)
        self.w2 = torch.randn(h, c, generator=gen, dtype=torch.float64) / math.sqrt(h)

    def params0(self, hparams) -> dict[str, torch.Tensor]:
        scale = hparams.get("log_init_scale")
        s1, s2 = (1.0, 1.0) if scale is None else (scale[0].exp(), scale[1].exp())
        return {
            "W1": s1 * self.w1,
            "b1": torch.zeros(self.w1.shape[1], dtype=torch.float64),
            "W2": s2 * self.w2,
            "b2": torch.zeros(self.w2.shape[1], dtype=torch.float64),
        }

    def batch_loss(self, p, h, batch) -> torch.Tensor:
        """Cross-entropy of ``batch = (x, y)``, plus the per-layer decays if learned."""
        x, y = batch
        loss = F.cross_entropy(forward(p, x), y)
        if "log_decay" in h:
            decay = h["log_decay"].exp()
            loss = loss + 0.5 * (decay[0] * p["W1"].pow(2).sum() + decay[1] * p["W2"].pow(2).sum())
        return loss

    def inner_loss(self, p, h) -> torch.Tensor:
        """The full-batch training loss."""
        return self.batch_loss(p, h, (self.data.x_train, self.data.y_train))

    def outer_loss(self, p, h) -> torch.Tensor:
        return F.cross_entropy(forward(p, self.data.x_val), self.data.y_val)

    def hypergrad(self, hparams):
        """One exact-reversal hypergradient: ``ReversibleResult`` (hypergrad, w_T, stats)."""
        config = self.config
        lr, momentum = _schedule_fns(config)
        return reversible_hypergrad(
            self.inner_loss if self.batches is None else self.batch_loss,
            self.outer_loss,
            self.params0,
            hparams,
            config.steps,
            lr=lr,
            momentum=momentum,
            batches=self.batches,
            fraction_bits=config.fraction_bits,
        )

    @torch.no_grad()
    def evaluate(self, params) -> dict[str, float]:
        out = {}
        for split in ("val", "test"):
            x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
            logits = forward(params, x)
            out[f"{split}_loss"] = float(F.cross_entropy(logits, y))
            out[f"{split}_acc"] = float((logits.argmax(1) == y).double().mean())
        return out


# ----------------------------------------------------------------------------- the recipe


@register_recipe
class LRScheduleRecipe(ThreadedRecipe):
    """Learning-rate and momentum schedules (and initial weight scales, per-layer decays)
    of a digits or MNIST MLP fitted by exact reversible hypergradients (Maclaurin et al.
    2015): every hyper-step trains the model for `steps` SGD-momentum steps (full batch or
    seeded mini-batches; one schedule for all weights or one per tensor) from the same
    start, reverses the run bit for bit to get the hypergradient of the validation loss,
    and takes an Adam step on the log learning rates, logit momenta, log scales and decays.

    Writes config.toml, results.json, schedules.png and checkpoint.pt (every hyper-step)
    into the run folder; --resume continues a killed run from its checkpoint.
    """

    name = "lr-schedule"
    help = "learn learning-rate and momentum schedules by exact reversible hypergradients"
    config_cls = LRScheduleConfig

    def _run(self, config, run_dir, *, resume, progress, console):
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        problem = Problem(config)
        hparams = {k: v.requires_grad_(True) for k, v in initial_hparams(config).items()}
        hyper_opt = torch.optim.Adam(list(hparams.values()), lr=config.hyper_lr)
        history: list[dict] = []
        checkpoint = run_dir / "checkpoint.pt"
        meta = {"recipe": self.name} | {k: getattr(config, k) for k in _RESUME_KEYS}
        if resume_or_start_over(run_dir, meta, resume=resume):
            state = load_checkpoint(checkpoint, "--resume", signature=meta)
            with torch.no_grad():
                for k, v in hparams.items():
                    v.copy_(state["hparams"][k])
            hyper_opt.load_state_dict(state["hyper_optimizer"])
            history = list(state["history"])
        elif resume:
            console.print(f"no checkpoint in {run_dir}: starting from the beginning")

        initial = problem.hypergrad(initial_hparams(config))
        first_stats = initial.stats
        with progress_bar(console, progress) as bar:
            task = bar.add_task(
                f"hyper-steps ({config.steps}-step runs, reversed exactly)",
                total=config.hyper_steps,
                completed=len(history),
            )
            while len(history) < config.hyper_steps:
                step_start = time.perf_counter()
                current = {k: v.detach() for k, v in hparams.items()}
                # the first run is the initial one, already computed
                try:
                    result = initial if not history else problem.hypergrad(current)
                except HypergradientError as err:
                    lr_now, mu_now = schedules(config, current)
                    raise HypergradientError(
                        f"lr-schedule: the training run of hyper-step {len(history) + 1} "
                        f"failed with learning rates up to {float(lr_now.max()):.4g} "
                        f"(momenta up to {float(mu_now.max()):.4g}): {err} If the learned "
                        f"rates made it diverge, lower option 'hyper_lr' (now "
                        f"{config.hyper_lr}) or 'init_lr' (now {config.init_lr})."
                    ) from None
                scores = problem.evaluate(result.params)
                if not math.isfinite(scores["val_loss"]):
                    raise HypergradientError(
                        f"lr-schedule: the validation loss became {scores['val_loss']} at "
                        f"hyper-step {len(history) + 1}; lower option 'hyper_lr' (now "
                        f"{config.hyper_lr}) or 'init_lr' (now {config.init_lr})."
                    )
                hyper_opt.zero_grad(set_to_none=True)
                for k, v in hparams.items():
                    v.grad = result.hypergrad[k].to(v.dtype)
                hyper_opt.step()
                history.append(
                    {
                        "hyper_step": len(history) + 1,
                        **scores,  # of the run with the hyperparameters before this step
                        "hypergrad_norm": math.sqrt(
                            sum(float(g.pow(2).sum()) for g in result.hypergrad.values())
                        ),
                        "buffer_bits_per_weight_per_step": (result.stats.bits_per_weight_per_step),
                        "seconds": time.perf_counter() - step_start,
                    }
                )
                save_atomic(
                    {
                        "hparams": {k: v.detach().clone() for k, v in hparams.items()},
                        "hyper_optimizer": hyper_opt.state_dict(),
                        "history": history,
                    },
                    checkpoint,
                    signature=meta,
                )
                bar.update(task, completed=len(history))

        final = problem.hypergrad({k: v.detach() for k, v in hparams.items()})
        learned = {k: v.detach() for k, v in hparams.items()}
        lr0, mu0 = schedules(config, initial_hparams(config))
        lr1, mu1 = schedules(config, learned)
        stats = final.stats
        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": machine(),
            "initial": problem.evaluate(initial.params),
            "learned": problem.evaluate(final.params),
            "schedules": {
                "initial_lr": _by_tensor(config, lr0),
                "initial_momentum": _by_tensor(config, mu0),
                "learned_lr": _by_tensor(config, lr1),
                "learned_momentum": _by_tensor(config, mu1),
                "learned_init_scale": (
                    learned["log_init_scale"].exp().tolist()
                    if "log_init_scale" in learned
                    else None
                ),
                "initial_decay": [config.init_decay] * 2 if "log_decay" in learned else None,
                "learned_decay": (
                    learned["log_decay"].exp().tolist() if "log_decay" in learned else None
                ),
            },
            "reversal": {
                "num_weights": stats.num_weights,
                "bits_per_weight_per_step": stats.bits_per_weight_per_step,
                "expected_bits_per_weight_per_step": stats.expected_bits_per_weight_per_step,
                "buffer_bytes": stats.buffer_bytes,
                "trajectory_bytes": stats.trajectory_bytes,
                "initial_bits_per_weight_per_step": first_stats.bits_per_weight_per_step,
            },
            "hyper_seconds": sum(r["seconds"] for r in history),
            "seconds": time.perf_counter() - start,
            "history": history,
        }
        write_results(run_dir, results)
        plot_schedules(results, run_dir / "schedules.png")
        console.print(results_table(results))
        rev = results["reversal"]
        console.print(
            f"Exact reversal: the information buffer held {rev['bits_per_weight_per_step']:.3f} "
            f"bits per weight per step (log2(1/mu) averages "
            f"{rev['expected_bits_per_weight_per_step']:.3f}); {rev['buffer_bytes']:,} bytes "
            f"instead of {rev['trajectory_bytes']:,} for the stored trajectory. Wrote "
            f"results.json and schedules.png to {run_dir}."
        )
        return results


def _by_tensor(config: LRScheduleConfig, values: torch.Tensor) -> list | dict:
    """A schedule as a list, or per-layer schedules as ``{tensor: list}``."""
    if config.per_layer:
        return {k: row.tolist() for k, row in zip(TENSORS, values)}
    return values.tolist()


def _run_description(c: dict) -> str:
    inputs = 64 if c["dataset"] == "digits" else 784
    batch = f"batch {c['batch_size']}" if c["batch_size"] else "full-batch"
    per = "per-tensor schedules" if c["per_layer"] else "one schedule"
    return (
        f"{c['dataset']}, tanh MLP {inputs}-{c['hidden']}-10, {c['steps']} {batch} "
        f"SGD-momentum steps, {per}, {c['hyper_steps']} hyper-steps"
    )


def results_table(results: dict) -> Table:
    c = results["config"]
    table = Table(title=f"Learned schedules: {_run_description(c)}")
    for col in ("schedules", "val loss", "val acc", "test loss", "test acc"):
        table.add_column(col, justify="left" if col == "schedules" else "right")
    labels = {
        "initial": f"initial (lr {c['init_lr']:g}, momentum {c['init_momentum']:g})",
        "learned": "learned",
    }
    for key, label in labels.items():
        r = results[key]
        table.add_row(
            label,
            f"{r['val_loss']:.4f}",
            f"{r['val_acc']:.3f}",
            f"{r['test_loss']:.4f}",
            f"{r['test_acc']:.3f}",
        )
    return table


def plot_schedules(results: dict, path: Path) -> None:
    """Learning-rate and momentum schedules (one line per tensor with ``per_layer``, the
    initial ones dashed), the initial scales and decays per layer (initial vs learned, when
    learned), and the validation loss per hyper-step."""
    plt = pyplot()
    s = results["schedules"]
    layers = s["learned_init_scale"] is not None or s["learned_decay"] is not None
    fig, axes = plt.subplots(1, 4 if layers else 3, figsize=(17 if layers else 13, 3.6))
    for ax, key, label in (
        (axes[0], "lr", "learning rate"),
        (axes[1], "momentum", "momentum"),
    ):
        initial, learned = s[f"initial_{key}"], s[f"learned_{key}"]
        if isinstance(learned, dict):  # per tensor
            for j, name in enumerate(learned):
                steps = range(1, len(learned[name]) + 1)
                ax.plot(steps, initial[name], "--", color=f"C{j}", alpha=0.4)
                ax.plot(steps, learned[name], color=f"C{j}", label=name)
            ax.set_title(f"{label} schedule per tensor (dashed: initial)")
        else:
            steps = range(1, len(learned) + 1)
            ax.plot(steps, initial, "--", color="gray", label="initial")
            ax.plot(steps, learned, color="C0", label="learned")
            ax.set_title(f"{label} schedule")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    if layers:
        ax = axes[2]
        names, before, after = [], [], []
        if s["learned_init_scale"] is not None:
            names += ["init scale W1", "init scale W2"]
            before += [1.0, 1.0]
            after += s["learned_init_scale"]
        if s["learned_decay"] is not None:
            names += ["decay W1", "decay W2"]
            before += s["initial_decay"]
            after += s["learned_decay"]
        pos = torch.arange(len(names), dtype=torch.float64)
        ax.bar((pos - 0.2).tolist(), before, width=0.4, color="gray", label="initial")
        ax.bar((pos + 0.2).tolist(), after, width=0.4, color="C0", label="learned")
        ax.set_xticks(pos.tolist(), names, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_title("per-layer initial scales and decays")
        ax.legend(fontsize=8)
    history = results["history"]
    axes[-1].plot([r["hyper_step"] for r in history], [r["val_loss"] for r in history], "C1")
    axes[-1].set_xlabel("hyper-step")
    axes[-1].set_ylabel("validation loss after training")
    axes[-1].set_title("meta-learning curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
