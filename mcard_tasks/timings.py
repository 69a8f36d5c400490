"""Worker-side timings as Prometheus histograms, shared by every worker process through
prometheus_client's multiprocess mode (one file per process in MCARD_METRICS_DIR, merged by
``mcard-tasks metrics``).

Off unless MCARD_METRICS_DIR is set: then :func:`observe` is one dictionary test and nothing
else, and prometheus_client is not even imported.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from celery import Celery, signals

from mcard_tasks.config import Settings

__all__ = [
    "BUCKETS",
    "HISTOGRAMS",
    "ISSUER_CALL",
    "LEDGER_APPLY",
    "TASK_DURATION",
    "enable",
    "enabled",
    "install",
    "observe",
    "process_id",
]

TASK_DURATION = "mcard_task_duration_seconds"
LEDGER_APPLY = "mcard_ledger_apply_seconds"
ISSUER_CALL = "mcard_issuer_call_seconds"
#: Each histogram's help line.
HISTOGRAMS = {
    TASK_DURATION: "Time a worker spent running a task, validation and ledger included.",
    LEDGER_APPLY: "Time in the ledger applying a request (claim, effect, outcome, event),"
    " the issuer call excluded.",
    ISSUER_CALL: "Time of an external issuer's call (issue or destroy), failed calls included.",
}
#: From 1 ms (a ledger statement) to 10 s (a slow issuer); seconds, as Prometheus counts.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: The multiprocess environment variable of prometheus_client.
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The histograms of this process by name, empty while timings are off.
_histograms: dict[str, Any] = {}
#: Each (histogram, task) child, made once: labels() takes a lock and builds a tuple.
_children: dict[tuple[str, str], Any] = {}


def enabled() -> bool:
    return bool(_histograms)


def observe(histogram: str, task: str, seconds: float) -> None:
    """Count one duration of task in histogram (a no-op while timings are off)."""
    if not _histograms:
        return
    child = _children.get((histogram, task))
    if child is None:
        child = _children[(histogram, task)] = _histograms[histogram].labels(task=task)
    child.observe(seconds)


def process_id() -> str:
    """This process in the name of its timing files: host name and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def enable(directory: str) -> None:
    """Record timings into directory (made if missing) from this process and its children.

    Each process writes files of its own (prometheus_client's multiprocess values, which
    notice a fork and start new files in the child); the variable tells them the directory.
    """
    if _histograms:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    os.environ[_MULTIPROC_ENV] = directory
    from prometheus_client import CollectorRegistry, Histogram, values

    # Files named by host and pid, not pid alone: worker containers sharing the directory all
    # run their worker as the same pid (1, or tini's first child), and would write one file.
    values.ValueClass = values.MultiProcessValue(process_identifier=process_id)
    # A registry of our own: nothing is served from the worker, the exporter reads the files.
    registry = CollectorRegistry()
    for name, documentation in HISTOGRAMS.items():
        _histograms[name] = Histogram(
            name, documentation, ["task"], buckets=BUCKETS, registry=registry
        )


def _process_dead(**_: Any) -> None:
    """prometheus_client's bookkeeping for a process that ends (its live gauges' files).

    Histogram files are kept on purpose: a dead process's counts stay in the merged sums, so
    the counters never go down while the workers run.
    """
    if _histograms:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(process_id())


def install(app: Celery, settings: Settings) -> None:
    """Turn timings on in the worker of app when MCARD_METRICS_DIR is set (before its pool
    starts, so pool children inherit the setting and write files of their own)."""
    if not settings.metrics_dir:
        return
    directory = settings.metrics_dir

    def start(**_: Any) -> None:
        enable(directory)

    signals.worker_init.connect(start, weak=False, dispatch_uid="mcard-timings")
    signals.worker_process_shutdown.connect(
        _process_dead, weak=False, dispatch_uid="mcard-timings-child"
    )
    signals.worker_shutdown.connect(_process_dead, weak=False, dispatch_uid="mcard-timings-main")
