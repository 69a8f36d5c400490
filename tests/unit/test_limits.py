"""Bad input, bounded: the body size and ETA limits at the producer and in the worker's check."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kombu.message import Message

from mcard_tasks import app
from mcard_tasks.config import Settings
from mcard_tasks.errors import EtaTooFarError, InvalidRequestError, MessageTooLargeError
from mcard_tasks.limits import CLOCK_SKEW, delay_of, message_problem, request_body_size
from mcard_tasks.messages import TaskMessages
from mcard_tasks.specs import validate_payload
from mcard_tasks.tasks import mint, single_mint
from tests.fixtures import change_settings

NOW = datetime(2030, 1, 1, tzinfo=UTC)
SETTINGS = Settings(max_body_bytes=64 * 1024, max_eta_seconds=3600)


def largest_valid_mint() -> dict[str, Any]:
    """1,000 IDs of 128 characters, an owner of 128, and 16 KiB of metadata (as canonical
    JSON) that Celery's JSON escapes to three times its size (every character \\u00e9)."""
    return {
        "owner": "o" * 128,
        "card_ids": [f"{i:04d}" + "x" * 124 for i in range(1000)],
        "metadata": {"k": "\u00e9" * ((16 * 1024 - len('{"k":""}')) // 2)},
    }


def test_the_largest_valid_mint_fits_the_default_body_limit() -> None:
    fields = largest_valid_mint()
    payload = validate_payload("mcard.mint", fields)
    message = TaskMessages(app).build(task="mcard.mint", request_id="r" * 128, payload=payload)
    assert len(message.body) == 181_381 < Settings().max_body_bytes == 256 * 1024
    # The producer's measure is the published body, byte for byte.
    assert request_body_size(app, json.loads(message.body)[1]) == len(message.body)


class NoProducer:
    """Fails the test if anything is published."""

    def publish(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("published")


def test_a_producer_refuses_a_body_over_the_limit_before_publishing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    change_settings(monkeypatch, max_body_bytes=4096, check_conflicts=False)
    with pytest.raises(MessageTooLargeError) as caught:
        mint.apply_async(
            kwargs={"owner": "o", "card_ids": [f"card-{i:05d}" for i in range(1000)]},
            task_id="r-1",
            producer=NoProducer(),
        )
    assert isinstance(caught.value, InvalidRequestError)
    assert "body: the task message is 14103 bytes, over MCARD_MAX_BODY_BYTES=4096" in str(
        caught.value
    )


def test_the_message_of_the_bulk_import_and_the_relays_is_refused_over_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    change_settings(monkeypatch, max_body_bytes=4096)
    payload = validate_payload("mcard.mint", {"owner": "o", "card_ids": ["c", "d"]})
    TaskMessages(app).build(task="mcard.mint", request_id="r-1", payload=payload)  # small: fine
    big = validate_payload("mcard.mint", {"owner": "o", "card_ids": [f"c{i}" for i in range(999)]})
    with pytest.raises(MessageTooLargeError, match="over MCARD_MAX_BODY_BYTES=4096"):
        TaskMessages(app).build(task="mcard.mint", request_id="r-1", payload=big)


@pytest.mark.parametrize(
    "options",
    [
        {"countdown": 3601},
        {"eta": datetime.now(UTC) + timedelta(days=400)},
        {"eta": (datetime.now(UTC) + timedelta(hours=2)).isoformat()},
        {"countdown": 10, "eta": datetime.now(UTC) + timedelta(days=2)},
    ],
)
def test_a_producer_refuses_an_eta_or_countdown_beyond_the_limit(options: dict[str, Any]) -> None:
    with pytest.raises(EtaTooFarError) as caught:
        single_mint.apply_async(
            kwargs={"card_id": "c-1", "owner": "o"}, producer=NoProducer(), **options
        )
    field = "countdown" if "countdown" in options and len(options) == 1 else "eta"
    assert f"{field}: " in str(caught.value)
    assert "beyond MCARD_MAX_ETA_SECONDS=3600 s" in str(caught.value)


def test_a_delay_within_the_limit_is_measured_from_now() -> None:
    assert delay_of({}) is None
    assert delay_of({"countdown": 30}) == ("countdown", 30.0)
    field, seconds = delay_of({"eta": "2030-01-01T01:00:00+00:00"}, now=NOW) or ("", 0.0)
    assert (field, seconds) == ("eta", 3600.0)
    assert delay_of({"eta": "2030-01-01T00:30:00"}, now=NOW) == ("eta", 1800.0)  # naive: UTC


def task_message(body: bytes | str, **headers: Any) -> Message:
    return Message(
        body=body,
        headers={"task": "mcard.single_mint", "id": "r-1", **headers},
        content_type="application/json",
        content_encoding="utf-8",
    )


def test_the_worker_refuses_a_body_over_the_limit_without_decoding_it() -> None:
    message = task_message(b"{" * (64 * 1024 + 1))  # not even JSON: never parsed
    assert message_problem(message, SETTINGS, NOW) == (
        "body: the task message is 65537 bytes, over MCARD_MAX_BODY_BYTES=65536"
    )
    assert message._decoded_cache is None
    assert message_problem(task_message(b"[" * (64 * 1024)), SETTINGS, NOW) is None


@pytest.mark.parametrize(
    ("eta", "problem"),
    [
        (None, None),
        ("2030-01-01T01:00:00+00:00", None),
        ((NOW + timedelta(seconds=3600 + CLOCK_SKEW)).isoformat(), None),  # a clock ahead
        ("2030-01-01T02:00:00+00:00", "eta: 7200 s ahead is beyond MCARD_MAX_ETA_SECONDS=3600 s"),
        ("2999-01-01T00:00:00", "eta: 30"),
        ("tomorrow", "eta: "),
        (12, "eta: not an ISO 8601 time: 12"),
    ],
)
def test_the_worker_refuses_an_eta_beyond_the_limit(eta: Any, problem: str | None) -> None:
    found = message_problem(task_message(b"[[], {}, {}]", eta=eta), SETTINGS, NOW)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


def test_the_worker_reads_the_eta_of_a_protocol_1_body() -> None:
    body = json.dumps({"task": "mcard.single_mint", "id": "r", "eta": "2031-01-01T00:00:00"})
    message = Message(body=body.encode(), content_type="application/json", content_encoding="utf-8")
    assert (message_problem(message, SETTINGS, NOW) or "").startswith("eta: ")
    legacy = json.dumps({"key": "mcard.single_mint", "data": {}, "request_id": "r"})
    message = Message(body=legacy.encode(), content_type="application/json")
    assert message_problem(message, SETTINGS, NOW) is None
