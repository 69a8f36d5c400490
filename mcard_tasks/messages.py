"""What message a request is: the one definition ``delay()`` and the bulk import both publish.

A request of task T with request ID R is a Celery task protocol 2 message with task id R, no
positional arguments and its validated fields as keyword arguments (unset defaults left out),
serialized with the app's task serializer (JSON), persistent, to the exchange and with the
routing key the topology's ``task_routes`` give T (exchange ``mcard``, key T).

``delay()`` (``RequestTask.apply_async``) hands :func:`published_kwargs` and
:data:`PERSISTENT` to Celery's ``apply_async``, which builds and publishes the message (its
signals, Flower's task-sent event). The bulk import builds the same message here with
:class:`TaskMessages` and publishes it itself, pipelined; tests/unit/test_bulk.py proves the two
equal, header by header and byte by byte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from celery.utils.saferepr import saferepr
from kombu.serialization import dumps

from mcard_tasks.config import settings_of
from mcard_tasks.identity import broker_user
from mcard_tasks.limits import body_size, check_body

if TYPE_CHECKING:
    from celery import Celery

    from mcard_tasks.payloads import Payload

__all__ = [
    "PERSISTENT",
    "FastReprs",
    "TaskMessage",
    "TaskMessages",
    "published_kwargs",
    "route",
    "task_message",
]

#: AMQP delivery mode 2: the broker writes the message to disk, so a queued request survives a
#: broker restart (the queues are durable too).
PERSISTENT = 2


def published_kwargs(payload: Payload) -> dict[str, Any]:
    """A request's keyword arguments as published: unset defaults are left out, so the message
    carries what the caller gave and the worker fills in its own defaults."""
    return payload.model_dump(exclude_unset=True)


def route(app: Celery, task: str) -> tuple[str, str]:
    """The exchange and routing key ``delay()`` publishes task's requests with.

    Celery's router over the topology's ``task_routes``, resolved as Celery's
    ``send_task_message`` resolves it for a topic exchange (the queue's exchange, the route's
    routing key): the routes stay declared in one place, topology.py.
    """
    options = app.amqp.router.route({}, task)
    queue = options["queue"]
    return queue.exchange.name, options.get("routing_key") or queue.routing_key


class FastReprs:
    """``argsrepr``/``kwargsrepr`` exactly as ``as_task_v2`` computes them, but faster.

    Celery's saferepr costs more than the rest of the message; for keyword arguments that
    are all short printable strings without quote or backslash it equals plain ``repr``
    (no truncation, no escaping), which the unit tests check against saferepr itself.
    """

    def __init__(self, app: Celery) -> None:
        self.maxsize: int = app.amqp.kwargsrepr_maxsize
        self.maxlevels: int = app.conf.task_repr_maxlevels
        self.args: str = saferepr((), app.amqp.argsrepr_maxsize, maxlevels=self.maxlevels)

    def kwargs(self, kwargs: dict[str, Any]) -> str:
        """The kwargsrepr of kwargs."""
        if all(type(value) is str and "'" not in value for value in kwargs.values()):
            text = repr(kwargs)
            if len(text) < self.maxsize // 2 and text.isprintable() and "\\" not in text:
                return text
        return str(saferepr(kwargs, self.maxsize, maxlevels=self.maxlevels))


def result_repr(value: Any, maxsize: int) -> str:
    """``saferepr(value, maxsize)``, as Celery's tracer shows a task's result in its
    task-succeeded event, but faster for a short ASCII value of plain JSON types (strings
    without quote or backslash), where it equals plain ``repr`` (the unit tests check)."""
    if _plain(value, 2):
        text = repr(value)
        if len(text) < maxsize // 2 and text.isascii() and text.isprintable() and "\\" not in text:
            return text
    return str(saferepr(value, maxsize))


def _plain(value: Any, levels: int) -> bool:
    if value is None or type(value) in (bool, int):
        return True
    if type(value) is str:
        return "'" not in value
    if levels <= 0:
        return False
    if type(value) is list:
        return all(_plain(item, levels - 1) for item in value)
    if type(value) is dict:
        return all(
            type(key) is str and "'" not in key and _plain(item, levels - 1)
            for key, item in value.items()
        )
    return False


class TaskMessage(NamedTuple):
    """A task message ready for ``basic_publish``."""

    headers: dict[str, Any]
    #: The AMQP properties: content type and encoding, correlation_id, reply_to, delivery mode.
    properties: dict[str, Any]
    body: bytes | str
    exchange: str
    routing_key: str


class TaskMessages:
    """Builds the message ``delay()`` publishes for a request; the app's constants (reprs
    limits, serializer, routes) are looked up once, not per message."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.reprs = FastReprs(app)
        self.serializer: str = app.conf.task_serializer
        self.routes: dict[str, tuple[str, str]] = {}
        self.user_id = broker_user(app)
        self.max_body: int = settings_of(app).max_body_bytes

    def route(self, task: str) -> tuple[str, str]:
        """The exchange and routing key of task (see :func:`route`), cached."""
        found = self.routes.get(task)
        if found is None:
            found = self.routes[task] = route(self.app, task)
        return found

    def build(self, *, task: str, request_id: str, payload: Payload) -> TaskMessage:
        """The message of the request: Celery's ``send_task_message`` and kombu's
        ``Producer.publish`` build it this way (``as_task_v2``, then the task serializer;
        priority 0 is kombu's default); correlation_id = task id = request ID."""
        return self.build_published(
            task=task, request_id=request_id, kwargs=published_kwargs(payload)
        )

    def build_published(self, *, task: str, request_id: str, kwargs: dict[str, Any]) -> TaskMessage:
        """The message of a request whose published keyword arguments are kwargs (validated
        before: the request outbox stores them so, and its relay publishes them)."""
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            request_id,
            task,
            args=(),
            kwargs=kwargs,
            reply_to=self.app.thread_oid,
            argsrepr=self.reprs.args,
            kwargsrepr=self.reprs.kwargs(kwargs),
        )
        content_type, content_encoding, data = dumps(body, serializer=self.serializer)
        check_body(body_size(data), self.max_body)  # MessageTooLargeError: nothing published
        properties = dict(
            properties,
            content_type=content_type,
            content_encoding=content_encoding,
            delivery_mode=PERSISTENT,
            priority=0,
            user_id=self.user_id,
        )
        return TaskMessage(headers, properties, data, *self.route(task))


def task_message(app: Celery, *, task: str, request_id: str, payload: Payload) -> TaskMessage:
    """The message ``delay()`` publishes for one request (many: use :class:`TaskMessages`)."""
    return TaskMessages(app).build(task=task, request_id=request_id, payload=payload)
