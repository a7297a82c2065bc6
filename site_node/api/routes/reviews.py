"""The clinician review queue: list, read, approve, reject (the twin is regenerated under a constraint), annotate;
the feedback export and which training round used which verdicts."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from evoclone.federated.feedback import feedback_path

from ...access_log import AccessEntryCreate, record_access
from ...errors import SiteError
from ...inference import promoted_model, worker_regenerate
from ...keyring import load_keyring
from ...patients import PSEUDONYM_PATTERN, get_record
from ...review import annotate, decide, feedback_usage, get_review, list_reviews, open_twins, queue_regenerated, \
    views, write_feedback
from ...review_models import AnnotateRequest, DecisionPublic, RejectRequest, ReviewQueuePublic, ReviewStatus, \
    TwinReview, TwinReviewPublic
from ..deps import RowId, AdminUser, ClinicalUser, EngineDep, NowDep, ReasonDep, RequestId, SessionDep, SettingsDep
from ..twin_deps import ServicesDep

router = APIRouter(prefix="/reviews", tags=["reviews"])
log = logging.getLogger("evoclone.site.api")
NOT_FOUND = {404: {"description": "no such review"}}


def _views(engine, settings, rows: list[TwinReview]) -> list[TwinReviewPublic]:
    """The API views of rows, their sealed twins opened with the site's keyring (read per request: rotation)."""
    with Session(engine) as session:
        return views(session=session, rows=rows, keyring=load_keyring(settings.site_dir))


def _view(engine, settings, row: TwinReview | None) -> TwinReviewPublic | None:
    return _views(engine, settings, [row])[0] if row is not None else None


@router.get("", response_model=ReviewQueuePublic)
def read_queue(user: ClinicalUser, reason: ReasonDep, session: SessionDep, engine: EngineDep, now: NowDep,
               rid: RequestId, settings: SettingsDep,
               status: Annotated[ReviewStatus | None, Query(description="pending (default), approved or rejected")
                                 ] = ReviewStatus.pending,
               study: Annotated[str | None, Query(max_length=64)] = None,
               patient: Annotated[str | None, Query(pattern=PSEUDONYM_PATTERN, description="a site pseudonym")
                                  ] = None,
               min_quality: Annotated[float | None, Query(ge=0, le=1)] = None,
               limit: Annotated[int, Query(ge=1, le=500)] = 100,
               offset: Annotated[int, Query(ge=0)] = 0) -> ReviewQueuePublic:
    """Twins awaiting review (or reviewed), filtered by study, patient and minimum quality score."""
    rows, total = list_reviews(session=session, status=status, study=study, pseudonym=patient,
                               min_quality=min_quality, limit=limit, offset=offset)
    record_access(engine=engine, at=now, data=AccessEntryCreate(actor=user.name, role=user.role, action="review.list",
                                                                pseudonym=patient or "", reason=reason.value,
                                                                request_id=rid))
    return ReviewQueuePublic(items=_views(engine, settings, rows), count=total)


@router.get("/feedback", response_model=list[dict[str, Any]])
def read_feedback_usage(_user: AdminUser, engine: EngineDep) -> list[dict[str, Any]]:
    """Per training run and round: the approved twins it trained on and the rejected twins it held out (review ids
    and counts), as recorded by the site's ClientApp."""
    return feedback_usage(engine=engine)


@router.post("/feedback/export", response_model=dict[str, Any])
def export_feedback_now(_user: AdminUser, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    """Write every verdict to the feedback file next to the training snapshot now (export-snapshot also does), so
    the next training round uses them."""
    path = feedback_path(settings.snapshot_path)
    out = write_feedback(engine=engine, keyring=load_keyring(settings.site_dir), path=path)
    return {**out, "path": path.name}


@router.get("/{review_id}", response_model=TwinReviewPublic, responses=NOT_FOUND)
def read_review(review_id: RowId, user: ClinicalUser, reason: ReasonDep, session: SessionDep, engine: EngineDep,
                now: NowDep, rid: RequestId, settings: SettingsDep) -> TwinReviewPublic:
    """One twin under review."""
    row = get_review(session=session, review_id=review_id)
    record_access(engine=engine, at=now, data=AccessEntryCreate(actor=user.name, role=user.role, action="review.read",
                                                                pseudonym=row.pseudonym, reason=reason.value,
                                                                request_id=rid))
    return _view(engine, settings, row)


@router.post("/{review_id}/approve", response_model=DecisionPublic, responses={**NOT_FOUND, 409: {
    "description": "already reviewed"}})
def approve(review_id: RowId, user: ClinicalUser, reason: ReasonDep, engine: EngineDep, now: NowDep,
            rid: RequestId, settings: SettingsDep) -> DecisionPublic:
    """Approve a pending twin: it becomes positive feedback (synthetic augmentation) for the next training run."""
    row = decide(engine=engine, review_id=review_id, status=ReviewStatus.approved, actor=user.name, role=user.role,
                 reason=reason.value, request_id=rid, now=now)
    return DecisionPublic(review=_view(engine, settings, row))


async def regenerate(*, services, engine, settings, row: TwinReview, why, actor: str, role: str, reason: str,
                     rid: str, now) -> tuple[TwinReview | None, str | None]:
    """Generate a replacement for a rejected twin under the reason's constraint (on an inference worker) and
    queue it; or why not."""
    keyring = load_keyring(settings.site_dir)

    def load():
        ref = promoted_model(engine=engine)
        record = get_record(engine=engine, keyring=keyring, pseudonym=row.pseudonym)
        with Session(engine) as session:
            events = open_twins(session=session, rows=[row], keyring=keyring)[row.id]["events"]
        return ref, record, events

    try:
        ref, record, events = await run_in_threadpool(load)
        doc = await services.inference.run(worker_regenerate, ref, record, row.arm, why.value, events,
                                           1_000_003 * row.id % (2**31))
    except SiteError as exc:
        return None, str(exc)
    if not doc["twins"]:
        return None, "the quality gate refused every regenerated try; generate new twins for this patient"
    new = await run_in_threadpool(lambda: queue_regenerated(
        engine=engine, keyring=keyring, parent=row, twin=doc["twins"][0], model_version=ref.version, actor=actor,
        role=role, reason=reason, request_id=rid, now=now))
    return new, None


@router.post("/{review_id}/reject", response_model=DecisionPublic, responses={**NOT_FOUND, 409: {
    "description": "already reviewed"}})
async def reject(review_id: RowId, body: RejectRequest, user: ClinicalUser, reason: ReasonDep, engine: EngineDep,
                 settings: SettingsDep, services: ServicesDep, now: NowDep, rid: RequestId,
                 session: SessionDep) -> DecisionPublic:
    """Reject a pending twin with a reason (and scrubbed free text); a replacement is regenerated under the reason's
    constraint and queued."""
    session.close()  # give the auth lookup's connection back: regeneration waits for a worker
    row = await run_in_threadpool(lambda: decide(
        engine=engine, review_id=review_id, status=ReviewStatus.rejected, actor=user.name, role=user.role,
        reason=reason.value, request_id=rid, reject_reason=body.reason, text=body.text, now=now))
    if not body.regenerate:
        return DecisionPublic(review=await run_in_threadpool(_view, engine, settings, row))
    new, why_not = await regenerate(services=services, engine=engine, settings=settings, row=row, why=body.reason,
                                    actor=user.name, role=user.role, reason=reason.value, rid=rid, now=now)
    review, regenerated = await run_in_threadpool(lambda: (_view(engine, settings, row), _view(engine, settings, new)))
    return DecisionPublic(review=review, regenerated=regenerated, regeneration=why_not)


@router.post("/{review_id}/annotate", response_model=TwinReviewPublic, responses=NOT_FOUND)
def annotate_review(review_id: RowId, body: AnnotateRequest, user: ClinicalUser, reason: ReasonDep, engine: EngineDep,
                    now: NowDep, rid: RequestId, settings: SettingsDep) -> TwinReviewPublic:
    """Add a note to a twin (scrubbed of identifiers before it is stored)."""
    return _view(engine, settings, annotate(engine=engine, review_id=review_id, text=body.text, actor=user.name,
                                            role=user.role, reason=reason.value, request_id=rid, now=now))
