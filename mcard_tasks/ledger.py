"""The card ledger: each request claims its ID, applies its effect and records its outcome
in one transaction, so a request ID has exactly one effect however often it arrives.

The business rules are plain functions of a session and a payload; rejections are recorded
outcomes (with a stable reason code), not errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from mcard_tasks.database import engine_for
from mcard_tasks.errors import ConflictError, LedgerUnavailableError
from mcard_tasks.models import Card, Operation, TaskState
from mcard_tasks.payloads import (
    MintRequest,
    Payload,
    SingleBurnRequest,
    SingleMintRequest,
    canonical_json,
    fingerprint,
)

__all__ = ["Ledger", "Verdict", "get_ledger"]

SUCCEEDED, REJECTED = "succeeded", "rejected"
# A concurrent claim of the same request ID or card makes the loser's transaction fail on a
# unique key; it then starts again and finds the winner's row. Bounded, in case of a bug.
_CLAIM_ATTEMPTS = 5


@dataclass(frozen=True)
class Verdict:
    """What a rule decided: succeeded, or rejected with a reason code."""

    reason: str | None = None
    detail: str | None = None

    @property
    def outcome(self) -> str:
        return SUCCEEDED if self.reason is None else REJECTED


def _now() -> datetime:
    return datetime.now(UTC)


def _single_mint(session: Session, request_id: str, payload: Payload) -> Verdict:
    assert isinstance(payload, SingleMintRequest)
    return _mint_cards(session, request_id, payload.owner, [payload.card_id], payload.metadata)


def _mint(session: Session, request_id: str, payload: Payload) -> Verdict:
    assert isinstance(payload, MintRequest)
    return _mint_cards(session, request_id, payload.owner, payload.card_ids, payload.metadata)


def _mint_cards(
    session: Session,
    request_id: str,
    owner: str,
    card_ids: list[str],
    metadata: dict[str, Any] | None,
) -> Verdict:
    """All or nothing: if any card exists, none is minted."""
    taken = session.scalars(select(Card.card_id).where(Card.card_id.in_(card_ids))).all()
    if taken:
        return Verdict("already_minted", "already minted: " + ", ".join(sorted(taken)[:20]))
    now = _now()
    session.add_all(
        Card(
            card_id=card_id,
            owner=owner,
            card_metadata=metadata,
            status="active",
            minted_by=request_id,
            minted_at=now,
        )
        for card_id in card_ids
    )
    return Verdict()


def _single_burn(session: Session, request_id: str, payload: Payload) -> Verdict:
    assert isinstance(payload, SingleBurnRequest)
    card = session.get(Card, payload.card_id, with_for_update=True)
    if card is None:
        return Verdict("unknown_card", f"no card {payload.card_id!r} was ever minted")
    if card.status == "burned":
        return Verdict("already_burned", f"card {payload.card_id!r} is already burned")
    if card.owner != payload.owner:
        return Verdict("not_holder", f"card {payload.card_id!r} is not held by that owner")
    card.status, card.burned_by, card.burned_at = "burned", request_id, _now()
    return Verdict()


Rule = Callable[[Session, str, Payload], Verdict]
RULES: dict[str, Rule] = {
    "mcard.mint": _mint,
    "mcard.single_mint": _single_mint,
    "mcard.single_burn": _single_burn,
}


def _outcome_object(task: str, request_id: str, payload: Payload, verdict: Verdict) -> str:
    fields = payload.model_dump()
    card_ids = fields.get("card_ids") or [fields["card_id"]]
    return canonical_json(
        {
            "request_id": request_id,
            "task": task,
            "outcome": verdict.outcome,
            "reason": verdict.reason,
            "detail": verdict.detail,
            "owner": fields["owner"],
            "card_ids": card_ids,
            "recorded_at": _now().isoformat(),
        }
    )


class Ledger:
    """The ledger on one database (SQLite file or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _session(self, readonly: bool = False) -> Iterator[Session]:
        try:
            bind = self.engine.execution_options(mcard_readonly=readonly)
            with Session(bind, expire_on_commit=False) as session, session.begin():
                yield session
        except OperationalError as exc:
            raise LedgerUnavailableError(f"the ledger database is unavailable: {exc}") from exc

    def apply(self, task: str, request_id: str, payload: Payload) -> str:
        """Apply a request once; return its outcome object as the JSON first recorded.

        Raises ConflictError when the request ID is recorded with a different payload.
        """
        digest = fingerprint(task, payload)
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                return self._apply_once(task, request_id, payload, digest)
            except IntegrityError:
                continue  # lost a race on a unique key: the winner's row is visible now
        raise LedgerUnavailableError(f"could not claim request {request_id!r}; try again")

    def _apply_once(self, task: str, request_id: str, payload: Payload, digest: str) -> str:
        with self._session() as session:
            known = session.get(Operation, request_id)
            if known is not None:
                return self._replay(known, digest)
            operation = Operation(
                request_id=request_id,
                task=task,
                fingerprint=digest,
                status="claimed",
                outcome="",
                recorded_at=_now(),
            )
            session.add(operation)
            session.flush()  # claim the request ID before touching any card
            verdict = RULES[task](session, request_id, payload)
            operation.outcome = _outcome_object(task, request_id, payload, verdict)
            operation.status = verdict.outcome
            session.flush()
            return operation.outcome

    @staticmethod
    def _replay(operation: Operation, digest: str) -> str:
        if operation.fingerprint != digest:
            raise ConflictError(operation.request_id)
        return operation.outcome

    def check(self, task: str, request_id: str, payload: Payload) -> str | None:
        """The stored outcome if this very request is recorded, None if the ID is new.

        Raises ConflictError when the ID is recorded with a different payload.
        """
        with self._session(readonly=True) as session:
            known = session.get(Operation, request_id)
            if known is None:
                return None
            return self._replay(known, fingerprint(task, payload))

    def outcome(self, request_id: str) -> dict[str, Any] | None:
        """The recorded outcome object of a request ID, or None."""
        with self._session(readonly=True) as session:
            known = session.get(Operation, request_id)
            return None if known is None else dict(json.loads(known.outcome))

    def card(self, card_id: str) -> Card | None:
        with self._session(readonly=True) as session:
            return session.get(Card, card_id)

    def task_state(self, request_id: str) -> TaskState | None:
        with self._session(readonly=True) as session:
            return session.get(TaskState, request_id)

    def save_task_state(
        self, request_id: str, state: str, result: str | None, traceback: str | None
    ) -> None:
        """Keep a non-final state (failure, retry) for a request that has no outcome yet."""
        with self._session() as session:
            row = session.get(TaskState, request_id) or TaskState(request_id=request_id)
            row.state, row.result, row.traceback = state, result, traceback
            row.updated_at = _now()
            session.add(row)


def get_ledger(url: str | None = None) -> Ledger:
    """The ledger of this process for url (default: MCARD_DATABASE_URL)."""
    if url is None:
        from mcard_tasks.config import get_settings

        url = get_settings().database_url
    return Ledger(engine_for(url))
