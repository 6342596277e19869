r"""Hidden units of a sum of sigmoids, identified by clustering its gradients.

The model is a one-hidden-layer sigmoid network queried as a black box,

.. math::
    f(x) = c + \sum_{j=1}^{k} a_j\,\sigma(w_j^\top x + b_j), \qquad
    \nabla f(x) = \sum_{j=1}^{k} \underbrace{\sigma'(w_j^\top x + b_j)}_{> 0}\; a_j w_j .

Two facts make the units identifiable from gradients (Ioannidis & Montanari 2017,
"Learning Combinations of Sigmoids Through Gradient Estimation": estimate the gradient at
random points, cluster the estimates, read the hidden units' parameters off the clusters):

1. Every gradient lies in :math:`\operatorname{span}\{w_j\}`, so the gradient matrix
   :math:`G \in \mathbb{R}^{n \times d}` has rank :math:`k` (for :math:`k < d` independent
   :math:`w_j`): its singular values count the units and its top right singular vectors give
   the span (Fornasier, Schnass & Vybíral 2012 recover the span this way)
   (:func:`count_units`).
2. A gradient is a *non-negative* combination of the :math:`k` vectors :math:`a_j w_j`.  Where
   one unit is in its transition region (:math:`|w_j^\top x + b_j| \lesssim 2.5`) and the
   others saturated, :math:`\nabla f(x) \approx a_j \sigma'(\cdot)\, w_j`: the normalised
   gradients pile up at the :math:`k` directions :math:`\pm w_j/\lVert w_j\rVert`, with
   mixtures of two units strung along the arcs between them.  The steeper the units
   (larger :math:`\lVert w_j\rVert` relative to the spread of :math:`x`), the thinner the
   transition slabs and the fewer the mixtures.

:func:`cluster_directions` clusters the normalised gradients on the sphere (spherical
k-means, k-means++ seeding, restarts) and then moves every centre to the nearest peak of
their density (mean shift in shrinking cones :math:`u^\top c > \tau`): k-means centres are
means, pulled towards the mixtures; the peaks are the pure directions.  The sign of a
direction is that of :math:`a_j w_j`, so no sign folding is needed; a direction is only
identifiable up to sign (:math:`a\sigma(t) = a - a\sigma(-t)`: the constant goes into
:math:`c`).  :func:`initial_units` then reads every unit's steepness
:math:`\beta_j = \lVert w_j\rVert`, bias and amplitude off the 1-D profile of its cluster
(gradient component along the centre against the position along it, which is
:math:`a\beta\sigma'(\beta s + b)`), and :func:`fit` polishes all parameters by L-BFGS on the
queried values.

Cost: ``n`` gradient estimates by central differences take :math:`2nd` queries; the SVD
:math:`O(nd^2)`; each k-means or mean-shift iteration :math:`O(nkd)`.

Examples:
    Two steep units in 4-D, found from gradients queried at 200 random points:

    >>> import torch
    >>> from hypergradient import sigmoid_units as su
    >>> _ = torch.manual_seed(0)
    >>> f64 = {"dtype": torch.float64}
    >>> w = 4.0 * torch.eye(2, 4, **f64)  # unit directions e_1 and e_2
    >>> f = su.SumOfSigmoids(w, torch.zeros(2, **f64), torch.tensor([1.0, -1.0], **f64))
    >>> x = torch.randn(200, 4, **f64)
    >>> with torch.no_grad():
    ...     grads, _, _ = su.finite_difference_gradients(f, x, 1e-4)
    >>> k = su.count_units(grads)[0]
    >>> clusters = su.cluster_directions(grads, k, generator=torch.Generator().manual_seed(0))
    >>> k, bool((su.match_directions(clusters.centers, w) > 0.95).all())
    (2, True)

References:
    Ioannidis & Montanari, "Learning Combinations of Sigmoids Through Gradient Estimation",
    arXiv:1708.06678, 2017.
    Fornasier, Schnass & Vybíral, "Learning Functions of Few Arbitrary Linear Parameters in
    High Dimensions", Foundations of Computational Mathematics 12, 2012.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._errors import HypergradientError

__all__ = [
    "Clusters",
    "SumOfSigmoids",
    "cluster_directions",
    "count_units",
    "finite_difference_gradients",
    "fit",
    "initial_units",
    "match_directions",
]


class SumOfSigmoids(nn.Module):
    r""":math:`f(x) = c + \sum_j a_j \sigma(w_j^\top x + b_j)`: ``weight`` ``(k, d)``, ``bias``
    ``(k,)``, ``amplitude`` ``(k,)``, ``offset`` (scalar :math:`c`); input ``(n, d)``, output
    ``(n,)``.

    Examples:
        >>> net = SumOfSigmoids(torch.eye(2), torch.zeros(2), torch.tensor([1.0, -2.0]))
        >>> net(torch.zeros(1, 2))  # 1 * 0.5 - 2 * 0.5
        tensor([-0.5000], grad_fn=<AddBackward0>)
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        amplitude: torch.Tensor,
        offset: float | torch.Tensor = 0.0,
    ) -> None:
        super().__init__()
        k = weight.shape[0] if weight.dim() == 2 else -1
        if weight.dim() != 2 or bias.shape != (k,) or amplitude.shape != (k,):
            raise HypergradientError(
                f"SumOfSigmoids(...): expected weight (k, d), bias (k,), amplitude (k,), got "
                f"{tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(amplitude.shape)}."
            )
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.amplitude = nn.Parameter(amplitude.detach().clone())
        self.offset = nn.Parameter(torch.as_tensor(offset, dtype=weight.dtype).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x @ self.weight.T + self.bias) @ self.amplitude + self.offset


def finite_difference_gradients(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, step: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Central differences :math:`\hat g_i = (f(x_i + h e_l) - f(x_i - h e_l))/(2h)` of a
    black box ``f`` (``(m, d) -> (m,)``, possibly noisy) at the rows of ``x`` ``(n, d)``.

    Returns ``(grads (n, d), queries (2nd, d), values (2nd,))``: the gradient estimates and
    every point queried with its answer (reusable as regression data).  Error: :math:`O(h^2
    \lVert f'''\rVert)` plus :math:`\sigma/(\sqrt2 h)` per coordinate for query noise of
    standard deviation :math:`\sigma`.

    Examples:
        >>> g, q, v = finite_difference_gradients(lambda z: (z**2).sum(1), torch.ones(1, 2), 0.1)
        >>> torch.allclose(g, torch.full((1, 2), 2.0)), q.shape
        (True, torch.Size([4, 2]))
    """
    where = "sigmoid_units.finite_difference_gradients(...)"
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise HypergradientError(f"{where}: `x` must be an (n, d) tensor, got {_shape(x)}.")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
        raise HypergradientError(f"{where}: `step` must be a number > 0, got {step!r}.")
    n, d = x.shape
    shifts = step * torch.eye(d, dtype=x.dtype, device=x.device)
    plus = (x[:, None, :] + shifts).reshape(n * d, d)
    minus = (x[:, None, :] - shifts).reshape(n * d, d)
    queries = torch.cat([plus, minus])
    values = f(queries)
    if not isinstance(values, torch.Tensor) or values.shape != (2 * n * d,):
        raise HypergradientError(
            f"{where}: `f` must map (m, d) points to (m,) values; for m = {2 * n * d} it "
            f"returned {_shape(values)}."
        )
    grads = ((values[: n * d] - values[n * d :]) / (2 * step)).reshape(n, d)
    return grads, queries, values


def count_units(
    grads: torch.Tensor, *, floor_ratio: float = 2.0, rtol: float = 1e-3
) -> tuple[int, torch.Tensor]:
    r"""The number of units as the numerical rank of the gradient matrix ``grads`` ``(n, d)``:
    the singular values above both ``floor_ratio`` times the smallest one (the noise floor:
    query noise spreads evenly over all ``d`` directions, the units only over ``k``) and
    ``rtol`` times the largest (the floor of noiseless queries is round-off and the
    :math:`O(h^2)` truncation of finite differences, which is not isotropic: about
    :math:`10^{-5}` of the largest in float32, :math:`10^{-8}` in float64).

    Needs ``k < d`` (the smallest singular value must be noise) and ``n`` well above ``d``
    (noise singular values spread by about :math:`1 \pm \sqrt{d/n}`, well inside
    ``floor_ratio = 2`` for ``n >= 10 d``).  Returns ``(k, singular_values)``.

    Examples:
        >>> g = torch.randn(50, 2) @ torch.randn(2, 6)  # rank 2
        >>> count_units(g)[0]
        2
    """
    where = "sigmoid_units.count_units(...)"
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or min(grads.shape) < 2:
        raise HypergradientError(
            f"{where}: `grads` must be an (n, d) tensor with n, d >= 2, got {_shape(grads)}."
        )
    if (
        isinstance(floor_ratio, bool)
        or not isinstance(floor_ratio, (int, float))
        or not (floor_ratio > 1)
    ):
        raise HypergradientError(f"{where}: `floor_ratio` must be > 1, got {floor_ratio!r}.")
    values = torch.linalg.svdvals(grads)
    threshold = max(floor_ratio * float(values[-1]), rtol * float(values[0]))
    return max(1, int((values > threshold).sum())), values


@dataclass(frozen=True)
class Clusters:
    """Result of :func:`cluster_directions`: unit ``centers`` ``(k, d)`` (the peaks),
    ``kmeans_centers`` ``(k, d)`` (before the mean shift), ``assignment`` ``(n,)`` (nearest
    centre of every gradient) and ``purity`` ``(n,)`` (cosine to it).

    Examples:
        >>> import torch
        >>> from hypergradient import sigmoid_units as su
        >>> grads = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 1.0]])
        >>> c = su.cluster_directions(grads, 2, generator=torch.Generator().manual_seed(0))
        >>> c.centers.shape, c.kmeans_centers.shape, c.assignment.shape, c.purity.shape
        (torch.Size([2, 2]), torch.Size([2, 2]), torch.Size([5]), torch.Size([5]))
        >>> [round(p, 2) for p in c.purity.tolist()]  # the last gradient mixes both units
        [1.0, 1.0, 1.0, 1.0, 0.71]
    """

    centers: torch.Tensor
    kmeans_centers: torch.Tensor
    assignment: torch.Tensor
    purity: torch.Tensor


def cluster_directions(
    grads: torch.Tensor,
    k: int,
    *,
    restarts: int = 10,
    cones: Sequence[float] = (0.95, 0.99, 0.995),
    iterations: int = 100,
    generator: torch.Generator | None = None,
) -> Clusters:
    r"""Directions of the ``k`` hidden units from gradient estimates ``grads`` ``(n, d)``.

    1. Project the gradients onto their top-``k`` right singular vectors (drops the noise
       outside the span) and normalise them: :math:`u_i = P g_i / \lVert P g_i\rVert`.
    2. Spherical k-means: assign :math:`u_i` to :math:`\arg\max_j u_i^\top c_j`, set
       :math:`c_j \propto \sum_{i \to j} u_i`; k-means++ seeding; the best of ``restarts``
       by :math:`\sum_i \max_j u_i^\top c_j`.
    3. Mean shift to the density peaks: for every :math:`\tau` in ``cones``, ``iterations``
       times :math:`c_j \propto \sum_{i:\,u_i^\top c_j > \tau} u_i` (a centre with no
       point in its cone stays).

    Returns :class:`Clusters`.  Cost: ``O(restarts * iterations * n k d)``.

    Examples:
        Pure gradients along two units' directions and one mixture of both: the mean shift
        moves the centres from the k-means means to the pure directions.

        >>> import torch
        >>> from hypergradient import sigmoid_units as su
        >>> e1, e2 = torch.eye(3)[:2]
        >>> grads = torch.stack([e1, 2 * e1, 3 * e1, e2, 2 * e2, 0.5 * e2, e1 + 0.5 * e2])
        >>> clusters = su.cluster_directions(grads, 2, generator=torch.Generator().manual_seed(0))
        >>> true = torch.stack([e1, e2])
        >>> bool((su.match_directions(clusters.centers, true) > 0.999).all())
        True
        >>> bool((su.match_directions(clusters.kmeans_centers, true) > 0.999).all())
        False
    """
    where = "sigmoid_units.cluster_directions(...)"
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2:
        raise HypergradientError(f"{where}: `grads` must be an (n, d) tensor, got {_shape(grads)}.")
    n, d = grads.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(n, d):
        raise HypergradientError(
            f"{where}: `k` must be an integer in [1, min(n, d)] = [1, {min(n, d)}], got {k!r}."
        )
    if not all(0 < float(t) < 1 for t in cones):
        raise HypergradientError(f"{where}: `cones` must be cosines in (0, 1), got {cones!r}.")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise HypergradientError(f"{where}: `restarts` must be an integer >= 1, got {restarts!r}.")
    _, _, vh = torch.linalg.svd(grads, full_matrices=False)
    projected = grads @ vh[:k].T @ vh[:k]
    norms = projected.norm(dim=1)
    keep = norms > norms.max() * 1e-12  # exactly flat points carry no direction
    if int(keep.sum()) < k:
        raise HypergradientError(
            f"{where}: fewer than k = {k} gradients are non-zero; query points where the "
            f"function varies (the units' transition regions)."
        )
    u = projected[keep] / norms[keep, None]

    best, best_score = None, -float("inf")
    for _ in range(restarts):
        centers = _kmeans_pp(u, k, generator)
        for _ in range(iterations):
            assign = (u @ centers.T).argmax(1)
            sums = torch.zeros_like(centers).index_add_(0, assign, u)
            new = torch.where(
                sums.norm(dim=1, keepdim=True) > 0, _normalize(sums), centers
            )  # an emptied cluster keeps its centre
            converged = torch.allclose(new, centers, rtol=0, atol=1e-12)
            centers = new
            if converged:
                break
        score = float((u @ centers.T).max(1).values.sum())
        if score > best_score:
            best, best_score = centers, score
    kmeans_centers = best
    centers = best.clone()
    for tau in cones:
        for _ in range(iterations):
            inside = ((u @ centers.T) > float(tau)).to(u.dtype)
            sums = inside.T @ u
            new = torch.where(inside.sum(0)[:, None] > 0, _normalize(sums), centers)
            converged = torch.allclose(new, centers, rtol=0, atol=1e-12)
            centers = new
            if converged:
                break
    all_u = projected / norms.clamp_min(torch.finfo(grads.dtype).tiny)[:, None]
    sims = all_u @ centers.T
    purity, assignment = sims.max(1)
    return Clusters(centers, kmeans_centers, assignment, purity)


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _kmeans_pp(u: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding on the sphere: distance ``1 - u.c`` to the nearest chosen centre."""
    first = int(torch.randint(len(u), (1,), generator=generator, device=u.device))
    chosen = [first]
    for _ in range(1, k):
        dist = (1 - (u @ u[chosen].T).max(1).values).clamp_min(0)
        weights = dist if float(dist.sum()) > 0 else torch.ones_like(dist)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
    return u[chosen].clone()


def initial_units(
    x: torch.Tensor, grads: torch.Tensor, clusters: Clusters, *, min_purity: float = 0.95
) -> SumOfSigmoids:
    r"""A :class:`SumOfSigmoids` whose unit ``j`` has direction ``clusters.centers[j]`` and
    steepness, bias and amplitude fitted to that cluster's 1-D profile.

    Along a centre :math:`c`, the gradients of the points whose one active unit is :math:`j`
    (``purity >= min_purity``) satisfy :math:`c^\top \nabla f(x) \approx \alpha\beta\,
    \sigma'(\beta\, c^\top x + \gamma)` with :math:`\alpha, \beta > 0`: a bell curve in
    :math:`s = c^\top x`.  Moments give a start (peak at the :math:`m`-weighted mean of
    :math:`s`; the bell :math:`\sigma'` has standard deviation :math:`\pi/(\sqrt3\beta)`; its
    height is :math:`\alpha\beta/4`) and L-BFGS on :math:`(\log\alpha, \log\beta, \gamma)`
    the fit.  The unit is :math:`\alpha\sigma(\beta c^\top x + \gamma)`; the offset is the
    mean residual left for :func:`fit` (0 here).  ``x`` ``(n, d)`` are the points of
    ``grads`` ``(n, d)``.

    Examples:
        One unit :math:`2\,\sigma(3 x_1 + 0.5)`, read off its gradients:

        >>> import torch
        >>> from hypergradient import sigmoid_units as su
        >>> f64 = {"dtype": torch.float64}
        >>> f = su.SumOfSigmoids(torch.tensor([[3.0, 0.0]], **f64), torch.tensor([0.5], **f64),
        ...                      torch.tensor([2.0], **f64))
        >>> x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), **f64)
        >>> with torch.no_grad():
        ...     grads, _, _ = su.finite_difference_gradients(f, x, 1e-4)
        >>> model = su.initial_units(x, grads, su.cluster_directions(grads, 1))
        >>> steepness, bias, amplitude = model.weight[0, 0], model.bias[0], model.amplitude[0]
        >>> [round(v.item(), 2) for v in (steepness, bias, amplitude)]
        [3.0, 0.5, 2.0]
    """
    where = "sigmoid_units.initial_units(...)"
    if x.shape != grads.shape or len(clusters.assignment) != len(x):
        raise HypergradientError(
            f"{where}: expected x and grads of one shape (n, d) matching the clusters' "
            f"{len(clusters.assignment)} points, got {tuple(x.shape)} and {tuple(grads.shape)}."
        )
    k = clusters.centers.shape[0]
    betas, gammas, alphas = [], [], []
    for j in range(k):
        c = clusters.centers[j]
        members = (clusters.assignment == j) & (clusters.purity >= min_purity)
        if int(members.sum()) < 3:  # too few pure points: the k-means cluster instead
            members = clusters.assignment == j
        s, m = x[members] @ c, (grads[members] @ c).clamp_min(0)
        if float(m.sum()) <= 0 or len(s) < 3:
            raise HypergradientError(
                f"{where}: unit {j} has fewer than 3 points with a positive slope along its "
                f"direction; query more points or lower `min_purity` (now {min_purity})."
            )
        weights = m / m.sum()
        peak = float((weights * s).sum())
        spread = float((weights * (s - peak) ** 2).sum().sqrt())
        beta = 1.8138 / max(spread, 1e-6)  # pi / sqrt(3): the std of the density sigma'
        alpha = 4.0 * float(m.max()) / beta
        log_a, log_b, gamma = _fit_bell(s, m, alpha, beta, -beta * peak)
        alphas.append(log_a.exp())
        betas.append(log_b.exp())
        gammas.append(gamma)
    beta_t = torch.stack(betas)
    return SumOfSigmoids(
        clusters.centers * beta_t[:, None], torch.stack(gammas), torch.stack(alphas), 0.0
    )


def _fit_bell(
    s: torch.Tensor, m: torch.Tensor, alpha: float, beta: float, gamma: float
) -> torch.Tensor:
    """L-BFGS fit of ``m ~ alpha * beta * sigma'(beta * s + gamma)`` (``alpha, beta > 0``)
    from the given start; returns ``(log alpha, log beta, gamma)``."""
    params = torch.tensor(
        [math.log(alpha), math.log(beta), gamma], dtype=s.dtype, requires_grad=True
    )
    optimizer = torch.optim.LBFGS(
        [params],
        max_iter=500,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
    )

    def closure():
        optimizer.zero_grad()
        t = params[1].exp() * s + params[2]
        bell = torch.sigmoid(t) * torch.sigmoid(-t)
        loss = ((params[0].exp() * params[1].exp() * bell - m) ** 2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return params.detach()


def fit(
    model: SumOfSigmoids,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_iter: int = 500,
    fit_offset_first: bool = True,
) -> list[float]:
    """Least squares :math:`\\frac1n\\sum_i (f(x_i) - y_i)^2` over all of ``model``'s
    parameters by full-batch L-BFGS (strong Wolfe), in place; ``x`` ``(n, d)``, ``y``
    ``(n,)``.  ``fit_offset_first``: start the offset at the mean residual.  Returns the loss
    after every L-BFGS ``step`` of 20 iterations (the trace).

    Examples:
        >>> import torch
        >>> from hypergradient import sigmoid_units as su
        >>> f64 = {"dtype": torch.float64}
        >>> x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), **f64)
        >>> y = 2.0 * torch.sigmoid(3.0 * x[:, 0] + 0.5) - 1.0  # one unit plus an offset
        >>> model = su.SumOfSigmoids(torch.tensor([[2.0, 0.5]], **f64), torch.zeros(1, **f64),
        ...                          torch.ones(1, **f64))  # a rough start
        >>> trace = su.fit(model, x, y)  # the loss after every 20 L-BFGS iterations
        >>> trace[-1] < 1e-10
        True
        >>> [round(v, 2) for v in [model.amplitude.item(), model.bias.item(), model.offset.item()]]
        [2.0, 0.5, -1.0]
    """
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise HypergradientError(
            f"sigmoid_units.fit(...): expected x (n, d) and y (n,), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}."
        )
    if fit_offset_first:
        with torch.no_grad():
            model.offset += (y - model(x)).mean()
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        max_iter=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )

    def closure():
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    trace = []
    for _ in range(max(1, max_iter // 20)):
        loss = float(optimizer.step(closure).detach())
        trace.append(loss)
        if len(trace) > 1 and trace[-2] - loss <= 1e-15 * max(1.0, abs(loss)):
            break
    with torch.no_grad():
        trace.append(float(((model(x) - y) ** 2).mean()))
    return trace


def match_directions(estimated: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    r"""``|cos|`` between every true unit's direction (rows of ``true`` ``(k, d)``) and the
    estimated one (rows of ``estimated`` ``(k', d)``) it is matched to, under the permutation
    maximising the total ``|cos|`` (sign-invariant: :math:`w` and :math:`-w` are one unit).
    Unmatched true units (``k' < k``) get 0.  Returns ``(k,)``.

    Examples:
        >>> match_directions(torch.tensor([[0.0, -2.0], [3.0, 0.0]]), torch.eye(2))
        tensor([1., 1.])
    """
    from scipy.optimize import linear_sum_assignment

    if estimated.dim() != 2 or true.dim() != 2 or estimated.shape[1] != true.shape[1]:
        raise HypergradientError(
            f"sigmoid_units.match_directions(...): expected (k', d) and (k, d) tensors, got "
            f"{tuple(estimated.shape)} and {tuple(true.shape)}."
        )
    cos = (_normalize(true) @ _normalize(estimated).T).abs()
    rows, cols = linear_sum_assignment(cos.detach().cpu().numpy(), maximize=True)
    out = torch.zeros(true.shape[0], dtype=cos.dtype)
    out[torch.as_tensor(rows)] = cos[torch.as_tensor(rows), torch.as_tensor(cols)].cpu()
    return out


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
