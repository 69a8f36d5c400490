"""``mcard-tasks status R`` for a request in a dead-letter queue: "dead-lettered", the reason,
the DLQ, exit 8; and the DLQ still holds every letter afterwards, in the same order.

Real broker, real worker: the worker dead-letters a malformed message and a producer's it
refuses (MCARD_PRODUCERS), RabbitMQ one past the delivery limit; every wait bounded.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mcard_tasks import app
from mcard_tasks.admin import queue_depths
from mcard_tasks.cli.status import EXIT_DEAD_LETTERED, EXIT_NO_OUTCOME
from mcard_tasks.deadletter import REASON_HEADER
from mcard_tasks.identity import UNAUTHORIZED_PRODUCER, broker_user
from mcard_tasks.tasks import single_mint
from mcard_tasks.topology import DEAD_LETTER_EXCHANGE, EXCHANGE, dlq_name
from tests.conftest import BROKER_BASE, SESSION
from tests.fixtures import (
    ROOT,
    Worker,
    add_broker_user,
    drain_dlq,
    rabbitmqctl,
    use_ledger,
    wait_for,
)

pytestmark = pytest.mark.integration
QUEUE = "mcard.single_mint"
DLQ = dlq_name(QUEUE)
TIMEOUT = 30


def new(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def status(request_id: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``mcard-tasks status request_id`` in a process of its own, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "mcard_tasks.cli", "status", request_id],
        cwd=ROOT,
        env=dict(os.environ, MCARD_DATABASE_URL=app.settings.database_url, **(env or {})),
        capture_output=True,
        text=True,
        timeout=90,
    )
    return done.returncode, done.stdout + done.stderr


def depth(queue: str) -> int:
    return next(d.ready for d in queue_depths(app) if d.name == queue)


def until_in_dlq(count: int) -> None:
    wait_for(lambda: depth(DLQ) == count, TIMEOUT, f"{count} letter(s) in {DLQ}")


def put_letter(request_id: str, **headers: Any) -> None:
    """A letter straight into the DLQ, as a retry-exhausted request's dead-lettering leaves it."""
    body = json.dumps([[], {"card_id": new("card"), "owner": "alice"}, {}])
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=DEAD_LETTER_EXCHANGE.name,
            routing_key=QUEUE,
            headers={"lang": "py", "task": QUEUE, "id": request_id, "retries": 0, **headers},
            content_type="application/json",
            content_encoding="utf-8",
            serializer=None,
            delivery_mode=2,
        )


def publish_malformed(request_id: str) -> None:
    """A task message whose body is not JSON, with a good request ID in its headers."""
    with app.producer_or_acquire() as producer:
        producer.publish(
            b"{not json",
            exchange=EXCHANGE.name,
            routing_key=QUEUE,
            headers={"lang": "py", "task": QUEUE, "id": request_id, "retries": 0},
            content_type="application/json",
            content_encoding="utf-8",
            serializer=None,
            delivery_mode=2,
            user_id=broker_user(app),  # a producer the worker runs: only the body is wrong
        )


@pytest.fixture
def other_producer(vhost: str) -> Iterator[str]:
    """A broker user of this test who may publish on the session vhost: its broker URL."""
    user, password = f"mcard-status-{SESSION}", secrets.token_hex(12)
    add_broker_user(user, password)
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    base = BROKER_BASE.split("://", 1)[1].split("@", 1)[1]
    yield f"amqp://{user}:{password}@{base}/{vhost}"
    rabbitmqctl("delete_user", user)


@pytest.fixture
def empty_dlq(vhost: str) -> Iterator[None]:
    """The single_mint DLQ empty before and after the test."""
    from mcard_tasks.admin import declare_topology

    declare_topology(app)
    drain_dlq(QUEUE)
    yield
    drain_dlq(QUEUE)


def test_status_names_the_dlq_and_the_reason_of_each_dead_letter_and_keeps_them_all(
    sqlite_url: str,
    make_worker: Callable[..., Worker],
    other_producer: str,
    empty_dlq: None,
) -> None:
    use_ledger(sqlite_url)
    # The worker runs every user's messages but the other producer's.
    make_worker(sqlite_url, "status", producers="mcard-nobody").start()
    before, retried, after = new("before"), new("retried"), new("after")
    malformed, refused = new("malformed"), new("refused")

    put_letter(before, **{REASON_HEADER: "LedgerUnavailableError: simulated outage"})
    until_in_dlq(1)
    publish_malformed(malformed)
    until_in_dlq(2)
    put_letter(retried, **{"x-death": [{"count": 5, "reason": "delivery_limit", "queue": QUEUE}]})
    until_in_dlq(3)
    sent = subprocess.run(
        [
            *(sys.executable, "-m", "mcard_tasks.cli", "single-mint"),
            *("--card-id", new("card"), "--owner", "alice", "--request-id", refused),
        ],
        cwd=ROOT,
        env=dict(os.environ, MCARD_BROKER_URL=other_producer, MCARD_DATABASE_URL=sqlite_url),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    until_in_dlq(4)
    put_letter(after, **{REASON_HEADER: "LedgerUnavailableError: simulated outage"})
    until_in_dlq(5)

    code, output = status(malformed)
    assert code == EXIT_DEAD_LETTERED, output
    assert f"{malformed}: dead-lettered in {DLQ}:" in output and "undecodable body" in output
    code, output = status(refused)
    assert code == EXIT_DEAD_LETTERED, output
    user = other_producer.split("://", 1)[1].split(":", 1)[0]
    assert f"{refused}: dead-lettered in {DLQ}: {UNAUTHORIZED_PRODUCER}: user '{user}'" in output
    code, output = status(retried)
    assert code == EXIT_DEAD_LETTERED and f"delivery_limit in {QUEUE}" in output, output
    code, output = status(new("never-sent"))
    assert code == EXIT_NO_OUTCOME and "in no dead-letter queue" in output, output
    code, output = status(before)  # the head of the DLQ, looked at last
    assert code == EXIT_DEAD_LETTERED and "simulated outage" in output, output

    shown = subprocess.run(  # a look at the head alone leaves the order as it was too
        [sys.executable, "-m", "mcard_tasks.cli", "dlq", "show", QUEUE, "--limit", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert shown.returncode == 0 and before in shown.stdout and refused not in shown.stdout

    letters = drain_dlq(QUEUE)
    assert [m.headers["id"] for m in letters] == [before, malformed, retried, refused, after]
    assert letters[1].body in (b"{not json", "{not json"), (
        "a letter comes back as it was dead-lettered"
    )


def test_status_of_a_message_the_broker_dead_lettered_past_its_delivery_limit(
    sqlite_url: str, make_worker: Callable[..., Worker], empty_dlq: None
) -> None:
    use_ledger(sqlite_url)
    make_worker(
        sqlite_url, "status-poison", "-I", "tests.crash_tasks", pool="prefork", concurrency="2"
    ).start()
    request_id = new("poison")
    app.send_task("mcard.test.kill_self", queue=QUEUE, task_id=request_id)
    wait_for(lambda: depth(DLQ) == 1, 90, "the poison message in the DLQ", every=0.5)
    code, output = status(request_id)
    assert code == EXIT_DEAD_LETTERED, output
    assert f"{request_id}: dead-lettered in {DLQ}: delivery_limit in {QUEUE}" in output
    assert "task mcard.test.kill_self" in output
    after = single_mint.delay(card_id=new("card"), owner="alice")
    assert after.get(timeout=TIMEOUT)["outcome"] == "succeeded"
    assert [m.headers["id"] for m in drain_dlq(QUEUE)] == [request_id]


def test_status_says_when_it_could_not_search_the_dead_letter_queues(
    sqlite_url: str, empty_dlq: None
) -> None:
    use_ledger(sqlite_url)
    request_id = new("unsearched")
    put_letter(request_id, **{REASON_HEADER: "LedgerUnavailableError: simulated outage"})
    until_in_dlq(1)
    code, output = status(request_id, {"MCARD_BROKER_URL": "amqp://guest:guest@127.0.0.1:5999//"})
    assert code == EXIT_NO_OUTCOME, output
    assert "could not be searched" in output and "not searched" in output
    assert "guest:guest" not in output
    assert [m.headers["id"] for m in drain_dlq(QUEUE)] == [request_id]
