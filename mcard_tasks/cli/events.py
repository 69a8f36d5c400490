"""``events``: watch outcome events live."""

from __future__ import annotations

import time

import click

__all__ = ["COMMANDS"]


@click.command("events")
@click.option(
    "--pattern",
    default="mcard.#",
    show_default=True,
    help="Topic pattern, e.g. 'mcard.*.rejected' or 'mcard.single_burn.#'.",
)
@click.option("--queue", default=None, help="A durable queue to (re)use; default a private one.")
@click.option("--count", type=int, default=None, help="Stop after this many events.")
@click.option("--timeout", type=float, default=None, help="Stop after this many quiet seconds.")
def events(pattern: str, queue: str | None, count: int | None, timeout: float | None) -> None:
    """Print outcome events as JSON lines (routing key, then the outcome object)."""
    from mcard_tasks import app
    from mcard_tasks.events import subscribe
    from mcard_tasks.payloads import canonical_json

    shown, quiet_since = 0, time.monotonic()
    with subscribe(app, pattern, queue) as subscription:
        for event in subscription:
            if event is None:
                if timeout is not None and time.monotonic() - quiet_since > timeout:
                    return
                continue
            quiet_since = time.monotonic()
            click.echo(f"{event.routing_key} {canonical_json(event.outcome)}")
            shown += 1
            if count is not None and shown >= count:
                return


COMMANDS = [events]
