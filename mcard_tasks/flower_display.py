"""How Flower shows a task: a rejection is REJECTED with its reason, not a plain SUCCESS.

To Celery a rejection is a success: the task returned its outcome object. Flower's
``format_task`` option is applied to a copy of each task before the tasks page and a task's
page show it; the formatter made here relabels that copy's state only. The task's return
value, the result backend, the outcome object and Flower's API (``/api/tasks``,
``/api/task/info``) keep Celery's states.
"""

from __future__ import annotations

import ast
import functools
import time
from collections.abc import Callable
from types import FunctionType
from typing import Any, NamedTuple

from celery import states

from mcard_tasks.config import Settings
from mcard_tasks.errors import MCardError
from mcard_tasks.rules import REJECTED

__all__ = [
    "Outcome",
    "display_state",
    "ledger_lookup",
    "outcome_in",
    "task_formatter",
]

#: Outcomes read from the ledger for results Celery cut short; final, so they are kept.
_KEPT_OUTCOMES = 10_000
#: Seconds without ledger lookups after one failed.
_PAUSE_AFTER_FAILURE = 30.0


class Outcome(NamedTuple):
    """The outcome word (``succeeded``, ``rejected``) and reason code of a recorded outcome."""

    outcome: str
    reason: str | None


#: Reads R's recorded outcome object (None: none recorded), for a result Celery cut short.
Lookup = Callable[[str], dict[str, Any] | None]


@functools.lru_cache(maxsize=4096)
def outcome_in(result: str) -> Outcome | None:
    """The outcome in the repr of a task's return value, as Flower holds it.

    None if no whole outcome object is in it: another task's result, or one Celery cut at
    resultrepr_maxsize (it closes the brackets of what it kept, so the cut object parses, its
    later keys missing: the keys are sorted, and ``card_ids`` of a large batch comes first).
    """
    try:
        value = ast.literal_eval(result)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("outcome"), str):
        return None
    if "reason" not in value:
        return None
    reason = value["reason"]
    return Outcome(value["outcome"], reason if isinstance(reason, str) else None)


def _outcome_of(found: dict[str, Any] | None) -> Outcome | None:
    if not found or not isinstance(found.get("outcome"), str):
        return None
    reason = found.get("reason")
    return Outcome(found["outcome"], reason if isinstance(reason, str) else None)


def display_state(state: str, outcome: Outcome | None) -> str:
    """The state Flower's pages show for a task in Celery's state with that outcome."""
    if state == states.SUCCESS and outcome is not None and outcome.outcome == REJECTED:
        return f"REJECTED: {outcome.reason}" if outcome.reason else "REJECTED"
    return state


def ledger_lookup(settings: Settings) -> Lookup:
    """Read recorded outcomes from the ledger of settings (MCARD_DATABASE_URL)."""

    def lookup(request_id: str) -> dict[str, Any] | None:
        from mcard_tasks.ledger import get_ledger

        return get_ledger(settings.database_url, migrate=settings.migrate).outcome(request_id)

    return lookup


def task_formatter(lookup: Lookup | None = None) -> FunctionType:
    """Flower's ``format_task``: relabel a copy of a task's state by its outcome.

    Parameters:
        lookup: reads a recorded outcome from the ledger, asked only when the result Flower
            holds was cut before its outcome (Celery keeps 1,024 characters of it) and at most
            once per request ID; None: such a task keeps its state.
    """
    known: dict[str, Outcome | None] = {}
    failed_at: list[float] = []  # when the ledger last failed a lookup

    def recorded(request_id: str) -> Outcome | None:
        if lookup is None or not request_id:
            return None
        if request_id not in known:
            if failed_at and time.monotonic() - failed_at[-1] < _PAUSE_AFTER_FAILURE:
                return None  # Flower's one event loop must not wait on a ledger that is down
            try:
                found = lookup(request_id)
            except MCardError:
                # Unavailable: Celery's state, and no lookup for a while (each could block
                # Flower for the database's connect timeout).
                failed_at[:] = [time.monotonic()]
                return None
            if len(known) >= _KEPT_OUTCOMES:
                known.clear()
            known[request_id] = _outcome_of(found)
        return known[request_id]

    def format_task(task: Any) -> Any:
        state, result = getattr(task, "state", None), getattr(task, "result", None)
        if state == states.SUCCESS and isinstance(result, str):
            outcome = outcome_in(result) or recorded(str(getattr(task, "uuid", "") or ""))
            task.state = display_state(state, outcome)
        return task

    return format_task  # type: ignore[return-value]
