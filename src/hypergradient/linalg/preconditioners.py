r"""Preconditioners that are built from the operator itself and kept across solves.

A preconditioner here is a callable ``r -> M^{-1} r`` on trees shaped like the solution
(what :class:`~hypergradient.linalg.CG` takes).  The ones in this module also have
``prepare(matvec, like) -> int``: :func:`~hypergradient.implicit_hypergrad` calls it with
the operator of the current solve before solving, and it (re)builds itself when it decides
to, returning the number of matvecs it spent (counted in the solve's Hessian-vector
products).  Along a training run the operator changes slowly, so a sketch built every few
hyper-steps keeps preconditioning the later ones: its cost is amortized.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from .._errors import HypergradientError
from .._tree import Tree, tree_flatten_vector, tree_unflatten_vector

__all__ = ["NystromPreconditioner"]


class NystromPreconditioner:
    r"""Randomized Nyström preconditioner for a symmetric positive definite operator
    (Frangella, Tropp, Udell 2023, "Randomized Nyström preconditioning", Algorithms 2.1/5.1).

    From ``rank`` matvecs with an orthonormal Gaussian test matrix :math:`\Omega \in
    \mathbb R^{n \times \ell}` it builds the rank-:math:`\ell` Nyström approximation
    :math:`\hat A = (A\Omega)(\Omega^\top A \Omega)^{+}(A\Omega)^\top = U \hat\Lambda U^\top`
    (stabilised by a shift :math:`\nu = \sqrt n\,\epsilon\,\lVert A\Omega\rVert_F`), and applies

    .. math::

        M^{-1} r = (\hat\lambda_\ell + \mu)\, U (\hat\Lambda + \mu I)^{-1} U^\top r
                   + (r - U U^\top r),

    which maps the top :math:`\ell` eigenvalues of :math:`A` to about
    :math:`\hat\lambda_\ell + \mu` and leaves the rest alone: preconditioned CG then
    converges at the rate of the condition number :math:`(\lambda_{\ell+1} + \mu) / \lambda_n`
    instead of :math:`\lambda_1 / \lambda_n`.  ``mu`` is a floor for the approximated
    eigenvalues; :func:`~hypergradient.implicit_hypergrad` sketches the undamped operator and
    adds its ``damping`` to :math:`\mu` (through :meth:`prepare`'s ``shift``).

    With ``source="krylov"`` the test matrix costs no matvec at all: it is made of the last
    ``rank`` search directions :math:`p` of the conjugate-gradient solves that used this
    preconditioner, whose products :math:`Ap` CG computed anyway (:meth:`observe`).  Those
    directions are where the right-hand sides put their weight, so along a run of related
    solves they sketch the part of the spectrum that matters; they come from earlier (slightly
    different) operators, which only makes the preconditioner less exact, never indefinite
    (directions of non-positive curvature are dropped).

    Args:
        rank: :math:`\ell`, matvecs per sketch (and columns kept).
        source: ``"random"`` (Gaussian test matrix, ``rank`` matvecs per sketch) or
            ``"krylov"`` (recycled CG directions, no matvecs).
        refresh_every: calls of :meth:`prepare` between two sketches (1: every solve).  The
            sketch of an earlier operator is still a symmetric positive definite
            preconditioner for a later one, just a less exact one.
        mu: eigenvalue floor :math:`\mu \ge 0` (see above).
        seed: seeds the test matrices (a sketch is reproducible from the seed and the
            number of sketches made).

    Cost: ``rank`` matvecs per sketch, a QR of :math:`n\times\ell`, an
    :math:`\ell\times\ell` Cholesky and an SVD of :math:`n\times\ell`; memory
    :math:`2 n \ell` numbers while sketching, :math:`n\ell` kept; each application is two
    products with :math:`U` (:math:`4 n\ell` flops).

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> top = torch.logspace(4, 2, 5, dtype=torch.float64)  # 5 large eigenvalues ...
        >>> A = torch.diag(torch.cat([top, torch.linspace(1, 2, 45, dtype=torch.float64)]))
        >>> matvec, b = (lambda v: A @ v), torch.ones(50, dtype=torch.float64)
        >>> P = hg.linalg.NystromPreconditioner(rank=8)
        >>> P.prepare(matvec, b)  # sketch now: `rank` matvecs
        8
        >>> plain = hg.linalg.CG(tol=1e-8).solve(matvec, b).stats.num_steps
        >>> pcg = hg.linalg.CG(tol=1e-8, preconditioner=P).solve(matvec, b).stats.num_steps
        >>> pcg < plain  # ... that preconditioning removes
        True
    """

    def __init__(
        self,
        rank: int = 20,
        refresh_every: int = 10,
        mu: float = 0.0,
        seed: int = 0,
        source: str = "random",
    ):
        where = "NystromPreconditioner"
        if source not in ("random", "krylov"):
            raise HypergradientError(
                f"{where}(source={source!r}): expected 'random' (a Gaussian sketch) or "
                f"'krylov' (recycled conjugate-gradient directions)."
            )
        self.source = source
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (p, A p), flat
        for name, value in (("rank", rank), ("refresh_every", refresh_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HypergradientError(f"{where}({name}={value!r}): expected an int >= 1.")
        if not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
            raise HypergradientError(f"{where}(mu={mu!r}): expected a finite number >= 0.")
        self.rank, self.refresh_every, self.mu, self.seed = rank, refresh_every, float(mu), seed
        self._basis: torch.Tensor | None = None  # U, n x rank
        self._scale: torch.Tensor | None = None  # (lambda_l + mu) / (lambda_i + mu) - 1
        self._like: Tree | None = None
        self._calls = 0
        self._sketches = 0
        self._shift = 0.0  # the operator's own damping, given by prepare()

    def __repr__(self) -> str:
        return (
            f"NystromPreconditioner(rank={self.rank}, refresh_every={self.refresh_every}, "
            f"mu={self.mu:g}, seed={self.seed}, source={self.source!r})"
        )

    # ------------------------------------------------------------------ building
    def reset(self) -> None:
        """Drop the sketch: the next :meth:`prepare` builds a new one."""
        self._basis = self._scale = self._like = None
        self._calls = 0
        self._pairs = []

    def _fits(self, like: Tree) -> bool:
        old = self._like
        if old is None or type(old) is not type(like):
            return False
        if isinstance(like, Mapping):
            return set(old) == set(like) and all(
                old[k].shape == like[k].shape and old[k].dtype == like[k].dtype for k in like
            )
        return old.shape == like.shape and old.dtype == like.dtype

    def prepare(self, matvec: Callable[[Tree], Tree], like: Tree, shift: float = 0.0) -> int:
        """Sketch ``matvec`` if due (every ``refresh_every`` calls, or when the shapes
        changed); return the matvecs spent (0 or ``rank``).  The operator to precondition is
        ``matvec + shift I`` (a solver's damping): the shift joins ``mu`` rather than the
        sketch, which could not resolve it."""
        self._shift = float(shift)
        due = self._basis is None or not self._fits(like) or self._calls % self.refresh_every == 0
        self._calls += 1
        if not due:
            return 0
        if self.source == "krylov":
            if not self._fits(like):
                self._pairs = []
                self._basis = self._scale = None
                self._like = (
                    {k: v.detach() for k, v in like.items()}
                    if isinstance(like, Mapping)
                    else like.detach()
                )
            self._recycle()
            return 0
        self.sketch(matvec, like)
        return self.rank

    def observe(self, direction: Tree, product: Tree) -> None:
        """Record a conjugate-gradient direction ``p`` and ``A p`` (``source="krylov"``;
        :class:`~hypergradient.linalg.CG` calls this for every step it takes)."""
        if self.source != "krylov":
            return
        p = tree_flatten_vector(direction).detach()
        ap = tree_flatten_vector(product).detach()
        if self._shift:
            ap = ap - self._shift * p  # the sketch is of the undamped operator
        self._pairs = [*self._pairs[-(self.rank - 1) :], (p.clone(), ap.clone())]

    def _recycle(self) -> None:
        if not self._pairs or self._like is None:
            return
        flat = tree_flatten_vector(self._like)
        p = torch.stack([a for a, _ in self._pairs], dim=1).double()
        ap = torch.stack([b for _, b in self._pairs], dim=1).double()
        q, r = torch.linalg.qr(p)
        good = r.diagonal().abs() > r.diagonal().abs().max() * 1e-10
        if not bool(good.all()):  # (nearly) repeated directions: keep an independent subset
            p, ap = p[:, good], ap[:, good]
            q, r = torch.linalg.qr(p)
        y = torch.linalg.solve_triangular(r, ap, upper=True, left=False)  # A Q = (A P) R^-1
        self._build(q, y, flat)
        self._sketches += 1

    def sketch(self, matvec: Callable[[Tree], Tree], like: Tree) -> None:
        """Build the rank-``rank`` approximation of the operator ``matvec`` now."""
        template = {k: v.detach() for k, v in like.items()} if isinstance(like, Mapping) else like
        flat = tree_flatten_vector(template)
        n = flat.numel()
        rank = min(self.rank, n)
        generator = torch.Generator(device="cpu").manual_seed(
            self.seed + 1_000_003 * self._sketches
        )
        # test matrix in float64 on the CPU (reproducible across devices), then moved
        omega = torch.randn(n, rank, generator=generator, dtype=torch.float64)
        omega = torch.linalg.qr(omega).Q.to(device=flat.device, dtype=flat.dtype)
        columns = [
            tree_flatten_vector(matvec(tree_unflatten_vector(omega[:, j].contiguous(), template)))
            for j in range(rank)
        ]
        y = torch.stack(columns, dim=1).detach().double()
        self._build(omega.double(), y, flat)
        self._like = template
        self._sketches += 1

    def _build(self, omega: torch.Tensor, y: torch.Tensor, flat: torch.Tensor) -> None:
        """The Nystrom factors from an orthonormal ``omega`` (n x l) and ``y = A omega``."""
        n = flat.numel()
        shift = math.sqrt(n) * torch.finfo(flat.dtype).eps * float(torch.linalg.norm(y))
        y_shifted = y + shift * omega
        core = omega.T @ y_shifted
        core = 0.5 * (core + core.T)
        # eigh rather than Cholesky: drops the directions a stale or indefinite operator
        # gives no positive curvature along, instead of failing
        values, vectors = torch.linalg.eigh(core)
        keep = values > values.abs().max() * 1e-12
        if not bool(keep.any()):
            raise HypergradientError(
                "NystromPreconditioner: Omega^T A Omega has no positive eigenvalue, so the "
                "operator is not positive definite; sketch a positive definite one (add "
                "damping, or use hessian='gauss_newton')."
            )
        b = y_shifted @ (vectors[:, keep] / values[keep].sqrt())
        u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
        eig = torch.clamp(sigma**2 - shift, min=0.0)
        mu = self.mu + self._shift
        floor = max(mu, torch.finfo(flat.dtype).tiny)
        # the l-th eigenvalue of the approximation: 0 when the sketch found fewer than l
        # directions (an operator of lower rank), so those found are scaled down to mu
        last = float(eig[-1]) if bool(keep.all()) else 0.0
        last = max(last + mu, floor)
        self._scale = (last / torch.clamp(eig + mu, min=floor) - 1.0).to(flat.dtype)
        self._basis = u.to(flat.dtype)

    # ------------------------------------------------------------------ applying
    def __call__(self, r: Tree) -> Tree:
        if self._basis is None:
            return r  # no sketch yet: the identity
        flat = tree_flatten_vector(r)
        u = self._basis
        coeffs = u.T @ flat
        return tree_unflatten_vector(flat + u @ (self._scale * coeffs), r)

    @property
    def eigenvalues_scale(self) -> torch.Tensor | None:
        """:math:`(\\hat\\lambda_\\ell+\\mu)/(\\hat\\lambda_i+\\mu) - 1` of the current sketch."""
        return self._scale

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "calls": self._calls,
            "sketches": self._sketches,
            "basis": self._basis,
            "scale": self._scale,
            "like": self._like,
            "pairs": [list(pair) for pair in self._pairs],
        }

    def load_state_dict(self, state: Mapping) -> None:
        self._calls = int(state["calls"])
        self._sketches = int(state["sketches"])
        self._basis, self._scale, self._like = state["basis"], state["scale"], state["like"]
        self._pairs = [(a, b) for a, b in state.get("pairs", [])]
