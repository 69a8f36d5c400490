"""Bulk enqueue: import a JSON Lines file of requests at broker speed, every one confirmed.

One request per line::

    {"task": "single_mint", "card_id": "c-1", "owner": "alice", "request_id": "order-1"}
    {"task": "mint", "owner": "bob", "card_ids": ["c-2", "c-3"], "metadata": {"series": "x"}}
    {"task": "single_burn", "card_id": "c-1", "owner": "alice"}

``task`` is ``mint``, ``single_mint`` or ``single_burn`` (``mcard.`` in front is accepted);
``request_id`` is optional; every other key is a keyword argument of the task, validated by the
same rules as ``delay()``. A line without ``request_id`` gets one derived from its content
(a UUID5 of the request's fingerprint), so re-running a file never creates a second request
for it; two identical lines without ``request_id`` are the same request.

:func:`enqueue_many` reads the file twice and never holds more than a chunk of it:

1. **Validate** every line (JSON, object, task, fields, request ID) and, in chunks, refuse
   request IDs the ledger already holds with a different payload (a conflict). If any line is
   invalid nothing is published (:class:`InvalidLinesError`) unless ``skip_invalid``.
2. **Publish** every valid request as exactly the message ``delay()`` publishes (Celery task
   protocol 2, JSON, persistent, to exchange ``mcard`` with the task name as routing key) over
   one connection in publisher-confirm mode. Confirms are collected asynchronously: up to
   ``window`` messages are in flight, and ``basic.ack``/``basic.nack`` (``multiple`` or
   not) settle them as they arrive. Every wait is bounded: no confirm for ``timeout`` seconds
   is a broker failure.

The :class:`ImportReport` counts what was read, valid, invalid, published, confirmed and
nacked. ``confirmed`` is exact: it counts the broker's acks, nothing else. On a broker failure
(:class:`BrokerFailureError`) or Ctrl-C (:class:`ImportInterrupted`) the exception carries the
report of what was confirmed. Requests are idempotent by request ID, so running the same file
again is always safe: what already happened is not repeated.

What this path does not do, unlike ``delay()``: it sends no ``before_task_publish`` /
``after_task_publish`` signals and no ``task-sent`` events (Flower sees each request once a
worker receives it). Two lines that reuse one request ID with different payloads within the
file are not detected here (that would need memory in the size of the file); the worker's
ledger applies the first and dead-letters the other as a conflict.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from mcard_tasks.config import settings_of
from mcard_tasks.confirms import ConfirmWindow
from mcard_tasks.errors import (
    BrokerUnavailableError,
    ConflictError,
    InvalidRequestError,
    LedgerUnavailableError,
    MCardError,
)
from mcard_tasks.models import Operation
from mcard_tasks.payloads import Payload, fingerprint
from mcard_tasks.producer import resolve_request_id
from mcard_tasks.specs import PREFIX, SPECS, validate_payload
from mcard_tasks.topology import EXCHANGE, build_topology

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy import Engine

__all__ = [
    "BrokerFailureError",
    "BulkImportError",
    "ImportInterrupted",
    "ImportReport",
    "InvalidLinesError",
    "LedgerFailureError",
    "Progress",
    "Request",
    "enqueue_many",
    "parse_request",
    "task_message",
]

#: Error messages kept in a report (all are counted).
MAX_ERRORS = 100
#: Lines per ledger query and per progress report.
CHUNK = 500
#: Unconfirmed messages in flight at most.
WINDOW = 1000
#: The longest line accepted (a full mint batch with metadata is well below it).
MAX_LINE_BYTES = 1024 * 1024
#: The namespace of request IDs derived from a line's content.
REQUEST_ID_NAMESPACE = uuid.UUID("6d636172-642d-7461-736b-732d62756c6b")
RERUN_ADVICE = (
    "requests are idempotent by request ID: re-running the same file is safe and does not"
    " repeat what already happened"
)

_PERSISTENT = 2

#: ``progress(phase, done, total)``: phase "validate" counts bytes of a file (lines of an
#: in-memory source), phase "publish" counts confirmed requests of the valid ones.
Progress = Callable[[str, int, int], None]
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
        return self.payload.model_dump(exclude_unset=True)

    @property
    def fingerprint(self) -> str:
        """The ledger's fingerprint of this request (computed once)."""
        if self.digest is None:
            self.digest = fingerprint(self.task, self.payload)
        return self.digest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(text: str) -> Request:
    """Validate one line; InvalidRequestError lists each problem as ``field: rule``."""
    try:
        document = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError([f"not valid JSON ({exc.msg} at column {exc.colno})"]) from None
    except ValueError as exc:
        raise InvalidRequestError([f"not valid JSON ({exc})"]) from None
    if not isinstance(document, dict):
        kind = "an array" if isinstance(document, list) else f"a {type(document).__name__}"
        raise InvalidRequestError([f"must be a JSON object (got {kind})"])
    fields = dict(document)
    known = ", ".join(spec.short_name for spec in SPECS.values())
    short = fields.pop("task", None)
    if short is None:
        raise InvalidRequestError([f"task: is required (one of {known})"])
    task = PREFIX + short.removeprefix(PREFIX) if isinstance(short, str) else ""
    if task not in SPECS:
        raise InvalidRequestError([f"task: unknown task {short!r} (known: {known})"])
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
    if request_id is not None:
        return Request(task, request_id, payload)
    digest = fingerprint(task, payload)
    return Request(task, str(uuid.uuid5(REQUEST_ID_NAMESPACE, digest)), payload, digest)


class _Reprs:
    """``argsrepr``/``kwargsrepr`` exactly as ``as_task_v2`` computes them, but faster.

    Celery's saferepr costs more than the rest of the message; for keyword arguments that
    are all short printable strings without quote or backslash it equals plain ``repr``
    (no truncation, no escaping), which the unit tests check against saferepr itself.
    """

    def __init__(self, app: Celery) -> None:
        from celery.utils.saferepr import saferepr

        self.saferepr = saferepr
        self.maxsize: int = app.amqp.kwargsrepr_maxsize
        self.maxlevels: int = app.conf.task_repr_maxlevels
        self.args: str = saferepr((), app.amqp.argsrepr_maxsize, maxlevels=self.maxlevels)

    def kwargs(self, kwargs: dict[str, Any]) -> str:
        if all(type(value) is str and "'" not in value for value in kwargs.values()):
            text = repr(kwargs)
            if len(text) < self.maxsize // 2 and text.isprintable() and "\\" not in text:
                return text
        return str(self.saferepr(kwargs, self.maxsize, maxlevels=self.maxlevels))


def task_message(
    app: Celery, request: Request, reprs: _Reprs | None = None
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The (headers, properties, body) ``delay()`` publishes for this request.

    Built as Celery's ``send_task_message`` and kombu's ``Producer.publish`` build it: the
    protocol 2 message of ``app.amqp.as_task_v2``, serialized with the task serializer,
    persistent, priority 0, correlation_id = task id = request ID.
    """
    from kombu.serialization import dumps

    reprs = reprs or _Reprs(app)
    kwargs = request.kwargs
    headers, properties, body, _ = app.amqp.as_task_v2(
        request.request_id,
        request.task,
        args=(),
        kwargs=kwargs,
        reply_to=app.thread_oid,
        argsrepr=reprs.args,
        kwargsrepr=reprs.kwargs(kwargs),
    )
    content_type, content_encoding, data = dumps(body, serializer=app.conf.task_serializer)
    properties = dict(
        properties,
        content_type=content_type,
        content_encoding=content_encoding,
        delivery_mode=_PERSISTENT,
        priority=0,
    )
    return headers, properties, data


@dataclass
class ImportReport:
    """What an import read, refused, published and got confirmed."""

    source: str
    lines: int = 0
    blank: int = 0
    valid: int = 0
    invalid: int = 0
    #: Of the invalid: request IDs the ledger holds with a different payload.
    conflicts: int = 0
    #: Valid requests whose request ID already has this very request recorded (replays).
    recorded: int = 0
    #: The first MAX_ERRORS problems, ``line N: field: rule``, in line order.
    errors: list[str] = field(default_factory=list)
    published: int = 0
    confirmed: int = 0
    nacked: int = 0
    nacked_request_ids: list[str] = field(default_factory=list)
    #: Lines left out in the publishing pass (invalid, with skip_invalid).
    skipped: int = 0
    status: Literal["running", "complete", "refused", "failed", "interrupted"] = "running"
    failure: str | None = None
    note: str | None = None
    seconds: float = 0.0
    _error_lines: list[tuple[int, str]] = field(default_factory=list, repr=False)

    @property
    def unconfirmed(self) -> int:
        """Published but neither acked nor nacked: they may or may not be queued."""
        return self.published - self.confirmed - self.nacked

    def add_error(self, line: int, problems: Iterable[str]) -> None:
        self.invalid += 1
        if len(self._error_lines) < MAX_ERRORS:
            self._error_lines.append((line, f"line {line}: " + "; ".join(problems)))
            self._error_lines.sort()
            self.errors = [message for _, message in self._error_lines]

    def summary(self) -> str:
        """One line: the counts."""
        rate = f", {self.confirmed / self.seconds:,.0f} confirmed/s" if self.seconds else ""
        return (
            f"{self.status}: {self.lines} lines, {self.valid} valid, {self.invalid} invalid"
            f" ({self.recorded} already recorded); published {self.published}, confirmed"
            f" {self.confirmed}, nacked {self.nacked}, unconfirmed {self.unconfirmed}"
            f" in {self.seconds:.1f} s{rate}"
        )

    def describe(self) -> list[str]:
        """The summary, then what went wrong and what to do."""
        lines = [self.summary()]
        if self.failure:
            lines.append(self.failure)
        if self.note:
            lines.append(self.note)
        if self.invalid > len(self.errors):
            lines.append(f"({self.invalid - len(self.errors)} more invalid lines not listed)")
        if self.status == "refused":
            lines.append("nothing was published; fix the lines or pass --skip-invalid")
        if self.nacked:
            lines.append(
                f"the broker refused (nacked) {self.nacked} requests, e.g. "
                + ", ".join(self.nacked_request_ids[:5])
            )
        if self.status in ("failed", "interrupted") or self.nacked:
            lines.append(
                f"exactly {self.confirmed} requests were confirmed by the broker;"
                f" {self.unconfirmed} published but unconfirmed may or may not be queued; "
                + RERUN_ADVICE
            )
        return lines


class BulkImportError(MCardError):
    """Raised when an import stops early; ``report`` tells what was confirmed."""

    def __init__(self, message: str, report: ImportReport) -> None:
        self.report = report
        super().__init__(message)


class InvalidLinesError(InvalidRequestError, BulkImportError):
    """Raised when lines are invalid (or conflict) and skip_invalid is off: nothing published."""

    def __init__(self, report: ImportReport) -> None:
        self.report = report
        self.problems = list(report.errors)
        more = f" (and {report.invalid - 5} more)" if report.invalid > 5 else ""
        Exception.__init__(
            self,
            f"{report.invalid} invalid lines, nothing published: "
            + "; ".join(report.errors[:5])
            + more,
        )


class BrokerFailureError(BulkImportError, BrokerUnavailableError):
    """Raised on a broker failure, a confirm timeout or nacked requests."""


class LedgerFailureError(BulkImportError, LedgerUnavailableError):
    """Raised when the ledger cannot be read for the conflict check during an import."""


class ImportInterrupted(KeyboardInterrupt):
    """Raised on Ctrl-C during an import; ``report`` tells what was confirmed."""

    def __init__(self, report: ImportReport) -> None:
        self.report = report
        super().__init__("import interrupted")


# --- reading -------------------------------------------------------------------------------


class _Line(NamedTuple):
    number: int
    text: str | None  # None: a problem reading it (in problem)
    problem: str | None
    position: int  # bytes (file) or lines (sequence) consumed so far


class _Reader:
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
        if self.path is not None:
            return self.path.stat().st_size
        assert self.lines is not None
        return sum(1 for _ in self.lines)

    def __iter__(self) -> Iterator[_Line]:
        if self.path is None:
            assert self.lines is not None
            for number, text in enumerate(self.lines, 1):
                yield _Line(number, text, None, number)
            return
        with self.path.open("rb") as stream:
            number, position = 0, 0
            while True:
                raw = stream.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    return
                number += 1
                position += len(raw)
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                        raw = stream.readline(MAX_LINE_BYTES)
                        position += len(raw)
                    yield _Line(number, None, f"longer than {MAX_LINE_BYTES} bytes", position)
                    continue
                try:
                    yield _Line(number, raw.decode("utf-8"), None, position)
                except UnicodeDecodeError as exc:
                    yield _Line(number, None, f"not valid UTF-8 ({exc.reason})", position)


def _parse(line: _Line) -> Request | list[str] | None:
    """A request, None for a blank line, or the line's problems."""
    if line.text is None:
        return [line.problem or "unreadable"]
    if not line.text.strip():
        return None
    try:
        return parse_request(line.text)
    except InvalidRequestError as exc:
        return exc.problems


# --- the ledger ----------------------------------------------------------------------------


class _ConflictCheck:
    """Chunked lookups of request IDs in the ledger: conflicts and replays."""

    def __init__(self, engine: Engine | None) -> None:
        # Read-only: on SQLite a plain BEGIN, never a write lock the workers would wait for.
        self.engine = None if engine is None else engine.execution_options(mcard_readonly=True)

    def recorded(self, requests: list[Request]) -> dict[str, str]:
        """The recorded fingerprints of those request IDs the ledger holds."""
        if self.engine is None or not requests:
            return {}
        ids = sorted({request.request_id for request in requests})
        query = select(Operation.request_id, Operation.fingerprint).where(
            Operation.request_id.in_(ids)
        )
        try:
            with self.engine.connect() as connection:
                return {row[0]: row[1] for row in connection.execute(query)}
        except OperationalError as exc:
            raise LedgerUnavailableError(f"the ledger database is unavailable: {exc}") from exc


# --- the broker ----------------------------------------------------------------------------


class _Publisher:
    """Publishes task messages through a confirm window, counting them in the report."""

    def __init__(self, app: Celery, report: ImportReport, timeout: float, window: int) -> None:
        self.app = app
        self.report = report
        self.window = ConfirmWindow(app, self._settled, timeout, window, purpose="bulk")
        self.reprs = _Reprs(app)

    def open(self) -> None:
        self.window.open(build_topology(settings_of(self.app)).declare)

    def _settled(self, request_ids: list[str], nacked: bool) -> None:
        if nacked:
            self.report.nacked += len(request_ids)
            room = MAX_ERRORS - len(self.report.nacked_request_ids)
            self.report.nacked_request_ids += request_ids[: max(0, room)]
        else:
            self.report.confirmed += len(request_ids)

    def publish(self, request: Request) -> None:
        headers, properties, body = task_message(self.app, request, self.reprs)
        self.window.publish(
            request.request_id,
            body,
            exchange=EXCHANGE.name,
            routing_key=request.task,
            headers=headers,
            **properties,
        )
        self.report.published += 1

    def wait(self) -> None:
        self.window.wait()

    def abort(self) -> None:
        self.window.abort()

    def close(self) -> None:
        self.window.close()


def _broker_errors() -> tuple[type[BaseException], ...]:
    from amqp.exceptions import AMQPError
    from kombu.exceptions import KombuError

    return (OSError, AMQPError, KombuError)


# --- the import ----------------------------------------------------------------------------


def _validate(
    reader: _Reader,
    report: ImportReport,
    check: _ConflictCheck,
    progress: Progress | None,
) -> None:
    """Pass 1: count and validate every line; conflicts with the ledger are invalid lines."""
    total = reader.size()
    chunk: list[tuple[int, Request]] = []

    def flush() -> None:
        recorded = check.recorded([request for _, request in chunk])
        for number, request in chunk:
            known = recorded.get(request.request_id)
            if known is not None and known != request.fingerprint:
                report.conflicts += 1
                report.add_error(number, [f"request_id: {ConflictError(request.request_id)}"])
            else:
                report.valid += 1
                report.recorded += known is not None
        chunk.clear()

    position = 0
    for line in reader:
        report.lines += 1
        position = line.position
        parsed = _parse(line)
        if parsed is None:
            report.blank += 1
        elif isinstance(parsed, list):
            report.add_error(line.number, parsed)
        else:
            chunk.append((line.number, parsed))
        if len(chunk) >= CHUNK:
            flush()
            if progress:
                progress("validate", position, total)
    flush()
    if progress:
        progress("validate", max(position, total), total)


def _publish(
    reader: _Reader,
    report: ImportReport,
    check: _ConflictCheck,
    publisher: _Publisher,
    progress: Progress | None,
) -> None:
    """Pass 2: publish the valid lines chunk by chunk.

    The conflicts pass 1 found are found again per chunk (and left out), so no line number
    is remembered in between. Without any, the ledger is not asked again: a conflict
    recorded meanwhile is refused by the worker's ledger, which keeps the first outcome.
    """
    chunk: list[Request] = []

    def flush() -> None:
        recorded = check.recorded(chunk) if report.conflicts else {}
        for request in chunk:
            known = recorded.get(request.request_id)
            if known is not None and known != request.fingerprint:
                report.skipped += 1
                continue
            publisher.publish(request)
        chunk.clear()
        if progress:
            progress("publish", report.confirmed, report.valid)

    for line in reader:
        parsed = _parse(line)
        if isinstance(parsed, Request):
            chunk.append(parsed)
            if len(chunk) >= CHUNK:
                flush()
        elif parsed is not None:
            report.skipped += 1
    flush()
    publisher.wait()
    if progress:
        progress("publish", report.confirmed, report.valid)


def enqueue_many(
    source: Source,
    *,
    skip_invalid: bool = False,
    progress: Progress | None = None,
    app: Celery | None = None,
    window: int = WINDOW,
    timeout: float | None = None,
) -> ImportReport:
    """Import a JSON Lines file of requests (see the module docs); return its report.

    source: a path, or a collection of lines (read twice, so not an iterator).
    skip_invalid: publish the valid lines even if some are invalid (they are reported).
    progress: called as ``progress(phase, done, total)`` every chunk (see :data:`Progress`).
    app: the Celery app (default: mcard-tasks' own); its ledger is consulted for conflicts
        unless ``mcard_check_conflicts`` is off.
    window: unconfirmed messages in flight at most.
    timeout: seconds without a confirm (or a socket operation) before giving up; default
        ``MCARD_PUBLISH_TIMEOUT``.

    Raises InvalidLinesError (nothing published), BrokerFailureError (broker unreachable,
    failing, silent or nacking), ImportInterrupted (Ctrl-C); each carries ``report``.
    LedgerUnavailableError when the ledger cannot be read.
    """
    if app is None:
        from mcard_tasks.application import app as default_app

        app = default_app
    if window < 1:
        raise ValueError("window must be at least 1")
    reader = _Reader(source)
    report = ImportReport(source=reader.name)
    started = time.monotonic()
    engine = None
    settings = settings_of(app)
    if settings.check_conflicts:
        from mcard_tasks.ledger import get_ledger

        engine = get_ledger(settings.database_url).engine
    check = _ConflictCheck(engine)
    publisher = _Publisher(app, report, timeout or settings.publish_timeout, window)
    try:
        _validate(reader, report, check, progress)
        if report.invalid and not skip_invalid:
            report.status = "refused"
            raise InvalidLinesError(report)
        if report.valid:
            publisher.open()
            _publish(reader, report, check, publisher, progress)
        if report.skipped != report.invalid:
            report.note = (
                f"note: {report.skipped} lines were left out while publishing but"
                f" {report.invalid} were invalid when validating; the file or the ledger"
                " changed in between"
            )
        report.status = "complete"
        if report.nacked:
            report.status = "failed"
            raise BrokerFailureError(
                f"the broker refused {report.nacked} of {report.published} requests", report
            )
        return report
    except KeyboardInterrupt:
        report.status = "interrupted"
        publisher.abort()
        raise ImportInterrupted(report) from None
    except LedgerUnavailableError as exc:
        report.status = "failed"
        report.failure = str(exc)
        publisher.abort()
        raise LedgerFailureError(report.failure, report) from exc
    except _broker_errors() as exc:
        report.status = "failed"
        report.failure = f"broker failure: {exc.__class__.__name__}: {exc}"
        publisher.abort()
        raise BrokerFailureError(report.failure, report) from exc
    finally:
        report.seconds = time.monotonic() - started
        publisher.close()
