"""Bulk enqueue: import a JSON Lines file of requests at broker speed, every one confirmed.

:func:`enqueue_many` is the entry (``mcard-tasks import FILE``). It reads its source twice,
never holding more than a chunk of it: pass 1 validates every line and checks request IDs
against the ledger; pass 2 publishes the valid ones with pipelined confirms. The file format
and the guarantees are in the README, "Bulk import".

Modules: ``lines`` (the format, the reader), ``conflicts`` (the ledger check), ``publisher``
(the broker side), ``report`` (the counts); the errors are in ``mcard_tasks.errors``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from mcard_tasks.application import app as default_app
from mcard_tasks.bulk.conflicts import ConflictCheck, Verdict
from mcard_tasks.bulk.lines import Line, Lines, Request, Source, parse_line
from mcard_tasks.bulk.publisher import Publisher
from mcard_tasks.bulk.report import ImportReport
from mcard_tasks.config import settings_of
from mcard_tasks.confirms import BROKER_ERRORS
from mcard_tasks.errors import (
    BrokerFailureError,
    BulkImportError,
    ConflictError,
    ImportInterrupted,
    InvalidLinesError,
    LedgerFailureError,
    LedgerUnavailableError,
)

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["CHUNK", "WINDOW", "Progress", "enqueue_many"]

#: Lines per ledger query and per progress report.
CHUNK = 500
#: Unconfirmed messages in flight at most.
WINDOW = 1000

#: ``progress(phase, done, total)``: phase "validate" counts bytes of a file (lines of an
#: in-memory source), phase "publish" counts confirmed requests of the valid ones.
Progress = Callable[[str, int, int], None]


def enqueue_many(
    source: Source,
    *,
    skip_invalid: bool = False,
    progress: Progress | None = None,
    app: Celery | None = None,
    window: int = WINDOW,
    timeout: float | None = None,
) -> ImportReport:
    """Import a JSON Lines file of requests (README, "Bulk import"); return its report.

    Parameters:
        source: a path, or a collection of lines (read twice, so not an iterator).
        skip_invalid: publish the valid lines even if some are invalid (they are reported).
        progress: called as ``progress(phase, done, total)`` every chunk (see
            :data:`Progress`).
        app: the Celery app (default: mcard-tasks' own); its ledger is consulted for
            conflicts unless ``MCARD_CHECK_CONFLICTS`` is off.
        window: unconfirmed messages in flight at most.
        timeout: seconds without a confirm (or a socket operation) before giving up;
            default ``MCARD_PUBLISH_TIMEOUT``.

    Raises:
        InvalidLinesError: lines are invalid or conflict, and not skip_invalid: nothing was
            published.
        BrokerFailureError: the broker is unreachable, failing, silent or nacking.
        LedgerFailureError: the ledger cannot be read for the conflict check.
        ImportInterrupted: Ctrl-C.

        Each carries ``report``, with exactly what the broker confirmed.
    """
    if app is None:
        app = default_app
    if window < 1:
        raise ValueError("window must be at least 1")
    reader = Lines(source)
    report = ImportReport(source=reader.name)
    started = time.monotonic()
    settings = settings_of(app)
    check = ConflictCheck(
        settings.database_url if settings.check_conflicts else None, settings.migrate
    )
    publisher = Publisher(app, report, timeout or settings.publish_timeout, window)
    try:
        _import(reader, report, check, publisher, progress, skip_invalid)
        return report
    except KeyboardInterrupt:
        report.status = "interrupted"
        publisher.abort()
        raise ImportInterrupted(report) from None
    except LedgerUnavailableError as exc:
        raise _failed(report, publisher, LedgerFailureError, str(exc)) from exc
    except BROKER_ERRORS as exc:
        failure = f"broker failure: {exc.__class__.__name__}: {exc}"
        raise _failed(report, publisher, BrokerFailureError, failure) from exc
    finally:
        report.seconds = time.monotonic() - started
        publisher.close()


def _failed(
    report: ImportReport, publisher: Publisher, error: type[BulkImportError], failure: str
) -> BulkImportError:
    """Mark the import failed and drop the connection; the error to raise."""
    report.status = "failed"
    report.failure = failure
    publisher.abort()
    return error(failure, report)


def _import(
    reader: Lines,
    report: ImportReport,
    check: ConflictCheck,
    publisher: Publisher,
    progress: Progress | None,
    skip_invalid: bool,
) -> None:
    """Both passes; refused before any connection if lines are invalid (not skip_invalid)."""
    _validate(reader, report, check, progress)
    if report.invalid and not skip_invalid:
        report.status = "refused"
        raise InvalidLinesError(report)
    if report.valid:
        publisher.open()
        _publish(reader, report, check, publisher, progress)
    report.check_passes()
    report.status = "complete"
    if report.nacked:
        report.status = "failed"
        raise BrokerFailureError(
            f"the broker refused {report.nacked} of {report.published} requests", report
        )


def _tell(progress: Progress | None, phase: str, done: int, total: int) -> None:
    if progress:
        progress(phase, done, total)


# --- pass 1: validate ----------------------------------------------------------------------


def _validate(
    reader: Lines, report: ImportReport, check: ConflictCheck, progress: Progress | None
) -> None:
    """Pass 1: count and validate every line; conflicts with the ledger are invalid lines."""
    total = reader.size()
    chunk: list[tuple[int, Request]] = []
    position = 0
    for line in reader:
        position = line.position
        request = _count(line, report)
        if request is not None:
            chunk.append((line.number, request))
        if len(chunk) >= CHUNK:
            _check_chunk(chunk, report, check)
            _tell(progress, "validate", position, total)
    _check_chunk(chunk, report, check)
    _tell(progress, "validate", max(position, total), total)


def _count(line: Line, report: ImportReport) -> Request | None:
    """Count the line in the report; its request if it is valid so far (before the ledger)."""
    report.lines += 1
    parsed = parse_line(line)
    if parsed is None:
        report.blank += 1
    elif isinstance(parsed, list):
        report.add_error(line.number, parsed)
    else:
        return parsed
    return None


def _check_chunk(
    chunk: list[tuple[int, Request]], report: ImportReport, check: ConflictCheck
) -> None:
    """Count a chunk's requests as valid (new or recorded) or conflicting; empty the chunk."""
    verdicts = check.verdicts([request for _, request in chunk])
    for (number, request), verdict in zip(chunk, verdicts, strict=True):
        if verdict == "conflict":
            report.conflicts += 1
            report.add_error(number, [f"request_id: {ConflictError(request.request_id)}"])
        else:
            report.valid += 1
            report.recorded += verdict == "recorded"
    chunk.clear()


# --- pass 2: publish -----------------------------------------------------------------------


def _publish(
    reader: Lines,
    report: ImportReport,
    check: ConflictCheck,
    publisher: Publisher,
    progress: Progress | None,
) -> None:
    """Pass 2: publish the valid lines chunk by chunk.

    The conflicts pass 1 found are found again per chunk (and left out), so no line number
    is remembered in between. Without any, the ledger is not asked again: a conflict
    recorded meanwhile is refused by the worker's ledger, which keeps the first outcome.
    """
    chunk: list[Request] = []
    for line in reader:
        parsed = parse_line(line)
        if isinstance(parsed, Request):
            chunk.append(parsed)
            if len(chunk) >= CHUNK:
                _publish_chunk(chunk, report, check, publisher, progress)
        elif parsed is not None:
            report.skipped += 1
    _publish_chunk(chunk, report, check, publisher, progress)
    publisher.wait()
    _tell(progress, "publish", report.confirmed, report.valid)


def _publish_chunk(
    chunk: list[Request],
    report: ImportReport,
    check: ConflictCheck,
    publisher: Publisher,
    progress: Progress | None,
) -> None:
    """Publish a chunk's requests but the conflicting ones; empty the chunk."""
    verdicts: Iterable[Verdict] = (
        check.verdicts(chunk) if report.conflicts else itertools.repeat("new")
    )
    for request, verdict in zip(chunk, verdicts, strict=False):
        if verdict == "conflict":
            report.skipped += 1
        else:
            publisher.publish(request)
    chunk.clear()
    _tell(progress, "publish", report.confirmed, report.valid)
