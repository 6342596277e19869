r"""Which layers K-FAC sees, what the hooks record, and the per-batch Kronecker factors.

For a layer with pre-activations :math:`s = W \bar a` (:math:`\bar a = [a; 1]` when the layer
has a bias, the homogeneous coordinate), K-FAC approximates the Fisher block of
:math:`\bar W = [W, b]` by :math:`A \otimes G` (column-stacking ``vec``) with

.. math::

    A = \frac{1}{R} \sum_{r=1}^{R} \bar a_r \bar a_r^\top, \qquad
    G = \frac{1}{N} \sum_{r=1}^{R} \mathbb{E}_{y}\big[g_r g_r^\top\big], \qquad
    g_r = \frac{\partial\,(-\log p(y \mid x))}{\partial s_r},

where the ``R`` rows are every place the layer was applied in the forward pass (one per
example for ``nn.Linear`` on a ``(N, d)`` input; one per example, sequence position or
output pixel otherwise) and ``N = outputs.shape[0]`` is the number of likelihood terms, the
denominator of the training loss's mean.  ``A`` is the *mean* input second moment and ``G``
the per-example second moment *summed* over positions, as in KFC (Grosse & Martens 2016):
for ``nn.Linear`` on ``(N, d)`` inputs both are plain means over examples.

How ``y`` is drawn (``fisher=``):

* ``"sampled"`` (Martens & Grosse 2015): one ``y`` per example from the model's predictive
  distribution: an unbiased one-sample estimate of the true Fisher.  One extra backward.
* ``"exact"``: the expectation over ``y`` computed exactly, by backpropagating the
  ``C`` (categorical) or ``D`` (Gaussian) columns of a square root of the output Fisher:
  deterministic, ``C`` (or ``D``) extra backwards.
* ``"empirical"``: ``y`` = the training targets (the empirical Fisher; cheaper to reason
  about but a worse curvature model, see Kunstner et al. 2019).  One extra backward.

The likelihoods (``likelihood=``), on ``outputs`` of shape ``(N, ...)``:

* ``"categorical"``: ``outputs`` are logits ``(N, C)``, ``p = softmax(outputs)``, matching
  ``F.cross_entropy(outputs, y)`` (mean reduction).  The output gradient is ``p - e_y``.
* ``"gaussian"``: unit-variance Gaussian with mean ``outputs``, matching
  ``0.5 * ((outputs - y) ** 2).flatten(1).sum(1).mean()``.  The output gradient is
  ``outputs - y``; its exact second moment is the identity.
* ``"bernoulli"``: independent Bernoulli outputs with logits ``outputs`` (any shape
  ``(N, ...)``), ``p = sigmoid(outputs)``, matching
  ``F.binary_cross_entropy_with_logits(outputs, y, reduction="sum") / N`` (targets in
  ``[0, 1]``; the deep autoencoders of Martens & Grosse 2015).  The output gradient is
  ``p - y``; its exact second moment is ``diag(p (1 - p))``.

For all three the output Fisher equals the Hessian of the loss in ``outputs`` (canonical
links), so :func:`output_fisher_form` gives exact Fisher = generalized Gauss-Newton products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..._errors import HypergradientError

FISHERS = ("sampled", "exact", "empirical")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")
UNSUPPORTED = ("error", "skip")

_SUPPORTED_TEXT = (
    "K-FAC supports nn.Linear and nn.Conv2d (groups=1, padding_mode='zeros') with a "
    "trainable weight"
)


def join(prefix: str, name: str) -> str:
    """The ``named_parameters`` key of parameter ``name`` of the module called ``prefix``."""
    return f"{prefix}.{name}" if prefix else name


def describe(value: object) -> str:
    """``shape (..) of dtype ..`` for a tensor, the type name otherwise (for messages)."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} of dtype {value.dtype}"
    return type(value).__name__


def layer_label(name: str, module: nn.Module) -> str:
    return f"{name or '<root module>'!r} ({type(module).__name__})"


@dataclass(frozen=True)
class Layer:
    """One layer K-FAC preconditions: its module, kind and parameter keys."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv2d"
    weight_key: str
    bias_key: str | None

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.module.bias if self.bias_key is not None else None

    @property
    def label(self) -> str:
        return layer_label(self.name, self.module)


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why K-FAC cannot precondition ``module`` (``None`` when it can)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if not module.weight.requires_grad:
            return "has a frozen weight but trainable parameters"
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                return f"has groups={module.groups}"
            if module.padding_mode != "zeros":
                return f"has padding_mode={module.padding_mode!r}"
        return None
    return "is not a supported layer type"


def find_layers(
    model: nn.Module,
    where: str,
    *,
    unsupported: str,
    include: set[int] | None = None,
) -> tuple[list[Layer], list[str]]:
    """The K-FAC layers of ``model`` and the names of the skipped ones.

    Only modules owning trainable parameters (and, with ``include``, parameters whose ``id``
    is in ``include``) count.  A module K-FAC cannot precondition raises (``"error"``) or
    is listed as skipped (``"skip"``; its parameters then get the plain gradient).
    """
    if unsupported not in UNSUPPORTED:
        raise HypergradientError(
            f"{where}: unsupported={unsupported!r}; expected 'error' (refuse layers K-FAC "
            f"cannot precondition) or 'skip' (update them with the plain gradient)."
        )
    layers: list[Layer] = []
    skipped: list[str] = []
    seen: dict[int, str] = {}
    for name, module in model.named_modules():
        own = [
            (pname, p)
            for pname, p in module.named_parameters(recurse=False)
            if p.requires_grad and (include is None or id(p) in include)
        ]
        if not own:
            continue
        for pname, p in own:
            if id(p) in seen:
                raise HypergradientError(
                    f"{where}: parameter {join(name, pname)!r} is the same tensor as "
                    f"{seen[id(p)]!r} (tied weights); K-FAC's per-layer curvature blocks "
                    f"cannot be shared. Untie the weights or leave them out of the optimizer."
                )
            seen[id(p)] = join(name, pname)
        reason = _unsupported_reason(module)
        if reason is not None:
            if unsupported == "error":
                raise HypergradientError(
                    f"{where}: layer {layer_label(name, module)} {reason}. "
                    f"{_SUPPORTED_TEXT}. Pass unsupported='skip' to update its parameters "
                    f"{[join(name, n) for n, _ in own]} with the plain gradient, or leave "
                    f"them out of the parameters given to K-FAC."
                )
            skipped.append(name)
            continue
        has_bias = module.bias is not None and module.bias.requires_grad
        if has_bias and include is not None and id(module.bias) not in include:
            raise HypergradientError(
                f"{where}: layer {layer_label(name, module)}: its weight is given to K-FAC "
                f"but its bias is not; K-FAC preconditions [W, b] together. Give both or "
                f"freeze the bias (bias.requires_grad_(False))."
            )
        if include is not None and id(module.weight) not in include:
            raise HypergradientError(
                f"{where}: layer {layer_label(name, module)}: its bias is given to K-FAC but "
                f"its weight is not; K-FAC preconditions [W, b] together. Give both."
            )
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        layers.append(
            Layer(
                name, module, kind, join(name, "weight"), join(name, "bias") if has_bias else None
            )
        )
    return layers, skipped


# --------------------------------------------------------------------------------------
# rows of a layer's inputs and output gradients
# --------------------------------------------------------------------------------------


def _conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``(N * L, C_in * kh * kw)``: every receptive field the convolution sees, one per row."""
    if x.dim() == 3:  # an unbatched (C, H, W) input
        x = x.unsqueeze(0)
    padding = module.padding
    if isinstance(padding, str):
        if padding == "same":
            # torch pads `total // 2` before and the rest after (more after when odd)
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            (th, tw) = total
            x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
        padding = (0, 0)
    patches = F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )  # (N, C*kh*kw, L), channel-major like weight.reshape(out, -1)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def input_rows(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs, one row per application, with a column of ones for the bias."""
    rows = x.reshape(-1, x.shape[-1]) if layer.kind == "linear" else _conv_patches(layer.module, x)
    if layer.bias_key is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def output_rows(layer: Layer, s: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. the layer's pre-activations, one row per application."""
    if layer.kind == "linear":
        return s.reshape(-1, s.shape[-1])
    if s.dim() == 3:  # unbatched conv output (C_out, H, W)
        s = s.unsqueeze(0)
    return s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])


# --------------------------------------------------------------------------------------
# forward hooks
# --------------------------------------------------------------------------------------


def _detached(value: object) -> object:
    return value.detach() if isinstance(value, torch.Tensor) else value


class Recorder:
    """Forward hooks that keep each layer's input and output from the model's last forward.

    A forward pre-hook on ``model`` clears the records when a new forward starts (with
    gradients enabled), so only the last forward is kept; a layer called several times in
    one forward gets several records.  Outputs are kept with their graph (they already live
    in it); inputs are detached.  The arguments of the model's last forward with gradients
    enabled are kept in :attr:`model_inputs` (``(args, kwargs)``, detached): the quadratic
    model of :class:`~hypergradient.optimizers.kfac.KFAC` re-runs that forward in forward mode.
    """

    def __init__(self, model: nn.Module, layers: Sequence[Layer]):
        self.records: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {
            layer.name: [] for layer in layers
        }
        self.model_inputs: tuple[tuple, dict] | None = None
        self._handles = [model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True)]
        for layer in layers:
            self._handles.append(layer.module.register_forward_hook(self._hook(layer.name)))

    def _on_model_forward(self, module, args, kwargs) -> None:
        if torch.is_grad_enabled():
            self.clear()
            self.model_inputs = (
                tuple(_detached(a) for a in args),
                {k: _detached(v) for k, v in kwargs.items()},
            )

    def _hook(self, name: str):
        def hook(module, inputs, output) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return
            if not output.requires_grad:
                return
            # the version counter detects a later in-place op (e.g. ReLU(inplace=True)) that
            # would make the recorded tensor stop being the pre-activation
            self.records[name].append((inputs[0].detach(), output, output._version))

        return hook

    def clear(self) -> None:
        for records in self.records.values():
            records.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()
        self.model_inputs = None


# --------------------------------------------------------------------------------------
# output-gradient "probes" and the batch factors
# --------------------------------------------------------------------------------------


def check_fisher_options(where: str, fisher: str, likelihood: str) -> None:
    if fisher not in FISHERS:
        raise HypergradientError(
            f"{where}: fisher={fisher!r}; expected 'sampled' (targets drawn from the model, "
            f"the paper's choice), 'exact' (expectation over targets, one backward per "
            f"output) or 'empirical' (the training targets)."
        )
    if likelihood not in LIKELIHOODS:
        raise HypergradientError(
            f"{where}: likelihood={likelihood!r}; expected 'categorical' (logits, as in "
            f"F.cross_entropy), 'gaussian' (unit variance, as in 0.5 * squared error) or "
            f"'bernoulli' (logits, as in F.binary_cross_entropy_with_logits summed over outputs)."
        )


def _output_probes(
    where: str,
    outputs: torch.Tensor,
    fisher: str,
    likelihood: str,
    targets: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[torch.Tensor]:
    r"""Vectors ``u_j`` shaped like ``outputs`` with ``sum_j u_j u_j^T = E_y[d d^T]`` per row.

    ``d = d(-log p(y|outputs))/d outputs``; backpropagating each ``u_j`` gives the ``g``'s.
    """
    if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
        raise HypergradientError(
            f"{where}: `outputs` must be the floating-point tensor the model returned (logits "
            f"or means), got {type(outputs).__name__}"
            f"{' of dtype ' + str(outputs.dtype) if isinstance(outputs, torch.Tensor) else ''}."
        )
    if not outputs.requires_grad:
        raise HypergradientError(
            f"{where}: `outputs` does not require grad, so no layer gradient can be "
            f"computed. Pass the output of the forward pass run with gradients enabled "
            f"(not under torch.no_grad() and not detached)."
        )
    if outputs.dim() == 0:
        raise HypergradientError(
            f"{where}: `outputs` is a scalar; pass the model's per-example outputs of "
            f"shape (N, ...) (N = number of examples), not the loss."
        )
    if fisher == "empirical" and targets is None:
        raise HypergradientError(
            f"{where}: fisher='empirical' needs the training targets: call "
            f"update_curvature(outputs, targets)."
        )
    if fisher != "empirical" and targets is not None:
        raise HypergradientError(
            f"{where}: targets were given but fisher={fisher!r} does not use them; pass "
            f"fisher='empirical' to build the curvature from the training targets, or drop "
            f"targets."
        )
    out = outputs.detach()
    if likelihood == "categorical":
        if out.dim() != 2:
            raise HypergradientError(
                f"{where}: likelihood='categorical' expects logits of shape (N, C), got "
                f"shape {tuple(out.shape)}. Flatten the extra dimensions into N (e.g. "
                f"outputs.reshape(-1, C) for per-token logits)."
            )
        p = torch.softmax(out, dim=1)
        num_classes = p.shape[1]
        if fisher == "exact":
            # E_y[(p - e_y)(p - e_y)^T] = sum_c p_c (p - e_c)(p - e_c)^T = diag(p) - p p^T
            eye = torch.eye(num_classes, dtype=p.dtype, device=p.device)
            return [p[:, c : c + 1].sqrt() * (p - eye[c]) for c in range(num_classes)]
        if fisher == "sampled":
            # drawn where the generator lives (a CPU generator for a CUDA model works too)
            where_gen = p if generator is None else p.to(generator.device)
            y = torch.multinomial(where_gen, 1, generator=generator).squeeze(1).to(p.device)
        else:
            y = _categorical_targets(where, targets, out)
        return [p - F.one_hot(y, num_classes).to(p.dtype)]
    if likelihood == "bernoulli":
        p = torch.sigmoid(out)
        if fisher == "exact":
            # E_y[(p - y)(p - y)^T] = diag(p (1 - p)): one probe per output coordinate
            flat = (p * (1.0 - p)).sqrt().reshape(out.shape[0], -1)
            probes = []
            for k in range(flat.shape[1]):
                u = torch.zeros_like(flat)
                u[:, k] = flat[:, k]
                probes.append(u.reshape(out.shape))
            return probes
        if fisher == "sampled":
            if generator is None:
                y = torch.bernoulli(p)
            else:
                y = torch.bernoulli(p.to(generator.device), generator=generator).to(p.device)
            return [p - y]
        if not isinstance(targets, torch.Tensor) or targets.shape != out.shape:
            raise HypergradientError(
                f"{where}: likelihood='bernoulli' with fisher='empirical' needs targets in "
                f"[0, 1] shaped like outputs {tuple(out.shape)}, got {describe(targets)}."
            )
        return [p - targets.detach().to(out.dtype)]
    # Gaussian with unit variance: d = outputs - y
    if fisher == "exact":
        flat = out.reshape(out.shape[0], -1)
        probes = []
        for k in range(flat.shape[1]):
            u = torch.zeros_like(flat)
            u[:, k] = 1.0
            probes.append(u.reshape(out.shape))
        return probes
    if fisher == "sampled":
        if generator is None:
            return [torch.randn_like(out)]
        noise = torch.randn(
            out.shape, generator=generator, dtype=out.dtype, device=generator.device
        )
        return [noise.to(out.device)]
    if not isinstance(targets, torch.Tensor) or targets.shape != out.shape:
        raise HypergradientError(
            f"{where}: likelihood='gaussian' with fisher='empirical' needs targets shaped "
            f"like outputs {tuple(out.shape)}, got {describe(targets)}."
        )
    return [out - targets.detach().to(out.dtype)]


def _categorical_targets(where: str, targets, out: torch.Tensor) -> torch.Tensor:
    ok = (
        isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
        and targets.shape == out.shape[:1]
    )
    if not ok:
        raise HypergradientError(
            f"{where}: likelihood='categorical' with fisher='empirical' needs integer class "
            f"targets of shape ({out.shape[0]},), got {describe(targets)}."
        )
    return targets.to(out.device)


def batch_factors(
    where: str,
    layers: Sequence[Layer],
    recorder: Recorder,
    outputs: torch.Tensor,
    *,
    fisher: str,
    likelihood: str,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (A, G)}`` of the last forward pass for every layer that ran in it.

    Cost: one backward (``"sampled"``, ``"empirical"``) or ``C``/``D`` backwards
    (``"exact"``) from ``outputs`` to the recorded pre-activations, with
    ``retain_graph=True`` (the training loss can still be backpropagated afterwards); then
    ``O(R d^2)`` for the factors.  ``.grad`` fields are not touched.
    """
    check_fisher_options(where, fisher, likelihood)
    probes = _output_probes(where, outputs, fisher, likelihood, targets, generator)
    active = [layer for layer in layers if recorder.records[layer.name]]
    if not active:
        raise HypergradientError(
            f"{where}: no K-FAC layer recorded a forward pass. Call the model given to K-FAC "
            f"(with gradients enabled) right before, and pass its outputs."
        )
    preacts: list[torch.Tensor] = []
    owners: list[Layer] = []
    for layer in active:
        for _, s, version in recorder.records[layer.name]:
            if s._version != version:
                raise HypergradientError(
                    f"{where}: the output of layer {layer.label} was modified in place after "
                    f"the layer ran (e.g. by nn.ReLU(inplace=True)), so its pre-activation is "
                    f"lost. Use out-of-place activations (inplace=False)."
                )
            preacts.append(s)
            owners.append(layer)
    num_examples = outputs.shape[0]
    G_sums: dict[str, torch.Tensor] = {}
    for u in probes:
        grads = torch.autograd.grad(
            outputs, preacts, grad_outputs=u, retain_graph=True, allow_unused=True
        )
        for layer, g in zip(owners, grads):
            if g is None:
                raise HypergradientError(
                    f"{where}: the output of layer {layer.label} does not influence "
                    f"`outputs`, so its curvature is zero. Pass the outputs the training "
                    f"loss is computed from."
                )
            rows = output_rows(layer, g)
            term = rows.T @ rows
            G_sums[layer.name] = term if layer.name not in G_sums else G_sums[layer.name] + term
    factors = {}
    for layer in active:
        a = torch.cat([input_rows(layer, x) for x, _, _ in recorder.records[layer.name]])
        A = a.T @ a / a.shape[0]
        G = G_sums[layer.name] / num_examples
        factors[layer.name] = (_symmetric(A), _symmetric(G))
    return factors


def _symmetric(M: torch.Tensor) -> torch.Tensor:
    return 0.5 * (M + M.T)


def pi_factor(trace_A: float, dim_A: int, trace_G: float, dim_G: int) -> float:
    r"""Martens & Grosse's :math:`\pi = \sqrt{(\mathrm{tr} A/\dim A)/(\mathrm{tr} G/\dim G)}`.

    ``1`` when a trace is not positive (a dead layer), where the ratio means nothing.
    """
    if not (trace_A > 0 and trace_G > 0) or not math.isfinite(trace_A * trace_G):
        return 1.0
    return math.sqrt((trace_A / dim_A) / (trace_G / dim_G))


def output_fisher_form(
    likelihood: str, outputs: torch.Tensor, u: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    r""":math:`\frac1N \sum_n u_n^\top H_n v_n`: the loss's output Hessian as a bilinear form.

    ``H_n`` is the Hessian of the ``n``-th row's :math:`-\log p(y_n \mid z_n)` in the outputs
    :math:`z_n`, which for these likelihoods is also their Fisher and does not depend on
    ``y``: ``diag(p) - p p^T`` (categorical), ``I`` (gaussian), ``diag(p (1 - p))``
    (bernoulli).  With ``u = J d``, ``v = J e`` (Jacobian-vector products of the network) it
    is :math:`d^\top F e` for the exact Fisher (= generalized Gauss-Newton matrix) ``F`` of
    the mean loss over the ``N = outputs.shape[0]`` rows.  A 0-dim tensor.
    """
    num_rows = outputs.shape[0]
    if likelihood == "categorical":
        p = torch.softmax(outputs, dim=1)
        pu, pv = (p * u).sum(1), (p * v).sum(1)
        return ((p * u * v).sum() - (pu * pv).sum()) / num_rows
    if likelihood == "bernoulli":
        p = torch.sigmoid(outputs)
        return (p * (1.0 - p) * u * v).sum() / num_rows
    return (u * v).sum() / num_rows
