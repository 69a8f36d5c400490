"""``metrics``: the Prometheus exporter (mcard_tasks.metrics)."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

__all__ = ["COMMANDS"]

#: Exit code of an exporter refused for its configuration (as Flower's).
EXIT_REFUSED = 2


def _stop(signum: int, frame: Any) -> None:
    sys.exit(0)


@click.command("metrics")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9808, show_default=True, type=int, help="Port to listen on.")
def metrics(address: str, port: int) -> None:
    """Serve Prometheus metrics (ledger, queues, worker timings) on ADDRESS:PORT/metrics.

    Basic auth with MCARD_FLOWER_USER / MCARD_FLOWER_PASSWORD when set; without them only a
    loopback address is allowed (exit 2 otherwise). SIGTERM stops it (exit 0).
    """
    from mcard_tasks import app
    from mcard_tasks.errors import ConfigurationError
    from mcard_tasks.metrics import serve

    signal.signal(signal.SIGTERM, _stop)
    try:
        serve(app, address, port, ready=lambda line: click.echo(line, err=True))
    except ConfigurationError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(EXIT_REFUSED)
    except KeyboardInterrupt:
        pass


COMMANDS = [metrics]
