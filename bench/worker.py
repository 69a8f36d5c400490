"""Worker throughput, latency, scaling and broker connections of mcard-tasks, against bare Celery.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/worker.py [--requests N] [--rounds R] [--concurrency C]

Everything runs in a temporary RabbitMQ vhost (rabbitmqctl add_vhost / delete_vhost) and a
temporary PostgreSQL database (created and dropped with psycopg on MCARD_BENCH_POSTGRES,
default postgresql://postgres@127.0.0.1:5432/postgres). Workers are real subprocesses
(``python -m mcard_tasks.worker``; the baseline ``celery -A bench.bare_app worker``), each
stopped with SIGTERM then SIGKILL, whatever happens.

1. Drain rate: N ``mcard.single_mint`` requests are enqueued with no worker running; a worker
   starts, and the time runs from its first ping answer until all N outcomes are in the
   ledger. Requests finished before the ping answered are left out of the rate. The baseline
   is bare Celery draining N no-op tasks with the same settings (prefork, same concurrency,
   prefetch 1, late acks, task events, JSON, publisher confirms, a durable queue of the same
   type), until its queue is empty and the worker holds nothing. mcard runs as one
   ``python -m mcard_tasks.worker`` process with default settings (threads, batches on) at
   concurrency 2 and 16, and with batches off (MCARD_BATCH=false, threads -c 8: the
   per-message path). The raw limit is a bare py-amqp consumer applying the same requests
   250 per PostgreSQL transaction with one multiple-ack each (bench/raw_drain.py).
   Rounds alternate. Each variant's CPU time per task is shown for the worker processes,
   PostgreSQL and RabbitMQ (from /proc), against what 2 cores allow at the baseline's rate.
2. A simulated remote issuer (MCARD_ISSUER=simulated, 50 ms): rate vs concurrency / latency.
3. Latency from just before ``delay()`` to the committed outcome at a steady offered load.
4. Scaling: N and 10N, time ratio and the worker's RSS (worker + children) after each.
5. Broker connections and channels a worker holds at concurrency 2, 8 and 32.
6. A py-spy profile of one drain (``--no-profile`` to skip), summarized by where time goes.

This file runs the sections and prints the table; bench/worker_env.py sets up what they run
on (the apps, probes, enqueueing, worker processes), bench/worker_measure.py measures,
bench/procfs.py reads CPU and memory from /proc, bench/profiling.py drives py-spy, and
bench/common.py holds what the enqueue benchmark shares.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    median,
    median_table,
    ratio,
    ratio_line,
    rotations,
    say,
    temporary_database,
    temporary_vhost,
    unique,
)
from bench.procfs import ROLES
from bench.profiling import summarize_profile
from bench.worker_env import Environment, environment, worker_logs
from bench.worker_measure import (
    Drain,
    count_connections,
    drain_bare,
    drain_mcard,
    drain_raw,
    measure_latency,
)

#: The drain variants in the order of the first round (each further round starts one on).
DRAIN_KINDS = ("batch2", "bare", "batch16", "raw", "nobatch", "timed")
#: ... and in the table (bare and raw are the baselines the ratios are taken against).
TABLE_KINDS = ("batch2", "batch16", "nobatch", "timed", "bare", "raw")

Section = Callable[[Environment, argparse.Namespace], list[str]]


# --- 1. drain rate ---------------------------------------------------------------------------


def drain_once(env: Environment, kind: str, n: int, c: int) -> Drain:
    if kind == "batch2":
        return drain_mcard(env, "batch2", n, None, 2)
    if kind == "batch16":
        return drain_mcard(env, "batch16", n, None, 16)
    if kind == "nobatch":
        return drain_mcard(env, "nobatch", n, None, None, batch="false")
    if kind == "raw":
        return drain_raw(env, n)
    if kind == "timed":
        # batch2 with the worker timings on (MCARD_METRICS_DIR): what the histograms cost.
        timings = str(env.workdir / "metrics")
        return drain_mcard(env, "timed", n, None, 2, metrics_dir=timings)
    return drain_bare(env, n, c)


def drain_labels(c: int) -> dict[str, str]:
    return {
        "batch2": "mcard single_mint, default settings, -c 2",
        "batch16": "mcard single_mint, default settings, -c 16",
        "nobatch": "mcard single_mint, MCARD_BATCH=false (threads -c 8)",
        "timed": "mcard single_mint, default settings, -c 2, MCARD_METRICS_DIR",
        "bare": f"bare Celery no-op, prefork -c {c}",
        "raw": "raw py-amqp + PostgreSQL, 250 per transaction",
    }


def drain_rates(env: Environment, args: argparse.Namespace) -> list[str]:
    n, c = args.requests, args.concurrency
    say(f"1. drain rate: {n} requests per round, {args.rounds} rounds, concurrency {c}")
    runs: dict[str, list[Drain]] = {kind: [] for kind in DRAIN_KINDS}
    for round_, kind in rotations(DRAIN_KINDS, args.rounds):
        drain = drain_once(env, kind, n, c)
        runs[kind].append(drain)
        say(
            f"  round {round_ + 1}: {kind:8} {drain.rate:8,.0f} /s"
            f"  ({drain.seconds:.2f} s, {drain.done_before_ready} done before ping)"
        )
    return drain_table(runs, drain_labels(c))


def drain_table(runs: dict[str, list[Drain]], labels: dict[str, str]) -> list[str]:
    rates = {kind: [drain.rate for drain in runs[kind]] for kind in TABLE_KINDS}
    medians = {kind: median(values) for kind, values in rates.items()}
    table = ["1. Drain rate (tasks/s, from ping to all outcomes recorded / queue empty)"]
    by_label = {labels[kind]: rates[kind] for kind in TABLE_KINDS}
    table += median_table(("variant", "median"), by_label, widths=(52, 8), indent="   ")
    for kind in TABLE_KINDS[:3]:
        share = ratio(medians[kind], medians["bare"])
        target = ">= 3.0" if kind.startswith("batch") else ">= 1.0"
        table.append("   " + ratio_line(f"ratio mcard {kind} / bare", share, target))
    for kind in TABLE_KINDS[:2]:
        share = ratio(medians[kind], medians["raw"])
        table.append("   " + ratio_line(f"ratio mcard {kind} / raw", share, ">= 0.15"))
    # Per-round ratios (alternating rounds: each against the same round's baseline).
    for kind in TABLE_KINDS[:2]:
        rounds = ", ".join(f"{a / b:.2f}" for a, b in zip(rates[kind], rates["bare"], strict=False))
        table.append(f"   per round {kind} / bare: {rounds}")
    for kind in TABLE_KINDS[:2]:
        out = median(drain.events_rate or 0.0 for drain in runs[kind])
        table.append(
            f"   {kind}: every outcome event published too, median {out:,.0f}/s"
            f" ({ratio(out, medians['bare']):.2f}x bare)"
        )
    timed = ratio(medians["timed"], medians["batch2"])
    table.append("   " + ratio_line("ratio timings on / off (timed / batch2)", timed, "~ 1.0"))
    return table + cpu_table(runs, labels, medians["bare"])


def cpu_table(runs: dict[str, list[Drain]], labels: dict[str, str], bare: float) -> list[str]:
    """CPU ms per task by role, the median of each variant's rounds."""
    table = [
        f"   CPU ms per task, medians (2 cores: at most {2000 / bare:.2f} ms in all to match bare)",
        f"   {'':<30}" + "".join(f"{role:>10}" for role in (*ROLES, "all")),
    ]
    for kind in TABLE_KINDS[:-1]:  # the raw consumer runs in this process: not metered
        cpu = [median(drain.cpu_ms.get(role, 0.0) for drain in runs[kind]) for role in ROLES]
        name = labels[kind].split(",")[0].split(" single")[0] + " " + kind
        table.append(f"   {name:<30}" + "".join(f"{value:>10.2f}" for value in (*cpu, sum(cpu))))
    return table


# --- 2. to 6. ----------------------------------------------------------------------------------


def simulated(env: Environment, args: argparse.Namespace) -> list[str]:
    n, latency_ms, sim_c = args.requests, args.issuer_latency_ms, args.issuer_concurrency
    ideal = sim_c / (latency_ms / 1000)
    say(
        f"2. simulated issuer {latency_ms:g} ms, batch mode, threads -c {sim_c} ({ideal:,.0f}/s"
        " = concurrency / latency)"
    )
    sim = drain_mcard(
        env, "simulated", n, "threads", sim_c,
        issuer="simulated", issuer_latency_ms=f"{latency_ms:g}",
    )  # fmt: skip
    say(f"  {sim.rate:,.0f} /s ({sim.seconds:.2f} s)")
    return [
        "",
        f"2. Simulated issuer in batch mode ({latency_ms:g} ms per call, whatever its size),"
        f" threads -c {sim_c}, {n} requests",
        f"   rate {sim.rate:,.0f}/s against concurrency / latency {ideal:,.0f}/s ="
        f" {sim.rate / ideal:.2f}x   (target >= 5)",
    ]


def latency(env: Environment, args: argparse.Namespace) -> list[str]:
    say(f"3. latency at {args.rate:g} requests/s for {args.seconds:g} s")
    lat = measure_latency(env, args.rate, args.seconds)
    say(f"  {asdict(lat)}")
    return [
        "",
        f"3. Latency delay() -> committed outcome, default pool, offered {lat.offered:.0f}/s"
        f" for {args.seconds:g} s (producer at most {lat.behind_ms:.0f} ms behind schedule,"
        f" {lat.republished} publishes retried)",
        f"   recorded_at: p50 {lat.p50:.1f} ms, p99 {lat.p99:.1f} ms, max {lat.max:.1f} ms"
        "   (target p99 < 20 ms)",
        f"   seen by a 5 ms ledger poller: p50 {lat.seen_p50:.1f} ms, p99 {lat.seen_p99:.1f} ms",
    ]


def scaling(env: Environment, args: argparse.Namespace) -> list[str]:
    n = args.requests
    say(f"4. scaling: {n} and {10 * n} requests, default pool")
    drains = []
    for count in (n, 10 * n):
        drains.append(drain_mcard(env, "scale", count, None, None))
        say(f"  {count}: {drains[-1].seconds:.2f} s, RSS {drains[-1].rss_kib / 1024:.0f} MiB")
    table = ["", "4. Scaling, default pool (threads -c 8)"]
    for drain in drains:
        table.append(
            f"   {drain.requests:>7,} requests: {drain.seconds:7.2f} s ({drain.rate:,.0f}/s),"
            f" worker RSS after {drain.rss_kib / 1024:6.1f} MiB"
        )
    small, large = drains
    table.append(
        f"   time ratio {large.seconds / small.seconds:.1f}x (target ~10x);"
        f" RSS ratio {large.rss_kib / small.rss_kib:.2f} (target ~1)"
    )
    return table


def connections(env: Environment, args: argparse.Namespace) -> list[str]:
    say("5. broker connections at concurrency 2, 8, 32 (default pool)")
    table = ["", "5. Broker connections held by one worker (default pool, after 200 tasks)"]
    for concurrency in (2, 8, 32):
        found = count_connections(env, concurrency)
        say(f"  -c {concurrency}: {asdict(found)}")
        others = f"; other connections on the vhost: {found.others}" if found.others else ""
        if found.stalled:
            others += f"; {found.stalled}"
        table.append(
            f"   -c {concurrency:<3} connections {found.connections:>2}, channels"
            f" {found.channels:>3}{others}"
        )
    return table


def profile(env: Environment, args: argparse.Namespace) -> list[str]:
    output, pool = Path(args.profile_output), args.profile_pool
    say(f"6. profile: py-spy on a drain of {args.profile_requests} ({pool})")
    prefork = pool == "prefork"
    drain = drain_mcard(
        env, "profile", args.profile_requests, pool if prefork else None,
        args.concurrency if prefork else None, profile=output,
    )  # fmt: skip
    return [
        "",
        f"6. Profile of an mcard drain of {args.profile_requests:,} under py-spy ({pool},"
        f" {drain.rate:,.0f}/s), sampled from the worker's start (its start-up included)",
        *("   " + line for line in summarize_profile(output)),
    ]


SECTIONS: dict[str, Section] = {
    "1": drain_rates,
    "2": simulated,
    "3": latency,
    "4": scaling,
    "5": connections,
    "6": profile,
}


def run(env: Environment, args: argparse.Namespace) -> list[str]:
    wanted = set(args.only or "123456") - ({"6"} if args.no_profile else set())
    table: list[str] = []
    for number, section in SECTIONS.items():
        if number in wanted:
            table += section(env, args)
    return table


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="N per drain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="prefork children (mcard, bare)")
    parser.add_argument("--bare-queue-type", choices=["quorum", "classic"], default="quorum")
    parser.add_argument("--issuer-latency-ms", type=float, default=50.0)
    parser.add_argument("--issuer-concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=100.0, help="latency: offered requests/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="latency: how long")
    parser.add_argument("--timeout", type=float, default=60.0, help="base bound of every drain")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--only", default=None, help="sections to run, e.g. 15 (default all)")
    parser.add_argument("--profile-pool", choices=["prefork", "threads"], default="prefork")
    parser.add_argument("--profile-requests", type=int, default=2000)
    parser.add_argument("--profile-output", default="/tmp/mcard-worker-profile.txt")
    parser.add_argument(
        "--profile-gil", action="store_true", help="sample only the thread holding the GIL"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    suffix = unique("")
    database = f"mcard_bench_{suffix}"
    started = time.monotonic()
    with (
        temporary_vhost(f"mcard-bench-{suffix}") as vhost,
        temporary_database(database) as database_url,
        worker_logs() as logs,
        environment(args, vhost, database_url, logs) as env,
    ):
        table = run(env, args)
    print()
    print(f"vhost {vhost}, database {database} (both removed); {time.monotonic() - started:.0f} s")
    print("\n".join(table))


if __name__ == "__main__":
    main()
