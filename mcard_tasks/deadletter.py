"""Dead-lettering with a reason: nothing unprocessable is dropped, nothing is applied.

Every way a message can be unprocessable (undecodable body, a content type other than JSON,
no Celery headers, an unknown task, invalid fields, a conflict, a transient failure that
outlasted its retries) ends in its queue's ``.dlq``. The message is republished unchanged to
the dead-letter exchange with an ``x-mcard-reason`` header (and the original producer's
user_id in ``x-mcard-producer``), confirmed, and only then acked;
if that publish fails, the message is rejected and RabbitMQ dead-letters it itself (the queue
has a dead-letter exchange), without the header but never lost. A crash between the confirmed
republish and the ack can leave a second copy in the DLQ: replays are idempotent by request ID.

Celery's consumer acks undecodable messages away by default; mcard-tasks' consumer
(``mcard_tasks.consumer``) turns that and its other give-up paths into dead letters. The
request class below does the same for task rejections, so the reason travels with the message.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import Reject
from celery.worker.request import Request

from mcard_tasks.confirms import publish_confirmed
from mcard_tasks.identity import (
    PRODUCER_HEADER,
    UNAUTHORIZED_PRODUCER,
    broker_dead_lettered,
    broker_user,
    request_producers,
    task_queue_death,
)
from mcard_tasks.specs import task_names
from mcard_tasks.topology import DEAD_LETTER_EXCHANGE

__all__ = ["REASON_HEADER", "UNAUTHORIZED_PRODUCER", "DeadLetterRequest", "dead_letter"]

logger = logging.getLogger(__name__)
REASON_HEADER = "x-mcard-reason"
_REASON_MAX = 2000


def source_queue(message: Any) -> str | None:
    """The task queue a message came from, read from its routing key.

    A message that went through Celery's delayed delivery carries a longer routing key that
    ends with the queue's name.
    """
    key = str((message.delivery_info or {}).get("routing_key") or "")
    return next((name for name in task_names() if key == name or key.endswith("." + name)), None)


def dead_letter(app: Any, message: Any, reason: str) -> None:
    """Move message to its queue's DLQ with reason; fall back to a plain reject."""
    queue = source_queue(message)
    logger.error(
        "dead-lettering message %s from %s: %s",
        (message.headers or {}).get("id"),
        queue,
        reason[:_REASON_MAX],
    )
    if queue is not None:
        try:
            _republish(app, message, queue, reason)
        except Exception:  # any failure: let the broker dead-letter it instead
            logger.exception("could not republish to %s; rejecting instead", DEAD_LETTER_EXCHANGE)
        else:
            message.ack()
            return
    message.reject(requeue=False)


def _republish(app: Any, message: Any, queue: str, reason: str) -> None:
    headers = dict(message.headers or {})
    headers[REASON_HEADER] = reason[:_REASON_MAX]
    # The letter is published as the worker's user: who published the request travels here
    # (written over whatever the message carried), for dlq replay to check; an x-death of a
    # task queue on a message the worker took is a publisher's forgery (a replay drops the
    # broker's), and would make dlq replay read the letter as the broker's.
    headers[PRODUCER_HEADER] = request_producers(message, broker_user(app))
    tasks = frozenset(task_names())
    if broker_dead_lettered(headers, tasks):
        kept = [death for death in headers.pop("x-death") if not task_queue_death(death, tasks)]
        if kept:
            headers["x-death"] = kept
    properties = message.properties or {}
    # Bounded: a blocked broker makes this fail (then the message is rejected and RabbitMQ
    # dead-letters it) instead of stalling the worker.
    publish_confirmed(
        app,
        message.body,
        exchange=DEAD_LETTER_EXCHANGE.name,
        routing_key=queue,
        headers=headers,
        content_type=message.content_type or "application/octet-stream",
        content_encoding=message.content_encoding or "binary",
        delivery_mode=2,
        correlation_id=properties.get("correlation_id"),
        message_id=properties.get("message_id"),
    )


class DeadLetterRequest(Request):  # type: ignore[misc]
    """A task request whose final rejection carries its reason into the DLQ."""

    _mcard_reason = "rejected"
    acknowledged: bool

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        text = exc.reason if isinstance(exc, Reject) else exc
        self._mcard_reason = f"{type(exc).__name__}: {text}"
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def reject(self, requeue: bool = False) -> None:
        if requeue or self.acknowledged:
            super().reject(requeue=requeue)
            return
        dead_letter(self.task.app, self._message, self._mcard_reason)
        self.acknowledged = True
        self.send_event("task-rejected", requeue=False)
