r"""Equilibrium (DEQ) layers with exact implicit and phantom gradients.

:class:`EquilibriumLayer` outputs the fixed point :math:`z^\star = f_\theta(z^\star, x)` of
an ``nn.Module`` ``f``.  What is solved and how it is differentiated are separate
arguments:

* forward solvers (:mod:`.solvers`): :class:`FixedPointIteration`, :class:`Anderson`,
  :class:`Broyden`; each reports a :class:`~hypergradient.SolveStats`;
* backward methods (:mod:`.backward`): :class:`ImplicitBackward` (exact, implicit function
  theorem with the core's linear solvers), :class:`PhantomBackward` (UPG) and
  :class:`NeumannPhantomBackward` (NPG), the phantom gradients of Geng et al. (2021).

Examples:
    >>> import torch, hypergradient as hg
    >>> f = torch.nn.Linear(4, 4).double()  # f(z, x) = 0.3 tanh(W z + b) + x
    >>> class F(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = f
    ...     def forward(self, z, x):
    ...         return 0.3 * torch.tanh(self.lin(z)) + x
    >>> layer = hg.deq.EquilibriumLayer(F(), backward="phantom")
    >>> z = layer(torch.randn(8, 4, dtype=torch.float64))
    >>> z.shape, layer.forward_stats.converged
    (torch.Size([8, 4]), True)
"""

from .backward import AbstractEquilibriumBackward as AbstractEquilibriumBackward
from .backward import ImplicitBackward as ImplicitBackward
from .backward import NeumannPhantomBackward as NeumannPhantomBackward
from .backward import PhantomBackward as PhantomBackward
from .backward import get_backward as get_backward
from .layer import EquilibriumLayer as EquilibriumLayer
from .solvers import AbstractFixedPointSolver as AbstractFixedPointSolver
from .solvers import Anderson as Anderson
from .solvers import Broyden as Broyden
from .solvers import FixedPointIteration as FixedPointIteration
from .solvers import get_fixed_point_solver as get_fixed_point_solver

__all__ = [
    "AbstractEquilibriumBackward",
    "AbstractFixedPointSolver",
    "Anderson",
    "Broyden",
    "EquilibriumLayer",
    "FixedPointIteration",
    "ImplicitBackward",
    "NeumannPhantomBackward",
    "PhantomBackward",
    "get_backward",
    "get_fixed_point_solver",
]
