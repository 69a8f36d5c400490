"""The error tree of mcard-tasks: one root, and a class per thing that can go wrong.

The one class outside the root is :class:`ImportInterrupted`, a Ctrl-C (see its docstring).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery.exceptions import TimeoutError as CeleryTimeoutError

if TYPE_CHECKING:  # only for the annotations: errors.py imports nothing heavy at runtime
    from mcard_tasks.bulk.report import ImportReport

__all__ = [
    "BrokerFailureError",
    "BrokerUnavailableError",
    "BulkImportError",
    "ConfigurationError",
    "ConflictError",
    "EtaTooFarError",
    "ImportInterrupted",
    "InvalidLegacyMessageError",
    "InvalidLinesError",
    "InvalidRequestError",
    "LedgerFailureError",
    "LedgerUnavailableError",
    "LedgerWaitTimeoutError",
    "MCardError",
    "MessageTooLargeError",
    "NoTransactionError",
    "SchemaNotAtHeadError",
    "TopologyDriftError",
    "TopologyMissingError",
    "TransientError",
]


class MCardError(Exception):
    """Raised for any error of mcard-tasks; every other error derives from it."""


class InvalidRequestError(MCardError, ValueError):
    """Raised when a request's fields break the contract (the message names field and rule)."""

    def __init__(self, problems: list[str], *, message: str | None = None, **kwargs: Any) -> None:
        """message: a summary instead of the problems joined; kwargs go on to the next class
        of a subclass's MRO (InvalidLinesError's report goes to BulkImportError)."""
        self.problems = problems
        super().__init__(message or "invalid request: " + "; ".join(problems), **kwargs)


class InvalidLegacyMessageError(InvalidRequestError):
    """Raised when a header-less message is not a valid legacy message of its queue."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems, message="invalid legacy message: " + "; ".join(problems))


class MessageTooLargeError(InvalidRequestError):
    """Raised when a task message's body is over MCARD_MAX_BODY_BYTES (nothing published)."""


class EtaTooFarError(InvalidRequestError):
    """Raised when a request's eta or countdown is beyond MCARD_MAX_ETA_SECONDS (nothing
    published)."""


class ConflictError(MCardError):
    """Raised when a request ID is already recorded with a different payload (a conflict)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        super().__init__(
            f"conflict: request ID {request_id!r} is already recorded with a different payload;"
            " use a new request ID for a different request"
        )


class ConfigurationError(MCardError):
    """Raised when an MCARD_* setting cannot be used."""


class SchemaNotAtHeadError(ConfigurationError):
    """Raised when MCARD_MIGRATE is false and the ledger's schema is not at the revision this
    code expects: nothing runs DDL then, the owner role migrates it with ``db upgrade``."""

    def __init__(self, database: str, current: str | None, expected: str) -> None:
        """database: the ledger's URL, its password masked."""
        self.current, self.expected = current, expected
        found = f"revision {current}" if current else "no revision (never migrated)"
        super().__init__(
            f"the ledger database {database} is at {found}, this mcard-tasks expects revision"
            f" {expected} (head); MCARD_MIGRATE=false: no process changes the schema, so run"
            " `mcard-tasks db upgrade` with MCARD_DATABASE_URL of the owner role"
            " (mcard_owner), then start this process again"
        )


class NoTransactionError(MCardError):
    """Raised when delay_in is given no open transaction to write in: a SQLAlchemy Connection
    outside a transaction or in AUTOCOMMIT, or a Django connection outside ``atomic()``."""


class TransientError(MCardError):
    """Raised for a failure worth retrying later (database or issuer unreachable)."""


class LedgerUnavailableError(TransientError):
    """Raised when the card ledger's database cannot be reached."""


class LedgerWaitTimeoutError(LedgerUnavailableError, CeleryTimeoutError):  # type: ignore[misc]
    """Raised by get(timeout=T) when the ledger was still unavailable after T seconds.

    A celery.exceptions.TimeoutError (code that handles a timed-out get() handles this too)
    and a LedgerUnavailableError (its message names the ledger and the last error).
    """


class BrokerUnavailableError(MCardError):
    """Raised when the broker did not confirm a publish within the configured time."""


class TopologyDriftError(MCardError):
    """Raised when a queue or exchange on the broker differs from the declared topology."""


class TopologyMissingError(MCardError):
    """Raised with MCARD_DECLARE=false when exchanges or queues are not on the broker."""


class BulkImportError(MCardError):
    """Raised when an import stops early; ``report`` tells what was confirmed."""

    def __init__(self, message: str, report: ImportReport) -> None:
        self.report = report
        super().__init__(message)


class InvalidLinesError(InvalidRequestError, BulkImportError):
    """Raised when lines are invalid (or conflict) and skip_invalid is off: nothing published."""

    def __init__(self, report: ImportReport) -> None:
        more = f" (and {report.invalid - 5} more)" if report.invalid > 5 else ""
        first = "; ".join(report.errors[:5])
        summary = f"{report.invalid} invalid lines, nothing published: {first}{more}"
        super().__init__(list(report.errors), message=summary, report=report)


class BrokerFailureError(BulkImportError, BrokerUnavailableError):
    """Raised when an import meets a broker failure, a confirm timeout or nacked requests."""


class LedgerFailureError(BulkImportError, LedgerUnavailableError):
    """Raised when the ledger cannot be read for the conflict check during an import."""


class ImportInterrupted(KeyboardInterrupt):
    """Raised when an import is interrupted (Ctrl-C); ``report`` tells what was confirmed.

    A KeyboardInterrupt on purpose, outside MCardError: a Ctrl-C must stay one, so that no
    ``except Exception`` (or ``except MCardError``) swallows it on its way up and, uncaught, it
    still ends the program as a Ctrl-C does; only a caller that asks for it gets the report.
    """

    def __init__(self, report: ImportReport) -> None:
        self.report = report
        super().__init__("import interrupted")
