"""Outcome codes and the ``Solution`` returned by every iterative routine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Result(enum.Enum):
    """Why an iterative routine stopped. ``message`` is written for a person.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> x, stats = hg.linalg.solve(lambda v: 2 * v, torch.ones(2), "cg")
        >>> stats.result.name, stats.result.ok
        ('SUCCESSFUL', True)
        >>> hg.Result.MAX_STEPS_REACHED.ok, hg.Result.BREAKDOWN.message.split(":")[0]
        (False, 'broke down')
    """

    SUCCESSFUL = "converged: the residual is below the requested tolerance"
    MAX_STEPS_REACHED = (
        "did not converge within max_steps: raise max_steps, loosen tol, add damping "
        "or use a preconditioner"
    )
    BREAKDOWN = (
        "broke down: the operator is not positive definite along a search direction "
        "(CG needs a symmetric positive definite matrix; add damping, use the "
        "Gauss-Newton matvec, or a solver for indefinite systems such as 'minres' or 'gmres')"
    )
    DIVERGED = (
        "diverged: the iterates grew without bound (for Neumann the step alpha must satisfy "
        "0 < alpha * lambda_max < 2)"
    )
    NONFINITE = "produced NaN or inf values"

    @property
    def message(self) -> str:
        return self.value

    @property
    def ok(self) -> bool:
        return self is Result.SUCCESSFUL


@dataclass
class SolveStats:
    """What a linear solve did: steps taken, final residual norm, matvec count.

    ``converged`` is ``result.ok``; ``extra`` holds solver-specific details.

    Examples:
        CG solves a 2 x 2 system in 2 steps:

        >>> import torch
        >>> import hypergradient as hg
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.ones(2, dtype=torch.float64)
        >>> stats = hg.linalg.solve(lambda v: A @ v, b, "cg", tol=1e-10).stats
        >>> stats.converged, stats.num_steps, stats.num_matvecs, stats.residual_norm < 1e-10
        (True, 2, 2, True)
    """

    result: Result
    num_steps: int
    residual_norm: float
    num_matvecs: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return self.result.ok


@dataclass
class Solution:
    """``value`` solves the system (as far as ``stats`` says); unpacks as ``(value, stats)``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> sol = hg.linalg.solve(lambda v: 2 * v, torch.ones(2), "cg")  # A = 2 I
        >>> x, stats = sol
        >>> x is sol.value, x.tolist(), stats.converged
        (True, [0.5, 0.5], True)
    """

    value: Any
    stats: SolveStats

    def __iter__(self):  # allows ``x, info = solve(...)``
        yield self.value
        yield self.stats
