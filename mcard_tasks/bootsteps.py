"""Worker bootsteps of mcard-tasks, registered on the app so any Celery worker runs them."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps, signals
from celery.utils.nodenames import node_format
from celery.worker.consumer.control import Control
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from celery.worker.control import Panel
from kombu.transport.native_delayed_delivery import (
    declare_native_delayed_delivery_exchanges_and_queues,
)

__all__ = ["CheckLedgerSchema", "InspectOnlyControl", "LiveNodeDelayedDelivery", "RelayOutbox"]

logger = logging.getLogger(__name__)


class CheckLedgerSchema(bootsteps.StartStopStep):  # type: ignore[misc]
    """With MCARD_MIGRATE=false, stop the worker at start when the ledger's schema is not at
    head (SchemaNotAtHeadError, Celery's "Unrecoverable error", exit 1): better than failing
    every task. A ledger unreachable at start is checked again on first use instead."""

    # Before the consumer: a worker whose ledger is behind never takes a message (Celery may
    # start the pool first; its children stop with the worker).
    requires = ("celery.worker.components:Timer",)

    def start(self, parent: Any) -> None:
        from mcard_tasks.config import settings_of
        from mcard_tasks.errors import LedgerUnavailableError
        from mcard_tasks.ledger import get_ledger

        settings = settings_of(parent.app)
        if settings.migrate:
            return  # the embedded setup: the schema is brought to head on first use
        try:
            get_ledger(settings.database_url, migrate=False)
        except LedgerUnavailableError as exc:
            logger.warning("ledger schema not checked at start (checked on first use): %s", exc)
            return
        logger.info("the ledger's schema is at head (MCARD_MIGRATE=false: no DDL)")


class RelayOutbox(bootsteps.StartStopStep):  # type: ignore[misc]
    """Run the outbox relay in a process beside the worker's (pool children never publish):
    mcard_tasks.relay_process.

    Celery stops this step before the pool, whose requests still running then commit their
    outcomes: on a warm shutdown the relay's last pass waits for Celery's ``worker_shutdown``
    (sent once every step, the pool included, has stopped), so their events go out too.
    """

    # After the pool: prefork children are forked before the relay's watcher thread exists.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.relay: Any = None

    def start(self, parent: Any) -> None:
        from mcard_tasks.config import settings_of
        from mcard_tasks.relay_process import RelayProcess

        log_file = getattr(parent, "logfile", None)  # Celery's pattern (%n, %I)
        self.relay = RelayProcess(
            settings_of(parent.app),
            log_level=getattr(parent, "loglevel", None),
            log_file=node_format(log_file, parent.hostname) if log_file else None,
        )
        self.relay.start()
        # Also when the worker stops before every step started (Celery then stops no step).
        signals.worker_shutdown.connect(self._last_pass, sender=parent, weak=False)

    def stop(self, parent: Any) -> None:
        """Nothing yet: the pool stops after this step, and its last requests' events are
        for the relay's last pass, at worker_shutdown."""

    def _last_pass(self, sender: Any = None, **kwargs: Any) -> None:
        signals.worker_shutdown.disconnect(self._last_pass, sender=sender)
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.stop()

    def terminate(self, parent: Any) -> None:
        """A cold shutdown: the pool's requests are abandoned, the relay stops now."""
        self._last_pass(sender=parent)


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


#: Remote-control commands that change no state but the events switch Flower turns on.
_ALSO_ALLOWED = frozenset({"enable_events", "heartbeat"})


def _refused(name: str) -> Any:
    def refuse(state: Any, **kwargs: Any) -> dict[str, str]:
        logger.warning(
            "remote-control command %r refused (mcard-tasks workers take inspect only)", name
        )
        return {"error": f"mcard-tasks workers refuse the remote-control command {name!r}"}

    return refuse


def _hello_without_revocations(hello: Any) -> Any:
    def handle(state: Any, from_node: str, revoked: Any = None, **kwargs: Any) -> Any:
        return hello(state, from_node=from_node, **kwargs)

    return handle


def inspect_only_handlers(handlers: dict[str, Any]) -> dict[str, Any]:
    """Celery's remote-control handlers, the state-changing ones replaced by a refusal.

    A revoked request is acked and dropped by the worker: a lost mint or burn. So revoke,
    terminate, shutdown, rate limits, pool and consumer changes are refused, whoever may write
    on the broker's ``celery.pidbox`` exchange (Flower's monitor role may, to inspect); and
    ``hello`` (worker-to-worker sync, an inspect command) merges no revocations.
    """
    allowed: dict[str, Any] = {}
    for name, handler in handlers.items():
        meta = Panel.meta.get(name)
        if name == "hello":
            allowed[name] = _hello_without_revocations(handler)
        elif (meta is not None and meta.type == "inspect") or name in _ALSO_ALLOWED:
            allowed[name] = handler
        else:
            allowed[name] = _refused(name)
    return allowed


class InspectOnlyControl(bootsteps.StartStopStep):  # type: ignore[misc]
    """The worker's remote control, inspect commands only (see inspect_only_handlers)."""

    requires = ("celery.worker.consumer.control:Control",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.start(c)  # before the Control step listens: no command slips in unfiltered

    def start(self, c: Any) -> None:
        control = next(
            (step for step in c.blueprint.steps.values() if isinstance(step, Control)), None
        )
        node = None if control is None else control.box.node
        if node is not None and not getattr(node, "_mcard_inspect_only", False):
            node.handlers = inspect_only_handlers(dict(node.handlers))
            node._mcard_inspect_only = True
