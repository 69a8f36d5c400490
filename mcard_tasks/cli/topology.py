"""``topology``: what mcard-tasks declares on the broker."""

from __future__ import annotations

import click

__all__ = ["COMMANDS"]


@click.group("topology")
def topology() -> None:
    """Show, check or declare the broker topology."""


@topology.command("show")
def show() -> None:
    """Print every exchange, queue, binding and queue argument."""
    from mcard_tasks import app
    from mcard_tasks.topology import build_topology

    built = build_topology(app.settings)
    for exchange in built.exchanges:
        click.echo(f"exchange {exchange.name} type={exchange.type} durable={exchange.durable}")
    for queue in built.task_queues + built.dead_letter_queues:
        click.echo(f"queue {queue.name} <- exchange {queue.exchange.name} key={queue.routing_key}")
        for key, value in sorted((getattr(queue, "queue_arguments", None) or {}).items()):
            click.echo(f"    {key}={value}")


@topology.command("check")
def check() -> None:
    """Compare the broker with the declared topology; exit 1 and explain any drift."""
    import sys

    from mcard_tasks import app
    from mcard_tasks.admin import check_topology

    notes: list[str] = []
    problems = check_topology(app, notes)
    for note in notes:
        click.secho(f"note: {note}", fg="yellow", err=True)
    for problem in problems:
        click.secho(f"drift: {problem}", fg="red", err=True)
    if problems:
        sys.exit(1)
    click.echo("topology matches the broker")


@topology.command("declare")
def declare() -> None:
    """Declare every exchange and queue (dead-letter side first)."""
    from mcard_tasks import app
    from mcard_tasks.admin import declare_topology

    declare_topology(app)
    click.echo("declared the mcard topology")


COMMANDS = [topology]
