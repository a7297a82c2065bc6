"""The canonical patient record every adapter produces and every model consumes."""

from __future__ import annotations

from datetime import date
from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Arm(IntEnum):
    """Treatment arm of a two-arm trial."""

    CONTROL = 0
    TREATMENT = 1


class Event(BaseModel):
    """One timeline entry: a coded observation at a time relative to the index date."""

    model_config = ConfigDict(frozen=True)

    # finiteness is checked by pydantic's core (allow_inf_nan), not a Python validator:
    # records hold millions of events
    time: float = Field(allow_inf_nan=False, description="days since the index date (negative: history before it)")
    code: str = Field(min_length=1, description="coded concept, e.g. a LOINC code")
    value: float | None = Field(None, allow_inf_nan=False)
    unit: str | None = None


class Outcomes(BaseModel):
    """Trial endpoints; any may be missing for a given patient."""

    model_config = ConfigDict(frozen=True)

    time_to_event: float | None = Field(None, ge=0, description="days from index to event or censoring")
    event: bool | None = Field(None, description="True: event observed; False: censored")
    binary: int | None = Field(None, ge=0, le=1)
    continuous: float | None = None

    @model_validator(mode="after")
    def _tte_pair(self) -> "Outcomes":
        if (self.time_to_event is None) != (self.event is None):
            raise ValueError("time_to_event and event must be given together")
        return self


class Note(BaseModel):
    """Free text already scrubbed of identifiers (report text, clinical notes)."""

    model_config = ConfigDict(frozen=True)

    time: float
    kind: str
    text: str


class PatientRecord(BaseModel):
    """An anonymized patient: baseline covariates, arm, timeline and outcomes.

    `patient_id` is always a site pseudonym, never a hospital identifier.
    """

    model_config = ConfigDict(frozen=True)

    patient_id: str = Field(min_length=8)
    site: str
    index_date: date | None = Field(None, description="date-shifted index (enrolment) date")
    baseline: dict[str, float | str | None]
    arm: Arm | None = Field(None, description="trial arm; None for observational (historical) patients")
    events: tuple[Event, ...] = ()
    notes: tuple[Note, ...] = ()
    outcomes: Outcomes = Outcomes()

    def history(self, *, until: float = 0.0) -> tuple[Event, ...]:
        """Events at or before `until` days, in time order."""
        return tuple(e for e in sorted(self.events, key=lambda e: e.time) if e.time <= until)


# --- the record's JSON straight from validated columns (bulk ingest) -------------------------------------------
# A site ingesting millions of events spent a third of its time having pydantic validate per-event objects the
# ingest had already validated column-wise. These helpers write the same bytes `PatientRecord.model_dump_json()`
# writes (pydantic-core's own serializer formats every number and string), with per-event work done in bulk.

_EVENTS_SLOT = b',"events":[],"notes":[],"outcomes":'


def _json_scalars(values: list) -> list[str]:
    """Each float or None of `values` as pydantic-core writes it (none of them contains a comma)."""
    from pydantic_core import to_json

    text = to_json(values).decode()
    return text[1:-1].split(",") if len(text) > 2 else []


def event_json(time: list[float], code: list[str], value: list[float | None], unit: list[str | None]) -> list[str]:
    """Each event's JSON, as `Event(time=..., code=..., value=..., unit=...).model_dump_json()` writes it, for
    events already validated column-wise (finite times and values, non-empty codes)."""
    from pydantic_core import to_json

    strings = {s: to_json(s).decode() for s in {*code, *unit}}
    return [f'{{"time":{t},"code":{strings[c]},"value":{v},"unit":{strings[u]}}}'
            for t, c, v, u in zip(_json_scalars(time), code, _json_scalars(value), unit)]


def record_json(record: PatientRecord, events: list[str]) -> bytes:
    """`record`'s JSON with `events` (from `event_json`) as its timeline: the bytes `model_dump_json()` writes for
    the record holding those events. `record` is validated, and has no events and no notes."""
    if record.events or record.notes:
        raise ValueError("record_json takes a record without events or notes")
    head = record.model_dump_json().encode()
    at = head.rfind(_EVENTS_SLOT)  # the outcomes after it hold numbers and booleans only
    if at < 0:
        raise RuntimeError("PatientRecord's JSON layout changed: events are no longer followed by notes, outcomes")
    return b"".join((head[:at], b',"events":[', ",".join(events).encode(), b'],"notes":[],"outcomes":',
                     head[at + len(_EVENTS_SLOT):]))
