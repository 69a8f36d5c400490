"""Legacy publishers (the seed's shape): plain Kombu messages executed exactly like delay()'s.

Published as the seed describes: an Exchange, a registry of per-queue publisher options
(QUEUE_PUBLISHERS) and Producer.publish(..., declare=[exchange], routing_key=queue).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery.result import AsyncResult
from click.testing import CliRunner
from kombu import Connection, Exchange, Producer

from mcard_tasks import app
from mcard_tasks.cli import main
from mcard_tasks.deadletter import REASON_HEADER
from mcard_tasks.ledger import get_ledger
from mcard_tasks.legacy import LEGACY_HEADER
from mcard_tasks.models import Operation
from mcard_tasks.tasks import TASKS, single_mint
from tests.fixtures import Subscriber, Worker, drain_dlq, wait_for

pytestmark = pytest.mark.integration
__all__ = ["QUEUE_PUBLISHERS", "legacy_publish"]
TIMEOUT = 20

# The seed's publisher, as the old service wrote it.
MCARD = Exchange("mcard", type="topic", durable=True)
_publisher_default_options: dict[str, Any] = {
    "exchange": MCARD,
    "serializer": "json",
    "delivery_mode": 2,
    "declare": [MCARD],
    "retry": True,
}
QUEUE_PUBLISHERS = {
    "mcard.mint": _publisher_default_options,
    "mcard.single_burn": _publisher_default_options,
    "mcard.single_mint": _publisher_default_options,
}


def legacy_publish(queue: str, key: str, data: dict[str, Any], request_id: str) -> None:
    """Publish one message exactly as the seed's publishers do."""
    body = {"key": key, "data": data, "request_id": request_id}
    with Connection(app.conf.broker_url) as connection:
        Producer(connection.default_channel).publish(
            body, routing_key=queue, **QUEUE_PUBLISHERS[queue]
        )


def publish_raw(queue: str, body: bytes, content_type: str = "application/json") -> None:
    """Publish bytes without Celery headers, as a broken legacy publisher would."""
    with Connection(app.conf.broker_url) as connection:
        Producer(connection.default_channel).publish(
            body,
            exchange=MCARD,
            routing_key=queue,
            content_type=content_type,
            content_encoding="utf-8",
            serializer=None,
            delivery_mode=2,
        )


def new(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def the_same_but_names(outcome: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """outcome with its request ID and cards renamed by names, and no recorded_at: what two
    equal requests on other cards must share."""
    text = json.dumps({k: v for k, v in outcome.items() if k != "recorded_at"})
    for name, placeholder in names.items():
        text = text.replace(name, placeholder)
    return dict(json.loads(text))


def operation_row(request_id: str) -> tuple[str, str]:
    with get_ledger(app.settings.database_url).session(readonly=True) as session:
        row = session.get(Operation, request_id)
        assert row is not None, f"no ledger row for {request_id}"
        return row.task, row.status


def legacy_count(queue: str) -> int:
    return get_ledger(app.settings.database_url).legacy_counts().get(queue, 0)


#: (task, key, fields) of every legacy key; {card}, {cards} are filled in per path.
EVERY_KEY = [
    ("mcard.single_mint", "mcard.single_mint", {"card_id": "{card}", "owner": "alice"}),
    ("mcard.single_mint", "mcard_single_mint", {"card_id": "{card}", "owner": "alice"}),
    ("mcard.mint", "mcard.mint", {"card_ids": ["{card}", "{card}-2"], "owner": "bob"}),
    ("mcard.mint", "mcard_mint", {"card_ids": ["{card}", "{card}-2"], "owner": "bob"}),
    ("mcard.single_burn", "mcard.single_burn", {"card_id": "{card}", "owner": "carol"}),
    ("mcard.single_burn", "mcard_single_burn", {"card_id": "{card}", "owner": "carol"}),
    ("mcard.single_burn", "mcard_burn", {"card_id": "{card}", "owner": "carol"}),
    ("mcard.single_burn", "mcard_burn", {"card_id": "{card}", "owner": "mallory"}),  # rejected
]


def fill(fields: dict[str, Any], card: str) -> dict[str, Any]:
    return dict(json.loads(json.dumps(fields).replace("{card}", card)))


def send(path: str, task: str, key: str, fields: dict[str, Any]) -> tuple[str, str, Any]:
    """One request through path (legacy or delay) on a fresh card: its ID, card, outcome."""
    request_id, card = new(f"{path}-r"), new(f"{path}-card")
    if task == "mcard.single_burn":  # a card for carol to burn
        single_mint.delay(card_id=card, owner="carol").get(timeout=TIMEOUT)
    if path == "legacy":
        legacy_publish(task, key, fill(fields, card), request_id)
    else:
        TASKS[task].delay(request_id=request_id, **fill(fields, card))
    return request_id, card, AsyncResult(request_id, app=app).get(timeout=TIMEOUT, interval=0.05)


@pytest.mark.parametrize(
    ("task", "key", "fields"), EVERY_KEY, ids=[f"{k[1]}-{k[2]['owner']}" for k in EVERY_KEY]
)
def test_every_legacy_key_is_executed_like_the_same_request_sent_with_delay(
    stack: Worker,
    subscriber: Callable[[str], Subscriber],
    task: str,
    key: str,
    fields: dict[str, Any],
) -> None:
    events = subscriber("mcard.#")
    legacy_id, legacy_card, legacy = send("legacy", task, key, fields)
    delay_id, delay_card, delayed = send("delay", task, key, fields)
    assert the_same_but_names(legacy, {legacy_id: "R", legacy_card: "C"}) == (
        the_same_but_names(delayed, {delay_id: "R", delay_card: "C"})
    )
    assert operation_row(legacy_id) == operation_row(delay_id)
    wait_for(lambda: {legacy_id, delay_id} <= set(_ids(events.collect())), TIMEOUT, "events")
    sent = {m.properties["message_id"]: m for m in events.messages}
    assert json.loads(sent[legacy_id].body) == legacy, "the event body is the outcome"
    assert (
        sent[legacy_id].delivery_info["routing_key"]
        == (sent[delay_id].delivery_info["routing_key"])
    )
    assert _ids(events.messages).count(legacy_id) == 1


def _ids(messages: list[Any]) -> list[str]:
    return [m.properties["message_id"] for m in messages]


def test_mcard_tasks_status_prints_a_legacy_requests_outcome(stack: Worker) -> None:
    request_id, card = new("st"), new("card")
    legacy_publish(
        "mcard.single_mint", "mcard_single_mint", {"card_id": card, "owner": "a"}, request_id
    )
    outcome = AsyncResult(request_id, app=app).get(timeout=TIMEOUT, interval=0.05)
    result = CliRunner().invoke(main, ["status", request_id])
    assert result.exit_code == 0 and json.loads(result.output) == outcome
    assert outcome["outcome"] == "succeeded" and outcome["card_ids"] == [card]


@pytest.mark.parametrize("legacy_first", [True, False], ids=["legacy-first", "delay-first"])
def test_one_request_sent_through_both_paths_is_one_request(
    stack: Worker, subscriber: Callable[[str], Subscriber], legacy_first: bool
) -> None:
    events = subscriber("mcard.#")
    request_id, fields = new("both"), {"card_id": new("card"), "owner": "alice"}
    sends = [
        lambda: legacy_publish("mcard.single_mint", "mcard.single_mint", fields, request_id),
        lambda: single_mint.delay(request_id=request_id, **fields),
    ]
    for send in sends if legacy_first else sends[::-1]:
        send()
        first = AsyncResult(request_id, app=app).get(timeout=TIMEOUT, interval=0.05)
    marker = single_mint.delay(card_id=new("marker"), owner="alice")  # ordered after both
    marker.get(timeout=TIMEOUT, interval=0.05)
    wait_for(lambda: marker.id in _ids(events.collect()), TIMEOUT, "the marker's event")
    assert _ids(events.messages).count(request_id) == 1, "one outcome, one event"
    assert get_ledger(app.settings.database_url).outcome(request_id) == first


def test_another_payload_under_a_legacy_request_id_is_a_conflict_and_the_first_outcome_stays(
    stack: Worker,
) -> None:
    drain_dlq("mcard.single_mint")
    request_id, card, other = new("cf"), new("card"), new("card")
    first = single_mint.delay(card_id=card, owner="alice", request_id=request_id).get(
        timeout=TIMEOUT
    )
    legacy_publish(
        "mcard.single_mint", "mcard_single_mint", {"card_id": other, "owner": "alice"}, request_id
    )
    letter = wait_for(lambda: _letter_of(request_id), TIMEOUT, "the conflict's dead letter")
    assert "conflict" in letter.headers[REASON_HEADER]
    assert letter.headers[LEGACY_HEADER] == "mcard_single_mint"
    ledger = get_ledger(app.settings.database_url)
    assert ledger.outcome(request_id) == first
    assert ledger.card(other) is None


def _letter_of(request_id: str, queue: str = "mcard.single_mint") -> Any:
    found = [m for m in drain_dlq(queue) if (m.headers or {}).get("id") == request_id]
    return found[0] if found else None


def body(key: str = "mcard.single_mint", *, drop: str = "", **changes: Any) -> dict[str, Any]:
    """A legacy body with a fresh request ID and card, changed as a bad publisher would."""
    data = {"card_id": new("card"), "owner": "alice"}
    fields: dict[str, Any] = {"key": key, "data": data, "request_id": new("bad")}
    fields.update(changes)
    fields.pop(drop, None)
    return fields


#: (case, queue, raw body, content type, what the reason must say)
BAD: list[tuple[str, str, bytes, str, str]] = [
    (
        "key of another queue",
        "mcard.single_mint",
        json.dumps(body("mcard_burn")).encode(),
        "application/json",
        "'mcard_burn' is for queue mcard.single_burn, not mcard.single_mint",
    ),
    (
        "unknown key",
        "mcard.single_mint",
        json.dumps(body("mcard_melt")).encode(),
        "application/json",
        "key: unknown key 'mcard_melt'",
    ),
    (
        "no request ID",
        "mcard.single_mint",
        json.dumps(body(drop="request_id")).encode(),
        "application/json",
        "request_id: is required",
    ),
    (
        "invalid request ID",
        "mcard.single_mint",
        json.dumps(body(request_id="white space")).encode(),
        "application/json",
        "request_id: must be 1 to 128 characters",
    ),
    (
        "request ID not a string",
        "mcard.single_mint",
        json.dumps(body(request_id=42)).encode(),
        "application/json",
        "request_id: must be a string",
    ),
    (
        "missing field",
        "mcard.single_mint",
        json.dumps(body(data={"card_id": new("card")})).encode(),
        "application/json",
        "data.owner: is required",
    ),
    (
        "invalid field",
        "mcard.single_mint",
        json.dumps(body(data={"card_id": "a card", "owner": "alice"})).encode(),
        "application/json",
        "data.card_id: must be 1 to 128 characters",
    ),
    (
        "unknown field",
        "mcard.single_mint",
        json.dumps(body(data={"card_id": new("card"), "owner": "a", "colour": "red"})).encode(),
        "application/json",
        "data.colour: is not a field of this request",
    ),
    (
        "no data",
        "mcard.single_mint",
        json.dumps(body(drop="data")).encode(),
        "application/json",
        "data: is required",
    ),
    (
        "data not an object",
        "mcard.single_mint",
        json.dumps(body(data=["c", "alice"])).encode(),
        "application/json",
        "data: must be a JSON object of the fields (got array)",
    ),
    (
        "unknown top-level field",
        "mcard.single_mint",
        json.dumps(body(timestamp=1)).encode(),
        "application/json",
        "timestamp: is not a field of a legacy message",
    ),
    (
        "body not a JSON object",
        "mcard.single_burn",
        json.dumps(["mcard_burn", {"card_id": "c", "owner": "o"}, "r-1"]).encode(),
        "application/json",
        "body: must be a JSON object (got array)",
    ),
    (
        "undecodable body",
        "mcard.single_mint",
        b'{"key": "mcard.single_mint", "data": {',
        "application/json",
        "undecodable body",
    ),
]


@pytest.mark.parametrize(
    ("case", "queue", "raw", "content_type", "reason"), BAD, ids=[b[0] for b in BAD]
)
def test_a_bad_legacy_message_is_dead_lettered_with_its_reason_and_has_no_effect(
    stack: Worker, case: str, queue: str, raw: bytes, content_type: str, reason: str
) -> None:
    drain_dlq(queue)
    publish_raw(queue, raw, content_type)
    letters: list[Any] = []
    wait_for(lambda: letters.extend(drain_dlq(queue)) or letters, TIMEOUT, f"the letter ({case})")
    assert [_raw(m.body) for m in letters] == [raw], "the original, unchanged"
    assert reason in letters[0].headers[REASON_HEADER], letters[0].headers[REASON_HEADER]
    assert_no_effect(raw)


def _raw(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else bytes(body)


def assert_no_effect(raw: bytes) -> None:
    """Neither the request ID nor the card of a (bad) legacy body is in the ledger."""
    try:
        sent = json.loads(raw)
    except ValueError:
        return  # undecodable: it names nothing that could have had an effect
    ledger = get_ledger(app.settings.database_url)
    if isinstance(sent, dict) and isinstance(sent.get("request_id"), str):
        assert ledger.outcome(sent["request_id"]) is None, "no ledger row"
    data = sent.get("data") if isinstance(sent, dict) else None
    if isinstance(data, dict) and isinstance(data.get("card_id"), str):
        assert ledger.card(data["card_id"]) is None, "no card"


def test_mcard_tasks_queues_counts_the_legacy_messages_each_queue_executed(
    stack: Worker,
) -> None:
    before = legacy_count("mcard.single_mint")
    for key in ("mcard.single_mint", "mcard_single_mint"):
        request_id = new("count")
        legacy_publish("mcard.single_mint", key, {"card_id": new("card"), "owner": "a"}, request_id)
        AsyncResult(request_id, app=app).get(timeout=TIMEOUT, interval=0.05)
    single_mint.delay(card_id=new("card"), owner="a").get(timeout=TIMEOUT)  # not legacy
    wait_for(lambda: legacy_count("mcard.single_mint") == before + 2, TIMEOUT, "two counted")

    result = CliRunner().invoke(main, ["queues", "--timeout", "0.5"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()}
    assert rows["queue"][-1] == "legacy"
    assert rows["mcard.single_mint"][-1] == str(before + 2)
    assert rows["mcard.single_mint.dlq"][-1] == "-"
