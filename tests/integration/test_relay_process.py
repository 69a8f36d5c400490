"""The worker's outbox relay runs in a process of its own: it goes with its worker (a SIGKILL of
the worker's main process alone included), it comes back when it dies, and nothing is lost."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from mcard_tasks import app
from mcard_tasks.admin import queue_depths
from mcard_tasks.ledger import get_ledger
from mcard_tasks.tasks import single_mint
from tests.fixtures import Subscriber, Worker, use_ledger, wait_for

pytestmark = pytest.mark.integration


def relay_children(worker: Worker) -> list[int]:
    """The pids of the worker's outbox relay processes (python -m mcard_tasks.relay_process)."""
    assert worker.process is not None
    children = _children(worker.process.pid)
    return [pid for pid in children if b"mcard_tasks.relay_process" in _cmdline(pid)]


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == parent and stat[0] != "Z":
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def restarts(worker: Worker) -> list[str]:
    """The worker's log lines about a relay that died and the pause before the next."""
    return [line for line in worker.log.read_text().splitlines() if "starting another in" in line]


def unpublished(url: str) -> int:
    with get_ledger(url).engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            ).scalar_one()
        )


def mint_and_see_event(events: Subscriber) -> str:
    minted = single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="alice")
    assert minted.get(timeout=30, interval=0.05)["outcome"] == "succeeded"
    see_event(events, minted.id)
    return minted.id


def see_event(events: Subscriber, request_id: str) -> None:
    wait_for(
        lambda: events.collect() and request_id in events.by_request(), 30, "the outcome's event"
    )


def mint_in_flight(worker: Worker) -> str:
    """A mint the worker has received (and, with a slow issuer, is still applying)."""
    minted = single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="alice")
    wait_for(lambda: f"[{minted.id}]" in worker.log.read_text(), 30, "the request received")
    return minted.id


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_the_relay_process_comes_back_when_it_dies_and_goes_with_its_worker(
    pool: str,
    sqlite_url: str,
    make_worker: Callable[..., Worker],
    subscriber: Callable[[str], Subscriber],
) -> None:
    use_ledger(sqlite_url)
    events = subscriber("mcard.single_mint.*")
    worker = make_worker(sqlite_url, f"relay-{pool}", pool=pool, concurrency="2").start()
    (relay,) = wait_for(lambda: relay_children(worker), 30, "the relay process")
    # The settings came on its standard input: no URL (nor its password) in ps.
    assert not any(word in _cmdline(relay) for word in (b"amqp", b"sqlite", b"postgres"))
    mint_and_see_event(events)

    os.kill(relay, signal.SIGKILL)  # the relay dies: the worker starts another
    (again,) = wait_for(
        lambda: [pid for pid in relay_children(worker) if pid != relay], 30, "a new relay"
    )
    mint_and_see_event(events)  # its events still go out
    wait_for(lambda: not unpublished(sqlite_url), 30, "every event published")

    assert worker.process is not None
    os.kill(worker.process.pid, signal.SIGKILL)  # the worker alone, not its process group
    worker.process.wait(10)
    try:
        wait_for(lambda: gone(again), 10, "the relay of a killed worker to exit")
    finally:
        with contextlib.suppress(ProcessLookupError):  # prefork's children, left behind
            os.killpg(worker.process.pid, signal.SIGKILL)


def test_a_warm_shutdown_stops_the_relay_process_after_its_last_pass(
    sqlite_url: str,
    make_worker: Callable[..., Worker],
    subscriber: Callable[[str], Subscriber],
) -> None:
    use_ledger(sqlite_url)
    events = subscriber("mcard.single_mint.*")
    worker = make_worker(sqlite_url, "relay-stop").start()
    (relay,) = wait_for(lambda: relay_children(worker), 30, "the relay process")
    mint_and_see_event(events)
    assert worker.stop() == 0
    assert gone(relay), "no relay outlives its worker's warm shutdown"
    assert "did not stop; killed" not in worker.log.read_text()


def test_a_request_still_running_at_a_warm_shutdown_is_acked_and_gets_its_event(
    sqlite_url: str,
    make_worker: Callable[..., Worker],
    subscriber: Callable[[str], Subscriber],
) -> None:
    """Celery stops the consumer and the relay's step before the pool: the batch's ack and
    the relay's last pass wait for the pool."""
    use_ledger(sqlite_url)
    events = subscriber("mcard.single_mint.*")
    worker = make_worker(
        sqlite_url, "relay-inflight", issuer="simulated", issuer_latency_ms="3000"
    ).start()
    request_id = mint_in_flight(worker)
    assert worker.stop() == 0  # during its 3 s issuer call
    assert get_ledger(sqlite_url).outcome(request_id) is not None, "the warm shutdown waited"
    assert unpublished(sqlite_url) == 0
    # ... and acked its batch (with the consumer stopped, the message came back before).
    depths = {depth.name: depth.ready for depth in queue_depths(app)}
    assert depths["mcard.single_mint"] == 0, depths
    see_event(events, request_id)


def test_a_worker_started_by_a_script_without_a_main_guard_relays_its_events(
    sqlite_url: str,
    make_worker: Callable[..., Worker],
    subscriber: Callable[[str], Subscriber],
    tmp_path: Path,
) -> None:
    """The relay's process does not import the script that started the worker, and imports
    what the worker does (an MCARD_SPECS module beside the script, not in the current
    directory)."""
    use_ledger(sqlite_url)
    events = subscriber("mcard.single_mint.*")
    script = tmp_path / "my_worker.py"
    script.write_text("from mcard_tasks.worker import main\n\nmain()\n")
    kinds = f"my_kinds_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{kinds}.py").write_text('"""No kinds of its own."""\n')
    command = [sys.executable, str(script)]
    worker = make_worker(sqlite_url, "relay-script", command=command, specs=kinds)
    worker.start()
    mint_and_see_event(events)
    assert len(relay_children(worker)) == 1
    assert "exited" not in worker.log.read_text()


def test_a_sigterm_to_every_process_of_the_worker_leaves_the_relay_its_last_pass(
    sqlite_url: str,
    make_worker: Callable[..., Worker],
    subscriber: Callable[[str], Subscriber],
) -> None:
    """As systemd stops a service: SIGTERM to each process. The relay ignores it and waits
    for the worker, whose pool is still committing a request."""
    use_ledger(sqlite_url)
    events = subscriber("mcard.single_mint.*")
    worker = make_worker(
        sqlite_url, "relay-group", issuer="simulated", issuer_latency_ms="2000"
    ).start()
    (relay,) = wait_for(lambda: relay_children(worker), 30, "the relay process")
    request_id = mint_in_flight(worker)
    os.kill(relay, signal.SIGTERM)
    assert worker.stop() == 0  # SIGTERM to the worker, during its 2 s issuer call
    assert get_ledger(sqlite_url).outcome(request_id) is not None
    assert unpublished(sqlite_url) == 0, "the relay's last pass came after the pool's commit"
    assert gone(relay)
    log = worker.log.read_text()
    assert "exited" not in log and "did not stop" not in log, log[-2000:]
    see_event(events, request_id)


def test_a_relay_signalled_as_it_starts_lives_on(
    sqlite_url: str, make_worker: Callable[..., Worker], subscriber: Callable[[str], Subscriber]
) -> None:
    """A SIGTERM or SIGINT to every process as the worker starts (or restarts its relay) reaches
    a relay still importing: held from its fork until it ignores them, it lives on."""
    use_ledger(sqlite_url)
    events = subscriber("mcard.single_mint.#")
    worker = make_worker(sqlite_url, "relay-early").launch()
    relay = wait_for(lambda: relay_children(worker), 60, "the relay process", every=0.001)[0]
    os.kill(relay, signal.SIGTERM)
    os.kill(relay, signal.SIGINT)
    worker.ready()
    mint_and_see_event(events)
    assert relay_children(worker) == [relay], "the same relay, not a restarted one"
    assert "starting another" not in worker.log.read_text()


def test_a_worker_stopped_while_its_relay_waits_to_be_restarted_still_makes_the_last_pass(
    sqlite_url: str, make_worker: Callable[..., Worker], subscriber: Callable[[str], Subscriber]
) -> None:
    """The relay died and the next starts only after a pause: a worker stopped meanwhile starts
    one for the last pass alone, so its last outcomes' events go out as it stops."""
    use_ledger(sqlite_url)
    events = subscriber("mcard.single_mint.#")
    worker = make_worker(sqlite_url, "relay-pause").start()
    for kills in range(1, 7):  # each quick death doubles the pause: kill until it is 8 s
        (relay,) = wait_for(lambda: relay_children(worker), 30, "a relay process")
        os.kill(relay, signal.SIGKILL)
        line = wait_for(lambda n=kills: restarts(worker)[n - 1 :], 10, "the watcher's line")[0]
        if "starting another in 8 s" in line:
            break
    else:
        pytest.fail(f"the pause never reached 8 s: {restarts(worker)}")
    minted = single_mint.delay(card_id=f"card-{uuid.uuid4().hex}", owner="alice")
    assert minted.get(timeout=30, interval=0.05)["outcome"] == "succeeded"
    assert relay_children(worker) == [], "no relay while its next one waits"
    assert worker.stop() == 0
    assert "starting one for its last pass alone" in worker.log.read_text()
    assert unpublished(sqlite_url) == 0, "the last pass published the outcome's event"
    see_event(events, minted.id)
