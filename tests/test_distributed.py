"""Data-parallel bilevel training (hypergradient.distributed).

The main check launches ``tests/_distributed_worker.py`` exactly as a user would, with
``python -m torch.distributed.run --nproc_per_node=2`` (torchrun; gloo on CPU), and compares
what rank 0 saved with the same code run by this process on the full data (one process: the
wrapped losses are the plain losses, see ``test_single_process_is_the_identity``).  Every
tolerance below is 1e-6, the target; the measured differences are ~1e-14 (CG, whose 14
iterations amplify rounding) and ~1e-16 elsewhere, because the two runs differ only in the
order in which the per-example losses are summed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import _readme
import hypergradient as hg
from hypergradient import distributed as hgd

WORKER = Path(__file__).with_name("_distributed_worker.py")
TOL = 1e-6  # the target of the task; the float64 runs agree to ~1e-14


def _load_worker():
    spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _max_diff(a, b) -> float:
    la, lb = tree_flatten(a)[0], tree_flatten(b)[0]
    assert len(la) == len(lb) and len(la) > 0
    return max(float((x - y).abs().max()) for x, y in zip(la, lb))


def _norm(a) -> float:
    return float(sum(float((x**2).sum()) for x in tree_flatten(a)[0]) ** 0.5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two ranks via torchrun, one process) results of the worker."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    tmp = tmp_path_factory.mktemp("distributed")
    out = tmp / "two_ranks.pt"
    src = str(Path(hg.__file__).resolve().parents[1])  # the package under test, not another
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    if sys.platform == "linux":  # gloo on loopback: no dependence on the hostname resolving
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(WORKER),
        str(out),
    ]
    # the reference runs here while the two ranks start up (most of their time is imports)
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a failure kills the ranks too
    )
    try:
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            one = _load_worker().compute(hgd.DataParallel(), tmp / "one")
        finally:
            torch.set_default_dtype(old)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # a failure above: do not leave the ranks running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-6000:]
    two = torch.load(out, weights_only=True)
    return two, one


HYPERGRADIENTS = [
    "implicit_cg",
    "implicit_neumann",
    "implicit_exact",
    "unrolled_reverse",
    "unrolled_truncated",
    "reversible",
    "evograd",
]


@pytest.mark.parametrize("split", ["even", "uneven"])
@pytest.mark.parametrize("method", HYPERGRADIENTS)
def test_two_ranks_give_the_one_process_hypergradient(runs, split, method):
    two, one = runs
    assert two["world_size"] == 2 and one["world_size"] == 1
    key = f"{split}/{method}"
    assert _norm(one[key]) > 1e-5  # a real signal, not two zeros that agree
    assert _max_diff(two[key], one[key]) <= TOL
    # the replicas are the same on both ranks (an all-reduce sums in one fixed order)
    assert two["spread"][key] <= 1e-12


def test_cg_runs_the_same_iterations_on_every_rank(runs):
    two, one = runs
    for split in ("even", "uneven"):
        assert two[f"{split}/cg_steps"] == one[f"{split}/cg_steps"] > 1


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_two_ranks_train_the_one_process_hyperparameters(runs, method):
    two, one = runs
    prefix = f"train_{method}/"
    # batches of 7 training and 5 validation examples: shards of 4/3 and 3/2 (unequal)
    init = torch.log(torch.tensor(0.05))
    for k, v in one[prefix + "hparams"].items():
        assert float((v - init).abs().max()) > 0.05, k  # four hyper-steps moved them
    for part in ("hparams", "weights", "val_loss", "train_loss"):
        assert _max_diff(two[prefix + part], one[prefix + part]) <= TOL, part
        assert two["spread"][prefix + part] <= 1e-12, part
    # rank 0 wrote the checkpoint after the last hyper-step
    assert _max_diff(two[prefix + "checkpoint_hparams"], two[prefix + "hparams"]) == 0.0


def test_stochastic_solvers_split_each_batch(runs):
    two, one = runs
    for solver in ("SOBA", "SABA"):
        key = f"stochastic/{solver}"
        assert _max_diff(two[key]["x"], one[key]["x"]) <= TOL
        assert _max_diff(two[key]["z"], one[key]["z"]) <= TOL
        assert two["spread"][key] <= 1e-12


def test_averaged_kfac_factors_are_the_global_batch_factors(runs):
    # the factors are means over examples, so c_r-weighted averaging of 9 + 4 rows is exact
    two, one = runs
    assert _max_diff(two["kfac"], one["kfac"]) <= TOL
    assert two["spread"]["kfac"] <= 1e-12


def test_forward_mode_is_refused_with_a_fix(runs):
    two, _ = runs
    for split in ("even", "uneven"):
        message = two[f"{split}/forward_refused"]
        assert "torch.func transform" in message and "mode='reverse'" in message


def test_collective_checks(runs):
    two, _ = runs
    assert "rank(s) [1] have an empty batch (examples per rank: [3, 0])" in two["errors/empty_rank"]
    assert "replicas differ by up to 1.000e+00" in two["errors/not_replicated"]
    # ranks 0 and 1 report 0.0 and 1.0 over 1 and 2 examples: (0*1 + 1*2) / 3
    assert float(two["errors/weighted_mean"]) == pytest.approx(2 / 3, abs=1e-15)
    assert float(two["errors/average"]) == pytest.approx(2 / 3, abs=1e-15)


# ---------------------------------------------------------------------- one process


def test_single_process_is_the_identity():
    dp = hgd.DataParallel()
    assert (dp.rank, dp.world_size, dp.is_main, dp.distributed) == (0, 1, True, False)

    def loss(p, h):
        return (p["w"] * h["a"]).sum()

    assert dp.wrap(loss, count=3) is loss
    assert dp(loss, 3) is loss
    tree = {"w": torch.ones(2, requires_grad=True)}
    assert dp.replicate(tree) is tree
    assert dp.max_difference(tree) == 0.0
    dp.check_replicated(tree)
    model = torch.nn.Linear(2, 1)
    assert dp.broadcast(model) is model
    assert dp.all_reduce_mean(0.25, 4) == 0.25
    stats = {"A": torch.eye(2)}
    averaged = dp.average(stats, count=5)
    assert torch.equal(averaged["A"], stats["A"]) and averaged["A"] is not stats["A"]
    assert dp.log_dir("runs/x") == "runs/x"
    assert hgd.init_from_env().world_size == 1  # no WORLD_SIZE here: one process


def test_shard_bounds_cover_everything_once():
    for n in (0, 1, 7, 13):
        for world in (1, 2, 3, 5):
            bounds = [hgd.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1
    assert hgd.shard_bounds(7, 0, 2) == (0, 4) and hgd.shard_bounds(7, 1, 2) == (4, 7)


def test_sharded_batch_sampler_splits_the_single_process_batches():
    data = TensorDataset(torch.arange(20.0))
    reference = DataLoader(data, batch_size=7, shuffle=True, drop_last=True)

    def batches(loader):
        torch.manual_seed(3)  # what BilevelTrainer's batch stream does on every rank
        return [b[0].tolist() for b in loader]

    parts = []
    for rank in range(3):
        sampler = hgd.ShardedBatchSampler(
            BatchSampler(RandomSampler(data), 7, drop_last=True), rank, 3
        )
        parts.append(batches(DataLoader(data, batch_sampler=sampler)))
        assert len(sampler) == 2
    joined = [sum((p[i] for p in parts), []) for i in range(2)]
    assert joined == batches(reference)
    assert [len(p[0]) for p in parts] == [3, 2, 2]


def test_errors():
    dp = hgd.DataParallel()
    with pytest.raises(hg.HypergradientError, match=r"rank\(s\) \[0\] have an empty batch"):
        dp.counts(0)
    with pytest.raises(hg.HypergradientError, match=r"counts\(count=-1\): expected the number"):
        dp.counts(-1)
    with pytest.raises(hg.HypergradientError, match=r"wrap\(loss=...\): expected a callable"):
        dp.wrap("loss", count=2)
    with pytest.raises(hg.HypergradientError, match=r"wrap_indexed\(loss=...\): expected"):
        dp.wrap_indexed(3)
    with pytest.raises(hg.HypergradientError, match=r"broadcast\(obj=...\): expected an nn"):
        dp.broadcast([torch.ones(1)])
    with pytest.raises(hg.HypergradientError, match=r"a process group was given"):
        hgd.DataParallel(group=object())
    with pytest.raises(hg.HypergradientError, match=r"expected world_size >= 1"):
        hgd.shard_bounds(3, 2, 2)
    with pytest.raises(hg.HypergradientError, match=r"expected world_size >= 1"):
        hgd.ShardedBatchSampler([[0, 1]], 0, 0)
    with pytest.raises(hg.HypergradientError, match=r"leaves rank 2 of 3 without one"):
        list(hgd.ShardedBatchSampler([[0, 1]], 2, 3))
    with pytest.raises(hg.HypergradientError, match=r"resuming needs checkpoint"):
        dp.fit(object(), 1, resume=True)


def test_init_from_env_says_how_to_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(hg.HypergradientError, match=r"torchrun --nproc_per_node=2"):
        hgd.init_from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    if not torch.cuda.is_available():
        with pytest.raises(hg.HypergradientError, match=r"NCCL needs CUDA"):
            hgd.init_from_env(backend="nccl")


def test_trainer_without_wrap_loss_is_unchanged():
    # wrap_loss=None must leave the single-process trainer exactly as it was: the same
    # trajectory as a trainer given the one-process DataParallel (whose wrap is the identity)
    def make(wrap_loss):
        torch.manual_seed(0)
        x, y = torch.randn(30, 3), torch.randint(0, 2, (30,))
        model = torch.nn.Linear(3, 2)
        trainer = hg.BilevelTrainer(
            model,
            hg.hparams.WeightDecay("per_tensor"),
            DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True),
            DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True),
            torch.optim.SGD(model.parameters(), lr=0.1),
            method=hg.Unrolled(steps=2),
            hyper_every=2,
            wrap_loss=wrap_loss,
        )
        trainer.fit(3)
        return trainer

    plain, wrapped = make(None), make(hgd.DataParallel())
    for k in plain.hparams:
        assert torch.equal(plain.hparams[k], wrapped.hparams[k])
    assert [r["val_loss"] for r in plain.history] == [r["val_loss"] for r in wrapped.history]


# ---------------------------------------------------------------------- documentation

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "docs" / "guides" / "distributed.md"  # the section moved to the site


def _readme_section() -> str:
    text = README.read_text()
    start = text.index("# Data-parallel bilevel training (torch.distributed)")
    return text[start:]


README_EXAMPLE = _readme.example("hgd.init_from_env()")


def test_readme_example_prints_what_the_readme_says():
    section = _readme_section()
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert block == README_EXAMPLE.block.code
    # in a fresh interpreter, as a reader pastes it: one process
    printed = README_EXAMPLE.run().stdout.splitlines()
    # one process prints the digits the README shows for two ranks
    claimed = re.findall(r"ranks 2: (\w+) (-?[0-9.]+)", section)
    assert [f"ranks 1: {name} {value}" for name, value in claimed] == printed


def test_example_script_prints_the_readme_lines(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["distributed_weight_decay.py", "--hyper-steps", "10"])
    script = ROOT / "examples" / "distributed_weight_decay.py"
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "1 rank(s), backend None"
    # the README shows the two-rank run; its hyper-step 10 line is the same on one process
    line = next(x for x in _readme_section().splitlines() if x.startswith("hyper-step  10"))
    assert printed[1] == line
