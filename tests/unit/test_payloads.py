"""Validation of every field and limit, without a broker."""

from __future__ import annotations

from typing import Any

import pytest

from mcard_tasks.errors import InvalidRequestError, MCardError
from mcard_tasks.payloads import (
    canonical_json,
    check_request_id,
    fingerprint,
)
from mcard_tasks.request_task import resolve_request_id
from mcard_tasks.specs import validate_payload

MINT, SINGLE_MINT, BURN = "mcard.mint", "mcard.single_mint", "mcard.single_burn"


def problems(task: str, fields: dict[str, Any]) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        validate_payload(task, fields)
    assert isinstance(caught.value, MCardError)
    return str(caught.value)


@pytest.mark.parametrize("field", ["card_id", "owner"])
@pytest.mark.parametrize(
    "value",
    ["", "x" * 129, "a b", "tab\there", "nl\n", "nul\x00", "bell\x07", "\u200bzero-width"],
)
def test_identifiers_break_the_rule_and_the_error_names_the_field(field: str, value: str) -> None:
    fields = {"card_id": "card-1", "owner": "alice", field: value}
    message = problems(SINGLE_MINT, fields)
    assert f"{field}: must be 1 to 128 characters" in message


@pytest.mark.parametrize("value", [1, None, ["a"], b"bytes"])
def test_identifiers_must_be_strings(value: object) -> None:
    assert "card_id:" in problems(BURN, {"card_id": value, "owner": "alice"})


def test_identifiers_at_the_limits_are_accepted() -> None:
    every_char = "AZaz09._:@-"
    for fields in ({"card_id": "x", "owner": "y" * 128}, {"card_id": every_char, "owner": "o"}):
        assert validate_payload(BURN, fields).model_dump() == fields


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("c\u0430rd", "U+0430 CYRILLIC SMALL LETTER A at position 2"),  # looks like "card"
        ("\u0441ard", "U+0441 CYRILLIC SMALL LETTER ES at position 1"),
        ("card\u200b", "U+200B ZERO WIDTH SPACE at position 5"),
        ("ca\u200drd", "U+200D ZERO WIDTH JOINER at position 3"),
        ("\u202ecard", "U+202E RIGHT-TO-LEFT OVERRIDE at position 1"),
        ("card\ufeff", "U+FEFF ZERO WIDTH NO-BREAK SPACE at position 5"),
        ("card\u00a01", "U+00A0 NO-BREAK SPACE at position 5"),
        ("c\uff41rd", "U+FF41 FULLWIDTH LATIN SMALL LETTER A at position 2"),
        ("cafe\u0301", "U+0301 COMBINING ACUTE ACCENT at position 5"),
        ("caf\u00e9", "U+00E9 LATIN SMALL LETTER E WITH ACUTE at position 4"),
        ("card/1", "U+002F SOLIDUS at position 5"),
        ("nul\x00", "U+0000 (unnamed, category Cc) at position 4"),
    ],
)
@pytest.mark.parametrize("field", ["card_id", "owner"])
def test_a_lookalike_or_invisible_character_is_named_by_code_point_name_and_field(
    field: str, value: str, named: str
) -> None:
    fields = {"card_id": "card-1", "owner": "alice", field: value}
    message = problems(SINGLE_MINT, fields)
    assert f"{field}: must be 1 to 128 characters from A-Z, a-z, 0-9 and . _ : @ -" in message
    assert f"(found {named})" in message


def test_the_identifier_rule_holds_for_every_card_of_a_batch_and_for_request_ids() -> None:
    message = problems(MINT, {"owner": "o", "card_ids": ["card-1", "c\u0430rd-2"]})
    assert "card_ids.1: must be 1 to 128" in message and "U+0430 CYRILLIC SMALL LETTER A" in message
    with pytest.raises(InvalidRequestError, match=r"request_id: .*U\+2011 NON-BREAKING HYPHEN"):
        check_request_id("r\u20111")
    with pytest.raises(InvalidRequestError, match=r"task_id: .*U\+0430 CYRILLIC SMALL LETTER A"):
        resolve_request_id(None, "\u0430")


def test_missing_and_unknown_fields_are_named() -> None:
    message = problems(SINGLE_MINT, {"owner": "alice", "colour": "red"})
    assert "card_id: is required" in message
    assert "colour: is not a field of this request" in message


@pytest.mark.parametrize("metadata", [[1, 2], "text", 3, True])
def test_metadata_must_be_an_object(metadata: object) -> None:
    assert "metadata:" in problems(
        SINGLE_MINT, {"card_id": "c", "owner": "o", "metadata": metadata}
    )


def test_metadata_is_limited_to_16_kib_as_json() -> None:
    at_limit = {"k": "x" * (16 * 1024 - len('{"k":""}'))}
    fields = {"card_id": "c", "owner": "o", "metadata": at_limit}
    assert len(canonical_json(at_limit).encode()) == 16 * 1024
    assert validate_payload(SINGLE_MINT, fields).model_dump() == fields
    over = {"k": "x" * (16 * 1024)}
    assert "at most 16384 bytes" in problems(
        SINGLE_MINT, {"card_id": "c", "owner": "o", "metadata": over}
    )


def test_metadata_must_hold_json_values() -> None:
    message = problems(SINGLE_MINT, {"card_id": "c", "owner": "o", "metadata": {"k": {1, 2}}})
    assert "metadata" in message


def test_a_batch_holds_1_to_1000_distinct_valid_card_ids() -> None:
    assert "card_ids: must hold 1 to 1000" in problems(MINT, {"owner": "o", "card_ids": []})
    too_many = [f"c{i}" for i in range(1001)]
    assert "card_ids: must hold 1 to 1000" in problems(MINT, {"owner": "o", "card_ids": too_many})
    accepted = validate_payload(MINT, {"owner": "o", "card_ids": too_many[:1000]})
    assert accepted.model_dump()["card_ids"] == too_many[:1000]
    assert "repeated: a" in problems(MINT, {"owner": "o", "card_ids": ["a", "b", "a"]})
    assert "card_ids.1: must be 1 to 128" in problems(MINT, {"owner": "o", "card_ids": ["a", " "]})
    assert "card_ids:" in problems(MINT, {"owner": "o", "card_ids": "abc"})


def test_an_unknown_task_is_named() -> None:
    assert "unknown task 'mcard.melt'" in problems("mcard.melt", {})


def test_request_ids_follow_the_identifier_rule() -> None:
    assert check_request_id("r-1") == "r-1"
    for bad in ("", "r 1", "x" * 129, "r\n"):
        with pytest.raises(InvalidRequestError, match="request_id: must be 1 to 128"):
            check_request_id(bad)
    with pytest.raises(InvalidRequestError, match="request_id: must be a string"):
        check_request_id(42)


def test_request_id_and_task_id_must_agree_or_one_is_generated() -> None:
    assert resolve_request_id("r-1", None) == resolve_request_id(None, "r-1") == "r-1"
    assert resolve_request_id("r-1", "r-1") == "r-1"
    with pytest.raises(InvalidRequestError, match="must be equal"):
        resolve_request_id("r-1", "r-2")
    with pytest.raises(InvalidRequestError, match="task_id: must be 1 to 128"):
        resolve_request_id(None, "bad id")
    generated = resolve_request_id(None, None)
    assert generated and generated != resolve_request_id(None, None)


def test_the_fingerprint_tells_payloads_apart_and_ignores_key_order() -> None:
    one = validate_payload(
        SINGLE_MINT, {"card_id": "c", "owner": "o", "metadata": {"a": 1, "b": 2}}
    )
    same = validate_payload(
        SINGLE_MINT, {"owner": "o", "metadata": {"b": 2, "a": 1}, "card_id": "c"}
    )
    other = validate_payload(SINGLE_MINT, {"card_id": "c", "owner": "p"})
    assert fingerprint(SINGLE_MINT, one) == fingerprint(SINGLE_MINT, same)
    assert fingerprint(SINGLE_MINT, one) != fingerprint(SINGLE_MINT, other)
    burn = validate_payload(BURN, {"card_id": "c", "owner": "o"})
    assert fingerprint(BURN, burn) != fingerprint(
        SINGLE_MINT, validate_payload(SINGLE_MINT, {"card_id": "c", "owner": "o"})
    )
