"""Test configuration: the test session gets its own vhost and databases, made and removed here.

The broker and database of the test session are set in the environment before mcard-tasks is
imported, so the app, the producers and the worker subprocesses all use them.
"""

from __future__ import annotations

import os
import uuid

SESSION = uuid.uuid4().hex[:10]
BROKER_BASE = os.environ.get("MCARD_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672")
VHOST = f"mcard-test-{SESSION}"
os.environ["MCARD_BROKER_URL"] = f"{BROKER_BASE}/{VHOST}"
os.environ["MCARD_DATABASE_URL"] = f"sqlite:////tmp/mcard-test-{SESSION}-unused.sqlite3"
os.environ.setdefault("MCARD_LOG_LEVEL", "INFO")

pytest_plugins = ["tests.fixtures"]
