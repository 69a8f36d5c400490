"""The issuer hook: pending before the call, outcome after, the same key when asked again."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select

from mcard_tasks.config import Settings
from mcard_tasks.errors import ConfigurationError, TransientError
from mcard_tasks.issuers import (
    IssuerUnavailableError,
    LedgerIssuer,
    SimulatedIssuer,
    build_issuer,
)
from mcard_tasks.ledger import Ledger
from mcard_tasks.models import Operation, OutboxEvent
from mcard_tasks.specs import validate_payload

SINGLE_MINT, BURN = "mcard.single_mint", "mcard.single_burn"


class FlakyIssuer:
    """Fails its first `failures` calls; records every idempotency key it was given."""

    external = True

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.keys: list[str] = []

    def _call(self, request_id: str) -> None:
        self.keys.append(request_id)
        if len(self.keys) <= self.failures:
            raise IssuerUnavailableError("issuer timed out")

    def issue(self, request_id: str, owner: str, card_ids: list[str], metadata: Any) -> None:
        self._call(request_id)

    def destroy(self, request_id: str, owner: str, card_id: str) -> None:
        self._call(request_id)


@pytest.fixture
def ledger(fresh_ledger: Ledger) -> Ledger:
    """Each rule test runs on SQLite and on PostgreSQL."""
    return fresh_ledger


def events(ledger: Ledger) -> int:
    with ledger.session(readonly=True) as session:
        return int(session.scalar(select(func.count()).select_from(OutboxEvent)) or 0)


def test_a_failed_issuer_call_leaves_the_request_pending_and_asking_again_completes_it(
    ledger: Ledger,
) -> None:
    issuer = FlakyIssuer(failures=1)
    payload = validate_payload(SINGLE_MINT, {"card_id": "c", "owner": "alice"})
    with pytest.raises(TransientError):
        ledger.apply(SINGLE_MINT, "r1", payload, issuer)
    assert ledger.outcome("r1") is None, "pending has no outcome"
    card = ledger.card("c")
    assert card is not None and card.status == "minting", "the card is reserved"
    rival = validate_payload(SINGLE_MINT, {"card_id": "c", "owner": "bob"})
    assert '"already_minted"' in ledger.apply(SINGLE_MINT, "r2", rival, issuer)
    outcome = ledger.apply(SINGLE_MINT, "r1", payload, issuer)
    assert '"succeeded"' in outcome
    assert issuer.keys == ["r1", "r1"], "asked again with the same idempotency key"
    card = ledger.card("c")
    assert card is not None and card.status == "active" and card.owner == "alice"
    assert ledger.apply(SINGLE_MINT, "r1", payload, issuer) == outcome
    assert issuer.keys == ["r1", "r1"], "a recorded outcome never calls the issuer"
    assert events(ledger) == 2, "one event per recorded outcome (r2 rejected, r1 succeeded)"


def test_a_burn_through_an_external_issuer_is_reserved_then_final(ledger: Ledger) -> None:
    ledger.apply(SINGLE_MINT, "m", validate_payload(SINGLE_MINT, {"card_id": "c", "owner": "a"}))
    issuer = FlakyIssuer(failures=2)
    burn = validate_payload(BURN, {"card_id": "c", "owner": "a"})
    for _ in range(2):
        with pytest.raises(IssuerUnavailableError):
            ledger.apply(BURN, "b1", burn, issuer)
    again = ledger.apply(BURN, "b2", burn, issuer)
    assert '"already_burned"' in again, "a burn under way blocks another"
    assert '"succeeded"' in ledger.apply(BURN, "b1", burn, issuer)
    card = ledger.card("c")
    assert card is not None and card.status == "burned" and card.burned_by == "b1"


def test_issuers_come_from_settings() -> None:
    assert isinstance(build_issuer(Settings(issuer="ledger")), LedgerIssuer)
    simulated = build_issuer(
        Settings(issuer="simulated", issuer_latency_ms=0, issuer_failure_rate=1.0)
    )
    assert isinstance(simulated, SimulatedIssuer)
    with pytest.raises(IssuerUnavailableError):
        simulated.issue("r", "o", ["c"], None)
    with pytest.raises(ConfigurationError, match="MCARD_ISSUER"):
        build_issuer(Settings(issuer="no.such.module:Issuer"))


def test_a_completed_request_is_recorded_and_evented_at_the_time_its_outcome_says(
    ledger: Ledger,
) -> None:
    payload = validate_payload(SINGLE_MINT, {"card_id": "late", "owner": "alice"})
    with pytest.raises(TransientError):
        ledger.apply(SINGLE_MINT, "r-late", payload, FlakyIssuer(failures=1))
    outcome = json.loads(ledger.apply(SINGLE_MINT, "r-late", payload, FlakyIssuer(failures=0)))
    with ledger.session(readonly=True) as session:
        operation = session.get(Operation, "r-late")
        event = session.get(OutboxEvent, "r-late")
        assert operation is not None and event is not None
        recorded = datetime.fromisoformat(outcome["recorded_at"])
        assert utc(operation.recorded_at) == recorded and utc(event.created_at) == recorded


def utc(moment: datetime) -> datetime:
    """SQLite gives the stored UTC time back without its zone."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
