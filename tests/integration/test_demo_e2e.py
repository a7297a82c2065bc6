"""A small demo through real SuperLink and SuperNode processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from evoclone.federated.artifacts import sha256_file
from evoclone.federated.flower.runtime import free_port, port_is_free

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and "pytest" not in cmd:
                out.append(cmd)
    return out


def _assert_all_stopped(out: Path, ports: list[int]) -> None:
    leftovers = _processes_mentioning(str(out)) + [p for port in ports for p in _processes_mentioning(f":{port}")]
    assert leftovers == []
    assert all(port_is_free(p) for p in ports), "a port is still bound"


def test_small_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    base = free_port(block=3)
    # a relative --out, as `make demo` passes it: Flower processes run in other directories
    cmd = [str(Path(sys.executable).parent / "evoclone"), "demo", "--sites", "2", "--rounds", "1",
           "--patients", "120", "--epsilon", "2.0", "--out", "demo", "--port", str(base), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "summary.json").read_text())

    # schema
    assert set(summary) == {"sites", "rounds", "evaluation", "model", "wall_seconds"}
    assert [s["name"] for s in summary["sites"]] == ["site-1", "site-2"]
    for s in summary["sites"]:
        assert set(s) == {"name", "patients", "epsilon_budget", "epsilon_spent", "delta"}
        assert s["patients"] == 60 and s["epsilon_budget"] == 2.0 and s["delta"] == 1e-5
        assert 0 < s["epsilon_spent"] <= s["epsilon_budget"]
        # the site's own ledger (in its store) holds one charge per round, the arm-effect query's (round 0), and
        # the same total
        b = subprocess.run([str(Path(sys.executable).parent / "evoclone"), "site", "budget", "--site-dir",
                            str(out / "sites" / s["name"]), "--json"], capture_output=True, text=True, timeout=120)
        assert b.returncode == 0, b.stderr
        ledger = json.loads(b.stdout)
        assert [c["round"] for c in ledger["charges"]] == [1, 0] and ledger["epsilon_budget"] == 2.0
        assert ledger["epsilon_spent"] == pytest.approx(s["epsilon_spent"], abs=1e-3)
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert set(summary["rounds"][0]) == {"round", "train_loss", "val_c_index"}
    ev = summary["evaluation"]
    assert ev["metric"] == "c_index" and set(ev["local_only"]) == {"site-1", "site-2"}
    for v in (ev["federated_dp"], ev["centralized"], *ev["local_only"].values()):
        assert 0.0 <= v <= 1.0
    assert summary["wall_seconds"] > 0

    # model file matches its manifest
    weights = out / summary["model"]["path"]
    manifest = json.loads((weights.parent / "manifest.json").read_text())["components"]["predictor"]
    assert summary["model"]["sha256"] == manifest["sha256"] == sha256_file(weights)
    assert {s["name"] for s in manifest["sites"]} == {"site-1", "site-2"}
    assert (out / "report.html").read_text().count("<svg") >= 3

    # no raw identifier from input/ anywhere under sites/ or coordinator/
    raw = pd.concat([pd.read_csv(p, dtype=str) for p in (out / "input").glob("*/patients.csv")])
    needles = [*raw["mrn"], *raw["name"], *raw["phone"], *raw["birth_date"]]
    for area in ("sites", "coordinator"):
        for f in (out / area).rglob("*"):
            if f.is_file():
                blob = f.read_bytes()
                leaked = [n for n in needles if n.encode() in blob]
                assert not leaked, f"{f} contains raw identifiers {leaked[:3]}"

    # Flower kept its state under OUT, and every process is gone
    assert not (home / ".flwr").exists()
    assert (out / "coordinator" / "flower" / "superlink-state.db").is_file()
    _assert_all_stopped(out, [base, base + 1, base + 2])


def test_ctrl_c_stops_every_flower_process(tmp_path):
    out = tmp_path / "demo"
    base = free_port(block=3)
    cmd = [str(Path(sys.executable).parent / "evoclone"), "demo", "--sites", "2", "--rounds", "3",
           "--patients", "120", "--out", str(out), "--port", str(base)]
    # a shell runs background jobs with SIGINT ignored and children inherit that; give the demo
    # the default disposition so that Python turns SIGINT into KeyboardInterrupt as at a terminal
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        # interrupt once the federated run is under way (its Flower processes all exist)
        while not any((out / "logs").glob("flwr-run*.log")):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert _processes_mentioning(f":{base}"), "the Flower processes should be running"
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    assert not (out / "summary.json").exists()
    _assert_all_stopped(out, [base, base + 1, base + 2])
