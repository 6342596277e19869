r"""One weight per training example (data hyper-cleaning, Franceschi et al. 2017).

The training loss is the weighted mean of the per-example losses,

.. math::

    L(w, \lambda) = \frac{1}{B} \sum_{i \in \text{batch}} \omega_i(\lambda)\, \ell_i(w)
    \quad\text{or, with ``normalize=True``,}\quad
    \frac{\sum_i \omega_i \ell_i(w)}{\sum_i \omega_i},

so the hyperparameters must know *which* examples a batch holds: the training loader yields
``(x, y, idx)`` with ``idx`` the examples' positions in the training set.
:func:`indexed_loader` (in-memory tensors) and :class:`IndexedDataset` (for a
``torch.utils.data.DataLoader``) make such loaders.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._errors import HypergradientError
from ._base import AbstractHyperparameter, per_example_loss

_PARAMETRIZATIONS = ("sigmoid", "box")
_WHERE = "hypergradient.hparams.ExampleWeights"


class IndexedDataset(Dataset):
    """Tensors ``x`` (``(N, ...)``) and ``y`` (``(N, ...)``) as a dataset of ``(x_i, y_i, i)``.

    ``extra`` tensors (e.g. a task id per example) are appended after ``y``, before the
    index: item ``i`` is ``(x[i], y[i], *[t[i] for t in extra], i)``.  A ``DataLoader`` over
    it yields ``(x, y, ..., idx)`` batches with ``idx`` an ``int64`` tensor.

    Examples:
        >>> import torch
        >>> ds = IndexedDataset(torch.zeros(5, 2), torch.arange(5))
        >>> len(ds), ds[3][1].item(), ds[3][2]
        (5, 3, 3)
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *extra: torch.Tensor):
        tensors = (x, y, *extra)
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise HypergradientError(
                "hypergradient.hparams.IndexedDataset(x, y, *extra): every argument must be a "
                f"torch.Tensor, got {[type(t).__name__ for t in tensors]}."
            )
        lengths = {len(t) for t in tensors}
        if len(lengths) != 1:
            raise HypergradientError(
                "hypergradient.hparams.IndexedDataset(x, y, *extra): the tensors have "
                f"first-axis lengths {[len(t) for t in tensors]}; they must all be equal (one "
                "row per example)."
            )
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int):
        return (*(t[i] for t in self.tensors), i)


class IndexedBatches:
    """In-memory mini-batches ``(x, y, *extra, idx)`` of tensors: a fast ``DataLoader`` twin.

    Re-iterable; each pass draws one permutation from the global torch RNG (when
    ``shuffle``) on its first batch, as a shuffling ``DataLoader`` does, so
    :class:`~hypergradient.train.loop.BilevelTrainer` (which seeds every epoch) gets a
    reproducible order.  Slicing whole batches avoids the per-example indexing and collation
    of a ``DataLoader`` (which dominates the cost of small models).

    Examples:
        >>> import torch
        >>> x, y = torch.zeros(5, 2), torch.arange(5)
        >>> batches = IndexedBatches(x, y, batch_size=2, shuffle=False)
        >>> [b[2].tolist() for b in batches], len(batches)
        ([[0, 1], [2, 3], [4]], 3)
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *extra: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        self.dataset = IndexedDataset(x, y, *extra)  # validates the tensors
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise HypergradientError(
                f"hypergradient.hparams.IndexedBatches(batch_size={batch_size!r}): expected an "
                f"int >= 1."
            )
        if drop_last and batch_size > len(self.dataset):
            raise HypergradientError(
                f"hypergradient.hparams.IndexedBatches(batch_size={batch_size}, "
                f"drop_last=True): the {len(self.dataset)} examples make no full batch; lower "
                f"batch_size or set drop_last=False."
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        n = len(self.dataset)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield (*(t[idx] for t in self.dataset.tensors), idx)


def indexed_loader(
    x: torch.Tensor,
    y: torch.Tensor,
    *extra: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = False,
) -> IndexedBatches:
    """Mini-batches ``(x, y, *extra, idx)`` of in-memory tensors (see :class:`IndexedBatches`).

    ``idx`` (``int64``) holds the examples' positions in ``x``: what
    :class:`ExampleWeights` needs.  For data that does not fit in memory, wrap an
    :class:`IndexedDataset` in a ``torch.utils.data.DataLoader`` instead.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> x, y = torch.randn(10, 3), torch.arange(10)
        >>> batches = hg.hparams.indexed_loader(x, y, batch_size=4, shuffle=False)
        >>> [tuple(idx.tolist()) for *_, idx in batches]
        [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
        >>> xb, yb, idx = next(iter(batches))
        >>> bool(torch.equal(xb, x[idx])), idx.dtype
        (True, torch.int64)
    """
    return IndexedBatches(x, y, *extra, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)


def batch_indices(where: str, batch, num_examples: int, position: int = -1) -> torch.Tensor:
    """The example indices of ``batch`` (its element at ``position``), checked."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 3:
        got = f"a {type(batch).__name__}"
        if isinstance(batch, (tuple, list)):
            got += f" of {len(batch)} elements"
        raise HypergradientError(
            f"{where}.training_loss: batches must be (x, y, idx) with idx the examples' "
            f"positions in the training set; got {got}. Build the training loader with "
            f"hg.hparams.indexed_loader(x, y, batch_size=...) (or IndexedDataset)."
        )
    idx = batch[position]
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise HypergradientError(
            f"{where}.training_loss: the last element of a batch must be an int64 tensor of "
            f"example indices, got {type(idx).__name__}"
            f"{'' if not isinstance(idx, torch.Tensor) else ' of dtype ' + str(idx.dtype)}."
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_examples):
        raise HypergradientError(
            f"{where}.training_loss: example indices range over [{int(idx.min())}, "
            f"{int(idx.max())}] but num_examples={num_examples}; the kind must be built with "
            f"the size of the training set the loader indexes."
        )
    return idx


@dataclass
class ExampleWeights(AbstractHyperparameter):
    r"""A weight :math:`\omega_i \ge 0` per training example, tuned on clean validation data.

    Args:
        num_examples: ``N``, the size of the training set (indices ``0..N-1``).
        parametrization: ``"sigmoid"``: :math:`\omega_i = m\,\sigma(\lambda_i)` with
            :math:`m` = ``max_weight`` (unconstrained :math:`\lambda`, nothing to project;
            the choice of the data hyper-cleaning calibration, ``m = 2``); ``"box"``:
            :math:`\omega_i = \lambda_i`, projected onto :math:`[0, m]` after every
            hyper-step (Franceschi et al.'s constrained form, without their L1 ball).
        initial: the initial weight of every example, in ``(0, max_weight)`` for
            ``"sigmoid"`` and ``[0, max_weight]`` for ``"box"`` (default 1: plain training).
        max_weight: :math:`m > 0`, the largest weight.
        normalize: divide by :math:`\sum_i \omega_i` of the batch instead of its size
            (invariant to a common scale of the weights).

    Batches are ``(x, y, idx)`` (``idx`` last; see :func:`indexed_loader`).  The
    hyperparameter is ``hparams["example_weights"]``, shape ``(N,)``, in the coordinates
    above (logits for ``"sigmoid"``); :meth:`weights` maps it to :math:`\omega`.
    An example counts as *flagged* (likely mislabelled) when :math:`\omega_i < m/2`.

    Cost: ``N`` hyperparameters (one float each) and a gather of ``B`` of them per loss
    evaluation; a hypergradient touches only the weights of the examples in its batches.

    Examples:
        >>> import torch
        >>> kind = ExampleWeights(4)
        >>> h = kind.init({"w": torch.zeros(2, dtype=torch.float64)})
        >>> kind.weights(h).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """

    num_examples: int
    parametrization: str = "sigmoid"
    initial: float = 1.0
    max_weight: float = 2.0
    normalize: bool = False

    def __post_init__(self):
        n = self.num_examples
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise HypergradientError(
                f"{_WHERE}(num_examples={n!r}): expected the training-set size, an int >= 1."
            )
        if self.parametrization not in _PARAMETRIZATIONS:
            raise HypergradientError(
                f"{_WHERE}(parametrization={self.parametrization!r}): expected one of "
                f"{list(_PARAMETRIZATIONS)}."
            )
        m = self.max_weight
        if not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
            raise HypergradientError(f"{_WHERE}(max_weight={m!r}): expected a number > 0.")
        w0 = self.initial
        ok = isinstance(w0, (int, float)) and math.isfinite(w0)
        if self.parametrization == "sigmoid":
            ok = ok and 0 < w0 < m
            bound = f"(0, max_weight={m})"
        else:
            ok = ok and 0 <= w0 <= m
            bound = f"[0, max_weight={m}]"
        if not ok:
            raise HypergradientError(
                f"{_WHERE}(initial={w0!r}): the initial weight must lie in {bound} for "
                f"parametrization={self.parametrization!r}."
            )

    def init(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = next(iter(params.values())).dtype
        if self.parametrization == "sigmoid":
            r = self.initial / self.max_weight
            value = math.log(r / (1 - r))
        else:
            value = float(self.initial)
        return {"example_weights": torch.full((self.num_examples,), value, dtype=dtype)}

    def weights(self, hparams: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weights :math:`\\omega`, shape ``(N,)`` (differentiable in ``hparams``)."""
        raw = hparams["example_weights"]
        if self.parametrization == "sigmoid":
            return self.max_weight * torch.sigmoid(raw)
        return raw

    def flagged(self, hparams: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Boolean mask of the examples whose weight fell below ``max_weight / 2``."""
        return self.weights(hparams).detach() < 0.5 * self.max_weight

    def training_loss(self, forward, params, hparams, batch, criterion=F.cross_entropy):
        idx = batch_indices(_WHERE, batch, self.num_examples)
        losses = per_example_loss(criterion, forward(params, batch[0]), batch[1])
        w = self.weights(hparams)[idx]
        if self.normalize:
            return (w * losses).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)
        return (w * losses).mean()

    def project(self, hparams):
        if self.parametrization == "box":
            hparams["example_weights"].clamp_(0.0, self.max_weight)

    def describe(self, hparams):
        w = self.weights(hparams).detach().double()
        return {
            "weight_mean": float(w.mean()),
            "frac_below_half": float((w < 0.5 * self.max_weight).double().mean()),
        }
