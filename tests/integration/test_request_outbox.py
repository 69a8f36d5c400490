"""The request outbox on the real services: from the application's commit to one outcome.

The application's database is separate from the ledger: a tmp SQLite file beside the SQLite
ledger, a PostgreSQL database of its own beside the PostgreSQL ledger. The relay runs as a
real subprocess (``python -m mcard_tasks.cli relay run``) where a crash or an outage matters,
in-process otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kombu import Exchange, Queue
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from mcard_tasks import app
from mcard_tasks.errors import ConflictError
from mcard_tasks.ledger import get_ledger
from mcard_tasks.relay import RequestRelay, outbox_status
from mcard_tasks.request_outbox import REQUEST_OUTBOX, create_outbox, outbox_engine
from mcard_tasks.tasks import single_mint
from tests.conftest import SESSION
from tests.fixtures import ROOT, Subscriber, Worker, _database, drain_dlq, recorded, wait_for
from tests.integration.test_faults import assert_each_minted_exactly_once

pytestmark = pytest.mark.integration

#: Where nothing listens: the broker "down" as the relay sees it (the shared broker is never
#: stopped: other work uses it).
DEAD_BROKER = "amqp://guest:guest@127.0.0.1:5999//"


@pytest.fixture(scope="module")
def app_db_url(ledger_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The application's own database, of the ledger's kind, with the outbox table."""
    if ledger_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path_factory.mktemp('appdb') / 'app.sqlite3'}"
        create_outbox(outbox_engine(url))
        yield url
    else:
        for url in _database(f"mcard_app_{SESSION}"):
            engine = outbox_engine(url)
            create_outbox(engine)
            engine.dispose()
            yield url


@pytest.fixture
def app_db(app_db_url: str) -> Iterator[Engine]:
    engine = outbox_engine(app_db_url)
    yield engine
    engine.dispose()


class RelayProcess:
    """``python -m mcard_tasks.cli relay run`` as a subprocess, its log in a file."""

    def __init__(self, database: str, log: Path, broker_url: str | None = None, **env: str):
        self.log = log
        environ = dict(os.environ, **{f"MCARD_{k.upper()}": v for k, v in env.items()})
        if broker_url is not None:
            environ["MCARD_BROKER_URL"] = broker_url
        self.command = [sys.executable, "-m", "mcard_tasks.cli", "relay", "run"]
        self.command += ["--database", database]
        self.env = environ
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> RelayProcess:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*self.command, *extra], cwd=ROOT, env=self.env, stdout=out, stderr=out
            )
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def wait(self, timeout: float) -> int:
        """The exit code (a --once relay exits by itself)."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(30)


def commit_mints(engine: Engine, count: int, tag: str) -> dict[str, str]:
    """count single_mints, each committed in a transaction of its own; request ID -> card."""
    sent = {f"{tag}-r{i}": f"{tag}-c{i}" for i in range(count)}
    for request_id, card in sent.items():
        with engine.begin() as connection:
            single_mint.delay_in(connection, card_id=card, owner="alice", request_id=request_id)
    return sent


def relay_once(engine: Engine) -> None:
    relay = RequestRelay(app, engine)
    relay.run(once=True)


def test_a_committed_request_ends_once_and_a_rolled_back_one_never_leaves(
    stack: Worker, app_db: Engine, subscriber: Callable[[str], Subscriber]
) -> None:
    events = subscriber("mcard.#")
    tag = uuid.uuid4().hex[:8]
    with Session(app_db) as session:  # the order and its mint: one transaction
        kept = single_mint.delay_in(session, card_id=f"{tag}-kept", owner="alice")
        session.commit()
    with app_db.connect() as connection:
        transaction = connection.begin()
        dropped = single_mint.delay_in(connection, card_id=f"{tag}-dropped", owner="alice")
        transaction.rollback()
    relay_once(app_db)
    outcome = kept.get(timeout=30, interval=0.05)
    assert outcome["outcome"] == "succeeded"
    ledger = get_ledger(app.settings.database_url)
    assert ledger.outcome(dropped.id) is None
    with app_db.connect() as connection:
        ids = set(connection.execute(select(REQUEST_OUTBOX.c.request_id)).scalars())
    assert kept.id in ids and dropped.id not in ids

    def seen() -> bool:
        events.collect()
        return kept.id in events.by_request()

    wait_for(seen, 20, "the committed request's event")
    time.sleep(0.5)  # any copy, or the rolled-back request's event, would arrive meanwhile
    events.collect()
    grouped = events.by_request()
    assert len(grouped[kept.id]) == 1
    assert dropped.id not in grouped


def test_a_relay_killed_mid_batch_and_restarted_ends_each_request_once(
    stack: Worker,
    app_db: Engine,
    app_db_url: str,
    tmp_path: Path,
    subscriber: Callable[[str], Subscriber],
) -> None:
    events = subscriber("mcard.single_mint.#")
    # Small batches, many of them: the kill lands mid-stream even when the test is slow to look.
    sent = commit_mints(app_db, 800, f"kill-{uuid.uuid4().hex[:8]}")
    relay = RelayProcess(app_db_url, tmp_path / "relay.log", relay_batch="10").start()
    wait_for(
        lambda: outbox_status(app_db).relayed > 0, 30, "the relay's first batches", every=0.005
    )
    relay.kill()  # SIGKILL: its open batch is rolled back, never committed
    assert outbox_status(app_db).pending > 0, "killed before the end"
    again = RelayProcess(app_db_url, tmp_path / "relay.log").start("--once")
    assert again.wait(60) == 0
    wait_for(lambda: outbox_status(app_db).pending == 0, 60, "every row relayed")
    ledger = get_ledger(app.settings.database_url)
    wait_for(lambda: recorded(ledger, list(sent)) == len(sent), 120, "every outcome")
    assert_each_minted_exactly_once(ledger, sent)

    def all_events() -> bool:
        events.collect()
        return set(sent) <= set(events.by_request())

    wait_for(all_events, 60, "an event per request")
    for request_id, copies in events.by_request().items():
        if request_id in sent:  # repeats (a crash between confirm and mark) are identical
            assert len({m.body for m in copies}) == 1


def test_commits_succeed_with_the_broker_down_and_all_end_once_when_it_is_back(
    stack: Worker, app_db: Engine, app_db_url: str, tmp_path: Path
) -> None:
    """The broker down, then back, as the relay sees it: a relay pointed at a broker URL where
    nothing listens while the application commits, then a relay on the real vhost."""
    log = tmp_path / "down.log"
    down = RelayProcess(app_db_url, log, broker_url=DEAD_BROKER).start()
    tag = f"down-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    durations = []
    sent: dict[str, str] = {}
    for i in range(1000):
        began = time.monotonic()
        sent.update(commit_mints(app_db, 1, f"{tag}-{i}"))
        durations.append(time.monotonic() - began)
    elapsed = time.monotonic() - started
    assert elapsed < 30 and max(durations) < 1.0, (elapsed, max(durations))
    wait_for(lambda: log.exists() and "the broker is unavailable" in log.read_text(), 30, "down")
    time.sleep(1)  # several retries while down
    assert down.stop() == 0
    assert log.read_text().count("the broker is unavailable") == 1, log.read_text()
    assert outbox_status(app_db).pending >= 1000
    back = RelayProcess(app_db_url, tmp_path / "back.log").start("--once")
    assert back.wait(120) == 0
    ledger = get_ledger(app.settings.database_url)
    wait_for(lambda: recorded(ledger, list(sent)) == len(sent), 120, "all 1000 outcomes")
    assert_each_minted_exactly_once(ledger, sent)


def test_delay_in_then_delay_is_one_request_and_another_payload_conflicts(
    stack: Worker, app_db: Engine
) -> None:
    tag = uuid.uuid4().hex[:8]
    request_id, card = f"{tag}-same", f"{tag}-card"
    with app_db.begin() as connection:
        first = single_mint.delay_in(connection, card_id=card, owner="alice", request_id=request_id)
    relay_once(app_db)
    outcome = first.get(timeout=30, interval=0.05)
    again = single_mint.delay(card_id=card, owner="alice", request_id=request_id)
    assert again.get(timeout=30, interval=0.05) == outcome  # the stored outcome: one request
    with pytest.raises(ConflictError):
        single_mint.delay(card_id=card, owner="mallory", request_id=request_id)
    # The other way round the ledger is not asked at commit time: the worker dead-letters it.
    drain_dlq("mcard.single_mint")
    with app_db.begin() as connection:
        single_mint.delay_in(connection, card_id=card, owner="mallory", request_id=request_id)
    relay_once(app_db)
    letters = wait_for(lambda: drain_dlq("mcard.single_mint"), 30, "the conflict dead-lettered")
    assert any(m.headers.get("id") == request_id for m in letters)
    assert get_ledger(app.settings.database_url).outcome(request_id) == outcome
    with app_db.connect() as connection:
        count = connection.execute(
            select(func.count()).where(REQUEST_OUTBOX.c.request_id == request_id)
        ).scalar_one()
    assert count == 2  # two rows, one request


def test_two_relays_on_one_database_publish_each_row_once_with_its_task_sent_event(
    stack: Worker, app_db: Engine, app_db_url: str, tmp_path: Path
) -> None:
    """Two relays at once (two hosts): each request's message goes out once, so Flower's
    task-sent event, sent after each confirmed batch, is seen once per request."""
    sent_queue = Queue(
        f"test-sent-{uuid.uuid4().hex[:8]}",
        Exchange("celeryev", type="topic"),
        routing_key="task.#",  # task.sent, and task.multi: the relay groups a batch's events
        durable=False,
        auto_delete=False,
    )
    with app.connection_for_write() as connection:
        sent_queue(connection.default_channel).declare()
    try:
        sent = commit_mints(app_db, 400, f"two-{uuid.uuid4().hex[:8]}")
        relays = [
            RelayProcess(app_db_url, tmp_path / f"relay{i}.log", relay_batch="50").start()
            for i in range(2)
        ]
        wait_for(lambda: outbox_status(app_db).pending == 0, 60, "every row relayed")
        # A SIGTERM before a relay has installed its handler (still importing) would kill it.
        wait_for(
            lambda: all("request relay: running" in r.log.read_text() for r in relays),
            60,
            "both relays running",
        )
        for relay in relays:
            assert relay.stop() == 0
        ledger = get_ledger(app.settings.database_url)
        wait_for(lambda: recorded(ledger, list(sent)) == len(sent), 120, "every outcome")
        seen: dict[str, int] = {}
        with app.connection_for_read() as connection:
            bound = sent_queue(connection.default_channel)
            while (message := bound.get(no_ack=True)) is not None:
                body = message.decode()  # one event, or a batch's list (task.multi)
                for event in body if isinstance(body, list) else [body]:
                    if event["type"] == "task-sent":  # the worker's task events come too
                        assert event["name"] == "mcard.single_mint"
                        seen[event["uuid"]] = seen.get(event["uuid"], 0) + 1
        assert {request_id: seen.get(request_id) for request_id in sent} == dict.fromkeys(sent, 1)
    finally:
        with app.connection_for_write() as connection:
            sent_queue(connection.default_channel).delete()
