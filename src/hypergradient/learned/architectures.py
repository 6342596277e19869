r"""Learned optimizers: a per-parameter MLP and Metz et al.'s hierarchical LSTM + MLP.

A learned optimizer is a *pure* update rule with meta-parameters :math:`\theta` (a flat
``dict[str, Tensor]``, the weights of small networks)::

    theta = lopt.init(generator)                           # meta-parameters
    state = lopt.init_state(params)                        # optimizer state (tensors only)
    updates, state = lopt.update(theta, grads, params, state, inputs)
    params = {k: params[k] + updates[k] for k in params}   # updates are *added*

``update`` never modifies its arguments, is differentiable with respect to ``theta`` (what
truncated back-propagation needs) and is :func:`torch.func.vmap`-able (what the vectorized
estimators need).  ``lopt.opt_fn(theta)`` turns it into a ``torch.optim`` optimizer for a
user's model.

**Per-parameter features.**  For every parameter tensor :math:`w` with gradient :math:`g`
the state keeps momenta :math:`m_i` and second moments :math:`v_i` at the decays
:math:`\beta_i` (default 0.5, 0.9, 0.99, 0.999), from zero:

.. math::

    m_i \leftarrow \beta_i m_i + (1-\beta_i) g, \quad
    v_i \leftarrow \beta_i v_i + (1-\beta_i) g^2,

used as they are (:math:`\hat m_i = m_i`, :math:`\hat v_i = v_i`, as in
learned_optimization) or, with ``bias_correction=True``, divided by :math:`1-\beta_i^{s+1}`
as in Adam (:math:`s` = updates already taken).  Without the correction the ratios below
start small for the slow decays, an implicit warm-up; with it they are all :math:`\pm 1`
at the first update, which looks like a perfectly consistent gradient (meta-training at
CPU scale then learned a destructive first step).  Each element gets the features
:math:`g, w, \hat m_i, \sqrt{\hat v_i}` -- each divided by its root-mean-square over the
tensor, so they do not depend on the scale of the gradient or the weights -- and the
Adam-like ratios :math:`\hat m_i / (\sqrt{\hat v_i} + \epsilon)` (already scale-free and in
:math:`[-1, 1]` up to bias, so left as they are).  Global features: the training progress
:math:`s/T` and :math:`\tanh(s/\tau - 1)` for the timescales :math:`\tau` in
:data:`TIMESCALES` (learned_optimization's step embedding).

**Output.**  The per-parameter MLP (two hidden ReLU layers) outputs a direction :math:`d`
and a log-magnitude :math:`m` for every element; the update is the stable parametrisation
of Metz et al. (2020)

.. math:: \Delta w = a\, d\, \exp(b\, m)

with small scales :math:`a` (``scale_dir``) and :math:`b` (``scale_mag``): a meta-step
changes the inner step size by a small factor, and the all-zero output layer of
:meth:`~AbstractLearnedOptimizer.init` makes the initial optimizer the zero update.

Cost per update: :math:`O(N F)` for :math:`N` parameters and :math:`F` features, plus the
MLP's :math:`O(N (F h + h^2))`; the global (and per-tensor) inputs enter the first layer as
a bias computed once, not as :math:`N` copies.

References:
    Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein (ICML 2019), Understanding and
    correcting pathologies in the training of learned optimizers.
    Metz, Maheswaranathan, Freeman, Poole, Sohl-Dickstein (2020), Tasks, stability,
    architecture, and compute: training more effective learned optimizers, and using them
    to train themselves (arXiv 2009.11243); ``learned_optimization``'s
    ``mlp_lopt.py`` and ``rnn_mlp_lopt.py``.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, final

import torch

from .._errors import HypergradientError
from ..diffopt import safe_sqrt

Theta = dict[str, torch.Tensor]
Params = dict[str, torch.Tensor]
OptState = dict[str, Any]

#: Timescales :math:`\tau` of the step embedding :math:`\tanh(s/\tau - 1)`.
TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
r"""Timescales :math:`\tau` of the step embedding :math:`\tanh(s/\tau - 1)` (:math:`s`: updates
already taken), global features of every update of the MLP and hierarchical optimizers.

Examples:
    >>> from hypergradient.learned import TIMESCALES, MLPLearnedOptimizer
    >>> TIMESCALES
    (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
    >>> MLPLearnedOptimizer().num_global_features  # the progress s/T, then one per timescale
    8
"""
#: Added to the mean squares of the feature normalisation: features of tensors whose
#: gradient rms is well above 1e-6 are invariant to the gradient's scale; below, the
#: normalisation (and its derivative, which truncated backprop follows) stays bounded.
_EPS_NORM = 1e-12
#: Added to the rms in the Adam-like ratios m / (sqrt(v) + eps), as in Adam.
_EPS_RATIO = 1e-8
#: Loss features are clipped to this range (log-loss differences).
_LOSS_CLIP = 5.0


class StepInputs(NamedTuple):
    """What an update knows beyond gradients and weights (0-d tensors).

    Attributes:
        progress: training progress :math:`s / T` in ``[0, 1]`` (:math:`T` = the planned
            number of updates); ``0`` if the architecture was built with
            ``use_progress=False`` (then it is ignored).
        train_loss: the training (mini-batch) loss at the current weights, or NaN when
            unknown.  Read only by architectures with ``uses_losses = True``.
        valid_loss: a validation loss at the current weights, or NaN when unknown.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import StepInputs
        >>> inputs = StepInputs(torch.tensor(0.5), torch.tensor(2.0), torch.tensor(float("nan")))
        >>> StepInputs._fields
        ('progress', 'train_loss', 'valid_loss')
        >>> inputs.progress.item(), bool(inputs.valid_loss.isnan())  # NaN: no validation loss
        (0.5, True)
    """

    progress: torch.Tensor
    train_loss: torch.Tensor
    valid_loss: torch.Tensor


def step_inputs(
    progress: float | torch.Tensor = 0.0,
    train_loss: float | torch.Tensor | None = None,
    valid_loss: float | torch.Tensor | None = None,
    *,
    like: torch.Tensor | None = None,
) -> StepInputs:
    """:class:`StepInputs` from numbers or tensors (``None`` loss: unknown, NaN).

    The losses are detached: they are observations for the optimizer, gradients do not flow
    through them.  ``like`` gives the dtype and device (default: the default dtype, CPU).

    Examples:
        >>> import torch
        >>> from hypergradient.learned import step_inputs
        >>> loss = torch.tensor(1.5, requires_grad=True)
        >>> inputs = step_inputs(0.25, train_loss=loss)
        >>> inputs.progress.item(), inputs.train_loss.requires_grad, bool(inputs.valid_loss.isnan())
        (0.25, False, True)
        >>> step_inputs(like=torch.zeros(2, dtype=torch.float64)).progress.dtype
        torch.float64
    """

    def as_tensor(x):
        if x is None:
            x = float("nan")
        if isinstance(x, torch.Tensor):
            x = x.detach().reshape(())
            return x if like is None else x.to(like)
        if like is None:
            return torch.tensor(float(x))
        return torch.tensor(float(x), dtype=like.dtype, device=like.device)

    return StepInputs(as_tensor(progress), as_tensor(train_loss), as_tensor(valid_loss))


# ----------------------------------------------------------------------------------------
# Small pure building blocks (every one vmap-able).


def second_moment_normalize(x: torch.Tensor) -> torch.Tensor:
    r"""Columns of ``x`` (``(N, F)``) divided by their root mean square over the ``N`` rows:
    :math:`x_{:,f} / \sqrt{\mathrm{mean}(x_{:,f}^2) + 10^{-12}}`.

    Invariant (up to the :math:`10^{-12}`) to a positive rescaling of any column.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import second_moment_normalize
        >>> x = torch.tensor([[1.0, 10.0], [-3.0, 20.0], [2.0, -5.0]])
        >>> y = second_moment_normalize(x)
        >>> torch.allclose(y.square().mean(dim=0), torch.ones(2))  # unit rms per column
        True
        >>> torch.allclose(second_moment_normalize(x * torch.tensor([100.0, 0.1])), y)
        True
    """
    return x * torch.rsqrt(x.square().mean(dim=0, keepdim=True) + _EPS_NORM)


def step_embedding(step: torch.Tensor, progress: torch.Tensor, use_progress: bool) -> torch.Tensor:
    r"""Global features ``[progress?, tanh(step/tau - 1) for tau in TIMESCALES]``."""
    scales = torch.tensor(TIMESCALES, dtype=step.dtype, device=step.device)
    feats = torch.tanh(step / scales - 1.0)
    if use_progress:
        feats = torch.cat([progress.reshape(1).to(step), feats])
    return feats


def _output_update(
    direction: torch.Tensor, magnitude: torch.Tensor, scale_dir: float, scale_mag: float
) -> torch.Tensor:
    return scale_dir * direction * torch.exp(scale_mag * magnitude)


def _moments(
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    decays: torch.Tensor,
    step: torch.Tensor,
    bias_correction: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """New ``(m, v)`` (shape ``(k, *g.shape)``) and the versions the features use
    (bias-corrected or not)."""
    shape = (-1,) + (1,) * g.dim()
    b = decays.reshape(shape)
    m = b * m + (1 - b) * g
    v = b * v + (1 - b) * g.square()
    if not bias_correction:
        return m, v, m, v
    correction = 1 - b ** (step + 1)
    return m, v, m / correction, v / correction


@functools.lru_cache(maxsize=64)
def _segments(
    sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """For tensors of ``sizes`` elements laid end to end: the averaging matrix ``(n, N)``
    (row ``j`` holds ``1/size_j`` on tensor ``j``'s elements) and each element's tensor
    index ``(N,)``.  Per-tensor means of ``(N, F)`` rows are then one matrix product."""
    # cached constants must be ordinary tensors even when first built in inference mode
    with torch.inference_mode(False):
        seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        avg = torch.zeros(len(sizes), sum(sizes), dtype=torch.float64)
        avg[seg, torch.arange(sum(sizes))] = 1.0 / torch.tensor(sizes, dtype=torch.float64)[seg]
        return avg.to(dtype=dtype, device=device), seg.to(device)


class _Flat(NamedTuple):
    """Every tensor's elements end to end (``N`` in all): what both architectures share."""

    names: list[str]
    sizes: tuple[int, ...]
    avg: torch.Tensor  # (tensors, N) per-tensor averaging matrix
    seg: torch.Tensor  # (N,) tensor index of each element
    g: torch.Tensor  # (N,)
    w: torch.Tensor  # (N,)
    m: torch.Tensor  # (k, N) new momenta
    v: torch.Tensor  # (k, N) new second moments
    m_hat: torch.Tensor  # (k, N) the momenta the features use (bias-corrected or not)
    rms: torch.Tensor  # (k, N) sqrt of the second moments the features use
    features: torch.Tensor  # (N, 2 + 3k) per-element features


def _flat_features(
    decays_tuple: tuple[float, ...],
    bias_correction: bool,
    grads: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    step: torch.Tensor,
) -> _Flat:
    """Moments and per-element features of all tensors at once (a fixed number of tensor
    operations whatever the number of parameter tensors: what makes the vmapped inner
    training cheap).

    Features per element: ``g, w, m_hat_i, sqrt(v_hat_i)``, each divided by its root mean
    square over its own tensor, then the raw ratios ``m_hat_i / (sqrt(v_hat_i) + eps)``.
    """
    names = list(params)
    first = params[names[0]]
    k = len(decays_tuple)
    decays = torch.tensor(decays_tuple, dtype=first.dtype, device=first.device)
    sizes = tuple(params[n].numel() for n in names)
    avg, seg = _segments(sizes, first.dtype, first.device)
    g = torch.cat([grads[n].reshape(-1) for n in names])
    w = torch.cat([params[n].reshape(-1) for n in names])
    m = torch.cat([tensors[n]["m"].reshape(k, -1) for n in names], dim=1)
    v = torch.cat([tensors[n]["v"].reshape(k, -1) for n in names], dim=1)
    m, v, m_hat, v_hat = _moments(g, m, v, decays, step, bias_correction)
    rms = safe_sqrt(v_hat)  # sqrt's derivative at 0 (a dead unit's gradient) is inf
    scaled = torch.cat([g.unsqueeze(0), w.unsqueeze(0), m_hat, rms]).T
    # per-tensor second-moment normalisation: every column divided by its rms over the
    # elements of the same tensor
    mean_square = avg @ scaled.square()
    scaled = scaled * torch.rsqrt(mean_square + _EPS_NORM)[seg]
    ratio = (m_hat / (rms + _EPS_RATIO)).T
    return _Flat(names, sizes, avg, seg, g, w, m, v, m_hat, rms, torch.cat([scaled, ratio], dim=1))


def _unflatten_state(flat: _Flat, params: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """The new per-tensor ``m``, ``v`` in the state layout ``(k, *shape)``."""
    k = flat.m.shape[0]
    out = {}
    for n, m, v in zip(
        flat.names, flat.m.split(flat.sizes, dim=1), flat.v.split(flat.sizes, dim=1)
    ):
        shape = (k, *params[n].shape)
        out[n] = {"m": m.reshape(shape), "v": v.reshape(shape)}
    return out


def _split_updates(update: torch.Tensor, flat: _Flat, params) -> Params:
    return {n: u.reshape(params[n].shape) for n, u in zip(flat.names, update.split(flat.sizes))}


def _mlp_hidden(
    theta: Theta, x: torch.Tensor, first_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-parameter MLP on rows ``x``; ``first_bias`` (``(h,)``, or ``(N, h)``) holds
    the global (and per-tensor) inputs' contribution to the first layer.  Returns
    ``(outputs (N, 2), last hidden layer (N, h))``."""
    n_in = x.shape[1]
    h1 = torch.relu(x @ theta["mlp.w1"][:n_in] + first_bias)
    h2 = torch.relu(h1 @ theta["mlp.w2"] + theta["mlp.b2"])
    return h2 @ theta["mlp.w3"] + theta["mlp.b3"], h2


def _linear_init(
    fan_in: int, fan_out: int, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """LeCun-normal weights ``(fan_in, fan_out)``: unit-variance inputs keep unit variance."""
    w = torch.randn(fan_in, fan_out, generator=generator, dtype=dtype)
    return w / math.sqrt(fan_in)


# ----------------------------------------------------------------------------------------
# The interface.


class AbstractLearnedOptimizer(abc.ABC):
    r"""A learned update rule: meta-parameters ``theta`` and a pure :meth:`update`.

    Subclasses implement :meth:`init`, :meth:`init_tensor_state`,
    :meth:`init_global_state` and :meth:`update`; the state layout is
    ``{"global": {...}, "tensors": {name: {...}}}``, every leaf a tensor (so that states of
    many inner runs can be stacked for :func:`torch.func.vmap`), and per-tensor state
    depends on that tensor alone (so a ``torch.optim`` wrapper can create it lazily).

    Class attributes:
        uses_losses: whether :meth:`update` reads ``inputs.train_loss`` and
            ``inputs.valid_loss`` (an inner-training loop only computes a validation loss
            for optimizers that read it).

    Examples:
        >>> import torch
        >>> from hypergradient.learned import AbstractLearnedOptimizer, MLPLearnedOptimizer
        >>> lopt = MLPLearnedOptimizer(hidden=4)
        >>> isinstance(lopt, AbstractLearnedOptimizer)
        True
        >>> theta = lopt.init(torch.Generator().manual_seed(0))
        >>> sorted(theta) == sorted(lopt.theta_shapes())
        True
        >>> state = lopt.init_state({"w": torch.zeros(2, 3)})
        >>> sorted(state), sorted(state["tensors"]["w"]), tuple(state["tensors"]["w"]["m"].shape)
        (['global', 'tensors'], ['m', 'v'], (4, 2, 3))
    """

    uses_losses: ClassVar[bool] = False
    scale_dir: float
    scale_mag: float
    use_progress: bool

    @abc.abstractmethod
    def init(self, generator: torch.Generator, *, dtype: torch.dtype | None = None) -> Theta:
        """Fresh meta-parameters ``theta`` (a flat ``dict[str, Tensor]``) drawn from
        ``generator``; ``dtype`` defaults to torch's default dtype."""

    @abc.abstractmethod
    def init_tensor_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of one parameter tensor before its first update (tensors only)."""

    @abc.abstractmethod
    def init_global_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state shared by all tensors (step counter, loss statistics), on ``like``'s
        dtype and device."""

    def init_state(self, params: Mapping[str, torch.Tensor]) -> OptState:
        """The whole state for ``params`` (a dict of tensors): see the class docstring."""
        where = f"{type(self).__name__}.init_state(params)"
        _check_params(where, params)
        first = next(iter(params.values()))
        return {
            "global": self.init_global_state(first),
            "tensors": {k: self.init_tensor_state(p) for k, p in params.items()},
        }

    @abc.abstractmethod
    def update(
        self,
        theta: Theta,
        grads: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor],
        state: OptState,
        inputs: StepInputs,
    ) -> tuple[Params, OptState]:
        r"""One step of the learned optimizer (pure).

        Args:
            theta: the meta-parameters (from :meth:`init`).
            grads: gradient per parameter name (same keys and shapes as ``params``).
            params: the current parameters :math:`w`.
            state: the optimizer state from :meth:`init_state` or the previous update.
            inputs: progress and loss observations (:class:`StepInputs`).

        Returns:
            ``(updates, new_state)``: ``updates`` (keys of ``params``) are *added* to the
            parameters, :math:`w \leftarrow w + \Delta w`.
        """

    def opt_fn(self, theta: Mapping[str, torch.Tensor]) -> Callable[..., LearnedOptim]:
        """A ``torch.optim`` constructor applying this optimizer with ``theta``.

        ``lopt.opt_fn(theta)(model.parameters(), num_steps=T)`` is a
        :class:`LearnedOptim`: use it like any ``torch.optim`` optimizer (param groups,
        ``state_dict``, ``lr`` as a multiplier of the learned update).
        """
        _check_theta(f"{type(self).__name__}.opt_fn(theta)", theta, self)
        frozen = {k: v.detach().clone() for k, v in theta.items()}

        def make(params: Iterable, num_steps: int | None = None, lr: float = 1.0) -> LearnedOptim:
            return LearnedOptim(params, self, frozen, num_steps=num_steps, lr=lr)

        return make

    @abc.abstractmethod
    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every entry of ``theta`` (what :meth:`init` returns)."""


def _check_params(where: str, params: object) -> None:
    if not isinstance(params, Mapping) or not params:
        raise HypergradientError(
            f"{where}: `params` must be a non-empty dict mapping names to tensors, got "
            f"{type(params).__name__}. Use `dict(model.named_parameters())`."
        )
    for k, p in params.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise HypergradientError(
                f"{where}: params[{k!r}] must be a floating tensor, got "
                f"{type(p).__name__ if not isinstance(p, torch.Tensor) else p.dtype}."
            )


def _check_theta(where: str, theta: object, lopt: AbstractLearnedOptimizer) -> None:
    shapes = lopt.theta_shapes()
    if not isinstance(theta, Mapping):
        raise HypergradientError(
            f"{where}: `theta` must be the dict returned by {type(lopt).__name__}.init(...), "
            f"got {type(theta).__name__}."
        )
    missing = sorted(set(shapes) - set(theta))
    extra = sorted(set(theta) - set(shapes))
    if missing or extra:
        raise HypergradientError(
            f"{where}: `theta` does not fit this {type(lopt).__name__}: missing keys {missing}, "
            f"unexpected keys {extra}. Was it made by another architecture or configuration?"
        )
    for k, shape in shapes.items():
        if tuple(theta[k].shape) != shape:
            raise HypergradientError(
                f"{where}: theta[{k!r}] has shape {tuple(theta[k].shape)}, this "
                f"{type(lopt).__name__} expects {shape}. Was it made with other sizes "
                f"(hidden, decays, ...)?"
            )


def _check_scale(where: str, name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise HypergradientError(
            f"{where}: {name} must be a finite float > 0, got {value!r}. The stable output "
            f"parametrisation needs small positive scales (e.g. 1e-3 to 1e-1)."
        )


def _check_decays(where: str, decays: object) -> tuple[float, ...]:
    if (
        not isinstance(decays, (tuple, list))
        or not decays
        or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in decays
        )
    ):
        raise HypergradientError(
            f"{where}: decays must be a non-empty tuple of floats in [0, 1), got {decays!r} "
            f"(e.g. (0.5, 0.9, 0.99, 0.999))."
        )
    return tuple(float(b) for b in decays)


def _check_size(where: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HypergradientError(f"{where}: {name} must be an int >= 1, got {value!r}.")


# ----------------------------------------------------------------------------------------
# Per-parameter MLP (Metz et al. 2019, 2020's MLPLOpt).


@final
@dataclass(frozen=True, eq=False)
class MLPLearnedOptimizer(AbstractLearnedOptimizer):
    r"""A per-parameter MLP over momentum and second-moment features (Metz et al.).

    Every element of every parameter tensor goes through the same MLP; its inputs are the
    features of the module docstring (:math:`2 + 3k` per element for :math:`k` decays,
    plus :math:`1 + 7` global step features) and it outputs a direction and a log-magnitude,
    :math:`\Delta w = a\,d\,\exp(b\,m)`.

    Args:
        hidden: width of the MLP's two hidden layers.
        decays: the :math:`\beta_i` of the momenta and second moments.
        scale_dir: :math:`a`, the step multiplier.
        scale_mag: :math:`b`, the magnitude rate.
        use_progress: feed the training progress :math:`s/T` (then ``torch.optim`` use
            needs ``num_steps``).
        bias_correction: Adam's bias correction of the moments in the features.

    State per tensor: ``m``, ``v`` (each ``(k, *shape)``); global: ``step``.
    Cost: :math:`4k + O(F h + h^2)` flops per parameter and update.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import MLPLearnedOptimizer, step_inputs
        >>> lopt = MLPLearnedOptimizer()
        >>> theta = lopt.init(torch.Generator().manual_seed(0))
        >>> params = {"w": torch.ones(3)}
        >>> state = lopt.init_state(params)
        >>> updates, state = lopt.update(theta, {"w": torch.ones(3)}, params, state,
        ...                              step_inputs(progress=0.0))
        >>> updates["w"].abs().max().item()  # the output layer starts at zero
        0.0
    """

    hidden: int = 32
    decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    scale_dir: float = 1e-2
    scale_mag: float = 1e-2
    use_progress: bool = True
    bias_correction: bool = False

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        _check_size(where, "hidden", self.hidden)
        object.__setattr__(self, "decays", _check_decays(where, self.decays))
        _check_scale(where, "scale_dir", self.scale_dir)
        _check_scale(where, "scale_mag", self.scale_mag)
        for flag in ("use_progress", "bias_correction"):
            if not isinstance(getattr(self, flag), bool):
                raise HypergradientError(
                    f"{where}: {flag} must be True or False, got {getattr(self, flag)!r}."
                )

    @property
    def num_element_features(self) -> int:
        return 2 + 3 * len(self.decays)

    @property
    def num_global_features(self) -> int:
        return len(TIMESCALES) + int(self.use_progress)

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        f, h = self.num_element_features + self.num_global_features, self.hidden
        return _mlp_shapes(f, h)

    def init(self, generator: torch.Generator, *, dtype: torch.dtype | None = None) -> Theta:
        return _mlp_init(self.theta_shapes(), generator, dtype)

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
        glob = step_embedding(step, inputs.progress, self.use_progress)
        bias1 = theta["mlp.b1"] + glob @ theta["mlp.w1"][self.num_element_features :]
        out, _ = _mlp_hidden(theta, flat.features, bias1)  # one MLP call for all elements
        update = _output_update(out[:, 0], out[:, 1], self.scale_dir, self.scale_mag)
        new_state = {"global": {"step": step + 1}, "tensors": _unflatten_state(flat, params)}
        return _split_updates(update, flat, params), new_state


def _mlp_shapes(n_in: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {
        "mlp.w1": (n_in, hidden),
        "mlp.b1": (hidden,),
        "mlp.w2": (hidden, hidden),
        "mlp.b2": (hidden,),
        "mlp.w3": (hidden, 2),
        "mlp.b3": (2,),
    }


def _mlp_init(
    shapes: Mapping[str, tuple[int, ...]], generator: torch.Generator, dtype: torch.dtype | None
) -> Theta:
    """LeCun-normal weights, zero biases, and a zero output layer (``w3``, ``b3``): the
    initial optimizer is the zero update, Metz et al.'s stable start."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    theta = {}
    for k, shape in shapes.items():
        if k in ("mlp.w3", "mlp.b3") or len(shape) == 1:
            theta[k] = torch.zeros(shape, dtype=dtype)
        else:
            theta[k] = _linear_init(shape[0], shape[1], generator, dtype)
    return theta


# ----------------------------------------------------------------------------------------
# Hierarchical: per-tensor LSTM/GRU + per-parameter MLP (Metz et al. 2020, "hyperv2").

_NDIM_BUCKETS = 3  # vector (<= 1-d), matrix (2-d), convolution kernel (>= 3-d)
_NUM_LOSS_FEATURES = 9


def loss_features(loss: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Features of one loss observation and the updated statistics.

    With :math:`\ell = \log \max(\text{loss}, 10^{-8})` and the statistics
    ``stats = [first, min, ema, seen]`` (the first log-loss seen, the running minimum, an
    exponential average with decay 0.9, and whether any loss was seen), the features are
    ``[l - first, l - min, l - ema, known]``, the differences clipped to
    :math:`\pm 5`.  An unknown (NaN) loss gives zero features and leaves the statistics
    unchanged.  Returns ``(features (4,), new_stats (4,))``.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import loss_features
        >>> feats, stats = loss_features(torch.tensor(1.0), torch.zeros(4))  # first loss: log 1 = 0
        >>> feats.tolist()
        [0.0, 0.0, 0.0, 1.0]
        >>> feats, stats = loss_features(torch.tensor(-1.0).exp(), stats)  # log loss -1
        >>> torch.allclose(feats, torch.tensor([-1.0, 0.0, -1.0, 1.0]))  # vs first, min, ema
        True
        >>> feats, new = loss_features(torch.tensor(float("nan")), stats)  # unknown loss
        >>> feats.abs().sum().item(), torch.equal(new, stats)
        (0.0, True)
    """
    known = torch.isfinite(loss)
    log_loss = torch.log(torch.clamp(torch.where(known, loss, 1.0), min=1e-8))
    seen = stats[3] > 0
    first = torch.where(seen, stats[0], log_loss)
    low = torch.where(seen, torch.minimum(stats[1], log_loss), log_loss)
    ema = torch.where(seen, 0.9 * stats[2] + 0.1 * log_loss, log_loss)
    diffs = torch.stack([log_loss - first, log_loss - low, log_loss - stats[2]])
    diffs = torch.where(seen, diffs, torch.zeros_like(diffs)).clamp(-_LOSS_CLIP, _LOSS_CLIP)
    feats = torch.cat([diffs * known, known.to(diffs).reshape(1)])
    new = torch.stack([first, low, ema, torch.ones_like(first)])
    return feats, torch.where(known, new, stats)


def _tensor_statistics(flat: _Flat, ndims: list[int]) -> torch.Tensor:
    r"""Per-tensor summary ``(tensors, 5 + 2k + 2)``: log-rms of :math:`g` and :math:`w`
    (divided by 10), the log of each momentum's rms relative to :math:`g`'s (scale-free),
    the mean :math:`|\hat m_i|/\sqrt{\hat v_i}` (gradient consistency, scale-free),
    log(numel)/10 and the number of dimensions as a one-hot (vector, matrix, kernel)."""
    k = flat.m_hat.shape[0]
    eps = 1e-12
    consistency = flat.m_hat.abs() / (flat.rms + _EPS_RATIO)
    columns = torch.cat(
        [
            flat.g.square().unsqueeze(0),
            flat.w.square().unsqueeze(0),
            flat.m_hat.square(),
            consistency,
        ]
    ).T
    means = flat.avg @ columns  # (tensors, 2 + 2k)
    log_rms = 0.5 * torch.log(means[:, : 2 + k] + eps)
    log_g = log_rms[:, :1]
    like = {"dtype": flat.g.dtype, "device": flat.g.device}
    size = torch.tensor([[math.log(n) / 10] for n in flat.sizes], **like)
    buckets = [min(max(d, 1), _NDIM_BUCKETS) - 1 for d in ndims]
    onehot = torch.tensor([[float(i == b) for i in range(_NDIM_BUCKETS)] for b in buckets], **like)
    return torch.cat(
        [
            log_rms[:, :2].clamp(-30, 30) / 10,
            (log_rms[:, 2:] - log_g).clamp(-_LOSS_CLIP, _LOSS_CLIP),
            means[:, 2 + k :],
            size,
            onehot,
        ],
        dim=1,
    )


@final
@dataclass(frozen=True, eq=False)
class HierarchicalLearnedOptimizer(AbstractLearnedOptimizer):
    r"""Metz et al. (2020)'s hierarchical optimizer: a per-tensor LSTM (or GRU) conditions
    a per-parameter MLP.

    At every update, for each parameter tensor :math:`j`:

    1. the per-element features of :class:`MLPLearnedOptimizer` are computed;
    2. a recurrent cell (shared weights, its own state per tensor) reads the tensor's
       statistics (gradient and weight log-rms, momentum/gradient ratios, gradient
       consistency, size, rank), the training and validation loss features
       (:func:`loss_features`, and their gap), the step features, the *message* of the
       tensor's MLP at the previous update (the mean of its last hidden layer over the
       elements) and the mean hidden state of all tensors' cells (communication across
       tensors);
    3. the cell's output gives a conditioning vector :math:`c_j` (``cond`` entries, extra
       inputs of the MLP, shared by all elements of the tensor) and a per-tensor
       log-magnitude :math:`\mu_j` added to the MLP's;
    4. :math:`\Delta w = a\, d\, \exp(b\, (m + \mu_j))`.

    Args:
        hidden: width of the MLP's two hidden layers.
        rnn_hidden: state size of the per-tensor cell.
        cond: size of the conditioning vector.
        cell: ``"lstm"`` or ``"gru"``.
        decays, scale_dir, scale_mag, use_progress, bias_correction: as in
            :class:`MLPLearnedOptimizer`.

    State per tensor: ``m``, ``v``, the cell's ``h`` (and ``c`` for the LSTM), the MLP
    ``message``; global: ``step``, ``train_stats``, ``valid_stats``
    (:func:`loss_features`).  Cost: the MLP's, plus one cell step per tensor
    (:math:`O(\text{rnn\_hidden} \cdot (\text{inputs} + \text{rnn\_hidden}))`).

    Examples:
        >>> import torch
        >>> from hypergradient.learned import HierarchicalLearnedOptimizer, step_inputs
        >>> lopt = HierarchicalLearnedOptimizer(hidden=4, rnn_hidden=4, cond=2)
        >>> theta = lopt.init(torch.Generator().manual_seed(0))
        >>> params = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
        >>> state = lopt.init_state(params)
        >>> grads = {"w": torch.ones(2, 3), "b": torch.ones(3)}
        >>> updates, state = lopt.update(theta, grads, params, state, step_inputs(0.0, 2.3))
        >>> updates["w"].shape, updates["w"].abs().max().item()  # starts as the zero update
        (torch.Size([2, 3]), 0.0)
        >>> sorted(state["tensors"]["w"])  # momenta, the LSTM's (h, c), the MLP's message
        ['c', 'h', 'm', 'message', 'v']
    """

    uses_losses: ClassVar[bool] = True

    hidden: int = 32
    rnn_hidden: int = 16
    cond: int = 8
    cell: str = "lstm"
    decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    scale_dir: float = 1e-2
    scale_mag: float = 1e-2
    use_progress: bool = True
    bias_correction: bool = False

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        for name in ("hidden", "rnn_hidden", "cond"):
            _check_size(where, name, getattr(self, name))
        if self.cell not in ("lstm", "gru"):
            raise HypergradientError(f"{where}: cell must be 'lstm' or 'gru', got {self.cell!r}.")
        object.__setattr__(self, "decays", _check_decays(where, self.decays))
        _check_scale(where, "scale_dir", self.scale_dir)
        _check_scale(where, "scale_mag", self.scale_mag)
        for flag in ("use_progress", "bias_correction"):
            if not isinstance(getattr(self, flag), bool):
                raise HypergradientError(
                    f"{where}: {flag} must be True or False, got {getattr(self, flag)!r}."
                )

    @property
    def num_element_features(self) -> int:
        return 2 + 3 * len(self.decays)

    @property
    def num_global_features(self) -> int:
        return len(TIMESCALES) + int(self.use_progress)

    @property
    def num_rnn_inputs(self) -> int:
        k = len(self.decays)
        stats = 4 + 2 * k - 1 + _NDIM_BUCKETS  # log g, log w, k ratios, k consistencies, size
        return stats + _NUM_LOSS_FEATURES + self.num_global_features + self.hidden + self.rnn_hidden

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        n_mlp = self.num_element_features + self.num_global_features + self.cond
        gates = (4 if self.cell == "lstm" else 3) * self.rnn_hidden
        return {
            **_mlp_shapes(n_mlp, self.hidden),
            "rnn.w_in": (self.num_rnn_inputs, gates),
            "rnn.w_h": (self.rnn_hidden, gates),
            "rnn.b": (gates,),
            "rnn.w_out": (self.rnn_hidden, self.cond + 1),
            "rnn.b_out": (self.cond + 1,),
        }

    def init(self, generator: torch.Generator, *, dtype: torch.dtype | None = None) -> Theta:
        shapes = self.theta_shapes()
        theta = _mlp_init(
            {k: v for k, v in shapes.items() if k.startswith("mlp.")}, generator, dtype
        )
        dtype = torch.get_default_dtype() if dtype is None else dtype
        theta["rnn.w_in"] = _linear_init(*shapes["rnn.w_in"], generator, dtype)
        theta["rnn.w_h"] = _linear_init(*shapes["rnn.w_h"], generator, dtype)
        bias = torch.zeros(shapes["rnn.b"], dtype=dtype)
        if self.cell == "lstm":  # forget-gate bias 1: remember by default
            bias[self.rnn_hidden : 2 * self.rnn_hidden] = 1.0
        theta["rnn.b"] = bias
        theta["rnn.w_out"] = _linear_init(*shapes["rnn.w_out"], generator, dtype)
        # the per-tensor log-magnitude starts at zero like the MLP's outputs
        theta["rnn.w_out"][:, -1] = 0.0
        theta["rnn.b_out"] = torch.zeros(shapes["rnn.b_out"], dtype=dtype)
        return theta

    def init_tensor_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        kw = {"dtype": param.dtype, "device": param.device}
        z = torch.zeros((len(self.decays), *param.shape), **kw)
        state = {
            "m": z,
            "v": z.clone(),
            "h": torch.zeros(self.rnn_hidden, **kw),
            "message": torch.zeros(self.hidden, **kw),
        }
        if self.cell == "lstm":
            state["c"] = torch.zeros(self.rnn_hidden, **kw)
        return state

    def init_global_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        kw = {"dtype": like.dtype, "device": like.device}
        return {
            "step": torch.zeros((), **kw),
            "train_stats": torch.zeros(4, **kw),
            "valid_stats": torch.zeros(4, **kw),
        }

    def _cell(self, theta: Theta, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
        """One step of the LSTM/GRU on rows (one per tensor): ``(h, c)``."""
        n = self.rnn_hidden
        if self.cell == "lstm":
            gates = x @ theta["rnn.w_in"] + h @ theta["rnn.w_h"] + theta["rnn.b"]
            i, f, g, o = gates.split(n, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        xi = x @ theta["rnn.w_in"] + theta["rnn.b"]
        hh = h @ theta["rnn.w_h"]
        r = torch.sigmoid(xi[:, :n] + hh[:, :n])
        z = torch.sigmoid(xi[:, n : 2 * n] + hh[:, n : 2 * n])
        cand = torch.tanh(xi[:, 2 * n :] + r * hh[:, 2 * n :])
        return (1 - z) * cand + z * h, None

    def update(self, theta, grads, params, state, inputs):
        glob_state = state["global"]
        step = glob_state["step"]
        first = next(iter(params.values()))
        glob = step_embedding(step, inputs.progress, self.use_progress)
        train_f, train_stats = loss_features(inputs.train_loss.to(first), glob_state["train_stats"])
        valid_f, valid_stats = loss_features(inputs.valid_loss.to(first), glob_state["valid_stats"])
        # generalisation gap (log valid - log train) when both are known
        both = train_f[3] * valid_f[3]
        gap_value = torch.log(
            torch.clamp(torch.nan_to_num(inputs.valid_loss.to(first), nan=1.0), 1e-8)
        )
        gap_value = gap_value - torch.log(
            torch.clamp(torch.nan_to_num(inputs.train_loss.to(first), nan=1.0), 1e-8)
        )
        gap = (gap_value.clamp(-_LOSS_CLIP, _LOSS_CLIP) * both).reshape(1)
        shared = torch.cat([train_f, valid_f, gap, glob])

        flat = _flat_features(
            self.decays, self.bias_correction, grads, params, state["tensors"], step
        )
        names = flat.names
        stats = _tensor_statistics(flat, [params[k].dim() for k in names])
        per_tensor = [state["tensors"][k] for k in names]
        h = torch.stack([s["h"] for s in per_tensor])
        c = torch.stack([s["c"] for s in per_tensor]) if self.cell == "lstm" else None
        message = torch.stack([s["message"] for s in per_tensor])
        across = h.mean(dim=0, keepdim=True).expand(len(names), -1)
        x = torch.cat([stats, shared.expand(len(names), -1), message, across], dim=1)
        h, c = self._cell(theta, x, h, c)
        out_t = h @ theta["rnn.w_out"] + theta["rnn.b_out"]
        cond, tensor_mag = out_t[:, : self.cond], out_t[:, self.cond]

        n_elem, n_glob = self.num_element_features, self.num_global_features
        w1 = theta["mlp.w1"]
        bias_glob = theta["mlp.b1"] + glob @ w1[n_elem : n_elem + n_glob]
        bias_tensor = bias_glob + cond @ w1[n_elem + n_glob :]  # (tensors, hidden)
        # one MLP call for all elements; each element's first-layer bias is its tensor's
        out, h2 = _mlp_hidden(theta, flat.features, bias_tensor[flat.seg])
        mag = out[:, 1] + tensor_mag[flat.seg]
        update = _output_update(out[:, 0], mag, self.scale_dir, self.scale_mag)
        messages = flat.avg @ h2  # (tensors, hidden): each tensor's mean last hidden layer
        tensors = _unflatten_state(flat, params)
        for j, k in enumerate(names):
            tensors[k]["h"] = h[j]
            tensors[k]["message"] = messages[j]
            if c is not None:
                tensors[k]["c"] = c[j]
        new_global = {"step": step + 1, "train_stats": train_stats, "valid_stats": valid_stats}
        return _split_updates(update, flat, params), {"global": new_global, "tensors": tensors}


# ----------------------------------------------------------------------------------------
# torch.optim wrapper.


class LearnedOptim(torch.optim.Optimizer):
    r"""A learned optimizer with fixed ``theta`` as a ``torch.optim.Optimizer``.

    ``step()`` applies :meth:`AbstractLearnedOptimizer.update` to every parameter with a
    gradient, exactly as the functional update would (one call over all of them: the
    hierarchical optimizer's cross-tensor communication sees every tensor), then
    :math:`w \leftarrow w + \mathrm{lr}\,\Delta w` per param group.

    Args:
        params: parameters or param groups.
        learned_optimizer: the architecture.
        theta: its meta-parameters (copied, never trained here).
        num_steps: the planned number of ``step()`` calls :math:`T` (the progress feature
            :math:`s/T`, clipped to 1); required when the architecture uses progress.
        lr: a multiplier of the learned update (per group; ``1.0`` = as meta-trained);
            ``torch.optim.lr_scheduler`` schedules act on it.

    ``step(closure=None, *, loss=None, valid_loss=None)``: the training loss is the
    closure's result or ``loss``; architectures with ``uses_losses`` read it and
    ``valid_loss``.  The state (``state_dict``) holds per-parameter tensors and, under the
    key ``"global"``, the step counter and loss statistics.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import LearnedOptim, LinearLearnedOptimizer
        >>> lopt = LinearLearnedOptimizer()
        >>> theta = {"w": torch.zeros(4, 2), "b": torch.zeros(2)}
        >>> theta["w"][0, 0] = -1.0  # update -0.01 * g / rms(g): sign-like descent
        >>> x = torch.tensor([1.0, -1.0], requires_grad=True)
        >>> opt = lopt.opt_fn(theta)([x])  # the same as LearnedOptim([x], lopt, theta)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     x.square().sum().backward()
        ...     _ = opt.step()
        >>> isinstance(opt, LearnedOptim), torch.allclose(x.detach(), torch.tensor([0.97, -0.97]))
        (True, True)
    """

    def __init__(
        self,
        params: Iterable,
        learned_optimizer: AbstractLearnedOptimizer,
        theta: Mapping[str, torch.Tensor],
        *,
        num_steps: int | None = None,
        lr: float = 1.0,
    ):
        where = "LearnedOptim(...)"
        if not isinstance(learned_optimizer, AbstractLearnedOptimizer):
            raise HypergradientError(
                f"{where}: learned_optimizer must be an AbstractLearnedOptimizer, got "
                f"{type(learned_optimizer).__name__}."
            )
        _check_theta(where, theta, learned_optimizer)
        if learned_optimizer.use_progress and num_steps is None:
            raise HypergradientError(
                f"{where}: this {type(learned_optimizer).__name__} reads the training progress "
                f"step/num_steps; pass num_steps=<planned number of step() calls>, or build "
                f"it with use_progress=False."
            )
        if num_steps is not None and (
            not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1
        ):
            raise HypergradientError(f"{where}: num_steps must be an int >= 1, got {num_steps!r}.")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
            raise HypergradientError(f"{where}: lr (update multiplier) must be >= 0, got {lr!r}.")
        super().__init__(params, {"lr": float(lr)})
        self.learned_optimizer = learned_optimizer
        self.theta = {k: v.detach().clone() for k, v in theta.items()}
        self.num_steps = num_steps

    def _global_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        if "global" not in self.state:
            self.state["global"] = self.learned_optimizer.init_global_state(like)
        return self.state["global"]

    @torch.no_grad()
    def step(self, closure=None, *, loss=None, valid_loss=None):
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
            loss = closure_loss if loss is None else loss
        active: list[tuple[str, torch.Tensor, dict]] = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise HypergradientError(
                            "LearnedOptim.step(): sparse gradients are not supported."
                        )
                    active.append((f"{gi}.{pi}", p, group))
        if not active:
            return loss
        like = active[0][1]
        lopt = self.learned_optimizer
        glob = self._global_state(like)
        tensors = {}
        for name, p, _ in active:
            if not self.state[p]:
                self.state[p] = lopt.init_tensor_state(p)
            tensors[name] = self.state[p]
        if self.num_steps is None:
            progress = 0.0
        else:
            progress = torch.clamp(glob["step"] / self.num_steps, max=1.0)
        inputs = step_inputs(progress, loss, valid_loss, like=like)
        theta = {k: v.to(like) for k, v in self.theta.items()}
        params = {name: p for name, p, _ in active}
        grads = {name: p.grad for name, p, _ in active}
        updates, new = lopt.update(
            theta, grads, params, {"global": glob, "tensors": tensors}, inputs
        )
        # new dicts, never mutated ones: a state_dict() taken earlier stays a snapshot
        self.state["global"] = new["global"]
        for name, p, group in active:
            self.state[p] = dict(new["tensors"][name])
            p.add_(updates[name], alpha=group["lr"])
        return loss


def describe(lopt: AbstractLearnedOptimizer) -> dict[str, Any]:
    """A JSON-able description of an architecture (class and fields), for checkpoints."""
    from dataclasses import asdict

    return {"class": type(lopt).__name__, **asdict(lopt)}


ARCHITECTURES: dict[str, type[AbstractLearnedOptimizer]] = {
    "mlp": MLPLearnedOptimizer,
    "hierarchical": HierarchicalLearnedOptimizer,
}
"""The architectures by name (what a learned-optimizer recipe's ``architecture`` names):
``"mlp"`` (:class:`MLPLearnedOptimizer`), ``"hierarchical"``
(:class:`HierarchicalLearnedOptimizer`).

Examples:
    >>> from hypergradient.learned import ARCHITECTURES
    >>> sorted(ARCHITECTURES)
    ['hierarchical', 'mlp']
    >>> lopt = ARCHITECTURES["hierarchical"](hidden=8, cell="gru")
    >>> type(lopt).__name__, lopt.cell
    ('HierarchicalLearnedOptimizer', 'gru')
"""


def num_meta_parameters(lopt: AbstractLearnedOptimizer) -> int:
    """Entries of ``theta``.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import LinearLearnedOptimizer, MLPLearnedOptimizer
        >>> from hypergradient.learned import num_meta_parameters
        >>> num_meta_parameters(LinearLearnedOptimizer())
        10
        >>> lopt = MLPLearnedOptimizer(hidden=4)
        >>> theta = lopt.init(torch.Generator().manual_seed(0))
        >>> num_meta_parameters(lopt), sum(v.numel() for v in theta.values())
        (122, 122)
    """
    return sum(math.prod(s) for s in lopt.theta_shapes().values())
