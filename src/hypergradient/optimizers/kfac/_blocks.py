r"""One Kronecker-factored curvature block and the algebra on it.

A block approximates the curvature of one layer's parameters :math:`\bar W = [W, b]`
(shape ``(d_out, d_in + 1)``; no bias column without a bias) by :math:`A \otimes G`, with
:math:`A` ``(d_in+1, d_in+1)`` and :math:`G` ``(d_out, d_out)``.  With column-stacking
:math:`\mathrm{vec}` (``V.T.reshape(-1)``; PyTorch's row-major ``V.reshape(-1)`` gives
:math:`G \otimes A` instead), :math:`(A \otimes G)\,\mathrm{vec}(V) = \mathrm{vec}(G V A)`,
so products with the block and its inverse never form the Kronecker product.

Damping (``damping`` :math:`= \gamma`), both applied through the eigendecompositions
:math:`A = Q_A \Lambda_A Q_A^\top`, :math:`G = Q_G \Lambda_G Q_G^\top` (computed once;
changing :math:`\gamma` afterwards is free):

* ``"factored"`` (Martens & Grosse 2015, Sec. 6.3):
  :math:`(A + \pi\sqrt{\gamma} I) \otimes (G + \tfrac{1}{\pi}\sqrt{\gamma} I)` with
  :math:`\pi = \sqrt{(\mathrm{tr} A/\dim A)/(\mathrm{tr} G/\dim G)}`, whose inverse applied
  to ``V`` is :math:`(G + \tfrac{\sqrt\gamma}{\pi} I)^{-1} V (A + \pi\sqrt\gamma I)^{-1}`;
* ``"tikhonov"``: exactly :math:`A \otimes G + \gamma I`, inverted in the Kronecker
  eigenbasis: :math:`Q_G [(Q_G^\top V Q_A) \oslash (\lambda_G \lambda_A^\top + \gamma)]
  Q_A^\top`.  The right model when the true curvature is the Fisher plus an isotropic
  term (an L2 penalty).

Cost: ``O(d_in^3 + d_out^3)`` once for the eigendecompositions; then
``O(d_out d_in (d_in + d_out))`` per product.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ..._errors import HypergradientError
from ._capture import describe, pi_factor

DAMPING_MODES = ("factored", "tikhonov")
WEIGHT_LAYOUTS = ("out_in", "in_out")


def check_damping(where: str, damping: Any, name: str = "damping") -> None:
    ok = isinstance(damping, numbers.Real) and not isinstance(damping, bool)
    if not (ok and math.isfinite(float(damping)) and float(damping) >= 0.0):
        raise HypergradientError(
            f"{where}: `{name}` must be a finite number >= 0, got {damping!r}. K-FAC's "
            f"Tikhonov damping is usually 1e-4 to 1e-1 times the curvature scale; 0 only works "
            f"when every Kronecker factor is non-singular."
        )


def check_damping_mode(where: str, mode: Any) -> None:
    if mode not in DAMPING_MODES:
        raise HypergradientError(
            f"{where}: damping_mode={mode!r}; expected 'factored' ((A + pi sqrt(d) I) kron "
            f"(G + sqrt(d)/pi I), Martens & Grosse 2015) or 'tikhonov' (A kron G + d I, exact)."
        )


@dataclass(frozen=True)
class Eigen:
    """Eigendecompositions of the two factors (eigenvalues clipped at 0: the factors are PSD)."""

    vals_A: torch.Tensor
    vecs_A: torch.Tensor
    vals_G: torch.Tensor
    vecs_G: torch.Tensor

    @classmethod
    def of(cls, A: torch.Tensor, G: torch.Tensor) -> Eigen:
        vals_A, vecs_A = torch.linalg.eigh(0.5 * (A + A.T))
        vals_G, vecs_G = torch.linalg.eigh(0.5 * (G + G.T))
        return cls(vals_A.clamp_min(0.0), vecs_A, vals_G.clamp_min(0.0), vecs_G)

    def damped_factors(self, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues of the damped factors ``A + pi sqrt(d) I`` and ``G + sqrt(d) / pi I``."""
        dim_A, dim_G = self.vals_A.numel(), self.vals_G.numel()
        trace_A, trace_G = torch.stack([self.vals_A.sum(), self.vals_G.sum()]).tolist()
        pi = pi_factor(trace_A, dim_A, trace_G, dim_G)
        root = math.sqrt(damping)
        return self.vals_A + pi * root, self.vals_G + root / pi

    def denominator(self, damping: float, mode: str) -> torch.Tensor:
        """``(d_out, d_in')``: the eigenvalues of the damped block, as a matrix."""
        if mode == "factored":
            damped_A, damped_G = self.damped_factors(damping)
            return damped_G[:, None] * damped_A[None, :]
        return self.vals_G[:, None] * self.vals_A[None, :] + damping

    def apply(self, V: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``Q_G [(Q_G^T V Q_A) * scale] Q_A^T`` for ``V`` of shape ``(d_out, d_in')``."""
        QA, QG = self.vecs_A, self.vecs_G
        return QG @ ((QG.T @ V @ QA) * scale) @ QA.T


def singular_level(eig: Eigen) -> float:
    r"""Relative size below which a damped block's eigenvalue is round-off, not curvature.

    ``eigh`` of an ``n x n`` symmetric factor returns each eigenvalue with an absolute error
    of about ``n * eps * ||factor||`` (backward stability), so an eigenvalue of
    :math:`A \otimes G` (a product :math:`\lambda_G \lambda_A`) is only known to about
    ``(dim_A + dim_G) * eps`` times the block's largest eigenvalue.  A smallest eigenvalue at
    or below that level is indistinguishable from an exact zero: how far above ``0.0`` it
    lands (e.g. ``1.9e-20`` for ``1.0``) depends on the CPU's kernels, not on the curvature.
    """
    return (eig.vals_A.numel() + eig.vals_G.numel()) * torch.finfo(eig.vals_A.dtype).eps


def inverse_scale(where: str, label: str, eig: Eigen, damping: float, mode: str) -> torch.Tensor:
    r"""``1 / denominator``, refusing a singular damped block with an actionable message.

    Singular means a smallest eigenvalue at or below the round-off level relative to the
    largest (relative, so the check is the same for any scale of the factors and on any
    CPU).  ``"tikhonov"``: of the block :math:`A \otimes G + \gamma I`, level
    :func:`singular_level`.  ``"factored"``: of each damped factor on its own, level
    ``dim * eps``: the block is inverted as two factor inverses, each accurate when its own
    factor is well conditioned, so their product's condition number may exceed ``1 / eps``
    (a float32 block of condition number 6e3, from two factors of condition number 77, is
    not singular).
    """
    den = eig.denominator(damping, mode)
    eps = torch.finfo(eig.vals_A.dtype).eps
    if mode == "factored":
        damped_A, damped_G = eig.damped_factors(damping)
        checks = [
            ("input factor A", damped_A, damped_A.numel() * eps),
            ("output factor G", damped_G, damped_G.numel() * eps),
        ]
    else:
        checks = [("block", den, singular_level(eig))]
    for what, values, level in checks:
        smallest, largest = torch.stack([values.min(), values.max()]).tolist()
        if not (largest > 0.0 and smallest > level * largest):
            ratio = smallest / largest if largest > 0.0 else 0.0
            fix = "Pass damping > 0" if damping == 0 else "Raise damping"
            raise HypergradientError(
                f"{where}: the K-FAC block of {label} is singular (smallest eigenvalue of the "
                f"damped {what} {smallest:.3e}, {ratio:.1e} x its largest, not above the "
                f"round-off level {level:.1e} x largest) with damping={damping!r}: a Kronecker "
                f"factor has a zero eigenvalue (fewer examples than inputs, a constant input, a "
                f"softmax's shift direction, ...). {fix}: the damped {what}'s smallest "
                f"eigenvalue must be well above {level * largest:.1e}."
            )
    return 1.0 / den


def _check_factor(where: str, name: str, M: Any) -> torch.Tensor:
    if not isinstance(M, torch.Tensor) or not M.is_floating_point():
        raise HypergradientError(
            f"{where}: `{name}` must be a floating-point torch.Tensor, got {describe(M)}."
        )
    if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise HypergradientError(
            f"{where}: `{name}` must be a non-empty square matrix, got shape {tuple(M.shape)}."
        )
    if not bool(torch.isfinite(M).all()):
        raise HypergradientError(f"{where}: `{name}` contains NaN/inf values.")
    return M


@dataclass(frozen=True)
class KroneckerBlock:
    r"""The curvature block :math:`A \otimes G` of one layer, and where its parameters live.

    Args:
        A: ``(d_in + 1, d_in + 1)`` input factor (``(d_in, d_in)`` without bias), the mean
            of :math:`\bar a \bar a^\top`.
        G: ``(d_out, d_out)`` output-gradient factor.
        weight: key of the weight in the parameter dict.
        bias: key of the bias, or ``None`` (then ``A`` has no homogeneous coordinate).
        weight_layout: ``"out_in"`` (``nn.Linear``/``nn.Conv2d``: ``weight.reshape(d_out,
            -1)``) or ``"in_out"`` (a 2-D weight used as ``x @ W``, e.g. ``W`` of
            :func:`hypergradient.testing.logistic_problem`).

    Examples:
        >>> A = torch.eye(3, dtype=torch.float64)           # 2 inputs + bias
        >>> G = 2 * torch.eye(4, dtype=torch.float64)       # 4 outputs
        >>> KroneckerBlock(A, G, "fc.weight", "fc.bias").shape
        (4, 3)
    """

    A: torch.Tensor
    G: torch.Tensor
    weight: str
    bias: str | None = None
    weight_layout: str = "out_in"

    def __post_init__(self) -> None:
        where = f"hypergradient.optimizers.kfac.KroneckerBlock(weight={self.weight!r})"
        _check_factor(where, "A", self.A)
        _check_factor(where, "G", self.G)
        if self.A.dtype != self.G.dtype or self.A.device != self.G.device:
            raise HypergradientError(
                f"{where}: A ({self.A.dtype}, {self.A.device}) and G ({self.G.dtype}, "
                f"{self.G.device}) must share dtype and device."
            )
        if not isinstance(self.weight, str) or not (
            self.bias is None or isinstance(self.bias, str)
        ):
            raise HypergradientError(
                f"{where}: `weight` and `bias` are parameter-dict keys (str; bias may be None), "
                f"got {type(self.weight).__name__} and {type(self.bias).__name__}."
            )
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise HypergradientError(
                f"{where}: weight_layout={self.weight_layout!r}; expected 'out_in' (as in "
                f"nn.Linear, y = x @ W.T) or 'in_out' (y = x @ W)."
            )
        if self.bias is not None and self.A.shape[0] < 2:
            raise HypergradientError(
                f"{where}: with a bias, A includes the homogeneous coordinate and must be at "
                f"least 2x2, got {tuple(self.A.shape)}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in')``: the shape of ``[W, b]`` the block acts on."""
        return (self.G.shape[0], self.A.shape[0])

    def to_matrix(self, where: str, tree) -> torch.Tensor:
        """``[W, b]`` as a ``(d_out, d_in')`` matrix from the leaves of ``tree``."""
        for key in (self.weight, self.bias):
            if key is not None and key not in tree:
                raise HypergradientError(
                    f"{where}: the vector has no entry {key!r} for a K-FAC block; its keys are "
                    f"{list(tree)}. Build the blocks with the parameter dict's keys."
                )
        W = tree[self.weight]
        d_out, d_in = self.shape
        if self.weight_layout == "in_out":
            if W.dim() != 2:
                raise HypergradientError(
                    f"{where}: weight_layout='in_out' needs a 2-D {self.weight!r}, got shape "
                    f"{tuple(W.shape)}."
                )
            W = W.T
        cols = d_in - (self.bias is not None)
        if W.dim() == 0 or W.shape[0] != d_out or W.numel() != d_out * cols:
            raise HypergradientError(
                f"{where}: {self.weight!r} has shape {tuple(tree[self.weight].shape)} but its "
                f"K-FAC block expects {d_out} outputs x {cols} inputs (A is "
                f"{tuple(self.A.shape)}{' incl. the bias coordinate' if self.bias else ''}, G is "
                f"{tuple(self.G.shape)}, layout {self.weight_layout!r})."
            )
        V = W.reshape(d_out, cols)
        if self.bias is None:
            return V
        b = tree[self.bias]
        if b.shape != (d_out,):
            raise HypergradientError(
                f"{where}: {self.bias!r} has shape {tuple(b.shape)}, expected ({d_out},)."
            )
        return torch.cat([V, b[:, None]], dim=1)

    def from_matrix(self, M: torch.Tensor, like) -> dict[str, torch.Tensor]:
        """Split ``(d_out, d_in')`` back into the weight (and bias) leaves of ``like``."""
        cols = M.shape[1] - (self.bias is not None)
        W = M[:, :cols]
        if self.weight_layout == "in_out":
            W = W.T
        out = {self.weight: W.reshape(like[self.weight].shape)}
        if self.bias is not None:
            out[self.bias] = M[:, cols]
        return out
