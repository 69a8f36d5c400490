"""Worker throughput, latency, scaling and broker connections of mcard-tasks, against bare Celery.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/worker.py [--requests N] [--rounds R] [--concurrency C]

Everything runs in a temporary RabbitMQ vhost (rabbitmqctl add_vhost / delete_vhost) and a
temporary PostgreSQL database (created and dropped with psycopg on MCARD_BENCH_POSTGRES,
default postgresql://postgres@127.0.0.1:5432/postgres). Workers are real subprocesses
(``python -m mcard_tasks.worker``, i.e. ``mcard-tasks worker``; the baseline
``celery -A bench.bare_app worker``), each stopped with SIGTERM then SIGKILL, whatever happens.

1. Drain rate: N ``mcard.single_mint`` requests are enqueued with no worker running; a worker
   starts, and the time runs from its first ping answer until all N outcomes are in the
   ledger. Requests finished before the ping answered are left out of the rate. The baseline
   is bare Celery draining N no-op tasks with the same settings (prefork, same concurrency,
   prefetch 1, late acks, task events, JSON, publisher confirms, a durable queue of the same
   type), until its queue is empty and the worker holds nothing. mcard runs with prefork
   -c C (the baseline's settings), with its default pool (one process, threads -c 8), and
   as C worker processes of threads -c 4 (one per core, like the baseline's C children).
   Rounds alternate. Each variant's CPU time per task is shown for the worker processes,
   PostgreSQL and RabbitMQ (from /proc), against what 2 cores allow at the baseline's rate.
2. A simulated remote issuer (MCARD_ISSUER=simulated, 50 ms): rate vs concurrency / latency.
3. Latency from just before ``delay()`` to the committed outcome at a steady offered load.
4. Scaling: N and 10N, time ratio and the worker's RSS (worker + children) after each.
5. Broker connections and channels a worker holds at concurrency 2, 8 and 32.
6. A py-spy profile of one drain (``--no-profile`` to skip), summarized by where time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROKER = os.environ.get("MCARD_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672")
PG_ADMIN_URL = os.environ.get(
    "MCARD_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
BARE_QUEUE = "bench.bare"
POLL = 0.02  # seconds between looks at the ledger / queue while draining


class BenchError(RuntimeError):
    pass


def rabbitmqctl(*args: str, timeout: float = 120, attempts: int = 1) -> str:
    for attempt in range(attempts):
        done = subprocess.run(
            ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode == 0:
            return done.stdout
        if attempt + 1 < attempts:
            time.sleep(3)
    raise BenchError(f"rabbitmqctl {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as connection:
        connection.execute(sql)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, every: float = POLL) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of pids (from /proc; a process gone meanwhile counts 0)."""
    total = 0
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def pids_named(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def cpu_by_role(*worker_pids: int) -> dict[str, float]:
    """CPU seconds so far of the workers (with their children), PostgreSQL and RabbitMQ."""
    return {
        "worker": sum(cpu_seconds(tree_pids(pid)) for pid in worker_pids),
        "postgres": cpu_seconds(pids_named("postgres")),
        "rabbitmq": cpu_seconds(pids_named("beam.smp")),
    }


def rss_kib(pid: int) -> int:
    """VmRSS summed over pid and its descendants."""
    total = 0
    for one in tree_pids(pid):
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


# --- worker subprocesses -------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """A worker subprocess in its own session (process group), with a node name and a log."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    ping: Callable[[list[str], float], Any]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(
                f"worker {self.name} exited with {self.process.returncode}:\n{self.tail()}"
            )

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60) -> float:
        """Block until the worker answers a ping; the perf_counter time of the answer."""

        def answered() -> bool:
            self.check_alive()
            # Short: a ping sent before the worker's mailbox exists is lost, and the
            # readiness time is late by up to this timeout.
            try:
                return bool(self.ping([self.name], 0.1))
            except (OSError, *broker_errors()):  # a broker restart by someone else: again
                time.sleep(0.5)
                return False

        wait_until(answered, timeout, f"worker {self.name} to answer a ping", every=0.01)
        return time.perf_counter()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (warm shutdown), then SIGKILL to its whole process group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stray pool children too
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


# --- the bench -----------------------------------------------------------------------------


@dataclass
class Drain:
    label: str
    requests: int
    done_before_ready: int
    seconds: float
    rss_kib: int = 0
    #: CPU milliseconds per task spent by the worker, PostgreSQL and RabbitMQ meanwhile.
    cpu_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return (self.requests - self.done_before_ready) / self.seconds


@dataclass
class Bench:
    args: argparse.Namespace
    vhost: str
    database_url: str
    workdir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        import amqp
        import psycopg

        broker_url = f"{BROKER}/{self.vhost}"
        for key in [key for key in os.environ if key.startswith("MCARD_")]:
            if not key.startswith("MCARD_BENCH_"):
                del os.environ[key]
        # mcard-tasks and the bare app read their settings at import: set them first.
        os.environ["MCARD_BROKER_URL"] = broker_url
        os.environ["MCARD_DATABASE_URL"] = self.database_url
        os.environ["BENCH_BARE_BROKER"] = broker_url
        os.environ["BENCH_BARE_QUEUE"] = BARE_QUEUE
        os.environ["BENCH_BARE_QUEUE_TYPE"] = self.args.bare_queue_type
        sys.path.insert(0, str(ROOT))

        from bench import bare_app
        from mcard_tasks import app
        from mcard_tasks.ledger import get_ledger
        from mcard_tasks.tasks import single_mint
        from mcard_tasks.topology import build_topology

        self.app, self.bare, self.single_mint = app, bare_app, single_mint
        get_ledger(self.database_url)  # the schema, before any worker races for it
        self.db = psycopg.connect(self.database_url, autocommit=True, connect_timeout=10)
        self.raw: amqp.Connection | None = None
        with app.connection_for_write() as connection:
            conf = app.conf
            build_topology(conf.mcard_queue_type, conf.mcard_delivery_limit).declare(
                connection.default_channel
            )
            bare_app.QUEUE(connection.default_channel).declare()

    # -- ledger and broker probes

    def done_count(self) -> int:
        row = self.db.execute("SELECT count(*) FROM operations WHERE status <> 'pending'")
        return int(row.fetchone()[0])  # type: ignore[index]

    def connect_raw(self) -> Any:
        """A py-amqp connection of the bench's own (the broker may be restarted by others'
        tests on a shared machine: a broken one is replaced, not reused)."""
        import amqp

        if self.raw is not None:
            with suppress(Exception):
                self.raw.close()
        credentials, rest = BROKER.removeprefix("amqp://").split("@", 1)
        user, password = credentials.split(":", 1)
        raw = amqp.Connection(
            rest,
            userid=user,
            password=password,
            virtual_host=self.vhost,
            connect_timeout=10,
            client_properties={"connection_name": f"bench-raw {HOST}:{os.getpid()}"},
        )
        raw.connect()
        raw.sock.settimeout(30)  # every raw broker operation is bounded
        self.raw, self.channel = raw, raw.channel()
        return raw

    def ready(self, queue: str) -> int:
        for attempt in range(3):
            try:
                if self.raw is None:
                    self.connect_raw()
                return int(self.channel.queue_declare(queue, passive=True).message_count)
            except (OSError, *amqp_errors()) as exc:
                print(f"  (broker connection lost: {exc!r}; reconnecting)", flush=True)
                self.raw = None
                if attempt == 2:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    # -- enqueueing (no worker running)

    def enqueue_mcard(self, count: int, tag: str) -> None:
        from mcard_tasks.bulk import enqueue_many

        lines = [
            json.dumps(
                {
                    "task": "single_mint",
                    "card_id": f"{tag}-{i}",
                    "owner": "bench",
                    "request_id": f"{tag}-r{i}",
                }
            )
            for i in range(count)
        ]
        from mcard_tasks.errors import BrokerUnavailableError

        for attempt in range(3):
            try:
                report = enqueue_many(lines, timeout=30)
            except BrokerUnavailableError as exc:  # idempotent by request ID: just again
                if attempt == 2:
                    raise
                print(f"  (enqueue failed: {exc}; again)", flush=True)
                time.sleep(2)
                continue
            if report.confirmed != count:
                raise BenchError(f"enqueue: {report.summary()}")
            return

    def enqueue_bare(self, count: int, tag: str) -> None:
        for attempt in range(3):
            try:
                self._enqueue_bare(count, tag)
                return
            except (OSError, *amqp_errors()) as exc:
                if attempt == 2:
                    raise
                print(f"  (baseline enqueue failed: {exc!r}; purging and again)", flush=True)
                time.sleep(2)
                self.connect_raw()
                self.channel.queue_purge(BARE_QUEUE)

    def _enqueue_bare(self, count: int, tag: str, window: int = 1000) -> None:
        """The very messages bare apply_async() publishes, confirmed asynchronously."""
        import amqp
        from kombu.serialization import dumps

        raw = self.connect_raw()
        channel = raw.channel()
        channel.confirm_select()
        acked = [0]

        def on_ack(delivery_tag: int, multiple: bool) -> None:
            acked[0] = delivery_tag if multiple else acked[0] + 1

        def on_nack(delivery_tag: int, multiple: bool) -> None:
            raise BenchError("the broker nacked a baseline message")

        channel.events["basic_ack"].add(on_ack)
        channel.events["basic_nack"].add(on_nack)
        amqp_ = self.bare.app.amqp
        for i in range(count):
            task_id = f"{tag}-r{i}"
            kwargs = {"card_id": f"{tag}-{i}", "owner": "bench"}
            headers, properties, body, _ = amqp_.as_task_v2(
                task_id, self.bare.TASK_NAME, args=(), kwargs=kwargs
            )
            content_type, encoding, data = dumps(body, serializer="json")
            message = amqp.Message(
                data,
                content_type=content_type,
                content_encoding=encoding,
                application_headers=headers,
                delivery_mode=2,
                priority=0,
                **properties,
            )
            channel.basic_publish(message, exchange=self.bare.EXCHANGE.name, routing_key=BARE_QUEUE)
            while i + 1 - acked[0] >= window:
                raw.drain_events(timeout=30)
        deadline = time.monotonic() + 60
        while acked[0] < count:
            if time.monotonic() > deadline:
                raise BenchError("the broker did not confirm the baseline messages")
            raw.drain_events(timeout=30)
        channel.close()

    # -- workers

    def _env(self, **settings: str | None) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in settings.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def mcard_worker(
        self, label: str, pool: str | None, concurrency: int | None, **settings: str
    ) -> WorkerProcess:
        name = f"bench-{label}-{len(self.workers)}-{uuid.uuid4().hex[:6]}@{HOST}"
        env = self._env(
            MCARD_POOL=pool,
            MCARD_CONCURRENCY=None if concurrency is None else str(concurrency),
            MCARD_WORKER_NAME=name,
            **{f"MCARD_{key.upper()}": value for key, value in settings.items()},
        )
        worker = WorkerProcess(
            name,
            [sys.executable, "-m", "mcard_tasks.worker"],
            env,
            self.workdir / f"{label}-{len(self.workers)}.log",
            lambda names, timeout: self.app.control.ping(destination=names, timeout=timeout),
        )
        self.workers.append(worker)
        return worker.start()

    def bare_worker(self, concurrency: int) -> WorkerProcess:
        name = f"bench-bare-{len(self.workers)}-{uuid.uuid4().hex[:6]}@{HOST}"
        argv = [
            sys.executable, "-m", "celery", "-A", "bench.bare_app", "worker",
            f"--hostname={name}", "--loglevel=INFO", "--pool=prefork",
            f"--concurrency={concurrency}", f"--queues={BARE_QUEUE}", "--task-events",
        ]  # fmt: skip
        worker = WorkerProcess(
            name,
            argv,
            self._env(),
            self.workdir / f"bare-{len(self.workers)}.log",
            lambda names, timeout: self.bare.app.control.ping(destination=names, timeout=timeout),
        )
        self.workers.append(worker)
        return worker.start()

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()

    @contextmanager
    def running(self, worker: WorkerProcess) -> Iterator[WorkerProcess]:
        try:
            yield worker
        finally:
            worker.stop()

    def drain_timeout(self, count: int) -> float:
        return self.args.timeout + count / 50

    # -- 1. drain rate

    def drain_mcard(
        self,
        label: str,
        count: int,
        pool: str | None,
        concurrency: int | None,
        profile: Path | None = None,
        processes: int = 1,
        **settings: str,
    ) -> Drain:
        """Drain count requests with `processes` worker processes (the time runs from the
        last one's ping answer)."""
        tag = f"{label}{uuid.uuid4().hex[:8]}"
        self.enqueue_mcard(count, tag)
        base = self.done_count()
        others = [
            self.mcard_worker(label, pool, concurrency, **settings) for _ in range(processes - 1)
        ]
        with self.running(self.mcard_worker(label, pool, concurrency, **settings)) as worker:
            try:
                for other in others:
                    other.wait_ready()
                ready = worker.wait_ready()
                done0 = self.done_count() - base
                pids = [worker.pid, *(other.pid for other in others)]
                cpu0 = cpu_by_role(*pids)
                spy = (
                    start_profiler(worker.pid, profile, self.args.profile_gil) if profile else None
                )
                try:

                    def drained() -> bool:
                        for one in (worker, *others):
                            one.check_alive()
                        return self.done_count() - base >= count

                    wait_until(drained, self.drain_timeout(count), f"{label}: {count} outcomes")
                    finished = time.perf_counter()
                    cpu = cpu_per_task(cpu0, cpu_by_role(*pids), count - done0)
                finally:
                    if spy is not None:
                        stop_profiler(spy)
                rss = sum(rss_kib(pid) for pid in pids)
            finally:
                for other in others:
                    other.stop()
        return Drain(label, count, done0, finished - ready, rss, cpu)

    def drain_bare(self, count: int, concurrency: int) -> Drain:
        tag = f"bare{uuid.uuid4().hex[:8]}"
        self.enqueue_bare(count, tag)
        with self.running(self.bare_worker(concurrency)) as worker:
            ready = worker.wait_ready()
            # Not yet done at the ping: still queued, or held by the worker (<= concurrency).
            waiting = self.ready(BARE_QUEUE)
            done0 = max(0, count - waiting - concurrency)
            cpu0 = cpu_by_role(worker.pid)
            inspect = self.bare.app.control.inspect(destination=[worker.name], timeout=2.0)

            def queue_empty() -> bool:
                worker.check_alive()
                return self.ready(BARE_QUEUE) == 0

            def nothing_held() -> bool:
                worker.check_alive()
                try:
                    return held_nothing()
                except (OSError, *broker_errors()):
                    time.sleep(0.5)
                    return False

            def held_nothing() -> bool:
                active = (inspect.active() or {}).get(worker.name)
                if active is None or active:
                    return False
                reserved = (inspect.reserved() or {}).get(worker.name)
                return reserved is not None and not reserved

            timeout = self.drain_timeout(count)
            wait_until(queue_empty, timeout, "the baseline queue to empty")
            wait_until(nothing_held, 30, "the baseline worker to finish", every=0.005)
            finished = time.perf_counter()
            cpu = cpu_per_task(cpu0, cpu_by_role(worker.pid), count - done0)
            rss = rss_kib(worker.pid)
        return Drain("bare", count, done0, finished - ready, rss, cpu)

    # -- 3. latency

    def latency(self, rate: float, seconds: float) -> dict[str, Any]:
        total = int(rate * seconds)
        tag = f"lat{uuid.uuid4().hex[:8]}"
        sent: dict[str, float] = {}
        committed: dict[str, float] = {}  # recorded_at (worker clock, just before commit)
        observed: dict[str, float] = {}  # when the poller saw it committed
        lock = threading.Lock()
        stop = threading.Event()
        errors: list[BaseException] = []

        def poll() -> None:
            import psycopg

            try:
                with psycopg.connect(self.database_url, autocommit=True) as db:
                    while not stop.is_set():
                        with lock:
                            waiting = [rid for rid in sent if rid not in committed]
                        if waiting:
                            rows = db.execute(
                                "SELECT request_id, recorded_at FROM operations"
                                " WHERE request_id = ANY(%s) AND status <> 'pending'",
                                (waiting,),
                            ).fetchall()
                            now = time.time()
                            with lock:
                                for rid, recorded_at in rows:
                                    committed[rid] = recorded_at.timestamp()
                                    observed[rid] = now
                        stop.wait(0.005)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        with self.running(self.mcard_worker("latency", None, None)) as worker:
            worker.wait_ready()
            warm = f"warm{uuid.uuid4().hex[:6]}"
            base = self.done_count()
            for i in range(20):
                self.single_mint.delay(
                    card_id=f"{warm}-{i}", owner="bench", request_id=f"{warm}-{i}"
                )
            wait_until(lambda: self.done_count() - base >= 20, 60, "warm-up requests")
            poller = threading.Thread(target=poll, name="latency-poller", daemon=True)
            poller.start()
            try:
                from mcard_tasks.errors import BrokerUnavailableError

                start = time.perf_counter()
                behind, republished = 0.0, 0
                for i in range(total):
                    target = start + i / rate
                    pause = target - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                    else:
                        behind = max(behind, -pause)
                    rid = f"{tag}-r{i}"
                    now = time.time()
                    with lock:
                        sent[rid] = now
                    for attempt in range(20):  # the shared broker may be restarted by others
                        try:
                            self.single_mint.delay(
                                card_id=f"{tag}-{i}", owner="bench", request_id=rid
                            )
                            break
                        except BrokerUnavailableError:
                            if attempt == 19:
                                raise
                            republished += 1
                            time.sleep(0.5)
                offered = total / (time.perf_counter() - start)

                def all_seen() -> bool:
                    worker.check_alive()
                    if errors:
                        raise BenchError(f"latency poller failed: {errors[0]!r}")
                    with lock:
                        return len(committed) >= total

                wait_until(all_seen, 60, "every latency request's outcome")
            finally:
                stop.set()
                poller.join(10)
        lat = sorted((committed[rid] - sent[rid]) * 1000 for rid in sent)
        seen = sorted((observed[rid] - sent[rid]) * 1000 for rid in sent)
        return {
            "offered": offered,
            "behind_ms": behind * 1000,
            "republished": republished,
            "p50": percentile(lat, 50),
            "p99": percentile(lat, 99),
            "max": lat[-1],
            "seen_p50": percentile(seen, 50),
            "seen_p99": percentile(seen, 99),
        }

    # -- 5. connections

    def connections(self, concurrency: int, tasks: int = 200) -> dict[str, Any]:
        tag = f"conn{concurrency}x{uuid.uuid4().hex[:6]}"
        self.enqueue_mcard(tasks, tag)
        base = self.done_count()
        with self.running(self.mcard_worker(f"conn{concurrency}", None, concurrency)) as worker:
            worker.wait_ready()
            stalled = None
            try:
                wait_until(lambda: self.done_count() - base >= tasks, 30, "tasks")
            except BenchError:
                stalled = f"STALLED at {self.done_count() - base} of {tasks} done"
                dump = dump_stacks(worker.pid, self.workdir / f"conn{concurrency}-stacks.txt")
                print(f"  -c {concurrency}: {stalled}; stacks in {dump}", flush=True)
            time.sleep(1.0)  # the outbox relay publishes; stats settle
            rows = json.loads(
                rabbitmqctl(
                    "list_connections", "--formatter", "json", "vhost", "client_properties",
                    "channels",
                ) or "[]"
            )  # fmt: skip
        mine = f"mcard-tasks {HOST}:{worker.pid}"
        bench = {
            f"{prefix} {HOST}:{os.getpid()}"
            for prefix in ("mcard-tasks", "bench-bare", "bench-raw")
        }
        worker_rows, others = [], []
        for row in rows:
            if row.get("vhost") != self.vhost:
                continue
            props = row.get("client_properties") or []
            name = next(
                (p[2] for p in props if isinstance(p, list) and p and p[0] == "connection_name"),
                "",
            )
            if name == mine:
                worker_rows.append(row)
            elif name not in bench and not name.startswith("mcard-tasks bulk"):
                others.append(name or "<unnamed>")
        return {
            "stalled": stalled,
            "connections": len(worker_rows),
            "channels": sum(int(row.get("channels", 0)) for row in worker_rows),
            "others": others,
        }


def amqp_errors() -> tuple[type[BaseException], ...]:
    from amqp.exceptions import AMQPError

    return (AMQPError,)


def broker_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import KombuError

    return (*amqp_errors(), KombuError)


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values) + 0.5) - 1))
    return values[index]


# --- profiling -----------------------------------------------------------------------------


def py_spy() -> str | None:
    return shutil.which("py-spy") or (
        str(Path(sys.executable).parent / "py-spy")
        if (Path(sys.executable).parent / "py-spy").exists()
        else None
    )


def cpu_per_task(before: dict[str, float], after: dict[str, float], tasks: int) -> dict[str, float]:
    return {role: 1000 * (after[role] - before[role]) / max(1, tasks) for role in before}


def start_profiler(pid: int, output: Path, gil: bool = False) -> subprocess.Popen[bytes]:
    binary = py_spy()
    if binary is None:
        raise BenchError("py-spy is not installed (.venv/bin/pip install py-spy)")
    process = subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
         "--rate", "100", "--nonblocking", "--output", str(output),
         *(["--gil"] if gil else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    time.sleep(0.3)  # attach before the clock matters
    return process


def dump_stacks(pid: int, output: Path) -> Path | None:
    """Every thread's Python stack of pid (py-spy dump), for a stalled worker."""
    binary = py_spy()
    if binary is None:
        return None
    with output.open("w") as out:
        subprocess.run(
            [binary, "dump", "--pid", str(pid), "--subprocesses"],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )
    return output


def stop_profiler(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


#: (label, test on one stack's text); inclusive shares of each process role's samples.
CATEGORIES: list[tuple[str, Callable[[str], bool]]] = [
    ("task body: RequestTask.__call__", lambda s: "__call__ (mcard_tasks/producer.py" in s),
    ("  Ledger.apply", lambda s: "apply (mcard_tasks/ledger.py" in s),
    ("    one-statement fast path", lambda s: "_record_success (mcard_tasks/ledger.py" in s),
    ("    general path (claim transaction)", lambda s: "_claim (mcard_tasks/ledger.py" in s),
    ("    waiting for PostgreSQL (psycopg wait)", lambda s: "wait (psycopg/" in s),
    ("    statement execution (SQLAlchemy Core)", lambda s: "Connection.execute (sqlalchemy/" in s),
    ("    commit", lambda s: "_connection_commit_impl (sqlalchemy/" in s),
    ("  get_ledger / engine_for", lambda s: "get_ledger (mcard_tasks/ledger.py" in s),
    ("    alembic schema check/upgrade", lambda s: "alembic/" in s),
    ("  validation (pydantic / payloads)", lambda s: "mcard_tasks/payloads.py" in s),
    (
        "celery tracer outside the task body",
        lambda s: (
            "trace_task (celery/app/trace.py" in s and "__call__ (mcard_tasks/producer.py" not in s
        ),
    ),
    (
        "result backend / task state",
        lambda s: "celery/backends/" in s or "mcard_tasks/results" in s,
    ),
    ("logging", lambda s: "logging/__init__.py" in s),
    ("task events (celery.events)", lambda s: "celery/events/" in s),
    ("broker I/O (kombu / amqp)", lambda s: "kombu/" in s or "amqp/" in s),
    (
        "pool IPC (billiard receive/send)",
        lambda s: (
            "_recv (billiard/" in s
            or "send (billiard/" in s
            or "_write_to (celery/concurrency/asynpool" in s
        ),
    ),
    ("outbox relay thread", lambda s: "mcard_tasks/events.py" in s),
    (
        "  relay: DB (select/lock/mark)",
        lambda s: "mcard_tasks/events.py" in s and "sqlalchemy/" in s,
    ),
    ("  relay: confirmed publishes", lambda s: "_publish (mcard_tasks/events.py" in s),
    (
        "  relay: sleeping between polls",
        lambda s: "run (mcard_tasks/events.py" in s and "Event.wait (threading" in s,
    ),
    ("consumer event loop (asynloop)", lambda s: "asynloop (celery/worker/loops.py" in s),
]


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """Shares of sampled time by category, per process role, and the hottest leaf frames."""
    stacks: list[tuple[str, str, int]] = []
    for line in path.read_text(errors="replace").splitlines():
        text, _, number = line.rpartition(" ")
        if not text or not number.isdigit():
            continue
        depth = sum(1 for frame in text.split(";") if frame.startswith("process "))
        stacks.append(("main" if depth <= 1 else "children", text, int(number)))
    totals = Counter[str]()
    for role, _, count in stacks:
        totals[role] += count
    if not totals:
        return ["(no samples)"]
    out = [
        f"{sum(totals.values())} samples from {path}: main process {totals['main']},"
        f" pool children {totals['children']} (py-spy counts threads blocked in Python-level"
        " waits, e.g. psycopg's wait, as busy)",
        f"  {'category (inclusive)':<46} {'main':>6} {'children':>9}",
    ]
    for label, test in CATEGORIES:
        shares = []
        for role in ("main", "children"):
            part = sum(count for r, text, count in stacks if r == role and test(text))
            shares.append(f"{100 * part / totals[role]:5.1f}%" if totals[role] else "    -")
        out.append(f"  {label:<46} {shares[0]:>6} {shares[1]:>9}")
    leaves: Counter[str] = Counter()
    for _, text, count in stacks:
        leaf = text.rsplit(";", 1)[-1]
        function, _, where = leaf.partition(" (")
        leaves[f"{function} ({where.rsplit('/', 1)[-1]}"] += count
    out.append("  hottest leaf frames (exclusive, all processes):")
    total = sum(totals.values())
    for leaf, count in leaves.most_common(top):
        out.append(f"  {100 * count / total:5.1f}%  {leaf[:100]}")
    return out


# --- main ----------------------------------------------------------------------------------


def fmt_rates(drains: list[Drain]) -> str:
    return ", ".join(f"{drain.rate:,.0f}" for drain in drains)


def run(bench: Bench, args: argparse.Namespace) -> list[str]:
    table: list[str] = []
    sections = set(args.only or "123456")
    if "1" in sections:
        table += drain_rates(bench, args)
    if "2" in sections:
        table += simulated(bench, args)
    if "3" in sections:
        table += latency(bench, args)
    if "4" in sections:
        table += scaling(bench, args)
    if "5" in sections:
        table += connections(bench, args)
    if "6" in sections and not args.no_profile:
        table += profile(bench, args)
    return table


def drain_rates(bench: Bench, args: argparse.Namespace) -> list[str]:
    n, c = args.requests, args.concurrency
    table: list[str] = []
    say = print
    say(f"1. drain rate: {n} requests per round, {args.rounds} rounds, concurrency {c}", flush=True)
    runs: dict[str, list[Drain]] = {"prefork": [], "bare": [], "threads": [], "threads2": []}
    kinds = list(runs)
    for round_ in range(args.rounds):
        for kind in kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]:
            if kind == "prefork":
                drain = bench.drain_mcard("prefork", n, "prefork", c)
            elif kind == "threads":
                drain = bench.drain_mcard("threads", n, None, None)
            elif kind == "threads2":
                # One process per core, like the baseline's prefork children: the same total
                # of 8 threads as the default worker, in 2 worker processes of 4.
                drain = bench.drain_mcard("threads2", n, None, 4, processes=c)
            else:
                drain = bench.drain_bare(n, c)
            runs[kind].append(drain)
            say(
                f"  round {round_ + 1}: {kind:8} {drain.rate:8,.0f} /s"
                f"  ({drain.seconds:.2f} s, {drain.done_before_ready} done before ping)",
                flush=True,
            )
    median = {kind: statistics.median(d.rate for d in drains) for kind, drains in runs.items()}
    table.append("1. Drain rate (tasks/s, from ping to all outcomes recorded / queue empty)")
    table.append(f"   {'variant':<52} {'median':>8}   rounds")
    labels = {
        "prefork": f"mcard single_mint, prefork -c {c}",
        "threads": "mcard single_mint, default pool (threads -c 8)",
        "threads2": f"mcard single_mint, {c} worker processes x threads -c 4",
        "bare": f"bare Celery no-op, prefork -c {c}",
    }
    for kind in ("prefork", "threads", "threads2", "bare"):
        table.append(f"   {labels[kind]:<52} {median[kind]:>8,.0f}   {fmt_rates(runs[kind])}")
    for kind in ("prefork", "threads", "threads2"):
        ratio = median[kind] / median["bare"]
        table.append(f"   ratio mcard {kind} / bare   {ratio:6.2f}   (target >= 1.0)")
    roles = ("worker", "postgres", "rabbitmq")
    table.append(
        f"   CPU ms per task, medians (2 cores: at most {2000 / median['bare']:.2f} ms in all"
        " to match bare)"
    )
    table.append(f"   {'':<30}" + "".join(f"{role:>10}" for role in (*roles, "all")))
    for kind in ("prefork", "threads", "threads2", "bare"):
        cpu = [statistics.median(d.cpu_ms.get(role, 0.0) for d in runs[kind]) for role in roles]
        table.append(
            f"   {labels[kind].split(',')[0].split(' single')[0] + ' ' + kind:<30}"
            + "".join(f"{value:>10.2f}" for value in (*cpu, sum(cpu)))
        )

    return table


def simulated(bench: Bench, args: argparse.Namespace) -> list[str]:
    n, table, say = args.requests, [""], print
    latency_ms, sim_c = args.issuer_latency_ms, args.issuer_concurrency
    ideal = sim_c / (latency_ms / 1000)
    say(
        f"2. simulated issuer {latency_ms:g} ms, threads -c {sim_c} (ideal {ideal:,.0f}/s)",
        flush=True,
    )
    sim = bench.drain_mcard(
        "simulated", n, "threads", sim_c, issuer="simulated", issuer_latency_ms=f"{latency_ms:g}"
    )
    say(f"  {sim.rate:,.0f} /s ({sim.seconds:.2f} s)", flush=True)
    table.append(
        f"2. Simulated issuer ({latency_ms:g} ms per call), threads -c {sim_c}, {n} requests"
    )
    table.append(
        f"   rate {sim.rate:,.0f}/s of ideal {ideal:,.0f}/s = {sim.rate / ideal:.2f}"
        "   (target >= 0.8)"
    )

    return table


def latency(bench: Bench, args: argparse.Namespace) -> list[str]:
    table, say = [""], print
    say(f"3. latency at {args.rate:g} requests/s for {args.seconds:g} s", flush=True)
    lat = bench.latency(args.rate, args.seconds)
    say(f"  {lat}", flush=True)
    table.append(
        f"3. Latency delay() -> committed outcome, default pool, offered {lat['offered']:.0f}/s"
        f" for {args.seconds:g} s (producer at most {lat['behind_ms']:.0f} ms behind schedule,"
        f" {lat['republished']} publishes retried)"
    )
    table.append(
        f"   recorded_at: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms"
        "   (target p99 < 50 ms)"
    )
    table.append(
        f"   seen by a 5 ms ledger poller: p50 {lat['seen_p50']:.1f} ms,"
        f" p99 {lat['seen_p99']:.1f} ms"
    )

    return table


def scaling(bench: Bench, args: argparse.Namespace) -> list[str]:
    n, table, say = args.requests, [""], print
    say(f"4. scaling: {n} and {10 * n} requests, default pool", flush=True)
    small = bench.drain_mcard("scale", n, None, None)
    say(f"  {n}: {small.seconds:.2f} s, RSS {small.rss_kib / 1024:.0f} MiB", flush=True)
    large = bench.drain_mcard("scale", 10 * n, None, None)
    say(f"  {10 * n}: {large.seconds:.2f} s, RSS {large.rss_kib / 1024:.0f} MiB", flush=True)
    table.append("4. Scaling, default pool (threads -c 8)")
    for drain in (small, large):
        table.append(
            f"   {drain.requests:>7,} requests: {drain.seconds:7.2f} s ({drain.rate:,.0f}/s),"
            f" worker RSS after {drain.rss_kib / 1024:6.1f} MiB"
        )
    table.append(
        f"   time ratio {large.seconds / small.seconds:.1f}x (target ~10x);"
        f" RSS ratio {large.rss_kib / small.rss_kib:.2f} (target ~1)"
    )

    return table


def connections(bench: Bench, args: argparse.Namespace) -> list[str]:
    table, say = [""], print
    say("5. broker connections at concurrency 2, 8, 32 (default pool)", flush=True)
    table.append("5. Broker connections held by one worker (default pool, after 200 tasks)")
    for concurrency in (2, 8, 32):
        found = bench.connections(concurrency)
        say(f"  -c {concurrency}: {found}", flush=True)
        others = f"; other connections on the vhost: {found['others']}" if found["others"] else ""
        if found["stalled"]:
            others += f"; {found['stalled']}"
        table.append(
            f"   -c {concurrency:<3} connections {found['connections']:>2}, channels"
            f" {found['channels']:>3}{others}"
        )

    return table


def profile(bench: Bench, args: argparse.Namespace) -> list[str]:
    c, table, say = args.concurrency, [""], print
    output = Path(args.profile_output)
    pool = args.profile_pool
    say(f"6. profile: py-spy on a drain of {args.profile_requests} ({pool})", flush=True)
    concurrency = c if pool == "prefork" else None
    drain = bench.drain_mcard(
        "profile", args.profile_requests, pool if pool == "prefork" else None, concurrency,
        profile=output,
    )  # fmt: skip
    table.append(
        f"6. Profile of an mcard drain under py-spy ({pool}, {drain.rate:,.0f}/s while sampled)"
    )
    table.extend("   " + line for line in summarize_profile(output))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="N per drain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="prefork children (mcard, bare)")
    parser.add_argument("--bare-queue-type", choices=["quorum", "classic"], default="quorum")
    parser.add_argument("--issuer-latency-ms", type=float, default=50.0)
    parser.add_argument("--issuer-concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=100.0, help="latency: offered requests/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="latency: how long")
    parser.add_argument("--timeout", type=float, default=60.0, help="base bound of every drain")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--only", default=None, help="sections to run, e.g. 15 (default all)")
    parser.add_argument("--profile-pool", choices=["prefork", "threads"], default="prefork")
    parser.add_argument("--profile-requests", type=int, default=2000)
    parser.add_argument("--profile-output", default="/tmp/mcard-worker-profile.txt")
    parser.add_argument(
        "--profile-gil", action="store_true", help="sample only the thread holding the GIL"
    )
    args = parser.parse_args()

    suffix = uuid.uuid4().hex[:8]
    vhost, database = f"mcard-bench-{suffix}", f"mcard_bench_{suffix}"
    bench: Bench | None = None
    started = time.monotonic()
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        pg_admin(f'CREATE DATABASE "{database}"')
        try:
            logs = Path(tempfile.mkdtemp(prefix="mcard-bench-worker-"))
            base = PG_ADMIN_URL.rsplit("/", 1)[0]
            bench = Bench(args, vhost, f"{base}/{database}", logs)
            try:
                table = run(bench, args)
            except BaseException:
                print(f"failed; the worker logs are kept in {logs}", file=sys.stderr)
                raise
            else:
                if any(logs.glob("*-stacks.txt")):
                    print(f"\nstalled workers' stacks and logs are kept in {logs}")
                else:
                    shutil.rmtree(logs, ignore_errors=True)
            finally:
                bench.stop_all()
                for resource in (bench.db, bench.raw):
                    try:
                        if resource is not None:
                            resource.close()
                    except Exception:
                        pass
        finally:
            database_module = sys.modules.get("mcard_tasks.database")
            for engine in getattr(database_module, "_ENGINES", {}).values():
                engine.dispose()  # our pooled connections, before DROP DATABASE
            pg_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        rabbitmqctl("delete_vhost", vhost, attempts=10)
    print()
    print(f"vhost {vhost}, database {database} (both removed); {time.monotonic() - started:.0f} s")
    print("\n".join(table))


if __name__ == "__main__":
    main()
