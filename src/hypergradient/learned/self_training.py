r"""Self-training: a population of learned optimizers that trains its own meta-parameters.

Metz, Freeman, Maheswaranathan and Sohl-Dickstein (2021) outer-train a population of
randomly initialised learned optimizers *with learned optimizers from the same population*
instead of Adam.  :func:`self_train` runs that loop at CPU scale::

    thetas = [lopt.init(generator) for _ in range(N)]         # random initialisation
    for s in range(num_steps):
        for i in range(N):                                    # antithetic ES, whole episodes
            g[i], loss[i] = AntitheticES(family.unrolled_system(lopt, T), ...).estimate(thetas[i])
        j = argmin(fitness)                                   # the current best member
        for i in range(N):                                    # j's optimizer updates everyone
            delta, outer_state[i] = lopt.update(thetas[j], g[i], thetas[i], outer_state[i])
            thetas[i] = thetas[i] + delta
        if (s + 1) % pbt_every == 0:                          # population-based training
            worst 25% <- copies of the best 25% (theta, outer state, fitness), perturbed

The outer update of member :math:`i` is the learned update rule of the best member
:math:`j` applied to the *vector of meta-parameters* :math:`\theta_i`, with the ES estimate
:math:`\hat g_i` as its gradient and :math:`i`'s own optimizer state (momenta of
:math:`\hat g_i`):

.. math::

    \theta_i \leftarrow \theta_i + U_{\theta_j}(\hat g_i, \theta_i, s_i), \qquad
    \hat g_i = \frac{1}{S}\sum_{k=1}^{S} \frac{L(\theta_i + \epsilon_k) -
    L(\theta_i - \epsilon_k)}{2\sigma^2}\,\epsilon_k.

No ``torch.optim`` optimizer and no hand-designed rule is in this loop (``outer="self"``);
``outer="sgd"`` replaces :math:`U` by :math:`-\eta \hat g_i` (the control of the paper),
``outer="adam"`` by Adam's step on :math:`\hat g_i` (the paper's Adam-outer-trained
comparison) and ``outer="none"`` by zero (population-based training alone: selection and
perturbation, the ablation that shows what the learned outer updates add).

``batch_population=True`` draws every member's ES particles as above but runs the
:math:`2SN` particles of all members as *one* vmapped batch (one ``vmap`` call per inner
step instead of :math:`N`): the same estimator, several times cheaper per outer step on a
CPU, where the per-call overhead of small tasks dominates.

**The chicken-and-egg problem.**  A random learned optimizer is as likely to ascend as to
descend, and with Metz et al.'s output parametrisation
:math:`\Delta = a\, d\, \exp(b\, m)` its steps have size about :math:`a |d|`.  Applied to
its own meta-parameters (features normalised, so :math:`|d| \approx |\theta|`), a member
changes by a *relative* amount of about :math:`a` per outer step whatever its scale.  With
Metz et al.'s :math:`a = b = 10^{-3}` (made for thousands of outer steps) self-training at
CPU scale barely moves; :class:`LinearLearnedOptimizer` defaults to :math:`a = 10^{-2}`
and :math:`b = 0.1`, so a member can change its direction weights by about 1% and its log
step size by about 0.001 per outer step.  A larger magnitude rate is unstable: the
magnitude is exponential in features that are unbounded, and an updater that enlarges its
own magnitude weights enlarges every member's next outer step (positive feedback; with
:math:`b = 1`, 2 of 4 populations on noisy quadratics first improved, then lost most of
the gain).  What breaks
the symmetry between ascending and descending members is selection: the best member
updates everyone, and population-based training replaces the worst.

References:
    Metz, Freeman, Maheswaranathan, Sohl-Dickstein (2021), Training Learned Optimizers
    with Randomly Initialized Learned Optimizers (arXiv 2101.07367).
    Metz, Maheswaranathan, Freeman, Poole, Sohl-Dickstein (2020), Tasks, stability,
    architecture, and compute (arXiv 2009.11243): the output parametrisation.
    Jaderberg et al. (2017), Population Based Training of Neural Networks.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, final

import torch
import torch.utils._pytree as pytree

from .._errors import HypergradientError
from .._io import checkpoint_type, load_checkpoint, save_atomic, write_json_atomic
from ..estimators import AntitheticES, EstimatorState
from ..estimators._system import (
    check_finite_losses,
    concat_particles,
    init_particles,
    run_window,
    sample_perturbations,
)
from ..estimators.es import antithetic_thetas
from .architectures import (
    AbstractLearnedOptimizer,
    Theta,
    _check_scale,
    _check_theta,
    _flat_features,
    _output_update,
    _split_updates,
    _unflatten_state,
    describe,
    step_inputs,
)
from .meta_training import _jsonable, _progress
from .tasks import AbstractTaskFamily, ClassifierFamily, InnerTrainingSystem

#: Outer update rules of :func:`self_train`.
OUTER_RULES = ("self", "sgd", "adam", "none")
"""Outer update rules of :func:`self_train`: the best member's learned optimizer
(``"self"``), plain SGD (``"sgd"``, the control), Adam (``"adam"``, betas 0.9 and 0.999,
bias-corrected, epsilon 1e-8) or none (``"none"``, population-based training alone).

Examples:
    >>> from hypergradient.learned import OUTER_RULES
    >>> OUTER_RULES
    ('self', 'sgd', 'adam', 'none')
"""

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8

# columns of ``_flat_features`` for decays (0.9, 0.99): g, w, m_0.9, m_0.99, rms_0.9,
# rms_0.99, then the two ratios; the linear optimizer reads g, m_0.9, m_0.99, rms_0.99
_LINEAR_COLUMNS = (0, 2, 3, 5)


# ----------------------------------------------------------------------------------------
# The tiny learned optimizer of the paper's CPU target.


@final
@dataclass(frozen=True, eq=False)
class LinearLearnedOptimizer(AbstractLearnedOptimizer):
    r"""A per-parameter *linear* learned optimizer: 10 meta-parameters.

    For every element, the features
    :math:`f = [g, m_{0.9}, m_{0.99}, \sqrt{v_{0.99}}]` (momenta and second moment from
    zero, without bias correction, each divided by its root-mean-square over the tensor as
    in :class:`~hypergradient.learned.MLPLearnedOptimizer`) map linearly to a direction and
    a log-magnitude,

    .. math::

        (d, m) = f^\top W + c, \qquad \Delta w = a\, d\, \exp(b\, m),

    with :math:`W \in \mathbb R^{4\times 2}` (``theta["w"]``) and :math:`c \in \mathbb R^2`
    (``theta["b"]``).  :meth:`init` draws every entry from
    :math:`\mathcal N(0, (\text{init\_scale}/2)^2)` (LeCun-normal over the 4 features): a
    *random* optimizer that ascends as often as it descends, not the zero update of the MLP
    optimizers.  With :math:`\theta = 0` the update is exactly zero.

    Args:
        scale_dir: :math:`a`, the step multiplier (Metz et al.: ``1e-3``).
        scale_mag: :math:`b`, the magnitude rate (Metz et al.: ``1e-3``).
        init_scale: standard deviation of the initial entries times 2.

    State per tensor: ``m``, ``v`` (``(2, *shape)``, decays 0.9 and 0.99); global:
    ``step``.  Cost per element and update: about 30 flops.  It reads no progress or loss
    inputs, so ``lopt.opt_fn(theta)(params)`` needs no ``num_steps``.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import LinearLearnedOptimizer, step_inputs
        >>> lopt = LinearLearnedOptimizer()
        >>> theta = {"w": torch.zeros(4, 2), "b": torch.zeros(2)}
        >>> theta["w"][0, 0] = -1.0  # d = -g / rms(g): sign-like descent, step a = 0.01
        >>> params = {"x": torch.tensor([1.0, -2.0])}
        >>> state = lopt.init_state(params)
        >>> grads = {"x": torch.tensor([3.0, -3.0])}
        >>> updates, state = lopt.update(theta, grads, params, state, step_inputs())
        >>> [round(u, 6) for u in updates["x"].tolist()]
        [-0.01, 0.01]
    """

    scale_dir: float = 1e-2
    scale_mag: float = 0.1
    init_scale: float = 1.0

    decays: ClassVar[tuple[float, ...]] = (0.9, 0.99)
    use_progress: ClassVar[bool] = False  # type: ignore[misc]
    bias_correction: ClassVar[bool] = False

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        _check_scale(where, "scale_dir", self.scale_dir)
        _check_scale(where, "scale_mag", self.scale_mag)
        _check_scale(where, "init_scale", self.init_scale)

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"w": (len(_LINEAR_COLUMNS), 2), "b": (2,)}

    def init(self, generator: torch.Generator, *, dtype: torch.dtype | None = None) -> Theta:
        dtype = torch.get_default_dtype() if dtype is None else dtype
        std = self.init_scale / math.sqrt(len(_LINEAR_COLUMNS))
        return {
            k: std * torch.randn(shape, generator=generator, dtype=dtype)
            for k, shape in self.theta_shapes().items()
        }

    def init_tensor_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.zeros((len(self.decays), *param.shape), dtype=param.dtype, device=param.device)
        return {"m": z, "v": z.clone()}

    def init_global_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"step": torch.zeros((), dtype=like.dtype, device=like.device)}

    def update(self, theta, grads, params, state, inputs):
        step = state["global"]["step"]
        flat = _flat_features(
            self.decays, self.bias_correction, grads, params, state["tensors"], step
        )
        out = flat.features[:, list(_LINEAR_COLUMNS)] @ theta["w"] + theta["b"]
        update = _output_update(out[:, 0], out[:, 1], self.scale_dir, self.scale_mag)
        new_state = {"global": {"step": step + 1}, "tensors": _unflatten_state(flat, params)}
        return _split_updates(update, flat, params), new_state


# ----------------------------------------------------------------------------------------
# The three operations of the loop, public so that they can be checked one by one.


def outer_update(
    optimizer: AbstractLearnedOptimizer,
    updater: Theta,
    theta: Theta,
    grad: Mapping[str, torch.Tensor],
    state: dict[str, Any],
    *,
    progress: float = 0.0,
    loss: float | torch.Tensor | None = None,
) -> tuple[Theta, dict[str, Any]]:
    r"""One self-training step: the learned optimizer ``updater`` applied to ``theta``.

    :math:`\theta \leftarrow \theta + U_{\text{updater}}(g, \theta, s)`: ``theta`` (a
    member's meta-parameters) plays the part of the parameters, ``grad`` (its ES estimate)
    of their gradient, and ``state`` is the member's own optimizer state
    (``optimizer.init_state(theta)`` at the start).  ``progress`` and ``loss`` are the
    :class:`~hypergradient.learned.StepInputs` of optimizers that read them.  Pure: returns
    ``(new_theta, new_state)``.  A zero ``updater`` of :class:`LinearLearnedOptimizer`
    (or of the MLP optimizers' output layer) gives ``new_theta == theta``.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import LinearLearnedOptimizer, outer_update
        >>> lopt = LinearLearnedOptimizer()
        >>> updater = {"w": torch.zeros(4, 2), "b": torch.zeros(2)}
        >>> updater["w"][0, 0] = -1.0  # the update -0.01 * g / rms(g)
        >>> theta = lopt.init(torch.Generator().manual_seed(0))  # a member of the population
        >>> grad = {k: torch.ones_like(v) for k, v in theta.items()}  # its ES estimate
        >>> new, state = outer_update(lopt, updater, theta, grad, lopt.init_state(theta))
        >>> all(torch.allclose(new[k], theta[k] - 0.01) for k in theta)
        True
    """
    where = "outer_update(...)"
    _check_theta(f"{where} (updater)", updater, optimizer)
    _check_theta(f"{where} (theta)", theta, optimizer)
    if set(grad) != set(theta):
        raise HypergradientError(
            f"{where}: grad must have the keys of theta {sorted(theta)}, got {sorted(grad)}."
        )
    first = next(iter(theta.values()))
    inputs = step_inputs(progress, loss, None, like=first)
    with torch.no_grad():
        delta, state = optimizer.update(updater, grad, theta, state, inputs)
    return {k: theta[k] + delta[k] for k in theta}, state


@dataclass(frozen=True)
class PBTEvent:
    """One exploit-and-explore step: ``copies`` lists ``(destination, source)`` members.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import PBTEvent, pbt_exploit_explore
        >>> thetas = [{"x": torch.zeros(2)} for _ in range(4)]
        >>> _, _, event = pbt_exploit_explore(
        ...     thetas, [{}] * 4, [0.3, 0.1, 0.9, 0.5], generator=torch.Generator())
        >>> event  # the worst member (2) became a copy of the best (1)
        PBTEvent(copies=((2, 1),))
    """

    copies: tuple[tuple[int, int], ...]


def rank_members(fitness: Sequence[float]) -> list[int]:
    """Member indices from the best (lowest fitness) to the worst; ties keep index order,
    NaN counts as the worst.

    Examples:
        >>> from hypergradient.learned import rank_members
        >>> rank_members([0.5, float("nan"), -1.0, 0.5])  # lowest first; tie: index order
        [2, 0, 3, 1]
    """
    key = [math.inf if not math.isfinite(f) else f for f in fitness]
    return sorted(range(len(fitness)), key=lambda i: (key[i], i))


def pbt_exploit_explore(
    thetas: Sequence[Theta],
    states: Sequence[Any],
    fitness: Sequence[float],
    *,
    fraction: float = 0.25,
    perturb_scale: float = 0.1,
    generator: torch.Generator,
) -> tuple[list[Theta], list[Any], PBTEvent]:
    r"""Population-based training's exploit and explore step.

    The :math:`n = \max(1, \mathrm{round}(\text{fraction}\cdot N))` worst members (highest
    ``fitness``) are replaced by copies of the :math:`n` best: the worst by the best, the
    second worst by the second best, and so on.  A copy takes the source's
    meta-parameters, perturbed per tensor as
    :math:`\theta' = \theta + \text{perturb\_scale}\cdot \mathrm{rms}(\theta)\,\xi`,
    :math:`\xi \sim \mathcal N(0, I)` from ``generator``, and a deep copy of its
    optimizer ``states`` entry.  Members in neither group are returned unchanged (the same
    objects).

    Returns ``(thetas, states, event)`` (new lists).

    Examples:
        >>> import torch
        >>> from hypergradient.learned import pbt_exploit_explore
        >>> thetas = [{"x": torch.full((3,), float(i))} for i in range(8)]
        >>> states = [{"step": torch.tensor(i)} for i in range(8)]
        >>> fitness = [float(i) for i in range(8)]  # member 0 is the best, 7 the worst
        >>> new_thetas, new_states, event = pbt_exploit_explore(
        ...     thetas, states, fitness, perturb_scale=0.0, generator=torch.Generator())
        >>> event.copies  # the 2 worst (25%) become copies of the 2 best
        ((7, 0), (6, 1))
        >>> new_thetas[6]["x"].tolist(), new_states[6]["step"].item(), new_thetas[3] is thetas[3]
        ([1.0, 1.0, 1.0], 1, True)
    """
    where = "pbt_exploit_explore(...)"
    n_members = len(thetas)
    if len(states) != n_members or len(fitness) != n_members:
        raise HypergradientError(
            f"{where}: thetas, states and fitness must have one entry per member, got "
            f"{n_members}, {len(states)} and {len(fitness)}."
        )
    n_copy = _copies(where, "fraction", fraction, n_members)
    _check_nonnegative(where, "perturb_scale", perturb_scale)
    order = rank_members(fitness)
    thetas, states = list(thetas), list(states)
    copies = []
    for best, worst in zip(order[:n_copy], reversed(order[-n_copy:])):
        src = thetas[best]
        thetas[worst] = {k: _perturb(v, perturb_scale, generator) for k, v in src.items()}
        states[worst] = pytree.tree_map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) else x, states[best]
        )
        copies.append((worst, best))
    return thetas, states, PBTEvent(tuple(copies))


def _perturb(x: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    if scale == 0:
        return x.clone()
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return x + scale * x.square().mean().sqrt() * noise.to(x.device)


def _copies(where: str, name: str, fraction: object, n_members: int) -> int:
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 0.5
    ):
        raise HypergradientError(
            f"{where}: {name} must be a number in (0, 0.5] (the share of the population "
            f"replaced, and the share copied), got {fraction!r}."
        )
    return max(1, round(fraction * n_members))


def _check_nonnegative(where: str, name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise HypergradientError(f"{where}: {name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def evaluate_population(
    optimizer: AbstractLearnedOptimizer,
    thetas: Sequence[Theta],
    families: Sequence[AbstractTaskFamily],
    *,
    horizon: int,
    num_tasks: int = 8,
    seed: int = 12345,
    meta_loss: str = "full",
    vectorize: bool = True,
) -> list[float]:
    r"""Each member's meta-loss on fixed held-out tasks.

    For every family, ``num_tasks`` tasks are drawn from a generator seeded with
    ``seed + family index`` (the same tasks at every call, never the training tasks) and
    trained for ``horizon`` steps by every member's *unperturbed* :math:`\theta`; a member's
    meta-loss is the mean over families, tasks and steps of the clipped log loss of
    :class:`~hypergradient.learned.InnerTrainingSystem` (``meta_loss="full"``: the full
    training loss after each update).  Members with non-finite :math:`\theta` get ``inf``.
    All members and tasks of a family run as one vmapped batch: cost
    :math:`N \cdot \text{num\_tasks} \cdot T` inner steps per family.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import LinearLearnedOptimizer, NoisyQuadraticFamily
        >>> from hypergradient.learned import evaluate_population, rank_members
        >>> zero = {"w": torch.zeros(4, 2), "b": torch.zeros(2)}  # the zero update
        >>> descent = {"w": torch.tensor([[-1.0, 0], [0, 0], [0, 0], [0, 0]]), "b": torch.zeros(2)}
        >>> broken = {"w": torch.full((4, 2), float("nan")), "b": torch.zeros(2)}
        >>> losses = evaluate_population(LinearLearnedOptimizer(), [zero, descent, broken],
        ...                              [NoisyQuadraticFamily(dim=3)], horizon=5, num_tasks=2)
        >>> rank_members(losses), losses[2]
        ([1, 0, 2], inf)
    """
    where = "evaluate_population(...)"
    _check_int(where, "horizon", horizon)
    _check_int(where, "num_tasks", num_tasks)
    n = len(thetas)
    if n == 0:
        raise HypergradientError(f"{where}: thetas must hold at least one member.")
    finite = [_finite(th) for th in thetas]
    # a diverged member runs with theta = 0 (the zero update) and is reported as inf
    safe = [
        th if ok else {k: torch.zeros_like(v) for k, v in th.items()}
        for th, ok in zip(thetas, finite)
    ]
    total = torch.zeros(n, dtype=torch.float64)
    for index, family in enumerate(families):
        system = InnerTrainingSystem(family, optimizer, horizon, meta_loss)
        gen = torch.Generator().manual_seed(seed + index)
        tasks = init_particles(system, gen, num_tasks, vectorize)
        particles = tasks
        for _ in range(n - 1):
            particles = concat_particles(particles, tasks, vectorize)
        theta_b = {
            k: torch.stack([th[k] for th in safe]).repeat_interleave(num_tasks, dim=0)
            for k in safe[0]
        }

        def no_restart():  # one episode exactly: never called
            raise AssertionError("evaluation runs a single episode")

        with torch.no_grad():
            window = run_window(
                where, system, particles, 0, theta_b, horizon, no_restart, vectorize
            )
        total += window.losses.reshape(n, num_tasks * horizon).mean(dim=1).double()
    losses = (total / len(families)).tolist()
    return [loss if ok else math.inf for loss, ok in zip(losses, finite)]


def _finite(theta: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in theta.values())


def _check_int(where: str, name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HypergradientError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")
    return value


# ----------------------------------------------------------------------------------------
# The loop.


@checkpoint_type  # benchmarks cache finished runs
@dataclass
class SelfTrainingResult:
    """What :func:`self_train` returns.

    Attributes:
        thetas: the members' final meta-parameters (detached).
        best: the index of the best member at the last held-out evaluation (by training
            fitness when there was none).
        history: one record per outer step: ``step`` (0-based), ``family``, ``updater``
            (the member whose optimizer updated every member at this step; ``None`` for
            ``outer="sgd"``/``"none"``), ``es_loss`` (per member: the mean meta-loss of its
            ES particles, on fresh training tasks; ``best_es_loss`` and ``mean_es_loss``
            over the members), ``fitness`` (per member, the mean of
            the last ``fitness_window`` ES losses), ``grad_norm`` and ``update_norm`` (per
            member), ``copies`` (PBT ``[destination, source]`` pairs at this step),
            ``diverged`` (members whose update was not finite), ``seconds``, and ``eval``
            when the population was evaluated after this step.
        evaluations: held-out evaluations ``{"step": outer steps done, "losses": per
            member, "best", "mean", "best_member"}``; the first (step 0) is the random
            initial population: the *fixed random-init* baseline.
        initial_thetas: the random initial population.
        outer: the outer update rule.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import SelfTrainingResult
        >>> thetas = [{"x": torch.zeros(2)}, {"x": torch.ones(2)}]
        >>> evaluations = [{"step": 0, "best": -1.0, "mean": 0.5, "best_member": 0},
        ...                {"step": 10, "best": -2.0, "mean": -1.5, "best_member": 1}]
        >>> result = SelfTrainingResult(thetas, best=1, history=[], evaluations=evaluations)
        >>> result.curve("best"), result.curve("mean")
        (([0, 10], [-1.0, -2.0]), ([0, 10], [0.5, -1.5]))
        >>> result.best_theta["x"].tolist()
        [1.0, 1.0]
    """

    thetas: list[Theta]
    best: int
    history: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    initial_thetas: list[Theta] = field(default_factory=list)
    outer: str = "self"

    @property
    def best_theta(self) -> Theta:
        return self.thetas[self.best]

    def curve(self, which: str = "best") -> tuple[list[int], list[float]]:
        """``(outer steps, held-out meta-loss)`` of the best member (``"best"``) or of the
        population mean (``"mean"``) at every evaluation."""
        if which not in ("best", "mean"):
            raise HypergradientError(
                f"SelfTrainingResult.curve(which={which!r}): use 'best' or 'mean'."
            )
        return [e["step"] for e in self.evaluations], [e[which] for e in self.evaluations]

    def to_json(self) -> dict[str, Any]:
        """History and evaluations as JSON-able data."""
        return _jsonable(
            {
                "outer": self.outer,
                "best": self.best,
                "evaluations": self.evaluations,
                "history": self.history,
            }
        )


def self_training_families() -> list[ClassifierFamily]:
    """The default inner tasks: one-hidden-layer MLPs (64-8-10 batch 32, 64-16-10 batch
    16, tanh) on random 128-example subsets of digits.

    Examples:
        >>> from hypergradient.learned import self_training_families
        >>> [family.name for family in self_training_families()]
        ['digits-mlp-w8-b32', 'digits-mlp-w16-tanh-b16']
    """
    return [
        ClassifierFamily("digits", "mlp", width=8, batch_size=32, num_examples=128),
        ClassifierFamily(
            "digits", "mlp", width=16, batch_size=16, num_examples=128, activation="tanh"
        ),
    ]


def self_train(
    optimizer: AbstractLearnedOptimizer | None = None,
    families: Sequence[AbstractTaskFamily] | AbstractTaskFamily | None = None,
    *,
    population_size: int = 8,
    num_steps: int = 100,
    horizon: int = 50,
    num_pairs: int = 8,
    sigma: float = 0.1,
    outer: str = "self",
    outer_lr: float | None = None,
    pbt_every: int = 20,
    pbt_fraction: float = 0.25,
    perturb_scale: float = 0.1,
    fitness_window: int = 5,
    eval_every: int = 10,
    eval_tasks: int = 4,
    eval_seed: int = 12345,
    meta_loss: str = "full",
    vectorize: bool = True,
    batch_population: bool = False,
    thetas: Sequence[Theta] | None = None,
    generator: torch.Generator | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    history_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: bool = False,
    callback: Callable[[int, dict[str, Any], list[Theta]], bool | None] | None = None,
) -> SelfTrainingResult:
    r"""Population-based self-training of learned optimizers (Metz et al. 2021).

    See the module docstring for the loop.  Per outer step every member gets an antithetic
    ES estimate over whole episodes (:class:`~hypergradient.estimators.AntitheticES`,
    ``num_pairs`` pairs, fresh tasks of the step's family: families take turns), then the
    outer update ``outer``:

    * ``"self"``: the learned optimizer of the member with the best fitness updates every
      member (:func:`outer_update`, each member with its own optimizer state);
    * ``"sgd"``: :math:`\theta_i \leftarrow \theta_i - \text{outer\_lr}\,\hat g_i`;
    * ``"adam"``: Adam on :math:`\hat g_i` with learning rate ``outer_lr`` (each member
      with its own moments, copied with the member by PBT);
    * ``"none"``: no gradient step (population-based training alone).

    Every ``pbt_every`` steps :func:`pbt_exploit_explore` replaces the worst
    ``pbt_fraction`` of the population.  A member's fitness is the mean ES loss of its last
    ``fitness_window`` steps (it follows its source when copied); a member whose update is
    not finite stops training, gets fitness ``inf`` and is replaced at the next PBT step.
    Every ``eval_every`` steps (and before the first) :func:`evaluate_population` scores
    all members on fixed held-out tasks.

    Cost per outer step: :math:`2 S N T` inner steps (:math:`S` = ``num_pairs``,
    :math:`N` = ``population_size``, :math:`T` = ``horizon``), plus
    :math:`N \cdot \text{eval\_tasks} \cdot T` per family at each evaluation.

    Args:
        optimizer: the architecture (default :class:`LinearLearnedOptimizer`).
        families: the inner task families (default :func:`self_training_families`).
        population_size: :math:`N \ge 2`.
        num_steps: outer steps in total (a resumed run continues up to it).
        horizon: :math:`T`, inner steps per episode.
        num_pairs: antithetic pairs per member and step.
        sigma: ES perturbation scale (in :math:`\theta`'s coordinates).
        outer: one of :data:`OUTER_RULES`.
        outer_lr: the learning rate of ``outer="sgd"`` and ``outer="adam"`` (required
            there, not allowed otherwise).
        pbt_every: outer steps between exploit-and-explore steps.
        pbt_fraction: share of the population replaced (and copied) at each.
        perturb_scale: relative size of the perturbation of a copy.
        fitness_window: ES losses averaged into a member's fitness.
        eval_every: outer steps between held-out evaluations.
        eval_tasks: held-out tasks per family.
        eval_seed: seeds the held-out tasks.
        meta_loss: what the inner runs report (see
            :class:`~hypergradient.learned.InnerTrainingSystem`).
        vectorize: run the ES particles (and the evaluation) as vmapped batches.
        batch_population: run all members' ES particles as one batch (same estimator,
            fewer calls; needs ``vectorize=True``, changes the order of random draws).
        thetas: the initial population (default: ``optimizer.init`` from ``generator``).
        generator: every random draw (default ``torch.Generator().manual_seed(0)``); on
            resume its state is restored from the checkpoint.
        checkpoint: file saved every ``checkpoint_every`` steps and at the end; with
            ``resume=True`` an existing one is continued (same options required).
        history_path: JSON file of :meth:`SelfTrainingResult.to_json` (with each
            checkpoint and at the end).
        plot_path: PNG of the held-out meta-loss curves (at the end).
        progress: show a rich progress bar.
        callback: ``callback(step, record, thetas)`` after every outer step; ``True``
            stops the run (after a checkpoint).

    Returns:
        a :class:`SelfTrainingResult`.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import NoisyQuadraticFamily, self_train
        >>> result = self_train(families=NoisyQuadraticFamily(dim=2), population_size=4,
        ...                     num_steps=2, horizon=3, num_pairs=1, pbt_every=2, eval_every=1,
        ...                     eval_tasks=1, generator=torch.Generator().manual_seed(0))
        >>> len(result.thetas), [e["step"] for e in result.evaluations]
        (4, [0, 1, 2])
        >>> [len(r["copies"]) for r in result.history]  # one PBT copy after step 2
        [0, 1]
        >>> result.history[0]["updater"] in range(4)  # the best member updated everyone
        True
    """
    where = "self_train(...)"
    optimizer = LinearLearnedOptimizer() if optimizer is None else optimizer
    if not isinstance(optimizer, AbstractLearnedOptimizer):
        raise HypergradientError(
            f"{where}: optimizer must be an AbstractLearnedOptimizer (e.g. "
            f"LinearLearnedOptimizer()), got {type(optimizer).__name__}."
        )
    if families is None:
        families = self_training_families()
    elif isinstance(families, AbstractTaskFamily):
        families = [families]
    families = list(families) if isinstance(families, (list, tuple)) else families
    if (
        not isinstance(families, list)
        or not families
        or not all(isinstance(f, AbstractTaskFamily) for f in families)
    ):
        raise HypergradientError(
            f"{where}: families must be a task family or a non-empty list of them (e.g. "
            f"[ClassifierFamily('digits', 'mlp', width=8)]), got {families!r}."
        )
    _check_int(where, "population_size", population_size, minimum=2)
    for name, value in (
        ("num_steps", num_steps),
        ("horizon", horizon),
        ("num_pairs", num_pairs),
        ("pbt_every", pbt_every),
        ("fitness_window", fitness_window),
        ("eval_every", eval_every),
        ("eval_tasks", eval_tasks),
        ("checkpoint_every", checkpoint_every),
    ):
        _check_int(where, name, value)
    _check_int(where, "eval_seed", eval_seed, minimum=0)
    _check_scale(where, "sigma", sigma)
    if outer not in OUTER_RULES:
        raise HypergradientError(
            f"{where}: outer must be one of {OUTER_RULES} ('self': the best member's learned "
            f"optimizer; 'sgd': the control; 'none': PBT alone), got {outer!r}."
        )
    if outer in ("sgd", "adam"):
        if outer_lr is None:
            raise HypergradientError(
                f"{where}: outer={outer!r} needs outer_lr=<learning rate> (tune it on a grid)."
            )
        _check_scale(where, "outer_lr", outer_lr)
    elif outer_lr is not None:
        raise HypergradientError(
            f"{where}: outer_lr={outer_lr!r} is only used by outer='sgd' and 'adam'; with "
            f"outer={outer!r} there is no learning rate to set. Drop outer_lr."
        )
    if batch_population is not False and (batch_population is not True or not vectorize):
        raise HypergradientError(
            f"{where}: batch_population must be True or False and needs vectorize=True "
            f"(one vmapped batch), got batch_population={batch_population!r}, "
            f"vectorize={vectorize!r}."
        )
    _copies(where, "pbt_fraction", pbt_fraction, population_size)
    _check_nonnegative(where, "perturb_scale", perturb_scale)
    if resume and checkpoint is None:
        raise HypergradientError(
            f"{where}: resume=True needs checkpoint=<file> (where the run was saved)."
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise HypergradientError(
            f"{where}: generator must be a torch.Generator, got {type(generator).__name__}. "
            f"Use torch.Generator().manual_seed(seed)."
        )
    generator_id = hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest()[:16]
    if thetas is None:
        thetas = [optimizer.init(generator) for _ in range(population_size)]
    else:
        thetas = list(thetas)
        if len(thetas) != population_size:
            raise HypergradientError(
                f"{where}: thetas holds {len(thetas)} members, population_size is "
                f"{population_size}; give one theta per member or leave thetas=None."
            )
        for i, theta in enumerate(thetas):
            _check_theta(f"{where} (thetas[{i}])", theta, optimizer)
    thetas = [{k: v.detach().clone() for k, v in th.items()} for th in thetas]
    initial_thetas = [{k: v.clone() for k, v in th.items()} for th in thetas]
    signature = _jsonable(
        {
            "optimizer": describe(optimizer),
            "families": [f.name for f in families],
            "population_size": population_size,
            "horizon": horizon,
            "num_pairs": num_pairs,
            "sigma": sigma,
            "outer": outer,
            "outer_lr": outer_lr,
            "pbt_every": pbt_every,
            "pbt_fraction": pbt_fraction,
            "perturb_scale": perturb_scale,
            "fitness_window": fitness_window,
            "eval_every": eval_every,
            "eval_tasks": eval_tasks,
            "eval_seed": eval_seed,
            "meta_loss": meta_loss,
            "vectorize": vectorize,
            "batch_population": batch_population,
            "generator": generator_id,
            "initial_thetas": hashlib.sha1(
                b"".join(v.detach().cpu().numpy().tobytes() for th in thetas for v in th.values())
            ).hexdigest()[:16],
        }
    )
    estimators = [
        AntitheticES(
            family.unrolled_system(optimizer, horizon, meta_loss=meta_loss),
            sigma=sigma,
            num_pairs=num_pairs,
            vectorize=vectorize,
        )
        for family in families
    ]
    outer_states = [
        _adam_init(th) if outer == "adam" else optimizer.init_state(th) for th in thetas
    ]
    es_states: dict[tuple[int, int], EstimatorState] = {}
    recent: list[list[float]] = [[] for _ in thetas]
    diverged = [False] * population_size
    history: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    start = 0
    checkpoint = None if checkpoint is None else Path(checkpoint)

    def evaluate(step: int) -> dict[str, Any]:
        losses = evaluate_population(
            optimizer,
            thetas,
            families,
            horizon=horizon,
            num_tasks=eval_tasks,
            seed=eval_seed,
            meta_loss=meta_loss,
            vectorize=vectorize,
        )
        best_member = rank_members(losses)[0]
        record = {
            "step": step,
            "losses": losses,
            "best": losses[best_member],
            "mean": _finite_mean(losses),
            "best_member": best_member,
        }
        evaluations.append(record)
        return record

    def fitness() -> list[float]:
        return [math.inf if dead or not r else sum(r) / len(r) for r, dead in zip(recent, diverged)]

    def result() -> SelfTrainingResult:
        best = evaluations[-1]["best_member"] if evaluations else rank_members(fitness())[0]
        return SelfTrainingResult(
            [{k: v.clone() for k, v in th.items()} for th in thetas],
            best,
            history,
            evaluations,
            initial_thetas,
            outer,
        )

    def save(step: int) -> None:
        if checkpoint is not None:
            save_atomic(
                {
                    "signature": signature,
                    "thetas": thetas,
                    "outer_states": outer_states,
                    "es_states": es_states,
                    "recent": recent,
                    "diverged": diverged,
                    "generator": generator.get_state(),
                    "history": history,
                    "evaluations": evaluations,
                    "initial_thetas": initial_thetas,
                    "step": step,
                },
                checkpoint,
            )
        if history_path is not None:
            write_json_atomic(Path(history_path), result().to_json())

    if resume and checkpoint is not None and checkpoint.is_file():
        saved = load_checkpoint(checkpoint, where)
        if saved["signature"] != signature:
            changed = sorted(k for k in signature if saved["signature"].get(k) != signature[k])
            raise HypergradientError(
                f"{where}: the checkpoint {str(checkpoint)!r} was made with other options "
                f"({', '.join(changed)} differ); resume with the same options or start over "
                f"with resume=False."
            )
        thetas, outer_states = saved["thetas"], saved["outer_states"]
        es_states, recent, diverged = saved["es_states"], saved["recent"], saved["diverged"]
        generator.set_state(saved["generator"])
        history, evaluations = saved["history"], saved["evaluations"]
        initial_thetas, start = saved["initial_thetas"], saved["step"]
    else:
        evaluate(0)

    bar = _progress(progress, num_steps, start)
    try:
        for step in range(start, num_steps):
            t0 = time.perf_counter()
            index = step % len(families)
            est = estimators[index]
            grads: list[Theta | None] = []
            es_loss: list[float] = []
            batched: dict[int, tuple[Theta, float]] = {}
            if batch_population:
                live = [i for i in range(population_size) if not diverged[i]]
                if live:
                    estimates = population_antithetic_es(
                        est.system,
                        [thetas[i] for i in live],
                        num_pairs=num_pairs,
                        sigma=sigma,
                        generator=generator,
                    )
                    batched = dict(zip(live, estimates))
            for i, theta in enumerate(thetas):
                if diverged[i]:
                    grads.append(None)
                    es_loss.append(math.inf)
                    continue
                if batch_population:
                    grad_i, loss_i = batched[i]
                    grads.append(grad_i)
                    es_loss.append(loss_i)
                    recent[i] = (recent[i] + [loss_i])[-fitness_window:]
                    continue
                key = (i, index)
                if key not in es_states:
                    es_states[key] = est.init(theta, generator)
                estimate, es_states[key] = est.estimate(theta, es_states[key], generator)
                grads.append({k: estimate.grad[k].to(theta[k]) for k in theta})
                es_loss.append(float(estimate.loss))
                recent[i] = (recent[i] + [float(estimate.loss)])[-fitness_window:]
            scores = fitness()
            updater = rank_members(scores)[0] if outer == "self" else None
            snapshot = None if updater is None else dict(thetas[updater])
            grad_norms, update_norms, new_dead = [], [], []
            for i, theta in enumerate(thetas):
                grad = grads[i]
                if grad is None:
                    grad_norms.append(math.nan)
                    update_norms.append(0.0)
                    continue
                grad_norms.append(_norm(grad))
                if outer == "self":
                    new_theta, outer_states[i] = outer_update(
                        optimizer,
                        snapshot,
                        theta,
                        grad,
                        outer_states[i],
                        progress=step / num_steps,
                        loss=es_loss[i],
                    )
                elif outer == "sgd":
                    new_theta = {k: theta[k] - outer_lr * grad[k] for k in theta}
                elif outer == "adam":
                    new_theta, outer_states[i] = _adam_step(theta, grad, outer_states[i], outer_lr)
                else:
                    new_theta = theta
                update_norms.append(_norm({k: new_theta[k] - theta[k] for k in theta}))
                if _finite(new_theta):
                    thetas[i] = new_theta
                else:  # the member stops; PBT replaces it
                    diverged[i] = True
                    new_dead.append(i)
            copies: list[list[int]] = []
            if (step + 1) % pbt_every == 0:
                thetas, outer_states, event = pbt_exploit_explore(
                    thetas,
                    outer_states,
                    fitness(),
                    fraction=pbt_fraction,
                    perturb_scale=perturb_scale,
                    generator=generator,
                )
                for dst, src in event.copies:
                    recent[dst] = list(recent[src])
                    diverged[dst] = diverged[src]
                    copies.append([dst, src])
            record: dict[str, Any] = {
                "step": step,
                "family": families[index].name,
                "updater": updater,
                "es_loss": es_loss,
                "best_es_loss": min(es_loss),
                "mean_es_loss": _finite_mean(es_loss),
                "fitness": scores,
                "grad_norm": grad_norms,
                "update_norm": update_norms,
                "copies": copies,
                "diverged": new_dead,
                "seconds": time.perf_counter() - t0,
            }
            if (step + 1) % eval_every == 0 or step + 1 == num_steps:
                record["eval"] = evaluate(step + 1)
            history.append(record)
            if bar is not None:
                best_es = min(es_loss)
                bar[0].update(bar[1], advance=1, description=f"best ES loss {best_es:+.3f}")
            stop = callback is not None and bool(callback(step, record, thetas))
            done = step + 1
            if done % checkpoint_every == 0 or done == num_steps or stop:
                save(done)
            if stop:
                break
    finally:
        if bar is not None:
            bar[0].stop()
    if start >= num_steps:
        save(start)
    out = result()
    if plot_path is not None:
        plot_self_training({outer: out}, Path(plot_path))
    return out


def _adam_init(theta: Theta) -> dict[str, Any]:
    zeros = {k: torch.zeros_like(v) for k, v in theta.items()}
    return {"m": zeros, "v": {k: z.clone() for k, z in zeros.items()}, "t": 0}


def _adam_step(
    theta: Theta, grad: Mapping[str, torch.Tensor], state: dict[str, Any], lr: float
) -> tuple[Theta, dict[str, Any]]:
    """Adam (Kingma and Ba 2015) on the ES estimate: bias-corrected moments, pure."""
    beta1, beta2 = _ADAM_BETAS
    t = state["t"] + 1
    m = {k: beta1 * state["m"][k] + (1 - beta1) * grad[k] for k in theta}
    v = {k: beta2 * state["v"][k] + (1 - beta2) * grad[k].square() for k in theta}
    new = {
        k: theta[k] - lr * (m[k] / (1 - beta1**t)) / ((v[k] / (1 - beta2**t)).sqrt() + _ADAM_EPS)
        for k in theta
    }
    return new, {"m": m, "v": v, "t": t}


def population_antithetic_es(
    system: Any,
    thetas: Sequence[Theta],
    *,
    num_pairs: int,
    sigma: float,
    generator: torch.Generator,
) -> list[tuple[Theta, float]]:
    r"""Whole-episode antithetic ES for every member of a population, as one vmapped batch.

    For member :math:`i` (in order) :math:`S` fresh episodes are drawn from ``system``
    and then :math:`S` perturbations :math:`\epsilon_{i,k} \sim \mathcal N(0, \sigma^2 I)`;
    all :math:`2SN` particles (:math:`\theta_i \pm \epsilon_{i,k}`, both signs of a pair
    on the same episode) run the ``system.horizon`` steps in one
    :func:`torch.func.vmap` batch, and member :math:`i` gets

    .. math::

        \hat g_i = \frac1S \sum_{k=1}^{S} \frac{L^+_{i,k} - L^-_{i,k}}{2\sigma^2}\,
        \epsilon_{i,k}, \qquad \hat L_i = \frac{1}{2S}\sum_k (L^+_{i,k} + L^-_{i,k}),

    exactly :class:`~hypergradient.estimators.AntitheticES` with whole episodes, member by
    member, for a vmap-able system.  Cost: :math:`2SNT` inner steps in :math:`T` vmap
    calls (instead of :math:`NT`).

    Returns:
        one ``(grad, mean_loss)`` per member, ``grad`` shaped like its ``theta``.

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import PowerRecurrence
        >>> from hypergradient.learned.self_training import population_antithetic_es
        >>> system = PowerRecurrence(horizon=3)  # x_{t+1} = a x_t, loss x^2 / 2
        >>> thetas = [{"a": torch.tensor(0.9)}, {"a": torch.tensor(0.5)}]
        >>> out = population_antithetic_es(system, thetas, num_pairs=4000, sigma=0.1,
        ...                                generator=torch.Generator().manual_seed(0))
        >>> exact = [system.smoothed_gradient(th, sigma=0.1)["a"] for th in thetas]
        >>> [round(float(g["a"] / e), 1) for (g, _), e in zip(out, exact)]
        [1.0, 1.0]
    """
    where = "population_antithetic_es(...)"
    _check_int(where, "num_pairs", num_pairs)
    _check_scale(where, "sigma", sigma)
    if not thetas:
        raise HypergradientError(f"{where}: thetas must hold at least one member.")
    particles, rows, perturbations = None, [], []
    for theta in thetas:
        episodes = init_particles(system, generator, num_pairs, True)
        eps = sample_perturbations(theta, num_pairs, float(sigma), generator)
        pair = concat_particles(episodes, episodes, True)
        particles = pair if particles is None else concat_particles(particles, pair, True)
        rows.append(antithetic_thetas(theta, eps))
        perturbations.append(eps)
    theta_b = {k: torch.cat([row[k] for row in rows]) for k in rows[0]}

    def no_restart():  # one episode exactly: never called
        raise AssertionError("population_antithetic_es runs a single episode")

    with torch.no_grad():
        window = run_window(where, system, particles, 0, theta_b, system.horizon, no_restart, True)
    check_finite_losses(where, window.losses, window.t)
    mean = window.losses.mean(dim=1).reshape(len(thetas), 2 * num_pairs)
    out = []
    for i, eps in enumerate(perturbations):
        coef = (mean[i, :num_pairs] - mean[i, num_pairs:]) / (2 * float(sigma) ** 2)
        grad = {
            k: (e * coef.to(e).reshape(-1, *([1] * (e.dim() - 1)))).mean(dim=0)
            for k, e in eps.items()
        }
        out.append((grad, float(mean[i].mean())))
    return out


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf


def _norm(tree: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in tree.values()))


# ----------------------------------------------------------------------------------------
# Plot.


def plot_self_training(
    runs: Mapping[str, SelfTrainingResult],
    path: str | Path,
    *,
    title: str | None = None,
) -> None:
    """PNG of the held-out meta-loss against outer steps: the best member of every run
    (left) and the population mean (right), with the fixed random initial population's
    best and mean (grey, from the first run's step-0 evaluation) on both.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from hypergradient.learned import SelfTrainingResult, plot_self_training
        >>> evaluations = [{"step": s, "best": -s / 10, "mean": 1 - s / 10} for s in (0, 5, 10)]
        >>> run = SelfTrainingResult([], best=0, history=[], evaluations=evaluations)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_self_training({"self": run}, Path(folder) / "self.png")
        ...     print(sorted(p.name for p in Path(folder).iterdir()))
        ['self.png']
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise HypergradientError("plot_self_training(runs={}): give at least one run.")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    first = next(iter(runs.values()))
    for ax, which in zip(axes, ("best", "mean")):
        if first.evaluations and first.evaluations[0]["step"] == 0:
            init = first.evaluations[0]
            ax.axhline(init["best"], color="0.3", lw=1, ls=":", label="random init: best member")
            ax.axhline(init["mean"], color="0.6", lw=1, ls="--", label="random init: mean")
        for i, (label, run) in enumerate(runs.items()):
            steps, values = run.curve(which)
            ax.plot(steps, values, color=f"C{i % 10}", marker="o", ms=3, label=label)
        ax.set_xlabel("outer step")
        ax.set_title(f"{'best member' if which == 'best' else 'population mean'}")
    axes[0].set_ylabel("held-out meta-loss (mean clipped log loss)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title or "Self-training a population of learned optimizers")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
