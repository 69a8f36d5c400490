"""Flower's ``task-sent`` events of ``delay()``: Celery's event, published without a confirm.

With ``task_send_sent_event`` Celery publishes a ``task-sent`` event right after each task
message, through the same producer (``celery.app.amqp``'s ``send_task_message``). On a
``confirm_publish`` connection that is a second broker round trip per ``delay()``, waited for
with no timeout, inside one lock that every thread of the process shares (Celery's
``EventDispatcher.publish``). The event is monitoring data for Flower; the task message is what
the broker must confirm.

:class:`SentEvents` is handed to Celery as the ``event_dispatcher`` of each publish, so Celery
still decides when to send the event and builds it (the fields Flower reads). It publishes the
event on a second channel of the very pooled connection that carried the task, a channel that
is never put in confirm mode: no extra broker connection (the pool's bound holds), no round
trip, no process-wide lock, a bounded write. A failure to send it is logged and dropped: the
task is confirmed already, and Flower still learns of the task from the worker's events. One
exception: a broker's refusal of an event (its exchange deleted, a permission taken away)
arrives later, as the closing of the events channel, and surfaces as the error of the next
publish on that connection; that call raises BrokerUnavailableError (publishing again with
the same request ID is safe) and the connection is replaced.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

from celery import Celery
from celery.events import Event, EventDispatcher
from celery.utils.time import utcoffset
from kombu.messaging import Producer

from mcard_tasks.config import settings_of
from mcard_tasks.identity import broker_user

__all__ = ["SentEvents", "sent_events"]

logger = logging.getLogger(__name__)

#: The dispatcher of each app (rebuilt in a forked child, whose pid the events carry).
_DISPATCHERS: weakref.WeakKeyDictionary[Celery, SentEvents] = weakref.WeakKeyDictionary()


def sent_events(app: Celery) -> SentEvents:
    """The task-sent event dispatcher of app in this process."""
    dispatcher = _DISPATCHERS.get(app)
    if dispatcher is None or dispatcher.pid != os.getpid():
        dispatcher = _DISPATCHERS[app] = SentEvents(app)
    return dispatcher


def _unconfirmed_channel(raw: Any) -> Any:
    """A new channel of a ``confirm_publish`` py-amqp connection, not in confirm mode.

    py-amqp has no per-channel switch: a channel made while ``connection.confirm_publish`` is
    true publishes in confirm mode (``Channel.__init__`` reads the flag; confirm.select goes
    out on the channel's first publish). So the flag is off while this one channel is made, by
    the thread that holds the pooled connection (no other thread uses it meanwhile). Were
    py-amqp to read the flag elsewhere one day, this channel would confirm: events slower,
    never lost; tests/integration/test_enqueue.py checks each channel's mode on the broker.
    """
    raw.confirm_publish = False
    try:
        return raw.channel()
    finally:
        raw.confirm_publish = True


class SentEvents(EventDispatcher):  # type: ignore[misc]
    """Celery's event dispatcher, publishing each task-sent event on an unconfirmed channel.

    Disabled as a dispatcher of its own (like Celery's default one for task-sent events): it
    only publishes what Celery's send_task_message hands it, with the producer of the task.
    """

    def __init__(self, app: Celery) -> None:
        super().__init__(app=app, enabled=False, buffer_while_offline=False)
        #: The events producer of each live py-amqp connection, forgotten with it.
        self._producers: weakref.WeakKeyDictionary[Any, Producer] = weakref.WeakKeyDictionary()

    def producer_for(self, producer: Producer) -> Producer:
        """The events producer on the connection of producer, on a channel without confirms."""
        channel = producer.channel
        raw = channel.connection  # the py-amqp connection that just carried the task
        events = self._producers.get(raw)
        if events is None or not events.channel.is_open:
            if getattr(raw, "confirm_publish", False):
                channel = _unconfirmed_channel(raw)
            events = Producer(
                channel, exchange=self.exchange, serializer=self.serializer, auto_declare=False
            )
            if settings_of(self.app).declare:
                events.declare()  # once per channel, instead of a cache lookup per event
            self._producers[raw] = events
        return events

    def publish(
        self,
        type: str,
        fields: dict[str, Any],
        producer: Producer,
        blind: bool = False,
        Event: Any = Event,
        **kwargs: Any,
    ) -> None:
        """Publish the event once, unconfirmed; never raise (the task was confirmed).

        Celery's own publish holds the dispatcher's lock around a publish without a timeout;
        here each thread writes on the connection it holds, within the publish timeout, and
        without Celery's publish retry: a lost event is not worth a reconnect loop.
        """
        event = Event(
            type,
            hostname=self.hostname,
            utcoffset=utcoffset(),
            pid=self.pid,
            clock=None if blind else self.clock.forward(),
            **fields,
        )
        try:
            self.producer_for(producer).publish(
                event,
                routing_key=type.replace("-", "."),
                headers=self.headers,
                delivery_mode=self.delivery_mode,
                retry=False,
                timeout=settings_of(self.app).publish_timeout,
                user_id=broker_user(self.app),
            )
        except Exception as exc:  # monitoring data: it must never fail a confirmed publish
            logger.warning("task-sent event of %s not sent: %r", fields.get("uuid"), exc)
            # A write that failed or timed out leaves the socket unusable: drop the connection
            # (no closing handshake) so that the pool's next publish reconnects.
            connection = producer.connection
            if connection is not None:
                connection.collect()
