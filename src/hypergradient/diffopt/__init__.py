"""Differentiable functional optimizers that match ``torch.optim`` step by step.

Examples:
    >>> import torch
    >>> from hypergradient.diffopt import adam, apply_updates
    >>> params = {"w": torch.zeros(3, requires_grad=True)}
    >>> lr = torch.tensor(0.1, requires_grad=True)       # a hyperparameter to differentiate
    >>> tx = adam(lr=lr)
    >>> state = tx.init(params)
    >>> grads = {"w": torch.ones(3)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = apply_updates(params, updates)           # differentiable w.r.t. lr

    :data:`OPTIMIZERS` maps each optimizer name to an :class:`OptimizerInfo`: the factory, the
    ``torch.optim`` class it reproduces and a list of keyword configurations accepted by both
    (used by the test-suite to compare them step by step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._base import GradientTransformation, apply_updates, chain, detach_state, safe_sqrt
from .alias import (
    AdagradState,
    AdamState,
    RMSPropState,
    SGDState,
    adagrad,
    adam,
    rmsprop,
    sgd,
)


class OptimizerInfo(NamedTuple):
    """Registry entry: ``factory(**config)`` reproduces ``torch_cls(params, **config)``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> info = hg.diffopt.OPTIMIZERS["sgd"]
        >>> config = info.configs[1]
        >>> config
        {'lr': 0.05, 'momentum': 0.9}
        >>> w, g = torch.tensor([1.0, -2.0], requires_grad=True), torch.tensor([0.5, 3.0])
        >>> w.grad = g.clone()
        >>> info.torch_cls([w], **config).step()  # one step of torch.optim.SGD, in place
        >>> tx = info.factory(**config)  # the same step, functional
        >>> updates, _ = tx.update(g, tx.init(torch.zeros(2)))
        >>> bool(torch.allclose(w.detach(), torch.tensor([1.0, -2.0]) + updates))
        True
    """

    factory: Callable[..., GradientTransformation]
    torch_cls: type[torch.optim.Optimizer]
    configs: list[dict[str, Any]]


OPTIMIZERS: dict[str, OptimizerInfo] = {
    "sgd": OptimizerInfo(
        sgd,
        torch.optim.SGD,
        [
            {"lr": 0.1},
            {"lr": 0.05, "momentum": 0.9},
            {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01},
            {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.02},
        ],
    ),
    "adam": OptimizerInfo(
        adam,
        torch.optim.Adam,
        [
            {"lr": 0.01},
            {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01},
            {"lr": 0.01, "amsgrad": True},
            {"lr": 0.01, "betas": (0.5, 0.9), "amsgrad": True, "weight_decay": 0.05},
        ],
    ),
    "rmsprop": OptimizerInfo(
        rmsprop,
        torch.optim.RMSprop,
        [
            {"lr": 0.01},
            {"lr": 0.01, "alpha": 0.9, "centered": True},
            {"lr": 0.005, "momentum": 0.9, "weight_decay": 0.01},
            {"lr": 0.005, "alpha": 0.95, "momentum": 0.5, "centered": True, "eps": 1e-6},
        ],
    ),
    "adagrad": OptimizerInfo(
        adagrad,
        torch.optim.Adagrad,
        [
            {"lr": 0.1},
            {"lr": 0.1, "lr_decay": 0.05},
            {"lr": 0.05, "initial_accumulator_value": 0.1, "weight_decay": 0.01},
            {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.5, "eps": 1e-6},
        ],
    ),
}
"""Each optimizer's name mapped to its :class:`OptimizerInfo` (factory, ``torch.optim``
class, configurations accepted by both).

Examples:
    >>> import torch
    >>> import hypergradient as hg
    >>> sorted(hg.diffopt.OPTIMIZERS)
    ['adagrad', 'adam', 'rmsprop', 'sgd']
    >>> info = hg.diffopt.OPTIMIZERS["adam"]
    >>> info.factory.__name__, info.torch_cls.__name__, len(info.configs)
    ('adam', 'Adam', 4)
    >>> isinstance(info.factory(**info.configs[0]), hg.diffopt.GradientTransformation)
    True
"""

__all__ = [
    "OPTIMIZERS",
    "AdagradState",
    "AdamState",
    "GradientTransformation",
    "OptimizerInfo",
    "RMSPropState",
    "SGDState",
    "adagrad",
    "adam",
    "apply_updates",
    "chain",
    "detach_state",
    "rmsprop",
    "safe_sqrt",
    "sgd",
]
