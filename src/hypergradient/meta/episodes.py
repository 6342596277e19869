r"""Few-shot episodes: task families to meta-train on and the data they are drawn from.

An *episode* (a task) is a small supervised problem split in two: the learner adapts on the
support set and is scored on the query set,

.. math::

    \mathcal{T} = \big(\{(x_i, y_i)\}_{i \le n_s},\ \{(x'_j, y'_j)\}_{j \le n_q}\big).

For N-way K-shot classification the support set holds K examples of each of N classes drawn
from a pool of classes, labelled ``0..N-1`` in a random order, and the query set holds
``queries`` further examples of each of the same classes.

Task families (all draw from a caller's ``torch.Generator``, so a seed fixes every episode):

* :class:`ClassificationTasks` -- N-way K-shot episodes over a ``(classes, examples, ...)``
  image tensor; :func:`omniglot_tasks` builds the meta-training and held-out families from
  Omniglot's background alphabets (held-out alphabets never seen in meta-training; classes of
  the training alphabets multiplied by 4 with rotations by multiples of 90 degrees, as in
  Santoro et al. 2016 and Finn et al. 2017), and :func:`omniglot_one_shot_runs` returns the
  20 official 20-way 1-shot runs of Lake et al. (2015) as episodes.
* :class:`SinusoidTasks` -- :math:`y = A \sin(x - \varphi)` with random amplitude and phase
  (the regression benchmark of Finn et al. 2017).
* :class:`LinearTasks` -- :math:`y = x^\top w + \sigma\varepsilon` with
  :math:`w = \mu + s\,\mathcal N(0, I)` (the iMAML check of Rajeswaran et al. 2019).

:func:`nearest_neighbour_predict` is the no-learning baseline: each query gets the label
(or target) of its nearest support example in raw input space.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .._errors import HypergradientError
from ..data import load_omniglot, load_omniglot_runs

__all__ = [
    "DEFAULT_HELDOUT_ALPHABETS",
    "AbstractTaskFamily",
    "ClassificationTasks",
    "Episode",
    "LinearTasks",
    "SinusoidTasks",
    "nearest_neighbour_predict",
    "omniglot_one_shot_runs",
    "omniglot_tasks",
    "with_rotations",
]

# Alphabets of the two small background sets (8 in all, Greek and Latin are in both) kept
# out of meta-training: 47 + 40 characters, unseen in meta-training.
DEFAULT_HELDOUT_ALPHABETS = ("Japanese_(katakana)", "Korean")
"""The Omniglot alphabets :func:`omniglot_tasks` keeps out of meta-training by default.

Their 87 characters form the held-out task family; the other 6 alphabets of the two small
background sets are for meta-training.

Examples:
    >>> import hypergradient as hg
    >>> hg.meta.DEFAULT_HELDOUT_ALPHABETS
    ('Japanese_(katakana)', 'Korean')
"""


class Episode(NamedTuple):
    """One task: a support set to adapt on and a query set to score the adapted model on.

    Classification: ``x_*`` of shape ``(n, *input_shape)``, ``y_*`` ``int64`` labels in
    ``0..ways-1`` of shape ``(n,)``.  Regression: ``y_*`` floating, shape ``(n, outputs)``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> ep = hg.meta.Episode(torch.zeros(3, 2), torch.tensor([0, 1, 2]),
        ...                      torch.zeros(6, 2), torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> ep.ways
        3
        >>> ep64 = ep.to(dtype=torch.float64)  # labels stay int64
        >>> ep64.x_query.dtype, ep64.y_query.dtype
        (torch.float64, torch.int64)
    """

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    @property
    def ways(self) -> int | None:
        """Number of classes of a classification episode (``None`` for regression)."""
        if self.y_support.is_floating_point():
            return None
        return int(self.y_support.max()) + 1

    def to(self, device=None, dtype=None) -> Episode:
        """The episode on ``device``; floating tensors (inputs, regression targets) in ``dtype``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Episode(*(move(t) for t in self))


class AbstractTaskFamily(abc.ABC):
    """A distribution over episodes.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> class Doubling(hg.meta.AbstractTaskFamily):  # y = 2 x, 2 support + 2 query points
        ...     def sample(self, generator):
        ...         x = torch.rand(4, 1, generator=generator)
        ...         return hg.meta.Episode(x[:2], 2 * x[:2], x[2:], 2 * x[2:])
        >>> batch = Doubling().sample_batch(3, torch.Generator().manual_seed(0))
        >>> len(batch), batch[0].x_support.shape, batch[0].ways
        (3, torch.Size([2, 1]), None)
    """

    @abc.abstractmethod
    def sample(self, generator: torch.Generator) -> Episode:
        """Draw one episode; every random choice comes from ``generator`` (a CPU generator),
        so the same generator state gives the same episode."""

    def sample_batch(self, size: int, generator: torch.Generator) -> list[Episode]:
        """``size`` episodes drawn one after the other from ``generator``."""
        _check_int("sample_batch", "size", size, 1)
        return [self.sample(generator) for _ in range(size)]


# ----------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class ClassificationTasks(AbstractTaskFamily):
    """N-way K-shot episodes over a pool of classes.

    Each episode draws ``ways`` distinct classes uniformly, then ``shots + queries`` distinct
    examples of each; the classes get the labels ``0..ways-1`` in the (random) order drawn.
    Support and query sets are ordered class by class.

    Args:
        images: ``(classes, examples_per_class, *input_shape)`` floating tensor.
        ways: N, classes per episode (``2 <= ways <= classes``).
        shots: K, support examples per class (``>= 1``).
        queries: query examples per class (``>= 1``; ``shots + queries <= examples``).

    Examples:
        >>> import torch
        >>> pool = torch.arange(6 * 4 * 2, dtype=torch.float32).reshape(6, 4, 2)
        >>> tasks = ClassificationTasks(pool, ways=3, shots=1, queries=2)
        >>> ep = tasks.sample(torch.Generator().manual_seed(0))
        >>> ep.x_support.shape, ep.x_query.shape, ep.y_query.tolist()
        (torch.Size([3, 2]), torch.Size([6, 2]), [0, 0, 1, 1, 2, 2])
    """

    images: torch.Tensor
    ways: int
    shots: int
    queries: int

    def __post_init__(self) -> None:
        where = "hypergradient.meta.ClassificationTasks(...)"
        if not isinstance(self.images, torch.Tensor) or self.images.dim() < 3:
            got = (
                f"shape {tuple(self.images.shape)}"
                if isinstance(self.images, torch.Tensor)
                else type(self.images).__name__
            )
            raise HypergradientError(
                f"{where}: images must be a tensor of shape (classes, examples_per_class, "
                f"*input_shape), got {got}."
            )
        if not self.images.is_floating_point():
            raise HypergradientError(
                f"{where}: images has dtype {self.images.dtype}; expected a floating dtype "
                f"(scale uint8 pixels with images.float() / 255)."
            )
        classes, examples = self.images.shape[:2]
        _check_int(where, "ways", self.ways, 2)
        _check_int(where, "shots", self.shots, 1)
        _check_int(where, "queries", self.queries, 1)
        if self.ways > classes:
            raise HypergradientError(
                f"{where}: ways={self.ways} but the pool has only {classes} classes; lower ways."
            )
        if self.shots + self.queries > examples:
            raise HypergradientError(
                f"{where}: shots + queries = {self.shots + self.queries} but every class has "
                f"only {examples} examples; lower shots or queries."
            )

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    def sample(self, generator: torch.Generator) -> Episode:
        classes = torch.randperm(self.num_classes, generator=generator)[: self.ways]
        per_class = self.shots + self.queries
        picks = torch.stack(
            [
                torch.randperm(self.images.shape[1], generator=generator)[:per_class]
                for _ in range(self.ways)
            ]
        )
        chosen = self.images[classes[:, None], picks]  # (ways, shots + queries, *shape)
        shape = self.images.shape[2:]
        labels = torch.arange(self.ways)
        return Episode(
            chosen[:, : self.shots].reshape(-1, *shape),
            labels.repeat_interleave(self.shots),
            chosen[:, self.shots :].reshape(-1, *shape),
            labels.repeat_interleave(self.queries),
        )


def with_rotations(images: torch.Tensor, rotations: int = 4) -> torch.Tensor:
    """Every class also rotated by 90, 180, ... degrees, as a class of its own.

    ``images`` is ``(classes, examples, ..., H, W)`` with ``H == W``; the result is
    ``(rotations * classes, examples, ..., H, W)``: first the originals, then all classes
    rotated by 90 degrees, and so on.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> images = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 2, 2)  # 1 class
        >>> rotated = hg.meta.with_rotations(images)
        >>> rotated.shape
        torch.Size([4, 1, 2, 2])
        >>> rotated[1, 0].tolist()  # the class rotated by 90 degrees (counter-clockwise)
        [[1.0, 3.0], [0.0, 2.0]]
    """
    where = "hypergradient.meta.with_rotations(...)"
    _check_int(where, "rotations", rotations, 1)
    if rotations > 4:
        raise HypergradientError(f"{where}: rotations must be in 1..4, got {rotations}.")
    if images.dim() < 4 or images.shape[-1] != images.shape[-2]:
        raise HypergradientError(
            f"{where}: images must be (classes, examples, ..., H, W) with square images, got "
            f"shape {tuple(images.shape)}."
        )
    return torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(rotations)])


def _omniglot_characters(data_dir, size: int, download: bool):
    """Characters of both small background sets: ``(images (C, 20, size, size) uint8,
    alphabet name of each character)``.  Greek and Latin are in both sets (with identical
    images); they are kept once."""
    images, alphabets = [], []
    seen: set[str] = set()
    for subset in ("background_small1", "background_small2"):
        data = load_omniglot(data_dir, subset=subset, size=size, download=download)
        new = [a for a in data.alphabet_names if a not in seen]
        for alphabet in new:
            index = data.alphabet_names.index(alphabet)
            mask = data.alphabets == index
            chars = data.characters[mask]
            drawers = data.drawers[mask]
            block = data.images[mask]
            for c in chars.unique().tolist():
                rows = (chars == c).nonzero().squeeze(1)
                order = drawers[rows].argsort()
                images.append(block[rows[order]])
                alphabets.append(alphabet)
        seen.update(new)
    return torch.stack(images), alphabets


def omniglot_tasks(
    data_dir: str | Path | None = None,
    *,
    ways: int = 5,
    shots: int = 1,
    queries: int = 5,
    size: int = 28,
    heldout_alphabets: Sequence[str] = DEFAULT_HELDOUT_ALPHABETS,
    rotate: bool = True,
    download: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[ClassificationTasks, ClassificationTasks]:
    """Meta-training and held-out N-way K-shot task families from Omniglot.

    Reads ``images_background_small1.zip`` and ``images_background_small2.zip`` from
    ``data_dir/omniglot/`` (see :func:`hypergradient.data.load_omniglot`): 8 alphabets,
    242 characters, 20 drawings of each.  The characters of ``heldout_alphabets`` form the
    held-out family; all others are for meta-training, where ``rotate`` adds each character
    rotated by 90, 180 and 270 degrees as three more classes (4x the classes).  Held-out
    classes are not rotated.

    Images are ``(1, size, size)`` with ink 1 on background 0, in ``dtype``.

    Returns:
        ``(train, heldout)`` :class:`ClassificationTasks` with the given ways/shots/queries.

    Raises:
        HypergradientError: a missing or damaged file (the loader's message), an unknown
            alphabet name, or too few classes for ``ways``.

    Examples:
        Without the two zips (and without ``download=True``) the loader's error says what
        to fetch:

        >>> import tempfile
        >>> import hypergradient as hg
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +ELLIPSIS
        ...     train, heldout = hg.meta.omniglot_tasks(d, ways=5, shots=1, queries=5)
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: load_omniglot: the folder .../omniglot lacks 1 ...
          images_background_small1.zip  (md5 e704a628b5459e08445c13499850abc4, from https://...)
        Pass download=True ...

        With them, ``train.sample(generator)`` gives an :class:`Episode` with ``x_support``
        of shape ``(5, 1, 28, 28)`` and ``x_query`` of shape ``(25, 1, 28, 28)``.
    """
    where = "hypergradient.meta.omniglot_tasks(...)"
    if isinstance(heldout_alphabets, str):
        heldout_alphabets = (heldout_alphabets,)
    images, alphabets = _omniglot_characters(data_dir, size, download)
    unknown = sorted(set(heldout_alphabets) - set(alphabets))
    if unknown:
        raise HypergradientError(
            f"{where}: heldout_alphabets {unknown} are not in the background sets; choose from "
            f"{sorted(set(alphabets))}."
        )
    heldout_mask = torch.tensor([a in heldout_alphabets for a in alphabets])
    if bool(heldout_mask.all()) or not bool(heldout_mask.any()):
        raise HypergradientError(
            f"{where}: heldout_alphabets={list(heldout_alphabets)} leaves "
            f"{'no' if heldout_mask.all() else 'every'} alphabet for meta-training; hold out "
            f"some but not all of {sorted(set(alphabets))}."
        )
    pixels = images.to(dtype)[:, :, None] / 255.0  # (C, 20, 1, size, size)
    train_images = pixels[~heldout_mask]
    if rotate:
        train_images = with_rotations(train_images)
    return (
        ClassificationTasks(train_images, ways, shots, queries),
        ClassificationTasks(pixels[heldout_mask], ways, shots, queries),
    )


def omniglot_one_shot_runs(
    data_dir: str | Path | None = None,
    *,
    size: int = 28,
    download: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[Episode]:
    """The 20 official 20-way 1-shot runs of Lake et al. (2015) as episodes.

    Support: the run's 20 training images labelled ``0..19``; query: its 20 test images
    labelled with the training image of the same character.  The characters come from
    Omniglot's evaluation alphabets, none of which is in the background sets.  Images as in
    :func:`omniglot_tasks`.

    Examples:
        Without ``all_runs.zip`` (and without ``download=True``) the loader's error says
        what to fetch:

        >>> import tempfile
        >>> import hypergradient as hg
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +ELLIPSIS
        ...     runs = hg.meta.omniglot_one_shot_runs(d)
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: load_omniglot_runs: the folder .../omniglot ...
          all_runs.zip  (md5 e8996daecdf12afeeb4a53a179f06b19, from https://...)
        Pass download=True ...

        With it, ``len(runs)`` is 20 and every run's ``x_support`` is ``(20, 1, 28, 28)``.
    """
    episodes = []
    for run in load_omniglot_runs(data_dir, size=size, download=download):
        episodes.append(
            Episode(
                run.train_images.to(dtype)[:, None] / 255.0,
                torch.arange(run.train_images.shape[0]),
                run.test_images.to(dtype)[:, None] / 255.0,
                run.targets.clone(),
            )
        )
    return episodes


# ----------------------------------------------------------------------------- regression


def _uniform(generator, low: float, high: float, dtype, shape=()) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64).to(
        dtype
    )


@dataclass(frozen=True)
class SinusoidTasks(AbstractTaskFamily):
    r"""Sine-wave regression: :math:`y = A \sin(x - \varphi)`, :math:`A \sim U[a_0, a_1]`,
    :math:`\varphi \sim U[\varphi_0, \varphi_1]`, inputs :math:`x \sim U[x_0, x_1]`.

    Episodes have ``shots`` support and ``queries`` query points, ``x`` and ``y`` of shape
    ``(n, 1)``.  Defaults as in Finn et al. (2017): amplitude in [0.1, 5], phase in
    [0, pi], x in [-5, 5].

    Examples:
        >>> import torch
        >>> ep = SinusoidTasks(shots=5, queries=3).sample(torch.Generator().manual_seed(0))
        >>> ep.x_support.shape, ep.y_query.shape, ep.ways
        (torch.Size([5, 1]), torch.Size([3, 1]), None)
    """

    shots: int = 10
    queries: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        where = "hypergradient.meta.SinusoidTasks(...)"
        _check_int(where, "shots", self.shots, 1)
        _check_int(where, "queries", self.queries, 1)
        for name in ("amplitude", "phase", "x_range"):
            _check_interval(where, name, getattr(self, name))

    def sample(self, generator: torch.Generator) -> Episode:
        dtype = self.dtype or torch.get_default_dtype()
        amplitude = _uniform(generator, *self.amplitude, dtype)
        phase = _uniform(generator, *self.phase, dtype)
        x = _uniform(generator, *self.x_range, dtype, (self.shots + self.queries, 1))
        y = amplitude * torch.sin(x - phase)
        return Episode(x[: self.shots], y[: self.shots], x[self.shots :], y[self.shots :])


@dataclass(frozen=True)
class LinearTasks(AbstractTaskFamily):
    r"""Linear regression tasks: :math:`y = x^\top w + \sigma \varepsilon` with
    :math:`w = \mu + s\, z`, :math:`x, z, \varepsilon \sim \mathcal N(0, I)`.

    ``mean`` is :math:`\mu` (shape ``(dim,)``; default zeros), ``spread`` is :math:`s`,
    ``noise`` is :math:`\sigma`.  ``x`` has shape ``(n, dim)`` and ``y`` ``(n, 1)``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> tasks = hg.meta.LinearTasks(dim=3, shots=5, queries=10, noise=0.0)
        >>> ep = tasks.sample(torch.Generator().manual_seed(0))
        >>> ep.x_support.shape, ep.y_query.shape, ep.ways
        (torch.Size([5, 3]), torch.Size([10, 1]), None)
        >>> w = torch.linalg.lstsq(ep.x_query, ep.y_query).solution  # noise=0: one exact w
        >>> bool(torch.allclose(ep.x_support @ w, ep.y_support, rtol=1e-4, atol=1e-4))
        True
    """

    dim: int = 20
    shots: int = 5
    queries: int = 50
    spread: float = 0.3
    noise: float = 0.1
    mean: torch.Tensor | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        where = "hypergradient.meta.LinearTasks(...)"
        _check_int(where, "dim", self.dim, 1)
        _check_int(where, "shots", self.shots, 1)
        _check_int(where, "queries", self.queries, 1)
        for name in ("spread", "noise"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise HypergradientError(f"{where}: {name} must be a float >= 0, got {value!r}.")
        if self.mean is not None and (
            not isinstance(self.mean, torch.Tensor) or tuple(self.mean.shape) != (self.dim,)
        ):
            raise HypergradientError(
                f"{where}: mean must be None or a tensor of shape ({self.dim},), got "
                f"{getattr(self.mean, 'shape', type(self.mean).__name__)}."
            )

    def sample(self, generator: torch.Generator) -> Episode:
        dtype = self.dtype or torch.get_default_dtype()

        def normal(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

        mean = torch.zeros(self.dim, dtype=dtype) if self.mean is None else self.mean.to(dtype)
        w = mean + self.spread * normal(self.dim)
        n = self.shots + self.queries
        x = normal(n, self.dim)
        y = (x @ w + self.noise * normal(n))[:, None]
        return Episode(x[: self.shots], y[: self.shots], x[self.shots :], y[self.shots :])


# ----------------------------------------------------------------------------- baseline


def nearest_neighbour_predict(episode: Episode) -> torch.Tensor:
    """Each query example gets the label (classification) or target (regression) of its
    nearest support example, by Euclidean distance between the raw (flattened) inputs.

    Returns ``(n_query,)`` labels, or ``(n_query, outputs)`` targets.

    Examples:
        >>> import torch
        >>> ep = Episode(torch.tensor([[0.0], [10.0]]), torch.tensor([0, 1]),
        ...              torch.tensor([[1.0], [8.0], [-3.0]]), torch.tensor([0, 1, 0]))
        >>> nearest_neighbour_predict(ep).tolist()
        [0, 1, 0]
    """
    support = episode.x_support.reshape(episode.x_support.shape[0], -1)
    query = episode.x_query.reshape(episode.x_query.shape[0], -1)
    nearest = torch.cdist(query, support).argmin(dim=1)
    return episode.y_support[nearest]


# ----------------------------------------------------------------------------- checks


def _check_int(where: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HypergradientError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")


def _check_interval(where: str, name: str, value) -> None:
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
        and value[0] <= value[1]
    )
    if not ok:
        raise HypergradientError(
            f"{where}: {name} must be a pair (low, high) of finite floats with low <= high, "
            f"got {value!r}."
        )
