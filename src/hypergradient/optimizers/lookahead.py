r"""Lookahead (Zhang, Lucas, Hinton & Ba, NeurIPS 2019): k fast steps, then pull back.

Any ``torch.optim`` optimizer ``A`` makes the *fast* weights :math:`\theta`; every ``k``
of its steps the *slow* weights :math:`\phi` move a fraction :math:`\alpha` of the way
toward them and the fast weights restart from there:

.. math::
    \theta_{t,i} = \theta_{t,i-1} + A(\nabla L(\theta_{t,i-1})),\ i = 1..k, \qquad
    \phi_{t+1} = \phi_t + \alpha(\theta_{t,k} - \phi_t), \qquad \theta_{t+1,0} = \phi_{t+1}.

On the noisy quadratic of the paper's Proposition 1 this shrinks the steady-state variance
of the iterate by the factor :func:`noisy_quadratic_variance` computes in closed form.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._errors import HypergradientError

__all__ = ["Lookahead", "noisy_quadratic_variance"]

_PULLBACK = ("none", "reset", "pullback")


def _check_k_alpha(where: str, k: object, alpha: object) -> tuple[int, float]:
    """``k`` an integer >= 1 (numpy integers too, never a bool), ``alpha`` a real in (0, 1]."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise HypergradientError(
            f"{where}: `k` (inner steps per synchronisation) must be an int >= 1, got "
            f"{k!r}. The paper uses 5 or 10."
        )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not 0.0 < float(alpha) <= 1.0  # also refuses nan
    ):
        raise HypergradientError(
            f"{where}: `alpha` must be a number in (0, 1], got {alpha!r}. alpha=1 is the "
            f"inner optimizer alone; the paper uses 0.5 or 0.8."
        )
    return int(k), float(alpha)


class Lookahead(torch.optim.Optimizer):
    r"""Wrap ``optimizer``: every ``k`` of its steps, interpolate slow and fast weights.

    .. math::
        \phi \leftarrow \phi + \alpha(\theta - \phi) \;(\text{= lerp}), \qquad
        \theta \leftarrow \phi \qquad \text{after every } k \text{ inner steps.}

    ``Lookahead`` is a ``torch.optim.Optimizer`` whose ``param_groups`` *are* the inner
    optimizer's (the same list), so ``torch.optim.lr_scheduler`` schedulers,
    ``add_param_group`` and ``zero_grad`` act on the inner optimizer.  Its ``state`` holds
    the slow weights (``state[p]["slow_weights"]``, a copy of ``p`` taken at the first
    :meth:`step`, so weights loaded into the model before training are respected).

    Args:
        optimizer: the inner ("fast") optimizer, any ``torch.optim.Optimizer``.
        k: number of inner steps between synchronisations (paper: 5 or 10).
        alpha: slow-weight step size :math:`\alpha \in (0, 1]` (paper: 0.5 or 0.8);
            ``alpha=1`` is the inner optimizer exactly (the interpolation is a ``lerp``,
            whose weight 1 returns the fast weights bit for bit).
        pullback_momentum: what happens to the inner optimizer's ``momentum_buffer`` at a
            synchronisation (the reference implementation's option): ``"none"`` (default,
            as in the paper: keep it), ``"reset"`` (zero it) or ``"pullback"``
            (interpolate it like the weights, ``b <- alpha b + (1 - alpha) b_slow``).
            The last two need an optimizer with a ``momentum`` setting (SGD, RMSprop).

    The fast-step counter (which position in the cycle of ``k`` the next step has) and the
    slow weights are part of :meth:`state_dict`, so a run resumed mid-cycle continues the
    same trajectory.  Evaluate on the slow weights (the paper's choice) with
    ``with opt.slow_weights(): ...``.

    Examples:
        ``alpha=1`` is plain SGD; ``alpha=0.5``, ``k=2`` averages every second step:

            >>> import torch
            >>> from hypergradient.optimizers import Lookahead
            >>> w = torch.nn.Parameter(torch.tensor([1.0]))
            >>> opt = Lookahead(torch.optim.SGD([w], lr=0.5), k=2, alpha=0.5)
            >>> for _ in range(2):
            ...     opt.zero_grad()
            ...     (0.5 * w**2).sum().backward()   # gradient w: each fast step halves w
            ...     _ = opt.step()
            >>> w.item()  # slow weight 1 moves half way to the fast weight 0.25
            0.625

    Cost: memory, one copy of the parameters (the slow weights), plus one for
    ``"pullback"``.  Time, the inner step plus a constant between synchronisations, and one
    fused ``lerp`` and copy over all parameters every ``k`` steps (an 11k-weight CNN at
    batch 64: 1.06-1.10x the bare ``step()``, a whole training iteration within 1.2%;
    ``benchmarks/optimizers_in_training.py --part lookahead``).

    Raises:
        HypergradientError: ``optimizer`` not a ``torch.optim.Optimizer``; ``k`` not an
            integer >= 1; ``alpha`` not a real number in (0, 1]; an unknown
            ``pullback_momentum``, or one other than ``"none"`` for an optimizer without a
            ``momentum`` setting.

    References:
        M. R. Zhang, J. Lucas, G. Hinton, J. Ba. Lookahead Optimizer: k steps forward, 1 step
        back. NeurIPS 2019. Code: ``michaelrzhang/lookahead``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        k: int = 5,
        alpha: float = 0.5,
        pullback_momentum: str = "none",
    ) -> None:
        where = "Lookahead(optimizer, k, alpha, pullback_momentum)"
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise HypergradientError(
                f"{where}: `optimizer` must be a torch.optim.Optimizer instance, got "
                f"{type(optimizer).__name__}. Build the inner optimizer first, e.g. "
                f"Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))."
            )
        k, alpha = _check_k_alpha(where, k, alpha)
        if pullback_momentum not in _PULLBACK:
            raise HypergradientError(
                f"{where}: `pullback_momentum` must be one of {_PULLBACK}, got "
                f"{pullback_momentum!r}."
            )
        if pullback_momentum != "none" and not all("momentum" in g for g in optimizer.param_groups):
            raise HypergradientError(
                f"{where}: pullback_momentum={pullback_momentum!r} acts on the inner "
                f"optimizer's momentum buffer, but {type(optimizer).__name__} has no "
                f"`momentum` setting. Use pullback_momentum='none' (the paper's default)."
            )
        # torch.optim.Optimizer.__init__ is deliberately not called: it would build new
        # param_groups, and the point is to share the inner optimizer's list (so schedulers
        # that edit `lr` reach the optimizer that uses it).  The attributes it would set are
        # set here; _patch_step_function installs the step hooks (register_step_pre_hook).
        self.optimizer = optimizer
        self.k = k
        self.alpha = float(alpha)
        self.pullback_momentum = pullback_momentum
        self.defaults = optimizer.defaults
        self.state: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        self.param_groups = optimizer.param_groups
        self.fast_steps = 0  # inner steps taken so far; a sync follows each multiple of k
        self._with_slow_weights = 0  # parameters given slow weights (see step)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    def __getstate__(self) -> dict[str, Any]:
        # the base class pickles only defaults/state/param_groups; the inner optimizer and
        # the counter are needed too (copy.deepcopy keeps param_groups shared with it)
        return dict(self.__dict__)

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n    ")
        return (
            f"Lookahead(k={self.k}, alpha={self.alpha}, "
            f"pullback_momentum={self.pullback_momentum!r},\n    {inner})"
        )

    def _params(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (and so to this one: the list is shared)."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One inner step (``closure`` is passed to it); a synchronisation every ``k``-th."""
        # every parameter has its slow weights after the first step; only a group added
        # since then (add_param_group) changes the count, so the per-parameter scan (Python
        # work comparable to a small model's whole SGD step) runs only then
        count = sum(len(group["params"]) for group in self.param_groups)
        if getattr(self, "_with_slow_weights", 0) != count:
            with torch.no_grad():
                for p in self._params():
                    state = self.state[p]
                    if "slow_weights" not in state:
                        state["slow_weights"] = p.detach().clone()
            self._with_slow_weights = count
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            self._synchronise()
        return loss

    @torch.no_grad()
    def _synchronise(self) -> None:
        params = list(self._params())
        slows = [self.state[p]["slow_weights"] for p in params]
        # one fused lerp and copy over all parameters (torch.optim's foreach path), bit for
        # bit the per-tensor slow.lerp_(p, alpha); p.copy_(slow)
        torch._foreach_lerp_(slows, [p.detach() for p in params], self.alpha)
        torch._foreach_copy_(params, slows)
        if self.pullback_momentum == "none":
            return
        for p in params:
            state = self.state[p]
            buffer = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is None:  # momentum 0, or no step on this parameter yet
                continue
            if self.pullback_momentum == "reset":
                buffer.zero_()
            else:
                slow_buffer = state.setdefault("slow_momentum", torch.zeros_like(buffer))
                buffer.mul_(self.alpha).add_(slow_buffer, alpha=1.0 - self.alpha)
                slow_buffer.copy_(buffer)

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Temporarily load the slow weights into the parameters (e.g. to evaluate).

        The fast weights are restored on exit, so training can continue mid-cycle.
        Before the first :meth:`step` the parameters already are the slow weights.
        """
        saved = []
        with torch.no_grad():
            for p in self._params():
                slow = self.state[p].get("slow_weights") if p in self.state else None
                if slow is not None:
                    saved.append((p, p.detach().clone()))
                    p.copy_(slow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, fast in saved:
                    p.copy_(fast)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's ``state_dict`` plus the slow weights and the step counter.

        Slow weights are keyed by the position of their parameter in ``param_groups`` (the
        ``torch.optim`` convention), so the dict can be loaded into a fresh model's
        optimizer.
        """
        slow: dict[int, dict[str, torch.Tensor]] = {}
        for index, p in enumerate(self._params()):
            entry = {name: t for name, t in self.state.get(p, {}).items()}
            if entry:
                slow[index] = entry
        return {
            "inner": self.optimizer.state_dict(),
            "lookahead": {
                "fast_steps": self.fast_steps,
                "k": self.k,
                "alpha": self.alpha,
                "pullback_momentum": self.pullback_momentum,
                "state": slow,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (inner state, slow weights, counter, k, alpha)."""
        where = "Lookahead.load_state_dict(state_dict)"
        if not isinstance(state_dict, dict) or set(state_dict) != {"inner", "lookahead"}:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)
            raise HypergradientError(
                f"{where}: expected the dict Lookahead.state_dict() returns, with keys "
                f"['inner', 'lookahead'], got {got}. A plain torch.optim state dict belongs "
                f"to the inner optimizer: `opt.optimizer.load_state_dict(...)`."
            )
        ours = state_dict["lookahead"]
        keys = {"fast_steps", "k", "alpha", "pullback_momentum", "state"}
        if not isinstance(ours, dict) or not keys <= set(ours):
            got = sorted(ours) if isinstance(ours, dict) else type(ours).__name__
            raise HypergradientError(
                f"{where}: state_dict['lookahead'] must hold the keys {sorted(keys)}, got "
                f"{got}. Load a dict saved by Lookahead.state_dict()."
            )
        k, alpha = _check_k_alpha(f"{where} (the saved values)", ours["k"], ours["alpha"])
        if ours["pullback_momentum"] not in _PULLBACK:
            raise HypergradientError(
                f"{where}: the saved pullback_momentum must be one of {_PULLBACK}, got "
                f"{ours['pullback_momentum']!r}. Load a dict saved by Lookahead.state_dict()."
            )
        params = list(self._params())
        bad = [i for i in ours["state"] if not 0 <= int(i) < len(params)]
        if bad:
            raise HypergradientError(
                f"{where}: slow weights saved for parameter positions {sorted(bad)}, but this "
                f"optimizer has {len(params)} parameters; load a state dict saved from the "
                f"same model and parameter groups."
            )
        self.optimizer.load_state_dict(state_dict["inner"])
        # torch.optim's load_state_dict builds a new param_groups list: share it again
        self.param_groups = self.optimizer.param_groups
        self.fast_steps = int(ours["fast_steps"])
        self.k = k
        self.alpha = alpha
        self.pullback_momentum = str(ours["pullback_momentum"])
        self.state = defaultdict(dict)
        for index, entry in ours["state"].items():
            p = params[int(index)]
            self.state[p] = {
                name: t.detach().to(device=p.device, dtype=p.dtype).clone()
                for name, t in entry.items()
            }
        self._with_slow_weights = -1  # recount at the next step (a partial dict is allowed)


def noisy_quadratic_variance(
    k: int,
    alpha: float,
    lr: float,
    curvature: float = 1.0,
    noise_variance: float = 1.0,
) -> float:
    r"""Steady-state variance of Lookahead(SGD)'s slow weights on a 1-D noisy quadratic.

    The model of the paper's Proposition 1: the loss :math:`\tfrac h2 (x - c_t)^2` with a
    fresh :math:`c_t` each step, so the stochastic gradient is :math:`h x + \xi_t` with
    :math:`\mathrm{Var}(\xi_t) = s^2` (``noise_variance``).  One SGD step is
    :math:`x \leftarrow a x - \eta\xi` with :math:`a = 1 - \eta h`, so SGD settles at
    :math:`V_{SGD} = \eta^2 s^2 / (1 - a^2)`.  Over one Lookahead cycle the fast weights
    start at :math:`\phi` and after ``k`` steps are :math:`a^k\phi + n` with
    :math:`\mathrm{Var}(n) = V_{SGD}(1 - a^{2k})`; the slow weights become
    :math:`(1 - \alpha + \alpha a^k)\phi + \alpha n`.  The fixed point of the variance
    recursion is

    .. math::
        V_{LA} = \frac{\alpha^2 (1 - a^{2k})}{1 - (1 - \alpha + \alpha a^k)^2} V_{SGD}
               = \frac{\alpha^2 (1 - a^{2k})}
                      {\alpha^2 (1 - a^{2k}) + 2\alpha(1 - \alpha)(1 - a^k)} V_{SGD},

    the paper's ratio :math:`V_{LA}/V_{SGD} \le 1` (the two denominators are equal).
    ``alpha=1`` gives :math:`V_{SGD}` for every ``k``.

    Args:
        k: inner steps per synchronisation (>= 1).
        alpha: slow-weight step size in (0, 1].
        lr: SGD learning rate :math:`\eta`, with :math:`0 < \eta h < 2` (stable SGD).
        curvature: :math:`h > 0`.
        noise_variance: :math:`s^2 > 0`, the variance of the gradient noise.

    Returns:
        :math:`V_{LA}`, the variance of the slow weights at the synchronisation points.

    Examples:
        The calibration of papers.md: k=5, alpha=0.5, lr=0.5, h=1 gives 0.340 V_SGD:

            >>> v_sgd = noisy_quadratic_variance(1, 1.0, lr=0.5)  # 0.25 / (1 - 0.25)
            >>> round(v_sgd, 6), round(noisy_quadratic_variance(5, 0.5, lr=0.5) / v_sgd, 3)
            (0.333333, 0.34)
    """
    where = "noisy_quadratic_variance(k, alpha, lr, curvature, noise_variance)"
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise HypergradientError(f"{where}: `k` must be an int >= 1, got {k!r}.")
    numbers_given = {
        "alpha": alpha,
        "lr": lr,
        "curvature": curvature,
        "noise_variance": noise_variance,
    }
    for name, value in numbers_given.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
        ):
            raise HypergradientError(
                f"{where}: `{name}` must be a finite real number, got {value!r}. Pass a "
                f"Python float (convert a tensor with float(t))."
            )
    if not 0.0 < alpha <= 1.0:
        raise HypergradientError(f"{where}: `alpha` must be in (0, 1], got {alpha!r}.")
    if curvature <= 0 or noise_variance <= 0:
        raise HypergradientError(
            f"{where}: `curvature` and `noise_variance` must be > 0, got {curvature!r} and "
            f"{noise_variance!r}."
        )
    a = 1.0 - lr * curvature
    if not (lr > 0 and abs(a) < 1.0):
        raise HypergradientError(
            f"{where}: SGD has a steady state only for 0 < lr * curvature < 2, got "
            f"lr * curvature = {lr * curvature!r}. Lower the learning rate."
        )
    v_sgd = lr**2 * noise_variance / (1.0 - a * a)
    ak = a**k
    shrink = alpha * alpha * (1.0 - ak * ak)
    denominator = shrink + 2.0 * alpha * (1.0 - alpha) * (1.0 - ak)
    return v_sgd * shrink / denominator  # denominator >= shrink > 0 since |a| < 1
