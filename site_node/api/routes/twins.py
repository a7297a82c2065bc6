"""Twins and predictions of one patient with the promoted model: cached, access-logged, queued for review.

A cached answer is the stored JSON sent as is (it was validated as the Public model when computed);
an uncached one is computed by an inference worker process while this process keeps serving.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlmodel import Session

from ...access_log import AccessEntryCreate, append_access, record_access
from ...errors import NotFound
from ...inference import worker_generate, worker_predict
from ...keyring import load_keyring
from ...patients import get_record
from ...review import queue_twins
from ...review_models import TwinReviewCreate
from ..deps import AccessLogDep, ClinicalUser, EngineDep, NowDep, PseudonymPath, ReasonDep, RequestId, SettingsDep
from ..twin_deps import ServicesDep

router = APIRouter(prefix="/patients", tags=["twins"])
MAX_TWINS = 50
Arm = Literal["control", "treatment"]
CACHE_HEADER = {"X-Cache": {"description": "hit, miss, or unavailable (the cache is down: served uncached)",
                            "schema": {"type": "string"}}}
ERRORS = {404: {"description": "no such patient at this site"},
          409: {"description": "no model version is promoted at this site"},
          503: {"description": "model failed to load (verification failed), or its inference worker died"}}


class TwinRequest(BaseModel):
    """Which twins: the arm, how many (1..50), an optional horizon in days and study, and the sampling seed."""

    arm: Arm
    count: int = Field(ge=1, le=MAX_TWINS)
    horizon_days: float | None = Field(default=None, gt=0, le=36500)
    study: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class TwinPublic(BaseModel):
    """One gated twin: its quality score, the generated events ([day, code, value, unit]) and its review id."""

    copy_index: int
    quality: float
    tries: int
    outcome: dict[str, Any]
    events: list[list[Any]]
    review_id: int | None = None


class TwinsPublic(BaseModel):
    """Twins that passed the quality gate, and the copies that failed every try (with reasons)."""

    model_version: str
    arm: Arm
    count: int
    horizon_days: float
    passed: int
    failed: int
    twins: list[TwinPublic]
    failures: list[dict[str, Any]]


class PredictionPublic(BaseModel):
    """Risk under one arm with its 95% interval, the risk category and the three most important feature groups."""

    model_version: str
    arm: Arm
    risk: float
    ci_low: float
    ci_high: float
    interval: float
    category: str
    top_features: list[str]
    risk_definition: str | None


def load_patient(*, engine, settings, pseudonym: str, entry: dict, now):
    """The record of `pseudonym`, or NotFound logged without the requested value."""
    try:
        return get_record(engine=engine, keyring=load_keyring(settings.site_dir), pseudonym=pseudonym)
    except NotFound:
        record_access(engine=engine, data=AccessEntryCreate(**entry, outcome="not_found"), at=now)
        raise


def _json(raw: bytes, status: str) -> Response:
    return Response(raw, media_type="application/json", headers={"X-Cache": status})


@router.post("/{pseudonym}/twins", response_model=TwinsPublic, responses={**ERRORS, 200: {"headers": CACHE_HEADER}})
async def create_twins(pseudonym: PseudonymPath, body: TwinRequest, user: ClinicalUser, reason: ReasonDep,
                       engine: EngineDep, settings: SettingsDep, services: ServicesDep, now: NowDep, rid: RequestId,
                       access_log: AccessLogDep, request: Request) -> Response:
    """Generate gated twins of a patient with the promoted model; new twins are queued for clinician review."""
    entry = dict(actor=user.name, role=user.role, reason=reason.value, request_id=rid)
    ref, key, raw, status = await services.lookup(request, "twins", pseudonym, body.model_dump())
    if raw is not None:
        await access_log.append(AccessEntryCreate(**entry, action="twin.read", pseudonym=pseudonym), now)
        return _json(raw, status)
    record = await run_in_threadpool(lambda: load_patient(engine=engine, settings=settings, pseudonym=pseudonym,
                                                          now=now, entry={**entry, "action": "twin.generate"}))
    out = await services.inference.run(worker_generate, ref, record, body.arm, body.count, body.horizon_days,
                                       body.seed)

    def queue() -> tuple[bytes, str]:
        items = [TwinReviewCreate(study=body.study, pseudonym=pseudonym, model_version=out["model_version"],
                                  arm=body.arm, quality=t["quality"], copy_index=t["copy_index"], events=t["events"],
                                  outcome=t["outcome"]) for t in out["twins"]]
        # the queued twins and the access-log entry of their generation commit together
        with Session(engine, expire_on_commit=False) as s:
            rows = queue_twins(session=s, items=items, keyring=load_keyring(settings.site_dir), now=now)
            append_access(session=s, at=now, data=AccessEntryCreate(**entry, action="twin.generate",
                                                                    pseudonym=pseudonym))
            s.commit()
        for t, row in zip(out["twins"], rows):
            t["review_id"] = row.id
        doc = TwinsPublic.model_validate(out).model_dump_json().encode()
        return doc, services.cache.store_raw(key, doc, status)

    return _json(*await run_in_threadpool(queue))


@router.get("/{pseudonym}/prediction", response_model=PredictionPublic,
            responses={**ERRORS, 200: {"headers": CACHE_HEADER}})
async def read_prediction(pseudonym: PseudonymPath, arm: Annotated[Arm, Query(description="the arm to predict under")],
                          user: ClinicalUser, reason: ReasonDep, engine: EngineDep, settings: SettingsDep,
                          services: ServicesDep, now: NowDep, rid: RequestId, access_log: AccessLogDep,
                          request: Request) -> Response:
    """The patient's predicted risk under an arm, with a 95% interval, the risk category and the top features."""
    entry = dict(actor=user.name, role=user.role, reason=reason.value, request_id=rid, action="prediction.read")
    ref, key, raw, status = await services.lookup(request, "prediction", pseudonym, {"arm": arm})
    if raw is None:
        record = await run_in_threadpool(lambda: load_patient(engine=engine, settings=settings, pseudonym=pseudonym,
                                                              entry=entry, now=now))
        out = await services.inference.run(worker_predict, ref, record, arm)
        raw = PredictionPublic.model_validate(out).model_dump_json().encode()
        status = await run_in_threadpool(services.cache.store_raw, key, raw, status)
    # logged before the result leaves, cached or not
    await access_log.append(AccessEntryCreate(**entry, pseudonym=pseudonym), now)
    return _json(raw, status)
