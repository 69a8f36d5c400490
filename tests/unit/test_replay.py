"""What dlq replay may republish, and with which headers and properties, without a broker."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from mcard_tasks import app
from mcard_tasks.deadletter import REASON_HEADER, UNAUTHORIZED_PRODUCER
from mcard_tasks.legacy import LEGACY_HEADER
from mcard_tasks.messages import task_message
from mcard_tasks.payloads import SingleMintRequest
from mcard_tasks.replay import replay_problem, replayed_headers, replayed_properties

QUEUE = "mcard.single_mint"


@dataclass
class Letter:
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"


def published(**headers: Any) -> Letter:
    """The very message delay() publishes, dead-lettered with a reason (and more headers)."""
    message = task_message(
        app, task=QUEUE, request_id="r-1", payload=SingleMintRequest(card_id="c-1", owner="a")
    )
    body = message.body if isinstance(message.body, bytes) else message.body.encode()
    reason = {REASON_HEADER: "LedgerUnavailableError: down"}
    return Letter(body, {**message.headers, **reason, **headers})


def with_body(args: Any, kwargs: Any, **headers: Any) -> Letter:
    letter = published(**headers)
    letter.body = json.dumps([args, kwargs, {}]).encode()
    return letter


def test_what_delay_publishes_may_be_replayed() -> None:
    assert replay_problem(published(), QUEUE) is None


def test_a_valid_legacy_letter_may_be_replayed() -> None:
    body = {"key": "mcard_single_mint", "data": {"card_id": "c", "owner": "a"}, "request_id": "r"}
    assert replay_problem(Letter(json.dumps(body).encode()), QUEUE) is None


@pytest.mark.parametrize(
    ("letter", "problem"),
    [
        (published(id="has space"), "id: must be"),
        (published(id=None), "id: must be a string"),
        (published(task="mcard.nope"), "unknown task 'mcard.nope'"),
        (published(task="mcard.single_burn"), "belongs to queue mcard.single_burn"),
        (with_body(["c-1"], {"owner": "a"}), "args: positional"),
        (with_body([], ["c-1"]), "kwargs: must be a JSON object"),
        (with_body([], {"card_id": "c-1", "owner": "a", "x": 1}), "x: is not a field"),
        (with_body([], {"card_id": "c-1"}), "owner: is required"),
        (Letter(b"[]", {"task": QUEUE, "id": "r"}), "must be a task message"),
        (Letter(b"\xff", {"task": QUEUE, "id": "r"}), "body: not JSON"),
        (Letter(b"{", {"task": QUEUE, "id": "r"}), "body: not JSON"),
        (Letter(b"[" * 100_000, {"task": QUEUE, "id": "r"}), "body: not JSON"),
        (Letter(b"{}", {}, "application/x-python-serialize"), "content type"),
        (Letter(b'{"key": "mcard_burn"}'), "invalid legacy message"),
        (
            published(**{REASON_HEADER: f"{UNAUTHORIZED_PRODUCER}: user 'm'"}),
            f"dead-lettered as {UNAUTHORIZED_PRODUCER!r}: never replayed",
        ),
    ],
)
def test_what_a_producer_would_refuse_is_refused_with_the_reason(
    letter: Letter, problem: str
) -> None:
    found = replay_problem(letter, QUEUE)
    assert found is not None and problem in found, found


def test_a_replay_starts_afresh_keeping_the_request_id_and_celerys_headers() -> None:
    original = published(
        retries=5,
        eta="2999-01-01T00:00:00+00:00",
        countdown=10,
        **{
            "x-death": [{"count": 1}],
            "x-delivery-count": 3,
            "x-first-death-reason": "rejected",
            "x-mcard-other": "x",
            LEGACY_HEADER: "mcard_single_mint",
        },
    ).headers
    fresh = replayed_headers(original)
    celerys = {k: v for k, v in original.items() if not k.startswith("x-") and k != "countdown"}
    assert fresh == {**celerys, "retries": 0, "eta": None, LEGACY_HEADER: "mcard_single_mint"}
    assert fresh["id"] == "r-1" and fresh["task"] == QUEUE


def test_a_legacy_letter_gets_no_celery_headers() -> None:
    assert replayed_headers({REASON_HEADER: "r", "x-death": []}) == {}


def test_user_id_is_never_copied() -> None:
    properties = {"user_id": "alice", "correlation_id": "r-1", "reply_to": "q", "expiration": "1"}
    assert replayed_properties(properties) == {"correlation_id": "r-1", "reply_to": "q"}
