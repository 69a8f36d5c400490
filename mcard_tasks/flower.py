"""Flower for mcard-tasks: ``celery -A mcard_tasks flower`` reads these defaults.

Flower takes its options from FLOWER_* variables (a command-line flag still wins). The app
sets them from the MCARD_* settings when it is imported, before Flower parses its options:
basic auth from MCARD_FLOWER_USER / MCARD_FLOWER_PASSWORD (pages and API answer 401 without
them), read-only (no revoke or terminate of a mint from the UI), the task columns operators
need, and, without credentials, localhost only.

Flower opens its broker connections through the app (``capp.connection()``), so an amqps://
MCARD_BROKER_URL gives it the same verified TLS as every other process (mcard_tasks.tls).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

from mcard_tasks.config import Settings

__all__ = ["configure_flower"]

COLUMNS = "name,uuid,state,args,kwargs,result,received,started,runtime,worker"


def configure_flower(
    settings: Settings, environ: MutableMapping[str, str] = os.environ
) -> str | None:
    """Set Flower's defaults in environ; return a warning when Flower runs without auth."""
    environ.setdefault("FLOWER_READ_ONLY", "true")
    environ.setdefault("FLOWER_TASKS_COLUMNS", COLUMNS)
    if settings.flower_user and settings.flower_password:
        environ.setdefault(
            "FLOWER_BASIC_AUTH", f"{settings.flower_user}:{settings.flower_password}"
        )
        return None
    if "FLOWER_BASIC_AUTH" in environ:
        return None
    environ.setdefault("FLOWER_ADDRESS", "127.0.0.1")
    return (
        "mcard-tasks: MCARD_FLOWER_USER and MCARD_FLOWER_PASSWORD are not set: Flower serves"
        f" without authentication, on {environ['FLOWER_ADDRESS']} only"
    )


def configure_flower_if_running(settings: Settings) -> None:
    """Apply configure_flower in a `celery ... flower` process, and say so if unauthenticated."""
    if "flower" not in sys.argv[1:]:
        return
    warning = configure_flower(settings)
    if warning:
        print(warning, file=sys.stderr)
