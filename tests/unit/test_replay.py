"""What dlq replay may republish, and with which headers and properties, without a broker."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from mcard_tasks import app
from mcard_tasks.deadletter import REASON_HEADER, UNAUTHORIZED_PRODUCER
from mcard_tasks.identity import (
    PRODUCER_HEADER,
    ProducerPolicy,
    letter_producers,
    request_producers,
)
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
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class Delivered:
    headers: dict[str, Any]
    properties: dict[str, Any]


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
    )
    original.headers[PRODUCER_HEADER] = "app"
    fresh = replayed_headers(original)
    celerys = {
        k: v for k, v in original.headers.items() if not k.startswith("x-") and k != "countdown"
    }
    assert fresh == {
        **celerys,
        "retries": 0,
        "eta": None,
        LEGACY_HEADER: "mcard_single_mint",
        PRODUCER_HEADER: "app",
    }
    assert fresh["id"] == "r-1" and fresh["task"] == QUEUE


def test_a_legacy_letter_gets_no_celery_headers() -> None:
    letter = Letter(b"{}", {REASON_HEADER: "r", "x-death": [], PRODUCER_HEADER: "app"})
    assert replayed_headers(letter) == {PRODUCER_HEADER: "app"}


def _policy() -> ProducerPolicy:
    return ProducerPolicy(own="ops", everyone=frozenset({"app"}))


def _dead_lettered_by_the_broker(user: str | None, **headers: Any) -> Letter:
    letter = published(**headers)
    letter.headers.pop(REASON_HEADER)
    letter.headers["x-death"] = [{"queue": QUEUE, "reason": "delivery_limit", "count": 1}]
    letter.properties = {"user_id": user} if user else {}
    return letter


def test_the_producers_of_a_letter_are_the_workers_header_or_the_brokers_user_id() -> None:
    tasks = frozenset({QUEUE})
    made = published(**{PRODUCER_HEADER: "app"})
    made.properties = {"user_id": "worker"}
    assert letter_producers(made, tasks) == ["app"]
    assert letter_producers(published(**{PRODUCER_HEADER: "app,ops"}), tasks) == ["app", "ops"]
    assert letter_producers(published(**{PRODUCER_HEADER: ""}), tasks) == []
    # Dead-lettered by the broker from the task queue: its user_id published it, vouching for
    # the header's names too (a forgery there only adds names that must be allowed).
    forged = _dead_lettered_by_the_broker("eve", **{PRODUCER_HEADER: "app"})
    assert letter_producers(forged, tasks) == ["app", "eve"]
    assert letter_producers(_dead_lettered_by_the_broker(None), tasks) == []
    # An x-death of delayed delivery (not a task queue) does not make the user_id the producer.
    delayed = published(**{PRODUCER_HEADER: "app"})
    delayed.headers["x-death"] = [{"queue": "celery_delayed_3", "reason": "expired"}]
    delayed.properties = {"user_id": "worker"}
    assert letter_producers(delayed, tasks) == ["app"]


@pytest.mark.parametrize(
    ("user", "header", "expected"),
    [
        ("app", None, "app"),  # a producer's message
        ("worker", "app", "app"),  # the worker's retry of it: the header it wrote
        ("ops", "app", "app,ops"),  # an operator's replay of it: both vouch
        ("app", "eve", "app,eve"),  # a producer naming another: both must be allowed
        ("worker", None, "worker"),  # the worker's user published it (one user for all)
        ("worker", "", "worker"),
        (None, None, ""),
        (None, "", ""),
    ],
)
def test_what_the_worker_republishes_names_every_producer_of_the_request(
    user: str | None, header: str | None, expected: str
) -> None:
    headers = {} if header is None else {PRODUCER_HEADER: header}
    message = Delivered(headers, {"user_id": user} if user else {})
    assert request_producers(message, "worker") == expected


@pytest.mark.parametrize(
    ("letter", "problem"),
    [
        (published(**{PRODUCER_HEADER: "eve"}), "user 'eve' may not publish mcard.single_mint"),
        (published(**{PRODUCER_HEADER: ""}), "has no user_id"),
        (published(), "has no user_id"),
        (_dead_lettered_by_the_broker("eve", **{PRODUCER_HEADER: "app"}), "user 'eve'"),
        (_dead_lettered_by_the_broker("app", **{PRODUCER_HEADER: "eve"}), "user 'eve'"),
        (_dead_lettered_by_the_broker(None), "has no user_id"),
    ],
)
def test_with_mcard_producers_a_letter_of_an_unlisted_producer_is_never_replayed(
    letter: Letter, problem: str
) -> None:
    found = replay_problem(letter, QUEUE, _policy())
    assert found is not None and problem in found and "never replayed" in found, found
    assert replay_problem(letter, QUEUE) is None  # without MCARD_PRODUCERS: the worker checks


def test_with_mcard_producers_a_listed_producers_letter_is_replayed() -> None:
    assert replay_problem(published(**{PRODUCER_HEADER: "app"}), QUEUE, _policy()) is None
    assert replay_problem(_dead_lettered_by_the_broker("app"), QUEUE, _policy()) is None


@pytest.mark.parametrize(
    ("user", "header", "task", "refused"),
    [
        ("app", None, QUEUE, None),
        ("eve", None, QUEUE, "user 'eve' may not publish mcard.single_mint"),
        (None, None, QUEUE, "has no user_id"),
        ("ops", "app", QUEUE, None),  # a replay of app's request
        ("ops", "eve", QUEUE, "user 'eve' may not publish mcard.single_mint (the request's"),
        ("ops", "app,eve", QUEUE, "user 'eve' may not publish mcard.single_mint (the request's"),
        ("ops", "app,ops", QUEUE, None),
        ("ops", "", QUEUE, "has no user_id (MCARD_PRODUCERS is set"),
        ("app", None, None, None),  # a legacy message: its task is checked once translated
        ("eve", None, None, "user 'eve' may not publish any task"),
        ("burner", None, None, None),
        ("burner", None, QUEUE, "user 'burner' may not publish mcard.single_mint"),
    ],
)
def test_the_worker_checks_the_user_id_and_a_replays_original_producer(
    user: str | None, header: str | None, task: str | None, refused: str | None
) -> None:
    burners = {"mcard.single_burn": frozenset({"burner"})}
    policy = ProducerPolicy(own="ops", everyone=frozenset({"app"}), per_task=burners)
    headers = {} if header is None else {PRODUCER_HEADER: header}
    message = Delivered(headers, {"user_id": user} if user else {})
    found = policy.message_refusal(message, task)
    if refused is None:
        assert found is None
    else:
        assert found is not None and found.startswith(UNAUTHORIZED_PRODUCER) and refused in found


def test_user_id_is_never_copied() -> None:
    properties = {"user_id": "alice", "correlation_id": "r-1", "reply_to": "q", "expiration": "1"}
    assert replayed_properties(properties) == {"correlation_id": "r-1", "reply_to": "q"}
