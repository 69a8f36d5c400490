"""Flower's defaults from the MCARD_* settings, and the checks before Flower serves."""

from __future__ import annotations

import pytest

from mcard_tasks.config import Settings
from mcard_tasks.errors import ConfigurationError
from mcard_tasks.flower import MIN_PASSWORD_LENGTH, check_options, configure_flower

PASSWORD = "a-long-enough-secret"


def test_credentials_become_basic_auth_and_flower_is_read_only() -> None:
    env: dict[str, str] = {}
    configure_flower(Settings(flower_user="ops", flower_password=PASSWORD), env)
    assert env["FLOWER_BASIC_AUTH"] == f"ops:{PASSWORD}"
    assert env["FLOWER_READ_ONLY"] == "true"
    assert "kwargs" in env["FLOWER_TASKS_COLUMNS"] and "FLOWER_ADDRESS" not in env


def test_without_credentials_flower_defaults_to_localhost() -> None:
    env: dict[str, str] = {}
    configure_flower(Settings(), env)
    assert env["FLOWER_ADDRESS"] == "127.0.0.1" and "FLOWER_BASIC_AUTH" not in env


def test_an_explicit_flower_setting_wins() -> None:
    env = {"FLOWER_READ_ONLY": "false", "FLOWER_BASIC_AUTH": "a:b"}
    configure_flower(Settings(), env)
    assert env["FLOWER_READ_ONLY"] == "false" and env["FLOWER_BASIC_AUTH"] == "a:b"


@pytest.mark.parametrize(
    ("user", "password", "named"),
    [
        ("ops", "with,comma-and-long", "may not contain ','"),
        ("op:s", PASSWORD, "MCARD_FLOWER_USER may not contain"),
        ("op,s", PASSWORD, "MCARD_FLOWER_USER may not contain"),
        ("", PASSWORD, "MCARD_FLOWER_USER is empty"),
        ("ops", "", "MCARD_FLOWER_PASSWORD is empty"),
        ("ops", None, "MCARD_FLOWER_USER is set but MCARD_FLOWER_PASSWORD is not"),
        (None, PASSWORD, "MCARD_FLOWER_PASSWORD is set but MCARD_FLOWER_USER is not"),
        ("ops", "x" * (MIN_PASSWORD_LENGTH - 1), f"shorter than {MIN_PASSWORD_LENGTH}"),
    ],
)
def test_unusable_credentials_are_refused_naming_the_setting_and_rule(
    user: str | None, password: str | None, named: str
) -> None:
    env: dict[str, str] = {}
    with pytest.raises(ConfigurationError, match=named) as raised:
        configure_flower(Settings(flower_user=user, flower_password=password), env)
    assert not password or password not in str(raised.value), "the password is never shown"
    assert "FLOWER_BASIC_AUTH" not in env


def test_a_password_of_the_minimum_length_is_accepted() -> None:
    env: dict[str, str] = {}
    configure_flower(Settings(flower_user="ops", flower_password="x" * MIN_PASSWORD_LENGTH), env)
    assert env["FLOWER_BASIC_AUTH"] == "ops:" + "x" * MIN_PASSWORD_LENGTH


@pytest.mark.parametrize("address", ["0.0.0.0", "", "::", "192.0.2.10"])
def test_flower_without_auth_is_refused_on_a_reachable_address(address: str) -> None:
    with pytest.raises(ConfigurationError, match="refusing to serve Flower") as raised:
        check_options(address=address, port=5555, basic_auth=None)
    message = str(raised.value)
    assert "MCARD_FLOWER_USER" in message and "MCARD_FLOWER_PASSWORD" in message
    assert (address or "every interface") in message


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_flower_without_auth_on_loopback_says_where_it_serves(address: str) -> None:
    line = check_options(address=address, port=5555, basic_auth=None)
    assert "without authentication" in line and "only" in line and "read-only" in line


def test_the_line_printed_names_the_address_really_served() -> None:
    line = check_options(address="", port=5555, basic_auth=[f"ops:{PASSWORD}"])
    assert "every interface, port 5555" in line and "basic auth" in line
    assert "127.0.0.1" not in line
    assert "NOT read-only" in check_options(
        address="127.0.0.1", port=5555, basic_auth=None, read_only=False
    )


def test_a_unix_socket_without_auth_is_local_only() -> None:
    line = check_options(address="0.0.0.0", port=5555, unix_socket="/run/f.sock")
    assert "/run/f.sock" in line


@pytest.mark.parametrize("entries", [["ops:pass", "tail"], ["ops:"], [":pw"], ["nocolon"]])
def test_a_basic_auth_entry_that_is_not_user_colon_password_is_refused(
    entries: list[str],
) -> None:
    with pytest.raises(ConfigurationError, match="not user:password"):
        check_options(address="127.0.0.1", port=5555, basic_auth=entries)
