"""hypergradient.meta: episodes, MAML / first-order MAML / iMAML / hyper-representation
meta-gradients against closed forms, dense solves, finite differences and the core
unrolled hypergradient; memory accounting; every error message."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

import _readme
import hypergradient as hg
from _datasets import OMNIGLOT_DATASETS as DATASETS
from _datasets import needs_omniglot, skip_reason
from hypergradient import HypergradientError, meta
from hypergradient.meta._base import pull_back
from hypergradient.testing import finite_difference_hypergrad, relative_error


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaves(theta):
    return {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}


# ----------------------------------------------------------------------------- episodes


def test_classification_episodes_are_seeded_n_way_k_shot_with_disjoint_examples():
    # class c, example e holds the value 100 c + e everywhere: it can be traced back
    classes, examples = 7, 6
    ids = 100 * torch.arange(classes)[:, None] + torch.arange(examples)[None, :]
    pool = ids[:, :, None, None].double().expand(classes, examples, 2, 2).clone()
    tasks = meta.ClassificationTasks(pool, ways=3, shots=2, queries=3)
    ep = tasks.sample(_gen(0))
    assert ep.x_support.shape == (6, 2, 2) and ep.x_query.shape == (9, 2, 2)
    assert ep.y_support.tolist() == [0, 0, 1, 1, 2, 2]
    assert ep.y_query.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ep.ways == 3
    support_ids = ep.x_support[:, 0, 0].long()
    query_ids = ep.x_query[:, 0, 0].long()
    # every label is one class of the pool, different labels are different classes
    cls_of = {lab: set() for lab in range(3)}
    ids = support_ids.tolist() + query_ids.tolist()
    for i, lab in zip(ids, ep.y_support.tolist() + ep.y_query.tolist()):
        cls_of[lab].add(i // 100)
    assert all(len(s) == 1 for s in cls_of.values())
    assert len(set().union(*cls_of.values())) == 3
    # support and query never share an example
    assert not set(support_ids.tolist()) & set(query_ids.tolist())
    # the same generator state gives the same episode, another one another episode
    again = tasks.sample(_gen(0))
    assert all(torch.equal(a, b) for a, b in zip(ep, again))
    assert not torch.equal(tasks.sample(_gen(1)).x_query, ep.x_query)
    batch = tasks.sample_batch(3, _gen(0))
    assert torch.equal(batch[0].x_query, ep.x_query) and len(batch) == 3


def test_with_rotations_adds_each_class_rotated_by_multiples_of_90_degrees():
    images = torch.arange(2 * 3 * 1 * 4 * 4, dtype=torch.float64).reshape(2, 3, 1, 4, 4)
    rotated = meta.with_rotations(images)
    assert rotated.shape == (8, 3, 1, 4, 4)
    assert torch.equal(rotated[:2], images)
    assert torch.equal(rotated[2 + 1, 0, 0], torch.rot90(images[1, 0, 0], 1))
    assert torch.equal(rotated[6 + 0, 2, 0], torch.rot90(images[0, 2, 0], 3))
    assert meta.with_rotations(images, 2).shape[0] == 4


def test_sinusoid_tasks_follow_a_sine_with_amplitude_and_phase_in_range():
    tasks = meta.SinusoidTasks(shots=7, queries=30)
    ep = tasks.sample(_gen(3))
    x = torch.cat([ep.x_support, ep.x_query])[:, 0]
    y = torch.cat([ep.y_support, ep.y_query])[:, 0]
    assert ep.ways is None and ep.x_support.shape == (7, 1) and ep.y_query.shape == (30, 1)
    assert bool((x.abs() <= 5).all())
    # y = a sin x - b cos x with a = A cos(phase), b = A sin(phase): linear least squares
    design = torch.stack([torch.sin(x), -torch.cos(x)], dim=1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    torch.testing.assert_close(design @ coef, y)
    amplitude = float(coef.norm())
    phase = float(torch.atan2(coef[1], coef[0]))
    assert 0.1 <= amplitude <= 5.0 and 0.0 <= phase <= torch.pi


def test_linear_tasks_without_noise_are_exactly_linear_around_the_mean():
    mean = torch.arange(4.0)
    tasks = meta.LinearTasks(dim=4, shots=5, queries=10, spread=0.0, noise=0.0, mean=mean)
    ep = tasks.sample(_gen(0))
    torch.testing.assert_close(ep.y_support[:, 0], ep.x_support @ mean)
    torch.testing.assert_close(ep.y_query[:, 0], ep.x_query @ mean)


def test_nearest_neighbour_predicts_the_label_or_target_of_the_closest_support_input():
    support = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 9.0]])
    query = torch.tensor([[1.0, 1.0], [4.0, 6.0], [0.0, 7.0], [-1.0, 0.5]])
    ep = meta.Episode(support, torch.tensor([2, 0, 1]), query, torch.tensor([2, 0, 1, 2]))
    assert meta.nearest_neighbour_predict(ep).tolist() == [2, 0, 1, 2]
    regression = meta.Episode(support, torch.tensor([[1.0], [2.0], [3.0]]), query, query[:, :1])
    assert meta.nearest_neighbour_predict(regression)[:, 0].tolist() == [1.0, 2.0, 3.0, 1.0]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: meta.ClassificationTasks(torch.zeros(5, 4), 2, 1, 1),
            "images must be a tensor of shape",
        ),
        (
            lambda: meta.ClassificationTasks(torch.zeros(5, 4, 2, dtype=torch.int64), 2, 1, 1),
            "floating dtype",
        ),
        (lambda: meta.ClassificationTasks(torch.zeros(5, 4, 2), 6, 1, 1), "only 5 classes"),
        (lambda: meta.ClassificationTasks(torch.zeros(5, 4, 2), 2, 3, 2), "only 4 examples"),
        (
            lambda: meta.ClassificationTasks(torch.zeros(5, 4, 2), 1, 1, 1),
            "ways must be an int >= 2",
        ),
        (lambda: meta.ClassificationTasks(torch.zeros(5, 4, 2), 2, 0, 1), "shots must be"),
        (lambda: meta.ClassificationTasks(torch.zeros(5, 4, 2), 2, 1, 0), "queries must be"),
        (lambda: meta.with_rotations(torch.zeros(2, 3, 4, 5)), "square images"),
        (lambda: meta.with_rotations(torch.zeros(2, 3, 4, 4), 5), "rotations must be in 1..4"),
        (lambda: meta.SinusoidTasks(amplitude=(2.0, 1.0)), "amplitude must be a pair"),
        (lambda: meta.SinusoidTasks(shots=0), "shots must be"),
        (lambda: meta.LinearTasks(noise=-1.0), "noise must be a float >= 0"),
        (
            lambda: meta.LinearTasks(dim=3, mean=torch.zeros(2)),
            r"mean must be None or a tensor of shape \(3,\)",
        ),
        (lambda: meta.SinusoidTasks().sample_batch(0, _gen(0)), "size must be an int >= 1"),
    ],
)
def test_task_family_errors_say_what_is_wrong(build, match):
    with pytest.raises(HypergradientError, match=match):
        build()


# ----------------------------------------------------------------------------- Omniglot


@pytest.fixture(scope="module")
def omniglot():
    if DATASETS is None:
        pytest.skip(skip_reason("omniglot"))
    train, heldout = meta.omniglot_tasks(DATASETS, ways=5, shots=1, queries=2, size=14)
    return train, heldout


@needs_omniglot
def test_omniglot_tasks_hold_out_whole_alphabets_and_rotate_the_training_classes(omniglot):
    train, heldout = omniglot
    # 8 alphabets, 242 characters; Japanese (katakana) 47 + Korean 40 held out
    assert heldout.images.shape == (87, 20, 1, 14, 14)
    assert train.images.shape == (4 * 155, 20, 1, 14, 14)
    assert train.images.dtype == torch.float32 and float(train.images.max()) <= 1.0
    # the training pool holds each character also rotated by 90 degrees
    torch.testing.assert_close(train.images[155 + 3], torch.rot90(train.images[3], 1, (-2, -1)))
    # no held-out character's drawings appear among the training classes
    train_keys = {tuple(x.flatten().tolist()) for x in train.images[:155, 0]}
    assert not any(tuple(x.flatten().tolist()) in train_keys for x in heldout.images[:, 0])
    ep = heldout.sample(_gen(0))
    assert ep.x_support.shape == (5, 1, 14, 14) and ep.y_query.shape == (10,)


@needs_omniglot
def test_omniglot_one_shot_runs_are_20_way_1_shot_episodes():
    runs = meta.omniglot_one_shot_runs(DATASETS, size=14)
    assert len(runs) == 20
    for ep in runs:
        assert ep.x_support.shape == (20, 1, 14, 14) and ep.x_query.shape == (20, 1, 14, 14)
        assert ep.y_support.tolist() == list(range(20)) and ep.ways == 20
        assert sorted(ep.y_query.tolist()) == list(range(20))  # each character once
    # raw-pixel nearest neighbour is far from perfect on them (21% measured at 28x28)
    acc = sum(float((meta.nearest_neighbour_predict(e) == e.y_query).double().mean()) for e in runs)
    assert 0.1 < acc / 20 < 0.5


def test_omniglot_tasks_errors_name_the_alphabets(monkeypatch):
    # the split itself, on a stand-in for the loaded characters (3 alphabets)
    names = ["Greek", "Greek", "Korean", "Korean", "Korean", "Latin", "Latin"]
    fake = torch.full((7, 20, 6, 6), 255, dtype=torch.uint8)
    monkeypatch.setattr(meta.episodes, "_omniglot_characters", lambda *a: (fake, names))
    train, heldout = meta.omniglot_tasks(heldout_alphabets="Korean", ways=2, size=6)
    assert heldout.images.shape[0] == 3 and train.images.shape[0] == 16
    assert float(train.images.max()) == 1.0
    with pytest.raises(HypergradientError, match=r"\['Klingon'\] are not in the background sets"):
        meta.omniglot_tasks(heldout_alphabets=("Klingon",))
    with pytest.raises(HypergradientError, match="leaves no alphabet for meta-training"):
        meta.omniglot_tasks(heldout_alphabets=("Greek", "Korean", "Latin"))
    with pytest.raises(HypergradientError, match="leaves every alphabet"):
        meta.omniglot_tasks(heldout_alphabets=())
    with pytest.raises(HypergradientError, match="ways=5 but the pool has only 3 classes"):
        meta.omniglot_tasks(heldout_alphabets=("Korean",), ways=5)


def test_omniglot_tasks_without_the_files_says_where_it_looked(tmp_path):
    with pytest.raises(HypergradientError, match="images_background_small1.zip"):
        meta.omniglot_tasks(tmp_path)


# ----------------------------------------------------------------------------- MAML


def _sine_setup(hidden=(6,), shots=6, seed=0):
    net = meta.MLP(1, hidden, out_features=1)
    theta = net.init(_gen(seed))
    episode = meta.SinusoidTasks(shots=shots, queries=8).sample(_gen(seed + 1))
    return net, theta, episode


def _maml_response(learner, episode):
    """theta -> L_query(phi_K(theta)), everything differentiable (for finite differences)."""

    def response(theta):
        phi = learner.model.task_params(dict(theta), episode.ways)
        phi = {k: v if v.requires_grad else v.requires_grad_(True) for k, v in phi.items()}
        for _ in range(learner.inner_steps):
            loss = learner.loss(learner.model.predict(phi, episode.x_support), episode.y_support)
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: p - learner.inner_lr * g for (k, p), g in zip(phi.items(), grads)}
        return learner.loss(learner.model.predict(phi, episode.x_query), episode.y_query)

    def no_grad_safe(theta):
        with torch.enable_grad():
            return response(_leaves(theta)).detach()

    return no_grad_safe


def test_maml_meta_gradient_equals_central_finite_differences_and_the_unrolled_core():
    net, theta, episode = _sine_setup()
    learner = meta.MAML(net, inner_steps=3, inner_lr=0.02)
    g = learner.meta_gradient(theta, episode)
    # central differences: error O(eps^2) ~ 1e-10 relative, round-off ~1e-16/eps
    fd = finite_difference_hypergrad(_maml_response(learner, episode), theta, eps=1e-6)
    assert relative_error(g.grad, fd) < 1e-7
    # the same quantity from the library's reverse-mode unrolled hypergradient: the inner
    # problem is SGD on the support loss from w_0 = theta (params0 depends on the hparams)
    unrolled = hg.unrolled_hypergrad(
        lambda p, h: F.mse_loss(net.predict(p, episode.x_support), episode.y_support),
        lambda p, h: F.mse_loss(net.predict(p, episode.x_query), episode.y_query),
        lambda h: {k[len("init.") :]: v for k, v in h.items()},
        {f"init.{k}": v for k, v in theta.items()},
        steps=3,
        lr=0.02,
    )
    assert relative_error(g.grad, {k: unrolled[f"init.{k}"] for k in theta}) < 1e-12
    assert g.query_accuracy is None
    assert g.query_loss == pytest.approx(float(_maml_response(learner, episode)(theta)), rel=1e-12)


def test_maml_with_a_per_task_zero_head_matches_finite_differences_on_a_convnet():
    net = meta.ConvNet(channels=2, blocks=2, image_size=6)
    theta = net.init(_gen(0))
    pool = torch.rand(6, 4, 1, 6, 6, generator=_gen(1))
    episode = meta.ClassificationTasks(pool, ways=3, shots=1, queries=2).sample(_gen(2))
    learner = meta.MAML(net, inner_steps=2, inner_lr=0.5)
    g = learner.meta_gradient(theta, episode)
    assert sorted(g.grad) == sorted(theta)  # the head is per task, not meta-learned
    fd = finite_difference_hypergrad(_maml_response(learner, episode), theta, eps=1e-6)
    assert relative_error(g.grad, fd) < 1e-6
    assert g.query_accuracy in {i / 6 for i in range(7)}


def test_maml_closed_form_on_quadratic_tasks():
    # Linear regression, support loss Ls(w) = |Xw + b - y|^2 / n: the Hessian A is
    # constant, so phi_K = phi_0 - alpha sum_k grad Ls(phi_k) is affine in phi_0 with
    # Jacobian (I - alpha A)^K and the exact meta-gradient is (I - alpha A)^K grad Lq(phi_K).
    net = meta.MLP(3, (), out_features=1)
    theta = net.init(_gen(0))
    episode = meta.LinearTasks(dim=3, shots=6, queries=9).sample(_gen(1))
    steps, lr = 4, 0.1
    g = meta.MAML(net, inner_steps=steps, inner_lr=lr).meta_gradient(theta, episode)
    design = torch.cat([episode.x_support, torch.ones(6, 1)], dim=1)
    A = 2 * design.T @ design / 6
    phi = meta.MAML(net, inner_steps=steps, inner_lr=lr).adapt(theta, episode)
    w = _leaves(phi)
    lq = F.mse_loss(net.predict(w, episode.x_query), episode.y_query)
    gq = torch.autograd.grad(lq, [w["layers.0.weight"], w["layers.0.bias"]])
    jac = torch.linalg.matrix_power(torch.eye(4) - lr * A, steps)
    expected = jac @ torch.cat([gq[0].reshape(-1), gq[1]])
    got = torch.cat([g.grad["layers.0.weight"].reshape(-1), g.grad["layers.0.bias"]])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_first_order_maml_is_the_query_gradient_at_the_adapted_parameters():
    net, theta, episode = _sine_setup()
    first = meta.MAML(net, inner_steps=3, inner_lr=0.02, first_order=True)
    g = first.meta_gradient(theta, episode)
    w = _leaves(first.adapt(theta, episode))
    query = F.mse_loss(net.predict(w, episode.x_query), episode.y_query)
    expected = dict(zip(w, torch.autograd.grad(query, list(w.values()))))
    assert relative_error(g.grad, expected) < 1e-13
    # and it is not the exact meta-gradient (the Hessian terms matter here)
    exact = meta.MAML(net, inner_steps=3, inner_lr=0.02).meta_gradient(theta, episode)
    assert relative_error(g.grad, exact.grad) > 1e-3


def test_module_model_gives_the_same_meta_gradient_as_the_functional_mlp():
    net, theta, episode = _sine_setup(hidden=(5,))
    module = torch.nn.Sequential(torch.nn.Linear(1, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    with torch.no_grad():
        for i, j in ((0, 0), (2, 1)):
            module[i].weight.copy_(theta[f"layers.{j}.weight"])
            module[i].bias.copy_(theta[f"layers.{j}.bias"])
    wrapped = meta.ModuleModel(module)
    theta_m = wrapped.init()
    g = meta.MAML(wrapped, inner_steps=2, inner_lr=0.02).meta_gradient(theta_m, episode)
    ref = meta.MAML(net, inner_steps=2, inner_lr=0.02).meta_gradient(theta, episode)
    for i, j in ((0, 0), (2, 1)):
        torch.testing.assert_close(g.grad[f"{i}.weight"], ref.grad[f"layers.{j}.weight"])
    assert wrapped.task_params(theta_m, None).keys() == theta_m.keys()


def test_batch_meta_gradient_is_the_mean_and_evaluate_scores_the_adapted_model():
    net = meta.MLP(4, (5,))
    theta = net.init(_gen(0))
    tasks = meta.ClassificationTasks(torch.randn(6, 5, 4, generator=_gen(1)), 3, 1, 2)
    episodes = tasks.sample_batch(3, _gen(2))
    learner = meta.MAML(net, inner_steps=2, inner_lr=0.3)
    singles = [learner.meta_gradient(theta, e) for e in episodes]
    batch = learner.batch_meta_gradient(theta, episodes)
    for k in theta:
        torch.testing.assert_close(batch.grad[k], sum(s.grad[k] for s in singles) / 3)
    assert batch.query_loss == pytest.approx(sum(s.query_loss for s in singles) / 3)
    assert batch.query_accuracy == pytest.approx(sum(s.query_accuracy for s in singles) / 3)
    scores = learner.evaluate(theta, episodes)
    assert scores["accuracy"] == pytest.approx(batch.query_accuracy)
    assert scores["loss"] == pytest.approx(batch.query_loss)
    assert len(scores["per_episode"]) == 3 and scores["accuracy_ci95"] >= 0


# ----------------------------------------------------------------------------- iMAML


def _dense_imaml(learner, theta, episode, phi_start):
    """Exact iMAML meta-gradient: the inner problem solved by Newton's method (dense
    Hessian of G) to ||grad G|| < 1e-12, then (I + H/lam) x = grad Lq solved densely."""
    leaves = _leaves(theta)
    phi0 = learner.model.task_params(leaves, episode.ways)
    keys = list(phi0)
    shapes = [phi0[k].shape for k in keys]
    sizes = [phi0[k].numel() for k in keys]
    center = torch.cat([phi0[k].detach().reshape(-1) for k in keys])

    def unflat(v):
        return dict(zip(keys, [t.reshape(s) for t, s in zip(v.split(sizes), shapes)]))

    def support(v):
        return learner.loss(learner.model.predict(unflat(v), episode.x_support), episode.y_support)

    def query(v):
        return learner.loss(learner.model.predict(unflat(v), episode.x_query), episode.y_query)

    def proximal(v):
        return support(v) + 0.5 * learner.lam * ((v - center) ** 2).sum()

    v = torch.cat([phi_start[k].reshape(-1) for k in keys])
    for _ in range(30):  # Newton converges quadratically from the gradient-descent start
        g = torch.func.grad(proximal)(v)
        if float(g.norm()) < 1e-13:
            break
        v = v - torch.linalg.solve(hessian(proximal)(v), g)
    assert float(torch.func.grad(proximal)(v).norm()) < 1e-12
    H = hessian(support)(v)
    x = torch.linalg.solve(torch.eye(len(v)) + H / learner.lam, torch.func.grad(query)(v))
    return pull_back(phi0, leaves, unflat(x)), unflat(v), torch.linalg.eigvalsh(H)


def _smooth_sine_setup(hidden: int, shots: int):
    """A 1-hidden-1 tanh network (smooth, so Newton's method converges on the proximal
    problem; ReLU kinks can make it cycle) as a ModuleModel, and a sinusoid episode."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )
    net = meta.ModuleModel(module)
    return net, net.init(), meta.SinusoidTasks(shots=shots, queries=8).sample(_gen(1))


def test_imaml_with_5_cg_steps_matches_the_dense_exact_meta_gradient():
    # 1-20-1 tanh network on a 10-shot sinusoid, lam = 2 (the paper's value): 61 parameters,
    # so 5 CG steps are far from the 61 an exact Krylov solve may need in general; the
    # support Hessian has ~10 eigenvalues above 0.1 lam (up to ~12) and the rest near 0,
    # which CG handles in a few steps (measured error 1.7e-4).  The tolerance 1e-2 is
    # the accuracy the method promises.
    net, theta, episode = _smooth_sine_setup(hidden=20, shots=10)
    learner = meta.IMAML(net, lam=2.0, inner_steps=300, inner_lr=0.05, cg_steps=5)
    g = learner.meta_gradient(theta, episode)
    start = learner.adapt(theta, episode)
    exact, phi_star, eigenvalues = _dense_imaml(learner, theta, episode, start)
    assert float(eigenvalues.min()) > -learner.lam  # I + H/lam is positive definite
    assert relative_error(g.grad, exact) < 1e-2
    assert g.stats["cg_steps"] == 5 and g.stats["cg_breakdowns"] == 0
    # the curvature matters: the first-order approximation (I + H/lam)^{-1} ~ I (the query
    # gradient itself, what first-order MAML would use) is far off
    w = _leaves(start)
    query = F.mse_loss(net.predict(w, episode.x_query), episode.y_query)
    first_order = dict(zip(w, torch.autograd.grad(query, list(w.values()))))
    assert relative_error(first_order, exact) > 0.1
    # at the Newton-exact inner solution, CG run to convergence reproduces the dense solve
    converged = dataclasses.replace(learner, cg_steps=200, cg_tol=1e-13)
    leaves = _leaves(theta)
    at_star = converged.implicit_meta_gradient(
        leaves, net.task_params(leaves, None), phi_star, episode
    )
    assert relative_error(at_star.grad, exact) < 1e-9
    assert at_star.stats["inner_grad_norm"] < 1e-12


def test_dense_imaml_meta_gradient_is_the_derivative_of_the_exact_inner_solution():
    # the "exact" reference itself, checked against central differences of
    # theta -> Lq(phi*(theta)), phi* from Newton's method at every perturbed theta
    net, theta, episode = _smooth_sine_setup(hidden=4, shots=6)
    learner = meta.IMAML(net, lam=2.0, inner_steps=300, inner_lr=0.05)
    phi_guess = learner.adapt(theta, episode)
    exact, _, _ = _dense_imaml(learner, theta, episode, phi_guess)

    def response(t):
        _, phi_star, _ = _dense_imaml(learner, t, episode, phi_guess)
        return F.mse_loss(net.predict(phi_star, episode.x_query), episode.y_query)

    # central differences with eps = 1e-5: truncation ~1e-10, round-off ~1e-16 / 1e-5
    fd = finite_difference_hypergrad(response, theta, eps=1e-5)
    assert relative_error(exact, fd) < 1e-6


def test_imaml_closed_form_on_linear_regression_tasks():
    # Ls(w) = |Xw - y|^2/n is quadratic with Hessian A: phi* = (A + lam I)^{-1}(A w_ls + lam
    # theta) and d phi*/d theta = lam (A + lam I)^{-1}, so the meta-gradient is
    # lam (A + lam I)^{-1} grad Lq(phi*) = (I + A/lam)^{-1} grad Lq(phi*).  With 21
    # parameters and cg_steps = 21 CG is exact in exact arithmetic.
    net = meta.MLP(20, (), out_features=1)
    theta = net.init(_gen(0))
    episode = meta.LinearTasks(dim=20, shots=5, queries=50).sample(_gen(1))
    lam = 1.0
    design = torch.cat([episode.x_support, torch.ones(5, 1)], dim=1)
    A = 2 * design.T @ design / 5
    rhs = 2 * design.T @ episode.y_support[:, 0] / 5
    center = torch.cat([theta["layers.0.weight"].reshape(-1), theta["layers.0.bias"]])
    phi_star = torch.linalg.solve(A + lam * torch.eye(21), rhs + lam * center)
    phi = {"layers.0.weight": phi_star[:20].reshape(1, 20), "layers.0.bias": phi_star[20:]}
    w = _leaves(phi)
    lq = F.mse_loss(net.predict(w, episode.x_query), episode.y_query)
    gq = torch.cat([t.reshape(-1) for t in torch.autograd.grad(lq, list(w.values()))])
    expected = torch.linalg.solve(torch.eye(21) + A / lam, gq)

    # gradient steps of size 1 / (lambda_max(A) + lam) converge linearly (rate at most
    # 1 - lam / (lambda_max + lam)); 3000 of them reach round-off
    step = 1.0 / float(torch.linalg.eigvalsh(A).max() + lam)
    learner = meta.IMAML(net, lam=lam, inner_steps=3000, inner_lr=step, cg_steps=21, cg_tol=1e-14)
    g = learner.meta_gradient(theta, episode)
    got = torch.cat([g.grad["layers.0.weight"].reshape(-1), g.grad["layers.0.bias"]])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert g.stats["inner_grad_norm"] < 1e-10


def test_imaml_meta_training_on_linear_tasks_finds_the_task_mean():
    # Rajeswaran et al.'s check at reduced size: tasks w = mu + 0.3 N(0, I) in d = 8; the
    # meta-parameters should approach mu, and post-adaptation query error fall well below
    # that of theta = 0.
    mu = torch.linspace(-1.0, 1.0, 8)
    tasks = meta.LinearTasks(dim=8, shots=5, queries=20, spread=0.3, noise=0.1, mean=mu)
    net = meta.MLP(8, (), out_features=1)
    theta = {k: torch.zeros_like(v) for k, v in net.init(_gen(0)).items()}
    learner = meta.IMAML(net, lam=1.0, inner_steps=40, inner_lr=0.08, cg_steps=5)
    test = tasks.sample_batch(20, _gen(99))
    before = learner.evaluate(theta, test)["loss"]
    params = [v.requires_grad_(True) for v in theta.values()]
    opt = torch.optim.Adam(params, lr=0.05)
    gen = _gen(0)
    for _ in range(60):
        g = learner.batch_meta_gradient(theta, tasks.sample_batch(4, gen))
        for k, v in theta.items():
            v.grad = g.grad[k]
        opt.step()
    after = learner.evaluate(theta, test)["loss"]
    assert after < before / 5
    # Adam's steps of 0.05 leave theta wandering about 0.1 mu around the mean
    assert float((theta["layers.0.weight"].detach()[0] - mu).norm() / mu.norm()) < 0.2


def test_imaml_memory_does_not_grow_with_inner_steps_but_maml_does():
    # exact accounting of the tensors autograd saves for backward (see
    # benchmarks/meta_memory.py): iMAML keeps one support-gradient graph whatever the
    # number of inner steps; second-order MAML keeps one per step.
    net = meta.ConvNet(channels=4, blocks=2, image_size=8)
    theta = net.init(_gen(0))
    tasks = meta.ClassificationTasks(torch.rand(6, 4, 1, 8, 8, generator=_gen(1)), 3, 1, 2)
    episode = tasks.sample(_gen(2))

    def saved_bytes(learner):
        with meta.SavedTensorMeter() as meter:
            learner.meta_gradient(theta, episode)
        assert meter.live_bytes == 0  # every graph was freed
        return meter.peak_bytes

    imaml = [saved_bytes(meta.IMAML(net, inner_steps=k, inner_lr=0.1)) for k in (2, 8)]
    maml = [saved_bytes(meta.MAML(net, inner_steps=k, inner_lr=0.1)) for k in (2, 8)]
    assert imaml[0] == imaml[1] > 0
    # MAML: a fixed part (query graph) plus one graph per step, so 8 steps hold well over
    # twice what 2 steps hold
    assert maml[1] > 2.5 * maml[0]
    assert maml[0] > imaml[0]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda net: meta.MAML(object()), "model must be a hypergradient.meta.AbstractModel"),
        (lambda net: meta.MAML(net, loss=3), "loss must be a callable"),
        (lambda net: meta.MAML(net, inner_steps=-1), "inner_steps must be an int >= 0"),
        (lambda net: meta.MAML(net, inner_lr=0.0), "inner_lr must be a finite float > 0"),
        (lambda net: meta.MAML(net, first_order="yes"), "first_order must be True or False"),
        (lambda net: meta.IMAML(net, lam=-1.0), "lam must be a finite float > 0"),
        (lambda net: meta.IMAML(net, cg_steps=0), "cg_steps must be an int >= 1"),
        (lambda net: meta.IMAML(net, cg_tol=float("nan")), "cg_tol must be a finite float >= 0"),
        (lambda net: meta.IMAML(net, cg_damping=-0.1), "cg_damping must be"),
        (lambda net: meta.HyperRepresentation(3), "representation must be a callable"),
        (lambda net: meta.HyperRepresentation(net.features, inner_steps=0), "inner_steps must be"),
        (lambda net: meta.HyperRepresentation(net.features, head_l2=-1.0), "head_l2 must be"),
        (lambda net: meta.HyperRepresentation(net.features, loss=None), "loss must be a callable"),
        (lambda net: meta.MLP(0), "in_features must be an int >= 1"),
        (lambda net: meta.MLP(2, (3, 0)), "every hidden width must be"),
        (lambda net: meta.ConvNet(channels=0), "channels must be an int >= 1"),
        (lambda net: meta.ConvNet(out_features=1.5), "out_features must be"),
        (
            lambda net: net.task_params(net.init(), None),
            "ways must be the task's number of classes",
        ),
        (
            lambda net: meta.MLP(2, (3,), out_features=4).task_params({}, 5),
            "fixed head with out_features=4",
        ),
    ],
)
def test_learner_and_model_errors_say_what_is_wrong(build, match):
    with pytest.raises(HypergradientError, match=match):
        build(meta.MLP(4, (5,)))


def test_meta_gradient_refuses_non_tensor_meta_parameters_and_empty_batches():
    net, theta, episode = _sine_setup()
    learner = meta.MAML(net, inner_steps=1, inner_lr=0.01)
    with pytest.raises(HypergradientError, match=r"theta\['layers.0.weight'\] must be a torch"):
        learner.meta_gradient({**theta, "layers.0.weight": [1.0]}, episode)
    with pytest.raises(HypergradientError, match="episodes is empty"):
        learner.batch_meta_gradient(theta, [])
    with pytest.raises(HypergradientError, match="episodes is empty"):
        learner.evaluate(theta, [])


def test_diverging_inner_loops_raise_with_the_learning_rate_to_lower():
    net, theta, episode = _sine_setup()
    big = {k: 1e200 * torch.ones_like(v) for k, v in theta.items()}
    with pytest.raises(HypergradientError, match="lower the inner learning rate"):
        meta.MAML(net, inner_steps=2, inner_lr=1e3).meta_gradient(big, episode)
    with pytest.raises(HypergradientError, match="IMAML inner problem"):
        meta.IMAML(net, inner_steps=2, inner_lr=1e3).adapt(big, episode)
    with pytest.raises(HypergradientError, match="HyperRepresentation inner problem"):
        meta.HyperRepresentation(net.features, inner_steps=2, inner_lr=1e3).adapt(big, episode)


# ----------------------------------------------------------------------------- hyper-representation


def test_hyper_representation_equals_the_unrolled_core_and_finite_differences():
    # shared layers = hyperparameters, linear head = inner parameters (from zero)
    net = meta.MLP(4, (5,))
    theta = net.init(_gen(0))
    tasks = meta.ClassificationTasks(torch.randn(6, 5, 4, generator=_gen(1)), 3, 2, 2)
    episode = tasks.sample(_gen(2))
    learner = meta.HyperRepresentation(net.features, inner_steps=6, inner_lr=0.5, head_l2=0.1)
    g = learner.meta_gradient(theta, episode)

    def inner(p, h):
        logits = F.linear(net.features(h, episode.x_support), p["weight"], p["bias"])
        return F.cross_entropy(logits, episode.y_support) + 0.05 * (p["weight"] ** 2).sum()

    def outer(p, h):
        logits = F.linear(net.features(h, episode.x_query), p["weight"], p["bias"])
        return F.cross_entropy(logits, episode.y_query)

    head0 = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}
    unrolled, head = hg.unrolled_hypergrad(
        inner, outer, head0, theta, steps=6, lr=0.5, return_params=True
    )
    assert relative_error(g.grad, unrolled) < 1e-12
    adapted = learner.adapt(theta, episode)
    torch.testing.assert_close(adapted["weight"], head["weight"])

    def response(h):
        w = {k: v.clone() for k, v in head0.items()}
        for _ in range(6):
            w = {k: v.requires_grad_(True) for k, v in w.items()}
            with torch.enable_grad():
                grads = torch.autograd.grad(inner(w, h), list(w.values()))
            w = {k: (v - 0.5 * gk).detach() for (k, v), gk in zip(w.items(), grads)}
        return outer(w, h)

    fd = finite_difference_hypergrad(response, theta, eps=1e-6)
    assert relative_error(g.grad, fd) < 1e-7
    scores = learner.evaluate(theta, [episode])
    assert scores["accuracy"] == pytest.approx(g.query_accuracy)


def test_hyper_representation_regression_head_and_bad_representation():
    net = meta.MLP(3, (4,))
    theta = net.init(_gen(0))
    episode = meta.LinearTasks(dim=3).sample(_gen(1))
    learner = meta.HyperRepresentation(net.features, inner_steps=5, inner_lr=0.1)
    g = learner.meta_gradient(theta, episode)
    assert g.query_accuracy is None and sorted(g.grad) == sorted(theta)
    bad = meta.HyperRepresentation(lambda t, x: x.sum(), inner_steps=1)
    with pytest.raises(HypergradientError, match=r"must return a \(n, features\) tensor"):
        bad.adapt(theta, episode)


# ----------------------------------------------------------------------------- README


README_EXAMPLE = _readme.example("meta.SinusoidTasks", before="before", after="after")


def test_readme_meta_learning_example_runs_and_lowers_the_query_error():
    run = README_EXAMPLE.run()  # in a fresh (float32) interpreter, as a reader pastes it
    assert run.values["after"] < 0.9 * run.values["before"]
    assert "query MSE after adaptation" in run.stdout
