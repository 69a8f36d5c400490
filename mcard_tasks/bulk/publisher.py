"""The import's publisher: each request as the message ``delay()`` publishes, pipelined."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcard_tasks.config import settings_of
from mcard_tasks.confirms import ConfirmWindow
from mcard_tasks.messages import TaskMessages
from mcard_tasks.topology import build_topology

if TYPE_CHECKING:
    from celery import Celery

    from mcard_tasks.bulk.lines import Request
    from mcard_tasks.bulk.report import ImportReport

__all__ = ["Publisher"]


class Publisher:
    """Publishes requests through a confirm window, counting them in the report."""

    def __init__(self, app: Celery, report: ImportReport, timeout: float, window: int) -> None:
        """timeout: seconds without a confirm; window: unconfirmed messages at most."""
        self.app = app
        self.report = report
        self.window = ConfirmWindow(app, report.settled, timeout, window, purpose="bulk")
        self.messages = TaskMessages(app)

    def open(self) -> None:
        """Connect and declare the topology, as delay() declares its queue before publishing:
        on a fresh vhost nothing published is unroutable."""
        self.window.open(build_topology(settings_of(self.app)).prepare)

    def publish(self, request: Request) -> None:
        """Publish one request, waiting first if the window is full."""
        message = self.messages.build(
            task=request.task, request_id=request.request_id, payload=request.payload
        )
        self.window.publish(
            request.request_id,
            message.body,
            exchange=message.exchange,
            routing_key=message.routing_key,
            headers=message.headers,
            **message.properties,
        )
        self.report.published += 1

    def wait(self) -> None:
        """Collect the confirms of everything published."""
        self.window.wait()

    def abort(self) -> None:
        """Drop the connection without a handshake."""
        self.window.abort()

    def close(self) -> None:
        """Close the connection (bounded by the timeout)."""
        self.window.close()
