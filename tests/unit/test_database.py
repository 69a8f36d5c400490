"""The ledger's engines and schema steps: MCARD_MIGRATE, the head check, db upgrade|check,
masked URLs and hidden statement parameters (on SQLite files: no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from mcard_tasks.cli import main
from mcard_tasks.cli.db import EXIT_NOT_AT_HEAD
from mcard_tasks.config import Settings
from mcard_tasks.database import (
    _alembic_config,
    check_schema,
    engine_for,
    head_revision,
    masked_url,
    standalone_engine,
    upgrade_schema,
)
from mcard_tasks.errors import ConfigurationError, SchemaNotAtHeadError


def test_migrate_defaults_to_true_and_reads_mcard_migrate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCARD_MIGRATE", raising=False)
    assert Settings().migrate is True
    monkeypatch.setenv("MCARD_MIGRATE", "false")
    assert Settings().migrate is False


def test_without_migrate_a_fresh_database_fails_naming_both_revisions_and_gets_no_ddl(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    with pytest.raises(SchemaNotAtHeadError) as caught:
        engine_for(url, migrate=False)
    message = str(caught.value)
    assert "no revision (never migrated)" in message
    assert f"expects revision {head_revision()} (head)" in message
    assert "mcard-tasks db upgrade" in message and "owner role" in message
    assert isinstance(caught.value, ConfigurationError)
    assert inspect(create_engine(url)).get_table_names() == []  # nothing was created
    # Migrated by the owner, the same call succeeds (a failed check is not cached).
    engine = standalone_engine(url)
    assert upgrade_schema(engine) == head_revision()
    assert engine_for(url, migrate=False).url.database == str(tmp_path / "fresh.sqlite3")


def test_an_older_revision_is_named(tmp_path: Path) -> None:
    from alembic import command

    engine = standalone_engine(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    with engine.begin() as connection:
        config = _alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
    with pytest.raises(SchemaNotAtHeadError, match="is at revision 0002, this mcard-tasks"):
        check_schema(engine)


def test_urls_are_shown_with_their_password_masked() -> None:
    shown = masked_url("postgresql://mcard_owner:s3cret@db:5432/mcard")
    assert "s3cret" not in shown and "mcard_owner:***@db" in shown


def test_a_failing_statement_carries_no_parameter_values(tmp_path: Path) -> None:
    engine = engine_for(f"sqlite:///{tmp_path / 'ledger.sqlite3'}", migrate=True)
    assert engine.hide_parameters
    with pytest.raises(SQLAlchemyError) as caught, engine.begin() as connection:
        connection.execute(
            text("INSERT INTO no_such_table (a) VALUES (:a)"), {"a": "secret-value-42"}
        )
    assert "secret-value-42" not in str(caught.value)
    assert "hidden" in str(caught.value)


def test_db_upgrade_then_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mcard_tasks import app

    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    monkeypatch.setattr(app, "settings", app.settings.model_copy(update={"database_url": url}))
    runner = CliRunner()
    before = runner.invoke(main, ["db", "check"])
    assert before.exit_code == EXIT_NOT_AT_HEAD, before.output
    assert "never migrated" in before.output
    done = runner.invoke(main, ["db", "upgrade"])
    assert done.exit_code == 0, done.output
    assert f"revision {head_revision()} (head)" in done.output
    after = runner.invoke(main, ["db", "check"])
    assert after.exit_code == 0 and head_revision() in after.output


def test_db_upgrade_failure_is_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mcard_tasks import app

    # Nothing listens on port 1: the connection is refused at once.
    url = "postgresql://mcard_owner:s3cret-pw@127.0.0.1:1/mcard"
    monkeypatch.setattr(app, "settings", app.settings.model_copy(update={"database_url": url}))
    done = CliRunner().invoke(main, ["db", "upgrade"])
    assert done.exit_code == 5, done.output
    assert "s3cret-pw" not in done.output
    assert "mcard_owner:***@127.0.0.1:1/mcard" in done.output
    assert "failed" in done.output and "[SQL" not in done.output
