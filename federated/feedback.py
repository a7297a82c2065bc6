"""Clinician feedback in federated training: approved twins as augmentation, rejected twins held out.

The site writes its reviewers' verdicts next to the training snapshot (`feedback.jsonl`, one
verdict per line, mode 0600, by `site_node.review.write_feedback`). In every round of a
generator run the ClientApp gives each training patient who has approved twins one of those
twins instead of the patient's own sequence with probability `feedback-mix` (run config,
default 0.5): clinician-filtered self-training, the generator learns more from the
trajectories clinicians accepted. Rejected twins are never trained on. Twins of validation
patients are not used (they would leak into the validation loss).

Privacy: each patient still gives exactly one training example per round, and that example
is a function of that patient's data alone (record and reviewed twins), so the per-patient
DP-SGD guarantee and its Opacus accounting are unchanged. Which verdicts each round used
(approved, trained on) or held out (rejected) is recorded in the site's database
(`stores.feedback`); nothing about them leaves the site.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .record import Arm, Event, PatientRecord

FORMAT = "evoclone-feedback/1"
FEEDBACK_FILE = "feedback.jsonl"  # next to the training snapshot
ARMS = {"control": Arm.CONTROL, "treatment": Arm.TREATMENT, "0": Arm.CONTROL, "1": Arm.TREATMENT,
        "CONTROL": Arm.CONTROL, "TREATMENT": Arm.TREATMENT}


@dataclass(frozen=True)
class Verdict:
    """One reviewed twin: +1 approved, -1 rejected; events are [time, code, value, unit], days after index."""

    review_id: int
    label: int
    pseudonym: str
    arm: Arm
    events: tuple[tuple[float, str, float | None, str | None], ...]
    outcome: dict[str, Any]
    reason: str | None = None

    def to_json(self) -> str:
        return json.dumps({"review_id": self.review_id, "label": self.label, "pseudonym": self.pseudonym,
                           "arm": self.arm.name.lower(), "events": [list(e) for e in self.events],
                           "outcome": self.outcome, "reason": self.reason})


def verdict(*, review_id: int, label: int, pseudonym: str, arm: str, events: Iterable, outcome: dict,
            reason: str | None = None) -> Verdict:
    """A checked verdict (ValueError naming the bad field otherwise)."""
    if label not in (1, -1):
        raise ValueError(f"label must be 1 (approved) or -1 (rejected), got {label!r}")
    if str(arm) not in ARMS:
        raise ValueError(f"arm must be control or treatment, got {arm!r}")
    evs = []
    for e in events:
        t, code, value, unit = e
        evs.append((float(t), str(code), None if value is None else float(value), None if unit is None else str(unit)))
    return Verdict(int(review_id), label, str(pseudonym), ARMS[str(arm)], tuple(evs), dict(outcome or {}), reason)


def write_feedback(path: Path, verdicts: Iterable[Verdict]) -> int:
    """Write verdicts atomically (mode 0600): a header line, then one verdict per line; returns how many."""
    import os

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    n = 0
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"format": FORMAT}) + "\n")
        for v in verdicts:
            f.write(v.to_json() + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_feedback(path: Path | None) -> list[Verdict]:
    """The verdicts of a feedback file; [] when there is none; ValueError naming the line when it is damaged."""
    if path is None or not Path(path).is_file():
        return []
    out = []
    with Path(path).open() as f:
        header = f.readline()
        try:
            fmt = json.loads(header).get("format")
        except (ValueError, AttributeError):
            fmt = None
        if fmt != FORMAT:
            raise ValueError(f"{path}: not an EvoClone feedback file (line 1); export it again with "
                             "`evoclone site export-snapshot`")
        for i, line in enumerate(f, start=2):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(verdict(review_id=d["review_id"], label=d["label"], pseudonym=d["pseudonym"],
                                   arm=d["arm"], events=d["events"], outcome=d.get("outcome") or {},
                                   reason=d.get("reason")))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: line {i} is not a verdict ({type(exc).__name__}); export it again with "
                                 "`evoclone site export-snapshot`") from None
    return out


def feedback_path(snapshot: Path) -> Path:
    """Where a site's feedback file lies: next to its training snapshot."""
    return Path(snapshot).with_name(FEEDBACK_FILE)


def twin_record(record: PatientRecord, v: Verdict) -> PatientRecord:
    """The patient's record with its follow-up replaced by the twin: same history, the twin's arm, events, outcome."""
    history = [e for e in record.events if e.time <= 0]
    future = [Event(time=t, code=c, value=val, unit=u) for t, c, val, u in v.events if t > 0]
    outcomes = record.outcomes
    if v.outcome.get("time") is not None:
        outcomes = outcomes.model_copy(update={"time_to_event": float(v.outcome["time"]),
                                               "event": bool(v.outcome.get("event"))})
    return record.model_copy(update={"arm": v.arm, "events": tuple(history + future), "outcomes": outcomes})


@dataclass
class Mixed:
    """A round's training sequences after feedback, and the verdicts it used and held out."""

    train: list[list[int]]
    used: list[Verdict]
    held_out: list[Verdict]


def mix(*, train: list[list[int]], train_ids: list[str], twins: dict[str, list[tuple[Verdict, list[int]]]],
        rejected: list[Verdict], rate: float, seed: int) -> Mixed:
    """Swap each training patient's sequence for one of its approved twins with probability `rate`.

    `twins` maps a pseudonym to its approved twins (verdict, token ids); one row per patient
    stays one row per patient. The draw is seeded per round, so a re-trained round is the same.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"feedback-mix must be between 0 and 1, got {rate}")
    if len(train) != len(train_ids):
        raise ValueError("train sequences and pseudonyms differ in length")
    rng = random.Random(seed)
    out, used = list(train), []
    for i, pid in enumerate(train_ids):
        options = twins.get(pid)
        if options and rng.random() < rate:
            v, ids = options[rng.randrange(len(options))]
            out[i] = ids
            used.append(v)
    in_train = set(train_ids)
    return Mixed(out, used, [v for v in rejected if v.pseudonym in in_train])
