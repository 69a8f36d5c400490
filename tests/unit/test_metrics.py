"""The exporter's parts without a broker: the ledger's counts on SQLite and PostgreSQL, basic
auth, where it may serve, the timings switch."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mcard_tasks.config import Settings
from mcard_tasks.errors import ConfigurationError
from mcard_tasks.issuers import IssuerUnavailableError
from mcard_tasks.ledger import Ledger
from mcard_tasks.metrics import check_address, ledger_counts, metrics_app
from mcard_tasks.specs import validate_payload
from mcard_tasks.timings import TASK_DURATION, enabled, observe

SINGLE_MINT, BURN = "mcard.single_mint", "mcard.single_burn"
PASSWORD = "a-long-enough-password"


class DownIssuer:
    """An external issuer that never answers: its requests stay pending."""

    external = True

    def issue(self, request_id: str, owner: str, card_ids: list[str], metadata: Any) -> None:
        raise IssuerUnavailableError("down")

    def destroy(self, request_id: str, owner: str, card_id: str) -> None:
        raise IssuerUnavailableError("down")


def apply(ledger: Ledger, task: str, request_id: str, issuer: Any = None, **fields: Any) -> str:
    return ledger.apply(task, request_id, validate_payload(task, fields), issuer)


def test_the_ledger_counts_outcomes_by_reason_replays_pending_operations_and_the_outbox(
    fresh_ledger: Ledger,
) -> None:
    ledger = fresh_ledger
    apply(ledger, SINGLE_MINT, "m1", card_id="c1", owner="alice")
    apply(ledger, SINGLE_MINT, "m2", card_id="c2", owner="alice")
    apply(ledger, SINGLE_MINT, "m3", card_id="c1", owner="bob")  # already_minted
    apply(ledger, BURN, "b1", card_id="c2", owner="bob")  # not_holder
    first = apply(ledger, SINGLE_MINT, "m1", card_id="c1", owner="alice")  # replays
    assert apply(ledger, SINGLE_MINT, "m1", card_id="c1", owner="alice") == first
    apply(ledger, BURN, "b1", card_id="c2", owner="bob")
    with pytest.raises(IssuerUnavailableError):
        apply(ledger, SINGLE_MINT, "p1", DownIssuer(), card_id="c3", owner="carol")

    counts = ledger_counts(ledger.engine, ledger.replay_counts())

    assert counts.outcomes == {
        (SINGLE_MINT, "succeeded", ""): 2,
        (SINGLE_MINT, "rejected", "already_minted"): 1,
        (BURN, "rejected", "not_holder"): 1,
    }
    assert counts.replays == {SINGLE_MINT: 2, BURN: 1}
    number, age = counts.pending[SINGLE_MINT]
    assert number == 1 and 0 <= age < 60
    assert counts.outbox[0] == 4, "every recorded outcome waits for the relay here"
    assert 0 <= counts.outbox[1] < 60


def test_an_empty_ledger_counts_nothing_and_ages_nothing(fresh_ledger: Ledger) -> None:
    counts = ledger_counts(fresh_ledger.engine, fresh_ledger.replay_counts())
    assert (counts.outcomes, counts.replays, counts.pending) == ({}, {}, {})
    assert counts.outbox == (0, 0.0)


def call(app: Any, authorization: str | None = None) -> tuple[str, bytes]:
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics"}
    if authorization is not None:
        environ["HTTP_AUTHORIZATION"] = authorization
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, *_: status.append(s)))
    return status[0], body


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_with_credentials_every_scrape_needs_them() -> None:
    app = metrics_app(CollectorRegistry(), ("prom", PASSWORD))
    assert call(app)[0].startswith("401")
    assert call(app, basic("prom", "wrong-password-here"))[0].startswith("401")
    assert call(app, basic("other", PASSWORD))[0].startswith("401")
    assert call(app, "Basic !!not base64")[0].startswith("401")
    assert call(app, "Bearer " + PASSWORD)[0].startswith("401")
    assert call(app, basic("prom", PASSWORD))[0].startswith("200")


def test_without_credentials_it_serves_on_loopback_only() -> None:
    bare = Settings()
    assert "without authentication" in check_address(bare, "127.0.0.1", 9808)
    assert "without authentication" in check_address(bare, "::1", 9808)
    for address in ("0.0.0.0", "::", ""):
        with pytest.raises(ConfigurationError, match="refusing to serve metrics"):
            check_address(bare, address, 9808)
    secured = Settings(flower_user="prom", flower_password=PASSWORD)
    assert "basic auth" in check_address(secured, "0.0.0.0", 9808)
    line = check_address(secured, "0.0.0.0", 9808)
    assert PASSWORD not in line


def test_unusable_credentials_are_refused_without_printing_the_password() -> None:
    with pytest.raises(ConfigurationError) as refused:
        check_address(Settings(flower_user="prom", flower_password="a,b-long-password"), "::1", 1)
    assert "a,b-long-password" not in str(refused.value)
    with pytest.raises(ConfigurationError, match="MCARD_FLOWER_PASSWORD"):
        check_address(Settings(flower_user="prom"), "127.0.0.1", 1)


def test_timings_are_off_unless_a_directory_is_set() -> None:
    assert Settings().metrics_dir is None
    assert Settings(metrics_dir="  ").metrics_dir is None
    assert not enabled()
    observe(TASK_DURATION, SINGLE_MINT, 0.01)  # a no-op, nothing created
    assert not enabled()
    assert json.dumps(Settings(metrics_dir="/tmp/x").metrics_dir) == '"/tmp/x"'
