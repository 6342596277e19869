"""Meta-learning pre-training: the combined hypergradient against dense references and
finite differences, the warm-started loop (resume, weight ordering), the synthetic problem,
and every error message."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacrev

import _readme
import hypergradient as hg
from hypergradient.hparams import AugmentationNet, TaskWeights
from hypergradient.pretrain import (
    MetaPretrainer,
    MultitaskMLP,
    downstream_scores,
    pretrain_hypergrad,
    synthetic_multitask,
    used_by_finetuning,
)
from hypergradient.testing import finite_difference_hypergrad, relative_error


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- quadratic PT
#
# Pre-training: a linear encoder W (d x k) read by fixed task readouts r_t, squared loss,
#   L(W, lam) = mean_t w_t(lam) mean_i (x_i^T W r_t - y_it)^2 / 2 + rho/2 ||W||^2,
# quadratic in W, so W*(lam) = -H^{-1} grad L(0, lam) exactly (one dense solve).
# Fine-tuning: tanh features of the (copied or frozen) encoder, a linear head, K steps of
# SGD with momentum on a cross-entropy, then the validation cross-entropy E.

D, K_ENC, T, C = 3, 2, 3, 3


class Quadratic:
    def __init__(self, finetune: str):
        g = _gen(1)
        self.finetune = finetune
        self.x_pt = torch.randn(12, D, generator=g)
        self.readout = torch.randn(K_ENC, T, generator=g)
        self.y_pt = torch.randn(12, T, generator=g)
        self.x_ft, self.y_ft = (
            torch.randn(9, D, generator=g),
            torch.randint(0, C, (9,), generator=g),
        )
        self.x_val = torch.randn(7, D, generator=g)
        self.y_val = torch.randint(0, C, (7,), generator=g)
        self.head0 = {"U": 0.3 * torch.randn(K_ENC, C, generator=g)}
        self.kind = TaskWeights(T)
        self.rho = 0.1
        self.steps, self.lr, self.momentum = 3, 0.4, 0.5
        self.hparams = {"task_logits": torch.tensor([0.3, -0.2, 0.5])}

    def pretrain_loss(self, p, h):
        pred = self.x_pt @ p["W"] @ self.readout  # (n, T)
        per_task = 0.5 * ((pred - self.y_pt) ** 2).mean(0)
        return torch.mean(self.kind.weights(h) * per_task) + 0.5 * self.rho * (p["W"] ** 2).sum()

    def encoder(self, phi, theta):
        return phi["W"] if self.finetune == "full" else theta["W"]

    def finetune_loss(self, phi, theta):
        feats = torch.tanh(self.x_ft @ self.encoder(phi, theta))
        return F.cross_entropy(feats @ phi["U"], self.y_ft)

    def finetune_val_loss(self, phi, theta):
        feats = torch.tanh(self.x_val @ self.encoder(phi, theta))
        return F.cross_entropy(feats @ phi["U"], self.y_val)

    def finetune_init(self):
        if self.finetune == "head":
            return self.head0
        return lambda th: {"W": th["W"], **self.head0}

    # -- dense references, written independently of the library --------------------------
    def solve(self, h):
        """W*(lam): one dense solve of the quadratic's normal equations."""

        def flat_loss(w):
            return self.pretrain_loss({"W": w.reshape(D, K_ENC)}, h)

        zero = torch.zeros(D * K_ENC)
        H = hessian(flat_loss)(zero)
        return torch.linalg.solve(H, -grad(flat_loss)(zero)).reshape(D, K_ENC)

    def val_after_finetuning(self, W):
        """E(W) by K explicit SGD-momentum steps (torch.optim.SGD's rule, dampening 0)."""
        theta = {"W": W}
        phi = {"W": W, **self.head0} if self.finetune == "full" else dict(self.head0)
        buf = None
        for _ in range(self.steps):
            g = grad(lambda f: self.finetune_loss(f, theta))(phi)
            buf = g if buf is None else {k: self.momentum * buf[k] + g[k] for k in g}
            phi = {k: phi[k] - self.lr * buf[k] for k in phi}
        return self.finetune_val_loss(phi, theta)

    def dense_hypergrad(self, h):
        """dE/dlam = dE/dW . dW*/dlam, with dW*/dlam = -H^{-1} d(grad_W L)/dlam (dense)."""
        W = self.solve(h)
        lam = h["task_logits"]

        def flat_grad(w, l):
            return grad(lambda ww: self.pretrain_loss({"W": ww.reshape(D, K_ENC)},
                                                      {"task_logits": l}))(w)  # fmt: skip

        w = W.reshape(-1)
        H = jacrev(flat_grad, argnums=0)(w, lam)  # (p, p)
        mixed = jacrev(flat_grad, argnums=1)(w, lam)  # (p, m)
        dw_dlam = -torch.linalg.solve(H, mixed)
        dE_dw = grad(lambda ww: self.val_after_finetuning(ww.reshape(D, K_ENC)))(w)
        return {"task_logits": dE_dw @ dw_dlam}, W

    def response(self, h):
        return self.val_after_finetuning(self.solve(h))


@pytest.mark.parametrize("finetune", ["full", "head"])
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_combined_hypergradient_equals_dense_computation_and_finite_differences(finetune, solver):
    prob = Quadratic(finetune)
    dense, W = prob.dense_hypergrad(prob.hparams)
    got = pretrain_hypergrad(
        prob.pretrain_loss,
        prob.finetune_loss,
        prob.finetune_val_loss,
        {"W": W},
        prob.hparams,
        prob.finetune_init(),
        finetune_steps=prob.steps,
        finetune_lr=prob.lr,
        finetune_momentum=prob.momentum,
        solver=solver,
        max_steps=50,
        tol=1e-13,
    )
    # Same quantity by two routes in float64: only round-off separates them (CG on a 6x6
    # SPD system converges in <= 6 steps).
    assert relative_error(got, dense) < 1e-9
    # Central differences of the whole pipeline: O(eps^2) truncation + O(1e-16/eps) round-off.
    fd = finite_difference_hypergrad(prob.response, prob.hparams, eps=1e-5)
    assert relative_error(got, fd) < 1e-7
    assert float(got["task_logits"].abs().min()) > 1e-4  # a non-trivial hypergradient


def test_truncated_neumann_series_have_their_closed_forms_and_converge_to_the_solve():
    prob = Quadratic("full")
    W = prob.solve(prob.hparams)
    args = (prob.pretrain_loss, prob.finetune_loss, prob.finetune_val_loss, {"W": W},
            prob.hparams, prob.finetune_init())  # fmt: skip
    kw = dict(finetune_steps=prob.steps, finetune_lr=prob.lr, finetune_momentum=prob.momentum)
    info = pretrain_hypergrad(*args, solver="exact", return_info=True, **kw)
    v = info.finetune_grad["W"]
    lam = prob.hparams["task_logits"].clone().requires_grad_(True)
    Wg = W.clone().requires_grad_(True)
    g_w = torch.autograd.grad(prob.pretrain_loss({"W": Wg}, {"task_logits": lam}), Wg,
                              create_graph=True)[0]  # fmt: skip

    def mixed(q):  # d/dlam [grad_W L(W, lam) . q]
        return torch.autograd.grad((g_w * q).sum(), lam, retain_graph=True)[0]

    hvp = torch.autograd.grad((g_w * v).sum(), Wg, retain_graph=True)[0]
    alpha = 0.05
    # max_steps=0: H^{-1} ~ alpha I, i.e. dE/dlam ~ -alpha (gradient alignment)
    zero = pretrain_hypergrad(*args, solver="neumann", max_steps=0, alpha=alpha, **kw)
    torch.testing.assert_close(zero["task_logits"], -alpha * mixed(v), rtol=1e-12, atol=1e-15)
    # max_steps=1 (Raghu et al.'s "one Neumann term", as in their code):
    #   H^{-1} v ~ alpha (v + (I - alpha H) v)
    one = pretrain_hypergrad(*args, solver="neumann", max_steps=1, alpha=alpha, **kw)
    q = alpha * (2 * v - alpha * hvp)
    torch.testing.assert_close(one["task_logits"], -mixed(q), rtol=1e-12, atol=1e-15)
    # 400 terms with alpha = 1/lambda_max (estimated) converge to the solve: the error decays
    # like (1 - lambda_min/lambda_max)^400, far below the tolerance for this 6x6 Hessian.
    many = pretrain_hypergrad(*args, solver="neumann", max_steps=400, **kw)
    assert relative_error(many, info.hypergrad) < 1e-6


def test_info_reports_the_finetuning_gradient_the_loss_and_the_transferred_tensors():
    prob = Quadratic("full")
    W = prob.solve(prob.hparams)
    # pre-training also owns a head that fine-tuning never reads
    pt_head = torch.randn(K_ENC, T, generator=_gen(3))

    def pretrain_loss(p, h):
        return prob.pretrain_loss(p, h) + 0.5 * ((p["V"] - pt_head) ** 2).sum()

    info = pretrain_hypergrad(
        pretrain_loss, prob.finetune_loss, prob.finetune_val_loss, {"W": W, "V": pt_head},
        prob.hparams, prob.finetune_init(), finetune_steps=prob.steps, finetune_lr=prob.lr,
        finetune_momentum=prob.momentum, solver="exact", return_info=True,
    )  # fmt: skip
    assert info.transfer == ("W",)
    assert torch.equal(info.finetune_grad["V"], torch.zeros_like(pt_head))
    dE_dW = grad(prob.val_after_finetuning)(W)
    torch.testing.assert_close(info.finetune_grad["W"], dE_dW, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(info.val_loss, prob.val_after_finetuning(W), rtol=1e-12, atol=0)
    assert set(info.finetuned) == {"W", "U"}
    assert info.stats.result is hg.Result.SUCCESSFUL
    # the pre-training head is decoupled from W: the hypergradient is the one without it
    plain = pretrain_hypergrad(
        prob.pretrain_loss, prob.finetune_loss, prob.finetune_val_loss, {"W": W},
        prob.hparams, prob.finetune_init(), finetune_steps=prob.steps, finetune_lr=prob.lr,
        finetune_momentum=prob.momentum, solver="exact",
    )  # fmt: skip
    assert relative_error(info.hypergrad, plain) < 1e-10


# ----------------------------------------------------------------------------- non-convex PT


def _flat(params):
    return torch.cat([v.reshape(-1) for v in params.values()])


def _unflat(vec, like):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def _newton(loss, params, steps=30):
    """Minimise loss(params) by damped-free Newton steps with the dense Hessian (quadratic
    convergence near a strict minimum; checked by the gradient norm)."""
    x = _flat(params)

    def f(v):
        return loss(_unflat(v, params))

    for _ in range(steps):
        x = x - torch.linalg.solve(hessian(f)(x), grad(f)(x))
    assert float(grad(f)(x).norm()) < 1e-11
    assert float(torch.linalg.eigvalsh(hessian(f)(x)).min()) > 0  # a strict minimum
    return _unflat(x, params)


def _adam(loss, params, steps, lr):
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(p.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss(p).backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


def test_multitask_mlp_at_a_newton_minimum_matches_finite_differences():
    data = synthetic_multitask(num_useful=2, num_noise=1, dim=3, latent_dim=1, num_classes=2,
                               n_pretrain=20, n_train=10, n_val=10, n_test=5, seed=3)  # fmt: skip
    model = MultitaskMLP(data.dim, 2, data.num_tasks, data.num_classes)
    kind = TaskWeights(data.num_tasks)
    pt = model.pretrain_loss(kind, weight_decay=0.05)
    hparams = {"task_logits": torch.tensor([0.2, -0.1, 0.4])}

    def pretrain_loss(p, h):
        return pt(p, h, data.x_pretrain, data.y_pretrain)

    start = _adam(lambda p: pretrain_loss(p, hparams), model.init(0), 400, 0.05)
    theta = _newton(lambda p: pretrain_loss(p, hparams), start)

    def ft(phi, th):
        return F.cross_entropy(model.logits(phi, phi, data.x_train), data.y_train)

    def val(phi, th):
        return F.cross_entropy(model.logits(phi, phi, data.x_val), data.y_val)

    head0 = {k: 0.1 * torch.ones_like(v) for k, v in model.fresh_head().items()}

    def init(th):
        return {**{k: th[k] for k in MultitaskMLP.ENCODER}, **head0}

    got = pretrain_hypergrad(pretrain_loss, ft, val, theta, hparams, init, finetune_steps=2,
                             finetune_lr=0.5, solver="exact")  # fmt: skip

    def response(h):
        th = _newton(lambda p: pretrain_loss(p, h), theta, steps=8)
        phi = init(th)
        for _ in range(2):
            g = grad(lambda f: ft(f, th))(phi)
            phi = {k: phi[k] - 0.5 * g[k] for k in phi}
        return val(phi, th)

    fd = finite_difference_hypergrad(response, hparams, eps=1e-5)
    # Newton re-solves to ~1e-12 per side, so FD is good to ~1e-7 relative
    assert relative_error(got, fd) < 1e-6


def test_augmentation_network_hyperparameters_match_a_directional_finite_difference():
    g = _gen(5)
    kind = AugmentationNet(image_shape=(1, 8, 8), transform="affine", noise_dim=1, hidden=2,
                           clean_weight=0.3, seed=1)  # fmt: skip
    hparams = kind.init({"w": torch.zeros(1)})
    # move the last layer off zero so that every hyperparameter is on a path to the loss
    hparams = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in hparams.items()}
    x_pt, y_pt = torch.rand(16, 64, generator=g), torch.randint(0, 2, (16,), generator=g)
    noise = kind.sample_noise(x_pt.reshape(16, 1, 8, 8), generator=g)  # fixed noise
    x_ft, y_ft = torch.rand(8, 64, generator=g), torch.randint(0, 2, (8,), generator=g)
    x_val, y_val = torch.rand(8, 64, generator=g), torch.randint(0, 2, (8,), generator=g)

    def logits(p, x):
        return x @ p["W"] + p["b"]

    def pretrain_loss(p, h):
        aug = kind.augment(h, x_pt, noise)
        c = kind.clean_weight
        loss = c * F.cross_entropy(logits(p, x_pt), y_pt)
        loss = loss + (1 - c) * F.cross_entropy(logits(p, aug), y_pt)
        # strongly convex in (W, b): the penalty also fixes softmax's shift of the biases
        return loss + 0.05 * ((p["W"] ** 2).sum() + (p["b"] ** 2).sum())

    def ft(phi, th):
        return F.cross_entropy(logits(phi, x_ft), y_ft)

    def val(phi, th):
        return F.cross_entropy(logits(phi, x_val), y_val)

    def init(th):
        return {"W": th["W"], "b": th["b"]}

    theta0 = {"W": torch.zeros(64, 2), "b": torch.zeros(2)}
    theta = _newton(lambda p: pretrain_loss(p, hparams), theta0, steps=15)
    got = pretrain_hypergrad(pretrain_loss, ft, val, theta, hparams, init, finetune_steps=2,
                             finetune_lr=1.0, solver="cg", max_steps=200, tol=1e-13)  # fmt: skip
    direction = {k: torch.randn(v.shape, generator=g) for k, v in hparams.items()}

    def response(t):
        h = {k: hparams[k] + t * direction[k] for k in hparams}
        th = _newton(lambda p: pretrain_loss(p, h), theta, steps=6)
        phi = init(th)
        for _ in range(2):
            gr = grad(lambda f: ft(f, th))(phi)
            phi = {k: phi[k] - 1.0 * gr[k] for k in phi}
        return val(phi, th)

    eps = 1e-5
    fd = (response(eps) - response(-eps)) / (2 * eps)
    analytic = sum(torch.sum(got[k] * direction[k]) for k in hparams)
    assert abs(float(fd)) > 1e-5
    # directional derivative: FD O(eps^2) + Newton residuals ~1e-12 / eps
    assert abs(float(analytic - fd)) < 1e-6 * max(1.0, abs(float(fd)))


# ----------------------------------------------------------------------------- the loop


def _tiny_problem(seed=0, **overrides):
    options = dict(num_useful=6, num_noise=6, dim=20, latent_dim=2, num_classes=3,
                   n_pretrain=60, n_train=60, n_val=60, n_test=400, seed=seed)  # fmt: skip
    options.update(overrides)
    data = synthetic_multitask(**options)
    model = MultitaskMLP(data.dim, 6, data.num_tasks, data.num_classes)
    kind = TaskWeights(data.num_tasks)
    pt = model.pretrain_loss(kind, weight_decay=1e-4)
    return data, model, kind, pt


def _trainer(data, model, kind, pt, *, period=10, warmup=50, seed=0):
    params = model.init(seed + 1)
    return MetaPretrainer(
        lambda p, h, batch: pt(p, h, data.x_pretrain, data.y_pretrain),
        lambda phi, th: F.cross_entropy(model.logits(phi, th, data.x_train), data.y_train),
        lambda phi, th: F.cross_entropy(model.logits(phi, th, data.x_val), data.y_val),
        params,
        kind.init(params),
        model.fresh_head(),
        optimizer=lambda ps: torch.optim.Adam(ps, lr=0.02),
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        period=period,
        warmup=warmup,
        finetune_steps=1,
        finetune_lr=1.0,
    )


def test_meta_pretraining_learns_to_downweight_the_noise_tasks():
    data, model, kind, pt = _tiny_problem()
    trainer = _trainer(data, model, kind, pt)
    losses = []
    trainer.run(700, callback=lambda tr, info: losses.append(float(info.val_loss)))
    assert trainer.hyper_step_count == (700 - 50) // 10 == len(losses)
    w = kind.weights(trainer.hparams)
    useful, noise = float(w[data.useful].mean()), float(w[~data.useful].mean())
    # the paper's criterion: the learned noise weights end below half the useful ones (here
    # they end near 0.02 of them; 0.5 leaves room for other platforms' round-off)
    assert noise < 0.5 * useful, (noise, useful)
    assert float(w[~data.useful].max()) < float(w[data.useful].max())
    # what it is for: the fine-tuned validation loss fell while the weights moved
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_resumed_trainer_continues_exactly_like_an_uninterrupted_one():
    data, model, kind, pt = _tiny_problem(n_test=10)
    whole = _trainer(data, model, kind, pt, period=5, warmup=10).run(60)
    first = _trainer(data, model, kind, pt, period=5, warmup=10).run(33)
    state = first.state_dict()
    resumed = _trainer(data, model, kind, pt, period=5, warmup=10)
    resumed.load_state_dict(state)
    resumed.run(60)
    assert resumed.hyper_step_count == whole.hyper_step_count == 10
    for k in whole.params:
        assert torch.equal(resumed.params[k], whole.params[k]), k
    assert torch.equal(resumed.hparams["task_logits"], whole.hparams["task_logits"])


def test_batches_are_read_by_step_and_project_runs_after_every_hyper_step():
    data, model, kind, pt = _tiny_problem(n_test=10)
    seen, projected = [], []

    def batches(step):
        seen.append(step)
        return torch.arange(step % 3, data.x_pretrain.shape[0], 3)

    def project(h):
        projected.append(1)
        h["task_logits"].clamp_(-1.0, 1.0)

    params = model.init(1)
    trainer = MetaPretrainer(
        lambda p, h, b: pt(p, h, data.x_pretrain[b], data.y_pretrain[b]),
        lambda phi, th: F.cross_entropy(model.logits(phi, th, data.x_train), data.y_train),
        lambda phi, th: F.cross_entropy(model.logits(phi, th, data.x_val), data.y_val),
        params, kind.init(params), model.fresh_head(), batches=batches, period=4, warmup=0,
        hyper_optimizer=lambda ps: torch.optim.SGD(ps, lr=1e4), finetune_lr=1.0,
        project=project,
    )  # fmt: skip
    trainer.run(8)
    # steps 0..7 train; the hyper-steps after steps 4 and 8 reuse the batch of steps 3 and 7
    assert seen == [0, 1, 2, 3, 3, 4, 5, 6, 7, 7]
    assert len(projected) == 2
    assert float(trainer.hparams["task_logits"].abs().max()) <= 1.0


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_problem_is_seeded_and_its_useful_tasks_share_the_latent_structure():
    a, b = synthetic_multitask(seed=4, n_test=50), synthetic_multitask(seed=4, n_test=50)
    assert torch.equal(a.x_pretrain, b.x_pretrain) and torch.equal(a.y_pretrain, b.y_pretrain)
    assert not torch.equal(a.x_pretrain, synthetic_multitask(seed=5, n_test=50).x_pretrain)
    assert a.x_test.shape == (50, 30) and a.y_train.dtype == torch.int64
    assert set(a.y_pretrain.unique().tolist()) <= {0.0, 1.0}
    # a useful task is a linear threshold of x (through the latent plane), a noise task is
    # coin flips: a least-squares fit of the +-1 labels on 1000 examples predicts the other
    # 1000 almost perfectly for the first, at chance (+- 3 binomial sd) for the second
    big = synthetic_multitask(seed=4, n_pretrain=2000, n_test=1)
    x = torch.cat([big.x_pretrain, torch.ones(2000, 1)], 1)

    def held_out_accuracy(t):
        target = 2 * big.y_pretrain[:, t] - 1
        coef = torch.linalg.lstsq(x[:1000], target[:1000].unsqueeze(1)).solution
        return float(((x[1000:] @ coef).squeeze(1).sign() == target[1000:]).double().mean())

    useful = [held_out_accuracy(t) for t in range(10)]
    noise = [held_out_accuracy(t) for t in range(10, 20)]
    assert min(useful) > 0.9 and max(noise) < 0.55, (useful, noise)


def test_downstream_scores_of_a_pretrained_encoder_beat_a_random_one():
    data, model, kind, pt = _tiny_problem(num_noise=0)
    params = model.init(1)
    hparams = kind.init(params)
    trained = _adam(lambda p: pt(p, hparams, data.x_pretrain, data.y_pretrain), params, 300, 0.02)
    random_enc = downstream_scores(model, params, data, full_steps=0)
    pretrained = downstream_scores(model, trained, data, full_steps=20)
    assert set(pretrained) == {"linear_acc", "full_acc"} and set(random_enc) == {"linear_acc"}
    assert pretrained["linear_acc"] > random_enc["linear_acc"] + 0.1


# ----------------------------------------------------------------------------- errors

WHERE = r"hypergradient\.pretrain\.pretrain_hypergrad\(\.\.\.\)"


def _args(**change):
    prob = Quadratic("full")
    args = dict(
        pretrain_loss=prob.pretrain_loss,
        finetune_loss=prob.finetune_loss,
        finetune_val_loss=prob.finetune_val_loss,
        pretrained={"W": prob.solve(prob.hparams)},
        hparams=prob.hparams,
        finetune_init=prob.finetune_init(),
    )
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(finetune_loss=3), r"`finetune_loss` must be a callable"),
        (dict(pretrained={"W": torch.zeros(3, 2, dtype=torch.float32)}), "dtype"),
        (dict(finetune_steps=0), "finetune_steps must be an int >= 1"),
        (dict(finetune_lr=-1.0), "finetune_lr must be a finite float >= 0"),
        (dict(finetune_momentum=float("nan")), "finetune_momentum must be a finite float"),
        (dict(return_info="yes"), "return_info must be a bool"),
        (dict(finetune_init=[1, 2]), "finetune_init must be a dict of tensors"),
        (dict(finetune_init=lambda th: th["W"]), "must return the fine-tuned model's starting"),
        (dict(finetune_init=lambda th: {"W": th["W"].long(), "U": th["W"][:, :1]}), "dtype"),
        (
            dict(
                finetune_init={
                    "W": torch.zeros(D, K_ENC, dtype=torch.float64),
                    "U": torch.zeros(K_ENC, C, dtype=torch.float64),
                }
            ),
            "fine-tuning reads none of the pre-trained tensors",
        ),  # fmt: skip
        (
            dict(finetune_init={"U": torch.zeros(K_ENC, C, dtype=torch.float32)}),
            r"starting weights \{'U': 'torch.float32'\} do not have the pre-trained",
        ),
        (dict(finetune_val_loss=lambda phi, th: phi["W"]), "scalar"),
    ],
)
def test_bad_input_is_rejected_with_a_message_naming_it(change, match):
    with pytest.raises(hg.HypergradientError, match=WHERE + ".*" + match):
        pretrain_hypergrad(**_args(**change))


def test_errors_inside_either_part_say_which_part():
    with pytest.raises(hg.HypergradientError, match="while differentiating the fine-tuning run"):
        # a float32 fine-tuning loss for float64 weights: the unroll rejects it
        pretrain_hypergrad(
            **_args(finetune_loss=lambda phi, th: (phi["W"].sum() + phi["U"].sum()).float())
        )
    # below, `pretrained` solves the original problem, not the replaced pre-training losses:
    # they are not stationary there, so the stationarity check is opted out of
    anywhere = {"stationarity_tol": None}
    with pytest.raises(hg.HypergradientError, match="while differentiating through pre-training"):
        pretrain_hypergrad(**_args(pretrain_loss=lambda p, h: (p["W"] ** 2).sum()), **anywhere)
    kind = TaskWeights(T)

    def concave(p, h):  # negative definite Hessian: CG breaks down at once
        return -0.5 * kind.weights(h).sum() * (p["W"] ** 2).sum()

    with pytest.raises(hg.ConvergenceError, match="while differentiating through pre-training"):
        pretrain_hypergrad(**_args(pretrain_loss=concave), solver="cg", **anywhere)


def test_used_by_finetuning_finds_the_tensors_either_loss_or_the_init_reads():
    prob = Quadratic("head")
    theta = {"W": torch.ones(D, K_ENC), "V": torch.ones(2)}
    assert used_by_finetuning(prob.finetune_loss, prob.finetune_val_loss, theta,
                              prob.head0) == ("W",)  # fmt: skip
    assert used_by_finetuning(
        lambda phi, th: (phi["U"] ** 2).sum(),
        lambda phi, th: (phi["U"] ** 2).sum(),
        theta,
        lambda th: {"U": th["V"] * 1.0},
    ) == ("V",)


TRAINER_WHERE = r"hypergradient\.pretrain\.MetaPretrainer"


def _trainer_args(**change):
    data, model, kind, pt = _tiny_problem(n_test=10)
    params = model.init(1)
    args = dict(
        pretrain_loss=lambda p, h, b: pt(p, h, data.x_pretrain, data.y_pretrain),
        finetune_loss=lambda phi, th: F.cross_entropy(
            model.logits(phi, th, data.x_train), data.y_train
        ),  # fmt: skip
        finetune_val_loss=lambda phi, th: F.cross_entropy(
            model.logits(phi, th, data.x_val), data.y_val
        ),  # fmt: skip
        params=params,
        hparams=kind.init(params),
        finetune_init=model.fresh_head(),
    )
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(pretrain_loss=None), "`pretrain_loss` must be a callable"),
        (dict(optimizer="adam"), "`optimizer` must be a callable"),
        (dict(batches=5), "`batches` must be a callable"),
        (dict(project=5), "`project` must be a callable"),
        (dict(finetune_init=3), "finetune_init must be a dict of tensors or a callable"),
        (dict(finetune_init={"U": [1.0]}), "must be a torch.Tensor"),
        (dict(period=0), r"period=0\): expected an int >= 1"),
        (dict(warmup=-1), r"warmup=-1\): expected an int >= 0"),
        (dict(hyper_optimizer=lambda ps: 3), "must return a torch.optim.Optimizer"),
        (dict(params={"w": torch.ones(2)}, hparams={"w": torch.ones(2)}), "appear in both"),
    ],
)
def test_bad_trainer_options_are_rejected(change, match):
    with pytest.raises(hg.HypergradientError, match=TRAINER_WHERE + ".*" + match):
        MetaPretrainer(**_trainer_args(**change))


def test_trainer_errors_at_run_time():
    trainer = MetaPretrainer(**_trainer_args())
    with pytest.raises(hg.HypergradientError, match=r"steps=-1\): expected an int >= 0"):
        trainer.run(-1)
    with pytest.raises(hg.HypergradientError, match="load_state_dict: the state lacks"):
        trainer.load_state_dict({"params": {}})
    state = trainer.state_dict()
    state["hparams"] = {"other": torch.zeros(1)}
    with pytest.raises(hg.HypergradientError, match="saved hparams have the keys"):
        trainer.load_state_dict(state)
    broken = MetaPretrainer(
        **_trainer_args(pretrain_loss=lambda p, h, b: p["encoder.weight"].sum() * math.nan)
    )
    with pytest.raises(hg.HypergradientError, match="pre-training loss became nan at step 1"):
        broken.step()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(num_useful=0), r"num_useful=0\): expected an int >= 1"),
        (dict(num_noise=-1), r"num_noise=-1\): expected an int >= 0"),
        (dict(dim=2, latent_dim=3), "latent_dim <= dim"),
        (dict(num_classes=1), r"num_classes=1\)"),
        (dict(n_test=0), r"n_test=0\)"),
        (dict(seed=1.5), r"seed=1.5\)"),
    ],
)
def test_bad_synthetic_options_are_rejected(change, match):
    with pytest.raises(hg.HypergradientError, match=r"synthetic_multitask.*" + match):
        synthetic_multitask(**change)


def test_pretrain_loss_checks_the_number_of_tasks():
    model = MultitaskMLP(4, 3, num_tasks=5, num_classes=2)
    with pytest.raises(hg.HypergradientError, match="TaskWeights has num_tasks=4"):
        model.pretrain_loss(TaskWeights(4))


README_EXAMPLE = _readme.example("pretrain.MetaPretrainer(")


def test_readme_example_runs_and_downweights_the_noise_tasks():
    printed = README_EXAMPLE.run().stdout  # in a fresh interpreter, as a reader pastes it
    ratio = float(printed.split("noise/useful weight ")[1].split()[0])
    assert ratio < 0.5, printed
    assert "linear_acc" in printed and "full_acc" in printed


# ----------------------------------------------------------------------------- curvature step


def _spd(eigenvalues, seed):
    q = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=_gen(seed),
                                    dtype=torch.float64))[0]  # fmt: skip
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("inner", ["cg", "minres", "exact", "neumann"])
def test_curvature_damped_solves_the_system_damped_by_its_reported_fraction_of_lambda_max(inner):
    # spectrum 1e-3 .. 10 with a gap (10 vs 5): 60 power steps find lambda_max to ~1e-16;
    # one negative eigenvalue (-0.5) above -delta = -0.3 * 10: the damped system is SPD
    A = _spd([-0.5, 1e-3, 0.1, 1.0, 5.0, 10.0], seed=0)
    b = torch.randn(6, generator=_gen(1), dtype=torch.float64)
    solver = hg.pretrain.CurvatureDamped(inner, relative_damping=0.3, max_steps=300,
                                         tol=1e-14, power_steps=60)  # fmt: skip
    x, stats = solver.solve(lambda v: A @ v, b)
    assert stats.converged and stats.num_matvecs >= 60
    lam = stats.extra["lambda_max"]
    assert abs(lam - 10.0) < 1e-10
    assert stats.extra["damping"] == 0.3 * lam
    # Neumann: its step is 1/(lambda_max + delta), so every term shrinks the error by
    # <= 1 - (lambda_min + delta)/(lambda_max + delta) = 0.81: 300 terms reach round-off
    if inner == "neumann":
        assert stats.extra["alpha"] == 1.0 / (lam + stats.extra["damping"])
    expected = torch.linalg.solve(A + stats.extra["damping"] * torch.eye(6, dtype=A.dtype), b)
    assert float((x - expected).norm() / expected.norm()) < 1e-11


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_relative_damping_hypergradient_equals_the_damped_dense_solve_and_finite_differences(
    solver,
):
    prob = Quadratic("full")
    W = prob.solve(prob.hparams)
    info = pretrain_hypergrad(
        prob.pretrain_loss, prob.finetune_loss, prob.finetune_val_loss, {"W": W}, prob.hparams,
        prob.finetune_init(), finetune_steps=prob.steps, finetune_lr=prob.lr,
        finetune_momentum=prob.momentum, solver=solver, max_steps=400, tol=1e-14,
        relative_damping=0.3, power_steps=100, return_info=True,
    )  # fmt: skip
    delta = info.stats.extra["damping"]
    lam = prob.hparams["task_logits"]

    def flat_grad(w, l):
        return grad(lambda ww: prob.pretrain_loss({"W": ww.reshape(D, K_ENC)},
                                                  {"task_logits": l}))(w)  # fmt: skip

    w = W.reshape(-1)
    H = jacrev(flat_grad, argnums=0)(w, lam)
    assert abs(delta - 0.3 * float(torch.linalg.eigvalsh(H)[-1])) < 1e-12 * delta
    # exact: dE/dlam = -dE/dW (H + delta I)^{-1} d(grad_W L)/dlam, one dense solve
    mixed = jacrev(flat_grad, argnums=1)(w, lam)
    dE_dw = grad(lambda ww: prob.val_after_finetuning(ww.reshape(D, K_ENC)))(w)
    dense = -dE_dw @ torch.linalg.solve(H + delta * torch.eye(len(w), dtype=w.dtype), mixed)
    assert relative_error(info.hypergrad, {"task_logits": dense.detach()}) < 1e-10

    # The damped hypergradient is the exact one of the proximal problem anchored at W,
    #   W_delta(lam) = argmin_W L(W, lam) + delta/2 ||W - W_anchor||^2,
    # (at lam: W_delta = W, Hessian H + delta I): central differences of its response.
    def response(h):
        def aug(ww):
            return prob.pretrain_loss({"W": ww.reshape(D, K_ENC)}, h) + 0.5 * delta * (
                (ww - w) ** 2).sum()  # fmt: skip

        zero = torch.zeros_like(w)
        W_h = -torch.linalg.solve(hessian(aug)(zero), grad(aug)(zero))  # quadratic: 1 solve
        return prob.val_after_finetuning(W_h.reshape(D, K_ENC))

    if solver == "cg":  # the dense solve above is the same quantity for both solvers
        fd = finite_difference_hypergrad(response, prob.hparams, eps=1e-5)
        assert relative_error(info.hypergrad, fd) < 1e-7
    undamped = pretrain_hypergrad(
        prob.pretrain_loss, prob.finetune_loss, prob.finetune_val_loss, {"W": W}, prob.hparams,
        prob.finetune_init(), finetune_steps=prob.steps, finetune_lr=prob.lr,
        finetune_momentum=prob.momentum, solver="exact",
    )  # fmt: skip
    assert relative_error(info.hypergrad, undamped) > 1e-3  # the damping does change it


def test_meta_pretrainer_takes_its_neumann_step_and_damping_from_the_curvature():
    data, model, kind, pt = _tiny_problem(n_test=10)
    args = _trainer_args()
    infos = {}
    for name, options in (("neumann", dict(solver="neumann", max_steps=3)),
                          ("cg", dict(solver="minres", max_steps=5, tol=0.0, relative_damping=0.1)),
                          ("identity", dict(solver="identity", max_steps=0))):  # fmt: skip
        trainer = MetaPretrainer(**args, optimizer=lambda ps: torch.optim.Adam(ps, lr=0.02),
                                 period=5, warmup=0, **options)  # fmt: skip
        trainer.run(4)
        infos[name] = (trainer.step(), trainer.params)
    (neumann, params), (cg, _), (identity, _) = infos["neumann"], infos["cg"], infos["identity"]
    hess = _dense_hessian(lambda p: pt(p, args["hparams"], data.x_pretrain, data.y_pretrain),
                          params)  # fmt: skip
    top = float(torch.linalg.eigvalsh(hess).abs().max())
    # power iteration (20 steps) from below: within a few percent of |lambda|_max
    assert 0.9 * top <= neumann.stats.extra["lambda_max"] <= top * (1 + 1e-9)
    assert neumann.stats.extra["alpha"] == 1.0 / neumann.stats.extra["lambda_max"]
    assert cg.stats.extra["damping"] == 0.1 * cg.stats.extra["lambda_max"]
    assert identity.stats.extra["alpha"] == 0.02  # identity: only a scale, the PT rate


def _dense_hessian(loss, params):
    flat = _flat(params)
    return hessian(lambda v: loss(_unflat(v, params)))(flat)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(relative_damping=0.0), r"relative_damping must be a finite float > 0, got 0.0"),
        (dict(relative_damping=-1e-3), r"relative_damping must be a finite float > 0"),
        (dict(relative_damping=float("nan")), r"relative_damping must be a finite float > 0"),
        (dict(relative_damping=True), r"relative_damping must be a finite float > 0"),
        (dict(relative_damping=0.1, damping=0.1), "were both given; pass one"),
        (dict(relative_damping=0.1, solver=hg.linalg.CG()), "needs solver given by name"),
        (dict(relative_damping=0.1, solver="gmres"), r"inner must be one of \['cg'"),
        (dict(relative_damping=0.1, power_steps=0), "power_steps must be an int >= 1"),
        (dict(relative_damping=0.1, max_steps=-1), "max_steps must be a non-negative int"),
        (dict(damping=float("nan")), "damping must be a float >= 0"),
        (dict(damping=-1.0), "damping must be a float >= 0"),
    ],
)
def test_bad_damping_is_rejected_with_one_clear_error(change, match):
    with pytest.raises(hg.HypergradientError, match=WHERE + ".*" + match):
        pretrain_hypergrad(**_args(**change))


def test_nan_weights_and_bad_trainer_damping_are_rejected():
    bad = {"W": torch.full((D, K_ENC), math.nan, dtype=torch.float64)}
    with pytest.raises(hg.HypergradientError, match=WHERE + r".*contains .*NaN"):
        pretrain_hypergrad(**_args(pretrained=bad))
    with pytest.raises(hg.HypergradientError, match=TRAINER_WHERE + ".*relative_damping must"):
        MetaPretrainer(**_trainer_args(), relative_damping=-0.1)
