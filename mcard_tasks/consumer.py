"""The worker's consumer: Celery's, with the changes mcard-tasks needs.

- Every give-up path (undecodable body, not JSON, no task headers, unknown task, invalid
  message) ends in the queue's dead-letter queue with its reason, instead of an ack.
- A message without task headers may be a legacy message (the seed's shape): with
  MCARD_LEGACY_MESSAGES it is republished as the task message of its request
  (mcard_tasks.legacy), and dead-lettered with the reason if it is not a valid one.
- Only the tasks of mcard-tasks run (its task kinds, and modules an operator names with
  ``-I``): a message naming any other task (Celery's built-ins such as
  ``celery.chord_unlock``, a library's task) is an unknown task, dead-lettered.
- With MCARD_PRODUCERS, a message whose ``user_id`` is not an allowed producer of its task is
  dead-lettered with a reason naming the user (mcard_tasks.identity), before anything else is
  looked at (limits, task name, body).
- Native delayed delivery is declared on the live node the consumer just connected to, so a
  failover resumes consuming at once.
- A message over the size or ETA limits (MCARD_MAX_BODY_BYTES, MCARD_MAX_ETA_SECONDS) is
  dead-lettered before its body is decoded (mcard_tasks.limits).
- With MCARD_BATCH (the default), requests of the kinds that have a batch path are applied
  in batches (mcard_tasks.batches); every check above still applies to each message first.
- Task events are published without confirms: they must never stall the main loop.
- The whole topology is declared (or, with MCARD_DECLARE=false, checked) on every
  (re)connection, before anything consumes: Celery
  declares only the queues it consumes, and at-least-once dead-lettering needs the
  dead-letter exchange and queues first. A queue declared on the broker with other arguments
  stops the worker with TopologyDriftError in plain words (Celery would reconnect forever on
  the PRECONDITION_FAILED).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery import signals
from celery.app.trace import build_tracer
from celery.worker.consumer import Consumer

from mcard_tasks.batches import Batcher, batch_prefetch
from mcard_tasks.config import settings_of
from mcard_tasks.deadletter import dead_letter, source_queue
from mcard_tasks.errors import InvalidLegacyMessageError
from mcard_tasks.identity import (
    ProducerPolicy,
    broker_user,
    producer_policy,
    request_producers,
)
from mcard_tasks.issuers import configured_issuer
from mcard_tasks.legacy import LegacyRequest, republish, translate
from mcard_tasks.limits import guarded
from mcard_tasks.specs import task_names
from mcard_tasks.topology import build_topology

__all__ = ["CELERY_BUILTINS", "MCardConsumer", "executable_tasks"]

#: The prefix of Celery's built-in tasks (chord_unlock, backend_cleanup, map, chain, ...):
#: registered in every app, executed by no mcard-tasks worker, even from an included module.
CELERY_BUILTINS = "celery."


def executable_tasks(app: Any, include: Any) -> frozenset[str]:
    """The task names a worker executes: the task kinds, and the tasks defined in the modules
    of include (the worker's ``-I``), never a built-in."""
    modules = {include} if isinstance(include, str) else set(include or ())
    included = {
        name
        for name, task in app.tasks.items()
        if type(task).__module__ in modules and not name.startswith(CELERY_BUILTINS)
    }
    return frozenset(task_names()) | frozenset(included)


logger = logging.getLogger(__name__)


class MCardConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, with every give-up path ending in the DLQ instead of an ack."""

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        # Delayed delivery declared on the live node only: no stall on a failover.
        default_steps: ClassVar[list[str]] = [
            "mcard_tasks.bootsteps:LiveNodeDelayedDelivery"
            if step == "celery.worker.consumer.delayed_delivery:DelayedDelivery"
            else step
            for step in Consumer.Blueprint.default_steps
        ]

    #: MCARD_PRODUCERS as the worker applies it (None: every producer), set with strategies.
    _policy: ProducerPolicy | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = settings_of(self.app)
        #: The worker's batches (None with MCARD_BATCH=false).
        # Traces follow each request through Celery's run (MCARD_TRACING): no batches then.
        batches = settings.batch and not settings.tracing
        self.batcher = Batcher(self, settings) if batches else None
        given = int(kwargs.get("initial_prefetch_count") or 0)  # 0: prefetch unlimited
        if self.batcher is not None and given:
            self.initial_prefetch_count = max(given, batch_prefetch(settings))

    @property
    def max_prefetch_count(self) -> int:
        """Celery's (pool size x multiplier), or two batches' worth if that is more."""
        count = int(self.pool.num_processes * self.prefetch_multiplier)
        if self.batcher is None:
            return count
        return max(count, batch_prefetch(settings_of(self.app)))

    #: Set by stop(): the worker shuts down (its connection stays open until the pool ends).
    _stopping = False

    def stop(self) -> None:
        self._stopping = True
        super().stop()

    def on_close(self) -> None:
        super().on_close()
        if self.batcher is None:
            return
        if self._stopping:
            self.batcher.close()  # the running batches are still acked as they end
        else:
            self.batcher.reset()  # the connection is lost: their deliveries are gone

    def connect(self) -> Any:
        """The consuming connection, with the whole topology declared on it first."""
        connection = super().connect()
        settings = settings_of(self.app)
        try:
            build_topology(settings).prepare(connection.default_channel)
        except BaseException:
            # Celery keeps (and later closes) only a connection that connect() returned.
            connection.collect()
            raise
        done = "declared" if settings.declare else "checked"
        logger.info("%s the mcard topology (%s queues)", done, settings.queue_type)
        return connection

    def update_strategies(self) -> None:
        """Strategies only for mcard-tasks' task kinds (mcard_tasks.specs, plugins included)
        and the tasks of modules an operator names with ``-I``/``--include``: a message naming
        any other task (Celery's built-ins such as ``celery.chord_unlock``, a task some imported
        library registers) finds no strategy and is dead-lettered as an unknown task.
        MCARD_PRODUCERS is read here too (the task handler checks it first)."""
        self._policy = producer_policy(self.app)
        allowed = executable_tasks(self.app, getattr(self.controller, "include", None))
        loader = self.app.loader
        for name, task in self.app.tasks.items():
            if name not in allowed:
                self.strategies.pop(name, None)
                continue
            self.strategies[name] = task.start_strategy(self.app, self)
            task.__trace__ = build_tracer(name, task, loader, self.hostname, app=self.app)
            spec = getattr(task, "spec", None)
            issuer = configured_issuer(settings_of(self.app))
            if self.batcher is not None and spec is not None and spec.batches_with(issuer):
                self.strategies[name] = self.batcher.strategy(task, self.strategies[name])

    def _producer_refusal(self, message: Any) -> str | None:
        """Why message's producer may not publish it (MCARD_PRODUCERS), or None: for the task
        it names, or (a legacy message, an unknown task) for any task at all."""
        policy = self._policy
        if policy is None:
            return None
        name = (message.headers or {}).get("task")
        known = name if isinstance(name, str) and name in self.strategies else None
        return policy.message_refusal(message, known)

    def _refuse(self, message: Any, reason: str) -> None:
        dead_letter(self.app, message, reason)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler of every received message, behind the producer check, then the
        limits (mcard_tasks.limits): an unlisted producer's message is refused as such
        whatever else is wrong with it, so its dead letter is never replayed."""
        handler = guarded(self, super().create_task_handler(*args, **kwargs))

        batcher = self.batcher

        def on_task_received(message: Any) -> Any:
            if batcher is not None:
                batcher.deliveries.track(message)  # for the batches' multiple-acks
            refusal = self._producer_refusal(message)
            if refusal is None:
                return handler(message)
            self._refuse(message, refusal)
            return None

        return on_task_received

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        """The connection of the worker's task events (Celery's Events step is its one user).

        Events are monitoring data for Flower: published without publisher confirms, so the
        main loop never waits on the broker for them (with confirms, a confirm that never came
        stalled the consumer for good, seen in benchmarks under load).
        """
        options = dict(self.app.conf.broker_transport_options or {}, confirm_publish=False)
        connection = self.app.connection_for_write(
            url=url, heartbeat=heartbeat, transport_options=options
        )
        return self.ensure_connected(connection)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        dead_letter(self.app, message, f"undecodable body ({message.content_type}): {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """A message without task headers: a legacy message is executed, anything else (or
        everything, with MCARD_LEGACY_MESSAGES off) dead-lettered with the reason."""
        if not settings_of(self.app).legacy_messages:
            self._unknown(message, "legacy messages are off (MCARD_LEGACY_MESSAGES=false)")
            return
        if body is None:  # Celery decodes the body only when there are headers without 'task'
            try:
                body = message.decode()
            except Exception as exc:  # whatever the decoder raises: the body is undecodable
                self.on_decode_error(message, exc)
                return
        try:
            request = translate(body, source_queue(message))
        except InvalidLegacyMessageError as exc:
            self._unknown(message, str(exc))
            return
        policy = self._policy
        if policy is not None:
            refusal = policy.message_refusal(message, request.spec.name)
            if refusal is not None:
                self._refuse(message, f"{refusal} (a legacy message)")
                return
        self._execute_legacy(message, request)

    def _unknown(self, message: Any, why: str) -> None:
        dead_letter(self.app, message, f"not a Celery task message (no task headers); {why}")
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def _execute_legacy(self, message: Any, request: LegacyRequest) -> None:
        """Republish the request's task message, then ack the original (never before: a
        crash in between republishes it, and the ledger makes the copy a replay)."""
        try:
            republish(self.app, request, request_producers(message, broker_user(self.app)))
        except Exception as exc:  # any publish failure: never lose the original
            if not message.delivery_info.get("redelivered"):
                # A passing broker failure (a leader election, a nack): once more, later.
                logger.warning(
                    "legacy message %s: republish failed (%r); requeued", request.request_id, exc
                )
                message.reject(requeue=True)
                return
            logger.exception("could not republish legacy message %s", request.request_id)
            dead_letter(
                self.app,
                message,
                f"legacy message: republish failed twice (it may have been"
                f" published; a replay is safe): {exc!r}",
            )
            return
        logger.debug("legacy message %s (%s) republished", request.request_id, request.key)
        message.ack()

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        dead_letter(self.app, message, f"unknown task name {name!r}")
        signals.task_unknown.send(
            sender=self, message=message, exc=exc, name=name, id=(message.headers or {}).get("id")
        )

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        dead_letter(self.app, message, f"invalid task message: {exc}")
        signals.task_rejected.send(sender=self, message=message, exc=exc)
