"""The coordinator's tables and their API views: a Base/Create/Update/table/Public family per entity.

Nothing here holds a patient-level value: sites, studies, runs, aggregate metrics, the audit trail.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import field_validator, model_validator
from sqlalchemy import JSON, BigInteger, Column, Text
from sqlmodel import Field, SQLModel

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_ID = 2**31 - 1  # ids are 32-bit integer columns on PostgreSQL


def utcnow() -> datetime:
    """Timezone-aware now (UTC)."""
    return datetime.now(timezone.utc)


class Role(str, Enum):
    """What a user may do: sponsors run studies, auditors read, admins manage sites and users."""

    sponsor = "sponsor"
    auditor = "auditor"
    admin = "admin"


class SiteStatus(str, Enum):
    """Enrolment state of a site."""

    pending = "pending"
    active = "active"
    revoked = "revoked"


class StudyStatus(str, Enum):
    """Life cycle of a study."""

    draft = "draft"
    active = "active"
    paused = "paused"
    closed = "closed"


class RunStatus(str, Enum):
    """Life cycle of a federated run."""

    pending = "pending"
    running = "running"
    finished = "finished"
    failed = "failed"
    stopped = "stopped"


# --------------------------------------------------------------------------- users


class UserBase(SQLModel):
    """Columns shared by the user table and its views."""

    username: str = Field(min_length=1, max_length=64, schema_extra={"pattern": NAME_PATTERN}, index=True, unique=True)
    role: Role


class UserCreate(UserBase):
    """A new user with a password."""

    password: str = Field(min_length=12, max_length=256)


class UserUpdate(SQLModel):
    """Changes to a user."""

    role: Role | None = None
    password: str | None = Field(default=None, min_length=12, max_length=256)
    disabled: bool | None = None


class User(UserBase, table=True):
    """A person who talks to the coordinator's API."""

    __tablename__ = "coord_user"

    id: int | None = Field(default=None, primary_key=True)
    password_hash: str
    disabled: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class UserPublic(UserBase):
    """A user as the API shows it (never the hash)."""

    id: int
    disabled: bool
    created_at: datetime


# --------------------------------------------------------------------------- sites


class SiteBase(SQLModel):
    """Columns shared by the site table and its views."""

    name: str = Field(min_length=1, max_length=64, schema_extra={"pattern": NAME_PATTERN}, index=True, unique=True)


class SiteCreate(SiteBase):
    """An enrolment request: the site's name, a PEM CSR and its SuperNode OpenSSH public key."""

    csr_pem: str = Field(min_length=1, max_length=16384)
    supernode_public_key: str = Field(min_length=1, max_length=4096)


class SiteUpdate(SQLModel):
    """Admin changes to a site."""

    status: SiteStatus | None = None


class Site(SiteBase, table=True):
    """An enrolled (or enrolling, or revoked) hospital."""

    __tablename__ = "site"

    id: int | None = Field(default=None, primary_key=True)
    status: SiteStatus = Field(default=SiteStatus.pending, index=True)
    csr_pem: str = Field(sa_column=Column(Text, nullable=False))
    supernode_public_key: str = Field(sa_column=Column(Text, nullable=False))
    supernode_fingerprint: str
    certificate_pem: str | None = Field(default=None, sa_column=Column(Text))
    certificate_serial: str | None = None
    certificate_fingerprint: str | None = None
    certificate_not_after: datetime | None = None
    requested_at: datetime = Field(default_factory=utcnow)
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = None


class SitePublic(SiteBase):
    """A site as the API shows it."""

    id: int
    status: SiteStatus
    supernode_fingerprint: str
    certificate_serial: str | None
    certificate_fingerprint: str | None
    certificate_not_after: datetime | None
    requested_at: datetime
    enrolled_at: datetime | None
    revoked_at: datetime | None


class SiteCertificate(SQLModel):
    """An accepted site's certificate and the study CA that issued it."""

    site: str
    certificate_pem: str
    ca_pem: str
    not_after: datetime


# --------------------------------------------------------------------------- studies


class StudyBase(SQLModel):
    """Trial metadata shared by the study table and its views."""

    name: str = Field(min_length=1, max_length=128, index=True, unique=True)
    indication: str = Field(min_length=1, max_length=256)
    phase: str = Field(min_length=1, max_length=16, schema_extra={"pattern": r"^(0|I|II|III|IV|I/II|II/III|1|2|3|4)$"})
    arms: list[str] = Field(sa_column=Column(JSON, nullable=False))
    endpoints: list[str] = Field(sa_column=Column(JSON, nullable=False))
    inclusion_criteria: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    target_epsilon: float
    target_delta: float
    site_ids: list[int] = Field(sa_column=Column(JSON, nullable=False))


class StudyCreate(StudyBase):
    """A new study; every listed site must be active."""

    @field_validator("arms")
    @classmethod
    def _two_arms(cls, v: list[str]) -> list[str]:
        if len(v) != 2 or len({a.strip() for a in v}) != 2 or not all(a.strip() for a in v):
            raise ValueError("a study has exactly two distinct, non-empty arms, e.g. [\"control\", \"treatment\"]")
        return [a.strip() for a in v]

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        if not v or not all(isinstance(e, str) and e.strip() for e in v) or len(v) > 32:
            raise ValueError("a study needs 1 to 32 non-empty endpoint names")
        return [e.strip() for e in v]

    @field_validator("inclusion_criteria")
    @classmethod
    def _criteria(cls, v: list[str]) -> list[str]:
        if len(v) > 100 or any(len(c) > 1000 for c in v):
            raise ValueError("at most 100 inclusion criteria of at most 1000 characters each")
        return v

    @field_validator("site_ids")
    @classmethod
    def _sites(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or len(v) > 1000:
            raise ValueError("site_ids lists each participating site once (at least one)")
        if any(not 1 <= i <= MAX_ID for i in v):
            raise ValueError(f"site ids are between 1 and {MAX_ID}; list sites with GET /api/v1/sites")
        return v

    @model_validator(mode="after")
    def _privacy(self) -> StudyCreate:
        if not 0 < self.target_epsilon <= 100:
            raise ValueError(f"target_epsilon must be > 0 (and at most 100), got {self.target_epsilon}")
        if not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be between 0 and 1 (exclusive), got {self.target_delta}")
        return self


class StudyUpdate(SQLModel):
    """A study's status change."""

    status: StudyStatus


class Study(StudyBase, table=True):
    """A trial the sponsor runs across sites."""

    __tablename__ = "study"

    id: int | None = Field(default=None, primary_key=True)
    status: StudyStatus = Field(default=StudyStatus.draft, index=True)
    created_by: str
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class StudyPublic(StudyBase):
    """A study as the API shows it."""

    id: int
    status: StudyStatus
    created_by: str
    created_at: datetime
    updated_at: datetime


# --------------------------------------------------------------------------- runs and round metrics


class RunBase(SQLModel):
    """Columns shared by the run table and its views."""

    study_id: int = Field(foreign_key="study.id", index=True)
    rounds: int = Field(ge=1, le=10000)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class RunCreate(RunBase):
    """A run to launch."""


class RunUpdate(SQLModel):
    """A run's status change."""

    status: RunStatus | None = None
    flower_run_id: str | None = None


class Run(RunBase, table=True):
    """One federated training run of a study."""

    __tablename__ = "run"

    id: int | None = Field(default=None, primary_key=True)
    flower_run_id: str | None = Field(default=None, index=True)
    status: RunStatus = Field(default=RunStatus.pending, index=True)
    created_by: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None


class RunPublic(RunBase):
    """A run as the API shows it."""

    id: int
    flower_run_id: str | None
    status: RunStatus
    created_by: str
    started_at: datetime | None
    finished_at: datetime | None


class RoundMetricBase(SQLModel):
    """Aggregate metrics of one site in one round (never a patient-level value)."""

    run_id: int = Field(foreign_key="run.id", index=True)
    round: int = Field(ge=0)
    site_id: int | None = Field(default=None, foreign_key="site.id")  # None: the aggregate over sites
    metrics: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    epsilon: float | None = Field(default=None, ge=0)


class RoundMetricCreate(RoundMetricBase):
    """A round metric to record."""


class RoundMetric(RoundMetricBase, table=True):
    """One stored round metric."""

    __tablename__ = "round_metric"

    id: int | None = Field(default=None, primary_key=True)
    recorded_at: datetime = Field(default_factory=utcnow)


class RoundMetricPublic(RoundMetricBase):
    """A round metric as the API shows it."""

    id: int
    recorded_at: datetime


# --------------------------------------------------------------------------- audit


class AuditEventBase(SQLModel):
    """What happened, who did it, and how it ended (never a request body)."""

    actor: str = ""
    role: str = ""
    action: str
    resource: str = ""
    outcome: str
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    request_id: str = ""


class AuditEventCreate(AuditEventBase):
    """An event to append."""


class AuditEvent(AuditEventBase, table=True):
    """One link of the hash chain: hash = sha256(prev_hash + canonical JSON of the entry)."""

    __tablename__ = "audit_event"

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    at: datetime
    prev_hash: str
    hash: str = Field(unique=True)


class AuditEventPublic(AuditEventBase):
    """An audit event as the API shows it."""

    seq: int
    at: datetime
    prev_hash: str
    hash: str


class RefreshToken(SQLModel, table=True):
    """An issued refresh token, by jti: each may be used once (rotation); reuse revokes the user's others."""

    __tablename__ = "refresh_token"

    jti: str = Field(primary_key=True, max_length=64)
    username: str = Field(index=True)
    expires_at: datetime
    used_at: datetime | None = None
    revoked: bool = False


class TokenPair(SQLModel):
    """Bearer tokens returned by the auth endpoints."""

    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int


class Message(SQLModel):
    """A one-line answer."""

    detail: str


from . import registry_models  # noqa: E402,F401  (the model registry's tables, in their own module for size)


from . import report_models  # noqa: E402,F401  (registers the site report tables: drift, compliance, report keys)
