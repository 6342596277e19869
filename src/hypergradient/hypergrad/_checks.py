"""Input validation shared by the hypergradient entry points."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .._errors import HypergradientError, check_tree

# Names that almost always mean "a hyperparameter of the inner optimizer": the inner optimum
# does not depend on them, so implicit differentiation returns zero for them.
OPTIMIZER_HPARAM_NAMES = (
    "lr",
    "log_lr",
    "learning_rate",
    "log_learning_rate",
    "step_size",
    "momentum",
    "beta",
    "betas",
    "beta1",
    "beta2",
    "nesterov",
)


def check_callable(where: str, name: str, fn: object) -> None:
    if not callable(fn):
        raise HypergradientError(
            f"{where}: `{name}` must be a callable `{name}(params, hparams) -> scalar tensor`, "
            f"got {type(fn).__name__}."
        )


def check_params_hparams(where: str, params: object, hparams: object, params_name="params"):
    check_tree(where, params_name, params)
    check_tree(where, "hparams", hparams)
    assert isinstance(params, Mapping) and isinstance(hparams, Mapping)  # for type checkers
    dtypes = {v.dtype for v in params.values()}
    if len(dtypes) != 1:
        raise HypergradientError(
            f"{where}: all tensors in `{params_name}` must share one dtype, got "
            f"{ {k: str(v.dtype) for k, v in params.items()} }. Convert them with `.double()`."
        )
    (dtype,) = dtypes
    for k, v in hparams.items():
        if v.dtype != dtype:
            raise HypergradientError(
                f"{where}: hparams[{k!r}] has dtype {v.dtype} but {params_name} use {dtype}; "
                f"use one dtype for both (e.g. `hparams = {{k: v.to({dtype}) ...}}`)."
            )
    overlap = set(params) & set(hparams)
    if overlap:
        raise HypergradientError(
            f"{where}: the keys {sorted(overlap)} appear in both `{params_name}` and `hparams`; "
            f"a tensor is either an inner parameter or a hyperparameter. Rename one of them."
        )
    return dtype


def check_loss_dtype(where: str, name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    if value.dtype != dtype:
        raise HypergradientError(
            f"{where}: `{name}(params, hparams)` returned dtype {value.dtype} but params are "
            f"{dtype}. The data inside the loss probably has another dtype: convert it with "
            f"`.to({dtype})` (or convert params and hparams to {value.dtype})."
        )


def ignored_hparam_error(where: str, keys: list[str], *, implicit: bool) -> HypergradientError:
    optimizer_like = [k for k in keys if k.lower() in OPTIMIZER_HPARAM_NAMES]
    if implicit and optimizer_like:
        return HypergradientError(
            f"{where}: hparams {optimizer_like} look like inner-optimizer hyperparameters "
            f"(learning rate, momentum). The inner optimum w* does not depend on them, so "
            f"implicit differentiation gives exactly zero. Differentiate through the training "
            f"run instead: `hg.unrolled_hypergrad(..., lr={optimizer_like[0]!r})` (mode "
            f"'reverse' or 'forward')."
        )
    what = "the inner loss's gradient nor the outer loss" if implicit else "any loss or step"
    return HypergradientError(
        f"{where}: hparams {keys} affect neither {what}, so their hypergradient would be "
        f"silently zero. Remove them from `hparams`, or use them inside `inner_loss` "
        f"(e.g. `loss = data_loss + 0.5 * (hparams['log_l2'].exp() * w**2).sum()`)."
    )
