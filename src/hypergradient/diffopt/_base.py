"""Functional optimizers: the ``GradientTransformation`` contract and its helpers.

A :class:`GradientTransformation` is a pair of pure functions (optax-style):

* ``init(params) -> state`` builds the optimizer state (an immutable ``NamedTuple`` of
  trees and tensors) for a tree of parameters;
* ``update(grads, state, params) -> (updates, new_state)`` turns gradients into *updates*,
  the deltas to **add** to the parameters (:func:`apply_updates`).

Nothing is modified in place, so autograd can differentiate a whole unrolled training run
with respect to the initial parameters, the gradients and every tensor hyperparameter
(learning rate, momentum, betas, eps, ...).  A *tree* is a tensor or a flat
``dict[str, Tensor]`` (see :mod:`hypergradient._tree`).

Hyperparameters of the optimizers in :mod:`hypergradient.diffopt.alias` may be

* a Python ``float`` (a constant),
* a 0-d floating tensor (possibly ``requires_grad=True``: a hyperparameter to
  differentiate through), or
* a callable ``schedule(count: int) -> float | Tensor`` where ``count`` is the number of
  updates already applied (0 at the first update), like ``LambdaLR``'s epoch counter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from .._errors import HypergradientError, check_same_structure
from .._tree import Tree, tree_add, tree_map

Params = Tree
Grads = Tree
Updates = Tree
State = Any
HParam = float | torch.Tensor | Callable[[int], float | torch.Tensor]


class GradientTransformation(NamedTuple):
    """A functional optimizer: ``init(params) -> state`` and
    ``update(grads, state, params) -> (updates, state)``.

    ``updates`` has the structure of ``grads`` and is the delta to add to the parameters
    (already multiplied by ``-lr``); apply it with :func:`apply_updates`.  ``state`` is
    immutable: ``update`` returns a new one and never mutates its inputs.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> sign_sgd = hg.diffopt.GradientTransformation(  # a custom optimizer: -0.5 sign(g)
        ...     init=lambda params: (),
        ...     update=lambda grads, state, params=None: (-0.5 * grads.sign(), state))
        >>> params = torch.tensor([1.0, -1.0])
        >>> updates, state = sign_sgd.update(torch.tensor([3.0, -2.0]), sign_sgd.init(params))
        >>> bool(torch.equal(hg.diffopt.apply_updates(params, updates), torch.tensor([0.5, -0.5])))
        True
        >>> tx = hg.diffopt.sgd(lr=0.1)  # the built-in optimizers are GradientTransformations
        >>> isinstance(tx, hg.diffopt.GradientTransformation), tx._fields
        (True, ('init', 'update'))
    """

    init: Callable[[Params], State]
    update: Callable[..., tuple[Updates, State]]


def _check_tree_kind(where: str, name: str, tree: object) -> None:
    if isinstance(tree, torch.Tensor):
        return
    if not isinstance(tree, Mapping) or not all(isinstance(v, torch.Tensor) for v in tree.values()):
        raise HypergradientError(
            f"{where}: `{name}` must be a tensor or a dict mapping names to tensors, got "
            f"{type(tree).__name__}. Use e.g. `dict(model.named_parameters())`."
        )
    if len(tree) == 0:
        raise HypergradientError(f"{where}: `{name}` is an empty dict; give at least one tensor.")


def check_like(where: str, name: str, tree: object, like: Tree, like_name: str) -> None:
    """``tree`` is a tree with the structure (keys, shapes, dtypes) of ``like``.  O(#leaves)."""
    _check_tree_kind(where, name, tree)
    if isinstance(like, torch.Tensor):
        if not isinstance(tree, torch.Tensor):
            raise HypergradientError(
                f"{where}: `{name}` must be a tensor like `{like_name}`, got a "
                f"{type(tree).__name__}."
            )
        if tree.shape != like.shape:
            raise HypergradientError(
                f"{where}: `{name}` has shape {tuple(tree.shape)} but `{like_name}` has shape "
                f"{tuple(like.shape)}; they must match."
            )
        return
    if isinstance(tree, torch.Tensor):
        raise HypergradientError(
            f"{where}: `{name}` must be a dict with the keys of `{like_name}` "
            f"{sorted(like)}, got a tensor."
        )
    check_same_structure(where, name, tree, like, like_name)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates`` leaf-wise (a new tree; the inputs are not modified).

    Args:
        params: a tensor or dict of tensors.
        updates: the first output of ``GradientTransformation.update``; same structure.

    Returns:
        A new tree ``{k: params[k] + updates[k]}`` (or a tensor), differentiable in both.

    Cost: one addition per parameter entry.

    Examples:
        >>> p = {"w": torch.zeros(2)}
        >>> apply_updates(p, {"w": torch.ones(2)})["w"]
        tensor([1., 1.])
    """
    where = "hypergradient.diffopt.apply_updates(params, updates)"
    _check_tree_kind(where, "params", params)
    check_like(where, "updates", updates, params, "params")
    return tree_add(params, updates)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transformations: the updates of each one are the gradients of the next.

    ``chain(a, b).update(g, (sa, sb), p)`` computes ``u, sa' = a.update(g, sa, p)`` then
    ``u', sb' = b.update(u, sb, p)`` and returns ``(u', (sa', sb'))``.

    Args:
        *transforms: at least one :class:`GradientTransformation`.

    Returns:
        A :class:`GradientTransformation` whose state is the tuple of the inner states.

    Cost: the sum of the costs of the inner transformations.

    Examples:
        >>> from hypergradient.diffopt import adam
        >>> tx = chain(adam(lr=1e-3))  # same updates as adam(lr=1e-3) alone
    """
    where = "hypergradient.diffopt.chain(*transforms)"
    if len(transforms) == 0:
        raise HypergradientError(
            f"{where}: expected at least one GradientTransformation, got none. Pass e.g. "
            f"`chain(sgd(lr=0.1))`."
        )
    for i, t in enumerate(transforms):
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise HypergradientError(
                f"{where}: transforms[{i}] must be a GradientTransformation (with callable "
                f"`init` and `update`), got {type(t).__name__}. Build one with e.g. "
                f"`hypergradient.diffopt.sgd(lr=0.1)`."
            )
    transforms = tuple(transforms)

    def init(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(grads: Grads, state: tuple, params: Params | None = None) -> tuple[Updates, tuple]:
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise HypergradientError(
                f"{where}.update: `state` must be the tuple of {len(transforms)} inner states "
                f"returned by `init`/`update` of this chain, got {type(state).__name__}"
                f"{f' of length {len(state)}' if isinstance(state, tuple) else ''}."
            )
        new_states = []
        for t, s in zip(transforms, state, strict=True):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    return GradientTransformation(init, update)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    r"""Square root with finite derivatives of every order at (and below) zero.

    ``safe_sqrt(x) = sqrt(x)`` for ``x > 0`` (bit-identical to :func:`torch.sqrt`) and
    ``0`` for ``x <= 0`` (NaN stays NaN).  Its derivative is :math:`1/(2\sqrt{x})` for
    ``x > 0`` and ``0`` for ``x <= 0``.

    Why: :math:`d\sqrt{x}/dx = \infty` at ``x = 0``.  In Adam, RMSProp and Adagrad the
    second moment of a gradient entry that is exactly zero is ``0``; backpropagating
    through ``torch.sqrt(0)`` gives ``0 / 0 = NaN`` (or ``inf * 0``), which poisons the
    whole hypergradient of an unrolled run.  ``torch.where(x > 0, sqrt(x), 0)`` alone
    is not enough (its backward still evaluates ``sqrt``'s derivative at 0 and multiplies
    ``inf`` by the zero mask); so the square root is taken of ``where(x > 0, x, 1)``,
    which is never zero, and the result is masked afterwards.

    Cost: three elementwise ops and a boolean mask more than :func:`torch.sqrt`.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> torch.autograd.grad(torch.sqrt(x).sum(), x)[0].isinf().tolist()  # torch.sqrt
        [True, False]
        >>> y = hg.diffopt.safe_sqrt(x)
        >>> (grad,) = torch.autograd.grad(y.sum(), x)
        >>> bool(torch.equal(y, torch.sqrt(x))), bool(torch.equal(grad, torch.tensor([0.0, 0.25])))
        (True, True)
    """
    positive = x > 0
    root = torch.sqrt(torch.where(positive, x, 1.0))
    return torch.where(positive, root, x * 0.0)


# --------------------------------------------------------------------------- hyperparameters


class Interval(NamedTuple):
    """A closed/open interval used to validate a hyperparameter."""

    low: float = 0.0
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        hi = "inf" if math.isinf(self.high) else f"{self.high:g}"
        return (
            f"{'(' if self.low_open else '['}{self.low:g}, {hi}"
            f"{')' if self.high_open or math.isinf(self.high) else ']'}"
        )


NONNEGATIVE = Interval()
UNIT_OPEN = Interval(0.0, 1.0, high_open=True)
UNIT_CLOSED = Interval(0.0, 1.0, high_open=False)


def _check_value(where: str, name: str, value: float, interval: Interval, origin: str) -> None:
    if math.isnan(value) or value not in interval:
        raise HypergradientError(
            f"{where}: `{name}` must be in {interval}, got {value!r}{origin}. Pass a value "
            f"in {interval}."
        )


def check_hparam(where: str, name: str, value: object, interval: Interval) -> HParam:
    """Validate a hyperparameter given as float, 0-d tensor or schedule; return it.

    Floats and tensors are range-checked now (a tensor through its current value);
    schedules are checked on every call by :func:`resolve_hparam`.
    """
    if isinstance(value, bool):
        raise HypergradientError(
            f"{where}: `{name}` must be a float, a 0-d tensor or a callable schedule, got "
            f"the bool {value!r}. Pass a number such as 0.1."
        )
    if isinstance(value, (int, float)):
        _check_value(where, name, float(value), interval, "")
        return float(value)
    if isinstance(value, torch.Tensor):
        _check_tensor_hparam(where, name, value, "")
        _check_value(where, name, float(value.detach()), interval, " (tensor value)")
        return value
    if callable(value):
        return value
    raise HypergradientError(
        f"{where}: `{name}` must be a float, a 0-d floating tensor or a callable "
        f"`schedule(count) -> float | Tensor`, got {type(value).__name__}."
    )


def _check_tensor_hparam(where: str, name: str, value: torch.Tensor, origin: str) -> None:
    if value.dim() != 0 or not value.is_floating_point():
        raise HypergradientError(
            f"{where}: `{name}`{origin} must be a 0-d floating tensor, got a tensor of shape "
            f"{tuple(value.shape)} and dtype {value.dtype}. Use e.g. "
            f"`torch.tensor(0.1, dtype=torch.float64, requires_grad=True)`."
        )


def resolve_hparam(
    where: str, name: str, value: HParam, count: int, interval: Interval
) -> float | torch.Tensor:
    """The value of hyperparameter ``value`` at update number ``count`` (0-based).

    A schedule's float output is range-checked; a tensor output only for its shape (so
    no device synchronisation is forced).
    """
    if not callable(value) or isinstance(value, torch.Tensor):
        return value
    out = value(count)
    origin = f" (returned by the schedule at count={count})"
    if isinstance(out, torch.Tensor):
        _check_tensor_hparam(where, name, out, origin)
        return out
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        _check_value(where, name, float(out), interval, origin)
        return float(out)
    raise HypergradientError(
        f"{where}: the schedule for `{name}` must return a float or a 0-d tensor, got "
        f"{type(out).__name__} at count={count}."
    )


def is_zero(value: HParam) -> bool:
    """True only for the Python number 0 (a tensor or schedule may become non-zero)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def new_count() -> torch.Tensor:
    """The step counter of a fresh state: a 0-d int64 CPU tensor (reading it never syncs
    an accelerator)."""
    return torch.zeros((), dtype=torch.int64)


def check_state(where: str, state: object, cls: type) -> None:
    if not isinstance(state, cls):
        raise HypergradientError(
            f"{where}: `state` must be the {cls.__name__} returned by this optimizer's "
            f"`init` or `update`, got {type(state).__name__}."
        )


def detach_state(state: Any) -> Any:
    """Detach every tensor of an optimizer state (NamedTuples, tuples, dicts, tensors).

    Useful to truncate backpropagation through a long unrolled run.  Cost: O(state size),
    no copy of the data.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> grads = {"w": torch.ones(2, requires_grad=True)}  # e.g. from create_graph=True
        >>> tx = hg.diffopt.adam(lr=0.1)
        >>> _, state = tx.update(grads, tx.init({"w": torch.zeros(2)}))
        >>> cut = hg.diffopt.detach_state(state)
        >>> state.exp_avg["w"].requires_grad, cut.exp_avg["w"].requires_grad, type(cut).__name__
        (True, False, 'AdamState')
    """
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, Mapping):
        return {k: detach_state(v) for k, v in state.items()}
    if isinstance(state, tuple):
        items = [detach_state(v) for v in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    return state


def map_optional(fn: Callable[..., torch.Tensor], tree: Tree | None, *rest: Tree) -> Tree | None:
    return None if tree is None else tree_map(fn, tree, *rest)
