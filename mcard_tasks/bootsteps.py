"""Worker bootsteps of mcard-tasks, registered on the app so any Celery worker runs them."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from mcard_tasks.topology import build_topology

__all__ = ["DeclareTopology", "RelayOutbox"]

logger = logging.getLogger(__name__)


class DeclareTopology(bootsteps.StartStopStep):  # type: ignore[misc]
    """Declare the whole topology (dead-letter side included) on every (re)connection.

    Celery declares only the queues a worker consumes; the dead-letter exchange and queues
    must exist before the first message is dead-lettered, or at-least-once dead-lettering
    keeps the message in its source queue.
    """

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, parent: Any) -> None:
        conf = parent.app.conf
        topology = build_topology(conf.mcard_queue_type, conf.mcard_delivery_limit)
        topology.declare(parent.connection.default_channel)
        logger.info("declared the mcard topology (%s queues)", conf.mcard_queue_type)


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
