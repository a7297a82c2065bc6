"""Site report keys, stored compliance self-checks, and the audit report mapped to HIPAA, GDPR and 21 CFR Part 11.

The report takes each active site's latest self-check (re-verifying its signature with the pinned
key) and the coordinator's own controls (its audit chain, role-based access, TLS, the egress guard),
and maps them to the safeguards and articles they are evidence for. A requirement is met when
every piece of evidence passes, not met when one fails, and lacks evidence otherwise (a site that
never reported, or whose latest self-check is older than `compliance_max_age_days`).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel
from sqlmodel import Session, select

from evoclone.federated.payloads import CHECK_IDS, ComplianceSelfCheck

from .audit import verify_stored_chain
from .egress import EgressRejected, verify_signature
from .errors import Conflict, NotFound
from .models import Site, SiteStatus, User
from .report_models import ComplianceCheck, SiteReportKey
from .settings import CoordinatorSettings

Status = Literal["pass", "fail", "no_evidence"]
COORDINATOR_CONTROLS = ("coordinator_audit_chain", "role_based_access", "coordinator_tls", "egress_guard",
                        "signed_self_checks")
# (framework, reference, title, evidence): site check ids and coordinator controls
REQUIREMENTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("HIPAA Security Rule", "164.308(a)(1)(ii)(B)", "Risk management", ("privacy_budget", "approved_apps",
                                                                         "egress_guard")),
    ("HIPAA Security Rule", "164.312(a)(1)", "Access control", ("role_based_access", "approved_apps")),
    ("HIPAA Security Rule", "164.312(a)(2)(iv)", "Encryption and decryption", ("encryption_at_rest",)),
    ("HIPAA Security Rule", "164.312(b)", "Audit controls", ("audit_chain", "coordinator_audit_chain")),
    ("HIPAA Security Rule", "164.312(c)(1)", "Integrity", ("audit_chain", "signed_self_checks")),
    ("HIPAA Security Rule", "164.312(d)", "Person or entity authentication", ("role_based_access",
                                                                             "signed_self_checks")),
    ("HIPAA Security Rule", "164.312(e)(1)", "Transmission security", ("transport_tls", "coordinator_tls")),
    ("GDPR", "Art. 5(1)(c)", "Data minimisation", ("privacy_budget", "egress_guard")),
    ("GDPR", "Art. 5(1)(e)", "Storage limitation", ("retention",)),
    ("GDPR", "Art. 5(1)(f)", "Integrity and confidentiality", ("encryption_at_rest", "transport_tls")),
    ("GDPR", "Art. 5(2)", "Accountability", ("audit_chain", "coordinator_audit_chain", "signed_self_checks")),
    ("GDPR", "Art. 25", "Data protection by design and by default", ("egress_guard", "privacy_budget",
                                                                     "encryption_at_rest")),
    ("GDPR", "Art. 30", "Records of processing activities", ("coordinator_audit_chain", "audit_chain",
                                                             "retention")),
    ("GDPR", "Art. 32", "Security of processing", ("encryption_at_rest", "transport_tls", "coordinator_tls",
                                                   "approved_apps")),
    ("FDA 21 CFR Part 11", "11.10(d)", "Limiting system access to authorized individuals", ("role_based_access",
                                                                                          "approved_apps")),
    ("FDA 21 CFR Part 11", "11.10(e)", "Audit trails", ("coordinator_audit_chain", "audit_chain")),
    ("FDA 21 CFR Part 11", "11.50", "Signature manifestations", ("signed_self_checks",)),
    ("FDA 21 CFR Part 11", "11.70", "Signature/record linking", ("signed_self_checks",)),
)


# --------------------------------------------------------------------------- report keys


def fingerprint(public_key_hex: str) -> str:
    """sha256 of a raw public key, hex."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()


def register_report_key(*, session: Session, site: Site, public_key: str) -> tuple[SiteReportKey, bool]:
    """Pin a site's report key (first registration wins); (row, created). Conflict for a different key."""
    row = session.get(SiteReportKey, site.id)
    if row is not None:
        if row.public_key != public_key:
            raise Conflict(f"site {site.name!r} already has report key {row.fingerprint[:16]}...; an admin removes "
                           f"it with DELETE /api/v1/sites/{site.id}/report-key before another can be registered")
        return row, False
    row = SiteReportKey(site_id=site.id, public_key=public_key, fingerprint=fingerprint(public_key))
    session.add(row)
    session.flush()
    return row, True


def get_report_key(*, session: Session, site_id: int) -> SiteReportKey | None:
    """The pinned report key of a site, if any."""
    return session.get(SiteReportKey, site_id)


def remove_report_key(*, session: Session, site_id: int) -> SiteReportKey:
    """Unpin a site's report key (the next registration pins a new one); NotFound when none is pinned."""
    row = session.get(SiteReportKey, site_id)
    if row is None:
        raise NotFound(f"site {site_id} has no registered report key; the site registers one with "
                       "PUT /api/v1/reports/key")
    session.delete(row)
    session.flush()
    return row


# --------------------------------------------------------------------------- self-checks


def store_self_check(*, session: Session, site: Site, check: ComplianceSelfCheck) -> ComplianceCheck:
    """Store a self-check whose signature the caller verified, with the signed document itself."""
    row = ComplianceCheck(site_id=site.id, site=site.name, passed=all(c.passed for c in check.checks),
                          checks=[c.model_dump(mode="json") for c in check.checks], retention_days=check.retention_days,
                          expired_data=check.expired_data, epsilon_budget=check.epsilon_budget,
                          epsilon_spent=check.epsilon_spent, approved_apps=list(check.approved_apps),
                          key_fingerprint=check.key_fingerprint, signature=check.signature, sent_at=check.sent_at,
                          document=check.model_dump(mode="json"))
    session.add(row)
    session.flush()
    return row


def list_self_checks(*, session: Session, site: str | None = None, limit: int = 100) -> list[ComplianceCheck]:
    """Stored self-checks, newest first (optionally of one site)."""
    query = select(ComplianceCheck).order_by(ComplianceCheck.id.desc()).limit(limit)
    if site is not None:
        query = query.where(ComplianceCheck.site == site)
    return list(session.exec(query).all())


def _latest(session: Session, site_id: int) -> ComplianceCheck | None:
    return session.exec(select(ComplianceCheck).where(ComplianceCheck.site_id == site_id)
                        .order_by(ComplianceCheck.id.desc()).limit(1)).first()


# --------------------------------------------------------------------------- the audit report


class SiteCompliance(BaseModel):
    """One active site's latest self-check, as the report reads it."""

    site: str
    state: Literal["current", "stale", "missing"]
    sent_at: datetime | None = None
    received_at: datetime | None = None
    signature_valid: bool | None = None
    key_fingerprint: str | None = None
    checks: dict[str, dict[str, str | bool]] = {}  # check id -> {passed, reason}
    retention_days: int | None = None
    expired_data: bool | None = None
    epsilon_budget: float | None = None
    epsilon_spent: float | None = None
    approved_apps: int = 0


class Evidence(BaseModel):
    """One piece of evidence for a requirement: a site check over every site, or a coordinator control."""

    id: str
    status: Status
    detail: str


class Requirement(BaseModel):
    """A safeguard or article, its status and the evidence behind it."""

    framework: str
    ref: str
    title: str
    status: Literal["met", "not_met", "no_evidence"]
    evidence: list[Evidence]


class AuditReport(BaseModel):
    """The compliance audit report over every active site and the coordinator."""

    generated_at: datetime
    max_age_days: int
    sites: list[SiteCompliance]
    coordinator: list[Evidence]
    requirements: list[Requirement]
    summary: dict[str, int]


def _site_view(session: Session, site: Site, now: datetime, max_age: timedelta) -> SiteCompliance:
    row = _latest(session, site.id)
    if row is None:
        return SiteCompliance(site=site.name, state="missing")
    key = get_report_key(session=session, site_id=site.id)
    valid = False
    if key is not None:
        try:
            signed = ComplianceSelfCheck.model_validate_json(json.dumps(row.document))
            verify_signature(signed, public_key_hex=key.public_key)
            valid = True
        except (EgressRejected, ValueError):
            valid = False
    sent = row.sent_at if row.sent_at.tzinfo else row.sent_at.replace(tzinfo=timezone.utc)
    return SiteCompliance(
        site=site.name, state="current" if now - sent <= max_age else "stale", sent_at=sent,
        received_at=row.received_at, signature_valid=valid, key_fingerprint=row.key_fingerprint,
        checks={c["id"]: {"passed": bool(c["passed"]), "reason": str(c["reason"])} for c in row.checks},
        retention_days=row.retention_days, expired_data=row.expired_data, epsilon_budget=row.epsilon_budget,
        epsilon_spent=row.epsilon_spent, approved_apps=len(row.approved_apps))


def _site_evidence(check_id: str, sites: list[SiteCompliance]) -> Evidence:
    if not sites:
        return Evidence(id=check_id, status="no_evidence", detail="no active site")
    failing = [f"{s.site}: {s.checks[check_id]['reason']}" for s in sites
               if s.state == "current" and not s.checks.get(check_id, {}).get("passed", False)]
    lacking = [f"{s.site}: {s.state} self-check" for s in sites if s.state != "current"]
    passing = len(sites) - len(failing) - len(lacking)
    detail = "; ".join([f"{passing} of {len(sites)} sites pass", *failing, *lacking])
    status: Status = "fail" if failing else "no_evidence" if lacking else "pass"
    return Evidence(id=check_id, status=status, detail=detail)


def _coordinator_evidence(session: Session, settings: CoordinatorSettings,
                          sites: list[SiteCompliance]) -> list[Evidence]:
    from .models import AuditEvent

    chain = verify_stored_chain(session=session)
    roles: dict[str, int] = {}
    for u in session.exec(select(User).where(User.disabled == False)).all():  # noqa: E712 (SQL, not Python)
        roles[u.role.value] = roles.get(u.role.value, 0) + 1
    refused = len(session.exec(select(AuditEvent.seq).where(AuditEvent.action == "egress.reject")).all())
    reported = [s for s in sites if s.state != "missing"]
    bad = [s.site for s in reported if not s.signature_valid]
    return [
        Evidence(id="coordinator_audit_chain", status="pass" if chain.ok else "fail",
                 detail=f"hash chain of {chain.checked} entries verifies" if chain.ok else chain.problem),
        Evidence(id="role_based_access", status="pass",
                 detail="bearer tokens with roles on every endpoint; enabled users: "
                        + (", ".join(f"{n} {r}" for r, n in sorted(roles.items())) or "none")),
        Evidence(id="coordinator_tls", status="pass" if settings.tls_enabled else "fail",
                 detail="the API serves HTTPS" if settings.tls_enabled else "the API serves plain HTTP; configure "
                                                                            "tls_cert and tls_key"),
        Evidence(id="egress_guard", status="pass",
                 detail=f"typed aggregate payloads only; {refused} refused payloads audited"),
        Evidence(id="signed_self_checks", status="fail" if bad else "pass" if reported else "no_evidence",
                 detail=(f"signature does not verify for: {', '.join(bad)}" if bad else
                         f"{len(reported)} self-checks verified with the sites' pinned Ed25519 keys" if reported
                         else "no self-check received")),
    ]


def build_audit_report(*, session: Session, settings: CoordinatorSettings, now: datetime | None = None) -> AuditReport:
    """The audit report: every active site's latest self-check and the coordinator's controls, mapped to rules."""
    now = now or datetime.now(timezone.utc)
    max_age = timedelta(days=settings.compliance_max_age_days)
    active = session.exec(select(Site).where(Site.status == SiteStatus.active).order_by(Site.name)).all()
    sites = [_site_view(session, s, now, max_age) for s in active]
    coordinator = _coordinator_evidence(session, settings, sites)
    evidence = {e.id: e for e in coordinator} | {cid: _site_evidence(cid, sites) for cid in CHECK_IDS}
    requirements = []
    for framework, ref, title, ids in REQUIREMENTS:
        items = [evidence[i] for i in ids]
        status = "not_met" if any(e.status == "fail" for e in items) else \
            "no_evidence" if any(e.status == "no_evidence" for e in items) else "met"
        requirements.append(Requirement(framework=framework, ref=ref, title=title, status=status, evidence=items))
    summary = {k: sum(r.status == k for r in requirements) for k in ("met", "not_met", "no_evidence")}
    summary.update(sites=len(sites), sites_current=sum(s.state == "current" for s in sites))
    return AuditReport(generated_at=now, max_age_days=settings.compliance_max_age_days, sites=sites,
                       coordinator=coordinator, requirements=requirements, summary=summary)


def render_html(report: AuditReport) -> str:
    """The report as one self-contained HTML page (every value escaped)."""
    from html import escape

    def cell(v: object) -> str:
        return f"<td>{escape('' if v is None else str(v))}</td>"

    badge = {"met": "ok", "pass": "ok", "not_met": "bad", "fail": "bad", "no_evidence": "none"}
    rows = []
    for r in report.requirements:
        ev = "<br>".join(f"<b>{escape(e.id)}</b> ({escape(e.status)}): {escape(e.detail)}" for e in r.evidence)
        rows.append(f"<tr>{cell(r.framework)}{cell(r.ref)}{cell(r.title)}"
                    f"<td class='{badge[r.status]}'>{escape(r.status)}</td><td>{ev}</td></tr>")
    def check_cell(site: SiteCompliance, check_id: str) -> str:
        result = site.checks.get(check_id)
        if result is None:
            return "<td class='none'>-</td>"
        return f"<td class='{'ok' if result['passed'] else 'bad'}'>{escape(str(result['reason']))}</td>"

    site_rows = []
    for s in report.sites:
        checks = "".join(check_cell(s, c) for c in CHECK_IDS)
        site_rows.append(f"<tr>{cell(s.site)}{cell(s.state)}{cell(s.sent_at)}{cell(s.signature_valid)}{checks}"
                         f"{cell(s.epsilon_spent)}{cell(s.epsilon_budget)}{cell(s.retention_days)}</tr>")
    coord = "".join(f"<tr>{cell(e.id)}<td class='{badge[e.status]}'>{escape(e.status)}</td>{cell(e.detail)}</tr>"
                    for e in report.coordinator)
    head = "".join(f"<th>{escape(c)}</th>" for c in CHECK_IDS)
    s = report.summary
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EvoClone compliance audit report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}}.ok{{background:#e3f6e3}}
.bad{{background:#fbe0e0}}.none{{background:#f0f0f0}}</style></head><body>
<h1>Compliance audit report</h1>
<p>Generated {escape(report.generated_at.isoformat())}. Self-checks older than {report.max_age_days} days count as
no evidence. Requirements: {s['met']} met, {s['not_met']} not met, {s['no_evidence']} without evidence;
{s['sites_current']} of {s['sites']} active sites with a current self-check.</p>
<h2>Requirements</h2><table><tr><th>framework</th><th>reference</th><th>title</th><th>status</th><th>evidence</th></tr>
{''.join(rows)}</table>
<h2>Sites</h2><table><tr><th>site</th><th>self-check</th><th>sent</th><th>signature valid</th>{head}
<th>epsilon spent</th><th>epsilon budget</th><th>retention days</th></tr>{''.join(site_rows)}</table>
<h2>Coordinator controls</h2><table><tr><th>control</th><th>status</th><th>detail</th></tr>{coord}</table>
</body></html>
"""
