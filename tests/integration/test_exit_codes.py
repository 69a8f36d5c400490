"""Every exit code the README documents, from every command that can produce it.

Each case runs ``mcard-tasks`` as an operator's script would: a fresh process, with the broker
or the ledger pointed at a port where nothing listens. The cases of one exit code run side by
side, and a failure lists every case that exited otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mcard_tasks.ledger import get_ledger
from mcard_tasks.payloads import SingleMintRequest
from tests.fixtures import drain_dlq

pytestmark = pytest.mark.integration

NO_BROKER = "amqp://guest:guest@127.0.0.1:5999//"
NO_LEDGER = "postgresql://postgres@127.0.0.1:5999/nothing"
Case = tuple[list[str], dict[str, str]]


def mcard_tasks(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "mcard_tasks.cli", *args],
        env=dict(os.environ, MCARD_PUBLISH_TIMEOUT="2", **env),
        capture_output=True,
        text=True,
        timeout=90,
    )
    return done.returncode, done.stdout + done.stderr


def assert_exit(code: int, cases: list[Case]) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: mcard_tasks(*case), cases))
    wrong = [
        f"mcard-tasks {' '.join(args)} exited {got}, not {code}:\n{output[-600:]}"
        for (args, _), (got, output) in zip(cases, results, strict=True)
        if got != code
    ]
    assert not wrong, "\n\n".join(wrong)


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    """An SQLite ledger of this test alone."""
    return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"


def lines(tmp_path: Path, *documents: object) -> str:
    path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("".join(json.dumps(document) + "\n" for document in documents))
    return str(path)


def test_invalid_requests_exit_2(vhost: str, tmp_path: Path, ledger: str) -> None:
    env = {"MCARD_DATABASE_URL": ledger}
    assert_exit(
        2,
        [
            (["single-mint", "--card-id", "bad id", "--owner", "alice"], env),
            (["mint", "--owner", "bob", "--card-id", "c-1", "--card-id", "c-1"], env),
            (["mint", "--owner", "bob", "--card-id", "c-1", "--metadata", "[1"], env),
            (["single-mint", "--card-id", "c-1", "--owner", "bob", "--metadata", "[]"], env),
            (["burn", "--card-id", "c-1", "--owner", "al\tice"], env),
            (["status", "white space"], env),
            (["import", lines(tmp_path, {"task": "single_mint", "owner": "x"})], env),
            (["metrics", "--address", "0.0.0.0"], env),  # no credentials, not loopback
            (["metrics"], env | {"MCARD_FLOWER_USER": "u", "MCARD_FLOWER_PASSWORD": "short"}),
        ],
    )


def test_conflicting_request_ids_exit_3(vhost: str, ledger: str) -> None:
    request_id = f"R-{uuid.uuid4().hex}"
    get_ledger(ledger).apply(
        "mcard.single_mint", request_id, SingleMintRequest(card_id="c-1", owner="alice")
    )
    env = {"MCARD_DATABASE_URL": ledger}
    assert_exit(
        3,
        [
            (
                ["single-mint", "--card-id", "c-2", "--owner", "alice", "--request-id", request_id],
                env,
            ),
            (["mint", "--owner", "alice", "--card-id", "c-1", "--request-id", request_id], env),
            (["burn", "--card-id", "c-1", "--owner", "alice", "--request-id", request_id], env),
        ],
    )


def test_an_unreachable_broker_exits_4(tmp_path: Path, ledger: str) -> None:
    env = {"MCARD_BROKER_URL": NO_BROKER, "MCARD_DATABASE_URL": ledger}
    good = lines(tmp_path, {"task": "single_mint", "card_id": "c-9", "owner": "alice"})
    assert_exit(
        4,
        [
            (["single-mint", "--card-id", "c-1", "--owner", "alice"], env),
            (["mint", "--owner", "bob", "--card-id", "c-2"], env),
            (["burn", "--card-id", "c-1", "--owner", "alice"], env),
            (["import", good], env),
            (["queues"], env),
            (["health"], env),
            (["dlq", "list"], env),
            (["dlq", "replay", "mcard.single_mint"], env),
            (["dlq", "replay", "mcard.single_mint", "--dry-run"], env),
            (["topology", "check"], env),
            (["topology", "declare"], env),
            (["events", "--count", "1", "--timeout", "1"], env),
        ],
    )


def test_an_unreachable_ledger_exits_5(vhost: str, tmp_path: Path) -> None:
    env = {"MCARD_DATABASE_URL": NO_LEDGER}
    good = lines(tmp_path, {"task": "single_mint", "card_id": "c-9", "owner": "alice"})
    assert_exit(5, [(["status", "some-request"], env), (["import", good], env), (["health"], env)])


def test_a_request_without_an_outcome_exits_6(ledger: str) -> None:
    never = f"never-{uuid.uuid4().hex}"
    no_broker = {"MCARD_DATABASE_URL": ledger, "MCARD_BROKER_URL": NO_BROKER}
    assert_exit(
        6, [(["status", never], {"MCARD_DATABASE_URL": ledger}), (["status", never], no_broker)]
    )


def test_a_dead_lettered_request_exits_8(vhost: str, ledger: str) -> None:
    from mcard_tasks import app
    from mcard_tasks.admin import declare_topology
    from mcard_tasks.topology import DEAD_LETTER_EXCHANGE

    declare_topology(app)
    request_id = f"dead-{uuid.uuid4().hex}"
    with app.producer_or_acquire() as producer:
        producer.publish(
            b"{not json",
            exchange=DEAD_LETTER_EXCHANGE.name,
            routing_key="mcard.single_mint",
            headers={"task": "mcard.single_mint", "id": request_id, "x-mcard-reason": "test"},
            content_type="application/json",
            content_encoding="utf-8",
            serializer=None,
        )
    try:
        assert_exit(8, [(["status", request_id], {"MCARD_DATABASE_URL": ledger})])
    finally:
        drain_dlq("mcard.single_mint")
