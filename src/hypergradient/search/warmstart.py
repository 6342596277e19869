r"""Warm-starting Bayesian optimisation from similar datasets (Kim, Kim, Choi 2017).

A new dataset's search starts where the searches of *similar* datasets ended.  Similarity is
learned: a permutation-invariant network maps a dataset (a set of labelled examples) to a
meta-feature vector :math:`m`, trained so that the Euclidean distance between two datasets'
meta-features matches the distance between their hyperparameter response surfaces,

.. math::

    \mathcal L = \operatorname*{mean}_{i<j}
        \Bigl(\lVert m_i - m_j\rVert_2 - \tfrac{1}{G}\lVert e_i - e_j\rVert_1\Bigr)^2,

where :math:`e_i \in [0, 1]^G` is dataset :math:`i`'s validation error at the :math:`G`
configurations of one *shared* grid (papers.md section 13: :math:`G = 100`, the paper's
:math:`\lVert e_i - e_j\rVert_1 / 100`).  For a new dataset, the best configurations of its
:math:`k` nearest meta-training datasets are enqueued as the first trials of an Optuna study
(:func:`enqueue_warm_start`); the sampler (Optuna's ``GPSampler``, Gaussian-process BO with
log expected improvement) takes over from there.

**The tuned model and the shared grid** (:class:`SurfaceGrid`).  An RBF-SVM on standardised
features, :math:`k(x, x') = \exp(-\gamma \lVert x - x'\rVert^2)`, over a 10 x 10 grid of
:math:`\log_{10} C` and :math:`\log_{10}(\gamma d)` (``d`` the number of features: on
standardised data :math:`\gamma = 1/d` is scikit-learn's ``gamma="scale"``, so one grid
means the same kernel widths for a 4-feature and a 784-feature dataset).  A dataset's
*response surface* is the stratified k-fold cross-validation error at every cell
(:func:`svm_surface`).  The search space is the pair of grid *indices*
(``trial.suggest_int("c_index", 0, 9)``, ``"gamma_index"``), so every trial lands on a cell
and the precomputed surface is the objective.

**Dimension-agnostic instance features** (:func:`instance_features`).  Datasets differ in
their number of features (4 for iris, 64 for digits, 196 for downsampled MNIST), so the
per-example extractor cannot read raw features.  It reads what the RBF kernel reads: the
kernel matrix depends on the data only through the scaled squared distances
:math:`D_{ij} = \lVert \tilde x_i - \tilde x_j\rVert^2 / d` of the standardised examples
:math:`\tilde x` (at grid value :math:`\gamma d = g`, :math:`K_{ij} = e^{-g D_{ij}}`) and
the labels.  Example :math:`i` is described by quantiles (0, 10, 25, 50, 75 %) of
:math:`\log(D_{ij} + 10^{-3})` over the other examples of its own class and over those of the
other class, by the share of its class in the dataset and by its label (:math:`\pm 1`):
``INSTANCE_FEATURES = 12`` numbers, whatever ``d`` is, and invariant to the order of the
features and to shifting or rescaling any of them.  Cost :math:`O(n^2 d)` once per dataset.

**The network** (:class:`MetaFeatureNet`): DeepSets (Zaheer et al. 2017), an MLP
:math:`\phi` per example, the mean over examples, an MLP :math:`\rho`:
:math:`m = \rho(\frac1n \sum_i \phi(f_i))`, invariant to the order of the examples.

**Meta-dataset** (:func:`build_meta_dataset`): binary tasks from scikit-learn's shipped
datasets (digits: the 45 digit pairs; breast_cancer, wine, iris, diabetes: class pairs,
one-vs-rest, thresholds and random subsamples of several sizes) and, when the files are
there, class pairs of MNIST and Fashion-MNIST (2 x 2-pooled 14 x 14 images, a few hundred
rows each).  Each task belongs to a *family* (its source dataset); evaluation holds out
whole families (``train_meta_features(..., exclude_families=...)``), because digit pairs
are more alike than any two datasets a user will bring.

**Baselines** the learned meta-features must beat: the untrained network
(``train_meta_features(..., steps=0)``), and hand-crafted meta-features
(:func:`classical_meta_features`: pymfe's statistical, information-theoretic and
landmarking groups; :func:`classical_warm_starter` makes a :class:`WarmStarter` of them).
:func:`surface_rank_correlation` measures what the Siamese loss trains for on held-out tasks:
how well meta-feature distances rank the meta-training tasks by surface distance.

Requires Optuna for the search part (:func:`enqueue_warm_start`, :func:`surface_search`),
scikit-learn for the surfaces, and pymfe for the classical meta-features
(``pip install "hypergradient[meta-features]"``).
"""

from __future__ import annotations

import itertools
import math
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import HypergradientError

#: numbers per example produced by :func:`instance_features`
INSTANCE_FEATURES = 12
#: distance quantiles per class side (own class, other class)
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75)
#: scikit-learn families and the image families (need ``data_dir``)
SKLEARN_FAMILIES = ("digits", "breast_cancer", "wine", "iris", "diabetes")
IMAGE_FAMILIES = ("mnist", "fashion_mnist")
#: Optuna parameter names of the grid indices
C_PARAM, GAMMA_PARAM = "c_index", "gamma_index"


# ----------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class SurfaceGrid:
    r"""The shared grid of RBF-SVM configurations and how a surface is measured on it.

    Cell ``(i, j)`` is :math:`C = 10^{\texttt{log10\_C}[i]}`,
    :math:`\gamma = 10^{\texttt{log10\_gamma\_d}[j]} / d` for a dataset with ``d`` features.

    Args:
        log10_C: grid values of :math:`\log_{10} C` (default 10 values in [-2, 4]).
        log10_gamma_d: grid values of :math:`\log_{10}(\gamma d)` (default 10 in [-4, 1.5]).
        folds: stratified cross-validation folds per cell.
        seed: the folds' shuffling seed.

    Examples:
        >>> from hypergradient import search
        >>> grid = search.SurfaceGrid()
        >>> grid.shape, grid.size
        ((10, 10), 100)
        >>> grid.params((2, 7))  # what a trial on cell (2, 7) suggests
        {'c_index': 2, 'gamma_index': 7}
        >>> C, gamma = grid.hyperparameters((0, 9), num_features=4)  # 10**-2, 10**1.5 / 4
        >>> round(C, 6), round(gamma, 4)
        (0.01, 7.9057)
    """

    log10_C: tuple[float, ...] = tuple(np.linspace(-2.0, 4.0, 10).tolist())
    log10_gamma_d: tuple[float, ...] = tuple(np.linspace(-4.0, 1.5, 10).tolist())
    folds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("log10_C", "log10_gamma_d"):
            values = getattr(self, name)
            if len(values) < 2 or any(not math.isfinite(v) for v in values):
                raise HypergradientError(
                    f"search.SurfaceGrid({name}={values!r}): expected at least 2 finite values."
                )
        if not isinstance(self.folds, int) or self.folds < 2:
            raise HypergradientError(
                f"search.SurfaceGrid(folds={self.folds!r}): expected an integer >= 2."
            )

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.log10_C), len(self.log10_gamma_d)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def params(self, cell: tuple[int, int]) -> dict[str, int]:
        """The Optuna parameters of grid cell ``(i, j)``."""
        i, j = (int(v) for v in cell)
        if not (0 <= i < self.shape[0] and 0 <= j < self.shape[1]):
            raise HypergradientError(
                f"search.SurfaceGrid.params({cell!r}): cell outside the {self.shape} grid."
            )
        return {C_PARAM: i, GAMMA_PARAM: j}

    def suggest(self, trial) -> tuple[int, int]:
        """Ask ``trial`` for a cell: two integer indices, so every trial is a grid cell."""
        i = trial.suggest_int(C_PARAM, 0, self.shape[0] - 1)
        j = trial.suggest_int(GAMMA_PARAM, 0, self.shape[1] - 1)
        return i, j

    def hyperparameters(self, cell: tuple[int, int], num_features: int) -> tuple[float, float]:
        """``(C, gamma)`` of cell ``(i, j)`` for a dataset with ``num_features`` features."""
        i, j = cell
        return 10.0 ** self.log10_C[i], 10.0 ** self.log10_gamma_d[j] / num_features


def _check_xy(where: str, x: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise HypergradientError(
            f"{where}: expected x of shape (n, d) and y of shape (n,), got {x.shape} and {y.shape}."
        )
    if not np.isfinite(x).all():
        raise HypergradientError(f"{where}: x holds NaN or infinite values.")
    classes = np.unique(y)
    if len(classes) != 2:
        raise HypergradientError(
            f"{where}: expected a binary task (2 classes in y), got {len(classes)} "
            f"({classes[:5].tolist()}...). Make class pairs or one-vs-rest labels first."
        )
    y01 = (y == classes[1]).astype(np.int64)
    if min(y01.sum(), len(y01) - y01.sum()) < 2:
        raise HypergradientError(
            f"{where}: each class needs at least 2 examples, got {np.bincount(y01).tolist()}."
        )
    return x, y01


def _standardise(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)


def svm_surface(x: object, y: object, grid: SurfaceGrid | None = None) -> np.ndarray:
    """The response surface of a binary task: cross-validation error at every grid cell.

    Args:
        x: ``(n, d)`` features; y: ``(n,)`` labels with exactly two classes.
        grid: the shared grid (default :class:`SurfaceGrid`).

    Returns ``(len(log10_C), len(log10_gamma_d))`` errors in [0, 1]: the mean over
    ``grid.folds`` stratified folds of the misclassification rate of standardisation (fitted
    on the training folds) + ``sklearn.svm.SVC(C, gamma)``.  Cost: ``folds x G`` SVM fits.

    Examples:
        Two well separated blobs, on a 2 x 2 grid:

        >>> import numpy as np
        >>> from hypergradient import search
        >>> y = np.repeat([0, 1], 15)
        >>> x = np.random.default_rng(0).normal(size=(30, 2)) + 6.0 * y[:, None]
        >>> grid = search.SurfaceGrid(log10_C=(0.0, 2.0), log10_gamma_d=(-1.0, 0.0))
        >>> errors = search.svm_surface(x, y, grid)
        >>> errors.shape, errors.tolist()
        ((2, 2), [[0.0, 0.0], [0.0, 0.0]])
    """
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    grid = SurfaceGrid() if grid is None else grid
    x, y = _check_xy("search.svm_surface", x, y)
    if np.bincount(y).min() < grid.folds:
        raise HypergradientError(
            f"search.svm_surface: the smaller class has {np.bincount(y).min()} examples, "
            f"fewer than grid.folds={grid.folds}; use fewer folds or a larger task."
        )
    folds = StratifiedKFold(grid.folds, shuffle=True, random_state=grid.seed)
    errors = np.zeros(grid.shape)
    d = x.shape[1]
    for train, test in folds.split(x, y):
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)
        xtr, xte = (x[train] - mean) / std, (x[test] - mean) / std
        for i, j in itertools.product(range(grid.shape[0]), range(grid.shape[1])):
            c, gamma = grid.hyperparameters((i, j), d)
            model = SVC(C=c, gamma=gamma, kernel="rbf").fit(xtr, y[train])
            errors[i, j] += np.mean(model.predict(xte) != y[test]) / grid.folds
    return errors


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True, eq=False)
class Task:
    """One binary dataset of the meta-dataset.

    ``x`` is ``(n, d)`` float64, ``y`` ``(n,)`` in {0, 1}, ``surface`` its
    :func:`svm_surface` on the meta-dataset's grid (``None`` before it is measured).
    """

    name: str
    family: str
    x: np.ndarray
    y: np.ndarray
    surface: np.ndarray | None = None

    def best_cell(self) -> tuple[int, int]:
        """The surface's best cell; ties (easy tasks have plateaus of zero error) go to the
        cell whose 3 x 3 neighbourhood has the lowest mean error: the middle of the plateau,
        which transfers better than its edge."""
        surface = _require_surface("Task.best_cell", self)
        padded = np.pad(surface, 1, mode="edge")
        smooth = sum(
            padded[a : a + surface.shape[0], b : b + surface.shape[1]]
            for a in range(3)
            for b in range(3)
        )
        tied = surface <= surface.min() + 1e-12
        score = np.where(tied, smooth, np.inf)
        i, j = np.unravel_index(int(np.argmin(score)), surface.shape)
        return int(i), int(j)


def _require_surface(where: str, task: Task) -> np.ndarray:
    if task.surface is None:
        raise HypergradientError(
            f"{where}: task {task.name!r} has no surface; build tasks with "
            f"build_meta_dataset(...) or measure it with svm_surface(x, y, grid)."
        )
    return task.surface


@dataclass(frozen=True)
class MetaDataset:
    """Tasks with surfaces on one shared grid.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> from hypergradient.search.warmstart import Task
        >>> x, y = np.random.default_rng(0).normal(size=(20, 3)), np.repeat([0, 1], 10)
        >>> grid = search.SurfaceGrid(log10_C=(0.0, 2.0), log10_gamma_d=(-1.0, 0.0))
        >>> tasks = [Task(name, family, x, y, surface=np.zeros(grid.shape))
        ...          for name, family in [("a1", "a"), ("a2", "a"), ("b1", "b")]]
        >>> meta = search.MetaDataset(tuple(tasks), grid)
        >>> meta.families, [t.name for t in meta.family("a")]
        (('a', 'b'), ['a1', 'a2'])
    """

    tasks: tuple[Task, ...]
    grid: SurfaceGrid

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.family for t in self.tasks))

    def family(self, name: str) -> tuple[Task, ...]:
        return tuple(t for t in self.tasks if t.family == name)


def _subsample(rng: np.random.Generator, x, y, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` rows drawn without replacement, stratified so both classes keep their share."""
    if rows >= len(y):
        return x, y
    keep = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        share = max(3, round(rows * len(members) / len(y)))
        keep.append(rng.choice(members, size=min(share, len(members)), replace=False))
    rows_kept = np.sort(np.concatenate(keep))
    return x[rows_kept], y[rows_kept]


def _pairs_and_rest(name, x, y, classes) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for a, b in itertools.combinations(classes, 2):
        rows = (y == a) | (y == b)
        out.append((f"{name}:{a}v{b}", x[rows], (y[rows] == b).astype(np.int64)))
    for a in classes:
        out.append((f"{name}:{a}vrest", x, (y == a).astype(np.int64)))
    return out


def sklearn_tasks(
    families: Sequence[str] = SKLEARN_FAMILIES,
    *,
    seed: int = 0,
    max_rows: int = 300,
    subsamples: int = 1,
) -> list[Task]:
    """Binary tasks from scikit-learn's shipped datasets (no surfaces yet).

    * ``digits``: the 45 digit pairs of the 8 x 8 digits, each a random subsample of
      60-``max_rows`` rows;
    * ``breast_cancer``: 12 random subsamples of 60-``max_rows`` rows;
    * ``wine``, ``iris``: the 3 class pairs and 3 one-vs-rest tasks, each also as a random
      half (12 tasks each);
    * ``diabetes``: the regression target thresholded at its 30/50/70 % quantiles, each as
      3 random subsamples (9 tasks).

    ``subsamples=r`` multiplies the random subsamples of every family but digits by ``r``
    (breast_cancer ``12 r``, wine and iris ``6 + 6 r``, diabetes ``9 r`` tasks; the 45 digit
    pairs are all there are): more held-out tasks per family for leave-family-out
    evaluation.  The extra tasks come from their own random stream, so ``subsamples=1``
    gives the same tasks whatever ``r`` is used elsewhere, and they come after them.
    """
    from sklearn import datasets

    unknown = [f for f in families if f not in SKLEARN_FAMILIES]
    if unknown or not families:
        raise HypergradientError(
            f"search.sklearn_tasks(families={list(families)!r}): expected a non-empty list "
            f"from {list(SKLEARN_FAMILIES)}."
        )
    if not isinstance(max_rows, int) or max_rows < 60:
        raise HypergradientError(
            f"search.sklearn_tasks(max_rows={max_rows!r}): expected an integer >= 60."
        )
    if not isinstance(subsamples, int) or isinstance(subsamples, bool) or subsamples < 1:
        raise HypergradientError(
            f"search.sklearn_tasks(subsamples={subsamples!r}): expected an integer >= 1."
        )
    rng = np.random.default_rng(seed)
    extra_rng = np.random.default_rng([seed, 1])
    sizes = np.unique(np.geomspace(60, max_rows, 4).round().astype(int))
    tasks = []
    for family in families:
        raw: list[tuple[str, np.ndarray, np.ndarray]] = []
        if family == "digits":
            x, y = datasets.load_digits(return_X_y=True)
            for a, b in itertools.combinations(range(10), 2):
                rows = (y == a) | (y == b)
                pair_y = (y[rows] == b).astype(np.int64)
                xs, ys = _subsample(rng, x[rows], pair_y, int(rng.choice(sizes)))
                raw.append((f"digits:{a}v{b}", xs, ys))
        elif family == "breast_cancer":
            x, y = datasets.load_breast_cancer(return_X_y=True)
            for k in range(12 * subsamples):
                draw = rng if k < 12 else extra_rng
                xs, ys = _subsample(draw, x, y, int(sizes[k % len(sizes)]))
                raw.append((f"breast_cancer:sub{k}", xs, ys))
        elif family in ("wine", "iris"):
            x, y = getattr(datasets, f"load_{family}")(return_X_y=True)
            extra = []
            for name, xs, ys in _pairs_and_rest(family, x, y, np.unique(y)):
                raw.append((name, xs, ys))
                half = _subsample(rng, xs, ys, len(ys) // 2)
                raw.append((f"{name}:half", *half))
                for r in range(1, subsamples):
                    more = _subsample(extra_rng, xs, ys, len(ys) // 2)
                    extra.append((f"{name}:half{r}", *more))
            raw += extra
        else:  # diabetes
            x, target = datasets.load_diabetes(return_X_y=True)
            extra = []
            for q in (0.3, 0.5, 0.7):
                y = (target > np.quantile(target, q)).astype(np.int64)
                for k in range(3 * subsamples):
                    draw = rng if k < 3 else extra_rng
                    xs, ys = _subsample(draw, x, y, int(draw.choice(sizes[1:])))
                    (raw if k < 3 else extra).append((f"diabetes:q{int(q * 100)}:sub{k}", xs, ys))
            raw += extra
        tasks += [Task(name, family, np.asarray(xs, float), ys) for name, xs, ys in raw]
    return tasks


def image_pair_tasks(
    family: str,
    data_dir: str | Path | None = None,
    *,
    pairs: int = 45,
    rows: int = 300,
    seed: int = 0,
) -> list[Task]:
    """Class-pair tasks from MNIST or Fashion-MNIST (``family`` ``"mnist"`` /
    ``"fashion_mnist"``), read with :func:`hypergradient.data.load_mnist` /
    :func:`~hypergradient.data.load_fashion_mnist` from ``data_dir``.

    The images are 2 x 2 average-pooled to 14 x 14 (196 features, pixels in [0, 1]);
    ``pairs`` of the 45 class pairs (a seeded choice) each give one task of ``rows`` rows
    drawn from the first 12,000 training images.
    """
    from ..data import load_fashion_mnist, load_mnist

    if family not in IMAGE_FAMILIES:
        raise HypergradientError(
            f"search.image_pair_tasks(family={family!r}): expected one of {list(IMAGE_FAMILIES)}."
        )
    if not isinstance(pairs, int) or not 1 <= pairs <= 45:
        raise HypergradientError(
            f"search.image_pair_tasks(pairs={pairs!r}): expected an integer in [1, 45]."
        )
    if not isinstance(rows, int) or rows < 20:
        raise HypergradientError(
            f"search.image_pair_tasks(rows={rows!r}): expected an integer >= 20."
        )
    loader = load_mnist if family == "mnist" else load_fashion_mnist
    images, labels = loader(data_dir, split="train", limit=12000)
    pooled = images.double().reshape(-1, 14, 2, 14, 2).mean(dim=(2, 4)) / 255.0
    x_all, y_all = pooled.reshape(len(pooled), -1).numpy(), labels.numpy()
    rng = np.random.default_rng(seed)
    all_pairs = list(itertools.combinations(range(10), 2))
    chosen = sorted(rng.choice(len(all_pairs), size=pairs, replace=False).tolist())
    tasks = []
    for index in chosen:
        a, b = all_pairs[index]
        members = np.flatnonzero((y_all == a) | (y_all == b))
        pick = np.sort(rng.choice(members, size=min(rows, len(members)), replace=False))
        y = (y_all[pick] == b).astype(np.int64)
        tasks.append(Task(f"{family}:{a}v{b}", family, x_all[pick], y))
    return tasks


def build_meta_dataset(
    families: Sequence[str] = SKLEARN_FAMILIES,
    *,
    grid: SurfaceGrid | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    max_rows: int = 300,
    image_pairs: int = 45,
    image_rows: int = 300,
    tasks: Iterable[Task] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MetaDataset:
    """Tasks of the named families, each with its :func:`svm_surface` on ``grid``.

    Args:
        families: from :data:`SKLEARN_FAMILIES` (see :func:`sklearn_tasks`) and
            :data:`IMAGE_FAMILIES` (see :func:`image_pair_tasks`; these read ``data_dir``).
        tasks: tasks to measure instead of the named families (e.g. a subset).
        progress: called as ``progress(done, total)`` after each surface.

    Cost: ``grid.folds x grid.size`` SVM fits per task (about 0.3 s for 300 rows).

    Examples:
        The surfaces of two small tasks of your own, on a 2 x 2 grid:

        >>> import numpy as np
        >>> from hypergradient import search
        >>> from hypergradient.search.warmstart import Task
        >>> rng, y = np.random.default_rng(0), np.repeat([0, 1], 10)
        >>> tasks = [Task(f"shift{k}", "toy", rng.normal(size=(20, 3)) + k * y[:, None], y)
        ...          for k in (1, 3)]
        >>> grid = search.SurfaceGrid(log10_C=(0.0, 2.0), log10_gamma_d=(-1.0, 0.0), folds=2)
        >>> meta = search.build_meta_dataset(tasks=tasks, grid=grid, progress=print)
        1 2
        2 2
        >>> meta.families, meta.tasks[0].surface.shape
        (('toy',), (2, 2))
    """
    grid = SurfaceGrid() if grid is None else grid
    if tasks is None:
        unknown = [f for f in families if f not in SKLEARN_FAMILIES + IMAGE_FAMILIES]
        if unknown or not families:
            raise HypergradientError(
                f"search.build_meta_dataset(families={list(families)!r}): unknown "
                f"{unknown}; expected names from {list(SKLEARN_FAMILIES + IMAGE_FAMILIES)}."
            )
        sk = [f for f in families if f in SKLEARN_FAMILIES]
        todo = sklearn_tasks(sk, seed=seed, max_rows=max_rows) if sk else []
        for family in (f for f in families if f in IMAGE_FAMILIES):
            todo += image_pair_tasks(
                family, data_dir, pairs=image_pairs, rows=image_rows, seed=seed
            )
    else:
        todo = list(tasks)
    measured = []
    for done, task in enumerate(todo, 1):
        surface = svm_surface(task.x, task.y, grid)
        measured.append(Task(task.name, task.family, task.x, task.y, surface))
        if progress is not None:
            progress(done, len(todo))
    if len(measured) < 2:
        raise HypergradientError(
            f"search.build_meta_dataset: got {len(measured)} task(s); a meta-dataset needs "
            f"at least 2."
        )
    return MetaDataset(tuple(measured), grid)


# ----------------------------------------------------------------------------- features


def instance_features(x: object, y: object) -> torch.Tensor:
    r"""Dimension-agnostic features of every example of a binary task.

    With :math:`\tilde x` the standardised features and
    :math:`D_{ij} = \lVert\tilde x_i - \tilde x_j\rVert^2 / d` (what the RBF kernel sees at
    :math:`\gamma = g/d`), example :math:`i` gets: the 0/10/25/50/75 % quantiles of
    :math:`\log(D_{ij} + 10^{-3})` over the other examples of its class, the same over the
    other class, the share of its class, and its label as :math:`\pm 1`.

    Returns ``(n, INSTANCE_FEATURES)`` in the default dtype.  Cost :math:`O(n^2 d)`.

    Examples:
        >>> import numpy as np
        >>> import torch
        >>> from hypergradient import search
        >>> x, y = np.random.default_rng(0).normal(size=(20, 7)), np.repeat([0, 1], 10)
        >>> features = search.instance_features(x, y)
        >>> features.shape, features.dtype
        (torch.Size([20, 12]), torch.float32)
        >>> features[[0, -1], 10:].tolist()  # class share and label (+-1)
        [[0.5, -1.0], [0.5, 1.0]]
        >>> moved = search.instance_features(3.0 * x[:, ::-1] + 5.0, y)  # permuted, rescaled
        >>> bool(torch.allclose(features, moved, rtol=1e-4, atol=1e-5))
        True
    """
    x, y = _check_xy("search.instance_features", x, y)
    z = _standardise(x)
    sq = (z * z).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0) / x.shape[1]
    logd = np.log(dist + 1e-3)
    same = y[:, None] == y[None, :]
    np.fill_diagonal(same, False)
    other = y[:, None] != y[None, :]
    q = np.asarray(QUANTILES)
    rows = np.empty((len(y), INSTANCE_FEATURES))
    share = np.bincount(y, minlength=2)[y] / len(y)
    for i in range(len(y)):
        rows[i, :5] = np.quantile(logd[i, same[i]], q)
        rows[i, 5:10] = np.quantile(logd[i, other[i]], q)
    rows[:, 10] = share
    rows[:, 11] = 2.0 * y - 1.0
    return torch.as_tensor(rows, dtype=torch.get_default_dtype())


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class MetaFeatureNet(nn.Module):
    r"""DeepSets meta-feature extractor :math:`m = \rho(\frac1n\sum_i \phi(f_i))`.

    :math:`\phi`: MLP ``INSTANCE_FEATURES -> hidden -> hidden`` (ReLU) on each example's
    standardised :func:`instance_features` (label included); mean over examples;
    :math:`\rho`: MLP ``hidden -> hidden -> out_features``.

    ``forward(features)`` takes ``(n, F)`` (one dataset) or ``(B, n, F)`` (a batch of
    datasets of equal size) and returns ``(out_features,)`` or ``(B, out_features)``.
    Invariant to the order of the examples (mean pooling).  The input standardisation
    (``shift``, ``scale``) is set from the meta-training examples by
    :func:`train_meta_features`.

    Examples:
        >>> import torch
        >>> from hypergradient import search
        >>> _ = torch.manual_seed(0)
        >>> net = search.MetaFeatureNet(hidden=8, out_features=4)
        >>> features = torch.randn(30, 12)  # 30 examples of one dataset
        >>> net(features).shape, net(torch.randn(5, 30, 12)).shape
        (torch.Size([4]), torch.Size([5, 4]))
        >>> shuffled = features[torch.randperm(30)]  # the order of the examples does not matter
        >>> bool(torch.allclose(net(features), net(shuffled), rtol=1e-4, atol=1e-6))
        True
    """

    def __init__(
        self, in_features: int = INSTANCE_FEATURES, hidden: int = 64, out_features: int = 16
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise HypergradientError(
                    f"search.MetaFeatureNet({name}={value!r}): expected an integer >= 1."
                )
        if not isinstance(out_features, int) or out_features < 1:
            raise HypergradientError(
                f"search.MetaFeatureNet(out_features={out_features!r}): expected an integer >= 1."
            )
        self.in_features = in_features
        self.phi = _mlp([in_features, hidden, hidden])
        self.rho = _mlp([hidden, hidden, out_features])
        self.register_buffer("shift", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim not in (2, 3) or features.shape[-1] != self.in_features:
            raise HypergradientError(
                f"MetaFeatureNet.forward: expected features of shape (n, {self.in_features}) "
                f"or (B, n, {self.in_features}), got {tuple(features.shape)}. Compute them "
                f"with search.instance_features(x, y)."
            )
        if features.shape[-2] == 0:
            raise HypergradientError("MetaFeatureNet.forward: the set of examples is empty.")
        hidden = self.phi((features - self.shift) / self.scale)
        return self.rho(hidden.mean(dim=-2))


def surface_distance(a: np.ndarray, b: np.ndarray) -> float:
    r"""Target distance of two surfaces on one grid: :math:`\frac1G\lVert e_a - e_b\rVert_1`."""
    if np.shape(a) != np.shape(b):
        raise HypergradientError(
            f"search.surface_distance: surfaces of shapes {np.shape(a)} and {np.shape(b)}; "
            f"surfaces are only comparable on one shared grid."
        )
    return float(np.mean(np.abs(np.asarray(a) - np.asarray(b))))


def siamese_loss(meta_features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Mean over pairs :math:`i < j` of :math:`(\lVert m_i - m_j\rVert - t_{ij})^2`.

    ``meta_features`` is ``(T, M)``, ``targets`` the ``(T, T)`` surface distances.  The norm
    is :math:`\sqrt{\lVert\cdot\rVert^2 + 10^{-12}}` (its gradient stays finite when two
    meta-features coincide).
    """
    count = meta_features.shape[0]
    if count < 2 or targets.shape != (count, count):
        raise HypergradientError(
            f"search.siamese_loss: expected (T, M) meta-features with T >= 2 and (T, T) "
            f"targets, got {tuple(meta_features.shape)} and {tuple(targets.shape)}."
        )
    i, j = torch.triu_indices(count, count, offset=1, device=meta_features.device)
    diff = meta_features[i] - meta_features[j]
    dist = torch.sqrt((diff * diff).sum(dim=-1) + 1e-12)
    return ((dist - targets[i, j]) ** 2).mean()


@dataclass(eq=False)
class WarmStarter:
    """Meta-training tasks with their meta-features, and the map that embeds a new task.

    Made by :func:`train_meta_features` (``net`` a trained :class:`MetaFeatureNet`;
    ``steps=0`` gives the untrained network) or by :func:`classical_warm_starter`
    (``net=None`` and ``featurize`` the standardised :func:`classical_meta_features`).
    ``losses`` is the Siamese loss at every training step; ``grid`` the shared grid.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> from hypergradient.search.warmstart import Task
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat([0, 1], 10)
        >>> def toy(k):  # 20 rows, class 1 shifted by k; a random 2 x 2 response surface
        ...     x = rng.normal(size=(20, 3)) + k * y[:, None]
        ...     return Task(f"shift{k}", "toy", x, y, surface=rng.random((2, 2)))
        >>> grid = search.SurfaceGrid(log10_C=(0.0, 2.0), log10_gamma_d=(-1.0, 0.0))
        >>> meta = search.MetaDataset(tuple(toy(k) for k in range(3)), grid)
        >>> starter = search.train_meta_features(meta, steps=5, rows=8, hidden=8, out_features=4)
        >>> starter.embeddings.shape, starter.embed(meta.tasks[1]).shape
        (torch.Size([3, 4]), torch.Size([4]))
        >>> [(task.name, round(dist, 6)) for task, dist in starter.nearest(meta.tasks[1], k=1)]
        [('shift1', 0.0)]
    """

    net: MetaFeatureNet | None
    tasks: tuple[Task, ...]
    embeddings: torch.Tensor
    grid: SurfaceGrid
    losses: list[float] = field(default_factory=list)
    featurize: Callable[[Task | tuple[object, object]], torch.Tensor] | None = None
    feature_cache: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @torch.no_grad()
    def embed(self, task: Task | tuple[object, object]) -> torch.Tensor:
        """The meta-feature vector of a task (or of an ``(x, y)`` pair), all its rows."""
        if self.featurize is not None:
            return self.featurize(task).to(self.embeddings.dtype)
        if self.net is None:
            raise HypergradientError(
                "WarmStarter.embed: the starter has neither a network nor a featurize "
                "function; build it with train_meta_features or classical_warm_starter."
            )
        if isinstance(task, Task):
            features = _cached_instance_features(task, self.feature_cache)
        else:
            features = instance_features(*task)
        return self.net(features.to(self.embeddings.dtype))

    def nearest(self, task: Task | tuple[object, object], k: int = 3) -> list[tuple[Task, float]]:
        """The ``k`` meta-training tasks nearest to ``task`` in meta-feature space, nearest
        first, with their distances."""
        _check_k("WarmStarter.nearest", k, len(self.tasks))
        dist = torch.linalg.vector_norm(self.embeddings - self.embed(task), dim=-1)
        order = torch.argsort(dist, stable=True)[:k]
        return [(self.tasks[int(i)], float(dist[i])) for i in order]


def _cached_instance_features(task: Task, cache: dict[str, torch.Tensor] | None) -> torch.Tensor:
    if cache is None:
        return instance_features(task.x, task.y)
    if task.name not in cache:
        cache[task.name] = instance_features(task.x, task.y)
    return cache[task.name]


def _check_k(where: str, k: object, available: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= available:
        raise HypergradientError(
            f"{where}(k={k!r}): expected an integer in [1, {available}] (the number of "
            f"meta-training tasks)."
        )


def _training_tasks(where: str, meta: object, exclude_families) -> tuple:
    """The tasks of ``meta`` outside ``exclude_families`` (at least 2), or one clear error."""
    if not isinstance(meta, MetaDataset):
        raise HypergradientError(
            f"search.{where}: expected a MetaDataset (from build_meta_dataset), "
            f"got {type(meta).__name__}."
        )
    unknown = [f for f in exclude_families if f not in meta.families]
    if unknown:
        raise HypergradientError(
            f"search.{where}(exclude_families={list(exclude_families)!r}): "
            f"{unknown} not in the meta-dataset's families {list(meta.families)}."
        )
    tasks = tuple(t for t in meta.tasks if t.family not in set(exclude_families))
    if len(tasks) < 2:
        raise HypergradientError(
            f"search.{where}: {len(tasks)} training task(s) left after "
            f"excluding {list(exclude_families)}; need at least 2."
        )
    return tasks


def train_meta_features(
    meta: MetaDataset,
    *,
    exclude_families: Sequence[str] = (),
    steps: int = 400,
    rows: int = 64,
    lr: float = 3e-3,
    hidden: int = 64,
    out_features: int = 16,
    weight_decay: float = 0.0,
    seed: int = 0,
    feature_cache: dict[str, torch.Tensor] | None = None,
) -> WarmStarter:
    """Train a :class:`MetaFeatureNet` with the Siamese loss on ``meta``'s tasks.

    Every step draws ``rows`` examples of every training task (without replacement; with
    replacement for smaller tasks), so the network learns meta-features that do not depend
    on which examples it saw, computes all tasks' meta-features and takes an Adam step on
    :func:`siamese_loss` over all pairs.  Targets are :func:`surface_distance`.  The
    returned :class:`WarmStarter` holds every training task's meta-feature from all its rows.

    Args:
        exclude_families: families left out of training (leave-family-out evaluation).
        steps, rows, lr: Adam steps, examples per task and step, learning rate (cosine
            decay to 0).  ``steps=0`` returns the *untrained* network (its random
            initialisation from ``seed``, inputs standardised as in training): the baseline
            that shows what the Siamese training adds.
        hidden, out_features: widths of :class:`MetaFeatureNet`.
        weight_decay: decoupled weight decay (AdamW; 0 is Adam).
        seed: seeds the initialisation and the rows drawn each step.
        feature_cache: a dict from task name to its :func:`instance_features`, filled on
            first use and read after (repeated trainings on one meta-dataset skip the
            :math:`O(n^2 d)` features; use one dict per meta-dataset, names are the keys).

    Cost per step: ``T x rows`` passes through a 3-layer MLP and ``T^2`` distances.

    Examples:
        Five steps on three toy tasks (a real run: ``steps=400`` on dozens of tasks):

        >>> import numpy as np
        >>> from hypergradient import search
        >>> from hypergradient.search.warmstart import Task
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat([0, 1], 10)
        >>> def toy(k):  # 20 rows, class 1 shifted by k; a random 2 x 2 response surface
        ...     x = rng.normal(size=(20, 3)) + k * y[:, None]
        ...     return Task(f"shift{k}", "toy", x, y, surface=rng.random((2, 2)))
        >>> grid = search.SurfaceGrid(log10_C=(0.0, 2.0), log10_gamma_d=(-1.0, 0.0))
        >>> meta = search.MetaDataset(tuple(toy(k) for k in range(3)), grid)
        >>> starter = search.train_meta_features(meta, steps=5, rows=8, hidden=8, out_features=4)
        >>> len(starter.losses), starter.embeddings.shape  # 5 steps, 3 tasks x 4 meta-features
        (5, torch.Size([3, 4]))
        >>> search.train_meta_features(meta, exclude_families=["toy"])
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: search.train_meta_features: 0 training task(s) ...
    """
    tasks = _training_tasks("train_meta_features", meta, exclude_families)
    for name, value, least in (("steps", steps, 0), ("rows", rows, 2)):
        if not isinstance(value, int) or value < least:
            raise HypergradientError(
                f"search.train_meta_features({name}={value!r}): expected an integer >= {least}."
            )
    if not (isinstance(lr, float | int) and lr > 0):
        raise HypergradientError(f"search.train_meta_features(lr={lr!r}): expected > 0.")
    if not (isinstance(weight_decay, float | int) and weight_decay >= 0):
        raise HypergradientError(
            f"search.train_meta_features(weight_decay={weight_decay!r}): expected >= 0."
        )
    surfaces = [_require_surface("search.train_meta_features", t) for t in tasks]
    shapes = {s.shape for s in surfaces}
    if len(shapes) != 1:
        raise HypergradientError(
            f"search.train_meta_features: surfaces of shapes {sorted(shapes)}; they must "
            f"all be measured on one shared grid."
        )
    dtype = torch.get_default_dtype()
    flat = np.stack([s.ravel() for s in surfaces])
    targets = torch.as_tensor(np.abs(flat[:, None, :] - flat[None, :, :]).mean(-1), dtype=dtype)
    features = [_cached_instance_features(t, feature_cache).to(dtype) for t in tasks]
    stacked = torch.cat(features)
    torch.manual_seed(seed)
    net = MetaFeatureNet(INSTANCE_FEATURES, hidden, out_features).to(dtype)
    net.shift.copy_(stacked.mean(dim=0))
    net.scale.copy_(stacked.std(dim=0).clamp_min(1e-6))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = []
        for f in features:
            if len(f) >= rows:
                pick = torch.randperm(len(f), generator=generator)[:rows]
            else:
                pick = torch.randint(len(f), (rows,), generator=generator)
            batch.append(f[pick])
        loss = siamese_loss(net(torch.stack(batch)), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        embeddings = torch.stack([net(f) for f in features])
    return WarmStarter(
        net.eval(), tasks, embeddings, meta.grid, losses, feature_cache=feature_cache
    )


# ----------------------------------------------------------------------------- baselines

#: pymfe groups of :func:`classical_meta_features` (statistical, information-theoretic,
#: landmarking: the hand-crafted meta-features Kim et al. compare against)
CLASSICAL_GROUPS = ("statistical", "info-theory", "landmarking")


def _import_pymfe():
    try:
        from pymfe.mfe import MFE
    except ImportError as exc:
        raise HypergradientError(
            "search.classical_meta_features needs the pymfe package, which is not installed; "
            'install the extra: pip install "hypergradient[meta-features]" (or pip install '
            f'"pymfe>=0.4"). ({exc})'
        ) from exc
    return MFE


def classical_meta_features(
    x: object,
    y: object,
    groups: Sequence[str] = CLASSICAL_GROUPS,
    *,
    summary: Sequence[str] = ("mean", "sd"),
    max_features: int | None = 32,
    random_state: int = 0,
    return_names: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[str]]:
    r"""Hand-crafted meta-features of a classification dataset, by ``pymfe`` (Alcobaça et
    al. 2020): one fixed-length vector per dataset.

    The default groups are the classical meta-learning descriptors: *statistical*
    (correlations, covariances, canonical correlations, skewness, kurtosis, ...),
    *information-theoretic* (attribute and class entropies, mutual information, noise to
    signal ratio, ...) and *landmarking* (cross-validated accuracy of 1-NN, naive Bayes,
    LDA and decision stumps).  Per-attribute measures are summarised over the attributes
    by ``summary`` (mean and standard deviation).  The length and order of the vector
    depend only on ``groups`` and ``summary`` (75 numbers for the defaults), so vectors of
    datasets of any width compare entry by entry.

    **Missing values.** A measure that is undefined for a dataset (a correlation of a
    constant column, a canonical correlation of a singular problem, an infinite ratio) is
    ``NaN`` in the vector, never ``inf``.  :func:`classical_warm_starter` fills them with
    the meta-training median of that entry (and drops entries that are missing or constant
    on every meta-training task) before standardising.

    Args:
        x: ``(n, d)`` finite features; y: ``(n,)`` labels, at least 2 classes of at least 2
            examples each.
        groups: pymfe groups (default :data:`CLASSICAL_GROUPS`).
        summary: pymfe summary functions over attributes.
        max_features: pymfe's costs grow with the number of attributes (several seconds
            for 200 attributes); wider data sets are described by a seeded random subset
            of ``max_features`` columns (the summaries are means / deviations over
            attributes, which a subset estimates).  ``None`` uses every column.
        random_state: seeds the column subset and pymfe (landmarking folds, attribute
            samples).  numpy's global random state is restored afterwards (pymfe seeds it).
        return_names: also return the entries' names (``"cor.mean"``, ``"one_nn.sd"``, ...).

    Returns:
        ``(F,)`` float64 (and the ``F`` names).  Cost: pymfe's, about 0.1-1 s for a few
        hundred rows and 32 columns; landmarking uses ``min(10, smallest class)`` folds, and
        the information-theoretic attribute-pair concentration samples 6 attributes.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> rng, y = np.random.default_rng(0), np.repeat([0, 1], 20)
        >>> x = rng.normal(size=(40, 5)) + y[:, None]  # class 1 shifted by 1 in every column
        >>> values, names = search.classical_meta_features(
        ...     x, y, groups=["landmarking"], return_names=True
        ... )
        >>> values.shape, names[:2]
        ((14,), ['best_node.mean', 'best_node.sd'])
        >>> bool(values[names.index("linear_discr.mean")] > 0.7)  # LDA separates the classes
        True
        >>> search.classical_meta_features(x, y).shape  # all three groups, any width
        (75,)
    """
    MFE = _import_pymfe()
    where = "search.classical_meta_features"
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise HypergradientError(
            f"{where}: expected x of shape (n, d) and y of shape (n,), got {x.shape} and {y.shape}."
        )
    if not np.isfinite(x).all():
        raise HypergradientError(
            f"{where}: x holds NaN or infinite values; impute or drop them first."
        )
    _, counts = np.unique(y, return_counts=True)
    if len(counts) < 2 or counts.min() < 2:
        raise HypergradientError(
            f"{where}: expected at least 2 classes with at least 2 examples each, got class "
            f"counts {counts.tolist()}."
        )
    groups = [groups] if isinstance(groups, str) else list(groups)
    valid = MFE.valid_groups()
    if not groups or any(g not in valid for g in groups):
        raise HypergradientError(
            f"{where}(groups={groups!r}): expected a non-empty list from pymfe's groups "
            f"{list(valid)} (default {list(CLASSICAL_GROUPS)})."
        )
    if max_features is not None and (not isinstance(max_features, int) or max_features < 1):
        raise HypergradientError(
            f"{where}(max_features={max_features!r}): expected None or an integer >= 1."
        )
    if max_features is not None and x.shape[1] > max_features:
        rng = np.random.default_rng(random_state)
        x = x[:, np.sort(rng.choice(x.shape[1], size=max_features, replace=False))]
    extract_args: dict[str, dict[str, Any]] = {}
    if "info-theory" in groups:
        extract_args["attr_conc"] = {"max_attr_num": 6}
    mfe = MFE(
        groups=groups,
        summary=list(summary),
        num_cv_folds=int(min(10, counts.min())),
        random_state=random_state,
    )
    numpy_state = np.random.get_state()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            mfe.fit(x, y, suppress_warnings=True)
            names, values = mfe.extract(suppress_warnings=True, **extract_args)
    finally:
        np.random.set_state(numpy_state)
    values = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    return (values, list(names)) if return_names else values


def _signed_log(values: np.ndarray) -> np.ndarray:
    """``sign(v) log(1 + |v|)``: keeps the order, tames entries that span decades
    (covariances and eigenvalues are in the data's units)."""
    return np.sign(values) * np.log1p(np.abs(values))


def classical_warm_starter(
    meta: MetaDataset,
    *,
    exclude_families: Sequence[str] = (),
    groups: Sequence[str] = CLASSICAL_GROUPS,
    features: dict[str, np.ndarray] | None = None,
    random_state: int = 0,
) -> WarmStarter:
    r"""A :class:`WarmStarter` whose meta-features are :func:`classical_meta_features`.

    Every entry :math:`v` becomes :math:`\operatorname{sign}(v)\log(1 + |v|)`; a missing
    entry gets the meta-training tasks' median; entries missing or constant on every
    meta-training task are dropped; the rest is standardised with the meta-training mean
    and standard deviation, so every kept entry weighs alike in the Euclidean distance
    used by :meth:`WarmStarter.nearest` and :func:`warm_start_configs`.  Nothing is
    learned from the response surfaces: this is the hand-crafted baseline the learned
    meta-features must beat.

    Args:
        meta: the meta-dataset; ``exclude_families`` as in :func:`train_meta_features`.
        groups: pymfe groups (see :func:`classical_meta_features`).
        features: raw vectors by task name (e.g. computed once for many starters); any task,
            meta-training or new, whose name is there is not measured again.  Missing
            names are measured and added.
        random_state: passed to :func:`classical_meta_features`.

    Cost: one :func:`classical_meta_features` per meta-training task not in ``features``.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> from hypergradient.search.warmstart import Task
        >>> rng, y = np.random.default_rng(0), np.repeat([0, 1], 20)
        >>> def toy(k):  # class 1 shifted by k: easier as k grows; a made-up surface
        ...     x = rng.normal(size=(40, 4)) + k * y[:, None]
        ...     return Task(f"shift{k}", "toy", x, y, surface=np.full((2, 2), 1.0 / (1 + k)))
        >>> grid = search.SurfaceGrid(log10_C=(0.0, 2.0), log10_gamma_d=(-1.0, 0.0))
        >>> meta = search.MetaDataset(tuple(toy(k) for k in (0, 1, 4)), grid)
        >>> starter = search.classical_warm_starter(meta, groups=["statistical"])
        >>> starter.embeddings.shape[0], starter.net is None
        (3, True)
        >>> new = (rng.normal(size=(40, 6)) + 4 * y[:, None], y)  # well separated, like shift4
        >>> starter.nearest(new, k=1)[0][0].name
        'shift4'
    """
    tasks = _training_tasks("classical_warm_starter", meta, exclude_families)
    cache = {} if features is None else features
    groups = list(groups)

    def raw(task: Task | tuple[object, object]) -> np.ndarray:
        if isinstance(task, Task) and task.name in cache:
            return np.asarray(cache[task.name], dtype=np.float64)
        x, y = (task.x, task.y) if isinstance(task, Task) else task
        values = classical_meta_features(x, y, groups, random_state=random_state)
        if isinstance(task, Task):
            cache[task.name] = values
        return values

    table = _signed_log(np.stack([raw(t) for t in tasks]))
    lengths = {len(row) for row in table}
    if len(lengths) != 1:  # pragma: no cover - guarded by classical_meta_features
        raise HypergradientError("search.classical_warm_starter: vectors of unequal lengths.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: dropped below
        median = np.nanmedian(table, axis=0)
    filled = np.where(np.isnan(table), median, table)
    mean, std = filled.mean(axis=0), filled.std(axis=0)
    keep = np.isfinite(median) & (std > 1e-9)
    if not keep.any():
        raise HypergradientError(
            "search.classical_warm_starter: every meta-feature is missing or constant on the "
            "meta-training tasks; use more varied tasks or other groups."
        )
    dtype = torch.get_default_dtype()

    def standardise(values: np.ndarray) -> torch.Tensor:
        values = _signed_log(values)
        values = np.where(np.isnan(values), median, values)
        return torch.as_tensor((values[keep] - mean[keep]) / std[keep], dtype=dtype)

    def featurize(task: Task | tuple[object, object]) -> torch.Tensor:
        return standardise(raw(task))

    embeddings = torch.stack([standardise(raw(t)) for t in tasks])
    return WarmStarter(None, tasks, embeddings, meta.grid, featurize=featurize)


def surface_rank_correlation(starter: WarmStarter, tasks: Sequence[Task]) -> float:
    r"""How well meta-feature distances order surface distances, for tasks new to ``starter``.

    Over every pair (``task``, meta-training task :math:`j`), Spearman's rank correlation
    between :math:`\lVert m(\text{task}) - m_j\rVert_2` and the surface distance
    :math:`\frac1G\lVert e_{\text{task}} - e_j\rVert_1`.  1: the meta-features rank every
    meta-training task exactly by how alike its response surface is; 0: no better than
    chance.  This is what the Siamese loss trains for, measured on tasks it never saw.

    Cost: one :meth:`WarmStarter.embed` per task and ``len(tasks) x T`` distances.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> from hypergradient.search.warmstart import Task
        >>> y = np.repeat([0, 1], 20)
        >>> def toy(k, seed):  # class 1 shifted by k; the surface follows the shift
        ...     x = np.random.default_rng(seed).normal(size=(40, 3)) + k * y[:, None]
        ...     return Task(f"s{k}", "toy", x, y, surface=np.full((2, 2), 1.0 / (1 + k)))
        >>> grid = search.SurfaceGrid(log10_C=(0.0, 2.0), log10_gamma_d=(-1.0, 0.0))
        >>> meta = search.MetaDataset(tuple(toy(k, k) for k in (0, 1, 2, 4, 8)), grid)
        >>> starter = search.classical_warm_starter(meta, groups=["statistical"])
        >>> held = [toy(k, 10 + i) for i, k in enumerate((0.5, 3, 6))]
        >>> bool(search.surface_rank_correlation(starter, held) > 0.5)
        True
    """
    from scipy.stats import spearmanr

    if not isinstance(starter, WarmStarter):
        raise HypergradientError(
            f"search.surface_rank_correlation: expected a WarmStarter, got "
            f"{type(starter).__name__}."
        )
    tasks = list(tasks)
    if not tasks:
        raise HypergradientError("search.surface_rank_correlation: expected at least 1 task.")
    embedded = torch.stack([starter.embed(t) for t in tasks])
    meta_dist = torch.cdist(embedded, starter.embeddings).numpy().ravel()
    surf_dist = np.array(
        [
            surface_distance(_require_surface("search.surface_rank_correlation", t), s.surface)
            for t in tasks
            for s in starter.tasks
        ]
    )
    return float(spearmanr(meta_dist, surf_dist).statistic)


# ----------------------------------------------------------------------------- search


def warm_start_configs(
    starter: WarmStarter, task: Task | tuple[object, object], k: int = 3
) -> list[dict[str, int]]:
    """The first ``k`` trials for ``task``: the best cells of its nearest meta-training tasks.

    Neighbours are visited nearest first; each contributes its :meth:`Task.best_cell` unless
    an earlier one already did (then the next neighbour is asked), so the ``k`` configs are
    distinct (fewer than ``k`` only if all training tasks together have fewer distinct best
    cells).  Returns Optuna parameter dicts (``{"c_index": i, "gamma_index": j}``) for
    :func:`enqueue_warm_start`.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> from hypergradient.search.warmstart import Task
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat([0, 1], 10)
        >>> def toy(k):  # 20 rows, class 1 shifted by k; a random 2 x 2 response surface
        ...     x = rng.normal(size=(20, 3)) + k * y[:, None]
        ...     return Task(f"shift{k}", "toy", x, y, surface=rng.random((2, 2)))
        >>> grid = search.SurfaceGrid(log10_C=(0.0, 2.0), log10_gamma_d=(-1.0, 0.0))
        >>> meta = search.MetaDataset(tuple(toy(k) for k in range(3)), grid)
        >>> starter = search.train_meta_features(meta, steps=5, rows=8, hidden=8, out_features=4)
        >>> new = (rng.normal(size=(20, 5)) + 2 * y[:, None], y)  # a dataset not trained on
        >>> configs = search.warm_start_configs(starter, new, k=2)
        >>> best = [grid.params(t.best_cell()) for t in meta.tasks]
        >>> len(configs), all(c in best for c in configs)  # neighbours' best cells
        (2, True)
    """
    if not isinstance(starter, WarmStarter):
        raise HypergradientError(
            f"search.warm_start_configs: expected a WarmStarter (from train_meta_features), "
            f"got {type(starter).__name__}."
        )
    _check_k("search.warm_start_configs", k, len(starter.tasks))
    cells: list[tuple[int, int]] = []
    for neighbour, _ in starter.nearest(task, len(starter.tasks)):
        cell = neighbour.best_cell()
        if cell not in cells:
            cells.append(cell)
        if len(cells) == k:
            break
    return [starter.grid.params(cell) for cell in cells]


def enqueue_warm_start(study, configs: Sequence[dict[str, Any]]) -> int:
    """Enqueue ``configs`` as the study's next trials, in order (``study.enqueue_trial``);
    the sampler proposes only after they have run.  Returns how many were enqueued.

    Examples:
        >>> import optuna
        >>> from hypergradient import search
        >>> study = optuna.create_study()
        >>> configs = [{"c_index": 4, "gamma_index": 2}, {"c_index": 6, "gamma_index": 3}]
        >>> search.enqueue_warm_start(study, configs)
        2
        >>> grid = search.SurfaceGrid()
        >>> study.optimize(lambda trial: sum(grid.suggest(trial)), n_trials=2)
        >>> [t.params for t in study.trials] == configs
        True
    """
    if isinstance(configs, dict) or not isinstance(configs, Sequence) or not configs:
        raise HypergradientError(
            f"search.enqueue_warm_start: expected a non-empty list of parameter dicts "
            f"(e.g. from warm_start_configs), got {configs!r}."
        )
    for config in configs:
        named = isinstance(config, dict) and all(isinstance(k, str) for k in config)
        if not named or not config:
            raise HypergradientError(
                f"search.enqueue_warm_start: every config must be a non-empty dict of "
                f"parameter name -> value, got {config!r}."
            )
    for config in configs:
        study.enqueue_trial(dict(config))
    return len(configs)


def gp_sampler(*, seed: int | None = 0, startup_trials: int = 3):
    """Optuna's ``GPSampler`` (GP regression + log expected improvement; the objective is
    marked deterministic), or multivariate TPE when the installed Optuna has no
    ``GPSampler`` (before 3.6).  ``startup_trials`` random trials come first; enqueued trials
    count among them.

    Examples:
        >>> import optuna
        >>> from hypergradient import search
        >>> sampler = search.gp_sampler(seed=0, startup_trials=3)
        >>> type(sampler).__name__
        'GPSampler'
        >>> study = optuna.create_study(sampler=sampler)
        >>> study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=3)
        >>> len(study.trials)
        3
    """
    import optuna

    if not isinstance(startup_trials, int) or startup_trials < 1:
        raise HypergradientError(
            f"search.gp_sampler(startup_trials={startup_trials!r}): expected an integer >= 1."
        )
    samplers = optuna.samplers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(samplers, "GPSampler"):
            return samplers.GPSampler(
                seed=seed, n_startup_trials=startup_trials, deterministic_objective=True
            )
        return samplers.TPESampler(  # pragma: no cover - Optuna < 3.6
            seed=seed, n_startup_trials=startup_trials, multivariate=True
        )


def surface_search(
    surface: np.ndarray,
    grid: SurfaceGrid,
    *,
    warm_start: Sequence[dict[str, int]] = (),
    n_trials: int = 20,
    seed: int = 0,
    startup_trials: int = 3,
    storage: str | None = None,
) -> np.ndarray:
    """Bayesian optimisation of a precomputed surface; returns the best error so far after
    each of the ``n_trials`` evaluations.

    The sampler is :func:`gp_sampler`; ``warm_start`` configs are enqueued first
    (:func:`enqueue_warm_start`); without them the first ``startup_trials`` trials are
    random (the cold start).  Every trial counts as an evaluation, repeats included.  The
    study lives in Optuna's in-memory storage (``storage=None``: about 40% faster than
    SQLite for these 0-cost objectives) or, given a database URL, in
    :func:`~hypergradient.search.create_study` with the worker loop
    :func:`~hypergradient.search.optimize`.

    Examples:
        A 2 x 2 surface whose best cell is ``(1, 0)``, warm-started there:

        >>> import numpy as np
        >>> from hypergradient import search
        >>> grid = search.SurfaceGrid(log10_C=(0.0, 2.0), log10_gamma_d=(-1.0, 0.0))
        >>> surface = np.array([[0.3, 0.2], [0.1, 0.4]])
        >>> warm = [{"c_index": 1, "gamma_index": 0}]
        >>> search.surface_search(surface, grid, warm_start=warm, n_trials=3).tolist()
        [0.1, 0.1, 0.1]
    """
    import optuna

    from .study import create_study, optimize

    surface = np.asarray(surface, dtype=float)
    if surface.shape != grid.shape:
        raise HypergradientError(
            f"search.surface_search: surface of shape {surface.shape} does not match the "
            f"grid's {grid.shape}."
        )
    if not isinstance(n_trials, int) or n_trials < 1:
        raise HypergradientError(
            f"search.surface_search(n_trials={n_trials!r}): expected an integer >= 1."
        )
    sampler = gp_sampler(seed=seed, startup_trials=startup_trials)
    if storage is None:
        study = optuna.create_study(sampler=sampler)
    else:
        study = create_study(f"warmstart-{uuid.uuid4().hex}", storage=storage, sampler=sampler)
    if warm_start:
        enqueue_warm_start(study, warm_start)

    def objective(trial: optuna.Trial) -> float:
        return float(surface[grid.suggest(trial)])

    if storage is None:
        study.optimize(objective, n_trials=n_trials)
        trials = study.trials
    else:
        trials = optimize(study, objective, n_trials=n_trials)
    values = np.array([t.value for t in trials[:n_trials]])
    return np.minimum.accumulate(values)


def normalised_regret(best_so_far: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """``(best_so_far - min) / (max - min)`` of the surface (0 where the surface is flat)."""
    low, high = float(np.min(surface)), float(np.max(surface))
    span = high - low
    if span <= 0:
        return np.zeros_like(np.asarray(best_so_far, dtype=float))
    return (np.asarray(best_so_far, dtype=float) - low) / span
