"""The business rules of the built-in task kinds: plain functions of a connection and a payload.

Each rule decides and applies its effect inside the ledger's transaction (or reserves it with a
pending status while an external issuer works) and returns a Verdict: success, or a rejection
with a stable reason code. Rejections are recorded outcomes, not errors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from mcard_tasks.models import Card
from mcard_tasks.payloads import MintRequest, SingleBurnRequest, SingleMintRequest

__all__ = [
    "BURN_EACH_EFFECT",
    "BURN_ONE_EFFECT",
    "MINT_EACH_EFFECT",
    "MINT_ONE_EFFECT",
    "REJECTED",
    "SUCCEEDED",
    "BatchEffect",
    "Rule",
    "Verdict",
    "burn_card",
    "burn_each",
    "mint_cards",
    "mint_each",
    "now",
]

SUCCEEDED, REJECTED = "succeeded", "rejected"
CARDS = cast(Table, Card.__table__)


@dataclass(frozen=True)
class Verdict:
    """What a rule decided: succeeded, or rejected with a reason code."""

    reason: str | None = None
    detail: str | None = None

    @property
    def status(self) -> str:
        """``succeeded`` or ``rejected``: the outcome word recorded and routed on."""
        return SUCCEEDED if self.reason is None else REJECTED


#: ``rule(connection, request_id, payload, status)``: status is the card status to write
#: (final, or pending while an external issuer works).
Rule = Callable[[Connection, str, Any, str], Verdict]
#: ``effect(connection, requests, status, at)``: the success path of many new requests of one
#: kind, each touching one card no other of them touches, in a few multi-row statements;
#: applies every effect it can and returns the request IDs it applied. The others are left
#: untouched, for the kind's rule to decide one by one (a rejection names its reason there).
BatchEffect = Callable[[Connection, list[tuple[str, Any]], str, datetime], set[str]]


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Statements:
    """The rules' statements, built once per dialect: only their parameters change, so
    SQLAlchemy compiles each once and psycopg prepares it on the server."""

    mint: Any  # INSERT cards ... ON CONFLICT DO NOTHING RETURNING card_id
    mint_each: Any  # the same, returning who minted each card (many rows at once)
    burn: Any  # UPDATE the card if active and held by the owner
    card_state: Any

    @classmethod
    def build(cls, dialect: str) -> _Statements:
        insert_ = postgresql.insert if dialect == "postgresql" else sqlite.insert
        return cls(
            mint=insert_(CARDS)
            .on_conflict_do_nothing(index_elements=["card_id"])
            .returning(CARDS.c.card_id),
            mint_each=insert_(CARDS)
            .on_conflict_do_nothing(index_elements=["card_id"])
            .returning(CARDS.c.minted_by),
            burn=update(CARDS).where(
                CARDS.c.card_id == bindparam("the_card"),
                CARDS.c.status == "active",
                CARDS.c.owner == bindparam("the_owner"),
            ),
            card_state=select(CARDS.c.status, CARDS.c.owner).where(
                CARDS.c.card_id == bindparam("card_id")
            ),
        )


_statements_of = functools.cache(_Statements.build)


def _statements(connection: Connection) -> _Statements:
    return _statements_of(connection.dialect.name)


def mint_cards(
    connection: Connection, request_id: str, payload: MintRequest | SingleMintRequest, status: str
) -> Verdict:
    """All or nothing: if any card exists (or is being minted), none is minted.

    One statement on the way to success: the cards go in unless their ID is taken, and a
    concurrent mint of the same card waits on the unique key, then finds it taken.
    """
    # In key order: two batches sharing cards lock them in the same order (no deadlock).
    card_ids = sorted(payload.card_ids if isinstance(payload, MintRequest) else [payload.card_id])
    minted_at = now()
    rows = [
        {
            "card_id": card_id,
            "owner": payload.owner,
            "metadata": payload.metadata,
            "status": status,
            "minted_by": request_id,
            "minted_at": minted_at,
        }
        for card_id in card_ids
    ]
    minted = (
        connection.execute(_statements(connection).mint, rows[0] if len(rows) == 1 else rows)
        .scalars()
        .all()
    )
    if len(minted) == len(card_ids):
        return Verdict()
    if minted:  # some were free: give them back, the batch is all or nothing
        connection.execute(delete(CARDS).where(CARDS.c.card_id.in_(minted)))
    taken = sorted(set(card_ids) - set(minted))
    return Verdict("already_minted", "already minted: " + ", ".join(taken[:20]))


def burn_card(
    connection: Connection, request_id: str, payload: SingleBurnRequest, status: str
) -> Verdict:
    """One statement on the way to success; a refusal looks at the card to name its reason."""
    statements = _statements(connection)
    burned = connection.execute(
        statements.burn,
        {
            "the_card": payload.card_id,
            "the_owner": payload.owner,
            "status": status,
            "burned_by": request_id,
            "burned_at": now(),
        },
    ).rowcount
    if burned:
        return Verdict()
    card = connection.execute(statements.card_state, {"card_id": payload.card_id}).first()
    if card is None or card.status == "minting":
        return Verdict("unknown_card", f"no card {payload.card_id!r} was minted")
    if card.status in ("burned", "burning"):
        return Verdict("already_burned", f"card {payload.card_id!r} is already burned")
    return Verdict("not_holder", f"card {payload.card_id!r} is not held by that owner")


def mint_each(
    connection: Connection, requests: list[tuple[str, SingleMintRequest]], status: str, at: datetime
) -> set[str]:
    """Batch effect of single_mint: one multi-row INSERT of the cards not taken yet, in key
    order (two batches sharing cards lock them in the same order)."""
    rows = [
        {
            "card_id": payload.card_id,
            "owner": payload.owner,
            "metadata": payload.metadata,
            "status": status,
            "minted_by": request_id,
            "minted_at": at,
        }
        for request_id, payload in sorted(requests, key=lambda item: item[1].card_id)
    ]
    return set(connection.execute(_statements(connection).mint_each, rows).scalars())


def burn_each(
    connection: Connection, requests: list[tuple[str, SingleBurnRequest]], status: str, at: datetime
) -> set[str]:
    """Batch effect of single_burn: the cards read (locked, in key order, on PostgreSQL) in one
    query, then the burnable ones (active, held by the request's owner) updated together."""
    wanted = {payload.card_id: (request_id, payload) for request_id, payload in requests}
    query = (
        select(CARDS.c.card_id, CARDS.c.status, CARDS.c.owner)
        .where(CARDS.c.card_id.in_(sorted(wanted)))
        .order_by(CARDS.c.card_id)
        .with_for_update()
    )
    burnable = [
        wanted[row.card_id]
        for row in connection.execute(query)
        if row.status == "active" and row.owner == wanted[row.card_id][1].owner
    ]
    if burnable:
        connection.execute(
            _statements(connection).burn,
            [
                {
                    "the_card": payload.card_id,
                    "the_owner": payload.owner,
                    "status": status,
                    "burned_by": request_id,
                    "burned_at": at,
                }
                for request_id, payload in burnable
            ],
        )
    return {request_id for request_id, _ in burnable}


# The effects of the one-statement success path on PostgreSQL (see Ledger): SQL that applies
# the effect of a new request on one card and returns a row only if it applied. Parameters:
# the payload's fields, :request_id and :recorded_at.
MINT_ONE_EFFECT = """
    INSERT INTO cards (card_id, owner, metadata, status, minted_by, minted_at)
    VALUES (:card_id, :owner, :metadata, 'active', :request_id, :recorded_at)
    ON CONFLICT (card_id) DO NOTHING
    RETURNING card_id"""
BURN_ONE_EFFECT = """
    UPDATE cards SET status = 'burned', burned_by = :request_id, burned_at = :recorded_at
    WHERE card_id = :card_id AND status = 'active' AND owner = :owner
    RETURNING card_id"""

# The same effects for a whole batch (PostgreSQL, mcard_tasks.ledger_batch): SQL over the
# batch's new requests, a CTE named input (request_id and the payload's fields, one row per
# request, each card in one row at most), applying every effect it can and returning the
# request_id of each it applied. Parameter: :recorded_at.
MINT_EACH_EFFECT = """
    INSERT INTO cards (card_id, owner, metadata, status, minted_by, minted_at)
    SELECT card_id, owner, metadata, 'active', request_id, :recorded_at
    FROM input ORDER BY card_id
    ON CONFLICT (card_id) DO NOTHING
    RETURNING minted_by AS request_id"""
BURN_EACH_EFFECT = """
    UPDATE cards SET status = 'burned', burned_by = input.request_id, burned_at = :recorded_at
    FROM input
    WHERE cards.card_id = input.card_id AND cards.status = 'active'
      AND cards.owner = input.owner
    RETURNING input.request_id"""
