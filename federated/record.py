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
