"""Benchmark the walking skeleton: `evoclone demo` wall time and C-index against its baselines.

For each seed it runs the demo with default settings (3 sites, 3 rounds, 600 patients,
epsilon 3) in a fresh directory and prints one table: wall time against the 300 s
target, and the federated DP C-index against the centralized non-private model and the
mean of the local-only models trained and evaluated on the same held-out patients in
the same run.

    .venv/bin/python benchmarks/bench_demo.py [--seeds 7,8,9] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="7")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--extra", default="", help="extra demo arguments, e.g. '--patients 1200'")
    args = ap.parse_args()
    exe = str(Path(sys.executable).parent / "evoclone")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = Path(args.out) / f"demo-seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.monotonic()
        proc = subprocess.run([exe, "demo", "--out", str(out), "--seed", str(seed), "--json", *args.extra.split()],
                              capture_output=True, text=True)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        s = json.loads(proc.stdout)
        ev = s["evaluation"]
        local = sum(ev["local_only"].values()) / len(ev["local_only"])
        rows.append({"seed": seed, "wall_s": wall, "fed": ev["federated_dp"], "central": ev["centralized"],
                     "local": local, "eps": max(x["epsilon_spent"] for x in s["sites"]),
                     "test_n": ev["test_patients"]})
    t = Table(title=f"evoclone demo (defaults) on {platform.node()}, {date.today()}, "
                    f"{platform.processor() or platform.machine()}")
    for col in ("seed", "wall s (target <= 300)", "federated DP C", "centralized C", "gap (target <= 0.05)",
                "mean local-only C", "fed - local (target > 0)", "max epsilon spent", "test patients"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["seed"]), f"{r['wall_s']:.0f}", f"{r['fed']:.3f}", f"{r['central']:.3f}",
                  f"{r['central'] - r['fed']:+.3f}", f"{r['local']:.3f}", f"{r['fed'] - r['local']:+.3f}",
                  f"{r['eps']:.3f}", str(r["test_n"]))
    Console().print(t)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
