"""What Flower's pages show for a task: outcomes recorded by a real ledger, in the repr a
worker's task-succeeded event carries, formatted on Flower's own copies of Celery task states."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery.events.state import Task
from celery.utils.saferepr import saferepr

from mcard_tasks import flower_display
from mcard_tasks.config import Settings
from mcard_tasks.flower_display import (
    Outcome,
    ledger_lookup,
    outcome_in,
    task_formatter,
)
from mcard_tasks.ledger import Ledger, get_ledger
from mcard_tasks.specs import validate_payload
from tests.fixtures import ROOT

MINT, SINGLE_MINT = "mcard.mint", "mcard.single_mint"
#: Celery's default resultrepr_maxsize: how much of a return value task-succeeded carries.
REPR_MAXSIZE = 1024


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return get_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")


def outcome(ledger: Ledger, task: str, request_id: str, **fields: Any) -> dict[str, Any]:
    """R's outcome object as the task returns it (the recorded JSON, parsed)."""
    return dict(json.loads(ledger.apply(task, request_id, validate_payload(task, fields))))


def flower_task(request_id: str, returned: Any, name: str = SINGLE_MINT) -> Task:
    """Flower's state of a task that returned returned: received, started, succeeded."""
    task = Task(uuid=request_id)
    now = time.time()
    task.event("received", now, now, {"name": name, "kwargs": "{}"})
    task.event("started", now, now, {})
    result = saferepr(returned, REPR_MAXSIZE)  # as the worker's task-succeeded event has it
    task.event("succeeded", now, now, {"result": result, "runtime": 0.01})
    return task


def shown(format_task: Callable[[Any], Any], task: Task) -> str:
    """The state Flower's tasks page shows: format_task on a copy, as Flower calls it."""
    return str(format_task(copy.copy(task)).as_dict()["state"])


def test_a_rejection_shows_rejected_with_its_reason_and_a_success_stays_success(
    ledger: Ledger,
) -> None:
    minted = outcome(ledger, SINGLE_MINT, "r1", card_id="c-1", owner="alice")
    refused = outcome(ledger, SINGLE_MINT, "r2", card_id="c-1", owner="bob")
    format_task = task_formatter()
    success, rejection = flower_task("r1", minted), flower_task("r2", refused)

    assert shown(format_task, success) == "SUCCESS"
    assert shown(format_task, rejection) == "REJECTED: already_minted"
    assert rejection.state == "SUCCESS", "Flower's own state (and its API) keep Celery's state"
    assert rejection.result == saferepr(refused, REPR_MAXSIZE), "the result is not touched"
    assert outcome_in(str(rejection.result)) == Outcome("rejected", "already_minted")
    assert ledger.outcome("r2") == refused, "the recorded outcome object is unchanged"


def test_every_reason_code_is_shown(ledger: Ledger) -> None:
    outcome(ledger, SINGLE_MINT, "m", card_id="c", owner="alice")
    cases = {
        "not_holder": ("b1", {"card_id": "c", "owner": "bob"}),
        "unknown_card": ("b2", {"card_id": "nope", "owner": "bob"}),
    }
    for reason, (request_id, fields) in cases.items():
        refused = outcome(ledger, "mcard.single_burn", request_id, **fields)
        assert shown(task_formatter(), flower_task(request_id, refused)) == f"REJECTED: {reason}"
    outcome(ledger, "mcard.single_burn", "b3", card_id="c", owner="alice")
    again = outcome(ledger, "mcard.single_burn", "b4", card_id="c", owner="alice")
    assert shown(task_formatter(), flower_task("b4", again)) == "REJECTED: already_burned"


def test_a_result_cut_by_celery_is_read_from_the_ledger_once(ledger: Ledger) -> None:
    long_ids = [f"card-{i:03d}-" + "x" * 100 for i in range(20)]
    outcome(ledger, SINGLE_MINT, "first", card_id=long_ids[5], owner="alice")
    refused = outcome(ledger, MINT, "batch", owner="bob", card_ids=long_ids)
    minted = outcome(ledger, MINT, "other", owner="bob", card_ids=[i + "y" for i in long_ids])
    cut = flower_task("batch", refused, name=MINT)
    assert "'outcome'" not in str(cut.result), "Celery kept only the card_ids of this result"
    asked: list[str] = []

    def lookup(request_id: str) -> dict[str, Any] | None:
        asked.append(request_id)
        return ledger.outcome(request_id)

    format_task = task_formatter(lookup)
    assert shown(format_task, cut) == "REJECTED: already_minted"
    assert shown(format_task, cut) == "REJECTED: already_minted"
    assert shown(format_task, flower_task("other", minted, name=MINT)) == "SUCCESS"
    assert asked == ["batch", "other"], "one read per request ID: recorded outcomes are final"
    assert shown(task_formatter(), cut) == "SUCCESS", "without a ledger: Celery's state"


def test_an_unreachable_ledger_leaves_celerys_state_and_is_asked_again_after_a_pause(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_ids = [f"card-{i:03d}-" + "z" * 100 for i in range(20)]
    outcome(ledger, SINGLE_MINT, "first", card_id=long_ids[0], owner="alice")
    cut = flower_task("batch", outcome(ledger, MINT, "batch", owner="bob", card_ids=long_ids))
    unreachable = Settings(database_url="postgresql://nobody@127.0.0.1:1/none", migrate=False)
    assert shown(task_formatter(ledger_lookup(unreachable)), cut) == "SUCCESS"
    recovered = [RuntimeError("unused")]
    asked: list[str] = []

    def flaky(request_id: str) -> dict[str, Any] | None:
        asked.append(request_id)
        if recovered:
            recovered.pop()
            return ledger_lookup(unreachable)(request_id)
        return ledger.outcome(request_id)

    format_task = task_formatter(flaky)
    assert shown(format_task, cut) == "SUCCESS", "the ledger is down: not cached"
    assert shown(format_task, cut) == "SUCCESS" and asked == ["batch"], "no lookup for a while"
    monkeypatch.setattr(flower_display, "_PAUSE_AFTER_FAILURE", 0.0)
    assert shown(format_task, cut) == "REJECTED: already_minted", "back: read again"
    assert asked == ["batch", "batch"]


def test_other_states_are_kept() -> None:
    now = time.time()
    cases = [("received", "RECEIVED"), ("started", "STARTED"), ("failed", "FAILURE")]
    for event, state in [*cases, ("rejected", "REJECTED")]:
        task = Task(uuid=f"t-{event}")
        task.event(event, now, now, {"name": SINGLE_MINT})
        assert shown(task_formatter(), task) == state


def test_results_that_hold_no_outcome_keep_their_state() -> None:
    for result in ["42", "'text'", "{'outcome': 'rejected'", "None", "[1, 2]"]:
        task = Task(uuid="x")
        now = time.time()
        task.event("succeeded", now, now, {"result": result})
        assert shown(task_formatter(), task) == "SUCCESS", result


def test_celery_flower_gets_the_formatter_from_the_app() -> None:
    probe = (
        "import sys; sys.argv = ['celery', '-A', 'mcard_tasks', 'flower'];"
        " import mcard_tasks; from flower.options import default_options as o;"
        " print(o.format_task.__module__, o.format_task.__qualname__)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCARD_FLOWER", "FLOWER_"))}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "mcard_tasks.flower_display",
        "task_formatter.<locals>.format_task",
    ]
