"""Topology and configuration, without a broker."""

from __future__ import annotations

from typing import Any

import pytest
from celery.app import defaults as celery_defaults

from mcard_tasks.application import celery_config, create_app
from mcard_tasks.config import Settings
from mcard_tasks.specs import task_names
from mcard_tasks.topology import build_topology


def test_each_task_has_its_own_durable_queue_bound_by_its_name() -> None:
    topology = build_topology(Settings())
    assert [q.name for q in topology.task_queues] == list(task_names())
    for queue in topology.task_queues:
        assert queue.exchange.name == "mcard" and queue.exchange.type == "topic"
        assert queue.routing_key == queue.name and queue.durable and not queue.auto_delete
    assert topology.routes["mcard.single_burn"] == {
        "queue": "mcard.single_burn",
        "routing_key": "mcard.single_burn",
    }


def test_quorum_queues_dead_letter_at_least_once_into_their_own_dlq() -> None:
    topology = build_topology(Settings(queue_type="quorum", delivery_limit=7))
    for queue in topology.task_queues:
        args = queue.queue_arguments
        assert args["x-queue-type"] == "quorum" and args["x-delivery-limit"] == 7
        assert args["x-dead-letter-strategy"] == "at-least-once"
        assert args["x-overflow"] == "reject-publish"
        dlq = topology.queue(f"{queue.name}.dlq")
        assert dlq.exchange.name == args["x-dead-letter-exchange"]
        assert dlq.routing_key == args["x-dead-letter-routing-key"] == queue.name


def test_classic_queues_stay_possible() -> None:
    args = build_topology(Settings(queue_type="classic")).task_queues[0].queue_arguments
    assert args["x-queue-type"] == "classic" and "x-delivery-limit" not in args


def test_settings_come_from_mcard_variables_and_a_url_list_is_kombus_failover_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MCARD_CONCURRENCY", "3")
    monkeypatch.setenv("MCARD_BROKER_URL", "amqp://u:p@a:5672//;amqp://u:p@b:5673//")
    settings = Settings()
    assert settings.concurrency == 3
    connection = create_app(settings).connection_for_write()
    assert [connection.hostname, *connection.alt[1:]] == ["a", "amqp://u:p@b:5673//"]


def test_a_bad_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCARD_CONCURRENCY", "zero")
    with pytest.raises(ValueError, match="concurrency"):
        Settings()


def test_every_celery_setting_we_give_is_one_celery_knows() -> None:
    """A misspelt key (``task_ack_late``) would be ignored by Celery without a word."""
    known = {name for name, _ in celery_defaults.flatten(celery_defaults.NAMESPACES)}
    unknown = [key for key in celery_config(Settings()) if key not in known]
    assert unknown == []


def test_the_prefetch_multiplier_follows_the_pool_unless_set() -> None:
    def prefetch(**fields: Any) -> int:
        return int(celery_config(Settings(**fields))["worker_prefetch_multiplier"])

    assert prefetch(pool="threads") == 2
    assert prefetch(pool="prefork") == prefetch(pool="solo") == 1
    assert prefetch(pool="threads", prefetch_multiplier=1) == 1
    assert prefetch(pool="prefork", prefetch_multiplier=3) == 3
