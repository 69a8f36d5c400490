"""The import's conflict check: request IDs looked up in the ledger, a chunk at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from mcard_tasks.errors import LedgerUnavailableError
from mcard_tasks.models import Operation

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from mcard_tasks.bulk.lines import Request

__all__ = ["ConflictCheck", "Verdict"]

#: What the ledger holds under a request's ID: nothing, this very request, or another one.
Verdict = Literal["new", "recorded", "conflict"]


class ConflictCheck:
    """Chunked lookups of request IDs in the ledger: conflicts and replays."""

    def __init__(self, engine: Engine | None) -> None:
        """engine: the ledger's; None checks nothing (every request is new)."""
        # Read-only: on SQLite a plain BEGIN, never a write lock the workers would wait for.
        self.engine = None if engine is None else engine.execution_options(mcard_readonly=True)

    def recorded(self, requests: list[Request]) -> dict[str, str]:
        """The recorded fingerprints of those request IDs the ledger holds.

        Raises:
            LedgerUnavailableError: the ledger's database cannot be read.
        """
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

    def verdicts(self, requests: list[Request]) -> list[Verdict]:
        """The verdict of each request, in order (one query for them all)."""
        recorded = self.recorded(requests)
        return [_verdict(recorded.get(request.request_id), request) for request in requests]


def _verdict(known: str | None, request: Request) -> Verdict:
    # The request's fingerprint is computed only for an ID the ledger holds.
    if known is None:
        return "new"
    return "recorded" if known == request.fingerprint else "conflict"
