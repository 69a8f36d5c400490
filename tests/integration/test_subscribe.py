"""events.subscribe on the real broker: malformed events are skipped and counted, a forged event
cannot suppress the real one, and ``publishers=`` keeps only the workers' events."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kombu import Connection, Producer

from mcard_tasks import app
from mcard_tasks.events import Event, Subscription, subscribe
from mcard_tasks.tasks import single_mint
from mcard_tasks.topology import EVENTS_EXCHANGE
from tests.fixtures import Worker, use_ledger

pytestmark = pytest.mark.integration
KEY = "mcard.single_mint.succeeded"


@contextmanager
def event_publisher() -> Iterator[Callable[..., None]]:
    """Publish bytes on the events exchange, as a broken or forging publisher would; one
    channel, so the events arrive in the order published."""
    with Connection(app.conf.broker_url, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.default_channel)

        def publish(body: bytes, content_type: str = "application/json", **properties: Any) -> None:
            producer.publish(
                body,
                exchange=EVENTS_EXCHANGE.name,
                routing_key=KEY,
                content_type=content_type,
                content_encoding="utf-8",
                serializer=None,
                delivery_mode=2,
                **properties,
            )

        yield publish


def started(**options: Any) -> Subscription:
    """A subscription whose queue is bound (the first next() declares it)."""
    subscription = subscribe(app, "mcard.single_mint.*", timeout=0.2, **options)
    assert next(subscription) is None
    return subscription


def events_of(
    subscription: Subscription, request_id: str, done: Callable[[list[Event]], bool]
) -> list[Event]:
    """The events of request_id the subscription yields until done(them), within 30 s."""
    found: list[Event] = []
    deadline = time.monotonic() + 30
    for event in subscription:
        if event is not None and event.request_id == request_id:
            found.append(event)
        if done(found):
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for the events of {request_id}: {found}")
    raise AssertionError("unreachable")


def test_malformed_events_are_skipped_and_counted_and_a_forged_one_hides_no_real_event(
    sqlite_url: str, make_worker: Callable[..., Worker], caplog: pytest.LogCaptureFixture
) -> None:
    make_worker(sqlite_url, "subscribe").start()
    use_ledger(sqlite_url)
    request_id, card = f"sub-{uuid.uuid4().hex}", f"card-{uuid.uuid4().hex}"
    forged = {"request_id": request_id, "outcome": "rejected", "reason": "forged"}
    with started() as subscription, caplog.at_level(logging.WARNING, "mcard_tasks.events"):
        with event_publisher() as publish:
            publish(b"\xff\xfe not json at all", message_id=request_id)
            publish(b"secret text/plain body", content_type="text/plain", message_id=request_id)
            publish(b"[1, 2]", message_id=request_id)  # JSON, but not an object
            publish(json.dumps(forged).encode(), message_id=request_id)  # first, same ID
        real = single_mint.delay(card_id=card, owner="o", request_id=request_id)
        outcome = real.get(timeout=30, interval=0.05)
        events = events_of(
            subscription, request_id, lambda got: any(e.outcome == outcome for e in got)
        )
        assert subscription.malformed == 3
    assert [e.outcome for e in events] == [forged, outcome]
    assert events[1].routing_key == KEY
    warnings = [r.getMessage() for r in caplog.records if "malformed event" in r.getMessage()]
    assert len(warnings) == 3
    assert not any("secret" in w or "not json" in w for w in warnings), "no body in the log"


def test_publishers_keeps_only_events_of_the_workers_broker_user_and_drops_copies() -> None:
    request_id = f"pub-{uuid.uuid4().hex}"
    real = {"request_id": request_id, "outcome": "succeeded", "reason": None}
    forged = dict(real, outcome="rejected", reason="forged")
    marker = dict(real, detail="marker")
    with started(publishers=["guest"]) as subscription:
        with event_publisher() as publish:
            publish(json.dumps(forged).encode(), message_id=request_id)  # no user_id
            for _ in range(2):  # the relay's identical repeat after a crash: dropped
                publish(json.dumps(real).encode(), message_id=request_id, user_id="guest")
            publish(json.dumps(marker).encode(), message_id=request_id, user_id="guest")
        events = events_of(subscription, request_id, lambda got: len(got) >= 2)
        assert [e.outcome for e in events] == [real, marker]
        assert (subscription.foreign, subscription.duplicates, subscription.malformed) == (1, 1, 0)
