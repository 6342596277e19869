r"""A synthetic multitask pre-training problem in which some tasks help and some are noise.

Inputs :math:`x \sim \mathcal N(0, I_d)` carry a hidden low-dimensional structure
:math:`z = U^\top x \in \mathbb R^r` (:math:`U` a random orthonormal :math:`d \times r`
basis):

* **useful** pre-training tasks are binary labels :math:`y_t = 1[a_t^\top z > 0]` (random
  directions :math:`a_t` in the latent plane);
* **noise** pre-training tasks are labels drawn at random, independently per example (fair
  coins, fixed once drawn): nothing to learn, only to memorise;
* the **downstream** task is :math:`C`-class :math:`y = \arg\max_c b_c^\top z`, with few
  labelled examples.

The useful tasks share the downstream task's feature structure (both read :math:`z`), so
pre-training on them teaches the encoder to project onto :math:`U`; memorising the noise
labels spends the encoder's few units on random directions of :math:`x` instead.  With a
narrow encoder and few pre-training examples, uniform task weights therefore pre-train a
worse encoder than the useful tasks alone (the gap is the point of the problem).

:class:`MultitaskMLP` is the model: a one-layer tanh encoder, one logistic output per
pre-training task, and a linear classification head for the downstream task, all pure
functions of a parameter dict.  :func:`linear_probe` and :func:`fine_tune` measure what the
downstream task gets out of a pre-trained encoder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._errors import HypergradientError
from ..hparams import TaskWeights

_WHERE = "hypergradient.pretrain.synthetic_multitask"
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MultitaskData:
    """Pre-training and downstream tensors (see the module docstring).

    ``x_pretrain`` ``(n_pretrain, dim)``, ``y_pretrain`` ``(n_pretrain, num_tasks)`` in
    {0., 1.}; ``useful`` ``(num_tasks,)`` bool, true for the useful tasks (the first
    ``num_useful``); the downstream splits ``x_*`` ``(n, dim)`` and ``y_*`` ``(n,)`` int64.

    Examples:
        >>> import hypergradient as hg
        >>> data = hg.pretrain.synthetic_multitask(
        ...     num_useful=3, num_noise=2, dim=6, n_pretrain=8, n_train=4, n_val=4, n_test=4)
        >>> data.num_tasks, data.dim, data.useful.tolist()
        (5, 6, [True, True, True, False, False])
        >>> data.x_train.shape, data.y_train.dtype, data.num_classes
        (torch.Size([4, 6]), torch.int64, 3)
    """

    x_pretrain: torch.Tensor
    y_pretrain: torch.Tensor
    useful: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_tasks(self) -> int:
        return self.y_pretrain.shape[1]

    @property
    def dim(self) -> int:
        return self.x_pretrain.shape[1]


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HypergradientError(f"{_WHERE}({name}={value!r}): expected an int >= {minimum}.")


def synthetic_multitask(
    *,
    num_useful: int = 10,
    num_noise: int = 10,
    dim: int = 30,
    latent_dim: int = 2,
    num_classes: int = 3,
    n_pretrain: int = 100,
    n_train: int = 100,
    n_val: int = 100,
    n_test: int = 2000,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> MultitaskData:
    """Draw the problem of the module docstring; everything is fixed by ``seed``.

    Args:
        num_useful, num_noise: numbers of useful and noise pre-training tasks (tasks
            ``0..num_useful-1`` are the useful ones).
        dim: ``d``, input dimension.  latent_dim: ``r <= d``, dimension of the structure.
        num_classes: ``C >= 2`` downstream classes.
        n_pretrain: pre-training examples (every example has a label for every task).
        n_train, n_val, n_test: downstream examples for fine-tuning, for the hypergradient's
            validation loss, and for the reported accuracy.
        seed: seeds a CPU generator (the same numbers on every machine).
        dtype: of the inputs and the pre-training labels.

    Cost: ``O((n_pretrain + n_train + n_val + n_test) * dim * latent_dim)``.

    Examples:
        >>> data = synthetic_multitask(n_test=10)
        >>> data.x_pretrain.shape, data.y_pretrain.shape, int(data.useful.sum())
        (torch.Size([100, 30]), torch.Size([100, 20]), 10)
    """
    _check_int("num_useful", num_useful, 1)
    _check_int("num_noise", num_noise, 0)
    _check_int("dim", dim, 1)
    _check_int("latent_dim", latent_dim, 1)
    if latent_dim > dim:
        raise HypergradientError(
            f"{_WHERE}(latent_dim={latent_dim}, dim={dim}): the latent structure must fit in "
            f"the input, latent_dim <= dim."
        )
    _check_int("num_classes", num_classes, 2)
    for name, value in (("n_pretrain", n_pretrain), ("n_train", n_train), ("n_val", n_val)):
        _check_int(name, value, 1)
    _check_int("n_test", n_test, 1)
    _check_int("seed", seed, 0)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, latent_dim, generator=gen, dtype=torch.float64))[0]
    task_dirs = torch.randn(latent_dim, num_useful, generator=gen, dtype=torch.float64)
    class_dirs = torch.randn(latent_dim, num_classes, generator=gen, dtype=torch.float64)
    sizes = (n_pretrain, n_train, n_val, n_test)
    x = torch.randn(sum(sizes), dim, generator=gen, dtype=torch.float64)
    z = x @ basis
    downstream = (z @ class_dirs).argmax(1)
    x_pt, x_tr, x_va, x_te = torch.split(x, sizes)
    _, y_tr, y_va, y_te = torch.split(downstream, sizes)
    useful_labels = (z[:n_pretrain] @ task_dirs > 0).to(torch.float64)
    noise_labels = torch.randint(0, 2, (n_pretrain, num_noise), generator=gen).to(torch.float64)
    mask = torch.zeros(num_useful + num_noise, dtype=torch.bool)
    mask[:num_useful] = True
    return MultitaskData(
        x_pretrain=x_pt.to(dtype),
        y_pretrain=torch.cat([useful_labels, noise_labels], 1).to(dtype),
        useful=mask,
        x_train=x_tr.to(dtype),
        y_train=y_tr.clone(),
        x_val=x_va.to(dtype),
        y_val=y_va.clone(),
        x_test=x_te.to(dtype),
        y_test=y_te.clone(),
        num_classes=num_classes,
    )


@dataclass(frozen=True)
class MultitaskMLP:
    r"""Encoder :math:`h = \tanh(xW + b)`, pre-training logits :math:`hV + c`, head :math:`hU + d`.

    Parameter names: ``"encoder.weight"`` ``(dim, hidden)``, ``"encoder.bias"``,
    ``"pretrain_head.weight"`` ``(hidden, num_tasks)``, ``"pretrain_head.bias"``; the
    downstream head is a separate dict ``"head.weight"`` ``(hidden, num_classes)``,
    ``"head.bias"``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> model = hg.pretrain.MultitaskMLP(dim=6, hidden=4, num_tasks=5, num_classes=3)
        >>> params = model.init(seed=0)
        >>> x, y = torch.ones(10, 6, dtype=torch.float64), torch.zeros(10, 5, dtype=torch.float64)
        >>> model.encode(params, x).shape, model.task_losses(params, x, y).shape
        (torch.Size([10, 4]), torch.Size([5]))
        >>> model.logits(model.fresh_head(), params, x).abs().max().item()  # a zero head
        0.0
    """

    dim: int
    hidden: int
    num_tasks: int
    num_classes: int

    ENCODER = ("encoder.weight", "encoder.bias")

    def init(self, seed: int, dtype: torch.dtype = torch.float64) -> Tensors:
        """Pre-training weights: Gaussian with PyTorch's ``1/sqrt(fan_in)`` scale, zero biases."""
        gen = torch.Generator().manual_seed(seed)
        kw = {"generator": gen, "dtype": torch.float64}
        return {
            "encoder.weight": (torch.randn(self.dim, self.hidden, **kw) / math.sqrt(self.dim)).to(
                dtype
            ),
            "encoder.bias": torch.zeros(self.hidden, dtype=dtype),
            "pretrain_head.weight": (
                torch.randn(self.hidden, self.num_tasks, **kw) / math.sqrt(self.hidden)
            ).to(dtype),
            "pretrain_head.bias": torch.zeros(self.num_tasks, dtype=dtype),
        }

    def fresh_head(self, dtype: torch.dtype = torch.float64) -> Tensors:
        """A zero downstream head (uniform predictions, no random direction to undo)."""
        return {
            "head.weight": torch.zeros(self.hidden, self.num_classes, dtype=dtype),
            "head.bias": torch.zeros(self.num_classes, dtype=dtype),
        }

    def encode(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Features ``(n, hidden)``."""
        return torch.tanh(x @ params["encoder.weight"] + params["encoder.bias"])

    def task_losses(
        self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Mean binary cross-entropy of every pre-training task, shape ``(num_tasks,)``."""
        logits = self.encode(params, x) @ params["pretrain_head.weight"]
        logits = logits + params["pretrain_head.bias"]
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)

    def logits(
        self,
        head: Mapping[str, torch.Tensor],
        encoder: Mapping[str, torch.Tensor],
        x: torch.Tensor,
    ) -> torch.Tensor:
        """Downstream logits ``(n, num_classes)`` of ``x`` through ``encoder`` and ``head``."""
        return self.encode(encoder, x) @ head["head.weight"] + head["head.bias"]

    def pretrain_loss(self, kind: TaskWeights, weight_decay: float = 0.0):
        r"""``loss(params, hparams, x, y)`` :math:`= \frac1T\sum_t \omega_t(\lambda)\,\ell_t
        + \frac{\rho}{2}(\|W\|^2 + \|V\|^2)`, with :math:`\omega` from ``kind``
        (:class:`~hypergradient.hparams.TaskWeights`: mean weight 1 under its softmax
        parametrization, so uniform weights give the plain mean task loss)."""
        if kind.num_tasks != self.num_tasks:
            raise HypergradientError(
                f"MultitaskMLP.pretrain_loss: TaskWeights has num_tasks={kind.num_tasks} but "
                f"the model has {self.num_tasks} pre-training outputs."
            )

        def loss(params, hparams, x, y):
            weighted = torch.mean(kind.weights(hparams) * self.task_losses(params, x, y))
            if weight_decay == 0:
                return weighted
            penalty = params["encoder.weight"].pow(2).sum()
            penalty = penalty + params["pretrain_head.weight"].pow(2).sum()
            return weighted + 0.5 * weight_decay * penalty

        return loss


def linear_probe(
    model: MultitaskMLP,
    encoder: Mapping[str, torch.Tensor],
    data: MultitaskData,
    l2: float = 1e-3,
) -> Tensors:
    r"""The downstream head fitted on frozen features: L-BFGS on the training split's
    cross-entropy :math:`+ \frac{l_2}{2}\|U\|^2` (convex; deterministic).  Returns the head.

    Examples:
        >>> import hypergradient as hg
        >>> data = hg.pretrain.synthetic_multitask(dim=5, n_train=20, n_test=10)
        >>> model = hg.pretrain.MultitaskMLP(dim=5, hidden=3, num_tasks=20, num_classes=3)
        >>> encoder = model.init(seed=0)
        >>> head = hg.pretrain.linear_probe(model, encoder, data)
        >>> {k: tuple(v.shape) for k, v in head.items()}
        {'head.weight': (3, 3), 'head.bias': (3,)}
        >>> model.logits(head, encoder, data.x_test).shape
        torch.Size([10, 3])
    """
    features = model.encode({k: encoder[k].detach() for k in model.ENCODER}, data.x_train)
    head = {k: v.requires_grad_(True) for k, v in model.fresh_head(features.dtype).items()}
    opt = torch.optim.LBFGS(
        list(head.values()),
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        logits = features @ head["head.weight"] + head["head.bias"]
        loss = F.cross_entropy(logits, data.y_train) + 0.5 * l2 * head["head.weight"].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return {k: v.detach() for k, v in head.items()}


def fine_tune(
    model: MultitaskMLP,
    encoder: Mapping[str, torch.Tensor],
    head: Mapping[str, torch.Tensor],
    data: MultitaskData,
    steps: int = 100,
    lr: float = 0.1,
    momentum: float = 0.9,
) -> tuple[Tensors, Tensors]:
    """Full fine-tuning: ``steps`` full-batch ``torch.optim.SGD`` steps on encoder and head
    together, on the training split's cross-entropy, from ``encoder`` and ``head`` (start
    from :func:`linear_probe`'s head: linear probing then fine-tuning).  Returns the
    fine-tuned ``(encoder, head)``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> data = hg.pretrain.synthetic_multitask(dim=5, n_train=20, n_test=10)
        >>> model = hg.pretrain.MultitaskMLP(dim=5, hidden=3, num_tasks=20, num_classes=3)
        >>> encoder, head = model.init(seed=0), model.fresh_head()
        >>> enc, hd = hg.pretrain.fine_tune(model, encoder, head, data, steps=5)
        >>> sorted(enc), sorted(hd)  # the encoder only: the pre-training head is dropped
        (['encoder.bias', 'encoder.weight'], ['head.bias', 'head.weight'])
        >>> torch.equal(enc["encoder.weight"], encoder["encoder.weight"])  # it was trained
        False
    """
    enc = {k: encoder[k].detach().clone().requires_grad_(True) for k in model.ENCODER}
    hd = {k: v.detach().clone().requires_grad_(True) for k, v in head.items()}
    opt = torch.optim.SGD([*enc.values(), *hd.values()], lr=lr, momentum=momentum)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model.logits(hd, enc, data.x_train), data.y_train).backward()
            opt.step()
    return {k: v.detach() for k, v in enc.items()}, {k: v.detach() for k, v in hd.items()}


@torch.no_grad()
def accuracy(
    model: MultitaskMLP,
    head: Mapping[str, torch.Tensor],
    encoder: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> float:
    """Fraction of ``x`` classified as ``y``.

    Examples:
        >>> import hypergradient as hg
        >>> data = hg.pretrain.synthetic_multitask(dim=5, n_test=10)
        >>> model = hg.pretrain.MultitaskMLP(dim=5, hidden=3, num_tasks=20, num_classes=3)
        >>> encoder, head = model.init(seed=0), model.fresh_head()
        >>> acc = hg.pretrain.accuracy(model, head, encoder, data.x_test, data.y_test)
        >>> acc == float((data.y_test == 0).double().mean())  # zero head: class 0 everywhere
        True
    """
    return float((model.logits(head, encoder, x).argmax(1) == y).double().mean())


def downstream_scores(
    model: MultitaskMLP,
    encoder: Mapping[str, torch.Tensor],
    data: MultitaskData,
    *,
    full_steps: int = 100,
    full_lr: float = 0.1,
) -> dict[str, float]:
    """Downstream test accuracy of a pre-trained encoder after linear fine-tuning
    (:func:`linear_probe`) and after full fine-tuning from that head (:func:`fine_tune`;
    skipped when ``full_steps == 0``).

    Examples:
        >>> import hypergradient as hg
        >>> data = hg.pretrain.synthetic_multitask(dim=5, n_train=20, n_test=10)
        >>> model = hg.pretrain.MultitaskMLP(dim=5, hidden=3, num_tasks=20, num_classes=3)
        >>> scores = hg.pretrain.downstream_scores(model, model.init(seed=0), data, full_steps=5)
        >>> sorted(scores), all(0.0 <= v <= 1.0 for v in scores.values())
        (['full_acc', 'linear_acc'], True)
        >>> sorted(hg.pretrain.downstream_scores(model, model.init(seed=0), data, full_steps=0))
        ['linear_acc']
    """
    head = linear_probe(model, encoder, data)
    out = {"linear_acc": accuracy(model, head, encoder, data.x_test, data.y_test)}
    if full_steps > 0:
        enc, hd = fine_tune(model, encoder, head, data, steps=full_steps, lr=full_lr)
        out["full_acc"] = accuracy(model, hd, enc, data.x_test, data.y_test)
    return out
