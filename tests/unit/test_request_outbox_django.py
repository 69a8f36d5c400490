"""The Django adapter: delay_in(django.db.connection) inside transaction.atomic(), with a
minimal settings module (one SQLite database), no broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from mcard_tasks.errors import NoTransactionError
from mcard_tasks.request_outbox import REQUEST_OUTBOX, create_outbox, outbox_engine
from mcard_tasks.tasks import single_mint

django = pytest.importorskip("django")


class Rollback(Exception):
    pass


@pytest.fixture(scope="module")
def django_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Django configured on an SQLite file with the outbox table; its SQLAlchemy URL."""
    from django.conf import settings

    path = tmp_path_factory.mktemp("django") / "app.sqlite3"
    url = f"sqlite:///{path}"
    create_outbox(outbox_engine(url))
    if not settings.configured:
        settings.configure(
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)}},
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()
    yield url


def request_ids(url: str) -> list[str]:
    with outbox_engine(url).connect() as connection:
        return list(connection.execute(select(REQUEST_OUTBOX.c.request_id)).scalars())


def test_commits_and_rolls_back_with_the_atomic_block(django_db: str) -> None:
    from django.db import connection, transaction

    with transaction.atomic():
        result = single_mint.delay_in(connection, card_id="c1", owner="o", request_id="dj-1")
    with pytest.raises(Rollback), transaction.atomic():
        single_mint.delay_in(connection, card_id="c2", owner="o", request_id="dj-2")
        raise Rollback
    assert result.id == "dj-1"
    assert request_ids(django_db) == ["dj-1"]


def test_outside_an_atomic_block_it_refuses_and_writes_nothing(django_db: str) -> None:
    from django.db import connection

    with pytest.raises(NoTransactionError):
        single_mint.delay_in(connection, card_id="c3", owner="o", request_id="dj-3")
    assert "dj-3" not in request_ids(django_db)
