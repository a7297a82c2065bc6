"""Alembic environment: the connection comes from the caller (`evoclone.coordinator.migrate`), never a file.

Only the coordinator's tables are compared: SQLModel keeps one MetaData for every service, and a process that
imported the site node's models has those tables on it too.
"""

from alembic import context
from sqlmodel import SQLModel

from evoclone.coordinator.migrate import table_names

connection = context.config.attributes.get("connection")
ours = table_names()


def include_name(name, type_, _parent_names) -> bool:
    """Autogenerate looks at the coordinator's tables only."""
    return type_ != "table" or name in ours


context.configure(connection=connection, target_metadata=SQLModel.metadata, include_name=include_name,
                  compare_type=True, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
