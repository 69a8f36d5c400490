"""``status``: what the ledger recorded for a request ID, or the dead-letter queue it is in."""

from __future__ import annotations

import json
import sys

import click
from amqp.exceptions import AccessRefused, AMQPError
from kombu.exceptions import OperationalError as BrokerError

from mcard_tasks.payloads import check_request_id

__all__ = ["COMMANDS", "EXIT_DEAD_LETTERED", "EXIT_NO_OUTCOME"]

EXIT_NO_OUTCOME = 6
EXIT_DEAD_LETTERED = 8


@click.command("status")
@click.argument("request_id")
def status(request_id: str) -> None:
    """Print the recorded outcome of REQUEST_ID; without one, the dead letters carrying it
    (exit 8), or that none is recorded yet (exit 6)."""
    from mcard_tasks import app
    from mcard_tasks.ledger import get_ledger

    ledger = get_ledger(app.settings.database_url, migrate=app.settings.migrate)
    outcome = ledger.outcome(check_request_id(request_id))
    if outcome is not None:
        click.echo(json.dumps(outcome, sort_keys=True))
        return
    searched = _dead_lettered(request_id)
    if searched:
        sys.exit(EXIT_DEAD_LETTERED)
    state = ledger.task_state(request_id)
    if state is not None:
        click.echo(f"{request_id}: no outcome; last state {state.state}: {state.result}")
    elif searched is None:
        click.echo(
            f"{request_id}: pending or unknown (no outcome recorded; the dead-letter queues"
            " could not be searched)"
        )
    else:
        click.echo(
            f"{request_id}: pending or unknown (no outcome recorded, and in no dead-letter"
            " queue: still queued or never sent)"
        )
    sys.exit(EXIT_NO_OUTCOME)


def _dead_lettered(request_id: str) -> bool | None:
    """Print each dead letter of request_id: True if there is one, False if none, None if
    the DLQs could not be read (said on stderr: the answer is then only the ledger's)."""
    from mcard_tasks import app
    from mcard_tasks.admin import find_dead_letters

    try:
        found = find_dead_letters(app, request_id)
    except AccessRefused:
        click.echo(
            "note: dead-letter queues not searched: this broker user may not read them (the"
            " operator role may)",
            err=True,
        )
        return None
    except (BrokerError, ConnectionError, AMQPError) as exc:
        click.echo(
            f"note: dead-letter queues not searched: the broker did not let us ({exc})", err=True
        )
        return None
    for each in found:
        letter = each.letter
        click.echo(
            f"{request_id}: dead-lettered in {each.dlq}: {letter.reason}"
            f" (task {letter.task}, deaths {letter.deaths})"
        )
    if found:
        queue = found[0].dlq.removesuffix(".dlq")
        click.echo(f"    see `mcard-tasks dlq show {queue}`; `dlq replay {queue}` once fixed")
    return bool(found)


COMMANDS = [status]
