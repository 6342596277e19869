"""Unrolled hypergradients (reverse, forward, truncated) against exact answers (float64)."""

import pytest
import torch

import hypergradient as hg
from hypergradient.testing import finite_difference_hypergrad, quadratic_problem, relative_error


def _quadratic_unrolled_exact(data, lam, w0, steps, lr, mom):
    """Closed-form recursion of the tangents Z = dw/dlambda through SGD with momentum.

    b' = mu b + A w + B lam + c,  w' = w - lr b'  =>  Zb' = mu Zb + A Zw + B,  Zw' = Zw - lr Zb'.
    dE/dlambda = Zw_T^T (w_T - t) + e.
    """
    A, B, c, t, e = data["A"], data["B"], data["c"], data["target"], data["e"]
    w, b = w0.clone(), torch.zeros_like(w0)
    Zw, Zb = torch.zeros(len(w0), len(lam)), torch.zeros(len(w0), len(lam))
    for _ in range(steps):
        b = mom * b + A @ w + B @ lam + c
        Zb = mom * Zb + A @ Zw + B
        w = w - lr * b
        Zw = Zw - lr * Zb
    return Zw.T @ (w - t) + e


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("mom", [0.0, 0.9])
def test_quadratic_closed_form(mode, mom):
    p = quadratic_problem()
    w0 = torch.linspace(-1, 1, 6)
    got = hg.unrolled_hypergrad(
        p.inner_loss, p.outer_loss, {"w": w0}, p.hparams, steps=25, lr=0.1, momentum=mom, mode=mode
    )
    exact = _quadratic_unrolled_exact(p.data, p.hparams["lam"], w0, 25, 0.1, mom)
    assert torch.allclose(got["lam"], exact, rtol=1e-10, atol=1e-12)


def _mlp_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 4, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    Xv = torch.randn(30, 4, generator=gen)
    yv = torch.randint(0, 3, (30,), generator=gen)
    params0 = {
        "w1": 0.5 * torch.randn(4, 6, generator=gen),
        "b1": torch.zeros(6),
        "w2": 0.5 * torch.randn(6, 3, generator=gen),
    }

    def net(p, x):
        return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    def inner(p, h):
        ce = torch.nn.functional.cross_entropy(net(p, X), y)
        return ce + 0.5 * (h["log_l2"].exp() * p["w1"] ** 2).sum()

    def outer(p, h):
        return torch.nn.functional.cross_entropy(net(p, Xv), yv)

    return inner, outer, params0


@pytest.mark.parametrize("truncate", [None, 3])
def test_reverse_equals_forward_equals_fd_with_lr_and_momentum_schedules(truncate):
    inner, outer, params0 = _mlp_problem()
    steps = 8
    hparams = {
        "log_l2": torch.full((4, 6), -2.0) + 0.1 * torch.arange(24.0).reshape(4, 6) / 24,
        "lr": torch.linspace(0.5, 0.2, steps),  # a per-step schedule
        "momentum": torch.tensor(0.7),
    }
    kwargs = dict(steps=steps, lr="lr", momentum="momentum", truncate=truncate)
    rev = hg.unrolled_hypergrad(inner, outer, params0, hparams, mode="reverse", **kwargs)
    fwd = hg.unrolled_hypergrad(inner, outer, params0, hparams, mode="forward", **kwargs)
    # forward and reverse compute the same derivative in a different order: ~1e-14 apart
    assert relative_error(fwd, rev) < 1e-10
    if truncate is None:

        def response(h):
            _, w = hg.unrolled_hypergrad(
                inner, outer, params0, h, mode="reverse", return_params=True, **kwargs
            )
            return outer(w, h)

        fd = finite_difference_hypergrad(response, hparams, eps=1e-6)
        # central differences: O(eps^2) truncation + O(1e-16/eps) round-off ~ 1e-10 relative
        assert relative_error(rev, fd) < 1e-7
    else:
        # truncated: the learning rates of the first steps-K steps get exactly zero
        assert torch.all(rev["lr"][: steps - truncate] == 0)
        assert torch.all(rev["lr"][steps - truncate :] != 0)


def test_truncation_equals_its_definition():
    # Definition: run T-K steps with everything detached, then differentiate through the
    # last K steps from there, treating (w_{T-K}, b_{T-K}) as constants.
    inner, outer, params0 = _mlp_problem(1)
    T, K, lr, mom = 10, 4, 0.3, 0.8
    hp = {"log_l2": torch.full((4, 6), -1.0)}
    got = hg.unrolled_hypergrad(inner, outer, params0, hp, steps=T, lr=lr, momentum=mom, truncate=K)

    w = {k: v.clone() for k, v in params0.items()}
    b = {k: torch.zeros_like(v) for k, v in w.items()}
    for _ in range(T - K):
        wr = {k: v.requires_grad_(True) for k, v in w.items()}
        g = torch.autograd.grad(inner(wr, hp), list(wr.values()))
        b = {k: mom * b[k] + gk for k, gk in zip(w, g)}
        w = {k: (wr[k] - lr * b[k]).detach() for k in w}
    lam = hp["log_l2"].clone().requires_grad_(True)
    w = {k: v.requires_grad_(True) for k, v in w.items()}
    for _ in range(K):
        g = torch.autograd.grad(inner(w, {"log_l2": lam}), list(w.values()), create_graph=True)
        b = {k: mom * b[k] + gk for k, gk in zip(w, g)}
        w = {k: w[k] - lr * b[k] for k in w}
    (ref,) = torch.autograd.grad(outer(w, {"log_l2": lam}), [lam])
    assert torch.allclose(got["log_l2"], ref, rtol=1e-12, atol=1e-14)
    # and truncation really is an approximation here: it differs from the full hypergradient
    full = hg.unrolled_hypergrad(inner, outer, params0, hp, steps=T, lr=lr, momentum=mom)
    assert relative_error(got, full) > 1e-3


def test_lr_as_callable_of_log_hparam():
    inner, outer, params0 = _mlp_problem(2)
    hp = {"log_l2": torch.full((4, 6), -1.0), "log_lr": torch.tensor(-1.0)}
    lr = lambda h, t: h["log_lr"].exp()  # noqa: E731
    rev = hg.unrolled_hypergrad(inner, outer, params0, hp, steps=5, lr=lr, mode="reverse")
    fwd = hg.unrolled_hypergrad(inner, outer, params0, hp, steps=5, lr=lr, mode="forward")
    assert relative_error(rev, fwd) < 1e-10


def test_unrolled_converges_to_implicit_on_strongly_convex_problem():
    # Franceschi 2018: as T grows the unrolled hypergradient tends to the implicit one.
    p = quadratic_problem()
    got = hg.unrolled_hypergrad(
        p.inner_loss, p.outer_loss, {"w": torch.zeros(6)}, p.hparams, steps=400, lr=0.2
    )
    assert relative_error(got, p.hypergrad) < 1e-8


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"steps": 0}, r"steps must be an int >= 1, got 0"),
        ({"mode": "sideways"}, r"mode='sideways'"),
        ({"truncate": 11}, r"truncate must be None or an int in \[1, steps=10\], got 11"),
        ({"lr": "eta"}, r"lr='eta' names a hyperparameter.*keys \['lam'\]"),
        ({"lr": torch.ones(3)}, r"lr tensor has shape \(3,\)"),
        ({"lr": [0.1]}, r"lr must be a float.*got list"),
        ({"momentum": True}, r"momentum=True; expected a number"),
    ],
)
def test_error_bad_options(kwargs, pattern):
    p = quadratic_problem()
    args = dict(steps=10, lr=0.1)
    args.update(kwargs)
    with pytest.raises(hg.HypergradientError, match=pattern):
        hg.unrolled_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, **args)


def test_error_schedule_length():
    p = quadratic_problem()
    hp = dict(p.hparams, lr=torch.ones(4))
    with pytest.raises(hg.HypergradientError, match=r"hparams\['lr'\].*shape \(4,\).*\(10,\)"):
        hg.unrolled_hypergrad(p.inner_loss, p.outer_loss, p.params, hp, steps=10, lr="lr")


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_error_unused_hparam(mode):
    p = quadratic_problem()
    hp = dict(p.hparams, junk=torch.ones(2))
    with pytest.raises(hg.HypergradientError, match=r"\['junk'\].*silently zero"):
        hg.unrolled_hypergrad(p.inner_loss, p.outer_loss, p.params, hp, steps=3, lr=0.1, mode=mode)


def test_error_loss_dtype():
    p = quadratic_problem()
    with pytest.raises(hg.HypergradientError, match=r"inner_loss.*dtype torch.float32"):
        hg.unrolled_hypergrad(
            lambda w, h: p.inner_loss(w, h).float(),
            p.outer_loss,
            p.params,
            p.hparams,
            steps=3,
            lr=0.1,
        )


def test_error_forward_mode_with_many_hyperparameters():
    # 20,000 scalar hyperparameters: forward mode's identity basis would be 20,000 x 20,000
    # float64 values (3 GiB).  Refused up front, before the losses are evaluated once.
    def never(p, h):
        raise AssertionError("forward mode evaluated a loss before refusing")

    hp = {"log_l2": torch.zeros(20_000)}
    with pytest.raises(
        hg.HypergradientError,
        match=r"mode='forward' runs one JVP per scalar hyperparameter from an identity basis "
        r"of their number: 20,000 hyperparameters need a 20,000 x 20,000 float64 basis of "
        r"2\.98 GiB \(limit 1 GiB\) and 20,000 JVP passes\. Use mode='reverse' \(or "
        r"'reversible'\) for many hyperparameters",
    ):
        hg.unrolled_hypergrad(
            never, never, {"w": torch.zeros(20_000)}, hp, steps=5, lr=0.1, mode="forward"
        )


def test_every_mode_returns_the_hypergradient_in_the_problem_dtype():
    # vmap over jvp returned float64 tangents for a float32 problem (found by a docstring
    # example): each mode must hand back the dtype it was given, with the same values
    inner = lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum()  # noqa: E731
    outer = lambda p, h: 0.5 * (p["w"] ** 2).sum()  # noqa: E731
    params = {"w": torch.zeros(2, dtype=torch.float32)}
    hparams = {"lam": torch.tensor([1.0, 2.0], dtype=torch.float32)}
    grads = {
        mode: hg.unrolled_hypergrad(inner, outer, params, hparams, steps=3, lr=0.5, mode=mode)
        for mode in ("reverse", "forward")
    }
    for g in grads.values():
        assert g["lam"].dtype == torch.float32
    # w_3 = (1 - 0.5^3) lam = 0.875 lam, so dE/dlam = 0.875^2 lam
    expected = 0.875**2 * hparams["lam"]
    for g in grads.values():
        torch.testing.assert_close(g["lam"], expected, rtol=1e-6, atol=1e-7)
