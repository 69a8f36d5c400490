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


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of pids (a process gone meanwhile counts 0)."""
    ticks = 0
    for one in pids:
        fields = stat_fields(one)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def pids_named(name: str) -> list[int]:
    found = []
    for one in all_pids():
        try:
            if Path(f"/proc/{one}/comm").read_text().strip() == name:
                found.append(one)
        except OSError:
            continue
    return found


def cpu_by_role(worker_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of the workers (with their children), PostgreSQL and RabbitMQ."""
    return {
        "worker": sum(cpu_seconds(tree_pids(pid)) for pid in worker_pids),
        "postgres": cpu_seconds(pids_named("postgres")),
        "rabbitmq": cpu_seconds(pids_named("beam.smp")),
    }


@dataclass
class CpuMeter:
    """CPU time by role from the moment it is made (see :func:`cpu_by_role`)."""

    worker_pids: list[int]
    start: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.start = cpu_by_role(self.worker_pids)

    def ms_per_task(self, tasks: int) -> dict[str, float]:
        now = cpu_by_role(self.worker_pids)
        return {role: 1000 * (now[role] - self.start[role]) / max(1, tasks) for role in now}


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
