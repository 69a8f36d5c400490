"""The Celery app of mcard-tasks, built from the one Settings object and the one topology.

Every reliability setting sits next to its reason; see docs in the README's "Guarantees".
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from typing import Any

from celery import Celery, signals
from kombu import pools

from mcard_tasks.bootsteps import CheckLedgerSchema, InspectOnlyControl, RelayOutbox
from mcard_tasks.config import Settings, get_settings
from mcard_tasks.errors import ConfigurationError
from mcard_tasks.flower import configure_flower_if_running
from mcard_tasks.identity import check_identity
from mcard_tasks.timings import install as install_timings
from mcard_tasks.tls import broker_ssl_options
from mcard_tasks.topology import EXCHANGE, build_topology

__all__ = ["MCardApp", "app", "celery_config", "create_app"]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's settings for mcard-tasks."""
    topology = build_topology(settings)
    return {
        # Several URLs separated by ';' are kombu's failover list.
        "broker_url": settings.broker_url,
        # amqps://: the broker's certificate and host name verified (tls.py: how py-amqp and
        # kombu take these options, and why MCardApp's connections resolve the host name).
        "broker_use_ssl": broker_ssl_options(settings),
        "result_backend": "mcard_tasks.results:LedgerBackend",
        # Topology: built once in topology.py, shared by producer and worker. Celery detects
        # quorum queues only from its own config, so both sides must use the same list.
        "task_queues": topology.task_queues,
        "task_routes": topology.routes,
        "task_default_exchange": EXCHANGE.name,
        "task_default_exchange_type": EXCHANGE.type,
        # A task without a route fails to publish (the queue is not declared: see
        # task_create_missing_queues) instead of landing in some kind's queue.
        "task_default_queue": "mcard.unrouted",
        # A typo in a route must fail loudly, not create an unconsumed classic queue.
        "task_create_missing_queues": False,
        # JSON only: pickle from the wire is code execution, and results must be readable
        # by any application.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Ack after the task ran: a crash mid-task redelivers instead of losing the request.
        "task_acks_late": True,
        # A killed pool child requeues its message (the ledger makes the rerun harmless and
        # the quorum delivery limit stops a poison message from looping).
        "task_reject_on_worker_lost": True,
        # A final failure is rejected, so it reaches the dead-letter queue instead of being
        # acked away.
        "task_acks_on_failure_or_timeout": False,
        # With late acks, every prefetched message is one more held hostage by a slow task:
        # one per slot, and one spare per thread for the threads pool (see Settings).
        "worker_prefetch_multiplier": settings.worker_prefetch_multiplier,
        # The messages of running tasks come back after a connection loss; cancel the
        # running copy rather than run both (the ledger would absorb a double run anyway).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Publisher confirms: a publish counts only once the broker has taken it.
        "broker_transport_options": {
            "confirm_publish": True,
            "client_properties": {"connection_name": connection_name()},
        },
        "broker_pool_limit": settings.broker_pool_limit,
        # An exhausted connection pool raises instead of blocking the caller forever.
        "broker_pool_acquire_timeout": settings.publish_timeout,
        # A channel error (e.g. an ack timeout) reconnects instead of stopping the worker.
        "broker_channel_error_retry": True,
        "broker_connection_retry_on_startup": True,
        # A failed publish is retried briefly, then the error reaches the caller.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        # Flower needs task events from workers and "sent" events from producers (our tasks
        # publish the latter unconfirmed, on the task's own connection: sent_events.py).
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_concurrency": settings.concurrency,
        "worker_pool": settings.pool,
        # Undecodable, non-JSON, header-less and unknown-task messages go to the DLQ with
        # their reason instead of being acked away (Celery's default for decode errors).
        "worker_consumer": "mcard_tasks.consumer:MCardConsumer",
        # A warm shutdown (SIGTERM) lets running tasks finish, within bounds.
        "worker_soft_shutdown_timeout": 10.0,
    }


#: Celery's loggers of the per-task "received" and "succeeded"/"retry" INFO lines.
TASK_LINE_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def quiet_task_lines(settings: Settings) -> None:
    """Unless MCARD_LOG_TASKS, drop Celery's INFO lines per task (received, succeeded): at
    high rates they cost a tenth of the worker's time, and Flower and ``mcard-tasks status``
    show every task. Failures are still logged (ERROR) and retries by RequestTask (WARNING).
    """
    if not settings.log_tasks:
        for name in TASK_LINE_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def connection_name() -> str:
    """How this process's broker connections are named on the broker (host and pid)."""
    return f"mcard-tasks {socket.gethostname()}:{os.getpid()}"


def _forget_parent_connections(app: Celery) -> None:
    """In a forked child: never use the parent's pooled broker connections.

    Celery and kombu reset their pools only for multiprocessing children; gunicorn with
    preload and other plain os.fork() users need the same (kombu connections are not
    fork-safe). The parent's pools are forgotten, not closed: closing them would close
    sockets the parent still uses.
    """
    pools.connections.clear()
    pools.producers.clear()
    app._after_fork()
    app.conf.broker_transport_options["client_properties"]["connection_name"] = connection_name()


class MCardApp(Celery):  # type: ignore[misc]
    """Celery's app, carrying the one Settings object it was configured from.

    Its connections are mcard_tasks.tls.VerifiedConnection: with amqps://, each checks the
    broker's certificate against the host of the URL it connects to.
    """

    amqp_cls = "mcard_tasks.tls:TLSAMQP"
    settings: Settings


def load_spec_modules(settings: Settings) -> None:
    """Import the modules of MCARD_SPECS, which register more task kinds.

    Raises ConfigurationError naming a module that cannot be imported.
    """
    for name in settings.spec_modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(f"MCARD_SPECS: cannot import {name!r} ({exc})") from exc


def create_app(settings: Settings | None = None) -> MCardApp:
    """A Celery app configured from settings (default: the MCARD_* environment).

    Everything of mcard-tasks reads its settings from ``app.settings``
    (``mcard_tasks.config.settings_of``); Celery's own settings are derived from them once.
    """
    settings = settings or get_settings()
    load_spec_modules(settings)
    check_identity(settings)
    app = MCardApp("mcard_tasks", include=["mcard_tasks.tasks"])
    os.register_at_fork(after_in_child=lambda: _forget_parent_connections(app))
    app.settings = settings
    app.conf.update(celery_config(settings))
    app.steps["worker"].add(CheckLedgerSchema)
    app.steps["worker"].add(RelayOutbox)
    # Remote control takes inspect commands only: a revoke would drop a request.
    app.steps["consumer"].add(InspectOnlyControl)
    install_timings(app, settings)
    signals.after_setup_logger.connect(
        lambda **_: quiet_task_lines(settings), weak=False, dispatch_uid="mcard-task-lines"
    )
    if settings.tracing:  # off: OpenTelemetry is not imported at all
        from mcard_tasks.tracing import instrument

        instrument()
    return app


#: The app of this process, configured from the MCARD_* environment.
app = create_app()
configure_flower_if_running(app.settings)
