"""One spec per task kind: everything mcard-tasks knows of a kind, named once.

The registry plays the part of the seed's ``QUEUE_PUBLISHERS``: each kind is written down once
(its name, payload model, rule, the cards it touches, how the issuer is called) and the
topology, the routes, validation, the ledger, the tasks, the command line and the bulk import
all derive from it. A new kind is one ``register(TaskSpec(...))`` before the app is created.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mcard_tasks.errors import InvalidRequestError
from mcard_tasks.issuers import Issuer
from mcard_tasks.payloads import (
    MintRequest,
    Payload,
    SingleBurnRequest,
    SingleMintRequest,
    validate_fields,
)
from mcard_tasks.rules import (
    BURN_EACH_EFFECT,
    BURN_ONE_EFFECT,
    MINT_EACH_EFFECT,
    MINT_ONE_EFFECT,
    BatchEffect,
    Rule,
    burn_card,
    burn_each,
    mint_cards,
    mint_each,
)

__all__ = [
    "PREFIX",
    "SPECS",
    "TaskSpec",
    "register",
    "spec_for",
    "spec_for_key",
    "task_names",
    "validate_payload",
]

#: Every task name starts with it; the bulk import accepts names without it.
PREFIX = "mcard."


@dataclass(frozen=True)
class TaskSpec:
    """A task kind.

    name: the Celery task name, which is also its queue's name and routing key.
    payload: the pydantic model of its keyword arguments (validation, at producer and worker).
    rule: decides and applies the effect in the ledger's transaction (mcard_tasks.rules).
    cards: the cards a request touches (the outcome object lists them; an external issuer's
        completion finalizes them).
    issue: asks an external issuer for the effect, with the request ID as idempotency key.
    pending_status, final_status: the cards' status while an external issuer works, and after.
    command: the ``mcard-tasks`` command that enqueues it.
    doc: one line, for the task and the command's help.
    fast_effect: PostgreSQL SQL applying the success of a new request on one card, for the
        ledger's one-statement path (None: the general path always decides).
    json_fields: payload fields bound as JSON in fast_effect.
    legacy_keys: more ``key`` values a legacy (seed-shaped) message of this kind may carry,
        beside the task name and its underscore form (mcard_tasks.legacy).
    batch_effect: the success path of many new requests at once (mcard_tasks.rules.
        BatchEffect), for the worker's batches (None: each request is applied on its own).
    fast_batch_effect: PostgreSQL SQL applying batch_effect's success in the batch's one
        statement (mcard_tasks.rules.MINT_EACH_EFFECT; None: batch_effect's statements).
    issue_batch, batch_method: how an external issuer is asked for many requests in one
        call, and the issuer's method that call needs (an issuer without it is asked one
        request at a time).
    """

    name: str
    payload: type[Payload]
    rule: Rule
    cards: Callable[[Any], list[str]]
    issue: Callable[[Issuer, str, Any], None]
    pending_status: str
    final_status: str
    command: str
    doc: str
    fast_effect: str | None = None
    json_fields: tuple[str, ...] = ()
    legacy_keys: tuple[str, ...] = ()
    batch_effect: BatchEffect | None = None
    fast_batch_effect: str | None = None
    issue_batch: Callable[[Any, list[tuple[str, Any]]], None] | None = None
    batch_method: str = ""

    def batches_with(self, issuer: Issuer) -> bool:
        """Whether requests of this kind can be applied in batches with issuer."""
        if self.batch_effect is None:
            return False
        if not issuer.external:
            return True
        return self.issue_batch is not None and callable(getattr(issuer, self.batch_method, None))

    @property
    def short_name(self) -> str:
        """The name without ``mcard.``, as the bulk import's ``task`` key and the task's
        attribute in mcard_tasks.tasks."""
        return self.name.removeprefix(PREFIX)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every ``key`` a legacy message of this kind may carry: the task name, its
        underscore form (``mcard_single_mint``) and the spec's own legacy_keys."""
        return (self.name, self.name.replace(".", "_"), *self.legacy_keys)


#: Names the request, the ledger's statements and the enqueue commands use themselves.
RESERVED_FIELDS = frozenset(
    {
        "request_id",
        "task_id",
        "task",
        "fingerprint",
        "outcome",
        "recorded_at",
        "routing_key",
        "wait",
    }
)

#: The registry: task name -> spec, in registration order.
SPECS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    """Add a task kind. Raises ValueError for a name that is taken or not ``mcard.<word>``."""
    if not spec.name.startswith(PREFIX) or not spec.short_name.isidentifier():
        raise ValueError(f"task name {spec.name!r}: must be {PREFIX}<identifier>")
    if spec.name in SPECS:
        raise ValueError(f"task name {spec.name!r} is registered already")
    reserved = RESERVED_FIELDS & set(spec.payload.model_fields)
    if reserved:
        raise ValueError(f"{spec.name}: payload fields {sorted(reserved)} are reserved")
    if spec.command in {other.command for other in SPECS.values()}:
        raise ValueError(f"{spec.name}: command {spec.command!r} is taken")
    taken = set(spec.keys) & {key for other in SPECS.values() for key in other.keys}
    if taken:
        raise ValueError(f"{spec.name}: legacy keys {sorted(taken)} are taken")
    SPECS[spec.name] = spec
    return spec


def task_names() -> tuple[str, ...]:
    """Every registered task name (each also its queue's name and routing key)."""
    return tuple(SPECS)


def spec_for(name: str) -> TaskSpec:
    """The spec of a task name. Raises InvalidRequestError naming the known ones."""
    spec = SPECS.get(name)
    if spec is None:
        known = ", ".join(SPECS)
        raise InvalidRequestError([f"task: unknown task {name!r} (known: {known})"])
    return spec


def spec_for_key(key: str) -> TaskSpec | None:
    """The spec whose legacy messages carry key (see TaskSpec.keys), or None."""
    return next((spec for spec in SPECS.values() if key in spec.keys), None)


def validate_payload(task: str, kwargs: dict[str, Any]) -> Payload:
    """Validate a task's keyword arguments; InvalidRequestError names the unknown task, or
    each field and rule."""
    return validate_fields(spec_for(task).payload, kwargs)


def _issue_cards(issuer: Issuer, request_id: str, payload: MintRequest | SingleMintRequest) -> None:
    issuer.issue(request_id, payload.owner, _minted(payload), payload.metadata)


def _minted(payload: MintRequest | SingleMintRequest) -> list[str]:
    return payload.card_ids if isinstance(payload, MintRequest) else [payload.card_id]


def _destroy_card(issuer: Issuer, request_id: str, payload: SingleBurnRequest) -> None:
    issuer.destroy(request_id, payload.owner, payload.card_id)


def _issue_each(issuer: Any, requests: list[tuple[str, SingleMintRequest]]) -> None:
    issuer.issue_many([(rid, p.owner, [p.card_id], p.metadata) for rid, p in requests])


def _destroy_each(issuer: Any, requests: list[tuple[str, SingleBurnRequest]]) -> None:
    issuer.destroy_many([(rid, p.owner, p.card_id) for rid, p in requests])


#: What the two minting kinds share: the rule, the cards and the issuer call.
_MINTING: dict[str, Any] = {
    "rule": mint_cards,
    "cards": _minted,
    "issue": _issue_cards,
    "pending_status": "minting",
    "final_status": "active",
}
register(
    TaskSpec(
        name="mcard.mint",
        payload=MintRequest,
        command="mint",
        doc="Issue a batch of distinct cards to one owner, all or nothing.",
        **_MINTING,
    )
)
register(
    TaskSpec(
        name="mcard.single_mint",
        payload=SingleMintRequest,
        command="single-mint",
        doc="Issue one card to owner.",
        fast_effect=MINT_ONE_EFFECT,
        json_fields=("metadata",),
        batch_effect=mint_each,
        fast_batch_effect=MINT_EACH_EFFECT,
        issue_batch=_issue_each,
        batch_method="issue_many",
        **_MINTING,
    )
)
register(
    TaskSpec(
        name="mcard.single_burn",
        payload=SingleBurnRequest,
        rule=burn_card,
        cards=lambda payload: [payload.card_id],
        issue=_destroy_card,
        pending_status="burning",
        final_status="burned",
        command="burn",
        doc="Destroy a card that owner holds.",
        fast_effect=BURN_ONE_EFFECT,
        batch_effect=burn_each,
        fast_batch_effect=BURN_EACH_EFFECT,
        issue_batch=_destroy_each,
        batch_method="destroy_many",
        # The seed's own word for it: its publishers enqueue burns under this key.
        legacy_keys=("mcard_burn",),
    )
)
