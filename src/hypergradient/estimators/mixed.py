r"""Metz et al. (2019): back-propagation and ES, combined by their estimated variances.

Both estimators below are unbiased for the gradient of the Gaussian-smoothed objective
:math:`\tilde L(\theta) = \mathbb E_{\epsilon \sim \mathcal N(0,\sigma^2 I)} L(\theta+\epsilon)`
and are computed from the *same* :math:`S` antithetic pairs of unrolls:

.. math::

    r_i = \tfrac12\big(\nabla L(\theta+\epsilon_i) + \nabla L(\theta-\epsilon_i)\big)
    \quad\text{(reparameterisation: back-propagation through the unroll)},

    e_i = \frac{L(\theta+\epsilon_i) - L(\theta-\epsilon_i)}{2\sigma^2}\,\epsilon_i
    \quad\text{(antithetic ES)}.

Per coordinate :math:`j`, with the sample means :math:`\bar r, \bar e` and the variances of
those means estimated from the samples, :math:`v_r = \widehat{\mathrm{Var}}(r_{\cdot j})/S`
and :math:`v_e = \widehat{\mathrm{Var}}(e_{\cdot j})/S`, the estimate is their
inverse-variance combination

.. math::

    \hat g_j = \frac{v_e\, \bar r_j + v_r\, \bar e_j}{v_r + v_e}.

For two *independent* unbiased estimators with *known* variances this is the
minimum-variance unbiased combination, with variance :math:`v_r v_e / (v_r + v_e) \le
\min(v_r, v_e)` (:func:`inverse_variance_combine`).  Metz et al.'s estimator departs from
that ideal in two ways, and both show (``benchmarks/estimator_bias_variance.py``):

* the weights are estimated from the samples they weigh, so they correlate with the
  estimates: an :math:`O(1/S)` bias (12% of the gradient with ``S = 8`` on the noisy
  affine toy, 7 standard errors over 400 repetitions);
* :math:`r_i` and :math:`e_i` come from the same unrolls and are correlated, which
  inverse-variance weights ignore, and the estimated weights are noisy: on the noisy
  affine toy (where :math:`e_i \approx r_i z_i^2`) the mix had 1.3-1.6 times the variance
  of the better component, and 1.13-1.16 times on short (T = 5) logistic-map unrolls.
  Where one component is far better (longer stable or chaotic unrolls, the paper's
  regimes) it matches the better one to 1%, and where the two are comparable it beats
  both (0.65 of the smaller at T = 10, r = 3.8).

Back-propagation wins on short or stable unrolls; ES wins on long, chaotic ones, where
reparameterisation gradients explode.  Where back-propagation gives NaN/inf, the weight
falls entirely on ES.

Cost per truncation: :math:`2 S K` steps forward with graphs, one backward through all of
them (memory like :class:`~hypergradient.estimators.TruncatedBackprop` with ``2 S``
particles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

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


def inverse_variance_combine(
    estimate_a: Tree, variance_a: Tree, estimate_b: Tree, variance_b: Tree
) -> tuple[Tree, Tree]:
    r"""Combine two unbiased estimates of one quantity by their inverse variances.

    .. math::

        w = \frac{v_b}{v_a + v_b}, \qquad c = w\,a + (1-w)\,b, \qquad
        \mathrm{Var}(c) = \frac{v_a v_b}{v_a + v_b} \le \min(v_a, v_b)

    (the variance identity for independent estimates and fixed weights).  Element-wise on
    tensors or dicts of tensors of one shape.  Conventions: :math:`w = 1/2` where both
    variances are 0; where one estimate or its variance is NaN/inf, all the weight goes to
    the other.

    Args:
        estimate_a, variance_a: the first estimate and the variance of that estimate.
        estimate_b, variance_b: the second, same structure.

    Returns:
        ``(combined, weight_a)``, both shaped like ``estimate_a``.

    Example::

        >>> import torch
        >>> from hypergradient.estimators import inverse_variance_combine
        >>> c, w = inverse_variance_combine(torch.tensor(1.0), torch.tensor(1.0),
        ...                                 torch.tensor(4.0), torch.tensor(2.0))
        >>> round(float(w), 6), round(float(c), 6)  # weight 2/3 on the lower-variance a
        (0.666667, 2.0)
    """
    for name, tree in (
        ("variance_a", variance_a),
        ("estimate_b", estimate_b),
        ("variance_b", variance_b),
    ):
        shapes = [tuple(x.shape) for x in leaves_of(tree)]
        like = [tuple(x.shape) for x in leaves_of(estimate_a)]
        if shapes != like:
            raise HypergradientError(
                f"hypergradient.estimators.inverse_variance_combine(...): `{name}` has shapes "
                f"{shapes} but `estimate_a` has {like}; all four must have one structure."
            )
    weight = tree_map(_backprop_weight, estimate_a, variance_a, estimate_b, variance_b)

    def combine(w, a, b):
        # torch.where, not w * a + (1 - w) * b: 0 * inf would poison a dropped estimate.
        return torch.where(w == 0, b, torch.where(w == 1, a, w * a + (1 - w) * b))

    return tree_map(combine, weight, estimate_a, estimate_b), weight


@final
@dataclass(frozen=True, eq=False)
class MixedEstimator(AbstractGradientEstimator):
    r"""Metz et al. (2019)'s inverse-variance mix of back-propagation and antithetic ES.

    See the module docstring for the math.  ``extras`` of every estimate holds the
    components: ``"backprop"`` (:math:`\bar r`), ``"es"`` (:math:`\bar e`),
    ``"backprop_variance"`` (:math:`v_r`), ``"es_variance"`` (:math:`v_e`),
    ``"backprop_weight"`` (:math:`v_e/(v_r+v_e)`), and the per-pair samples
    ``"backprop_samples"`` and ``"es_samples"``.  ``samples`` are
    :math:`w r_i + (1-w) e_i`, whose mean is ``grad``.

    Args:
        system: the :class:`~hypergradient.estimators.AbstractUnrolledSystem`.
        sigma: :math:`\sigma`, the perturbation standard deviation (the smoothing scale).
        num_pairs: :math:`S \ge 2` antithetic pairs (the variances need two samples).
        truncation_length: :math:`K`; ``None`` (whole episodes, as in the paper's
            experiments) keeps both components unbiased; a shorter one gives truncated
            back-propagation and truncated ES at the perturbed points (both biased).
        vectorize: vmap the particles (see the system contract).

    References:
        Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein (ICML 2019), Understanding
        and correcting pathologies in the training of learned optimizers.
    """

    system: AbstractUnrolledSystem
    sigma: float
    num_pairs: int = 8
    truncation_length: int | None = None
    vectorize: bool = False

    def __post_init__(self):
        where = f"{type(self).__name__}(...)"
        check_system(where, self.system)
        check_truncation(where, self.truncation_length, self.system.horizon)
        check_count(where, "num_pairs", self.num_pairs, 2)
        check_sigma(where, self.sigma)
        check_flag(where, "vectorize", self.vectorize)

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
            # Inf - inf in a broken back-propagation sample gives a NaN variance: the
            # weight then falls on ES, which is what we want.
            var_bp = sample_mean_variance(where, backprop_samples)
            var_es = sample_mean_variance(where, es_samples)
        grad, weight = inverse_variance_combine(backprop, var_bp, es, var_es)

        def mix(w, r, e):
            w = w.unsqueeze(0)
            return torch.where(w == 0, e, torch.where(w == 1, r, w * r + (1 - w) * e))

        samples = tree_map(mix, weight, backprop_samples, es_samples)
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
                "backprop_weight": weight,
                "backprop_samples": backprop_samples,
                "es_samples": es_samples,
            },
        )
        particles = detach_particles(take_particles(window.states, n, self.vectorize))
        return estimate, EstimatorState(
            state.kind, particles, window.t, state.episodes + len(restarts)
        )
