"""Studies: trial metadata, privacy targets and participating sites (all of them active)."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlmodel import Session, select

from .errors import Conflict, InvalidInput, NotFound
from .models import Site, SiteStatus, Study, StudyCreate, StudyStatus

# Which status a study may move to from each status.
TRANSITIONS = {
    StudyStatus.draft: {StudyStatus.active, StudyStatus.closed},
    StudyStatus.active: {StudyStatus.paused, StudyStatus.closed},
    StudyStatus.paused: {StudyStatus.active, StudyStatus.closed},
    StudyStatus.closed: set(),
}


def _check_sites(session: Session, site_ids: list[int]) -> None:
    sites = {s.id: s for s in session.exec(select(Site).where(Site.id.in_(site_ids))).all()}
    missing = [i for i in site_ids if i not in sites]
    if missing:
        raise InvalidInput(f"site_ids: sites {missing} do not exist; list sites with GET /api/v1/sites")
    inactive = [f"{sites[i].name} ({sites[i].status.value})" for i in site_ids if sites[i].status != SiteStatus.active]
    if inactive:
        raise InvalidInput(f"site_ids: only active sites can take part, not {', '.join(inactive)}; "
                           "an admin accepts pending sites first")


def create_study(*, session: Session, data: StudyCreate, created_by: str) -> Study:
    """Add a draft study; InvalidInput when a site is missing or not active, Conflict on a duplicate name."""
    if session.exec(select(Study).where(Study.name == data.name)).first() is not None:
        raise Conflict(f"a study called {data.name!r} already exists; choose another name")
    _check_sites(session, data.site_ids)
    study = Study.model_validate(data, update={"created_by": created_by})
    session.add(study)
    session.flush()
    return study


def list_studies(*, session: Session, status: StudyStatus | None = None, offset: int = 0,
                 limit: int = 100) -> list[Study]:
    """Studies by id (optionally with one status)."""
    query = select(Study).order_by(Study.id).offset(offset).limit(limit)
    if status is not None:
        query = query.where(Study.status == status)
    return list(session.exec(query).all())


def get_study(*, session: Session, study_id: int) -> Study:
    """The study with `study_id`; NotFound otherwise."""
    study = session.get(Study, study_id)
    if study is None:
        raise NotFound(f"study {study_id} does not exist; list studies with GET /api/v1/studies")
    return study


def set_study_status(*, session: Session, study_id: int, status: StudyStatus) -> Study:
    """Move a study to `status` if the life cycle allows it (draft → active ⇄ paused → closed)."""
    study = session.get(Study, study_id, with_for_update=True)
    if study is None:
        raise NotFound(f"study {study_id} does not exist; list studies with GET /api/v1/studies")
    if status == study.status:
        return study
    if status not in TRANSITIONS[study.status]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[study.status])) or "nothing (it is closed)"
        raise Conflict(f"study {study_id} is {study.status.value} and can move to {allowed}, not {status.value}")
    if status == StudyStatus.active:
        _check_sites(session, study.site_ids)
    study.status, study.updated_at = status, datetime.now(timezone.utc)
    session.add(study)
    session.flush()
    return study
