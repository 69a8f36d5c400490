"""Flower as a subprocess against a real worker: tasks by request ID, basic auth, read-only."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mcard_tasks.tasks import single_mint
from tests.fixtures import ROOT, Worker, use_ledger, wait_for

pytestmark = pytest.mark.integration
USER, PASSWORD = "ops", "s3cret-pass-long-enough"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Flower:
    def __init__(self, port: int, log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        env = dict(os.environ, MCARD_FLOWER_USER=USER, MCARD_FLOWER_PASSWORD=PASSWORD)
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "mcard_tasks",
                    "flower",
                    f"--port={port}",
                    "--address=127.0.0.1",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def request(
        self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD), method: str = "GET"
    ) -> tuple[int, Any]:
        req = urllib.request.Request(self.base + path, method=method)
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as response:
                body = response.read()
                return response.status, json.loads(body) if body.startswith(b"{") else body
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (urllib.error.URLError, ConnectionError):
            return 0, None

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[Flower]:
    running = Flower(free_port(), tmp_path / "flower.log")
    yield running
    running.stop()


def test_flower_lists_tasks_by_request_id_behind_basic_auth_and_read_only(
    sqlite_url: str, make_worker: Callable[..., Worker], flower: Flower
) -> None:
    worker = make_worker(sqlite_url, "flowered").start()
    use_ledger(sqlite_url)

    def sees_worker() -> bool:
        # refresh=1: ask the workers now, not Flower's cache from before this worker started
        status, workers = flower.request("/api/workers?refresh=1")
        return status == 200 and worker.node in workers

    wait_for(
        sees_worker,
        60,
        "Flower to see the worker",
        every=0.5,
    )
    request_id, card = f"fl-{uuid.uuid4().hex}", f"card-{uuid.uuid4().hex}"
    single_mint.delay(card_id=card, owner="alice", request_id=request_id).get(timeout=30)

    def info() -> Any:
        status, body = flower.request(f"/api/task/info/{request_id}")
        # The producer's task-sent event travels on a connection of its own: it may come later.
        done = status == 200 and body.get("state") == "SUCCESS" and body.get("sent")
        return body if done else None

    task = wait_for(info, 30, "Flower to show the task as sent and SUCCESS", every=0.3)
    assert task["name"] == "mcard.single_mint" and task["uuid"] == request_id
    assert card in task["kwargs"] and "succeeded" in task["result"]
    status, listed = flower.request("/api/tasks?taskname=mcard.single_mint")
    assert status == 200 and request_id in listed

    assert flower.request("/api/tasks", auth=None)[0] == 401
    assert flower.request("/api/tasks", auth=(USER, "wrong"))[0] == 401
    assert flower.request("/", auth=None)[0] == 401
    revoke = flower.request(f"/api/task/revoke/{request_id}", method="POST")
    assert revoke[0] == 403, "read-only: no revoke of a mint from the UI"
