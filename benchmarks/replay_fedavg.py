"""Replay a bench run's federated training in one process, to see where its accuracy goes.

`bench_federated.py --what accuracy` trains through Flower (a minute or more a run). This
script takes the sites' encoded snapshots of one such run (its work directory) and replays
FedAvg with DP-SGD in process, a few seconds a round, so one split can be trained many ways
and compared on the same held-out patients (C-index on the sites' pooled test splits):

- `--layout sites` (the run's hospitals, non-IID), `iid` (their training rows pooled and
  dealt out at random to as many sites) or `pooled` (one site: centralized training);
- `--no-dp` (the same schedule without clipping or noise) against DP-SGD at `--epsilon` per
  site, its noise calibrated by Opacus's RDP accountant for all the rounds (`budgeted_dp`);
- the schedule: rounds, local epochs, batch size, learning rate, clipping norm;
- `--scaffold`: SCAFFOLD's drift correction (Karimireddy et al. 2020, option II), the control
  variates computed from each site's model change, so post-processing of its DP output.

The model kept is the best round by the sites' pooled validation loss, as the ServerApp keeps
it. Each variant runs with every `--seeds` seed; the mean and the per-seed figures print.

    python benchmarks/bench_federated.py --what accuracy --datasets simulator --reps 1 --seed 8
    python benchmarks/replay_fedavg.py bench-out/federated/acc-simulator-0 --seeds 7,8,9 \\
        --variant '{"name": "bench", "batch": 256, "lr": 0.02, "rounds": 10}' \\
        --variant '{"name": "pooled, no DP", "layout": "pooled", "no_dp": true, "batch": 32, "lr": 0.003, "epochs": 1, "rounds": 12}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from bench_federated import load_run as bench_run  # benchmarks/ is on the path when run as a script
from evoclone.federated.metrics import c_index
from evoclone.federated.trainer import TrainConfig, budgeted_dp
from evoclone.federated.training import build_model, concat, mean_loss, predict_risk, subset, train

SETTINGS = {"layout": "sites", "no_dp": False, "rounds": 5, "epochs": 3, "batch": 128, "lr": 5e-3, "clip": 1.0,
            "epsilon": 3.0, "scaffold": False}


def load_run(work: Path):
    """(model config, {site: train arrays}, {site: val arrays}, pooled test arrays) of a bench run."""
    sites_dir = work / "study" / "sites"
    ens, sites, test = bench_run(work / "model", sites_dir, sorted(p.name for p in sites_dir.iterdir() if p.is_dir()))
    return (ens.cfg, {k: subset(a, "train") for k, a in sites.items()}, {k: subset(a, "val") for k, a in sites.items()},
            test)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mean(states: list[dict], weights: list[int]) -> dict:
    w = np.asarray(weights, float) / sum(weights)
    return {k: sum(wi * s[k] for wi, s in zip(w, states)) for k in states[0]}


def _layout(train_sets: dict, layout: str) -> dict:
    if layout == "sites":
        return train_sets
    rows = concat(list(train_sets.values()))
    if layout == "pooled":
        return {"pooled": rows}
    perm = np.random.default_rng(0).permutation(len(rows["static"]))
    n = len(train_sets)
    return {f"iid-{j}": {k: v[perm[j::n]] for k, v in rows.items()} for j in range(n)}


def replay(cfg, train_sets: dict, val_sets: dict, test: dict, *, seed: int, layout: str, no_dp: bool, rounds: int,
           epochs: int, batch: int, lr: float, clip: float, epsilon: float, scaffold: bool) -> float:
    """Test C-index of the best round (by pooled validation loss) of one replayed federated run."""
    parts = _layout(train_sets, layout)
    sizes = [len(a["static"]) for a in parts.values()]
    dp = {k: None if no_dp else budgeted_dp(len(a["static"]), TrainConfig(epochs=rounds * epochs, batch_size=batch,
                                                                          lr=lr, seed=seed),
                                            target_epsilon=epsilon, delta=1e-5, max_grad_norm=clip)
          for k, a in parts.items()}
    val_weights = [len(v["static"]) for v in val_sets.values()]
    model = build_model(cfg, seed=seed)
    glob = _state(model)
    params = [torch.zeros_like(p) for p in model.parameters()]
    c_global, c_site = [z.clone() for z in params], {k: [z.clone() for z in params] for k in parts}

    def val_loss(state: dict) -> float:
        model.load_state_dict(state)
        return float(np.average([mean_loss(model, v) for v in val_sets.values()], weights=val_weights))

    best, best_state = float("inf"), None
    for r in range(1, rounds + 1):
        states, new_c = [], {}
        for i, (k, arrays) in enumerate(parts.items()):
            model.load_state_dict(glob)
            start = [p.detach().clone() for p in model.parameters()]
            steps = [0]
            hook = None  # SCAFFOLD's correction after every local step
            if scaffold:
                correction = [c - ci for c, ci in zip(c_global, c_site[k])]

                def correct(done, total, correction=correction, steps=steps):
                    steps[0] += 1
                    with torch.no_grad():
                        for p, c in zip(model.parameters(), correction):
                            p.sub_(lr * c)
                hook = correct
            train(model, arrays, TrainConfig(epochs=epochs, batch_size=batch, lr=lr, seed=seed + r + 100 * i),
                  dp=dp[k], on_step=hook)
            if scaffold:
                new_c[k] = [ci - c + (x - p.detach()) / (steps[0] * lr)
                            for ci, c, x, p in zip(c_site[k], c_global, start, model.parameters())]
            states.append(_state(model))
        glob = _mean(states, sizes)
        if scaffold:
            c_site.update(new_c)
            c_global = [sum(c_site[k][j] for k in parts) / len(parts) for j in range(len(params))]
        loss = val_loss(glob)
        if loss < best:
            best, best_state = loss, glob
    model.load_state_dict(best_state)
    return float(c_index(test["time"], test["event"], predict_risk(model, test)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="a bench run's work directory (bench-out/federated/acc-simulator-0)")
    ap.add_argument("--variant", action="append", required=True,
                    help=f"JSON object: a name and any of {sorted(SETTINGS)} (defaults {SETTINGS})")
    ap.add_argument("--seeds", default="7,8,9")
    args = ap.parse_args(argv)
    if not (args.work / "model").is_dir():
        print(f"error: {args.work} holds no bench run (no model/); run bench_federated.py --what accuracy first",
              file=sys.stderr)
        return 2
    cfg, train_sets, val_sets, test = load_run(args.work)
    seeds = [int(s) for s in args.seeds.split(",")]
    for raw in args.variant:
        spec = json.loads(raw)
        name = spec.pop("name", raw)
        unknown = set(spec) - set(SETTINGS)
        if unknown:
            print(f"error: variant {name!r} has unknown settings {sorted(unknown)}; use {sorted(SETTINGS)}",
                  file=sys.stderr)
            return 2
        if spec.get("layout", "sites") not in ("sites", "iid", "pooled"):
            print(f"error: variant {name!r} has layout {spec['layout']!r}; use sites, iid or pooled", file=sys.stderr)
            return 2
        scores = [replay(cfg, train_sets, val_sets, test, seed=s, **{**SETTINGS, **spec}) for s in seeds]
        print(f"{name:32s} {np.mean(scores):.4f}  per seed {[round(x, 4) for x in scores]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
