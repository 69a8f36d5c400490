"""Batched execution in the worker (mcard_tasks.batches) on real workers, RabbitMQ and both
ledgers: each request of a batch keeps its own outcome, outcome event, task events and result,
what a batch cannot decide takes the per-request path, and a crash between a batch's commit
and its acks only causes replays."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from kombu import Exchange, Queue
from sqlalchemy import func, select

from mcard_tasks import app
from mcard_tasks.ledger import OUTBOX, get_ledger
from mcard_tasks.tasks import single_burn, single_mint
from tests.conftest import VHOST
from tests.fixtures import (
    Subscriber,
    Worker,
    drain_dlq,
    rabbitmqctl,
    recorded,
    use_ledger,
    wait_for,
)
from tests.integration.test_faults import (
    assert_each_minted_exactly_once,
    celery_body,
    celery_headers,
    publish_raw,
    send_mints,
)

pytestmark = pytest.mark.integration
JSON = "application/json"


class TaskEvents:
    """Flower's view: a queue bound to Celery's event exchange for every task-* event."""

    def __init__(self) -> None:
        self.queue = Queue(
            f"test-taskevents-{uuid.uuid4().hex[:8]}",
            Exchange("celeryev", type="topic"),
            routing_key="task.#",
            auto_delete=False,
            durable=False,
        )
        with app.connection_for_write() as connection:
            self.queue(connection.default_channel).declare()
        self.seen: dict[str, set[str]] = {}

    def collect(self) -> dict[str, set[str]]:
        with app.connection_for_read() as connection:
            bound = self.queue(connection.default_channel)
            while (message := bound.get(no_ack=True)) is not None:
                body = message.decode()
                for event in body if isinstance(body, list) else [body]:
                    self.seen.setdefault(event.get("uuid"), set()).add(event["type"])
        return self.seen

    def delete(self) -> None:
        with app.connection_for_write() as connection:
            self.queue(connection.default_channel).delete()


@pytest.fixture
def task_events() -> Iterator[TaskEvents]:
    events = TaskEvents()
    yield events
    events.delete()


def settled(worker: Worker, queue: str = "mcard.single_mint") -> bool:
    """Nothing left in queue, ready or unacked, and the worker's channel never closed on a
    wrong ack (a multiple-ack over a delivery acked already would: unknown delivery tag)."""
    log = worker.log.read_text(errors="replace")
    assert "unknown delivery tag" not in log and "PRECONDITION_FAILED" not in log, log[-3000:]
    listed = rabbitmqctl(
        "list_queues", "-q", "-p", VHOST, "name", "messages_ready", "messages_unacknowledged"
    )
    rows = {line.split()[0]: line.split()[1:] for line in listed.splitlines() if line.strip()}
    return rows.get(queue) == ["0", "0"]


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def test_a_burst_is_applied_in_batches_and_each_request_keeps_its_outcome_events_and_result(
    ledger_url: str,
    make_worker: Callable[..., Worker],
    subscriber: Callable[[str], Subscriber],
    task_events: TaskEvents,
) -> None:
    use_ledger(ledger_url)
    ledger = get_ledger(ledger_url)
    outcomes = subscriber("mcard.single_mint.*")
    sent = send_mints(400)  # enqueued before the worker starts: they arrive together
    worker = make_worker(ledger_url, "batches", log_tasks="false").start()
    ids = list(sent)
    wait_for(lambda: recorded(ledger, ids) == len(ids), 60, "every outcome", every=0.2)
    assert_each_minted_exactly_once(ledger, sent)
    stamps = {ledger.outcome(request_id)["recorded_at"] for request_id in ids}  # type: ignore[index]
    assert len(stamps) < len(ids) / 10, f"{len(stamps)} transactions for {len(ids)} requests"
    first = ids[0]
    assert AsyncResult(first, app=app).get(timeout=10) == ledger.outcome(first)
    wait_for(lambda: len(outcomes.collect()) >= len(ids), 30, "every outcome event")
    assert {request_id: len(m) for request_id, m in outcomes.by_request().items()} == dict.fromkeys(
        ids, 1
    )
    wanted = {"task-received", "task-started", "task-succeeded"}
    wait_for(
        lambda: all(wanted <= task_events.collect().get(request_id, set()) for request_id in ids),
        30,
        "Flower's three events of every request",
    )
    wait_for(lambda: settled(worker), 30, "every message acked")
    assert worker.stop() == 0


def test_bad_requests_inside_a_batch_get_their_own_outcome_or_dead_letter_and_the_rest_commit(
    ledger_url: str, make_worker: Callable[..., Worker]
) -> None:
    use_ledger(ledger_url)
    ledger = get_ledger(ledger_url)
    run = uuid.uuid4().hex[:8]
    worker = make_worker(ledger_url, "batchmix").start()
    earlier = single_mint.delay(card_id=f"old-{run}", owner="alice", request_id=f"old-{run}")
    stored = earlier.get(timeout=30)
    assert worker.stop() == 0
    drain_dlq("mcard.single_mint")
    good = send_mints(60)
    single_mint.delay(card_id=f"old-{run}", owner="alice", request_id=f"old-{run}")  # replay
    conflict = celery_headers(task_id=f"old-{run}")
    publish_raw(celery_body(card_id=f"other-{run}", owner="eve"), conflict, "application/json")
    single_mint.delay(card_id=f"old-{run}", owner="bob", request_id=f"rival-{run}")  # rejected
    twice = f"twice-{run}"
    for _ in range(2):  # the same request twice in one batch
        single_mint.delay(card_id=twice, owner="alice", request_id=twice)
    reused = f"reused-{run}"  # one new request ID, two payloads, in one batch: a conflict
    for card, owner in ((reused, "alice"), (f"{reused}-b", "eve")):
        publish_raw(celery_body(card_id=card, owner=owner), celery_headers(task_id=reused), JSON)
    publish_raw(celery_body(owner="o"), celery_headers(), "application/json")  # invalid
    publish_raw(b'[[], {"card_id": ', celery_headers(), "application/json")  # undecodable
    single_burn.delay(card_id=f"old-{run}", owner="alice", request_id=f"burn-{run}")
    more = send_mints(60)
    worker = make_worker(ledger_url, "batchmix2").start()
    expected = [*good, *more, twice, reused, f"rival-{run}", f"burn-{run}"]
    wait_for(lambda: recorded(ledger, expected) == len(expected), 60, "every outcome", every=0.2)
    assert_each_minted_exactly_once(ledger, good | more | {twice: twice})
    assert ledger.outcome(f"old-{run}") == stored, "the replay and the conflict changed nothing"
    assert ledger.card(f"other-{run}") is None
    rival = ledger.outcome(f"rival-{run}")
    assert rival is not None and rival["reason"] == "already_minted"
    dead: list[Any] = []
    wait_for(lambda: dead.extend(drain_dlq("mcard.single_mint")) or len(dead) >= 4, 30, "4 letters")
    reasons = sorted(message.headers["x-mcard-reason"] for message in dead)
    assert len(reasons) == 4, reasons
    assert sum("conflict" in reason.lower() for reason in reasons) == 2, reasons
    conflicted = [m for m in dead if "conflict" in m.headers["x-mcard-reason"].lower()]
    assert sorted(m.headers["id"] for m in conflicted) == sorted([f"old-{run}", reused])
    assert ledger.card(reused) is not None and ledger.card(f"{reused}-b") is None
    assert any("card_id: is required" in reason for reason in reasons), reasons
    assert any("undecodable" in reason for reason in reasons), reasons
    burn = ledger.outcome(f"burn-{run}")
    assert burn is not None and burn["outcome"] == "succeeded"
    for queue in ("mcard.single_mint", "mcard.single_burn"):
        wait_for(lambda q=queue: settled(worker, q), 30, f"every message of {queue} acked")
    assert worker.stop() == 0


def test_a_worker_killed_between_a_batch_commit_and_its_acks_leaves_every_request_once(
    postgresql_url: str, make_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    use_ledger(postgresql_url)
    ledger = get_ledger(postgresql_url)
    sent = send_mints(600)
    ids = list(sent)
    marker = tmp_path / "crashed"
    crashing = make_worker(
        postgresql_url,
        "commitkill",
        "-I",
        "tests.crash_after_commit",
        test_crash_marker=str(marker),
    ).launch()
    wait_for(lambda: crashing.process.poll() is not None, 60, "the worker to kill itself")  # type: ignore[union-attr]
    committed = marker.read_text().split(",")
    assert 0 < len(committed) < len(ids), "a batch committed, and not all of them"
    at_kill = {request_id: ledger.outcome(request_id) for request_id in committed}
    assert all(outcome is not None for outcome in at_kill.values())
    second = make_worker(postgresql_url, "aftercommitkill").start()
    wait_for(lambda: recorded(ledger, ids) == len(ids), 60, "every outcome", every=0.2)
    assert_each_minted_exactly_once(ledger, sent)
    # Redelivered after the kill: replays of the stored outcome, never a second record.
    assert {request_id: ledger.outcome(request_id) for request_id in committed} == at_kill
    with ledger.engine.connect() as connection:
        count = select(func.count()).where(OUTBOX.c.request_id.in_(ids))
        assert connection.execute(count).scalar_one() == len(ids), "one outcome event each"
    assert second.stop() == 0
