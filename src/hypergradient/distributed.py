r"""Data-parallel bilevel training on ``torch.distributed``: ``torchrun``, gloo (CPU), NCCL (GPU).

Every rank holds a *shard* of the training and of the validation data and a full replica of
the weights :math:`w` and the hyperparameters :math:`\lambda`.  The losses are means over the
**global** batch :math:`B = \bigcup_r B_r` (:math:`n_r = |B_r|`, :math:`N = \sum_r n_r`):

.. math::

    L(w, \lambda) = \sum_r c_r\, L_r(w, \lambda), \qquad c_r = \frac{n_r}{N},

where :math:`L_r` is the mean over rank :math:`r`'s examples.  Unequal shards are exact: a rank
with more examples weighs more.  :meth:`DataParallel.wrap` turns a rank's local loss into
this global loss with two autograd functions, the pair Megatron-LM calls *f* and *g*:

* ``copy`` (applied once to all of ``params`` and ``hparams``, flattened into one vector):
  identity forward; backward **sums** the incoming gradient over ranks;
* ``reduce`` (applied to :math:`c_r L_r`): forward sums over ranks (every rank sees the global
  value); backward is the identity.

Each is the other's adjoint, and each one's backward is built from the other, so the
construction is differentiable to any order.  Whatever autograd computes from the wrapped
loss is therefore the derivative of the *global* loss, identical on every rank:

* the gradient :math:`\nabla_w L = \sum_r c_r \nabla_w L_r` (one all-reduce of the
  size of the tensors that require grad);
* a Hessian-vector product :math:`Hu = \sum_r c_r \nabla^2_{ww} L_r\, u` (the double backward
  runs ``copy``'s backward once more: one all-reduce per product), so the iterates of
  CG, Neumann, MINRES and GMRES are the same on every rank and the solvers' stopping tests
  agree;
* the mixed product :math:`\partial^2_{\lambda w} L\, q` and the validation gradient
  :math:`(\nabla_w E, \nabla_\lambda E)`;
* gradients through an unrolled training run (every step's gradient is global).

No hypergradient routine needs to know it runs distributed: they receive wrapped losses.
Communication per hypergradient: one all-reduce per gradient, per HVP and per mixed
product (plus a scalar per loss evaluation), of ``numel(params) + numel(hparams that need
a gradient)`` numbers.

Safety per method (what must hold for ranks to stay identical and results exact):

* **Implicit, CG / MINRES / GMRES / exact / identity** - safe.  HVPs are global, so every
  rank runs the same iterations and stops at the same step.  ``solver="exact"`` builds the
  dense Hessian from ``numel(params)`` HVPs: as many all-reduces.
* **Implicit, Neumann** - safe.  ``alpha=None`` estimates :math:`\lambda_{\max}` by power
  iteration from a fixed seed (the same start vector on every rank) with global HVPs.
* **Unrolled, reverse mode and truncated** - safe.  Each look-ahead step takes a global
  gradient; the reverse pass all-reduces once per step (in the same order on every rank:
  the graph is the same).
* **Unrolled, forward mode** - refused: ``torch.func`` transforms (``jvp``/``vmap``)
  cannot carry a collective; the wrapped loss raises :class:`HypergradientError`.  Use
  ``mode="reverse"`` (same value).
* **Reversible (exact reversal)** - safe: the reversal recomputes global gradients at
  the same weights, and an all-reduce sums in a fixed order, so the forward and backward
  runs see bit-identical gradients on every rank.
* **EvoGrad** - safe only with a **shared seed**: pass ``generator=torch.Generator().
  manual_seed(s)`` with the same ``s`` on every rank (or seed the global RNG identically),
  so every rank draws the same perturbations; the copies' losses are then global.
* **Stochastic solvers (SOBA, SABA, StocBiO, AmIGO)** - safe through
  :meth:`DataParallel.wrap_indexed`: the solver's batch ids come from the seeded generator
  in its state (identical on every rank) and each rank evaluates its slice of the drawn
  index batch.  SABA's memory tables hold global per-batch quantities and are identical.
* **Towers / any trainer state** - safe when it is a function of global losses and of a
  shared seed; anything computed from a rank's local batch alone (e.g. a local loss used
  to pick a tower member) makes the ranks diverge.
* **K-FAC factors** - **not** automatic: the Kronecker factors are computed from a rank's
  own activations and output gradients; average them with :meth:`DataParallel.average`
  (weighted by :math:`c_r`) before building the preconditioner, or the preconditioners,
  hence the CG iterates and the weights, differ across ranks.
* **BatchNorm statistics** - **not** automatic: in training mode, a batch-norm layer
  normalises by the *local* batch statistics, so the global loss is not
  :math:`\sum_r c_r L_r` of the single-process loss; use ``torch.nn.SyncBatchNorm``
  semantics (not differentiable twice) or a norm without batch statistics (LayerNorm,
  GroupNorm) or ``eval()`` mode.  Running statistics drift apart per rank too.
* **Losses that are not means over examples** (e.g. normalised by the sum of per-example
  weights) do not decompose as :math:`\sum_r c_r L_r`; reduce numerator and denominator
  separately.

Requirements: every rank must build the same graph (same parameters used, same number of
loss evaluations); every rank must hold at least one example of each batch; and the
weights and hyperparameters must start identical (:meth:`DataParallel.broadcast`).
:meth:`DataParallel.check_replicated` verifies the last point at any time.  An exception on
one rank only (say a NaN in its shard) leaves the others waiting in their next collective until
the process group's ``timeout`` (:func:`init_from_env`), when ``torchrun`` stops the job.

Launch::

    torchrun --nproc_per_node=2 examples/distributed_weight_decay.py

:func:`init_from_env` reads the variables ``torchrun`` sets; without them the same script
runs as one process (``world_size == 1``, every collective a no-op).

Examples:
    Without ``torchrun`` there is one process, whose local loss is already the global one:

    >>> import torch
    >>> import hypergradient as hg
    >>> dp = hg.distributed.DataParallel()  # no process group initialised
    >>> dp, dp.is_main
    (DataParallel(rank=0, world_size=1, backend=None), True)
    >>> loss = lambda p, h: ((p["w"] - h["t"]) ** 2).mean()
    >>> dp.wrap(loss, count=8) is loss
    True
    >>> [hg.distributed.shard_bounds(10, rank, 3) for rank in range(3)]  # 10 examples, 3 ranks
    [(0, 4), (4, 7), (7, 10)]
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._errors import HypergradientError

_WHERE = "hypergradient.distributed"

Loss = Callable[[Any, Any], torch.Tensor]


def _dist():
    import torch.distributed as dist

    return dist


def _functorch_active() -> bool:
    """Is a ``torch.func`` transform (grad/jvp/vmap) running around this call?"""
    return torch._C._functorch.peek_interpreter_stack() is not None


class _Copy(torch.autograd.Function):
    """Identity forward (a replicated tensor enters a rank's local loss); backward sums the
    local gradients over ranks (with :class:`_Reduce`, so it is differentiable again)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Reduce.apply(grad, ctx.group), None


class _Reduce(torch.autograd.Function):
    """Sum over ranks forward (a local partial becomes the replicated global value); identity
    backward (with :class:`_Copy`, so it is differentiable again)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.detach().clone().contiguous()
        _dist().all_reduce(out, op=_dist().ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Copy.apply(grad, ctx.group), None


class DataParallel:
    """The data-parallel context of one rank: global losses, broadcasts, rank-0 I/O.

    Build it after ``torch.distributed.init_process_group`` (or with :func:`init_from_env`).
    Without an initialised process group it describes a single process (``world_size == 1``)
    and every method is the identity, so the same script runs with or without ``torchrun``.

    Args:
        group: the process group (default: the world).

    Example (every rank runs this on its own shard ``x_r, y_r``)::

        dp = hg.distributed.init_from_env()
        inner = dp.wrap(lambda p, h: loss(p, h, x_r, y_r), count=len(x_r))
        outer = dp.wrap(lambda p, h: val_loss(p, h, xv_r, yv_r), count=len(xv_r))
        g = hg.implicit_hypergrad(inner, outer, params, hparams, solver="cg")
        # g is the hypergradient of the global problem, the same on every rank

    Examples:
        Without a process group (a plain ``python`` run) the context is one process, whose
        share of every batch is all of it:

        >>> import torch
        >>> import hypergradient as hg
        >>> dp = hg.distributed.DataParallel()
        >>> dp.rank, dp.world_size, dp.is_main
        (0, 1, True)
        >>> dp.weight(count=8)  # c_r = n_r / N
        1.0
        >>> dp.average({"kfac_factor": torch.eye(2)}, count=8)["kfac_factor"].shape
        torch.Size([2, 2])
        >>> dp.check_replicated({"w": torch.zeros(3)})  # passes silently: one replica
    """

    def __init__(self, group: Any = None):
        dist = _dist()
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
            self.backend = str(dist.get_backend(group))
        else:
            if group is not None:
                raise HypergradientError(
                    f"{_WHERE}.DataParallel(group=...): a process group was given but "
                    f"torch.distributed is not initialised. Call init_from_env() or "
                    f"torch.distributed.init_process_group(...) first."
                )
            self.rank, self.world_size, self.backend = 0, 1, None
        # NCCL moves CUDA tensors only: small bookkeeping tensors go to this rank's device.
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )

    def __repr__(self) -> str:
        return (
            f"DataParallel(rank={self.rank}, world_size={self.world_size}, "
            f"backend={self.backend!r})"
        )

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes logs, checkpoints and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ counts and weights
    def counts(self, count: int) -> list[int]:
        """The number of examples of every rank, from each rank's own ``count`` (one
        all-gather).  Raises if a rank has none (its loss would be the mean of nothing)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise HypergradientError(
                f"{_WHERE}.DataParallel.counts(count={count!r}): expected the number of "
                f"examples of this rank's batch, an int >= 0."
            )
        if not self.distributed:
            counts = [count]
        else:
            mine = torch.tensor([count], dtype=torch.int64, device=self.device)
            gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
            _dist().all_gather(gathered, mine, group=self.group)
            counts = [int(c) for c in gathered]
        empty = [r for r, c in enumerate(counts) if c == 0]
        if empty:
            raise HypergradientError(
                f"{_WHERE}: rank(s) {empty} have an empty batch (examples per rank: {counts}). "
                f"Every rank must hold at least one example of every global batch: use fewer "
                f"processes or larger batches (ShardedBatchSampler splits a batch of B "
                f"examples into world_size parts of B // world_size or one more)."
            )
        return counts

    def weight(self, count: int) -> float:
        """``c_r = n_r / N``: this rank's share of the global batch."""
        counts = self.counts(count)
        return counts[self.rank] / sum(counts)

    # ------------------------------------------------------------------ global losses
    def replicate(self, tree: Any) -> Any:
        r"""``tree`` (a tensor or a dict of tensors) entering a rank's local computation.

        Identity on values; the tensors that require grad are flattened into one vector per
        dtype and device whose backward sums the local gradients over ranks (one
        all-reduce per dtype).  Use it on everything replicated that a local loss reads.
        """
        return self._replicate_many([tree])[0]

    def _replicate_many(self, trees: list[Any]) -> list[Any]:
        leaves, spec = tree_flatten(trees)
        if not self.distributed or not torch.is_grad_enabled():
            return trees
        # one flat vector per (dtype, device), in first-appearance order (the same on every
        # rank): one collective per backward, with no dependence on autograd's node order
        groups: dict[tuple, list[int]] = {}
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                groups.setdefault((leaf.dtype, leaf.device), []).append(i)
        out = list(leaves)
        for indices in groups.values():
            flat = torch.cat([leaves[i].reshape(-1) for i in indices])
            flat = _Copy.apply(flat, self.group)
            pieces = flat.split([leaves[i].numel() for i in indices])
            for i, piece in zip(indices, pieces):
                out[i] = piece.view_as(leaves[i])
        return tree_unflatten(out, spec)

    def reduce(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``value`` (differentiable; backward is the identity)."""
        if not self.distributed:
            return value
        return _Reduce.apply(value, self.group)

    def wrap(self, loss: Loss, count: int) -> Loss:
        r"""The global loss :math:`\sum_r c_r\,\text{loss}_r(p, h)` from this rank's local one.

        Args:
            loss: ``loss(params, hparams) -> scalar``, the mean over this rank's examples
                (plus any data-independent term, e.g. a penalty: the weights :math:`c_r`
                sum to one, so it is counted once).
            count: the number of examples ``loss`` averages over on this rank.

        Returns:
            ``loss'(params, hparams)``: the same global value on every rank, whose
            derivatives of every order (gradients, HVPs, mixed products) are those of the
            global loss.  Cost: one all-gather here (the counts); one scalar all-reduce per
            evaluation and one vector all-reduce per backward pass.

        The returned callable is also what :class:`~hypergradient.BilevelTrainer` takes as
        ``wrap_loss`` (``wrap_loss=dp``: the trainer calls ``dp(loss, count)`` per batch).
        """
        if not callable(loss):
            raise HypergradientError(
                f"{_WHERE}.DataParallel.wrap(loss=...): expected a callable "
                f"loss(params, hparams) -> scalar, got {type(loss).__name__}."
            )
        weight = self.weight(count)
        if not self.distributed:
            return loss

        def global_loss(params, hparams):
            self._refuse_transforms()
            params, hparams = self._replicate_many([params, hparams])
            return self.reduce(loss(params, hparams) * weight)

        global_loss.__name__ = f"global_{getattr(loss, '__name__', 'loss')}"
        return global_loss

    __call__ = wrap

    def wrap_indexed(self, loss: Callable[[Any, Any, torch.Tensor], torch.Tensor]):
        r"""For index-batch losses (:mod:`hypergradient.stochastic`): split each batch.

        ``loss(params, hparams, idx)`` is the mean over the examples ``idx``.  The returned
        ``loss'(params, hparams, idx)`` - called with the *same* ``idx`` on every rank, as the
        stochastic solvers do from their seeded generator - evaluates this rank's contiguous
        slice of ``idx`` and returns the global mean over ``idx`` (differentiable as in
        :meth:`wrap`).  Needs ``len(idx) >= world_size``.
        """
        if not callable(loss):
            raise HypergradientError(
                f"{_WHERE}.DataParallel.wrap_indexed(loss=...): expected a callable "
                f"loss(params, hparams, idx) -> scalar, got {type(loss).__name__}."
            )
        if not self.distributed:
            return loss

        def global_loss(params, hparams, idx):
            self._refuse_transforms()
            start, stop = shard_bounds(len(idx), self.rank, self.world_size)
            if stop == start:
                raise HypergradientError(
                    f"{_WHERE}.DataParallel.wrap_indexed: a batch of {len(idx)} indices "
                    f"cannot give each of {self.world_size} ranks an example; use batches "
                    f"of at least world_size indices."
                )
            weight = (stop - start) / len(idx)
            params, hparams = self._replicate_many([params, hparams])
            return self.reduce(loss(params, hparams, idx[start:stop]) * weight)

        return global_loss

    def _refuse_transforms(self) -> None:
        if _functorch_active():
            raise HypergradientError(
                f"{_WHERE}: a data-parallel loss was called inside a torch.func transform "
                f"(grad/jvp/vmap), e.g. by unrolled_hypergrad(mode='forward'). A collective "
                f"cannot run inside these transforms. Use mode='reverse' (the same "
                f"hypergradient) or an implicit method."
            )

    # ------------------------------------------------------------------ replicas
    @torch.no_grad()
    def broadcast(self, obj: nn.Module | Mapping[str, torch.Tensor], src: int = 0):
        """Copy rank ``src``'s parameters and buffers (a module) or tensors (a dict) to
        every rank, in place; returns ``obj``.  Call it once after building the model and
        hyperparameters so every replica starts identical."""
        if isinstance(obj, nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, Mapping):
            tensors = list(obj.values())
        else:
            raise HypergradientError(
                f"{_WHERE}.DataParallel.broadcast(obj=...): expected an nn.Module or a dict "
                f"of tensors, got {type(obj).__name__}."
            )
        if self.distributed:
            for t in tensors:
                buf = t.detach().to(self.device).contiguous()
                _dist().broadcast(buf, src=src, group=self.group)
                t.copy_(buf)
        return obj

    @torch.no_grad()
    def max_difference(self, tree: Any) -> float:
        """``max_r |tree_r - tree_0|`` over all ranks and entries (0.0 on one process)."""
        leaves = [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]
        if not self.distributed or not leaves:
            return 0.0
        mine = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in leaves])
        ref = mine.clone()
        _dist().broadcast(ref, src=0, group=self.group)
        diff = (mine - ref).abs().max().reshape(1)
        _dist().all_reduce(diff, op=_dist().ReduceOp.MAX, group=self.group)
        return float(diff)

    def check_replicated(self, tree: Any, name: str = "tree", atol: float = 0.0) -> None:
        """Raise unless ``tree`` (a module's state, a dict, a tensor) is the same on every rank.

        Collective: every rank must call it.  A difference means a rank-local quantity
        (BatchNorm statistics, unshared RNG, K-FAC factors) entered the update.
        """
        if isinstance(tree, nn.Module):
            tree = tree.state_dict()
        diff = self.max_difference(tree)
        if diff > atol:
            raise HypergradientError(
                f"{_WHERE}.check_replicated({name}): the replicas differ by up to {diff:.3e} "
                f"(allowed {atol:.1e}) across {self.world_size} ranks. Broadcast the initial "
                f"values (dp.broadcast), seed every RNG identically, and check the safety "
                f"notes of hypergradient.distributed for rank-local state."
            )

    @torch.no_grad()
    def average(self, tree: Any, count: int) -> Any:
        r"""The example-weighted mean :math:`\sum_r c_r x_r` of per-rank statistics.

        For statistics that are means over a rank's ``count`` examples - K-FAC's Kronecker
        factors, BatchNorm running statistics, a local metric - this is the statistic of the
        global batch.  ``tree`` is a tensor or a dict of tensors; returns a new one (detached).
        Collective: every rank must call it.  One all-reduce per tensor.
        """
        weight = self.weight(count)
        leaves, spec = tree_flatten(tree)
        if not self.distributed:
            return tree_unflatten([t.detach().clone() for t in leaves], spec)
        out = []
        for t in leaves:
            buf = t.detach().to(self.device) * weight
            _dist().all_reduce(buf, op=_dist().ReduceOp.SUM, group=self.group)
            out.append(buf.to(t.device))
        return tree_unflatten(out, spec)

    def all_reduce_mean(self, value: float, count: int) -> float:
        """The example-weighted mean of a per-rank metric (e.g. a local accuracy)."""
        if not self.distributed:
            return float(value)
        pair = torch.tensor([float(value) * count, float(count)], device=self.device)
        pair = pair.to(torch.float64)
        _dist().all_reduce(pair, group=self.group)
        return float(pair[0] / pair[1])

    def barrier(self) -> None:
        if self.distributed:
            _dist().barrier(group=self.group)

    # ------------------------------------------------------------------ rank-0 I/O
    def print(self, *args, **kwargs) -> None:
        """``print`` on rank 0 only."""
        if self.is_main:
            builtins.print(*args, **kwargs)

    def log_dir(self, path: str | os.PathLike | None) -> str | os.PathLike | None:
        """``path`` on rank 0 and ``None`` elsewhere: ``BilevelTrainer(log_dir=dp.log_dir(p))``
        makes rank 0 the only writer of the logs."""
        return path if self.is_main else None

    def fit(
        self,
        trainer: Any,
        hyper_steps: int,
        *,
        checkpoint: str | os.PathLike | None = None,
        resume: bool = False,
    ) -> list[dict[str, Any]]:
        """:meth:`BilevelTrainer.fit` with rank 0 as the only checkpoint writer.

        Every rank reads ``checkpoint`` on ``resume`` (a shared file system is assumed); after
        each hyper-step rank 0 writes it (atomically) and the ranks meet at a barrier, so a
        restart never finds a rank ahead of the file.
        """
        if resume and checkpoint is None:
            raise HypergradientError(
                f"{_WHERE}.DataParallel.fit(resume=True): resuming needs checkpoint=<path>."
            )
        if resume and Path(checkpoint).exists():
            trainer.load_checkpoint(checkpoint)
        self.barrier()  # nobody may overwrite the file before every rank has read it
        while trainer.hyper_step < hyper_steps:
            trainer.step()
            if checkpoint is not None:
                if self.is_main:
                    trainer.save_checkpoint(checkpoint)
                self.barrier()
        return trainer.history


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous part of ``n`` items split over
    ``world_size`` ranks; the parts differ in size by at most one (the first ``n %
    world_size`` ranks get one more).

    Examples:
        >>> import hypergradient as hg
        >>> [hg.distributed.shard_bounds(10, rank, 4) for rank in range(4)]
        [(0, 3), (3, 6), (6, 8), (8, 10)]
        >>> hg.distributed.shard_bounds(3, 2, 4)  # fewer items than ranks: an empty part
        (2, 3)
        >>> hg.distributed.shard_bounds(3, 3, 4)
        (3, 3)
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise HypergradientError(
            f"{_WHERE}.shard_bounds(n={n}, rank={rank}, world_size={world_size}): expected "
            f"world_size >= 1 and 0 <= rank < world_size."
        )
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedBatchSampler:
    """This rank's slice of every batch of a global batch sampler.

    Wrap the batch sampler the single-process run would use (e.g.
    ``BatchSampler(RandomSampler(data), B, drop_last=True)``) and pass the result as
    ``DataLoader(data, batch_sampler=...)``: every rank draws the same global batches (the
    shuffle is seeded from the global RNG, which :class:`~hypergradient.BilevelTrainer`
    seeds identically on every rank) and loads only its contiguous part of each, of
    ``B // world_size`` or one more examples.  The global loss of the wrapped losses is then
    the single-process loss on the same global batch.

    Examples:
        Two ranks share each global batch of 5 examples, 3 for rank 0 and 2 for rank 1:

        >>> from torch.utils.data import BatchSampler, SequentialSampler
        >>> import hypergradient as hg
        >>> batches = BatchSampler(SequentialSampler(range(10)), batch_size=5, drop_last=True)
        >>> [list(hg.distributed.ShardedBatchSampler(batches, r, 2)) for r in range(2)]
        [[[0, 1, 2], [5, 6, 7]], [[3, 4], [8, 9]]]
        >>> len(hg.distributed.ShardedBatchSampler(batches, rank=1, world_size=2))
        2
    """

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int, world_size: int):
        shard_bounds(0, rank, world_size)  # validates rank and world_size
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            batch = list(batch)
            start, stop = shard_bounds(len(batch), self.rank, self.world_size)
            if stop == start:
                raise HypergradientError(
                    f"{_WHERE}.ShardedBatchSampler: a global batch of {len(batch)} examples "
                    f"leaves rank {self.rank} of {self.world_size} without one; use batches "
                    f"of at least world_size examples (drop_last=True avoids a short last "
                    f"batch)."
                )
            yield batch[start:stop]

    def __len__(self) -> int:
        return len(self.batch_sampler)


def init_from_env(
    backend: str | None = None, *, timeout: timedelta = timedelta(minutes=5)
) -> DataParallel:
    """Initialise ``torch.distributed`` from the environment ``torchrun`` sets.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    ``backend=None`` picks ``"nccl"`` when CUDA is available (and selects the GPU
    ``LOCAL_RANK``) and ``"gloo"`` otherwise.  Without ``WORLD_SIZE`` (a plain ``python``
    run) or with ``WORLD_SIZE=1`` no process group is created and the returned context is a
    single process.  Calling it again when a process group exists just returns the context.

    Examples:
        A plain ``python`` run gets a one-process context; ``WORLD_SIZE`` without the other
        ``torchrun`` variables is refused:

        >>> import os
        >>> from unittest import mock
        >>> import hypergradient as hg
        >>> hg.distributed.init_from_env()
        DataParallel(rank=0, world_size=1, backend=None)
        >>> with mock.patch.dict(os.environ, {"WORLD_SIZE": "2"}, clear=True):
        ...     hg.distributed.init_from_env()
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: ...WORLD_SIZE=2 but ['RANK', 'MASTER_ADDR', ...
        >>> hg.distributed.destroy()
    """
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return DataParallel()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DataParallel()
    if not dist.is_available():
        raise HypergradientError(
            f"{_WHERE}.init_from_env(): WORLD_SIZE={world} but this torch build has no "
            f"torch.distributed support. Install a build with it, or run one process."
        )
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise HypergradientError(
            f"{_WHERE}.init_from_env(): WORLD_SIZE={world} but {missing} are not set. Launch "
            f"with `torchrun --nproc_per_node={world} script.py`, which sets them."
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo" and not dist.is_gloo_available():
        raise HypergradientError(
            f"{_WHERE}.init_from_env(backend='gloo'): this torch build has no gloo backend."
        )
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise HypergradientError(
                f"{_WHERE}.init_from_env(backend='nccl'): NCCL needs CUDA, which is not "
                f"available here. Use backend='gloo' on CPU."
            )
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return DataParallel()


def destroy() -> None:
    """Tear down the process group (if any); call at the end of a ``torchrun`` script.

    Examples:
        >>> import torch.distributed as dist
        >>> import hypergradient as hg
        >>> dp = hg.distributed.init_from_env()  # no torchrun: no process group
        >>> hg.distributed.destroy()  # a no-op here; under torchrun it ends the group
        >>> dist.is_initialized()
        False
    """
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DataParallel",
    "ShardedBatchSampler",
    "destroy",
    "init_from_env",
    "shard_bounds",
]
