r"""``hypergradient maml``, ``imaml`` and ``hyper-representation``: few-shot Omniglot.

Meta-training (:mod:`hypergradient.meta`): every meta-iteration draws ``meta_batch``
N-way K-shot episodes from the characters of Omniglot's background alphabets that are not
held out (each character also rotated by 90, 180 and 270 degrees as three more classes),
adapts the network to each episode's support set and takes an Adam step on the mean
meta-gradient of the query loss,

.. math::

    \theta \leftarrow \mathrm{Adam}\Big(\theta,\ \frac1B\sum_{i=1}^B
        \frac{d L^{query}_i(\varphi_i(\theta))}{d\theta}\Big),

with :math:`\varphi_i` from

* ``maml`` (:class:`~hypergradient.meta.MAML`): ``inner_steps`` SGD steps, the exact
  second-order meta-gradient through them (``first_order=true``: FOMAML);
* ``imaml`` (:class:`~hypergradient.meta.IMAML`): ``inner_steps`` gradient steps on the
  proximal problem :math:`\hat L(\varphi) + \frac\lambda2\|\varphi-\theta\|^2`, the
  meta-gradient by ``cg_steps`` conjugate-gradient steps on
  :math:`(I + \hat H/\lambda)\,x = \nabla L^{query}` (memory independent of the inner steps);
* ``hyper-representation`` (:class:`~hypergradient.meta.HyperRepresentation`, Franceschi et
  al. 2018): the network below the head is the meta-parameter (hyperparameter), each
  episode fits a linear head from zero by ``inner_steps`` gradient steps, and the
  hypergradient is back-propagated through those steps.

The network is the MAML Omniglot one (``blocks`` 3x3 stride-2 convolutions with batch norm
and ReLU, ``channels`` wide) on ``image_size`` x ``image_size`` images; its classification
head starts at zero for every task, so the model trained on ``ways``-way episodes also
answers the 20-way runs.

Evaluation, each on episodes that never touch the meta-training alphabets:

* ``test_episodes`` ``ways``-way ``shots``-shot episodes of the held-out alphabets
  (``heldout_alphabets``), with a 95% interval over episodes;
* the 20 official 20-way 1-shot runs of Lake et al. (2015) (``all_runs.zip``, characters of
  Omniglot's evaluation alphabets);
* the nearest-neighbour baseline on raw pixels on the very same episodes.

During meta-training the query accuracy of each meta-batch is recorded, and every
``eval_every`` iterations the accuracy on ``val_episodes`` fixed held-out episodes (drawn
separately from the test episodes; used for the curve only, nothing is selected on them).

``data = "sinusoid"`` runs the same loop on sine-wave regression (amplitude in [0.1, 5],
phase in [0, pi], ``shots`` support and ``queries`` query points, a 1-40-40-1 ReLU MLP):
mean squared errors instead of accuracies, the nearest-neighbour baseline predicts the
target of the closest support point.  It needs no files (the CLI tests use it).  The options
``shots``, ``queries`` and (``maml``, ``imaml``) ``inner_lr`` default to none, meaning the data
set's value: Omniglot's 1 shot, 5 queries and inner steps of 0.4 (``imaml``: 0.3) would
diverge on sine waves, which get 10 shots, 10 queries and inner steps of 0.01 (Finn et al.'s
sinusoid setting); ``results.json`` records the values used.

Files in the run folder: ``results.json``, ``meta_training.png`` (query accuracy or loss per
meta-iteration, held-out validation points, final accuracies against the baseline),
``checkpoint.pt`` (meta-parameters, Adam state, episode generator state, history; written
atomically after every meta-iteration) and ``checkpoint_options.json``.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from .._errors import HypergradientError
from ..meta import (
    DEFAULT_HELDOUT_ALPHABETS,
    IMAML,
    MAML,
    MLP,
    AbstractMetaLearner,
    AbstractModel,
    ConvNet,
    Episode,
    HyperRepresentation,
    SinusoidTasks,
    nearest_neighbour_predict,
    omniglot_one_shot_runs,
    omniglot_tasks,
)
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
    check_positive,
    check_positive_int,
    help_text,
    threads_field,
)

_DATA = ("omniglot", "sinusoid")


def per_data_field(text: str, defaults: dict[str, Any]) -> Any:
    """An option whose default depends on ``data``: none (the default) means
    ``defaults[data]``; :meth:`MetaLearningConfig.resolved` fills it in.  Omniglot's values
    diverge on sine waves (an inner step of 0.4 sends the support loss to inf)."""
    values = ", ".join(f"{v} for {k}" for k, v in defaults.items())
    return field(
        default=None, metadata={**help_text(f"{text}; none: {values}"), "per_data": defaults}
    )


_SHOTS = {"omniglot": 1, "sinusoid": 10}  # sinusoid: Finn et al.'s K = 10
_QUERIES = {"omniglot": 5, "sinusoid": 10}
_OMNIGLOT_ALPHABETS = (
    "Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean", "Latin",
    "Sanskrit", "Tagalog",
)  # fmt: skip


@dataclass
class MetaLearningConfig:
    """Options shared by ``hypergradient maml`` and ``hypergradient imaml``."""

    data: str = field(
        default="omniglot",
        metadata=help_text(
            "omniglot (few-shot classification, files in data_dir/omniglot/) or sinusoid "
            "(sine-wave regression, no files)"
        ),
    )
    data_dir: str | None = field(
        default=None,
        metadata=help_text(
            "folder holding omniglot/ with images_background_small1.zip, "
            "images_background_small2.zip and all_runs.zip (default: $HYPERGRADIENT_DATA, "
            "else ~/.cache/hypergradient)"
        ),
    )
    download: bool = field(
        default=False, metadata=help_text("fetch missing Omniglot files (md5-checked)")
    )
    heldout_alphabets: list[str] = field(
        default_factory=lambda: list(DEFAULT_HELDOUT_ALPHABETS),
        metadata=help_text(
            "background alphabets kept out of meta-training and used for the held-out "
            f"episodes; of {', '.join(_OMNIGLOT_ALPHABETS)}"
        ),
    )
    rotate: bool = field(
        default=True,
        metadata=help_text("add every training character rotated by 90/180/270 degrees"),
    )
    image_size: int = field(default=28, metadata=help_text("images are resized to this side"))
    ways: int = field(default=5, metadata=help_text("N: classes per episode (omniglot)"))
    shots: int | None = per_data_field(
        "K: support examples per class (sinusoid: support points)", _SHOTS
    )
    queries: int | None = per_data_field(
        "query examples per class (sinusoid: query points)", _QUERIES
    )
    channels: int = field(default=32, metadata=help_text("convolution channels (omniglot)"))
    blocks: int = field(default=4, metadata=help_text("convolution blocks (omniglot)"))
    inner_steps: int = field(default=5, metadata=help_text("adaptation steps per task"))
    inner_lr: float | None = per_data_field(
        "adaptation step size", {"omniglot": 0.4, "sinusoid": 0.01}
    )
    meta_batch: int = field(default=4, metadata=help_text("tasks per meta-iteration"))
    meta_lr: float = field(default=0.001, metadata=help_text("Adam learning rate of theta"))
    meta_iterations: int = field(default=600, metadata=help_text("meta-iterations"))
    eval_every: int = field(
        default=100,
        metadata=help_text("meta-iterations between held-out validation points (0: none)"),
    )
    val_episodes: int = field(
        default=50, metadata=help_text("held-out episodes of each validation point")
    )
    test_episodes: int = field(
        default=300, metadata=help_text("held-out episodes of the final evaluation")
    )
    seed: int = field(
        default=0, metadata=help_text("initial weights, episode draws, evaluation episodes")
    )
    threads: int = threads_field()

    def resolved(self) -> MetaLearningConfig:
        """A copy with every per-data option that is none set to ``data``'s default (what
        the run uses, and what ``results.json`` records)."""
        check_choice("data", self.data, _DATA)
        chosen = {
            f.name: f.metadata["per_data"][self.data]
            for f in fields(self)
            if "per_data" in f.metadata and getattr(self, f.name) is None
        }
        return replace(self, **chosen)

    def validate(self) -> None:
        self.resolved()._validate()

    def _validate(self) -> None:
        check_data_dir(self.data_dir, holds="omniglot/")
        if not isinstance(self.download, bool):
            raise HypergradientError(
                f"option 'download': expected true or false, got {self.download!r}."
            )
        if not isinstance(self.heldout_alphabets, list) or not self.heldout_alphabets:
            raise HypergradientError(
                f"option 'heldout_alphabets': expected a non-empty list of alphabet names, got "
                f"{self.heldout_alphabets!r}."
            )
        unknown = [a for a in self.heldout_alphabets if a not in _OMNIGLOT_ALPHABETS]
        if unknown or len(set(self.heldout_alphabets)) == len(_OMNIGLOT_ALPHABETS):
            raise HypergradientError(
                f"option 'heldout_alphabets': expected some but not all of "
                f"{list(_OMNIGLOT_ALPHABETS)}, got {self.heldout_alphabets!r}"
                f"{f' ({unknown} unknown)' if unknown else ''}."
            )
        if not isinstance(self.rotate, bool):
            raise HypergradientError(
                f"option 'rotate': expected true or false, got {self.rotate!r}."
            )
        check_positive_int("image_size", self.image_size, minimum=4)
        if self.image_size > 105:
            raise HypergradientError(
                f"option 'image_size': Omniglot images are 105x105; expected 4..105, got "
                f"{self.image_size}."
            )
        check_positive_int("ways", self.ways, minimum=2)
        check_positive_int("shots", self.shots)
        check_positive_int("queries", self.queries)
        if self.data == "omniglot" and self.shots + self.queries > 20:
            raise HypergradientError(
                f"options 'shots' + 'queries': Omniglot has 20 drawings per character, so "
                f"shots + queries must be <= 20, got {self.shots + self.queries}."
            )
        check_positive_int("channels", self.channels)
        check_positive_int("blocks", self.blocks)
        check_positive_int("inner_steps", self.inner_steps)
        check_positive("inner_lr", self.inner_lr)
        check_positive_int("meta_batch", self.meta_batch)
        check_positive("meta_lr", self.meta_lr)
        check_positive_int("meta_iterations", self.meta_iterations, minimum=0)
        check_positive_int("eval_every", self.eval_every, minimum=0)
        check_positive_int("val_episodes", self.val_episodes)
        check_positive_int("test_episodes", self.test_episodes)
        check_positive_int("seed", self.seed, minimum=0)
        check_positive_int("threads", self.threads, minimum=0)


@dataclass
class MAMLConfig(MetaLearningConfig):
    """Options of ``hypergradient maml`` (defaults: 5 min 18 s on 2 busy CPU cores)."""

    first_order: bool = field(
        default=False, metadata=help_text("first-order MAML (drop the second-order terms)")
    )

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.first_order, bool):
            raise HypergradientError(
                f"option 'first_order': expected true or false, got {self.first_order!r}."
            )


@dataclass
class HyperRepresentationConfig(MetaLearningConfig):
    """Options of ``hypergradient hyper-representation`` (defaults: 2 min 2 s on 2 busy CPU
    cores)."""

    inner_steps: int = field(
        default=20, metadata=help_text("gradient steps on the per-episode linear head")
    )
    inner_lr: float = field(default=0.1, metadata=help_text("their step size"))
    head_l2: float = field(
        default=0.0, metadata=help_text("ridge penalty rho/2 ||W||^2 on the head's weights")
    )

    def validate(self) -> None:
        super().validate()
        check_positive("head_l2", self.head_l2, allow_zero=True)


@dataclass
class IMAMLConfig(MetaLearningConfig):
    """Options of ``hypergradient imaml`` (defaults: 5 min 23 s on 2 busy CPU cores)."""

    inner_steps: int = field(
        default=10, metadata=help_text("gradient steps on the proximal inner problem")
    )
    inner_lr: float | None = per_data_field("their step size", {"omniglot": 0.3, "sinusoid": 0.01})
    lam: float = field(
        default=0.5,
        metadata=help_text("lambda: strength of the proximal term (lam/2) ||phi - theta||^2"),
    )
    cg_steps: int = field(
        default=5, metadata=help_text("conjugate-gradient steps on (I + H/lambda) x = grad")
    )

    def validate(self) -> None:
        super().validate()
        check_positive("lam", self.lam)
        check_positive_int("cg_steps", self.cg_steps)


# Options a checkpoint must agree on to be resumed (meta_iterations may grow; test_episodes
# and threads only change the final evaluation or the speed).
_RESUME_EXCLUDED = ("meta_iterations", "test_episodes", "threads", "data_dir", "download")


# ----------------------------------------------------------------------------- the problem


class _Data:
    """Task families, the fixed validation and test episodes and the 20-way runs."""

    def __init__(self, config: MetaLearningConfig, where: str):
        gen_val = torch.Generator().manual_seed(10_000 + config.seed)
        gen_test = torch.Generator().manual_seed(20_000 + config.seed)
        self.runs: list[Episode] = []
        if config.data == "sinusoid":
            self.train = SinusoidTasks(config.shots, config.queries, dtype=torch.float32)
            heldout = self.train
        else:
            try:
                self.train, heldout = omniglot_tasks(
                    config.data_dir,
                    ways=config.ways,
                    shots=config.shots,
                    queries=config.queries,
                    size=config.image_size,
                    heldout_alphabets=config.heldout_alphabets,
                    rotate=config.rotate,
                    download=config.download,
                )
                self.runs = omniglot_one_shot_runs(
                    config.data_dir, size=config.image_size, download=config.download
                )
            except HypergradientError as err:
                raise HypergradientError(
                    f"recipe '{where}' needs Omniglot: {err} (options 'data_dir' = "
                    f"{config.data_dir!r}, 'download' = {config.download}; or data=sinusoid)."
                ) from None
        self.val = heldout.sample_batch(config.val_episodes, gen_val)
        self.test = heldout.sample_batch(config.test_episodes, gen_test)


def _model(config: MetaLearningConfig):
    if config.data == "sinusoid":
        return MLP(1, (40, 40), out_features=1)
    return ConvNet(1, config.channels, config.blocks, config.image_size)


def _nearest_neighbour(episodes: list[Episode]) -> dict[str, float]:
    """Accuracy (classification) or mean squared error (regression) of the raw-input
    nearest-neighbour rule, averaged over episodes."""
    scores = []
    for ep in episodes:
        predicted = nearest_neighbour_predict(ep)
        if ep.y_query.is_floating_point():
            scores.append(float(((predicted - ep.y_query) ** 2).mean()))
        else:
            scores.append(float((predicted == ep.y_query).double().mean()))
    return _summary(scores, "mse" if episodes[0].y_query.is_floating_point() else "accuracy")


def _summary(values: list[float], key: str) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {key: mean, f"{key}_ci95": 1.96 * math.sqrt(var / n), "episodes": n}


def _evaluate(learner: AbstractMetaLearner, theta, episodes: list[Episode]) -> dict[str, float]:
    scores = learner.evaluate(theta, episodes)
    key = "accuracy" if scores["accuracy"] is not None else "mse"
    return _summary(scores["per_episode"], key)


# ----------------------------------------------------------------------------- the loop


def run_meta_learning(
    name: str,
    config: MetaLearningConfig,
    model: AbstractModel,
    learner: AbstractMetaLearner,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool,
    console,
) -> dict[str, Any]:
    """The meta-training loop and evaluation shared by the recipes: ``model.init`` gives
    the meta-parameters, ``learner`` adapts and differentiates."""
    config = config.resolved()
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = _Data(config, name)
    theta = {
        k: v.requires_grad_(True)
        for k, v in model.init(torch.Generator().manual_seed(config.seed), torch.float32).items()
    }
    meta_opt = torch.optim.Adam(list(theta.values()), lr=config.meta_lr)
    episodes_gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    checkpoint = run_dir / "checkpoint.pt"
    options = {"recipe": name} | {
        k: v for k, v in asdict(config).items() if k not in _RESUME_EXCLUDED
    }
    if resume_or_start_over(run_dir, options, resume=resume):
        state = load_checkpoint(checkpoint, "--resume", signature=options)
        with torch.no_grad():
            for k, v in theta.items():
                v.copy_(state["theta"][k])
        meta_opt.load_state_dict(state["meta_optimizer"])
        episodes_gen.set_state(state["generator"])
        history, validation = list(state["history"]), list(state["validation"])
    elif resume:
        console.print(f"no checkpoint in {run_dir}: starting from the beginning")

    def detached():
        return {k: v.detach() for k, v in theta.items()}

    def validate_now(iteration: int) -> None:
        scores = _evaluate(learner, detached(), data.val)
        validation.append({"iteration": iteration, **scores})

    if config.eval_every and not validation:
        validate_now(0)
    loop_seconds = sum(r["seconds"] for r in history)
    with progress_bar(console, progress) as bar:
        task = bar.add_task(
            f"meta-iterations ({name})", total=config.meta_iterations, completed=len(history)
        )
        while len(history) < config.meta_iterations:
            step_start = time.perf_counter()
            batch = data.train.sample_batch(config.meta_batch, episodes_gen)
            result = learner.batch_meta_gradient(detached(), batch)
            if not math.isfinite(result.query_loss):
                raise HypergradientError(
                    f"{name}: the query loss became {result.query_loss} at meta-iteration "
                    f"{len(history) + 1}; lower option 'inner_lr' (now {config.inner_lr}) or "
                    f"'meta_lr' (now {config.meta_lr})."
                )
            meta_opt.zero_grad(set_to_none=True)
            for k, v in theta.items():
                v.grad = result.grad[k]
            meta_opt.step()
            iteration = len(history) + 1
            record = {
                "iteration": iteration,
                "query_loss": result.query_loss,  # of the meta-batch, before the step
                "query_accuracy": result.query_accuracy,
                **result.stats,
                "seconds": time.perf_counter() - step_start,
            }
            history.append(record)
            if config.eval_every and iteration % config.eval_every == 0:
                validate_now(iteration)
            save_atomic(
                {
                    "theta": detached(),
                    "meta_optimizer": meta_opt.state_dict(),
                    "generator": episodes_gen.get_state(),
                    "history": history,
                    "validation": validation,
                },
                checkpoint,
                signature=options,
            )
            bar.update(task, completed=iteration)
        loop_seconds = sum(r["seconds"] for r in history)

    eval_start = time.perf_counter()
    final = detached()
    results: dict[str, Any] = {
        "recipe": name,
        "config": asdict(config),
        "machine": machine(),
        "heldout": _evaluate(learner, final, data.test),
        "baseline_nearest_neighbour": {"heldout": _nearest_neighbour(data.test)},
    }
    if data.runs:
        results["one_shot_runs"] = _evaluate(learner, final, data.runs)
        results["baseline_nearest_neighbour"]["one_shot_runs"] = _nearest_neighbour(data.runs)
    results.update(
        {
            "meta_training_seconds": loop_seconds,
            "evaluation_seconds": time.perf_counter() - eval_start,
            "seconds": time.perf_counter() - start,
            "validation": validation,
            "history": history,
        }
    )
    write_results(run_dir, results)
    plot_meta_training(results, run_dir / "meta_training.png")
    console.print(results_table(results))
    console.print(f"Wrote results.json and meta_training.png to {run_dir}.")
    return results


def results_table(results: dict) -> Table:
    c = results["config"]
    classify = "accuracy" in results["heldout"]
    key = "accuracy" if classify else "mse"
    what = (
        f"{c['ways']}-way {c['shots']}-shot, held-out alphabets"
        if classify
        else f"sinusoid, {c['shots']}-shot, query MSE"
    )
    table = Table(
        title=f"{results['recipe']}: {c['meta_iterations']} meta-iterations of {c['meta_batch']} "
        f"tasks, {c['inner_steps']} inner steps"
    )
    table.add_column("method")
    table.add_column(what, justify="right")
    if "one_shot_runs" in results:
        table.add_column("20 one-shot runs (20-way)", justify="right")

    def cell(scores: dict) -> str:
        return f"{scores[key]:.3f} ± {scores[f'{key}_ci95']:.3f}"

    row = [results["recipe"], cell(results["heldout"])]
    base = results["baseline_nearest_neighbour"]
    base_row = ["nearest neighbour (raw inputs)", cell(base["heldout"])]
    if "one_shot_runs" in results:
        row.append(cell(results["one_shot_runs"]))
        base_row.append(cell(base["one_shot_runs"]))
    table.add_row(*row)
    table.add_row(*base_row)
    return table


def plot_meta_training(results: dict, path: Path) -> None:
    plt = pyplot()
    history, validation = results["history"], results["validation"]
    classify = "accuracy" in results["heldout"]
    key = "accuracy" if classify else "mse"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    if history:
        its = [r["iteration"] for r in history]
        train = [r["query_accuracy"] if classify else r["query_loss"] for r in history]
        window = max(1, len(train) // 30)
        smooth = [
            sum(train[max(0, i - window + 1) : i + 1]) / len(train[max(0, i - window + 1) : i + 1])
            for i in range(len(train))
        ]
        ax.plot(its, train, color="C0", alpha=0.25, lw=0.8)
        ax.plot(its, smooth, color="C0", label=f"meta-batch query {key} (running mean)")
    if validation:
        ax.plot(
            [v["iteration"] for v in validation],
            [v[key] for v in validation],
            "o-",
            color="C1",
            label=f"held-out validation {key}",
        )
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("query accuracy" if classify else "query MSE")
    if not classify:
        ax.set_yscale("log")
    ax.set_title(f"{results['recipe']}: meta-training")
    ax.legend()
    ax = axes[1]
    labels, ours, base, errs, base_errs = [], [], [], [], []
    nn = results["baseline_nearest_neighbour"]
    for part, label in (("heldout", "held-out episodes"), ("one_shot_runs", "20 one-shot runs")):
        if part in results:
            labels.append(label)
            ours.append(results[part][key])
            errs.append(results[part][f"{key}_ci95"])
            base.append(nn[part][key])
            base_errs.append(nn[part][f"{key}_ci95"])
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ours, 0.4, yerr=errs, label=results["recipe"], color="C0")
    ax.bar([i + 0.2 for i in x], base, 0.4, yerr=base_errs, label="nearest neighbour", color="C7")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels)
    ax.set_ylabel(key)
    ax.set_title("final evaluation (95% intervals over episodes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the recipes


class _MetaLearningRecipe(ThreadedRecipe):
    """A few-shot recipe: :meth:`build` gives the model and its meta-learner, and
    :func:`run_meta_learning` does the rest (meta-training, evaluation, files)."""

    @abc.abstractmethod
    def build(self, config) -> tuple[torch.nn.Module, Any]:
        """``(model, learner)`` for a validated ``config``."""

    def _run(self, config, run_dir, *, resume, progress, console):
        config = config.resolved()  # the per-data defaults, also in results.json's config
        model, learner = self.build(config)
        return run_meta_learning(
            self.name, config, model, learner, run_dir,
            resume=resume, progress=progress, console=console,
        )  # fmt: skip


@register_recipe
class MAMLRecipe(_MetaLearningRecipe):
    """Few-shot Omniglot with MAML (Finn et al. 2017): meta-train a small convolutional
    network on N-way K-shot episodes of the background alphabets that are not held out
    (``inner_steps`` SGD steps per task, exact second-order meta-gradient, Adam on the
    meta-parameters), then report accuracy on episodes of the held-out alphabets and on the
    20 official 20-way one-shot runs, next to the raw-pixel nearest-neighbour baseline.
    ``data=sinusoid`` runs the same on sine-wave regression.

    Writes config.toml, results.json, meta_training.png and checkpoint.pt (every
    meta-iteration) into the run folder; --resume continues a killed run from its checkpoint.
    """

    name = "maml"
    help = "few-shot Omniglot (or sinusoid regression) with MAML / first-order MAML"
    config_cls = MAMLConfig

    def build(self, config):
        model = _model(config)
        learner = MAML(model, config.inner_steps, config.inner_lr, first_order=config.first_order)
        return model, learner


@register_recipe
class IMAMLRecipe(_MetaLearningRecipe):
    """Few-shot Omniglot with implicit MAML (Rajeswaran et al. 2019): every task solves the
    proximal problem  support loss + lam/2 ||phi - theta||^2  by ``inner_steps`` gradient
    steps (no graph kept), and the meta-gradient (I + H/lam)^-1 grad(query loss) comes from
    ``cg_steps`` conjugate-gradient steps with Hessian-vector products, so memory does not
    grow with the inner steps.  Evaluation as in ``hypergradient maml``: held-out alphabets,
    the 20 official one-shot runs, and the raw-pixel nearest-neighbour baseline.

    Writes config.toml, results.json, meta_training.png and checkpoint.pt (every
    meta-iteration) into the run folder; --resume continues a killed run from its checkpoint.
    """

    name = "imaml"
    help = "few-shot Omniglot (or sinusoid regression) with implicit MAML (CG meta-gradients)"
    config_cls = IMAMLConfig

    def build(self, config):
        model = _model(config)
        learner = IMAML(
            model,
            lam=config.lam,
            inner_steps=config.inner_steps,
            inner_lr=config.inner_lr,
            cg_steps=config.cg_steps,
        )
        return model, learner


@register_recipe
class HyperRepresentationRecipe(_MetaLearningRecipe):
    """Few-shot Omniglot with a hyper-representation (Franceschi et al. 2018): the
    convolutional layers are the hyperparameters shared by all episodes, and every episode
    fits its own linear head on top of them from zero by ``inner_steps`` gradient steps (the
    inner problem); the hypergradient of the query loss is back-propagated through those head
    steps (reverse mode) into the shared layers.  Evaluation as in ``hypergradient maml``.
    ``data=sinusoid`` fits a linear head on a 1-40-40 MLP representation.

    Writes config.toml, results.json, meta_training.png and checkpoint.pt (every
    meta-iteration) into the run folder; --resume continues a killed run from its checkpoint.
    """

    name = "hyper-representation"
    help = "few-shot Omniglot (or sinusoids) with a learned representation, per-episode heads"
    config_cls = HyperRepresentationConfig

    def build(self, config):
        # the representation only: the head is not among the meta-parameters
        model = MLP(1, (40, 40)) if config.data == "sinusoid" else _model(config)
        learner = HyperRepresentation(
            model.features,
            inner_steps=config.inner_steps,
            inner_lr=config.inner_lr,
            head_l2=config.head_l2,
        )
        return model, learner
