"""A Celery result backend that reads outcomes from the ledger.

The task id IS the request ID, so every message carrying R shares R's result slot. Keeping
the outcome only in the ledger (written once, in the same transaction as the effect) means a
duplicate or conflicting message can never replace R's first outcome: SUCCESS is whatever
the ledger recorded. Other states (a failure before any outcome, a retry) are kept beside it
and never shadow a recorded outcome.

Waiting (``AsyncResult(R).get(timeout=T)``) polls the ledger until R is ready or T seconds
have passed, by the clock: an unavailable ledger (a restart, a short outage) counts as "not
ready yet", so the wait rides it out. If the ledger is still unavailable when T is spent,
LedgerWaitTimeoutError says so; it is both Celery's TimeoutError (what get(timeout=) raises)
and a LedgerUnavailableError.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from celery import states
from celery.backends.base import BaseBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError

from mcard_tasks.config import settings_of
from mcard_tasks.errors import LedgerUnavailableError, LedgerWaitTimeoutError
from mcard_tasks.ledger import get_ledger

__all__ = ["LedgerBackend"]

logger = logging.getLogger(__name__)


class LedgerBackend(BaseBackend):  # type: ignore[misc]
    """Results from the card ledger (MCARD_DATABASE_URL)."""

    @property
    def _database_url(self) -> str:
        return settings_of(self.app).database_url

    def _ledger(self) -> Any:
        return get_ledger(self._database_url, migrate=settings_of(self.app).migrate)

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if state == states.SUCCESS:
            return result  # the ledger recorded it with the effect, in one transaction
        try:
            ledger = self._ledger()
            if ledger.outcome(task_id) is None:
                ledger.save_task_state(task_id, state, json.dumps(result, default=str), traceback)
        except LedgerUnavailableError as exc:
            # Best effort: the message itself carries the request on (retry or dead letter).
            logger.warning("could not keep state %s of %s: %s", state, task_id, exc)
        return result

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        ledger = self._ledger()
        outcome = ledger.outcome(task_id)
        if outcome is not None:
            return {
                "task_id": task_id,
                "status": states.SUCCESS,
                "result": outcome,
                "traceback": None,
                "children": [],
                "date_done": outcome["recorded_at"],
            }
        row = ledger.task_state(task_id)
        if row is None:
            return {"task_id": task_id, "status": states.PENDING, "result": None}
        meta: dict[str, Any] = {
            "task_id": task_id,
            "status": row.state,
            "traceback": row.traceback,
            "result": json.loads(row.result) if row.result else None,
            "children": [],
        }
        return dict(self.meta_from_decoded(meta))

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Callable[[], Any] | None = None,
    ) -> dict[str, Any]:
        """Poll the ledger until task_id is ready; the meta of its final state.

        Bounded by timeout seconds of elapsed time (None: no bound), the polls included. A
        poll that finds the ledger unavailable is a poll that found nothing yet. Raises
        Celery's TimeoutError when the time is spent, LedgerWaitTimeoutError (a subclass) if
        the last poll could not reach the ledger.
        """
        self._ensure_not_eager()
        deadline = None if timeout is None else time.monotonic() + timeout
        unavailable: LedgerUnavailableError | None = None
        while True:
            try:
                meta: dict[str, Any] = self.get_task_meta(task_id)
            except LedgerUnavailableError as exc:
                if unavailable is None:
                    logger.warning("waiting for %s: %s; polling on", task_id, exc)
                unavailable = exc
            else:
                if unavailable is not None:
                    logger.info("waiting for %s: the ledger is available again", task_id)
                unavailable = None
                if meta["status"] in states.READY_STATES:
                    return meta
            if on_interval is not None:
                on_interval()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                if unavailable is not None:
                    raise LedgerWaitTimeoutError(
                        f"no result for {task_id!r} within {timeout:g} s: {unavailable}"
                    ) from unavailable
                raise CeleryTimeoutError("The operation timed out.")
            time.sleep(interval if left is None else min(interval, left))

    def _forget(self, task_id: str) -> None:
        """Outcomes are the ledger's record and are never forgotten."""

    def cleanup(self) -> None:
        """Nothing expires: the ledger is the permanent record."""
