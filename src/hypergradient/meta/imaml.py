r"""iMAML: meta-gradients from the implicit function theorem (Rajeswaran et al. 2019).

Every task is solved as a *proximal* problem around the task's starting point
:math:`\varphi_0(\theta)` (:meth:`~.models.AbstractModel.task_params`):

.. math::

    \varphi^*(\theta) = \arg\min_\varphi\ G(\varphi, \theta), \qquad
    G(\varphi, \theta) = \hat L(\varphi) + \frac{\lambda}{2}\,\|\varphi - \varphi_0(\theta)\|^2 .

At the minimiser :math:`\nabla\hat L(\varphi^*) + \lambda(\varphi^* - \varphi_0) = 0`;
differentiating this identity in :math:`\varphi_0` gives
:math:`(\hat H + \lambda I)\, d\varphi^* = \lambda\, d\varphi_0` with
:math:`\hat H = \nabla^2 \hat L(\varphi^*)`, so

.. math::

    \frac{dL(\varphi^*)}{d\varphi_0} = \Big(I + \frac{\hat H}{\lambda}\Big)^{-1}
        \nabla L(\varphi^*), \qquad
    \frac{dL(\varphi^*)}{d\theta} = \Big(\frac{\partial\varphi_0}{\partial\theta}\Big)^{\!\top}
        \frac{dL(\varphi^*)}{d\varphi_0}.

The linear system is solved by ``cg_steps`` conjugate-gradient iterations
(:class:`hypergradient.linalg.CG`) with Hessian-vector products of the support loss
(:class:`hypergradient.linalg.operators.HessianOperator`: one gradient graph built at
:math:`\varphi^*`, one backward through it per product).  The inner problem is solved
approximately by ``inner_steps`` gradient steps on :math:`G` with no graph kept, so the
memory is that of one support-set gradient graph and a few parameter-sized vectors,
*whatever the number of inner steps*; the meta-gradient depends on :math:`\varphi^*` only,
not on the path to it.

Which system is solved: the paper's :math:`(I + \hat H/\lambda)\,x = \nabla L`, plus an
optional ``cg_damping`` :math:`\delta`: :math:`((1+\delta) I + \hat H/\lambda)\,x =
\nabla L` (the official code uses a heavily damped variant by default; here the default
is no damping).  CG needs the matrix positive definite, i.e. :math:`\hat H \succ -\lambda
I`; if a direction of stronger negative curvature stops CG, the iterate before it is used
and ``stats["cg_breakdowns"]`` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import HypergradientError
from .._results import Result
from .._tree import tree_axpy, tree_scale
from ..linalg import CG
from ..linalg.operators import HessianOperator
from ._base import (
    AbstractMetaLearner,
    LossFn,
    MetaGradient,
    Params,
    accuracy,
    check_float,
    check_int,
    check_model_and_loss,
    default_loss,
    leaves_requiring_grad,
    pull_back,
)
from .episodes import Episode
from .models import AbstractModel

__all__ = ["IMAML"]


@dataclass(frozen=True)
class IMAML(AbstractMetaLearner):
    r"""Implicit MAML: proximal inner problem, meta-gradient by CG on :math:`I + \hat H/\lambda`.

    Args:
        model: an :class:`~.models.AbstractModel`.
        lam: :math:`\lambda > 0`, the strength of the proximal term (the paper uses 2 on
            Omniglot).  Large :math:`\lambda`: the task parameters stay near
            :math:`\theta` and the meta-gradient approaches first-order MAML's.
        inner_steps: gradient steps on :math:`G` from :math:`\varphi_0` (``>= 0``).
        inner_lr: their step size; stable for ``inner_lr * (L + lam) < 2`` with ``L``
            the support loss's curvature.
        cg_steps: conjugate-gradient iterations for the meta-gradient (the paper uses 5);
            CG stops earlier only if the relative residual drops below ``cg_tol``.
        cg_tol: relative residual at which CG stops (``0``: always ``cg_steps``).
        cg_damping: :math:`\delta \ge 0` added to the identity part of the matrix.
        loss: ``loss(output, target) -> scalar``; default cross-entropy for integer
            targets, mean squared error otherwise.

    Cost per task: ``inner_steps`` forward/backward passes on the support set (no graph);
    one forward/backward on the query set; one ``create_graph`` gradient of the support
    loss and one backward through it per CG step; one vector-Jacobian product through
    ``task_params``.  ``stats``: ``cg_steps`` (iterations done), ``cg_relative_residual``
    (:math:`\|r\|/\|\nabla L\|` at the end), ``cg_breakdowns`` (0 or 1),
    ``inner_grad_norm`` (:math:`\|\nabla G(\hat\varphi)\|`: how far the inner problem is
    from solved; the meta-gradient error grows with it).

    Examples:
        >>> import torch
        >>> from hypergradient.meta import IMAML, MLP, LinearTasks
        >>> net = MLP(3, (), out_features=1)  # linear regression: w, b
        >>> theta = net.init(torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> episode = LinearTasks(dim=3, dtype=torch.float64).sample(
        ...     torch.Generator().manual_seed(1))
        >>> g = IMAML(net, lam=1.0, inner_steps=200, inner_lr=0.3,
        ...           cg_steps=4).meta_gradient(theta, episode)
        >>> g.stats["cg_relative_residual"] < 1e-10  # 4 parameters: CG is exact in 4 steps
        True

    References:
        Rajeswaran, Finn, Kakade, Levine (2019), Meta-Learning with Implicit Gradients.
    """

    model: AbstractModel
    lam: float = 2.0
    inner_steps: int = 16
    inner_lr: float = 0.1
    cg_steps: int = 5
    cg_tol: float = 0.0
    cg_damping: float = 0.0
    loss: LossFn = default_loss

    def __post_init__(self) -> None:
        where = "hypergradient.meta.IMAML(...)"
        check_model_and_loss(where, self.model, self.loss)
        check_float(where, "lam", self.lam)
        check_int(where, "inner_steps", self.inner_steps, 0)
        check_float(where, "inner_lr", self.inner_lr)
        check_int(where, "cg_steps", self.cg_steps, 1)
        check_float(where, "cg_tol", self.cg_tol, positive=False)
        check_float(where, "cg_damping", self.cg_damping, positive=False)

    # -------------------------------------------------------------------- inner problem

    def _support_loss(self, episode: Episode):
        def loss(params, _hparams):
            return self.loss(self.model.predict(params, episode.x_support), episode.y_support)

        return loss

    def proximal_solve(self, phi0: Params, episode: Episode) -> dict[str, torch.Tensor]:
        r"""``inner_steps`` gradient steps on :math:`G(\varphi) = \hat L(\varphi) +
        \frac{\lambda}{2}\|\varphi - \varphi_0\|^2` from :math:`\varphi_0`, no graph kept;
        returns the detached iterate."""
        center = {k: v.detach() for k, v in phi0.items()}
        phi = dict(center)
        support_loss = self._support_loss(episode)
        for _ in range(self.inner_steps):
            leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
            with torch.enable_grad():
                value = support_loss(leaves, {})
                grads = torch.autograd.grad(value, list(leaves.values()))
            if not torch.isfinite(value):
                raise HypergradientError(
                    f"IMAML inner problem: the support loss became {float(value.detach())}; lower "
                    f"inner_lr (now {self.inner_lr}) so that inner_lr * (L + lam) < 2."
                )
            with torch.no_grad():
                phi = {
                    k: phi[k] - self.inner_lr * (g + self.lam * (phi[k] - center[k]))
                    for k, g in zip(leaves.keys(), grads)
                }
        return phi

    # -------------------------------------------------------------------- interface

    def adapt(self, theta: Params, episode: Episode) -> dict[str, torch.Tensor]:
        phi0 = self.model.task_params({k: v.detach() for k, v in theta.items()}, episode.ways)
        return self.proximal_solve(phi0, episode)

    def predict(self, theta: Params, phi: Params, x: torch.Tensor) -> torch.Tensor:
        return self.model.predict(phi, x)

    def meta_gradient(self, theta: Params, episode: Episode) -> MetaGradient:
        leaves = leaves_requiring_grad(theta, "hypergradient.meta.IMAML.meta_gradient")
        with torch.enable_grad():
            phi0 = self.model.task_params(leaves, episode.ways)
        phi = self.proximal_solve(phi0, episode)
        return self.implicit_meta_gradient(leaves, phi0, phi, episode)

    def implicit_meta_gradient(
        self,
        theta: dict[str, torch.Tensor],
        phi0: Params,
        phi: Params,
        episode: Episode,
    ) -> MetaGradient:
        r"""The meta-gradient at a given (approximate) inner solution ``phi``.

        ``theta`` are leaves requiring grad and ``phi0 = model.task_params(theta, ways)``
        computed from them with autograd on; ``phi`` is the inner solution (detached).
        Exposed so that the linear solve can be checked on its own against a dense one.
        """
        # 1. v = grad of the query loss at phi (and the query loss itself).
        w = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        with torch.enable_grad():
            out = self.model.predict(w, episode.x_query)
            query_loss = self.loss(out, episode.y_query)
            v = dict(zip(w.keys(), torch.autograd.grad(query_loss, list(w.values()))))

        # 2. Solve ((1 + delta) I + H / lam) x = v by CG, H the support-loss Hessian at phi.
        #    CG is invariant to scaling the system, but keeping the paper's form makes
        #    cg_tol and the residual in stats relative to ||v|| as written there.
        hessian = HessianOperator(
            self._support_loss(episode), phi, {}, where="hypergradient.meta.IMAML"
        )
        inv_lam = 1.0 / self.lam

        def matvec(u):
            return tree_axpy(1.0 + self.cg_damping, u, tree_scale(hessian.matvec(u), inv_lam))

        solution = CG(max_steps=self.cg_steps, tol=self.cg_tol).solve(matvec, v)
        stats = solution.stats
        if stats.result is Result.NONFINITE:
            raise HypergradientError(
                f"IMAML meta-gradient: CG produced NaN/inf after {stats.num_steps} steps; the "
                f"support-loss Hessian is not finite at the inner solution. Lower inner_lr "
                f"(now {self.inner_lr}) or raise lam (now {self.lam})."
            )
        x = solution.value

        # 3. Pull x back through phi0(theta).
        grad = pull_back(phi0, theta, x)
        v_norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in v.values())))
        # How far phi is from solving the inner problem: the gradient of G there (the
        # operator already holds the support gradient at phi).
        support_grad = hessian.gradient()
        inner_grad_norm = float(
            torch.sqrt(
                sum(
                    ((support_grad[k] + self.lam * (phi[k] - phi0[k].detach())).double() ** 2).sum()
                    for k in phi
                )
            )
        )
        return MetaGradient(
            grad=grad,
            query_loss=float(query_loss.detach()),
            query_accuracy=accuracy(out.detach(), episode.y_query),
            stats={
                "cg_steps": float(stats.num_steps),
                "cg_relative_residual": stats.residual_norm / max(v_norm, 1e-300),
                "cg_breakdowns": float(stats.result is Result.BREAKDOWN),
                "inner_grad_norm": inner_grad_norm,
            },
        )
