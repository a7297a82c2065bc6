"""A site's answer to the post-training arm-effect query (federated.flower.arm_query): the noised sums with the
covariance of the release's noise, one ledger charge, and the same answer when the coordinator asks again."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest


def _ask(tmp_path: Path):
    import time

    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import Metadata, MessageType
    from flwr.app.message.message import make_message

    from evoclone.federated.flower.arm_query import answer
    from evoclone.federated.flower.client_app import _encoded
    from evoclone.federated.flower.packing import layout_of, pack
    from evoclone.federated.flower.tasks import FusionTask
    from evoclone.federated.simulator import cohort_records, simulate_cohort
    from evoclone.federated.snapshot import write_snapshot
    from evoclone.federated.summaries import summarize

    snapshot = tmp_path / "snapshot.jsonl.gz"
    records = cohort_records(simulate_cohort(patients=160, sites=1, seed=3))
    if not snapshot.exists():
        write_snapshot(snapshot, records, site="s1")
    app = Path(__file__).resolve().parents[2] / "federated" / "flower" / "app" / "pyproject.toml"
    rc = {**tomllib.loads(app.read_text())["tool"]["flwr"]["app"]["config"], "run-key": "arm-query"}
    task = FusionTask(rc)
    vocab = task.vocabulary(summarize(records, history_days=730.0, min_count=10, coarse=True))
    state = task.initial_state(vocab)
    cfg = ConfigRecord({"phase": "arm-shift", "vocabulary": json.dumps(vocab), "layout": layout_of(state),
                        "clip": 0.5})
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                    created_at=time.time(), ttl=3600.0, message_type=MessageType.QUERY)
    msg = make_message(meta, RecordDict({"arrays": pack(state), "config": cfg}))
    node = {"site": "s1", "snapshot": snapshot, "ledger": f"sqlite:///{tmp_path / 'site.db'}", "budget": 10.0,
            "delta": 1e-5, "state_dir": tmp_path, "feedback": tmp_path / "feedback.jsonl"}
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)
    reply = answer(msg, ctx, node, _encoded)
    assert str(reply.content.config_records["site"]["status"]) == "ok"
    rec = reply.content.config_records["arm-shift"]
    return json.loads(str(rec["sums"])), float(rec["noise-sd"]), np.asarray(json.loads(str(rec["noise-cov"])))


def _charges(tmp_path: Path) -> list:
    from evoclone.federated.stores.ledger import SqlLedgerStore

    store = SqlLedgerStore(url=f"sqlite:///{tmp_path / 'site.db'}")
    try:
        return store.open(epsilon_budget=10.0, delta=1e-5, accountant="rdp").entries
    finally:
        store.close()


def test_the_site_answers_once_with_the_release_noise_and_keeps_the_answer(tmp_path):
    from evoclone.federated.arm_shift import noise_cov, sensitivity

    sums, sd, cov = _ask(tmp_path)
    (charge,) = _charges(tmp_path)
    assert charge.round == 0 and charge.sample_rate == 1.0 and charge.steps == 1
    sigma = charge.noise_multiplier
    # (O - E, sqrt(3) E) at sensitivity 1: the noise on O and E is correlated, and its covariance goes to the
    # coordinator for the standard error
    assert sd == pytest.approx(sigma * sensitivity("time_to_event", 0.5)) and sd == pytest.approx(sigma)
    assert cov == pytest.approx(noise_cov("time_to_event", 0.5, sd))
    assert cov[0, 1] > 0
    # asked again (a coordinator restart): the kept answer, no second charge and no fresh noise
    assert _ask(tmp_path) == (sums, sd, pytest.approx(cov))
    assert len(_charges(tmp_path)) == 1
    # an answer kept before the release went through the map was noised independently: its covariance says so
    (kept_path,) = tmp_path.rglob("*.arm-shift.json")
    kept = json.loads(kept_path.read_text())
    del kept["noise_cov"]
    kept_path.write_text(json.dumps(kept))
    again, _, legacy = _ask(tmp_path)
    assert again == sums and legacy == pytest.approx(sigma ** 2 * 1.25 * np.eye(2))
    assert len(_charges(tmp_path)) == 1


def test_the_coordinator_reads_the_noise_covariance_or_an_older_sites_independent_sd():
    from flwr.app import ConfigRecord

    from evoclone.federated.flower.arm_query import arm_noise_cov

    cov = [[9.0, 2.25], [2.25, 2.25]]
    assert arm_noise_cov(ConfigRecord({"sums": "[]", "noise-sd": 3.0, "noise-cov": json.dumps(cov)})) == \
        pytest.approx(np.array(cov))
    assert arm_noise_cov(ConfigRecord({"sums": "[]", "noise-sd": 3.0})) == pytest.approx(9.0 * np.eye(2))
