"""Fixtures on real services: a RabbitMQ vhost, SQLite and PostgreSQL ledgers, worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import SESSION, VHOST

if TYPE_CHECKING:
    from mcard_tasks.ledger import Ledger

PG_ADMIN_URL = os.environ.get(
    "MCARD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ROOT = Path(__file__).resolve().parent.parent
#: How a Worker runs by default: the worker of ``mcard-tasks worker``, by module, from ROOT
#: (so tests.crash_tasks is importable with ``--include``).
WORKER_COMMAND = (sys.executable, "-m", "mcard_tasks.worker")
#: The console script installed beside this interpreter.
CONSOLE_SCRIPT = Path(sys.executable).parent / "mcard-tasks"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll condition until it returns a true value; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def peek(connection: Any, queue: str, timeout: float = 30) -> list[Any]:
    """The ready messages of queue, looked at and left there, in order: taken unacked and
    given back by their channel's close. Returns once the queue counts them ready again (a
    quorum queue takes them back a moment after the close: a look right after misses them)."""
    channel = connection.channel()
    seen = []
    try:
        while (message := channel.basic_get(queue, no_ack=False)) is not None:
            seen.append(message)
    finally:
        channel.close()

    def back() -> bool:
        probe = connection.channel()
        try:
            return int(probe.queue_declare(queue, passive=True).message_count) >= len(seen)
        finally:
            probe.close()

    wait_for(back, timeout, f"the messages looked at back in {queue}")
    return seen


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout


def add_broker_user(user: str, password: str) -> None:
    """A broker user, its password given on stdin (never on a command line)."""
    subprocess.run(
        ["rabbitmqctl", "add_user", user],
        input=password,
        text=True,
        check=True,
        capture_output=True,
        timeout=60,
    )


def broker_connections(vhost: str = VHOST) -> list[dict[str, Any]]:
    """The broker's connections on vhost, with their client-given names."""
    rows = json.loads(
        rabbitmqctl(
            "list_connections", "--formatter", "json", "vhost", "client_properties", "channels"
        )
        or "[]"
    )
    found = []
    for row in rows:
        if row.get("vhost") != vhost:
            continue
        props = row.get("client_properties") or []
        name = next((p[2] for p in props if isinstance(p, list) and p[0] == "connection_name"), "")
        found.append({"name": name, "channels": row.get("channels", 0)})
    return found


def broker_channels(vhost: str = VHOST) -> dict[str, list[bool]]:
    """Whether each channel on vhost is in confirm mode, by its connection's client-given name."""
    names = {}
    for row in json.loads(
        rabbitmqctl("list_connections", "--formatter", "json", "name", "vhost", "client_properties")
        or "[]"
    ):
        props = row.get("client_properties") or []
        names[row["name"]] = next(
            (p[2] for p in props if isinstance(p, list) and p[0] == "connection_name"), ""
        )
    found: dict[str, list[bool]] = {}
    for row in json.loads(
        rabbitmqctl("list_channels", "--formatter", "json", "name", "vhost", "confirm") or "[]"
    ):
        if row.get("vhost") != vhost:
            continue
        connection = names.get(str(row["name"]).rsplit(" (", 1)[0], "")
        found.setdefault(connection, []).append(bool(row["confirm"]))
    return found


def recorded(ledger: Any, request_ids: list[str]) -> int:
    """How many of request_ids have an outcome in the ledger (one query)."""
    from sqlalchemy import func, select

    from mcard_tasks.models import Operation

    with ledger.engine.connect() as connection:
        query = select(func.count()).where(
            Operation.request_id.in_(request_ids), Operation.status != "pending"
        )
        return int(connection.execute(query).scalar_one())


def drain_dlq(queue: str) -> list[Any]:
    """Take every message now in queue's dead-letter queue (acking them)."""
    from mcard_tasks import app
    from mcard_tasks.topology import build_topology, dlq_name

    taken = []
    with app.connection_for_read() as connection:
        dlq = build_topology(app.settings).queue(dlq_name(queue))(connection.default_channel)
        while (message := dlq.get(no_ack=True)) is not None:
            taken.append(message)
    return taken


@pytest.fixture(scope="session")
def vhost() -> Iterator[str]:
    """The test session's own vhost on the real broker, removed at the end."""
    try:
        rabbitmqctl("add_vhost", VHOST)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"cannot create a vhost with rabbitmqctl (is RabbitMQ running?): {exc}")
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    yield VHOST
    rabbitmqctl("delete_vhost", VHOST)


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(sql)


def _database(name: str) -> Iterator[str]:
    """A PostgreSQL database of the test session: its URL, then dropped with its engines."""
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    from mcard_tasks.database import _ENGINES

    for (_, url), engine in list(_ENGINES.items()):
        if f"/{name}" in url:
            engine.dispose()
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    yield from _database(f"mcard_test_{SESSION}")


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.sqlite3'}"


@pytest.fixture(scope="session")
def rules_postgresql_url() -> Iterator[str]:
    """A PostgreSQL database of its own for the ledger rule tests, emptied before each."""
    yield from _database(f"mcard_rules_{SESSION}")


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    """An empty ledger, once on an SQLite file and once on PostgreSQL (the hot path has a
    statement of its own for each)."""
    from sqlalchemy import text

    from mcard_tasks.ledger import get_ledger

    if request.param == "sqlite":
        return get_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    ledger = get_ledger(request.getfixturevalue("rules_postgresql_url"))
    with ledger.engine.begin() as connection:
        connection.execute(text("TRUNCATE cards, operations, outbox, task_states, replays"))
    return ledger


@dataclass
class Worker:
    """A real worker subprocess (command, then extra: Celery's worker options) with its own
    node name."""

    name: str
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=lambda: list(WORKER_COMMAND))

    @property
    def node(self) -> str:
        return self.name

    def launch(self) -> Worker:
        """Start the process without waiting for it."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*self.command, *self.extra],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for kill()
            )
        return self

    def start(self, timeout: float = 60) -> Worker:
        """Start the process and wait until it answers a ping."""
        return self.launch().ready(timeout)

    def ready(self, timeout: float = 60) -> Worker:
        """Wait until the launched process answers a ping."""
        from mcard_tasks import app

        wait_for(
            lambda: self._exited() or app.control.ping(destination=[self.node], timeout=0.5),
            timeout,
            f"worker {self.node} to answer a ping",
        )
        if self._exited():
            pytest.fail(f"worker {self.node} exited: {self.log.read_text()[-3000:]}")
        return self

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None or self._exited():
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL the worker and every process of its group (pool children included)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def children(self) -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


@pytest.fixture(scope="session")
def worker_factory(
    vhost: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Worker]]:
    """Build workers on the session vhost; any still running at the end is stopped."""
    started: list[Worker] = []
    logs = tmp_path_factory.mktemp("workers")

    def build(
        database_url: str,
        label: str,
        *extra: str,
        command: Sequence[str] = WORKER_COMMAND,
        **settings: str,
    ) -> Worker:
        """A worker running command (default WORKER_COMMAND) with extra and MCARD_* settings."""
        env = dict(os.environ, MCARD_DATABASE_URL=database_url)
        # A line per task run: the cluster tests count runs, and failures read better.
        settings.setdefault("log_tasks", "true")
        name = f"{label}-{len(started)}-{SESSION}@localhost"
        env.update({f"MCARD_{k.upper()}": str(v) for k, v in settings.items()})
        env["MCARD_WORKER_NAME"] = name
        worker = Worker(
            name=name,
            env=env,
            log=logs / f"{label}-{len(started)}.log",
            extra=list(extra),
            command=list(command),
        )
        started.append(worker)
        return worker

    yield build
    for worker in started:
        worker.stop()


@pytest.fixture
def make_worker(worker_factory: Callable[..., Worker]) -> Iterator[Callable[..., Worker]]:
    """Build workers for one test; each is stopped when the test ends, pass or fail."""
    mine: list[Worker] = []

    def build(*args: str, **settings: Any) -> Worker:
        worker = worker_factory(*args, **settings)
        mine.append(worker)
        return worker

    yield build
    for worker in mine:
        worker.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    """Each integration test runs once on an SQLite ledger and once on PostgreSQL."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def change_settings(monkeypatch: pytest.MonkeyPatch, **changes: Any) -> None:
    """Give this process's app other settings for one test (undone after it)."""
    from mcard_tasks import app

    monkeypatch.setattr(app, "settings", app.settings.model_copy(update=changes))


def use_ledger(url: str) -> None:
    """Point this process's producers and result reads at the ledger url."""
    from mcard_tasks import app

    app.settings = app.settings.model_copy(update={"database_url": url})


@pytest.fixture(scope="module")
def stack(ledger_url: str, worker_factory: Callable[..., Worker]) -> Iterator[Worker]:
    """One worker on the ledger; the test process's app produces and reads on the same ledger.

    Module scope: the only worker on the session vhost while its module runs, so no other
    worker (on another ledger) takes its messages.
    """
    worker = worker_factory(ledger_url, "stack").start()
    use_ledger(ledger_url)
    yield worker
    assert worker.stop() == 0, "a warm shutdown (SIGTERM) exits 0"


class Subscriber:
    """A durable queue bound to mcard.events with a pattern; messages collected as they come."""

    def __init__(self, pattern: str) -> None:
        from kombu.entity import Queue

        from mcard_tasks import app
        from mcard_tasks.topology import EVENTS_EXCHANGE

        self.queue = Queue(
            f"test-events-{uuid.uuid4().hex[:8]}",
            EVENTS_EXCHANGE,
            routing_key=pattern,
            durable=True,
            auto_delete=False,
        )
        with app.connection_for_write() as connection:
            EVENTS_EXCHANGE(connection.default_channel).declare()
            self.queue(connection.default_channel).declare()
        self.messages: list[Any] = []

    def collect(self) -> list[Any]:
        from mcard_tasks import app

        with app.connection_for_read() as connection:
            bound = self.queue(connection.default_channel)
            while (message := bound.get(no_ack=True)) is not None:
                self.messages.append(message)
        return self.messages

    def by_request(self) -> dict[str, list[Any]]:
        grouped: dict[str, list[Any]] = {}
        for message in self.messages:
            grouped.setdefault(message.properties["message_id"], []).append(message)
        return grouped

    def delete(self) -> None:
        from mcard_tasks import app

        with app.connection_for_write() as connection:
            self.queue(connection.default_channel).delete()


@pytest.fixture
def subscriber() -> Iterator[Callable[[str], Subscriber]]:
    made: list[Subscriber] = []

    def make(pattern: str) -> Subscriber:
        made.append(Subscriber(pattern))
        return made[-1]

    yield make
    for sub in made:
        sub.delete()
