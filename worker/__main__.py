"""``python -m worker``: a Celery worker for the three task queues, on the MCARD_* settings.

A thin wrapper over Celery's own worker (so ``celery -A mcard_tasks worker`` behaves the
same); extra arguments are passed through to it. SIGTERM is a warm shutdown, exit 0.
"""

from __future__ import annotations

import sys

from mcard_tasks.application import app
from mcard_tasks.specs import task_names


def worker_argv(extra: list[str]) -> list[str]:
    """Celery's worker arguments for the settings of this process."""
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


def main() -> None:
    """Run ``celery -A mcard_tasks worker ...``; exit with the worker's exit code.

    Not app.worker_main: it drops the code, so a worker stopped by an unrecoverable error
    (a drifted topology, say) would exit 0.
    """
    from celery.bin.celery import celery

    celery.main(args=["-A", "mcard_tasks", *worker_argv(sys.argv[1:])], prog_name="celery")


if __name__ == "__main__":
    main()
