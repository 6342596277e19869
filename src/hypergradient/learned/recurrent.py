r"""A component-wise GRU learned optimizer (Maheswaranathan et al. 2021).

Every parameter component :math:`w_j` carries its own hidden state
:math:`h_j \in \mathbb R^H` and one GRU cell (weights shared by all components) reads the
component's gradient:

.. math::

    x &= c\, g_j \\
    r &= \sigma(W_r x + U_r h + b_r), \quad z = \sigma(W_z x + U_z h + b_z) \\
    \tilde h &= \tanh(W_n x + r \odot (U_n h) + b_n) \\
    h_j' &= (1 - z) \odot \tilde h + z \odot h_j, \qquad
    \Delta w_j = a\, w_{\text{out}}^\top h_j',

with the input scale :math:`c` (``input_scale``) and the step multiplier :math:`a`
(``scale_dir``).  Nothing couples the components: the optimizer is a state-space system
:math:`(h, g) \mapsto (h', \Delta)` per component, the object the reverse-engineering tools
of :mod:`hypergradient.learned.analysis` linearise (:meth:`GRULearnedOptimizer.cell`).

It is an :class:`~hypergradient.learned.AbstractLearnedOptimizer`, so
:func:`~hypergradient.learned.meta_train` (truncated backprop, ES, PES),
:func:`~hypergradient.learned.evaluate_learned` and ``opt_fn`` (``torch.optim``) work with
it unchanged.  The readout starts at zero: the initial optimizer is the zero update.

Cost per update: :math:`O(N H^2)` for :math:`N` components (three :math:`H \times H`
products per component); the state is :math:`N H` numbers.

References:
    Maheswaranathan, Sussillo, Metz, Sun, Sohl-Dickstein (NeurIPS 2021), Reverse engineering
    learned optimizers reveals known and novel mechanisms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, final

import torch

from .._errors import HypergradientError
from .architectures import (
    AbstractLearnedOptimizer,
    Theta,
    _check_scale,
    _check_size,
    _linear_init,
)


@final
@dataclass(frozen=True, eq=False)
class GRULearnedOptimizer(AbstractLearnedOptimizer):
    r"""A GRU applied to every parameter component on its own (see the module docstring).

    Args:
        hidden: :math:`H`, the state size per component (16 in the paper's analysis).
        scale_dir: :math:`a`, the step multiplier of the linear readout.
        input_scale: :math:`c`, multiplies the gradient before the cell (pick it so that
            typical gradients are of order one).
        gate_bias: initial bias of the update gate :math:`z` (positive: the state is kept by
            default, a memory to start from).

    State per tensor: ``h`` of shape ``(*param.shape, hidden)``; global: ``step``.

    Examples:
        >>> import torch
        >>> from hypergradient.learned import GRULearnedOptimizer, step_inputs
        >>> lopt = GRULearnedOptimizer(hidden=4)
        >>> theta = lopt.init(torch.Generator().manual_seed(0))
        >>> params = {"w": torch.ones(3)}
        >>> state = lopt.init_state(params)
        >>> updates, state = lopt.update(theta, {"w": torch.ones(3)}, params, state,
        ...                              step_inputs())
        >>> updates["w"].abs().max().item(), tuple(state["tensors"]["w"]["h"].shape)
        (0.0, (3, 4))
    """

    use_progress: ClassVar[bool] = False

    hidden: int = 16
    scale_dir: float = 0.1
    input_scale: float = 1.0
    gate_bias: float = 1.0

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        _check_size(where, "hidden", self.hidden)
        _check_scale(where, "scale_dir", self.scale_dir)
        _check_scale(where, "input_scale", self.input_scale)
        if (
            isinstance(self.gate_bias, bool)
            or not isinstance(self.gate_bias, (int, float))
            or not math.isfinite(self.gate_bias)
        ):
            raise HypergradientError(
                f"{where}: gate_bias must be a finite float, got {self.gate_bias!r}."
            )

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        h = self.hidden
        return {
            "gru.w_in": (1, 3 * h),
            "gru.w_h": (h, 3 * h),
            "gru.b": (3 * h,),
            "gru.w_out": (h,),
        }

    def init(self, generator: torch.Generator, *, dtype: torch.dtype | None = None) -> Theta:
        dtype = torch.get_default_dtype() if dtype is None else dtype
        h = self.hidden
        bias = torch.zeros(3 * h, dtype=dtype)
        bias[h : 2 * h] = self.gate_bias
        return {
            # one input: unit-variance weights keep a unit-scale gradient at unit scale
            "gru.w_in": torch.randn(1, 3 * h, generator=generator, dtype=dtype),
            "gru.w_h": _linear_init(h, 3 * h, generator, dtype),
            "gru.b": bias,
            "gru.w_out": torch.zeros(h, dtype=dtype),  # the zero update to start from
        }

    def cell(
        self, theta: Theta, h: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One step for any number of components: ``h`` ``(..., H)``, ``g`` ``(...)`` ->
        ``(h', update)`` of shapes ``(..., H)`` and ``(...)`` (pure, differentiable,
        vmap-able)."""
        n = self.hidden
        x = (self.input_scale * g).unsqueeze(-1) * theta["gru.w_in"][0] + theta["gru.b"]
        hh = h @ theta["gru.w_h"]
        r = torch.sigmoid(x[..., :n] + hh[..., :n])
        z = torch.sigmoid(x[..., n : 2 * n] + hh[..., n : 2 * n])
        cand = torch.tanh(x[..., 2 * n :] + r * hh[..., 2 * n :])
        h_new = (1 - z) * cand + z * h
        return h_new, self.scale_dir * (h_new @ theta["gru.w_out"])

    def init_tensor_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "h": torch.zeros((*param.shape, self.hidden), dtype=param.dtype, device=param.device)
        }

    def init_global_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"step": torch.zeros((), dtype=like.dtype, device=like.device)}

    def update(self, theta, grads, params, state, inputs):
        updates, tensors = {}, {}
        for name in params:
            h, updates[name] = self.cell(theta, state["tensors"][name]["h"], grads[name])
            tensors[name] = {"h": h}
        new_global = {"step": state["global"]["step"] + 1}
        return updates, {"global": new_global, "tensors": tensors}
