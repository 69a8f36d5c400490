"""Bad input, bounded, on a real worker: an oversized body or a far-future ETA is dead-lettered
with its reason, has no effect in the ledger, and the worker goes on with the next message."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mcard_tasks import app
from mcard_tasks.deadletter import REASON_HEADER
from mcard_tasks.ledger import get_ledger
from mcard_tasks.tasks import single_mint
from tests.fixtures import Worker, drain_dlq, use_ledger, wait_for
from tests.integration.test_faults import celery_body, celery_headers, publish_raw

pytestmark = pytest.mark.integration


def dead_letters(count: int) -> list[Any]:
    dead: list[Any] = []
    wait_for(
        lambda: dead.extend(drain_dlq("mcard.single_mint")) or len(dead) >= count,
        30,
        f"{count} dead letters",
        every=0.2,
    )
    return dead


def assert_no_effect(request_id: str, card: str) -> None:
    ledger = get_ledger(app.settings.database_url)
    assert ledger.outcome(request_id) is None
    assert ledger.card(card) is None


def test_an_oversized_body_is_dead_lettered_before_decoding_and_the_worker_goes_on(
    sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(sqlite_url, "bigbody").start()
    use_ledger(sqlite_url)
    drain_dlq("mcard.single_mint")
    bad, card = f"big-{uuid.uuid4().hex}", f"card-{uuid.uuid4().hex}"
    body = celery_body(card_id=card, owner="o", metadata={"k": "x" * 300_000})
    publish_raw(body, celery_headers(task_id=bad), "application/json")
    good = single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="o")
    assert good.get(timeout=30, interval=0.05)["outcome"] == "succeeded"
    (dead,) = dead_letters(1)
    assert dead.headers["id"] == bad
    assert dead.headers[REASON_HEADER] == (
        f"body: the task message is {len(body)} bytes, over MCARD_MAX_BODY_BYTES=262144"
    )
    assert_no_effect(bad, card)
    assert worker.process is not None and worker.process.poll() is None, "the worker goes on"
    assert worker.stop() == 0


def test_a_far_future_eta_is_dead_lettered_and_a_near_one_still_runs(
    sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(sqlite_url, "eta").start()
    use_ledger(sqlite_url)
    drain_dlq("mcard.single_mint")
    now = datetime.now(UTC)
    far, far_card = f"far-{uuid.uuid4().hex}", f"card-{uuid.uuid4().hex}"
    # Straight to the task queue with an eta header: no native delayed delivery in between, so
    # without the limit the worker would hold it in memory for two days.
    headers = dict(celery_headers(task_id=far), eta=(now + timedelta(days=2)).isoformat())
    publish_raw(celery_body(card_id=far_card, owner="o"), headers, "application/json")
    near = f"near-{uuid.uuid4().hex}"
    headers = dict(celery_headers(task_id=near), eta=(now + timedelta(seconds=1)).isoformat())
    publish_raw(celery_body(card_id=f"card-{near}", owner="o"), headers, "application/json")
    # A countdown through Celery's native delayed delivery (quorum queues) arrives when due.
    delayed = single_mint.apply_async(
        kwargs={"card_id": f"card-{uuid.uuid4().hex}", "owner": "o"}, countdown=1
    )
    good = single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="o")
    assert good.get(timeout=30, interval=0.05)["outcome"] == "succeeded"
    assert delayed.get(timeout=30, interval=0.05)["outcome"] == "succeeded"
    ledger = get_ledger(sqlite_url)
    wait_for(lambda: ledger.outcome(near), 30, "the near ETA's outcome")
    (dead,) = dead_letters(1)
    assert dead.headers["id"] == far
    reason = str(dead.headers[REASON_HEADER])
    assert re.match(r"eta: 17\d{4} s ahead is beyond MCARD_MAX_ETA_SECONDS=3600 s", reason), reason
    assert_no_effect(far, far_card)
    assert worker.process is not None and worker.process.poll() is None, "the worker goes on"
    assert worker.stop() == 0
