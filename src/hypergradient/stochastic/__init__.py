"""Stochastic bilevel optimisation on finite sums: SOBA, SABA, StocBiO, AmIGO.

* :class:`FiniteSumBilevelProblem` - inner and outer losses ``loss(params, hparams, idx)``
  that are means over the samples ``idx``, seen through a fixed partition into batches;
  its :meth:`~FiniteSumBilevelProblem.full_batch` losses are the core's
  ``loss(params, hparams)``.
* Solvers (one interface: ``init(problem, z0, x0, seed=...)``, ``step(problem, state)``):
  :class:`SOBA` and :class:`SABA` (single loop, Dagréou et al. 2022), :class:`StocBiO`
  (Ji et al. 2021) and :class:`AmIGO` (Arbel & Mairal 2022); :func:`get_solver` by name,
  :func:`run` to loop, time and record.
* :mod:`hypergradient.stochastic.problems` - problems with an exact solution.

Examples:
    >>> import torch
    >>> from hypergradient.stochastic import SABA, FiniteSumBilevelProblem, run
    >>> a = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    >>> c = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    >>> inner = lambda z, x, i: 0.5 * ((z - x - a[i]) ** 2).mean()  # z*(x) = x + mean(a)
    >>> outer = lambda z, x, j: 0.5 * ((z - c[j]) ** 2).mean()  # x* = mean(c) - mean(a)
    >>> p = FiniteSumBilevelProblem(inner, outer, 4, 4, inner_batch_size=2, outer_batch_size=2)
    >>> zero = torch.tensor(0.0, dtype=torch.float64)
    >>> out = run(SABA(inner_step=0.5, outer_step=0.2), p, zero, zero, num_steps=80)
    >>> out.status, round(float(out.state.x), 3)
    ('finished', 1.5)
"""

from . import problems as problems
from ._oracles import InnerOracle as InnerOracle
from ._oracles import OuterOracle as OuterOracle
from ._oracles import hypergradient_estimate as hypergradient_estimate
from ._oracles import inner_grad as inner_grad
from ._oracles import inner_oracle as inner_oracle
from ._oracles import outer_oracle as outer_oracle
from ._problem import FiniteSumBilevelProblem as FiniteSumBilevelProblem
from .solvers import SABA as SABA
from .solvers import SOBA as SOBA
from .solvers import AbstractBilevelSolver as AbstractBilevelSolver
from .solvers import AmIGO as AmIGO
from .solvers import BilevelState as BilevelState
from .solvers import RunResult as RunResult
from .solvers import SabaMemory as SabaMemory
from .solvers import StocBiO as StocBiO
from .solvers import available_solvers as available_solvers
from .solvers import get_solver as get_solver
from .solvers import register_solver as register_solver
from .solvers import run as run

__all__ = [
    "SABA",
    "SOBA",
    "AbstractBilevelSolver",
    "AmIGO",
    "BilevelState",
    "FiniteSumBilevelProblem",
    "InnerOracle",
    "OuterOracle",
    "RunResult",
    "SabaMemory",
    "StocBiO",
    "available_solvers",
    "get_solver",
    "hypergradient_estimate",
    "inner_grad",
    "inner_oracle",
    "outer_oracle",
    "problems",
    "register_solver",
    "run",
]
