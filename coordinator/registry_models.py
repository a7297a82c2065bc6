"""Tables and API views of the model registry: site tokens, model versions, canary rollouts and reports.

Kept apart from models.py (which imports this module at its end) so both stay under 500 lines.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import field_validator
from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from .models import MAX_ID, NAME_PATTERN, utcnow

MAX_CANARY_SITES = 100


class ModelStatus(str, Enum):
    """Life cycle of a model version: registered → canary → promoted (→ retired) or rolled_back."""

    registered = "registered"
    canary = "canary"
    promoted = "promoted"
    rolled_back = "rolled_back"
    retired = "retired"


# --------------------------------------------------------------------------- site tokens


class SiteTokenBase(SQLModel):
    """Which site a token speaks for."""

    site_id: int = Field(foreign_key="site.id", index=True)


class SiteToken(SiteTokenBase, table=True):
    """A site's API token, stored as its sha256 (the token itself is shown once, when issued)."""

    __tablename__ = "site_token"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    hint: str = Field(max_length=16)  # the token's first characters, so an admin can tell tokens apart
    created_by: str
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class SiteTokenPublic(SiteTokenBase):
    """A site token as the API lists it (never the token or its hash)."""

    id: int
    hint: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


class SiteTokenIssued(SiteTokenPublic):
    """A newly issued token: the only time the secret is shown."""

    site: str
    token: str


# --------------------------------------------------------------------------- model versions


class Lineage(SQLModel):
    """Where a version comes from: study, run, rounds, sites, privacy spent, data and metrics."""

    study_id: int
    run_id: int | None = None
    run_keys: list[str] = []
    rounds: dict[str, int | None] = {}
    best_round: dict[str, int | None] = {}
    sites: list[str] = []
    epsilon_per_site: dict[str, float | None] = {}
    delta: float | None = None
    data_fingerprints: list[str] = []
    metrics: dict[str, dict[str, Any]] = {}


class ModelVersionBase(SQLModel):
    """Columns shared by the model version table and its views."""

    study_id: int = Field(foreign_key="study.id", index=True)
    run_id: int | None = Field(default=None, foreign_key="run.id")
    version: str = Field(max_length=16)  # v1, v2, ... within the study
    components: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))  # component -> kind
    manifest_sha256: str = Field(max_length=64, index=True)
    signature: str = Field(max_length=128)
    key_fingerprint: str = Field(max_length=80)


class ModelVersionCreate(SQLModel):
    """Form fields of an upload besides its files."""

    run_id: int | None = Field(default=None, ge=1, le=MAX_ID)


class ModelVersionUpdate(SQLModel):
    """A version's status change."""

    status: ModelStatus


class ModelVersion(ModelVersionBase, table=True):
    """One registered model version: manifest, signature, lineage, stored files and status."""

    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("study_id", "number"), UniqueConstraint("study_id", "manifest_sha256"))

    id: str = Field(primary_key=True, max_length=32)  # s<study>-v<n>: unique across studies, URL-safe
    number: int
    manifest: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    manifest_canonical: str = Field(sa_column=Column(Text, nullable=False))  # exactly the signed bytes
    files: dict[str, dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))  # name -> sha256, bytes, key
    lineage: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    status: ModelStatus = Field(default=ModelStatus.registered, index=True)
    previous_id: str | None = None  # the version this one replaced when promoted (the rollback target)
    created_by: str
    created_at: datetime = Field(default_factory=utcnow)
    promoted_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class ModelVersionPublic(ModelVersionBase):
    """A model version as the API shows it."""

    id: str
    number: int
    status: ModelStatus
    manifest: dict[str, Any]
    files: dict[str, dict[str, Any]]
    lineage: Lineage
    previous_id: str | None
    created_by: str
    created_at: datetime
    promoted_at: datetime | None
    updated_at: datetime


# --------------------------------------------------------------------------- canary rollouts


class RolloutBase(SQLModel):
    """Which sites get a candidate first, and how much worse than the current version it may be."""

    sites: list[str] = Field(sa_column=Column(JSON, nullable=False))
    margin: float | None = Field(default=None, ge=0, le=1)


class RolloutCreate(RolloutBase):
    """A canary to start; the margin defaults to the coordinator's canary_margin setting."""

    @field_validator("sites")
    @classmethod
    def _sites(cls, v: list[str]) -> list[str]:
        if not v or len(v) > MAX_CANARY_SITES or len(set(v)) != len(v):
            raise ValueError(f"list each canary site once (1 to {MAX_CANARY_SITES} site names)")
        bad = [s for s in v if not isinstance(s, str) or len(s) > 64 or not re.match(NAME_PATTERN, s)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a site name; list site names with GET /api/v1/sites")
        return v


class Rollout(RolloutBase, table=True):
    """One canary of a version: its sites, the margin, and the decision once every site reported."""

    __tablename__ = "rollout"

    id: int | None = Field(default=None, primary_key=True)
    margin: float = Field(ge=0, le=1)
    version_id: str = Field(foreign_key="model_version.id", index=True, max_length=32)
    study_id: int = Field(foreign_key="study.id", index=True)
    started_by: str
    started_at: datetime = Field(default_factory=utcnow)
    decided_at: datetime | None = None
    decision: str | None = None  # promoted | rolled_back
    decided_by: str | None = None  # "automatic" or the user who decided by hand
    summary: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class CanaryReportBase(SQLModel):
    """One canary site's validation of the candidate against the current version (aggregates only)."""

    site: str = Field(max_length=64)
    metric: str = Field(max_length=16)
    candidate: float
    current: float | None = None
    patients: int
    sent_at: datetime


class CanaryReport(CanaryReportBase, table=True):
    """A stored canary report; one per site and rollout."""

    __tablename__ = "canary_report"
    __table_args__ = (UniqueConstraint("rollout_id", "site"),)

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollout.id", index=True)
    received_at: datetime = Field(default_factory=utcnow)


class CanaryReportPublic(CanaryReportBase):
    """A canary report as the API shows it."""

    received_at: datetime


class RolloutPublic(SQLModel):
    """A rollout as the API shows it, with the reports received so far."""

    id: int
    version_id: str
    study_id: int
    sites: list[str]
    margin: float
    started_by: str
    started_at: datetime
    decided_at: datetime | None
    decision: str | None
    decided_by: str | None
    summary: dict[str, Any]
    reports: list[CanaryReportPublic] = []


class ModelVersionDetail(ModelVersionPublic):
    """One version with its rollouts, newest first."""

    rollouts: list[RolloutPublic] = []


class SiteAssignment(SQLModel):
    """The version a site should run now for one study, and why (canary or promoted)."""

    site: str
    study_id: int
    channel: str  # canary | promoted
    version_id: str
    manifest_sha256: str
    key_fingerprint: str
    download: str


class PublicKey(SQLModel):
    """The registry's signing key, for sites to pin."""

    algorithm: str
    public_key_pem: str
    fingerprint: str
