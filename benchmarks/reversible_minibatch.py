"""Reversible learning as Maclaurin et al. (2015) ran it: mini-batch MNIST, per-layer schedules.

A tanh MLP 784-50-10 (float64, 39,760 weights) is trained by T = 1000 mini-batch
SGD-momentum steps (batch 100 of 10,000 MNIST training images, batch t fixed by the seed:
``hg.hypergrad.SeededBatches``) with one learning-rate and one momentum schedule per tensor
(W1, b1, W2, b2; 10 knots each, linear in between), learned initial scales of the two weight
matrices and a decay per weight matrix: 84 hyperparameters.  The hypergradient of the
validation loss (2,000 other training-split images) is computed

* by exact reversal (``hg.reversible_hypergrad(..., batches=...)``), with the integer state
  (weights and velocity of every tensor) checksummed before each forward step and after each
  reverse step: the reversal is bit-exact when all ``4 T`` pairs agree;
* by reverse mode (the whole run's graph kept, then one backward pass), the reference;

each in a fresh subprocess that records its time and its peak RSS over the RSS before the
call (after a warm-up call).  Central finite differences along two unit directions (the
hypergradient's own and a random one) check the derivative itself.  Nothing is tuned: the
schedules are fixed a priori (listed in the report) and the MNIST test split is not read.

    python benchmarks/reversible_minibatch.py            # 3 seeds, T = 1000 (~4 CPU-minutes)
    python benchmarks/reversible_minibatch.py --quick    # 1 seed, T = 100
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

import hypergradient as hg  # noqa: E402
from _common import (  # noqa: E402
    data_source,
    load_cache,
    machine_info,
    rerun_command,
    reset_peak_rss,
    save_cache,
    status_kib,
)
from hypergradient.data import load_mnist, to_float_split  # noqa: E402
from hypergradient.hypergrad import SeededBatches  # noqa: E402
from hypergradient.hypergrad.reversible import ExactMomentumSGD, _tensor_checksum  # noqa: E402

KEYS = ("W1", "b1", "W2", "b2")
KNOTS = 10
F64 = torch.float64
MEMORY_TARGET = 20.0  # reverse mode's peak over exact reversal's, at T = 1000
AGREEMENT_TARGET = 1e-8


# ======================================================================================
# The problem
# ======================================================================================


class Problem:
    """MNIST MLP, per-tensor schedules, per-layer initial scales and decays (one seed)."""

    def __init__(self, args, seed: int, steps: int):
        images, labels = load_mnist(args.data_dir, split="train")
        split = to_float_split(
            images, labels, args.n_train, args.n_val, n_test=1, seed=seed, dtype=F64,
            num_classes=10,
        )  # fmt: skip
        self.x, self.y = split.x_train, split.y_train
        self.xv, self.yv = split.x_val, split.y_val
        self.steps = steps
        self.batches = SeededBatches(self.x, self.y, batch_size=args.batch_size, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        d, h = self.x.shape[1], args.hidden
        self.w1 = torch.randn(d, h, generator=gen, dtype=F64) / math.sqrt(d)
        self.w2 = torch.randn(h, 10, generator=gen, dtype=F64) / math.sqrt(h)
        # a priori schedules: lr 0.05, momentum 0.9, each knot moved at random (per seed) so
        # that every tensor's schedule differs
        self.hparams = {
            "log_lr": math.log(0.05) + 0.2 * torch.randn(4, KNOTS, generator=gen, dtype=F64),
            "logit_momentum": math.log(9.0) + 0.3 * torch.randn(4, KNOTS, generator=gen, dtype=F64),
            "log_init_scale": torch.zeros(2, dtype=F64),
            "log_decay": torch.full((2,), math.log(1e-4), dtype=F64),
        }

    def knot(self, h, name, i, t):
        pos = t * (KNOTS - 1) / max(self.steps - 1, 1)
        left = min(int(pos), KNOTS - 2)
        frac = pos - left
        return h[name][i, left] * (1 - frac) + h[name][i, left + 1] * frac

    def lr(self, i):
        return lambda h, t: self.knot(h, "log_lr", i, t).exp()

    def momentum(self, i):
        return lambda h, t: torch.sigmoid(self.knot(h, "logit_momentum", i, t))

    def params0(self, h):
        scale = h["log_init_scale"].exp()
        return {
            "W1": scale[0] * self.w1,
            "b1": torch.zeros(self.w1.shape[1], dtype=F64),
            "W2": scale[1] * self.w2,
            "b2": torch.zeros(10, dtype=F64),
        }

    @staticmethod
    def forward(p, x):
        return torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

    def inner_loss(self, p, h, batch):
        x, y = batch
        decay = h["log_decay"].exp()
        penalty = decay[0] * p["W1"].pow(2).sum() + decay[1] * p["W2"].pow(2).sum()
        return F.cross_entropy(self.forward(p, x), y) + 0.5 * penalty

    def outer_loss(self, p, h):
        return F.cross_entropy(self.forward(p, self.xv), self.yv)

    def reversible(self, hparams):
        return hg.reversible_hypergrad(
            self.inner_loss,
            self.outer_loss,
            self.params0,
            hparams,
            self.steps,
            lr={k: self.lr(i) for i, k in enumerate(KEYS)},
            momentum={k: self.momentum(i) for i, k in enumerate(KEYS)},
            batches=self.batches,
        )

    def unrolled(self, hparams, *, create_graph: bool):
        """E(w_T) by plain float64 SGD-momentum on the same batches (differentiable in the
        hparams with ``create_graph``: reverse mode keeps every step's graph)."""
        p = {
            k: v if v.requires_grad else v.clone().requires_grad_(True)
            for k, v in self.params0(hparams).items()
        }
        b = {k: torch.zeros_like(v) for k, v in p.items()}
        for t in range(self.steps):
            if not create_graph:
                p = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            loss = self.inner_loss(p, hparams, self.batches(t))
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=create_graph)
            with torch.set_grad_enabled(create_graph):
                b = {
                    k: self.momentum(i)(hparams, t) * b[k] + g
                    for i, (k, g) in enumerate(zip(KEYS, grads))
                }
                p = {k: p[k] - self.lr(i)(hparams, t) * b[k] for i, k in enumerate(KEYS)}
        return self.outer_loss(p, hparams)


def reverse_mode(problem: Problem, hparams) -> dict:
    hp = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
    value = problem.unrolled(hp, create_graph=True)
    return dict(zip(hp, torch.autograd.grad(value, list(hp.values()))))


# ======================================================================================
# One arm in a fresh subprocess
# ======================================================================================


class StateChecksums:
    """Checksums of every tensor's integer (w, b) before each forward step and after each
    reverse step (``ExactMomentumSGD.step_fixed`` / ``undo_velocity_fixed`` wrapped)."""

    def __init__(self):
        self.forward: dict = {}
        self.reverse: dict = {}
        self._step, self._undo = ExactMomentumSGD.step_fixed, ExactMomentumSGD.undo_velocity_fixed

    def __enter__(self):
        outer = self

        def step_fixed(sgd, state, g, t):
            outer.forward[id(sgd), t] = (_tensor_checksum(state.w), _tensor_checksum(state.b))
            outer._step(sgd, state, g, t)

        def undo_velocity_fixed(sgd, state, g, t):
            outer._undo(sgd, state, g, t)
            outer.reverse[id(sgd), t] = (_tensor_checksum(state.w), _tensor_checksum(state.b))

        ExactMomentumSGD.step_fixed = step_fixed
        ExactMomentumSGD.undo_velocity_fixed = undo_velocity_fixed
        return self

    def __exit__(self, *exc):
        ExactMomentumSGD.step_fixed, ExactMomentumSGD.undo_velocity_fixed = self._step, self._undo

    def mismatches(self) -> int:
        keys = self.forward.keys() | self.reverse.keys()
        return sum(self.forward.get(k) != self.reverse.get(k) for k in keys)


def probe(args) -> dict:
    arm, seed = args.probe, args.probe_seed
    warm = Problem(args, seed, 3)
    (reverse_mode if arm == "reverse" else lambda p, h: p.reversible(h))(warm, warm.hparams)
    problem = Problem(args, seed, args.steps)
    gc.collect()
    rss_before = status_kib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    info = {}
    if arm == "reverse":
        grads = reverse_mode(problem, problem.hparams)
    else:
        with StateChecksums() as sums:
            result = problem.reversible(problem.hparams)
        grads = result.hypergrad
        s = result.stats
        info = {
            "states_checked": len(sums.forward),
            "state_mismatches": sums.mismatches(),
            "buffer_bytes": s.buffer_bytes,
            "trajectory_bytes": s.trajectory_bytes,
            "bits_per_weight_per_step": s.bits_per_weight_per_step,
            "expected_bits_per_weight_per_step": s.expected_bits_per_weight_per_step,
            "num_weights": s.num_weights,
        }
    wall = time.perf_counter() - start
    hwm = status_kib("VmHWM")
    save_cache({k: v.detach() for k, v in grads.items()}, args.save_to)
    measured = reset and hwm is not None and rss_before is not None
    return {
        "arm": arm,
        "seed": seed,
        "wall_s": wall,
        "peak_increase_mib": (hwm - rss_before) / 1024 if measured else None,
        "rss_before_mib": None if rss_before is None else rss_before / 1024,
        **info,
    }


def run_probe(arm: str, seed: int, args, folder: Path) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parents[1] / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    save_to = folder / f"{arm}_{seed}.pt"
    argv = [sys.executable, str(HERE), "--probe", arm, "--probe-seed", str(seed),
            "--save-to", str(save_to), "--threads", str(args.threads), "--steps",
            str(args.steps), "--n-train", str(args.n_train), "--n-val", str(args.n_val),
            "--batch-size", str(args.batch_size), "--hidden", str(args.hidden)]  # fmt: skip
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {arm} seed {seed} failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["grads"] = load_cache(save_to)
    return out


# ======================================================================================
# Agreement
# ======================================================================================


def relative_error(a: dict, b: dict) -> float:
    num = math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in b))
    den = math.sqrt(sum(float(b[k].pow(2).sum()) for k in b))
    return num / den


def finite_differences(args, seed: int, grads: dict, eps: float) -> list[dict]:
    """Central differences of E(w_T(lambda)) along the hypergradient's direction and a
    random unit direction, against <hypergradient, direction>."""
    problem = Problem(args, seed, args.steps)
    gen = torch.Generator().manual_seed(10_000 + seed)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    random = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in grads.items()}
    rnorm = math.sqrt(sum(float(v.pow(2).sum()) for v in random.values()))
    out = []
    for name, direction in (
        ("hypergradient", {k: g / norm for k, g in grads.items()}),
        ("random", {k: v / rnorm for k, v in random.items()}),
    ):

        def loss_at(step, direction=direction):
            h = {k: v + step * direction[k] for k, v in problem.hparams.items()}
            return float(problem.unrolled(h, create_graph=False))

        fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        exact = sum(float((grads[k] * direction[k]).sum()) for k in grads)
        out.append(
            {
                "direction": name,
                "fd": fd,
                "exact": exact,
                "relative_error": abs(fd - exact) / abs(exact),
            }
        )
    return out


# ======================================================================================
# Report
# ======================================================================================


def _mean_spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3g} ± {spread:.2g}"


def markdown_report(result: dict) -> str:
    m = result["machine"]
    load = m["load_average_at_start"]
    c = result["config"]
    header = (
        "| seed | reversible time | reverse time | reversible peak +MiB | reverse peak +MiB "
        "| reverse / reversible (peak) | buffer | trajectory w, b | trajectory / buffer "
        "| bits / weight / step (log2 1/mu) | states bit-exact | rel. error vs reverse "
        "| FD rel. error (grad dir, random dir) |"
    )
    rows = [header, "|" + "---:|" * 13]
    for r in result["seeds"]:
        rv, rm = r["reversible"], r["reverse"]
        fd = r["finite_differences"]
        rows.append(
            f"| {r['seed']} | {rv['wall_s']:.1f} s | {rm['wall_s']:.1f} s "
            f"| {rv['peak_increase_mib']:.1f} | {rm['peak_increase_mib']:.1f} "
            f"| {r['peak_ratio']:.0f}x | {rv['buffer_bytes'] / 2**20:.2f} MiB "
            f"| {rv['trajectory_bytes'] / 2**20:.0f} MiB | {r['buffer_ratio']:.0f}x "
            f"| {rv['bits_per_weight_per_step']:.3f} "
            f"({rv['expected_bits_per_weight_per_step']:.3f}) "
            f"| {rv['states_checked'] - rv['state_mismatches']} / {rv['states_checked']} "
            f"| {r['relative_error']:.1e} "
            f"| {fd[0]['relative_error']:.1e}, {fd[1]['relative_error']:.1e} |"
        )
    s = result["summary"]
    verdict = [
        f"- Reversal bit-exact over T = {c['steps']} mini-batch steps with per-tensor "
        f"schedules: **{'HOLDS' if s['bit_exact'] else 'FAILS'}** (every tensor's integer "
        f"weights and velocity before each forward step equal those after the matching "
        f"reverse step, in every seed).",
        f"- Hypergradient equal to reverse mode (< {AGREEMENT_TARGET:.0e}): "
        f"**{'HOLDS' if s['max_relative_error'] < AGREEMENT_TARGET else 'FAILS'}** (largest "
        f"relative error {s['max_relative_error']:.1e}); to central differences along two "
        f"directions: largest relative error {s['max_fd_error']:.1e} (eps = {c['fd_eps']:g}).",
        f"- Memory at T = {c['steps']} at least {MEMORY_TARGET:.0f}x below reverse mode: "
        f"**{'HOLDS' if s['min_peak_ratio'] >= MEMORY_TARGET else 'FAILS'}** (peak RSS "
        f"increase: reverse mode {_mean_spread(s['reverse_peaks'])} MiB vs exact reversal "
        f"{_mean_spread(s['reversible_peaks'])} MiB, ratio at least {s['min_peak_ratio']:.0f}x; "
        f"buffer vs stored trajectory at least {s['min_buffer_ratio']:.0f}x).",
    ]
    return "\n".join([
        "### Mini-batch reversible learning (`benchmarks/reversible_minibatch.py`)",
        "",
        f"{m['date']}; {m['cpu_model']}, {m['cpu_count']} CPUs; torch {m['torch']} "
        f"({m['torch_threads']} thread), Python {m['python']}; 1-minute load average at the "
        f"start {load[0]:.2f} (the machine is shared: times are upper bounds, memory is not "
        f"affected). Command: `{result['command']}`.",
        "",
        f"Tanh MLP 784-{c['hidden']}-10 (float64, {result['num_weights']:,} weights) trained "
        f"by T = {c['steps']} SGD-momentum steps on mini-batches of {c['batch_size']} from "
        f"{c['n_train']:,} MNIST training images (batch t fixed by the seed, "
        f"`SeededBatches`); validation loss on {c['n_val']:,} other training-split images. "
        f"84 hyperparameters: a learning-rate and a momentum schedule per tensor (W1, b1, "
        f"W2, b2; {KNOTS} knots each, linear in between), 2 initial scales, 2 decays. Nothing "
        f"is tuned: the schedules are fixed a priori (learning rate 0.05 and momentum 0.9, "
        f"every knot moved at random per seed: log lr + 0.2 N(0,1), logit momentum + 0.3 "
        f"N(0,1)); the MNIST test split is not read. Seeds {c['seeds']} (data split, initial "
        f"weights, batch order, schedules); mean ± standard deviation over them below the "
        f"table.",
        "",
        *rows,
        "",
        *verdict,
        "",
        "*peak +MiB* = the call's peak RSS over the RSS right before it (each arm in a fresh "
        "subprocess, after a warm-up call). *trajectory w, b* = what storing the weights and "
        "velocities of every step would take (2 P T float64 values); reverse mode's graph "
        "holds more (every step's activations and batch). *states bit-exact* = (tensor, "
        "step) pairs whose integer weights and velocity came back bit for bit. The exact "
        "reversal's time includes those checksums. *FD* = central differences of the "
        "validation loss of a plain float64 run along the unit hypergradient direction and "
        "a random unit direction, against reverse mode's directional derivative (exact "
        "reversal's agrees with reverse mode to the relative error in the table).",
        "",
    ])  # fmt: skip


# ======================================================================================
# Main
# ======================================================================================


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder holding mnist/")
    parser.add_argument("--quick", action="store_true", help="1 seed, T = 100")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-val", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=50)
    parser.add_argument("--fd-eps", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE.parent / "results")
    parser.add_argument("--probe", choices=["reversible", "reverse"], help=argparse.SUPPRESS)
    parser.add_argument("--probe-seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and not args.probe:
        args.seeds, args.steps = args.seeds[:1], 100
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(args)))
        return 0
    begun = time.perf_counter()
    result = {
        "machine": machine_info(threads=args.threads),
        "command": rerun_command("reversible_minibatch.py", sys.argv[1:]),
        "data": data_source(args.data_dir),
        "config": {
            "steps": args.steps,
            "n_train": args.n_train,
            "n_val": args.n_val,
            "batch_size": args.batch_size,
            "hidden": args.hidden,
            "seeds": args.seeds,
            "fd_eps": args.fd_eps,
            "knots": KNOTS,
        },  # fmt: skip
        "seeds": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            arms = {}
            for arm in ("reversible", "reverse"):  # interleaved per seed
                print(f"seed {seed}: {arm} (T={args.steps}) ...", flush=True)
                arms[arm] = run_probe(arm, seed, args, Path(tmp))
                r = arms[arm]
                print(f"   {r['wall_s']:.1f} s, peak +{r['peak_increase_mib']:.1f} MiB", flush=True)
            rv, rm = arms["reversible"], arms["reverse"]
            print(f"seed {seed}: finite differences ...", flush=True)
            record = {
                "seed": seed,
                "relative_error": relative_error(rv["grads"], rm["grads"]),
                "finite_differences": finite_differences(args, seed, rm["grads"], args.fd_eps),
                "peak_ratio": rm["peak_increase_mib"] / rv["peak_increase_mib"],
                "buffer_ratio": rv["trajectory_bytes"] / rv["buffer_bytes"],
            }
            for arm in arms.values():
                arm.pop("grads")
            record.update(arms)
            result["num_weights"] = rv["num_weights"]
            result["seeds"].append(record)
            print(
                f"   rel. error vs reverse {record['relative_error']:.1e}, FD "
                f"{[round(f['relative_error'], 12) for f in record['finite_differences']]}, "
                f"states {rv['states_checked'] - rv['state_mismatches']}/{rv['states_checked']}",
                flush=True,
            )
    seeds = result["seeds"]
    result["summary"] = {
        "bit_exact": all(r["reversible"]["state_mismatches"] == 0 for r in seeds),
        "max_relative_error": max(r["relative_error"] for r in seeds),
        "max_fd_error": max(f["relative_error"] for r in seeds for f in r["finite_differences"]),
        "min_peak_ratio": min(r["peak_ratio"] for r in seeds),
        "min_buffer_ratio": min(r["buffer_ratio"] for r in seeds),
        "reverse_peaks": [r["reverse"]["peak_increase_mib"] for r in seeds],
        "reversible_peaks": [r["reversible"]["peak_increase_mib"] for r in seeds],
        "reverse_seconds": [r["reverse"]["wall_s"] for r in seeds],
        "reversible_seconds": [r["reversible"]["wall_s"] for r in seeds],
    }
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - begun
    name = "reversible_minibatch_quick" if args.quick else "reversible_minibatch"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown_report(result))
    print(markdown_report(result))
    print(f"wrote {args.out}/{name}.{{json,md}} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
