"""Engines for the ledger: one pooled engine per process and URL, schema brought to head once."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

__all__ = [
    "autocommit_engine_for",
    "engine_for",
    "normalize_url",
    "sqlite_engine",
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
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

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
    return create_engine(url, pool_size=10, max_overflow=20, connect_args=_PG_CONNECT)


def upgrade_schema(engine: Engine) -> None:
    """Bring the ledger's schema to the newest Alembic revision (safe from many processes)."""
    from alembic import command
    from alembic.config import Config

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines are noise here

    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY}
            )
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


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


def engine_for(url: str) -> Engine:
    """The engine of this process for url, created (and the schema upgraded) on first use.

    Keyed by process id too: a forked child must not reuse its parent's pooled connections.
    """
    url = normalize_url(url)

    def build() -> Engine:
        engine = _create_engine(url)
        upgrade_schema(engine)
        return engine

    return _cached(url, build)
