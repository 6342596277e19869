"""Long training runs: exact reversal against storing the run, forward mode and truncation.

The hypergradient of a per-step learning-rate schedule and a per-step momentum schedule
(``2 T`` hyperparameters) through ``T`` = 100, 1000 and 3000 full-batch SGD-momentum steps of
an MLP 64-32-10 (tanh, float64) on scikit-learn's digits (500 training, 300 validation
examples), computed four ways:

* ``reversible``: ``hg.reversible_hypergrad`` (Maclaurin et al. 2015): the run is reversed
  exactly in fixed point, nothing of it is stored but ~log2(1/mu) bits per weight and step;
* ``reverse``: ``hg.unrolled_hypergrad(mode="reverse")``: back-propagation through the
  stored graph of all ``T`` steps (the reference);
* ``truncated``: the same through the last ``K = T/10`` steps only (biased);
* ``forward``: ``mode="forward"`` costs one JVP pass per scalar hyperparameter, so ``2 T``
  of them is out of reach at ``T`` = 1000-3000.  It differentiates the *same* schedules
  written with 10 blocks each (the schedules are piecewise constant over 10 blocks of
  ``T/10`` steps), 20 hyperparameters; by the chain rule the block hypergradient is the sum
  of the per-step one over each block, which is what it is compared with.  Its cost is 20
  JVP passes of ``T`` steps, linear in ``T``; above ``--forward-max-steps`` (default 1000) it
  is skipped and the report gives the time extrapolated from the largest ``T`` it ran at
  (a T = 3000 run took 374 s on the 2-core build machine, more than the rest together).

Each method runs once per ``T`` in a fresh subprocess: a warm-up call with 3 steps (lazy
imports, allocator pools), then the kernel's RSS high-water mark is reset (``echo 5 >
/proc/self/clear_refs``) and ``VmHWM`` is read after the measured call; peak memory is that
high-water mark over the RSS right before the call (the data and initial weights are already
loaded).  Tensors above 64 KiB get their own ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed
memory goes back to the OS and the baseline is live memory.  torch's CPU allocator keeps no
statistics of its own; ``ru_maxrss`` cannot be reset.  One run per method and ``T`` (the
long runs take seconds to minutes; the time columns are single measurements on a shared
machine).

Then a second table, time per step against ``T``, in one process (``--skip-timing`` leaves
it out, ``--timing-only`` runs only it and keeps the memory table of an existing result):
exact reversal at ``T`` = 100, 1000 and 10,000 with the momentum held at 0.9 and at 0.5
(per-step learning-rate and momentum schedules, 2T hyperparameters) on an MLP 64-128-10
(9,610 weights; ``--timing-hidden``, where the per-step work is less dominated by the cost
of launching each small tensor operation than at 64-32-10), its buffer's bytes and
bits per weight and step, and reverse mode on the same problem in turn (skipped where its
stored graphs, extrapolated from its peak at a shorter T, would take over half the free
memory).  Up to ``T = 1000`` each is measured ``--timing-repeats`` times (default 3) and the
medians are reported, as wall time and as this process's CPU time, which other jobs on a
shared machine disturb much less.

Run from the repository root::

    PYTHONPATH=src python benchmarks/long_horizon.py            # ~8-10 minutes
    PYTHONPATH=src python benchmarks/long_horizon.py --quick    # smoke test, T = 50, 200

Writes ``<out>/long_horizon.json`` and ``<out>/long_horizon.md``.
Targets: at ``T = 1000`` the reversible hypergradient needs >= 20x less peak memory than
reverse mode, and agrees with it; its time per step is flat in ``T`` (100 to 10,000), and
at ``T = 1000`` it takes at most 2x reverse mode's time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from _common import load_cache, machine_info, reset_peak_rss, status_kib

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg
from hypergradient.hypergrad.reversible import ExactMomentumSGD  # noqa: E402

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
METHODS = ("reversible", "reverse", "truncated", "forward")
MEMORY_TARGET_T, MEMORY_TARGET = 1000, 20.0
TIME_TARGET_T, TIME_TARGET = 1000, 2.0  # exact reversal within 2x reverse mode's time
TIMING_STEPS, TIMING_MOMENTA = (100, 1000, 10_000), (0.9, 0.5)
TIMING_REPEAT_MAX_STEPS = 1000  # longer timing runs are measured once
TIMING_HIDDEN = 128  # the timing table's MLP: 64-128-10, 9,610 weights
BLOCKS = 10  # the schedules are piecewise constant over this many blocks
HIDDEN, N_TRAIN, N_VAL = 32, 500, 300
DTYPE = torch.float64


# ======================================================================================
# The problem
# ======================================================================================


def build_problem(steps: int, hidden: int = HIDDEN):
    """Losses, initial weights and the two ways of writing the schedules for ``steps``."""
    split = hg.data.load_digits_split(n_train=N_TRAIN, n_val=N_VAL, seed=0, dtype=DTYPE)
    x, y, xv, yv = split.x_train, split.y_train, split.x_val, split.y_val
    gen = torch.Generator().manual_seed(0)
    sizes = [(64, hidden), (hidden, 10)]
    w0 = {}
    for i, (fan_in, fan_out) in enumerate(sizes):
        w0[f"w{i}"] = torch.randn(fan_in, fan_out, generator=gen, dtype=DTYPE) / fan_in**0.5
        w0[f"b{i}"] = torch.zeros(fan_out, dtype=DTYPE)

    def net(p, inputs):
        return torch.tanh(inputs @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"]

    def inner(p, h):
        return F.cross_entropy(net(p, x), y)

    def outer(p, h):
        return F.cross_entropy(net(p, xv), yv)

    # A decaying learning rate and a rising momentum, one value per block of T/10 steps
    lr_blocks = 0.3 * 0.85 ** torch.arange(BLOCKS, dtype=DTYPE)
    momentum_blocks = torch.linspace(0.8, 0.9, BLOCKS, dtype=DTYPE)
    block_of = torch.arange(steps) * BLOCKS // steps
    per_step = {"lr": lr_blocks[block_of], "momentum": momentum_blocks[block_of]}
    per_block = {"lr_blocks": lr_blocks, "momentum_blocks": momentum_blocks}
    return inner, outer, w0, per_step, per_block, block_of


def run_method(method: str, steps: int, problem) -> tuple[dict, dict]:
    """The hypergradient (per-step schedules; per-block for forward) and extra info."""
    inner, outer, w0, per_step, per_block, block_of = problem
    if method == "reversible":
        res = hg.reversible_hypergrad(inner, outer, w0, per_step, steps, "lr", "momentum")
        s = res.stats
        info = {
            "bits_per_weight_per_step": s.bits_per_weight_per_step,
            # weights whose velocity is exactly zero throughout lose nothing (here: those
            # fed by the pixels that are zero in every training image)
            "idle_weights": s.idle_weights,
            "bits_per_moving_weight_per_step": s.buffer_bits
            / ((s.num_weights - s.idle_weights) * steps),
            "expected_bits_per_weight_per_step": s.expected_bits_per_weight_per_step,
            "buffer_kib": s.buffer_bytes / 1024,
            "trajectory_mib": s.trajectory_bytes / 2**20,
            "momentum_max_error": s.momentum_max_error,
        }
        return res.hypergrad, info
    if method in ("reverse", "truncated"):
        truncate = None if method == "reverse" else max(1, steps // 10)
        grads = hg.unrolled_hypergrad(
            inner, outer, w0, per_step, steps, "lr", "momentum", "reverse", truncate
        )
        return grads, {"truncate": truncate}
    if method == "forward":
        grads = hg.unrolled_hypergrad(
            inner,
            outer,
            w0,
            per_block,
            steps,
            lambda h, t: h["lr_blocks"][block_of[t]],
            lambda h, t: h["momentum_blocks"][block_of[t]],
            "forward",
        )
        return grads, {"hyperparameters_differentiated": 2 * BLOCKS}
    raise ValueError(method)


# ======================================================================================
# One method in a fresh subprocess: time and peak memory of one call
# ======================================================================================


def probe(method: str, steps: int, save_to: Path) -> dict:
    run_method(method, 3, build_problem(3))  # warm-up: lazy imports, pools, vmap tracing
    problem = build_problem(steps)
    gc.collect()
    rss_before = status_kib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    grads, info = run_method(method, steps, problem)
    wall = time.perf_counter() - start
    hwm = status_kib("VmHWM")
    torch.save(grads, save_to)
    measured = reset and hwm is not None and rss_before is not None
    return {
        "method": method,
        "steps": steps,
        "wall_s": wall,
        "peak_increase_mib": (hwm - rss_before) / 1024 if measured else None,
        "rss_before_mib": None if rss_before is None else rss_before / 1024,
        "peak_rss_mib": None if hwm is None else hwm / 1024,
        "info": info,
    }


def run_probe_subprocess(method: str, steps: int, threads: int, folder: Path) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parents[1] / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    save_to = folder / f"{method}_{steps}.pt"
    argv = [sys.executable, str(HERE), "--probe", method, "--probe-steps", str(steps),
            "--save-to", str(save_to), "--threads", str(threads)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {method} T={steps} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["grads"] = load_cache(save_to)
    return result


# ======================================================================================
# Agreement
# ======================================================================================


def _flat(grads: dict, keys) -> torch.Tensor:
    return torch.cat([grads[k].reshape(-1) for k in keys])


def _compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    rel = float((got - ref).norm() / ref.norm())
    cos = float(got @ ref / (got.norm() * ref.norm()))
    return {"relative_error": rel, "cosine": cos}


def agreement(results: dict, steps: int) -> dict:
    """Every method against reverse mode (per step), forward against its block sums."""
    ref = results["reverse"]["grads"]
    keys = ("lr", "momentum")
    out = {}
    for method in ("reversible", "truncated"):
        if method in results:
            out[method] = _compare(_flat(results[method]["grads"], keys), _flat(ref, keys))
    if "forward" in results:
        block_of = torch.arange(steps) * BLOCKS // steps
        sums = {
            f"{k}_blocks": torch.zeros(BLOCKS, dtype=DTYPE).index_add_(0, block_of, ref[k])
            for k in keys
        }
        block_keys = ("lr_blocks", "momentum_blocks")
        out["forward"] = _compare(
            _flat(results["forward"]["grads"], block_keys), _flat(sums, block_keys)
        )
    return out


# ======================================================================================
# Time per step: exact reversal against T, and against reverse mode, in one process
# ======================================================================================


def _timed(fn, steps: int) -> tuple[float, float, object]:
    """``(wall ms per step, CPU ms per step, fn())``: CPU is this process's time, which the
    other jobs on a shared machine disturb much less than the wall clock."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return 1e3 * wall / steps, 1e3 * cpu / steps, out


def _mem_available_mib() -> float | None:
    """``MemAvailable`` of ``/proc/meminfo`` in MiB (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _bookkeeping_ms_per_step(size: int, steps: int, momentum: float) -> float:
    """CPU ms per step of the fixed-point steps and the buffer alone, forward and back.

    ``ExactMomentumSGD`` on ``size`` weights, fed a cycle of 64 synthetic gradients
    (N(0, 0.01^2)) instead of the network's, lr 0.01: the integer bookkeeping that exact
    reversal adds to the gradients, with nothing else in the loop."""
    sgd = ExactMomentumSGD([0.01] * steps, [momentum] * steps)
    gen = torch.Generator().manual_seed(0)
    grads = [0.01 * torch.randn(size, generator=gen, dtype=DTYPE) for _ in range(64)]
    state = sgd.init(0.1 * torch.randn(size, generator=gen, dtype=DTYPE))
    gc.collect()
    cpu = time.process_time()
    for t in range(steps):
        sgd.step(state, grads[t % 64], t)
    for t in reversed(range(steps)):
        sgd.undo_position(state, t)
        sgd.undo_velocity(state, grads[t % 64], t)
    cpu = time.process_time() - cpu
    assert state.buffer.is_empty()
    return 1e3 * cpu / steps


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def run_timing(args, console: Console) -> dict:
    """Exact reversal at every (momentum, T) and reverse mode at T <= --reverse-max-steps.

    The hyperparameters are a per-step learning-rate schedule (the memory table's) and a
    per-step momentum schedule held at the momentum (2T hyperparameters).  Up to T = 1000
    each measurement is repeated --timing-repeats times, reversal and reverse mode in turn,
    and the medians are reported; T = 10,000 runs once.
    """
    hidden = args.timing_hidden
    steps_list = args.timing_steps or ([50, 200] if args.quick else list(TIMING_STEPS))
    machine = machine_info(threads=args.threads)
    _, _, w0, _, _, _ = build_problem(1, hidden)
    out = {
        "machine": machine,
        "hidden": hidden,
        "num_weights": sum(v.numel() for v in w0.values()),
        "steps": steps_list,
        "momenta": args.timing_momenta,
        "repeats": args.timing_repeats,
        "reverse_max_steps": args.reverse_max_steps,
        "rows": [],
    }

    def call(mode: str, steps: int, momentum: float):
        inner, outer, w0, per_step, _, _ = build_problem(steps, hidden)
        hp = {"lr": per_step["lr"], "momentum": torch.full((steps,), momentum, dtype=DTYPE)}
        if mode == "reversible":
            return lambda: hg.reversible_hypergrad(inner, outer, w0, hp, steps, "lr", "momentum")
        return lambda: hg.unrolled_hypergrad(
            inner, outer, w0, hp, steps, "lr", "momentum", mode="reverse"
        )

    for mode in ("reversible", "reverse"):  # warm-up: lazy imports, allocator pools
        call(mode, 3, 0.9)()
    # what reverse mode's graph keeps per step: the tensors saved for backward, once each
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call("reverse", 20, 0.9)()
    graph_mib_per_step = sum(saved.values()) / 20 / 2**20
    out["reverse_graph_mib_per_step"] = graph_mib_per_step
    for momentum in args.timing_momenta:
        for steps in steps_list:
            repeats = args.timing_repeats if steps <= TIMING_REPEAT_MAX_STEPS else 1
            with_reverse, too_big = steps <= args.reverse_max_steps, None
            need, available = graph_mib_per_step * steps, _mem_available_mib()
            if with_reverse and available is not None and need > available / 2:
                with_reverse, too_big = False, (need, available)  # keep to half of what is free
            runs = {"reversible": [], "reverse": []}
            result = reference = None
            for _ in range(repeats):
                wall, cpu, result = _timed(call("reversible", steps, momentum), steps)
                runs["reversible"].append((wall, cpu))
                if with_reverse:
                    wall, cpu, reference = _timed(call("reverse", steps, momentum), steps)
                    runs["reverse"].append((wall, cpu))
            s = result.stats
            bookkeeping = _bookkeeping_ms_per_step(s.num_weights, steps, momentum)
            row = {
                "momentum": momentum,
                "steps": steps,
                "repeats": repeats,
                "reversible_wall_ms_per_step": [w for w, _ in runs["reversible"]],
                "reversible_cpu_ms_per_step": [c for _, c in runs["reversible"]],
                "buffer_bytes": s.buffer_bytes,
                "buffer_bits": s.buffer_bits,
                "bits_per_weight_per_step": s.bits_per_weight_per_step,
                "expected_bits_per_weight_per_step": s.expected_bits_per_weight_per_step,
                "weights_bytes_per_step": s.num_weights * 8,
                "bookkeeping_cpu_ms_per_step": bookkeeping,
            }
            if with_reverse:
                keys = ("lr", "momentum")
                row["reverse_wall_ms_per_step"] = [w for w, _ in runs["reverse"]]
                row["reverse_cpu_ms_per_step"] = [c for _, c in runs["reverse"]]
                row["relative_error_vs_reverse"] = _compare(
                    _flat(result.hypergrad, keys), _flat(reference, keys)
                )["relative_error"]
            elif too_big:
                row["reverse_skipped"] = (
                    f"its graph would keep ~{too_big[0] / 1024:.1f} GiB "
                    f"({graph_mib_per_step:.2f} MiB of saved tensors per step), over half the "
                    f"free memory ({too_big[1] / 1024:.1f} GiB)"
                )
            else:
                row["reverse_skipped"] = f"T > --reverse-max-steps={args.reverse_max_steps}"
            out["rows"].append(row)
            ref = row.get("reverse_cpu_ms_per_step")
            console.print(
                f"timing mu={momentum} T={steps}: reversal "
                f"{_median(row['reversible_cpu_ms_per_step']):.2f} ms/step CPU"
                + (f", reverse mode {_median(ref):.2f}" if ref else "")
                + f", buffer {s.buffer_bytes / 1024:.0f} KiB"
            )
    machine["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return out


def _timing_rows(timing: dict) -> list[list[str]]:
    rows = []
    for r in timing["rows"]:
        rev_wall = _median(r["reversible_wall_ms_per_step"])
        rev_cpu = _median(r["reversible_cpu_ms_per_step"])
        if "reverse_cpu_ms_per_step" in r:
            ref_wall = _median(r["reverse_wall_ms_per_step"])
            ref_cpu = _median(r["reverse_cpu_ms_per_step"])
            reverse = f"{ref_wall:.2f} / {ref_cpu:.2f}"
            ratio = f"{rev_wall / ref_wall:.2f} / {rev_cpu / ref_cpu:.2f}"
            note = f"rel. error vs reverse {r['relative_error_vs_reverse']:.0e}"
        else:
            reverse, ratio, note = "skipped", "-", r["reverse_skipped"]
        rows.append([
            f"{r['momentum']:g}", f"{r['steps']:,}", f"{r['repeats']}",
            f"{rev_wall:.2f} / {rev_cpu:.2f}", f"{r['bookkeeping_cpu_ms_per_step']:.2f}",
            _bytes(r["buffer_bytes"]),
            f"{r['bits_per_weight_per_step']:.3f} ({r['expected_bits_per_weight_per_step']:.3f})",
            _bytes(r["weights_bytes_per_step"] * r["steps"]), reverse, ratio, note,
        ])  # fmt: skip
    return rows


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


TIMING_COLUMNS = ("momentum", "T", "runs", "exact reversal ms/step (wall / CPU)",
                  "of which fixed point + buffer (CPU)", "buffer",
                  "bits per weight and step (log2(1/mu))", "w_1..w_T in float64",
                  "reverse mode ms/step (wall / CPU)", "reversal / reverse (wall / CPU)",
                  "note")  # fmt: skip


def _timing_verdict(timing: dict) -> str:
    lines = []
    for momentum in timing["momenta"]:
        rows = {r["steps"]: r for r in timing["rows"] if r["momentum"] == momentum}
        cpu = {t: _median(r["reversible_cpu_ms_per_step"]) for t, r in sorted(rows.items())}
        integer = {t: r["bookkeeping_cpu_ms_per_step"] for t, r in sorted(rows.items())}
        text = (
            f"momentum {momentum:g}: exact reversal costs "
            + ", ".join(f"{v:.2f}" for v in cpu.values())
            + " ms per step (CPU) at T = "
            + ", ".join(f"{t:,}" for t in cpu)
            + "; its fixed-point steps and buffer alone "
            + ", ".join(f"{v:.2f}" for v in integer.values())
            + " ms"
        )
        at = rows.get(TIME_TARGET_T)
        if at is not None and "reverse_cpu_ms_per_step" in at:
            ratio = cpu[TIME_TARGET_T] / _median(at["reverse_cpu_ms_per_step"])
            wall = _median(at["reversible_wall_ms_per_step"]) / _median(
                at["reverse_wall_ms_per_step"]
            )
            ok = "MET" if ratio <= TIME_TARGET else "NOT MET"
            text += (
                f"; at T = {TIME_TARGET_T:,} it takes {ratio:.2f}x reverse mode's CPU time "
                f"({wall:.2f}x wall; target <= {TIME_TARGET:g}x: {ok})"
            )
        lines.append(text + ".")
    return " ".join(lines)


def timing_markdown(timing: dict) -> list[str]:
    m = timing["machine"]
    start = m["load_average_at_start"]
    end = m.get("load_average_at_end")
    table = ["| " + " | ".join(TIMING_COLUMNS) + " |",
             "|" + "|".join(["---:"] * (len(TIMING_COLUMNS) - 1) + ["---"]) + "|"]  # fmt: skip
    table += ["| " + " | ".join(r) + " |" for r in _timing_rows(timing)]
    return [
        "#### Time per step against T",
        "",
        f"{m['date']}; {m['cpu_model']}, {m['cpu_count']} CPUs; torch {m['torch']} "
        f"(threads: {m['torch_threads']}); one process, exact reversal and reverse mode in "
        f"turn. Load average at the start "
        f"{_fmt(start[0] if start else None, '.2f')} (1 minute), at the end "
        f"{_fmt(end[0] if end else None, '.2f')} (1 minute) / "
        f"{_fmt(end[2] if end else None, '.2f')} (15 minutes): other jobs share the 2 "
        f"cores, so wall times are upper bounds and the process CPU times are the fairer "
        f"comparison.",
        "",
        f"Hypergradient of a per-step learning-rate schedule (lr 0.3 * 0.85^block over "
        f"{BLOCKS} blocks) and a per-step momentum schedule held at the momentum (2T "
        f"hyperparameters) through T full-batch steps of an MLP 64-{timing['hidden']}-10 "
        f"(tanh, float64, {timing['num_weights']:,} weights) on digits. Medians of *runs* "
        f"measurements; reverse mode runs up to T = {timing['reverse_max_steps']:,}. "
        f"Command: `{timing.get('command', '?')}`.",
        "",
        *table,
        "",
        _timing_verdict(timing),
        "",
        "*of which fixed point + buffer* = `ExactMomentumSGD` alone, T steps forward and "
        "back on the same number of weights fed synthetic gradients: the integer "
        "bookkeeping exact reversal adds to the gradients (cheaper while the buffer's "
        "numbers stay below 2^47 and are plain positional digits: the first ~300 steps at "
        "momentum 0.9, ~47 at 0.5). The rest of a step is one gradient forward and one "
        "gradient with its Hessian-vector product back, whose cost drifts with the weights "
        "along the run (+15% over 10,000 steps of plain training here). *buffer* = the "
        "information buffer's peak allocation (16-bit words, a 64-bit state and a 32-bit "
        "depth per weight); *bits per weight and step* = what it held over T x weights, "
        "with the mean log2(1/mu) it must hold in parentheses (weights fed by always-zero "
        "pixels never move and hold nothing). *w_1..w_T in float64* = what storing the "
        "weights of every step would take.",
        "",
    ]


# ======================================================================================
# Reporting
# ======================================================================================


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


COLUMNS = ("T", "method", "hparams", "time", "peak +MiB", "reverse / this (memory)",
           "rel. error vs reverse", "cosine", "note")  # fmt: skip


def _rows(result: dict) -> list[list[str]]:
    rows = []
    for steps_key, block in result["runs"].items():
        steps = int(steps_key)
        reverse_mem = block["methods"].get("reverse", {}).get("peak_increase_mib")
        for method in METHODS:
            if method in block.get("skipped", {}):
                rows.append([str(steps), method, "-", "-", "-", "-", "-", "-",
                             "skipped: " + block["skipped"][method]])  # fmt: skip
                continue
            if method not in block["methods"]:
                continue
            r = block["methods"][method]
            mem = r["peak_increase_mib"]
            ratio = None if not mem or reverse_mem is None else reverse_mem / mem
            agree = block["agreement"].get(method, {})
            info = r["info"]
            if method == "reversible":
                note = (
                    f"buffer {info['bits_per_moving_weight_per_step']:.3f} bits per moving "
                    f"weight and step (mean log2(1/mu): "
                    f"{info['expected_bits_per_weight_per_step']:.3f}; {info['idle_weights']} "
                    f"weights never move), {info['buffer_kib']:.0f} KiB; the trajectory "
                    f"would be {info['trajectory_mib']:.0f} MiB"
                )
            elif method == "reverse":
                note = "reference (stores every step's graph)"
            elif method == "truncated":
                note = f"last K={info['truncate']} steps only"
            else:
                note = f"{2 * BLOCKS} block hparams; vs block sums of reverse"
            hparams = f"{2 * BLOCKS}" if method == "forward" else f"{2 * steps}"
            rows.append([
                str(steps), method, hparams, _seconds(r["wall_s"]), _fmt(mem, ".1f"),
                "1" if method == "reverse" else _fmt(ratio, ".0f"),
                "0 (ref)" if method == "reverse" else _fmt(agree.get("relative_error"), ".1e"),
                "1 (ref)" if method == "reverse" else _fmt(agree.get("cosine"), ".6f"), note,
            ])  # fmt: skip
    return rows


def _verdict(result: dict) -> str:
    block = result["runs"].get(str(MEMORY_TARGET_T))
    if block is None or not {"reverse", "reversible"} <= set(block["methods"]):
        return f"Target (T = {MEMORY_TARGET_T}) not measured in this run."
    rev = block["methods"]["reverse"]["peak_increase_mib"]
    rvs = block["methods"]["reversible"]["peak_increase_mib"]
    if rev is None or not rvs:
        return "Target not measurable here (no /proc/self/clear_refs)."
    ratio = rev / rvs
    rel = block["agreement"]["reversible"]["relative_error"]
    ok = "MET" if ratio >= MEMORY_TARGET else "NOT MET"
    return (
        f"Target {ok}: at T = {MEMORY_TARGET_T} reverse mode's peak is {ratio:.0f}x the "
        f"reversible one ({rev:.1f} vs {rvs:.1f} MiB; target >= {MEMORY_TARGET:.0f}x), for "
        f"the same hypergradient (relative difference {rel:.1e})."
    )


def markdown_report(result: dict) -> str:
    if not result.get("runs"):  # --timing-only without an earlier memory table
        header = ["### Long training runs (`benchmarks/long_horizon.py`)", ""]
        return "\n".join([*header, *timing_markdown(result["timing"])])
    m = result["machine"]
    load = m["load_average_at_start"][0] if m["load_average_at_start"] else None
    end = m.get("load_average_at_end")
    # the 15-minute figure at the end covers the whole run (which takes several minutes)
    during = f", 15-minute load average at the end {end[2]:.2f}" if end else ""
    columns, rows = COLUMNS, _rows(result)
    align = ["---:", "---"] + ["---:"] * (len(columns) - 3) + ["---"]
    table = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([
        "### Long training runs (`benchmarks/long_horizon.py`)",
        "",
        f"{m['date']}; {m['cpu_model']}, {m['cpu_count']} CPUs, {m['platform']}; torch "
        f"{m['torch']} (torch threads: {m['torch_threads']}), Python {m['python']}. One run "
        f"per method and T, each in a fresh subprocess; 1-minute load average at the start "
        f"{_fmt(load, '.2f')}{during} (other jobs share the machine: times are upper "
        f"bounds, memory is not affected). Command: `{result.get('command', '?')}`.",
        "",
        f"Hypergradient of a per-step learning-rate and momentum schedule (2T "
        f"hyperparameters; piecewise constant over {BLOCKS} blocks, lr 0.3 * 0.85^block, "
        f"momentum 0.8 -> 0.9) through T full-batch SGD-momentum steps of an MLP "
        f"64-{HIDDEN}-10 (tanh, float64, {result['num_weights']:,} weights) on digits "
        f"({N_TRAIN} training, {N_VAL} validation examples).",
        "",
        *table,
        "",
        _verdict(result),
        "",
        "*peak +MiB* = the call's peak RSS over the RSS right before it (after a warm-up "
        "call; data and initial weights loaded). *reverse / this* = reverse mode's peak over "
        "this method's. Forward mode differentiates the same schedules written as "
        f"{BLOCKS} + {BLOCKS} block values (one JVP pass per scalar hyperparameter makes 2T "
        "of them out of reach) and is compared with the block sums of reverse mode's "
        "per-step hypergradient (the chain rule). *truncated* is biased by design. The buffer "
        "grows by log2(1/mu) bits per step for every weight that moves; weights whose "
        "velocity stays exactly zero (fed by pixels that are zero in every training image) "
        "lose nothing.",
        "",
        *(timing_markdown(result["timing"]) if result.get("timing") else []),
    ])  # fmt: skip


def print_rich(result: dict, console: Console) -> None:
    if result.get("runs"):
        table = Table(title="Hypergradient through T SGD-momentum steps (digits MLP)")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col in ("method", "note") else "right")
        for row in _rows(result):
            table.add_row(*row)
        console.print(table)
        console.print(_verdict(result))
    if result.get("timing"):
        table = Table(title="Time per step against T")
        for col in TIMING_COLUMNS:
            table.add_column(col, justify="left" if col == "note" else "right")
        for row in _timing_rows(result["timing"]):
            table.add_row(*row)
        console.print(table)
        console.print(_timing_verdict(result["timing"]))


# ======================================================================================
# Entry point
# ======================================================================================


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 50, 200 only")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="horizons T (default 100 1000 3000)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--forward-max-steps", type=int, default=1000,
        help="skip forward mode above this T (its cost grows as 20 JVP passes of T steps)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--skip-timing", action="store_true",
                        help="only the memory table (no time-per-step table)")  # fmt: skip
    parser.add_argument(
        "--timing-only", action="store_true",
        help="only the time-per-step table; the memory table of an existing "
        "<out>/long_horizon.json is kept",
    )  # fmt: skip
    parser.add_argument("--timing-steps", type=int, nargs="+", default=None,
                        help="horizons of the timing table (default 100 1000 10000)")  # fmt: skip
    parser.add_argument("--timing-momenta", type=float, nargs="+", default=list(TIMING_MOMENTA))
    parser.add_argument("--timing-repeats", type=int, default=3,
                        help="measurements per T <= 1000 (medians; default 3)")  # fmt: skip
    parser.add_argument("--timing-hidden", type=int, default=TIMING_HIDDEN,
                        help=f"timing MLP hidden units (default {TIMING_HIDDEN})")  # fmt: skip
    parser.add_argument(
        "--reverse-max-steps", type=int, default=10_000,
        help="timing table: skip reverse mode above this T (it stores every step's graph; "
        "it is also skipped where its peak, extrapolated, exceeds half the free memory)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--probe", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save-to", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _forward_skip_reason(result: dict, steps: int, args) -> str:
    """Why forward mode is skipped, with its cost extrapolated from the longest run so far."""
    done = [
        (int(t), block["methods"]["forward"]["wall_s"])
        for t, block in result["runs"].items()
        if "forward" in block["methods"]
    ]
    reason = f"T > --forward-max-steps={args.forward_max_steps}"
    if done:
        t_done, seconds = max(done)
        # 20 JVP passes of T steps each: the cost is linear in T
        reason += f"; ~{seconds * steps / t_done:.0f} s by extrapolation from T={t_done}"
    return reason


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(args.probe, args.probe_steps, args.save_to)))
        return 0
    steps_list = args.steps or ([50, 200] if args.quick else [100, 1000, 3000])
    methods = list(dict.fromkeys(["reverse", *args.methods]))  # the reference always runs
    console = Console(width=max(Console().width, 150))
    started = begun = time.perf_counter()
    _, _, w0, _, _, _ = build_problem(1)
    result = {
        "machine": machine_info(threads=args.threads),
        "command": " ".join(["python benchmarks/long_horizon.py", *sys.argv[1:]]),
        "num_weights": sum(v.numel() for v in w0.values()),
        "runs": {},
    }
    existing = args.out / "long_horizon.json"
    if args.timing_only:
        if existing.exists():  # keep the memory table, replace the timing table
            result = json.loads(existing.read_text())
        steps_list = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in steps_list:
            block = {"methods": {}, "skipped": {}}
            for method in methods:
                if method == "forward" and steps > args.forward_max_steps:
                    block["skipped"][method] = _forward_skip_reason(result, steps, args)
                    continue
                console.print(f"T={steps}: {method} ...")
                r = run_probe_subprocess(method, steps, args.threads, Path(tmp))
                console.print(
                    f"   {r['wall_s']:.1f} s, peak +{_fmt(r['peak_increase_mib'], '.1f')} MiB"
                )
                block["methods"][method] = r
            block["agreement"] = agreement(block["methods"], steps)
            for r in block["methods"].values():
                r.pop("grads")
            result["runs"][str(steps)] = block
    if not args.timing_only:
        result["wall_s"] = time.perf_counter() - started
        result["machine"]["load_average_at_end"] = (
            os.getloadavg() if hasattr(os, "getloadavg") else None
        )
    if not args.skip_timing:
        started = time.perf_counter()
        result["timing"] = run_timing(args, console)
        result["timing"]["wall_s"] = time.perf_counter() - started
        result["timing"]["command"] = " ".join(["python benchmarks/long_horizon.py", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_horizon.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "long_horizon.md").write_text(markdown_report(result))
    print_rich(result, console)
    elapsed = time.perf_counter() - begun
    console.print(f"wrote {args.out}/long_horizon.{{json,md}} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
