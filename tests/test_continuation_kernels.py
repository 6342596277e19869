"""Grids, kernels, the continuation problem and its input checks (continuation/kernels.py).

References are independent of the code under test: closed forms (trapezoid rule with its
Euler-Maclaurin correction, the Gaussian's moment generating function, the Lorentzian's Matsubara
transform, delta peaks) and scipy.integrate.quad on the naive kernel formulas. Tolerances: the
quadratures that converge spectrally are checked to 1e-10 absolute (values are O(1), float64
rounding of sums of ~1e3 terms is ~1e-13); identities that hold exactly up to rounding to a few
ulp of the values involved.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate

from hypergradient._errors import HypergradientError
from hypergradient.continuation.kernels import (
    Grid,
    Problem,
    ReducedKernel,
    bosonic_kernel,
    check_green,
    fermionic_kernel,
    matsubara_kernel,
    nonuniform_grid,
    tau_grid,
    uniform_grid,
)

F64 = torch.float64


def gaussian(omega: torch.Tensor, mean: float, width: float) -> torch.Tensor:
    return torch.exp(-((omega - mean) ** 2) / (2 * width**2)) / (width * math.sqrt(2 * math.pi))


def naive_fermionic(t: float, w: float, beta: float) -> float:
    # the textbook formula; no overflow for beta |w| < 700 (the ranges used below)
    return math.exp(-t * w) / (1 + math.exp(-beta * w))


def naive_bosonic(t: float, w: float, beta: float) -> float:
    if w == 0:
        return 1 / beta
    return w * math.exp(-t * w) / -math.expm1(-beta * w)


def fermionic_problem(beta=10.0, n_tau=51, grid=None, statistics="fermionic") -> Problem:
    grid = uniform_grid(-8.0, 8.0, 161) if grid is None else grid
    return Problem(tau=tau_grid(beta, n_tau), beta=beta, grid=grid, statistics=statistics)


# --------------------------------------------------------------------------------------------
# grids


def test_uniform_grid_points_and_trapezoid_weights():
    grid = uniform_grid(-3.0, 5.0, 9)
    assert grid.omega.dtype == F64 and len(grid) == 9
    assert grid.omega.tolist() == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert grid.weights.tolist() == [0.5] + [1.0] * 7 + [0.5]
    symmetric = uniform_grid(-8.0, 8.0, 401)
    assert torch.equal(symmetric.omega, -symmetric.omega.flip(0))
    assert symmetric.omega[0] == -8.0 and symmetric.omega[-1] == 8.0
    assert uniform_grid(0.0, 1.0, 5, dtype=torch.float32).omega.dtype == torch.float32


@pytest.mark.parametrize("n", [11, 101, 1001])
def test_uniform_grid_integrates_cubics_exactly_up_to_euler_maclaurin(n):
    # trapezoid error for a cubic is exactly h^2/12 (f'(b) - f'(a)) (the h^4 term needs f''''),
    # so the corrected sum equals the integral to rounding
    a, b = -1.3, 2.1
    grid = uniform_grid(a, b, n)
    h = (b - a) / (n - 1)
    for coeffs in ([1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.3, -2.0, 1.5, 0.7]):
        c0, c1, c2, c3 = coeffs
        f = c0 + c1 * grid.omega + c2 * grid.omega**2 + c3 * grid.omega**3

        def antiderivative(x, c0=c0, c1=c1, c2=c2, c3=c3):
            return c0 * x + c1 * x**2 / 2 + c2 * x**3 / 3 + c3 * x**4 / 4

        def derivative(x, c1=c1, c2=c2, c3=c3):
            return c1 + 2 * c2 * x + 3 * c3 * x**2

        exact = antiderivative(b) - antiderivative(a)
        corrected = float(grid.integrate(f)) - h**2 / 12 * (derivative(b) - derivative(a))
        assert corrected == pytest.approx(exact, rel=0, abs=1e-12)


@pytest.mark.parametrize(
    "make_grid", [lambda: uniform_grid(-10, 10, 801), lambda: nonuniform_grid(10, 801)]
)
def test_grids_integrate_gaussian_moments_to_1e_10(make_grid):
    # a Gaussian well inside the window vanishes with all derivatives at the ends: the
    # trapezoid rule (in x for the mapped grid) converges spectrally
    grid = make_grid()
    for mean, width in ((0.0, 1.0), (1.5, 0.3), (-2.0, 0.7)):
        A = gaussian(grid.omega, mean, width)
        assert float(grid.integrate(A)) == pytest.approx(1.0, abs=1e-10)
        assert float(grid.integrate(grid.omega * A)) == pytest.approx(mean, abs=1e-10)
        second = mean**2 + width**2
        assert float(grid.integrate(grid.omega**2 * A)) == pytest.approx(second, abs=1e-10)
        fourth = mean**4 + 6 * mean**2 * width**2 + 3 * width**4
        assert float(grid.integrate(grid.omega**4 * A)) == pytest.approx(fourth, abs=1e-10)


def test_nonuniform_grid_is_the_sinh_map_with_trapezoid_weights():
    w_max, n, a = 6.0, 41, 2.0
    grid = nonuniform_grid(w_max, n, spread=a)
    x = torch.linspace(-1, 1, n)
    assert torch.allclose(grid.omega, w_max * torch.sinh(a * x) / math.sinh(a), rtol=0, atol=1e-14)
    trapezoid = torch.full((n,), 2 / (n - 1))
    trapezoid[[0, -1]] /= 2
    derivative = w_max * a * torch.cosh(a * x) / math.sinh(a)
    assert torch.allclose(grid.weights, trapezoid * derivative, rtol=1e-14, atol=0)
    # exactly symmetric, ends exact, denser at 0 by cosh(a)
    assert torch.equal(grid.omega, -grid.omega.flip(0))
    assert torch.equal(grid.weights, grid.weights.flip(0))
    assert grid.omega[0] == -w_max and grid.omega[-1] == w_max
    spacing = grid.omega.diff()
    assert float(spacing[0] / spacing[n // 2]) == pytest.approx(math.cosh(a), rel=0.1)
    # odd functions integrate to zero (up to rounding), even ones do not
    assert abs(float(grid.integrate(grid.omega**3))) < 1e-12
    assert float(grid.integrate(torch.ones(n))) == pytest.approx(2 * w_max, rel=1e-2)


def test_nonuniform_grid_integrates_polynomials_up_to_euler_maclaurin():
    # integral of w^2 = integral g(x) dx with g = omega(x)^2 omega'(x), even in x, so the
    # trapezoid error is h^2/12 (g'(1) - g'(-1)) = h^2/6 g'(1) + O(h^4)
    w_max, a, n = 8.0, 3.0, 2001
    grid = nonuniform_grid(w_max, n, spread=a)
    h = 2 / (n - 1)
    first = w_max * a / math.tanh(a)  # omega'(1)
    second = w_max * a**2  # omega''(1)
    g_prime = 2 * w_max * first**2 + w_max**2 * second
    exact = 2 * w_max**3 / 3
    corrected = float(grid.integrate(grid.omega**2)) - h**2 / 6 * g_prime
    assert corrected == pytest.approx(exact, rel=1e-10, abs=0)


def test_tau_grid_includes_both_ends():
    tau = tau_grid(12.5, 126)
    assert tau.dtype == F64 and tau.shape == (126,)
    assert tau[0] == 0.0 and tau[-1] == 12.5
    assert torch.allclose(tau.diff(), torch.full((125,), 0.1), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------
# imaginary-time kernels


def test_fermionic_kernel_matches_the_naive_formula_and_its_identities():
    beta = 7.0
    tau = tau_grid(beta, 15)
    omega = torch.linspace(-6, 6, 25)
    K = fermionic_kernel(tau, omega, beta)
    assert K.shape == (15, 25) and K.dtype == F64
    naive = torch.tensor(
        [[naive_fermionic(t, w, beta) for w in omega.tolist()] for t in tau.tolist()]
    )
    assert torch.allclose(K, naive, rtol=1e-14, atol=0)
    # K(tau, -w) = K(beta - tau, w); K(0, w) + K(beta, w) = 1
    assert torch.allclose(K.flip(1), K.flip(0), rtol=1e-13, atol=0)
    assert torch.allclose(K[0] + K[-1], torch.ones(25), rtol=0, atol=1e-15)


def test_bosonic_kernel_matches_the_naive_formula_and_its_limit():
    beta = 4.0
    tau = tau_grid(beta, 9)
    omega = torch.tensor([-5.0, -0.3, -1e-9, -1e-12, 0.0, 1e-12, 1e-9, 0.3, 5.0])
    K = bosonic_kernel(tau, omega, beta)
    naive = torch.tensor(
        [[naive_bosonic(t, w, beta) for w in omega.tolist()] for t in tau.tolist()]
    )
    assert torch.allclose(K, naive, rtol=1e-13, atol=0)
    assert torch.equal(K[:, 4], torch.full((9,), 1 / beta))  # the limit, exactly
    assert bool((K > 0).all())
    assert torch.allclose(K.flip(1), K.flip(0), rtol=1e-12, atol=0)  # K(tau, -w) = K(beta - tau, w)


@pytest.mark.parametrize("kernel", [fermionic_kernel, bosonic_kernel])
def test_kernels_and_their_gradients_are_finite_for_huge_beta_w(kernel):
    # beta |w| up to 1e4; the naive formulas overflow beyond ~700
    for beta in (10.0, 100.0, 1000.0):
        tau = tau_grid(beta, 11).requires_grad_(True)
        omega = torch.linspace(-10, 10, 41).requires_grad_(True)
        K = kernel(tau, omega, beta)
        assert bool(torch.isfinite(K).all()) and bool((K >= 0).all())
        d_tau, d_omega = torch.autograd.grad(K.sum(), (tau, omega))
        assert bool(torch.isfinite(d_tau).all()) and bool(torch.isfinite(d_omega).all())
    if kernel is fermionic_kernel:
        assert bool((K <= 1).all())


@pytest.mark.parametrize("statistics", ["fermionic", "bosonic"])
@pytest.mark.parametrize("beta", [5.0, 20.0, 50.0])
@pytest.mark.parametrize(
    "make_grid", [lambda: uniform_grid(-10, 10, 2001), lambda: nonuniform_grid(10, 2001)]
)
def test_gaussian_green_function_matches_quad(statistics, beta, make_grid):
    # the kernel is analytic in a strip of half-width pi / beta about the real axis: trapezoid
    # with h << beta converges spectrally, so the grid sum equals the integral to rounding
    grid = make_grid()
    mean, width = 0.7, 0.8
    tau = torch.tensor([0.0, 0.1, 0.5, 0.77, 1.0]) * beta
    problem = Problem(tau=tau, beta=beta, grid=grid, statistics=statistics)
    G = problem.forward(gaussian(grid.omega, mean, width))
    naive = naive_fermionic if statistics == "fermionic" else naive_bosonic

    def density(w):
        return math.exp(-((w - mean) ** 2) / (2 * width**2)) / (width * math.sqrt(2 * math.pi))

    reference = [
        integrate.quad(
            lambda w, t=t: naive(t, w, beta) * density(w),
            mean - 15 * width,
            mean + 15 * width,
            epsabs=1e-14,
            epsrel=1e-13,
            limit=200,
        )[0]
        for t in tau.tolist()
    ]
    assert torch.allclose(G, torch.tensor(reference), rtol=0, atol=1e-10)


@pytest.mark.parametrize("center", [2.0, -1.5])
def test_narrow_peak_gives_the_kernel_at_its_center(center):
    # fermions, beta |w0| >= 30: K(tau, w) = exp(-t w) (1 - exp(-beta |w|) + ...) with
    # t = tau (w > 0) or beta - tau (w < 0), and a Gaussian of width eps has
    # integral exp(-t |w|) = exp(-t |w0| + t^2 eps^2 / 2): the delta-peak limit K(tau, w0)
    # plus its exact width correction; the Fermi tail is below e^-30
    beta, eps = 20.0, 0.02
    grid = uniform_grid(-4.0, 4.0, 4001)
    problem = Problem(tau=tau_grid(beta, 41), beta=beta, grid=grid)
    G = problem.forward(gaussian(grid.omega, center, eps))
    t = problem.tau if center > 0 else beta - problem.tau
    closed_form = torch.exp(-t * abs(center) + t**2 * eps**2 / 2)
    assert torch.allclose(G, closed_form, rtol=1e-10, atol=1e-12)
    delta_limit = fermionic_kernel(problem.tau, torch.tensor([center]), beta)[:, 0]
    assert torch.allclose(G, delta_limit, rtol=(beta * eps) ** 2, atol=0)
    # an exact grid delta (one point, height 1 / weight) gives K(tau, w_j) itself
    j = int((grid.omega - center).abs().argmin())
    delta = torch.zeros(len(grid))
    delta[j] = 1 / grid.weights[j]
    exact = fermionic_kernel(problem.tau, grid.omega[j : j + 1], beta)[:, 0]
    assert torch.allclose(problem.forward(delta), exact, rtol=1e-14, atol=0)


@pytest.mark.parametrize("statistics", ["fermionic", "bosonic"])
@pytest.mark.parametrize(
    "make_grid", [lambda: uniform_grid(-6, 6, 301), lambda: nonuniform_grid(6, 301)]
)
def test_symmetric_spectrum_gives_green_function_symmetric_in_tau(statistics, make_grid):
    grid = make_grid()
    beta = 15.0
    problem = Problem(tau=tau_grid(beta, 61), beta=beta, grid=grid, statistics=statistics)
    A = gaussian(grid.omega, 1.2, 0.5) + gaussian(grid.omega, -1.2, 0.5)
    G = problem.forward(A)
    assert torch.allclose(G, G.flip(0), rtol=1e-12, atol=0)
    asymmetric = problem.forward(gaussian(grid.omega, 1.2, 0.5))
    assert not torch.allclose(asymmetric, asymmetric.flip(0), rtol=1e-3, atol=0)


# --------------------------------------------------------------------------------------------
# Matsubara kernel


@pytest.mark.parametrize("statistics", ["fermionic", "bosonic"])
def test_matsubara_kernel_of_two_delta_peaks(statistics):
    beta = 8.0
    grid = uniform_grid(-3.0, 3.0, 7)  # points -3 .. 3; 0 is on the grid
    weights_of_peaks = {1: 0.3, 5: 0.7}  # indices of w = -2 and w = 2
    A = torch.zeros(7)
    for j, weight in weights_of_peaks.items():
        A[j] = weight / grid.weights[j]
    n = torch.arange(1, 9)  # n = 0 with w = 0 is singular for bosons
    K = matsubara_kernel(n, grid.omega, beta, statistics)
    assert K.shape == (8, 7) and K.dtype == torch.complex128
    G = (A * grid.weights).to(K.dtype) @ K.T
    shift = 1 if statistics == "fermionic" else 0
    expected = []
    for index in n.tolist():
        w_n = (2 * index + shift) * math.pi / beta
        expected.append(
            sum(a / (1j * w_n - float(grid.omega[j])) for j, a in weights_of_peaks.items())
        )
    assert torch.allclose(G, torch.tensor(expected), rtol=1e-15, atol=0)


@pytest.mark.parametrize("center, width", [(0.0, 0.5), (0.8, 0.3)])
def test_matsubara_transform_of_a_lorentzian(center, width):
    # A = (width / pi) / ((w - center)^2 + width^2) has G(i w_n) = 1 / (i w_n - center + i width
    # sign(w_n)). On the grid w = center + width tan(theta) (theta on a uniform grid in
    # (-pi/2, pi/2)), A dw = dtheta / pi and the integrand is analytic and pi-periodic in theta:
    # the trapezoid rule converges exponentially and reaches the infinite-line closed form
    beta, m = 10.0, 1000  # converged to rounding from m ~ 800 (pole nearest the axis)
    theta = (torch.arange(m) + 0.5) * (math.pi / m) - math.pi / 2
    step = math.pi / m
    omega = center + width * torch.tan(theta)
    grid = Grid(omega=omega, weights=step * width / torch.cos(theta) ** 2)
    A = (width / math.pi) / ((omega - center) ** 2 + width**2)
    n = torch.arange(-5, 20)
    G = (A * grid.weights).to(torch.complex128) @ matsubara_kernel(n, omega, beta).T
    w_n = (2 * n + 1) * math.pi / beta
    closed_form = 1 / (1j * w_n - center + 1j * width * torch.sign(w_n))
    assert torch.allclose(G, closed_form, rtol=0, atol=1e-12)


@pytest.mark.parametrize("statistics", ["fermionic", "bosonic"])
def test_matsubara_kernel_is_the_fourier_transform_of_the_tau_kernel(statistics):
    # integral_0^beta exp(i w_n tau) K(tau, w) dtau = -1 / (i w_n - w) (fermions) or
    # -w / (i w_n - w) (bosons, spectrum A / w), by quad on the naive formulas
    beta = 3.0
    naive = naive_fermionic if statistics == "fermionic" else naive_bosonic
    omega = torch.tensor([-2.0, -0.4, 0.5, 1.7])
    n = torch.tensor([-2, 0, 1, 3]) if statistics == "fermionic" else torch.tensor([-2, 1, 3])
    K = matsubara_kernel(n, omega, beta, statistics)
    shift = 1 if statistics == "fermionic" else 0
    for a, index in enumerate(n.tolist()):
        w_n = (2 * index + shift) * math.pi / beta
        for b, w in enumerate(omega.tolist()):
            parts = [
                integrate.quad(
                    lambda t, f=f, w_n=w_n, w=w: f(w_n * t) * naive(t, w, beta),
                    0,
                    beta,
                    epsabs=1e-14,
                )[0]
                for f in (math.cos, math.sin)
            ]
            transform = complex(parts[0], parts[1])
            factor = 1.0 if statistics == "fermionic" else w
            assert complex(K[a, b]) * -factor == pytest.approx(transform, abs=1e-12)


def test_matsubara_kernel_count_and_indices_agree():
    omega = torch.linspace(-2, 2, 9)
    assert torch.equal(
        matsubara_kernel(5, omega, 4.0), matsubara_kernel(torch.arange(5), omega, 4.0)
    )
    assert matsubara_kernel(3, omega.float(), 4.0).dtype == torch.complex64
    # a grid without w = 0 admits the bosonic n = 0
    K = matsubara_kernel(3, torch.tensor([-1.0, 1.0]), 4.0, "bosonic")
    assert torch.allclose(K[0], torch.tensor([1.0, -1.0], dtype=torch.complex128))


# --------------------------------------------------------------------------------------------
# the problem and its SVD


def test_problem_matrix_and_forward():
    grid = nonuniform_grid(8.0, 121)
    problem = fermionic_problem(beta=12.0, n_tau=31, grid=grid)
    expected = fermionic_kernel(problem.tau, grid.omega, 12.0) * grid.weights
    assert torch.equal(problem.matrix, expected)
    assert problem.matrix is problem.matrix  # cached
    spectra = torch.stack([gaussian(grid.omega, m, 0.6) for m in (-1.0, 0.0, 2.0)])
    batched = problem.forward(spectra.reshape(3, 1, 121))
    assert batched.shape == (3, 1, 31)
    for row in range(3):
        assert torch.allclose(batched[row, 0], problem.matrix @ spectra[row], rtol=1e-14, atol=0)
    # fermionic normalisation: G(0) + G(beta) = integral A
    assert torch.allclose(batched[:, 0, 0] + batched[:, 0, -1], grid.integrate(spectra), rtol=1e-14)
    assert problem.forward(spectra.float()).dtype == F64  # promoted
    bosonic = fermionic_problem(beta=12.0, n_tau=31, grid=grid, statistics="bosonic")
    assert torch.equal(bosonic.matrix, bosonic_kernel(bosonic.tau, grid.omega, 12.0) * grid.weights)


def test_problem_converts_its_fields():
    grid = uniform_grid(-2.0, 2.0, 21)
    problem = Problem(tau=tau_grid(5.0, 6, dtype=torch.float32), beta=torch.tensor(5.0), grid=grid)
    assert problem.tau.dtype == F64 and isinstance(problem.beta, float) and problem.beta == 5.0
    assert (problem.n_tau, problem.n_w, problem.statistics) == (6, 21, "fermionic")


@pytest.mark.parametrize("beta", [10.0, 20.0, 50.0])
def test_svd_reconstructs_the_kernel_and_its_singular_values_decay(beta):
    problem = fermionic_problem(beta=beta, n_tau=101, grid=uniform_grid(-8.0, 8.0, 401))
    full = problem.svd(cutoff=0.0)
    assert isinstance(full, ReducedKernel)
    U, s, V = full
    assert full.rank == 101 and U.shape == (101, 101) and V.shape == (401, 101)
    scale = float(problem.matrix.abs().max())
    assert torch.allclose(full.matrix(), problem.matrix, rtol=0, atol=1e-10 * scale)
    assert torch.allclose(U.T @ U, torch.eye(101), rtol=0, atol=1e-12)
    assert torch.allclose(V.T @ V, torch.eye(101), rtol=0, atol=1e-12)
    assert bool((s.diff() <= 0).all())
    # exponential decay: a few tens above 1e-10 s_max, more for larger beta
    reduced = problem.svd(cutoff=1e-10)
    assert 20 <= reduced.rank <= 50
    assert bool((reduced.s > 1e-10 * s[0]).all()) and float(s[reduced.rank]) <= 1e-10 * float(s[0])
    # the dropped part has spectral norm s_{r+1} <= cutoff * s_max
    remainder = torch.linalg.matrix_norm(problem.matrix - reduced.matrix(), ord=2)
    assert float(remainder) <= 1e-10 * float(s[0]) * (1 + 1e-6)
    # sign convention: the largest-magnitude entry of each V column is positive
    pivots = V.abs().argmax(dim=0)
    assert bool((V.gather(0, pivots[None, :]) > 0).all())


def test_svd_rank_grows_with_beta():
    ranks = [
        fermionic_problem(beta=beta, n_tau=101, grid=uniform_grid(-8.0, 8.0, 401))
        .svd(cutoff=1e-10)
        .rank
        for beta in (10.0, 50.0)
    ]
    assert ranks[0] < ranks[1]


def test_svd_calls_share_one_decomposition():
    problem = fermionic_problem()
    first, second = problem.svd(1e-8), problem.svd(1e-8)
    assert torch.equal(first.s, second.s) and torch.equal(first.V, second.V)
    assert problem.svd(1e-4).rank < first.rank


# --------------------------------------------------------------------------------------------
# errors


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def broken(obj, **fields):
    """A copy of a frozen dataclass with fields set without its checks (a problem built
    elsewhere and mutated), so that check_green's own checks are exercised."""
    clone = object.__new__(type(obj))
    clone.__dict__.update({k: v for k, v in obj.__dict__.items() if not k.startswith("_")})
    clone.__dict__.pop("matrix", None)
    clone.__dict__.update(fields)
    return clone


def test_check_green_accepts_good_input():
    problem = fermionic_problem()
    G = problem.forward(gaussian(problem.grid.omega, 0.0, 1.0))
    assert check_green(G, problem) is None
    assert check_green(G.expand(4, 3, -1), problem) is None
    L = torch.randn(51, 51) * 0.1 + torch.eye(51)
    assert check_green(G, problem, covariance=L @ L.T) is None


@pytest.mark.parametrize("beta", [0.0, -2.0, math.inf, math.nan])
def test_bad_beta(beta):
    problem = fermionic_problem()
    with pytest.raises(HypergradientError) as excinfo:
        Problem(tau=problem.tau, beta=beta, grid=problem.grid)
    assert_one_line_error(excinfo, "Problem: beta=", "expected a finite inverse temperature > 0")
    with pytest.raises(HypergradientError) as excinfo:
        check_green(torch.zeros(51), broken(problem, beta=beta), where="maxent")
    assert_one_line_error(excinfo, "maxent: beta=", "expected")
    with pytest.raises(HypergradientError, match="beta is a str, expected a positive number"):
        Problem(tau=problem.tau, beta="10", grid=problem.grid)
    for call in (
        lambda: tau_grid(beta, 5),
        lambda: fermionic_kernel(problem.tau, problem.grid.omega, beta),
        lambda: bosonic_kernel(problem.tau, problem.grid.omega, beta),
        lambda: matsubara_kernel(4, problem.grid.omega, beta),
    ):
        with pytest.raises(HypergradientError, match="expected a finite inverse temperature"):
            call()


@pytest.mark.parametrize("tau", [[-0.1, 0.5, 1.0], [0.0, 0.5, 10.5]])
def test_tau_outside_zero_beta(tau):
    grid = uniform_grid(-1.0, 1.0, 11)
    with pytest.raises(HypergradientError) as excinfo:
        Problem(tau=torch.tensor(tau), beta=10.0, grid=grid)
    assert_one_line_error(excinfo, "Problem: tau spans", "expected values in [0, beta]", "tau_grid")
    good = Problem(tau=torch.tensor([0.0, 0.5, 1.0]), beta=10.0, grid=grid)
    with pytest.raises(HypergradientError, match="check_green: tau spans"):
        check_green(torch.zeros(3), broken(good, tau=torch.tensor(tau)))
    with pytest.raises(HypergradientError, match="tau contains NaN/inf"):
        Problem(tau=torch.tensor([0.0, math.nan]), beta=10.0, grid=grid)
    with pytest.raises(HypergradientError, match="tau is shape"):
        Problem(tau=torch.zeros(2, 2), beta=10.0, grid=grid)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_green_function(bad):
    problem = fermionic_problem()
    G = torch.full((2, 51), 0.3)
    G[1, 7] = bad
    with pytest.raises(HypergradientError) as excinfo:
        check_green(G, problem)
    assert_one_line_error(excinfo, "check_green: G (shape (2, 51)) contains 1 NaN/inf", "expected")


@pytest.mark.parametrize("shape", [(50,), (3, 52), ()])
def test_green_function_of_the_wrong_length(shape):
    with pytest.raises(HypergradientError) as excinfo:
        check_green(torch.zeros(shape), fermionic_problem(), where="tikhonov_nnls")
    assert_one_line_error(excinfo, "tikhonov_nnls: G has shape", "expected (..., 51)")


def test_green_function_of_the_wrong_type():
    problem = fermionic_problem()
    with pytest.raises(HypergradientError, match="G is a list, expected a torch.Tensor"):
        check_green([0.0] * 51, problem)
    with pytest.raises(HypergradientError, match="G has dtype torch.int64, expected a real"):
        check_green(torch.zeros(51, dtype=torch.int64), problem)
    with pytest.raises(HypergradientError, match="G has dtype torch.complex128"):
        check_green(torch.zeros(51, dtype=torch.complex128), problem)
    with pytest.raises(HypergradientError, match="expected a continuation Problem"):
        check_green(torch.zeros(51), problem.grid)


def test_grid_with_mismatched_lengths_or_non_increasing_omega():
    with pytest.raises(HypergradientError) as excinfo:
        Grid(omega=torch.linspace(-1, 1, 5), weights=torch.ones(4))
    assert_one_line_error(excinfo, "Grid: omega has 5 points but weights has 4", "expected")
    for omega in ([0.0, 1.0, 1.0, 2.0], [0.0, 2.0, 1.0, 3.0], [3.0, 2.0, 1.0, 0.0]):
        with pytest.raises(HypergradientError) as excinfo:
            Grid(omega=torch.tensor(omega), weights=torch.ones(4))
        assert_one_line_error(excinfo, "not strictly increasing", "expected increasing", "argsort")
    good = uniform_grid(-1.0, 1.0, 5)
    problem = Problem(tau=tau_grid(2.0, 3), beta=2.0, grid=good)
    for grid in (broken(good, weights=torch.ones(6)), broken(good, omega=good.omega.flip(0))):
        with pytest.raises(HypergradientError, match="check_green: .*expected"):
            check_green(torch.zeros(3), broken(problem, grid=grid))
    with pytest.raises(HypergradientError, match="negative value"):
        Grid(omega=torch.tensor([0.0, 1.0]), weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(HypergradientError, match="NaN/inf"):
        Grid(omega=torch.tensor([0.0, math.inf]), weights=torch.ones(2))
    with pytest.raises(HypergradientError, match="grid omega is shape"):
        Grid(omega=torch.zeros(2, 2), weights=torch.ones(2))
    with pytest.raises(HypergradientError, match="grid is a Grid|expected a Grid"):
        Problem(tau=tau_grid(2.0, 3), beta=2.0, grid=good.omega)


def test_covariance_not_symmetric_positive_definite():
    problem = fermionic_problem(n_tau=4, grid=uniform_grid(-1.0, 1.0, 5))
    G = torch.full((4,), 0.25)
    asymmetric = torch.eye(4)
    asymmetric[0, 1] = 0.1
    with pytest.raises(HypergradientError) as excinfo:
        check_green(G, problem, covariance=asymmetric)
    assert_one_line_error(excinfo, "covariance is not symmetric", "expected", "(C + C.T) / 2")
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -1e-6, 1.0]))
    singular = torch.ones(4, 4)
    for covariance in (indefinite, singular):
        with pytest.raises(HypergradientError) as excinfo:
            check_green(G, problem, covariance=covariance)
        assert_one_line_error(excinfo, "covariance is not positive definite", "expected", "eps * I")
    with pytest.raises(
        HypergradientError, match=r"covariance has shape \(3, 3\), expected \(4, 4\)"
    ):
        check_green(G, problem, covariance=torch.eye(3))
    with pytest.raises(HypergradientError, match="covariance contains NaN/inf"):
        check_green(G, problem, covariance=torch.full((4, 4), math.nan))
    with pytest.raises(HypergradientError, match="covariance is torch.int64, expected"):
        check_green(G, problem, covariance=torch.eye(4, dtype=torch.int64))
    # rounding-level asymmetry (e.g. from L @ L.T) is accepted
    L = torch.randn(4, 4) + 3 * torch.eye(4)
    nearly = L @ L.T
    nearly[0, 1] += 1e-15
    assert check_green(G, problem, covariance=nearly) is None


def test_other_bad_arguments():
    grid = uniform_grid(-1.0, 1.0, 5)
    with pytest.raises(HypergradientError, match="statistics='anyonic', expected one of"):
        Problem(tau=tau_grid(2.0, 3), beta=2.0, grid=grid, statistics="anyonic")
    with pytest.raises(HypergradientError, match="statistics='anyonic', expected one of"):
        matsubara_kernel(3, grid.omega, 2.0, "anyonic")
    with pytest.raises(HypergradientError, match="infinite at w_0 = 0, w = 0"):
        matsubara_kernel(3, grid.omega, 2.0, "bosonic")
    with pytest.raises(HypergradientError, match="n=0 asks for no frequencies"):
        matsubara_kernel(0, grid.omega, 2.0)
    with pytest.raises(HypergradientError, match="expected an int count or a 1-D integer"):
        matsubara_kernel(torch.arange(3.0), grid.omega, 2.0)
    with pytest.raises(HypergradientError, match="omega is shape"):
        fermionic_kernel(tau_grid(2.0, 3), grid.omega[None], 2.0)
    with pytest.raises(HypergradientError, match="expected finite w_min < w_max"):
        uniform_grid(1.0, -1.0, 11)
    with pytest.raises(HypergradientError, match="n=1, expected an int >= 2"):
        uniform_grid(-1.0, 1.0, 1)
    with pytest.raises(HypergradientError, match="expected a finite w_max > 0"):
        nonuniform_grid(-8.0, 11)
    with pytest.raises(HypergradientError, match="expected 0 < spread <= 50"):
        nonuniform_grid(8.0, 11, spread=0.0)
    with pytest.raises(HypergradientError, match="n_tau=1.5, expected an int >= 2"):
        tau_grid(2.0, 1.5)
    problem = Problem(tau=tau_grid(2.0, 3), beta=2.0, grid=grid)
    with pytest.raises(
        HypergradientError, match=r"Problem.forward: expected .*n_w=5\), got shape \(4,\)"
    ):
        problem.forward(torch.zeros(4))
    with pytest.raises(HypergradientError, match="cutoff=1.5, expected a relative threshold"):
        problem.svd(cutoff=1.5)
