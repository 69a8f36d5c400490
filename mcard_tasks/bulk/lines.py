"""The import's file format: JSON Lines, one request per line (README, "Bulk import").

:func:`parse_request` validates one line into a :class:`Request`; :class:`Lines` reads a file
(or a collection of lines) as often as the import needs, never more than a line at a time.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mcard_tasks.errors import InvalidRequestError
from mcard_tasks.messages import published_kwargs
from mcard_tasks.payloads import Payload, fingerprint
from mcard_tasks.request_task import resolve_request_id
from mcard_tasks.specs import PREFIX, SPECS, validate_payload

__all__ = [
    "MAX_LINE_BYTES",
    "REQUEST_ID_NAMESPACE",
    "Line",
    "Lines",
    "Request",
    "Source",
    "parse_line",
    "parse_request",
]

#: The longest line accepted (a full mint batch with metadata is well below it).
MAX_LINE_BYTES = 1024 * 1024
#: The namespace of request IDs derived from a line's content.
REQUEST_ID_NAMESPACE = uuid.UUID("6d636172-642d-7461-736b-732d62756c6b")


#: A path, or a collection of lines (read twice, so not an iterator).
Source = str | os.PathLike[str] | Iterable[str]


@dataclass(slots=True)
class Request:
    """One valid line: the Celery task name, its request ID and its validated keyword args."""

    task: str
    request_id: str
    payload: Payload
    digest: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments as ``delay()`` publishes them (unset defaults left out)."""
        return published_kwargs(self.payload)

    @property
    def fingerprint(self) -> str:
        """The ledger's fingerprint of this request (computed once)."""
        if self.digest is None:
            self.digest = fingerprint(self.task, self.payload)
        return self.digest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(text: str) -> dict[str, Any]:
    """The line's JSON object (NaN and Infinity are not JSON, though Python reads them)."""
    try:
        document = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError([f"not valid JSON ({exc.msg} at column {exc.colno})"]) from None
    except ValueError as exc:
        raise InvalidRequestError([f"not valid JSON ({exc})"]) from None
    if not isinstance(document, dict):
        kind = "an array" if isinstance(document, list) else f"a {type(document).__name__}"
        raise InvalidRequestError([f"must be a JSON object (got {kind})"])
    return dict(document)


def _task(short: object) -> str:
    """The Celery task name of the line's ``task`` (``mcard.`` in front is optional)."""
    known = ", ".join(spec.short_name for spec in SPECS.values())
    if short is None:
        raise InvalidRequestError([f"task: is required (one of {known})"])
    task = PREFIX + short.removeprefix(PREFIX) if isinstance(short, str) else ""
    if task not in SPECS:
        raise InvalidRequestError([f"task: unknown task {short!r} (known: {known})"])
    return task


def _validated(task: str, fields: dict[str, Any]) -> tuple[str | None, Payload]:
    """The request ID (None if not given) and the payload; every problem of both, or raise."""
    problems: list[str] = []
    request_id: str | None = None
    given = fields.pop("request_id", None)
    if given is not None:
        try:
            request_id = resolve_request_id(given, None)
        except InvalidRequestError as exc:
            problems += exc.problems
    payload: Payload | None = None
    try:
        payload = validate_payload(task, fields)
    except InvalidRequestError as exc:
        problems += exc.problems
    if problems or payload is None:
        raise InvalidRequestError(problems)
    return request_id, payload


def parse_request(text: str) -> Request:
    """Validate one line.

    Raises:
        InvalidRequestError: listing each problem as ``field: rule`` (all of them, for the
            request ID and the fields alike).
    """
    fields = _object(text)
    task = _task(fields.pop("task", None))
    request_id, payload = _validated(task, fields)
    if request_id is not None:
        return Request(task, request_id, payload)
    # Derived from the content: a re-run of the file derives the same ID, so it is a replay.
    digest = fingerprint(task, payload)
    return Request(task, str(uuid.uuid5(REQUEST_ID_NAMESPACE, digest)), payload, digest)


class Line(NamedTuple):
    """One line of a source, as read."""

    number: int
    text: str | None  # None: a problem reading it (in problem)
    problem: str | None
    position: int  # bytes (file) or lines (sequence) consumed so far


def parse_line(line: Line) -> Request | list[str] | None:
    """A request, None for a blank line, or the line's problems."""
    if line.text is None:
        return [line.problem or "unreadable"]
    if not line.text.strip():
        return None
    try:
        return parse_request(line.text)
    except InvalidRequestError as exc:
        return exc.problems


class Lines:
    """A re-readable source of lines: a path, or a collection of strings (not an iterator)."""

    def __init__(self, source: Source) -> None:
        self.path: Path | None = None
        self.lines: Iterable[str] | None = None
        if isinstance(source, str | os.PathLike):
            self.path = Path(source)
            self.name = str(source)
        else:
            if iter(source) is source:
                raise TypeError(
                    "enqueue_many reads its source twice: pass a path or a collection of lines,"
                    " not an iterator"
                )
            self.lines = source
            self.name = "<lines>"

    def size(self) -> int:
        """Bytes of a file, lines of a collection: the unit of :attr:`Line.position`."""
        if self.path is not None:
            return self.path.stat().st_size
        assert self.lines is not None
        return sum(1 for _ in self.lines)

    def __iter__(self) -> Iterator[Line]:
        if self.path is not None:
            return _read(self.path)
        assert self.lines is not None
        return (Line(number, text, None, number) for number, text in enumerate(self.lines, 1))


def _read(path: Path) -> Iterator[Line]:
    """The lines of a file, each read with a bound, so one huge line cannot fill the memory."""
    with path.open("rb") as stream:
        number, position = 0, 0
        while raw := stream.readline(MAX_LINE_BYTES + 1):
            number += 1
            position += len(raw)
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                    raw = stream.readline(MAX_LINE_BYTES)
                    position += len(raw)
                yield Line(number, None, f"longer than {MAX_LINE_BYTES} bytes", position)
                continue
            try:
                yield Line(number, raw.decode("utf-8"), None, position)
            except UnicodeDecodeError as exc:
                yield Line(number, None, f"not valid UTF-8 ({exc.reason})", position)
