r"""How an equilibrium layer is differentiated: exact implicit, or a phantom gradient.

For :math:`z^\star = f_\theta(z^\star, x)` and a loss :math:`\ell(z^\star)` with
:math:`g = \partial\ell/\partial z^\star`, the implicit function theorem gives the exact
gradient

.. math::

    \frac{d\ell}{d\theta} = u^\top \frac{\partial f}{\partial\theta}\Big|_{z^\star},
    \qquad (I - J)^\top u = g, \qquad J = \frac{\partial f}{\partial z}\Big|_{z^\star}

(the same for :math:`x` in place of :math:`\theta`).  A *phantom gradient* (Geng et al.
2021) replaces :math:`(I - J)^{-1}` by a cheap matrix :math:`A_{k,\lambda}`:

* :class:`PhantomBackward` (UPG, unrolling-based): from the detached fixed point,
  :math:`z_0 = \mathrm{sg}(z^\star)`, run :math:`z_t = \lambda f(z_{t-1}, x) + (1 -
  \lambda) z_{t-1}` for :math:`t = 1..k` and back-propagate through these :math:`k` steps.
  With :math:`J` frozen this is :math:`A = \lambda \sum_{t<k} (\lambda J + (1-\lambda)
  I)^t`; for a non-linear ``f`` each step uses the Jacobian at its own iterate.
* :class:`NeumannPhantomBackward` (NPG, Neumann-based): the same :math:`A` with every
  :math:`J` taken at :math:`z^\star`, applied to :math:`g` by :math:`k-1` vector-Jacobian
  products: the core's :class:`~hypergradient.linalg.Neumann` solver with step
  :math:`\alpha = \lambda` on the operator :math:`(I - J)^\top`.

Both tend to the exact gradient as :math:`k \to \infty` when the spectral radius of
:math:`J` is below one (then :math:`|\lambda\mu + 1 - \lambda| < 1` for every eigenvalue
:math:`\mu` and any :math:`\lambda \in (0, 1]`).  ``k = 1, \lambda = 1`` is the
"Jacobian-free" gradient :math:`(\partial f/\partial\theta)^\top g`.

Each backward object implements :meth:`AbstractEquilibriumBackward.attach`: given the
detached fixed point, it returns the tensor the layer outputs, wired so that autograd
produces the chosen gradient for the parameters of ``f`` and for ``x``.
"""

from __future__ import annotations

import abc
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .._errors import ConvergenceError, HypergradientError
from .._results import Result, SolveStats
from ..hypergrad.implicit import ConvergenceWarning
from ..linalg import GMRES, AbstractLinearSolver, Neumann
from ..linalg.operators import FixedPointOperator

__all__ = [
    "AbstractEquilibriumBackward",
    "ImplicitBackward",
    "NeumannPhantomBackward",
    "PhantomBackward",
    "get_backward",
]

Record = Callable[[SolveStats], None]


class AbstractEquilibriumBackward(abc.ABC):
    """Decide which gradient flows from an equilibrium layer's output to ``f`` and ``x``.

    Contract of :meth:`attach` (documented once, here): given the map ``f(z, x)``, the
    fixed point ``z_star`` (detached, shape ``(batch, ...)``) and the input ``x``, return a
    tensor equal to ``z_star`` up to the forward solver's tolerance (it is one or a few
    further applications of ``f``) whose autograd graph reaches the parameters of ``f`` and
    ``x`` and yields this method's gradient.  ``record(stats)`` is called once with the
    :class:`~hypergradient._results.SolveStats` of the backward computation (at ``attach``
    time for an unrolled method, during the backward pass for a linear solve).

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> class JacobianFree(hg.deq.AbstractEquilibriumBackward):  # one f, no solve
        ...     name = "jacobian_free"
        ...     def attach(self, f, z_star, x, record):
        ...         record(hg.SolveStats(hg.Result.SUCCESSFUL, 1, float("nan"), 1))
        ...         return f(z_star, x)  # its gradient is (df/dx)^T g, not (dz*/dx)^T g
        >>> class Affine(torch.nn.Module):  # f(z, x) = 0.5 z + x: z* = 2 x, dz*/dx = 2
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> x = torch.ones(1, 3, dtype=torch.float64, requires_grad=True)
        >>> hg.deq.EquilibriumLayer(Affine(), backward=JacobianFree())(x).sum().backward()
        >>> bool(torch.equal(x.grad, torch.ones_like(x)))  # df/dx = 1 (the exact value is 2)
        True
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def attach(
        self, f: nn.Module, z_star: torch.Tensor, x: torch.Tensor, record: Record
    ) -> torch.Tensor:
        """Return the layer output carrying this method's gradient; see the class docstring."""


def _one_application(
    f: nn.Module, z_star: torch.Tensor, x: torch.Tensor, where: str
) -> FixedPointOperator:
    """``z_out = f(z*, x)`` with its graph kept, as the core's fixed-point operator.

    The operator's ``matvec`` is ``u -> (I - J)^T u`` (one backward through the kept graph)
    and its single output ``z_out`` is the layer output: its graph leads to ``f``'s
    parameters and ``x``, so the vector ``u`` returned by a hook on ``z_out`` becomes
    ``u^T df/dtheta`` and ``u^T df/dx`` in the rest of the backward pass.
    """

    def phi(params: dict, hparams: dict) -> dict:
        return {"z": f(params["z"], x)}

    return FixedPointOperator(phi, {"z": z_star}, {}, where=where)


def _hookable(op: FixedPointOperator) -> torch.Tensor:
    """A view of ``f(z*, x)`` to carry the gradient hook.

    The hook's solver calls ``autograd.grad(f(z*, x), z, u)``; a hook registered on
    ``f(z*, x)`` itself would fire on that call too and recurse.  A hook on a view fires
    only for the gradient arriving from the rest of the network.
    """
    return op.outputs[0].view_as(op.outputs[0])


def _check_linear_solve(where: str, solver_name: str, stats: SolveStats, throw: bool) -> None:
    if stats.result is Result.SUCCESSFUL:
        return
    fix = (
        "The exact backward solves (I - J)^T u = g with J = df/dz at the fixed point; it "
        "needs the spectral radius of J below one. Keep f contractive (e.g. "
        "torch.nn.utils.parametrizations.spectral_norm on the z -> z weight, or clip its "
        "norm below 1), or use backward='phantom', which needs no solve."
    )
    message = (
        f"{where}: the backward linear solve ({solver_name}) {stats.result.message} after "
        f"{stats.num_steps} steps (residual {stats.residual_norm:.3e})."
    )
    if stats.result is Result.MAX_STEPS_REACHED and not throw:
        warnings.warn(
            f"{message} The gradient is approximate. Raise the solver's max_steps or "
            f"loosen its tol. {fix}",
            ConvergenceWarning,
            stacklevel=2,
        )
        return
    raise ConvergenceError(f"{message} {fix}")


@dataclass(frozen=True)
class ImplicitBackward(AbstractEquilibriumBackward):
    r"""The exact gradient by the implicit function theorem (``backward="exact"``).

    The output is :math:`f(z^\star, x)` (one application with its graph kept); a hook on it
    replaces the incoming gradient :math:`g` by the solution :math:`u` of

    .. math::

        (I - J)^\top u = g, \qquad J = \partial f/\partial z \text{ at } z^\star,

    solved by any of the core's linear solvers through the matvec
    :math:`u \mapsto u - J^\top u` of :class:`~hypergradient.linalg.operators.
    FixedPointOperator` (one vector-Jacobian product each, reusing one graph).  The rest
    of the backward pass then forms :math:`u^\top \partial f/\partial\theta` and
    :math:`u^\top \partial f/\partial x`.

    Args:
        linear_solver: default ``GMRES(max_steps=200, restart=40, tol=1e-6)`` (``J`` is
            not symmetric).  ``Neumann(alpha=1.0, tol=...)`` is the classic fixed-point
            iteration :math:`u \leftarrow J^\top u + g`; ``Dense()`` materialises the
            matrix (tiny layers, tests).  The whole batch is one linear system (block
            diagonal over samples).
        throw: raise :class:`~hypergradient.ConvergenceError` (instead of a
            :class:`~hypergradient.ConvergenceWarning`) when the solve stops at
            ``max_steps``.  Breakdown or NaN always raise.

    Cost: one application of ``f`` with its graph in the forward pass (memory: one graph
    of ``f``, whatever the number of solver iterations); in the backward pass one
    vector-Jacobian product of ``f`` per solver matvec, then one backward through ``f``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> class F(torch.nn.Module):  # z* = 0.5 tanh(z*) + x: dz*/dx = 1 / (1 - 0.5 tanh'(z*))
        ...     def forward(self, z, x):
        ...         return 0.5 * torch.tanh(z) + x
        >>> backward = hg.deq.ImplicitBackward(hg.linalg.GMRES(tol=1e-12))
        >>> layer = hg.deq.EquilibriumLayer(F(), hg.deq.Anderson(tol=1e-12), backward)
        >>> x = torch.linspace(-1, 1, 4, dtype=torch.float64).reshape(2, 2).requires_grad_()
        >>> z = layer(x)
        >>> z.sum().backward()
        >>> exact = 1 / (1 - 0.5 / torch.cosh(z.detach()) ** 2)
        >>> bool(torch.allclose(x.grad, exact)), layer.backward_stats.converged
        (True, True)

    References:
        Bai, Kolter, Koltun (2019), Deep Equilibrium Models.
    """

    linear_solver: AbstractLinearSolver = field(
        default_factory=lambda: GMRES(max_steps=200, restart=40, tol=1e-6)
    )
    throw: bool = False

    name: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise HypergradientError(
                f"hypergradient.deq.ImplicitBackward(linear_solver=...): expected an instance "
                f"of hypergradient.linalg.AbstractLinearSolver such as "
                f"hg.linalg.GMRES(tol=1e-8), got {type(self.linear_solver).__name__}."
            )
        if not isinstance(self.throw, bool):
            raise HypergradientError(
                f"hypergradient.deq.ImplicitBackward(throw={self.throw!r}): throw must be a bool."
            )

    def attach(
        self, f: nn.Module, z_star: torch.Tensor, x: torch.Tensor, record: Record
    ) -> torch.Tensor:
        where = "hypergradient.deq.EquilibriumLayer(backward='exact')"
        op = _one_application(f, z_star, x, where)
        z_out = _hookable(op)
        solver, throw = self.linear_solver, self.throw

        def solve_adjoint(grad: torch.Tensor) -> torch.Tensor:
            solution = solver.solve(op.matvec, {"z": grad})
            stats = solution.stats
            stats.extra["backward"] = "exact"
            stats.extra["vjps"] = op.num_matvecs
            record(stats)
            _check_linear_solve(where, type(solver).__name__, stats, throw)
            return solution.value["z"]

        z_out.register_hook(solve_adjoint)
        return z_out


def _check_phantom(where: str, steps: object, damping: object) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise HypergradientError(
            f"{where}: steps must be an integer >= 1, got {steps!r}. Geng et al. use "
            f"steps=5 with damping=0.5; steps=1, damping=1.0 is the Jacobian-free gradient."
        )
    ok = isinstance(damping, numbers.Real) and not isinstance(damping, bool)
    if not (ok and math.isfinite(float(damping)) and 0.0 < float(damping) <= 1.0):
        raise HypergradientError(
            f"{where}: damping (lambda) must be a number in (0, 1], got {damping!r}. Each "
            f"phantom step is z <- lambda * f(z, x) + (1 - lambda) * z; pass e.g. "
            f"damping=0.5."
        )


@dataclass(frozen=True)
class PhantomBackward(AbstractEquilibriumBackward):
    r"""Unrolling-based phantom gradient, UPG (Geng et al. 2021) (``backward="phantom"``).

    .. math::

        z_0 = \mathrm{sg}(z^\star), \qquad
        z_t = \lambda f(z_{t-1}, x) + (1 - \lambda) z_{t-1} \quad (t = 1..k),

    and the layer outputs :math:`z_k` with its graph, so autograd back-propagates through
    the :math:`k` damped steps only.  For a frozen Jacobian this is
    :math:`A_{k,\lambda} = \lambda \sum_{t<k} (\lambda J + (1-\lambda) I)^t \approx (I -
    J)^{-1}`.

    Args:
        steps: :math:`k \ge 1`.
        damping: :math:`\lambda \in (0, 1]`.  Defaults ``k = 5, \lambda = 0.5``: the
            settings of the official MDEQ configuration (``PG_STEPS: 5``, ``TAU: 0.5``).

    Cost: :math:`k` applications of ``f`` with graphs in the forward pass (memory grows
    with :math:`k`) and one backward through them; no linear solve.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> class Affine(torch.nn.Module):  # f(z, x) = 0.5 z + x: z* = 2 x, dz*/dx = 2
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> backward = hg.deq.PhantomBackward(steps=5, damping=0.5)
        >>> x = torch.ones(1, 3, dtype=torch.float64, requires_grad=True)
        >>> hg.deq.EquilibriumLayer(Affine(), backward=backward)(x).sum().backward()
        >>> # lambda * sum_{t<k} (lambda J + 1 - lambda)^t with J = 0.5: 2 (1 - 0.75^5) -> 2
        >>> bool(torch.allclose(x.grad, torch.full_like(x, 2 * (1 - 0.75**5))))
        True

    References:
        Geng, Zhang, Bai, Wang, Lin (2021), On Training Implicit Models.
    """

    steps: int = 5
    damping: float = 0.5

    name: ClassVar[str] = "phantom"

    def __post_init__(self) -> None:
        _check_phantom(
            f"hypergradient.deq.PhantomBackward(steps={self.steps!r}, damping={self.damping!r})",
            self.steps,
            self.damping,
        )

    def attach(
        self, f: nn.Module, z_star: torch.Tensor, x: torch.Tensor, record: Record
    ) -> torch.Tensor:
        lam = float(self.damping)
        z = z_star  # detached: no gradient flows into the forward solve
        with torch.enable_grad():
            for _ in range(self.steps):
                fz = f(z, x)
                z = fz if lam == 1.0 else torch.lerp(z, fz, lam)
        record(
            SolveStats(
                Result.SUCCESSFUL,
                self.steps,
                math.nan,
                self.steps,
                extra={"backward": "phantom", "damping": lam, "residual_computed": False},
            )
        )
        return z


@dataclass(frozen=True)
class NeumannPhantomBackward(AbstractEquilibriumBackward):
    r"""Neumann-based phantom gradient, NPG (Geng et al. 2021) (``backward="neumann"``).

    The output is :math:`f(z^\star, x)`; a hook replaces its incoming gradient :math:`g` by

    .. math::

        u = \lambda \sum_{t=0}^{k-1} \big(\lambda J + (1-\lambda) I\big)^{\top t} g,
        \qquad J = \partial f/\partial z \text{ at } z^\star,

    which is the core's :class:`~hypergradient.linalg.Neumann` series with ``k - 1`` terms
    beyond the first and step :math:`\alpha = \lambda` on the operator :math:`(I - J)^\top`
    (since :math:`I - \lambda (I - J) = \lambda J + (1 - \lambda) I`).

    Args:
        steps: :math:`k \ge 1` (:math:`k = 1` gives :math:`\lambda g`).
        damping: :math:`\lambda \in (0, 1]`.

    Cost: one application of ``f`` with its graph in the forward pass (memory independent
    of :math:`k`), :math:`k - 1` vector-Jacobian products and one backward through ``f``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> class Affine(torch.nn.Module):  # f(z, x) = 0.5 z + x: z* = 2 x, dz*/dx = 2
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> backward = hg.deq.NeumannPhantomBackward(steps=5, damping=0.5)
        >>> layer = hg.deq.EquilibriumLayer(Affine(), backward=backward)
        >>> x = torch.ones(1, 3, dtype=torch.float64, requires_grad=True)
        >>> layer(x).sum().backward()
        >>> # lambda * sum_{t<k} (lambda J + 1 - lambda)^t with J = 0.5: 2 (1 - 0.75^5) -> 2
        >>> bool(torch.allclose(x.grad, torch.full_like(x, 2 * (1 - 0.75**5))))
        True
        >>> layer.backward_stats.num_matvecs  # k - 1 vector-Jacobian products
        4

    References:
        Geng, Zhang, Bai, Wang, Lin (2021), On Training Implicit Models.
    """

    steps: int = 5
    damping: float = 0.5

    name: ClassVar[str] = "neumann"

    def __post_init__(self) -> None:
        _check_phantom(
            f"hypergradient.deq.NeumannPhantomBackward(steps={self.steps!r}, "
            f"damping={self.damping!r})",
            self.steps,
            self.damping,
        )

    def attach(
        self, f: nn.Module, z_star: torch.Tensor, x: torch.Tensor, record: Record
    ) -> torch.Tensor:
        where = "hypergradient.deq.EquilibriumLayer(backward='neumann')"
        op = _one_application(f, z_star, x, where)
        z_out = _hookable(op)
        series = Neumann(max_steps=self.steps - 1, alpha=float(self.damping), tol=0.0)

        def phantom_adjoint(grad: torch.Tensor) -> torch.Tensor:
            solution = series.solve(op.matvec, {"z": grad})
            stats = solution.stats
            stats.extra["backward"] = "neumann"
            record(stats)
            if not stats.converged:  # a truncated series can only fail by blowing up
                _check_linear_solve(where, "Neumann", stats, throw=True)
            return solution.value["z"]

        z_out.register_hook(phantom_adjoint)
        return z_out


_BACKWARDS: dict[str, type[AbstractEquilibriumBackward]] = {
    cls.name: cls for cls in (ImplicitBackward, PhantomBackward, NeumannPhantomBackward)
}


def get_backward(
    backward: str | AbstractEquilibriumBackward, where: str = "hypergradient.deq"
) -> AbstractEquilibriumBackward:
    """A backward method from its name (with default options) or an instance passed through.

    Examples:
        >>> import hypergradient as hg
        >>> hg.deq.get_backward("phantom")
        PhantomBackward(steps=5, damping=0.5)
        >>> method = hg.deq.NeumannPhantomBackward(steps=3)
        >>> hg.deq.get_backward(method) is method
        True
        >>> hg.deq.get_backward("jfb")
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: hypergradient.deq: backward='jfb' is not known; ...
    """
    if isinstance(backward, AbstractEquilibriumBackward):
        return backward
    if isinstance(backward, str) and backward in _BACKWARDS:
        return _BACKWARDS[backward]()
    raise HypergradientError(
        f"{where}: backward={backward!r} is not known; expected one of {sorted(_BACKWARDS)} "
        f"or an instance such as hypergradient.deq.PhantomBackward(steps=5, damping=0.5)."
    )
