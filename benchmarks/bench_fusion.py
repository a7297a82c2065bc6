"""Benchmark: DP-SGD training step time of the fusion predictor against the non-DP step.

Same model, same batch size, same process: each mode trains a fresh model through the one
training loop (`training.train` -> `trainer.fit`) and the time between consecutive
`on_step` calls is one optimiser step (data loading, forward, backward, per-sample
clipping and noise where DP is on). Modes run interleaved, `--repeats` times, and the
table shows medians after `--warmup` steps per run, of wall time and of this thread's CPU
time. Target: DP at most 1.5x non-DP (wall time; the target column judges that).

    .venv/bin/python benchmarks/bench_fusion.py [--batch 64] [--d-model 32] [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import numpy as np
import torch

from evoclone.federated.features import FeatureSpec
from evoclone.federated.models.fusion import FusionConfig
from evoclone.federated.trainer import DPSettings, TrainConfig
from evoclone.federated.training import build_model, train

TARGET = 1.5


def cohort(n: int, spec: FeatureSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic encoded patients with a time-to-event signal (shapes as features.encode_cohort)."""
    rng = np.random.default_rng(seed)
    static = rng.normal(size=(n, spec.static_dim)).astype(np.float32)
    return {"static": static, "visits": rng.normal(size=(n, spec.max_visits, spec.visit_dim)).astype(np.float32),
            "lengths": rng.integers(1, spec.max_visits + 1, n).astype(np.int64),
            "time": np.clip(400 * np.exp(-static[:, 0]) * rng.exponential(size=n), 1, 2000).astype(np.float32),
            "event": (rng.random(n) < 0.6).astype(np.float32), "binary": np.zeros(n, np.float32),
            "continuous": np.zeros(n, np.float32)}


def step_times(cfg: FusionConfig, data: dict[str, np.ndarray], batch: int, dp: DPSettings | None,
               warmup: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per training step after warm-up, for one fresh model.

    CPU time of this thread is reported too: on a shared machine a neighbour's load
    stretches wall time but not the work a step does (torch runs on this thread alone).
    """
    model = build_model(cfg, seed=0)
    stamps: list[tuple[float, float]] = [(time.perf_counter(), time.thread_time())]
    train(model, data, TrainConfig(epochs=1, batch_size=batch, lr=1e-3), dp=dp,
          on_step=lambda _d, _t: stamps.append((time.perf_counter(), time.thread_time())))
    wall, cpu = np.diff(np.asarray(stamps), axis=0)[warmup:].T
    return wall.tolist(), cpu.tolist()


def main() -> None:
    """Parse arguments, measure the modes interleaved, print the table (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="hooks,ghost")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = FeatureSpec()
    cfg = FusionConfig(static_dim=spec.static_dim, visit_dim=spec.visit_dim, max_visits=spec.max_visits,
                       d_model=args.d_model, n_layers=args.layers)
    data = cohort(args.batch * (args.steps + args.warmup), spec)
    modes: dict[str, DPSettings | None] = {"non-DP": None}
    for m in args.modes.split(","):
        modes[f"DP {m}"] = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=m)
    wall: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, dp in modes.items():  # interleaved, so a busy neighbour slows every mode alike
            w, c = step_times(cfg, data, args.batch, dp, args.warmup)
            wall[name] += w
            cpu[name] += c
    base, base_cpu = float(np.median(wall["non-DP"])), float(np.median(cpu["non-DP"]))
    rows = [{"mode": name, "median_ms": 1e3 * float(np.median(wall[name])),
             "p90_ms": 1e3 * float(np.percentile(wall[name], 90)), "ratio": float(np.median(wall[name])) / base,
             "cpu_ms": 1e3 * float(np.median(cpu[name])), "cpu_ratio": float(np.median(cpu[name])) / base_cpu,
             "steps": len(wall[name])} for name in modes]
    machine = platform.processor() or platform.machine()
    print(f"fusion predictor, d_model {args.d_model}, {args.layers} layer(s), batch {args.batch}, "
          f"{spec.max_visits} visits, {args.threads} thread(s); {date.today()} on {machine}")
    print(f"{'mode':<12}{'wall ms':>9}{'p90 ms':>9}{'x non-DP':>10}{'cpu ms':>9}{'x non-DP':>10}{'target':>9}"
          f"{'steps':>7}")
    for r in rows:
        target = "" if r["mode"] == "non-DP" else ("ok" if r["ratio"] <= TARGET else f">{TARGET}x")
        print(f"{r['mode']:<12}{r['median_ms']:>9.1f}{r['p90_ms']:>9.1f}{r['ratio']:>10.2f}{r['cpu_ms']:>9.1f}"
              f"{r['cpu_ratio']:>10.2f}{target:>9}{r['steps']:>7}")
    if args.json:
        print(json.dumps({"config": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
