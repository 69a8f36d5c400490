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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    configure,
    median,
    median_table,
    publish_raw_confirmed,
    ratio,
    ratio_line,
    raw_connection,
    request_lines,
    rotations,
    say,
    temporary_vhost,
    unique,
)

BARE_QUEUE = "bench.bare"


def write_requests(path: Path, count: int, tag: str) -> Path:
    with path.open("w") as out:
        for line in request_lines(count, tag):
            out.write(line + "\n")
    return path


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(lines: int, workdir: Path) -> None:
    """In a fresh process: the peak RSS growth of importing `lines` requests."""
    from mcard_tasks.bulk import enqueue_many

    tag = unique("")
    enqueue_many(write_requests(workdir / f"warm-{tag}.jsonl", 200, f"warm{tag}"))
    path = write_requests(workdir / f"mem-{tag}.jsonl", lines, f"mem{tag}")
    before = peak_rss_kib()
    report = enqueue_many(path)
    peak = peak_rss_kib()
    result = {"growth_kib": peak - before, "peak_kib": peak, "confirmed": report.confirmed}
    print(json.dumps(result))


class Paths:
    """The four publishing paths, on one vhost."""

    def __init__(self, workdir: Path, vhost: str, bare_queue_type: str) -> None:
        from mcard_tasks import app
        from mcard_tasks.specs import task_names
        from mcard_tasks.tasks import single_mint

        self.workdir = workdir
        self.app = app
        self.single_mint = single_mint
        self.task_names = task_names()
        arguments = {"x-queue-type": bare_queue_type}
        self.noop = self._bare_task(arguments)
        # The raw baseline's socket stays blocking, as py-amqp leaves it.
        self.raw = raw_connection(vhost, timeout=None)
        self.channel = self.raw.channel()
        self._declare(arguments)
        self.raw_headers, self.raw_properties = self._raw_message_shape()

    def _bare_task(self, arguments: dict[str, str]) -> Any:
        """Bare Celery's no-op task, published with kombu's per-message confirms."""
        from celery import Celery
        from kombu import Queue

        bare = Celery("bare", broker=self.app.conf.broker_url)
        bare.conf.update(
            broker_transport_options={"confirm_publish": True},
            # Like for like: mcard-tasks sends Flower's task-sent events, so does the baseline.
            task_send_sent_event=self.app.conf.task_send_sent_event,
            task_queues=[Queue(BARE_QUEUE, durable=True, queue_arguments=arguments)],
            task_default_queue=BARE_QUEUE,
            task_serializer="json",
        )

        @bare.task(name="bench.noop")
        def noop(**kwargs: Any) -> None:
            return None

        return noop

    def _declare(self, arguments: dict[str, str]) -> None:
        from mcard_tasks.topology import build_topology

        self._declare_connection = self.app.connection_for_write()
        build_topology(self.app.settings).declare(self._declare_connection.default_channel)
        self.channel.queue_declare(BARE_QUEUE, durable=True, auto_delete=False, arguments=arguments)

    def _raw_message_shape(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The raw path publishes the very message shape delay() publishes."""
        from mcard_tasks.messages import task_message
        from mcard_tasks.specs import validate_payload

        payload = validate_payload("mcard.single_mint", {"card_id": "c", "owner": "o"})
        sample = task_message(self.app, task="mcard.single_mint", request_id="r-0", payload=payload)
        return sample.headers, sample.properties

    def purge(self) -> None:
        for name in (*self.task_names, BARE_QUEUE):
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
        publish_raw_confirmed(self.raw, self._raw_messages(count, tag), window)

    def _raw_messages(self, count: int, tag: str) -> Iterator[tuple[Any, str, str]]:
        import amqp

        for i in range(count):
            headers = dict(self.raw_headers, id=f"{tag}-r{i}", root_id=f"{tag}-r{i}")
            body = json.dumps([[], {"card_id": f"{tag}-{i}", "owner": "bench"}, {}])
            message = amqp.Message(body, application_headers=headers, **self.raw_properties)
            yield message, "mcard", "mcard.single_mint"

    def close(self) -> None:
        self.raw.close()
        self._declare_connection.release()


def measure(paths: Paths, args: argparse.Namespace) -> dict[str, list[float]]:
    runs: dict[str, tuple[Callable[[int, str], None], int]] = {
        "delay loop (confirmed)": (paths.delay_loop, args.loop_messages),
        "bare Celery apply_async (confirm_publish)": (paths.bare_apply_async, args.loop_messages),
        "bulk import (enqueue_many)": (paths.bulk, args.messages),
        "raw py-amqp, async confirms": (paths.raw_async, args.messages),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    # Untimed: one-time costs (connections, channels, the ledger's schema on first use) are
    # not per-message costs, and they fell on whichever path ran first.
    for function, _ in runs.values():
        function(10, unique("w"))
    for round_, name in rotations(list(runs), args.rounds):
        function, count = runs[name]
        paths.purge()
        tag = unique("b")
        started = time.perf_counter()
        function(count, tag)
        rates[name].append(count / (time.perf_counter() - started))
        say(f"  round {round_ + 1}: {name}: {rates[name][-1]:,.0f} msg/s")
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
        say(
            f"  {lines:,} lines: peak RSS growth {growth[lines]:,} KiB"
            f" (process peak {result['peak_kib'] / 1024:.0f} MiB)"
        )
    return growth


def report(rates: dict[str, list[float]], growth: dict[int, int] | None) -> None:
    print()
    print("\n".join(median_table(("path", "median msg/s"), rates, widths=(45, 12))))
    delay, bare, bulk, raw = (median(values) for values in rates.values())
    print()
    print(ratio_line("delay / bare apply_async", ratio(delay, bare), ">= 1.0", width=25))
    print(ratio_line("bulk / delay loop", ratio(bulk, delay), ">= 8", width=25))
    print(ratio_line("bulk / raw async confirms", ratio(bulk, raw), ">= 0.5", width=25))
    if growth:
        small, large = sorted(growth)
        print(
            f"peak RSS growth: {small:,} lines {growth[small] / 1024:.1f} MiB,"
            f" {large:,} lines {growth[large] / 1024:.1f} MiB"
        )


def parse_args() -> argparse.Namespace:
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
    args.loop_messages = args.loop_messages or min(args.messages, 2000)
    return args


def main() -> None:
    args = parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.workdir)
        return
    with (
        temporary_vhost(unique("mcard-bench-")) as vhost,
        tempfile.TemporaryDirectory(prefix="mcard-bench-") as tmp,
    ):
        workdir = Path(tmp)
        configure(vhost, f"sqlite:///{workdir / 'ledger.sqlite3'}")
        paths = Paths(workdir, vhost, args.bare_queue_type)
        say(
            f"vhost {vhost}; {args.rounds} rounds; {args.loop_messages} msgs per loop round,"
            f" {args.messages} per bulk/raw round; queue types: mcard"
            f" {paths.app.settings.queue_type}, bare {args.bare_queue_type}"
        )
        rates = measure(paths, args)
        growth = None if args.no_memory else memory(args, workdir)
        paths.close()
    report(rates, growth)


if __name__ == "__main__":
    main()
