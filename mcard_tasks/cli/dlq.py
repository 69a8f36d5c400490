"""``dlq``: look at, replay and purge the dead-letter queues."""

from __future__ import annotations

import click

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
def replay(queue: str, limit: int | None) -> None:
    """Republish dead letters of QUEUE to it, same request IDs (exactly once still holds)."""
    from mcard_tasks import app
    from mcard_tasks.admin import replay_dlq

    click.echo(f"replayed {replay_dlq(app, queue, limit)} message(s) to {queue}")


@dlq.command("purge")
@queue_argument
@click.confirmation_option(prompt="Delete every dead letter of this queue for good?")
def purge(queue: str) -> None:
    """Delete every dead letter of QUEUE (asks first; --yes to skip)."""
    from mcard_tasks import app
    from mcard_tasks.admin import purge_dlq

    click.echo(f"purged {purge_dlq(app, queue)} message(s) from {queue}.dlq")


COMMANDS = [dlq]
