"""``status``: what the ledger recorded for a request ID."""

from __future__ import annotations

import json
import sys

import click

from mcard_tasks.payloads import check_request_id

__all__ = ["COMMANDS", "EXIT_NO_OUTCOME"]

EXIT_NO_OUTCOME = 6


@click.command("status")
@click.argument("request_id")
def status(request_id: str) -> None:
    """Print the recorded outcome of REQUEST_ID (exit 6 while none is recorded)."""
    from mcard_tasks import app
    from mcard_tasks.ledger import get_ledger

    ledger = get_ledger(app.settings.database_url, migrate=app.settings.migrate)
    outcome = ledger.outcome(check_request_id(request_id))
    if outcome is not None:
        click.echo(json.dumps(outcome, sort_keys=True))
        return
    state = ledger.task_state(request_id)
    if state is not None:
        click.echo(f"{request_id}: no outcome; last state {state.state}: {state.result}")
    else:
        click.echo(
            f"{request_id}: pending or unknown (no outcome recorded: still queued, dead-lettered"
            " or never sent)"
        )
    sys.exit(EXIT_NO_OUTCOME)


COMMANDS = [status]
