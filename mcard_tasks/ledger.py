"""The card ledger: each request claims its ID, applies its effect and records its outcome
in one transaction, so a request ID has exactly one effect however often it arrives.

What a task kind does (its rule, its cards, its issuer call) comes from its spec
(mcard_tasks.specs); this module records it. Rejections are recorded outcomes, not errors.
Every outcome is written with its event (the outbox), which the relay publishes later.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from time import perf_counter
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    String,
    Table,
    TextClause,
    any_,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from mcard_tasks import tracing
from mcard_tasks.database import autocommit_engine_for, engine_for
from mcard_tasks.errors import ConflictError, LedgerUnavailableError
from mcard_tasks.issuers import Issuer, LedgerIssuer
from mcard_tasks.models import (
    Card,
    LegacyCount,
    Operation,
    OutboxEvent,
    ReplayCount,
    TaskState,
)
from mcard_tasks.payloads import Payload, canonical_json, fingerprint
from mcard_tasks.rules import Verdict, now
from mcard_tasks.specs import TaskSpec, spec_for
from mcard_tasks.timings import ISSUER_CALL, LEDGER_APPLY, observe

__all__ = ["Ledger", "PendingEvents", "event_routing_key", "get_ledger"]

T = TypeVar("T")
logger = logging.getLogger(__name__)

# A concurrent claim of the same request ID or card makes the loser's transaction fail on a
# unique key; it then starts again and finds the winner's row. Bounded, in case of a bug.
_CLAIM_ATTEMPTS = 5

OPERATIONS = cast(Table, Operation.__table__)
OUTBOX = cast(Table, OutboxEvent.__table__)
TASK_STATES = cast(Table, TaskState.__table__)
LEGACY_COUNTS = cast(Table, LegacyCount.__table__)
REPLAY_COUNTS = cast(Table, ReplayCount.__table__)
#: What is recorded for a request ID: read by a replay and by the pre-publish conflict check.
_KNOWN = select(OPERATIONS.c.fingerprint, OPERATIONS.c.status, OPERATIONS.c.outcome).where(
    OPERATIONS.c.request_id == bindparam("request_id")
)


def event_routing_key(task: str, status: str) -> str:
    """The routing key of an outcome event on ``mcard.events``: ``<task>.<status>``."""
    return f"{task}.{status}"


@contextmanager
def _unavailable(*errors: type[Exception]) -> Iterator[None]:
    """Say "the ledger is unavailable" for a database that cannot be reached (or, with
    errors, for any of those driver errors): the one place that maps them."""
    caught: tuple[type[Exception], ...] = (OperationalError, *errors)
    try:
        yield
    except caught as exc:
        raise LedgerUnavailableError(f"the ledger database is unavailable: {exc}") from exc


@dataclass(frozen=True)
class _Statements:
    """The ledger's statements, built once per dialect (compiled once, prepared once)."""

    claim: Any  # INSERT operations ... ON CONFLICT DO NOTHING RETURNING request_id
    event: Any  # INSERT outbox
    complete: Any  # the pending operation's final outcome, if it is still pending
    complete_each: Any  # the same for many (executemany: no RETURNING; mcard_tasks.ledger_batch)
    finalize_cards: Any  # the reserved cards' final status
    save_state: Any  # upsert of a task state
    count_legacy: Any  # upsert adding one executed legacy message of a task and key
    count_replay: Any  # upsert adding one replay absorbed for a task

    @classmethod
    def build(cls, dialect: str) -> _Statements:
        insert_ = postgresql.insert if dialect == "postgresql" else sqlite.insert
        states = insert_(TASK_STATES)
        counts = insert_(LEGACY_COUNTS)
        replays = insert_(REPLAY_COUNTS)
        return cls(
            claim=insert_(OPERATIONS)
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(OPERATIONS.c.request_id),
            event=insert(OUTBOX),
            complete=update(OPERATIONS)
            .where(
                OPERATIONS.c.request_id == bindparam("the_request"),
                OPERATIONS.c.status == "pending",
            )
            .returning(OPERATIONS.c.request_id),
            complete_each=update(OPERATIONS).where(
                OPERATIONS.c.request_id == bindparam("the_request"),
                OPERATIONS.c.status == "pending",
            ),
            finalize_cards=update(Card).where(
                Card.card_id.in_(bindparam("card_ids", expanding=True))
            ),
            save_state=states.on_conflict_do_update(
                index_elements=["request_id"],
                set_={
                    name: states.excluded[name]
                    for name in ("state", "result", "traceback", "updated_at")
                },
            ),
            count_legacy=counts.on_conflict_do_update(
                index_elements=["task", "legacy_key"],
                set_={
                    "executed": LEGACY_COUNTS.c.executed + 1,
                    "last_executed_at": counts.excluded.last_executed_at,
                },
            ),
            count_replay=replays.on_conflict_do_update(
                index_elements=["task"],
                set_={
                    "absorbed": REPLAY_COUNTS.c.absorbed + 1,
                    "last_replayed_at": replays.excluded.last_replayed_at,
                },
            ),
        )


_statements_of = functools.cache(_Statements.build)


def _statements(connection: Connection) -> _Statements:
    return _statements_of(connection.dialect.name)


# PostgreSQL, one card, the ledger as issuer: the whole success of a new request in ONE
# statement, run outside an explicit transaction (a statement is atomic on its own): the
# spec's effect, the claim carrying the success outcome, and its event. It changes nothing
# unless the card's effect applies; a request ID recorded already fails it on the operations
# key (nothing committed). Either way the general path then decides.
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


@functools.cache
def _fast_path(spec: TaskSpec) -> TextClause:
    assert spec.fast_effect is not None
    statement = text(_RECORD_SUCCESS.format(effect=spec.fast_effect))
    return statement.bindparams(*(bindparam(name, type_=JSON) for name in spec.json_fields))


def _outcome_json(
    spec: TaskSpec, request_id: str, payload: Payload, verdict: Verdict, recorded_at: datetime
) -> str:
    """The outcome object as recorded, stored and published: one canonical JSON text."""
    return canonical_json(
        {
            "request_id": request_id,
            "task": spec.name,
            "outcome": verdict.status,
            "reason": verdict.reason,
            "detail": verdict.detail,
            "owner": payload.owner,
            "card_ids": spec.cards(payload),
            "recorded_at": recorded_at.isoformat(),
        }
    )


def _record(
    connection: Connection,
    spec: TaskSpec,
    request_id: str,
    verdict: Verdict,
    outcome_json: str,
    recorded_at: datetime,
) -> None:
    """The outcome's pending event, in the transaction that records the outcome (outbox)."""
    connection.execute(
        _statements(connection).event,
        {
            "request_id": request_id,
            "routing_key": event_routing_key(spec.name, verdict.status),
            "body": outcome_json,
            "created_at": recorded_at,
        },
    )


class _AlreadyClaimed(Exception):
    """The request ID is recorded already: undo this attempt and look at the record."""


@dataclass
class PendingEvents:
    """A batch of unpublished outcome events: (request ID, routing key, body) rows.

    ``mark(request_ids)`` marks those the broker confirmed as published.
    """

    rows: list[tuple[str, str, str]]
    confirmed: list[str] = field(default_factory=list)

    def mark(self, request_ids: list[str]) -> None:
        self.confirmed.extend(request_ids)


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
        with _unavailable():
            bind = self._reader if readonly else self.engine
            with Session(bind, expire_on_commit=False) as session, session.begin():
                yield session

    def _read(self, read: Callable[[Session], T]) -> T:
        """read(session) in a read-only transaction, run again once on a fresh connection if
        its pooled one turned out to be dead (the server restarted since it was pooled).

        No pre-ping (a round trip per checkout, and this pool is also the hot path's): a dead
        connection fails its first statement, SQLAlchemy then recycles every connection the
        pool made before that moment, and the second attempt connects anew. A database that
        is really down fails that attempt too (LedgerUnavailableError).
        """
        try:
            with self.session(readonly=True) as session:
                return read(session)
        except LedgerUnavailableError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, DBAPIError) and cause.connection_invalidated):
                raise
        with self.session(readonly=True) as session:
            return read(session)

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction on the ledger, in SQLAlchemy Core (the hot path: no ORM)."""
        with _unavailable(), self.engine.begin() as connection:
            yield connection

    def apply(
        self, task: str, request_id: str, payload: Payload, issuer: Issuer | None = None
    ) -> str:
        """Apply a request once; return its outcome object as the JSON first recorded.

        With an external issuer the operation is recorded as pending (its cards reserved)
        before the call and completed after it, so a crash in between is resolved by asking
        the issuer again with the same request ID.

        Raises ConflictError when the request ID is recorded with a different payload,
        LedgerUnavailableError when the database cannot be reached, and the issuer's
        TransientError as is.
        """
        # A span of the ledger's work while tracing is on (MCARD_TRACING); a no-op otherwise.
        with tracing.span("mcard.ledger.apply", request_id, task):
            return self._apply(spec_for(task), request_id, payload, issuer or LedgerIssuer())

    def _apply(self, spec: TaskSpec, request_id: str, payload: Payload, issuer: Issuer) -> str:
        started, called = perf_counter(), 0.0
        try:
            digest = fingerprint(spec.name, payload)
            if not issuer.external and self._autocommit is not None and spec.fast_effect:
                outcome_json = self._record_success(spec, request_id, payload, digest)
                if outcome_json is not None:
                    return outcome_json
            outcome_json = self._retry_claims(
                lambda: self._claim(spec, request_id, payload, digest, issuer.external)
            )
            if outcome_json is not None:
                return outcome_json
            call = perf_counter()
            try:
                with tracing.span("mcard.issuer.issue", request_id, spec.name):
                    spec.issue(issuer, request_id, payload)
            finally:
                called = perf_counter() - call
                observe(ISSUER_CALL, spec.name, called)
            return self._retry_claims(lambda: self._complete(spec, request_id, payload))
        finally:
            observe(LEDGER_APPLY, spec.name, perf_counter() - started - called)

    def _record_success(
        self, spec: TaskSpec, request_id: str, payload: Payload, digest: str
    ) -> str | None:
        """The fast path of a new request that succeeds: its outcome, or None if the general
        path must decide (the card's effect does not apply, or the request ID is recorded)."""
        assert self._autocommit is not None
        verdict, recorded_at = Verdict(), now()
        outcome_json = _outcome_json(spec, request_id, payload, verdict, recorded_at)
        parameters = payload.model_dump() | {
            "request_id": request_id,
            "task": spec.name,
            "fingerprint": digest,
            "outcome": outcome_json,
            "recorded_at": recorded_at,
            "routing_key": event_routing_key(spec.name, verdict.status),
        }
        try:
            with _unavailable(), self._autocommit.connect() as connection:
                done = connection.execute(_fast_path(spec), parameters).first()
        except IntegrityError:
            return None  # the request ID is recorded: nothing was committed
        return outcome_json if done is not None else None

    @staticmethod
    def _retry_claims(step: Callable[[], T]) -> T:
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                return step()
            except IntegrityError:
                continue  # lost a race on a unique key: the winner's row is visible now
        raise LedgerUnavailableError("could not claim the request; try again")

    def _claim(
        self, spec: TaskSpec, request_id: str, payload: Payload, digest: str, external: bool
    ) -> str | None:
        """Decide, apply and claim the request ID in one transaction.

        Returns the final outcome, or None while it is pending (external issuer). Three
        statements and a commit for a new request: the effect, the operation row (the claim,
        which carries the outcome) and its event. If the request ID turns out to be recorded
        already, the attempt is rolled back and the record answers instead (a replay).
        """
        status = spec.pending_status if external else spec.final_status
        try:
            with self._transaction() as connection:
                verdict = spec.rule(connection, request_id, payload, status)
                pending = external and verdict.reason is None
                recorded_at = now()
                outcome_json = (
                    ""
                    if pending
                    else _outcome_json(spec, request_id, payload, verdict, recorded_at)
                )
                claim = {
                    "request_id": request_id,
                    "task": spec.name,
                    "fingerprint": digest,
                    "status": "pending" if pending else verdict.status,
                    "outcome": outcome_json,
                    "recorded_at": recorded_at,
                }
                if connection.execute(_statements(connection).claim, claim).first() is None:
                    raise _AlreadyClaimed
                if pending:
                    return None  # effect reserved; the issuer is called outside the transaction
                _record(connection, spec, request_id, verdict, outcome_json, recorded_at)
                return outcome_json
        except _AlreadyClaimed:
            pass
        status_, outcome_json = self._known(spec, request_id, digest)
        if status_ == "pending":
            return None
        self._count_replay(spec.name)
        return outcome_json

    def _known(self, spec: TaskSpec, request_id: str, digest: str) -> tuple[str, str]:
        """The recorded status and outcome JSON of a claimed request ID.

        Raises ConflictError when it was claimed with a different payload.
        """
        row = self._recorded(request_id)
        if row is None:  # operations rows are never deleted: a claimed ID stays recorded
            raise LedgerUnavailableError(f"request {request_id!r} was claimed but is not found")
        recorded_fingerprint, status, outcome_json = row
        if recorded_fingerprint != digest:
            raise ConflictError(request_id)
        return status, outcome_json

    def _complete(self, spec: TaskSpec, request_id: str, payload: Payload) -> str:
        """After the issuer succeeded: make the reserved effect final and record the outcome,
        unless another delivery of the request completed it meanwhile."""
        verdict, recorded_at = Verdict(), now()
        outcome_json = _outcome_json(spec, request_id, payload, verdict, recorded_at)
        with self._transaction() as connection:
            statements = _statements(connection)
            done = connection.execute(
                statements.complete,
                {
                    "the_request": request_id,
                    "status": verdict.status,
                    "outcome": outcome_json,
                    "recorded_at": recorded_at,
                },
            ).first()
            if done is not None:
                connection.execute(
                    statements.finalize_cards,
                    {"card_ids": spec.cards(payload), "status": spec.final_status},
                )
                _record(connection, spec, request_id, verdict, outcome_json, recorded_at)
                return outcome_json
        outcome_json = self._known(spec, request_id, fingerprint(spec.name, payload))[1]
        self._count_replay(spec.name)  # another delivery completed it meanwhile
        return outcome_json

    def _count_replay(self, task: str) -> None:
        """Count one replay absorbed (its own statement, on the replay path only, so a new
        request's path is left as it is). Best effort: the stored outcome is the answer, and
        a count must never fail (or retry) the request."""
        values = {"task": task, "absorbed": 1, "last_replayed_at": now()}
        try:
            with self._transaction() as connection:
                connection.execute(_statements(connection).count_replay, values)
        except (LedgerUnavailableError, DBAPIError) as exc:
            logger.warning("replay of %s not counted: %s", task, exc)

    def replay_counts(self) -> dict[str, int]:
        """Replays absorbed by task (mcard_replays_total)."""
        query = select(REPLAY_COUNTS.c.task, REPLAY_COUNTS.c.absorbed)
        with _unavailable(), self._reader.connect() as connection:
            return {str(row[0]): int(row[1]) for row in connection.execute(query)}

    def check(self, task: str, request_id: str, payload: Payload) -> str | None:
        """The stored outcome if this very request is recorded, None if the ID is new.

        Raises ConflictError when the ID is recorded with a different payload.
        """
        row = self._recorded(request_id)
        if row is None:
            return None
        recorded_fingerprint, _, outcome_json = row
        if recorded_fingerprint != fingerprint(task, payload):
            raise ConflictError(request_id)
        return outcome_json or None  # pending: no outcome yet

    def _recorded(self, request_id: str) -> tuple[str, str, str] | None:
        """The fingerprint, status and outcome recorded for request_id: one SELECT by key.

        This runs before every publish that names its request ID, so it skips SQLAlchemy's
        per-execution machinery (events, the statement cache, result objects), which cost four
        times the query itself on SQLite: SQLAlchemy's SQL for the dialect, on a connection of
        the engine's pool, run by the DBAPI cursor. No transaction is needed for one SELECT
        (on PostgreSQL the pool rolls back the one the driver opened, on return).
        """
        params = (request_id,) if self._check_positional else {"request_id": request_id}
        with _unavailable(self._dbapi_error):
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
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]))

    def fingerprints(self, request_ids: list[str]) -> dict[str, str]:
        """The recorded fingerprints of those request IDs the ledger holds (one query; read
        only, so on SQLite it never takes the write lock the workers wait for)."""
        query = select(OPERATIONS.c.request_id, OPERATIONS.c.fingerprint).where(
            OPERATIONS.c.request_id.in_(request_ids)
        )
        with _unavailable(), self._reader.connect() as connection:
            return {row[0]: row[1] for row in connection.execute(query)}

    def outcome(self, request_id: str) -> dict[str, Any] | None:
        """The recorded outcome object of a request ID, or None."""
        known = self._read(lambda session: session.get(Operation, request_id))
        if known is None or not known.outcome:
            return None
        return dict(json.loads(known.outcome))

    def card(self, card_id: str) -> Card | None:
        return self._read(lambda session: session.get(Card, card_id))

    def task_state(self, request_id: str) -> TaskState | None:
        return self._read(lambda session: session.get(TaskState, request_id))

    def save_task_state(
        self, request_id: str, state: str, result: str | None, traceback: str | None
    ) -> None:
        """Keep a non-final state (failure, retry) for a request that has no outcome yet.

        An upsert: two deliveries of one request (a retry due at once runs beside the run that
        scheduled it) may store a state at the same moment, and neither may fail on the key.
        """
        values = {"request_id": request_id, "state": state, "result": result}
        with self._transaction() as connection:
            connection.execute(
                _statements(connection).save_state,
                values | {"traceback": traceback, "updated_at": now()},
            )

    def count_legacy(self, task: str, key: str) -> None:
        """Count one executed legacy message of task that carried key (its own statement,
        on the legacy path only: the hot path of delay()'s messages is left as it is)."""
        values = {"task": task, "legacy_key": key, "executed": 1, "last_executed_at": now()}
        with self._transaction() as connection:
            connection.execute(_statements(connection).count_legacy, values)

    def legacy_counts(self) -> dict[str, int]:
        """Executed legacy messages by task (= queue), every key summed."""
        query = select(LEGACY_COUNTS.c.task, func.sum(LEGACY_COUNTS.c.executed)).group_by(
            LEGACY_COUNTS.c.task
        )
        with _unavailable(), self._reader.connect() as connection:
            return {str(row[0]): int(row[1]) for row in connection.execute(query)}

    @contextmanager
    def pending_events(self, limit: int) -> Iterator[PendingEvents]:
        """The oldest unpublished outcome events, at most limit; those marked in the block
        are recorded as published when it ends.

        On PostgreSQL the rows stay locked until then (SKIP LOCKED: the relays of other workers
        take other rows); SQLite has one writer, so it reads, then marks in a second
        transaction.
        """
        sqlite_ = self.engine.dialect.name == "sqlite"
        query = (
            select(OutboxEvent.request_id, OutboxEvent.routing_key, OutboxEvent.body)
            .where(OutboxEvent.published_at.is_(None))
            .order_by(OutboxEvent.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        # Marked only when the block ends normally: on an error the caller re-raises after
        # marking, and the rows it did not mark are published again (at least once).
        with self.session(readonly=sqlite_) as session:
            batch = PendingEvents([(r[0], r[1], r[2]) for r in session.execute(query)])
            yield batch
            if batch.confirmed and not sqlite_:
                self._mark_published(session, batch.confirmed)
        if batch.confirmed and sqlite_:
            with self.session() as session:
                self._mark_published(session, batch.confirmed)

    @staticmethod
    def _mark_published(session: Session, request_ids: list[str]) -> None:
        column = OUTBOX.c.request_id
        if session.get_bind().dialect.name == "postgresql":
            # One array parameter: an IN list is hundreds of placeholders to bind and parse.
            which = column == any_(bindparam("ids", request_ids, type_=postgresql.ARRAY(String)))
        else:
            which = column.in_(request_ids)
        session.execute(update(OUTBOX).where(which).values(published_at=now()))


def get_ledger(url: str, *, migrate: bool | None = None) -> Ledger:
    """The ledger of this process on the database at url.

    migrate: on first use bring the schema to head, or (False) only check it is at head
    (SchemaNotAtHeadError); None: MCARD_MIGRATE of this process's environment.
    """
    with _unavailable():
        engine = engine_for(url, migrate=migrate)
    ledger = _LEDGERS.get(engine)
    if ledger is None:
        ledger = _LEDGERS[engine] = Ledger(engine)
    return ledger


_LEDGERS: dict[Engine, Ledger] = {}
