"""The first calls of a fresh process, all at once: what a threaded web server does first.

Each try is a new interpreter that imports the tasks and releases many threads together on a
barrier, each calling ``single_mint.delay`` with its own request ID. Every call must return and
every message must be on the queue. No worker runs: the messages are taken off the session
vhost's queue by the test itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from mcard_tasks import app
from mcard_tasks.topology import build_topology
from tests.fixtures import ROOT, wait_for

pytestmark = pytest.mark.integration
QUEUE = "mcard.single_mint"
THREADS = 32
TRIES = 5
TIMEOUT = 60

#: One try, in a fresh interpreter: nothing touches the tasks before the barrier opens.
CHILD = """
import json, sys, threading, uuid

from mcard_tasks.tasks import single_mint

threads = int(sys.argv[1])
barrier = threading.Barrier(threads)
requested, published, errors = [], [], []

def call():
    request_id = f"first-{uuid.uuid4().hex}"
    requested.append(request_id)
    try:
        barrier.wait(30)
        result = single_mint.delay(
            card_id=f"card-{uuid.uuid4().hex}", owner="alice", request_id=request_id
        )
        published.append(result.id)
    except BaseException as exc:
        errors.append(repr(exc))

workers = [threading.Thread(target=call) for _ in range(threads)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join(60)
alive = sum(worker.is_alive() for worker in workers)
print(json.dumps({"requested": requested, "published": published, "errors": errors,
                  "alive": alive}))
"""


@pytest.fixture
def queue(vhost: str) -> Iterator[Any]:
    """The session vhost's mcard.single_mint queue, declared, empty before and after the test."""
    topology = build_topology(app.settings)
    with app.connection_for_write() as connection:
        topology.declare(connection.default_channel)
        bound = topology.queue(QUEUE)(connection.default_channel)
        bound.purge()
        yield bound
        bound.purge()


def take_ids(queue: Any, expected: int) -> set[str]:
    """The task IDs of the messages on queue, taken off it, once there are expected of them."""
    taken: set[str] = set()

    def all_taken() -> bool:
        while (message := queue.get(no_ack=True)) is not None:
            taken.add(str(message.headers["id"]))
        return len(taken) >= expected

    wait_for(all_taken, TIMEOUT, f"{expected} messages on {QUEUE}")
    return taken


def first_burst(database_url: str) -> dict[str, Any]:
    """Run one try in a fresh interpreter; its report."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(THREADS)],
        cwd=ROOT,
        env=dict(os.environ, MCARD_DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.timeout(TRIES * 150)
def test_a_burst_of_first_calls_in_fresh_processes_publishes_every_one(
    queue: Any, sqlite_url: str
) -> None:
    for attempt in range(1, TRIES + 1):
        report = first_burst(sqlite_url)
        assert report["alive"] == 0, f"try {attempt}: {report['alive']} threads never returned"
        assert report["errors"] == [], (
            f"try {attempt}: {len(report['errors'])} of {THREADS} calls raised",
            report["errors"][:3],
        )
        requested = set(report["requested"])
        assert len(requested) == THREADS
        assert set(report["published"]) == requested, f"try {attempt}"
        assert take_ids(queue, THREADS) == requested, f"try {attempt}: on the queue"
