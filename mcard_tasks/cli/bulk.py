"""``import FILE``: enqueue every request of a JSON Lines file, every one confirmed."""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import click

from mcard_tasks.cli import EXIT_BROKER, EXIT_INVALID, EXIT_LEDGER

if TYPE_CHECKING:
    from mcard_tasks.bulk.report import ImportReport

__all__ = ["COMMANDS", "EXIT_INTERRUPTED"]

#: 128 + SIGINT, as a shell reports a Ctrl-C.
EXIT_INTERRUPTED = 130
LABELS = {"validate": "validating", "publish": "publishing"}


class _Bars:
    """A click progress bar per phase, on stderr; fed with (phase, done, total)."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.bar: Any = None
        self.done = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.close()
            self.phase, self.done = phase, 0
            self.bar = click.progressbar(
                length=max(total, 1), label=LABELS.get(phase, phase), file=sys.stderr
            )
            self.bar.__enter__()
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def __enter__(self) -> _Bars:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _show(report: ImportReport, ok: bool) -> None:
    for error in report.errors:
        click.secho(error, fg="yellow", err=True)
    first, *rest = report.describe()
    click.secho(first, fg=None if ok else "red", err=not ok)
    for line in rest:
        click.echo(line, err=True)


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Publish the valid lines even if some are invalid (they are listed).",
)
def import_command(file: Path, skip_invalid: bool) -> None:
    """Enqueue every request of FILE, JSON Lines, one request per line:

    \b
    {"task": "single_mint", "card_id": "c-1", "owner": "alice", "request_id": "r-1"}

    task is mint, single_mint or single_burn; the other keys are its fields (request_id is
    optional). Every line is validated first: unless --skip-invalid, one invalid line means
    nothing is published (exit 2). Each request is published as delay() would, confirmed by
    the broker. Re-running a file is safe: requests are idempotent by request ID.
    Exit 4 on a broker failure, 130 on Ctrl-C, both with the count of confirmed requests.
    """
    from mcard_tasks.bulk import enqueue_many
    from mcard_tasks.errors import (
        BrokerFailureError,
        ImportInterrupted,
        InvalidLinesError,
        LedgerFailureError,
    )

    try:
        with _Bars() as bars:
            report = enqueue_many(file, skip_invalid=skip_invalid, progress=bars)
    except InvalidLinesError as exc:
        _show(exc.report, ok=False)
        sys.exit(EXIT_INVALID)
    except BrokerFailureError as exc:
        _show(exc.report, ok=False)
        sys.exit(EXIT_BROKER)
    except LedgerFailureError as exc:
        _show(exc.report, ok=False)
        sys.exit(EXIT_LEDGER)
    except ImportInterrupted as exc:
        _show(exc.report, ok=False)
        sys.exit(EXIT_INTERRUPTED)
    nothing = report.invalid > 0 and report.published == 0
    _show(report, ok=not nothing)
    if nothing:
        sys.exit(EXIT_INVALID)


COMMANDS = [import_command]
