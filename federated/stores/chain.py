"""Reading a stored hash chain: the coordinator's audit trail and the site's access log are tables whose
rows are numbered by `seq` and verified in that order (privacy.hashchain does the verifying)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlmodel import Session, select


def rows_by_seq(*, session: Session, table: Any, batch: int = 1000) -> Iterator[Any]:
    """Every row of `table` (a SQLModel table class with a `seq` column), lowest seq first, read `batch` at a time."""
    after = 0
    while True:
        chunk = session.exec(select(table).where(table.seq > after).order_by(table.seq).limit(batch)).all()
        if not chunk:
            return
        yield from chunk
        after = chunk[-1].seq
