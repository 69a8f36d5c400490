"""``queues`` and ``health``: what an operator or a probe asks first."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import click

from mcard_tasks.cli import EXIT_BROKER, EXIT_LEDGER, EXIT_OTHER

__all__ = ["COMMANDS"]


def _unacked(app: Any, timeout: float) -> Counter[str]:
    """Messages the workers hold (running or prefetched), by queue, as the workers report."""
    held: Counter[str] = Counter()
    inspect = app.control.inspect(timeout=timeout)
    for report in (inspect.active() or {}, inspect.reserved() or {}):
        for tasks in report.values():
            for task in tasks:
                held[str((task.get("delivery_info") or {}).get("routing_key", "?"))] += 1
    return held


def _legacy_counts(app: Any) -> dict[str, int] | None:
    """Executed legacy messages by queue, from the ledger; None if it cannot be read (the
    broker's numbers are shown anyway)."""
    from mcard_tasks.ledger import get_ledger

    try:
        return get_ledger(app.settings.database_url, migrate=app.settings.migrate).legacy_counts()
    except Exception:  # any ledger trouble (down, no table yet, a bad URL): shown as "?"
        return None


@click.command("queues")
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for workers.")
def queues(timeout: float) -> None:
    """Ready and unacked messages of every task and dead-letter queue (no management plugin),
    and the legacy messages each task queue executed (ledger; '?' if it cannot be read)."""
    from mcard_tasks import app
    from mcard_tasks.admin import queue_depths

    depths = queue_depths(app)
    held = _unacked(app, timeout)
    legacy = _legacy_counts(app)
    click.echo(f"{'queue':<28} {'ready':>8} {'unacked':>8} {'consumers':>9} {'legacy':>8}")
    for depth in depths:
        ready = "missing" if depth.ready < 0 else str(depth.ready)
        dlq = depth.name.endswith(".dlq")
        unacked = "-" if dlq else str(held.get(depth.name, 0))
        executed = "-" if dlq else "?" if legacy is None else str(legacy.get(depth.name, 0))
        click.echo(f"{depth.name:<28} {ready:>8} {unacked:>8} {depth.consumers:>9} {executed:>8}")


def _check(name: str, probe: Any) -> bool:
    try:
        detail = probe()
    except Exception as exc:  # a probe reports every failure as a line, not a traceback
        click.echo(f"{name:<8} FAIL  {exc}")
        return False
    click.echo(f"{name:<8} ok    {detail}")
    return True


@click.command("health")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for a worker.")
def health(timeout: float) -> None:
    """Check broker, ledger and workers; exit 0 only when all three answer (for probes).

    Otherwise the first part that failed names the exit code: 4 the broker, 5 the ledger,
    1 no worker answered.
    """
    from sqlalchemy import text

    from mcard_tasks import app
    from mcard_tasks.ledger import get_ledger
    from mcard_tasks.tls import tls_failure

    def broker() -> str:
        with app.connection_for_write() as connection:
            try:
                connection.ensure_connection(max_retries=1, timeout=timeout)
            except Exception as exc:  # a failed TLS verification is named as such
                reason = tls_failure(exc, app.settings)
                if reason is None:
                    raise
                raise RuntimeError(reason) from exc
            return str(connection.as_uri())

    def ledger() -> str:
        engine = get_ledger(app.settings.database_url, migrate=app.settings.migrate).engine
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return engine.url.render_as_string(hide_password=True)

    def workers() -> str:
        answers = app.control.ping(timeout=timeout)
        if not answers:
            raise RuntimeError(
                f"no worker answered within {timeout:.0f} s; start `mcard-tasks worker`"
            )
        return ", ".join(sorted(name for answer in answers for name in answer))

    broker_ok, ledger_ok = _check("broker", broker), _check("ledger", ledger)
    workers_ok = broker_ok and _check("workers", workers)
    # The first failing part names the exit code: 4 broker, 5 ledger, 1 no worker.
    sys.exit(
        0
        if workers_ok and ledger_ok
        else EXIT_BROKER
        if not broker_ok
        else EXIT_LEDGER
        if not ledger_ok
        else EXIT_OTHER
    )


COMMANDS = [queues, health]
