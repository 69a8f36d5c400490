"""A Celery result backend that reads outcomes from the ledger.

The task id IS the request ID, so every message carrying R shares R's result slot. Keeping
the outcome only in the ledger (written once, in the same transaction as the effect) means a
duplicate or conflicting message can never replace R's first outcome: SUCCESS is whatever
the ledger recorded. Other states (a failure before any outcome, a retry) are kept beside it
and never shadow a recorded outcome.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import states
from celery.backends.base import BaseBackend

from mcard_tasks.config import settings_of
from mcard_tasks.errors import LedgerUnavailableError
from mcard_tasks.ledger import get_ledger

__all__ = ["LedgerBackend"]

logger = logging.getLogger(__name__)


class LedgerBackend(BaseBackend):  # type: ignore[misc]
    """Results from the card ledger (MCARD_DATABASE_URL)."""

    @property
    def _database_url(self) -> str:
        return settings_of(self.app).database_url

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
            ledger = get_ledger(self._database_url)
            if ledger.outcome(task_id) is None:
                ledger.save_task_state(task_id, state, json.dumps(result, default=str), traceback)
        except LedgerUnavailableError as exc:
            # Best effort: the message itself carries the request on (retry or dead letter).
            logger.warning("could not keep state %s of %s: %s", state, task_id, exc)
        return result

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        ledger = get_ledger(self._database_url)
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

    def _forget(self, task_id: str) -> None:
        """Outcomes are the ledger's record and are never forgotten."""

    def cleanup(self) -> None:
        """Nothing expires: the ledger is the permanent record."""
