"""``mcard-tasks metrics``: Prometheus metrics read from the sources of truth at scrape time.

Counts come from the ledger (outcomes, replays absorbed, pending issuer operations, the event
outbox) and from the broker (passive declares of every task and dead-letter queue), so they
are exact whichever worker process did the work, and survive restarts. The workers' timings
(mcard_tasks.timings) are merged from MCARD_METRICS_DIR. Served with basic auth when
MCARD_FLOWER_USER / MCARD_FLOWER_PASSWORD are set; refused on a non-loopback address without.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from mcard_tasks.admin import queue_depths
from mcard_tasks.config import Settings, settings_of
from mcard_tasks.errors import ConfigurationError
from mcard_tasks.flower import CREDENTIALS_HINT, check_credentials, is_loopback
from mcard_tasks.ledger import get_ledger
from mcard_tasks.specs import task_names

T = TypeVar("T")

__all__ = [
    "LedgerCounts",
    "MCardCollector",
    "build_registry",
    "check_address",
    "ledger_counts",
    "metrics_app",
    "serve",
]

logger = logging.getLogger(__name__)
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: Outcomes by task, outcome and reason. A rejection's reason lives in its outcome JSON, read
#: only for rejected rows (a success's is null): the only JSON parsed per scrape.
_OUTCOMES = {
    "postgresql": "CAST(outcome AS json) ->> 'reason'",
    "sqlite": "json_extract(outcome, '$.reason')",
}
_OUTCOMES_SQL = """
    SELECT task, status, CASE WHEN status = 'rejected' THEN {reason} END AS reason, count(*)
    FROM operations WHERE status <> 'pending' GROUP BY 1, 2, 3
"""
_PENDING_SQL = (
    "SELECT task, count(*), min(recorded_at) FROM operations WHERE status = 'pending' GROUP BY task"
)
_OUTBOX_SQL = "SELECT count(*), min(created_at) FROM outbox WHERE published_at IS NULL"


@dataclass
class LedgerCounts:
    """What the ledger holds, as the metrics show it."""

    #: (task, outcome, reason or "") -> recorded outcomes
    outcomes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: task -> replays absorbed
    replays: dict[str, int] = field(default_factory=dict)
    #: task -> (pending issuer operations, the oldest one's age in seconds)
    pending: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: (unpublished outcome events, the oldest one's age in seconds)
    outbox: tuple[int, float] = (0, 0.0)


def _age(oldest: Any, at: datetime) -> float:
    """Seconds since oldest (a datetime, or SQLite's text of one; naive means UTC)."""
    if oldest is None:
        return 0.0
    if isinstance(oldest, str):
        oldest = datetime.fromisoformat(oldest)
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return max(0.0, float((at - oldest).total_seconds()))


def ledger_counts(engine: Engine, replays: dict[str, int]) -> LedgerCounts:
    """The ledger's counts in one read-only transaction (replays: Ledger.replay_counts)."""
    counts = LedgerCounts(replays=replays)
    reason = _OUTCOMES.get(engine.dialect.name, _OUTCOMES["sqlite"])
    with engine.execution_options(mcard_readonly=True).begin() as connection:
        at = datetime.now(UTC)
        for task, status, why, number in connection.execute(
            text(_OUTCOMES_SQL.format(reason=reason))
        ):
            counts.outcomes[(str(task), str(status), str(why or ""))] = int(number)
        for task, number, oldest in connection.execute(text(_PENDING_SQL)):
            counts.pending[str(task)] = (int(number), _age(oldest, at))
        number, oldest = connection.execute(text(_OUTBOX_SQL)).one()
        counts.outbox = (int(number), _age(oldest, at))
    return counts


class MCardCollector(Collector):
    """Reads the ledger and the broker on every scrape (a custom collector: nothing is kept
    between scrapes, so the numbers are the sources' own)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        yield from self._ledger_metrics()
        yield from self._broker_metrics()

    def _ledger_metrics(self) -> Iterator[Metric]:
        settings = settings_of(self.app)
        up = GaugeMetricFamily("mcard_ledger_up", "1 if the ledger answered this scrape.")

        def read() -> LedgerCounts:
            ledger = get_ledger(settings.database_url, migrate=settings.migrate)
            return ledger_counts(ledger.engine, ledger.replay_counts())

        counts = _answered("ledger", up, read)
        yield up
        if counts is not None:
            yield from _ledger_families(counts)

    def _broker_metrics(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("mcard_broker_up", "1 if the broker answered this scrape.")
        ready = GaugeMetricFamily(
            "mcard_queue_messages_ready",
            "Messages ready in a task or dead-letter queue (passive declare; unacked ones"
            " are not counted).",
            labels=["queue"],
        )
        consumers = GaugeMetricFamily(
            "mcard_queue_consumers", "Consumers of a task or dead-letter queue.", labels=["queue"]
        )
        depths = _answered("broker", up, lambda: queue_depths(self.app))
        if depths is None:
            yield up
            return
        for depth in depths:
            if depth.ready >= 0:  # a missing queue has no series (topology check says why)
                ready.add_metric([depth.name], depth.ready)
                consumers.add_metric([depth.name], depth.consumers)
        yield from (up, ready, consumers)


def _answered(source: str, up: GaugeMetricFamily, read: Callable[[], T]) -> T | None:
    """What read returns from source, with up 1; None and up 0 if it failed (said in the
    log: the scrape still serves the rest)."""
    try:
        found = read()
    except Exception as exc:  # any failure of the source
        logger.warning("metrics: the %s did not answer: %s: %s", source, type(exc).__name__, exc)
        up.add_metric([], 0)
        return None
    up.add_metric([], 1)
    return found


def _ledger_families(counts: LedgerCounts) -> Iterator[Metric]:
    outcomes = CounterMetricFamily(
        "mcard_outcomes",
        "Outcomes recorded in the ledger (reason: a rejection's code, empty on success).",
        labels=["task", "outcome", "reason"],
    )
    for (task, outcome, reason), number in sorted(counts.outcomes.items()):
        outcomes.add_metric([task, outcome, reason], number)
    replays = CounterMetricFamily(
        "mcard_replays",
        "Deliveries of a recorded request ID answered with its stored outcome (no effect).",
        labels=["task"],
    )
    pending = GaugeMetricFamily(
        "mcard_issuer_operations_pending",
        "Operations recorded as pending while an external issuer is asked.",
        labels=["task"],
    )
    oldest = GaugeMetricFamily(
        "mcard_issuer_operations_oldest_age_seconds",
        "Age of the oldest pending issuer operation (0 when none).",
        labels=["task"],
    )
    for task in sorted(set(task_names()) | set(counts.replays) | set(counts.pending)):
        replays.add_metric([task], counts.replays.get(task, 0))
        number, age = counts.pending.get(task, (0, 0.0))
        pending.add_metric([task], number)
        oldest.add_metric([task], age)
    outbox = GaugeMetricFamily(
        "mcard_event_outbox_pending", "Outcome events in the ledger's outbox not yet published."
    )
    outbox.add_metric([], counts.outbox[0])
    outbox_age = GaugeMetricFamily(
        "mcard_event_outbox_oldest_age_seconds",
        "Age of the oldest unpublished outcome event (0 when none).",
    )
    outbox_age.add_metric([], counts.outbox[1])
    yield from (outcomes, replays, pending, oldest, outbox, outbox_age)


def build_registry(app: Any) -> CollectorRegistry:
    """The exporter's registry: the ledger and broker collector, and the workers' timings
    merged from MCARD_METRICS_DIR when it is set."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MCardCollector(app))
    directory = settings_of(app).metrics_dir
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        MultiProcessCollector(registry, path=directory)
    return registry


def _authorized(header: str, user: str, password: str) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, f"{user}:{password}".encode())


def metrics_app(registry: CollectorRegistry, credentials: tuple[str, str] | None) -> WSGIApp:
    """prometheus_client's WSGI app on registry, behind basic auth when credentials are given
    (401 without them, compared in constant time)."""
    served: WSGIApp = make_wsgi_app(registry)
    if credentials is None:
        return served
    user, password = credentials

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if _authorized(environ.get("HTTP_AUTHORIZATION", ""), user, password):
            return served(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", 'Basic realm="mcard-tasks metrics"'), ("Content-Length", "0")],
        )
        return [b""]

    return guarded


def check_address(settings: Settings, address: str, port: int) -> str:
    """Check where the exporter may serve; return a true line saying how it serves.

    Raises:
        ConfigurationError: unusable credentials, or no credentials on an address other
            machines can reach.
    """
    check_credentials(settings.flower_user, settings.flower_password)
    host = f"[{address}]" if ":" in address else address
    where = f"http://{host}:{port}/metrics"
    if settings.flower_user and settings.flower_password:
        return f"mcard-tasks: metrics on {where} with basic auth (MCARD_FLOWER_USER)"
    if not is_loopback(address):
        raise ConfigurationError(
            f"refusing to serve metrics without authentication on {address}:{port}:"
            f" {CREDENTIALS_HINT}, or serve on a loopback address (--address 127.0.0.1)"
        )
    return f"mcard-tasks: metrics on {where} without authentication (loopback only)"


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per scrape, so a slow broker does not hold back a second scraper."""

    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape: no
        return


def serve(app: Any, address: str, port: int, ready: Callable[[str], None] = print) -> None:
    """Serve the metrics of app on address:port until the process is stopped.

    Raises:
        ConfigurationError: see check_address.
    """
    settings = settings_of(app)
    line = check_address(settings, address, port)
    credentials = (
        (settings.flower_user, settings.flower_password)
        if settings.flower_user and settings.flower_password
        else None
    )
    wsgi = metrics_app(build_registry(app), credentials)
    server_class = _Server6 if ":" in address else _Server
    with make_server(
        address, port, wsgi, server_class=server_class, handler_class=_QuietHandler
    ) as server:
        ready(line)
        server.serve_forever()
