r"""Tasks and task families for learned optimizers, and the unrolled system that trains them.

A :class:`Task` is one optimization problem: initial parameters (a ``dict[str, Tensor]``)
and the tensors that define its losses (which examples, the mini-batch of every step, the
noise).  A *task family* (:class:`AbstractTaskFamily`) is a distribution over tasks of one
*shape*: its :meth:`~AbstractTaskFamily.sample` draws a task from a ``torch.Generator``
and its loss functions are shared, pure and :func:`torch.func.vmap`-able, so the particles
of a gradient estimator (many tasks of one family) can run as one batch.  Variation in
width or batch size is variation *across* families (a list of families is a task suite;
:func:`digits_mlp_suite`).

Families:

* :class:`ClassifierFamily` -- an MLP or a small CNN classifier on digits (scikit-learn's
  8x8, shipped), MNIST or Fashion-MNIST (IDX files in ``data_dir``); each task trains a
  fresh network on a random subset of the training pool with its own mini-batch order.
* :class:`NoisyQuadraticFamily` -- the noisy quadratic model: a diagonal quadratic with
  log-uniform curvatures and a noisy target per step (mini-batch noise).
* :class:`FredholmFamily` -- an ill-conditioned linear inverse problem: recover a smooth
  signal from noisy, blurred samples (a discretised Fredholm integral equation of the first
  kind with a Gaussian kernel of random width).

:meth:`AbstractTaskFamily.unrolled_system` gives the :class:`InnerTrainingSystem` that the
estimators of :mod:`hypergradient.estimators` differentiate: one episode is one inner
training run of ``horizon`` steps of a learned optimizer with meta-parameters
:math:`\theta`, reporting the clipped log training (or validation) loss at every step.
"""

from __future__ import annotations

import abc
import copy
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, final

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

from .._errors import HypergradientError
from ..estimators import AbstractUnrolledSystem
from .architectures import AbstractLearnedOptimizer, Params, StepInputs

TaskData = dict[str, torch.Tensor]


@final
@dataclass(frozen=True, eq=False)
class Task:
    """One sampled problem: its family's loss functions applied to its own tensors.

    Attributes:
        family: the :class:`AbstractTaskFamily` it came from (the code).
        data: the task's tensors (example indices, mini-batch table, curvatures, ...).
        params: the initial parameters.
        num_steps: the number of steps its mini-batch (or noise) table covers; later steps
            wrap around.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import NoisyQuadraticFamily
        >>> family = NoisyQuadraticFamily(dim=3, noise=0.0)
        >>> task = family.sample(torch.Generator().manual_seed(0), num_steps=5)
        >>> task.num_steps, sorted(task.data), task.params["w"].tolist()
        (5, ['c', 'h', 'noise', 'valid_noise'], [0.0, 0.0, 0.0])
        >>> task.loss({"w": task.data["c"]}, t=0).item()  # the target c is the minimum
        0.0
    """

    family: AbstractTaskFamily
    data: TaskData
    params: Params
    num_steps: int

    def loss(self, params: Mapping[str, torch.Tensor], t: int) -> torch.Tensor:
        """The training loss of step ``t`` (its mini-batch)."""
        return self.family.loss(params, self.data, t)

    def valid_loss(self, params: Mapping[str, torch.Tensor], t: int) -> torch.Tensor:
        """The validation loss observed at step ``t``."""
        return self.family.valid_loss(params, self.data, t)

    def eval_loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The full training objective (all of the task's examples, expected noise)."""
        return self.family.eval_loss(params, self.data)

    def module(self) -> nn.Module:
        """A ``nn.Module`` holding :attr:`params` (families with a network only)."""
        return self.family.module_with(self.params)


class AbstractTaskFamily(abc.ABC):
    """A distribution over tasks of one shape (see the module docstring).

    Contract: :meth:`sample` draws *all* of a task's randomness from the generator;
    :meth:`loss`, :meth:`valid_loss` and :meth:`eval_loss` are pure functions of the
    parameters and the task's tensors, use ``t`` (a Python int) only to index tables, and
    are :func:`torch.func.vmap`-able over stacked tasks.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import AbstractTaskFamily, FredholmFamily
        >>> family = FredholmFamily(n=8)
        >>> isinstance(family, AbstractTaskFamily), family.name
        (True, 'fredholm-n8')
        >>> gen = torch.Generator().manual_seed(0)
        >>> tasks = [family.sample(gen, num_steps=4) for _ in range(3)]
        >>> data = {k: torch.stack([task.data[k] for task in tasks]) for k in tasks[0].data}
        >>> losses = torch.func.vmap(family.eval_loss)({"f": torch.zeros(3, 8)}, data)
        >>> losses.shape, torch.allclose(losses, torch.full((3,), 0.5))  # f = 0: residual 1/2
        (torch.Size([3]), True)
    """

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short label (``"digits-mlp-w32-b32"``)."""

    @abc.abstractmethod
    def sample(self, generator: torch.Generator, num_steps: int) -> Task:
        """A fresh task whose tables cover ``num_steps`` steps."""

    @abc.abstractmethod
    def loss(self, params: Mapping[str, torch.Tensor], data: TaskData, t: int) -> torch.Tensor:
        """Training loss (0-d) of step ``t``."""

    @abc.abstractmethod
    def valid_loss(
        self, params: Mapping[str, torch.Tensor], data: TaskData, t: int
    ) -> torch.Tensor:
        """Validation loss (0-d) observed at step ``t``."""

    @abc.abstractmethod
    def eval_loss(self, params: Mapping[str, torch.Tensor], data: TaskData) -> torch.Tensor:
        """The full training objective (0-d)."""

    def module_with(self, params: Mapping[str, torch.Tensor]) -> nn.Module:
        raise HypergradientError(
            f"{type(self).__name__}.module_with(...): this family's parameters are plain "
            f"tensors, not a network; use task.params and task.loss(params, t)."
        )

    def unrolled_system(
        self,
        optimizer: AbstractLearnedOptimizer,
        horizon: int,
        *,
        meta_loss: str = "full",
    ) -> InnerTrainingSystem:
        """Training runs of ``horizon`` steps by ``optimizer``, for the estimators."""
        return InnerTrainingSystem(self, optimizer, horizon, meta_loss)


def _check_int(where: str, name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HypergradientError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")
    return value


def _check_positive(where: str, name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise HypergradientError(f"{where}: {name} must be a finite number > 0, got {value!r}.")
    return float(value)


def _generator(where: str, generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise HypergradientError(
            f"{where}: `generator` must be a torch.Generator, got {type(generator).__name__}. "
            f"Use torch.Generator().manual_seed(seed)."
        )
    return generator


# ----------------------------------------------------------------------------------------
# Image classifiers.

_DATASETS = ("digits", "mnist", "fashion-mnist")
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
_DIGITS_POOL, _DIGITS_VALID = 1297, 400  # of digits' 1797 images (the rest: 100 unused)


@functools.lru_cache(maxsize=8)
def _image_pool(
    dataset: str, data_dir: str | None, downsample: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_valid, y_valid)`` images ``(n, 1, H, W)`` in [0, 1], cached.

    digits: the first 1297 shuffled images train, the next 400 validate; MNIST and
    Fashion-MNIST: the first 10000 training images train, the next 2000 validate.
    """
    if dataset == "digits":
        from ..data import load_digits_split

        split = load_digits_split(_DIGITS_POOL, _DIGITS_VALID, seed=0, dtype=dtype)
        xs = [split.x_train.reshape(-1, 1, 8, 8), split.x_val.reshape(-1, 1, 8, 8)]
        ys = [split.y_train, split.y_val]
    else:
        from ..data import load_fashion_mnist, load_mnist

        loader = load_mnist if dataset == "mnist" else load_fashion_mnist
        images, labels = loader(data_dir, split="train", limit=12000)
        x = images.to(dtype).unsqueeze(1) / 255.0
        xs, ys = [x[:10000], x[10000:]], [labels[:10000], labels[10000:]]
    if downsample > 1:
        xs = [F.avg_pool2d(x, downsample) for x in xs]
    return xs[0], ys[0], xs[1], ys[1]


def _torch_like_init(module: nn.Module, generator: torch.Generator) -> Params:
    """``nn.Linear``/``nn.Conv2d``'s default init, drawn from ``generator``: weights and
    biases uniform in :math:`\\pm 1/\\sqrt{\\text{fan\\_in}}`."""
    params = {}
    for name, p in module.named_parameters():
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        fan_in = owner.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        u = torch.rand(p.shape, generator=generator, dtype=p.dtype)
        params[name] = (2 * u - 1) * bound
    return params


@final
@dataclass(frozen=True, eq=False)
class ClassifierFamily(AbstractTaskFamily):
    r"""Train a fresh MLP or small CNN on a random subset of an image dataset.

    A task draws ``num_examples`` examples from the training pool, a mini-batch of
    ``batch_size`` of them for every step (with replacement), validation mini-batches from
    the validation pool, and the initial weights (PyTorch's default init).  Losses are mean
    cross-entropies; :meth:`eval_loss` is over all ``num_examples``.

    Args:
        dataset: ``"digits"`` (no download), ``"mnist"`` or ``"fashion-mnist"`` (IDX files
            in ``data_dir``, see :func:`hypergradient.data.load_mnist`).
        model: ``"mlp"`` (``depth`` hidden layers of ``width`` units) or ``"cnn"`` (two
            3x3 convolutions with ``width`` channels, the second with stride 2, then a
            linear layer on the flattened feature maps).
        width: hidden units (MLP) or channels (CNN).
        batch_size: mini-batch size.
        num_examples: training examples per task.
        depth: hidden layers of the MLP.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        data_dir: folder of the MNIST files (``None``: ``$HYPERGRADIENT_DATA`` or the cache).
        downsample: average-pool the images by this factor (2 turns MNIST into 14x14).
        dtype: of the data and parameters (default: torch's default dtype).

    Examples:
        >>> import torch
        >>> from hypergradient.learned import ClassifierFamily
        >>> family = ClassifierFamily("digits", "mlp", width=4, batch_size=8, num_examples=32)
        >>> family.name
        'digits-mlp-w4-b8'
        >>> task = family.sample(torch.Generator().manual_seed(0), num_steps=3)
        >>> {name: tuple(p.shape) for name, p in task.params.items()}
        {'1.weight': (4, 64), '1.bias': (4,), '3.weight': (10, 4), '3.bias': (10,)}
        >>> task.data["batches"].shape, task.module()(torch.zeros(1, 1, 8, 8)).shape
        (torch.Size([3, 8]), torch.Size([1, 10]))
    """

    dataset: str = "digits"
    model: str = "mlp"
    width: int = 32
    batch_size: int = 32
    num_examples: int = 512
    depth: int = 1
    activation: str = "relu"
    data_dir: str | None = None
    downsample: int = 1
    dtype: torch.dtype | None = None

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        if self.dataset not in _DATASETS:
            raise HypergradientError(
                f"{where}: dataset must be one of {_DATASETS}, got {self.dataset!r}."
            )
        if self.model not in ("mlp", "cnn"):
            raise HypergradientError(f"{where}: model must be 'mlp' or 'cnn', got {self.model!r}.")
        if self.activation not in _ACTIVATIONS:
            raise HypergradientError(
                f"{where}: activation must be one of {tuple(_ACTIVATIONS)}, got "
                f"{self.activation!r}."
            )
        for name in ("width", "batch_size", "num_examples", "depth", "downsample"):
            _check_int(where, name, getattr(self, name))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(Path(self.data_dir).expanduser()))
        dtype = torch.get_default_dtype() if self.dtype is None else self.dtype
        object.__setattr__(self, "dtype", dtype)
        try:
            pool = _image_pool(self.dataset, self.data_dir, self.downsample, dtype)
        except HypergradientError as err:
            raise HypergradientError(
                f"{where}: dataset {self.dataset!r} is not available: {err}"
            ) from None
        x_train = pool[0]
        if self.num_examples > len(x_train):
            raise HypergradientError(
                f"{where}: num_examples={self.num_examples} exceeds the training pool of "
                f"{self.dataset} ({len(x_train)} images)."
            )
        object.__setattr__(self, "_pool", pool)
        object.__setattr__(self, "_module", self._build(x_train.shape[1:]))

    def _build(self, image_shape: torch.Size) -> nn.Module:
        act = _ACTIVATIONS[self.activation]
        with torch.random.fork_rng(devices=[]):  # the template's own init is never used
            if self.model == "mlp":
                layers: list[nn.Module] = [nn.Flatten()]
                fan_in = math.prod(image_shape)
                for _ in range(self.depth):
                    layers += [nn.Linear(fan_in, self.width, dtype=self.dtype), act()]
                    fan_in = self.width
                layers.append(nn.Linear(fan_in, 10, dtype=self.dtype))
            else:
                c, (_, height, width) = self.width, image_shape
                # stride 2 with padding 1 halves the image, rounding up
                pooled = ((height + 1) // 2) * ((width + 1) // 2)
                layers = [
                    nn.Conv2d(image_shape[0], c, 3, padding=1, dtype=self.dtype),
                    act(),
                    nn.Conv2d(c, c, 3, stride=2, padding=1, dtype=self.dtype),
                    act(),
                    nn.Flatten(),
                    nn.Linear(c * pooled, 10, dtype=self.dtype),
                ]
        return nn.Sequential(*layers)

    @property
    def name(self) -> str:
        depth = f"-d{self.depth}" if self.depth != 1 and self.model == "mlp" else ""
        pooled = f"-ds{self.downsample}" if self.downsample > 1 else ""
        act = "" if self.activation == "relu" else f"-{self.activation}"
        return f"{self.dataset}{pooled}-{self.model}-w{self.width}{depth}{act}-b{self.batch_size}"

    def sample(self, generator: torch.Generator, num_steps: int) -> Task:
        where = f"{type(self).__name__}.sample(...)"
        _generator(where, generator)
        _check_int(where, "num_steps", num_steps)
        x_train, _, x_valid, _ = self._pool
        examples = torch.randperm(len(x_train), generator=generator)[: self.num_examples]
        picks = torch.randint(self.num_examples, (num_steps, self.batch_size), generator=generator)
        valid = torch.randint(len(x_valid), (num_steps, self.batch_size), generator=generator)
        params = _torch_like_init(self._module, generator)
        data = {"examples": examples, "batches": examples[picks], "valid_batches": valid}
        return Task(self, data, params, num_steps)

    def _cross_entropy(self, params, x, y) -> torch.Tensor:
        return F.cross_entropy(functional_call(self._module, dict(params), (x,)), y)

    def loss(self, params, data, t):
        idx = data["batches"][t % data["batches"].shape[0]]
        return self._cross_entropy(params, self._pool[0][idx], self._pool[1][idx])

    def valid_loss(self, params, data, t):
        idx = data["valid_batches"][t % data["valid_batches"].shape[0]]
        return self._cross_entropy(params, self._pool[2][idx], self._pool[3][idx])

    def eval_loss(self, params, data):
        idx = data["examples"]
        return self._cross_entropy(params, self._pool[0][idx], self._pool[1][idx])

    def eval_valid_loss(self, params) -> torch.Tensor:
        """Cross-entropy on the whole validation pool."""
        return self._cross_entropy(params, self._pool[2], self._pool[3])

    def module_with(self, params):
        module = copy.deepcopy(self._module)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(params[name])
        return module


def digits_mlp_suite(
    widths: tuple[int, ...] = (16, 32, 64),
    batch_sizes: tuple[int, ...] = (32, 128),
    **kwargs: Any,
) -> list[ClassifierFamily]:
    """Digits MLP families for every (width, batch size): the classifier part of a suite.

    Examples:
        >>> from hypergradient.learned import digits_mlp_suite
        >>> [family.name for family in digits_mlp_suite(widths=(8, 16), batch_sizes=(32,))]
        ['digits-mlp-w8-b32', 'digits-mlp-w16-b32']
        >>> len(digits_mlp_suite())  # 3 widths x 2 batch sizes
        6
    """
    return [
        ClassifierFamily("digits", "mlp", width=w, batch_size=b, **kwargs)
        for w in widths
        for b in batch_sizes
    ]


# ----------------------------------------------------------------------------------------
# Noisy quadratics.


@final
@dataclass(frozen=True, eq=False)
class NoisyQuadraticFamily(AbstractTaskFamily):
    r"""The noisy quadratic model: :math:`\ell_t(w) = \tfrac12 \sum_i h_i (w_i - c_i -
    \xi_{t,i})^2`.

    A task draws curvatures :math:`h_i` log-uniform in :math:`[1/\kappa, 1]`, a target
    :math:`c \sim \mathcal N(0, I)` and noise :math:`\xi_t \sim \mathcal N(0, s^2 I)` per
    step (the mini-batch noise); :math:`w_0 = 0`.  :meth:`eval_loss` is the expected loss
    :math:`\tfrac12 \sum_i h_i ((w_i - c_i)^2 + s^2)`, whose minimum
    :math:`\tfrac12 s^2 \sum_i h_i` is the noise floor.

    Args:
        dim: :math:`d`.
        condition: :math:`\kappa \ge 1`, the ratio of the largest to the smallest curvature.
        noise: :math:`s \ge 0`.
        dtype: of the parameters (default: torch's default dtype).

    Examples:
        >>> import torch
        >>> from hypergradient.learned import NoisyQuadraticFamily
        >>> family = NoisyQuadraticFamily(dim=3, condition=10.0, noise=0.5)
        >>> family.name
        'quadratic-d3-k10'
        >>> task = family.sample(torch.Generator().manual_seed(0), num_steps=5)
        >>> h, c = task.data["h"], task.data["c"]
        >>> bool(((h > 0.0999) & (h <= 1.0)).all())  # curvatures in [1/condition, 1]
        True
        >>> torch.allclose(task.eval_loss({"w": c}), 0.5 * 0.5**2 * h.sum())  # the noise floor
        True
    """

    dim: int = 20
    condition: float = 100.0
    noise: float = 0.3
    dtype: torch.dtype | None = None

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        _check_int(where, "dim", self.dim)
        if _check_positive(where, "condition", self.condition) < 1:
            raise HypergradientError(f"{where}: condition must be >= 1, got {self.condition!r}.")
        if (
            isinstance(self.noise, bool)
            or not isinstance(self.noise, (int, float))
            or not (math.isfinite(self.noise) and self.noise >= 0)
        ):
            raise HypergradientError(
                f"{where}: noise must be a finite number >= 0, got {self.noise!r}."
            )
        object.__setattr__(
            self, "dtype", torch.get_default_dtype() if self.dtype is None else self.dtype
        )

    @property
    def name(self) -> str:
        return f"quadratic-d{self.dim}-k{self.condition:g}"

    def sample(self, generator: torch.Generator, num_steps: int) -> Task:
        where = f"{type(self).__name__}.sample(...)"
        _generator(where, generator)
        _check_int(where, "num_steps", num_steps)
        d, dtype = self.dim, self.dtype
        u = torch.rand(d, generator=generator, dtype=dtype)
        h = torch.exp(-u * math.log(self.condition))
        c = torch.randn(d, generator=generator, dtype=dtype)
        noise = self.noise * torch.randn(num_steps, d, generator=generator, dtype=dtype)
        valid = self.noise * torch.randn(num_steps, d, generator=generator, dtype=dtype)
        data = {"h": h, "c": c, "noise": noise, "valid_noise": valid}
        return Task(self, data, {"w": torch.zeros(d, dtype=dtype)}, num_steps)

    @staticmethod
    def _value(w, h, target):
        return 0.5 * (h * (w - target).square()).sum()

    def loss(self, params, data, t):
        xi = data["noise"][t % data["noise"].shape[0]]
        return self._value(params["w"], data["h"], data["c"] + xi)

    def valid_loss(self, params, data, t):
        xi = data["valid_noise"][t % data["valid_noise"].shape[0]]
        return self._value(params["w"], data["h"], data["c"] + xi)

    def eval_loss(self, params, data):
        floor = 0.5 * self.noise**2 * data["h"].sum()
        return self._value(params["w"], data["h"], data["c"]) + floor


# ----------------------------------------------------------------------------------------
# Ill-conditioned linear inverse problems.


@final
@dataclass(frozen=True, eq=False)
class FredholmFamily(AbstractTaskFamily):
    r"""Deblurring: a discretised Fredholm integral equation of the first kind.

    Unknown :math:`f` on :math:`n` points :math:`u_j = (j + \tfrac12)/n` of :math:`[0,1]`;
    data :math:`y = K f^\star + \varepsilon` with the Gaussian kernel

    .. math::

        K_{ij} = \frac{1}{n\,\ell\sqrt{2\pi}} \exp\Big(-\frac{(u_i - u_j)^2}{2\ell^2}\Big)

    (rows sum to about 1; singular values decay like :math:`e^{-2(\pi k \ell)^2}`, so the
    problem is severely ill-conditioned).  A task draws the width :math:`\ell` log-uniform
    in ``kernel_widths``, a smooth :math:`f^\star` (a sum of three Gaussian bumps of random
    position, width and height) and the noise (``noise`` times the rms of :math:`K
    f^\star`).  Training loss (full batch):
    :math:`\tfrac12 \lVert K f - y \rVert^2 / \lVert y \rVert^2`, from :math:`f_0 = 0`
    (loss 1/2); validation loss: the reconstruction error
    :math:`\tfrac12 \lVert f - f^\star \rVert^2 / \lVert f^\star \rVert^2` (over-fitting
    the noise raises it: semi-convergence).

    Args:
        n: grid points (unknowns and measurements).
        kernel_widths: ``(low, high)`` range of :math:`\ell`.
        noise: relative noise level.
        dtype: of the parameters (default: torch's default dtype).

    Examples:
        >>> import torch
        >>> from hypergradient.learned import FredholmFamily
        >>> family = FredholmFamily(n=48)
        >>> K = family.kernel(0.05)
        >>> K.shape, round(K[24].sum().item(), 2)  # an interior row sums to about 1
        (torch.Size([48, 48]), 1.0)
        >>> task = family.sample(torch.Generator().manual_seed(0), num_steps=10)
        >>> f0 = task.params  # f = 0: both relative errors are 1/2
        >>> round(task.loss(f0, 0).item(), 2), round(task.valid_loss(f0, 0).item(), 2)
        (0.5, 0.5)
    """

    n: int = 48
    kernel_widths: tuple[float, float] = (0.04, 0.1)
    noise: float = 0.05
    dtype: torch.dtype | None = None

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        _check_int(where, "n", self.n, minimum=2)
        widths = self.kernel_widths
        if (
            not isinstance(widths, (tuple, list))
            or len(widths) != 2
            or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in widths
            )
            or widths[0] > widths[1]
        ):
            raise HypergradientError(
                f"{where}: kernel_widths must be (low, high) with 0 < low <= high, got {widths!r}."
            )
        object.__setattr__(self, "kernel_widths", (float(widths[0]), float(widths[1])))
        if (
            isinstance(self.noise, bool)
            or not isinstance(self.noise, (int, float))
            or not (math.isfinite(self.noise) and self.noise >= 0)
        ):
            raise HypergradientError(
                f"{where}: noise must be a finite number >= 0, got {self.noise!r}."
            )
        object.__setattr__(
            self, "dtype", torch.get_default_dtype() if self.dtype is None else self.dtype
        )

    @property
    def name(self) -> str:
        return f"fredholm-n{self.n}"

    def kernel(self, width: float | torch.Tensor) -> torch.Tensor:
        """The ``(n, n)`` matrix :math:`K` for kernel width ``width``."""
        u = (torch.arange(self.n, dtype=self.dtype) + 0.5) / self.n
        width = torch.as_tensor(width, dtype=self.dtype)
        diff = u[:, None] - u[None, :]
        return torch.exp(-0.5 * (diff / width) ** 2) / (self.n * width * math.sqrt(2 * math.pi))

    def sample(self, generator: torch.Generator, num_steps: int) -> Task:
        where = f"{type(self).__name__}.sample(...)"
        _generator(where, generator)
        _check_int(where, "num_steps", num_steps)
        dtype = self.dtype
        lo, hi = self.kernel_widths

        def uniform(*shape):
            return torch.rand(shape, generator=generator, dtype=dtype)

        width = torch.exp(math.log(lo) + uniform() * (math.log(hi) - math.log(lo)))
        u = (torch.arange(self.n, dtype=dtype) + 0.5) / self.n
        centres, spreads = uniform(3), 0.05 + 0.15 * uniform(3)
        heights = torch.randn(3, generator=generator, dtype=dtype)
        f_true = (heights * torch.exp(-0.5 * ((u[:, None] - centres) / spreads) ** 2)).sum(1)
        k = self.kernel(width)
        clean = k @ f_true
        eps = torch.randn(self.n, generator=generator, dtype=dtype)
        y = clean + self.noise * clean.square().mean().sqrt() * eps
        data = {"K": k, "y": y, "f_true": f_true}
        return Task(self, data, {"f": torch.zeros(self.n, dtype=dtype)}, num_steps)

    def loss(self, params, data, t):
        return self.eval_loss(params, data)

    def valid_loss(self, params, data, t):
        err = params["f"] - data["f_true"]
        return 0.5 * err.square().sum() / data["f_true"].square().sum()

    def eval_loss(self, params, data):
        resid = data["K"] @ params["f"] - data["y"]
        return 0.5 * resid.square().sum() / data["y"].square().sum()


# ----------------------------------------------------------------------------------------
# The unrolled system.

_META_LOSSES = ("full", "train", "valid")


@final
@dataclass(frozen=True, eq=False)
class InnerTrainingSystem(AbstractUnrolledSystem):
    r"""Inner training runs of a learned optimizer, as an unrolled system.

    ``init(generator)`` samples a task of ``family`` and the optimizer state; step
    :math:`t` computes the mini-batch loss :math:`\ell_t(w_t)` and its gradient
    (:func:`torch.func.grad_and_value`, so the graph through the gradient is kept for
    truncated back-propagation), the validation loss when the optimizer reads it, and
    applies :math:`w_{t+1} = w_t + \Delta w_t(\theta)` with progress :math:`t/T`.  The
    reported loss is the *clipped log loss* (Metz et al. 2019) of the chosen objective
    :math:`L_t`:

    .. math:: \min\big(\log \max(L_t, 10^{-8}),\ \log L_0 + 1\big),

    NaN mapped to the cap, where :math:`L_0` is the task's initial full training loss: a
    diverging run costs a bounded amount, which keeps ES and PES estimates finite, and log
    losses weigh all families alike.

    Args:
        family: the task family.
        optimizer: the learned optimizer.
        horizon: :math:`T`, inner steps per episode.
        meta_loss: what :math:`L_t` is: ``"full"`` (default) the full training objective
            :meth:`~AbstractTaskFamily.eval_loss` *after* the update, at :math:`w_{t+1}`
            (one more forward pass per step; smooth, and it sees the last update);
            ``"train"`` the mini-batch loss at :math:`w_t` (free, but noisy: a mean *log*
            mini-batch loss rewards optimizers whose loss swings widely between batches);
            ``"valid"`` the validation loss at :math:`w_t` (meta-learns regularisation).

    The state is a dict of tensors (vmap-able over tasks of one family).

    Examples:
        >>> import torch
        >>> from hypergradient.learned import MLPLearnedOptimizer, NoisyQuadraticFamily
        >>> lopt = MLPLearnedOptimizer(hidden=4)
        >>> theta = lopt.init(torch.Generator().manual_seed(0))  # the zero update
        >>> system = NoisyQuadraticFamily(dim=3).unrolled_system(lopt, horizon=5)
        >>> state = system.init(torch.Generator().manual_seed(1))
        >>> sorted(state)
        ['cap', 'data', 'opt', 'params']
        >>> state, log_loss = system.step(state, theta, 0)
        >>> torch.allclose(log_loss, state["cap"] - 1)  # unchanged weights: the initial log loss
        True
    """

    family: AbstractTaskFamily
    optimizer: AbstractLearnedOptimizer
    horizon: int
    meta_loss: str = "full"

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        if not isinstance(self.family, AbstractTaskFamily):
            raise HypergradientError(
                f"{where}: family must be an AbstractTaskFamily (e.g. ClassifierFamily()), got "
                f"{type(self.family).__name__}."
            )
        if not isinstance(self.optimizer, AbstractLearnedOptimizer):
            raise HypergradientError(
                f"{where}: optimizer must be an AbstractLearnedOptimizer (e.g. "
                f"MLPLearnedOptimizer()), got {type(self.optimizer).__name__}."
            )
        _check_int(where, "horizon", self.horizon)
        if self.meta_loss not in _META_LOSSES:
            raise HypergradientError(
                f"{where}: meta_loss must be one of {_META_LOSSES}, got {self.meta_loss!r}."
            )

    def init(self, generator: torch.Generator) -> dict[str, Any]:
        task = self.family.sample(generator, self.horizon)
        params = task.params
        with torch.no_grad():
            initial = task.eval_loss(params)
        cap = torch.log(torch.clamp(initial, min=1e-8)) + 1.0
        return {
            "data": task.data,
            "params": params,
            "opt": self.optimizer.init_state(params),
            "cap": cap,
        }

    def step(self, state: dict[str, Any], theta, t: int):
        family, data, params = self.family, state["data"], state["params"]
        grads, loss = grad_and_value(lambda p: family.loss(p, data, t))(params)
        needs_valid = self.optimizer.uses_losses or self.meta_loss == "valid"
        valid = (
            family.valid_loss(params, data, t) if needs_valid else torch.full_like(loss, math.nan)
        )
        inputs = StepInputs(
            torch.full_like(loss, t / self.horizon).detach(), loss.detach(), valid.detach()
        )
        updates, opt = self.optimizer.update(theta, grads, params, state["opt"], inputs)
        new_params = {k: params[k] + updates[k] for k in params}
        if self.meta_loss == "full":
            observed = family.eval_loss(new_params, data)
        else:
            observed = valid if self.meta_loss == "valid" else loss
        new_state = {"data": data, "params": new_params, "opt": opt, "cap": state["cap"]}
        return new_state, clipped_log_loss(observed, state["cap"])


def clipped_log_loss(loss: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """:math:`\\min(\\log\\max(\\ell, 10^{-8}), \\text{cap})`, NaN/inf mapped to ``cap``.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import clipped_log_loss
        >>> cap = torch.tensor(2.0)
        >>> clipped_log_loss(torch.tensor([1.0, 100.0, float("nan"), float("inf")]), cap).tolist()
        [0.0, 2.0, 2.0, 2.0]
        >>> round(clipped_log_loss(torch.tensor(0.0), cap).item(), 2)  # log(1e-8)
        -18.42
    """
    log_loss = torch.log(torch.clamp(loss, min=1e-8))
    return torch.where(torch.isfinite(log_loss), torch.minimum(log_loss, cap), cap)


def train_task(
    task: Task,
    update: Callable[[Params, Params, int], Params],
    num_steps: int,
    *,
    record: bool = True,
) -> tuple[Params, list[float]]:
    """Run ``num_steps`` steps of ``update(params, grads, t) -> new params`` on ``task``
    (no graph).  Returns the final parameters and the mini-batch losses of every step.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import NoisyQuadraticFamily, train_task
        >>> family = NoisyQuadraticFamily(dim=3, condition=1.0, noise=0.0)  # curvatures 1
        >>> task = family.sample(torch.Generator().manual_seed(0), num_steps=3)
        >>> def gd(params, grads, t):  # gradient descent, learning rate 1
        ...     return {k: params[k] - grads[k] for k in params}
        >>> params, losses = train_task(task, gd, num_steps=3)
        >>> losses[1:], torch.equal(params["w"], task.data["c"])  # the minimum in one step
        ([0.0, 0.0], True)
    """
    params = {k: v.clone() for k, v in task.params.items()}
    losses = []
    for t in range(num_steps):
        grads, loss = grad_and_value(lambda p, t=t: task.loss(p, t))(params)
        if record:
            losses.append(float(loss))
        with torch.no_grad():
            params = update(params, grads, t)
    return params, losses
