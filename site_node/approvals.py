"""Which Flower App bundles a site lets train on its data: approvals by FAB hash, and refusals.

Flower's own `--trusted-entities` check only accepts bundles signed through Flower Hub
(the SuperNode refuses any bundle without a Hub licence verification), so a site running
its own federation approves bundles by their sha256 instead. The guarded SuperNode
(`site_node.flower_node`) asks this store before it accepts the first message of a run;
a run of an unapproved bundle is refused before any ClientApp starts, and the refusal is
recorded here. Approvals and revocations are kept with who decided and why.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

import sqlalchemy as sa

from evoclone.federated.stores import create_tables

FAB_HASH = re.compile(r"^[0-9a-f]{64}$")


def check_hash(fab_hash: str) -> str:
    """A FAB hash as 64 lowercase hex digits, or a ValueError saying what was given."""
    h = fab_hash.strip().lower()
    if not FAB_HASH.match(h):
        raise ValueError(f"FAB hash {fab_hash!r} is not a sha256 (64 hex digits); get it with `evoclone app hash`")
    return h


class ApprovalStore:
    """Approved bundle hashes, the decisions' history and refused runs, in the site's database."""

    def __init__(self, *, url: str) -> None:
        self.engine = sa.create_engine(url)
        meta = sa.MetaData()
        self.approved = sa.Table(
            "app_approval", meta, sa.Column("fab_hash", sa.String(64), primary_key=True),
            sa.Column("approved_by", sa.String(128), nullable=False), sa.Column("note", sa.Text, nullable=False),
            sa.Column("at", sa.String(40), nullable=False))
        self.decisions = sa.Table(
            "app_approval_log", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("fab_hash", sa.String(64), nullable=False), sa.Column("action", sa.String(16), nullable=False),
            sa.Column("admin", sa.String(128), nullable=False), sa.Column("note", sa.Text, nullable=False),
            sa.Column("at", sa.String(40), nullable=False))
        self.refusals = sa.Table(
            "app_refusal", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("run_id", sa.String(64), nullable=False), sa.Column("fab_hash", sa.String(64), nullable=False),
            sa.Column("fab_id", sa.String(256), nullable=False), sa.Column("at", sa.String(40), nullable=False))
        create_tables(meta, self.engine)

    @staticmethod
    def _now() -> str:
        return datetime.now(timezone.utc).isoformat()

    def approve(self, fab_hash: str, *, admin: str, note: str = "") -> dict:
        """Approve a bundle (idempotent); the decision is logged."""
        h = check_hash(fab_hash)
        if not admin.strip():
            raise ValueError("an approval needs the administrator's name (--admin)")
        with self.engine.begin() as conn:
            if conn.execute(sa.select(self.approved.c.fab_hash).where(self.approved.c.fab_hash == h)).first() is None:
                conn.execute(self.approved.insert().values(fab_hash=h, approved_by=admin, note=note, at=self._now()))
            conn.execute(self.decisions.insert().values(fab_hash=h, action="approve", admin=admin, note=note,
                                                        at=self._now()))
        return {"fab_hash": h, "approved": True, "admin": admin}

    def revoke(self, fab_hash: str, *, admin: str, note: str = "") -> dict:
        """Withdraw an approval; later runs of that bundle are refused."""
        h = check_hash(fab_hash)
        if not admin.strip():
            raise ValueError("a revocation needs the administrator's name (--admin)")
        with self.engine.begin() as conn:
            gone = conn.execute(self.approved.delete().where(self.approved.c.fab_hash == h)).rowcount
            if not gone:
                raise ValueError(f"FAB {h[:12]}... is not approved at this site; nothing to revoke")
            conn.execute(self.decisions.insert().values(fab_hash=h, action="revoke", admin=admin, note=note,
                                                        at=self._now()))
        return {"fab_hash": h, "approved": False, "admin": admin}

    def is_approved(self, fab_hash: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(self.approved.c.fab_hash)
                                .where(self.approved.c.fab_hash == fab_hash.lower())).first() is not None

    def list(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(self.approved).order_by(self.approved.c.at))]

    def log_refusal(self, *, run_id: str, fab_hash: str, fab_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.refusals.insert().values(run_id=run_id, fab_hash=fab_hash, fab_id=fab_id, at=self._now()))

    def refused(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(self.refusals).order_by(self.refusals.c.id))]

    def history(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(self.decisions).order_by(self.decisions.c.id))]

    def close(self) -> None:
        self.engine.dispose()
