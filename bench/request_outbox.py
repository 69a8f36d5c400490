"""The request outbox: relay throughput, delay_in's cost in a transaction, commit-to-publish
latency.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/request_outbox.py [--messages N] [--transactions M] [--rounds R]

A temporary vhost and a temporary PostgreSQL application database; no worker consumes (the
queue is purged between rounds). Within each round the variants alternate:

- relay: N committed rows relayed by ``RequestRelay.run(once=True)`` (pipelined confirms,
  the task-sent events included) vs raw py-amqp publishing the same N messages with
  asynchronous confirms;
- M transactions of one ``delay_in`` each (validation included) vs M transactions of one plain
  INSERT of an equal row.

Then the latency: 100 requests/s committed for a few seconds with a relay running; the time
from each row's write to its relayed mark (an upper bound of committed-to-confirmed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    configure,
    median,
    median_table,
    percentile,
    publish_raw_confirmed,
    ratio,
    ratio_line,
    raw_connection,
    rotations,
    say,
    temporary_database,
    temporary_vhost,
    unique,
)

QUEUE = "mcard.single_mint"


def commit_rows(engine: Any, count: int, tag: str) -> None:
    """count pending rows, written untimed in one transaction."""
    from mcard_tasks.tasks import single_mint

    with engine.begin() as connection:
        for i in range(count):
            single_mint.delay_in(
                connection, card_id=f"{tag}-{i}", owner="bench", request_id=f"{tag}-r{i}"
            )


def raw_messages(count: int, tag: str) -> list[tuple[Any, str, str]]:
    """The same messages the relay publishes, as py-amqp messages (built untimed)."""
    import amqp

    from mcard_tasks import app
    from mcard_tasks.messages import TaskMessages

    messages = TaskMessages(app)
    built = []
    for i in range(count):
        message = messages.build_published(
            task="mcard.single_mint",
            request_id=f"{tag}-r{i}",
            kwargs={"owner": "bench", "card_id": f"{tag}-{i}"},
        )
        body = amqp.Message(message.body, application_headers=message.headers, **message.properties)
        built.append((body, message.exchange, message.routing_key))
    return built


def purge(vhost: str) -> None:
    connection = raw_connection(vhost)
    try:
        connection.channel().queue_purge(QUEUE)
    finally:
        connection.close()


def clear(engine: Any) -> None:
    """Empty the table between rounds (untimed): every round starts alike, and no round's
    pending rows are relayed (and counted) by the next relay round."""
    from sqlalchemy import delete

    from mcard_tasks.request_outbox import REQUEST_OUTBOX

    with engine.begin() as connection:
        connection.execute(delete(REQUEST_OUTBOX))


def time_relay(engine: Any, count: int) -> float:
    from mcard_tasks import app
    from mcard_tasks.relay import RequestRelay

    commit_rows(engine, count, unique("relay-"))
    started = time.perf_counter()
    RequestRelay(app, engine).run(once=True)
    return count / (time.perf_counter() - started)


def time_raw(vhost: str, count: int) -> float:
    messages = raw_messages(count, unique("raw-"))
    connection = raw_connection(vhost, timeout=None)
    try:
        started = time.perf_counter()
        publish_raw_confirmed(connection, messages)
        return count / (time.perf_counter() - started)
    finally:
        connection.close()


def time_delay_in(engine: Any, count: int) -> float:
    from mcard_tasks.tasks import single_mint

    tag = unique("din-")
    started = time.perf_counter()
    for i in range(count):
        with engine.begin() as connection:
            single_mint.delay_in(
                connection, card_id=f"{tag}-{i}", owner="bench", request_id=f"{tag}-r{i}"
            )
    return count / (time.perf_counter() - started)


def time_insert(engine: Any, count: int) -> float:
    """A plain INSERT of a row equal to delay_in's (its message text made from one built
    untimed, the IDs substituted), with nothing else computed per row."""
    from sqlalchemy import insert

    from mcard_tasks import app
    from mcard_tasks.request_outbox import REQUEST_OUTBOX, outbox_message
    from mcard_tasks.specs import validate_payload

    tag = unique("ins-")
    payload = validate_payload("mcard.single_mint", {"card_id": "CARDX", "owner": "bench"})
    template = outbox_message(app, "mcard.single_mint", "REQX", payload)
    statement = insert(REQUEST_OUTBOX)
    started = time.perf_counter()
    for i in range(count):
        request_id = f"{tag}-r{i}"
        row = {
            "request_id": request_id,
            "task": "mcard.single_mint",
            "message": template.replace("REQX", request_id).replace("CARDX", f"{tag}-{i}"),
            "created_at": time.time(),
        }
        with engine.begin() as connection:
            connection.execute(statement, row)
    return count / (time.perf_counter() - started)


def latency(engine: Any, seconds: float, rate: float = 100.0) -> list[float]:
    """Write-to-relayed seconds of requests committed at rate per second, a relay running."""
    from sqlalchemy import select

    from mcard_tasks import app
    from mcard_tasks.relay import RequestRelay, outbox_status
    from mcard_tasks.request_outbox import REQUEST_OUTBOX
    from mcard_tasks.tasks import single_mint

    relay = RequestRelay(app, engine)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    tag, total = unique("lat-"), int(seconds * rate)
    started = time.perf_counter()
    for i in range(total):
        time.sleep(max(0.0, started + i / rate - time.perf_counter()))
        with engine.begin() as connection:
            single_mint.delay_in(
                connection, card_id=f"{tag}-{i}", owner="bench", request_id=f"{tag}-r{i}"
            )
    while outbox_status(engine).pending:
        time.sleep(0.05)
    relay.stopping.set()
    thread.join(10)
    table = REQUEST_OUTBOX.c
    with engine.connect() as connection:
        rows = connection.execute(
            select(table.created_at, table.relayed_at).where(table.request_id.like(f"{tag}-%"))
        ).all()
    return [float(relayed - created) for created, relayed in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--transactions", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    args = parser.parse_args()
    with (
        temporary_vhost(unique("mcard-bench-outbox-")) as vhost,
        temporary_database(unique("mcard_bench_outbox_")) as app_db,
        tempfile.TemporaryDirectory() as scratch,
    ):
        configure(vhost, f"sqlite:///{scratch}/ledger.sqlite3", isolate=True)
        from mcard_tasks import app
        from mcard_tasks.request_outbox import create_outbox, outbox_engine
        from mcard_tasks.topology import build_topology

        engine = outbox_engine(app_db)
        create_outbox(engine)
        with app.connection_for_write() as connection:
            build_topology(app.settings).declare(connection.default_channel)
        variants: dict[str, Callable[[], float]] = {
            "relay": lambda: time_relay(engine, args.messages),
            "raw py-amqp": lambda: time_raw(vhost, args.messages),
            "delay_in txn": lambda: time_delay_in(engine, args.transactions),
            "INSERT txn": lambda: time_insert(engine, args.transactions),
        }
        rounds: dict[str, list[float]] = {name: [] for name in variants}
        for round_, name in rotations(list(variants), args.rounds):
            rounds[name].append(variants[name]())
            purge(vhost)
            clear(engine)
            say(f"round {round_ + 1} {name}: {rounds[name][-1]:,.0f}/s")
        say()
        for line in median_table(("path", "per s"), rounds, (14, 10)):
            say(line)
        med = {name: median(values) for name, values in rounds.items()}
        say(ratio_line("relay / raw", ratio(med["relay"], med["raw py-amqp"]), ">= 0.5", 22))
        say(
            ratio_line(
                "delay_in / INSERT", ratio(med["delay_in txn"], med["INSERT txn"]), ">= 0.7", 22
            )
        )
        waits = latency(engine, args.latency_seconds)
        say(
            f"latency at 100/s ({len(waits)} requests): p50 {percentile(waits, 50) * 1000:.1f} ms,"
            f" p99 {percentile(waits, 99) * 1000:.1f} ms, max {max(waits) * 1000:.1f} ms"
            " (target p99 < 100 ms)"
        )
        engine.dispose()


if __name__ == "__main__":
    main()
