"""A task that kills its own process, loaded only into fault-test workers (``-I``)."""

from __future__ import annotations

import os
import signal

from mcard_tasks import app


@app.task(name="mcard.test.kill_self", acks_late=True)
def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
