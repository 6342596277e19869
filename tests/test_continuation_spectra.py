"""Synthetic spectra, noise, datasets and the on-disk test set of hypergradient.continuation.

Tolerances: normalisation is a division by the quadrature sum, so it holds to a few float64
roundings of a sum of n_w terms (1e-12). The noise tests draw N standard normals with fixed
seeds; a sample mean has standard deviation 1/sqrt(N), a sample variance sqrt(2/N), a sample
covariance entry sqrt((C_ii C_jj + C_ij^2)/N): every bound below is 5 of those.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from hypergradient._errors import HypergradientError
from hypergradient.continuation.kernels import Problem, nonuniform_grid, tau_grid, uniform_grid
from hypergradient.continuation.spectra import (
    FAMILIES,
    SpectralDataset,
    add_noise,
    load_test_set,
    make_dataset,
    sample_spectra,
    split_by_family,
    write_test_set,
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem(tau=tau_grid(10.0, 51), beta=10.0, grid=uniform_grid(-8.0, 8.0, 401))


GRIDS = {
    "uniform": lambda: uniform_grid(-8.0, 8.0, 401),
    "nonuniform": lambda: nonuniform_grid(8.0, 301),
    "asymmetric": lambda: uniform_grid(-5.0, 10.0, 301),  # L = 5: spectra live in [-5, 5]
    "coarse": lambda: uniform_grid(-8.0, 8.0, 41),  # under-resolves the sharp peaks
}


# ---------------------------------------------------------------------------------------------
# spectrum families


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_normalised_and_nonnegative(family, grid_name):
    grid = GRIDS[grid_name]()
    A = sample_spectra(family, 64, grid, generator=generator(1))
    assert A.shape == (64, len(grid.omega)) and A.dtype == torch.float64
    assert bool(torch.isfinite(A).all())
    assert bool((A >= 0).all())
    mass = (grid.weights * A).sum(-1)
    assert float((mass - 1).abs().max()) <= 1e-12


def test_gapped_spectra_have_no_weight_in_a_gap_around_zero():
    grid = uniform_grid(-8.0, 8.0, 801)
    A = sample_spectra("gapped", 200, grid, generator=generator(2))
    # each gap edge is at least 0.05 L = 0.4 from 0, so every point strictly inside is empty
    inside = grid.omega.abs() < 0.4
    assert bool((A[:, inside] == 0).all())
    # and the two bands carry the drawn weights, 0.3 to 0.7 below 0 (to quadrature error)
    lower = (grid.weights * A * (grid.omega < 0)).sum(-1)
    assert bool(((lower > 0.28) & (lower < 0.72)).all())
    # some gaps are wider than the minimum: the data are not all one spectrum
    empty_near_one = (A[:, (grid.omega - 1.0).abs() < 1e-9] == 0).squeeze(-1)
    assert 0 < int(empty_near_one.sum()) < 200


def test_quasiparticle_spectra_have_a_sharp_peak_near_zero():
    grid = uniform_grid(-8.0, 8.0, 1601)  # spacing 0.01, below a quarter of the narrowest width
    A = sample_spectra("quasiparticle", 200, grid, generator=generator(3))
    # the peak (weight Z >= 0.2, centre within 0.2 of 0, width <= 0.2) lies mostly in |w| <= 0.8
    near = (grid.weights * A * (grid.omega.abs() <= 0.8)).sum(-1)
    assert bool((near >= 0.15).all())
    # and it is the tallest feature, near its centre (within 0.2 of 0; the sloping background
    # may move the maximum by a little)
    peak_at = grid.omega[A.argmax(-1)]
    assert bool((peak_at.abs() <= 0.3).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_ranges_scale_with_the_grid(family):
    # ranges are in units of the half-width L: on [-4, 4] the same draws give A(w) -> 2 A(2 w)
    wide = sample_spectra(family, 16, uniform_grid(-8.0, 8.0, 401), generator=generator(4))
    narrow = sample_spectra(family, 16, uniform_grid(-4.0, 4.0, 401), generator=generator(4))
    assert torch.allclose(narrow, 2 * wide, rtol=1e-9, atol=1e-12)


def test_gaussian_mixtures_stay_inside_the_window():
    # centres within 0.5 L and widths below 0.15 L: the outer 5% of the window is nearly empty
    grid = uniform_grid(-8.0, 8.0, 401)
    A = sample_spectra("gaussians", 200, grid, generator=generator(5))
    edge = (grid.weights * A * (grid.omega.abs() > 7.6)).sum(-1)
    assert float(edge.max()) < 1e-3
    counts = set()
    for row in A:  # 1 to 4 components: count the local maxima of well-separated mixtures
        interior = (row[1:-1] > row[:-2]) & (row[1:-1] > row[2:])
        counts.add(int(interior.sum()))
    assert counts <= {1, 2, 3, 4} and {1, 2} <= counts


@pytest.mark.parametrize("family", FAMILIES)
def test_spectra_are_reproducible_from_the_generator(family):
    grid = uniform_grid(-8.0, 8.0, 201)
    first = sample_spectra(family, 8, grid, generator=generator(6))
    again = sample_spectra(family, 8, grid, generator=generator(6))
    other = sample_spectra(family, 8, grid, generator=generator(7))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_sample_spectra_rejects_bad_input():
    grid = uniform_grid(-8.0, 8.0, 101)
    with pytest.raises(HypergradientError, match="unknown family 'gaussian'"):
        sample_spectra("gaussian", 2, grid, generator=generator())
    with pytest.raises(HypergradientError, match="n must be a positive int"):
        sample_spectra("gaussians", 0, grid, generator=generator())
    with pytest.raises(HypergradientError, match="generator must be a torch.Generator"):
        sample_spectra("gaussians", 2, grid, generator=0)
    with pytest.raises(HypergradientError, match=r"omega\[0\] < 0 < omega\[-1\]"):
        sample_spectra("gapped", 2, uniform_grid(0.0, 8.0, 101), generator=generator())


# ---------------------------------------------------------------------------------------------
# noise


def test_independent_noise_has_the_documented_standard_deviation(problem):
    A = sample_spectra("gapped", 1, problem.grid, generator=generator(8))
    G = problem.forward(A).expand(4000, -1)
    rel_sigma = 1e-3
    G_noisy, sigma = add_noise(G, rel_sigma, generator=generator(9))
    # one sigma per spectrum: rel_sigma times the largest |G| (the "floor" form)
    assert torch.equal(sigma, (rel_sigma * G.abs().amax(-1, keepdim=True)).expand_as(G))
    z = (G_noisy - G) / sigma
    n = z.numel()
    assert abs(float(z.mean())) <= 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) <= 5 * math.sqrt(2 / n)
    # every tau point separately (4000 draws each), and no correlation between neighbours
    per_point = z.var(dim=0)
    assert float((per_point - 1).abs().max()) <= 5 * math.sqrt(2 / z.shape[0])
    neighbours = (z[:, 1:] * z[:, :-1]).mean()
    assert abs(float(neighbours)) <= 5 / math.sqrt(z[:, 1:].numel())


def test_correlated_noise_has_the_given_covariance():
    n_tau, draws = 6, 40000
    index = torch.arange(n_tau, dtype=torch.float64)
    scale = 1e-3 * (1 + index / n_tau)  # unequal variances
    covariance = scale[:, None] * scale * 0.7 ** (index[:, None] - index).abs()
    G = torch.linspace(0.5, 0.1, n_tau, dtype=torch.float64).expand(draws, -1)
    G_noisy, sigma = add_noise(G, None, generator=generator(10), covariance=covariance)
    assert torch.allclose(sigma, scale.expand_as(G), rtol=1e-14, atol=0)
    noise = G_noisy - G
    empirical = noise.T @ noise / draws  # the mean is known to be 0
    spread = torch.sqrt((covariance.diag()[:, None] * covariance.diag() + covariance**2) / draws)
    assert bool(((empirical - covariance).abs() <= 5 * spread).all())
    mean = noise.mean(0)
    assert bool((mean.abs() <= 5 * scale / math.sqrt(draws)).all())


def test_zero_noise_leaves_g_unchanged(problem):
    G = problem.forward(sample_spectra("gaussians", 3, problem.grid, generator=generator()))
    G_noisy, sigma = add_noise(G, 0.0, generator=generator())
    assert torch.equal(G_noisy, G) and bool((sigma == 0).all())


def test_noise_is_reproducible_from_the_generator(problem):
    G = problem.forward(sample_spectra("gaussians", 3, problem.grid, generator=generator()))
    first, _ = add_noise(G, 1e-3, generator=generator(11))
    again, _ = add_noise(G, 1e-3, generator=generator(11))
    assert torch.equal(first, again)


def test_add_noise_rejects_bad_input():
    G = torch.full((2, 4), 0.25, dtype=torch.float64)
    for rel_sigma in (-1e-3, float("nan"), float("inf"), "0.01", True):
        with pytest.raises(HypergradientError, match="rel_sigma must be a finite number >= 0"):
            add_noise(G, rel_sigma, generator=generator())
    with pytest.raises(HypergradientError, match="rel_sigma must be None"):
        add_noise(G, 1e-3, generator=generator(), covariance=torch.eye(4, dtype=torch.float64))
    with pytest.raises(HypergradientError, match="generator must be a torch.Generator"):
        add_noise(G, 1e-3, generator=None)
    bad = G.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(HypergradientError, match=r"^add_noise\(rel_sigma=0.001\): G .*NaN/inf"):
        add_noise(bad, 1e-3, generator=generator())
    # the covariance is validated by check_green: shape, symmetry, positive definiteness
    with pytest.raises(HypergradientError, match=r"covariance has shape \(3, 3\)"):
        add_noise(G, None, generator=generator(), covariance=torch.eye(3, dtype=torch.float64))
    asymmetric = torch.eye(4, dtype=torch.float64)
    asymmetric[0, 1] = 0.5
    with pytest.raises(HypergradientError, match="not symmetric"):
        add_noise(G, None, generator=generator(), covariance=asymmetric)
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -1e-6, 1.0], dtype=torch.float64))
    with pytest.raises(HypergradientError, match="not positive definite"):
        add_noise(G, None, generator=generator(), covariance=indefinite)


# ---------------------------------------------------------------------------------------------
# datasets


def test_make_dataset_rows_are_consistent(problem):
    families = ("gaussians", "lorentzians", "gapped", "quasiparticle")
    data = make_dataset(problem, families, 5, 1e-3, seed=0)
    assert isinstance(data, SpectralDataset) and len(data) == 20
    assert data.family == [name for name in families for _ in range(5)]
    assert data.rel_sigma == 1e-3
    assert data.A.shape == (20, problem.n_w) and data.G_noisy.shape == (20, problem.n_tau)
    # computed block by block: equal to the whole batch's product up to summation order
    assert torch.allclose(data.G, problem.forward(data.A), rtol=1e-13, atol=1e-15)
    assert torch.equal(data.sigma, (1e-3 * data.G.abs().amax(-1, keepdim=True)).expand_as(data.G))
    assert not torch.equal(data.G_noisy, data.G)


def test_make_dataset_is_reproducible_and_blockwise_independent(problem):
    first = make_dataset(problem, ("gaussians", "gapped"), 4, 1e-3, seed=5)
    again = make_dataset(problem, ("gaussians", "gapped"), 4, 1e-3, seed=5)
    for name in ("A", "G", "G_noisy", "sigma"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    other_seed = make_dataset(problem, ("gaussians", "gapped"), 4, 1e-3, seed=6)
    assert not torch.allclose(first.A, other_seed.A)
    # a family's rows do not depend on which other families are listed, nor on their order
    alone = make_dataset(problem, ("gapped",), 4, 1e-3, seed=5)
    swapped = make_dataset(problem, ("gapped", "gaussians"), 4, 1e-3, seed=5)
    assert torch.equal(first.A[4:], alone.A) and torch.equal(first.G_noisy[4:], alone.G_noisy)
    assert torch.equal(first.A[4:], swapped.A[:4])
    # the same spectra at every noise level, with noise of the requested size
    quieter = make_dataset(problem, ("gaussians", "gapped"), 4, 1e-5, seed=5)
    assert torch.equal(quieter.A, first.A)
    assert torch.allclose(quieter.sigma, first.sigma * 1e-2, rtol=1e-12, atol=0)


def test_make_dataset_rejects_bad_input(problem):
    with pytest.raises(HypergradientError, match="repeats a name"):
        make_dataset(problem, ("gapped", "gapped"), 2, 1e-3, seed=0)
    with pytest.raises(HypergradientError, match="families must be a non-empty selection"):
        make_dataset(problem, ("bands",), 2, 1e-3, seed=0)
    with pytest.raises(HypergradientError, match="families must be a non-empty selection"):
        make_dataset(problem, (), 2, 1e-3, seed=0)
    with pytest.raises(HypergradientError, match="n_per_family must be a positive int"):
        make_dataset(problem, ("gapped",), 0, 1e-3, seed=0)
    with pytest.raises(HypergradientError, match="seed must be an int >= 0"):
        make_dataset(problem, ("gapped",), 2, 1e-3, seed=-1)
    with pytest.raises(HypergradientError, match="problem must be a continuation Problem"):
        make_dataset(problem.grid, ("gapped",), 2, 1e-3, seed=0)
    with pytest.raises(HypergradientError, match="rel_sigma must be a finite number"):
        make_dataset(problem, ("gapped",), 2, None, seed=0)
    with pytest.raises(HypergradientError, match="SpectralDataset: got shapes"):
        data = make_dataset(problem, ("gapped",), 2, 1e-3, seed=0)
        SpectralDataset(data.A, data.G, data.G_noisy, data.sigma, ["gapped"], 1e-3)


def test_split_by_family_has_no_overlap(problem):
    data = make_dataset(problem, FAMILIES, 3, 1e-3, seed=1)
    seen, unseen = split_by_family(data)
    assert set(seen.family) == {"gaussians", "lorentzians", "gapped"}
    assert set(unseen.family) == {"quasiparticle"}
    assert len(seen) + len(unseen) == len(data)
    # every row lands on exactly one side, unchanged and in order
    assert torch.equal(torch.cat([seen.A, unseen.A]), data.A)
    assert torch.equal(torch.cat([seen.G_noisy, unseen.G_noisy]), data.G_noisy)
    seen_rows = {tuple(row.tolist()) for row in seen.A}
    assert not seen_rows & {tuple(row.tolist()) for row in unseen.A}

    seen, unseen = split_by_family(data, held_out=("gapped", "lorentzians"))
    assert set(seen.family).isdisjoint(unseen.family) and len(unseen) == 6
    seen, unseen = split_by_family(data, held_out="gaussians")  # one name
    assert set(unseen.family) == {"gaussians"}
    only_gaussians = make_dataset(problem, ("gaussians",), 2, 1e-3, seed=1)
    seen, unseen = split_by_family(only_gaussians)  # nothing held out: an empty unseen set
    assert len(seen) == 2 and len(unseen) == 0 and unseen.A.shape == (0, problem.n_w)
    with pytest.raises(HypergradientError, match="unknown families"):
        split_by_family(data, held_out=("qp",))


# ---------------------------------------------------------------------------------------------
# the held-out test set on disk


def write_small(folder, problem):
    return write_test_set(
        folder,
        problem,
        families=("gaussians", "quasiparticle"),
        n_per_family=3,
        rel_sigmas=(1e-2, 1e-4),
        seed=2024,
    )


def test_test_set_round_trip(tmp_path, problem):
    folder = write_small(tmp_path / "held_out", problem)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / manifest["tensor_file"]).read_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["families"] == ["gaussians", "quasiparticle"]
    assert manifest["rel_sigmas"] == [1e-2, 1e-4] and manifest["seed"] == 2024
    assert manifest["problem"]["beta"] == 10.0 and manifest["problem"]["n_tau"] == 51

    loaded, sets = load_test_set(folder)
    assert torch.equal(loaded.tau, problem.tau) and loaded.beta == problem.beta
    assert torch.equal(loaded.grid.omega, problem.grid.omega)
    assert torch.equal(loaded.grid.weights, problem.grid.weights)
    assert loaded.statistics == problem.statistics
    assert list(sets) == [1e-2, 1e-4]
    for rel_sigma, held_out in sets.items():
        fresh = make_dataset(
            problem, ("gaussians", "quasiparticle"), 3, rel_sigma, seed=2024
        )  # fmt: skip
        for name in ("A", "G", "G_noisy", "sigma"):
            assert torch.equal(getattr(held_out, name), getattr(fresh, name)), name
        assert held_out.family == fresh.family and held_out.rel_sigma == rel_sigma
    # writing again gives the same tensors (the set is fixed by its arguments)
    write_small(tmp_path / "again", problem)
    _, again = load_test_set(tmp_path / "again")
    assert torch.equal(again[1e-2].G_noisy, sets[1e-2].G_noisy)


def test_a_flipped_byte_fails_the_checksum(tmp_path, problem):
    folder = write_small(tmp_path, problem)
    tensor_file = folder / "test_set.pt"
    data = bytearray(tensor_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(HypergradientError, match=r"^load_test_set\(.*\): sha256 mismatch: "):
        load_test_set(folder)


def test_load_test_set_reports_missing_and_foreign_files(tmp_path, problem):
    with pytest.raises(HypergradientError, match="could not read manifest.json"):
        load_test_set(tmp_path / "nothing here")
    folder = write_small(tmp_path / "set", problem)
    (folder / "test_set.pt").unlink()
    with pytest.raises(HypergradientError, match="could not read the tensor file"):
        load_test_set(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HypergradientError, match=r"lacks the entries \['sha256'\]"):
        load_test_set(folder)
    (folder / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(HypergradientError, match="has format 'something else'"):
        load_test_set(folder)


def test_write_test_set_rejects_bad_noise_levels(tmp_path, problem):
    for levels in ((), (1e-3, 1e-3), (-1e-3,)):
        with pytest.raises(HypergradientError, match="rel_sigmas must be distinct numbers"):
            write_test_set(
                tmp_path, problem, families=("gapped",), n_per_family=1, rel_sigmas=levels, seed=0
            )
    assert not (tmp_path / "manifest.json").exists()
