"""What ``dlq replay`` may republish, and what a replayed message carries.

A dead letter is replayed only if it is what a producer could have published to its queue:
a Celery task message (JSON, protocol 2) of the registered task kind of that queue, with a
valid request ID, no positional arguments and valid fields (the validation ``delay()`` runs,
mcard_tasks.specs), or a valid legacy message of that queue (mcard_tasks.legacy, as the
worker's consumer translates it). A letter dead-lettered for its producer (reason starting with
:data:`~mcard_tasks.deadletter.UNAUTHORIZED_PRODUCER`) is never replayed, whoever replays it.
With MCARD_PRODUCERS set where the replay runs, neither is a letter whose original producer
(:func:`~mcard_tasks.identity.letter_producers`) may not publish its task, or that names none:
the replayed message carries the operator's user_id, which the worker would otherwise trust.

A replayed message starts afresh: Celery's ``retries`` is 0, no ``eta``/``countdown``, none of
the broker's or the dead-lettering's ``x-`` headers (``x-death``, ``x-delivery-count``,
``x-mcard-reason``, ...). It keeps its task id (the request ID: the ledger's exactly-once
relies on it), its body (args and kwargs), the Celery headers and the legacy key header. Its
AMQP ``user_id`` is not copied: RabbitMQ refuses a publish whose user_id is not the publishing
connection's user, and the replaying operator is not the original producer. The original
producer goes in ``x-mcard-producer`` instead: a worker with MCARD_PRODUCERS runs the replay
only if both the operator and the original producer may publish its task.
"""

from __future__ import annotations

import json
from typing import Any

from mcard_tasks.deadletter import REASON_HEADER, UNAUTHORIZED_PRODUCER
from mcard_tasks.errors import InvalidRequestError
from mcard_tasks.identity import PRODUCER_HEADER, ProducerPolicy, letter_producers
from mcard_tasks.legacy import LEGACY_HEADER, translate
from mcard_tasks.payloads import check_request_id
from mcard_tasks.specs import spec_for, task_names, validate_payload

__all__ = ["JSON", "KEPT_PROPERTIES", "replay_problem", "replayed_headers", "replayed_properties"]

#: The one content type mcard-tasks accepts (application.py: accept_content).
JSON = "application/json"
#: The AMQP properties a replay copies (user_id and expiration among those it does not).
KEPT_PROPERTIES = ("correlation_id", "reply_to", "priority", "message_id", "timestamp", "type")


def replay_problem(message: Any, queue: str, policy: ProducerPolicy | None = None) -> str | None:
    """Why message, a dead letter of task queue `queue`, must not be replayed; None if it may.
    policy: MCARD_PRODUCERS where the replay runs (None: unset)."""
    headers = message.headers or {}
    reason = str(headers.get(REASON_HEADER) or "")
    if reason.startswith(UNAUTHORIZED_PRODUCER):
        return f"dead-lettered as {UNAUTHORIZED_PRODUCER!r}: never replayed"
    if policy is not None:
        producers: list[str | None] = [*letter_producers(message, frozenset(task_names()))]
        for producer in producers or [None]:
            refusal = policy.refusal(queue, producer)
            if refusal is not None:
                return f"{refusal}: never replayed"
    if message.content_type != JSON:
        return f"content type {message.content_type!r}: only {JSON} messages are replayed"
    try:
        raw = message.body
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
        body = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"body: not JSON ({type(exc).__name__})"
    try:
        if "task" in headers:
            _check_task_message(headers, body, queue)
        else:  # no Celery headers: only a valid legacy message of this queue
            translate(body, queue)
    except InvalidRequestError as exc:
        return str(exc)
    return None


def _check_task_message(headers: dict[str, Any], body: object, queue: str) -> None:
    """What ``delay()`` checks, on a published message: raises InvalidRequestError."""
    task = headers.get("task")
    if not isinstance(task, str):
        raise InvalidRequestError([f"task: must be a task name (got {type(task).__name__})"])
    spec_for(task)  # a registered kind, or InvalidRequestError naming the known ones
    if task != queue:
        raise InvalidRequestError([f"task: {task} belongs to queue {task}, not {queue}"])
    check_request_id(headers.get("id"), "id")
    if not (isinstance(body, list) and len(body) == 3):
        raise InvalidRequestError(["body: must be a task message [args, kwargs, embed]"])
    args, kwargs, embed = body
    if args != []:
        raise InvalidRequestError(["args: positional arguments are not accepted"])
    if not isinstance(kwargs, dict):
        raise InvalidRequestError(["kwargs: must be a JSON object of the fields"])
    if not isinstance(embed, dict):
        raise InvalidRequestError(["body: the third item (callbacks, chain) must be an object"])
    validate_payload(task, kwargs)


def replayed_headers(message: Any) -> dict[str, Any]:
    """The headers of a replayed letter: spent retry state and every ``x-`` header (the
    broker's x-death and x-delivery-count, the dead-lettering's x-mcard-reason, ...) dropped,
    the legacy key kept (a replayed legacy request still counts as one), a task message's
    retries at 0, no eta and no expiry; and the request's original producer in
    ``x-mcard-producer`` ("" for none), which the worker checks like the replay's user_id."""
    headers = message.headers or {}
    fresh = {
        k: v
        for k, v in headers.items()
        if (not k.startswith("x-") or k == LEGACY_HEADER) and k != "countdown"
    }
    fresh[PRODUCER_HEADER] = ",".join(letter_producers(message, frozenset(task_names())))
    if "task" in fresh:
        fresh["retries"] = 0
        fresh["eta"] = None
        # An expired request is revoked (acked, never run) by the worker: a replay is a new
        # attempt, so it does not expire.
        fresh["expires"] = None
    return fresh


def replayed_properties(properties: dict[str, Any]) -> dict[str, Any]:
    """The AMQP properties a replay copies (KEPT_PROPERTIES, never user_id)."""
    return {k: properties[k] for k in KEPT_PROPERTIES if properties.get(k) is not None}
