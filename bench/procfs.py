"""What /proc says of the worker benchmark's processes: their trees, CPU time and memory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROLES = ("worker", "postgres", "rabbitmq")


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/pid/stat after the command name (None: the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for one in all_pids():
        fields = stat_fields(one)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(one)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """User + system CPU time so far of each of pids still running, in clock ticks."""
    ticks = {}
    for one in pids:
        fields = stat_fields(one)
        if fields is not None:
            ticks[one] = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def pids_named(name: str) -> list[int]:
    found = []
    for one in all_pids():
        try:
            if Path(f"/proc/{one}/comm").read_text().strip() == name:
                found.append(one)
        except OSError:
            continue
    return found


def cpu_by_role(worker_pids: list[int]) -> dict[str, dict[int, int]]:
    """CPU ticks so far of the workers (with their children), PostgreSQL and RabbitMQ."""
    return {
        "worker": cpu_ticks([one for pid in worker_pids for one in tree_pids(pid)]),
        "postgres": cpu_ticks(pids_named("postgres")),
        "rabbitmq": cpu_ticks(pids_named("beam.smp")),
    }


def seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds spent between two readings: a process in both counts its difference, one
    started meanwhile all its time, one gone meanwhile nothing (others' tests on a shared
    machine start and stop database backends and broker nodes: never a negative figure)."""
    return sum(max(0, ticks - before.get(pid, 0)) for pid, ticks in after.items()) / CLOCK_TICKS


@dataclass
class CpuMeter:
    """CPU time by role from the moment it is made (see :func:`cpu_by_role`)."""

    worker_pids: list[int]
    start: dict[str, dict[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.start = cpu_by_role(self.worker_pids)

    def ms_per_task(self, tasks: int) -> dict[str, float]:
        now = cpu_by_role(self.worker_pids)
        return {
            role: 1000 * seconds_between(self.start[role], now[role]) / max(1, tasks)
            for role in now
        }


def rss_kib(pid: int) -> int:
    """VmRSS summed over pid and its descendants."""
    total = 0
    for one in tree_pids(pid):
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total
