"""The raw limit of a worker on this machine: a bare py-amqp consumer on mcard's own quorum
queue that applies the very requests mcard-tasks drains, 250 per PostgreSQL transaction
(their cards, operations and outbox rows, one multi-row INSERT each), and acks each 250 with
one multiple-ack. No validation, no rules, no events, no Celery: what mcard's worker could
at best approach.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from bench.common import raw_connection, wait_until

__all__ = ["drain_raw_consumer"]

QUEUE = "mcard.single_mint"
BATCH = 250

_CARDS = (
    "INSERT INTO cards (card_id, owner, metadata, status, minted_by, minted_at)"
    " VALUES (%s, %s, NULL, 'active', %s, %s)"
)
_OPERATIONS = (
    "INSERT INTO operations (request_id, task, fingerprint, status, outcome, recorded_at)"
    " VALUES (%s, 'mcard.single_mint', %s, 'succeeded', %s, %s)"
)
_OUTBOX = (
    "INSERT INTO outbox (request_id, routing_key, body, created_at)"
    " VALUES (%s, 'mcard.single_mint.succeeded', %s, %s)"
)


def _apply(db: Any, messages: list[Any]) -> None:
    """One transaction: the effects, claims and events of the messages' requests."""
    at = datetime.now(UTC)
    cards, operations, events = [], [], []
    for message in messages:
        request_id = message.headers["id"]
        body = message.body if isinstance(message.body, bytes) else message.body.encode()
        fields = json.loads(body)[1]
        outcome = json.dumps({"request_id": request_id, "outcome": "succeeded", **fields})
        digest = hashlib.sha256(body).hexdigest()
        cards.append((fields["card_id"], fields["owner"], request_id, at))
        operations.append((request_id, digest, outcome, at))
        events.append((request_id, outcome, at))
    with db.transaction(), db.cursor() as cursor:
        cursor.executemany(_CARDS, cards)
        cursor.executemany(_OPERATIONS, operations)
        cursor.executemany(_OUTBOX, events)


def drain_raw_consumer(vhost: str, database_url: str, count: int, timeout: float) -> float:
    """Drain count queued requests; the seconds from the first delivery to the last ack."""
    import psycopg

    pending: list[Any] = []
    done = 0
    started: list[float] = []
    connection = raw_connection(vhost, timeout=timeout)
    try:
        with psycopg.connect(database_url, autocommit=True) as db:
            channel = connection.channel()
            channel.basic_qos(0, 2 * BATCH, False)

            def on_message(message: Any) -> None:
                if not started:
                    started.append(time.perf_counter())
                pending.append(message)

            channel.basic_consume(QUEUE, callback=on_message)

            def drained() -> bool:
                nonlocal done
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.05)
                if len(pending) >= BATCH or (pending and done + len(pending) >= count):
                    _apply(db, pending)
                    channel.basic_ack(pending[-1].delivery_tag, multiple=True)
                    done += len(pending)
                    pending.clear()
                return done >= count

            wait_until(drained, timeout, f"raw consumer: {count} requests", every=0)
            return time.perf_counter() - started[0]
    finally:
        connection.close()
