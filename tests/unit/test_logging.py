"""Celery's per-task log lines follow MCARD_LOG_TASKS; failures are logged either way."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from celery import signals

from mcard_tasks.application import TASK_LINE_LOGGERS, quiet_task_lines
from mcard_tasks.config import Settings


@pytest.fixture
def info_root() -> Iterator[None]:
    """The root logger at INFO, as in a worker, and the task-line loggers unset; restored."""
    names = ("", *TASK_LINE_LOGGERS)
    levels = {name: logging.getLogger(name).level for name in names}
    logging.getLogger().setLevel(logging.INFO)
    for name in TASK_LINE_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_per_task_lines_are_off_by_default_and_errors_still_pass(info_root: None) -> None:
    assert all(logging.getLogger(name).isEnabledFor(logging.INFO) for name in TASK_LINE_LOGGERS)
    quiet_task_lines(Settings())
    for name in TASK_LINE_LOGGERS:
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.INFO)
        assert logger.isEnabledFor(logging.ERROR)


def test_the_worker_s_logging_setup_quiets_them(info_root: None) -> None:
    # What Celery sends once it has configured a worker's logging (the app is imported).
    signals.after_setup_logger.send(sender=None, logger=logging.getLogger(), loglevel="INFO")
    assert not any(logging.getLogger(name).isEnabledFor(logging.INFO) for name in TASK_LINE_LOGGERS)


def test_log_tasks_keeps_celery_s_lines(info_root: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCARD_LOG_TASKS", "true")
    quiet_task_lines(Settings())
    assert all(logging.getLogger(name).isEnabledFor(logging.INFO) for name in TASK_LINE_LOGGERS)
