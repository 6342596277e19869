r"""Differentiable functional versions of ``torch.optim`` SGD, Adam, RMSprop and Adagrad.

Each factory returns a :class:`~hypergradient.diffopt.GradientTransformation` whose updates
equal the parameter changes of the matching ``torch.optim`` class (single-tensor path,
``maximize=False``) step for step, up to floating-point rounding (within ``1e-12`` in
float64; the operations are done in the same order).  Differences, all deliberate:

* **Square roots are safe.**  Adam, RMSprop and Adagrad take :func:`safe_sqrt` of their
  second-moment estimate instead of :func:`torch.sqrt`: same value for positive inputs,
  ``0`` for inputs ``<= 0`` and a finite derivative (``0``) there.  A gradient entry that
  is exactly zero (a dead unit, an unused embedding row, a constant input feature) makes
  the second moment exactly ``0``; ``torch.sqrt`` would then turn the hypergradient of an
  unrolled run into NaN (``d sqrt(v)/dv = inf`` at ``v = 0``).  ``eps_root`` (default
  ``0``) is additionally added *inside* the square root, ``sqrt(v + eps_root)`` (for Adam
  to the bias-corrected ``v``), as in optax; ``eps_root > 0`` changes the forward values.
* **Nothing is detached.**  ``torch.optim.SGD`` copies the first gradient into the
  momentum buffer with ``grad.detach()``; here the buffer keeps its autograd history, so
  derivatives through the first step are exact.
* **Hyperparameters** may be floats, 0-d tensors (differentiable) or schedules
  ``count -> value``; a tensor or scheduled ``momentum`` / ``weight_decay`` always takes the
  corresponding code path (as ``torch.optim`` does for a non-zero value).

The step counter lives in the state as a 0-d int64 CPU tensor ``count`` (number of updates
already applied); schedules are called with ``int(count)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._errors import HypergradientError
from .._tree import Tree, tree_map, tree_zeros_like
from ._base import (
    NONNEGATIVE,
    UNIT_CLOSED,
    UNIT_OPEN,
    GradientTransformation,
    Grads,
    HParam,
    Params,
    Updates,
    check_hparam,
    check_like,
    check_state,
    is_zero,
    map_optional,
    new_count,
    resolve_hparam,
    safe_sqrt,
)

__all__ = [
    "AdagradState",
    "AdamState",
    "RMSPropState",
    "SGDState",
    "adagrad",
    "adam",
    "rmsprop",
    "sgd",
]


def _check_inputs(where: str, grads: object, params: object, like: Tree | None, need_params: bool):
    """Structure of ``grads`` (and ``params`` when needed) against the state's buffers."""
    if like is not None:
        check_like(where, "grads", grads, like, "the parameters this state was built for")
    if params is not None:
        check_like(where, "params", params, grads, "grads")
    elif need_params:
        raise HypergradientError(
            f"{where}: `params` is required when weight_decay is used, got None. Call "
            f"`update(grads, state, params)`."
        )
    elif like is None:
        check_like(where, "grads", grads, grads, "grads")


def _peek(value: HParam) -> HParam:
    """The current value of a tensor hyperparameter as a float (others unchanged)."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else value


def _add_weight_decay(grads: Tree, params: Tree | None, wd: float | torch.Tensor) -> Tree:
    # torch: grad = grad.add(param, alpha=weight_decay)
    return tree_map(lambda g, p: g + wd * p, grads, params)


def _lerp(start: Tree, end: Tree, weight: float | torch.Tensor) -> Tree:
    # Same kernel (and rounding) as torch.optim's `exp_avg.lerp_(grad, 1 - beta)`.
    return tree_map(lambda s, e: torch.lerp(s, e, weight), start, end)


def _ema_sq(avg: Tree, grads: Tree, decay: float | torch.Tensor) -> Tree:
    # torch: avg.mul_(decay).addcmul_(grad, grad, value=1 - decay)
    one_minus = 1 - decay
    return tree_map(lambda a, g: a * decay + one_minus * g * g, avg, grads)


def _root(x: torch.Tensor, eps_root: float | torch.Tensor) -> torch.Tensor:
    return safe_sqrt(x if is_zero(eps_root) else x + eps_root)


# --------------------------------------------------------------------------------------- SGD


class SGDState(NamedTuple):
    """State of :func:`sgd`: update counter and momentum buffer (``None`` without momentum).

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> tx = hg.diffopt.sgd(lr=0.1, momentum=0.9)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> type(state).__name__, int(state.count), hg.diffopt.sgd(lr=0.1).init(torch.zeros(2))
        ('SGDState', 0, SGDState(count=tensor(0), momentum_buffer=None))
        >>> _, state = tx.update({"w": torch.ones(2)}, state)
        >>> int(state.count), bool(torch.equal(state.momentum_buffer["w"], torch.ones(2)))
        (1, True)
    """

    count: torch.Tensor
    momentum_buffer: Tree | None


def sgd(
    lr: HParam,
    momentum: HParam = 0.0,
    dampening: HParam = 0.0,
    nesterov: bool = False,
    weight_decay: HParam = 0.0,
) -> GradientTransformation:
    r"""Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    Update rule at step :math:`t = 1, 2, \dots` (gradient :math:`g_t`, parameters
    :math:`\theta_{t-1}`, weight decay :math:`\lambda`, momentum :math:`\mu`, dampening
    :math:`\tau`):

    .. math::
        g \leftarrow g_t + \lambda\theta_{t-1}, \qquad
        b_t = \begin{cases} g & t = 1 \\ \mu b_{t-1} + (1-\tau) g & t > 1\end{cases},
        \qquad d = \begin{cases} g + \mu b_t & \text{nesterov} \\ b_t & \text{else}
        \end{cases}, \qquad u_t = -\gamma\, d

    (without momentum :math:`d = g`).

    Args:
        lr: learning rate :math:`\gamma \ge 0` (float, 0-d tensor or schedule).
        momentum: :math:`\mu \ge 0`.  A Python ``0`` disables the momentum buffer.
        dampening: :math:`\tau \in [0, 1]`.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 coefficient :math:`\lambda \ge 0` added to the gradient.

    Returns:
        A :class:`GradientTransformation` with state :class:`SGDState`.

    Cost: O(number of parameters) per update; one buffer with momentum, none without.

    Examples:
        >>> import torch
        >>> from hypergradient.diffopt import apply_updates, sgd
        >>> params = {"w": torch.ones(2)}
        >>> tx = sgd(lr=0.1, momentum=0.9)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> apply_updates(params, updates)["w"]
        tensor([0.9000, 0.9000])
    """
    where = "hypergradient.diffopt.sgd"
    lr = check_hparam(where, "lr", lr, NONNEGATIVE)
    momentum = check_hparam(where, "momentum", momentum, NONNEGATIVE)
    dampening = check_hparam(where, "dampening", dampening, UNIT_CLOSED)
    weight_decay = check_hparam(where, "weight_decay", weight_decay, NONNEGATIVE)
    if not isinstance(nesterov, bool):
        raise HypergradientError(
            f"{where}: `nesterov` must be a bool, got {type(nesterov).__name__} {nesterov!r}."
        )
    use_momentum = not is_zero(momentum)
    use_wd = not is_zero(weight_decay)
    if nesterov:
        momentum_value = _peek(momentum)
        damp_value = _peek(dampening)
        if not use_momentum or (isinstance(momentum_value, float) and momentum_value <= 0):
            raise HypergradientError(
                f"{where}: nesterov=True requires momentum > 0, got momentum={momentum_value!r}. "
                f"Set momentum (e.g. 0.9) or use nesterov=False."
            )
        if isinstance(damp_value, float) and damp_value != 0:
            raise HypergradientError(
                f"{where}: nesterov=True requires dampening == 0, got dampening={damp_value!r}. "
                f"Set dampening=0.0 or use nesterov=False."
            )

    def init(params: Params) -> SGDState:
        check_like(f"{where}(...).init", "params", params, params, "params")
        return SGDState(new_count(), tree_zeros_like(params) if use_momentum else None)

    def update(
        grads: Grads, state: SGDState, params: Params | None = None
    ) -> tuple[Updates, SGDState]:
        uwhere = f"{where}(...).update"
        check_state(uwhere, state, SGDState)
        _check_inputs(uwhere, grads, params, state.momentum_buffer, use_wd)
        count = int(state.count)
        lr_t = resolve_hparam(uwhere, "lr", lr, count, NONNEGATIVE)
        g = grads
        if use_wd:
            wd_t = resolve_hparam(uwhere, "weight_decay", weight_decay, count, NONNEGATIVE)
            g = _add_weight_decay(g, params, wd_t)
        buf = None
        if use_momentum:
            mu = resolve_hparam(uwhere, "momentum", momentum, count, NONNEGATIVE)
            if count == 0:
                # torch: buf = grad.detach().clone(); the clone protects the state from later
                # in-place edits of the caller's gradient tensors (e.g. `.grad.zero_()`),
                # and unlike torch we keep the autograd history.
                buf = tree_map(torch.clone, g)
            else:
                tau = resolve_hparam(uwhere, "dampening", dampening, count, UNIT_CLOSED)
                one_minus_tau = 1 - tau
                buf = tree_map(lambda b, x: b * mu + one_minus_tau * x, state.momentum_buffer, g)
            g = tree_map(lambda x, b: x + mu * b, g, buf) if nesterov else buf
        neg_lr = -lr_t
        updates = tree_map(lambda x: neg_lr * x, g)
        return updates, SGDState(state.count + 1, buf)

    return GradientTransformation(init, update)


# -------------------------------------------------------------------------------------- Adam


class AdamState(NamedTuple):
    """State of :func:`adam`: counter, first/second moments, running max (amsgrad only).

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> tx = hg.diffopt.adam(lr=0.01, betas=(0.9, 0.999))
        >>> _, state = tx.update({"w": torch.ones(2)}, tx.init({"w": torch.zeros(2)}))
        >>> state._fields
        ('count', 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq')
        >>> m, v = state.exp_avg["w"], state.exp_avg_sq["w"]  # (1 - beta_i) * g^i
        >>> bool(torch.allclose(m, torch.full_like(m, 0.1)))
        True
        >>> bool(torch.allclose(v, torch.full_like(v, 1e-3)))
        True
        >>> int(state.count), state.max_exp_avg_sq is None  # amsgrad=False
        (1, True)
    """

    count: torch.Tensor
    exp_avg: Tree
    exp_avg_sq: Tree
    max_exp_avg_sq: Tree | None


def _betas(where: str, betas: object) -> tuple[HParam, HParam]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise HypergradientError(
            f"{where}: `betas` must be a pair (beta1, beta2), got {betas!r}. Pass e.g. "
            f"betas=(0.9, 0.999)."
        )
    return (
        check_hparam(where, "betas[0]", betas[0], UNIT_OPEN),
        check_hparam(where, "betas[1]", betas[1], UNIT_OPEN),
    )


def adam(
    lr: HParam = 1e-3,
    betas: tuple[HParam, HParam] = (0.9, 0.999),
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    amsgrad: bool = False,
    eps_root: HParam = 0.0,
) -> GradientTransformation:
    r"""Adam (with optional AMSGrad and L2 weight decay), as ``torch.optim.Adam``.

    Update rule at step :math:`t = 1, 2, \dots` (:math:`m_0 = v_0 = 0`):

    .. math::
        g &\leftarrow g_t + \lambda\theta_{t-1}, \quad
        m_t = \mathrm{lerp}(m_{t-1}, g, 1-\beta_1), \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ (amsgrad) else } v_t, \quad
        u_t = -\frac{\gamma}{1-\beta_1^t}\,
        \frac{m_t}{\sqrt{\hat v_t / (1-\beta_2^t) + \epsilon_{root}} + \epsilon}

    with the square root taken by :func:`safe_sqrt` (finite derivatives at 0).

    Args:
        lr: learning rate :math:`\gamma \ge 0`.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon \ge 0` added to the denominator (outside the root).
        weight_decay: L2 coefficient :math:`\lambda \ge 0` added to the gradient.
        amsgrad: use the running maximum of :math:`v_t`.
        eps_root: :math:`\epsilon_{root} \ge 0` added to the bias-corrected second
            moment inside the root, as in optax (not in torch; ``0`` reproduces
            ``torch.optim.Adam``).

    Returns:
        A :class:`GradientTransformation` with state :class:`AdamState`.

    Cost: O(number of parameters) per update; two buffers (three with amsgrad).

    Examples:
        >>> import torch
        >>> from hypergradient.diffopt import apply_updates, adam
        >>> params = {"w": torch.ones(2)}
        >>> tx = adam(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([1.0, 0.0])}, state, params)
        >>> apply_updates(params, updates)["w"]
        tensor([0.9000, 1.0000])
    """
    where = "hypergradient.diffopt.adam"
    lr = check_hparam(where, "lr", lr, NONNEGATIVE)
    beta1, beta2 = _betas(where, betas)
    eps = check_hparam(where, "eps", eps, NONNEGATIVE)
    weight_decay = check_hparam(where, "weight_decay", weight_decay, NONNEGATIVE)
    eps_root = check_hparam(where, "eps_root", eps_root, NONNEGATIVE)
    if not isinstance(amsgrad, bool):
        raise HypergradientError(
            f"{where}: `amsgrad` must be a bool, got {type(amsgrad).__name__} {amsgrad!r}."
        )
    use_wd = not is_zero(weight_decay)

    def init(params: Params) -> AdamState:
        check_like(f"{where}(...).init", "params", params, params, "params")
        zeros = tree_zeros_like(params)
        return AdamState(new_count(), zeros, zeros, zeros if amsgrad else None)

    def update(
        grads: Grads, state: AdamState, params: Params | None = None
    ) -> tuple[Updates, AdamState]:
        uwhere = f"{where}(...).update"
        check_state(uwhere, state, AdamState)
        _check_inputs(uwhere, grads, params, state.exp_avg, use_wd)
        count = int(state.count)
        step = count + 1
        lr_t = resolve_hparam(uwhere, "lr", lr, count, NONNEGATIVE)
        b1 = resolve_hparam(uwhere, "betas[0]", beta1, count, UNIT_OPEN)
        b2 = resolve_hparam(uwhere, "betas[1]", beta2, count, UNIT_OPEN)
        eps_t = resolve_hparam(uwhere, "eps", eps, count, NONNEGATIVE)
        eps_root_t = resolve_hparam(uwhere, "eps_root", eps_root, count, NONNEGATIVE)
        g = grads
        if use_wd:
            wd_t = resolve_hparam(uwhere, "weight_decay", weight_decay, count, NONNEGATIVE)
            g = _add_weight_decay(g, params, wd_t)
        m = _lerp(state.exp_avg, g, 1 - b1)
        v = _ema_sq(state.exp_avg_sq, g, b2)
        vmax = map_optional(torch.maximum, state.max_exp_avg_sq, v)
        bias_correction1 = 1 - b1**step
        bias_correction2 = 1 - b2**step
        bias_correction2_sqrt = bias_correction2**0.5
        neg_step_size = -(lr_t / bias_correction1)
        # sqrt(v + eps_root * bc2) / sqrt(bc2) = sqrt(v / bc2 + eps_root): eps_root is added
        # to the bias-corrected second moment, and eps_root = 0 keeps torch's rounding.
        eps_root_scaled = eps_root_t if is_zero(eps_root_t) else eps_root_t * bias_correction2

        def leaf(m_i: torch.Tensor, v_i: torch.Tensor) -> torch.Tensor:
            denom = _root(v_i, eps_root_scaled) / bias_correction2_sqrt + eps_t
            return neg_step_size * (m_i / denom)

        updates = tree_map(leaf, m, v if vmax is None else vmax)
        return updates, AdamState(state.count + 1, m, v, vmax)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------------- RMSprop


class RMSPropState(NamedTuple):
    """State of :func:`rmsprop`: counter, squared-gradient average, gradient average
    (``centered`` only) and momentum buffer (``momentum`` only).

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> tx = hg.diffopt.rmsprop(lr=0.01, alpha=0.99, centered=True)
        >>> _, state = tx.update({"w": torch.ones(2)}, tx.init({"w": torch.zeros(2)}))
        >>> type(state).__name__, int(state.count), state.momentum_buffer is None
        ('RMSPropState', 1, True)
        >>> bool(torch.allclose(state.square_avg["w"], torch.full((2,), 0.01)))  # (1 - alpha) g^2
        True
        >>> bool(torch.allclose(state.grad_avg["w"], torch.full((2,), 0.01)))  # (1 - alpha) g
        True
    """

    count: torch.Tensor
    square_avg: Tree
    grad_avg: Tree | None
    momentum_buffer: Tree | None


def rmsprop(
    lr: HParam = 1e-2,
    alpha: HParam = 0.99,
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    momentum: HParam = 0.0,
    centered: bool = False,
    eps_root: HParam = 0.0,
) -> GradientTransformation:
    r"""RMSprop (optionally centered, with momentum), as ``torch.optim.RMSprop``.

    Update rule at step :math:`t` (:math:`v_0 = \bar g_0 = b_0 = 0`):

    .. math::
        g &\leftarrow g_t + \lambda\theta_{t-1}, \quad
        v_t = \alpha v_{t-1} + (1-\alpha) g^2, \quad
        \bar g_t = \mathrm{lerp}(\bar g_{t-1}, g, 1-\alpha) \text{ (centered)}, \\
        s_t &= \sqrt{v_t - \bar g_t^2 + \epsilon_{root}} + \epsilon
        \quad (\text{no } \bar g_t^2 \text{ if not centered}), \\
        u_t &= -\gamma\, b_t,\ b_t = \mu b_{t-1} + g / s_t \text{ (momentum)}, \qquad
        u_t = -\gamma\, g / s_t \text{ (otherwise)}

    with the square root taken by :func:`safe_sqrt`.

    Args:
        lr: learning rate :math:`\gamma \ge 0`.
        alpha: smoothing constant :math:`\alpha \in [0, 1]`.
        eps: :math:`\epsilon \ge 0` added to the denominator (outside the root).
        weight_decay: L2 coefficient :math:`\lambda \ge 0` added to the gradient.
        momentum: :math:`\mu \ge 0`; a Python ``0`` disables the momentum buffer.
        centered: normalise by an estimate of the gradient variance.
        eps_root: :math:`\epsilon_{root} \ge 0` added inside the root (``0`` = torch).

    Returns:
        A :class:`GradientTransformation` with state :class:`RMSPropState`.

    Cost: O(number of parameters) per update; one to three buffers.

    Examples:
        >>> import torch
        >>> from hypergradient.diffopt import apply_updates, rmsprop
        >>> params = {"w": torch.ones(2)}
        >>> tx = rmsprop(lr=0.01, centered=True, momentum=0.9)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
    """
    where = "hypergradient.diffopt.rmsprop"
    lr = check_hparam(where, "lr", lr, NONNEGATIVE)
    alpha = check_hparam(where, "alpha", alpha, UNIT_CLOSED)
    eps = check_hparam(where, "eps", eps, NONNEGATIVE)
    weight_decay = check_hparam(where, "weight_decay", weight_decay, NONNEGATIVE)
    momentum = check_hparam(where, "momentum", momentum, NONNEGATIVE)
    eps_root = check_hparam(where, "eps_root", eps_root, NONNEGATIVE)
    if not isinstance(centered, bool):
        raise HypergradientError(
            f"{where}: `centered` must be a bool, got {type(centered).__name__} {centered!r}."
        )
    use_wd = not is_zero(weight_decay)
    use_momentum = not is_zero(momentum)

    def init(params: Params) -> RMSPropState:
        check_like(f"{where}(...).init", "params", params, params, "params")
        zeros = tree_zeros_like(params)
        return RMSPropState(
            new_count(), zeros, zeros if centered else None, zeros if use_momentum else None
        )

    def update(
        grads: Grads, state: RMSPropState, params: Params | None = None
    ) -> tuple[Updates, RMSPropState]:
        uwhere = f"{where}(...).update"
        check_state(uwhere, state, RMSPropState)
        _check_inputs(uwhere, grads, params, state.square_avg, use_wd)
        count = int(state.count)
        lr_t = resolve_hparam(uwhere, "lr", lr, count, NONNEGATIVE)
        alpha_t = resolve_hparam(uwhere, "alpha", alpha, count, UNIT_CLOSED)
        eps_t = resolve_hparam(uwhere, "eps", eps, count, NONNEGATIVE)
        eps_root_t = resolve_hparam(uwhere, "eps_root", eps_root, count, NONNEGATIVE)
        g = grads
        if use_wd:
            wd_t = resolve_hparam(uwhere, "weight_decay", weight_decay, count, NONNEGATIVE)
            g = _add_weight_decay(g, params, wd_t)
        v = _ema_sq(state.square_avg, g, alpha_t)
        if centered:
            gbar = _lerp(state.grad_avg, g, 1 - alpha_t)
            avg = tree_map(lambda v_i, a_i: _root(v_i - a_i * a_i, eps_root_t) + eps_t, v, gbar)
        else:
            gbar = None
            avg = tree_map(lambda v_i: _root(v_i, eps_root_t) + eps_t, v)
        neg_lr = -lr_t
        if use_momentum:
            mu = resolve_hparam(uwhere, "momentum", momentum, count, NONNEGATIVE)
            buf = tree_map(lambda b, x, s: b * mu + x / s, state.momentum_buffer, g, avg)
            updates = tree_map(lambda b: neg_lr * b, buf)
        else:
            buf = None
            updates = tree_map(lambda x, s: neg_lr * (x / s), g, avg)
        return updates, RMSPropState(state.count + 1, v, gbar, buf)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------------- Adagrad


class AdagradState(NamedTuple):
    """State of :func:`adagrad`: counter and sum of squared gradients.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> tx = hg.diffopt.adagrad(lr=0.1, initial_accumulator_value=0.5)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> _, state = tx.update({"w": torch.tensor([1.0, 2.0])}, state)
        >>> type(state).__name__, int(state.count)
        ('AdagradState', 1)
        >>> bool(torch.equal(state.sum["w"], torch.tensor([1.5, 4.5])))  # 0.5 + g^2
        True
    """

    count: torch.Tensor
    sum: Tree


def adagrad(
    lr: HParam = 1e-2,
    lr_decay: HParam = 0.0,
    weight_decay: HParam = 0.0,
    initial_accumulator_value: HParam = 0.0,
    eps: HParam = 1e-10,
    eps_root: HParam = 0.0,
) -> GradientTransformation:
    r"""Adagrad, as ``torch.optim.Adagrad``.

    Update rule at step :math:`t = 1, 2, \dots` (:math:`S_0 = ` ``initial_accumulator_value``):

    .. math::
        g \leftarrow g_t + \lambda\theta_{t-1}, \quad
        S_t = S_{t-1} + g^2, \quad
        u_t = -\frac{\gamma}{1 + (t-1)\eta}\, \frac{g}{\sqrt{S_t + \epsilon_{root}} + \epsilon}

    with the square root taken by :func:`safe_sqrt`.

    Args:
        lr: learning rate :math:`\gamma \ge 0`.
        lr_decay: :math:`\eta \ge 0`.
        weight_decay: L2 coefficient :math:`\lambda \ge 0` added to the gradient.
        initial_accumulator_value: :math:`S_0 \ge 0` (a schedule is evaluated at count 0).
        eps: :math:`\epsilon \ge 0` added to the denominator (outside the root).
        eps_root: :math:`\epsilon_{root} \ge 0` added inside the root (``0`` = torch).

    Returns:
        A :class:`GradientTransformation` with state :class:`AdagradState`.

    Cost: O(number of parameters) per update; one buffer.

    Examples:
        >>> import torch
        >>> from hypergradient.diffopt import apply_updates, adagrad
        >>> params = {"w": torch.ones(2)}
        >>> tx = adagrad(lr=0.1, initial_accumulator_value=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
    """
    where = "hypergradient.diffopt.adagrad"
    lr = check_hparam(where, "lr", lr, NONNEGATIVE)
    lr_decay = check_hparam(where, "lr_decay", lr_decay, NONNEGATIVE)
    weight_decay = check_hparam(where, "weight_decay", weight_decay, NONNEGATIVE)
    initial_accumulator_value = check_hparam(
        where, "initial_accumulator_value", initial_accumulator_value, NONNEGATIVE
    )
    eps = check_hparam(where, "eps", eps, NONNEGATIVE)
    eps_root = check_hparam(where, "eps_root", eps_root, NONNEGATIVE)
    use_wd = not is_zero(weight_decay)

    def init(params: Params) -> AdagradState:
        iwhere = f"{where}(...).init"
        check_like(iwhere, "params", params, params, "params")
        s0 = resolve_hparam(
            iwhere, "initial_accumulator_value", initial_accumulator_value, 0, NONNEGATIVE
        )
        if isinstance(s0, torch.Tensor):
            acc = tree_map(lambda p: torch.zeros_like(p) + s0, params)
        else:
            acc = tree_map(lambda p: torch.full_like(p, s0), params)
        return AdagradState(new_count(), acc)

    def update(
        grads: Grads, state: AdagradState, params: Params | None = None
    ) -> tuple[Updates, AdagradState]:
        uwhere = f"{where}(...).update"
        check_state(uwhere, state, AdagradState)
        _check_inputs(uwhere, grads, params, state.sum, use_wd)
        count = int(state.count)
        lr_t = resolve_hparam(uwhere, "lr", lr, count, NONNEGATIVE)
        decay_t = resolve_hparam(uwhere, "lr_decay", lr_decay, count, NONNEGATIVE)
        eps_t = resolve_hparam(uwhere, "eps", eps, count, NONNEGATIVE)
        eps_root_t = resolve_hparam(uwhere, "eps_root", eps_root, count, NONNEGATIVE)
        g = grads
        if use_wd:
            wd_t = resolve_hparam(uwhere, "weight_decay", weight_decay, count, NONNEGATIVE)
            g = _add_weight_decay(g, params, wd_t)
        acc = tree_map(lambda s, x: s + x * x, state.sum, g)
        neg_clr = -(lr_t / (1 + count * decay_t))
        updates = tree_map(lambda x, s: neg_clr * (x / (_root(s, eps_root_t) + eps_t)), g, acc)
        return updates, AdagradState(state.count + 1, acc)

    return GradientTransformation(init, update)
