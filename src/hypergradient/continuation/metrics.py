r"""How a reconstructed spectrum is judged, and how a method's setting is chosen.

A continuation is judged on the spectrum :math:`A(\omega)` against the true one, never on the
residual in :math:`G` alone: a solution that fits the noise has a *smaller* residual than the
truth and a worse :math:`A`.

* :func:`l1_error` -- :math:`\int |A - A_\text{true}|\, d\omega`, the main error.
* :func:`peak_errors` -- position and weight errors of the true spectrum's main peak.
* :func:`residual` -- :math:`\chi^2 / n_\tau` of the reconstruction, recorded beside the
  error, never used to choose.
* :func:`select` -- the candidate (a regularisation weight, a number of iterations, ...) with
  the lowest mean validation L1 error.

All take a batch: ``A`` and ``A_true`` of shape ``(n, n_w)`` on ``problem.grid``.

Examples:
    >>> import torch
    >>> from hypergradient import continuation as ac
    >>> problem = ac.Problem(ac.tau_grid(10.0, 21), 10.0, ac.uniform_grid(-6.0, 6.0, 61))
    >>> val = ac.make_dataset(problem, ("gaussians",), 4, 1e-2, seed=3)
    >>> shifted = torch.roll(val.A, 5, dims=-1)  # 5 grid points = 1.0 in frequency
    >>> [round(float(e), 12) for e in ac.peak_errors(problem, shifted, val.A)[0]]
    [1.0, 1.0, 1.0, 1.0]
    >>> bool((ac.l1_error(problem, shifted, val.A) > 0).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from .._errors import HypergradientError
from .kernels import Problem

__all__ = ["l1_error", "peak_errors", "residual", "select"]


def _check_pair(where: str, problem: Problem, A: Tensor, A_true: Tensor) -> None:
    if not isinstance(problem, Problem):
        raise HypergradientError(
            f"{where}: problem is a {type(problem).__name__}, expected a continuation Problem; "
            f"pass the problem the spectra were made on."
        )
    if A.shape != A_true.shape or A.shape[-1:] != (problem.n_w,):
        raise HypergradientError(
            f"{where}: A has shape {tuple(A.shape)} and A_true {tuple(A_true.shape)}, expected "
            f"the same shape (..., n_w={problem.n_w}) on problem.grid; pass spectra of this "
            f"problem, one row per spectrum."
        )


def l1_error(problem: Problem, A: Tensor, A_true: Tensor) -> Tensor:
    r""":math:`\int |A - A_\text{true}|\, d\omega` per spectrum, by the grid's quadrature.

    Args:
        problem: the :class:`~hypergradient.continuation.kernels.Problem` of the spectra.
        A, A_true: ``(..., n_w)`` reconstructed and true spectra on ``problem.grid``.

    Returns:
        ``(...)`` the L1 errors (0 to 2 for two normalised non-negative spectra).

    Cost: :math:`O(n\, n_w)`.

    Examples:
        >>> import torch
        >>> from hypergradient import continuation as ac
        >>> problem = ac.Problem(ac.tau_grid(10.0, 11), 10.0, ac.uniform_grid(-1.0, 1.0, 3))
        >>> flat = torch.full((1, 3), 0.5, dtype=torch.float64)  # integral 1 over [-1, 1]
        >>> spike = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64)
        >>> ac.l1_error(problem, spike, flat)  # weights 0.5, 1, 0.5: 0.25 + 1.5 + 0.25
        tensor([2.], dtype=torch.float64)
    """
    _check_pair("l1_error", problem, A, A_true)
    return problem.grid.integrate((A - A_true).abs())


def residual(problem: Problem, A: Tensor, G: Tensor, sigma: Tensor) -> Tensor:
    r""":math:`\chi^2 / n_\tau = \tfrac{1}{n_\tau} \sum_i ((K_w A - G)_i / \sigma_i)^2` per
    spectrum: how well ``A`` fits the data. Recorded beside the error, never used to choose
    (fitting the noise makes it small).

    Args:
        problem: the :class:`~hypergradient.continuation.kernels.Problem`.
        A: ``(n, n_w)`` spectra.
        G: ``(n, n_tau)`` the (noisy) data they were reconstructed from.
        sigma: ``(n, n_tau)`` per point or ``(n,)`` per spectrum, the noise's standard deviation.

    Returns:
        ``(n,)`` :math:`\chi^2 / n_\tau` (about 1 for a fit to the noise level).

    Cost: one forward map, :math:`O(n\, n_\tau n_w)`.

    Examples:
        >>> from hypergradient import continuation as ac
        >>> problem = ac.Problem(ac.tau_grid(10.0, 21), 10.0, ac.uniform_grid(-6.0, 6.0, 61))
        >>> data = ac.make_dataset(problem, ("gaussians",), 2, 1e-2, seed=0)
        >>> ac.residual(problem, data.A, data.G, data.sigma)  # the clean G: no misfit
        tensor([0., 0.], dtype=torch.float64)
    """
    sigma = sigma.reshape(-1, 1) if sigma.dim() == 1 else sigma
    return (((problem.forward(A) - G) / sigma) ** 2).mean(-1)


def peak_errors(
    problem: Problem, A: Tensor, A_true: Tensor, *, window: float = 0.5
) -> tuple[Tensor, Tensor]:
    r"""Errors on the true spectrum's main peak: its position and its weight.

    The position error is :math:`|\omega_{\arg\max A} - \omega_{\arg\max A_\text{true}}|`; the
    weight error is :math:`|\int_I A - \int_I A_\text{true}|` over the window
    :math:`I = [\omega^\ast - \text{window}, \omega^\ast + \text{window}]` around the true
    peak :math:`\omega^\ast` (so a peak in the right place with the wrong height counts too).

    Args:
        problem: the :class:`~hypergradient.continuation.kernels.Problem` of the spectra.
        A, A_true: ``(n, n_w)`` reconstructed and true spectra.
        window: half-width of the window, in frequency units.

    Returns:
        ``(position_error, weight_error)``, each ``(n,)``.

    Cost: :math:`O(n\, n_w)`.

    Examples:
        >>> import torch
        >>> from hypergradient import continuation as ac
        >>> problem = ac.Problem(ac.tau_grid(10.0, 21), 10.0, ac.uniform_grid(-6.0, 6.0, 61))
        >>> data = ac.make_dataset(problem, ("gaussians",), 3, 1e-2, seed=0)
        >>> position, weight = ac.peak_errors(problem, data.A, data.A)
        >>> position.tolist(), weight.tolist()
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    """
    _check_pair("peak_errors", problem, A, A_true)
    w = problem.grid.omega
    true_at = w[A_true.argmax(-1)]
    found_at = w[A.argmax(-1)]
    inside = ((w.unsqueeze(0) - true_at.unsqueeze(1)).abs() <= window).to(A.dtype)
    weight = problem.grid.integrate(A * inside)
    weight_true = problem.grid.integrate(A_true * inside)
    return (found_at - true_at).abs(), (weight - weight_true).abs()


def select(
    candidates: Mapping[str, Callable[[Tensor, Tensor], Tensor]], val, problem: Problem
) -> tuple[str, dict[str, dict[str, float]]]:
    r"""The candidate with the lowest mean validation L1 error of :math:`A`.

    Each candidate maps ``(G_noisy, sigma)`` of the validation set (``(n, n_tau)`` each) to
    spectra ``A (n, n_w)``; it is scored by the mean :func:`l1_error` against ``val.A``. Its
    mean :func:`residual` is recorded beside the error and never decides.

    Args:
        candidates: ``{name: solve}``, at least one.
        val: a :class:`~hypergradient.continuation.spectra.SpectralDataset` of ``problem``
            (validation spectra, never the test set).
        problem: the :class:`~hypergradient.continuation.kernels.Problem`.

    Returns:
        ``(best_name, scores)`` with ``scores[name] = {"val_l1": ..., "val_residual": ...}``
        (ties: the first candidate listed wins).

    Cost: one call of every candidate on the validation set.

    Examples:
        >>> import torch
        >>> from hypergradient import continuation as ac
        >>> problem = ac.Problem(ac.tau_grid(10.0, 21), 10.0, ac.uniform_grid(-6.0, 6.0, 61))
        >>> val = ac.make_dataset(problem, ("gaussians",), 4, 1e-2, seed=3)
        >>> def tikhonov(lam):
        ...     return lambda G, sigma: torch.stack([
        ...         ac.tikhonov_nnls(g, problem, sigma=s, lam=lam) for g, s in zip(G, sigma)])
        >>> best, scores = ac.select({"truth": lambda G, s: val.A, "fits the noise":
        ...                           tikhonov(1e-9)}, val, problem)
        >>> best  # the noise-fitting solution has the smaller residual, and loses
        'truth'
        >>> scores["fits the noise"]["val_residual"] < scores["truth"]["val_residual"]
        True
    """
    if not candidates:
        raise HypergradientError(
            "select: no candidates given, expected {name: solve} with at least one entry "
            "mapping (G_noisy, sigma) to A."
        )
    scores = {}
    for name, solve in candidates.items():
        A = solve(val.G_noisy, val.sigma)
        scores[name] = {
            "val_l1": float(l1_error(problem, A, val.A).mean()),
            "val_residual": float(residual(problem, A, val.G_noisy, val.sigma).mean()),
        }
    best = min(scores, key=lambda n: scores[n]["val_l1"])
    return best, scores
