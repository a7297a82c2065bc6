"""Alembic migrations of the coordinator database (SQLite and PostgreSQL)."""
