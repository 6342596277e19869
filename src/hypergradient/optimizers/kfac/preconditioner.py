r"""K-FAC as a preconditioner for CG, and as an inverse-Hessian approximation by itself.

:class:`KFACPreconditioner` is the block-diagonal :math:`M = \mathrm{diag}_\ell(A_\ell \otimes
G_\ell)` (damped, see :mod:`hypergradient.optimizers.kfac._blocks`) acting on dicts of tensors keyed
like the parameters; calling it applies :math:`M^{-1}`, the interface
:class:`~hypergradient.linalg.CG`'s ``preconditioner`` expects (like
:func:`~hypergradient.linalg.diagonal_preconditioner`).  :class:`KFACSolver` returns
:math:`M^{-1} b` as the "solution" of :math:`H x = b`: zero Hessian-vector products, the
K-FAC point in Lorraine et al.'s (2020) comparison of inverse-Hessian approximations for
implicit hypergradients.  It is not in the solver registry (``hg.linalg.get_solver``): the
registry holds solvers that solve to a tolerance and can be built from options alone,
while this one needs its preconditioner and is an approximation by design (like
``"identity"``); pass the instance, ``implicit_hypergrad(..., solver=KFACSolver(P))``.

:func:`curvature_factors` computes the blocks of a model once, from one batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..._errors import HypergradientError
from ..._results import Result, Solution, SolveStats
from ..._tree import Tree, tree_norm, tree_sub
from ...linalg._base import AbstractLinearSolver, MatVec
from ._blocks import (
    Eigen,
    KroneckerBlock,
    check_damping,
    check_damping_mode,
    inverse_scale,
)
from ._capture import Recorder, batch_factors, check_fisher_options, find_layers

__all__ = ["KFACPreconditioner", "KFACSolver", "curvature_factors"]


class KFACPreconditioner:
    r"""Apply the inverse of the damped block-diagonal K-FAC curvature to a dict of tensors.

    .. math::

        M = \mathrm{blockdiag}_\ell\big(\widetilde{A_\ell \otimes G_\ell}\big)
            \;\oplus\; c^{-1} I_{\text{rest}}, \qquad
        M^{-1} u:\; \bar W_\ell \mapsto Q_{G} \big[(Q_{G}^\top \bar W_\ell Q_{A})
            \oslash D_\ell\big] Q_{A}^\top

    where :math:`\widetilde{\cdot}` is the damping (``damping_mode``) and ``D`` the
    eigenvalues of the damped block.  :math:`M` is symmetric positive definite whenever
    ``damping > 0`` (or every factor is non-singular), as CG requires.

    Args:
        blocks: :class:`KroneckerBlock`\ s, as a sequence or a dict (e.g. the output of
            :func:`curvature_factors` or :meth:`KFAC.blocks`); each names the keys of the
            tensors it acts on.
        damping: :math:`\gamma \ge 0`.  For an inner loss "mean NLL + L2 penalty" the
            penalty's mean coefficient is a natural choice with ``damping_mode="tikhonov"``.
        damping_mode: ``"factored"`` (Martens & Grosse) or ``"tikhonov"``.
        passthrough: ``c`` applied as ``u -> c u`` to entries no block covers (e.g. the
            parameters of an unsupported layer); ``None`` (default) refuses such entries.

    Cost: the eigendecompositions of every factor at construction; per call one
    ``O(d_out d_in (d_in + d_out))`` product per layer, no Hessian-vector product.

    Examples:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> G = torch.tensor([[4.0]], dtype=torch.float64)
        >>> P = KFACPreconditioner([KroneckerBlock(A, G, "w", "b")], damping=0.0)
        >>> u = {"w": torch.tensor([[8.0]], dtype=torch.float64),
        ...      "b": torch.tensor([4.0], dtype=torch.float64)}
        >>> {k: v.tolist() for k, v in P(u).items()}   # G^-1 [8, 4] A^-1 = [1, 1]
        {'w': [[1.0]], 'b': [1.0]}
    """

    def __init__(
        self,
        blocks: Iterable[KroneckerBlock] | Mapping[str, KroneckerBlock],
        damping: float,
        *,
        damping_mode: str = "factored",
        passthrough: float | None = None,
    ):
        where = "hypergradient.optimizers.kfac.KFACPreconditioner(...)"
        items = list(blocks.values()) if isinstance(blocks, Mapping) else list(blocks)
        if not items:
            raise HypergradientError(f"{where}: `blocks` is empty; give at least one block.")
        for block in items:
            if not isinstance(block, KroneckerBlock):
                raise HypergradientError(
                    f"{where}: every block must be a "
                    f"hypergradient.optimizers.kfac.KroneckerBlock, got {type(block).__name__}. "
                    f"Build them with hg.optimizers.kfac.curvature_factors(...)."
                )
        check_damping(where, damping)
        check_damping_mode(where, damping_mode)
        if passthrough is not None and not (
            isinstance(passthrough, numbers.Real)
            and not isinstance(passthrough, bool)
            and math.isfinite(float(passthrough))
            and float(passthrough) > 0
        ):
            raise HypergradientError(
                f"{where}: passthrough={passthrough!r}; expected None or a positive scale c "
                f"(uncovered entries are mapped u -> c u)."
            )
        owner: dict[str, str] = {}
        for block in items:
            for key in (block.weight, block.bias):
                if key is None:
                    continue
                if key in owner:
                    raise HypergradientError(
                        f"{where}: key {key!r} is covered by two blocks ({owner[key]!r} and "
                        f"{block.weight!r}); each parameter belongs to one block."
                    )
                owner[key] = block.weight
        self.blocks = items
        self.damping = float(damping)
        self.damping_mode = damping_mode
        self.passthrough = None if passthrough is None else float(passthrough)
        self._covered = set(owner)
        self._eigen = [Eigen.of(b.A, b.G) for b in items]
        self._den = [e.denominator(self.damping, damping_mode) for e in self._eigen]
        self._inv = [
            inverse_scale(where, repr(b.weight), e, self.damping, damping_mode)
            for b, e in zip(items, self._eigen)
        ]

    def __repr__(self) -> str:
        return (
            f"KFACPreconditioner({len(self.blocks)} blocks, damping={self.damping!r}, "
            f"damping_mode={self.damping_mode!r})"
        )

    def __call__(self, u: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:math:`M^{-1} u` (a dict with the keys of ``u``, in the same order)."""
        return self._apply(
            "hypergradient.optimizers.kfac.KFACPreconditioner(...)(u)", u, self._inv, False
        )

    def matvec(self, u: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:math:`M u`, the damped K-FAC curvature itself (e.g. as an approximate Hessian)."""
        return self._apply(
            "hypergradient.optimizers.kfac.KFACPreconditioner.matvec(u)", u, self._den, True
        )

    def _apply(self, where, u, scales, forward: bool) -> dict[str, torch.Tensor]:
        if not isinstance(u, Mapping):
            raise HypergradientError(
                f"{where}: expected a dict of tensors keyed like the parameters, got "
                f"{type(u).__name__}."
            )
        extra = [k for k in u if k not in self._covered]
        if extra and self.passthrough is None:
            raise HypergradientError(
                f"{where}: no K-FAC block covers {extra}; pass passthrough=c to map those "
                f"entries to c * u (or build blocks for them)."
            )
        out: dict[str, torch.Tensor] = {}
        for block, eig, scale in zip(self.blocks, self._eigen, scales):
            V = block.to_matrix(where, u)
            out.update(block.from_matrix(eig.apply(V, scale.to(V.dtype)), u))
        c = self.passthrough
        for k in extra:
            out[k] = u[k] * (c if not forward else 1.0 / c)
        return {k: out[k] for k in u}


@dataclass(frozen=True)
class KFACSolver(AbstractLinearSolver):
    r"""``x = M^{-1} b``: the K-FAC inverse as the approximation of ``A^{-1}``.

    Used as ``implicit_hypergrad(..., solver=hg.optimizers.kfac.KFACSolver(P))`` it replaces the
    inverse Hessian of the implicit function theorem by the inverse K-FAC curvature, with
    no Hessian-vector product (compare ``solver="identity"``, ``"neumann"``, ``"cg"``).
    The result is always ``SUCCESSFUL`` (the approximation is what was asked for).

    Args:
        preconditioner: a :class:`KFACPreconditioner` (or any SPD ``u -> M^{-1} u``).
        compute_residual: also report ``||b - A x||`` (one matvec); otherwise the residual
            is NaN and ``stats.extra["residual_computed"]`` is ``False``.

    Examples:
        >>> A = torch.eye(1, dtype=torch.float64)
        >>> P = KFACPreconditioner([KroneckerBlock(A, 2 * A, "w")], damping=0.0)
        >>> x, stats = KFACSolver(P).solve(lambda v: v, {"w": torch.ones(1, 1, dtype=A.dtype)})
        >>> x["w"].item(), stats.num_matvecs
        (0.5, 0)
    """

    preconditioner: Callable[[Tree], Tree]
    compute_residual: bool = False

    name = "kfac"
    requires_symmetric = True

    def __post_init__(self) -> None:
        if not callable(self.preconditioner):
            raise HypergradientError(
                f"hypergradient.optimizers.kfac.KFACSolver(preconditioner=...): expected a "
                f"callable u -> M^-1 u such as "
                f"hg.optimizers.kfac.KFACPreconditioner(blocks, damping), got "
                f"{type(self.preconditioner).__name__}."
            )
        if not isinstance(self.compute_residual, bool):
            raise HypergradientError(
                f"hypergradient.optimizers.kfac.KFACSolver: compute_residual must be a bool, got "
                f"{self.compute_residual!r}."
            )

    def solve(self, matvec: MatVec, b: Tree, *, x0: Tree | None = None) -> Solution:
        x = self.preconditioner(b)
        residual, matvecs = math.nan, 0
        if self.compute_residual:
            residual = float(tree_norm(tree_sub(b, matvec(x))).detach())
            matvecs = 1
        stats = SolveStats(
            result=Result.SUCCESSFUL,
            num_steps=0,
            residual_norm=residual,
            num_matvecs=matvecs,
            extra={"residual_computed": self.compute_residual},
        )
        return Solution(x, stats)


def curvature_factors(
    model: nn.Module,
    inputs: torch.Tensor | tuple,
    *,
    fisher: str = "exact",
    likelihood: str = "categorical",
    targets: torch.Tensor | None = None,
    unsupported: str = "error",
    generator: torch.Generator | None = None,
) -> dict[str, KroneckerBlock]:
    r"""K-FAC blocks of ``model`` on one batch: ``{layer name: KroneckerBlock}``.

    Runs ``outputs = model(*inputs)`` with forward hooks on every ``nn.Linear`` and
    ``nn.Conv2d``, then backpropagates the output probes of ``fisher`` (see
    :mod:`hypergradient.optimizers.kfac._capture`) to the layers' pre-activations.  The blocks' keys
    are those of ``dict(model.named_parameters())``, so
    ``KFACPreconditioner(curvature_factors(model, x), damping)`` preconditions CG on a
    functional problem built with :func:`hypergradient.as_function`.

    Args:
        model: the network; its current weights are used.
        inputs: the batch (a tensor, or a tuple of positional arguments).
        fisher: ``"exact"`` (default here: deterministic, one backward per class or output),
            ``"sampled"`` or ``"empirical"`` (needs ``targets``).
        likelihood: ``"categorical"`` (logits, cross-entropy) or ``"gaussian"`` (unit
            variance, 0.5 * squared error).
        targets: training targets, for ``fisher="empirical"`` only.
        unsupported: ``"error"`` (default) or ``"skip"`` layers K-FAC cannot handle (no
            block for them; use ``passthrough=`` in the preconditioner).
        generator: random generator for ``fisher="sampled"``.

    Returns:
        dict from module name to :class:`KroneckerBlock` (batch estimates, no averaging).

    Cost: one forward, and 1 (sampled/empirical) or C (exact, categorical) backwards.

    Examples:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Linear(3, 2).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> block = curvature_factors(net, x)[""]      # the root module has name ""
        >>> block.weight, block.bias, block.shape
        ('weight', 'bias', (2, 4))
        >>> bool(torch.allclose(block.A[:3, :3], x.T @ x / 5))
        True
    """
    where = "hypergradient.optimizers.kfac.curvature_factors(...)"
    if not isinstance(model, nn.Module):
        raise HypergradientError(
            f"{where}: `model` must be a torch.nn.Module, got {type(model).__name__}."
        )
    check_fisher_options(where, fisher, likelihood)
    layers, _ = find_layers(model, where, unsupported=unsupported)
    if not layers:
        raise HypergradientError(
            f"{where}: {type(model).__name__} has no nn.Linear or nn.Conv2d layer with a "
            f"trainable weight, so there is nothing to factor."
        )
    recorder = Recorder(model, layers)
    try:
        with torch.enable_grad():
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            outputs = model(*args)
            factors = batch_factors(
                where,
                layers,
                recorder,
                outputs,
                fisher=fisher,
                likelihood=likelihood,
                targets=targets,
                generator=generator,
            )
    finally:
        recorder.remove()
    return {
        layer.name: KroneckerBlock(
            A.detach(), G.detach(), layer.weight_key, layer.bias_key, "out_in"
        )
        for layer in layers
        if layer.name in factors
        for A, G in [factors[layer.name]]
    }
