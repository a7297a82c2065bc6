"""Runs: sponsors launch and stop federated training of a study; every role may follow them."""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel

from ... import runs as store
from ...audit import append_event
from ...models import Run, RunPublic
from ..deps import IdPath, ReaderUser, RequestId, SessionDep, SponsorUser

router = APIRouter(tags=["runs"])


class RunDetail(RunPublic):
    """A run with its rounds so far."""

    rounds_done: int
    history: list[store.RoundPublic]


class RunList(BaseModel):
    """Runs, newest first."""

    runs: list[RunPublic]


@router.post("/studies/{study_id}/runs", response_model=RunPublic, status_code=status.HTTP_202_ACCEPTED,
             responses={404: {"description": "no such study"}, 409: {"description": "study not active or busy"}})
def launch(study_id: IdPath, body: store.LaunchRequest, user: SponsorUser, session: SessionDep, rid: RequestId) -> Run:
    """Queue a federated run of an active study; the coordinator's SuperLink process submits it."""
    run = store.launch_run(session=session, study_id=study_id, rounds=body.rounds, config=body.config,
                           created_by=user.username)
    append_event(session=session, action="run.launch", outcome="ok", actor=user.username, role=user.role,
                 resource=f"run/{run.id}", detail={"study": study_id, "rounds": body.rounds,
                                                   "model": body.config.model}, request_id=rid)
    session.commit()
    return run


@router.get("/runs", response_model=RunList)
def list_runs(user: ReaderUser, session: SessionDep, study: int | None = None) -> RunList:
    """Runs, newest first, optionally of one study."""
    return RunList(runs=[RunPublic.model_validate(r, from_attributes=True)
                         for r in store.list_runs(session=session, study_id=study)])


@router.get("/runs/{run_id}", response_model=RunDetail, responses={404: {"description": "no such run"}})
def show(run_id: IdPath, user: ReaderUser, session: SessionDep) -> RunDetail:
    """A run's status with every round's aggregate and per-site figures (epsilon, losses, metrics)."""
    run = store.get_run(session=session, run_id=run_id)
    history = store.rounds_view(store.round_metrics(session=session, run_id=run_id))
    return RunDetail(**RunPublic.model_validate(run, from_attributes=True).model_dump(),
                     rounds_done=len(history), history=history)


@router.post("/runs/{run_id}/stop", response_model=RunPublic, responses={409: {"description": "already ended"}})
def stop(run_id: IdPath, user: SponsorUser, session: SessionDep, rid: RequestId) -> Run:
    """Stop a queued or running run (a running one stops at the SuperLink within a poll)."""
    run = store.request_stop(session=session, run_id=run_id)
    append_event(session=session, action="run.stop", outcome="ok", actor=user.username, role=user.role,
                 resource=f"run/{run.id}", detail={}, request_id=rid)
    session.commit()
    return run
