"""The broker roles of mcard-tasks and the narrowest RabbitMQ permissions each one needs.

RabbitMQ grants per virtual host three regular expressions over resource names (exchanges
and queues alike): *configure* (declare, delete), *write* (publish to an exchange; bind a
queue or exchange *to* it as destination) and *read* (consume, get, purge a queue; be the
source of a binding). A passive declare needs none. Declaring a queue whose dead-letter
exchange is set also needs write on that exchange.

The roles assume ``MCARD_DECLARE=false`` everywhere but the deploy step, which declares the
topology (``mcard-tasks topology declare``) with Celery's event exchange and native delayed
delivery. Celery's own monitoring entities (``celeryev`` event queues, the ``celery.pidbox``
remote-control queues and their reply queues) are auto-deleted and declared on the fly by the
worker and by Flower, so those two keep configure on them, and on nothing else.

| role       | its job                                                             |
|------------|---------------------------------------------------------------------|
| producer   | publish task messages (delay, bulk import, relay) and task-sent events |
| worker     | consume the task queues; publish dead letters, outcome events, retries |
| monitor    | Flower: task events, inspect commands                               |
| operator   | dead-letter queues (list, replay, purge), topology check, depths    |
| subscriber | read outcome events on its own queues, ``mcard.events.<user>.*``     |
| deploy     | declare every exchange, queue and binding                           |
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from kombu.transport.native_delayed_delivery import level_name

from mcard_tasks.specs import task_names
from mcard_tasks.topology import (
    DEAD_LETTER_EXCHANGE_NAME,
    EVENTS_EXCHANGE_NAME,
    EXCHANGE_NAME,
    dlq_name,
)

__all__ = ["ROLES", "Permissions", "permissions", "subscriber_queue_prefix"]

#: Celery's event exchange (task events for Flower, task-sent events of producers).
CELERY_EVENTS = "celeryev"
#: Where a countdown is published on quorum queues (Celery's native delayed delivery).
DELAYED_ENTRY = level_name(27)
#: Celery's auto-deleted monitoring entities, by who declares them.
_EVENT_QUEUES = [r"celeryev\..+"]
_PIDBOX = [r"celery\.pidbox", r"reply\.celery\.pidbox"]
_WORKER_PIDBOX = [r".+\.celery\.pidbox"]  # <node>.celery.pidbox and <oid>.reply.celery.pidbox
_REPLY_QUEUES = [r".+\.reply\.celery\.pidbox"]
NOTHING = "^$"

ROLES = ("producer", "worker", "monitor", "operator", "subscriber", "deploy")


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ's three permission regexes of one user in one virtual host."""

    configure: str
    write: str
    read: str

    def line(self) -> str:
        """configure, write and read, tab-separated (``rabbitmqctl set_permissions``)."""
        return f"{self.configure}\t{self.write}\t{self.read}"


def _any_of(patterns: Iterable[str]) -> str:
    listed = list(dict.fromkeys(patterns))
    return f"^({'|'.join(listed)})$" if listed else NOTHING


def _names(names: Iterable[str]) -> list[str]:
    return [re.escape(name) for name in names]


def subscriber_queue_prefix(user: str | None) -> str:
    """How the queues of subscriber user are named (``mcard.events.<user>.``): its
    permissions cover those only, so no subscriber reads or deletes another's queue.
    None: any subscriber queue (``mcard.events.``), shared by every such user.

    A user with a dot in its name has none of its own: ``shop``'s prefix would cover
    ``shop.eu``'s queues. ValueError says so."""
    if not user:
        return f"{EVENTS_EXCHANGE_NAME}."
    if "." in user:
        raise ValueError(
            f"subscriber user {user!r}: a name with a dot cannot have queues of its own"
            f" (another user's prefix would cover them); use a name without dots"
        )
    return f"{EVENTS_EXCHANGE_NAME}.{user}."


def permissions(role: str, user: str | None = None) -> Permissions:
    """The permissions of role (one of ROLES), for the task kinds registered now. user: the
    broker user they are for (the subscriber's queues are named after it)."""
    tasks = _names(task_names())
    dlqs = _names(dlq_name(name) for name in task_names())
    exchange, dlx, events = _names([EXCHANGE_NAME, DEAD_LETTER_EXCHANGE_NAME, EVENTS_EXCHANGE_NAME])
    celeryev, delayed = _names([CELERY_EVENTS, DELAYED_ENTRY])
    monitoring = [celeryev, *_EVENT_QUEUES, *_PIDBOX]
    if role == "producer":
        return Permissions(NOTHING, _any_of([exchange, delayed, celeryev]), NOTHING)
    if role == "worker":
        return Permissions(
            configure=_any_of(monitoring + _WORKER_PIDBOX),
            write=_any_of([exchange, dlx, events, delayed, *monitoring, *_WORKER_PIDBOX]),
            read=_any_of([*tasks, *monitoring, *_WORKER_PIDBOX]),
        )
    if role == "monitor":
        return Permissions(
            configure=_any_of(monitoring + _REPLY_QUEUES),
            write=_any_of([*_EVENT_QUEUES, _PIDBOX[0], *_REPLY_QUEUES]),
            read=_any_of([celeryev, *_EVENT_QUEUES, _PIDBOX[1], *_REPLY_QUEUES]),
        )
    if role == "operator":
        return Permissions(NOTHING, _any_of([exchange]), _any_of(dlqs))
    if role == "subscriber":
        own = re.escape(subscriber_queue_prefix(user)) + ".+"
        return Permissions(_any_of([own]), _any_of([own]), _any_of([events, own]))
    if role == "deploy":
        everything = _any_of([exchange, dlx, events, celeryev, *tasks, *dlqs, r"celery_delayed_.+"])
        return Permissions(everything, everything, everything)
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
