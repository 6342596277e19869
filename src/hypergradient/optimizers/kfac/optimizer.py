r"""K-FAC as a ``torch.optim.Optimizer`` (Martens & Grosse 2015).

For every ``nn.Linear`` / ``nn.Conv2d`` layer :math:`\ell` with parameters
:math:`\bar W_\ell = [W_\ell, b_\ell]` and gradient :math:`\nabla_\ell` (plus
``weight_decay`` :math:`\times \bar W_\ell`), one step is

.. math::

    \Delta_\ell = (G_\ell + \tfrac{1}{\pi_\ell}\sqrt{\gamma} I)^{-1}\, \nabla_\ell\,
                  (A_\ell + \pi_\ell\sqrt{\gamma} I)^{-1}, \qquad
    m \leftarrow \mu m + \Delta, \qquad \bar W \leftarrow \bar W - \eta\, m

(``damping_mode="tikhonov"``: :math:`\mathrm{vec}(\Delta_\ell) = (A_\ell\otimes G_\ell +
\gamma I)^{-1} \mathrm{vec}(\nabla_\ell)` instead).  :math:`A_\ell, G_\ell` are exponential
moving averages of the per-batch factors (:mod:`hypergradient.optimizers.kfac._capture`) with the
paper's weight :math:`\epsilon_k = \min(1 - 1/k, \text{factor\_decay})` on the old value at
the ``k``-th update (the first update takes the batch factors as they are); their
eigendecompositions are recomputed every ``inverse_every`` steps, and at every one of the
first ``inverse_warmup`` steps.  The warm-up is ours, not the paper's: at the start the
network and the young averages move fast, and an inverse kept for 20 steps from the
initial factors made a 64-64-64-10 tanh MLP on digits diverge at lr 0.1, damping 1e-2
(loss 2.3 -> 29 after 30 steps; with the warm-up 0.10).
Parameters outside the K-FAC layers (``unsupported="skip"``) take the plain gradient.

Not implemented from the paper: the Levenberg-Marquardt adaptation of :math:`\gamma`, and
the rescaling of the update by the exact quadratic model ((alpha, mu) from a 2x2 solve);
``lr``, ``damping`` and ``momentum`` are fixed per parameter group (schedulers may change
``lr``; any group value may be changed between steps).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..._errors import HypergradientError
from ._blocks import Eigen, KroneckerBlock, check_damping, check_damping_mode, inverse_scale
from ._capture import Layer, Recorder, batch_factors, check_fisher_options, find_layers

__all__ = ["KFAC"]

_WHERE = "hypergradient.optimizers.kfac.KFAC"


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class KFAC(torch.optim.Optimizer):
    r"""K-FAC optimizer: Kronecker-factored natural-gradient steps for Linear/Conv2d layers.

    The training loop calls :meth:`update_curvature` between the forward pass and the
    backward of the loss::

        opt = KFAC(model, lr=0.05, damping=1e-2)
        for x, y in batches:
            opt.zero_grad()
            out = model(x)                        # hooks record every layer's input
            opt.update_curvature(out)             # G from sampled targets (retain_graph)
            F.cross_entropy(out, y).backward()    # the ordinary gradient
            opt.step()

    ``update_curvature`` may be called on only some steps (the factors keep their last
    value); it must have been called at least once before the first :meth:`step`.

    Args:
        model: the network; hooks are attached to its ``nn.Linear`` / ``nn.Conv2d`` layers.
            The model itself must be called for each forward pass (the records of the last
            forward are kept).
        params: parameters or parameter groups (dicts, as in ``torch.optim``); default all
            trainable parameters of ``model``.  A layer's weight and bias must be in the same
            group.  Groups may override ``lr``, ``damping``, ``damping_mode``, ``momentum``
            and ``weight_decay``.
        lr: step size :math:`\eta > 0`.
        damping: :math:`\gamma \ge 0` (Tikhonov damping; see ``damping_mode``).
        damping_mode: ``"factored"`` (the paper's :math:`\pi`-split damping) or
            ``"tikhonov"`` (:math:`(A\otimes G+\gamma I)^{-1}` exactly).
        momentum: :math:`\mu \in [0, 1)` (heavy ball on the preconditioned direction).
        weight_decay: L2 coefficient added to the gradient before preconditioning.
        factor_decay: upper bound of the moving-average weight :math:`\epsilon`, in [0, 1).
        inverse_every: recompute the factors' eigendecompositions every this many steps.
        inverse_warmup: ... and at each of the first this many steps (default
            ``inverse_every``; 0 gives the paper's schedule).
        fisher: ``"sampled"`` (default: targets drawn from the model's predictive
            distribution, the true Fisher), ``"exact"`` (expectation over targets, one
            backward per class) or ``"empirical"`` (the training targets, passed to
            :meth:`update_curvature`).
        likelihood: ``"categorical"`` (logits, ``F.cross_entropy``) or ``"gaussian"``
            (unit variance, ``0.5 * squared error`` summed over outputs).  The loss should be
            the *mean* over the ``N = outputs.shape[0]`` rows of :math:`-\log p`; another
            scale of the loss just rescales the effective ``lr``.
        unsupported: ``"error"`` (default: a parameter of a layer K-FAC cannot precondition
            raises, naming the layer) or ``"skip"`` (such parameters take the plain gradient;
            their names are in :attr:`skipped_layers`).
        generator: random generator for ``fisher="sampled"`` (default: the global one).

    Cost per step: the factor updates (one extra backward per :meth:`update_curvature` for
    ``"sampled"``) plus, every ``inverse_every`` steps, eigendecompositions of every
    factor (``O(d^3)``); per step two small matrix products per layer.  Memory: two factors
    and their eigenvectors per layer.

    ``state_dict()`` holds the factors, their eigendecompositions, the step counters and the
    momentum buffers, so a restored optimizer continues exactly.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> import hypergradient as hg
        >>> _ = torch.manual_seed(0)
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> opt = hg.optimizers.kfac.KFAC(model, lr=0.1, damping=1e-2)
        >>> losses = []
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     out = model(x)
        ...     opt.update_curvature(out)  # before the loss's backward
        ...     loss = F.cross_entropy(out, y)
        ...     loss.backward()
        ...     opt.step()
        ...     losses.append(loss.item())
        >>> opt.layers, losses[-1] < 0.95 * losses[0]  # the two Linear layers; loss went down
        (['0', '2'], True)

    References:
        Martens & Grosse (2015), Optimizing Neural Networks with Kronecker-factored
        Approximate Curvature; Grosse & Martens (2016), A Kronecker-factored approximate
        Fisher matrix for convolution layers.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[torch.Tensor] | Iterable[dict] | None = None,
        *,
        lr: float = 0.01,
        damping: float = 1e-3,
        damping_mode: str = "factored",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        inverse_every: int = 20,
        inverse_warmup: int | None = None,
        fisher: str = "sampled",
        likelihood: str = "categorical",
        unsupported: str = "error",
        generator: torch.Generator | None = None,
    ):
        where = f"{_WHERE}(...)"
        if not isinstance(model, nn.Module):
            raise HypergradientError(
                f"{where}: the first argument is the model (torch.nn.Module) whose layers "
                f"K-FAC hooks, got {type(model).__name__}. Call KFAC(model, lr=...)."
            )
        check_fisher_options(where, fisher, likelihood)
        if not _number(factor_decay) or not 0.0 <= factor_decay < 1.0:
            raise HypergradientError(
                f"{where}: factor_decay must be in [0, 1), got {factor_decay!r} (0.95 in "
                f"the paper)."
            )
        if (
            isinstance(inverse_every, bool)
            or not isinstance(inverse_every, numbers.Integral)
            or inverse_every < 1
        ):
            raise HypergradientError(
                f"{where}: inverse_every must be an integer >= 1, got {inverse_every!r} "
                f"(about 20 in the paper)."
            )
        if inverse_warmup is None:
            inverse_warmup = int(inverse_every)
        if (
            isinstance(inverse_warmup, bool)
            or not isinstance(inverse_warmup, numbers.Integral)
            or inverse_warmup < 0
        ):
            raise HypergradientError(
                f"{where}: inverse_warmup must be an integer >= 0 or None, got {inverse_warmup!r}."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise HypergradientError(
                f"{where}: generator must be a torch.Generator or None, got "
                f"{type(generator).__name__}."
            )
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = {
            "lr": lr,
            "damping": damping,
            "damping_mode": damping_mode,
            "momentum": momentum,
            "weight_decay": weight_decay,
        }
        self.model = model
        self.fisher = fisher
        self.likelihood = likelihood
        self.factor_decay = float(factor_decay)
        self.inverse_every = int(inverse_every)
        self.inverse_warmup = int(inverse_warmup)
        self.unsupported = unsupported
        self.generator = generator
        self._recorder: Recorder | None = None
        self._layers: list[Layer] = []
        self._constructed = False
        super().__init__(params, defaults)
        self._setup_layers()
        self._constructed = True

    # ----------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------

    @staticmethod
    def _check_group(group: dict) -> None:
        where = f"{_WHERE}(...)"
        lr = group["lr"]
        if not _number(lr) or not math.isfinite(float(lr)) or lr <= 0:
            raise HypergradientError(f"{where}: lr must be a finite number > 0, got {lr!r}.")
        check_damping(where, group["damping"])
        check_damping_mode(where, group["damping_mode"])
        mom = group["momentum"]
        if not _number(mom) or not 0.0 <= mom < 1.0:
            raise HypergradientError(f"{where}: momentum must be in [0, 1), got {mom!r}.")
        wd = group["weight_decay"]
        if not _number(wd) or not math.isfinite(float(wd)) or wd < 0:
            raise HypergradientError(
                f"{where}: weight_decay must be a finite number >= 0, got {wd!r}."
            )

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])
        if self._constructed:  # a group added later: map its layers too
            self._setup_layers()

    def _setup_layers(self) -> None:
        where = f"{_WHERE}(...)"
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        in_model = {id(p) for p in self.model.parameters()}
        foreign = [
            tuple(p.shape) for g in self.param_groups for p in g["params"] if id(p) not in in_model
        ]
        if foreign:
            raise HypergradientError(
                f"{where}: {len(foreign)} parameter(s) (shapes {foreign}) are not parameters "
                f"of the model; K-FAC can only precondition the model's own layers. Pass "
                f"parameters of `model`, or use another optimizer for the rest."
            )
        layers, skipped = find_layers(
            self.model, where, unsupported=self.unsupported, include=set(group_of)
        )
        for layer in layers:
            if layer.bias is not None and group_of[id(layer.bias)] != group_of[id(layer.weight)]:
                raise HypergradientError(
                    f"{where}: layer {layer.label} has its weight and bias in different "
                    f"parameter groups; K-FAC preconditions [W, b] with one block, so they "
                    f"must share a group."
                )
        if self._recorder is not None:
            self._recorder.remove()
        self._layers = layers
        self._group_of_layer = {layer.name: group_of[id(layer.weight)] for layer in layers}
        self.skipped_layers = skipped
        self._recorder = Recorder(self.model, layers)

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the model (the optimizer cannot update curvature after)."""
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    @property
    def layers(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the layers K-FAC preconditions."""
        return [layer.name for layer in self._layers]

    # ----------------------------------------------------------------------------------
    # curvature
    # ----------------------------------------------------------------------------------

    @torch.no_grad()
    def update_curvature(self, outputs: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        r"""Fold the last forward pass into the running factors :math:`A, G`.

        Args:
            outputs: what the model returned in its last forward pass (logits ``(N, C)``
                for ``"categorical"``, means ``(N, ...)`` for ``"gaussian"``); still
                attached to the graph.  The graph is kept (``retain_graph``) for the loss.
            targets: the training targets, for ``fisher="empirical"`` only.

        Cost: one backward from ``outputs`` (``"exact"``: one per class/output), plus
        ``O(R d^2)`` per layer.  Does not touch ``.grad``.
        """
        where = f"{_WHERE}.update_curvature(outputs)"
        if self._recorder is None:
            raise HypergradientError(
                f"{where}: the hooks were removed (remove_hooks()); build a new KFAC "
                f"optimizer to keep updating the curvature."
            )
        with torch.enable_grad():
            factors = batch_factors(
                where,
                self._layers,
                self._recorder,
                outputs,
                fisher=self.fisher,
                likelihood=self.likelihood,
                targets=targets,
                generator=self.generator,
            )
        for layer in self._layers:
            if layer.name not in factors:
                continue  # the layer did not run in this forward: keep its factors
            A, G = factors[layer.name]
            state = self.state[layer.weight]
            k = state.get("curvature_updates", 0) + 1
            if k == 1:
                state["A"], state["G"] = A.clone(), G.clone()
            else:
                eps = min(1.0 - 1.0 / k, self.factor_decay)
                state["A"].mul_(eps).add_(A, alpha=1.0 - eps)
                state["G"].mul_(eps).add_(G, alpha=1.0 - eps)
            state["curvature_updates"] = k
        self._recorder.clear()

    def blocks(self) -> dict[str, KroneckerBlock]:
        """The current running factors as :class:`KroneckerBlock`\\ s keyed by layer name.

        Their keys are those of ``dict(model.named_parameters())``: pass them to
        :class:`~hypergradient.optimizers.kfac.KFACPreconditioner` to precondition CG.
        """
        out = {}
        for layer in self._layers:
            state = self.state.get(layer.weight, {})
            if "A" not in state:
                raise HypergradientError(
                    f"{_WHERE}.blocks(): layer {layer.label} has no curvature yet; call "
                    f"update_curvature(outputs) after a forward pass first."
                )
            out[layer.name] = KroneckerBlock(
                state["A"].clone(), state["G"].clone(), layer.weight_key, layer.bias_key
            )
        return out

    # ----------------------------------------------------------------------------------
    # the step
    # ----------------------------------------------------------------------------------

    def _direction(self, layer: Layer, group: dict) -> dict[torch.Tensor, torch.Tensor]:
        """The preconditioned direction of one layer's weight (and bias)."""
        W, b = layer.weight, layer.bias
        state = self.state[W]
        if "A" not in state:
            raise HypergradientError(
                f"{_WHERE}.step(): layer {layer.label} has no curvature estimate; call "
                f"opt.update_curvature(outputs) after the forward pass and before step() "
                f"(at least once before the first step)."
            )
        step = state.get("step", 0)
        due = step % self.inverse_every == 0 or step < self.inverse_warmup
        if "vecs_A" not in state or due:
            eig = Eigen.of(state["A"], state["G"])
            state.update(vals_A=eig.vals_A, vecs_A=eig.vecs_A, vals_G=eig.vals_G, vecs_G=eig.vecs_G)
        state["step"] = step + 1
        eig = Eigen(state["vals_A"], state["vecs_A"], state["vals_G"], state["vecs_G"])
        wd = group["weight_decay"]
        gW = W.grad if wd == 0 else W.grad.add(W, alpha=wd)
        V = gW.reshape(W.shape[0], -1)
        if b is not None:
            gb = torch.zeros_like(b) if b.grad is None else b.grad
            if wd != 0:
                gb = gb.add(b, alpha=wd)
            V = torch.cat([V, gb[:, None]], dim=1)
        scale = inverse_scale(
            f"{_WHERE}.step()", f"layer {layer.label}", eig, group["damping"], group["damping_mode"]
        )
        D = eig.apply(V, scale)
        cols = V.shape[1] - (b is not None)
        out = {W: D[:, :cols].reshape(W.shape)}
        if b is not None:
            out[b] = D[:, cols]
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One K-FAC step on every parameter with a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._check_group(group)
            directions: dict[torch.Tensor, torch.Tensor] = {}
            for layer in self._layers:
                if self._group_of_layer[layer.name] == index and layer.weight.grad is not None:
                    directions.update(self._direction(layer, group))
            for p in group["params"]:
                if p.grad is None and p not in directions:
                    continue
                d = directions.get(p)
                if d is None:  # a parameter outside the K-FAC layers: plain gradient
                    d = (
                        p.grad
                        if group["weight_decay"] == 0
                        else p.grad.add(p, alpha=group["weight_decay"])
                    )
                if group["momentum"] != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d)
                    d = buf
                p.add_(d, alpha=-group["lr"])
        return loss
