"""A private PostgreSQL server for tests that stop and restart their ledger's database.

The shared PostgreSQL of the test services is never stopped (other test runs use it): a test
that needs an outage gets a server of its own, in a fresh temporary directory, on a free port
of 127.0.0.1, with trust authentication. It runs as the ``postgres`` user (PostgreSQL refuses
to run as root) and is stopped and removed at the end, pass or fail.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["PrivatePostgres", "private_postgres_server"]

#: Every wait on the server is bounded (pg_ctl -t, subprocess timeouts).
WAIT = 30
FIRST_PORT, PORTS = 55432, 1000
USER = "postgres"


def _bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binaries (Debian layout), else initdb on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False  # something listens there
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports() -> Iterator[int]:
    """Free ports from 55432 up, from a random start (other runs may pick ports too)."""
    start = random.randrange(PORTS)
    for offset in range(PORTS):
        port = FIRST_PORT + (start + offset) % PORTS
        if _port_is_free(port):
            yield port


@dataclass
class PrivatePostgres:
    """One PostgreSQL cluster in root, owned by the postgres user."""

    bin_dir: Path
    root: Path
    port: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", USER, "--", *args],
            capture_output=True,
            text=True,
            timeout=WAIT + 30,
            check=False,
        )

    def initdb(self) -> None:
        done = self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-w", "-t", str(WAIT), *args
        )

    def start(self) -> None:
        """Start the server (on its port, or on a free one the first time) and wait for it."""
        ports = [self.port] if self.port else _free_ports()
        problems = []
        for port in ports:
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={self.root}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            done = self._pg_ctl("-l", str(self.log), "-o", options, "start")
            if done.returncode == 0:
                self.port = port
                return
            problems.append(f"port {port}: {done.stdout}{done.stderr}")
            if len(problems) >= 3:
                break
        raise RuntimeError(
            "the private PostgreSQL did not start: "
            + "; ".join(problems)
            + (self.log.read_text()[-2000:] if self.log.exists() else "")
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are closed) and wait for it."""
        done = self._pg_ctl("-m", "fast", "stop")
        if done.returncode != 0 and self.running():
            raise RuntimeError(f"the private PostgreSQL did not stop: {done.stdout}{done.stderr}")

    def running(self) -> bool:
        return self._pg_ctl("status").returncode == 0

    def restart(self) -> None:
        self.stop()
        self.start()


def _dispose_engines(url: str) -> None:
    """Close this process's pooled connections to url (before the server goes away)."""
    from mcard_tasks.database import _ENGINES, normalize_url

    for (_, name), engine in list(_ENGINES.items()):
        if name.split(" ", 1)[0] == normalize_url(url):
            engine.dispose()


@contextmanager
def private_postgres_server() -> Iterator[PrivatePostgres]:
    """A running private PostgreSQL; stopped and its directory removed on exit.

    Skips the test when PostgreSQL's binaries or the postgres user are missing.
    """
    bin_dir = _bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed")
    if shutil.which("runuser") is None:
        pytest.skip("runuser is needed to run PostgreSQL as the postgres user")
    import pwd

    try:
        owner = pwd.getpwnam(USER)
    except KeyError:
        pytest.skip("there is no postgres user to run a private PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="mcard-private-pg-"))
    os.chown(root, owner.pw_uid, owner.pw_gid)
    server = PrivatePostgres(bin_dir=bin_dir, root=root)
    try:
        server.initdb()
        server.start()
        yield server
    finally:
        try:
            if server.port:
                _dispose_engines(server.url)
            if server.data.exists() and server.running():
                server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
