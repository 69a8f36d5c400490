"""Waiting on a result across a ledger restart: a real worker, RabbitMQ and a private
PostgreSQL that these tests stop and start (the shared PostgreSQL is never touched).

An application blocked in ``AsyncResult(R).get(timeout=...)`` rides out a short outage of
the ledger and gets R's outcome; a pooled connection left stale by a restart does not fail
the next read; an outage longer than the timeout ends the wait at the timeout, with an error
naming the ledger.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from mcard_tasks import app
from mcard_tasks.errors import LedgerUnavailableError
from mcard_tasks.ledger import get_ledger
from mcard_tasks.tasks import single_mint
from tests.fixtures import Worker, use_ledger, wait_for
from tests.private_postgres import PrivatePostgres, private_postgres_server

pytestmark = pytest.mark.integration
#: How long the ledger is down in the outage tests, well inside the waits' timeout.
OUTAGE = 2.0
TIMEOUT = 60


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePostgres]:
    with private_postgres_server() as pg:
        yield pg


@pytest.fixture(scope="module")
def worker(server: PrivatePostgres, worker_factory: Callable[..., Worker]) -> Iterator[Worker]:
    """The only worker on the session vhost while this module runs; its ledger (and this
    process's result reads) on the private PostgreSQL. Retries enough to outlast an outage."""
    previous = app.settings
    worker = worker_factory(server.url, "resultwait", max_retries="20").start()
    use_ledger(server.url)
    yield worker
    assert worker.stop() == 0, "a warm shutdown (SIGTERM) exits 0"
    app.settings = previous


@pytest.fixture
def ledger_up(server: PrivatePostgres, worker: Worker) -> Iterator[PrivatePostgres]:
    """Each test starts, and leaves, with the private PostgreSQL running."""
    if not server.running():
        server.start()
    yield server
    if not server.running():
        server.start()


def mint_and_wait() -> tuple[str, dict[str, Any]]:
    """A request completed end to end: this process and the worker now hold pooled
    connections to the ledger."""
    request_id = new_id("warm")
    result = single_mint.delay(card_id=new_id("card"), owner="alice", request_id=request_id)
    return request_id, dict(result.get(timeout=TIMEOUT, interval=0.05))


def in_background(step: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            step()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_get_blocked_across_a_restart_returns_the_outcome(ledger_up: PrivatePostgres) -> None:
    """get() is already waiting (on a healthy ledger) when PostgreSQL stops; R is published
    during the outage and completed by the worker after the restart."""
    mint_and_wait()
    request_id, card = new_id("req"), new_id("card")

    def outage() -> None:
        time.sleep(0.5)  # get() below is polling by now, on pooled connections
        ledger_up.stop()
        # The producer cannot check the ledger and publishes unchecked (the worker checks).
        single_mint.delay(card_id=card, owner="alice", request_id=request_id)
        time.sleep(OUTAGE)
        ledger_up.start()

    thread, errors = in_background(outage)
    started = time.monotonic()
    try:
        outcome = AsyncResult(request_id, app=app).get(timeout=TIMEOUT, interval=0.1)
    finally:
        thread.join(TIMEOUT)
    assert not errors, errors
    assert outcome["request_id"] == request_id and outcome["outcome"] == "succeeded"
    assert outcome["card_ids"] == [card]
    assert time.monotonic() - started >= OUTAGE, "the wait spanned the outage"


def test_get_started_during_an_outage_returns_the_outcome(ledger_up: PrivatePostgres) -> None:
    """Stop the ledger, publish R, wait on R: the first polls fail, the restart ends them."""
    mint_and_wait()
    ledger_up.stop()
    request_id, card = new_id("req"), new_id("card")
    result = single_mint.delay(card_id=card, owner="bob", request_id=request_id)

    def restart_later() -> None:
        time.sleep(OUTAGE)
        ledger_up.start()

    thread, errors = in_background(restart_later)
    try:
        outcome = result.get(timeout=TIMEOUT, interval=0.1)
    finally:
        thread.join(TIMEOUT)
    assert not errors, errors
    assert outcome["request_id"] == request_id and outcome["outcome"] == "succeeded"
    assert outcome["owner"] == "bob"


def test_the_first_reads_after_a_restart_do_not_fail_on_stale_pooled_connections(
    ledger_up: PrivatePostgres,
) -> None:
    """No outage left, but every pooled connection was closed by the restart: the very next
    read (an outcome, a task state, a get() that polls once) must still succeed."""
    request_id, outcome = mint_and_wait()
    # Completed, but never read through the result backend (whose cache would answer).
    unread = new_id("req")
    single_mint.delay(card_id=new_id("card"), owner="carol", request_id=unread)
    ledger = get_ledger(ledger_up.url)
    wait_for(lambda: ledger.outcome(unread), TIMEOUT, f"the outcome of {unread}")

    ledger_up.restart()
    assert ledger.outcome(request_id) == outcome
    ledger_up.restart()
    assert ledger.task_state(request_id) is None
    ledger_up.restart()
    polled_once = AsyncResult(unread, app=app).get(timeout=0)
    assert polled_once["request_id"] == unread and polled_once["outcome"] == "succeeded"


def test_an_outage_longer_than_the_timeout_raises_at_the_timeout_naming_the_ledger(
    ledger_up: PrivatePostgres,
) -> None:
    mint_and_wait()
    ledger_up.stop()
    timeout = 2.0
    started = time.monotonic()
    with pytest.raises(LedgerUnavailableError) as raised:
        AsyncResult(new_id("req"), app=app).get(timeout=timeout, interval=0.1)
    elapsed = time.monotonic() - started
    assert timeout <= elapsed < timeout + 4, f"gave up after {elapsed:.2f} s"  # a busy CI
    # A timeout, as get(timeout=) promises, and one that says why.
    assert isinstance(raised.value, CeleryTimeoutError)
    assert "ledger" in str(raised.value)
    assert isinstance(raised.value.__cause__, LedgerUnavailableError)
