"""Outcome codes and the ``Solution`` returned by every iterative routine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Result(enum.Enum):
    """Why an iterative routine stopped. ``message`` is written for a person."""

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
    """What a linear solve did: steps taken, final residual norm, matvec count."""

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
    """``value`` solves the system (as far as ``stats`` says); unpacks as ``(value, stats)``."""

    value: Any
    stats: SolveStats

    def __iter__(self):  # allows ``x, info = solve(...)``
        yield self.value
        yield self.stats
