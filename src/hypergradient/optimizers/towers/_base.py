r"""The machinery of hyper-optimizer towers: one ``torch.optim.Optimizer`` per level.

A *tower* of height :math:`H` is a chain of levels :math:`0, \dots, H-1`.  Level 0 updates
the model's weights :math:`w`; level :math:`k \ge 1` updates the tuned hyperparameters
:math:`h_{k-1}` of level :math:`k-1` (its learning rate, momentum, betas, ...); the
hyperparameters :math:`h_{H-1}` of the top level are fixed.  Every level is an ordinary
first-order optimizer :math:`u = \mathrm{rule}(g, s; h)` (SGD, Adam, ...; ``s`` its state).

**Step** :math:`t` (Chandra et al. 2022; Baydin et al. 2018 for :math:`H = 2`).  The user has
computed :math:`g_t = \nabla_w L_t(w_t)` with a plain ``loss.backward()``.  The previous
step moved the weights by :math:`w_t = w_{t-1} + u_0(h_0^{(t-1)})`, where everything but
the hyperparameters is detached (the old weights, gradient and optimizer state), and
built the hyperparameters top-down the same way,
:math:`h_k^{(t-1)} = \Pi_k\big(\bar h_k + u_{k+1}(h_{k+1}^{(t-1)})\big)` (:math:`\bar h_k`
the detached value before that update, :math:`\Pi_k` the projection onto the allowed
range).  That graph is kept, and only it, so

.. math::
    \frac{\partial L_t}{\partial h_0^{(t-1)}} = g_t \cdot
        \frac{\partial u_0}{\partial h_0^{(t-1)}}, \qquad
    \frac{\partial L_t}{\partial h_{k}^{(t-1)}} = \frac{\partial L_t}{\partial h_{k-1}^{(t-1)}}
        \frac{\partial h_{k-1}^{(t-1)}}{\partial h_k^{(t-1)}}

(for SGD: :math:`\partial L_t / \partial \mathrm{lr} = -g_t \cdot g_{t-1}`) come out of ONE
reverse pass ``autograd.grad(u_0, [h_0, ..., h_{H-2}], grad_outputs=g_t)``.  Then, from the
top down, level :math:`k+1` updates :math:`h_k` with its freshly updated :math:`h_{k+1}`,
and level 0 updates the weights *in place* with :math:`h_0^{(t)}`.  Each level's
hypergradient therefore looks one step back, as in the paper.

Why this shape: the weights stay ordinary leaf ``nn.Parameter`` s updated in place, so the
user's loop is the usual ``zero_grad(); loss.backward(); step()`` (no ``create_graph``, no
module surgery) and ``torch.optim.lr_scheduler`` works on ``param_groups``.  Held between
steps, on top of what ``torch.optim`` keeps (the optimizer state): the last update, a copy of
the last gradient, the state before the last step and what the update rule saves for its
backward.  Measured (10M-weight model, RSS): SGD +2 model sizes, SGD with momentum +3, Adam
+5 tuning ``lr`` only, +8 tuning ``lr`` and the betas; independent of the height :math:`H`.

**Hyperparameter values.**  ``param_groups`` hold plain Python floats, as in
``torch.optim``; a step reads them (so a scheduler's or a user's change is honoured), updates
them and writes them back (reading scalars back from an accelerator costs a few small
synchronisations per step: the write-back, the NaN check and the rules' range checks).  Tuned
values are projected after each update: ``lr >= 0``; momentum, Adam's betas and RMSProp's
``alpha`` into ``[0, 1 - 1e-6]``.  We project instead of reparametrising (the paper maps
the betas through ``(tanh(x) + 1) / 2``) because the hyper-learning rate then keeps its
meaning (an additive step on the value itself: the paper's ``lr`` tower) and a tower whose
hyper-learning rates are zero is the plain optimizer step for step (to one rounding per
step: ``torch.optim`` fuses ``p.add_(d, alpha=-lr)``, we add ``-lr * d``).

**Cost per step**: the update rules of all levels (the tuned scalars are few), one reverse
pass through the last weight update (about one extra elementwise pass over the model for
SGD; a few for Adam) and a copy of the gradient; no second-order derivative of the loss is
ever taken.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch

from ..._errors import HypergradientError
from ...diffopt._base import GradientTransformation, detach_state

# Tuned scalars that must stay below 1 (momentum, betas, RMSProp's alpha) are projected into
# [0, 1 - _OPEN_MARGIN]: 1 itself would freeze a moving average (Adam's bias correction
# divides by 1 - beta^t = 0) and 1e-6 still admits beta2 = 0.999999.
_OPEN_MARGIN = 1e-6

__all__ = ["AbstractTowerOptimizer", "Tunable", "stack"]


class Tunable(NamedTuple):
    """A scalar hyperparameter of a param group that the level above may tune.

    Attributes:
        key: the param-group key holding it (``"lr"``, ``"betas"``, ...).
        index: its position when the key holds a tuple (``betas``), else ``None``.
        high: the largest value the projection keeps (``inf`` for learning rates).

    Examples:
        >>> from hypergradient.optimizers import towers
        >>> spec = towers.Adam.TUNABLE["beta1"]  # Adam's beta1 is param_groups[i]["betas"][0]
        >>> spec
        Tunable(key='betas', index=0, high=0.999999)
        >>> spec.label, towers.SGD.TUNABLE["lr"].high
        ('betas[0]', inf)
    """

    key: str
    index: int | None
    high: float

    @property
    def label(self) -> str:
        return self.key if self.index is None else f"{self.key}[{self.index}]"


class _Range(NamedTuple):
    """Allowed values of a numeric option: ``low <= x < high`` (``<=`` if not high_open)."""

    low: float
    high: float = math.inf
    high_open: bool = True

    def __contains__(self, x: float) -> bool:
        return self.low <= x and (x < self.high if self.high_open else x <= self.high)

    def __str__(self) -> str:
        hi = "inf" if math.isinf(self.high) else f"{self.high:g}"
        return f"[{self.low:g}, {hi}{')' if self.high_open else ']'}"


NONNEGATIVE = _Range(0.0)
UNIT_OPEN = _Range(0.0, 1.0)
UNIT_CLOSED = _Range(0.0, 1.0, high_open=False)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _hparam_dtype(device: torch.device) -> torch.dtype:
    # Hyperparameters and hypergradients are scalars: float64 costs nothing and keeps
    # products of tiny hypergradients (g_t . g_{t-1} ~ 1e-8) exact.  MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


class AbstractTowerOptimizer(torch.optim.Optimizer, abc.ABC):
    r"""A ``torch.optim.Optimizer`` whose hyperparameters can be tuned online by another one.

    Built **with** ``params`` it is the base of a tower (level 0) and optimizes the model;
    built **without** ``params`` it is a hyper-optimizer, to be passed as ``optimizer=`` of
    the level below, and optimizes that level's tuned hyperparameters.  Stack as high as you
    like::

        opt = towers.SGD(model.parameters(), lr=0.01,
                         optimizer=towers.Adam(lr=1e-3, optimizer=towers.SGD(lr=1e-5)))
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()   # no create_graph needed
            opt.step()

    or ``towers.stack([towers.SGD(model.parameters(), lr=0.01), towers.Adam(lr=1e-3),
    towers.SGD(lr=1e-5)])``.  Call ``step()`` / ``zero_grad()`` / ``state_dict()`` on the base
    only; ``opt.levels`` lists the levels (``opt.levels[k].param_groups[0]["lr"]`` is the
    current learning rate of level ``k``).  See :mod:`hypergradient.optimizers.towers._base` for the
    algorithm.

    Attributes:
        levels: ``(base, its hyper-optimizer, ...)``, bottom to top.
        last_hypergradients: per param group, ``{name: float | None}``: the derivative of
            the latest loss with respect to each tuned hyperparameter of this level, as
            used by the latest ``step()`` (``None`` before it exists: a level receives its
            first hypergradient at step ``k + 2``).
        hparams: per param group, ``{name: float}`` for every tunable hyperparameter.

    Subclasses define the update rule (:meth:`_rule`), the tunable hyperparameters
    (``TUNABLE``), the functional state class and the option checks.

    Examples:
        SGD's learning rate tuned by SGD on :math:`L = \tfrac12\lVert w\rVert^2`, whose gradient is
        :math:`g_t = w_t`; the hypergradient of step 2 is :math:`-g_2 \cdot g_1`:

        >>> import torch
        >>> from hypergradient.optimizers import towers
        >>> w = torch.ones(2, requires_grad=True)
        >>> opt = towers.SGD([w], lr=0.1, optimizer=towers.SGD(lr=0.01))  # level 1 tunes lr
        >>> for _ in range(2):
        ...     opt.zero_grad()
        ...     (0.5 * (w**2).sum()).backward()
        ...     opt.step()
        >>> isinstance(opt, towers.AbstractTowerOptimizer), len(opt.levels), opt.tune
        (True, 2, ('lr',))
        >>> round(opt.last_hypergradients[0]["lr"], 4)  # -(0.9 * 1 + 0.9 * 1)
        -1.8
        >>> round(opt.hparams[0]["lr"], 4)  # 0.1 - 0.01 * (-1.8)
        0.118
    """

    TUNABLE: ClassVar[Mapping[str, Tunable]]
    _STATE_CLS: ClassVar[type]
    _NUMBERS: ClassVar[Mapping[str, _Range]]  # every numeric option (labels like "betas[0]")
    _FLAGS: ClassVar[tuple[str, ...]] = ()  # every boolean option

    def __init__(
        self,
        params: Iterable[Any] | None,
        defaults: dict[str, Any],
        *,
        optimizer: AbstractTowerOptimizer | None,
        tune: str | Sequence[str] | None,
    ) -> None:
        self._where = f"hypergradient.optimizers.towers.{type(self).__name__}"
        self._is_base = params is not None
        self._hyper: AbstractTowerOptimizer | None = None
        self._lower: AbstractTowerOptimizer | None = None
        self._slot_keys: list[tuple[int, str]] = []  # (group index, name) per tuned scalar
        # 0-d tensors mirroring the tuned values: the `params` of the level above (its
        # param_groups[0]["params"] IS this list, so groups added later join it)
        self._slots: list[torch.Tensor] = []
        self._device: torch.device | None = None
        self._pending: list[Any] | None = None  # graph of the last update (not saved)
        self._record: dict[str, Any] | None = None  # its detached inputs (saved)
        self.last_hypergradients: list[dict[str, float | None]] = []
        self._tune = self._check_tune(tune, defaults)
        groups = self._check_params(params) if params is not None else [{"params": []}]
        super().__init__(groups, defaults)
        if optimizer is not None:
            self._set_hyper(optimizer)

    # ------------------------------------------------------------------ to define per rule

    @abc.abstractmethod
    def _rule(self, h: Mapping[str, Any]) -> GradientTransformation:
        """The functional update rule of one param group.

        ``h`` holds the group's options under their ``param_groups`` keys; tuned scalars
        are 0-d tensors (differentiable), the rest Python values.  The returned
        transformation's updates must be differentiable in those tensors and equal the
        matching ``torch.optim`` step when they hold the same values.
        """

    def _default_tune(self, defaults: Mapping[str, Any]) -> tuple[str, ...]:
        """What a hyper-optimizer tunes when ``tune`` is not given: every tunable name."""
        return tuple(self.TUNABLE)

    def _check_extra(self, group: Mapping[str, Any], where: str) -> None:
        """Checks that involve several options (e.g. Nesterov needs momentum)."""

    def _bounds(self, group: Mapping[str, Any], name: str) -> tuple[float, float]:
        """The projection interval of a tuned hyperparameter."""
        return 0.0, self.TUNABLE[name].high

    # ------------------------------------------------------------------ public views

    @property
    def levels(self) -> tuple[AbstractTowerOptimizer, ...]:
        bottom = self
        while bottom._lower is not None:
            bottom = bottom._lower
        out = []
        level: AbstractTowerOptimizer | None = bottom
        while level is not None:
            out.append(level)
            level = level._hyper
        return tuple(out)

    @property
    def hparams(self) -> list[dict[str, float]]:
        return [{name: self._read(g, name) for name in self.TUNABLE} for g in self.param_groups]

    @property
    def tune(self) -> tuple[str, ...]:
        """The names of this level's hyperparameters that the level above tunes."""
        return self._tune

    # ------------------------------------------------------------------ construction

    def _check_params(self, params: Iterable[Any]) -> list[Any]:
        if isinstance(params, torch.Tensor):
            raise HypergradientError(
                f"{self._where}(params, ...): `params` must be an iterable of tensors or of "
                f"param-group dicts, got a single tensor. Pass `[tensor]` or "
                f"`model.parameters()`."
            )
        try:
            groups = list(params)
        except TypeError:
            raise HypergradientError(
                f"{self._where}(params, ...): `params` must be an iterable of tensors or of "
                f"param-group dicts, got {type(params).__name__}. Pass `model.parameters()`; "
                f"build a hyper-optimizer (one that tunes another optimizer) without params."
            ) from None
        if not groups:
            raise HypergradientError(
                f"{self._where}(params, ...): `params` is empty. Pass the tensors to "
                f"optimize (e.g. `model.parameters()` of a model with parameters)."
            )
        return groups

    def _check_number(self, where: str, label: str, value: object, allowed: _Range) -> None:
        if not _is_number(value):
            raise HypergradientError(
                f"{where}: `{label}` must be a Python float, got {type(value).__name__} "
                f"{value!r}. Pass a number such as 0.1 (tuned values are held as floats in "
                f"param_groups; a tensor is not accepted)."
            )
        if not math.isfinite(value) or value not in allowed:
            raise HypergradientError(
                f"{where}: `{label}` must be in {allowed}, got {value!r}. Pass a value in "
                f"{allowed}."
            )

    def _option(self, group: Mapping[str, Any], label: str) -> object:
        key, _, rest = label.partition("[")
        value = group[key]
        return value[int(rest[:-1])] if rest else value

    def _check_options(self, group: Mapping[str, Any], where: str) -> None:
        if "betas" in group:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise HypergradientError(
                    f"{where}: `betas` must be a pair (beta1, beta2), got {betas!r}. Pass "
                    f"e.g. betas=(0.9, 0.999)."
                )
        for label, allowed in self._NUMBERS.items():
            self._check_number(where, label, self._option(group, label), allowed)
        for flag in self._FLAGS:
            if not isinstance(group[flag], bool):
                raise HypergradientError(
                    f"{where}: `{flag}` must be a bool, got {type(group[flag]).__name__} "
                    f"{group[flag]!r}."
                )
        self._check_extra(group, where)

    def _check_tune(self, tune: object, defaults: Mapping[str, Any]) -> tuple[str, ...]:
        if tune is None:
            return self._default_tune(defaults)
        names = (tune,) if isinstance(tune, str) else tune
        if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
            raise HypergradientError(
                f"{self._where}(..., tune={tune!r}): `tune` must be a tuple of names from "
                f"{tuple(self.TUNABLE)}, e.g. tune=('lr',)."
            )
        for name in names:
            if name not in self.TUNABLE:
                raise HypergradientError(
                    f"{self._where}(..., tune={tune!r}): unknown hyperparameter {name!r}; "
                    f"{type(self).__name__} can tune {tuple(self.TUNABLE)}."
                )
        if len(set(names)) != len(names):
            raise HypergradientError(
                f"{self._where}(..., tune={tune!r}): a name appears twice; list each "
                f"hyperparameter once."
            )
        return tuple(names)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` plus checks; tuned scalars of the new
        group are handed to the hyper-optimizer (their hypergradients start next step)."""
        if getattr(self, "param_groups", None) and not self._is_base:
            raise HypergradientError(
                f"{self._where}.add_param_group: a hyper-optimizer has exactly one param "
                f"group (its own hyperparameters); add groups to the tower's base optimizer."
            )
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        where = f"{self._where}: param group {index}" if index else f"{self._where}(...)"
        try:
            self._check_options(group, where)
            for name in self._tune:
                low, high = self._bounds(group, name)
                value = self._read(group, name)
                if not low <= value <= high:
                    raise HypergradientError(
                        f"{where}: `{self.TUNABLE[name].label}` = {value!r} is tuned "
                        f"(tune={self._tune}) and the tower keeps it in [{low:g}, {high:g}]; "
                        f"pass a value in that range or leave {name!r} out of `tune`."
                    )
        except HypergradientError:
            self.param_groups.pop()
            raise
        if self._device is None and group["params"]:
            self._device = group["params"][0].device
        device = self._device or torch.device("cpu")
        for name in self._tune:
            self._slot_keys.append((index, name))
            value = self._read(group, name)
            self._slots.append(torch.tensor(value, dtype=_hparam_dtype(device), device=device))

    def _set_hyper(self, hyper: object) -> None:
        where = f"{self._where}(..., optimizer=...)"
        if not isinstance(hyper, AbstractTowerOptimizer):
            raise HypergradientError(
                f"{where}: `optimizer` must be a hypergradient.optimizers.towers optimizer built "
                f"without params (e.g. towers.SGD(lr=1e-4)), got {type(hyper).__module__}."
                f"{type(hyper).__name__}. A torch.optim optimizer cannot tune hyperparameters."
            )
        if hyper._is_base:
            raise HypergradientError(
                f"{where}: the hyper-optimizer {type(hyper).__name__} was built with params; "
                f"it tunes this optimizer's hyperparameters, so build it without params, "
                f"e.g. towers.{type(hyper).__name__}(lr=1e-4)."
            )
        if hyper._lower is not None:
            raise HypergradientError(
                f"{where}: this {type(hyper).__name__} already tunes another optimizer; build "
                f"a new hyper-optimizer for each tower."
            )
        if any(level is self for level in hyper.levels):
            raise HypergradientError(f"{where}: an optimizer cannot tune itself.")
        if self._hyper is not None:
            raise HypergradientError(
                f"{where}: this optimizer already has a hyper-optimizer; give one `optimizer`."
            )
        if not self._tune:
            raise HypergradientError(
                f"{where}: nothing to tune (tune=()); name at least one of "
                f"{tuple(self.TUNABLE)} in `tune`, or drop `optimizer`."
            )
        self._hyper = hyper
        hyper._lower = self
        hyper.param_groups[0]["params"] = self._slots
        base = self.levels[0]
        if base._is_base and base._device is not None:
            for level in base.levels[1:]:
                level._adopt_device(base._device)

    def _adopt_device(self, device: torch.device) -> None:
        # hyper-optimizers are built before the base knows the device; nothing is stored
        # against the slots yet, so they can be replaced in place (same list object)
        self._device = device
        self._slots[:] = [s.to(device=device, dtype=_hparam_dtype(device)) for s in self._slots]

    # ------------------------------------------------------------------ values and states

    def _read(self, group: Mapping[str, Any], name: str) -> float:
        spec = self.TUNABLE[name]
        value = group[spec.key]
        return float(value if spec.index is None else value[spec.index])

    def _put(self, group: dict[str, Any], name: str, value: Any) -> None:
        spec = self.TUNABLE[name]
        if spec.index is None:
            group[spec.key] = value
        else:
            items = list(group[spec.key])
            items[spec.index] = value
            group[spec.key] = tuple(items)

    def _functional_state(
        self, state: Mapping[str, Any] | None, rule: GradientTransformation, like: torch.Tensor
    ) -> Any:
        """torch-style per-tensor state dict -> the rule's NamedTuple (fresh if None)."""
        if not state:
            return rule.init(like)
        fields = self._STATE_CLS._fields
        values = {f: state.get("step" if f == "count" else f) for f in fields}
        step = values["count"]
        if step is None:  # torch.optim.SGD keeps no step: a buffer means it has stepped
            step = int(any(v is not None for f, v in values.items() if f != "count"))
        values["count"] = torch.as_tensor(step).detach().to("cpu", torch.int64).reshape(())
        return self._STATE_CLS(**values)

    def _state_dict_of(self, state: Any) -> dict[str, torch.Tensor]:
        """The rule's NamedTuple -> a detached torch-style dict (``count`` is ``step``)."""
        state = detach_state(state)
        out = {}
        for f, v in zip(state._fields, state):
            if v is not None:
                out["step" if f == "count" else f] = v
        return out

    @staticmethod
    def _settings(group: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in group.items() if k not in ("params", "param_names")}

    # ------------------------------------------------------------------ the step

    def _check_base(self, call: str) -> None:
        if self._is_base:
            return
        if self._lower is None:
            raise HypergradientError(
                f"{self._where}.{call}: this optimizer was built without params, so it can "
                f"only tune another one: pass it as `optimizer=` of a towers optimizer built "
                f"with the model's parameters."
            )
        k = next(i for i, level in enumerate(self.levels) if level is self)
        raise HypergradientError(
            f"{self._where}.{call}: this is level {k} of a tower; call {call} on the tower's "
            f"base optimizer (`levels[0]`, the one built with the model's parameters)."
        )

    def step(self, closure: Any = None) -> Any:
        """One step of the whole tower (see the class docstring); returns ``closure()``.

        Before it: the gradients of the current loss in ``p.grad`` (``loss.backward()``, or a
        ``closure`` that zeroes the gradients, computes the loss, calls ``backward()`` and
        returns the loss).  ``backward(create_graph=True)`` is never needed: the gradients
        are read detached.
        """
        self._check_base("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        levels = self.levels
        if len(levels) == 1:
            with torch.no_grad():
                record = self._gather(levels, [], keep=False)
                out = self._forward(levels, record)
                self._apply(levels, record, out, [], [])
            return loss
        with torch.enable_grad():
            hypergrads = self._hypergradients(levels)
            record = self._gather(levels, hypergrads, keep=True)
            out = self._forward(levels, record)
        values, grads = self._sync(out, hypergrads)
        self._apply(levels, record, out, values, grads)
        self._record = record
        self._pending = [out["hparams"], out["updates"]]
        return loss

    def _flat_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _hypergradients(self, levels: Sequence[AbstractTowerOptimizer]) -> list[list[Any]]:
        """Per level ``k < H-1``, per tuned scalar of level k: dL_t/dh_k (or None)."""
        result: list[list[Any]] = [[None] * len(lv._slot_keys) for lv in levels[:-1]]
        if self._pending is None and self._record is not None:  # after load_state_dict
            out = self._forward(levels, self._record)
            self._pending = [out["hparams"], out["updates"]]
        if self._pending is None:
            return result
        hparams, updates = self._pending
        self._pending = None  # the graph is consumed by this reverse pass
        params = self._flat_params()
        outputs, cotangents = [], []
        for (_, flat, *_), update in zip(self._record["base"], updates):
            grad = params[flat].grad
            if grad is not None and update.requires_grad:
                outputs.append(update)
                cotangents.append(grad.detach())
        inputs = [h for level in hparams for h in level]
        if not outputs or not inputs:
            return result
        grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
        i = 0
        for k, level in enumerate(hparams):
            for j in range(len(level)):  # slots added since then keep None
                result[k][j] = grads[i]
                i += 1
        return result

    def _gather(
        self, levels: Sequence[AbstractTowerOptimizer], hypergrads: list, *, keep: bool
    ) -> dict[str, Any]:
        """The detached inputs of one step: everything :meth:`_forward` reads.

        With ``keep`` the gradients (and, with weight decay, the weights) are copied: the
        graph of the update must survive an in-place ``grad.zero_()`` or weight update, and
        the record must be able to rebuild it after ``load_state_dict``.
        """
        base = []
        flat = 0
        for index, group in enumerate(self.param_groups):
            decay = group.get("weight_decay", 0) != 0
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise HypergradientError(
                            f"{self._where}.step(): parameter {flat} has a sparse gradient; "
                            f"towers support dense gradients only (use a dense embedding)."
                        )
                    grad = p.grad.detach()
                    weight = p.detach() if decay else None
                    if keep:
                        grad = grad.clone()
                        weight = None if weight is None else weight.clone()
                    base.append((index, flat, grad, self.state.get(p) or None, weight))
                flat += 1
        return {
            "settings": [[self._settings(g) for g in lv.param_groups] for lv in levels],
            "hypergrads": hypergrads,
            "hyper_states": [
                [levels[k + 1].state.get(slot) or None for slot in levels[k]._slots]
                for k in range(len(levels) - 1)
            ],
            "base": base,
        }

    def _forward(
        self, levels: Sequence[AbstractTowerOptimizer], record: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Hyper-updates top-down, then the weight updates: a pure function of ``record``.

        Returns ``hparams`` (per level ``k < H-1``, the tensors h_k used, in the graph),
        ``hyper_states`` (per level k, the new states the level above keeps for h_k),
        ``updates`` and ``states`` (per entry of ``record["base"]``).
        """
        settings = record["settings"]
        height = len(levels)
        used = [[dict(s) for s in level] for level in settings]  # what each rule receives
        device = self._device or torch.device("cpu")
        dtype = _hparam_dtype(device)
        hparams: list[list[torch.Tensor]] = [[] for _ in range(height - 1)]
        hyper_states: list[list[Any]] = [list(s) for s in record["hyper_states"]]
        for k in range(height - 2, -1, -1):
            lower, upper = levels[k], levels[k + 1]
            rule = upper._rule(used[k + 1][0])
            for i, (index, name) in enumerate(lower._slot_keys):
                start = torch.tensor(lower._read(settings[k][index], name), dtype=dtype)
                start = start.to(device)
                grad = record["hypergrads"][k][i]
                if grad is None:
                    value = start.requires_grad_()
                else:
                    state = upper._functional_state(hyper_states[k][i], rule, start)
                    update, state = rule.update(grad, state, start)
                    low, high = lower._bounds(settings[k][index], name)
                    value = torch.clamp(start + update, low, high)
                    if not value.requires_grad:  # the top level's rule has float hparams
                        value.requires_grad_()
                    hyper_states[k][i] = upper._state_dict_of(state)
                lower._put(used[k][index], name, value)
                hparams[k].append(value)
            self._check_finite(levels, k, hparams[k], record["hypergrads"][k])
        rules = [self._rule(h) for h in used[0]]
        updates, states = [], []
        for index, _, grad, state, weight in record["base"]:
            rule = rules[index]
            update, new = rule.update(grad, self._functional_state(state, rule, grad), weight)
            updates.append(update)
            states.append(self._state_dict_of(new))
        return {"hparams": hparams, "hyper_states": hyper_states, "updates": updates,
                "states": states}  # fmt: skip

    def _check_finite(
        self,
        levels: Sequence[AbstractTowerOptimizer],
        k: int,
        values: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
    ) -> None:
        """Stop before a NaN/inf hyperparameter reaches the rules below (one sync)."""
        if not values or bool(torch.isfinite(torch.stack([v.detach() for v in values])).all()):
            return
        level = levels[k]
        for (index, name), value, grad in zip(level._slot_keys, values, grads):
            if not math.isfinite(float(value.detach())):
                hypergrad = None if grad is None else float(grad)
                raise HypergradientError(
                    f"{self._where}.step(): `{level.TUNABLE[name].label}` of level {k} "
                    f"(param group {index}) became {float(value.detach())} (its hypergradient "
                    f"was {hypergrad}). The loss or the tower diverged: lower the learning "
                    f"rate of level {k + 1} ({type(levels[k + 1]).__name__}) or check the "
                    f"gradients for NaN/inf."
                )

    def _sync(
        self, out: Mapping[str, Any], hypergrads: list
    ) -> tuple[list[float], list[float | None]]:
        """The new hyperparameter values and the hypergradients as floats (one sync)."""
        values_t = [h.detach() for level in out["hparams"] for h in level]
        grads_t = [g for level in hypergrads for g in level if g is not None]
        flat = torch.stack([*values_t, *grads_t]).tolist() if values_t or grads_t else []
        values, grad_values = flat[: len(values_t)], iter(flat[len(values_t) :])
        grads = [None if g is None else next(grad_values) for lv in hypergrads for g in lv]
        return values, grads

    def _apply(
        self,
        levels: Sequence[AbstractTowerOptimizer],
        record: Mapping[str, Any],
        out: Mapping[str, Any],
        values: list[float],
        grads: list[float | None],
    ) -> None:
        i = 0
        with torch.no_grad():
            for k, level in enumerate(levels[:-1]):
                level.last_hypergradients = [{} for _ in level.param_groups]
                for j, ((index, name), slot) in enumerate(zip(level._slot_keys, level._slots)):
                    level._put(level.param_groups[index], name, values[i])
                    level.last_hypergradients[index][name] = grads[i]
                    slot.fill_(values[i])
                    if out["hyper_states"][k][j] is not None:
                        levels[k + 1].state[slot] = out["hyper_states"][k][j]
                    i += 1
            levels[-1].last_hypergradients = [{} for _ in levels[-1].param_groups]
            params = self._flat_params()
            for (_, flat, *_), update, state in zip(record["base"], out["updates"], out["states"]):
                params[flat].add_(update.detach())
                self.state[params[flat]] = state

    # ------------------------------------------------------------------ (de)serialisation

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` 's state dict, plus (on a tower's base) every level's and the
        detached inputs of the last step, so that a restored tower continues bit for bit."""
        sd = super().state_dict()
        levels = self.levels
        if self._is_base and len(levels) > 1:
            sd["tower"] = {
                "levels": [type(level).__name__ for level in levels],
                "hyper": [level.state_dict() for level in levels[1:]],
                "record": self._record,
            }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._is_base:
            super().load_state_dict(state_dict)
            return
        levels = self.levels
        names = [type(level).__name__ for level in levels]
        tower = state_dict.get("tower") if isinstance(state_dict, Mapping) else None
        saved = ["(plain)"] if tower is None else list(tower.get("levels", []))
        if (tower is None) != (len(levels) == 1) or (tower is not None and saved != names):
            raise HypergradientError(
                f"{self._where}.load_state_dict: the state dict was saved from a tower "
                f"{saved} but this one is {names}; build the same tower (same optimizers, "
                f"bottom to top) before loading."
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "tower"})
        if tower is None:
            return
        for level, sd in zip(levels[1:], tower["hyper"]):
            level.load_state_dict(sd)
        with torch.no_grad():
            for level in levels[:-1]:
                for (index, name), slot in zip(level._slot_keys, level._slots):
                    slot.fill_(level._read(level.param_groups[index], name))
        self._record = self._to_device(tower["record"])
        self._pending = None  # rebuilt from the record by the next step

    def _to_device(self, record: Any) -> Any:
        if record is None:
            return None
        device = self._device or torch.device("cpu")

        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(device) if x.is_floating_point() else x
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(move(v) for v in x)
            return x

        return move(record)

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults/state/param_groups; a tower also needs its links and
        # record.  The graph of the last update is dropped (rebuilt from the record).
        state = super().__getstate__()
        own = ("_where", "_is_base", "_hyper", "_lower", "_slot_keys", "_slots", "_device",
               "_record", "_tune", "last_hypergradients")  # fmt: skip
        state.update({k: self.__dict__[k] for k in own})
        state["_pending"] = None
        return state

    def __repr__(self) -> str:
        role = "base" if self._is_base else "hyper-optimizer"
        values = ", ".join(f"{k}={v:g}" for k, v in self.hparams[0].items())
        above = f", optimizer={self._hyper!r}" if self._hyper is not None else ""
        return f"{type(self).__name__}({role}, {values}, tune={self._tune}{above})"


def stack(levels: Sequence[AbstractTowerOptimizer]) -> AbstractTowerOptimizer:
    """Stack optimizers into a tower: ``levels[k + 1]`` tunes ``levels[k]``; returns the base.

    ``stack([SGD(model.parameters(), lr=0.1), Adam(lr=1e-3), SGD(lr=1e-5)])`` is
    ``SGD(model.parameters(), lr=0.1, optimizer=Adam(lr=1e-3, optimizer=SGD(lr=1e-5)))``.

    Args:
        levels: the base optimizer (built with the model's parameters) first, then
            hyper-optimizers built without params and not yet stacked.

    Returns:
        ``levels[0]``, now a tower of height ``len(levels)``.

    Examples:
        >>> import torch
        >>> from hypergradient.optimizers import towers
        >>> model = torch.nn.Linear(2, 1)
        >>> base = towers.SGD(model.parameters(), lr=0.1)
        >>> opt = towers.stack([base, towers.Adam(lr=1e-3), towers.SGD(lr=1e-5)])
        >>> opt is base, [type(level).__name__ for level in opt.levels]
        (True, ['SGD', 'Adam', 'SGD'])
        >>> opt.levels[1].tune  # what the top SGD tunes: Adam's lr and betas
        ('lr', 'beta1', 'beta2')
    """
    where = "hypergradient.optimizers.towers.stack(levels)"
    levels = list(levels) if not isinstance(levels, AbstractTowerOptimizer) else [levels]
    if not levels:
        raise HypergradientError(f"{where}: `levels` is empty; give at least the base optimizer.")
    for i, level in enumerate(levels):
        if not isinstance(level, AbstractTowerOptimizer):
            raise HypergradientError(
                f"{where}: levels[{i}] must be a hypergradient.optimizers.towers optimizer, got "
                f"{type(level).__name__}."
            )
        if level._hyper is not None or level._lower is not None:
            raise HypergradientError(
                f"{where}: levels[{i}] ({type(level).__name__}) is already part of a tower; "
                f"give fresh optimizers."
            )
    if not levels[0]._is_base:
        raise HypergradientError(
            f"{where}: levels[0] must be built with the model's parameters, e.g. "
            f"towers.SGD(model.parameters(), lr=0.1)."
        )
    # top-down, so that the base adopts a complete chain (and moves it to its device)
    for k in range(len(levels) - 2, -1, -1):
        levels[k]._set_hyper(levels[k + 1])
    return levels[0]
