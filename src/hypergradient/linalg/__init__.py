"""Linear solvers for ``A x = b`` given only ``matvec(x) = A x`` (tensors or dicts of tensors).

See :mod:`hypergradient.linalg._base` for the solver contract and the registry, and
:mod:`hypergradient.linalg.solvers` for the solvers themselves.

Examples:
    >>> import torch
    >>> import hypergradient as hg
    >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> matvec = lambda x: {"w": A @ x["w"]}  # A only through its products, on a dict
    >>> b = {"w": torch.tensor([4.0, 3.0], dtype=torch.float64)}  # = A @ [1, 1]
    >>> x, stats = hg.linalg.solve(matvec, b, "cg", tol=1e-12)
    >>> bool(torch.allclose(x["w"], torch.ones(2, dtype=torch.float64))), stats.converged
    (True, True)
"""

from ._base import AbstractLinearSolver as AbstractLinearSolver
from ._base import MatVec as MatVec
from ._base import Preconditioner as Preconditioner
from ._base import available_solvers as available_solvers
from ._base import get_solver as get_solver
from ._base import register_solver as register_solver
from ._base import solve as solve
from .preconditioners import NystromPreconditioner as NystromPreconditioner
from .solvers import CG as CG
from .solvers import GMRES as GMRES
from .solvers import MINRES as MINRES
from .solvers import Dense as Dense
from .solvers import Identity as Identity
from .solvers import Neumann as Neumann
from .solvers import diagonal_preconditioner as diagonal_preconditioner
from .solvers import estimate_lambda_max as estimate_lambda_max

__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "AbstractLinearSolver",
    "Dense",
    "Identity",
    "MatVec",
    "Neumann",
    "NystromPreconditioner",
    "Preconditioner",
    "available_solvers",
    "diagonal_preconditioner",
    "estimate_lambda_max",
    "get_solver",
    "register_solver",
    "solve",
]
