r"""Reverse engineering what an optimizer does, by dynamical-systems analysis.

Maheswaranathan et al. (2021) treat a component-wise optimizer as a state-space system: per
parameter component, a state :math:`s \in \mathbb R^S` and the gradient :math:`g` give the
next state and the update (which is *added* to the parameter),

.. math:: s_t = F(s_{t-1}, g_t), \qquad \Delta_t = G(s_{t-1}, g_t),

and read its mechanisms off three objects:

1. **fixed points** :math:`s^*(g) = F(s^*(g), g)` for a constant gradient, and the update
   there, :math:`\Delta^*(g) = G(s^*(g), g)` (:func:`update_curve`): linear for SGD and
   heavy ball, saturating (clipping) for Adam, :func:`saturation_ratio`
   :math:`\Delta^*(10 g)/\Delta^*(g)` measures it (10 = linear, 1 = sign-like);
2. the **linearisation** at a fixed point (:func:`linearize`),
   :math:`\delta s_t \approx J \delta s_{t-1} + B \delta g_t`,
   :math:`\delta\Delta_t \approx C \delta s_{t-1} + D \delta g_t` with
   :math:`J = \partial F/\partial s` etc. (:func:`torch.func.jacrev`).  The impulse response
   of the update to a gradient pulse is :math:`c_0 = D`, :math:`c_k = C J^{k-1} B`; an
   eigenvalue :math:`\lambda` of :math:`J` is a memory of timescale
   :math:`1/(1-|\lambda|)` steps, and the slowest one the update reads is the *effective
   momentum* (heavy ball :math:`s' = \beta s + g`, :math:`\Delta = -\eta s'` gives
   :math:`J = \beta`, :math:`c_k = -\eta\beta^k`);
3. the **effective learning rate** over a training run (:func:`trace`,
   :func:`effective_lr_schedule`): :math:`-\partial\Delta_t/\partial g_t` along the actual
   trajectory and the least-squares ratio :math:`-\langle\Delta_t, g_t\rangle/\|g_t\|^2`,
   whose transients from the initial state are learned warm-up or decay schedules.

Without access to the state, :func:`identify_impulse_response` fits the impulse response of
any recorded run by least squares (a black-box ``torch.optim`` optimizer included).

The systems (:class:`AbstractStateSpaceOptimizer`): :class:`HeavyBallSystem`,
:class:`AdamSystem`, :class:`LearnedGRUSystem` (the component-wise GRU of
:mod:`.recurrent`) and :class:`LearnedMLPSystem` (:class:`~.MLPLearnedOptimizer`, whose
state is its momenta and second moments at fixed decays, with the per-tensor feature
normalisation frozen at an operating point: one component's share of a tensor's root mean
square is :math:`O(1/N)`).  :func:`state_space` builds the right one for a learned
optimizer and its ``theta``; :func:`report` writes every analysis as JSON and a PNG.

Examples:
    Heavy ball's momentum and learning rate, recovered:

        >>> from hypergradient.learned.analysis import HeavyBallSystem, fixed_point, linearize
        >>> system = HeavyBallSystem(lr=0.1, momentum=0.9)
        >>> lin = linearize(system, fixed_point(system, 0.0).state, 0.0)
        >>> round(lin.effective_momentum, 6), round(lin.effective_lr, 6)
        (0.9, 0.1)

References:
    Maheswaranathan, Sussillo, Metz, Sun, Sohl-Dickstein (NeurIPS 2021), Reverse engineering
    learned optimizers reveals known and novel mechanisms.
    Sussillo, Barak (2013), Opening the black box: low-dimensional dynamics in
    high-dimensional recurrent neural networks (fixed and slow points of
    :math:`\|F(s) - s\|^2`; found here by iteration, then Newton's method).
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import torch
from torch.func import jacrev, jvp

from .._errors import ConvergenceError, HypergradientError
from ..diffopt import safe_sqrt
from .architectures import (
    _EPS_NORM,
    _EPS_RATIO,
    AbstractLearnedOptimizer,
    HierarchicalLearnedOptimizer,
    MLPLearnedOptimizer,
    _check_theta,
    _mlp_hidden,
    _output_update,
    step_embedding,
)
from .recurrent import GRULearnedOptimizer

#: A mode counts for the effective momentum when it carries this share of the response.
_MODE_SHARE = 0.01

# ----------------------------------------------------------------------------------------
# The interface and the systems.


class AbstractStateSpaceOptimizer(abc.ABC):
    r"""A component-wise optimizer as a state-space system
    :math:`(s, g) \mapsto (F(s, g), G(s, g))`.

    Every component is independent: :meth:`step` maps a state of shape ``(..., S)`` and a
    gradient of shape ``(...)`` to the next state ``(..., S)`` and the update ``(...)``,
    element by element, purely (no argument is modified) and differentiably, so that
    :func:`torch.func.jacrev` of one component's step is the system's linearisation.
    """

    @property
    @abc.abstractmethod
    def state_size(self) -> int:
        """:math:`S`, the number of state variables per component."""

    @abc.abstractmethod
    def init_state(self, shape: Sequence[int] = ()) -> torch.Tensor:
        """The state before the first step for components of ``shape``: ``(*shape, S)``."""

    @abc.abstractmethod
    def step(self, state: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One step: ``(state (..., S), g (...)) -> (next state (..., S), update (...))``;
        the update is *added* to the parameters (:math:`w \leftarrow w + \Delta`)."""


def _check_number(where: str, name: str, value: object, low: float, high: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise HypergradientError(
            f"{where}: {name} must be a finite number in [{low}, {high}], got {value!r}."
        )
    return float(value)


def _default_dtype_zeros(shape: Sequence[int], size: int) -> torch.Tensor:
    return torch.zeros((*tuple(shape), size))


@final
@dataclass(frozen=True)
class HeavyBallSystem(AbstractStateSpaceOptimizer):
    r"""SGD with heavy-ball momentum, as ``torch.optim.SGD`` (no dampening):
    :math:`s' = \beta s + g`, :math:`\Delta = -\eta s'`.

    Args:
        lr: :math:`\eta > 0`.
        momentum: :math:`\beta \in [0, 1)`.

    Its linearisation is exact: :math:`J = \beta`, :math:`B = 1`, :math:`C = -\eta\beta`,
    :math:`D = -\eta`, the fixed point :math:`s^* = g/(1-\beta)` and
    :math:`\Delta^*(g) = -\eta g/(1-\beta)` (linear: saturation ratio 10).
    """

    lr: float
    momentum: float = 0.9

    def __post_init__(self):
        where = "HeavyBallSystem(...)"
        if _check_number(where, "lr", self.lr, 0.0, math.inf) <= 0:
            raise HypergradientError(f"{where}: lr must be > 0, got {self.lr!r}.")
        if _check_number(where, "momentum", self.momentum, 0.0, 1.0) >= 1:
            raise HypergradientError(
                f"{where}: momentum must be in [0, 1), got {self.momentum!r} (1 never forgets: "
                f"no fixed point for a nonzero gradient)."
            )

    @property
    def state_size(self) -> int:
        return 1

    def init_state(self, shape: Sequence[int] = ()) -> torch.Tensor:
        return _default_dtype_zeros(shape, 1)

    def step(self, state, g):
        buf = self.momentum * state + g.unsqueeze(-1)
        return buf, -self.lr * buf[..., 0]


@final
@dataclass(frozen=True)
class AdamSystem(AbstractStateSpaceOptimizer):
    r"""Adam after its bias correction has worn off (:math:`t \to \infty`; a step counter
    in the state would leave no fixed point):

    .. math::

        m' = \beta_1 m + (1-\beta_1) g, \quad v' = \beta_2 v + (1-\beta_2) g^2, \quad
        \Delta = -\eta\, m' / (\sqrt{v'} + \epsilon).

    State ``[m, v]``.  At the fixed point :math:`m^* = g`, :math:`v^* = g^2`, so
    :math:`\Delta^*(g) = -\eta\, g/(|g| + \epsilon)`: the update saturates at :math:`\eta`
    (saturation ratio about 1), a per-component clipping of the gradient.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        where = "AdamSystem(...)"
        if _check_number(where, "lr", self.lr, 0.0, math.inf) <= 0:
            raise HypergradientError(f"{where}: lr must be > 0, got {self.lr!r}.")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise HypergradientError(f"{where}: betas must be a pair, got {self.betas!r}.")
        for b in self.betas:
            if _check_number(where, "betas[i]", b, 0.0, 1.0) >= 1:
                raise HypergradientError(f"{where}: betas must be in [0, 1), got {self.betas!r}.")
        if _check_number(where, "eps", self.eps, 0.0, math.inf) <= 0:
            raise HypergradientError(f"{where}: eps must be > 0, got {self.eps!r}.")

    @property
    def state_size(self) -> int:
        return 2

    def init_state(self, shape: Sequence[int] = ()) -> torch.Tensor:
        return _default_dtype_zeros(shape, 2)

    def step(self, state, g):
        b1, b2 = self.betas
        m = b1 * state[..., 0] + (1 - b1) * g
        v = b2 * state[..., 1] + (1 - b2) * g.square()
        # safe_sqrt: a finite derivative at v = 0 (the g = 0 fixed point)
        update = -self.lr * m / (safe_sqrt(v) + self.eps)
        return torch.stack([m, v], dim=-1), update


@final
@dataclass(frozen=True, eq=False)
class LearnedGRUSystem(AbstractStateSpaceOptimizer):
    r"""The component-wise :class:`~.recurrent.GRULearnedOptimizer` with meta-parameters
    ``theta``: the state is the GRU's hidden state (:math:`S = H`),
    :math:`(h, g) \mapsto` :meth:`~.recurrent.GRULearnedOptimizer.cell`."""

    optimizer: GRULearnedOptimizer
    theta: Mapping[str, torch.Tensor]

    def __post_init__(self):
        where = "LearnedGRUSystem(...)"
        if not isinstance(self.optimizer, GRULearnedOptimizer):
            raise HypergradientError(
                f"{where}: optimizer must be a GRULearnedOptimizer, got "
                f"{type(self.optimizer).__name__}; use state_space(optimizer, theta)."
            )
        _check_theta(where, self.theta, self.optimizer)
        object.__setattr__(self, "theta", {k: v.detach() for k, v in self.theta.items()})

    @property
    def state_size(self) -> int:
        return self.optimizer.hidden

    def init_state(self, shape: Sequence[int] = ()) -> torch.Tensor:
        like = next(iter(self.theta.values()))
        return torch.zeros((*tuple(shape), self.state_size), dtype=like.dtype)

    def step(self, state, g):
        return self.optimizer.cell(self.theta, state, g)


@final
@dataclass(frozen=True, eq=False)
class LearnedMLPSystem(AbstractStateSpaceOptimizer):
    r""":class:`~.MLPLearnedOptimizer` at a frozen operating point, component by component.

    The state is the momenta and second moments :math:`[m_1..m_k, v_1..v_k]` at the fixed
    decays (so :math:`J` is diagonal with the decays as eigenvalues: the learned part is
    how the MLP *reads* them, which the impulse response :math:`c_k = C J^{k-1} B` shows).
    Two things couple the components of a tensor in the real optimizer and are frozen
    here: the per-tensor normalisation of the features ``g, w, m_i, sqrt(v_i)`` (divided
    by ``feature_scales``, the tensor's root mean squares, of which one component's share
    is :math:`O(1/N)`), and the step embedding (``step``, ``progress``).  ``weight`` is the
    component's parameter value (a number or a tensor broadcasting with the gradients).

    :meth:`from_history` reads the operating point off a recorded gradient history, and
    then the system reproduces the optimizer's update exactly (tested).

    Args:
        optimizer: the architecture.
        theta: its meta-parameters.
        feature_scales: ``(2 + 2k,)`` divisors of the features ``[g, w, m_1..m_k,
            sqrt(v_1)..sqrt(v_k)]`` (positive).
        weight: the parameter value :math:`w` of the analysed component(s).
        step_count: the optimizer's step counter :math:`s` (step embedding, bias
            correction).
        progress: :math:`s/T` (when the architecture reads it).
    """

    optimizer: MLPLearnedOptimizer
    theta: Mapping[str, torch.Tensor]
    feature_scales: torch.Tensor
    weight: float | torch.Tensor = 0.0
    step_count: float = 0.0
    progress: float = 0.0

    def __post_init__(self):
        where = "LearnedMLPSystem(...)"
        if not isinstance(self.optimizer, MLPLearnedOptimizer):
            raise HypergradientError(
                f"{where}: optimizer must be an MLPLearnedOptimizer, got "
                f"{type(self.optimizer).__name__}; use state_space(optimizer, theta)."
            )
        _check_theta(where, self.theta, self.optimizer)
        object.__setattr__(self, "theta", {k: v.detach() for k, v in self.theta.items()})
        k = len(self.optimizer.decays)
        scales = self.feature_scales
        if (
            not isinstance(scales, torch.Tensor)
            or tuple(scales.shape) != (2 + 2 * k,)
            or not bool((scales > 0).all())
            or not bool(torch.isfinite(scales).all())
        ):
            got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
            raise HypergradientError(
                f"{where}: feature_scales must be a tensor of {2 + 2 * k} positive finite "
                f"divisors of [g, w, m_1..m_{k}, sqrt(v_1)..sqrt(v_{k})], got {got}. "
                f"Use LearnedMLPSystem.from_history(...) to read them off a run."
            )
        _check_number(where, "step_count", self.step_count, 0.0, math.inf)
        _check_number(where, "progress", self.progress, 0.0, 1.0)

    @classmethod
    def from_history(
        cls,
        optimizer: MLPLearnedOptimizer,
        theta: Mapping[str, torch.Tensor],
        gradients: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        progress: float = 0.0,
    ) -> tuple[LearnedMLPSystem, torch.Tensor]:
        r"""The system at the last step of a recorded run of one tensor.

        Args:
            optimizer, theta: the learned optimizer.
            gradients: ``(T, N)``, the tensor's (flattened) gradients of ``T`` steps.
            weights: ``(N,)``, the parameters at the last step (default zeros).
            progress: :math:`(T-1)/T_{\text{planned}}` when the architecture reads it.

        Returns:
            ``(system, states)``: the system whose ``step(states, gradients[-1])`` is the
            optimizer's last update of the run, and ``states`` ``(N, 2k)``, the moments
            before that step.  Cost: :math:`O(T N k)`.
        """
        where = "LearnedMLPSystem.from_history(...)"
        if not isinstance(gradients, torch.Tensor) or gradients.dim() != 2 or not len(gradients):
            raise HypergradientError(
                f"{where}: gradients must be a (T, N) tensor of T >= 1 steps of N components, "
                f"got {_shape(gradients)}."
            )
        n = gradients.shape[1]
        weights = torch.zeros(n, dtype=gradients.dtype) if weights is None else weights
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (n,):
            raise HypergradientError(
                f"{where}: weights must be an ({n},) tensor (the parameters at the last step), "
                f"got {_shape(weights)}."
            )
        k = len(optimizer.decays)
        decays = torch.tensor(optimizer.decays, dtype=gradients.dtype)
        m = torch.zeros(k, n, dtype=gradients.dtype)
        v = torch.zeros(k, n, dtype=gradients.dtype)
        for g in gradients[:-1]:
            m = decays[:, None] * m + (1 - decays[:, None]) * g
            v = decays[:, None] * v + (1 - decays[:, None]) * g.square()
        states = torch.cat([m, v]).T.clone()
        step = float(len(gradients) - 1)
        g = gradients[-1]
        m_new = decays[:, None] * m + (1 - decays[:, None]) * g
        v_new = decays[:, None] * v + (1 - decays[:, None]) * g.square()
        if optimizer.bias_correction:
            correction = 1 - decays[:, None] ** (step + 1)
            m_new, v_new = m_new / correction, v_new / correction
        columns = torch.cat([g[None], weights[None], m_new, safe_sqrt(v_new)])
        scales = torch.sqrt(columns.square().mean(dim=1) + _EPS_NORM)
        system = cls(optimizer, theta, scales, weights, step, progress)
        return system, states

    @property
    def state_size(self) -> int:
        return 2 * len(self.optimizer.decays)

    def init_state(self, shape: Sequence[int] = ()) -> torch.Tensor:
        return torch.zeros((*tuple(shape), self.state_size), dtype=self.feature_scales.dtype)

    def step(self, state, g):
        lopt, theta = self.optimizer, self.theta
        k = len(lopt.decays)
        decays = torch.tensor(lopt.decays, dtype=state.dtype)
        gk = g.unsqueeze(-1)
        m = decays * state[..., :k] + (1 - decays) * gk
        v = decays * state[..., k:] + (1 - decays) * gk.square()
        m_hat, v_hat = m, v
        if lopt.bias_correction:
            correction = 1 - decays ** (self.step_count + 1)
            m_hat, v_hat = m / correction, v / correction
        rms = safe_sqrt(v_hat)
        weight = torch.as_tensor(self.weight, dtype=state.dtype)
        scaled = torch.cat([gk, torch.broadcast_to(weight, g.shape).unsqueeze(-1), m_hat, rms], -1)
        features = torch.cat([scaled / self.feature_scales, m_hat / (rms + _EPS_RATIO)], dim=-1)
        glob = step_embedding(
            torch.tensor(self.step_count, dtype=state.dtype),
            torch.tensor(self.progress, dtype=state.dtype),
            lopt.use_progress,
        )
        bias1 = theta["mlp.b1"] + glob @ theta["mlp.w1"][lopt.num_element_features :]
        out, _ = _mlp_hidden(theta, features.reshape(-1, features.shape[-1]), bias1)
        update = _output_update(out[:, 0], out[:, 1], lopt.scale_dir, lopt.scale_mag)
        return torch.cat([m, v], dim=-1), update.reshape(g.shape)


def state_space(
    optimizer: AbstractLearnedOptimizer, theta: Mapping[str, torch.Tensor], **kwargs: Any
) -> AbstractStateSpaceOptimizer:
    """The state-space system of a learned optimizer with meta-parameters ``theta``:
    :class:`LearnedGRUSystem` for a :class:`~.recurrent.GRULearnedOptimizer`,
    :class:`LearnedMLPSystem` (``kwargs``: its ``feature_scales`` and operating point) for
    an :class:`~.MLPLearnedOptimizer`."""
    where = "state_space(optimizer, theta)"
    if isinstance(optimizer, GRULearnedOptimizer):
        if kwargs:
            raise HypergradientError(
                f"{where}: a GRULearnedOptimizer takes no options, got {sorted(kwargs)}."
            )
        return LearnedGRUSystem(optimizer, theta)
    if isinstance(optimizer, MLPLearnedOptimizer):
        return LearnedMLPSystem(optimizer, theta, **kwargs)
    if isinstance(optimizer, HierarchicalLearnedOptimizer):
        raise HypergradientError(
            f"{where}: a HierarchicalLearnedOptimizer is not component-wise (its per-tensor "
            f"LSTM reads whole-tensor statistics), so it has no per-component state-space "
            f"form. Analyse a GRULearnedOptimizer or an MLPLearnedOptimizer."
        )
    raise HypergradientError(
        f"{where}: optimizer must be a GRULearnedOptimizer or an MLPLearnedOptimizer, got "
        f"{type(optimizer).__name__}. Other optimizers: subclass AbstractStateSpaceOptimizer."
    )


def _check_system(where: str, system: object) -> AbstractStateSpaceOptimizer:
    if not isinstance(system, AbstractStateSpaceOptimizer):
        raise HypergradientError(
            f"{where}: system must be an AbstractStateSpaceOptimizer (e.g. "
            f"HeavyBallSystem(lr=0.1), or state_space(learned_optimizer, theta)), got "
            f"{type(system).__name__}."
        )
    return system


def _scalar(where: str, name: str, g: object, like: torch.Tensor) -> torch.Tensor:
    if isinstance(g, torch.Tensor):
        if g.numel() != 1:
            raise HypergradientError(
                f"{where}: {name} must be one number (a constant gradient of one component), "
                f"got a tensor of shape {tuple(g.shape)}."
            )
        g = float(g)
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
        raise HypergradientError(f"{where}: {name} must be a finite number, got {g!r}.")
    return torch.tensor(float(g), dtype=like.dtype)


def _tolerance(where: str, tol: object, base: float, dtype: torch.dtype) -> float:
    if tol is None:
        return max(base, 100 * torch.finfo(dtype).eps)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise HypergradientError(f"{where}: tol must be a number > 0 or None, got {tol!r}.")
    return float(tol)


def _state(where: str, system: AbstractStateSpaceOptimizer, state: object) -> torch.Tensor:
    if state is None:
        return system.init_state()
    if not isinstance(state, torch.Tensor) or tuple(state.shape) != (system.state_size,):
        raise HypergradientError(
            f"{where}: state must be a ({system.state_size},) tensor (one component's state), "
            f"got {_shape(state)}."
        )
    if not bool(torch.isfinite(state).all()):
        raise HypergradientError(f"{where}: state has non-finite entries: {state.tolist()}.")
    return state.detach()


# ----------------------------------------------------------------------------------------
# Fixed points.


@dataclass(frozen=True)
class FixedPoint:
    r"""A fixed point :math:`s^* = F(s^*, g)` of a constant gradient.

    Attributes:
        state: :math:`s^*` ``(S,)``.
        g: the constant gradient.
        update: :math:`\Delta^*(g) = G(s^*, g)`.
        residual: :math:`\|F(s^*, g) - s^*\|_\infty`.
        num_steps: iterations plus Newton steps taken.
        converged: ``residual <= tol * (1 + ||s*||_inf)``.
    """

    state: torch.Tensor
    g: float
    update: float
    residual: float
    num_steps: int
    converged: bool


def fixed_point(
    system: AbstractStateSpaceOptimizer,
    g: float,
    *,
    state: torch.Tensor | None = None,
    num_iters: int = 500,
    newton_steps: int = 20,
    tol: float | None = None,
    throw: bool = True,
) -> FixedPoint:
    r"""A fixed point of :math:`s \mapsto F(s, g)` for a constant gradient ``g``.

    First the dynamics are iterated from ``state`` (default :meth:`init_state`): what the
    optimizer itself would reach, the stable fixed point of its basin.  Then Newton steps on
    :math:`F(s) - s = 0`, :math:`(J - I)\delta = s - F(s)` by least squares (a line
    attractor makes :math:`J - I` singular) with backtracking, each kept only if it lowers
    the residual: quadratic convergence where iteration crawls at rate
    :math:`|\lambda_{\max}|` (Adam's :math:`v` at :math:`\beta_2 = 0.999`).

    Args:
        system: the optimizer.
        g: the constant gradient (a number).
        state: ``(S,)`` starting state.
        num_iters: at most this many iterations (stopped early once converged).
        newton_steps: at most this many Newton refinements.
        tol: convergence when :math:`\|F(s) - s\|_\infty \le` ``tol`` :math:`(1 +
            \|s\|_\infty)`; default :math:`\max(10^{-10}, 100\,\epsilon)` for the
            state's dtype (float32 cannot get below about :math:`10^{-7}`).
        throw: raise :class:`~hypergradient.ConvergenceError` when not converged (else
            return with ``converged=False``).

    Cost: up to ``num_iters`` steps and ``newton_steps`` Jacobians (:math:`S` backward
    passes each) of one component.
    """
    where = "fixed_point(system, g)"
    system = _check_system(where, system)
    s = _state(where, system, state)
    g_t = _scalar(where, "g", g, s)
    for name, value in (("num_iters", num_iters), ("newton_steps", newton_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise HypergradientError(f"{where}: {name} must be an int >= 0, got {value!r}.")
    tol = _tolerance(where, tol, 1e-10, s.dtype)

    def residual_of(x: torch.Tensor) -> float:
        return float((system.step(x, g_t)[0] - x).abs().max())

    def done(x: torch.Tensor, res: float) -> bool:
        return res <= tol * (1 + float(x.abs().max()))

    steps = 0
    with torch.no_grad():
        for _ in range(num_iters):
            nxt = system.step(s, g_t)[0]
            steps += 1
            res = float((nxt - s).abs().max())
            s = nxt
            if not bool(torch.isfinite(s).all()):
                break
            if done(s, res):
                break
    res = residual_of(s) if bool(torch.isfinite(s).all()) else math.inf
    eye = torch.eye(system.state_size, dtype=s.dtype)
    # Newton polishes even a converged iterate (down to rounding): the linearisation is
    # then taken at the fixed point itself, not at a point up to `tol` away
    for _ in range(newton_steps):
        if res == 0 or not math.isfinite(res):
            break
        jac = jacrev(lambda x: system.step(x, g_t)[0])(s)
        with torch.no_grad():
            f = system.step(s, g_t)[0] - s
            delta = torch.linalg.lstsq(jac - eye, -f.unsqueeze(-1)).solution[:, 0]
            # backtracking: far from the fixed point a full step can overshoot
            for alpha in (1.0, 0.5, 0.25, 0.125, 0.0625):
                trial = s + alpha * delta
                trial_res = residual_of(trial)
                if trial_res < res:
                    break
        steps += 1
        if not trial_res < res:
            break
        s, res = trial, trial_res
    converged = math.isfinite(res) and done(s, res)
    if throw and not converged:
        raise ConvergenceError(
            f"{where}: no fixed point found for g={float(g_t):g}: residual "
            f"||F(s)-s||_inf = {res:.3g} after {steps} steps (tol {tol:g}). The dynamics may "
            f"oscillate or diverge for this gradient; raise num_iters, start from another "
            f"state, or pass throw=False to inspect the last iterate."
        )
    with torch.no_grad():
        update = float(system.step(s, g_t)[1])
    return FixedPoint(s, float(g_t), update, res, steps, converged)


# ----------------------------------------------------------------------------------------
# Linearisation.


@dataclass(frozen=True)
class Linearization:
    r"""The system linearised at ``(state, g)``:
    :math:`\delta s' = J \delta s + B \delta g`, :math:`\delta\Delta = C \delta s + D \delta g`.

    Attributes:
        state, g: where.
        jacobian: :math:`J = \partial F/\partial s` ``(S, S)``.
        input_gain: :math:`B = \partial F/\partial g` ``(S,)``.
        output_gain: :math:`C = \partial G/\partial s` ``(S,)``.
        feedthrough: :math:`D = \partial G/\partial g`.
        eigenvalues: of :math:`J` (complex), by decreasing modulus.
        residues: per eigenvalue, its weight in the impulse response,
            :math:`c_k = D[k=0] + \sum_i r_i \lambda_i^{k-1}` (complex; zero for a mode the
            gradient cannot excite or the update cannot see).
    """

    state: torch.Tensor
    g: float
    jacobian: torch.Tensor
    input_gain: torch.Tensor
    output_gain: torch.Tensor
    feedthrough: float
    eigenvalues: torch.Tensor
    residues: torch.Tensor = field(repr=False)

    @property
    def top_eigenvalue(self) -> complex:
        """The eigenvalue of largest modulus (the slowest mode)."""
        return complex(self.eigenvalues[0])

    @property
    def mode_shares(self) -> torch.Tensor:
        r"""Each mode's share of the total response to a sustained gradient,
        :math:`|r_i / (1 - \lambda_i)| / \sum_j |r_j / (1 - \lambda_j)|` (``(S,)``, NaN
        when no mode reaches the update)."""
        gap = (1 - self.eigenvalues).abs().clamp(min=1e-12)
        weight = self.residues.abs() / gap
        total = float(weight.sum())
        return weight / total if total > 0 else torch.full_like(weight, math.nan)

    @property
    def effective_momentum(self) -> float:
        r""":math:`|\lambda|` of the slowest mode with at least 1% of the total response
        (:attr:`mode_shares`; the top eigenvalue when no mode reaches the update): the
        momentum :math:`\beta` of a heavy ball with the same memory, timescale
        :math:`1/(1-\beta)`.  A slow mode the update barely reads does not count."""
        shares = self.mode_shares
        if not bool(torch.isfinite(shares).all()):
            return float(self.eigenvalues[0].abs())
        return float(self.eigenvalues[shares >= _MODE_SHARE][0].abs())

    @property
    def timescale(self) -> float:
        r""":math:`1/(1-\beta)` of :attr:`effective_momentum` (steps; inf at 1)."""
        beta = self.effective_momentum
        return math.inf if beta >= 1 else 1.0 / (1.0 - beta)

    @property
    def effective_lr(self) -> float:
        r"""The instantaneous learning rate :math:`-D = -\partial\Delta_t/\partial g_t`."""
        return -self.feedthrough

    @property
    def long_run_lr(self) -> float:
        r"""The response to a sustained gradient change,
        :math:`-\sum_k c_k = -(D + C (I - J)^{-1} B)` (heavy ball: :math:`\eta/(1-\beta)`);
        inf when :math:`J` has an eigenvalue 1."""
        eye = torch.eye(self.jacobian.shape[0], dtype=self.jacobian.dtype)
        try:
            x = torch.linalg.solve(eye - self.jacobian, self.input_gain)
        except RuntimeError:  # singular: a perfect integrator
            return math.inf
        return -(self.feedthrough + float(self.output_gain @ x))

    def impulse_response(self, num_steps: int) -> torch.Tensor:
        r""":math:`c_0 .. c_{n-1}`: :math:`c_0 = D`, :math:`c_k = C J^{k-1} B` ``(n,)``."""
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise HypergradientError(
                f"Linearization.impulse_response(num_steps): num_steps must be an int >= 1, got "
                f"{num_steps!r}."
            )
        out = [torch.tensor(self.feedthrough, dtype=self.jacobian.dtype)]
        x = self.input_gain
        for _ in range(num_steps - 1):
            out.append(self.output_gain @ x)
            x = self.jacobian @ x
        return torch.stack(out)

    def impulse_momentum(self, num_steps: int = 50) -> float:
        r"""The geometric rate of the impulse response fitted by least squares,
        :math:`\sum_k c_k c_{k+1} / \sum_k c_k^2` over :math:`k = 1..n-1` (exactly
        :math:`\beta` for heavy ball; for several modes, their blend over ``num_steps``)."""
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 2:
            raise HypergradientError(
                f"Linearization.impulse_momentum(num_steps): num_steps must be an int >= 2, "
                f"got {num_steps!r}."
            )
        return impulse_momentum(self.impulse_response(num_steps + 1))

    def as_dict(self, num_impulse: int = 50) -> dict[str, Any]:
        """JSON-able summary (eigenvalues as ``[re, im]``)."""
        top = self.top_eigenvalue
        return {
            "g": self.g,
            "state": self.state.tolist(),
            "eigenvalues": [[float(z.real), float(z.imag)] for z in self.eigenvalues],
            "top_eigenvalue": [top.real, top.imag],
            "top_eigenvalue_modulus": abs(top),
            "effective_momentum": self.effective_momentum,
            "timescale": self.timescale,
            "impulse_momentum": self.impulse_momentum(num_impulse),
            "effective_lr": self.effective_lr,
            "long_run_lr": self.long_run_lr,
            "impulse_response": self.impulse_response(num_impulse).tolist(),
        }


def linearize(system: AbstractStateSpaceOptimizer, state: torch.Tensor, g: float) -> Linearization:
    r"""The Jacobians :math:`J, B, C, D` of one component's step at ``(state, g)``
    (:func:`torch.func.jacrev`, exact), the eigenvalues of :math:`J` and their residues
    :math:`r_i = (C V)_i (V^{-1} B)_i` (:math:`J = V \Lambda V^{-1}`).

    Usually ``state`` is a fixed point (:func:`fixed_point`), where the impulse response
    and eigenvalues describe the dynamics near it; elsewhere they describe one step.
    Cost: :math:`S + 1` backward passes and an :math:`S \times S` eigendecomposition.
    """
    where = "linearize(system, state, g)"
    system = _check_system(where, system)
    if state is None:
        raise HypergradientError(
            f"{where}: state is required (a ({system.state_size},) tensor, e.g. "
            f"fixed_point(system, g).state)."
        )
    s = _state(where, system, state)
    g_t = _scalar(where, "g", g, s)
    (j_s, j_g), (c_s, c_g) = jacrev(system.step, argnums=(0, 1))(s, g_t)
    jac, b, c, d = j_s.detach(), j_g.detach(), c_s.detach(), float(c_g)
    eig, vecs = torch.linalg.eig(jac)
    order = torch.argsort(eig.abs(), descending=True, stable=True)
    eig, vecs = eig[order], vecs[:, order]
    cplx = vecs.dtype
    try:
        left = torch.linalg.solve(vecs, b.to(cplx))
        residues = (c.to(cplx) @ vecs) * left
    except RuntimeError:  # defective J: no eigenbasis, report no residues
        residues = torch.full_like(eig, float("nan"))
    if not bool(torch.isfinite(residues.abs()).all()):
        residues = torch.zeros_like(eig)
    return Linearization(s, float(g_t), jac, b, c, d, eig, residues)


# ----------------------------------------------------------------------------------------
# Update vs gradient at the fixed points.


@dataclass(frozen=True)
class UpdateCurve:
    r""":math:`\Delta^*(g)` at the fixed points of a grid of constant gradients.

    Attributes:
        gradients: ``(n,)``, increasing.
        updates: ``(n,)`` :math:`\Delta^*(g)`.
        states: ``(n, S)`` the fixed points.
        residuals: ``(n,)`` their residuals; ``converged`` ``(n,)`` booleans.
    """

    gradients: torch.Tensor
    updates: torch.Tensor
    states: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor


def update_curve(
    system: AbstractStateSpaceOptimizer,
    gradients: Sequence[float] | torch.Tensor,
    *,
    state: torch.Tensor | None = None,
    **fixed_point_kwargs: Any,
) -> UpdateCurve:
    r""":math:`\Delta^*(g)` over ``gradients``, by continuation: the grid is swept outward
    from the gradient closest to zero, each fixed point started from its neighbour's (the
    branch reached from ``state``, default the initial state).  Non-converged points are
    kept and flagged (``throw=False``).  Cost: ``len(gradients)`` :func:`fixed_point`
    calls."""
    where = "update_curve(system, gradients)"
    system = _check_system(where, system)
    grid = torch.as_tensor(gradients, dtype=torch.get_default_dtype()).reshape(-1)
    if grid.numel() == 0 or not bool(torch.isfinite(grid).all()):
        raise HypergradientError(
            f"{where}: gradients must be a non-empty list of finite numbers, got {gradients!r}."
        )
    grid = torch.sort(grid).values
    start = _state(where, system, state)
    fixed_point_kwargs.setdefault("throw", False)
    centre = int(grid.abs().argmin())
    results: dict[int, FixedPoint] = {}
    for order in (range(centre, len(grid)), range(centre - 1, -1, -1)):
        s = start if order.start == centre else results[centre].state
        for i in order:
            fp = fixed_point(system, float(grid[i]), state=s, **fixed_point_kwargs)
            results[i] = fp
            if fp.converged:
                s = fp.state
    fps = [results[i] for i in range(len(grid))]
    return UpdateCurve(
        grid,
        torch.tensor([fp.update for fp in fps]),
        torch.stack([fp.state for fp in fps]),
        torch.tensor([fp.residual for fp in fps]),
        torch.tensor([fp.converged for fp in fps]),
    )


def saturation_ratio(
    system: AbstractStateSpaceOptimizer,
    g: float,
    *,
    factor: float = 10.0,
    state: torch.Tensor | None = None,
    tol: float | None = None,
) -> float:
    r""":math:`\Delta^*(\text{factor}\cdot g)/\Delta^*(g)` at the fixed points (both
    reached by continuation from ``state``): ``factor`` for a linear update (SGD, heavy
    ball), about 1 for a sign-like (clipped) one (Adam).  ``tol``: of :func:`fixed_point`,
    default :math:`\max(10^{-8}, 100\,\epsilon)` (approximate fixed points, as in the
    paper: saturated gates make some very slow);
    raises :class:`~hypergradient.ConvergenceError` when one is not found."""
    where = "saturation_ratio(system, g)"
    _scalar(where, "g", g, torch.zeros(()))
    if float(g) == 0:
        raise HypergradientError(f"{where}: g must be nonzero (the ratio's denominator).")
    _check_number(where, "factor", factor, 1e-12, math.inf)
    tol = _tolerance(where, tol, 1e-8, system.init_state().dtype)
    curve = update_curve(system, [float(g), factor * float(g)], state=state, throw=True, tol=tol)
    i, j = (0, 1) if float(g) * factor >= float(g) else (1, 0)
    if curve.updates[i] == 0:
        raise HypergradientError(
            f"{where}: the fixed-point update at g={float(g):g} is exactly zero; the ratio is "
            f"undefined (is the optimizer the zero update?)."
        )
    return float(curve.updates[j] / curve.updates[i])


def impulse_response(
    system: AbstractStateSpaceOptimizer,
    state: torch.Tensor,
    g: float,
    num_steps: int,
    *,
    delta: float = 1e-5,
) -> torch.Tensor:
    r"""The nonlinear impulse response by central differences: from ``state`` under the
    constant gradient ``g``, the change of the updates :math:`\Delta_0 .. \Delta_{n-1}`
    when :math:`g_0` alone is moved by :math:`\pm` ``delta``, divided by ``2 delta``.
    At a fixed point it approaches :meth:`Linearization.impulse_response` as ``delta`` -> 0;
    for large ``delta`` it shows the nonlinearity.  Cost: ``2 num_steps`` steps."""
    where = "impulse_response(system, state, g, num_steps)"
    system = _check_system(where, system)
    s0 = _state(where, system, state)
    g_t = _scalar(where, "g", g, s0)
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise HypergradientError(f"{where}: num_steps must be an int >= 1, got {num_steps!r}.")
    _check_number(where, "delta", delta, 1e-300, math.inf)
    gs = g_t.expand(num_steps).clone()
    plus, minus = gs.clone(), gs.clone()
    plus[0] += delta
    minus[0] -= delta
    with torch.no_grad():
        batch = torch.stack([plus, minus], dim=1)  # (n, 2): both runs as two components
        s = s0.expand(2, -1).clone()
        out = []
        for t in range(num_steps):
            s, u = system.step(s, batch[t])
            out.append((u[0] - u[1]) / (2 * delta))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------
# The effective learning rate over a training run.


@dataclass(frozen=True)
class Trace:
    r"""A recorded training run.

    Attributes:
        gradients: ``(T, N)``, :math:`g_t`.
        updates: ``(T, N)``, :math:`\Delta_t`.
        losses: ``(T,)``, the loss at :math:`w_t` (before the update).
        instant_lr: ``(T,)``, :math:`-\mathrm{mean}_j\,\partial\Delta_{t,j}/\partial g_{t,j}`
            at the actual state (``None`` when not known, e.g. a recorded run).
    """

    gradients: torch.Tensor
    updates: torch.Tensor
    losses: torch.Tensor
    instant_lr: torch.Tensor | None = None

    @property
    def lr_ratio(self) -> torch.Tensor:
        """:func:`effective_lr_schedule` of the run."""
        return effective_lr_schedule(self.gradients, self.updates)


def effective_lr_schedule(gradients: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    r"""Per step, the learning rate of the plain gradient step closest to the update:
    :math:`\eta_t = \arg\min_\eta \|\Delta_t + \eta g_t\|^2 =
    -\langle \Delta_t, g_t\rangle / \|g_t\|^2` (NaN where :math:`g_t = 0`).

    For SGD it is the learning rate; with momentum it also counts the part of the momentum
    aligned with the current gradient.  Args: ``(T, N)`` gradients and updates of any
    optimizer (e.g. recorded from a ``torch.optim`` run).  Returns ``(T,)``.
    """
    where = "effective_lr_schedule(gradients, updates)"
    if (
        not isinstance(gradients, torch.Tensor)
        or not isinstance(updates, torch.Tensor)
        or gradients.dim() != 2
        or gradients.shape != updates.shape
    ):
        raise HypergradientError(
            f"{where}: gradients and updates must be (T, N) tensors of the same shape, got "
            f"{_shape(gradients)} and {_shape(updates)}."
        )
    norm2 = gradients.square().sum(dim=1)
    ratio = -(updates * gradients).sum(dim=1) / norm2
    return torch.where(norm2 > 0, ratio, torch.full_like(ratio, float("nan")))


def identify_impulse_response(
    gradients: torch.Tensor, updates: torch.Tensor, num_lags: int
) -> torch.Tensor:
    r"""Black-box system identification: the impulse response of a recorded run, by least
    squares over every component and step,

    .. math:: \min_c \sum_{t \ge K-1,\,j} \Big(\Delta_{t,j} - \sum_{k<K} c_k\, g_{t-k,j}\Big)^2 .

    For a linear optimizer (SGD, heavy ball) driven by varied gradients it recovers
    :math:`c_k` exactly up to the memory beyond ``num_lags`` (heavy ball:
    :math:`c_k = -\eta\beta^k`); for a nonlinear one it is the best linear (Wiener) filter
    of that run.  Needs no access to the optimizer's state: e.g. ``torch.optim.SGD``'s
    updates recorded as parameter differences.

    Args:
        gradients, updates: ``(T, N)`` with :math:`T \ge K`.
        num_lags: :math:`K`.

    Returns:
        ``(K,)``, :math:`c_0 .. c_{K-1}`.  Cost: one least-squares solve with
        :math:`(T-K+1) N` rows and :math:`K` unknowns.
    """
    where = "identify_impulse_response(gradients, updates, num_lags)"
    if (
        not isinstance(gradients, torch.Tensor)
        or not isinstance(updates, torch.Tensor)
        or gradients.dim() != 2
        or gradients.shape != updates.shape
    ):
        raise HypergradientError(
            f"{where}: gradients and updates must be (T, N) tensors of the same shape, got "
            f"{_shape(gradients)} and {_shape(updates)}."
        )
    steps, n = gradients.shape
    if not isinstance(num_lags, int) or isinstance(num_lags, bool) or not 1 <= num_lags <= steps:
        raise HypergradientError(
            f"{where}: num_lags must be an int in [1, T={steps}], got {num_lags!r}."
        )
    if (steps - num_lags + 1) * n < num_lags:
        raise HypergradientError(
            f"{where}: {(steps - num_lags + 1) * n} equations for {num_lags} unknowns; record "
            f"more steps or components, or use fewer lags."
        )
    # rows: (t, j) for t >= K-1; column k holds g_{t-k, j}
    lagged = torch.stack([gradients[num_lags - 1 - k : steps - k] for k in range(num_lags)], dim=-1)
    design = lagged.reshape(-1, num_lags)
    target = updates[num_lags - 1 :].reshape(-1, 1)
    return torch.linalg.lstsq(design, target).solution[:, 0]


def impulse_momentum(response: torch.Tensor) -> float:
    r"""The geometric rate of an impulse response :math:`c_0, c_1, \ldots` fitted by least
    squares over :math:`k \ge 1`: :math:`\sum c_k c_{k+1} / \sum c_k^2` (heavy ball:
    exactly :math:`\beta`)."""
    if not isinstance(response, torch.Tensor) or response.dim() != 1 or len(response) < 3:
        raise HypergradientError(
            f"impulse_momentum(response): response must be a 1-d tensor of at least 3 "
            f"coefficients c_0, c_1, c_2, ..., got {_shape(response)}."
        )
    c = response[1:]
    denom = float(c[:-1].square().sum())
    return 0.0 if denom == 0 else float((c[:-1] * c[1:]).sum()) / denom


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def trace(
    system: AbstractStateSpaceOptimizer,
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
    w0: torch.Tensor,
    num_steps: int,
) -> Trace:
    r"""Train ``w`` (``(N,)``) with the system for ``num_steps`` steps from its initial
    state, recording gradients, updates, losses and the instantaneous learning rate
    :math:`-\mathrm{mean}_j\,\partial\Delta_{t,j}/\partial g_{t,j}` (one forward-mode
    product with an all-ones tangent: the components are independent).

    Args:
        system: the optimizer.
        loss_fn: ``(w, t) -> loss`` (0-d), differentiable in ``w``; ``t`` is the step
            (a mini-batch index for stochastic losses).
        w0: ``(N,)`` initial parameters.
        num_steps: :math:`T`.

    Cost: ``num_steps`` gradient evaluations and twice as many component-wise steps.
    """
    where = "trace(system, loss_fn, w0, num_steps)"
    system = _check_system(where, system)
    if not callable(loss_fn):
        raise HypergradientError(
            f"{where}: loss_fn must be callable (w, t) -> loss, got {loss_fn!r}."
        )
    if not isinstance(w0, torch.Tensor) or w0.dim() != 1 or not w0.is_floating_point():
        raise HypergradientError(f"{where}: w0 must be a floating (N,) tensor, got {_shape(w0)}.")
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise HypergradientError(f"{where}: num_steps must be an int >= 1, got {num_steps!r}.")
    w = w0.detach().clone()
    s = system.init_state(w.shape).to(w)
    grads, updates, losses, lrs = [], [], [], []
    for t in range(num_steps):
        wr = w.clone().requires_grad_(True)
        loss = loss_fn(wr, t)
        (g,) = torch.autograd.grad(loss, wr)
        (s_new, u), (_, du) = jvp(system.step, (s, g), (torch.zeros_like(s), torch.ones_like(g)))
        grads.append(g)
        updates.append(u.detach())
        losses.append(float(loss.detach()))
        lrs.append(-float(du.mean()))
        s = s_new.detach()
        w = w + u.detach()
    return Trace(torch.stack(grads), torch.stack(updates), torch.tensor(losses), torch.tensor(lrs))


# ----------------------------------------------------------------------------------------
# The report.


def report(
    system: AbstractStateSpaceOptimizer,
    *,
    g_typical: float,
    g_linearize: float = 0.0,
    run: Trace | None = None,
    name: str = "optimizer",
    out_dir: str | Path | None = None,
    num_gradients: int = 41,
    gradient_range: tuple[float, float] = (1e-2, 1e2),
    num_impulse: int = 50,
    momentum_gradients: Sequence[float] | None = None,
) -> dict[str, Any]:
    r"""All three analyses of one optimizer, as a dict (and ``{name}.json`` plus
    ``{name}.png`` under ``out_dir``).

    * ``linearization``: at the fixed point of ``g_linearize`` (default the paper's
      :math:`g = 0`): eigenvalues, effective momentum, timescale, impulse-fitted
      momentum, instantaneous and long-run learning rates, impulse response;
    * ``momentum_vs_g``: the effective momentum at the fixed points of
      ``momentum_gradients`` (default :math:`\pm` ``g_typical`` times 0.1, 1, 10): how the
      memory changes with the gradient's size (learning-rate adaptation);
    * ``update_curve`` and ``saturation_ratio``: :math:`\Delta^*(g)` on ``num_gradients``
      points, :math:`0` and :math:`\pm g_{\text{typ}}` times log-spaced multiples over
      ``gradient_range`` (default :math:`10^{-2}..10^2`), and
      :math:`\Delta^*(10 g_{\text{typ}})/\Delta^*(g_{\text{typ}})`;
    * ``schedule``: with ``run``, the effective learning rates per step (:class:`Trace`).

    The PNG has four panels: update vs gradient, the eigenvalues in the complex plane with
    the unit circle, the impulse response (linear and nonlinear), and the learning-rate
    schedule.
    """
    where = "report(system, ...)"
    system = _check_system(where, system)
    g_typ = float(_scalar(where, "g_typical", g_typical, torch.zeros(())))
    if g_typ <= 0:
        raise HypergradientError(
            f"{where}: g_typical must be > 0 (a typical gradient size), got {g_typical!r}."
        )
    _scalar(where, "g_linearize", g_linearize, torch.zeros(()))
    if not isinstance(num_gradients, int) or num_gradients < 3:
        raise HypergradientError(
            f"{where}: num_gradients must be an int >= 3, got {num_gradients!r}."
        )
    lo, hi = gradient_range
    if not 0 < lo < hi:
        raise HypergradientError(
            f"{where}: gradient_range must be (low, high) with 0 < low < high, got "
            f"{gradient_range!r}."
        )
    if run is not None and not isinstance(run, Trace):
        raise HypergradientError(f"{where}: run must be a Trace (see trace(...)), got {run!r}.")

    fp = fixed_point(system, float(g_linearize))
    lin = linearize(system, fp.state, fp.g)
    nonlinear = impulse_response(system, fp.state, fp.g, num_impulse, delta=0.1 * g_typ)
    half = num_gradients // 2
    mags = g_typ * torch.logspace(math.log10(lo), math.log10(hi), half)
    grid = torch.cat([-mags.flip(0), torch.zeros(num_gradients - 2 * half), mags])
    curve = update_curve(system, grid)
    try:
        ratio = saturation_ratio(system, g_typ)
    except ConvergenceError:  # reported as NaN; the curve's residuals say where
        ratio = math.nan
    momentum_gs = (
        [s * g_typ * f for s in (-1, 1) for f in (0.1, 1.0, 10.0)]
        if momentum_gradients is None
        else [float(x) for x in momentum_gradients]
    )
    by_g = []
    for gv in momentum_gs:
        point = fixed_point(system, gv, throw=False)
        entry: dict[str, Any] = {
            "g": gv,
            "converged": point.converged,
            "residual": point.residual,
        }
        if point.converged:
            lg = linearize(system, point.state, gv)
            entry.update(
                effective_momentum=lg.effective_momentum,
                top_eigenvalue_modulus=abs(lg.top_eigenvalue),
                effective_lr=lg.effective_lr,
                update=point.update,
            )
        by_g.append(entry)
    out: dict[str, Any] = {
        "name": name,
        "g_typical": g_typ,
        "fixed_point": {
            "g": fp.g,
            "update": fp.update,
            "residual": fp.residual,
            "num_steps": fp.num_steps,
        },
        "linearization": lin.as_dict(num_impulse),
        "nonlinear_impulse_response": nonlinear.tolist(),
        "momentum_vs_g": by_g,
        "update_curve": {
            "gradients": curve.gradients.tolist(),
            "updates": curve.updates.tolist(),
            "converged": curve.converged.tolist(),
            "residuals": curve.residuals.tolist(),
        },
        "saturation_ratio": ratio,
    }
    if run is not None:
        out["schedule"] = {
            "lr_ratio": run.lr_ratio.tolist(),
            "instant_lr": None if run.instant_lr is None else run.instant_lr.tolist(),
            "losses": run.losses.tolist(),
        }
    if out_dir is not None:
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.json").write_text(json.dumps(_finite(out), indent=1))
        plot_report(out, directory / f"{name}.png")
    return out


def _finite(obj: Any) -> Any:
    """JSON has no inf/NaN: they become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def plot_report(result: Mapping[str, Any], path: str | Path) -> None:
    """The four-panel PNG of a :func:`report` result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lin = result["linearization"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0, 0]
    curve = result["update_curve"]
    gs, us = curve["gradients"], curve["updates"]
    ax.plot(gs, us, "o-", ms=3, label=r"$\Delta^*(g)$ at the fixed points")
    slow = [(g, u) for g, u, ok in zip(gs, us, curve["converged"]) if not ok]
    if slow:  # approximate fixed points (slow points): residual above the tolerance
        ax.plot(*zip(*slow), "x", color="C3", label="slow points (not converged)")
    g0, u0 = lin["g"], result["fixed_point"]["update"]
    near = [g for g in gs if abs(g - g0) <= result["g_typical"]]  # where a tangent means much
    ax.plot(near, [u0 - lin["long_run_lr"] * (g - g0) for g in near], "--", color="grey",
            label=f"tangent at g={g0:.3g} (long-run lr)")  # fmt: skip
    lo, hi = min(us), max(us)
    pad = 0.2 * (hi - lo + 1e-30)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xscale("symlog", linthresh=result["g_typical"] * 1e-2)
    ax.set_xlabel("constant gradient g")
    ax.set_ylabel("update at the fixed point")
    ax.set_title(f"update vs gradient (saturation ratio {result['saturation_ratio']:.3g})")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    circle = torch.linspace(0, 2 * math.pi, 200)
    ax.plot(torch.cos(circle), torch.sin(circle), color="grey", lw=0.8)
    eig = lin["eigenvalues"]
    ax.scatter([e[0] for e in eig], [e[1] for e in eig], s=18)
    ax.set_aspect("equal")
    ax.set_title(
        f"eigenvalues of dF/ds at the g={lin['g']:g} fixed point\n"
        f"effective momentum {lin['effective_momentum']:.3f} "
        f"(timescale {lin['timescale']:.3g} steps)"
    )
    ax.set_xlabel("Re")
    ax.set_ylabel("Im")

    ax = axes[1, 0]
    lin_ir = lin["impulse_response"]
    ax.plot(range(len(lin_ir)), lin_ir, "o-", ms=3, label="linearised $c_k$")
    ax.plot(
        range(len(result["nonlinear_impulse_response"])),
        result["nonlinear_impulse_response"],
        "--",
        label=r"nonlinear ($\delta = 0.1\,g_{typ}$)",
    )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("steps after the gradient pulse k")
    ax.set_ylabel("update response")
    ax.set_title(f"impulse response (fitted momentum {lin['impulse_momentum']:.3f})")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    if "schedule" in result:
        sched = result["schedule"]
        ax.plot(sched["lr_ratio"], label=r"$-\langle\Delta_t, g_t\rangle / \|g_t\|^2$")
        if sched["instant_lr"] is not None:
            ax.plot(sched["instant_lr"], label=r"$-\partial\Delta_t/\partial g_t$")
        ax.set_xlabel("training step t")
        ax.set_ylabel("effective learning rate")
        ax.set_title("effective learning-rate schedule over training")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    fig.suptitle(f"Reverse engineering: {result['name']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
