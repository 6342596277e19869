r"""One interface for every meta-gradient estimator over an unrolled system.

A meta-trainer holds one estimator and one :class:`EstimatorState` and alternates

.. code-block:: python

    state = estimator.init(theta, generator)        # start the particles' episodes
    for outer_step in range(n):
        est, state = estimator.estimate(theta, state, generator)   # one truncation
        theta = outer_update(theta, est.grad)

as learned_optimization's ``GradientEstimator`` (``init_worker_state`` /
``compute_gradient_estimate``) does.  Every estimator returns a :class:`GradientEstimate`
whose ``grad`` is the mean of ``samples`` (one independent sample per particle or
antithetic pair), so its standard error is always available and estimators can be mixed by
their variances (:class:`~hypergradient.estimators.MixedEstimator`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import HypergradientError, check_tree
from .._io import checkpoint_type
from .._tree import Tree, tree_map
from ._system import AbstractUnrolledSystem, State, Theta, check_horizon, leaves_of


@checkpoint_type  # meta-training checkpoints hold the particles
@dataclass(frozen=True)
class EstimatorState:
    """The particles an estimator carries from one truncation to the next.

    Treat it as opaque: pass back what :meth:`AbstractGradientEstimator.estimate` returned.

    Attributes:
        kind: the name of the estimator class that built it (checked on use).
        particles: the system states of all particles: a list, or one stacked pytree
            (leading dimension = particles) when the estimator runs with ``vectorize=True``.
        t: steps taken in the current episode, ``0..horizon``; at ``horizon`` the episode
            is over and the next step starts a fresh one (all particles are synchronised).
        episodes: episodes begun so far (``1`` after ``init``).
        accumulators: PES only: per antithetic pair, the sum of the perturbations applied
            since the episode began; leaves of shape ``(num_pairs, *theta_leaf.shape)``.
        moments: ``MixedEstimator`` (covariance weighting) only: per coordinate, the decayed
            sums of the centred second moments of its two components over the previous
            truncations, leaves of shape ``(3, *theta_leaf.shape)`` (float64), or ``None``
            before the first truncation (see
            :func:`~hypergradient.estimators.cross_fitted_combine`).

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import PES, AffineRecurrence
        >>> est = PES(AffineRecurrence(horizon=4), sigma=0.1, num_pairs=3, truncation_length=2)
        >>> theta, gen = torch.zeros(1), torch.Generator().manual_seed(0)
        >>> state = est.init(theta, gen)
        >>> state.kind, state.t, state.episodes, len(state.particles), state.accumulators.shape
        ('PES', 0, 1, 6, torch.Size([3, 1]))
        >>> for _ in range(3):  # the third truncation starts a second episode
        ...     _, state = est.estimate(theta, state, gen)
        >>> state.t, state.episodes
        (2, 2)
    """

    kind: str
    particles: State
    t: int
    episodes: int
    accumulators: Tree | None = None
    moments: Tree | None = None


@dataclass(frozen=True)
class GradientEstimate:
    r"""One truncation's meta-gradient estimate.

    Attributes:
        grad: the estimate, shaped like ``theta`` (detached): the mean of ``samples``.
        loss: 0-d tensor, the mean loss over the truncation's steps and all particles (for
            the perturbation estimators, over the perturbed particles :math:`\theta \pm
            \epsilon`).
        samples: the independent per-particle (or per-pair) estimates whose mean is
            ``grad``: shaped like ``theta`` with a leading dimension ``S``.
        t: steps taken in the current episode after the truncation.
        episodes_finished: episodes that reached ``horizon`` during the truncation (0 or 1).
        system_steps: calls of ``system.step`` the truncation cost (all particles).
        extras: estimator-specific diagnostics (the mixed estimator's components and weights).

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import AffineRecurrence, FullBackprop
        >>> system = AffineRecurrence(horizon=3, dim=2, noise_scale=0.5)  # noisy episodes
        >>> est = FullBackprop(system, num_particles=4)
        >>> theta, gen = torch.zeros(2), torch.Generator().manual_seed(0)
        >>> out, _ = est.estimate(theta, est.init(theta, gen), gen)
        >>> out.num_samples, tuple(out.samples.shape), tuple(out.standard_error().shape)
        (4, (4, 2), (2,))
        >>> bool(torch.allclose(out.grad, out.samples.mean(0))), out.system_steps
        (True, 12)
    """

    grad: Tree
    loss: torch.Tensor
    samples: Tree
    t: int
    episodes_finished: int
    system_steps: int
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return leaves_of(self.samples)[0].shape[0]

    def variance(self) -> Tree:
        r"""Per-coordinate variance of ``grad``: :math:`\widehat{\mathrm{Var}}(\text{samples})/S`.

        The unbiased sample variance over the ``S`` independent samples, divided by ``S``
        (``grad`` is their mean).  Needs ``S >= 2``.
        """
        return sample_mean_variance("GradientEstimate.variance()", self.samples)

    def standard_error(self) -> Tree:
        """Per-coordinate standard error of ``grad`` (square root of :meth:`variance`)."""
        return tree_map(torch.sqrt, self.variance())


def sample_mean_variance(where: str, samples: Tree) -> Tree:
    """Variance of the mean of ``S`` i.i.d. samples stacked on dimension 0 (unbiased)."""
    s = leaves_of(samples)[0].shape[0]
    if s < 2:
        raise HypergradientError(
            f"{where}: the variance needs at least 2 independent samples, got {s}. Use "
            f"num_particles >= 2 (num_pairs >= 2 for the antithetic estimators)."
        )
    return tree_map(lambda x: x.var(dim=0, correction=1) / s, samples)


class AbstractGradientEstimator(abc.ABC):
    r"""Estimate the meta-gradient of an unrolled system, one truncation at a time.

    Contract:

    * :meth:`init` starts the estimator's particles (fresh episodes of ``system``) and
      returns their :class:`EstimatorState`; it runs no step.
    * :meth:`estimate` advances every particle by one truncation of ``truncation_length``
      steps (a whole episode for the "full" estimators) at the current ``theta`` and
      returns ``(GradientEstimate, next_state)``.  ``theta`` may change between calls (the
      outer optimizer's update); its structure (keys, shapes, dtypes) may not.  Episodes
      that end inside a truncation restart from ``system.init(generator)``.
    * All randomness (perturbations, new episodes) comes from ``generator``, so a seeded
      generator makes a run reproducible.  Nothing is modified in place.

    What the per-truncation estimates average to over an episode's :math:`W = T/K`
    truncations (and over particles and perturbations):

    * ``FullBackprop``: :math:`\nabla L(\theta)` (unbiased).
    * ``TruncatedBackprop``: the gradient with the state at each truncation's start held
      constant (biased for :math:`K < T`).
    * ``AntitheticES``: :math:`\nabla_\theta\, \mathbb E_\epsilon L(\theta+\epsilon)`, one
      perturbation per episode (unbiased for :math:`K = T`; truncated ES ignores the past,
      like ``TruncatedBackprop``).
    * ``PES``: :math:`\nabla_\theta\, \mathbb E\, L(\theta+\epsilon_1, \dots,
      \theta+\epsilon_W)`, one fresh perturbation per truncation (unbiased for every
      :math:`K`).
    * ``MixedEstimator``: :math:`\nabla_\theta\, \mathbb E_\epsilon L(\theta+\epsilon)`
      for :math:`K = T` (unbiased with its default cross-fitted weights;
      ``weighting="metz"`` adds an :math:`O(1/S)` bias from weights estimated on the samples
      they weigh).

    For a quadratic meta-objective (a linear system with a quadratic loss) every smoothed
    gradient above equals :math:`\nabla L(\theta)`.

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import PES, AbstractGradientEstimator
        >>> from hypergradient.estimators import AffineRecurrence, FullBackprop
        >>> system = AffineRecurrence(horizon=4)
        >>> theta, gen = torch.zeros(1), torch.Generator().manual_seed(0)
        >>> for est in [FullBackprop(system), PES(system, 0.1, num_pairs=2, truncation_length=2)]:
        ...     out, state = est.estimate(theta, est.init(theta, gen), gen)
        ...     print(isinstance(est, AbstractGradientEstimator), tuple(out.grad.shape),
        ...           out.t, out.system_steps)
        True (1,) 4 4
        True (1,) 2 8
    """

    system: AbstractUnrolledSystem

    @abc.abstractmethod
    def init(self, theta: Theta, generator: torch.Generator) -> EstimatorState:
        """Start the particles: fresh episodes from ``system.init(generator)``."""

    @abc.abstractmethod
    def estimate(
        self, theta: Theta, state: EstimatorState, generator: torch.Generator
    ) -> tuple[GradientEstimate, EstimatorState]:
        """One truncation at ``theta``: ``(estimate, next_state)`` (see the class contract)."""


# ----------------------------------------------------------------------------------------
# Validation shared by the estimators.


def check_system(where: str, system: object) -> None:
    if not isinstance(system, AbstractUnrolledSystem):
        raise HypergradientError(
            f"{where}: `system` must be an AbstractUnrolledSystem, got "
            f"{type(system).__name__}. Wrap two functions with "
            f"`hypergradient.estimators.UnrolledSystem(init_fn, step_fn, horizon=T)`."
        )
    check_horizon(where, getattr(system, "horizon", None))


def check_count(where: str, name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HypergradientError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")


def check_sigma(where: str, sigma: object) -> None:
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, (int, float))
        or not math.isfinite(sigma)
        or sigma <= 0
    ):
        raise HypergradientError(
            f"{where}: sigma (the perturbation standard deviation) must be a finite float > 0, "
            f"got {sigma!r}. Typical values: 1e-2 to 1e-1 in theta's unconstrained coordinates."
        )


def check_truncation(where: str, truncation_length: object, horizon: int) -> int:
    """The window length ``K``: ``None`` means whole episodes (``K = horizon``)."""
    if truncation_length is None:
        return horizon
    if (
        not isinstance(truncation_length, int)
        or isinstance(truncation_length, bool)
        or not 1 <= truncation_length <= horizon
    ):
        raise HypergradientError(
            f"{where}: truncation_length must be None (whole episodes) or an int in "
            f"[1, horizon={horizon}], got {truncation_length!r}."
        )
    return truncation_length


def check_flag(where: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise HypergradientError(f"{where}: {name} must be True or False, got {value!r}.")


def check_theta(where: str, theta: object) -> None:
    check_tree(where, "theta", theta, allow_tensor=True)


def check_generator(where: str, generator: object) -> None:
    if not isinstance(generator, torch.Generator):
        raise HypergradientError(
            f"{where}: `generator` must be a torch.Generator, got {type(generator).__name__}. "
            f"Use e.g. `torch.Generator().manual_seed(0)`."
        )


def check_state(where: str, state: object, kind: str, theta: Theta) -> EstimatorState:
    if not isinstance(state, EstimatorState):
        raise HypergradientError(
            f"{where}: `state` must be the EstimatorState returned by {kind}.init(...) or by "
            f"the previous estimate(...), got {type(state).__name__}."
        )
    if state.kind != kind:
        raise HypergradientError(
            f"{where}: this state was built by {state.kind}, not {kind}; every estimator "
            f"carries its own particles. Call {kind}.init(theta, generator) first."
        )
    if state.accumulators is not None:
        acc, like = leaves_of(state.accumulators), leaves_of(theta)
        if len(acc) != len(like) or any(
            a.shape[1:] != x.shape or a.dtype != x.dtype for a, x in zip(acc, like)
        ):
            raise HypergradientError(
                f"{where}: theta's structure (shapes "
                f"{[tuple(x.shape) for x in like]}, dtypes {[str(x.dtype) for x in like]}) "
                f"changed since init (accumulators shaped like "
                f"{[tuple(a.shape[1:]) for a in acc]}); theta may change value between "
                f"truncations, not shape or dtype. Re-run init for a new theta structure."
            )
    if state.moments is not None:
        moments, like = leaves_of(state.moments), leaves_of(theta)
        if len(moments) != len(like) or any(
            m.shape != (3, *x.shape) for m, x in zip(moments, like)
        ):
            raise HypergradientError(
                f"{where}: theta's structure (shapes {[tuple(x.shape) for x in like]}) "
                f"changed since init (the weights' moment history is shaped like "
                f"{[tuple(m.shape[1:]) for m in moments]}); theta may change value between "
                f"truncations, not shape. Re-run init for a new theta structure."
            )
    return state
