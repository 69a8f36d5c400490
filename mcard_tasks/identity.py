"""Producer identity: who published a task message, and whether the worker may run it.

Every message mcard-tasks publishes carries the AMQP ``user_id`` property set to the broker
user it connects as. RabbitMQ validates that property: a publish whose ``user_id`` differs
from the connection's user is refused (the channel is closed with PRECONDITION_FAILED), so a
``user_id`` on a delivered message names its real publisher.

``MCARD_PRODUCERS`` says which users the worker executes messages of: ``app,ops`` allows two
users every task, ``mcard.single_burn=support`` allows a user one task; entries mix. The
worker's own broker user is always allowed: its retries and the task messages it republishes
for legacy messages carry it. Unset, the worker executes what the broker let anyone publish.
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
    "UNAUTHORIZED_PRODUCER",
    "ProducerPolicy",
    "broker_user",
    "check_identity",
    "producer_policy",
    "user_of_url",
]

#: How a refusal for its producer starts: replays never republish such a dead letter.
UNAUTHORIZED_PRODUCER = "unauthorized producer"
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

    def refusal(self, task: str, user: object) -> str | None:
        """Why a message of task published by user (its ``user_id``) is refused, or None."""
        if user is None or user == "":
            return (
                f"{UNAUTHORIZED_PRODUCER}: the message has no user_id (MCARD_PRODUCERS is set:"
                f" only messages of allowed broker users run {task})"
            )
        if isinstance(user, bytes):
            user = user.decode("utf-8", "replace")
        if not isinstance(user, str) or not self.allows(task, user):
            return f"{UNAUTHORIZED_PRODUCER}: user {user!r} may not publish {task}"
        return None


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
