"""Issuers: the external system that really issues or destroys a card (a card platform, a
chain). Each call carries the request ID as its idempotency key, so asking again after a
crash is safe.

The default issuer is the ledger itself (the effect is the ledger row). The simulated issuer
stands in for a remote one in the demo, tests and benchmarks: it waits, and fails a share of
its calls with a transient error.
"""

from __future__ import annotations

import importlib
import logging
import random
import time
from functools import lru_cache
from typing import Any, Protocol

from mcard_tasks.config import Settings
from mcard_tasks.errors import ConfigurationError, TransientError

__all__ = [
    "BatchIssuer",
    "Issuer",
    "IssuerUnavailableError",
    "LedgerIssuer",
    "SimulatedBatchIssuer",
    "SimulatedIssuer",
    "build_issuer",
    "configured_issuer",
]

logger = logging.getLogger(__name__)


class IssuerUnavailableError(TransientError):
    """Raised when the issuer failed or timed out; the call is retried with the same key."""


class Issuer(Protocol):
    """What mcard-tasks needs of an issuer. ``external`` False means the ledger is the effect."""

    external: bool

    def issue(
        self, request_id: str, owner: str, card_ids: list[str], metadata: dict[str, Any] | None
    ) -> None: ...

    def destroy(self, request_id: str, owner: str, card_id: str) -> None: ...


#: issue_many's requests: (request ID, owner, card IDs, metadata) each.
IssueRequests = list[tuple[str, str, list[str], dict[str, Any] | None]]
#: destroy_many's requests: (request ID, owner, card ID) each.
DestroyRequests = list[tuple[str, str, str]]


class BatchIssuer(Issuer, Protocol):
    """An issuer that also takes many requests in one call (optional: the worker's batches
    use these methods when an issuer has them). Each request ID stays the idempotency key of
    its own card(s); a call either does all of them or raises (TransientError: every request
    of it is then asked again, one by one, with its own key)."""

    def issue_many(self, requests: IssueRequests) -> None: ...

    def destroy_many(self, requests: DestroyRequests) -> None: ...


class LedgerIssuer:
    """The default: the card exists because the ledger says so; nothing to call."""

    external = False

    def issue(
        self, request_id: str, owner: str, card_ids: list[str], metadata: dict[str, Any] | None
    ) -> None:
        return None

    def destroy(self, request_id: str, owner: str, card_id: str) -> None:
        return None


class SimulatedIssuer:
    """A remote issuer with latency and a failure rate (MCARD_ISSUER_LATENCY_MS / _FAILURE_RATE)."""

    external = True

    def __init__(self, latency_ms: float = 50.0, failure_rate: float = 0.0) -> None:
        self.latency = latency_ms / 1000
        self.failure_rate = failure_rate

    def _call(self, action: str, request_id: str) -> None:
        time.sleep(self.latency)
        if random.random() < self.failure_rate:
            raise IssuerUnavailableError(f"simulated issuer failed to {action} ({request_id})")

    def issue(
        self, request_id: str, owner: str, card_ids: list[str], metadata: dict[str, Any] | None
    ) -> None:
        self._call("issue", request_id)

    def destroy(self, request_id: str, owner: str, card_id: str) -> None:
        self._call("destroy", request_id)


class SimulatedBatchIssuer(SimulatedIssuer):
    """The simulated issuer in batch mode (MCARD_ISSUER_BATCH): one latency per call, however
    many requests it carries, like a remote API with a bulk endpoint."""

    def issue_many(self, requests: IssueRequests) -> None:
        self._call("issue", f"{len(requests)} requests, first {requests[0][0]}")

    def destroy_many(self, requests: DestroyRequests) -> None:
        self._call("destroy", f"{len(requests)} requests, first {requests[0][0]}")


@lru_cache(maxsize=4)
def configured_issuer(settings: Settings) -> Issuer:
    """The issuer of this process for these settings, built once."""
    return build_issuer(settings)


def build_issuer(settings: Settings) -> Issuer:
    """The issuer named by MCARD_ISSUER: ``ledger``, ``simulated`` or ``module:Class``."""
    if settings.issuer == "ledger":
        return LedgerIssuer()
    if settings.issuer == "simulated":
        kind = SimulatedBatchIssuer if settings.issuer_batch else SimulatedIssuer
        return kind(settings.issuer_latency_ms, settings.issuer_failure_rate)
    module, _, name = settings.issuer.partition(":")
    try:
        issuer: Issuer = getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(
            f"MCARD_ISSUER={settings.issuer!r}: expected ledger, simulated or module:Class ({exc})"
        ) from exc
    return issuer
