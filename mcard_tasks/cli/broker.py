"""``broker``: what each role of mcard-tasks may do on the broker."""

from __future__ import annotations

import click

from mcard_tasks.roles import ROLES

__all__ = ["COMMANDS"]


@click.group("broker")
def broker() -> None:
    """The broker users of mcard-tasks' roles."""


@broker.command("permissions")
@click.argument("role", type=click.Choice(ROLES))
def permissions(role: str) -> None:
    """Print ROLE's RabbitMQ permissions: configure, write and read, tab-separated.

    \b
    For example:
      rabbitmqctl set_permissions -p mcard app $(mcard-tasks broker permissions producer)
    (quote them in a shell that splits on more than tabs and spaces).
    """
    from mcard_tasks import app  # noqa: F401  (MCARD_SPECS' task kinds, registered)
    from mcard_tasks.roles import permissions as of_role

    click.echo(of_role(role).line())


COMMANDS = [broker]
