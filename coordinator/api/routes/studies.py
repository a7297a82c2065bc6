"""Studies: sponsors and admins create them and change their status; every role may read them."""

from __future__ import annotations

from fastapi import APIRouter, Query, status

from ... import studies as store
from ...audit import append_event
from ...models import MAX_ID, Study, StudyCreate, StudyPublic, StudyStatus, StudyUpdate
from ..deps import IdPath, ReaderUser, RequestId, SessionDep, SponsorUser

router = APIRouter(prefix="/studies", tags=["studies"])


@router.post("", response_model=StudyPublic, status_code=status.HTTP_201_CREATED,
             responses={409: {"description": "a study with this name exists"},
                        422: {"description": "invalid metadata or an inactive site"}})
def create(body: StudyCreate, user: SponsorUser, session: SessionDep, rid: RequestId) -> Study:
    """Create a draft study over active sites."""
    study = store.create_study(session=session, data=body, created_by=user.username)
    append_event(session=session, action="study.create", outcome="ok", actor=user.username, role=user.role,
                 resource=f"study/{study.id}", detail={"sites": study.site_ids}, request_id=rid)
    session.commit()
    return study


@router.get("", response_model=list[StudyPublic])
def list_studies(user: ReaderUser, session: SessionDep, status: StudyStatus | None = None,
                 offset: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(100, ge=1, le=1000)) -> list[Study]:
    """Studies by id."""
    return store.list_studies(session=session, status=status, offset=offset, limit=limit)


@router.get("/{study_id}", response_model=StudyPublic)
def show(study_id: IdPath, user: ReaderUser, session: SessionDep) -> Study:
    """One study."""
    return store.get_study(session=session, study_id=study_id)


@router.patch("/{study_id}", response_model=StudyPublic, responses={409: {"description": "not allowed now"}})
def update(study_id: IdPath, body: StudyUpdate, user: SponsorUser, session: SessionDep, rid: RequestId) -> Study:
    """Change a study's status (draft → active ⇄ paused → closed)."""
    study = store.set_study_status(session=session, study_id=study_id, status=body.status)
    append_event(session=session, action="study.status", outcome="ok", actor=user.username, role=user.role,
                 resource=f"study/{study.id}", detail={"status": study.status.value}, request_id=rid)
    session.commit()
    return study
