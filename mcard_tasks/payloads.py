"""The request payloads: validation of every field, and the fingerprint of a request."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, ValidationError

from mcard_tasks.errors import InvalidRequestError

__all__ = [
    "MintRequest",
    "Payload",
    "SingleBurnRequest",
    "SingleMintRequest",
    "canonical_json",
    "check_request_id",
    "describe_char",
    "fingerprint",
    "validate_fields",
]

IDENT_MAX = 128
METADATA_MAX_BYTES = 16 * 1024
BATCH_MAX = 1000
#: The identifier rule (card IDs, owners, request IDs): printable ASCII letters, digits and
#: ``. _ : @ -`` only, so no two distinct IDs look alike across scripts (Cyrillic U+0430 beside
#: Latin ``a``) and none hides an invisible character (a zero-width space, a direction mark).
IDENT_CHARS = "A-Z, a-z, 0-9 and . _ : @ -"
IDENT_RULE = f"must be 1 to {IDENT_MAX} characters from {IDENT_CHARS}"
_IDENT = re.compile(rf"[A-Za-z0-9._:@-]{{1,{IDENT_MAX}}}")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9._:@-]")


def canonical_json(value: Any) -> str:
    """The one JSON spelling of a value: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def describe_char(char: str) -> str:
    """A character as an error names it: its code point and Unicode name, e.g.
    ``U+0430 CYRILLIC SMALL LETTER A``."""
    name = unicodedata.name(char, None) or f"(unnamed, category {unicodedata.category(char)})"
    return f"U+{ord(char):04X} {name}"


def _ident_problem(value: str) -> str | None:
    if _IDENT.fullmatch(value):  # the fast path, in C
        return None
    if not 1 <= len(value) <= IDENT_MAX:
        return f"{IDENT_RULE} (got {len(value)} characters)"
    position, char = next((i, ch) for i, ch in enumerate(value) if not _IDENT_CHAR.match(ch))
    return f"{IDENT_RULE} (found {describe_char(char)} at position {position + 1})"


def _check_ident(value: str) -> str:
    problem = _ident_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        size = len(canonical_json(value).encode())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be a JSON object of JSON values ({exc})") from None
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"must be at most {METADATA_MAX_BYTES} bytes as JSON (got {size})")
    return value


def _check_distinct(value: list[str]) -> list[str]:
    seen: set[str] = set()
    repeated = []
    for card in value:
        if card in seen:
            repeated.append(card)
        seen.add(card)
    if repeated:
        raise ValueError(f"must hold distinct card ids (repeated: {', '.join(repeated[:5])})")
    return value


Ident = Annotated[StrictStr, AfterValidator(_check_ident)]
Metadata = Annotated[dict[str, Any] | None, AfterValidator(_check_metadata)]


class Payload(BaseModel):
    """Fields shared by every request kind."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    owner: Ident


class SingleMintRequest(Payload):
    card_id: Ident
    metadata: Metadata = None


class MintRequest(Payload):
    card_ids: Annotated[
        list[Ident], Field(min_length=1, max_length=BATCH_MAX), AfterValidator(_check_distinct)
    ]
    metadata: Metadata = None


class SingleBurnRequest(Payload):
    card_id: Ident


def _describe(error: Any) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "request"
    if error["type"] == "missing":
        return f"{field}: is required"
    if error["type"] == "extra_forbidden":
        return f"{field}: is not a field of this request"
    if error["type"] in ("too_short", "too_long") and field == "card_ids":
        return f"card_ids: must hold 1 to {BATCH_MAX} card ids"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{field}: {message}"


def validate_fields(model: type[Payload], kwargs: dict[str, Any]) -> Payload:
    """Validate keyword arguments against a payload model; InvalidRequestError names each
    field and rule."""
    try:
        return model.model_validate(kwargs)
    except ValidationError as exc:
        raise InvalidRequestError([_describe(error) for error in exc.errors()]) from None


def check_request_id(value: object, field: str = "request_id") -> str:
    """Validate a request ID (the Celery task id)."""
    if not isinstance(value, str):
        raise InvalidRequestError([f"{field}: must be a string (got {type(value).__name__})"])
    problem = _ident_problem(value)
    if problem:
        raise InvalidRequestError([f"{field}: {problem}"])
    return value


def fingerprint(task: str, payload: Payload) -> str:
    """A digest of what a request asks, to tell a replay from a conflicting reuse of its ID."""
    body = canonical_json({"task": task, "kwargs": payload.model_dump()})
    return hashlib.sha256(body.encode()).hexdigest()
