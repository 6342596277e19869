r"""Back-propagation and ES on the same unrolls, combined per coordinate (Metz et al. 2019).

Both estimators below are unbiased for the gradient of the Gaussian-smoothed objective
:math:`\tilde L(\theta) = \mathbb E_{\epsilon \sim \mathcal N(0,\sigma^2 I)} L(\theta+\epsilon)`
and are computed from the *same* :math:`S` antithetic pairs of unrolls:

.. math::

    a_i = \tfrac12\big(\nabla L(\theta+\epsilon_i) + \nabla L(\theta-\epsilon_i)\big)
    \quad\text{(reparameterisation: back-propagation through the unroll)},

    b_i = \frac{L(\theta+\epsilon_i) - L(\theta-\epsilon_i)}{2\sigma^2}\,\epsilon_i
    \quad\text{(antithetic ES)}.

Back-propagation wins on short or stable unrolls; ES wins on long, chaotic ones, where
reparameterisation gradients explode.  Per coordinate, with per-pair variances
:math:`V_a, V_b` and covariance :math:`C` (the two come from the same unrolls, so
:math:`C \ne 0`), the convex combination :math:`w\,a_i + (1-w)\,b_i` has per-pair variance

.. math::

    q(w) = w^2 V_a + (1-w)^2 V_b + 2w(1-w)\,C, \qquad
    w^\star = \mathrm{clip}_{[0,1]}\frac{V_b - C}{V_a + V_b - 2C}, \qquad
    q(w^\star) \le \min(V_a, V_b)

(:math:`q` is convex and :math:`w \in \{0, 1\}` are feasible).  Metz et al. weigh by the
inverse variances, :math:`w = V_b/(V_a+V_b)`, which is :math:`w^\star` only for
:math:`C = 0`.

**Default: cross-fitted covariance weights** (:func:`cross_fitted_combine`).  The
weights are estimated, and a weight estimated from the samples it weighs correlates with
them.  So the pairs are split into ``folds`` folds (default: one pair per fold,
leave-one-out) and the pairs of fold :math:`f` get the weight :math:`\hat w_f` computed
from :math:`V_a, V_b, C` estimated on the *other* folds (plus the history below), never on
their own samples:

.. math::

    \hat g = \frac1S \sum_{f} \sum_{i \in f} \big(\hat w_f\, a_i + (1-\hat w_f)\, b_i\big),
    \qquad
    \mathbb E\big[\hat w_f a_i + (1-\hat w_f) b_i\big]
    = \mathbb E[\hat w_f]\, g + (1-\mathbb E[\hat w_f])\, g = g

because :math:`\hat w_f` is independent of :math:`(a_i, b_i)`: the estimate is unbiased
whenever the components are, whatever the quality of the weights.  Its variance is about
:math:`\big(q(w^\star) + (V_a+V_b-2C)\,\mathbb E(\hat w - w^\star)^2\big)/S`: the second
term is the price of noisy weights, about :math:`q(w^\star)/(n-3)` for Gaussian samples
with :math:`n` samples behind each weight, and more for ES's heavy-tailed samples
(kurtosis 13-50 on the toys).  A few pairs cannot pay it: on its first truncation (no
history) the cross-fitted mix has 1.03-1.32 times the smaller variance on the
benchmark's logistic-map rows (``S = 16``) and 1.26 / 1.66 times on the noisy affine toy
(``S = 16`` / ``8``); two half-folds instead of leave-one-out do slightly worse (1.04-1.37,
1.69).  Hence a **moment history**: the centred co-moments of every truncation are kept in
the estimator state, decayed by ``decay`` per truncation, and added to the other folds'
co-moments.  Past truncations are independent of the current one given the particles'
states (fresh perturbations), so this keeps the estimate unbiased, and it gives each weight
about :math:`(S-1)(1+\gamma)/(1-\gamma)` degrees of freedom (273 at ``S = 8``,
``decay = 0.95``).  After 60 truncations at a fixed :math:`\theta` the mix has 0.990-1.005
times the smaller variance on every benchmark row whose exact optimum is a single component
(the remaining excess, at most 0.5%, is the weights' noise: no estimated weight can be
exactly on a boundary optimum every time), and 0.67 where the components are comparable
(chaotic logistic map, ``T = 10``; exact weights: 0.65); unbiased on every row
(``benchmarks/estimator_bias_variance.py``).  Where :math:`\theta` moves, older moments are
staler: that costs variance, never bias.  With truncations (:math:`K < T`) the history
pools windows from different positions in the episode; on the affine toy (``K = 5`` of
``T = 20``, ``S = 8``) the per-episode estimate has 1.21 times the smaller variance in the
first episode and 0.99 from the sixth on.  No shrinkage of the weights: shrinking
:math:`\hat w` towards the component that looks better without history helped some rows
and hurt others in our measurements, since with heavy-tailed ES samples the better-looking
component is often the worse one; the history is what makes the weights reliable.

**Metz et al.'s weighting** (``weighting="metz"``): :math:`\hat w = \hat v_b/(\hat v_a +
\hat v_b)` from the current pairs' sample variances (:func:`inverse_variance_combine`).
Known defects, measured on the benchmark: the weights are estimated from the samples they
weigh, an :math:`O(1/S)` bias (11% of the gradient with ``S = 8`` on the noisy affine toy,
31 standard errors over 9000 estimates; 15-44 standard errors of the paired difference on
every logistic-map row where back-propagation keeps some weight), and it ignores
:math:`C`: 1.38-1.47 times the better component's variance on the affine toy, 1.54 on the
power toy, 1.04-1.26 on short logistic-map unrolls.  It needs no history (every
truncation is self-contained).

Where back-propagation gives NaN/inf in a coordinate, the weight there falls entirely on
ES (both weightings).

Cost per truncation: :math:`2 S K` steps forward with graphs, one backward through all of
them (memory like :class:`~hypergradient.estimators.TruncatedBackprop` with ``2 S``
particles); the weights cost :math:`O(S d)` float64 operations for :math:`d` coordinates,
and the history :math:`3d` float64 numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, final

import torch

from .._errors import HypergradientError
from .._tree import Tree, tree_map
from ._base import (
    AbstractGradientEstimator,
    EstimatorState,
    GradientEstimate,
    check_count,
    check_flag,
    check_generator,
    check_sigma,
    check_state,
    check_system,
    check_theta,
    check_truncation,
    sample_mean_variance,
)
from ._system import (
    AbstractUnrolledSystem,
    Theta,
    concat_particles,
    detach_particles,
    init_particles,
    leaves_of,
    sample_perturbations,
    take_particles,
    tree_from_leaves,
)
from .es import antithetic_thetas, run_pairs

WEIGHTINGS = ("covariance", "metz")


def _backprop_weight(
    mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor
) -> torch.Tensor:
    """Weight of ``a``: ``var_b / (var_a + var_b)``, 1/2 when both are 0, 0 if ``a`` is broken."""
    total = var_a + var_b
    weight = torch.where(total > 0, var_b / torch.where(total > 0, total, 1.0), 0.5)
    a_ok = torch.isfinite(mean_a) & torch.isfinite(var_a)
    b_ok = torch.isfinite(mean_b) & torch.isfinite(var_b)
    weight = torch.where(a_ok, weight, 0.0)
    return torch.where(b_ok | ~a_ok, weight, 1.0)


def _check_same_shapes(where: str, name: str, tree: Tree, like: Tree, like_name: str) -> None:
    shapes = [tuple(x.shape) for x in leaves_of(tree)]
    expected = [tuple(x.shape) for x in leaves_of(like)]
    if shapes != expected:
        raise HypergradientError(
            f"{where}: `{name}` has shapes {shapes} but `{like_name}` has {expected}; they "
            f"must have one structure."
        )


def inverse_variance_combine(
    estimate_a: Tree, variance_a: Tree, estimate_b: Tree, variance_b: Tree
) -> tuple[Tree, Tree]:
    r"""Combine two unbiased estimates of one quantity by their inverse variances.

    .. math::

        w = \frac{v_b}{v_a + v_b}, \qquad c = w\,a + (1-w)\,b, \qquad
        \mathrm{Var}(c) = \frac{v_a v_b}{v_a + v_b} \le \min(v_a, v_b)

    (the variance identity for *independent* estimates and *fixed* weights; with
    correlated estimates or weights estimated from the same samples neither the identity
    nor unbiasedness holds: see :func:`cross_fitted_combine`).  Element-wise on tensors or
    dicts of tensors of one shape.  Conventions: :math:`w = 1/2` where both variances are
    0; where one estimate or its variance is NaN/inf, all the weight goes to the other.

    Args:
        estimate_a, variance_a: the first estimate and the variance of that estimate.
        estimate_b, variance_b: the second, same structure.

    Returns:
        ``(combined, weight_a)``, both shaped like ``estimate_a``.

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import inverse_variance_combine
        >>> c, w = inverse_variance_combine(torch.tensor(1.0), torch.tensor(1.0),
        ...                                 torch.tensor(4.0), torch.tensor(2.0))
        >>> round(float(w), 6), round(float(c), 6)  # weight 2/3 on the lower-variance a
        (0.666667, 2.0)
    """
    where = "hypergradient.estimators.inverse_variance_combine(...)"
    for name, tree in (
        ("variance_a", variance_a),
        ("estimate_b", estimate_b),
        ("variance_b", variance_b),
    ):
        _check_same_shapes(where, name, tree, estimate_a, "estimate_a")
    weight = tree_map(_backprop_weight, estimate_a, variance_a, estimate_b, variance_b)

    def combine(w, a, b):
        # torch.where, not w * a + (1 - w) * b: 0 * inf would poison a dropped estimate.
        return torch.where(w == 0, b, torch.where(w == 1, a, w * a + (1 - w) * b))

    return tree_map(combine, weight, estimate_a, estimate_b), weight


class CrossFitted(NamedTuple):
    """What :func:`cross_fitted_combine` returns (trees shaped like one sample unless noted).

    Attributes:
        grad: the combined estimate, the mean of ``samples``.
        samples: ``(S, ...)``: :math:`\\hat w_{f(i)} a_i + (1-\\hat w_{f(i)}) b_i` per pair.
        weights: ``(S, ...)``: the back-propagation weight :math:`\\hat w_{f(i)}` of each pair.
        moments: the history for the next call, leaves ``(3, ...)`` float64: ``decay``
            times the given history plus this call's centred co-moments
            :math:`[\\sum (a_i-\\bar a)^2, \\sum (b_i-\\bar b)^2,
            \\sum (a_i-\\bar a)(b_i-\\bar b)]` (coordinates with non-finite samples add 0).

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import cross_fitted_combine
        >>> g = torch.Generator().manual_seed(0)
        >>> a, b = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
        >>> out = cross_fitted_combine(a, b)
        >>> out._fields
        ('grad', 'samples', 'weights', 'moments')
        >>> tuple(out.samples.shape), tuple(out.weights.shape), tuple(out.moments.shape)
        ((6, 2), (6, 2), (3, 2))
        >>> bool(torch.allclose(out.grad, out.samples.mean(0))), out.moments.dtype
        (True, torch.float64)
        >>> out = cross_fitted_combine(a, b, out.moments)  # the next call uses the history
    """

    grad: Tree
    samples: Tree
    weights: Tree
    moments: Tree


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # Variances are differences of large sums when one sample dominates (heavy-tailed ES
    # samples): float64 whatever the samples' dtype.
    return torch.promote_types(dtype, torch.float64)


def _comoments(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Centred co-moment sums over dim 0: ``(3, ...)`` = [aa, bb, ab]."""
    da, db = a - a.mean(dim=0), b - b.mean(dim=0)
    return torch.stack([(da * da).sum(dim=0), (db * db).sum(dim=0), (da * db).sum(dim=0)])


def _minimum_variance_weight(moments: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{clip}_{[0,1]}((V_b - C)/(V_a + V_b - 2C))` from ``[aa, bb, ab]`` sums.

    Where :math:`V_a + V_b - 2C = \mathrm{Var}(a - b)` is 0 (to rounding) the components
    differ by a constant, every weight has the same variance, and the weight is 1/2.
    """
    aa, bb, ab = moments.unbind(0)
    diff = aa + bb - 2 * ab
    usable = diff > 1e-12 * (aa + bb)
    weight = (bb - ab) / torch.where(usable, diff, 1.0)
    return torch.where(usable, weight.clamp(0.0, 1.0), 0.5)


def _cross_fit_leaf(
    a: torch.Tensor, b: torch.Tensor, history: torch.Tensor | None, folds: int, decay: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One leaf of :func:`cross_fitted_combine`: ``(samples, weights, moments)``."""
    n = a.shape[0]
    stat = _stat_dtype(a.dtype)
    a64, b64 = a.to(stat), b.to(stat)
    a_ok, b_ok = torch.isfinite(a64).all(dim=0), torch.isfinite(b64).all(dim=0)
    ok = a_ok & b_ok
    # Broken coordinates get fixed weights below; zeros keep their statistics finite.
    a64, b64 = torch.where(ok, a64, 0.0), torch.where(ok, b64, 0.0)
    if history is None:
        history = torch.zeros((3, *a.shape[1:]), dtype=stat, device=a.device)
    history = history.to(stat)

    # Co-moments of the complement of each fold by down-dating the totals (O(S d), not
    # O(folds S d)): centred at the pooled means, the complement of fold f has sums
    # -s_f (the centred values sum to 0) and squares total - ss_f, so its centred
    # co-moment is (total_xy - ss_f,xy) - s_f,x s_f,y / n_c.
    fold = torch.arange(n, device=a.device) % folds
    da, db = a64 - a64.mean(dim=0), b64 - b64.mean(dim=0)
    products = torch.stack([da * da, db * db, da * db], dim=1)  # (S, 3, ...)
    sums = torch.zeros((folds, 2, *a.shape[1:]), dtype=stat, device=a.device)
    sums = sums.index_add(0, fold, torch.stack([da, db], dim=1))
    squares = torch.zeros((folds, 3, *a.shape[1:]), dtype=stat, device=a.device)
    squares = squares.index_add(0, fold, products)
    sizes = torch.bincount(fold, minlength=folds).to(stat)
    complement = (n - sizes).reshape(-1, *([1] * (a.dim() - 1)))  # (folds, 1, ...)
    sa, sb = sums[:, 0], sums[:, 1]
    correction = torch.stack([sa * sa, sb * sb, sa * sb], dim=1) / complement.unsqueeze(1)
    held_out = squares.sum(dim=0) - squares - correction  # (folds, 3, ...)
    weight = _minimum_variance_weight((history.unsqueeze(0) + held_out).transpose(0, 1))

    # A broken component gets weight 0 (both broken: ES, whose NaN then shows).
    weight = torch.where(a_ok, weight, 0.0)
    weight = torch.where(b_ok | ~a_ok, weight, 1.0)
    per_pair = weight[fold].to(a.dtype)
    samples = torch.where(
        per_pair == 0,
        b,
        torch.where(per_pair == 1, a, per_pair * a + (1 - per_pair) * b),
    )
    moments = decay * history + torch.where(ok, _comoments(a64, b64), 0.0)
    return samples, per_pair, moments


def cross_fitted_combine(
    backprop_samples: Tree,
    es_samples: Tree,
    moments: Tree | None = None,
    *,
    folds: int | None = None,
    decay: float = 0.95,
) -> CrossFitted:
    r"""Unbiased minimum-variance combination of two correlated per-sample estimators.

    Per coordinate, pairs :math:`i = 1..S` carry two unbiased estimates :math:`a_i, b_i` of
    one quantity.  The pairs are dealt into ``folds`` folds (pair :math:`i` into fold
    :math:`i \bmod` ``folds``).  For fold :math:`f`, with :math:`M^{(-f)}` the centred
    co-moment sums :math:`[\sum(a-\bar a)^2, \sum(b-\bar b)^2, \sum(a-\bar a)(b-\bar b)]`
    over the pairs *not* in :math:`f` and :math:`H` the given history,

    .. math::

        [A, B, C] = H + M^{(-f)}, \qquad
        \hat w_f = \mathrm{clip}_{[0,1]} \frac{B - C}{A + B - 2C}, \qquad
        \hat g = \frac1S \sum_i \hat w_{f(i)} a_i + (1 - \hat w_{f(i)})\, b_i,

    the minimum-variance convex weight of two correlated estimators (the normalisation of
    the co-moments cancels).  :math:`\hat w_f` never sees fold :math:`f`'s samples, so
    :math:`\hat g` is unbiased when the :math:`a_i, b_i` are and the pairs are independent
    of each other and of the history.  The returned history is
    ``decay * H + M`` (:math:`M` over all pairs).  See the module docstring for the
    variance and for why a history is needed with few pairs.

    Conventions: a weight is 1/2 where :math:`a - b` has zero variance (any weight is
    then optimal), e.g. from a single held-out pair and no history; a coordinate where one
    component has a NaN/inf sample gives all weight to the other and adds nothing to the
    history.

    Args:
        backprop_samples: :math:`a`: a tensor or dict of tensors with leading dimension
            :math:`S \ge 2` (the pairs).
        es_samples: :math:`b`, same structure.
        moments: the history returned by the previous call (leaves ``(3, *shape)``), or
            ``None`` (no history).
        folds: the number of folds, in ``[2, S]``; ``None`` means ``S`` (leave-one-out,
            the most samples behind every weight).
        decay: :math:`\gamma \in [0, 1)`, the factor applied to the history per call
            (``0``: the current call only).

    Returns:
        A :class:`CrossFitted` ``(grad, samples, weights, moments)``.

    Cost: :math:`O(S d)` in float64 for :math:`d` coordinates, memory :math:`O(S d)`.

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import cross_fitted_combine
        >>> g = torch.Generator().manual_seed(0)
        >>> a = 1.0 + torch.randn(4000, 1, generator=g, dtype=torch.float64)
        >>> b = a + 3.0 * torch.randn(4000, 1, generator=g, dtype=torch.float64)
        >>> # b = a + independent noise: Var(b) = 10, Cov(a, b) = Var(a) = 1, so w* = 1
        >>> out = cross_fitted_combine(a, b)
        >>> bool(out.weights.min() > 0.97), tuple(out.grad.shape), tuple(out.moments.shape)
        (True, (1,), (3, 1))
    """
    where = "hypergradient.estimators.cross_fitted_combine(...)"
    _check_same_shapes(where, "es_samples", es_samples, backprop_samples, "backprop_samples")
    leaves = leaves_of(backprop_samples)
    n = leaves[0].shape[0] if leaves and leaves[0].dim() > 0 else 0
    if n < 2 or any(x.dim() == 0 or x.shape[0] != n for x in leaves):
        raise HypergradientError(
            f"{where}: the samples need a leading dimension of at least 2 pairs shared by "
            f"every leaf, got shapes {[tuple(x.shape) for x in leaves]}."
        )
    k = n if folds is None else folds
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= n:
        raise HypergradientError(
            f"{where}: folds must be None (leave-one-out) or an int in [2, S={n}], got {folds!r}."
        )
    _check_decay(where, decay)
    if moments is not None:
        got = [tuple(m.shape) for m in leaves_of(moments)]
        expected = [(3, *x.shape[1:]) for x in leaves]
        if got != expected:
            raise HypergradientError(
                f"{where}: `moments` has shapes {got}, expected {expected} (the history "
                f"returned by the previous call on samples of this structure), or None."
            )
    history = [None] * len(leaves) if moments is None else leaves_of(moments)
    out = [
        _cross_fit_leaf(a, b, h, k, float(decay))
        for a, b, h in zip(leaves, leaves_of(es_samples), history)
    ]
    samples = tree_from_leaves([o[0] for o in out], backprop_samples)
    return CrossFitted(
        grad=tree_map(lambda s: s.mean(dim=0), samples),
        samples=samples,
        weights=tree_from_leaves([o[1] for o in out], backprop_samples),
        moments=tree_from_leaves([o[2] for o in out], backprop_samples),
    )


def _check_decay(where: str, decay: object) -> None:
    if (
        isinstance(decay, bool)
        or not isinstance(decay, (int, float))
        or not math.isfinite(decay)
        or not 0 <= decay < 1
    ):
        raise HypergradientError(
            f"{where}: decay must be a float in [0, 1), got {decay!r}. It multiplies the "
            f"weights' moment history once per truncation: 0.95 remembers about 20 "
            f"truncations, 0 only the current one."
        )


@final
@dataclass(frozen=True, eq=False)
class MixedEstimator(AbstractGradientEstimator):
    r"""Back-propagation and antithetic ES on the same unrolls, mixed per coordinate.

    See the module docstring for the math.  ``weighting="covariance"`` (default) mixes by
    the cross-fitted minimum-variance weights of :func:`cross_fitted_combine`, with a
    history of co-moments carried in the state (unbiased whenever the components are);
    ``weighting="metz"`` is Metz et al.'s inverse-variance weighting of the current pairs
    (biased by :math:`O(1/S)`, and above the better component's variance when the two are
    correlated).

    ``extras`` of every estimate: ``"backprop"`` (:math:`\bar a`), ``"es"``
    (:math:`\bar b`), ``"backprop_variance"``, ``"es_variance"`` and ``"covariance"`` (of
    those means, from this truncation's pairs), ``"backprop_weights"`` (per pair, leading
    dimension :math:`S`), ``"backprop_weight"`` (their mean), and the per-pair samples
    ``"backprop_samples"`` and ``"es_samples"``.  ``samples`` are
    :math:`w_i a_i + (1-w_i) b_i`, whose mean is ``grad``; with cross-fitted weights they
    are only nearly independent (the weights share pairs), so ``standard_error()`` is
    approximate.

    Args:
        system: the :class:`~hypergradient.estimators.AbstractUnrolledSystem`.
        sigma: :math:`\sigma`, the perturbation standard deviation (the smoothing scale).
        num_pairs: :math:`S \ge 2` antithetic pairs (the variances need two samples).
        truncation_length: :math:`K`; ``None`` (whole episodes, as in the paper's
            experiments) keeps both components unbiased; a shorter one gives truncated
            back-propagation and truncated ES at the perturbed points (both biased).
        vectorize: vmap the particles (see the system contract).
        weighting: ``"covariance"`` (default) or ``"metz"``.
        folds: covariance weighting: folds of the cross-fitting, ``None`` (default) for
            leave-one-out, or an int in ``[2, num_pairs]``.
        decay: covariance weighting: :math:`\gamma \in [0, 1)`, the per-truncation decay
            of the co-moment history (default 0.95, about 20 truncations; 0 keeps none).
            Longer memories give better weights at a fixed :math:`\theta` and staler ones
            when :math:`\theta` moves; stale weights cost variance, never bias.

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import AffineRecurrence, MixedEstimator
        >>> system = AffineRecurrence(horizon=4, a=0.5)  # noise-free: backprop is exact
        >>> est = MixedEstimator(system, sigma=0.1, num_pairs=4)
        >>> theta, gen = torch.zeros(1), torch.Generator().manual_seed(0)
        >>> out, state = est.estimate(theta, est.init(theta, gen), gen)
        >>> round(float(out.extras["backprop_weight"]), 2)  # so it gets all the weight
        1.0
        >>> bool(torch.allclose(out.grad, system.gradient(theta), rtol=1e-4, atol=1e-6))
        True

    References:
        Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein (ICML 2019), Understanding
        and correcting pathologies in the training of learned optimizers.
        Chernozhukov et al. (2018), Double/debiased machine learning (cross-fitting).
    """

    system: AbstractUnrolledSystem
    sigma: float
    num_pairs: int = 8
    truncation_length: int | None = None
    vectorize: bool = False
    weighting: str = "covariance"
    folds: int | None = None
    decay: float = 0.95

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        check_system(where, self.system)
        check_truncation(where, self.truncation_length, self.system.horizon)
        check_count(where, "num_pairs", self.num_pairs, 2)
        check_sigma(where, self.sigma)
        check_flag(where, "vectorize", self.vectorize)
        if self.weighting not in WEIGHTINGS:
            raise HypergradientError(
                f"{where}: weighting must be one of {WEIGHTINGS}, got {self.weighting!r}. "
                f"'covariance' is unbiased; 'metz' is Metz et al. (2019)'s original."
            )
        if self.folds is not None:
            check_count(where, "folds", self.folds, 2)
            if self.folds > self.num_pairs:
                raise HypergradientError(
                    f"{where}: folds must be at most num_pairs={self.num_pairs} (every fold "
                    f"needs a pair), got {self.folds}. Use None for leave-one-out."
                )
        _check_decay(where, self.decay)

    def init(self, theta: Theta, generator: torch.Generator) -> EstimatorState:
        where = f"{type(self).__name__}.init(...)"
        check_theta(where, theta)
        check_generator(where, generator)
        particles = init_particles(self.system, generator, self.num_pairs, self.vectorize)
        return EstimatorState(type(self).__name__, particles, 0, 1)

    def estimate(
        self, theta: Theta, state: EstimatorState, generator: torch.Generator
    ) -> tuple[GradientEstimate, EstimatorState]:
        where = f"{type(self).__name__}.estimate(...)"
        check_theta(where, theta)
        check_generator(where, generator)
        state = check_state(where, state, type(self).__name__, theta)
        n, sigma = self.num_pairs, float(self.sigma)
        length = check_truncation(where, self.truncation_length, self.system.horizon)
        eps = sample_perturbations(theta, n, sigma, generator)
        # The perturbed points themselves are the leaves: d L(u)/du at u = theta +- eps is
        # the reparameterisation gradient of the smoothed objective.
        thetas = tree_map(lambda x: x.requires_grad_(True), antithetic_thetas(theta, eps))
        pairs = concat_particles(state.particles, state.particles, self.vectorize)
        restarts: list = []
        with torch.enable_grad():
            window = run_pairs(where, self, pairs, state.t, thetas, length, generator, restarts)
            mean_loss = window.losses.mean(dim=1)
            leaves = leaves_of(thetas)
            if mean_loss.requires_grad:
                grads = torch.autograd.grad(
                    mean_loss.sum(), leaves, allow_unused=True, materialize_grads=True
                )
            else:
                grads = [torch.zeros_like(x) for x in leaves]
        mean_loss = mean_loss.detach()
        backprop_samples = tree_from_leaves([0.5 * (g[:n] + g[n:]) for g in grads], theta)
        coef = (mean_loss[:n] - mean_loss[n:]) / (2 * sigma**2)
        es_samples = tree_map(lambda e: e * coef.reshape(-1, *([1] * (e.dim() - 1))), eps)

        def mean(samples):
            return tree_map(lambda s: s.mean(dim=0), samples)

        backprop, es = mean(backprop_samples), mean(es_samples)
        with torch.no_grad():
            # Inf - inf in a broken back-propagation sample gives a NaN variance: Metz's
            # weight then falls on ES, which is what we want.
            var_bp = sample_mean_variance(where, backprop_samples)
            var_es = sample_mean_variance(where, es_samples)
            covariance = tree_map(
                lambda a, b: _comoments(a, b)[2] / ((n - 1) * n), backprop_samples, es_samples
            )
            if self.weighting == "covariance":
                fit = cross_fitted_combine(
                    backprop_samples,
                    es_samples,
                    state.moments,
                    folds=self.folds,
                    decay=self.decay,
                )
                grad, samples, weights, moments = fit
            else:
                grad, weight = inverse_variance_combine(backprop, var_bp, es, var_es)
                weights = tree_map(lambda w, s: w.expand_as(s), weight, backprop_samples)

                def mix(w, a, b):
                    return torch.where(w == 0, b, torch.where(w == 1, a, w * a + (1 - w) * b))

                samples = tree_map(mix, weights, backprop_samples, es_samples)
                moments = None
        estimate = GradientEstimate(
            grad=grad,
            loss=mean_loss.mean(),
            samples=samples,
            t=window.t,
            episodes_finished=window.episodes_finished,
            system_steps=2 * n * length,
            extras={
                "backprop": backprop,
                "es": es,
                "backprop_variance": var_bp,
                "es_variance": var_es,
                "covariance": covariance,
                "backprop_weights": weights,
                "backprop_weight": mean(weights),
                "backprop_samples": backprop_samples,
                "es_samples": es_samples,
            },
        )
        particles = detach_particles(take_particles(window.states, n, self.vectorize))
        next_state = EstimatorState(
            state.kind, particles, window.t, state.episodes + len(restarts), moments=moments
        )
        return estimate, next_state
