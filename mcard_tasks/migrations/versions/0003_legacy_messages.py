"""Counts of executed legacy messages, per task and key.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "legacy_messages",
        sa.Column("task", sa.String(64), primary_key=True),
        sa.Column("legacy_key", sa.String(128), primary_key=True),
        sa.Column("executed", sa.BigInteger(), nullable=False),
        sa.Column("last_executed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("legacy_messages")
