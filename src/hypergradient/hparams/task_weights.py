r"""One weight per task (or per data source) in a multi-task training loss.

.. math::

    L(w, \lambda) = \sum_{t=1}^{T} \omega_t(\lambda)\, \bar\ell_t(w), \qquad
    \bar\ell_t = \operatorname{mean}_{i \in \text{batch},\ \text{task}(i)=t} \ell_i(w),

where a task absent from the batch contributes 0.  Each example carries its task id: the
training loader yields ``(x, y, task, ...)`` (e.g.
``hg.hparams.indexed_loader(x, y, task_ids, batch_size=...)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._errors import HypergradientError
from ._base import AbstractHyperparameter, per_example_loss

_WHERE = "hypergradient.hparams.TaskWeights"
_PARAMETRIZATIONS = ("softmax", "log")


@dataclass
class TaskWeights(AbstractHyperparameter):
    r"""Per-task loss weights :math:`\omega_t`, tuned on the validation loss.

    Args:
        num_tasks: ``T``, task ids are ``0..T-1``.
        parametrization: ``"softmax"``: :math:`\omega = T\,\mathrm{softmax}(\lambda)` (the
            weights always sum to ``T``: tuning moves weight between tasks, never scales the
            whole loss, i.e. the learning rate); ``"log"``: :math:`\omega_t = e^{\lambda_t}`
            (independent positive weights).
        task_position: where the task ids sit in a batch (default ``2``: ``(x, y, task)``).

    The hyperparameter is ``hparams["task_logits"]``, shape ``(T,)``, initially 0 (every
    weight 1); :meth:`weights` maps it to :math:`\omega`.

    Cost: ``T`` hyperparameters; a one-hot ``(B, T)`` matrix product per loss evaluation.

    Examples:
        >>> import torch
        >>> kind = TaskWeights(3)
        >>> h = kind.init({"w": torch.zeros(1, dtype=torch.float64)})
        >>> kind.weights(h).tolist()
        [1.0, 1.0, 1.0]
    """

    num_tasks: int
    parametrization: str = "softmax"
    task_position: int = 2

    def __post_init__(self):
        t = self.num_tasks
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            raise HypergradientError(f"{_WHERE}(num_tasks={t!r}): expected an int >= 1.")
        if self.parametrization not in _PARAMETRIZATIONS:
            raise HypergradientError(
                f"{_WHERE}(parametrization={self.parametrization!r}): expected one of "
                f"{list(_PARAMETRIZATIONS)}."
            )
        p = self.task_position
        if not isinstance(p, int) or isinstance(p, bool) or p < 2:
            raise HypergradientError(
                f"{_WHERE}(task_position={p!r}): expected an int >= 2 (x and y come first)."
            )

    def init(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = next(iter(params.values())).dtype
        return {"task_logits": torch.zeros(self.num_tasks, dtype=dtype)}

    def weights(self, hparams: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The task weights :math:`\\omega`, shape ``(T,)`` (differentiable in ``hparams``)."""
        raw = hparams["task_logits"]
        if self.parametrization == "softmax":
            return self.num_tasks * torch.softmax(raw, dim=0)
        return raw.exp()

    def _task_ids(self, batch) -> torch.Tensor:
        p = self.task_position
        if not isinstance(batch, (tuple, list)) or len(batch) <= p:
            got = f"a {type(batch).__name__}"
            if isinstance(batch, (tuple, list)):
                got += f" of {len(batch)} elements"
            raise HypergradientError(
                f"{_WHERE}.training_loss: batches must carry a task id per example at position "
                f"{p} ((x, y, task, ...)); got {got}. Build the loader with "
                f"hg.hparams.indexed_loader(x, y, task_ids, batch_size=...)."
            )
        task = batch[p]
        if not isinstance(task, torch.Tensor) or task.dtype not in (torch.int64, torch.int32):
            raise HypergradientError(
                f"{_WHERE}.training_loss: batch[{p}] must be an int64 tensor of task ids, got "
                f"{type(task).__name__}"
                f"{'' if not isinstance(task, torch.Tensor) else ' of dtype ' + str(task.dtype)}."
            )
        if task.numel() and (int(task.min()) < 0 or int(task.max()) >= self.num_tasks):
            raise HypergradientError(
                f"{_WHERE}.training_loss: task ids range over [{int(task.min())}, "
                f"{int(task.max())}]; expected ids in [0, num_tasks={self.num_tasks})."
            )
        return task.long()

    def training_loss(self, forward, params, hparams, batch, criterion=F.cross_entropy):
        task = self._task_ids(batch)
        losses = per_example_loss(criterion, forward(params, batch[0]), batch[1])
        onehot = F.one_hot(task, self.num_tasks).to(losses.dtype)  # (B, T)
        means = (losses @ onehot) / onehot.sum(0).clamp_min(1.0)  # absent task: 0 / 1
        return torch.sum(self.weights(hparams) * means)

    def describe(self, hparams):
        w = self.weights(hparams).detach().double()
        out = {"task_weight_min": float(w.min()), "task_weight_max": float(w.max())}
        if self.num_tasks <= 8:
            out.update({f"task_weight.{t}": float(v) for t, v in enumerate(w)})
        return out
