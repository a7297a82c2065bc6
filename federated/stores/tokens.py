"""Bearer API tokens in a service's table: the coordinator's site tokens and the site's service-account tokens.

Both are 256-bit random strings (privacy.passwords.new_api_token), stored only as their sha256, with a
`revoked_at` that ends them; the tables and the errors stay each service's own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from evoclone.privacy.passwords import api_token_hash


def live_token(*, session: Session, table: Any, token: str) -> Any | None:
    """The row of `table` (a SQLModel table with token_hash and revoked_at) stored for `token`, unless it is
    unknown or revoked (None)."""
    row = session.exec(select(table).where(table.token_hash == api_token_hash(token))).first()
    return None if row is None or row.revoked_at is not None else row


def mark_revoked(*, session: Session, row: Any, at: datetime) -> Any:
    """Stamp `row` revoked at `at` in the caller's transaction (flushed; the caller commits); the row."""
    row.revoked_at = at
    session.add(row)
    session.flush()
    return row
