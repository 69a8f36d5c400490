"""A bare Celery app for the worker benchmark's baseline: one no-op task, mcard's settings.

Started by ``bench/worker.py`` as ``celery -A bench.bare_app worker -P prefork -c C -E ...``.
Same reliability settings as mcard-tasks' worker (late acks, prefetch 1, JSON only, publisher
confirms, task events, a durable queue of the same type on the same vhost), but no ledger,
no result backend, no custom consumer or bootsteps: the cost of Celery itself.

Environment: ``BENCH_BARE_BROKER`` (default ``MCARD_BROKER_URL``), ``BENCH_BARE_QUEUE``
(default ``bench.bare``), ``BENCH_BARE_QUEUE_TYPE`` (``quorum`` or ``classic``).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

BROKER = os.environ.get("BENCH_BARE_BROKER") or os.environ.get(
    "MCARD_BROKER_URL", "amqp://guest:guest@localhost:5672//"
)
QUEUE_NAME = os.environ.get("BENCH_BARE_QUEUE", "bench.bare")
QUEUE_TYPE = os.environ.get("BENCH_BARE_QUEUE_TYPE", "quorum")
TASK_NAME = "bench.noop"

# Topic, like mcard's exchange (Celery's delayed delivery for quorum queues binds topic only).
EXCHANGE = Exchange("bench.bare", type="topic", durable=True)
QUEUE = Queue(
    QUEUE_NAME,
    EXCHANGE,
    routing_key=QUEUE_NAME,
    durable=True,
    auto_delete=False,
    queue_arguments={"x-queue-type": QUEUE_TYPE},
)

app = Celery("bench_bare", broker=BROKER)
app.conf.update(
    task_queues=[QUEUE],
    task_default_queue=QUEUE_NAME,
    task_default_exchange=EXCHANGE.name,
    task_default_exchange_type=EXCHANGE.type,
    task_default_routing_key=QUEUE_NAME,
    task_create_missing_queues=False,
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    result_backend=None,
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_failure_or_timeout=False,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    task_send_sent_event=True,
    broker_transport_options={
        "confirm_publish": True,
        "client_properties": {
            "connection_name": f"bench-bare {socket.gethostname()}:{os.getpid()}"
        },
    },
    broker_connection_retry_on_startup=True,
    broker_channel_error_retry=True,
)


@app.task(name=TASK_NAME)
def noop(**kwargs: Any) -> None:
    """Nothing: the baseline's whole cost is Celery's and the broker's."""
    return None
