"""The error tree of mcard-tasks: one root, and a class per thing that can go wrong."""

from __future__ import annotations

from celery.exceptions import TimeoutError as CeleryTimeoutError

__all__ = [
    "BrokerUnavailableError",
    "ConfigurationError",
    "ConflictError",
    "InvalidRequestError",
    "LedgerUnavailableError",
    "LedgerWaitTimeoutError",
    "MCardError",
    "TopologyDriftError",
    "TransientError",
]


class MCardError(Exception):
    """Raised for any error of mcard-tasks; every other error derives from it."""


class InvalidRequestError(MCardError, ValueError):
    """Raised when a request's fields break the contract (the message names field and rule)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid request: " + "; ".join(problems))


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
