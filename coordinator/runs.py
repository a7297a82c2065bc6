"""Federated runs of a study: launch, stop, status, and the rounds streamed into the store.

A run is a row first: the API inserts it as pending and the dispatcher of the process that
owns the SuperLink (`coordinator.dispatcher`) submits it, so any number of API workers can
launch runs. The ServerApp writes each round's aggregate record (rounds.json in the run's
directory: per site participation, epsilon spent, losses and validation metrics, never a
patient row); `ingest_rounds` copies it into RoundMetric rows as it grows.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, select

from .errors import NotFound, Conflict
from .models import RoundMetric, Run, RunStatus, Site, Study

MAX_COVARIATES = 256
Name = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class RunConfig(BaseModel):
    """What a sponsor chooses for one run; privacy comes from the study, never from here."""

    model_config = ConfigDict(extra="forbid")

    model: Literal["fusion", "gpt"] = "fusion"
    endpoint: Literal["time_to_event", "binary", "continuous"]
    covariates: list[str] = Field(min_length=1, max_length=MAX_COVARIATES)
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    local_epochs: int = Field(2, ge=1, le=50)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(3e-3, gt=0, le=1)
    members: int = Field(1, ge=1, le=20)
    min_sites: int = Field(0, ge=0, description="sites that must train for a round to count (0: all)")
    patience: int = Field(0, ge=0, le=100)
    secure_aggregation: bool = False
    round_timeout: float = Field(900.0, ge=10, le=86400)
    seed: int = 0


def run_dir(runs_dir: Path, run_id: int) -> Path:
    """Where the ServerApp writes a run's checkpoints, rounds.json and model."""
    return Path(runs_dir) / f"run-{run_id}"


def launch_run(*, session: Session, study_id: int, rounds: int, config: RunConfig, created_by: str) -> Run:
    """A pending run of an active study (the dispatcher submits it)."""
    study = session.get(Study, study_id)
    if study is None:
        raise NotFound(f"study {study_id} does not exist; list studies with `evoclone study list`")
    if getattr(study.status, "value", study.status) != "active":
        raise Conflict(f"study {study.name} is {getattr(study.status, 'value', study.status)}, not active; "
                       "activate it before launching runs")
    if config.min_sites > len(study.site_ids):
        raise Conflict(f"min_sites {config.min_sites} exceeds the study's {len(study.site_ids)} sites")
    busy = session.exec(select(Run).where(Run.study_id == study_id,
                                          Run.status.in_([RunStatus.pending, RunStatus.running]))).first()
    if busy is not None:
        raise Conflict(f"run {busy.id} of study {study.name} is still {busy.status.value}; wait for it or stop it")
    run = Run(study_id=study_id, rounds=rounds, config=config.model_dump(), created_by=created_by)
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def request_stop(*, session: Session, run_id: int) -> Run:
    """Mark a pending or running run to be stopped (the dispatcher asks the SuperLink)."""
    run = get_run(session=session, run_id=run_id)
    if run.status not in (RunStatus.pending, RunStatus.running):
        raise Conflict(f"run {run_id} is already {run.status.value}")
    if run.status == RunStatus.pending:
        run.status, run.finished_at = RunStatus.stopped, datetime.now(timezone.utc)
    else:
        run.config = {**run.config, "_stop_requested": True}
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def get_run(*, session: Session, run_id: int) -> Run:
    """One run, or NotFound."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist; list a study's runs with `evoclone round status`")
    return run


def list_runs(*, session: Session, study_id: int | None = None) -> list[Run]:
    """Runs, newest first (optionally of one study)."""
    q = select(Run).order_by(Run.id.desc())
    if study_id is not None:
        q = q.where(Run.study_id == study_id)
    return list(session.exec(q))


def round_metrics(*, session: Session, run_id: int) -> list[RoundMetric]:
    """A run's per-round aggregate and per-site rows, in round order."""
    q = select(RoundMetric).where(RoundMetric.run_id == run_id).order_by(RoundMetric.round, RoundMetric.id)
    return list(session.exec(q))


def flower_config(*, run: Run, study: Study, out_dir: Path) -> dict:
    """The Flower run config of a run (the same keys `evoclone train` submits)."""
    cfg = RunConfig.model_validate({k: v for k, v in run.config.items() if not k.startswith("_")})
    sites = len(study.site_ids)
    extra = {"study": study.name, "run": run.id, "columns": {"treatment": "arm", "covariates": cfg.covariates},
             "arm_levels": {a: i for i, a in enumerate(study.arms)}}
    return {"model": cfg.model, "num-server-rounds": run.rounds, "strategy": cfg.strategy,
            "local-epochs": cfg.local_epochs, "batch-size": cfg.batch_size, "learning-rate": cfg.learning_rate,
            "target-epsilon": float(study.target_epsilon), "delta": float(study.target_delta), "seed": cfg.seed,
            "endpoint": cfg.endpoint, "members": cfg.members, "covariates": json.dumps(cfg.covariates),
            "min-nodes": cfg.min_sites or sites, "expected-nodes": sites, "round-timeout": cfg.round_timeout,
            "patience": cfg.patience, "threads-per-node": 1, "run-key": f"run-{run.id}-{uuid.uuid4().hex[:8]}",
            "manifest-extra": json.dumps(extra), "out-dir": str(out_dir),
            "secure-aggregation": cfg.secure_aggregation}


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def ingest_rounds(*, session: Session, run_id: int, doc: dict) -> int:
    """Copy the rounds of a rounds.json document not yet stored; returns how many rounds were added.

    Only numbers are kept (losses, metrics, examples, seconds, epsilon): a site's entry holds
    nothing else that could be stored, and a site unknown to the coordinator is skipped.
    """
    have = {m.round for m in round_metrics(session=session, run_id=run_id)}
    sites = {s.name: s.id for s in session.exec(select(Site))}
    added = 0
    for r in doc.get("rounds", []):
        n = int(r.get("round", 0))
        if n in have:
            continue
        keep = {k: _number(r.get(k)) for k in ("trained", "train_loss", "val_loss", "val_metric", "wall_seconds")}
        session.add(RoundMetric(run_id=run_id, round=n, site_id=None,
                                metrics={k: v for k, v in keep.items() if v is not None}))
        for p in r.get("participation", []):
            site_id = sites.get(str(p.get("site")))
            if site_id is None:
                continue
            nums = {k: _number(v) for k, v in p.items() if k not in ("site", "status", "epsilon_spent")}
            nums["trained"] = 1.0 if p.get("status") == "ok" else 0.0
            session.add(RoundMetric(run_id=run_id, round=n, site_id=site_id,
                                    metrics={k: v for k, v in nums.items() if v is not None},
                                    epsilon=_number(p.get("epsilon_spent"))))
        added += 1
    if added:
        session.commit()
    return added


def finish_run(*, session: Session, run_id: int, status: RunStatus, flower_run_id: str | None = None) -> Run:
    """Record how a run ended."""
    run = get_run(session=session, run_id=run_id)
    run.status, run.finished_at = status, datetime.now(timezone.utc)
    if flower_run_id:
        run.flower_run_id = flower_run_id
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


class LaunchRequest(BaseModel):
    """POST body of a run launch."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(ge=1, le=1000)
    config: RunConfig


class SiteRoundPublic(BaseModel):
    """One site's aggregate figures in one round."""

    site_id: int
    epsilon: float | None
    metrics: dict[str, float]


class RoundPublic(BaseModel):
    """One round: the aggregate over sites and each site's part."""

    round: int
    metrics: dict[str, float]
    sites: list[SiteRoundPublic]


def rounds_view(metrics: list[RoundMetric]) -> list[RoundPublic]:
    """RoundMetric rows grouped by round."""
    out: dict[int, RoundPublic] = {}
    for m in metrics:
        r = out.setdefault(m.round, RoundPublic(round=m.round, metrics={}, sites=[]))
        if m.site_id is None:
            r.metrics = dict(m.metrics)
        else:
            r.sites.append(SiteRoundPublic(site_id=m.site_id, epsilon=m.epsilon, metrics=dict(m.metrics)))
    return [out[k] for k in sorted(out)]


def retrain_launcher(engine, *, enabled: bool):
    """The drift hook: relaunch a study's last finished run's configuration for a new retraining request.

    Only when `enabled` (settings.drift_auto_retrain; off by default: retraining spends every
    site's privacy budget, which a sponsor may prefer to decide by hand from GET /drift/retrain).
    A study without a finished run, or with a run still going, keeps its request open.
    """
    from .audit import append_event
    from .drift import update_retrain_request
    from .errors import CoordinatorError
    from .report_models import RetrainRequestUpdate, RetrainStatus

    def launch(request) -> None:
        if not enabled:
            return
        with Session(engine, expire_on_commit=False) as s:
            last = s.exec(select(Run).where(Run.study_id == request.study_id, Run.status == RunStatus.finished)
                          .order_by(Run.id.desc())).first()
            if last is None:
                return
            config = RunConfig.model_validate({k: v for k, v in last.config.items() if not k.startswith("_")})
            try:
                run = launch_run(session=s, study_id=request.study_id, rounds=last.rounds, config=config,
                                 created_by="coordinator:drift")
            except CoordinatorError:
                return  # not active, or a run is going on: the request stays open for the sponsor
            update_retrain_request(session=s, request_id=request.id,
                                   data=RetrainRequestUpdate(status=RetrainStatus.launched, run_id=run.id))
            append_event(session=s, action="run.launch", outcome="ok", actor="coordinator:drift", role="system",
                         resource=f"run/{run.id}", detail={"study": request.study_id, "retrain_request": request.id,
                                                           "features": list(request.features)[:20]})
            s.commit()

    return launch
