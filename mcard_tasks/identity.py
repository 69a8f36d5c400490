"""Producer identity: who published a task message, and whether the worker may run it.

Every message mcard-tasks publishes carries the AMQP ``user_id`` property set to the broker
user it connects as. RabbitMQ validates that property: a publish whose ``user_id`` differs
from the connection's user is refused (the channel is closed with PRECONDITION_FAILED), so a
``user_id`` on a delivered message names its real publisher.

``MCARD_PRODUCERS`` says which users the worker executes messages of: ``app,ops`` allows two
users every task, ``mcard.single_burn=support`` allows a user one task; entries mix. The
worker's own broker user is always allowed: its retries and the task messages it republishes
for legacy messages carry it. Unset, the worker executes what the broker let anyone publish.
The producer is checked before anything else the worker looks at (limits, task name, body).

What the worker republishes (a retry, a legacy message's task message, a dead letter) carries
the worker's ``user_id``; the request's original producers travel in :data:`PRODUCER_HEADER`
(:func:`request_producers` writes it, :func:`letter_producers` reads a dead letter's).
``dlq replay`` publishes with the operator's ``user_id`` and that header, and the worker checks
both: a request whose producer was refused never runs through a replay, whoever replays it.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kombu.utils.url import parse_url

from mcard_tasks.config import Settings, settings_of
from mcard_tasks.errors import ConfigurationError
from mcard_tasks.specs import task_names

__all__ = [
    "PRODUCER_HEADER",
    "UNAUTHORIZED_PRODUCER",
    "ProducerPolicy",
    "broker_dead_lettered",
    "broker_user",
    "check_identity",
    "letter_producers",
    "producer_policy",
    "request_producers",
    "retry_producers",
    "split_producers",
    "task_queue_death",
    "user_of_url",
]

#: How a refusal for its producer starts: replays never republish such a dead letter.
UNAUTHORIZED_PRODUCER = "unauthorized producer"
#: The header of a worker-made dead letter naming the original message's user_id ("" for none).
PRODUCER_HEADER = "x-mcard-producer"
#: kombu's user for a URL without one.
_DEFAULT_USER = "guest"
_USERS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def user_of_url(url: str) -> str:
    """The broker user of one broker URL (kombu's default, guest, if it names none)."""
    return str(parse_url(url).get("userid") or _DEFAULT_USER)


def _users_of(broker_url: str) -> str:
    urls = [part.strip() for part in broker_url.split(";") if part.strip()]
    users = {user_of_url(url) for url in urls} or {_DEFAULT_USER}
    if len(users) > 1:
        # kombu connects to each failover address with that address's credentials: the
        # messages' user_id would change with the node.
        raise ConfigurationError(
            "MCARD_BROKER_URL: the failover addresses name different users"
            f" ({', '.join(sorted(users))}); one process publishes as one broker user"
        )
    return users.pop()


def broker_user(app: Any) -> str:
    """The broker user app connects as: the ``user_id`` of every message it publishes."""
    user = _USERS.get(app)
    if user is None:
        user = _USERS[app] = _users_of(str(app.conf.broker_url or ""))
    return user


@dataclass(frozen=True)
class ProducerPolicy:
    """Which broker users the worker executes task messages of."""

    #: The worker's own broker user (its retries and legacy republishes).
    own: str
    #: Users allowed every task.
    everyone: frozenset[str] = frozenset()
    #: Users allowed one task, by task name.
    per_task: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def allows(self, task: str, user: str) -> bool:
        return user == self.own or user in self.everyone or user in self.per_task.get(task, ())

    def allows_any(self, user: str) -> bool:
        """Whether user may publish at least one task."""
        return self.allows("", user) or any(user in users for users in self.per_task.values())

    def refusal(self, task: str, user: str | None) -> str | None:
        """Why a message of task published by user (its ``user_id``, read by
        :func:`producer_of`) is refused, or None."""
        if not user:
            return (
                f"{UNAUTHORIZED_PRODUCER}: the message has no user_id (MCARD_PRODUCERS is set:"
                f" only messages of allowed broker users run {task})"
            )
        if not self.allows(task, user):
            return f"{UNAUTHORIZED_PRODUCER}: user {user!r} may not publish {task}"
        return None

    def message_refusal(self, message: Any, task: str | None) -> str | None:
        """Why the worker must not take message, or None: its user_id may not publish task
        (task None: a legacy message or an unknown task, any task), nor may every producer
        :data:`PRODUCER_HEADER` names (the request's original producers: a replay's, a
        retry's, a legacy republish's)."""
        refusal = self._refusal_of(task, producer_of(message))
        headers = message.headers or {}
        if refusal is None and PRODUCER_HEADER in headers:
            originals: list[str | None] = [*split_producers(headers[PRODUCER_HEADER])]
            for original in originals or [None]:
                refusal = self._refusal_of(task, original)
                if refusal is not None:
                    return f"{refusal} (the request's original producer, {PRODUCER_HEADER})"
        return refusal

    def _refusal_of(self, task: str | None, user: str | None) -> str | None:
        if task is not None:
            return self.refusal(task, user)
        if user is not None and self.allows_any(user):
            return None  # the legacy path checks its task once it is translated
        return self.refusal("any task", user)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def producer_of(message: Any) -> str | None:
    """The user_id of a message as delivered (None without one)."""
    user = (message.properties or {}).get("user_id")
    return _text(user) or None


def split_producers(value: object) -> list[str]:
    """The user names a :data:`PRODUCER_HEADER` value lists (comma-separated; [] for none)."""
    return [name for name in (part.strip() for part in _text(value).split(",")) if name]


def request_producers(message: Any, own: str | None) -> str:
    """The :data:`PRODUCER_HEADER` value for what the worker republishes of message (a retry,
    a legacy message's task message, a dead letter): every producer that vouched for the
    request, comma-separated, "" for none. That is the names the message's header lists and
    its user_id, unless that is own (the worker's user) and the header names someone: the
    worker published it (only it can publish with its user_id) and wrote that header."""
    headers = message.headers or {}
    names = set(split_producers(headers.get(PRODUCER_HEADER)))
    user = producer_of(message)
    if user is not None and (user != own or not names):
        names.add(user)  # own only if nobody else is named: the worker's user published it
    return ",".join(sorted(names))


@dataclass(frozen=True)
class _Delivered:
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]


def retry_producers(request: Any, own: str) -> str:
    """:func:`request_producers` of the task request the worker is running (Celery's request
    context: its message's properties, and its headers as attributes), for its retry."""
    header = getattr(request, PRODUCER_HEADER, None)
    headers = {} if header is None else {PRODUCER_HEADER: header}
    return request_producers(_Delivered(headers, getattr(request, "properties", None) or {}), own)


def letter_producers(message: Any, task_queues: frozenset[str]) -> list[str]:
    """Who published the request a dead letter holds ([]: nobody named).

    A letter the worker made (published as its own user) names the request's producers in
    :data:`PRODUCER_HEADER`, written over whatever the message carried; the worker also drops
    any ``x-death`` of a task queue a message carried (only a publisher's forgery can reach
    the worker with one). So a letter with an ``x-death`` entry of one of task_queues was
    dead-lettered by the broker (a reject, the delivery limit) and keeps its properties: its
    user_id published it, vouching for the names of a header it carries too.
    """
    headers = message.headers or {}
    if broker_dead_lettered(headers, task_queues):
        names = set(split_producers(headers.get(PRODUCER_HEADER)))
        user = producer_of(message)
        return sorted(names | {user}) if user is not None else []
    return split_producers(headers.get(PRODUCER_HEADER))


def task_queue_death(death: object, task_queues: frozenset[str]) -> bool:
    """Whether death (one ``x-death`` entry) says a queue of task_queues dead-lettered it."""
    return isinstance(death, dict) and _text(death.get("queue")) in task_queues


def broker_dead_lettered(headers: Mapping[str, Any], task_queues: frozenset[str]) -> bool:
    """Whether headers hold an ``x-death`` entry of one of task_queues."""
    deaths = headers.get("x-death") or []
    return isinstance(deaths, list) and any(task_queue_death(d, task_queues) for d in deaths)


def parse_producers(text: str) -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """MCARD_PRODUCERS as (users of every task, users by task); ConfigurationError names a
    bad entry."""
    everyone: set[str] = set()
    per_task: dict[str, set[str]] = {}
    known = set(task_names())
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        task, sep, user = entry.rpartition("=")
        task, user = task.strip(), user.strip()
        if not user or (sep and not task):
            raise ConfigurationError(f"MCARD_PRODUCERS: {entry!r} names no user")
        if not sep:
            everyone.add(user)
            continue
        if task not in known:
            raise ConfigurationError(
                f"MCARD_PRODUCERS: {entry!r} names task {task!r}, which is not one of"
                f" {', '.join(sorted(known))}"
            )
        per_task.setdefault(task, set()).add(user)
    return frozenset(everyone), {task: frozenset(users) for task, users in per_task.items()}


def check_identity(settings: Settings) -> None:
    """Raise ConfigurationError now for an MCARD_PRODUCERS or broker URL that cannot work."""
    _users_of(settings.broker_url)
    parse_producers(settings.producers)


def producer_policy(app: Any, settings: Settings | None = None) -> ProducerPolicy | None:
    """The worker's policy from MCARD_PRODUCERS, or None when every producer is allowed."""
    settings = settings or settings_of(app)
    if not settings.producers.strip():
        return None
    everyone, per_task = parse_producers(settings.producers)
    if not everyone and not per_task:
        return None
    return ProducerPolicy(own=broker_user(app), everyone=everyone, per_task=per_task)
