"""Enqueue commands: one per request kind."""

from __future__ import annotations

import json
from typing import Any

import click

from mcard_tasks.errors import InvalidRequestError

__all__ = ["COMMANDS"]


def _metadata(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError([f"metadata: must be JSON ({exc.msg})"]) from None
    return parsed  # type: ignore[no-any-return]


def _send(task_name: str, request_id: str | None, wait: float | None, **fields: Any) -> None:
    from mcard_tasks import tasks

    task = getattr(tasks, task_name)
    result = task.delay(request_id=request_id, **{k: v for k, v in fields.items() if v is not None})
    click.echo(f"queued {task.name} request_id={result.id}")
    if wait:
        click.echo(json.dumps(result.get(timeout=wait, interval=0.1), sort_keys=True))


request_id_option = click.option("--request-id", help="Idempotency key; a new UUID when omitted.")
wait_option = click.option(
    "--wait",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Wait this long for the outcome and print it.",
)


@click.command("single-mint")
@click.option("--card-id", required=True)
@click.option("--owner", required=True)
@click.option("--metadata", help="A JSON object stored with the card.")
@request_id_option
@wait_option
def single_mint(
    card_id: str, owner: str, metadata: str | None, request_id: str | None, wait: float | None
) -> None:
    """Enqueue the minting of one card."""
    _send(
        "single_mint", request_id, wait, card_id=card_id, owner=owner, metadata=_metadata(metadata)
    )


@click.command("mint")
@click.option("--owner", required=True)
@click.option("--card-id", "card_ids", multiple=True, required=True, help="Repeat per card.")
@click.option("--metadata", help="A JSON object stored with each card.")
@request_id_option
@wait_option
def mint(
    owner: str,
    card_ids: tuple[str, ...],
    metadata: str | None,
    request_id: str | None,
    wait: float | None,
) -> None:
    """Enqueue the minting of a batch of cards, all or nothing."""
    _send(
        "mint", request_id, wait, owner=owner, card_ids=list(card_ids), metadata=_metadata(metadata)
    )


@click.command("burn")
@click.option("--card-id", required=True)
@click.option("--owner", required=True)
@request_id_option
@wait_option
def burn(card_id: str, owner: str, request_id: str | None, wait: float | None) -> None:
    """Enqueue the burning of a card held by owner."""
    _send("single_burn", request_id, wait, card_id=card_id, owner=owner)


COMMANDS = [single_mint, mint, burn]
