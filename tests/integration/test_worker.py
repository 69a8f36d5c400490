"""The worker process: its entry point, shared broker connections, malformed messages set aside."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from mcard_tasks import app
from mcard_tasks.ledger import get_ledger
from mcard_tasks.tasks import single_mint
from tests.fixtures import (
    CONSOLE_SCRIPT,
    Worker,
    broker_connections,
    drain_dlq,
    use_ledger,
    wait_for,
)

pytestmark = pytest.mark.integration


def worker_connections(worker: Worker) -> list[dict[str, Any]]:
    return [c for c in broker_connections() if c["name"].endswith(f":{worker.pid}")]


@pytest.mark.parametrize("concurrency", [2, 16])
def test_a_worker_holds_a_few_broker_connections_whatever_its_concurrency(
    sqlite_url: str,
    make_worker: Callable[..., Worker],
    concurrency: int,
) -> None:
    worker = make_worker(sqlite_url, f"conn{concurrency}", concurrency=str(concurrency)).start()
    try:
        use_ledger(sqlite_url)
        results = [
            single_mint.delay(card_id=f"c-{uuid.uuid4().hex}", owner="o")
            for _ in range(4 * concurrency)
        ]
        for result in results:
            result.get(timeout=30, interval=0.05)
        held = wait_for(lambda: worker_connections(worker), 20, "the worker's connections")
        # Whatever the concurrency: the consumer's, the task events', one pooled producer
        # connection (control replies, dead letters) and the outbox relay's confirm window;
        # channels are the consumer's few (tasks, control, gossip...) and one each.
        assert 1 <= len(held) <= 4, held
        assert sum(c["channels"] for c in held) <= 12, held
    finally:
        assert worker.stop() == 0


def test_a_malformed_request_is_dead_lettered_and_the_worker_goes_on(
    sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    stack = make_worker(sqlite_url, "malformed").start()
    use_ledger(sqlite_url)
    drain_dlq("mcard.single_mint")
    bad_id = f"bad-{uuid.uuid4().hex}"
    app.send_task(
        "mcard.single_mint", kwargs={"card_id": "no spaces allowed", "owner": "o"}, task_id=bad_id
    )
    good = single_mint.delay(card_id=f"c-{uuid.uuid4().hex}", owner="o")
    assert good.get(timeout=20, interval=0.05)["outcome"] == "succeeded"
    dead = wait_for(lambda: drain_dlq("mcard.single_mint"), 20, "the dead letter")
    assert [m.headers["id"] for m in dead] == [bad_id]
    assert get_ledger(app.settings.database_url).outcome(bad_id) is None
    assert stack.process is not None and stack.process.poll() is None
    assert stack.stop() == 0


def test_the_mcard_tasks_worker_command_runs_the_worker_and_passes_celery_options_through(
    sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    # The installed console script, as the image's entrypoint runs it (no checkout on its path).
    worker = make_worker(
        sqlite_url, "console", "--concurrency=3", command=[str(CONSOLE_SCRIPT), "worker"]
    ).start()
    use_ledger(sqlite_url)
    card_id = f"c-{uuid.uuid4().hex}"
    outcome = single_mint.delay(card_id=card_id, owner="o").get(timeout=20, interval=0.05)
    assert (outcome["outcome"], outcome["card_ids"]) == ("succeeded", [card_id])
    # The extra option reached Celery and won over MCARD_CONCURRENCY's default of 8.
    stats = app.control.inspect(destination=[worker.node], timeout=5).stats() or {}
    assert stats[worker.node]["pool"]["max-concurrency"] == 3, stats
    assert worker.stop() == 0, "SIGTERM is a warm shutdown, exit 0"
