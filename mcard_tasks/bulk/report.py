"""The report of an import: what it read, refused, published and got confirmed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["MAX_ERRORS", "RERUN_ADVICE", "ImportReport", "Status"]

#: Error messages (and nacked request IDs) kept in a report; all are counted.
MAX_ERRORS = 100
RERUN_ADVICE = (
    "requests are idempotent by request ID: re-running the same file is safe and does not"
    " repeat what already happened"
)

Status = Literal["running", "complete", "refused", "failed", "interrupted"]


@dataclass
class ImportReport:
    """What an import read, refused, published and got confirmed.

    ``confirmed`` is exact: it counts the broker's acks, nothing else.
    """

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
    status: Status = "running"
    failure: str | None = None
    note: str | None = None
    seconds: float = 0.0
    _error_lines: list[tuple[int, str]] = field(default_factory=list, repr=False)

    @property
    def unconfirmed(self) -> int:
        """Published but neither acked nor nacked: they may or may not be queued."""
        return self.published - self.confirmed - self.nacked

    def add_error(self, line: int, problems: Iterable[str]) -> None:
        """Count an invalid line; keep its problems if fewer than MAX_ERRORS are kept."""
        self.invalid += 1
        if len(self._error_lines) < MAX_ERRORS:
            self._error_lines.append((line, f"line {line}: " + "; ".join(problems)))
            self._error_lines.sort()
            self.errors = [message for _, message in self._error_lines]

    def settled(self, request_ids: list[str], nacked: bool) -> None:
        """Count the requests the broker confirmed (or refused: nacked)."""
        if nacked:
            self.nacked += len(request_ids)
            room = MAX_ERRORS - len(self.nacked_request_ids)
            self.nacked_request_ids += request_ids[: max(0, room)]
        else:
            self.confirmed += len(request_ids)

    def check_passes(self) -> None:
        """Note it if the publishing pass left out other lines than validation found."""
        if self.skipped != self.invalid:
            self.note = (
                f"note: {self.skipped} lines were left out while publishing but"
                f" {self.invalid} were invalid when validating; the file or the ledger"
                " changed in between"
            )

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
        lines = [self.summary(), *filter(None, (self.failure, self.note))]
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
