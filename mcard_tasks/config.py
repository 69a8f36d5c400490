"""The one configuration object, read from MCARD_* environment variables (12-factor)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "default_database_url", "get_settings", "settings_of"]


def default_database_url() -> str:
    """An SQLite file in the user's data folder, the same for every process of this user."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{base / 'mcard-tasks' / 'ledger.sqlite3'}"


class Settings(BaseSettings):
    """Every setting of mcard-tasks; each field is the variable MCARD_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="MCARD_", extra="ignore", frozen=True)

    broker_url: str = "amqp://guest:guest@localhost:5672//"
    database_url: str = Field(default_factory=default_database_url)
    concurrency: int = Field(default=8, ge=1, le=512)
    pool: Literal["threads", "prefork", "solo"] = "threads"
    worker_name: str = "mcard@%h"
    log_level: str = "INFO"
    log_tasks: bool = False
    flower_user: str | None = None
    flower_password: str | None = None
    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: int = Field(default=5, ge=1)
    publish_timeout: float = Field(default=5.0, gt=0)
    prefetch_multiplier: int | None = Field(default=None, ge=1, le=64)
    broker_pool_limit: int = Field(default=16, ge=1)
    check_conflicts: bool = True
    #: Processes bring the ledger's schema to head on first use (the embedded setup); false:
    #: no process runs DDL, each checks the schema is at head and fails naming the revisions
    #: (the owner role migrates with ``mcard-tasks db upgrade``; deploy/postgres-roles.sql).
    migrate: bool = True
    max_retries: int = Field(default=5, ge=0, le=50)
    issuer: str = "ledger"
    issuer_latency_ms: float = Field(default=50.0, ge=0)
    issuer_failure_rate: float = Field(default=0.0, ge=0, le=1)
    events_poll_interval: float = Field(default=0.05, gt=0)
    #: The request outbox relay (mcard_tasks.relay): seconds between looks for committed
    #: requests (a short poll: see the README's latency note), requests per batch (each batch
    #: one transaction and one window of pipelined confirms), seconds a relayed row is kept,
    #: and the longest wait between attempts while the broker is unreachable.
    relay_poll_interval: float = Field(default=0.02, gt=0)
    relay_batch: int = Field(default=2000, ge=1, le=10_000)
    relay_retention: float = Field(default=86_400.0, ge=0)
    relay_backoff_max: float = Field(default=30.0, gt=0)
    #: Execute header-less messages of the seed's shape (mcard_tasks.legacy); false: they are
    #: dead-lettered like any other message without Celery's task headers.
    legacy_messages: bool = True
    #: Bad input, bounded (mcard_tasks.limits). The largest task message body, in bytes, a
    #: producer publishes and a worker decodes: 256 KiB holds the largest valid request (a
    #: mint of 1,000 IDs of 128 characters with 16 KiB of metadata: at most 181,381 bytes as
    #: Celery serializes it, tests/unit/test_limits.py) with room to spare, and keeps a forged
    #: body far below the broker's own limit (128 MiB).
    max_body_bytes: int = Field(default=256 * 1024, ge=4096)
    #: The longest delay (eta or countdown), in seconds, a producer publishes and a worker
    #: accepts: a worker holds an ETA message in memory (Celery's timer, prefetch raised by
    #: one each) until it is due. One hour is 120 times the longest retry countdown (30 s);
    #: at least 60 s, so retries always fit.
    max_eta_seconds: float = Field(default=3600.0, ge=60)
    #: Modules whose import registers more task kinds (mcard_tasks.specs.register),
    #: comma-separated; imported when the app is created, before its topology is built.
    specs: str = ""
    #: Declare the topology from every process (the embedded setup). false: producers and
    #: workers only check it passively and fail naming what is missing; the deploy step
    #: (``mcard-tasks topology declare``, as the broker's deploy role) declares it, and a
    #: producer needs no configure permission at all.
    declare: bool = True
    #: Broker users whose task messages the worker executes, comma-separated: ``app,ops``
    #: (every task) and ``task=user`` entries for one task (``mcard.single_burn=support``).
    #: Empty: every user the broker lets publish. The worker's own user is always allowed.
    producers: str = ""

    @property
    def spec_modules(self) -> list[str]:
        return [name.strip() for name in self.specs.split(",") if name.strip()]

    @field_validator("log_level")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        return value.upper()

    @property
    def worker_prefetch_multiplier(self) -> int:
        """Messages each pool slot reserves: 2 for threads (a spare per thread, so no thread
        waits for the next delivery after its ack), 1 otherwise; MCARD_PREFETCH_MULTIPLIER
        overrides."""
        if self.prefetch_multiplier is not None:
            return self.prefetch_multiplier
        return 2 if self.pool == "threads" else 1


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read once from the environment."""
    return Settings()


def settings_of(app: Any) -> Settings:
    """The Settings object of an mcard-tasks app (``create_app`` attaches it)."""
    settings = getattr(app, "settings", None)
    if not isinstance(settings, Settings):
        raise TypeError(f"{app!r} is not an mcard-tasks app (it has no Settings)")
    return settings
