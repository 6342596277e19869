r"""Optimizers and optimizer tools that work with any ``torch.optim`` training loop.

* :class:`Lookahead` (Zhang et al. 2019): wraps any ``torch.optim`` optimizer; ``k`` fast
  steps, then the slow weights move a fraction ``alpha`` toward the fast ones.
* :func:`propose_learning_rate` (Granziol et al. 2022): the largest stable learning rate
  for a batch size, from the top eigenvalue of mini-batch Hessians measured by Lanczos;
  :func:`scale_learning_rate` (a power law in the batch size: measured exponent 2/3
  for SGD, square root for Adam; ``rule="linear"`` for Granziol's SGD rule);
  :func:`hessian_eigenvalues` and :func:`hessian_spectral_density` (stochastic Lanczos
  quadrature) for the spectrum itself.

Examples:
    Measure the largest stable SGD rate of a least-squares problem at batch size 16, then train at
    half of it with Lookahead around SGD:

    >>> import torch
    >>> from hypergradient import optimizers
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(64, 3)
    >>> y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    >>> model, mse = torch.nn.Linear(3, 1), torch.nn.functional.mse_loss
    >>> p = optimizers.propose_learning_rate(
    ...     model, mse, (x, y), 16, safety=0.5, num_batches=4, num_steps=4, density=False
    ... )
    >>> opt = optimizers.Lookahead(torch.optim.SGD(model.parameters(), lr=p.lr), k=5)
    >>> for _ in range(100):
    ...     opt.zero_grad()
    ...     mse(model(x), y).backward()
    ...     opt.step()
    >>> round(p.lr, 2), bool(mse(model(x), y) < 1e-6)
    (0.27, True)
"""

from . import kfac as kfac
from . import towers as towers
from .kfac import KFAC as KFAC
from .lookahead import Lookahead as Lookahead
from .lookahead import noisy_quadratic_variance as noisy_quadratic_variance
from .sketchy import SketchySGD as SketchySGD
from .spectrum import Eigenvalues as Eigenvalues
from .spectrum import LanczosResult as LanczosResult
from .spectrum import LearningRateProposal as LearningRateProposal
from .spectrum import SpectralDensity as SpectralDensity
from .spectrum import SymmetricOperator as SymmetricOperator
from .spectrum import curvature_operator as curvature_operator
from .spectrum import hessian_eigenvalues as hessian_eigenvalues
from .spectrum import hessian_spectral_density as hessian_spectral_density
from .spectrum import lanczos as lanczos
from .spectrum import propose_learning_rate as propose_learning_rate
from .spectrum import scale_learning_rate as scale_learning_rate
from .spectrum import spectral_density as spectral_density
from .spectrum import top_eigenvalues as top_eigenvalues

__all__ = [
    "KFAC",
    "Eigenvalues",
    "LanczosResult",
    "LearningRateProposal",
    "Lookahead",
    "SketchySGD",
    "SpectralDensity",
    "SymmetricOperator",
    "curvature_operator",
    "hessian_eigenvalues",
    "hessian_spectral_density",
    "kfac",
    "lanczos",
    "noisy_quadratic_variance",
    "propose_learning_rate",
    "scale_learning_rate",
    "spectral_density",
    "top_eigenvalues",
    "towers",
]
