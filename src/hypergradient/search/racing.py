r"""Racing: evaluate candidate configurations block by block and drop the bad ones early.

A *block* is one unit of evaluation shared by every candidate: a cross-validation fold, a
seed, a task instance.  Full resampling evaluates all :math:`k` candidates on all :math:`n`
blocks (:math:`kn` evaluations); a race evaluates the survivors on the next block and
eliminates candidates as soon as the evidence says they are worse, so most of the budget
goes to the good ones (Maron & Moore 1994; Birattari et al. 2002; irace, Lopez-Ibanez et al.
2016; Bischl et al. 2023, Sec. 4.6).

Two elimination rules (``method``):

* ``"f-race"`` (Birattari et al. 2002): after ``first_test`` blocks and then after every
  block, rank the survivors within each block (average ranks for ties) and run the Friedman
  test.  With :math:`m` blocks, :math:`k` survivors, ranks :math:`R_{lj}`, rank sums
  :math:`R_j = \sum_l R_{lj}`, :math:`A = \sum_{l,j} R_{lj}^2` and
  :math:`C = mk(k+1)^2/4`, the statistic

  .. math:: T = \frac{(k-1)\sum_j \big(R_j - m(k+1)/2\big)^2}{A - C}

  is compared with the :math:`1-\alpha` quantile of :math:`\chi^2_{k-1}`.  If it rejects,
  Conover's post-hoc test drops every :math:`j` whose rank sum exceeds the best one's by

  .. math:: |R_j - R_\text{best}| > t_{1-\alpha/2,\,(m-1)(k-1)}
            \sqrt{\frac{2m(A - C)}{(m-1)(k-1)}\Big(1 - \frac{T}{m(k-1)}\Big)}.

  Ranks make the test free of the blocks' scale: a hard fold raises every candidate's loss.
* ``"halving"``: successive halving over blocks (Jamieson & Talwalkar 2016): after
  ``first_test`` blocks keep the best :math:`\lceil k/\eta\rceil` by mean loss, evaluate the
  survivors on :math:`\eta` times as many blocks, and so on.  It always eliminates (no test),
  so it spends a budget fixed in advance.

Cost: ``result.evaluations`` calls of ``evaluate`` (at most :math:`kn`); memory: the
:math:`k \times n` table of losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import HypergradientError

METHODS = ("f-race", "halving")


@dataclass(frozen=True)
class RaceResult:
    """What a race found and what it spent.

    Attributes:
        best: index (into the candidates) of the survivor with the lowest mean loss.
        survivors: indices still in the race at the end, best first.
        eliminated_after: ``{index: blocks it was evaluated on}`` for each eliminated one.
        losses: ``losses[j]`` = candidate ``j``'s loss on each block it was evaluated on.
        evaluations: calls of ``evaluate``.
        full_evaluations: ``k * n``: what evaluating every candidate on every block costs.

    Examples:
        Successive halving of four candidates (loss = index + noise) over 20 blocks:

        >>> import numpy as np
        >>> from hypergradient import search
        >>> noise = np.random.default_rng(0).normal(0, 0.3, size=(20, 4))
        >>> evaluate = lambda c, b: c + noise[b, c]
        >>> result = search.race(range(4), evaluate, range(20), method="halving", first_test=2)
        >>> result.best, result.survivors, result.eliminated_after
        (0, [0], {2: 2, 3: 2, 1: 4})
        >>> result.evaluations, result.full_evaluations  # 4 x 2 + 2 x 2 blocks, of 4 x 20
        (12, 80)
    """

    best: int
    survivors: list[int]
    eliminated_after: dict[int, int]
    losses: list[list[float]]
    evaluations: int
    full_evaluations: int

    def mean_loss(self, index: int) -> float:
        return float(np.mean(self.losses[index]))


def _ranks(table: np.ndarray) -> np.ndarray:
    """Ranks 1..k within each row (block), ties get their average rank."""
    from scipy.stats import rankdata

    return np.vstack([rankdata(row) for row in table])


def friedman_eliminations(table: np.ndarray, alpha: float) -> list[int]:
    """Columns of ``table`` (blocks x candidates, losses) that F-race drops at level ``alpha``.

    Friedman test over the columns, then Conover's post-hoc comparison with the column of the
    lowest rank sum (see the module docstring).  Returns column positions (possibly empty).
    """
    from scipy.stats import chi2, t

    m, k = table.shape
    if k < 2 or m < 2:
        return []
    ranks = _ranks(table)
    rank_sums = ranks.sum(axis=0)
    a = float(np.sum(ranks**2))
    c = m * k * (k + 1) ** 2 / 4.0
    if a - c <= 1e-12:  # every block ranks the candidates the same up to ties: no evidence
        return []
    stat = (k - 1) * float(np.sum((rank_sums - m * (k + 1) / 2.0) ** 2)) / (a - c)
    if stat <= chi2.ppf(1.0 - alpha, k - 1):
        return []
    dof = (m - 1) * (k - 1)
    spread = 2.0 * m * (a - c) / dof * max(0.0, 1.0 - stat / (m * (k - 1)))
    critical = t.ppf(1.0 - alpha / 2.0, dof) * math.sqrt(spread)
    best = int(np.argmin(rank_sums))
    return [j for j in range(k) if rank_sums[j] - rank_sums[best] > critical]


def race(
    candidates: Sequence[Any],
    evaluate: Callable[[Any, Any], float],
    blocks: Sequence[Any],
    *,
    method: str = "f-race",
    alpha: float = 0.05,
    first_test: int = 3,
    eta: int = 2,
) -> RaceResult:
    """Race ``candidates`` over ``blocks``; see the module docstring.

    Args:
        candidates: the configurations (any objects; ``evaluate`` interprets them).
        evaluate: ``evaluate(candidate, block) -> loss`` (lower is better, finite).
        blocks: the shared evaluation units, in the order they are used (folds, seeds).
        method: ``"f-race"`` or ``"halving"``.
        alpha: significance level of F-race's tests.
        first_test: blocks every candidate is evaluated on before the first elimination.
        eta: halving's rate (keep the best ``1/eta``, ``eta`` times more blocks per rung).

    Returns a :class:`RaceResult`.

    Example: four candidates whose losses are their index plus noise; the two worst are
    dropped long before the 20 blocks are used up::

        Examples:
            >>> rng = np.random.default_rng(0)
            >>> noise = rng.normal(0, 0.3, size=(20, 4))
            >>> result = race(range(4), lambda c, b: c + noise[b, c], range(20), first_test=3)
            >>> result.best, result.evaluations < 4 * 20
            (0, True)
    """
    where = "search.race"
    candidates = list(candidates)
    blocks = list(blocks)
    if method not in METHODS:
        raise HypergradientError(f"{where}(method={method!r}): expected one of {list(METHODS)}.")
    if not candidates:
        raise HypergradientError(f"{where}: no candidates; give at least one configuration.")
    if not blocks:
        raise HypergradientError(f"{where}: no blocks (folds or seeds) to evaluate on.")
    if not isinstance(first_test, int) or isinstance(first_test, bool) or first_test < 1:
        raise HypergradientError(f"{where}(first_test={first_test!r}): expected an int >= 1.")
    if not (isinstance(alpha, float) and 0.0 < alpha < 1.0):
        raise HypergradientError(f"{where}(alpha={alpha!r}): expected a float in (0, 1).")
    if not isinstance(eta, int) or isinstance(eta, bool) or eta < 2:
        raise HypergradientError(f"{where}(eta={eta!r}): expected an integer >= 2.")

    k, n = len(candidates), len(blocks)
    if k == 1:
        blocks = blocks[:1]  # nothing to race: one evaluation tells its loss
    losses: list[list[float]] = [[] for _ in range(k)]
    alive = list(range(k))
    eliminated: dict[int, int] = {}
    evaluations = 0
    next_rung = first_test
    for b, block in enumerate(blocks):
        for j in alive:
            value = float(evaluate(candidates[j], block))
            if not math.isfinite(value):
                raise HypergradientError(
                    f"{where}: evaluate(candidate {j}, block {b}) returned {value}; losses "
                    f"must be finite (return a large penalty for a failed configuration)."
                )
            losses[j].append(value)
            evaluations += 1
        seen = b + 1
        if seen < first_test:
            continue
        table = np.array([losses[j] for j in alive]).T  # blocks x survivors
        if method == "f-race":
            drop = {alive[p] for p in friedman_eliminations(table, alpha)}
        elif seen == next_rung:
            keep = max(1, math.ceil(len(alive) / eta))
            order = sorted(alive, key=lambda j: (float(np.mean(losses[j])), j))
            drop = set(order[keep:])
            next_rung = seen * eta
        else:
            drop = set()
        for j in drop:
            eliminated[j] = seen
        alive = [j for j in alive if j not in drop]
        if len(alive) == 1:
            break  # the winner needs no more evaluations
    survivors = sorted(alive, key=lambda j: (float(np.mean(losses[j])), j))
    return RaceResult(
        best=survivors[0],
        survivors=survivors,
        eliminated_after=eliminated,
        losses=losses,
        evaluations=evaluations,
        full_evaluations=k * n,
    )
