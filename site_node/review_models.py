"""Tables and API models of the clinician review of generated twins (the workflow is in review.py)."""

from __future__ import annotations

import json
from datetime import datetime
from enum import Enum
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from pydantic import Field as PField
from sqlmodel import Column, Field, SQLModel


class ReviewStatus(str, Enum):
    """Where a twin is in the review."""

    pending = "pending"
    approved = "approved"
    rejected = "rejected"


class RejectReason(str, Enum):
    """Why a clinician rejects a twin (a controlled list; each maps to a regeneration constraint)."""

    implausible_trajectory = "implausible_trajectory"
    contradicts_history = "contradicts_history"
    wrong_dose_or_timing = "wrong_dose_or_timing"
    lab_out_of_range = "lab_out_of_range"
    other = "other"


class TwinReviewBase(SQLModel):
    """A generated twin awaiting (or after) review: which patient, model, arm, and how the gate scored it."""

    study: str | None = Field(default=None, max_length=64, index=True)
    pseudonym: str = Field(max_length=64, index=True)
    model_version: str = Field(max_length=64)
    arm: str = Field(max_length=16)
    quality: float
    copy_index: int = 0


class TwinReviewCreate(TwinReviewBase):
    """A twin to queue: its generated events ([time, code, value, unit], days after index) and outcome."""

    events: list[list[Any]]
    outcome: dict[str, Any]
    parent_id: int | None = None


class TwinReview(TwinReviewBase, table=True):
    """One queued twin and its verdict; the twin itself (events and outcome) is sealed with a data key.

    `twin_sealed` is AES-256-GCM of {"events": [...], "outcome": {...}} under the batch's data
    key (`data_key`, wrapped by the site's master key), bound to the pseudonym; `twin_json` is
    only set on rows from before encryption until the store seals them (review.seal_legacy_reviews).
    """

    __tablename__ = "twin_review"

    id: int | None = Field(default=None, primary_key=True)
    data_key_id: int | None = Field(default=None, foreign_key="data_key.id")
    twin_sealed: bytes | None = Field(default=None, sa_column=Column(sa.LargeBinary, nullable=True))
    twin_json: str | None = Field(default=None, sa_column=Column(sa.Text, nullable=True))  # legacy plaintext
    status: str = Field(default=ReviewStatus.pending.value, max_length=16, index=True)
    reason: str | None = Field(default=None, max_length=32)
    note: str = Field(default="", sa_column=Column(sa.Text, nullable=False, server_default=""))  # scrubbed
    annotations: str = Field(default="[]", sa_column=Column(sa.Text, nullable=False, server_default="[]"))
    reviewer: str | None = Field(default=None, max_length=128)
    reviewed_at: datetime | None = Field(default=None, sa_column=Column(sa.DateTime(timezone=True), nullable=True))
    parent_id: int | None = Field(default=None, foreign_key="twin_review.id")
    created_at: datetime = Field(sa_column=Column(sa.DateTime(timezone=True), nullable=False))


class AnnotationPublic(BaseModel):
    """A reviewer's note on a twin (scrubbed of identifiers before it is stored)."""

    by: str
    at: str
    text: str


class TwinReviewPublic(TwinReviewBase):
    """A queued or reviewed twin as the API shows it."""

    id: int
    status: ReviewStatus
    events: list[list[Any]]
    outcome: dict[str, Any]
    reason: str | None
    note: str
    annotations: list[AnnotationPublic]
    reviewer: str | None
    reviewed_at: datetime | None
    parent_id: int | None
    created_at: datetime


class ReviewQueuePublic(BaseModel):
    """A page of the review queue."""

    items: list[TwinReviewPublic]
    count: int


class RejectRequest(BaseModel):
    """A rejection: a reason from the controlled list and optional free text (scrubbed before storing)."""

    reason: RejectReason
    text: str = PField("", max_length=2000)
    regenerate: bool = True


class AnnotateRequest(BaseModel):
    """A note on a twin without a verdict."""

    text: str = PField(min_length=1, max_length=2000)


class DecisionPublic(BaseModel):
    """The reviewed twin, and the regenerated twin queued in its place after a rejection (if one passed the gate)."""

    review: TwinReviewPublic
    regenerated: TwinReviewPublic | None = None
    regeneration: str | None = None  # why none was queued (no model, the gate refused every try)


def public(row: TwinReview, twin: dict[str, Any]) -> TwinReviewPublic:
    """The API view of a review row and its opened twin (review.open_twins)."""
    return TwinReviewPublic(id=row.id, study=row.study, pseudonym=row.pseudonym, model_version=row.model_version,
                            arm=row.arm, quality=row.quality, copy_index=row.copy_index,
                            status=ReviewStatus(row.status), events=twin["events"], outcome=twin["outcome"],
                            reason=row.reason, note=row.note,
                            annotations=[AnnotationPublic(**a) for a in json.loads(row.annotations)],
                            reviewer=row.reviewer, reviewed_at=row.reviewed_at, parent_id=row.parent_id,
                            created_at=row.created_at)
