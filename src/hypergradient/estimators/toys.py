r"""Unrolled toy systems whose (smoothed) meta-gradients are known exactly.

They test the estimators and show their bias and variance
(``benchmarks/estimator_bias_variance.py``).  All three are pure, vmap-able systems (their
noise is drawn in ``init``), so they run with ``vectorize=True``.

* :class:`AffineRecurrence` -- :math:`x_{t+1} = a x_t + \theta + \nu_t`, quadratic loss.
  The meta-objective is quadratic in :math:`\theta`, so every Gaussian smoothing leaves its
  gradient unchanged: :meth:`~AffineRecurrence.gradient` is the target of every unbiased
  estimator, and :meth:`~AffineRecurrence.truncated_backprop_gradient` is what truncated
  back-propagation converges to instead.
* :class:`PowerRecurrence` -- :math:`x_{t+1} = a x_t`, loss :math:`x_{t+1}^2/2`, with
  :math:`\theta = a`: not quadratic, so smoothing changes the gradient, and
  :meth:`~PowerRecurrence.smoothed_gradient` gives it in closed form (Gaussian moments)
  for one perturbation per episode (ES) or one per truncation (PES).
* :class:`LogisticMap` -- :math:`x_{t+1} = r x_t (1 - x_t)` with :math:`r = 4\,
  \mathrm{sigmoid}(\theta)`: stable (back-propagation has the lower variance) or chaotic
  (ES has), the two regimes of Metz et al. (2019)'s mixed estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import final

import torch

from .._errors import HypergradientError
from ._system import AbstractUnrolledSystem, check_horizon


def _check_positive_float(where: str, name: str, value: object, *, allow_zero=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise HypergradientError(f"{where}: {name} must be a finite float {bound}, got {value!r}.")


def _check_windows(where: str, horizon: int, truncation_length: int | None) -> int:
    length = horizon if truncation_length is None else truncation_length
    if (
        not isinstance(length, int)
        or isinstance(length, bool)
        or length < 1
        or horizon % length != 0
    ):
        raise HypergradientError(
            f"{where}: truncation_length must divide horizon={horizon} (so that every "
            f"episode is split into whole truncations), got {truncation_length!r}."
        )
    return length


@final
@dataclass(frozen=True, eq=False)
class AffineRecurrence(AbstractUnrolledSystem):
    r"""A linear recurrence driven by :math:`\theta`, with a quadratic loss on its trajectory.

    .. math::

        x_0 = x_{\mathrm{init}}, \qquad x_{t+1} = a\,x_t + \theta + \nu_t, \qquad
        \ell_t = \frac{1}{2d}\lVert x_{t+1} - c \rVert^2, \qquad
        \nu_t \sim \mathcal N(0, \eta^2 I_d) \text{ drawn per episode}.

    ``theta``: a tensor of shape ``(dim,)``.  State: ``{"x": (dim,), "noise": (horizon, dim)}``.

    Exact answers (:math:`S_k = \sum_{j<k} a^j`, :math:`\bar x_t` the noise-free
    trajectory; the noise has mean zero and enters the gradients linearly):

    .. math::

        \nabla L = \frac{1}{T d} \sum_{t=1}^{T} (\bar x_t - c)\, S_t, \qquad
        \mathbb E\, \hat g_{\mathrm{TBPTT}} = \frac{1}{T d} \sum_{t=1}^{T} (\bar x_t - c)\,
        S_{t - t_0(t)},

    where :math:`t_0(t)` is the first step of the truncation that produces :math:`x_t`
    (truncated back-propagation sees :math:`dx_t/d\theta = S_{t-t_0}` instead of
    :math:`S_t`).  For :math:`a > 0` and a trajectory below its target, the truncated
    gradient underestimates the full one.

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import AffineRecurrence, FullBackprop
        >>> system = AffineRecurrence(horizon=5, dim=2, a=0.5)
        >>> state = system.init(torch.Generator().manual_seed(0))
        >>> tuple(state["x"].shape), tuple(state["noise"].shape)
        ((2,), (5, 2))
        >>> est, theta, gen = FullBackprop(system), torch.zeros(2), torch.Generator()
        >>> out, _ = est.estimate(theta, est.init(theta, gen), gen)
        >>> bool(torch.allclose(out.grad, system.gradient(theta), rtol=1e-4, atol=1e-6))
        True
        >>> truncated = system.truncated_backprop_gradient(theta, 1)  # K = 1: biased
        >>> bool((truncated.abs() < system.gradient(theta).abs()).all())  # underestimates
        True
    """

    horizon: int
    dim: int = 1
    a: float = 0.9
    x_init: float = 0.0
    target: float = 1.0
    noise_scale: float = 0.0

    def __post_init__(self):
        where = f"AffineRecurrence(horizon={self.horizon!r}, ...)"
        check_horizon(where, self.horizon)
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise HypergradientError(f"{where}: dim must be an int >= 1, got {self.dim!r}.")
        for name in ("a", "x_init", "target"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HypergradientError(f"{where}: {name} must be a finite float, got {value!r}.")
        _check_positive_float(where, "noise_scale", self.noise_scale, allow_zero=True)

    def init(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        dtype = torch.get_default_dtype()
        noise = torch.randn(
            (self.horizon, self.dim), generator=generator, dtype=dtype, device=generator.device
        )
        device = torch.empty(0).device
        return {
            "x": torch.full((self.dim,), float(self.x_init), dtype=dtype, device=device),
            "noise": (self.noise_scale * noise).to(device),
        }

    def step(self, state, theta, t):
        x = self.a * state["x"] + theta + state["noise"][t]
        loss = 0.5 * ((x - self.target) ** 2).mean()
        return {"x": x, "noise": state["noise"]}, loss

    def _sums(self, theta: torch.Tensor, truncation_length: int | None, where: str):
        length = _check_windows(where, self.horizon, truncation_length)
        theta = theta.detach()
        x = torch.full_like(theta, float(self.x_init))
        full = trunc = torch.zeros_like(theta)
        s_full = 0.0
        for t in range(self.horizon):
            x = self.a * x + theta
            s_full = self.a * s_full + 1.0  # S_{t+1}
            k = t % length + 1  # steps since the truncation began, this one included
            s_trunc = sum(self.a**j for j in range(k))
            full = full + (x - self.target) * s_full
            trunc = trunc + (x - self.target) * s_trunc
        scale = 1.0 / (self.horizon * self.dim)
        return full * scale, trunc * scale

    def gradient(self, theta: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla L(\theta)`, equal to the gradient of every Gaussian smoothing of
        :math:`L` (quadratic objective).  Cost :math:`O(T d)`."""
        return self._sums(theta, None, "AffineRecurrence.gradient(...)")[0]

    def truncated_backprop_gradient(
        self, theta: torch.Tensor, truncation_length: int
    ) -> torch.Tensor:
        """The mean of truncated back-propagation's estimates over an episode's truncations
        (``truncation_length`` must divide ``horizon``)."""
        where = "AffineRecurrence.truncated_backprop_gradient(...)"
        return self._sums(theta, truncation_length, where)[1]


def gaussian_moment(mean: torch.Tensor, sigma: float, n: int) -> torch.Tensor:
    r""":math:`\mathbb E[(m + \sigma z)^n]`, :math:`z \sim \mathcal N(0,1)` (differentiable).

    .. math:: \mathbb E[(m+\sigma z)^n] = \sum_{k \text{ even}} \binom{n}{k} m^{n-k}
        \sigma^k (k-1)!!

    Examples:
        >>> import torch
        >>> float(gaussian_moment(torch.tensor(1.0), 2.0, 2))  # m^2 + sigma^2
        5.0
    """
    total = torch.zeros_like(mean)
    for k in range(0, n + 1, 2):
        double_factorial = math.prod(range(k - 1, 0, -2))
        total = total + math.comb(n, k) * mean ** (n - k) * sigma**k * double_factorial
    return total


@final
@dataclass(frozen=True, eq=False)
class PowerRecurrence(AbstractUnrolledSystem):
    r"""A multiplicative recurrence: :math:`x_{t+1} = a\,x_t`, :math:`\ell_t = x_{t+1}^2/2`.

    ``theta = {"a": 0-d tensor}``.  The meta-objective
    :math:`L(a) = \frac{x_0^2}{2T}\sum_{t=1}^{T} a^{2t}` is a polynomial, so its Gaussian
    smoothings are polynomials too (:func:`gaussian_moment`).  Smoothed with an independent
    perturbation :math:`\epsilon_w` per truncation :math:`w` of length :math:`K` (PES's
    objective; :math:`K = T` gives ES's single perturbation per episode), step :math:`t`
    (1-based) of truncation :math:`w = \lfloor (t-1)/K \rfloor` has
    :math:`x_t = x_0 \prod_{w'<w} a_{w'}^K \, a_w^{\,t - wK}`, and by independence

    .. math::

        \mathbb E\, \ell_t = \frac{x_0^2}{2}\, \big(M_{2K}\big)^{w}\, M_{2(t - wK)},
        \qquad M_n = \mathbb E[(a + \sigma z)^n].

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import FullBackprop, PowerRecurrence
        >>> one_step = PowerRecurrence(horizon=1)  # L(a) = a^2 / 2, smoothed: (a^2 + s^2) / 2
        >>> round(float(one_step.smoothed_loss({"a": torch.tensor(1.0)}, sigma=0.5)), 4)
        0.625
        >>> system, theta = PowerRecurrence(horizon=3), {"a": torch.tensor(0.9)}
        >>> est, gen = FullBackprop(system), torch.Generator()
        >>> out, _ = est.estimate(theta, est.init(theta, gen), gen)
        >>> exact = system.smoothed_gradient(theta, sigma=0.0)["a"]  # sigma = 0: plain gradient
        >>> bool(torch.allclose(out.grad["a"], exact, rtol=1e-4, atol=1e-6))
        True
    """

    horizon: int
    x_init: float = 1.0

    def __post_init__(self):
        where = f"PowerRecurrence(horizon={self.horizon!r}, ...)"
        check_horizon(where, self.horizon)
        if not isinstance(self.x_init, (int, float)) or not math.isfinite(self.x_init):
            raise HypergradientError(
                f"{where}: x_init must be a finite float, got {self.x_init!r}."
            )

    def init(self, generator: torch.Generator) -> torch.Tensor:
        return torch.tensor(float(self.x_init), dtype=torch.get_default_dtype())

    def step(self, state, theta, t):
        x = theta["a"] * state
        return x, 0.5 * x**2

    def smoothed_loss(
        self, theta: dict[str, torch.Tensor], sigma: float, truncation_length: int | None = None
    ) -> torch.Tensor:
        r""":math:`\mathbb E\, L(a + \epsilon_1, \dots)` with one perturbation per truncation."""
        where = "PowerRecurrence.smoothed_loss(...)"
        _check_positive_float(where, "sigma", sigma, allow_zero=True)
        length = _check_windows(where, self.horizon, truncation_length)
        a = theta["a"]
        full = gaussian_moment(a, sigma, 2 * length)
        total = torch.zeros_like(a)
        for t in range(1, self.horizon + 1):
            w = (t - 1) // length
            total = total + full**w * gaussian_moment(a, sigma, 2 * (t - w * length))
        return 0.5 * self.x_init**2 * total / self.horizon

    def smoothed_gradient(
        self, theta: dict[str, torch.Tensor], sigma: float, truncation_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The gradient of :meth:`smoothed_loss` (``sigma=0``: the plain gradient)."""
        a = theta["a"].detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.smoothed_loss({"a": a}, sigma, truncation_length), a)
        return {"a": g}


@final
@dataclass(frozen=True, eq=False)
class LogisticMap(AbstractUnrolledSystem):
    r"""The logistic map with a learnable rate: stable or chaotic depending on :math:`\theta`.

    .. math::

        r = 4\,\mathrm{sigmoid}(\theta), \qquad x_{t+1} = r\,x_t (1 - x_t), \qquad
        \ell_t = x_{t+1}, \qquad x_0 \sim \mathcal U(0.2, 0.8) \text{ per episode}.

    :math:`\theta` is the unconstrained coordinate of :math:`r \in (0, 4)`, so every
    perturbation keeps the orbit in :math:`[0, 1]` and the loss bounded.  For :math:`r < 3`
    the orbit settles on a fixed point and back-propagated gradients are tame; for
    :math:`r \approx 3.8` it is chaotic (Lyapunov exponent about 0.43), the loss is a
    rough function of :math:`\theta` and back-propagated gradients grow like
    :math:`e^{0.43\,T}`, while ES's, bounded by the loss, do not: the pathology of Metz et
    al. (2019) in one dimension.  ``theta``: a 0-d tensor.  No closed form; used for
    variances.

    Examples:
        >>> import torch
        >>> from hypergradient.estimators import FullBackprop, LogisticMap
        >>> est = FullBackprop(LogisticMap(horizon=30), num_particles=8)
        >>> gen, size = torch.Generator().manual_seed(0), {}
        >>> for rate in (2.5, 3.8):  # a stable fixed point, then chaos
        ...     theta = LogisticMap.theta_for_rate(rate)
        ...     out, _ = est.estimate(theta, est.init(theta, gen), gen)
        ...     size[rate] = float(out.samples.abs().max())
        >>> bool(size[3.8] > 100 * size[2.5])  # back-propagated gradients explode in chaos
        True
    """

    horizon: int

    def __post_init__(self):
        check_horizon(f"LogisticMap(horizon={self.horizon!r})", self.horizon)

    def init(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        u = torch.rand(
            (), generator=generator, dtype=torch.get_default_dtype(), device=generator.device
        )
        return {"x": (0.2 + 0.6 * u).to(torch.empty(0).device)}

    def step(self, state, theta, t):
        x = 4.0 * torch.sigmoid(theta) * state["x"] * (1.0 - state["x"])
        return {"x": x}, x

    @staticmethod
    def theta_for_rate(rate: float) -> torch.Tensor:
        r"""The :math:`\theta` with :math:`4\,\mathrm{sigmoid}(\theta) = ` ``rate``."""
        if not 0 < rate < 4:
            raise HypergradientError(
                f"LogisticMap.theta_for_rate(rate={rate!r}): the rate must be in (0, 4)."
            )
        return torch.logit(torch.tensor(rate / 4.0, dtype=torch.get_default_dtype()))
