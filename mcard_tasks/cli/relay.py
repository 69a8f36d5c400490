"""``relay``: the request outbox in the application's database (init, run, status)."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import click

__all__ = ["COMMANDS"]

database_option = click.option(
    "--database",
    "database",
    required=True,
    metavar="URL",
    # From the environment too: a password in a command line is visible to every local user.
    envvar="MCARD_RELAY_DATABASE",
    help="The application's database (SQLAlchemy URL), which holds mcard_request_outbox;"
    " or MCARD_RELAY_DATABASE (keeps its password out of the process list).",
)


@click.group("relay")
def relay() -> None:
    """Requests written with delay_in/apply_in: create their table, relay them, watch them."""


@relay.command("init")
@database_option
def init(database: str) -> None:
    """Create the mcard_request_outbox table (nothing happens if it exists)."""
    from mcard_tasks.request_outbox import create_outbox, outbox_engine

    create_outbox(outbox_engine(database))
    click.echo("mcard_request_outbox ready")


@relay.command("run")
@database_option
@click.option("--once", is_flag=True, help="Relay until nothing is pending, then exit 0.")
def run(database: str, once: bool) -> None:
    """Publish committed requests as delay() publishes them (SIGTERM/Ctrl-C: stop)."""
    from mcard_tasks import app
    from mcard_tasks.relay import RequestRelay
    from mcard_tasks.request_outbox import outbox_engine

    logging.basicConfig(
        level=app.settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    relayer = RequestRelay(app, outbox_engine(database))

    def stop(_signum: int, _frame: FrameType | None) -> None:
        relayer.stopping.set()  # the batch in hand finishes (or rolls back), then it exits

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger(__name__).info("request relay: running (SIGTERM stops it after its batch)")
    relayer.run(once=once)


@relay.command("status")
@database_option
def status(database: str) -> None:
    """Show pending requests and the oldest one's age."""
    from mcard_tasks.relay import outbox_status
    from mcard_tasks.request_outbox import outbox_engine

    found = outbox_status(outbox_engine(database))
    age = "-" if found.oldest_age is None else f"{found.oldest_age:.1f} s"
    click.echo(f"pending     {found.pending}")
    click.echo(f"oldest age  {age}")
    click.echo(f"relayed     {found.relayed} (kept for the retention)")


COMMANDS = [relay]
