"""Quality gate: what it flags, the bans it teaches, and regeneration until a twin passes or is reported."""

from __future__ import annotations

import pytest
import torch

from evoclone.federated.generation import SamplingConfig
from evoclone.federated.generator_training import build_generator
from evoclone.federated.grammar import Constraints, is_well_formed
from evoclone.federated.models.twin_gpt import TwinGPT, TwinGPTConfig
from evoclone.federated.quality import PHYSIOLOGICAL_RANGES, check_twin, generate_twins, twin_record, value_range
from evoclone.federated.record import Arm, Event, Outcomes, PatientRecord
from evoclone.federated.simulator import cohort_records, simulate_cohort
from evoclone.federated.tokenizer import CodeSpec, EventTokenizer, VocabSpec

LDL = "13457-7"  # physiological range 10-500 mg/dL
TINY = {"size": "small", "n_embd": 16, "n_layer": 1, "n_head": 2}


def _tok(edges=(50.0, 150.0, 250.0), lo=-1000.0, hi=300.0) -> EventTokenizer:
    """LDL bins decode to -475 (absurd), 100, 200, 275 with the defaults."""
    codes = (CodeSpec(LDL, "mg/dL", edges, lo, hi, 10.0), CodeSpec("Z9", "u", (5.0,), 0.0, 10.0, 1.0), CodeSpec("dx"))
    return EventTokenizer(VocabSpec(numeric=(("age", (50.0, 70.0)),), categorical=(("sex", ("F", "M")),),
                                    codes=codes, horizon_days=365.0, max_len=64, prompt_budget=32))


def _patient(ldl: float | None = None, pid: str = "patient-0001") -> PatientRecord:
    events = (Event(time=-10.0, code=LDL, value=ldl, unit="mg/dL"),) if ldl is not None else ()
    return PatientRecord(patient_id=pid, site="s", baseline={"age": 61.0, "sex": "F"}, arm=Arm.CONTROL,
                         events=events + (Event(time=-200.0, code="dx"),),
                         outcomes=Outcomes(time_to_event=300.0, event=False))


def _future(tok: EventTokenizer, ldl_bin: int, *, gap: int = 5) -> list[int]:
    return [tok.gap_ids[gap], tok.code_ids[LDL], tok.value_ids[LDL][ldl_bin], tok.outcome_ids["end"], tok.eos_id]


def test_values_outside_physiological_ranges_are_flagged_and_their_bins_banned():
    tok = _tok()
    assert [tok.value_of(LDL, i) for i in range(4)] == [-475.0, 100.0, 200.0, 275.0]
    report = check_twin(tok, _patient(), _future(tok, 0), max_new=20)
    assert not report.passed and 0 < report.score < 1
    assert len(report.reasons) == 1 and "outside the physiological range (10.0, 500.0)" in report.reasons[0]
    assert report.constraints.banned == {tok.value_ids[LDL][0]}
    assert not report.constraints.first_value_banned
    ok = check_twin(tok, _patient(), _future(tok, 3), max_new=20)
    assert ok.passed and ok.score == 1.0 and ok.reasons == () and ok.constraints == Constraints()
    # codes outside the table use the vocabulary's range widened by half its width each side
    assert value_range(tok, LDL) == PHYSIOLOGICAL_RANGES[LDL]
    assert value_range(tok, "Z9") == (-5.0, 15.0)


def test_a_first_value_far_from_the_patients_last_is_flagged_with_first_value_bans():
    tok = _tok()
    report = check_twin(tok, _patient(ldl=100.0), _future(tok, 3), max_new=20)  # 275 on day 43
    assert not report.passed
    assert len(report.reasons) == 1 and f"{LDL} jumps from 100 to 275 by day 43" in report.reasons[0]
    # allowed: 10 x (4 + 2 x 53 / 365) = 42.9 around 100, so only the bin at 100 stays
    ids = tok.value_ids[LDL]
    assert report.constraints.first_value_banned == {ids[0], ids[2], ids[3]}
    assert not report.constraints.banned
    assert check_twin(tok, _patient(ldl=100.0), _future(tok, 1), max_new=20).passed
    # the same value is fine for a patient whose last measurement was close to it
    assert check_twin(tok, _patient(ldl=270.0), _future(tok, 3), max_new=20).passed
    # only the first future value is compared with the history
    later = [tok.gap_ids[5], tok.code_ids[LDL], ids[1], tok.gap_ids[5], tok.code_ids[LDL], ids[3],
             tok.outcome_ids["end"], tok.eos_id]
    assert check_twin(tok, _patient(ldl=100.0), later, max_new=20).passed


def test_ill_formed_sequences_fail_with_a_reason():
    tok = _tok()
    no_value = [tok.gap_ids[5], tok.code_ids[LDL], tok.outcome_ids["end"], tok.eos_id]
    no_eos = _future(tok, 1)[:-1]
    after_eos = _future(tok, 1) + [tok.code_ids["dx"]]
    over_budget = _future(tok, 1)
    for fut, budget in ((no_value, 20), (no_eos, 20), (after_eos, 20), (over_budget, 4)):
        report = check_twin(tok, _patient(), fut, max_new=budget)
        assert not report.passed and report.score == 0.0
        assert report.reasons[0].startswith("ill-formed: ")
        assert report.constraints == Constraints()
    # padding after <eos> is not a violation
    assert check_twin(tok, _patient(), _future(tok, 1) + [tok.pad_id] * 3, max_new=20).passed


def test_twin_record_keeps_the_patient_and_appends_the_future():
    tok = _tok()
    p = _patient(ldl=100.0)
    fut = [tok.gap_ids[5], tok.code_ids["dx"], tok.code_ids[LDL], tok.value_ids[LDL][1], tok.gap_ids[3],
           tok.outcome_ids["event"], tok.eos_id]
    r = twin_record(p, tok, fut, Arm.TREATMENT, copy=2)
    assert r.patient_id == "patient-0001~twin2" and r.arm == Arm.TREATMENT and r.baseline == p.baseline
    assert r.history() == p.history()
    assert [(e.time, e.code, e.value) for e in r.events if e.time > 0] == [(43.0, "dx", None), (43.0, LDL, 100.0)]
    assert r.outcomes.event is True and r.outcomes.time_to_event == 43.0 + tok.gap_days(3)


class _Bigram(TwinGPT):
    """Test double: next-token logits depend only on the last token, from a table."""

    def __init__(self, cfg: TwinGPTConfig, table: torch.Tensor) -> None:
        super().__init__(cfg)
        self.table = table  # (V, V)

    def forward(self, idx, targets=None, attention_mask=None, reduction="mean"):
        return self.table[idx], None  # (B, T, V)

    def step(self, idx, attention_mask, past=None):
        return self.table[idx[:, -1]], None  # (B, V)


def _rigged(tok: EventTokenizer) -> _Bigram:
    """Writes `gap:5 LDL <value> out:end <eos>`, preferring the highest LDL bin."""
    V = tok.vocab_size
    table = torch.zeros((V, V))
    for arm_id in tok.arm_ids.values():
        table[arm_id, tok.gap_ids[5]] = 10
    table[tok.gap_ids[5], tok.code_ids[LDL]] = 10
    ids = tok.value_ids[LDL]
    table[tok.code_ids[LDL], ids] = torch.arange(len(ids), dtype=torch.float) * 3
    table[ids, tok.outcome_ids["end"]] = 10
    table[tok.outcome_ids["end"], tok.eos_id] = 10
    return _Bigram(TwinGPTConfig(vocab_size=V, n_positions=tok.spec.max_len, **TINY), table)


SHARP = SamplingConfig(temperature=0.05, top_p=1.0, max_new=20)


def test_failures_are_regenerated_under_the_constraints_they_taught():
    tok = _tok()
    patients = [_patient(ldl=100.0), _patient(pid="patient-0002")]
    seen = []
    twins, failed, stats = generate_twins(_rigged(tok), tok, patients, arm=Arm.TREATMENT, n=2, sampling=SHARP,
                                          on_progress=seen.append)
    assert failed == [] and sum(seen) == 4
    assert [(t.row, t.copy, t.tries) for t in twins] == [(0, 0, 2), (0, 1, 2), (1, 0, 1), (1, 1, 1)]
    # the retry wrote the bin consistent with the patient's last LDL; the other patient keeps the first choice
    assert [e.value for e in twins[0].record.events if e.time > 0] == [100.0]
    assert [e.value for e in twins[2].record.events if e.time > 0] == [275.0]
    assert all(t.quality == 1.0 and t.arm == Arm.TREATMENT and t.record.arm == Arm.TREATMENT for t in twins)
    assert stats["requested"] == 4 and stats["passed"] == 4 and stats["failed"] == 0
    assert stats["first_try_pass_rate"] == 0.5


def test_twins_that_never_pass_are_reported_not_returned():
    tok = _tok(edges=(0.0,), lo=-1000.0, hi=5000.0)  # both LDL bins (-500, 2500) are impossible
    model = _rigged(tok)
    for tries in (1, 3):
        twins, failed, stats = generate_twins(model, tok, [_patient(), _patient(pid="patient-0002")],
                                              arm=Arm.CONTROL, n=1, sampling=SHARP, max_tries=tries)
        assert twins == []
        assert [(f.row, f.copy, f.tries, f.arm) for f in failed] == [(0, 0, tries, Arm.CONTROL),
                                                                      (1, 0, tries, Arm.CONTROL)]
        assert all("outside the physiological range" in f.reasons[0] for f in failed)
        assert stats["passed"] == 0 and stats["failed"] == 2
    with pytest.raises(ValueError, match="max_tries"):
        generate_twins(model, tok, [_patient()], arm=Arm.CONTROL, n=1, sampling=SHARP, max_tries=0)


def test_generate_twins_with_a_real_untrained_generator():
    records = cohort_records(simulate_cohort(patients=60, sites=2, seed=9))
    tok = EventTokenizer.fit(records, covariates=["age", "sex", "bmi"])
    model = build_generator(tok, **TINY)
    sampling = SamplingConfig(max_new=40, batch_size=4, seed=1)
    twins, failed, stats = generate_twins(model, tok, records[:5], arm=Arm.CONTROL, n=2, sampling=sampling)
    assert len(twins) + len(failed) == 10 == stats["requested"]
    for t in twins:
        p = records[t.row]
        assert t.record.history() == p.history() and t.record.baseline == p.baseline
        assert 0 <= t.record.outcomes.time_to_event <= tok.spec.horizon_days
        assert t.record.arm == Arm.CONTROL and 0 <= t.quality <= 1 and 1 <= t.tries <= 3
    for f in failed:
        assert f.reasons and f.tries == 3
    assert stats["unknown_tokens"] == {} and stats["truncated_histories"] == 0
    # the futures the gate passed are well-formed by replay
    futs = [tok.encode(t.record).ids for t in twins]
    assert all(is_well_formed(tok, f[tok.encode(t.record).prompt_len:], tok.spec.max_len)[0]
               for f, t in zip(futs, twins))
