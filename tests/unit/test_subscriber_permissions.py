"""A subscriber's permissions cover its own queues only, and no other user's name can reach
them."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from mcard_tasks.broker_users import definitions
from mcard_tasks.cli import main
from mcard_tasks.errors import ConfigurationError
from mcard_tasks.roles import permissions, subscriber_queue_prefix


def test_a_subscribers_permissions_cover_its_own_queues_and_no_others() -> None:
    granted = permissions("subscriber", "shop")
    for pattern in (granted.configure, granted.write, granted.read):
        assert re.fullmatch(pattern, "mcard.events.shop.orders")
        assert not re.fullmatch(pattern, "mcard.events.shopper.orders")
        assert not re.fullmatch(pattern, "mcard.events.other.orders")
    assert re.fullmatch(granted.read, "mcard.events"), "it binds to the exchange"


def test_a_user_name_with_a_dot_has_no_queues_of_its_own() -> None:
    # shop's prefix, mcard.events.shop., would cover shop.eu's queues (and a@b's, a@b.com's).
    with pytest.raises(ValueError, match=r"'shop\.eu'.*dot"):
        subscriber_queue_prefix("shop.eu")
    done = CliRunner().invoke(main, ["broker", "permissions", "subscriber", "--user", "shop.eu"])
    assert done.exit_code == 2 and "dot" in done.output, done.output
    environ = {"MCARD_BROKER_PASSWORD_SUBSCRIBER": "x" * 24}
    with pytest.raises(ConfigurationError, match="dot"):
        definitions("/", {"subscriber": "mcard.subscriber"}, environ)
