"""A fourth task kind from MCARD_SPECS, end to end: a real worker and a real producer process
load it, the CLI enqueues it, the worker applies it, and it has its own queues."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest

from mcard_tasks.ledger import get_ledger
from tests.fixtures import ROOT, Worker

pytestmark = pytest.mark.integration

PLUGIN = "tests.transfer_plugin"


def mcard_tasks(ledger: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MCARD_SPECS=PLUGIN, MCARD_DATABASE_URL=ledger)
    return subprocess.run(
        [sys.executable, "-m", "mcard_tasks.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_a_kind_from_mcard_specs_is_enqueued_applied_and_shown(
    sqlite_url: str, make_worker: Callable[..., Worker]
) -> None:
    make_worker(sqlite_url, "kinds", specs=PLUGIN).start()
    card = f"card-{uuid.uuid4().hex[:12]}"
    minted = mcard_tasks(
        sqlite_url, "single-mint", "--card-id", card, "--owner", "alice", "--wait", "30"
    )
    assert minted.returncode == 0, minted.stderr
    moved = mcard_tasks(
        sqlite_url,
        "transfer",
        "--card-id",
        card,
        "--owner",
        "alice",
        "--new-owner",
        "bob",
        "--wait",
        "30",
    )
    assert moved.returncode == 0, moved.stderr
    outcome = json.loads(moved.stdout.splitlines()[-1])
    assert (outcome["task"], outcome["outcome"]) == ("mcard.single_transfer", "succeeded")
    stored = get_ledger(sqlite_url).card(card)
    assert stored is not None and stored.owner == "bob"
    refused = mcard_tasks(
        sqlite_url,
        "transfer",
        "--card-id",
        card,
        "--owner",
        "alice",
        "--new-owner",
        "carol",
        "--wait",
        "30",
    )
    assert json.loads(refused.stdout.splitlines()[-1])["reason"] == "not_holder"
    shown = mcard_tasks(sqlite_url, "queues").stdout
    assert "mcard.single_transfer " in shown and "mcard.single_transfer.dlq " in shown


def test_a_module_in_mcard_specs_that_cannot_be_imported_is_named(sqlite_url: str) -> None:
    env = dict(os.environ, MCARD_SPECS="no_such_kinds", MCARD_DATABASE_URL=sqlite_url)
    done = subprocess.run(
        [sys.executable, "-m", "mcard_tasks.cli", "topology", "show"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "MCARD_SPECS: cannot import 'no_such_kinds'" in done.stderr
