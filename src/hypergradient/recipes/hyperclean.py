r"""``hypergradient hyper-clean``: learn one weight per training example to undo noisy labels.

Data hyper-cleaning (Franceschi, Donini, Frasconi & Pontil 2017, Sec. 5.1, at CPU scale):
a fraction ``noise`` of the training labels is flipped to a random *other* class; a clean
validation set is given.  Every training example gets a weight
:math:`\omega_i = m\,\sigma(\lambda_i)` (:class:`~hypergradient.hparams.ExampleWeights`,
initially 1) and the weights are fitted so that the model trained on the weighted loss does
well on the validation set:

.. math::

    \min_\lambda\ E(w_T(\lambda)) \quad\text{with}\quad
    w_{t+1} = w_t - \eta\,\nabla_w\Big[\tfrac1N\textstyle\sum_i \omega_i(\lambda)\,
    \ell_i(w_t) + \tfrac{\mu}{2}\lVert W\rVert^2\Big],\ w_0 \text{ fixed}.

**Why cold start through the unrolled run** (:func:`~hypergradient.unrolled_hypergrad`,
reverse mode) rather than the warm-started :class:`~hypergradient.BilevelTrainer`: an
example's weight acts on the model only through the *whole* training run, and a
mini-batch hypergradient at the current weights touches only the weights of the examples
in that batch (most would wait many hyper-steps for a signal, and the warm-started model
would already have fitted the flipped labels they should have been spared).  Full-batch
gradient descent from the same initial weights for ``inner_steps`` steps is cheap for a
linear model (or small MLP) on a few thousand examples, and its reverse-mode hypergradient
is the *exact* gradient of the T-step problem (Franceschi et al. 2018), for all ``N``
weights in one backward pass.  This is also the setup of the papers brief's digits
calibration (T=100, ``2 sigmoid``, Adam 0.3, 60 hyper-steps).

Reported, each trained by the same ``inner_steps`` full-batch steps from the same start:

* **baseline**: every (noisy) example with weight 1;
* **hyper-cleaning**: the learned weights;
* **oracle**: the clean examples only (the flipped ones removed; their mean loss);

and the F1 score of detecting the flipped examples as those whose learned weight fell
below ``max_weight / 2`` (:meth:`~hypergradient.hparams.ExampleWeights.flagged`).

Cost per hyper-step: ``inner_steps`` full-batch forward + double-backward passes and one
backward through all of them; memory grows linearly with ``inner_steps`` (the trajectory of
a linear model: a few ``N x classes`` tensors per step).

Files in the run folder: ``results.json``, ``hyperclean.png`` (weights of clean vs flipped
examples, accuracies, validation loss and F1 per hyper-step), ``checkpoint.pt`` (weights,
Adam state, step, history, RNG; written atomically after every hyper-step) and
``checkpoint_options.json`` (the options a resume must agree with).
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
from ..data import Split, add_label_noise, load_digits_split, load_mnist, to_float_split
from ..hparams.example_weights import ExampleWeights
from ..hypergrad.unrolled import unrolled_hypergrad
from ._base import (
    AbstractRecipe,
    load_checkpoint,
    machine,
    progress_bar,
    pyplot,
    register_recipe,
    resume_or_start_over,
    save_atomic,
    write_results,
)
from ._config import check_choice, check_fraction, check_positive, check_positive_int, help_text

_DATASETS = ("mnist", "digits")
_DIGITS_TOTAL, _DIGITS_MIN_TEST = 1797, 100
_MNIST_TRAIN_TOTAL, _MNIST_TEST_TOTAL = 60_000, 10_000
# dataset -> (n_train, n_val, n_test) when the options are none (n_test None: all the rest)
DEFAULT_SIZES = {"mnist": (5000, 1000, 10_000), "digits": (600, 200, None)}


# ----------------------------------------------------------------------------- shared data


@dataclass
class NoisyData:
    """A split whose training labels are partly flipped; ``clean`` keeps the true labels."""

    split: Split  # split.y_train holds the NOISY labels
    clean: torch.Tensor
    flipped: torch.Tensor  # bool (n_train,)


@dataclass
class NoisyDataOptions:
    """The data options of the noisy-label recipes (``hyper-clean``, ``reweight``): what
    :func:`check_data_options` checks and :func:`load_noisy_data` reads.  The defaults are
    hyper-clean's; a recipe with other default sizes or noise re-declares those fields (a
    re-declared field keeps its place, so the options list in the same order)."""

    dataset: str = field(
        default="mnist",
        metadata=help_text(
            "mnist (original IDX files in data_dir) or digits (scikit-learn's 8x8 digits, "
            "shipped, no download)"
        ),
    )
    data_dir: str | None = field(
        default=None,
        metadata=help_text(
            "folder holding mnist/ (default: $HYPERGRADIENT_DATA, else ~/.cache/hypergradient)"
        ),
    )
    download: bool = field(
        default=False, metadata=help_text("fetch missing MNIST files (md5-checked)")
    )
    n_train: int | None = field(
        default=None, metadata=help_text("training examples (none: 5000 mnist, 600 digits)")
    )
    n_val: int | None = field(
        default=None,
        metadata=help_text("clean validation examples (none: 1000 mnist, 200 digits)"),
    )
    n_test: int | None = field(
        default=None,
        metadata=help_text("test examples (none: the 10000 MNIST test images; the rest of digits)"),
    )
    noise: float = field(
        default=0.5, metadata=help_text("fraction of training labels flipped to another class")
    )


def dataset_sizes(
    dataset: str, n_train, n_val, n_test, sizes=DEFAULT_SIZES
) -> tuple[int, int, int | None]:
    """The sizes an options triple means (``None`` picks ``sizes[dataset]``)."""
    default = sizes[dataset]
    return (
        default[0] if n_train is None else n_train,
        default[1] if n_val is None else n_val,
        default[2] if n_test is None else n_test,
    )


def check_data_options(config, sizes=DEFAULT_SIZES) -> None:
    """Shared checks of ``dataset``/``data_dir``/``download``/sizes/``noise``/``seed``
    (``sizes``: the recipe's default sizes per dataset)."""
    check_choice("dataset", config.dataset, _DATASETS)
    if config.data_dir is not None and (
        not isinstance(config.data_dir, str) or not config.data_dir.strip()
    ):
        raise HypergradientError(
            f"option 'data_dir': expected a folder path, got {config.data_dir!r}."
        )
    if not isinstance(config.download, bool):
        raise HypergradientError(
            f"option 'download': expected true or false, got {config.download!r}."
        )
    for name in ("n_train", "n_val", "n_test"):
        if getattr(config, name) is not None:
            check_positive_int(name, getattr(config, name))
    check_fraction("noise", config.noise)
    check_positive_int("seed", config.seed, minimum=0)
    n_train, n_val, n_test = dataset_sizes(
        config.dataset, config.n_train, config.n_val, config.n_test, sizes
    )
    if config.dataset == "digits":
        limit = _DIGITS_TOTAL - _DIGITS_MIN_TEST
        if n_train + n_val > limit:
            raise HypergradientError(
                f"options 'n_train' + 'n_val' = {n_train} + {n_val} exceeds {limit} (digits "
                f"has {_DIGITS_TOTAL} examples and keeps >= {_DIGITS_MIN_TEST} to test); "
                f"lower them."
            )
        if n_test is not None and n_test > _DIGITS_TOTAL - n_train - n_val:
            raise HypergradientError(
                f"option 'n_test' = {n_test}: digits has only "
                f"{_DIGITS_TOTAL - n_train - n_val} examples left after n_train={n_train} and "
                f"n_val={n_val}; lower it or set it to none (all the rest)."
            )
    else:
        if n_train + n_val > _MNIST_TRAIN_TOTAL:
            raise HypergradientError(
                f"options 'n_train' + 'n_val' = {n_train} + {n_val} exceeds the "
                f"{_MNIST_TRAIN_TOTAL} MNIST training images; lower them."
            )
        if n_test is not None and n_test > _MNIST_TEST_TOTAL:
            raise HypergradientError(
                f"option 'n_test' = {n_test} exceeds the {_MNIST_TEST_TOTAL} MNIST test "
                f"images; lower it or set it to none (all of them)."
            )
    if round(config.noise * n_train) < 1 and config.noise > 0:
        raise HypergradientError(
            f"option 'noise' = {config.noise}: flips no label of {n_train} training examples; "
            f"raise it (or n_train), or set it to 0."
        )


def load_noisy_data(config, dtype: torch.dtype = torch.float32, sizes=DEFAULT_SIZES) -> NoisyData:
    """Train/validation/test tensors (flattened, pixels in [0, 1]) with noisy training labels.

    Digits: a seeded shuffle of scikit-learn's 1797 images (test: the rest, or its first
    ``n_test``).  MNIST: train and validation drawn from the official training images, the
    test set the first ``n_test`` official test images.  Exactly ``round(noise * n_train)``
    training labels are flipped to a uniformly random other class (seeded).
    """
    n_train, n_val, n_test = dataset_sizes(
        config.dataset, config.n_train, config.n_val, config.n_test, sizes
    )
    if config.dataset == "digits":
        split = load_digits_split(n_train, n_val, seed=config.seed, dtype=dtype)
        if n_test is not None:
            split.x_test, split.y_test = split.x_test[:n_test], split.y_test[:n_test]
    else:
        try:
            images, labels = load_mnist(config.data_dir, split="train", download=config.download)
            test_images, test_labels = load_mnist(
                config.data_dir, split="test", download=config.download
            )
        except HypergradientError as err:
            raise HypergradientError(
                f"option 'dataset' = 'mnist' needs its files: {err} (options 'data_dir' = "
                f"{config.data_dir!r}, 'download' = {config.download}; or use dataset=digits, "
                f"shipped with scikit-learn)."
            ) from None
        # n_test=1 only satisfies to_float_split: the test set is the official one below
        part = to_float_split(images, labels, n_train, n_val, n_test=1, seed=config.seed)
        if n_test is not None:
            test_images, test_labels = test_images[:n_test], test_labels[:n_test]
        x_test = test_images.reshape(len(test_images), -1).to(dtype) / 255.0
        split = Split(
            part.x_train.to(dtype),
            part.y_train,
            part.x_val.to(dtype),
            part.y_val,
            x_test,
            test_labels.long(),
            10,
        )
    clean = split.y_train.clone()
    if config.noise > 0:
        noisy, flipped = add_label_noise(clean, config.noise, split.num_classes, seed=config.seed)
    else:
        noisy, flipped = clean.clone(), torch.zeros(len(clean), dtype=torch.bool)
    split.y_train = noisy
    return NoisyData(split, clean, flipped)


def detection_scores(flagged: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of ``flagged`` as a detector of ``flipped`` (bool masks)."""
    tp = int((flagged & flipped).sum())
    n_flagged, n_flipped = int(flagged.sum()), int(flipped.sum())
    precision = tp / n_flagged if n_flagged else 0.0
    recall = tp / n_flipped if n_flipped else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "flagged": n_flagged,
        "flipped": n_flipped,
    }


# ----------------------------------------------------------------------------- config


@dataclass
class HyperCleanConfig(NoisyDataOptions):
    """Options of ``hypergradient hyper-clean`` (defaults: 1-2 minutes on 2 CPU cores)."""

    hidden: int = field(
        default=0,
        metadata=help_text(
            "hidden width of a tanh MLP; 0: linear softmax regression (the paper's)"
        ),
    )
    inner_steps: int = field(
        default=50,
        metadata=help_text("full-batch gradient steps of every training run (T of the unroll)"),
    )
    inner_lr: float = field(default=0.5, metadata=help_text("gradient-descent step of the model"))
    l2: float = field(
        default=1e-3, metadata=help_text("L2 penalty (mu/2)|W|^2 on the weight matrices (>= 0)")
    )
    max_weight: float = field(
        default=2.0,
        metadata=help_text("largest example weight m: w_i = m sigmoid(lambda_i), initially 1"),
    )
    hyper_steps: int = field(default=20, metadata=help_text("hyper-steps (one unrolled run each)"))
    hyper_lr: float = field(default=0.3, metadata=help_text("Adam learning rate of the logits"))
    seed: int = field(
        default=0, metadata=help_text("seed of the data split, the label noise and the init")
    )

    def validate(self) -> None:
        check_data_options(self)
        check_positive_int("hidden", self.hidden, minimum=0)
        check_positive_int("inner_steps", self.inner_steps)
        check_positive_int("hyper_steps", self.hyper_steps)
        check_positive("inner_lr", self.inner_lr)
        check_positive("l2", self.l2, allow_zero=True)
        check_positive("max_weight", self.max_weight)
        if self.max_weight <= 1:
            raise HypergradientError(
                f"option 'max_weight': expected a number > 1 (the weights start at 1 < m), got "
                f"{self.max_weight!r}."
            )
        check_positive("hyper_lr", self.hyper_lr)


# Options a checkpoint must agree on to be resumed (hyper_steps may grow).
_RESUME_KEYS = (
    "dataset", "n_train", "n_val", "noise", "hidden", "inner_steps", "inner_lr", "l2",
    "max_weight", "hyper_lr", "seed",
)  # fmt: skip


# ----------------------------------------------------------------------------- the problem


def init_params(config: HyperCleanConfig, data: Split, dtype=torch.float32) -> dict:
    """The fixed start ``w_0``: zeros for the linear model (as in the paper), else PyTorch's
    default ``nn.Linear`` initialisation drawn from ``seed``."""
    d, c = data.num_features, data.num_classes
    if config.hidden == 0:
        return {"W": torch.zeros(d, c, dtype=dtype), "b": torch.zeros(c, dtype=dtype)}
    gen = torch.Generator().manual_seed(config.seed)

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return ((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(dtype)

    h = config.hidden
    return {
        "W1": uniform((d, h), d),
        "b1": uniform((h,), d),
        "W": uniform((h, c), h),
        "b": uniform((c,), h),
    }


def forward(params, x: torch.Tensor) -> torch.Tensor:
    """Logits of the linear model (``W, b``) or of the tanh MLP (``W1, b1, W, b``)."""
    if "W1" in params:
        x = torch.tanh(x @ params["W1"] + params["b1"])
    return x @ params["W"] + params["b"]


def l2_penalty(params, l2: float) -> torch.Tensor:
    return 0.5 * l2 * sum(torch.sum(v**2) for k, v in params.items() if k.startswith("W"))


def train(config: HyperCleanConfig, params0, x, y, weights: torch.Tensor) -> dict:
    """``inner_steps`` full-batch GD steps on ``mean(weights * loss) + L2`` (no graph kept)."""
    p = dict(params0)
    weights = weights.detach()
    for _ in range(config.inner_steps):
        w = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        losses = F.cross_entropy(forward(w, x), y, reduction="none")
        loss = (weights * losses).mean() + l2_penalty(w, config.l2)
        grads = torch.autograd.grad(loss, list(w.values()))
        p = {k: (w[k] - config.inner_lr * g).detach() for k, g in zip(w, grads)}
    if not all(bool(torch.isfinite(v).all()) for v in p.values()):
        raise HypergradientError(
            f"hyper-clean: training diverged (non-finite weights); lower option 'inner_lr' "
            f"(now {config.inner_lr})."
        )
    return p


@torch.no_grad()
def accuracy(params, x, y) -> float:
    return float((forward(params, x).argmax(1) == y).double().mean())


# ----------------------------------------------------------------------------- the recipe


@register_recipe
class HyperCleanRecipe(AbstractRecipe):
    """Data hyper-cleaning (Franceschi et al. 2017): half of the training labels are flipped;
    one weight per training example is fitted by exact reverse-mode hypergradients through a
    cold-started, full-batch training run so that the trained model does well on a clean
    validation set. Reports the test accuracy of hyper-cleaning next to the noisy baseline
    (all examples, weight 1) and the oracle (clean examples only), and the F1 score of
    detecting the flipped examples from the learned weights (weight < max_weight/2).

    Writes config.toml, results.json, hyperclean.png and checkpoint.pt (every hyper-step)
    into the run folder; --resume continues a killed run from its checkpoint.
    """

    name = "hyper-clean"
    help = "learn per-example weights that undo flipped labels (data hyper-cleaning)"
    config_cls = HyperCleanConfig

    def run(self, config, run_dir, *, resume, progress, console):
        config.validate()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        noisy = load_noisy_data(config)
        data = noisy.split
        n = len(data.y_train)
        idx = torch.arange(n)
        params0 = init_params(config, data)
        kind = ExampleWeights(n, max_weight=config.max_weight)

        def inner_loss(p, h):
            batch = (data.x_train, data.y_train, idx)
            return kind.training_loss(forward, p, h, batch) + l2_penalty(p, config.l2)

        def outer_loss(p, h):
            return F.cross_entropy(forward(p, data.x_val), data.y_val)

        # ---- state: logits, Adam, step, history (fresh or from the checkpoint)
        lam = kind.init(params0)["example_weights"].requires_grad_(True)
        hyper_opt = torch.optim.Adam([lam], lr=config.hyper_lr)
        history: list[dict[str, float]] = []
        checkpoint = run_dir / "checkpoint.pt"
        meta = {"recipe": self.name} | {k: getattr(config, k) for k in _RESUME_KEYS}
        if resume_or_start_over(run_dir, meta, resume=resume):
            state = load_checkpoint(checkpoint, "--resume", signature=meta)
            if state["hparams"]["example_weights"].shape != lam.shape:
                raise HypergradientError(
                    f"--resume: the checkpoint in {str(run_dir)!r} holds "
                    f"{state['hparams']['example_weights'].numel()} example weights, this run "
                    f"has {n} training examples; start over in a new --out folder."
                )
            with torch.no_grad():
                lam.copy_(state["hparams"]["example_weights"])
            hyper_opt.load_state_dict(state["hyper_optimizer"])
            history = list(state["history"])
            torch.set_rng_state(state["rng"])
        elif resume:
            console.print(f"no checkpoint in {run_dir}: starting from the beginning")

        # ---- hyper-steps: one cold-started unrolled run each
        with progress_bar(console, progress) as bar:
            task = bar.add_task(
                f"hyper-cleaning ({config.inner_steps}-step unrolled runs)",
                total=config.hyper_steps,
                completed=len(history),
            )
            while len(history) < config.hyper_steps:
                step_start = time.perf_counter()
                grads, w_final = unrolled_hypergrad(
                    inner_loss,
                    outer_loss,
                    params0,
                    {"example_weights": lam.detach()},
                    steps=config.inner_steps,
                    lr=config.inner_lr,
                    return_params=True,
                )
                with torch.no_grad():
                    val_loss = float(outer_loss(w_final, {}))
                if not math.isfinite(val_loss):
                    raise HypergradientError(
                        f"hyper-clean: the validation loss became {val_loss} at hyper-step "
                        f"{len(history) + 1}; lower option 'inner_lr' (now {config.inner_lr})."
                    )
                current = {"example_weights": lam.detach()}
                scores = detection_scores(kind.flagged(current), noisy.flipped)
                described = kind.describe(current)
                hyper_opt.zero_grad(set_to_none=True)
                lam.grad = grads["example_weights"].to(lam.dtype)
                hyper_opt.step()
                history.append(
                    {
                        "hyper_step": len(history) + 1,
                        # all at the example weights before this step's update
                        "val_loss": val_loss,
                        "val_acc": accuracy(w_final, data.x_val, data.y_val),
                        "f1": scores["f1"],
                        "hypergrad_norm": float(grads["example_weights"].norm()),
                        "seconds": time.perf_counter() - step_start,
                        **described,
                    }
                )
                save_atomic(
                    {
                        "hparams": {"example_weights": lam.detach().clone()},
                        "hyper_optimizer": hyper_opt.state_dict(),
                        "step": len(history),
                        "history": history,
                        "rng": torch.get_rng_state(),
                    },
                    checkpoint,
                    signature=meta,
                )
                bar.update(task, completed=len(history))

            # ---- the three trained models, each inner_steps full-batch steps from w_0
            task = bar.add_task("baseline, hyper-cleaning, oracle (training runs)", total=3)
            hparams = {"example_weights": lam.detach()}
            weights = kind.weights(hparams).detach()
            models = {}
            ones = torch.ones(n, dtype=data.x_train.dtype)
            models["baseline"] = train(config, params0, data.x_train, data.y_train, ones)
            bar.advance(task)
            models["hyper-cleaning"] = train(config, params0, data.x_train, data.y_train, weights)
            bar.advance(task)
            keep = ~noisy.flipped
            models["oracle"] = train(
                config, params0, data.x_train[keep], data.y_train[keep], ones[keep]
            )
            bar.advance(task)

        detection = detection_scores(kind.flagged(hparams), noisy.flipped)
        runs = {
            name: {
                "val_acc": accuracy(p, data.x_val, data.y_val),
                "test_acc": accuracy(p, data.x_test, data.y_test),
            }
            for name, p in models.items()
        }
        results = {
            "recipe": self.name,
            "config": asdict(config),
            "machine": machine(),
            "data": {
                "n_train": n,
                "n_val": len(data.y_val),
                "n_test": len(data.y_test),
                "flipped": int(noisy.flipped.sum()),
            },
            "test_acc": {k: v["test_acc"] for k, v in runs.items()},
            "val_acc": {k: v["val_acc"] for k, v in runs.items()},
            "detection": detection,
            "weights": {
                "mean_clean": float(weights[~noisy.flipped].mean()) if bool(keep.any()) else None,
                "mean_flipped": (
                    float(weights[noisy.flipped].mean()) if bool(noisy.flipped.any()) else None
                ),
            },
            "hyper_seconds": sum(r["seconds"] for r in history),
            "seconds": time.perf_counter() - start,
            "history": history,
        }
        write_results(run_dir, results)
        plot_hyperclean(results, weights, noisy.flipped, config.max_weight, run_dir)
        console.print(results_table(results))
        det = results["detection"]
        console.print(
            f"Flipped-label detection (weight < {config.max_weight / 2:g}): F1 {det['f1']:.3f} "
            f"(precision {det['precision']:.3f}, recall {det['recall']:.3f}; "
            f"{det['flagged']} flagged, {det['flipped']} flipped). "
            f"Wrote results.json and hyperclean.png to {run_dir}."
        )
        return results


def results_table(results: dict) -> Table:
    c = results["config"]
    table = Table(
        title=f"Data hyper-cleaning on {c['dataset']}: {results['data']['n_train']} training "
        f"examples, {results['data']['flipped']} labels flipped; "
        f"{c['inner_steps']} full-batch steps per training run"
    )
    for col in ("model", "trained on", "val acc", "test acc"):
        table.add_column(col, justify="left" if col in ("model", "trained on") else "right")
    what = {
        "baseline": "all examples, weight 1 (noisy labels)",
        "hyper-cleaning": f"all examples, learned weights ({c['hyper_steps']} hyper-steps)",
        "oracle": "the clean examples only",
    }
    for name in ("baseline", "hyper-cleaning", "oracle"):
        table.add_row(
            name,
            what[name],
            f"{results['val_acc'][name]:.3f}",
            f"{results['test_acc'][name]:.3f}",
        )
    return table


def plot_hyperclean(results: dict, weights, flipped, max_weight: float, run_dir: Path) -> None:
    """Weight histograms (clean vs flipped), test accuracies, val loss and F1 per hyper-step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    bins = torch.linspace(0, max_weight, 41).tolist()
    w = weights.double()
    ax.hist(w[~flipped].tolist(), bins=bins, alpha=0.7, label="clean labels", color="C0")
    ax.hist(w[flipped].tolist(), bins=bins, alpha=0.7, label="flipped labels", color="C3")
    ax.axvline(max_weight / 2, color="k", ls="--", lw=0.8, label="detection threshold")
    ax.set_xlabel("learned example weight")
    ax.set_ylabel("examples")
    ax.set_title("Learned weights")
    ax.legend()
    ax = axes[1]
    names = ["baseline", "hyper-cleaning", "oracle"]
    accs = [results["test_acc"][k] for k in names]
    bars = ax.bar(names, accs, color=["0.5", "C0", "C2"])
    for b, a in zip(bars, accs):
        ax.text(b.get_x() + b.get_width() / 2, a, f"{a:.3f}", ha="center", va="bottom")
    low = min(accs)
    ax.set_ylim(max(0.0, low - 0.1), min(1.0, max(accs) + 0.05))
    ax.set_ylabel("test accuracy")
    ax.set_title(f"F1 of flipped-label detection: {results['detection']['f1']:.3f}")
    ax = axes[2]
    hist = results["history"]
    steps = [r["hyper_step"] for r in hist]
    ax.plot(steps, [r["val_loss"] for r in hist], color="C0", label="validation loss")
    ax.set_xlabel("hyper-step")
    ax.set_ylabel("validation cross-entropy")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["f1"] for r in hist], color="C3", label="detection F1")
    ax2.set_ylabel("F1")
    ax2.set_ylim(0, 1)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax.set_title("Hyper-steps")
    fig.tight_layout()
    fig.savefig(run_dir / "hyperclean.png", dpi=110)
    plt.close(fig)
