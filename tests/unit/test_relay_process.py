"""The import path the worker hands its outbox relay's process (PYTHONPATH)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
