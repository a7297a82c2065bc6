"""A record's JSON written from validated columns (bulk ingest) is byte for byte what the record model writes:
the payload a site encrypts and the content MAC that makes re-ingest idempotent do not depend on the path."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evoclone.federated.record import Event, Outcomes, PatientRecord, event_json, record_json

finite = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(min_size=1, max_size=12)  # any characters: quotes, commas, backslashes, non-ASCII
events = st.lists(st.tuples(finite, text, st.none() | finite, st.none() | text), max_size=30)
baseline = st.dictionaries(st.text(max_size=8), st.none() | finite | st.text(max_size=40), max_size=6)
outcomes = st.builds(Outcomes, binary=st.none() | st.integers(0, 1), continuous=st.none() | finite) | \
    st.builds(Outcomes, time_to_event=st.floats(0, 1e6), event=st.booleans())


@settings(max_examples=300, deadline=None)
@given(events=events, baseline=baseline, outcomes=outcomes, arm=st.none() | st.integers(0, 1))
def test_the_bulk_json_equals_the_models(events, baseline, outcomes, arm):
    head = PatientRecord(patient_id="p" * 16, site="north", baseline=baseline, arm=arm, outcomes=outcomes)
    time, code, value, unit = (list(c) for c in zip(*events)) if events else ([], [], [], [])
    whole = head.model_copy(update={"events": tuple(Event(time=t, code=c, value=v, unit=u) for t, c, v, u in events)})
    assert record_json(head, event_json(time, code, value, unit)) == whole.model_dump_json().encode()


def test_a_baseline_string_that_looks_like_the_slot_does_not_move_the_events():
    head = PatientRecord(patient_id="p" * 16, site="north", baseline={"g": ',"events":[],"notes":[],"outcomes":'})
    out = record_json(head, event_json([1.0], ["c"], [None], ["u"]))
    assert PatientRecord.model_validate_json(out).events == (Event(time=1.0, code="c", unit="u"),)
    assert PatientRecord.model_validate_json(out).baseline == head.baseline


def test_a_record_with_events_or_notes_is_refused():
    with pytest.raises(ValueError, match="without events or notes"):
        record_json(PatientRecord(patient_id="p" * 16, site="s", baseline={}, events=(Event(time=0, code="c"),)), [])
