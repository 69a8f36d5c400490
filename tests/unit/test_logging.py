"""Celery's per-task log lines follow MCARD_LOG_TASKS; failures are logged either way."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from mcard_tasks.application import TASK_LINE_LOGGERS, quiet_task_lines
from mcard_tasks.config import Settings


@pytest.fixture
def restored() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in TASK_LINE_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_per_task_lines_are_off_by_default_and_errors_still_pass(restored: None) -> None:
    quiet_task_lines(Settings())
    for name in TASK_LINE_LOGGERS:
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.INFO)
        assert logger.isEnabledFor(logging.ERROR)


def test_log_tasks_keeps_celery_s_lines(restored: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TASK_LINE_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.getLogger().setLevel(logging.INFO)
    monkeypatch.setenv("MCARD_LOG_TASKS", "true")
    quiet_task_lines(Settings())
    assert all(logging.getLogger(name).isEnabledFor(logging.INFO) for name in TASK_LINE_LOGGERS)
