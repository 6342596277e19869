r"""Zero-order estimators: antithetic evolution strategies and Persistent ES (PES).

Both smooth the meta-objective with Gaussian perturbations
:math:`\epsilon \sim \mathcal N(0, \sigma^2 I)` of :math:`\theta` and need only losses, never
a backward pass, so they are immune to exploding gradients and work with non-differentiable
steps.  Each of :math:`S` antithetic pairs runs two particles, :math:`\theta + \epsilon_i`
and :math:`\theta - \epsilon_i`, from the same state and on the same data (the system's
``step`` is pure), which cancels the even part of the loss around :math:`\theta`.

**Antithetic ES** over a truncation of :math:`K` steps with window means
:math:`L^\pm_i = \frac1K\sum_k \ell^\pm_{i,k}`:

.. math::

    g_i = \frac{L^+_i - L^-_i}{2\sigma^2}\,\epsilon_i, \qquad
    \mathbb E[g_i] = \nabla_\theta\, \mathbb E_\epsilon\, L(\theta+\epsilon).

With whole episodes (:math:`K = T`) this is unbiased for the smoothed objective.  With
:math:`K < T` (truncated ES) both particles start from the state reached by the previous
truncation's positive particle and the perturbation's effect on that state is ignored:
biased, like truncated back-propagation.

**PES** (Vicol, Metz, Sohl-Dickstein 2021) keeps both particles of every pair running
across truncations, and a per-pair accumulator :math:`\xi_i` of all the perturbations used
since its episode began.  Truncation :math:`w` draws a fresh :math:`\epsilon_{i,w}`, sets
:math:`\xi_i \leftarrow \xi_i + \epsilon_{i,w}` and estimates

.. math::

    g_i = \frac{1}{2\sigma^2 K} \sum_{k=0}^{K-1} \big(\ell^+_{i,k} - \ell^-_{i,k}\big)\, \xi_{i,k},

where :math:`\xi_{i,k} = \xi_i` for the steps before an episode restart inside the
truncation and :math:`\epsilon_{i,w}` after it (the accumulator restarts with the episode:
a fresh episode depends only on the perturbations applied since it began).  Averaged over
an episode's truncations, :math:`\mathbb E[g_i]` is *exactly*
:math:`\nabla_\theta\, \mathbb E\, L(\theta+\epsilon_1, \dots, \theta+\epsilon_W)`, the
gradient of the objective smoothed with an independent perturbation per truncation: no
truncation bias, at the price of a variance that grows with the number of truncations.

Cost per truncation: :math:`2 S K` steps, no backward pass; memory: two system states and
one accumulator (``theta``-sized) per pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch

from .._tree import tree_map
from ._base import (
    AbstractGradientEstimator,
    EstimatorState,
    GradientEstimate,
    check_count,
    check_flag,
    check_generator,
    check_sigma,
    check_state,
    check_system,
    check_theta,
    check_truncation,
)
from ._system import (
    AbstractUnrolledSystem,
    State,
    Theta,
    Window,
    check_finite_losses,
    concat_particles,
    init_particles,
    run_window,
    sample_perturbations,
    take_particles,
)


def antithetic_thetas(theta: Theta, eps: Theta) -> Theta:
    r"""Rows :math:`\theta + \epsilon_1, \dots, \theta + \epsilon_S, \theta - \epsilon_1, \dots`."""
    return tree_map(lambda x, e: torch.cat([x.detach() + e, x.detach() - e]), theta, eps)


def paired_restart(est, generator: torch.Generator, restarts: list) -> State:
    """Fresh episodes for every pair; both particles of a pair start from the same one."""
    restarts.append(1)
    fresh = init_particles(est.system, generator, est.num_pairs, est.vectorize)
    return concat_particles(fresh, fresh, est.vectorize)


def run_pairs(
    where: str,
    est,
    particles: State,
    t: int,
    thetas: Theta,
    length: int,
    generator: torch.Generator,
    restarts: list,
) -> Window:
    """One truncation of the ``2 S`` particles (positive then negative), losses checked."""
    window = run_window(
        where,
        est.system,
        particles,
        t,
        thetas,
        length,
        lambda: paired_restart(est, generator, restarts),
        est.vectorize,
    )
    check_finite_losses(where, window.losses, window.t)
    return window


def _check_es(est) -> None:
    where = f"{type(est).__name__}(...)"
    check_system(where, est.system)
    check_truncation(where, est.truncation_length, est.system.horizon)
    check_count(where, "num_pairs", est.num_pairs, 1)
    check_sigma(where, est.sigma)
    check_flag(where, "vectorize", est.vectorize)


def _check_call(est, name: str, theta: Theta, generator: torch.Generator) -> str:
    where = f"{type(est).__name__}.{name}(...)"
    check_theta(where, theta)
    check_generator(where, generator)
    return where


@final
@dataclass(frozen=True, eq=False)
class AntitheticES(AbstractGradientEstimator):
    r"""Antithetic evolution strategies, over whole episodes or truncations.

    See the module docstring for the math.  ``truncation_length=None`` (whole episodes) is
    unbiased for :math:`\nabla_\theta \mathbb E_\epsilon L(\theta+\epsilon)`; a shorter one
    is truncated ES (biased; see :class:`PES` for the unbiased version).

    Args:
        system: the :class:`~hypergradient.estimators.AbstractUnrolledSystem`.
        sigma: :math:`\sigma`, the perturbation standard deviation (in ``theta``'s
            coordinates; the smoothing scale of the objective).
        num_pairs: :math:`S` antithetic pairs (``2 S`` particles).
        truncation_length: :math:`K` in ``[1, horizon]``; ``None`` means whole episodes.
        vectorize: vmap the particles (see the system contract).

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import AntitheticES
        >>> from hypergradient.estimators import PowerRecurrence
        >>> system = PowerRecurrence(horizon=3)  # x_{t+1} = a x_t, loss x^2 / 2
        >>> est = AntitheticES(system, sigma=0.2, num_pairs=2000, vectorize=True)
        >>> theta, gen = {"a": torch.tensor(0.9)}, torch.Generator().manual_seed(0)
        >>> out, _ = est.estimate(theta, est.init(theta, gen), gen)
        >>> exact = system.smoothed_gradient(theta, sigma=0.2)["a"]
        >>> bool((out.grad["a"] - exact).abs() < 4 * out.standard_error()["a"])
        True
    """

    system: AbstractUnrolledSystem
    sigma: float
    num_pairs: int = 8
    truncation_length: int | None = None
    vectorize: bool = False

    def __post_init__(self):
        _check_es(self)

    def init(self, theta: Theta, generator: torch.Generator) -> EstimatorState:
        _check_call(self, "init", theta, generator)
        # One state per pair: both particles of a pair start every truncation from it.
        particles = init_particles(self.system, generator, self.num_pairs, self.vectorize)
        return EstimatorState(type(self).__name__, particles, 0, 1)

    def estimate(
        self, theta: Theta, state: EstimatorState, generator: torch.Generator
    ) -> tuple[GradientEstimate, EstimatorState]:
        where = _check_call(self, "estimate", theta, generator)
        state = check_state(where, state, type(self).__name__, theta)
        n, sigma = self.num_pairs, float(self.sigma)
        length = check_truncation(where, self.truncation_length, self.system.horizon)
        eps = sample_perturbations(theta, n, sigma, generator)
        pairs = concat_particles(state.particles, state.particles, self.vectorize)
        restarts: list = []
        with torch.no_grad():
            window = run_pairs(
                where,
                self,
                pairs,
                state.t,
                antithetic_thetas(theta, eps),
                length,
                generator,
                restarts,
            )
        mean_loss = window.losses.mean(dim=1)
        coef = (mean_loss[:n] - mean_loss[n:]) / (2 * sigma**2)
        samples = tree_map(lambda e: e * coef.reshape(-1, *([1] * (e.dim() - 1))), eps)
        estimate = GradientEstimate(
            grad=tree_map(lambda s: s.mean(dim=0), samples),
            loss=mean_loss.mean(),
            samples=samples,
            t=window.t,
            episodes_finished=window.episodes_finished,
            system_steps=2 * n * length,
        )
        # Carry the positive particles (learned_optimization's choice); the negative ones
        # re-start from the same state at the next truncation.
        particles = take_particles(window.states, n, self.vectorize)
        return estimate, EstimatorState(
            state.kind, particles, window.t, state.episodes + len(restarts)
        )


@final
@dataclass(frozen=True, eq=False)
class PES(AbstractGradientEstimator):
    r"""Persistent evolution strategies: unbiased gradients from truncated unrolls.

    See the module docstring for the math.  Over every episode, the truncations' estimates
    average to an unbiased estimate of the gradient of the objective smoothed with one
    independent perturbation per truncation, whatever ``truncation_length`` is.

    Args:
        system: the :class:`~hypergradient.estimators.AbstractUnrolledSystem`.
        sigma: :math:`\sigma`, the perturbation standard deviation.
        num_pairs: :math:`S` antithetic pairs (``2 S`` particles, each with its own state).
        truncation_length: :math:`K` in ``[1, horizon]``; ``None`` means whole episodes
            (then PES is :class:`AntitheticES`).
        vectorize: vmap the particles (see the system contract).

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import PES, PowerRecurrence
        >>> system = PowerRecurrence(horizon=4)  # x_{t+1} = a x_t, loss x^2 / 2
        >>> est = PES(system, sigma=0.1, num_pairs=1000, truncation_length=2, vectorize=True)
        >>> theta, gen = {"a": torch.tensor(0.9)}, torch.Generator().manual_seed(0)
        >>> state = est.init(theta, gen)
        >>> out1, state = est.estimate(theta, state, gen)  # the episode's two truncations
        >>> out2, state = est.estimate(theta, state, gen)
        >>> per_pair = (out1.samples["a"] + out2.samples["a"]) / 2
        >>> error = per_pair.mean() - system.smoothed_gradient(theta, 0.1, 2)["a"]
        >>> bool(error.abs() < 4 * per_pair.std() / len(per_pair) ** 0.5)  # unbiased
        True

    References:
        Vicol, Metz, Sohl-Dickstein (ICML 2021), Unbiased Gradient Estimation in Unrolled
        Computation Graphs with Persistent Evolution Strategies.
    """

    system: AbstractUnrolledSystem
    sigma: float
    num_pairs: int = 8
    truncation_length: int | None = None
    vectorize: bool = False

    def __post_init__(self):
        _check_es(self)

    def init(self, theta: Theta, generator: torch.Generator) -> EstimatorState:
        _check_call(self, "init", theta, generator)
        fresh = init_particles(self.system, generator, self.num_pairs, self.vectorize)
        particles = concat_particles(fresh, fresh, self.vectorize)
        accumulators = tree_map(
            lambda x: torch.zeros((self.num_pairs, *x.shape), dtype=x.dtype, device=x.device),
            theta,
        )
        return EstimatorState(type(self).__name__, particles, 0, 1, accumulators)

    def estimate(
        self, theta: Theta, state: EstimatorState, generator: torch.Generator
    ) -> tuple[GradientEstimate, EstimatorState]:
        where = _check_call(self, "estimate", theta, generator)
        state = check_state(where, state, type(self).__name__, theta)
        n, sigma = self.num_pairs, float(self.sigma)
        length = check_truncation(where, self.truncation_length, self.system.horizon)
        eps = sample_perturbations(theta, n, sigma, generator)
        restarts: list = []
        with torch.no_grad():
            window = run_pairs(
                where,
                self,
                state.particles,
                state.t,
                antithetic_thetas(theta, eps),
                length,
                generator,
                restarts,
            )
        # Per-step weights: steps of the episode that was already running see every
        # perturbation since it began (xi + eps); steps after a restart only this one (eps).
        split = length if window.restart_at is None else window.restart_at
        delta = (window.losses[:n] - window.losses[n:]) / (2 * sigma**2 * length)
        before, after = delta[:, :split].sum(dim=1), delta[:, split:].sum(dim=1)

        def per_pair(acc: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            shape = (-1, *([1] * (e.dim() - 1)))
            return (acc + e) * before.reshape(shape) + e * after.reshape(shape)

        samples = tree_map(per_pair, state.accumulators, eps)
        if window.restart_at is None:
            accumulators = tree_map(torch.add, state.accumulators, eps)
        else:
            accumulators = eps
        estimate = GradientEstimate(
            grad=tree_map(lambda s: s.mean(dim=0), samples),
            loss=window.losses.mean(),
            samples=samples,
            t=window.t,
            episodes_finished=window.episodes_finished,
            system_steps=2 * n * length,
        )
        return estimate, EstimatorState(
            state.kind, window.states, window.t, state.episodes + len(restarts), accumulators
        )
