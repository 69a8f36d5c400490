"""Outcome events on mcard.events: once per outcome, none on replay, none lost to a SIGKILL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import pytest

from mcard_tasks.ledger import get_ledger
from mcard_tasks.tasks import single_burn, single_mint
from tests.fixtures import Subscriber, Worker, recorded, use_ledger, wait_for
from tests.integration.test_faults import assert_each_minted_exactly_once, send_mints

pytestmark = pytest.mark.integration


def test_each_outcome_is_published_once_and_a_replay_publishes_nothing(
    stack: Worker, subscriber: Callable[[str], Subscriber]
) -> None:
    everything, rejections = subscriber("mcard.#"), subscriber("mcard.*.rejected")
    card = f"card-{uuid.uuid4().hex}"
    minted = single_mint.delay(card_id=card, owner="alice", request_id=f"ev-{uuid.uuid4().hex}")
    first = minted.get(timeout=20, interval=0.05)
    refused = single_burn.delay(card_id=card, owner="mallory").get(timeout=20, interval=0.05)
    replay = single_mint.delay(card_id=card, owner="alice", request_id=minted.id)
    assert replay.get(timeout=20, interval=0.05) == first
    marker = single_burn.delay(card_id=card, owner="alice")  # its event comes after any replay's
    marker.get(timeout=20, interval=0.05)
    wait_for(
        lambda: everything.collect() and marker.id in everything.by_request(),
        20,
        "the marker's event",
    )

    # The ledger is shared by the session's tests: events of earlier outcomes may come too.
    ours = {minted.id, refused["request_id"], marker.id}
    events = {rid: copies for rid, copies in everything.by_request().items() if rid in ours}
    assert sorted(events) == sorted(ours)
    assert all(len(copies) == 1 for copies in events.values()), "one event per outcome"
    (mint_event,) = events[minted.id]
    assert mint_event.delivery_info["routing_key"] == "mcard.single_mint.succeeded"
    assert json.loads(mint_event.body) == first
    assert mint_event.delivery_info["exchange"] == "mcard.events"
    assert mint_event.properties["delivery_mode"] == 2
    wait_for(
        lambda: rejections.collect() and refused["request_id"] in rejections.by_request(),
        20,
        "the rejection event",
    )
    keys = {m.delivery_info["routing_key"].rsplit(".", 1)[1] for m in rejections.messages}
    assert keys == {"rejected"}
    assert minted.id not in rejections.by_request()


def test_no_outcome_misses_its_event_when_the_worker_is_killed_mid_stream(
    postgresql_url: str,
    make_worker: Callable[..., Worker],
    subscriber: Callable[[str], Subscriber],
) -> None:
    use_ledger(postgresql_url)
    ledger = get_ledger(postgresql_url)
    events = subscriber("mcard.single_mint.*")
    first = make_worker(postgresql_url, "events-kill", pool="prefork", concurrency="2").start()
    sent = send_mints(600)
    wait_for(lambda: recorded(ledger, list(sent)) >= 50, 60, "the stream to start")
    first.kill()
    make_worker(postgresql_url, "events-restarted").start()
    wait_for(lambda: recorded(ledger, list(sent)) == len(sent), 120, "every outcome", every=0.5)
    assert_each_minted_exactly_once(ledger, sent)
    wait_for(
        lambda: events.collect() and set(sent) <= set(events.by_request()),
        60,
        "every outcome's event",
        every=0.5,
    )
    for request_id, copies in events.by_request().items():
        if request_id not in sent:
            continue
        bodies = {bytes(m.body) if not isinstance(m.body, str) else m.body.encode() for m in copies}
        assert len(bodies) == 1, f"copies of {request_id}'s event differ"
        assert json.loads(bodies.pop()) == ledger.outcome(request_id)
