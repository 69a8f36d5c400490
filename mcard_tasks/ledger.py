"""The card ledger: each request claims its ID, applies its effect and records its outcome
in one transaction, so a request ID has exactly one effect however often it arrives.

The business rules are plain functions of a connection and a payload; rejections are recorded
outcomes (with a stable reason code), not errors.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Table,
    bindparam,
    delete,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from mcard_tasks.database import autocommit_engine_for, engine_for
from mcard_tasks.errors import ConflictError, LedgerUnavailableError
from mcard_tasks.issuers import Issuer, LedgerIssuer
from mcard_tasks.models import Card, Operation, OutboxEvent, TaskState
from mcard_tasks.payloads import (
    MintRequest,
    Payload,
    SingleBurnRequest,
    SingleMintRequest,
    canonical_json,
    fingerprint,
)

__all__ = ["Ledger", "Verdict", "get_ledger"]

T = TypeVar("T")

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


# The tables, for the Core statements of the hot path.
CARDS = cast(Table, Card.__table__)
OPERATIONS = cast(Table, Operation.__table__)
OUTBOX = cast(Table, OutboxEvent.__table__)
TASK_STATES = cast(Table, TaskState.__table__)
#: What is recorded for a request ID: read by a replay and by the pre-publish conflict check.
_KNOWN = select(OPERATIONS.c.fingerprint, OPERATIONS.c.status, OPERATIONS.c.outcome).where(
    OPERATIONS.c.request_id == bindparam("request_id")
)


@dataclass(frozen=True)
class _Statements:
    """The hot path's statements, built once per dialect: only their parameters change, so
    SQLAlchemy compiles each once and psycopg prepares it on the server."""

    mint: Any  # INSERT cards ... ON CONFLICT DO NOTHING RETURNING card_id
    claim: Any  # INSERT operations ... ON CONFLICT DO NOTHING RETURNING request_id
    event: Any  # INSERT outbox
    burn: Any  # UPDATE the card if active and held by the owner
    card_state: Any
    known: Any  # the recorded operation of a request ID
    complete: Any  # the pending operation's final outcome, if it is still pending
    finalize_cards: Any  # the reserved cards' final status
    # PostgreSQL: all of a completion in one statement; None on SQLite, which has no
    # INSERT or UPDATE in a WITH clause.
    complete_with_event: Any

    @classmethod
    def build(cls, dialect: str) -> _Statements:
        insert_ = postgresql.insert if dialect == "postgresql" else sqlite.insert
        return cls(
            mint=insert_(CARDS)
            .on_conflict_do_nothing(index_elements=["card_id"])
            .returning(CARDS.c.card_id),
            claim=insert_(OPERATIONS)
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(OPERATIONS.c.request_id),
            event=insert(OUTBOX),
            burn=update(CARDS).where(
                CARDS.c.card_id == bindparam("the_card"),
                CARDS.c.status == "active",
                CARDS.c.owner == bindparam("the_owner"),
            ),
            card_state=select(CARDS.c.status, CARDS.c.owner).where(
                CARDS.c.card_id == bindparam("card_id")
            ),
            known=_KNOWN,
            complete=update(OPERATIONS)
            .where(
                OPERATIONS.c.request_id == bindparam("the_request"),
                OPERATIONS.c.status == "pending",
            )
            .returning(OPERATIONS.c.request_id),
            finalize_cards=update(CARDS).where(
                CARDS.c.card_id.in_(bindparam("card_ids", expanding=True))
            ),
            complete_with_event=_COMPLETE_WITH_EVENT if dialect == "postgresql" else None,
        )


_COMPLETE_WITH_EVENT = text(
    """
    WITH done AS (
        UPDATE operations SET status = :status, outcome = :outcome, recorded_at = :recorded_at
        WHERE request_id = :request_id AND status = 'pending'
        RETURNING request_id
    ), finalized AS (
        UPDATE cards SET status = :final_status
        WHERE card_id = ANY(:card_ids) AND EXISTS (SELECT 1 FROM done)
    )
    INSERT INTO outbox (request_id, routing_key, body, created_at)
    SELECT request_id, :routing_key, :outcome, :recorded_at FROM done
    RETURNING request_id
    """
)


# PostgreSQL, one card, the ledger as issuer: the whole success of a new request in ONE
# statement, run outside an explicit transaction (a statement is atomic on its own): the
# effect, the claim carrying the success outcome, and its event. It changes nothing unless the
# card's effect applies; a request ID recorded already fails it on the operations key (nothing
# committed). Either way the general path then decides (a rejection, a replay or a conflict).
_RECORD_SUCCESS = """
    WITH effect AS ({effect}),
    claim AS (
        INSERT INTO operations (request_id, task, fingerprint, status, outcome, recorded_at)
        SELECT :request_id, :task, :fingerprint, 'succeeded', :outcome, :recorded_at
        FROM effect
        RETURNING request_id
    )
    INSERT INTO outbox (request_id, routing_key, body, created_at)
    SELECT request_id, :routing_key, :outcome, :recorded_at FROM claim
    RETURNING request_id
"""
_FAST_PATHS = {
    "mcard.single_mint": text(
        _RECORD_SUCCESS.format(
            effect="""
        INSERT INTO cards (card_id, owner, metadata, status, minted_by, minted_at)
        VALUES (:card_id, :owner, :metadata, 'active', :request_id, :recorded_at)
        ON CONFLICT (card_id) DO NOTHING
        RETURNING card_id"""
        )
    ).bindparams(bindparam("metadata", type_=JSON)),
    "mcard.single_burn": text(
        _RECORD_SUCCESS.format(
            effect="""
        UPDATE cards SET status = 'burned', burned_by = :request_id, burned_at = :recorded_at
        WHERE card_id = :card_id AND status = 'active' AND owner = :owner
        RETURNING card_id"""
        )
    ),
}

_statements_of = functools.cache(_Statements.build)


def _statements(connection: Connection) -> _Statements:
    return _statements_of(connection.dialect.name)


def _mint_cards(connection: Connection, request_id: str, payload: Payload, status: str) -> Verdict:
    """All or nothing: if any card exists (or is being minted), none is minted.

    One statement on the way to success: the cards go in unless their ID is taken, and a
    concurrent mint of the same card waits on the unique key, then finds it taken.
    """
    assert isinstance(payload, MintRequest | SingleMintRequest)
    # In key order: two batches sharing cards lock them in the same order (no deadlock).
    card_ids = sorted(_card_ids(payload))
    now = _now()
    rows = [
        {
            "card_id": card_id,
            "owner": payload.owner,
            "metadata": payload.metadata,
            "status": status,
            "minted_by": request_id,
            "minted_at": now,
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


def _burn_card(connection: Connection, request_id: str, payload: Payload, status: str) -> Verdict:
    """One statement on the way to success; a refusal looks at the card to name its reason."""
    assert isinstance(payload, SingleBurnRequest)
    statements = _statements(connection)
    burned = connection.execute(
        statements.burn,
        {
            "the_card": payload.card_id,
            "the_owner": payload.owner,
            "status": status,
            "burned_by": request_id,
            "burned_at": _now(),
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


def _card_ids(payload: Payload) -> list[str]:
    if isinstance(payload, MintRequest):
        return payload.card_ids
    assert isinstance(payload, SingleMintRequest | SingleBurnRequest)
    return [payload.card_id]


Rule = Callable[[Connection, str, Payload, str], Verdict]
#: Each rule decides and applies (or reserves, with a pending status) the effect.
RULES: dict[str, tuple[Rule, str, str]] = {
    # task: (rule, status while an external issuer works, final status)
    "mcard.mint": (_mint_cards, "minting", "active"),
    "mcard.single_mint": (_mint_cards, "minting", "active"),
    "mcard.single_burn": (_burn_card, "burning", "burned"),
}


def _outcome_object(
    task: str, request_id: str, payload: Payload, verdict: Verdict, recorded_at: datetime
) -> str:
    return canonical_json(
        {
            "request_id": request_id,
            "task": task,
            "outcome": verdict.outcome,
            "reason": verdict.reason,
            "detail": verdict.detail,
            "owner": payload.owner,
            "card_ids": _card_ids(payload),
            "recorded_at": recorded_at.isoformat(),
        }
    )


def _add_event(
    connection: Connection,
    task: str,
    request_id: str,
    verdict: Verdict,
    outcome: str,
    recorded_at: datetime,
) -> None:
    """The outcome's pending event, in the transaction that records the outcome (outbox)."""
    connection.execute(
        _statements(connection).event,
        {
            "request_id": request_id,
            "routing_key": f"{task}.{verdict.outcome}",
            "body": outcome,
            "created_at": recorded_at,
        },
    )


class _AlreadyClaimed(Exception):
    """The request ID is recorded already: undo this attempt and look at the record."""


class Ledger:
    """The ledger on one database (SQLite file or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # The one-statement fast path (PostgreSQL): no BEGIN, no COMMIT round trips.
        self._autocommit = (
            autocommit_engine_for(engine) if engine.dialect.name == "postgresql" else None
        )
        self._reader = engine.execution_options(mcard_readonly=True)
        # The conflict check's SQL, compiled once for this engine's dialect (see _recorded).
        compiled = _KNOWN.compile(dialect=engine.dialect)
        self._check_sql = compiled.string
        self._check_positional = compiled.positional
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error

    @contextmanager
    def session(self, readonly: bool = False) -> Iterator[Session]:
        """A transaction on the ledger (readonly: no write lock on SQLite)."""
        with self._session(readonly) as session:
            yield session

    @contextmanager
    def _session(self, readonly: bool = False) -> Iterator[Session]:
        try:
            bind = self._reader if readonly else self.engine
            with Session(bind, expire_on_commit=False) as session, session.begin():
                yield session
        except OperationalError as exc:
            raise LedgerUnavailableError(f"the ledger database is unavailable: {exc}") from exc

    def _read(self, read: Callable[[Session], T]) -> T:
        """read(session) in a read-only transaction, run again once on a fresh connection if
        its pooled one turned out to be dead (the server restarted since it was pooled).

        No pre-ping (a round trip per checkout, and this pool is also the hot path's): a dead
        connection fails its first statement, SQLAlchemy then recycles every connection the
        pool made before that moment, and the second attempt connects anew. A database that
        is really down fails that attempt too (LedgerUnavailableError).
        """
        try:
            with self._session(readonly=True) as session:
                return read(session)
        except LedgerUnavailableError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, DBAPIError) and cause.connection_invalidated):
                raise
        with self._session(readonly=True) as session:
            return read(session)

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction on the ledger, in SQLAlchemy Core (the hot path: no ORM)."""
        try:
            with self.engine.begin() as connection:
                yield connection
        except OperationalError as exc:
            raise LedgerUnavailableError(f"the ledger database is unavailable: {exc}") from exc

    def apply(
        self, task: str, request_id: str, payload: Payload, issuer: Issuer | None = None
    ) -> str:
        """Apply a request once; return its outcome object as the JSON first recorded.

        With an external issuer the operation is recorded as pending (its cards reserved)
        before the call and completed after it, so a crash in between is resolved by asking
        the issuer again with the same request ID. Raises ConflictError when the request ID
        is recorded with a different payload, and the issuer's TransientError as is.
        """
        issuer = issuer or LedgerIssuer()
        digest = fingerprint(task, payload)
        if not issuer.external and self._autocommit is not None and task in _FAST_PATHS:
            outcome = self._record_success(task, request_id, payload, digest)
            if outcome is not None:
                return outcome
        outcome = self._retry_claims(
            lambda: self._claim(task, request_id, payload, digest, issuer.external)
        )
        if outcome is not None:
            return outcome
        _call_issuer(issuer, task, request_id, payload)
        return self._retry_claims(lambda: self._complete(task, request_id, payload))

    def _record_success(
        self, task: str, request_id: str, payload: Payload, digest: str
    ) -> str | None:
        """The fast path of a new request that succeeds: its outcome, or None if the general
        path must decide (the card's effect does not apply, or the request ID is recorded)."""
        assert self._autocommit is not None
        assert isinstance(payload, SingleMintRequest | SingleBurnRequest)
        verdict, now = Verdict(), _now()
        outcome = _outcome_object(task, request_id, payload, verdict, now)
        parameters = {
            "request_id": request_id,
            "task": task,
            "fingerprint": digest,
            "outcome": outcome,
            "recorded_at": now,
            "routing_key": f"{task}.{verdict.outcome}",
            "card_id": payload.card_id,
            "owner": payload.owner,
        }
        if isinstance(payload, SingleMintRequest):
            parameters["metadata"] = payload.metadata
        try:
            with self._autocommit.connect() as connection:
                done = connection.execute(_FAST_PATHS[task], parameters).first()
        except IntegrityError:
            return None  # the request ID is recorded: nothing was committed
        except OperationalError as exc:
            raise LedgerUnavailableError(f"the ledger database is unavailable: {exc}") from exc
        return outcome if done is not None else None

    @staticmethod
    def _retry_claims(step: Callable[[], T]) -> T:
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                return step()
            except IntegrityError:
                continue  # lost a race on a unique key: the winner's row is visible now
        raise LedgerUnavailableError("could not claim the request; try again")

    def _claim(
        self, task: str, request_id: str, payload: Payload, digest: str, external: bool
    ) -> str | None:
        """Decide, apply and claim the request ID in one transaction.

        Returns the final outcome, or None while it is pending (external issuer). Three
        statements and a commit for a new request: the effect, the operation row (the claim,
        which carries the outcome) and its event. If the request ID turns out to be recorded
        already, the attempt is rolled back and the record answers instead (a replay).
        """
        rule, pending_status, final_status = RULES[task]
        try:
            with self._transaction() as connection:
                verdict = rule(
                    connection, request_id, payload, pending_status if external else final_status
                )
                pending = external and verdict.reason is None
                now = _now()
                outcome = (
                    "" if pending else _outcome_object(task, request_id, payload, verdict, now)
                )
                claim = {
                    "request_id": request_id,
                    "task": task,
                    "fingerprint": digest,
                    "status": "pending" if pending else verdict.outcome,
                    "outcome": outcome,
                    "recorded_at": now,
                }
                if connection.execute(_statements(connection).claim, claim).first() is None:
                    raise _AlreadyClaimed
                if pending:
                    return None  # effect reserved; the issuer is called outside the transaction
                _add_event(connection, task, request_id, verdict, outcome, now)
                return outcome
        except _AlreadyClaimed:
            pass
        with self._transaction() as connection:
            known = connection.execute(
                _statements(connection).known, {"request_id": request_id}
            ).one()
        if known.fingerprint != digest:
            raise ConflictError(request_id)
        return None if known.status == "pending" else str(known.outcome)

    def _complete(self, task: str, request_id: str, payload: Payload) -> str:
        """After the issuer succeeded: make the reserved effect final and record the outcome,
        unless another delivery of the request completed it meanwhile."""
        verdict, now = Verdict(), _now()
        outcome = _outcome_object(task, request_id, payload, verdict, now)
        card_ids, final_status = _card_ids(payload), RULES[task][2]
        with self._transaction() as connection:
            statements = _statements(connection)
            if statements.complete_with_event is not None:
                done = connection.execute(
                    statements.complete_with_event,
                    {
                        "request_id": request_id,
                        "status": verdict.outcome,
                        "outcome": outcome,
                        "recorded_at": now,
                        "final_status": final_status,
                        "card_ids": card_ids,
                        "routing_key": f"{task}.{verdict.outcome}",
                    },
                ).first()
            else:
                done = connection.execute(
                    statements.complete,
                    {
                        "the_request": request_id,
                        "status": verdict.outcome,
                        "outcome": outcome,
                        "recorded_at": now,
                    },
                ).first()
                if done is not None:
                    connection.execute(
                        statements.finalize_cards, {"card_ids": card_ids, "status": final_status}
                    )
                    _add_event(connection, task, request_id, verdict, outcome, now)
            if done is not None:
                return outcome
            known = connection.execute(statements.known, {"request_id": request_id}).first()
        assert known is not None, f"pending operation {request_id} vanished"
        return str(known.outcome)  # another delivery completed it meanwhile

    def check(self, task: str, request_id: str, payload: Payload) -> str | None:
        """The stored outcome if this very request is recorded, None if the ID is new.

        Raises ConflictError when the ID is recorded with a different payload.
        """
        row = self._recorded(request_id)
        if row is None:
            return None
        recorded_fingerprint, _, outcome = row
        if recorded_fingerprint != fingerprint(task, payload):
            raise ConflictError(request_id)
        return str(outcome) or None  # pending: no outcome yet

    def _recorded(self, request_id: str) -> tuple[str, str, str] | None:
        """The fingerprint, status and outcome recorded for request_id: one SELECT by key.

        This runs before every publish that names its request ID, so it skips SQLAlchemy's
        per-execution machinery (events, the statement cache, result objects), which cost four
        times the query itself on SQLite: SQLAlchemy's SQL for the dialect, on a connection of
        the engine's pool, run by the DBAPI cursor. No transaction is needed for one SELECT
        (on PostgreSQL the pool rolls back the one the driver opened, on return).
        """
        params = (request_id,) if self._check_positional else {"request_id": request_id}
        try:
            connection = self.engine.raw_connection()
            try:
                cursor = connection.cursor()
                cursor.execute(self._check_sql, params)
                row = cursor.fetchone()
                cursor.close()
            except self._dbapi_error:
                connection.invalidate()  # not back into the pool: it may be broken
                raise
            finally:
                connection.close()
        except (OperationalError, self._dbapi_error) as exc:
            raise LedgerUnavailableError(f"the ledger database is unavailable: {exc}") from exc
        return None if row is None else (row[0], row[1], row[2])

    def outcome(self, request_id: str) -> dict[str, Any] | None:
        """The recorded outcome object of a request ID, or None."""
        known = self._read(lambda session: session.get(Operation, request_id))
        if known is None or not known.outcome:
            return None
        return dict(json.loads(known.outcome))

    def card(self, card_id: str) -> Card | None:
        with self._session(readonly=True) as session:
            return session.get(Card, card_id)

    def task_state(self, request_id: str) -> TaskState | None:
        return self._read(lambda session: session.get(TaskState, request_id))

    def save_task_state(
        self, request_id: str, state: str, result: str | None, traceback: str | None
    ) -> None:
        """Keep a non-final state (failure, retry) for a request that has no outcome yet.

        An upsert: two deliveries of one request (a retry due at once runs beside the run that
        scheduled it) may store a state at the same moment, and neither may fail on the key.
        """
        values = {"state": state, "result": result, "traceback": traceback, "updated_at": _now()}
        with self._transaction() as connection:
            insert_ = (
                postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
            )
            statement = insert_(TASK_STATES).values(request_id=request_id, **values)
            connection.execute(
                statement.on_conflict_do_update(index_elements=["request_id"], set_=values)
            )


def get_ledger(url: str) -> Ledger:
    """The ledger of this process on the database at url."""
    try:
        engine = engine_for(url)
    except OperationalError as exc:
        raise LedgerUnavailableError(f"the ledger database is unavailable: {exc}") from exc
    ledger = _LEDGERS.get(engine)
    if ledger is None:
        ledger = _LEDGERS[engine] = Ledger(engine)
    return ledger


_LEDGERS: dict[Engine, Ledger] = {}


def _call_issuer(issuer: Issuer, task: str, request_id: str, payload: Payload) -> None:
    if isinstance(payload, SingleBurnRequest):
        issuer.destroy(request_id, payload.owner, payload.card_id)
    else:
        assert isinstance(payload, MintRequest | SingleMintRequest)
        issuer.issue(request_id, payload.owner, _card_ids(payload), payload.metadata)
