"""Legacy messages and the operator: MCARD_LEGACY_MESSAGES=false, dlq show and replay, Flower.

Workers of their own (make_worker), so this module is apart from test_legacy.py's stack.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from click.testing import CliRunner

from mcard_tasks import app
from mcard_tasks.cli import main
from mcard_tasks.deadletter import REASON_HEADER
from mcard_tasks.ledger import get_ledger
from mcard_tasks.topology import dlq_name
from tests.fixtures import Worker, drain_dlq, peek, use_ledger, wait_for
from tests.integration.test_flower import Flower, free_port
from tests.integration.test_legacy import legacy_publish

pytestmark = pytest.mark.integration
TIMEOUT = 30


def peek_dlq(queue: str) -> list[Any]:
    with app.connection_for_read() as connection:
        return peek(connection, dlq_name(queue))


def test_with_legacy_messages_off_they_are_dead_lettered_and_a_replay_executes_them_once_on(
    sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    use_ledger(sqlite_url)
    off = make_worker(sqlite_url, "legacy-off", legacy_messages="false").start()
    drain_dlq("mcard.single_burn")  # the worker declared it
    request_id, card = f"off-{uuid.uuid4().hex}", f"card-{uuid.uuid4().hex}"
    app.tasks["mcard.single_mint"].delay(card_id=card, owner="alice").get(timeout=TIMEOUT)
    legacy_publish(
        "mcard.single_burn", "mcard_burn", {"card_id": card, "owner": "alice"}, request_id
    )
    letters = wait_for(lambda: peek_dlq("mcard.single_burn"), TIMEOUT, "the dead letter")
    assert "MCARD_LEGACY_MESSAGES=false" in letters[0].headers[REASON_HEADER]
    ledger = get_ledger(sqlite_url)
    assert ledger.outcome(request_id) is None
    stored = ledger.card(card)
    assert stored is not None and stored.status == "active", "no effect"

    shown = CliRunner().invoke(main, ["dlq", "show", "mcard.single_burn"])
    assert shown.exit_code == 0, shown.output
    first = shown.output.splitlines()[0].split()
    assert first[:2] == [request_id, "mcard.single_burn"], shown.output
    assert "key:    mcard_burn (a legacy message)" in shown.output
    assert "MCARD_LEGACY_MESSAGES=false" in shown.output

    assert off.stop() == 0
    make_worker(sqlite_url, "legacy-on").start()
    replayed = CliRunner().invoke(main, ["dlq", "replay", "mcard.single_burn"])
    assert replayed.output == "replayed 1 message(s) to mcard.single_burn\n"
    outcome = AsyncResult(request_id, app=app).get(timeout=TIMEOUT, interval=0.05)
    assert (outcome["outcome"], outcome["card_ids"]) == ("succeeded", [card])
    stored = ledger.card(card)
    assert stored is not None and stored.status == "burned" and stored.burned_by == request_id
    # The count is kept in its own statement after the outcome's commit: get() may return first.
    wait_for(lambda: ledger.legacy_counts().get("mcard.single_burn", 0) >= 1, TIMEOUT, "the count")
    assert drain_dlq("mcard.single_burn") == []


def test_flower_shows_a_legacy_request_under_its_request_id(
    sqlite_url: str, make_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    worker = make_worker(sqlite_url, "legacy-flower").start()
    use_ledger(sqlite_url)
    flower = Flower(free_port(), tmp_path / "flower.log")
    try:

        def sees_worker() -> bool:
            status, workers = flower.request("/api/workers?refresh=1")
            return status == 200 and worker.node in workers

        wait_for(sees_worker, 60, "Flower to see the worker", every=0.5)
        request_id, card = f"fl-{uuid.uuid4().hex}", f"card-{uuid.uuid4().hex}"
        legacy_publish(
            "mcard.single_mint", "mcard_single_mint", {"card_id": card, "owner": "a"}, request_id
        )
        AsyncResult(request_id, app=app).get(timeout=TIMEOUT, interval=0.05)

        def info() -> Any:
            status, body = flower.request(f"/api/task/info/{request_id}")
            return body if status == 200 and body.get("state") == "SUCCESS" else None

        task = wait_for(info, TIMEOUT, "Flower to show the legacy request", every=0.3)
        assert task["name"] == "mcard.single_mint" and task["uuid"] == request_id
        assert card in task["kwargs"] and "succeeded" in task["result"]
    finally:
        flower.stop()
