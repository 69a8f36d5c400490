"""Operator actions on the broker: topology checks, queue depths, dead-letter queues.

Nothing here needs RabbitMQ's management plugin: it uses passive declares and basic.get.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from amqp.exceptions import AccessRefused, NotFound, PreconditionFailed
from celery import Celery
from kombu.entity import Exchange
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
)

from mcard_tasks.config import settings_of
from mcard_tasks.confirms import BROKER_ERRORS, publish_confirmed
from mcard_tasks.deadletter import REASON_HEADER
from mcard_tasks.errors import BrokerUnavailableError
from mcard_tasks.identity import ProducerPolicy, producer_policy
from mcard_tasks.legacy import LEGACY_HEADER, describe
from mcard_tasks.replay import replay_problem, replayed_headers, replayed_properties
from mcard_tasks.roles import CELERY_EVENTS
from mcard_tasks.specs import spec_for_key, task_names
from mcard_tasks.topology import (
    EXCHANGE,
    Topology,
    build_topology,
    dlq_name,
    explain_drift,
)

__all__ = [
    "DeadLetter",
    "Found",
    "QueueDepth",
    "Replay",
    "Verdict",
    "check_topology",
    "dead_letters",
    "declare_topology",
    "find_dead_letters",
    "purge_dlq",
    "queue_depths",
    "replay_dlq",
    "topology_of",
]


def topology_of(app: Celery) -> Topology:
    return build_topology(settings_of(app))


@contextmanager
def _channel(app: Celery) -> Iterator[Any]:
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        yield connection.default_channel


def declare_topology(app: Celery) -> None:
    """Declare every exchange and queue (idempotent when nothing drifted): the deploy step.

    Also what workers and producers declare on the fly with MCARD_DECLARE=true: Celery's event
    exchange and, for quorum queues, Celery's native delayed delivery bound to each task queue.
    """
    topology = topology_of(app)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        topology.declare(connection.default_channel)
        Exchange(CELERY_EVENTS, type="topic", durable=True).bind(
            connection.default_channel
        ).declare()
        if settings_of(app).queue_type == "quorum":
            declare_native_delayed_delivery_exchanges_and_queues(connection, "quorum")
            for queue in topology.task_queues:
                bind_queue_to_native_delayed_delivery_exchange(connection, queue)


#: How long a look at a DLQ or a replay waits, at most, for the letters it took and left to be
#: counted ready again before it returns.
RETURN_WAIT = 10.0


@contextmanager
def _probe(connection: Any) -> Iterator[Any]:
    """A channel for one probe, closed after it (a refused probe has the broker close it)."""
    channel = connection.channel()
    try:
        yield channel
    finally:
        with suppress(Exception):  # already closed by the broker's refusal
            channel.close()


def check_topology(app: Celery, notes: list[str] | None = None) -> list[str]:
    """Problems found between the broker and the declared topology (empty when all is well);
    what could not be checked is appended to notes."""
    problems: list[str] = []
    notes = [] if notes is None else notes
    compare = True
    topology = topology_of(app)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        for exchange in topology.exchanges:
            with _probe(connection) as channel:
                try:
                    exchange(channel).declare(passive=True)
                except NotFound:
                    problems.append(f"exchange {exchange.name} is missing")
        for queue in topology.task_queues + topology.dead_letter_queues:
            with _probe(connection) as channel:
                try:
                    queue(channel).queue_declare(passive=True)
                except NotFound:
                    problems.append(f"queue {queue.name} is missing")
                    continue
            if not compare:
                continue
            with _probe(connection) as channel:
                try:  # an equivalent declare is a no-op; a different argument is refused
                    queue(channel).queue_declare()
                except PreconditionFailed as exc:
                    problems.append(explain_drift(exc))
                except AccessRefused:
                    # The operator role may not configure: existence checked, arguments not.
                    compare = False
                    notes.append(
                        "queue arguments not compared: this broker user may not declare"
                        " (configure permission); run `mcard-tasks topology check` as the"
                        " deploy role for that"
                    )
    return problems


@dataclass(frozen=True)
class QueueDepth:
    name: str
    ready: int
    consumers: int


def queue_depths(app: Celery) -> list[QueueDepth]:
    """Ready messages and consumers of every task and dead-letter queue (passive declares)."""
    depths = []
    topology = topology_of(app)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        for queue in topology.task_queues + topology.dead_letter_queues:
            try:
                ok = queue(connection.channel()).queue_declare(passive=True)
            except NotFound:
                depths.append(QueueDepth(queue.name, -1, 0))
                continue
            depths.append(QueueDepth(queue.name, ok.message_count, ok.consumer_count))
    return depths


@dataclass(frozen=True)
class DeadLetter:
    request_id: str | None
    task: str | None
    reason: str
    deaths: int
    body: str
    #: The key of a legacy message (or of the task message translated from one), else None.
    key: str | None = None


def _await_ready(app: Celery, connection: Any, name: str, count: int) -> None:
    """Return once the queue name counts at least count messages ready, or after RETURN_WAIT.

    Messages taken unacked go back when their channel closes, but a quorum queue takes them
    back only once it has logged the end of their channel, a moment after the broker confirmed
    the close (longer when its disk is busy): a look or a replay run right after would find
    them missing ("replayed 0"). Bounded: someone else taking letters meanwhile (another
    replay, a purge) makes it wait RETURN_WAIT, no more. A broker error is raised: the letters
    acked before it may not have reached the broker.
    """
    if count <= 0:  # nothing left to come back (a DLQ looked at empty, every letter acked)
        return
    deadline = time.monotonic() + RETURN_WAIT
    with _probe(connection) as channel:
        queue = topology_of(app).queue(name)(channel)
        while int(queue.queue_declare(passive=True).message_count) < count:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)


def _describe(message: Any) -> DeadLetter:
    headers = message.headers or {}
    deaths = headers.get("x-death") or []
    reason = headers.get(REASON_HEADER) or ", ".join(
        f"{d.get('reason')} in {d.get('queue')}" for d in deaths
    )
    raw = message.body
    body = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "replace")
    request_id, key = headers.get("id"), headers.get(LEGACY_HEADER)
    if "task" not in headers:  # no Celery headers: a legacy message names them in its body
        request_id, key = _legacy_names(body)
    return DeadLetter(
        request_id=request_id,
        task=headers.get("task") or _task_of(key),
        reason=str(reason or "unknown"),
        deaths=sum(int(d.get("count", 1)) for d in deaths),
        body=body[:500],
        key=key,
    )


def _legacy_names(body: str) -> tuple[str | None, str | None]:
    try:
        return describe(json.loads(body))
    except (ValueError, RecursionError):  # not JSON (or nested past the parser): no names
        return None, None


def _task_of(key: str | None) -> str | None:
    spec = None if key is None else spec_for_key(key)
    return None if spec is None else spec.name


def _dlq(queue: str) -> str:
    if queue in task_names():
        return dlq_name(queue)
    if queue.removesuffix(".dlq") in task_names() and queue.endswith(".dlq"):
        return queue
    raise ValueError(f"unknown queue {queue!r}; one of: {', '.join(task_names())}")


def dead_letters(app: Celery, queue: str, limit: int = 50) -> list[DeadLetter]:
    """Look at up to limit dead letters of queue without removing or reordering them."""
    return _peek(app, _dlq(queue), limit=limit)


def _peek(
    app: Celery,
    name: str,
    wanted: Callable[[DeadLetter], bool] = lambda letter: True,
    limit: int | None = None,
) -> list[DeadLetter]:
    """The letters of the DLQ name that are wanted (up to limit), looked at and left there
    in the same order.

    Each is taken unacked and all go back when the channel closes (it returns once the DLQ
    counts them ready again, so a look or a replay right after finds them). A quorum queue
    puts a returned message behind those still ready, so it is read to the end however few are
    kept: stopping early would move what was looked at behind the rest. Bounded all the same
    (letters arriving faster than they are read): twice what it held at the start, and 1,000.
    """
    kept: list[DeadLetter] = []
    taken = 0
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        with _probe(connection) as channel:  # closed at the end: unacked letters go back
            dlq = topology_of(app).queue(name)(channel)
            bound = 2 * int(dlq.queue_declare(passive=True).message_count) + 1000
            for _ in range(bound):
                message = dlq.get(no_ack=False)
                if message is None:
                    break
                taken += 1
                letter = _describe(message)
                if wanted(letter) and (limit is None or len(kept) < limit):
                    kept.append(letter)
        _await_ready(app, connection, name, taken)
    return kept


@dataclass(frozen=True)
class Found:
    """A dead letter of a request, and the DLQ it is in."""

    dlq: str
    letter: DeadLetter


def find_dead_letters(app: Celery, request_id: str) -> list[Found]:
    """Every dead letter carrying request_id, in every DLQ, each left where it is (as
    :func:`dead_letters` looks). A DLQ not declared on the broker holds none.

    Raises the broker's errors (unreachable, or AccessRefused for a user who may not read
    the DLQs: the operator role may).
    """
    found = []
    for queue in task_names():
        try:
            letters = _peek(app, dlq_name(queue), lambda letter: letter.request_id == request_id)
        except NotFound:
            continue
        found += [Found(dlq_name(queue), letter) for letter in letters]
    return found


@dataclass(frozen=True)
class Verdict:
    """One dead letter a replay looked at, and why it was refused (None: replayed, or would
    be on a dry run)."""

    letter: DeadLetter
    problem: str | None = None


@dataclass
class Replay:
    """What a replay of a dead-letter queue did (or, on a dry run, would do)."""

    queue: str
    #: Ready letters in the DLQ when the replay started: it looks at no more than these.
    found: int
    dry_run: bool = False
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def replayed(self) -> list[DeadLetter]:
        return [v.letter for v in self.verdicts if v.problem is None]

    @property
    def refused(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.problem is not None]

    @property
    def left(self) -> int:
        """How many of the letters found are still in the DLQ (all, on a dry run)."""
        return self.found - (0 if self.dry_run else len(self.replayed))


def replay_dlq(
    app: Celery, queue: str, limit: int | None = None, *, dry_run: bool = False
) -> Replay:
    """Republish the valid dead letters of queue to its task queue, same request IDs.

    Bounded: it looks at no more letters than the DLQ held when it started (a replayed letter
    that fails again lands back in the same DLQ, behind them), and replays at most limit.
    Each letter is validated first (mcard_tasks.replay): a refused one is left in the DLQ.
    Each is published with confirms and acked from the DLQ only after the broker took it, so
    a crash midway duplicates at worst, and the ledger makes a duplicate harmless. On a dry
    run nothing is published or acked: every letter looked at goes back to the DLQ. It returns
    once the DLQ counts the letters it left ready again (a replay right after finds them).
    """
    name = _dlq(queue)
    source = name.removesuffix(".dlq")
    policy = producer_policy(app)
    replay = Replay(queue=source, found=0, dry_run=dry_run)
    with app.connection_for_write() as connection:
        try:
            with _probe(connection) as channel:  # closed at the end: unacked letters go back
                _replay_letters(app, channel, name, replay, limit, policy)
        except BrokerUnavailableError:
            with suppress(*BROKER_ERRORS):  # the replay's own error is the one to report
                _await_ready(app, connection, name, replay.left)
            raise
        _await_ready(app, connection, name, replay.left)
    return replay


def _replay_letters(
    app: Celery,
    channel: Any,
    name: str,
    replay: Replay,
    limit: int | None,
    policy: ProducerPolicy | None,
) -> None:
    dlq = topology_of(app).queue(name)(channel)
    replay.found = int(dlq.queue_declare(passive=True).message_count)
    taken = 0
    while taken < replay.found or not taken:
        if limit is not None and len(replay.replayed) >= limit:
            return
        message = dlq.get(no_ack=False)
        if message is None:
            return
        if not taken:
            # The count basic.get returns is the queue's own; a passive declare's can read
            # 0 when a busy quorum queue does not answer it in time.
            ready = int((message.delivery_info or {}).get("message_count") or 0)
            replay.found = max(replay.found, ready + 1)
        taken += 1
        verdict = Verdict(_describe(message), replay_problem(message, replay.queue, policy))
        if verdict.problem is not None or replay.dry_run:
            replay.verdicts.append(verdict)
            continue  # unacked: back to the DLQ when the channel closes
        try:
            publish_confirmed(
                app,
                message.body,
                exchange=EXCHANGE.name,
                routing_key=replay.queue,
                headers=replayed_headers(message),
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                delivery_mode=2,
                serializer=None,
                **replayed_properties(message.properties or {}),
            )
        except BROKER_ERRORS as exc:
            raise BrokerUnavailableError(
                f"the broker did not confirm the replay of {verdict.letter.request_id}"
                f" ({exc!r}) after {len(replay.replayed)} replayed; it and the rest"
                " stay in the DLQ, and replaying again is safe"
            ) from exc
        message.ack()
        replay.verdicts.append(verdict)


def purge_dlq(app: Celery, queue: str) -> int:
    """Delete every dead letter of queue; return how many."""
    name = _dlq(queue)
    with _channel(app) as channel:
        return int(topology_of(app).queue(name)(channel).purge() or 0)
