"""Bulk import end to end: real RabbitMQ, a real worker, SQLite and PostgreSQL ledgers.

A spy queue bound to exchange ``mcard`` gets a copy of every task message; nothing consumes
it, so its count is what was published (the worker's queues are drained as we go).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kombu import Connection
from sqlalchemy import select

from mcard_tasks import app
from mcard_tasks.bulk import enqueue_many
from mcard_tasks.bulk.lines import parse_request
from mcard_tasks.cli import main
from mcard_tasks.errors import InvalidLinesError
from mcard_tasks.ledger import get_ledger
from mcard_tasks.models import Operation
from mcard_tasks.specs import task_names
from mcard_tasks.tasks import mint, single_burn, single_mint
from mcard_tasks.topology import dlq_name
from tests.fixtures import Worker, wait_for

pytestmark = pytest.mark.integration
TIMEOUT = 60


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Spy:
    """An exclusive queue with a copy of every message published to exchange mcard."""

    def __init__(self) -> None:
        self.connection = Connection(app.conf.broker_url)
        self.channel = self.connection.channel()
        self.name = f"spy-{uuid.uuid4().hex[:8]}"
        self.channel.queue_declare(self.name, exclusive=True, auto_delete=True)
        self.channel.queue_bind(self.name, "mcard", "mcard.#")

    def count(self, queue: str | None = None) -> int:
        return int(self.channel.queue_declare(queue or self.name, passive=True).message_count)

    def take(self) -> list[Any]:
        taken = []
        while (message := self.channel.basic_get(self.name, no_ack=True)) is not None:
            taken.append(message)
        return taken

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def spy(stack: Worker) -> Iterator[Spy]:
    watcher = Spy()
    yield watcher
    watcher.close()


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / f"{uuid.uuid4().hex[:8]}.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def outcome(request_id: str) -> dict[str, Any] | None:
    return get_ledger(app.settings.database_url).outcome(request_id)


def raw_outcomes(request_ids: list[str]) -> dict[str, str]:
    """The stored outcome text of each request ID, byte for byte."""
    engine = get_ledger(app.settings.database_url).engine
    found: dict[str, str] = {}
    with engine.connect() as connection:
        for start in range(0, len(request_ids), 200):
            query = select(Operation.request_id, Operation.outcome).where(
                Operation.request_id.in_(request_ids[start : start + 200])
            )
            found.update({row[0]: row[1] for row in connection.execute(query)})
    return found


def settle_every_queue() -> None:
    """Wait for one fresh request per task queue: the worker has taken what came before."""
    card = new_id("sentinel")
    results = [
        single_mint.delay(card_id=card, owner="sentinel"),
        mint.delay(owner="sentinel", card_ids=[new_id("sentinel")]),
        single_burn.delay(card_id=card + "-unknown", owner="sentinel"),
    ]
    for result in results:
        result.get(timeout=TIMEOUT, interval=0.05)


def test_a_file_with_bad_lines_publishes_nothing_and_names_every_bad_line(
    spy: Spy, tmp_path: Path
) -> None:
    good = [new_id("req") for _ in range(3)]
    lines = [
        json.dumps(
            {"task": "single_mint", "card_id": new_id("card"), "owner": "a", "request_id": r}
        )
        for r in good
    ]
    lines.insert(1, json.dumps({"task": "single_mint", "card_id": "two words", "owner": "a"}))
    lines.append("{not json")
    lines.append(json.dumps({"task": "teleport", "card_id": "c"}))
    with pytest.raises(InvalidLinesError) as caught:
        enqueue_many(write(tmp_path, lines))
    errors = caught.value.report.errors
    assert [error.split(":")[0] for error in errors] == ["line 2", "line 5", "line 6"]
    assert errors[0].startswith("line 2: card_id: must be 1 to 128 characters")
    assert spy.count() == 0
    # A later request through the same queue is processed: had the good lines been
    # published, they would have been processed before it.
    settle_every_queue()
    assert spy.count() == 3  # the spy does see what is published
    assert all(outcome(request_id) is None for request_id in good)


def test_the_bulk_message_is_exactly_what_delay_publishes(spy: Spy, tmp_path: Path) -> None:
    request_id, card = new_id("req"), new_id("card")
    fields = {"card_id": card, "owner": "alice", "metadata": {"series": "x", "n": [1, 2]}}
    report = enqueue_many(
        write(tmp_path, [json.dumps({"task": "single_mint", **fields, "request_id": request_id})])
    )
    assert (report.published, report.confirmed) == (1, 1)
    wait_for(lambda: outcome(request_id), TIMEOUT, "the bulk request's outcome")
    single_mint.delay(request_id=request_id, **fields).get(timeout=TIMEOUT)
    wait_for(lambda: spy.count() == 2, TIMEOUT, "two copies in the spy queue")
    bulk_copy, delay_copy = spy.take()
    assert bulk_copy.body == delay_copy.body
    assert bulk_copy.properties == delay_copy.properties
    assert bulk_copy.headers == delay_copy.headers
    for key in ("exchange", "routing_key"):
        assert bulk_copy.delivery_info[key] == delay_copy.delivery_info[key]
    assert bulk_copy.properties["delivery_mode"] == 2
    assert bulk_copy.properties["correlation_id"] == request_id


def test_a_bulk_import_lands_every_request_once_and_a_rerun_changes_nothing(
    spy: Spy, tmp_path: Path
) -> None:
    held = [new_id("held") for _ in range(20)]
    for card in held:
        single_mint.delay(card_id=card, owner="holder").get(timeout=TIMEOUT)
    taken_before = spy.count()
    # Earlier tests of the session may have left dead letters: only new ones count.
    dead_before = {name: spy.count(dlq_name(name)) for name in task_names()}
    lines = []
    for i in range(200):  # half with a request ID, half with one derived from the line
        document = {"task": "single_mint", "card_id": new_id("card"), "owner": f"o{i % 7}"}
        if i % 2:
            document["request_id"] = new_id("req")
        lines.append(json.dumps(document))
    for _ in range(30):
        cards = [new_id("batch") for _ in range(3)]
        lines.append(json.dumps({"task": "mint", "owner": "bob", "card_ids": cards}))
    for card in held:
        lines.append(json.dumps({"task": "single_burn", "card_id": card, "owner": "holder"}))
    requests = [parse_request(line) for line in lines]
    request_ids = [request.request_id for request in requests]
    assert len(set(request_ids)) == 250
    path = write(tmp_path, lines)

    report = enqueue_many(path)
    assert report.status == "complete"
    assert (report.valid, report.published, report.confirmed, report.nacked) == (250,) * 3 + (0,)
    wait_for(lambda: spy.count() == taken_before + 250, TIMEOUT, "250 copies in the spy queue")
    wait_for(
        lambda: len(raw_outcomes(request_ids)) == 250, TIMEOUT, "all 250 outcomes in the ledger"
    )
    first = raw_outcomes(request_ids)
    ledger = get_ledger(app.settings.database_url)
    for request in requests:
        result = json.loads(first[request.request_id])
        assert (result["outcome"], result["request_id"]) == ("succeeded", request.request_id)
        for card_id in result["card_ids"]:
            card = ledger.card(card_id)
            assert card is not None
            if request.task == "mcard.single_burn":
                assert (card.status, card.burned_by) == ("burned", request.request_id)
            else:
                assert card.minted_by == request.request_id

    again = enqueue_many(path)
    assert (again.recorded, again.published, again.confirmed) == (250, 250, 250)
    wait_for(lambda: spy.count() == taken_before + 500, TIMEOUT, "the re-run's 250 copies")
    settle_every_queue()
    assert raw_outcomes(request_ids) == first
    spy.take()
    for name in task_names():
        assert spy.count(dlq_name(name)) == dead_before[name], f"dead letters in {dlq_name(name)}"


def test_the_import_command_enqueues_and_prints_a_summary(spy: Spy, tmp_path: Path) -> None:
    request_id = new_id("req")
    line = {"task": "single_mint", "card_id": new_id("card"), "owner": "cli"}
    path = write(tmp_path, [json.dumps({**line, "request_id": request_id})])
    result = CliRunner().invoke(main, ["import", str(path)])
    assert result.exit_code == 0, result.output
    assert "complete: 1 lines, 1 valid, 0 invalid" in result.output
    assert "confirmed 1" in result.output
    landed = wait_for(lambda: outcome(request_id), TIMEOUT, "the outcome")
    assert landed["outcome"] == "succeeded"
