"""``demo``: enqueue a small story of mints and burns and print each outcome."""

from __future__ import annotations

import time
from typing import Any

import click
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult

__all__ = ["COMMANDS"]


def _steps(run: str) -> list[list[tuple[str, str, dict[str, Any]]]]:
    """Phases of (task, request ID, fields); each phase waits for the one before."""
    card = f"{run}-card-".__add__
    return [
        [
            ("mint", f"{run}-r1", {"owner": "alice", "card_ids": [card("1"), card("2")]}),
            ("single_mint", f"{run}-r2", {"card_id": card("3"), "owner": "bob"}),
        ],
        [
            ("single_mint", f"{run}-r2", {"card_id": card("3"), "owner": "bob"}),  # replay
            ("single_mint", f"{run}-r3", {"card_id": card("1"), "owner": "carol"}),
            ("mint", f"{run}-r4", {"owner": "carol", "card_ids": [card("4"), card("2")]}),
            ("single_burn", f"{run}-r5", {"card_id": card("3"), "owner": "alice"}),
            ("single_burn", f"{run}-r6", {"card_id": card("1"), "owner": "alice"}),
            ("single_burn", f"{run}-r7", {"card_id": card("9"), "owner": "alice"}),
        ],
        [("single_burn", f"{run}-r8", {"card_id": card("1"), "owner": "alice"})],
    ]


def _wait(results: list[AsyncResult], timeout: float) -> list[dict[str, Any]]:
    try:
        return [result.get(timeout=timeout, interval=0.05) for result in results]
    except ResultTimeout:
        raise click.ClickException(
            f"no outcome within {timeout:.0f} s: is a worker running? Start one with"
            " `mcard-tasks worker` (same MCARD_* settings as this shell)"
        ) from None


@click.command("demo")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait per phase.")
def demo(timeout: float) -> None:
    """Enqueue mints, a replay, rejections and burns; print every outcome."""
    from mcard_tasks import tasks

    run = f"demo-{int(time.time())}"
    click.echo(f"{'request':<22} {'task':<18} {'outcome':<10} {'reason':<15} cards")
    for phase in _steps(run):
        results = [
            getattr(tasks, name).delay(request_id=rid, **fields) for name, rid, fields in phase
        ]
        for outcome in _wait(results, timeout):
            click.echo(
                f"{outcome['request_id']:<22} {outcome['task']:<18} {outcome['outcome']:<10}"
                f" {outcome['reason'] or '-':<15} {','.join(outcome['card_ids'])}"
            )


COMMANDS = [demo]
