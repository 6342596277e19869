"""``BilevelTrainer`` with exact reversible learning over fresh mini-batches
(``hg.Unrolled(steps=K, mode="reversible", fresh_batches=True)``; Maclaurin et al. 2015):
the trainer draws K training batches per hyper-step and the reversed hypergradient equals
reverse mode over the same K batches and central differences (float64); a fit checkpoints
and resumes bit for bit; bad input is refused in one line."""

import math

import pytest
import torch
from torch import nn

import hypergradient as hg
from hypergradient.hypergrad import AbstractHypergradientMethod
from hypergradient.testing import finite_difference_hypergrad, relative_error
from hypergradient.train import BatchStream

F64 = torch.float64
K = 4  # look-ahead steps, one fresh training batch each
LR, MOMENTUM = 0.3, 0.9


def _loader(dtype=F64):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (40,), generator=gen)
    return torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8, shuffle=True)


def _trainer(method, dtype=F64, optimizer=None, **options):
    loader = _loader(dtype)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    optimizer = optimizer or (lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM))
    return hg.BilevelTrainer(
        model, hg.hparams.WeightDecay("per_tensor", initial=1e-2), loader, loader,
        optimizer(model.parameters()), method=method, hyper_every=2, seed=3, **options,
    )  # fmt: skip


class _Recorded(AbstractHypergradientMethod):
    """Delegates to ``method`` and keeps what the trainer passed it."""

    name = "recorded"

    def __init__(self, method):
        self.method, self.calls = method, []

    @property
    def train_batches(self):
        return self.method.train_batches

    def hypergrad(self, inner_loss, outer_loss, params, hparams, *, lr, momentum=0.0, **extra):
        self.calls.append((inner_loss, outer_loss, params, hparams, lr, momentum, extra))
        return self.method.hypergrad(
            inner_loss, outer_loss, params, hparams, lr=lr, momentum=momentum, **extra
        )


def _hypergradient(trainer):
    trainer.inner_steps(3)  # away from the initial weights, momentum buffer in the optimizer
    with trainer._hypergradient_rng():
        return trainer.hypergradient()[0]


def test_reversible_equals_reverse_mode_and_differences_over_the_same_fresh_minibatches():
    recorded = _Recorded(hg.Unrolled(steps=K, mode="reversible", fresh_batches=True))
    reversible = _hypergradient(_trainer(recorded))
    reverse = _hypergradient(_trainer(hg.Unrolled(steps=K, mode="reverse", fresh_batches=True)))
    assert relative_error(reversible, reverse) < 1e-8

    # the trainer passed K fresh batches of its hypergradient stream, and the optimizer's lr
    ((inner_loss, outer_loss, params, hparams, lr, momentum, extra),) = recorded.calls
    stream = BatchStream(_loader(), seed=3 + 2)
    for t in range(K):
        expected = stream.next()
        assert all(torch.equal(a, b) for a, b in zip(extra["batches"](t), expected))
    assert (lr, momentum) == (LR, MOMENTUM)

    def response(h):  # E(w_K(h)): the K mini-batch SGD steps, run plainly
        w = {k: v.clone() for k, v in params.items()}
        b = {k: torch.zeros_like(v) for k, v in w.items()}
        for t in range(K):
            leaves = {k: v.requires_grad_(True) for k, v in w.items()}
            with torch.enable_grad():
                loss = inner_loss(leaves, h, extra["batches"](t))
                g = torch.autograd.grad(loss, list(leaves.values()))
            b = {k: MOMENTUM * b[k] + gk for k, gk in zip(w, g)}
            w = {k: w[k].detach() - LR * b[k] for k in w}
        return outer_loss(w, h)

    fd = finite_difference_hypergrad(response, hparams, eps=1e-5)
    assert relative_error(reversible, fd) < 1e-7
    # the batches matter: one batch for every look-ahead step is another hypergradient
    one_batch = _hypergradient(_trainer(hg.Unrolled(steps=K, mode="reversible")))
    assert relative_error(one_batch, reversible) > 1e-3


def test_unrolled_batches_agree_across_modes_on_a_closed_form():
    # L_t = (w - lam - x_t)^2 / 2, plain SGD from w0 = 0 with lr a: w_{t+1} = (1 - a) w_t +
    # a (lam + x_t), so w_T = (1 - (1 - a)^T) lam + sum_t a (1 - a)^(T-1-t) x_t; E = w_T
    x = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    a, steps = 0.5, 3

    def inner(p, h, t):
        return 0.5 * ((p["w"] - h["lam"] - x[t]) ** 2).sum()

    def outer(p, h):
        return p["w"].sum()

    w0, lam = {"w": torch.zeros(1, dtype=F64)}, {"lam": torch.zeros(1, dtype=F64)}
    for mode in ("reverse", "forward", "reversible"):
        g, w_t = hg.unrolled_hypergrad(
            inner, outer, w0, lam, steps=steps, lr=a, mode=mode, batches=lambda t: t,
            return_params=True, **({"momentum": 0.5} if mode == "reversible" else {}),
        )  # fmt: skip
        if mode != "reversible":  # the closed form above is for plain SGD
            assert float(g["lam"]) == pytest.approx(1 - (1 - a) ** steps, rel=1e-12)
            exact_w = sum(a * (1 - a) ** (steps - 1 - t) * float(x[t]) for t in range(steps))
            assert float(w_t["w"]) == pytest.approx(exact_w, rel=1e-12)
    reverse = hg.unrolled_hypergrad(
        inner, outer, w0, lam, steps=steps, lr=a, momentum=0.5, batches=lambda t: t
    )
    assert relative_error(g, reverse) < 1e-12


def test_a_fit_with_the_reversible_method_checkpoints_and_resumes_bit_for_bit(tmp_path):
    def method():
        return hg.Unrolled(steps=3, mode="reversible", fresh_batches=True)

    whole = _trainer(method(), dtype=torch.float32)
    whole.fit(4)
    checkpoint = tmp_path / "ck.pt"
    _trainer(method(), dtype=torch.float32).fit(2, checkpoint=checkpoint)
    resumed = _trainer(method(), dtype=torch.float32)
    resumed.fit(4, checkpoint=checkpoint, resume=True)
    for k in whole.hparams:
        assert torch.equal(whole.hparams[k], resumed.hparams[k])
    assert [r["hypergrad_norm"] for r in whole.history] == [
        r["hypergrad_norm"] for r in resumed.history
    ]
    norms = [r["hypergrad_norm"] for r in whole.history]
    assert all(math.isfinite(n) and n > 0 for n in norms)
    # what the reversal kept is logged: over log2(1 / 0.9) = 0.152 bits per weight and step
    # (plus a one-off per weight, large over 3 steps), far below the 64 bits of a float32
    # weight and velocity that a stored trajectory takes
    bits = [r["reversible_bits_per_weight_step"] for r in whole.history]
    assert all(0.152 < b < 2 for b in bits), bits
    assert all(r["reversible_buffer_bytes"] > 0 for r in whole.history)
    # kept batches (hypergrad_resample_every > 1) go through the checkpoint as well
    again = _trainer(method(), dtype=torch.float32, hypergrad_resample_every=2)
    again.fit(1, checkpoint=checkpoint)
    restored = _trainer(method(), dtype=torch.float32, hypergrad_resample_every=2)
    restored.load_checkpoint(checkpoint)
    assert len(restored._hypergrad_batches[0]) == 3


@pytest.mark.parametrize(
    ("optimizer", "pattern"),
    [
        (lambda p: torch.optim.Adam(p, lr=1e-2), r"reverses torch\.optim\.SGD steps.*not Adam"),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
            r"sets \{'nesterov': True\}.*dampening 0, weight_decay 0, no Nesterov",
        ),
        (
            lambda p: torch.optim.SGD(
                [{"params": list(p)[:2]}, {"params": [], "lr": 0.5}], lr=0.1, momentum=0.9
            ),
            r"different \(lr, momentum\).*Use one param group",
        ),
    ],
)
def test_error_an_inner_optimizer_it_cannot_reverse(optimizer, pattern):
    method = hg.Unrolled(steps=2, mode="reversible")
    with pytest.raises(hg.HypergradientError, match=pattern):
        _trainer(method, optimizer=optimizer)
    _trainer(hg.Unrolled(steps=2), optimizer=optimizer)  # other modes keep accepting them


def test_error_nan_hyperparameter():
    trainer = _trainer(hg.Unrolled(steps=2, mode="reversible", fresh_batches=True))
    with torch.no_grad():
        trainer.hparams["log_wd.0.weight"].fill_(math.nan)
    with pytest.raises(hg.HypergradientError, match=r"(?i)nan"):
        trainer.hypergradient()


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: hg.Unrolled(mode="exact"), r"expected 'reverse', 'forward' or 'reversible'"),
        (lambda: hg.Unrolled(fresh_batches="yes"), r"fresh_batches='yes'.*expected True"),
        (lambda: hg.Unrolled(steps=True), r"steps=True.*int >= 1"),
        (
            lambda: hg.unrolled_hypergrad(
                lambda p, h: (p["w"] ** 2).sum(),
                lambda p, h: (p["w"] * h["a"]).sum(),
                {"w": torch.ones(1, dtype=F64)},
                {"a": torch.ones(1, dtype=F64)},
                steps=2,
                lr=0.1,
                batches=lambda t: t,
            ),  # fmt: skip
            r"inner_loss\(params, hparams, batch\).*Add the batch argument",
        ),
        (
            lambda: hg.unrolled_hypergrad(
                lambda p, h, b: (p["w"] ** 2).sum(),
                lambda p, h: (p["w"] * h["a"]).sum(),
                {"w": torch.ones(1, dtype=F64)},
                {"a": torch.ones(1, dtype=F64)},
                steps=2,
                lr=0.1,
                batches=[0, 1],
            ),  # fmt: skip
            r"batches must be a callable t -> batch.*got list",
        ),
    ],
)
def test_error_bad_input(make, pattern):
    with pytest.raises(hg.HypergradientError, match=pattern):
        make()


def test_measuring_a_fresh_batch_method_is_refused_not_silently_given_one_batch():
    from hypergradient.hypergrad.methods import MeasuredMethod

    fresh = hg.Unrolled(steps=3, mode="reversible", fresh_batches=True)
    with pytest.raises(hg.HypergradientError, match=r"3 fresh batches per hypergradient"):
        MeasuredMethod(fresh)
    with pytest.raises(hg.HypergradientError, match=r"compare_with|fresh_batches=False"):
        MeasuredMethod(hg.Implicit(), compare_with={"rev": fresh})
    MeasuredMethod(hg.Unrolled(steps=3, mode="reversible"))  # one batch: accepted
