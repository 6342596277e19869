"""Per-weight decay of an MLP on digits, data-parallel over the ranks of a torchrun job.

    torchrun --nproc_per_node=2 examples/distributed_weight_decay.py   # two ranks (gloo)
    python examples/distributed_weight_decay.py                        # one process

Both print the same numbers (float64; they differ in the order examples are summed, ~1e-15):
every rank holds only its part of each global batch (64 training, 128 validation
examples), the losses are global means (``wrap_loss=dp``), and the weights and the
hyperparameters are identical on every rank after each step.  Rank 0 prints and writes the
checkpoint.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import hypergradient as hg
from hypergradient import distributed as hgd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hyper-steps", type=int, default=30)
    parser.add_argument("--checkpoint", type=Path, default=None, help="on a shared disk")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)

    dp = hgd.init_from_env()  # gloo on CPU, NCCL on GPU; one process without torchrun
    dp.print(f"{dp.world_size} rank(s), backend {dp.backend}")
    data = hg.data.load_digits_split(800, 400, seed=0, dtype=torch.float64)

    def loader(x, y, batch_size):
        # the single-process run's global batches; each rank loads only its slice of each
        batches = BatchSampler(RandomSampler(x), batch_size, drop_last=True)
        sampler = hgd.ShardedBatchSampler(batches, dp.rank, dp.world_size)
        return DataLoader(TensorDataset(x, y), batch_sampler=sampler)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    ).double()
    dp.broadcast(model)  # identical replicas, whatever each rank's RNG did
    trainer = hg.BilevelTrainer(
        model,
        hg.hparams.WeightDecay("per_weight", initial=1e-3),
        loader(data.x_train, data.y_train, 64),
        loader(data.x_val, data.y_val, 128),
        torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9),
        hyper_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        method=hg.Implicit(solver="neumann", max_steps=10),
        hyper_every=10,
        wrap_loss=dp,  # every loss the trainer evaluates is a global mean
        callbacks=[
            lambda t, r: (
                dp.print(
                    f"hyper-step {r['hyper_step']:3d}  train {r['train_loss']:.6f}  "
                    f"val {r['val_loss']:.6f}  |hypergrad| {r['hypergrad_norm']:.6e}"
                )
                if r["hyper_step"] % 10 == 0
                else None
            )
        ],
    )
    start = time.perf_counter()
    # rank 0 writes the checkpoint after every hyper-step; every rank resumes from it
    dp.fit(trainer, args.hyper_steps, checkpoint=args.checkpoint, resume=bool(args.checkpoint))
    seconds = time.perf_counter() - start

    # test accuracy: each rank scores its part of the test set; example-weighted mean
    lo, hi = hgd.shard_bounds(len(data.y_test), dp.rank, dp.world_size)
    local = trainer.evaluate([(data.x_test[lo:hi], data.y_test[lo:hi])])
    accuracy = dp.all_reduce_mean(local["accuracy"], hi - lo)
    decays = torch.cat([v.detach().reshape(-1) for v in trainer.hparams.values()]).exp()
    spread = max(dp.max_difference(model.state_dict()), dp.max_difference(trainer.hparams))
    low, mid, high = (float(q) for q in decays.quantile(torch.tensor([0.0, 0.5, 1.0])))
    dp.print(f"test accuracy {accuracy:.4f}; decays min {low:.4e} median {mid:.4e} max {high:.4e}")
    dp.print(f"replicas differ by {spread:.1e}; {seconds:.1f} s")
    hgd.destroy()


if __name__ == "__main__":
    main()
