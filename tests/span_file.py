"""A test-only span exporter: each finished span as one JSON line appended to a file.

A worker subprocess loads it the way it loads any exporter, by its entry point in the
``opentelemetry_traces_exporter`` group named in OTEL_TRACES_EXPORTER: the test writes a
``.dist-info`` folder declaring that entry point (:func:`register`) and puts its parent on
the worker's PYTHONPATH. The file is MCARD_TEST_SPAN_FILE.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

#: The exporter's name in OTEL_TRACES_EXPORTER.
NAME = "mcard_test_jsonl"
FILE_VARIABLE = "MCARD_TEST_SPAN_FILE"


class JsonLinesSpanExporter(SpanExporter):
    """Appends each span (``ReadableSpan.to_json``, on one line) to MCARD_TEST_SPAN_FILE."""

    def __init__(self) -> None:
        self.path = Path(os.environ[FILE_VARIABLE])
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(span.to_json(indent=None) + "\n" for span in spans)
        with self._lock, self.path.open("a", encoding="utf-8") as file:
            file.write(lines)
        return SpanExportResult.SUCCESS


def register(folder: Path) -> Path:
    """Declare the exporter's entry point in a distribution's metadata under folder (to be
    put on PYTHONPATH); return folder."""
    info = folder / "mcard_test_span_file-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    metadata = "Metadata-Version: 2.1\nName: mcard-test-span-file\nVersion: 0\n"
    (info / "METADATA").write_text(metadata)
    (info / "entry_points.txt").write_text(
        f"[opentelemetry_traces_exporter]\n{NAME} = tests.span_file:JsonLinesSpanExporter\n"
    )
    return folder


def read_spans(path: Path) -> list[dict[str, Any]]:
    """The spans exported to path so far (complete lines only)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # a line still being written
    return [json.loads(line) for line in lines if line.strip()]
