"""The result backend's wait, without a broker: a ledger that is down, comes back, or is fine."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from mcard_tasks import app
from mcard_tasks.errors import LedgerUnavailableError, LedgerWaitTimeoutError
from mcard_tasks.results import LedgerBackend
from tests.fixtures import use_ledger


@pytest.fixture
def ledger_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Lets each test point this process's result reads at a ledger of its choice."""
    monkeypatch.setattr(app, "settings", app.settings)
    yield


def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (the kernel's pick, released at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_ledger_never_reachable_ends_the_wait_at_the_timeout_naming_the_ledger(
    ledger_url: None,
) -> None:
    use_ledger(f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere")
    started = time.monotonic()
    with pytest.raises(CeleryTimeoutError) as raised:
        AsyncResult("never-seen", app=app).get(timeout=1.0, interval=0.1)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0, f"gave up after {elapsed:.2f} s"
    assert isinstance(raised.value, LedgerWaitTimeoutError)
    assert isinstance(raised.value, LedgerUnavailableError)
    assert "the ledger database is unavailable" in str(raised.value)
    assert "never-seen" in str(raised.value)


def test_a_ledger_that_comes_back_within_the_timeout_gives_the_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcome = {"request_id": "r1", "outcome": "succeeded"}
    answers: list[Any] = [
        LedgerUnavailableError("the ledger database is unavailable: down"),
        LedgerUnavailableError("the ledger database is unavailable: still down"),
        {"task_id": "r1", "status": states.PENDING, "result": None},
        {"task_id": "r1", "status": states.SUCCESS, "result": outcome},
    ]

    def read(self: LedgerBackend, task_id: str) -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    monkeypatch.setattr(LedgerBackend, "_get_task_meta_for", read)
    assert AsyncResult("r1", app=app).get(timeout=10, interval=0.01) == outcome
    assert not answers


def test_a_healthy_ledger_without_the_outcome_times_out_as_celery_does(
    ledger_url: None, tmp_path: Path
) -> None:
    use_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    started = time.monotonic()
    with pytest.raises(CeleryTimeoutError) as raised:
        AsyncResult("not-yet", app=app).get(timeout=0.5, interval=0.1)
    assert time.monotonic() - started < 1.5
    assert not isinstance(raised.value, LedgerUnavailableError)


def test_state_reads_still_report_an_unreachable_ledger(ledger_url: None) -> None:
    """Only waiting rides out an outage: a one-off read says the ledger is unavailable."""
    use_ledger(f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere")
    with pytest.raises(LedgerUnavailableError):
        _ = AsyncResult("never-seen", app=app).state
