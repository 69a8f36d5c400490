"""Beyond one machine: a 3-node RabbitMQ cluster, quorum leader failover, several workers.

The module starts the local cluster of scripts/rabbitmq-cluster (and always stops it, which
removes its folders), runs two `mcard-tasks worker` processes and a producer subprocess on the
failover list MCARD_BROKER_URL="url1;url2;url3" with one PostgreSQL ledger, and takes the
leader of the task queue away mid-stream: stopped (`stop_app`), then killed (SIGKILL). Every
request must end exactly once with its true outcome, with no process restarted but the node.

The test process's own app is bound to the session vhost on the main broker, so it neither
publishes nor pings here: the producer is a subprocess, worker readiness is read from the
worker's log, and results are read from the ledger.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from kombu.entity import Queue
from sqlalchemy import select

from mcard_tasks.ledger import Ledger, get_ledger
from mcard_tasks.models import Card, Operation
from mcard_tasks.topology import EVENTS_EXCHANGE
from tests.cluster import (
    OWNER,
    TASK_QUEUE,
    ProducerRun,
    cluster_prerequisites,
    cluster_script,
    count_runs,
    ctl,
    failover_url,
    kill_node,
    node_name,
    node_processes,
    queue_leader,
    quorum_members,
    recovery_seconds,
    running_nodes,
)
from tests.fixtures import Worker, recorded, wait_for

# Cluster start (~20 s) and stop (~10 s) are billed to the first and last test.
pytestmark = [pytest.mark.integration, pytest.mark.exclusive, pytest.mark.timeout(200)]

REQUESTS = 600  # per test
RATE = 100.0  # requests published per second: the stream lasts ~6 s, the fault comes at ~1 s
FAULT_AFTER = 100  # outcomes recorded before the leader is taken away
WORKERS = 2
CONCURRENCY = "4"
# A stall of ~20 s after a node loss is known (Celery's delayed-delivery setup retries the
# dead address on every reconnect); this bounds it with room to spare.
RECOVERY_BUDGET = 120


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[str]]:
    """The 3-node cluster, fresh for this module; ALWAYS stopped (and its folder removed)."""
    missing = cluster_prerequisites()
    if missing:
        pytest.skip(f"no local RabbitMQ cluster: {missing}")
    try:
        started = cluster_script("start")
        if started.returncode != 0:
            pytest.fail(f"scripts/rabbitmq-cluster start failed:\n{started.stderr[-3000:]}")
        nodes = [node_name(n) for n in (1, 2, 3)]
        assert sorted(running_nodes(nodes[0])) == sorted(nodes), "three running members"
        yield nodes
    finally:
        stopped = cluster_script("stop")
        assert stopped.returncode == 0, f"cluster stop failed:\n{stopped.stderr[-3000:]}"
        assert not node_processes(), f"cluster nodes left running: {node_processes()}"


def start_on_cluster(workers: list[Worker], timeout: float = 90) -> list[Worker]:
    """Start workers built by make_worker (so they are stopped at the end, pass or fail).

    Worker.start pings through the test process's app, which is bound to the main broker:
    here each worker's "<node> ready." log line says it consumes (the topology is declared
    before it).
    """
    for worker in workers:
        worker.launch()
    for worker in workers:
        wait_for(
            lambda w=worker: (  # type: ignore[misc]
                w.process.poll() is not None or f"{w.node} ready." in w.log.read_text()
            ),
            timeout,
            f"worker {worker.node} to be ready",
            every=0.2,
        )
        assert worker.process is not None and worker.process.poll() is None, (
            f"worker {worker.node} exited: {worker.log.read_text()[-3000:]}"
        )
    return workers


def exactly_once(ledger: Ledger, sent: dict[str, str]) -> dict[str, Any]:
    """Assert each request minted its own card once, with outcome "succeeded"; the figures."""
    with ledger.engine.connect() as connection:
        operations = connection.execute(
            select(Operation.request_id, Operation.status, Operation.outcome).where(
                Operation.request_id.in_(list(sent))
            )
        ).all()
        cards = dict(
            connection.execute(
                select(Card.card_id, Card.minted_by).where(Card.card_id.in_(list(sent.values())))
            ).all()
        )
    assert len(operations) == len(sent), f"{len(operations)} outcomes for {len(sent)} requests"
    for request_id, status, outcome in operations:
        stored = json.loads(outcome)
        card = sent[request_id]
        assert (status, stored["outcome"], stored["card_ids"], stored["owner"]) == (
            "succeeded",
            "succeeded",
            [card],
            OWNER,
        ), stored
        assert cards.get(card) == request_id, f"{card} minted by {cards.get(card)}"
    return {"outcomes": len(operations), "effects": len(cards)}


def commit_times(ledger: Ledger, request_ids: list[str]) -> list[Any]:
    with ledger.engine.connect() as connection:
        query = select(Operation.recorded_at).where(Operation.request_id.in_(request_ids))
        return list(connection.execute(query).scalars())


def subscribe(urls: str, name: str) -> Queue:
    """A quorum queue (replicated, so it outlives any one node) bound to the outcome events."""
    queue = Queue(
        name,
        EVENTS_EXCHANGE,
        routing_key="mcard.single_mint.*",
        durable=True,
        auto_delete=False,
        queue_arguments={"x-queue-type": "quorum"},
    )
    with Connection(urls) as connection:
        EVENTS_EXCHANGE(connection.default_channel).declare()
        queue(connection.default_channel).declare()
    return queue


def drain_events(urls: str, queue: Queue, wanted: set[str]) -> dict[str, list[str]]:
    """Every event body by request ID, read through a surviving node; the queue is deleted."""
    bodies: dict[str, list[str]] = {}

    def take() -> bool:
        with Connection(urls) as connection:
            bound = queue(connection.default_channel)
            while (message := bound.get(no_ack=True)) is not None:
                body = (
                    message.body if isinstance(message.body, str) else bytes(message.body).decode()
                )
                bodies.setdefault(message.properties["message_id"], []).append(body)
        return wanted <= set(bodies)

    try:
        wait_for(take, 60, "every outcome's event on a surviving node", every=0.5)
    finally:
        with Connection(urls) as connection:
            queue(connection.default_channel).delete()
    return bodies


def other_leader(old: str) -> str | None:
    """The task queue's leader if it is no longer old (asked of the other nodes)."""
    leader = queue_leader(TASK_QUEUE, down=(old,))
    return leader if leader != old else None


def run_failover(
    fault: str,
    take_down: Callable[[str], None],
    postgresql_url: str,
    make_worker: Callable[..., Worker],
    folder: Path,
) -> dict[str, Any]:
    """Workers and a producer on the failover list, the task queue's leader taken down by
    take_down(node) mid-stream; every request must end exactly once. Returns the figures."""
    ledger = get_ledger(postgresql_url)
    # The leader's node first in the list: producer and workers connect there, so taking it
    # down fails over the queue, the consumers and the publisher at once. On a fresh cluster
    # the queue does not exist yet and its leader lands on the first URL's node.
    first = queue_leader(TASK_QUEUE) or node_name(1)
    urls = failover_url(first=first)
    workers = start_on_cluster(
        [
            make_worker(
                postgresql_url, f"cluster-{fault}", broker_url=urls, concurrency=CONCURRENCY
            )
            for _ in range(WORKERS)
        ]
    )
    leader = wait_for(lambda: queue_leader(TASK_QUEUE), 30, "the task queue's leader")

    run = f"{fault}-{uuid.uuid4().hex[:8]}"
    sent = {f"{run}-{i}": f"card-{run}-{i}" for i in range(REQUESTS)}
    ids = list(sent)
    subscriber = subscribe(urls, f"test-cluster-events-{run}")
    producer = ProducerRun.start(sent, urls, postgresql_url, folder, rate=RATE)
    try:
        wait_for(lambda: recorded(ledger, ids) >= FAULT_AFTER, 60, "the stream to start")
        done_at_fault = recorded(ledger, ids)
        fault_at = time.time()
        take_down(leader)
        new_leader = wait_for(
            lambda: other_leader(leader), 30, "a new leader of the task queue", every=0.2
        )
        report = producer.wait(RECOVERY_BUDGET)
    finally:
        producer.stop()
    assert report["confirmed"] == len(sent) and not report["unsent"], report
    wait_for(
        lambda: recorded(ledger, ids) == len(ids),
        RECOVERY_BUDGET,
        "every request's outcome",
        every=0.5,
    )
    all_done = time.time() - fault_at
    assert done_at_fault < len(ids), "the leader went down mid-stream"
    figures = exactly_once(ledger, sent)
    events = drain_events(urls, subscriber, set(ids))
    assert set(ids) <= set(events), f"{len(set(ids) - set(events))} outcomes missed their event"
    for request_id in ids:
        assert len(set(events[request_id])) == 1, f"copies of {request_id}'s event differ"
        assert json.loads(events[request_id][0]) == ledger.outcome(request_id)
    for worker in workers:
        assert worker.process is not None and worker.process.poll() is None, (
            f"{worker.node} kept going without a restart"
        )
    times = commit_times(ledger, ids)
    figures |= {
        "fault": fault,
        "leader": leader,
        "clients_first_on_leader": leader == first,
        "new_leader": new_leader,
        "requests_sent": report["confirmed"],
        "publish_failures_retried": report["publish_failures"],
        "slowest_publish_s": report["slowest_publish_s"],
        "task_runs": count_runs([w.log for w in workers], run),
        "events_received": sum(len(copies) for copies in events.values()),
        "outcomes_before_fault": done_at_fault,
        "recovery_s": round(recovery_seconds(times, fault_at), 2),
        "all_outcomes_after_fault_s": round(all_done, 2),
        "last_commit_after_fault_s": round(max(t.timestamp() for t in times) - fault_at, 2),
    }
    for worker in workers:
        assert worker.stop() == 0, f"{worker.node}: a warm shutdown exits 0"
    return figures


def rejoined(node: str, others: list[str]) -> bool:
    """node runs in the cluster again, as the other nodes see it, and is back in the queue."""
    return all(node in running_nodes(other) for other in others) and quorum_members(
        TASK_QUEUE, others[0]
    ).get(node) in ("follower", "leader")


def test_the_task_queue_leader_stopped_mid_stream_loses_and_doubles_nothing(
    cluster: list[str],
    postgresql_url: str,
    make_worker: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    stopped: list[str] = []

    def stop_app(node: str) -> None:
        ctl(node, "stop_app", timeout=60)
        stopped.append(node)

    try:
        figures = run_failover("stop", stop_app, postgresql_url, make_worker, tmp_path)
    finally:
        back_at = time.monotonic()
        for node in stopped:
            ctl(node, "start_app", timeout=90)
    node = stopped[0]
    others = [n for n in cluster if n != node]
    wait_for(lambda: rejoined(node, others), 60, f"{node} to rejoin", every=0.5)
    figures["rejoin_s"] = round(time.monotonic() - back_at, 2)
    print(f"\ncluster figures: {figures}")


def test_the_task_queue_leader_killed_mid_stream_loses_and_doubles_nothing(
    cluster: list[str],
    postgresql_url: str,
    make_worker: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    killed: list[str] = []

    def sigkill(node: str) -> None:
        kill_node(node)
        killed.append(node)

    try:
        figures = run_failover("kill", sigkill, postgresql_url, make_worker, tmp_path)
    finally:
        back_at = time.monotonic()
        if killed:
            # The script starts whichever node does not answer, with the very environment
            # of the first start (node name, ports, data folder, config), and skips the rest.
            restarted = cluster_script("start")
            assert restarted.returncode == 0, restarted.stderr[-3000:]
    node = killed[0]
    others = [n for n in cluster if n != node]
    wait_for(lambda: rejoined(node, others), 60, f"{node} to rejoin", every=0.5)
    figures["restart_and_rejoin_s"] = round(time.monotonic() - back_at, 2)
    print(f"\ncluster figures: {figures}")
