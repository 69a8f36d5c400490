"""Tracing's setup from the OTEL_* environment, and its no-op when off (no broker)."""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from mcard_tasks import tracing
from mcard_tasks.errors import ConfigurationError


def test_span_is_one_shared_no_op_while_tracing_is_off() -> None:
    first = tracing.span("mcard.ledger.apply", "r-1", "mcard.single_mint")
    assert first is tracing.span("other", "r-2", "mcard.mint")
    with first as span:
        assert span is None
    tracing.annotate("r-1", "mcard.single_mint", "succeeded")  # nothing to name: no error


def test_the_default_exporter_is_otlp_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    [exporter] = tracing.span_exporters()
    assert isinstance(exporter, OTLPSpanExporter)
    exporter.shutdown()


def test_exporters_are_found_by_name_and_none_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert [type(e) for e in tracing.span_exporters()] == [ConsoleSpanExporter]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.span_exporters() == []


def test_an_exporter_that_is_not_installed_is_skipped_with_a_warning_naming_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin_json,console")
    with caplog.at_level(logging.WARNING, logger="mcard_tasks.tracing"):
        assert [type(e) for e in tracing.span_exporters()] == [ConsoleSpanExporter]
    assert "'zipkin_json'" in caplog.text and "not exported" in caplog.text


def test_otlp_over_grpc_needs_its_own_exporter_package(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None:
        pytest.skip("the gRPC exporter is installed here")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    with caplog.at_level(logging.WARNING, logger="mcard_tasks.tracing"):
        assert tracing.span_exporters() == []  # opentelemetry-exporter-otlp-proto-grpc: absent
    assert "'otlp'" in caplog.text


def test_the_service_is_named_mcard_tasks_unless_otel_service_name_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    named = tracing.provider_from_environment()
    assert named.resource.attributes["service.name"] == "mcard-tasks"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "card-shop-worker")
    renamed = tracing.provider_from_environment()
    assert renamed.resource.attributes["service.name"] == "card-shop-worker"


def test_tracing_on_without_opentelemetry_installed_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.celery", None)
    with pytest.raises(ConfigurationError, match=r"mcard-tasks\[tracing\]"):
        tracing.instrument()
