r"""A fixed meta-learning protocol: task splits declared before training, tuned baselines,
a guard against selecting anything on meta-test, and paired evaluation.

Metz et al. (2019, 2020, 2022) meta-train on a *distribution* of tasks and report on tasks
the optimizer never saw.  This module fixes that protocol for ``hg.learned``:

* :class:`TaskConfig` -- one task configuration (data set, MLP or CNN, width, depth,
  activation, batch size, the seed of its instance), a frozen dataclass that round-trips
  through JSON and builds a :class:`~hypergradient.learned.ClassifierFamily` and a
  :class:`~hypergradient.learned.Task`.
* :func:`make_splits` -- a deterministic function of a seed: hundreds of configurations,
  cut into meta-train, meta-validation and meta-test.  Architectures (everything but the
  seed) are partitioned, so meta-test holds *configurations* never seen in meta-train or
  meta-validation; held-out *families* (an activation, a data set) appear in meta-test only.
  :meth:`ProtocolSplits.hashes` (SHA-256 of each split's canonical JSON) proves which tasks
  a run used.
* :class:`Baseline`, :func:`warmup_cosine`, :func:`tune_baseline` -- Adam and SGD with
  momentum, at a constant rate or with linear warm-up plus cosine decay to the run's
  horizon (the learned optimizer reads :math:`t/T`; so does the schedule), their rate
  picked on meta-validation by the median final training loss.
* :class:`SelectionLog`, :func:`check_selections` -- every tuned value with the split it
  came from; recording a value chosen on a meta-test configuration raises, and
  :func:`check_selections` audits a benchmark's JSON record after the fact.
* :func:`evaluate_baseline`, :func:`train_and_score`, :func:`paired_comparison` -- final
  training loss and held-out loss at any horizon, paired win counts, an exact sign test
  and the Wilcoxon signed-rank test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import torch

from .._errors import HypergradientError
from ..diffopt import adam, sgd
from .tasks import _ACTIVATIONS, _DATASETS, ClassifierFamily, Task, train_task

SPLITS = ("meta_train", "meta_valid", "meta_test")
"""The protocol's three splits, in order.

Examples:
    >>> from hypergradient.learned import SPLITS
    >>> SPLITS
    ('meta_train', 'meta_valid', 'meta_test')
"""
BASELINE_OPTIMIZERS = ("adam", "sgdm")
"""The optimizers :class:`Baseline` takes: Adam and SGD with momentum.

Examples:
    >>> from hypergradient.learned import BASELINE_OPTIMIZERS
    >>> BASELINE_OPTIMIZERS
    ('adam', 'sgdm')
"""
BASELINE_SCHEDULES = ("constant", "warmup_cosine")
"""The learning-rate schedules :class:`Baseline` takes (:func:`warmup_cosine`).

Examples:
    >>> from hypergradient.learned import BASELINE_SCHEDULES
    >>> BASELINE_SCHEDULES
    ('constant', 'warmup_cosine')
"""

# The sampled space (in distribution).  A CNN's depth is fixed (two convolutions): depth 1.
_MLP_WIDTHS = (16, 32, 64, 128)
_MLP_DEPTHS = (1, 2, 3)
_CNN_WIDTHS = (4, 8, 16)
_BATCH_SIZES = (16, 32, 64, 128)


@final
@dataclass(frozen=True)
class TaskConfig:
    """One task configuration of the protocol: a small, frozen, JSON-serialisable record.

    ``dataset``, ``model``, ``width``, ``depth``, ``activation``, ``batch_size``,
    ``num_examples`` and ``downsample`` fix the family (:meth:`family`); ``seed`` fixes the
    instance (example subset, initialisation, batch order; :meth:`task`).

    Examples:
        >>> from hypergradient.learned import TaskConfig
        >>> config = TaskConfig("digits", "mlp", width=8, depth=1, activation="tanh",
        ...                     batch_size=16, seed=3)
        >>> TaskConfig.from_json(config.to_json()) == config
        True
        >>> config.family().name, config.config_id
        ('digits-mlp-w8-tanh-b16', 'c537c7488deb')
        >>> task = config.task(num_steps=4)
        >>> task.data["batches"].shape
        torch.Size([4, 16])
    """

    dataset: str
    model: str
    width: int
    depth: int
    activation: str
    batch_size: int
    seed: int
    num_examples: int = 512
    downsample: int = 1

    def __post_init__(self):
        where = f"TaskConfig({self.dataset!r}, {self.model!r}, ...)"
        if self.dataset not in _DATASETS:
            raise HypergradientError(f"{where}: dataset must be one of {_DATASETS}.")
        if self.model not in ("mlp", "cnn"):
            raise HypergradientError(f"{where}: model must be 'mlp' or 'cnn', got {self.model!r}.")
        if self.activation not in _ACTIVATIONS:
            raise HypergradientError(
                f"{where}: activation must be one of {tuple(_ACTIVATIONS)}, got "
                f"{self.activation!r}."
            )
        for name in ("width", "depth", "batch_size", "num_examples", "downsample"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HypergradientError(f"{where}: {name} must be an int >= 1, got {value!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise HypergradientError(f"{where}: seed must be an int >= 0, got {self.seed!r}.")

    @property
    def architecture(self) -> tuple:
        """Everything but the seed: configurations with equal architectures share a family."""
        return tuple(v for k, v in dataclasses.asdict(self).items() if k != "seed")

    @property
    def config_id(self) -> str:
        """The first 12 hex digits of the SHA-256 of :meth:`to_json`."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise HypergradientError(
                f"TaskConfig.from_dict(...): unknown keys {unknown}; expected a subset of "
                f"{sorted(names)} (a dict written by TaskConfig.to_dict)."
            )
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> TaskConfig:
        return cls.from_dict(json.loads(text))

    def family(self, data_dir: str | None = None) -> ClassifierFamily:
        """The :class:`~hypergradient.learned.ClassifierFamily` (MNIST files in ``data_dir``)."""
        return ClassifierFamily(
            self.dataset,
            self.model,
            width=self.width,
            batch_size=self.batch_size,
            num_examples=self.num_examples,
            depth=self.depth,
            activation=self.activation,
            data_dir=None if self.dataset == "digits" else data_dir,
            downsample=self.downsample,
        )

    def task(self, num_steps: int, *, data_dir: str | None = None, replicate: int = 0) -> Task:
        """The task instance: drawn from a generator seeded with ``seed`` (``replicate`` > 0
        draws an independent instance of the same configuration, for repeated runs)."""
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * replicate)
        return self.family(data_dir).sample(generator, num_steps)


def _hash_configs(configs: Sequence[TaskConfig]) -> str:
    text = "[" + ",".join(c.to_json() for c in configs) + "]"
    return hashlib.sha256(text.encode()).hexdigest()


@final
@dataclass(frozen=True)
class ProtocolSplits:
    """Meta-train, meta-validation and meta-test configurations, and how they were made.

    Attributes:
        meta_train, meta_valid, meta_test: tuples of :class:`TaskConfig`.
        settings: the keyword arguments of :func:`make_splits` that rebuild them.

    Examples:
        >>> from hypergradient.learned import make_splits
        >>> splits = make_splits(seed=0, num_train=20, num_valid=5, num_test=6)
        >>> [len(s) for s in (splits.meta_train, splits.meta_valid, splits.meta_test)]
        [20, 5, 6]
        >>> splits.split_of(splits.meta_valid[0])
        'meta_valid'
        >>> make_splits(**splits.settings).hashes() == splits.hashes()  # deterministic
        True
    """

    meta_train: tuple[TaskConfig, ...]
    meta_valid: tuple[TaskConfig, ...]
    meta_test: tuple[TaskConfig, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "_index", {c.config_id: s for s in SPLITS for c in self[s]})

    def __getitem__(self, split: str) -> tuple[TaskConfig, ...]:
        if split not in SPLITS:
            raise HypergradientError(
                f"ProtocolSplits[{split!r}]: unknown split; expected one of {SPLITS}."
            )
        return getattr(self, split)

    def hashes(self) -> dict[str, str]:
        """SHA-256 of each split's canonical JSON list (order included)."""
        return {s: _hash_configs(self[s]) for s in SPLITS}

    def split_of(self, config: TaskConfig) -> str | None:
        """The split holding ``config`` (``None``: in no split)."""
        return self._index.get(config.config_id)

    def ids(self, split: str) -> set[str]:
        return {c.config_id for c in self[split]}

    def to_dict(self) -> dict[str, Any]:
        """``{"settings", "hashes", <split>: [config dicts]}`` (JSON-ready)."""
        out: dict[str, Any] = {"settings": dict(self.settings), "hashes": self.hashes()}
        out.update({s: [c.to_dict() for c in self[s]] for s in SPLITS})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProtocolSplits:
        splits = cls(
            *(tuple(TaskConfig.from_dict(c) for c in data[s]) for s in SPLITS),
            settings=dict(data.get("settings", {})),
        )
        if "hashes" in data and dict(data["hashes"]) != splits.hashes():
            raise HypergradientError(
                "ProtocolSplits.from_dict(...): the recorded hashes do not match the recorded "
                "configurations; the record was edited after it was written."
            )
        return splits


def make_splits(
    seed: int = 0,
    num_train: int = 300,
    num_valid: int = 60,
    num_test: int = 90,
    *,
    datasets: Sequence[str] = ("digits", "mnist"),
    held_out_datasets: Sequence[str] = ("fashion-mnist",),
    activations: Sequence[str] = ("relu", "tanh"),
    held_out_activations: Sequence[str] = ("gelu",),
    cnn_fraction: float = 0.25,
    valid_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> ProtocolSplits:
    r"""Sample the protocol's task configurations and cut them into three splits.

    The in-distribution *architectures* (data set in ``datasets``; MLP of width
    16/32/64/128 and depth 1-3 or CNN of 4/8/16 channels; activation in ``activations``;
    batch size 16/32/64/128) are shuffled by a generator seeded with ``seed`` and
    partitioned: ``test_fraction`` of them to meta-test, ``valid_fraction`` to
    meta-validation, the rest to meta-train.  Each split then draws its configurations
    (architecture with probability ``cnn_fraction`` of a CNN, and a fresh instance seed)
    from its own architectures.  Meta-test has three equal parts: held-out configurations
    (its own in-distribution architectures), held-out activations (architectures with an
    activation of ``held_out_activations``, on ``datasets``) and held-out data sets
    (``held_out_datasets`` with any activation).  MNIST-like images are average-pooled to
    14x14 (``downsample=2``).

    No configuration (nor architecture) appears in two splits; held-out activations and data
    sets appear in meta-test only.  Everything is a deterministic function of the arguments,
    which are stored in :attr:`ProtocolSplits.settings`.

    Cost: pure Python on configurations (no data is loaded).

    Examples:
        >>> from hypergradient.learned import make_splits
        >>> splits = make_splits(seed=0)
        >>> len(splits.meta_train), len(splits.meta_valid), len(splits.meta_test)
        (300, 60, 90)
        >>> sorted({c.activation for c in splits.meta_train})
        ['relu', 'tanh']
        >>> sorted({c.dataset for c in splits.meta_test})
        ['digits', 'fashion-mnist', 'mnist']
    """
    where = "make_splits(...)"
    for name, value in (("num_train", num_train), ("num_valid", num_valid), ("num_test", num_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HypergradientError(f"{where}: {name} must be an int >= 1, got {value!r}.")
    overlap = (set(datasets) & set(held_out_datasets)) | (
        set(activations) & set(held_out_activations)
    )
    if overlap:
        raise HypergradientError(
            f"{where}: {sorted(overlap)} is both in distribution and held out; a held-out "
            f"family must appear in meta-test only. Remove it from one of the lists."
        )
    if not (valid_fraction > 0 and test_fraction > 0 and valid_fraction + test_fraction < 1):
        raise HypergradientError(
            f"{where}: valid_fraction and test_fraction must be > 0 with a sum < 1, got "
            f"{valid_fraction} and {test_fraction}."
        )
    if not 0 <= cnn_fraction <= 1:
        raise HypergradientError(f"{where}: cnn_fraction must be in [0, 1], got {cnn_fraction}.")
    settings = {
        "seed": seed,
        "num_train": num_train,
        "num_valid": num_valid,
        "num_test": num_test,
        "datasets": list(datasets),
        "held_out_datasets": list(held_out_datasets),
        "activations": list(activations),
        "held_out_activations": list(held_out_activations),
        "cnn_fraction": cnn_fraction,
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
    }
    gen = torch.Generator().manual_seed(seed)

    def architectures(data: Sequence[str], acts: Sequence[str]) -> dict[str, list[tuple]]:
        mlp = [
            (d, "mlp", w, depth, a, b)
            for d in data
            for w in _MLP_WIDTHS
            for depth in _MLP_DEPTHS
            for a in acts
            for b in _BATCH_SIZES
        ]
        cnn = [
            (d, "cnn", w, 1, a, b)
            for d in data
            for w in _CNN_WIDTHS
            for a in acts
            for b in _BATCH_SIZES
        ]
        return {"mlp": mlp, "cnn": cnn}

    def shuffled(items: list) -> list:
        order = torch.randperm(len(items), generator=gen).tolist()
        return [items[i] for i in order]

    inside = architectures(datasets, activations)
    parts: dict[str, dict[str, list[tuple]]] = {s: {} for s in SPLITS}
    for model, archs in inside.items():
        archs = shuffled(archs)
        n_test = max(1, round(test_fraction * len(archs)))
        n_valid = max(1, round(valid_fraction * len(archs)))
        parts["meta_test"][model] = archs[:n_test]
        parts["meta_valid"][model] = archs[n_test : n_test + n_valid]
        parts["meta_train"][model] = archs[n_test + n_valid :]
    held_act = architectures(datasets, held_out_activations)
    held_data = architectures(held_out_datasets, list(activations) + list(held_out_activations))
    used_seeds: set[int] = set()

    def draw(pool: Mapping[str, list[tuple]], count: int) -> list[TaskConfig]:
        configs = []
        for _ in range(count):
            model = (
                "cnn"
                if float(torch.rand((), generator=gen, dtype=torch.float64)) < cnn_fraction
                else "mlp"
            )
            if not pool.get(model):
                model = "mlp" if model == "cnn" else "cnn"
            archs = pool[model]
            arch = archs[int(torch.randint(len(archs), (), generator=gen))]
            task_seed = int(torch.randint(2**31 - 1, (), generator=gen))
            while task_seed in used_seeds:  # distinct instances across all splits
                task_seed = (task_seed + 1) % (2**31 - 1)
            used_seeds.add(task_seed)
            dataset, model, width, depth, act, batch = arch
            configs.append(
                TaskConfig(
                    dataset,
                    model,
                    width,
                    depth,
                    act,
                    batch,
                    seed=task_seed,
                    downsample=1 if dataset == "digits" else 2,
                )
            )
        return configs

    train = draw(parts["meta_train"], num_train)
    valid = draw(parts["meta_valid"], num_valid)
    third = num_test // 3
    test = (
        draw(parts["meta_test"], num_test - 2 * third)
        + draw(held_act, third)
        + draw(held_data, third)
    )
    return ProtocolSplits(tuple(train), tuple(valid), tuple(test), settings=settings)


# ----------------------------------------------------------------------------------------
# Baselines.


def warmup_cosine(lr: float, horizon: int, warmup_steps: int) -> Callable[[int], float]:
    r"""Linear warm-up then cosine decay to zero at ``horizon``: the rate of update ``t``
    (0-based) is

    .. math::
        \gamma_t = \begin{cases} \gamma\,(t+1)/W & t < W \\
        \tfrac{\gamma}{2}\big(1 + \cos(\pi\,(t - W)/(T - W))\big) & W \le t < T \\
        0 & t \ge T \end{cases}

    Examples:
        >>> from hypergradient.learned import warmup_cosine
        >>> schedule = warmup_cosine(1.0, horizon=10, warmup_steps=2)
        >>> [round(schedule(t), 4) for t in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if not (isinstance(horizon, int) and isinstance(warmup_steps, int)) or not (
        0 <= warmup_steps < horizon
    ):
        raise HypergradientError(
            f"warmup_cosine(lr={lr}, horizon={horizon!r}, warmup_steps={warmup_steps!r}): "
            f"expected ints with 0 <= warmup_steps < horizon."
        )

    def schedule(t: int) -> float:
        if t < warmup_steps:
            return lr * (t + 1) / warmup_steps
        if t >= horizon:
            return 0.0
        return 0.5 * lr * (1.0 + math.cos(math.pi * (t - warmup_steps) / (horizon - warmup_steps)))

    return schedule


@final
@dataclass(frozen=True)
class Baseline:
    r"""A hand-designed optimizer of the protocol: Adam or SGD with momentum 0.9 (the
    :mod:`hypergradient.diffopt` transforms, equal to ``torch.optim``), at a constant rate
    or with :func:`warmup_cosine` (warm-up over ``warmup_fraction`` of the run, cosine
    decay to zero at the run's last step).

    Examples:
        >>> from hypergradient.learned import Baseline
        >>> base = Baseline("adam", "warmup_cosine", lr=1e-2)
        >>> base.name, [round(base.rate(t, 100), 5) for t in (0, 4, 5, 99)]
        ('adam-warmup_cosine', [0.002, 0.01, 0.01, 0.0])
    """

    optimizer: str
    schedule: str
    lr: float = 1e-3
    momentum: float = 0.9
    warmup_fraction: float = 0.05

    def __post_init__(self):
        where = f"Baseline({self.optimizer!r}, {self.schedule!r}, lr={self.lr!r})"
        if self.optimizer not in BASELINE_OPTIMIZERS:
            raise HypergradientError(
                f"{where}: optimizer must be one of {BASELINE_OPTIMIZERS}, got {self.optimizer!r}."
            )
        if self.schedule not in BASELINE_SCHEDULES:
            raise HypergradientError(
                f"{where}: schedule must be one of {BASELINE_SCHEDULES}, got {self.schedule!r}."
            )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise HypergradientError(f"{where}: lr must be a finite number > 0.")

    @property
    def name(self) -> str:
        return f"{self.optimizer}-{self.schedule}"

    def with_lr(self, lr: float) -> Baseline:
        return dataclasses.replace(self, lr=float(lr))

    def rate(self, t: int, num_steps: int) -> float:
        """The learning rate of update ``t`` of a run of ``num_steps`` updates."""
        if self.schedule == "constant":
            return float(self.lr)
        warmup = int(round(self.warmup_fraction * num_steps))
        return warmup_cosine(float(self.lr), num_steps, min(warmup, num_steps - 1))(t)

    def transform(self, num_steps: int):
        """The :class:`~hypergradient.diffopt.GradientTransformation` for a run."""
        lr = lambda count: self.rate(int(count), num_steps)  # noqa: E731
        if self.optimizer == "adam":
            return adam(lr=lr)
        return sgd(lr=lr, momentum=self.momentum)


@final
@dataclass(frozen=True)
class Scores:
    """Final losses of one trained task.

    Attributes:
        train_loss: the full training objective (all of the task's examples), ``inf`` if
            the run diverged.
        heldout_loss: cross-entropy on the data set's validation pool, which no task trains
            on (the generalisation of the trained model).

    Examples:
        >>> from hypergradient.learned import Scores
        >>> Scores(train_loss=0.12, heldout_loss=0.31).heldout_loss
        0.31
    """

    train_loss: float
    heldout_loss: float


def train_and_score(
    task: Task, update: Callable[[dict, dict, int], dict], num_steps: int
) -> Scores:
    """Train ``task`` for ``num_steps`` steps of ``update(params, grads, t)`` and score it.

    Examples:
        >>> from hypergradient.learned import Baseline, TaskConfig, train_and_score
        >>> task = TaskConfig("digits", "mlp", 8, 1, "relu", 32, seed=0).task(20)
        >>> tx = Baseline("adam", "constant", lr=1e-2).transform(20)
        >>> state = {"opt": tx.init(task.params)}
        >>> def update(params, grads, t):
        ...     updates, state["opt"] = tx.update(grads, state["opt"], params)
        ...     return {k: params[k] + updates[k] for k in params}
        >>> scores = train_and_score(task, update, 20)
        >>> scores.train_loss < float(task.eval_loss(task.params))
        True
    """
    params, _ = train_task(task, update, num_steps, record=False)
    with torch.no_grad():
        train = float(task.eval_loss(params))
        family = task.family
        heldout = (
            float(family.eval_valid_loss(params))
            if hasattr(family, "eval_valid_loss")
            else float(task.valid_loss(params, num_steps - 1))
        )
    bad = not (math.isfinite(train) and math.isfinite(heldout))
    return Scores(math.inf if bad else train, math.inf if bad else heldout)


def evaluate_baseline(
    baseline: Baseline,
    configs: Sequence[TaskConfig],
    num_steps: int,
    *,
    data_dir: str | None = None,
    replicate: int = 0,
) -> list[Scores]:
    """Train every configuration's task for ``num_steps`` steps of ``baseline`` (its
    schedule stretched to ``num_steps``) and return their :class:`Scores`.

    Examples:
        >>> from hypergradient.learned import Baseline, evaluate_baseline, make_splits
        >>> configs = [c for c in make_splits(0).meta_valid if c.dataset == "digits"][:2]
        >>> scores = evaluate_baseline(Baseline("sgdm", "warmup_cosine", lr=0.1), configs, 10)
        >>> len(scores), all(s.train_loss < 2.4 for s in scores)
        (2, True)
    """
    out = []
    for config in configs:
        task = config.task(num_steps, data_dir=data_dir, replicate=replicate)
        tx = baseline.transform(num_steps)
        state = {"opt": tx.init(task.params)}

        def update(params, grads, t, tx=tx, state=state):
            updates, state["opt"] = tx.update(grads, state["opt"], params)
            return {k: params[k] + updates[k] for k in params}

        out.append(train_and_score(task, update, num_steps))
    return out


# ----------------------------------------------------------------------------------------
# Selection records.


@final
@dataclass(frozen=True)
class Selection:
    """One tuned value: what was chosen, from which split and configurations, and why.

    Attributes:
        name: what was tuned (``"adam-constant.lr"``).
        value: the choice.
        split: the split of every configuration read (``"meta_valid"``).
        config_ids: :attr:`TaskConfig.config_id` of every configuration read.
        evidence: JSON-ready numbers that justify the choice.

    Examples:
        >>> from hypergradient.learned import Selection
        >>> record = Selection("adam-constant.lr", 0.01, "meta_valid", ("c537c7488deb",))
        >>> record.to_dict()["split"], record.to_dict()["config_ids"]
        ('meta_valid', ['c537c7488deb'])
    """

    name: str
    value: Any
    split: str
    config_ids: tuple[str, ...]
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "split": self.split,
            "config_ids": list(self.config_ids),
            "evidence": dict(self.evidence),
        }


class SelectionLog:
    """Every value selected under a protocol, with the split it was selected on.

    :meth:`record` refuses a selection that read any meta-test configuration (or one in no
    split: then nobody can prove where it came from) with one error line.

    Examples:
        >>> from hypergradient.learned import SelectionLog, make_splits
        >>> splits = make_splits(seed=0, num_train=10, num_valid=4, num_test=6)
        >>> log = SelectionLog(splits)
        >>> log.record("adam-constant.lr", 1e-2, splits.meta_valid).split
        'meta_valid'
        >>> log.record("adam-constant.lr", 1e-2, splits.meta_test[:1])
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: SelectionLog.record('adam-constant.lr'): ...
    """

    def __init__(self, splits: ProtocolSplits):
        if not isinstance(splits, ProtocolSplits):
            raise HypergradientError(
                f"SelectionLog(splits): expected a ProtocolSplits (from make_splits), got "
                f"{type(splits).__name__}."
            )
        self.splits = splits
        self.selections: list[Selection] = []

    def record(
        self,
        name: str,
        value: Any,
        configs: Iterable[TaskConfig],
        evidence: Mapping[str, Any] | None = None,
    ) -> Selection:
        """Record ``name = value`` chosen by reading ``configs``; raises on meta-test."""
        configs = list(configs)
        found = self.check(name, configs)
        split = found[0] if len(set(found)) == 1 else "+".join(sorted(set(found)))
        selection = Selection(
            name, value, split, tuple(c.config_id for c in configs), dict(evidence or {})
        )
        self.selections.append(selection)
        return selection

    def check(self, name: str, configs: Sequence[TaskConfig]) -> list[str]:
        """The split of every configuration; raises if one is meta-test or in no split."""
        where = f"SelectionLog.record({name!r})"
        if not configs:
            raise HypergradientError(f"{where}: no configurations given; pass the ones read.")
        found = [self.splits.split_of(c) for c in configs]
        test = [c.config_id for c, s in zip(configs, found) if s == "meta_test"]
        if test:
            raise HypergradientError(
                f"{where}: the selection read {len(test)} meta-test configuration(s) "
                f"(e.g. {test[0]}); select on splits.meta_valid, never on meta-test."
            )
        unknown = [c.config_id for c, s in zip(configs, found) if s is None]
        if unknown:
            raise HypergradientError(
                f"{where}: {len(unknown)} configuration(s) (e.g. {unknown[0]}) are in no split "
                f"of this protocol; select on splits.meta_valid."
            )
        return found  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """``{"protocol": splits.to_dict(), "selections": [...]}``, for :func:`check_selections`."""
        return {
            "protocol": self.splits.to_dict(),
            "selections": [s.to_dict() for s in self.selections],
        }


def check_selections(record: Mapping[str, Any] | str | Path) -> list[str]:
    """Audit a benchmark's record: fail if any tuned value came from meta-test tasks.

    ``record`` is a dict (or the path of a JSON file) with ``"protocol"`` (a
    :meth:`ProtocolSplits.to_dict`, or ``{"settings": ..., "hashes": ...}`` alone, then the
    splits are rebuilt with :func:`make_splits` and must hash the same) and
    ``"selections"`` (:meth:`SelectionLog.to_dict`).  A selection fails if its ``split``
    names meta-test, if any of its ``config_ids`` is a meta-test configuration, or if one is
    in no split.

    Returns:
        The names of the selections checked.

    Raises:
        HypergradientError: one line naming the first offending selection.

    Examples:
        >>> from hypergradient.learned import SelectionLog, check_selections, make_splits
        >>> splits = make_splits(seed=0, num_train=10, num_valid=4, num_test=6)
        >>> log = SelectionLog(splits)
        >>> _ = log.record("sgdm-constant.lr", 0.1, splits.meta_valid)
        >>> check_selections(log.to_dict())
        ['sgdm-constant.lr']
        >>> bad = log.to_dict()
        >>> bad["selections"][0]["config_ids"].append(splits.meta_test[0].config_id)
        >>> check_selections(bad)
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: check_selections(...): selection ...
    """
    where = "check_selections(...)"
    if isinstance(record, (str, Path)):
        record = json.loads(Path(record).read_text())
    if not isinstance(record, Mapping) or "protocol" not in record or "selections" not in record:
        raise HypergradientError(
            f"{where}: expected a record with 'protocol' and 'selections' (SelectionLog.to_dict), "
            f"got {sorted(record) if isinstance(record, Mapping) else type(record).__name__}."
        )
    protocol = record["protocol"]
    if all(s in protocol for s in SPLITS):
        splits = ProtocolSplits.from_dict(protocol)
    else:
        splits = make_splits(**protocol["settings"])
        if "hashes" in protocol and dict(protocol["hashes"]) != splits.hashes():
            raise HypergradientError(
                f"{where}: make_splits(**settings) does not reproduce the recorded hashes; the "
                f"record came from another version of the protocol."
            )
    test_ids = splits.ids("meta_test")
    all_ids = set().union(*(splits.ids(s) for s in SPLITS))
    names = []
    for sel in record["selections"]:
        name = sel.get("name", "?")
        if "meta_test" in str(sel.get("split", "")):
            raise HypergradientError(
                f"{where}: selection {name!r} says it was made on {sel['split']!r}; tuned values "
                f"must come from meta-train or meta-validation."
            )
        ids = list(sel.get("config_ids", []))
        if not ids:
            raise HypergradientError(
                f"{where}: selection {name!r} lists no config_ids, so its source is unproven."
            )
        leaked = [i for i in ids if i in test_ids]
        if leaked:
            raise HypergradientError(
                f"{where}: selection {name!r} read meta-test configuration(s) {leaked[:3]}; "
                f"rerun the selection on meta-validation."
            )
        unknown = [i for i in ids if i not in all_ids]
        if unknown:
            raise HypergradientError(
                f"{where}: selection {name!r} read configuration(s) {unknown[:3]} that are in "
                f"no split of the protocol."
            )
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------
# Tuning.


@final
@dataclass(frozen=True)
class TuningResult:
    """The tuned baseline and the evidence: per rate, every task's final losses.

    Attributes:
        baseline: the :class:`Baseline` with the chosen rate.
        objective: ``"train"`` or ``"valid"`` (what the median was taken of).
        medians: rate -> median over tasks of the objective.
        scores: rate -> every task's :class:`Scores`.
        selection: the :class:`Selection` recorded in the log.

    Examples:
        >>> from hypergradient.learned import Baseline, SelectionLog, make_splits, tune_baseline
        >>> splits = make_splits(seed=0)
        >>> valid = [c for c in splits.meta_valid if c.dataset == "digits"][:1]
        >>> result = tune_baseline(Baseline("sgdm", "constant"), [0.1], valid, 5,
        ...                        SelectionLog(splits))
        >>> result.baseline.lr, list(result.medians), len(result.scores[0.1])
        (0.1, [0.1], 1)
    """

    baseline: Baseline
    objective: str
    medians: Mapping[float, float]
    scores: Mapping[float, list[Scores]]
    selection: Selection


def tune_baseline(
    baseline: Baseline,
    lrs: Sequence[float],
    configs: Sequence[TaskConfig],
    num_steps: int,
    log: SelectionLog,
    *,
    objective: str = "train",
    data_dir: str | None = None,
    replicate: int = 0,
) -> TuningResult:
    r"""Pick ``baseline``'s learning rate from ``lrs`` on meta-validation configurations.

    Every rate trains every configuration's task for ``num_steps`` steps; the chosen rate
    minimises the *median over tasks* of the final full training loss (``objective="train"``,
    the learned optimizer's meta-objective) or of the held-out loss (``"valid"``); a diverged
    run counts as ``inf``; ties go to the smaller rate.  The choice is recorded in ``log``,
    which raises before any training if ``configs`` holds a meta-test configuration.

    Cost: ``len(lrs) * len(configs)`` training runs of ``num_steps`` steps.

    Examples:
        >>> from hypergradient.learned import Baseline, SelectionLog, make_splits, tune_baseline
        >>> splits = make_splits(seed=0, num_train=10, num_valid=30, num_test=6)
        >>> valid = [c for c in splits.meta_valid if c.dataset == "digits"][:2]
        >>> log = SelectionLog(splits)
        >>> result = tune_baseline(Baseline("adam", "constant"), [1e-4, 1e-2], valid, 20, log)
        >>> result.baseline.lr, log.selections[0].split
        (0.01, 'meta_valid')
    """
    where = f"tune_baseline({baseline.name})"
    if objective not in ("train", "valid"):
        raise HypergradientError(
            f"{where}: objective must be 'train' or 'valid', got {objective!r}."
        )
    if not lrs:
        raise HypergradientError(f"{where}: lrs must be a non-empty list of learning rates.")
    configs = list(configs)
    log.check(f"{baseline.name}.lr", configs)  # the guard, before any training
    scores = {
        float(lr): evaluate_baseline(
            baseline.with_lr(lr), configs, num_steps, data_dir=data_dir, replicate=replicate
        )
        for lr in sorted(lrs)
    }
    pick = (lambda s: s.train_loss) if objective == "train" else (lambda s: s.heldout_loss)
    medians = {lr: statistics.median(pick(s) for s in runs) for lr, runs in scores.items()}
    best = min(medians, key=lambda lr: (medians[lr], lr))
    evidence = {
        "objective": f"median over tasks of the final {objective} loss",
        "num_steps": num_steps,
        "replicate": replicate,
        "medians": {f"{lr:.6g}": m for lr, m in medians.items()},
    }
    selection = log.record(f"{baseline.name}.lr", best, configs, evidence)
    return TuningResult(baseline.with_lr(best), objective, medians, scores, selection)


# ----------------------------------------------------------------------------------------
# Paired comparison.


@final
@dataclass(frozen=True)
class PairedComparison:
    """Paired wins of ``a`` over ``b`` (lower is better) and their significance.

    Attributes:
        wins, losses, ties: tasks where ``a < b``, ``a > b``, ``a == b``.
        sign_test_p: two-sided exact sign (binomial) test over the non-tied pairs.
        wilcoxon_p: two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``,
            zero differences dropped); ``nan`` with fewer than 2 non-tied pairs.
        median_difference: median of ``a - b``.

    Examples:
        >>> from hypergradient.learned import paired_comparison
        >>> result = paired_comparison([1.0, 1.0, 1.0], [2.0, 3.0, 0.5])
        >>> result.wins, result.losses, result.median_difference
        (2, 1, -1.0)
    """

    wins: int
    losses: int
    ties: int
    sign_test_p: float
    wilcoxon_p: float
    median_difference: float


def sign_test(wins: int, losses: int) -> float:
    r"""Two-sided exact sign test: :math:`p = \min(1, 2\,P[X \le \min(w, l)])`,
    :math:`X \sim \mathrm{Binomial}(w + l, 1/2)` (``scipy.stats.binomtest``'s p-value).

    Examples:
        >>> from hypergradient.learned import sign_test
        >>> round(sign_test(9, 1), 6)  # 2 * (1 + 10) / 2**10
        0.021484
        >>> sign_test(3, 3)
        1.0
    """
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> PairedComparison:
    """Compare paired final losses (one per task; lower is better).

    Examples:
        >>> from hypergradient.learned import paired_comparison
        >>> result = paired_comparison([1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 3.0, 5.0])
        >>> result.wins, result.losses, result.ties, result.sign_test_p
        (3, 0, 1, 0.25)
    """
    if len(a) != len(b) or not a:
        raise HypergradientError(
            f"paired_comparison(a, b): expected two non-empty lists of equal length (one loss "
            f"per task), got lengths {len(a)} and {len(b)}."
        )
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    wins = sum(d < 0 for d in diffs)
    losses = sum(d > 0 for d in diffs)
    ties = len(diffs) - wins - losses
    finite = [d for d in diffs if math.isfinite(d) and d != 0]
    if len(finite) >= 2:
        from scipy.stats import wilcoxon

        wilcoxon_p = float(wilcoxon(finite).pvalue)
    else:
        wilcoxon_p = math.nan
    median = statistics.median(diffs) if all(not math.isnan(d) for d in diffs) else math.nan
    return PairedComparison(wins, losses, ties, sign_test(wins, losses), wilcoxon_p, median)
