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


def mcard_tasks(ledger: str, *args: str, specs: str = PLUGIN) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MCARD_SPECS=specs, MCARD_DATABASE_URL=ledger)
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

    def transfer(new_owner: str) -> dict[str, object]:
        done = mcard_tasks(
            sqlite_url,
            "transfer",
            "--card-id",
            card,
            "--owner",
            "alice",
            f"--new-owner={new_owner}",
            "--wait=30",
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout.splitlines()[-1]))

    outcome = transfer("bob")
    assert (outcome["task"], outcome["outcome"]) == ("mcard.single_transfer", "succeeded")
    stored = get_ledger(sqlite_url).card(card)
    assert stored is not None and stored.owner == "bob"
    assert transfer("carol")["reason"] == "not_holder"  # alice holds it no more
    shown = mcard_tasks(sqlite_url, "queues").stdout
    assert "mcard.single_transfer " in shown and "mcard.single_transfer.dlq " in shown


def test_a_module_in_mcard_specs_that_cannot_be_imported_is_named(sqlite_url: str) -> None:
    done = mcard_tasks(sqlite_url, "topology", "show", specs="no_such_kinds")
    assert done.returncode != 0
    assert "MCARD_SPECS: cannot import 'no_such_kinds'" in done.stderr
