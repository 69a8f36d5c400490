"""Ledger rules, replay and conflict on a real SQLite file and on PostgreSQL, without a broker."""

from __future__ import annotations

import json
import threading

import pytest

from mcard_tasks.errors import ConflictError
from mcard_tasks.ledger import Ledger
from mcard_tasks.specs import validate_payload

MINT, SINGLE_MINT, BURN = "mcard.mint", "mcard.single_mint", "mcard.single_burn"


@pytest.fixture
def ledger(fresh_ledger: Ledger) -> Ledger:
    """Each rule test runs on SQLite and on PostgreSQL."""
    return fresh_ledger


def apply(ledger: Ledger, task: str, request_id: str, **fields: object) -> dict[str, object]:
    return dict(json.loads(ledger.apply(task, request_id, validate_payload(task, fields))))


def test_a_card_is_minted_once(ledger: Ledger) -> None:
    first = apply(ledger, SINGLE_MINT, "r1", card_id="c", owner="alice", metadata={"x": 1})
    assert (first["outcome"], first["reason"]) == ("succeeded", None)
    second = apply(ledger, SINGLE_MINT, "r2", card_id="c", owner="bob")
    assert (second["outcome"], second["reason"]) == ("rejected", "already_minted")
    card = ledger.card("c")
    assert card is not None and card.owner == "alice" and card.card_metadata == {"x": 1}


def test_a_batch_is_all_or_nothing(ledger: Ledger) -> None:
    apply(ledger, SINGLE_MINT, "r1", card_id="b", owner="alice")
    rejected = apply(ledger, MINT, "r2", owner="bob", card_ids=["a", "b", "c"])
    assert (rejected["outcome"], rejected["reason"]) == ("rejected", "already_minted")
    assert "b" in str(rejected["detail"])
    assert ledger.card("a") is None and ledger.card("c") is None
    assert apply(ledger, MINT, "r3", owner="bob", card_ids=["a", "c"])["outcome"] == "succeeded"


def test_only_the_holder_burns_once_and_only_known_cards(ledger: Ledger) -> None:
    apply(ledger, SINGLE_MINT, "m", card_id="c", owner="alice")
    assert apply(ledger, BURN, "b1", card_id="c", owner="bob")["reason"] == "not_holder"
    assert apply(ledger, BURN, "b2", card_id="c", owner="alice")["outcome"] == "succeeded"
    assert apply(ledger, BURN, "b3", card_id="c", owner="alice")["reason"] == "already_burned"
    assert apply(ledger, BURN, "b4", card_id="nope", owner="alice")["reason"] == "unknown_card"
    card = ledger.card("c")
    assert card is not None and card.status == "burned" and card.burned_by == "b2"


def test_a_replay_returns_the_identical_stored_bytes(ledger: Ledger) -> None:
    payload = validate_payload(SINGLE_MINT, {"card_id": "c", "owner": "alice"})
    first = ledger.apply(SINGLE_MINT, "r1", payload)
    assert ledger.apply(SINGLE_MINT, "r1", payload) == first
    assert ledger.check(SINGLE_MINT, "r1", payload) == first
    assert ledger.check(SINGLE_MINT, "new", payload) is None


def test_a_rejection_is_replayed_as_recorded_even_when_the_world_changed(ledger: Ledger) -> None:
    burn = apply(ledger, BURN, "b1", card_id="c", owner="alice")
    apply(ledger, SINGLE_MINT, "m1", card_id="c", owner="alice")
    assert apply(ledger, BURN, "b1", card_id="c", owner="alice") == burn


def test_a_conflicting_reuse_raises_and_keeps_the_first_outcome(ledger: Ledger) -> None:
    first = apply(ledger, SINGLE_MINT, "r1", card_id="c", owner="alice")
    with pytest.raises(ConflictError, match="conflict"):
        apply(ledger, SINGLE_MINT, "r1", card_id="d", owner="alice")
    with pytest.raises(ConflictError):
        apply(ledger, BURN, "r1", card_id="c", owner="alice")
    assert ledger.outcome("r1") == first
    assert ledger.card("d") is None


def test_concurrent_requests_for_one_card_make_one_effect(ledger: Ledger) -> None:
    outcomes: list[str] = []

    def race(index: int) -> None:
        payload = validate_payload(SINGLE_MINT, {"card_id": "hot", "owner": f"o{index}"})
        outcomes.append(json.loads(ledger.apply(SINGLE_MINT, f"r{index}", payload))["outcome"])

    threads = [threading.Thread(target=race, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["rejected"] * 11 + ["succeeded"]


def test_concurrent_deliveries_of_one_request_make_one_effect_and_one_outcome(
    ledger: Ledger,
) -> None:
    from sqlalchemy import func, select

    from mcard_tasks.models import Card, OutboxEvent

    apply(ledger, SINGLE_MINT, "m", card_id="held", owner="alice")
    outcomes: dict[str, list[str]] = {"mint": [], "burn": []}
    mint = validate_payload(SINGLE_MINT, {"card_id": "dup", "owner": "bob"})
    burn = validate_payload(BURN, {"card_id": "held", "owner": "alice"})

    def deliver() -> None:
        outcomes["mint"].append(ledger.apply(SINGLE_MINT, "r-dup", mint))
        outcomes["burn"].append(ledger.apply(BURN, "r-burn", burn))

    threads = [threading.Thread(target=deliver) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for kind in ("mint", "burn"):
        assert len(outcomes[kind]) == 10 and len(set(outcomes[kind])) == 1, outcomes[kind]
        assert json.loads(outcomes[kind][0])["outcome"] == "succeeded"
    with ledger.session(readonly=True) as session:
        assert session.scalar(select(func.count()).select_from(Card)) == 2
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 3, "one each"


def test_concurrent_state_saves_of_one_request_never_fail(ledger: Ledger) -> None:
    # A retry due at once runs beside the run that scheduled it: both store a state.
    errors: list[BaseException] = []
    start = threading.Barrier(10)

    def save(index: int) -> None:
        start.wait(10)
        try:
            for key in range(30):  # every thread races every other on each key
                ledger.save_task_state(f"r-state-{key}", "RETRY", f'"attempt {index}"', None)
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[:2]
    state = ledger.task_state("r-state-29")
    assert state is not None and state.state == "RETRY" and state.result is not None
    ledger.save_task_state("r-state-29", "FAILURE", '"last"', "Traceback ...")
    state = ledger.task_state("r-state-29")
    assert state is not None and (state.state, state.result) == ("FAILURE", '"last"')
