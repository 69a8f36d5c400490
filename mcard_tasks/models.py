"""The ledger's tables (SQLAlchemy 2 declarative); the schema itself is versioned by Alembic."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "Card",
    "LegacyCount",
    "Operation",
    "OutboxEvent",
    "ReplayCount",
    "TaskState",
]


class Base(DeclarativeBase):
    pass


class Card(Base):
    """A card: minted once, held by one owner, burned at most once."""

    __tablename__ = "cards"

    card_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    card_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    status: Mapped[str] = mapped_column(String(16))  # minting | active | burning | burned
    minted_by: Mapped[str] = mapped_column(String(128))
    minted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    burned_by: Mapped[str | None] = mapped_column(String(128))
    burned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Operation(Base):
    """One request, keyed by its request ID: what it asked (fingerprint) and its outcome."""

    __tablename__ = "operations"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # pending | succeeded | rejected
    # The outcome object exactly as first recorded: a replay returns these very bytes.
    outcome: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_operations_task_status", "task", "status"),)


class TaskState(Base):
    """A non-final Celery state (failure, retry) of a request that has no recorded outcome."""

    __tablename__ = "task_states"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[str] = mapped_column(String(32))
    result: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OutboxEvent(Base):
    """An outcome event, written with its outcome and published after the commit (an outbox)."""

    __tablename__ = "outbox"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    routing_key: Mapped[str] = mapped_column(String(128))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


class LegacyCount(Base):
    """How many legacy (seed-shaped) messages of a task were executed, by their key: what
    tells an operator which old publishers still send (``mcard-tasks queues``)."""

    __tablename__ = "legacy_messages"

    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    legacy_key: Mapped[str] = mapped_column(String(128), primary_key=True)
    executed: Mapped[int] = mapped_column(BigInteger)
    last_executed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReplayCount(Base):
    """How many deliveries of a task found their request ID recorded and got its stored
    outcome back (replays, redeliveries, duplicates absorbed): ``mcard_replays_total``."""

    __tablename__ = "replays"

    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    absorbed: Mapped[int] = mapped_column(BigInteger)
    last_replayed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
