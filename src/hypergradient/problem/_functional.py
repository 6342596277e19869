"""``nn.Module`` -> pure function of a parameter dict, via ``torch.func.functional_call``."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import torch
from torch import nn
from torch.func import functional_call

from .._errors import HypergradientError


def uncompiled(module: nn.Module) -> nn.Module:
    """The original module of a ``torch.compile``'d one (the module itself otherwise).

    Its parameters are the compiled module's own tensors, named without the
    ``_orig_mod.`` prefix.  Functional calls go to it: a compiled graph's backward cannot be
    differentiated again, and hypergradients need second derivatives."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


def params_of(module: nn.Module, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of ``module``'s trainable parameters, keyed by their names (those of
    the original module for a ``torch.compile``'d one).

    Examples:
        >>> import torch, hypergradient as hg
        >>> sorted(hg.params_of(torch.nn.Linear(3, 2)))
        ['bias', 'weight']
    """
    if not isinstance(module, nn.Module):
        raise HypergradientError(
            f"hypergradient.params_of(module): expected an nn.Module, got {type(module).__name__}."
        )
    module = uncompiled(module)
    out = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return out


_MODES = (None, "train", "eval")


def as_function(module: nn.Module, mode: str | None = None) -> Callable[..., torch.Tensor]:
    """Return ``f(params, *inputs) = module(*inputs)`` evaluated with the weights ``params``.

    ``params`` must hold every trainable parameter of ``module`` (the keys of
    :func:`params_of`); a missing one raises :class:`~hypergradient.HypergradientError`
    naming it (and any key that names neither a parameter nor a buffer: a misspelt name),
    instead of silently using the module's own tensor, which no gradient would reach.
    Frozen parameters (``requires_grad=False``) are taken from the module unless given.
    The result is a pure function of ``params`` that ``torch.autograd`` and ``torch.func``
    transforms accept, so ``inner_loss = lambda p, h: F.cross_entropy(f(p, x), y) +
    penalty(p, h)`` plugs a user's model into :func:`hypergradient.implicit_hypergrad`.

    Buffers (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``) are
    read from the module (or from ``params`` where given) but never written: every call
    works on copies, so a hypergradient computation -- however many forward passes it makes
    -- leaves the module exactly as it found it, and no validation example enters its
    statistics.  Running statistics advance only where the user's own training step calls
    the module itself.

    Args:
        module: the model.
        mode: ``None`` (the module's current ``training`` flags), ``"train"`` (BatchNorm
            normalises with the batch's statistics, dropout is active) or ``"eval"``
            (BatchNorm uses the running statistics, no dropout), set for the duration of
            each call and restored after it, submodule by submodule.

    A ``torch.compile``'d module is called through its original module, eagerly (its
    parameters named without ``_orig_mod.``): the backward of a compiled graph cannot be
    differentiated again, and hypergradients need second derivatives.

    Cost: one forward of the module plus a copy of its buffers (small next to the
    activations).

    Examples:
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
    if mode not in _MODES:
        raise HypergradientError(
            f"hypergradient.as_function(mode={mode!r}): expected None (the module's own "
            f"mode), 'train' or 'eval'."
        )
    module = uncompiled(module)

    def call(params, *inputs, **kwargs):
        params = dict(params)
        # torch.func.functional_call falls back to the module's tensor for a missing key and
        # ignores an unknown one; its strict=True would also demand every buffer
        required = [k for k, v in module.named_parameters() if v.requires_grad]
        if any(k not in params for k in required):
            _raise_bad_keys(module, params, required)
        # copies of every buffer: BatchNorm updates running statistics in place, on
        # whatever tensor it is given
        for name, buffer in module.named_buffers():
            source = params.get(name, buffer)
            params[name] = source.clone() if isinstance(source, torch.Tensor) else source
        if mode is None:
            return functional_call(module, params, inputs, kwargs)
        flags = [(m, m.training) for m in module.modules()]
        module.train(mode == "train")
        try:
            return functional_call(module, params, inputs, kwargs)
        finally:
            for m, training in flags:
                m.training = training

    return call


def _raise_bad_keys(module: nn.Module, params: dict, required: list[str]) -> NoReturn:
    missing = [k for k in required if k not in params]
    known = {k for k, _ in module.named_parameters(remove_duplicate=False)}
    known |= {k for k, _ in module.named_buffers(remove_duplicate=False)}
    unknown = sorted(k for k in params if k not in known)
    hint = f" (unknown keys {unknown}: misspelt?)" if unknown else ""
    raise HypergradientError(
        f"hypergradient.as_function({type(module).__name__}): the params dict lacks the "
        f"trainable parameter(s) {missing}{hint}; it must hold every trainable parameter "
        f"of the module (the keys of hg.params_of(module)), otherwise the module's own "
        f"tensor would be used silently. Pass them all, or freeze the ones to keep fixed "
        f"(requires_grad_(False))."
    )
