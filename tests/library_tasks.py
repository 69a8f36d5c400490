"""A task an imported library registers (Celery's ``shared_task``): loaded into test workers
by MCARD_SPECS=tests.library_tasks (an import, not ``-I``), the worker must not run it; with
``-I tests.library_tasks`` an operator names it, and it runs."""

from pathlib import Path

from celery import shared_task


@shared_task(name="mcard.test.library_task")
def library_task(marker: str) -> str:
    Path(marker).write_text("ran")
    return "ran"
