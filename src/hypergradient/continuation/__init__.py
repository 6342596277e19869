r"""Analytic continuation of imaginary-time Green's functions.

Quantum Monte Carlo gives :math:`G(\tau)` on :math:`0 \le \tau \le \beta`; the physics is in
the real-frequency spectral function :math:`A(\omega) \ge 0`,

.. math::

    G(\tau) = \int d\omega\, K(\tau, \omega)\, A(\omega), \qquad
    K(\tau, \omega) = \frac{e^{-\tau\omega}}{1 + e^{-\beta\omega}} \quad \text{(fermions,}
    \textstyle\int A = 1\text{)}.

The singular values of :math:`K` decay exponentially, so inverting it amplifies noise: the
problem is ill-posed.  This package holds the problem statement, the baselines a user runs
today, and the learned unrolled optimizer of Huang & Yang (PRB 105, 075112, 2022).

* :mod:`~hypergradient.continuation.kernels`: real-frequency grids with quadrature weights,
  fermionic / bosonic / Matsubara kernels in a form that stays finite for any
  :math:`\beta|\omega|`, the :class:`Problem` (``G = problem.forward(A)``), its SVD, and
  :func:`check_green` (one clear error for bad input).
* :mod:`~hypergradient.continuation.spectra`: synthetic spectra (Gaussian and Lorentzian
  mixtures, gapped, a quasiparticle peak on a background), independent or correlated
  Gaussian noise, datasets, and a held-out test set on disk with a checksum.
* :mod:`~hypergradient.continuation.max_entropy`: maximum entropy (Bryan's method in the singular
  space; alpha by the chi-squared kink, classic, Bryan's average or historic) and
  non-negative Tikhonov least squares.
* :mod:`~hypergradient.continuation.unrolled_solver`: :class:`LearnedContinuation`, ADMM
  unrolled for a fixed number of well-conditioned steps with learned per-iteration
  parameters, positivity and normalisation at every iterate; :func:`meta_train` through the
  unrolled iterations (``truncate=k`` for the truncated mode; ``estimator="full"`` or
  ``"truncated"`` drives it with :mod:`hypergradient.estimators` on a
  :class:`ContinuationSystem`, with the same gradients); :func:`continue_spectrum`.
* :mod:`~hypergradient.continuation.networks`: the fully connected network baseline
  (:class:`FullyConnectedContinuation`, :func:`train_network`).
* :mod:`~hypergradient.continuation.metrics`: the L1 error of A, peak position and weight
  errors, the residual in G (recorded, never used to choose) and :func:`select`, which picks
  a method's setting by the validation L1 error of A.

Examples:
    >>> import torch
    >>> from hypergradient import continuation as ac
    >>> problem = ac.Problem(ac.tau_grid(10.0, 41), 10.0, ac.uniform_grid(-6.0, 6.0, 121))
    >>> A = torch.exp(-0.5 * (problem.grid.omega - 1.0) ** 2)
    >>> A = A / problem.grid.integrate(A)  # normalised: integral A = 1
    >>> G = problem.forward(A)
    >>> G.shape, bool(torch.allclose(G[0] + G[-1], torch.tensor(1.0, dtype=G.dtype)))
    (torch.Size([41]), True)
    >>> result = ac.maxent(G, problem, sigma=1e-4 * torch.ones_like(G), alpha="historic")
    >>> bool((result.A > 0).all()), round(float(problem.grid.integrate(result.A)), 2)
    (True, 1.0)
"""

from .kernels import Grid as Grid
from .kernels import Problem as Problem
from .kernels import ReducedKernel as ReducedKernel
from .kernels import bosonic_kernel as bosonic_kernel
from .kernels import check_green as check_green
from .kernels import fermionic_kernel as fermionic_kernel
from .kernels import matsubara_kernel as matsubara_kernel
from .kernels import nonuniform_grid as nonuniform_grid
from .kernels import tau_grid as tau_grid
from .kernels import uniform_grid as uniform_grid
from .max_entropy import MaxEntResult as MaxEntResult
from .max_entropy import maxent as maxent
from .max_entropy import tikhonov_nnls as tikhonov_nnls
from .metrics import l1_error as l1_error
from .metrics import peak_errors as peak_errors
from .metrics import residual as residual
from .metrics import select as select
from .networks import FullyConnectedContinuation as FullyConnectedContinuation
from .networks import train_network as train_network
from .spectra import FAMILIES as FAMILIES
from .spectra import SpectralDataset as SpectralDataset
from .spectra import add_noise as add_noise
from .spectra import load_test_set as load_test_set
from .spectra import make_dataset as make_dataset
from .spectra import sample_spectra as sample_spectra
from .spectra import split_by_family as split_by_family
from .spectra import write_test_set as write_test_set
from .unrolled_solver import ContinuationSystem as ContinuationSystem
from .unrolled_solver import LearnedContinuation as LearnedContinuation
from .unrolled_solver import continue_spectrum as continue_spectrum
from .unrolled_solver import meta_train as meta_train

__all__ = [
    "ContinuationSystem",
    "FAMILIES",
    "FullyConnectedContinuation",
    "Grid",
    "LearnedContinuation",
    "MaxEntResult",
    "Problem",
    "ReducedKernel",
    "SpectralDataset",
    "add_noise",
    "bosonic_kernel",
    "check_green",
    "continue_spectrum",
    "fermionic_kernel",
    "l1_error",
    "load_test_set",
    "make_dataset",
    "matsubara_kernel",
    "maxent",
    "meta_train",
    "nonuniform_grid",
    "peak_errors",
    "residual",
    "sample_spectra",
    "select",
    "split_by_family",
    "tau_grid",
    "tikhonov_nnls",
    "train_network",
    "uniform_grid",
    "write_test_set",
]
