"""SketchySGD (Frangella et al. 2024): Nyström sketch, Woodbury preconditioner, automatic step.

Dense float64 references for every piece (the Nyström formula, ``(H_hat + rho I)^{-1}``,
``lambda_max`` of the preconditioned Hessian, the update itself), then the optimizer
contract (refresh schedule, state_dict, schedulers, errors) and the headline: on unscaled
breast_cancer logistic regression the defaults beat every rate of an SGD grid.
"""

import copy
import math
import statistics

import pytest
import torch
from sklearn.datasets import load_breast_cancer

import _readme
from hypergradient._errors import HypergradientError
from hypergradient.optimizers import SketchySGD as ExportedSketchySGD
from hypergradient.optimizers.sketchy import (
    NystromApproximation,
    SketchySGD,
    randomized_nystrom,
    top_eigenvalue,
)


def _psd(p: int, rank: int, *, scale_decay: float = 1.0) -> torch.Tensor:
    """A random PSD (p, p) matrix of the given rank, eigenvalues decaying geometrically."""
    q = torch.linalg.qr(torch.randn(p, p)).Q[:, :rank]
    eigs = scale_decay ** torch.arange(rank, dtype=torch.float64) * 3.0
    return (q * eigs) @ q.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------
# Nyström approximation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "matrix_rank", "sketch_rank"), [(8, 3, 3), (8, 3, 5), (8, 8, 8)])
def test_nystrom_is_exact_when_sketch_rank_covers_the_matrix(p, matrix_rank, sketch_rank):
    # (A Om)(Om^T A Om)^+ (A Om)^T = A when range(A Om) = range(A), i.e. rank(A) <= r
    # (almost surely for Gaussian Om).  The stabilising shift nu ~ sqrt(p) eps ||A|| is
    # removed again, so the error is rounding level: 1e-10 leaves a wide margin over ~1e-15.
    a = _psd(p, matrix_rank, scale_decay=0.1)
    approx = randomized_nystrom(a, sketch_rank, generator=torch.Generator().manual_seed(1))
    assert approx.rank == sketch_rank
    assert _rel(approx.matrix(), a) < 1e-10
    # the same through a function operator (the optimizer's Hessian-vector-product path)
    approx_fn = randomized_nystrom(
        lambda block: a @ block, sketch_rank, dim=p, generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(approx_fn.matrix(), approx.matrix(), rtol=0, atol=1e-12)


def test_nystrom_low_rank_is_orthonormal_psd_and_below_the_matrix():
    # For r < rank(A) the Nyström approximation is a PSD lower bound: 0 <= A_hat <= A.
    a = _psd(12, 12, scale_decay=0.5)
    approx = randomized_nystrom(a, 4)
    u, lam = approx.basis, approx.eigenvalues
    assert torch.allclose(u.T @ u, torch.eye(4), atol=1e-12)
    assert bool((lam >= 0).all()) and bool((lam[:-1] >= lam[1:]).all())
    gap = torch.linalg.eigvalsh(a - approx.matrix())
    assert float(gap.min()) > -1e-12 * float(lam[0])
    # and it is not trivially zero: the sketch captures most of the top eigenvalue
    assert float(lam[0]) > 0.5 * float(torch.linalg.eigvalsh(a)[-1])


def test_nystrom_of_an_indefinite_matrix_drops_negative_curvature():
    # The core Om^T A Om is indefinite: the shift s grows past |lambda_min| and the sketch
    # approximates A + s I.  With r = p that is exact, so subtracting s and clipping at 0
    # returns A's eigenvalues with the negative one set to 0 (rounding-level error).
    q = torch.linalg.qr(torch.randn(6, 6)).Q
    eigs = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, -1.0])
    a = (q * eigs) @ q.T
    approx = randomized_nystrom(a, 6)
    assert approx.shift > 1.0  # grew from ~1e-15 to cover the eigenvalue -1
    expected = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.0])
    assert torch.allclose(approx.eigenvalues, expected, atol=1e-10)


def test_woodbury_preconditioner_matches_the_dense_inverse():
    a = _psd(10, 10, scale_decay=0.3)
    approx = randomized_nystrom(a, 4)
    rho = 1e-2
    dense = approx.matrix() + rho * torch.eye(10)
    g = torch.randn(10)
    assert _rel(approx.solve(g, rho), torch.linalg.solve(dense, g)) < 1e-12
    block = torch.randn(10, 3)
    assert _rel(approx.solve(block, rho), torch.linalg.solve(dense, block)) < 1e-12
    # P^{-1/2} P^{-1/2} = P^{-1}, and P^{-1/2} is symmetric: compare with the eigen-root
    twice = approx.inverse_sqrt(approx.inverse_sqrt(g, rho), rho)
    assert _rel(twice, torch.linalg.solve(dense, g)) < 1e-12
    evals, evecs = torch.linalg.eigh(dense)
    root = (evecs * evals.rsqrt()) @ evecs.T
    assert _rel(approx.inverse_sqrt(g, rho), root @ g) < 1e-12


def test_top_eigenvalue_is_exact_with_p_steps_and_a_lower_bound_with_fewer():
    a = _psd(9, 9, scale_decay=0.7)
    start = torch.randn(9)
    exact = float(torch.linalg.eigvalsh(a)[-1])
    assert top_eigenvalue(lambda v: a @ v, start, 9) == pytest.approx(exact, rel=1e-12)
    few = top_eigenvalue(lambda v: a @ v, start, 3)
    assert few <= exact * (1 + 1e-12)
    # 3 steps of Lanczos beat 3 steps of power iteration from the same start
    v = start.clone()
    for _ in range(2):
        v = a @ v
        v = v / v.norm()
    assert few >= float(v @ a @ v) - 1e-12


# --------------------------------------------------------------------------------------
# the optimizer against dense formulas
# --------------------------------------------------------------------------------------


def _quadratic(p: int = 8):
    """Quadratic 0.5 w^T A w - b^T w (Hessian A everywhere) over a live parameter."""
    a = _psd(p, p, scale_decay=0.4) + 1e-3 * torch.eye(p)
    b = torch.randn(p)
    w = torch.randn(p, requires_grad=True)

    def loss():
        return 0.5 * w @ a @ w - b @ w

    return a, b, w, loss


def _dense_lambda_max(approx: NystromApproximation, hess: torch.Tensor, rho: float) -> float:
    p = hess.shape[0]
    evals, evecs = torch.linalg.eigh(approx.matrix() + rho * torch.eye(p))
    root = (evecs * evals.rsqrt()) @ evecs.T
    return float(torch.linalg.eigvalsh(root @ hess @ root)[-1])


def test_automatic_step_size_is_one_over_lambda_max_of_the_dense_preconditioned_hessian():
    a, _, w, loss = _quadratic()
    rho = 1e-2
    opt = SketchySGD([w], lr=1.0, rank=3, rho=rho, eig_iters=8)
    opt.update_preconditioner(loss)
    # 8 Lanczos steps on an 8-dimensional operator: exact up to rounding
    lam = _dense_lambda_max(opt.preconditioner, a, rho)
    assert opt.lambda_max == pytest.approx(lam, rel=1e-10)
    assert opt.step_sizes == [pytest.approx(1.0 / lam, rel=1e-10)]
    # lr multiplies the automatic step: lr = 0.5 halves it
    opt.param_groups[0]["lr"] = 0.5
    assert opt.step_sizes == [pytest.approx(0.5 / lam, rel=1e-10)]


def _logistic_batches(p: int = 5, n: int = 40):
    """A logistic loss over a live parameter and a closure factory over fixed batches."""
    x = torch.randn(n, p) * torch.logspace(0, 1.5, p)
    y = (torch.randn(n) > 0).double() * 2 - 1
    w = (0.1 * torch.randn(p)).requires_grad_(True)

    def loss_on(idx):
        return torch.nn.functional.softplus(-y[idx] * (x[idx] @ w)).mean() + 1e-3 * w @ w

    def dense_hessian(idx):
        s = torch.sigmoid(y[idx] * (x[idx] @ w.detach()))
        return (x[idx].T * (s * (1 - s))) @ x[idx] / len(idx) + 2e-3 * torch.eye(p)

    def queue(batches):
        pending = list(batches)
        return (lambda: loss_on(pending.pop(0))), pending

    return w, loss_on, dense_hessian, queue


def test_step_uses_the_largest_preconditioned_curvature_over_the_step_batches():
    # lambda_max = max_k lambda_max(P^{-1/2} H_{B_k} P^{-1/2}) over step_batches independent
    # batches B_k from curvature_closure, each against the dense reference (p = 5 Lanczos
    # steps on a 5-dimensional operator are exact); the sketch uses hessian_closure alone.
    w, _, dense_hessian, queue = _logistic_batches()
    sketch_batch = torch.arange(0, 40, 2)
    step_batches = [torch.randint(0, 40, (6,)) for _ in range(3)]
    hessian_closure, sketch_left = queue([sketch_batch])
    curvature_closure, step_left = queue(step_batches)
    rho = 1e-2
    opt = SketchySGD([w], rank=2, rho=rho, eig_iters=5, step_batches=3)
    opt.update_preconditioner(hessian_closure, curvature_closure)
    assert not sketch_left and not step_left  # one sketch batch, three step batches
    expected = [_dense_lambda_max(opt.preconditioner, dense_hessian(b), rho) for b in step_batches]
    assert opt.curvatures == pytest.approx(expected, rel=1e-10)
    assert opt.lambda_max == pytest.approx(max(expected), rel=1e-10)
    assert opt.step_sizes == [pytest.approx(0.5 / max(expected), rel=1e-10)]
    # the batches differ, so the max is a real choice (not the same number three times)
    assert max(expected) > 1.05 * min(expected)


def test_without_curvature_closure_the_step_batches_come_from_hessian_closure():
    # step_batches=1 is the paper's rule: one further Hessian batch S' for the step
    w, _, dense_hessian, queue = _logistic_batches()
    batches = [torch.randint(0, 40, (10,)) for _ in range(5)]
    for k in (1, 4):
        closure, left = queue(batches)
        opt = SketchySGD([w], rank=2, rho=1e-2, eig_iters=5, step_batches=k)
        opt.update_preconditioner(closure)
        assert len(left) == 5 - (1 + k)
        expected = [
            _dense_lambda_max(opt.preconditioner, dense_hessian(b), 1e-2)
            for b in batches[1 : 1 + k]
        ]
        assert opt.lambda_max == pytest.approx(max(expected), rel=1e-10)


def test_sketch_of_the_hessian_through_hvps_is_the_hessian_when_rank_is_full():
    a, _, w, loss = _quadratic()
    opt = SketchySGD([w], rank=20, update_freq=1)  # rank clipped to p = 8
    opt.update_preconditioner(loss)
    assert opt.preconditioner.rank == 8
    assert _rel(opt.preconditioner.matrix(), a) < 1e-10


def test_step_matches_the_dense_update_across_parameter_groups():
    # loss over a (2, 3) weight and a (2,) bias in two groups with different lr:
    # w_k <- w_k - (lr_k / lambda_max) [(H_hat + rho I)^{-1} g]_k on the joint vector
    x = torch.randn(30, 3) * torch.tensor([1.0, 10.0, 100.0])
    t = torch.randn(30, 2)
    weight = torch.randn(2, 3, requires_grad=True)
    bias = torch.randn(2, requires_grad=True)

    def loss():
        return 0.5 * ((x @ weight.T + bias - t) ** 2).mean(0).sum()

    rho = 1e-3
    opt = SketchySGD(
        [{"params": [weight], "lr": 0.5}, {"params": [bias], "lr": 0.2}],
        rank=4,
        rho=rho,
        eig_iters=8,
        update_freq=5,
    )
    flat0 = torch.cat([weight.detach().reshape(-1), bias.detach()])
    opt.zero_grad()
    loss().backward()
    grad = torch.cat([weight.grad.reshape(-1), bias.grad])
    opt.step(hessian_closure=loss)

    # the dense Hessian of the joint vector, by autograd
    def flat_loss(v):
        return 0.5 * ((x @ v[:6].reshape(2, 3).T + v[6:] - t) ** 2).mean(0).sum()

    hess = torch.autograd.functional.hessian(flat_loss, flat0)
    approx = opt.preconditioner
    lam = _dense_lambda_max(approx, hess, rho)
    # 8 = p Lanczos steps: exact in exact arithmetic; the preconditioned operator has
    # condition ~1e6 here (column scales 1..100, rho 1e-3), so rounding is ~1e-10
    assert opt.lambda_max == pytest.approx(lam, rel=1e-8)
    direction = torch.linalg.solve(approx.matrix() + rho * torch.eye(8), grad)
    expected = torch.cat([0.5 / lam * direction[:6], 0.2 / lam * direction[6:]])
    moved = flat0 - torch.cat([weight.detach().reshape(-1), bias.detach()])
    # P has condition ~1e7, so the dense solve and Woodbury agree to ~1e-9
    assert _rel(moved, expected) < 1e-8


def test_full_rank_sketchy_sgd_is_damped_newton_on_a_quadratic():
    # rank = p and rho -> 0: P = A, lambda_max(P^{-1/2} A P^{-1/2}) = 1, so with lr = 0.5
    # every full-batch step halves the distance to the minimiser A^{-1} b.
    a, b, w, loss = _quadratic()
    w_star = torch.linalg.solve(a, b)
    # How small rho can be in float64: each step's ratio to 1/2 is off by the damping's bias,
    # up to rho / lambda_min, plus Woodbury's rho^{-1} (g - U U^T g), where U U^T = I only
    # to ~eps, i.e. up to eps * lambda_max / rho (rho = 1e-12 made that 6.6e-4 x a CPU-
    # dependent fraction: 1.3e-5 on one path).  rho = sqrt(eps lambda_max lambda_min)
    # balances the two at sqrt(eps cond(A)) = 3.3e-7 each (cond 507); the tolerance is
    # p = 8 times their sum, 5.4e-6.
    eps = torch.finfo(torch.float64).eps
    lam_min, lam_max = torch.linalg.eigvalsh(a)[[0, -1]].tolist()
    rho = math.sqrt(eps * lam_max * lam_min)
    tol = 8 * (rho / lam_min + eps * lam_max / rho)
    opt = SketchySGD([w], rank=8, rho=rho, eig_iters=8, update_freq=100)
    errors = []
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step(hessian_closure=loss)
        errors.append(float((w.detach() - w_star).norm()))
    assert opt.lambda_max == pytest.approx(1.0, rel=1e-6)
    for before, after in zip(errors, errors[1:]):
        assert after == pytest.approx(0.5 * before, rel=tol)


def test_parameters_without_gradient_do_not_move():
    a, _, w, loss = _quadratic()
    frozen = torch.randn(3, requires_grad=True)
    before = frozen.detach().clone()
    opt = SketchySGD([w, frozen], update_freq=1)
    opt.zero_grad()
    loss().backward()
    opt.step(hessian_closure=loss)
    assert frozen.grad is None
    assert torch.equal(frozen.detach(), before)


# --------------------------------------------------------------------------------------
# refresh schedule, state_dict, schedulers
# --------------------------------------------------------------------------------------


def _counting(loss):
    calls = []

    def closure():
        calls.append(1)
        return loss()

    return closure, calls


# one call for the sketch, and with auto_lr one per step batch (default step_batches=8)
@pytest.mark.parametrize(("auto_lr", "calls_per_refresh"), [(True, 9), (False, 1)])
def test_preconditioner_is_rebuilt_every_update_freq_steps(auto_lr, calls_per_refresh):
    _, _, w, loss = _quadratic()
    closure, calls = _counting(loss)
    opt = SketchySGD([w], lr=0.5 if auto_lr else 1e-3, update_freq=3, auto_lr=auto_lr)
    for _ in range(7):  # refreshes at steps 0, 3 and 6
        opt.zero_grad()
        loss().backward()
        opt.step(hessian_closure=closure)
    assert opt.num_refreshes == 3
    assert len(calls) == 3 * calls_per_refresh
    assert w.grad is not None  # the closures did not touch .grad beyond the user's backward


def test_update_freq_none_refreshes_only_on_request():
    _, _, w, loss = _quadratic()
    opt = SketchySGD([w])
    opt.update_preconditioner(loss)
    for _ in range(4):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert opt.num_refreshes == 1


def test_closure_returns_the_loss_like_torch_optim():
    _, _, w, loss = _quadratic()
    opt = SketchySGD([w])
    opt.update_preconditioner(loss)

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    value = opt.step(closure)
    assert isinstance(value, torch.Tensor) and value.ndim == 0


def _batches(n_steps: int, p: int = 6):
    """Deterministic data: per-step gradient batches and Hessian batches (fixed in advance)."""
    x = torch.randn(40, p) * torch.logspace(0, 2, p)
    y = (torch.randn(40) > 0).double() * 2 - 1
    grads = [torch.randint(0, 40, (8,)) for _ in range(n_steps)]
    # 1 + step_batches = 9 Hessian batches per refresh, at most one refresh per step
    hess = [torch.randint(0, 40, (10,)) for _ in range(9 * n_steps)]
    return x, y, grads, hess


def _train(w, opt, x, y, grad_idx, hess_idx):
    def loss_on(idx):
        return torch.nn.functional.softplus(-y[idx] * (x[idx] @ w)).mean() + 5e-3 * w @ w

    queue = list(hess_idx)
    for idx in grad_idx:
        opt.zero_grad()
        loss_on(idx).backward()
        opt.step(hessian_closure=lambda: loss_on(queue.pop(0)))
    return len(hess_idx) - len(queue)


def test_state_dict_round_trip_continues_the_same_trajectory():
    x, y, grads, hess = _batches(9)
    w = torch.zeros(6, requires_grad=True)
    # generators on the CPU for both optimizers (also under HYPERGRADIENT_TEST_DEVICE=cuda)
    opt = SketchySGD([w], rank=3, update_freq=3, generator=torch.Generator().manual_seed(5))
    used = _train(w, opt, x, y, grads[:5], hess)
    saved_w, saved_state = w.detach().clone(), copy.deepcopy(opt.state_dict())
    saved_copy = copy.deepcopy(saved_state)
    _train(w, opt, x, y, grads[5:], hess[used:])  # reference continuation (two refreshes)

    w2 = saved_w.clone().requires_grad_(True)
    opt2 = SketchySGD([w2], rank=3, update_freq=3, generator=torch.Generator().manual_seed(99))
    opt2.load_state_dict(saved_state)
    assert opt2.lambda_max == saved_copy["sketchy"]["lambda_max"]
    _train(w2, opt2, x, y, grads[5:], hess[used:])
    assert torch.equal(w2.detach(), w.detach())  # bit for bit, sketches included
    # training on did not write into the loaded dict
    assert saved_state["sketchy"]["step"] == saved_copy["sketchy"]["step"] == 5
    assert torch.equal(saved_state["sketchy"]["basis"], saved_copy["sketchy"]["basis"])


def test_deepcopy_keeps_the_preconditioner_and_continues_identically():
    x, y, grads, hess = _batches(6)
    w = torch.zeros(6, requires_grad=True)
    opt = SketchySGD([w], rank=3, update_freq=4)
    used = _train(w, opt, x, y, grads[:2], hess)
    twin = copy.deepcopy(opt)  # copies the parameter too
    w_copy = twin.param_groups[0]["params"][0]
    assert w_copy is not w and torch.equal(w_copy, w)
    assert twin.lambda_max == opt.lambda_max and twin.generator is not opt.generator
    _train(w, opt, x, y, grads[2:], hess[used:])
    _train(w_copy, twin, x, y, grads[2:], hess[used:])
    assert torch.equal(w_copy.detach(), w.detach())


def test_scheduler_scales_the_automatic_step():
    _, _, w, loss = _quadratic()
    opt = SketchySGD([w], lr=0.5, update_freq=100)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    etas, moves = [], []
    for _ in range(4):
        opt.zero_grad()
        loss().backward()
        before = w.detach().clone()
        direction = opt.preconditioner.solve(w.grad, opt.rho) if opt.preconditioner else None
        opt.step(hessian_closure=loss)
        if direction is None:  # first step: the preconditioner was built inside step()
            direction = opt.preconditioner.solve(w.grad, opt.rho)
        etas.append(opt.step_sizes[0])
        moves.append(float((before - w.detach()).norm() / direction.norm()))
        sched.step()
    lam = opt.lambda_max  # one refresh (update_freq=100): lambda_max fixed
    expected = [0.5 / lam, 0.5 / lam, 0.05 / lam, 0.05 / lam]
    assert etas == [pytest.approx(e, rel=1e-12) for e in expected]
    assert moves == [pytest.approx(e, rel=1e-10) for e in expected]
    assert opt.param_groups[0]["initial_lr"] == 0.5


def test_exported_from_the_optimizers_package():
    assert ExportedSketchySGD is SketchySGD


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank must be an integer >= 1, got 0"),
        ({"rank": 2.5}, r"rank must be an integer"),
        ({"rho": 0.0}, r"rho must be a finite number > 0, got 0.0"),
        ({"rho": float("nan")}, r"rho must be a finite number > 0"),
        ({"update_freq": 0}, r"update_freq must be an integer >= 1"),
        ({"eig_iters": 0}, r"eig_iters must be an integer >= 1"),
        ({"step_batches": 0}, r"step_batches must be an integer >= 1.*got 0"),
        ({"step_batches": True}, r"step_batches must be an integer"),
        ({"auto_lr": 1}, r"auto_lr must be True or False"),
        ({"generator": 3}, r"generator must be a torch.Generator or None, got int"),
        ({"lr": -1.0}, r"lr must be a finite number > 0, got -1.0"),
    ],
)
def test_constructor_errors(kwargs, match):
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(HypergradientError, match=match):
        SketchySGD([w], **kwargs)


def test_parameter_group_errors():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(
        HypergradientError, match=r"a parameter group sets \['rho'\].*set only `lr`"
    ):
        SketchySGD([{"params": [w], "rho": 1.0}])
    with pytest.raises(HypergradientError, match=r"share one dtype and device"):
        SketchySGD([w, torch.zeros(2, dtype=torch.float32, requires_grad=True)])


def test_step_errors():
    _, _, w, loss = _quadratic()
    opt = SketchySGD([w])
    loss().backward()
    with pytest.raises(HypergradientError, match=r"no preconditioner yet.*update_preconditioner"):
        opt.step()
    with pytest.raises(HypergradientError, match=r"update_freq is None.*would ignore it"):
        opt.step(hessian_closure=loss)
    with pytest.raises(HypergradientError, match=r"a curvature_closure was given but update_freq"):
        opt.step(curvature_closure=loss)
    with pytest.raises(HypergradientError, match=r"curvature_closure was given without hessian"):
        SketchySGD([w], update_freq=2).step(curvature_closure=loss)
    with pytest.raises(HypergradientError, match=r"step_sizes: no preconditioner yet"):
        opt.step_sizes
    with pytest.raises(HypergradientError, match=r"step 0 rebuilds the preconditioner"):
        SketchySGD([w], update_freq=2).step()
    opt.update_preconditioner(loss)
    w.grad = w.grad.to_sparse()
    with pytest.raises(HypergradientError, match=r"sparse gradient"):
        opt.step()


@pytest.mark.parametrize(
    ("closure", "match"),
    [
        (lambda w: 3.0, r"hessian_closure\(\) must return the scalar loss of a batch, got float"),
        (lambda w: w * 2, r"got a tensor of shape \(3,\). Reduce it"),
        (lambda w: (w * float("nan")).sum(), r"returned nan \(not finite\)"),
        (lambda w: w.detach().sum(), r"does not depend on the parameters"),
        (lambda w: w.sum(), r"largest eigenvalue 0.0.*auto_lr=False"),
    ],
)
def test_hessian_closure_errors(closure, match):
    w = torch.ones(3, requires_grad=True)
    opt = SketchySGD([w])
    with pytest.raises(HypergradientError, match=match):
        opt.update_preconditioner(lambda: closure(w))


def test_hessian_closure_must_be_callable():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(HypergradientError, match=r"hessian_closure must be a function"):
        SketchySGD([w]).update_preconditioner(3.0)
    # errors in the step batches name the closure that produced them
    with pytest.raises(HypergradientError, match=r"curvature_closure must be a function"):
        SketchySGD([w]).update_preconditioner(lambda: (w**2).sum(), 3.0)
    with pytest.raises(HypergradientError, match=r"batch from curvature_closure\(\) has largest"):
        SketchySGD([w]).update_preconditioner(lambda: (w**2).sum(), lambda: w.sum())


def test_load_state_dict_errors():
    _, _, w, loss = _quadratic()
    opt = SketchySGD([w], rho=1e-3)
    opt.update_preconditioner(loss)
    state = opt.state_dict()
    with pytest.raises(HypergradientError, match=r"rho: saved 0.001, here 0.01"):
        SketchySGD([w], rho=1e-2).load_state_dict(state)
    with pytest.raises(HypergradientError, match=r"num_params: saved 8, here 3"):
        SketchySGD([torch.zeros(3, requires_grad=True)]).load_state_dict(state)
    plain = torch.optim.SGD([w], lr=0.1).state_dict()
    with pytest.raises(HypergradientError, match=r"not saved by SketchySGD"):
        opt.load_state_dict(plain)
    moved = copy.deepcopy(state)
    moved["sketchy"]["generator_device"] = "elsewhere"
    with pytest.raises(HypergradientError, match=r"saved generator was on 'elsewhere'"):
        SketchySGD([w]).load_state_dict(moved)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: randomized_nystrom(torch.ones(3, 4), 2), r"square \(p, p\) matrix, got"),
        (lambda: randomized_nystrom(torch.ones(3, 3, dtype=torch.int64), 2), r"floating"),
        (lambda: randomized_nystrom(lambda b: b, 2), r"give dim=p"),
        (lambda: randomized_nystrom(torch.eye(3), 0), r"rank must be an integer >= 1"),
        (lambda: randomized_nystrom("A", 2), r"got str"),
        (lambda: randomized_nystrom(lambda b: b[:, :1], 2, dim=3), r"shape of X, \(3, 2\)"),
        (lambda: randomized_nystrom(torch.eye(3), 2).solve(torch.ones(3), 0.0), r"rho must be"),
        (
            lambda: randomized_nystrom(torch.eye(3), 2).inverse_sqrt(torch.ones(4), 1.0),
            r"shape \(3,\) or a block \(3, k\), got \(4,\)",
        ),
    ],
)
def test_nystrom_errors(call, match):
    with pytest.raises(HypergradientError, match=match):
        call()


# --------------------------------------------------------------------------------------
# the headline: ill-conditioned logistic regression (papers.md section 10)
# --------------------------------------------------------------------------------------


def test_defaults_beat_every_sgd_rate_on_unscaled_logistic_regression():
    """Unscaled breast_cancer + bias column, l2 1e-3, batch 32 (cond(H(0)) = 4.2e8), 30 epochs.

    papers.md section 10's target: SketchySGD with its defaults (rank 10, rho 1e-3, lr 0.5,
    refresh once per epoch, sketch from Hessian batches of floor(sqrt(n)) = 23, the step from
    the largest preconditioned curvature of step_batches = 8 batches of the gradient batch's
    size) ends below 0.25 x the suboptimality of the best of 13 SGD rates 1e-8 ... 1e-2 on
    the same batches, median over 3 seeds, and no seed fails (benchmarks/sketchy_logreg.py,
    10 seeds: 10/10 converge, median 4.0e-3 vs. 1.5e-1).  With the paper's single-batch
    step (step_batches=1) 7 of those 10 seeds blow up by epoch 30.
    """
    data = load_breast_cancer()
    x = torch.as_tensor(data.data)
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = torch.as_tensor(data.target, dtype=torch.float64) * 2 - 1
    n, d = x.shape

    def objective(w, idx=slice(None)):
        return torch.nn.functional.softplus(-y[idx] * (x[idx] @ w)).mean() + 5e-4 * w @ w

    # f* by Newton's method in float64 (the Hessian is 31 x 31)
    eps = torch.finfo(torch.float64).eps
    w = torch.zeros(d)
    for _ in range(100):
        s = torch.sigmoid(y * (x @ w))
        grad = -(x.T @ (y * (1 - s))) / n + 1e-3 * w
        hess = (x.T * (s * (1 - s))) @ x / n + 1e-3 * torch.eye(d)
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        f = objective(w)
        # Armijo backtracking while its test can see the decrease: once the predicted
        # decrease (Newton decrement^2 / 4) is below the round-off of f (a mean of n terms:
        # n * eps * |f|), the comparison is rounding noise and would shrink t towards 0 and
        # stall w (at |grad| ~ 4e-9 on some numerics paths); that close, full Newton steps
        # converge quadratically.
        if 0.25 * grad @ step > n * eps * f:
            while objective(w - t * step) > f - 0.25 * t * grad @ step:
                t *= 0.5
        w = w - t * step
    f_star = float(objective(w))
    # Newton stops at the gradient's round-off floor.  Rounding w to float64 moves the
    # gradient by up to ||H|| * eps * ||w||, and evaluating it (x @ w over d = 31 terms,
    # then X^T r) errs by about d * eps * || |H| |w| || <= d * eps * ||H|| * ||w||; so
    # tolerance d * eps * ||H||_2 * ||w|| (||H||_2 = 3.1e4 = cond 3.1e7 x the l2 1e-3,
    # ||w*|| = 4.65: 9.9e-10).  Reached: 4e-15 ... 2e-13 over ATEN_CPU_CAPABILITY,
    # MKL_CBWR and 1/2 threads.
    tol = d * eps * float(torch.linalg.matrix_norm(hess, 2)) * float(w.norm())
    assert float(grad.norm()) < tol
    start = float(objective(torch.zeros(d))) - f_star

    epochs, batch = 30, 32

    def finite(value):
        return value if math.isfinite(value) else math.inf

    def cpu_perm(gen):
        return torch.randperm(n, generator=gen, device="cpu").to(x.device)

    def sketchy_subopt(seed):
        w = torch.zeros(d, requires_grad=True)
        batches = torch.Generator().manual_seed(seed)  # CPU generators: randperm on the CPU
        hess_gen = torch.Generator().manual_seed(10_000 + seed)
        opt = SketchySGD(
            [w],
            update_freq=math.ceil(n / batch),  # once per epoch
            generator=torch.Generator().manual_seed(20_000 + seed),
        )

        def hessian_closure():  # sketch: a fresh batch of sqrt(n) examples
            return objective(w, cpu_perm(hess_gen)[: math.isqrt(n)])

        def curvature_closure():  # step size: fresh batches of the gradient batch's size
            return objective(w, cpu_perm(hess_gen)[:batch])

        for _ in range(epochs):
            for idx in cpu_perm(batches).split(batch):
                opt.zero_grad()
                objective(w, idx).backward()
                opt.step(hessian_closure=hessian_closure, curvature_closure=curvature_closure)
        return finite(float(objective(w.detach())) - f_star)

    def sgd_subopts(seed, rates):
        # plain SGD (torch.optim.SGD without momentum: w <- w - lr g) for all rates at once,
        # one row per rate, on the same batches as SketchySGD with this seed
        lrs = torch.tensor(rates)[:, None]
        ws = torch.zeros(len(rates), d)
        batches = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in cpu_perm(batches).split(batch):
                s = torch.sigmoid(-y[idx] * (ws @ x[idx].T))  # (rates, batch)
                grads = -(s * y[idx]) @ x[idx] / len(idx) + 1e-3 * ws
                ws = ws - lrs * grads
        return [finite(float(objective(w)) - f_star) for w in ws]

    seeds = [0, 1, 2]
    per_seed_sketchy = [sketchy_subopt(s) for s in seeds]
    sketchy = statistics.median(per_seed_sketchy)
    grid = [10.0 ** (k / 2) for k in range(-16, -3)]  # 13 rates, 1e-8 ... 1e-2
    per_seed = [sgd_subopts(s, grid) for s in seeds]
    sgd = {lr: statistics.median(row[i] for row in per_seed) for i, lr in enumerate(grid)}
    best_lr = min(sgd, key=sgd.get)
    assert 1e-6 <= best_lr <= 1e-4  # the grid brackets SGD's best rate (not at an edge)
    # observed: 5.2e-3 vs 2.0e-1 (ratio 0.03); papers.md's bar is 0.25
    assert sketchy < 0.25 * sgd[best_lr]
    # every seed converges (with the paper's single-batch step seed 1 blows up, 4.8e7, and
    # seed 0 ends at 0.15; observed here: 9.6e-3, 5.2e-3, 8.1e-4);
    # 0.05 is 12x below the start and 4x below the best SGD rate
    assert max(per_seed_sketchy) < 0.05 < start / 10


README_EXAMPLE = _readme.example(
    "SketchySGD(",
    num_refreshes="opt.num_refreshes",
    num_curvatures="len(opt.curvatures)",
    lambda_max_is_the_largest="opt.lambda_max == max(opt.curvatures)",
    final_loss="float(loss(slice(None)).detach())",
)


def test_readme_example_runs():
    # the README's SketchySGD example, as written, alone in a fresh interpreter
    values = README_EXAMPLE.run().values
    assert values["num_refreshes"] == 30
    assert values["num_curvatures"] == 8 and values["lambda_max_is_the_largest"]
    # from log 2 = 0.693 at w = 0 to within 0.05 of f* = 0.0973 (best SGD rate after 30
    # epochs: 0.15 above; the example ends 2e-3 ... 7e-3 above for global seeds 0, 1, 2)
    assert values["final_loss"] < 0.0973 + 0.05
