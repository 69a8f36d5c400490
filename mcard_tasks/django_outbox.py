"""The thin Django adapter of the request outbox: ``delay_in(django.db.connection, ...)``
inside ``transaction.atomic()`` writes the row through Django's own cursor, so it commits or
rolls back with the block. Django is not a dependency: nothing here imports it."""

from __future__ import annotations

from typing import Any, Protocol

from mcard_tasks.errors import NoTransactionError

__all__ = ["DjangoConnection", "write_django"]


class DjangoConnection(Protocol):
    """What the adapter uses of ``django.db.connection`` (or ``connections[alias]``)."""

    in_atomic_block: bool

    def cursor(self) -> Any: ...


def write_django(connection: DjangoConnection, insert_sql: str, row: dict[str, Any]) -> None:
    """Insert row with Django's cursor, in the open atomic block (required: outside one,
    Django autocommits the row on its own, apart from the application's writes)."""
    if not connection.in_atomic_block:
        raise NoTransactionError(
            "delay_in with a Django connection needs an open transaction.atomic() block"
        )
    with connection.cursor() as cursor:
        cursor.execute(insert_sql, list(row.values()))
