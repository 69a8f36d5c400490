"""Legacy messages translated without a broker: keys per spec, the queue, the request ID, data."""

from __future__ import annotations

import re
from typing import Any

import pytest

from mcard_tasks.errors import InvalidLegacyMessageError
from mcard_tasks.legacy import describe, translate
from mcard_tasks.payloads import SingleBurnRequest
from mcard_tasks.specs import TaskSpec, register, spec_for

BURN = {"card_id": "card-1", "owner": "alice"}


@pytest.mark.parametrize(
    ("key", "queue"),
    [
        ("mcard.single_mint", "mcard.single_mint"),
        ("mcard_single_mint", "mcard.single_mint"),
        ("mcard.mint", "mcard.mint"),
        ("mcard_mint", "mcard.mint"),
        ("mcard.single_burn", "mcard.single_burn"),
        ("mcard_single_burn", "mcard.single_burn"),
        ("mcard_burn", "mcard.single_burn"),
    ],
)
def test_every_key_of_a_kind_names_that_kind_on_its_own_queue(key: str, queue: str) -> None:
    data: dict[str, Any] = (
        {"card_ids": ["c-1"], "owner": "bob"} if queue == "mcard.mint" else dict(BURN)
    )
    request = translate({"key": key, "data": data, "request_id": "r-1"}, queue)
    assert (request.spec.name, request.key, request.request_id) == (queue, key, "r-1")
    assert request.payload.model_dump(exclude_unset=True) == data


def test_every_problem_of_a_bad_message_is_named_at_once() -> None:
    with pytest.raises(InvalidLegacyMessageError) as caught:
        translate({"key": "mcard_burn", "data": {"owner": 1}, "extra": 1}, "mcard.single_burn")
    problems = caught.value.problems
    assert [problem.split(":")[0] for problem in problems] == [
        "extra",
        "request_id",
        "data.owner",
        "data.card_id",
    ], problems
    assert "request_id: is required" in problems and "data.card_id: is required" in problems
    assert str(caught.value).startswith("invalid legacy message: ")


@pytest.mark.parametrize(
    ("body", "queue", "problem"),
    [
        ({"key": "mcard_burn", "data": BURN, "request_id": "r"}, "mcard.single_mint", "is for"),
        ({"key": 7, "data": BURN, "request_id": "r"}, "mcard.single_burn", "unknown key 7"),
        ({"data": BURN, "request_id": "r"}, "mcard.single_burn", "key: is required"),
        ({"key": "mcard_burn", "data": BURN, "request_id": ""}, "mcard.single_burn", "1 to 128"),
        ({"key": "mcard_burn", "data": "x", "request_id": "r"}, "mcard.single_burn", "got string"),
        ([1, 2], "mcard.single_burn", "body: must be a JSON object (got array)"),
        (None, "mcard.single_burn", "body: must be a JSON object (got null)"),
    ],
)
def test_a_bad_message_names_its_problem(body: object, queue: str, problem: str) -> None:
    with pytest.raises(InvalidLegacyMessageError, match=re.escape(problem)):
        translate(body, queue)


def test_a_request_id_is_never_generated() -> None:
    with pytest.raises(InvalidLegacyMessageError, match="request_id: is required"):
        translate({"key": "mcard_burn", "data": BURN, "request_id": None}, "mcard.single_burn")


def test_a_legacy_key_belongs_to_one_kind() -> None:
    burn = spec_for("mcard.single_burn")
    taken = {**burn.__dict__, "name": "mcard.melt", "command": "melt"}
    with pytest.raises(ValueError, match=r"legacy keys \['mcard_burn'\] are taken"):
        register(TaskSpec(**taken))
    assert burn.payload is SingleBurnRequest


def test_describe_reads_request_id_and_key_from_any_body() -> None:
    assert describe({"key": "mcard_burn", "request_id": "r-1"}) == ("r-1", "mcard_burn")
    assert describe([1]) == (None, None)


def test_a_hostile_body_gets_a_short_reason() -> None:
    fields = {f"f{i}": i for i in range(50)} | {"key": "x" * 10_000}
    with pytest.raises(InvalidLegacyMessageError) as raised:
        translate(fields, "mcard.single_mint")
    assert len(raised.value.problems) == 11
    # 50 unknown fields, the unknown key, no request ID, no data: 53, of which 10 are named
    assert raised.value.problems[-1] == "and 43 more problems"
    assert len(str(raised.value)) < 2_000


def test_dlq_show_names_nothing_for_a_body_nested_past_the_parser() -> None:
    from mcard_tasks.admin import _legacy_names

    assert _legacy_names("[" * 100_000) == (None, None)
