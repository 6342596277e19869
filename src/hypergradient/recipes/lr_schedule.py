r"""``hypergradient lr-schedule``: learn learning-rate and momentum schedules by exact reversal.

Maclaurin, Duvenaud & Adams (2015, Sec. 3.1) at CPU scale: a tanh MLP on scikit-learn's
digits is trained by ``steps`` full-batch SGD-with-momentum steps from a fixed random start,

.. math::

    b_{t+1} = \mu_t b_t + \nabla_w L(w_t), \qquad w_{t+1} = w_t - \eta_t b_{t+1},
    \qquad w_0 = (s_1 W^{(1)}_0,\ 0,\ s_2 W^{(2)}_0,\ 0),

and the validation loss :math:`E(w_T)` is minimised over the hyperparameters

* :math:`\log\eta_t` and :math:`\operatorname{logit}\mu_t`, given at ``knots`` evenly spaced
  steps and linearly interpolated in between (``knots = 0``: one value per step, as in the
  paper);
* the log initial scales :math:`\log s_l` of the two weight matrices;

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

Files in the run folder: ``results.json``, ``schedules.png`` (learned learning-rate and
momentum schedules against the initial ones; validation loss per hyper-step),
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
from ..data import Split, load_digits_split
from ..hypergrad.reversible import reversible_hypergrad
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
from ._config import check_fraction, check_positive, check_positive_int, help_text, threads_field


@dataclass
class LRScheduleConfig:
    """Options of ``hypergradient lr-schedule`` (defaults: about 2 minutes on 2 CPU cores)."""

    n_train: int = field(default=500, metadata=help_text("digits training examples (full batch)"))
    n_val: int = field(
        default=700,
        metadata=help_text(
            "digits validation examples (with 300 the learned schedules over-fit them: the "
            "test loss rose while the validation loss fell)"
        ),
    )
    hidden: int = field(default=50, metadata=help_text("hidden width of the tanh MLP"))
    steps: int = field(
        default=100, metadata=help_text("SGD-momentum steps of every training run (T)")
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
        check_positive_int("n_train", self.n_train)
        check_positive_int("n_val", self.n_val)
        if self.n_train + self.n_val > 1797 - 100:
            raise HypergradientError(
                f"options 'n_train' + 'n_val': digits has 1797 examples and keeps 100 for "
                f"testing, so n_train + n_val must be <= 1697, got {self.n_train + self.n_val}."
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
    "n_train", "n_val", "hidden", "steps", "knots", "init_lr", "init_momentum",
    "learn_init_scale", "hyper_lr", "fraction_bits", "seed",
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
    k = config.num_knots
    mu = config.init_momentum
    hp = {
        "log_lr": torch.full((k,), math.log(config.init_lr), dtype=torch.float64),
        "logit_momentum": torch.full((k,), math.log(mu / (1 - mu)), dtype=torch.float64),
    }
    if config.learn_init_scale:
        hp["log_init_scale"] = torch.zeros(2, dtype=torch.float64)
    return hp


def schedules(config: LRScheduleConfig, hparams) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step learning rates and momenta, each of shape ``(steps,)``."""
    lr = interpolate(hparams["log_lr"], config.steps).exp()
    momentum = torch.sigmoid(interpolate(hparams["logit_momentum"], config.steps))
    return lr, momentum


class Problem:
    """Data, the fixed random start and the losses of one configuration."""

    def __init__(self, config: LRScheduleConfig):
        self.config = config
        self.data: Split = load_digits_split(
            config.n_train, config.n_val, seed=config.seed, dtype=torch.float64
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

    def inner_loss(self, p, h) -> torch.Tensor:
        return F.cross_entropy(forward(p, self.data.x_train), self.data.y_train)

    def outer_loss(self, p, h) -> torch.Tensor:
        return F.cross_entropy(forward(p, self.data.x_val), self.data.y_val)

    def hypergrad(self, hparams):
        """One exact-reversal hypergradient: ``ReversibleResult`` (hypergrad, w_T, stats)."""
        config = self.config
        return reversible_hypergrad(
            self.inner_loss,
            self.outer_loss,
            self.params0,
            hparams,
            config.steps,
            lr=lambda h, t: interpolate(h["log_lr"], config.steps)[t].exp(),
            momentum=lambda h, t: torch.sigmoid(interpolate(h["logit_momentum"], config.steps)[t]),
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
    """Learning-rate and momentum schedules (and initial weight scales) of a digits MLP
    fitted by exact reversible hypergradients (Maclaurin et al. 2015): every hyper-step
    trains the model for `steps` full-batch SGD-momentum steps from the same start, reverses
    the run bit for bit to get the hypergradient of the validation loss, and takes an Adam
    step on the log learning rates, logit momenta and log scales.

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
                "initial_lr": lr0.tolist(),
                "initial_momentum": mu0.tolist(),
                "learned_lr": lr1.tolist(),
                "learned_momentum": mu1.tolist(),
                "learned_init_scale": (
                    learned["log_init_scale"].exp().tolist()
                    if "log_init_scale" in learned
                    else None
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


def results_table(results: dict) -> Table:
    c = results["config"]
    table = Table(
        title=f"Learned schedules on digits: tanh MLP 64-{c['hidden']}-10, {c['steps']} "
        f"full-batch SGD-momentum steps, {c['hyper_steps']} hyper-steps"
    )
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
    plt = pyplot()
    s = results["schedules"]
    steps = range(1, len(s["learned_lr"]) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in (
        (axes[0], "lr", "learning rate"),
        (axes[1], "momentum", "momentum"),
    ):
        ax.plot(steps, s[f"initial_{key}"], "--", color="gray", label="initial")
        ax.plot(steps, s[f"learned_{key}"], color="C0", label="learned")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} schedule")
        ax.legend()
    history = results["history"]
    axes[2].plot([r["hyper_step"] for r in history], [r["val_loss"] for r in history], "C1")
    axes[2].set_xlabel("hyper-step")
    axes[2].set_ylabel("validation loss after training")
    axes[2].set_title("meta-learning curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
