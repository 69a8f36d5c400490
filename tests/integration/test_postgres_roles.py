"""Least-privilege PostgreSQL: deploy/postgres-roles.sql, `mcard-tasks db upgrade` as the
owner, a real worker as the worker role and producers as the producer role, MCARD_MIGRATE=false.

Roles are cluster-wide and other test processes share the server: every role and database
here has this module's own suffix, made by the roles file's psql variables, and is dropped at
the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import errors as pg_errors

from mcard_tasks.database import head_revision
from mcard_tasks.errors import ConflictError, SchemaNotAtHeadError
from mcard_tasks.ledger import get_ledger
from mcard_tasks.tasks import single_mint
from tests.fixtures import (
    CONSOLE_SCRIPT,
    PG_ADMIN_URL,
    ROOT,
    Worker,
    change_settings,
    wait_for,
)

pytestmark = pytest.mark.integration

ROLES_SQL = ROOT / "deploy" / "postgres-roles.sql"
SERVER = PG_ADMIN_URL.rsplit("/", 1)[0].split("://", 1)[1].split("@", 1)[1]  # host:port


@dataclass
class RolesDatabase:
    name: str
    owner: str
    worker: str
    producer: str
    passwords: dict[str, str]

    def url(self, role: str) -> str:
        return f"postgresql://{role}:{self.passwords[role]}@{SERVER}/{self.name}"

    @property
    def admin_url(self) -> str:
        return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{self.name}"

    def apply_roles(self) -> str:
        done = subprocess.run(
            [
                "psql",
                "-X",
                "-q",
                "-d",
                self.admin_url,
                "-v",
                f"owner_role={self.owner}",
                "-v",
                f"worker_role={self.worker}",
                "-v",
                f"producer_role={self.producer}",
                "-f",
                str(ROLES_SQL),
            ],
            # The passwords in the environment: never on psql's command line.
            env=dict(
                os.environ,
                **{_var(role): password for role, password in self.passwords.items()},
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def admin(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            cursor = connection.execute(sql, params or None)
            return cursor.fetchall() if cursor.description else []


def _var(role: str) -> str:
    """The environment variable of role's password: MCARD_DATABASE_PASSWORD_OWNER, ..."""
    return "MCARD_DATABASE_PASSWORD_" + role.split("_")[1].upper()


def _admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(sql)


def _dispose(name: str) -> None:
    from mcard_tasks.database import _ENGINES

    for (_, url), engine in list(_ENGINES.items()):
        if f"/{name}" in url:
            engine.dispose()


def db_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE_SCRIPT), "db", *args],
        env=dict(os.environ, MCARD_DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def roles_db() -> Iterator[RolesDatabase]:
    """A private database with the roles file applied (roles of this module's own names),
    migrated by `mcard-tasks db upgrade` as the owner, the roles file applied again."""
    if shutil.which("psql") is None:
        pytest.skip("psql is needed to apply deploy/postgres-roles.sql")
    suffix = uuid.uuid4().hex[:10]
    roles = [f"mcard_{kind}_{suffix}" for kind in ("owner", "worker", "producer")]
    db = RolesDatabase(
        name=f"mcard_roles_{suffix}",
        owner=roles[0],
        worker=roles[1],
        producer=roles[2],
        passwords={role: f"pw-{uuid.uuid4().hex}" for role in roles},
    )
    _admin(f'CREATE DATABASE "{db.name}"')
    try:
        first = db.apply_roles()
        assert "not migrated yet" in first
        done = db_cli(db.url(db.owner), "upgrade")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"revision {head_revision()} (head)" in done.stdout
        assert db.passwords[db.owner] not in done.stdout + done.stderr
        assert "***" in done.stdout
        assert "grants applied on the migrated ledger" in db.apply_roles()
        # Each role got its password from the environment (the server here trusts local
        # logins, so the hash is what shows it).
        for role in roles:
            [(hashed,)] = db.admin("SELECT rolpassword FROM pg_authid WHERE rolname = %s", role)
            assert isinstance(hashed, str) and hashed.startswith("SCRAM-SHA-256$"), role
        yield db
    finally:
        _dispose(db.name)
        _admin(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
        for role in roles:
            _admin(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture
def empty_db() -> Iterator[str]:
    """An un-migrated database (no tables at all), its admin URL; dropped at the end."""
    name = f"mcard_unmigrated_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        _dispose(name)
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_worker_as_the_worker_role_mints_end_to_end_without_ddl(
    roles_db: RolesDatabase,
    make_worker: Callable[..., Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = make_worker(roles_db.url(roles_db.worker), "roles", migrate="false").start()
    # This process produces and reads results as the producer role (SELECT only).
    change_settings(monkeypatch, database_url=roles_db.url(roles_db.producer), migrate=False)
    request_id, card_id = f"r-{uuid.uuid4().hex}", f"c-{uuid.uuid4().hex}"
    result = single_mint.delay(card_id=card_id, owner="alice", request_id=request_id)
    outcome = result.get(timeout=30, interval=0.05)
    assert outcome["outcome"] == "succeeded" and outcome["request_id"] == request_id
    assert roles_db.admin("SELECT owner FROM cards WHERE card_id = %s", card_id) == [("alice",)]
    # The worker's event relay (same role) published the outcome event and marked it.
    wait_for(
        lambda: roles_db.admin(
            "SELECT 1 FROM outbox WHERE request_id = %s AND published_at IS NOT NULL", request_id
        ),
        20,
        "the outcome event to be published",
    )
    # The producer's conflict check reads the ledger as the producer role: a reuse of the
    # request ID with another payload is refused before publishing; a replay is not.
    with pytest.raises(ConflictError, match="conflict"):
        single_mint.delay(card_id=f"c-{uuid.uuid4().hex}", owner="alice", request_id=request_id)
    ledger = get_ledger(roles_db.url(roles_db.producer), migrate=False)
    assert ledger.fingerprints([request_id]).keys() == {request_id}
    replay = single_mint.delay(card_id=card_id, owner="alice", request_id=request_id)
    assert replay.get(timeout=30, interval=0.05) == outcome
    assert worker.stop() == 0
    assert "Unrecoverable" not in worker.log.read_text()


@pytest.mark.parametrize("role", ["worker", "producer"])
def test_the_worker_and_producer_roles_cannot_change_the_schema(
    roles_db: RolesDatabase, role: str
) -> None:
    with psycopg.connect(roles_db.url(getattr(roles_db, role)), autocommit=True) as connection:
        for ddl in (
            "CREATE TABLE sneaky (a int)",
            "CREATE TEMPORARY TABLE sneaky (a int)",
            "ALTER TABLE cards ADD COLUMN sneaky int",
            "DROP TABLE outbox",
            "UPDATE alembic_version SET version_num = 'x'",
        ):
            with pytest.raises(pg_errors.InsufficientPrivilege):
                connection.execute(ddl)
        if role == "producer":  # and writes nothing
            with pytest.raises(pg_errors.InsufficientPrivilege):
                connection.execute("DELETE FROM operations")
            with pytest.raises(pg_errors.InsufficientPrivilege):
                connection.execute("SELECT * FROM cards")


def test_without_migrate_an_unmigrated_ledger_stops_the_worker_and_producers_clearly(
    empty_db: str,
    make_worker: Callable[..., Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As a superuser, which could run DDL: MCARD_MIGRATE=false alone must keep it from doing so.
    worker = make_worker(empty_db, "unmigrated", migrate="false").launch()
    assert worker.process is not None
    code = worker.process.wait(60)
    log = worker.log.read_text()
    assert code != 0, log
    assert "no revision (never migrated)" in log, log[-3000:]
    assert f"expects revision {head_revision()} (head)" in log
    assert "mcard-tasks db upgrade" in log
    change_settings(monkeypatch, database_url=empty_db, migrate=False)
    # A request ID of its own: the producer's conflict check opens the ledger (and refuses
    # before anything is published).
    with pytest.raises(SchemaNotAtHeadError, match="mcard-tasks db upgrade"):
        single_mint.delay(card_id="c-1", owner="alice", request_id=f"r-{uuid.uuid4().hex}")
    checked = db_cli(empty_db, "check")
    assert checked.returncode == 7 and "never migrated" in checked.stderr
    with psycopg.connect(empty_db, autocommit=True) as connection:
        tables = connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    assert tables == [], "MCARD_MIGRATE=false ran DDL"


def test_a_failing_statements_stored_state_and_log_carry_no_parameter_values(
    roles_db: RolesDatabase,
    make_worker: Callable[..., Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A statement the server fails (a trigger raises a serialization failure, a transient
    error) is retried; its error text, kept as the request's RETRY state and logged, names no
    value of the request."""
    secret = f"secret-owner-{uuid.uuid4().hex}"
    roles_db.admin(
        "CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = 'injected failure'; END $$"
    )
    roles_db.admin(
        "CREATE TRIGGER fail_insert BEFORE INSERT ON cards FOR EACH ROW"
        f" WHEN (NEW.owner = '{secret}') EXECUTE FUNCTION fail_insert()"
    )
    # Without Celery's line per success, which logs the outcome (the owner is in it).
    worker = make_worker(
        roles_db.url(roles_db.worker), "hidden", migrate="false", log_tasks="false"
    ).start()
    try:
        change_settings(monkeypatch, database_url=roles_db.url(roles_db.producer), migrate=False)
        request_id, card_id = f"r-{uuid.uuid4().hex}", f"c-{uuid.uuid4().hex}"
        result = single_mint.delay(card_id=card_id, owner=secret, request_id=request_id)
        rows = wait_for(
            lambda: roles_db.admin(
                "SELECT state, result, traceback FROM task_states WHERE request_id = %s",
                request_id,
            ),
            30,
            "the request's retry state",
        )
        state, stored, traceback = rows[0]
        assert state == "RETRY"
        text = f"{stored}\n{traceback}"
        assert "injected failure" in text  # the error is there...
        assert "hidden" in text  # ...with SQLAlchemy's placeholder for its parameters
        assert secret not in text and card_id not in text
        assert json.loads(str(stored))  # the stored exception, as JSON
    finally:
        roles_db.admin("DROP TRIGGER fail_insert ON cards")
        roles_db.admin("DROP FUNCTION fail_insert()")
    # The retry now succeeds: nothing of this test is left on the session's queues.
    assert result.get(timeout=60, interval=0.1)["outcome"] == "succeeded"
    assert worker.stop() == 0
    log = worker.log.read_text()
    assert "injected failure" in log
    assert secret not in log
