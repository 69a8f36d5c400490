"""Exactly once under real faults: malformed messages, killed processes, a restarted broker.

Every test asserts the end state in the ledger (Celery's result slot keeps the first success
and would hide a second run), bounds every wait, and leaves its worker stopped.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Producer

from mcard_tasks import app
from mcard_tasks.deadletter import REASON_HEADER
from mcard_tasks.ledger import Ledger, get_ledger
from mcard_tasks.tasks import single_burn, single_mint
from tests.fixtures import Worker, drain_dlq, rabbitmqctl, recorded, use_ledger, wait_for

pytestmark = pytest.mark.integration


def publish_raw(body: bytes, headers: dict[str, Any] | None, content_type: str) -> None:
    """Publish bytes straight to exchange mcard, as a foreign or broken producer would."""
    with Connection(app.conf.broker_url) as connection:
        producer = Producer(connection.default_channel)
        producer.publish(
            body,
            exchange="mcard",
            routing_key="mcard.single_mint",
            headers=headers or {},
            content_type=content_type,
            content_encoding="utf-8",
            serializer=None,
            delivery_mode=2,
        )


def celery_headers(task: str = "mcard.single_mint", task_id: str | None = None) -> dict[str, Any]:
    task_id = task_id or f"raw-{uuid.uuid4().hex}"
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "retries": 0,
    }


def celery_body(**kwargs: Any) -> bytes:
    return json.dumps(
        [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    ).encode()


def send_mints(count: int) -> dict[str, str]:
    """Enqueue count single_mints of distinct cards; request ID -> card."""
    run = uuid.uuid4().hex[:8]
    sent = {f"m-{run}-{i}": f"card-{run}-{i}" for i in range(count)}
    for request_id, card in sent.items():
        single_mint.delay(card_id=card, owner="alice", request_id=request_id)
    return sent


def assert_each_minted_exactly_once(ledger: Ledger, sent: dict[str, str]) -> None:
    for request_id, card in sent.items():
        outcome = ledger.outcome(request_id)
        assert outcome is not None, f"{request_id} has no outcome"
        # A redelivered request whose effect committed returns the stored outcome: never
        # "already_minted" by its own first run.
        assert (outcome["outcome"], outcome["card_ids"]) == ("succeeded", [card]), outcome
        stored = ledger.card(card)
        assert stored is not None and stored.minted_by == request_id


MALFORMED: list[tuple[str, bytes, dict[str, Any] | None, str, str]] = [
    ("broken JSON", b'[[], {"card_id": ', celery_headers(), "application/json", "undecodable"),
    (
        "pickle",
        pickle.dumps(([], {"card_id": "c", "owner": "o"}, {})),
        celery_headers(),
        "application/x-python-serialize",
        "invalid task message",
    ),
    ("text/plain", b"mint card c for o", celery_headers(), "text/plain", "invalid task message"),
    (
        "no Celery headers",
        json.dumps({"card_id": "c", "owner": "o"}).encode(),
        None,
        "application/json",
        "no task headers",
    ),
    (
        "unknown task",
        celery_body(card_id="c", owner="o"),
        celery_headers("mcard.melt"),
        "application/json",
        "unknown task name",
    ),
    (
        "missing field",
        celery_body(owner="o"),
        celery_headers(),
        "application/json",
        "card_id: is required",
    ),
    (
        "mistyped field",
        celery_body(card_id=42, owner="o"),
        celery_headers(),
        "application/json",
        "card_id",
    ),
    (
        "invalid request id",
        celery_body(card_id="c", owner="o"),
        celery_headers(task_id="bad id"),
        "application/json",
        "request_id",
    ),
]


def test_every_kind_of_malformed_message_is_dead_lettered_with_its_reason(
    sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(sqlite_url, "malformed", pool="prefork", concurrency="2").start()
    use_ledger(sqlite_url)
    drain_dlq("mcard.single_mint")
    for _, body, headers, content_type, _ in MALFORMED:
        publish_raw(body, headers, content_type)
    good = single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="alice")
    assert good.get(timeout=30, interval=0.05)["outcome"] == "succeeded"
    dead: list[Any] = []
    wait_for(
        lambda: dead.extend(drain_dlq("mcard.single_mint")) or len(dead) >= len(MALFORMED),
        30,
        "every malformed message in the DLQ",
        every=0.2,
    )
    reasons = sorted(str(m.headers.get(REASON_HEADER)) for m in dead)
    assert len(dead) == len(MALFORMED), reasons
    for kind, *_, expected in MALFORMED:
        assert any(expected in reason for reason in reasons), (kind, reasons)
    assert worker.process is not None and worker.process.poll() is None, "the worker goes on"
    assert worker.stop() == 0


def test_a_pool_child_killed_mid_stream_loses_and_doubles_nothing(
    postgresql_url: str, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(postgresql_url, "killchild", pool="prefork", concurrency="2").start()
    use_ledger(postgresql_url)
    ledger = get_ledger(postgresql_url)
    sent = send_mints(300)
    ids = list(sent)
    wait_for(lambda: recorded(ledger, ids) >= 30, 60, "the stream to start")
    killed = 0
    for child in worker.children()[:2]:
        subprocess.run(["kill", "-KILL", str(child)], check=False)
        killed += 1
    assert killed, "the worker had pool children to kill"
    wait_for(lambda: recorded(ledger, ids) == len(ids), 120, "every request's outcome", every=0.5)
    assert_each_minted_exactly_once(ledger, sent)
    assert worker.process is not None and worker.process.poll() is None
    assert worker.stop() == 0


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_killed_outright_mid_stream_loses_and_doubles_nothing(
    postgresql_url: str, make_worker: Callable[..., Worker], pool: str
) -> None:
    use_ledger(postgresql_url)
    ledger = get_ledger(postgresql_url)
    # Enqueued before the worker starts: it drains faster than one producer enqueues. The
    # first worker's batches are small and each calls an issuer that takes 50 ms: 200 batches,
    # at least 2.5 s with four at once, so the kill lands mid-stream even on a busy machine
    # (unslowed, it drained 4,000 in the second it took the test to look once in CI).
    sent = send_mints(1000)
    ids = list(sent)
    slow = {"issuer": "simulated", "issuer_latency_ms": "50", "batch_size": "5"}
    first = make_worker(postgresql_url, f"killmain-{pool}", pool=pool, **slow).start()
    wait_for(lambda: recorded(ledger, ids) >= 50, 60, "the stream to start")
    first.kill()
    done_at_kill = recorded(ledger, ids)
    second = make_worker(postgresql_url, f"restarted-{pool}", pool=pool).start()
    wait_for(lambda: recorded(ledger, ids) == len(ids), 120, "every request's outcome", every=0.5)
    assert done_at_kill < len(ids), "the kill happened mid-stream"
    assert_each_minted_exactly_once(ledger, sent)
    assert second.stop() == 0


def test_a_task_that_kills_its_process_stops_at_the_delivery_limit_in_the_dlq(
    sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(
        sqlite_url, "poison", "-I", "tests.crash_tasks", pool="prefork", concurrency="2"
    ).start()
    use_ledger(sqlite_url)
    drain_dlq("mcard.single_mint")
    app.send_task("mcard.test.kill_self", queue="mcard.single_mint")
    dead = wait_for(
        lambda: drain_dlq("mcard.single_mint"), 90, "the poison message in the DLQ", every=0.5
    )
    assert [m.headers["task"] for m in dead] == ["mcard.test.kill_self"]
    deaths = dead[0].headers.get("x-death") or []
    assert any(d.get("reason") == "delivery_limit" for d in deaths), deaths
    after = single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="alice")
    assert after.get(timeout=30, interval=0.05)["outcome"] == "succeeded", "the worker goes on"
    assert worker.stop() == 0


@pytest.mark.parametrize("included", [False, True])
def test_only_the_task_kinds_and_included_modules_run(
    sqlite_url: str, make_worker: Callable[..., Worker], tmp_path: Path, included: bool
) -> None:
    """A task an imported library registers is never run unless -I names its module; Celery's
    built-ins never, even with -I celery.app.builtins."""
    extra = ("-I", "tests.library_tasks,celery.app.builtins") if included else ()
    worker = make_worker(sqlite_url, "library", *extra, specs="tests.library_tasks").start()
    use_ledger(sqlite_url)
    drain_dlq("mcard.single_mint")
    marker = tmp_path / "ran"
    app.send_task(
        "mcard.test.library_task", kwargs={"marker": str(marker)}, queue="mcard.single_mint"
    )
    app.send_task("celery.backend_cleanup", queue="mcard.single_mint")
    expected = {"celery.backend_cleanup"} | (set() if included else {"mcard.test.library_task"})
    dead: list[Any] = []
    wait_for(
        lambda: dead.extend(drain_dlq("mcard.single_mint")) or len(dead) >= len(expected),
        30,
        "the refused tasks in the DLQ",
    )
    assert {m.headers["task"] for m in dead} == expected
    for message in dead:
        reason = message.headers["x-mcard-reason"]
        assert reason == f"unknown task name {message.headers['task']!r}", reason
    if included:
        wait_for(marker.exists, 30, "the included library task to run")
    else:
        assert not marker.exists()
    after = single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="alice")
    assert after.get(timeout=30, interval=0.05)["outcome"] == "succeeded", "the worker goes on"
    assert worker.stop() == 0


@pytest.mark.exclusive
def test_a_broker_restart_during_a_stream_of_burns_loses_and_doubles_nothing(
    postgresql_url: str, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(postgresql_url, "restart").start()
    use_ledger(postgresql_url)
    ledger = get_ledger(postgresql_url)
    minted = send_mints(400)
    wait_for(lambda: recorded(ledger, list(minted)) == len(minted), 60, "the mints")
    burns = {f"b-{request_id}": card for request_id, card in minted.items()}
    errors: list[str] = []

    def stream() -> None:
        for request_id, card in burns.items():
            deadline = time.monotonic() + 90
            while True:  # a client retrying with the same request ID: idempotent
                try:
                    single_burn.delay(card_id=card, owner="alice", request_id=request_id)
                    break
                except Exception as exc:
                    if time.monotonic() > deadline:
                        errors.append(f"{request_id}: {exc}")
                        return
                    time.sleep(0.5)

    sender = threading.Thread(target=stream)
    sender.start()
    wait_for(lambda: recorded(ledger, list(burns)) >= 20, 60, "the burns to start")
    done_at_stop = recorded(ledger, list(burns))
    rabbitmqctl("stop_app")
    time.sleep(2)
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    sender.join(120)
    assert not sender.is_alive() and not errors, errors
    wait_for(
        lambda: recorded(ledger, list(burns)) == len(burns), 150, "every burn's outcome", every=0.5
    )
    assert done_at_stop < len(burns), "the broker stopped mid-stream"
    for request_id, card in burns.items():
        outcome = ledger.outcome(request_id)
        assert outcome is not None and outcome["outcome"] == "succeeded", outcome
        stored = ledger.card(card)
        assert stored is not None and stored.burned_by == request_id
    assert worker.stop() == 0


@pytest.mark.parametrize("batch", ["false", "true"])
def test_an_issuer_failing_a_third_of_its_calls_still_ends_each_request_exactly_once(
    batch: str, postgresql_url: str, make_worker: Callable[..., Worker]
) -> None:
    """Per request (MCARD_ISSUER_BATCH=false) and with one call per batch: a batch of 60
    makes only a few calls, so the mints go in 20 waves of 3 (some 20 calls or more: that
    none fails has odds of 1 in 3,000)."""
    worker = make_worker(
        postgresql_url,
        f"flaky-{batch}",
        issuer="simulated",
        issuer_batch=batch,
        issuer_latency_ms="5",
        issuer_failure_rate="0.33",
        max_retries="12",
    )
    worker.start()
    use_ledger(postgresql_url)
    ledger = get_ledger(postgresql_url)
    drain_dlq("mcard.single_mint")
    sent: dict[str, str] = {}
    for _ in range(1 if batch == "false" else 20):
        wave = send_mints(60 if batch == "false" else 3)
        sent |= wave
        wait_for(lambda w=wave: recorded(ledger, list(w)) == len(w), 150, "the wave's outcomes")
    assert_each_minted_exactly_once(ledger, sent)
    assert drain_dlq("mcard.single_mint") == [], "transient failures are retried, not dropped"
    retried = worker.log.read_text().count("Retry in")
    assert retried > 0, "the issuer did fail some calls"
    assert worker.stop() == 0


def test_what_still_fails_after_its_retries_is_dead_lettered_with_the_reason(
    postgresql_url: str, make_worker: Callable[..., Worker]
) -> None:
    make_worker(
        postgresql_url,
        "down",
        issuer="simulated",
        issuer_latency_ms="0",
        issuer_failure_rate="1.0",
        max_retries="1",
    ).start()
    use_ledger(postgresql_url)
    drain_dlq("mcard.single_mint")
    request_id = f"down-{uuid.uuid4().hex}"
    single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="alice", request_id=request_id)
    dead = wait_for(lambda: drain_dlq("mcard.single_mint"), 60, "the dead letter", every=0.5)
    assert [m.headers["id"] for m in dead] == [request_id]
    assert "simulated issuer failed" in dead[0].headers[REASON_HEADER]
    assert get_ledger(postgresql_url).outcome(request_id) is None, "pending, never applied"


def test_an_unreachable_ledger_is_retried_then_dead_lettered_never_acked_away(
    make_worker: Callable[..., Worker],
) -> None:
    nowhere = "postgresql://postgres@127.0.0.1:1/nowhere"
    make_worker(nowhere, "noledger", max_retries="2").start()
    use_ledger(nowhere)  # the producer publishes unchecked when it cannot reach the ledger
    drain_dlq("mcard.single_burn")
    request_id = f"noledger-{uuid.uuid4().hex}"
    single_burn.delay(card_id="card-x", owner="alice", request_id=request_id)
    dead = wait_for(lambda: drain_dlq("mcard.single_burn"), 90, "the dead letter", every=0.5)
    assert [m.headers["id"] for m in dead] == [request_id]
    assert "LedgerUnavailableError" in dead[0].headers[REASON_HEADER]
