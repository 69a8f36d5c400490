"""A fourth task kind for the tests: a card's holder gives it to another owner.

Defined here without registering it: tests/transfer_plugin.py registers it (for MCARD_SPECS),
the unit tests register it for one test at a time.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict
from sqlalchemy import Connection, update

from mcard_tasks.issuers import Issuer
from mcard_tasks.models import Card
from mcard_tasks.payloads import Ident, Payload
from mcard_tasks.rules import Verdict
from mcard_tasks.specs import TaskSpec

TRANSFER = "mcard.single_transfer"


class TransferRequest(Payload):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    card_id: Ident
    new_owner: Ident


def transfer_card(
    connection: Connection, request_id: str, payload: TransferRequest, status: str
) -> Verdict:
    moved = connection.execute(
        update(Card)
        .where(
            Card.card_id == payload.card_id, Card.owner == payload.owner, Card.status == "active"
        )
        .values(owner=payload.new_owner)
    ).rowcount
    return Verdict() if moved else Verdict("not_holder", f"{payload.card_id} is not theirs")


def no_issuer_call(issuer: Issuer, request_id: str, payload: Any) -> None:
    return None


#: Positional, in TaskSpec's field order: name, payload, rule, cards, issue, pending and final
#: status, command, doc.
SPEC = TaskSpec(
    TRANSFER,
    TransferRequest,
    transfer_card,
    lambda payload: [payload.card_id],
    no_issuer_call,
    "active",
    "active",
    "transfer",
    "Give a card its owner holds to another owner.",
)
