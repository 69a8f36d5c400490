"""Batched execution in the worker: requests that arrive together are applied together.

Celery's per-message path (its Request, the pool dispatch, a tracer, an ack, a result store
and task events per message) costs more than the ledger's work on a request. For the task
kinds whose spec has a batch effect (single_mint, single_burn), the consumer's strategy
(:meth:`Batcher.strategy`) takes over from Celery's:

- each message is checked on its own as it arrives (the consumer's producer check and limits
  came first, unchanged): a protocol 2 JSON task message with no ETA, expiry, retries,
  callbacks, positional arguments or legacy key, a valid request ID and valid fields. Any
  other message goes to Celery's own strategy at once, exactly as without batches;
- the checked requests of a kind go to the pool at once while no batch of that kind is
  running (low load never waits); while one is, they gather in a buffer until it holds
  MCARD_BATCH_SIZE of them, that batch ends, or MCARD_BATCH_WAIT_MS have passed since the
  first of them with fewer than two batches running (a group commit), then go to the pool
  as one call (:func:`run_batch`, in a thread or a child) that applies them to the ledger
  in one transaction (mcard_tasks.ledger_batch);
- back in the consumer, the requests the batch committed are acked together (one
  ``basic.ack`` with ``multiple`` for as far as every earlier delivery of the channel is
  settled: on a quorum queue each ack frame is a consensus command) and each gets Flower's
  task-started and task-succeeded events (task-received was sent when it arrived) under its
  own request ID; its result is the ledger's outcome, read by ``AsyncResult(R)`` as before.
  Every request the batch did not decide (a replay, a conflict, a rejection, a duplicate, a
  batch that failed as a whole or whose pool child died) goes to Celery's strategy, one by
  one, as if it had just arrived: its outcome, retries or dead letter are today's.

Exactly once holds as for one request: a request is acked only after its claim and outcome
are committed, so a crash between the commit and the acks only causes replays.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from celery.app.trace import LOG_RECEIVED, LOG_SUCCESS
from celery.exceptions import InvalidTaskError
from kombu.exceptions import ContentDisallowed, DecodeError

from mcard_tasks.config import Settings
from mcard_tasks.errors import InvalidRequestError
from mcard_tasks.issuers import configured_issuer
from mcard_tasks.ledger import get_ledger
from mcard_tasks.ledger_batch import apply_batch
from mcard_tasks.legacy import LEGACY_HEADER
from mcard_tasks.messages import result_repr
from mcard_tasks.payloads import Payload, check_request_id
from mcard_tasks.timings import TASK_DURATION, observe

__all__ = ["Batcher", "batch_prefetch", "run_batch"]

logger = logging.getLogger(__name__)
#: Celery's loggers of its per-task lines, which batched requests log too (MCARD_LOG_TASKS).
_received_lines = logging.getLogger("celery.worker.strategy")
_success_lines = logging.getLogger("celery.app.trace")

#: Headers that take a message off the batch path (Celery's strategy handles them).
_OWN_PATH_HEADERS = ("eta", "expires", "retries", "group", LEGACY_HEADER)
_EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


#: Batches of one kind in the pool at once before a partial batch whose wait is over may
#: start (it starts when one of them ends; a full batch starts at once): a slow issuer then
#: gets a few full batches rather than many small ones.
_RUNNING = 2


def batch_prefetch(settings: Settings) -> int:
    """Messages a worker reserves with batches on: four full batches (late acks: what runs and
    what gathers can never be more than the prefetch; with only two batches' worth, the
    broker sends the next batch only after one is acked, and the consumer idles meanwhile).
    A full buffer starts its batch at once, so up to four of a kind may run together; the
    _RUNNING limit holds back only partial batches, whose wait is over."""
    return (_RUNNING + 2) * settings.batch_size


def run_batch(settings: Settings, task: str, requests: list[tuple[str, Payload]]) -> Any:
    """In the pool: apply requests together; their outcome JSON by request ID. Never raises:
    a batch that fails as a whole answers {} and every request goes on alone."""
    started = time.perf_counter()
    try:
        ledger = get_ledger(settings.database_url, migrate=settings.migrate)
        decided = apply_batch(ledger, task, requests, configured_issuer(settings))
    except Exception as exc:  # any failure: the per-request path retries or dead-letters
        logger.warning("a batch of %d %s failed (%s); each goes on alone", len(requests), task, exc)
        return {}
    spent = time.perf_counter() - started
    for _ in decided:  # each request the batch decided ran for the batch's time
        observe(TASK_DURATION, task, spent)
    return decided


@dataclass
class _Item:
    """A checked request waiting in a batch, with what Celery's strategy needs of it."""

    message: Any
    request_id: str
    payload: Payload
    handler_args: tuple[Any, ...]  # (message, body, ack, reject, callbacks)


@dataclass
class _Batch:
    task: str
    items: list[_Item]
    generation: int
    started: float = field(default_factory=time.monotonic)


Strategy = Callable[..., Any]


class Deliveries:
    """Every delivery of the consumer's channel in arrival order (delivery tags grow), so that
    committed requests are acked with one multiple-ack.

    A multiple-ack settles every unsettled delivery up to its tag, so it may only cover
    messages of committed batches and messages whose own ack, reject or requeue frame was
    sent already (kombu's ``acknowledged``); it stops at the first delivery still in work (a
    request on Celery's path, one waiting in a buffer). Committed requests behind it are acked
    one by one.
    """

    def __init__(self, bound: int) -> None:
        self._order: deque[Any] = deque()
        self._ready: set[int] = set()
        self._bound = bound

    def track(self, message: Any) -> None:
        self._order.append(message)
        if len(self._order) > self._bound:  # settled ones behind a long-held delivery
            self._order = deque(m for m in self._order if not m.acknowledged)

    def ack(self, messages: list[Any]) -> None:
        """Ack messages (committed): together as far as possible, the rest one by one."""
        ready = self._ready
        ready.update(id(message) for message in messages)
        covered: list[Any] = []
        order = self._order
        while order:
            head = order[0]
            if id(head) in ready:
                ready.discard(id(head))
                covered.append(order.popleft())
            elif head.acknowledged:
                order.popleft()
            else:
                break
        if covered:
            covered[-1].ack(multiple=True)
            for message in covered:
                message._state = "ACK"  # settled by that one frame
        for message in messages:
            if id(message) in ready:
                ready.discard(id(message))
                message.ack()

    def clear(self) -> None:
        self._order.clear()
        self._ready.clear()


class Batcher:
    """The batches of one consumer: a buffer per task kind, flushed by size or by time."""

    def __init__(self, consumer: Any, settings: Settings) -> None:
        self.consumer = consumer
        self.settings = settings
        self.size = settings.batch_size
        self.wait = settings.batch_wait_ms / 1000
        self._buffers: dict[str, list[_Item]] = {}
        self._timers: dict[str, Any] = {}
        self._fallbacks: dict[str, Strategy] = {}
        self._result_maxsize: dict[str, int] = {}
        #: Batches of each kind in the pool now.
        self._running: dict[str, int] = {}
        self.deliveries = Deliveries(4 * batch_prefetch(settings))
        #: Counts connections: a batch of an older one is not acked (its messages come back).
        self._generation = 0
        #: The worker shuts down: no batch starts, and nothing goes to Celery's strategy.
        self._closing = False
        # Pools without an event loop run the consumer's timer in a thread of its own.
        self._lock = threading.RLock()

    # --- arrival ---------------------------------------------------------------------------

    def strategy(self, task: Any, fallback: Strategy) -> Strategy:
        """The strategy of task: its checked requests into batches, others to fallback
        (Celery's own strategy of the task)."""
        self._fallbacks[task.name] = fallback
        self._result_maxsize[task.name] = task.resultrepr_maxsize

        def on_message(
            message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any
        ) -> Any:
            if self._closing:  # the worker shuts down: it comes back redelivered
                return None
            item = self._checked(task, message, body, (message, body, ack, reject, callbacks))
            if item is None or kwargs:
                return fallback(message, body, ack, reject, callbacks, **kwargs)
            self._received(task, item)
            self._add(task.name, item)
            return None

        return on_message

    def _checked(
        self, task: Any, message: Any, body: Any, handler_args: tuple[Any, ...]
    ) -> _Item | None:
        """The message as a batch item, or None for anything Celery's strategy must handle."""
        headers = message.headers or {}
        if body is not None or headers.get("task") != task.name:
            return None
        if any(headers.get(name) for name in _OWN_PATH_HEADERS):
            return None
        try:
            args, fields, embed = message.decode()
            if args or not isinstance(fields, dict) or not isinstance(embed, dict):
                return None
            if any(embed.get(key) for key in _EMBED_KEYS):
                return None
            request_id = check_request_id(headers.get("id"))
            payload = task.validate(fields)
        except (InvalidRequestError, TypeError, ValueError):
            return None
        except Exception:  # any decoder error: Celery's path dead-letters it with the reason
            return None
        return _Item(message, request_id, payload, handler_args)

    def _add(self, task: str, item: _Item) -> None:
        with self._lock:
            buffer = self._buffers.setdefault(task, [])
            buffer.append(item)
            if len(buffer) >= self.size or self.wait <= 0 or not self._running.get(task):
                self._flush(task)
            elif len(buffer) == 1:
                self._timers[task] = self.consumer.timer.call_after(
                    self.wait, self._flush_due, (task,)
                )

    def _flush_due(self, task: str) -> None:
        """MCARD_BATCH_WAIT_MS are over: start the batch, unless as many as may run are
        running (the first of them to end starts it)."""
        with self._lock:
            self._timers.pop(task, None)
            if self._buffers.get(task) and self._running.get(task, 0) < _RUNNING:
                self._flush(task)

    # --- execution -------------------------------------------------------------------------

    def _flush(self, task: str) -> None:
        items = self._buffers.pop(task, [])
        timer = self._timers.pop(task, None)
        if timer is not None:
            timer.cancel()
        batch = _Batch(task, items, self._generation)
        self._running[task] = self._running.get(task, 0) + 1
        logger.debug("a batch of %d %s", len(items), task)
        for item in items:
            self._send_event("task-started", item)
        requests = [(item.request_id, item.payload) for item in items]
        try:
            self.consumer.pool.apply_async(
                run_batch,
                args=(self.settings, task, requests),
                callback=partial(self._done, batch),
                error_callback=partial(self._failed, batch),
            )
        except Exception as exc:  # a pool that cannot take it (stopping): one by one
            logger.warning("batch of %d %s not started (%r)", len(items), task, exc)
            self._finish(batch, {})

    def _done(self, batch: _Batch, result: Any) -> None:
        """The pool's answer, in whatever thread the pool calls back from: on to the loop."""
        decided = result if isinstance(result, dict) else {}
        self._on_loop(partial(self._finish, batch, decided))

    def _failed(self, batch: _Batch, *exc_info: Any) -> None:
        """The batch's pool child died (or its call failed): every request goes on alone."""
        logger.warning("batch of %d %s lost (%r)", len(batch.items), batch.task, exc_info)
        self._on_loop(partial(self._finish, batch, {}))

    def _on_loop(self, call: Callable[[], None]) -> None:
        hub = self.consumer.hub
        if hub is None:
            with self._lock:
                call()
        else:
            hub.call_soon(call)

    def _finish(self, batch: _Batch, decided: dict[str, str]) -> None:
        """Ack each committed request with its events; the rest to Celery's strategy; then
        start what gathered meanwhile."""
        if batch.generation != self._generation:
            return  # the connection was lost since: these messages are being redelivered
        with self._lock:
            self._running[batch.task] -= 1
            idle = not self._running[batch.task]
            if self._buffers.get(batch.task) and (idle or batch.task not in self._timers):
                self._flush(batch.task)  # none runs, or its wait is over and one just ended
            closing = self._closing
        runtime = time.monotonic() - batch.started
        # A decided request ID is its first message's (ledger_batch applies only the first of
        # an ID): a later message of that ID, same payload or not, goes on alone (a replay,
        # or a conflict dead-lettered), never acked as the first one's success.
        firsts: dict[str, _Item] = {}
        for item in batch.items:
            firsts.setdefault(item.request_id, item)
        committed = [item for item in batch.items if item.request_id in decided]
        committed = [item for item in committed if firsts[item.request_id] is item]
        self._ack(committed)
        lines = _success_lines.isEnabledFor(logging.INFO)
        maxsize = self._result_maxsize[batch.task]
        for item in batch.items:
            outcome = decided.get(item.request_id) if firsts[item.request_id] is item else None
            if outcome is None:
                if not closing:  # while the worker shuts down, it comes back redelivered
                    self._fall_back(batch.task, item)
                continue
            result = result_repr(json.loads(outcome), maxsize)
            self._send_event("task-succeeded", item, result=result, runtime=runtime)
            if lines:
                fields = {"name": batch.task, "id": item.request_id, "runtime": runtime}
                _success_lines.info(LOG_SUCCESS, fields | {"return_value": result})

    def _ack(self, items: list[_Item]) -> None:
        consumer = self.consumer
        try:
            self.deliveries.ack([item.message for item in items])
        except (*consumer.connection_errors, *consumer.channel_errors) as exc:
            # The connection is going: these messages come back (their outcomes are stored).
            logger.warning("acks of a batch of %d failed: %r", len(items), exc)

    def _fall_back(self, task: str, item: _Item) -> None:
        """Celery's strategy for one request, with the consumer's handling of its errors."""
        consumer, message = self.consumer, item.message
        try:
            self._fallbacks[task](*item.handler_args)
        except (InvalidTaskError, ContentDisallowed) as exc:
            consumer.on_invalid_task(None, message, exc)
        except DecodeError as exc:
            consumer.on_decode_error(message, exc)
        except Exception:  # anything else (a pool shutting down): this one comes back later
            logger.exception("request %s could not go on alone; requeued", item.request_id)
            try:
                message.reject(requeue=True)
            except Exception:  # the connection is going: it is redelivered anyway
                logger.warning("could not requeue request %s", item.request_id)

    # --- events ----------------------------------------------------------------------------

    def _received(self, task: Any, item: _Item) -> None:
        headers = item.message.headers
        if _received_lines.isEnabledFor(logging.INFO):
            _received_lines.info(LOG_RECEIVED, {"name": task.name, "id": item.request_id})
        self._send_event(
            "task-received",
            item,
            name=task.name,
            args=headers.get("argsrepr", "()"),
            kwargs=headers.get("kwargsrepr", "{}"),
            root_id=headers.get("root_id"),
            parent_id=headers.get("parent_id"),
            retries=0,
            eta=None,
            expires=None,
        )

    def _send_event(self, type_: str, item: _Item, **fields: Any) -> None:
        eventer = self.consumer.event_dispatcher
        if eventer is not None and eventer.enabled:
            eventer.send(type_, uuid=item.request_id, **fields)

    # --- connection ------------------------------------------------------------------------

    def close(self) -> None:
        """The worker shuts down (warm): the requests waiting in a buffer are left to come back
        redelivered, nothing new starts, and the batches running are still acked as they end
        (the connection stays open until the pool has finished them)."""
        with self._lock:
            self._closing = True
            self._drop_waiting()

    def reset(self) -> None:
        """The connection is gone: forget what waits (it comes back redelivered) and never
        ack a batch still running (its delivery tags belong to the old channel)."""
        with self._lock:
            self._generation += 1
            self._drop_waiting()
            self._running.clear()
            self.deliveries.clear()

    def _drop_waiting(self) -> None:
        """Forget the requests in the buffers (unacked: they come back) and their timers."""
        self._buffers.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
