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

Two optional pieces of the paper, each one flag (off by default, so the plain rule above is
what ``KFAC(model)`` does):

* ``rescale=True`` (Sec. 7): the step is :math:`\delta = \alpha\Delta + \mu\delta_0`,
  :math:`\Delta = -\breve F^{-1}\nabla h` the preconditioned direction and
  :math:`\delta_0` the previous step, with :math:`(\alpha, \mu)` minimising the exact
  damped quadratic model

  .. math::

      M(\delta) = \nabla h^\top\delta + \tfrac12\,\delta^\top(F + (\lambda+\eta) I)\delta

  (a 2x2 linear system; ``F`` the exact Fisher = generalized Gauss-Newton matrix of the
  mini-batch, used only through two Jacobian-vector products of the network,
  :func:`torch.func.jvp`; :math:`\lambda` = ``damping``, :math:`\eta` = ``weight_decay``).
  This replaces ``momentum`` (:math:`\mu` is chosen by the model) and the step size
  (``lr`` multiplies :math:`\delta`; 1, the default then, is the paper's rule).
* ``adapt_damping=True`` (Sec. 6.5, Levenberg-Marquardt): every ``adapt_every`` (:math:`T_1`)
  steps the reduction ratio

  .. math::

      \rho = \frac{h(\theta + \delta) - h(\theta)}{M_0(\delta) - M_0(0)}, \qquad
      M_0(\delta) = \nabla h^\top\delta + \tfrac12\,\delta^\top(F + \eta I)\delta

  (the model without the damping it adapts, as in Levenberg-Marquardt) compares the
  mini-batch loss's actual change with the predicted one, and
  :math:`\lambda \leftarrow \omega\lambda` if :math:`\rho > 3/4`,
  :math:`\lambda \leftarrow \lambda/\omega` if :math:`\rho < 1/4` (also when the model
  predicts no decrease), :math:`\omega = (19/20)^{T_1}`; every group's ``damping`` is
  scaled by the same factor.  :math:`h` is the mini-batch loss from ``step(loss_fn=...)``
  plus :math:`\tfrac\eta2\|\theta\|^2`.

Deviation: the paper separates the factored Tikhonov damping :math:`\gamma` from
:math:`\lambda` and tunes :math:`\gamma` by a grid search every :math:`T_2` steps; here the
factored damping is :math:`\lambda` itself (``damping``), the tie the paper uses as its
starting point (:math:`\gamma = \sqrt{\lambda + \eta}` with the weight decay folded
into ``damping``).
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
from ._capture import (
    Layer,
    Recorder,
    batch_factors,
    check_fisher_options,
    find_layers,
    output_fisher_form,
)

__all__ = ["KFAC"]

_WHERE = "hypergradient.optimizers.kfac.KFAC"


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_integer(
    where: str, name: str, value: object, minimum: int, hint: str, *, or_none: bool = False
) -> None:
    """``value`` must be an int (not a bool) ``>= minimum``; else one clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if or_none else "")
        raise HypergradientError(f"{where}: {name} must be {allowed}, got {value!r}{hint}.")


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
    value); it must have been called at least once before the first :meth:`step`.  With
    ``adapt_damping=True``, :meth:`step` also needs ``loss_fn``, a function of no arguments
    returning the same mini-batch's loss at the model's current parameters
    (``opt.step(loss_fn=lambda: F.cross_entropy(model(x), y))``; it is called under
    ``torch.no_grad()`` before and after the update, on adaptation steps only).

    Args:
        model: the network; hooks are attached to its ``nn.Linear`` / ``nn.Conv2d`` layers.
            The model itself must be called for each forward pass (the records of the last
            forward are kept).
        params: parameters or parameter groups (dicts, as in ``torch.optim``); default all
            trainable parameters of ``model``.  A layer's weight and bias must be in the same
            group.  Groups may override ``lr``, ``damping``, ``damping_mode``, ``momentum``
            and ``weight_decay``.
        lr: step size :math:`> 0` (default 0.01; 1 with ``rescale=True``, where it
            multiplies the model-optimal step).
        damping: :math:`\lambda \ge 0` (Tikhonov damping; see ``damping_mode``); the
            initial value with ``adapt_damping``.
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
        rescale: choose the step as :math:`\alpha\Delta + \mu\delta_0` minimising the exact
            quadratic model (module docstring); needs ``momentum=0``.
        adapt_damping: adapt ``damping`` by the Levenberg-Marquardt rule every
            ``adapt_every`` steps (needs ``step(loss_fn=...)``).
        adapt_every: :math:`T_1 \ge 1` (5 in the paper).
        damping_decay: :math:`\omega \in (0, 1)`; default :math:`(19/20)^{T_1}`.
        min_damping: ``adapt_damping`` never lowers ``damping`` below this (``>= 0``).
        model_rows: evaluate the exact Fisher products of the quadratic model on only the
            first this many examples of the batch (``None``: all), to make ``rescale`` /
            ``adapt_damping`` cheaper: every tensor argument of the recorded forward whose
            first dimension equals the first argument's is cut to its first
            ``model_rows`` rows.  The gradient term always uses the full batch.

    After each step, :attr:`last_step` holds what the quadratic model said: ``alpha``,
    ``mu`` and ``damped_change`` (:math:`M(\delta) - M(0)`, ``rescale`` only);
    ``predicted_change`` (:math:`M_0(\delta) - M_0(0)`), ``actual_change`` and ``rho``
    (adaptation steps only); ``damping`` (the first group's, after the step).  ``None``
    where not computed on that step.

    Cost per step: the factor updates (one extra backward per :meth:`update_curvature` for
    ``"sampled"``) plus, every ``inverse_every`` steps, eigendecompositions of every
    factor (``O(d^3)``); per step two small matrix products per layer.  ``rescale``: two
    Jacobian-vector products of the network on the last batch (about four forward passes);
    ``adapt_damping``: two ``loss_fn`` calls every ``adapt_every`` steps (plus one
    Jacobian-vector product there without ``rescale``).  Memory: two factors and their
    eigenvectors per layer (and the previous step with ``rescale``).

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

        The paper's full rule: the step rescaled by the exact quadratic model and the damping
        adapted by Levenberg-Marquardt (``lr`` is then 1 and ``momentum`` chosen per step):

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = hg.optimizers.kfac.KFAC(model, damping=1.0, rescale=True, adapt_damping=True)
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     out = model(x)
        ...     opt.update_curvature(out)
        ...     F.cross_entropy(out, y).backward()
        ...     opt.step(loss_fn=lambda: F.cross_entropy(model(x), y))
        >>> sorted(opt.last_step)
        ['actual_change', 'alpha', 'damped_change', 'damping', 'mu', 'predicted_change', 'rho']
        >>> opt.last_step["damped_change"] < 0  # the model-optimal step predicts a decrease
        True

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
        lr: float | None = None,
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
        rescale: bool = False,
        adapt_damping: bool = False,
        adapt_every: int = 5,
        damping_decay: float | None = None,
        min_damping: float = 1e-8,
        model_rows: int | None = None,
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
        _check_integer(where, "inverse_every", inverse_every, 1, " (about 20 in the paper)")
        if inverse_warmup is None:
            inverse_warmup = int(inverse_every)
        _check_integer(where, "inverse_warmup", inverse_warmup, 0, "", or_none=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise HypergradientError(
                f"{where}: generator must be a torch.Generator or None, got "
                f"{type(generator).__name__}."
            )
        for flag, value in (("rescale", rescale), ("adapt_damping", adapt_damping)):
            if not isinstance(value, bool):
                raise HypergradientError(f"{where}: {flag} must be True or False, got {value!r}.")
        _check_integer(where, "adapt_every", adapt_every, 1, " (T1 = 5 in the paper)")
        if damping_decay is None:
            damping_decay = (19.0 / 20.0) ** int(adapt_every)
        if not _number(damping_decay) or not 0.0 < damping_decay < 1.0:
            raise HypergradientError(
                f"{where}: damping_decay must be in (0, 1), got {damping_decay!r}; the "
                f"damping is multiplied by it after a good step and divided by it after a bad "
                f"one ((19/20)**adapt_every in the paper)."
            )
        check_damping(where, min_damping, "min_damping")
        if model_rows is not None and (
            isinstance(model_rows, bool)
            or not isinstance(model_rows, numbers.Integral)
            or model_rows < 1
        ):
            raise HypergradientError(
                f"{where}: model_rows must be an integer >= 1 or None (the whole batch), got "
                f"{model_rows!r}."
            )
        if lr is None:
            lr = 1.0 if rescale else 0.01
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.rescale = rescale
        self.adapt_damping = adapt_damping
        self.adapt_every = int(adapt_every)
        self.damping_decay = float(damping_decay)
        self.min_damping = float(min_damping)
        self.model_rows = None if model_rows is None else int(model_rows)
        self.last_step: dict[str, float | None] = {}
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

    def _check_group(self, group: dict) -> None:
        where = f"{_WHERE}(...)"
        lr = group["lr"]
        if not _number(lr) or not math.isfinite(float(lr)) or lr <= 0:
            raise HypergradientError(f"{where}: lr must be a finite number > 0, got {lr!r}.")
        check_damping(where, group["damping"])
        check_damping_mode(where, group["damping_mode"])
        mom = group["momentum"]
        if not _number(mom) or not 0.0 <= mom < 1.0:
            raise HypergradientError(f"{where}: momentum must be in [0, 1), got {mom!r}.")
        if mom != 0 and self.rescale:
            raise HypergradientError(
                f"{where}: momentum={mom!r} with rescale=True; the rescaled step "
                f"alpha * Delta + mu * previous_step chooses its momentum mu from the quadratic "
                f"model. Pass momentum=0 (or rescale=False to keep a fixed momentum)."
            )
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
        if not self._layers:
            raise HypergradientError(
                f"{where}: K-FAC captures no layer of this model (skipped as unsupported: "
                f"{self.skipped_layers}); there is no curvature to update. Give K-FAC a model "
                f"with nn.Linear / nn.Conv2d layers, or use another optimizer."
            )
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
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        loss_fn: Callable[[], float | torch.Tensor] | None = None,
    ) -> float | None:
        """One K-FAC step on every parameter with a gradient; returns ``closure()`` if given.

        Args:
            closure: as in ``torch.optim`` (re-evaluates the loss, with gradients).
            loss_fn: the mini-batch loss at the model's current parameters, without
                backward; needed on the adaptation steps of ``adapt_damping=True``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        where = f"{_WHERE}.step()"
        num_steps = self.param_groups[0].get("num_steps", 0)
        adapting = self.adapt_damping and num_steps % self.adapt_every == 0
        if adapting and loss_fn is None:
            raise HypergradientError(
                f"{where}: adapt_damping=True needs the mini-batch loss to compute the "
                f"reduction ratio rho; call opt.step(loss_fn=lambda: loss_of(model(x), y)) "
                f"with the batch the gradient came from."
            )
        # the preconditioned direction D (Delta = -D) and the gradient g (+ weight decay)
        entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]] = []
        for index, group in enumerate(self.param_groups):
            self._check_group(group)
            group["num_steps"] = group.get("num_steps", 0) + 1
            directions: dict[torch.Tensor, torch.Tensor] = {}
            for layer in self._layers:
                if self._group_of_layer[layer.name] == index and layer.weight.grad is not None:
                    directions.update(self._direction(layer, group))
            for p in group["params"]:
                if p.grad is None and p not in directions:
                    continue
                wd = group["weight_decay"]
                g = torch.zeros_like(p) if p.grad is None else p.grad
                g = g if wd == 0 else g.add(p, alpha=wd)
                entries.append((p, directions.get(p, g), g, group))

        if self.rescale:
            updates, info = self._rescaled_updates(where, entries)
        else:
            updates, info = [], {"alpha": None, "mu": None, "damped_change": None}
            for p, d, _, group in entries:
                if group["momentum"] != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d)
                    d = buf
                updates.append(-group["lr"] * d)

        info.update(rho=None, predicted_change=None, actual_change=None)
        if adapting:
            predicted = info.get("undamped_change")
            if predicted is None:
                predicted = self._model_change(where, entries, updates)
            before = self._objective(where, loss_fn, entries)
            for (p, _, _, _), u in zip(entries, updates):
                p.add_(u)
            actual = self._objective(where, loss_fn, entries) - before
            rho = actual / predicted if predicted < 0 else float("nan")
            if rho > 0.75:
                factor = self.damping_decay
            elif not rho >= 0.25:  # also nan: the model predicted no decrease
                factor = 1.0 / self.damping_decay
            else:
                factor = 1.0
            for group in self.param_groups:
                group["damping"] = max(group["damping"] * factor, self.min_damping)
            info.update(rho=rho, actual_change=actual, predicted_change=predicted)
        else:
            for (p, _, _, _), u in zip(entries, updates):
                p.add_(u)
        info.pop("undamped_change", None)
        info["damping"] = float(self.param_groups[0]["damping"])
        self.last_step = info
        return loss

    # ----------------------------------------------------------------------------------
    # the exact quadratic model (rescaling and Levenberg-Marquardt)
    # ----------------------------------------------------------------------------------

    def _jvp(self, where: str, entries, tangents: list[torch.Tensor]):
        """``(outputs, J v)`` of the model's last forward, ``v`` = ``tangents`` on ``entries``."""
        inputs = None if self._recorder is None else self._recorder.model_inputs
        if inputs is None:
            raise HypergradientError(
                f"{where}: rescale/adapt_damping need the exact curvature of the last batch, "
                f"but no forward pass of the model with gradients enabled was recorded"
                f"{' (the hooks were removed)' if self._recorder is None else ''}. Run "
                f"out = model(x) (and the loss's backward) before step()."
            )
        args, kwargs = inputs
        if self.model_rows is not None and args and isinstance(args[0], torch.Tensor):
            rows, keep = args[0].shape[0] if args[0].dim() else 0, self.model_rows

            def cut(v):
                is_batch = isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows
                return v[:keep] if is_batch else v

            args = tuple(cut(a) for a in args)
            kwargs = {k: cut(v) for k, v in kwargs.items()}
        names = {id(p): name for name, p in self.model.named_parameters()}
        primals = {names[id(p)]: p.detach() for p, _, _, _ in entries}
        tangent = {names[id(p)]: t for (p, _, _, _), t in zip(entries, tangents)}

        def forward(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(self.model, params, args, kwargs)

        outputs, jv = torch.func.jvp(forward, (primals,), (tangent,))
        if not isinstance(outputs, torch.Tensor):
            raise HypergradientError(
                f"{where}: rescale/adapt_damping need a model that returns one tensor (the "
                f"outputs the likelihood is defined on), got {type(outputs).__name__}."
            )
        return outputs, jv

    def _fisher_and_norms(self, entries, a: list[torch.Tensor], b: list[torch.Tensor], Ja, Jb, out):
        """``(a^T F b, sum_groups (damping) a.b, sum_groups (weight decay) a.b, g.a)``."""
        fisher = float(output_fisher_form(self.likelihood, out, Ja, Jb))
        damped = decayed = 0.0
        for (_, _, _, group), x, y in zip(entries, a, b):
            dot = float(torch.dot(x.reshape(-1), y.reshape(-1)))
            damped += group["damping"] * dot
            decayed += group["weight_decay"] * dot
        return fisher, damped, decayed

    @staticmethod
    def _grad_dot(entries, v: list[torch.Tensor]) -> float:
        return float(
            sum(torch.dot(g.reshape(-1), x.reshape(-1)) for (_, _, g, _), x in zip(entries, v))
        )

    def _rescaled_updates(self, where: str, entries):
        r"""``lr * (alpha Delta + mu delta_0)`` minimising the damped model; and the numbers."""
        deltas = [-d for _, d, _, _ in entries]
        previous = [self.state[p].get("previous_update") for p, _, _, _ in entries]
        has_previous = all(x is not None for x in previous) and len(entries) > 0
        out, J_delta = self._jvp(where, entries, deltas)
        f_dd, lam_dd, eta_dd = self._fisher_and_norms(
            entries, deltas, deltas, J_delta, J_delta, out
        )
        g_d = self._grad_dot(entries, deltas)
        if has_previous:
            _, J_prev = self._jvp(where, entries, previous)
            f_dp, lam_dp, eta_dp = self._fisher_and_norms(
                entries, deltas, previous, J_delta, J_prev, out
            )
            f_pp, lam_pp, eta_pp = self._fisher_and_norms(
                entries, previous, previous, J_prev, J_prev, out
            )
            g_p = self._grad_dot(entries, previous)
            Q = torch.tensor(
                [
                    [f_dd + lam_dd + eta_dd, f_dp + lam_dp + eta_dp],
                    [f_dp + lam_dp + eta_dp, f_pp + lam_pp + eta_pp],
                ],
                dtype=torch.float64,
            )
            Q0 = torch.tensor(
                [[f_dd + eta_dd, f_dp + eta_dp], [f_dp + eta_dp, f_pp + eta_pp]],
                dtype=torch.float64,
            )
            rhs = torch.tensor([g_d, g_p], dtype=torch.float64)
        else:
            Q = torch.tensor([[f_dd + lam_dd + eta_dd]], dtype=torch.float64)
            Q0 = torch.tensor([[f_dd + eta_dd]], dtype=torch.float64)
            rhs = torch.tensor([g_d], dtype=torch.float64)
        coef = _minimiser(Q, rhs)
        alpha = float(coef[0])
        mu = float(coef[1]) if has_previous else 0.0
        lr = self.param_groups[0]["lr"]
        updates = []
        for (p, _, _, group), d, prev in zip(entries, deltas, previous):
            u = alpha * d if not has_previous else alpha * d + mu * prev
            u = group["lr"] * u
            self.state[p]["previous_update"] = u.clone()
            updates.append(u)
        # model changes of the final step lr * coef (single-lr: exact; groups: first lr)
        step = lr * coef
        info = {
            "alpha": alpha,
            "mu": mu,
            "damped_change": float(rhs @ step + 0.5 * step @ Q @ step),
            "undamped_change": float(rhs @ step + 0.5 * step @ Q0 @ step),
        }
        if any(group["lr"] != lr for group in self.param_groups):
            info["undamped_change"] = None  # recomputed from the updates themselves
        return updates, info

    def _model_change(self, where: str, entries, updates: list[torch.Tensor]) -> float:
        r""":math:`M_0(u) - M_0(0) = g^\top u + \tfrac12 u^\top (F + \eta I) u` (one JVP)."""
        out, Ju = self._jvp(where, entries, updates)
        fisher, _, decayed = self._fisher_and_norms(entries, updates, updates, Ju, Ju, out)
        return self._grad_dot(entries, updates) + 0.5 * (fisher + decayed)

    def _objective(self, where: str, loss_fn, entries) -> float:
        """``loss_fn()`` + the weight-decay term ``sum eta/2 ||theta||^2``."""
        value = loss_fn()
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not _number(value) or not math.isfinite(float(value)):
            raise HypergradientError(
                f"{where}: loss_fn() must return the mini-batch loss as a finite number or "
                f"one-element tensor, got {value!r}."
            )
        decay = sum(
            0.5 * group["weight_decay"] * float(p.detach().pow(2).sum())
            for p, _, _, group in entries
            if group["weight_decay"] != 0
        )
        return float(value) + decay


def _minimiser(Q: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``argmin_x rhs^T x + x^T Q x / 2`` for symmetric PSD ``Q`` (least norm if singular)."""
    if Q.shape[0] == 1:
        q = float(Q[0, 0])
        return torch.tensor([-float(rhs[0]) / q if q > 0 else 0.0], dtype=Q.dtype)
    # Delta parallel to the previous step makes Q singular: the pseudo-inverse then picks
    # the least-norm minimiser on the line, which gives the same step
    return -(torch.linalg.pinv(Q, hermitian=True) @ rhs)
