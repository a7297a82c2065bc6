"""Alembic environment: the URL and connection come from the caller (`upgrade()`), never a file."""

from alembic import context
from sqlmodel import SQLModel

# importing the model modules registers their tables on SQLModel.metadata
from evoclone.site_node import access_log, auth_models, local_models, review_models, store  # noqa: F401

connection = context.config.attributes.get("connection")
context.configure(connection=connection, target_metadata=SQLModel.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
