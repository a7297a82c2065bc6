"""Background cohort jobs: predictions for every patient of the site, with progress and cancellation."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel
from sqlmodel import Session, select

from ...access_log import AccessEntryCreate, record_access
from ...inference import Job, promoted_model, worker_check, worker_predict
from ...keyring import load_keyring
from ...patients import get_record
from ...store import PatientRow
from ..deps import ClinicalUser, EngineDep, ReasonDep, RequestId, SettingsDep
from ..twin_deps import ServicesDep

router = APIRouter(prefix="/jobs", tags=["jobs"])


class CohortRequest(BaseModel):
    """Predict every patient of the site under one arm."""

    arm: Literal["control", "treatment"]


class JobPublic(BaseModel):
    """A job's progress and, when done, its summary (counts per risk category, mean risk; no per-patient rows)."""

    id: str
    kind: str
    status: str
    done: int
    total: int
    error: str | None
    result: dict[str, Any]


def public(job: Job) -> JobPublic:
    """The API view of a job."""
    return JobPublic(id=job.id, kind=job.kind, status=job.status, done=job.done, total=job.total, error=job.error,
                     result=dict(job.result))


@router.post("/cohort-predictions", response_model=JobPublic, status_code=202,
             responses={503: {"description": "model failed to load"}})
def start_cohort_predictions(body: CohortRequest, user: ClinicalUser, reason: ReasonDep, engine: EngineDep,
                             settings: SettingsDep, services: ServicesDep, rid: RequestId) -> JobPublic:
    """Start predicting the whole cohort in the background; poll GET /api/v1/jobs/{id}, cancel with DELETE."""
    ref = promoted_model(engine=engine)
    services.inference.call(worker_check, ref)  # 503 now rather than a failed job later

    def work(job: Job) -> None:
        with Session(engine) as session:
            pseudonyms = list(session.exec(select(PatientRow.pseudonym).order_by(PatientRow.pseudonym)).all())
        job.total = len(pseudonyms)
        keyring = load_keyring(settings.site_dir)
        categories: dict[str, int] = {}
        total_risk = 0.0
        for p in pseudonyms:
            if job.cancel.is_set():
                return
            record = get_record(engine=engine, keyring=keyring, pseudonym=p)
            record_access(engine=engine, data=AccessEntryCreate(actor=user.name, role=user.role, reason=reason.value,
                                                                action="cohort.predict", pseudonym=p,
                                                                request_id=rid))
            out = services.inference.call(worker_predict, ref, record, body.arm)  # in a worker process
            categories[out["category"]] = categories.get(out["category"], 0) + 1
            total_risk += out["risk"]
            job.done += 1
            job.result = {"model_version": ref.version, "arm": body.arm, "categories": dict(categories),
                          "mean_risk": round(total_risk / job.done, 4)}

    return public(services.jobs.start("cohort-predictions", work))


@router.get("/{job_id}", response_model=JobPublic, responses={404: {"description": "no such job"}})
def read_job(job_id: str, _user: ClinicalUser, services: ServicesDep) -> JobPublic:
    """A job's progress and summary."""
    return public(services.jobs.get(job_id))


@router.delete("/{job_id}", status_code=202, response_model=JobPublic, responses={404: {"description": "no such job"}})
def cancel_job(job_id: str, _user: ClinicalUser, services: ServicesDep, response: Response) -> JobPublic:
    """Ask a running job to stop (it stops before its next patient)."""
    job = services.jobs.get(job_id)
    job.cancel.set()
    return public(job)
