"""Site reports: report-key registration, drift and compliance intake (site tokens, through the egress guard),
drift per site and feature over time, retraining requests, and the compliance audit report."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Path, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from sqlmodel import Session, select

from evoclone.federated.payloads import ComplianceSelfCheck, DriftReport, ReportKeyRegistration, SitePayload

from ... import compliance, drift
from ...audit import append_event
from ...egress import EgressRejected, check_payload, record_rejection, verify_signature
from ...errors import NotFound
from ...models import Site
from ...report_models import (ComplianceCheck, ComplianceCheckPublic, DriftFeatureStat, DriftFeaturePublic,
                              DriftReportPublic, RetrainRequest, RetrainRequestPublic, RetrainRequestUpdate,
                              RetrainStatus, SiteReportKeyPublic)
from ..deps import AdminUser, AuditorUser, ReaderUser, RequestId, SessionDep, SettingsDep, SponsorUser
from ..registry_deps import CurrentSite

P = TypeVar("P", bound=SitePayload)
MAX_ID = 2**31 - 1
SiteName = Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                       description="a site's name")]
Id = Annotated[int, Path(ge=1, le=MAX_ID)]

intake = APIRouter(prefix="/reports", tags=["reports"])
drift_router = APIRouter(prefix="/drift", tags=["drift"])
audit_router = APIRouter(prefix="/audit", tags=["audit"])
keys_router = APIRouter(prefix="/sites", tags=["sites"])


def _body(model: type[SitePayload]) -> dict:
    """OpenAPI request body of a payload read raw (the guard validates it, not FastAPI)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


REFUSED = {422: {"description": "refused by the egress guard (the reason never quotes the payload)"},
           401: {"description": "not a valid site token"}}


def _guarded(session: Session, site: Site, endpoint: str, raw: bytes, rid: str, fn):
    """Run `fn`; an egress refusal is audited (committed on its own) before it becomes a 422."""
    try:
        return fn()
    except EgressRejected as exc:
        session.rollback()
        record_rejection(session=session, site=site.name, endpoint=endpoint, rejection=exc, size=len(raw),
                         request_id=rid)
        session.commit()
        raise


def _who(site: Site) -> dict:
    return {"actor": f"site:{site.name}", "role": "site"}


@intake.put("/key", response_model=SiteReportKeyPublic, openapi_extra=_body(ReportKeyRegistration),
            responses={**REFUSED, 409: {"description": "another key is registered for this site"}})
async def register_key(request: Request, site: CurrentSite, session: SessionDep, rid: RequestId) -> SiteReportKeyPublic:
    """Register the site's Ed25519 report-signing key (the first registration is pinned; the same key again is fine)."""
    raw, endpoint = await request.body(), "/api/v1/reports/key"

    def work() -> SiteReportKeyPublic:
        payload = check_payload(raw, ReportKeyRegistration, site=site.name)
        row, created = compliance.register_report_key(session=session, site=site, public_key=payload.public_key)
        append_event(session=session, action="report.key", outcome="ok" if created else "unchanged", **_who(site),
                     resource=f"site/{site.id}", detail={"fingerprint": row.fingerprint}, request_id=rid)
        session.commit()
        return SiteReportKeyPublic(site=site.name, **row.model_dump())

    return await run_in_threadpool(_guarded, session, site, endpoint, raw, rid, work)


@intake.post("/drift", response_model=DriftReportPublic, status_code=status.HTTP_201_CREATED,
             openapi_extra=_body(DriftReport), responses=REFUSED)
async def drift_report(request: Request, site: CurrentSite, session: SessionDep, settings: SettingsDep,
                       rid: RequestId) -> DriftReportPublic:
    """A site's drift report (federated.payloads.DriftReport); signed when the site registered a report key."""
    raw, endpoint = await request.body(), "/api/v1/reports/drift"

    def work() -> tuple[DriftReportPublic, list[RetrainRequest]]:
        report = check_payload(raw, DriftReport, site=site.name)
        key = compliance.get_report_key(session=session, site_id=site.id)
        if key is not None:
            verify_signature(report, public_key_hex=key.public_key)
        elif report.signature is not None:
            raise EgressRejected("unknown_key", "key_fingerprint")
        row, requests = drift.store_drift_report(session=session, site=site, report=report, settings=settings,
                                                 signed=key is not None)
        append_event(session=session, action="drift.report", outcome="ok", **_who(site), resource=f"drift/{row.id}",
                     detail={"features": len(report.features), "flagged": len(row.flagged), "signed": row.signed},
                     request_id=rid)
        for req in requests:
            append_event(session=session, action="drift.retrain", outcome="requested", **_who(site),
                         resource=f"study/{req.study_id}", request_id=rid,
                         detail={"retrain_request": req.id, "report": row.id, "flags": len(req.features)})
        session.commit()
        public = DriftReportPublic(**row.model_dump(), retrain_requests=[r.id for r in requests])
        return public, requests

    public, requests = await run_in_threadpool(_guarded, session, site, endpoint, raw, rid, work)
    drift.run_hook(getattr(request.app.state, "on_retrain", None), requests)
    return public


@intake.post("/compliance", response_model=ComplianceCheckPublic, status_code=status.HTTP_201_CREATED,
             openapi_extra=_body(ComplianceSelfCheck), responses=REFUSED)
async def compliance_report(request: Request, site: CurrentSite, session: SessionDep,
                            rid: RequestId) -> ComplianceCheck:
    """A site's signed compliance self-check (federated.payloads.ComplianceSelfCheck); its key must be registered."""
    raw, endpoint = await request.body(), "/api/v1/reports/compliance"

    def work() -> ComplianceCheck:
        check = check_payload(raw, ComplianceSelfCheck, site=site.name)
        key = compliance.get_report_key(session=session, site_id=site.id)
        if key is None:
            raise EgressRejected("unknown_key", "key_fingerprint")
        verify_signature(check, public_key_hex=key.public_key)
        row = compliance.store_self_check(session=session, site=site, check=check)
        append_event(session=session, action="compliance.report", outcome="ok", **_who(site),
                     resource=f"compliance/{row.id}", request_id=rid,
                     detail={"passed": row.passed, "failed": [c["id"] for c in row.checks if not c["passed"]]})
        session.commit()
        return row

    return await run_in_threadpool(_guarded, session, site, endpoint, raw, rid, work)


@intake.get("/compliance", response_model=list[ComplianceCheckPublic])
def list_compliance(user: AuditorUser, session: SessionDep, site: SiteName = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[ComplianceCheck]:
    """Stored compliance self-checks, newest first."""
    return compliance.list_self_checks(session=session, site=site, limit=limit)


@drift_router.get("", response_model=list[DriftFeaturePublic])
def feature_drift(user: ReaderUser, session: SessionDep, site: SiteName = None,
                  feature: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
                  since: datetime | None = None, flagged: bool | None = None,
                  offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
                  limit: Annotated[int, Query(ge=1, le=5000)] = 500) -> list[DriftFeatureStat]:
    """Drift per site and feature over time (oldest first): PSI, KS, MMD, missingness, suppression, flags."""
    return drift.list_feature_drift(session=session, site=site, feature=feature, since=since, flagged=flagged,
                                    offset=offset, limit=limit)


@drift_router.get("/reports", response_model=list[DriftReportPublic])
def drift_reports(user: ReaderUser, session: SessionDep, site: SiteName = None,
                  study: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
                  offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[DriftReportPublic]:
    """Drift reports (counts, outcome rates, flagged features), newest first."""
    rows = drift.list_drift_reports(session=session, site=site, study_id=study, offset=offset, limit=limit)
    raised: dict[int, list[int]] = {}
    if rows:
        for req in session.exec(select(RetrainRequest).where(RetrainRequest.report_id.in_([r.id for r in rows]))):
            raised.setdefault(req.report_id, []).append(req.id)
    return [DriftReportPublic(**r.model_dump(), retrain_requests=raised.get(r.id, [])) for r in rows]


@drift_router.get("/retrain", response_model=list[RetrainRequestPublic])
def retrain_requests(user: ReaderUser, session: SessionDep,
                     study: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
                     state: Annotated[RetrainStatus | None, Query(alias="status")] = None) -> list[RetrainRequest]:
    """Retraining requests raised by drift, newest first."""
    return drift.list_retrain_requests(session=session, study_id=study, status=state)


@drift_router.patch("/retrain/{request_id}", response_model=RetrainRequestPublic,
                    responses={409: {"description": "no longer open"}})
def update_retrain(request_id: Id, body: RetrainRequestUpdate, user: SponsorUser, session: SessionDep,
                   rid: RequestId) -> RetrainRequest:
    """Record that a retraining request was launched (with its run) or dismissed."""
    req = drift.update_retrain_request(session=session, request_id=request_id, data=body)
    append_event(session=session, action="drift.retrain", outcome=req.status.value, actor=user.username,
                 role=user.role, resource=f"study/{req.study_id}", request_id=rid,
                 detail={"retrain_request": req.id, "run": req.run_id})
    session.commit()
    return req


@audit_router.get("/compliance", response_model=compliance.AuditReport,
                  responses={200: {"content": {"text/html": {}}, "description": "the report as JSON or HTML"}})
def audit_report(user: AuditorUser, session: SessionDep, settings: SettingsDep,
                 fmt: Annotated[Literal["json", "html"], Query(alias="format")] = "json"):
    """The compliance audit report: each active site's latest signed self-check and the coordinator's controls,
    mapped to HIPAA Security Rule safeguards, GDPR articles and FDA 21 CFR Part 11."""
    report = compliance.build_audit_report(session=session, settings=settings)
    if fmt == "html":
        return HTMLResponse(compliance.render_html(report))
    return report


@keys_router.get("/{site_id}/report-key", response_model=SiteReportKeyPublic,
                 responses={404: {"description": "no key registered"}})
def show_key(site_id: Id, user: ReaderUser, session: SessionDep) -> SiteReportKeyPublic:
    """The report-signing key a site registered."""
    site = session.get(Site, site_id)
    row = compliance.get_report_key(session=session, site_id=site_id)
    if site is None or row is None:
        raise NotFound(f"site {site_id} has no registered report key; the site registers one with "
                       "PUT /api/v1/reports/key")
    return SiteReportKeyPublic(site=site.name, **row.model_dump())


@keys_router.delete("/{site_id}/report-key", response_model=SiteReportKeyPublic,
                    responses={404: {"description": "no key registered"}})
def remove_key(site_id: Id, user: AdminUser, session: SessionDep, rid: RequestId) -> SiteReportKeyPublic:
    """Unpin a site's report key (a lost or rotated key); the site's next registration pins its new one."""
    site = session.get(Site, site_id)
    row = compliance.remove_report_key(session=session, site_id=site_id)
    append_event(session=session, action="report.key", outcome="removed", actor=user.username, role=user.role,
                 resource=f"site/{site_id}", detail={"fingerprint": row.fingerprint}, request_id=rid)
    session.commit()
    return SiteReportKeyPublic(site=site.name if site else "", **row.model_dump())


router = APIRouter()
for _sub in (intake, drift_router, audit_router, keys_router):
    router.include_router(_sub)
