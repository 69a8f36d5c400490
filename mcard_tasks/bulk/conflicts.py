"""The import's conflict check: request IDs looked up in the ledger, a chunk at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from mcard_tasks.ledger import get_ledger

if TYPE_CHECKING:
    from mcard_tasks.bulk.lines import Request

__all__ = ["ConflictCheck", "Verdict"]

#: What the ledger holds under a request's ID: nothing, this very request, or another one.
Verdict = Literal["new", "recorded", "conflict"]


class ConflictCheck:
    """Chunked lookups of request IDs in the ledger: conflicts and replays."""

    def __init__(self, ledger_url: str | None, migrate: bool | None = None) -> None:
        """ledger_url: the ledger to consult (opened on first use, so that a ledger down at
        the start fails inside the import, with its report); None checks nothing. migrate:
        see get_ledger."""
        self.ledger_url, self.migrate = ledger_url, migrate

    def recorded(self, requests: list[Request]) -> dict[str, str]:
        """The recorded fingerprints of those request IDs the ledger holds.

        Raises:
            LedgerUnavailableError: the ledger's database cannot be read.
        """
        if self.ledger_url is None or not requests:
            return {}
        return get_ledger(self.ledger_url, migrate=self.migrate).fingerprints(
            sorted({request.request_id for request in requests})
        )

    def verdicts(self, requests: list[Request]) -> list[Verdict]:
        """The verdict of each request, in order (one query for them all)."""
        recorded = self.recorded(requests)
        return [_verdict(recorded.get(request.request_id), request) for request in requests]


def _verdict(known: str | None, request: Request) -> Verdict:
    # The request's fingerprint is computed only for an ID the ledger holds.
    if known is None:
        return "new"
    return "recorded" if known == request.fingerprint else "conflict"
