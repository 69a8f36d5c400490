"""The worker benchmark's measurements, each on an :class:`~bench.worker_env.Environment`:
drains (mcard and the bare Celery baseline), latency at an offered load, and the broker
connections a worker holds. bench/worker.py runs them and prints the table.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    BenchError,
    WorkerProcess,
    broker_errors,
    percentile,
    rabbitmqctl,
    say,
    unique,
    wait_until,
)
from bench.procfs import CpuMeter, rss_kib
from bench.profiling import dump_stacks, profiled
from bench.raw_drain import drain_raw_consumer
from bench.worker_env import BARE_QUEUE, Environment, retry

# --- drains ----------------------------------------------------------------------------------


@dataclass
class Drain:
    label: str
    requests: int
    done_before_ready: int
    seconds: float
    rss_kib: int = 0
    #: CPU milliseconds per task spent by the worker, PostgreSQL and RabbitMQ meanwhile.
    cpu_ms: dict[str, float] = field(default_factory=dict)
    #: Seconds from the ping answer until the relay had published every outcome event too.
    events_seconds: float | None = None

    @property
    def rate(self) -> float:
        return (self.requests - self.done_before_ready) / self.seconds

    @property
    def events_rate(self) -> float | None:
        if self.events_seconds is None:
            return None
        return (self.requests - self.done_before_ready) / self.events_seconds


def drain_mcard(
    env: Environment,
    label: str,
    count: int,
    pool: str | None,
    concurrency: int | None,
    profile: Path | None = None,
    processes: int = 1,
    **settings: str,
) -> Drain:
    """Drain count requests with `processes` worker processes (the time runs from the last
    one's ping answer; the last one is profiled, if profile names an output).

    A worker busy draining may answer its ping late: if a tenth of the requests or more were
    done by then, the time is the span from the first to the last commit instead."""
    tag = unique(label)
    env.enqueue.mcard(count, tag)
    base = env.ledger.done_count()
    workers: list[WorkerProcess] = []
    try:
        for _ in range(processes):
            workers.append(env.workers.mcard(label, pool, concurrency, **settings))
        drain = _timed_drain(env, label, count, base, workers, profile)
    finally:
        for worker in workers:
            worker.stop()
    if drain.done_before_ready >= count / 10:
        drain.done_before_ready, drain.seconds = 0, env.ledger.commit_span(tag)
        drain.events_seconds = env.ledger.events_span(tag)
    return drain


def _timed_drain(
    env: Environment,
    label: str,
    count: int,
    base: int,
    workers: list[WorkerProcess],
    profile: Path | None,
) -> Drain:
    # A profile starts with the worker process (its start-up is in it): a worker busy draining
    # answers its ping late, and a profile begun then would miss what it drained before.
    with profiled(workers[-1].pid, profile, env.args.profile_gil):
        ready = [worker.wait_ready() for worker in workers][-1]
        done0 = env.ledger.done_count() - base
        pids = [worker.pid for worker in workers]
        meter = CpuMeter(pids)

        def drained() -> bool:
            for worker in workers:
                worker.check_alive()
            return env.ledger.done_count() - base >= count

        wait_until(drained, env.drain_timeout(count), f"{label}: {count} outcomes")
        finished = time.perf_counter()
        # The outcome events go out through the outbox relay (a process of its own): the
        # drain is over when the outcomes are committed; when the last event was out too
        # is shown beside it.
        wait_until(
            lambda: env.ledger.events_pending() == 0, env.drain_timeout(count), f"{label}: events"
        )
        published = time.perf_counter()
        cpu = meter.ms_per_task(count - done0)
    rss = sum(rss_kib(pid) for pid in pids)
    return Drain(label, count, done0, finished - ready, rss, cpu, published - ready)


def drain_bare(env: Environment, count: int, concurrency: int) -> Drain:
    """Bare Celery drains count no-op tasks: until its queue is empty and it holds nothing."""
    env.enqueue.bare(count, unique("bare"))
    with env.workers.bare(concurrency) as worker:
        ready = worker.wait_ready()
        # Not yet done at the ping: still queued, or held by the worker (<= concurrency).
        done0 = max(0, count - env.broker.ready(BARE_QUEUE) - concurrency)
        meter = CpuMeter([worker.pid])
        _wait_bare_drained(env, worker, count)
        finished = time.perf_counter()
        cpu = meter.ms_per_task(count - done0)
        rss = rss_kib(worker.pid)
    return Drain("bare", count, done0, finished - ready, rss, cpu)


def drain_raw(env: Environment, count: int) -> Drain:
    """The raw limit (bench/raw_drain.py) on the same requests and queue."""
    env.enqueue.mcard(count, unique("raw"))
    seconds = drain_raw_consumer(
        env.vhost, env.ledger.database_url, count, env.drain_timeout(count)
    )
    return Drain("raw", count, 0, seconds)


def _wait_bare_drained(env: Environment, worker: WorkerProcess, count: int) -> None:
    inspect = worker.app.control.inspect(destination=[worker.name], timeout=2.0)

    def queue_empty() -> bool:
        worker.check_alive()
        return env.broker.ready(BARE_QUEUE) == 0

    def nothing_held() -> bool:
        worker.check_alive()
        try:
            return _holds_nothing(inspect, worker.name)
        except broker_errors():
            time.sleep(0.5)
            return False

    wait_until(queue_empty, env.drain_timeout(count), "the baseline queue to empty")
    wait_until(nothing_held, 30, "the baseline worker to finish", every=0.005)


def _holds_nothing(inspect: Any, name: str) -> bool:
    """The worker answers that it runs no task and has none reserved."""
    active = (inspect.active() or {}).get(name)
    if active is None or active:
        return False
    reserved = (inspect.reserved() or {}).get(name)
    return reserved is not None and not reserved


# --- latency ---------------------------------------------------------------------------------


class LedgerPoller(threading.Thread):
    """Every 5 ms, looks up which sent requests have an outcome: its recorded_at (the worker's
    clock just before commit) and when this poller saw it."""

    def __init__(self, database_url: str) -> None:
        super().__init__(name="latency-poller", daemon=True)
        self.database_url = database_url
        self.sent: dict[str, float] = {}
        self.committed: dict[str, float] = {}
        self.observed: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def mark_sent(self, request_id: str) -> None:
        now = time.time()
        with self.lock:
            self.sent[request_id] = now

    def run(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.database_url, autocommit=True) as db:
                while not self.stopping.is_set():
                    self._look(db)
                    self.stopping.wait(0.005)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _look(self, db: Any) -> None:
        with self.lock:
            waiting = [rid for rid in self.sent if rid not in self.committed]
        if not waiting:
            return
        rows = db.execute(
            "SELECT request_id, recorded_at FROM operations"
            " WHERE request_id = ANY(%s) AND status <> 'pending'",
            (waiting,),
        ).fetchall()
        now = time.time()
        with self.lock:
            for rid, recorded_at in rows:
                self.committed[rid] = recorded_at.timestamp()
                self.observed[rid] = now

    def seen(self, total: int) -> bool:
        """All total requests committed (the poller's failure is raised here)."""
        if self.error is not None:
            raise BenchError(f"latency poller failed: {self.error!r}")
        with self.lock:
            return len(self.committed) >= total

    def finish(self) -> None:
        self.stopping.set()
        self.join(10)

    def milliseconds(self, until: dict[str, float]) -> list[float]:
        return [(until[rid] - sent) * 1000 for rid, sent in self.sent.items()]


@dataclass
class Latency:
    offered: float
    behind_ms: float
    republished: int
    p50: float
    p99: float
    max: float
    seen_p50: float
    seen_p99: float


@dataclass
class Load:
    """What the producer managed: its rate, its worst lag behind schedule, its retries."""

    offered: float = 0.0
    behind: float = 0.0
    republished: int = 0


def delay(env: Environment, load: Load, card_id: str, request_id: str) -> None:
    """single_mint.delay(), again every 0.5 s (20 tries) while the shared broker, which others
    may restart, is unavailable."""
    from mcard_tasks.errors import BrokerUnavailableError

    def again(exc: BaseException) -> None:
        load.republished += 1

    def send() -> None:
        env.single_mint.delay(card_id=card_id, owner="bench", request_id=request_id)

    retry(send, (BrokerUnavailableError,), 20, 0.5, again)


def offer(env: Environment, poller: LedgerPoller, rate: float, total: int) -> Load:
    """total requests at rate per second, each marked sent just before its delay()."""
    tag, load = unique("lat"), Load()
    start = time.perf_counter()
    for i in range(total):
        pause = start + i / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        else:
            load.behind = max(load.behind, -pause)
        poller.mark_sent(f"{tag}-r{i}")
        delay(env, load, f"{tag}-{i}", f"{tag}-r{i}")
    load.offered = total / (time.perf_counter() - start)
    return load


def warm_up(env: Environment, requests: int = 20) -> None:
    warm, base = unique("warm", 6), env.ledger.done_count()
    for i in range(requests):
        env.single_mint.delay(card_id=f"{warm}-{i}", owner="bench", request_id=f"{warm}-{i}")
    wait_until(lambda: env.ledger.done_count() - base >= requests, 60, "warm-up requests")


def measure_latency(env: Environment, rate: float, seconds: float) -> Latency:
    """From just before delay() to the committed outcome, default pool, at an offered load."""
    total = int(rate * seconds)
    with env.workers.mcard("latency", None, None) as worker:
        worker.wait_ready()
        warm_up(env)
        poller = LedgerPoller(env.ledger.database_url)
        poller.start()
        try:
            load = offer(env, poller, rate, total)

            def all_seen() -> bool:
                worker.check_alive()
                return poller.seen(total)

            wait_until(all_seen, 60, "every latency request's outcome")
        finally:
            poller.finish()
    committed = poller.milliseconds(poller.committed)
    seen = poller.milliseconds(poller.observed)
    return Latency(
        load.offered, load.behind * 1000, load.republished,
        percentile(committed, 50), percentile(committed, 99), max(committed),
        percentile(seen, 50), percentile(seen, 99),
    )  # fmt: skip


# --- broker connections ----------------------------------------------------------------------


@dataclass
class Connections:
    stalled: str | None
    connections: int
    channels: int
    others: list[str]


def count_connections(env: Environment, concurrency: int, tasks: int = 200) -> Connections:
    """The connections and channels one worker holds after tasks requests."""
    env.enqueue.mcard(tasks, unique(f"conn{concurrency}x", 6))
    base = env.ledger.done_count()
    with env.workers.mcard(f"conn{concurrency}", None, concurrency) as worker:
        worker.wait_ready()
        stalled = _wait_or_dump(env, worker, base, tasks, concurrency)
        time.sleep(1.0)  # the outbox relay publishes; stats settle
        listed = rabbitmqctl(
            "list_connections", "--formatter", "json", "vhost", "client_properties", "channels"
        )
    rows = [row for row in json.loads(listed or "[]") if row.get("vhost") == env.vhost]
    named = [(connection_name(row), row) for row in rows]
    theirs, own = f"mcard-tasks {HOST}:{worker.pid}", f" {HOST}:{os.getpid()}"
    mine = [row for name, row in named if name == theirs]
    # Others: neither the worker's nor the bench's own (named after this process's pid).
    others = [name or "<unnamed>" for name, _ in named if name != theirs and not name.endswith(own)]
    channels = sum(int(row.get("channels", 0)) for row in mine)
    return Connections(stalled, len(mine), channels, others)


def _wait_or_dump(
    env: Environment, worker: WorkerProcess, base: int, tasks: int, concurrency: int
) -> str | None:
    """None once tasks outcomes are in; else why not, the worker's stacks dumped."""
    try:
        wait_until(lambda: env.ledger.done_count() - base >= tasks, 30, "tasks")
        return None
    except BenchError:
        stalled = f"STALLED at {env.ledger.done_count() - base} of {tasks} done"
        dump = dump_stacks(worker.pid, env.workdir / f"conn{concurrency}-stacks.txt")
        say(f"  -c {concurrency}: {stalled}; stacks in {dump}")
        return stalled


def connection_name(row: dict[str, Any]) -> str:
    """The connection_name client property of a list_connections row ("" if none)."""
    properties = row.get("client_properties") or []
    return next(
        (p[2] for p in properties if isinstance(p, list) and p and p[0] == "connection_name"),
        "",
    )
