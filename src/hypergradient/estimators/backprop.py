r"""Back-propagation through the unroll: truncated (TBPTT) and full.

Particle :math:`i` runs the truncation :math:`t_0, \dots, t_0+K-1` of its episode from the
state :math:`s_{t_0}`, *treated as a constant*, and returns

.. math::

    g_i = \nabla_\theta \frac1K \sum_{t=t_0}^{t_0+K-1} \ell_t\big(s_t(\theta; s_{t_0}), \theta\big),
    \qquad \hat g = \frac1S \sum_{i=1}^S g_i .

With :math:`K = T` (:class:`FullBackprop`) every truncation is a whole episode and
:math:`\hat g` is unbiased for :math:`\nabla L(\theta)`.  With :math:`K < T` the effect of
:math:`\theta` on :math:`s_{t_0}` through the earlier truncations is dropped, which biases
the estimate (typically toward short-horizon greed); the bias does not shrink with more
particles.  Cost per truncation: :math:`S K` steps forward and one backward through all of
them; memory :math:`O(S K)` step graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch

from .._errors import HypergradientError
from .._tree import tree_map
from ._base import (
    AbstractGradientEstimator,
    EstimatorState,
    GradientEstimate,
    check_count,
    check_flag,
    check_generator,
    check_state,
    check_system,
    check_theta,
    check_truncation,
)
from ._system import (
    AbstractUnrolledSystem,
    Theta,
    broadcast_theta,
    check_finite_losses,
    detach_particles,
    init_particles,
    leaves_of,
    run_window,
    tree_from_leaves,
)


@final
@dataclass(frozen=True, eq=False)
class TruncatedBackprop(AbstractGradientEstimator):
    r"""Truncated back-propagation through time over windows of ``truncation_length`` steps.

    See the module docstring for the math.  Biased for :math:`K < T`; unbiased (and equal
    to :class:`FullBackprop`) for ``truncation_length=None``.

    Args:
        system: the :class:`~hypergradient.estimators.AbstractUnrolledSystem`.
        truncation_length: :math:`K` in ``[1, horizon]``; ``None`` means whole episodes.
        num_particles: :math:`S`, independent episodes run side by side (``>= 1``; the
            standard error needs ``>= 2``).
        vectorize: run the particles as one :func:`torch.func.vmap` batch (see the
            system contract) instead of one by one.

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import TruncatedBackprop, AffineRecurrence
        >>> system = AffineRecurrence(horizon=4, a=0.5)
        >>> est = TruncatedBackprop(system, truncation_length=2)
        >>> theta, gen = torch.zeros(1, dtype=torch.float64), torch.Generator().manual_seed(0)
        >>> state = est.init(theta, gen)
        >>> grads = []
        >>> for _ in range(2):  # the two truncations of one episode
        ...     out, state = est.estimate(theta, state, gen)
        ...     grads.append(out.grad)
        >>> mean = sum(grads) / 2
        >>> torch.allclose(mean, system.truncated_backprop_gradient(theta, 2))
        True
        >>> bool((mean - system.gradient(theta)).abs() > 0.1)  # truncation bias
        True
    """

    system: AbstractUnrolledSystem
    truncation_length: int | None = None
    num_particles: int = 1
    vectorize: bool = False

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        check_system(where, self.system)
        check_truncation(where, self.truncation_length, self.system.horizon)
        check_count(where, "num_particles", self.num_particles, 1)
        check_flag(where, "vectorize", self.vectorize)

    def init(self, theta: Theta, generator: torch.Generator) -> EstimatorState:
        return _init(self, theta, generator)

    def estimate(
        self, theta: Theta, state: EstimatorState, generator: torch.Generator
    ) -> tuple[GradientEstimate, EstimatorState]:
        length = check_truncation("", self.truncation_length, self.system.horizon)
        return _estimate(self, length, theta, state, generator)


@final
@dataclass(frozen=True, eq=False)
class FullBackprop(AbstractGradientEstimator):
    r"""Back-propagation through whole episodes: an unbiased :math:`\nabla L(\theta)`.

    Each :meth:`estimate` runs one complete episode of ``horizon`` steps per particle and
    differentiates its mean loss exactly (no perturbation, no truncation).  Cost: memory
    grows with ``horizon``; gradients can explode on long, chaotic unrolls (Metz et al.
    2019), where :class:`~hypergradient.estimators.MixedEstimator` or ES help.

    Args:
        system: the unrolled system.
        num_particles: :math:`S` episodes per estimate.
        vectorize: vmap the particles (see the system contract).

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import AffineRecurrence, FullBackprop
        >>> system = AffineRecurrence(horizon=6, a=0.9)
        >>> est = FullBackprop(system, num_particles=2)
        >>> theta, gen = torch.zeros(1), torch.Generator().manual_seed(0)
        >>> out, state = est.estimate(theta, est.init(theta, gen), gen)
        >>> bool(torch.allclose(out.grad, system.gradient(theta), rtol=1e-4, atol=1e-6))
        True
        >>> out.episodes_finished, out.system_steps, state.t  # one whole episode each
        (1, 12, 6)
    """

    system: AbstractUnrolledSystem
    num_particles: int = 1
    vectorize: bool = False

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        check_system(where, self.system)
        check_count(where, "num_particles", self.num_particles, 1)
        check_flag(where, "vectorize", self.vectorize)

    def init(self, theta: Theta, generator: torch.Generator) -> EstimatorState:
        return _init(self, theta, generator)

    def estimate(
        self, theta: Theta, state: EstimatorState, generator: torch.Generator
    ) -> tuple[GradientEstimate, EstimatorState]:
        return _estimate(self, self.system.horizon, theta, state, generator)


Backprop = TruncatedBackprop | FullBackprop


def _init(est: Backprop, theta: Theta, generator: torch.Generator) -> EstimatorState:
    where = f"{type(est).__name__}.init(...)"
    check_theta(where, theta)
    check_generator(where, generator)
    particles = init_particles(est.system, generator, est.num_particles, est.vectorize)
    return EstimatorState(type(est).__name__, particles, 0, 1)


def _estimate(
    est: Backprop,
    length: int,
    theta: Theta,
    state: EstimatorState,
    generator: torch.Generator,
) -> tuple[GradientEstimate, EstimatorState]:
    """One truncation of ``length`` steps, differentiated from its first state."""
    where = f"{type(est).__name__}.estimate(...)"
    check_theta(where, theta)
    check_generator(where, generator)
    state = check_state(where, state, type(est).__name__, theta)
    n = est.num_particles
    # One leaf row per particle: particle i's loss depends on row i only, so one backward
    # pass of the summed losses yields every per-particle gradient.
    theta_b = tree_map(lambda x: x.requires_grad_(True), broadcast_theta(theta, n))
    restarts = []

    def restart():
        restarts.append(1)
        return init_particles(est.system, generator, n, est.vectorize)

    with torch.enable_grad():
        window = run_window(
            where, est.system, state.particles, state.t, theta_b, length, restart, est.vectorize
        )
        check_finite_losses(where, window.losses, window.t)
        per_particle = window.losses.mean(dim=1)
        leaves = leaves_of(theta_b)
        if per_particle.requires_grad:
            grads = torch.autograd.grad(
                per_particle.sum(), leaves, allow_unused=True, materialize_grads=True
            )
        else:  # the losses do not depend on theta at all
            grads = [torch.zeros_like(x) for x in leaves]
    for g in grads:
        if not bool(torch.isfinite(g).all()):
            raise HypergradientError(
                f"{where}: back-propagation through {length} steps gave NaN/inf gradients "
                f"(exploding through the unroll). Use a shorter truncation_length, PES, or "
                f"MixedEstimator (which falls back on ES where back-propagation fails)."
            )
    samples = tree_from_leaves([g.detach() for g in grads], theta)
    estimate = GradientEstimate(
        grad=tree_map(lambda x: x.mean(dim=0), samples),
        loss=per_particle.detach().mean(),
        samples=samples,
        t=window.t,
        episodes_finished=window.episodes_finished,
        system_steps=n * length,
    )
    particles = detach_particles(window.states)
    return estimate, EstimatorState(state.kind, particles, window.t, state.episodes + len(restarts))
