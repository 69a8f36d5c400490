"""The worker process: a Celery worker for every task queue, on the MCARD_* settings.

Started as ``mcard-tasks worker [ARGS...]`` (or ``python -m mcard_tasks.worker``; from a
checkout ``python -m worker`` too). A thin wrapper over Celery's own worker, so
``celery -A mcard_tasks worker`` with the same options behaves the same; extra arguments are
passed through to it (and win over the defaults below). SIGTERM is Celery's warm shutdown:
running tasks finish, then exit 0.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mcard_tasks.application import app
from mcard_tasks.specs import task_names

__all__ = ["main", "worker_argv"]


def worker_argv(extra: Sequence[str] = ()) -> list[str]:
    """Celery's worker arguments for the settings of this process, then extra."""
    settings = app.settings
    return [
        "worker",
        f"--hostname={settings.worker_name}",
        f"--loglevel={settings.log_level}",
        f"--concurrency={settings.concurrency}",
        f"--pool={settings.pool}",
        f"--queues={','.join(task_names())}",
        "--task-events",
        *extra,
    ]


def main(extra: Sequence[str] | None = None) -> None:
    """Run the worker until it shuts down, then exit with its exit code; extra defaults to
    this process's arguments.

    ``celery -A mcard_tasks worker ...`` itself, not app.worker_main: that drops the exit
    code, so a worker stopped by an unrecoverable error (a drifted topology) would exit 0.
    """
    from celery.bin.celery import celery

    argv = worker_argv(sys.argv[1:] if extra is None else extra)
    celery.main(args=["-A", "mcard_tasks", *argv], prog_name="celery")


if __name__ == "__main__":
    main()
