"""``mcard-tasks``: the operator's and application's command line (click, like Celery's)."""

from __future__ import annotations

import sys
from typing import Any

import click
from kombu.exceptions import OperationalError as BrokerError

from mcard_tasks.errors import (
    BrokerUnavailableError,
    ConflictError,
    InvalidRequestError,
    LedgerUnavailableError,
    MCardError,
)

__all__ = ["main"]

#: Exit codes an operator's script can rely on.
EXIT_INVALID, EXIT_CONFLICT, EXIT_BROKER, EXIT_LEDGER, EXIT_OTHER = 2, 3, 4, 5, 1
BROKER_HINT = (
    "is RabbitMQ running? Start it with `rabbitmq-server -detached` (or `docker compose up -d"
    " rabbitmq`), or point MCARD_BROKER_URL at a running broker"
)


def _broker_failure(exc: BaseException) -> str:
    """The line for a broker that cannot be reached: a failed TLS verification named as such
    (the broker's host, not trusted or not matching), anything else with the usual hint."""
    from mcard_tasks.config import get_settings
    from mcard_tasks.tls import tls_failure

    return tls_failure(exc, get_settings()) or f"cannot reach the broker ({exc}); {BROKER_HINT}"


def _fail(code: int, message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


class Group(click.Group):
    """Turns the project's errors into one clear line and a meaningful exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvalidRequestError as exc:
            _fail(EXIT_INVALID, str(exc))
        except ConflictError as exc:
            _fail(EXIT_CONFLICT, str(exc))
        except LedgerUnavailableError as exc:
            _fail(EXIT_LEDGER, f"{exc}; check MCARD_DATABASE_URL")
        except BrokerUnavailableError as exc:
            _fail(EXIT_BROKER, f"{exc}; {BROKER_HINT}")
        except (BrokerError, ConnectionError) as exc:
            _fail(EXIT_BROKER, _broker_failure(exc))
        except MCardError as exc:
            _fail(EXIT_OTHER, str(exc))


@click.group(cls=Group)
@click.version_option(package_name="mcard-tasks")
def main() -> None:
    """Mint and burn digital cards through Celery and RabbitMQ, exactly once per request ID."""


def _register() -> None:
    from mcard_tasks.cli import (
        broker,
        bulk,
        db,
        demo,
        dlq,
        enqueue,
        events,
        health,
        metrics,
        relay,
        status,
        topology,
        worker,
    )

    modules = (
        enqueue,
        bulk,
        relay,
        status,
        topology,
        broker,
        dlq,
        events,
        health,
        metrics,
        demo,
        worker,
        db,
    )
    for module in modules:
        for command in module.COMMANDS:
            main.add_command(command)


_register()
