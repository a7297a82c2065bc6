"""Drift reports of the sites: stored per feature over time, flagged against the configured thresholds, and
turned into retraining requests when a report crosses them.

Launching the run is the run dispatcher's business: `request_retraining` records the request
(the hook point), the API calls `app.state.on_retrain` with each new request when one is set,
and `update_retrain_request` records what became of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

from sqlmodel import Session, select

from evoclone.federated.payloads import DriftFeature, DriftReport, OutcomeRate

from .errors import Conflict, InvalidInput, NotFound
from .models import Site, Study, StudyStatus
from .report_models import (DriftFeatureStat, DriftReportRecord, RetrainRequest, RetrainRequestUpdate,
                            RetrainStatus)
from .settings import CoordinatorSettings

log = logging.getLogger("evoclone.coordinator.drift")
RetrainHook = Callable[[RetrainRequest], None]


def feature_flags(feature: DriftFeature, *, settings: CoordinatorSettings) -> list[str]:
    """The statistics of a feature above their configured thresholds ("psi", "ks", "mmd")."""
    flags = []
    for stat, threshold in (("psi", settings.drift_psi_threshold), ("ks", settings.drift_ks_threshold),
                            ("mmd", settings.drift_mmd_threshold)):
        value = getattr(feature, stat)
        if threshold is not None and value is not None and value > threshold:
            flags.append(stat)
    return flags


def outcome_flagged(outcome: OutcomeRate, *, settings: CoordinatorSettings) -> bool:
    """Whether an outcome rate moved more than the configured threshold since the reference."""
    t = settings.drift_outcome_threshold
    return t is not None and outcome.reference is not None and outcome.current is not None and \
        abs(outcome.current - outcome.reference) > t


def _studies(session: Session, site: Site, study_id: int | None) -> list[Study]:
    """The study a report names (the site must take part), else every active study the site takes part in."""
    if study_id is not None:
        study = session.get(Study, study_id)
        if study is None or site.id not in study.site_ids:
            raise InvalidInput(f"study_id: site {site.name!r} takes part in no study {study_id}; send the id of one "
                               "of its studies, or none")
        return [study]
    studies = session.exec(select(Study).where(Study.status == StudyStatus.active).order_by(Study.id)).all()
    return [s for s in studies if site.id in s.site_ids]


def store_drift_report(*, session: Session, site: Site, report: DriftReport, settings: CoordinatorSettings,
                       signed: bool) -> tuple[DriftReportRecord, list[RetrainRequest]]:
    """Store a validated report and its features, flag them, and request retraining when the flags reach
    `drift_retrain_min_flags`; returns the report and the new retraining requests (the caller commits)."""
    studies = _studies(session, site, report.study_id)
    stats, flagged = [], []
    for f in report.features:
        flags = feature_flags(f, settings=settings)
        if flags:
            flagged.append(f.name)
        stats.append(DriftFeatureStat(site=site.name, site_id=site.id, feature=f.name, kind=f.kind, psi=f.psi, ks=f.ks,
                                      mmd=f.mmd, missing_rate=f.missing_rate,
                                      reference_missing_rate=f.reference_missing_rate, suppressed=f.suppressed,
                                      cells=f.cells, suppressed_cells=f.suppressed_cells, flagged=bool(flags),
                                      flags=flags, sent_at=report.sent_at, report_id=0))
    flagged += [f"outcome:{o.name}" for o in report.outcomes if outcome_flagged(o, settings=settings)]
    row = DriftReportRecord(site_id=site.id, site=site.name, study_id=report.study_id,
                            reference_id=report.reference_id, reference_count=report.reference_count,
                            current_count=report.current_count, features_withheld=report.features_withheld,
                            outcomes=[o.model_dump(mode="json") for o in report.outcomes], flagged=flagged,
                            signed=signed, sent_at=report.sent_at)
    session.add(row)
    session.flush()
    for s in stats:
        s.report_id, s.received_at = row.id, row.received_at
        session.add(s)
    requests: list[RetrainRequest] = []
    if settings.drift_retrain_min_flags and len(flagged) >= settings.drift_retrain_min_flags:
        shown = ", ".join(flagged[:8]) + (f" and {len(flagged) - 8} more" if len(flagged) > 8 else "")
        reason = f"site {site.name}: {len(flagged)} feature(s) or outcome(s) over the drift thresholds ({shown})"
        for study in studies:
            req = request_retraining(session=session, study_id=study.id, site_id=site.id, report_id=row.id,
                                     features=flagged, reason=reason)
            if req is not None:
                requests.append(req)
    session.flush()
    return row, requests


def request_retraining(*, session: Session, study_id: int, site_id: int, report_id: int, features: list[str],
                       reason: str) -> RetrainRequest | None:
    """Record "retrain requested" for a study; None when one is already open for it (one is enough)."""
    session.get(Study, study_id, with_for_update=True)  # PostgreSQL: two reports at once open one request
    open_ = session.exec(select(RetrainRequest).where(RetrainRequest.study_id == study_id,
                                                      RetrainRequest.status == RetrainStatus.requested)).first()
    if open_ is not None:
        return None
    req = RetrainRequest(study_id=study_id, site_id=site_id, report_id=report_id, features=features[:100],
                         reason=reason[:512])
    session.add(req)
    session.flush()
    return req


def run_hook(hook: RetrainHook | None, requests: Iterable[RetrainRequest]) -> None:
    """Hand each new request to the hook (the run dispatcher's launcher); a failing hook is logged, never raised:
    the request stays recorded as requested."""
    if hook is None:
        return
    for req in requests:
        try:
            hook(req)
        except Exception:  # noqa: BLE001 (the report is stored; the launcher's failure is the operator's to see)
            log.exception("the retraining hook failed for request %s of study %s", req.id, req.study_id)


def update_retrain_request(*, session: Session, request_id: int, data: RetrainRequestUpdate) -> RetrainRequest:
    """Record that a request was launched (with its run) or dismissed; Conflict when it is no longer open."""
    req = session.get(RetrainRequest, request_id, with_for_update=True)
    if req is None:
        raise NotFound(f"retraining request {request_id} does not exist; list them with GET /api/v1/drift/retrain")
    if req.status != RetrainStatus.requested:
        raise Conflict(f"retraining request {request_id} is already {req.status.value}")
    if data.status == RetrainStatus.launched and data.run_id is None:
        raise InvalidInput("run_id: a launched retraining request names its run")
    req.status, req.run_id, req.updated_at = data.status, data.run_id, datetime.now(timezone.utc)
    session.add(req)
    session.flush()
    return req


def list_feature_drift(*, session: Session, site: str | None = None, feature: str | None = None,
                       since: datetime | None = None, flagged: bool | None = None, offset: int = 0,
                       limit: int = 500) -> list[DriftFeatureStat]:
    """Drift per site and feature over time, oldest first."""
    query = select(DriftFeatureStat).order_by(DriftFeatureStat.received_at, DriftFeatureStat.id)
    if site is not None:
        query = query.where(DriftFeatureStat.site == site)
    if feature is not None:
        query = query.where(DriftFeatureStat.feature == feature)
    if since is not None:
        query = query.where(DriftFeatureStat.received_at >= since)
    if flagged is not None:
        query = query.where(DriftFeatureStat.flagged == flagged)
    return list(session.exec(query.offset(offset).limit(limit)).all())


def list_drift_reports(*, session: Session, site: str | None = None, study_id: int | None = None, offset: int = 0,
                       limit: int = 100) -> list[DriftReportRecord]:
    """Stored drift reports, newest first."""
    query = select(DriftReportRecord).order_by(DriftReportRecord.id.desc())
    if site is not None:
        query = query.where(DriftReportRecord.site == site)
    if study_id is not None:
        query = query.where(DriftReportRecord.study_id == study_id)
    return list(session.exec(query.offset(offset).limit(limit)).all())


def list_retrain_requests(*, session: Session, study_id: int | None = None,
                          status: RetrainStatus | None = None, limit: int = 100) -> list[RetrainRequest]:
    """Retraining requests, newest first."""
    query = select(RetrainRequest).order_by(RetrainRequest.id.desc()).limit(limit)
    if study_id is not None:
        query = query.where(RetrainRequest.study_id == study_id)
    if status is not None:
        query = query.where(RetrainRequest.status == status)
    return list(session.exec(query).all())
