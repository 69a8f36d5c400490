"""Helpers for the cluster tests: the local 3-node RabbitMQ cluster of scripts/rabbitmq-cluster,
its nodes and quorum leaders, and a producer subprocess that publishes through the failover list.

No fixtures here, and nothing imports tests.conftest: this module also runs as the producer
subprocess (``python -m tests.cluster produce``), whose MCARD_BROKER_URL must stay the
cluster's failover list and not become the test session's vhost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "rabbitmq-cluster"
NODES = (1, 2, 3)
TASK_QUEUE = "mcard.single_mint"
OWNER = "alice"


@cache
def host() -> str:
    """The short host name, as scripts/rabbitmq-cluster names the nodes (`hostname -s`)."""
    return subprocess.run(
        ["hostname", "-s"], capture_output=True, text=True, check=True
    ).stdout.strip()


def node_name(n: int) -> str:
    return f"clu{n}@{host()}"


def node_number(node: str) -> int:
    found = re.fullmatch(r"clu(\d+)@.*", node)
    assert found, f"not a node of the test cluster: {node}"
    return int(found.group(1))


def node_url(n: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:568{n}//"


def failover_url(first: str | None = None) -> str:
    """kombu's failover list of the three nodes, node `first` (a node name) first."""
    order = list(NODES)
    if first is not None:
        lead = node_number(first)
        order = [lead, *(n for n in NODES if n != lead)]
    return ";".join(node_url(n) for n in order)


def cluster_prerequisites() -> str | None:
    """Why the cluster cannot be started here, or None if it can."""
    for tool in ("rabbitmq-server", "rabbitmqctl", "rabbitmq-queues"):
        if shutil.which(tool) is None:
            return f"{tool} is not on the PATH"
    if os.geteuid() != 0:
        return "scripts/rabbitmq-cluster needs root (the nodes run as the rabbitmq user)"
    return None


def cluster_script(command: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    """Run `scripts/rabbitmq-cluster command`; its output is kept for error messages."""
    return subprocess.run(
        [str(SCRIPT), command], capture_output=True, text=True, timeout=timeout, check=False
    )


def ctl(node: str, *args: str, tool: str = "rabbitmqctl", timeout: float = 30) -> str:
    """rabbitmqctl (or rabbitmq-queues) against one node of the cluster; raises on failure."""
    done = subprocess.run(
        [tool, "-n", node, "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{tool} -n {node} {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def running_nodes(via: str) -> list[str]:
    """The running members of the cluster, as node `via` sees them ([] if it does not answer)."""
    try:
        status = json.loads(ctl(via, "cluster_status", "--formatter", "json", timeout=15))
    except (RuntimeError, subprocess.SubprocessError, ValueError):
        return []
    return list(status.get("running_nodes", []))


def quorum_members(queue: str, via: str) -> dict[str, str]:
    """Each member node of a quorum queue and its Raft state ({} if `via` cannot tell)."""
    try:
        rows = json.loads(
            ctl(via, "quorum_status", queue, "--formatter", "json", tool="rabbitmq-queues")
        )
    except (RuntimeError, subprocess.SubprocessError, ValueError):
        return {}
    return {row["Node Name"]: str(row["Raft State"]) for row in rows}


def queue_leader(queue: str, down: tuple[str, ...] = ()) -> str | None:
    """The node leading a quorum queue, asked of the nodes not in `down`; None if none leads."""
    for n in NODES:
        via = node_name(n)
        if via in down:
            continue
        states = quorum_members(queue, via)
        leaders = [node for node, state in states.items() if state == "leader"]
        if leaders:
            return leaders[0]
    return None


def node_os_pid(node: str) -> int:
    """The OS process id of a node's Erlang VM."""
    return int(ctl(node, "eval", "os:getpid().").strip().strip('"'))


def kill_node(node: str) -> int:
    """SIGKILL a node's VM; return its pid once the process is gone."""
    pid = node_os_pid(node)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node} (pid {pid}) survived SIGKILL for 10 s")
        time.sleep(0.05)
    return pid


def node_processes() -> list[str]:
    """Any process of this machine started as a cluster node (RABBITMQ_NODENAME=cluN@host in
    its environment; the node name is not on the command line, so `pgrep -f` cannot see it)."""
    names = {f"RABBITMQ_NODENAME={node_name(n)}".encode() for n in NODES}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
            command = (proc / "comm").read_text().strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for name in names & environ:
            found.append(f"{name.decode().split('=', 1)[1]}: pid {proc.name} ({command})")
    return found


def recovery_seconds(commit_times: list[datetime], fault_at: float) -> float:
    """Seconds from the fault until outcomes flowed again: the end of the longest pause in
    the commits after the fault (the commits of tasks already running at the fault land at
    once, then nothing commits until the workers consume again)."""
    after = sorted(t.timestamp() for t in commit_times if t.timestamp() >= fault_at)
    if not after:
        return float("nan")
    marks = [fault_at, *after]
    longest = max(range(1, len(marks)), key=lambda i: marks[i] - marks[i - 1])
    return marks[longest] - fault_at


def count_runs(logs: list[Path], request_prefix: str) -> int:
    """How many task runs the workers logged for the requests whose IDs start with prefix
    (a redelivered message runs again and is answered from the ledger)."""
    pattern = re.compile(rf"\[{re.escape(request_prefix)}\S*\] succeeded in")
    return sum(len(pattern.findall(log.read_text(errors="replace"))) for log in logs)


@dataclass
class ProducerRun:
    """A producer subprocess publishing single_mint requests through the failover list."""

    process: subprocess.Popen[str]
    requests_file: Path
    report_file: Path

    @classmethod
    def start(
        cls,
        requests: dict[str, str],
        broker_url: str,
        database_url: str,
        folder: Path,
        rate: float,
        deadline: float = 90,
    ) -> ProducerRun:
        requests_file = folder / "requests.json"
        report_file = folder / "producer-report.json"
        requests_file.write_text(json.dumps(list(requests.items())))
        env = dict(os.environ, MCARD_BROKER_URL=broker_url, MCARD_DATABASE_URL=database_url)
        log = (folder / "producer.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.cluster",
                "produce",
                str(requests_file),
                str(report_file),
                str(rate),
                str(deadline),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        log.close()
        return cls(process, requests_file, report_file)

    def wait(self, timeout: float) -> dict[str, Any]:
        """The producer's report once it has exited (killed after timeout seconds)."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        log = self.report_file.parent / "producer.log"
        if self.process.returncode != 0 or not self.report_file.exists():
            raise RuntimeError(
                f"producer exited {self.process.returncode}: {log.read_text()[-3000:]}"
            )
        report: dict[str, Any] = json.loads(self.report_file.read_text())
        return report

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def produce(requests_file: Path, report_file: Path, rate: float, deadline: float) -> None:
    """Publish each request, paced at `rate` per second. A publish that fails (its node just
    stopped, its confirm lost) is retried with the SAME request ID until `deadline` seconds
    after its first try: idempotent, the ledger absorbs a message that arrives twice."""
    from mcard_tasks.tasks import single_mint

    requests: list[list[str]] = json.loads(requests_file.read_text())
    started = time.monotonic()
    confirmed, failures, unsent, errors = 0, 0, [], []
    slowest, slowest_at = 0.0, 0.0
    for i, (request_id, card) in enumerate(requests):
        first_try = time.monotonic()
        while True:
            try:
                single_mint.apply_async(
                    kwargs={"card_id": card, "owner": OWNER}, task_id=request_id
                )
                confirmed += 1
                break
            except Exception as exc:  # whatever the broker did: try the same request again
                failures += 1
                errors.append(f"{request_id}: {type(exc).__name__}: {exc}")
                if time.monotonic() - first_try > deadline:
                    unsent.append(request_id)
                    break
                time.sleep(0.2)
        took = time.monotonic() - first_try
        if took > slowest:
            slowest, slowest_at = took, time.time() - took
        # Pace the stream, so it is still running when the fault comes.
        pause = started + (i + 1) / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    report = {
        "requests": len(requests),
        "confirmed": confirmed,
        "publish_failures": failures,
        "unsent": unsent,
        "errors": errors[:20],
        "slowest_publish_s": round(slowest, 3),
        "slowest_publish_started_at": slowest_at,
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    report_file.write_text(json.dumps(report))


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "produce":
        sys.exit("usage: python -m tests.cluster produce REQUESTS REPORT RATE DEADLINE")
    produce(Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
