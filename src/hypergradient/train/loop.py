"""``BilevelTrainer``: alternate inner steps of a user's optimizer with hyper-steps.

One loop serves every recipe::

    trainer = hg.BilevelTrainer(model, hg.hparams.WeightDecay("per_weight"),
                                train_loader, val_loader,
                                torch.optim.SGD(model.parameters(), lr=0.1))
    history = trainer.fit(hyper_steps=200)

* **warm start** (default, Lorraine et al. 2020 Alg. 1): the weights keep training; every
  ``hyper_every`` inner steps one hyper-step differentiates the validation loss at the current
  weights and updates the hyperparameters;
* **cold start** (``warm_start=False``, Vicol et al. 2022): before every hyper-step the model
  *and the optimizer state* are reset to their initial values and retrained for
  ``cold_start_steps`` inner steps, or, with ``cold_start_tol``, until the training
  gradient's norm is at most that tolerance (the inner problem re-solved).

Both levels use mini-batches from the loaders (one fresh training and one fresh validation
batch per hyper-step).  Batches are drawn in a reproducible order (each epoch's shuffle is
seeded from ``seed``), which is what makes :meth:`BilevelTrainer.fit` with a checkpoint resume
to the same result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import HypergradientError
from .._io import RunLock, load_checkpoint, save_atomic, write_text_atomic
from .._threads import threads_for, torch_threads
from ..hparams._base import AbstractHyperparameter
from ..hypergrad.implicit import ConvergenceWarning
from ..hypergrad.methods import AbstractHypergradientMethod, Implicit, Unrolled
from ..linalg.operators import GaussNewtonLoss
from ..problem import as_function
from ..problem._functional import uncompiled

_WHERE = "hypergradient.BilevelTrainer"


class BatchStream:
    """Endless, reproducible batches from a data loader (or any re-iterable).

    Epoch ``e`` is iterated with the global torch RNG temporarily seeded to ``seed + e`` (so a
    ``DataLoader(shuffle=True)`` draws the same permutation every time), and the position is
    ``(epoch, batches consumed)``: enough to restore the stream exactly after a restart.

    Examples:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from hypergradient.train import BatchStream
        >>> loader = DataLoader(TensorDataset(torch.arange(5)), batch_size=2, shuffle=True)
        >>> stream = BatchStream(loader, seed=0)
        >>> sizes = [len(stream.next()[0]) for _ in range(4)]  # 3 batches per epoch, endless
        >>> sizes, stream.state_dict()
        ([2, 2, 1, 2], {'epoch': 1, 'consumed': 1})
        >>> restored = BatchStream(loader, seed=0)
        >>> restored.load_state_dict(stream.state_dict())  # e.g. after a restart
        >>> bool(torch.equal(restored.next()[0], stream.next()[0]))
        True
    """

    def __init__(self, loader: Iterable, seed: int = 0):
        self.loader = loader
        self.seed = seed
        self.epoch = 0
        self.consumed = 0
        self._iter = None

    def _start_epoch(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 100_003 + self.epoch)
            it = iter(self.loader)
            # a sampler draws its seed lazily, on the first batch: take it inside the fork
            try:
                first = next(it)
            except StopIteration:
                raise HypergradientError(
                    f"{_WHERE}: a data loader yielded no batch; give it at least one example."
                ) from None
        self._iter = it
        return first

    def next(self):
        if self._iter is None:
            # fresh start or restored position: replay the epoch's order up to `consumed`
            batch = self._start_epoch()
            try:
                for _ in range(self.consumed):
                    batch = next(self._iter)
            except StopIteration:
                self.epoch, self.consumed = self.epoch + 1, 0
                batch = self._start_epoch()
            self.consumed += 1
            return batch
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch += 1
            self.consumed = 0
            batch = self._start_epoch()
        self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.consumed, self._iter = int(state["epoch"]), int(state["consumed"]), None


def _default_hyper_optimizer(hparams: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.Adam(hparams, lr=1e-2)


def _check_cold_start_tol(tol: object, warm_start: bool, autocast: object) -> None:
    """``cold_start_tol``: None, or a finite float > 0 for a cold-start trainer without
    float16 loss scaling (its gradients are scaled, so their norm means nothing)."""
    if tol is None:
        return
    if (
        not isinstance(tol, (int, float))
        or isinstance(tol, bool)
        or not math.isfinite(tol)
        or tol <= 0
    ):
        raise HypergradientError(
            f"{_WHERE}(cold_start_tol={tol!r}): expected a finite number > 0 (the training "
            f"gradient norm at which a cold start stops retraining), or None for "
            f"cold_start_steps steps."
        )
    if warm_start:
        raise HypergradientError(
            f"{_WHERE}(cold_start_tol={tol!r}, warm_start=True): the tolerance is for cold "
            f"start, which re-solves the inner problem before every hyper-step; pass "
            f"warm_start=False."
        )
    if autocast is torch.float16:
        raise HypergradientError(
            f"{_WHERE}(cold_start_tol={tol!r}, autocast=torch.float16): float16 loss scaling "
            f"scales the gradients whose norm the tolerance is for; use "
            f"autocast=torch.bfloat16 or cold_start_steps."
        )


def _check_reversible_optimizer(method: AbstractHypergradientMethod, optimizer) -> None:
    """``Unrolled(mode="reversible")`` reverses ``torch.optim.SGD`` steps bit for bit; refuse
    an inner optimizer whose steps its look-ahead would not be (one line, with the fix)."""
    if not (isinstance(method, Unrolled) and method.mode == "reversible"):
        return
    where = f"{_WHERE}(method=Unrolled(mode='reversible'), optimizer={type(optimizer).__name__})"
    if not isinstance(optimizer, torch.optim.SGD):
        raise HypergradientError(
            f"{where}: exact reversal reverses torch.optim.SGD steps (momentum, dampening 0), "
            f"not {type(optimizer).__name__}'s. Use torch.optim.SGD(model.parameters(), lr=..., "
            f"momentum=0.9) as the inner optimizer, or Unrolled(mode='reverse'), whose "
            f"look-ahead SGD steps only approximate another optimizer's."
        )
    groups = optimizer.param_groups
    for i, group in enumerate(groups):
        extras = {
            k: group.get(k)
            for k in ("dampening", "weight_decay", "nesterov")
            if group.get(k) not in (None, 0, 0.0, False)
        }
        if extras:
            raise HypergradientError(
                f"{where}: param group {i} sets {extras}; the reversed steps are plain SGD "
                f"with momentum (dampening 0, weight_decay 0, no Nesterov). Drop those options "
                f"(a decay belongs in the hyperparameters, e.g. hg.hparams.WeightDecay)."
            )

    def lr_momentum(group) -> tuple[float, float]:
        lr = group.get("lr", 0.0)
        return float(lr.item() if isinstance(lr, torch.Tensor) else lr), float(
            group.get("momentum", 0.0) or 0.0
        )

    if len({lr_momentum(g) for g in groups}) > 1:
        raise HypergradientError(
            f"{where}: the param groups have different (lr, momentum) "
            f"{[lr_momentum(g) for g in groups]}; the look-ahead steps use one learning rate "
            f"and momentum for every weight. Use one param group (or per-tensor schedules "
            f"with hg.reversible_hypergrad directly)."
        )


class BilevelTrainer:
    """Bilevel training of ``model`` and the hyperparameters of ``hyper``.

    Args:
        model: the user's ``nn.Module`` (its parameters are the inner variables).
        hyper: an :class:`~hypergradient.hparams.AbstractHyperparameter` (weight decay,
            distilled data, augmentation network, example weights, ...).
        train_loader: yields training batches ``(x, y, ...)`` (may be ``None`` when the
            hyperparameters replace the training data, e.g. dataset distillation).
        val_loader: yields validation batches ``(x, y)``.
        optimizer: a ``torch.optim`` optimizer over ``model.parameters()`` (the inner solver).
            Its first parameter group's ``lr`` (and ``momentum``) are what unrolled methods
            differentiate through and what Neumann uses as its step.
        hyper_optimizer: ``factory(list_of_hparam_tensors) -> torch.optim.Optimizer``
            (default ``Adam(lr=1e-2)``).
        method: how to differentiate: ``hg.Implicit(...)`` (default: Neumann, 10 terms) or
            ``hg.Unrolled(steps=K, mode="reverse"|"forward"|"reversible")``.  With
            ``hg.Unrolled(..., fresh_batches=True)`` each hyper-step draws ``K`` fresh
            training batches, one per look-ahead step (mini-batch SGD, as Maclaurin et al.
            reversed it); ``mode="reversible"`` needs a plain ``torch.optim.SGD`` optimizer.
        hyper_every: inner steps between hyper-steps (warm start).
        warm_start: ``False`` for cold start: reset model and optimizer, then train
            ``cold_start_steps`` inner steps before every hyper-step.
        cold_start_steps: inner steps per cold-start retraining (default ``hyper_every``).
        cold_start_tol: cold start only: instead of ``cold_start_steps`` steps, retrain until
            ``||grad_w L_train(w)||_2 <= cold_start_tol`` (the Euclidean norm over
            the optimizer's parameters, of the gradient a step computes, measured before that
            step: training stops at the first weights that meet it, without stepping).  With
            mini-batches this is the mini-batch gradient; use one full batch (or
            ``train_loader=None``, e.g. distillation) to re-solve the whole training problem.
            Every history record gets ``cold_start_steps_taken``, ``cold_start_grad_norm``
            and ``cold_start_converged``.
        cold_start_max_steps: guard for ``cold_start_tol``: at most this many inner steps
            per retraining (default 10,000); if the tolerance is not met by then, a
            :class:`~hypergradient.ConvergenceWarning` names the hyper-step, the norm reached
            and the fix, and the record says ``cold_start_converged: False``.
        criterion: ``criterion(outputs, targets, reduction=...)`` (default cross-entropy); the
            validation loss is its mean over a validation batch.
        callbacks: ``callback(trainer, record)`` called after every hyper-step with the
            logged record (a dict).
        log_dir: if given, every hyper-step is appended to ``log_dir/hyper_steps.jsonl`` (and
            to TensorBoard when the ``tensorboard`` package is installed).
        seed: seeds the order of the batches.
        wrap_loss: ``wrap_loss(loss, batch_size) -> loss``, applied to every training and
            validation loss the trainer evaluates (``loss(params, hparams) -> scalar`` on a
            batch of ``batch_size`` examples).  ``hg.distributed.DataParallel()`` makes them
            global losses over the ranks of a ``torchrun`` job (data-parallel training).
        divergence_factor: stop with one :class:`~hypergradient.HypergradientError` as soon as
            an inner step's training loss is not finite or exceeds ``divergence_factor`` times
            its running level (the larger of the first hyper-step's training loss and the
            median of the last 10), naming the hyper-step and the losses.  As the
            hyperparameters move, the inner step can become unstable (e.g. SGD with a decay
            above ``2 / lr``); the loss then grows geometrically, and this catches it within
            a few inner steps instead of many hyper-steps later.  ``None``: only non-finite
            losses stop the run.
        threads: torch intra-op threads during :meth:`fit` (restored afterwards); ``None``
            or 0: chosen by model size (one below a million parameters, where a second
            thread gains nothing and spin-waits on a busy machine; torch's setting above).
            Every history record says how many were used (``threads``).
        hypergrad_resample_every: hyper-steps between fresh draws of the training and
            validation batch that the hypergradient is computed on (default 1: fresh batches
            at every hyper-step).  Above 1 the same two batches are reused, so the linear
            system of an implicit hypergradient changes only with the weights and
            hyperparameters between draws: what lets
            :class:`~hypergradient.AmortizedImplicit`'s warm-started solve stay accurate on
            a few Hessian-vector products (a fresh batch moves the solution as much as a
            restart).  The inner training steps always see fresh batches.
        val_mode: how the validation loss sees the model: ``"eval"`` (default: BatchNorm
            with its running statistics, no dropout -- the model as it will be used) or
            ``"train"`` (batch statistics, dropout on).  The training loss inside a
            hypergradient always sees the model as a training step does (``"train"``).

    Mixed precision: ``autocast=torch.bfloat16`` (CPU or GPU) or ``torch.float16`` runs the
    training steps' forward passes under :func:`torch.autocast` on the model's device (float16
    with a :class:`torch.amp.GradScaler`, unscaled before the penalty's closed-form gradient is
    added).  Hypergradients are computed in the model's own dtype, outside autocast: their
    Hessian-vector products and linear solves need more than bfloat16's 8 bits of mantissa.
    Their accuracy against a float32 run is measured in ``tests/test_autocast.py``.

    Buffers and randomness: a hypergradient never writes to the model.  Its forward passes
    work on copies of the buffers (:func:`~hypergradient.as_function`), so running statistics
    advance only on the real training steps, exactly as in plain training, and no validation
    example enters them; its dropout masks come from a generator seeded by ``seed`` and the
    hyper-step, drawn once per forward pass (every Hessian-vector product of one solve reuses
    that pass, hence its mask), and the global random state is restored afterwards, so the
    training steps draw the same masks as plain training would.

    Cost per hyper-step: ``hyper_every`` ordinary training steps plus one hypergradient (see
    the method); memory: the model, one hyperparameter tensor per hyperparameter and the
    method's working set (one retained gradient graph for implicit methods).

    Examples:
        A per-weight decay of a linear classifier, 3 hyper-steps of 2 inner steps:

        >>> import torch
        >>> import hypergradient as hg
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> loader = DataLoader(data, batch_size=16, shuffle=True)
        >>> model = torch.nn.Linear(4, 3)
        >>> trainer = hg.BilevelTrainer(
        ...     model, hg.hparams.WeightDecay(), loader, loader,
        ...     torch.optim.SGD(model.parameters(), lr=0.1), hyper_every=2,
        ... )
        >>> history = trainer.fit(hyper_steps=3)
        >>> len(history), trainer.inner_step  # hyper-steps and inner steps done
        (3, 6)
        >>> {name: tuple(h.shape) for name, h in trainer.hparams.items()}  # one decay per weight
        {'log_wd.weight': (3, 4), 'log_wd.bias': (3,)}
        >>> sorted(k for k in history[-1] if k.endswith("loss"))
        ['train_loss', 'val_loss']
    """

    def __init__(
        self,
        model: nn.Module,
        hyper: AbstractHyperparameter,
        train_loader: Iterable | None,
        val_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        *,
        hyper_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        method: AbstractHypergradientMethod | None = None,
        hyper_every: int = 10,
        warm_start: bool = True,
        cold_start_steps: int | None = None,
        cold_start_tol: float | None = None,
        cold_start_max_steps: int = 10_000,
        criterion: Callable[..., torch.Tensor] = F.cross_entropy,
        callbacks: Iterable[Callable[[BilevelTrainer, dict], None]] = (),
        log_dir: str | os.PathLike | None = None,
        seed: int = 0,
        wrap_loss: Callable[[Callable, int], Callable] | None = None,
        divergence_factor: float | None = 1e3,
        threads: int | None = None,
        hypergrad_resample_every: int = 1,
        val_mode: str = "eval",
        autocast: torch.dtype | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise HypergradientError(
                f"{_WHERE}(model=...): expected an nn.Module, got {type(model).__name__}."
            )
        if not isinstance(hyper, AbstractHyperparameter):
            raise HypergradientError(
                f"{_WHERE}(hyper=...): expected a hyperparameter kind such as "
                f"hg.hparams.WeightDecay(), got {type(hyper).__name__}."
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise HypergradientError(
                f"{_WHERE}(optimizer=...): expected a torch.optim.Optimizer over "
                f"model.parameters(), got {type(optimizer).__name__}."
            )
        if train_loader is None and hyper.uses_training_data:
            raise HypergradientError(
                f"{_WHERE}(train_loader=None): {type(hyper).__name__} trains on real data; "
                f"pass a training data loader."
            )
        for name, value in (
            ("hyper_every", hyper_every),
            ("cold_start_steps", cold_start_steps),
            ("cold_start_max_steps", cold_start_max_steps),
            ("hypergrad_resample_every", hypergrad_resample_every),
        ):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise HypergradientError(f"{_WHERE}({name}={value!r}): expected an int >= 1.")
        method = Implicit() if method is None else method
        if not isinstance(method, AbstractHypergradientMethod):
            raise HypergradientError(
                f"{_WHERE}(method=...): expected hg.Implicit(...) or hg.Unrolled(...), got "
                f"{type(method).__name__}."
            )
        _check_reversible_optimizer(method, optimizer)
        self.model = model
        # a torch.compile'd model trains compiled; names, state and every functional call
        # (hypergradients differentiate twice, which compiled graphs cannot) use the original
        self._module = uncompiled(model)
        self.hyper = hyper
        self.optimizer = optimizer
        self.method = method
        self.hyper_every = hyper_every
        self.hypergrad_resample_every = hypergrad_resample_every
        # the (training, validation) batches of the hypergradient and the hyper-step they
        # were drawn at; redrawn every hypergrad_resample_every hyper-steps
        self._hypergrad_batches: tuple[Any, Any] | None = None
        self._hypergrad_batches_drawn_at = 0
        self.warm_start = warm_start
        self.cold_start_steps = cold_start_steps or hyper_every
        _check_cold_start_tol(cold_start_tol, warm_start, autocast)
        self.cold_start_tol = None if cold_start_tol is None else float(cold_start_tol)
        self.cold_start_max_steps = cold_start_max_steps
        self._cold_start_info: dict[str, Any] = {}
        self._inner_grad_norm = math.nan  # of the last gradient inner_steps(stop_below=) saw
        self.criterion = criterion
        self.callbacks = list(callbacks)
        self.wrap_loss = wrap_loss
        if divergence_factor is not None and (
            not isinstance(divergence_factor, (int, float))
            or isinstance(divergence_factor, bool)
            or not math.isfinite(divergence_factor)
            or divergence_factor <= 1
        ):
            raise HypergradientError(
                f"{_WHERE}(divergence_factor={divergence_factor!r}): expected a finite number "
                f"> 1 or None."
            )
        self.divergence_factor = divergence_factor
        threads_for(0, threads)  # validates it
        self.threads = threads
        self._hypergrad_info: dict[str, float] = {}
        if val_mode not in ("eval", "train"):
            raise HypergradientError(
                f"{_WHERE}(val_mode={val_mode!r}): expected 'eval' (running statistics, no "
                f"dropout) or 'train' (batch statistics, dropout on)."
            )
        self.val_mode = val_mode
        self.seed = seed
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise HypergradientError(
                f"{_WHERE}(autocast={autocast!r}): expected None, torch.bfloat16 or torch.float16."
            )
        self.autocast = autocast
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._device_type = device.type
        self._scaler = (
            torch.amp.GradScaler(self._device_type) if autocast is torch.float16 else None
        )
        self.forward = as_function(model)
        self._forward_train = as_function(model, mode="train")
        self._forward_val = as_function(model, mode=val_mode)
        params = {k: v.detach() for k, v in self._module.named_parameters()}
        self.hparams = {
            k: v.detach().clone().requires_grad_(True) for k, v in hyper.init(params).items()
        }
        factory = hyper_optimizer or _default_hyper_optimizer
        self.hyper_optimizer = factory(list(self.hparams.values()))
        self.train_stream = BatchStream(train_loader, seed) if train_loader is not None else None
        # the hypergradient's training batches come from a stream of their own, so the
        # training steps see exactly the batches plain training would
        self.hypergrad_train_stream = (
            BatchStream(train_loader, seed + 2) if train_loader is not None else None
        )
        self.val_stream = BatchStream(val_loader, seed + 1)
        # cold start resets to these; warm start never does, so it keeps no extra model copy
        self._initial_model = None if warm_start else copy.deepcopy(model.state_dict())
        self._initial_optimizer = None if warm_start else copy.deepcopy(optimizer.state_dict())
        self.inner_step = 0
        self.hyper_step = 0
        self.history: list[dict[str, Any]] = []
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._tensorboard = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            try:  # optional: only when the tensorboard package is installed
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.log_dir / "tensorboard"))
            except ImportError:
                self._tensorboard = None

    # ------------------------------------------------------------------ inner level
    def _train_batch(self):
        return self.train_stream.next() if self.train_stream is not None else None

    def _wrap(self, loss: Callable, batch: Any) -> Callable:
        """``loss`` through ``wrap_loss`` (given the batch's number of examples), if set."""
        if self.wrap_loss is None:
            return loss
        return self.wrap_loss(loss, 1 if batch is None else len(batch[0]))

    def _detached_hparams(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.hparams.items()}

    def inner_steps(self, steps: int, *, stop_below: float | None = None) -> float:
        """``steps`` ordinary optimizer steps on the training loss; returns the last loss.

        ``stop_below``: before each step, measure the norm of the gradient it computed (over
        the optimizer's parameters) and stop, without stepping, once it is ``<= stop_below``
        (the norm is left in ``self._inner_grad_norm``).

        The hyperparameters are constants here, so a kind that offers
        :meth:`~hypergradient.hparams.AbstractHyperparameter.split_training_loss` gets its
        penalty's gradient added in closed form (the same step, without the penalty's graph).
        """
        hp = self._detached_hparams()
        split = self.hyper.split_training_loss(hp)
        params = dict(self._module.named_parameters())

        def forward(p, x):
            # the model's own parameters: call it directly (functional_call would swap them in)
            return self.model(x) if p is params else self.forward(p, x)

        loss_value = math.nan
        limit = self._divergence_limit()
        recent: list[float] = []
        self.model.train()
        scaler = self._scaler
        for i in range(steps):
            batch = self._train_batch()
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                if split is None:
                    loss = self._wrap(
                        lambda p, h, b=batch: self.hyper.training_loss(
                            forward, p, h, b, self.criterion
                        ),
                        batch,
                    )(params, hp)
                else:
                    loss = self._wrap(
                        lambda p, h, b=batch: split.data_loss(forward, p, b, self.criterion),
                        batch,
                    )(params, {})
            (loss if scaler is None else scaler.scale(loss)).backward()
            if split is not None:
                if scaler is not None:
                    scaler.unscale_(self.optimizer)  # the penalty's gradient is unscaled
                split.add_penalty_gradient(params)
                if i == steps - 1 or stop_below is not None:  # log the unsplit path's loss
                    loss = loss + split.penalty(params)
            if stop_below is not None:
                self._inner_grad_norm = self._optimizer_grad_norm()
                if self._inner_grad_norm <= stop_below:  # re-solved: these weights are kept
                    self.optimizer.zero_grad(set_to_none=True)
                    loss_value = float(loss.detach())
                    break
            if scaler is None:
                self.optimizer.step()
            else:
                scaler.step(self.optimizer)
                scaler.update()
            self.inner_step += 1
            loss_value = float(loss.detach())
            recent = [*recent[-4:], loss_value]
            if limit is None and not self.history and math.isfinite(loss_value):
                limit = self._divergence_limit(first=loss_value)  # no history yet: this loss
            if not math.isfinite(loss_value) or (limit is not None and loss_value > limit):
                self._raise_diverged(recent, limit)
        return loss_value

    def _running_loss_level(self) -> float | None:
        """The training loss's running level: the larger of the first hyper-step's and the
        median of the last 10 hyper-steps' (from the history, so a resumed run agrees)."""
        if not self.history:
            return None

        def finite(records) -> list[float]:
            values = (r.get("train_loss") for r in records)
            return [abs(x) for x in values if isinstance(x, (int, float)) and math.isfinite(x)]

        first, last = finite(self.history[:1]), sorted(finite(self.history[-10:]))
        if not last:
            return None
        return max([*first, last[len(last) // 2]])

    def _divergence_limit(self, first: float | None = None) -> float | None:
        """Training losses above this mean the inner step has gone unstable (None: no limit)."""
        if self.divergence_factor is None:
            return None
        level = self._running_loss_level()
        if level is None and first is not None:
            level = abs(first)
        if level is None or level == 0:
            return None
        return self.divergence_factor * level

    def _raise_diverged(self, recent: list[float], limit: float | None) -> None:
        if math.isfinite(recent[-1]) and limit is not None:
            what = (
                f"reached {recent[-1]:.4g}, over {self.divergence_factor:g} x its running "
                f"level {limit / self.divergence_factor:.4g}"
            )
        else:
            level = self._running_loss_level()
            what = f"is {recent[-1]} (not finite)" + (
                "" if level is None else f"; its running level was {level:.4g}"
            )
        described = self.hyper.describe(self.hparams)
        hparams_txt = (
            ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in described.items()
            )
            or "see trainer.hparams"
        )
        raise HypergradientError(
            f"{_WHERE}: the inner training diverged during hyper-step {self.hyper_step + 1} "
            f"(inner step {self.inner_step}): the training loss {what}; last losses "
            f"{', '.join(f'{x:.4g}' for x in recent)}; hyperparameters now: {hparams_txt}. "
            f"The inner step "
            f"became unstable as the hyperparameters moved (e.g. a weight decay above "
            f"2(1 + momentum) / lr for SGD). Fix: lower the hyper learning rate, bound the "
            f"hyperparameter (e.g. hg.hparams.WeightDecay(max_decay=...)), or lower the inner "
            f"learning rate."
        )

    def reset_inner(self) -> None:
        """Cold start: the model's initial weights and a fresh optimizer state."""
        if self._initial_model is None:
            raise HypergradientError(
                f"{_WHERE}.reset_inner(): this trainer was built with warm_start=True and kept "
                f"no copy of the initial state; build it with warm_start=False to reset."
            )
        self.model.load_state_dict(self._initial_model)
        self.optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer))

    def _optimizer_grad_norm(self) -> float:
        """Euclidean norm of the gradients held by the optimizer's parameters."""
        total = 0.0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    total += float(torch.sum(p.grad.detach().double() ** 2))
        return math.sqrt(total)

    def _resolve_inner(self) -> float:
        """Cold start with ``cold_start_tol``: train from the reset weights until the training
        gradient's norm is ``<= cold_start_tol`` (at most ``cold_start_max_steps`` steps)."""
        tol, limit = self.cold_start_tol, self.cold_start_max_steps
        first = self.inner_step
        train_loss = self.inner_steps(limit, stop_below=tol)
        taken = self.inner_step - first
        norm = self._inner_grad_norm  # at the last weights checked (before the last step)
        converged = norm <= tol
        if not converged:
            warnings.warn(
                f"{_WHERE}(cold_start_tol={tol:g}, cold_start_max_steps={limit}): hyper-step "
                f"{self.hyper_step + 1}: the cold-start retraining stopped at the step guard "
                f"with the training gradient's norm at {norm:.3g} > {tol:g} before its last "
                f"step; the hypergradient "
                f"is taken at weights that do not solve the inner problem. Fix: raise "
                f"cold_start_max_steps, raise the inner learning rate, or loosen "
                f"cold_start_tol.",
                ConvergenceWarning,
                stacklevel=3,
            )
        self._cold_start_info = {
            "cold_start_steps_taken": taken,
            "cold_start_grad_norm": norm,
            "cold_start_converged": converged,
        }
        return train_loss

    # ------------------------------------------------------------------ outer level
    def _optimizer_lr_momentum(self) -> tuple[float, float]:
        group = self.optimizer.param_groups[0]
        lr = group.get("lr", 0.0)
        lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        return lr, float(group.get("momentum", 0.0) or 0.0)

    def _gauss_newton_loss(self, train_batch) -> GaussNewtonLoss:
        split = self.hyper.gauss_newton_loss(self._forward_train, train_batch, self.criterion)
        if split is None:
            raise HypergradientError(
                f"{_WHERE}(method=...(hessian='gauss_newton')): {type(self.hyper).__name__} "
                f"offers no Gauss-Newton split of its training loss (gauss_newton_loss); use "
                f"hessian='exact' (with damping or solver='minres' if the Hessian is "
                f"indefinite)."
            )
        if self.wrap_loss is not None:
            raise HypergradientError(
                f"{_WHERE}(wrap_loss=..., method=...(hessian='gauss_newton')): a wrapped loss "
                f"cannot be split for the Gauss-Newton matrix; use hessian='exact'."
            )
        return split

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device_type, dtype=self.autocast)

    @contextlib.contextmanager
    def _hypergradient_rng(self):
        """The hypergradient's own random stream (dropout masks), seeded by ``seed`` and the
        hyper-step; the global state the training steps draw from is restored after."""
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((self.seed * 1_000_003 + self.hyper_step) % 2**63)
            yield

    def _fresh_batches(self) -> int | None:
        """``K`` when the method trains on ``K`` batches of its own (one per look-ahead step:
        ``method.train_batches``) and there is training data; else ``None`` (one batch)."""
        count = self.method.train_batches
        return count if count is not None and self.hypergrad_train_stream is not None else None

    def _hypergrad_data(self) -> tuple[Any, Any]:
        """The training and validation batch of this hyper-step's hypergradient: fresh ones,
        or the kept ones while they are younger than ``hypergrad_resample_every``.  A method
        with ``train_batches = K`` gets a list of ``K`` training batches instead of one."""
        kept = self._hypergrad_batches
        if kept is None or (
            self.hyper_step - self._hypergrad_batches_drawn_at >= self.hypergrad_resample_every
        ):
            train, count = self.hypergrad_train_stream, self._fresh_batches()
            if count is not None:
                train_data = [train.next() for _ in range(count)]
            else:
                train_data = train.next() if train is not None else None
            kept = (train_data, self.val_stream.next())
            self._hypergrad_batches_drawn_at = self.hyper_step
            if self.hypergrad_resample_every > 1:  # kept only when reused
                self._hypergrad_batches = kept
        return kept

    def hypergradient(self) -> tuple[dict[str, torch.Tensor], float]:
        """The method's hypergradient at the current weights (on fresh batches, or the kept
        ones: see ``hypergrad_resample_every``); and the validation loss."""
        train_batch, val_batch = self._hypergrad_data()
        xv, yv = val_batch[0], val_batch[1]
        forward, criterion, hyper = self._forward_train, self.criterion, self.hyper
        forward_val = self._forward_val

        def inner_loss(p, h):
            return hyper.training_loss(forward, p, h, train_batch, criterion)

        extra: dict[str, Any] = {}
        if self._fresh_batches() is not None:  # one batch per look-ahead step: t -> batch

            def inner_loss(p, h, batch):
                return self._wrap(
                    lambda p_, h_: hyper.training_loss(forward, p_, h_, batch, criterion), batch
                )(p, h)

            extra["batches"] = train_batch.__getitem__
        elif getattr(self.method, "hessian", "exact") == "gauss_newton":
            inner_loss = self._gauss_newton_loss(train_batch)

        outer_values: list[float] = []

        val_mean = self._wrap(
            lambda p, h: criterion(forward_val(p, xv), yv, reduction="none").mean(), val_batch
        )

        def outer_loss(p, h):
            value = val_mean(p, h)
            outer_values.append(float(value.detach()))
            return value

        if not isinstance(inner_loss, GaussNewtonLoss) and not extra:
            inner_loss = self._wrap(inner_loss, train_batch)
        params = {k: v.detach() for k, v in self._module.named_parameters()}
        lr, momentum = self._optimizer_lr_momentum()
        grads, self._hypergrad_info = self.method.hypergrad_and_info(
            inner_loss,
            outer_loss,
            params,
            self._detached_hparams(),
            lr=lr,
            momentum=momentum,
            **extra,
        )
        if self.method.outer_at_params and outer_values:
            val_loss = outer_values[0]  # already evaluated there: no second forward pass
        else:
            with torch.no_grad():
                val_loss = float(outer_loss(params, self._detached_hparams()))
        return grads, val_loss

    def step(self) -> dict[str, Any]:
        """One outer iteration: inner training (warm or cold start), then one hyper-step."""
        start = time.perf_counter()
        if self.warm_start:
            train_loss = self.inner_steps(self.hyper_every)
        else:
            self.reset_inner()
            if self.cold_start_tol is None:
                train_loss = self.inner_steps(self.cold_start_steps)
            else:
                train_loss = self._resolve_inner()
        with self._hypergradient_rng():
            grads, val_loss = self.hypergradient()
        self.hyper_optimizer.zero_grad(set_to_none=True)
        for k, v in self.hparams.items():
            v.grad = grads[k].to(v.dtype)
        self.hyper_optimizer.step()
        with torch.no_grad():
            self.hyper.project(self.hparams)
        self.hyper_step += 1
        grad_norm = math.sqrt(sum(float(torch.sum(g.double() ** 2)) for g in grads.values()))
        record = {
            "hyper_step": self.hyper_step,
            "inner_step": self.inner_step,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "hypergrad_norm": grad_norm,
            "threads": torch.get_num_threads(),
            **self._hypergrad_info,  # e.g. Implicit's inner_grad_norm at the weights used
            **self._cold_start_info,  # cold_start_tol: steps taken, norm reached
            "seconds": time.perf_counter() - start,
            **self.hyper.describe(self.hparams),
        }
        self.history.append(record)
        for callback in self.callbacks:  # callbacks may add keys (e.g. test metrics) to log
            callback(self, record)
        self._log(record)
        return record

    def fit(
        self,
        hyper_steps: int,
        *,
        checkpoint: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """Run until ``hyper_steps`` hyper-steps are done in total; return the history.

        With ``checkpoint=path`` the full state is saved (atomically) after every hyper-step,
        so a killed run loses at most one hyper-step; ``resume=True`` first loads ``path`` if
        it exists and continues from there to the same result as an uninterrupted run. The
        checkpoint is refused (one line) when it belongs to another trainer (other model
        shapes, hyperparameters, optimizers or schedule), and ``path + ".lock"`` keeps a
        second process from running on the same checkpoint while this one does.
        """
        if not isinstance(hyper_steps, int) or hyper_steps < 0:
            raise HypergradientError(
                f"{_WHERE}.fit(hyper_steps={hyper_steps!r}): expected an int >= 0."
            )
        if resume and checkpoint is None:
            raise HypergradientError(
                f"{_WHERE}.fit(resume=True): resuming needs checkpoint=<path> to read from."
            )
        num_params = sum(p.numel() for p in self.model.parameters())
        with torch_threads(threads_for(num_params, self.threads)):
            return self._fit_locked(hyper_steps, checkpoint, resume, progress)

    def _fit_locked(self, hyper_steps, checkpoint, resume, progress) -> list[dict[str, Any]]:
        if checkpoint is None:
            return self._fit(hyper_steps, None, progress)
        # one process per checkpoint: a second one would interleave saves and log lines
        lock = Path(checkpoint).with_name(Path(checkpoint).name + ".lock")
        with RunLock(
            lock,
            f"{_WHERE}.fit(checkpoint={str(checkpoint)!r})",
            hint=" or pass another checkpoint path",
        ):
            if resume and Path(checkpoint).exists():
                self.load_checkpoint(checkpoint)
            elif self.log_dir is not None and self.hyper_step == 0:
                # a fresh run: the log of an earlier run in this folder must not mix in
                (self.log_dir / "hyper_steps.jsonl").unlink(missing_ok=True)
            return self._fit(hyper_steps, checkpoint, progress)

    def _fit(self, hyper_steps: int, checkpoint, progress: bool) -> list[dict[str, Any]]:
        bar = None
        if progress:
            from rich.progress import Progress

            bar = Progress()
            bar.start()
            task = bar.add_task("hyper-steps", total=hyper_steps, completed=self.hyper_step)
        try:
            while self.hyper_step < hyper_steps:
                self.step()
                if checkpoint is not None:
                    self.save_checkpoint(checkpoint)
                if bar is not None:
                    bar.update(task, completed=self.hyper_step)
        finally:
            if bar is not None:
                bar.stop()
        return self.history

    # ------------------------------------------------------------------ evaluation, logs
    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Mean loss and accuracy of the current model over a whole loader."""
        self.model.eval()
        total, loss_sum, correct = 0, 0.0, 0
        for batch in loader:
            x, y = batch[0], batch[1]
            out = self.model(x)
            loss_sum += float(self.criterion(out, y, reduction="sum"))
            if out.dim() == 2 and y.dim() == 1:
                correct += int((out.argmax(1) == y).sum())
            total += len(y)
        self.model.train()
        return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}

    def _log(self, record: dict[str, Any]) -> None:
        if self.log_dir is not None:
            with open(self.log_dir / "hyper_steps.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "hyper_step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record["hyper_step"])

    # ------------------------------------------------------------------ checkpoints
    def signature(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed by this trainer: the shapes of the
        model's parameters and buffers and of the hyperparameters, the kinds of the
        hyperparameter, optimizers and method, and the warm/cold-start schedule."""

        def shapes(named) -> dict[str, list[int]]:
            return {k: list(v.shape) for k, v in named}

        return {
            "trainer": "BilevelTrainer",
            "model": shapes(self._module.state_dict().items()),
            "hparams": shapes(self.hparams.items()),
            "hyper": type(self.hyper).__name__,
            "optimizer": type(self.optimizer).__name__,
            "hyper_optimizer": type(self.hyper_optimizer).__name__,
            "method": type(self.method).__name__,
            "warm_start": self.warm_start,
            "hyper_every": self.hyper_every,
            "cold_start_steps": self.cold_start_steps,
            **({} if self.cold_start_tol is None else {"cold_start_tol": self.cold_start_tol}),
            "hypergrad_resample_every": self.hypergrad_resample_every,
            "val_mode": self.val_mode,
            "autocast": None if self.autocast is None else str(self.autocast),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self._module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "hparams": self._detached_hparams(),
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "inner_step": self.inner_step,
            "hyper_step": self.hyper_step,
            # one JSON string: pickling thousands of small dicts on every save is quadratic
            "history": json.dumps(self.history),
            "train_stream": self.train_stream.state_dict() if self.train_stream else None,
            "val_stream": self.val_stream.state_dict(),
            "hypergrad_train_stream": (
                self.hypergrad_train_stream.state_dict() if self.hypergrad_train_stream else None
            ),
            "rng": torch.get_rng_state(),
            "method": self.method.state_dict(),
            "hypergrad_batches": None
            if self._hypergrad_batches is None
            else [list(b) if isinstance(b, (tuple, list)) else b for b in self._hypergrad_batches],
            "hypergrad_batches_drawn_at": self._hypergrad_batches_drawn_at,
            "grad_scaler": None if self._scaler is None else self._scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in self.hparams.items():
            if k not in state["hparams"] or state["hparams"][k].shape != v.shape:
                raise HypergradientError(
                    f"{_WHERE}.load_state_dict: the checkpoint's hyperparameters "
                    f"{sorted(state['hparams'])} do not match this trainer's "
                    f"{sorted(self.hparams)} (different recipe or config?)."
                )
        try:
            self._module.load_state_dict(state["model"])
        except RuntimeError as err:  # shapes or names: say so in one line
            raise HypergradientError(
                f"{_WHERE}.load_state_dict: the checkpoint's model does not fit this model "
                f"({' '.join(str(err).split())}); load it into the model it was saved from."
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for k, v in self.hparams.items():
                v.copy_(state["hparams"][k])
        self.hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        self.inner_step = int(state["inner_step"])
        self.hyper_step = int(state["hyper_step"])
        history = state["history"]
        self.history = json.loads(history) if isinstance(history, str) else list(history)
        if self.train_stream is not None and state["train_stream"] is not None:
            self.train_stream.load_state_dict(state["train_stream"])
        self.val_stream.load_state_dict(state["val_stream"])
        if self.hypergrad_train_stream is not None and state.get("hypergrad_train_stream"):
            self.hypergrad_train_stream.load_state_dict(state["hypergrad_train_stream"])
        torch.set_rng_state(state["rng"])
        self.method.load_state_dict(state.get("method", {}))
        kept = state.get("hypergrad_batches")
        self._hypergrad_batches = None if kept is None else (kept[0], kept[1])
        self._hypergrad_batches_drawn_at = int(state.get("hypergrad_batches_drawn_at", 0))
        if self._scaler is not None and state.get("grad_scaler"):
            self._scaler.load_state_dict(state["grad_scaler"])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write the state and :meth:`signature` to ``path`` atomically (a kill mid-write
        leaves the old file)."""
        save_atomic(self.state_dict(), path, signature=self.signature())

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore the state saved by :meth:`save_checkpoint`. The file is read with
        ``weights_only=True`` (a planted pickle is refused and runs nothing) and must carry
        this trainer's :meth:`signature`; either failure is one
        :class:`~hypergradient.HypergradientError`. The log in ``log_dir`` is rewritten to the
        checkpoint's history, so steps redone after a kill are not logged twice."""
        state = load_checkpoint(
            path, f"{_WHERE}.load_checkpoint({str(path)!r})", signature=self.signature()
        )
        self.load_state_dict(state)
        if self.log_dir is not None:
            write_text_atomic(
                self.log_dir / "hyper_steps.jsonl",
                "".join(json.dumps(r) + "\n" for r in self.history),
            )
