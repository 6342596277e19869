r"""Binary classification from labels flipped with class-conditional rates.

The noise model (class-conditional noise, CCN; Angluin & Laird 1988).  A clean label
:math:`y \in \{0, 1\}` with prior :math:`\pi = P(y = 1)` is observed as :math:`\tilde y`, flipped
independently of :math:`x` with the rates

.. math::
    \rho_+ = P(\tilde y = 0 \mid y = 1), \qquad \rho_- = P(\tilde y = 1 \mid y = 0),
    \qquad \rho_+ + \rho_- < 1.

**Noisy posterior.**  With :math:`\eta(x) = P(y = 1 \mid x)`,

.. math::
    \tilde\eta(x) = P(\tilde y = 1 \mid x) = (1 - \rho_+)\,\eta(x) + \rho_-\,(1 - \eta(x))
                  = \rho_- + (1 - \rho_+ - \rho_-)\,\eta(x),

an increasing affine map of :math:`\eta` (:func:`noisy_posterior`; inverse
:func:`clean_posterior`).  Averaged over :math:`x` the same map takes the clean prior to the
noisy one, :math:`\tilde\pi = \rho_- + (1 - \rho_+ - \rho_-)\,\pi`.

**Thresholds** (:func:`clean_threshold`).  Every classifier of the form
:math:`1[\eta(x) > t]` is the classifier :math:`1[\tilde\eta(x) > \rho_- + (1 - \rho_+ -
\rho_-)\,t]`: the map is increasing, so a clean Bayes rule is a *threshold of the noisy
posterior*, at a moved threshold.

* 0-1 error: the clean Bayes classifier thresholds :math:`\eta` at :math:`1/2`, hence
  :math:`\tilde\eta` at :math:`(1 - \rho_+ + \rho_-)/2` (Natarajan et al. 2013, Thm. 9).
  Thresholding :math:`\tilde\eta` at the naive :math:`1/2` instead is the clean rule
  :math:`\eta > (1/2 - \rho_-)/(1 - \rho_+ - \rho_-)`: right only when
  :math:`\rho_+ = \rho_-` (symmetric noise).
* Balanced error :math:`\tfrac12(P(\hat y = 0 \mid y = 1) + P(\hat y = 1 \mid y = 0))`: the
  clean Bayes classifier thresholds :math:`\eta` at :math:`\pi`, hence :math:`\tilde\eta` at
  :math:`\tilde\pi`, the *noisy* prior, which the noisy labels estimate directly: balanced
  error is minimised without knowing the noise rates (Menon et al. 2015, Sec. 4).

**Estimating the rates** (:func:`estimate_noise_rates`).  If the clean classes have regions
of certainty, :math:`\inf_x \eta(x) = 0` and :math:`\sup_x \eta(x) = 1`, then

.. math::
    \min_x \tilde\eta(x) = \rho_-, \qquad \max_x \tilde\eta(x) = 1 - \rho_+,

so a class-probability estimator trained on the *noisy* labels alone reveals both rates
(Menon et al. 2015, Sec. 6; Scott, Blanchard & Handy 2013 identify them under the same
"mutual irreducibility" condition).  The minimum and maximum of an estimated posterior
over-fit the extremes; low and high quantiles over held-out points are more stable, and
exact when a fraction ``quantile`` of the points lie in each certain region.  The clean prior
follows from :math:`\pi = (\tilde\pi - \rho_-)/(1 - \rho_+ - \rho_-)`.

Examples:
    Read the rates off a noisy posterior, then classify as the clean Bayes rule does:

    >>> import torch
    >>> from hypergradient import label_noise
    >>> eta = torch.linspace(0, 1, 100)  # clean P(y = 1 | x) over 100 points, reaching 0 and 1
    >>> eta_noisy = label_noise.noisy_posterior(eta, rho_pos=0.2, rho_neg=0.1)
    >>> rates = label_noise.estimate_noise_rates(eta_noisy)  # from the noisy posterior alone
    >>> round(rates.rho_pos, 4), round(rates.rho_neg, 4)
    (0.2, 0.1)
    >>> t = label_noise.clean_threshold(rates.rho_pos, rates.rho_neg)  # 0.45, not 0.5
    >>> bool(torch.equal(eta_noisy > t, eta > 0.5))  # the clean 0-1 Bayes classifier
    True

References:
    Natarajan, Dhillon, Ravikumar & Tewari, "Learning with Noisy Labels", NeurIPS 2013.
    Menon, van Rooyen, Ong & Williamson, "Learning from Corrupted Binary Labels via
    Class-Probability Estimation", ICML 2015.
    Scott, Blanchard & Handy, "Classification with Asymmetric Label Noise: Consistency and
    Maximal Denoising", COLT 2013.

All functions are elementwise tensor arithmetic (``O(n)``; the quantiles sort, ``O(n log n)``)
and differentiable where they are smooth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._errors import HypergradientError

__all__ = [
    "NoiseRates",
    "clean_posterior",
    "clean_prior",
    "clean_threshold",
    "estimate_noise_rates",
    "flip_labels",
    "noisy_posterior",
    "noisy_prior",
]


def _check_rates(where: str, rho_pos: float, rho_neg: float) -> None:
    for name, rho in (("rho_pos", rho_pos), ("rho_neg", rho_neg)):
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < 1:
            raise HypergradientError(
                f"{where}: `{name}` must be a flip probability in [0, 1), got {rho!r}."
            )
    if rho_pos + rho_neg >= 1:
        raise HypergradientError(
            f"{where}: expected rho_pos + rho_neg < 1 (otherwise the noisy labels carry no "
            f"information, or an inverted one), got {rho_pos!r} + {rho_neg!r} = "
            f"{rho_pos + rho_neg!r}. Check which rate is which: rho_pos = P(noisy 0 | clean 1)."
        )


def _check_probability(where: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise HypergradientError(
            f"{where}: `{name}` must be a probability in [0, 1], got {value!r}."
        )


def noisy_posterior(eta: torch.Tensor, rho_pos: float, rho_neg: float) -> torch.Tensor:
    r""":math:`\tilde\eta = \rho_- + (1 - \rho_+ - \rho_-)\,\eta`: the posterior of the noisy
    label given the clean posterior ``eta`` (any shape).

    Examples:
        >>> noisy_posterior(torch.tensor([0.0, 0.5, 1.0]), rho_pos=0.3, rho_neg=0.1)
        tensor([0.1000, 0.4000, 0.7000])
    """
    _check_rates("label_noise.noisy_posterior(...)", rho_pos, rho_neg)
    return rho_neg + (1.0 - rho_pos - rho_neg) * eta


def clean_posterior(eta_noisy: torch.Tensor, rho_pos: float, rho_neg: float) -> torch.Tensor:
    r""":math:`\eta = (\tilde\eta - \rho_-)/(1 - \rho_+ - \rho_-)`, clipped to ``[0, 1]`` (an
    estimated :math:`\tilde\eta` can leave ``[rho_neg, 1 - rho_pos]``).

    Examples:
        >>> clean_posterior(torch.tensor([0.1, 0.4, 0.7]), rho_pos=0.3, rho_neg=0.1)
        tensor([0.0000, 0.5000, 1.0000])
    """
    _check_rates("label_noise.clean_posterior(...)", rho_pos, rho_neg)
    return ((eta_noisy - rho_neg) / (1.0 - rho_pos - rho_neg)).clamp(0.0, 1.0)


def noisy_prior(prior: float, rho_pos: float, rho_neg: float) -> float:
    r""":math:`\tilde\pi = \rho_- + (1 - \rho_+ - \rho_-)\,\pi`: the fraction of noisy labels 1.

    Examples:
        >>> round(noisy_prior(0.5, rho_pos=0.3, rho_neg=0.1), 12)
        0.4
    """
    where = "label_noise.noisy_prior(...)"
    _check_rates(where, rho_pos, rho_neg)
    _check_probability(where, "prior", prior)
    return rho_neg + (1.0 - rho_pos - rho_neg) * prior


def clean_prior(noisy_prior: float, rho_pos: float, rho_neg: float) -> float:
    r""":math:`\pi = (\tilde\pi - \rho_-)/(1 - \rho_+ - \rho_-)`, clipped to ``[0, 1]``.

    Examples:
        >>> round(clean_prior(0.4, rho_pos=0.3, rho_neg=0.1), 12)
        0.5
    """
    where = "label_noise.clean_prior(...)"
    _check_rates(where, rho_pos, rho_neg)
    _check_probability(where, "noisy_prior", noisy_prior)
    return min(1.0, max(0.0, (noisy_prior - rho_neg) / (1.0 - rho_pos - rho_neg)))


def clean_threshold(
    rho_pos: float, rho_neg: float, *, measure: str = "error", prior: float | None = None
) -> float:
    r"""The threshold on the noisy posterior :math:`\tilde\eta` whose classifier
    :math:`1[\tilde\eta(x) > \tilde t\,]` is the clean Bayes classifier for ``measure``.

    * ``"error"`` (0-1 error): :math:`\tilde t = (1 - \rho_+ + \rho_-)/2`, the image of
      :math:`\eta = 1/2`.
    * ``"balanced"`` (balanced error): :math:`\tilde t = \tilde\pi = \rho_- + (1 - \rho_+ -
      \rho_-)\,\pi`, the image of :math:`\eta = \pi`; needs the clean ``prior`` :math:`\pi`
      (equivalently: threshold at the fraction of noisy labels 1, no rates needed).

    Examples:
        >>> round(clean_threshold(0.3, 0.1), 12)  # (1 - 0.3 + 0.1) / 2
        0.4
        >>> round(clean_threshold(0.3, 0.1, measure="balanced", prior=0.2), 12)  # 0.1 + 0.6 * 0.2
        0.22
    """
    where = "label_noise.clean_threshold(...)"
    _check_rates(where, rho_pos, rho_neg)
    if measure == "error":
        if prior is not None:
            raise HypergradientError(
                f"{where}: measure='error' does not use `prior` (got {prior!r}); the 0-1 "
                f"threshold is (1 - rho_pos + rho_neg) / 2. Pass measure='balanced' to use it."
            )
        return (1.0 - rho_pos + rho_neg) / 2.0
    if measure == "balanced":
        if prior is None:
            raise HypergradientError(
                f"{where}: measure='balanced' needs the clean class prior `prior` = P(y = 1) "
                f"(or threshold the noisy posterior at the fraction of noisy labels 1)."
            )
        return noisy_prior(prior, rho_pos, rho_neg)
    raise HypergradientError(f"{where}: `measure` must be 'error' or 'balanced', got {measure!r}.")


@dataclass(frozen=True)
class NoiseRates:
    """Estimated flip rates ``rho_pos`` = P(noisy 0 | clean 1), ``rho_neg`` = P(noisy 1 |
    clean 0) and the clean class prior ``prior`` = P(clean 1) (None when no noisy labels were
    given to estimate it).

    Examples:
        What :func:`estimate_noise_rates` returns; a frozen record:

        >>> import torch
        >>> from hypergradient import label_noise
        >>> eta_noisy = label_noise.noisy_posterior(torch.linspace(0, 1, 11), 0.3, 0.1)
        >>> rates = label_noise.estimate_noise_rates(eta_noisy, torch.tensor([1, 0, 0, 0, 1]))
        >>> round(rates.rho_pos, 4), round(rates.rho_neg, 4), round(rates.prior, 4)
        (0.3, 0.1, 0.5)
        >>> label_noise.NoiseRates(rho_pos=0.2, rho_neg=0.1)  # no labels: no prior
        NoiseRates(rho_pos=0.2, rho_neg=0.1, prior=None)
        >>> rates.rho_pos = 0.0
        Traceback (most recent call last):
        ...
        dataclasses.FrozenInstanceError: cannot assign to field 'rho_pos'
    """

    rho_pos: float
    rho_neg: float
    prior: float | None = None


def estimate_noise_rates(
    eta_noisy: torch.Tensor,
    noisy_labels: torch.Tensor | None = None,
    *,
    quantile: float = 0.0,
) -> NoiseRates:
    r"""Flip rates from the range of an estimated noisy posterior (Menon et al. 2015, Sec. 6).

    .. math::
        \hat\rho_- = Q_q(\hat{\tilde\eta}), \qquad \hat\rho_+ = 1 - Q_{1-q}(\hat{\tilde\eta}),
        \qquad \hat\pi = \frac{\bar{\tilde y} - \hat\rho_-}{1 - \hat\rho_+ - \hat\rho_-},

    with :math:`Q_q` the ``q``-quantile over the points (``q = 0``: the minimum and maximum)
    and :math:`\bar{\tilde y}` the fraction of noisy labels 1.  Consistent when the clean
    posterior reaches 0 and 1 (see the module docstring) and the posterior estimate is.

    Args:
        eta_noisy: ``(n,)`` estimates of :math:`P(\tilde y = 1 \mid x)` in ``[0, 1]``, best on
            points the estimator was not fitted to (the extremes of the fitted points are
            over-fitted).
        noisy_labels: optional ``(m,)`` noisy labels in ``{0, 1}`` for the prior.
        quantile: ``q`` in ``[0, 0.5)``; a small positive value (e.g. ``0.05``) trades a
            little bias for much less variance.

    Returns:
        :class:`NoiseRates`.  Cost: one sort of ``n`` numbers.

    Examples:
        >>> eta = noisy_posterior(torch.linspace(0, 1, 11), rho_pos=0.3, rho_neg=0.1)
        >>> rates = estimate_noise_rates(eta, torch.tensor([1, 0, 0, 0, 1]))
        >>> round(rates.rho_pos, 6), round(rates.rho_neg, 6), round(rates.prior, 6)
        (0.3, 0.1, 0.5)
    """
    where = "label_noise.estimate_noise_rates(...)"
    if not isinstance(eta_noisy, torch.Tensor) or eta_noisy.dim() != 1 or eta_noisy.numel() < 2:
        got = tuple(eta_noisy.shape) if isinstance(eta_noisy, torch.Tensor) else type(eta_noisy)
        raise HypergradientError(
            f"{where}: `eta_noisy` must be a 1-D tensor of at least 2 posterior estimates, got "
            f"{got}."
        )
    if not eta_noisy.is_floating_point() or not bool(((eta_noisy >= 0) & (eta_noisy <= 1)).all()):
        raise HypergradientError(
            f"{where}: `eta_noisy` must hold probabilities in [0, 1] (apply a sigmoid to "
            f"logits first), got values in [{float(eta_noisy.min())}, {float(eta_noisy.max())}]."
        )
    if (
        isinstance(quantile, bool)
        or not isinstance(quantile, (int, float))
        or not (0 <= quantile < 0.5)
    ):
        raise HypergradientError(f"{where}: `quantile` must be in [0, 0.5), got {quantile!r}.")
    values = eta_noisy.detach().double()
    rho_neg = float(torch.quantile(values, quantile))
    rho_pos = 1.0 - float(torch.quantile(values, 1.0 - quantile))
    if rho_pos + rho_neg >= 1:
        raise HypergradientError(
            f"{where}: the estimated posterior is flat (range [{rho_neg:.4g}, "
            f"{1 - rho_pos:.4g}]): the classifier learned nothing from the noisy labels, so the "
            f"rates cannot be read off it; train it longer or check the labels."
        )
    prior = None
    if noisy_labels is not None:
        labels = torch.as_tensor(noisy_labels)
        if labels.numel() == 0 or not bool(((labels == 0) | (labels == 1)).all()):
            raise HypergradientError(
                f"{where}: `noisy_labels` must be a non-empty tensor of 0s and 1s, got "
                f"{labels.numel()} values with {labels.unique()[:5].tolist()} among them."
            )
        prior = clean_prior(float(labels.double().mean()), rho_pos, rho_neg)
    return NoiseRates(rho_pos=rho_pos, rho_neg=rho_neg, prior=prior)


def flip_labels(
    labels: torch.Tensor,
    rho_pos: float,
    rho_neg: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Class-conditional label noise: every 1 becomes 0 with probability ``rho_pos``, every 0
    becomes 1 with probability ``rho_neg``, independently (same shape and dtype as ``labels``).

    Examples:
        >>> y = torch.tensor([0, 1] * 5000)
        >>> noisy = flip_labels(y, 0.3, 0.1, generator=torch.Generator().manual_seed(0))
        >>> abs(float((noisy[y == 1] == 0).float().mean()) - 0.3) < 0.03
        True
    """
    where = "label_noise.flip_labels(...)"
    _check_rates(where, rho_pos, rho_neg)
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise HypergradientError(f"{where}: `labels` must hold 0s and 1s only.")
    u = torch.rand(labels.shape, generator=generator, dtype=torch.float64)
    flip_prob = torch.where(labels == 1, rho_pos, rho_neg).to(torch.float64)
    return torch.where(u < flip_prob, 1 - labels, labels)
