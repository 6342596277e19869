"""Peak memory of one meta-gradient against the number of inner steps: MAML vs iMAML.

Second-order MAML back-propagates through its ``K`` inner SGD steps, so it keeps the graph
of every step: memory grows linearly with ``K``.  iMAML (Rajeswaran et al. 2019) solves the
proximal inner problem without keeping any graph and gets the meta-gradient from CG on
``(I + H/lambda) x = grad L_query`` at the inner solution, with Hessian-vector products of
one support-loss gradient graph: memory independent of ``K``.  First-order MAML is shown
too (one step's graph at a time).

Setting: the ``hypergradient maml`` / ``imaml`` recipes' Omniglot network and episode
shapes -- a 4-block, 32-channel stride-2 ConvNet with batch norm on 28x28 images, 5-way
1-shot with 5 queries per class (5 support, 25 query images), float32, one thread -- with
random pixels (memory depends on shapes only, so no data files are needed); ``K`` in
5, 20, 80; iMAML with 5 CG steps.

Two measures of the same call, each (method, K) in a fresh subprocess:

* ``saved``: exact accounting of the tensors autograd graphs hold
  (:class:`hypergradient.meta.SavedTensorMeter`: ``saved_tensors_hooks`` that count every
  saved tensor's storage while some graph holds it; the peak over the call).  This is the
  memory that depends on how the meta-gradient is computed, without allocator noise.
* ``rss``: the process's resident-set high-water mark during the call over the resident set
  right before it (``VmHWM`` after ``echo 5 > /proc/self/clear_refs``; a warm-up call with
  ``K = 1`` first, and ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed large blocks go back to
  the OS).  It includes temporaries (gradients, CG vectors, allocator slack).

Run from the repository root::

    PYTHONPATH=src python benchmarks/meta_memory.py           # ~1-2 minutes
    PYTHONPATH=src python benchmarks/meta_memory.py --quick   # K = 2, 8

Writes ``<out>/meta_memory.json`` and ``<out>/meta_memory.md`` (``<out>`` defaults to
``benchmarks/results``).  Target: iMAML's peak is flat in ``K`` (saved bytes identical, RSS
within noise) while second-order MAML's grows linearly.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from _common import machine_info, reset_peak_rss, status_kib

HERE = Path(__file__).resolve()
METHODS = ("maml", "fomaml", "imaml")
STEPS = (5, 20, 80)
QUICK_STEPS = (2, 8)
WAYS, SHOTS, QUERIES, SIZE, CHANNELS = 5, 1, 5, 28, 32
MIB = 1024 * 1024


# ======================================================================================
# One (method, K) in a fresh subprocess
# ======================================================================================


def _learner(method: str, steps: int):
    from hypergradient import meta

    net = meta.ConvNet(channels=CHANNELS, image_size=SIZE)
    if method == "imaml":
        return meta.IMAML(net, lam=0.5, inner_steps=steps, inner_lr=0.1, cg_steps=5)
    return meta.MAML(net, inner_steps=steps, inner_lr=0.1, first_order=method == "fomaml")


def probe(method: str, steps: int) -> dict:
    from hypergradient import meta

    gen = torch.Generator().manual_seed(0)
    pool = torch.rand(10, SHOTS + QUERIES, 1, SIZE, SIZE, generator=gen)
    episode = meta.ClassificationTasks(pool, WAYS, SHOTS, QUERIES).sample(gen)
    theta = _learner(method, 1).model.init(torch.Generator().manual_seed(0), torch.float32)
    _learner(method, 1).meta_gradient(theta, episode)  # warm-up: lazy inits, allocator pools
    learner = _learner(method, steps)
    gc.collect()
    rss_before = status_kib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    with meta.SavedTensorMeter() as meter:
        result = learner.meta_gradient(theta, episode)
    wall = time.perf_counter() - start
    hwm = status_kib("VmHWM")
    measured = reset and hwm is not None and rss_before is not None
    return {
        "method": method,
        "steps": steps,
        "wall_s": wall,
        "saved_peak_mib": meter.peak_bytes / MIB,
        "saved_tensors": meter.saved_count,
        "rss_peak_increase_mib": (hwm - rss_before) / 1024 if measured else None,
        "rss_before_mib": None if rss_before is None else rss_before / 1024,
        "query_loss": result.query_loss,
        "grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in result.grad.values()))),
    }


def run_probe_subprocess(method: str, steps: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parents[1] / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    argv = [sys.executable, str(HERE), "--probe", method, "--probe-steps", str(steps)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {method} K={steps} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ======================================================================================
# Reporting
# ======================================================================================


def _growth(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of ``key`` (MiB) per inner step."""
    pts = [(r["steps"], r[key]) for r in rows if r[key] is not None]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


LABELS = {
    "maml": "MAML (second order)",
    "fomaml": "first-order MAML",
    "imaml": "iMAML (5 CG steps)",
}


def markdown_report(result: dict) -> str:
    steps = result["steps"]
    m = result["machine"]
    lines = [
        "# Peak memory of one meta-gradient vs inner steps K",
        "",
        f"ConvNet 4x{CHANNELS} (stride 2, batch norm) on {SIZE}x{SIZE} images, {WAYS}-way "
        f"{SHOTS}-shot, {QUERIES} queries per class, float32, 1 thread; one meta-gradient per "
        f"fresh subprocess. {m['date']}, {m['cpu_model']} ({m['cpu_count']} CPUs), torch "
        f"{m['torch']}; 1-minute load average at the start "
        f"{m['load_average_at_start'][0]:.1f}.",
        "",
        "**Graph memory** (exact: bytes of tensors saved by autograd, peak over the call), MiB:",
        "",
        "| method | " + " | ".join(f"K = {k}" for k in steps) + " | growth per step |",
        "|---|" + "---:|" * (len(steps) + 1),
    ]
    for method in result["methods"]:
        rows = result["rows"][method]
        slope = _growth(rows, "saved_peak_mib")
        lines.append(
            f"| {LABELS[method]} | "
            + " | ".join(f"{r['saved_peak_mib']:.2f}" for r in rows)
            + f" | {slope:+.3f} MiB |"
        )
    lines += [
        "",
        "**Peak resident memory** over the resident set before the call (VmHWM), MiB:",
        "",
        "| method | " + " | ".join(f"K = {k}" for k in steps) + " | growth per step |",
        "|---|" + "---:|" * (len(steps) + 1),
    ]
    for method in result["methods"]:
        rows = result["rows"][method]
        slope = _growth(rows, "rss_peak_increase_mib")

        def cell(r):
            v = r["rss_peak_increase_mib"]
            return "n/a" if v is None else f"{v:.1f}"

        lines.append(
            f"| {LABELS[method]} | "
            + " | ".join(cell(r) for r in rows)
            + (" | n/a |" if slope is None else f" | {slope:+.3f} MiB |")
        )
    lines += [
        "",
        "Time of the call (s, single measurement on a shared machine): "
        + "; ".join(
            f"{LABELS[meth]}: "
            + ", ".join(f"K={r['steps']} {r['wall_s']:.2f}" for r in result["rows"][meth])
            for meth in result["methods"]
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"K in {QUICK_STEPS}")
    parser.add_argument("--out", type=Path, default=HERE.parent / "results")
    parser.add_argument("--probe", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.probe:
        print(json.dumps(probe(args.probe, args.probe_steps)))
        return 0
    console = Console()
    steps = QUICK_STEPS if args.quick else STEPS
    start = time.perf_counter()
    result = {"machine": machine_info(threads=1), "steps": list(steps), "methods": list(METHODS)}
    rows: dict[str, list[dict]] = {}
    for method in METHODS:
        rows[method] = []
        for k in steps:
            r = run_probe_subprocess(method, k)
            rows[method].append(r)
            console.print(
                f"{method:7s} K={k:3d}: saved {r['saved_peak_mib']:8.2f} MiB, rss +"
                f"{r['rss_peak_increase_mib'] or float('nan'):7.1f} MiB, {r['wall_s']:.2f} s"
            )
    result["rows"] = rows
    result["wall_s"] = time.perf_counter() - start
    # the claim, checked: iMAML's graph memory identical for every K, MAML's growing
    imaml_saved = {r["saved_peak_mib"] for r in rows["imaml"]}
    maml_saved = [r["saved_peak_mib"] for r in rows["maml"]]
    result["imaml_flat"] = len(imaml_saved) == 1
    result["maml_growth_ratio"] = maml_saved[-1] / maml_saved[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "meta_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "meta_memory.md").write_text(markdown_report(result))
    table = Table(title="graph memory (MiB) vs inner steps")
    table.add_column("method")
    for k in steps:
        table.add_column(f"K={k}", justify="right")
    for method in METHODS:
        table.add_row(LABELS[method], *(f"{r['saved_peak_mib']:.2f}" for r in rows[method]))
    console.print(table)
    console.print(f"wrote {args.out}/meta_memory.{{json,md}} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
