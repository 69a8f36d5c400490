"""Enqueue never hangs and shares a bounded pool of connections, across threads and forks;
Flower's task-sent events ride along on those connections, unconfirmed."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery.events import get_exchange
from kombu import Queue, pools

from mcard_tasks import app
from mcard_tasks.errors import BrokerUnavailableError
from mcard_tasks.tasks import single_mint
from tests.fixtures import (
    broker_channels,
    broker_connections,
    change_settings,
    rabbitmqctl,
    wait_for,
)

pytestmark = pytest.mark.integration
LIMIT = 2.0


@pytest.fixture
def short_publish_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    change_settings(monkeypatch, publish_timeout=LIMIT)


@pytest.fixture
def fresh_pools() -> Iterator[None]:
    """Start and end with no pooled connections in this process."""
    reset_pools()
    yield
    reset_pools()


def reset_pools() -> None:
    app.pool.force_close_all()
    pools.reset()  # closes and forgets kombu's producer pools of this process
    app._after_fork()  # new pools from now on


def mine() -> list[dict[str, object]]:
    return [c for c in broker_connections() if str(c["name"]).endswith(f":{os.getpid()}")]


def send_one() -> None:
    single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="alice")


def test_many_threads_publish_through_a_bounded_pool(
    vhost: str, fresh_pools: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(app.conf, "broker_pool_limit", 3)
    errors: list[BaseException] = []

    def burst() -> None:
        try:
            for _ in range(15):
                send_one()
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=burst) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    held = wait_for(mine, 20, "this process's connections")
    assert 1 <= len(held) <= 3, held


@pytest.fixture
def task_sent_events(vhost: str) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """A queue bound to Celery's event exchange for task-sent events (what Flower consumes)."""
    with app.connection_for_write() as connection:
        queue = Queue(
            f"test-sent-{uuid.uuid4().hex[:8]}",
            get_exchange(connection, name=app.conf.event_exchange),
            routing_key="task.sent",
            auto_delete=False,
        )
        queue(connection.default_channel).declare()
    events: list[dict[str, Any]] = []

    def collect() -> list[dict[str, Any]]:
        with app.connection_for_read() as connection:
            bound = queue(connection.default_channel)
            while (message := bound.get(no_ack=True)) is not None:
                events.append(message.payload)
        return events

    yield collect
    with app.connection_for_write() as connection:
        queue(connection.default_channel).delete()


def test_each_task_sent_event_goes_unconfirmed_on_the_tasks_own_connection(
    vhost: str,
    fresh_pools: None,
    task_sent_events: Callable[[], list[dict[str, Any]]],
) -> None:
    cards = {f"sent-{uuid.uuid4().hex}": f"card-{uuid.uuid4().hex}" for _ in range(5)}
    for request_id, card in cards.items():
        single_mint.delay(card_id=card, owner="alice", request_id=request_id)

    wait_for(lambda: len(task_sent_events()) >= len(cards), 20, "a task-sent event per task")
    events = task_sent_events()
    assert sorted(event["uuid"] for event in events) == sorted(cards), "one each"
    for event in events:
        assert event["type"] == "task-sent" and event["name"] == "mcard.single_mint"
        assert (event["exchange"], event["routing_key"]) == ("mcard", "mcard.single_mint")
        assert cards[event["uuid"]] in event["kwargs"]

    def modes() -> list[list[bool]] | None:
        mine = [
            sorted(confirms)
            for name, confirms in broker_channels().items()
            if name.endswith(f":{os.getpid()}")
        ]
        return mine if mine == [[False, True]] else None

    # One connection: the tasks on a channel in confirm mode, the events on one without.
    wait_for(modes, 20, "one connection with a confirming and a non-confirming channel")


def test_a_forked_child_does_not_share_its_parents_connection(vhost: str) -> None:
    send_one()  # the parent now holds a pooled connection
    with app.connection_for_write() as parent_connection:
        parent_connection.ensure_connection()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: publish, report its connection's name, leave at once
        code = 0
        try:
            send_one()
            os.write(write_end, ("ok " + " ".join(str(c["name"]) for c in mine())).encode())
        except BaseException as exc:
            os.write(write_end, f"error {exc!r}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    report = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert status == 0 and report.startswith("ok"), report
    assert f":{pid}" in report, "the child opened its own connection, named with its own pid"


@pytest.mark.exclusive
def test_a_blocked_broker_raises_a_clear_error_within_the_bound(
    vhost: str, short_publish_timeout: None, fresh_pools: None
) -> None:
    rabbitmqctl("set_vm_memory_high_watermark", "0")  # a memory alarm blocks publishers
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match="did not confirm"):
            send_one()
        assert time.monotonic() - started < LIMIT + 5
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", "0.4")


@pytest.mark.exclusive
def test_a_stopped_broker_raises_a_clear_error_within_the_bound(
    vhost: str, short_publish_timeout: None, fresh_pools: None
) -> None:
    rabbitmqctl("stop_app")
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match="publishing again with the same"):
            send_one()
        assert time.monotonic() - started < LIMIT + 5
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")
    send_one()  # and publishing works again once it is back
