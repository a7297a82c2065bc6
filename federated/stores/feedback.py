"""Which clinician verdicts each training round used, in the site's transactional database.

The ClientApp writes one row per (run, round, review) after the round's privacy charge:
`label` +1 for an approved twin it trained on, -1 for a rejected twin it held out. Rows are
written once: a round repeated after a coordinator restart adds nothing. The site API shows
them per run and round (`GET /api/v1/reviews/feedback`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

import sqlalchemy as sa

from . import create_tables


class FeedbackUseStore:
    """Per-round feedback usage of one site."""

    def __init__(self, *, url: str | None = None, engine: sa.Engine | None = None) -> None:
        if (url is None) == (engine is None):
            raise ValueError("give a database url or an engine")
        self._own = engine is None
        self.engine = engine if engine is not None else sa.create_engine(url)
        meta = sa.MetaData()
        self.table = sa.Table(
            "feedback_use", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("run_id", sa.String(64), nullable=False), sa.Column("round", sa.Integer, nullable=False),
            sa.Column("review_id", sa.Integer, nullable=False), sa.Column("label", sa.Integer, nullable=False),
            sa.Column("at", sa.String(40), nullable=False),
            sa.UniqueConstraint("run_id", "round", "review_id"), sa.Index("ix_feedback_use_review", "review_id"))
        create_tables(meta, self.engine)

    def record(self, *, run_id: str, round: int, used: Iterable[int], held_out: Iterable[int]) -> int:
        """Record a round's used (+1) and held-out (-1) review ids once; returns rows added."""
        rows = [(int(r), 1) for r in used] + [(int(r), -1) for r in held_out]
        at = datetime.now(timezone.utc).isoformat()
        with self.engine.begin() as conn:
            seen = set(conn.execute(sa.select(self.table.c.review_id).where(
                self.table.c.run_id == run_id, self.table.c.round == int(round))).scalars())
            new = [{"run_id": run_id, "round": int(round), "review_id": r, "label": label, "at": at}
                   for r, label in dict(rows).items() if r not in seen]
            if new:
                conn.execute(self.table.insert(), new)
        return len(new)

    def usage(self) -> list[dict]:
        """Per (run, round): how many approved twins were trained on and rejected ones held out, and their ids."""
        t = self.table
        out: dict[tuple[str, int], dict] = {}
        with self.engine.connect() as conn:
            for run, rnd, review, label in conn.execute(
                    sa.select(t.c.run_id, t.c.round, t.c.review_id, t.c.label).order_by(t.c.run_id, t.c.round,
                                                                                          t.c.review_id)):
                u = out.setdefault((run, rnd), {"run_id": run, "round": rnd, "approved": [], "rejected": []})
                u["approved" if label > 0 else "rejected"].append(review)
        return list(out.values())

    def close(self) -> None:
        """Release connections (only of an engine this store created)."""
        if self._own:
            self.engine.dispose()
