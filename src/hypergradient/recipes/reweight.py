r"""``hypergradient reweight``: a Meta-Weight-Net learns how much each loss value should count.

Learning to reweight examples with noisy labels (Shu et al. 2019, at CPU scale): a fraction
``noise`` of the training labels is flipped to a random other class.  An MLP classifier is
trained with mini-batch SGD on the weighted loss
:math:`\frac1B\sum_i V(\ell_i; \theta)\,\ell_i`, where :math:`V` is a small network
``loss -> weight in (0, 1)`` (:class:`~hypergradient.hparams.LossReweightNet`, whose weights
:math:`\theta` are the hyperparameters).  Unlike one weight per example (``hyper-clean``) the
function has ``3 * net_hidden + 1`` parameters whatever the data size and applies to every
example, seen or not.

Training is the warm-started :class:`~hypergradient.BilevelTrainer` with the method
``hg.Unrolled(steps=lookahead)``: every ``hyper_every`` SGD steps on the weighted loss, one
hyper-step differentiates the loss of a clean validation mini-batch through ``lookahead``
virtual SGD steps on a fresh training mini-batch (Meta-Weight-Net's one-step look-ahead for
``lookahead=1``) and moves :math:`\theta` with Adam.  The classifier is never restarted: the
whole run costs ``hyper_steps * hyper_every`` SGD steps plus ``hyper_steps``
hypergradients (one double-backward per look-ahead step each).

Compared, with the same model, initial weights, SGD and batch order, for the same number of
SGD steps: **plain** training on all (noisy) examples, and the **oracle** trained on the clean
examples only.  Over-parametrised networks fit the flipped labels as training goes on, so the
table reports each run's final test accuracy and its test accuracy at its best validation
accuracy (early stopping, evaluated every ``eval_every`` hyper-steps).

Files in the run folder: ``results.json``, ``reweight.png`` (test accuracy per step; the
learned weight function over the losses of clean and flipped examples), ``checkpoint.pt``
(the trainer's full state after every hyper-step) and ``checkpoint_options.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from .._errors import HypergradientError
from ..data import Split
from ..hparams.example_weights import indexed_loader
from ..hparams.reweight_net import LossReweightNet
from ..hypergrad.methods import Unrolled
from ..train import BatchStream, BilevelTrainer
from ._base import (
    AbstractRecipe,
    machine,
    progress_bar,
    pyplot,
    register_recipe,
    resume_or_start_over,
    write_results,
)
from ._config import check_positive, check_positive_int, help_text
from .hyperclean import NoisyDataOptions, check_data_options, load_noisy_data

# dataset -> (n_train, n_val, n_test) when the options are none (n_test None: all the rest).
# Digits: 600 training examples are memorised (labels and noise) within ~100 SGD steps,
# before the weight network has learned anything; 1200 leave it the time to.
DEFAULT_SIZES = {"mnist": (5000, 1000, 10_000), "digits": (1200, 300, None)}


@dataclass
class ReweightConfig(NoisyDataOptions):
    """Options of ``hypergradient reweight`` (defaults: about a minute on 2 CPU cores)."""

    # hyper-clean's data options (NoisyDataOptions) with more digits examples and less noise
    n_train: int | None = field(
        default=None, metadata=help_text("training examples (none: 5000 mnist, 1200 digits)")
    )
    n_val: int | None = field(
        default=None,
        metadata=help_text("clean validation examples (none: 1000 mnist, 300 digits)"),
    )
    noise: float = field(
        default=0.4, metadata=help_text("fraction of training labels flipped to another class")
    )
    hidden: int = field(
        default=100, metadata=help_text("hidden width of the ReLU MLP classifier; 0: linear")
    )
    batch_size: int = field(default=100, metadata=help_text("training and validation mini-batch"))
    lr: float = field(default=0.1, metadata=help_text("SGD learning rate of the classifier"))
    momentum: float = field(default=0.9, metadata=help_text("SGD momentum of the classifier"))
    hyper_steps: int = field(
        default=1000,
        metadata=help_text("hyper-steps; every run takes hyper_steps * hyper_every SGD steps"),
    )
    hyper_every: int = field(default=1, metadata=help_text("SGD steps between two hyper-steps"))
    lookahead: int = field(
        default=1, metadata=help_text("virtual SGD steps differentiated per hyper-step")
    )
    net_hidden: int = field(
        default=100, metadata=help_text("hidden width of the weight network 1 -> h -> 1")
    )
    hyper_lr: float = field(
        default=1e-4, metadata=help_text("Adam learning rate of the weight network")
    )
    normalize: bool = field(
        default=False,
        metadata=help_text("divide the weighted batch loss by the sum of the weights, not by B"),
    )
    eval_every: int = field(
        default=50, metadata=help_text("hyper-steps between evaluations on validation and test")
    )
    seed: int = field(
        default=0,
        metadata=help_text("seed of the data split, the label noise, the inits and batch order"),
    )

    @property
    def inner_budget(self) -> int:
        return self.hyper_steps * self.hyper_every

    def validate(self) -> None:
        check_data_options(self, DEFAULT_SIZES)
        check_positive_int("hidden", self.hidden, minimum=0)
        for name in ("batch_size", "hyper_steps", "hyper_every", "lookahead", "net_hidden"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("eval_every", self.eval_every)
        check_positive("lr", self.lr)
        check_positive("hyper_lr", self.hyper_lr)
        check_positive("momentum", self.momentum, allow_zero=True)
        if self.momentum >= 1:
            raise HypergradientError(
                f"option 'momentum': expected a number in [0, 1), got {self.momentum!r}."
            )
        if not isinstance(self.normalize, bool):
            raise HypergradientError(
                f"option 'normalize': expected true or false, got {self.normalize!r}."
            )


# Options a checkpoint must agree on to be resumed (hyper_steps may grow).
_RESUME_KEYS = (
    "dataset", "n_train", "n_val", "noise", "hidden", "batch_size", "lr", "momentum",
    "hyper_every", "lookahead", "net_hidden", "hyper_lr", "normalize", "eval_every", "seed",
)  # fmt: skip


def build_model(config: ReweightConfig, data: Split) -> nn.Module:
    """``features -> hidden (ReLU) -> classes`` (or linear) in the data's dtype, seeded; drawn
    in a forked RNG so that building it leaves the caller's random state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        dtype = data.x_train.dtype
        if config.hidden == 0:
            return nn.Linear(data.num_features, data.num_classes, dtype=dtype)
        return nn.Sequential(
            nn.Linear(data.num_features, config.hidden, dtype=dtype),
            nn.ReLU(),
            nn.Linear(config.hidden, data.num_classes, dtype=dtype),
        )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).double().mean())


def _evaluation(model, data: Split) -> dict[str, float]:
    return {"val_acc": accuracy(model, data.x_val, data.y_val),
            "test_acc": accuracy(model, data.x_test, data.y_test)}  # fmt: skip


def train_plain(config: ReweightConfig, data: Split, x, y, on_step=None) -> dict:
    """Plain SGD on ``(x, y)`` for the tuned run's SGD-step budget, evaluated as it is."""
    model = build_model(config, data)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    stream = BatchStream(indexed_loader(x, y, batch_size=config.batch_size), config.seed)
    every = config.eval_every * config.hyper_every
    curve = []
    for step in range(1, config.inner_budget + 1):
        xb, yb, _ = stream.next()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == config.inner_budget:
            curve.append({"inner_step": step, **_evaluation(model, data)})
        if on_step is not None:
            on_step(1)
    last = float(loss.detach())
    if not math.isfinite(last):
        raise HypergradientError(
            f"reweight: plain training diverged (loss {last}); lower option 'lr' (now {config.lr})."
        )
    return {"final": _evaluation(model, data), "curve": curve}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _early_stopped(curve: list[dict]) -> dict:
    best = max(curve, key=lambda r: r["val_acc"])  # the first of equal maxima
    return {"inner_step": best["inner_step"], "val_acc": best["val_acc"],
            "test_acc": best["test_acc"]}  # fmt: skip


@register_recipe
class ReweightRecipe(AbstractRecipe):
    """Learning to reweight noisy labels with a Meta-Weight-Net: a small network maps each
    example's training loss to its weight in (0, 1); its weights are fitted online by
    one-step look-ahead hypergradients on a clean validation set while an MLP trains
    (warm-started BilevelTrainer, method Unrolled). Compared with plain training and with an
    oracle trained on the clean examples only, for the same SGD steps and batch order.

    Writes config.toml, results.json, reweight.png and checkpoint.pt (every hyper-step)
    into the run folder; --resume continues a killed run from its checkpoint.
    """

    name = "reweight"
    help = "learn a loss -> weight network (Meta-Weight-Net) on noisy labels"
    config_cls = ReweightConfig

    def run(self, config, run_dir, *, resume, progress, console):
        config.validate()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        noisy = load_noisy_data(config, sizes=DEFAULT_SIZES)
        data = noisy.split
        kind = LossReweightNet(
            hidden=config.net_hidden, seed=config.seed, normalize=config.normalize
        )
        checkpoint = run_dir / "checkpoint.pt"
        meta = {k: getattr(config, k) for k in _RESUME_KEYS}
        resuming = resume_or_start_over(run_dir, meta, resume=resume)
        if resume and not resuming:
            console.print(f"no checkpoint in {run_dir}: starting from the beginning")

        with progress_bar(console, progress) as bar:
            task = bar.add_task("Meta-Weight-Net (hyper-steps)", total=config.hyper_steps)

            def evaluate(trainer: BilevelTrainer, record: dict) -> None:
                # the record is the one kept in trainer.history: it lands in the checkpoint
                step = trainer.hyper_step
                if step % config.eval_every == 0 or step == config.hyper_steps:
                    record.update(_evaluation(trainer.model, data))
                bar.update(task, completed=step)

            model = build_model(config, data)
            hyper_lr = config.hyper_lr
            trainer = BilevelTrainer(
                model,
                kind,
                indexed_loader(data.x_train, data.y_train, batch_size=config.batch_size),
                indexed_loader(data.x_val, data.y_val, batch_size=config.batch_size),
                torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum),
                hyper_optimizer=lambda hp: torch.optim.Adam(hp, lr=hyper_lr),
                method=Unrolled(steps=config.lookahead),
                hyper_every=config.hyper_every,
                callbacks=[evaluate],
                seed=config.seed,
            )
            trainer.fit(config.hyper_steps, checkpoint=checkpoint, resume=resume)
            bar.update(task, completed=config.hyper_steps)

            task = bar.add_task(
                "plain and oracle training (SGD steps)", total=2 * config.inner_budget
            )

            def advance(n):
                bar.advance(task, n)

            plain = train_plain(config, data, data.x_train, data.y_train, advance)
            keep = ~noisy.flipped
            oracle = train_plain(config, data, data.x_train[keep], data.y_train[keep], advance)

        mwn_curve = [
            {"inner_step": r["inner_step"], "val_acc": r["val_acc"], "test_acc": r["test_acc"]}
            for r in trainer.history
            if "test_acc" in r
        ]
        weights, losses = _final_weights(trainer, kind, data)
        flipped = noisy.flipped
        runs = {
            "plain": {"final": plain["final"], "early_stopped": _early_stopped(plain["curve"])},
            "meta-weight-net": {
                "final": _evaluation(trainer.model, data),
                "early_stopped": _early_stopped(mwn_curve),
            },
            "oracle": {"final": oracle["final"], "early_stopped": _early_stopped(oracle["curve"])},
        }
        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": machine(),
            "data": {
                "n_train": len(data.y_train),
                "n_val": len(data.y_val),
                "n_test": len(data.y_test),
                "flipped": int(flipped.sum()),
            },
            "test_acc": {k: v["final"]["test_acc"] for k, v in runs.items()},
            "runs": runs,
            "weights": {
                "mean_clean": float(weights[~flipped].mean()) if bool((~flipped).any()) else None,
                "mean_flipped": float(weights[flipped].mean()) if bool(flipped.any()) else None,
            },
            "weight_function": _weight_curve(trainer, kind, float(losses.max())),
            "hparams": {k: v.detach().tolist() for k, v in trainer.hparams.items()},
            "hyper_seconds": sum(r["seconds"] for r in trainer.history),
            "seconds": time.perf_counter() - start,
            "curves": {
                "meta-weight-net": mwn_curve,
                "plain": plain["curve"],
                "oracle": oracle["curve"],
            },
        }
        write_results(run_dir, results)
        plot_reweight(results, losses, weights, flipped, run_dir / "reweight.png")
        console.print(results_table(results))
        w = results["weights"]
        console.print(
            f"Learned weight V(loss) at the end, mean over training examples: clean labels "
            f"{_fmt(w['mean_clean'])}, flipped labels {_fmt(w['mean_flipped'])}. Wrote "
            f"results.json and reweight.png to {run_dir}."
        )
        return results


@torch.no_grad()
def _final_weights(trainer: BilevelTrainer, kind: LossReweightNet, data: Split):
    """Per-example training losses of the final model and the weights V gives them."""
    losses = F.cross_entropy(trainer.model(data.x_train), data.y_train, reduction="none")
    hparams = {k: v.detach() for k, v in trainer.hparams.items()}
    return kind.weight_fn(hparams, losses), losses


@torch.no_grad()
def _weight_curve(trainer, kind: LossReweightNet, max_loss: float) -> dict[str, list[float]]:
    hparams = {k: v.detach() for k, v in trainer.hparams.items()}
    grid = torch.linspace(0.0, max(max_loss, 1.0), 101, dtype=hparams["mwn.w1"].dtype)
    return {"loss": grid.tolist(), "weight": kind.weight_fn(hparams, grid).tolist()}


def results_table(results: dict) -> Table:
    c = results["config"]
    table = Table(
        title=f"Learning to reweight on {c['dataset']}: {results['data']['n_train']} training "
        f"examples, {results['data']['flipped']} labels flipped; "
        f"{c['hyper_steps'] * c['hyper_every']} SGD steps per run"
    )
    for col in ("model", "trained on", "final test acc", "early-stopped test acc (step)"):
        table.add_column(col, justify="left" if col in ("model", "trained on") else "right")
    what = {
        "plain": "all examples, weight 1 (noisy labels)",
        "meta-weight-net": "all examples, weight V(loss) (learned online)",
        "oracle": "the clean examples only",
    }
    for name, run in results["runs"].items():
        es = run["early_stopped"]
        table.add_row(
            name,
            what[name],
            f"{run['final']['test_acc']:.3f}",
            f"{es['test_acc']:.3f} ({es['inner_step']})",
        )
    return table


def plot_reweight(results: dict, losses, weights, flipped, path: Path) -> None:
    """Test accuracy per SGD step; the learned weight function over clean/flipped losses."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    ax = axes[0]
    colors = {"plain": "0.5", "meta-weight-net": "C0", "oracle": "C2"}
    for name, curve in results["curves"].items():
        ax.plot([r["inner_step"] for r in curve], [r["test_acc"] for r in curve],
                color=colors[name], label=name)  # fmt: skip
    ax.set_xlabel("SGD step")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy during training")
    ax.legend()
    ax = axes[1]
    top = max(float(losses.max()), 1.0)
    bins = torch.linspace(0, top, 41).tolist()
    ax.hist(losses[~flipped].tolist(), bins=bins, alpha=0.6, color="C0", label="clean labels")
    ax.hist(losses[flipped].tolist(), bins=bins, alpha=0.6, color="C3", label="flipped labels")
    ax.set_xlabel("training loss of an example (final Meta-Weight-Net model)")
    ax.set_ylabel("examples")
    ax2 = ax.twinx()
    curve = results["weight_function"]
    ax2.plot(curve["loss"], curve["weight"], color="k", label="learned weight V(loss)")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("weight")
    handles = [*ax.get_legend_handles_labels()[0], *ax2.get_lines()]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center")
    w = results["weights"]
    ax.set_title(f"Mean weight: clean {_fmt(w['mean_clean'])}, flipped {_fmt(w['mean_flipped'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
