"""``worker``: the worker process, the same as ``python -m mcard_tasks.worker``."""

from __future__ import annotations

import click

__all__ = ["COMMANDS"]


@click.command(
    "worker",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run a worker for every task queue; SIGTERM is a warm shutdown (exit 0).

    CELERY_ARGS are Celery's worker options (`celery -A mcard_tasks worker --help`), passed
    through and winning over the MCARD_* settings, e.g. `mcard-tasks worker --loglevel=DEBUG`.
    """
    from mcard_tasks.worker import main

    main(celery_args)


COMMANDS = [worker]
