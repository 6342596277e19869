"""Run folders and checkpoints that are safe to resume and safe to share.

* a planted checkpoint or cache whose unpickling would run code is refused, with one line,
  by every path that reads one, and the code never runs;
* a checkpoint of another run is refused with one line that says what differs;
* a second process on a run folder exits with one line; two writers of one file never share
  a temporary name; a resumed trainer logs every hyper-step once;
* bad output folders and Ctrl-C get one line from the command line, and the demo keeps what
  it finished.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import hypergradient as hg
from _cli import one_line_error
from hypergradient import learned
from hypergradient._io import RunLock, load_checkpoint, save_atomic
from hypergradient.cli import main
from hypergradient.demo import DemoConfig, run_demo

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


class _Payload:
    """Unpickling this runs ``touch <marker>``: what an attacker would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> Path:
    """A checkpoint-looking file at ``path`` whose loading with ``weights_only=False`` would
    create ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_step": 1, "payload": _Payload(marker)}, path)
    return path


def _assert_refused(err: str, marker: Path) -> None:
    assert "refused to load" in err and "could run code" in err, err
    assert "posix.system" in err or "nt.system" in err, err  # names what it refused
    assert len(str(err).splitlines()) == 1, err
    assert not marker.exists(), "the planted code ran"


def test_the_planted_payload_really_runs_when_unpickled(tmp_path):
    # the control: without weights_only the file does run its command
    marker = tmp_path / "ran"
    _plant(tmp_path / "c.pt", marker)
    torch.load(tmp_path / "c.pt", weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------- library paths


def _trainer(width: int = 8, **kwargs) -> hg.BilevelTrainer:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    data = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))
    return hg.BilevelTrainer(
        model,
        hg.hparams.WeightDecay("per_weight", initial=1e-2),
        data,
        data,
        torch.optim.SGD(model.parameters(), lr=0.1),
        method=hg.Implicit(max_steps=2),
        hyper_every=2,
        **kwargs,
    )


def _meta_train(checkpoint):
    return learned.meta_train(
        learned.MLPLearnedOptimizer(hidden=4),
        [learned.NoisyQuadraticFamily(dim=2)],
        2,
        checkpoint=checkpoint,
        resume=True,
        num_pairs=1,
        schedule=learned.TruncationSchedule(horizon=4, truncation_length=2),
    )


def _self_train(checkpoint):
    return learned.self_train(
        learned.LinearLearnedOptimizer(scale_dir=0.1),
        [learned.NoisyQuadraticFamily(dim=2)],
        population_size=2,
        num_steps=2,
        horizon=4,
        num_pairs=1,
        eval_every=2,
        eval_tasks=1,
        checkpoint=checkpoint,
        resume=True,
    )


def _distiller(checkpoint):
    from hypergradient.hparams import DistilledData
    from hypergradient.recipes import distill

    x = torch.randn(30, 4)
    y = torch.arange(30) % 3
    model = nn.Linear(4, 3)
    kind = DistilledData(3, (4,), per_class=1, real_x=x, real_y=y)
    d = distill.ColdStartDistiller(
        model, kind, x, y, steps=2, lr=0.1, hyper_lr=0.01, batch_size=10,
        init_for_step=lambda s: {k: torch.zeros_like(v) for k, v in model.named_parameters()},
    )  # fmt: skip
    return d.fit(2, checkpoint=checkpoint, resume=True)


RESUME_PATHS = {
    "BilevelTrainer.fit": lambda ck: _trainer().fit(3, checkpoint=ck, resume=True),
    "BilevelTrainer.load_checkpoint": lambda ck: _trainer().load_checkpoint(ck),
    "learned.meta_train": _meta_train,
    "learned.self_train": _self_train,
    "ColdStartDistiller.fit": _distiller,
    "_io.load_checkpoint": lambda ck: load_checkpoint(ck, "where"),
}


@pytest.mark.parametrize("path", sorted(RESUME_PATHS))
def test_every_library_resume_path_refuses_a_planted_checkpoint(path, tmp_path):
    marker = tmp_path / "ran"
    checkpoint = _plant(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(hg.HypergradientError) as info:
        RESUME_PATHS[path](checkpoint)
    _assert_refused(str(info.value), marker)


# ----------------------------------------------------------------------------- command line


def _cli_cases():
    from test_lr_schedule import TINY as LR
    from test_meta_pretrain_recipe import TINY as PRETRAIN
    from test_meta_recipes import TINY as META

    return {
        "maml": ["maml", "--set", *META["maml"]],
        "hyper-representation": ["hyper-representation", "--set", *META["hyper-representation"]],
        "lr-schedule": ["lr-schedule", "--set", *LR],
        "meta-pretrain": ["meta-pretrain", "--set", *PRETRAIN],
        "demo": ["demo", "--hidden", "4", "--n-train", "60", "--n-val", "30"],
    }


@pytest.mark.parametrize("recipe", ["maml", "hyper-representation", "lr-schedule",
                                    "meta-pretrain", "demo"])  # fmt: skip
def test_every_command_line_resume_refuses_a_planted_checkpoint(recipe, tmp_path, capsys):
    marker = tmp_path / "ran"
    out = tmp_path / "run"
    _plant(out / "checkpoint.pt", marker)
    argv = _cli_cases()[recipe]
    assert main([argv[0], "--out", str(out), "--resume", "--no-progress", *argv[1:]]) == 2
    _assert_refused(one_line_error(capsys), marker)


def test_a_checkpoint_of_another_recipe_is_refused_with_what_differs(tmp_path, capsys):
    cases = _cli_cases()
    maml, lr = tmp_path / "maml", tmp_path / "lr"
    assert main(["maml", "--out", str(maml), "--no-progress", *cases["maml"][1:]]) == 0
    assert main(["lr-schedule", "--out", str(lr), "--no-progress", *cases["lr-schedule"][1:]]) == 0
    capsys.readouterr()
    (lr / "checkpoint.pt").write_bytes((maml / "checkpoint.pt").read_bytes())
    argv = ["lr-schedule", "--out", str(lr), "--resume", "--no-progress", *cases["lr-schedule"][1:]]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "belongs to another run (recipe: 'maml' -> 'lr-schedule'" in err, err


def test_a_trainer_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    checkpoint = tmp_path / "ck.pt"
    _trainer(width=8).fit(1, checkpoint=checkpoint)
    with pytest.raises(hg.HypergradientError, match=r"belongs to another run \(.*model") as info:
        _trainer(width=6).fit(2, checkpoint=checkpoint, resume=True)
    assert "[8, 5] -> [6, 5]" in str(info.value)  # the first layer's weight shape
    with pytest.raises(hg.HypergradientError, match="carries no run signature"):
        torch.save(_trainer().state_dict(), checkpoint)  # not written by save_checkpoint
        _trainer().fit(2, checkpoint=checkpoint, resume=True)


def test_benchmark_caches_refuse_planted_files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _common
    import reverse_engineering
    import self_training
    import warmstart_bo

    marker = tmp_path / "ran"
    cache = _plant(tmp_path / "cache.pt", marker)
    calls = {
        "_common.load_cache": lambda: _common.load_cache(cache),
        "warmstart_bo.load_meta_cache": lambda: warmstart_bo.load_meta_cache(cache, ("k",)),
        "reverse_engineering.trained": lambda: reverse_engineering.trained(
            None, cache, True, 1, 0.1, 1, 1
        ),
    }
    args = SimpleNamespace(**{k: 1 for k in self_training.SETTINGS})
    _plant(tmp_path / "work" / "run.pt", marker)
    calls["self_training.run"] = lambda: self_training.run(args, "run", tmp_path / "work")
    for name, call in calls.items():
        with pytest.raises(hg.HypergradientError) as info:
            call()
        _assert_refused(str(info.value), marker)
        assert "benchmark cache" in str(info.value), name


def test_the_warmstart_cache_round_trips_through_plain_tensors(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import warmstart_bo
    from hypergradient.search import warmstart as ws

    rng = np.random.default_rng(0)
    task = ws.Task("t", "fam", rng.normal(size=(6, 2)), np.array([0, 1] * 3), np.eye(2))
    meta = ws.MetaDataset((task,), ws.SurfaceGrid(folds=2))
    warmstart_bo.save_meta_cache(tmp_path / "c.pt", ("a", 1), meta, ["note"])
    back, notes = warmstart_bo.load_meta_cache(tmp_path / "c.pt", ("a", 1))
    assert notes == ["note"] and back.grid == meta.grid
    np.testing.assert_array_equal(back.tasks[0].x, task.x)
    np.testing.assert_array_equal(back.tasks[0].surface, task.surface)
    assert warmstart_bo.load_meta_cache(tmp_path / "c.pt", ("b", 1)) is None


def test_no_code_path_unpickles_without_the_restricted_loader():
    # every read goes through hypergradient._io.load_tensors (weights_only=True); the one
    # pickle reader left is the CIFAR-10 loader's allow-list unpickler
    offenders = []
    for path in [*(ROOT / "src").rglob("*.py"), *BENCHMARKS.rglob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            # (a mention in a docstring stands in double backticks)
            if re.search(r"(?<!``)(torch\.load\(|pickle\.loads?\(|weights_only=False)", code):
                if path.name == "_io.py" and "weights_only=True" in code:
                    continue
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------- sharing


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    path = tmp_path / "checkpoint.pt"
    errors = []

    def writer(value):
        try:
            for _ in range(30):
                save_atomic({"value": torch.full((100,), float(value))}, path, signature="s")
        except Exception as err:  # pragma: no cover - the assertion below reports it
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    state = load_checkpoint(path, "test", signature="s")
    assert len(set(state["value"].tolist())) == 1  # one writer's whole file, never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp left


def test_run_lock_names_the_holder_and_is_released(tmp_path):
    lock = tmp_path / ".hypergradient.lock"
    # flock locks belong to an open file: a second open in this process is refused too
    with (
        RunLock(lock, "first"),
        pytest.raises(hg.HypergradientError) as info,
        RunLock(lock, "second", hint=", or pass another --out"),
    ):
        pass
    assert f"(pid {os.getpid()})" in str(info.value) and "another --out" in str(info.value)
    with RunLock(lock, "third"):  # released on exit
        pass


def _cli(*args: str) -> list[str]:
    # a test run started in the background inherits SIGINT ignored (as every background job
    # of a non-interactive shell does); a user's terminal delivers Ctrl-C: restore that
    return [sys.executable, "-c", "import signal, sys; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from hypergradient.cli import main; sys.exit(main(sys.argv[1:]))", *args]  # fmt: skip


def test_two_processes_on_one_run_folder_the_second_exits_with_one_line(tmp_path):
    out = tmp_path / "run"
    long_run = ["maml", "--out", str(out), "--no-progress", "--set", "data=sinusoid",
                "meta_iterations=100000", "eval_every=0"]  # fmt: skip
    first = subprocess.Popen(_cli(*long_run), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():  # running: the lock is taken before
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.1)
        config_before = (out / "config.toml").read_text()
        second = subprocess.run(
            _cli(*long_run, "meta_iterations=5"), capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"another process (pid {first.pid})" in lines[0], lines
        assert (out / "config.toml").read_text() == config_before  # nothing overwritten
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)  # reaps it and closes the pipe
    # a killed holder leaves no stale lock: resuming in the same folder works at once
    resumed = subprocess.run(
        _cli("maml", "--out", str(out), "--no-progress", "--resume", "--set",
             "meta_iterations=3", "test_episodes=2"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr


def test_a_resumed_trainer_logs_every_hyper_step_once(tmp_path):
    class Killed(Exception):
        pass

    def kill_at_three(trainer, record):
        if record["hyper_step"] == 3:
            raise Killed

    checkpoint = tmp_path / "ck.pt"
    with pytest.raises(Killed):
        _trainer(log_dir=tmp_path, callbacks=[kill_at_three]).fit(5, checkpoint=checkpoint)
    _trainer(log_dir=tmp_path).fit(5, checkpoint=checkpoint, resume=True)
    lines = (tmp_path / "hyper_steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["hyper_step"] for line in lines] == [1, 2, 3, 4, 5]
    # a fresh run (no resume) in the same folder starts a fresh log
    _trainer(log_dir=tmp_path).fit(2, checkpoint=checkpoint)
    assert len((tmp_path / "hyper_steps.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- bad paths


@pytest.mark.parametrize("command", ["demo", "lr-schedule"])
def test_an_output_path_that_is_a_file_or_unwritable_gets_one_line(command, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out, pattern in ((a_file, "is a file, expected a folder"),
                         (a_file / "sub", "cannot write there")):  # fmt: skip
        assert main([command, "--out", str(out), "--no-progress"]) == 2
        err = one_line_error(capsys)
        assert pattern in err and "--out" in err, err


def _tiny_demo(out: Path) -> DemoConfig:
    return DemoConfig(hidden=8, n_train=100, n_val=50, total_steps=60, hyper_every=10,
                      neumann_terms=2, grid=[0.0, 1e-3], out=str(out))  # fmt: skip


def test_the_demo_keeps_what_it_finished_on_ctrl_c_and_resumes_to_the_same_result(
    tmp_path, monkeypatch
):
    from rich.console import Console

    import hypergradient.demo as demo

    whole = run_demo(_tiny_demo(tmp_path / "whole"), show_progress=False, console=Console())
    calls = {"n": 0}
    real = demo.implicit_hypergrad

    def interrupted_at_the_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "implicit_hypergrad", interrupted_at_the_fourth)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_demo(_tiny_demo(out), show_progress=False, console=Console())
    partial = json.loads((out / "results.json").read_text())
    assert partial["interrupted"] and len(partial["grid"]) == 2
    assert partial["per_weight_steps_done"] == 30
    monkeypatch.setattr(demo, "implicit_hypergrad", real)
    resumed = run_demo(_tiny_demo(out), show_progress=False, console=Console(), resume=True)
    for key in ("val_loss", "test_loss"):
        assert resumed["per_weight"][key] == whole["per_weight"][key]
        assert resumed["best_grid"][key] == whole["best_grid"][key]
    assert resumed["per_weight"]["history"] == whole["per_weight"]["history"]


def test_ctrl_c_in_the_demo_process_gives_one_line_and_exit_130(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--no-progress", "--hidden", "8", "--n-train", "100",
            "--n-val", "50", "--total-steps", "100000"]  # fmt: skip
    proc = subprocess.Popen(_cli(*argv), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted;") and "--resume" in lines[0]
    assert json.loads((out / "results.json").read_text())["interrupted"] is True


# ----------------------------------------------------------------------------- threads


def test_threads_are_chosen_by_model_size_and_restored():
    from hypergradient._threads import SMALL_MODEL, threads_for

    default = torch.get_num_threads()
    assert threads_for(10_000) == 1 and threads_for(10_000, 3) == 3
    assert threads_for(SMALL_MODEL) == default
    with pytest.raises(hg.HypergradientError, match=r"threads=-1: expected an int >= 1"):
        threads_for(10, -1)
    torch.set_num_threads(2)
    try:
        trainer = _trainer()
        trainer.fit(2)
        assert [r["threads"] for r in trainer.history] == [1, 1]  # a 5-8-3 MLP: one thread
        assert torch.get_num_threads() == 2  # restored after fit
        explicit = _trainer(threads=2)
        explicit.fit(1)
        assert explicit.history[0]["threads"] == 2
    finally:
        torch.set_num_threads(default)
