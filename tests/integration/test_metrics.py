"""`mcard-tasks metrics` on the real broker, PostgreSQL and two worker processes, scraped by a
real Prometheus (Debian's) with the shipped alert rules.

Set MCARD_TEST_SCREENSHOT=docs/prometheus-graph.png to have the last test save Prometheus'
graph of the run with headless Chromium (the README's picture).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mcard_tasks import app
from mcard_tasks.admin import queue_depths
from mcard_tasks.ledger import get_ledger
from mcard_tasks.tasks import single_burn, single_mint
from tests.conftest import SESSION
from tests.fixtures import (
    CONSOLE_SCRIPT,
    ROOT,
    Worker,
    _database,
    drain_dlq,
    use_ledger,
    wait_for,
)

pytestmark = pytest.mark.integration
USER, PASSWORD = "prom", "metrics-test-password"
DEPLOY = ROOT / "deploy"
TASK_QUEUES = ("mcard.mint", "mcard.single_mint", "mcard.single_burn")
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed",
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(10)


@pytest.fixture(scope="module")
def metrics_db() -> Iterator[str]:
    """A ledger of this module's own: every count in it is this module's."""
    yield from _database(f"mcard_metrics_{SESSION}")


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("metrics-dir")


@pytest.fixture(scope="module")
def workers(
    metrics_db: str, metrics_dir: Path, worker_factory: Callable[..., Worker]
) -> Iterator[list[Worker]]:
    """Two workers, one of threads and one of two prefork children, each process writing its
    timings into metrics_dir; a simulated issuer (so issuer calls are timed too)."""
    common = {"metrics_dir": str(metrics_dir), "issuer": "simulated", "issuer_latency_ms": "20"}
    started = [
        worker_factory(metrics_db, "metrics-threads", concurrency="2", **common),
        worker_factory(metrics_db, "metrics-prefork", concurrency="2", pool="prefork", **common),
    ]
    for worker in started:
        worker.start()
    use_ledger(metrics_db)
    yield started
    for worker in started:
        assert worker.stop() == 0


@pytest.fixture(scope="module")
def exporter(
    metrics_db: str,
    metrics_dir: Path,
    workers: list[Worker],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """`mcard-tasks metrics` with basic auth; its URL."""
    log = tmp_path_factory.mktemp("exporter") / "exporter.log"
    env = {"MCARD_DATABASE_URL": metrics_db, "MCARD_METRICS_DIR": str(metrics_dir)}
    process, url = start_exporter(log, **env)
    assert process.poll() is None, log.read_text()
    yield url
    assert stop(process) == 0, "SIGTERM stops the exporter, exit 0"
    assert PASSWORD not in log.read_text()


def start_exporter(log: Path, **settings: str) -> tuple[subprocess.Popen[bytes], str]:
    """`mcard-tasks metrics` on a free port with basic auth and settings, once it answers
    (or has exited); the process and its URL."""
    port = free_port()
    env = dict(os.environ, MCARD_FLOWER_USER=USER, MCARD_FLOWER_PASSWORD=PASSWORD, **settings)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "metrics", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for(lambda: process.poll() is not None or answers(url), 30, "the exporter to answer")
    return process, url


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False
    return True


def scrape(url: str) -> Samples:
    request = urllib.request.Request(url)
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=20) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def summed(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def ledger_outcomes(url: str) -> dict[tuple[str, str, str], int]:
    """The ledger's recorded outcomes by task, outcome and reason, read here on its own."""
    from sqlalchemy import select

    from mcard_tasks.models import Operation

    found: dict[tuple[str, str, str], int] = {}
    with get_ledger(url).engine.connect() as connection:
        for task, status, outcome in connection.execute(
            select(Operation.task, Operation.status, Operation.outcome)
        ):
            if status == "pending":
                continue
            key = (task, status, json.loads(outcome)["reason"] or "")
            found[key] = found.get(key, 0) + 1
    return found


def dlq_ready(queue: str) -> int:
    return next(d.ready for d in queue_depths(app) if d.name == f"{queue}.dlq")


def publish_malformed() -> str:
    """A request with an invalid card ID straight to the broker (past the producer's checks):
    the worker dead-letters it."""
    bad = new_id("bad")
    app.send_task("mcard.single_mint", kwargs={"card_id": "no spaces", "owner": "o"}, task_id=bad)
    return bad


def test_the_exporter_refuses_scrapes_without_the_credentials(exporter: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(exporter, timeout=5)
    assert refused.value.code == 401


def test_after_a_mixed_run_the_metrics_equal_the_ledgers_and_the_brokers_numbers(
    exporter: str, metrics_db: str, metrics_dir: Path
) -> None:
    for queue in TASK_QUEUES:
        drain_dlq(queue)
    cards = [new_id("card") for _ in range(6)]
    minted = []
    for card in cards:  # one at a time: each its own issuer call (a batch calls it once)
        minted.append(single_mint.delay(card_id=card, owner="alice", request_id=new_id("mint")))
        assert minted[-1].get(timeout=30, interval=0.05)["outcome"] == "succeeded"
    rejected = [
        single_mint.delay(card_id=card, owner="bob", request_id=new_id("again"))
        for card in cards[:3]
    ]
    rejected.append(single_burn.delay(card_id=cards[3], owner="bob", request_id=new_id("burn")))
    reasons = sorted(r.get(timeout=30, interval=0.05)["reason"] for r in rejected)
    assert reasons == ["already_minted"] * 3 + ["not_holder"]
    # Duplicates straight to the broker, as redeliveries: answered from the ledger.
    for result, card in zip(minted[:4], cards[:4], strict=True):
        app.send_task(
            "mcard.single_mint", kwargs={"card_id": card, "owner": "alice"}, task_id=result.id
        )
    bad = publish_malformed()
    ledger = get_ledger(metrics_db)
    wait_for(lambda: ledger.replay_counts().get("mcard.single_mint") == 4, 30, "4 replays")
    wait_for(lambda: dlq_ready("mcard.single_mint") == 1, 30, f"{bad} in the DLQ")

    def settled(samples: Samples) -> bool:
        """Every outcome event published, every timing observed (after its commit), and the
        broker's numbers as the broker gives them right after the scrape."""
        return (
            value(samples, "mcard_event_outbox_pending") == 0
            and summed(samples, "mcard_ledger_apply_seconds_count") >= 14
            and summed(samples, "mcard_task_duration_seconds_count") >= 14
            and all(
                value(samples, "mcard_queue_messages_ready", queue=depth.name) == depth.ready
                and value(samples, "mcard_queue_consumers", queue=depth.name) == depth.consumers
                for depth in queue_depths(app)
            )
        )

    samples = wait_for(
        lambda: (s := scrape(exporter)) and settled(s) and s, 30, "the figures to settle"
    )

    expected = {
        ("mcard.single_mint", "succeeded", ""): 6,
        ("mcard.single_mint", "rejected", "already_minted"): 3,
        ("mcard.single_burn", "rejected", "not_holder"): 1,
    }
    assert ledger_outcomes(metrics_db) == expected
    scraped = {
        (dict(labels)["task"], dict(labels)["outcome"], dict(labels)["reason"]): v
        for (name, labels), v in samples.items()
        if name == "mcard_outcomes_total"
    }
    assert scraped == expected
    assert value(samples, "mcard_replays_total", task="mcard.single_mint") == 4
    assert value(samples, "mcard_replays_total", task="mcard.single_burn") == 0
    assert value(samples, "mcard_issuer_operations_pending", task="mcard.single_mint") == 0
    assert value(samples, "mcard_event_outbox_oldest_age_seconds") == 0
    assert value(samples, "mcard_ledger_up") == 1 and value(samples, "mcard_broker_up") == 1
    assert value(samples, "mcard_queue_messages_ready", queue="mcard.single_mint.dlq") == 1
    for queue in TASK_QUEUES:
        assert value(samples, "mcard_queue_consumers", queue=queue) == 2, "two workers"
    # Timings, merged over every worker process that ran a task: each ledger apply once
    # (6 + 4 + 4 replays), each issuer call once (the 6 new mints), every task run.
    files = sorted(path.name for path in metrics_dir.glob("histogram_*.db"))
    assert len(files) >= 2, f"several processes wrote timings: {files}"
    assert summed(samples, "mcard_ledger_apply_seconds_count") == 14
    assert summed(samples, "mcard_issuer_call_seconds_count") == 6
    assert summed(samples, "mcard_issuer_call_seconds_sum") >= 6 * 0.02
    runs = summed(samples, "mcard_task_duration_seconds_count")
    assert 14 <= runs <= 15, "every run, the dead-lettered one at most once"
    buckets = value(
        samples, "mcard_issuer_call_seconds_bucket", task="mcard.single_mint", le="+Inf"
    )
    assert buckets == 6


@pytest.fixture(scope="module")
def prometheus(exporter: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping the exporter every second, with the shipped rules made
    quick (``for: 0s``, evaluated every second); its URL."""
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus package is not installed")
    home = tmp_path_factory.mktemp("prometheus")
    rules = re.sub(r"for: \S+", "for: 0s", (DEPLOY / "alerts.yml").read_text())
    rules = rules.replace("[2m]", "[3s]")  # the dead-letter alert's window, as quick
    # But a moment, not one scrape, without consumers: a busy quorum queue answers a count
    # late with 0 consumers (RabbitMQ gives it 250 ms), and the tests expect it quiet.
    head, tail = rules.split("alert: McardQueueWithoutConsumers")
    rules = f"{head}alert: McardQueueWithoutConsumers{tail.replace('for: 0s', 'for: 10s', 1)}"
    (home / "alerts.yml").write_text(rules)
    (home / "password").write_text(PASSWORD)
    target = urllib.parse.urlsplit(exporter).netloc
    (home / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files: [alerts.yml]\n"
        "scrape_configs:\n  - job_name: mcard-tasks\n"
        f"    basic_auth: {{username: {USER}, password_file: {home / 'password'}}}\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    log = home / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={home / 'prometheus.yml'}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or ready(url), 60, "Prometheus to be ready")
        assert process.poll() is None, log.read_text()[-3000:]
        yield url
    finally:
        stop(process)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def instant(url: str, expr: str) -> dict[str, float]:
    """An instant query's values, by the series' queue (or task and outcome) labels."""
    found = {}
    for series in api(url, "query", query=expr)["result"]:
        labels = series["metric"]
        key = labels.get("queue") or f"{labels.get('task')} {labels.get('outcome')}"
        found[key] = float(series["value"][1])
    return found


def firing(url: str, alert: str) -> list[dict[str, str]]:
    return [
        a["labels"]
        for a in api(url, "alerts")["alerts"]
        if a["labels"]["alertname"] == alert and a["state"] == "firing"
    ]


@needs_prometheus
def test_the_shipped_rules_and_scrape_config_pass_promtool() -> None:
    for command in (
        ["promtool", "check", "rules", str(DEPLOY / "alerts.yml")],
        ["promtool", "check", "config", str(DEPLOY / "prometheus.yml")],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    json.loads((DEPLOY / "grafana-dashboard.json").read_text())


@needs_prometheus
def test_prometheus_fires_the_dead_letter_alert_after_a_malformed_message(
    prometheus: str, metrics_db: str
) -> None:
    dlq = "mcard.single_mint.dlq"
    for queue in TASK_QUEUES:
        drain_dlq(queue)
    # Prometheus sees the empty DLQ, and the rule evaluated on it fires nothing.
    wait_for(
        lambda: instant(prometheus, "mcard_queue_messages_ready").get(dlq) == 0,
        30,
        "Prometheus to scrape the drained DLQ",
    )
    wait_for(lambda: not firing(prometheus, "McardDeadLetters"), 30, "no dead-letter alert")
    publish_malformed()
    alerts = wait_for(
        lambda: firing(prometheus, "McardDeadLetters"), 60, "McardDeadLetters to fire"
    )
    assert [a["queue"] for a in alerts] == [dlq]
    assert alerts[0]["severity"] == "warning"
    # Workers consume every task queue, so that alert stays quiet; the outcomes Prometheus
    # stored are the ledger's.
    assert not firing(prometheus, "McardQueueWithoutConsumers")
    expected: dict[str, float] = {}
    for (task, outcome, _), number in ledger_outcomes(metrics_db).items():
        expected[f"{task} {outcome}"] = expected.get(f"{task} {outcome}", 0) + number
    stored = instant(prometheus, "sum by (task, outcome) (mcard_outcomes_total)")
    assert stored == expected
    screenshot(prometheus)


def paced_run(seconds: float) -> None:
    """Mints, rejections and replays at a few per second, for the picture's graph."""
    deadline, step = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        step += 1
        card = new_id("paced")
        result = single_mint.delay(card_id=card, owner="alice", request_id=new_id("paced"))
        result.get(timeout=30, interval=0.05)
        if step % 3 == 0:
            single_mint.delay(card_id=card, owner="bob", request_id=new_id("paced"))
        if step % 4 == 0:
            single_burn.delay(card_id=card, owner="bob", request_id=new_id("paced"))
        if step % 2 == 0:
            app.send_task(
                "mcard.single_mint", kwargs={"card_id": card, "owner": "alice"}, task_id=result.id
            )
        time.sleep(0.3)


def screenshot(url: str) -> None:
    """Prometheus' graph of the run, as a PNG, when MCARD_TEST_SCREENSHOT names the file."""
    target = os.environ.get("MCARD_TEST_SCREENSHOT")
    if not target:
        return
    paced_run(40)
    time.sleep(3)  # Prometheus scrapes every second
    query = urllib.parse.urlencode(
        {
            "g0.expr": "sum by (task, outcome, reason) (mcard_outcomes_total)",
            "g0.stacked": "0",
            "g0.tab": "0",
            "g0.range_input": "1m",
        }
    )
    profile = Path(target).resolve().parent / f".chromium-{SESSION}"
    try:
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=8000",
                "--window-size=1200,900",
                f"--screenshot={Path(target).resolve()}",
                f"{url}/graph?{query}",
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_sources_that_do_not_answer_are_reported_down_and_the_scrape_still_answers(
    tmp_path: Path,
) -> None:
    log = tmp_path / "exporter.log"
    process, url = start_exporter(
        log,
        MCARD_BROKER_URL="amqp://guest:guest@127.0.0.1:5999//",
        MCARD_DATABASE_URL="postgresql://postgres@127.0.0.1:5999/nothing",
    )
    try:
        samples = scrape(url)
        assert value(samples, "mcard_ledger_up") == 0
        assert value(samples, "mcard_broker_up") == 0
        assert summed(samples, "mcard_queue_messages_ready") == 0
        assert not any(name == "mcard_outcomes_total" for name, _ in samples)
    finally:
        assert stop(process) == 0
    assert "did not answer" in log.read_text()
