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
@click.option(
    "--user",
    default=None,
    help="The broker user they are for: a subscriber's queues are then its own only"
    " (mcard.events.USER.*); without it, every subscriber shares mcard.events.*.",
)
def permissions(role: str, user: str | None) -> None:
    """Print ROLE's RabbitMQ permissions: configure, write and read, tab-separated.

    \b
    For example:
      rabbitmqctl set_permissions -p mcard app $(mcard-tasks broker permissions producer)
      rabbitmqctl set_permissions -p mcard shop \\
          $(mcard-tasks broker permissions subscriber --user shop)
    (quote them in a shell that splits on more than tabs and spaces).
    """
    from mcard_tasks import app  # noqa: F401  (MCARD_SPECS' task kinds, registered)
    from mcard_tasks.roles import permissions as of_role

    try:
        click.echo(of_role(role, user).line())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--user") from exc


@broker.command("definitions")
@click.option("--vhost", default="/", show_default=True, help="The virtual host of mcard-tasks.")
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(ROLES),
    help="A role to create a user for (repeatable; default: every role).",
)
@click.option(
    "--prefix", default="mcard-", show_default=True, help="User names: the prefix, then the role."
)
@click.option("--admin", default=None, help="Also an administrator user of this name (for people).")
def definitions(vhost: str, roles: tuple[str, ...], prefix: str, admin: str | None) -> None:
    """Print a RabbitMQ definitions file (JSON) with a user per role and its permissions.

    Each role's password comes from MCARD_BROKER_PASSWORD_<ROLE> (and the administrator's
    from MCARD_BROKER_PASSWORD_ADMIN) and is stored hashed, never in clear.
    """
    import json

    from mcard_tasks import app  # noqa: F401  (MCARD_SPECS' task kinds, registered)
    from mcard_tasks.broker_users import definitions as build

    users = {role: f"{prefix}{role}" for role in (roles or ROLES)}
    click.echo(json.dumps(build(vhost, users, admin=admin), indent=2))


COMMANDS = [broker]
