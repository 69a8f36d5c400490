"""Alembic environment: runs on the connection mcard_tasks.database hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from mcard_tasks.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # plain `alembic` command line: build an engine from the ini file
    engine = engine_from_config(
        context.config.get_section(context.config.config_ini_section) or {},
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()
