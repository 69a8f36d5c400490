"""Enqueue commands: one per registered task kind, its options derived from the kind's payload
model (a text field is ``--field-name``, a list field ``--singular`` repeated, a JSON object a
JSON text)."""

from __future__ import annotations

import json
import typing
from typing import Any

import click

from mcard_tasks.errors import InvalidRequestError
from mcard_tasks.specs import SPECS, TaskSpec

__all__ = ["COMMANDS", "enqueue_command"]


def _parse_json(field: str, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError([f"{field}: must be JSON ({exc.msg})"]) from None


def _is(annotation: Any, kind: type) -> bool:
    """Whether a field's annotation is kind, or kind | None."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) else ()
    return typing.get_origin(annotation) is kind or any(
        typing.get_origin(option) is kind or option is kind for option in options
    )


def _option(name: str, annotation: Any, required: bool) -> tuple[click.Option, str]:
    """The click option of one payload field, and how its value is read ("text", "list"
    or "json")."""
    flag = "--" + name.replace("_", "-")
    if _is(annotation, list):
        singular = flag.removesuffix("s")
        return click.Option(
            [singular, name], multiple=True, required=required, help="Repeat for each."
        ), "list"
    if _is(annotation, dict):
        return click.Option([flag, name], required=required, help="A JSON object."), "json"
    return click.Option([flag, name], required=required), "text"


def enqueue_command(spec: TaskSpec) -> click.Command:
    """The ``mcard-tasks`` command that enqueues one request of a task kind."""
    fields = spec.payload.model_fields
    options = {name: _option(name, f.annotation, f.is_required()) for name, f in fields.items()}

    def send(request_id: str | None, wait: float | None, **given: Any) -> None:
        from mcard_tasks.tasks import TASKS

        values: dict[str, Any] = {}
        for name, (_, kind) in options.items():
            value: Any = given[name]
            if value is None or (kind == "list" and not value):
                continue  # not given: the field's default (or its "is required" error)
            values[name] = list(value) if kind == "list" else value
            if kind == "json":
                values[name] = _parse_json(name, value)
        result = TASKS[spec.name].delay(request_id=request_id, **values)
        click.echo(f"queued {spec.name} request_id={result.id}")
        if wait:
            click.echo(json.dumps(result.get(timeout=wait, interval=0.1), sort_keys=True))

    params: list[click.Parameter] = [option for option, _ in options.values()]
    params += [
        click.Option(["--request-id"], help="Idempotency key; a new UUID when omitted."),
        click.Option(
            ["--wait"],
            type=float,
            metavar="SECONDS",
            help="Wait this long for the outcome and print it.",
        ),
    ]
    return click.Command(spec.command, callback=send, params=params, help=f"Enqueue: {spec.doc}")


COMMANDS = [enqueue_command(spec) for spec in SPECS.values()]
