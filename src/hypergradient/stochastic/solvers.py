r"""Stochastic bilevel solvers: SOBA, SABA (single loop), StocBiO and AmIGO (baselines).

All four track three variables of a :class:`FiniteSumBilevelProblem`:

* :math:`z \approx z^*(x) = \arg\min_z G(z, x)` (the inner solution),
* :math:`v \approx v^*(x) = -[\nabla^2_{zz} G]^{-1} \nabla_z F` (the solution of the linear
  system of the implicit function theorem),
* :math:`x` (the hyperparameters), moved along
  :math:`D_x = \nabla^2_{xz} G\, v + \nabla_x F`, which equals the hypergradient
  :math:`h'(x)` at :math:`(z^*, v^*)`.

Every solver is a final frozen dataclass of step sizes with the same two methods:
``state = solver.init(problem, z0, x0, seed=0)`` and ``state = solver.step(problem,
state)`` (pure: the random generator's state travels in the :class:`BilevelState`, so
stepping the same state twice gives the same result).  :func:`run` loops, times and
records; :func:`get_solver` builds one by name (``"soba"``, ``"saba"``, ``"stocbio"``,
``"amigo"``).

Step sizes are absolute (not scaled by curvature constants).  ``inner_step`` (and
``linear_step``, ``neumann_step``) must stay below :math:`2/L` with :math:`L` the largest
eigenvalue of a batch's inner Hessian :math:`\nabla^2_{zz} g_i`; the default 0.1 suits
losses that are means over samples with standardised features.  ``outer_step`` scales with
the curvature of :math:`h`, which has nothing to do with the inner one: equal steps (0.1)
work on :func:`~hypergradient.stochastic.problems.ridge_problem`, while the best outer step
on ``benchmarks/stochastic_bilevel.py``'s logistic regression is 80 (inner step 0.5).  The
default 0.01 is cautious; tune it on a grid.  Too large an ``outer_step`` diverges (e.g.
``exp(x)`` overflows for a log-parametrised penalty), which :func:`run` reports.
"""

from __future__ import annotations

import abc
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from .._errors import ConvergenceError, HypergradientError, check_tree
from .._tree import Tree, tree_add, tree_all_finite, tree_axpy, tree_map, tree_sub, tree_zeros_like
from ..diffopt._base import check_like
from ._oracles import (
    InnerOracle,
    OuterOracle,
    _checked,
    inner_grad,
    inner_oracle,
    outer_oracle,
)
from ._problem import FiniteSumBilevelProblem

_SOLVERS: dict[str, type[AbstractBilevelSolver]] = {}


class BilevelState(NamedTuple):
    """Everything a stochastic bilevel solver carries from one step to the next.

    Attributes:
        z: inner variable (tree shaped like ``z0``).
        v: linear-system variable, :math:`\\approx -H^{-1}\\nabla_z F` (shaped like ``z0``).
        x: outer variable, the hyperparameters (shaped like ``x0``).
        direction: the last outer direction :math:`D_x` (the hypergradient estimate the
            last step used; zeros before the first step).
        num_steps: number of ``step`` calls so far (outer iterations).
        inner_samples: inner samples processed so far (one oracle call on batch ``B``
            counts ``|B|``); ``inner_samples / n_inner`` is the number of epochs.
        outer_samples: the same for the outer samples.
        generator_state: state of the ``torch.Generator`` that draws the batches.
        memory: solver-specific (SABA: the SAGA tables), else ``None``.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, SABA
        >>> inner = lambda z, x, i: 0.5 * ((z - x) ** 2).sum()  # z*(x) = x
        >>> outer = lambda z, x, j: 0.5 * ((z - 1) ** 2).sum()  # h(x) = (x - 1)^2 / 2, x* = 1
        >>> p = FiniteSumBilevelProblem(inner, outer, 4, 4, inner_batch_size=2, outer_batch_size=2)
        >>> state = SABA().init(p, torch.zeros(2), torch.tensor(0.0))  # one pass: 4 + 4 samples
        >>> state.num_steps, state.inner_samples, state.outer_samples, tuple(state.v.shape)
        (0, 4, 4, (2,))
        >>> state = SABA().step(p, state)  # one inner and one outer batch of 2 samples
        >>> state.num_steps, state.inner_samples, state.outer_samples, tuple(state.direction.shape)
        (1, 6, 6, ())
    """

    z: Tree
    v: Tree
    x: Tree
    direction: Tree
    num_steps: int
    inner_samples: int
    outer_samples: int
    generator_state: torch.Tensor
    memory: Any = None


# --------------------------------------------------------------------------------------
# the interface and the registry
# --------------------------------------------------------------------------------------


class AbstractBilevelSolver(abc.ABC):
    """A stochastic solver of a :class:`FiniteSumBilevelProblem`.

    Contract (documented once, here):

    * :meth:`init` validates the problem and the initial point, evaluates both losses once
      (they must be finite scalars of the iterates' dtype), and returns a
      :class:`BilevelState` with ``v = v0`` (default zeros) and a generator seeded by
      ``seed``.
    * :meth:`step` is pure: it returns a new state and never modifies its input (the
      random batches are drawn from a copy of ``state.generator_state``); the same
      ``(problem, state)`` gives the same result.  It does *not* check for divergence;
      :func:`run` does.

    Subclasses are final frozen dataclasses that validate their step sizes in
    ``__post_init__`` and set ``name``, the registry key.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import AbstractBilevelSolver
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, SOBA
        >>> inner = lambda z, x, i: 0.5 * ((z - x) ** 2).sum()  # z*(x) = x
        >>> outer = lambda z, x, j: 0.5 * ((z - 1) ** 2).sum()  # h(x) = (x - 1)^2 / 2, x* = 1
        >>> p = FiniteSumBilevelProblem(inner, outer, 4, 4, inner_batch_size=2, outer_batch_size=2)
        >>> solver = SOBA()
        >>> isinstance(solver, AbstractBilevelSolver), solver.name
        (True, 'soba')
        >>> state = solver.init(p, torch.zeros(2), torch.tensor(0.0), seed=0)
        >>> a, b = solver.step(p, state), solver.step(p, state)  # pure: same state, same step
        >>> bool(torch.equal(a.z, b.z) and torch.equal(a.x, b.x)), state.num_steps, a.num_steps
        (True, 0, 1)
    """

    name: ClassVar[str]

    def init(
        self,
        problem: FiniteSumBilevelProblem,
        z0: Tree,
        x0: Tree,
        *,
        v0: Tree | None = None,
        seed: int = 0,
    ) -> BilevelState:
        """The initial state at ``(z0, v0, x0)``; see the class docstring."""
        where = f"hypergradient.stochastic.{type(self).__name__}.init(problem, z0, x0)"
        if not isinstance(problem, FiniteSumBilevelProblem):
            raise HypergradientError(
                f"{where}: `problem` must be a hypergradient.stochastic.FiniteSumBilevelProblem"
                f", got {type(problem).__name__}. Build one with FiniteSumBilevelProblem("
                f"inner_loss, outer_loss, n_inner, n_outer)."
            )
        check_tree(where, "z0", z0, allow_tensor=True)
        check_tree(where, "x0", x0, allow_tensor=True)
        dtypes = {t.dtype for t in _leaves(z0) + _leaves(x0)}
        if len(dtypes) != 1:
            raise HypergradientError(
                f"{where}: z0 and x0 must share one floating dtype, got {sorted(map(str, dtypes))}"
                f". Convert them with `.double()` (or `.float()`)."
            )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise HypergradientError(f"{where}: `seed` must be an int, got {seed!r}.")
        z = tree_map(lambda t: t.detach().clone(), z0)
        x = tree_map(lambda t: t.detach().clone(), x0)
        if v0 is None:
            v = tree_zeros_like(z)
        else:
            check_like(where, "v0", v0, z0, "z0")
            check_tree(where, "v0", v0, allow_tensor=True)
            v = tree_map(lambda t: t.detach().clone(), v0)
        (dtype,) = dtypes
        for name, batch_loss in (
            ("inner_loss", problem.inner_batch_loss),
            ("outer_loss", problem.outer_batch_loss),
        ):
            value = _checked(where, name, batch_loss(z, x, 0), dtype)
            if not bool(torch.isfinite(value)):
                raise HypergradientError(
                    f"{where}: `{name}(z0, x0, idx)` on the first batch returned "
                    f"{value.item()} (not finite). Start from another z0 / x0 (a log-"
                    f"parametrised penalty overflows exp(x) for large x)."
                )
        memory, inner_samples, outer_samples = self._initial_memory(problem, z, v, x)
        return BilevelState(
            z=z,
            v=v,
            x=x,
            direction=tree_zeros_like(x),
            num_steps=0,
            inner_samples=inner_samples,
            outer_samples=outer_samples,
            generator_state=torch.Generator().manual_seed(int(seed)).get_state(),
            memory=memory,
        )

    @abc.abstractmethod
    def _initial_memory(
        self, problem: FiniteSumBilevelProblem, z: Tree, v: Tree, x: Tree
    ) -> tuple[Any, int, int]:
        """``(memory, inner_samples, outer_samples)``: the solver's extra state and what
        building it cost, in samples."""

    @abc.abstractmethod
    def step(self, problem: FiniteSumBilevelProblem, state: BilevelState) -> BilevelState:
        """One outer iteration from ``state``; see the class docstring."""

    def _where(self) -> str:
        return f"hypergradient.stochastic.{type(self).__name__}(...)"

    def _check_step(self, name: str) -> None:
        value = getattr(self, name)
        is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (is_real and math.isfinite(float(value)) and float(value) > 0):
            raise HypergradientError(
                f"{self._where()}: `{name}` must be a finite step size > 0, got {value!r}. "
                f"Inner steps must stay below 2/L (L: largest eigenvalue of a batch's inner "
                f"Hessian), e.g. inner_step=0.1; the outer step follows the curvature of the "
                f"outer objective, e.g. outer_step=0.01 to start a grid."
            )

    def _check_count(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise HypergradientError(
                f"{self._where()}: `{name}` must be an integer >= 1, got {value!r}."
            )


def register_solver(cls: type[AbstractBilevelSolver]) -> type[AbstractBilevelSolver]:
    """Class decorator: make ``cls`` available by ``cls.name`` in :func:`get_solver`.

    Examples:
        >>> from hypergradient.stochastic import SOBA, available_solvers, get_solver
        >>> from hypergradient.stochastic import register_solver, solvers
        >>> @register_solver
        ... class DecreasingSOBA(SOBA):  # SOBA with the decreasing schedule by default
        ...     name = "soba_decreasing"
        ...     def __init__(self, inner_step=0.1, outer_step=0.01):
        ...         super().__init__(inner_step, outer_step, decreasing=True)
        >>> "soba_decreasing" in available_solvers()
        True
        >>> get_solver("soba_decreasing", outer_step=0.1).decreasing
        True
        >>> del solvers._SOLVERS["soba_decreasing"]  # (undo, to leave the registry as it was)
    """
    _SOLVERS[cls.name] = cls
    return cls


def available_solvers() -> list[str]:
    """Names of the registered stochastic bilevel solvers, sorted.

    Examples:
        >>> from hypergradient.stochastic import available_solvers, get_solver
        >>> available_solvers()
        ['amigo', 'saba', 'soba', 'stocbio']
        >>> type(get_solver("stocbio")).__name__
        'StocBiO'
    """
    return sorted(_SOLVERS)


def get_solver(solver: str | AbstractBilevelSolver, **options: Any) -> AbstractBilevelSolver:
    """Build a solver from its registry name and options, or pass an instance through.

    Examples:
        >>> from hypergradient.stochastic import get_solver
        >>> get_solver("saba", inner_step=0.05)
        SABA(inner_step=0.05, outer_step=0.01, linear_step=None, init_memory='full')
    """
    if isinstance(solver, AbstractBilevelSolver):
        if options:
            raise HypergradientError(
                f"hypergradient.stochastic.get_solver({type(solver).__name__}(...), "
                f"**{sorted(options)}): options can only be given with a solver name; set "
                f"them on the solver object instead."
            )
        return solver
    if not isinstance(solver, str) or solver not in _SOLVERS:
        raise HypergradientError(
            f"hypergradient.stochastic.get_solver(solver={solver!r}): unknown stochastic "
            f"bilevel solver; expected one of {available_solvers()} or an "
            f"AbstractBilevelSolver instance."
        )
    return _SOLVERS[solver](**options)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _leaves(tree: Tree) -> list[torch.Tensor]:
    return [tree] if isinstance(tree, torch.Tensor) else list(tree.values())


def _generator(state: BilevelState) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(state.generator_state)
    return gen


def _inner_sgd(
    problem: FiniteSumBilevelProblem, z: Tree, x: Tree, gen: torch.Generator, steps: int, lr: float
) -> tuple[Tree, int]:
    """``steps`` SGD steps on the inner objective from ``z``, a fresh inner batch each;
    returns the new ``z`` and the number of inner samples they read (StocBiO, AmIGO)."""
    samples = 0
    for _ in range(steps):
        i = problem.draw_inner(gen)
        z = tree_axpy(-lr, inner_grad(problem, z, x, i), z)
        samples += len(problem.inner_batches[i])
    return z, samples


def _saga(new: Tree, old: Tree, mean: Tree) -> Tree:
    """``new - old + mean``: the SAGA estimate (unbiased, variance -> 0 at a fixed point)."""
    return tree_map(lambda a, b, c: a - b + c, new, old, mean)


def _replace(table: tuple, k: int, entry: Any) -> tuple:
    return table[:k] + (entry,) + table[k + 1 :]


# --------------------------------------------------------------------------------------
# SOBA
# --------------------------------------------------------------------------------------


@register_solver
@dataclass(frozen=True)
class SOBA(AbstractBilevelSolver):
    r"""SOBA: one SGD step on :math:`z`, :math:`v` and :math:`x` together (Dagréou et al. 2022).

    With an inner batch :math:`i` and an independent outer batch :math:`j`, both drawn
    uniformly, one step is

    .. math::

        D_z &= \nabla_z g_i(z, x), \\
        D_v &= \nabla^2_{zz} g_i(z, x)\,v + \nabla_z f_j(z, x), \\
        D_x &= \nabla^2_{xz} g_i(z, x)\,v + \nabla_x f_j(z, x), \\
        z &\leftarrow z - \rho_t D_z,\quad v \leftarrow v - \rho^v_t D_v,\quad
        x \leftarrow x - \gamma_t D_x

    (the same inner batch for the three inner terms).  With constant steps the iterates
    hover in a noise ball whose radius grows with the steps (SOBA does *not* converge
    exactly; see :class:`SABA`).  ``decreasing=True`` uses the paper's schedule
    :math:`\rho_t = \rho\,(t+1)^{-2/5}`, :math:`\gamma_t = \gamma\,(t+1)^{-3/5}`, which
    converges at the rate :math:`O(\log T / T^{2/5})` on :math:`\|h'\|^2`.

    Args:
        inner_step: :math:`\rho` for :math:`z` (default 0.1).
        outer_step: :math:`\gamma` for :math:`x` (default 0.01).
        linear_step: :math:`\rho^v` for :math:`v` (default: ``inner_step``).
        decreasing: use the decreasing schedule above (default ``False``: constant steps).

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, SOBA, run
        >>> inner = lambda z, x, i: 0.5 * ((z - x) ** 2).sum()  # z*(x) = x
        >>> outer = lambda z, x, j: 0.5 * ((z - 1) ** 2).sum()  # h(x) = (x - 1)^2 / 2, x* = 1
        >>> p = FiniteSumBilevelProblem(inner, outer, 4, 4, inner_batch_size=2, outer_batch_size=2)
        >>> zero = torch.tensor(0.0, dtype=torch.float64)
        >>> out = run(SOBA(inner_step=0.5, outer_step=0.1), p, zero, zero, num_steps=50)
        >>> round(float(out.state.x), 2)  # noise-free batches: SOBA reaches x* = 1
        1.0
        >>> sched = SOBA(inner_step=0.1, outer_step=0.01, decreasing=True)
        >>> [round(s, 6) for s in sched.steps_at(31)]  # (rho, rho_v, gamma) * 32^(-2/5, -3/5)
        [0.025, 0.025, 0.00125]

    Cost per step: one inner oracle (forward, ``create_graph`` backward, double backward
    on an inner batch) and one outer forward/backward; memory: three trees of the size of
    :math:`z` and two of :math:`x`.

    References:
        Dagréou, Ablin, Vaiter, Moreau (NeurIPS 2022), A framework for bilevel optimization
        that enables stochastic and global variance reduction algorithms.
    """

    inner_step: float = 0.1
    outer_step: float = 0.01
    linear_step: float | None = None
    decreasing: bool = False

    name = "soba"

    def __post_init__(self) -> None:
        self._check_step("inner_step")
        self._check_step("outer_step")
        if self.linear_step is not None:
            self._check_step("linear_step")
        if not isinstance(self.decreasing, bool):
            raise HypergradientError(
                f"{self._where()}: `decreasing` must be True or False, got {self.decreasing!r}."
            )

    def _initial_memory(self, problem, z, v, x):
        return None, 0, 0

    def steps_at(self, t: int) -> tuple[float, float, float]:
        """``(rho, rho_v, gamma)`` used by step ``t`` (0-based)."""
        rho_v = self.inner_step if self.linear_step is None else self.linear_step
        if not self.decreasing:
            return self.inner_step, rho_v, self.outer_step
        return (
            self.inner_step * (t + 1) ** -0.4,
            rho_v * (t + 1) ** -0.4,
            self.outer_step * (t + 1) ** -0.6,
        )

    def step(self, problem: FiniteSumBilevelProblem, state: BilevelState) -> BilevelState:
        gen = _generator(state)
        i, j = problem.draw_inner(gen), problem.draw_outer(gen)
        rho, rho_v, gamma = self.steps_at(state.num_steps)
        z, v, x = state.z, state.v, state.x
        inner = inner_oracle(problem, z, v, x, i)
        outer = outer_oracle(problem, z, x, j)
        d_v = tree_add(inner.hvp, outer.grad_z)
        d_x = tree_add(inner.cross, outer.grad_x)
        return state._replace(
            z=tree_axpy(-rho, inner.grad_z, z),
            v=tree_axpy(-rho_v, d_v, v),
            x=tree_axpy(-gamma, d_x, x),
            direction=d_x,
            num_steps=state.num_steps + 1,
            inner_samples=state.inner_samples + len(problem.inner_batches[i]),
            outer_samples=state.outer_samples + len(problem.outer_batches[j]),
            generator_state=gen.get_state(),
        )


# --------------------------------------------------------------------------------------
# SABA
# --------------------------------------------------------------------------------------


class SabaMemory(NamedTuple):
    """SAGA tables of :class:`SABA`: the last oracle of every batch and their means.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, SABA
        >>> a = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        >>> c = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
        >>> inner = lambda z, x, i: 0.5 * ((z - x - a[i]) ** 2).mean()  # z*(x) = x + 1.5
        >>> outer = lambda z, x, j: 0.5 * ((z - c[j]) ** 2).mean()  # x* = 3 - 1.5 = 1.5
        >>> p = FiniteSumBilevelProblem(inner, outer, 4, 4, inner_batch_size=2, outer_batch_size=2)
        >>> zero = torch.tensor(0.0, dtype=torch.float64)
        >>> mem = SABA().init(p, zero, zero).memory  # tables filled at the initial point
        >>> len(mem.inner), len(mem.outer), mem.inner_mean._fields
        (2, 2, ('grad_z', 'hvp', 'cross'))
        >>> mean = (mem.inner[0].grad_z + mem.inner[1].grad_z) / 2
        >>> bool(torch.allclose(mean, mem.inner_mean.grad_z))
        True
    """

    inner: tuple[InnerOracle, ...]  # one entry per inner batch: (grad_z, hvp, cross)
    inner_mean: InnerOracle
    outer: tuple[OuterOracle, ...]  # one entry per outer batch: (grad_z, grad_x)
    outer_mean: OuterOracle


def _mean_of(entries: tuple, cls: type) -> Any:
    n = len(entries)
    fields = []
    for f in range(len(cls._fields)):
        total = entries[0][f]
        for e in entries[1:]:
            total = tree_add(total, e[f])
        fields.append(tree_map(lambda t: t / n, total))
    return cls(*fields)


@register_solver
@dataclass(frozen=True)
class SABA(AbstractBilevelSolver):
    r"""SABA: SOBA with SAGA variance reduction on every term (Dagréou et al. 2022).

    SABA keeps the last value of each of the five batch terms for every batch (a table
    per inner batch for :math:`\nabla_z g_i`, :math:`\nabla^2_{zz} g_i v`,
    :math:`\nabla^2_{xz} g_i v`, and per outer batch for :math:`\nabla_z f_j`,
    :math:`\nabla_x f_j`) and their running means.  Each term :math:`T` of
    :class:`SOBA`'s directions is replaced by

    .. math::

        \hat T = T_i(z, v, x) - T_i^{\text{table}} + \overline{T^{\text{table}}},\qquad
        \overline{T^{\text{table}}} \mathrel{+}= (T_i - T_i^{\text{table}})/n_B,\qquad
        T_i^{\text{table}} \leftarrow T_i,

    an unbiased estimate whose variance vanishes as the iterates converge.  So, unlike
    SOBA, SABA converges with *constant* steps: at an :math:`O(1/T)` rate in general, and
    linearly to the exact solution on strongly convex problems (e.g. a ridge
    regression with a log-penalty, where the error falls below 1e-6; see
    ``tests/test_stochastic_bilevel.py``).

    Args:
        inner_step: :math:`\rho` for :math:`z` (default 0.1).
        outer_step: :math:`\gamma` for :math:`x` (default 0.01).
        linear_step: step for :math:`v` (default: ``inner_step``).
        init_memory: ``"full"`` (default) fills the tables with one pass over all batches
            at the initial point (costs one epoch of oracles; the estimates are unbiased
            from the first step); ``"zeros"`` starts from empty tables as the reference
            code does (free, but the early estimates are biased towards zero).

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, SABA, SOBA, run
        >>> a = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        >>> c = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
        >>> inner = lambda z, x, i: 0.5 * ((z - x - a[i]) ** 2).mean()  # z*(x) = x + 1.5
        >>> outer = lambda z, x, j: 0.5 * ((z - c[j]) ** 2).mean()  # x* = 3 - 1.5 = 1.5
        >>> p = FiniteSumBilevelProblem(inner, outer, 4, 4, inner_batch_size=2, outer_batch_size=2)
        >>> zero = torch.tensor(0.0, dtype=torch.float64)
        >>> x_saba = run(SABA(0.5, 0.2), p, zero, zero, num_steps=40).state.x
        >>> x_soba = run(SOBA(0.5, 0.2), p, zero, zero, num_steps=40).state.x
        >>> bool(abs(x_saba - 1.5) < 0.05), bool(abs(x_soba - 1.5) > 0.5)  # same steps
        (True, True)

    Cost per step: as :class:`SOBA`.  Memory: the tables, three trees of the size of
    :math:`z` and one of :math:`x` per inner batch, one of each per outer batch; the
    tables are tuples, so a step copies ``n_batches`` references, not tensors.

    References:
        Dagréou, Ablin, Vaiter, Moreau (NeurIPS 2022); Defazio, Bach, Lacoste-Julien
        (NeurIPS 2014), SAGA.
    """

    inner_step: float = 0.1
    outer_step: float = 0.01
    linear_step: float | None = None
    init_memory: str = "full"

    name = "saba"

    def __post_init__(self) -> None:
        self._check_step("inner_step")
        self._check_step("outer_step")
        if self.linear_step is not None:
            self._check_step("linear_step")
        if self.init_memory not in ("full", "zeros"):
            raise HypergradientError(
                f"{self._where()}: `init_memory` must be 'full' (one pass over the data at the "
                f"initial point) or 'zeros', got {self.init_memory!r}."
            )

    def _initial_memory(self, problem, z, v, x):
        if self.init_memory == "zeros":
            zero_inner = InnerOracle(tree_zeros_like(z), tree_zeros_like(z), tree_zeros_like(x))
            zero_outer = OuterOracle(tree_zeros_like(z), tree_zeros_like(x))
            memory = SabaMemory(
                (zero_inner,) * problem.n_inner_batches,
                zero_inner,
                (zero_outer,) * problem.n_outer_batches,
                zero_outer,
            )
            return memory, 0, 0
        inner = tuple(inner_oracle(problem, z, v, x, k) for k in range(problem.n_inner_batches))
        outer = tuple(outer_oracle(problem, z, x, k) for k in range(problem.n_outer_batches))
        memory = SabaMemory(
            inner, _mean_of(inner, InnerOracle), outer, _mean_of(outer, OuterOracle)
        )
        return memory, problem.n_inner, problem.n_outer

    def step(self, problem: FiniteSumBilevelProblem, state: BilevelState) -> BilevelState:
        gen = _generator(state)
        i, j = problem.draw_inner(gen), problem.draw_outer(gen)
        rho, gamma = self.inner_step, self.outer_step
        rho_v = rho if self.linear_step is None else self.linear_step
        z, v, x, mem = state.z, state.v, state.x, state.memory
        new_in = inner_oracle(problem, z, v, x, i)
        new_out = outer_oracle(problem, z, x, j)
        old_in, old_out = mem.inner[i], mem.outer[j]
        est_in = InnerOracle(*(_saga(a, b, c) for a, b, c in zip(new_in, old_in, mem.inner_mean)))
        est_out = OuterOracle(
            *(_saga(a, b, c) for a, b, c in zip(new_out, old_out, mem.outer_mean))
        )
        nb_in, nb_out = problem.n_inner_batches, problem.n_outer_batches
        memory = SabaMemory(
            _replace(mem.inner, i, new_in),
            InnerOracle(
                *(
                    tree_axpy(1.0 / nb_in, tree_sub(a, b), c)
                    for a, b, c in zip(new_in, old_in, mem.inner_mean)
                )
            ),
            _replace(mem.outer, j, new_out),
            OuterOracle(
                *(
                    tree_axpy(1.0 / nb_out, tree_sub(a, b), c)
                    for a, b, c in zip(new_out, old_out, mem.outer_mean)
                )
            ),
        )
        d_v = tree_add(est_in.hvp, est_out.grad_z)
        d_x = tree_add(est_in.cross, est_out.grad_x)
        return state._replace(
            z=tree_axpy(-rho, est_in.grad_z, z),
            v=tree_axpy(-rho_v, d_v, v),
            x=tree_axpy(-gamma, d_x, x),
            direction=d_x,
            num_steps=state.num_steps + 1,
            inner_samples=state.inner_samples + len(problem.inner_batches[i]),
            outer_samples=state.outer_samples + len(problem.outer_batches[j]),
            generator_state=gen.get_state(),
            memory=memory,
        )


# --------------------------------------------------------------------------------------
# StocBiO
# --------------------------------------------------------------------------------------


@register_solver
@dataclass(frozen=True)
class StocBiO(AbstractBilevelSolver):
    r"""StocBiO: inner SGD loop, Neumann-series inverse-HVP, outer step (Ji et al. 2021).

    One step (outer iteration):

    1. ``inner_steps`` SGD steps :math:`z \leftarrow z - \alpha\nabla_z g_i(z, x)`, warm
       started from the previous :math:`z`, a fresh inner batch each;
    2. an outer batch :math:`j`: :math:`r = \nabla_z f_j(z, x)`, and the stochastic
       Neumann series with a fresh inner batch :math:`i_q` per term,

       .. math::

           v = -\eta \sum_{q=0}^{Q} \prod_{l=1}^{q} (I - \eta\nabla^2_{zz} g_{i_l})\, r
           \;\approx\; -[\nabla^2_{zz} G]^{-1}\nabla_z F ,

       (:math:`Q` = ``neumann_steps``; the truncation error decays like
       :math:`(1-\eta\mu)^{Q}` for a :math:`\mu`-strongly convex inner problem);
    3. :math:`D_x = \nabla^2_{xz} g_i(z, x)\,v + \nabla_x f_j(z, x)` with one more fresh
       inner batch, and :math:`x \leftarrow x - \beta D_x`.

    ``v`` is recomputed from scratch every step (no warm start; compare :class:`AmIGO`).

    Args:
        inner_step: :math:`\alpha` (default 0.1).
        outer_step: :math:`\beta` (default 0.01).
        inner_steps: inner SGD steps per outer step (default 10).
        neumann_steps: :math:`Q` (default 10).
        neumann_step: :math:`\eta`, must be below :math:`2/L` (default: ``inner_step``).

    Cost per step: ``inner_steps`` gradients, ``neumann_steps`` + 1 inner HVP oracles and
    one outer gradient, all on batches.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, StocBiO, run
        >>> inner = lambda z, x, i: 0.5 * ((z - x) ** 2).sum()  # z*(x) = x
        >>> outer = lambda z, x, j: 0.5 * ((z - 1) ** 2).sum()  # h(x) = (x - 1)^2 / 2, x* = 1
        >>> p = FiniteSumBilevelProblem(inner, outer, 4, 4, inner_batch_size=2, outer_batch_size=2)
        >>> zero = torch.tensor(0.0, dtype=torch.float64)
        >>> solver = StocBiO(inner_step=0.5, outer_step=0.5, inner_steps=5, neumann_steps=5)
        >>> out = run(solver, p, zero, zero, num_steps=12)
        >>> # per step: (5 SGD + 5 Neumann + 1) inner batches, 1 outer batch, of 2 samples
        >>> round(float(out.state.x), 2), out.state.inner_samples, out.state.outer_samples
        (1.0, 264, 24)

    References:
        Ji, Yang, Liang (ICML 2021), Bilevel Optimization: Convergence Analysis and
        Enhanced Design.
    """

    inner_step: float = 0.1
    outer_step: float = 0.01
    inner_steps: int = 10
    neumann_steps: int = 10
    neumann_step: float | None = None

    name = "stocbio"

    def __post_init__(self) -> None:
        self._check_step("inner_step")
        self._check_step("outer_step")
        self._check_count("inner_steps")
        self._check_count("neumann_steps")
        if self.neumann_step is not None:
            self._check_step("neumann_step")

    def _initial_memory(self, problem, z, v, x):
        return None, 0, 0

    def step(self, problem: FiniteSumBilevelProblem, state: BilevelState) -> BilevelState:
        gen = _generator(state)
        batches = problem.inner_batches
        eta = self.inner_step if self.neumann_step is None else self.neumann_step
        x = state.x
        z, used = _inner_sgd(problem, state.z, x, gen, self.inner_steps, self.inner_step)
        inner_samples = state.inner_samples + used
        j = problem.draw_outer(gen)
        outer = outer_oracle(problem, z, x, j)
        term, total = outer.grad_z, outer.grad_z
        for _ in range(self.neumann_steps):
            i = problem.draw_inner(gen)
            hvp = inner_oracle(problem, z, term, x, i, with_grad=False).hvp
            term = tree_axpy(-eta, hvp, term)
            total = tree_add(total, term)
            inner_samples += len(batches[i])
        v = tree_map(lambda t: -eta * t, total)
        i = problem.draw_inner(gen)
        cross = inner_oracle(problem, z, v, x, i, with_grad=False).cross
        inner_samples += len(batches[i])
        d_x = tree_add(cross, outer.grad_x)
        return state._replace(
            z=z,
            v=v,
            x=tree_axpy(-self.outer_step, d_x, x),
            direction=d_x,
            num_steps=state.num_steps + 1,
            inner_samples=inner_samples,
            outer_samples=state.outer_samples + len(problem.outer_batches[j]),
            generator_state=gen.get_state(),
        )


# --------------------------------------------------------------------------------------
# AmIGO
# --------------------------------------------------------------------------------------


@register_solver
@dataclass(frozen=True)
class AmIGO(AbstractBilevelSolver):
    r"""AmIGO: warm-started inner SGD and linear-system SGD, then an outer step
    (Arbel & Mairal 2022).

    One step (outer iteration):

    1. ``inner_steps`` SGD steps on :math:`z` (warm start), a fresh inner batch each;
    2. ``linear_steps`` SGD steps on the quadratic
       :math:`\tfrac12 v^\top\nabla^2_{zz}G\,v + \nabla_z F^\top v`, warm started from the
       previous :math:`v`:
       :math:`v \leftarrow v - \eta\,(\nabla^2_{zz} g_i\,v + \nabla_z f_j)`, fresh batches
       :math:`i, j` each;
    3. :math:`D_x = \nabla^2_{xz} g_i\,v + \nabla_x f_j` on fresh batches and
       :math:`x \leftarrow x - \gamma D_x`.

    Args:
        inner_step: step of the inner SGD (default 0.1).
        outer_step: :math:`\gamma` (default 0.01).
        inner_steps: inner SGD steps per outer step (default 10).
        linear_steps: SGD steps on the linear system per outer step (default 10).
        linear_step: :math:`\eta`, below :math:`2/L` (default: ``inner_step``).

    Cost per step: ``inner_steps`` gradients, ``linear_steps`` + 1 inner HVP oracles and
    ``linear_steps`` + 1 outer gradients.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, AmIGO, run
        >>> inner = lambda z, x, i: 0.5 * ((z - x) ** 2).sum()  # z*(x) = x
        >>> outer = lambda z, x, j: 0.5 * ((z - 1) ** 2).sum()  # h(x) = (x - 1)^2 / 2, x* = 1
        >>> p = FiniteSumBilevelProblem(inner, outer, 4, 4, inner_batch_size=2, outer_batch_size=2)
        >>> zero = torch.tensor(0.0, dtype=torch.float64)
        >>> solver = AmIGO(inner_step=0.5, outer_step=0.5, inner_steps=5, linear_steps=5)
        >>> out = run(solver, p, zero, zero, num_steps=12)
        >>> # per step: (5 SGD + 5 linear + 1) inner batches, (5 + 1) outer, of 2 samples
        >>> round(float(out.state.x), 2), out.state.inner_samples, out.state.outer_samples
        (1.0, 264, 144)

    References:
        Arbel, Mairal (ICLR 2022), Amortized Implicit Differentiation for Stochastic
        Bilevel Optimization.
    """

    inner_step: float = 0.1
    outer_step: float = 0.01
    inner_steps: int = 10
    linear_steps: int = 10
    linear_step: float | None = None

    name = "amigo"

    def __post_init__(self) -> None:
        self._check_step("inner_step")
        self._check_step("outer_step")
        self._check_count("inner_steps")
        self._check_count("linear_steps")
        if self.linear_step is not None:
            self._check_step("linear_step")

    def _initial_memory(self, problem, z, v, x):
        return None, 0, 0

    def step(self, problem: FiniteSumBilevelProblem, state: BilevelState) -> BilevelState:
        gen = _generator(state)
        eta = self.inner_step if self.linear_step is None else self.linear_step
        v, x = state.v, state.x
        z, used = _inner_sgd(problem, state.z, x, gen, self.inner_steps, self.inner_step)
        inner_samples, outer_samples = state.inner_samples + used, state.outer_samples
        for _ in range(self.linear_steps):
            i, j = problem.draw_inner(gen), problem.draw_outer(gen)
            hvp = inner_oracle(problem, z, v, x, i, with_grad=False).hvp
            grad_z = outer_oracle(problem, z, x, j).grad_z
            v = tree_axpy(-eta, tree_add(hvp, grad_z), v)
            inner_samples += len(problem.inner_batches[i])
            outer_samples += len(problem.outer_batches[j])
        i, j = problem.draw_inner(gen), problem.draw_outer(gen)
        cross = inner_oracle(problem, z, v, x, i, with_grad=False).cross
        d_x = tree_add(cross, outer_oracle(problem, z, x, j).grad_x)
        return state._replace(
            z=z,
            v=v,
            x=tree_axpy(-self.outer_step, d_x, x),
            direction=d_x,
            num_steps=state.num_steps + 1,
            inner_samples=inner_samples + len(problem.inner_batches[i]),
            outer_samples=outer_samples + len(problem.outer_batches[j]),
            generator_state=gen.get_state(),
        )


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------


class RunResult(NamedTuple):
    """What :func:`run` returns.

    Attributes:
        state: the last state whose iterates are finite.
        records: one dict per record (see :func:`run`).
        status: ``"finished"`` (all ``num_steps`` done), ``"time_budget"`` (stopped at
            ``max_time_s``), ``"stopped"`` (the callback asked to) or ``"nonfinite"``
            (the iterates became NaN/inf and the run stopped; ``state`` is the last finite
            one).  A stochastic solver has no stopping test: judge convergence from the
            records.
        time_s: seconds spent in ``init`` and ``step`` (callbacks excluded).

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, run
        >>> inner = lambda z, x, i: 0.5 * ((z - x) ** 2).sum()  # z*(x) = x
        >>> outer = lambda z, x, j: 0.5 * ((z - 1) ** 2).sum()  # h(x) = (x - 1)^2 / 2, x* = 1
        >>> p = FiniteSumBilevelProblem(inner, outer, 4, 4, inner_batch_size=2, outer_batch_size=2)
        >>> zero = torch.tensor(0.0)
        >>> out = run("soba", p, zero, zero, num_steps=6, record_every=2)
        >>> out.status, [r["step"] for r in out.records], sorted(out.records[-1])
        ('finished', [0, 2, 4, 6], ['epochs', 'inner_samples', 'outer_samples', 'step', 'time_s'])
        >>> stop = lambda state: {"stop": state.num_steps >= 3}  # a callback may end the run
        >>> out = run("soba", p, zero, zero, num_steps=6, callback=stop)
        >>> out.status, out.state.num_steps
        ('stopped', 3)
    """

    state: BilevelState
    records: list[dict[str, Any]]
    status: str
    time_s: float


def run(
    solver: str | AbstractBilevelSolver,
    problem: FiniteSumBilevelProblem,
    z0: Tree,
    x0: Tree,
    *,
    num_steps: int,
    v0: Tree | None = None,
    seed: int = 0,
    callback: Callable[[BilevelState], dict[str, Any] | None] | None = None,
    record_every: int = 1,
    max_time_s: float | None = None,
    throw: bool = True,
    timer: Callable[[], float] = time.perf_counter,
) -> RunResult:
    r"""Run a stochastic bilevel solver for ``num_steps`` steps, timing and recording.

    Args:
        solver: a solver instance or a registered name (default options).
        problem: the :class:`FiniteSumBilevelProblem`.
        z0, x0: initial inner variable and hyperparameters (tensors or dicts of tensors).
        num_steps: number of ``step`` calls (outer iterations), ``>= 0``.
        v0: initial linear-system variable (default zeros).
        seed: seed of the batch generator (same seed, same run).
        callback: ``callback(state) -> dict | None``, called at every record; its dict is
            merged into the record (e.g. the distance to a known solution).  Its time is
            not counted.  A dict with ``"stop": True`` ends the run (status
            ``"stopped"``), e.g. once a target accuracy is reached.
        record_every: record every this many steps (also after ``init`` and at the end).
        max_time_s: stop once the solver's own time (callbacks excluded) exceeds this.
        throw: raise :class:`~hypergradient.ConvergenceError` when the iterates become
            NaN/inf; with ``False`` the run stops and ``status`` says so.
        timer: the clock of ``time_s`` and ``max_time_s`` (default wall clock); on a
            shared machine ``time.process_time`` (this process's CPU time) is steadier.

    Returns:
        :class:`RunResult`. Each record holds ``step``, ``time_s`` (solver time so far),
        ``inner_samples``, ``outer_samples``, ``epochs`` (``inner_samples / n_inner``) and
        the callback's entries.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem, run
        >>> # inner: (z - x)^2 / 2 averaged over 4 identical samples -> z*(x) = x;
        >>> # outer: (z - 1)^2 / 2 -> h(x) = (x - 1)^2 / 2, minimised at x* = 1
        >>> inner = lambda z, x, i: 0.5 * (z - x) ** 2
        >>> outer = lambda z, x, j: 0.5 * (z - 1) ** 2
        >>> p = FiniteSumBilevelProblem(inner, outer, 4, 4, inner_batch_size=2)
        >>> zero = torch.tensor(0.0, dtype=torch.float64)
        >>> out = run("saba", p, zero, zero, num_steps=2000, record_every=1000)
        >>> round(float(out.state.x), 6), [r["step"] for r in out.records]
        (1.0, [0, 1000, 2000])
    """
    where = "hypergradient.stochastic.run(solver, problem, z0, x0, num_steps=...)"
    solver = get_solver(solver)
    for name, value in (("num_steps", num_steps), ("record_every", record_every)):
        minimum = 0 if name == "num_steps" else 1
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise HypergradientError(
                f"{where}: `{name}` must be an integer >= {minimum}, got {value!r}."
            )
    if max_time_s is not None and not (
        isinstance(max_time_s, numbers.Real) and float(max_time_s) > 0
    ):
        raise HypergradientError(
            f"{where}: `max_time_s` must be a positive number of seconds or None, got "
            f"{max_time_s!r}."
        )
    if not callable(timer):
        raise HypergradientError(
            f"{where}: `timer` must be a callable returning seconds, such as "
            f"time.perf_counter or time.process_time, got {type(timer).__name__}."
        )
    if callback is not None and not callable(callback):
        raise HypergradientError(
            f"{where}: `callback` must be a callable `callback(state) -> dict | None`, got "
            f"{type(callback).__name__}."
        )
    records: list[dict[str, Any]] = []
    elapsed = 0.0

    def record(state: BilevelState) -> bool:
        """Append a record; True when the callback asked to stop."""
        entry: dict[str, Any] = {
            "step": state.num_steps,
            "time_s": elapsed,
            "inner_samples": state.inner_samples,
            "outer_samples": state.outer_samples,
            "epochs": state.inner_samples / problem.n_inner,
        }
        extra = callback(state) if callback is not None else None
        if extra:
            entry.update(extra)
        records.append(entry)
        return bool(entry.get("stop", False))

    started = timer()
    state = solver.init(problem, z0, x0, v0=v0, seed=seed)
    elapsed += timer() - started
    status = "stopped" if record(state) else "finished"
    while status == "finished" and state.num_steps < num_steps:
        started = timer()
        new = solver.step(problem, state)
        finite = all(tree_all_finite(t) for t in (new.z, new.v, new.x))
        elapsed += timer() - started
        if not finite:
            status = "nonfinite"
            if throw:
                raise ConvergenceError(
                    f"{where}: {type(solver).__name__} produced NaN/inf iterates at step "
                    f"{new.num_steps}. The steps are too large for this problem: lower "
                    f"outer_step first (a log-parametrised penalty overflows exp(x)), then "
                    f"inner_step; or pass throw=False to get the last finite state."
                )
            break
        state = new
        last = state.num_steps == num_steps
        out_of_time = max_time_s is not None and elapsed >= max_time_s
        if (last or out_of_time or state.num_steps % record_every == 0) and record(state):
            status = "stopped"
        elif out_of_time and not last:
            status = "time_budget"
    if records[-1]["step"] != state.num_steps:
        record(state)
    return RunResult(state, records, status, elapsed)
