"""The request outbox: requests written in the application's own transaction, relayed later.

One table in the APPLICATION's database (not the ledger): ``delay_in`` inserts one row in the
caller's open transaction, so the request exists exactly when the caller's commit does; the
relay (mcard_tasks.relay) publishes committed rows. Named ``mcard_request_outbox`` so nobody
confuses it with the worker's event ``outbox`` in the ledger.

Applications with their own migrations import :data:`REQUEST_OUTBOX` (e.g. into Alembic's
``target_metadata``); ``mcard-tasks relay init`` creates it otherwise.
"""

from __future__ import annotations

import json
import time
import weakref
from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from mcard_tasks.database import normalize_url, sqlite_engine
from mcard_tasks.django_outbox import DjangoConnection, write_django
from mcard_tasks.errors import NoTransactionError
from mcard_tasks.messages import TaskMessage, TaskMessages

if TYPE_CHECKING:
    from celery import Celery

    from mcard_tasks.payloads import Payload

__all__ = [
    "METADATA",
    "REQUEST_OUTBOX",
    "Database",
    "create_outbox",
    "outbox_engine",
    "outbox_message",
    "stored_message",
    "write_request",
]

METADATA = MetaData()

#: One row per request: relayed_at is NULL until the broker confirmed its message.
REQUEST_OUTBOX = Table(
    "mcard_request_outbox",
    METADATA,
    # The relay publishes in id order; BIGINT on PostgreSQL, SQLite's rowid alias there.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    # Not unique: a request sent twice is one request at the worker, not an error here.
    Column("request_id", String(200), nullable=False),
    Column("task", String(200), nullable=False),
    #: The message delay() would publish (JSON of a TaskMessage), built at delay_in: the
    #: relay only publishes it, and its producer fields (origin, reply_to) are the caller's.
    Column("message", Text, nullable=False),
    Column("created_at", Float, nullable=False),  # time.time() of the writing process
    Column("relayed_at", Float, nullable=True),
    Index("mcard_request_outbox_pending", "relayed_at", "id"),
)

#: What delay_in accepts as the caller's transaction: SQLAlchemy's, or Django's connection
#: inside transaction.atomic() (mcard_tasks.django_outbox).
Database = Connection | Session | DjangoConnection
#: Django's cursors take %s placeholders whatever the backend; the columns in row order.
_DJANGO_INSERT = (
    "INSERT INTO mcard_request_outbox (request_id, task, message, created_at)"
    " VALUES (%s, %s, %s, %s)"
)
#: The message builder of each app (its constants looked up once, not per request).
_MESSAGES: weakref.WeakKeyDictionary[Celery, TaskMessages] = weakref.WeakKeyDictionary()


def outbox_message(app: Celery, task: str, request_id: str, payload: Payload) -> str:
    """The row's message: the one delay() publishes for the request (messages.py), as JSON."""
    messages = _MESSAGES.get(app)
    if messages is None:
        messages = _MESSAGES[app] = TaskMessages(app)
    built = messages.build(task=task, request_id=request_id, payload=payload)
    return json.dumps(built._asdict(), ensure_ascii=False, separators=(",", ":"))


def stored_message(text: str) -> TaskMessage:
    """A row's message, ready for basic_publish (JSON arrays come back as lists: AMQP tables
    encode lists and tuples alike)."""
    return TaskMessage(**json.loads(text))


def write_request(db: Database, request_id: str, task: str, message_json: str) -> None:
    """Insert one request row in db's current transaction (begun if none is; never committed
    here: the caller's commit is the request's)."""
    row = {
        "request_id": request_id,
        "task": task,
        "message": message_json,
        "created_at": time.time(),
    }
    if isinstance(db, Connection):
        _check_transaction(db)
    if isinstance(db, Connection | Session):
        db.execute(insert(REQUEST_OUTBOX), row)
    else:
        write_django(db, _DJANGO_INSERT, row)


def _check_transaction(connection: Connection) -> None:
    """Refuse a connection whose row would commit on its own (AUTOCOMMIT) or that has no
    transaction of the caller's to commit with (a request must exist exactly when it does).

    A Session is fine: it begins its transaction on first use and commits with the caller.
    """
    autocommit = connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    if autocommit or not connection.in_transaction():
        raise NoTransactionError(
            "delay_in needs the caller's open transaction: use engine.begin() or"
            " connection.begin(), not a connection in AUTOCOMMIT or outside a transaction"
        )


def outbox_engine(url: str) -> Engine:
    """An engine on the application's database for the relay's own commands.

    On SQLite every transaction takes the write lock at BEGIN (IMMEDIATE): the relay's claim,
    publish and mark are one transaction, so two relays never publish one row concurrently.
    """
    url = normalize_url(url)
    if not url.startswith("sqlite"):
        return create_engine(
            url, pool_size=2, connect_args={"connect_timeout": 5}, hide_parameters=True
        )
    return sqlite_engine(url, wal=False)


def create_outbox(engine: Engine) -> None:
    """Create the table and its index if missing (idempotent)."""
    METADATA.create_all(engine, checkfirst=True)
