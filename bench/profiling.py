"""py-spy for the worker benchmark: a profile of one drain, a stalled worker's stacks, and
where the sampled time went, by category and process role."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import BenchError


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


@contextmanager
def profiled(pid: int, output: Path | None, gil: bool = False) -> Iterator[None]:
    """py-spy records pid and its children into output while in the block (no output: none)."""
    if output is None:
        yield
        return
    binary = py_spy()
    if binary is None:
        raise BenchError("py-spy is not installed (.venv/bin/pip install py-spy)")
    process = subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
         "--rate", "100", "--nonblocking", "--output", str(output),
         *(["--gil"] if gil else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    time.sleep(0.3)  # attach before the clock matters
    try:
        yield
    finally:
        stop_recording(process)


def stop_recording(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (py-spy writes its output), then SIGKILL if it does not end within 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def dump_stacks(pid: int, output: Path) -> Path | None:
    """Every thread's Python stack of pid (py-spy dump), for a stalled worker."""
    binary = py_spy()
    if binary is None:
        return None
    with output.open("w") as out:
        subprocess.run(
            [binary, "dump", "--pid", str(pid), "--subprocesses"],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )
    return output


#: (label, test on one stack's text); inclusive shares of each process role's samples.
CATEGORIES: list[tuple[str, Callable[[str], bool]]] = [
    ("task body: RequestTask.__call__", lambda s: "__call__ (mcard_tasks/request_task.py" in s),
    ("  Ledger.apply", lambda s: "apply (mcard_tasks/ledger.py" in s),
    ("    one-statement fast path", lambda s: "_record_success (mcard_tasks/ledger.py" in s),
    ("    general path (claim transaction)", lambda s: "_claim (mcard_tasks/ledger.py" in s),
    ("    waiting for PostgreSQL (psycopg wait)", lambda s: "wait (psycopg/" in s),
    ("    statement execution (SQLAlchemy Core)", lambda s: "Connection.execute (sqlalchemy/" in s),
    ("    commit", lambda s: "_connection_commit_impl (sqlalchemy/" in s),
    ("  get_ledger / engine_for", lambda s: "get_ledger (mcard_tasks/ledger.py" in s),
    ("    alembic schema check/upgrade", lambda s: "alembic/" in s),
    ("  validation (pydantic / payloads)", lambda s: "mcard_tasks/payloads.py" in s),
    (
        "celery tracer outside the task body",
        lambda s: (
            "trace_task (celery/app/trace.py" in s
            and "__call__ (mcard_tasks/request_task.py" not in s
        ),
    ),
    (
        "result backend / task state",
        lambda s: "celery/backends/" in s or "mcard_tasks/results" in s,
    ),
    ("logging", lambda s: "logging/__init__.py" in s),
    ("task events (celery.events)", lambda s: "celery/events/" in s),
    ("broker I/O (kombu / amqp)", lambda s: "kombu/" in s or "amqp/" in s),
    (
        "pool IPC (billiard receive/send)",
        lambda s: (
            "_recv (billiard/" in s
            or "send (billiard/" in s
            or "_write_to (celery/concurrency/asynpool" in s
        ),
    ),
    ("outbox relay thread", lambda s: "mcard_tasks/events.py" in s),
    (
        "  relay: DB (select/lock/mark)",
        lambda s: "mcard_tasks/events.py" in s and "sqlalchemy/" in s,
    ),
    ("  relay: confirmed publishes", lambda s: "_publish (mcard_tasks/events.py" in s),
    (
        "  relay: sleeping between polls",
        lambda s: "run (mcard_tasks/events.py" in s and "Event.wait (threading" in s,
    ),
    ("consumer event loop (asynloop)", lambda s: "asynloop (celery/worker/loops.py" in s),
]

#: (process role, stack text, samples): py-spy's raw output, one line per distinct stack.
Stack = tuple[str, str, int]


def read_stacks(path: Path) -> list[Stack]:
    """The stacks of a raw py-spy file; role "main" for the worker process, else "children"."""
    stacks: list[Stack] = []
    for line in path.read_text(errors="replace").splitlines():
        text, _, number = line.rpartition(" ")
        if not text or not number.isdigit():
            continue
        depth = sum(1 for frame in text.split(";") if frame.startswith("process "))
        stacks.append(("main" if depth <= 1 else "children", text, int(number)))
    return stacks


def category_lines(stacks: list[Stack], totals: Counter[str]) -> list[str]:
    lines = [f"  {'category (inclusive)':<46} {'main':>6} {'children':>9}"]
    for label, test in CATEGORIES:
        shares = []
        for role in ("main", "children"):
            part = sum(count for r, text, count in stacks if r == role and test(text))
            shares.append(f"{100 * part / totals[role]:5.1f}%" if totals[role] else "    -")
        lines.append(f"  {label:<46} {shares[0]:>6} {shares[1]:>9}")
    return lines


def leaf_lines(stacks: list[Stack], top: int) -> list[str]:
    leaves: Counter[str] = Counter()
    for _, text, count in stacks:
        function, _, where = text.rsplit(";", 1)[-1].partition(" (")
        leaves[f"{function} ({where.rsplit('/', 1)[-1]}"] += count
    total = sum(count for _, _, count in stacks)
    lines = ["  hottest leaf frames (exclusive, all processes):"]
    lines += [
        f"  {100 * count / total:5.1f}%  {leaf[:100]}" for leaf, count in leaves.most_common(top)
    ]
    return lines


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """Shares of sampled time by category, per process role, and the hottest leaf frames."""
    stacks = read_stacks(path)
    totals = Counter[str]()
    for role, _, count in stacks:
        totals[role] += count
    if not totals:
        return ["(no samples)"]
    heading = (
        f"{sum(totals.values())} samples from {path}: main process {totals['main']},"
        f" pool children {totals['children']} (py-spy counts threads blocked in Python-level"
        " waits, e.g. psycopg's wait, as busy)"
    )
    return [heading, *category_lines(stacks, totals), *leaf_lines(stacks, top)]
