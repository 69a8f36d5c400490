"""A publisher that pipelines: one connection, one channel in confirm mode, and a window of
messages in flight whose confirms are collected as they arrive (not one round trip each).

Used by the bulk import and by the outbox relay. Each message is published under a key (its
request ID); the caller hears which keys the broker confirmed and which it refused.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from amqp.exceptions import AMQPError
from celery import Celery
from kombu.exceptions import KombuError
from kombu.exceptions import OperationalError as KombuOperationalError

from mcard_tasks.config import settings_of
from mcard_tasks.identity import broker_user

__all__ = ["BROKER_ERRORS", "IDLE_REOPEN", "ConfirmWindow", "publish_confirmed"]

#: Called with the keys the broker settled, and whether it refused them (nack).
OnSettled = Callable[[list[str], bool], None]
#: What an unreachable, failing or silent broker raises here (a confirm timeout is an OSError).
BROKER_ERRORS: tuple[type[Exception], ...] = (OSError, AMQPError, KombuError)
#: Seconds of idleness after which a window's connection is replaced before publishing: it
#: has no heartbeats and may have been cut silently (a NAT or load balancer timeout).
IDLE_REOPEN = 30.0


def publish_confirmed(app: Celery, body: Any, **options: Any) -> None:
    """One publish on the app's producer pool, confirmed within MCARD_PUBLISH_TIMEOUT, no
    retry. A publish that fails drops its connection (no closing handshake) instead of
    pooling it again: a confirm that comes late would be taken by its next publish."""
    timeout = settings_of(app).publish_timeout
    options.setdefault("user_id", broker_user(app))
    with app.producer_pool.acquire(block=True, timeout=timeout) as producer:
        try:
            producer.publish(body, retry=False, timeout=timeout, confirm_timeout=timeout, **options)
        except BaseException:
            producer.connection.collect()
            raise


class ConfirmWindow:
    """Publishes with confirms collected asynchronously, at most `window` unconfirmed."""

    def __init__(
        self,
        app: Celery,
        on_settled: OnSettled,
        timeout: float,
        window: int,
        purpose: str,
    ) -> None:
        self.app = app
        self.on_settled = on_settled
        self.timeout = timeout
        self.window = window
        self.purpose = purpose
        self.pending: dict[int, str] = {}  # delivery tag -> key, in flight
        self.next_tag = 1
        self.low = 1  # every tag below is settled
        self.blocked: str | None = None
        self.connection: Any = None
        self.channel: Any = None
        self.used_at = 0.0  # time.monotonic() of the last open or publish
        #: Every message's user_id: this process's broker user (RabbitMQ checks it).
        self.user_id = broker_user(app)

    @property
    def is_open(self) -> bool:
        return self.channel is not None

    def abort_if_idle(self) -> None:
        """Drop a connection idle for IDLE_REOPEN (no closing handshake, which a dead
        connection would make us wait for): the next open starts afresh."""
        if self.is_open and time.monotonic() - self.used_at > IDLE_REOPEN:
            self.abort()

    def open(self, declare: Callable[[Any], None] | None = None) -> None:
        """Connect (bounded by the timeout) and open the confirm channel; declare(channel)."""
        options = dict(self.app.conf.broker_transport_options or {})
        properties = dict(options.get("client_properties") or {})
        properties["connection_name"] = (
            f"mcard-tasks {self.purpose} {socket.gethostname()}:{os.getpid()}"
        )
        # Confirms are collected here asynchronously; kombu's confirm_publish would wait for
        # each message in turn.
        options.update(confirm_publish=False, client_properties=properties)
        self.connection = self.app.connection_for_write(transport_options=options)
        try:
            self.connection.ensure_connection(
                max_retries=max(1, len(self.connection.alt)),
                interval_start=0.2,
                interval_step=0.5,
                interval_max=1.0,
                timeout=self.timeout,
            )
        except KombuOperationalError as exc:
            self.connection.collect()
            self.connection = None
            raise ConnectionError(f"cannot reach the broker: {exc}") from exc
        try:
            raw = self.connection.connection
            # Every socket operation (a write blocked by a broker alarm included) is bounded.
            raw.transport.sock.settimeout(self.timeout)
            raw.on_blocked = self._on_blocked
            raw.on_unblocked = self._on_unblocked
            channel = raw.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            if declare is not None:
                declare(channel)
        except BaseException:
            self.abort()  # all or nothing: never a half-open window (or a leaked connection)
            raise
        self.channel = channel
        self.pending.clear()
        self.next_tag = self.low = 1
        self.used_at = time.monotonic()

    def _on_blocked(self, reason: str) -> None:
        self.blocked = reason

    def _on_unblocked(self) -> None:
        self.blocked = None

    def _settle(self, tag: int, multiple: bool, nacked: bool) -> None:
        if multiple:
            settled = [self.pending.pop(t) for t in range(self.low, tag + 1) if t in self.pending]
            self.low = max(self.low, tag + 1)
        else:
            one = self.pending.pop(tag, None)
            settled = [] if one is None else [one]
        if settled:
            self.on_settled(settled, nacked)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, nacked=False)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, nacked=True)

    def publish(
        self,
        key: str,
        body: bytes | str,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any] | None = None,
        **properties: Any,
    ) -> None:
        """Publish one message under key, waiting first if the window is full."""
        if len(self.pending) >= self.window:
            self.wait(self.window - 1)
        properties["user_id"] = self.user_id
        message = self.channel.prepare_message(
            body,
            properties.pop("priority", 0),
            properties.pop("content_type", None),
            properties.pop("content_encoding", None),
            headers or {},
            properties,
        )
        self.channel.basic_publish(message, exchange=exchange, routing_key=routing_key)
        self.pending[self.next_tag] = key
        self.next_tag += 1
        self.used_at = time.monotonic()

    def wait(self, in_flight: int = 0) -> None:
        """Collect confirms until at most in_flight are pending; timeout s without progress
        is a broker failure (TimeoutError)."""
        deadline = time.monotonic() + self.timeout
        while len(self.pending) > in_flight:
            before = len(self.pending)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = f" (the broker blocked publishers: {self.blocked})" if self.blocked else ""
                raise TimeoutError(
                    f"the broker confirmed nothing for {self.timeout:g} s with"
                    f" {len(self.pending)} messages in flight{why}"
                )
            try:
                self.connection.connection.drain_events(timeout=remaining)
            except TimeoutError:
                continue
            if len(self.pending) < before:
                deadline = time.monotonic() + self.timeout

    def abort(self) -> None:
        """Drop the connection without a handshake (it may be mid-frame or dead)."""
        if self.connection is not None:
            self.connection.collect()
        self.connection = self.channel = None

    def close(self) -> None:
        if self.connection is None:
            return
        try:
            self.connection.release()  # the socket timeout bounds the close handshake
        except Exception:
            self.connection.collect()
        self.connection = self.channel = None
