"""Enqueue throughput: confirmed delay(), bare Celery apply_async, bulk import, raw py-amqp.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/enqueue.py [--messages N] [--loop-messages M] [--rounds R]

Everything runs in a temporary RabbitMQ vhost (made and deleted with rabbitmqctl) and a
temporary SQLite ledger, with no worker consuming: the queues are purged between rounds.
The four paths alternate within every round; the table shows the median msg/s of the rounds
and the ratios the project aims at. Then the peak RSS growth of a 10x larger import, each in
a fresh process, shows whether memory stays flat in the size of the file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BROKER = os.environ.get("MCARD_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672")
ROOT = Path(__file__).resolve().parent.parent


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def configure(vhost: str, database: str) -> None:
    """The environment mcard-tasks reads at import: set before importing it."""
    os.environ["MCARD_BROKER_URL"] = f"{BROKER}/{vhost}"
    os.environ["MCARD_DATABASE_URL"] = f"sqlite:///{database}"


def write_requests(path: Path, count: int, tag: str) -> Path:
    with path.open("w") as out:
        for i in range(count):
            out.write(
                json.dumps(
                    {
                        "task": "single_mint",
                        "card_id": f"{tag}-{i}",
                        "owner": "bench",
                        "request_id": f"{tag}-r{i}",
                    }
                )
                + "\n"
            )
    return path


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(lines: int, workdir: Path) -> None:
    """In a fresh process: the peak RSS growth of importing `lines` requests."""
    from mcard_tasks.bulk import enqueue_many

    tag = uuid.uuid4().hex[:8]
    enqueue_many(write_requests(workdir / f"warm-{tag}.jsonl", 200, f"warm{tag}"))
    path = write_requests(workdir / f"mem-{tag}.jsonl", lines, f"mem{tag}")
    before = peak_rss_kib()
    report = enqueue_many(path)
    peak = peak_rss_kib()
    result = {"growth_kib": peak - before, "peak_kib": peak, "confirmed": report.confirmed}
    print(json.dumps(result))


class Paths:
    """The four publishing paths, on one vhost."""

    def __init__(self, workdir: Path, bare_queue_type: str) -> None:
        import amqp
        from celery import Celery
        from kombu import Queue

        from mcard_tasks import app
        from mcard_tasks.messages import task_message
        from mcard_tasks.payloads import validate_payload
        from mcard_tasks.tasks import single_mint
        from mcard_tasks.topology import TASK_NAMES, build_topology

        self.workdir = workdir
        self.app = app
        self.single_mint = single_mint
        self.task_names = TASK_NAMES
        arguments = {"x-queue-type": bare_queue_type}
        self.bare = Celery("bare", broker=app.conf.broker_url)
        self.bare.conf.update(
            broker_transport_options={"confirm_publish": True},
            # Like for like: mcard-tasks sends Flower's task-sent events, so does the baseline.
            task_send_sent_event=app.conf.task_send_sent_event,
            task_queues=[Queue("bench.bare", durable=True, queue_arguments=arguments)],
            task_default_queue="bench.bare",
            task_serializer="json",
        )

        @self.bare.task(name="bench.noop")  # type: ignore[untyped-decorator]
        def noop(**kwargs: Any) -> None:
            return None

        self.noop = noop
        url = app.conf.broker_url.removeprefix("amqp://")
        credentials, rest = url.split("@", 1)
        host, vhost = rest.split("/", 1)
        user, password = credentials.split(":", 1)
        self.raw = amqp.Connection(host, userid=user, password=password, virtual_host=vhost)
        self.raw.connect()
        self.channel = self.raw.channel()
        build_topology(app.conf.mcard_queue_type, app.conf.mcard_delivery_limit).declare(
            self._kombu_channel()
        )
        self.channel.queue_declare(
            "bench.bare", durable=True, auto_delete=False, arguments=arguments
        )
        # The raw path publishes the very message shape delay() publishes.
        fields = {"card_id": "c", "owner": "o"}
        payload = validate_payload("mcard.single_mint", fields)
        sample = task_message(app, task="mcard.single_mint", request_id="r-0", payload=payload)
        self.raw_headers, self.raw_properties = sample.headers, sample.properties

    def _kombu_channel(self) -> Any:
        connection = self.app.connection_for_write()
        self._declare_connection = connection
        return connection.default_channel

    def purge(self) -> None:
        for name in (*self.task_names, "bench.bare"):
            self.channel.queue_purge(name)

    def delay_loop(self, count: int, tag: str) -> None:
        for i in range(count):
            self.single_mint.delay(card_id=f"{tag}-{i}", owner="bench", request_id=f"{tag}-r{i}")

    def bare_apply_async(self, count: int, tag: str) -> None:
        for i in range(count):
            self.noop.apply_async(
                kwargs={"card_id": f"{tag}-{i}", "owner": "bench"}, task_id=f"{tag}-r{i}"
            )

    def bulk(self, count: int, tag: str) -> None:
        from mcard_tasks.bulk import enqueue_many

        path = write_requests(self.workdir / f"{tag}.jsonl", count, tag)
        report = enqueue_many(path)
        assert report.confirmed == count, report.summary()
        path.unlink()

    def raw_async(self, count: int, tag: str, window: int = 1000) -> None:
        import amqp

        channel = self.raw.channel()
        channel.confirm_select()
        acked = [0]

        def on_ack(tag_: int, multiple: bool) -> None:
            acked[0] = tag_ if multiple else acked[0] + 1

        def on_nack(tag_: int, multiple: bool) -> None:
            raise RuntimeError("nacked")

        channel.events["basic_ack"].add(on_ack)
        channel.events["basic_nack"].add(on_nack)
        for i in range(count):
            headers = dict(self.raw_headers, id=f"{tag}-r{i}", root_id=f"{tag}-r{i}")
            body = json.dumps([[], {"card_id": f"{tag}-{i}", "owner": "bench"}, {}])
            message = amqp.Message(body, application_headers=headers, **self.raw_properties)
            channel.basic_publish(message, exchange="mcard", routing_key="mcard.single_mint")
            while i + 1 - acked[0] >= window:
                self.raw.drain_events(timeout=10)
        while acked[0] < count:
            self.raw.drain_events(timeout=10)
        channel.close()

    def close(self) -> None:
        self.raw.close()
        self._declare_connection.release()


def measure(paths: Paths, args: argparse.Namespace) -> dict[str, list[float]]:
    runs = {
        "delay loop (confirmed)": (paths.delay_loop, args.loop_messages),
        "bare Celery apply_async (confirm_publish)": (paths.bare_apply_async, args.loop_messages),
        "bulk import (enqueue_many)": (paths.bulk, args.messages),
        "raw py-amqp, async confirms": (paths.raw_async, args.messages),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    # Untimed: one-time costs (connections, channels, the ledger's schema on first use) are
    # not per-message costs, and they fell on whichever path ran first.
    for function, _ in runs.values():
        function(10, f"w{uuid.uuid4().hex[:8]}")
    for round_ in range(args.rounds):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            function, count = runs[name]
            paths.purge()
            tag = f"b{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            function(count, tag)
            rates[name].append(count / (time.perf_counter() - started))
            print(f"  round {round_ + 1}: {name}: {rates[name][-1]:,.0f} msg/s", flush=True)
    paths.purge()
    return rates


def memory(args: argparse.Namespace, workdir: Path) -> dict[int, int]:
    growth: dict[int, int] = {}
    for lines in (args.memory_lines // 10, args.memory_lines):
        done = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(lines), "--workdir", str(workdir)],
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
            env=os.environ,
            cwd=ROOT,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["confirmed"] == lines, result
        growth[lines] = result["growth_kib"]
        print(
            f"  {lines:,} lines: peak RSS growth {growth[lines]:,} KiB"
            f" (process peak {result['peak_kib'] / 1024:.0f} MiB)",
            flush=True,
        )
    return growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000, help="per bulk / raw round")
    parser.add_argument("--loop-messages", type=int, default=None, help="per delay loop round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-lines", type=int, default=100_000)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--bare-queue-type", choices=["quorum", "classic"], default="quorum")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.workdir)
        return
    args.loop_messages = args.loop_messages or min(args.messages, 2000)

    vhost = f"mcard-bench-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        with tempfile.TemporaryDirectory(prefix="mcard-bench-") as tmp:
            workdir = Path(tmp)
            configure(vhost, str(workdir / "ledger.sqlite3"))
            paths = Paths(workdir, args.bare_queue_type)
            print(
                f"vhost {vhost}; {args.rounds} rounds; {args.loop_messages} msgs per loop round,"
                f" {args.messages} per bulk/raw round; queue types: mcard"
                f" {paths.app.conf.mcard_queue_type}, bare {args.bare_queue_type}",
                flush=True,
            )
            rates = measure(paths, args)
            growth = None if args.no_memory else memory(args, workdir)
            paths.close()
    finally:
        rabbitmqctl("delete_vhost", vhost)

    median = {name: statistics.median(values) for name, values in rates.items()}
    names = list(median)
    print()
    print(f"{'path':<45} {'median msg/s':>12}   rounds")
    for name in names:
        rounds = ", ".join(f"{value:,.0f}" for value in rates[name])
        print(f"{name:<45} {median[name]:>12,.0f}   {rounds}")
    delay, bare, bulk, raw = (median[name] for name in names)
    print()
    print(f"delay / bare apply_async   {delay / bare:6.2f}   (target >= 1.0)")
    print(f"bulk / delay loop          {bulk / delay:6.2f}   (target >= 8)")
    print(f"bulk / raw async confirms  {bulk / raw:6.2f}   (target >= 0.5)")
    if growth:
        small, large = sorted(growth)
        print(
            f"peak RSS growth: {small:,} lines {growth[small] / 1024:.1f} MiB,"
            f" {large:,} lines {growth[large] / 1024:.1f} MiB"
        )


if __name__ == "__main__":
    main()
