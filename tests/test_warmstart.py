"""``hypergradient.search.warmstart``: warm-starting BO from similar datasets (Kim et al. 2017).

* Meta-features are invariant to the order of the examples (DeepSets mean pooling) and the
  instance features to the order of the input features; datasets of any width map to the same
  12 numbers per example.
* The Siamese loss is the papers.md formula, and it falls during meta-training.
* The training works: on held-out tasks of a small meta-dataset (digit pairs, breast_cancer,
  diabetes, wine and iris tasks, 5 x 5 grid), the rank correlation of meta-feature distance
  with surface distance (``surface_rank_correlation``) of the trained network exceeds the
  untrained networks' mean by more than 3 of their standard deviations (measured over 8
  initialisations); the untrained and the one-step-trained networks do not.  The nearest
  training task by learned meta-feature has a closer response surface than a random one.
* Classical (pymfe) meta-features are one fixed-length vector for datasets of any width,
  undefined entries are NaN and the warm starter fills them; without pymfe the error names
  the extra.
* Enqueued warm-start configurations are the first trials a study evaluates; a surface cell
  is computed exactly as scikit-learn's standardise + SVC cross-validation computes it.
* The benchmark's saved choices (meta-training steps, pymfe groups) were made on a validation
  family other than each test family, by the scores it saved.
* Every documented misuse raises ``HypergradientError`` with a message that says what to do.

Small grid (5 x 5, 2 folds) and small tasks (<= 80 rows) keep the file at a few seconds.
"""

import importlib.util
import itertools

import numpy as np
import pytest
import torch

optuna = pytest.importorskip("optuna")
pytest.importorskip("sklearn")

import _readme  # noqa: E402
from _datasets import DATASETS, needs_mnist  # noqa: E402
from hypergradient import HypergradientError, search  # noqa: E402
from hypergradient.search import warmstart as ws  # noqa: E402

GRID = ws.SurfaceGrid(
    log10_C=tuple(np.linspace(-2, 4, 5).tolist()),
    log10_gamma_d=tuple(np.linspace(-4, 1.5, 5).tolist()),
    folds=2,
)


@pytest.fixture(autouse=True)
def _quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    yield
    optuna.logging.set_verbosity(verbosity)


FAMILIES = ("digits", "breast_cancer", "diabetes", "wine", "iris")


@pytest.fixture(scope="module")
def meta() -> ws.MetaDataset:
    """Five families with distinct surfaces (easy digit pairs ... hard diabetes), 32 tasks."""
    tasks = ws.sklearn_tasks(FAMILIES, seed=0, max_rows=80)
    digits = [t for t in tasks if t.family == "digits"][::5]  # 9 of the 45 pairs
    rest = [t for t in tasks if t.family != "digits"][::2]
    return ws.build_meta_dataset(tasks=digits + rest, grid=GRID)


def _split(meta: ws.MetaDataset) -> tuple[ws.MetaDataset, list[ws.Task]]:
    """Every third task of each family is held out; the rest is meta-training."""
    train, held = [], []
    for family in meta.families:
        for k, task in enumerate(meta.family(family)):
            (held if k % 3 == 0 else train).append(task)
    return ws.MetaDataset(tuple(train), meta.grid), held


NET = {"rows": 32, "hidden": 32, "out_features": 8}
FEATURE_CACHE: dict = {}  # instance features by task name, shared by the trainings below


def _train(meta, steps, seed=0) -> ws.WarmStarter:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return ws.train_meta_features(
            meta, steps=steps, seed=seed, feature_cache=FEATURE_CACHE, **NET
        )
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def trained(meta):
    train, held = _split(meta)
    return _train(train, steps=300), held


@pytest.fixture(scope="module")
def untrained_threshold(meta):
    """The bar a trained network must clear: the rank correlation of 8 *untrained*
    initialisations on the held-out tasks, mean + 3 standard deviations (measured: 0.25 +
    3 x 0.074 = 0.47; the trained network reaches 0.83)."""
    train, held = _split(meta)
    scores = [ws.surface_rank_correlation(_train(train, 0, seed), held) for seed in range(8)]
    return float(np.mean(scores) + 3 * np.std(scores, ddof=1)), scores


# ----------------------------------------------------------------------------- features


def test_meta_features_are_invariant_to_example_order_and_feature_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 7))
    y = (x[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(int)
    features = ws.instance_features(x, y)
    assert features.shape == (40, ws.INSTANCE_FEATURES)
    perm = rng.permutation(40)
    # the features of a permuted dataset are the permuted features (same numbers per example)
    torch.testing.assert_close(ws.instance_features(x[perm], y[perm]), features[perm])
    # distances do not depend on the order of the input features, nor on their units
    columns = rng.permutation(7)
    torch.testing.assert_close(ws.instance_features(x[:, columns], y), features)
    torch.testing.assert_close(ws.instance_features(3.0 * x + 1.0, y), features)
    net = ws.MetaFeatureNet(hidden=16, out_features=4)
    torch.testing.assert_close(net(features[perm]), net(features), rtol=1e-12, atol=1e-12)
    batch = torch.stack([features, features[perm]])
    out = net(batch)
    assert out.shape == (2, 4)
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)


def test_instance_features_are_dimension_agnostic_and_read_the_kernel_distances():
    rng = np.random.default_rng(1)
    narrow = ws.instance_features(rng.normal(size=(30, 3)), np.arange(30) % 2)
    wide = ws.instance_features(rng.normal(size=(30, 300)), np.arange(30) % 2)
    assert narrow.shape == wide.shape == (30, ws.INSTANCE_FEATURES)
    # hand computation for example 0 of a tiny task: standardise, D_ij = |z_i - z_j|^2 / d
    x = rng.normal(size=(6, 2))
    y = np.array([0, 0, 0, 1, 1, 1])
    z = (x - x.mean(0)) / x.std(0)
    d = ((z[:, None] - z[None]) ** 2).sum(-1) / 2
    logd = np.log(d + 1e-3)
    expected_same = np.quantile(logd[0, [1, 2]], ws.QUANTILES)
    expected_other = np.quantile(logd[0, [3, 4, 5]], ws.QUANTILES)
    row = ws.instance_features(x, y)[0].numpy()
    np.testing.assert_allclose(row[:5], expected_same, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(row[5:10], expected_other, rtol=1e-10, atol=1e-10)
    assert row[10] == 0.5 and row[11] == -1.0  # class share, label as -1/+1


def test_siamese_loss_is_the_papers_formula():
    rng = np.random.default_rng(2)
    m = torch.as_tensor(rng.normal(size=(4, 3)))
    surfaces = rng.random((4, 5, 5))
    t = torch.as_tensor([[ws.surface_distance(a, b) for b in surfaces] for a in surfaces])
    # (||m_i - m_j|| - ||e_i - e_j||_1 / G)^2 averaged over the 6 pairs i < j
    expected = np.mean(
        [
            (np.linalg.norm(m[i] - m[j]) - np.abs(surfaces[i] - surfaces[j]).sum() / 25) ** 2
            for i, j in itertools.combinations(range(4), 2)
        ]
    )
    assert float(ws.siamese_loss(m, t)) == pytest.approx(expected, rel=1e-9)


def test_siamese_loss_decreases_in_training(trained):
    starter, _ = trained
    losses = np.array(starter.losses)
    assert np.isfinite(losses).all()
    # the first steps fit random meta-features; after 300 Adam steps the distances match
    # the surface distances much better (measured ratio about 0.1; the bound leaves room)
    assert losses[-20:].mean() < 0.5 * losses[:20].mean()
    assert starter.embeddings.shape == (len(starter.tasks), 8)


def test_trained_meta_features_order_surfaces_beyond_the_untrained_spread(
    trained, untrained_threshold
):
    # the claim of the Siamese training: on tasks it never saw, meta-feature distances rank
    # the meta-training tasks by response-surface distance, better than the network's
    # architecture and input features alone do (an untrained network keeps both)
    starter, held = trained
    threshold, _ = untrained_threshold
    assert ws.surface_rank_correlation(starter, held) > threshold


def test_untrained_and_one_step_networks_fail_the_criterion(meta, untrained_threshold):
    # the criterion above is not met by chance: no untrained initialisation, nor the network
    # after a single Adam step, reaches it (measured: at most 0.37 and 0.36 vs the bar 0.47)
    train, held = _split(meta)
    threshold, untrained_scores = untrained_threshold
    assert max(untrained_scores) < threshold
    one_step = ws.surface_rank_correlation(_train(train, steps=1), held)
    assert one_step < threshold
    # steps=0 is the initialisation that training starts from (same seed, same inputs)
    untrained = _train(train, steps=0)
    assert untrained.losses == [] and untrained.net is not None
    assert ws.surface_rank_correlation(untrained, held) == untrained_scores[0]


def test_nearest_neighbour_surface_distance_beats_random(trained):
    starter, held = trained
    learned, random_mean = [], []
    for task in held:
        nearest = starter.nearest(task, 1)[0][0]
        learned.append(ws.surface_distance(task.surface, nearest.surface))
        random_mean.append(
            np.mean([ws.surface_distance(task.surface, t.surface) for t in starter.tasks])
        )
    # the families' surfaces differ (easy digit pairs vs noisy diabetes thresholds) and the
    # meta-features separate them: the nearest neighbour is far closer than a random one.
    # This checks retrieval, not training: an untrained network passes it too (its inputs
    # alone find close neighbours); the training is tested by the rank-correlation bar above.
    assert np.mean(learned) < 0.6 * np.mean(random_mean)
    assert np.mean(np.array(learned) < np.array(random_mean)) >= 0.75


# ----------------------------------------------------------------------------- search


def test_warm_start_configs_are_the_distinct_best_cells_of_the_nearest_tasks(trained):
    starter, held = trained
    task = held[0]
    configs = ws.warm_start_configs(starter, task, k=3)
    assert len(configs) == 3
    cells = [(c[ws.C_PARAM], c[ws.GAMMA_PARAM]) for c in configs]
    assert len(set(cells)) == 3
    neighbours = [t for t, _ in starter.nearest(task, len(starter.tasks))]
    assert cells[0] == neighbours[0].best_cell()
    # each config is the best cell of some neighbour, taken in order of distance
    order = [next(k for k, t in enumerate(neighbours) if t.best_cell() == c) for c in cells]
    assert order == sorted(order)


def test_best_cell_prefers_the_middle_of_a_plateau():
    surface = np.full((5, 5), 0.5)
    surface[1:4, 1:5] = 0.0  # a 3 x 4 plateau of zero error; the first zero is (1, 1)
    task = ws.Task("t", "f", np.zeros((4, 1)), np.array([0, 0, 1, 1]), surface)
    # (2, 2) and (2, 3) are surrounded by zeros; the smoothed score breaks the tie at (2, 2)
    assert task.best_cell() == (2, 2)


def test_enqueued_trials_are_evaluated_first():
    configs = [GRID.params((4, 0)), GRID.params((0, 4)), GRID.params((2, 2))]
    study = search.create_study(
        "warm", storage="sqlite:///:memory:", sampler=ws.gp_sampler(seed=0, startup_trials=3)
    )
    assert ws.enqueue_warm_start(study, configs) == 3
    seen = []

    def objective(trial):
        seen.append(GRID.suggest(trial))
        return float(sum(seen[-1]))

    search.optimize(study, objective, n_trials=6)
    assert seen[:3] == [(4, 0), (0, 4), (2, 2)]
    assert [t.params for t in study.trials[:3]] == configs
    assert len(study.trials) == 6


def test_surface_search_starts_from_the_enqueued_configs_and_tracks_the_best():
    surface = np.random.default_rng(3).random(GRID.shape)
    best = np.unravel_index(int(np.argmin(surface)), GRID.shape)
    warm = ws.surface_search(surface, GRID, warm_start=[GRID.params(best)], n_trials=4)
    np.testing.assert_allclose(warm, surface.min())  # the optimum first: regret 0 throughout
    assert np.all(ws.normalised_regret(warm, surface) == 0)
    cold = ws.surface_search(surface, GRID, n_trials=8, seed=1)
    assert cold.shape == (8,) and np.all(np.diff(cold) <= 0)
    assert set(cold.tolist()) <= set(surface.ravel().tolist())  # every trial is a grid cell
    via_sqlite = ws.surface_search(surface, GRID, n_trials=8, seed=1, storage="sqlite:///:memory:")
    np.testing.assert_array_equal(via_sqlite, cold)  # same sampler seed, same trials
    assert np.all(ws.normalised_regret(np.array([0.3]), np.full((2, 2), 0.3)) == 0)


def test_svm_surface_cell_matches_scikit_learn_cross_validation(meta):
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    task = meta.family("breast_cancer")[0]
    c, gamma = GRID.hyperparameters((3, 2), task.x.shape[1])
    model = make_pipeline(StandardScaler(), SVC(C=c, gamma=gamma))
    folds = StratifiedKFold(GRID.folds, shuffle=True, random_state=GRID.seed)
    accuracy = cross_val_score(model, task.x, task.y, cv=folds).mean()
    assert task.surface[3, 2] == pytest.approx(1 - accuracy, abs=1e-12)
    assert task.surface.shape == GRID.shape
    assert meta.families == FAMILIES


@needs_mnist
def test_image_pair_tasks_from_mnist():
    tasks = ws.image_pair_tasks("mnist", DATASETS, pairs=2, rows=50, seed=0)
    assert len(tasks) == 2
    for task in tasks:
        assert task.x.shape == (50, 196) and task.family == "mnist"
        assert set(np.unique(task.y).tolist()) == {0, 1}
        assert task.x.min() >= 0.0 and task.x.max() <= 1.0


def test_subsamples_add_tasks_after_the_default_ones():
    base = ws.sklearn_tasks(["wine", "diabetes"], seed=0, max_rows=80)
    more = ws.sklearn_tasks(["wine", "diabetes"], seed=0, max_rows=80, subsamples=2)
    assert (len(base), len(more)) == (12 + 9, 18 + 18)
    by_name = {t.name: t for t in more}
    assert len(by_name) == len(more)  # names stay unique
    for task in base:  # the default tasks are unchanged by asking for more
        np.testing.assert_array_equal(by_name[task.name].x, task.x)


# ----------------------------------------------------------------------------- classical


def test_classical_meta_features_are_fixed_length_with_nan_for_undefined_entries():
    pytest.importorskip("pymfe")
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 15)
    narrow, names = ws.classical_meta_features(
        rng.normal(size=(30, 3)), y, ["statistical"], return_names=True
    )
    wide = ws.classical_meta_features(rng.normal(size=(30, 50)), y, ["statistical"])
    assert narrow.shape == wide.shape == (len(names),) and narrow.dtype == np.float64
    # a constant column has no correlation, skewness or kurtosis: NaN, never inf
    flat = np.c_[rng.normal(size=(30, 2)), np.ones(30)]
    state = np.random.get_state()
    values = ws.classical_meta_features(flat, y, ["statistical"])
    assert np.isnan(values[names.index("cor.mean")]) and not np.isinf(values).any()
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # pymfe seeds numpy; restored
    # the correlations are what numpy computes (the summary over attribute pairs)
    x = rng.normal(size=(30, 3))
    x[:, 1] += x[:, 0]
    corr = np.abs(np.corrcoef(x.T)[np.triu_indices(3, 1)])
    values = ws.classical_meta_features(x, y, ["statistical"])
    assert values[names.index("cor.mean")] == pytest.approx(corr.mean(), rel=1e-9)


def test_classical_warm_starter_fills_missing_entries_and_finds_alike_tasks():
    pytest.importorskip("pymfe")
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 20)
    grid = ws.SurfaceGrid(log10_C=(0.0, 1.0), log10_gamma_d=(0.0, 1.0))

    def task(name, shift, constant=False):
        x = rng.normal(size=(40, 4)) + shift * y[:, None]
        if constant:  # undefined correlations for this task: NaN, filled by the median
            x[:, 3] = 1.0
        return ws.Task(name, "f", x, y, surface=np.full((2, 2), 1.0 / (1 + shift)))

    meta = ws.MetaDataset((task("a", 0.0), task("b", 1.0, True), task("c", 5.0)), grid)
    features = {}
    starter = ws.classical_warm_starter(meta, groups=["statistical"], features=features)
    assert set(features) == {"a", "b", "c"}  # measured once, kept for the next starter
    assert starter.net is None and torch.isfinite(starter.embeddings).all()
    again = ws.classical_warm_starter(meta, groups=["statistical"], features=features)
    torch.testing.assert_close(again.embeddings, starter.embeddings)
    new = task("new", 5.0)
    assert starter.nearest(new, 1)[0][0].name == "c"
    assert ws.warm_start_configs(starter, new, k=1) == [grid.params(meta.tasks[2].best_cell())]


def test_missing_pymfe_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pymfe", None)
    monkeypatch.setitem(sys.modules, "pymfe.mfe", None)
    with pytest.raises(HypergradientError, match=r"hypergradient\[meta-features\]"):
        ws.classical_meta_features(np.zeros((4, 2)), [0, 0, 1, 1])


def test_benchmark_tuned_nothing_on_its_test_families():
    # benchmarks/warmstart_bo.py chooses the meta-training steps and the pymfe groups for each
    # test family on another family (its validation family), by the validation score it saved
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks/results/warmstart_bo.json"
    result = json.loads(path.read_text())
    assert set(result["choices"]) == set(result["families"])
    for family, choice in result["choices"].items():
        assert choice["validation_family"] in result["families"]
        assert choice["validation_family"] != family
        steps = {int(k): tuple(v) for k, v in choice["steps_scores"].items()}
        assert set(steps) == set(result["step_choices"])
        assert choice["steps"] == min(steps, key=steps.get)
        groups = {k: tuple(v) for k, v in choice["groups_scores"].items()}
        assert set(groups) == set(result["group_choices"])
        assert choice["groups"] == min(groups, key=groups.get)


# ----------------------------------------------------------------------------- errors


def test_clear_errors(meta, trained, tmp_path):
    starter, held = trained
    with pytest.raises(HypergradientError, match="binary task"):
        ws.svm_surface(np.zeros((6, 2)), np.arange(6) % 3, GRID)
    with pytest.raises(HypergradientError, match="at least 2 examples"):
        ws.instance_features(np.random.default_rng(0).normal(size=(5, 2)), [0, 0, 0, 0, 1])
    with pytest.raises(HypergradientError, match=r"shape \(n, d\)"):
        ws.instance_features(np.zeros(5), np.zeros(5))
    with pytest.raises(HypergradientError, match="NaN"):
        ws.svm_surface(np.full((6, 2), np.nan), np.arange(6) % 2, GRID)
    with pytest.raises(HypergradientError, match="fewer than grid.folds"):
        x = np.random.default_rng(0).normal(size=(6, 2))
        ws.svm_surface(x, [0, 0, 0, 0, 1, 1], ws.SurfaceGrid(folds=3))
    with pytest.raises(HypergradientError, match="folds"):
        ws.SurfaceGrid(folds=1)
    with pytest.raises(HypergradientError, match="at least 2 finite"):
        ws.SurfaceGrid(log10_C=(1.0,))
    with pytest.raises(HypergradientError, match="outside"):
        GRID.params((5, 0))
    with pytest.raises(HypergradientError, match="unknown"):
        ws.build_meta_dataset(["cifar"])
    with pytest.raises(HypergradientError, match="at least 2"):
        ws.build_meta_dataset(tasks=meta.tasks[:1], grid=GRID)
    with pytest.raises(HypergradientError, match="non-empty list"):
        ws.sklearn_tasks(["mnist"])
    with pytest.raises(HypergradientError, match="family"):
        ws.image_pair_tasks("digits", tmp_path)
    with pytest.raises(HypergradientError, match="mnist"):
        ws.image_pair_tasks("mnist", tmp_path, pairs=1)  # no files in tmp_path
    with pytest.raises(HypergradientError, match="no surface"):
        ws.Task("t", "f", np.zeros((4, 1)), np.array([0, 0, 1, 1])).best_cell()
    with pytest.raises(HypergradientError, match="not in the meta-dataset"):
        ws.train_meta_features(meta, exclude_families=["mnist"])
    with pytest.raises(HypergradientError, match="need at least 2"):
        ws.train_meta_features(meta, exclude_families=list(meta.families))
    with pytest.raises(HypergradientError, match="MetaDataset"):
        ws.train_meta_features(list(meta.tasks))
    with pytest.raises(HypergradientError, match="lr"):
        ws.train_meta_features(meta, lr=0.0)
    with pytest.raises(HypergradientError, match="weight_decay"):
        ws.train_meta_features(meta, weight_decay=-1.0)
    with pytest.raises(HypergradientError, match="shared grid"):
        ws.surface_distance(np.zeros((5, 5)), np.zeros((10, 10)))
    with pytest.raises(HypergradientError, match=r"\(n, 12\)"):
        ws.MetaFeatureNet()(torch.zeros(5, 3))
    with pytest.raises(HypergradientError, match="hidden"):
        ws.MetaFeatureNet(hidden=0)
    with pytest.raises(HypergradientError, match="out_features"):
        ws.MetaFeatureNet(out_features=0)
    with pytest.raises(HypergradientError, match="empty"):
        ws.MetaFeatureNet()(torch.zeros(0, ws.INSTANCE_FEATURES))
    with pytest.raises(HypergradientError, match="max_rows"):
        ws.sklearn_tasks(["iris"], max_rows=10)
    with pytest.raises(HypergradientError, match="pairs"):
        ws.image_pair_tasks("mnist", tmp_path, pairs=46)
    with pytest.raises(HypergradientError, match="rows"):
        ws.image_pair_tasks("mnist", tmp_path, rows=5)
    with pytest.raises(HypergradientError, match="n_trials"):
        ws.surface_search(np.zeros(GRID.shape), GRID, n_trials=0)
    with pytest.raises(HypergradientError, match="T >= 2"):
        ws.siamese_loss(torch.zeros(1, 3), torch.zeros(1, 1))
    with pytest.raises(HypergradientError, match=r"k=0.*\[1, "):
        ws.warm_start_configs(starter, held[0], k=0)
    with pytest.raises(HypergradientError, match="WarmStarter"):
        ws.warm_start_configs(object(), held[0])
    study = optuna.create_study()
    with pytest.raises(HypergradientError, match="non-empty list"):
        ws.enqueue_warm_start(study, [])
    with pytest.raises(HypergradientError, match="non-empty list"):
        ws.enqueue_warm_start(study, {"c_index": 1})
    with pytest.raises(HypergradientError, match="parameter name"):
        ws.enqueue_warm_start(study, [{"c_index": 1}, 3])
    with pytest.raises(HypergradientError, match="does not match"):
        ws.surface_search(np.zeros((3, 3)), GRID)
    with pytest.raises(HypergradientError, match="startup_trials"):
        ws.gp_sampler(startup_trials=0)
    with pytest.raises(HypergradientError, match="steps"):
        ws.train_meta_features(meta, steps=-1)
    with pytest.raises(HypergradientError, match="subsamples"):
        ws.sklearn_tasks(["iris"], subsamples=0)
    with pytest.raises(HypergradientError, match="WarmStarter"):
        ws.surface_rank_correlation(object(), held)
    with pytest.raises(HypergradientError, match="at least 1 task"):
        ws.surface_rank_correlation(starter, [])
    with pytest.raises(HypergradientError, match="MetaDataset"):
        ws.classical_warm_starter(list(meta.tasks))
    with pytest.raises(HypergradientError, match="not in the meta-dataset"):
        ws.classical_warm_starter(meta, exclude_families=["mnist"])
    with pytest.raises(HypergradientError, match="need at least 2"):
        ws.classical_warm_starter(meta, exclude_families=list(meta.families))
    if importlib.util.find_spec("pymfe") is not None:
        x2 = np.random.default_rng(0).normal(size=(6, 2))
        with pytest.raises(HypergradientError, match=r"shape \(n, d\)"):
            ws.classical_meta_features(np.zeros(6), np.arange(6) % 2)
        with pytest.raises(HypergradientError, match="NaN"):
            ws.classical_meta_features(np.full((6, 2), np.nan), np.arange(6) % 2)
        with pytest.raises(HypergradientError, match="at least 2 classes"):
            ws.classical_meta_features(x2, [0, 0, 0, 0, 0, 1])
        with pytest.raises(HypergradientError, match="groups"):
            ws.classical_meta_features(x2, np.arange(6) % 2, groups=["stats"])
        with pytest.raises(HypergradientError, match="max_features"):
            ws.classical_meta_features(x2, np.arange(6) % 2, max_features=0)


# ----------------------------------------------------------------------------- README


README_EXAMPLE = _readme.example(
    "warm_start_configs",
    trials="len(study.trials)",
    first_params="[t.params for t in study.trials[:3]]",
    configs="configs",
    first="min(new.surface[c['c_index'], c['gamma_index']] for c in configs)",
    best="study.best_value",
)


def test_readme_warm_start_example_runs():
    run = README_EXAMPLE.run()  # in a fresh interpreter, as a reader pastes it
    values = run.values
    assert values["trials"] == 10
    assert values["first_params"] == values["configs"]  # the warm start ran first
    assert values["best"] <= values["first"]
    # the example writes its study under hypergradient-runs/ in the working directory
    assert (run.cwd / "hypergradient-runs/warm-start/study.db").is_file()
