"""The three tasks: thin wrappers that hand a validated request to the ledger."""

from __future__ import annotations

from typing import Any

from mcard_tasks.application import app
from mcard_tasks.payloads import MintRequest, SingleBurnRequest, SingleMintRequest
from mcard_tasks.producer import RequestTask

__all__ = ["mint", "single_burn", "single_mint"]

OPTIONS: dict[str, Any] = {
    "base": RequestTask,
    "bind": True,
    "max_retries": app.settings.max_retries,
}


@app.task(name="mcard.single_mint", **OPTIONS)
def single_mint(
    self: RequestTask, card_id: str, owner: str, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Issue one card to owner."""
    return self.record(SingleMintRequest(card_id=card_id, owner=owner, metadata=metadata))


@app.task(name="mcard.mint", **OPTIONS)
def mint(
    self: RequestTask, owner: str, card_ids: list[str], metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Issue a batch of distinct cards to one owner, all or nothing."""
    return self.record(MintRequest(owner=owner, card_ids=card_ids, metadata=metadata))


@app.task(name="mcard.single_burn", **OPTIONS)
def single_burn(self: RequestTask, card_id: str, owner: str) -> dict[str, Any]:
    """Destroy a card that owner holds."""
    return self.record(SingleBurnRequest(card_id=card_id, owner=owner))


# Bind the tasks now, in the importing thread, while the import lock keeps every other thread
# out of this module. Left to Celery, each decorated task is a lazy proxy that builds and binds
# its task on first use with no lock: a burst of first calls from many threads had all but one
# of them use a task whose binding was still under way (its request stack not yet made).
app.finalize()
