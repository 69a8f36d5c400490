"""Each broker role's user on the real broker: it does its job, and nothing outside it.

The module's own vhost holds one user per role of ``mcard-tasks broker permissions ROLE``
(an intruder with the producer's permissions, not listed in MCARD_PRODUCERS, and an
eavesdropper with a subscriber's permissions for its own queues). Every
process but the deploy step runs with MCARD_DECLARE=false. The test process itself reads the
dead-letter queues and the ledger to see what happened.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from amqp.exceptions import AccessRefused, PreconditionFailed
from kombu import Connection, Producer

from mcard_tasks import app
from mcard_tasks.broker_users import password_variable
from mcard_tasks.identity import PRODUCER_HEADER, UNAUTHORIZED_PRODUCER
from mcard_tasks.ledger import get_ledger
from mcard_tasks.messages import TaskMessages
from mcard_tasks.roles import ROLES, permissions
from mcard_tasks.specs import task_names
from tests.conftest import SESSION
from tests.fixtures import (
    CONSOLE_SCRIPT,
    ROOT,
    Worker,
    add_broker_user,
    peek,
    rabbitmqctl,
    recorded,
    wait_for,
)

pytestmark = pytest.mark.integration
HOST = "127.0.0.1:5672"
QUEUE = "mcard.single_mint"
#: Users with another role's permissions: a producer not in MCARD_PRODUCERS, and a second
#: subscriber (its own queues only).
IMPOSTORS = {"intruder": "producer", "eavesdropper": "subscriber"}


@dataclass
class Realm:
    """The module's vhost and a user per role."""

    vhost: str
    passwords: dict[str, str]
    ledger_url: str
    tag: str = SESSION

    def user(self, role: str) -> str:
        return f"{role}-{self.tag}"

    def url(self, role: str) -> str:
        return f"amqp://{self.user(role)}:{self.passwords[role]}@{HOST}/{self.vhost}"

    def env(self, role: str, **settings: str) -> dict[str, str]:
        env = dict(os.environ, MCARD_BROKER_URL=self.url(role), MCARD_DATABASE_URL=self.ledger_url)
        env["MCARD_DECLARE"] = "false" if role != "deploy" else "true"
        env.update({f"MCARD_{key.upper()}": value for key, value in settings.items()})
        return env

    def cli(
        self, role: str, *args: str, timeout: float = 60, **settings: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONSOLE_SCRIPT), *args],
            cwd=ROOT,
            env=self.env(role, **settings),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def enqueue(
        self, role: str, request_id: str, owner: str, *extra: str
    ) -> subprocess.CompletedProcess[str]:
        """`mcard-tasks single-mint` as role: card ``card-<request_id>`` to owner."""
        fields = ("--owner", owner, "--card-id", f"card-{request_id}", "--request-id", request_id)
        return self.cli(role, "single-mint", *fields, *extra)

    def python(self, role: str, script: str) -> subprocess.CompletedProcess[str]:
        """Run a Python script as role; fail the test if it fails."""
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=self.env(role),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done

    def connection(self, role: str) -> Connection:
        """A confirming connection as role: a refused publish raises at once."""
        return Connection(self.url(role), transport_options={"confirm_publish": True})

    def admin(self) -> Connection:
        return Connection(f"amqp://guest:guest@{HOST}/{self.vhost}")


@contextmanager
def made_realm(tag: str, ledger: Path) -> Iterator[Realm]:
    """A vhost with a user per role (named ROLE-tag), removed at the end."""
    vhost = f"mcard-roles-{tag}"
    found = Realm(vhost, {}, f"sqlite:///{ledger}", tag)
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        for role in (*ROLES, *IMPOSTORS):
            found.passwords[role] = secrets.token_hex(12)
            add_broker_user(found.user(role), found.passwords[role])
            granted = permissions(IMPOSTORS.get(role, role), found.user(role))
            rabbitmqctl(
                "set_permissions",
                "-p",
                vhost,
                found.user(role),
                granted.configure,
                granted.write,
                granted.read,
            )
        yield found
    finally:
        for role in found.passwords:
            rabbitmqctl("delete_user", found.user(role))
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    with made_realm(SESSION, tmp_path_factory.mktemp("roles") / "ledger.sqlite3") as found:
        yield found


def consumers(realm: Realm) -> dict[str, int]:
    lines = rabbitmqctl("list_queues", "-q", "-p", realm.vhost, "name", "consumers")
    counts = {}
    for line in lines.splitlines():
        name, _, count = line.partition("\t")
        if count.strip().isdigit():
            counts[name] = int(count)
    return counts


def letters(realm: Realm, queue: str = QUEUE) -> dict[str, str]:
    """Request ID (or body) to reason of every dead letter now in queue's DLQ (taken)."""
    found: dict[str, str] = {}
    with realm.admin() as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(f"{queue}.dlq", no_ack=True)) is not None:
            headers = message.headers or {}
            body = message.body
            text = body if isinstance(body, str) else bytes(body).decode("utf-8", "replace")
            key = headers.get("id") or text
            found[str(key)] = str(headers.get("x-mcard-reason"))
    return found


def wait_for_letters(realm: Realm, count: int, queue: str = QUEUE) -> dict[str, str]:
    taken: dict[str, str] = {}

    def enough() -> bool:
        taken.update(letters(realm, queue))
        return len(taken) >= count

    wait_for(enough, 30, f"{count} dead letters in {queue}.dlq")
    return taken


def task_message(request_id: str, task: str = QUEUE, **fields: Any) -> Any:
    fields = fields or {"owner": "alice", "card_id": f"card-{request_id}"}
    return TaskMessages(app).build_published(task=task, request_id=request_id, kwargs=fields)


def publish(realm: Realm, role: str, message: Any, **changes: Any) -> None:
    """Publish message as role (its user_id that role's user unless changed)."""
    changes.setdefault("user_id", realm.user(role))
    properties = dict(message.properties, **changes)
    properties = {key: value for key, value in properties.items() if value is not None}
    with realm.connection(role) as connection:
        Producer(connection.default_channel).publish(
            message.body,
            exchange=message.exchange,
            routing_key=message.routing_key,
            headers=message.headers,
            retry=False,
            **properties,
        )


def oversized(message: Any) -> Any:
    """message with a body over MCARD_MAX_BODY_BYTES (262,144): 300,009 bytes."""
    return message._replace(body=b"[[], {" + b" " * 300_000 + b"}, {}]")


def put_letter(realm: Realm, message: Any, **headers: Any) -> None:
    """Put message into its DLQ as a dead letter with headers (as the administrator)."""
    with realm.admin() as connection:
        Producer(connection.default_channel).publish(
            message.body,
            exchange="mcard.dlx",
            routing_key=QUEUE,
            headers=dict(message.headers, **headers),
            **{k: v for k, v in message.properties.items() if k != "user_id"},
        )


def minted(realm: Realm, request_id: str) -> int:
    return recorded(get_ledger(realm.ledger_url), [request_id])


# --- before the deploy step: nothing is declared ---------------------------------------------


def test_without_the_deploy_step_producers_and_workers_name_what_is_missing(
    realm: Realm, worker_factory: Callable[..., Worker]
) -> None:
    enqueue = realm.cli("producer", "single-mint", "--owner", "alice", "--card-id", "c0")
    assert enqueue.returncode != 0
    assert "lacks exchange mcard" in enqueue.stderr and "topology declare" in enqueue.stderr
    worker = worker_factory(
        realm.ledger_url, "roles-missing", broker_url=realm.url("worker"), declare="false"
    ).launch()
    assert worker.process is not None
    assert worker.process.wait(60) != 0
    log = worker.log.read_text()
    assert "TopologyMissingError" in log and f"queue {QUEUE}.dlq" in log


def test_only_the_deploy_role_declares(realm: Realm) -> None:
    refused = realm.cli("worker", "topology", "declare")
    assert refused.returncode != 0 and "ACCESS_REFUSED" in refused.stderr
    declared = realm.cli("deploy", "topology", "declare")
    assert declared.returncode == 0, declared.stderr
    checked = realm.cli("deploy", "topology", "check")
    assert checked.returncode == 0, checked.stderr


# --- the roles at work ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(realm: Realm, worker_factory: Callable[..., Worker]) -> Iterator[Worker]:
    realm.cli("deploy", "topology", "declare").check_returncode()
    running = worker_factory(
        realm.ledger_url,
        "roles",
        broker_url=realm.url("worker"),
        declare="false",
        # The operator's replays carry its user: listed, so that they run.
        producers=f"{realm.user('producer')},{realm.user('operator')}",
    ).launch()
    wait_for(
        lambda: running._exited() or all(consumers(realm).get(q) for q in task_names()),
        60,
        "the worker to consume every task queue",
    )
    assert not running._exited(), running.log.read_text()[-3000:]
    yield running
    running.stop()
    assert "ACCESS_REFUSED" not in running.log.read_text()


def test_a_producer_enqueues_and_the_worker_applies_it(realm: Realm, worker: Worker) -> None:
    request_id = f"roles-{uuid.uuid4().hex}"
    done = realm.enqueue("producer", request_id, "alice", "--wait", "30")
    assert done.returncode == 0, done.stderr
    assert minted(realm, request_id) == 1


def test_a_producer_retry_later_goes_through_delayed_delivery(realm: Realm, worker: Worker) -> None:
    request_id = f"roles-later-{uuid.uuid4().hex}"
    script = (
        "from mcard_tasks.tasks import single_mint\n"
        f"single_mint.apply_async(kwargs={{'owner': 'bob', 'card_id': 'later-{request_id}'}},"
        f" task_id={request_id!r}, countdown=1)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script], env=realm.env("producer"), check=True, timeout=60
    )
    wait_for(lambda: minted(realm, request_id) == 1, 30, "the delayed request to be applied")


def test_the_operator_checks_the_topology_and_lists_dead_letters(
    realm: Realm, worker: Worker
) -> None:
    checked = realm.cli("operator", "topology", "check")
    assert checked.returncode == 0, checked.stderr
    assert "arguments not compared" in checked.stderr
    listed = realm.cli("operator", "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"{QUEUE}.dlq" in listed.stdout


def test_the_monitor_runs_inspect_and_reads_task_events(realm: Realm, worker: Worker) -> None:
    script = (
        "import json, socket\n"
        "from mcard_tasks import app\n"
        "print(json.dumps(sorted(app.control.inspect(timeout=3).ping() or {})))\n"
        "events = []\n"
        "with app.connection_for_read() as connection:\n"
        "    receiver = app.events.Receiver(connection, handlers={'*': events.append})\n"
        "    try:\n"
        "        for _ in receiver.itercapture(limit=None, timeout=20, wakeup=False):\n"
        "            if events:\n"
        "                break\n"
        "    except socket.timeout:\n"
        "        pass\n"
        "print(json.dumps(sorted({e['type'] for e in events})))\n"
    )
    done = realm.python("monitor", script)
    nodes, events = (json.loads(line) for line in done.stdout.splitlines()[-2:])
    assert worker.node in nodes
    assert events, "a worker heartbeat (or another event) within 20 s"


# --- and nothing else ---------------------------------------------------------------------------


def test_a_producer_may_not_consume_publish_events_or_declare(realm: Realm, worker: Worker) -> None:
    refused = "ACCESS_REFUSED - access to {} in vhost"
    queue = re.escape(refused.format(f"queue '{QUEUE}'"))
    with realm.connection("producer") as connection, pytest.raises(AccessRefused, match=queue):
        connection.default_channel.basic_get(QUEUE)
    events = re.escape(refused.format("exchange 'mcard.events'"))
    with realm.connection("producer") as connection, pytest.raises(AccessRefused, match=events):
        Producer(connection.default_channel).publish(
            b"{}", exchange="mcard.events", routing_key="mcard.single_mint.issued"
        )
    extra = f"mcard.extra-{SESSION}"
    declare = re.escape(refused.format(f"queue '{extra}'"))
    with realm.connection("producer") as connection, pytest.raises(AccessRefused, match=declare):
        connection.default_channel.queue_declare(extra)


def test_a_forged_user_id_is_refused_by_the_broker(realm: Realm, worker: Worker) -> None:
    request_id = f"roles-forged-{uuid.uuid4().hex}"
    with pytest.raises(PreconditionFailed, match="user_id property set to"):
        publish(realm, "intruder", task_message(request_id), user_id=realm.user("producer"))
    assert minted(realm, request_id) == 0


def test_status_finds_a_refused_request_in_its_dlq_as_the_operator_not_as_the_producer(
    realm: Realm, worker: Worker
) -> None:
    request_id = f"roles-status-{uuid.uuid4().hex}"
    enqueue = realm.enqueue("intruder", request_id, "mallory")
    assert enqueue.returncode == 0, enqueue.stderr
    found = wait_for(
        lambda: (done := realm.cli("operator", "status", request_id)).returncode == 8 and done,
        30,
        "the operator's status to find the refused request in its DLQ",
        every=0.5,
    )
    assert f"dead-lettered in {QUEUE}.dlq: unauthorized producer" in found.stdout
    as_producer = realm.cli("producer", "status", request_id)
    assert as_producer.returncode == 6, as_producer.stdout + as_producer.stderr
    assert "may not read them (the operator role may)" in as_producer.stderr
    assert request_id in wait_for_letters(realm, 1), "the letter stayed in the DLQ"


def test_unlisted_anonymous_and_builtin_messages_are_dead_lettered_with_no_effect(
    realm: Realm, worker: Worker
) -> None:
    intruder = f"roles-intruder-{uuid.uuid4().hex}"
    enqueue = realm.enqueue("intruder", intruder, "mallory")
    assert enqueue.returncode == 0, enqueue.stderr  # the broker lets it publish
    anonymous = f"roles-anonymous-{uuid.uuid4().hex}"
    publish(realm, "producer", task_message(anonymous), user_id=None)
    builtin = f"roles-builtin-{uuid.uuid4().hex}"
    chord_unlock = task_message(builtin, task=QUEUE)
    headers = dict(chord_unlock.headers, task="celery.chord_unlock")
    body = json.dumps([[], {"group_id": "g", "result": [["x", None]] * 50}, {}])
    with realm.connection("producer") as connection:
        Producer(connection.default_channel).publish(
            body,
            exchange="mcard",
            routing_key=QUEUE,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            user_id=realm.user("producer"),
            retry=False,
        )
    legacy_id = f"roles-legacy-{uuid.uuid4().hex}"
    legacy = {"key": QUEUE, "request_id": legacy_id, "data": {"owner": "m", "card_id": "l"}}
    with realm.connection("intruder") as connection:
        Producer(connection.default_channel).publish(
            legacy, exchange="mcard", routing_key=QUEUE, serializer="json", retry=False,
            user_id=realm.user("intruder"),
        )  # fmt: skip

    reasons = wait_for_letters(realm, 4)
    assert reasons[intruder] == (
        f"{UNAUTHORIZED_PRODUCER}: user {realm.user('intruder')!r} may not publish {QUEUE}"
    )
    assert reasons[anonymous].startswith(f"{UNAUTHORIZED_PRODUCER}: the message has no user_id")
    assert reasons[builtin] == "unknown task name 'celery.chord_unlock'"
    legacy_reason = next(reason for key, reason in reasons.items() if legacy_id in key)
    assert legacy_reason.startswith(f"{UNAUTHORIZED_PRODUCER}: user {realm.user('intruder')!r}")
    for request_id in (intruder, anonymous, builtin, legacy_id):
        assert minted(realm, request_id) == 0
    # The worker goes on: the listed producer's next request is applied.
    test_a_producer_enqueues_and_the_worker_applies_it(realm, worker)


def test_the_monitor_may_inspect_but_not_revoke_or_shut_down(realm: Realm, worker: Worker) -> None:
    revoked, merged = (f"roles-revoke-{uuid.uuid4().hex}" for _ in range(2))
    script = (
        "import json\n"
        "from mcard_tasks import app\n"
        f"node = [{worker.node!r}]\n"
        "replies = {}\n"
        "for command, arguments in [('shutdown', {}), ('revoke', {'task_id': %r}),\n"
        "                           ('pool_shrink', {'n': 1}), ('rate_limit',\n"
        "                            {'task_name': 'mcard.single_mint', 'rate_limit': '1/h'}),\n"
        "                           ('hello', {'from_node': 'x@y', 'revoked': [%r]})]:\n"
        "    replies[command] = app.control.broadcast(\n"
        "        command, arguments=arguments, destination=node, reply=True, timeout=3)\n"
        "print(json.dumps(replies))\n"
    ) % (revoked, merged)
    done = realm.python("monitor", script)
    replies = json.loads(done.stdout.splitlines()[-1])
    for command in ("shutdown", "revoke", "pool_shrink", "rate_limit"):
        (reply,) = replies[command]
        assert "refuse" in reply[worker.node]["error"], (command, reply)
    assert replies["hello"], "hello (an inspect command) is answered"
    # Neither request ID is revoked: both are applied, and the worker is still up.
    for request_id in (revoked, merged):
        done = realm.enqueue("producer", request_id, "carol", "--wait", "30")
        assert done.returncode == 0, done.stderr
        assert minted(realm, request_id) == 1
    assert not worker._exited()


def test_the_definitions_file_creates_every_role_user_with_its_permissions() -> None:
    vhost = f"mcard-defs-{SESSION}"
    prefix = f"defs-{SESSION}-"
    passwords = {role: secrets.token_hex(12) for role in ROLES}
    env = dict(os.environ, **{password_variable(r): p for r, p in passwords.items()})
    missing = subprocess.run(
        [str(CONSOLE_SCRIPT), "broker", "definitions", "--vhost", vhost],
        env={k: v for k, v in env.items() if k != password_variable("worker")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and password_variable("worker") in missing.stderr
    made = subprocess.run(
        [str(CONSOLE_SCRIPT), "broker", "definitions", "--vhost", vhost, "--prefix", prefix],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert not any(password in made.stdout for password in passwords.values())
    # Where the broker's own system user can read it (pytest's folders are private).
    path = Path(f"/tmp/mcard-definitions-{SESSION}.json")
    path.write_text(made.stdout)
    path.chmod(0o644)
    expected = [f"{prefix}{role}\t{permissions(role, prefix + role).line()}" for role in ROLES]
    try:
        rabbitmqctl("import_definitions", str(path))

        def imported() -> bool:  # the import is asynchronous
            done = subprocess.run(
                ["rabbitmqctl", "list_permissions", "-q", "-p", vhost],
                capture_output=True,
                text=True,
                timeout=60,
            )
            return all(line in done.stdout for line in expected)

        wait_for(imported, 30, "the definitions to be imported")
        for role in ROLES:
            with Connection(f"amqp://{prefix}{role}:{passwords[role]}@{HOST}/{vhost}") as c:
                c.ensure_connection(max_retries=1)
        with (
            pytest.raises(AccessRefused),
            Connection(f"amqp://{prefix}producer:wrong@{HOST}/{vhost}") as refused,
        ):
            refused.ensure_connection(max_retries=1)
    finally:
        path.unlink()
        for role in ROLES:
            subprocess.run(["rabbitmqctl", "delete_user", f"{prefix}{role}"], capture_output=True)
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)


def test_an_operator_replays_valid_letters_only_never_an_unauthorized_one(
    realm: Realm, worker: Worker
) -> None:
    letters(realm)  # start from an empty DLQ
    unauthorized = f"roles-replay-intruder-{uuid.uuid4().hex}"
    done = realm.enqueue("intruder", unauthorized, "mallory")
    assert done.returncode == 0, done.stderr
    invalid = f"roles-replay-invalid-{uuid.uuid4().hex}"
    publish(realm, "producer", task_message(invalid, owner="", card_id="x"))
    wait_for(lambda: dlq_depth(realm) == 2, 30, "two dead letters")
    valid = f"roles-replay-valid-{uuid.uuid4().hex}"
    message = task_message(valid)
    reason = {"x-mcard-reason": "TransientError: ledger down"}  # as a retry-exhausted request's
    put_letter(realm, message, **reason, **{PRODUCER_HEADER: realm.user("producer")})
    wait_for(lambda: dlq_depth(realm) == 3, 30, "three dead letters")

    replayed = realm.cli("operator", "dlq", "replay", QUEUE)
    assert replayed.returncode == 2, replayed.stdout + replayed.stderr  # some were refused
    wait_for(lambda: minted(realm, valid) == 1, 30, "the replayed request to be applied")
    left = letters(realm)
    assert set(left) == {unauthorized, invalid}
    assert left[unauthorized].startswith(UNAUTHORIZED_PRODUCER)
    assert minted(realm, unauthorized) == 0 and minted(realm, invalid) == 0


def test_an_unlisted_producer_is_refused_before_the_limits_and_never_through_a_replay(
    realm: Realm, worker: Worker
) -> None:
    letters(realm)
    far = f"roles-far-{uuid.uuid4().hex}"
    message = task_message(far)
    publish(realm, "intruder", message._replace(headers=dict(message.headers, eta="2999-01-01")))
    big = f"roles-big-intruder-{uuid.uuid4().hex}"
    publish(realm, "intruder", oversized(task_message(big)))
    reasons = wait_for_letters(realm, 2)
    for request_id in (far, big):
        assert reasons[request_id] == (
            f"{UNAUTHORIZED_PRODUCER}: user {realm.user('intruder')!r} may not publish {QUEUE}"
        )
    # A letter the broker dead-lettered from the task queue (x-death): its user_id is the
    # producer's, and an x-mcard-producer header in it is the producer's own forgery.
    forged = f"roles-forged-letter-{uuid.uuid4().hex}"
    message = task_message(forged)
    death = {"queue": QUEUE, "reason": "rejected", "count": 1, "exchange": "mcard"}
    put_letter(realm, message, **{"x-death": [death], PRODUCER_HEADER: "app"})
    wait_for(lambda: dlq_depth(realm) == 1, 30, "the letter in the DLQ")
    # An operator with MCARD_PRODUCERS refuses it...
    listed = f"{realm.user('producer')},{realm.user('operator')}"
    shown = realm.cli("operator", "dlq", "replay", QUEUE, "--dry-run", producers=listed)
    assert shown.returncode == 2, shown.stdout + shown.stderr
    assert "has no user_id" in shown.stdout and "never replayed" in shown.stdout, shown.stdout
    # ... and one without it replays it as itself (a listed producer), with the original
    # producer (none) in x-mcard-producer: the worker refuses it.
    replayed = realm.cli("operator", "dlq", "replay", QUEUE)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    reasons = wait_for_letters(realm, 1)
    assert reasons[forged].startswith(f"{UNAUTHORIZED_PRODUCER}: the message has no user_id")
    assert f"(the request's original producer, {PRODUCER_HEADER})" in reasons[forged]
    for request_id in (far, big, forged):
        assert minted(realm, request_id) == 0


def dlq_depth(realm: Realm, queue: str = QUEUE) -> int:
    with realm.admin() as connection:
        return int(connection.default_channel.queue_declare(f"{queue}.dlq", passive=True)[1])


def test_an_oversized_body_from_a_listed_producer_is_dead_lettered_undecoded(
    realm: Realm, worker: Worker
) -> None:
    letters(realm)
    request_id = f"roles-big-{uuid.uuid4().hex}"
    publish(realm, "producer", oversized(task_message(request_id)))
    reasons = wait_for_letters(realm, 1)
    assert reasons[request_id].startswith("body: the task message is 300")
    assert "over MCARD_MAX_BODY_BYTES=262144" in reasons[request_id]
    assert minted(realm, request_id) == 0


def test_a_subscriber_reads_outcome_events_on_its_own_queue(realm: Realm, worker: Worker) -> None:
    request_id = f"roles-sub-{uuid.uuid4().hex}"
    script = (
        "import json, subprocess, sys, os\n"
        "from mcard_tasks import app\n"
        "from mcard_tasks.events import subscribe\n"
        "with subscribe(app, timeout=1.0) as events:\n"
        "    print('subscribed', flush=True)\n"
        "    for _, event in zip(range(30), events):\n"
        f"        if event is not None and event.request_id == {request_id!r}:\n"
        "            print(json.dumps(event.routing_key))\n"
        "            break\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script],
        env=realm.env("subscriber"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as reader:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "subscribed", reader.stderr
        done = realm.enqueue("producer", request_id, "dave")
        assert done.returncode == 0, done.stderr
        out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0 and "mcard.single_mint" in out, err


def test_a_subscriber_keeps_its_events_in_its_own_queue_which_no_other_may_touch(
    realm: Realm, worker: Worker
) -> None:
    request_id = f"roles-own-{uuid.uuid4().hex}"
    queue = f"mcard.events.{realm.user('subscriber')}.orders"
    script = (
        "from mcard_tasks import app\n"
        "from mcard_tasks.events import subscribe\n"
        f"with subscribe(app, queue={queue!r}, timeout=0.2) as events:\n"
        "    next(events)\n"
    )
    realm.python("subscriber", script)  # declares and binds its durable queue
    done = realm.enqueue("producer", request_id, "erin", "--wait", "30")
    assert done.returncode == 0, done.stderr
    theirs = f"mcard.events.{realm.user('subscriber')}.mine-too"
    for touch in (
        lambda channel: channel.basic_get(queue),
        lambda channel: channel.queue_delete(queue),
        lambda channel: channel.queue_declare(theirs),
    ):
        with realm.connection("eavesdropper") as connection, pytest.raises(AccessRefused):
            touch(connection.default_channel)
    # The event waits in the subscriber's queue for it alone.
    script = (
        "import json\n"
        "from mcard_tasks import app\n"
        "from mcard_tasks.events import subscribe\n"
        f"with subscribe(app, queue={queue!r}, timeout=1.0) as events:\n"
        "    for _, event in zip(range(30), events):\n"
        f"        if event is not None and event.request_id == {request_id!r}:\n"
        "            print(json.dumps(event.routing_key))\n"
        "            break\n"
    )
    assert "mcard.single_mint" in realm.python("subscriber", script).stdout
    with realm.admin() as connection:
        connection.default_channel.queue_delete(queue)


def test_a_request_whose_retries_ran_out_is_replayed_by_an_operator_with_mcard_producers(
    tmp_path: Path, worker_factory: Callable[..., Worker]
) -> None:
    """The worker's retries and dead letters are published as its own user: the request's
    producer goes with them, so a real retry-exhausted letter names its producer, and the
    operator's replay (refusing unlisted producers first) and the worker accept it."""
    with made_realm(f"{SESSION}-retry", tmp_path / "ledger.sqlite3") as own:
        own.cli("deploy", "topology", "declare").check_returncode()
        listed = f"{own.user('producer')},{own.user('operator')}"
        settings = {"broker_url": own.url("worker"), "declare": "false", "producers": listed}
        failing = worker_factory(
            own.ledger_url,
            "roles-failing",
            issuer="simulated",
            issuer_latency_ms="0",
            issuer_failure_rate="1.0",
            max_retries="1",
            **settings,
        ).launch()
        request_id = f"roles-retried-{uuid.uuid4().hex}"
        done = own.enqueue("producer", request_id, "frank")
        assert done.returncode == 0, done.stderr
        wait_for(lambda: dlq_depth(own) == 1, 60, "the request's retries to run out")
        failing.stop()
        [letter] = peek_letters(own)
        assert letter.headers["retries"] == 1, "it was retried once first"
        assert letter.headers[PRODUCER_HEADER] == own.user("producer"), letter.headers
        healthy = worker_factory(own.ledger_url, "roles-healthy", **settings).launch()
        try:
            replayed = own.cli("operator", "dlq", "replay", QUEUE, producers=listed)
            assert replayed.returncode == 0, replayed.stdout + replayed.stderr
            wait_for(lambda: minted(own, request_id) == 1, 60, "the replayed request")
        finally:
            healthy.stop()


def peek_letters(realm: Realm, queue: str = QUEUE) -> list[Any]:
    """The letters of queue's DLQ, left in it."""
    with realm.admin() as connection:
        return peek(connection, f"{queue}.dlq")


def test_a_forged_x_death_does_not_make_a_worker_made_letter_read_as_the_brokers(
    realm: Realm, worker: Worker
) -> None:
    letters(realm)
    request_id = f"roles-x-death-{uuid.uuid4().hex}"
    message = task_message(request_id, owner="", card_id="x")  # invalid: dead-lettered
    death = {"queue": QUEUE, "reason": "rejected", "count": 1, "exchange": "mcard"}
    headers = dict(message.headers, **{"x-death": [death], PRODUCER_HEADER: "someone"})
    publish(realm, "producer", message._replace(headers=headers))
    wait_for(lambda: dlq_depth(realm) == 1, 30, "the letter")
    [letter] = peek_letters(realm)
    assert "x-death" not in letter.headers, "the forged task-queue x-death is dropped"
    producers = letter.headers[PRODUCER_HEADER].split(",")
    assert producers == sorted([realm.user("producer"), "someone"]), "both vouched"
    letters(realm)
