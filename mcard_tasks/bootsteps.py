"""Worker bootsteps of mcard-tasks, registered on the app so any Celery worker runs them."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu.transport.native_delayed_delivery import (
    declare_native_delayed_delivery_exchanges_and_queues,
)

__all__ = ["LiveNodeDelayedDelivery", "RelayOutbox"]

logger = logging.getLogger(__name__)


class RelayOutbox(bootsteps.StartStopStep):  # type: ignore[misc]
    """Run the outbox relay in the worker's main process (pool children never publish)."""

    # After the pool: prefork children are forked before the relay thread exists.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.relay: Any = None

    def start(self, parent: Any) -> None:
        from mcard_tasks.events import relay_for

        self.relay = relay_for(parent.app)
        self.relay.start()

    def stop(self, parent: Any) -> None:
        if self.relay is not None:
            self.relay.stop()


class LiveNodeDelayedDelivery(DelayedDelivery):  # type: ignore[misc]
    """Celery's native delayed delivery, set up over the consumer's own (live) connection.

    Celery's step connects to EVERY address of the failover list on every (re)connection and
    retries a dead one for about 18 s before the consumer starts again. The addresses of one
    cluster share their exchanges and queues, and the consumer has just connected to a live
    node: declaring there once is enough, and a failover resumes consuming at once.
    """

    def start(self, c: Any) -> None:
        app = c.app
        self._validate_configuration(app)
        if not app.settings.declare:  # the deploy step declared and bound it
            return
        try:
            declare_native_delayed_delivery_exchanges_and_queues(
                c.connection, app.conf.broker_native_delayed_delivery_queue_type
            )
            self._bind_queues(app, c.connection)
        except Exception as exc:
            # As Celery's own step: a failure here must not stop the worker consuming.
            logger.warning("delayed delivery not set up on %s: %s", c.connection.as_uri(), exc)
