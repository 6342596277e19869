"""``hypergradient.search`` workers that start together or die (issue 14).

* Four worker processes started at the same instant on a new SQLite study (three times
  over, a new file each time) all finish, and each study holds exactly the requested
  number of finished trials.  Without the creation lock the same race failed most rounds
  (``table studies already exists``, ``UNIQUE constraint failed: alembic_version``).
* A heartbeat every 10 s, a grace period of 30 s and 3 retries are the defaults.
* A worker SIGKILLed mid-trial: the other two finish, its trial is failed and re-run with
  the same parameters (the default heartbeat and retry), and the study ends with exactly
  the requested number of finished trials.  A trial whose worker died before its first
  heartbeat is failed and retried as well.
* Without a heartbeat, a dead worker's trial makes ``optimize`` stop after ``max_wait``
  with one warning line that says what happened and what to do, instead of waiting forever.

Every wait has a timeout: a worker process is killed if it outlives its test.
"""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from hypergradient import search  # noqa: E402
from hypergradient.search import study as study_mod  # noqa: E402

WORKER = Path(__file__).with_name("_search_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error"}


@pytest.fixture(autouse=True)
def _quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    yield
    optuna.logging.set_verbosity(verbosity)


def _spawn(role, marks, url, n_trials, *extra):
    args = [sys.executable, str(WORKER), role, str(marks), url, str(n_trials), *extra]
    return subprocess.Popen(args, env=ENV, stderr=subprocess.PIPE, text=True)


def _wait_for(found, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not found():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _finish(procs, timeout):
    """Every process's (exit status, stderr); kills those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            err = f"[killed: still running after {timeout:.0f} s]\n{err}"
        results.append((proc.returncode, err))
    return results


def _kill(procs):
    """Kill the processes a failed test left running."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def _by_state(study):
    by_state = {}
    for t in study.trials:
        by_state.setdefault(t.state.name, []).append(t)
    return by_state


def _surplus(trials):
    return all(t.user_attrs.get(study_mod.SURPLUS_ATTR) for t in trials)


def test_workers_started_together_on_a_new_study_all_finish(tmp_path):
    marks, rounds, n, workers = tmp_path / "marks", 3, 8, 4
    marks.mkdir()
    url = f"sqlite:///{tmp_path}/race-{{round}}.db"
    procs = [_spawn("racer", marks, url, n, "--rounds", str(rounds)) for _ in range(workers)]
    try:
        for r in range(rounds):
            # all four are up and polling for the start signal: go at the same instant
            _wait_for(
                lambda r=r: len(list(marks.glob(f"ready-{r}-*"))) == workers,
                f"four workers ready for round {r}",
                timeout=100,
            )
            assert not (tmp_path / f"race-{r}.db").exists()
            (marks / f"go-{r}").touch()
        results = _finish(procs, timeout=120)
    finally:
        _kill(procs)
    assert [code for code, _ in results] == [0] * workers, [err for _, err in results]
    for r in range(rounds):
        study = optuna.load_study(study_name="shared", storage=url.format(round=r))
        by_state = _by_state(study)
        assert len(by_state.pop("COMPLETE")) == n
        # any other trial lost the race for the last slot and was never run
        assert set(by_state) <= {"FAIL"} and _surplus(by_state.get("FAIL", []))


def _heartbeat_numbers(db):
    query = "SELECT t.number FROM trial_heartbeats h JOIN trials t USING (trial_id)"
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as connection:
        return {row[0] for row in connection.execute(query)}


def test_killed_worker_trial_is_retried_and_no_worker_hangs(tmp_path):
    marks, n = tmp_path / "marks", 6
    marks.mkdir()
    db = tmp_path / "shared.db"
    url = f"sqlite:///{db}"
    # a dead worker is noticed after 4-5 s (SQLite stamps heartbeats to the second; a grace
    # of 4 beats leaves a live worker's heartbeat thread 3 s of delay on a loaded machine)
    beat = ("--heartbeat", "1", "--grace", "4")
    victim = _spawn("victim", marks, url, n, *beat)
    survivors = [_spawn("survivor", marks, url, n, *beat) for _ in range(2)]
    try:
        _wait_for(lambda: any(marks.glob("victim-*")), "the victim's trial", timeout=100)
        (mark,) = marks.glob("victim-*")
        killed = int(mark.name.split("-")[1])
        # kill it once its heartbeat is in the database: a dead worker's trial, not a new one
        _wait_for(lambda: killed in _heartbeat_numbers(db), "the victim's heartbeat")
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL
        results = _finish([victim, *survivors], timeout=90)
    finally:
        _kill([victim, *survivors])
    assert [code for code, _ in results[1:]] == [0, 0], [err for _, err in results]
    study = optuna.load_study(study_name="shared", storage=url)
    by_state = _by_state(study)
    assert set(by_state) == {"COMPLETE", "FAIL"}
    assert len(by_state["COMPLETE"]) == n  # exactly the requested count
    for t in by_state["COMPLETE"]:  # every finished trial's result is in the database
        assert t.value == t.user_attrs["result"] == pytest.approx(t.params["x"] ** 2)
    failed = {t.number for t in by_state["FAIL"]}
    assert killed in failed
    assert _surplus(t for t in by_state["FAIL"] if t.number != killed)
    # the killed trial was re-queued with its parameters (on a loaded machine the survivors may
    # have finished the n trials before the re-queued one was taken: it is then surplus)
    # (a retry that was itself taken for dead on a loaded machine is re-queued again: several)
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert retries and all(t.params == study.trials[killed].params for t in retries)


def test_heartbeat_and_retry_are_on_by_default(tmp_path):
    storage = search.create_study("d", run_dir=tmp_path)._storage
    assert storage.get_heartbeat_interval() == 10
    assert storage._backend.grace_period == 30
    assert storage._backend.failed_trial_callback._max_retry == 3  # re-queues 3 times
    off = search.make_storage(f"sqlite:///{tmp_path}/off.db", heartbeat_interval=None)
    assert off.get_heartbeat_interval() is None and off.failed_trial_callback is None
    # an in-memory database has one process: no heartbeat (its thread would see an empty one)
    assert search.make_storage("sqlite:///:memory:").get_heartbeat_interval() is None
    assert (tmp_path / "study.db.lock").is_file()  # the creation lock beside the database


def test_trial_that_never_beat_is_failed_and_retried(tmp_path):
    # a worker killed between starting a trial and its first heartbeat: a trial made by
    # hand with ask() (no heartbeat thread) is in that state
    study = search.create_study(
        "silent", run_dir=tmp_path, sampler="random", heartbeat_interval=1, grace_period=1
    )
    search.optimize(study, lambda t: t.suggest_float("x", -1.0, 1.0) ** 2, n_trials=2)
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna: ask() has no heartbeat
        held = study.ask()
    held.suggest_float("x", -1.0, 1.0)
    start = time.monotonic()
    trials = search.optimize(
        study,
        lambda t: t.suggest_float("x", -1.0, 1.0) ** 2,
        n_trials=3,
        timeout=30,  # the guard: without the fix this returns 2 trials after 30 s
        poll_interval=0.05,
    )
    assert len(trials) == 3 and time.monotonic() - start < 20
    assert study.trials[held.number].state.name == "FAIL"
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == held.number]
    assert retry.params == held.params


def test_without_heartbeat_a_dead_workers_trial_stops_optimize_with_a_message(tmp_path):
    study = search.create_study("dead", run_dir=tmp_path, sampler="random", heartbeat_interval=None)
    search.optimize(study, lambda t: t.suggest_float("x", -1.0, 1.0) ** 2, n_trials=2)
    held = study.ask()  # the running trial of a worker that died: nothing will finish it
    start = time.monotonic()
    with pytest.warns(RuntimeWarning) as record:
        trials = search.optimize(
            study,
            lambda t: t.suggest_float("x", -1.0, 1.0) ** 2,
            n_trials=3,
            timeout=30,  # the guard: without the fix this returns after 30 s, silently
            poll_interval=0.05,
            max_wait=1.0,
        )
    assert 1.0 <= time.monotonic() - start < 20
    assert len(trials) == 2
    (warning,) = record
    message = str(warning.message)
    assert "\n" not in message
    assert f"trial(s) [{held.number}] that other workers are running" in message
    assert "2 of 3 trials finished" in message
    assert "fail_running_trials" in message and "heartbeat_interval=10" in message
    # the way out the message gives
    assert search.fail_running_trials(study) == [held.number]
    assert len(search.optimize(study, lambda t: t.suggest_float("x", -1.0, 1.0), n_trials=3)) == 3


def test_creation_that_lost_a_race_is_retried_and_other_errors_are_not(monkeypatch):
    # the guard for server databases (and SQLite without fcntl): no lock, retries
    import sqlalchemy

    monkeypatch.setattr(study_mod.time, "sleep", lambda s: None)
    race = sqlalchemy.exc.OperationalError(
        "CREATE TABLE studies", {}, sqlite3.OperationalError("table studies already exists")
    )
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = sqlalchemy.exc.OperationalError(
        "INSERT", {}, sqlite3.OperationalError("database is locked")
    )
    errors = [race, wrapped]

    def build():
        if errors:
            raise errors.pop(0)
        return "made"

    assert study_mod._retry_creation(build) == "made" and not errors
    missing = sqlalchemy.exc.OperationalError(
        "CONNECT", {}, sqlite3.OperationalError("unable to open database file")
    )
    calls = []

    def broken():
        calls.append(1)
        raise missing

    with pytest.raises(sqlalchemy.exc.OperationalError, match="unable to open"):
        study_mod._retry_creation(broken)
    assert len(calls) == 1
    always = []

    def losing():
        always.append(1)
        raise race

    with pytest.raises(sqlalchemy.exc.OperationalError, match="already exists"):
        study_mod._retry_creation(losing)
    assert len(always) == study_mod.CREATE_ATTEMPTS
