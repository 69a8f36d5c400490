"""The import path the worker hands its outbox relay's process (PYTHONPATH)."""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from mcard_tasks import relay_process
from mcard_tasks.relay_process import _import_path


def test_the_relay_gets_the_workers_import_path_as_pythonpath_can_carry_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    odd = [Path("/not/text"), f"/a{os.pathsep}b"]
    monkeypatch.setattr(sys, "path", ["", "/opt/app", *odd, "/lib/python.zip"])
    # Without the fix, a Path in sys.path made os.pathsep.join raise: no relay, no worker.
    assert os.pathsep.join(_import_path()) == os.pathsep.join(
        [str(tmp_path), "/opt/app", "/lib/python.zip"]
    )


def test_a_forked_process_gives_up_its_copy_of_a_relays_input() -> None:
    """A pool child forked after the relay started must not keep its input open: the relay
    would never see its end."""
    read_end, write_end = os.pipe()
    with relay_process._INPUTS_LOCK:
        relay_process._INPUTS.add(write_end)
    child = os.fork()
    if child == 0:  # the "pool child": lives on while the worker closes the input
        time.sleep(30)  # killed below
        os._exit(0)
    try:
        with relay_process._INPUTS_LOCK:
            relay_process._INPUTS.discard(write_end)
            os.close(write_end)
        ready, _, _ = select.select([read_end], [], [], 10.0)
        assert ready and os.read(read_end, 1) == b"", "the end of input, the child still alive"
        assert os.waitpid(child, os.WNOHANG) == (0, 0)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(read_end)
