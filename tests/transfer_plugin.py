"""Registers the test's fourth task kind on import: MCARD_SPECS=tests.transfer_plugin."""

from mcard_tasks.specs import register
from tests.transfer_kind import SPEC

register(SPEC)
