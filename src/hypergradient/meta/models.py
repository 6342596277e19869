r"""Networks as pure functions of a parameter dict, for meta-learning.

A meta-learner adapts a copy of the meta-parameters :math:`\theta` to every task, so the
network must be a function ``predict(params, x)`` of an explicit parameter dict (the
``torch.func.functional_call`` view of a module).  Every model here also says how a task's
starting point :math:`\varphi_0(\theta)` is made from :math:`\theta`
(:meth:`AbstractModel.task_params`); meta-gradients flow back through that map.

Classification heads (``out_features=None``, the default for classifiers here): the last
linear layer is *not* meta-learned; every task starts it at zero with one row per class of
that task.  All classes then look alike before adaptation (the model is invariant to the
random order of the labels), the first inner step separates them, and the same
meta-parameters serve any number of ways -- a model meta-trained on 5-way episodes can be
evaluated on 20-way ones (the zero-initialised head of Ye & Chao 2022, "How to train your
MAML to excel in few-shot classification").
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import HypergradientError
from ..problem import as_function, params_of

__all__ = ["MLP", "AbstractModel", "ConvNet", "ModuleModel"]

Params = Mapping[str, torch.Tensor]


class AbstractModel(abc.ABC):
    """A network given by pure functions of its parameters.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> class Linear(hg.meta.AbstractModel):  # a fixed 3 -> 2 linear map
        ...     def init(self, generator=None, dtype=None):
        ...         return {"w": torch.zeros(3, 2, dtype=dtype)}
        ...     def task_params(self, theta, ways):
        ...         return dict(theta)
        ...     def predict(self, params, x):
        ...         return x @ params["w"]
        >>> model = Linear()
        >>> model.predict(model.task_params(model.init(), ways=2), torch.ones(5, 3)).shape
        torch.Size([5, 2])
    """

    @abc.abstractmethod
    def init(
        self, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Fresh meta-parameters :math:`\\theta` (random draws from ``generator``, a CPU
        generator; ``dtype`` defaults to torch's default dtype)."""

    @abc.abstractmethod
    def task_params(self, theta: Params, ways: int | None) -> dict[str, torch.Tensor]:
        """The starting point :math:`\\varphi_0(\\theta)` of adaptation for a task with
        ``ways`` classes (``None``: regression).  Differentiable in ``theta``; may add
        parameters that do not depend on it (a zero classification head)."""

    @abc.abstractmethod
    def predict(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Outputs (logits or regression values) of shape ``(n, outputs)`` for ``x`` of
        shape ``(n, *input_shape)``."""


def _kaiming(generator, shape: tuple[int, ...], fan_in: int, dtype) -> torch.Tensor:
    """He-normal weights, drawn in float64 on the CPU (the same numbers on every machine)."""
    w = torch.randn(shape, generator=generator, dtype=torch.float64) * math.sqrt(2.0 / fan_in)
    return w.to(dtype)


def _linear_default(generator, shape: tuple[int, ...], fan_in: int, dtype) -> torch.Tensor:
    """``torch.nn.Linear``'s default initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``,
    drawn in float64 on the CPU."""
    bound = 1.0 / math.sqrt(fan_in)
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return ((2 * u - 1) * bound).to(dtype)


def _zero_head(where: str, theta: Params, ways: int | None, features: int):
    if ways is None or not isinstance(ways, int) or ways < 1:
        raise HypergradientError(
            f"{where}.task_params(theta, ways={ways!r}): this model's classification head is "
            f"made per task, so ways must be the task's number of classes (an int >= 1). For "
            f"regression build the model with out_features=<outputs>."
        )
    dtype = next(iter(theta.values())).dtype
    device = next(iter(theta.values())).device
    return {
        **theta,
        "head.weight": torch.zeros(ways, features, dtype=dtype, device=device),
        "head.bias": torch.zeros(ways, dtype=dtype, device=device),
    }


def _fixed_head(where: str, theta: Params, ways: int | None, out_features: int):
    if ways is not None and ways != out_features:
        raise HypergradientError(
            f"{where}.task_params(theta, ways={ways}): the model has a fixed head with "
            f"out_features={out_features} outputs; build it with out_features=None for a "
            f"per-task head that fits any number of ways."
        )
    return dict(theta)


def _check_size(where: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HypergradientError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")


class MLP(AbstractModel):
    r"""Fully connected ReLU network ``in_features -> hidden... -> out``.

    ``out_features=None``: a classifier whose head is made per task (zeros, one row per
    class; see the module docstring); an int: a fixed last layer that is meta-learned like
    the others (regression, e.g. ``MLP(1, (40, 40), out_features=1)`` for sinusoids).
    Inputs are flattened to ``(n, in_features)``.  Weights and biases are initialised as
    ``torch.nn.Linear`` does (uniform in :math:`\pm 1/\sqrt{\text{fan-in}}`): small enough
    that a sinusoid MLP's support loss has curvature of order 10, so the usual inner step
    of 0.01 is stable (He initialisation gives curvature ~1000 on inputs in [-5, 5]).

    Examples:
        >>> import torch
        >>> net = MLP(2, (3,), out_features=1)
        >>> theta = net.init(torch.Generator().manual_seed(0))
        >>> sorted(theta)
        ['layers.0.bias', 'layers.0.weight', 'layers.1.bias', 'layers.1.weight']
        >>> net.predict(theta, torch.ones(4, 2)).shape
        torch.Size([4, 1])
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int] = (40, 40), out_features: int | None = None
    ):
        where = "hypergradient.meta.MLP(...)"
        _check_size(where, "in_features", in_features)
        hidden = tuple(hidden)
        for h in hidden:
            _check_size(where, "every hidden width", h)
        if out_features is not None:
            _check_size(where, "out_features", out_features)
        self.in_features, self.hidden, self.out_features = in_features, hidden, out_features

    @property
    def num_features(self) -> int:
        """Width of the representation the head reads."""
        return self.hidden[-1] if self.hidden else self.in_features

    def init(self, generator=None, dtype=None):
        dtype = dtype or torch.get_default_dtype()
        generator = generator or torch.Generator().manual_seed(0)
        sizes = [self.in_features, *self.hidden]
        if self.out_features is not None:
            sizes.append(self.out_features)
        theta = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            theta[f"layers.{i}.weight"] = _linear_default(generator, (b, a), a, dtype)
            theta[f"layers.{i}.bias"] = _linear_default(generator, (b,), a, dtype)
        return theta

    def task_params(self, theta, ways):
        if self.out_features is None:
            return _zero_head("MLP", theta, ways, self.num_features)
        return _fixed_head("MLP", theta, ways, self.out_features)

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's activations, ``(n, num_features)``."""
        h = x.reshape(x.shape[0], -1)
        for i in range(len(self.hidden)):
            h = F.relu(F.linear(h, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]))
        return h

    def predict(self, params, x):
        h = self.features(params, x)
        if self.out_features is None:
            return F.linear(h, params["head.weight"], params["head.bias"])
        last = len(self.hidden)
        return F.linear(h, params[f"layers.{last}.weight"], params[f"layers.{last}.bias"])


class ConvNet(AbstractModel):
    r"""The MAML Omniglot network: ``blocks`` x (3x3 convolution with stride 2 -> batch
    norm -> ReLU), flattened, then a linear head.

    Batch norm uses the statistics of the batch it is given (no running averages, as in
    Finn et al. 2017 and Rajeswaran et al. 2019); its scale and shift are meta-learned.
    An ``image_size`` input shrinks to ``ceil(image_size / 2**blocks)`` per side: 28 -> 2
    with 4 blocks, so ``num_features = 4 * channels``.

    Cost per image (28x28, 32 channels, 4 blocks): about 0.6 MFLOP forward.
    ``out_features`` as for :class:`MLP`.

    Examples:
        >>> import torch
        >>> net = ConvNet(channels=8)
        >>> theta = net.init(torch.Generator().manual_seed(0))
        >>> phi = net.task_params(theta, ways=5)
        >>> net.predict(phi, torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 32,
        blocks: int = 4,
        image_size: int = 28,
        out_features: int | None = None,
    ):
        where = "hypergradient.meta.ConvNet(...)"
        for name, value in (
            ("in_channels", in_channels),
            ("channels", channels),
            ("blocks", blocks),
            ("image_size", image_size),
        ):
            _check_size(where, name, value)
        if out_features is not None:
            _check_size(where, "out_features", out_features)
        self.in_channels, self.channels, self.blocks = in_channels, channels, blocks
        self.image_size, self.out_features = image_size, out_features
        side = image_size
        for _ in range(blocks):
            side = (side + 1) // 2  # 3x3, stride 2, padding 1
        self.num_features = channels * side * side

    def init(self, generator=None, dtype=None):
        dtype = dtype or torch.get_default_dtype()
        generator = generator or torch.Generator().manual_seed(0)
        theta = {}
        cin = self.in_channels
        for i in range(self.blocks):
            shape = (self.channels, cin, 3, 3)
            theta[f"conv{i}.weight"] = _kaiming(generator, shape, 9 * cin, dtype)
            theta[f"conv{i}.bias"] = torch.zeros(self.channels, dtype=dtype)
            theta[f"norm{i}.weight"] = torch.ones(self.channels, dtype=dtype)
            theta[f"norm{i}.bias"] = torch.zeros(self.channels, dtype=dtype)
            cin = self.channels
        if self.out_features is not None:
            theta["head.weight"] = _kaiming(
                generator, (self.out_features, self.num_features), self.num_features, dtype
            )
            theta["head.bias"] = torch.zeros(self.out_features, dtype=dtype)
        return theta

    def task_params(self, theta, ways):
        if self.out_features is None:
            return _zero_head("ConvNet", theta, ways, self.num_features)
        return _fixed_head("ConvNet", theta, ways, self.out_features)

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The flattened output of the last block, ``(n, num_features)``."""
        h = x
        for i in range(self.blocks):
            h = F.conv2d(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], 2, 1)
            h = F.batch_norm(
                h, None, None, params[f"norm{i}.weight"], params[f"norm{i}.bias"], training=True
            )
            h = F.relu(h)
        return h.flatten(1)

    def predict(self, params, x):
        return F.linear(self.features(params, x), params["head.weight"], params["head.bias"])


class ModuleModel(AbstractModel):
    """Any ``nn.Module`` as a model: ``predict(params, x) = module(x)`` with the weights
    ``params`` (``torch.func.functional_call``).

    ``init`` returns copies of the module's current trainable parameters (``generator`` is
    not used: initialise the module itself); ``task_params`` is the identity, so the module's
    output layer is meta-learned and fixes the number of ways.  Buffers (e.g. batch-norm
    running statistics) are read from the module and never adapted.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> model = hg.meta.ModuleModel(torch.nn.Linear(3, 2))
        >>> theta = model.init()
        >>> sorted(theta)
        ['bias', 'weight']
        >>> model.predict(theta, torch.ones(4, 3)).shape
        torch.Size([4, 2])
        >>> zeros = {k: torch.zeros_like(v) for k, v in theta.items()}
        >>> model.predict(zeros, torch.ones(4, 3)).abs().max().item()  # the weights given are used
        0.0
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._call = as_function(module)

    def init(self, generator=None, dtype=None):
        return params_of(self.module, dtype=dtype)

    def task_params(self, theta, ways):
        return dict(theta)

    def predict(self, params, x):
        return self._call(params, x)
