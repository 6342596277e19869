"""``RealTimeTrainer``: tune the learning rate, momentum (and a hyperparameter kind such as a
per-tensor decay) *during* one training run, by real-time forward-mode hypergradients
(RTHO; Franceschi et al. 2017).  The training-loop level of
:class:`~hypergradient.hypergrad.RealTime`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import HypergradientError
from ..hparams._base import AbstractHyperparameter
from ..hypergrad.real_time import RealTime, RealTimeState
from ..problem import as_function
from ..problem._functional import uncompiled
from .loop import BatchStream

_WHERE = "hypergradient.RealTimeTrainer"
TUNABLE = ("lr", "momentum")


def _inner_rule(optimizer: torch.optim.Optimizer) -> tuple[str, float, float, float, float]:
    """``(rule, lr, momentum or beta1, beta2, eps)`` of a supported ``torch.optim`` optimizer."""
    if len(optimizer.param_groups) != 1:
        raise HypergradientError(
            f"{_WHERE}(optimizer=...): the optimizer has {len(optimizer.param_groups)} "
            f"parameter groups; real-time tuning drives one learning rate and momentum, so "
            f"build it with a single group (model.parameters())."
        )
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if type(optimizer) is torch.optim.SGD:
        extras = {
            "nesterov": group.get("nesterov", False),
            "dampening": group.get("dampening", 0.0),
            "weight_decay": group.get("weight_decay", 0.0),
        }
        bad = {k: v for k, v in extras.items() if v}
        if bad:
            raise HypergradientError(
                f"{_WHERE}(optimizer=SGD(...)): unsupported options {bad}; real-time tuning "
                f"runs SGD with plain heavy-ball momentum. Drop them (put a decay in `hyper`, "
                f"e.g. hg.hparams.WeightDecay('per_tensor'))."
            )
        momentum = float(group.get("momentum", 0.0) or 0.0)
        return ("momentum" if momentum > 0 else "sgd"), lr, momentum, 0.0, 0.0
    if type(optimizer) is torch.optim.Adam:
        bad = {k: group[k] for k in ("weight_decay", "amsgrad", "maximize") if group.get(k)}
        if bad:
            raise HypergradientError(
                f"{_WHERE}(optimizer=Adam(...)): unsupported options {bad}; drop them (put a "
                f"decay in `hyper`, e.g. hg.hparams.WeightDecay('per_tensor'))."
            )
        beta1, beta2 = (float(b) for b in group["betas"])
        return "adam", lr, beta1, beta2, float(group["eps"])
    raise HypergradientError(
        f"{_WHERE}(optimizer={type(optimizer).__name__}): unsupported inner optimizer; "
        f"expected torch.optim.SGD (with or without momentum) or torch.optim.Adam, whose "
        f"steps real-time tuning differentiates."
    )


class RealTimeTrainer:
    r"""Real-time hyperparameter optimisation of ``model``: one training run, tuned as it goes.

    Every inner step is an optimizer step on a training batch that also pushes the tangents
    :math:`Z_t = d(w_t, \text{buffers}_t)/d\lambda` forward (:class:`~hypergradient.hypergrad.
    RealTime`); every ``hyper_every`` steps the hypergradient of the loss on a fresh validation
    batch, :math:`\nabla_w E^\top Z^w_t`, takes one hyper-optimizer step.  The model is never
    restarted and the tangents are never reset.

    Tuned hyperparameters (in :attr:`hparams`): ``"log_lr"`` (:math:`\eta = e^{\lambda}`) when
    ``"lr"`` is in ``tune``, ``"logit_momentum"`` (:math:`\mu = \sigma(\lambda)`, Adam's
    :math:`\beta_1`) when ``"momentum"`` is, and those of ``hyper`` (e.g.
    ``hg.hparams.WeightDecay("per_tensor")``: ``"log_wd.<name>"``).

    Args:
        model: the ``nn.Module`` to train; its weights are written back after every
            hyper-step (and at the end of :meth:`fit`).
        train_loader: yields training batches ``(x, y, ...)``.
        val_loader: yields validation batches ``(x, y)``.
        optimizer: ``torch.optim.SGD`` (momentum 0: SGD; > 0: heavy ball) or
            ``torch.optim.Adam`` over ``model.parameters()`` with one group: it gives the rule
            and the initial ``lr``/``momentum`` (``betas[0]``), and after every hyper-step its
            group holds the current values.  Its own ``step`` is not used.
        tune: which of ``"lr"``, ``"momentum"`` to tune (``()`` with ``hyper`` to tune only
            the kind's hyperparameters).
        hyper: optional :class:`~hypergradient.hparams.AbstractHyperparameter` whose
            training loss is used (default: ``criterion`` alone).
        hyper_optimizer: ``factory(list_of_hparam_tensors) -> torch.optim.Optimizer``
            (default ``Adam(lr=1e-2)``).
        hyper_every: inner steps between hyper-steps.
        criterion: ``criterion(outputs, targets, reduction=...)`` (default cross-entropy).
        seed: seeds the order of the batches (as :class:`~hypergradient.BilevelTrainer`).

    Running statistics (BatchNorm) are read but not advanced: the steps are functional.

    Cost per inner step: about 6 plain training steps for 2 scalar hyperparameters (one
    ``vmap`` of forward-over-reverse JVPs; MNIST MLP on one CPU thread,
    ``benchmarks/real_time.py``); per hyper-step one validation gradient.  Memory:
    ``m + 1`` copies of the weights and optimizer buffers for ``m`` scalar hyperparameters.
    Suited to a few hyperparameters; many (per-weight decays) need reverse mode.

    Examples:
        >>> import torch, hypergradient as hg
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> loader = DataLoader(data, batch_size=16, shuffle=True)
        >>> model = torch.nn.Linear(4, 3)
        >>> trainer = hg.train.RealTimeTrainer(
        ...     model, loader, loader, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
        ...     hyper_every=2)
        >>> history = trainer.fit(hyper_steps=3)
        >>> len(history), trainer.inner_step, sorted(trainer.hparams)
        (3, 6, ['log_lr', 'logit_momentum'])
        >>> trainer.optimizer.param_groups[0]["lr"] == history[-1]["lr"]  # tuned value
        True

    References:
        Franceschi, Donini, Frasconi, Pontil (2017), Forward and Reverse Gradient-Based
        Hyperparameter Optimization, ICML.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        val_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        *,
        tune: tuple[str, ...] = TUNABLE,
        hyper: AbstractHyperparameter | None = None,
        hyper_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        hyper_every: int = 10,
        criterion: Callable[..., torch.Tensor] = F.cross_entropy,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise HypergradientError(
                f"{_WHERE}(model=...): expected an nn.Module, got {type(model).__name__}."
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise HypergradientError(
                f"{_WHERE}(optimizer=...): expected torch.optim.SGD or torch.optim.Adam over "
                f"model.parameters(), got {type(optimizer).__name__}."
            )
        rule, lr, momentum, beta2, eps = _inner_rule(optimizer)
        if isinstance(tune, str) or not all(name in TUNABLE for name in tune):
            raise HypergradientError(
                f"{_WHERE}(tune={tune!r}): expected a tuple of names from {list(TUNABLE)}."
            )
        if "momentum" in tune and rule == "sgd":
            raise HypergradientError(
                f"{_WHERE}(tune={tune!r}): the optimizer is SGD without momentum, so there is "
                f"no momentum to tune; build it with momentum > 0 (e.g. 0.5) or drop "
                f"'momentum' from tune."
            )
        if "lr" in tune and not lr > 0:
            raise HypergradientError(
                f"{_WHERE}: tuning lr needs an initial lr > 0 (it is tuned as log lr), got {lr}."
            )
        if "momentum" in tune and not 0 < momentum < 1:
            raise HypergradientError(
                f"{_WHERE}: tuning momentum needs an initial value in (0, 1) (it is tuned as "
                f"its logit), got {momentum}."
            )
        if hyper is not None and not isinstance(hyper, AbstractHyperparameter):
            raise HypergradientError(
                f"{_WHERE}(hyper=...): expected None or a hyperparameter kind such as "
                f"hg.hparams.WeightDecay('per_tensor'), got {type(hyper).__name__}."
            )
        if not tune and hyper is None:
            raise HypergradientError(
                f"{_WHERE}(tune=(), hyper=None): nothing to tune; name 'lr' and/or 'momentum' "
                f"in tune, or pass a hyperparameter kind as hyper."
            )
        if not isinstance(hyper_every, int) or isinstance(hyper_every, bool) or hyper_every < 1:
            raise HypergradientError(
                f"{_WHERE}(hyper_every={hyper_every!r}): expected an int >= 1."
            )
        self.model, self.optimizer, self.hyper = model, optimizer, hyper
        self._module = uncompiled(model)
        self.hyper_every, self.criterion, self.seed = hyper_every, criterion, seed
        params = {k: v.detach() for k, v in self._module.named_parameters()}
        dtype = next(iter(params.values())).dtype
        hparams: dict[str, torch.Tensor] = {}
        if "lr" in tune:
            hparams["log_lr"] = torch.tensor(math.log(lr), dtype=dtype)
        if "momentum" in tune:
            hparams["logit_momentum"] = torch.tensor(
                math.log(momentum / (1 - momentum)), dtype=dtype
            )
        if hyper is not None:
            hparams.update(hyper.init(params))
        self.hparams = {k: v.detach().clone().requires_grad_(True) for k, v in hparams.items()}
        lr_spec = (lambda h, t: h["log_lr"].exp()) if "lr" in tune else lr
        if rule == "sgd":
            mom_spec = None
        elif "momentum" in tune:
            mom_spec = lambda h, t: torch.sigmoid(h["logit_momentum"])  # noqa: E731
        else:
            mom_spec = momentum
        kwargs = {"beta2": beta2, "eps": eps} if rule == "adam" else {}
        self.method = RealTime(rule, lr=lr_spec, momentum=mom_spec, **kwargs)
        factory = hyper_optimizer or (lambda hp: torch.optim.Adam(hp, lr=1e-2))
        self.hyper_optimizer = factory(list(self.hparams.values()))
        self._forward_train = as_function(model, mode="train")
        self._forward_val = as_function(model, mode="eval")
        self.train_stream = BatchStream(train_loader, seed)
        self.val_stream = BatchStream(val_loader, seed + 1)
        self.state: RealTimeState = self.method.init(params, self._detached_hparams())
        self.inner_step = 0
        self.hyper_step = 0
        self.history: list[dict[str, Any]] = []

    def _detached_hparams(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.hparams.items()}

    def current(self) -> dict[str, float]:
        """The inner optimizer's current learning rate and momentum (``beta1`` for Adam)."""
        hp = self._detached_hparams()
        lr_fn, mom_fn = self.method._rules(hp, next(iter(hp.values())).dtype, _WHERE)
        out = {"lr": float(lr_fn(hp, self.inner_step))}
        if self.method.optimizer != "sgd":
            out["momentum"] = float(mom_fn(hp, self.inner_step))
        return out

    def _training_loss(self, batch) -> Callable:
        forward, criterion, hyper = self._forward_train, self.criterion, self.hyper
        if hyper is not None:
            return lambda p, h: hyper.training_loss(forward, p, h, batch, criterion)
        x, y = batch[0], batch[1]
        return lambda p, h: criterion(forward(p, x), y, reduction="none").mean()

    def sync_model(self) -> None:
        """Copy the current weights into ``model`` and the current ``lr``/``momentum`` into
        the optimizer's group."""
        with torch.no_grad():
            for k, p in self._module.named_parameters():
                p.copy_(self.state.params[k])
        group = self.optimizer.param_groups[0]
        values = self.current()
        group["lr"] = values["lr"]
        if self.method.optimizer == "momentum":
            group["momentum"] = values["momentum"]
        elif self.method.optimizer == "adam":
            group["betas"] = (values["momentum"], group["betas"][1])

    def step(self) -> dict[str, Any]:
        """``hyper_every`` inner steps (with tangents), then one hyper-step; returns the record."""
        start = time.perf_counter()
        hp = self._detached_hparams()
        for _ in range(self.hyper_every):
            self.state = self.method.step(
                self.state, self._training_loss(self.train_stream.next()), hp
            )
            self.inner_step += 1
        val_batch = self.val_stream.next()
        xv, yv = val_batch[0], val_batch[1]
        forward_val, criterion = self._forward_val, self.criterion
        grads, val_loss = self.method.hypergrad(
            self.state,
            lambda p, h: criterion(forward_val(p, xv), yv, reduction="none").mean(),
            hp,
            return_value=True,
        )
        self.hyper_optimizer.zero_grad(set_to_none=True)
        for k, v in self.hparams.items():
            v.grad = grads[k].to(v.dtype)
        self.hyper_optimizer.step()
        if self.hyper is not None:
            with torch.no_grad():
                self.hyper.project(self.hparams)
        self.hyper_step += 1
        self.sync_model()
        record = {
            "hyper_step": self.hyper_step,
            "inner_step": self.inner_step,
            "val_loss": val_loss,
            "hypergrad_norm": math.sqrt(
                sum(float((g.double() ** 2).sum()) for g in grads.values())
            ),
            **self.current(),
            "seconds": time.perf_counter() - start,
        }
        if self.hyper is not None:
            record.update(self.hyper.describe(self.hparams))
        self.history.append(record)
        return record

    def fit(self, hyper_steps: int) -> list[dict[str, Any]]:
        """Run until ``hyper_steps`` hyper-steps are done in total; return the history."""
        if not isinstance(hyper_steps, int) or isinstance(hyper_steps, bool) or hyper_steps < 0:
            raise HypergradientError(
                f"{_WHERE}.fit(hyper_steps={hyper_steps!r}): expected an int >= 0."
            )
        while self.hyper_step < hyper_steps:
            self.step()
        return self.history
