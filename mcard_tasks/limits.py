"""Bad input, bounded: how large a task message may be and how far ahead its ETA.

Both limits are checked twice. A producer refuses a request over either before publishing
(:func:`check_body`, :func:`check_delay`, raising errors of the InvalidRequestError family).
The worker checks every message it receives before anything decodes its body
(:func:`guarded` wraps Celery's task handler): one over a limit is dead-lettered with a reason
naming the limit, and the worker goes on with the next message.

Why at the worker, from the raw message: kombu decodes a body lazily (``message.decode()``,
cached), and Celery's task handler reads only the headers before it hands the raw
``message.body`` to the request; so the size is known before any JSON is parsed. An ETA
message is held in the worker's memory (Celery's timer, the prefetch count raised by one for
each) until it is due; with quorum queues Celery's native delayed delivery keeps a countdown
in the broker's ``celery_delayed_*`` queues instead, but a message published straight to a
task queue with a far ``eta`` header (or any ETA with classic queues) would still sit in the
worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import signals
from kombu.serialization import dumps

from mcard_tasks.config import Settings, settings_of
from mcard_tasks.deadletter import dead_letter
from mcard_tasks.errors import EtaTooFarError, MessageTooLargeError

__all__ = [
    "CLOCK_SKEW",
    "body_size",
    "check_body",
    "check_delay",
    "delay_of",
    "guarded",
    "message_problem",
    "request_body_size",
]

logger = logging.getLogger(__name__)

#: Seconds a worker allows beyond MCARD_MAX_ETA_SECONDS: a producer's clock may run ahead.
CLOCK_SKEW = 60.0
#: The third part of a protocol 2 body, as Celery builds it for a request without callbacks.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def body_size(body: Any) -> int:
    """The size in bytes of a message body as it travels (str bodies as UTF-8)."""
    if isinstance(body, bytes | bytearray | memoryview):
        return len(body)
    return len(str(body).encode())


def _too_large(size: int, limit: int) -> str:
    return f"body: the task message is {size} bytes, over MCARD_MAX_BODY_BYTES={limit}"


def check_body(size: int, limit: int) -> None:
    """Raises MessageTooLargeError if a body of size bytes is over limit."""
    if size > limit:
        raise MessageTooLargeError([_too_large(size, limit)])


def request_body_size(app: Any, kwargs: dict[str, Any]) -> int:
    """The size of the body Celery publishes for a request of kwargs (no args, no callbacks),
    serialized with the app's task serializer."""
    _, _, data = dumps(((), kwargs, _EMBED), serializer=app.conf.task_serializer)
    return body_size(data)


def _too_far(field: str, seconds: float, limit: float) -> str:
    return (
        f"{field}: {seconds:.0f} s ahead is beyond MCARD_MAX_ETA_SECONDS={limit:g} s"
        " (a delayed request waits in the broker or in a worker's memory until due;"
        " schedule far-future requests in the application)"
    )


def delay_of(options: dict[str, Any], now: datetime | None = None) -> tuple[str, float] | None:
    """The option (``countdown`` or ``eta``) and the delay in seconds an apply_async call asks
    for, the longer of the two if both are given; None without either."""
    found: list[tuple[float, str]] = []
    countdown = options.get("countdown")
    if countdown is not None:
        found.append((float(countdown), "countdown"))
    eta = options.get("eta")
    if eta is not None:
        found.append((_seconds_until(_parse_eta(eta), now), "eta"))
    if not found:
        return None
    seconds, field = max(found)
    return field, seconds


def check_delay(options: dict[str, Any], limit: float) -> None:
    """Raises EtaTooFarError if apply_async options ask for a delay beyond limit seconds."""
    delay = delay_of(options)
    if delay is not None and delay[1] > limit:
        raise EtaTooFarError([_too_far(delay[0], delay[1], limit)])


def _parse_eta(eta: Any) -> datetime:
    """An ETA as a datetime: a datetime, or an ISO 8601 string; naive means UTC (the app's
    timezone). Raises ValueError otherwise."""
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    if not isinstance(eta, datetime):
        raise ValueError(f"not an ISO 8601 time: {eta!r:.60}")
    return eta if eta.tzinfo is not None else eta.replace(tzinfo=UTC)


def _seconds_until(eta: datetime, now: datetime | None = None) -> float:
    return (eta - (now or datetime.now(UTC))).total_seconds()


def _eta_header(message: Any) -> Any:
    """The ETA a message carries: the ``eta`` header of a task message (protocol 2), or the
    ``eta`` of a protocol 1 body (then decoding it is Celery's next step anyway)."""
    headers = message.headers or {}
    if "task" in headers:
        return headers.get("eta")
    try:
        body = message.decode()  # cached: Celery's own decode reuses it
    except Exception:  # whatever the decoder raises: Celery dead-letters it as undecodable
        return None
    return body.get("eta") if isinstance(body, dict) and "task" in body else None


def message_problem(message: Any, settings: Settings, now: datetime | None = None) -> str | None:
    """Why the worker must not take message (its body over MCARD_MAX_BODY_BYTES, its ETA
    beyond MCARD_MAX_ETA_SECONDS), or None. The size is read before anything decodes the body.
    """
    size = body_size(message.body)
    if size > settings.max_body_bytes:
        return _too_large(size, settings.max_body_bytes)
    eta = _eta_header(message)
    if eta is None:
        return None
    try:
        seconds = _seconds_until(_parse_eta(eta), now)
    except (TypeError, ValueError) as exc:
        return f"eta: {exc}"
    if seconds > settings.max_eta_seconds + CLOCK_SKEW:
        return _too_far("eta", seconds, settings.max_eta_seconds)
    return None


def guarded(consumer: Any, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Celery's task handler (``on_task_received``), behind the limits: a message over one is
    dead-lettered with the reason and never reaches Celery's handler."""
    app = consumer.app
    settings = settings_of(app)

    def on_task_received(message: Any) -> Any:
        problem = message_problem(message, settings)
        if problem is None:
            return handler(message)
        dead_letter(app, message, problem)
        signals.task_rejected.send(sender=consumer, message=message, exc=None)
        return None

    return on_task_received
