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

Twins are encrypted at rest like patient records: each queued batch gets a data key (wrapped by
the site's master key in `data_key`) and each twin is sealed with AES-256-GCM bound to its
pseudonym. `open_twins` opens them for the API and for the feedback export.

Feedback: `write_feedback` writes every verdict next to the training snapshot (`feedback.jsonl`,
mode 0600; `evoclone site export-snapshot` and `POST /api/v1/reviews/feedback/export` call it).
The generator's ClientApp trains on approved twins as augmentation and holds rejected ones out
(federated.feedback), and records per round which verdicts it used in `feedback_use`;
`feedback_usage` reads that back, so the site sees which round used which verdicts.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, func, select

from evoclone.federated.feedback import Verdict, verdict, write_feedback as write_verdicts
from evoclone.federated.grammar import Constraints
from evoclone.federated.record import PatientRecord
from evoclone.federated.stores.feedback import FeedbackUseStore
from evoclone.privacy.envelope import WrappedKey, new_key, open_sealed, seal, unwrap, wrap
from evoclone.privacy.scrub import scrub

from .access_log import AccessEntryCreate, append_access
from .errors import Conflict, InvalidInput, NotFound
from .keyring import Keyring
from .review_models import RejectReason, ReviewStatus, TwinReview, TwinReviewCreate, TwinReviewPublic, public
from .store import DataKeyRow

UNKNOWN_REVIEW = "no twin review with that id at this site; list the queue with GET /api/v1/reviews"
HISTORY_SD = 2.0  # a reviewer's "contradicts history" tightens the gate's 4 SD consistency check to this
CONTEXT = b"twin_review\x1f"  # sealed twins are bound to this purpose and their pseudonym


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc)


def _data_key(session: Session, keyring: Keyring) -> tuple[int, bytes]:
    """A fresh data key, stored wrapped by the site's active master key: (its row id, the key)."""
    key = new_key()
    w = wrap(key, master_key=keyring.active_key, master_id=keyring.active)
    row = DataKeyRow(master_id=w.master_id, nonce=w.nonce, wrapped=w.ciphertext)
    session.add(row)
    session.flush()
    return int(row.id), key


def _seal(twin: dict[str, Any], *, pseudonym: str, data_key: bytes) -> bytes:
    return seal(json.dumps(twin).encode(), data_key=data_key, context=CONTEXT + pseudonym.encode())


def queue_twins(*, session: Session, items: list[TwinReviewCreate], keyring: Keyring,
                now: datetime | None = None) -> list[TwinReview]:
    """Add twins to the queue as pending reviews, sealed under one new data key, in the caller's transaction."""
    if not items:
        return []
    key_id, data_key = _data_key(session, keyring)
    rows = []
    for item in items:
        row = TwinReview(**item.model_dump(exclude={"events", "outcome"}), created_at=_now(now), data_key_id=key_id,
                         twin_sealed=_seal({"events": item.events, "outcome": item.outcome},
                                           pseudonym=item.pseudonym, data_key=data_key))
        session.add(row)
        rows.append(row)
    session.flush()
    return rows


def open_twins(*, session: Session, rows: list[TwinReview], keyring: Keyring) -> dict[int, dict[str, Any]]:
    """{review id: {"events": [...], "outcome": {...}}}, decrypted and authenticated (TamperedError otherwise)."""
    keys: dict[int, bytes] = {}
    out = {}
    for row in rows:
        if row.twin_sealed is None:  # written before encryption, not sealed yet (seal_legacy_reviews)
            out[row.id] = json.loads(row.twin_json)
            continue
        if row.data_key_id not in keys:
            k = session.get(DataKeyRow, row.data_key_id)
            keys[row.data_key_id] = unwrap(WrappedKey(k.master_id, k.nonce, k.wrapped),
                                           master_key=keyring.keys[k.master_id])
        out[row.id] = json.loads(open_sealed(row.twin_sealed, data_key=keys[row.data_key_id],
                                             context=CONTEXT + row.pseudonym.encode()))
    return out


def views(*, session: Session, rows: list[TwinReview], keyring: Keyring) -> list[TwinReviewPublic]:
    """The API views of review rows, their twins opened."""
    twins = open_twins(session=session, rows=rows, keyring=keyring)
    return [public(r, twins[r.id]) for r in rows]


def seal_legacy_reviews(*, engine: sa.Engine, keyring: Keyring) -> int:
    """Seal twins stored in plaintext before encryption at rest (migration 0004) and clear the plaintext."""
    with Session(engine) as session:
        rows = session.exec(select(TwinReview).where(TwinReview.twin_sealed.is_(None))).all()
        if not rows:
            return 0
        key_id, data_key = _data_key(session, keyring)
        for row in rows:
            row.twin_sealed = _seal(json.loads(row.twin_json), pseudonym=row.pseudonym, data_key=data_key)
            row.data_key_id, row.twin_json = key_id, None
            session.add(row)
        session.commit()
        return len(rows)


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


def queue_regenerated(*, engine: sa.Engine, keyring: Keyring, parent: TwinReview, twin: dict[str, Any],
                      model_version: str, actor: str, role: str, reason: str, request_id: str = "",
                      now: datetime | None = None) -> TwinReview:
    """Queue the twin regenerated after a rejection, with its access-log entry, in one transaction."""
    item = TwinReviewCreate(study=parent.study, pseudonym=parent.pseudonym, model_version=model_version,
                            arm=parent.arm, quality=twin["quality"], copy_index=parent.copy_index,
                            events=twin["events"], outcome=twin["outcome"], parent_id=parent.id)
    with Session(engine, expire_on_commit=False) as session:
        (row,) = queue_twins(session=session, items=[item], keyring=keyring, now=now)
        append_access(session=session, at=_now(now), data=AccessEntryCreate(
            actor=actor, role=role, action="twin.regenerate", pseudonym=parent.pseudonym, reason=reason,
            request_id=request_id))
        session.commit()
        return row


def write_feedback(*, engine: sa.Engine, keyring: Keyring, path: Path) -> dict[str, Any]:
    """Write every verdict to the feedback file the ClientApp reads (federated.feedback); returns the counts."""
    with Session(engine) as session:
        rows = list(session.exec(select(TwinReview).where(TwinReview.status != ReviewStatus.pending.value)
                                 .order_by(TwinReview.id)).all())
        twins = open_twins(session=session, rows=rows, keyring=keyring)
    verdicts: list[Verdict] = [
        verdict(review_id=r.id, label=1 if r.status == ReviewStatus.approved.value else -1, pseudonym=r.pseudonym,
                arm=r.arm, events=twins[r.id]["events"], outcome=twins[r.id]["outcome"], reason=r.reason)
        for r in rows]
    write_verdicts(Path(path), verdicts)
    approved = sum(v.label > 0 for v in verdicts)
    return {"approved": approved, "rejected": len(verdicts) - approved}


def feedback_usage(*, engine: sa.Engine) -> list[dict[str, Any]]:
    """Per training run and round: the approved twins it trained on and the rejected ones it held out (ids)."""
    store = FeedbackUseStore(engine=engine)
    return [{**u, "approved_count": len(u["approved"]), "rejected_count": len(u["rejected"])} for u in store.usage()]
