r"""Bilevel problems whose hypergradient is known exactly.

Each factory returns a :class:`BilevelTestProblem` holding the inner and outer losses, the
hyperparameters, the inner optimum and the exact hypergradient computed *independently* of
the library's operators (closed forms, or dense ``torch.func.jacrev`` Hessian solves),
so tests can compare any method against it.  Everything is float64 by default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch.func import jacrev

Tensors = dict[str, torch.Tensor]


@dataclass
class BilevelTestProblem:
    """A bilevel problem with its inner optimum ``params`` and exact ``hypergrad``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> lam = torch.tensor([3.0], dtype=torch.float64)  # w* = lam, E = w*^2 / 2 = lam^2 / 2
        >>> problem = hg.testing.BilevelTestProblem(
        ...     inner_loss=lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum(),
        ...     outer_loss=lambda p, h: 0.5 * (p["w"] ** 2).sum(),
        ...     params={"w": lam.clone()}, hparams={"lam": lam}, hypergrad={"lam": lam.clone()},
        ...     solve_inner=lambda h: {"w": h["lam"].clone()})
        >>> bool(problem.outer_at_optimum({"lam": torch.tensor([2.0], dtype=torch.float64)}) == 2)
        True
        >>> g = hg.implicit_hypergrad(problem.inner_loss, problem.outer_loss, problem.params,
        ...     problem.hparams, solver="exact")
        >>> hg.testing.relative_error(g, problem.hypergrad) < 1e-12
        True
    """

    inner_loss: Callable[[Mapping, Mapping], torch.Tensor]
    outer_loss: Callable[[Mapping, Mapping], torch.Tensor]
    params: Tensors
    hparams: Tensors
    hypergrad: Tensors
    solve_inner: Callable[[Mapping], Tensors]
    data: dict = field(default_factory=dict)  # the problem's constants (X, y, A, ...)

    def outer_at_optimum(self, hparams: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``E(w*(lambda), lambda)``: the response function, for finite differences."""
        return self.outer_loss(self.solve_inner(hparams), hparams)


def relative_error(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over all entries of two dicts with the same keys.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> a = {"w": torch.tensor([3.0, 14.0]), "b": torch.tensor([0.0])}
        >>> b = {"w": torch.tensor([0.0, 10.0]), "b": torch.tensor([0.0])}
        >>> round(hg.testing.relative_error(a, b), 2)  # ||(3, 4, 0)|| / ||(0, 10, 0)||
        0.5
    """
    num = sum(float(torch.sum((a[k] - b[k]) ** 2)) for k in b)
    den = sum(float(torch.sum(b[k] ** 2)) for k in b)
    return (num / max(den, 1e-300)) ** 0.5


def finite_difference_hypergrad(
    response: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    hparams: Mapping[str, torch.Tensor],
    eps: float = 1e-6,
) -> Tensors:
    r"""Central differences ``(f(lambda + eps e_i) - f(lambda - eps e_i)) / (2 eps)``.

    ``response(hparams)`` must return the outer loss after solving (or running) the inner
    problem.  Cost: two calls per scalar hyperparameter; error O(eps^2) plus round-off
    O(machine_eps / eps): use float64 and eps ~ 1e-6.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> p = hg.testing.quadratic_problem(dim=4, num_hparams=2)
        >>> fd = hg.testing.finite_difference_hypergrad(p.outer_at_optimum, p.hparams)
        >>> fd["lam"].shape, hg.testing.relative_error(fd, p.hypergrad) < 1e-6
        (torch.Size([2]), True)
    """
    out: Tensors = {}
    with torch.no_grad():
        for k, v in hparams.items():
            g = torch.zeros_like(v).reshape(-1)
            for i in range(v.numel()):
                plus = {kk: vv.clone() for kk, vv in hparams.items()}
                minus = {kk: vv.clone() for kk, vv in hparams.items()}
                plus[k].reshape(-1)[i] += eps
                minus[k].reshape(-1)[i] -= eps
                g[i] = (response(plus) - response(minus)) / (2 * eps)
            out[k] = g.reshape(v.shape)
    return out


def _gen(seed: int) -> torch.Generator:
    # a CPU generator whatever the default device: the same numbers on every machine
    return torch.Generator(device="cpu").manual_seed(seed)


def _to(device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The problem's constants, drawn on the CPU, moved to ``device`` (None: left there)."""
    return tuple(tensors) if device is None else tuple(t.to(device) for t in tensors)


def ridge_problem(
    n_train: int = 60,
    n_val: int = 40,
    dim: int = 8,
    seed: int = 0,
    dtype=torch.float64,
    device: torch.device | str | None = None,
) -> BilevelTestProblem:
    r"""Ridge regression with one penalty per feature (log-parametrised).

    Inner: :math:`L(w,\lambda) = \frac{1}{2n}\|Xw-y\|^2 + \frac12\sum_j e^{\lambda_j} w_j^2`,
    so :math:`w^* = (X^\top X/n + D)^{-1} X^\top y / n` with :math:`D = \mathrm{diag}(e^\lambda)`.
    Outer: :math:`E(w) = \frac{1}{2m}\|X_v w - y_v\|^2`.
    Differentiating :math:`H w^* = X^\top y/n` gives :math:`\partial w^*/\partial\lambda_j =
    -H^{-1} e_j e^{\lambda_j} w^*_j`, hence the closed form
    :math:`dE/d\lambda_j = -e^{\lambda_j} w^*_j\,(H^{-1}\nabla_w E)_j`.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> p = hg.testing.ridge_problem(n_train=20, n_val=10, dim=3)
        >>> p.params["w"].shape, p.hparams["log_l2"].shape, p.data["X"].shape
        (torch.Size([3]), torch.Size([3]), torch.Size([20, 3]))
        >>> g = hg.implicit_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, "cg")
        >>> hg.testing.relative_error(g, p.hypergrad) < 1e-8
        True
    """
    g = _gen(seed)
    scales = torch.logspace(0, -1, dim, dtype=dtype, device="cpu")
    X = torch.randn(n_train, dim, generator=g, dtype=dtype, device="cpu") * scales
    w_true = torch.randn(dim, generator=g, dtype=dtype, device="cpu")
    y = X @ w_true + 0.3 * torch.randn(n_train, generator=g, dtype=dtype, device="cpu")
    Xv = torch.randn(n_val, dim, generator=g, dtype=dtype, device="cpu") * scales
    yv = Xv @ w_true + 0.3 * torch.randn(n_val, generator=g, dtype=dtype, device="cpu")
    log_l2 = torch.linspace(-3, 0, dim, dtype=dtype, device="cpu")
    X, y, Xv, yv, log_l2 = _to(device, X, y, Xv, yv, log_l2)

    def inner_loss(p, h):
        r = X @ p["w"] - y
        return 0.5 * (r @ r) / n_train + 0.5 * torch.sum(h["log_l2"].exp() * p["w"] ** 2)

    def outer_loss(p, h):
        r = Xv @ p["w"] - yv
        return 0.5 * (r @ r) / n_val

    def solve_inner(h):
        H = X.T @ X / n_train + torch.diag(h["log_l2"].exp())
        return {"w": torch.linalg.solve(H, X.T @ y / n_train)}

    hp = {"log_l2": log_l2}
    w = solve_inner(hp)["w"]
    H = X.T @ X / n_train + torch.diag(log_l2.exp())
    grad_val = Xv.T @ (Xv @ w - yv) / n_val
    exact = -log_l2.exp() * w * torch.linalg.solve(H, grad_val)
    data = {"X": X, "y": y, "X_val": Xv, "y_val": yv}
    return BilevelTestProblem(
        inner_loss, outer_loss, {"w": w}, hp, {"log_l2": exact}, solve_inner, data
    )


def quadratic_problem(
    dim: int = 6,
    num_hparams: int = 4,
    seed: int = 1,
    dtype=torch.float64,
    device: torch.device | str | None = None,
) -> BilevelTestProblem:
    r"""Quadratic bilevel problem with a non-symmetric (rectangular) cross term.

    Inner: :math:`L(w,\lambda) = \frac12 w^\top A w + w^\top B\lambda + c^\top w`, A SPD,
    B of shape (dim, num_hparams); :math:`w^* = -A^{-1}(B\lambda + c)`.
    Outer: :math:`E(w,\lambda) = \frac12\|w - t\|^2 + e^\top\lambda` (a direct term).
    Closed form: :math:`dE/d\lambda = -B^\top A^{-1}(w^* - t) + e`.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> p = hg.testing.quadratic_problem(dim=4, num_hparams=2)
        >>> p.params["w"].shape, p.hparams["lam"].shape, p.data["B"].shape
        (torch.Size([4]), torch.Size([2]), torch.Size([4, 2]))
        >>> g = hg.implicit_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, "cg")
        >>> hg.testing.relative_error(g, p.hypergrad) < 1e-8
        True
    """
    g = _gen(seed)
    Q = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=dtype, device="cpu"))[0]
    A = Q @ torch.diag(torch.linspace(0.5, 4.0, dim, dtype=dtype, device="cpu")) @ Q.T
    B = torch.randn(dim, num_hparams, generator=g, dtype=dtype, device="cpu")
    c = torch.randn(dim, generator=g, dtype=dtype, device="cpu")
    target = torch.randn(dim, generator=g, dtype=dtype, device="cpu")
    e = torch.randn(num_hparams, generator=g, dtype=dtype, device="cpu")
    lam = torch.randn(num_hparams, generator=g, dtype=dtype, device="cpu")
    A, B, c, target, e, lam = _to(device, A, B, c, target, e, lam)

    def inner_loss(p, h):
        w = p["w"]
        return 0.5 * w @ A @ w + w @ (B @ h["lam"]) + c @ w

    def outer_loss(p, h):
        return 0.5 * torch.sum((p["w"] - target) ** 2) + e @ h["lam"]

    def solve_inner(h):
        return {"w": -torch.linalg.solve(A, B @ h["lam"] + c)}

    hp = {"lam": lam}
    w = solve_inner(hp)["w"]
    exact = -B.T @ torch.linalg.solve(A, w - target) + e
    data = {"A": A, "B": B, "c": c, "target": target, "e": e}
    return BilevelTestProblem(
        inner_loss, outer_loss, {"w": w}, hp, {"lam": exact}, solve_inner, data
    )


def logistic_problem(
    n_train: int = 80,
    n_val: int = 60,
    dim: int = 5,
    classes: int = 3,
    seed: int = 2,
    dtype=torch.float64,
    newton_steps: int = 50,
    device: torch.device | str | None = None,
) -> BilevelTestProblem:
    r"""Multinomial logistic regression with one log-L2 penalty per weight.

    Inner: mean cross-entropy of softmax(X W + b) plus
    :math:`\frac12\sum_{ij} e^{\lambda_{ij}} W_{ij}^2 + 0.005\|b\|^2`; solved by Newton with
    the dense Hessian (``jacrev(jacrev(.))``) to machine precision.
    Exact hypergradient: with the flattened Hessian :math:`H` and mixed Jacobian
    :math:`M = \partial(\nabla_w L)/\partial\lambda` both formed densely,
    :math:`dE/d\lambda = -M^\top H^{-1}\nabla_w E` (no direct term).

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> p = hg.testing.logistic_problem(n_train=30, n_val=20, dim=3, classes=2)
        >>> p.params["W"].shape, p.params["b"].shape, p.hypergrad["log_l2"].shape
        (torch.Size([3, 2]), torch.Size([2]), torch.Size([3, 2]))
        >>> g = hg.implicit_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, "exact")
        >>> hg.testing.relative_error(g, p.hypergrad) < 1e-8
        True
    """
    g = _gen(seed)
    Wt = torch.randn(dim, classes, generator=g, dtype=dtype, device="cpu") * 2
    X = torch.randn(n_train, dim, generator=g, dtype=dtype, device="cpu")
    Xv = torch.randn(n_val, dim, generator=g, dtype=dtype, device="cpu")
    noise = torch.randn(n_train, classes, generator=g, dtype=dtype, device="cpu")
    y = torch.argmax(X @ Wt + noise, 1)
    yv = torch.argmax(
        Xv @ Wt + torch.randn(n_val, classes, generator=g, dtype=dtype, device="cpu"), 1
    )
    log_l2 = -2.0 + 0.5 * torch.randn(dim, classes, generator=g, dtype=dtype, device="cpu")
    X, y, Xv, yv, log_l2 = _to(device, X, y, Xv, yv, log_l2)
    shapes = {"W": (dim, classes), "b": (classes,)}
    sizes = [dim * classes, classes]

    def unflat(v):
        return {"W": v[: sizes[0]].reshape(shapes["W"]), "b": v[sizes[0] :]}

    def inner_loss(p, h):
        logits = X @ p["W"] + p["b"]
        ce = torch.nn.functional.cross_entropy(logits, y)
        # a fixed small penalty on the bias removes softmax's shift invariance (else H is
        # singular along b + c*1)
        return ce + 0.5 * torch.sum(h["log_l2"].exp() * p["W"] ** 2) + 5e-3 * p["b"] @ p["b"]

    def outer_loss(p, h):
        return torch.nn.functional.cross_entropy(Xv @ p["W"] + p["b"], yv)

    def solve_inner(h):
        v = torch.zeros(sum(sizes), dtype=dtype, device=X.device)
        f = lambda vv: inner_loss(unflat(vv), h)  # noqa: E731
        for _ in range(newton_steps):
            grad = jacrev(f)(v)
            if float(grad.norm()) < 1e-13:
                break
            v = v - torch.linalg.solve(jacrev(jacrev(f))(v), grad)
        return unflat(v)

    hp = {"log_l2": log_l2}
    w = solve_inner(hp)
    v = torch.cat([w["W"].reshape(-1), w["b"]])
    f_w = lambda vv, lam: inner_loss(unflat(vv), {"log_l2": lam})  # noqa: E731
    H = jacrev(jacrev(f_w, argnums=0), argnums=0)(v, log_l2)
    M = jacrev(jacrev(f_w, argnums=0), argnums=1)(v, log_l2).reshape(v.numel(), -1)
    gv = jacrev(lambda vv: outer_loss(unflat(vv), hp))(v)
    exact = -(M.T @ torch.linalg.solve(H, gv)).reshape(log_l2.shape)
    data = {"X": X, "y": y, "X_val": Xv, "y_val": yv}
    return BilevelTestProblem(inner_loss, outer_loss, w, hp, {"log_l2": exact}, solve_inner, data)
