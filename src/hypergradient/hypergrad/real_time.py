r"""Real-time hyperparameter optimisation (RTHO; Franceschi et al. 2017, Sec. 3.2).

Forward-mode hypergradients carried *along* one training run.  The inner state
:math:`s_t = (w_t, \text{optimizer buffers}_t)` advances by one optimizer step
:math:`s_{t+1} = \Phi_t(s_t, \lambda)` on the mini-batch loss :math:`L_t`, and its tangent
with respect to the hyperparameters,

.. math::

    Z_t = \frac{d s_t}{d\lambda}, \qquad
    Z_{t+1} = \underbrace{\partial_s \Phi_t}_{A_t} Z_t + \underbrace{\partial_\lambda
    \Phi_t}_{B_t}, \qquad Z_0 = 0,

advances with it: one Jacobian-vector product of the step per scalar hyperparameter,
batched with ``vmap`` (:math:`A_t Z_t + B_t` is a single JVP with tangent
:math:`(Z_t, e_i)`).  At any step the hypergradient of a validation loss :math:`E` is

.. math::

    \frac{dE(w_t, \lambda)}{d\lambda} = \nabla_w E(w_t, \lambda)^\top Z^w_t
    + \partial_\lambda E(w_t, \lambda),

one gradient of :math:`E` and a contraction with :math:`Z^w_t`; no trajectory is stored.
Updating :math:`\lambda` every few steps while :math:`Z` keeps accumulating is RTHO; with
:math:`\lambda` fixed, :math:`Z_t` is exactly the forward-mode hypergradient of the first
``t`` steps (:func:`~hypergradient.unrolled_hypergrad` with ``mode="forward"``).

The inner optimizers are written as ``torch.optim`` writes them (single-tensor path):
``"sgd"`` (:math:`w \leftarrow w - \eta g`), ``"momentum"`` (heavy ball,
:math:`b \leftarrow \mu b + g,\; w \leftarrow w - \eta b`, dampening 0) and ``"adam"``
(``momentum`` is :math:`\beta_1`; the square root is
:func:`~hypergradient.diffopt.safe_sqrt`, so a gradient entry that is exactly zero gives a
finite tangent).  Weight decay and any other hyperparameter of the loss live in
``inner_loss(params, hparams)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.func import grad_and_value, jvp, vmap

from .._errors import HypergradientError, check_scalar_loss
from .._tree import tree_all_finite, tree_flatten_vector, tree_size, tree_unflatten_vector
from ..diffopt import safe_sqrt
from ._checks import check_callable, check_loss_dtype, check_params_hparams, ignored_hparam_error
from ._step import StepHParam, resolve_step_hparam
from .unrolled import _sgd_step

_WHERE = "hypergradient.hypergrad.RealTime"
OPTIMIZERS = ("sgd", "momentum", "adam")
# The optimizer buffers each rule carries (the tangents carry the same ones).
_BUFFERS = {"sgd": (), "momentum": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}

Tree = dict[str, torch.Tensor]


class RealTimeState(NamedTuple):
    r"""Weights, optimizer buffers and their tangents after ``count`` steps of :class:`RealTime`.

    ``params`` and every ``buffers[name]`` are dicts shaped like the weights;
    ``params_tangent`` and ``buffers_tangent`` have the same structure with a leading axis of
    size ``m`` (the number of scalar hyperparameters, in the order of
    ``hypergradient._tree.tree_flatten_vector(hparams)``): row ``i`` is
    :math:`ds/d\lambda_i`.  ``hparam_layout`` records their keys and shapes.  ``unused``
    lists the hyperparameters that neither the inner loss nor the step rule read (found at
    the first step); :meth:`RealTime.hypergrad` refuses them unless the outer loss reads
    them.

    Examples:
        >>> import torch, hypergradient as hg
        >>> rt = hg.hypergrad.RealTime("momentum", lr=0.1, momentum="mu")
        >>> state = rt.init({"w": torch.zeros(3)}, {"mu": torch.tensor(0.9)})
        >>> state.count, sorted(state.buffers), tuple(state.params_tangent["w"].shape)
        (0, ['momentum_buffer'], (1, 3))
    """

    params: Tree
    buffers: dict[str, Tree]
    params_tangent: Tree
    buffers_tangent: dict[str, Tree]
    count: int
    unused: tuple[str, ...] = ()
    hparam_layout: tuple[tuple[str, tuple[int, ...]], ...] = ()


def _detached(tree: Mapping[str, torch.Tensor]) -> Tree:
    return {k: v.detach() for k, v in tree.items()}


def _check_call(where: str, state: object, loss_name: str, loss: object, hparams) -> torch.dtype:
    """``state`` is a :class:`RealTimeState` whose tangent rows match ``hparams``; returns
    the dtype."""
    if not isinstance(state, RealTimeState):
        raise HypergradientError(
            f"{where}: state must be the RealTimeState from init() or step(), got "
            f"{type(state).__name__}."
        )
    check_callable(where, loss_name, loss)
    dtype = check_params_hparams(where, state.params, hparams)
    m = next(iter(state.params_tangent.values())).shape[0]
    if _layout(hparams) != state.hparam_layout or tree_size(dict(hparams)) != m:
        raise HypergradientError(
            f"{where}: hparams {dict(_layout(hparams))} (keys: shapes) are not those the "
            f"state was built for, {dict(state.hparam_layout)}: the tangents have one row per "
            f"scalar hyperparameter at init ({m} rows). Pass the same keys and shapes."
        )
    return dtype


def _layout(hparams) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((k, tuple(v.shape)) for k, v in hparams.items())


@dataclass(frozen=True)
class RealTime:
    r"""Real-time (forward-mode) hypergradients carried along one training run (RTHO).

    Args:
        optimizer: the inner step rule: ``"sgd"``, ``"momentum"`` (heavy ball as
            ``torch.optim.SGD(momentum=mu)``) or ``"adam"`` (as ``torch.optim.Adam``).
        lr: learning rate :math:`\eta`: a float (constant), the name of a scalar key of
            ``hparams`` (differentiated), or a callable ``lr(hparams, t) -> 0-d tensor``
            (e.g. ``lambda h, t: h["log_lr"].exp()``).
        momentum: :math:`\mu` for ``"momentum"``, :math:`\beta_1` for ``"adam"`` (default
            0.9 there); same forms as ``lr``; must stay 0 for ``"sgd"``.
        beta2: Adam's :math:`\beta_2` (a float constant).
        eps: Adam's :math:`\epsilon` (a float constant).

    Methods: :meth:`init` (the state at step 0, zero tangents), :meth:`step` (one optimizer
    step on ``inner_loss`` and :math:`Z_{t+1} = A_t Z_t + B_t`), :meth:`hypergrad`
    (:math:`\nabla_w E^\top Z^w_t + \partial_\lambda E`).  The hyperparameters may change
    between steps (that is RTHO); the tangents carry on.

    Cost: per step, one forward-over-reverse pass of ``inner_loss`` per scalar
    hyperparameter, batched by ``vmap`` (measured: about 6 plain training steps for 2
    hyperparameters, MLP on one CPU thread, ``benchmarks/real_time.py``); memory
    ``(m + 1)`` copies of weights and buffers for ``m`` scalar hyperparameters; per
    hypergradient one gradient of ``outer_loss``.  For many
    hyperparameters use reverse mode (:func:`~hypergradient.unrolled_hypergrad`).

    Examples:
        >>> import torch, hypergradient as hg
        >>> # L = (w - 1)^2 / 2, SGD from w = 0: w_t = 1 - (1 - lr)^t, so dw_2/dlr = 2(1 - lr)
        >>> loss = lambda p, h: 0.5 * ((p["w"] - 1.0) ** 2).sum()
        >>> hparams = {"lr": torch.tensor(0.25, dtype=torch.float64)}
        >>> rt = hg.hypergrad.RealTime("sgd", lr="lr")
        >>> state = rt.init({"w": torch.zeros(1, dtype=torch.float64)}, hparams)
        >>> for _ in range(2):
        ...     state = rt.step(state, loss, hparams)
        >>> g = rt.hypergrad(state, lambda p, h: p["w"].sum(), hparams)  # E = w_2
        >>> float(g["lr"])
        1.5

    References:
        Franceschi, Donini, Frasconi, Pontil (2017), Forward and Reverse Gradient-Based
        Hyperparameter Optimization, ICML (Algorithm 1 and "real-time HO").
    """

    optimizer: str = "sgd"
    lr: StepHParam = 0.1
    momentum: StepHParam | None = None
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise HypergradientError(
                f"{_WHERE}(optimizer={self.optimizer!r}): unsupported inner optimizer; "
                f"expected one of {list(OPTIMIZERS)} (torch.optim.SGD without/with momentum, "
                f"torch.optim.Adam)."
            )
        if self.optimizer == "sgd" and self.momentum not in (None, 0, 0.0):
            raise HypergradientError(
                f"{_WHERE}(optimizer='sgd', momentum={self.momentum!r}): plain SGD has no "
                f"momentum; use optimizer='momentum'."
            )
        for name in ("beta2", "eps"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or not 0 <= value < 1:
                raise HypergradientError(f"{_WHERE}({name}={value!r}): expected a float in [0, 1).")
        for name in ("lr", "momentum"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise HypergradientError(f"{_WHERE}({name}={value!r}): expected a finite number.")

    # ------------------------------------------------------------------ helpers
    def _momentum_spec(self) -> StepHParam:
        if self.momentum is not None:
            return self.momentum
        return 0.9 if self.optimizer == "adam" else 0.0

    def _rules(self, hparams: Mapping[str, torch.Tensor], dtype: torch.dtype, where: str):
        """``(lr(h, t), momentum(h, t))`` after validation (scalars only: RTHO has no horizon)."""
        fns = []
        for name, spec in (("lr", self.lr), ("momentum", self._momentum_spec())):
            if isinstance(spec, str) and spec in hparams and hparams[spec].numel() != 1:
                raise HypergradientError(
                    f"{where}: {name}={spec!r} names hparams[{spec!r}] of shape "
                    f"{tuple(hparams[spec].shape)}; real-time optimisation has no fixed "
                    f"horizon, so a step hyperparameter must be a scalar (a schedule can be "
                    f"a callable (hparams, t) -> tensor)."
                )
            if isinstance(spec, torch.Tensor) and spec.numel() != 1:
                raise HypergradientError(
                    f"{where}: {name} is a tensor of shape {tuple(spec.shape)}; expected a "
                    f"scalar (or a callable (hparams, t) -> tensor for a schedule)."
                )
            fns.append(resolve_step_hparam(name, spec, hparams, 1, dtype, where))
        return fns

    def _update(self, w, buffers, g, hp, t, lr_fn, mom_fn):
        """One step of the inner optimizer, out of place (differentiable in every input)."""
        lr = lr_fn(hp, t)
        if self.optimizer == "sgd":
            new_w, _ = _sgd_step(w, None, g, lr, 0.0)
            return new_w, {}
        if self.optimizer == "momentum":
            new_w, buf = _sgd_step(w, buffers["momentum_buffer"], g, lr, mom_fn(hp, t))
            return new_w, {"momentum_buffer": buf}
        beta1, beta2, step = mom_fn(hp, t), self.beta2, t + 1
        m = {k: torch.lerp(buffers["exp_avg"][k], g[k], 1 - beta1) for k in w}
        v = {k: buffers["exp_avg_sq"][k] * beta2 + (1 - beta2) * g[k] * g[k] for k in w}
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        new_w = {
            k: w[k] - step_size * (m[k] / (safe_sqrt(v[k]) / bias_correction2_sqrt + self.eps))
            for k in w
        }
        return new_w, {"exp_avg": m, "exp_avg_sq": v}

    # ------------------------------------------------------------------ API
    def init(
        self, params: Mapping[str, torch.Tensor], hparams: Mapping[str, torch.Tensor]
    ) -> RealTimeState:
        """The state at step 0: ``params`` (copied, detached), zero buffers, zero tangents.

        Args:
            params: dict of weight tensors ``w_0`` (one floating dtype), treated as constants.
            hparams: dict of hyperparameter tensors (same dtype); only their number and
                shapes are read here.

        Cost: allocates ``(m + 1) x (1 + number of buffers)`` copies of the weights.
        """
        where = f"{_WHERE}.init"
        dtype = check_params_hparams(where, params, hparams)
        self._rules(hparams, dtype, where)
        m = tree_size(dict(hparams))
        w = {k: v.detach().clone() for k, v in params.items()}
        buffers = {
            b: {k: torch.zeros_like(v) for k, v in w.items()} for b in _BUFFERS[self.optimizer]
        }

        def zeros():
            return {k: v.new_zeros((m, *v.shape)) for k, v in w.items()}

        tangents = {b: zeros() for b in buffers}
        return RealTimeState(w, buffers, zeros(), tangents, 0, (), _layout(hparams))

    def step(
        self,
        state: RealTimeState,
        inner_loss: Callable[
            [Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor
        ],
        hparams: Mapping[str, torch.Tensor],
    ) -> RealTimeState:
        r"""One optimizer step on ``inner_loss`` and the tangent update :math:`Z \leftarrow AZ + B`.

        Args:
            state: from :meth:`init` or a previous :meth:`step`.
            inner_loss: ``inner_loss(params, hparams) -> scalar`` of this step (e.g. on this
                step's mini-batch), a pure function ``torch.func`` can transform.
            hparams: the current hyperparameters (same keys and shapes as at :meth:`init`;
                their values may change between steps).

        Returns:
            The next :class:`RealTimeState` (detached tensors).

        Cost: one ``vmap`` of ``m`` forward-over-reverse JVPs of ``inner_loss``; the first
        step also runs one reverse double-backward pass to find unused hyperparameters.
        """
        where = f"{_WHERE}.step"
        dtype = _check_call(where, state, "inner_loss", inner_loss, hparams)
        lr_fn, mom_fn = self._rules(hparams, dtype, where)
        hp = _detached(hparams)
        t = state.count
        unused = state.unused
        if t == 0:  # clear errors before torch.func tracing, once
            value = check_scalar_loss(where, "inner_loss", inner_loss(state.params, hp))
            check_loss_dtype(where, "inner_loss", value, dtype)
            unused = self._unused_in_step(inner_loss, state, hp, lr_fn, mom_fn)

        def advance(w, buffers, h):
            g, loss = grad_and_value(inner_loss)(w, h)
            return self._update(w, buffers, g, h, t, lr_fn, mom_fn), loss

        def push(w_tangent, buffers_tangent, direction):
            h_tangent = tree_unflatten_vector(direction, hp)
            primal, tangent, loss = jvp(
                advance,
                (state.params, state.buffers, hp),
                (w_tangent, buffers_tangent, h_tangent),
                has_aux=True,
            )
            return primal, tangent, loss

        m = next(iter(state.params_tangent.values())).shape[0]
        basis = torch.eye(m, dtype=dtype, device=next(iter(hp.values())).device)
        (new_w, new_buffers), (w_tangent, buffers_tangent), loss = vmap(
            push, in_dims=(0, 0, 0), out_dims=(None, 0, None)
        )(state.params_tangent, state.buffers_tangent, basis)
        if not bool(torch.isfinite(loss)):
            raise HypergradientError(
                f"{where}: the training loss at step {t} is {float(loss)} (not finite); the "
                f"inner run diverged. Lower the learning rate (or the hyper learning rate)."
            )
        if not (tree_all_finite(new_w) and tree_all_finite(w_tangent)):
            raise HypergradientError(
                f"{where}: step {t} produced NaN or inf in the weights or their tangents "
                f"(training loss {float(loss):.4g}); the inner step is unstable at these "
                f"hyperparameters. Lower the learning rate (or the hyper learning rate)."
            )
        return RealTimeState(
            _detached(new_w),
            {b: _detached(v) for b, v in new_buffers.items()},
            _detached(w_tangent),
            {b: _detached(v) for b, v in buffers_tangent.items()},
            t + 1,
            unused,
            state.hparam_layout,
        )

    def _unused_in_step(self, inner_loss, state, hp, lr_fn, mom_fn) -> tuple[str, ...]:
        """Hyperparameters that neither the step rule nor the gradient of ``inner_loss`` reads
        (structurally: ``None`` from autograd, not a numerical zero)."""
        h = {k: v.requires_grad_(True) for k, v in _detached(hp).items()}
        w = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(inner_loss(w, h), list(w.values()), create_graph=True)
            probe = sum(torch.sum(g) for g in grads if g.requires_grad)
            terms = [lr_fn(h, 0)]
            if self.optimizer != "sgd":
                terms.append(mom_fn(h, 0))
            for term in terms:
                if isinstance(term, torch.Tensor) and term.requires_grad:
                    probe = probe + term.sum()
            if not isinstance(probe, torch.Tensor) or not probe.requires_grad:
                return tuple(h)
            used = torch.autograd.grad(probe, list(h.values()), allow_unused=True)
        return tuple(k for k, g in zip(h, used) if g is None)

    def hypergrad(
        self,
        state: RealTimeState,
        outer_loss: Callable[
            [Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor
        ],
        hparams: Mapping[str, torch.Tensor],
        *,
        return_value: bool = False,
    ):
        r""":math:`dE(w_t)/d\lambda = \nabla_w E^\top Z^w_t + \partial_\lambda E` at the state.

        Args:
            state: a :class:`RealTimeState` after ``t >= 0`` steps.
            outer_loss: ``outer_loss(params, hparams) -> scalar`` (e.g. a validation loss).
            hparams: the current hyperparameters (same keys and shapes as at :meth:`init`).
            return_value: also return ``float(outer_loss(w_t, hparams))``.

        Returns:
            dict shaped like ``hparams`` (and the outer loss's value when ``return_value``).

        Cost: one forward and backward pass of ``outer_loss`` and ``m`` inner products.
        """
        where = f"{_WHERE}.hypergrad"
        dtype = _check_call(where, state, "outer_loss", outer_loss, hparams)
        w = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
        h = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
        with torch.enable_grad():
            value = check_scalar_loss(where, "outer_loss", outer_loss(w, h))
            check_loss_dtype(where, "outer_loss", value, dtype)
            if not bool(torch.isfinite(value)):
                raise HypergradientError(
                    f"{where}: the outer loss is {float(value)} (not finite) at the current "
                    f"weights; the inner run diverged or the validation data holds NaN."
                )
            grads = torch.autograd.grad(value, [*w.values(), *h.values()], allow_unused=True)
        grad_w, grad_h = grads[: len(w)], grads[len(w) :]
        unused = [k for k, g in zip(h, grad_h) if g is None and k in state.unused]
        if unused:
            raise ignored_hparam_error(where, unused, implicit=False)
        direct = {
            k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(h.items(), grad_h)
        }
        flat = tree_flatten_vector(direct).detach()
        for k, g in zip(w, grad_w):
            if g is not None:
                flat = flat + state.params_tangent[k].reshape(flat.shape[0], -1) @ g.reshape(-1)
        result = {k: v.detach() for k, v in tree_unflatten_vector(flat, dict(hparams)).items()}
        return (result, float(value.detach())) if return_value else result
