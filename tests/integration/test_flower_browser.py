"""Flower in a real headless Chromium: an operator finds a request by its ID and sees a
rejection as REJECTED with its reason, a success as SUCCESS, a dead letter as FAILURE;
without credentials, 401.

Also writes the README's screenshots: into docs/ with MCARD_WRITE_SCREENSHOTS=1, otherwise
into the test's temporary folder (the suite never changes the checkout).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mcard_tasks import app
from mcard_tasks.tasks import mint, single_burn, single_mint
from tests.fixtures import ROOT, Worker, drain_dlq, use_ledger, wait_for
from tests.integration.test_flower import PASSWORD, USER, Flower, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
CHROMIUM = Path("/usr/bin/chromium")
#: Chromium talks to 127.0.0.1 only: no updates, no background requests, no first-run page.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
#: Every browser step waits at most this long (milliseconds) for what it looks for.
STEP_TIMEOUT_MS = 20_000
VIEWPORT = {"width": 1440, "height": 720}


@pytest.fixture
def chromium() -> Iterator[Any]:
    """Debian's Chromium through Playwright; the test fails, naming the fix, without it."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's browser (apt-get install -y chromium"
            " chromium-driver; .ci/run tries to), Playwright's own downloads are not used"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def flower(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flower]:
    """Flower on the worker's ledger: it reads outcomes Celery cut short from there."""
    monkeypatch.setenv("MCARD_DATABASE_URL", sqlite_url)
    running = Flower(free_port(), tmp_path / "flower.log")
    try:
        yield running
    finally:
        running.stop()


def screenshots_folder(tmp_path: Path) -> Path:
    return ROOT / "docs" if os.environ.get("MCARD_WRITE_SCREENSHOTS") == "1" else tmp_path


def status_without_credentials(page: Any, url: str) -> int:
    """The status Chromium got for url; with no credentials to give, it ends the navigation
    (net::ERR_INVALID_AUTH_CREDENTIALS) after the 401, so the response is taken as it comes."""
    from playwright.sync_api import Error

    with page.expect_response(url, timeout=STEP_TIMEOUT_MS) as response:
        try:
            page.goto(url, timeout=STEP_TIMEOUT_MS)
        except Error as exc:
            assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc), exc
    assert page.locator("#tasks-table").count() == 0, "no part of the page was shown"
    return int(response.value.status)


def shown_state(page: Any, request_id: str) -> str:
    """Search the tasks page for request_id; the state its one row shows."""
    search = page.get_by_role("searchbox")
    search.fill(request_id)
    row = page.locator(f"#tasks-table tbody tr[id='{request_id}']")
    row.wait_for()
    wait_for(lambda: page.locator("#tasks-table tbody tr").count() == 1, 20, "one row")
    return str(row.locator("span.badge").inner_text())


def test_an_operator_tells_a_rejection_from_a_success_in_the_browser(
    sqlite_url: str,
    make_worker: Callable[..., Worker],
    flower: Flower,
    chromium: Any,
    tmp_path: Path,
) -> None:
    worker = make_worker(sqlite_url, "browser").start()
    use_ledger(sqlite_url)

    def sees_worker() -> bool:
        status, workers = flower.request("/api/workers?refresh=1")
        return status == 200 and worker.node in workers

    wait_for(sees_worker, 60, "Flower to see the worker", every=0.5)
    tag = uuid.uuid4().hex[:8]
    card, other = f"card-{tag}-1", f"card-{tag}-2"
    minted, refused = f"order-{tag}-1", f"order-{tag}-2"
    assert (
        single_mint.delay(card_id=card, owner="alice", request_id=minted).get(timeout=30)["outcome"]
        == "succeeded"
    )
    outcome = single_mint.delay(card_id=card, owner="bob", request_id=refused).get(timeout=30)
    assert (outcome["outcome"], outcome["reason"]) == ("rejected", "already_minted")
    # More of the demo's kinds, for the screenshot
    single_mint.delay(card_id=other, owner="alice", request_id=f"order-{tag}-3").get(timeout=30)
    single_burn.delay(card_id=other, owner="bob", request_id=f"burn-{tag}-4").get(timeout=30)
    single_burn.delay(card_id=other, owner="alice", request_id=f"burn-{tag}-5").get(timeout=30)
    # A batch whose card IDs fill the 1,024 characters of its result Flower keeps
    batch = [f"{card}-of-a-batch-{i:02d}-" + "x" * 90 for i in range(12)] + [card]
    cut = f"order-{tag}-6"
    assert (
        mint.delay(owner="bob", card_ids=batch, request_id=cut).get(timeout=30)["reason"]
        == "already_minted"
    )
    # Past the producer's checks: the worker rejects the message into the DLQ
    dead = f"bad-{tag}"
    app.send_task("mcard.single_mint", kwargs={"card_id": "no spaces", "owner": "o"}, task_id=dead)

    def recorded_by_flower(request_id: str) -> Any:
        status, task = flower.request(f"/api/task/info/{request_id}")
        return task if status == 200 and task.get("state") == "SUCCESS" else None

    api_view = wait_for(lambda: recorded_by_flower(refused), 30, "Flower to have the rejection")
    for request_id in (minted, f"burn-{tag}-5", cut):
        wait_for(lambda r=request_id: recorded_by_flower(r), 30, f"Flower to have {request_id}")
    wait_for(
        lambda: (flower.request(f"/api/task/info/{dead}")[1] or {}).get("rejected"),
        30,
        "Flower to see the dead letter",
    )
    assert drain_dlq("mcard.single_mint"), "the malformed request is in the DLQ"
    # Only the pages relabel: the API, the result and the outcome object are Celery's
    assert "'outcome': 'rejected'" in api_view["result"]
    assert "'outcome'" not in flower.request(f"/api/task/info/{cut}")[1]["result"], "cut short"
    assert app.AsyncResult(refused).get(timeout=10) == outcome

    anonymous = chromium.new_context()
    try:
        assert status_without_credentials(anonymous.new_page(), f"{flower.base}/tasks") == 401
    finally:
        anonymous.close()

    context = chromium.new_context(
        http_credentials={"username": USER, "password": PASSWORD}, viewport=VIEWPORT
    )
    try:
        context.set_default_timeout(STEP_TIMEOUT_MS)
        page = context.new_page()
        answer = page.goto(f"{flower.base}/tasks")
        assert answer is not None and answer.status == 200
        assert shown_state(page, minted) == "SUCCESS"
        assert shown_state(page, refused) == "REJECTED: already_minted"
        assert shown_state(page, f"burn-{tag}-4") == "REJECTED: not_holder"
        assert shown_state(page, cut) == "REJECTED: already_minted", "read from the ledger"
        assert shown_state(page, dead) == "FAILURE", "a dead letter: Celery's own red FAILURE"

        page.goto(f"{flower.base}/task/{refused}")
        assert page.locator("dd span.badge").first.inner_text() == "REJECTED: already_minted"

        folder = screenshots_folder(tmp_path)
        page.goto(f"{flower.base}/tasks")
        page.get_by_role("searchbox").fill(f"{tag} AND name:mcard.single")
        wait_for(lambda: page.locator("#tasks-table tbody tr").count() == 6, 20, "six rows")
        page.screenshot(path=str(folder / "flower-tasks.png"))
        page.goto(f"{flower.base}/workers")
        page.locator("#workers-table tbody tr").filter(has_text=worker.node).wait_for()
        page.screenshot(path=str(folder / "flower-workers.png"))
    finally:
        context.close()
    for name in ("flower-tasks.png", "flower-workers.png"):
        assert (folder / name).stat().st_size > 10_000, f"{name} was written"
