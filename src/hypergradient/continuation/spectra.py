r"""Synthetic spectral functions, noisy Green's functions, and a fixed held-out test set.

Learned continuation methods are trained and judged on synthetic data: a spectrum
:math:`A(\omega) \ge 0` with :math:`\int A\,d\omega = 1` is drawn from a *family*, mapped to
:math:`G(\tau) = \int K(\tau, \omega) A(\omega)\,d\omega` by the problem's kernel
(:meth:`~hypergradient.continuation.kernels.Problem.forward`), and Gaussian noise is added.

* :data:`FAMILIES` and :func:`sample_spectra` -- random mixtures of Gaussians, Lorentzians,
  gapped two-band spectra, and a sharp quasiparticle peak on a broad background, tabulated on
  a :class:`~hypergradient.continuation.kernels.Grid` and normalised with its weights.
* :func:`add_noise` -- independent noise of one standard deviation per spectrum
  (``rel_sigma * max|G|``), or correlated noise with a given covariance.
* :class:`SpectralDataset`, :func:`make_dataset` -- spectra, clean and noisy :math:`G`, and
  the noise level, reproducible from one integer seed.
* :func:`write_test_set`, :func:`load_test_set` -- a held-out set on disk (plain tensors and a
  JSON manifest with a sha256 checksum), and :func:`split_by_family` to keep some families out
  of training altogether.

Every random draw comes from a ``torch.Generator``; :func:`make_dataset` derives one
generator per (family, purpose) from its seed, so a family's rows do not change when other
families are added to the list.

Examples:
    >>> import torch
    >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
    >>> from hypergradient.continuation.spectra import make_dataset
    >>> problem = Problem(tau=tau_grid(10.0, 21), beta=10.0, grid=uniform_grid(-8.0, 8.0, 161),
    ...                   statistics="fermionic")
    >>> data = make_dataset(problem, ("gaussians", "gapped"), 3, 1e-3, seed=0)
    >>> data.A.shape, data.G_noisy.shape, data.family[:4]
    (torch.Size([6, 161]), torch.Size([6, 21]), ['gaussians', 'gaussians', 'gaussians', 'gapped'])
    >>> torch.allclose((problem.grid.weights * data.A).sum(-1), torch.ones(6, dtype=torch.float64))
    True
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._errors import HypergradientError
from .._io import _temporary_beside, load_tensors, write_json_atomic
from .kernels import Grid, Problem, check_green, uniform_grid

__all__ = [
    "FAMILIES",
    "SpectralDataset",
    "add_noise",
    "load_test_set",
    "make_dataset",
    "sample_spectra",
    "split_by_family",
    "write_test_set",
]

FAMILIES = ("gaussians", "lorentzians", "gapped", "quasiparticle")
"""Names of the spectrum families that :func:`sample_spectra` draws from.

``"gaussians"`` (1-4 Gaussians), ``"lorentzians"`` (1-3 Lorentzians), ``"gapped"`` (two bands
with no weight in a gap around 0), ``"quasiparticle"`` (a sharp peak near 0 on two broad
bands); the parameter ranges are in :func:`sample_spectra`.

Examples:
    >>> import torch
    >>> from hypergradient.continuation.kernels import uniform_grid
    >>> from hypergradient.continuation.spectra import FAMILIES, sample_spectra
    >>> FAMILIES
    ('gaussians', 'lorentzians', 'gapped', 'quasiparticle')
    >>> grid = uniform_grid(-8.0, 8.0, 201)
    >>> for family in FAMILIES:
    ...     A = sample_spectra(family, 2, grid, generator=torch.Generator().manual_seed(0))
    ...     print(family, tuple(A.shape), bool((A >= 0).all()))
    gaussians (2, 201) True
    lorentzians (2, 201) True
    gapped (2, 201) True
    quasiparticle (2, 201) True
"""

# name of the tensor file and the manifest inside a test-set folder, and the manifest's format
_TENSOR_FILE = "test_set.pt"
_MANIFEST_FILE = "manifest.json"
_FORMAT = "hypergradient.continuation.test_set/1"
_MANIFEST_KEYS = ("problem", "families", "rel_sigmas", "tensor_file", "sha256")


# ---------------------------------------------------------------------------------------------
# spectrum families


def _half_width(grid: Grid, where: str) -> float:
    """Half-width ``L`` of the widest window ``[-L, L]`` inside the grid: the unit of every
    parameter range, so that spectra scale with the frequency window they live in."""
    omega = grid.omega
    if not isinstance(omega, Tensor) or omega.ndim != 1 or omega.numel() < 3:
        raise HypergradientError(
            f"{where}: grid.omega must be a 1-D tensor of at least 3 frequencies, got "
            f"{getattr(omega, 'shape', type(omega).__name__)}; build the grid with "
            f"uniform_grid or nonuniform_grid"
        )
    low, high = float(omega[0]), float(omega[-1])
    if not (low < 0.0 < high):
        raise HypergradientError(
            f"{where}: the spectra are placed around omega = 0 (the Fermi level), but the grid "
            f"spans [{low:g}, {high:g}]; use a grid with omega[0] < 0 < omega[-1], such as "
            f"uniform_grid(-8.0, 8.0, 401)"
        )
    return min(-low, high)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low, high, like: Tensor) -> Tensor:
    """Independent uniform draws in ``[low, high)`` in ``like``'s dtype (CPU generator)."""
    draw = torch.rand(shape, generator=generator, dtype=like.dtype)
    return (low + (high - low) * draw).to(like.device)


def _mixture_weights(generator: torch.Generator, n: int, k_max: int, like: Tensor) -> Tensor:
    """Weights ``(n, k_max)`` of mixtures of 1..k_max components (uniform count): each used
    component gets a weight in [0.2, 1) before normalisation, unused ones 0."""
    counts = torch.randint(1, k_max + 1, (n,), generator=generator).to(like.device)
    used = torch.arange(k_max, device=like.device) < counts[:, None]
    return _uniform(generator, (n, k_max), 0.2, 1.0, like) * used


def _gaussian(omega: Tensor, centre: Tensor, width: Tensor) -> Tensor:
    """Normal densities; ``centre``, ``width`` of shape (..., k) give (..., k, n_w)."""
    z = (omega - centre[..., None]) / width[..., None]
    return torch.exp(-0.5 * z * z) / (width[..., None] * math.sqrt(2.0 * math.pi))


def _lorentzian(omega: Tensor, centre: Tensor, half_width: Tensor) -> Tensor:
    """Cauchy densities ``(gamma / pi) / ((w - c)^2 + gamma^2)``, shape (..., k, n_w)."""
    g = half_width[..., None]
    return (g / math.pi) / ((omega - centre[..., None]) ** 2 + g * g)


def _semicircle(omega: Tensor, centre: Tensor, radius: Tensor) -> Tensor:
    """Semicircular bands ``sqrt(1 - ((w - c)/r)^2)`` (unnormalised), exactly 0 outside
    ``[c - r, c + r]``; shape (..., n_w) for ``centre``, ``radius`` of shape (...)."""
    z = (omega - centre[..., None]) / radius[..., None]
    return torch.sqrt(torch.clamp(1.0 - z * z, min=0.0))


def sample_spectra(family: str, n: int, grid: Grid, *, generator: torch.Generator) -> Tensor:
    r"""Draw ``n`` random normalised spectra of one family, tabulated on ``grid``.

    Every parameter is drawn uniformly from the range below, in units of the grid's half-width
    :math:`L = \min(-\omega_0, \omega_{-1})` (the numbers in brackets are for
    :math:`\omega \in [-8, 8]`, i.e. :math:`L = 8`). Mixture weights are drawn in [0.2, 1) and
    normalised; components with infinite support are truncated to the grid. Every spectrum
    is then divided by its quadrature :math:`\sum_j w_j A(\omega_j)`, so that
    ``(grid.weights * A).sum(-1) == 1`` to rounding and ``A >= 0`` exactly.

    * ``"gaussians"`` -- 1 to 4 Gaussians (count uniform), centres in :math:`[-0.5, 0.5]L`
      ([-4, 4]), standard deviations in :math:`[0.03, 0.15]L` ([0.24, 1.2]).
    * ``"lorentzians"`` -- 1 to 3 Lorentzians :math:`(\gamma/\pi) / ((\omega-c)^2+\gamma^2)`,
      centres in :math:`[-0.5, 0.5]L`, half-widths :math:`\gamma \in [0.02, 0.1]L`
      ([0.16, 0.8]); their tails are cut at the grid's ends and the rest renormalised.
    * ``"gapped"`` -- a gap :math:`(-\Delta_-, \Delta_+)` around 0 with exactly zero weight,
      :math:`\Delta_\pm \in [0.05, 0.2]L` ([0.4, 1.6]) drawn independently, flanked by two
      semicircular bands :math:`\propto \sqrt{1 - ((\omega - c)/r)^2}` whose inner edges are
      the gap edges, radii :math:`r_\pm \in [0.1, 0.3]L` ([0.8, 2.4]), weight of the lower band
      in [0.3, 0.7] (the upper band has the rest).
    * ``"quasiparticle"`` -- a sharp Gaussian peak, centre in :math:`[-0.025, 0.025]L`
      ([-0.2, 0.2]), standard deviation in :math:`[0.00625, 0.025]L` ([0.05, 0.2]), weight
      :math:`Z \in [0.2, 0.6]`, on a broad background of two Gaussian bands centred at
      :math:`-m_-` and :math:`+m_+`, :math:`m_\pm \in [0.15, 0.35]L` ([1.2, 2.8]), standard
      deviations in :math:`[0.08, 0.18]L` ([0.64, 1.44]), sharing :math:`1 - Z` with a fraction
      in [0.3, 0.7] for the lower band.

    The grid must contain 0 strictly inside and should resolve the narrowest widths (spacing
    below about half of them, e.g. 0.025 near 0 for ``"quasiparticle"`` on [-8, 8]);
    normalisation and positivity hold on any grid.

    Args:
        family: one of :data:`FAMILIES`.
        n: number of spectra (>= 1).
        grid: the real-frequency :class:`~hypergradient.continuation.kernels.Grid`; its
            ``omega`` dtype and device are those of the result.
        generator: a CPU ``torch.Generator``, the only source of randomness (same state, same
            spectra).

    Returns:
        ``A`` of shape ``(n, n_w)``: values :math:`A(\omega_j)` (a density, not multiplied by
        the weights).

    Cost: :math:`O(n \cdot k \cdot n_w)` time and memory, :math:`k \le 4` components.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import uniform_grid
        >>> from hypergradient.continuation.spectra import sample_spectra
        >>> grid = uniform_grid(-8.0, 8.0, 401)
        >>> A = sample_spectra("gapped", 5, grid, generator=torch.Generator().manual_seed(1))
        >>> A.shape
        torch.Size([5, 401])
        >>> torch.allclose((grid.weights * A).sum(-1), torch.ones(5, dtype=A.dtype))
        True
        >>> bool((A[:, 200] == 0).all())  # omega = 0 lies in every gap
        True
    """
    where = f"sample_spectra(family={family!r}, n={n!r})"
    if family not in FAMILIES:
        raise HypergradientError(
            f"{where}: unknown family {family!r}; expected one of {', '.join(FAMILIES)}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise HypergradientError(f"{where}: n must be a positive int; pass e.g. n=100")
    if not isinstance(generator, torch.Generator):
        raise HypergradientError(
            f"{where}: generator must be a torch.Generator, got {type(generator).__name__}; "
            f"pass generator=torch.Generator().manual_seed(0)"
        )
    L = _half_width(grid, where)
    omega = grid.omega
    weights = grid.weights
    u = _uniform  # short alias: every draw below is u(generator, shape, low, high, omega)

    if family == "gaussians":
        mix = _mixture_weights(generator, n, 4, omega)
        centre = u(generator, (n, 4), -0.5 * L, 0.5 * L, omega)
        width = u(generator, (n, 4), 0.03 * L, 0.15 * L, omega)
        A = (mix[..., None] * _gaussian(omega, centre, width)).sum(-2)
    elif family == "lorentzians":
        mix = _mixture_weights(generator, n, 3, omega)
        centre = u(generator, (n, 3), -0.5 * L, 0.5 * L, omega)
        gamma = u(generator, (n, 3), 0.02 * L, 0.1 * L, omega)
        A = (mix[..., None] * _lorentzian(omega, centre, gamma)).sum(-2)
    elif family == "gapped":
        gap_low = u(generator, (n,), 0.05 * L, 0.2 * L, omega)
        gap_high = u(generator, (n,), 0.05 * L, 0.2 * L, omega)
        radius_low = u(generator, (n,), 0.1 * L, 0.3 * L, omega)
        radius_high = u(generator, (n,), 0.1 * L, 0.3 * L, omega)
        weight_low = u(generator, (n,), 0.3, 0.7, omega)
        # a semicircle of radius r integrates to pi r / 2: divide so the weights are the bands'
        lower = _semicircle(omega, -gap_low - radius_low, radius_low) / radius_low[:, None]
        upper = _semicircle(omega, gap_high + radius_high, radius_high) / radius_high[:, None]
        A = weight_low[:, None] * lower + (1.0 - weight_low[:, None]) * upper
        # the bands end exactly at the gap edges; clear the open gap explicitly too, so that a
        # rounding error in the band's edge can never leak weight into it
        inside_gap = (omega > -gap_low[:, None]) & (omega < gap_high[:, None])
        A = A.masked_fill(inside_gap, 0.0)
    else:  # quasiparticle
        centre_qp = u(generator, (n,), -0.025 * L, 0.025 * L, omega)
        width_qp = u(generator, (n,), 0.00625 * L, 0.025 * L, omega)
        z = u(generator, (n,), 0.2, 0.6, omega)
        offset = u(generator, (n, 2), 0.15 * L, 0.35 * L, omega)
        width_bg = u(generator, (n, 2), 0.08 * L, 0.18 * L, omega)
        share_low = u(generator, (n,), 0.3, 0.7, omega)
        centre_bg = offset * torch.tensor([-1.0, 1.0], dtype=omega.dtype, device=omega.device)
        mix_bg = (1.0 - z)[:, None] * torch.stack([share_low, 1.0 - share_low], dim=-1)
        background = (mix_bg[..., None] * _gaussian(omega, centre_bg, width_bg)).sum(-2)
        peak = z[:, None] * _gaussian(omega, centre_qp[:, None], width_qp[:, None])[:, 0]
        A = peak + background

    mass = (weights * A).sum(-1, keepdim=True)
    if not bool(torch.isfinite(mass).all() and (mass > 0).all()):
        raise HypergradientError(
            f"{where}: a drawn spectrum has no weight on the grid ({omega.numel()} points on "
            f"[{float(omega[0]):g}, {float(omega[-1]):g}]); use a finer grid"
        )
    return A / mass


# ---------------------------------------------------------------------------------------------
# noise


def _check_noise_inputs(G: Tensor, covariance: Tensor | None, where: str) -> None:
    """``G`` (finite, real floating, ``(..., n_tau)``) and the covariance (symmetric positive
    definite ``(n_tau, n_tau)``), checked by ``check_green``. ``add_noise`` knows no problem,
    so it passes a stand-in whose only role is ``len(tau) = G.shape[-1]``."""
    if not isinstance(G, Tensor) or G.ndim < 1 or G.shape[-1] < 1:
        raise HypergradientError(
            f"{where}: G must be a floating tensor of shape (..., n_tau), got "
            f"{getattr(G, 'shape', type(G).__name__)}; pass problem.forward(A)"
        )
    dtype = G.dtype if G.is_floating_point() else torch.float64
    stand_in = Problem(
        tau=torch.zeros(G.shape[-1], dtype=dtype),
        beta=1.0,
        grid=uniform_grid(-1.0, 1.0, 2, dtype=dtype),
    )
    check_green(G, stand_in, covariance=covariance, where=where)


def _check_rel_sigma(rel_sigma: object, where: str) -> None:
    if (
        isinstance(rel_sigma, bool)
        or not isinstance(rel_sigma, (int, float))
        or not math.isfinite(rel_sigma)
        or rel_sigma < 0
    ):
        raise HypergradientError(
            f"{where}: rel_sigma must be a finite number >= 0 (or None with a covariance); "
            f"pass e.g. rel_sigma=1e-3"
        )


def add_noise(
    G: Tensor,
    rel_sigma: float | None,
    *,
    generator: torch.Generator,
    covariance: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Add Gaussian noise to Green's functions: independent with a relative level, or
    correlated with a given covariance.

    Independent (``covariance=None``): for each spectrum (each row of ``G``'s leading dims),

    .. math::
        G^{\text{noisy}}_i = G_i + \sigma\, z_i, \qquad
        \sigma = \texttt{rel\_sigma} \cdot \max_j |G_j|, \qquad z_i \sim \mathcal N(0, 1),

    one standard deviation for all :math:`\tau` points of a spectrum. This *floor* form is
    chosen over :math:`\sigma_i = \texttt{rel\_sigma}\,|G_i|` because Monte Carlo error bars are
    roughly uniform in :math:`\tau`, while :math:`|G(\tau)|` of a gapped spectrum at large
    :math:`\beta` falls by :math:`e^{-\beta\Delta/2}` in the middle: purely relative noise
    would make those points nearly exact (and give :math:`\sigma = 0` where :math:`G = 0`).
    For fermions :math:`G(0) + G(\beta) = 1`, so :math:`\sigma \ge \texttt{rel\_sigma}/2`.

    Correlated (``covariance`` :math:`C`, absolute, shape ``(n_tau, n_tau)``, symmetric
    positive definite; ``rel_sigma`` must then be ``None``): :math:`G^{\text{noisy}} = G + L z`
    with :math:`C = L L^T` the Cholesky factorisation and :math:`z \sim \mathcal N(0, I)`, so
    the noise has covariance exactly :math:`C`; ``sigma`` is :math:`\sqrt{C_{ii}}`. The
    covariance is validated by :func:`~hypergradient.continuation.kernels.check_green`.

    Args:
        G: noiseless Green's functions, shape ``(..., n_tau)``, finite.
        rel_sigma: relative noise level (>= 0; 0 returns ``G`` unchanged with ``sigma = 0``),
            or ``None`` with ``covariance``.
        generator: a CPU ``torch.Generator``, the only source of randomness.
        covariance: absolute noise covariance, or ``None`` for independent noise.

    Returns:
        ``(G_noisy, sigma)``, both of ``G``'s shape: the noisy data and the standard deviation
        of its noise at each point (pass it to the fitting routines as ``sigma``).

    Cost: :math:`O(\text{numel}(G))` independent; :math:`O(n_\tau^3 + \text{numel}(G)\, n_\tau)`
    correlated (one Cholesky factorisation, one triangular product per spectrum).

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.spectra import add_noise
        >>> G = torch.tensor([[0.5, 0.2, 0.1, 0.2, 0.5]], dtype=torch.float64)
        >>> G_noisy, sigma = add_noise(G, 1e-2, generator=torch.Generator().manual_seed(0))
        >>> G_noisy.shape, torch.allclose(sigma, torch.full_like(G, 5e-3))
        (torch.Size([1, 5]), True)
        >>> C = 1e-6 * (0.5 ** (torch.arange(5.0)[:, None] - torch.arange(5.0)).abs())
        >>> _, sigma = add_noise(G, None, generator=torch.Generator().manual_seed(0),
        ...                      covariance=C.double())
        >>> torch.allclose(sigma, torch.full_like(G, 1e-3))
        True
    """
    where = f"add_noise(rel_sigma={rel_sigma!r})"
    _check_noise_inputs(G, covariance, where)
    if not isinstance(generator, torch.Generator):
        raise HypergradientError(
            f"{where}: generator must be a torch.Generator, got {type(generator).__name__}; "
            f"pass generator=torch.Generator().manual_seed(0)"
        )
    if covariance is not None:
        if rel_sigma is not None:
            raise HypergradientError(
                f"{where}: with a covariance the noise level is the covariance itself, so "
                f"rel_sigma must be None; pass rel_sigma=None and scale the covariance instead"
            )
        # check_green accepted C as symmetric to rounding; factor its symmetric part
        covariance = covariance.to(dtype=G.dtype, device=G.device)
        cholesky = torch.linalg.cholesky(0.5 * (covariance + covariance.mT))
        z = torch.randn(G.shape, generator=generator, dtype=G.dtype).to(G.device)
        sigma = torch.sqrt(torch.diagonal(covariance)).expand_as(G).clone()
        return G + z @ cholesky.mT, sigma
    _check_rel_sigma(rel_sigma, where)
    scale = float(rel_sigma) * G.abs().amax(dim=-1, keepdim=True)
    sigma = scale.expand_as(G).clone()
    z = torch.randn(G.shape, generator=generator, dtype=G.dtype).to(G.device)
    return G + sigma * z, sigma


# ---------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True, eq=False)
class SpectralDataset:
    r"""Spectra with their clean and noisy Green's functions (one row per spectrum).

    Attributes:
        A: spectra, shape ``(n, n_w)``, on the problem's grid (normalised, >= 0).
        G: noiseless :math:`G = K_w A`, shape ``(n, n_tau)``.
        G_noisy: ``G`` plus noise, shape ``(n, n_tau)``.
        sigma: standard deviation of each point's noise, shape ``(n, n_tau)``
            (see :func:`add_noise`).
        family: the family name of each row, a list of ``n`` strings.
        rel_sigma: the relative noise level the noise was drawn with.

    Holding the tensors costs :math:`O(n (n_w + 3 n_\tau))` memory; nothing is computed.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.spectra import make_dataset
        >>> problem = Problem(tau=tau_grid(5.0, 11), beta=5.0, grid=uniform_grid(-8.0, 8.0, 81),
        ...                   statistics="fermionic")
        >>> data = make_dataset(problem, ("lorentzians",), 2, 1e-2, seed=3)
        >>> len(data), data.family, data.rel_sigma
        (2, ['lorentzians', 'lorentzians'], 0.01)
        >>> torch.allclose(data.G, problem.forward(data.A))
        True
    """

    A: Tensor
    G: Tensor
    G_noisy: Tensor
    sigma: Tensor
    family: list[str]
    rel_sigma: float

    def __post_init__(self) -> None:
        n = len(self.family)
        shapes = {
            "A": tuple(self.A.shape),
            "G": tuple(self.G.shape),
            "G_noisy": tuple(self.G_noisy.shape),
            "sigma": tuple(self.sigma.shape),
        }
        rows_ok = all(len(shape) == 2 and shape[0] == n for shape in shapes.values())
        if not rows_ok or not (shapes["G"] == shapes["G_noisy"] == shapes["sigma"]):
            raise HypergradientError(
                f"SpectralDataset: got shapes {shapes} and {n} family names; expected A "
                f"(n, n_w) and G, G_noisy, sigma all (n, n_tau) with n = len(family); build it "
                f"with make_dataset"
            )

    def __len__(self) -> int:
        return len(self.family)


def _child_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and labels: independent streams per (family,
    purpose), stable across runs, platforms and Python's hash randomisation."""
    digest = hashlib.sha256(repr((int(seed), *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_child_seed(seed, *parts))


def _check_families(families: Sequence[str] | str, where: str) -> tuple[str, ...]:
    names = (families,) if isinstance(families, str) else tuple(families)
    unknown = [name for name in names if name not in FAMILIES]
    if not names or unknown:
        raise HypergradientError(
            f"{where}: families must be a non-empty selection of {FAMILIES}, got {names!r}; "
            f"pass e.g. families=('gaussians', 'gapped')"
        )
    if len(set(names)) != len(names):
        raise HypergradientError(
            f"{where}: families {names!r} repeats a name (its rows would be identical copies); "
            f"list each family once and raise n_per_family instead"
        )
    return names


def _check_problem_type(problem: object, where: str) -> None:
    if not isinstance(problem, Problem):
        raise HypergradientError(
            f"{where}: problem must be a continuation Problem, got {type(problem).__name__}; "
            f"build one with Problem(tau=tau_grid(beta, n_tau), beta=beta, grid=uniform_grid(...))"
        )


def _check_seed_and_count(seed: object, n_per_family: object, where: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise HypergradientError(f"{where}: seed must be an int >= 0, got {seed!r}")
    if isinstance(n_per_family, bool) or not isinstance(n_per_family, int) or n_per_family < 1:
        raise HypergradientError(
            f"{where}: n_per_family must be a positive int, got {n_per_family!r}"
        )


def _noisy(problem: Problem, A: Tensor, family: str, rel_sigma: float, seed: int):
    """``G``, ``G_noisy``, ``sigma`` for one family's block, noise from its own stream."""
    G = problem.forward(A)
    G_noisy, sigma = add_noise(
        G, rel_sigma, generator=_generator(seed, "noise", family, float(rel_sigma))
    )
    return G, G_noisy, sigma


def make_dataset(
    problem: Problem,
    families: Sequence[str] | str,
    n_per_family: int,
    rel_sigma: float,
    *,
    seed: int,
) -> SpectralDataset:
    r"""Draw ``n_per_family`` spectra of each family, map them through the kernel, add noise.

    Row blocks follow ``families``' order. For each family :math:`f` the spectra come from
    :func:`sample_spectra` with a generator seeded from ``(seed, "spectra", f)``, and the noise
    from :func:`add_noise` (independent, level ``rel_sigma``) with one seeded from
    ``(seed, "noise", f, rel_sigma)`` (seeds derived through sha256). So the same arguments give
    the same tensors bit for bit, a family's block does not depend on the other families
    listed, and the same spectra appear at every noise level. Keep the seeds of training data
    and of the held-out set (:func:`write_test_set`) apart.

    Args:
        problem: the :class:`~hypergradient.continuation.kernels.Problem` (grid, tau, kernel).
        families: names from :data:`FAMILIES` (a single name is accepted too), no repeats.
        n_per_family: spectra per family (>= 1).
        rel_sigma: relative noise level, see :func:`add_noise`.
        seed: an int >= 0.

    Returns:
        A :class:`SpectralDataset` of ``n = len(families) * n_per_family`` rows.

    Cost: :math:`O(n\, n_\tau\, n_w)` for the forward map (dominant), plus the sampling.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.spectra import make_dataset
        >>> problem = Problem(tau=tau_grid(10.0, 11), beta=10.0, grid=uniform_grid(-8.0, 8.0, 81),
        ...                   statistics="fermionic")
        >>> one = make_dataset(problem, ("gaussians", "quasiparticle"), 4, 1e-3, seed=7)
        >>> two = make_dataset(problem, ("quasiparticle",), 4, 1e-3, seed=7)
        >>> torch.equal(one.A[4:], two.A), torch.equal(one.G_noisy[4:], two.G_noisy)
        (True, True)
    """
    where = f"make_dataset(families={families!r}, n_per_family={n_per_family!r}, seed={seed!r})"
    _check_problem_type(problem, where)
    names = _check_families(families, where)
    _check_seed_and_count(seed, n_per_family, where)
    _check_rel_sigma(rel_sigma, where)
    blocks = []
    for family in names:
        A = sample_spectra(
            family, n_per_family, problem.grid, generator=_generator(seed, "spectra", family)
        )
        blocks.append((A, *_noisy(problem, A, family, rel_sigma, seed)))
    A, G, G_noisy, sigma = (torch.cat(parts) for parts in zip(*blocks))
    labels = [family for family in names for _ in range(n_per_family)]
    return SpectralDataset(A, G, G_noisy, sigma, labels, float(rel_sigma))


def _rows(dataset: SpectralDataset, keep: list[int]) -> SpectralDataset:
    index = torch.tensor(keep, dtype=torch.long, device=dataset.A.device)
    return SpectralDataset(
        A=dataset.A[index],
        G=dataset.G[index],
        G_noisy=dataset.G_noisy[index],
        sigma=dataset.sigma[index],
        family=[dataset.family[i] for i in keep],
        rel_sigma=dataset.rel_sigma,
    )


def split_by_family(
    dataset: SpectralDataset, held_out: Sequence[str] | str = ("quasiparticle",)
) -> tuple[SpectralDataset, SpectralDataset]:
    """Split rows into families seen in training and families held out entirely.

    Args:
        dataset: a :class:`SpectralDataset`.
        held_out: family names (from :data:`FAMILIES`; a single name is accepted too) whose
            rows go to ``unseen``; may name families the dataset lacks.

    Returns:
        ``(seen, unseen)``: the rows whose family is not / is in ``held_out``, each in the
        original order; either may have 0 rows.

    Cost: one row gather, :math:`O(n (n_w + 3 n_\\tau))`.

    Examples:
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.spectra import make_dataset, split_by_family
        >>> problem = Problem(tau=tau_grid(10.0, 11), beta=10.0, grid=uniform_grid(-8.0, 8.0, 81),
        ...                   statistics="fermionic")
        >>> data = make_dataset(problem, ("gaussians", "quasiparticle"), 3, 1e-3, seed=0)
        >>> seen, unseen = split_by_family(data)
        >>> sorted(set(seen.family)), sorted(set(unseen.family)), len(seen), len(unseen)
        (['gaussians'], ['quasiparticle'], 3, 3)
    """
    names = (held_out,) if isinstance(held_out, str) else tuple(held_out)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise HypergradientError(
            f"split_by_family(held_out={names!r}): unknown families {unknown}; expected names "
            f"from {FAMILIES}"
        )
    seen = [i for i, family in enumerate(dataset.family) if family not in names]
    unseen = [i for i, family in enumerate(dataset.family) if family in names]
    return _rows(dataset, seen), _rows(dataset, unseen)


# ---------------------------------------------------------------------------------------------
# the held-out test set on disk


def write_test_set(
    path: str | os.PathLike,
    problem: Problem,
    *,
    families: Sequence[str] | str,
    n_per_family: int,
    rel_sigmas: Sequence[float],
    seed: int,
) -> Path:
    r"""Write a fixed held-out test set: the same spectra at several noise levels.

    The folder ``path`` (created if needed; its two files are replaced) receives

    * ``test_set.pt`` -- ``torch.save`` of a dict of plain tensors: ``tau``, ``omega``,
      ``weights`` (the problem's grids), ``A`` ``(n, n_w)``, ``G`` ``(n, n_tau)``,
      ``family_index`` (int64 indices into the manifest's ``families``), and for the k-th
      noise level ``G_noisy_k`` and ``sigma_k`` ``(n, n_tau)``;
    * ``manifest.json`` -- the format tag, the problem's ``beta``, ``statistics``, ``n_tau``,
      ``n_w`` and frequency range, ``families``, ``n_per_family``, ``rel_sigmas``, ``seed``,
      the tensor file's name and its ``sha256``.

    The level-k rows equal ``make_dataset(problem, families, n_per_family, rel_sigmas[k],
    seed=seed)`` exactly, so give the test set a seed that no training call uses. Both files
    are written through a temporary file and an atomic rename.

    Args:
        path: the folder.
        problem: the :class:`~hypergradient.continuation.kernels.Problem`.
        families, n_per_family, seed: as in :func:`make_dataset`.
        rel_sigmas: one or more noise levels (distinct, each >= 0).

    Returns:
        The folder as a ``Path``.

    Cost: :func:`make_dataset`'s once for the spectra plus :math:`O(n\, n_\tau)` per noise
    level; the file holds :math:`8 n (n_w + n_\tau (1 + 2 k))` bytes of float64 data.

    Examples:
        >>> import tempfile
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.spectra import load_test_set, write_test_set
        >>> problem = Problem(tau=tau_grid(10.0, 11), beta=10.0, grid=uniform_grid(-8.0, 8.0, 81),
        ...                   statistics="fermionic")
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = write_test_set(folder, problem, families=("gapped",), n_per_family=2,
        ...                        rel_sigmas=(1e-2, 1e-4), seed=123)
        ...     loaded, sets = load_test_set(folder)
        >>> sorted(sets), sets[1e-4].G_noisy.shape, loaded.beta
        ([0.0001, 0.01], torch.Size([2, 11]), 10.0)
    """
    where = f"write_test_set(path={str(path)!r})"
    _check_problem_type(problem, where)
    names = _check_families(families, where)
    _check_seed_and_count(seed, n_per_family, where)
    levels = [rel_sigmas] if isinstance(rel_sigmas, (int, float)) else list(rel_sigmas)
    bad = [
        r for r in levels if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0
    ]
    if not levels or bad or len(set(map(float, levels))) != len(levels):
        raise HypergradientError(
            f"{where}: rel_sigmas must be distinct numbers >= 0, got {rel_sigmas!r}; pass e.g. "
            f"rel_sigmas=(1e-2, 1e-3, 1e-4)"
        )
    levels = [float(r) for r in levels]

    tensors: dict[str, Tensor] = {
        "tau": problem.tau.detach().clone(),
        "omega": problem.grid.omega.detach().clone(),
        "weights": problem.grid.weights.detach().clone(),
    }
    spectra = [
        sample_spectra(
            family, n_per_family, problem.grid, generator=_generator(seed, "spectra", family)
        )
        for family in names
    ]
    tensors["A"] = torch.cat(spectra)
    tensors["family_index"] = torch.arange(len(names)).repeat_interleave(n_per_family)
    for k, rel_sigma in enumerate(levels):
        blocks = [_noisy(problem, A, family, rel_sigma, seed) for A, family in zip(spectra, names)]
        G, G_noisy, sigma = (torch.cat(parts) for parts in zip(*blocks))
        tensors["G"] = G  # the same at every level
        tensors[f"G_noisy_{k}"], tensors[f"sigma_{k}"] = G_noisy, sigma

    buffer = io.BytesIO()
    torch.save({key: value.cpu() for key, value in tensors.items()}, buffer)
    data = buffer.getvalue()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(folder / _TENSOR_FILE) as tmp:
        tmp.write_bytes(data)
        os.replace(tmp, folder / _TENSOR_FILE)
    omega = problem.grid.omega
    manifest = {
        "format": _FORMAT,
        "problem": {
            "beta": float(problem.beta),
            "statistics": problem.statistics,
            "n_tau": int(problem.tau.numel()),
            "n_w": int(omega.numel()),
            "omega_min": float(omega[0]),
            "omega_max": float(omega[-1]),
            "dtype": str(omega.dtype).removeprefix("torch."),
        },
        "families": list(names),
        "n_per_family": n_per_family,
        "rel_sigmas": levels,
        "seed": seed,
        "tensor_file": _TENSOR_FILE,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_json_atomic(folder / _MANIFEST_FILE, manifest)
    return folder


def load_test_set(path: str | os.PathLike) -> tuple[Problem, dict[float, SpectralDataset]]:
    r"""Read a test set written by :func:`write_test_set`, after checking its checksum.

    The tensor file's sha256 is recomputed and compared with the manifest's before anything is
    unpickled; the bytes that were checked are the bytes loaded, with
    ``torch.load(weights_only=True)`` (tensors and plain containers only, never code).

    Args:
        path: the folder given to :func:`write_test_set`.

    Returns:
        ``(problem, datasets)``: the rebuilt
        :class:`~hypergradient.continuation.kernels.Problem` (same ``tau``, ``beta``, grid and
        statistics) and a dict from each noise level (in the manifest's order) to its
        :class:`SpectralDataset`; the spectra and ``G`` tensors are shared between levels.

    Raises:
        HypergradientError: a missing or unreadable file, a foreign manifest, or a checksum
            mismatch (the file was changed or damaged: write the set again).

    Cost: reading and hashing the file, :math:`O(\text{file size})`.

    Examples:
        >>> import tempfile
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.spectra import (load_test_set, make_dataset,
        ...                                                write_test_set)
        >>> problem = Problem(tau=tau_grid(10.0, 11), beta=10.0, grid=uniform_grid(-8.0, 8.0, 81),
        ...                   statistics="fermionic")
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = write_test_set(folder, problem, families=("gaussians",), n_per_family=3,
        ...                        rel_sigmas=(1e-3,), seed=99)
        ...     _, sets = load_test_set(folder)
        >>> same = make_dataset(problem, ("gaussians",), 3, 1e-3, seed=99)
        >>> torch.equal(sets[1e-3].G_noisy, same.G_noisy), sets[1e-3].family
        (True, ['gaussians', 'gaussians', 'gaussians'])
    """
    folder = Path(path)
    where = f"load_test_set(path={str(path)!r})"
    try:
        manifest = json.loads((folder / _MANIFEST_FILE).read_text())
    except (OSError, ValueError) as err:
        raise HypergradientError(
            f"{where}: could not read {_MANIFEST_FILE} ({type(err).__name__}: {err}); expected "
            f"a folder written by write_test_set; write the test set again"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise HypergradientError(
            f"{where}: {_MANIFEST_FILE} has format {found!r}, expected {_FORMAT!r}; write the "
            f"test set again with write_test_set"
        )
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise HypergradientError(
            f"{where}: {_MANIFEST_FILE} lacks the entries {missing}; expected a manifest written "
            f"by write_test_set; write the test set again"
        )
    tensor_path = folder / manifest["tensor_file"]
    try:
        data = tensor_path.read_bytes()
    except OSError as err:
        raise HypergradientError(
            f"{where}: could not read the tensor file {str(tensor_path)!r} "
            f"({type(err).__name__}); write the test set again with write_test_set"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise HypergradientError(
            f"{where}: sha256 mismatch: {manifest['tensor_file']} hashes to {digest}, the "
            f"manifest records {manifest['sha256']}; the file was changed or damaged, write "
            f"the test set again with write_test_set"
        )
    # the checksum matched, so a failure here means the writer itself produced a bad file
    tensors = load_tensors(io.BytesIO(data), where, what=f"the test set {manifest['tensor_file']}")

    spec = manifest["problem"]
    problem = Problem(
        tau=tensors["tau"],
        beta=spec["beta"],
        grid=Grid(omega=tensors["omega"], weights=tensors["weights"]),
        statistics=spec["statistics"],
    )
    family = [manifest["families"][int(i)] for i in tensors["family_index"]]
    datasets = {
        float(rel_sigma): SpectralDataset(
            A=tensors["A"],
            G=tensors["G"],
            G_noisy=tensors[f"G_noisy_{k}"],
            sigma=tensors[f"sigma_{k}"],
            family=list(family),
            rel_sigma=float(rel_sigma),
        )
        for k, rel_sigma in enumerate(manifest["rel_sigmas"])
    }
    return problem, datasets
