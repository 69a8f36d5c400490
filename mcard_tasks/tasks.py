"""The tasks: one per registered task kind (mcard_tasks.specs), each a thin wrapper that hands
a validated request to the ledger (mcard_tasks.request_task.RequestTask does both sides)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from mcard_tasks.application import app
from mcard_tasks.config import settings_of
from mcard_tasks.request_task import RequestTask
from mcard_tasks.specs import SPECS, TaskSpec

__all__ = ["TASKS", "mint", "single_burn", "single_mint", "task_for"]


def task_for(app: Celery, spec: TaskSpec) -> RequestTask:
    """The Celery task of a task kind on app, named and routed by its spec."""

    def run(self: RequestTask, **fields: Any) -> dict[str, Any]:
        # Celery wraps run with the retry of transient errors (autoretry_for): the request
        # is validated and recorded in here, not in RequestTask.__call__.
        return self.record(self.accept(fields))

    run.__doc__ = spec.doc
    task: RequestTask = app.task(
        name=spec.name,
        base=RequestTask,
        bind=True,
        spec=spec,
        # This app's own task (not Celery's shared one), with this app's retry budget.
        shared=False,
        max_retries=settings_of(app).max_retries,
    )(run)
    return task


#: Every task of this app, by name.
TASKS: dict[str, RequestTask] = {name: task_for(app, spec) for name, spec in SPECS.items()}
#: The built-in kinds, by the names applications import.
mint, single_mint, single_burn = (
    TASKS["mcard.mint"],
    TASKS["mcard.single_mint"],
    TASKS["mcard.single_burn"],
)

# Bind the tasks now, in the importing thread, while the import lock keeps every other thread
# out of this module. Left to Celery, each decorated task is a lazy proxy that builds and binds
# its task on first use with no lock: a burst of first calls from many threads had all but one
# of them use a task whose binding was still under way (its request stack not yet made).
app.finalize()
