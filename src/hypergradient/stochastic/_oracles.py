r"""Batch oracles: the first and second derivatives the stochastic solvers combine.

For an inner batch :math:`i` and an outer batch :math:`j` at :math:`(z, v, x)`:

.. math::

    \nabla_z g_i(z, x),\qquad
    \nabla^2_{zz} g_i(z, x)\,v,\qquad
    \nabla^2_{xz} g_i(z, x)\,v = \nabla_x\big(\nabla_z g_i(z, x)\cdot v\big),\qquad
    \nabla_z f_j(z, x),\qquad \nabla_x f_j(z, x).

All come from ``torch.autograd`` (double backward): one forward of the batch loss, one
``create_graph`` backward for :math:`\nabla_z g_i`, then one backward of
:math:`\nabla_z g_i\cdot v` with respect to :math:`(z, x)` gives the Hessian-vector
product and the mixed term together.  Results are detached trees shaped like ``z`` / ``x``.
A derivative that does not exist (the loss does not use ``x``, or is linear in ``z``) is a
tree of zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._errors import HypergradientError
from .._tree import Tree, tree_leaves, tree_map
from ._problem import FiniteSumBilevelProblem


class InnerOracle(NamedTuple):
    """Derivatives of one inner batch loss :math:`g_i` at :math:`(z, v, x)`.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, inner_oracle
        >>> inner = lambda z, x, i: 0.5 * ((z - x) ** 2).sum()
        >>> outer = lambda z, x, j: 0.5 * (z**2).sum()
        >>> p = FiniteSumBilevelProblem(inner, outer, 2, 2)
        >>> o = inner_oracle(p, torch.ones(3), torch.ones(3), torch.tensor(0.5), 0)
        >>> o._fields, tuple(o.grad_z.shape), tuple(o.hvp.shape), tuple(o.cross.shape)
        (('grad_z', 'hvp', 'cross'), (3,), (3,), ())
    """

    grad_z: Tree  # nabla_z g_i, shaped like z
    hvp: Tree  # nabla^2_zz g_i v, shaped like z
    cross: Tree  # nabla^2_xz g_i v, shaped like x


class OuterOracle(NamedTuple):
    """Derivatives of one outer batch loss :math:`f_j` at :math:`(z, x)`.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, outer_oracle
        >>> inner = lambda z, x, i: 0.5 * ((z - x) ** 2).sum()
        >>> outer = lambda z, x, j: 0.5 * (z**2).sum()  # does not use x
        >>> p = FiniteSumBilevelProblem(inner, outer, 2, 2)
        >>> o = outer_oracle(p, torch.ones(3), {"lam": torch.tensor(0.5)}, 0)
        >>> o._fields, tuple(o.grad_z.shape), o.grad_x  # a missing derivative is zeros
        (('grad_z', 'grad_x'), (3,), {'lam': tensor(0.)})
    """

    grad_z: Tree  # nabla_z f_j, shaped like z
    grad_x: Tree  # nabla_x f_j, shaped like x


def _with_grad(tree: Tree) -> Tree:
    return tree_map(lambda t: t.detach().requires_grad_(True), tree)


def _rebuild(like: Tree, leaves: list[torch.Tensor]) -> Tree:
    if isinstance(like, torch.Tensor):
        return leaves[0]
    return dict(zip(like.keys(), leaves))


def _checked(where: str, name: str, value: object, dtype: torch.dtype) -> torch.Tensor:
    """A scalar floating loss of the iterates' dtype.  Finiteness is *not* checked here
    (that would synchronise every call): :func:`~hypergradient.stochastic.run` checks the
    iterates after each step, and ``init`` checks the losses once at the initial point."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise HypergradientError(
            f"{where}: `{name}(params, hparams, idx)` must return a scalar tensor (the mean "
            f"loss over the samples idx), got {got}. Reduce it with `.mean()`."
        )
    if value.dtype != dtype:
        raise HypergradientError(
            f"{where}: `{name}(params, hparams, idx)` returned dtype {value.dtype} but params "
            f"are {dtype}. Convert the data inside the loss with `.to({dtype})` (or the "
            f"iterates to {value.dtype})."
        )
    return value.reshape(())


def _grads(output: torch.Tensor, inputs: list[torch.Tensor], **kw) -> tuple[torch.Tensor, ...]:
    if not output.requires_grad:  # the output uses none of the inputs
        return tuple(torch.zeros_like(t) for t in inputs)
    return torch.autograd.grad(output, inputs, allow_unused=True, materialize_grads=True, **kw)


def inner_grad(problem: FiniteSumBilevelProblem, z: Tree, x: Tree, k: int) -> Tree:
    r""":math:`\nabla_z g_k(z, x)` for inner batch ``k``: one forward and one backward.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import inner_grad
        >>> from hypergradient.stochastic.problems import ridge_problem
        >>> t = ridge_problem(n_inner=10, n_outer=10, dim=3, batch_size=5)
        >>> x = torch.tensor(0.0, dtype=torch.float64)
        >>> grads = [inner_grad(t.problem, t.z_star(x), x, k) for k in range(2)]
        >>> tuple(grads[0].shape), bool(grads[0].abs().max() > 1e-3)  # one batch: not zero
        ((3,), True)
        >>> bool(torch.allclose(sum(grads) / 2, torch.zeros(3, dtype=torch.float64), atol=1e-10))
        True
    """
    zr, xd = _with_grad(z), tree_map(torch.Tensor.detach, x)
    z_leaves = tree_leaves(zr)
    with torch.enable_grad():
        loss = _checked(
            "hypergradient.stochastic (inner gradient)",
            "inner_loss",
            problem.inner_batch_loss(zr, xd, k),
            z_leaves[0].dtype,
        )
        grads = _grads(loss, z_leaves)
    return _rebuild(z, [g.detach() for g in grads])


def inner_oracle(
    problem: FiniteSumBilevelProblem, z: Tree, v: Tree, x: Tree, k: int, *, with_grad: bool = True
) -> InnerOracle:
    r"""Gradient, Hessian-vector product and mixed term of inner batch ``k``.

    Returns :class:`InnerOracle` ``(grad_z, hvp, cross)`` (``grad_z`` is ``None`` when
    ``with_grad=False``).  Cost: one forward, one ``create_graph`` backward and one double
    backward of the batch loss (about 4-5 forward costs); memory: the gradient graph.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, inner_oracle
        >>> # g(z, x) = |z - x|^2 / 2: grad_z = z - x, Hessian I, d/dx (grad_z . v) = -sum(v)
        >>> inner = lambda z, x, i: 0.5 * ((z - x) ** 2).sum()
        >>> outer = lambda z, x, j: 0.5 * (z**2).sum()
        >>> p = FiniteSumBilevelProblem(inner, outer, 2, 2)
        >>> z, v, x = torch.ones(3), torch.tensor([1.0, 2.0, 3.0]), torch.tensor(0.5)
        >>> o = inner_oracle(p, z, v, x, 0)
        >>> close = lambda a, b: bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6))
        >>> close(o.grad_z, z - x), close(o.hvp, v), close(o.cross, torch.tensor(-6.0))
        (True, True, True)
        >>> inner_oracle(p, z, v, x, 0, with_grad=False).grad_z is None
        True
    """
    zr, xr = _with_grad(z), _with_grad(x)
    z_leaves, x_leaves, v_leaves = tree_leaves(zr), tree_leaves(xr), tree_leaves(v)
    with torch.enable_grad():
        loss = _checked(
            "hypergradient.stochastic (inner oracle)",
            "inner_loss",
            problem.inner_batch_loss(zr, xr, k),
            z_leaves[0].dtype,
        )
        grads = _grads(loss, z_leaves, create_graph=True)
        dot = sum(torch.sum(g * u) for g, u in zip(grads, v_leaves))
        second = _grads(dot, z_leaves + x_leaves)
    n_z = len(z_leaves)
    return InnerOracle(
        _rebuild(z, [g.detach() for g in grads]) if with_grad else None,
        _rebuild(z, [s.detach() for s in second[:n_z]]),
        _rebuild(x, [s.detach() for s in second[n_z:]]),
    )


def outer_oracle(problem: FiniteSumBilevelProblem, z: Tree, x: Tree, k: int) -> OuterOracle:
    r""":math:`(\nabla_z f_k, \nabla_x f_k)` for outer batch ``k``: one forward, one backward.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, outer_oracle
        >>> inner = lambda z, x, i: 0.5 * ((z - x) ** 2).sum()
        >>> outer = lambda z, x, j: 0.5 * ((z - 1) ** 2).sum() + x**2  # grads: z - 1, 2 x
        >>> p = FiniteSumBilevelProblem(inner, outer, 2, 2)
        >>> z, x = torch.tensor([3.0, 5.0]), torch.tensor(0.25)
        >>> o = outer_oracle(p, z, x, 0)
        >>> close = lambda a, b: bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6))
        >>> close(o.grad_z, z - 1), close(o.grad_x, 2 * x)
        (True, True)
    """
    zr, xr = _with_grad(z), _with_grad(x)
    z_leaves, x_leaves = tree_leaves(zr), tree_leaves(xr)
    with torch.enable_grad():
        loss = _checked(
            "hypergradient.stochastic (outer oracle)",
            "outer_loss",
            problem.outer_batch_loss(zr, xr, k),
            z_leaves[0].dtype,
        )
        grads = _grads(loss, z_leaves + x_leaves)
    n_z = len(z_leaves)
    return OuterOracle(
        _rebuild(z, [g.detach() for g in grads[:n_z]]),
        _rebuild(x, [g.detach() for g in grads[n_z:]]),
    )


def hypergradient_estimate(
    problem: FiniteSumBilevelProblem, z: Tree, v: Tree, x: Tree, inner_k: int, outer_k: int
) -> Tree:
    r""":math:`D_x = \nabla^2_{xz} g_i(z, x)\,v + \nabla_x f_j(z, x)`, batches ``i, j``.

    At :math:`z = z^*(x)` and :math:`v = v^*(x) = -[\nabla^2_{zz}G]^{-1}\nabla_z F`, its
    mean over all pairs of batches is the exact hypergradient :math:`h'(x)`.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import hypergradient_estimate
        >>> from hypergradient.stochastic.problems import ridge_problem
        >>> t = ridge_problem(n_inner=10, n_outer=10, dim=3, batch_size=5)  # 2 + 2 batches
        >>> x = torch.tensor(0.0, dtype=torch.float64)
        >>> z, v = t.z_star(x), t.v_star(x)
        >>> pairs = [(i, j) for i in range(2) for j in range(2)]
        >>> d = [hypergradient_estimate(t.problem, z, v, x, i, j) for i, j in pairs]
        >>> bool(torch.allclose(sum(d) / 4, t.hypergradient(x), rtol=1e-8, atol=1e-12))
        True
    """
    cross = inner_oracle(problem, z, v, x, inner_k, with_grad=False).cross
    return tree_map(torch.add, cross, outer_oracle(problem, z, x, outer_k).grad_x)
