"""The future grammar: every sequence that follows `allowed()` is well-formed, decodable and in budget."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evoclone.federated.grammar import Constraints, FutureGrammar, is_well_formed
from evoclone.federated.record import Arm, Event, Outcomes, PatientRecord
from evoclone.federated.tokenizer import CodeSpec, EventTokenizer, VocabSpec

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def vocabularies(draw) -> EventTokenizer:
    """A random vocabulary: valued and unvalued codes, a horizon anywhere from days to years."""
    codes = []
    for i in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            edges = tuple(sorted(draw(st.sets(st.integers(1, 99), min_size=0, max_size=3))))
            codes.append(CodeSpec(f"c{i}", "u", tuple(float(e) for e in edges), 0.0, 100.0, 5.0))
        else:
            codes.append(CodeSpec(f"c{i}"))
    horizon = draw(st.sampled_from([1.0, 3.0, 10.0, 45.0, 400.0, 1095.0]))
    max_len = draw(st.sampled_from([10, 12, 16, 24, 48, 96]))  # short contexts make futures hit the token budget
    return EventTokenizer(VocabSpec(numeric=(("age", (50.0,)),), codes=tuple(codes), horizon_days=horizon,
                                    max_len=max_len, prompt_budget=7))


def _value_code(tok: EventTokenizer, token: int) -> str | None:
    fam, payload = tok.kind[token]
    return payload[0] if fam == "value" else None


@SETTINGS
@given(data=st.data())
def test_following_allowed_always_gives_a_well_formed_decodable_future(data):
    tok = data.draw(vocabularies())
    max_new = data.draw(st.integers(3, 60))
    value_ids = [v for ids in tok.value_ids.values() for v in ids]
    # realistic bans: value bins (what the quality gate bans), codes and gaps
    pool = value_ids + list(tok.code_ids.values()) + tok.gap_ids
    banned = frozenset(data.draw(st.sets(st.sampled_from(pool)))) if pool else frozenset()
    first = frozenset(data.draw(st.sets(st.sampled_from(value_ids)))) if value_ids else frozenset()
    allow_censoring = data.draw(st.booleans())
    g = FutureGrammar(tok, max_new=max_new, constraints=Constraints(banned, first, allow_censoring))
    seq: list[int] = []
    seen: set[str] = set()
    while g.phase != "done":
        allowed = np.nonzero(g.allowed())[0]
        assert len(allowed) > 0, f"dead end after {tok.token_strings(seq)}"
        t = int(allowed[data.draw(st.integers(0, len(allowed) - 1))])
        code = _value_code(tok, t)
        if code is not None:
            effective = banned | (first if code not in seen else frozenset())
            if t in effective:  # documented fallback: every bin of this code is banned
                assert set(tok.value_ids[code]) <= effective
            seen.add(code)
        else:
            assert t not in banned, f"banned {tok.tokens[t]} used"
        g.advance(t)
        seq.append(t)
        assert len(seq) <= max_new
    assert seq[-1] == tok.eos_id and tok.eos_id not in seq[:-1]
    assert is_well_formed(tok, seq, max_new) == (True, "")
    assert is_well_formed(tok, seq + [tok.pad_id] * 3, max_new + 3)[0]  # padding after <eos> is fine
    dec = tok.decode_future(seq[:-1])
    times = [e.time for e in dec.events]
    assert times == sorted(times)
    assert all(0 < t <= tok.spec.horizon_days for t in times)
    assert times[-1] <= dec.time if times else True
    assert dec.time <= tok.spec.horizon_days
    assert dec.status in ("event", "censored", "end")
    if dec.status == "censored":
        assert allow_censoring
    # no code twice in one visit
    for t in set(times):
        codes = [e.code for e in dec.events if e.time == t]
        assert len(codes) == len(set(codes))


@st.composite
def records(draw, tok: EventTokenizer) -> PatientRecord:
    """A record over the vocabulary's codes with awkward times: fractional, same day, at the horizon."""
    h = tok.spec.horizon_days
    times = st.one_of(st.floats(-800, h + 50, allow_nan=False), st.sampled_from([0.0, 0.5, 1.0, h - 1, h, h - 0.5]))
    events = []
    for _ in range(draw(st.integers(0, 30))):
        c = tok.codes[draw(st.sampled_from(sorted(tok.codes)))]
        value = draw(st.floats(-50, 150, allow_nan=False)) if c.code in tok.value_ids else None
        events.append(Event(time=draw(times), code=c.code, value=value))
    tte = draw(st.none() | st.floats(0, h + 100, allow_nan=False) | st.sampled_from([0.0, 0.3, h]))
    outcomes = Outcomes() if tte is None else Outcomes(time_to_event=tte, event=draw(st.booleans()))
    return PatientRecord(patient_id="p" * 12, site="s", baseline={"age": 60.0}, arm=Arm.TREATMENT,
                         events=tuple(events), outcomes=outcomes)


@SETTINGS
@given(data=st.data())
def test_every_encoded_training_future_is_one_the_grammar_can_generate(data):
    # otherwise the model learns futures that constrained decoding forbids
    tok = data.draw(vocabularies())
    rec = data.draw(records(tok))
    enc = tok.encode(rec)
    future = enc.ids[enc.prompt_len:]
    max_new = tok.spec.max_len - enc.prompt_len
    assert len(enc.ids) <= tok.spec.max_len
    assert is_well_formed(tok, future, max_new) == (True, ""), tok.token_strings(future)
    dec = tok.decode_future(future[:-1])
    assert all(0 < e.time <= tok.spec.horizon_days for e in dec.events)


def _tok() -> EventTokenizer:
    return EventTokenizer(VocabSpec(codes=(CodeSpec("a", "u", (10.0,), 0.0, 20.0, 1.0), CodeSpec("b")),
                                    horizon_days=365.0, max_len=64, prompt_budget=16))


def test_advance_refuses_a_disallowed_token():
    tok = _tok()
    g = FutureGrammar(tok, max_new=20)
    with pytest.raises(ValueError, match="not allowed"):
        g.advance(tok.code_ids["a"])  # a code needs a gap first
    g.advance(tok.gap_ids[3])
    g.advance(tok.code_ids["a"])
    with pytest.raises(ValueError, match="not allowed"):
        g.advance(tok.code_ids["b"])  # code "a" must get its value
    with pytest.raises(ValueError, match="not allowed"):
        g.advance(tok.eos_id)
    g.advance(tok.value_ids["a"][1])
    with pytest.raises(ValueError, match="not allowed"):
        g.advance(tok.code_ids["a"])  # the same code twice in a visit
    assert g.phase == "after_item" and g.n == 3


def test_gaps_past_the_horizon_are_not_allowed():
    tok = _tok()
    g = FutureGrammar(tok, max_new=40)
    assert all(g.allowed()[tok.gap_ids[i]] == (tok.gap_days(i) <= 365) for i in range(len(tok.gap_ids)))
    with pytest.raises(ValueError, match="not allowed"):
        g.advance(tok.gap_ids[11])  # 447 days: past a 365-day horizon
    g.advance(tok.gap_ids[10])  # 315 days; then only gaps that still fit
    g.advance(tok.code_ids["b"])
    assert [i for i in range(1, len(tok.gap_ids)) if g.allowed()[tok.gap_ids[i]]] == \
        [i for i in range(1, len(tok.gap_ids)) if 315 + tok.gap_days(i) <= 365] == [1, 2, 3, 4, 5]


def test_censoring_only_when_allowed():
    tok = _tok()
    for allow in (False, True):
        g = FutureGrammar(tok, max_new=20, constraints=Constraints(allow_censoring=allow))
        g.advance(tok.gap_ids[4])
        assert g.allowed()[tok.outcome_ids["event"]]
        assert bool(g.allowed()[tok.outcome_ids["censored"]]) is allow
    # the replay used by the quality gate accepts censoring (real data has it)
    ok, _ = is_well_formed(tok, [tok.gap_ids[4], tok.outcome_ids["censored"], tok.eos_id], 20)
    assert ok


def test_is_well_formed_reports_why():
    tok = _tok()
    ok, why = is_well_formed(tok, [tok.gap_ids[4], tok.code_ids["a"], tok.outcome_ids["end"], tok.eos_id], 20)
    assert not ok and why.startswith("token 2")
    ok, why = is_well_formed(tok, [tok.gap_ids[4], tok.code_ids["b"]], 20)
    assert not ok and "does not end" in why
    ok, why = is_well_formed(tok, [tok.outcome_ids["end"], tok.eos_id, tok.code_ids["b"]], 20)
    assert not ok
    assert not is_well_formed(tok, [tok.gap_ids[4], tok.code_ids["b"], tok.outcome_ids["end"], tok.eos_id], 3)[0]


def test_max_new_must_leave_room_for_an_outcome():
    with pytest.raises(ValueError, match="max_new"):
        FutureGrammar(_tok(), max_new=2)


def test_a_future_that_fills_the_budget_still_ends_with_its_outcome_gap():
    # regression: gaps needed 5 tokens of room, so a full training future's outcome gap was refused
    tok = EventTokenizer(VocabSpec(numeric=(("age", (50.0,)),), codes=(CodeSpec("b"),), horizon_days=400.0,
                                   max_len=12, prompt_budget=8))
    rec = PatientRecord(patient_id="p" * 12, site="s", baseline={"age": 60.0}, arm=Arm.TREATMENT,
                        events=(Event(time=10, code="b"), Event(time=50, code="b")),
                        outcomes=Outcomes(time_to_event=200, event=True))
    enc = tok.encode(rec)
    assert tok.token_strings(enc.ids[enc.prompt_len:]) == ["gap:3", "code:b", "gap:5", "code:b", "gap:8",
                                                           "out:event", "<eos>"]
    assert is_well_formed(tok, enc.ids[enc.prompt_len:], tok.spec.max_len - enc.prompt_len) == (True, "")


def test_an_outcome_on_the_index_day_is_allowed():
    tok = _tok()
    rec = PatientRecord(patient_id="p" * 12, site="s", baseline={}, arm=Arm.CONTROL,
                        outcomes=Outcomes(time_to_event=0.0, event=True))
    enc = tok.encode(rec)
    future = enc.ids[enc.prompt_len:]
    assert tok.token_strings(future) == ["gap:0", "out:event", "<eos>"]
    assert is_well_formed(tok, future, 10)[0]
    assert tok.decode_future(future[:-1]).time == 0.0
