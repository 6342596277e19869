"""The ```python blocks of README.md and of the documentation site's pages (``docs/**/*.md``),
each run as a reader runs one: pasted alone into a fresh interpreter.

``example(marker, **readouts)`` names the one block that contains ``marker`` and the values a
test wants from it: Python expressions, evaluated in the block's namespace after it ran and
sent back as JSON (tensors and arrays as nested lists).  ``.run()`` gives a :class:`Run`: exit
code, stdout, stderr, those values and the working directory the block ran in.

Every block runs at most once per test session, in a fresh ``python`` subprocess:

* working directory: a new empty temporary folder (what the block writes lands there);
* ``HYPERGRADIENT_DATA``: the data folder ``tests/_datasets.py`` found (a block that reads
  MNIST / Fashion-MNIST / Omniglot files is skipped with its reason when there is none);
* warnings are errors, with the ``filterwarnings`` of ``pyproject.toml`` (as in-process tests);
* one torch thread (``OMP_NUM_THREADS=1``), a timeout of :data:`TIMEOUT_S` seconds.

Examples are declared at import time, so once pytest has collected the test modules it knows
every block and readout the session needs, and ``tests/conftest.py`` hands the selected tests
to :func:`select`.  The first request for a run then starts a background thread that runs the
blocks those tests will ask for, one at a time, in the order the tests run (a block a test is
waiting for goes first): on a 2-core machine they overlap with the other tests instead of
adding their time to the session.  Where the tests use several torch threads (or there is
one core), a block runs when a test asks for it instead.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import _datasets

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def pages() -> list[Path]:
    """README.md, then every page of the site, in a fixed order."""
    return [README, *sorted(DOCS.rglob("*.md"))]


TIMEOUT_S = 600

# What a block reads from the data folder, by the calls that read it.
_DATA_CALLS = {
    "mnist": re.compile(r"load_mnist\(|[\"']mnist[\"']|image_pair_tasks\("),
    "fashion-mnist": re.compile(r"load_fashion_mnist\(|[\"']fashion-mnist[\"']"),
    "omniglot": re.compile(r"omniglot_tasks\(|omniglot_one_shot_runs\(|load_omniglot"),
}

# Runs the block (line numbers as in its page), then the test's extra code, and writes the
# readouts as JSON.  Only ``json`` and ``sys`` are imported before the block.
_DRIVER = r"""
import json, sys
source, page, first_line, out, readouts, epilogue = sys.argv[1:]
namespace = {"__name__": "__main__"}
exec(compile("\n" * (int(first_line) - 1) + open(source).read(), page, "exec"), namespace)
if epilogue:
    exec(compile(epilogue, "<test's epilogue>", "exec"), namespace)


def plain(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [plain(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return repr(v)


values = {name: plain(eval(expr, namespace)) for name, expr in json.loads(readouts).items()}
with open(out, "w") as f:
    json.dump(values, f)
"""


@dataclass(frozen=True)
class Block:
    """One ```python block: its page (relative to the repository), first code line's number
    and code."""

    line: int
    code: str
    page: str = "README.md"

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str | None = None) -> list[Block]:
    """Every ```python block of README.md and the site's pages (or of ``page`` alone)."""
    found = []
    for path in pages():
        name = path.relative_to(ROOT).as_posix()
        if page is not None and name != page:
            continue
        text = path.read_text()
        found += [
            Block(text.count("\n", 0, m.start(1)) + 1, m.group(1), name)
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
        ]
    return found


def find_block(marker: str) -> Block:
    """The one block (README.md or the site) that contains ``marker``."""
    found = [b for b in blocks() if marker in b.code]
    assert len(found) == 1, f"{len(found)} python blocks of the README and docs contain {marker!r}"
    return found[0]


def needed_data(block: Block) -> list[str]:
    """The data subfolders (``tests/_datasets.py``'s ``LAYOUT``) the block reads."""
    return [sub for sub, calls in _DATA_CALLS.items() if calls.search(block.code)]


@dataclass
class Run:
    """What one fresh interpreter did with a block."""

    block: Block
    returncode: int
    stdout: str
    stderr: str
    values: dict
    cwd: Path
    seconds: float

    def check(self) -> Run:
        """This run, asserted to have exited with 0 (else the block's stderr tail)."""
        assert self.returncode == 0, (
            f"{self.block.page} block at line {self.block.line} exited with {self.returncode} in a "
            f"fresh interpreter:\n{self.stderr[-4000:]}"
        )
        return self


class _Job:
    """A block's one run for the session, with the union of every readout asked of it."""

    def __init__(self, block: Block):
        self.block = block
        self.readouts: dict[str, str] = {}
        self.epilogues: list[str] = []
        self.claimed = False  # guarded by _LOCK: whoever claims the job runs it
        self.done = threading.Event()
        self.run: Run | None = None

    def finish(self) -> None:
        """Run the block (unless its data files are missing: :meth:`Example.run` skips)."""
        try:
            if any(_data_folder(sub) is None for sub in needed_data(self.block)):
                self.run = Run(self.block, 0, "", "", {}, Path(), 0.0)
            else:
                self.run = self.execute()
        except Exception as exc:  # reported by the test that asks for the run
            self.run = Run(self.block, -1, "", f"could not run the block: {exc!r}", {},
                           Path(), 0.0)  # fmt: skip
        finally:
            self.done.set()

    def execute(self) -> Run:
        prefix = f"{self.block.page.replace('/', '_')}-{self.block.line}-"
        cwd = Path(tempfile.mkdtemp(prefix=prefix, dir=_session_dir()))
        source, out = cwd.parent / f"{cwd.name}.py", cwd.parent / f"{cwd.name}.json"
        source.write_text(self.block.code)
        warnings = [f"-W{w}" for w in _warning_filters()]
        argv = [sys.executable, *warnings, "-c", _DRIVER, str(source), self.block.page,
                str(self.block.line),
                str(out), json.dumps(self.readouts), "\n".join(self.epilogues)]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=cwd, env=_environment(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        _RUNNING.add(proc)
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += f"\n(killed after the {TIMEOUT_S} s timeout)"
        finally:
            _RUNNING.discard(proc)
        values = json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else {}
        return Run(self.block, proc.returncode, stdout, stderr, values, cwd,
                   time.perf_counter() - start)  # fmt: skip


class Example:
    """A test's handle on one block (see the module docstring)."""

    def __init__(self, block: Block, readouts: dict[str, str], epilogue: str | None):
        self.block = block
        self.readouts = readouts
        job = _JOBS.get(block.where)
        if job is None or job.block != block:
            job = _JOBS[block.where] = _Job(block)
        for name, expr in readouts.items():
            assert job.readouts.setdefault(name, expr) == expr, f"readout {name!r} asked twice"
        if epilogue and epilogue not in job.epilogues:
            job.epilogues.append(epilogue)
        self._job = job

    def run(self) -> Run:
        """The block's run (waited for, or run now), asserted to have exited with 0; skips
        when the block needs data files that were not found."""
        missing = [sub for sub in needed_data(self.block) if _data_folder(sub) is None]
        if missing:
            pytest.skip(_datasets.skip_reason(*missing))
        job = self._job
        if _start_background():
            with _WAKE:
                if job in _QUEUE:
                    _QUEUE.remove(job)
                if not job.claimed:  # a test waits for it: it goes next
                    _QUEUE.insert(0, job)
                    _WAKE.notify()
        else:
            with _LOCK:
                mine, job.claimed = not job.claimed, True
            if mine:
                job.finish()
        job.done.wait()
        run = job.run
        assert run is not None
        if run.returncode == 0 and not set(self.readouts) <= set(run.values):
            run = job.run = job.execute()  # asked for after the run: run it again, once
        return run.check()


def example(marker: str, *, epilogue: str | None = None, **readouts: str) -> Example:
    """The block (README.md or the site) containing ``marker``; ``readouts`` are
    ``name=expression`` pairs evaluated after the block (and after ``epilogue``, test-only
    code run in its namespace)."""
    return Example(find_block(marker), readouts, epilogue)


def select(items) -> None:
    """The blocks the collected (selected) test items will ask for, in their order, become
    the ones to run ahead.  A test's blocks are the :class:`Example` objects its function
    names among its module's globals: one directly, or a dict of them keyed by one of the
    test's parameters (``tests/test_readme_standalone.py``)."""
    wanted: list[_Job] = []
    for item in items:
        function, module = getattr(item, "function", None), getattr(item, "module", None)
        if function is None or module is None:
            continue
        params = list(getattr(getattr(item, "callspec", None), "params", {}).values())
        for name in function.__code__.co_names:
            value = vars(module).get(name)
            examples = [value] if isinstance(value, Example) else []
            if isinstance(value, dict):
                examples = [v for k, v in value.items() if isinstance(v, Example) and k in params]
            wanted += [e._job for e in examples if e._job not in wanted]
    _STATE["selected"] = wanted


# ----------------------------------------------------------------------------- machinery

_LOCK = threading.Lock()
_WAKE = threading.Condition(_LOCK)
_JOBS: dict[str, _Job] = {}
_QUEUE: list[_Job] = []
_RUNNING: set[subprocess.Popen] = set()
_STATE: dict[str, object] = {}


def _session_dir() -> Path:
    """One temporary folder for the session's runs, removed at exit."""
    with _LOCK:
        if "dir" not in _STATE:
            _STATE["dir"] = Path(tempfile.mkdtemp(prefix="hypergradient-readme-"))
        return _STATE["dir"]  # type: ignore[return-value]


def _warning_filters() -> list[str]:
    """pytest's ``filterwarnings`` from pyproject.toml (the same syntax as ``python -W``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(config["tool"]["pytest"]["ini_options"].get("filterwarnings", []))


def _data_folder(sub: str) -> Path | None:
    return {
        "mnist": _datasets.DATASETS,
        "fashion-mnist": _datasets.ALL_DATASETS,
        "omniglot": _datasets.OMNIGLOT_DATASETS,
    }[sub]


def _environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    folder = _datasets.ALL_DATASETS or _datasets.DATASETS or _datasets.OMNIGLOT_DATASETS
    if folder is not None:
        env[_datasets.ENV_VAR] = str(folder)
    return env


def _start_background() -> bool:
    """Start the thread that runs blocks ahead (once); False where it is not used: the tests
    run torch on several threads, or there is one core, so a block would only slow them."""
    with _WAKE:
        if "thread" not in _STATE:
            use = (os.cpu_count() or 1) >= 2 and torch.get_num_threads() == 1
            _STATE["thread"] = threading.Thread(target=_work, daemon=True) if use else None
            if use:
                ahead = _STATE.get("selected", list(_JOBS.values()))
                _QUEUE[:] = [job for job in ahead if not job.claimed]  # type: ignore[union-attr]
                _STATE["thread"].start()  # type: ignore[union-attr]
        return _STATE["thread"] is not None


def _work() -> None:
    while True:
        with _WAKE:
            while not _QUEUE:
                _WAKE.wait()
            job = _QUEUE.pop(0)
            if job.claimed:
                continue
            job.claimed = True
        job.finish()


@atexit.register
def _clean_up() -> None:
    """At exit (also after a failure or Ctrl-C): stop a running block, remove the runs."""
    for proc in list(_RUNNING):
        proc.kill()
        proc.wait()
    if "dir" in _STATE:
        shutil.rmtree(_STATE["dir"], ignore_errors=True)  # type: ignore[arg-type]
