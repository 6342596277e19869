r"""Optuna as the black-box engine: studies on disk, samplers, pruners, a crash-safe worker loop.

* :func:`create_study` - a study stored in SQLite under the run folder by default
  (``sqlite:///<run_dir>/study.db``), or in any Optuna RDB URL (PostgreSQL, MySQL, ...);
  created or re-opened by name, so a killed run resumes and several worker processes (or
  machines) share one study.
* :func:`make_sampler` - ``"random"``, ``"grid"`` (needs the search space), ``"tpe"``
  (Bergstra et al. 2011) and ``"cmaes"`` (Hansen's CMA-ES; needs the ``cmaes`` package).
* :func:`make_pruner` - ``"hyperband"`` (Li et al. 2018) and ``"halving"`` (asynchronous
  successive halving) over the intermediate values an objective reports once per epoch or
  hyper-step (``trial.report(value, step)``), or ``"none"``.
* :func:`optimize` - the worker loop: run trials until the study holds ``n_trials`` finished
  (complete or pruned) trials, whichever process finished them.

**Workers that start together.**  Several processes may call :func:`create_study` on a new
database at the same instant: for a SQLite file the schema and the study are created under an
inter-process lock (a ``.lock`` file beside the database), and for a server database
(PostgreSQL, MySQL) a creation that lost a race to another process is retried.

**Workers that die.**  By default (``heartbeat_interval=10``) every running trial writes a
heartbeat to the database; a trial whose heartbeat is older than ``grace_period`` seconds
(default ``3 * heartbeat_interval``) belongs to a dead worker and is marked ``FAIL`` by the
next worker that looks, and re-queued with the same parameters (up to ``max_retry=3`` times,
Optuna's ``RetryHeartbeatStaleTrialCallback``), so a SIGKILLed worker loses nothing that had
finished and its running trial is run again by a survivor.  :func:`optimize` counts finished
trials across all workers and waits for the running trials of others before it stops, so the
study ends with exactly ``n_trials`` finished trials.  With ``heartbeat_interval=None`` nothing
tells a dead worker's trial from a slow one: a worker that has waited ``max_wait`` seconds for
other workers' trials stops with a warning that says so, instead of waiting forever.

Requires the optional dependency: ``pip install "hypergradient[hpo]"``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._errors import HypergradientError
from .space import SearchSpace, check_space, grid_of

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: creation races are retried instead
    fcntl = None

SAMPLERS = ("random", "grid", "tpe", "cmaes")
PRUNERS = ("none", "hyperband", "halving")

#: user attribute set on a trial that a worker asked for but the study no longer needed
SURPLUS_ATTR = "hypergradient:surplus"

#: seconds between a running trial's heartbeats, unless a study says otherwise
DEFAULT_HEARTBEAT = 10
#: how many times a dead worker's trial is re-queued, unless a study says otherwise
DEFAULT_MAX_RETRY = 3
#: tries at creating a database schema or study that lost a race to another process
CREATE_ATTEMPTS = 8


def require_optuna():
    """Import Optuna, or say how to install it."""
    try:
        import optuna
    except ImportError:
        raise HypergradientError(
            "hypergradient.search needs Optuna: pip install 'hypergradient[hpo]' (or "
            "pip install optuna)."
        ) from None
    return optuna


@contextlib.contextmanager
def _experimental() -> Iterator[None]:
    """Silence Optuna's experimental-feature notices inside the block: the heartbeat, the
    stale-trial retry and multivariate TPE are used on purpose."""
    optuna = require_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _is_int(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def default_storage(run_dir: str | Path) -> str:
    """The SQLite URL of a run folder's study: ``sqlite:///<run_dir>/study.db``.

    The folder is created if it does not exist (the database file is not).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from hypergradient import search
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     url = search.default_storage(Path(tmp) / "run")
        ...     print(url.startswith("sqlite:///"), url.endswith("/run/study.db"))
        ...     print((Path(tmp) / "run").is_dir())
        True True
        True
    """
    path = Path(run_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'study.db'}"


def _sqlite_database(url: str) -> str | None:
    """The database part of a SQLite URL (``None``: not SQLite, or an unreadable URL)."""
    if not url.startswith("sqlite"):
        return None
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).database or ""
    except sqlalchemy.exc.ArgumentError:
        return None


def _in_memory(url: str) -> bool:
    """An in-memory SQLite database: one process owns it, and other threads see it empty."""
    database = _sqlite_database(url)
    return database is not None and (database in ("", ":memory:") or "mode=memory" in url)


@contextlib.contextmanager
def _creation_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<file>.lock`` beside a SQLite file (other URLs: no lock).

    Why a lock and not only retries: Optuna creates a new database in several steps that each
    check and then write (the tables through SQLAlchemy's ``create_all``, the version row, the
    alembic stamp, then the study row), and on a new file two processes interleave them:
    ``table studies already exists``, ``UNIQUE constraint failed: alembic_version``.  A
    retry usually gets past that, but a process can lose several times over; under one lock
    the first process creates everything and the others find it made.  ``flock`` is released
    by the kernel when its holder dies, so a SIGKILLed worker cannot leave the lock held; it
    covers threads of one process as well (each opens its own file description).  Where
    ``fcntl`` is missing (Windows), the folder is read-only or the URL names a server
    database (whose workers may sit on other machines), :func:`_retry_creation` is the guard.
    """
    database = _sqlite_database(url)
    handle = None
    if fcntl is not None and database and not _in_memory(url) and not database.startswith("file:"):
        path = Path(database)
        if path.parent.is_dir():
            with contextlib.suppress(OSError):
                handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _creation_race(error: BaseException | None) -> bool:
    """An error (or its cause: Optuna wraps some database errors in ``StorageInternalError``)
    of a process that created the same schema or study as another: SQLite's ``table ...
    already exists`` / ``UNIQUE constraint failed`` / ``database is locked``, PostgreSQL's
    ``relation ... already exists`` / ``duplicate key``, MySQL's ``Table ... already
    exists`` / ``Duplicate entry``."""
    import sqlalchemy

    while error is not None:
        if isinstance(error, sqlalchemy.exc.IntegrityError):
            return True
        if isinstance(error, sqlalchemy.exc.DBAPIError):
            message = str(error).lower()
            return any(
                key in message for key in ("already exists", "duplicate", "unique", "locked")
            )
        error = error.__cause__
    return False


def _retry_creation(build: Callable[[], Any]) -> Any:
    """``build()``, tried again (up to ``CREATE_ATTEMPTS`` times, with a short random pause)
    when it lost a creation race to another process: the next try finds what the winner
    made.  Any other error, or the last try's, propagates."""
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            return build()
        except Exception as error:
            if attempt == CREATE_ATTEMPTS or not _creation_race(error):
                raise
        time.sleep(random.uniform(0.02, 0.1) * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def make_storage(
    url: str,
    *,
    heartbeat_interval: int | None = DEFAULT_HEARTBEAT,
    grace_period: int | None = None,
    max_retry: int | None = None,
):
    """An Optuna RDB storage for ``url`` (``sqlite:///file.db``, ``postgresql://...``).

    Safe to call from several processes at once on a database that does not exist yet
    (see :func:`_creation_lock`).

    Args:
        heartbeat_interval: seconds between a running trial's heartbeats (default 10);
            ``None``: no heartbeat, and a killed worker's trial then stays ``RUNNING`` until
            :func:`fail_running_trials`.  An in-memory SQLite database (``sqlite://``,
            ``sqlite:///:memory:``) has no heartbeat: one process owns it, so no other worker
            can die, and the heartbeat thread would see an empty database of its own.
        grace_period: seconds without a heartbeat after which a running trial counts as
            dead (default ``3 * heartbeat_interval``: SQLite stamps heartbeats to the whole
            second and a beat may wait for the write lock, and a live trial taken for dead
            is lost - its worker fails when it reports the result).
        max_retry: how many times a dead worker's trial is re-queued with its parameters
            (default 3 with a heartbeat).

    SQLite writers wait up to 60 s for the file lock (several workers write one file), and
    the file is kept in write-ahead-log mode (see ``_write_ahead_log``).

    Examples:
        >>> from hypergradient import search
        >>> storage = search.make_storage("sqlite://")  # in-memory SQLite: one process
        >>> type(storage).__name__, storage.get_heartbeat_interval()
        ('RDBStorage', None)
        >>> search.make_storage("study.db")
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: search.make_storage(url='study.db'): expected a ...
    """
    with _creation_lock(url):
        return _make_storage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            max_retry=max_retry,
        )


def _make_storage(
    url: str, *, heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None
):
    """:func:`make_storage` without the creation lock (the caller holds it)."""
    optuna = require_optuna()
    if not isinstance(url, str) or "://" not in url:
        raise HypergradientError(
            f"search.make_storage(url={url!r}): expected a database URL such as "
            f"'sqlite:///study.db' or 'postgresql://user@host/db'."
        )
    for name, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
        if value is not None and not _is_int(value, 1):
            raise HypergradientError(
                f"search.make_storage({name}={value!r}): expected an integer >= 1 (seconds) "
                f"or None."
            )
    if max_retry is not None and not _is_int(max_retry, 0):
        raise HypergradientError(
            f"search.make_storage(max_retry={max_retry!r}): expected an integer >= 0 or None."
        )
    if heartbeat_interval is None and (grace_period is not None or (max_retry or 0) > 0):
        raise HypergradientError(
            "search.make_storage: grace_period and max_retry act on dead workers' trials, "
            "which are found by their missing heartbeat; also set heartbeat_interval (e.g. 10)."
        )
    if _in_memory(url):
        heartbeat_interval = None
    if max_retry is None:
        max_retry = 0 if heartbeat_interval is None else DEFAULT_MAX_RETRY
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    kwargs: dict[str, Any] = {}
    if heartbeat_interval is not None:
        kwargs["heartbeat_interval"] = heartbeat_interval
        kwargs["grace_period"] = grace_period or 3 * heartbeat_interval
        if max_retry > 0:
            storages = optuna.storages
            with _experimental():
                if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
                    retry = storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
                    kwargs["heartbeat_stale_trial_callback"] = retry
                else:  # pragma: no cover - the name and argument of Optuna < 4.9
                    retry = storages.RetryFailedTrialCallback(max_retry=max_retry)
                    kwargs["failed_trial_callback"] = retry

    def build():
        with _experimental():
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        if url.startswith("sqlite") and not _in_memory(url):
            _write_ahead_log(storage.engine)
        return storage

    return _retry_creation(build)


def _write_ahead_log(engine) -> None:
    """SQLite in write-ahead-log mode with ``synchronous=NORMAL``: a commit no longer waits
    for the disk (a study writes on every reported value; on a busy disk that was most of a
    search's time), readers do not block the writer, and a killed process still loses
    nothing it committed (only a power cut can drop the last commits)."""
    import sqlalchemy

    def pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(engine, "connect", pragmas)
    engine.dispose()  # the connections Optuna opened while setting up get the pragmas too


def make_sampler(
    name: str,
    *,
    seed: int | None = 0,
    space: SearchSpace | None = None,
    grid_points: int = 5,
    startup_trials: int = 10,
):
    """An Optuna sampler by name.

    Args:
        name: ``"random"``, ``"grid"`` (the grid of ``space`` with ``grid_points`` values
            per continuous axis, see :func:`~hypergradient.search.space.grid_of`; visited in
            a seeded random order), ``"tpe"`` (multivariate TPE; the first ``startup_trials``
            trials are random) or ``"cmaes"`` (CMA-ES over the numeric parameters; ``Choice``
            parameters are drawn at random; the first ``startup_trials`` trials are random).
        seed: the sampler's seed (``None``: not reproducible).

    Examples:
        >>> from hypergradient import search
        >>> type(search.make_sampler("tpe", seed=0)).__name__
        'TPESampler'
        >>> space = {"hidden": search.Choice((16, 64)), "layers": search.Int(1, 2)}
        >>> type(search.make_sampler("grid", space=space)).__name__
        'GridSampler'
        >>> search.make_sampler("grid")
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: search.make_sampler('grid'): a grid sampler needs ...
    """
    optuna = require_optuna()
    if name not in SAMPLERS:
        raise HypergradientError(
            f"search.make_sampler({name!r}): unknown sampler; expected one of {list(SAMPLERS)}."
        )
    if not _is_int(startup_trials, 1):
        raise HypergradientError(
            f"search.make_sampler(startup_trials={startup_trials!r}): expected an integer >= 1."
        )
    samplers = optuna.samplers
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    if name == "grid":
        if space is None:
            raise HypergradientError(
                "search.make_sampler('grid'): a grid sampler needs the search space; pass "
                "space={'name': search.Float(...), ...}."
            )
        return samplers.GridSampler(grid_of(check_space(space), grid_points), seed=seed)
    if name == "tpe":
        with _experimental():  # multivariate TPE is marked experimental in older Optuna
            return samplers.TPESampler(
                seed=seed, n_startup_trials=startup_trials, multivariate=True
            )
    try:
        import cmaes  # noqa: F401  (Optuna imports it lazily, on the first trial)
    except ImportError:
        raise HypergradientError(
            "search.make_sampler('cmaes'): CMA-ES needs the cmaes package: pip install "
            "'hypergradient[hpo]' (or pip install cmaes)."
        ) from None
    independent = samplers.RandomSampler(seed=seed)
    return samplers.CmaEsSampler(
        seed=seed,
        n_startup_trials=startup_trials,
        independent_sampler=independent,
        warn_independent_sampling=False,
    )


def make_pruner(
    name: str, *, min_resource: int = 1, max_resource: int | None = None, reduction_factor: int = 3
):
    r"""An Optuna pruner by name, over the steps a trial reports (``trial.report(v, step)``).

    ``"hyperband"``: brackets :math:`s = 0..s_\max` of successive halving with rate
    ``reduction_factor`` :math:`\eta`, from ``min_resource`` to ``max_resource`` reported
    steps (Li et al. 2018); ``"halving"``: one asynchronous successive-halving bracket
    (a trial continues past rung :math:`r` only if it is in the top :math:`1/\eta` there);
    ``"none"``: no pruning.

    Examples:
        >>> from hypergradient import search
        >>> type(search.make_pruner("hyperband", max_resource=27)).__name__
        'HyperbandPruner'
        >>> type(search.make_pruner("halving", reduction_factor=2)).__name__
        'SuccessiveHalvingPruner'
        >>> search.make_pruner("median")
        Traceback (most recent call last):
        ...
        hypergradient...HypergradientError: search.make_pruner('median'): unknown pruner; ...
    """
    optuna = require_optuna()
    if name not in PRUNERS:
        raise HypergradientError(
            f"search.make_pruner({name!r}): unknown pruner; expected one of {list(PRUNERS)}."
        )
    ints = {"min_resource": min_resource, "reduction_factor": reduction_factor}
    if max_resource is not None:
        ints["max_resource"] = max_resource
    for key, value in ints.items():
        least = 2 if key == "reduction_factor" else 1
        if not _is_int(value, least):
            raise HypergradientError(
                f"search.make_pruner({key}={value!r}): expected an integer >= {least}."
            )
    if max_resource is not None and max_resource < min_resource:
        raise HypergradientError(
            f"search.make_pruner: max_resource={max_resource} < min_resource={min_resource}."
        )
    pruners = optuna.pruners
    if name == "none":
        return pruners.NopPruner()
    if name == "halving":
        return pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=reduction_factor
        )
    return pruners.HyperbandPruner(
        min_resource=min_resource,
        max_resource="auto" if max_resource is None else max_resource,
        reduction_factor=reduction_factor,
    )


def create_study(
    name: str,
    *,
    run_dir: str | Path | None = None,
    storage: str | None = None,
    sampler: str | Any = "tpe",
    pruner: str | Any = "none",
    space: SearchSpace | None = None,
    seed: int | None = 0,
    direction: str = "minimize",
    startup_trials: int = 10,
    grid_points: int = 5,
    min_resource: int = 1,
    max_resource: int | None = None,
    reduction_factor: int = 3,
    heartbeat_interval: int | None = DEFAULT_HEARTBEAT,
    grace_period: int | None = None,
    max_retry: int | None = None,
):
    """Create the study ``name`` in its database, or re-open it if it exists.

    Any number of processes may call this at the same instant, on a database that does not
    exist yet: one creates the schema and the study, the others open them.

    Args:
        name: the study's name in the database (several studies may share one file).
        run_dir: where the default SQLite file ``study.db`` goes.
        storage: any Optuna RDB URL instead (``sqlite:///path.db``, ``postgresql://...``);
            exactly one of ``run_dir`` and ``storage``.
        sampler, pruner: names for :func:`make_sampler` / :func:`make_pruner`, or Optuna
            objects.
        space: the search space (needed by ``sampler="grid"``).
        heartbeat_interval, grace_period, max_retry: dead-worker handling, see
            :func:`make_storage`: by default a heartbeat every 10 s, a trial without one for
            30 s is failed and re-queued (3 times at most); ``heartbeat_interval=None``
            turns it off.  Every process that works on the study passes the same values
            (the heartbeat is a property of each process's storage object).

    The other arguments go to :func:`make_sampler` and :func:`make_pruner`.
    Returns an ``optuna.Study``.

    Examples:
        >>> import tempfile
        >>> from hypergradient import search
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     study = search.create_study("demo", run_dir=run_dir, sampler="random")
        ...     _ = study.enqueue_trial({"x": 0.5})
        ...     again = search.create_study("demo", run_dir=run_dir)  # a second worker
        ...     print(study.study_name, study.direction.name, len(again.trials))
        demo MINIMIZE 1
    """
    optuna = require_optuna()
    if not isinstance(name, str) or not name:
        raise HypergradientError(f"search.create_study(name={name!r}): expected a non-empty str.")
    if (run_dir is None) == (storage is None):
        raise HypergradientError(
            "search.create_study: give exactly one of run_dir= (a SQLite file study.db goes "
            "there) and storage= (a database URL such as 'sqlite:///study.db')."
        )
    if direction not in ("minimize", "maximize"):
        raise HypergradientError(
            f"search.create_study(direction={direction!r}): expected 'minimize' or 'maximize'."
        )
    url = default_storage(run_dir) if storage is None else storage
    if isinstance(sampler, str):
        sampler = make_sampler(
            sampler, seed=seed, space=space, grid_points=grid_points, startup_trials=startup_trials
        )
    if isinstance(pruner, str):
        pruner = make_pruner(
            pruner,
            min_resource=min_resource,
            max_resource=max_resource,
            reduction_factor=reduction_factor,
        )
    with _creation_lock(url):  # the schema and the study row: one process at a time
        rdb = _make_storage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            max_retry=max_retry,
        )
        return _retry_creation(
            lambda: optuna.create_study(
                storage=rdb,
                sampler=sampler,
                pruner=pruner,
                study_name=name,
                direction=direction,
                load_if_exists=True,
            )
        )


# ----------------------------------------------------------------------------- workers


def _states():
    return require_optuna().trial.TrialState


def finished_trials(study) -> list:
    """The study's complete and pruned trials (every worker's), in trial-number order.

    Examples:
        >>> import optuna
        >>> from hypergradient import search
        >>> study = optuna.create_study()
        >>> _ = study.tell(study.ask(), 0.5)
        >>> _ = study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
        >>> _ = study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
        >>> _ = study.ask()  # still running
        >>> [t.state.name for t in search.finished_trials(study)]
        ['COMPLETE', 'PRUNED']
    """
    states = _states()
    return study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))


def fail_running_trials(study) -> list[int]:
    """Mark every ``RUNNING`` trial ``FAIL``; returns their numbers.

    For a study that only one process works on, resumed after a crash: its running trials
    belong to the dead process.  (Studies with several workers use the heartbeat instead.)

    Examples:
        >>> import optuna
        >>> from hypergradient import search
        >>> study = optuna.create_study()
        >>> _ = study.ask()  # a trial that a crashed worker left RUNNING
        >>> search.fail_running_trials(study)
        [0]
        >>> study.trials[0].state.name
        'FAIL'
    """
    states = _states()
    numbers = [t.number for t in study.get_trials(deepcopy=False, states=(states.RUNNING,))]
    for number in numbers:
        study.tell(number, state=states.FAIL)
    return numbers


class _Surplus(Exception):
    """A trial was started after the study already held enough live trials."""


def _heartbeat(study) -> tuple[int | None, float]:
    """The heartbeat interval and grace period of the study's storage (``None, 0``: none)."""
    storage = study._storage
    getter = getattr(storage, "get_heartbeat_interval", None)
    interval = getter() if getter is not None else None
    if interval is None:
        return None, 0.0
    backend = getattr(storage, "_backend", storage)
    grace = getattr(backend, "grace_period", None) or 2 * interval  # Optuna's own default
    return interval, float(grace)


def _with_heartbeat(study, trial_ids: list[int]) -> set[int] | None:
    """The trials among ``trial_ids`` that have written a heartbeat (``None``: the storage
    cannot say)."""
    try:
        import sqlalchemy
        from optuna.storages._rdb.models import TrialHeartbeatModel

        engine = getattr(study._storage, "_backend", study._storage).engine
    except (ImportError, AttributeError):  # pragma: no cover - not an RDB, or another Optuna
        return None
    table = TrialHeartbeatModel.__table__
    query = sqlalchemy.select(table.c.trial_id).where(table.c.trial_id.in_(trial_ids))
    with engine.connect() as connection:
        return {row[0] for row in connection.execute(query)}


def _fail_silent_trials(
    study, running: list, silent_since: dict[int, float], grace: float, now: float
) -> list[int] | None:
    """Fail the running trials that have never written a heartbeat for more than ``grace``
    seconds (timed from when this worker first saw them), and re-queue them like Optuna's
    stale trials; returns their ids (``None``: the storage cannot say which trials beat).

    Optuna's own check (``fail_stale_trials``) looks only at trials with a heartbeat; a
    worker killed between starting a trial (``study.ask``, which may sample for a while) and
    its first heartbeat left one that would otherwise hold its slot in the budget forever.
    """
    optuna = require_optuna()
    ids = [t._trial_id for t in running]
    beating = _with_heartbeat(study, ids) if ids else set()
    if beating is None:
        return None
    silent = set(ids) - beating
    for trial_id in list(silent_since):
        if trial_id not in silent:
            del silent_since[trial_id]
    storage = study._storage
    failed = []
    for trial_id in sorted(silent):
        if now - silent_since.setdefault(trial_id, now) <= grace:
            continue
        del silent_since[trial_id]
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if storage.set_trial_state_values(trial_id, state=_states().FAIL):
                failed.append(trial_id)
    getter = getattr(storage, "get_heartbeat_stale_trial_callback", None)
    if getter is None:  # pragma: no cover - Optuna < 4.9
        getter = storage.get_failed_trial_callback
    callback = getter()
    if callback is not None:
        with _experimental():
            for trial_id in failed:
                callback(study, copy.deepcopy(storage.get_trial(trial_id)))
    return failed


def optimize(
    study,
    objective: Callable[[Any], float],
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    stop: Callable[[Any], bool] | None = None,
    poll_interval: float = 0.2,
    max_wait: float | None = 600.0,
) -> list:
    """Work on ``study`` until it holds ``n_trials`` finished trials; returns them.

    Any number of processes may run this on one study (same name and database).  Each
    iteration: trials of dead workers are failed (and re-queued, see :func:`make_storage`);
    when the finished trials reach ``n_trials`` the loop ends; when the remaining budget is
    held by trials that other workers are running, it waits for them (one may die and be
    re-queued); otherwise it runs one trial of ``objective`` (with a heartbeat when the
    storage has one).  A trial that started when two workers raced for the last slot of the
    budget is failed at once (user attribute ``"hypergradient:surplus"``) instead of being run,
    so the count is exact.

    A dead worker's trial is one whose heartbeat is older than the storage's grace period, or
    one that has shown no heartbeat at all for that long (its worker died before the first
    beat; so in a study with a heartbeat, a trial made by hand with ``study.ask()`` counts as
    dead after the grace period too).  Without a heartbeat nothing tells a dead worker's
    running trial from a slow one: after ``max_wait`` seconds of waiting for other workers'
    trials with no trial finishing, this worker stops with a ``RuntimeWarning`` that says so
    and returns fewer than ``n_trials`` trials (:func:`fail_running_trials` frees the slots of
    a dead worker).

    Args:
        objective: ``objective(trial) -> float``; report intermediate values with
            ``trial.report(value, step)`` and stop with ``raise optuna.TrialPruned`` when
            ``trial.should_prune()``.
        n_trials: finished trials to reach (``None``: until ``timeout`` or ``stop``).
        timeout: seconds after which this worker starts no new trial.
        stop: ``stop(study) -> bool``, checked before every trial (e.g. a compute budget).
        poll_interval: seconds between checks while waiting for other workers.
        max_wait: without a heartbeat, seconds to wait for other workers' trials before
            giving up (``None``: wait as long as they run).  Not used with a heartbeat: a
            trial that still beats belongs to a live worker.

    Exceptions of ``objective`` propagate (the trial is marked ``FAIL`` first).

    Examples:
        >>> import optuna
        >>> from hypergradient import search
        >>> space = {"x": search.Choice((-1, 0, 2))}
        >>> study = optuna.create_study(sampler=search.make_sampler("grid", space=space))
        >>> def objective(trial):
        ...     return search.suggest(trial, space)["x"] ** 2
        >>> trials = search.optimize(study, objective, n_trials=3)
        >>> len(trials), study.best_params
        (3, {'x': 0})
    """
    optuna = require_optuna()
    states = optuna.trial.TrialState
    if n_trials is None and timeout is None and stop is None:
        raise HypergradientError(
            "search.optimize: give n_trials, timeout or stop; otherwise it never ends."
        )
    if n_trials is not None and (not isinstance(n_trials, int) or n_trials < 1):
        raise HypergradientError(f"search.optimize(n_trials={n_trials!r}): expected an int >= 1.")
    if max_wait is not None and (
        not isinstance(max_wait, (int, float)) or isinstance(max_wait, bool) or not max_wait >= 0
    ):
        raise HypergradientError(
            f"search.optimize(max_wait={max_wait!r}): expected a number of seconds >= 0 or None."
        )
    start = time.monotonic()
    deadline = math.inf if timeout is None else start + timeout
    live_states = (states.COMPLETE, states.PRUNED, states.RUNNING, states.WAITING)
    interval, grace = _heartbeat(study)
    silent_since: dict[int, float] = {}  # running trials seen without a heartbeat, since when
    waiting: tuple[float, int] | None = None  # since when this worker waits, at how many done

    def run(trial):
        if n_trials is not None:
            # trial numbers are given out one by one by the database: the first n_trials live
            # ones (failed trials excepted) make the budget, a later one is surplus
            before = study.get_trials(deepcopy=False, states=live_states)
            if sum(t.number < trial.number for t in before) >= n_trials:
                trial.set_user_attr(SURPLUS_ATTR, True)
                raise _Surplus(f"trial {trial.number} is beyond the budget of {n_trials}")
        return objective(trial)

    while time.monotonic() < deadline:
        with _experimental():
            optuna.storages.fail_stale_trials(study)
        if stop is not None and stop(study):
            break
        if n_trials is not None:
            trials = study.get_trials(deepcopy=False)
            counts = {s: sum(t.state == s for t in trials) for s in live_states}
            done = counts[states.COMPLETE] + counts[states.PRUNED]
            if done >= n_trials:
                break
            held = done + counts[states.RUNNING]
            if held >= n_trials and counts[states.WAITING] == 0:
                # others hold the rest of the budget; one of them may die
                now = time.monotonic()
                running = [t for t in trials if t.state == states.RUNNING]
                failed = None  # None: this worker cannot tell a dead worker's trial
                if interval is not None:
                    failed = _fail_silent_trials(study, running, silent_since, grace, now)
                    if failed:
                        continue  # re-queued: run them
                bounded = failed is None and max_wait is not None
                if waiting is None or waiting[1] != done:
                    waiting = (now, done)
                elif bounded and now - waiting[0] >= max_wait:
                    numbers = [t.number for t in running]
                    warnings.warn(
                        f"search.optimize: stopped after waiting {now - waiting[0]:.0f} s for "
                        f"trial(s) {numbers} that other workers are running, with {done} of "
                        f"{n_trials} trials finished; without a heartbeat a dead worker's trial "
                        f"stays RUNNING forever. If those workers are gone, call "
                        f"search.fail_running_trials(study) and optimize again; create the "
                        f"study with heartbeat_interval=10 (the default) so that survivors "
                        f"retry a dead worker's trial.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    break
                time.sleep(poll_interval)
                continue
        waiting = None
        sampler = study.sampler
        if hasattr(sampler, "is_exhausted") and sampler.is_exhausted(study):
            break  # a grid search that has visited every cell
        try:
            study.optimize(run, n_trials=1, catch=(_Surplus,))
        except optuna.exceptions.UpdateFinishedTrialError:
            # another worker took this live trial for dead (its heartbeat came late on a
            # loaded machine), failed it and re-queued its parameters: the result is dropped
            # and the re-queued copy runs it again, so this worker just goes on
            continue
        except ValueError as err:
            # the same race caught one step later: the trial was finished elsewhere between
            # optuna's state check and its tell ("Cannot tell a COMPLETE trial."); anything
            # else is a real error
            if not str(err).startswith("Cannot tell a "):
                raise
            continue
    return finished_trials(study)
