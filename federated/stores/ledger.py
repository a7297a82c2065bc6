"""A site's privacy ledger in its transactional database (SQLite by default, PostgreSQL in production).

The budget (epsilon, delta, accountant) is written once, when the ledger is first opened,
and every later open must agree with it: changing a budget is not something a node
config can do. Each charge is one row keyed by (run, round) and is written in the same
transaction that checks it against the budget, so a round retried after a crash or a
re-sent message is charged once, and two processes cannot both spend the last of the
budget. Spent epsilon is always recomputed from every stored charge by the Opacus
accountant (`privacy.accounting`).
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa

from evoclone.privacy.accounting import LedgerEntry, PrivacyLedger

from . import create_tables


class LedgerMismatchError(ValueError):
    """The ledger's stored budget differs from the one the caller expects."""


class SqlLedgerStore:
    """Budget, charges and per-run noise plans of one site."""

    def __init__(self, *, url: str) -> None:
        self.engine = sa.create_engine(url)
        meta = sa.MetaData()
        self.budget = sa.Table(
            "privacy_budget", meta, sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("epsilon_budget", sa.Float, nullable=False), sa.Column("delta", sa.Float, nullable=False),
            sa.Column("accountant", sa.String(16), nullable=False), sa.Column("created_at", sa.String(40), nullable=False))
        self.charges = sa.Table(
            "privacy_charge", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("run_id", sa.String(64), nullable=False), sa.Column("round", sa.Integer, nullable=False),
            sa.Column("noise_multiplier", sa.Float, nullable=False), sa.Column("sample_rate", sa.Float, nullable=False),
            sa.Column("steps", sa.Integer, nullable=False), sa.Column("epsilon_after", sa.Float, nullable=False),
            sa.Column("at", sa.String(40), nullable=False), sa.UniqueConstraint("run_id", "round"))
        self.plans = sa.Table(
            "privacy_plan", meta, sa.Column("run_id", sa.String(64), primary_key=True),
            sa.Column("noise_multiplier", sa.Float, nullable=False))
        self.audit = sa.Table(
            "privacy_admin_log", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("at", sa.String(40), nullable=False), sa.Column("action", sa.String(32), nullable=False),
            sa.Column("admin", sa.String(128), nullable=False), sa.Column("reason", sa.Text, nullable=False),
            sa.Column("before", sa.JSON, nullable=False))
        create_tables(meta, self.engine)

    def open(self, *, epsilon_budget: float, delta: float, accountant: str = "rdp") -> PrivacyLedger:
        """The ledger with every stored charge; the first open records the budget."""
        PrivacyLedger(epsilon_budget=epsilon_budget, delta=delta, accountant=accountant)  # validates early
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(self.budget).where(self.budget.c.id == 1)).first()
            if row is None:
                conn.execute(self.budget.insert().values(
                    id=1, epsilon_budget=float(epsilon_budget), delta=float(delta), accountant=accountant,
                    created_at=datetime.now(timezone.utc).isoformat()))
            elif (row.epsilon_budget, row.delta, row.accountant) != (float(epsilon_budget), float(delta), accountant):
                raise LedgerMismatchError(
                    f"the site's privacy ledger holds budget epsilon={row.epsilon_budget}, delta={row.delta} "
                    f"({row.accountant}) but epsilon={epsilon_budget}, delta={delta} ({accountant}) was configured; "
                    "a budget is fixed once spending starts: restore the site settings")
            return self._ledger(conn)

    def stored(self) -> PrivacyLedger | None:
        """The ledger as stored (its own budget), or None before the first open."""
        with self.engine.connect() as conn:
            if conn.execute(sa.select(self.budget)).first() is None:
                return None
            return self._ledger(conn)

    def _ledger(self, conn, *, lock: bool = False) -> PrivacyLedger:
        q = sa.select(self.budget).where(self.budget.c.id == 1)
        # PostgreSQL: the budget row lock serialises concurrent charges (SQLite locks the file on write)
        b = conn.execute(q.with_for_update() if lock else q).one()
        ledger = PrivacyLedger(epsilon_budget=b.epsilon_budget, delta=b.delta, accountant=b.accountant)
        rows = conn.execute(sa.select(self.charges).order_by(self.charges.c.id)).all()
        ledger.entries = [LedgerEntry(run_id=r.run_id, round=r.round, noise_multiplier=r.noise_multiplier,
                                      sample_rate=r.sample_rate, steps=r.steps) for r in rows]
        return ledger

    def charge(self, entry: LedgerEntry) -> float:
        """Record a round's spend once; returns epsilon spent after it.

        A (run, round) already charged is not charged again (its total is returned); a
        charge that would exceed the budget raises ValueError and writes nothing.
        """
        with self.engine.begin() as conn:
            ledger = self._ledger(conn, lock=True)
            if any(e.run_id == entry.run_id and e.round == entry.round for e in ledger.entries):
                return ledger.spent()
            spent = ledger.charge(entry)  # raises when it does not fit
            conn.execute(self.charges.insert().values(
                run_id=entry.run_id, round=entry.round, noise_multiplier=entry.noise_multiplier,
                sample_rate=entry.sample_rate, steps=entry.steps, epsilon_after=spent,
                at=datetime.now(timezone.utc).isoformat()))
            return spent

    def plan(self, *, run_id: str) -> float | None:
        """The noise multiplier fixed for a run's rounds, if planned."""
        with self.engine.connect() as conn:
            v = conn.execute(sa.select(self.plans.c.noise_multiplier).where(self.plans.c.run_id == run_id)).scalar()
        return None if v is None else float(v)

    def set_plan(self, *, run_id: str, noise_multiplier: float) -> float:
        """Fix a run's noise multiplier (the first plan wins, so a restarted node keeps it)."""
        with self.engine.begin() as conn:
            v = conn.execute(sa.select(self.plans.c.noise_multiplier).where(self.plans.c.run_id == run_id)).scalar()
            if v is not None:
                return float(v)
            conn.execute(self.plans.insert().values(run_id=run_id, noise_multiplier=float(noise_multiplier)))
            return float(noise_multiplier)

    def reset(self, *, admin: str, reason: str) -> dict:
        """Clear the budget, charges and plans, keeping an audit row with everything cleared.

        The only way to spend a budget again: a site administrator's decision (a new
        dataset, say), named and justified; the audit log itself is never cleared.
        """
        if not admin.strip() or not reason.strip():
            raise ValueError("a ledger reset needs the administrator's name and a reason")
        before = self.summary()
        with self.engine.begin() as conn:
            conn.execute(self.audit.insert().values(at=datetime.now(timezone.utc).isoformat(), action="reset",
                                                    admin=admin.strip(), reason=reason.strip(), before=before))
            conn.execute(self.charges.delete())
            conn.execute(self.plans.delete())
            conn.execute(self.budget.delete())
        return before

    def audit_log(self) -> list[dict]:
        """Every administrative action on the ledger, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.audit).order_by(self.audit.c.id)).all()
        return [{"at": r.at, "action": r.action, "admin": r.admin, "reason": r.reason, "before": r.before}
                for r in rows]

    def summary(self) -> dict:
        """Budget, spent, remaining and the charges (for `evoclone site budget`)."""
        with self.engine.connect() as conn:
            if conn.execute(sa.select(self.budget)).first() is None:
                return {"epsilon_budget": None, "delta": None, "accountant": None, "epsilon_spent": 0.0,
                        "epsilon_remaining": None, "charges": []}
            ledger = self._ledger(conn)
            rows = conn.execute(sa.select(self.charges).order_by(self.charges.c.id)).all()
        return {"epsilon_budget": ledger.epsilon_budget, "delta": ledger.delta, "accountant": ledger.accountant,
                "epsilon_spent": round(ledger.spent(), 6), "epsilon_remaining": round(ledger.remaining(), 6),
                "charges": [{"run_id": r.run_id, "round": r.round, "noise_multiplier": r.noise_multiplier,
                             "sample_rate": r.sample_rate, "steps": r.steps, "epsilon_after": round(r.epsilon_after, 6),
                             "at": r.at} for r in rows]}

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()
