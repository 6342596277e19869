r"""``EquilibriumLayer``: a deep-equilibrium (DEQ) layer :math:`z^\star = f_\theta(z^\star, x)`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .._errors import ConvergenceError, HypergradientError
from .._results import Result, SolveStats
from ..hypergrad.implicit import ConvergenceWarning
from .backward import AbstractEquilibriumBackward, get_backward
from .solvers import AbstractFixedPointSolver, get_fixed_point_solver

__all__ = ["EquilibriumLayer"]

_WHERE = "hypergradient.deq.EquilibriumLayer"


class EquilibriumLayer(nn.Module):
    r"""Output the fixed point :math:`z^\star = f_\theta(z^\star, x)` of a map ``f(z, x)``.

    The forward pass finds :math:`z^\star` with a fixed-point solver under
    ``torch.no_grad()`` (no graph of the iterations is kept), then hands the detached
    :math:`z^\star` to a backward method that decides which gradient reaches
    :math:`\theta` (the parameters of ``f``) and ``x``:

    * ``"exact"`` (:class:`~hypergradient.deq.ImplicitBackward`): the implicit function
      theorem, :math:`d\ell/d\theta = u^\top \partial_\theta f` with
      :math:`(I - \partial_z f)^\top u = \partial\ell/\partial z^\star`, solved by one of
      the core's linear solvers (GMRES by default);
    * ``"phantom"`` (:class:`~hypergradient.deq.PhantomBackward`): back-propagation
      through :math:`k` damped steps :math:`z \leftarrow \lambda f(z, x) + (1-\lambda) z`
      started at the detached :math:`z^\star` (Geng et al. 2021, UPG);
    * ``"neumann"`` (:class:`~hypergradient.deq.NeumannPhantomBackward`): the Neumann
      phantom gradient (NPG), :math:`k` terms of the damped series at :math:`z^\star`.

    Forward solvers: ``"anderson"`` (default), ``"broyden"``, ``"fixed_point"``, or an
    instance (:class:`~hypergradient.deq.Anderson`, ...) carrying ``tol`` and
    ``max_steps``.  What the solver and the backward did last is kept in
    :attr:`forward_stats` and :attr:`backward_stats`.

    Args:
        f: an ``nn.Module`` with ``f(z, x) -> tensor shaped like z``; its parameters are
            the layer's parameters.  For the fixed point to exist and the solvers and the
            exact gradient to be well defined, ``z -> f(z, x)`` should be a contraction
            (e.g. ``tanh(W z + U x + b)`` with :math:`\|W\|_2 < 1`).
        solver: forward solver, a name or an
            :class:`~hypergradient.deq.AbstractFixedPointSolver`.
        backward: ``"exact"`` / ``"phantom"`` / ``"neumann"`` (defaults of each class) or
            an :class:`~hypergradient.deq.AbstractEquilibriumBackward` instance.
        state_shape: shape of :math:`z` without the batch dimension, used for the zero
            start when :meth:`forward` gets no ``z0``.  ``None``: :math:`z` is shaped like
            ``x``.
        throw: when the forward solve stops at ``max_steps`` without reaching its
            tolerance, raise :class:`~hypergradient.ConvergenceError` instead of warning
            (:class:`~hypergradient.ConvergenceWarning`).  A diverging solve or NaN always
            raises.

    Shapes: ``x`` is ``(batch, ...)``; :math:`z` is ``(batch, *state_shape)``; the batch
    dimension is shared.

    Cost: forward, the solver's evaluations of ``f`` without graph plus what the backward
    method needs with graph (one application of ``f`` for ``"exact"``/``"neumann"``,
    :math:`k` for ``"phantom"``); backward, see each method.  With gradients disabled
    (``torch.no_grad()``) the layer returns the detached :math:`z^\star` and attaches
    nothing.  Double backward (``create_graph=True`` through the layer) is not supported.

    Examples:
        >>> import torch, hypergradient as hg
        >>> class Affine(torch.nn.Module):  # f(z, x) = 0.5 z + x,  z* = 2x,  dz*/dx = 2
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> layer = hg.deq.EquilibriumLayer(Affine(), solver=hg.deq.Anderson(tol=1e-12),
        ...     backward=hg.deq.ImplicitBackward(hg.linalg.GMRES(tol=1e-12)))
        >>> x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
        >>> z = layer(x)
        >>> z.sum().backward()
        >>> bool(torch.allclose(z, 2 * x)), bool(torch.allclose(x.grad, torch.full_like(x, 2.0)))
        (True, True)
        >>> layer.forward_stats.converged, layer.backward_stats.converged
        (True, True)

    References:
        Bai, Kolter, Koltun (2019), Deep Equilibrium Models; Geng, Zhang, Bai, Wang, Lin
        (2021), On Training Implicit Models.
    """

    forward_stats: SolveStats | None
    backward_stats: SolveStats | None

    def __init__(
        self,
        f: nn.Module,
        solver: str | AbstractFixedPointSolver = "anderson",
        backward: str | AbstractEquilibriumBackward = "exact",
        *,
        state_shape: Sequence[int] | None = None,
        throw: bool = False,
    ):
        super().__init__()
        if not isinstance(f, nn.Module):
            raise HypergradientError(
                f"{_WHERE}(f, ...): f must be a torch.nn.Module with forward(z, x) returning a "
                f"tensor shaped like z, got {type(f).__name__}. Wrap a function in a Module "
                f"so that its parameters are registered with the layer."
            )
        self.f = f
        self.solver = get_fixed_point_solver(solver, f"{_WHERE}(f, solver=...)")
        self.backward_method = get_backward(backward, f"{_WHERE}(f, backward=...)")
        if state_shape is not None:
            shape = tuple(state_shape)
            if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
                raise HypergradientError(
                    f"{_WHERE}(f, state_shape={state_shape!r}): state_shape must be a tuple of "
                    f"positive ints, the shape of z without the batch dimension, e.g. (64,)."
                )
            self.state_shape: tuple[int, ...] | None = shape
        else:
            self.state_shape = None
        if not isinstance(throw, bool):
            raise HypergradientError(f"{_WHERE}(f, throw={throw!r}): throw must be a bool.")
        self.throw = throw
        self.forward_stats = None
        self.backward_stats = None

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.backward_method!r}"

    def _start(self, x: torch.Tensor, z0: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise HypergradientError(
                f"{_WHERE}.forward(x): x must be a tensor with a batch dimension first, got "
                f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}."
            )
        if z0 is None:
            if self.state_shape is None:
                return torch.zeros_like(x).detach()
            return torch.zeros((x.shape[0], *self.state_shape), dtype=x.dtype, device=x.device)
        if not isinstance(z0, torch.Tensor) or z0.dim() < 1 or z0.shape[0] != x.shape[0]:
            got = tuple(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__
            raise HypergradientError(
                f"{_WHERE}.forward(x, z0): z0 must be a tensor (batch, ...) with the batch "
                f"size of x ({x.shape[0]}), got {got}."
            )
        return z0.detach()

    def _checked_map(self, x: torch.Tensor, guessed_start: bool):
        checked = False

        def fn(z: torch.Tensor) -> torch.Tensor:
            nonlocal checked
            if checked:
                return self.f(z, x)
            try:
                out = self.f(z, x)
            except RuntimeError as error:
                if not guessed_start:
                    raise
                # The usual cause: z is not shaped like x, and the zero start guessed it was.
                raise HypergradientError(
                    f"{_WHERE}.forward(x): f(z, x) failed for the zero start z of shape "
                    f"{tuple(z.shape)} (shaped like x, since the layer has no state_shape): "
                    f"{error}. If z and x have different shapes, pass "
                    f"state_shape=(...) (the shape of z without the batch dimension) to "
                    f"the layer, or z0=... to forward."
                ) from error
            if not isinstance(out, torch.Tensor):
                raise HypergradientError(
                    f"{_WHERE}.forward(x): f(z, x) must return a tensor shaped like z, "
                    f"got {type(out).__name__}."
                )
            if out.shape != z.shape or out.dtype != z.dtype:
                raise HypergradientError(
                    f"{_WHERE}.forward(x): f(z, x) returned shape {tuple(out.shape)} and "
                    f"dtype {out.dtype} for z of shape {tuple(z.shape)} and dtype "
                    f"{z.dtype}; an equilibrium map must return a tensor shaped like z. "
                    f"Pass state_shape=(...) (the shape of z without the batch "
                    f"dimension) to the layer, or z0=... to forward, and use one dtype."
                )
            checked = True
            return out

        return fn

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """Solve :math:`z = f(z, x)` from ``z0`` (zeros by default) and attach the backward.

        Args:
            x: the input injection, ``(batch, ...)``.
            z0: optional start ``(batch, *state_shape)``, e.g. the previous fixed point
                (warm start); detached.

        Returns:
            :math:`z^\\star`, ``(batch, *state_shape)``.
        """
        start = self._start(x, z0)
        self.backward_stats = None
        with torch.no_grad():
            guessed = z0 is None and self.state_shape is None
            solution = self.solver.solve(self._checked_map(x, guessed), start)
        stats = solution.stats
        self.forward_stats = stats
        self._check_forward(stats)
        z_star = solution.value.detach()
        if not torch.is_grad_enabled():
            return z_star
        return self.backward_method.attach(self.f, z_star, x, self._record_backward)

    def _record_backward(self, stats: SolveStats) -> None:
        self.backward_stats = stats

    def _check_forward(self, stats: SolveStats) -> None:
        if stats.result is Result.SUCCESSFUL:
            return
        history = stats.extra.get("abs_residual_history", [])
        first = history[0] if history else float("nan")
        last = history[-1] if history else float("nan")
        name = type(self.solver).__name__
        what = {
            Result.MAX_STEPS_REACHED: "stopped at max_steps without reaching its tolerance",
            Result.DIVERGED: "diverged (the residual grew more than a million-fold)",
            Result.NONFINITE: "produced NaN or inf values",
        }.get(stats.result, stats.result.message)
        trend = (
            f"The largest residual ||f(z) - z|| grew from {first:.3e} to {last:.3e}: "
            f"z -> f(z, x) does not look like a contraction."
            if last > first
            else f"The largest residual ||f(z) - z|| went from {first:.3e} to {last:.3e}."
        )
        others = [s for s in ("anderson", "broyden") if s != self.solver.name]
        fix = (
            "Fix: make f contractive (e.g. torch.nn.utils.parametrizations.spectral_norm on "
            "the z -> z weight, or clip its spectral norm below 1), damp the iteration "
            f"(mixing < 1), or try solver={' / '.join(repr(s) for s in others)}."
        )
        message = (
            f"{_WHERE}.forward: the forward solver {name} {what} after {stats.num_steps} "
            f"steps ({stats.num_matvecs} evaluations of f; relative residual "
            f"{stats.residual_norm:.3e}, tol={self.solver.tol!r}). {trend}"
        )
        if stats.result is Result.MAX_STEPS_REACHED:
            more = (
                f"Raise max_steps (now {self.solver.max_steps}) or loosen tol, e.g. "
                f"solver={name}(max_steps={2 * self.solver.max_steps}, tol=...). "
            )
            if self.throw:
                raise ConvergenceError(f"{message} {more}{fix}")
            warnings.warn(
                f"{message} The output is not a fixed point to tolerance and its gradient "
                f"is approximate. {more}{fix}",
                ConvergenceWarning,
                stacklevel=3,
            )
            return
        raise ConvergenceError(f"{message} {fix}")
