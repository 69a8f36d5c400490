"""The compose stack's file and the very commands its containers run, run here directly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mcard_tasks import app
from tests.fixtures import ROOT, SESSION, Worker, wait_for

pytestmark = pytest.mark.integration
ENTRYPOINT = ROOT / "worker" / "docker-entrypoint.sh"


def entrypoint_env(database_url: str, name: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return dict(
        os.environ,
        PATH=f"{venv_bin}:{os.environ['PATH']}",
        MCARD_DATABASE_URL=database_url,
        MCARD_WORKER_NAME=name,
    )


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
@pytest.mark.parametrize("profile", [[], ["--profile", "cluster"]])
def test_the_compose_file_validates(profile: list[str]) -> None:
    done = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", *profile, "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_the_image_entrypoint_execs_the_worker_and_its_health_check_passes(
    sqlite_url: str, make_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    name = f"entrypoint-{SESSION}@localhost"
    env = entrypoint_env(sqlite_url, name)
    with (tmp_path / "worker.log").open("wb") as log:
        process = subprocess.Popen(
            ["sh", str(ENTRYPOINT), "worker"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: process.poll() is not None or app.control.ping(destination=[name], timeout=0.5),
            60,
            "the entrypoint's worker to answer",
        )
        assert process.poll() is None
        health = subprocess.run(
            ["sh", str(ENTRYPOINT), "mcard-tasks", "health"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 0, health.stdout + health.stderr
        process.send_signal(signal.SIGTERM)  # exec'd: the signal reaches the worker itself
        assert process.wait(30) == 0, "SIGTERM is a warm shutdown, exit 0"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
