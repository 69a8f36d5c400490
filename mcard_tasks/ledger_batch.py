"""Many requests of one kind applied to the ledger together: the worker's batches.

The success path only, in one transaction of a few multi-row statements: the effects (the
spec's batch_effect), the claims of the request IDs carrying their outcomes, and their outcome
events. Every request still claims its own ID with its own outcome and event, exactly as
``Ledger.apply`` records it, so a replay later finds the same bytes. What this path does not
decide is left out of its answer, untouched, for ``Ledger.apply`` one request at a time: a
request ID recorded already (a replay, a conflict, a pending issuer call), a second request of
the batch for the same ID or card, an effect that does not apply (a rejection, which names its
reason there), and every request of a batch that failed as a whole (a lost race on a claim,
an issuer's transient error, the database unavailable).

With an external issuer that takes batches, the cards are reserved and the claims recorded
as pending in one transaction, the issuer is asked once for all of them (each request ID its
own idempotency key), and the outcomes are recorded in a second transaction: a crash in
between leaves pending claims that ``Ledger.apply`` resolves by asking again.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from time import perf_counter
from typing import Any

from sqlalchemy import Connection, TextClause, insert, select, text
from sqlalchemy.exc import IntegrityError

from mcard_tasks.issuers import Issuer, LedgerIssuer
from mcard_tasks.ledger import (
    OPERATIONS,
    OUTBOX,
    Ledger,
    _outcome_json,
    _statements,
    _unavailable,
    event_routing_key,
)
from mcard_tasks.payloads import Payload, fingerprint
from mcard_tasks.rules import Verdict, now
from mcard_tasks.specs import TaskSpec, spec_for
from mcard_tasks.timings import ISSUER_CALL, LEDGER_APPLY, observe

__all__ = ["apply_batch"]

logger = logging.getLogger(__name__)

#: A batch that loses a race on a claim (another worker claimed one of its IDs meanwhile) is
#: rolled back and tried again without the IDs now recorded; bounded.
_ATTEMPTS = 3

Requests = list[tuple[str, Payload]]


def apply_batch(
    ledger: Ledger, task: str, requests: Requests, issuer: Issuer | None = None
) -> dict[str, str]:
    """Apply the new requests among requests together; their outcome JSON by request ID.

    Requests left out of the answer are untouched: apply each with ``Ledger.apply``.
    Raises LedgerUnavailableError when the database cannot be reached, and the issuer's
    TransientError as is (nothing of the batch is final then).
    """
    spec, issuer = spec_for(task), issuer or LedgerIssuer()
    if not spec.batches_with(issuer):
        return {}
    distinct = _distinct(spec, requests)
    started, outcomes = perf_counter(), {}
    calls: list[float] = []
    try:
        for _ in range(_ATTEMPTS):
            try:
                if issuer.external:
                    outcomes = _apply_issued(ledger, spec, distinct, issuer, calls)
                else:
                    outcomes = _apply_final(ledger, spec, distinct)
                break
            except IntegrityError:
                continue  # a claim raced another worker's: its ID is recorded now, left out
    finally:
        # The worker's histograms (MCARD_METRICS_DIR): each request decided here took the
        # batch's ledger time; the issuer was called once for all of them.
        spent = perf_counter() - started - sum(calls)
        for _ in outcomes:
            observe(LEDGER_APPLY, spec.name, spent)
        for called in calls:
            observe(ISSUER_CALL, spec.name, called)
    return outcomes


def _distinct(spec: TaskSpec, requests: Requests) -> Requests:
    """The first request of each request ID, unless an earlier request took one of its
    cards: the others wait for the per-request path (after this batch commits, a replay, a
    conflict, or a card taken). Only ever the first of an ID: the batcher takes a decided ID
    as its first message's (mcard_tasks.batches)."""
    ids: set[str] = set()
    cards: set[str] = set()
    chosen = []
    for request_id, payload in requests:
        if request_id in ids:
            continue
        ids.add(request_id)
        touched = spec.cards(payload)
        if cards.intersection(touched):
            continue
        cards.update(touched)
        chosen.append((request_id, payload))
    return chosen


@contextmanager
def _transaction(ledger: Ledger) -> Iterator[Connection]:
    with _unavailable(), ledger.engine.begin() as connection:
        yield connection


def _new(connection: Connection, requests: Requests) -> Requests:
    """Those of requests whose ID the ledger has not recorded (one query)."""
    query = select(OPERATIONS.c.request_id).where(
        OPERATIONS.c.request_id.in_([request_id for request_id, _ in requests])
    )
    known = set(connection.execute(query).scalars())
    return [(request_id, payload) for request_id, payload in requests if request_id not in known]


def _effects(
    connection: Connection, spec: TaskSpec, requests: Requests, status: str, at: datetime
) -> Requests:
    """The new requests whose effect the spec's batch effect applied (with card status)."""
    fresh = _new(connection, requests)
    if not fresh:
        return []
    assert spec.batch_effect is not None
    applied = spec.batch_effect(connection, fresh, status, at)
    return [(request_id, payload) for request_id, payload in fresh if request_id in applied]


def _claims(spec: TaskSpec, requests: Requests, outcomes: dict[str, str], at: datetime) -> Any:
    return [
        {
            "request_id": request_id,
            "task": spec.name,
            "fingerprint": fingerprint(spec.name, payload),
            "status": "succeeded" if outcomes else "pending",
            "outcome": outcomes.get(request_id, ""),
            "recorded_at": at,
        }
        for request_id, payload in requests
    ]


def _events(connection: Connection, spec: TaskSpec, outcomes: dict[str, str], at: datetime) -> None:
    routing_key = event_routing_key(spec.name, Verdict().status)
    connection.execute(
        insert(OUTBOX),
        [
            {"request_id": rid, "routing_key": routing_key, "body": body, "created_at": at}
            for rid, body in outcomes.items()
        ],
    )


def _succeeded(spec: TaskSpec, requests: Requests, at: datetime) -> dict[str, str]:
    return {
        request_id: _outcome_json(spec, request_id, payload, Verdict(), at)
        for request_id, payload in requests
    }


# PostgreSQL, the ledger as issuer: a whole batch's success in ONE statement in autocommit
# (atomic on its own), like Ledger.apply's one-statement path: the batch's requests as one
# JSON array of rows (one parameter: encoded by the json module, not element by element as
# arrays are), those whose ID is not recorded, the spec's effect, the claims carrying the
# outcomes of the requests it applied, and their events. A request ID claimed meanwhile by
# another worker fails it on the operations key: nothing is committed, and the statements
# below decide instead.
_RECORD_BATCH = """
    WITH input AS (
        SELECT {columns} FROM json_to_recordset(CAST(:rows AS json)) AS t({names})
        WHERE NOT EXISTS (SELECT 1 FROM operations o WHERE o.request_id = t.request_id)
    ),
    effect AS ({effect}),
    claim AS (
        INSERT INTO operations (request_id, task, fingerprint, status, outcome, recorded_at)
        SELECT input.request_id, :task, input.fingerprint, 'succeeded', input.outcome,
               :recorded_at
        FROM input JOIN effect ON effect.request_id = input.request_id
        RETURNING request_id, outcome
    )
    INSERT INTO outbox (request_id, routing_key, body, created_at)
    SELECT request_id, :routing_key, outcome, :recorded_at FROM claim
    RETURNING request_id
"""


def _fields(spec: TaskSpec) -> list[str]:
    return ["request_id", "fingerprint", "outcome", *spec.payload.model_fields]


@functools.cache
def _fast_batch(spec: TaskSpec) -> TextClause:
    names = _fields(spec)
    return text(
        _RECORD_BATCH.format(
            columns=", ".join(
                f"CAST(t.{name} AS json) AS {name}" if name in spec.json_fields else f"t.{name}"
                for name in names
            ),
            # Every field as text, as the row-by-row path binds it (a JSON field: its text).
            names=", ".join(f"{name} text" for name in names),
            effect=spec.fast_batch_effect,
        )
    )


def _record_batch(ledger: Ledger, spec: TaskSpec, requests: Requests) -> dict[str, str]:
    at = now()
    outcomes = _succeeded(spec, requests, at)
    rows: list[dict[str, Any]] = []
    for request_id, payload in requests:
        values = payload.model_dump(mode="json")
        for name in spec.json_fields:
            values[name] = json.dumps(values[name])
        values["request_id"] = request_id
        values["fingerprint"] = fingerprint(spec.name, payload)
        values["outcome"] = outcomes[request_id]
        rows.append(values)
    parameters = {
        "rows": json.dumps(rows),
        "task": spec.name,
        "recorded_at": at,
        "routing_key": event_routing_key(spec.name, Verdict().status),
    }
    assert ledger._autocommit is not None
    with _unavailable(), ledger._autocommit.connect() as connection:
        done = set(connection.execute(_fast_batch(spec), parameters).scalars())
    return {request_id: outcomes[request_id] for request_id in done}


def _apply_final(ledger: Ledger, spec: TaskSpec, requests: Requests) -> dict[str, str]:
    """The ledger as issuer: effects, claims and events in one transaction."""
    if ledger._autocommit is not None and spec.fast_batch_effect:
        try:
            return _record_batch(ledger, spec, requests)
        except IntegrityError:
            pass  # a claim raced another worker's: nothing committed; decided below
    at = now()
    with _transaction(ledger) as connection:
        applied = _effects(connection, spec, requests, spec.final_status, at)
        if not applied:
            return {}
        outcomes = _succeeded(spec, applied, at)
        # A plain INSERT: an ID claimed meanwhile fails the batch (IntegrityError), rolled back.
        connection.execute(insert(OPERATIONS), _claims(spec, applied, outcomes, at))
        _events(connection, spec, outcomes, at)
    return outcomes


def _apply_issued(
    ledger: Ledger, spec: TaskSpec, requests: Requests, issuer: Issuer, calls: list[float]
) -> dict[str, str]:
    """An external issuer that takes batches: reserve and claim as pending, ask it once, then
    complete every request it did (unless another delivery completed one meanwhile)."""
    at = now()
    with _transaction(ledger) as connection:
        reserved = _effects(connection, spec, requests, spec.pending_status, at)
        if not reserved:
            return {}
        connection.execute(insert(OPERATIONS), _claims(spec, reserved, {}, at))
    assert spec.issue_batch is not None
    call = perf_counter()
    try:
        spec.issue_batch(issuer, reserved)
    finally:
        calls.append(perf_counter() - call)
    at = now()
    outcomes = _succeeded(spec, reserved, at)
    with _transaction(ledger) as connection:
        # Those still pending (locked on PostgreSQL; SQLite's write lock is held already):
        # another delivery of a request may have completed it meanwhile.
        pending = select(OPERATIONS.c.request_id).where(
            OPERATIONS.c.request_id.in_(list(outcomes)), OPERATIONS.c.status == "pending"
        )
        still = set(connection.execute(pending.with_for_update()).scalars())
        done = {rid: outcome for rid, outcome in outcomes.items() if rid in still}
        if not done:
            return {}
        statements = _statements(connection)
        connection.execute(
            statements.complete_each,
            [
                {"the_request": rid, "status": "succeeded", "outcome": body, "recorded_at": at}
                for rid, body in done.items()
            ],
        )
        cards = [card for rid, payload in reserved if rid in done for card in spec.cards(payload)]
        connection.execute(
            statements.finalize_cards, {"card_ids": cards, "status": spec.final_status}
        )
        _events(connection, spec, done, at)
    return done
