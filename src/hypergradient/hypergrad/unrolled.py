r"""Hypergradients through the inner training run itself (Franceschi et al. 2017).

The inner problem is *solved by* ``T`` steps of SGD with (heavy-ball) momentum, written as
``torch.optim.SGD`` writes them (dampening 0):

.. math::

    b_{t+1} = \mu_t\, b_t + \nabla_w L(w_t, \lambda), \qquad
    w_{t+1} = w_t - \eta_t\, b_{t+1}, \qquad b_0 = 0,

and the hypergradient is the exact derivative of :math:`E(w_T(\lambda), \lambda)`, including
through :math:`\eta_t` and :math:`\mu_t` when they are hyperparameters.

* ``mode="reverse"`` back-propagates through the unrolled graph (reverse-HG): one backward
  pass, memory O(T * graph of one step).
* ``mode="forward"`` pushes the tangents :math:`Z_t = dw_t/d\lambda` forward with ``jvp``
  (forward-HG): memory O(size of w) per hyperparameter, cost one JVP pass per scalar
  hyperparameter (batched with ``vmap``); the right choice for few hyperparameters.
* ``truncate=K`` differentiates through the last ``K`` steps only, treating
  :math:`w_{T-K}, b_{T-K}` as constants (truncated back-propagation; biased).
* ``mode="reversible"`` reverses the run exactly instead of storing it (Maclaurin et al.
  2015; :mod:`.reversible`): memory O(size of w) plus about :math:`\log_2(1/\mu)` bits per
  weight and step.

``params0`` may be a callable ``params0(hparams) -> dict`` when the initial weights depend on
hyperparameters (an initial scale, say); every mode differentiates through it (truncation
treats :math:`w_{T-K}` as a constant, so it does not).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.func import grad as func_grad
from torch.func import jvp, vmap

from .._errors import (
    HypergradientError,
    check_scalar_loss,
    check_tree,
    reraise_compiled_double_backward,
)
from .._tree import tree_detach, tree_size, tree_unflatten_vector
from ._checks import (
    check_callable,
    check_loss_dtype,
    check_params_hparams,
    ignored_hparam_error,
)
from ._step import StepHParam, resolve_step_hparam
from .reversible import _reversible, check_batches, initial_params

_WHERE = "hypergradient.unrolled_hypergrad(...)"
# Forward mode refuses an identity basis (hyperparameters x hyperparameters) above this.
FORWARD_BASIS_LIMIT_BYTES = 2**30


def _sgd_step(w, buf, g, lr, mom):
    """One ``torch.optim.SGD`` step (dampening 0), out of place so autograd can see it."""
    new_buf = {k: mom * buf[k] + g[k] for k in w} if buf is not None else dict(g)
    new_w = {k: w[k] - lr * new_buf[k] for k in w}
    return new_w, new_buf


def _run_detached(loss_at, w, buf, hp, lr_fn, mom_fn, start, stop, use_momentum):
    """Steps ``start..stop-1`` without building a graph through them (truncated prefix);
    ``loss_at(t)`` is step ``t``'s training loss ``(params, hparams) -> scalar``."""
    hp = {k: v.detach() for k, v in hp.items()}
    for t in range(start, stop):
        wt = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        with torch.enable_grad():
            loss = loss_at(t)(wt, hp)
            g = torch.autograd.grad(loss, list(wt.values()))
        g = dict(zip(wt.keys(), g))
        with torch.no_grad():
            lr = lr_fn(hp, t)
            mom = mom_fn(hp, t) if use_momentum else 0.0
            w, buf = _sgd_step(
                {k: v.detach() for k, v in wt.items()},
                buf if use_momentum else None,
                g,
                lr,
                mom,
            )
            if not use_momentum:
                buf = None
    return w, buf


def unrolled_hypergrad(
    inner_loss: Callable[..., torch.Tensor],
    outer_loss: Callable[[dict, dict], torch.Tensor],
    params0: Mapping[str, torch.Tensor],
    hparams: Mapping[str, torch.Tensor],
    steps: int,
    lr: StepHParam,
    momentum: StepHParam = 0.0,
    mode: str = "reverse",
    truncate: int | None = None,
    *,
    forward_chunk_size: int | None = None,
    return_params: bool = False,
    batches: Callable[[int], object] | None = None,
):
    r"""Exact hypergradient of ``outer_loss(w_T, hparams)`` through ``steps`` SGD steps.

    Args:
        inner_loss: ``inner_loss(params, hparams) -> scalar`` (with ``batches``:
            ``inner_loss(params, hparams, batch)``), differentiated at every step.
            For ``mode="forward"`` it must be a pure function that ``torch.func`` can
            transform (no ``.item()``, no in-place updates of captured tensors).
        outer_loss: ``outer_loss(params, hparams) -> scalar`` evaluated at ``w_T``.
        params0: dict of tensors, the initial weights ``w_0`` (treated as constants), or a
            callable ``params0(hparams) -> dict`` when they depend on hyperparameters, e.g.
            ``lambda h: {k: h["init_scale"] * v for k, v in w_init.items()}``.
        hparams: dict of tensors, the hyperparameters (same dtype as ``params0``).
        steps: ``T >= 1``, the number of inner steps.
        lr: learning rate ``eta``: a float or tensor (constant), the name of a key of
            ``hparams`` whose value is a scalar or a ``(steps,)`` schedule (differentiated),
            or a callable ``lr(hparams, t) -> tensor`` (e.g. ``lambda h, t: h["log_lr"].exp()``).
        momentum: ``mu``, same forms as ``lr``; ``0.0`` means plain SGD.
        mode: ``"reverse"``, ``"forward"`` or ``"reversible"`` (exact reversal with the
            defaults of :func:`~hypergradient.reversible_hypergrad`; momenta in ``[0, 1]``,
            a deterministic ``inner_loss``; no ``truncate``).
        truncate: ``K`` in ``1..steps`` to back-propagate through the last ``K`` steps only;
            ``None`` for all of them.
        forward_chunk_size: forward mode evaluates one JVP per scalar hyperparameter,
            vectorised with ``vmap``; this bounds how many run at once (memory).  The
            directions are the rows of an identity matrix of the number of scalar
            hyperparameters; forward mode refuses more than fit in 1 GiB (11,585 in
            float64), before computing anything.
        return_params: also return ``w_T`` (detached).
        batches: mini-batch SGD: ``batches(t) -> batch`` for ``t`` in ``[0, steps)``, the
            same batch every time it is called with ``t`` (e.g.
            :class:`~hypergradient.hypergrad.SeededBatches`); step ``t`` then trains on
            ``inner_loss(params, hparams, batches(t))``.  ``None``: every step on
            ``inner_loss(params, hparams)``.  Every mode differentiates the same run, so
            ``"reverse"`` and ``"reversible"`` agree on it.

    Returns:
        dict shaped like ``hparams`` (and ``w_T`` when ``return_params``).

    Cost: reverse mode runs ``T`` forward+``create_graph`` backward passes and one backward
    through all of them; memory grows linearly with ``T`` (``K`` with truncation).  Forward
    mode costs about ``m`` times a reverse pass for ``m`` scalar hyperparameters but keeps
    no trajectory.

    Examples:
        >>> import torch, hypergradient as hg
        >>> # L = (w - lam)^2/2, one step of lr 0.5 from w0 = 0: w1 = 0.5 lam; E = w1 -> 0.5
        >>> g = hg.unrolled_hypergrad(lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum(),
        ...     lambda p, h: p["w"].sum(), {"w": torch.zeros(1, dtype=torch.float64)},
        ...     {"lam": torch.ones(1, dtype=torch.float64)}, steps=1, lr=0.5)
        >>> float(g["lam"])
        0.5

    References:
        Franceschi, Donini, Frasconi, Pontil (2017), Forward and Reverse Gradient-Based
        Hyperparameter Optimization; Maclaurin, Duvenaud, Adams (2015).
    """
    check_callable(_WHERE, "inner_loss", inner_loss)
    check_callable(_WHERE, "outer_loss", outer_loss)
    check_batches(_WHERE, batches, inner_loss)
    init = None
    if callable(params0) and not isinstance(params0, Mapping):
        check_tree(_WHERE, "hparams", hparams)
        init, params0 = params0, initial_params(_WHERE, params0, hparams)
    dtype = check_params_hparams(_WHERE, params0, hparams, params_name="params0")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise HypergradientError(f"{_WHERE}: steps must be an int >= 1, got {steps!r}.")
    if mode not in ("reverse", "forward", "reversible"):
        raise HypergradientError(
            f"{_WHERE}: mode={mode!r}; expected 'reverse', 'forward' or 'reversible'. "
            f"(Implicit differentiation lives in hg.implicit_hypergrad.)"
        )
    if mode == "forward":
        _check_forward_basis(hparams, dtype)
    if mode == "reversible":
        if truncate is not None:
            raise HypergradientError(
                f"{_WHERE}: truncate={truncate!r} with mode='reversible'; exact reversal "
                f"differentiates through every step. Use mode='reverse' to truncate."
            )
        start = params0 if init is None else init
        out = _reversible(
            inner_loss, outer_loss, start, hparams, steps, lr, momentum, batches=batches,
            where=_WHERE,
        )  # fmt: skip
        return (out.hypergrad, out.params) if return_params else out.hypergrad
    if truncate is not None and (
        not isinstance(truncate, int) or isinstance(truncate, bool) or not 1 <= truncate <= steps
    ):
        raise HypergradientError(
            f"{_WHERE}: truncate must be None or an int in [1, steps={steps}], got {truncate!r}."
        )
    lr_fn = resolve_step_hparam("lr", lr, hparams, steps, dtype, _WHERE)
    use_momentum = not (isinstance(momentum, (int, float)) and float(momentum) == 0.0)
    mom_fn = resolve_step_hparam("momentum", momentum, hparams, steps, dtype, _WHERE)
    keep = steps if truncate is None else truncate
    first_tracked = steps - keep

    run = _Unroll(
        inner_loss,
        outer_loss,
        dict(hparams),
        lr_fn,
        mom_fn,
        first_tracked,
        steps,
        use_momentum,
        dtype,
        init,
        batches,
    )
    # The untracked prefix (truncation) is the same for both modes.
    w = {k: v.detach() for k, v in params0.items()}
    buf = {k: torch.zeros_like(v) for k, v in w.items()} if use_momentum else None
    if first_tracked > 0:
        w, buf = _run_detached(
            run.loss_at, w, buf, hparams, lr_fn, mom_fn, 0, first_tracked, use_momentum
        )
    if mode == "reverse":
        result, w_final = _reverse(run, w, buf)
    else:
        result, w_final = _forward(run, w, buf, forward_chunk_size)
    if return_params:
        return result, w_final
    return result


@dataclass(frozen=True)
class _Unroll:
    """The differentiated part of an unrolled run: steps ``start..steps-1`` then the outer loss."""

    inner_loss: Callable
    outer_loss: Callable
    hparams: dict[str, torch.Tensor]
    lr_fn: Callable
    mom_fn: Callable
    start: int
    steps: int
    use_momentum: bool
    dtype: torch.dtype
    init: Callable | None = None  # w_0 = init(hparams) when untruncated
    batches: Callable[[int], object] | None = None  # mini-batch t, or None: full batch

    def loss_at(self, t: int) -> Callable:
        """Step ``t``'s training loss ``(params, hparams) -> scalar``."""
        if self.batches is None:
            return self.inner_loss
        batch, inner_loss = self.batches(t), self.inner_loss
        return lambda w, hp: inner_loss(w, hp, batch)

    def initial(self, w, hp):
        """``w_0``: ``init(hp)`` (in the graph) when it depends on hparams, else ``w``."""
        if self.init is None or self.start > 0:
            return w
        value = self.init(hp)
        return {k: value[k] for k in w}

    def step(self, w, buf, grads, hp, t):
        momentum = self.mom_fn(hp, t) if self.use_momentum else 0.0
        return _sgd_step(w, buf, grads, self.lr_fn(hp, t), momentum)

    def check_outer(self, value) -> torch.Tensor:
        value = check_scalar_loss(_WHERE, "outer_loss", value)
        check_loss_dtype(_WHERE, "outer_loss", value, self.dtype)
        return value

    def check_inner(self, value) -> torch.Tensor:
        value = check_scalar_loss(_WHERE, "inner_loss", value)
        check_loss_dtype(_WHERE, "inner_loss", value, self.dtype)
        return value


def _reverse(run: _Unroll, w, buf):
    """Reverse-HG: build the graph of every step (``create_graph``), one backward at the end."""
    keys = list(w)
    hp = {k: v.detach().requires_grad_(True) for k, v in run.hparams.items()}
    with torch.enable_grad():
        w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        w = {
            k: v if v.requires_grad else v.requires_grad_(True)
            for k, v in run.initial(w, hp).items()
        }
        for t in range(run.start, run.steps):
            loss = run.loss_at(t)(w, hp)
            if t == run.start:
                run.check_inner(loss)
            try:
                grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            except RuntimeError as err:
                reraise_compiled_double_backward(_WHERE, err)
                raise
            g = dict(zip(keys, grads))
            w, buf = run.step(w, buf, g, hp, t)
        value = run.check_outer(run.outer_loss(w, hp))
        try:
            grads = torch.autograd.grad(value, list(hp.values()), allow_unused=True)
        except RuntimeError as err:
            reraise_compiled_double_backward(_WHERE, err)
            raise
    unused = [k for k, g in zip(hp, grads) if g is None]
    if unused:
        raise ignored_hparam_error(_WHERE, unused, implicit=False)
    result = {k: g.detach() for k, g in zip(hp, grads)}
    return result, {k: v.detach() for k, v in w.items()}


def _check_forward_basis(hparams, dtype) -> None:
    """Refuse a forward-mode basis (one row per scalar hyperparameter) over the limit."""
    total = tree_size(hparams)
    need = total * total * torch.empty((), dtype=dtype).element_size()
    if need > FORWARD_BASIS_LIMIT_BYTES:
        raise HypergradientError(
            f"{_WHERE}: mode='forward' runs one JVP per scalar hyperparameter from an identity "
            f"basis of their number: {total:,} hyperparameters need a {total:,} x {total:,} "
            f"{str(dtype).removeprefix('torch.')} basis of {need / 2**30:.3g} GiB (limit "
            f"{FORWARD_BASIS_LIMIT_BYTES / 2**30:.3g} GiB) and {total:,} JVP passes. Use "
            f"mode='reverse' (or 'reversible') for many hyperparameters; forward mode is for "
            f"a few."
        )


def _forward(run: _Unroll, w0, buf0, chunk_size):
    """Forward-HG: one JVP of the whole run per scalar hyperparameter, batched by vmap."""
    w0 = {k: v.detach() for k, v in w0.items()}
    buf0 = None if buf0 is None else {k: v.detach() for k, v in buf0.items()}
    primal = {k: v.detach() for k, v in run.hparams.items()}
    # Validate the losses once on plain tensors (clear errors before torch.func tracing).
    run.check_inner(run.loss_at(run.start)(w0, primal))

    def objective(hp):
        w, buf = run.initial(w0, hp), buf0
        for t in range(run.start, run.steps):
            w, buf = run.step(w, buf, func_grad(run.loss_at(t))(w, hp), hp, t)
        return run.outer_loss(w, hp), w

    value, w_final = objective(primal)
    run.check_outer(value)

    def directional(direction):
        tangent = tree_unflatten_vector(direction, primal)
        return jvp(lambda h: objective(h)[0], (primal,), (tangent,))[1]

    total = tree_size(primal)
    basis = torch.eye(total, dtype=run.dtype, device=next(iter(primal.values())).device)
    # vmap over jvp can hand back the tangent of a 0-dim loss scaled by a Python float in
    # float64 (torch 2.13, float32 inputs): the hypergradient keeps the problem's dtype
    flat = vmap(directional, chunk_size=chunk_size)(basis).reshape(total).to(run.dtype)
    result = tree_detach(tree_unflatten_vector(flat, primal))
    # An all-zero tangent is how forward mode shows an unused hyperparameter; tell it apart
    # from a true zero gradient with one structural reverse pass, only in that rare case.
    zero_keys = [k for k in primal if not bool(result[k].any())]
    if zero_keys:
        _check_usage_reverse(run, w0, buf0, zero_keys)
    return result, {k: v.detach() for k, v in w_final.items()}


def _check_usage_reverse(run: _Unroll, w, buf, keys):
    """Raise if ``keys`` are structurally unused (a real zero gradient is allowed)."""
    try:
        _reverse(run, w, buf)
    except HypergradientError as err:
        if any(repr(k) in str(err) for k in keys):
            raise
