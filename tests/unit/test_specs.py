"""A task kind lives in one spec: registering a fourth kind is all it takes for it to be
routed, validated, applied by the ledger with its outcome event, and listed by the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from mcard_tasks import app
from mcard_tasks.application import create_app
from mcard_tasks.cli import main
from mcard_tasks.cli.enqueue import enqueue_command
from mcard_tasks.config import Settings
from mcard_tasks.errors import InvalidRequestError
from mcard_tasks.ledger import Ledger
from mcard_tasks.models import OutboxEvent
from mcard_tasks.specs import SPECS, TaskSpec, register, spec_for, validate_payload
from mcard_tasks.tasks import task_for
from mcard_tasks.topology import build_topology
from tests.transfer_kind import SPEC, TRANSFER, TransferRequest


@pytest.fixture
def transfer() -> Iterator[TaskSpec]:
    """The fourth kind, registered for one test and removed after it."""
    yield register(SPEC)
    del SPECS[TRANSFER]


def test_a_registered_kind_is_routed_to_a_queue_of_its_own_with_a_dead_letter_queue(
    transfer: TaskSpec,
) -> None:
    other = create_app(Settings())
    assert task_for(other, transfer).name == TRANSFER
    assert other.tasks[TRANSFER].spec is transfer
    assert other.amqp.router.route({}, TRANSFER)["queue"].name == TRANSFER
    topology = build_topology(Settings())
    queue = topology.queue(TRANSFER)
    assert queue.routing_key == TRANSFER
    assert topology.queue(f"{TRANSFER}.dlq").routing_key == TRANSFER
    assert queue.queue_arguments["x-dead-letter-routing-key"] == TRANSFER


def test_a_registered_kind_is_validated_like_the_others(transfer: TaskSpec) -> None:
    payload = validate_payload(TRANSFER, {"card_id": "c", "owner": "a", "new_owner": "b"})
    assert payload == TransferRequest(card_id="c", owner="a", new_owner="b")
    with pytest.raises(InvalidRequestError, match=r"new_owner: is required"):
        validate_payload(TRANSFER, {"card_id": "c", "owner": "a"})
    with pytest.raises(InvalidRequestError, match=r"new_owner: must be 1 to 128"):
        validate_payload(TRANSFER, {"card_id": "c", "owner": "a", "new_owner": "b c"})


def test_a_registered_kind_is_applied_once_with_its_outcome_and_event(
    transfer: TaskSpec, fresh_ledger: Ledger
) -> None:
    fresh_ledger.apply(
        "mcard.single_mint",
        "m1",
        validate_payload("mcard.single_mint", {"card_id": "c1", "owner": "alice"}),
    )
    payload = validate_payload(TRANSFER, {"card_id": "c1", "owner": "alice", "new_owner": "bob"})
    first = fresh_ledger.apply(TRANSFER, "t1", payload)
    assert json.loads(first)["outcome"] == "succeeded"
    assert fresh_ledger.apply(TRANSFER, "t1", payload) == first  # a replay
    card = fresh_ledger.card("c1")
    assert card is not None and card.owner == "bob"
    again = validate_payload(TRANSFER, {"card_id": "c1", "owner": "alice", "new_owner": "carol"})
    assert json.loads(fresh_ledger.apply(TRANSFER, "t2", again))["reason"] == "not_holder"
    with fresh_ledger.session(readonly=True) as session:
        keys = session.execute(
            select(OutboxEvent.routing_key).where(OutboxEvent.request_id.in_(["t1", "t2"]))
        ).scalars()
        assert sorted(keys) == [f"{TRANSFER}.rejected", f"{TRANSFER}.succeeded"]


def test_a_registered_kind_is_listed_by_topology_show_and_gets_a_command(
    transfer: TaskSpec,
) -> None:
    shown = CliRunner().invoke(main, ["topology", "show"]).output
    assert f"queue {TRANSFER} <- exchange mcard key={TRANSFER}" in shown
    assert f"queue {TRANSFER}.dlq <- exchange mcard.dlx key={TRANSFER}" in shown
    command = enqueue_command(transfer)
    assert command.name == "transfer"
    assert {"--card-id", "--owner", "--new-owner", "--request-id"} <= {
        flag for param in command.params for flag in param.opts
    }


def test_a_kind_is_registered_once_under_a_name_of_the_mcard_family(
    transfer: TaskSpec,
) -> None:
    with pytest.raises(ValueError, match="registered already"):
        register(transfer)
    with pytest.raises(ValueError, match=r"must be mcard\.<identifier>"):
        register(TaskSpec(**{**transfer.__dict__, "name": "other.transfer"}))
    with pytest.raises(InvalidRequestError, match=r"unknown task 'mcard\.melt'"):
        spec_for("mcard.melt")
    assert app.tasks[  # the built-in kinds are this app's tasks
        "mcard.single_mint"
    ].spec is spec_for("mcard.single_mint")
