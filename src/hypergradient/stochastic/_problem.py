r"""Finite-sum bilevel problems: the interface every stochastic solver works on.

.. math::

    \min_x\; h(x) = F(z^*(x), x), \qquad
    z^*(x) = \arg\min_z G(z, x),

    G(z, x) = \frac1n \sum_{i=1}^n g_i(z, x), \qquad
    F(z, x) = \frac1m \sum_{j=1}^m f_j(z, x).

The user writes two pure functions of *index batches*:

* ``inner_loss(params, hparams, idx)`` :math:`= \frac{1}{|idx|}\sum_{i\in idx} g_i`
  (a mean over the samples ``idx``, a 1-D ``torch.long`` tensor; a regulariser such as
  :math:`\tfrac12 e^{x}\lVert z\rVert^2` belongs to every :math:`g_i` and so appears once);
* ``outer_loss(params, hparams, idx)`` :math:`= \frac{1}{|idx|}\sum_{j\in idx} f_j`.

``params`` (:math:`z`) and ``hparams`` (:math:`x`) are *trees*: a tensor or a dict of
tensors.  With ``idx`` covering every sample these are the core's
``loss(params, hparams)`` functions (:meth:`FiniteSumBilevelProblem.full_batch`), so the
core's :func:`~hypergradient.implicit_hypergrad` runs on the same problem
(:meth:`FiniteSumBilevelProblem.hypergradient`).

Batches are a **fixed partition** of the samples (drawn once from ``partition_seed``),
as SAGA-type methods need: SABA keeps one memory entry per batch.  The solvers sample batch
ids uniformly with replacement (:meth:`FiniteSumBilevelProblem.draw_inner`,
:meth:`~FiniteSumBilevelProblem.draw_outer`) from a seeded ``torch.Generator`` whose state
travels in the solver state.  The sizes of the
batches differ by at most one; batch ``k`` is reweighted by
:math:`w_k = |B_k|\,n_B / n` (:math:`n_B` batches) so that the mean over batches of the
reweighted batch losses is exactly the full loss, and a uniformly drawn batch gives an
unbiased estimate of it and of all its derivatives.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import HypergradientError
from .._tree import Tree

Loss = Callable[[Tree, Tree, torch.Tensor], torch.Tensor]

_WHERE = "hypergradient.stochastic.FiniteSumBilevelProblem(...)"


def _partition(n: int, batch_size: int, seed: int | None) -> tuple[torch.Tensor, ...]:
    """``ceil(n / batch_size)`` batches of sizes differing by at most one."""
    # indices live on the CPU (a CPU index tensor indexes data on any device)
    order = (
        torch.arange(n, device="cpu")
        if seed is None
        else torch.randperm(n, generator=torch.Generator().manual_seed(seed), device="cpu")
    )
    return tuple(b.clone() for b in torch.tensor_split(order, math.ceil(n / batch_size)))


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise HypergradientError(
            f"{_WHERE}: `{name}` must be a positive integer (a number of samples), got {value!r}."
        )


@dataclass(frozen=True)
class FiniteSumBilevelProblem:
    r"""A bilevel problem whose two losses are means over samples, seen through batches.

    Args:
        inner_loss: ``inner_loss(params, hparams, idx) -> scalar``, the mean of the inner
            per-sample losses :math:`g_i(z, x)` over the indices ``idx`` (see the module
            docstring).
        outer_loss: ``outer_loss(params, hparams, idx) -> scalar``, the same for the outer
            per-sample losses :math:`f_j(z, x)`.
        n_inner: number :math:`n` of inner samples (indices ``0 .. n-1``).
        n_outer: number :math:`m` of outer samples.
        inner_batch_size: target size of an inner batch; ``None`` (or any size
            ``>= n_inner``) means one batch of all samples (deterministic, full-batch
            solvers).  Default 64 (benchopt's default).
        outer_batch_size: the same for the outer samples.
        partition_seed: seed of the permutation the batches are cut from; ``None`` cuts
            ``0 .. n-1`` in order (contiguous batches).

    Attributes:
        inner_batches, outer_batches: the partitions, tuples of 1-D ``torch.long`` tensors.
        inner_weights, outer_weights: the factors :math:`|B_k| n_B / n` (all 1.0 when the
            batch size divides the number of samples).

    Cost: one loss evaluation per batch loss; nothing is precomputed but the partition.

    Examples:
        >>> import torch
        >>> from hypergradient.stochastic import FiniteSumBilevelProblem
        >>> A, b = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
        >>> inner = lambda z, x, i: 0.5 * ((A[i] @ z - b[i]) ** 2).mean() + 0.5 * x.exp() * z @ z
        >>> outer = lambda z, x, j: 0.5 * ((A[j] @ z - b[j]) ** 2).mean()
        >>> p = FiniteSumBilevelProblem(inner, outer, 10, 10, inner_batch_size=4)
        >>> [len(bk) for bk in p.inner_batches], p.n_inner_batches
        ([4, 3, 3], 3)
        >>> z, x = torch.randn(3, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
        >>> mean_of_batches = sum(p.inner_batch_loss(z, x, k) for k in range(3)) / 3
        >>> bool(torch.isclose(mean_of_batches, p.full_batch()[0](z, x)))
        True
    """

    inner_loss: Loss
    outer_loss: Loss
    n_inner: int
    n_outer: int
    inner_batch_size: int | None = 64
    outer_batch_size: int | None = 64
    partition_seed: int | None = 0
    inner_batches: tuple[torch.Tensor, ...] = field(init=False, repr=False)
    outer_batches: tuple[torch.Tensor, ...] = field(init=False, repr=False)
    inner_weights: tuple[float, ...] = field(init=False, repr=False)
    outer_weights: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("inner_loss", "outer_loss"):
            if not callable(getattr(self, name)):
                raise HypergradientError(
                    f"{_WHERE}: `{name}` must be a callable `{name}(params, hparams, idx) -> "
                    f"scalar` (idx: 1-D long tensor of sample indices), got "
                    f"{type(getattr(self, name)).__name__}."
                )
        _check_count("n_inner", self.n_inner)
        _check_count("n_outer", self.n_outer)
        for name in ("inner_batch_size", "outer_batch_size"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        seed = self.partition_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise HypergradientError(
                f"{_WHERE}: `partition_seed` must be an int or None, got {seed!r}."
            )
        for side, n, size in (
            ("inner", self.n_inner, self.inner_batch_size),
            ("outer", self.n_outer, self.outer_batch_size),
        ):
            batches = _partition(n, n if size is None else min(size, n), seed)
            weights = tuple(len(b) * len(batches) / n for b in batches)
            object.__setattr__(self, f"{side}_batches", batches)
            object.__setattr__(self, f"{side}_weights", weights)

    @property
    def n_inner_batches(self) -> int:
        return len(self.inner_batches)

    @property
    def n_outer_batches(self) -> int:
        return len(self.outer_batches)

    def draw_inner(self, generator: torch.Generator) -> int:
        """A uniformly drawn inner batch id in ``[0, n_inner_batches)`` (with replacement,
        as SAGA's analysis assumes); its samples are ``inner_batches[k]``."""
        return int(torch.randint(self.n_inner_batches, (), generator=generator, device="cpu"))

    def draw_outer(self, generator: torch.Generator) -> int:
        """A uniformly drawn outer batch id in ``[0, n_outer_batches)``, independent of the
        inner one when drawn from the same generator (a separate draw)."""
        return int(torch.randint(self.n_outer_batches, (), generator=generator, device="cpu"))

    def inner_batch_loss(self, params: Tree, hparams: Tree, k: int) -> torch.Tensor:
        """Unbiased estimate of :math:`G` from inner batch ``k`` (reweighted, see above)."""
        loss = self.inner_loss(params, hparams, self.inner_batches[k])
        weight = self.inner_weights[k]
        return loss if weight == 1.0 else loss * weight

    def outer_batch_loss(self, params: Tree, hparams: Tree, k: int) -> torch.Tensor:
        """Unbiased estimate of :math:`F` from outer batch ``k`` (reweighted, see above)."""
        loss = self.outer_loss(params, hparams, self.outer_batches[k])
        weight = self.outer_weights[k]
        return loss if weight == 1.0 else loss * weight

    def full_batch(self) -> tuple[Callable[[Tree, Tree], torch.Tensor], ...]:
        """``(G, F)`` as the core's pure functions ``loss(params, hparams) -> scalar``."""
        all_inner = torch.arange(self.n_inner, device="cpu")
        all_outer = torch.arange(self.n_outer, device="cpu")

        def inner(params: Tree, hparams: Tree) -> torch.Tensor:
            return self.inner_loss(params, hparams, all_inner)

        def outer(params: Tree, hparams: Tree) -> torch.Tensor:
            return self.outer_loss(params, hparams, all_outer)

        return inner, outer

    def hypergradient(self, params: Tree, hparams: Tree, **options: Any) -> Tree:
        r"""The core's full-batch implicit hypergradient :math:`h'(x)` at ``params``.

        Calls :func:`hypergradient.implicit_hypergrad` on :meth:`full_batch` (default
        ``solver="exact"``: a dense solve, for reference values on small problems; any of
        its keyword options may be given).  ``params`` should be an accurate inner
        optimum :math:`z^*(x)`.  Tensor trees are wrapped into dicts for the core and the
        result is returned shaped like ``hparams``.
        """
        from ..hypergrad.implicit import implicit_hypergrad

        inner, outer = self.full_batch()
        p_key = "params" if isinstance(params, torch.Tensor) else None
        h_key = "hparams" if isinstance(hparams, torch.Tensor) else None

        def wrap(tree: Tree, key: str | None) -> Mapping[str, torch.Tensor]:
            return {key: tree} if key is not None else tree  # type: ignore[return-value]

        def unwrap(tree: Mapping[str, torch.Tensor], key: str | None) -> Tree:
            return tree[key] if key is not None else tree

        def inner_d(p: Mapping, h: Mapping) -> torch.Tensor:
            return inner(unwrap(p, p_key), unwrap(h, h_key))

        def outer_d(p: Mapping, h: Mapping) -> torch.Tensor:
            return outer(unwrap(p, p_key), unwrap(h, h_key))

        options.setdefault("solver", "exact")
        result = implicit_hypergrad(
            inner_d, outer_d, wrap(params, p_key), wrap(hparams, h_key), **options
        )
        if isinstance(result, tuple):  # return_stats=True
            return unwrap(result[0], h_key), result[1]
        return unwrap(result, h_key)
