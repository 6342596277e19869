r"""The unrolled system every gradient estimator differentiates, and how its particles run.

An *unrolled system* is an inner computation of ``horizon`` steps :math:`T` driven by
meta-parameters :math:`\theta` (a learned optimizer's weights, log learning rates, ...):

.. math::

    s_0 \sim \mathrm{init}, \qquad (s_{t+1}, \ell_t) = \mathrm{step}(s_t, \theta, t),
    \qquad L(\theta) = \mathbb{E}_{s_0}\Big[\frac1T \sum_{t=0}^{T-1} \ell_t\Big].

One run of :math:`T` steps is an *episode* (one inner training run, from a fresh task and
fresh initial weights); a *truncation* (window) is :math:`K \le T` consecutive steps of it.
The estimators in this package keep many *particles* (independent episodes) alive across
calls and advance each by one window per call, so a meta-trainer can update
:math:`\theta` every :math:`K` inner steps instead of every :math:`T`.

In learned_optimization's vocabulary, ``init`` is ``TaskFamily.sample`` followed by
``Task.init`` and the optimizer's ``init``; ``step`` is one inner-training step with the
learned optimizer :math:`\theta`, reporting the (training or validation) loss.

This module is internal apart from :class:`AbstractUnrolledSystem` and
:class:`UnrolledSystem`; the particle helpers below run the particles either one by one
(any Python ``step``) or as one batch through :func:`torch.func.vmap` (``vectorize=True``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import torch
import torch.utils._pytree as pytree
from torch.func import vmap

from .._errors import HypergradientError
from .._tree import Tree, tree_map

State = Any
Theta = Tree


class AbstractUnrolledSystem(abc.ABC):
    r"""An inner computation of ``horizon`` steps whose losses depend on meta-parameters.

    Subclasses set ``horizon`` (an ``int`` :math:`T \ge 1`, the steps of one episode) and
    implement :meth:`init` and :meth:`step`.  The meta-objective the estimators target is

    .. math:: L(\theta) = \mathbb{E}\Big[\frac1T \sum_{t=0}^{T-1} \ell_t(\theta)\Big].

    Contract (the estimators rely on every point):

    * ``init(generator)`` starts a fresh episode and returns its state.  Draw *all* of the
      episode's randomness here from ``generator`` (task, initial weights, mini-batch order,
      gradient noise), or store a seed in the state that ``step`` uses deterministically.
    * ``step(state, theta, t)`` is a pure function: the same inputs give the same outputs,
      and ``state`` is never modified in place.  Antithetic estimators step two copies of
      one state with :math:`\theta + \epsilon` and :math:`\theta - \epsilon`; they must see
      the same data, which only a pure ``step`` guarantees.
    * ``step`` returns ``(next_state, loss)`` with ``loss`` a 0-d floating tensor, finite,
      and differentiable with respect to ``theta`` for the back-propagation estimators.
    * ``theta`` is a tensor or a flat ``dict[str, Tensor]``, in *unconstrained*
      coordinates (log learning rate, :math:`\log(1-\beta)`, raw network weights):
      Gaussian perturbations of any size must give a valid system.
    * With ``vectorize=True`` the estimators run :func:`torch.func.vmap` over ``step``, so
      every leaf of the state must be a tensor and ``step`` must be vmap-able (no
      ``.item()``, no data-dependent Python control flow, no in-place ops on captured
      tensors).  Pre-draw noise in ``init`` (e.g. a ``(horizon, d)`` table) rather than
      sampling inside ``step``.

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import AbstractUnrolledSystem, FullBackprop
        >>> class Drift(AbstractUnrolledSystem):  # x_t = t theta, L = mean(x_t^2 / 2)
        ...     horizon = 3
        ...     def init(self, generator):
        ...         return torch.zeros(())
        ...     def step(self, state, theta, t):
        ...         x = state + theta
        ...         return x, 0.5 * x**2
        >>> est, theta, gen = FullBackprop(Drift()), torch.tensor(1.5), torch.Generator()
        >>> out, _ = est.estimate(theta, est.init(theta, gen), gen)
        >>> round(float(out.grad), 4)  # dL/dtheta = (1 + 4 + 9) theta / 3 = 7
        7.0
    """

    #: Steps of one episode, :math:`T`.
    horizon: int

    @abc.abstractmethod
    def init(self, generator: torch.Generator) -> State:
        """A fresh episode's state, all its randomness drawn from ``generator``."""

    @abc.abstractmethod
    def step(self, state: State, theta: Theta, t: int) -> tuple[State, torch.Tensor]:
        """One inner step ``t`` (``0 <= t < horizon``): ``(next_state, loss_t)``."""


@final
@dataclass(frozen=True, eq=False)
class UnrolledSystem(AbstractUnrolledSystem):
    """An :class:`AbstractUnrolledSystem` from two functions (see its contract).

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import UnrolledSystem
        >>> # x_{t+1} = 0.5 x_t + theta, loss x_{t+1}: x = 1, 1.5 for theta = 1
        >>> sys = UnrolledSystem(lambda g: torch.zeros(()),
        ...                      lambda x, th, t: (0.5 * x + th, 0.5 * x + th), horizon=2)
        >>> s = sys.init(torch.Generator())
        >>> s, l0 = sys.step(s, torch.tensor(1.0), 0)
        >>> s, l1 = sys.step(s, torch.tensor(1.0), 1)
        >>> float(l0), float(l1)
        (1.0, 1.5)
    """

    init_fn: Callable[[torch.Generator], State]
    step_fn: Callable[[State, Theta, int], tuple[State, torch.Tensor]]
    horizon: int

    def __post_init__(self):
        for name in ("init_fn", "step_fn"):
            if not callable(getattr(self, name)):
                raise HypergradientError(
                    f"UnrolledSystem({name}=...): expected a callable, got "
                    f"{type(getattr(self, name)).__name__}. init_fn(generator) -> state and "
                    f"step_fn(state, theta, t) -> (state, loss)."
                )
        check_horizon("UnrolledSystem(...)", self.horizon)

    def init(self, generator: torch.Generator) -> State:
        return self.init_fn(generator)

    def step(self, state: State, theta: Theta, t: int) -> tuple[State, torch.Tensor]:
        return self.step_fn(state, theta, t)


def check_horizon(where: str, horizon: object) -> int:
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        raise HypergradientError(
            f"{where}: the system's horizon (steps of one episode) must be an int >= 1, got "
            f"{horizon!r}. Set `horizon` on the system."
        )
    return horizon


# ----------------------------------------------------------------------------------------
# Particles: n system states, run one by one (a list) or as one vmapped batch (a pytree whose
# tensor leaves have a leading dimension n).  Everything below is internal.


def init_particles(
    system: AbstractUnrolledSystem, generator: torch.Generator, n: int, vectorize: bool
) -> State:
    """``n`` fresh episodes.  Cost: ``n`` calls of ``system.init``."""
    states = [system.init(generator) for _ in range(n)]
    if not vectorize:
        return states
    leaves, spec = pytree.tree_flatten(states[0])
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise HypergradientError(
                f"vectorize=True: every leaf of the system's state must be a tensor (vmap "
                f"maps over a leading particle dimension), but init() returned a state with "
                f"a {type(leaf).__name__} leaf. Store it as a tensor, or use "
                f"vectorize=False."
            )
    flat = [pytree.tree_flatten(s)[0] for s in states]
    stacked = [torch.stack([f[i] for f in flat]) for i in range(len(leaves))]
    return pytree.tree_unflatten(stacked, spec)


def concat_particles(a: State, b: State, vectorize: bool) -> State:
    """Particles ``a`` followed by ``b``."""
    if not vectorize:
        return list(a) + list(b)
    return pytree.tree_map(lambda x, y: torch.cat([x, y]), a, b)


def take_particles(states: State, stop: int, vectorize: bool) -> State:
    """The first ``stop`` particles."""
    if not vectorize:
        return states[:stop]
    return pytree.tree_map(lambda x: x[:stop], states)


def detach_particles(states: State) -> State:
    """Cut the autograd graph between truncations (what makes back-propagation truncated)."""
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, states)


def particle_theta(theta_b: Theta, i: int) -> Theta:
    return tree_map(lambda x: x[i], theta_b)


def _check_loss(where: str, loss: object, t: int) -> torch.Tensor:
    """One particle's loss: a 0-d floating tensor (inside vmap, the per-particle view)."""
    if not isinstance(loss, torch.Tensor):
        raise HypergradientError(
            f"{where}: system.step(state, theta, t={t}) must return (next_state, loss) with "
            f"loss a 0-d tensor, got loss of type {type(loss).__name__}."
        )
    if loss.numel() != 1 or not loss.is_floating_point():
        raise HypergradientError(
            f"{where}: system.step(state, theta, t={t}) returned a loss of shape "
            f"{tuple(loss.shape)} and dtype {loss.dtype}; expected a 0-d floating tensor. "
            f"Reduce it with `.mean()` or `.sum()`."
        )
    return loss.reshape(())


def _checked_step(where: str, system: AbstractUnrolledSystem, t: int) -> Callable:
    """``system.step`` at step ``t`` with its output contract checked (also under vmap, where
    the checks see one particle)."""

    def step(state: State, theta: Theta) -> tuple[State, torch.Tensor]:
        out = system.step(state, theta, t)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise HypergradientError(
                f"{where}: system.step must return a pair (next_state, loss), got "
                f"{type(out).__name__}."
            )
        return out[0], _check_loss(where, out[1], t)

    return step


def step_particles(
    where: str,
    system: AbstractUnrolledSystem,
    states: State,
    theta_b: Theta,
    t: int,
    vectorize: bool,
) -> tuple[State, torch.Tensor]:
    """Advance every particle by step ``t``; particle ``i`` uses ``theta_b[i]``.

    Returns the new states and the ``(n,)`` losses.
    """
    step = _checked_step(where, system, t)
    if vectorize:
        return vmap(step)(states, theta_b)
    new_states, losses = [], []
    for i, state in enumerate(states):
        new_state, loss = step(state, particle_theta(theta_b, i))
        new_states.append(new_state)
        losses.append(loss)
    return new_states, torch.stack(losses)


@dataclass
class Window:
    """What one truncation did: the per-step losses and where an episode restarted."""

    states: State
    t: int  # steps taken in the current episode after the window
    losses: torch.Tensor  # (n, K)
    restart_at: int | None  # index k in the window whose step began a fresh episode
    episodes_finished: int


def run_window(
    where: str,
    system: AbstractUnrolledSystem,
    states: State,
    t: int,
    theta_b: Theta,
    length: int,
    restart: Callable[[], State],
    vectorize: bool,
) -> Window:
    r"""Step all particles ``length`` times from step ``t`` of their episode.

    When an episode is complete (:math:`t = T`) the particles restart from ``restart()``
    before the next step; with ``length <= T`` that happens at most once per window.  The
    particles are synchronised (one ``t`` for all), so they restart together.
    """
    losses, restart_at, finished = [], None, 0
    horizon = system.horizon
    for k in range(length):
        if t == horizon:
            states, t, restart_at = restart(), 0, k
        states, loss = step_particles(where, system, states, theta_b, t, vectorize)
        losses.append(loss)
        t += 1
        finished += t == horizon
    return Window(states, t, torch.stack(losses, dim=1), restart_at, finished)


def check_finite_losses(where: str, losses: torch.Tensor, t_end: int) -> None:
    if not bool(torch.isfinite(losses).all()):
        bad = int((~torch.isfinite(losses)).sum())
        raise HypergradientError(
            f"{where}: {bad} of the {losses.numel()} losses of this truncation (ending at "
            f"episode step {t_end}) are NaN/inf. Make system.step return a bounded loss "
            f"(e.g. a log loss, or `torch.nan_to_num(loss, nan=cap, posinf=cap)` with a cap "
            f"such as the initial loss), or use smaller perturbations (sigma)."
        )


def broadcast_theta(theta: Theta, n: int) -> Theta:
    """``theta`` repeated ``n`` times along a new leading dimension (a fresh leaf)."""
    return tree_map(lambda x: x.detach().unsqueeze(0).expand(n, *x.shape).clone(), theta)


def sample_perturbations(theta: Theta, n: int, sigma: float, generator: torch.Generator) -> Theta:
    r""":math:`\epsilon_i \sim \mathcal N(0, \sigma^2 I)` like ``theta``, stacked ``n`` times.

    Drawn on the generator's device and moved to ``theta``'s, so a CPU generator drives a
    GPU run reproducibly.
    """

    def draw(x: torch.Tensor) -> torch.Tensor:
        z = torch.randn((n, *x.shape), generator=generator, dtype=x.dtype, device=generator.device)
        return sigma * z.to(x.device)

    return tree_map(draw, theta)


def leaves_of(tree: Tree) -> list[torch.Tensor]:
    return [tree] if isinstance(tree, torch.Tensor) else list(tree.values())


def tree_from_leaves(leaves: list[torch.Tensor], like: Tree) -> Tree:
    if isinstance(like, torch.Tensor):
        return leaves[0]
    return dict(zip(like.keys(), leaves))
