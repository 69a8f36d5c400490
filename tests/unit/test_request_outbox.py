"""The request outbox without a broker: what delay_in writes, and that the relay's message is
delay()'s."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from mcard_tasks import app
from mcard_tasks.cli import main
from mcard_tasks.errors import InvalidRequestError, NoTransactionError
from mcard_tasks.messages import TaskMessages
from mcard_tasks.relay import RequestRelay, outbox_status
from mcard_tasks.request_outbox import (
    REQUEST_OUTBOX,
    create_outbox,
    outbox_engine,
    stored_message,
)
from mcard_tasks.specs import validate_payload
from mcard_tasks.tasks import mint, single_mint


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = outbox_engine(f"sqlite:///{tmp_path / 'app.sqlite3'}")
    create_outbox(engine)
    yield engine
    engine.dispose()


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(REQUEST_OUTBOX)))


def test_delay_in_writes_one_row_in_the_callers_transaction(engine: Engine) -> None:
    with engine.begin() as connection:
        result = single_mint.delay_in(connection, card_id="c1", owner="alice", request_id="r1")
    assert result.id == "r1"
    [row] = rows(engine)
    assert (row.request_id, row.task, row.relayed_at) == ("r1", "mcard.single_mint", None)
    assert json.loads(stored_message(row.message).body)[1] == {"owner": "alice", "card_id": "c1"}


def test_a_connection_without_the_callers_transaction_is_refused_and_writes_nothing(
    engine: Engine,
) -> None:
    with engine.connect() as connection, pytest.raises(NoTransactionError, match="begin"):
        single_mint.delay_in(connection, card_id="c1", owner="alice", request_id="r-none")
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as connection, pytest.raises(NoTransactionError):
        connection.begin()
        single_mint.delay_in(connection, card_id="c1", owner="alice", request_id="r-auto")
    assert rows(engine) == []


def test_a_session_works_and_its_rollback_leaves_nothing(engine: Engine) -> None:
    with Session(engine) as session:
        generated = mint.apply_in(session, kwargs={"card_ids": ["a", "b"], "owner": "bob"})
        session.rollback()
    assert len(generated.id) == 36  # a new UUID, as delay() gives
    assert rows(engine) == []


@pytest.mark.parametrize(
    ("fields", "task_id"),
    [
        ({"card_id": "c", "owner": ""}, None),
        ({"card_id": "c", "owner": "o", "colour": "red"}, None),
        ({"card_id": "c", "owner": "o", "request_id": "a"}, "b"),
        ({"card_id": "c", "owner": "o", "request_id": 7}, None),
    ],
)
def test_invalid_requests_raise_before_anything_is_written(
    engine: Engine, fields: dict[str, object], task_id: str | None
) -> None:
    with engine.begin() as connection, pytest.raises(InvalidRequestError):
        single_mint.apply_in(connection, kwargs=fields, task_id=task_id)
    assert rows(engine) == []


def test_the_relayed_message_is_the_one_delay_publishes(engine: Engine) -> None:
    fields = {"card_id": "c9", "owner": "zoe", "metadata": {"b": 1, "a": [2], "name": "zoë"}}
    with engine.begin() as connection:
        single_mint.delay_in(connection, request_id="r9", **fields)
    [row] = rows(engine)
    direct = TaskMessages(app).build(
        task="mcard.single_mint",
        request_id="r9",
        payload=validate_payload("mcard.single_mint", fields),
    )
    relayed = stored_message(row.message)
    assert relayed.body == direct.body
    # Through JSON a tuple (timelimit) comes back a list; AMQP tables encode both as arrays.
    assert relayed.headers == json.loads(json.dumps(direct.headers))
    assert (relayed.exchange, relayed.routing_key) == (direct.exchange, direct.routing_key)
    assert relayed.properties == direct.properties


def test_relay_init_is_idempotent_and_status_shows_the_pending(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    runner = CliRunner()
    for _ in range(2):
        done = runner.invoke(main, ["relay", "init", "--database", url])
        assert done.exit_code == 0, done.output
    engine = outbox_engine(url)
    with engine.begin() as connection:
        single_mint.delay_in(connection, card_id="c", owner="o")
    assert outbox_status(engine).pending == 1
    shown = runner.invoke(main, ["relay", "status", "--database", url])
    assert shown.exit_code == 0, shown.output
    assert "pending     1" in shown.output and "oldest age  " in shown.output
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(REQUEST_OUTBOX)).scalar() == 1
    engine.dispose()


def test_relayed_rows_are_removed_after_the_retention_and_pending_ones_never(
    engine: Engine,
) -> None:
    with engine.begin() as connection:
        for i in range(3):
            single_mint.delay_in(connection, card_id=f"c{i}", owner="o", request_id=f"r{i}")
        # r0 relayed two hours ago, r1 just now, r2 still pending.
        marks = {"r0": time.time() - 7200, "r1": time.time()}
        for request_id, at in marks.items():
            connection.execute(
                update(REQUEST_OUTBOX)
                .where(REQUEST_OUTBOX.c.request_id == request_id)
                .values(relayed_at=at)
            )
    relay = RequestRelay(app, engine, app.settings.model_copy(update={"relay_retention": 3600}))
    assert relay.purge() == 1
    assert sorted(row.request_id for row in rows(engine)) == ["r1", "r2"]
    status = outbox_status(engine)
    assert (status.pending, status.relayed) == (1, 1)
    assert status.oldest_age is not None and 0 <= status.oldest_age < 60
