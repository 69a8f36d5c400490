"""The request outbox relay: publishes committed outbox rows as the messages delay() publishes.

Each batch is one transaction of the application's database: claim the oldest pending rows
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so relays on other hosts take other rows; SQLite
takes its one write lock at BEGIN), publish them through a window of pipelined confirms, mark
the confirmed ones relayed, commit. A relay killed mid-batch commits nothing: its rows are
published again by the next relay, with the same request ID, and the worker applies a
request once whatever the copies (at least once to the broker, exactly once at the ledger).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.events import Event
from celery.utils.time import utcoffset
from kombu.messaging import Producer
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Engine,
    any_,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import SQLAlchemyError

from mcard_tasks.config import Settings, settings_of
from mcard_tasks.confirms import BROKER_ERRORS, ConfirmWindow
from mcard_tasks.messages import TaskMessage
from mcard_tasks.request_outbox import REQUEST_OUTBOX, stored_message
from mcard_tasks.sent_events import sent_events
from mcard_tasks.topology import build_topology

__all__ = ["OutboxStatus", "RequestRelay", "outbox_status"]

logger = logging.getLogger(__name__)
#: What the loop waits out: the broker's errors and the application database's.
OUTAGES: tuple[type[Exception], ...] = (*BROKER_ERRORS, SQLAlchemyError)
_T = REQUEST_OUTBOX.c


@dataclass(frozen=True)
class OutboxStatus:
    pending: int
    #: Seconds since the oldest pending row was written (None: nothing pending).
    oldest_age: float | None
    relayed: int  # relayed rows not yet removed by the retention


def outbox_status(engine: Engine) -> OutboxStatus:
    """How many rows wait, how old the oldest is, how many relayed rows are kept."""
    pending = _T.relayed_at.is_(None)
    with engine.connect().execution_options(mcard_readonly=True) as connection:
        waiting, oldest = connection.execute(
            select(func.count(), func.min(_T.created_at)).where(pending)
        ).one()
        relayed = connection.execute(select(func.count()).where(~pending)).scalar_one()
    age = None if oldest is None else max(0.0, time.time() - float(oldest))
    return OutboxStatus(int(waiting), age, int(relayed))


class RequestRelay:
    """Relays the request outbox of one application database to the broker."""

    def __init__(self, app: Celery, engine: Engine, settings: Settings | None = None) -> None:
        self.app, self.engine = app, engine
        self.settings = settings or settings_of(app)
        self.stopping = threading.Event()
        self._window: ConfirmWindow | None = None
        self._events: Producer | None = None
        self._confirmed: list[str] = []
        self._purged_at = 0.0

    # --- one batch -----------------------------------------------------------------------

    def relay_batch(self) -> int:
        """Publish one batch of committed rows; return how many the broker confirmed."""
        if not self._any_pending():
            return 0
        self._ensure_window()  # outside the transaction: SQLite's lock is not held meanwhile
        with self.engine.begin() as connection:
            rows = connection.execute(
                select(_T.id, _T.request_id, _T.message)
                .where(_T.relayed_at.is_(None))
                .order_by(_T.id)
                .limit(self.settings.relay_batch)
                .with_for_update(skip_locked=True)
            ).all()
            error = self._publish(rows)
            if self._confirmed:
                connection.execute(
                    update(REQUEST_OUTBOX)
                    .where(self._among([int(key) for key in self._confirmed]))
                    .values(relayed_at=time.time())
                )
        if error is not None:
            raise error  # after committing what the broker did confirm
        return len(self._confirmed)

    def _among(self, ids: list[int]) -> ColumnElement[bool]:
        """id among ids: one array parameter on PostgreSQL (an IN list of a whole batch costs
        a bound parameter per row to compile and send), an IN list on SQLite."""
        if self.engine.dialect.name == "postgresql":
            return _T.id == any_(bindparam("ids", ids, type_=ARRAY(BigInteger)))
        return _T.id.in_(ids)

    def _any_pending(self) -> bool:
        """A cheap look without locks: an idle relay opens no broker connection."""
        with self.engine.connect().execution_options(mcard_readonly=True) as connection:
            found = connection.execute(
                select(_T.id).where(_T.relayed_at.is_(None)).limit(1)
            ).first()
        return found is not None

    def _ensure_window(self) -> None:
        window = self._window
        if window is not None:
            window.abort_if_idle()
        if window is None or not window.is_open:
            window = self._window = ConfirmWindow(
                self.app,
                self._settled,
                self.settings.publish_timeout,
                self.settings.relay_batch,
                purpose="request relay",
            )
            # Declared as delay() declares its queue: on a fresh vhost nothing is unroutable.
            window.open(build_topology(self.settings).prepare)
            self._events = self._events_producer(window) if self._sends_events else None

    @property
    def _sends_events(self) -> bool:
        return bool(self.app.conf.task_send_sent_event)

    def _settled(self, keys: list[str], nacked: bool) -> None:
        if nacked:  # refused rows stay pending: published again in a later batch
            logger.warning("request relay: the broker refused %d requests; retrying", len(keys))
        else:
            self._confirmed.extend(keys)

    def _publish(self, rows: Sequence[Any]) -> Exception | None:
        """Publish rows pipelined; the error that cut the batch short, if any."""
        assert self._window is not None
        self._confirmed = []
        events: list[dict[str, Any]] = []
        offset = utcoffset()  # once per batch: it is a system call
        try:
            for row in rows:
                message = stored_message(row.message)
                self._window.publish(
                    str(row.id),
                    message.body,
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                    headers=message.headers,
                    **message.properties,
                )
                if self._events is not None:
                    events.append(self._sent_event(message, row.request_id, offset))
            self._window.wait()
            self._send_events(events)
        except Exception as exc:
            self._window.abort()  # the unconfirmed rest stays pending
            return exc
        except BaseException:
            self._window.abort()
            raise
        return None

    # --- Flower's task-sent event ----------------------------------------------------------

    def _events_producer(self, window: ConfirmWindow) -> Producer:
        """A channel of the relay's connection outside confirm mode, for the events."""
        dispatcher = sent_events(self.app)
        producer = Producer(
            window.connection.connection.channel(),
            exchange=dispatcher.exchange,
            serializer=dispatcher.serializer,
            auto_declare=False,
        )
        if self.settings.declare:
            producer.declare()
        return producer

    def _sent_event(self, message: TaskMessage, request_id: str, offset: int) -> dict[str, Any]:
        """The task-sent event Celery sends after delay()'s message, with its fields."""
        dispatcher = sent_events(self.app)
        event: dict[str, Any] = Event(
            "task-sent",
            hostname=dispatcher.hostname,
            utcoffset=offset,
            pid=dispatcher.pid,
            clock=dispatcher.clock.forward(),
            uuid=request_id,
            root_id=request_id,
            parent_id=None,
            name=message.headers["task"],
            args=message.headers.get("argsrepr"),
            kwargs=message.headers.get("kwargsrepr"),
            retries=0,
            eta=None,
            expires=None,
            queue=message.routing_key,
            exchange=message.exchange,
            routing_key=message.routing_key,
        )
        return event

    def _send_events(self, events: list[dict[str, Any]]) -> None:
        """The batch's task-sent events as ONE message, unconfirmed: Celery's grouped form
        (a list body, routing key ``task.multi``), which Flower's receiver reads event by
        event. One message per batch instead of one per request: a second message per request
        would halve the relay's rate for monitoring data."""
        if self._events is None or not events:
            return
        dispatcher = sent_events(self.app)
        try:
            self._events.publish(
                events,
                routing_key="task.multi",
                headers=dispatcher.headers,
                delivery_mode=dispatcher.delivery_mode,
                retry=False,
                user_id=self._window.user_id if self._window is not None else None,
            )
        except Exception as exc:  # never worth failing a confirmed batch for
            logger.warning("%d task-sent events not sent: %r", len(events), exc)
            self._events = None

    # --- the loop --------------------------------------------------------------------------

    def run(self, once: bool = False) -> None:
        """Relay until stopped (once: until nothing is pending); outages are waited out."""
        backoff, outage = self.settings.relay_poll_interval, None
        try:
            self._loop(once, backoff, outage)
        finally:
            self.close()

    def _loop(self, once: bool, backoff: float, outage: str | None) -> None:
        while not self.stopping.is_set():
            try:
                relayed = self.relay_batch()
                self._purge_if_due()  # under a steady backlog too
                done = once and relayed == 0 and not self._any_pending()
            except OUTAGES as exc:
                what = "database" if isinstance(exc, SQLAlchemyError) else "broker"
                if outage != what:  # once per outage, not once per attempt
                    logger.warning(
                        "request relay: the %s is unavailable (%s); retrying with backoff up"
                        " to %g s",
                        what,
                        exc,
                        self.settings.relay_backoff_max,
                    )
                    outage = what
                backoff = min(max(backoff * 2, 0.1), self.settings.relay_backoff_max)
                self.stopping.wait(backoff)
                continue
            if outage is not None:
                logger.warning("request relay: the %s is back; relaying", outage)
                outage, backoff = None, self.settings.relay_poll_interval
            if relayed >= self.settings.relay_batch:
                continue  # more may wait: no pause between full batches
            # Nothing confirmed is not nothing pending: refused rows, or rows another relay
            # holds, still wait; --once ends only when none is left.
            if done:
                break
            self.stopping.wait(self.settings.relay_poll_interval)

    def close(self) -> None:
        if self._window is not None:
            self._window.close()
        self._window = self._events = None

    # --- retention -------------------------------------------------------------------------

    def _purge_if_due(self) -> None:
        # At most once a minute (or once per retention, if shorter): a DELETE every poll
        # would cost more than the relaying itself.
        every = min(60.0, self.settings.relay_retention)
        if time.monotonic() - self._purged_at >= every:
            self._purged_at = time.monotonic()
            self.purge()

    def purge(self) -> int:
        """Remove the rows relayed longer ago than the retention; how many."""
        cutoff = time.time() - self.settings.relay_retention
        with self.engine.begin() as connection:
            done = connection.execute(
                delete(REQUEST_OUTBOX).where(_T.relayed_at.is_not(None), _T.relayed_at < cutoff)
            )
        return int(done.rowcount)
