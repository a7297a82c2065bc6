"""What a site may send to the coordinator: typed aggregate schemas, nothing else.

Every payload class derives from `SitePayload`: unknown fields are an error (extra="forbid"),
types are strict, strings are short labels from a closed vocabulary or names, and lists are
bounded, so a patient-level table cannot be smuggled in a field the schema did not foresee.
The coordinator validates every incoming body against these classes (its egress guard) and
audits what it rejects; sites build their reports with the same classes.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from evoclone.privacy.scrub import PATTERNS

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


# --------------------------------------------------------------------------- identifiers and signatures

Hex64 = Annotated[str, StringConstraints(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]
Signature = Annotated[str, StringConstraints(min_length=128, max_length=128, pattern=r"^[0-9a-f]{128}$")]

# The structured identifiers of the free-text scrubber, minus ZIP codes and ages (a LOINC code such as
# 13457-7 reads like a ZIP), plus record-number keywords: what no aggregate label ever needs to contain.
_SCRUB_KINDS = {"[EMAIL]": "email", "[URL]": "url", "[IP]": "ip address", "[DATE]": "date", "[SSN]": "ssn",
                "[PHONE]": "phone number", "[ADDRESS]": "street address", "[ID]": "record number",
                "[NAME]": "titled name"}
_KEYWORDS = tuple((kind, re.compile(rf"(?<![A-Za-z0-9])(?:{words})(?![A-Za-z0-9])", re.IGNORECASE)) for kind, words in (
    ("medical record number", r"mrn|medical[ _-]?record|patient[ _-]?(?:id|number)"),
    ("ssn", r"ssn|social[ _-]?security"),
    ("date of birth", r"dob|date[ _-]?of[ _-]?birth|birth[ _-]?date"),
    ("name", r"patient[ _-]?name|full[ _-]?name|first[ _-]?name|last[ _-]?name|surname"),
))


def identifier_kind(text: str) -> str | None:
    """What kind of identifier `text` looks like (an email, a date, an MRN, ...), or None; never the match itself."""
    for kind, pattern in _KEYWORDS:
        if pattern.search(text):
            return kind
    for marker, pattern in PATTERNS:
        kind = _SCRUB_KINDS.get(marker)
        if kind is not None and pattern.search(text):
            return kind
    return None


def canonical_bytes(payload: SitePayload) -> bytes:
    """What a site signs: the payload's JSON without its signature, sorted keys, no whitespace, ASCII."""
    doc = payload.model_dump(mode="json", exclude={"signature"})
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def round_count(n: int) -> int:
    """A patient count rounded to tens (half up), as counts leave a site."""
    if n < 0:
        raise ValueError(f"a count cannot be negative, got {n}")
    return (int(n) + 5) // 10 * 10


class _Part(BaseModel):
    """A nested part of a payload: as closed, strict and immutable as the payload itself."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ReportKeyRegistration(SitePayload):
    """The site's Ed25519 report-signing public key (raw 32 bytes, hex); the first registration is pinned."""

    kind: Literal["report_key"] = "report_key"
    public_key: Hex64


# --------------------------------------------------------------------------- drift

FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=64,
                                               pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")]
Rate = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class DriftFeature(_Part):
    """Drift of one feature between the site's training reference and its current data.

    Statistics are None when `suppressed` (fewer than MIN_COUNT observed patients in either sample);
    a missing rate is None when its missing or present cell counts 1 to MIN_COUNT - 1 patients.
    """

    name: FeatureName
    kind: Literal["numeric", "categorical"]
    psi: float | None = Field(None, ge=0, le=100, allow_inf_nan=False,
                              description="population stability index over the reference's decile bins "
                                          "(numeric) or its levels (categorical), small cells merged")
    ks: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="Kolmogorov-Smirnov statistic")
    mmd: float | None = Field(None, ge=0, le=2, allow_inf_nan=False,
                              description="squared MMD, RBF kernel with the median-distance bandwidth")
    missing_rate: Rate | None = None
    reference_missing_rate: Rate | None = None
    suppressed: bool = False
    cells: int = Field(0, ge=0, le=64, description="cells the PSI was computed over, after merging small ones")
    suppressed_cells: int = Field(0, ge=0, le=MAX_ITEMS, description="cells merged because they counted 1 to "
                                                                     "MIN_COUNT - 1 patients")


class OutcomeRate(_Part):
    """An outcome's rate in the reference and now; None when a cell counts 1 to MIN_COUNT - 1 patients."""

    name: Literal["binary", "event"]
    reference: Rate | None = None
    current: Rate | None = None
    suppressed: bool = False


class DriftReport(SitePayload):
    """A site's drift against its training reference: per-feature aggregates only, small cells suppressed."""

    kind: Literal["drift_report"] = "drift_report"
    study_id: int | None = Field(None, ge=1, le=2**31 - 1)
    reference_id: Hex
    reference_count: int = Field(ge=0, le=10**8, multiple_of=10, description="patients, rounded to tens")
    current_count: int = Field(ge=0, le=10**8, multiple_of=10, description="patients, rounded to tens")
    features: tuple[DriftFeature, ...] = Field(max_length=MAX_ITEMS)
    outcomes: tuple[OutcomeRate, ...] = Field((), max_length=2)
    features_withheld: int = Field(0, ge=0, le=10_000, description="features left out because their name reads "
                                                                   "like an identifier or breaks the name rules")
    key_fingerprint: Hex64 | None = None
    signature: Signature | None = None

    @model_validator(mode="after")
    def _unique(self) -> DriftReport:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("features: each feature is reported once")
        if len({o.name for o in self.outcomes}) != len(self.outcomes):
            raise ValueError("outcomes: each outcome is reported once")
        return self


# --------------------------------------------------------------------------- compliance

CheckId = Literal["encryption_at_rest", "transport_tls", "privacy_budget", "audit_chain", "retention",
                  "approved_apps"]
CHECK_IDS: tuple[str, ...] = get_args(CheckId)
CheckReason = Literal[
    "ok",
    "no_records",  # nothing to verify yet (no charges, no data): passes
    "keyring_missing", "key_file_exposed", "unwrapped_rows", "file_exposed",  # encryption at rest
    "not_configured", "plaintext_url", "ca_missing", "ca_invalid",  # TLS and retention
    "budget_exceeded", "budget_changed",  # privacy budget
    "ledger_inconsistent",  # audit chain
    "expired_data_present",  # retention
    "none_approved", "approval_log_inconsistent",  # approved apps
    "check_failed",  # the check itself could not run (a store unreachable, ...)
]


class CheckResult(_Part):
    """One self-check: its id, pass or fail, and why, from a closed vocabulary."""

    id: CheckId
    passed: bool
    reason: CheckReason


class ComplianceSelfCheck(SitePayload):
    """A site's signed compliance self-check: a closed list of checks and the facts they rest on."""

    kind: Literal["compliance_self_check"] = "compliance_self_check"
    checks: tuple[CheckResult, ...] = Field(min_length=len(CHECK_IDS), max_length=len(CHECK_IDS))
    retention_days: int | None = Field(None, ge=1, le=36_500)
    expired_data: bool | None = None
    epsilon_budget: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    epsilon_spent: float | None = Field(None, ge=0, le=1000, allow_inf_nan=False)
    approved_apps: tuple[Hex64, ...] = Field((), max_length=64)
    key_fingerprint: Hex64
    signature: Signature

    @model_validator(mode="after")
    def _every_check_once(self) -> ComplianceSelfCheck:
        if sorted(c.id for c in self.checks) != sorted(CHECK_IDS):
            raise ValueError(f"checks: report each of {', '.join(CHECK_IDS)} exactly once")
        return self
