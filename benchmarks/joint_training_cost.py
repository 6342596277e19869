"""What does tuning every weight decay cost, next to training the model once?

A full hyper-training run of the ``weight-decay`` recipe (per-weight decay: as many
hyperparameters as weights; warm start, one hyper-step every 10 mini-batch SGD steps;
implicit hypergradient, Neumann series with 10 terms; Adam on the log decays) against plain
training of the same model with ``torch.optim.SGD(weight_decay=...)`` for the same number of
SGD steps, on the same mini-batches.  Both runs build their model and optimizer inside the
measured part.  Setups:

* ``digits``: the recipe's defaults (MLP 64-128-10, batch 64, 300 validation examples);
* ``mnist``: MLP 784-256-10, mini-batches of 128 at both levels (training and validation;
  1000 validation examples), only where the MNIST files are found (``--data-dir`` or
  ``$HYPERGRADIENT_DATA``);
* ``mnist-per-tensor``: the same with one decay per parameter tensor;
* ``<setup>-amortized``: each of the three with the amortized implicit hypergradient
  (``method=amortized``: CG warm-started from the previous hyper-step's solution, 2 steps
  plus one product for its residual, damped Gauss-Newton system) on the same schedule.

Time: one process, repeats of the two runs interleaved (the order alternates), medians; the
ratio is reported both as a ratio of medians and as the median of per-repeat ratios.  A
breakdown of the hyper-training run (inner SGD steps / hypergradients / the rest) says where
the time goes.  Peak memory: one fresh subprocess per run kind; a warm-up run first (lazy
imports and allocator pools are not the method's cost), then the kernel's RSS high-water mark
is reset (``echo 5 > /proc/self/clear_refs``) and ``VmHWM`` is read after the measured run.
``ru_maxrss`` cannot do this in a child: it is inherited across fork and never goes down.

Run from the repository root::

    PYTHONPATH=src python benchmarks/joint_training_cost.py          # ~3 minutes
    PYTHONPATH=src python benchmarks/joint_training_cost.py --quick  # smoke test

Writes ``<out>/joint_training_cost.json`` and ``<out>/joint_training_cost.md``.
Targets: time ratio <= 3x, peak-memory ratio <= 2x (judged on the processes' peak RSS; the
report also gives the ratios of the job's own memory with and without its data, and says why
the latter cannot be <= 2x for per-weight decay).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg

from _common import machine_info, rerun_command, reset_peak_rss, status_kib
from hypergradient.recipes import weight_decay as recipe
from hypergradient.recipes.weight_decay import WeightDecayConfig

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
TIME_TARGET, MEMORY_TARGET = 3.0, 2.0

# The measured setting: what the brief of the benchmark fixes, on top of each setup.
FIXED = {
    "granularity": "per_weight",
    "hyper_every": 10,
    "method": "implicit",
    "solver": "neumann",
    "solver_steps": 10,
    "val_sizes": [],
}
SETUPS = {
    "digits": {},  # the recipe's defaults
    "mnist": {"dataset": "mnist", "hidden": 256, "batch_size": 128, "n_train": 10_000,
              "n_val": 1_000, "val_batch_size": 128},
    "mnist-per-tensor": {"dataset": "mnist", "hidden": 256, "batch_size": 128,
                         "n_train": 10_000, "n_val": 1_000, "val_batch_size": 128,
                         "granularity": "per_tensor"},
}  # fmt: skip
# The same three setups with the amortized implicit hypergradient (hg.AmortizedImplicit: CG
# warm-started from the previous hyper-step's solution, 2 steps + 1 for the residual, on the
# damped Gauss-Newton system; options chosen on validation seeds in benchmarks/amortized.py),
# on the same schedule (a hyper-step every 10 SGD steps): what the hypergradient itself costs.
AMORTIZED = {"method": "amortized", "solver": "cg", "solver_steps": 2,
             "hessian": "gauss_newton", "damping": 0.01, "hypergrad_resample_every": 1}  # fmt: skip
SETUPS.update({f"{name}-amortized": {**options, **AMORTIZED}
               for name, options in list(SETUPS.items())})  # fmt: skip


def make_config(setup: str, hyper_steps: int, data_dir: str | None) -> WeightDecayConfig:
    config = WeightDecayConfig(**{**FIXED, **SETUPS[setup]}, hyper_steps=hyper_steps)
    if config.dataset != "digits":
        config.data_dir = data_dir
    config.validate()
    return config


def mnist_available(data_dir: str | None) -> bool:
    try:
        make_config("mnist", 1, data_dir)
        hg.data.load_mnist(data_dir, split="test", limit=1)
        return True
    except hg.HypergradientError:
        return False


# ======================================================================================
# The two runs
# ======================================================================================


def plain_run(config: WeightDecayConfig, data, keep: list | None = None) -> dict:
    """Plain training: the same model, SGD with one global decay, the same batches.

    ``keep``: a list that receives the run's objects (to measure what stays allocated).
    """
    model = recipe.build_model(config, data)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.inner_lr, weight_decay=config.init_weight_decay
    )
    stream = hg.train.BatchStream(recipe.train_loader(config, data), config.seed)
    for _ in range(config.inner_budget):
        x, y = stream.next()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    if keep is not None:
        keep.extend([model, optimizer])
    return {}


def joint_run(
    config: WeightDecayConfig, data, folder: Path | None = None, keep: list | None = None
) -> dict:
    """The recipe's tuned run; ``folder``: also checkpoint + JSONL log every hyper-step.

    Returns the seconds spent inside ``inner_steps`` and ``hypergradient`` (the rest: Adam
    on the hyperparameters, the projection, bookkeeping, checkpoints).
    """
    trainer = recipe.build_trainer(config, data, config.n_val, log_dir=folder)
    spent = {"inner_steps": 0.0, "hypergradient": 0.0}

    def timed(name):
        method = getattr(trainer, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    trainer.inner_steps = timed("inner_steps")
    trainer.hypergradient = timed("hypergradient")
    checkpoint = None if folder is None else folder / "checkpoint.pt"
    trainer.fit(config.hyper_steps, checkpoint=checkpoint)
    assert trainer.inner_step == config.inner_budget
    if keep is not None:
        keep.append(trainer)
    return spent


def time_setup(config: WeightDecayConfig, data, repeats: int, warmup: int) -> dict:
    """Interleaved repeats of plain / joint / joint with checkpoints; medians."""
    names = ("plain", "joint", "joint_checkpointed")
    samples: dict[str, list[float]] = {name: [] for name in names}
    parts: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(warmup + repeats):
            for name in names if i % 2 == 0 else reversed(names):
                gc.collect()
                start = time.perf_counter()
                if name == "plain":
                    plain_run(config, data)
                elif name == "joint":
                    spent = joint_run(config, data)
                else:
                    joint_run(config, data, Path(tmp) / f"run{i}")
                seconds = time.perf_counter() - start
                if i >= warmup:
                    samples[name].append(seconds)
                    if name == "joint":
                        parts.append(spent)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    breakdown = {
        key: statistics.median(p[key] for p in parts) for key in ("inner_steps", "hypergradient")
    }
    breakdown["rest"] = medians["joint"] - breakdown["inner_steps"] - breakdown["hypergradient"]
    return {
        "samples_s": samples,
        "median_s": medians,
        "ratio": medians["joint"] / medians["plain"],
        "paired_ratio": statistics.median(
            j / p for j, p in zip(samples["joint"], samples["plain"])
        ),
        "ratio_checkpointed": medians["joint_checkpointed"] / medians["plain"],
        "paired_ratio_checkpointed": statistics.median(
            j / p for j, p in zip(samples["joint_checkpointed"], samples["plain"])
        ),
        "breakdown_s": breakdown,
        # one plain SGD step, and the recipe's inner step (functional call + penalty)
        "plain_step_ms": 1e3 * medians["plain"] / config.inner_budget,
        "joint_inner_step_ms": 1e3 * breakdown["inner_steps"] / config.inner_budget,
        "hypergradient_ms": 1e3 * breakdown["hypergradient"] / config.hyper_steps,
    }


# ======================================================================================
# Peak memory, one fresh subprocess per run kind
# ======================================================================================


def memory_probe(kind: str, setup: str, hyper_steps: int, data_dir: str | None) -> dict:
    """Peak RSS of one run of ``kind`` over the RSS right before it (data already loaded)."""
    config = make_config(setup, hyper_steps, data_dir)
    recipe.load_data(config)  # imports what loading needs (scikit-learn: ~150 MiB); freed
    gc.collect()
    rss_before_data = status_kib("VmRSS")  # every module imported, no data held
    data = recipe.load_data(config)
    run = {"plain": plain_run, "joint": joint_run}[kind]
    run(dataclasses.replace(config, hyper_steps=2), data)  # warm-up: lazy imports, pools
    gc.collect()
    rss_before = status_kib("VmRSS")
    if not reset_peak_rss() or rss_before is None:
        return {"kind": kind, "peak_increase_mib": None, "how": "no /proc/self/clear_refs"}
    keep: list = []
    run(config, data, keep=keep)
    hwm, rss_after = status_kib("VmHWM"), status_kib("VmRSS")
    return {
        "kind": kind,
        "peak_increase_mib": (hwm - rss_before) / 1024,
        # what the run's objects still hold at its end (model, optimizer state, decays...)
        "held_after_mib": (rss_after - rss_before) / 1024,
        "rss_before_mib": rss_before / 1024,
        # the job's own memory: its data plus the run (torch's runtime excluded)
        "peak_with_data_mib": (hwm - rss_before_data) / 1024,
        "peak_rss_mib": hwm / 1024,
        "how": "VmHWM (reset right before the run) - VmRSS before",
    }


def run_memory_probes(setup: str, hyper_steps: int, data_dir: str | None) -> dict:
    # Tensors above 64 KiB get their own mmap, returned to the OS when freed: the RSS before
    # the run is then live memory, not glibc's cache of the warm-up's garbage.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parents[1] / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    results = {}
    for kind in ("plain", "joint"):
        argv = [sys.executable, str(HERE), "--memory-probe", kind, "--setup", setup,
                "--hyper-steps", str(hyper_steps),
                "--threads", str(torch.get_num_threads())]  # fmt: skip
        if data_dir is not None:
            argv += ["--data-dir", data_dir]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {kind}/{setup} failed:\n{proc.stderr}")
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, joint = results["plain"]["peak_increase_mib"], results["joint"]["peak_increase_mib"]
    results["ratio"] = None if not plain or joint is None else joint / plain
    if joint is not None:
        results["process_peak_ratio"] = (
            results["joint"]["peak_rss_mib"] / results["plain"]["peak_rss_mib"]
        )
        results["with_data_ratio"] = (
            results["joint"]["peak_with_data_mib"] / results["plain"]["peak_with_data_mib"]
        )
    return results


# ======================================================================================
# Reporting
# ======================================================================================


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _verdict(value, target) -> str:
    return "-" if value is None else ("yes" if value <= target else "NO")


def _rows(result: dict) -> dict[str, list[list[str]]]:
    """The three tables (time, memory, time breakdown) as rows of strings."""
    time_rows, memory_rows, where_rows = [], [], []
    for name, row in result["setups"].items():
        t, mem = row["time"], row["memory"]
        time_rows.append([
            name, f"{row['num_weights']:,}", str(row["inner_steps"]),
            f"{t['median_s']['plain']:.2f} s", f"{t['median_s']['joint']:.2f} s",
            f"{t['ratio']:.2f}", f"{t['paired_ratio']:.2f}",
            f"{t['paired_ratio_checkpointed']:.2f}", _verdict(t["paired_ratio"], TIME_TARGET),
        ])  # fmt: skip
        plain, joint = mem.get("plain", {}), mem.get("joint", {})
        memory_rows.append([
            name, f"{4 * row['num_weights'] / 2**20:.2f}",
            _fmt(plain.get("peak_rss_mib"), ".0f"), _fmt(joint.get("peak_rss_mib"), ".0f"),
            _fmt(mem.get("process_peak_ratio"), ".2f"),
            _verdict(mem.get("process_peak_ratio"), MEMORY_TARGET),
            _fmt(plain.get("peak_with_data_mib"), ".1f"),
            _fmt(joint.get("peak_with_data_mib"), ".1f"),
            _fmt(mem.get("with_data_ratio"), ".2f"),
            _fmt(plain.get("peak_increase_mib"), ".1f"),
            _fmt(joint.get("peak_increase_mib"), ".1f"),
            _fmt(mem.get("ratio"), ".2f"),
            _fmt(plain.get("held_after_mib"), ".1f"), _fmt(joint.get("held_after_mib"), ".1f"),
        ])  # fmt: skip
        b, total = t["breakdown_s"], t["median_s"]["joint"]
        where_rows.append([
            name, f"{t['plain_step_ms']:.2f} ms", f"{t['joint_inner_step_ms']:.2f} ms",
            f"{t['hypergradient_ms']:.1f} ms",
            f"{t['hypergradient_ms'] / t['plain_step_ms']:.1f}",
            f"{100 * b['inner_steps'] / total:.0f}%", f"{100 * b['hypergradient'] / total:.0f}%",
            f"{100 * b['rest'] / total:.0f}%",
        ])  # fmt: skip
    return {"time": time_rows, "memory": memory_rows, "where": where_rows}


TIME_COLUMNS = ("setup", "weights", "SGD steps", "plain", "hyper-training", "ratio of medians",
                "paired ratio", "paired, with checkpoints", "<= 3x")  # fmt: skip
MEMORY_COLUMNS = ("setup", "model MiB", "plain process peak MiB", "hyper process peak MiB",
                  "process ratio", "<= 2x", "plain data+run MiB", "hyper data+run MiB",
                  "data+run ratio", "plain run +MiB", "hyper run +MiB", "run ratio",
                  "plain held +MiB", "hyper held +MiB")  # fmt: skip
WHERE_COLUMNS = ("setup", "plain SGD step", "recipe inner step", "hypergradient",
                 "hypergradient / plain step", "inner steps", "hypergradients",
                 "rest")  # fmt: skip


def _md_table(columns, rows) -> list[str]:
    align = ["---"] + ["---:"] * (len(columns) - 1)
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _memory_notes(result: dict) -> list[str]:
    """Memory in units of the model's size: what is held, what one hypergradient adds."""
    notes = []
    for name, row in result["setups"].items():
        mem, model_mib = row["memory"], 4 * row["num_weights"] / 2**20
        plain, joint = mem.get("plain", {}), mem.get("joint", {})
        if joint.get("held_after_mib") is None or model_mib < 0.5:
            continue  # below ~0.5 MiB the page-granular RSS says little in model units
        notes.append(
            f"{name}: at its end the hyper-training run holds "
            f"{joint['held_after_mib'] / model_mib:.1f} model sizes (weights, gradients, and "
            f"for per-weight decay the decays, their gradient and Adam's two moments: 6), "
            f"plain training {plain['held_after_mib'] / model_mib:.1f} (weights, gradients: "
            f"2); the peak adds "
            f"{(joint['peak_increase_mib'] - joint['held_after_mib']) / model_mib:.0f} model "
            f"sizes for one hypergradient (the create_graph gradient graph, the Neumann "
            f"vectors, the mixed term)."
        )
    return [*notes, ""] if notes else []


def markdown_report(result: dict) -> str:
    m = result["machine"]
    load = m["load_average_at_start"][0] if m["load_average_at_start"] else None
    rows = _rows(result)
    lines = [
        "### Joint training cost (`benchmarks/joint_training_cost.py`)",
        "",
        f"{m['date']}; {m['cpu_model']}, {m['cpu_count']} CPUs, {m['platform']}; torch "
        f"{m['torch']} (torch threads: {m['torch_threads']}), Python {m['python']}. Median of "
        f"{m['repeats']} interleaved repeats; 1-minute load average at the start "
        f"{_fmt(load, '.2f')}. Command: `{result.get('command', '?')}`"
        + (f"; memory rerun: `{result['memory_command']}`." if "memory_command" in result else "."),
        "",
        "Per-weight decay (one hyperparameter per weight; per-tensor where the setup says so), "
        "a hyper-step every 10 mini-batch SGD "
        "steps, implicit hypergradient with a 10-term Neumann series, Adam on the log decays "
        "(the `weight-decay` recipe's run); against plain `torch.optim.SGD(weight_decay=1e-3)` "
        "training of the same model for the same SGD steps on the same batches.",
        "",
        *[f"* **{name}**: {row['description']}" for name, row in result["setups"].items()],
        "",
        *_md_table(TIME_COLUMNS, rows["time"]),
        "",
        "*paired ratio* = median of the per-repeat ratios (the runs of one repeat back to "
        "back): robust to a machine whose speed drifts, so the target is judged on it. *with "
        "checkpoints* = the recipe's run as it is, a checkpoint and a JSONL line per "
        "hyper-step.",
        "",
        "Where the hyper-training time goes (medians):",
        "",
        *_md_table(WHERE_COLUMNS, rows["where"]),
        "",
        "*recipe inner step* = one SGD step of the hyper-training run (functional call plus "
        "the per-weight penalty); *hypergradient* = one implicit hypergradient (a fresh "
        "training batch, a validation batch, 10 Hessian-vector products through one retained "
        "gradient graph, the mixed term); *rest* = Adam on the decays and bookkeeping.",
        "",
        "Memory (one fresh subprocess per run, after a warm-up run):",
        "",
        *_md_table(MEMORY_COLUMNS, rows["memory"]),
        "",
        *_memory_notes(result),
        "*process peak* = the whole process's peak RSS, what a user provisions (torch's "
        "runtime included); the target is judged on its ratio. *data+run* = the peak over "
        "the RSS before the data was loaded (every module already imported): the job's own "
        "memory, loading the data set included (decoding MNIST's 60,000 images is most of "
        "it). *run +MiB* = the peak over the RSS right before the run (data loaded; the "
        "model, optimizers, decays and their Adam state are built inside the run). *held "
        "+MiB* = RSS after the run minus before it (negative when the run's allocations "
        "reused memory freed by the data loading).",
        "",
        "The *run* ratio is far above 2x by construction for per-weight decay: the decays, "
        "their gradient and Adam's two moments are four model-sized tensors that plain SGD "
        "(weights and gradients: two) does not have, and one implicit hypergradient's "
        "working set is a fixed number of model sizes. None of it grows with the number of "
        "inner steps (unrolling would store every step's graph); with a per-tensor decay "
        "(a few hyperparameters) the hyperparameter state is negligible.",
        "",
    ]
    return "\n".join(lines)


def print_rich(result: dict, console: Console) -> None:
    rows = _rows(result)
    titles = {
        "time": "Hyper-training (per-weight decay, implicit Neumann-10) vs plain training",
        "where": "Where the hyper-training time goes",
        "memory": "Memory",
    }
    columns = {"time": TIME_COLUMNS, "where": WHERE_COLUMNS, "memory": MEMORY_COLUMNS}
    for key in ("time", "where", "memory"):
        table = Table(title=titles[key])
        for col in columns[key]:
            table.add_column(col, justify="left" if col == "setup" else "right")
        for row in rows[key]:
            table.add_row(*row)
        console.print(table)


# ======================================================================================
# Entry point
# ======================================================================================


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 hyper-steps, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    parser.add_argument(
        "--hyper-steps", type=int, default=None, help="hyper-steps per run (default 100)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder with mnist/ (default $HYPERGRADIENT_DATA)"
    )
    parser.add_argument(
        "--setups", nargs="+", choices=sorted(SETUPS), default=None, help="default: all found"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="rerun only the memory subprocesses and update <out>/joint_training_cost.json",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--memory-probe", choices=("plain", "joint"), help=argparse.SUPPRESS)
    parser.add_argument("--setup", choices=sorted(SETUPS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def update_memory(args, hyper_steps: int) -> int:
    """Replace the memory part of an existing result (the timings are kept as they were)."""
    path = args.out / "joint_training_cost.json"
    result = json.loads(path.read_text())
    for setup in args.setups or list(result["setups"]):
        result["setups"][setup]["memory"] = run_memory_probes(setup, hyper_steps, args.data_dir)
    result["memory_command"] = rerun_command("joint_training_cost.py", sys.argv[1:])
    path.write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "joint_training_cost.md").write_text(markdown_report(result))
    print_rich(result, Console(width=max(Console().width, 130)))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hyper_steps = args.hyper_steps or (20 if args.quick else 100)
    if args.memory_probe:
        probe = memory_probe(args.memory_probe, args.setup, hyper_steps, args.data_dir)
        print(json.dumps(probe))
        return 0
    if args.memory_only:
        return update_memory(args, hyper_steps)
    repeats = args.repeats or (3 if args.quick else 5)
    warmup = 1
    console = Console(width=max(Console().width, 130))  # wide tables even in a pipe
    setups = args.setups or [
        s for s in SETUPS if s.startswith("digits") or mnist_available(args.data_dir)
    ]
    started = time.perf_counter()
    result = {"machine": machine_info(repeats=repeats), "hyper_steps": hyper_steps, "setups": {}}
    result["command"] = rerun_command("joint_training_cost.py", sys.argv[1:])
    for setup in setups:
        config = make_config(setup, hyper_steps, args.data_dir)
        data = recipe.load_data(config)
        num_weights = sum(p.numel() for p in recipe.build_model(config, data).parameters())
        sizes = [data.num_features, config.hidden, data.num_classes]
        val_batch = config.val_batch_size or config.n_val
        description = (
            f"{setup} MLP {'-'.join(map(str, sizes))}, batch {config.batch_size}, "
            f"validation batch {val_batch}, {config.granularity.replace('_', '-')} decay, "
            f"{config.method} hypergradient"
        )
        console.print(f"[bold]{description}[/bold]: {repeats} interleaved repeats ...")
        timing = time_setup(config, data, repeats, warmup)
        memory = {}
        if not args.skip_memory:
            console.print("   memory: 2 fresh subprocesses ...")
            memory = run_memory_probes(setup, hyper_steps, args.data_dir)
        result["setups"][setup] = {
            "description": description,
            "config": dataclasses.asdict(config),
            "num_weights": num_weights,
            "inner_steps": config.inner_budget,
            "time": timing,
            "memory": memory,
        }
    result["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "joint_training_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "joint_training_cost.md").write_text(markdown_report(result))
    print_rich(result, console)
    console.print(f"wrote {args.out}/joint_training_cost.{{json,md}} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
