"""`evoclone twins ...` end to end on a real trial table (GBSG2) and a simulated cohort with events."""

import json

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from evoclone.cli.main import app
from evoclone.federated.simulator import cohort_records, simulate_cohort

runner = CliRunner()
TTE = ["--treatment", "horTh", "--time", "time", "--event", "cens"]


@pytest.fixture(scope="module")
def gbsg2(tmp_path_factory):
    from lifelines.datasets import load_gbsg2

    d = tmp_path_factory.mktemp("gbsg2")
    load_gbsg2().to_csv(d / "gbsg2.csv", index=False)
    return d / "gbsg2.csv"


@pytest.fixture(scope="module")
def fusion_dir(gbsg2, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "model"
    r = runner.invoke(app, ["twins", "train", "--data", str(gbsg2), *TTE, "--model", "fusion", "--members", "3",
                            "--epochs", "4", "--epsilon", "3", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    return out, json.loads(r.stdout)


def test_fusion_train_reports_validation_c_index_and_accountant_epsilon(fusion_dir):
    out, doc = fusion_dir
    assert doc["metric"] == "c_index" and 0.5 < doc["value"] <= 1.0
    assert doc["delta"] == 1e-5 and 2.9 <= doc["epsilon"] <= 3.0
    entry = json.loads((out / "manifest.json").read_text())["components"]["predictor"]
    # the reported epsilon is what an Opacus accountant gives for the recorded noise and steps
    acc = RDPAccountant()
    n, batch = entry["patients"]["train"], entry["train"]["batch_size"]
    steps_per_epoch = -(-n // batch)
    acc.history = [(entry["noise_multiplier"], 1 / steps_per_epoch, 3 * 4 * steps_per_epoch)]
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(doc["epsilon"], abs=1e-3)
    assert entry["kind"] == "fusion_ensemble" and entry["config"]["members"] == 3


def test_predict_one_entry_per_row_in_order_with_interval_and_reasons(fusion_dir, gbsg2, tmp_path):
    out, _ = fusion_dir
    rows = pd.read_csv(gbsg2).head(7)
    rows.to_csv(tmp_path / "new.csv", index=False)
    r = runner.invoke(app, ["twins", "predict", "--model", str(out), "--patients", str(tmp_path / "new.csv"), "--json"])
    assert r.exit_code == 0, r.stderr
    preds = json.loads(r.stdout)["predictions"]
    assert [p["row"] for p in preds] == list(range(7))
    covariates = {"age", "menostat", "tsize", "tgrade", "pnodes", "progrec", "estrec", "arm"}
    for p in preds:
        assert 0 <= p["ci_low"] <= p["risk"] <= p["ci_high"] <= 1
        assert p["category"] in ("low", "moderate", "high")
        assert len(p["top_features"]) == 3 and set(p["top_features"]) <= covariates
    # the same patients under the other arm get other risks (the arm is a model input)
    r2 = runner.invoke(app, ["twins", "predict", "--model", str(out), "--patients", str(tmp_path / "new.csv"),
                             "--arm", "control", "--json"])
    assert r2.exit_code == 0
    other = json.loads(r2.stdout)["predictions"]
    treated = rows["horTh"].eq("yes").to_numpy()
    assert all(a["risk"] != b["risk"] for a, b, t in zip(preds, other, treated) if t)


def test_predict_bad_input_is_a_one_line_error(fusion_dir, gbsg2, tmp_path):
    out, _ = fusion_dir
    df = pd.read_csv(gbsg2).head(5)
    df.drop(columns=["pnodes"]).to_csv(tmp_path / "missing.csv", index=False)
    r = runner.invoke(app, ["twins", "predict", "--model", str(out), "--patients", str(tmp_path / "missing.csv")])
    assert r.exit_code == 2 and "pnodes" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    df2 = df.copy()
    df2["age"] = df2["age"].astype(float)
    df2.loc[2, "age"] = np.inf
    df2.to_csv(tmp_path / "inf.csv", index=False)
    r = runner.invoke(app, ["twins", "predict", "--model", str(out), "--patients", str(tmp_path / "inf.csv")])
    assert r.exit_code == 2 and "row 2" in r.stderr
    r = runner.invoke(app, ["twins", "predict", "--model", str(out), "--patients", str(tmp_path / "missing.csv"),
                            "--arm", "placebo-ish"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["twins", "generate", "--model", str(out), "--patients", str(gbsg2), "--arm", "yes",
                            "--out", str(tmp_path / "t.json")])
    assert r.exit_code == 2 and "holds no generator" in r.stderr and not (tmp_path / "t.json").exists()


def test_tampered_weights_or_vocabulary_are_refused(fusion_dir, gbsg2, tmp_path):
    import shutil

    out, _ = fusion_dir
    for name in ("predictor.safetensors", "predictor.vocab.json"):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        data = bytearray((copy / name).read_bytes())
        data[-2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        r = runner.invoke(app, ["twins", "predict", "--model", str(copy), "--patients", str(gbsg2)])
        assert r.exit_code == 2 and ("sha256" in r.stderr or "hash" in r.stderr or "unreadable" in r.stderr)


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory):
    """A simulated cohort as the flat tables `twins` reads: patients with outcomes, long events."""
    recs = cohort_records(simulate_cohort(patients=240, sites=2, seed=5))
    d = tmp_path_factory.mktemp("cohort")
    pats = pd.DataFrame([{"patient_id": r.patient_id, **r.baseline, "arm": int(r.arm),
                          "time": r.outcomes.time_to_event, "event": int(r.outcomes.event)} for r in recs])
    ev = pd.DataFrame([{"patient_id": r.patient_id, "time": e.time, "code": e.code, "value": e.value, "unit": e.unit}
                       for r in recs for e in r.events])
    pats.to_csv(d / "patients.csv", index=False)
    ev.to_csv(d / "events.csv", index=False)
    return d / "patients.csv", d / "events.csv"


def test_gpt_train_generate_evaluate_with_events(cohort_csv, tmp_path):
    pats, events = cohort_csv
    out = tmp_path / "gpt"
    base = ["--data", str(pats), "--events", str(events), "--id", "patient_id", "--treatment", "arm",
            "--time", "time", "--event", "event", "--model", "gpt", "--out", str(out)]
    r = runner.invoke(app, ["twins", "train", *base, "--epochs", "1", "--batch-size", "32", "--epsilon", "2",
                            "--json", "--indication", "ascvd"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["metric"] == "perplexity" and doc["value"] > 1 and 1.9 <= doc["epsilon"] <= 2.0
    r = runner.invoke(app, ["twins", "generate", "--model", str(out), "--patients", str(pats), "--events", str(events),
                            "--arm", "treatment", "--n", "2", "--out", str(tmp_path / "twins.json"), "--json"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    twins = json.loads((tmp_path / "twins.json").read_text())
    assert summary["requested"] == 480 == summary["passed"] + summary["failed"]
    assert len(twins["twins"]) == summary["passed"] and all(t["arm"] == "treatment" for t in twins["twins"])
    for t in twins["twins"][:50]:
        times = [e[0] for e in t["events"]]
        assert times == sorted(times) and all(0 < x <= twins["horizon_days"] for x in times)
        assert t["outcome"]["time"] >= (times[-1] if times else 0)
    r = runner.invoke(app, ["twins", "evaluate", "--model", str(out), "--real", str(pats), "--events", str(events),
                            "--json"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert set(rep["fidelity"]) >= {"unigram_r2", "bigram_r2"} and set(rep["utility"]) >= {"tstr", "trtr"}
    assert rep["data"]["same_as_training"] is True and 0 <= rep["privacy"]["mia_auc"] <= 1
    odd = pd.read_csv(events)
    odd.loc[(odd["time"] < 0) & (odd.index % 7 == 0), "code"] = "99999-9"  # a code training never saw
    odd.to_csv(tmp_path / "odd.csv", index=False)
    r = runner.invoke(app, ["twins", "generate", "--model", str(out), "--patients", str(pats), "--events",
                            str(tmp_path / "odd.csv"), "--arm", "control", "--out", str(tmp_path / "odd.json")])
    assert r.exit_code == 0 and "never saw" in r.stderr and "code" in r.stderr
    r = runner.invoke(app, ["twins", "generate", "--model", str(out), "--patients", str(pats), "--events", str(events),
                            "--arm", "2", "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "not an arm this model was trained with" in r.stderr


def test_train_refuses_bad_columns_before_writing(gbsg2, tmp_path):
    out = tmp_path / "never"
    r = runner.invoke(app, ["twins", "train", "--data", str(gbsg2), "--treatment", "tgrade", "--time", "time",
                            "--event", "cens", "--out", str(out)])
    assert r.exit_code == 2 and "tgrade" in r.stderr and not out.exists()
    r = runner.invoke(app, ["twins", "train", "--data", str(gbsg2), "--treatment", "horTh", "--time", "time",
                            "--out", str(out)])
    assert r.exit_code == 2 and not out.exists()
    r = runner.invoke(app, ["twins", "train", "--data", str(gbsg2), *TTE, "--epsilon", "-1", "--out", str(out)])
    assert r.exit_code == 2 and not out.exists()
