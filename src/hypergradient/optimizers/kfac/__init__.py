r"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015).

For an ``nn.Linear`` / ``nn.Conv2d`` layer with inputs :math:`\bar a` (a trailing 1 for the
bias) and pre-activation gradients :math:`g`, the Fisher block of :math:`[W, b]` is
approximated by :math:`A \otimes G`, :math:`A = E[\bar a \bar a^\top]`,
:math:`G = E[g g^\top]`, whose damped inverse costs two small matrix products.  Three uses:

* :class:`KFAC` - a ``torch.optim.Optimizer`` (param groups, ``state_dict``, lr
  schedulers) taking natural-gradient steps, factors collected with module hooks;
* :class:`KFACPreconditioner` - the damped inverse as CG's ``preconditioner`` in the core's
  inverse-Hessian solves (``hg.implicit_hypergrad(..., preconditioner=P)``);
* :class:`KFACSolver` - the K-FAC inverse *as* the
  inverse-Hessian approximation of an implicit hypergradient (zero Hessian-vector
  products; compare ``"identity"``, ``"neumann"``, ``"cg"`` as Lorraine et al. 2020 do).

:func:`curvature_factors` computes the blocks of a model from one batch;
:class:`KroneckerBlock` holds one layer's factors and the keys of its parameters.

Example: K-FAC-preconditioned CG for an implicit hypergradient (the logistic-regression
twin, whose weight ``W`` is used as ``X @ W``):

Examples:
    >>> import torch, hypergradient as hg
    >>> prob = hg.testing.logistic_problem()
    >>> X, W, b = prob.data["X"], prob.params["W"], prob.params["b"]
    >>> net = torch.nn.Linear(*W.shape).double()
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(W.T), net.bias.copy_(b)
    >>> block = hg.optimizers.kfac.curvature_factors(net, X)[""]
    >>> P = hg.optimizers.kfac.KFACPreconditioner(
    ...     [hg.optimizers.kfac.KroneckerBlock(block.A, block.G, "W", "b", weight_layout="in_out")],
    ...     damping=float(prob.hparams["log_l2"].exp().mean()), damping_mode="tikhonov")
    >>> g = hg.implicit_hypergrad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
    ...                           solver="cg", tol=1e-12, preconditioner=P)
    >>> hg.testing.relative_error(g, prob.hypergrad) < 1e-8
    True
"""

from ._blocks import KroneckerBlock as KroneckerBlock
from .optimizer import KFAC as KFAC
from .preconditioner import KFACPreconditioner as KFACPreconditioner
from .preconditioner import KFACSolver as KFACSolver
from .preconditioner import curvature_factors as curvature_factors

__all__ = ["KFAC", "KFACPreconditioner", "KFACSolver", "KroneckerBlock", "curvature_factors"]
