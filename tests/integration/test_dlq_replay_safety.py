"""`dlq replay` is safe: it validates, it is bounded, it gives fresh retries, it never replays a
letter refused for its producer, and `--dry-run` changes nothing. Real broker, real workers.

Every letter is put straight into a DLQ as the worker's dead-lettering leaves it (headers of the
original plus x-mcard-reason, or x-death); every wait is bounded and polled.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from kombu import Queue

import mcard_tasks.admin
from mcard_tasks import app
from mcard_tasks.admin import dead_letters, queue_depths, replay_dlq
from mcard_tasks.cli import EXIT_INVALID, main
from mcard_tasks.deadletter import REASON_HEADER, UNAUTHORIZED_PRODUCER
from mcard_tasks.identity import PRODUCER_HEADER, broker_user
from mcard_tasks.ledger import get_ledger
from mcard_tasks.legacy import LEGACY_HEADER
from mcard_tasks.tasks import single_mint
from mcard_tasks.topology import DEAD_LETTER_EXCHANGE, dlq_name
from tests import fixtures
from tests.fixtures import Worker, drain_dlq, rabbitmqctl, use_ledger, wait_for

pytestmark = pytest.mark.integration
QUEUE = "mcard.single_mint"
TIMEOUT = 30


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def new(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def task_headers(request_id: str, task: str = QUEUE, **more: Any) -> dict[str, Any]:
    return {
        "lang": "py",
        "task": task,
        "id": request_id,
        "root_id": request_id,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "retries": 0,
        REASON_HEADER: "LedgerUnavailableError: simulated outage",
        **more,
    }


def task_body(*args: Any, **kwargs: Any) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([list(args), kwargs, embed]).encode()


def put_letter(
    body: bytes,
    headers: dict[str, Any],
    content_type: str = "application/json",
    queue: str = QUEUE,
    **properties: Any,
) -> None:
    """Put a message straight into queue's DLQ, as the worker's dead-lettering leaves it;
    return once the DLQ counts it (a quorum queue's count can trail a confirm a moment)."""
    before = depth(dlq_name(queue))
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=DEAD_LETTER_EXCHANGE.name,
            routing_key=queue,
            headers=headers,
            content_type=content_type,
            content_encoding="utf-8",
            serializer=None,
            delivery_mode=2,
            **properties,
        )
    wait_for(lambda: depth(dlq_name(queue)) > before, TIMEOUT, f"the letter in {queue}.dlq")


def put_valid(request_id: str, card: str, **headers: Any) -> None:
    put_letter(task_body(card_id=card, owner="alice"), task_headers(request_id, **headers))


def peek(queue: str) -> list[Any]:
    with app.connection_for_read() as connection:
        return fixtures.peek(connection, queue)


def hold(process: str, seconds: float) -> None:
    """Suspend a process of the broker (an Erlang expression for it) for a moment: the broker
    resumes it by itself, whatever happens to the test."""
    ms = int(seconds * 1000)
    rabbitmqctl(
        "eval",
        f"P = {process}, sys:suspend(P, infinity), timer:apply_after({ms}, sys, resume, [P]).",
    )


def queue_process(vhost: str, queue: str) -> str:
    """The Erlang expression of a quorum queue's own process on the broker."""
    name = f'rabbit_misc:r(<<"{vhost}">>, queue, <<"{queue}">>)'
    return f"element(1, amqqueue:get_pid(element(2, rabbit_amqqueue:lookup({name}))))"


#: The broker's log of every quorum queue.
QUORUM_LOG = "ra_log_wal"


def ids(messages: list[Any]) -> list[str | None]:
    return [(m.headers or {}).get("id") for m in messages]


def depth(queue: str) -> int:
    return next(d.ready for d in queue_depths(app) if d.name == queue)


@pytest.fixture
def clean_dlq(vhost: str, sqlite_url: str) -> Iterator[None]:
    """The single_mint queue and DLQ of the session's vhost empty before and after the test;
    producers on sqlite_url."""
    use_ledger(sqlite_url)
    declared = run("topology", "declare")
    assert declared[0] == 0, declared
    purge(QUEUE)  # a request an earlier test left on this process's vhost would be peeked
    drain_dlq(QUEUE)
    yield
    purge(QUEUE)
    drain_dlq(QUEUE)


def purge(queue: str) -> None:
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge(queue)


def test_invalid_letters_are_refused_and_stay_and_the_valid_one_runs_with_fresh_state(
    clean_dlq: None, sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    good, good_card = new("good"), new("card")
    # Spent: its retries used up, an eta an hour ahead, the broker's dead-letter headers,
    # a user_id (the guest connection may set its own).
    put_letter(
        task_body(card_id=good_card, owner="alice"),
        task_headers(
            good,
            retries=5,
            eta=(datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            countdown=3600,
            **{
                "x-death": [{"count": 3, "reason": "rejected", "queue": QUEUE}],
                "x-delivery-count": 4,
                "x-mcard-other": "dead-letter state",
            },
        ),
        user_id="guest",
    )
    assert peek(dlq_name(QUEUE))[0].properties["user_id"] == "guest"
    refused: dict[str, tuple[str, str]] = {}  # request ID -> (card, what the refusal says)

    def bad(why: str, body: bytes, headers: dict[str, Any], **options: Any) -> None:
        request_id, card = headers["id"], new("card")
        refused[request_id] = (card, why)
        put_letter(body.replace(b"CARD", card.encode()), headers, **options)

    bad("owner:", task_body(card_id="CARD", owner="has space"), task_headers(new("badfield")))
    bad("not a field", task_body(card_id="CARD", owner="a", x=1), task_headers(new("extra")))
    bad("positional", task_body("CARD", owner="a"), task_headers(new("args")))
    bad("unknown task", task_body(card_id="CARD", owner="a"), task_headers(new("t"), "mcard.x"))
    bad(
        "belongs to queue mcard.single_burn",
        task_body(card_id="CARD", owner="a"),
        task_headers(new("other"), "mcard.single_burn"),
    )
    bad(
        "content type",
        task_body(card_id="CARD", owner="a"),
        task_headers(new("pickle")),
        content_type="application/x-python-serialize",
    )
    bad("not JSON", b"{CARD", task_headers(new("broken")))
    # A header-less (legacy) letter of another queue's key, its owner missing.
    legacy_id, legacy_card = new("legacy"), new("card")
    refused[legacy_id] = (legacy_card, "invalid legacy message")
    legacy = {"key": "mcard_burn", "data": {"card_id": legacy_card}, "request_id": legacy_id}
    put_letter(json.dumps(legacy).encode(), {})
    wait_for(lambda: depth(dlq_name(QUEUE)) == 1 + len(refused), TIMEOUT, "every letter")

    # No worker yet: the replayed message is looked at in the task queue itself.
    code, output = run("dlq", "replay", QUEUE)
    assert code == EXIT_INVALID, output
    assert output.splitlines()[-1] == (
        f"replayed 1 message(s) to {QUEUE}; refused {len(refused)}, left in {QUEUE}.dlq"
    )
    for request_id, (_, why) in refused.items():
        line = next(line for line in output.splitlines() if request_id in line)
        assert line.startswith("refused ") and why in line, (why, output)
    assert "dead-lettered: LedgerUnavailableError: simulated outage" in output

    [replayed] = peek(QUEUE)
    headers, properties = replayed.headers, replayed.properties
    assert headers["id"] == good and headers["task"] == QUEUE, "the request ID is kept"
    assert headers["retries"] == 0 and headers.get("eta") is None and "countdown" not in headers
    spent = [k for k in headers if k.startswith("x-")]
    assert set(spent) <= {"x-delivery-count", PRODUCER_HEADER}, headers
    # The letter's x-death names the task queue: the broker dead-lettered it, so its user_id
    # is its producer's, and travels as the original producer.
    assert headers[PRODUCER_HEADER] == broker_user(app)
    # The replaying operator's own user (here the session's), never the letter's.
    assert properties["user_id"] == broker_user(app)
    assert json.loads(replayed.body)[1] == {"card_id": good_card, "owner": "alice"}
    left = peek(dlq_name(QUEUE))
    assert sorted(str(i) for i in ids(left) if i) == sorted(set(refused) - {legacy_id}), (
        "every refused letter stays (the legacy one has no id header)"
    )
    assert len(left) == len(refused)
    assert all(REASON_HEADER in m.headers for m in left if m.headers.get("task")), "unchanged"

    make_worker(sqlite_url, "replay-valid").start()
    ledger = get_ledger(sqlite_url)
    outcome = wait_for(lambda: ledger.outcome(good), TIMEOUT, "the replayed request's outcome")
    assert outcome["outcome"] == "succeeded", "executed at once, not held for its eta"
    wait_for(lambda: depth(QUEUE) == 0, TIMEOUT, "the task queue to be empty")
    for request_id, (card, _) in refused.items():
        assert ledger.outcome(request_id) is None and ledger.card(card) is None, request_id
    assert depth(dlq_name(QUEUE)) == len(refused)


def test_a_dry_run_shows_each_letter_and_changes_nothing(
    clean_dlq: None, sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    make_worker(sqlite_url, "replay-dry").start()
    good, bad = new("dry-good"), new("dry-bad")
    put_valid(good, new("card"))
    put_letter(task_body(card_id="x y", owner="alice"), task_headers(bad))

    code, output = run("dlq", "replay", QUEUE, "--dry-run")
    assert code == EXIT_INVALID, output
    lines = output.splitlines()
    assert lines[0] == f"{good}  {QUEUE}  valid"
    assert lines[1] == "    dead-lettered: LedgerUnavailableError: simulated outage"
    assert lines[2].startswith(f"{bad}  {QUEUE}  invalid: ") and "card_id:" in lines[2]
    assert lines[-1] == (
        f"dry run: 1 of 2 message(s) would be replayed to {QUEUE}, 1 refused; nothing changed"
    )

    left = peek(dlq_name(QUEUE))
    assert ids(left) == [good, bad], "both still there, in order"
    assert all(m.headers[REASON_HEADER].startswith("LedgerUnavailableError") for m in left)
    assert depth(QUEUE) == 0, "nothing published"
    later = single_mint.delay(card_id=new("card"), owner="alice")  # the worker is caught up
    assert later.get(timeout=TIMEOUT, interval=0.05)["outcome"] == "succeeded"
    assert get_ledger(sqlite_url).outcome(good) is None


def test_a_letter_refused_for_its_producer_is_never_replayed(
    clean_dlq: None, sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    make_worker(sqlite_url, "replay-unauthorized").start()
    ledger = get_ledger(sqlite_url)
    mallory, card = new("mallory"), new("card")
    reason = f"{UNAUTHORIZED_PRODUCER}: user 'mallory' is not in MCARD_PRODUCERS"
    put_valid(mallory, card, **{REASON_HEADER: reason})
    good = new("beside")
    put_valid(good, new("card"))

    for attempt in (["--dry-run"], [], ["--limit", "5"]):
        code, output = run("dlq", "replay", QUEUE, *attempt)
        assert code == EXIT_INVALID, output
        line = next(line for line in output.splitlines() if mallory in line)
        assert f"dead-lettered as {UNAUTHORIZED_PRODUCER!r}: never replayed" in line, output
        assert f"dead-lettered: {reason}" in output
    # The library call is no way around it either.
    done = replay_dlq(app, QUEUE)
    assert done.replayed == [] and [v.letter.request_id for v in done.refused] == [mallory]

    wait_for(lambda: ledger.outcome(good), TIMEOUT, "the valid letter's outcome")
    wait_for(lambda: depth(QUEUE) == 0, TIMEOUT, "the task queue to be empty")
    assert ids(peek(dlq_name(QUEUE))) == [mallory]
    assert ledger.outcome(mallory) is None and ledger.card(card) is None


def test_the_replay_is_bounded_even_when_each_replayed_letter_fails_back_into_the_dlq(
    clean_dlq: None,
    sqlite_url: str,
    make_worker: Callable[..., Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every call fails, no retry: each replayed letter is dead-lettered again at once.
    make_worker(
        sqlite_url,
        "replay-bound",
        issuer="simulated",
        issuer_latency_ms="0",
        issuer_failure_rate="1.0",
        max_retries="0",
    ).start()
    letters = {new("loop"): new("card") for _ in range(5)}
    for request_id, card in letters.items():
        put_valid(request_id, card)
    count = len(letters)
    publish = mcard_tasks.admin.publish_confirmed

    def publish_then_wait_for_the_copy(*args: Any, **kwargs: Any) -> None:
        """Publish, then wait until the worker has dead-lettered the copy again: it is in the
        DLQ, ready, before the replay's next get (without the bound it would take it)."""
        publish(*args, **kwargs)
        # Ready: those not taken yet, plus every copy back (this one included).
        wait_for(lambda: depth(dlq_name(QUEUE)) == count, TIMEOUT, "the copy back in the DLQ")

    monkeypatch.setattr(mcard_tasks.admin, "publish_confirmed", publish_then_wait_for_the_copy)
    done = replay_dlq(app, QUEUE)
    assert done.found == count
    assert [letter.request_id for letter in done.replayed] == list(letters), "each once"
    assert done.refused == []
    back = peek(dlq_name(QUEUE))
    assert sorted(map(str, ids(back))) == sorted(letters), "each failed once more, once"
    assert all("simulated issuer failed" in m.headers[REASON_HEADER] for m in back)

    monkeypatch.undo()
    code, output = run("dlq", "replay", QUEUE)  # the CLI, unslowed: bounded too
    assert (code, output) == (0, f"replayed {count} message(s) to {QUEUE}\n")
    wait_for(lambda: depth(dlq_name(QUEUE)) == count, TIMEOUT, "the copies back in the DLQ")


def test_a_replayed_letter_whose_retries_were_spent_gets_its_retries_afresh(
    clean_dlq: None, sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    # Every call fails; two retries allowed. A letter that kept retries=2 would be
    # dead-lettered at its first failure, without one retry.
    worker = make_worker(
        sqlite_url,
        "replay-retries",
        issuer="simulated",
        issuer_latency_ms="0",
        issuer_failure_rate="1.0",
        max_retries="2",
    ).start()
    spent = new("spent")
    put_valid(
        spent,
        new("card"),
        retries=2,
        **{
            REASON_HEADER: "IssuerUnavailableError: simulated issuer failed",
            "x-death": [{"count": 1, "reason": "rejected", "queue": QUEUE}],
        },
    )
    assert run("dlq", "replay", QUEUE) == (0, f"replayed 1 message(s) to {QUEUE}\n")
    back = wait_for(lambda: peek(dlq_name(QUEUE)), 60, "the letter back after its retries")
    assert ids(back) == [spent]
    log = worker.log.read_text()
    for retry in (1, 2):
        assert f"[{spent}] failed transiently (retry {retry} of 2)" in log, log[-3000:]
    assert back[0].headers["retries"] == 2, "it used its two fresh retries"
    assert get_ledger(sqlite_url).outcome(spent) is None


def test_a_legacy_letter_keeps_its_key_header_and_nothing_else_of_the_dead_lettering(
    clean_dlq: None, sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    request_id, card = new("legacy-replay"), new("card")
    put_valid(request_id, card, **{LEGACY_HEADER: "mcard_single_mint"})
    assert run("dlq", "replay", QUEUE)[0] == 0
    [replayed] = peek(QUEUE)
    assert replayed.headers[LEGACY_HEADER] == "mcard_single_mint"
    assert REASON_HEADER not in replayed.headers
    make_worker(sqlite_url, "replay-legacy").start()
    outcome = wait_for(lambda: get_ledger(sqlite_url).outcome(request_id), TIMEOUT, "outcome")
    assert outcome["outcome"] == "succeeded"


def test_a_publish_the_broker_does_not_confirm_leaves_the_letter_and_exits_4(
    clean_dlq: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    request_id = new("unconfirmed")
    put_valid(request_id, new("card"))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("confirm timed out")

    monkeypatch.setattr(mcard_tasks.admin, "publish_confirmed", refuse)
    code, output = run("dlq", "replay", QUEUE)
    assert code == 4 and f"did not confirm the replay of {request_id}" in output, output
    assert ids(peek(dlq_name(QUEUE))) == [request_id]


@pytest.mark.exclusive  # it holds the log of every quorum queue on the broker for 3 s
@pytest.mark.parametrize("look", ["dry run", "replay", "show"])
def test_the_letters_a_look_or_a_replay_leaves_are_back_in_the_dlq_when_it_returns(
    clean_dlq: None, monkeypatch: pytest.MonkeyPatch, look: str
) -> None:
    """A quorum queue takes back the letters of a closed channel once it has logged the close;
    a replay run right after the last one would find none (CI once saw "replayed 0").
    Holding the broker's quorum log as the channel closes makes that moment 3 s long."""
    good, bad = new("back-good"), new("back-bad")
    put_valid(good, new("card"))
    put_letter(task_body(card_id="x y", owner="alice"), task_headers(bad))
    probe, held = mcard_tasks.admin._probe, []

    @contextmanager
    def probe_then_hold_the_log(connection: Any) -> Iterator[Any]:
        with probe(connection) as channel:
            yield channel
            if not held:  # the channel that took the letters, before it closes
                held.append(time.monotonic())
                hold(QUORUM_LOG, 3)

    monkeypatch.setattr(mcard_tasks.admin, "_probe", probe_then_hold_the_log)
    if look == "show":
        assert [letter.request_id for letter in dead_letters(app, QUEUE)] == [good, bad]
    else:
        done = replay_dlq(app, QUEUE, dry_run=look == "dry run")
        assert [v.letter.request_id for v in done.verdicts] == [good, bad]
    assert held, "the quorum log was held"
    # Held for 3 s from a moment after held[0]: the letters are counted only after that.
    assert time.monotonic() - held[0] >= 3, "it waited for the letters"
    left = [bad] if look == "replay" else [good, bad]
    assert depth(dlq_name(QUEUE)) == len(left), "the letters left are back"
    assert ids(peek(dlq_name(QUEUE))) == left


@pytest.mark.exclusive  # it holds a queue of the broker for 3 s
def test_a_replay_finds_the_letters_of_a_dlq_too_busy_to_count_them(
    clean_dlq: None, vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A passive declare reads 0 messages when the quorum queue does not answer within 250 ms;
    the replay takes its bound from basic.get's own count then."""
    good, bad = new("busy-good"), new("busy-bad")
    put_valid(good, new("card"))
    put_letter(task_body(card_id="x y", owner="alice"), task_headers(bad))
    counted = []
    declare = Queue.queue_declare

    def count(queue: Queue, *args: Any, **kwargs: Any) -> Any:
        answer = declare(queue, *args, **kwargs)
        counted.append(answer.message_count)
        return answer

    monkeypatch.setattr(Queue, "queue_declare", count)
    hold(queue_process(vhost, dlq_name(QUEUE)), 3)
    done = replay_dlq(app, QUEUE, dry_run=True)
    assert counted[0] == 0, "the busy queue's count read 0"
    assert [v.letter.request_id for v in done.verdicts] == [good, bad]
    assert done.found == 2
