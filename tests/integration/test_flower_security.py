"""Flower as operators run it (`celery -A mcard_tasks flower`, the image's entrypoint): the
control API refused, the worker kept, no secret in any process list, no open Flower."""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mcard_tasks import app
from tests.conftest import BROKER_BASE, SESSION, VHOST
from tests.fixtures import ROOT, Worker, rabbitmqctl, wait_for

pytestmark = pytest.mark.integration
USER = "ops"
ENTRYPOINT = ROOT / "worker" / "docker-entrypoint.sh"
FLOWER = (sys.executable, "-m", "celery", "-A", "mcard_tasks", "flower", "--address=127.0.0.1")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def broker_user(vhost: str) -> Iterator[tuple[str, str]]:
    """A broker user of the session vhost with a random password, removed at the end."""
    name, password = f"flower-sec-{SESSION}", secrets.token_hex(16)
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
        yield name, password
    finally:
        rabbitmqctl("delete_user", name)


@pytest.fixture(scope="module")
def broker_url(broker_user: tuple[str, str]) -> str:
    name, password = broker_user
    base = BROKER_BASE.split("://", 1)[1].rsplit("@", 1)[-1]
    return f"amqp://{name}:{password}@{base}/{VHOST}"


class Flower:
    """`celery -A mcard_tasks flower` on 127.0.0.1, everything secret in its environment."""

    def __init__(self, log: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*FLOWER, f"--port={self.port}"],
                cwd=ROOT,
                env=dict(os.environ, **env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def post(self, path: str, auth: tuple[str, str] | None, **headers: str) -> int:
        """The status of a POST to path; 0 while nothing listens."""
        return self.answer(path, auth, **headers)[0]

    def answer(self, path: str, auth: tuple[str, str] | None, **headers: str) -> tuple[int, str]:
        """The status and body of a POST to path; (0, "") while nothing listens."""
        request = urllib.request.Request(self.base + path, data=b"", method="POST")
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        for name, value in headers.items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return 0, ""

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.fixture
def guarded(
    tmp_path: Path,
    sqlite_url: str,
    broker_url: str,
    make_worker: Callable[..., Worker],
) -> Iterator[tuple[Flower, Worker, str]]:
    """A worker and a Flower behind basic auth, both on the broker user with a password."""
    worker = make_worker(sqlite_url, "flower-sec", broker_url=broker_url).start()
    password = secrets.token_hex(12)
    flower = Flower(
        tmp_path / "flower.log",
        MCARD_BROKER_URL=broker_url,
        MCARD_FLOWER_USER=USER,
        MCARD_FLOWER_PASSWORD=password,
    )
    try:
        wait_for(
            lambda: flower.process.poll() is not None or flower.post("/api/x", None) != 0,
            60,
            "Flower to listen",
            every=0.2,
        )
        assert flower.process.poll() is None, flower.log.read_text()[-3000:]
        yield flower, worker, password
    finally:
        flower.stop()


def test_the_control_api_is_refused_and_the_worker_stays_up(
    guarded: tuple[Flower, Worker, str],
) -> None:
    flower, worker, password = guarded
    shutdown, revoke = f"/api/worker/shutdown/{worker.node}", f"/api/task/revoke/{uuid.uuid4()}"
    for path in (shutdown, revoke):
        assert flower.post(path, None) == 401, f"{path}: no credentials"
        assert flower.post(path, (USER, "wrong-" + password)) == 401, f"{path}: wrong password"
        assert flower.post(path, ("", password)) == 401, f"{path}: the password alone"
        # Read-only, which the launcher sets (FLOWER_READ_ONLY=true): refused with credentials
        assert flower.answer(path, (USER, password)) == (403, "Read only mode is enabled")
        # Flower >= 2.2 refuses a cross-site POST riding on a browser's stored credentials
        assert flower.answer(path, (USER, password), Origin="http://evil.example") == (
            403,
            "Cross-origin request forbidden",
        )
    assert app.control.ping(destination=[worker.node], timeout=2), "the worker is still up"
    assert worker.process is not None and worker.process.poll() is None
    log = flower.log.read_text()
    assert f"Flower serves on 127.0.0.1:{flower.port} with basic auth, read-only" in log


def test_no_password_is_in_the_command_line_of_flower_or_the_worker(
    guarded: tuple[Flower, Worker, str], broker_user: tuple[str, str]
) -> None:
    flower, worker, flower_password = guarded
    _, broker_password = broker_user
    for pid in (flower.process.pid, worker.pid, *worker.children()):
        seen = cmdline(pid)
        assert broker_password not in seen and flower_password not in seen, seen
        assert "amqp://" not in seen, seen
    log = flower.log.read_text()
    assert broker_password not in log and flower_password not in log


def test_the_image_entrypoint_refuses_flower_on_every_interface_without_credentials(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCARD_FLOWER", "FLOWER_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    done = subprocess.run(
        ["sh", str(ENTRYPOINT), "flower", f"--port={port}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"refusing to serve Flower without authentication on 0.0.0.0:{port}" in done.stderr
    assert "MCARD_FLOWER_USER and MCARD_FLOWER_PASSWORD" in done.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "nothing was left listening"


@pytest.mark.parametrize("password", ["tiny-pw9", "comma,in-a-long-password"])
def test_flower_refuses_to_start_with_unusable_credentials(tmp_path: Path, password: str) -> None:
    done = subprocess.run(
        [*FLOWER, f"--port={free_port()}"],
        cwd=ROOT,
        env=dict(os.environ, MCARD_FLOWER_USER=USER, MCARD_FLOWER_PASSWORD=password),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "unusable Flower credentials" in done.stderr, done.stderr
    assert password not in done.stderr


def lib_sh(script: str, broker_url: str) -> subprocess.CompletedProcess[str]:
    """Run script after sourcing scripts/lib.sh, with this virtualenv and broker_url."""
    env = dict(
        os.environ, MCARD_VENV=str(Path(sys.executable).parent.parent), MCARD_BROKER_URL=broker_url
    )
    return subprocess.run(
        ["bash", "-c", f"source scripts/lib.sh && {script}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_scripts_print_broker_urls_masked_and_check_the_broker_from_the_environment(
    broker_url: str, broker_user: tuple[str, str]
) -> None:
    name, password = broker_user
    shown = lib_sh("mask_urls", f"{broker_url};{broker_url}")
    assert shown.returncode == 0 and password not in shown.stdout, shown.stdout
    assert shown.stdout.count(":****@") == 2
    assert lib_sh("broker_answers", broker_url).returncode == 0
    refused = lib_sh("broker_answers", f"amqp://{name}:{password}@127.0.0.1:1/{VHOST}")
    assert refused.returncode == 1 and password not in refused.stderr + refused.stdout
