"""The worker benchmark's environment: the apps configured on the run's own vhost and
database, the probes that watch the ledger and the queues, the enqueueing done while no
worker runs, and the worker subprocesses (see bench/worker.py for the measurements).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.common import (
    HOST,
    BenchError,
    WorkerProcess,
    broker_errors,
    configure,
    raw_connection,
    request_lines,
    say,
    unique,
)

BARE_QUEUE = "bench.bare"

T = TypeVar("T")


def retry(
    action: Callable[[], T],
    errors: tuple[type[BaseException], ...],
    attempts: int,
    pause: float,
    on_error: Callable[[BaseException], None],
) -> T:
    """action(), again after pause s and on_error(exc) if it raises one of errors; the last
    attempt's error propagates."""
    for _ in range(attempts - 1):
        try:
            return action()
        except errors as exc:
            time.sleep(pause)
            on_error(exc)
    return action()


# --- probes --------------------------------------------------------------------------------


class LedgerProbe:
    """The bench's own connection to the ledger database."""

    def __init__(self, database_url: str) -> None:
        import psycopg

        self.database_url = database_url
        self.db = psycopg.connect(database_url, autocommit=True, connect_timeout=10)

    def done_count(self) -> int:
        """Operations with an outcome (not pending)."""
        row = self.db.execute("SELECT count(*) FROM operations WHERE status <> 'pending'")
        return int(row.fetchone()[0])  # type: ignore[index]

    def events_pending(self) -> int:
        """Outcome events the relay has not published yet."""
        row = self.db.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        return int(row.fetchone()[0])  # type: ignore[index]

    def commit_span(self, tag: str) -> float:
        """Seconds from the first to the last recorded outcome of the requests of tag."""
        row = self.db.execute(
            "SELECT extract(epoch FROM max(recorded_at) - min(recorded_at)) FROM operations"
            " WHERE request_id LIKE %s AND status <> 'pending'",
            (f"{tag}-r%",),
        ).fetchone()
        return float(row[0] or 0.0)  # type: ignore[index]

    def events_span(self, tag: str) -> float:
        """Seconds from the first recorded outcome of the requests of tag until the relay had
        published the last of their events."""
        row = self.db.execute(
            "SELECT extract(epoch FROM max(e.published_at) - min(o.recorded_at))"
            " FROM operations o JOIN outbox e USING (request_id) WHERE o.request_id LIKE %s",
            (f"{tag}-r%",),
        ).fetchone()
        return float(row[0] or 0.0)  # type: ignore[index]

    def close(self) -> None:
        with suppress(Exception):
            self.db.close()


class BrokerProbe:
    """A py-amqp connection of the bench's own for queue depths and purges (the broker may be
    restarted by others' tests on a shared machine: a broken one is replaced, not reused)."""

    def __init__(self, vhost: str) -> None:
        self.vhost = vhost
        self.raw: Any = None
        self.channel: Any = None

    def connect(self) -> None:
        self.close()
        self.raw = raw_connection(self.vhost)
        self.channel = self.raw.channel()

    def _lost(self, exc: BaseException) -> None:
        say(f"  (broker connection lost: {exc!r}; reconnecting)")
        self.raw = None

    def _ready(self, queue: str) -> int:
        if self.raw is None:
            self.connect()
        return int(self.channel.queue_declare(queue, passive=True).message_count)

    def ready(self, queue: str) -> int:
        """Messages ready in queue."""
        return retry(lambda: self._ready(queue), broker_errors(), 3, 1, self._lost)

    def purge(self, queue: str) -> None:
        self.connect()
        self.channel.queue_purge(queue)

    def close(self) -> None:
        if self.raw is not None:
            with suppress(Exception):
                self.raw.close()
        self.raw = None


# --- enqueueing (no worker running) ---------------------------------------------------------


class Enqueuer:
    """Fills mcard's queue (bulk import) or the baseline's (bare apply_async's messages)."""

    def __init__(self, bare: Any, broker: BrokerProbe) -> None:
        self.bare_module = bare  # bench.bare_app
        self.broker = broker

    def mcard(self, count: int, tag: str) -> None:
        """count single_mint requests, by enqueue_many (idempotent by request ID: a broker
        failure is simply tried again)."""
        from mcard_tasks.bulk import enqueue_many
        from mcard_tasks.errors import BrokerUnavailableError

        lines = list(request_lines(count, tag))

        def note(exc: BaseException) -> None:
            say(f"  (enqueue failed: {exc}; again)")

        report = retry(
            lambda: enqueue_many(lines, timeout=30), (BrokerUnavailableError,), 3, 2, note
        )
        if report.confirmed != count:
            raise BenchError(f"enqueue: {report.summary()}")

    def bare(self, count: int, tag: str) -> None:
        """count no-op tasks for the baseline (a broker failure: its queue purged, again)."""

        def purge(exc: BaseException) -> None:
            say(f"  (baseline enqueue failed: {exc!r}; purging and again)")
            self.broker.purge(BARE_QUEUE)

        retry(lambda: self._publish_bare(count, tag), broker_errors(), 3, 2, purge)

    def _publish_bare(self, count: int, tag: str, window: int = 1000) -> None:
        """The very messages bare apply_async() publishes, confirmed asynchronously."""
        from mcard_tasks.confirms import ConfirmWindow

        refused: list[str] = []
        publisher = ConfirmWindow(
            self.bare_module.app,
            lambda keys, nacked: refused.extend(keys if nacked else []),
            timeout=30,
            window=window,
            purpose="bench-bare",
        )
        publisher.open()
        exchange = self.bare_module.EXCHANGE.name
        try:
            for task_id, body, headers, properties in self._bare_messages(count, tag):
                publisher.publish(task_id, body, exchange, BARE_QUEUE, headers, **properties)
            publisher.wait()
        except BaseException:
            publisher.abort()
            raise
        publisher.close()
        if refused:
            raise BenchError(f"the broker nacked {len(refused)} baseline messages")

    def _bare_messages(
        self, count: int, tag: str
    ) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
        """(task ID, body, headers, properties) of each no-op task, as apply_async has them."""
        from kombu.serialization import dumps

        app, task = self.bare_module.app, self.bare_module.TASK_NAME
        for i in range(count):
            task_id = f"{tag}-r{i}"
            kwargs = {"card_id": f"{tag}-{i}", "owner": "bench"}
            headers, properties, body, _ = app.amqp.as_task_v2(
                task_id, task, args=(), kwargs=kwargs
            )
            content_type, content_encoding, data = dumps(body, serializer="json")
            properties = dict(
                properties,
                content_type=content_type,
                content_encoding=content_encoding,
                delivery_mode=2,
                priority=0,
            )
            yield task_id, data, headers, properties


# --- worker subprocesses -------------------------------------------------------------------


#: A worker's command line and environment, given its node name.
Command = Callable[[str], tuple[list[str], dict[str, str]]]


@dataclass
class Workers:
    """Starts the worker subprocesses (their logs in workdir) and stops them all at the end.
    They inherit this process's environment (see configure_apps)."""

    workdir: Path
    app: Any  # mcard-tasks' Celery app
    bare_app: Any
    started: list[WorkerProcess] = field(default_factory=list)

    def _start(self, label: str, command: Command, app: Any) -> WorkerProcess:
        number = len(self.started)
        name = f"bench-{label}-{number}-{unique('', 6)}@{HOST}"
        argv, env = command(name)
        worker = WorkerProcess(name, argv, env, self.workdir / f"{label}-{number}.log", app)
        self.started.append(worker)
        return worker.start()

    def mcard(
        self, label: str, pool: str | None, concurrency: int | None, **settings: str
    ) -> WorkerProcess:
        """``python -m mcard_tasks.worker``; pool and concurrency None: its defaults;
        settings: MCARD_* variables."""
        options = {f"MCARD_{key.upper()}": value for key, value in settings.items()}
        if pool is not None:
            options["MCARD_POOL"] = pool
        if concurrency is not None:
            options["MCARD_CONCURRENCY"] = str(concurrency)

        def command(name: str) -> tuple[list[str], dict[str, str]]:
            env = dict(os.environ, MCARD_WORKER_NAME=name, **options)
            return [sys.executable, "-m", "mcard_tasks.worker"], env

        return self._start(label, command, self.app)

    def bare(self, concurrency: int) -> WorkerProcess:
        """``celery -A bench.bare_app worker``, prefork with concurrency children."""

        def command(name: str) -> tuple[list[str], dict[str, str]]:
            argv = [
                sys.executable, "-m", "celery", "-A", "bench.bare_app", "worker",
                f"--hostname={name}", "--loglevel=INFO", "--pool=prefork",
                f"--concurrency={concurrency}", f"--queues={BARE_QUEUE}", "--task-events",
            ]  # fmt: skip
            return argv, dict(os.environ)

        return self._start("bare", command, self.bare_app)

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


# --- the whole ------------------------------------------------------------------------------


@dataclass
class Environment:
    """Everything a measurement uses, on the run's own vhost and database."""

    args: argparse.Namespace
    vhost: str
    workdir: Path
    single_mint: Any  # mcard-tasks' task
    ledger: LedgerProbe
    broker: BrokerProbe
    enqueue: Enqueuer
    workers: Workers

    def drain_timeout(self, count: int) -> float:
        """The bound of a drain of count requests."""
        return float(self.args.timeout + count / 50)


def configure_apps(vhost: str, database_url: str, bare_queue_type: str) -> None:
    """mcard-tasks' and the bare app's settings, for this process and the workers."""
    broker_url = configure(vhost, database_url, isolate=True)
    os.environ["BENCH_BARE_BROKER"] = broker_url
    os.environ["BENCH_BARE_QUEUE"] = BARE_QUEUE
    os.environ["BENCH_BARE_QUEUE_TYPE"] = bare_queue_type


def declare_queues(app: Any, bare_queue: Any) -> None:
    from mcard_tasks.topology import build_topology

    with app.connection_for_write() as connection:
        build_topology(app.settings).declare(connection.default_channel)
        bare_queue(connection.default_channel).declare()


@contextmanager
def environment(
    args: argparse.Namespace, vhost: str, database_url: str, workdir: Path
) -> Iterator[Environment]:
    """The apps configured and imported, the schema made (before any worker races for it),
    the queues declared; on leaving, every worker stopped and the probes closed."""
    configure_apps(vhost, database_url, args.bare_queue_type)
    from bench import bare_app
    from mcard_tasks import app
    from mcard_tasks.ledger import get_ledger
    from mcard_tasks.tasks import single_mint

    get_ledger(database_url)
    declare_queues(app, bare_app.QUEUE)
    broker = BrokerProbe(vhost)
    ledger = LedgerProbe(database_url)
    workers = Workers(workdir, app, bare_app.app)
    enqueue = Enqueuer(bare_app, broker)
    try:
        yield Environment(args, vhost, workdir, single_mint, ledger, broker, enqueue, workers)
    finally:
        workers.stop_all()
        ledger.close()
        broker.close()


@contextmanager
def worker_logs() -> Iterator[Path]:
    """A folder for the workers' logs: kept if the run fails or a stalled worker's stacks
    were dumped into it, removed otherwise."""
    logs = Path(tempfile.mkdtemp(prefix="mcard-bench-worker-"))
    try:
        yield logs
    except BaseException:
        print(f"failed; the worker logs are kept in {logs}", file=sys.stderr)
        raise
    if any(logs.glob("*-stacks.txt")):
        print(f"\nstalled workers' stacks and logs are kept in {logs}")
    else:
        shutil.rmtree(logs, ignore_errors=True)
