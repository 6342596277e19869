"""Error type and input checks shared by the public entry points.

Every message starts with the call that failed, says what was expected and what was
received, and ends with how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class HypergradientError(ValueError):
    """Bad input to a hypergradient routine (a ``ValueError``, so callers may catch either).

    The message names the call, what was expected, what was received and how to fix it.

    Examples:
        >>> import hypergradient as hg
        >>> hg.linalg.get_solver("lu")
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: get_solver(solver='lu'): unknown linear ...
        >>> try:
        ...     hg.linalg.get_solver("lu")
        ... except ValueError as err:  # caught as a ValueError too
        ...     print(type(err).__name__)
        HypergradientError
    """


class ConvergenceError(RuntimeError):
    """An iterative solve failed and the caller asked for ``throw=True``.

    Without ``throw=True`` the failure is only reported, in the returned
    :class:`~hypergradient.SolveStats`.

    Examples:
        One CG step cannot solve a 2 x 2 system:

        >>> import torch
        >>> import hypergradient as hg
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> hg.linalg.solve(lambda v: A @ v, torch.ones(2), "cg", max_steps=1).stats.converged
        False
        >>> hg.linalg.solve(lambda v: A @ v, torch.ones(2), "cg", max_steps=1, throw=True)
        Traceback (most recent call last):
        ...
        hypergradient._errors.ConvergenceError: ...: did not converge within max_steps: ...
    """


def check_tree(where: str, name: str, tree: object, *, allow_tensor: bool = False) -> None:
    """A dict of str -> floating tensors with finite values."""
    if isinstance(tree, torch.Tensor) and allow_tensor:
        leaves = {"": tree}
    elif isinstance(tree, Mapping):
        leaves = tree
    else:
        raise HypergradientError(
            f"{where}: `{name}` must be a dict mapping names to tensors, got "
            f"{type(tree).__name__}. Wrap a module's weights with "
            f"`dict(model.named_parameters())` or `hg.params_of(model)`."
        )
    if len(leaves) == 0:
        raise HypergradientError(f"{where}: `{name}` is an empty dict; give at least one tensor.")
    for key, value in leaves.items():
        label = f"{name}[{key!r}]" if key else name
        if not isinstance(value, torch.Tensor):
            raise HypergradientError(
                f"{where}: {label} must be a torch.Tensor, got {type(value).__name__}. "
                f"Convert it with torch.as_tensor(..., dtype=torch.float64)."
            )
        if not value.is_floating_point():
            raise HypergradientError(
                f"{where}: {label} has dtype {value.dtype}; hypergradients need a floating "
                f"dtype. Convert it with `.double()` or `.float()`."
            )
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise HypergradientError(
                f"{where}: {label} (shape {tuple(value.shape)}) contains {bad} NaN/inf "
                f"value(s). Check the inner training run or the initial values."
            )


def check_scalar_loss(where: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise HypergradientError(
            f"{where}: `{name}(params, hparams)` must return a scalar torch.Tensor, got "
            f"{type(value).__name__}."
        )
    if value.numel() != 1:
        raise HypergradientError(
            f"{where}: `{name}(params, hparams)` must return a scalar loss, got a tensor of "
            f"shape {tuple(value.shape)}. Reduce it with `.mean()` or `.sum()`."
        )
    if not value.is_floating_point():
        raise HypergradientError(
            f"{where}: `{name}` returned dtype {value.dtype}; a floating dtype is required."
        )
    if not bool(torch.isfinite(value).all()):
        raise HypergradientError(
            f"{where}: `{name}(params, hparams)` returned {value.item()} (not finite). "
            f"Check the inputs and the learning rate of the inner training."
        )
    return value.reshape(())


def check_same_structure(where: str, name: str, got: Mapping, like: Mapping, like_name: str):
    """``got`` has the keys, shapes and dtypes of ``like``."""
    if set(got.keys()) != set(like.keys()):
        missing = sorted(set(like) - set(got))
        extra = sorted(set(got) - set(like))
        raise HypergradientError(
            f"{where}: `{name}` must have the keys of `{like_name}`; missing {missing}, "
            f"unexpected {extra}."
        )
    for k in like:
        if got[k].shape != like[k].shape:
            raise HypergradientError(
                f"{where}: `{name}[{k!r}]` has shape {tuple(got[k].shape)} but "
                f"`{like_name}[{k!r}]` has shape {tuple(like[k].shape)}; they must match."
            )
        if got[k].dtype != like[k].dtype:
            raise HypergradientError(
                f"{where}: `{name}[{k!r}]` has dtype {got[k].dtype} but "
                f"`{like_name}[{k!r}]` has dtype {like[k].dtype}; use one dtype for both "
                f"(e.g. call `.double()` on both)."
            )


# What torch says when a torch.compile'd graph is differentiated twice (AOTAutograd's
# backward is compiled for first derivatives only).
_COMPILED_DOUBLE_BACKWARD = ("donated buffer", "double backward", "create_graph=False")


def reraise_compiled_double_backward(where: str, err: RuntimeError) -> None:
    """Raise one :class:`HypergradientError` if ``err`` is torch refusing to differentiate a
    compiled graph twice; return (the caller re-raises ``err``) otherwise."""
    text = str(err)
    if not any(marker in text for marker in _COMPILED_DOUBLE_BACKWARD):
        return
    raise HypergradientError(
        f"{where}: the loss runs through a torch.compile'd graph, whose backward cannot be "
        f"differentiated again (Hessian-vector products and unrolled derivatives need that). "
        f"Pass the uncompiled function, or for a compiled nn.Module use "
        f"hg.as_function(compiled_model), which calls the original module eagerly "
        f"(BilevelTrainer does this itself: its training steps still run compiled)."
    ) from None
