"""Site API start: seconds from `evoclone site serve` to its first `/health` answer.

A fresh site directory (`evoclone site init`), the API started N times on a free loopback port
and polled every 0.05 s. In-run baseline: when the inference workers it warms at start are up
(a worker process forked by their forkserver, the API's grandchild), which is what the API's
startup used to wait for before it listened.

    python benchmarks/bench_site_start.py --starts 3 [--json bench-out/site-start.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from evoclone.federated.flower.runtime import free_port

EVOCLONE = str(Path(sys.executable).parent / "evoclone")
POLL = 0.05


def _children(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _grandchild(pid: int) -> bool:
    return any(_children(c) for c in _children(pid))


def one_start(site: Path) -> dict:
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([EVOCLONE, "site", "serve", "--site-dir", str(site), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    health = workers = None
    try:
        while health is None or workers is None:
            if proc.poll() is not None:
                raise SystemExit(f"evoclone site serve exited with {proc.returncode}")
            if time.monotonic() - t0 > 120:
                raise SystemExit("the site API did not come up within 120 s")
            if health is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                        if r.status == 200:
                            health = time.monotonic() - t0
                except OSError:
                    pass
            if workers is None and _grandchild(proc.pid):
                workers = time.monotonic() - t0
            time.sleep(POLL)  # polling the server's state, not waiting a fixed time for it
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"health_s": round(health, 2), "workers_up_s": round(workers, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-site-start-") as tmp:
        site = Path(tmp) / "site"
        subprocess.run([EVOCLONE, "site", "init", "--site-dir", str(site), "--name", "bench"], check=True,
                       capture_output=True)
        starts = [one_start(site) for _ in range(args.starts)]
    doc = {"starts": starts, "health_s": [s["health_s"] for s in starts],
           "workers_up_s": [s["workers_up_s"] for s in starts]}
    print(json.dumps(doc, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
