"""`evoclone train` through real SuperLink and SuperNode processes on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evoclone.federated.tabular import OutcomeColumns

from .processes import Background as _Background
from .processes import Concurrent as _Concurrent

pytestmark = pytest.mark.slow
EVOCLONE = str(Path(sys.executable).parent / "evoclone")


@pytest.fixture(scope="module")
def trial_csv(tmp_path_factory) -> Path:
    """Three hospitals with different case mix; survival depends on age, bmi and the arm."""
    rng = np.random.default_rng(0)
    n = 420
    site = rng.choice(["h1", "h2", "h3"], n, p=[0.4, 0.35, 0.25])
    age, bmi, arm = rng.normal(62, 9, n), rng.normal(28, 4, n), rng.integers(0, 2, n)
    lin = 0.05 * (age - 62) + 0.06 * (bmi - 28) - 0.5 * arm + np.select([site == "h2", site == "h3"], [0.3, -0.2], 0)
    t, c = rng.exponential(800 * np.exp(-lin)), rng.uniform(200, 1500, n)
    df = pd.DataFrame({"patient_id": [f"MRN{900000 + i}" for i in range(n)], "hospital": site, "age": age.round(1),
                       "bmi": bmi.round(1), "sex": rng.choice(["F", "M"], n), "arm": arm,
                       "days": np.minimum(t, c).round(), "died": (t <= c).astype(int)})
    path = tmp_path_factory.mktemp("trial") / "trial.csv"
    df.to_csv(path, index=False)
    return path


def _evoclone(*args: str) -> subprocess.CompletedProcess:
    """`evoclone ARGS` run by its own Typer app in this process (as tests/cli does), for commands whose
    result is what their exit code and output say: a fresh interpreter would first spend seconds
    importing torch and opacus. Checks about a whole process's stderr run the real `evoclone` instead."""
    from typer.testing import CliRunner

    from evoclone.cli.main import app

    r = CliRunner().invoke(app, list(args))
    stderr = r.stderr + ("" if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception))
    return subprocess.CompletedProcess(["evoclone", *args], r.exit_code, r.stdout, stderr)


def _ledger(site_dir: Path) -> dict:
    """What `evoclone site budget --site-dir DIR --json` reports (read once the run's processes are gone)."""
    r = _evoclone("site", "budget", "--site-dir", str(site_dir), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


TLS_TEST = "test_train_with_tls_node_auth_and_approval"


@pytest.fixture(scope="module")
def tls_cli_train(trial_csv, tmp_path_factory):
    """`evoclone train` over TLS with node authentication (a process tree of its own: own study directory,
    own ports); what test_train_with_tls_node_auth_and_approval checks. See `_start_tls_cli_train_first`."""
    base = tmp_path_factory.mktemp("tls-cli")
    out, work = base / "model", base / "study"
    cmd = [EVOCLONE, "train", "--data", str(trial_csv), "--site-column", "hospital", "--treatment", "arm",
           "--time", "days", "--event", "died", "--rounds", "2", "--epsilon", "2.0", "--batch-size", "16",
           "--arm-shift-share", "0.25", "--out", str(out), "--work-dir", str(work), "--json"]
    run = _Background(cmd, base)
    yield run, out, work
    run.stop()


@pytest.fixture(scope="module", autouse=True)
def _start_tls_cli_train_first(request):
    """When the TLS test is selected, its `evoclone train` process starts with this module's first test and
    trains while the tests placed before the TLS test run (a federated run keeps about two thirds of one
    core busy, waiting on polls and on its other processes the rest of the time); that test then checks
    what the finished run printed and left, exactly as when it ran the command itself."""
    if any(item.name == TLS_TEST and getattr(item, "module", None) is request.module for item in request.session.items):
        request.getfixturevalue("tls_cli_train")


def _prepared(trial_csv: Path, tmp_path: Path, **kw):
    from evoclone.cli.train_jobs import TrainOptions, prepare_sites, validate

    opts = TrainOptions(data=trial_csv, site_column="hospital", treatment="arm",
                        outcome=OutcomeColumns(time="days", event="died"), out=tmp_path / "model",
                        work_dir=tmp_path / "study", batch_size=16, insecure=True, **kw)
    patients, events, names = validate(opts)
    parts, covariates, _ = prepare_sites(opts, patients, events, names)
    return opts, parts, covariates


def test_unapproved_app_is_refused_and_budget_exhaustion_mid_run(trial_csv, tmp_path):
    from evoclone.cli.federation import Federation
    from evoclone.cli.train_jobs import run_config
    from evoclone.coordinator.superlink import fab_hash
    from evoclone.federated.stores.ledger import SqlLedgerStore
    from evoclone.site_node.approvals import ApprovalStore

    opts, parts, covariates = _prepared(trial_csv, tmp_path, rounds=3, min_sites=1)
    by_name = {p.name: p for p in parts}
    coord = tmp_path / "study" / "coordinator" / "run"
    rc = run_config(opts, "fusion", out_dir=coord, covariates=covariates, sites=3, manifest_extra={}, run_key="rk-1")
    # h2's noise plan for this run is fixed low (as an earlier attempt of the run could have
    # left it): its first round spends most of its budget, and the next ones no longer fit
    store = SqlLedgerStore(url=by_name["h2"].settings.db_url)
    store.open(epsilon_budget=opts.epsilon, delta=opts.delta)
    store.set_plan(run_id="rk-1", noise_multiplier=1.5)
    store.close()

    with Federation(tmp_path / "study", parts, insecure=True) as fed:
        h3 = ApprovalStore(url=by_name["h3"].settings.db_url)
        h3.revoke(fab_hash(), admin="h3 data steward", note="not reviewed yet")  # h3 withdraws its approval
        result = fed.train(rc, coord, rounds=3)
    refusals = h3.refused()
    h3.close()

    # h3 never ran the app: refused before any ClientApp started, recorded, nothing charged
    assert refusals and all(r["fab_hash"] == fab_hash() for r in refusals)
    assert _ledger(by_name["h3"].settings.site_dir)["charges"] == []
    assert not (by_name["h3"].settings.site_dir / "flower-updates").exists()
    # h2 trained round 1, then refused the rounds that no longer fit; the run finished with h1
    status = {r["round"]: {p["site"]: p["status"] for p in r["participation"]} for r in result["rounds"]}
    assert [status[r]["h2"] for r in (1, 2, 3)] == ["ok", "refused", "refused"]
    assert all(status[r]["h1"] == "ok" for r in (1, 2, 3))
    reasons = [p.get("reason", "") for r in result["rounds"][1:] for p in r["participation"] if p["site"] == "h2"]
    assert all("does not fit the remaining privacy budget" in why for why in reasons)
    h2 = _ledger(by_name["h2"].settings.site_dir)
    # (round 0: the arm-effect query after training, which h2 answers only if it still fits)
    assert [c["round"] for c in h2["charges"] if c["round"]] == [1] and 0 < h2["epsilon_spent"] <= opts.epsilon
    h1 = _ledger(by_name["h1"].settings.site_dir)
    assert [c["round"] for c in h1["charges"]] == [1, 2, 3, 0] and h1["epsilon_spent"] <= opts.epsilon + 1e-9
    assert (coord / "model" / "manifest.json").is_file()


def test_wrong_ca_and_unknown_key_supernodes_are_refused(trial_csv, tmp_path):
    from evoclone.cli.federation import Federation
    from evoclone.federated.flower.runtime import flower_env, free_port, http_ok
    from evoclone.privacy.pki import new_ca, new_node_keypair
    from evoclone.site_node.supernode import NodeSecurity, supernode_command

    opts, parts, _ = _prepared(trial_csv, tmp_path)
    rogue = parts[2]
    with Federation(tmp_path / "study", parts[:2]) as fed:  # TLS + node authentication, h1 and h2 registered
        assert fed.link.healthy()
        assert not http_ok(f"http://{fed.link.address}/health")  # plain HTTP is not served
        key, pub = new_node_keypair()
        unknown = tmp_path / "unknown.key"
        unknown.write_bytes(key)
        unknown.chmod(0o600)
        other_ca = tmp_path / "other-ca.pem"
        other_ca.write_bytes(new_ca("someone else's CA")[1])
        attempts = {
            "unknown-key": NodeSecurity(ca_cert=fed.security.ca_cert, node_key=unknown),
            "wrong-ca": NodeSecurity(ca_cert=other_ca, node_key=fed.node_keys["h1"][0]),
        }
        for name, sec in attempts.items():
            cmd = supernode_command(rogue.settings, superlink=fed.link.address, port=free_port(), security=sec)
            fed.group.start(name, [*cmd, "--max-retries", "2", "--max-wait-time", "30"],
                            env=flower_env(tmp_path / name))
        for name in attempts:
            proc = fed.group.procs[name]
            assert proc.wait(timeout=90) != 0, f"{name} SuperNode should have been refused"
        logs = {name: (fed.group.log_dir / f"{name}.log").read_text() for name in attempts}
        assert "Failed to activate SuperNode" in logs["unknown-key"]  # the SuperLink refused the key
        assert "CERTIFICATE_VERIFY_FAILED" in logs["wrong-ca"]  # the SuperLink's certificate is not from that CA
        listed = fed.link._flwr("supernode", "list", "evoclone", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        assert len(json.loads(listed.stdout)["nodes"]) == 2


def test_bad_input_is_refused_before_anything_starts(trial_csv, tmp_path):
    df = pd.read_csv(trial_csv)
    one = tmp_path / "one.csv"
    df.assign(hospital="h1").to_csv(one, index=False)
    small = tmp_path / "small.csv"
    pd.concat([df[df.hospital != "h3"], df[df.hospital == "h3"].head(12)]).to_csv(small, index=False)
    base = [EVOCLONE, "train", "--site-column", "hospital", "--treatment", "arm", "--time", "days", "--event", "died",
            "--insecure"]
    cases = [
        (["--data", str(one)], "has one value"),
        (["--data", str(small)], "site h3 has"),
        (["--data", str(trial_csv), "--epsilon", "0"], "--epsilon must be a positive number"),
        (["--data", str(trial_csv), "--site-column", "nope"], "no site column"),
    ]
    # a site whose budget is already spent (an earlier study used it all)
    from evoclone.cli.train_jobs import TrainOptions, prepare_sites, validate
    from evoclone.federated.stores.ledger import SqlLedgerStore
    from evoclone.privacy.accounting import LedgerEntry, calibrate_noise

    spent_dir = tmp_path / "spent"
    opts = TrainOptions(data=trial_csv, site_column="hospital", treatment="arm",
                        outcome=OutcomeColumns(time="days", event="died"), out=tmp_path / "m", work_dir=spent_dir,
                        batch_size=16)
    parts, _, _ = prepare_sites(opts, *validate(opts))
    store = SqlLedgerStore(url=parts[0].settings.db_url)
    store.open(epsilon_budget=3.0, delta=1e-5)
    sigma = calibrate_noise(prior=[], target_epsilon=3.0, delta=1e-5, sample_rate=0.5, steps=10)
    store.charge(LedgerEntry(run_id="earlier", round=1, noise_multiplier=sigma * 1.0001, sample_rate=0.5, steps=10))
    before = store.summary()
    store.close()

    # an expired SuperLink certificate in the study PKI (TLS mode)
    from datetime import datetime, timedelta, timezone

    from evoclone.privacy.pki import issue_server, new_ca

    pki = tmp_path / "expired" / "pki"
    pki.mkdir(parents=True)
    past = datetime.now(timezone.utc) - timedelta(days=30)
    ca_key, ca_pem = new_ca("study CA", now=past)
    key, cert = issue_server(ca_key, ca_pem, "superlink", dns=["localhost"], ips=["127.0.0.1"], days=1, now=past)
    for name, data in (("ca.key", ca_key), ("ca.pem", ca_pem), ("superlink.key", key), ("superlink.pem", cert)):
        (pki / name).write_bytes(data)

    # the input cases whose whole stderr must be one line run as real `evoclone train` processes, side by side
    # (each spends seconds importing before it refuses), while the spent budget and the expired certificate
    # are refused by the same command in this process; every result is checked in turn
    runs = _Concurrent()
    try:
        started = [(runs.start([*base, *extra, "--out", str(tmp_path / "m"), "--work-dir",
                                str(tmp_path / f"w{len(message)}")]), message) for extra, message in cases]

        r = _evoclone(*base[1:], "--data", str(trial_csv), "--batch-size", "16", "--out", str(tmp_path / "m"),
                      "--work-dir", str(spent_dir))
        assert r.returncode == 2 and "privacy budget" in r.stderr and "already spent" in r.stderr, r.stderr
        store = SqlLedgerStore(url=parts[0].settings.db_url)
        assert store.summary() == before  # nothing charged
        store.close()

        r = _evoclone("train", "--site-column", "hospital", "--treatment", "arm", "--time", "days", "--event", "died",
                      "--data", str(trial_csv), "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "expired"))
        assert r.returncode == 2 and "expired" in r.stderr, r.stderr
        assert not (tmp_path / "expired" / "sites").exists()

        for proc, message in started:
            work = tmp_path / f"w{len(message)}"
            r = runs.result(proc)
            assert r.returncode == 2, r.stderr
            assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
            assert not (work / "sites").exists() or not any((work / "sites").rglob("site.db"))
            assert not (tmp_path / "m").exists()
    finally:
        runs.kill()


def test_train_with_tls_node_auth_and_approval(trial_csv, tls_cli_train):
    run, out, work = tls_cli_train
    proc = run.result(timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert [s["name"] for s in summary["sites"]] == ["h1", "h2", "h3"]
    fusion = summary["models"]["fusion"]
    assert [r["round"] for r in fusion["rounds"]] == [1, 2] and fusion["best_round"] in (1, 2)
    # every round's ClientApp was forked from its SuperNode's warm zygote
    assert all(p["warm_start"] for r in fusion["rounds"] for p in r["participation"])
    # each site reports its round's timing: delivery, then its handler, which holds the training
    assert all(0 < p["train_seconds"] < p["handler_seconds"] < r["wall_seconds"] and p["start_latency_seconds"] > 0
               for r in fusion["rounds"] for p in r["participation"])
    # before round 1 every site encoded its records (and fixed its noise plan) in the prepare query
    prepared = fusion["prepare"]["sites"]
    assert [p["site"] for p in prepared] == ["h1", "h2", "h3"] and all(p["status"] == "ok" for p in prepared)
    assert {p["site"]: p["examples"] for p in prepared} == \
        {p["site"]: p["examples"] for p in fusion["rounds"][0]["participation"]}
    for s in summary["sites"]:
        assert 0 < s["epsilon_spent"] <= 2.0 and s["rounds_trained"] == {"fusion": 2}
        ledger = _ledger(work / "sites" / s["name"])  # one charge per round and the arm-effect query, same total
        assert [c["round"] for c in ledger["charges"]] == [1, 2, 0]
        assert ledger["epsilon_spent"] == pytest.approx(s["epsilon_spent"], abs=1e-3)
        # --arm-shift-share 0.25: training planned for 75% of epsilon 2, the query took the run to its target
        assert ledger["charges"][1]["epsilon_after"] == pytest.approx(1.5, abs=0.011)
        assert ledger["charges"][2]["epsilon_after"] == pytest.approx(2.0, abs=0.011)
        assert ledger["charges"][2]["epsilon_after"] <= 2.0 + 1e-9
    # TLS and node authentication were on: every site has a key pair issued from the study PKI
    assert all((work / "pki" / f"{s}.node.pub").is_file() for s in ("h1", "h2", "h3"))
    # the model directory works with the twins commands and records its lineage
    manifest = json.loads((out / "manifest.json").read_text())["components"]["predictor"]
    assert manifest["training"] == "federated_dp_fedavg" and {s["name"] for s in manifest["sites"]} == {"h1", "h2", "h3"}
    assert manifest["columns"]["site_column"] == "hospital" and manifest["columns"]["covariates"] == ["age", "bmi", "sex"]
    pred = _evoclone("twins", "predict", "--model", str(out), "--patients", str(trial_csv), "--json")
    assert pred.returncode == 0, pred.stderr[-2000:]
    assert len(json.loads(pred.stdout)["predictions"]) == 420
    # no hospital identifier reached the coordinator or the model directory
    for area in (work / "coordinator", out):
        for f in area.rglob("*"):
            if f.is_file():
                assert b"MRN9" not in f.read_bytes(), f"{f} holds a raw patient id"


def _kill_tree(group, name: str) -> None:
    """SIGKILL a process and every descendant (the SuperNode and its ClientApp)."""
    import os
    import signal

    from evoclone.federated.flower.runtime import _children

    kids = _children()
    stack, seen = [group.procs[name].pid], []
    while stack:
        pid = stack.pop()
        seen.append(pid)
        stack += kids.get(pid, [])
    for pid in seen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    group.procs[name].wait(timeout=30)


# Flower 1.42's SuperNode tells the SuperLink to expect a heartbeat every 30 s (and sends one every
# 17.5-22.5 s); the SuperLink gives up on a silent node 2 x 30 s after its last heartbeat, so the message
# a killed SuperNode had of the round under way fails (Node Unavailable) 38-60 s after the kill. Flower's
# own floor for the interval is 10 s: SuperNodes started with this file on PYTHONPATH announce that (and
# send heartbeats every 3.5-4.5 s), so the dead node is given up 16-20 s after the kill. Only the
# node-liveness heartbeat of the guarded SuperNode process changes; the ClientApps' task heartbeats and
# every other timer keep Flower's defaults, and round 2 still ends on the SuperLink's Node Unavailable.
_NODE_HEARTBEAT_SITECUSTOMIZE = '''\
import sys

if "evoclone.site_node.flower_node" in getattr(sys, "orig_argv", ()):
    import flwr.supercore.heartbeat
    import flwr.supernode.fleet_http_connection

    flwr.supernode.fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = 10  # announced to the SuperLink
    flwr.supercore.heartbeat.HEARTBEAT_DEFAULT_INTERVAL = 10  # the sender's period: (10 - 5 s) x 0.7-0.9
'''


def _fast_node_heartbeat(monkeypatch, tmp_path: Path) -> None:
    import os

    d = tmp_path / "node-heartbeat"
    d.mkdir()
    (d / "sitecustomize.py").write_text(_NODE_HEARTBEAT_SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")])))


def test_supernode_and_superlink_killed_mid_run_charge_each_round_once(trial_csv, tmp_path, monkeypatch):
    """A site's SuperNode dies in round 2 and comes back; the SuperLink dies after round 3 and is
    restarted: the run finishes, the site rejoins, and every ledger holds one charge per round trained."""
    from evoclone.cli.federation import Federation
    from evoclone.cli.train_jobs import run_config
    from evoclone.privacy.accounting import epsilon_of

    _fast_node_heartbeat(monkeypatch, tmp_path)
    opts, parts, covariates = _prepared(trial_csv, tmp_path, rounds=4, min_sites=2)
    by_name = {p.name: p for p in parts}
    coord = tmp_path / "study" / "coordinator" / "run"
    rc = run_config(opts, "fusion", out_dir=coord, covariates=covariates, sites=3, manifest_extra={}, run_key="rk-f")
    events: list[str] = []
    with Federation(tmp_path / "study", parts, insecure=True) as fed:
        h3_log = fed.group.log_dir / "supernode-h3.log"

        def faults(done: int, total: int) -> None:
            # round 2 under way at h3 (its second train message arrived): kill h3, start it again
            if "h3" not in events and h3_log.read_text().count("Receiving: train message") >= 2:
                _kill_tree(fed.group, "supernode-h3")
                fed.start_node(by_name["h3"])
                events.append("h3")
            # three rounds done: the coordinator's SuperLink dies
            if "link" not in events and done >= 3:
                _kill_tree(fed.group, "superlink")
                events.append("link")

        result = fed.train(rc, coord, rounds=4, on_round=faults)
    assert events == ["h3", "link"]
    assert result["superlink_restarts"] == 1 and len(result["flower_runs"]) == 2
    status = {r["round"]: {p["site"]: p["status"] for p in r["participation"]} for r in result["rounds"]}
    assert sorted(status) == [1, 2, 3, 4]  # no round lost or repeated in the record
    assert status[2].get("h3") != "ok" and status[2]["h1"] == status[2]["h2"] == "ok"  # round 2 went on without h3
    assert status[4]["h3"] == "ok"  # h3 rejoined after its restart
    doc = json.loads((coord / "rounds.json").read_text())
    assert doc["status"] == "completed" and doc["resumed_from"] == 3
    for name, part in by_name.items():
        ledger = _ledger(part.settings.site_dir)
        rounds = [c["round"] for c in ledger["charges"] if c["round"]]
        trained = [r for r in (1, 2, 3, 4) if status[r].get(name) == "ok"]
        assert rounds == trained, (name, rounds, trained)  # one charge per round trained, none for the lost one
        assert [c["round"] for c in ledger["charges"]].count(0) == 1  # the arm-effect query, once
        # spent epsilon is exactly the accountant's over the stored charges: nothing charged twice
        history = [(c["noise_multiplier"], c["sample_rate"], c["steps"]) for c in ledger["charges"]]
        assert ledger["epsilon_spent"] == pytest.approx(epsilon_of(history, delta=opts.delta), abs=1e-6)
        assert ledger["epsilon_spent"] <= opts.epsilon + 1e-9
    assert (coord / "model" / "manifest.json").is_file()


def test_simulation_engine_trains_both_models_with_fedprox_and_early_stopping(trial_csv, tmp_path):
    """The same ServerApp/ClientApp on Flower's simulation runtime: GPT generator and fusion
    predictor in one model directory, FedProx, and early stopping on the federated validation loss."""
    from evoclone.cli.train_jobs import TrainOptions, run_train
    from evoclone.cli.twins_jobs import load_ensemble, load_generator

    opts = TrainOptions(data=trial_csv, site_column="hospital", treatment="arm",
                        outcome=OutcomeColumns(time="days", event="died"), out=tmp_path / "model",
                        work_dir=tmp_path / "study", model="both", rounds=5, batch_size=16, engine="simulation",
                        strategy="fedprox", patience=1, server_eval=trial_csv,
                        # no round can improve by 100 nats: stops once two rounds are validated
                        extra_run_config={"min-delta": 100.0, "gpt-max-len": 64})
    summary = run_train(opts)
    for model in ("fusion", "gpt"):
        r = summary["models"][model]
        assert [x["round"] for x in r["rounds"]] == [1, 2, 3], model
        assert "early stopping after round 3" in r["note"]
        assert all(x["trained"] == 3 for x in r["rounds"])
        assert all(x["server_val_loss"] > 0 for x in r["rounds"])  # server-side evaluation every round
    ensemble, spec, entry = load_ensemble(opts.out)
    assert entry["training"] == "federated_dp_fedprox" and entry["best_round"] in (1, 2, 3)
    model, tok, gen_entry = load_generator(opts.out)
    assert gen_entry["kind"] == "twin_generator" and tok.vocab_size == model.cfg.vocab_size
    # the fusion model's arm effect was re-estimated from every site's noised sums (federated.arm_shift)
    assert entry["arm_effect"]["status"] == "fitted" and entry["arm_effect"]["sites"] == 3
    assert ensemble.arm_shift is not None and entry["arm_effect"]["log_effect"] == pytest.approx(
        ensemble.arm_shift[1] - ensemble.arm_shift[0])
    # its standard error counts the sampling and the three sites' query noise (public: the noise multiplier times
    # the sensitivity, through the release's map): recomputed from the noised sums and noise multipliers the
    # sites kept
    from evoclone.federated.arm_shift import effect_se, noise_cov, sensitivity

    kept = [json.loads(p.read_text()) for p in opts.study_dir.rglob("*.arm-shift.json")]
    assert len(kept) == 3
    total = np.sum([k["sums"] for k in kept], axis=0)
    noise = sum(noise_cov("time_to_event", 0.5, k["charge"]["noise_multiplier"] * sensitivity("time_to_event", 0.5))
                for k in kept)
    assert entry["arm_effect"]["se"] == pytest.approx(effect_se("time_to_event", total, noise), rel=1e-9)
    assert entry["arm_effect"]["se"] > effect_se("time_to_event", total)
    for s in summary["sites"]:  # two models, three rounds each, half the budget each, and the fusion arm query
        ledger = _ledger(opts.study_dir / "sites" / s["name"])
        assert sorted(c["round"] for c in ledger["charges"]) == [0, 1, 1, 2, 2, 3, 3]
        assert ledger["epsilon_spent"] <= opts.epsilon + 1e-9


def test_secure_aggregation_gives_the_weighted_mean_of_the_sites_updates(trial_csv, tmp_path):
    """SecAgg+ (Flower's protocol) with DP-SGD: the coordinator's aggregate is the examples-weighted
    mean of the sites' DP updates (each site keeps its own), recovered from masked vectors only."""
    import torch
    from safetensors.torch import load_file

    from evoclone.cli.train_jobs import TrainOptions, run_train

    opts = TrainOptions(data=trial_csv, site_column="hospital", treatment="arm",
                        outcome=OutcomeColumns(time="days", event="died"), out=tmp_path / "model",
                        work_dir=tmp_path / "study", rounds=1, batch_size=16, engine="simulation",
                        secure_aggregation=True)
    summary = run_train(opts)
    fusion = summary["models"]["fusion"]
    assert fusion["rounds"][0]["secure_aggregation"] == "secagg+" and fusion["rounds"][0]["trained"] == 3
    weights = {p["site"]: p["examples"] for p in fusion["rounds"][0]["participation"]}
    kept = {s: load_file(str(next((opts.study_dir / "sites" / s / "flower-updates").glob("*.1.safetensors"))))
            for s in weights}
    total = sum(weights.values())
    aggregate = load_file(str(opts.study_dir / "coordinator" / fusion["run_key"] / "models" / "round-1" / "predictor.safetensors"))
    for name, value in aggregate.items():
        mean = sum(kept[s][name].double() * (w / total) for s, w in weights.items())
        assert torch.allclose(value.double(), mean, atol=1e-4), name
    with pytest.raises(Exception, match="fedavg or fedprox"):
        from dataclasses import replace

        run_train(replace(opts, strategy="fedadam", out=tmp_path / "m2", work_dir=tmp_path / "s2"))
