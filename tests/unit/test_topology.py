"""Topology and configuration, without a broker."""

from __future__ import annotations

import pytest

from mcard_tasks.application import celery_config
from mcard_tasks.config import Settings
from mcard_tasks.topology import TASK_NAMES, build_topology


def test_each_task_has_its_own_durable_queue_bound_by_its_name() -> None:
    topology = build_topology()
    assert [q.name for q in topology.task_queues] == list(TASK_NAMES)
    for queue in topology.task_queues:
        assert queue.exchange.name == "mcard" and queue.exchange.type == "topic"
        assert queue.routing_key == queue.name and queue.durable and not queue.auto_delete
    assert topology.routes["mcard.single_burn"] == {
        "queue": "mcard.single_burn",
        "routing_key": "mcard.single_burn",
    }


def test_quorum_queues_dead_letter_at_least_once_into_their_own_dlq() -> None:
    topology = build_topology("quorum", delivery_limit=7)
    for queue in topology.task_queues:
        args = queue.queue_arguments
        assert args["x-queue-type"] == "quorum" and args["x-delivery-limit"] == 7
        assert args["x-dead-letter-strategy"] == "at-least-once"
        assert args["x-overflow"] == "reject-publish"
        dlq = topology.queue(f"{queue.name}.dlq")
        assert dlq.exchange.name == args["x-dead-letter-exchange"]
        assert dlq.routing_key == args["x-dead-letter-routing-key"] == queue.name


def test_classic_queues_stay_possible() -> None:
    args = build_topology("classic").task_queues[0].queue_arguments
    assert args["x-queue-type"] == "classic" and "x-delivery-limit" not in args


def test_settings_come_from_mcard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCARD_CONCURRENCY", "3")
    monkeypatch.setenv("MCARD_BROKER_URL", "amqp://a//;amqp://b//")
    settings = Settings()
    assert settings.concurrency == 3
    assert settings.broker_urls == ["amqp://a//", "amqp://b//"]


def test_a_bad_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCARD_CONCURRENCY", "zero")
    with pytest.raises(ValueError, match="concurrency"):
        Settings()


def test_reliability_settings_are_on() -> None:
    conf = celery_config(Settings())
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["task_acks_on_failure_or_timeout"] is False
    assert conf["worker_prefetch_multiplier"] == 2  # the default threads pool: a spare each
    assert celery_config(Settings(pool="prefork"))["worker_prefetch_multiplier"] == 1
    assert celery_config(Settings(prefetch_multiplier=1))["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["confirm_publish"] is True
    assert conf["accept_content"] == ["json"] and conf["task_create_missing_queues"] is False
