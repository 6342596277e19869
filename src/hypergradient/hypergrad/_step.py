"""The step rules shared by the unrolled and the reversible hypergradients: a learning rate
or momentum given as a number, a tensor (scalar or per-step schedule), the name of a
hyperparameter, or a callable ``(hparams, t) -> tensor``.

``unrolled.py`` (reverse and forward mode) and ``reversible.py`` (exact reversal) both read
them from here, so neither imports the other for it: ``unrolled.py`` uses ``reversible.py``
(its ``mode="reversible"``), and nothing imports in the other direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .._errors import HypergradientError

StepHParam = float | torch.Tensor | str | Callable[[Mapping[str, torch.Tensor], int], torch.Tensor]


def resolve_step_hparam(name: str, spec: StepHParam, hparams, steps: int, dtype, where: str):
    """Return ``value(hparams, t)`` for the learning rate or the momentum, after validation."""
    if isinstance(spec, bool):
        raise HypergradientError(f"{where}: {name}={spec!r}; expected a number, not a bool.")
    if isinstance(spec, str):
        if spec not in hparams:
            raise HypergradientError(
                f"{where}: {name}={spec!r} names a hyperparameter, but hparams has only the "
                f"keys {sorted(hparams)}. Add hparams[{spec!r}] (a scalar or a schedule of "
                f"length steps={steps})."
            )
        value = hparams[spec]
        if value.numel() == 1:
            return lambda h, t: h[spec].reshape(())
        if value.dim() == 1 and value.shape[0] == steps:
            return lambda h, t: h[spec][t]
        raise HypergradientError(
            f"{where}: hparams[{spec!r}] (used as {name}) has shape {tuple(value.shape)}; "
            f"expected a scalar or a per-step schedule of shape ({steps},)."
        )
    if callable(spec):
        return spec
    if isinstance(spec, torch.Tensor):
        if spec.dim() == 0:
            return lambda h, t: spec.to(dtype)
        if spec.dim() == 1 and spec.shape[0] == steps:
            return lambda h, t: spec[t].to(dtype)
        raise HypergradientError(
            f"{where}: {name} tensor has shape {tuple(spec.shape)}; expected a scalar or a "
            f"schedule of shape ({steps},)."
        )
    if isinstance(spec, (int, float)):
        value = float(spec)
        return lambda h, t: value
    raise HypergradientError(
        f"{where}: {name} must be a float, a tensor (scalar or schedule), the name of a key "
        f"of hparams, or a callable (hparams, step) -> tensor; got {type(spec).__name__}."
    )
