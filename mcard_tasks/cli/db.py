"""``db``: the ledger's schema, migrated by the owner role (``upgrade``) or checked (``check``).

With ``MCARD_MIGRATE=false`` no other process runs DDL: a deploy step runs
``mcard-tasks db upgrade`` with ``MCARD_DATABASE_URL`` of the owner role (mcard_owner, see
deploy/postgres-roles.sql) before workers and producers start. What these commands print
never shows the URL's password or a statement's parameters.
"""

from __future__ import annotations

from typing import Any

import click

__all__ = ["COMMANDS", "EXIT_NOT_AT_HEAD"]

#: ``db check``: the schema is reachable but not at head.
EXIT_NOT_AT_HEAD = 7


def _first_line(exc: BaseException) -> str:
    """The driver's own message, without SQLAlchemy's SQL and links."""
    cause = getattr(exc, "orig", None) or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def _engine(url: str) -> Any:
    from mcard_tasks.cli import EXIT_INVALID, _fail
    from mcard_tasks.database import masked_url, standalone_engine

    try:
        return standalone_engine(url)
    except Exception as exc:  # a URL SQLAlchemy cannot use (its message may quote the URL)
        _fail(
            EXIT_INVALID,
            f"MCARD_DATABASE_URL ({masked_url(url)}) is not a usable database URL:"
            f" {type(exc).__name__}",
        )


@click.group("db")
def db() -> None:
    """The ledger's schema (MCARD_DATABASE_URL): migrate it to head, or check it is there."""


@db.command("upgrade")
def upgrade() -> None:
    """Run the ledger's Alembic migrations to head; print the revision.

    Run it as the role that owns the ledger's schema (mcard_owner): workers and producers with
    MCARD_MIGRATE=false only check that the schema is at head. Exit 5 when it fails.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from mcard_tasks import app
    from mcard_tasks.cli import EXIT_LEDGER, _fail
    from mcard_tasks.database import masked_url, upgrade_schema

    url = app.settings.database_url
    engine = _engine(url)
    try:
        revision = upgrade_schema(engine)
    except SQLAlchemyError as exc:
        _fail(
            EXIT_LEDGER,
            f"migrating the ledger at {masked_url(url)} failed: {_first_line(exc)}"
            " (run it with MCARD_DATABASE_URL of the schema's owner role, e.g. mcard_owner)",
        )
    finally:
        engine.dispose()
    click.echo(f"ledger at {masked_url(url)}: revision {revision} (head)")


@db.command("check")
def check() -> None:
    """Check, without any DDL, that the ledger's schema is at head: exit 0 when it is, 7 when
    it is not, 5 when the database is unreachable."""
    from sqlalchemy.exc import OperationalError

    from mcard_tasks import app
    from mcard_tasks.cli import EXIT_LEDGER, _fail
    from mcard_tasks.database import check_schema, masked_url
    from mcard_tasks.errors import SchemaNotAtHeadError

    url = app.settings.database_url
    engine = _engine(url)
    try:
        revision = check_schema(engine)
    except SchemaNotAtHeadError as exc:
        _fail(EXIT_NOT_AT_HEAD, str(exc))
    except OperationalError as exc:
        _fail(EXIT_LEDGER, f"the ledger at {masked_url(url)} is unavailable: {_first_line(exc)}")
    finally:
        engine.dispose()
    click.echo(f"ledger at {masked_url(url)}: revision {revision} (head)")


COMMANDS = [db]
