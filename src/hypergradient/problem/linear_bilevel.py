r"""Which solution bilevel optimisation finds: closed forms on an overparameterised linear model.

Vicol et al. (2022) ask which of many equally good solutions cold-start and warm-start
bilevel optimisation (BLO) converge to.  This module answers it in closed form on the
smallest problem where both levels are underspecified, learned training targets for a
linear regression with more features than examples:

.. math::

    f(u, w) = \tfrac12\lVert X w - u\rVert^2 \quad (\text{inner}), \qquad
    F(w) = \tfrac12\lVert V w - y\rVert^2 \quad (\text{outer}),

with :math:`X \in \mathbb{R}^{m\times d}` of rank :math:`m < d` (the inner problem has a
:math:`(d-m)`-dimensional set of solutions), learned targets :math:`u\in\mathbb{R}^m` and
validation data :math:`V\in\mathbb{R}^{n\times d}`, :math:`y\in\mathbb{R}^n` (with
:math:`n < m` the outer problem has many solutions too).  Write :math:`S = XX^\top`,
:math:`X^+ = X^\top S^{-1}`, :math:`P_0 = I - X^+X` (the projector on the null space of
:math:`X`), :math:`A = VX^+` and :math:`r = y - VP_0w_0`.

* **Inner implicit bias.** Gradient descent from :math:`w_0` converges to the solution
  closest to :math:`w_0`: :math:`w^*(u) = P_0 w_0 + X^+u` (:meth:`LinearBilevel.inner_solution`).
* **Outer solution, exact hypergradient.** Cold start (re-solve from :math:`w_0` every outer
  step) runs gradient descent on :math:`\tfrac12\lVert Au - r\rVert^2` and converges to the
  outer optimum closest to :math:`u_0`: :math:`u_0 + A^+(r - Au_0)` (Vicol et al.'s
  minimum-norm outer solution).  It depends on the inner initialisation through
  :math:`P_0w_0`.
* **Approximate hypergradients.** A Neumann series of :math:`K` terms with step
  :math:`\alpha`, :math:`K` look-ahead (truncated) unrolled steps, the identity
  approximation and a damped solve all return :math:`N A^\top(Vw - y)` with an SPD
  :math:`m\times m` matrix :math:`N` (:math:`I-(I-\alpha S)^K` for both of the first two,
  :math:`\alpha S`, :math:`S(S+\delta I)^{-1}`): a preconditioned gradient.  Outer iterates
  then move only in :math:`u_0 + \operatorname{range}(NA^\top)` and converge to the outer
  optimum closest to :math:`u_0` in the :math:`N^{-1}` norm,
  :math:`u_0 + NA^\top(ANA^\top)^+(r - Au_0)` (:meth:`LinearBilevel.outer_solution`): the
  same outer loss, another solution.  With a unique outer optimum all of them agree.
* **Warm start.** Inner steps move :math:`w` only along the rows of :math:`X`, which do not
  depend on :math:`u` here, so warm start keeps :math:`P_0w_0` and the outer iterates keep
  the invariant above: warm start converges to the same :math:`(u, w)` as cold start, for
  each approximation.
* **Unrolled cold start.** Re-training only :math:`T` steps from :math:`w_0` and
  differentiating through them optimises another outer problem,
  :math:`\tfrac12\lVert AN_Tu - r_T\rVert^2` (:math:`N_T = I - (I-\alpha S)^T`): its
  solution (:meth:`LinearBilevel.unrolled_outer_solution`) fits the validation data with
  the :math:`T`-step model but not with the converged one.

:func:`run_bilevel` runs the two algorithms with the library's own hypergradient methods,
so the closed forms check those methods (``tests/test_linear_bilevel.py``,
``benchmarks/implicit_bias.py``).

References:
    Vicol, Lorraine, Pedregosa, Duvenaud, Grosse (2022), On Implicit Bias in
    Overparameterized Bilevel Optimization, ICML.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .._errors import HypergradientError
from ..hypergrad.implicit import ConvergenceWarning
from ..hypergrad.methods import AbstractHypergradientMethod, Unrolled

_WHERE = "hypergradient.problem.LinearBilevel"
_APPROXIMATIONS = ("exact", "damped", "neumann", "unrolled", "identity")


def _check_matrix(where: str, name: str, value: object, dim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise HypergradientError(
            f"{where}: `{name}` must be a floating torch.Tensor, got "
            f"{type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}. "
            f"Convert it with torch.as_tensor(..., dtype=torch.float64)."
        )
    if value.dim() != dim:
        raise HypergradientError(
            f"{where}: `{name}` must have {dim} dimension(s), got shape {tuple(value.shape)}."
        )
    if not bool(torch.isfinite(value).all()):
        raise HypergradientError(
            f"{where}: `{name}` (shape {tuple(value.shape)}) contains "
            f"{int((~torch.isfinite(value)).sum())} NaN/inf value(s); give finite data."
        )
    return value


def _check_positive(where: str, name: str, value: object, *, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        kind = "an int >= 1" if integer else "a finite number > 0"
        raise HypergradientError(f"{where}: {name}={value!r}; expected {kind}.")


@dataclass(frozen=True)
class LinearBilevel:
    r"""Learned targets ``u`` for an overparameterised linear regression, solved in closed form.

    Inner :math:`f(u, w) = \tfrac12\lVert Xw - u\rVert^2`, outer
    :math:`F(w) = \tfrac12\lVert Vw - y\rVert^2` (see the module docstring for the results
    and the notation :math:`S, X^+, P_0, A, r`).

    Args:
        inner_x: :math:`X`, shape ``(m, d)``, rank ``m`` (full row rank; ``m <= d``).
        outer_x: :math:`V`, shape ``(n, d)``.
        outer_y: :math:`y`, shape ``(n,)``.  All three float64 ideally, one dtype, finite.

    Cost: every closed form is a few dense ``m x m`` / ``n x n`` solves, O(m^2 d + n^2 m).

    Examples:
        Two inner examples in three features, one validation example:

        >>> import torch
        >>> import hypergradient as hg
        >>> X = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
        >>> V = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
        >>> prob = hg.problem.LinearBilevel(X, V, torch.tensor([2.0], dtype=torch.float64))
        >>> w0 = torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)
        >>> u0 = torch.zeros(2, dtype=torch.float64)
        >>> prob.inner_solution(torch.tensor([1.0, 1.0], dtype=torch.float64), w0)  # keeps w0[2]
        tensor([1.0000, 1.0000, 0.5000], dtype=torch.float64)
        >>> prob.outer_solution(u0, w0)  # V w* = u1 + u2 + 0.5 = 2, the u closest to u0
        tensor([0.7500, 0.7500], dtype=torch.float64)
        >>> prob.outer_solution(u0, torch.full((3,), float("nan"), dtype=torch.float64))
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: ...`w0` (shape (3,)) contains 3 NaN/inf ...
    """

    inner_x: torch.Tensor
    outer_x: torch.Tensor
    outer_y: torch.Tensor
    _gram: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        X = _check_matrix(f"{_WHERE}(inner_x=...)", "inner_x", self.inner_x, 2)
        V = _check_matrix(f"{_WHERE}(outer_x=...)", "outer_x", self.outer_x, 2)
        y = _check_matrix(f"{_WHERE}(outer_y=...)", "outer_y", self.outer_y, 1)
        m, d = X.shape
        if V.shape[1] != d or y.shape[0] != V.shape[0]:
            raise HypergradientError(
                f"{_WHERE}: shapes do not fit: inner_x {tuple(X.shape)}, outer_x "
                f"{tuple(V.shape)}, outer_y {tuple(y.shape)}; expected (m, d), (n, d), (n,)."
            )
        if len({X.dtype, V.dtype, y.dtype}) != 1:
            raise HypergradientError(
                f"{_WHERE}: inner_x, outer_x, outer_y have dtypes {X.dtype}, {V.dtype}, "
                f"{y.dtype}; use one (float64 for the closed forms to 1e-6)."
            )
        rank = int(torch.linalg.matrix_rank(X))
        if m > d or rank < m:
            raise HypergradientError(
                f"{_WHERE}(inner_x=...): shape {tuple(X.shape)} has rank {rank}; expected full "
                f"row rank m <= d (every target reachable). Drop repeated or dependent rows."
            )
        object.__setattr__(self, "_gram", X @ X.T)

    # -------------------------------------------------------------- the losses
    def inner_loss(self, params: dict, hparams: dict) -> torch.Tensor:
        """:math:`f = \\tfrac12\\lVert X w - u\\rVert^2` for ``params={"w": (d,)}``,
        ``hparams={"u": (m,)}`` (the form every hypergradient method takes)."""
        return 0.5 * torch.sum((self.inner_x @ params["w"] - hparams["u"]) ** 2)

    def outer_loss(self, params: dict, hparams: dict | None = None) -> torch.Tensor:
        """:math:`F = \\tfrac12\\lVert V w - y\\rVert^2` (``hparams`` is unused)."""
        return 0.5 * torch.sum((self.outer_x @ params["w"] - self.outer_y) ** 2)

    # -------------------------------------------------------------- checks
    def _vector(self, where: str, name: str, value: object, size: int) -> torch.Tensor:
        value = _check_matrix(where, name, value, 1)
        if value.shape[0] != size:
            raise HypergradientError(
                f"{where}: `{name}` has shape {tuple(value.shape)}; expected ({size},)."
            )
        return value.to(self.inner_x.dtype)

    def _uw(self, where: str, u: object, w0: object) -> tuple[torch.Tensor, torch.Tensor]:
        m, d = self.inner_x.shape
        return self._vector(where, "u", u, m), self._vector(where, "w0", w0, d)

    # -------------------------------------------------------------- inner level
    def inner_solution(self, u: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        r"""Where gradient descent from ``w0`` converges: :math:`w_0 + X^+(u - Xw_0)`.

        The inner solution closest to ``w0`` (the minimum-norm one for ``w0 = 0``); any
        stable step size and any number of steps to convergence give it, since each step
        moves :math:`w` along the rows of :math:`X` only.

        Args:
            u: targets, shape ``(m,)``.  w0: initial weights, shape ``(d,)``.

        Examples:
            >>> import torch, hypergradient as hg
            >>> X = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
            >>> prob = hg.problem.LinearBilevel(X, X, torch.ones(1, dtype=torch.float64))
            >>> prob.inner_solution(torch.tensor([5.0], dtype=torch.float64),
            ...                     torch.zeros(2, dtype=torch.float64))
            tensor([0.6000, 0.8000], dtype=torch.float64)
        """
        u, w0 = self._uw(f"{_WHERE}.inner_solution", u, w0)
        X = self.inner_x
        return w0 + X.T @ torch.linalg.solve(self._gram, u - X @ w0)

    def inner_iterate(self, u: torch.Tensor, w0: torch.Tensor, steps: int, lr: float):
        r""":math:`w_T` after ``steps`` gradient-descent steps of size ``lr`` from ``w0``.

        :math:`w_T = w^*(u) + X^\top S^{-1}(I - \alpha S)^T (Xw_0 - u)`: the distance to
        :math:`w^*(u)` shrinks like :math:`(1 - \alpha\lambda_{min}(S))^T` when
        :math:`0 < \alpha\lambda_{max}(S) < 2`.

        Args:
            u: ``(m,)``.  w0: ``(d,)``.  steps: ``T >= 1``.  lr: :math:`\alpha > 0`.

        Examples:
            >>> import torch, hypergradient as hg
            >>> X = torch.eye(2, dtype=torch.float64)[:1]  # one example, two features
            >>> prob = hg.problem.LinearBilevel(X, X, torch.ones(1, dtype=torch.float64))
            >>> prob.inner_iterate(torch.ones(1, dtype=torch.float64),
            ...                    torch.zeros(2, dtype=torch.float64), steps=1, lr=0.5)
            tensor([0.5000, 0.0000], dtype=torch.float64)
        """
        where = f"{_WHERE}.inner_iterate"
        u, w0 = self._uw(where, u, w0)
        _check_positive(where, "steps", steps, integer=True)
        _check_positive(where, "lr", lr)
        X = self.inner_x
        decay = torch.linalg.matrix_power(self._contraction(lr), steps)
        return self.inner_solution(u, w0) + X.T @ torch.linalg.solve(
            self._gram, decay @ (X @ w0 - u)
        )

    def _contraction(self, lr: float) -> torch.Tensor:
        m = self._gram.shape[0]
        return torch.eye(m, dtype=self._gram.dtype) - lr * self._gram

    # -------------------------------------------------------------- outer level
    def preconditioner(
        self,
        approximation: str = "exact",
        *,
        steps: int | None = None,
        lr: float | None = None,
        damping: float | None = None,
    ) -> torch.Tensor:
        r"""The ``(m, m)`` matrix :math:`N` with approximate hypergradient :math:`NA^\top(Vw-y)`.

        * ``"exact"``: :math:`N = I` (the implicit function theorem with the pseudo-inverse
          of the singular Hessian :math:`H = X^\top X`; of the library's solvers only a
          long Neumann series computes it: undamped CG, MINRES and dense solves fail on a
          singular :math:`H`, see ``benchmarks/results/implicit_bias.md``);
        * ``"damped"``: an exact solve with :math:`H + \delta I`, ``damping`` :math:`\delta`
          (``hg.Implicit(solver="exact", damping=delta)``): :math:`N = S(S + \delta I)^{-1}`;
        * ``"neumann"``: ``hg.Implicit(solver="neumann", max_steps=steps, alpha=lr)``, the
          series :math:`\alpha\sum_{k=0}^{K}(I-\alpha H)^k` with :math:`K` = ``steps``
          (:math:`K + 1` terms): :math:`N = I - (I - \alpha S)^{K+1}`;
        * ``"unrolled"``: ``hg.Unrolled(steps=K)``, :math:`K` look-ahead steps of size
          ``lr`` :math:`\alpha` differentiated (truncated back-propagation):
          :math:`N = I - (I - \alpha S)^K`, since :math:`dw_{t+K}/du = X^\top S^{-1}
          (I - (I-\alpha S)^K)` from any :math:`w_t` (Neumann with ``steps=K-1``);
        * ``"identity"``: :math:`H^{-1}\approx\alpha I` (``hg.Implicit(solver="identity")``):
          :math:`N = \alpha S` (Neumann with ``steps=0``, unrolled with ``steps=1``).

        SPD when :math:`0 < \alpha\lambda_{max}(S) < 2` (Neumann, unrolled) or
        :math:`\delta > 0`.

        Examples:
            >>> import torch, hypergradient as hg
            >>> X = torch.tensor([[2.0, 0.0]], dtype=torch.float64)  # S = 4
            >>> prob = hg.problem.LinearBilevel(X, X, torch.ones(1, dtype=torch.float64))
            >>> prob.preconditioner("neumann", steps=1, lr=0.125)  # 1 - (1 - 0.5)^2
            tensor([[0.7500]], dtype=torch.float64)
            >>> prob.preconditioner("damped", damping=1.0)  # 4 / (4 + 1)
            tensor([[0.8000]], dtype=torch.float64)
        """
        where = f"{_WHERE}.preconditioner(approximation={approximation!r})"
        m = self._gram.shape[0]
        if approximation not in _APPROXIMATIONS:
            raise HypergradientError(
                f"{where}: unknown approximation; expected one of {list(_APPROXIMATIONS)}."
            )
        eye = torch.eye(m, dtype=self._gram.dtype)
        if approximation == "exact":
            return eye
        if approximation == "damped":
            _check_positive(where, "damping", damping)
            return torch.linalg.solve(self._gram + damping * eye, self._gram)  # commute
        _check_positive(where, "lr", lr)
        if approximation == "identity":
            return lr * self._gram
        if approximation == "neumann":
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
                raise HypergradientError(f"{where}: steps={steps!r}; expected an int >= 0.")
            power = steps + 1
        else:
            _check_positive(where, "steps", steps, integer=True)
            power = steps
        return eye - torch.linalg.matrix_power(self._contraction(lr), power)

    def _residual(self, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`A = VX^+` and :math:`r = y - VP_0w_0`."""
        X, V = self.inner_x, self.outer_x
        A = torch.linalg.solve(self._gram, X @ V.T).T  # V X^T S^{-1}
        null_part = w0 - X.T @ torch.linalg.solve(self._gram, X @ w0)
        return A, self.outer_y - V @ null_part

    @staticmethod
    def _closest(B: torch.Tensor, c: torch.Tensor, N: torch.Tensor, u0: torch.Tensor):
        """Limit of ``u <- u - beta N B^T (B u - c)`` from ``u0``: the minimiser of
        ``||Bu - c||`` closest to ``u0`` in the ``N^{-1}`` norm."""
        NBt = N @ B.T
        return u0 + NBt @ (torch.linalg.pinv(B @ NBt, hermitian=True) @ (c - B @ u0))

    def outer_solution(
        self,
        u0: torch.Tensor,
        w0: torch.Tensor,
        approximation: str = "exact",
        *,
        steps: int | None = None,
        lr: float | None = None,
        damping: float | None = None,
    ) -> torch.Tensor:
        r"""Where cold-start and warm-start BLO converge with this hypergradient approximation.

        :math:`u_\infty = u_0 + NA^\top(ANA^\top)^+(r - Au_0)`, :math:`N` from
        :meth:`preconditioner`: the outer optimum closest to ``u0`` in the :math:`N^{-1}`
        norm (the minimum-norm outer solution for ``"exact"``).  Cold start must re-solve
        the inner problem from ``w0``; warm start starts there once.  Both need an outer step
        small enough to converge (:meth:`max_stable_outer_lr` for cold start); the inner
        weights end at :meth:`inner_solution` ``(u_inf, w0)``.

        Args:
            u0: initial targets ``(m,)``.  w0: the inner initialisation ``(d,)``.
            approximation, steps, lr, damping: as in :meth:`preconditioner`.

        Returns:
            ``(m,)`` tensor.

        Examples:
            >>> import torch, hypergradient as hg
            >>> X = torch.eye(3, dtype=torch.float64)[:2] * torch.tensor([[1.0], [2.0]])
            >>> V = torch.ones(1, 3, dtype=torch.float64)
            >>> prob = hg.problem.LinearBilevel(X, V, torch.ones(1, dtype=torch.float64))
            >>> u0, w0 = torch.zeros(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
            >>> prob.outer_solution(u0, w0)  # min-norm u with u1 + u2 / 2 = 1
            tensor([0.8000, 0.4000], dtype=torch.float64)
            >>> prob.outer_solution(u0, w0, "identity", lr=0.25)  # same loss, another u
            tensor([0.5000, 1.0000], dtype=torch.float64)
        """
        u0, w0 = self._uw(f"{_WHERE}.outer_solution", u0, w0)
        N = self.preconditioner(approximation, steps=steps, lr=lr, damping=damping)
        A, r = self._residual(w0)
        return self._closest(A, r, N, u0)

    def unrolled_outer_solution(
        self, u0: torch.Tensor, w0: torch.Tensor, steps: int, lr: float
    ) -> torch.Tensor:
        r"""Where cold start converges when each retraining is ``steps`` GD steps from ``w0``,
        differentiated through all of them (``hg.Unrolled(steps=T)`` at ``w0``).

        The outer problem becomes :math:`\min_u \tfrac12\lVert V w_T(u) - y\rVert^2` with
        :math:`w_T(u) = X^+N_Tu + c_T` (:meth:`inner_iterate`), :math:`N_T = I - (I-\alpha
        S)^T`; its outer optimum closest to ``u0``.

        Examples:
            >>> import torch, hypergradient as hg
            >>> X = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
            >>> prob = hg.problem.LinearBilevel(X, X, torch.ones(1, dtype=torch.float64))
            >>> z = torch.zeros(2, dtype=torch.float64)
            >>> prob.unrolled_outer_solution(z[:1], z, steps=1, lr=0.5)  # w_1 = u / 2 = 1
            tensor([2.], dtype=torch.float64)
        """
        where = f"{_WHERE}.unrolled_outer_solution"
        u0, w0 = self._uw(where, u0, w0)
        _check_positive(where, "steps", steps, integer=True)
        _check_positive(where, "lr", lr)
        X, V = self.inner_x, self.outer_x
        m = X.shape[0]
        zero_u = torch.zeros(m, dtype=X.dtype)
        offset = self.inner_iterate(zero_u, w0, steps, lr)  # c_T = w_T(0)
        NT = self.preconditioner("unrolled", steps=steps, lr=lr)
        A, _ = self._residual(w0)
        B = A @ NT
        return self._closest(B, self.outer_y - V @ offset, torch.eye(m, dtype=X.dtype), u0)

    def max_stable_outer_lr(
        self,
        approximation: str = "exact",
        *,
        steps: int | None = None,
        lr: float | None = None,
        damping: float | None = None,
    ) -> float:
        r""":math:`2/\lambda_{max}(N^{1/2}A^\top AN^{1/2})`: cold-start outer gradient descent
        converges for outer steps below this (warm start may need a smaller one).

        Examples:
            >>> import torch, hypergradient as hg
            >>> X = torch.eye(2, dtype=torch.float64)
            >>> prob = hg.problem.LinearBilevel(X, X, torch.ones(2, dtype=torch.float64))
            >>> prob.max_stable_outer_lr()
            2.0
        """
        N = self.preconditioner(approximation, steps=steps, lr=lr, damping=damping)
        A, _ = self._residual(torch.zeros(self.inner_x.shape[1], dtype=self.inner_x.dtype))
        # eigenvalues of N A^T A equal those of the symmetric N^1/2 A^T A N^1/2
        top = float(torch.linalg.eigvals(N @ A.T @ A).real.max())
        return 2.0 / top if top > 0 else math.inf


@dataclass
class BilevelRun:
    """What :func:`run_bilevel` returns.

    Attributes:
        u: final outer parameters ``(m,)``.  w: the inner weights of the last outer step
            ``(d,)`` (trained for the targets before the last update of ``u``).
        u_path: ``(outer_steps + 1, m)``, the outer iterates from ``u0``.
        outer_losses: ``F(w)`` after each outer step's inner training (a list of floats).
        inner_steps: inner GD steps taken at each outer step (a list of ints).

    Examples:
        >>> import torch, hypergradient as hg
        >>> X = torch.eye(2, dtype=torch.float64)
        >>> prob = hg.problem.LinearBilevel(X, X[:1], torch.ones(1, dtype=torch.float64))
        >>> run = hg.problem.run_bilevel(prob, torch.zeros(2, dtype=torch.float64),
        ...     torch.zeros(2, dtype=torch.float64), warm_start=True,
        ...     method=hg.Implicit(solver="neumann"), outer_lr=0.5, outer_steps=3, inner_lr=1.0)
        >>> tuple(run.u_path.shape), len(run.outer_losses), run.inner_steps
        ((4, 2), 3, [1, 1, 1])
    """

    u: torch.Tensor
    w: torch.Tensor
    u_path: torch.Tensor
    outer_losses: list[float]
    inner_steps: list[int]


def run_bilevel(
    problem: LinearBilevel,
    u0: torch.Tensor,
    w0: torch.Tensor,
    *,
    warm_start: bool,
    method: AbstractHypergradientMethod,
    outer_lr: float,
    outer_steps: int,
    inner_lr: float,
    inner_steps: int = 1,
    inner_tol: float | None = None,
    max_inner_steps: int = 100_000,
) -> BilevelRun:
    r"""Cold-start or warm-start BLO on a :class:`LinearBilevel`, hypergradients by ``method``.

    Each outer step: inner gradient descent (step ``inner_lr``), then
    :math:`u \leftarrow u - \beta\,\widehat{dF/du}` with ``method``'s hypergradient.

    * **cold start** (``warm_start=False``, Vicol et al.'s Alg. 1): :math:`w \leftarrow w_0`,
      then train until :math:`\lVert\nabla_w f\rVert \le` ``inner_tol`` (or exactly
      ``inner_steps`` steps when ``inner_tol`` is None).  With an
      :class:`~hypergradient.Unrolled` method the hypergradient differentiates that
      method's ``steps`` steps from :math:`w_0` (the retraining itself; ``inner_tol`` must
      be None), as :meth:`LinearBilevel.unrolled_outer_solution` assumes.
    * **warm start** (Alg. 2): :math:`w` keeps training, ``inner_steps`` steps per outer
      step; an :class:`~hypergradient.Unrolled` method then looks ahead from the current
      :math:`w` (truncated back-propagation).

    Args:
        problem: the :class:`LinearBilevel`.  u0: ``(m,)``.  w0: ``(d,)``.
        warm_start: as above.  method: ``hg.Implicit(...)`` or ``hg.Unrolled(...)``.
        outer_lr: :math:`\beta > 0`.  outer_steps: ``>= 1``.  inner_lr: :math:`\alpha > 0`.
        inner_steps: ``>= 1``.  inner_tol: ``> 0`` or None.
        max_inner_steps: guard for ``inner_tol``; reaching it warns
            (:class:`~hypergradient.ConvergenceWarning`) with the norm reached.

    Returns:
        :class:`BilevelRun`.

    Cost: ``outer_steps`` hypergradients plus the inner steps, all O(m d) each.

    Examples:
        Cold start with exact hypergradients reaches the minimum-norm outer solution (here
        :math:`S = I` and a Neumann step of 1 make the series exact at any length):

        >>> import torch, hypergradient as hg
        >>> X = torch.eye(3, dtype=torch.float64)[:2]
        >>> prob = hg.problem.LinearBilevel(X, torch.ones(1, 3, dtype=torch.float64),
        ...                                 torch.ones(1, dtype=torch.float64))
        >>> z2, z3 = torch.zeros(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        >>> run = hg.problem.run_bilevel(prob, z2, z3, warm_start=False,
        ...     method=hg.Implicit(solver="neumann", max_steps=1), outer_lr=0.5,
        ...     outer_steps=60, inner_lr=1.0, inner_tol=1e-12)
        >>> bool(torch.allclose(run.u, prob.outer_solution(z2, z3), atol=1e-9))
        True
    """
    where = "hypergradient.problem.run_bilevel"
    if not isinstance(problem, LinearBilevel):
        raise HypergradientError(
            f"{where}(problem=...): expected a LinearBilevel, got {type(problem).__name__}."
        )
    if not isinstance(method, AbstractHypergradientMethod):
        raise HypergradientError(
            f"{where}(method=...): expected hg.Implicit(...) or hg.Unrolled(...), got "
            f"{type(method).__name__}."
        )
    u, w0 = problem._uw(where, u0, w0)
    u = u.clone()
    _check_positive(where, "outer_lr", outer_lr)
    _check_positive(where, "inner_lr", inner_lr)
    _check_positive(where, "outer_steps", outer_steps, integer=True)
    _check_positive(where, "inner_steps", inner_steps, integer=True)
    _check_positive(where, "max_inner_steps", max_inner_steps, integer=True)
    if inner_tol is not None:
        _check_positive(where, "inner_tol", inner_tol)
    unrolled_cold = isinstance(method, Unrolled) and not warm_start
    if unrolled_cold and inner_tol is not None:
        raise HypergradientError(
            f"{where}(warm_start=False, method=Unrolled(steps={method.steps}), "
            f"inner_tol={inner_tol!r}): an unrolled cold start retrains exactly the "
            f"method's steps from w0; pass inner_tol=None (or hg.Implicit to re-solve)."
        )
    X = problem.inner_x

    def gd(w: torch.Tensor, steps: int, tol: float | None) -> tuple[torch.Tensor, int]:
        for k in range(steps if tol is None else max_inner_steps + 1):
            grad = X.T @ (X @ w - u)
            if tol is not None:
                norm = float(torch.linalg.vector_norm(grad))
                if norm <= tol:
                    return w, k
                if k == max_inner_steps:
                    warnings.warn(
                        f"{where}(inner_tol={tol:g}, max_inner_steps={max_inner_steps}): "
                        f"the inner gradient's norm is {norm:.3g} after the guard's steps. "
                        f"Fix: raise max_inner_steps or inner_lr (below 2 / lambda_max(X X^T)).",
                        ConvergenceWarning,
                        stacklevel=3,
                    )
                    return w, k
            w = w - inner_lr * grad
        return w, steps

    w = w0.clone()
    path, losses, counts = [u.clone()], [], []
    for _ in range(outer_steps):
        if unrolled_cold:
            w, taken = gd(w0.clone(), method.steps, None)
            at = w0
        else:
            start = w if warm_start else w0.clone()
            w, taken = gd(start, inner_steps, None if warm_start else inner_tol)
            at = w
        if not math.isfinite(float(problem.outer_loss({"w": w}))):
            raise HypergradientError(
                f"{where}: the outer loss became NaN/inf at outer step {len(losses) + 1}; "
                f"outer_lr={outer_lr:g} is too large for this approximation (cold start: "
                f"keep it below problem.max_stable_outer_lr(...); warm start may need less) "
                f"or the inner steps diverge (inner_lr below 2 / lambda_max(X X^T))."
            )
        grads = method.hypergrad(
            problem.inner_loss, problem.outer_loss, {"w": at}, {"u": u}, lr=inner_lr
        )
        u = u - outer_lr * grads["u"]
        path.append(u.clone())
        losses.append(float(problem.outer_loss({"w": w})))
        counts.append(taken)
    return BilevelRun(u=u, w=w, u_path=torch.stack(path), outer_losses=losses, inner_steps=counts)
