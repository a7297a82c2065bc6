"""Event tokenizer: deterministic vocabulary, round trips, unknowns, truncation, versioning."""

from __future__ import annotations

import bisect
import dataclasses
import json
import math

import pytest

from evoclone.federated.grammar import is_well_formed
from evoclone.federated.record import Arm, Event, Outcomes, PatientRecord
from evoclone.federated.simulator import cohort_records, simulate_cohort
from evoclone.federated.tokenizer import (
    GAP_EDGES,
    UNK,
    CodeSpec,
    EventTokenizer,
    VocabSpec,
)

COVARIATES = ["age", "sex", "bmi", "genotype", "diabetes", "hypertension", "ckd", "prior_mi"]


@pytest.fixture(scope="module")
def records() -> list[PatientRecord]:
    return cohort_records(simulate_cohort(patients=150, sites=3, seed=3))


@pytest.fixture(scope="module")
def tok(records) -> EventTokenizer:
    return EventTokenizer.fit(records, covariates=COVARIATES, meta={"indication": "ascvd"})


def _future_times(tok: EventTokenizer, r: PatientRecord) -> list[float]:
    end = min(r.outcomes.time_to_event, tok.spec.horizon_days)
    return sorted({e.time for e in r.events if 0 < e.time <= end})


def test_fit_and_encode_are_deterministic(records, tok):
    again = EventTokenizer.fit(list(records), covariates=COVARIATES, meta={"indication": "ascvd"})
    assert again.tokens == tok.tokens and again.hash() == tok.hash()
    assert [tok.encode(r).ids for r in records[:20]] == [again.encode(r).ids for r in records[:20]]
    # the hash covers the vocabulary: another one hashes differently
    other = EventTokenizer.fit(records, covariates=COVARIATES[:3])
    assert other.hash() != tok.hash()
    assert len(tok.hash()) == 64


def test_sequences_follow_the_documented_layout(records, tok):
    enc = tok.encode(records[0], meta={"indication": "ascvd"})
    s = tok.token_strings(enc.ids)
    assert s[0] == "<bos>" and s[1] == "meta:indication=ascvd" and s[-1] == "<eos>"
    assert s[enc.prompt_len - 1] == ("arm:treatment" if records[0].arm == Arm.TREATMENT else "arm:control")
    assert s[enc.prompt_len - 2].startswith("gap:")
    assert [t.split(":")[1].split("#")[0].split("=")[0] for t in s[2:2 + len(COVARIATES)]] == \
        [n for n, _ in tok.spec.numeric] + [n for n, _ in tok.spec.categorical]
    assert not enc.unknown and enc.truncated_visits == 0


def test_round_trip_of_the_future(records, tok):
    """Decoded futures have the same visits and codes, values in the right bin, times and outcome close."""
    time_errors = []
    for r in records:
        enc = tok.encode(r)
        assert enc.truncated_visits == 0
        dec = tok.decode_future(enc.ids[enc.prompt_len:-1])
        truth_times = _future_times(tok, r)
        dec_times = sorted({e.time for e in dec.events})
        assert len(dec_times) == len(truth_times)
        for t_true, t_dec in zip(truth_times, dec_times):
            true_events = sorted((e for e in r.events if e.time == t_true), key=lambda e: e.code)
            dec_events = sorted((e for e in dec.events if e.time == t_dec), key=lambda e: e.code)
            assert [e.code for e in true_events] == [e.code for e in dec_events]
            for a, b in zip(true_events, dec_events):
                edges = tok.codes[a.code].edges
                assert bisect.bisect_right(edges, b.value) == bisect.bisect_right(edges, a.value)
                assert b.unit == a.unit
            time_errors.append(abs(t_dec - t_true))
        o = r.outcomes
        h = tok.spec.horizon_days
        if o.time_to_event >= h and not (o.event and o.time_to_event == h):
            assert dec.status == "end" and dec.time == h
        else:
            assert dec.status == ("event" if o.event else "censored")
            # the outcome gap is taken from the decoded clock: off by at most half its bin
            assert abs(dec.time - o.time_to_event) <= max(3.0, 0.35 * o.time_to_event)
    # gaps are chosen against the decoded clock, so errors do not accumulate over the visits
    assert max(time_errors) <= 100 and sum(time_errors) / len(time_errors) < 12


def test_every_simulated_future_is_replayable_by_the_grammar(records, tok):
    for r in records:
        enc = tok.encode(r)
        ok, why = is_well_formed(tok, enc.ids[enc.prompt_len:], tok.spec.max_len - enc.prompt_len)
        assert ok, why


def test_gap_bins():
    tok = EventTokenizer(VocabSpec())
    assert [tok.gap_bin(d) for d in (0, 0.5, 1, 3.9, 4, 30, 31, 730, 731, 5000)] == [0, 0, 1, 1, 2, 4, 5, 12, 13, 13]
    for i in range(1, len(GAP_EDGES) - 1):
        assert GAP_EDGES[i] <= tok.gap_days(i) < GAP_EDGES[i + 1]
    assert tok.gap_days(0) == 0.0


def _patient(**kw) -> PatientRecord:
    base = dict(patient_id="patient-0001", site="s", arm=Arm.CONTROL,
                baseline={"age": 60.0, "sex": "F", "bmi": 27.0, "genotype": "CC", "diabetes": 0,
                          "hypertension": 1, "ckd": 0, "prior_mi": 0},
                events=(Event(time=-30, code="13457-7", value=120.0, unit="mg/dL"),),
                outcomes=Outcomes(time_to_event=400.0, event=True))
    return PatientRecord(**{**base, **kw})


def test_unknown_codes_categories_and_meta_map_to_their_family_token_and_are_counted(tok):
    rec = _patient(baseline={**_patient().baseline, "sex": "X", "genotype": "ZZ"},
                   events=(Event(time=-30, code="NOT-A-CODE", value=1.0), Event(time=-30, code="13457-7", value=99.0),
                           Event(time=20, code="ALSO-NOT", value=None)))
    enc = tok.encode(rec, meta={"indication": "oncology"})
    s = tok.token_strings(enc.ids)
    assert enc.unknown == {"cov": 2, "code": 2, "meta": 1}
    assert s.count(UNK["cov"]) == 2 and s.count(UNK["code"]) == 2 and s.count(UNK["meta"]) == 1
    assert "meta:indication=ascvd" not in s
    # a missing meta value is unknown too; the known one is not
    assert tok.encode(rec).unknown["meta"] == 1
    assert "meta" not in tok.encode(_patient(), meta={"indication": "ascvd"}).unknown


def test_nan_covariate_is_its_own_token_and_infinity_is_refused(tok):
    enc = tok.encode(_patient(baseline={**_patient().baseline, "bmi": math.nan, "sex": None}),
                     meta={"indication": "ascvd"})
    s = tok.token_strings(enc.ids)
    assert "cov:bmi#na" in s and "cov:sex#na" in s and not enc.unknown
    with pytest.raises(ValueError, match="'bmi' must be a finite number"):
        tok.encode(_patient(baseline={**_patient().baseline, "bmi": math.inf}))
    with pytest.raises(ValueError, match="'age' must be a finite number"):
        tok.encode(_patient(baseline={**_patient().baseline, "age": "sixty"}))


def test_long_history_is_truncated_from_the_oldest_visits(tok):
    visits = [Event(time=-700 + 7 * i, code=c, value=v, unit="")
              for i in range(90) for c, v in (("13457-7", 100.0 + i), ("8480-6", 130.0))]
    rec = _patient(events=tuple(visits))
    roomy = EventTokenizer(dataclasses.replace(tok.spec, prompt_budget=tok.spec.max_len - 3))
    full = roomy.encode(rec, with_future=False)
    cut = tok.encode(rec, with_future=False)
    assert full.truncated_visits == 0 and cut.truncated_visits > 0
    assert cut.prompt_len <= tok.spec.prompt_budget < full.prompt_len
    n_static = 1 + len(tok.spec.meta) + len(tok.spec.numeric) + len(tok.spec.categorical)
    assert cut.ids[:n_static] == full.ids[:n_static]
    # what is kept is the newest history: a suffix of the full prompt (each visit is gap + 2 x (code, value))
    assert full.ids[-(cut.prompt_len - n_static):] == cut.ids[n_static:]
    assert (full.prompt_len - cut.prompt_len) == 5 * cut.truncated_visits
    assert cut.ids == tok.encode(rec).ids[:cut.prompt_len]


def test_future_longer_than_max_len_drops_the_latest_visits(tok):
    spec = dataclasses.replace(tok.spec, max_len=80, prompt_budget=40)
    short = EventTokenizer(spec)
    future = tuple(Event(time=5.0 * (i + 1), code="8480-6", value=130.0, unit="") for i in range(60))
    rec = _patient(events=future, outcomes=Outcomes(time_to_event=900.0, event=False))
    enc = short.encode(rec)
    assert len(enc.ids) <= 80 and enc.ids[-1] == short.eos_id
    assert enc.truncated_visits > 0
    ok, why = is_well_formed(short, enc.ids[enc.prompt_len:], 80 - enc.prompt_len)
    assert ok, why
    dec = short.decode_future(enc.ids[enc.prompt_len:-1])
    assert len(dec.events) == 60 - enc.truncated_visits and dec.status == "censored"
    assert dec.events[0].time == short.gap_days(short.gap_bin(5.0))  # the earliest visits are the ones kept


def test_vocab_spec_round_trips_through_json(tok):
    d = json.loads(json.dumps(tok.spec.to_dict()))
    assert VocabSpec.from_dict(d) == tok.spec
    again = EventTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.tokens == tok.tokens and again.hash() == tok.hash()


def test_altered_token_list_or_other_version_is_refused(tok):
    d = json.loads(json.dumps(tok.to_dict()))
    d["tokens"][5], d["tokens"][6] = d["tokens"][6], d["tokens"][5]
    with pytest.raises(ValueError, match="altered"):
        EventTokenizer.from_dict(d)
    d = json.loads(json.dumps(tok.to_dict()))
    d["spec"]["version"] = "0"
    with pytest.raises(ValueError, match="version '0' is not supported"):
        EventTokenizer.from_dict(d)


def test_prompt_budget_must_leave_room_to_generate():
    with pytest.raises(ValueError, match="prompt_budget"):
        VocabSpec(max_len=40, prompt_budget=38)
    assert VocabSpec(max_len=40, prompt_budget=37).prompt_budget == 37
    # fit's default adapts to a short context
    rec = _patient()
    assert EventTokenizer.fit([rec], min_count=1, max_len=24).spec.prompt_budget == 21


def test_counterfactual_prompts_differ_only_in_the_arm(records, tok):
    r = records[7]
    a = tok.encode(r, arm=Arm.CONTROL, with_future=False).ids
    b = tok.encode(r, arm=Arm.TREATMENT, with_future=False).ids
    assert len(a) == len(b)
    assert [i for i in range(len(a)) if a[i] != b[i]] == [len(a) - 1]
    assert {a[-1], b[-1]} == {tok.arm_ids[Arm.CONTROL], tok.arm_ids[Arm.TREATMENT]}
    with pytest.raises(ValueError, match="has no arm"):
        tok.encode(_patient(arm=None))


def test_codes_without_values_and_values_without_codes():
    tok = EventTokenizer(VocabSpec(codes=(CodeSpec("a", "mg", (1.0, 2.0), 0.0, 3.0, 1.0), CodeSpec("dx")),
                                   max_len=64, prompt_budget=20))
    assert "val:dx#0" not in tok.tokens and len(tok.value_ids["a"]) == 3
    assert [tok.value_of("a", i) for i in range(3)] == [0.5, 1.5, 2.5]
    rec = PatientRecord(patient_id="patient-0002", site="s", baseline={}, arm=Arm.TREATMENT,
                        events=(Event(time=3, code="dx"), Event(time=3, code="a", value=None),
                                Event(time=9, code="a", value=2.2)),
                        outcomes=Outcomes(time_to_event=100.0, event=True))
    enc = tok.encode(rec)
    # a valued code with its value missing is dropped (and counted); the visit keeps its other codes
    assert enc.unknown == {"value": 1}
    dec = tok.decode_future(enc.ids[enc.prompt_len:-1])
    assert [(e.code, e.value, e.unit) for e in dec.events] == [("dx", None, None), ("a", 2.5, "mg")]


def test_same_day_duplicates_and_empty_visits():
    tok = EventTokenizer(VocabSpec(codes=(CodeSpec("a", "mg", (1.0, 2.0), 0.0, 3.0, 1.0), CodeSpec("dx")),
                                   max_len=64, prompt_budget=20))
    rec = PatientRecord(patient_id="patient-0003", site="s", baseline={}, arm=Arm.CONTROL,
                        events=(Event(time=-100, code="dx"), Event(time=-5, code="a", value=None),
                                Event(time=9, code="a", value=0.5), Event(time=9, code="a", value=2.5)),
                        outcomes=Outcomes(time_to_event=100.0, event=False))
    enc = tok.encode(rec)
    # one code once per visit (the grammar's rule): the first measurement is kept, the repeat counted
    assert enc.unknown == {"value": 1, "duplicate": 1}
    s = tok.token_strings(enc.ids)
    assert s[s.index("arm:control") + 1:] == ["gap:3", "code:a", "val:a#0", "gap:6", "out:censored", "<eos>"]
    # the outcome gap counts from the decoded day 11 (89 days: gap:6); the day -5 visit lost its only
    # event, so the index gap counts from day -100 (100 days: gap:7, not 5 days: gap:2)
    assert s[s.index("arm:control") - 1] == "gap:7"
    assert tok.gap_bin(100) == 7 and tok.gap_bin(5) == 2
