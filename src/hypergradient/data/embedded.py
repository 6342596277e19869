"""scikit-learn's shipped datasets as seeded train/validation/test tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import HypergradientError


@dataclass
class Split:
    """Tensors of one dataset split three ways; ``x`` is ``(n, features)``, ``y`` is ``(n,)``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> x, y = torch.rand(10, 3), torch.arange(10) % 2
        >>> s = hg.data.Split(x[:6], y[:6], x[6:8], y[6:8], x[8:], y[8:], num_classes=2)
        >>> s.num_features, len(s.x_train), len(s.x_val), len(s.x_test)
        (3, 6, 2, 2)
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]


def load_digits_split(
    n_train: int = 600,
    n_val: int = 300,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), pixels scaled to [0, 1].

    The rows are shuffled with ``seed``; the first ``n_train`` train, the next ``n_val``
    validate, and the rest (at least 100) are the test set.

    Examples:
        >>> import hypergradient as hg
        >>> s = hg.data.load_digits_split(n_train=100, n_val=50, seed=0)
        >>> s.x_train.shape, s.y_train.dtype, len(s.x_test), s.num_classes
        (torch.Size([100, 64]), torch.int64, 1647, 10)
        >>> bool(s.x_train.min() >= 0) and bool(s.x_train.max() <= 1)
        True
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    total = len(x)
    if n_train < 1 or n_val < 1 or n_train + n_val > total - 100:
        raise HypergradientError(
            f"load_digits_split(n_train={n_train}, n_val={n_val}): digits has {total} "
            f"examples; need n_train >= 1, n_val >= 1 and n_train + n_val <= {total - 100} "
            f"so that at least 100 remain for the test set."
        )
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    xt = torch.as_tensor(x, dtype=dtype)[perm] / 16.0
    yt = torch.as_tensor(y, dtype=torch.long)[perm]
    a, b = n_train, n_train + n_val
    return Split(xt[:a], yt[:a], xt[a:b], yt[a:b], xt[b:], yt[b:], num_classes=10)
