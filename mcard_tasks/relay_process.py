"""The worker's outbox relay in a process of its own, beside the worker's main process.

Publishing outcome events (a confirmed publish each) costs about as much Python as the
consumer's work on a request; in the worker's main process it took the same interpreter lock
as the consumer and the pool's threads. In a child process it runs on another core.

The child is a fresh interpreter, ``python -P -m mcard_tasks.relay_process`` with the worker's
import path (not a multiprocessing child: that would import the script that started the
worker once more, and a script without a ``__main__`` guard would start a second worker inside
it). It reads what it needs (the worker's settings and logging) as one pickle on its standard
input, never on its command line, builds its own app from the settings and runs
:class:`mcard_tasks.events.OutboxRelay`. It runs in a session of its own and ignores SIGINT
and SIGTERM (held from its fork until then): a signal to the worker's process group (Ctrl-C,
systemd, an init) must not end it before the worker's pool has committed its last requests.
It stops after one last bounded pass when its standard input ends: the worker closes it when
it has shut down, and the kernel when the worker is gone (a SIGKILLed worker leaves no relay
behind; processes the worker forks later give up their copy of the pipe). A child that dies
is started again, after a second, longer if it keeps dying at once. Whatever it had not
published waits in the outbox, so nothing is lost whichever process dies when: a row is
marked only after the broker confirmed it.
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

from mcard_tasks.config import Settings

__all__ = ["RelayProcess"]

logger = logging.getLogger(__name__)

#: Seconds between the child's looks at whether its worker is still its parent.
_CHECK = 0.5
#: Seconds of the child's last pass, at most twice over (the batch in hand, then the rest).
_LAST_PASS = 5.0
#: Seconds before a relay that died is started again; doubled (up to _RESTART_MAX) while
#: each lives less than _SHORT_LIFE.
_RESTART_AFTER = 1.0
_RESTART_MAX = 30.0
_SHORT_LIFE = 10.0
#: The signals the child ignores: held from its fork until it does.
_HELD = {signal.SIGINT, signal.SIGTERM}


@dataclass
class _Order:
    """What the worker hands its relay process (on its standard input)."""

    settings: Settings
    parent: int
    log_level: int | str
    log_file: str | None


class RelayProcess:
    """Runs the outbox relay of settings in a child process, and again if it dies."""

    def __init__(
        self, settings: Settings, log_level: int | str | None = None, log_file: str | None = None
    ) -> None:
        self.settings = settings
        self.log_level = settings.log_level if log_level is None else log_level
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._input: int | None = None  # the write end of the child's standard input

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        self._spawn()
        self._watcher = threading.Thread(
            target=self._watch, name="mcard-outbox-relay-watch", daemon=True
        )
        self._watcher.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        order = _Order(self.settings, os.getpid(), self.log_level, self.log_file)
        # The worker's import path, whole and first (its MCARD_SPECS modules, a checkout that
        # is not installed); -P: not the current directory ahead of it.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(_import_path()))
        with _INPUTS_LOCK:  # no fork meanwhile: every process forked later gives up its copy
            read_end, write_end = os.pipe()
            _INPUTS.add(write_end)
            # Held (blocked) from the fork on: the child inherits the mask across exec, and
            # a SIGTERM meant for the worker waits until the child ignores it (main()).
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
            try:
                process = subprocess.Popen(
                    [sys.executable, "-P", "-m", __name__],
                    stdin=read_end,
                    env=env,
                    close_fds=True,
                    start_new_session=True,
                )
            except BaseException:
                _INPUTS.discard(write_end)
                os.close(write_end)
                raise
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                os.close(read_end)
            self._process, self._input = process, write_end
            # A few KiB, within the pipe's buffer. The input stays open: its end is the
            # child's sign to stop.
            try:
                data = memoryview(pickle.dumps(order))
                while data:
                    data = data[os.write(write_end, data) :]
            except OSError as exc:  # the child died at once: the watcher starts another
                logger.warning("outbox relay: could not hand its process the settings: %s", exc)
        logger.info("outbox relay: running in process %s", process.pid)
        return process

    def _close_input(self) -> None:
        with _INPUTS_LOCK:
            fd, self._input = self._input, None
            if fd is not None and fd in _INPUTS:
                _INPUTS.discard(fd)
                os.close(fd)

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
            self._close_input()
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

    def stop(self) -> None:
        """Stop the child after its last pass (bounded, then killed)."""
        self._stopping.set()
        if self._watcher is not None:  # it returns within a wait, or right after a spawn
            self._watcher.join(10.0)
        process = self._process
        if process is None:
            return
        if process.poll() is not None:
            # It died and the next waits to be started: one for the last pass alone (what the
            # pool committed meanwhile would otherwise wait for another worker's relay).
            self._close_input()  # the dead one's, if the watcher had not closed it yet
            logger.info("outbox relay: starting one for its last pass alone")
            try:
                process = self._spawn()
            except Exception as exc:
                logger.error("outbox relay: cannot start its process for a last pass: %s", exc)
                return
        self._close_input()  # the end of its input: the last pass, then it exits
        try:
            process.wait(2 * _LAST_PASS + 5.0)
        except subprocess.TimeoutExpired:
            logger.warning("outbox relay process %s did not stop; killed", process.pid)
            process.kill()
            process.wait(5.0)


def _import_path() -> list[str]:
    """sys.path as PYTHONPATH can carry it: '' is the current directory; entries that are
    not text, or hold the separator, are left out."""
    try:
        here = os.getcwd()
    except OSError:  # the current directory is gone: '' finds nothing there either
        here = None
    path = [entry or here for entry in sys.path if isinstance(entry, str)]
    return [entry for entry in path if entry and os.pathsep not in entry]


#: The write ends of the relays' input pipes in this process...
_INPUTS: set[int] = set()
#: ... held while one is made or closed, and across every fork of this process.
_INPUTS_LOCK = threading.Lock()


def _give_up_inputs() -> None:
    """In a process the worker forks (a pool child): its copies of the relays' inputs become
    /dev/null, so that a relay sees the end of its input when the worker closes it, or dies."""
    global _INPUTS_LOCK
    _INPUTS_LOCK = threading.Lock()  # held by the parent's fork, never released here
    for fd in _INPUTS:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd, inheritable=False)
        finally:
            os.close(null)


os.register_at_fork(
    before=lambda: _INPUTS_LOCK.acquire(),
    after_in_parent=lambda: _INPUTS_LOCK.release(),
    after_in_child=_give_up_inputs,
)


def main() -> None:
    """The child: relay until its input ends or the worker is gone, then a last pass."""
    # The worker decides when to stop: signals meant for it (Ctrl-C, a process group's
    # SIGTERM) must not end the relay before the pool's last outcomes are committed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # held since the fork: now dropped
    order: _Order = pickle.load(sys.stdin.buffer)
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
    while not closed.wait(_CHECK):
        if os.getppid() != order.parent:
            logger.warning("outbox relay: the worker is gone; stopping")
            break
    relay.stop(_LAST_PASS)  # the last bounded pass: what the worker committed before it stopped


def _await_end_of_input(closed: threading.Event) -> None:
    """Set closed at the end of standard input (read unbuffered: a thread blocked in the
    buffered reader's lock would abort the interpreter's exit)."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:  # no input at all: as ended
        pass
    finally:
        closed.set()


if __name__ == "__main__":
    main()
