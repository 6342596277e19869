r"""Optimizers and optimizer tools that work with any ``torch.optim`` training loop.

* :class:`Lookahead` (Zhang et al. 2019): wraps any ``torch.optim`` optimizer; ``k`` fast
  steps, then the slow weights move a fraction ``alpha`` toward the fast ones.
* :func:`propose_learning_rate` (Granziol et al. 2022): the largest stable learning rate
  for a batch size, from the top eigenvalue of mini-batch Hessians measured by Lanczos;
  :func:`scale_learning_rate` (linear for SGD, square root for Adam);
  :func:`hessian_eigenvalues` and :func:`hessian_spectral_density` (stochastic Lanczos
  quadrature) for the spectrum itself.
"""

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
    "lanczos",
    "noisy_quadratic_variance",
    "propose_learning_rate",
    "scale_learning_rate",
    "spectral_density",
    "top_eigenvalues",
]
