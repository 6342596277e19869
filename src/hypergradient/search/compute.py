r"""Compute accounting in *training-step equivalents*, shared by black-box and gradient tuning.

Comparing a hypergradient run with a black-box search "at equal compute" needs one unit for
both.  The unit is **one training step of the reference model**: one forward pass, one
backward pass and one optimizer update of a mini-batch of ``batch_size`` examples through a
model with ``num_weights`` weights.  Everything else is converted into it:

* **A training step of another model or batch size** costs
  :math:`\frac{B}{B_0}\cdot\frac{P}{P_0}` steps (``B`` examples through ``P`` weights, against
  the reference ``B_0``, ``P_0``): the multiply-adds of an MLP step are proportional to
  :math:`B\cdot P`.  So a batch of 16 counts a quarter step of a batch-64 reference, and one
  *epoch* costs the same at every batch size.
* **An evaluation** (forward pass only) of ``n`` examples costs
  :math:`\frac{n}{3B_0}\cdot\frac{P}{P_0}`: a forward pass is about a third of a
  forward + backward (the backward pass costs about twice the forward).
* **A hypergradient** counts its backward passes, one step each
  (:func:`hypergradient_cost`):

  - implicit, :math:`k` solver iterations (Neumann terms, CG/MINRES/GMRES iterations):
    :math:`k + 3` - one gradient of the training loss kept as a graph, :math:`k`
    Hessian-vector products through it, the validation gradient, and the mixed term
    :math:`\partial^2 L_\text{train}/\partial\lambda\,\partial w` applied to the solution;
    ``solver="exact"`` builds the dense Hessian with one product per weight
    (:math:`P + 3`); ``solver="identity"`` uses no product (3);
  - unrolled, reverse mode, :math:`T` look-ahead steps: :math:`2T + 2` (each step is a
    forward+backward with ``create_graph``, and back-propagating through it costs about one
    more);
  - unrolled, forward mode: :math:`2T` per scalar hyperparameter (one JVP sweep each).

  Measured against the same unit (``benchmarks/results/joint_training_cost.md``,
  ``hypergrad_cost.md``): the recipe's implicit 10-term Neumann hypergradient on digits takes
  13.6 plain SGD steps of wall time (counted: 13); the reverse-mode unroll with
  :math:`T = 10` takes 21.9 (counted: 22).

A :class:`ComputeMeter` adds these up as a run goes, by kind, so that a search and a
hypergradient run can be put on one compute axis.

Examples:
    >>> unit = StepUnit(batch_size=64, num_weights=9610)
    >>> unit.train_step(batch_size=16, num_weights=9610)  # a quarter of the reference batch
    0.25
    >>> round(unit.evaluation(300), 3)  # 300 validation examples, forward only
    1.562
    >>> from hypergradient import Implicit
    >>> hypergradient_cost(Implicit(solver="neumann", max_steps=10))
    13.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .._errors import HypergradientError

#: a forward pass costs about this fraction of a forward + backward + update
FORWARD_FRACTION = 1.0 / 3.0


def _positive(where: str, name: str, value: object) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise HypergradientError(f"{where}: `{name}` must be a positive number, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class StepUnit:
    """The reference training step: ``batch_size`` examples through ``num_weights`` weights.

    Its methods convert training steps and evaluations of any batch size and model size into
    reference steps (see the module docstring for the conversion).

    Examples:
        >>> from hypergradient import search
        >>> unit = search.StepUnit(batch_size=64, num_weights=1000)
        >>> unit.train_step()  # the reference step itself
        1.0
        >>> unit.train_step(batch_size=128, num_weights=2000)  # twice the batch, twice the model
        4.0
        >>> unit.evaluation(192)  # a forward pass over 3 batches: a third of a step each
        1.0
    """

    batch_size: int
    num_weights: int

    def __post_init__(self):
        _positive("search.StepUnit", "batch_size", self.batch_size)
        _positive("search.StepUnit", "num_weights", self.num_weights)

    def train_step(self, batch_size: int | None = None, num_weights: int | None = None) -> float:
        """One forward + backward + update of ``batch_size`` examples (defaults: reference)."""
        b = self.batch_size if batch_size is None else batch_size
        p = self.num_weights if num_weights is None else num_weights
        where = "search.StepUnit.train_step"
        return (
            _positive(where, "batch_size", b)
            / self.batch_size
            * (_positive(where, "num_weights", p) / self.num_weights)
        )

    def evaluation(self, n_examples: int, num_weights: int | None = None) -> float:
        """A forward pass over ``n_examples`` (no gradient)."""
        p = self.num_weights if num_weights is None else num_weights
        where = "search.StepUnit.evaluation"
        n = _positive(where, "n_examples", n_examples)
        ratio = _positive(where, "num_weights", p) / self.num_weights
        return FORWARD_FRACTION * n / self.batch_size * ratio


def hypergradient_cost(method: object, *, num_weights: int = 0, num_hparams: int = 1) -> float:
    """Training-step equivalents of one hypergradient of ``method`` (see the module docstring).

    Args:
        method: an :class:`~hypergradient.Implicit` or :class:`~hypergradient.Unrolled`.
        num_weights: weights of the model (only ``Implicit(solver="exact")`` needs it: one
            Hessian-vector product per weight).
        num_hparams: scalar hyperparameters (only forward-mode unrolling needs it: one JVP
            sweep per hyperparameter).

    Examples:
        >>> import hypergradient as hg
        >>> from hypergradient import search
        >>> search.hypergradient_cost(hg.Implicit(solver="neumann", max_steps=10))  # k + 3
        13.0
        >>> search.hypergradient_cost(hg.Unrolled(steps=5))  # reverse mode: 2T + 2
        12.0
        >>> search.hypergradient_cost(hg.Unrolled(steps=5, mode="forward"), num_hparams=3)
        30.0
        >>> search.hypergradient_cost(hg.Unrolled(steps=5, mode="reversible"))  # 3T + 2
        17.0
    """
    from ..hypergrad.methods import Implicit, Unrolled

    if isinstance(method, Implicit):
        if method.solver == "exact":
            if not isinstance(num_weights, int) or num_weights < 1:
                raise HypergradientError(
                    f"search.hypergradient_cost(Implicit(solver='exact')): the dense Hessian "
                    f"takes one product per weight; pass num_weights= (got {num_weights!r})."
                )
            return float(num_weights + 3)
        products = 0 if method.solver == "identity" else method.max_steps
        return float(products + 3)
    if isinstance(method, Unrolled):
        if method.mode == "reverse":
            return float(2 * method.steps + 2)
        if method.mode == "reversible":
            # reverse mode's 2T + 2, plus the gradient each reversed step recomputes
            return float(3 * method.steps + 2)
        if not isinstance(num_hparams, int) or num_hparams < 1:
            raise HypergradientError(
                f"search.hypergradient_cost(Unrolled(mode='forward')): one JVP sweep per "
                f"scalar hyperparameter; pass num_hparams= >= 1 (got {num_hparams!r})."
            )
        return float(2 * method.steps * num_hparams)
    raise HypergradientError(
        f"search.hypergradient_cost(method={type(method).__name__}): expected hg.Implicit(...) "
        f"or hg.Unrolled(...)."
    )


@dataclass
class ComputeMeter:
    """A running total of training-step equivalents, split by kind.

    ``meter.add("train", unit.train_step(), count=10)`` adds ten reference steps;
    ``meter.total`` is the sum over kinds, ``meter.by_kind`` the split.

    Examples:
        >>> from hypergradient import search
        >>> unit = search.StepUnit(batch_size=64, num_weights=1000)
        >>> meter = search.ComputeMeter()
        >>> meter.add("train", unit.train_step(), count=10)  # returns the new total
        10.0
        >>> meter.add("eval", unit.evaluation(192))
        11.0
        >>> meter.total, meter.by_kind
        (11.0, {'train': 10.0, 'eval': 1.0})
    """

    by_kind: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.by_kind.values()))

    def add(self, kind: str, cost: float, count: int = 1) -> float:
        """Add ``count`` events of ``cost`` steps each under ``kind``; returns the new total."""
        if not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
            raise HypergradientError(
                f"search.ComputeMeter.add({kind!r}): the cost must be a finite number >= 0, "
                f"got {cost!r}."
            )
        if not isinstance(count, int) or count < 0:
            raise HypergradientError(
                f"search.ComputeMeter.add({kind!r}): count must be an integer >= 0, got {count!r}."
            )
        self.by_kind[kind] = self.by_kind.get(kind, 0.0) + float(cost) * count
        return self.total
