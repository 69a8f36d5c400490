"""The card ledger: cards, operations keyed by request ID, non-final task states.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cards",
        sa.Column("card_id", sa.String(128), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("minted_by", sa.String(128), nullable=False),
        sa.Column("minted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("burned_by", sa.String(128), nullable=True),
        sa.Column("burned_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_cards_owner", "cards", ["owner"])
    op.create_table(
        "operations",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_operations_task_status", "operations", ["task", "status"])
    op.create_table(
        "task_states",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("task_states")
    op.drop_index("ix_operations_task_status", table_name="operations")
    op.drop_table("operations")
    op.drop_index("ix_cards_owner", table_name="cards")
    op.drop_table("cards")
