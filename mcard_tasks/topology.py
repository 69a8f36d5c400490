"""The broker topology, declared once: producer, worker and operator tools all build from it.

AMQP reminders, where the entities are declared:
- ``durable`` exchanges and queues survive a broker restart; messages survive only if they are
  also published persistent (Celery publishes tasks persistent by default).
- Quorum queues are replicated (Raft) on a cluster and count deliveries: after
  ``x-delivery-limit`` redeliveries a poison message is dead-lettered instead of looping.
- ``x-dead-letter-strategy: at-least-once`` moves dead letters without loss; it requires
  ``x-overflow: reject-publish``, and a dead letter with no bound target queue stays in its
  source queue, so the dead-letter queues are declared with the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from amqp.exceptions import NotFound, PreconditionFailed
from kombu.entity import Exchange, Queue

from mcard_tasks.config import Settings
from mcard_tasks.errors import TopologyDriftError, TopologyMissingError
from mcard_tasks.specs import task_names

__all__ = [
    "DEAD_LETTER_EXCHANGE",
    "EVENTS_EXCHANGE",
    "EXCHANGE",
    "Topology",
    "build_topology",
    "dlq_name",
    "explain_drift",
]

EXCHANGE_NAME = "mcard"
DEAD_LETTER_EXCHANGE_NAME = "mcard.dlx"
EVENTS_EXCHANGE_NAME = "mcard.events"

# Topic, not direct: Celery's native delayed delivery (countdown retries on quorum queues)
# only binds topic exchanges. Routing keys without wildcards still match exactly.
EXCHANGE = Exchange(EXCHANGE_NAME, type="topic", durable=True)
# Direct: each dead letter carries its source queue's name as routing key.
DEAD_LETTER_EXCHANGE = Exchange(DEAD_LETTER_EXCHANGE_NAME, type="direct", durable=True)
EVENTS_EXCHANGE = Exchange(EVENTS_EXCHANGE_NAME, type="topic", durable=True)


def dlq_name(queue: str) -> str:
    """The dead-letter queue of a task queue."""
    return f"{queue}.dlq"


def task_queue_arguments(
    queue: str, queue_type: Literal["quorum", "classic"], delivery_limit: int
) -> dict[str, Any]:
    """The x-arguments of a task queue; changing them later needs a migration of the queue."""
    arguments: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE_NAME,
        # Fixed key: a retried message may travel with a delayed-delivery routing key.
        "x-dead-letter-routing-key": queue,
    }
    if queue_type == "quorum":
        arguments |= {
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    return arguments


@dataclass(frozen=True)
class Topology:
    """Every exchange and queue of mcard-tasks, for one queue type and delivery limit."""

    task_queues: tuple[Queue, ...]
    dead_letter_queues: tuple[Queue, ...]
    #: MCARD_DECLARE: whether producers and workers declare (else they only check).
    declares: bool = True

    @property
    def exchanges(self) -> tuple[Exchange, ...]:
        return (EXCHANGE, DEAD_LETTER_EXCHANGE, EVENTS_EXCHANGE)

    @property
    def routes(self) -> dict[str, dict[str, str]]:
        """Celery's task_routes: each task to the queue of its own name."""
        return {
            queue.name: {"queue": queue.name, "routing_key": queue.name}
            for queue in self.task_queues
        }

    def queue(self, name: str) -> Queue:
        for queue in self.task_queues + self.dead_letter_queues:
            if queue.name == name:
                return queue
        raise KeyError(name)

    def declare(self, channel: Any) -> None:
        """Declare everything, dead-letter side first so no dead letter is ever unroutable.

        Raises TopologyDriftError, in plain words, when an entity on the broker was declared
        with other arguments (RabbitMQ's PRECONDITION_FAILED; the channel is then closed).
        """
        try:
            for exchange in self.exchanges:
                exchange.bind(channel).declare()
            for queue in self.dead_letter_queues + self.task_queues:
                # Explicitly: with MCARD_DECLARE=false the queues say no_declare, so that
                # Celery and kombu never declare them on their own.
                bound = queue.bind(channel)
                bound.queue_declare()
                bound.queue_bind()
        except PreconditionFailed as exc:
            raise TopologyDriftError(explain_drift(exc)) from exc

    def missing(
        self, channel: Any, entities: tuple[Exchange | Queue, ...] | None = None
    ) -> list[str]:
        """The exchanges and queues (default: all of them) not on the broker: passive
        declares, each on a channel of its own (a NotFound closes the channel it happened
        on). Needs no permission."""
        if entities is None:
            entities = self.exchanges + self.dead_letter_queues + self.task_queues
        connection = channel.connection
        found: list[str] = []
        for entity in entities:
            probe = connection.channel()
            try:
                if isinstance(entity, Queue):
                    entity.bind(probe).queue_declare(passive=True)
                else:
                    entity.bind(probe).declare(passive=True)
            except NotFound:
                kind = "queue" if isinstance(entity, Queue) else "exchange"
                found.append(f"{kind} {entity.name}")
                continue
            probe.close()
        return found

    def check(self, channel: Any, entities: tuple[Exchange | Queue, ...] | None = None) -> None:
        """Raise TopologyMissingError naming everything (of entities) not on the broker."""
        missing = self.missing(channel, entities)
        if missing:
            raise TopologyMissingError(
                f"the broker lacks {', '.join(missing)} (MCARD_DECLARE=false: this process"
                " does not declare); run `mcard-tasks topology declare` as the deploy role"
            )

    def prepare_events(self, channel: Any) -> None:
        """Before publishing outcome events: declare or check the events exchange."""
        if self.declares:
            EVENTS_EXCHANGE.bind(channel).declare()
        else:
            self.check(channel, (EVENTS_EXCHANGE,))

    def prepare(self, channel: Any) -> None:
        """Before using the broker: declare everything (MCARD_DECLARE=true) or check it."""
        if self.declares:
            self.declare(channel)
        else:
            self.check(channel)


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for queue '(?P<queue>[^']+)'.*?"
    r"received (?P<ours>.+?) but current is (?P<theirs>.+?)$"
)


def explain_drift(exc: PreconditionFailed) -> str:
    """RabbitMQ's PRECONDITION_FAILED for a queue argument, said in plain words."""
    found = _INEQUIVALENT.search(str(exc))
    if not found:
        return str(exc)
    return (
        f"queue {found['queue']} has {found['arg']} = {found['theirs']} on the broker but the"
        f" topology says {found['ours']}: the queue must be drained and re-declared"
        " (or MCARD_* changed back) before workers and producers can use it"
    )


def build_topology(settings: Settings) -> Topology:
    """Build the topology for the settings' queue type and delivery limit."""
    queue_type, delivery_limit = settings.queue_type, settings.delivery_limit
    no_declare = not settings.declare
    task_queues = tuple(
        Queue(
            name,
            EXCHANGE,
            routing_key=name,
            durable=True,
            auto_delete=False,
            queue_arguments=task_queue_arguments(name, queue_type, delivery_limit),
            no_declare=no_declare,
        )
        for name in task_names()
    )
    dead_letter_queues = tuple(
        Queue(
            dlq_name(name),
            DEAD_LETTER_EXCHANGE,
            routing_key=name,
            durable=True,
            auto_delete=False,
            queue_arguments={"x-queue-type": queue_type},
            no_declare=no_declare,
        )
        for name in task_names()
    )
    return Topology(
        task_queues=task_queues, dead_letter_queues=dead_letter_queues, declares=settings.declare
    )
