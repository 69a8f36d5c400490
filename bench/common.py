"""What both benchmarks share: a vhost and a database of their own, the environment mcard-tasks
reads, a raw py-amqp baseline publisher, the worker subprocess wrapper, statistics, printing.

Nothing here imports mcard-tasks at module level: it reads its settings at import, so the
benches call :func:`configure` first and import it afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

BROKER = os.environ.get("MCARD_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672")
PG_ADMIN_URL = os.environ.get(
    "MCARD_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
POLL = 0.02  # seconds between looks at the ledger / a queue while waiting

T = TypeVar("T")


class BenchError(RuntimeError):
    pass


def unique(prefix: str, length: int = 8) -> str:
    """prefix and a random hex suffix: names and request-ID tags of one run."""
    return f"{prefix}{uuid.uuid4().hex[:length]}"


def say(text: str = "") -> None:
    """A progress line, shown at once."""
    print(text, flush=True)


# --- RabbitMQ and PostgreSQL -----------------------------------------------------------------


def rabbitmqctl(*args: str, timeout: float = 120, attempts: int = 1) -> str:
    """Run rabbitmqctl (3 s between attempts); its standard output, or BenchError."""
    for attempt in range(attempts):
        done = subprocess.run(
            ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode == 0:
            return done.stdout
        if attempt + 1 < attempts:
            time.sleep(3)
    raise BenchError(f"rabbitmqctl {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")


@contextmanager
def temporary_vhost(name: str) -> Iterator[str]:
    """A vhost of the run's own (guest may do anything on it), deleted whatever happens.
    Each command is tried 10 times: others' tests on a shared broker may be restarting it."""
    rabbitmqctl("add_vhost", name, attempts=10)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*", attempts=10)
        yield name
    finally:
        rabbitmqctl("delete_vhost", name, attempts=10)


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as connection:
        connection.execute(sql)


@contextmanager
def temporary_database(name: str) -> Iterator[str]:
    """A PostgreSQL database of the run's own (yields its URL), dropped whatever happens."""
    pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        database_module = sys.modules.get("mcard_tasks.database")
        for engine in getattr(database_module, "_ENGINES", {}).values():
            engine.dispose()  # this process's pooled connections, before DROP DATABASE
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def configure(vhost: str, database_url: str, *, isolate: bool = False) -> str:
    """Set the environment mcard-tasks reads at import (so before importing it); return the
    broker URL. isolate: first drop every other MCARD_ setting (MCARD_BENCH_ ones stay)."""
    if isolate:
        for key in [key for key in os.environ if key.startswith("MCARD_")]:
            if not key.startswith("MCARD_BENCH_"):
                del os.environ[key]
    broker_url = f"{BROKER}/{vhost}"
    os.environ["MCARD_BROKER_URL"] = broker_url
    os.environ["MCARD_DATABASE_URL"] = database_url
    return broker_url


def request_lines(count: int, tag: str) -> Iterator[str]:
    """count JSON lines of single_mint requests, card and request IDs made from tag (one at
    a time: a large file is written without holding it in memory)."""
    for i in range(count):
        request = {
            "task": "single_mint",
            "card_id": f"{tag}-{i}",
            "owner": "bench",
            "request_id": f"{tag}-r{i}",
        }
        yield json.dumps(request)


def broker_errors() -> tuple[type[Exception], ...]:
    """What a broker connection raises when the broker fails or restarts."""
    from amqp.exceptions import AMQPError
    from kombu.exceptions import KombuError

    return (OSError, AMQPError, KombuError)


# --- raw py-amqp -----------------------------------------------------------------------------


def raw_connection(vhost: str, timeout: float | None = 30) -> Any:
    """A plain py-amqp connection of the bench's own on vhost, named ``bench-raw``.

    timeout bounds every socket operation; None leaves the socket blocking, as py-amqp has it
    (the raw baseline: a socket timeout costs a poll() before every write).
    """
    import amqp

    credentials, address = BROKER.removeprefix("amqp://").split("@", 1)
    user, password = credentials.split(":", 1)
    connection = amqp.Connection(
        address,
        userid=user,
        password=password,
        virtual_host=vhost,
        connect_timeout=10,
        client_properties={"connection_name": f"bench-raw {HOST}:{os.getpid()}"},
    )
    connection.connect()
    connection.sock.settimeout(timeout)
    return connection


def publish_raw_confirmed(
    connection: Any,
    messages: Iterable[tuple[Any, str, str]],
    window: int = 1000,
    timeout: float = 10,
) -> int:
    """Raw py-amqp with asynchronous confirms, the baseline for confirmed publishing.

    Publishes each (amqp.Message, exchange, routing key) on a new confirm channel with at most
    `window` unconfirmed, returns the count once the broker has confirmed them all. A nack is
    a BenchError; `timeout` s without a frame from the broker raises the socket's timeout.
    """
    channel = connection.channel()
    channel.confirm_select()
    acked = 0

    def on_ack(tag: int, multiple: bool) -> None:
        nonlocal acked
        acked = tag if multiple else acked + 1

    def on_nack(tag: int, multiple: bool) -> None:
        raise BenchError("the broker nacked a message")

    channel.events["basic_ack"].add(on_ack)
    channel.events["basic_nack"].add(on_nack)
    sent = 0
    for message, exchange, routing_key in messages:
        channel.basic_publish(message, exchange=exchange, routing_key=routing_key)
        sent += 1
        while sent - acked >= window:
            connection.drain_events(timeout=timeout)
    while acked < sent:
        connection.drain_events(timeout=timeout)
    channel.close()
    return sent


# --- waiting and worker subprocesses ---------------------------------------------------------


def wait_until(condition: Callable[[], T], timeout: float, what: str, every: float = POLL) -> T:
    """condition()'s first true value, looking every `every` s; BenchError after timeout s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return value


@dataclass
class WorkerProcess:
    """A Celery worker subprocess in its own session (process group), with a node name, a
    log file and the app whose control channel pings it. Stopped on leaving a with block."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    app: Any
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

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

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

    def _answers(self) -> bool:
        self.check_alive()
        # Short: a ping sent before the worker's mailbox exists is lost, and the readiness
        # time is late by up to this timeout.
        try:
            return bool(self.app.control.ping(destination=[self.name], timeout=0.1))
        except broker_errors():  # a broker restart by someone else: again
            time.sleep(0.5)
            return False

    def wait_ready(self, timeout: float = 60) -> float:
        """Block until the worker answers a ping; the perf_counter time of the answer."""
        wait_until(self._answers, timeout, f"worker {self.name} to answer a ping", every=0.01)
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


# --- statistics and printing -----------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def percentile(values: Iterable[float], pct: float) -> float:
    """The nearest-rank percentile (pct in 0..100); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def rotations(names: Sequence[T], rounds: int) -> Iterator[tuple[int, T]]:
    """(round, name) for every name in every round, each round starting one further on, so
    that no variant always runs first (or right after the same other)."""
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in [*names[shift:], *names[:shift]]:
            yield round_, name


def median_table(
    columns: tuple[str, str],
    rounds: dict[str, list[float]],
    widths: tuple[int, int],
    indent: str = "",
) -> list[str]:
    """A header and one line per label: its median and every round's value."""
    label_width, value_width = widths
    lines = [f"{indent}{columns[0]:<{label_width}} {columns[1]:>{value_width}}   rounds"]
    for label, values in rounds.items():
        listed = ", ".join(f"{value:,.0f}" for value in values)
        lines.append(
            f"{indent}{label:<{label_width}} {median(values):>{value_width},.0f}   {listed}"
        )
    return lines


def ratio_line(label: str, value: float, target: str, width: int | None = None) -> str:
    """``label  value  (target ...)``, the label padded to width (default: one space)."""
    padded = label.ljust(len(label) + 1 if width is None else width)
    return f"{padded}  {value:6.2f}   (target {target})"
