"""Outcome events: the outbox relay that publishes them, and a subscriber helper.

Each recorded outcome is written to the ``outbox`` table in the same transaction as the
outcome itself; the relay (a process beside every worker's main process, see
mcard_tasks.relay_process) publishes pending rows to the topic exchange ``mcard.events`` with
routing key ``<task>.<outcome>``, persistent and confirmed, and only then marks them
published. A crash between the confirm and the mark publishes the row again: an identical copy
whose message id is the request ID, which subscribers drop. A replay records nothing new, so
it publishes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer

from mcard_tasks.config import settings_of
from mcard_tasks.confirms import ConfirmWindow
from mcard_tasks.identity import broker_user
from mcard_tasks.ledger import Ledger, get_ledger
from mcard_tasks.roles import subscriber_queue_prefix
from mcard_tasks.topology import EVENTS_EXCHANGE, build_topology

__all__ = ["Event", "OutboxRelay", "Subscription", "subscribe"]

logger = logging.getLogger(__name__)
BATCH = 500


class OutboxRelay:
    """Publishes the ledger's pending outcome events, oldest first."""

    def __init__(
        self, app: Celery, ledger_url: str, interval: float = 0.05, migrate: bool | None = None
    ) -> None:
        self.app, self.ledger_url, self.interval = app, ledger_url, interval
        self.migrate = migrate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._window: ConfirmWindow | None = None  # the relay thread's own broker connection

    @property
    def ledger(self) -> Ledger:
        # Opened on use: the ledger may be down at start.
        return get_ledger(self.ledger_url, migrate=self.migrate)

    def publish_pending(self) -> int:
        """Publish one batch of pending events; return how many the broker confirmed."""
        with self.ledger.pending_events(BATCH) as batch:
            if not batch.rows:
                return 0
            confirmed, error = self._publish(batch.rows)
            batch.mark(confirmed)
        if error is not None:
            raise error  # after marking what the broker did confirm
        return len(confirmed)

    def _publish(self, rows: list[tuple[str, str, str]]) -> tuple[list[str], Exception | None]:
        """Publish the batch with confirms pipelined: the request IDs the broker confirmed,
        and the error that cut the batch short, if any.

        A refused (nacked) or unconfirmed event stays pending and is published again later.
        """
        confirmed: list[str] = []
        refused: list[str] = []

        def settled(request_ids: list[str], nacked: bool) -> None:
            (refused if nacked else confirmed).extend(request_ids)

        window = self._window
        if window is not None:
            window.abort_if_idle()
        if window is None or not window.is_open:
            timeout = settings_of(self.app).publish_timeout
            window = self._window = ConfirmWindow(
                self.app, settled, timeout, BATCH, purpose="outbox relay"
            )
            window.open(build_topology(settings_of(self.app)).prepare_events)
        window.on_settled = settled
        try:
            for request_id, routing_key, body in rows:
                window.publish(
                    request_id,
                    body,
                    EVENTS_EXCHANGE.name,
                    routing_key,
                    message_id=request_id,
                    delivery_mode=2,
                    content_type="application/json",
                    content_encoding="utf-8",
                )
            window.wait()
        except Exception as exc:
            window.abort()  # the unconfirmed rest stays pending: published again, identically
            return confirmed, exc
        except BaseException:
            window.abort()
            raise
        if refused:
            logger.warning("outbox relay: the broker refused %d events; retrying", len(refused))
        return confirmed, None

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                published = self.publish_pending()
                if published == BATCH:
                    continue
            except Exception as exc:  # keep relaying: the rows wait in the outbox
                logger.warning("outbox relay: %s; retrying in 1 s", exc)
                self._stop.wait(1.0)
            self._stop.wait(self.interval)
        if self._window is not None:
            self._window.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="mcard-outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop relaying, after one last bounded pass: what is left waits for the next relay."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still in its batch: the rest waits in the outbox for the next relay
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and self.publish_pending():
                pass
        except Exception as exc:  # the rows stay in the outbox for any other relay
            logger.warning("outbox relay: final pass failed: %s", exc)
        finally:
            if self._window is not None:
                self._window.close()


def relay_for(app: Celery) -> OutboxRelay:
    return OutboxRelay(
        app,
        settings_of(app).database_url,
        settings_of(app).events_poll_interval,
        settings_of(app).migrate,
    )


@dataclass(frozen=True)
class Event:
    routing_key: str
    request_id: str
    outcome: dict[str, Any]


class Subscription(Iterator["Event | None"]):
    """The events of one subscription (see :func:`subscribe`), with what it skipped.

    malformed: events skipped because their body is not a JSON object (logged as a warning,
        without the body).
    foreign: events skipped because their AMQP ``user_id`` is not one of ``publishers``.
    duplicates: identical copies dropped (same request ID, same body).

    Iterating yields events and None after each quiet timeout; the queue is declared by the
    first ``next()``. ``close()`` (or leaving a ``with`` block) ends the subscription and its
    connection.
    """

    def __init__(
        self,
        app: Celery,
        queue: Queue,
        timeout: float,
        seen: int,
        publishers: frozenset[str] | None,
    ) -> None:
        self.app, self.queue, self.timeout = app, queue, timeout
        self.publishers = publishers
        self.malformed = self.foreign = self.duplicates = 0
        self._seen = seen
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._received: list[Event] = []
        self._events = self._run()

    def __next__(self) -> Event | None:
        return next(self._events)

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> Generator[Event | None, None, None]:
        with (
            self.app.connection_for_read() as connection,
            # on_message: the raw message, decoded here, so a bad body is skipped, not raised.
            Consumer(connection, queues=[self.queue], on_message=self._on_message),
        ):
            while True:
                try:
                    connection.drain_events(timeout=self.timeout)
                except TimeoutError:
                    yield None
                while self._received:
                    yield self._received.pop(0)

    def _on_message(self, message: Any) -> None:
        try:
            event = self._accept(message)
        finally:
            message.ack()
        if event is not None:
            self._received.append(event)

    def _accept(self, message: Any) -> Event | None:
        """The event message carries, or None (counted) if it is foreign, malformed or a copy."""
        properties = message.properties or {}
        request_id = str(properties.get("message_id") or "")
        routing_key = str((message.delivery_info or {}).get("routing_key") or "")
        if self.publishers is not None and properties.get("user_id") not in self.publishers:
            self.foreign += 1
            return None
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        outcome = _outcome(message.content_type, body)
        if outcome is None:
            self.malformed += 1
            logger.warning(
                "skipped a malformed event (routing key %.100r, message id %.100r, %s, %d bytes)",
                routing_key,
                request_id,
                message.content_type,
                len(body),
            )
            return None
        # The body's digest too: a forged event carrying a request ID first cannot suppress the
        # real one, and an identical copy (a relay's repeat) is still dropped.
        key = (request_id, hashlib.sha256(body).hexdigest())
        if key in self._recent:
            self.duplicates += 1
            return None
        self._recent[key] = None
        if len(self._recent) > self._seen:
            self._recent.popitem(last=False)
        return Event(routing_key, request_id, outcome)


def _outcome(content_type: str | None, body: bytes) -> dict[str, Any] | None:
    """The outcome object of an event body, or None unless it is a JSON object."""
    if content_type != "application/json":
        return None
    try:
        outcome = json.loads(body)
    except ValueError:  # not UTF-8 or not JSON
        return None
    return outcome if isinstance(outcome, dict) else None


def subscribe(
    app: Celery,
    pattern: str = "mcard.#",
    queue: str | None = None,
    timeout: float = 1.0,
    seen: int = 100_000,
    publishers: Iterable[str] | None = None,
) -> Subscription:
    """Yield outcome events matching pattern (None after each quiet timeout), dropping copies.

    Without a queue name, an exclusive queue lives as long as the subscription; with one, a
    durable queue keeps events while nobody listens.

    Parameters:
        publishers: broker user names (the workers'): only events whose AMQP ``user_id``
            property is one of them are yielded (RabbitMQ checks ``user_id`` against the
            publishing connection's user, so it cannot be forged). None: any publisher.
        seen: how many recent (request ID, body digest) pairs are remembered to drop copies.

    A body that is not a JSON object is skipped and counted (``Subscription.malformed``), a
    foreign publisher's event too (``Subscription.foreign``); neither ends the subscription.
    """
    # With MCARD_DECLARE=false the exchange is only checked (passive): the subscriber role
    # may configure its own queues, not the exchange.
    exchange = EVENTS_EXCHANGE
    if not settings_of(app).declare:
        exchange = Exchange(EVENTS_EXCHANGE.name, type=EVENTS_EXCHANGE.type, passive=True)
    if queue:
        bound = Queue(queue, exchange, routing_key=pattern, durable=True, auto_delete=False)
    else:
        # Named after the broker user: a subscriber user's permissions cover its own queues
        # (a user with a dot in its name has none: the shared prefix, mcard.events.).
        user = broker_user(app)
        prefix = subscriber_queue_prefix(None if "." in user else user)
        bound = Queue(
            f"{prefix}{socket.gethostname()}.{uuid.uuid4().hex[:8]}",
            exchange,
            routing_key=pattern,
            exclusive=True,
            auto_delete=True,
            durable=False,
        )
    allowed = None if publishers is None else frozenset(publishers)
    return Subscription(app, bound, timeout, seen, allowed)
