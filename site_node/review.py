"""The clinician review of generated twins: queue, approve, reject (regenerate), annotate, and feedback for training.

Every verdict and its access-log entry commit in one transaction: there is no review without its
log entry and no log entry for a verdict that was not stored.

A rejection's reason becomes a regeneration constraint (federated.grammar.Constraints):

| reason | constraint on the regenerated twin |
|---|---|
| lab_out_of_range | the value bins of each code's lowest and highest value in the rejected twin are banned |
| contradicts_history | a code's first future value must lie within 2 robust SDs of the patient's last value |
| implausible_trajectory | both of the above |
| wrong_dose_or_timing, other | no token ban (timing and dose are not tokens of this vocabulary): a fresh sample |

Feedback: `export_feedback(run_id=...)` writes the reviewed twins not yet used into
`feedback/<run_id>.jsonl` next to the training snapshot (label +1 approved: synthetic
augmentation for the generator; label -1 rejected: excluded patterns, with the reason) and
stamps each row's `used_in` with the run, so the site sees which round used which verdicts.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, func, select

from evoclone.federated.grammar import Constraints
from evoclone.federated.record import PatientRecord
from evoclone.privacy.scrub import scrub

from .access_log import AccessEntryCreate, append_access
from .errors import Conflict, InvalidInput, NotFound
from .review_models import RejectReason, ReviewStatus, TwinReview, TwinReviewCreate

UNKNOWN_REVIEW = "no twin review with that id at this site; list the queue with GET /api/v1/reviews"
HISTORY_SD = 2.0  # a reviewer's "contradicts history" tightens the gate's 4 SD consistency check to this
RUN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc)


def queue_twins(*, session: Session, items: list[TwinReviewCreate], now: datetime | None = None) -> list[TwinReview]:
    """Add twins to the queue as pending reviews in the caller's transaction."""
    rows = []
    for item in items:
        row = TwinReview(**item.model_dump(exclude={"events", "outcome"}), created_at=_now(now),
                         twin_json=json.dumps({"events": item.events, "outcome": item.outcome}))
        session.add(row)
        rows.append(row)
    session.flush()
    return rows


def list_reviews(*, session: Session, status: ReviewStatus | None = ReviewStatus.pending, study: str | None = None,
                 pseudonym: str | None = None, min_quality: float | None = None, limit: int = 100,
                 offset: int = 0) -> tuple[list[TwinReview], int]:
    """A page of reviews (oldest first) matching the filters, and how many match in all."""
    q = select(TwinReview)
    if status is not None:
        q = q.where(TwinReview.status == status.value)
    if study:
        q = q.where(TwinReview.study == study)
    if pseudonym:
        q = q.where(TwinReview.pseudonym == pseudonym)
    if min_quality is not None:
        q = q.where(TwinReview.quality >= min_quality)
    total = session.exec(select(func.count()).select_from(q.subquery())).one()
    rows = session.exec(q.order_by(TwinReview.id).offset(offset).limit(limit)).all()
    return list(rows), int(total)


def get_review(*, session: Session, review_id: int) -> TwinReview:
    """One review; NotFound otherwise."""
    row = session.get(TwinReview, review_id)
    if row is None:
        raise NotFound(UNKNOWN_REVIEW)
    return row


def decide(*, engine: sa.Engine, review_id: int, status: ReviewStatus, actor: str, role: str, reason: str,
           request_id: str = "", reject_reason: RejectReason | None = None, text: str = "",
           now: datetime | None = None) -> TwinReview:
    """Approve or reject a pending twin; the verdict and its access-log entry commit together or not at all."""
    if status == ReviewStatus.rejected and reject_reason is None:
        raise InvalidInput(f"a rejection needs a reason, one of: {', '.join(r.value for r in RejectReason)}")
    with Session(engine, expire_on_commit=False) as session:
        row = get_review(session=session, review_id=review_id)
        if row.status != ReviewStatus.pending.value:
            raise Conflict(f"twin review {review_id} was already {row.status}; verdicts are final (annotate instead)")
        row.status, row.reviewer, row.reviewed_at = status.value, actor, _now(now)
        row.reason = reject_reason.value if reject_reason is not None else None
        row.note = scrub(text)
        session.add(row)
        session.flush()
        append_access(session=session, at=_now(now), data=AccessEntryCreate(
            actor=actor, role=role, action=f"review.{'approve' if status == ReviewStatus.approved else 'reject'}",
            pseudonym=row.pseudonym, reason=reason, request_id=request_id))
        session.commit()
        return row


def annotate(*, engine: sa.Engine, review_id: int, text: str, actor: str, role: str, reason: str,
             request_id: str = "", now: datetime | None = None) -> TwinReview:
    """Add a scrubbed note to a twin (any status), with its access-log entry in the same transaction."""
    clean = scrub(text).strip()
    if not clean:
        raise InvalidInput("the annotation is empty; write a note")
    with Session(engine, expire_on_commit=False) as session:
        row = get_review(session=session, review_id=review_id)
        notes = json.loads(row.annotations)
        notes.append({"by": actor, "at": _now(now).isoformat(), "text": clean})
        row.annotations = json.dumps(notes)
        session.add(row)
        session.flush()
        append_access(session=session, at=_now(now), data=AccessEntryCreate(
            actor=actor, role=role, action="review.annotate", pseudonym=row.pseudonym, reason=reason,
            request_id=request_id))
        session.commit()
        return row


def reason_constraints(*, reason: RejectReason, tok: Any, patient: PatientRecord, events: list[list[Any]]
                       ) -> Constraints:
    """The bans a rejection reason puts on the regenerated twin (see the table in this module's docstring)."""
    from .inference import value_bins

    banned: set[int] = set()
    first: set[int] = set()
    if reason in (RejectReason.lab_out_of_range, RejectReason.implausible_trajectory):
        by_code: dict[str, list[float]] = {}
        for _t, code, value, _u in events:
            if value is not None and code in tok.value_ids:
                by_code.setdefault(code, []).append(float(value))
        for code, values in by_code.items():
            banned |= {value_bins(tok, code, min(values)), value_bins(tok, code, max(values))}
    if reason in (RejectReason.contradicts_history, RejectReason.implausible_trajectory):
        last: dict[str, float] = {}
        for e in patient.history(until=0.0):
            if e.value is not None and e.code in tok.value_ids:
                last[e.code] = e.value
        for code, v0 in last.items():
            allow = HISTORY_SD * tok.codes[code].scale
            first |= {v for i, v in enumerate(tok.value_ids[code]) if abs(tok.value_of(code, i) - v0) > allow}
    return Constraints(frozenset(banned), frozenset(first))


def queue_regenerated(*, engine: sa.Engine, parent: TwinReview, twin: dict[str, Any], model_version: str,
                      actor: str, role: str, reason: str, request_id: str = "",
                      now: datetime | None = None) -> TwinReview:
    """Queue the twin regenerated after a rejection, with its access-log entry, in one transaction."""
    item = TwinReviewCreate(study=parent.study, pseudonym=parent.pseudonym, model_version=model_version,
                            arm=parent.arm, quality=twin["quality"], copy_index=parent.copy_index,
                            events=twin["events"], outcome=twin["outcome"], parent_id=parent.id)
    with Session(engine, expire_on_commit=False) as session:
        (row,) = queue_twins(session=session, items=[item], now=now)
        append_access(session=session, at=_now(now), data=AccessEntryCreate(
            actor=actor, role=role, action="twin.regenerate", pseudonym=parent.pseudonym, reason=reason,
            request_id=request_id))
        session.commit()
        return row


def export_feedback(*, engine: sa.Engine, site_dir: Path, run_id: str, now: datetime | None = None
                    ) -> dict[str, Any]:
    """Write the verdicts no run has used yet to feedback/<run_id>.jsonl and mark them used by `run_id`."""
    import re

    if not re.match(RUN_PATTERN, run_id):
        raise InvalidInput("run_id must be a plain name (letters, digits, _ . : -), at most 64 characters")
    out = Path(site_dir) / "feedback" / f"{run_id}.jsonl"
    with Session(engine, expire_on_commit=False) as session:
        if session.exec(select(TwinReview.id).where(TwinReview.used_in == run_id).limit(1)).first() is not None:
            raise Conflict(f"feedback was already exported for run {run_id}; each run takes the verdicts once")
        rows = session.exec(select(TwinReview).where(TwinReview.used_in.is_(None),
                                                     TwinReview.status != ReviewStatus.pending.value)
                            .order_by(TwinReview.id)).all()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        with tmp.open("w") as f:
            for r in rows:
                twin = json.loads(r.twin_json)
                f.write(json.dumps({"review_id": r.id, "label": 1 if r.status == ReviewStatus.approved.value else -1,
                                    "reason": r.reason, "pseudonym": r.pseudonym, "arm": r.arm,
                                    "model_version": r.model_version, "quality": r.quality, **twin}) + "\n")
        when = _now(now)
        for r in rows:
            r.used_in, r.used_at = run_id, when
            session.add(r)
        tmp.rename(out)  # the file exists only if the rows are marked: a failed commit removes it below
        try:
            session.commit()
        except Exception:
            out.unlink(missing_ok=True)
            raise
    approved = sum(r.status == ReviewStatus.approved.value for r in rows)
    return {"run_id": run_id, "path": str(out), "approved": approved, "rejected": len(rows) - approved}


def feedback_usage(*, session: Session) -> list[dict[str, Any]]:
    """Per training run: how many approved and rejected twins it used (unused verdicts under run None)."""
    q = (select(TwinReview.used_in, TwinReview.status, func.count())
         .where(TwinReview.status != ReviewStatus.pending.value).group_by(TwinReview.used_in, TwinReview.status))
    usage: dict[str | None, dict[str, Any]] = {}
    for run, status, n in session.exec(q).all():
        usage.setdefault(run, {"run_id": run, "approved": 0, "rejected": 0})[status] = int(n)
    return sorted(usage.values(), key=lambda u: (u["run_id"] is None, u["run_id"] or ""))
