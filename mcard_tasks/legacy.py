"""Legacy messages: the seed's shape, executed as the very task message ``delay()`` publishes.

The publishers mcard-tasks replaces send with plain Kombu: no Celery task headers, a JSON body
``{"key": K, "data": {...fields...}, "request_id": R}``, to exchange ``mcard`` with the queue's
routing key. The worker's consumer hands such a message to :func:`translate` (the key belongs
to the queue it arrived on, R is a valid request ID, the data are the kind's valid fields),
then :func:`republish` publishes the Celery task message of that request (task id R, plus
:data:`LEGACY_HEADER`), confirmed, and only then is the original acked. From there on it is
``delay()``'s path: the run, the outcome, its event, the result and Flower's line under R.

A crash between the republish and the ack redelivers the original, which is republished once
more: a second message with request ID R, which the ledger makes a replay. R is never
generated: a retry by the old publisher must stay the same request.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass

from celery import Celery

from mcard_tasks.confirms import publish_confirmed
from mcard_tasks.errors import InvalidLegacyMessageError, InvalidRequestError
from mcard_tasks.identity import PRODUCER_HEADER
from mcard_tasks.messages import task_message
from mcard_tasks.payloads import Payload, check_request_id, validate_fields
from mcard_tasks.specs import SPECS, TaskSpec, spec_for_key

__all__ = ["LEGACY_HEADER", "LegacyRequest", "describe", "republish", "translate"]

#: The header of a task message translated from a legacy message: the legacy key it carried
#: (the worker counts executions by it; ``dlq show`` prints it).
LEGACY_HEADER = "x-mcard-legacy-key"
#: The fields of a legacy body, and nothing else: an unknown one is refused, not dropped.
_FIELDS = ("key", "data", "request_id")


@dataclass(frozen=True)
class LegacyRequest:
    """What a valid legacy message asks: the kind of its key, its request ID and payload."""

    key: str
    spec: TaskSpec
    request_id: str
    payload: Payload


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, int | float) else "value")


def translate(body: object, queue: str | None) -> LegacyRequest:
    """The request a legacy body asks of the task queue it arrived on.

    Raises InvalidLegacyMessageError naming each problem: a body that is not a JSON object,
    an unknown field, a key unknown or of another queue, no or an invalid request ID, missing
    or invalid data.
    """
    if not isinstance(body, dict):
        raise InvalidLegacyMessageError([f"body: must be a JSON object (got {_json_type(body)})"])
    problems = [
        f"{str(name)[:64]}: is not a field of a legacy message (only key, data, request_id)"
        for name in sorted(set(body) - set(_FIELDS), key=str)
    ]
    spec = _spec(body.get("key"), queue, problems)
    request_id = _request_id(body.get("request_id"), problems)
    payload = _payload(spec, body.get("data"), problems)
    if problems or spec is None or request_id is None or payload is None:
        raise InvalidLegacyMessageError(_capped(problems))
    return LegacyRequest(str(body["key"]), spec, request_id, payload)


#: Problems named at most (a hostile body could list millions of unknown fields).
_MAX_PROBLEMS = 10


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= _MAX_PROBLEMS:
        return problems
    return [*problems[:_MAX_PROBLEMS], f"and {len(problems) - _MAX_PROBLEMS} more problems"]


def _spec(key: object, queue: str | None, problems: list[str]) -> TaskSpec | None:
    if key is None:
        problems.append("key: is required")
        return None
    spec = spec_for_key(key) if isinstance(key, str) else None
    if spec is None:
        known = ", ".join(k for each in SPECS.values() for k in each.keys)
        problems.append(f"key: unknown key {reprlib.repr(key)} (known: {known})")
    elif spec.name != queue:
        problems.append(f"key: {key!r} is for queue {spec.name}, not {queue} where it arrived")
        return None
    return spec


def _request_id(value: object, problems: list[str]) -> str | None:
    if value is None:
        # Never generated: the old publisher's retry of this message must be the same request.
        problems.append("request_id: is required")
        return None
    try:
        return check_request_id(value)
    except InvalidRequestError as exc:
        problems.extend(exc.problems)
        return None


def _payload(spec: TaskSpec | None, data: object, problems: list[str]) -> Payload | None:
    if data is None:
        problems.append("data: is required")
        return None
    if not isinstance(data, dict):
        problems.append(f"data: must be a JSON object of the fields (got {_json_type(data)})")
        return None
    if spec is None:
        return None  # fields are checked against the kind of a valid key only
    try:
        return validate_fields(spec.payload, data)
    except InvalidRequestError as exc:
        problems.extend(f"data.{problem}" for problem in exc.problems)
        return None


def republish(app: Celery, request: LegacyRequest, producers: str) -> None:
    """Publish the task message ``delay()`` would publish for request, with LEGACY_HEADER and
    the legacy message's producers (mcard_tasks.identity.PRODUCER_HEADER).

    Confirmed by the broker within MCARD_PUBLISH_TIMEOUT, or it raises: a blocked broker
    fails it instead of stalling the consumer.
    """
    message = task_message(
        app, task=request.spec.name, request_id=request.request_id, payload=request.payload
    )
    publish_confirmed(
        app,
        message.body,
        exchange=message.exchange,
        routing_key=message.routing_key,
        headers={**message.headers, LEGACY_HEADER: request.key, PRODUCER_HEADER: producers},
        serializer=None,
        **message.properties,
    )


def describe(body: object) -> tuple[str | None, str | None]:
    """The request ID and key a (possibly invalid) legacy body names, for ``dlq show``."""
    if not isinstance(body, dict):
        return None, None
    request_id, key = body.get("request_id"), body.get("key")
    return (
        None if request_id is None else str(request_id),
        None if key is None else str(key),
    )
