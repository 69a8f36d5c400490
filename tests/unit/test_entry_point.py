"""The worker's entry point lives in mcard_tasks: no top-level ``worker`` package is installed."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mcard_tasks.cli import main
from mcard_tasks.worker import worker_argv

ROOT = Path(__file__).resolve().parents[2]


def installed() -> importlib.metadata.Distribution:
    """The installed mcard-tasks, not the checkout's own mcard_tasks.egg-info (pytest puts the
    checkout on sys.path, and an old egg-info's SOURCES.txt keeps files no longer installed)."""
    path = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    found = list(importlib.metadata.distributions(name="mcard-tasks", path=path))
    assert len(found) == 1, found
    return found[0]


def test_the_distribution_installs_no_top_level_worker_package() -> None:
    dist = installed()
    assert (dist.read_text("top_level.txt") or "").split() == ["mcard_tasks"]
    assert not [f for f in dist.files or [] if f.parts[0] == "worker"]
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"mcard-tasks": "mcard_tasks.cli:main"}


def test_importing_the_app_the_cli_and_the_worker_needs_no_worker_package(
    tmp_path: Path,
) -> None:
    # Outside the checkout (its folder worker/ is not on the path) and in a fresh interpreter.
    code = (
        "import sys, importlib.util\n"
        "import mcard_tasks, mcard_tasks.cli, mcard_tasks.worker\n"
        "assert 'worker' not in sys.modules, sys.modules['worker']\n"
        "spec = importlib.util.find_spec('worker')\n"
        "print(spec.origin if spec else 'none')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    origin = done.stdout.strip()
    assert origin == "none" or not origin.startswith(str(ROOT)), origin


def test_mcard_tasks_worker_hands_its_extra_arguments_to_celery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery.bin.celery import celery

    seen: list[Any] = []
    monkeypatch.setattr(celery, "main", lambda args, prog_name: seen.append(args))
    extra = ["--loglevel=DEBUG", "-O", "fair", "--without-mingle"]
    result = CliRunner().invoke(main, ["worker", *extra])
    assert result.exit_code == 0, result.output
    # `celery -A mcard_tasks worker ...` itself (it keeps the worker's exit code).
    assert seen == [["-A", "mcard_tasks", *worker_argv(extra)]]
    # The MCARD_* defaults come first, so an option given again wins in Celery's parser.
    assert seen[0][2] == "worker" and seen[0][-len(extra) :] == extra


@pytest.mark.parametrize(
    "command",
    [["-m", "mcard_tasks.worker"], ["-m", "worker"]],
    ids=["python -m mcard_tasks.worker", "python -m worker (checkout)"],
)
def test_the_module_entry_points_are_celery_s_worker(command: list[str]) -> None:
    # --help: Celery's worker parses the arguments and exits 0 before it connects anywhere.
    done = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--concurrency" in done.stdout and "--queues" in done.stdout
