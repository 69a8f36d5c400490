"""Traces (MCARD_TRACING): one trace from delay() through a real worker to the ledger's commit.

The producer side is this test process, traced into the SDK's InMemorySpanExporter; the worker
is a real subprocess whose spans go, through the standard OTEL_TRACES_EXPORTER entry-point
lookup, to tests.span_file's exporter (one JSON line per span in a file). Off, nothing traces.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mcard_tasks import app, tracing
from mcard_tasks.tasks import single_burn, single_mint
from mcard_tasks.topology import build_topology
from tests.fixtures import ROOT, Worker, drain_dlq, use_ledger, wait_for
from tests.span_file import FILE_VARIABLE, NAME, read_spans, register

pytestmark = pytest.mark.integration
TIMEOUT = 30
RUN, PUBLISH = "run/mcard.single_mint", "apply_async/mcard.single_mint"
LEDGER = "mcard.ledger.apply"


def new(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def producer_spans() -> Iterator[InMemorySpanExporter]:
    """This process traced (as MCARD_TRACING=true does) into memory, for one test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.instrument(provider)
    yield exporter
    tracing.uninstrument()
    provider.shutdown()


def worker_exporting(
    make_worker: Callable[..., Worker],
    url: str,
    folder: Path,
    *,
    traced: bool,
    pool: str = "threads",
) -> tuple[Worker, Path]:
    """A worker (not started) whose spans, if any, go to a JSON-lines file; and the file."""
    spans = folder / "worker-spans.jsonl"
    worker = make_worker(url, "tracing", tracing=str(traced).lower(), pool=pool, concurrency=2)
    path = [str(register(folder / "exporter")), os.environ.get("PYTHONPATH", "")]
    worker.env.update(
        {
            "PYTHONPATH": os.pathsep.join(p for p in path if p),
            "OTEL_TRACES_EXPORTER": NAME,
            "OTEL_BSP_SCHEDULE_DELAY": "50",  # milliseconds: the batch goes out at once
            FILE_VARIABLE: str(spans),
        }
    )
    return worker, spans


def hex_id(number: int, digits: int) -> str:
    return f"0x{number:0{digits}x}"


def of_request(spans: list[dict[str, Any]], request_id: str) -> dict[str, dict[str, Any]]:
    """The exported spans naming request_id, by span name."""
    return {
        span["name"]: span
        for span in spans
        if span["attributes"].get(tracing.REQUEST_ID) == request_id
    }


def published(exporter: InMemorySpanExporter, request_id: str) -> ReadableSpan:
    found = [
        span
        for span in exporter.get_finished_spans()
        if span.name == PUBLISH and (span.attributes or {}).get(tracing.REQUEST_ID) == request_id
    ]
    assert len(found) == 1, [span.name for span in exporter.get_finished_spans()]
    return found[0]


# Prefork: each pool child makes its tracer provider after the fork (worker_process_init).
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_delay_the_worker_run_and_the_ledger_commit_are_one_trace_naming_the_request(
    pool: str,
    ledger_url: str,
    make_worker: Callable[..., Worker],
    producer_spans: InMemorySpanExporter,
    tmp_path: Path,
) -> None:
    use_ledger(ledger_url)
    worker, path = worker_exporting(make_worker, ledger_url, tmp_path, traced=True, pool=pool)
    worker.start()
    minted, burned = new("trace-mint"), new("trace-burn")
    card = new("card")
    assert (
        single_mint.delay(card_id=card, owner="alice", request_id=minted).get(timeout=TIMEOUT)[
            "outcome"
        ]
        == "succeeded"
    )
    rejected = single_burn.delay(card_id=card, owner="bob", request_id=burned)
    assert rejected.get(timeout=TIMEOUT)["reason"] == "not_holder"

    publish = published(producer_spans, minted)
    assert publish.attributes is not None and publish.attributes[tracing.TASK] == single_mint.name
    spans = wait_for(
        lambda: (found := of_request(read_spans(path), minted)).keys() >= {RUN, LEDGER} and found,
        TIMEOUT,
        "the worker's run and ledger spans of the mint",
    )
    run, ledger = spans[RUN], spans[LEDGER]
    trace_id = hex_id(publish.context.trace_id, 32)
    assert run["context"]["trace_id"] == ledger["context"]["trace_id"] == trace_id
    assert run["parent_id"] == hex_id(publish.context.span_id, 16), "run continues the publish"
    assert ledger["parent_id"] == run["context"]["span_id"], "the ledger's span is under the run"
    assert run["attributes"][tracing.TASK] == single_mint.name
    assert run["attributes"][tracing.OUTCOME] == "succeeded"
    assert ledger["attributes"][tracing.TASK] == single_mint.name
    assert run["resource"]["attributes"]["service.name"] == "mcard-tasks"

    burn = wait_for(
        lambda: of_request(read_spans(path), burned).get("run/mcard.single_burn"),
        TIMEOUT,
        "the worker's run span of the rejected burn",
    )
    assert burn["attributes"][tracing.OUTCOME] == "rejected"
    assert burn["context"]["trace_id"] != trace_id, "another request, another trace"


def first_message(queue: str) -> Any:
    """The first message of queue, looked at and left there (back when the channel closes)."""
    with app.connection_for_write() as connection:
        channel = connection.channel()
        bound = build_topology(app.settings).queue(queue)(channel)
        message = wait_for(lambda: bound.get(no_ack=False), TIMEOUT, f"a message in {queue}")
        channel.close()
    return message


def test_with_tracing_off_nothing_is_traced_imported_or_added_to_the_message(
    ledger_url: str, make_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    use_ledger(ledger_url)
    worker, path = worker_exporting(make_worker, ledger_url, tmp_path, traced=False)
    request_id = new("untraced")
    # A producer process of its own (tracing off, the default): it never imports OpenTelemetry.
    code = (
        "import sys\n"
        "from mcard_tasks.tasks import single_mint\n"
        f"single_mint.delay(card_id={new('card')!r}, owner='alice', request_id={request_id!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = dict(os.environ, MCARD_DATABASE_URL=ledger_url)
    env.pop("MCARD_TRACING", None)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", "no OpenTelemetry module imported"

    message = first_message(single_mint.name)  # no worker yet: the message waits in its queue
    assert message.headers["id"] == request_id
    assert not {"traceparent", "tracestate"} & set(message.headers), message.headers

    worker.start()
    result = single_mint.AsyncResult(request_id)
    assert result.get(timeout=TIMEOUT)["outcome"] == "succeeded"
    assert worker.stop() == 0  # a traced worker would have flushed its spans by now
    assert read_spans(path) == [] and not path.exists()


def test_a_retry_continues_the_trace_and_the_issuer_call_is_a_span_under_the_ledger_span(
    sqlite_url: str,
    make_worker: Callable[..., Worker],
    producer_spans: InMemorySpanExporter,
    tmp_path: Path,
) -> None:
    use_ledger(sqlite_url)
    worker, path = worker_exporting(make_worker, sqlite_url, tmp_path, traced=True)
    worker.env.update(
        MCARD_ISSUER="simulated",
        MCARD_ISSUER_LATENCY_MS="1",
        MCARD_ISSUER_FAILURE_RATE="1",  # every call fails: one retry, then the DLQ
        MCARD_MAX_RETRIES="1",
    )
    worker.start()
    request_id = new("trace-retry")
    single_mint.delay(card_id=new("card"), owner="alice", request_id=request_id)
    publish = published(producer_spans, request_id)

    def spans() -> list[dict[str, Any]]:
        return [
            span
            for span in read_spans(path)
            if span["attributes"].get(tracing.REQUEST_ID) == request_id
        ]

    def named(name: str) -> list[dict[str, Any]]:
        return sorted((s for s in spans() if s["name"] == name), key=lambda s: s["start_time"])

    wait_for(lambda: len(named(RUN)) == 2, TIMEOUT, "two runs of the request (one retry)")
    assert {span["context"]["trace_id"] for span in spans()} == {
        hex_id(publish.context.trace_id, 32)
    }
    first, second = named(RUN)
    [retry] = named(PUBLISH)  # the worker's publish of the retry
    assert first["parent_id"] == hex_id(publish.context.span_id, 16)
    assert retry["parent_id"] == first["context"]["span_id"]
    assert second["parent_id"] == retry["context"]["span_id"]
    ledgers = named(LEDGER)
    assert [s["parent_id"] for s in ledgers] == [
        first["context"]["span_id"],
        second["context"]["span_id"],
    ]
    issuers = named("mcard.issuer.issue")
    assert [s["parent_id"] for s in issuers] == [s["context"]["span_id"] for s in ledgers]
    assert {s["status"]["status_code"] for s in issuers} == {"ERROR"}
    wait_for(lambda: drain_dlq(single_mint.name), TIMEOUT, "the request in its DLQ")
