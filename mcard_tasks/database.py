"""Engines for the ledger: one pooled engine per process and URL; on first use its schema is
brought to head (MCARD_MIGRATE, the embedded setup) or checked to be at head (a least-privilege
setup, where only ``mcard-tasks db upgrade`` as the owner role runs DDL).

Every engine hides statement parameters in its errors (``hide_parameters``): a failing
statement's error, logged or kept as a task state, never carries the request's values.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from mcard_tasks.errors import ConfigurationError, SchemaNotAtHeadError

__all__ = [
    "autocommit_engine_for",
    "check_schema",
    "current_revision",
    "engine_for",
    "head_revision",
    "masked_url",
    "normalize_url",
    "sqlite_engine",
    "standalone_engine",
    "upgrade_schema",
]

MIGRATIONS = Path(__file__).parent / "migrations"
_ENGINES: dict[tuple[int, str], Engine] = {}
_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # A pool child forked while another thread (the outbox relay) held the lock would wait on
    # it forever. The parent's engines stay referenced (keyed by its pid) and unused: closing
    # them here would close sockets the parent still uses.
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
# A server that drops packets must not hold a connect (and a waiting get()) for minutes: libpq
# waits without limit by default.
_PG_CONNECT = {"connect_timeout": 5}
# Any fixed number: PostgreSQL advisory lock that serializes concurrent schema upgrades.
_SCHEMA_LOCK_KEY = 0x6D63617264


def masked_url(url: str | Engine) -> str:
    """url with its password replaced by ***: what may be printed or logged."""
    if isinstance(url, Engine):
        return url.url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: show nothing of it
        return "<the configured database URL>"


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain postgresql:// URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def sqlite_engine(url: str, *, wal: bool = True) -> Engine:
    """An SQLite engine whose write transactions take the write lock at BEGIN (IMMEDIATE), and
    whose writers wait for each other (busy timeout) instead of failing.

    wal: switch the file to WAL, so readers run beside the one writer (the ledger's own file;
    an application's database keeps the journal mode its owner chose).
    """
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (pysqlite's own is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that reads and
        # then writes can fail with SQLITE_BUSY when another process wrote in between.
        readonly = connection.get_execution_options().get("mcard_readonly", False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return sqlite_engine(url)
    # No pre-ping (a round trip per transaction): a connection gone stale (the server
    # restarted) fails its transaction, which is retried as a transient error, and SQLAlchemy
    # then replaces every connection older than the failure. Reads of outcomes and task states
    # retry once on a fresh connection at once (Ledger._read), so a stale pool never fails them.
    return create_engine(
        url, pool_size=10, max_overflow=20, connect_args=_PG_CONNECT, hide_parameters=True
    )


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest Alembic revision of the ledger's migrations (what this code expects)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "the ledger's migrations have a single head"
    return head


def current_revision(connection: Connection) -> str | None:
    """The ledger database's Alembic revision; None if it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def standalone_engine(url: str) -> Engine:
    """An engine on url of its own (not this process's shared one, nor any schema step): for
    one command, disposed by its caller."""
    return _create_engine(normalize_url(url))


def upgrade_schema(engine: Engine) -> str:
    """Bring the ledger's schema to the newest Alembic revision (safe from many processes);
    return that revision."""
    from alembic import command

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines are noise here

    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY}
            )
        config = _alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        revision = current_revision(connection)
    return revision or "base"


def check_schema(engine: Engine) -> str:
    """Check (without any DDL) that the ledger's schema is at the head revision; return it.

    Raises:
        SchemaNotAtHeadError: it is not (never migrated, older, or newer than this code).
        ConfigurationError: the revision cannot be read (e.g. no SELECT on alembic_version).
        OperationalError: the database cannot be reached.
    """
    expected = head_revision()
    try:
        with engine.connect() as connection:
            current = current_revision(connection)
    except OperationalError:
        raise  # unreachable: the caller's "ledger unavailable"
    except SQLAlchemyError as exc:
        raise ConfigurationError(
            f"cannot read the schema revision of the ledger at {masked_url(engine)}:"
            f" {_first_line(exc)}"
        ) from exc
    if current != expected:
        raise SchemaNotAtHeadError(masked_url(engine), current, expected)
    return current


def _first_line(exc: BaseException) -> str:
    """The driver's own message of a SQLAlchemy error, without SQLAlchemy's SQL and links."""
    cause = getattr(exc, "orig", None) or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def autocommit_engine_for(engine: Engine) -> Engine:
    """The engine of this process on engine's PostgreSQL database whose connections run each
    statement as its own transaction (no BEGIN/COMMIT round trips): the ledger's one-statement
    fast path. Its own pool: switching a pooled connection's isolation level per use costs a
    tenth of the path."""
    url = engine.url.render_as_string(hide_password=False)
    return _cached(
        f"{url} autocommit",
        lambda: create_engine(
            engine.url,
            isolation_level="AUTOCOMMIT",
            hide_parameters=True,
            pool_size=10,
            max_overflow=20,
            connect_args=_PG_CONNECT,
        ),
    )


def _cached(name: str, build: Callable[[], Engine]) -> Engine:
    """This process's engine called name, built on first use (a forked child builds its own:
    it must not reuse its parent's pooled connections)."""
    key = (os.getpid(), name)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = build()
        return engine


def engine_for(url: str, *, migrate: bool | None = None) -> Engine:
    """The engine of this process for url, created on first use, with its schema brought to
    head then (migrate) or only checked to be at head (not migrate: no DDL at all, see
    check_schema). migrate None: MCARD_MIGRATE of this process's environment.

    Keyed by process id too: a forked child must not reuse its parent's pooled connections.
    An engine whose check failed is not kept: the next use checks again.
    """
    url = normalize_url(url)
    if migrate is None:
        from mcard_tasks.config import get_settings

        migrate = get_settings().migrate

    def build() -> Engine:
        engine = _create_engine(url)
        try:
            if migrate:
                upgrade_schema(engine)
            else:
                check_schema(engine)
        except BaseException:
            engine.dispose()
            raise
        return engine

    return _cached(url, build)
