"""How long installing and upgrading a site node takes, and why releases are built with uv.

1. One release virtualenv (the wheel + the pinned constraints): pip (the baseline, what
   `ansible.builtin.pip` would do) against uv with a cold and a warm cache, in the same run.
2. `evoclone deploy site` phases on a local throwaway target (the converge test's harness):
   first install, a rerun with nothing to change, check mode, an upgrade, and a broken
   upgrade that is rolled back.

Usage: .venv/bin/python benchmarks/bench_deploy.py [--skip-pip] [--out bench-out/deploy.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.deploy.target import BROKEN_SERVE, FIND_LINKS, REPO, build_wheel, deploy, start_study  # noqa: E402


def _timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def bench_venv(base: Path, wheel: Path, skip_pip: bool) -> dict:
    import os

    python = subprocess.run([sys.executable, "-c", "import sys; print(sys._base_executable)"], capture_output=True,
                            text=True, check=True).stdout.strip()
    uv = str(Path(sys.executable).parent / "uv")
    cons = str(REPO / "constraints.txt")
    links = [f"--find-links={d}" for d in FIND_LINKS]
    out = {}
    cache = base / "uv-cache"
    for label in ("uv_cold_cache_s", "uv_warm_cache_s"):
        venv = base / label
        env = {**os.environ, "UV_CACHE_DIR": str(cache)}
        out[label] = round(_timed([uv, "venv", "--quiet", "--python", python, str(venv)], env)
                           + _timed([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                                     "--constraint", cons, *links, str(wheel)], env), 1)
        shutil.rmtree(venv)
    if not skip_pip:
        venv = base / "pip"
        out["pip_baseline_s"] = round(_timed([python, "-m", "venv", str(venv)])
                                      + _timed([str(venv / "bin" / "pip"), "install", "--quiet", "--constraint", cons,
                                                str(wheel)]), 1)
        shutil.rmtree(venv)
    return out


def bench_deploy(base: Path, wheel: Path) -> dict:
    study = start_study(base, "bench")
    inventory = study.inventory
    good = build_wheel(base / "v1", version="0.1.1")
    broken = build_wheel(base / "v2", version="0.1.2", patch=BROKEN_SERVE)
    phases = {}
    try:
        for name, args, whl, want in (("first_install_s", (), wheel, 0), ("rerun_no_changes_s", (), wheel, 0),
                                      ("check_mode_s", ("--check",), wheel, 0), ("upgrade_s", (), good, 0),
                                      ("failed_upgrade_rolled_back_s", ("-e", "evoclone_site_health_timeout=20"),
                                       broken, 1)):
            t0 = time.perf_counter()
            r, doc = deploy(inventory, *args, wheel=whl)
            phases[name] = round(time.perf_counter() - t0, 1)
            if r.returncode != want:
                raise SystemExit(f"{name}: exit {r.returncode}, expected {want}: {doc.get('errors')}")
            phases[name.replace("_s", "_changed")] = doc["hosts"]["bench"]["changed"]
    finally:
        study.stop()
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-pip", action="store_true", help="skip the pip baseline (about 100 s)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/deploy.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        base = Path(tmp)
        wheel = build_wheel(base / "v0")
        doc = {"date": time.strftime("%Y-%m-%d"), "release_virtualenv": bench_venv(base, wheel, args.skip_pip),
               "deploy_site_phases": bench_deploy(base, wheel)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
