"""Clinician feedback in federated training: the feedback file, the per-patient swap, and a ClientApp round
that trains on approved twins, holds rejected ones out, keeps one row per patient and records the round's use."""

from __future__ import annotations

import json

import pytest
import torch

from evoclone.federated.feedback import FORMAT, feedback_path, mix, read_feedback, twin_record, verdict, \
    write_feedback
from evoclone.federated.record import Arm
from evoclone.federated.simulator import cohort_records, simulate_cohort


@pytest.fixture(scope="module")
def records():
    return cohort_records(simulate_cohort(patients=150, sites=1, seed=11))


def _twin(record, review_id, label, arm="treatment"):
    future = [[t, c, v, u] for t, c, v, u in ((30.0, "LDL", 2.1, "mmol/L"), (90.0, "LDL", 1.9, "mmol/L"))]
    return verdict(review_id=review_id, label=label, pseudonym=record.patient_id, arm=arm, events=future,
                   outcome={"time": 200.0, "event": True}, reason=None if label > 0 else "lab_out_of_range")


def test_feedback_file_round_trips_and_damage_names_the_line(tmp_path, records):
    path = feedback_path(tmp_path / "snapshot.jsonl.gz")
    assert path == tmp_path / "feedback.jsonl" and read_feedback(path) == []  # none exported yet
    vs = [_twin(records[0], 1, 1), _twin(records[1], 2, -1, arm="control")]
    assert write_feedback(path, vs) == 2 and path.stat().st_mode & 0o777 == 0o600
    assert read_feedback(path) == vs
    path.write_text(json.dumps({"format": FORMAT}) + "\n" + vs[0].to_json() + "\n{\"label\": 1}\n")
    with pytest.raises(ValueError, match="line 3"):
        read_feedback(path)
    path.write_text("{}\n")
    with pytest.raises(ValueError, match="not an EvoClone feedback file"):
        read_feedback(path)
    with pytest.raises(ValueError, match="label"):
        verdict(review_id=1, label=0, pseudonym="P-x", arm="control", events=[], outcome={})


def test_twin_record_keeps_the_history_and_takes_the_twins_follow_up(records):
    r = next(r for r in records if any(e.time > 0 for e in r.events) and r.arm == Arm.CONTROL)
    t = twin_record(r, _twin(r, 1, 1))
    assert t.arm == Arm.TREATMENT and t.patient_id == r.patient_id and t.baseline == r.baseline
    assert [e for e in t.events if e.time <= 0] == [e for e in r.events if e.time <= 0]
    assert [(e.time, e.code, e.value) for e in t.events if e.time > 0] == [(30.0, "LDL", 2.1), (90.0, "LDL", 1.9)]
    assert (t.outcomes.time_to_event, t.outcomes.event) == (200.0, True)


def test_mix_swaps_one_row_per_patient_and_never_trains_on_rejected_twins(records):
    ids = [r.patient_id for r in records[:6]]
    train = [[i] * 3 for i in range(6)]
    approved = {ids[0]: [(_twin(records[0], 10, 1), [100])], ids[2]: [(_twin(records[2], 12, 1), [102])]}
    rejected = [_twin(records[4], 14, -1), _twin(records[40], 40, -1)]  # the second: not a training patient
    m = mix(train=train, train_ids=ids, twins=approved, rejected=rejected, rate=1.0, seed=3)
    assert len(m.train) == len(train) and m.train[0] == [100] and m.train[2] == [102]
    assert m.train[1] == train[1] and m.train[4] == train[4]  # no approved twin: the patient's own row
    assert [v.review_id for v in m.used] == [10, 12] and [v.review_id for v in m.held_out] == [14]
    assert mix(train=train, train_ids=ids, twins=approved, rejected=[], rate=0.0, seed=3).train == train
    half = [mix(train=train, train_ids=ids, twins=approved, rejected=[], rate=0.5, seed=s).train for s in range(40)]
    assert 0 < sum(h[0] == [100] for h in half) < 40  # swapped in some rounds, not all
    assert half[7] == mix(train=train, train_ids=ids, twins=approved, rejected=[], rate=0.5, seed=7).train
    with pytest.raises(ValueError, match="between 0 and 1"):
        mix(train=train, train_ids=ids, twins=approved, rejected=[], rate=1.5, seed=0)


def _round(tmp_path, records, feedback, mix_rate, *, run_key="run-a", server_round=1):
    from flwr.app import Context, RecordDict

    from evoclone.federated.flower.client_app import _round as client_round
    from evoclone.federated.flower.tasks import GeneratorTask
    from evoclone.federated.snapshot import write_snapshot
    from evoclone.federated.stores.ledger import SqlLedgerStore
    from evoclone.federated.summaries import summarize

    site = tmp_path / "site"
    site.mkdir(parents=True, exist_ok=True)
    snapshot = site / "snapshot.jsonl.gz"
    if not snapshot.exists():
        write_snapshot(snapshot, records, site="s1")
    if feedback is not None:
        write_feedback(feedback_path(snapshot), feedback)
    rc = {"model": "gpt", "gpt-size": "small", "gpt-max-len": 128, "seed": 0, "local-epochs": 1, "batch-size": 16,
          "learning-rate": 0.003, "max-grad-norm": 1.0, "grad-sample-mode": "hooks", "target-epsilon": 3.0,
          "accountant": "rdp", "num-server-rounds": 2, "run-key": run_key, "feedback-mix": mix_rate}
    task = GeneratorTask(rc)
    vocab = task.vocabulary(summarize(records, history_days=730.0, min_count=10, coarse=True))
    node = {"site": "s1", "snapshot": snapshot, "ledger": f"sqlite:///{site / 'site.db'}", "budget": 10.0,
            "delta": 1e-5, "state_dir": site, "feedback": feedback_path(snapshot)}
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)
    cfg = {"server-round": server_round, "vocabulary": json.dumps(vocab), "planned-rounds": 2}
    store = SqlLedgerStore(url=node["ledger"])
    try:
        torch.manual_seed(0)
        return client_round(cfg, lambda: task.initial_state(vocab), ctx, node, store)
    finally:
        store.close()


def test_a_generator_round_trains_on_approved_twins_and_records_which_it_used(tmp_path, records):
    from evoclone.federated.features import split_records
    from evoclone.federated.stores.feedback import FeedbackUseStore

    torch.set_num_threads(1)
    train = [records[i] for i in split_records(records)["train"] if records[i].arm is not None]
    val = [records[i] for i in split_records(records)["val"]]
    approved = [_twin(r, 100 + i, 1) for i, r in enumerate(train[:5])]
    rejected = [_twin(train[5], 200, -1), _twin(val[0], 201, -1)]  # a validation patient's twin is not used
    plain = _round(tmp_path / "plain", records, None, 1.0)
    fed = _round(tmp_path / "fed", records, approved + rejected, 1.0)
    assert plain.ok and fed.ok, (plain.reason, fed.reason)
    # one row per patient either way: the same examples, steps and privacy charge
    assert fed.metrics["num-examples"] == plain.metrics["num-examples"] == len(train)
    assert fed.metrics["epsilon"] == pytest.approx(plain.metrics["epsilon"])
    assert any(not torch.equal(fed.state[k], plain.state[k]) for k in plain.state)  # the twins were trained on
    uses = FeedbackUseStore(url=f"sqlite:///{tmp_path / 'fed' / 'site' / 'site.db'}")
    expected = [{"run_id": "run-a", "round": 1, "approved": [100, 101, 102, 103, 104], "rejected": [200]}]
    assert uses.usage() == expected
    # the round asked again (coordinator restart): the kept update, one charge, nothing recorded twice
    again = _round(tmp_path / "fed", records, approved + rejected, 1.0)
    assert again.ok and again.metrics["epsilon"] == pytest.approx(fed.metrics["epsilon"])
    assert uses.usage() == expected
    uses.close()
    # with mix 0 no twin is trained on: the update equals the plain one
    none = _round(tmp_path / "zero", records, approved + rejected, 0.0)
    assert all(torch.equal(none.state[k], plain.state[k]) for k in plain.state)
    # a damaged feedback file: the site sits the round out with a reason, nothing charged
    damaged = tmp_path / "bad"
    _round(damaged, records, None, 1.0, run_key="run-b")
    (damaged / "site" / "feedback.jsonl").write_text("not json\n")
    bad = _round(damaged, records, None, 1.0, run_key="run-c")
    assert not bad.ok and "feedback file is damaged" in bad.reason and "/" not in bad.reason.split("`")[0]
