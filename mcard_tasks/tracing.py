"""OpenTelemetry traces of requests: off unless MCARD_TRACING (the README's "Traces").

With tracing on, ``delay()``/``apply_async()`` publish under an ``apply_async/<task>`` span
whose context travels in the message headers (W3C ``traceparent``), the worker runs the task
under a ``run/<task>`` span continuing that trace, and the ledger's transaction (and an
external issuer's call) are spans under it; each carries the request ID. Publishing and
running are opentelemetry-instrumentation-celery's spans; the rest are ours.

Spans are exported as the standard ``OTEL_*`` variables say (``OTEL_TRACES_EXPORTER``, default
``otlp``; ``OTEL_EXPORTER_OTLP_ENDPOINT``; ``OTEL_SERVICE_NAME``, default ``mcard-tasks``...).
Each process makes its SDK tracer provider (and the batch processor's thread) when it first
publishes or runs a task, or when a prefork pool child starts: never in a worker's parent
before it forks, as the instrumentation's documentation requires.

Nothing here imports OpenTelemetry until :func:`instrument` runs: with tracing off,
:func:`span` returns one shared no-op context manager and :func:`annotate` returns at once.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from mcard_tasks.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer, TracerProvider

__all__ = ["OUTCOME", "REQUEST_ID", "TASK", "annotate", "instrument", "span", "uninstrument"]

logger = logging.getLogger(__name__)

#: Span attributes of mcard-tasks (the request ID is also the span's messaging.message_id).
REQUEST_ID, TASK, OUTCOME = "mcard.request_id", "mcard.task", "mcard.outcome"
#: The extra that installs the OTLP exporter.
EXTRA_HINT = "pip install 'mcard-tasks[tracing]'"

_OFF: AbstractContextManager[None] = nullcontext()
_tracer: Tracer | None = None
_lock = threading.Lock()
_provider_pid: int | None = None
#: Signal receivers of ours (signal, receiver), disconnected by uninstrument().
_receivers: list[tuple[Any, Any]] = []


def span(name: str, request_id: str, task: str) -> AbstractContextManager[Any]:
    """A span named name under the current one, with the request's ID and task, while
    tracing is on; a shared no-op context manager otherwise."""
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, attributes={REQUEST_ID: request_id, TASK: task})


def annotate(request_id: str, task: str, outcome: str | None = None) -> None:
    """Name the request, its task and (once known) its outcome on the current span (the
    worker's run span) while tracing is on."""
    if _tracer is None:
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    current.set_attributes({REQUEST_ID: request_id, TASK: task})
    if outcome is not None:
        current.set_attribute(OUTCOME, outcome)


def instrument(tracer_provider: TracerProvider | None = None) -> None:
    """Trace Celery's publishes and runs, and our own spans, in this process (idempotent).

    Parameters: tracer_provider, the provider to use (a test's, say); None: the global one,
    made from the OTEL_* environment when this process first needs it, unless the
    application set one itself.

    Raises: ConfigurationError when OpenTelemetry is not installed (the tracing extra).
    """
    global _tracer
    from celery import signals

    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
    except ImportError as exc:
        raise ConfigurationError(
            f"MCARD_TRACING=true needs OpenTelemetry: {EXTRA_HINT} ({exc})"
        ) from exc
    if _tracer is not None:
        return
    if tracer_provider is None:
        # Connected before the instrumentor's receivers: the provider exists before the
        # process's first span. A prefork child makes its own at start, after the fork.
        for signal in (signals.worker_process_init, signals.before_task_publish):
            _connect(signal, _start_provider)
        _connect(signals.task_prerun, _start_provider)
        for signal in (signals.worker_process_shutdown, signals.worker_shutdown):
            _connect(signal, _flush)
    CeleryInstrumentor().instrument(tracer_provider=tracer_provider)
    _connect(signals.before_task_publish, _name_publish)
    _tracer = trace.get_tracer("mcard_tasks", tracer_provider=tracer_provider)


def uninstrument() -> None:
    """Stop tracing in this process (the instrumentation and our receivers)."""
    global _tracer
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().uninstrument()
    while _receivers:
        signal, receiver = _receivers.pop()
        signal.disconnect(receiver)
    _tracer = None


def _connect(signal: Any, receiver: Any) -> None:
    signal.connect(receiver, weak=False)
    _receivers.append((signal, receiver))


def _name_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """The instrumentor's publish span is current while before_task_publish runs."""
    from opentelemetry import trace

    current = trace.get_current_span()
    if headers and current.is_recording():
        current.set_attributes({REQUEST_ID: str(headers.get("id")), TASK: str(headers.get("task"))})


def _start_provider(**_: Any) -> None:
    """Set the global tracer provider from the OTEL_* environment, once per process."""
    global _provider_pid
    if _provider_pid == os.getpid():
        return
    with _lock:
        if _provider_pid == os.getpid():
            return
        from opentelemetry import trace

        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(provider_from_environment())
        _provider_pid = os.getpid()


def provider_from_environment() -> TracerProvider:
    """An SDK tracer provider with a batch processor per exporter of OTEL_TRACES_EXPORTER
    (resource, sampler and batching from the other OTEL_* variables)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "mcard-tasks"}))
    provider = TracerProvider(resource=resource)
    for exporter in span_exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def span_exporters() -> list[SpanExporter]:
    """The exporters OTEL_TRACES_EXPORTER names (comma-separated, default ``otlp``), found by
    their ``opentelemetry_traces_exporter`` entry points; ``none``: none. ``otlp`` is OTLP
    over HTTP/protobuf, or gRPC when OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL is ``grpc``. A name
    with no installed exporter is logged and skipped: the process runs untraced, not down."""
    from importlib.metadata import entry_points

    names = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    exporters = []
    for name in (part.strip() for part in names.split(",")):
        if name in ("", "none"):
            continue
        found = entry_points(group="opentelemetry_traces_exporter", name=_entry_point(name))
        if not found:
            logger.warning(
                "OTEL_TRACES_EXPORTER: no span exporter %r is installed (%s for otlp);"
                " this process's spans are not exported",
                name,
                EXTRA_HINT,
            )
            continue
        exporters.append(next(iter(found)).load()())
    return exporters


def _entry_point(name: str) -> str:
    if name != "otlp":
        return name
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    return "otlp_proto_grpc" if protocol.strip() == "grpc" else "otlp_proto_http"


def _flush(**_: Any) -> None:
    """Export what is buffered before the process goes: a prefork child ends with os._exit,
    which skips the SDK's own atexit hook."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        force_flush()
