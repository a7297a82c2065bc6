"""Twins and predictions of one patient with the promoted model: cached, access-logged, queued for review."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlmodel import Session

from ...access_log import AccessEntryCreate, append_access, record_access
from ...errors import NotFound
from ...inference import cache_key, generate, predict
from ...keyring import load_keyring
from ...patients import get_record
from ...review import queue_twins
from ...review_models import TwinReviewCreate
from ..deps import ClinicalUser, EngineDep, NowDep, PseudonymPath, ReasonDep, RequestId, SessionDep, SettingsDep
from ..twin_deps import ServicesDep

router = APIRouter(prefix="/patients", tags=["twins"])
MAX_TWINS = 50
Arm = Literal["control", "treatment"]
CACHE_HEADER = {"X-Cache": {"description": "hit, miss, or unavailable (the cache is down: served uncached)",
                            "schema": {"type": "string"}}}
ERRORS = {404: {"description": "no such patient at this site"},
          503: {"description": "model failed to load (none promoted, or verification failed)"}}


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


@router.post("/{pseudonym}/twins", response_model=TwinsPublic, responses={**ERRORS, 200: {"headers": CACHE_HEADER}})
async def create_twins(pseudonym: PseudonymPath, body: TwinRequest, user: ClinicalUser, reason: ReasonDep,
                       engine: EngineDep, settings: SettingsDep, services: ServicesDep, now: NowDep, rid: RequestId,
                       response: Response, session: SessionDep) -> TwinsPublic:
    """Generate gated twins of a patient with the promoted model; new twins are queued for clinician review."""
    entry = dict(actor=user.name, role=user.role, reason=reason.value, request_id=rid)
    session.close()  # give the auth lookup's connection back: the model may keep this request waiting
    model = await run_in_threadpool(services.models.get)
    key = cache_key(model.version, "twins", pseudonym, body.model_dump())
    doc, status = await run_in_threadpool(services.cache.lookup, key)
    if doc is None:
        def fresh() -> dict:
            record = load_patient(engine=engine, settings=settings, pseudonym=pseudonym, now=now,
                                  entry={**entry, "action": "twin.generate"})
            out = generate(model=model, record=record, arm=body.arm, count=body.count,
                           horizon_days=body.horizon_days, seed=body.seed)
            items = [TwinReviewCreate(study=body.study, pseudonym=pseudonym, model_version=model.version,
                                      arm=body.arm, quality=t["quality"], copy_index=t["copy_index"],
                                      events=t["events"], outcome=t["outcome"]) for t in out["twins"]]
            # the queued twins and the access-log entry of their generation commit together
            with Session(engine, expire_on_commit=False) as s:
                rows = queue_twins(session=s, items=items, keyring=load_keyring(settings.site_dir), now=now)
                append_access(session=s, at=now, data=AccessEntryCreate(**entry, action="twin.generate",
                                                                        pseudonym=pseudonym))
                s.commit()
            for t, row in zip(out["twins"], rows):
                t["review_id"] = row.id
            return out

        doc = await services.run_model(fresh)
        status = await run_in_threadpool(services.cache.store, key, doc, status)
    else:
        await run_in_threadpool(lambda: record_access(engine=engine, at=now, data=AccessEntryCreate(
            **entry, action="twin.read", pseudonym=pseudonym)))
    response.headers["X-Cache"] = status
    return TwinsPublic(**doc)


@router.get("/{pseudonym}/prediction", response_model=PredictionPublic,
            responses={**ERRORS, 200: {"headers": CACHE_HEADER}})
async def read_prediction(pseudonym: PseudonymPath, arm: Annotated[Arm, Query(description="the arm to predict under")],
                          user: ClinicalUser, reason: ReasonDep, engine: EngineDep, settings: SettingsDep,
                          services: ServicesDep, now: NowDep, rid: RequestId, response: Response,
                          session: SessionDep) -> PredictionPublic:
    """The patient's predicted risk under an arm, with a 95% interval, the risk category and the top features."""
    entry = dict(actor=user.name, role=user.role, reason=reason.value, request_id=rid, action="prediction.read")
    session.close()  # give the auth lookup's connection back: the model may keep this request waiting
    model = await run_in_threadpool(services.models.get)
    key = cache_key(model.version, "prediction", pseudonym, {"arm": arm})
    doc, status = await run_in_threadpool(services.cache.lookup, key)
    if doc is None:
        def fresh() -> dict:
            record = load_patient(engine=engine, settings=settings, pseudonym=pseudonym, entry=entry, now=now)
            return predict(model=model, record=record, arm=arm)

        doc = await services.run_model(fresh)
        status = await run_in_threadpool(services.cache.store, key, doc, status)
    # logged before the result leaves, cached or not
    await run_in_threadpool(lambda: record_access(engine=engine, data=AccessEntryCreate(**entry, pseudonym=pseudonym),
                                                  at=now))
    response.headers["X-Cache"] = status
    return PredictionPublic(**doc)
