"""The linear-solver interface: one contract, many solvers, one registry.

Every solver answers the same question: given a linear operator ``A`` (only through its
matrix-vector product ``matvec(x) = A x``) and a right-hand side ``b``, return ``x`` with
``A x ~= b``.  Vectors are *trees* (a tensor or a dict of tensors, see
:mod:`hypergradient._tree`), so the same solver works on a dense test matrix and on the
Hessian of a neural network applied to a dict of weight tensors.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

from .._errors import ConvergenceError, HypergradientError
from .._results import Solution
from .._tree import Tree

MatVec = Callable[[Tree], Tree]
Preconditioner = Callable[[Tree], Tree]

_SOLVERS: dict[str, type[AbstractLinearSolver]] = {}


class AbstractLinearSolver(abc.ABC):
    """Solve ``A x = b`` given ``matvec(x) = A x``.

    Contract of :meth:`solve` (documented once, here):

    * ``matvec`` maps a tree shaped like ``b`` to a tree shaped like ``b``; it is called
      only with detached trees unless the caller differentiates through the solve.
    * ``b`` is a tensor or dict of tensors; the returned ``Solution.value`` has its
      structure, shape and dtype.
    * ``x0`` is an optional initial guess (default zeros).
    * The returned ``Solution.stats`` (:class:`~hypergradient._results.SolveStats`) says
      whether the solve converged, how many steps and matvecs it took and the final
      residual norm ``||b - A x||``.  A solver never fails silently: a non-converged,
      diverged or broken-down solve is reported there, and :func:`solve` raises
      :class:`ConvergenceError` when called with ``throw=True``.

    Subclasses are final dataclasses that validate their options in ``__post_init__`` and
    set the class attributes ``name`` (registry key) and ``requires_symmetric`` (the
    solver's theory assumes a symmetric operator; CG and MINRES do, GMRES does not).
    """

    name: ClassVar[str]
    requires_symmetric: ClassVar[bool] = True

    @abc.abstractmethod
    def solve(self, matvec: MatVec, b: Tree, *, x0: Tree | None = None) -> Solution:
        """Return ``Solution(x, stats)`` with ``A x ~= b``; see the class docstring."""


def register_solver(cls: type[AbstractLinearSolver]) -> type[AbstractLinearSolver]:
    """Class decorator: make ``cls`` available by ``cls.name`` in :func:`get_solver`."""
    _SOLVERS[cls.name] = cls
    return cls


def available_solvers() -> list[str]:
    return sorted(_SOLVERS)


def get_solver(solver: str | AbstractLinearSolver, **options: Any) -> AbstractLinearSolver:
    """Build a solver from its registry name and options, or pass an instance through."""
    if isinstance(solver, AbstractLinearSolver):
        if options:
            raise HypergradientError(
                f"get_solver({type(solver).__name__}(...), **{sorted(options)}): options can "
                f"only be given with a solver name; set them on the solver object instead."
            )
        return solver
    if not isinstance(solver, str) or solver not in _SOLVERS:
        raise HypergradientError(
            f"get_solver(solver={solver!r}): unknown linear solver; expected one of "
            f"{available_solvers()} or an AbstractLinearSolver instance."
        )
    return _SOLVERS[solver](**options)


def solve(
    matvec: MatVec,
    b: Tree,
    solver: str | AbstractLinearSolver = "cg",
    *,
    x0: Tree | None = None,
    throw: bool = False,
    **options: Any,
) -> Solution:
    """Solve ``A x = b`` with a registered solver; ``throw=True`` raises on failure.

    Example::

        >>> import torch, hypergradient as hg
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x, stats = hg.linalg.solve(lambda v: A @ v, b, "cg", tol=1e-12)
        >>> bool(torch.allclose(x, torch.linalg.solve(A, b))) and stats.converged
        True
    """
    sol = get_solver(solver, **options).solve(matvec, b, x0=x0)
    if throw and not sol.stats.converged:
        raise ConvergenceError(
            f"hypergradient.linalg.solve(solver={solver!r}): {sol.stats.result.message} "
            f"(steps={sol.stats.num_steps}, residual={sol.stats.residual_norm:.3e})."
        )
    return sol
