r"""SGD (with momentum), Adam, AdaGrad and RMSProp as stackable, hyper-optimizable levels.

Each class equals its ``torch.optim`` namesake step for step (the update rules are the
differentiable ones of :mod:`hypergradient.diffopt`, tested against ``torch.optim``) as long
as nothing tunes it, and exposes some of its hyperparameters to the level above:

============  ==========================================  =======================
class         tunable (``tune=`` names)                   tuned by default
============  ==========================================  =======================
``SGD``       ``lr``, ``momentum``                        ``lr`` (+ ``momentum`` if != 0)
``Adam``      ``lr``, ``beta1``, ``beta2``                all three (as the paper)
``AdaGrad``   ``lr``                                      ``lr``
``RMSProp``   ``lr``, ``alpha``, ``momentum``             ``lr``, ``alpha`` (+ ``momentum`` if != 0)
============  ==========================================  =======================

Weight decay, ``eps``, dampening, ``lr_decay`` and the accumulator's initial value stay
fixed: the look-ahead hypergradient of the *training* loss would only drive a weight decay
to zero, and the others are numerical guards.  Square roots are :func:`safe_sqrt`: a
gradient entry that is exactly zero makes a second moment exactly zero, and the derivative
of ``sqrt`` there (needed for ``d update / d beta2``) would otherwise be NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ... import diffopt as optim
from ..._errors import HypergradientError
from ...diffopt import AdagradState, AdamState, RMSPropState, SGDState
from ...diffopt._base import GradientTransformation
from ._base import _OPEN_MARGIN, NONNEGATIVE, UNIT_CLOSED, UNIT_OPEN, AbstractTowerOptimizer
from ._base import Tunable as _T

__all__ = ["SGD", "AdaGrad", "Adam", "RMSProp"]

_BELOW_ONE = 1.0 - _OPEN_MARGIN
Params = Iterable[Any] | None
Hyper = AbstractTowerOptimizer | None
Tune = str | Sequence[str] | None


class SGD(AbstractTowerOptimizer):
    r"""SGD with optional momentum (``torch.optim.SGD``), hyper-optimizable.

    .. math::
        g \leftarrow g_t + \lambda w, \quad
        b_t = \mu b_{t-1} + (1 - \tau) g \ (b_1 = g), \quad
        u_t = -\gamma\,(g + \mu b_t \text{ if nesterov else } b_t)

    (without momentum :math:`u_t = -\gamma g`).

    Args:
        params: the model's parameters (or param-group dicts) for the base of a tower;
            ``None`` (default) for a hyper-optimizer, passed as ``optimizer=`` below.
        lr: learning rate :math:`\gamma \ge 0` (a hyper-optimizer's lr is the *hyper*
            learning rate: its step on the hyperparameters of the level below).
        momentum: :math:`\mu \in [0, 1)`; ``0`` disables the buffer unless tuned.
        dampening: :math:`\tau \in [0, 1]`.
        weight_decay: L2 coefficient :math:`\lambda \ge 0` (fixed).
        nesterov: Nesterov momentum (needs momentum > 0, dampening 0).
        optimizer: the hyper-optimizer (a towers optimizer built without params) that
            tunes this one's hyperparameters named in ``tune``; ``None``: they stay fixed.
        tune: hyperparameters the hyper-optimizer tunes: ``"lr"`` and/or ``"momentum"``;
            default ``("lr",)``, plus ``"momentum"`` when it is non-zero.  Tuned values are
            projected: ``lr >= 0``, ``momentum`` in ``[0, 1 - 1e-6]``.

    Example (the learning rate grows while consecutive gradients agree; by Baydin's rule
    :math:`\gamma \leftarrow \gamma + \kappa\, g_t \cdot g_{t-1}`):

        Examples:
            >>> import torch
            >>> from hypergradient.optimizers import towers
            >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
            >>> opt = towers.SGD([w], lr=0.1, optimizer=towers.SGD(lr=0.01))
            >>> for _ in range(3):
            ...     opt.zero_grad()
            ...     (w ** 2).sum().backward()
            ...     opt.step()
            >>> round(opt.param_groups[0]["lr"], 4)  # 0.1 + 0.01 * (16 + 6.144)
            0.3214
    """

    TUNABLE = {"lr": _T("lr", None, math.inf), "momentum": _T("momentum", None, _BELOW_ONE)}
    _STATE_CLS = SGDState
    _NUMBERS = {"lr": NONNEGATIVE, "momentum": UNIT_OPEN, "dampening": UNIT_CLOSED,
                "weight_decay": NONNEGATIVE}  # fmt: skip
    _FLAGS = ("nesterov",)

    def __init__(
        self,
        params: Params = None,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        optimizer: Hyper = None,
        tune: Tune = None,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov}  # fmt: skip
        super().__init__(params, defaults, optimizer=optimizer, tune=tune)

    def _default_tune(self, defaults: Mapping[str, Any]) -> tuple[str, ...]:
        momentum = defaults["momentum"]
        return ("lr", "momentum") if _nonzero(momentum) else ("lr",)

    def _check_extra(self, group: Mapping[str, Any], where: str) -> None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise HypergradientError(
                f"{where}: nesterov=True needs momentum > 0 and dampening == 0, got "
                f"momentum={group['momentum']!r}, dampening={group['dampening']!r}. Set "
                f"momentum (e.g. 0.9) and dampening=0, or nesterov=False."
            )

    def _bounds(self, group: Mapping[str, Any], name: str) -> tuple[float, float]:
        if name == "momentum" and group["nesterov"]:  # Nesterov is undefined at momentum 0
            return _OPEN_MARGIN, _BELOW_ONE
        return super()._bounds(group, name)

    def _rule(self, h: Mapping[str, Any]) -> GradientTransformation:
        return optim.sgd(lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
                         nesterov=h["nesterov"], weight_decay=h["weight_decay"])  # fmt: skip


class Adam(AbstractTowerOptimizer):
    r"""Adam (``torch.optim.Adam``, optionally AMSGrad), hyper-optimizable.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \quad
        u_t = -\frac{\gamma}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

    with :math:`g = g_t + \lambda w`.

    Args:
        params: the model's parameters for the base of a tower; ``None`` (default) for a
            hyper-optimizer.
        lr: learning rate :math:`\gamma \ge 0`.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon \ge 0` (fixed).
        weight_decay: L2 coefficient :math:`\lambda \ge 0` (fixed).
        amsgrad: use the running maximum of :math:`v_t`.
        optimizer: the hyper-optimizer tuning this one (see :class:`SGD`).
        tune: any of ``"lr"``, ``"beta1"``, ``"beta2"`` (default: all three, as the
            paper).  Tuned betas are projected into ``[0, 1 - 1e-6]``, ``lr`` to ``>= 0``.

    Example (a hyper-Adam on top: each hyper-step moves ``lr`` by about its own lr):

        Examples:
            >>> import torch
            >>> from hypergradient.optimizers import towers
            >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
            >>> opt = towers.Adam([w], lr=0.1, tune="lr", optimizer=towers.Adam(lr=0.01))
            >>> for _ in range(3):
            ...     opt.zero_grad()
            ...     (w ** 2).sum().backward()
            ...     opt.step()
            >>> round(opt.param_groups[0]["lr"], 3)  # two hyper-steps of about +0.01
            0.12
    """

    TUNABLE = {"lr": _T("lr", None, math.inf), "beta1": _T("betas", 0, _BELOW_ONE),
               "beta2": _T("betas", 1, _BELOW_ONE)}  # fmt: skip
    _STATE_CLS = AdamState
    _NUMBERS = {"lr": NONNEGATIVE, "betas[0]": UNIT_OPEN, "betas[1]": UNIT_OPEN,
                "eps": NONNEGATIVE, "weight_decay": NONNEGATIVE}  # fmt: skip
    _FLAGS = ("amsgrad",)

    def __init__(
        self,
        params: Params = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        optimizer: Hyper = None,
        tune: Tune = None,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "amsgrad": amsgrad}  # fmt: skip
        super().__init__(params, defaults, optimizer=optimizer, tune=tune)

    def _rule(self, h: Mapping[str, Any]) -> GradientTransformation:
        return optim.adam(lr=h["lr"], betas=tuple(h["betas"]), eps=h["eps"],
                          weight_decay=h["weight_decay"], amsgrad=h["amsgrad"])  # fmt: skip


class AdaGrad(AbstractTowerOptimizer):
    r"""AdaGrad (``torch.optim.Adagrad``), hyper-optimizable.

    .. math::
        S_t = S_{t-1} + g^2, \quad
        u_t = -\frac{\gamma}{1 + (t-1)\eta}\,\frac{g}{\sqrt{S_t} + \epsilon}

    with :math:`g = g_t + \lambda w` and :math:`S_0` = ``initial_accumulator_value``.

    Args:
        params: the model's parameters for the base of a tower; ``None`` (default) for a
            hyper-optimizer.
        lr: learning rate :math:`\gamma \ge 0` (the only tunable one: ``tune=("lr",)``).
        lr_decay: :math:`\eta \ge 0` (fixed).
        weight_decay: :math:`\lambda \ge 0` (fixed).
        initial_accumulator_value: :math:`S_0 \ge 0` (fixed).
        eps: :math:`\epsilon \ge 0` (fixed).
        optimizer: the hyper-optimizer tuning ``lr`` (see :class:`SGD`).
        tune: ``("lr",)`` (default) or ``()``.

    Examples:
        >>> import torch
        >>> from hypergradient.optimizers import towers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = towers.AdaGrad([w], lr=0.1, optimizer=towers.SGD(lr=0.01))
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     (w ** 2).sum().backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"] > 0.1
        True
    """

    TUNABLE = {"lr": _T("lr", None, math.inf)}
    _STATE_CLS = AdagradState
    _NUMBERS = {"lr": NONNEGATIVE, "lr_decay": NONNEGATIVE, "weight_decay": NONNEGATIVE,
                "initial_accumulator_value": NONNEGATIVE, "eps": NONNEGATIVE}  # fmt: skip

    def __init__(
        self,
        params: Params = None,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        optimizer: Hyper = None,
        tune: Tune = None,
    ) -> None:
        defaults = {"lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay,
                    "initial_accumulator_value": initial_accumulator_value, "eps": eps}  # fmt: skip
        super().__init__(params, defaults, optimizer=optimizer, tune=tune)

    def _rule(self, h: Mapping[str, Any]) -> GradientTransformation:
        return optim.adagrad(lr=h["lr"], lr_decay=h["lr_decay"], weight_decay=h["weight_decay"],
                             initial_accumulator_value=h["initial_accumulator_value"],
                             eps=h["eps"])  # fmt: skip


class RMSProp(AbstractTowerOptimizer):
    r"""RMSProp (``torch.optim.RMSprop``, optionally centered, with momentum), hyper-optimizable.

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g^2, \quad
        s_t = \sqrt{v_t - \bar g_t^2} + \epsilon, \quad
        u_t = -\gamma\, b_t,\ b_t = \mu b_{t-1} + g / s_t

    (:math:`\bar g_t` the running mean of :math:`g` if centered, else 0; without momentum
    :math:`u_t = -\gamma g / s_t`; :math:`g = g_t + \lambda w`).

    Args:
        params: the model's parameters for the base of a tower; ``None`` (default) for a
            hyper-optimizer.
        lr: learning rate :math:`\gamma \ge 0`.
        alpha: smoothing constant :math:`\alpha \in [0, 1)`.
        eps: :math:`\epsilon \ge 0` (fixed).
        weight_decay: :math:`\lambda \ge 0` (fixed).
        momentum: :math:`\mu \in [0, 1)`; ``0`` disables the buffer unless tuned.
        centered: normalise by the running variance instead of the second moment.
        optimizer: the hyper-optimizer tuning this one (see :class:`SGD`).
        tune: any of ``"lr"``, ``"alpha"``, ``"momentum"``; default ``("lr", "alpha")``
            plus ``"momentum"`` when it is non-zero.  Tuned ``alpha`` and ``momentum`` are
            projected into ``[0, 1 - 1e-6]``, ``lr`` to ``>= 0``.

    Examples:
        >>> import torch
        >>> from hypergradient.optimizers import towers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = towers.RMSProp([w], lr=0.01, optimizer=towers.SGD(lr=1e-4))
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     (w ** 2).sum().backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"] > 0.01
        True
    """

    TUNABLE = {"lr": _T("lr", None, math.inf), "alpha": _T("alpha", None, _BELOW_ONE),
               "momentum": _T("momentum", None, _BELOW_ONE)}  # fmt: skip
    _STATE_CLS = RMSPropState
    _NUMBERS = {"lr": NONNEGATIVE, "alpha": UNIT_OPEN, "eps": NONNEGATIVE,
                "weight_decay": NONNEGATIVE, "momentum": UNIT_OPEN}  # fmt: skip
    _FLAGS = ("centered",)

    def __init__(
        self,
        params: Params = None,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        optimizer: Hyper = None,
        tune: Tune = None,
    ) -> None:
        defaults = {"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay,
                    "momentum": momentum, "centered": centered}  # fmt: skip
        super().__init__(params, defaults, optimizer=optimizer, tune=tune)

    def _default_tune(self, defaults: Mapping[str, Any]) -> tuple[str, ...]:
        extra = ("momentum",) if _nonzero(defaults["momentum"]) else ()
        return ("lr", "alpha", *extra)

    def _rule(self, h: Mapping[str, Any]) -> GradientTransformation:
        return optim.rmsprop(lr=h["lr"], alpha=h["alpha"], eps=h["eps"],
                             weight_decay=h["weight_decay"], momentum=h["momentum"],
                             centered=h["centered"])  # fmt: skip


def _nonzero(value: object) -> bool:
    # runs before the options are checked: a bad value is reported by the checks instead
    return not (isinstance(value, (int, float)) and value == 0)
