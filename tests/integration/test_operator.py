"""Operator commands on the real broker: topology check/declare, dlq show/replay/purge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner

from mcard_tasks import app
from mcard_tasks.admin import queue_depths
from mcard_tasks.cli import main
from mcard_tasks.ledger import get_ledger
from mcard_tasks.tasks import mint, single_mint
from mcard_tasks.topology import DEAD_LETTER_EXCHANGE
from tests.conftest import BROKER_BASE
from tests.fixtures import (
    Worker,
    change_settings,
    drain_dlq,
    rabbitmqctl,
    use_ledger,
    wait_for,
)

pytestmark = pytest.mark.integration


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def dead_letter_a_valid_request(request_id: str, card: str) -> None:
    """Put a well-formed request straight into the single_mint DLQ, as a retry-exhausted one."""
    body = json.dumps([[], {"card_id": card, "owner": "alice"}, {}])
    headers = {
        "lang": "py",
        "task": "mcard.single_mint",
        "id": request_id,
        "retries": 0,
        "x-mcard-reason": "LedgerUnavailableError: simulated outage",
    }
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=DEAD_LETTER_EXCHANGE.name,
            routing_key="mcard.single_mint",
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            serializer=None,
            delivery_mode=2,
        )


def depth(queue: str) -> int:
    return next(d.ready for d in queue_depths(app) if d.name == queue)


def test_topology_declare_then_check_finds_no_drift(vhost: str) -> None:
    assert run("topology", "declare")[0] == 0
    code, output = run("topology", "check")
    assert (code, output.strip()) == (0, "topology matches the broker")


def test_topology_check_explains_a_changed_queue_argument_in_plain_words(
    vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("topology", "declare")[0] == 0
    change_settings(monkeypatch, delivery_limit=9)
    code, output = run("topology", "check")
    assert code == 1
    assert "x-delivery-limit" in output and "mcard.mint" in output
    assert "PRECONDITION_FAILED" not in output
    code, output = run("topology", "declare")
    assert code == 1 and "x-delivery-limit" in output and "must be drained" in output


@pytest.fixture
def drifted_vhost() -> Iterator[str]:
    """A vhost of its own whose task queues were declared with another delivery limit."""
    name = f"mcard-drift-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    url = f"{BROKER_BASE}/{name}"
    env = dict(os.environ, MCARD_BROKER_URL=url, MCARD_DELIVERY_LIMIT="9")
    declared = subprocess.run(
        [sys.executable, "-m", "mcard_tasks.cli", "topology", "declare"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert declared.returncode == 0, declared.stderr
    yield url
    rabbitmqctl("delete_vhost", name)


def test_a_worker_stops_with_the_drift_in_plain_words_instead_of_reconnecting_forever(
    drifted_vhost: str, sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(sqlite_url, "drift", broker_url=drifted_vhost).launch()
    assert worker.process is not None
    code = worker.process.wait(60)
    assert code != 0
    log = worker.log.read_text()
    assert "TopologyDriftError" in log and "x-delivery-limit = '9' on the broker" in log


def test_dlq_show_replay_and_purge(sqlite_url: str, make_worker: Callable[..., Worker]) -> None:
    use_ledger(sqlite_url)
    assert run("topology", "declare")[0] == 0
    drain_dlq("mcard.single_mint")
    request_id, card = f"dl-{uuid.uuid4().hex}", f"card-{uuid.uuid4().hex}"
    dead_letter_a_valid_request(request_id, card)
    code, output = run("dlq", "show", "mcard.single_mint")
    assert code == 0 and request_id in output and "simulated outage" in output
    code, output = run("dlq", "list")
    assert "mcard.single_mint.dlq" in output

    make_worker(sqlite_url, "replay").start()
    assert run("dlq", "replay", "mcard.single_mint") == (
        0,
        "replayed 1 message(s) to mcard.single_mint\n",
    )
    ledger = get_ledger(sqlite_url)
    first = wait_for(lambda: ledger.outcome(request_id), 30, "the replayed request's outcome")
    assert first["outcome"] == "succeeded"

    dead_letter_a_valid_request(request_id, card)  # the same request dead-lettered again
    assert run("dlq", "replay", "mcard.single_mint")[0] == 0
    wait_for(lambda: depth("mcard.single_mint") == 0, 30, "the replayed copy to be consumed")
    later = single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="alice")
    assert later.get(timeout=30, interval=0.05)["outcome"] == "succeeded"
    assert ledger.outcome(request_id) == first, "a replay stays exactly once"
    stored = ledger.card(card)
    assert stored is not None and stored.minted_by == request_id

    dead_letter_a_valid_request(f"dl-{uuid.uuid4().hex}", card)
    assert run("dlq", "purge", "mcard.single_mint", "--yes")[0] == 0
    assert drain_dlq("mcard.single_mint") == []


def test_queues_and_health_report_real_numbers(
    sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    use_ledger(sqlite_url)
    assert run("topology", "declare")[0] == 0
    code, output = run("health", "--timeout", "1")
    assert code == 1 and "workers  FAIL" in output and "broker   ok" in output
    waiting = [mint.delay(owner="alice", card_ids=[f"card-{uuid.uuid4().hex}"]) for _ in range(3)]
    wait_for(lambda: depth("mcard.mint") == 3, 20, "three ready messages")
    code, output = run("queues")
    row = next(line.split() for line in output.splitlines() if line.startswith("mcard.mint "))
    # ready, unacked, consumers; then the legacy column (the session's ledger, shared)
    assert code == 0 and row[1:4] == ["3", "0", "0"] and row[4].isdigit(), output

    worker = make_worker(sqlite_url, "health").start()
    for result in waiting:
        assert result.get(timeout=30, interval=0.05)["outcome"] == "succeeded"
    code, output = run("health")
    assert code == 0 and worker.node in output, output
    row = next(
        line.split() for line in run("queues")[1].splitlines() if line.startswith("mcard.mint ")
    )
    assert row[1:4] == ["0", "0", "1"]


@pytest.mark.parametrize("command", ["health", "queues"])
def test_health_and_queues_fail_when_the_broker_is_down(command: str) -> None:
    env = dict(os.environ, MCARD_BROKER_URL="amqp://guest:guest@127.0.0.1:5999//")
    done = subprocess.run(
        [sys.executable, "-m", "mcard_tasks.cli", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Connection refused" in done.stdout + done.stderr


def test_a_topology_check_closes_each_probe_channel(
    vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each passive probe has its own channel (a refusal closes it), closed after the probe:
    none piles up on the connection while the check runs."""
    from kombu import Connection

    from mcard_tasks.admin import check_topology, declare_topology

    declare_topology(app)
    open_at_release: list[int] = []
    release = Connection.release

    def counting(self: Connection) -> None:
        if self.connected:
            # py-amqp keeps channel 0 (the connection's own) and its open channels here.
            open_at_release.append(len([c for c in self.connection.channels if c]))
        release(self)

    monkeypatch.setattr(Connection, "release", counting)
    assert check_topology(app) == []
    assert open_at_release and max(open_at_release) <= 1, open_at_release
