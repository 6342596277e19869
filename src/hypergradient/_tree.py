"""Arithmetic on the two kinds of vector the library moves around.

A *tree* here is either a single ``torch.Tensor`` or a flat ``dict[str, Tensor]`` (the
``params`` / ``hparams`` dictionaries of the functional core).  Linear solvers and
optimizers are written once against these helpers, so they work unchanged on a dense
``(n,)`` right-hand side in a unit test and on a dict of weight tensors in a real model.
All helpers are differentiable (no in-place ops on inputs), cost O(size of the tree) and
allocate one new tree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Tree = torch.Tensor | Mapping[str, torch.Tensor]


def tree_map(fn: Callable[..., torch.Tensor], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise to ``tree`` and the matching leaves of ``rest``."""
    if isinstance(tree, torch.Tensor):
        return fn(tree, *rest)
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def tree_add(a: Tree, b: Tree) -> Tree:
    return tree_map(torch.add, a, b)


def tree_sub(a: Tree, b: Tree) -> Tree:
    return tree_map(torch.sub, a, b)


def tree_scale(a: Tree, s: float | torch.Tensor) -> Tree:
    return tree_map(lambda x: x * s, a)


def tree_axpy(alpha: float | torch.Tensor, x: Tree, y: Tree) -> Tree:
    """``alpha * x + y``."""
    return tree_map(lambda xi, yi: yi + alpha * xi, x, y)


def tree_mul(a: Tree, b: Tree) -> Tree:
    return tree_map(torch.mul, a, b)


def tree_dot(a: Tree, b: Tree) -> torch.Tensor:
    """Euclidean inner product summed over all leaves (a 0-d tensor)."""
    if isinstance(a, torch.Tensor):
        return torch.sum(a * b)
    total = None
    for k, v in a.items():
        term = torch.sum(v * b[k])
        total = term if total is None else total + term
    if total is None:
        raise ValueError("tree_dot: got an empty dict; expected at least one tensor.")
    return total


def tree_norm(a: Tree) -> torch.Tensor:
    return torch.sqrt(tree_dot(a, a))


def tree_zeros_like(a: Tree) -> Tree:
    return tree_map(torch.zeros_like, a)


def tree_leaves(a: Tree) -> list[torch.Tensor]:
    return [a] if isinstance(a, torch.Tensor) else list(a.values())


def tree_size(a: Tree) -> int:
    return sum(t.numel() for t in tree_leaves(a))


def tree_detach(a: Tree) -> Tree:
    return tree_map(lambda t: t.detach(), a)


def tree_flatten_vector(a: Tree) -> torch.Tensor:
    """Concatenate all leaves into one ``(n,)`` vector (dict order)."""
    return torch.cat([t.reshape(-1) for t in tree_leaves(a)])


def tree_unflatten_vector(vector: torch.Tensor, like: Tree) -> Tree:
    """Inverse of :func:`tree_flatten_vector`, shaped like ``like``."""
    if isinstance(like, torch.Tensor):
        return vector.reshape(like.shape)
    out, start = {}, 0
    for k, v in like.items():
        out[k] = vector[start : start + v.numel()].reshape(v.shape)
        start += v.numel()
    return out


def tree_all_finite(a: Tree) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tree_leaves(a))
