"""The ledger's batches (mcard_tasks.ledger_batch) on a real SQLite file and on PostgreSQL:
what a batch commits is what Ledger.apply would have recorded, and what it cannot decide it
leaves untouched for Ledger.apply."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from mcard_tasks.issuers import LedgerIssuer, SimulatedBatchIssuer, SimulatedIssuer
from mcard_tasks.ledger import OUTBOX, Ledger
from mcard_tasks.ledger_batch import apply_batch
from mcard_tasks.payloads import Payload
from mcard_tasks.specs import validate_payload

MINT, SINGLE_MINT, BURN = "mcard.mint", "mcard.single_mint", "mcard.single_burn"


@pytest.fixture
def ledger(fresh_ledger: Ledger) -> Ledger:
    return fresh_ledger


def mint(card: str, owner: str = "alice", metadata: object = None) -> Payload:
    return validate_payload(SINGLE_MINT, {"card_id": card, "owner": owner, "metadata": metadata})


def burn(card: str, owner: str = "alice") -> Payload:
    return validate_payload(BURN, {"card_id": card, "owner": owner})


def events(ledger: Ledger) -> dict[str, str]:
    with ledger.engine.connect() as connection:
        return {
            row[0]: row[1] for row in connection.execute(select(OUTBOX.c.request_id, OUTBOX.c.body))
        }


def test_a_batch_of_new_mints_records_each_request_with_its_own_outcome_and_event(
    ledger: Ledger,
) -> None:
    requests = [(f"r{i}", mint(f"c{i}", metadata={"n": i} if i % 2 else None)) for i in range(50)]
    outcomes = apply_batch(ledger, SINGLE_MINT, requests)
    assert set(outcomes) == {request_id for request_id, _ in requests}
    recorded = events(ledger)
    for request_id, payload in requests:
        outcome = json.loads(outcomes[request_id])
        assert (outcome["outcome"], outcome["card_ids"]) == ("succeeded", [payload.card_id])
        # A replay through the per-request path returns the very bytes the batch stored.
        assert ledger.apply(SINGLE_MINT, request_id, payload) == outcomes[request_id]
        assert recorded[request_id] == outcomes[request_id]
        card = ledger.card(payload.card_id)
        assert card is not None and card.minted_by == request_id and card.status == "active"
        assert card.card_metadata == payload.metadata  # type: ignore[attr-defined]


def test_what_a_batch_cannot_decide_is_left_untouched_for_the_per_request_path(
    ledger: Ledger,
) -> None:
    ledger.apply(SINGLE_MINT, "old", mint("taken"))
    requests = [
        ("new", mint("free")),
        ("old", mint("taken")),  # a replay
        ("reused", mint("x")),
        ("reused", mint("y")),  # the same ID twice in the batch
        ("rival", mint("taken")),  # a rejection: the card is minted already
        ("twin", mint("free")),  # a second request for a card of the batch
    ]
    outcomes = apply_batch(ledger, SINGLE_MINT, requests)
    assert set(outcomes) == {"new", "reused"}
    assert json.loads(outcomes["reused"])["card_ids"] == ["x"]
    assert ledger.card("y") is None and ledger.outcome("rival") is None
    assert ledger.outcome("twin") is None
    assert set(events(ledger)) == {"old", "new", "reused"}


def test_a_batch_of_burns_burns_what_its_owner_holds_and_leaves_refusals(ledger: Ledger) -> None:
    apply_batch(ledger, SINGLE_MINT, [("m1", mint("a")), ("m2", mint("b")), ("m3", mint("c"))])
    requests = [("b1", burn("a")), ("b2", burn("b", owner="bob")), ("b3", burn("nope"))]
    outcomes = apply_batch(ledger, BURN, requests)
    assert set(outcomes) == {"b1"}
    card = ledger.card("a")
    assert card is not None and (card.status, card.burned_by) == ("burned", "b1")
    other = ledger.card("b")
    assert other is not None and other.status == "active"
    assert json.loads(ledger.apply(BURN, "b2", burn("b", owner="bob")))["reason"] == "not_holder"


def test_a_batch_issuer_is_asked_once_and_each_request_completes(ledger: Ledger) -> None:
    issuer = SimulatedBatchIssuer(latency_ms=0)
    requests = [(f"r{i}", mint(f"c{i}")) for i in range(10)]
    outcomes = apply_batch(ledger, SINGLE_MINT, requests, issuer)
    assert set(outcomes) == {request_id for request_id, _ in requests}
    card = ledger.card("c3")
    assert card is not None and card.status == "active"
    assert ledger.apply(SINGLE_MINT, "r3", mint("c3"), issuer) == outcomes["r3"]
    assert len(events(ledger)) == 10


def test_kinds_and_issuers_without_a_batch_path_leave_every_request_to_the_ledger(
    ledger: Ledger,
) -> None:
    batch_mint = validate_payload(MINT, {"owner": "alice", "card_ids": ["a", "b"]})
    assert apply_batch(ledger, MINT, [("r1", batch_mint)], LedgerIssuer()) == {}
    assert apply_batch(ledger, SINGLE_MINT, [("r2", mint("c"))], SimulatedIssuer(0)) == {}
    with ledger.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(OUTBOX)).scalar_one() == 0
