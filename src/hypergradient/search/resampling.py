r"""Nested and non-nested resampling: what a tuned model's score really estimates.

Tuning picks :math:`\hat\lambda = \arg\min_\lambda \widehat{\mathrm{GE}}(\lambda)` from a
resampling estimate :math:`\widehat{\mathrm{GE}}` (here: K-fold cross-validation).  The
minimum of many noisy estimates is biased low, so :math:`\widehat{\mathrm{GE}}(\hat\lambda)`
- the **non-nested** estimate - is optimistic: it rewards configurations that were lucky on
these folds (Bischl et al. 2023, Sec. 3.3; Cawley & Talbot 2010).  **Nested resampling**
runs the whole tuning procedure inside each training part of an outer split and scores its
choice on the outer test part, which the tuning never saw:

.. code-block:: text

    for each outer fold (train_o, test_o):
        inner folds   = K-fold split of train_o only
        lambda_o      = tuner(inner folds)               # every evaluation inside train_o
        score_o       = evaluate(lambda_o, train_o, test_o)
    nested estimate = mean_o score_o

It estimates the performance of *tuning + training*, the procedure one deploys.

Everything here is model-agnostic: an ``evaluate(config, train_idx, test_idx) -> loss``
callback trains ``config`` on the rows ``train_idx`` (numpy integer arrays indexing the
caller's data) and returns its loss on ``test_idx`` (lower is better: use the error rate,
not the accuracy).  Preprocessing that learns from data (scaling, feature selection) belongs
inside ``evaluate``, fitted on ``train_idx`` only.  A *tuner* turns ``evaluate`` and a list of
folds into a :class:`TuneResult`: :func:`grid_tuner`, :func:`race_tuner` (racing over the
folds, :mod:`~hypergradient.search.racing`) or :func:`optuna_tuner` (any Optuna sampler).

Cost: non-nested, one tuning on K folds; nested, ``outer`` tunings on ``inner`` folds plus
``outer`` refits.  With a grid of :math:`G` configurations that is :math:`GK` versus
:math:`\mathrm{outer}\cdot(G\cdot\mathrm{inner} + 1)` model fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import HypergradientError
from .racing import race
from .space import SearchSpace, check_space, suggest

Evaluate = Callable[[Any, np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Fold:
    """One split: ``train`` and ``test`` are disjoint integer index arrays.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> fold = search.Fold(train=np.arange(8), test=np.arange(8, 10))
        >>> fold.test.tolist()
        [8, 9]
        >>> [len(f.test) for f in search.kfold(10, 5)]  # kfold makes them
        [2, 2, 2, 2, 2]
    """

    train: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class TuneResult:
    """A tuner's choice.

    Attributes:
        config: the chosen configuration.
        score: its mean loss over the tuning folds (the non-nested estimate).
        evaluations: calls of ``evaluate`` the tuning made.
        scores: mean fold loss of every configuration that was evaluated on every fold
            (``(config, loss)`` pairs; a race lists only its survivors).

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> y = np.random.default_rng(0).normal(size=40)
        >>> def evaluate(c, train, test):  # predict the training mean + c; squared error
        ...     return float(np.mean((y[test] - y[train].mean() - c) ** 2))
        >>> result = search.grid_tuner([-1.0, 0.0, 1.0])(evaluate, search.kfold(40, 4))
        >>> result.config, result.evaluations, [c for c, _ in result.scores]
        (0.0, 12, [-1.0, 0.0, 1.0])
    """

    config: Any
    score: float
    evaluations: int
    scores: list[tuple[Any, float]] = field(default_factory=list)


Tuner = Callable[[Evaluate, Sequence[Fold]], TuneResult]


def _as_indices(data: int | Sequence[int] | np.ndarray, where: str) -> np.ndarray:
    if isinstance(data, (int, np.integer)) and not isinstance(data, bool):
        idx = np.arange(int(data))
    else:
        idx = np.asarray(data)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise HypergradientError(
                f"{where}: expected the number of rows or a 1-d array of integer row indices, "
                f"got {type(data).__name__} of shape {idx.shape}."
            )
        if len(np.unique(idx)) != len(idx):
            raise HypergradientError(f"{where}: the row indices repeat; give each row once.")
    return idx


def kfold(
    data: int | Sequence[int] | np.ndarray,
    k: int,
    *,
    seed: int = 0,
    labels: Sequence[Any] | np.ndarray | None = None,
) -> list[Fold]:
    """``k`` shuffled folds of the rows ``data`` (a count ``n`` means rows ``0..n-1``).

    With ``labels`` (indexed by row number, i.e. ``labels[i]`` is row ``i``'s class) the
    folds are stratified: each keeps the class proportions.  Every row is in exactly one
    test part; the folds' indices are the caller's row numbers.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> folds = search.kfold(10, 5, seed=0)
        >>> sorted(np.concatenate([f.test for f in folds]).tolist()) == list(range(10))
        True
        >>> labels = np.array([0] * 5 + [1] * 5)
        >>> [np.bincount(labels[f.test]).tolist() for f in search.kfold(10, 5, labels=labels)]
        [[1, 1], [1, 1], [1, 1], [1, 1], [1, 1]]
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    where = f"search.kfold(k={k!r})"
    idx = _as_indices(data, where)
    if not isinstance(k, int) or isinstance(k, bool) or k < 2 or k > len(idx):
        raise HypergradientError(
            f"{where}: expected an integer with 2 <= k <= the number of rows ({len(idx)})."
        )
    if labels is None:
        splitter = KFold(k, shuffle=True, random_state=seed).split(idx)
    else:
        y = np.asarray(labels)[idx]
        counts = np.unique(y, return_counts=True)[1]
        if counts.min() < k:
            raise HypergradientError(
                f"{where}: a class has only {counts.min()} rows among these {len(idx)}, fewer "
                f"than the folds; lower k or drop labels= (unstratified folds)."
            )
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed).split(idx, y)
    return [Fold(idx[tr], idx[te]) for tr, te in splitter]


def _mean_loss(evaluate: Evaluate, config: Any, folds: Sequence[Fold]) -> float:
    values = [float(evaluate(config, f.train, f.test)) for f in folds]
    for value in values:
        if not math.isfinite(value):
            raise HypergradientError(
                f"search resampling: evaluate({config!r}, ...) returned {value}; losses must "
                f"be finite (return a large penalty for a configuration that fails)."
            )
    return float(np.mean(values))


def grid_tuner(configs: Sequence[Any]) -> Tuner:
    """Every configuration on every fold; the lowest mean loss wins (first one on ties).

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> y = np.random.default_rng(0).normal(size=40)
        >>> def evaluate(c, train, test):  # predict the training mean + c; squared error
        ...     return float(np.mean((y[test] - y[train].mean() - c) ** 2))
        >>> tune = search.grid_tuner([-1.0, 0.0, 1.0])
        >>> result = tune(evaluate, search.kfold(40, 4))
        >>> result.config, result.evaluations  # 3 configurations x 4 folds
        (0.0, 12)
    """
    configs = list(configs)
    if not configs:
        raise HypergradientError("search.grid_tuner: no configurations to try.")

    def tune(evaluate: Evaluate, folds: Sequence[Fold]) -> TuneResult:
        scores = [(c, _mean_loss(evaluate, c, folds)) for c in configs]
        best = min(range(len(scores)), key=lambda i: scores[i][1])
        return TuneResult(scores[best][0], scores[best][1], len(configs) * len(folds), scores)

    return tune


def race_tuner(
    configs: Sequence[Any], *, method: str = "f-race", alpha: float = 0.05, first_test: int = 3
) -> Tuner:
    """Race the configurations over the folds (:func:`~hypergradient.search.racing.race`).

    The reported score of the winner is its mean over the folds it was evaluated on.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> y = np.random.default_rng(0).normal(size=40)
        >>> def evaluate(c, train, test):  # predict the training mean + c; squared error
        ...     return float(np.mean((y[test] - y[train].mean() - c) ** 2))
        >>> tune = search.race_tuner([-2.0, -1.0, 0.0, 1.0, 2.0])
        >>> result = tune(evaluate, search.kfold(40, 10))
        >>> result.config, result.evaluations < 5 * 10  # the losers dropped early
        (0.0, True)
    """
    configs = list(configs)
    if not configs:
        raise HypergradientError("search.race_tuner: no configurations to try.")

    def tune(evaluate: Evaluate, folds: Sequence[Fold]) -> TuneResult:
        result = race(
            configs,
            lambda c, f: evaluate(c, f.train, f.test),
            list(folds),
            method=method,
            alpha=alpha,
            first_test=min(first_test, len(folds)),
        )
        scores = [(configs[j], result.mean_loss(j)) for j in result.survivors]
        return TuneResult(
            configs[result.best], result.mean_loss(result.best), result.evaluations, scores
        )

    return tune


def optuna_tuner(
    space: SearchSpace, *, n_trials: int, sampler: str = "tpe", seed: int = 0, **sampler_options
) -> Tuner:
    """``n_trials`` configurations proposed by an Optuna sampler (in-memory study), each
    scored by its mean loss over the folds; configurations are dicts ``name -> value``.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> y = np.random.default_rng(0).normal(size=40)
        >>> def evaluate(c, train, test):  # predict the training mean + c; squared error
        ...     return float(np.mean((y[test] - y[train].mean() - c) ** 2))
        >>> space = {"c": search.Choice((-1.0, 0.0, 1.0))}
        >>> tune = search.optuna_tuner(space, n_trials=3, sampler="grid")
        >>> result = tune(lambda config, tr, te: evaluate(config["c"], tr, te), search.kfold(40, 4))
        >>> result.config, result.evaluations
        ({'c': 0.0}, 12)
    """
    from .study import make_sampler, require_optuna

    space = check_space(space, "search.optuna_tuner")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise HypergradientError(
            f"search.optuna_tuner(n_trials={n_trials!r}): expected an integer >= 1."
        )

    def tune(evaluate: Evaluate, folds: Sequence[Fold]) -> TuneResult:
        optuna = require_optuna()
        study = optuna.create_study(
            sampler=make_sampler(sampler, seed=seed, space=space, **sampler_options)
        )
        configs: dict[int, dict] = {}

        def objective(trial):
            config = suggest(trial, space)
            configs[trial.number] = config
            return _mean_loss(evaluate, config, folds)

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study.optimize(objective, n_trials=n_trials)
        finally:
            optuna.logging.set_verbosity(verbosity)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        scores = [(configs[t.number], float(t.value)) for t in done]
        best = study.best_trial
        return TuneResult(configs[best.number], float(best.value), len(done) * len(folds), scores)

    return tune


def non_nested_cv(
    evaluate: Evaluate,
    tuner: Tuner,
    data: int | Sequence[int] | np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    labels: Sequence[Any] | np.ndarray | None = None,
) -> TuneResult:
    """Tune on ``folds``-fold CV of all of ``data`` and report the winner's own CV score.

    ``result.score`` is the non-nested (optimistically biased) estimate of the tuned model's
    loss; compare :func:`nested_cv`.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> y = np.random.default_rng(0).normal(size=40)
        >>> def evaluate(c, train, test):  # predict the training mean + c; squared error
        ...     return float(np.mean((y[test] - y[train].mean() - c) ** 2))
        >>> tuner = search.grid_tuner([-1.0, 0.0, 1.0])
        >>> result = search.non_nested_cv(evaluate, tuner, 40, folds=4)
        >>> result.config, result.evaluations
        (0.0, 12)
    """
    return tuner(evaluate, kfold(data, folds, seed=seed, labels=labels))


@dataclass(frozen=True)
class OuterFold:
    """One outer fold of :func:`nested_cv`: the split, the tuned config, its scores.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> y = np.random.default_rng(0).normal(size=40)
        >>> def evaluate(c, train, test):  # predict the training mean + c; squared error
        ...     return float(np.mean((y[test] - y[train].mean() - c) ** 2))
        >>> tuner = search.grid_tuner([-1.0, 0.0, 1.0])
        >>> result = search.nested_cv(evaluate, tuner, 40, outer=4, inner=3)
        >>> first = result.outer[0]
        >>> len(first.fold.train), len(first.fold.test), first.config, first.evaluations
        (30, 10, 0.0, 10)
    """

    fold: Fold
    config: Any
    inner_score: float
    outer_score: float
    evaluations: int


@dataclass(frozen=True)
class NestedResult:
    """:func:`nested_cv`'s outcome.

    Attributes:
        estimate: mean outer-test loss of the tuned configurations (the nested estimate).
        inner_estimate: mean of the inner winners' own CV scores (each optimistic).
        outer: per-outer-fold details.
        evaluations: calls of ``evaluate`` in total (tuning plus the outer refits).

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> y = np.random.default_rng(0).normal(size=40)
        >>> def evaluate(c, train, test):  # predict the training mean + c; squared error
        ...     return float(np.mean((y[test] - y[train].mean() - c) ** 2))
        >>> tuner = search.grid_tuner([-1.0, 0.0, 1.0])
        >>> result = search.nested_cv(evaluate, tuner, 40, outer=4, inner=3)
        >>> len(result.outer), result.evaluations  # 4 x (3 configs x 3 inner folds + 1 refit)
        (4, 40)
        >>> [o.config for o in result.outer]
        [0.0, 0.0, 0.0, 0.0]
    """

    estimate: float
    inner_estimate: float
    outer: list[OuterFold]
    evaluations: int


def nested_cv(
    evaluate: Evaluate,
    tuner: Tuner,
    data: int | Sequence[int] | np.ndarray,
    *,
    outer: int = 5,
    inner: int = 5,
    seed: int = 0,
    labels: Sequence[Any] | np.ndarray | None = None,
) -> NestedResult:
    """Nested cross-validation of "``tuner`` on ``inner`` folds, then refit" (module docs).

    The inner folds of outer fold ``o`` split only its training rows (seeded ``seed + 1 +
    o``), so no evaluation made while tuning sees a row of the outer test part.  The tuned
    configuration is then trained on the whole outer training part and scored on its test
    part.

    Examples:
        >>> import numpy as np
        >>> from hypergradient import search
        >>> y = np.random.default_rng(0).normal(size=40)
        >>> def evaluate(c, train, test):  # predict the training mean + c; squared error
        ...     return float(np.mean((y[test] - y[train].mean() - c) ** 2))
        >>> tuner = search.grid_tuner([-1.0, 0.0, 1.0])
        >>> result = search.nested_cv(evaluate, tuner, 40, outer=4, inner=3)
        >>> [o.config for o in result.outer], result.evaluations
        ([0.0, 0.0, 0.0, 0.0], 40)
        >>> result.inner_estimate < result.estimate  # the inner winners' scores are optimistic
        True
    """
    outer_folds = kfold(data, outer, seed=seed, labels=labels)
    results: list[OuterFold] = []
    total = 0
    for o, fold in enumerate(outer_folds):
        inner_folds = kfold(fold.train, inner, seed=seed + 1 + o, labels=labels)
        tuned = tuner(evaluate, inner_folds)
        score = float(evaluate(tuned.config, fold.train, fold.test))
        results.append(OuterFold(fold, tuned.config, tuned.score, score, tuned.evaluations + 1))
        total += tuned.evaluations + 1
    return NestedResult(
        estimate=float(np.mean([r.outer_score for r in results])),
        inner_estimate=float(np.mean([r.inner_score for r in results])),
        outer=results,
        evaluations=total,
    )
