"""EvoGrad learns a rotation angle, and what it costs next to second-order hypergradients.

The rotation toy of Bohdal, Yang, Hospedales (NeurIPS 2021, EvoGrad), on scikit-learn's
8x8 digits: the validation and test images are rotated by 30 degrees, the training images are
not; the hyperparameter is one angle, applied *differentiably* to every training image
(``affine_grid`` + ``grid_sample``, bilinear), and tuned so that the model trained on the
rotated training images does well on the rotated validation set.  Model: MLP 64-64-10 tanh,
Adam 3e-3; angle: Adam 1e-2 (radians, starts at 0); batch 64 at both levels; one inner step
per hyper-step (``BilevelTrainer(hyper_every=1)``), 1500 hyper-steps.  Runs per seed:

* ``none``: no meta-learning (angle fixed at 0), 1500 training steps;
* ``evograd``: ``hg.EvoGrad()`` (K=2 copies, sigma=1e-3, temperature=0.05);
* ``unrolled-1``: ``hg.Unrolled(steps=1)``, the second-order one-step look-ahead hypergradient;
* ``implicit``: ``hg.Implicit()`` (the trainer's default: Neumann series, 10 terms);
* ``oracle``: angle fixed at the true 30 degrees (what a perfect hyperparameter gives).

Cost of one hypergradient (the method's ``hypergrad`` call on the same weights and batches;
the rest of a hyper-step is the same for every method), on the digits MLP (batch 64) and, when
the MNIST files are found (``--data-dir``, default ``$HYPERGRADIENT_DATA``), on the paper's
LeNet at MNIST scale (28x28, batch 128):

* time: one process, methods interleaved, median of many calls (one torch thread);
* memory, two ways: (1) *tensor-level accounting*: a ``TorchDispatchMode`` sees every tensor
  that every op (forward and backward) allocates during the call and tracks the live bytes
  (storages freed as they die), whose peak is the method's working set, exactly and
  deterministically, independent of the allocator; (2) the process's peak RSS: one fresh
  subprocess per method, warm-up calls first, then ``/proc/self/clear_refs`` reset and
  ``VmHWM`` - ``VmRSS`` after the measured calls (coarse: page- and allocator-granular, so
  it only resolves the LeNet setup).

Run from the repository root::

    PYTHONPATH=src python benchmarks/evograd_rotation.py          # ~4 minutes
    PYTHONPATH=src python benchmarks/evograd_rotation.py --quick  # < 1 minute

Writes ``<out>/evograd_rotation.{json,md,png}``.  Targets (papers.md section 14):
EvoGrad's learned angle within 3 degrees of 30 and rotated-test accuracy >= 0.95; EvoGrad
cheaper than the second-order methods in time and in memory.
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
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg

from _common import machine_info, rerun_command, status_kib
from hypergradient.hparams import AbstractHyperparameter

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
TRUE_ANGLE_DEG = 30.0
ANGLE_TOL_DEG, ACC_TARGET = 3.0, 0.95
MODEL_LR, ANGLE_LR, BATCH = 3e-3, 1e-2, 64
METHODS = ("evograd", "unrolled-1", "implicit")  # the hypergradient methods compared
RUNS = ("none", *METHODS, "oracle")
TRAJECTORY_EVERY = 5  # hyper-steps between the recorded points of the angle's trajectory


def make_method(
    name: str, seed: int = 0, device: str = "cpu"
) -> hg.hypergrad.AbstractHypergradientMethod:
    if name == "evograd":  # seeded noise, drawn where the weights are
        return hg.EvoGrad(generator=torch.Generator(device=device).manual_seed(10_000 + seed))
    if name == "unrolled-1":
        return hg.Unrolled(steps=1)
    if name == "implicit":
        return hg.Implicit()
    raise ValueError(name)


# ======================================================================================
# The task
# ======================================================================================


def rotate(images: torch.Tensor, angle: torch.Tensor, side: int) -> torch.Tensor:
    """Rotate square images (any leading shape ``(B, ...)`` of ``side*side`` pixels) by
    ``angle`` radians about their centre; bilinear, zeros outside; differentiable in
    ``angle`` (a 0-d tensor)."""
    x = images.reshape(-1, 1, side, side)
    c, s, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([c, -s, zero]), torch.stack([s, c, zero])])
    theta = theta.to(x.dtype).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(images.shape)


class RotationAngle(AbstractHyperparameter):
    """One learnable rotation angle (radians) applied to every training image."""

    def __init__(self, side: int):
        self.side = side

    def init(self, params):
        dtype = next(iter(params.values())).dtype
        return {"angle": torch.zeros((), dtype=dtype)}

    def training_loss(self, forward, params, hparams, batch, criterion=F.cross_entropy):
        x, y = batch[0], batch[1]
        logits = forward(params, rotate(x, hparams["angle"], self.side))
        return criterion(logits, y, reduction="none").mean()

    def describe(self, hparams):
        return {"angle_deg": math.degrees(float(hparams["angle"].detach()))}


class LeNet(nn.Module):
    """LeNet-5 on 28x28 inputs given flat (B, 784): the paper's MNIST model (44k weights)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)
        )

    def forward(self, x):
        return self.classifier(self.features(x.reshape(-1, 1, 28, 28)).flatten(1))


def build_model(setup: str) -> nn.Module:
    if setup == "digits":
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return LeNet()


def load_digits_task(seed: int, n_train: int = 1000, n_val: int = 300) -> dict:
    """Upright training images; validation and test rotated by 30 degrees."""
    split = hg.data.load_digits_split(n_train, n_val, seed=seed)
    angle = torch.tensor(math.radians(TRUE_ANGLE_DEG))
    with torch.no_grad():
        return {
            "train": (split.x_train, split.y_train),
            "val": (rotate(split.x_val, angle, 8), split.y_val),
            "test": (rotate(split.x_test, angle, 8), split.y_test),
        }


def loader(xy, batch_size: int, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*xy), batch_size=batch_size, shuffle=shuffle
    )


def run_one(run: str, seed: int, steps: int, data: dict) -> dict:
    """One training run of ``run`` (see the module docstring); returns its results."""
    torch.manual_seed(seed)
    model = build_model("digits")
    trainer = hg.BilevelTrainer(
        model,
        RotationAngle(side=8),
        loader(data["train"], BATCH, True),
        loader(data["val"], BATCH, True),
        torch.optim.Adam(model.parameters(), lr=MODEL_LR),
        hyper_optimizer=lambda h: torch.optim.Adam(h, lr=ANGLE_LR),
        method=make_method(run, seed) if run in METHODS else None,
        hyper_every=1,
        seed=seed,
    )
    start = time.perf_counter()
    if run in METHODS:
        trainer.fit(steps)
    else:  # no hyper-steps: the angle stays where it is put
        if run == "oracle":
            with torch.no_grad():
                trainer.hparams["angle"].fill_(math.radians(TRUE_ANGLE_DEG))
        trainer.inner_steps(steps)
    seconds = time.perf_counter() - start
    angle = math.degrees(float(trainer.hparams["angle"].detach()))
    tail = [r["angle_deg"] for r in trainer.history[-max(1, steps // 10) :]]
    return {
        "run": run,
        "seed": seed,
        "angle_deg": angle,
        # the last 10% of the trajectory: how much the noisy hypergradient makes it jitter
        "angle_tail_mean_deg": statistics.fmean(tail) if tail else angle,
        "angle_tail_std_deg": statistics.pstdev(tail) if len(tail) > 1 else 0.0,
        "test_accuracy": trainer.evaluate(loader(data["test"], 512, False))["accuracy"],
        "val_accuracy": trainer.evaluate(loader(data["val"], 512, False))["accuracy"],
        "seconds": seconds,
        "hyper_step_ms": (
            1e3 * statistics.median(r["seconds"] for r in trainer.history)
            if trainer.history
            else None
        ),
        # every TRAJECTORY_EVERY-th hyper-step to 0.01 degree (far finer than the jitter):
        # enough for the plot, and keeps the JSON small
        "angle_trajectory_deg": [
            round(r["angle_deg"], 2)
            for r in trainer.history[TRAJECTORY_EVERY - 1 :: TRAJECTORY_EVERY]
        ],
    }


def accuracy_experiment(seeds: int, steps: int, log) -> dict:
    runs = []
    for seed in range(seeds):
        data = load_digits_task(seed)
        for run in RUNS:
            result = run_one(run, seed, steps, data)
            log(
                f"  seed {seed} {run:>10}: angle {result['angle_deg']:6.2f} deg, rotated-test "
                f"accuracy {result['test_accuracy']:.3f} ({result['seconds']:.1f} s)"
            )
            runs.append(result)
    summary = {}
    for run in RUNS:
        rows = [r for r in runs if r["run"] == run]
        acc = [r["test_accuracy"] for r in rows]
        ang = [r["angle_deg"] for r in rows]
        summary[run] = {
            "test_accuracy_mean": statistics.fmean(acc),
            "test_accuracy_std": statistics.pstdev(acc),
            "angle_deg_mean": statistics.fmean(ang),
            "angle_deg_std": statistics.pstdev(ang),
            "max_angle_error_deg": max(abs(a - TRUE_ANGLE_DEG) for a in ang),
            "seconds_mean": statistics.fmean(r["seconds"] for r in rows),
            "hyper_step_ms_median": (
                statistics.median(r["hyper_step_ms"] for r in rows)
                if rows[0]["hyper_step_ms"] is not None
                else None
            ),
        }
    ev = summary["evograd"]
    summary["evograd_meets_target"] = bool(
        ev["max_angle_error_deg"] < ANGLE_TOL_DEG
        and min(r["test_accuracy"] for r in runs if r["run"] == "evograd") >= ACC_TARGET
    )
    return {"runs": runs, "summary": summary}


# ======================================================================================
# Cost of one hypergradient
# ======================================================================================


class PeakTensorBytes(TorchDispatchMode):
    """Peak live bytes of the tensors allocated inside the context (tensor-level accounting).

    Every op's outputs are inspected; a storage not seen before and not shared with one of
    the op's inputs (a view or an in-place result of an existing tensor is no new memory) is
    counted until it is freed (a weakref finalizer on the storage).  Tensors that existed
    before the context (weights, data) are not counted: the result is the working set that
    the measured computation adds.
    """

    def __init__(self):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self._seen or (storage.data_ptr() in inputs and storage.nbytes()):
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            self.current += nbytes
            weakref.finalize(storage, self._free, nbytes)
            self.peak = max(self.peak, self.current)
        return out


def cost_problem(setup: str, data_dir: str | None, device: str = "cpu"):
    """(inner_loss, outer_loss, params, hparams, description) on fixed batches."""
    torch.manual_seed(0)
    model = build_model(setup).to(device)
    if setup == "digits":
        task = load_digits_task(0)
        xt, yt = task["train"][0][:BATCH], task["train"][1][:BATCH]
        xv, yv = task["val"][0][:BATCH], task["val"][1][:BATCH]
        side, batch = 8, BATCH
    else:
        images, labels = hg.data.load_mnist(data_dir, split="train", limit=256)
        x = images.reshape(256, 784).float() / 255.0
        angle = torch.tensor(math.radians(TRUE_ANGLE_DEG))
        xt, yt = x[:128], labels[:128]
        xv, yv = rotate(x[128:], angle, 28), labels[128:]
        side, batch = 28, 128
    xt, yt, xv, yv = (t.to(device) for t in (xt, yt, xv, yv))
    forward = hg.as_function(model)
    kind = RotationAngle(side)

    def inner_loss(p, h):
        return kind.training_loss(forward, p, h, (xt, yt))

    def outer_loss(p, h):
        return F.cross_entropy(forward(p, xv), yv)

    params = {k: v.detach() for k, v in model.named_parameters()}
    hparams = {"angle": torch.tensor(math.radians(10.0), device=device)}
    num_weights = sum(v.numel() for v in params.values())
    if setup == "digits":
        description = f"digits MLP 64-64-10 ({num_weights:,} weights), batch {batch}"
    else:
        description = f"MNIST LeNet-5 ({num_weights:,} weights), batch {batch}"
    return inner_loss, outer_loss, params, hparams, description


def _device_of(problem) -> str:
    return next(iter(problem[2].values())).device.type


def _call(method, problem):
    inner_loss, outer_loss, params, hparams, _ = problem
    out = method.hypergrad(inner_loss, outer_loss, params, hparams, lr=MODEL_LR)
    if _device_of(problem) == "cuda":
        torch.cuda.synchronize()  # time the work, not its launch
    return out


def time_methods(problem, calls: int) -> dict:
    """Seconds per hypergradient; the methods take turns call by call.

    Two clocks: this process's CPU time (``time.process_time``: with one torch thread, the
    work the call does, whatever else the machine runs; CPU only) and wall time.  Medians,
    and the wall-time minimum (the least disturbed call).
    """
    device = _device_of(problem)
    methods = {name: make_method(name, device=device) for name in METHODS}
    for method in methods.values():  # warm-up
        _call(method, problem)
    wall = {name: [] for name in METHODS}
    cpu = {name: [] for name in METHODS}
    for i in range(calls):
        order = METHODS if i % 2 == 0 else tuple(reversed(METHODS))
        for name in order:
            start_cpu, start = time.process_time(), time.perf_counter()
            _call(methods[name], problem)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    out = {
        "wall_median": {n: statistics.median(s) for n, s in wall.items()},
        "wall_min": {n: min(s) for n, s in wall.items()},
    }
    if device == "cpu":
        out["cpu_median"] = {n: statistics.median(s) for n, s in cpu.items()}
    # the clock the ratios are judged on: CPU time on a CPU, wall time on a GPU
    out["judged"] = out.get("cpu_median", out["wall_median"])
    return out


def tensor_memory(problem) -> tuple[dict, dict]:
    """Peak bytes allocated by one hypergradient (after a warm-up call), per method: by
    tensor-level accounting, and on CUDA also by the caching allocator's own peak."""
    device = _device_of(problem)
    tensors, allocator = {}, {}
    for name in METHODS:
        method = make_method(name, device=device)
        _call(method, problem)
        gc.collect()
        with PeakTensorBytes() as tracker:
            _call(method, problem)
        tensors[name] = tracker.peak
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            _call(method, problem)
            allocator[name] = torch.cuda.max_memory_allocated() - before
    return tensors, allocator


def rss_probe(setup: str, method_name: str, data_dir: str | None) -> dict:
    """In a fresh process: peak RSS of 5 hypergradients over the RSS right before them."""
    problem = cost_problem(setup, data_dir)
    method = make_method(method_name)
    for _ in range(3):  # warm-up: lazy initialisation and allocator pools are not the method
        _call(method, problem)
    gc.collect()
    before = status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark
    except OSError:
        return {"peak_increase_kib": None}
    for _ in range(5):
        _call(method, problem)
    hwm = status_kib("VmHWM")
    return {"peak_increase_kib": None if hwm is None or before is None else hwm - before}


def rss_memory(setup: str, data_dir: str | None, threads: int) -> dict:
    # Tensors above 64 KiB get their own mmap, returned to the OS when freed, so the RSS
    # before the measured calls is live memory rather than glibc's cache of the warm-up.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parents[1] / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    out = {}
    for name in METHODS:
        argv = [sys.executable, str(HERE), "--rss-probe", name, "--setup", setup,
                "--threads", str(threads)]  # fmt: skip
        if data_dir is not None:
            argv += ["--data-dir", data_dir]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS probe {setup}/{name} failed:\n{proc.stderr}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_increase_kib"]
    return out


def mnist_available(data_dir: str | None) -> bool:
    try:
        hg.data.load_mnist(data_dir, split="train", limit=1)
        return True
    except hg.HypergradientError:
        return False


def cost_experiment(setups, calls: int, rss: bool, data_dir, threads: int, device, log) -> dict:
    out = {}
    for setup in setups:
        problem = cost_problem(setup, data_dir, device)
        # LeNet's implicit hypergradient takes ~0.3 s: fewer calls there keep the run short
        n = calls if setup == "digits" else max(5, calls // 2)
        log(f"  {problem[4]} on {device}: timing {n} calls per method ...")
        seconds = time_methods(problem, n)
        peak_bytes, allocator_bytes = tensor_memory(problem)
        rss_kib = rss_memory(setup, data_dir, threads) if rss and device == "cpu" else {}
        out[setup] = {
            "description": problem[4],
            "device": device,
            "timed_calls": n,
            "seconds": seconds,
            "tensor_peak_bytes": peak_bytes,
            "cuda_allocator_peak_bytes": allocator_bytes,
            "rss_peak_increase_kib": rss_kib,
            "time_ratio_vs_evograd": {
                m: seconds["judged"][m] / seconds["judged"]["evograd"] for m in METHODS
            },
            "memory_ratio_vs_evograd": {m: peak_bytes[m] / peak_bytes["evograd"] for m in METHODS},
        }
        for m in METHODS:
            log(
                f"    {m:>10}: {1e3 * seconds['judged'][m]:7.2f} ms, tensor peak "
                f"{peak_bytes[m] / 2**20:7.3f} MiB, RSS +{rss_kib.get(m)} KiB"
            )
    return out


# ======================================================================================
# Reporting
# ======================================================================================


LABELS = {
    "none": "no meta-learning (angle 0)",
    "evograd": "EvoGrad (K=2, sigma=1e-3, tau=0.05)",
    "unrolled-1": "1-step unrolled (2nd order)",
    "implicit": "implicit, Neumann-10 (2nd order)",
    "oracle": "oracle (angle fixed at 30)",
}


def _md_table(columns, rows) -> list[str]:
    align = ["---"] + ["---:"] * (len(columns) - 1)
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _header(result: dict) -> list[str]:
    m = result["machine"]
    load = m["load_average_at_start"][0] if m["load_average_at_start"] else None
    gpu = f"; GPU {m['gpu']}" if m.get("gpu") else ""
    return [
        "### EvoGrad: learning a rotation angle (`benchmarks/evograd_rotation.py`)",
        "",
        f"{m['date']}; {m['cpu_model']}, {m['cpu_count']} CPUs{gpu}; torch {m['torch']} "
        f"({m['torch_threads']} CPU thread), Python {m['python']}; 1-minute load average at "
        f"the start {'-' if load is None else f'{load:.2f}'}. Command: `{result['command']}`.",
        "",
    ]


def _accuracy_markdown(result: dict) -> list[str]:
    cfg, acc = result["config"], result["accuracy"]
    rows = []
    for run in RUNS:
        s = acc["summary"][run]
        per_seed = [r for r in acc["runs"] if r["run"] == run]
        rows.append([
            LABELS[run],
            f"{s['test_accuracy_mean']:.3f} ± {s['test_accuracy_std']:.3f}",
            f"{s['angle_deg_mean']:.2f} ± {s['angle_deg_std']:.2f}",
            ", ".join(f"{r['angle_deg']:.1f}" for r in per_seed),
            f"{s['max_angle_error_deg']:.1f}",
            "-" if s["hyper_step_ms_median"] is None else f"{s['hyper_step_ms_median']:.2f}",
        ])  # fmt: skip
    ev = acc["summary"]["evograd"]
    mean_ok = abs(ev["angle_deg_mean"] - TRUE_ANGLE_DEG) < ANGLE_TOL_DEG
    acc_ok = min(r["test_accuracy"] for r in acc["runs"] if r["run"] == "evograd") >= ACC_TARGET
    return [
        f"Digits 8x8 ({cfg['n_train']} upright training images; {cfg['n_val']} validation "
        f"and the remaining test images rotated by 30°), MLP 64-64-10 tanh with Adam "
        f"{MODEL_LR:g}; one learnable angle (radians, from 0) rotating every training image "
        f"differentiably (affine_grid/grid_sample), Adam {ANGLE_LR:g}; batch {BATCH}; "
        f"{cfg['steps']} hyper-steps, one inner step each; {cfg['seeds']} seed(s), mean ± "
        f"std over seeds.",
        "",
        *_md_table(
            (
                "run",
                "rotated-test accuracy",
                "learned angle (°)",
                "per seed (°)",
                "max \\|angle − 30°\\|",
                "hyper-step ms (median)",
            ),
            rows,
        ),  # fmt: skip
        "",
        f"Targets: accuracy ≥ {ACC_TARGET} in every seed: "
        f"**{'met' if acc_ok else 'NOT met'}**; mean learned angle within "
        f"{ANGLE_TOL_DEG:g}° of 30°: **{'met' if mean_ok else 'NOT met'}**; every seed's "
        f"angle within {ANGLE_TOL_DEG:g}°: "
        f"**{'met' if ev['max_angle_error_deg'] < ANGLE_TOL_DEG else 'NOT met'}** (worst "
        f"seed {ev['max_angle_error_deg']:.1f}° off). *hyper-step ms* = the trainer's whole "
        f"hyper-step (one inner Adam step, one hypergradient on fresh batches, the validation "
        f"loss, Adam on the angle).",
        "",
    ]


def _cost_markdown(result: dict) -> list[str]:
    costs = result["cost"]
    cuda = any(c["cuda_allocator_peak_bytes"] for c in costs.values())
    rows = []
    for c in costs.values():
        for name in METHODS:
            rss = c["rss_peak_increase_kib"].get(name)
            rss_ev = c["rss_peak_increase_kib"].get("evograd")
            row = [
                c["description"] if name == "evograd" else "",
                LABELS[name].split(" (")[0] if name != "implicit" else "implicit Neumann-10",
                f"{1e3 * c['seconds']['judged'][name]:.2f}",
                f"{1e3 * c['seconds']['wall_median'][name]:.2f} "
                f"({1e3 * c['seconds']['wall_min'][name]:.2f})",
                f"{c['time_ratio_vs_evograd'][name]:.2f}",
                f"{c['tensor_peak_bytes'][name] / 2**20:.3f}",
                f"{c['memory_ratio_vs_evograd'][name]:.2f}",
            ]
            if cuda:
                peak = c["cuda_allocator_peak_bytes"]
                row += [f"{peak[name] / 2**20:.3f}", f"{peak[name] / peak['evograd']:.2f}"]
            else:
                # below 1 MiB the page-granular RSS is noise: no ratio of noise
                resolved = rss is not None and rss_ev is not None and min(rss, rss_ev) >= 1024
                row += [
                    "-" if rss is None else f"{rss / 1024:.1f}",
                    f"{rss / rss_ev:.2f}" if resolved else "-",
                ]
            rows.append(row)
    device = next(iter(costs.values()))["device"]
    clock = "CPU ms" if device == "cpu" else "ms"
    columns = ["setup", "method", f"{clock} / hypergradient", "wall ms: median (min)",
               "time ÷ EvoGrad", "tensor peak MiB", "memory ÷ EvoGrad"]  # fmt: skip
    columns += (
        ["CUDA allocator peak MiB", "allocator ÷ EvoGrad"]
        if cuda
        else ["RSS peak +MiB", "RSS ÷ EvoGrad"]
    )
    second = (
        "and the CUDA caching allocator's peak over what was allocated before the call"
        if cuda
        else "and the process's peak-RSS increase in a fresh subprocess"
    )
    timing = (
        "median CPU time of the process (one torch thread: the call's own work, whatever "
        "else the machine runs), which the ratios use, and wall time"
        if device == "cpu"
        else "median wall time, which the ratios use"
    )
    return [
        f"Cost of one hypergradient on {device} (same weights, same batches; time: "
        f"{' / '.join(str(c['timed_calls']) for c in costs.values())} interleaved calls per "
        f"method (per setup) in one process, "
        f"{timing}; memory: peak bytes of the tensors the call allocates, by tensor-level "
        f"accounting, {second}):",
        "",
        *_md_table(columns, rows),
        "",
        "*tensor peak* counts every tensor allocated during the call (forward and backward, "
        "via a `TorchDispatchMode`) while it is alive, not the weights and data that exist "
        "before it: exact and repeatable. "
        + (
            "*CUDA allocator peak*: `torch.cuda.max_memory_allocated()` after "
            "`reset_peak_memory_stats()`, minus `memory_allocated()` before the call."
            if cuda
            else "*RSS peak* is what the process's resident memory rose to (VmHWM after "
            "resetting it via `/proc/self/clear_refs`, minus VmRSS before): it includes "
            "allocator slack and is page-granular, so at the digits MLP's scale (kilobytes) "
            "it is noise; at LeNet scale it tracks the tensor count."
        ),
        "",
    ]


def markdown_report(result: dict) -> str:
    lines = _header(result)
    if "accuracy" in result:
        lines += _accuracy_markdown(result)
    lines += _cost_markdown(result)
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"evograd": "C0", "unrolled-1": "C1", "implicit": "C2"}
    for r in result["accuracy"]["runs"]:
        if r["run"] in METHODS:
            label = LABELS[r["run"]] if r["seed"] == 0 else None
            steps = [TRAJECTORY_EVERY * (i + 1) for i in range(len(r["angle_trajectory_deg"]))]
            ax1.plot(steps, r["angle_trajectory_deg"], color=colors[r["run"]], lw=0.8, label=label)
    ax1.axhline(TRUE_ANGLE_DEG, color="k", ls="--", lw=0.8, label="true angle (30°)")
    ax1.set_xlabel("hyper-step")
    ax1.set_ylabel("learned angle (degrees)")
    ax1.set_title("Learned rotation angle (digits, every seed)")
    ax1.legend(fontsize=8)
    setups = list(result["cost"])
    width = 0.8 / len(METHODS)
    for i, name in enumerate(METHODS):
        xs = [j + (i - 1) * width for j in range(2 * len(setups))]
        ys = []
        for setup in setups:
            c = result["cost"][setup]
            ys += [c["time_ratio_vs_evograd"][name], c["memory_ratio_vs_evograd"][name]]
        ax2.bar(xs, ys, width, color=colors[name], label=name)
    ax2.set_xticks(range(2 * len(setups)))
    ax2.set_xticklabels([f"{s}\n{k}" for s in setups for k in ("time", "memory")], fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylabel("cost of one hypergradient ÷ EvoGrad's")
    ax2.set_title("Cost relative to EvoGrad")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ======================================================================================
# Entry point
# ======================================================================================


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 400 steps, no RSS")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="hyper-steps (default 1500)")
    parser.add_argument("--calls", type=int, default=None, help="timed calls (default 40)")
    parser.add_argument("--skip-rss", action="store_true", help="no RSS subprocesses")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with mnist/ (default $HYPERGRADIENT_DATA, else ~/.cache/hypergradient)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="device of the cost part"
    )
    parser.add_argument(
        "--cost-only",
        action="store_true",
        help="skip the rotation runs; write evograd_rotation_cost_<device>.{json,md}",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--rss-probe", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--setup", choices=("digits", "mnist"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_probe:
        print(json.dumps(rss_probe(args.setup, args.rss_probe, args.data_dir)))
        return 0
    seeds = args.seeds or (1 if args.quick else 3)
    steps = args.steps or (400 if args.quick else 1500)
    calls = args.calls or (10 if args.quick else 40)
    rss = not (args.skip_rss or args.quick)
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    result = {
        "machine": machine_info(threads=args.threads, device=args.device),
        "command": rerun_command("evograd_rotation.py", sys.argv[1:]),
        "config": {"seeds": seeds, "steps": steps, "n_train": 1000, "n_val": 300,
                   "batch": BATCH, "model_lr": MODEL_LR, "angle_lr": ANGLE_LR,
                   "true_angle_deg": TRUE_ANGLE_DEG, "timed_calls": calls},
    }  # fmt: skip
    if not args.cost_only:
        print(f"Rotation task: {seeds} seed(s) x {len(RUNS)} runs of {steps} steps ...")
        result["accuracy"] = accuracy_experiment(seeds, steps, lambda s: print(s, flush=True))
    setups = ["digits"] + (["mnist"] if mnist_available(args.data_dir) else [])
    print("Cost of one hypergradient:", flush=True)
    result["cost"] = cost_experiment(
        setups, calls, rss, args.data_dir, args.threads, args.device,
        lambda s: print(s, flush=True),
    )  # fmt: skip
    result["wall_s"] = time.perf_counter() - started
    result["cpu_s"] = time.process_time()  # this process only (RSS probes not included)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"evograd_rotation_cost_{args.device}" if args.cost_only else "evograd_rotation"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown_report(result))
    if not args.cost_only:
        plot(result, args.out / f"{stem}.png")
    print(markdown_report(result))
    print(
        f"wrote {args.out}/{stem}.* in {result['wall_s']:.0f} s "
        f"({result['cpu_s']:.0f} s of CPU time in this process)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
