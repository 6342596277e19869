r"""Hessian spectra by stochastic Lanczos quadrature, and learning rates from them.

The Hessian of a model's loss is never formed: every tool here needs only products
:math:`u \mapsto Hu`, which :class:`hypergradient.linalg.operators.HessianOperator` answers
with one backward pass through a retained gradient graph (or the positive semi-definite
Gauss-Newton product, :class:`~hypergradient.linalg.operators.GaussNewtonOperator`).

* :func:`lanczos` - ``m`` steps of the Lanczos recursion with full reorthogonalisation:
  :math:`H V_m = V_m T_m + \beta_m v_{m+1} e_m^\top`, ``T`` tridiagonal.
* :func:`top_eigenvalues` - the largest Ritz values of ``T`` and their residual bounds.
* :func:`spectral_density` - stochastic Lanczos quadrature: from random starting vectors
  ``v``, :math:`v^\top f(H) v \approx \sum_j \tau_j f(\theta_j)` with Ritz values
  :math:`\theta_j` and weights :math:`\tau_j` (squared first components of ``T``'s
  eigenvectors); averaging over ``v`` and broadening every node with a Gaussian gives a
  smooth estimate of the eigenvalue density :math:`\frac1P\sum_i\delta(t - \lambda_i)`.
* :func:`propose_learning_rate` - Granziol, Zohren & Roberts (JMLR 2022): the Hessian of a
  mini-batch of size ``B`` has a larger top eigenvalue than the full-data Hessian
  (:math:`\lambda'_1 \approx \lambda_1 + \frac{P}{B}\frac{\sigma^2}{\lambda_1}`), so the
  largest stable SGD rate :math:`2/\lambda'_1` grows linearly with ``B`` while the noise
  term dominates and saturates at :math:`2/\lambda_1`; for Adam the rate grows as
  :math:`\sqrt B`.
* :func:`scale_learning_rate` - moves a tuned rate to another batch size by a power law
  :math:`(B'/B)^a`: ``"linear"``, ``"sqrt"``, any exponent, or by default the rule this
  project measured for the optimizer family (``benchmarks/optimizers_in_training_batch_size.py``).

Conventions: vectors are flat (the model's trainable parameters concatenated in
``named_parameters`` order); ``loss_fn(outputs, targets)`` returns the *mean* loss over
the batch, the quantity ``torch.optim`` steps on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .._errors import HypergradientError
from ..linalg.operators import GaussNewtonLoss, GaussNewtonOperator, HessianOperator

__all__ = [
    "Eigenvalues",
    "LanczosResult",
    "LearningRateProposal",
    "SpectralDensity",
    "SymmetricOperator",
    "curvature_operator",
    "hessian_eigenvalues",
    "hessian_spectral_density",
    "lanczos",
    "propose_learning_rate",
    "scale_learning_rate",
    "spectral_density",
    "top_eigenvalues",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_KINDS = ("hessian", "gauss_newton")
_OPTIMIZERS = ("sgd", "adam")


# ======================================================================================
# Operators on flat vectors
# ======================================================================================


class SymmetricOperator:
    r"""A symmetric linear map :math:`u \mapsto Au` on flat vectors of length ``dim``.

    Args:
        matvec: ``matvec(u) -> A u`` for ``u`` of shape ``(dim,)``.
        dim: the dimension (for a model: its number of trainable parameters).
        dtype, device: of the vectors ``matvec`` accepts.

    ``num_matvecs`` counts the products taken so far (the cost unit of this module).

    Examples:
        >>> import torch
        >>> from hypergradient.optimizers import SymmetricOperator
        >>> op = SymmetricOperator(lambda u: 2.0 * u, 3, dtype=torch.float32)  # A = 2 I
        >>> op(torch.ones(3)).tolist(), op.dim, op.num_matvecs
        ([2.0, 2.0, 2.0], 3, 1)
        >>> a = SymmetricOperator.from_matrix(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
        >>> a(torch.tensor([1.0, 0.0])).tolist()  # the first column
        [2.0, 1.0]
    """

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        if not callable(matvec):
            raise HypergradientError(
                f"SymmetricOperator(matvec, dim): `matvec` must be callable, got "
                f"{type(matvec).__name__}."
            )
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise HypergradientError(
                f"SymmetricOperator(matvec, dim): `dim` must be an int >= 1, got {dim!r}."
            )
        self._matvec = matvec
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_matvecs = 0

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> SymmetricOperator:
        """The operator of a dense symmetric ``(n, n)`` matrix (tests, small problems)."""
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise HypergradientError(
                f"SymmetricOperator.from_matrix(matrix): expected a square matrix, got shape "
                f"{tuple(matrix.shape)}."
            )
        return cls(lambda u: matrix @ u, matrix.shape[0], dtype=matrix.dtype, device=matrix.device)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1
        return self._matvec(u)


def _trainable(model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise HypergradientError(f"{where}: `model` must be an nn.Module, got {type(model)}.")
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise HypergradientError(
            f"{where}: `model` has no trainable parameters (requires_grad=True); there is no "
            f"Hessian to measure."
        )
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise HypergradientError(
            f"{where}: the trainable parameters must share one floating dtype, got "
            f"{sorted(str(d) for d in dtypes)}. Convert the model with `.double()` or `.float()`."
        )
    return params


def _check_data(where: str, data: object) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        not isinstance(data, (tuple, list))
        or len(data) != 2
        or not all(isinstance(t, torch.Tensor) for t in data)
    ):
        raise HypergradientError(
            f"{where}: `data` must be a pair (inputs, targets) of tensors, got "
            f"{type(data).__name__}. Pass e.g. (split.x_train, split.y_train)."
        )
    x, y = data
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise HypergradientError(
            f"{where}: inputs and targets must have the same (>= 1) number of rows, got "
            f"shapes {tuple(x.shape)} and {tuple(y.shape)}."
        )
    return x, y


def _detached_function(model: nn.Module) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """``f(params, x) = model(x)`` with the weights ``params`` and private copies of the
    buffers: a training-mode BatchNorm updates the copies, never the model's statistics
    (restoring them in place afterwards would break the retained graph, whose backward
    reads them)."""
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}

    def call(params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, **buffers}, (x,))

    return call


def curvature_operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    kind: str = "hessian",
) -> SymmetricOperator:
    r"""The Hessian (or Gauss-Newton matrix) of ``loss_fn(model(x), y)`` at the model's weights.

    .. math::
        H = \nabla^2_w \, \ell(f(w; x), y) \quad (\texttt{kind="hessian"}), \qquad
        G = J^\top \nabla^2_f \ell\, J \quad (\texttt{kind="gauss_newton"}, \succeq 0),

    on the flat parameter vector (``named_parameters`` order, trainable ones only).  The
    whole of ``data`` is one batch: pass a mini-batch to get the mini-batch Hessian.

    Args:
        model: the network, called with its current mode (``train()``/``eval()``); its
            weights and buffers are never changed (a training-mode BatchNorm updates
            private copies of its statistics).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (a mean over the batch).
        data: ``(inputs, targets)``.
        kind: ``"hessian"`` (exact, possibly indefinite) or ``"gauss_newton"``.

    Returns:
        A :class:`SymmetricOperator` of dimension :math:`P` (the number of weights).

    Cost: one forward and one double-backward graph when built (retained; memory of one
    training step on ``data``); one backward per product (three for ``"gauss_newton"``).

    Examples:
        Least squares with a linear model: the Hessian is ``x^T x / N``, here ``diag(1, 4)``, and
        equals the Gauss-Newton matrix:

        >>> import torch
        >>> from hypergradient.optimizers import curvature_operator
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]) * 2**0.5
        >>> loss = lambda out, t: 0.5 * ((out - t) ** 2).mean()
        >>> H = curvature_operator(model, loss, (x, torch.zeros(2, 1)))
        >>> G = curvature_operator(model, loss, (x, torch.zeros(2, 1)), kind="gauss_newton")
        >>> u, Hu = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 4.0])
        >>> H.dim, bool(torch.allclose(H(u), Hu)), bool(torch.allclose(G(u), Hu))
        (2, True, True)
    """
    where = "curvature_operator(model, loss_fn, data, kind)"
    params = _trainable(model, where)
    x, y = _check_data(where, data)
    if kind not in _KINDS:
        raise HypergradientError(f"{where}: `kind` must be one of {_KINDS}, got {kind!r}.")
    if not callable(loss_fn):
        raise HypergradientError(f"{where}: `loss_fn` must be callable, got {type(loss_fn)}.")
    f = _detached_function(model)
    if kind == "hessian":
        op = HessianOperator(
            lambda p, _h: loss_fn(f(p, x), y), params, {}, where=f"{where} (kind='hessian')"
        )
    else:
        gn = GaussNewtonLoss(lambda p, _h: f(p, x), lambda out, _h: loss_fn(out, y))
        op = GaussNewtonOperator(gn, params, {}, where=f"{where} (kind='gauss_newton')")
    keys = list(params)
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]
    first = params[keys[0]]

    def matvec(u: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(u, sizes)
        out = op.matvec({k: piece.view(s) for k, piece, s in zip(keys, pieces, shapes)})
        return torch.cat([out[k].reshape(-1) for k in keys])

    return SymmetricOperator(matvec, sum(sizes), dtype=first.dtype, device=first.device)


# ======================================================================================
# Lanczos
# ======================================================================================


@dataclass(frozen=True)
class LanczosResult:
    r"""The tridiagonal matrix of an ``m``-step Lanczos run.

    Attributes:
        alphas: diagonal of :math:`T_m`, shape ``(m,)``.
        betas: off-diagonal of :math:`T_m`, shape ``(m - 1,)``.
        last_beta: :math:`\beta_m`, the norm of the residual that would start step
            ``m + 1`` (0 when the Krylov space became invariant: then ``T``'s eigenvalues
            are exact eigenvalues of the operator).
        num_matvecs: products taken (``m``).

    Examples:
        A start vector inside an invariant subspace stops the recursion early:

        >>> import torch
        >>> from hypergradient.optimizers import SymmetricOperator, lanczos
        >>> op = SymmetricOperator.from_matrix(torch.diag(torch.tensor([1.0, 2.0, 5.0])))
        >>> res = lanczos(op, torch.tensor([1.0, 1.0, 0.0]), num_steps=3)  # never sees 5
        >>> res.num_matvecs, res.last_beta, res.tridiagonal().shape
        (2, 0.0, torch.Size([2, 2]))
        >>> [round(v, 4) for v in res.ritz()[0].tolist()]  # exact eigenvalues, ascending
        [1.0, 2.0]
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    last_beta: float
    num_matvecs: int

    def tridiagonal(self) -> torch.Tensor:
        """:math:`T_m` as a dense ``(m, m)`` matrix."""
        return torch.diag(self.alphas) + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values (ascending, shape ``(m,)``) and ``T``'s eigenvectors (columns)."""
        return torch.linalg.eigh(self.tridiagonal())


def lanczos(operator: SymmetricOperator, start: torch.Tensor, num_steps: int) -> LanczosResult:
    r"""``num_steps`` Lanczos steps from ``start``, with full reorthogonalisation.

    .. math::
        w = A v_j - \beta_{j-1} v_{j-1}, \quad \alpha_j = v_j^\top w, \quad
        w \leftarrow (I - V_j V_j^\top)^2 (w - \alpha_j v_j), \quad
        \beta_j = \|w\|, \quad v_{j+1} = w / \beta_j .

    The reorthogonalisation (done twice: "twice is enough") keeps :math:`V` orthonormal in
    floating point, so no spurious copies of converged Ritz values appear (the known
    failure of plain Lanczos).  The recursion stops early, with ``last_beta = 0``, when
    :math:`\beta_j` falls to rounding level: the Krylov space is then invariant.

    Args:
        operator: a symmetric :class:`SymmetricOperator`.
        start: the starting vector, shape ``(dim,)``, non-zero (normalised here).
        num_steps: ``m``, capped at ``dim``.

    Returns:
        :class:`LanczosResult`.

    Cost: ``m`` products; memory ``m * dim`` for the basis.

    Examples:
        A diagonal matrix is recovered exactly after ``dim`` steps:

        Examples:
            >>> import torch
            >>> op = SymmetricOperator.from_matrix(torch.diag(torch.tensor([1.0, 2.0, 5.0])))
            >>> res = lanczos(op, torch.ones(3), num_steps=3)
            >>> [round(v, 4) for v in res.ritz()[0].tolist()]  # float32: exact to ~1e-6
            [1.0, 2.0, 5.0]
    """
    where = "lanczos(operator, start, num_steps)"
    if not isinstance(operator, SymmetricOperator):
        raise HypergradientError(
            f"{where}: `operator` must be a SymmetricOperator, got {type(operator).__name__}. "
            f"Wrap a matvec with SymmetricOperator(matvec, dim, dtype=...)."
        )
    if start.shape != (operator.dim,):
        raise HypergradientError(
            f"{where}: `start` must have shape ({operator.dim},), got {tuple(start.shape)}."
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise HypergradientError(f"{where}: `num_steps` must be an int >= 1, got {num_steps!r}.")
    norm = torch.linalg.vector_norm(start)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise HypergradientError(f"{where}: `start` must be finite and non-zero.")
    m = min(num_steps, operator.dim)
    basis = torch.empty(m, operator.dim, dtype=start.dtype, device=start.device)
    basis[0] = start / norm
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0  # running estimate of ||T||, for the breakdown test
    last_beta = 0.0
    for j in range(m):
        w = operator(basis[j])
        if not bool(torch.isfinite(w).all()):
            raise HypergradientError(
                f"{where}: the operator returned NaN/inf at step {j + 1}; the loss or the "
                f"weights are not finite."
            )
        alpha = torch.dot(basis[j], w)
        w = w - alpha * basis[j]
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(float(alpha))
        scale = max(scale, abs(float(alpha)), beta)
        # breakdown: the Krylov space is invariant (to rounding), T's eigenvalues are exact
        invariant = beta <= 100 * torch.finfo(start.dtype).eps * max(scale, 1e-300)
        if j == m - 1 or invariant:
            last_beta = 0.0 if invariant else beta
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    kwargs = {"dtype": torch.float64, "device": start.device}
    return LanczosResult(
        alphas=torch.tensor(alphas, **kwargs),
        betas=torch.tensor(betas, **kwargs),
        last_beta=last_beta,
        num_matvecs=len(alphas),
    )


def _start_vector(
    dim: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator, kind: str
) -> torch.Tensor:
    # drawn on the CPU from a seeded generator: the same vectors on every device
    if kind == "rademacher":
        v = torch.randint(0, 2, (dim,), generator=generator, device="cpu").double() * 2 - 1
    else:
        v = torch.randn(dim, generator=generator, dtype=torch.float64, device="cpu")
    return v.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class Eigenvalues:
    r"""Largest eigenvalues of a symmetric operator, from Lanczos.

    Attributes:
        values: the ``k`` largest Ritz values, descending, shape ``(k,)``.
        residuals: for each, :math:`\beta_m |s_{m,i}|`: the operator has an eigenvalue
            within this distance of ``values[i]`` (a rigorous bound for symmetric matrices).
        num_matvecs: products taken.

    Examples:
        >>> import torch
        >>> from hypergradient.optimizers import SymmetricOperator, top_eigenvalues
        >>> op = SymmetricOperator.from_matrix(torch.diag(torch.tensor([1.0, 3.0, 7.0])))
        >>> ev = top_eigenvalues(op, k=2, num_steps=3)
        >>> ev.values.shape, ev.num_matvecs, bool((ev.residuals < 1e-4).all())
        (torch.Size([2]), 3, True)
        >>> [round(v, 3) for v in ev.values.tolist()]  # the largest two, descending
        [7.0, 3.0]
    """

    values: torch.Tensor
    residuals: torch.Tensor
    num_matvecs: int


def top_eigenvalues(
    operator: SymmetricOperator, k: int = 1, *, num_steps: int = 30, seed: int = 0
) -> Eigenvalues:
    r"""The ``k`` largest (algebraic) eigenvalues of ``operator``, by Lanczos.

    One Lanczos run of ``num_steps`` steps from a seeded Gaussian vector; the top Ritz
    values of :math:`T_m` converge first (fastest when well separated from the rest).
    Check ``residuals`` (a bound on the error) and raise ``num_steps`` if it is large.

    Args:
        operator: a symmetric :class:`SymmetricOperator`.
        k: how many, ``1 <= k <= num_steps``.
        num_steps: Lanczos steps (products), capped at ``operator.dim``.
        seed: of the starting vector.

    Returns:
        :class:`Eigenvalues`.

    Examples:

        >>> import torch
        >>> a = torch.diag(torch.arange(1.0, 101.0))       # eigenvalues 1..100
        >>> ev = top_eigenvalues(SymmetricOperator.from_matrix(a), k=2, num_steps=60)
        >>> bool((ev.residuals < 1e-4).all())   # each within 1e-4 of a true eigenvalue
        True
        >>> [round(v, 2) for v in ev.values.tolist()]  # digits well above that bound
        [100.0, 99.0]
    """
    where = "top_eigenvalues(operator, k, num_steps)"
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_steps:
        raise HypergradientError(
            f"{where}: `k` must be an int in [1, num_steps={num_steps}], got {k!r}; raise "
            f"num_steps to get more eigenvalues."
        )
    generator = torch.Generator().manual_seed(seed)
    start = _start_vector(operator.dim, operator.dtype, operator.device, generator, "gaussian")
    res = lanczos(operator, start, num_steps)
    theta, s = res.ritz()
    k = min(k, theta.numel())
    order = torch.argsort(theta, descending=True)[:k]
    residuals = res.last_beta * s[-1, order].abs()
    return Eigenvalues(values=theta[order], residuals=residuals, num_matvecs=res.num_matvecs)


# ======================================================================================
# Stochastic Lanczos quadrature
# ======================================================================================


@dataclass(frozen=True)
class SpectralDensity:
    r"""A Gaussian-broadened estimate of the eigenvalue density of a symmetric operator.

    .. math::
        \hat\rho(t) = \frac1{n_v} \sum_{v=1}^{n_v} \sum_{j=1}^{m}
        \tau^{(v)}_j \, \frac{1}{\sigma\sqrt{2\pi}}
        \exp\!\Big(-\frac{(t - \theta^{(v)}_j)^2}{2\sigma^2}\Big)
        \;\approx\; \frac1P \sum_{i=1}^P \delta(t - \lambda_i) * \mathcal N(0, \sigma^2).

    Attributes:
        grid: points ``t``, shape ``(num_points,)``.
        density: :math:`\hat\rho` on ``grid`` (integrates to 1 up to the tails cut off).
        nodes: Ritz values :math:`\theta^{(v)}_j`, shape ``(n_v, m)``.
        weights: quadrature weights :math:`\tau^{(v)}_j \ge 0`, each row sums to 1.
        sigma: the broadening width.
        dim: :math:`P`.
        num_matvecs: products taken.

    Examples:
        ``A = diag(1, 4)``: every normalised Rademacher vector gives the exact moments
        :math:`\frac1P \operatorname{tr} A = 2.5` and :math:`\frac1P \operatorname{tr} A^2 = 8.5`:

        >>> import torch
        >>> from hypergradient.optimizers import SymmetricOperator, spectral_density
        >>> op = SymmetricOperator.from_matrix(torch.diag(torch.tensor([1.0, 4.0])))
        >>> sd = spectral_density(op, num_vectors=3, num_steps=2)
        >>> sd.grid.shape, sd.density.shape, sd.nodes.shape, sd.dim  # 3 vectors x 2 nodes
        (torch.Size([1000]), torch.Size([1000]), torch.Size([3, 2]), 2)
        >>> round(sd.moment(1), 3), round(sd.moment(2), 3)
        (2.5, 8.5)
        >>> round(float(torch.trapezoid(sd.density, sd.grid)), 3)  # a probability density
        1.0
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    dim: int
    num_matvecs: int

    def moment(self, power: int) -> float:
        r""":math:`\frac1P \operatorname{tr}(A^p)` estimated: :math:`\frac1{n_v}\sum_v\sum_j
        \tau_j \theta_j^p` (exact for each ``v``, i.e. :math:`v^\top A^p v`, when
        :math:`p < 2m`)."""
        return float((self.weights * self.nodes**power).sum(dim=1).mean())

    def evaluate(self, points: torch.Tensor) -> torch.Tensor:
        """The broadened density at arbitrary ``points``."""
        pts = points.to(dtype=torch.float64, device=self.nodes.device)
        z = (pts[:, None, None] - self.nodes[None]) / self.sigma
        kernel = torch.exp(-0.5 * z * z) / (self.sigma * math.sqrt(2 * math.pi))
        return (kernel * self.weights[None]).sum(dim=2).mean(dim=1)


def spectral_density(
    operator: SymmetricOperator,
    *,
    num_vectors: int = 5,
    num_steps: int = 30,
    sigma: float | None = None,
    num_points: int = 1000,
    seed: int = 0,
) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature estimate of the eigenvalue density of ``operator``.

    For each of ``num_vectors`` Rademacher vectors :math:`v` (normalised), ``num_steps``
    Lanczos steps give the Gauss quadrature rule :math:`(\theta_j, \tau_j)` of the
    spectral measure of ``A`` seen from ``v``: :math:`v^\top f(A) v = \sum_j \tau_j
    f(\theta_j)` exactly for polynomials of degree below :math:`2m`.  Its expectation over
    ``v`` is :math:`\frac1P\operatorname{tr} f(A)`.  Every node is broadened into a
    Gaussian of width ``sigma``.

    Args:
        operator: a symmetric :class:`SymmetricOperator`.
        num_vectors: random starting vectors (the estimate's variance falls as
            ``1/num_vectors``; a few suffice for a large ``P``).
        num_steps: Lanczos steps per vector (resolution of the density).
        sigma: Gaussian broadening; default 1% of the range of all Ritz values.
        num_points: grid size; the grid spans the Ritz values plus ``5 sigma`` each side.
        seed: of the starting vectors.

    Returns:
        :class:`SpectralDensity`.

    Cost: ``num_vectors * num_steps`` products.

    Examples:
        The first moment estimates the mean eigenvalue, here 5.5:

        Examples:
            >>> import torch
            >>> op = SymmetricOperator.from_matrix(torch.diag(torch.arange(1.0, 11.0)))
            >>> sd = spectral_density(op, num_vectors=200, num_steps=10)
            >>> abs(sd.moment(1) - 5.5) < 0.2
            True
    """
    where = "spectral_density(operator, num_vectors, num_steps, sigma)"
    for name, value in (("num_vectors", num_vectors), ("num_points", num_points)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HypergradientError(f"{where}: `{name}` must be an int >= 1, got {value!r}.")
    if sigma is not None and not sigma > 0:
        raise HypergradientError(f"{where}: `sigma` must be > 0 (or None), got {sigma!r}.")
    generator = torch.Generator().manual_seed(seed)
    runs = []
    matvecs = 0
    for _ in range(num_vectors):
        start = _start_vector(
            operator.dim, operator.dtype, operator.device, generator, "rademacher"
        )
        res = lanczos(operator, start, num_steps)
        theta, s = res.ritz()
        runs.append((theta, s[0] ** 2))
        matvecs += res.num_matvecs
    # an early breakdown gives fewer nodes: pad with zero-weight copies of a node
    m = max(t.numel() for t, _ in runs)
    nodes = torch.stack([torch.cat([t, t[-1].repeat(m - t.numel())]) for t, _ in runs])
    weights = torch.stack([torch.cat([w, w.new_zeros(m - w.numel())]) for _, w in runs])
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 1e-3
    grid = torch.linspace(
        lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64, device=nodes.device
    )
    partial = SpectralDensity(
        grid=grid,
        density=grid,
        nodes=nodes,
        weights=weights,
        sigma=float(sigma),
        dim=operator.dim,
        num_matvecs=matvecs,
    )
    return SpectralDensity(
        grid=grid,
        density=partial.evaluate(grid),
        nodes=nodes,
        weights=weights,
        sigma=float(sigma),
        dim=operator.dim,
        num_matvecs=matvecs,
    )


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[torch.Tensor, torch.Tensor],
    k: int = 1,
    *,
    num_steps: int = 30,
    kind: str = "hessian",
    seed: int = 0,
) -> Eigenvalues:
    r"""The ``k`` largest eigenvalues of the Hessian of ``loss_fn(model(x), y)`` on ``data``.

    :func:`curvature_operator` then :func:`top_eigenvalues`; see those for the arguments.
    Cost: ``num_steps`` Hessian-vector products (one backward each) and one forward and
    double backward on ``data``.

    Examples:
        Least squares with a linear model, whose Hessian is ``x^T x / N = diag(1, 4)``:

        >>> import torch
        >>> from hypergradient.optimizers import hessian_eigenvalues
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]) * 2**0.5
        >>> loss = lambda out, t: 0.5 * ((out - t) ** 2).mean()
        >>> ev = hessian_eigenvalues(model, loss, (x, torch.zeros(2, 1)), k=2, num_steps=2)
        >>> [round(v, 4) for v in ev.values.tolist()], ev.num_matvecs
        ([4.0, 1.0], 2)
    """
    op = curvature_operator(model, loss_fn, data, kind=kind)
    return top_eigenvalues(op, k, num_steps=num_steps, seed=seed)


def hessian_spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    num_vectors: int = 5,
    num_steps: int = 30,
    sigma: float | None = None,
    kind: str = "hessian",
    seed: int = 0,
) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature estimate of the Hessian's eigenvalue density on ``data``.

    :func:`curvature_operator` then :func:`spectral_density`; see those for the arguments.

    Examples:
        The Hessian of a least-squares problem is ``diag(1, 4)``, so the mean eigenvalue is 2.5:

        >>> import torch
        >>> from hypergradient.optimizers import hessian_spectral_density
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]) * 2**0.5
        >>> loss = lambda out, t: 0.5 * ((out - t) ** 2).mean()
        >>> sd = hessian_spectral_density(model, loss, (x, torch.zeros(2, 1)), num_steps=2)
        >>> sd.nodes.shape, round(sd.moment(1), 3)  # 5 vectors x 2 Ritz values
        (torch.Size([5, 2]), 2.5)
    """
    op = curvature_operator(model, loss_fn, data, kind=kind)
    return spectral_density(
        op, num_vectors=num_vectors, num_steps=num_steps, sigma=sigma, seed=seed
    )


# ======================================================================================
# Learning rates from curvature (Granziol, Zohren & Roberts 2022)
# ======================================================================================


# Exponents ``a`` of the batch-size rules lr(B') = lr(B) (B'/B)^a, and the exponent each
# optimizer family gets by default: what its measured best rates follow while the batch is small
# (benchmarks/optimizers_in_training_batch_size.py; scale_learning_rate's docstring has the
# numbers, and tests/test_batch_size_benchmark.py checks these defaults against the results file).
_RULE_EXPONENTS = {"linear": 1.0, "sqrt": 0.5}
_DEFAULT_RULES: dict[str, str | float] = {"sgd": 2 / 3, "adam": "sqrt"}
_DEFAULT_RULES_TEXT = "2/3 for SGD, 'sqrt' for Adam"


def _rule_exponent(where: str, rule: str | float | None, optimizer: str) -> float:
    if rule is None:
        rule = _DEFAULT_RULES[optimizer]
    if isinstance(rule, str) and rule in _RULE_EXPONENTS:
        return _RULE_EXPONENTS[rule]
    if (
        isinstance(rule, numbers.Real)
        and not isinstance(rule, (bool, str))
        and math.isfinite(rule)
        and 0.0 <= rule <= 1.0
    ):
        return float(rule)
    raise HypergradientError(
        f"{where}: `rule` must be 'linear', 'sqrt', an exponent in [0, 1] or None (the "
        f"measured default: {_DEFAULT_RULES_TEXT}), got {rule!r}."
    )


def scale_learning_rate(
    lr: float,
    batch_size: int,
    new_batch_size: int,
    optimizer: str = "sgd",
    *,
    rule: str | float | None = None,
) -> float:
    r"""Move a learning rate tuned at batch size ``B`` to batch size ``B'`` by a power law.

    .. math::
        \eta(B') = \eta(B)\,(B'/B)^{a}, \qquad a = 1 \ (\texttt{"linear"}),\quad
        a = \tfrac12 \ (\texttt{"sqrt"}),\quad \text{or any } a \in [0, 1].

    Granziol, Zohren & Roberts (2022) predict ``a = 1`` for SGD while gradient noise
    dominates the mini-batch Hessian's top eigenvalue (then saturation at the full-data
    stability bound), and ``a = 1/2`` for Adam.  The default, ``rule=None``, is what this
    project measured instead: ``a = 2/3`` for SGD and the square root for Adam.

    Evidence: ``benchmarks/optimizers_in_training_batch_size.py`` (results in
    ``benchmarks/results/optimizers_in_training_batch_size.md``): Fashion-MNIST, an MLP
    784-128-10, 8 epochs on 8,192 images at every ``B`` from 16 to 1024, the peak rate of a
    linear decay chosen on a validation split (grid :math:`2^{k/2}` refined by a parabola),
    3 seeds; exponent of log best rate on log ``B`` with 95% intervals (t / bootstrap):

    * SGD, ``B <= 128``: 0.68 [0.59, 0.77] / [0.64, 0.71], excluding the linear rule
      (and the square root); ``B >= 128`` it saturates: 0.14 [0.09, 0.18].  Moved from
      ``B = 128`` by the linear rule, the rate diverged at ``B = 1024`` in every seed.
    * Adam, ``B <= 128``: 0.56 [0.47, 0.65] / [0.53, 0.61] (the square root is inside
      the t-interval, just outside the 3-seed bootstrap one); over all ``B``: 0.43
      [0.33, 0.54]; ``B >= 128``: 0.18 [-0.11, 0.47].

    So every rule here holds only below the batch size where the best rate saturates
    (128 in this measurement); :meth:`LearningRateProposal.lr_for_batch_size` caps SGD's
    rate at the measured full-data stability bound for that reason.

    Args:
        lr: the rate tuned at ``batch_size``; a finite number > 0.
        batch_size: ``B``, an int >= 1.
        new_batch_size: ``B'``, an int >= 1.
        optimizer: ``"sgd"`` or ``"adam"``; picks the default ``rule``.
        rule: ``"linear"``, ``"sqrt"``, an exponent ``a`` in [0, 1], or ``None`` for the
            measured default of ``optimizer`` (2/3 for SGD, ``"sqrt"`` for Adam).
            ``rule="linear"`` gives this function's earlier behaviour for SGD.

    Returns:
        :math:`\eta(B')`, a float, uncapped.

    Raises:
        HypergradientError: ``lr`` not a finite number > 0, a batch size not an int >= 1,
            an unknown ``optimizer`` or ``rule``.

    Cost: O(1).

    Examples:
        >>> round(scale_learning_rate(0.1, 16, 128), 6)  # SGD, measured default: 8^(2/3) = 4
        0.4
        >>> scale_learning_rate(0.1, 32, 128, rule="linear")  # Granziol's SGD rule
        0.4
        >>> scale_learning_rate(1e-3, 32, 128, "adam")  # square root
        0.002

    References:
        D. Granziol, S. Zohren, S. Roberts. Learning Rates as a Function of Batch Size: A
        Random Matrix Theory Approach to Neural Network Training. JMLR 23, 2022.
    """
    where = "scale_learning_rate(lr, batch_size, new_batch_size, optimizer, rule)"
    if (
        isinstance(lr, bool)
        or not isinstance(lr, numbers.Real)
        or not math.isfinite(lr)
        or not lr > 0
    ):
        raise HypergradientError(
            f"{where}: `lr` must be a finite number > 0 (the rate tuned at batch_size), got {lr!r}."
        )
    for name, value in (("batch_size", batch_size), ("new_batch_size", new_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HypergradientError(
                f"{where}: `{name}` must be an int >= 1 (examples per step), got {value!r}."
            )
    if optimizer not in _OPTIMIZERS:
        raise HypergradientError(
            f"{where}: `optimizer` must be one of {_OPTIMIZERS}, got {optimizer!r}."
        )
    exponent = _rule_exponent(where, rule, optimizer)
    return float(lr) * (new_batch_size / batch_size) ** exponent


def _stability_constant(optimizer: str, momentum: float) -> float:
    # Largest stable lr * curvature for a quadratic, in torch.optim's conventions.
    # SGD (buf = mu buf + g; w -= lr buf): roots of z^2 - (1 + mu - lr lam) z + mu stay in
    # the unit disk iff lr lam < 2 (1 + mu).  Adam with a frozen preconditioner D
    # (m = b1 m + (1 - b1) g; w -= lr m / D): the same recursion with lr (1 - b1) lam,
    # so lr lam(D^-1 H) < 2 (1 + b1) / (1 - b1)  (38 for b1 = 0.9; Cohen et al. 2022).
    if optimizer == "sgd":
        return 2.0 * (1.0 + momentum)
    return 2.0 * (1.0 + momentum) / (1.0 - momentum)


@dataclass(frozen=True)
class LearningRateProposal:
    r"""A learning rate for a batch size, with the curvature measurements behind it.

    Attributes:
        lr: the proposed rate, ``safety * lr_max``.
        momentum: the momentum it assumes (SGD's ``momentum``, Adam's ``beta1``).
        optimizer: ``"sgd"`` or ``"adam"``.
        batch_size: ``B``.
        lr_max: the stability bound at batch size ``B``, :math:`c / \bar\lambda_B`
            (``c = 2(1 + mu)`` for SGD, ``2(1 + beta1) / (1 - beta1)`` for Adam).
        lambda_batch: :math:`\bar\lambda_B`, the mean top eigenvalue of the mini-batch
            curvatures (for Adam: of the preconditioned ones).
        lambda_batches: the top eigenvalue of each sampled mini-batch, shape ``(n,)``.
        lambda_full: top eigenvalue of the curvature on all of ``data`` (for Adam:
            preconditioned with the same batch-``B`` preconditioner).
        lr_max_full: ``c / lambda_full``; for SGD the large-batch saturation level.
        density: spectral density of the (unpreconditioned) curvature on all of ``data``,
            ``None`` if not requested.
        safety: the factor applied to ``lr_max``.
        num_matvecs: curvature-vector products taken.

    Examples:
        A quadratic with curvatures 1 and 4: ``lr_max = 2 / 4`` for SGD, and the batch-size rule
        (SGD's measured default, exponent 2/3) capped by the full-data bound:

        >>> import torch
        >>> from hypergradient.optimizers import propose_learning_rate
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]) * 2**0.5   # H = diag(1, 4)
        >>> loss = lambda out, t: 0.5 * ((out - t) ** 2).mean()
        >>> p = propose_learning_rate(
        ...     model, loss, (x, torch.zeros(2, 1)), 2, safety=0.5, num_batches=2, density=False
        ... )
        >>> p.optimizer, p.batch_size, p.lambda_batches.shape, round(p.lr_max, 4), round(p.lr, 4)
        ('sgd', 2, torch.Size([2]), 0.5, 0.25)
        >>> round(p.lr_for_batch_size(8), 4)  # (8 / 2)^(2/3) x 0.25 = 0.63, capped at 0.5 * 2 / 4
        0.25
    """

    lr: float
    momentum: float
    optimizer: str
    batch_size: int
    lr_max: float
    lambda_batch: float
    lambda_batches: torch.Tensor
    lambda_full: float
    lr_max_full: float
    density: SpectralDensity | None
    safety: float
    num_matvecs: int

    def lr_for_batch_size(self, batch_size: int, rule: str | float | None = None) -> float:
        r"""This measurement's rate moved to batch size ``B'`` by a batch-size rule.

        SGD: :math:`\min\big(\eta\,(B'/B)^a,\ \text{safety}\cdot\eta_{\max}^{full}\big)`,
        growth with the batch size until the rate reaches what the full-data curvature
        allows (where the noise term of the mini-batch Hessian has vanished).
        Adam: :math:`\eta\,(B'/B)^a`, uncapped: Adam's preconditioner also changes with
        ``B``, so no batch-independent bound comes out of one measurement.

        Args:
            batch_size: ``B'``, an int >= 1.
            rule: as in :func:`scale_learning_rate`: ``"linear"`` (``a = 1``, Granziol's
                rule for SGD), ``"sqrt"`` (``a = 1/2``), an exponent in [0, 1], or ``None``
                for the measured default (2/3 for SGD, the square root for Adam).
        """
        scaled = scale_learning_rate(
            self.lr, self.batch_size, batch_size, self.optimizer, rule=rule
        )
        if self.optimizer == "adam":
            return scaled
        return min(scaled, self.safety * self.lr_max_full)


def _batch_indices(
    n: int, batch_size: int, count: int, generator: torch.Generator, device: torch.device
) -> list[torch.Tensor]:
    # drawn on the CPU from a seeded generator: the same batches on every device
    return [
        torch.randperm(n, generator=generator, device="cpu")[:batch_size].to(device)
        for _ in range(count)
    ]


def propose_learning_rate(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    optimizer: str = "sgd",
    momentum: float | None = None,
    *,
    safety: float = 1.0,
    num_batches: int = 10,
    num_steps: int = 20,
    kind: str = "hessian",
    eps: float = 1e-8,
    density: bool = True,
    seed: int = 0,
) -> LearningRateProposal:
    r"""The largest stable learning rate at batch size ``B``, from mini-batch curvature.

    Granziol, Zohren & Roberts (2022) model the mini-batch Hessian as the full-data one
    plus a random-matrix perturbation whose top eigenvalue grows as ``B`` shrinks.  Here
    that eigenvalue is measured, not modelled: Lanczos on the curvature of
    ``num_batches`` random mini-batches of size ``B`` (a fixed batch for each Krylov
    run) gives :math:`\bar\lambda_B`, the mean top eigenvalue, and

    .. math::
        \eta_{\max}(B) = \frac{2(1+\mu)}{\bar\lambda_B}\ (\text{SGD, momentum } \mu),
        \qquad
        \eta_{\max}(B) = \frac{2(1+\beta_1)}{(1-\beta_1)\,
        \bar\lambda_B\big(D^{-1/2} H_B D^{-1/2}\big)}\ (\text{Adam}),

    the largest rate for which the update is stable on the quadratic model with that
    curvature (heavy-ball / Adam recursion with a frozen preconditioner).  For Adam,
    :math:`D = \sqrt{v} + \epsilon` with :math:`v` the mean squared mini-batch gradient,
    what Adam's second moment tracks; its gradient-noise part scales as :math:`1/B`,
    which is where the square-root rule comes from.  The proposal is
    ``safety * lr_max``.  The full-data bound (``B = N``) is measured too: for SGD the
    level at which the linear growth with ``B`` saturates.

    What the bound is (measured in ``benchmarks/lr_proposal.py``, digits, batch 32; a run
    is *stable* if its full training loss never exceeds the starting value and ends below
    half of it, *diverged* if it ends at or above the start or not finite):

    * On a quadratic loss (least squares with a linear model) it is the edge itself: 0.9x
      trains stably and 1.05x diverges in every seed, while at exactly 1x the top direction
      neither shrinks nor grows and batch noise tips it over.  Take ``safety < 1`` there:
      with ``safety`` 0.6-0.9 the rate trains stably and twice it diverges.
    * On a network it is a local, quadratic-model bound.  A network's top eigenvalue
      changes during training: with cross-entropy it grows about fivefold in the first
      epochs ("progressive sharpening"), so a rate measured at initialisation is too large
      (on the digits MLP it diverges); measure after a warm-up at a small rate.  Above the
      bound the loss spikes (2x: far above the chance level within ~20 steps) but then
      "catapults" to a flatter region and trains (Lewkowycz et al. 2020); it diverges for
      good only from about 2.5-3x.  With cross-entropy a linear model (logistic
      regression, convex) never diverges at all up to 20x: its curvature falls as the
      logits grow.  So on these models no safety factor makes "twice the proposal
      diverges" true.
    * For ``momentum`` near 1 and for Adam the bound ignores the gradient noise that
      momentum amplifies and is not reached in practice (measured: SGD with momentum 0.9
      and Adam diverge or stall at ``safety=1`` and train well at ``safety`` 0.1-0.3).
      Granziol's heavy-ball learner (rate :math:`4/(\sqrt{\lambda_{\max}} +
      \sqrt{\lambda_{\min}})^2`, momentum from :math:`\kappa`) is not offered: a batch
      Gauss-Newton matrix has rank at most ``B * outputs``, so the bottom Ritz value goes
      to 0 and the momentum to 0.97-0.996: SGD diverges at a quarter of the rule's rate on
      least squares and on the digits MLP (and spikes at 1x on logistic regression).

    Args:
        model: the network (weights and buffers are left unchanged).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, the mean over a batch.
        data: ``(inputs, targets)``, the training set (or a large sample of it).
        batch_size: ``B``, ``1 <= B <= N``.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD's momentum (default 0) or Adam's ``beta1`` (default 0.9), in [0, 1).
        safety: factor in (0, 1] applied to the bound (1 = the bound itself).
        num_batches: mini-batches whose top eigenvalues are averaged.
        num_steps: Lanczos steps per eigenvalue.
        kind: ``"hessian"`` or ``"gauss_newton"`` (positive semi-definite, the safer
            choice far from a minimum: no negative Ritz values).
        eps: Adam's :math:`\epsilon`.
        density: also estimate the full-data spectral density (5 vectors).
        seed: batches and Lanczos starting vectors.

    Returns:
        :class:`LearningRateProposal` (``.lr``, ``.momentum`` and the measurements).

    Cost: ``(num_batches + 1) * num_steps`` products (+ ``5 * num_steps`` for the
    density), each one backward on a batch (the last ones on all of ``data``); for Adam
    also ``num_batches`` gradients.

    Examples:
        A quadratic with curvatures 1 and 4: the bound is 2/4, whatever the batch:

            >>> import torch
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]) * 2**0.5   # H = x^T x / 2 = diag(1, 4)
            >>> loss = lambda out, t: 0.5 * ((out - t) ** 2).mean()
            >>> p = propose_learning_rate(model, loss, (x, torch.zeros(2, 1)), 2, density=False)
            >>> round(p.lambda_full, 6), round(p.lr, 6), p.momentum
            (4.0, 0.5, 0.0)

    References:
        D. Granziol, S. Zohren, S. Roberts. Learning Rates as a Function of Batch Size: A
        Random Matrix Theory Approach to Neural Network Training. JMLR 23, 2022.
    """
    where = "propose_learning_rate(model, loss_fn, data, batch_size, optimizer, momentum)"
    params = _trainable(model, where)
    x, y = _check_data(where, data)
    n = x.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HypergradientError(f"{where}: `batch_size` must be an int >= 1, got {batch_size!r}.")
    if batch_size > n:
        raise HypergradientError(
            f"{where}: batch_size={batch_size} exceeds the {n} examples in `data`; pass more "
            f"data or a smaller batch size."
        )
    if optimizer not in _OPTIMIZERS:
        raise HypergradientError(
            f"{where}: `optimizer` must be one of {_OPTIMIZERS}, got {optimizer!r}."
        )
    if momentum is None:
        momentum = 0.0 if optimizer == "sgd" else 0.9
    if not 0.0 <= momentum < 1.0:
        raise HypergradientError(f"{where}: `momentum` must be in [0, 1), got {momentum!r}.")
    if not 0.0 < safety <= 1.0:
        raise HypergradientError(f"{where}: `safety` must be in (0, 1], got {safety!r}.")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise HypergradientError(
            f"{where}: `num_batches` must be an int >= 1, got {num_batches!r}."
        )
    generator = torch.Generator().manual_seed(seed)
    batches = _batch_indices(n, batch_size, num_batches, generator, x.device)

    def curvature(xb: torch.Tensor, yb: torch.Tensor) -> SymmetricOperator:
        return curvature_operator(model, loss_fn, (xb, yb), kind=kind)

    measured = curvature  # what Lanczos runs on: the curvature, or Adam's preconditioned one
    if optimizer == "adam":
        f = _detached_function(model)
        keys = list(params)

        def squared_grad(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            w = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            with torch.enable_grad():
                grads = torch.autograd.grad(loss_fn(f(w, xb), yb), [w[k] for k in keys])
            return torch.cat([g.reshape(-1) for g in grads]) ** 2

        v = torch.stack([squared_grad(x[i], y[i]) for i in batches]).mean(0)
        d = (v.sqrt() + eps).rsqrt()  # D^{-1/2}

        def measured(xb: torch.Tensor, yb: torch.Tensor) -> SymmetricOperator:
            op = curvature(xb, yb)
            return SymmetricOperator(
                lambda u: d * op(d * u), op.dim, dtype=op.dtype, device=op.device
            )

    matvecs = 0
    lambdas = []
    for j, idx in enumerate(batches):
        ev = top_eigenvalues(measured(x[idx], y[idx]), 1, num_steps=num_steps, seed=seed + 1 + j)
        lambdas.append(float(ev.values[0]))
        matvecs += ev.num_matvecs
    lambda_batches = torch.tensor(lambdas, dtype=torch.float64, device="cpu")
    lambda_batch = float(lambda_batches.mean())
    ev_full = top_eigenvalues(measured(x, y), 1, num_steps=num_steps, seed=seed)
    matvecs += ev_full.num_matvecs
    lambda_full = float(ev_full.values[0])
    if lambda_batch <= 0 or lambda_full <= 0:
        raise HypergradientError(
            f"{where}: the top curvature eigenvalue is not positive (batch mean "
            f"{lambda_batch:.3g}, full data {lambda_full:.3g}), so it bounds no learning rate. "
            f"Use kind='gauss_newton' (positive semi-definite)."
        )
    c = _stability_constant(optimizer, momentum)
    lr_max = c / lambda_batch
    sd = None
    if density:
        sd = spectral_density(curvature(x, y), num_vectors=5, num_steps=num_steps, seed=seed)
        matvecs += sd.num_matvecs
    return LearningRateProposal(
        lr=safety * lr_max,
        momentum=float(momentum),
        optimizer=optimizer,
        batch_size=batch_size,
        lr_max=lr_max,
        lambda_batch=lambda_batch,
        lambda_batches=lambda_batches,
        lambda_full=lambda_full,
        lr_max_full=c / lambda_full,
        density=sd,
        safety=float(safety),
        num_matvecs=matvecs,
    )
