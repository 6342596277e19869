r"""Dataset distillation: a few synthetic examples whose every pixel is a hyperparameter.

The inner problem trains the model on ``n`` learnable images :math:`\tilde x_i` with
learnable soft labels :math:`\operatorname{softmax}(\ell_i)` instead of the real training
set; the outer problem is the loss of the trained model on *real* data (Wang et al. 2018;
Lorraine et al. 2020, one image per class for logistic regression on MNIST).  After the
hyperparameters are fitted, the question is whether the synthetic data trains a *fresh*
model of the same architecture well: :func:`retrain_on_distilled` and
:func:`evaluate_distilled` answer it.

The synthetic data is tuned for the training procedure it was differentiated through
(number of steps, learning rate, initialisation distribution): evaluate it with the same
procedure.  With warm-started bilevel training (Vicol et al. 2022) much of the performance
lives in the online weights rather than in the data; report both.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import HypergradientError
from ..problem import as_function
from ._base import AbstractHyperparameter, Criterion, per_example_loss

_WHERE = "hypergradient.hparams.DistilledData"
_INITS = ("real", "noise")
IMAGES = "distill.images"
LABELS = "distill.label_logits"


@dataclass
class DistilledData(AbstractHyperparameter):
    r"""Learnable synthetic training examples and soft labels (dataset distillation).

    The training loss ignores the real training batch (``uses_training_data = False``, so
    :class:`~hypergradient.BilevelTrainer` accepts ``train_loader=None``):

    .. math::

        L(w, \lambda) = \frac1n \sum_{i=1}^n
            \operatorname{CE}\big(f_w(\tilde x_i),\ \operatorname{softmax}(\ell_i)\big),
        \qquad \lambda = (\tilde x_{1..n}, \ell_{1..n}),

    with soft (probability) targets; ``criterion`` must accept ``(N, C)`` probability
    targets, as :func:`torch.nn.functional.cross_entropy` does.

    Args:
        num_classes: ``C``, the number of classes of the model's output.
        shape: the shape of one example as the model consumes it, e.g. ``(784,)`` for a
            flattened MNIST image or ``(1, 28, 28)`` for a convolutional network.
        per_class: synthetic examples per class, ``n = C * per_class`` in all.
        num_examples: ``n`` directly (overrides ``per_class``); example ``i`` starts as
            class ``i % C``.  ``num_examples=1`` is Vicol et al.'s single distilled example.
        init_from: ``"real"`` (random real examples of each example's class, drawn with
            ``seed`` from ``real_x``/``real_y``) or ``"noise"`` (Gaussian pixels with mean
            ``noise_mean`` and standard deviation ``noise_std``).
        real_x, real_y: real examples (any shape with ``prod(shape)`` features per example)
            and integer labels, needed for ``init_from="real"``.
        label_confidence: initial soft label: probability of the example's class (the rest
            shared equally), in ``[1/C, 1)``; stored as logits.
        learn_labels: ``False`` keeps hard one-hot labels (then only the images are
            hyperparameters and the loss is ordinary cross-entropy).
        pixel_range: ``(low, high)`` to clip the images into after every hyper-step (e.g.
            ``(0.0, 1.0)``), or ``None`` (unconstrained, the default).
        seed: seeds the initial images.

    Hyperparameters: ``"distill.images"`` of shape ``(n, *shape)`` and (when
    ``learn_labels``) ``"distill.label_logits"`` of shape ``(n, C)``: ``n * (prod(shape) +
    C)`` scalars, every pixel one hyperparameter.

    Cost: one training-loss evaluation is a forward pass over the ``n`` synthetic examples
    only (independent of the real data set's size, which enters the outer loss).  A
    cold-start hyper-step that differentiates through ``T`` SGD steps
    (:func:`~hypergradient.unrolled_hypergrad`, reverse mode) costs about ``3 T`` such
    passes plus one forward/backward pass over the real validation batch, and keeps ``T``
    copies of the weights and of the activations of the ``n`` examples in memory.

    Examples:
        >>> import torch
        >>> kind = DistilledData(num_classes=3, shape=(4,), per_class=2, init_from="noise")
        >>> hp = kind.init({"weight": torch.zeros(3, 4, dtype=torch.float64)})
        >>> tuple(hp["distill.images"].shape), tuple(hp["distill.label_logits"].shape)
        ((6, 4), (6, 3))
        >>> kind.classes().tolist()
        [0, 0, 1, 1, 2, 2]
    """

    num_classes: int
    shape: tuple[int, ...]
    per_class: int = 1
    num_examples: int | None = None
    init_from: str = "real"
    real_x: torch.Tensor | None = field(default=None, repr=False)
    real_y: torch.Tensor | None = field(default=None, repr=False)
    noise_mean: float = 0.0
    noise_std: float = 1.0
    label_confidence: float = 0.9
    learn_labels: bool = True
    pixel_range: tuple[float, float] | None = None
    seed: int = 0

    uses_training_data = False

    def __post_init__(self):
        for name in ("num_classes", "per_class"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HypergradientError(f"{_WHERE}({name}={value!r}): expected an int >= 1.")
        if self.num_classes < 2:
            raise HypergradientError(
                f"{_WHERE}(num_classes={self.num_classes}): need at least 2 classes."
            )
        n = self.num_examples
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise HypergradientError(f"{_WHERE}(num_examples={n!r}): expected None or an int >= 1.")
        if isinstance(self.shape, int):
            self.shape = (self.shape,)
        self.shape = tuple(self.shape)
        if not self.shape or any(not isinstance(s, int) or s < 1 for s in self.shape):
            raise HypergradientError(
                f"{_WHERE}(shape={self.shape!r}): expected the shape of one example, a tuple of "
                f"positive ints such as (784,) or (1, 28, 28)."
            )
        if self.init_from not in _INITS:
            raise HypergradientError(
                f"{_WHERE}(init_from={self.init_from!r}): expected one of {list(_INITS)}."
            )
        if self.init_from == "real":
            self._check_real()
        c = self.label_confidence
        ok = isinstance(c, (int, float)) and math.isfinite(c)
        if not ok or not 1.0 / self.num_classes <= c < 1.0:
            raise HypergradientError(
                f"{_WHERE}(label_confidence={c!r}): expected a probability in "
                f"[1/num_classes, 1) = [{1.0 / self.num_classes:.3g}, 1)."
            )
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise HypergradientError(
                f"{_WHERE}(noise_std={self.noise_std!r}): expected a finite number >= 0."
            )
        if self.pixel_range is not None:
            low, high = self.pixel_range
            if not low < high:
                raise HypergradientError(
                    f"{_WHERE}(pixel_range={self.pixel_range!r}): expected (low, high) with "
                    f"low < high, or None."
                )

    def _check_real(self) -> None:
        x, y = self.real_x, self.real_y
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise HypergradientError(
                f"{_WHERE}(init_from='real'): pass the real examples as real_x=<tensor> and "
                f"real_y=<int tensor>, or use init_from='noise'."
            )
        features = math.prod(self.shape)
        if y.dim() != 1 or len(x) != len(y) or x[0].numel() != features:
            raise HypergradientError(
                f"{_WHERE}: real_x of shape {tuple(x.shape)} and real_y of shape "
                f"{tuple(y.shape)}; expected N examples of {features} features each "
                f"(shape={self.shape}) and N integer labels."
            )
        counts = torch.bincount(y.long(), minlength=self.num_classes)
        need = torch.bincount(self.classes(), minlength=self.num_classes)
        short = [c for c in range(self.num_classes) if counts[c] < need[c]]
        if short:
            raise HypergradientError(
                f"{_WHERE}(init_from='real'): real_y has too few examples of classes {short} "
                f"(need {need.max().item()} per class); pass more real data or use "
                f"init_from='noise'."
            )

    # ------------------------------------------------------------------ structure
    @property
    def size(self) -> int:
        """``n``, the number of synthetic examples."""
        if self.num_examples is not None:
            return self.num_examples
        return self.num_classes * self.per_class

    def classes(self) -> torch.Tensor:
        """The class each synthetic example starts as: ``[0]*per_class + [1]*per_class...``
        (or ``i % C`` with ``num_examples``)."""
        if self.num_examples is not None:
            return torch.arange(self.num_examples) % self.num_classes
        return torch.arange(self.num_classes).repeat_interleave(self.per_class)

    # ------------------------------------------------------------------ the kind
    def init(self, params):
        dtype = next(iter(params.values())).dtype
        gen = torch.Generator().manual_seed(self.seed)
        classes = self.classes()
        if self.init_from == "real":
            x, y = self.real_x, self.real_y.long()
            rows = []
            taken: dict[int, list[int]] = {}
            for c in classes.tolist():
                if c not in taken:
                    pool = torch.nonzero(y == c).flatten()
                    taken[c] = pool[torch.randperm(len(pool), generator=gen)].tolist()
                rows.append(taken[c].pop())
            images = x[torch.tensor(rows)].reshape(len(rows), *self.shape).to(dtype)
        else:
            # drawn in float64 then cast: the same images whatever the dtype
            images = torch.randn((self.size, *self.shape), generator=gen, dtype=torch.float64)
            images = (images * self.noise_std + self.noise_mean).to(dtype)
        out = {IMAGES: images.clone()}
        if self.learn_labels:
            c = self.num_classes
            high = math.log(self.label_confidence)
            low = math.log((1.0 - self.label_confidence) / (c - 1))
            logits = torch.full((self.size, c), low, dtype=dtype)
            logits[torch.arange(self.size), classes] = high
            out[LABELS] = logits
        return out

    def targets(self, hparams: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training targets: ``softmax(label logits)`` (``(n, C)``), or the hard classes
        (``(n,)``) when labels are not learned."""
        if self.learn_labels:
            return torch.softmax(hparams[LABELS], dim=-1)
        return self.classes().to(hparams[IMAGES].device)

    def training_loss(self, forward, params, hparams, batch=None, criterion=F.cross_entropy):
        outputs = forward(params, hparams[IMAGES])
        return per_example_loss(criterion, outputs, self.targets(hparams)).mean()

    def project(self, hparams):
        if self.pixel_range is not None:
            hparams[IMAGES].clamp_(*self.pixel_range)

    def describe(self, hparams):
        images = hparams[IMAGES].detach().double()
        out = {
            "pixel_min": float(images.min()),
            "pixel_max": float(images.max()),
            "pixel_rms": float(images.pow(2).mean().sqrt()),
        }
        if self.learn_labels:
            probs = torch.softmax(hparams[LABELS].detach().double(), dim=-1)
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
            out["label_entropy"] = float(entropy.mean())
            out["label_top_prob"] = float(probs.max(-1).values.mean())
        return out


# ---------------------------------------------------------------------------- evaluation


def fresh_params(
    model: nn.Module, init: str | Mapping[str, torch.Tensor] = "random", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Initial weights for ``model``'s architecture, as a detached parameter dict.

    ``init="random"``: what ``reset_parameters()`` of every sub-module draws, with the global
    RNG seeded by ``seed`` for the call (the caller's RNG state is left untouched);
    ``"zeros"``: all zeros; ``"current"``: a copy of the model's weights; or a dict of tensors
    (copied).  The model itself is never modified.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> model = torch.nn.Linear(3, 2)
        >>> params = hg.hparams.fresh_params(model, seed=1)
        >>> {k: (tuple(v.shape), v.requires_grad) for k, v in params.items()}
        {'weight': ((2, 3), False), 'bias': ((2,), False)}
        >>> again = hg.hparams.fresh_params(model, seed=1)  # same seed, same draw
        >>> bool(torch.equal(params["weight"], again["weight"]))
        True
        >>> int(hg.hparams.fresh_params(model, "zeros")["weight"].count_nonzero())
        0
    """
    if isinstance(init, Mapping):
        return {k: v.detach().clone() for k, v in init.items()}
    names = dict(model.named_parameters())
    if init == "current":
        return {k: v.detach().clone() for k, v in names.items()}
    if init == "zeros":
        return {k: torch.zeros_like(v).detach() for k, v in names.items()}
    if init != "random":
        raise HypergradientError(
            f"hypergradient.hparams.fresh_params(init={init!r}): expected 'random', 'zeros', "
            f"'current' or a dict of tensors."
        )
    clone = copy.deepcopy(model)
    resettable = [m for m in clone.modules() if callable(getattr(m, "reset_parameters", None))]
    if not resettable:
        raise HypergradientError(
            f"hypergradient.hparams.fresh_params(init='random'): no sub-module of "
            f"{type(model).__name__} has reset_parameters(); pass init='zeros' or a dict of "
            f"initial tensors."
        )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in resettable:
            module.reset_parameters()
    return {k: v.detach().clone() for k, v in clone.named_parameters()}


def retrain_on_distilled(
    model: nn.Module,
    hyper: DistilledData,
    hparams: Mapping[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    init: str | Mapping[str, torch.Tensor] = "random",
    seed: int = 0,
    criterion: Criterion = F.cross_entropy,
) -> dict[str, torch.Tensor]:
    r"""Train a fresh copy of ``model``'s architecture on the distilled data; return its weights.

    Full-batch SGD (heavy-ball ``momentum``, as ``torch.optim.SGD`` and
    :func:`~hypergradient.unrolled_hypergrad` write it) for ``steps`` steps of ``lr`` on
    ``hyper.training_loss``, starting from :func:`fresh_params` ``(model, init, seed)``.  The
    returned dict works with ``hg.as_function(model)``.  Use the procedure the data was
    distilled for (same ``steps``, ``lr``, ``init``); nothing here is differentiated.
    Cost: ``steps`` forward/backward passes over the ``n`` synthetic examples.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> model = torch.nn.Linear(2, 2)
        >>> x, y = torch.tensor([[2.0, 0.0], [-2.0, 0.0]]), torch.tensor([0, 1])
        >>> kind = hg.hparams.DistilledData(num_classes=2, shape=(2,), real_x=x, real_y=y)
        >>> hparams = kind.init(dict(model.named_parameters()))  # one real example per class
        >>> w = hg.hparams.retrain_on_distilled(model, kind, hparams, steps=20, lr=1.0)
        >>> sorted(w), hg.as_function(model)(w, hparams["distill.images"]).argmax(-1).tolist()
        (['bias', 'weight'], [0, 1])
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise HypergradientError(
            f"hypergradient.hparams.retrain_on_distilled(steps={steps!r}): expected an int >= 0."
        )
    forward = as_function(model)
    hp = {k: v.detach() for k, v in hparams.items()}
    w = fresh_params(model, init, seed)
    w = {k: v.to(hp[IMAGES].dtype) for k, v in w.items()}
    buf = None
    for _ in range(steps):
        wt = {k: v.requires_grad_(True) for k, v in w.items()}
        with torch.enable_grad():
            loss = hyper.training_loss(forward, wt, hp, None, criterion)
            grads = torch.autograd.grad(loss, list(wt.values()))
        with torch.no_grad():
            g = dict(zip(wt, grads))
            buf = g if buf is None or momentum == 0 else {k: momentum * buf[k] + g[k] for k in g}
            w = {k: (wt[k] - lr * buf[k]).detach() for k in wt}
    return w


@torch.no_grad()
def accuracy(
    forward: Callable, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> float:
    """Fraction of ``x`` classified as ``y`` by ``forward(params, x)`` (arg-max of outputs)."""
    dtype = next(iter(params.values())).dtype
    return float((forward(params, x.to(dtype)).argmax(-1) == y).double().mean())


def evaluate_distilled(
    model: nn.Module,
    hyper: DistilledData,
    hparams: Mapping[str, torch.Tensor],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    init: str = "random",
    seeds: Sequence[int] = (0,),
    criterion: Criterion = F.cross_entropy,
) -> dict[str, float | list[float]]:
    """Test accuracy of fresh models retrained on the distilled data (one per seed).

    Runs :func:`retrain_on_distilled` once per seed (different random initialisations when
    ``init="random"``) and returns ``{"accuracy": mean, "accuracy_std": std, "accuracies":
    [...]}`` on ``(x_test, y_test)`` (``x_test`` shaped as the model consumes it).

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> model = torch.nn.Linear(2, 2)
        >>> x, y = torch.tensor([[2.0, 0.0], [-2.0, 0.0]]), torch.tensor([0, 1])
        >>> kind = hg.hparams.DistilledData(num_classes=2, shape=(2,), real_x=x, real_y=y)
        >>> hparams = kind.init(dict(model.named_parameters()))  # one real example per class
        >>> x_test = torch.tensor([[1.0, 0.0], [3.0, 0.0], [-1.0, 0.0], [-3.0, 0.0]])
        >>> result = hg.hparams.evaluate_distilled(
        ...     model, kind, hparams, x_test, torch.tensor([0, 0, 1, 1]),
        ...     steps=20, lr=1.0, seeds=(0, 1, 2))  # three fresh initialisations
        >>> sorted(result), result["accuracies"]
        (['accuracies', 'accuracy', 'accuracy_std'], [1.0, 1.0, 1.0])
    """
    if not seeds:
        raise HypergradientError(
            "hypergradient.hparams.evaluate_distilled(seeds=()): give at least one seed."
        )
    forward = as_function(model)
    accs = []
    for seed in seeds:
        w = retrain_on_distilled(
            model,
            hyper,
            hparams,
            steps=steps,
            lr=lr,
            momentum=momentum,
            init=init,
            seed=seed,
            criterion=criterion,
        )
        accs.append(accuracy(forward, w, x_test, y_test))
    t = torch.tensor(accs, dtype=torch.float64)
    std = float(t.std()) if len(accs) > 1 else 0.0
    return {"accuracy": float(t.mean()), "accuracy_std": std, "accuracies": accs}
