"""Coordinator API under load (issue 7): registry and status endpoints, 50 concurrent clients.

Starts a real `evoclone coordinator serve` (HTTPS, SQLite or PostgreSQL, N uvicorn workers)
on loopback, fills it with a study, sites, runs with round history and model versions, then
runs C concurrent clients (asyncio + aiohttp, keep-alive; `--client httpx` for the earlier load
generator, see benchmarks/loadgen.py) for D seconds against the registry
and status endpoints, each with a bearer token. `/health` (no database, no auth) is the
in-run baseline. Target: zero errors, p99 under 50 ms.

    python benchmarks/bench_coordinator.py --clients 50 --seconds 60 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import CLIENTS, ERRORS, session  # noqa: E402
from rich.console import Console
from rich.table import Table

PASSWORD = "benchmark password 123"


def _cli(*args: str, stdin: str | None = None) -> None:
    subprocess.run([sys.executable, "-c", "from evoclone.cli.main import app; app()", *args], input=stdin,
                   text=True, check=True, capture_output=True)


def _serve(state: Path, port: int, workers: int) -> subprocess.Popen:
    from evoclone.federated.flower.runtime import http_ok

    proc = subprocess.Popen([sys.executable, "-c", "from evoclone.cli.main import app; app()", "coordinator", "serve",
                             "--state-dir", str(state), "--port", str(port), "--workers", str(workers),
                             "--no-superlink"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline, delay = time.monotonic() + 90, 0.05
    while not http_ok(f"https://127.0.0.1:{port}/health", cafile=state / "pki" / "ca.pem"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the coordinator did not come up")
        time.sleep(delay)  # polling its health endpoint
        delay = min(delay * 1.5, 0.5)
    return proc


def _fill(c: httpx.Client, admin: dict, sponsor: dict, state: Path) -> list[str]:
    """Sites, a study, runs with rounds and model versions; returns the GET paths to load."""
    from sqlmodel import Session

    from evoclone.coordinator.db import make_engine
    from evoclone.coordinator.models import RoundMetric, Run, RunStatus
    from evoclone.coordinator.settings import load_settings
    from evoclone.privacy.enrolment import new_csr
    from evoclone.privacy.pki import new_node_keypair

    ids = []
    for name in ("north", "south", "east"):
        _, csr = new_csr(name)
        _, pub = new_node_keypair(name)
        site = c.post("/api/v1/sites/enrol", json={"name": name, "csr_pem": csr.decode(),
                                                    "supernode_public_key": pub.decode()}).json()
        c.post(f"/api/v1/sites/{site['id']}/accept", headers=admin).raise_for_status()
        ids.append(site["id"])
    study = c.post("/api/v1/studies", headers=sponsor, json={
        "name": "bench", "indication": "benchmark", "phase": "III", "arms": ["control", "treatment"],
        "endpoints": ["os"], "target_epsilon": 3.0, "target_delta": 1e-5, "site_ids": ids}).json()["id"]
    engine = make_engine(load_settings(state))
    with Session(engine) as s:  # finished runs with ten rounds each, as the dispatcher would have stored them
        for _ in range(5):
            run = Run(study_id=study, rounds=10, config={"endpoint": "time_to_event", "covariates": ["age"]},
                      status=RunStatus.finished, created_by="bench")
            s.add(run)
            s.flush()
            for r in range(1, 11):
                s.add(RoundMetric(run_id=run.id, round=r, metrics={"train_loss": 1.0, "val_metric": 0.7}))
                for sid in ids:
                    s.add(RoundMetric(run_id=run.id, round=r, site_id=sid, epsilon=0.3 * r,
                                      metrics={"trained": 1.0, "examples": 300.0, "val_loss": 1.1}))
        s.commit()
    engine.dispose()
    paths = ["/api/v1/runs", "/api/v1/runs/3", f"/api/v1/studies/{study}", "/api/v1/studies"]
    spec = c.get("/openapi.json").json()["paths"]
    if "/api/v1/models" in spec:
        paths.append("/api/v1/models")
    return paths


async def _client(kind: str, base: str, ca: str, headers: dict, paths: list[str], until: float, out: dict) -> None:
    async with session(kind, base, ca=ca, timeout=10, connections=1) as send:
        i = 0
        while time.monotonic() < until:
            path = paths[i % len(paths)]
            i += 1
            t0 = time.perf_counter()
            try:
                r = await send("GET", path, headers=headers if path != "/health" else None)
                ok = r.status == 200
            except ERRORS:
                ok = False
            out.setdefault(path, []).append((time.perf_counter() - t0, ok))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--database-url", default="", help="PostgreSQL URL (default: SQLite in the state dir)")
    ap.add_argument("--client", choices=CLIENTS, default="aiohttp",
                    help="the load generator's HTTP client (httpx costs about 20x more CPU per request)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from evoclone.federated.flower.runtime import free_port

    with tempfile.TemporaryDirectory(prefix="bench-coord-") as tmp:
        state = Path(tmp) / "state"
        _cli("coordinator", "init", "--state-dir", str(state),
             *(["--database-url", args.database_url] if args.database_url else []))
        for user, role in (("root", "admin"), ("alice", "sponsor")):
            _cli("coordinator", "user", "add", "--state-dir", str(state), "--username", user, "--role", role,
                 "--password-stdin", stdin=PASSWORD + "\n")
        port = free_port()
        proc = _serve(state, port, args.workers)
        base, ca = f"https://127.0.0.1:{port}", str(state / "pki" / "ca.pem")
        try:
            with httpx.Client(base_url=base, verify=ca) as c:
                tok = {u: c.post("/api/v1/auth/token", data={"username": u, "password": PASSWORD}).json()
                       ["access_token"] for u in ("root", "alice")}
                admin, sponsor = ({"Authorization": f"Bearer {tok[u]}"} for u in ("root", "alice"))
                paths = _fill(c, admin, sponsor, state) + ["/health"]
            out: dict[str, list] = {}
            until = time.monotonic() + args.seconds

            async def run_all() -> None:
                await asyncio.gather(*(_client(args.client, base, ca, sponsor,
                                               paths[k % len(paths):] + paths[:k % len(paths)],
                                               until, out) for k in range(args.clients)))

            started = time.monotonic()
            asyncio.run(run_all())
            wall = time.monotonic() - started
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    rows = []
    for path, samples in sorted(out.items()):
        lat = np.array([s[0] for s in samples]) * 1000
        rows.append({"path": path, "requests": len(samples), "errors": sum(not s[1] for s in samples),
                     "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                     "rps": len(samples) / wall})
    all_lat = np.array([s[0] for v in out.values() for s in v]) * 1000
    total = {"requests": int(len(all_lat)), "errors": sum(r["errors"] for r in rows),
             "p50_ms": float(np.percentile(all_lat, 50)), "p99_ms": float(np.percentile(all_lat, 99)),
             "rps": len(all_lat) / wall}
    t = Table(title=f"Coordinator API, {args.clients} {args.client} clients x {args.seconds:g} s, {args.workers} workers, "
                    f"{'PostgreSQL' if args.database_url else 'SQLite'}")
    for c in ("endpoint", "requests", "errors", "p50 ms", "p99 ms", "req/s"):
        t.add_column(c, justify="right")
    for r in rows + [{"path": "all", **total}]:
        t.add_row(r["path"], str(r["requests"]), str(r["errors"]), f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                  f"{r['rps']:.0f}")
    Console().print(t)
    verdict = "met" if total["errors"] == 0 and total["p99_ms"] < 50 else "NOT met"
    Console().print(f"target (zero errors, p99 < 50 ms): {verdict}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "total": total}, indent=1))


if __name__ == "__main__":
    main()
