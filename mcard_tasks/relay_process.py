"""The worker's outbox relay in a process of its own, beside the worker's main process.

Publishing outcome events (a confirmed publish each) costs about as much Python as the
consumer's work on a request; in the worker's main process it took the same interpreter lock
as the consumer and the pool's threads. In a child process it runs on another core.

The child is a fresh interpreter, ``python -m mcard_tasks.relay_process`` (not a
multiprocessing child: that would import the script that started the worker once more, and a
script without a ``__main__`` guard would start a second worker inside it). It reads what it
needs (the worker's settings, its import path and logging) as one pickle on its standard
input, never on its command line, builds its own app from the settings and runs
:class:`mcard_tasks.events.OutboxRelay`. It stops after one last bounded pass when the worker
asks (SIGTERM, or its standard input closed), and on its own when the worker is gone (a
SIGKILLed worker leaves no relay behind). A child that dies is started again, after a second,
longer if it keeps dying at once. Whatever it had not published waits in the outbox, so
nothing is lost whichever process dies when: a row is marked only after the broker confirmed it.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RelayProcess"]

logger = logging.getLogger(__name__)

#: Seconds between the child's looks at a stop request and at whether its worker is there.
_CHECK = 0.2
#: Seconds before a relay that died is started again; doubled (up to _RESTART_MAX) while
#: each lives less than _SHORT_LIFE.
_RESTART_AFTER = 1.0
_RESTART_MAX = 30.0
_SHORT_LIFE = 10.0


@dataclass
class _Order:
    """What the worker hands its relay process (on its standard input)."""

    settings: Any  # mcard_tasks.config.Settings
    sys_path: list[str]
    parent: int
    log_level: int | str
    log_file: str | None


class RelayProcess:
    """Runs the outbox relay of settings in a child process, and again if it dies."""

    def __init__(
        self, settings: Any, log_level: int | str | None = None, log_file: str | None = None
    ) -> None:
        self.settings = settings
        self.log_level = settings.log_level if log_level is None else log_level
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        self._spawn()
        self._watcher = threading.Thread(
            target=self._watch, name="mcard-outbox-relay-watch", daemon=True
        )
        self._watcher.start()

    def _spawn(self) -> None:
        order = _Order(self.settings, list(sys.path), os.getpid(), self.log_level, self.log_file)
        env = dict(os.environ)
        # The package as the worker imports it, even from a checkout that is not installed.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
        process = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, env=env, close_fds=True
        )
        assert process.stdin is not None
        try:
            process.stdin.write(pickle.dumps(order))
            process.stdin.flush()  # stays open: its end is the child's sign to stop
        except OSError as exc:  # the child died at once: the watcher starts another
            logger.warning("outbox relay: could not hand its process the settings: %s", exc)
        self._process = process
        logger.info("outbox relay: running in process %s", process.pid)

    def _watch(self) -> None:
        quick_deaths = 0
        started = time.monotonic()
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            try:
                code = process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            if self._stopping.is_set():
                return
            _close_input(process)
            short = time.monotonic() - started < _SHORT_LIFE
            quick_deaths = quick_deaths + 1 if short else 0
            delay = min(_RESTART_AFTER * 2 ** max(0, quick_deaths - 1), _RESTART_MAX)
            log = logger.error if short else logger.warning
            log(
                "outbox relay process %s exited (%s); starting another in %g s",
                process.pid,
                code,
                delay,
            )
            if self._stopping.wait(delay):
                return
            try:
                self._spawn()
            except Exception as exc:  # keep trying: the events wait in the outbox
                logger.error("outbox relay: cannot start its process: %s", exc)
            started = time.monotonic()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child after its last pass (bounded by timeout, then killed)."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
        process = self._process
        if process is None or process.poll() is not None:
            return
        # Both signs: pool children forked after the child started hold copies of its input.
        process.terminate()
        _close_input(process)
        try:
            process.wait(timeout + 2.0)
        except subprocess.TimeoutExpired:
            logger.warning("outbox relay process %s did not stop; killed", process.pid)
            process.kill()
            process.wait(5.0)


def _close_input(process: subprocess.Popen[bytes]) -> None:
    try:
        if process.stdin is not None:
            process.stdin.close()
    except OSError:  # the child is gone: nothing to tell it
        pass


def main() -> None:
    """The child: relay until asked to stop or until the worker is gone, then a last pass."""
    # Ctrl-C in a terminal reaches the whole process group: the worker decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    terminated: list[int] = []
    # The handler only appends to a list of its own (no lock the interrupted code may hold).
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    order: _Order = pickle.load(sys.stdin.buffer)
    sys.path[:] = order.sys_path
    closed = threading.Event()
    threading.Thread(target=_await_end_of_input, args=(closed,), daemon=True).start()
    logging.basicConfig(
        level=order.log_level,
        filename=order.log_file,
        format="[%(asctime)s: %(levelname)s/outbox-relay] %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its schema check's INFO lines
    from mcard_tasks.application import create_app
    from mcard_tasks.events import relay_for

    relay = relay_for(create_app(order.settings))
    relay.start()
    while not terminated and not closed.wait(_CHECK):
        if os.getppid() != order.parent:
            logger.warning("outbox relay: the worker is gone; stopping")
            break
    relay.stop()  # the last bounded pass: what the worker committed before it stopped


def _await_end_of_input(closed: threading.Event) -> None:
    try:
        sys.stdin.buffer.read()  # returns at end of input: the worker closed it, or is gone
    finally:
        closed.set()


if __name__ == "__main__":
    main()
