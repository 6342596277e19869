r"""Hyper-optimizer towers: optimizers that tune their own hyperparameters online.

"Gradient Descent: The Ultimate Optimizer" (Chandra, Xie, Ragan-Kelley & Meijer, NeurIPS
2022): an optimizer's hyperparameters (learning rate, momentum, Adam's betas, ...) are
updated at every step by a *hyper-optimizer*, using the derivative of the current loss
with respect to them through the previous update; that optimizer's hyperparameters can be
tuned by another one, and so on.  Taller towers make the result less sensitive to the
hand-chosen values at the top (``hypergradient towers`` reproduces the paper's study).

Examples:
    >>> import torch
    >>> from hypergradient.optimizers import towers
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = towers.SGD(model.parameters(), lr=0.01,                  # level 0: the weights
    ...                  optimizer=towers.Adam(lr=1e-3,                # level 1: SGD's lr
    ...                                        optimizer=towers.SGD(lr=1e-5)))  # level 2
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> for _ in range(5):
    ...     opt.zero_grad()
    ...     torch.nn.functional.mse_loss(model(x), y).backward()   # a plain backward
    ...     opt.step()
    >>> [type(level).__name__ for level in opt.levels]
    ['SGD', 'Adam', 'SGD']

    What the user does: build the base optimizer with the model's parameters and the levels
    above without (``optimizer=`` nesting, or :func:`stack`); then the usual loop,
    ``zero_grad(); loss.backward(); step()`` (or ``step(closure)``), with *no*
    ``create_graph``.  ``param_groups`` hold floats as in ``torch.optim``, so
    ``torch.optim.lr_scheduler`` schedulers work on the base: a multiplicative one
    (``ExponentialLR``, ``StepLR``, ``MultiplicativeLR``) scales the learned learning rate;
    one that computes the lr from scratch (``LambdaLR``, ``OneCycleLR``) overwrites it at
    each of its steps.  ``state_dict()`` of the base covers the whole tower and a restored
    tower continues bit for bit.

    Classes: :class:`SGD` (with momentum), :class:`Adam`, :class:`AdaGrad`, :class:`RMSProp`;
    :class:`AbstractTowerOptimizer` is the common base (algorithm and cost in
    :mod:`hypergradient.optimizers.towers._base`).
"""

from ._base import AbstractTowerOptimizer as AbstractTowerOptimizer
from ._base import Tunable as Tunable
from ._base import stack as stack
from .optimizers import SGD as SGD
from .optimizers import AdaGrad as AdaGrad
from .optimizers import Adam as Adam
from .optimizers import RMSProp as RMSProp

__all__ = ["SGD", "AbstractTowerOptimizer", "AdaGrad", "Adam", "RMSProp", "Tunable", "stack"]
