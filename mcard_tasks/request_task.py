"""The task class of mcard-tasks: the producer's checks before publishing, and the worker's
execution of a request against the ledger.

On the producer, ``delay(..., request_id=R)`` and ``apply_async(kwargs=..., task_id=R)``
publish the same message: the Celery task id IS the request ID. Every field is validated and
a conflicting reuse of R is refused before anything is published.
"""

from __future__ import annotations

import json
import time
import uuid
import weakref
from functools import partial
from typing import Any

from amqp.exceptions import AMQPError, MessageNacked
from celery import Task
from celery.exceptions import Reject
from celery.result import AsyncResult
from celery.utils.log import get_task_logger
from kombu.exceptions import LimitExceeded
from kombu.exceptions import OperationalError as KombuOperationalError

from mcard_tasks import tracing
from mcard_tasks.config import settings_of
from mcard_tasks.errors import (
    BrokerUnavailableError,
    ConflictError,
    InvalidRequestError,
    LedgerUnavailableError,
    TransientError,
)
from mcard_tasks.identity import PRODUCER_HEADER, broker_user, retry_producers
from mcard_tasks.issuers import configured_issuer
from mcard_tasks.ledger import get_ledger
from mcard_tasks.legacy import LEGACY_HEADER
from mcard_tasks.limits import check_body, check_delay, request_body_size
from mcard_tasks.messages import PERSISTENT, published_kwargs
from mcard_tasks.payloads import Payload, check_request_id, validate_fields
from mcard_tasks.request_outbox import Database, outbox_message, write_request
from mcard_tasks.sent_events import sent_events
from mcard_tasks.specs import TaskSpec
from mcard_tasks.timings import TASK_DURATION, observe
from mcard_tasks.topology import build_topology

__all__ = ["RequestTask", "resolve_request_id"]

logger = get_task_logger(__name__)
#: The run span's outcome of a request the worker dead-letters (tracing.OUTCOME).
DEAD_LETTERED = "dead-lettered"
#: What a publish raises when the broker is stopped, unreachable, blocked or says no.
PUBLISH_ERRORS = (OSError, KombuOperationalError, AMQPError, MessageNacked, TimeoutError)


def resolve_request_id(request_id: object, task_id: object) -> str:
    """The request ID of a call: given as request_id, task_id, or both (equal), or new."""
    if request_id is not None and task_id is not None and request_id != task_id:
        raise InvalidRequestError(
            [f"request_id: {request_id!r} differs from task_id {task_id!r}; they must be equal"]
        )
    chosen = request_id if request_id is not None else task_id
    if chosen is None:
        return str(uuid.uuid4())
    return check_request_id(chosen, "request_id" if request_id is not None else "task_id")


#: Apps whose topology this process checked (MCARD_DECLARE=false): once, before the first
#: publish, so that a missing queue fails loudly instead of its messages going unrouted.
_CHECKED: weakref.WeakSet[Any] = weakref.WeakSet()


def _check_topology_once(app: Any, connection: Any) -> None:
    if app not in _CHECKED:
        build_topology(settings_of(app)).check(connection.default_channel)
        _CHECKED.add(app)


class RequestTask(Task):  # type: ignore[misc]
    """A mint or burn request: validated at the producer, applied once at the worker."""

    # Transient failures (ledger unreachable) are retried with exponential backoff and
    # jitter, bounded; what still fails is rejected into the dead-letter queue.
    autoretry_for = (TransientError,)
    retry_backoff = 1
    retry_backoff_max = 30
    retry_jitter = True
    # Final rejections republish the message into its DLQ with the reason.
    Request = "mcard_tasks.deadletter:DeadLetterRequest"
    # Celery's own signature check would raise TypeError before our clearer messages.
    typing = False
    #: The task kind (set per task by mcard_tasks.tasks.task_for).
    spec: TaskSpec

    def validate(self, fields: dict[str, Any]) -> Payload:
        """The request's payload; InvalidRequestError names each field and rule."""
        return validate_fields(self.spec.payload, fields)

    def apply_async(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        request_id, payload, given = self._resolve(args, kwargs, task_id)
        settings = settings_of(self.app)
        published = published_kwargs(payload)
        # Bad input, bounded: refused here rather than dead-lettered by the worker.
        check_delay(options, settings.max_eta_seconds)
        check_body(request_body_size(self.app, published), settings.max_body_bytes)
        # A generated ID cannot conflict; a retry of the running task is the same request.
        check = given is not None and request_id != self.request.id
        if check and settings.check_conflicts:
            self._refuse_conflict(request_id, payload)
        limit = settings.publish_timeout
        # Bounded: a stopped, blocked (resource alarm) or unreachable broker raises within
        # about `limit` seconds (plus the retry intervals) instead of hanging the caller; the
        # time is shared by the first attempt and its retries.
        attempts = 1 + int(self.app.conf.task_publish_retry_policy.get("max_retries", 0))
        options.setdefault("timeout", limit / attempts)
        options.setdefault("confirm_timeout", limit / attempts)
        # Flower's task-sent event (task_send_sent_event) goes out unconfirmed, on the task's
        # connection: one confirmed round trip per call, the task's (see sent_events.py).
        options.setdefault("event_dispatcher", sent_events(self.app))
        # What the message is (messages.py, shared with the bulk import); Celery builds it.
        options.setdefault("delivery_mode", PERSISTENT)
        # Producer identity: RabbitMQ refuses a user_id other than the connection's user, so
        # the worker (MCARD_PRODUCERS) and event subscribers can trust it.
        options.setdefault("user_id", broker_user(self.app))
        if not self.request.called_directly and self.request.id == request_id:
            # A retry, published as the worker's user: the request's original producers go
            # with it, and the worker checks them again (MCARD_PRODUCERS).
            producers = retry_producers(self.request, broker_user(self.app))
            options["headers"] = {**(options.get("headers") or {}), PRODUCER_HEADER: producers}
        publish = partial(super().apply_async, args=(), kwargs=published, task_id=request_id)
        if options.get("producer") is not None:  # the caller manages its own producer
            return publish(**options)
        started = time.monotonic()
        try:
            with self.app.producer_pool.acquire(block=True, timeout=limit) as producer:
                if not settings.declare:
                    _check_topology_once(self.app, producer.connection)
                try:
                    return publish(producer=producer, **options)
                except PUBLISH_ERRORS:
                    # Drop the connection without the closing handshake: a blocked broker
                    # (resource alarm) never answers it, and the caller would hang there.
                    producer.connection.collect()
                    raise
        except (*PUBLISH_ERRORS, LimitExceeded) as exc:
            raise BrokerUnavailableError(
                f"the broker did not confirm request {request_id!r}"
                f" (gave up after {time.monotonic() - started:.1f} s: {exc!r});"
                " it may not be enqueued: publishing again with the same request ID is safe"
            ) from exc

    def _resolve(
        self, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None, task_id: str | None
    ) -> tuple[str, Payload, object]:
        """The request ID, the validated payload, and the ID as the caller gave it (or None)."""
        fields = dict(kwargs or {})
        given = fields.get("request_id", task_id)
        request_id = resolve_request_id(fields.pop("request_id", None), task_id)
        if args:
            raise InvalidRequestError(["args: pass the request's fields as keyword arguments"])
        return request_id, self.validate(fields), given

    def apply_in(
        self,
        db: Database,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
    ) -> AsyncResult:
        """Write the request into the caller's open transaction on db (its SQLAlchemy
        Connection or Session); the relay publishes it once that transaction commits.

        Validated and identified exactly as by apply_async, every error raised before the row
        is written. Nothing touches the broker or the ledger: the caller's commit is as fast
        and as available as its own database. A conflicting reuse of the request ID is found
        by the worker (dead-lettered), as for a publish whose conflict check was skipped.
        """
        request_id, payload, _ = self._resolve(args, kwargs, task_id)
        write_request(
            db, request_id, self.name, outbox_message(self.app, self.name, request_id, payload)
        )
        return self.AsyncResult(request_id)

    def delay_in(self, db: Database, *args: Any, **kwargs: Any) -> AsyncResult:
        """``delay()`` inside the caller's transaction on db (see :meth:`apply_in`)."""
        return self.apply_in(db, args, kwargs)

    def _refuse_conflict(self, request_id: str, payload: Payload) -> None:
        """Raise ConflictError if request_id is recorded with another payload.

        An unreachable ledger does not stop the publish: the worker checks again.
        """
        try:
            settings = settings_of(self.app)
            ledger = get_ledger(settings.database_url, migrate=settings.migrate)
            ledger.check(self.name, request_id, payload)
        except LedgerUnavailableError as exc:
            logger.warning("publishing %s unchecked: %s", request_id, exc)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Worker side: the last guard, for messages that did not come through apply_async.

        The fields are validated in run (``accept``), which Celery wraps with the automatic
        retry of transient errors.
        """
        tracing.annotate(self.request.id, self.name)  # the run span names its request
        started = time.perf_counter()
        try:
            try:
                if args:
                    raise InvalidRequestError(["args: positional arguments are not accepted"])
                check_request_id(self.request.id)
            except InvalidRequestError as exc:
                raise Reject(str(exc), requeue=False) from exc  # dead-lettered, with the reason
            return self.run(**kwargs)
        finally:
            observe(TASK_DURATION, self.name, time.perf_counter() - started)

    def accept(self, fields: dict[str, Any]) -> Payload:
        """Worker side: the request's payload, or a rejection into the DLQ with the reason."""
        try:
            return self.validate(fields)
        except InvalidRequestError as exc:
            tracing.annotate(self.request.id, self.name, DEAD_LETTERED)
            raise Reject(str(exc), requeue=False) from exc

    def _count_legacy(self, ledger: Any, key: str) -> None:
        """Count the legacy execution, best effort: the request is applied already, and a
        metric must never fail (or retry) it."""
        try:
            ledger.count_legacy(self.name, key)
        except Exception as exc:  # any database error: the count is only a migration aid
            logger.warning("legacy message count of %s not kept: %s", self.request.id, exc)

    def on_retry(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A transient failure is worth a warning, whether or not per-task lines are logged."""
        logger.warning(
            "%s[%s] failed transiently (retry %d of %d): %s",
            self.name,
            task_id,
            self.request.retries + 1,
            self.max_retries,
            exc,
        )

    def record(self, payload: Payload) -> dict[str, Any]:
        """Apply the request to the ledger; return its outcome object (the first recorded)."""
        settings = settings_of(self.app)
        ledger = get_ledger(settings.database_url, migrate=settings.migrate)
        try:
            outcome_json = ledger.apply(
                self.name, self.request.id, payload, configured_issuer(settings)
            )
        except ConflictError as exc:
            tracing.annotate(self.request.id, self.name, DEAD_LETTERED)
            raise Reject(str(exc), requeue=False) from exc  # dead-lettered, with the reason
        legacy_key = getattr(self.request, LEGACY_HEADER, None)
        if legacy_key is not None:  # translated from a legacy message (mcard_tasks.legacy)
            self._count_legacy(ledger, str(legacy_key))
        outcome: dict[str, Any] = json.loads(outcome_json)
        tracing.annotate(self.request.id, self.name, str(outcome.get("outcome")))
        return outcome  # with MCARD_LOG_TASKS, Celery logs it: "Task ...[<request ID>] succeeded"
