r"""EvoGrad: a first-order hypergradient from a few perturbed copies of the weights.

Bohdal, Yang, Hospedales (NeurIPS 2021).  At the current inner weights :math:`\theta`
(treated as constants), draw :math:`K` perturbations :math:`\varepsilon_k` (Rademacher
:math:`\sigma\,\mathrm{sign}(\mathcal N(0, I))` as in the authors' code, or Gaussian
:math:`\mathcal N(0, \sigma^2 I)` as in the paper) and score the copies
:math:`\theta_k = \theta + \varepsilon_k` by the training loss, which depends on the
hyperparameters :math:`\lambda`:

.. math::

    \ell_k(\lambda) = L(\theta_k, \lambda), \qquad
    w(\lambda) = \mathrm{softmax}\big(-\ell(\lambda)/\tau\big), \qquad
    \theta^*(\lambda) = \sum_k w_k \theta_k = \theta + \sum_k w_k \varepsilon_k .

The hypergradient is the exact derivative of :math:`E(\theta^*(\lambda), \lambda)`, where
:math:`\lambda` reaches :math:`\theta^*` only through the softmax weights (the copies are
constants, so no second derivative of :math:`L` ever appears):

.. math::

    \hat g = \nabla_\lambda E(\theta^*, \lambda)
        - \frac1\tau \sum_k w_k\,(a_k - \bar a)\, \nabla_\lambda \ell_k, \qquad
    a_k = \nabla_\theta E(\theta^*, \lambda)\cdot\varepsilon_k,\quad \bar a = \sum_j w_j a_j .

**What it estimates.** Expanding in :math:`\sigma` (noise with covariance
:math:`\sigma^2 I`, independent copies, :math:`\tau` fixed), the combined weights are on
average one SGD step, :math:`\mathbb E[\theta^*] = \theta - \alpha\nabla_\theta L + O(\sigma^3)`,
and

.. math::

    \mathbb E[\hat g] = \frac{d}{d\lambda} E\big(\theta - \alpha \nabla_\theta L(\theta,
        \lambda), \lambda\big) + O(\sigma^3), \qquad \alpha = \frac{\sigma^2 (K-1)}{K\tau},

the one-step unrolled (look-ahead) hypergradient with step :math:`\alpha` (to first order
in :math:`\alpha`: :math:`\nabla_\lambda E - \alpha(\partial^2_{\lambda\theta} L\,
\nabla_\theta E + \partial^2_{\lambda\theta} E\,\nabla_\theta L)`).  The expectation over
:math:`\varepsilon` of :math:`\sum_k w_k (a_k - \bar a) \nabla_\lambda\ell_k` picks the
mixed derivative :math:`\partial^2_{\lambda\theta} L` out of :math:`\nabla_\lambda
\ell_k \approx \nabla_\lambda L + \partial^2_{\lambda\theta} L\,\varepsilon_k` without ever
forming it.  A single estimate (``K = 2``) is noisy: use Adam (or another normalising
optimizer) on the hyperparameters, as the paper does.

**Cost.** ``K`` forward passes of ``inner_loss`` and one of ``outer_loss`` (``K + 1`` in
all), each followed by one backward pass through its own graph: the same work as one
backward pass through all of them, with no Hessian-vector product and no ``create_graph``.
The training passes go back to the hyperparameters only (the copies are constants, so no
weight gradients); the validation pass yields :math:`\nabla_\theta E` at :math:`\theta^*`
(hence every :math:`a_k`) and the direct term.  Memory: the perturbations, O(K * params);
the ``K`` gradients :math:`\nabla_\lambda \ell_k`, O(K * hparams); and **one** forward
graph at a time, since each copy's gradient is taken right after its forward pass (the
coefficients of the chain rule are only known at the end, but they are scalars).  Nothing
grows with the length of the training run.

References:
    Bohdal, Yang, Hospedales (2021), EvoGrad: Efficient Gradient-Based Meta-Learning and
    Hyperparameter Optimization, NeurIPS.  Code: github.com/ondrejbohdal/evograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .._errors import HypergradientError, check_scalar_loss
from ._checks import check_callable, check_loss_dtype, check_params_hparams
from .methods import AbstractHypergradientMethod, register_method

_WHERE = "hypergradient.evograd_hypergrad(...)"
_NOISES = ("rademacher", "gaussian")


@dataclass(frozen=True)
class EvoGradDetails:
    """What one EvoGrad estimate looked at (for diagnostics and tests).

    ``losses``: shape ``(K,)``, the training losses :math:`\\ell_k` of the copies;
    ``weights``: shape ``(K,)``, their softmax weights :math:`w_k` (sum to one);
    ``perturbations``: ``K`` dicts shaped like ``params``, the :math:`\\varepsilon_k`;
    ``outer_value``: :math:`E(\\theta^*, \\lambda)`, the validation loss at the combined weights.
    All detached.
    """

    losses: torch.Tensor
    weights: torch.Tensor
    perturbations: list[dict[str, torch.Tensor]]
    outer_value: torch.Tensor


def effective_step(copies: int, sigma: float, temperature: float) -> float:
    r""":math:`\alpha = \sigma^2 (K-1) / (K\tau)`: the SGD step EvoGrad mimics on average.

    For small :math:`\sigma`, :math:`\mathbb E[\theta^*] \approx \theta - \alpha
    \nabla_\theta L` and the expected EvoGrad hypergradient is the one-step unrolled
    hypergradient with this step (see the module docstring).
    """
    _check_options("hypergradient.effective_step(...)", copies, sigma, temperature)
    return sigma**2 * (copies - 1) / (copies * temperature)


def _check_options(
    where: str,
    copies: object,
    sigma: object,
    temperature: object,
    noise: object = "rademacher",
    generator: object = None,
) -> None:
    if not isinstance(copies, int) or isinstance(copies, bool) or copies < 2:
        raise HypergradientError(
            f"{where}: copies={copies!r}; expected an int >= 2 (with one copy its softmax "
            f"weight is always 1 and the hypergradient carries no information). The paper "
            f"uses copies=2."
        )
    for name, value in (("sigma", sigma), ("temperature", temperature)):
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise HypergradientError(
                f"{where}: {name}={value!r}; expected a positive finite float "
                f"(defaults: sigma=1e-3, temperature=0.05)."
            )
    if noise not in _NOISES:
        raise HypergradientError(
            f"{where}: noise={noise!r}; expected one of {list(_NOISES)} ('rademacher': "
            f"sigma * sign(N(0, I)), the authors' code; 'gaussian': N(0, sigma^2 I))."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise HypergradientError(
            f"{where}: generator must be a torch.Generator or None, got "
            f"{type(generator).__name__}. Use torch.Generator().manual_seed(seed)."
        )


def _draw(
    copies: int,
    like: torch.Tensor,
    sigma: float,
    noise: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """All perturbations at once, shape ``(copies, like.numel())``: entries ``+-sigma``
    (Rademacher) or ``N(0, sigma^2)``, dtype and device of ``like``.

    With a generator the noise is drawn on the generator's device (then moved), so a seeded
    CPU generator gives the same perturbations whatever device the weights live on.
    """
    shape = (copies, like.numel())
    device = like.device if generator is None else generator.device
    # filled in place: no integer or temporary copies of a (copies, n) tensor
    eps = torch.empty(shape, dtype=like.dtype, device=device)
    if noise == "rademacher":
        # {0, 1} -> {-sigma, +sigma}; both steps are exact in floating point
        eps.bernoulli_(0.5, generator=generator).mul_(2 * sigma).sub_(sigma)
    else:
        eps.normal_(0.0, sigma, generator=generator)
    return eps.to(like.device)


def _unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of a flat vector shaped like the dict ``like`` (same key order)."""
    parts = torch.split(flat, [v.numel() for v in like.values()])
    return {k: part.view(v.shape) for (k, v), part in zip(like.items(), parts)}


def evograd_hypergrad(
    inner_loss: Callable[[dict, dict], torch.Tensor],
    outer_loss: Callable[[dict, dict], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    hparams: Mapping[str, torch.Tensor],
    *,
    copies: int = 2,
    sigma: float = 1e-3,
    temperature: float = 0.05,
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
    return_details: bool = False,
):
    r"""EvoGrad hypergradient :math:`\hat g = dE(\theta^*(\lambda), \lambda)/d\lambda`.

    .. math::

        \theta^*(\lambda) = \theta + \sum_{k=1}^{K} w_k(\lambda)\,\varepsilon_k,\qquad
        w(\lambda) = \mathrm{softmax}_k\big(-L(\theta + \varepsilon_k, \lambda)/\tau\big)

    (module docstring: the closed form, and why its expectation is the one-step look-ahead
    hypergradient with step :func:`effective_step`).

    Args:
        inner_loss: ``inner_loss(params, hparams) -> scalar``, the training loss (one batch).
        outer_loss: ``outer_loss(params, hparams) -> scalar``, the validation loss.
        params: dict name -> tensor, the current weights :math:`\theta` (detached here, never
            modified).
        hparams: dict name -> tensor, :math:`\lambda`, same dtype as ``params``.
        copies: :math:`K \ge 2`, the number of perturbed copies (paper: 2).
        sigma: :math:`\sigma > 0`, the perturbation scale (paper: 1e-3).  Small next to the
            weights, large enough that the copies' losses differ well above round-off.
        temperature: :math:`\tau > 0` of the softmax (paper: 0.05); smaller is sharper.
        noise: ``"rademacher"`` (entries :math:`\pm\sigma`, the authors' code) or
            ``"gaussian"`` (:math:`\mathcal N(0, \sigma^2)`, the paper's text).
        generator: a ``torch.Generator`` for the noise (reproducible estimates); ``None``
            draws from the global RNG of the weights' device.
        return_details: also return an :class:`EvoGradDetails` (losses, weights,
            perturbations, validation loss at :math:`\theta^*`).

    Returns:
        dict shaped like ``hparams`` (detached), and the details when ``return_details``.

    Raises:
        HypergradientError: bad options or inputs, a non-finite loss, or a hyperparameter
            that affects neither loss (its hypergradient would be silently zero).

    Cost: ``copies`` forward and backward passes of ``inner_loss`` (backward to ``hparams``
    only), one of ``outer_loss``; memory O(copies * (params + hparams)) plus one forward graph.

    Examples:
        >>> import torch, hypergradient as hg
        >>> # L = (w - lam)^2 / 2 and E = w^2 / 2 at w = 1, lam = 0.  The one-step look-ahead
        >>> # w' = w - a (w - lam) has dE(w')/dlam = a w' = a (1 - a): on average EvoGrad
        >>> # returns that, with a = sigma^2 (K - 1) / (K tau) = 5e-5 here.
        >>> lam, w = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        >>> gen = torch.Generator().manual_seed(0)
        >>> draws = torch.cat([hg.evograd_hypergrad(
        ...     lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum(),
        ...     lambda p, h: 0.5 * (p["w"] ** 2).sum(), {"w": w}, {"lam": lam},
        ...     sigma=0.01, temperature=1.0, generator=gen)["lam"] for _ in range(1000)])
        >>> a = hg.hypergrad.evograd.effective_step(copies=2, sigma=0.01, temperature=1.0)
        >>> # each draw is ~0 or ~2a (do the two signs agree?): the standard error of the
        >>> # mean is a / sqrt(1000) = 0.03 a, and the tolerance is 3 of them
        >>> bool(abs(draws.mean() / (a * (1 - a)) - 1) < 0.1)
        True
    """
    check_callable(_WHERE, "inner_loss", inner_loss)
    check_callable(_WHERE, "outer_loss", outer_loss)
    _check_options(_WHERE, copies, sigma, temperature, noise, generator)
    dtype = check_params_hparams(_WHERE, params, hparams)
    theta = {k: v.detach() for k, v in params.items()}
    # The weights as one flat vector and all K perturbations as one (K, n) matrix: the copies
    # and their combination are then one op each, however many tensors the model has.
    flat = torch.cat([v.reshape(-1) for v in theta.values()])
    eps = _draw(copies, flat, float(sigma), noise, generator)
    hp = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    hparam_keys = list(hp)

    # 1. Each copy's training loss and its gradient in lambda, one copy at a time: only one
    #    copy's graph is alive at once, and what is kept is K values and K gradients shaped
    #    like hparams.  The copies are constants, so nothing here differentiates theta.
    loss_values, loss_grads = [], []
    with torch.enable_grad():
        for row in eps:
            value = inner_loss(_unflatten(flat + row, theta), hp)
            value = check_scalar_loss(_WHERE, "inner_loss", value)
            check_loss_dtype(_WHERE, "inner_loss", value, dtype)
            grads = (
                torch.autograd.grad(value, list(hp.values()), allow_unused=True)
                if value.requires_grad
                else (None,) * len(hp)
            )
            loss_values.append(value.detach())
            loss_grads.append(grads)
    losses = torch.stack(loss_values)
    weights = torch.softmax(-losses / temperature, dim=0)

    # 2. The validation loss at theta* = theta + sum_k w_k eps_k, differentiated in theta*
    #    (g*) and directly in lambda.  (theta + sum_k w_k eps_k rather than sum_k w_k theta_k:
    #    a_k = g* . eps_k is then computed directly, not as a small difference of the large
    #    products g* . theta_k, which float32 would swamp with round-off.)
    combined = (flat + weights @ eps).requires_grad_(True)
    del flat  # one weight-sized vector less during the validation pass
    with torch.enable_grad():
        outer_value = outer_loss(_unflatten(combined, theta), hp)
        outer_value = check_scalar_loss(_WHERE, "outer_loss", outer_value)
        check_loss_dtype(_WHERE, "outer_loss", outer_value, dtype)
        outer_grads = (
            torch.autograd.grad(outer_value, [combined, *hp.values()], allow_unused=True)
            if outer_value.requires_grad
            else (None,) * (1 + len(hp))
        )
    g_star, direct = outer_grads[0], outer_grads[1:]

    # 3. Chain rule through the softmax: dE/dl_k = -(1/tau) w_k (a_k - sum_j w_j a_j).
    a = eps @ g_star if g_star is not None else torch.zeros_like(losses)
    coef = -weights * (a - weights @ a) / temperature
    unused = [
        k
        for i, k in enumerate(hparam_keys)
        if direct[i] is None and all(grads[i] is None for grads in loss_grads)
    ]
    if unused:
        raise HypergradientError(
            f"{_WHERE}: hparams {unused} enter neither inner_loss nor outer_loss, so their "
            f"EvoGrad hypergradient would be silently zero. EvoGrad differentiates only "
            f"through the losses (not through an optimizer step): remove them from "
            f"`hparams`, or use them inside `inner_loss`."
        )
    result = {}
    for i, k in enumerate(hparam_keys):
        total = torch.zeros_like(hp[k]) if direct[i] is None else direct[i]
        for c, grads in zip(coef, loss_grads):
            if grads[i] is not None:
                total = total + c * grads[i]
        result[k] = total.detach()
    if not return_details:
        return result
    details = EvoGradDetails(
        losses=losses,
        weights=weights,
        perturbations=[_unflatten(row, theta) for row in eps],
        outer_value=outer_value.detach(),
    )
    return result, details


@register_method
@dataclass(frozen=True)
class EvoGrad(AbstractHypergradientMethod):
    r"""EvoGrad (Bohdal et al. 2021) as a method object for :class:`~hypergradient.BilevelTrainer`.

    ``hg.BilevelTrainer(..., method=hg.EvoGrad())`` estimates every hypergradient from
    ``copies`` perturbed copies of the current weights, weighted by a softmax of their training
    losses (:func:`evograd_hypergrad`; the math is in the module docstring).  The inner
    optimizer's ``lr`` and ``momentum`` are not used: EvoGrad takes no look-ahead step; on
    average it behaves like a one-step look-ahead with step
    :attr:`effective_step` :math:`= \sigma^2 (K-1)/(K\tau)`.

    Options: ``copies`` (K, default 2), ``sigma`` (1e-3), ``temperature`` (0.05), ``noise``
    (``"rademacher"`` or ``"gaussian"``), ``generator`` (a seeded ``torch.Generator`` for
    reproducible noise; it advances with every call.  ``None`` draws from the global RNG,
    which the trainer's checkpoints save, so resuming is exact only with ``None`` on CPU).

    Cost per hyper-step: ``copies + 1`` forward passes (the training batch ``copies`` times,
    the validation batch once), each with one backward pass; no second-order graph.  Memory:
    O(copies * (params + hparams)) plus one forward graph at a time.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> method = hg.EvoGrad(copies=2, sigma=1e-3, temperature=0.05,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> f"{method.effective_step:.1e}"  # sigma^2 (K - 1) / (K tau): the step it mimics
        '1.0e-05'
        >>> inner = lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum()
        >>> outer = lambda p, h: 0.5 * (p["w"] ** 2).sum()
        >>> g = method.hypergrad(inner, outer, {"w": torch.ones(3)}, {"lam": torch.zeros(3)},
        ...                      lr=0.1)  # lr is not used: no look-ahead step
        >>> tuple(g["lam"].shape), hg.hypergrad.get_method("evograd").copies
        ((3,), 2)
    """

    name: ClassVar[str] = "evograd"
    copies: int = 2
    sigma: float = 1e-3
    temperature: float = 0.05
    noise: str = "rademacher"
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        _check_options(
            "hypergradient.EvoGrad(...)",
            self.copies,
            self.sigma,
            self.temperature,
            self.noise,
            self.generator,
        )

    @property
    def effective_step(self) -> float:
        """The SGD step :math:`\\sigma^2 (K-1)/(K\\tau)` that EvoGrad mimics on average."""
        return effective_step(self.copies, self.sigma, self.temperature)

    def hypergrad(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0):
        return evograd_hypergrad(
            inner_loss,
            outer_loss,
            params,
            hparams,
            copies=self.copies,
            sigma=self.sigma,
            temperature=self.temperature,
            noise=self.noise,
            generator=self.generator,
        )
