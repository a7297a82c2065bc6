"""Alembic migrations of the site's transactional store (SQLite and PostgreSQL)."""
