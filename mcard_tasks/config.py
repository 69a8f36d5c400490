"""The one configuration object, read from MCARD_* environment variables (12-factor)."""

from __future__ import annotations

import os
import ssl
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "default_database_url", "get_settings", "settings_of"]


def default_database_url() -> str:
    """An SQLite file in the user's data folder, the same for every process of this user."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{base / 'mcard-tasks' / 'ledger.sqlite3'}"


def _no_password() -> bytes:
    return b""


class Settings(BaseSettings):
    """Every setting of mcard-tasks; each field is the variable MCARD_<NAME>."""

    # hide_input_in_errors: an error must not print the settings (the broker URL's password).
    model_config = SettingsConfigDict(
        env_prefix="MCARD_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    broker_url: str = "amqp://guest:guest@localhost:5672//"
    #: TLS to the broker (amqps:// URLs only): the CA file the broker's certificate is
    #: verified against (unset: the system's default CA store; the certificate and the URL's
    #: host name are verified either way), and an optional client certificate and its key
    #: (both or neither). PEM files, read when the settings are loaded.
    broker_ca_file: str | None = None
    broker_cert_file: str | None = None
    broker_key_file: str | None = None
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
    #: The simulated issuer takes many requests per call (issue_many, destroy_many).
    issuer_batch: bool = True
    #: Batched execution in the worker (mcard_tasks.batches): requests of one kind that
    #: arrive while a batch of theirs runs gather, up to batch_size or for at most
    #: batch_wait_ms, and are applied in one ledger transaction and acked together (with no
    #: batch running a request starts at once); false: one request at a time.
    batch: bool = True
    batch_size: int = Field(default=250, ge=1, le=1000)
    batch_wait_ms: float = Field(default=5.0, ge=0, le=1000)
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
    #: Worker timings (mcard_tasks.timings): a directory where every worker process writes
    #: its histograms (prometheus_client's multiprocess files), merged by ``mcard-tasks
    #: metrics``. Unset: no timings are kept, nothing is written.
    metrics_dir: str | None = None
    #: OpenTelemetry traces (mcard_tasks.tracing): publish, run and ledger spans, exported as
    #: the standard OTEL_* variables say. Off: OpenTelemetry is not even imported.
    tracing: bool = False

    @property
    def spec_modules(self) -> list[str]:
        return [name.strip() for name in self.specs.split(",") if name.strip()]

    @field_validator("broker_ca_file", "broker_cert_file", "broker_key_file", mode="before")
    @classmethod
    def _readable_file(cls, value: Any, info: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        path = Path(str(value)).expanduser()
        name = f"MCARD_{info.field_name.upper()}"
        try:
            with path.open("rb") as file:
                file.read(1)
        except OSError as exc:
            raise ValueError(f"{name}: cannot read {path} ({exc.strerror or exc})") from exc
        return str(path)

    @model_validator(mode="after")
    def _broker_tls(self) -> Settings:
        schemes = {url.split("://", 1)[0].lower() for url in self.broker_urls if "://" in url}
        files = {
            "MCARD_BROKER_CA_FILE": self.broker_ca_file,
            "MCARD_BROKER_CERT_FILE": self.broker_cert_file,
            "MCARD_BROKER_KEY_FILE": self.broker_key_file,
        }
        given = [name for name, path in files.items() if path]
        if "amqps" in schemes and len(schemes) > 1:
            raise ValueError(
                "MCARD_BROKER_URL mixes amqps:// and plain URLs; one set of TLS settings"
                " applies to every URL of the list: make them all amqps://"
            )
        if given and schemes != {"amqps"}:
            raise ValueError(
                f"{', '.join(given)} set, but MCARD_BROKER_URL is not amqps:// (the files"
                " would be silently unused): use an amqps:// URL (port 5671) or unset them"
            )
        if bool(self.broker_cert_file) != bool(self.broker_key_file):
            raise ValueError(
                "MCARD_BROKER_CERT_FILE and MCARD_BROKER_KEY_FILE go together (a client"
                " certificate and its key): set both or neither"
            )
        if self.broker_tls:
            for url in self.broker_urls:
                if not urlsplit(url).hostname:
                    raise ValueError(
                        "MCARD_BROKER_URL: an amqps:// URL needs the broker's host name (the"
                        " certificate is checked against it)"
                    )
        # The files must be what they claim: PEM certificates, a key matching the certificate.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.broker_ca_file:
            try:
                context.load_verify_locations(cafile=self.broker_ca_file)
            except (ssl.SSLError, ValueError) as exc:
                raise ValueError(
                    f"MCARD_BROKER_CA_FILE: {self.broker_ca_file} holds no usable CA"
                    f" certificate ({exc})"
                ) from exc
        if self.broker_cert_file and self.broker_key_file:
            try:
                # py-amqp takes no key password: an encrypted key fails here, not at a prompt.
                context.load_cert_chain(
                    self.broker_cert_file, self.broker_key_file, password=_no_password
                )
            except (ssl.SSLError, ValueError) as exc:
                raise ValueError(
                    f"MCARD_BROKER_CERT_FILE / MCARD_BROKER_KEY_FILE: {self.broker_cert_file}"
                    f" and {self.broker_key_file} are not a certificate and its unencrypted"
                    f" key ({exc})"
                ) from exc
        return self

    @property
    def broker_urls(self) -> list[str]:
        """The URLs of MCARD_BROKER_URL (several, separated by ';': a failover list)."""
        return [url.strip() for url in self.broker_url.split(";") if url.strip()]

    @property
    def broker_tls(self) -> bool:
        """True for amqps:// broker URLs (TLS, certificate and host name verified)."""
        return bool(self.broker_urls) and all(
            url.lower().startswith("amqps://") for url in self.broker_urls
        )

    @field_validator("metrics_dir", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

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
