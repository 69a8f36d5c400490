"""Loaded only into fault-test workers (``-I``): the worker kills itself, once, right after a
batch committed and before any of its messages is acked.

The marker file (MCARD_TEST_CRASH_MARKER) is written before the kill, so a worker started
again with this module goes on normally.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from mcard_tasks import batches

_run_batch = batches.run_batch


def _run_then_die(*args: Any) -> Any:
    decided = _run_batch(*args)
    marker = Path(os.environ["MCARD_TEST_CRASH_MARKER"])
    if decided and not marker.exists():
        marker.write_text(",".join(decided))
        os.kill(os.getpid(), signal.SIGKILL)
    return decided


batches.run_batch = _run_then_die
