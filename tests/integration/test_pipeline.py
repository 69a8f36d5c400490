"""The pipeline end to end: real RabbitMQ, a real worker process, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.result import AsyncResult
from celery.signals import before_task_publish

from mcard_tasks import app
from mcard_tasks.errors import ConflictError, InvalidRequestError
from mcard_tasks.ledger import get_ledger
from mcard_tasks.payloads import canonical_json
from mcard_tasks.tasks import mint, single_burn, single_mint
from tests.fixtures import Worker

pytestmark = pytest.mark.integration
TIMEOUT = 20


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def outcome_of(result: AsyncResult) -> dict[str, Any]:
    return dict(result.get(timeout=TIMEOUT, interval=0.05))


@pytest.fixture
def published() -> Iterator[list[str]]:
    """The task ids this process publishes during a test."""
    sent: list[str] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        sent.append((headers or {}).get("id", "?"))

    before_task_publish.connect(record, weak=False)
    yield sent
    before_task_publish.disconnect(record)


def test_single_mint_succeeds_and_the_ledger_holds_the_card(stack: Worker) -> None:
    card, request_id = new_id("card"), new_id("req")
    outcome = outcome_of(single_mint.delay(card_id=card, owner="alice", request_id=request_id))
    assert outcome["outcome"] == "succeeded"
    assert outcome["reason"] is None
    assert outcome["request_id"] == request_id
    assert outcome["card_ids"] == [card] and outcome["owner"] == "alice"
    stored = get_ledger(app.settings.database_url).card(card)
    assert stored is not None and stored.owner == "alice" and stored.status == "active"


def test_delay_and_apply_async_with_task_id_are_the_same_request(stack: Worker) -> None:
    card, request_id = new_id("card"), new_id("req")
    first = outcome_of(single_mint.delay(card_id=card, owner="bob", request_id=request_id))
    again = single_mint.apply_async(kwargs={"card_id": card, "owner": "bob"}, task_id=request_id)
    assert again.id == request_id
    assert canonical_json(outcome_of(again)) == canonical_json(first)


def test_a_replay_returns_the_stored_outcome_byte_for_byte_and_has_no_second_effect(
    stack: Worker,
) -> None:
    card, request_id = new_id("card"), new_id("req")
    first = outcome_of(single_mint.delay(card_id=card, owner="alice", request_id=request_id))
    ledger = get_ledger(app.settings.database_url)
    stored_before = ledger.outcome(request_id)
    # A duplicate message straight to the broker (as a redelivery would be), bypassing the
    # producer's check: the worker must answer from the ledger.
    app.send_task(
        "mcard.single_mint", kwargs={"card_id": card, "owner": "alice"}, task_id=request_id
    )
    replay = outcome_of(single_mint.delay(card_id=card, owner="alice", request_id=request_id))
    assert canonical_json(replay) == canonical_json(first) == canonical_json(stored_before)
    assert ledger.outcome(request_id) == stored_before


def test_a_conflicting_reuse_of_a_request_id_is_refused_before_publishing(
    stack: Worker, published: list[str]
) -> None:
    request_id = new_id("req")
    first = outcome_of(
        single_mint.delay(card_id=new_id("card"), owner="alice", request_id=request_id)
    )
    sent_before = len(published)
    with pytest.raises(ConflictError, match="conflict"):
        single_mint.delay(card_id=new_id("card"), owner="alice", request_id=request_id)
    assert len(published) == sent_before
    assert AsyncResult(request_id, app=app).get(timeout=TIMEOUT) == first


def test_a_conflicting_message_that_reaches_the_worker_never_replaces_the_first_outcome(
    stack: Worker,
) -> None:
    request_id, other_card = new_id("req"), new_id("card")
    first = outcome_of(
        single_mint.delay(card_id=new_id("card"), owner="alice", request_id=request_id)
    )
    app.send_task(
        "mcard.single_mint", kwargs={"card_id": other_card, "owner": "eve"}, task_id=request_id
    )
    # A later request proves the worker has consumed the conflicting message first... on the
    # same queue, with one consumer of prefetch 1 it is taken in order.
    outcome_of(single_mint.delay(card_id=new_id("card"), owner="alice"))
    ledger = get_ledger(app.settings.database_url)
    assert ledger.outcome(request_id) == first
    assert ledger.card(other_card) is None
    assert AsyncResult(request_id, app=app).get(timeout=TIMEOUT) == first


def test_a_batch_mint_is_all_or_nothing(stack: Worker) -> None:
    taken, fresh = new_id("card"), new_id("card")
    outcome_of(single_mint.delay(card_id=taken, owner="alice"))
    outcome = outcome_of(mint.delay(owner="bob", card_ids=[fresh, taken]))
    assert outcome["outcome"] == "rejected" and outcome["reason"] == "already_minted"
    assert get_ledger(app.settings.database_url).card(fresh) is None
    whole = outcome_of(mint.delay(owner="bob", card_ids=[fresh, new_id("card")]))
    assert whole["outcome"] == "succeeded" and len(whole["card_ids"]) == 2


def test_minting_an_existing_card_is_rejected_already_minted(stack: Worker) -> None:
    card = new_id("card")
    outcome_of(single_mint.delay(card_id=card, owner="alice"))
    outcome = outcome_of(single_mint.delay(card_id=card, owner="bob"))
    assert (outcome["outcome"], outcome["reason"]) == ("rejected", "already_minted")
    stored = get_ledger(app.settings.database_url).card(card)
    assert stored is not None and stored.owner == "alice"


def test_burn_rules_holder_only_once_and_known_cards_only(stack: Worker) -> None:
    card = new_id("card")
    outcome_of(single_mint.delay(card_id=card, owner="alice"))
    not_holder = outcome_of(single_burn.delay(card_id=card, owner="mallory"))
    assert (not_holder["outcome"], not_holder["reason"]) == ("rejected", "not_holder")
    burned = outcome_of(single_burn.delay(card_id=card, owner="alice"))
    assert (burned["outcome"], burned["reason"]) == ("succeeded", None)
    again = outcome_of(single_burn.delay(card_id=card, owner="alice"))
    assert (again["outcome"], again["reason"]) == ("rejected", "already_burned")
    unknown = outcome_of(single_burn.delay(card_id=new_id("card"), owner="alice"))
    assert (unknown["outcome"], unknown["reason"]) == ("rejected", "unknown_card")
    stored = get_ledger(app.settings.database_url).card(card)
    assert stored is not None and stored.status == "burned"


def test_without_a_request_id_one_is_generated_and_returned(stack: Worker) -> None:
    result = single_mint.delay(card_id=new_id("card"), owner="alice")
    assert str(uuid.UUID(result.id)) == result.id  # a canonical UUID, not any string
    again = single_mint.delay(card_id=new_id("card"), owner="alice")
    assert again.id != result.id
    assert outcome_of(result)["request_id"] == result.id


def test_async_result_reads_the_outcome_from_another_process(stack: Worker) -> None:
    request_id = new_id("req")
    first = outcome_of(
        single_mint.delay(card_id=new_id("card"), owner="alice", request_id=request_id)
    )
    code = (
        "import json, sys; from celery.result import AsyncResult; from mcard_tasks import app;"
        f"print(json.dumps(AsyncResult({request_id!r}, app=app).get(timeout=10)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, MCARD_DATABASE_URL=app.settings.database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(out) == first


def test_many_threads_publishing_one_request_id_make_one_effect_and_one_answer(
    stack: Worker,
) -> None:
    card, request_id = new_id("card"), new_id("req")
    answers: list[str] = []
    errors: list[BaseException] = []

    def send() -> None:
        try:
            result = single_mint.delay(card_id=card, owner="alice", request_id=request_id)
            answers.append(canonical_json(outcome_of(result)))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    assert not errors
    assert len(answers) == 16 and len(set(answers)) == 1
    assert json.loads(answers[0])["outcome"] == "succeeded"


@pytest.mark.parametrize(
    ("task", "fields", "problem"),
    [
        (single_mint, {"card_id": "has space", "owner": "alice"}, "card_id: must be 1 to 128"),
        (single_mint, {"owner": "alice"}, "card_id: is required"),
        (single_mint, {"card_id": "c", "owner": "a", "metadata": [1]}, "metadata"),
        (mint, {"owner": "alice", "card_ids": ["a", "a"]}, "distinct"),
        (mint, {"owner": "alice", "card_ids": []}, "card_ids: must hold 1 to 1000"),
        (single_burn, {"card_id": "c", "owner": "x" * 129}, "owner: must be 1 to 128"),
        (single_burn, {"card_id": "c", "owner": "a", "request_id": "r 1"}, "request_id"),
    ],
)
def test_invalid_calls_raise_a_clear_error_and_publish_nothing(
    stack: Worker, published: list[str], task: Any, fields: dict[str, Any], problem: str
) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        task.delay(**fields)
    assert published == []
