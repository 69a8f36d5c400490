"""Flower's defaults from the MCARD_* settings."""

from __future__ import annotations

from mcard_tasks.config import Settings
from mcard_tasks.flower import configure_flower


def test_credentials_become_basic_auth_and_flower_is_read_only() -> None:
    env: dict[str, str] = {}
    warning = configure_flower(Settings(flower_user="ops", flower_password="pw"), env)
    assert warning is None
    assert env["FLOWER_BASIC_AUTH"] == "ops:pw"
    assert env["FLOWER_READ_ONLY"] == "true"
    assert "kwargs" in env["FLOWER_TASKS_COLUMNS"] and "FLOWER_ADDRESS" not in env


def test_without_credentials_flower_serves_on_localhost_only_and_says_so() -> None:
    env: dict[str, str] = {}
    warning = configure_flower(Settings(), env)
    assert env["FLOWER_ADDRESS"] == "127.0.0.1"
    assert warning is not None and "without authentication" in warning and "127.0.0.1" in warning


def test_an_explicit_flower_setting_wins() -> None:
    env = {"FLOWER_READ_ONLY": "false", "FLOWER_BASIC_AUTH": "a:b"}
    assert configure_flower(Settings(), env) is None
    assert env["FLOWER_READ_ONLY"] == "false"
