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
"""The type of ``matvec(x) -> A x``: a linear map from a tree (a tensor or a dict of
tensors) to a tree of the same structure, the only access a solver has to ``A``.

Examples:
    >>> import torch
    >>> import hypergradient as hg
    >>> A = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    >>> matvec: hg.linalg.MatVec = lambda x: {"w": A @ x["w"]}  # on a dict of tensors
    >>> Ax = matvec({"w": torch.ones(2)})
    >>> sorted(Ax), bool(torch.equal(Ax["w"], torch.tensor([2.0, 4.0])))
    (['w'], True)
"""

Preconditioner = Callable[[Tree], Tree]
"""The type of ``precond(r) -> M^{-1} r`` for a symmetric positive definite ``M ~= A``: a
map from a tree to a tree of the same structure (the ``preconditioner`` of
:class:`~hypergradient.linalg.CG`).

Examples:
    >>> import torch
    >>> import hypergradient as hg
    >>> A = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))
    >>> jacobi: hg.linalg.Preconditioner = lambda r: r / A.diagonal()  # M = diag(A)
    >>> b = torch.ones(3, dtype=torch.float64)
    >>> hg.linalg.CG(tol=1e-10).solve(lambda v: A @ v, b).stats.num_steps
    3
    >>> hg.linalg.CG(tol=1e-10, preconditioner=jacobi).solve(lambda v: A @ v, b).stats.num_steps
    1
"""

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

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> class Richardson(hg.linalg.AbstractLinearSolver):  # x <- x + (b - A x) / 4
        ...     name = "richardson"
        ...     def solve(self, matvec, b, *, x0=None):
        ...         x = torch.zeros_like(b) if x0 is None else x0
        ...         for _ in range(100):
        ...             x = x + 0.25 * (b - matvec(x))
        ...         res = float(torch.linalg.norm(b - matvec(x)))
        ...         ok = res <= 1e-5 * float(torch.linalg.norm(b))
        ...         result = hg.Result.SUCCESSFUL if ok else hg.Result.MAX_STEPS_REACHED
        ...         return hg.Solution(x, hg.SolveStats(result, 100, res, 101))
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
        >>> x, stats = Richardson().solve(lambda v: A @ v, torch.tensor([4.0, 3.0]))
        >>> bool(torch.allclose(x, torch.ones(2))), stats.converged, stats.num_matvecs
        (True, True, 101)
    """

    name: ClassVar[str]
    requires_symmetric: ClassVar[bool] = True

    @abc.abstractmethod
    def solve(self, matvec: MatVec, b: Tree, *, x0: Tree | None = None) -> Solution:
        """Return ``Solution(x, stats)`` with ``A x ~= b``; see the class docstring."""


def register_solver(cls: type[AbstractLinearSolver]) -> type[AbstractLinearSolver]:
    """Class decorator: make ``cls`` available by ``cls.name`` in :func:`get_solver`.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> @hg.linalg.register_solver
        ... class ScaledIdentity(hg.linalg.AbstractLinearSolver):  # for A = c I: x = b / c
        ...     name = "scaled_identity"
        ...     def solve(self, matvec, b, *, x0=None):
        ...         x = b / matvec(torch.ones_like(b))
        ...         return hg.Solution(x, hg.SolveStats(hg.Result.SUCCESSFUL, 1, 0.0, 1))
        >>> x, stats = hg.linalg.solve(lambda v: 4 * v, torch.ones(2), "scaled_identity")
        >>> bool(torch.allclose(x, torch.full((2,), 0.25))), stats.converged
        (True, True)
        >>> "scaled_identity" in hg.linalg.available_solvers()
        True
        >>> del hg.linalg._base._SOLVERS["scaled_identity"]  # undo (for this example only)
    """
    _SOLVERS[cls.name] = cls
    return cls


def available_solvers() -> list[str]:
    """The names :func:`get_solver` and :func:`solve` accept, sorted.

    Examples:
        >>> import hypergradient as hg
        >>> hg.linalg.available_solvers()
        ['cg', 'exact', 'gmres', 'identity', 'minres', 'neumann']
    """
    return sorted(_SOLVERS)


def get_solver(solver: str | AbstractLinearSolver, **options: Any) -> AbstractLinearSolver:
    """Build a solver from its registry name and options, or pass an instance through.

    Examples:
        >>> import hypergradient as hg
        >>> solver = hg.linalg.get_solver("cg", tol=1e-8, max_steps=20)
        >>> type(solver).__name__, solver.tol, solver.max_steps
        ('CG', 1e-08, 20)
        >>> hg.linalg.get_solver(solver) is solver  # an instance passes through
        True
        >>> hg.linalg.get_solver("lu")
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: get_solver(solver='lu'): unknown linear solver; ...
    """
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

    Examples:
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
