r"""SketchySGD (Frangella, Rathore, Zhao & Udell, SIAM J. Math. Data Sci. 2024).

SGD preconditioned by a randomized low-rank Nyström approximation of a sub-sampled Hessian,
with a step size it computes itself.  With :math:`w` all parameters flattened into one
vector of length ``p``, every ``update_freq`` steps (the paper: once per epoch)

1. **sketch** the Hessian :math:`H_S = \nabla^2 f_S(w)` of a Hessian batch ``S``
   (``b_H`` examples; the paper uses :math:`b_H \approx \sqrt n`) with ``r`` Hessian-vector
   products against an orthonormalised Gaussian test matrix :math:`\Omega \in \mathbb
   R^{p\times r}`, and form the rank-``r`` Nyström approximation
   :math:`\hat H = U \hat\Lambda U^\top` (:func:`randomized_nystrom`);
2. take the **preconditioner** :math:`P = \hat H + \rho I`, applied by Woodbury's formula
   in :math:`O(pr)`:
   :math:`P^{-1} g = U(\hat\Lambda + \rho I)^{-1} U^\top g + \rho^{-1}(g - UU^\top g)`;
3. set the **step size** :math:`\eta = \alpha / \hat\lambda` with
   :math:`\hat\lambda = \max_{k \le K} \lambda_{\max}(P^{-1/2} H_{B_k} P^{-1/2})`, the
   largest preconditioned curvature of :math:`K` = ``step_batches`` (default 8) fresh,
   independent batches :math:`B_k` *of the gradient batch's size*, each top eigenvalue
   from ``eig_iters`` Hessian-vector products (Lanczos).  ``step_batches=1`` with a
   Hessian batch for :math:`B_1` is the paper's rule;

and every step, with the mini-batch gradient :math:`g` (``p.grad``),

.. math::
    w \leftarrow w - \eta\, P^{-1} g .

:math:`\alpha` is the parameter group's ``lr`` (default ½, the value of the authors' code),
so ``torch.optim.lr_scheduler`` schedulers scale the automatic step as they would scale an
ordinary learning rate.

**Why the largest curvature of several gradient-sized batches.**  A step with batch
:math:`B` contracts along the preconditioned curvature only while :math:`\eta\,
\lambda_{\max}(P^{-1/2} H_B P^{-1/2}) < 2`, and the batches that matter are the ones the
gradient steps use.  Two things make one Hessian batch a poor proxy for them: the extreme
eigenvalues of a small batch's Hessian exceed those of the mean Hessian (Granziol et al.
2022, papers.md section 9), and :math:`\lambda_{\max}` of one random batch is itself a
heavy-tailed estimate whose *low* draws give steps many times too long (the step is
:math:`1/\lambda`).  On unscaled breast_cancer logistic regression (batch 32,
``benchmarks/sketchy_logreg.py``) the paper's estimate from one 23-example batch fell as
low as 1/100 of :math:`\lambda_{\max}` of the full-data preconditioned Hessian, and below
1/4 of it - where :math:`0.5/\lambda` is too long even for full-batch gradient descent - at
6 % of the refreshes.  The epochs in which the loss jumped more than 10x began with
:math:`\eta\lambda_{\max}` of the full-data preconditioned Hessian at a median 1.7 (0.4 in
the other epochs), and the stale preconditioner let it grow to a median 5 within the epoch
as :math:`w` moved.  The maximum over :math:`K` independent draws estimates the
:math:`K/(K+1)` quantile of the batch curvature, and falls below its median with
probability :math:`2^{-K}` per refresh (0.4 % for :math:`K = 8`); the rule needs no
knowledge of the problem.  With it the estimate never fell below 0.7x the full-data value
there, the defaults converged in every seed at gradient batches 8, 32 and 128, and at
batch 32 they end 30 epochs 38x below the best of 19 SGD learning rates, where the paper's
rule ended worse than the starting point in 7 of 10 seeds.  The price: slower first
epochs (a step about 2x shorter than the paper's median one) and ``step_batches *
eig_iters`` Hessian-vector products on gradient-sized batches per refresh.

.. warning::
    Give ``curvature_closure`` (batches of the gradient batch's size) when the Hessian
    batches are larger than the gradient batches.  Without it the step batches are Hessian
    batches, which underestimates the curvature of smaller gradient batches: in the
    benchmark at gradient batch 8 (Hessian batches of 23) 3 of 10 seeds still blew up.

The Nyström approximation needs a positive semi-definite Hessian (a convex loss, or a
Gauss-Newton closure); for an indefinite one the sketch is shifted until its core is
positive definite and negative curvature is dropped (see :func:`randomized_nystrom`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import HypergradientError

__all__ = [
    "NystromApproximation",
    "SketchySGD",
    "nystrom_from_sketch",
    "randomized_nystrom",
    "top_eigenvalue",
]

_WHERE = "hypergradient.optimizers.SketchySGD"
# keys that configure the one preconditioner shared by all parameter groups
_OPTIMIZER_WIDE = (
    "rank",
    "rho",
    "update_freq",
    "eig_iters",
    "step_batches",
    "auto_lr",
    "generator",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------
# Nyström approximation and its Woodbury inverse
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NystromApproximation:
    r"""A rank-``r`` positive semi-definite approximation :math:`\hat H = U\,\mathrm{diag}
    (\lambda)\,U^\top` of a symmetric ``(p, p)`` matrix.

    Attributes:
        basis: ``U``, shape ``(p, r)``, orthonormal columns.
        eigenvalues: :math:`\lambda`, shape ``(r,)``, non-negative, in descending order.
        shift: the shift :math:`\nu` that stabilised the sketch (removed again from
            ``eigenvalues``); larger than the rounding-level default when the sketched
            matrix was indefinite.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    shift: float

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def matrix(self) -> torch.Tensor:
        r""":math:`\hat H` as a dense ``(p, p)`` tensor (for tests and small problems)."""
        return (self.basis * self.eigenvalues) @ self.basis.mT

    def _check(self, where: str, g: torch.Tensor, rho: float) -> None:
        if not _is_real(rho) or not math.isfinite(rho) or rho <= 0:
            raise HypergradientError(
                f"{where}: rho must be a finite number > 0 (the regulariser of "
                f"H_hat + rho I), got {rho!r}."
            )
        p = self.basis.shape[0]
        if not isinstance(g, torch.Tensor) or g.ndim not in (1, 2) or g.shape[0] != p:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise HypergradientError(
                f"{where}: expected a vector of shape ({p},) or a block ({p}, k), got {shape}."
            )

    def _apply(self, g: torch.Tensor, inner: torch.Tensor, outer: float) -> torch.Tensor:
        # U f(Lambda) U^T g + f(rho) (g - U U^T g): f acts on the r sketched directions and
        # as the constant f(rho) on their orthogonal complement
        coeff = self.basis.mT @ g
        scaled = coeff * (inner if g.ndim == 1 else inner[:, None])
        return self.basis @ scaled + outer * (g - self.basis @ coeff)

    def solve(self, g: torch.Tensor, rho: float) -> torch.Tensor:
        r""":math:`(\hat H + \rho I)^{-1} g` by Woodbury's formula.

        .. math::
            (\hat H + \rho I)^{-1} g = U(\Lambda + \rho I)^{-1} U^\top g
            + \rho^{-1}(g - UU^\top g)

        Args:
            g: shape ``(p,)`` or ``(p, k)``.
            rho: :math:`\rho > 0`.

        Cost: two products with ``U``, ``O(p r k)``; no ``(p, p)`` matrix is formed.
        """
        self._check("NystromApproximation.solve(g, rho)", g, rho)
        return self._apply(g, 1.0 / (self.eigenvalues + rho), 1.0 / rho)

    def inverse_sqrt(self, g: torch.Tensor, rho: float) -> torch.Tensor:
        r""":math:`(\hat H + \rho I)^{-1/2} g` (same cost as :meth:`solve`)."""
        self._check("NystromApproximation.inverse_sqrt(g, rho)", g, rho)
        return self._apply(g, torch.rsqrt(self.eigenvalues + rho), 1.0 / math.sqrt(rho))


def nystrom_from_sketch(omega: torch.Tensor, sketch: torch.Tensor) -> NystromApproximation:
    r"""The stable Nyström approximation from a test matrix and its image ``sketch = A omega``.

    Tropp, Yurtsever, Udell & Cevher (2017), Alg. 3: with :math:`\nu = \sqrt p\,
    \epsilon_{\text{mach}} \lVert Y\rVert_2`, :math:`Y_\nu = Y + \nu\Omega`,
    :math:`\Omega^\top Y_\nu = CC^\top` (Cholesky), :math:`B = Y_\nu C^{-\top}`,
    :math:`B = U\Sigma V^\top` (thin SVD): :math:`\hat A = U \max(\Sigma^2 - \nu, 0) U^\top
    = (A\Omega)(\Omega^\top A\Omega)^{+}(A\Omega)^\top` up to rounding.  If the core
    :math:`\Omega^\top Y_\nu` is not positive definite (``A`` indefinite, e.g. the Hessian of
    a non-convex loss), :math:`\nu` grows by :math:`2|\lambda_{\min}(\Omega^\top Y_\nu)|
    + \nu` (the authors' code adds :math:`|\lambda_{\min}|`; twice keeps the Cholesky factor
    well conditioned): the result approximates :math:`A + \nu I` and then subtracts
    :math:`\nu`, so negative curvature is clipped to zero.

    Args:
        omega: ``(p, r)`` with orthonormal columns.
        sketch: ``(p, r)``, ``A @ omega``.
    """
    p, r = sketch.shape
    eps = torch.finfo(sketch.dtype).eps
    shift = math.sqrt(p) * eps * float(torch.linalg.matrix_norm(sketch, ord=2))
    if shift == 0.0:  # A omega = 0: A vanishes on the sketched subspace
        zeros = torch.zeros(r, dtype=sketch.dtype, device=sketch.device)
        return NystromApproximation(omega, zeros, 0.0)
    # the shift keeps the core positive definite when rank(A) < r or rounding makes
    # Omega^T A Omega slightly indefinite; it is subtracted from the eigenvalues at the end
    shifted = sketch + shift * omega
    core = omega.mT @ shifted
    core = 0.5 * (core + core.mT)
    chol, info = torch.linalg.cholesky_ex(core)
    if int(info) != 0:
        extra = 2.0 * abs(float(torch.linalg.eigvalsh(core)[0])) + shift
        shifted = shifted + extra * omega
        core = core + extra * torch.eye(r, dtype=core.dtype, device=core.device)
        shift += extra
        chol = torch.linalg.cholesky(core)
    # B = Y_nu C^{-T}, so B B^T = Y_nu (Omega^T Y_nu)^{-1} Y_nu^T
    b = torch.linalg.solve_triangular(chol, shifted.mT, upper=False).mT
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    eigenvalues = torch.clamp(sigma.square() - shift, min=0.0)
    return NystromApproximation(u, eigenvalues, shift)


def _test_matrix(
    dim: int,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Gaussian ``(dim, rank)`` with orthonormalised columns (drawn where the generator is)."""
    where = generator.device if generator is not None else device
    gaussian = torch.randn(dim, rank, generator=generator, dtype=dtype, device=where)
    return torch.linalg.qr(gaussian.to(device)).Q


def randomized_nystrom(
    operator: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    *,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> NystromApproximation:
    r"""Randomized rank-``rank`` Nyström approximation of a symmetric PSD matrix ``A``.

    .. math::
        \hat A = (A\Omega)(\Omega^\top A\Omega)^{+}(A\Omega)^\top = U\hat\Lambda U^\top,
        \qquad \Omega = \mathrm{qr}(G),\ G \in \mathbb R^{p\times r} \text{ Gaussian}

    computed stably (:func:`nystrom_from_sketch`).  :math:`0 \preceq \hat A \preceq A`, and
    :math:`\hat A = A` (to rounding) when ``rank >= rank(A)``.

    Args:
        operator: ``A`` as a dense symmetric ``(p, p)`` tensor, or a function mapping a
            block ``X`` of shape ``(p, k)`` to ``A @ X`` (then give ``dim``).
        rank: ``r >= 1``; clipped to ``p``.
        dim: ``p``, for a function ``operator``.
        dtype, device: of the test matrix, for a function ``operator`` (defaults: torch's
            default dtype and device).
        generator: random generator for :math:`\Omega` (default: the global one).

    Returns:
        :class:`NystromApproximation` with ``basis`` ``(p, r)`` and ``eigenvalues`` ``(r,)``.

    Cost: ``r`` products with ``A`` (one block product), a QR and a thin SVD of a
    ``(p, r)`` matrix, ``O(p r^2)``.

    Examples:
        A rank-2 matrix is recovered exactly from a rank-3 sketch:

            >>> import torch
            >>> from hypergradient.optimizers.sketchy import randomized_nystrom
            >>> gen = torch.Generator().manual_seed(0)
            >>> g = torch.randn(6, 2, dtype=torch.float64, generator=gen)
            >>> a = g @ g.T
            >>> approx = randomized_nystrom(a, rank=3)
            >>> bool(torch.allclose(approx.matrix(), a, atol=1e-12))
            True

    References:
        J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. Fixed-rank approximation of a
        positive-semidefinite matrix from streaming data. NeurIPS 2017.
    """
    where = "hypergradient.optimizers.randomized_nystrom(operator, rank)"
    if isinstance(operator, torch.Tensor):
        if operator.ndim != 2 or operator.shape[0] != operator.shape[1]:
            raise HypergradientError(
                f"{where}: a tensor operator must be a square (p, p) matrix, got shape "
                f"{tuple(operator.shape)}."
            )
        if not operator.is_floating_point():
            raise HypergradientError(
                f"{where}: the matrix has dtype {operator.dtype}; use a floating dtype."
            )
        matrix = operator

        def matmat(block: torch.Tensor) -> torch.Tensor:
            return matrix @ block

        dim, dtype, device = matrix.shape[0], matrix.dtype, matrix.device
    elif callable(operator):
        if not _is_int(dim) or dim < 1:
            raise HypergradientError(
                f"{where}: for a function operator give dim=p (the size of the vectors it "
                f"acts on), got dim={dim!r}."
            )
        matmat = operator
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        device = torch.device(device) if device is not None else torch.get_default_device()
    else:
        raise HypergradientError(
            f"{where}: operator must be a (p, p) tensor or a function X (p, k) -> A @ X, "
            f"got {type(operator).__name__}."
        )
    if not _is_int(rank) or rank < 1:
        raise HypergradientError(f"{where}: rank must be an integer >= 1, got {rank!r}.")
    omega = _test_matrix(dim, min(int(rank), dim), dtype, device, generator)
    sketch = matmat(omega)
    if not isinstance(sketch, torch.Tensor) or sketch.shape != omega.shape:
        got = tuple(sketch.shape) if isinstance(sketch, torch.Tensor) else type(sketch).__name__
        raise HypergradientError(
            f"{where}: operator(X) must return a tensor of the shape of X, "
            f"{tuple(omega.shape)}; got {got}."
        )
    return nystrom_from_sketch(omega, sketch)


def top_eigenvalue(
    matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int
) -> float:
    r"""Largest-magnitude eigenvalue of a symmetric operator from ``steps`` products.

    Rayleigh-Ritz on the Krylov space :math:`\mathcal K_m(A, v) = \mathrm{span}\{v, Av, \dots,
    A^{m-1}v\}` (Lanczos with full reorthogonalisation, :math:`m` = ``min(steps, p)``):
    with an orthonormal basis :math:`V` of it, the result is the largest
    :math:`|\theta|` over the eigenvalues of :math:`V^\top A V`.  It contains the
    power-iteration estimate from the same ``m`` products, so it is never worse; it is
    exact once :math:`m` reaches ``p`` (or the space becomes invariant) and otherwise a
    slight underestimate of :math:`\lambda_{\max}` for a PSD ``A``.

    Cost: ``m`` products with ``A`` and ``O(p m^2)`` for the reorthogonalisation.
    """
    p = start.numel()
    steps = min(steps, p)
    basis = [start / torch.linalg.vector_norm(start)]
    images = []
    scale = 0.0
    for j in range(steps):
        image = matvec(basis[j])
        images.append(image)
        scale = max(scale, float(torch.linalg.vector_norm(image)))
        if j == steps - 1:
            break
        q = torch.stack(basis)
        w = image - q.mT @ (q @ image)
        w = w - q.mT @ (q @ w)  # twice is enough (Kahan-Parlett)
        norm = float(torch.linalg.vector_norm(w))
        if norm <= 100 * torch.finfo(w.dtype).eps * scale:
            break  # invariant subspace: the Ritz values are exact
        basis.append(w / norm)
    q = torch.stack(basis)
    projected = q @ torch.stack(images).mT  # (V^T A V)_ij = v_i . A v_j
    theta = torch.linalg.eigvalsh(0.5 * (projected + projected.mT))
    return float(theta.abs().max())


# --------------------------------------------------------------------------------------
# the optimizer
# --------------------------------------------------------------------------------------


class SketchySGD(torch.optim.Optimizer):
    r"""SGD preconditioned by a randomized Nyström approximation of the sub-sampled Hessian.

    Every step, with the mini-batch gradient :math:`g` in ``p.grad``:
    :math:`w \leftarrow w - \eta_k (\hat H + \rho I)^{-1} g`, where :math:`\hat H` is the
    rank-``rank`` Nyström approximation of a Hessian batch's Hessian and, with
    ``auto_lr=True``, :math:`\eta_k = \mathrm{lr}_k / \max_j \lambda_{\max}((\hat H + \rho I)
    ^{-1/2} H_{B_j} (\hat H + \rho I)^{-1/2})` over ``step_batches`` independent batches
    :math:`B_j`, for the ``lr`` of the parameter group ``k`` (see the module docstring for
    the rule and its rationale).  One preconditioner covers all parameters of all groups
    (their Hessian is sketched jointly); groups differ only by ``lr``.

    **The closures.**  Curvature comes from ``hessian_closure``: a function with no
    arguments that draws a *fresh* Hessian batch (the paper: about :math:`\sqrt n`
    examples, independent of the gradient batches), evaluates the model on it and returns
    the scalar loss of that batch - the same objective as the training loss, including
    any regularisation - *without* calling ``backward`` (the optimizer differentiates it
    twice with ``torch.autograd.grad``; ``.grad`` is left untouched).  It is called under
    ``torch.enable_grad()``, once per refresh for the sketch.  ``curvature_closure`` has
    the same contract but returns the loss of a fresh batch *of the gradient batch's size*;
    with ``auto_lr=True`` it is called ``step_batches`` times per refresh for the step size
    (if it is not given, ``hessian_closure`` is called instead, which is right when the
    Hessian batches are no larger than the gradient batches)::

        def hessian_closure():
            idx = torch.randint(n, (int(n ** 0.5),))  # a new Hessian batch per call
            return loss_fn(model(x[idx]), y[idx])

        def curvature_closure():
            idx = torch.randint(n, (batch_size,))  # as large as a gradient batch
            return loss_fn(model(x[idx]), y[idx])

    **When the preconditioner is refreshed.**  Either pass ``update_freq=k`` and give the
    closures to :meth:`step`: the preconditioner is rebuilt at steps ``0, k, 2k, ...``
    (``k`` = steps per epoch is the paper's schedule)::

        opt = SketchySGD(model.parameters(), update_freq=len(loader))
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step(hessian_closure=hessian_closure, curvature_closure=curvature_closure)

    or leave ``update_freq=None`` and call :meth:`update_preconditioner` yourself (e.g. at
    the start of every epoch); it must have been called before the first :meth:`step`.

    Args:
        params: parameters or parameter groups (dicts, as in ``torch.optim``), all of one
            floating dtype and on one device.  Groups may set ``lr`` only.
        lr: with ``auto_lr=True`` the multiplier :math:`\alpha` of the automatic step
            :math:`\eta = \alpha/\lambda_{\max}` (default 0.5, as in the authors' code; 1 is
            the classical :math:`1/L` step on the Hessian batch's quadratic model); with
            ``auto_lr=False`` the step size :math:`\eta` itself.  Schedulers may change it.
        rank: sketch size ``r`` (default 10, the paper's); clipped to the number of
            parameters.  Cost and memory grow linearly in it.
        rho: regulariser :math:`\rho > 0` of the preconditioner (default ``1e-3``).  Too
            small: huge steps along directions the sketch missed; too large: plain SGD
            with step :math:`\eta/\rho`.  If the loss already contains an ℓ2 term
            :math:`\tfrac\mu2\lVert w\rVert^2` it is part of :math:`H_S` - do not add
            :math:`\mu` to ``rho`` as well.
        update_freq: rebuild the preconditioner every this many :meth:`step` calls
            (``None``: only when :meth:`update_preconditioner` is called).
        eig_iters: Hessian-vector products for :math:`\lambda_{\max}` (:func:`top_eigenvalue`;
            default 10).
        step_batches: ``K``, the number of independent batches whose largest preconditioned
            curvature sets the step (default 8: the estimate falls below the median batch
            curvature with probability :math:`2^{-K}` per refresh; 1 without
            ``curvature_closure`` is the paper's rule).
        auto_lr: compute :math:`\eta` from :math:`\lambda_{\max}` (default) or use ``lr``.
        generator: random generator for the sketch's test matrices (default: a new one,
            seeded from torch's global generator, on the parameters' device).

    Cost of a refresh: one Hessian-closure forward and ``rank`` Hessian-vector products
    (one backward each) for the sketch, a thin SVD of a ``(p, rank)`` matrix, and with
    ``auto_lr`` ``step_batches`` curvature-closure forwards and ``step_batches * eig_iters``
    Hessian-vector products on them.  Per step: two
    products with the ``(p, rank)`` basis.  Memory: the basis, ``p x rank``.

    ``state_dict()`` holds the preconditioner, :math:`\lambda_{\max}`, the step counter
    and the generator's state, so a restored optimizer continues the same trajectory.

    Examples:
        Least squares, full batch: with ``rank = p`` the preconditioner is Newton's, and each
        step with ``lr=0.5`` halves the distance to the solution:

            >>> import torch
            >>> from hypergradient.optimizers import SketchySGD
            >>> gen = torch.Generator().manual_seed(0)
            >>> x = torch.randn(50, 4, dtype=torch.float64, generator=gen) * torch.tensor(
            ...     [1.0, 10.0, 100.0, 1000.0], dtype=torch.float64)   # badly scaled columns
            >>> y = torch.randn(50, dtype=torch.float64, generator=gen)
            >>> w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
            >>> def loss():
            ...     return 0.5 * ((x @ w - y) ** 2).mean()
            >>> opt = SketchySGD([w], rank=4, rho=1e-8, update_freq=20)
            >>> for _ in range(60):
            ...     opt.zero_grad()
            ...     loss().backward()
            ...     _ = opt.step(hessian_closure=loss)
            >>> w_star = torch.linalg.lstsq(x, y).solution
            >>> bool(torch.allclose(w.detach(), w_star, rtol=1e-8))
            True

    References:
        Z. Frangella, P. Rathore, S. Zhao, M. Udell. SketchySGD: Reliable Stochastic
        Optimization via Randomized Curvature Estimates. SIAM J. Math. Data Sci. 2024
        (arXiv 2211.08597).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.5,
        *,
        rank: int = 10,
        rho: float = 1e-3,
        update_freq: int | None = None,
        eig_iters: int = 10,
        step_batches: int = 8,
        auto_lr: bool = True,
        generator: torch.Generator | None = None,
    ):
        where = f"{_WHERE}(...)"
        if not _is_int(rank) or rank < 1:
            raise HypergradientError(
                f"{where}: rank must be an integer >= 1, got {rank!r} (10 in the paper)."
            )
        if not _is_real(rho) or not math.isfinite(rho) or rho <= 0:
            raise HypergradientError(
                f"{where}: rho must be a finite number > 0, got {rho!r} (1e-3 in the paper; "
                f"it regularises the preconditioner H_hat + rho I)."
            )
        if update_freq is not None and (not _is_int(update_freq) or update_freq < 1):
            raise HypergradientError(
                f"{where}: update_freq must be an integer >= 1 (steps between preconditioner "
                f"refreshes; the paper uses one epoch) or None, got {update_freq!r}."
            )
        if not _is_int(eig_iters) or eig_iters < 1:
            raise HypergradientError(
                f"{where}: eig_iters must be an integer >= 1, got {eig_iters!r}."
            )
        if not _is_int(step_batches) or step_batches < 1:
            raise HypergradientError(
                f"{where}: step_batches must be an integer >= 1 (independent batches whose "
                f"largest preconditioned curvature sets the step; 1 is the paper's rule), got "
                f"{step_batches!r}."
            )
        if not isinstance(auto_lr, bool):
            raise HypergradientError(f"{where}: auto_lr must be True or False, got {auto_lr!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise HypergradientError(
                f"{where}: generator must be a torch.Generator or None, got "
                f"{type(generator).__name__}."
            )
        self.rank = int(rank)
        self.rho = float(rho)
        self.update_freq = None if update_freq is None else int(update_freq)
        self.eig_iters = int(eig_iters)
        self.step_batches = int(step_batches)
        self.auto_lr = auto_lr
        super().__init__(params, {"lr": lr})
        if generator is None:
            # seeded from the global generator, so torch.manual_seed makes runs repeatable
            seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
            generator = torch.Generator(device=self._device()).manual_seed(seed)
        self.generator = generator
        self._sketch: dict[str, Any] = {
            "step": 0,
            "refreshes": 0,
            "basis": None,
            "eigenvalues": None,
            "shift": None,
            "lambda_max": None,
            "curvatures": (),
        }

    # ----------------------------------------------------------------------------------
    # parameters
    # ----------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        where = f"{_WHERE}(...)"
        if isinstance(param_group, dict):
            shared = sorted(k for k in param_group if k in _OPTIMIZER_WIDE)
            if shared:
                raise HypergradientError(
                    f"{where}: a parameter group sets {shared}, but one preconditioner is "
                    f"shared by all groups; pass these to SketchySGD(...) itself. Groups may "
                    f"set only `lr`."
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        lr = group["lr"]
        if not _is_real(lr) or not math.isfinite(lr) or lr <= 0:
            raise HypergradientError(f"{where}: lr must be a finite number > 0, got {lr!r}.")
        params = self._params()
        first = params[0]
        for p in params:
            if not p.is_floating_point():
                raise HypergradientError(
                    f"{where}: a parameter of shape {tuple(p.shape)} has dtype {p.dtype}; "
                    f"SketchySGD needs floating parameters."
                )
            if p.dtype != first.dtype or p.device != first.device:
                raise HypergradientError(
                    f"{where}: all parameters must share one dtype and device (they form one "
                    f"vector for the sketch); got {first.dtype} on {first.device} and "
                    f"{p.dtype} on {p.device}. Convert the model with `.to(...)` first."
                )

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _device(self) -> torch.device:
        return self._params()[0].device

    def _num_params(self) -> int:
        return sum(p.numel() for p in self._params())

    # ----------------------------------------------------------------------------------
    # curvature
    # ----------------------------------------------------------------------------------

    def _hessian_matvec(
        self,
        hessian_closure: Callable[[], torch.Tensor],
        where: str,
        name: str = "hessian_closure",
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Flat Hessian-vector products of one call of the closure (its graph is kept)."""
        if not callable(hessian_closure):
            raise HypergradientError(
                f"{where}: {name} must be a function of no arguments returning the "
                f"loss of a batch, got {type(hessian_closure).__name__}."
            )
        params = self._params()
        with torch.enable_grad():
            loss = hessian_closure()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = (
                    f"a tensor of shape {tuple(loss.shape)}"
                    if isinstance(loss, torch.Tensor)
                    else type(loss).__name__
                )
                raise HypergradientError(
                    f"{where}: {name}() must return the scalar loss of a batch, got {got}. "
                    f"Reduce it with `.mean()`."
                )
            if not bool(torch.isfinite(loss).all()):
                raise HypergradientError(
                    f"{where}: {name}() returned {loss.item()} (not finite); check "
                    f"the model and the step size."
                )
            if not loss.requires_grad:
                raise HypergradientError(
                    f"{where}: the loss returned by {name}() does not depend on the "
                    f"parameters (no autograd graph). Compute it from the model inside the "
                    f"closure, not under torch.no_grad(), and do not detach it."
                )
            grads = torch.autograd.grad(
                loss.reshape(()), params, create_graph=True, allow_unused=True
            )
        # gradients without a graph are constant in w: those blocks of H are zero
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        sizes = [p.numel() for p in params]

        def matvec(v: torch.Tensor) -> torch.Tensor:
            if not live:
                return torch.zeros_like(v)
            parts = [u.view_as(p) for u, p in zip(torch.split(v, sizes), params)]
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    params,
                    grad_outputs=[parts[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
            out = [
                torch.zeros(p.numel(), dtype=v.dtype, device=v.device)
                if h is None
                else h.reshape(-1)
                for h, p in zip(hv, params)
            ]
            return torch.cat(out)

        return matvec

    def update_preconditioner(
        self,
        hessian_closure: Callable[[], torch.Tensor],
        curvature_closure: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        r"""Rebuild :math:`\hat H` (and, with ``auto_lr``, :math:`\lambda_{\max}`) at the current w.

        Calls ``hessian_closure`` once for the sketch (``rank`` Hessian-vector products)
        and, with ``auto_lr=True``, ``curvature_closure`` (default: ``hessian_closure``)
        ``step_batches`` times: :math:`\lambda_{\max} = \max_k \lambda_{\max}((\hat H+\rho
        I)^{-1/2} H_{B_k} (\hat H+\rho I)^{-1/2})` over the independent batches
        :math:`B_k` it returns (``eig_iters`` products each).  See the class docstring for
        the closures' contract.
        """
        where = f"{_WHERE}.update_preconditioner(hessian_closure)"
        params = self._params()
        dtype, device = params[0].dtype, params[0].device
        dim = self._num_params()
        hvp = self._hessian_matvec(hessian_closure, where)
        omega = _test_matrix(dim, min(self.rank, dim), dtype, device, self.generator)
        sketch = torch.stack([hvp(omega[:, j]) for j in range(omega.shape[1])], dim=1)
        approx = nystrom_from_sketch(omega, sketch)
        curvatures: list[float] = []
        if self.auto_lr:
            if curvature_closure is None:
                curvature_closure, name = hessian_closure, "hessian_closure"
            else:
                name = "curvature_closure"
            rho = self.rho
            for _ in range(self.step_batches):
                batch_hvp = self._hessian_matvec(curvature_closure, where, name)

                def preconditioned(
                    v: torch.Tensor, batch_hvp: Callable = batch_hvp
                ) -> torch.Tensor:
                    return approx.inverse_sqrt(batch_hvp(approx.inverse_sqrt(v, rho)), rho)

                start = torch.randn(
                    dim, generator=self.generator, dtype=dtype, device=self.generator.device
                ).to(device)
                curvature = top_eigenvalue(preconditioned, start, self.eig_iters)
                if not math.isfinite(curvature) or curvature <= 0.0:
                    raise HypergradientError(
                        f"{where}: the preconditioned Hessian of a batch from {name}() has "
                        f"largest eigenvalue {curvature!r}, so the automatic step size "
                        f"1/lambda_max is undefined. Check that {name}() returns the "
                        f"training loss of a batch (a loss that is linear in the parameters "
                        f"has no curvature), or pass auto_lr=False and a fixed lr."
                    )
                curvatures.append(curvature)
        self._sketch.update(
            basis=approx.basis,
            eigenvalues=approx.eigenvalues,
            shift=approx.shift,
            lambda_max=max(curvatures) if curvatures else None,
            curvatures=tuple(curvatures),
            refreshes=self._sketch["refreshes"] + 1,
        )

    @property
    def preconditioner(self) -> NystromApproximation | None:
        r"""The current :math:`\hat H` (``None`` before the first refresh)."""
        if self._sketch["basis"] is None:
            return None
        return NystromApproximation(
            self._sketch["basis"], self._sketch["eigenvalues"], self._sketch["shift"]
        )

    @property
    def lambda_max(self) -> float | None:
        r""":math:`\lambda_{\max}` at the last refresh: the largest of :attr:`curvatures`."""
        return self._sketch["lambda_max"]

    @property
    def curvatures(self) -> tuple[float, ...]:
        r"""The ``step_batches`` estimates :math:`\lambda_{\max}(P^{-1/2} H_{B_k} P^{-1/2})`
        of the last refresh, one per batch (empty with ``auto_lr=False``)."""
        return self._sketch["curvatures"]

    @property
    def num_refreshes(self) -> int:
        """How many times the preconditioner has been built."""
        return self._sketch["refreshes"]

    @property
    def step_sizes(self) -> list[float]:
        r"""The step :math:`\eta` each parameter group takes now (``lr / lambda_max``)."""
        if not self.auto_lr:
            return [float(g["lr"]) for g in self.param_groups]
        if self.lambda_max is None:
            raise HypergradientError(
                f"{_WHERE}.step_sizes: no preconditioner yet; it is built at the first step "
                f"(update_freq) or by update_preconditioner(hessian_closure)."
            )
        return [float(g["lr"]) / self.lambda_max for g in self.param_groups]

    # ----------------------------------------------------------------------------------
    # the step
    # ----------------------------------------------------------------------------------

    def step(
        self,
        closure: Callable[[], float] | None = None,
        hessian_closure: Callable[[], torch.Tensor] | None = None,
        curvature_closure: Callable[[], torch.Tensor] | None = None,
    ) -> float | None:
        r"""One preconditioned step on every parameter that has a gradient.

        Args:
            closure: optional, as in ``torch.optim``: re-evaluates the loss of a gradient
                batch, calls ``backward`` and returns the loss.
            hessian_closure: returns the loss of a fresh Hessian batch without calling
                ``backward`` (class docstring); needed on the steps where the
                preconditioner is rebuilt (every ``update_freq`` steps, from the first).
            curvature_closure: optional; returns the loss of a fresh batch of the gradient
                batch's size, for the step size (default: ``hessian_closure``; class
                docstring).

        Returns:
            ``closure()``'s value, if a closure was given.
        """
        where = f"{_WHERE}.step()"
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        due = self.update_freq is not None and self._sketch["step"] % self.update_freq == 0
        given = [
            name
            for name, fn in (
                ("hessian_closure", hessian_closure),
                ("curvature_closure", curvature_closure),
            )
            if fn is not None
        ]
        if given and self.update_freq is None:
            raise HypergradientError(
                f"{where}: a {given[0]} was given but update_freq is None, so step() "
                f"never rebuilds the preconditioner and would ignore it. Pass "
                f"update_freq=k to SketchySGD(...), or call "
                f"opt.update_preconditioner(hessian_closure) yourself."
            )
        if curvature_closure is not None and hessian_closure is None:
            raise HypergradientError(
                f"{where}: curvature_closure was given without hessian_closure; the "
                f"preconditioner needs both on refresh steps. Pass "
                f"opt.step(hessian_closure=fn_h, curvature_closure=fn_c)."
            )
        if due:
            if hessian_closure is None:
                raise HypergradientError(
                    f"{where}: step {self._sketch['step']} rebuilds the preconditioner "
                    f"(update_freq={self.update_freq}) and needs the loss of a Hessian batch: "
                    f"call opt.step(hessian_closure=fn) with fn() returning that loss "
                    f"(without calling backward)."
                )
            self.update_preconditioner(hessian_closure, curvature_closure)
        approx = self.preconditioner
        if approx is None:
            raise HypergradientError(
                f"{where}: there is no preconditioner yet. Call "
                f"opt.update_preconditioner(hessian_closure) before the first step, or "
                f"construct SketchySGD(..., update_freq=k) and pass hessian_closure to step()."
            )
        params = self._params()
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise HypergradientError(
                    f"{where}: a parameter of shape {tuple(p.grad.shape)} has a sparse "
                    f"gradient; SketchySGD needs dense gradients."
                )
        with torch.no_grad():
            grad = torch.cat(
                [
                    torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                    if p.grad is None
                    else p.grad.reshape(-1)
                    for p in params
                ]
            )
            direction = approx.solve(grad, self.rho)
            offset = 0
            for group, eta in zip(self.param_groups, self.step_sizes):
                for p in group["params"]:
                    n = p.numel()
                    # parameters without a gradient stay put, as in torch.optim.SGD
                    if p.grad is not None:
                        p.add_(direction[offset : offset + n].view_as(p), alpha=-eta)
                    offset += n
        self._sketch["step"] += 1
        return loss

    # ----------------------------------------------------------------------------------
    # checkpointing
    # ----------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; copy.deepcopy
        # and pickle also need the settings and the preconditioner
        state = super().__getstate__()
        for key in (*_OPTIMIZER_WIDE, "_sketch"):
            state[key] = self.__dict__[key]
        return state

    def _config(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "rho": self.rho,
            "auto_lr": self.auto_lr,
            "num_params": self._num_params(),
        }

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict plus ``"sketchy"``: preconditioner, counters, RNG."""
        out = super().state_dict()
        sketch = {
            k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in self._sketch.items()
        }
        out["sketchy"] = {
            **sketch,
            "config": self._config(),
            "generator_state": self.generator.get_state(),
            "generator_device": self.generator.device.type,
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        where = f"{_WHERE}.load_state_dict(state_dict)"
        saved = state_dict.get("sketchy") if isinstance(state_dict, dict) else None
        if not isinstance(saved, dict):
            raise HypergradientError(
                f"{where}: the state dict has no 'sketchy' entry; it was not saved by "
                f"SketchySGD.state_dict()."
            )
        mine = self._config()
        theirs = saved.get("config", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in diff.items())
            raise HypergradientError(
                f"{where}: the saved optimizer does not match this one ({listed}). Build "
                f"SketchySGD with the saved settings over the same parameters."
            )
        if saved.get("generator_device") != self.generator.device.type:
            raise HypergradientError(
                f"{where}: the saved generator was on {saved.get('generator_device')!r}, this "
                f"optimizer's is on {self.generator.device.type!r}; its state cannot be "
                f"restored. Pass generator=torch.Generator(device=...) on the saved device."
            )
        super().load_state_dict(state_dict)
        device, dtype = self._device(), self._params()[0].dtype
        # copies, so that training on does not write into the caller's state dict
        self._sketch = {
            k: (
                saved[k].detach().to(device=device, dtype=dtype, copy=True)
                if isinstance(saved[k], torch.Tensor)
                else saved[k]
            )
            for k in ("step", "refreshes", "basis", "eigenvalues", "shift", "lambda_max")
        }
        self._sketch["curvatures"] = tuple(saved.get("curvatures", ()))
        self.generator.set_state(saved["generator_state"].clone())
