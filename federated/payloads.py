"""What a site may send to the coordinator: typed aggregate schemas, nothing else.

Every payload class derives from `SitePayload`: unknown fields are an error (extra="forbid"),
types are strict, strings are short labels from a closed vocabulary or names, and lists are
bounded, so a patient-level table cannot be smuggled in a field the schema did not foresee.
The coordinator validates every incoming body against these classes (its egress guard) and
audits what it rejects; sites build their reports with the same classes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_ITEMS = 512  # per list: features, bins, checks; far below any cohort size
MIN_COUNT = 10  # cells counting fewer patients are suppressed at the site
Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/ -]*$")]
Hex = Annotated[str, StringConstraints(min_length=16, max_length=128, pattern=r"^[0-9a-f]+$")]


class SitePayload(BaseModel):
    """Base of every site-to-coordinator payload: closed schema, strict types, bounded sizes."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    site: Name
    sent_at: datetime


class CanaryValidation(SitePayload):
    """A canary site's validation of a candidate model version against the current one, on its own data."""

    kind: Literal["canary_validation"] = "canary_validation"
    version_id: Name
    metric: Literal["c_index", "auroc", "r2"]
    candidate: float = Field(allow_inf_nan=False)
    current: float | None = Field(None, allow_inf_nan=False)
    patients: int = Field(ge=MIN_COUNT, description="patients evaluated (at least MIN_COUNT, else not reported)")
    signature: Hex | None = Field(None, description="the site's Ed25519 signature over the canonical JSON "
                                                    "of the other fields, when the site signs its reports")
