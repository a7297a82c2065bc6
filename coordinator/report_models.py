"""Tables and API views of what sites report: report keys, drift, retraining requests and compliance self-checks.

Kept apart from models.py (which imports this module at its end) so both stay under 500 lines.
Every value here passed the egress guard: aggregates, enumerated reasons, names and hashes.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from .models import utcnow

# --------------------------------------------------------------------------- report keys


class SiteReportKeyBase(SQLModel):
    """A site's pinned Ed25519 report-signing key."""

    site_id: int = Field(foreign_key="site.id", primary_key=True)
    public_key: str = Field(max_length=64)  # raw 32 bytes, hex
    fingerprint: str = Field(max_length=64)  # sha256 of the raw key, hex


class SiteReportKey(SiteReportKeyBase, table=True):
    """The key the coordinator verifies a site's signed reports with (first registration wins)."""

    __tablename__ = "site_report_key"

    registered_at: datetime = Field(default_factory=utcnow)


class SiteReportKeyPublic(SiteReportKeyBase):
    """A report key as the API shows it."""

    site: str
    registered_at: datetime


# --------------------------------------------------------------------------- drift


class DriftReportBase(SQLModel):
    """One drift report of a site against its training reference (aggregates only)."""

    site_id: int = Field(foreign_key="site.id", index=True)
    site: str = Field(max_length=64, index=True)
    study_id: int | None = Field(default=None, foreign_key="study.id", index=True)
    reference_id: str = Field(max_length=128)
    reference_count: int
    current_count: int
    features_withheld: int = 0
    outcomes: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    flagged: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    signed: bool = False
    sent_at: datetime


class DriftReportRecord(DriftReportBase, table=True):
    """A stored drift report; its features are DriftFeatureStat rows."""

    __tablename__ = "drift_report"

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = Field(default_factory=utcnow, index=True)


class DriftReportPublic(DriftReportBase):
    """A drift report as the API shows it, with the retraining requests it raised."""

    id: int
    received_at: datetime
    retrain_requests: list[int] = []


class DriftFeatureBase(SQLModel):
    """Drift of one feature in one report, and whether it crossed a configured threshold."""

    site: str = Field(max_length=64, index=True)
    feature: str = Field(max_length=64, index=True)
    kind: str = Field(max_length=16)
    psi: float | None = None
    ks: float | None = None
    mmd: float | None = None
    missing_rate: float | None = None
    reference_missing_rate: float | None = None
    suppressed: bool = False
    cells: int = 0
    suppressed_cells: int = 0
    flagged: bool = False
    flags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # psi, ks, mmd
    sent_at: datetime


class DriftFeatureStat(DriftFeatureBase, table=True):
    """One feature's drift statistics in one stored report."""

    __tablename__ = "drift_feature"

    id: int | None = Field(default=None, primary_key=True)
    report_id: int = Field(foreign_key="drift_report.id", index=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    received_at: datetime = Field(default_factory=utcnow, index=True)


class DriftFeaturePublic(DriftFeatureBase):
    """A feature's drift as the API shows it (drift per site and feature over time)."""

    id: int
    report_id: int
    received_at: datetime


class RetrainStatus(str, Enum):
    """What became of a retraining request."""

    requested = "requested"
    launched = "launched"
    dismissed = "dismissed"


class RetrainRequestBase(SQLModel):
    """A study's retraining, requested because a site's drift crossed the configured thresholds."""

    study_id: int = Field(foreign_key="study.id", index=True)
    site_id: int = Field(foreign_key="site.id")
    report_id: int = Field(foreign_key="drift_report.id")
    reason: str = Field(max_length=512)
    features: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class RetrainRequest(RetrainRequestBase, table=True):
    """A stored retraining request (launching the run is the run dispatcher's business)."""

    __tablename__ = "retrain_request"

    id: int | None = Field(default=None, primary_key=True)
    status: RetrainStatus = Field(default=RetrainStatus.requested, index=True)
    run_id: int | None = Field(default=None, foreign_key="run.id")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class RetrainRequestUpdate(SQLModel):
    """What the run dispatcher records: launched (with its run) or dismissed."""

    status: RetrainStatus
    run_id: int | None = None


class RetrainRequestPublic(RetrainRequestBase):
    """A retraining request as the API shows it."""

    id: int
    status: RetrainStatus
    run_id: int | None
    created_at: datetime
    updated_at: datetime


# --------------------------------------------------------------------------- compliance


class ComplianceCheckBase(SQLModel):
    """A site's signed compliance self-check, as verified at intake."""

    site_id: int = Field(foreign_key="site.id", index=True)
    site: str = Field(max_length=64, index=True)
    passed: bool
    checks: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))  # {id, passed, reason}
    retention_days: int | None = None
    expired_data: bool | None = None
    epsilon_budget: float | None = None
    epsilon_spent: float | None = None
    approved_apps: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    key_fingerprint: str = Field(max_length=64)
    signature: str = Field(max_length=128)
    sent_at: datetime


class ComplianceCheck(ComplianceCheckBase, table=True):
    """A stored self-check with the exact document that was signed, so it can be verified again later."""

    __tablename__ = "compliance_check"

    id: int | None = Field(default=None, primary_key=True)
    document: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    received_at: datetime = Field(default_factory=utcnow, index=True)


class ComplianceCheckPublic(ComplianceCheckBase):
    """A self-check as the API shows it."""

    id: int
    received_at: datetime
