"""A small demo through real SuperLink and SuperNode processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from evoclone.federated.artifacts import sha256_file

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


def test_small_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    cmd = [str(Path(sys.executable).parent / "evoclone"), "demo", "--sites", "2", "--rounds", "1",
           "--patients", "120", "--epsilon", "2.0", "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
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
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert set(summary["rounds"][0]) == {"round", "train_loss", "val_c_index"}
    ev = summary["evaluation"]
    assert ev["metric"] == "c_index" and set(ev["local_only"]) == {"site-1", "site-2"}
    for v in (ev["federated_dp"], ev["centralized"], *ev["local_only"].values()):
        assert 0.0 <= v <= 1.0
    assert summary["wall_seconds"] > 0

    # model file matches its manifest
    weights = out / summary["model"]["path"]
    manifest = json.loads((weights.parent / "manifest.json").read_text())
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
    assert _processes_mentioning(str(out)) == []
