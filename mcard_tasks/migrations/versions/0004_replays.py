"""Counts of replays absorbed (a request ID delivered again, answered from its record), per task.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replays",
        sa.Column("task", sa.String(64), primary_key=True),
        sa.Column("absorbed", sa.BigInteger(), nullable=False),
        sa.Column("last_replayed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("replays")
