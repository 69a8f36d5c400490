"""``dlq``: look at, replay and purge the dead-letter queues."""

from __future__ import annotations

import sys

import click

from mcard_tasks.cli import EXIT_INVALID
from mcard_tasks.specs import task_names

__all__ = ["COMMANDS"]

queue_argument = click.argument("queue", type=click.Choice(task_names()))


@click.group("dlq")
def dlq() -> None:
    """Dead letters: messages that could not be processed, with their reasons."""


@dlq.command("list")
def list_() -> None:
    """Count the dead letters of every task queue."""
    from mcard_tasks import app
    from mcard_tasks.admin import queue_depths

    for depth in queue_depths(app):
        if depth.name.endswith(".dlq"):
            click.echo(f"{depth.name:<28} {max(depth.ready, 0):>8} dead letters")


@dlq.command("show")
@queue_argument
@click.option("--limit", default=20, show_default=True)
def show(queue: str, limit: int) -> None:
    """Show dead letters of QUEUE (they stay in the queue)."""
    from mcard_tasks import app
    from mcard_tasks.admin import dead_letters

    letters = dead_letters(app, queue, limit)
    for letter in letters:
        click.echo(f"{letter.request_id}  {letter.task}  deaths={letter.deaths}")
        if letter.key is not None:
            click.echo(f"    key:    {letter.key} (a legacy message)")
        click.echo(f"    reason: {letter.reason}")
        click.echo(f"    body:   {letter.body}")
    click.echo(f"{len(letters)} shown")


@dlq.command("replay")
@queue_argument
@click.option("--limit", type=int, default=None, help="Replay at most this many.")
@click.option(
    "--dry-run", is_flag=True, help="Show what would be replayed, and why not; change nothing."
)
def replay(queue: str, limit: int | None, dry_run: bool) -> None:
    """Republish the valid dead letters of QUEUE to it, same request IDs (exactly once still
    holds), with fresh retries.

    Only the letters in QUEUE.dlq when it starts are looked at (one that fails again is not
    replayed twice). A letter that is not a valid request of QUEUE, or was dead-lettered as
    from an unauthorized producer, is refused and left in the DLQ; exit 2 if any was refused.
    """
    from mcard_tasks import app
    from mcard_tasks.admin import replay_dlq

    done = replay_dlq(app, queue, limit, dry_run=dry_run)
    for verdict in done.verdicts:
        letter = verdict.letter
        if dry_run:
            state = "valid" if verdict.problem is None else f"invalid: {verdict.problem}"
            click.echo(f"{letter.request_id}  {letter.task}  {state}")
        elif verdict.problem is not None:
            click.echo(f"refused {letter.request_id}  {letter.task}: {verdict.problem}")
        else:
            continue
        click.echo(f"    dead-lettered: {letter.reason}")
    refused = len(done.refused)
    if dry_run:
        click.echo(
            f"dry run: {len(done.replayed)} of {len(done.verdicts)} message(s) would be"
            f" replayed to {queue}, {refused} refused; nothing changed"
        )
    else:
        left = f"; refused {refused}, left in {queue}.dlq" if refused else ""
        click.echo(f"replayed {len(done.replayed)} message(s) to {queue}{left}")
    if refused:
        sys.exit(EXIT_INVALID)


@dlq.command("purge")
@queue_argument
@click.confirmation_option(prompt="Delete every dead letter of this queue for good?")
def purge(queue: str) -> None:
    """Delete every dead letter of QUEUE (asks first; --yes to skip)."""
    from mcard_tasks import app
    from mcard_tasks.admin import purge_dlq

    click.echo(f"purged {purge_dlq(app, queue)} message(s) from {queue}.dlq")


COMMANDS = [dlq]
