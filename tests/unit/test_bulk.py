"""Bulk import without a broker: line validation, error messages, conflicts, the confirm
window's bookkeeping, timeouts and Ctrl-C (on a fake channel), and the CLI's exit codes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery.utils.saferepr import saferepr
from click.testing import CliRunner
from kombu.serialization import dumps

from mcard_tasks import app
from mcard_tasks.bulk import enqueue_many
from mcard_tasks.bulk.lines import MAX_LINE_BYTES, parse_request
from mcard_tasks.bulk.publisher import Publisher
from mcard_tasks.bulk.report import MAX_ERRORS, ImportReport
from mcard_tasks.cli import main
from mcard_tasks.confirms import ConfirmWindow
from mcard_tasks.errors import (
    BrokerFailureError,
    BulkImportError,
    ImportInterrupted,
    InvalidLinesError,
    InvalidRequestError,
)
from mcard_tasks.ledger import get_ledger
from mcard_tasks.messages import FastReprs, result_repr, task_message
from mcard_tasks.specs import validate_payload
from mcard_tasks.tasks import mint, single_mint
from tests.fixtures import use_ledger


def line(**document: Any) -> str:
    return json.dumps(document)


def problems_of(text: str) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        parse_request(text)
    return "; ".join(caught.value.problems)


@pytest.fixture(autouse=True)
def ledger_url(tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite ledger for the conflict checks."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    previous = app.settings
    use_ledger(url)
    yield url
    app.settings = previous


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(text + "\n" for text in lines))
    return path


# --- one line --------------------------------------------------------------------------


def test_a_valid_line_keeps_its_request_id_and_fields() -> None:
    request = parse_request(line(task="single_mint", card_id="c-1", owner="al", request_id="r-1"))
    assert (request.task, request.request_id) == ("mcard.single_mint", "r-1")
    assert request.kwargs == {"card_id": "c-1", "owner": "al"}
    assert parse_request(line(task="mcard.mint", owner="o", card_ids=["a"])).task == "mcard.mint"


def test_a_line_without_request_id_gets_one_derived_from_its_content() -> None:
    text = line(task="single_burn", card_id="c-1", owner="alice")
    first, again = parse_request(text), parse_request(text)
    assert first.request_id == again.request_id  # re-running a file is safe
    assert uuid.UUID(first.request_id).version == 5
    other = parse_request(line(task="single_burn", card_id="c-2", owner="alice"))
    assert other.request_id != first.request_id


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", "not valid JSON (Expecting value at column 1)"),
        ('{"task": "mint",', "not valid JSON"),
        ('{"task": "single_mint", "card_id": NaN, "owner": "o"}', "NaN is not JSON"),
        ("[1, 2]", "must be a JSON object (got an array)"),
        ('"text"', "must be a JSON object (got a str)"),
        ('{"card_id": "c"}', "task: is required (one of mint, single_mint, single_burn)"),
        ('{"task": "explode"}', "task: unknown task 'explode' (known: mint, single_mint"),
        ('{"task": 7}', "task: unknown task 7"),
        (line(task="single_mint", card_id="a b", owner="o"), "card_id: must be 1 to 128"),
        (line(task="single_mint", owner="o"), "card_id: is required"),
        (line(task="single_burn", card_id="c", owner="x" * 129), "owner: must be 1 to 128"),
        (line(task="mint", owner="o", card_ids=[]), "card_ids: must hold 1 to 1000 card ids"),
        (line(task="mint", owner="o", card_ids=["a", "a"]), "distinct"),
        (line(task="single_mint", card_id="c", owner="o", metadata=[1]), "metadata"),
        (line(task="single_mint", card_id="c", owner="o", colour="red"), "colour: is not a field"),
        (line(task="single_mint", card_id="c", owner="o", request_id="r 1"), "request_id: must"),
        (line(task="single_mint", card_id="c", owner="o", request_id=5), "request_id: must be a"),
    ],
)
def test_every_problem_names_the_field_and_the_rule(text: str, expected: str) -> None:
    assert expected in problems_of(text)


def test_all_problems_of_a_line_are_listed() -> None:
    message = problems_of(line(task="single_mint", card_id="", request_id="x y"))
    assert "request_id:" in message and "card_id:" in message and "owner: is required" in message


# --- reprs and the message --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"card_id": "c-1", "owner": "alice"},
        {"card_id": "it's", "owner": "alice"},
        {"card_id": 'say"hi"', "owner": "alice"},
        {"card_id": "back\\slash", "owner": "o"},
        {"card_id": "ünïcødé-✓", "owner": "名前"},
        {"card_id": "x" * 128, "owner": "y" * 128},
        {"card_id": "c", "owner": "o", "metadata": {"k": [1, 2, {"deep": {"er": "x" * 2000}}]}},
        {"owner": "o", "card_ids": [f"card-{i}" for i in range(1000)]},
    ],
)
def test_the_fast_kwargsrepr_is_celerys_saferepr(kwargs: dict[str, Any]) -> None:
    reprs = FastReprs(app)
    expected = saferepr(kwargs, app.amqp.kwargsrepr_maxsize, app.conf.task_repr_maxlevels)
    assert reprs.kwargs(kwargs) == expected
    assert reprs.args == saferepr((), app.amqp.argsrepr_maxsize, app.conf.task_repr_maxlevels)


_OUTCOME = {
    "request_id": "r-1",
    "task": "mcard.single_mint",
    "outcome": "succeeded",
    "reason": None,
    "detail": None,
    "owner": "alice",
    "card_ids": ["c-1"],
    "recorded_at": "2026-12-04T22:00:00.123456+00:00",
}


@pytest.mark.parametrize(
    "value",
    [
        _OUTCOME,
        _OUTCOME | {"outcome": "rejected", "reason": "already_minted", "detail": "card c-1"},
        _OUTCOME | {"owner": "it's"},
        _OUTCOME | {"owner": 'say"hi"'},
        _OUTCOME | {"owner": "back\\slash"},
        _OUTCOME | {"owner": "ünïcødé-✓"},
        _OUTCOME | {"card_ids": [f"card-{i}" for i in range(1000)]},
        _OUTCOME | {"detail": {"deep": {"er": ["x"]}}},
        _OUTCOME | {"owner": "x" * 600},
        {"n": 1, "ok": True, "f": 1.5},
    ],
)
def test_the_fast_result_repr_is_celerys_saferepr(value: dict[str, Any]) -> None:
    """What a batched request's task-succeeded event shows is what Celery's tracer shows."""
    assert result_repr(value, 1024) == saferepr(value, 1024)


class RecordingProducer:
    """What Celery's send_task_message hands kombu's Producer.publish, recorded, not sent."""

    def __init__(self) -> None:
        self.sent: dict[str, Any] = {}
        self.connection = self

    @contextmanager
    def _reraise_as_library_errors(self) -> Iterator[None]:
        yield

    def publish(self, body: Any, **options: Any) -> None:
        self.sent.update(options, body=body)


class NoEvents:
    """An event dispatcher that drops Flower's task-sent event (there is no broker here)."""

    def publish(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("task", "fields"),
    [
        (single_mint, {"card_id": "c-1", "owner": "al"}),
        (single_mint, {"card_id": "c-2", "owner": "al", "metadata": {"k": [1, "it's"]}}),
        (mint, {"owner": "o", "card_ids": ["a", "b"]}),
    ],
)
def test_the_message_is_the_one_delay_publishes(task: Any, fields: dict[str, Any]) -> None:
    """delay()'s own path (RequestTask.apply_async, then Celery's) against task_message."""
    producer = RecordingProducer()
    task.apply_async(kwargs=fields, task_id="r-9", producer=producer, event_dispatcher=NoEvents())
    sent = producer.sent
    payload = validate_payload(task.name, fields)
    message = task_message(app, task=task.name, request_id="r-9", payload=payload)
    assert message.headers == sent["headers"]
    assert message.body == dumps(sent["body"], serializer=sent["serializer"])[2]
    assert (message.exchange, message.routing_key) == (sent["exchange"], sent["routing_key"])
    assert (message.exchange, message.routing_key) == ("mcard", task.name)
    assert message.properties["correlation_id"] == sent["correlation_id"] == "r-9"
    assert message.properties["reply_to"] == sent["reply_to"]
    assert message.properties["delivery_mode"] == 2 == sent["delivery_mode"]
    assert message.properties["priority"] == sent.get("priority", 0) == 0  # kombu's default
    assert (message.properties["content_type"], message.properties["content_encoding"]) == (
        "application/json",
        "utf-8",
    )


def test_a_lines_request_is_published_with_the_fields_it_was_given() -> None:
    request = parse_request(line(task="single_mint", card_id="c-1", owner="al", request_id="r"))
    message = task_message(app, task=request.task, request_id="r", payload=request.payload)
    assert json.loads(message.body)[1] == request.kwargs == {"card_id": "c-1", "owner": "al"}


def test_an_invalid_lines_error_is_an_invalid_request_and_a_bulk_import_error() -> None:
    report = ImportReport(source="f")
    for number in range(1, 8):
        report.add_error(number, ["task: is required"])
    error = InvalidLinesError(report)
    assert isinstance(error, InvalidRequestError) and isinstance(error, BulkImportError)
    assert error.report is report and error.problems == report.errors
    assert str(error).startswith("7 invalid lines, nothing published: line 1: task: is")
    assert str(error).endswith("(and 2 more)")


# --- a whole file, refused before any connection -----------------------------------------


def test_a_file_with_bad_lines_is_refused_and_every_bad_line_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        line(task="single_mint", card_id="good-1", owner="alice"),
        "{broken",
        "",
        line(task="single_burn", card_id="c", owner="two words"),
        line(task="mint", owner="o", card_ids=[]),
        "[]",
    )
    with pytest.raises(InvalidLinesError) as caught:
        enqueue_many(path)
    report = caught.value.report
    assert report.status == "refused" and report.published == 0
    assert (report.lines, report.blank, report.valid, report.invalid) == (6, 1, 1, 4)
    assert [error.split(":")[0] for error in report.errors] == [
        "line 2",
        "line 4",
        "line 5",
        "line 6",
    ]
    assert report.errors[1].startswith("line 4: owner: must be 1 to 128 characters")
    assert "nothing was published" in "\n".join(report.describe())


def test_a_request_id_recorded_with_another_payload_is_a_conflict(
    tmp_path: Path, ledger_url: str
) -> None:
    fields = {"card_id": "c-1", "owner": "alice"}
    get_ledger(ledger_url).apply(
        "mcard.single_mint", "r-1", validate_payload("mcard.single_mint", fields)
    )
    path = write(
        tmp_path,
        line(task="single_mint", card_id="c-1", owner="alice", request_id="r-2"),
        line(task="single_mint", card_id="c-2", owner="alice", request_id="r-1"),
    )
    with pytest.raises(InvalidLinesError) as caught:
        enqueue_many(path)
    assert caught.value.report.conflicts == 1
    assert caught.value.report.errors == [
        "line 2: request_id: conflict: request ID 'r-1' is already recorded with a different"
        " payload; use a new request ID for a different request"
    ]


def test_unreadable_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    path.write_bytes(b'{"task": "mint"\xff}\n' + b"x" * (MAX_LINE_BYTES + 10) + b"\n{}\n")
    with pytest.raises(InvalidLinesError) as caught:
        enqueue_many(path)
    assert caught.value.report.errors[0].startswith("line 1: not valid UTF-8")
    assert caught.value.report.errors[1] == f"line 2: longer than {MAX_LINE_BYTES} bytes"
    assert caught.value.report.errors[2].startswith("line 3: task: is required")


def test_errors_are_counted_all_but_kept_capped(tmp_path: Path) -> None:
    path = write(tmp_path, *["nope"] * (MAX_ERRORS + 50))
    with pytest.raises(InvalidLinesError) as caught:
        enqueue_many(path)
    report = caught.value.report
    assert report.invalid == MAX_ERRORS + 50 and len(report.errors) == MAX_ERRORS
    assert "(50 more invalid lines not listed)" in report.describe()


def test_an_iterator_is_refused_because_the_source_is_read_twice() -> None:
    with pytest.raises(TypeError, match="not an iterator"):
        enqueue_many(iter(["{}"]))


# --- the confirm window (mcard_tasks.confirms), on a fake channel -------------------------


class FakeBroker:
    """Records publishes; on each drain acks (or nacks) what is in flight, as RabbitMQ may."""

    def __init__(self, publisher: Any, *, silent: bool = False, nack: set[int] | None = None):
        self.publisher = publisher
        self.silent = silent
        self.nack = nack or set()
        self.tag = 0
        self.acked = 0
        self.max_in_flight = 0
        self.collected = False
        self.connection = self  # kombu Connection.connection -> amqp Connection

    def prepare_message(self, body: str, *args: Any) -> str:
        return body

    def basic_publish(self, message: str, exchange: str, routing_key: str) -> None:
        assert (exchange, routing_key[:6]) == ("mcard", "mcard.")
        self.tag += 1
        self.max_in_flight = max(self.max_in_flight, self.tag - self.acked)

    def drain_events(self, timeout: float) -> None:
        if self.silent:
            raise TimeoutError("timed out")
        # One single ack (out of order, the newest), then a multiple ack for the rest.
        if self.tag > self.acked + 1:
            self.publisher._on_ack(self.tag, False)
        for tag in range(self.acked + 1, self.tag + 1):
            if tag in self.nack:
                self.publisher._on_nack(tag, False)
        self.publisher._on_ack(self.tag, True)
        self.acked = self.tag

    def collect(self) -> None:
        self.collected = True

    def release(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    made: dict[str, Any] = {"options": {}}

    def open_fake(window: Any, declare: Any = None) -> None:
        broker = FakeBroker(window, **made["options"])
        window.connection = window.channel = made["broker"] = broker

    monkeypatch.setattr(ConfirmWindow, "open", open_fake)
    return made


def requests(count: int) -> list[str]:
    return [
        line(task="single_mint", card_id=f"c-{i}", owner="alice", request_id=f"r-{i}")
        for i in range(count)
    ]


def test_confirms_are_pipelined_within_the_window_and_counted_exactly(
    fake: dict[str, Any],
) -> None:
    seen: list[tuple[str, int, int]] = []
    report = enqueue_many(requests(1234), window=100, progress=lambda *a: seen.append(a))
    assert report.status == "complete"
    assert (report.valid, report.published, report.confirmed, report.nacked) == (1234,) * 3 + (0,)
    assert 1 < fake["broker"].max_in_flight <= 100
    assert seen[-1] == ("publish", 1234, 1234)
    assert ("validate", 1234, 1234) in seen


def test_nacked_requests_fail_the_import_and_are_named(fake: dict[str, Any]) -> None:
    fake["options"] = {"nack": {3, 7}}
    with pytest.raises(BrokerFailureError) as caught:
        enqueue_many(requests(10), window=4)
    report = caught.value.report
    assert (report.published, report.confirmed, report.nacked) == (10, 8, 2)
    assert sorted(report.nacked_request_ids) == ["r-2", "r-6"]
    assert "re-running the same file is safe" in "\n".join(report.describe())


def test_a_silent_broker_fails_within_the_timeout_with_the_exact_count(
    fake: dict[str, Any],
) -> None:
    fake["options"] = {"silent": True}
    with pytest.raises(BrokerFailureError, match=r"confirmed nothing for 0\.2 s") as caught:
        enqueue_many(requests(20), window=5, timeout=0.2)
    report = caught.value.report
    assert (report.status, report.published, report.confirmed) == ("failed", 5, 0)
    assert report.unconfirmed == 5 and fake["broker"].collected


def test_ctrl_c_reports_what_was_confirmed(fake: dict[str, Any]) -> None:
    def progress(phase: str, done: int, total: int) -> None:
        if phase == "publish" and done:
            raise KeyboardInterrupt

    with pytest.raises(ImportInterrupted) as caught:
        enqueue_many(requests(2000), window=100, progress=progress)
    report = caught.value.report
    assert report.status == "interrupted"
    assert 0 < report.confirmed <= report.published < 2000
    assert report.confirmed == fake["broker"].acked
    assert "re-running the same file is safe" in "\n".join(report.describe())


def test_report_summary_counts() -> None:
    report = ImportReport(source="f", lines=3, valid=2, published=2, confirmed=1)
    assert report.unconfirmed == 1
    assert "published 2, confirmed 1" in report.summary()


# --- the command line ------------------------------------------------------------------


def test_cli_exit_2_when_lines_are_invalid_and_nothing_is_published(tmp_path: Path) -> None:
    path = write(tmp_path, line(task="single_mint", card_id="ok", owner="o"), "oops")
    result = CliRunner().invoke(main, ["import", str(path)])
    assert result.exit_code == 2, result.output
    assert "line 2: not valid JSON" in result.output
    assert "nothing was published" in result.output


def test_cli_exit_4_when_the_broker_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.conf, "broker_url", "amqp://guest:guest@127.0.0.1:1//")
    path = write(tmp_path, line(task="single_mint", card_id="ok", owner="o"))
    result = CliRunner().invoke(main, ["import", str(path)])
    assert result.exit_code == 4, result.output
    assert "exactly 0 requests were confirmed" in result.output


def test_cli_exit_130_on_ctrl_c(
    tmp_path: Path, fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Publisher, "wait", interrupted)
    path = write(tmp_path, *requests(3))
    result = CliRunner().invoke(main, ["import", str(path)])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "re-running the same file is safe" in result.output
