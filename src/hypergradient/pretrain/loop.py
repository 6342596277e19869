r"""Meta-learning pre-training hyperparameters while pre-training (Raghu et al. 2021, Alg. 1).

One pre-training run, warm-started throughout: every ``period`` optimizer steps on the
pre-training loss (after ``warmup`` plain steps), the current weights are *treated as* the
pre-training optimum and :func:`~hypergradient.pretrain.pretrain_hypergrad` gives
:math:`dE/d\lambda` through a short fine-tuning run from them; one step of the hyper-optimizer
follows.  The weights are never re-trained from scratch, so meta-learning costs about one
hypergradient per ``period`` pre-training steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from .._errors import HypergradientError, check_tree
from ..hypergrad._checks import check_callable, check_params_hparams
from ..linalg import AbstractLinearSolver
from .hypergrad import (
    FinetuneInit,
    FinetuneLoss,
    PretrainHypergrad,
    _check_positive,
    pretrain_hypergrad,
)

_WHERE = "hypergradient.pretrain.MetaPretrainer"
OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
# Raghu et al.'s code: Adam on the weights (lr 1e-3) and on the hyperparameters (lr 0.1 here)
DEFAULT_OPTIMIZER = partial(torch.optim.Adam, lr=1e-3)
DEFAULT_HYPER_OPTIMIZER = partial(torch.optim.Adam, lr=0.1)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HypergradientError(f"{_WHERE}({name}={value!r}): expected an int >= {minimum}.")


class MetaPretrainer:
    r"""Pre-train with periodic hyper-steps on the pre-training hyperparameters.

    .. code-block:: text

        for s = 1, 2, ...:
            theta <- optimizer step on pretrain_loss(theta, lambda, batch_s)
            if s > warmup and (s - warmup) % period == 0:          # a hyper-step
                # theta treated as the argmin of pretrain_loss(., lambda, batch_s)
                g <- pretrain_hypergrad(...)
                lambda <- hyper_optimizer step with g;  project(lambda)

    Args:
        pretrain_loss: ``pretrain_loss(params, hparams, batch) -> scalar``; ``batch`` is
            ``batches(s)`` (``None`` without ``batches``: full-batch pre-training).
        finetune_loss, finetune_val_loss, finetune_init: the fine-tuning problem, as in
            :func:`~hypergradient.pretrain.pretrain_hypergrad` (``finetune_init`` builds a
            fresh head at every hyper-step).
        params: the initial pre-training weights (copied; read them back from
            :attr:`params`).
        hparams: the initial hyperparameters (copied; :attr:`hparams`).
        optimizer: ``optimizer(list_of_tensors) -> torch.optim.Optimizer`` for the weights
            (default Adam, lr 1e-3, as in Raghu et al.'s code).
        hyper_optimizer: the same for the hyperparameters (default Adam, lr 0.1).
        batches: ``batches(s) -> batch`` for step ``s = 0, 1, ...``; a function of the step
            so that a resumed run sees the same batches.
        period: pre-training steps per hyper-step (``P``; 10 in Raghu et al.'s code).
        warmup: plain pre-training steps before the first hyper-step.
        finetune_steps, finetune_lr, finetune_momentum: the unrolled fine-tuning.
        solver, max_steps, tol, damping, relative_damping: the implicit solve, as in
            :func:`~hypergradient.pretrain.pretrain_hypergrad`.  Default ``"identity"``
            (:math:`H^{-1} \approx \alpha I`: no Hessian-vector product, never breaks
            down; Raghu et al.'s one Neumann term with the learning rate as step is the
            same direction to 3 digits).  ``solver="cg", relative_damping=0.1,
            max_steps=20`` is the curvature-damped implicit step: in
            ``benchmarks/meta_pretrain.py`` it is closer to the converged hypergradient
            and ends with a slightly better encoder (within the seeds' spread) at 2.5x
            the time, and CG can break down on the warm weights' indefinite Hessian
            (then use ``"minres"``).  ``relative_damping=rho``
            damps the Hessian by ``rho * lambda_max`` (power iteration) and, for
            ``"neumann"``, steps by ``1 / (lambda_max + delta)``.  alpha: the Neumann /
            identity step; ``None``: for ``"neumann"`` ``1 / lambda_max`` estimated by 20
            power iterations (the curvature, not the learning rate: with Adam's rate
            ``alpha * lambda_max`` is ~1e-3 and the Neumann terms would change nothing);
            for ``"identity"`` the optimizer's current learning rate (only a scale).
            ``benchmarks/meta_pretrain.py`` compares the choices against a converged
            dense reference and downstream.  The implicit step is taken at the current
            (warm-started, not converged) weights on purpose, so no
            :class:`~hypergradient.NonStationaryWarning` is raised; the measured gradient
            norm is in ``info.stats.extra["inner_grad_norm"]``.
        project: ``project(hparams)`` in place after every hyper-step (e.g. a kind's
            :meth:`~hypergradient.hparams.AbstractHyperparameter.project`).

    Cost per hyper-step: one :func:`~hypergradient.pretrain.pretrain_hypergrad` (about
    ``2 finetune_steps + 3`` backward passes, plus ``max_steps`` Hessian-vector products
    for CG / Neumann / MINRES and 20 more for a power iteration) every ``period`` steps.

    Examples:
        >>> import torch, hypergradient as hg
        >>> # PT: (w - lam)^2/2 (optimum w = lam); FT: w copied, E = (w - 3)^2/2 -> lam -> 3
        >>> trainer = hg.pretrain.MetaPretrainer(
        ...     lambda p, h, batch: 0.5 * ((p["w"] - h["lam"]) ** 2).sum(),
        ...     lambda phi, th: 0.0 * phi["w"].sum(),
        ...     lambda phi, th: 0.5 * ((phi["w"] - 3.0) ** 2).sum(),
        ...     {"w": torch.zeros(1, dtype=torch.float64)},
        ...     {"lam": torch.zeros(1, dtype=torch.float64)},
        ...     lambda th: {"w": th["w"]},
        ...     optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5),
        ...     hyper_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5),
        ...     period=5, solver="exact")
        >>> _ = trainer.run(300)
        >>> round(float(trainer.hparams["lam"]), 4)
        3.0

    References:
        Raghu, Lorraine, Kornblith, McDermott, Duvenaud (2021), Meta-Learning to Improve
        Pre-Training (NeurIPS), Algorithm 1.
    """

    def __init__(
        self,
        pretrain_loss: Callable[[Mapping, Mapping, Any], torch.Tensor],
        finetune_loss: FinetuneLoss,
        finetune_val_loss: FinetuneLoss,
        params: Mapping[str, torch.Tensor],
        hparams: Mapping[str, torch.Tensor],
        finetune_init: FinetuneInit,
        *,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        hyper_optimizer: OptimizerFactory = DEFAULT_HYPER_OPTIMIZER,
        batches: Callable[[int], Any] | None = None,
        period: int = 10,
        warmup: int = 0,
        finetune_steps: int = 1,
        finetune_lr: float = 0.1,
        finetune_momentum: float = 0.0,
        solver: str | AbstractLinearSolver = "identity",
        max_steps: int = 20,
        tol: float = 0.0,
        alpha: float | None = None,
        damping: float = 0.0,
        relative_damping: float | None = None,
        project: Callable[[dict[str, torch.Tensor]], None] | None = None,
    ):
        for name, fn in (
            ("pretrain_loss", pretrain_loss),
            ("finetune_loss", finetune_loss),
            ("finetune_val_loss", finetune_val_loss),
            ("optimizer", optimizer),
            ("hyper_optimizer", hyper_optimizer),
        ):
            check_callable(_WHERE, name, fn)
        check_params_hparams(_WHERE, params, hparams)
        if batches is not None:
            check_callable(_WHERE, "batches", batches)
        if project is not None:
            check_callable(_WHERE, "project", project)
        if not isinstance(finetune_init, Mapping) and not callable(finetune_init):
            raise HypergradientError(
                f"{_WHERE}: finetune_init must be a dict of tensors or a callable "
                f"`finetune_init(pretrained) -> dict`, got {type(finetune_init).__name__}."
            )
        if isinstance(finetune_init, Mapping):
            check_tree(_WHERE, "finetune_init", finetune_init)
        _check_int("period", period, 1)
        _check_int("warmup", warmup, 0)
        if relative_damping is not None:
            _check_positive(_WHERE, "relative_damping", relative_damping)
        self.pretrain_loss = pretrain_loss
        self.finetune_loss = finetune_loss
        self.finetune_val_loss = finetune_val_loss
        self.finetune_init = finetune_init
        self.batches = batches
        self.period, self.warmup = period, warmup
        self.hypergrad_options = dict(
            finetune_steps=finetune_steps,
            finetune_lr=finetune_lr,
            finetune_momentum=finetune_momentum,
            solver=solver,
            max_steps=max_steps,
            tol=tol,
            damping=damping,
            relative_damping=relative_damping,
            # warm start: the weights are by design not a pre-training optimum yet
            stationarity_tol=None,
        )
        self.alpha = alpha
        self.project = project
        self._params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self._hparams = {k: v.detach().clone().requires_grad_(True) for k, v in hparams.items()}
        self.optimizer = optimizer(list(self._params.values()))
        self.hyper_optimizer = hyper_optimizer(list(self._hparams.values()))
        for name, opt in (("optimizer", self.optimizer), ("hyper_optimizer", self.hyper_optimizer)):
            if not isinstance(opt, torch.optim.Optimizer):
                raise HypergradientError(
                    f"{_WHERE}: {name}(tensors) must return a torch.optim.Optimizer (e.g. "
                    f"`lambda ps: torch.optim.Adam(ps, lr=1e-3)`), got {type(opt).__name__}."
                )
        self.step_count = 0
        self.hyper_step_count = 0

    # ------------------------------------------------------------------ state
    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The current pre-training weights (detached)."""
        return {k: v.detach() for k, v in self._params.items()}

    @property
    def hparams(self) -> dict[str, torch.Tensor]:
        """The current hyperparameters (detached)."""
        return {k: v.detach() for k, v in self._hparams.items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (weights, hyperparameters, both optimizers' states,
        the step counters); the losses and ``batches`` are the caller's to rebuild."""
        return {
            "params": {k: v.detach().clone() for k, v in self._params.items()},
            "hparams": {k: v.detach().clone() for k, v in self._hparams.items()},
            "optimizer": self.optimizer.state_dict(),
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "step_count": self.step_count,
            "hyper_step_count": self.hyper_step_count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [
            k
            for k in ("params", "hparams", "optimizer", "hyper_optimizer", "step_count")
            if k not in state
        ]
        if missing:
            raise HypergradientError(
                f"{_WHERE}.load_state_dict: the state lacks {missing}; pass what "
                f"MetaPretrainer.state_dict() returned."
            )
        with torch.no_grad():
            for mine, theirs, what in (
                (self._params, state["params"], "params"),
                (self._hparams, state["hparams"], "hparams"),
            ):
                if set(mine) != set(theirs):
                    raise HypergradientError(
                        f"{_WHERE}.load_state_dict: the saved {what} have the keys "
                        f"{sorted(theirs)}, this trainer's {sorted(mine)}."
                    )
                for k, v in mine.items():
                    v.copy_(theirs[k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        self.step_count = int(state["step_count"])
        self.hyper_step_count = int(state.get("hyper_step_count", 0))

    # ------------------------------------------------------------------ steps
    def _batch(self, step: int):
        return None if self.batches is None else self.batches(step)

    def hyper_step_due(self) -> bool:
        s = self.step_count
        return s > self.warmup and (s - self.warmup) % self.period == 0

    def pretrain_step(self) -> float:
        """One optimizer step on the pre-training loss at the current hyperparameters;
        returns the loss before the step."""
        batch = self._batch(self.step_count)
        hparams = self.hparams
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self.pretrain_loss(self._params, hparams, batch)
            loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise HypergradientError(
                f"{_WHERE}: the pre-training loss became {value} at step {self.step_count + 1}; "
                f"lower the optimizer's learning rate or the hyper-optimizer's."
            )
        self.optimizer.step()
        self.step_count += 1
        return value

    def hyper_step(self) -> PretrainHypergrad:
        """One hyper-step at the current weights (on the batch of the last step taken)."""
        batch = self._batch(max(self.step_count - 1, 0))
        alpha = self.alpha
        solver = self.hypergrad_options["solver"]
        if (
            alpha is None
            and solver == "identity"
            and self.hypergrad_options["relative_damping"] is None
        ):
            alpha = float(self.optimizer.param_groups[0]["lr"])
        info = pretrain_hypergrad(
            lambda p, h: self.pretrain_loss(p, h, batch),
            self.finetune_loss,
            self.finetune_val_loss,
            self.params,
            self.hparams,
            self.finetune_init,
            alpha=alpha,
            return_info=True,
            **self.hypergrad_options,
        )
        self.hyper_optimizer.zero_grad(set_to_none=True)
        for k, v in self._hparams.items():
            v.grad = info.hypergrad[k].to(v.dtype)
        self.hyper_optimizer.step()
        if self.project is not None:
            with torch.no_grad():
                self.project(self._hparams)
        self.hyper_step_count += 1
        return info

    def step(self) -> PretrainHypergrad | None:
        """One pre-training step, then a hyper-step when one is due (its info, else None)."""
        self.pretrain_step()
        return self.hyper_step() if self.hyper_step_due() else None

    def run(
        self,
        steps: int,
        callback: Callable[[MetaPretrainer, PretrainHypergrad], None] | None = None,
    ) -> MetaPretrainer:
        """Continue until ``steps`` pre-training steps in total have been taken;
        ``callback(self, info)`` after every hyper-step (to log or checkpoint)."""
        _check_int("steps", steps, 0)
        while self.step_count < steps:
            info = self.step()
            if info is not None and callback is not None:
                callback(self, info)
        return self
