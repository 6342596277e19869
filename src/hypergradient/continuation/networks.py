r"""The fully connected network baseline: ``G(tau) -> A(w)`` learned from synthetic spectra.

The "heuristic fully connected networks" that the learned optimizer of Huang & Yang (PRB 105,
075112, 2022) is compared with (Yoon, Sim & Han, PRB 98, 245101, 2018; Fournier et al.,
PRL 124, 056401, 2020): a multilayer perceptron maps the noisy Green's function
:math:`G \in \mathbb R^{n_\tau}` directly to the spectrum on the real-frequency grid,

.. math::

    h_0 = (G - \mu) / s, \qquad h_l = \phi(W_l h_{l-1} + b_l)\ (l < L), \qquad
    z = W_L h_{L-1} + b_L \in \mathbb R^{n_w},

    A_j = \frac{e^{z_j}}{\sum_k w_k e^{z_k}},

with :math:`w` the grid's quadrature weights, so :math:`A \ge 0` and
:math:`\sum_j w_j A_j = 1` hold for every input by construction (the *softmax-with-weights*
output layer). The map never looks at the kernel: everything it knows about the inverse
problem comes from training on (spectrum, noisy :math:`G`) pairs, with the error on
:math:`A` as the loss (never the residual in :math:`G`, which a noise-fitting spectrum makes
small).

* :class:`FullyConnectedContinuation` -- the network, built for one
  :class:`~hypergradient.continuation.kernels.Problem` (its ``n_tau`` inputs and its grid);
  :meth:`~FullyConnectedContinuation.num_parameters` counts
  :math:`\sum_l (d_{l-1} + 1) d_l` for the widths :math:`d = (n_\tau, \text{hidden}, n_w)`.
* :func:`train_network` -- Adam on the L1 (or L2) error of :math:`A`, minibatches from a
  seeded generator, the validation L1 tracked and the best validation state kept.

Examples:
    >>> import torch
    >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
    >>> from hypergradient.continuation.networks import FullyConnectedContinuation
    >>> problem = Problem(tau=tau_grid(10.0, 11), beta=10.0, grid=uniform_grid(-6.0, 6.0, 41))
    >>> model = FullyConnectedContinuation(problem, hidden=(16,), seed=0)
    >>> A = model(torch.full((3, 11), 0.5, dtype=torch.float64))
    >>> A.shape, bool((A >= 0).all())
    (torch.Size([3, 41]), True)
    >>> bool(torch.allclose(problem.grid.integrate(A), torch.ones(3, dtype=torch.float64)))
    True
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._errors import HypergradientError
from .kernels import Problem, check_green
from .spectra import SpectralDataset

__all__ = ["FullyConnectedContinuation", "train_network"]

_ACTIVATIONS = {
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
}
_LOSSES = ("l1", "l2")
# rows per no-grad forward pass when evaluating whole datasets (bounds the activations' memory)
_EVAL_CHUNK = 4096


def _weighted_softmax(z: Tensor, weights: Tensor) -> Tensor:
    """``exp(z_j) / sum_k weights_k exp(z_k)`` along the last axis, shifted by ``max z``."""
    e = torch.exp(z - z.amax(dim=-1, keepdim=True))
    return e / (e * weights).sum(dim=-1, keepdim=True)


class FullyConnectedContinuation(nn.Module):
    r"""A fully connected network from ``G (..., n_tau)`` to a normalised ``A (..., n_w)``.

    The baseline of Yoon et al. (PRB 2018) and Fournier et al. (PRL 2020). With widths
    :math:`d_0 = n_\tau`, :math:`d_1, \dots, d_{L-1}` = ``hidden``, :math:`d_L = n_w`:

    .. math::

        h_0 = (G - \mu) \oslash s, \quad
        h_l = \phi(W_l h_{l-1} + b_l)\ \ (1 \le l < L), \quad
        z = W_L h_{L-1} + b_L, \quad
        A_j = \frac{e^{z_j}}{\sum_k w_k e^{z_k}},

    :math:`W_l \in \mathbb R^{d_l \times d_{l-1}}`, :math:`\phi` the ``activation`` and
    :math:`w` the grid's quadrature weights. The output layer is a softmax with weights: ``A``
    is a density on ``problem.grid`` with :math:`A_j > 0` (:math:`\ge 0` after underflow) and
    :math:`\sum_j w_j A_j = 1` to rounding (a few ulps times :math:`n_w`) for any input and
    any parameters; it is evaluated with :math:`z - \max z`, so no logit overflows.
    :math:`\mu, s` (buffers ``input_shift``, ``input_scale``, ``(n_tau,)``) standardise the
    input; they start at 0 and 1, and :func:`train_network` sets them to the training
    inputs' mean and standard deviation (``standardize=True``). They are buffers, not
    parameters.

    Parameters: :meth:`num_parameters` :math:`= \sum_{l=1}^{L} (d_{l-1} + 1)\, d_l`.
    Initialisation: PyTorch's default for ``nn.Linear`` (weights and biases uniform in
    :math:`\pm 1/\sqrt{d_{l-1}}`), drawn from a ``torch.Generator`` seeded with ``seed``, so
    the same arguments give the same network bit for bit and the global RNG is not touched.
    Cost of a forward pass: :math:`O(\text{batch} \sum_l d_{l-1} d_l)`.

    Args:
        problem: the :class:`~hypergradient.continuation.kernels.Problem`: ``n_tau`` inputs,
            ``n_w`` outputs, the grid's weights in the output layer; the network's dtype and
            device are those of ``problem.grid.weights``.
        hidden: widths of the hidden layers, positive ints (``()``: a single linear layer
            followed by the softmax).
        activation: ``"elu"`` (default), ``"relu"``, ``"silu"``, ``"softplus"`` or ``"tanh"``.
        seed: an int ``>= 0`` for the initial parameters.

    Attributes:
        problem: the problem it was built for.
        hidden: the hidden widths, a tuple.
        layers: the ``nn.Sequential`` of linear layers and activations (logits out).

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.networks import FullyConnectedContinuation
        >>> problem = Problem(tau=tau_grid(10.0, 21), beta=10.0, grid=uniform_grid(-6, 6, 61))
        >>> model = FullyConnectedContinuation(problem, hidden=(32, 32), seed=1)
        >>> model.num_parameters() == (21 + 1) * 32 + (32 + 1) * 32 + (32 + 1) * 61
        True
        >>> G = problem.forward(torch.full((4, 61), 1 / 12, dtype=torch.float64))
        >>> A = model(G)
        >>> A.shape, bool((A >= 0).all()), bool((problem.grid.integrate(A) - 1).abs().max() < 1e-12)
        (torch.Size([4, 61]), True, True)
        >>> FullyConnectedContinuation(problem, hidden=(32, 0))
        Traceback (most recent call last):
        ...
        hypergradient._errors.HypergradientError: FullyConnectedContinuation: hidden=(32, 0), ...
    """

    def __init__(
        self,
        problem: Problem,
        hidden: Sequence[int] = (256, 256),
        *,
        activation: str = "elu",
        seed: int = 0,
    ):
        super().__init__()
        where = "FullyConnectedContinuation"
        if not isinstance(problem, Problem):
            raise HypergradientError(
                f"{where}: problem is a {type(problem).__name__}, expected a continuation "
                f"Problem; build one with Problem(tau=tau_grid(beta, n_tau), beta=beta, "
                f"grid=uniform_grid(...))."
            )
        widths = _check_hidden(where, hidden)
        if activation not in _ACTIVATIONS:
            raise HypergradientError(
                f"{where}: activation={activation!r}, expected one of "
                f"{tuple(sorted(_ACTIVATIONS))}; pass e.g. activation='elu'."
            )
        _check_seed(where, seed)
        weights = problem.grid.weights.detach()
        if not float(weights.sum()) > 0:
            raise HypergradientError(
                f"{where}: the grid's weights sum to {float(weights.sum())!r}, expected a "
                f"positive total (the output is normalised with them); use uniform_grid or "
                f"nonuniform_grid."
            )
        self.problem = problem
        self.hidden = widths
        self.activation = activation
        dtype, device = weights.dtype, weights.device
        self.register_buffer("weights", weights.clone())
        self.register_buffer("input_shift", torch.zeros(problem.n_tau, dtype=dtype, device=device))
        self.register_buffer("input_scale", torch.ones(problem.n_tau, dtype=dtype, device=device))

        generator = torch.Generator().manual_seed(int(seed))
        sizes = (problem.n_tau, *widths, problem.n_w)
        modules: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if index > 0:
                modules.append(_ACTIVATIONS[activation]())
            linear = nn.Linear(fan_in, fan_out, device="meta", dtype=dtype)
            bound = 1.0 / math.sqrt(fan_in)
            for name, shape in (("weight", (fan_out, fan_in)), ("bias", (fan_out,))):
                value = torch.rand(shape, generator=generator, dtype=dtype)
                value = (2 * bound) * value - bound
                setattr(linear, name, nn.Parameter(value.to(device)))
            modules.append(linear)
        self.layers = nn.Sequential(*modules)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The layer widths ``(n_tau, *hidden, n_w)``.

        Examples:
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> from hypergradient.continuation.networks import FullyConnectedContinuation
            >>> problem = Problem(tau=tau_grid(5.0, 11), beta=5.0, grid=uniform_grid(-4, 4, 41))
            >>> FullyConnectedContinuation(problem, hidden=(8, 4)).sizes
            (11, 8, 4, 41)
        """
        return (self.problem.n_tau, *self.hidden, self.problem.n_w)

    def num_parameters(self) -> int:
        r"""The number of trainable scalars, :math:`\sum_l (d_{l-1} + 1) d_l` over :attr:`sizes`.

        Counts weights and biases (``p.numel()`` summed over ``parameters()``); the input
        standardisation and the grid's weights are buffers and are not counted. Cost O(L).

        Examples:
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> from hypergradient.continuation.networks import FullyConnectedContinuation
            >>> problem = Problem(tau=tau_grid(5.0, 11), beta=5.0, grid=uniform_grid(-4, 4, 41))
            >>> FullyConnectedContinuation(problem, hidden=(8,)).num_parameters()  # 12*8 + 9*41
            465
        """
        return sum(p.numel() for p in self.parameters())

    def forward(self, G: Tensor, sigma: Tensor | None = None) -> Tensor:
        r"""The spectrum ``A (..., n_w)`` of Green's functions ``G (..., n_tau)``.

        ``G`` is checked with :func:`~hypergradient.continuation.kernels.check_green` (shape
        ``(..., n_tau)``, real floating, finite) and converted to the network's dtype and
        device; leading dimensions are batch dimensions. ``A >= 0`` and
        ``(weights * A).sum(-1) == 1`` to rounding, see the class docstring.

        ``sigma`` (the noise level, ``G``'s shape or ``G.shape[:-1]``) is accepted so that
        this network and the learned optimizer share one call signature; it is checked but
        not used: the network sees ``G`` only, and knows the noise level it was trained at
        from its training data alone.

        Cost: :math:`O(\text{batch} \sum_l d_{l-1} d_l)`.

        Examples:
            >>> import torch
            >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
            >>> from hypergradient.continuation.networks import FullyConnectedContinuation
            >>> problem = Problem(tau=tau_grid(5.0, 11), beta=5.0, grid=uniform_grid(-4, 4, 41))
            >>> model = FullyConnectedContinuation(problem, hidden=(8,))
            >>> model(torch.full((2, 5, 11), 0.5, dtype=torch.float64)).shape
            torch.Size([2, 5, 41])
            >>> model(torch.ones(12, dtype=torch.float64))
            Traceback (most recent call last):
            ...
            hypergradient._errors.HypergradientError: FullyConnectedContinuation: G has shape ...
        """
        where = "FullyConnectedContinuation"
        check_green(G, self.problem, where=where)
        if sigma is not None:
            _check_sigma(where, sigma, G)
        return self._spectrum(G.to(dtype=self.weights.dtype, device=self.weights.device))

    def _spectrum(self, G: Tensor) -> Tensor:
        """The forward map without input checks (``G`` already in the network's dtype)."""
        z = self.layers((G - self.input_shift) / self.input_scale)
        return _weighted_softmax(z, self.weights)


def train_network(
    model: FullyConnectedContinuation,
    train: SpectralDataset,
    val: SpectralDataset,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    loss: str = "l1",
    eval_every: int | None = None,
    standardize: bool = True,
    progress: bool = False,
) -> dict:
    r"""Train a :class:`FullyConnectedContinuation` with Adam on the error of ``A``.

    The input is the noisy Green's function ``G_noisy`` of each row; the loss is the error of
    the network's spectrum against the true one on the grid (never the residual in ``G``):

    .. math::

        \text{L1} = \frac1B \sum_{b} \sum_j w_j\, |A_\theta(G_b)_j - A_{b,j}|, \qquad
        \text{L2} = \frac1B \sum_{b} \sum_j w_j\, (A_\theta(G_b)_j - A_{b,j})^2,

    over a minibatch of ``B = min(batch_size, len(train))`` rows. Minibatches are the
    consecutive slices of random permutations of the training rows (a new permutation when
    fewer than ``B`` rows are left), drawn from a ``torch.Generator`` seeded with ``seed``;
    with the model's own ``seed`` this makes a run reproducible bit for bit (on one machine
    and thread count). ``torch.optim.Adam(lr=lr)``, ``steps`` updates.

    With ``standardize=True`` the model's input standardisation (``input_shift``,
    ``input_scale``) is first set to the per-:math:`\tau` mean and standard deviation of
    ``train.G_noisy`` (a standard deviation below ``1e-12`` of the largest is raised to it).

    Evaluation at step 0, every ``eval_every`` steps (default ``max(1, steps // 10)``) and at
    the last step: the mean loss over all training rows and the mean validation L1 (always L1,
    whatever ``loss`` is), both at the current parameters and without gradients. The state
    with the lowest validation L1 (the first on ties, step 0 included) is copied, and loaded
    back into ``model`` at the end: ``model`` leaves with its best validation state, which
    is never worse on ``val`` than the one it came in with.

    Args:
        model: the network; trained in place.
        train: the training :class:`~hypergradient.continuation.spectra.SpectralDataset`,
            made on the model's problem (``n_tau`` and ``n_w`` must match).
        val: the validation set (same requirements), used for selection only.
        steps: number of Adam updates, an int ``>= 1``.
        lr: Adam's learning rate, ``> 0``.
        batch_size: rows per minibatch, an int ``>= 1`` (capped at ``len(train)``).
        seed: an int ``>= 0`` for the minibatch order.
        loss: ``"l1"`` (default) or ``"l2"``, as above.
        eval_every: steps between evaluations, an int ``>= 1``, or None for the default.
        standardize: set the input standardisation from ``train`` first (default True).
        progress: show a progress bar (rich) with the latest validation L1.

    Returns:
        A dict: ``"step"`` (the evaluation steps), ``"train_loss"`` and ``"val_l1"`` (one
        float per evaluation), ``"best_step"`` and ``"best_val_l1"`` (the state kept),
        ``"loss"``, ``"steps"``, ``"num_parameters"``.

    Cost: ``steps`` forward and backward passes of ``B`` rows, :math:`O(\text{steps}\, B
    \sum_l d_{l-1} d_l)`, plus per evaluation one forward pass over ``train`` and ``val``,
    and one copy of the parameters per improvement.

    Examples:
        >>> import torch
        >>> from hypergradient.continuation.kernels import Problem, tau_grid, uniform_grid
        >>> from hypergradient.continuation.networks import (FullyConnectedContinuation,
        ...                                                  train_network)
        >>> from hypergradient.continuation.spectra import make_dataset
        >>> problem = Problem(tau=tau_grid(10.0, 11), beta=10.0, grid=uniform_grid(-6, 6, 41))
        >>> train = make_dataset(problem, ("gaussians",), 32, 1e-3, seed=0)
        >>> val = make_dataset(problem, ("gaussians",), 8, 1e-3, seed=1)
        >>> model = FullyConnectedContinuation(problem, hidden=(16,), seed=0)
        >>> history = train_network(model, train, val, steps=20, lr=1e-2, batch_size=8, seed=0)
        >>> history["step"][:3], history["best_val_l1"] < history["val_l1"][0]
        ([0, 2, 4], True)
    """
    where = "train_network"
    if not isinstance(model, FullyConnectedContinuation):
        raise HypergradientError(
            f"{where}: model is a {type(model).__name__}, expected a "
            f"FullyConnectedContinuation; build one with FullyConnectedContinuation(problem)."
        )
    for name, dataset in (("train", train), ("val", val)):
        _check_dataset(where, name, dataset, model)
    steps = _check_positive_int(where, "steps", steps, example=1000)
    batch_size = _check_positive_int(where, "batch_size", batch_size, example=64)
    if eval_every is not None:
        eval_every = _check_positive_int(where, "eval_every", eval_every, example=100)
    _check_seed(where, seed)
    if (
        isinstance(lr, bool)
        or not isinstance(lr, numbers.Real)
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise HypergradientError(
            f"{where}: lr={lr!r}, expected a finite learning rate > 0; pass e.g. lr=1e-3."
        )
    if loss not in _LOSSES:
        raise HypergradientError(f"{where}: loss={loss!r}, expected one of {_LOSSES}.")
    eval_every = max(1, steps // 10) if eval_every is None else eval_every

    dtype, device = model.weights.dtype, model.weights.device
    G_train, A_train = (t.to(dtype=dtype, device=device) for t in (train.G_noisy, train.A))
    G_val, A_val = (t.to(dtype=dtype, device=device) for t in (val.G_noisy, val.A))
    if standardize:
        with torch.no_grad():
            scale = G_train.std(dim=0, correction=0) if len(train) > 1 else None
            if scale is None or not float(scale.max()) > 0:
                scale = torch.ones_like(model.input_scale)
            model.input_shift.copy_(G_train.mean(dim=0))
            model.input_scale.copy_(scale.clamp(min=1e-12 * float(scale.max())))

    weights = model.weights
    power = 1 if loss == "l1" else 2

    def error(A: Tensor, target: Tensor, p: int) -> Tensor:
        diff = (A - target).abs()
        return (weights * (diff if p == 1 else diff * diff)).sum(-1)

    def evaluate(G: Tensor, target: Tensor, p: int) -> float:
        total = 0.0
        with torch.no_grad():
            for start in range(0, G.shape[0], _EVAL_CHUNK):
                stop = start + _EVAL_CHUNK
                total += float(error(model._spectrum(G[start:stop]), target[start:stop], p).sum())
        return total / G.shape[0]

    n = len(train)
    batch = min(batch_size, n)
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator).to(device)
    position = 0
    optimizer = torch.optim.Adam(model.parameters(), lr=float(lr))
    history: dict = {"step": [], "train_loss": [], "val_l1": []}
    best_state, best_step, best_val = None, 0, math.inf
    was_training = model.training

    def record(step: int) -> None:
        nonlocal best_state, best_step, best_val
        model.eval()
        val_l1 = evaluate(G_val, A_val, 1)
        history["step"].append(step)
        history["train_loss"].append(evaluate(G_train, A_train, power))
        history["val_l1"].append(val_l1)
        if val_l1 < best_val:
            best_state = copy.deepcopy(model.state_dict())
            best_step, best_val = step, val_l1
        model.train()

    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        task = bar.add_task(where, total=steps)
        bar.start()
    try:
        record(0)
        for step in range(1, steps + 1):
            if position + batch > n:
                order = torch.randperm(n, generator=generator).to(device)
                position = 0
            rows = order[position : position + batch]
            position += batch
            optimizer.zero_grad(set_to_none=True)
            value = error(model._spectrum(G_train[rows]), A_train[rows], power).mean()
            value.backward()
            optimizer.step()
            if step % eval_every == 0 or step == steps:
                record(step)
            if bar is not None:
                text = f"{where} val L1 {history['val_l1'][-1]:.4f}"
                bar.update(task, advance=1, description=text)
    finally:
        if bar is not None:
            bar.stop()
        model.train(was_training)
    model.load_state_dict(best_state)
    history.update(
        best_step=best_step,
        best_val_l1=best_val,
        loss=loss,
        steps=steps,
        num_parameters=model.num_parameters(),
    )
    return history


# --------------------------------------------------------------------------------------------
# input checks


def _check_hidden(where: str, hidden) -> tuple[int, ...]:
    try:
        widths = tuple(hidden)
    except TypeError:
        widths = None
    if widths is None or not all(
        isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1 for w in widths
    ):
        raise HypergradientError(
            f"{where}: hidden={hidden!r}, expected a sequence of positive int widths (one per "
            f"hidden layer, () for none); pass e.g. hidden=(256, 256)."
        )
    return tuple(int(w) for w in widths)


def _check_seed(where: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise HypergradientError(f"{where}: seed={seed!r}, expected an int >= 0; pass e.g. seed=0.")


def _check_positive_int(where: str, name: str, value, *, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise HypergradientError(
            f"{where}: {name}={value!r}, expected an int >= 1; pass e.g. {name}={example}."
        )
    return int(value)


def _check_sigma(where: str, sigma, G: Tensor) -> None:
    if not isinstance(sigma, Tensor) or not sigma.is_floating_point():
        got = sigma.dtype if isinstance(sigma, Tensor) else type(sigma).__name__
        raise HypergradientError(
            f"{where}: sigma is {got}, expected a real floating tensor of shape "
            f"{tuple(G.shape)} or {tuple(G.shape[:-1])}; or leave it out (the network does "
            f"not use it)."
        )
    if tuple(sigma.shape) not in (tuple(G.shape), tuple(G.shape[:-1])):
        raise HypergradientError(
            f"{where}: sigma has shape {tuple(sigma.shape)}, expected G's shape "
            f"{tuple(G.shape)} (one per point) or {tuple(G.shape[:-1])} (one per spectrum); "
            f"give one noise level per G."
        )
    if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        raise HypergradientError(
            f"{where}: sigma has NaN/inf or negative values, expected finite standard "
            f"deviations >= 0; pass the dataset's sigma."
        )


def _check_dataset(where: str, name: str, dataset, model: FullyConnectedContinuation) -> None:
    if not isinstance(dataset, SpectralDataset):
        raise HypergradientError(
            f"{where}: {name} is a {type(dataset).__name__}, expected a SpectralDataset; "
            f"build one with make_dataset(problem, families, n_per_family, rel_sigma, seed=...)."
        )
    if len(dataset) == 0:
        raise HypergradientError(
            f"{where}: {name} has no rows, expected at least 1; make the dataset larger or "
            f"check the families split_by_family left in it."
        )
    problem = model.problem
    if dataset.A.shape[-1] != problem.n_w:
        raise HypergradientError(
            f"{where}: {name}.A has {dataset.A.shape[-1]} frequencies but the model's grid "
            f"has n_w = {problem.n_w}, expected the same grid; make the dataset with the "
            f"model's problem."
        )
    check_green(dataset.G_noisy, problem, where=f"{where}({name}.G_noisy)")
