"""``nn.Module`` -> pure function of a parameter dict, via ``torch.func.functional_call``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from .._errors import HypergradientError


def params_of(module: nn.Module, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of ``module``'s trainable parameters, keyed by their names.

    Example::

        >>> import torch, hypergradient as hg
        >>> sorted(hg.params_of(torch.nn.Linear(3, 2)))
        ['bias', 'weight']
    """
    if not isinstance(module, nn.Module):
        raise HypergradientError(
            f"hypergradient.params_of(module): expected an nn.Module, got {type(module).__name__}."
        )
    out = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return out


def as_function(module: nn.Module) -> Callable[..., torch.Tensor]:
    """Return ``f(params, *inputs) = module(*inputs)`` evaluated with the weights ``params``.

    Buffers (e.g. BatchNorm statistics) are taken from the module.  The result is a pure
    function of ``params`` that ``torch.autograd`` and ``torch.func`` transforms accept, so
    ``inner_loss = lambda p, h: F.cross_entropy(f(p, x), y) + penalty(p, h)`` plugs a user's
    model into :func:`hypergradient.implicit_hypergrad`.

    Example::

        >>> import torch, hypergradient as hg
        >>> net = torch.nn.Linear(3, 1)
        >>> f = hg.as_function(net)
        >>> x = torch.ones(2, 3)
        >>> bool(torch.allclose(f(hg.params_of(net), x), net(x)))
        True
    """
    if not isinstance(module, nn.Module):
        raise HypergradientError(
            f"hypergradient.as_function(module): expected an nn.Module, got "
            f"{type(module).__name__}."
        )

    def call(params, *inputs, **kwargs):
        return functional_call(module, dict(params), inputs, kwargs)

    return call
