"""The main job: per-weight weight decay by implicit hypergradients vs a global-decay grid.

What it does (Lorraine, Vicol & Duvenaud 2020, Algorithm 1, at CPU scale):

1. Grid baseline: train the MLP once per global weight decay in ``config.grid`` for
   ``total_steps`` SGD steps; keep the one with the lowest validation loss.
2. Per-weight run: one log weight decay *per weight* (as many hyperparameters as weights).
   Warm start: the weights keep training; every ``hyper_every`` SGD steps one hyper-step
   computes the implicit hypergradient (Neumann series with ``neumann_terms`` terms and step
   ``inner_lr``) at the current weights and moves the log decays with Adam.  The decays
   are clipped to ``0.9 * 2 / inner_lr`` after every hyper-step: past ``2 / inner_lr`` a
   weight's SGD step is unstable (the results count the hyper-steps that clipped).
3. Both are evaluated on validation and held-out test data; a table is printed, and the
   results (JSON), the config and a plot (PNG) are written to ``config.out``.

Thousands of hyperparameters fitted on a small validation set can over-fit it: the table
shows the test numbers beside the validation ones for that reason.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ._errors import HypergradientError
from ._io import (
    LOCK_HINT,
    LOCK_NAME,
    RunLock,
    load_checkpoint,
    make_run_folder,
    save_atomic,
    write_json_atomic,
    write_text_atomic,
)
from ._threads import threads_for, torch_threads
from .data import Split, load_digits_split
from .hypergrad import implicit_hypergrad


@dataclass
class DemoConfig:
    """Options of ``hypergradient demo`` (defaults run in well under a minute on 2 cores)."""

    hidden: int = 128  # width of the MLP's hidden layer: 64 -> hidden -> 10
    n_train: int = 600  # digits examples used for training (the rest: validation, test)
    n_val: int = 300
    total_steps: int = 3000  # full-batch SGD steps, the same budget for every run
    inner_lr: float = 0.3  # SGD step; also the Neumann step alpha (stable as SGD is)
    hyper_every: int = 10  # SGD steps between hyper-steps (warm start)
    neumann_terms: int = 10  # terms of the Neumann series per hypergradient (HVPs)
    hyper_lr: float = 0.03  # Adam step on the log weight decays
    init_weight_decay: float = 1e-3  # starting value of every per-weight decay
    grid: list[float] = field(default_factory=lambda: [0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0: chosen by model size (1 for this MLP)
    out: str = "hypergradient-runs/demo"

    def validate(self) -> None:
        positive_ints = ("hidden", "n_train", "n_val", "total_steps", "hyper_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HypergradientError(
                    f"demo: --{name.replace('_', '-')} must be an int >= 1, got {value!r}."
                )
        if not isinstance(self.threads, int) or self.threads < 0:
            raise HypergradientError(
                f"demo: --threads must be an int >= 0 (0: chosen by model size), got "
                f"{self.threads!r}."
            )
        if not isinstance(self.neumann_terms, int) or self.neumann_terms < 0:
            raise HypergradientError(
                f"demo: --neumann-terms must be an int >= 0, got {self.neumann_terms!r}."
            )
        for name in ("inner_lr", "hyper_lr", "init_weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise HypergradientError(
                    f"demo: --{name.replace('_', '-')} must be a positive number, got {value!r}."
                )
        if not self.grid or any((not math.isfinite(g)) or g < 0 for g in self.grid):
            raise HypergradientError(
                f"demo: --grid must be a non-empty list of weight decays >= 0, got {self.grid!r}."
            )
        if self.hyper_every > self.total_steps:
            raise HypergradientError(
                f"demo: --hyper-every ({self.hyper_every}) must not exceed --total-steps "
                f"({self.total_steps})."
            )


# ----------------------------------------------------------------------------- the model


def init_mlp(
    num_in: int, hidden: int, num_out: int, seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """PyTorch's default ``nn.Linear`` initialisation, seeded, as a parameter dict."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * bound

    return {
        "w1": uniform((num_in, hidden), num_in),
        "b1": uniform((hidden,), num_in),
        "w2": uniform((hidden, num_out), hidden),
        "b2": uniform((num_out,), hidden),
    }


def mlp(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def decay_key(param_name: str) -> str:
    """Hyperparameter name of the log weight decays of one parameter tensor."""
    return f"log_wd.{param_name}"


def weight_decay_penalty(params, log_wd) -> torch.Tensor:
    """``0.5 * sum_i exp(log_wd_i) * w_i^2`` over every weight (``log_wd`` keyed by decay_key)."""
    return 0.5 * sum(torch.sum(log_wd[decay_key(k)].exp() * w**2) for k, w in params.items())


def evaluate(params, x, y) -> tuple[float, float]:
    with torch.no_grad():
        logits = mlp(params, x)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def sgd_steps(params, log_wd, data: Split, steps: int, lr: float):
    """``steps`` full-batch SGD steps on cross-entropy + weight decay (no graph kept)."""
    hp = {k: v.detach() for k, v in log_wd.items()}
    for _ in range(steps):
        w = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = F.cross_entropy(mlp(w, data.x_train), data.y_train) + weight_decay_penalty(w, hp)
        grads = torch.autograd.grad(loss, list(w.values()))
        params = {k: (w[k] - lr * g).detach() for k, g in zip(w, grads)}
    return params


# ----------------------------------------------------------------------------- the runs


def run_grid(
    config: DemoConfig, data: Split, progress=None, task=None, *, finished=(), on_row=None
) -> list[dict]:
    """One run per global decay of ``config.grid``; the rows in ``finished`` (a resumed demo)
    are kept, and ``on_row(rows)`` is called after every new row (the checkpoint)."""
    rows = list(finished)
    if progress is not None:
        progress.advance(task, config.total_steps * len(rows))
    for wd in config.grid[len(rows) :]:
        start = time.perf_counter()
        params = init_mlp(
            data.num_features, config.hidden, data.num_classes, config.seed, data.x_train.dtype
        )
        # log(0) = -inf would make the penalty 0 * w^2 = 0 exactly, which is what wd=0 means
        log_wd = {
            decay_key(k): torch.full_like(v, math.log(wd) if wd > 0 else -math.inf)
            for k, v in params.items()
        }
        params = sgd_steps(params, log_wd, data, config.total_steps, config.inner_lr)
        val_loss, val_acc = evaluate(params, data.x_val, data.y_val)
        test_loss, test_acc = evaluate(params, data.x_test, data.y_test)
        rows.append(
            {
                "weight_decay": wd,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "seconds": time.perf_counter() - start,
            }
        )
        if on_row is not None:
            on_row(rows)
        if progress is not None:
            progress.advance(task, config.total_steps)
    return rows


def run_per_weight(
    config: DemoConfig, data: Split, progress=None, task=None, *, saved=None, on_hyper_step=None
) -> dict:
    """Warm-started joint training of weights and per-weight log decays (Lorraine Alg. 1).

    ``saved``: a state that ``on_hyper_step(state)`` was given (after every hyper-step) by an
    interrupted run; the run continues from it to the same result as an uninterrupted one."""
    start = time.perf_counter()
    params = init_mlp(
        data.num_features, config.hidden, data.num_classes, config.seed, data.x_train.dtype
    )
    log_wd = {
        decay_key(k): torch.full_like(v, math.log(config.init_weight_decay)).requires_grad_(True)
        for k, v in params.items()
    }
    hyper_opt = torch.optim.Adam(list(log_wd.values()), lr=config.hyper_lr)
    history = {"step": [], "val_loss": [], "train_loss": []}
    done, clipped_steps, seconds_before = 0, 0, 0.0
    if saved is not None:
        params = dict(saved["params"])
        with torch.no_grad():
            for k, v in log_wd.items():
                v.copy_(saved["log_wd"][k])
        hyper_opt.load_state_dict(saved["hyper_optimizer"])
        history = json.loads(saved["history"])
        done, clipped_steps = int(saved["done"]), int(saved["clipped_steps"])
        seconds_before = float(saved["seconds"])
        if progress is not None:
            progress.advance(task, done)
    # SGD on 0.5 * wd * w^2 is stable only while inner_lr * wd < 2: keep a 10% margin
    max_decay = 0.9 * 2.0 / config.inner_lr
    log_max_decay = math.log(max_decay)

    def inner_loss(p, h):
        return F.cross_entropy(mlp(p, data.x_train), data.y_train) + weight_decay_penalty(p, h)

    def outer_loss(p, h):
        return F.cross_entropy(mlp(p, data.x_val), data.y_val)

    while done < config.total_steps:
        chunk = min(config.hyper_every, config.total_steps - done)
        params = sgd_steps(params, log_wd, data, chunk, config.inner_lr)
        done += chunk
        hypergrad = implicit_hypergrad(
            inner_loss,
            outer_loss,
            params,
            {k: v.detach() for k, v in log_wd.items()},
            solver="neumann",
            max_steps=config.neumann_terms,
            alpha=config.inner_lr,
            stationarity_tol=None,  # warm start: the weights are by design not converged
        )
        hyper_opt.zero_grad()
        for k, v in log_wd.items():
            v.grad = hypergrad[k]
        hyper_opt.step()
        with torch.no_grad():
            over = sum(int((v > log_max_decay).sum()) for v in log_wd.values())
            for v in log_wd.values():
                v.clamp_(max=log_max_decay)
        clipped_steps += over > 0
        val_loss, _ = evaluate(params, data.x_val, data.y_val)
        train_loss, _ = evaluate(params, data.x_train, data.y_train)
        history["step"].append(done)
        history["val_loss"].append(val_loss)
        history["train_loss"].append(train_loss)
        if on_hyper_step is not None:
            on_hyper_step(
                {
                    "params": params,
                    "log_wd": {k: v.detach() for k, v in log_wd.items()},
                    "hyper_optimizer": hyper_opt.state_dict(),
                    "history": json.dumps(history),
                    "done": done,
                    "clipped_steps": clipped_steps,
                    "seconds": seconds_before + time.perf_counter() - start,
                }
            )
        if progress is not None:
            progress.advance(task, chunk)
    val_loss, val_acc = evaluate(params, data.x_val, data.y_val)
    test_loss, test_acc = evaluate(params, data.x_test, data.y_test)
    decays = torch.cat([v.detach().exp().reshape(-1) for v in log_wd.values()])
    return {
        "val_loss": val_loss,
        "val_acc": val_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "seconds": seconds_before + time.perf_counter() - start,
        "num_hparams": int(decays.numel()),
        "weight_decay_quantiles": {
            q: float(torch.quantile(decays.double(), q)) for q in (0.05, 0.5, 0.95)
        },
        "decay_clipping": {"max_decay": max_decay, "hyper_steps_clipped": clipped_steps},
        "history": history,
    }


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = result["per_weight"]["history"]
    best = result["best_grid"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(hist["step"], hist["val_loss"], label="per-weight decay: validation loss")
    ax.plot(hist["step"], hist["train_loss"], label="per-weight decay: training loss", alpha=0.7)
    ax.axhline(
        best["val_loss"],
        color="k",
        ls="--",
        label=f"best global decay ({best['weight_decay']:g}): validation loss",
    )
    ax.set_xlabel(f"inner SGD step (one hyper-step every {result['config']['hyper_every']} steps)")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title("Per-weight weight decay by implicit hypergradients (digits MLP)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run_demo(
    config: DemoConfig, *, show_progress: bool = True, console=None, resume: bool = False
) -> dict:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    config.validate()
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: don't squeeze the table to 80 columns
            console = Console(width=110)
    out = Path(config.out)
    make_run_folder(out, "--out")
    where = f"hypergradient demo --out {str(out)!r}"
    with RunLock(out / LOCK_NAME, where, hint=LOCK_HINT):
        checkpoint = out / "checkpoint.pt"
        signature = {k: v for k, v in asdict(config).items() if k != "out"}
        saved = {"grid": "[]", "per_weight": None}
        if resume and checkpoint.is_file():
            saved = load_checkpoint(checkpoint, f"{where} --resume", signature=signature)
        elif resume:
            console.print(f"no checkpoint in {out}: starting from the beginning")
        else:
            checkpoint.unlink(missing_ok=True)
        torch.manual_seed(config.seed)
        data = load_digits_split(config.n_train, config.n_val, seed=config.seed)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
        finished = {"grid": json.loads(saved["grid"]), "per_weight": saved["per_weight"]}

        def keep(**changes) -> None:
            finished.update(changes)
            state = {"grid": json.dumps(finished["grid"]), "per_weight": finished["per_weight"]}
            save_atomic(state, checkpoint, signature=signature)

        try:
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                disable=not show_progress,
            ) as progress:
                grid_task = progress.add_task(
                    "global-decay grid", total=config.total_steps * len(config.grid)
                )
                grid = run_grid(
                    config,
                    data,
                    progress,
                    grid_task,
                    finished=finished["grid"],
                    on_row=lambda rows: keep(grid=rows),
                )
                pw_task = progress.add_task("per-weight decay (implicit)", total=config.total_steps)
                per_weight = run_per_weight(
                    config,
                    data,
                    progress,
                    pw_task,
                    saved=finished["per_weight"],
                    on_hyper_step=lambda state: keep(per_weight=state),
                )
        except KeyboardInterrupt:
            partial = finished["per_weight"]
            write_json_atomic(
                out / "results.json",
                {
                    "interrupted": True,
                    "resume_with": "hypergradient demo --resume (same options)",
                    "config": asdict(config),
                    "grid": finished["grid"],
                    "per_weight_steps_done": 0 if partial is None else int(partial["done"]),
                },
            )
            raise

        best = min(grid, key=lambda r: r["val_loss"])
        result = {
            "config": asdict(config),
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "grid": grid,
            "best_grid": best,
            "per_weight": per_weight,
            "per_weight_beats_grid_on_validation": per_weight["val_loss"] < best["val_loss"],
        }
        write_text_atomic(out / "results.json", json.dumps(result, indent=2))
        _plot(result, out / "losses.png")

        table = Table(title="Weight decay on digits: one per weight (implicit) vs best global grid")
        for col in ("method", "#hparams", "val loss", "val acc", "test loss", "test acc", "time"):
            table.add_column(col, justify="left" if col == "method" else "right")
        grid_seconds = sum(r["seconds"] for r in grid)
        table.add_row(
            f"best global wd={best['weight_decay']:g}",
            "1",
            f"{best['val_loss']:.4f}",
            f"{best['val_acc']:.3f}",
            f"{best['test_loss']:.4f}",
            f"{best['test_acc']:.3f}",
            f"{grid_seconds:.0f}s/{len(grid)} runs",
        )
        pw = per_weight
        table.add_row(
            "per-weight (implicit)",
            f"{pw['num_hparams']:,}",
            f"{pw['val_loss']:.4f}",
            f"{pw['val_acc']:.3f}",
            f"{pw['test_loss']:.4f}",
            f"{pw['test_acc']:.3f}",
            f"{pw['seconds']:.0f}s/1 run",
        )
        console.print(table)
        verdict = "lower" if result["per_weight_beats_grid_on_validation"] else "NOT lower"
        console.print(
            f"Per-weight validation loss is {verdict} than the best global decay. "
            f"Wrote {out / 'results.json'}, {out / 'config.json'} and {out / 'losses.png'}."
        )
        return result


def run_demo(
    config: DemoConfig, *, show_progress: bool = True, console=None, resume: bool = False
) -> dict:
    """Run the demo, write ``results.json``, ``config.json`` and ``losses.png``; return results.

    Finished work is checkpointed in ``config.out`` (every grid run and every hyper-step);
    ``resume=True`` (``hypergradient demo --resume``) continues an interrupted demo with the
    same options to the same result. After Ctrl-C, ``results.json`` holds what was finished.
    The run uses ``config.threads`` torch threads (0: one for this small model, see
    :func:`hypergradient._threads.threads_for`); ``results.json`` records the count.
    """
    config.validate()
    num_params = 64 * config.hidden + config.hidden + config.hidden * 10 + 10
    with torch_threads(threads_for(num_params, config.threads)):
        return _run_demo(config, show_progress=show_progress, console=console, resume=resume)
