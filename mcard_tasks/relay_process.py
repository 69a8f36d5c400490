"""The worker's outbox relay in a process of its own, beside the worker's main process.

Publishing outcome events (a confirmed publish each) costs about as much Python as the
consumer's work on a request; in the worker's main process it took the same interpreter lock
as the consumer and the pool's threads. In a child process it runs on another core.

The child is started with ``spawn`` (a fresh interpreter: nothing of the worker's threads,
connections or locks), gets the worker's settings through multiprocessing's pipe (never on its
command line), builds its own app from them and runs :class:`mcard_tasks.events.OutboxRelay`.
It stops after one last bounded pass when the worker stops (SIGTERM from the worker), and on
its own within half a second when the worker is gone (a SIGKILLed worker leaves no relay
behind). A child that dies is started again after a second. Whatever it had not published
waits in the outbox, so nothing is lost whichever process dies when: a row is marked only
after the broker confirmed it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess

from mcard_tasks.config import Settings

__all__ = ["RelayProcess"]

logger = logging.getLogger(__name__)

#: Seconds between the child's looks at whether the worker is still its parent.
_PARENT_CHECK = 0.5
#: Seconds before a relay that died is started again.
_RESTART_AFTER = 1.0


class RelayProcess:
    """Runs the outbox relay of settings in a child process, and again if it dies."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
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
        process = self._context.Process(
            target=run_child,
            args=(self.settings, os.getpid()),
            name="mcard-outbox-relay",
            daemon=True,
        )
        process.start()
        self._process = process
        logger.info("outbox relay: running in process %s", process.pid)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            process.join(timeout=0.5)
            if process.exitcode is None or self._stopping.is_set():
                continue
            logger.warning(
                "outbox relay process %s exited (%s); starting another in %g s",
                process.pid,
                process.exitcode,
                _RESTART_AFTER,
            )
            if self._stopping.wait(_RESTART_AFTER):
                return
            try:
                self._spawn()
            except Exception as exc:  # keep trying: the events wait in the outbox
                logger.warning("outbox relay: cannot start its process: %s", exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child after its last pass (bounded by timeout, then killed)."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
        process = self._process
        if process is None or process.exitcode is not None:
            return
        process.terminate()  # SIGTERM: the child's last pass, then it exits
        process.join(timeout + 2.0)
        if process.exitcode is None:
            logger.warning("outbox relay process %s did not stop; killed", process.pid)
            process.kill()
            process.join(5.0)


def run_child(settings: Settings, parent: int) -> None:
    """The child: relay until SIGTERM or until the worker (parent) is gone, then a last pass."""
    # Ctrl-C in a terminal reaches the whole process group: the worker decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    terminated: list[int] = []
    # The handler only appends to a list of its own (no lock the interrupted code may hold).
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    logging.basicConfig(
        level=settings.log_level,
        format="[%(asctime)s: %(levelname)s/outbox-relay] %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its schema check's INFO lines
    from mcard_tasks.application import create_app
    from mcard_tasks.events import relay_for

    relay = relay_for(create_app(settings))
    relay.start()
    while not terminated:
        if os.getppid() != parent:
            logger.warning("outbox relay: the worker is gone; stopping")
            break
        time.sleep(_PARENT_CHECK)
    relay.stop()  # the last bounded pass: what the worker committed before it stopped
