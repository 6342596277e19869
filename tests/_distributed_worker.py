"""Worker for tests/test_distributed.py: one rank of a data-parallel run, or the reference.

``torchrun --nproc_per_node=2 tests/_distributed_worker.py OUT`` computes every quantity
below on its rank's shard of the data with losses wrapped by ``DataParallel``; without
torchrun (or through :func:`compute` with a single-process ``DataParallel``) the same code
runs on the full data.  Rank 0 saves the results to ``OUT`` (``torch.save``), together with
the largest difference of each result across ranks.

Problem: multinomial logistic regression (3 classes, 4 features) with a per-weight L2 decay
``0.5 * sum(exp(log_wd) * W**2)`` and a fixed ``1e-2 * |b|^2`` (strictly convex: CG applies).
13 training and 9 validation examples, split over the ranks evenly (7/6, 5/4) or unevenly
(9/4, 6/3).  The trainer runs on a 60/40 dataset with global batches of 7 (split 4/3) and
validation batches of 5 (3/2).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import hypergradient as hg
from hypergradient import distributed as hgd


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def _shard(n: int, dp: hgd.DataParallel, split: str) -> slice:
    """This rank's rows of ``n``: even split (``shard_bounds``), or 3/4 of them on rank 0."""
    if split == "even" or dp.world_size == 1:
        return slice(*hgd.shard_bounds(n, dp.rank, dp.world_size))
    cut = (3 * n) // 4  # two ranks in the tests
    return slice(0, cut) if dp.rank == 0 else slice(cut, n)


def _losses(dp: hgd.DataParallel, split: str):
    x, y = _data(13, seed=1)
    xv, yv = _data(9, seed=2)
    rows, vrows = _shard(13, dp, split), _shard(9, dp, split)
    x, y, xv, yv = x[rows], y[rows], xv[vrows], yv[vrows]

    def inner(p, h):
        data = F.cross_entropy(x @ p["W"].T + p["b"], y)
        return data + 0.5 * (h["log_wd"].exp() * p["W"] ** 2).sum() + 1e-2 * (p["b"] ** 2).sum()

    def outer(p, h):
        return F.cross_entropy(xv @ p["W"].T + p["b"], yv)

    return dp.wrap(inner, count=len(y)), dp.wrap(outer, count=len(yv))


def _point() -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(3)
    params = {
        "W": 0.5 * torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "b": 0.1 * torch.randn(3, generator=gen, dtype=torch.float64),
    }
    hparams = {"log_wd": -1.0 + 0.3 * torch.randn(3, 4, generator=gen, dtype=torch.float64)}
    return params, hparams


def hypergradients(dp: hgd.DataParallel, split: str) -> dict[str, object]:
    """Every hypergradient method on the split problem (the same problem on one process)."""
    inner, outer = _losses(dp, split)
    params, hparams = _point()
    out: dict[str, object] = {}
    # a random point, not an inner optimum, on purpose: only rank agreement is compared
    anywhere = {"stationarity_tol": None}
    g, stats = hg.implicit_hypergrad(
        inner,
        outer,
        params,
        hparams,
        solver="cg",
        max_steps=100,
        tol=1e-12,
        return_stats=True,
        **anywhere,
    )
    out["implicit_cg"], out["cg_steps"] = g["log_wd"], stats.num_steps
    g = hg.implicit_hypergrad(
        inner, outer, params, hparams, solver="neumann", max_steps=20, **anywhere
    )
    out["implicit_neumann"] = g["log_wd"]
    g = hg.implicit_hypergrad(inner, outer, params, hparams, solver="exact", **anywhere)
    out["implicit_exact"] = g["log_wd"]
    g = hg.unrolled_hypergrad(inner, outer, params, hparams, steps=6, lr=0.5, momentum=0.5)
    out["unrolled_reverse"] = g["log_wd"]
    g = hg.unrolled_hypergrad(inner, outer, params, hparams, steps=6, lr=0.5, truncate=2)
    out["unrolled_truncated"] = g["log_wd"]
    g = hg.unrolled_hypergrad(
        inner, outer, params, hparams, steps=6, lr=0.5, momentum=0.5, mode="reversible"
    )
    out["reversible"] = g["log_wd"]
    gen = torch.Generator().manual_seed(5)  # the shared seed EvoGrad needs on every rank
    g = hg.evograd_hypergrad(inner, outer, params, hparams, copies=4, sigma=1e-2, generator=gen)
    out["evograd"] = g["log_wd"]
    try:
        hg.unrolled_hypergrad(inner, outer, params, hparams, steps=2, lr=0.5, mode="forward")
        out["forward_refused"] = ""
    except hg.HypergradientError as err:
        out["forward_refused"] = str(err)
    return out


def stochastic(dp: hgd.DataParallel) -> dict[str, object]:
    """SOBA and SABA on the same problem, each rank evaluating its slice of every batch."""
    from hypergradient.stochastic import SABA, SOBA, FiniteSumBilevelProblem, run

    x, y = _data(13, seed=1)
    xv, yv = _data(9, seed=2)

    def inner(p, h, idx):
        data = F.cross_entropy(x[idx] @ p["W"].T + p["b"], y[idx])
        return data + 0.5 * (h["log_wd"].exp() * p["W"] ** 2).sum() + 1e-2 * (p["b"] ** 2).sum()

    def outer(p, h, idx):
        return F.cross_entropy(xv[idx] @ p["W"].T + p["b"], yv[idx])

    problem = FiniteSumBilevelProblem(
        dp.wrap_indexed(inner),
        dp.wrap_indexed(outer),
        13,
        9,
        inner_batch_size=5,
        outer_batch_size=4,
    )
    params, hparams = _point()
    out: dict[str, object] = {}
    for solver in (SOBA(inner_step=0.3, outer_step=0.5), SABA(inner_step=0.3, outer_step=0.5)):
        state = run(solver, problem, params, hparams, num_steps=6, seed=7).state
        out[type(solver).__name__] = {"z": state.z, "x": state.x}
    return out


def kfac_factors(dp: hgd.DataParallel) -> dict[str, torch.Tensor]:
    """K-FAC's Kronecker factors of the linear model from each rank's shard, averaged."""
    x, _ = _data(13, seed=1)
    x = x[_shard(13, dp, "uneven")]
    params, _ = _point()
    net = torch.nn.Linear(4, 3, dtype=torch.float64)
    with torch.no_grad():
        net.weight.copy_(params["W"])
        net.bias.copy_(params["b"])
    block = hg.optimizers.kfac.curvature_factors(net, x)[""]
    return dp.average({"A": block.A, "G": block.G}, count=len(x))


def errors(dp: hgd.DataParallel) -> dict[str, str]:
    """The messages of the collective checks (every rank must reach the same verdict)."""
    out = {}
    try:
        dp.counts(0 if dp.rank == dp.world_size - 1 else 3)
        out["empty_rank"] = ""
    except hg.HypergradientError as err:
        out["empty_rank"] = str(err)
    try:
        dp.check_replicated({"w": torch.full((2,), float(dp.rank))}, name="w")
        out["not_replicated"] = ""
    except hg.HypergradientError as err:
        out["not_replicated"] = str(err)
    out["weighted_mean"] = str(dp.all_reduce_mean(float(dp.rank), count=dp.rank + 1))
    stats = dp.average({"A": torch.full((2, 2), float(dp.rank))}, count=dp.rank + 1)
    out["average"] = str(float(stats["A"][0, 0]))
    return out


def train(dp: hgd.DataParallel, method: str, checkpoint: Path | None = None) -> dict[str, object]:
    """A few hyper-steps of BilevelTrainer (per-weight decay) on global batches of 7."""
    x, y = _data(60, seed=4)
    xv, yv = _data(40, seed=6)
    train_set, val_set = TensorDataset(x, y), TensorDataset(xv, yv)

    def loader(dataset, batch_size):
        batches = BatchSampler(RandomSampler(dataset), batch_size, drop_last=True)
        sampler = hgd.ShardedBatchSampler(batches, dp.rank, dp.world_size)
        return DataLoader(dataset, batch_sampler=sampler)

    torch.manual_seed(100 + dp.rank)  # different on purpose: broadcast must fix it
    model = torch.nn.Linear(4, 3, dtype=torch.float64)
    dp.broadcast(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    methods = {
        "implicit": hg.Implicit(solver="cg", max_steps=10),
        "unrolled": hg.Unrolled(steps=3),
    }
    trainer = hg.BilevelTrainer(
        model,
        hg.hparams.WeightDecay("per_weight", initial=0.05),
        loader(train_set, 7),
        loader(val_set, 5),
        optimizer,
        hyper_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
        method=methods[method],
        hyper_every=3,
        wrap_loss=dp,
    )
    history = dp.fit(trainer, 4, checkpoint=checkpoint)
    hparams = {k: v.detach().clone() for k, v in trainer.hparams.items()}
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "hparams": hparams,
        "weights": weights,
        "val_loss": torch.tensor([r["val_loss"] for r in history], dtype=torch.float64),
        "train_loss": torch.tensor([r["train_loss"] for r in history], dtype=torch.float64),
    }


def compute(dp: hgd.DataParallel, checkpoint_dir: Path) -> dict[str, object]:
    results: dict[str, object] = {"world_size": dp.world_size}
    for split in ("even", "uneven"):
        for key, value in hypergradients(dp, split).items():
            results[f"{split}/{key}"] = value
    for key, value in stochastic(dp).items():
        results[f"stochastic/{key}"] = value
    results["kfac"] = kfac_factors(dp)
    for key, value in errors(dp).items():
        results[f"errors/{key}"] = value
    for method in ("implicit", "unrolled"):
        ckpt = checkpoint_dir / f"{method}.pt"
        for key, value in train(dp, method, ckpt).items():
            results[f"train_{method}/{key}"] = value
        results[f"train_{method}/checkpoint_hparams"] = torch.load(ckpt, weights_only=False)[
            "hparams"
        ]
    # how far apart the ranks are, per tensor result (0.0 means bit-identical replicas)
    spread = {k: dp.max_difference(v) for k, v in results.items() if not isinstance(v, (int, str))}
    results["spread"] = spread
    return results


def main() -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dp = hgd.init_from_env()
    out = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        # rank 0 writes the checkpoints: every rank must see the same directory
        shared = out.parent / "checkpoints" if dp.distributed else Path(tmp)
        shared.mkdir(parents=True, exist_ok=True)
        results = compute(dp, shared)
    if dp.is_main:
        torch.save(results, out)
    hgd.destroy()


if __name__ == "__main__":
    main()
