r"""Meta-gradient estimators for long unrolled computations (learned optimizers, long inner runs).

One interface (learned_optimization's ``GradientEstimator``) for back-propagation and
zero-order estimators over an :class:`AbstractUnrolledSystem`, a computation of ``horizon``
steps ``step(state, theta, t) -> (state, loss)``:

* :class:`FullBackprop` -- back-propagation through whole episodes (exact, memory
  :math:`O(T)`, may explode);
* :class:`TruncatedBackprop` -- back-propagation inside truncations of ``K`` steps (cheap,
  biased);
* :class:`AntitheticES` -- antithetic evolution strategies (whole episodes: unbiased for the
  Gaussian-smoothed objective; truncated: biased);
* :class:`PES` -- persistent evolution strategies (truncated *and* unbiased);
* :class:`MixedEstimator` -- Metz et al. (2019): back-propagation and ES on the same
  perturbed unrolls, combined per coordinate by cross-fitted minimum-variance weights
  (:func:`cross_fitted_combine`; unbiased) or by Metz's inverse variances.

A meta-trainer calls::

    estimator = PES(system, sigma=0.01, num_pairs=8, truncation_length=10)
    state = estimator.init(theta, generator)
    for _ in range(outer_steps):
        estimate, state = estimator.estimate(theta, state, generator)
        theta = outer_update(theta, estimate.grad)   # estimate.loss, .standard_error() ...

:mod:`hypergradient.estimators.toys` holds systems with exact answers.

Examples:
    >>> import torch
    >>> from hypergradient.estimators import AffineRecurrence, FullBackprop
    >>> system = AffineRecurrence(horizon=4, a=0.5)  # x_{t+1} = x_t / 2 + theta, target 1
    >>> est = FullBackprop(system)
    >>> theta, gen = torch.zeros(1), torch.Generator().manual_seed(0)
    >>> state = est.init(theta, gen)
    >>> for _ in range(20):  # meta-training: one estimate, one SGD step on theta
    ...     estimate, state = est.estimate(theta, state, gen)
    ...     theta = theta - 0.3 * estimate.grad
    >>> bool(system.gradient(theta).abs().max() < 1e-4), state.episodes
    (True, 20)
"""

from ._base import AbstractGradientEstimator as AbstractGradientEstimator
from ._base import EstimatorState as EstimatorState
from ._base import GradientEstimate as GradientEstimate
from ._system import AbstractUnrolledSystem as AbstractUnrolledSystem
from ._system import UnrolledSystem as UnrolledSystem
from .backprop import FullBackprop as FullBackprop
from .backprop import TruncatedBackprop as TruncatedBackprop
from .es import PES as PES
from .es import AntitheticES as AntitheticES
from .mixed import CrossFitted as CrossFitted
from .mixed import MixedEstimator as MixedEstimator
from .mixed import cross_fitted_combine as cross_fitted_combine
from .mixed import inverse_variance_combine as inverse_variance_combine
from .toys import AffineRecurrence as AffineRecurrence
from .toys import LogisticMap as LogisticMap
from .toys import PowerRecurrence as PowerRecurrence

__all__ = [
    "AbstractGradientEstimator",
    "AbstractUnrolledSystem",
    "AffineRecurrence",
    "AntitheticES",
    "CrossFitted",
    "EstimatorState",
    "FullBackprop",
    "GradientEstimate",
    "LogisticMap",
    "MixedEstimator",
    "PES",
    "PowerRecurrence",
    "TruncatedBackprop",
    "UnrolledSystem",
    "cross_fitted_combine",
    "inverse_variance_combine",
]
