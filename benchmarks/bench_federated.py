"""Federated training targets (issue 5), each measured against its baseline in the same run.

1. round-wall: 3 sites on loopback (deployment engine: SuperLink, TLS, one SuperNode process
   per site): each round's wall time against the slowest site's local training time in that
   round (reported by the sites), with `evoclone train`'s own schedule (batch 32, 2 local
   epochs a round). Target: <= 1.3x.
2. scale: 100 simulated sites x 5 rounds on Flower's simulation engine. Target: <= 15 min
   on 2 cores.
3. accuracy: non-IID simulated hospitals, and GBSG2 (a real trial, lifelines) split into
   sites: the federated DP model (epsilon E per site) against the mean local-only model and
   centralized non-private training, held-out C-index on the sites' pooled test splits.
   Target: federated > mean local, and >= centralized - 0.03. Two local-only baselines: trained
   without DP (a model that never leaves its site needs none: the strict one), and under the
   federated run's own DP schedule and epsilon (like for like: a model a site shares, as a twin
   model is, must be private whoever trained it). Schedules (DEFAULTS below): the simulator's
   sites train at batch 256, lr 2e-2 over 10 rounds of 3 local epochs, GBSG2's (about 150 patients
   a site) at batch 64, lr 5e-3 over 15 rounds of one local epoch; `benchmarks/replay_fedavg.py`
   replays a run to compare others.

    python benchmarks/bench_federated.py --what accuracy --json bench-out/federated.json
    python benchmarks/bench_federated.py --what round-wall --patients 12000 --rounds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from evoclone.cli.train_jobs import TrainOptions, run_train
from evoclone.federated.tabular import OutcomeColumns

COVARIATES_SIM = ["age", "sex", "bmi", "genotype", "diabetes", "hypertension", "ckd", "prior_mi"]


def simulator_table(patients: int, sites: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The simulator's hospitals (non-IID case mix) as one flat table with a site column + events."""
    from evoclone.federated.simulator import simulate_cohort

    cohort = simulate_cohort(patients=patients, sites=sites, seed=seed)
    rows, evs = [], []
    for site, p in cohort.patients.items():
        enrol = pd.to_datetime(p["enrollment_date"])
        frame = pd.DataFrame({
            "patient_id": p["mrn"], "hospital": site,
            "age": ((enrol - pd.to_datetime(p["birth_date"])).dt.days / 365.25).round(1),
            **{c: p[c] for c in COVARIATES_SIM if c != "age"}, "arm": p["arm"],
            "days": (pd.to_datetime(p["followup_end_date"]) - enrol).dt.days, "event": p["event"]})
        rows.append(frame)
        e = cohort.events[site]
        start = dict(zip(p["mrn"], enrol))
        evs.append(pd.DataFrame({"patient_id": e["mrn"],
                                 "time": (pd.to_datetime(e["date"]) - e["mrn"].map(start)).dt.days,
                                 "code": e["code"], "value": e["value"], "unit": e["unit"]}))
    return pd.concat(rows, ignore_index=True), pd.concat(evs, ignore_index=True)


def gbsg2_table(sites: int, seed: int) -> pd.DataFrame:
    """GBSG2 split into hospitals by a covariate-dependent draw (non-IID case mix)."""
    from lifelines.datasets import load_gbsg2

    df = load_gbsg2().reset_index(drop=True)
    rng = np.random.default_rng(seed)
    # larger tumours and more nodes go more often to the last hospitals (referral centres)
    score = (df["tsize"].rank(pct=True) + df["pnodes"].rank(pct=True)) / 2
    p = np.stack([np.exp(2.0 * (k / max(sites - 1, 1) - 0.5) * (score - 0.5)) for k in range(sites)], axis=1)
    p /= p.sum(axis=1, keepdims=True)
    hospital = [f"h{1 + rng.choice(sites, p=row)}" for row in p]
    out = df.assign(hospital=hospital, arm=(df["horTh"] == "yes").astype(int),
                    patient_id=[f"G{i:05d}" for i in range(len(df))]).drop(columns=["horTh"])
    return out.rename(columns={"time": "days", "cens": "event"})


def _train(table: pd.DataFrame, events: pd.DataFrame | None, work: Path, *, engine: str, rounds: int,
           epsilon: float, args, covariates: list[str] | None = None, insecure: bool = False, **kw) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    data = work / "table.csv"
    table.to_csv(data, index=False)
    ev_path = None
    if events is not None:
        ev_path = work / "events.csv"
        events.to_csv(ev_path, index=False)
    opts = TrainOptions(data=data, events=ev_path, site_column="hospital", treatment="arm",
                        outcome=OutcomeColumns(time="days", event="event"), out=work / "model",
                        work_dir=work / "study", covariates=covariates, rounds=rounds, epsilon=epsilon,
                        engine=engine, batch_size=args.batch, local_epochs=args.local_epochs,
                        learning_rate=args.lr, seed=args.seed, force=True, insecure=insecure, **kw)
    return run_train(opts)


def round_wall(args) -> dict:
    table, events = simulator_table(args.patients, 3, args.seed)
    summary = _train(table, events, Path(args.work) / "round-wall", engine="deployment", rounds=args.rounds,
                     epsilon=args.epsilon, args=args, covariates=COVARIATES_SIM)
    rows = []
    for r in summary["models"]["fusion"]["rounds"]:
        ok = [p for p in r["participation"] if p["status"] == "ok"]
        slowest = max(p.get("train_seconds", 0.0) for p in ok)
        # where the rest goes, for the site that replied last by its own clock: delivery to its handler, the
        # handler's work outside training (validation, ledger), and its reply's way back to the aggregate
        last = max(ok, key=lambda p: p.get("start_latency_seconds", 0.0) + p.get("handler_seconds", 0.0))
        start, handler = last.get("start_latency_seconds", 0.0), last.get("handler_seconds", 0.0)
        rows.append({"round": r["round"], "wall_s": round(r["wall_seconds"], 2), "slowest_local_train_s": round(slowest, 2),
                     "ratio": round(r["wall_seconds"] / slowest, 3),
                     "last_site": {"start_latency_s": round(start, 2), "handler_outside_training_s":
                                   round(handler - last.get("train_seconds", 0.0), 2),
                                   "return_s": round(r["wall_seconds"] - start - handler, 2)}})
    prepare = summary["models"]["fusion"].get("prepare") or {}
    return {"what": "round-wall", "sites": 3, "patients": args.patients, "rounds": rows,
            "prepare_wall_s": prepare.get("wall_seconds"),  # the sites encoding their records, before round 1
            "mean_ratio": round(float(np.mean([r["ratio"] for r in rows])), 3), "target": "<= 1.3"}


def scale(args) -> dict:
    table, _ = simulator_table(args.scale_patients, args.scale_sites, args.seed)
    t0 = time.perf_counter()
    a = argparse.Namespace(**{**vars(args), "batch": args.scale_batch})
    summary = _train(table, None, Path(args.work) / "scale", engine="simulation", rounds=5, epsilon=args.epsilon,
                     args=a, covariates=COVARIATES_SIM)
    wall = time.perf_counter() - t0
    rounds = summary["models"]["fusion"]["rounds"]
    return {"what": "scale", "sites": args.scale_sites, "patients": args.scale_patients, "rounds": len(rounds),
            "sites_trained_per_round": [r["trained"] for r in rounds], "wall_s": round(wall, 1),
            "target": "<= 900 s on 2 cores"}


def load_run(model_dir: Path, sites_dir: Path, names: list[str]):
    """A run's federated ensemble, each site's encoded arrays (from its snapshot, with the study's feature
    spec) and the sites' pooled test split."""
    from evoclone.federated.artifacts import load_component
    from evoclone.federated.features import FeatureSpec, encode_cohort
    from evoclone.federated.predictor import FusionEnsemble
    from evoclone.federated.snapshot import read_snapshot
    from evoclone.federated.training import concat, subset
    from evoclone.site_node.settings import get_settings

    tensors, entry, vocab = load_component(model_dir, "predictor")
    spec = FeatureSpec.from_dict(vocab)
    sites = {name: encode_cohort(read_snapshot(get_settings(sites_dir / name).snapshot_path)[0], spec) for name in names}
    return (FusionEnsemble.from_state(entry["config"], tensors), sites,
            subset(concat([subset(a, "test") for a in sites.values()])))


def _evaluate(summary: dict, work: Path, args) -> dict:
    """Held-out C-index of the federated model, the local-only models and centralized training."""
    from evoclone.federated.metrics import c_index
    from evoclone.federated.training import TrainConfig, build_model, concat, predict_risk, subset, train_with_validation

    ens, sites, test = load_run(Path(summary["model_dir"]), work / "study" / "sites", [s["name"] for s in summary["sites"]])
    fed = c_index(test["time"], test["event"], ens.predict(test)["risk"])
    base = TrainConfig(epochs=args.baseline_epochs, batch_size=32, lr=3e-3, seed=args.seed)
    central = build_model(ens.cfg, seed=args.seed)
    train_with_validation(central, concat([subset(a, "train") for a in sites.values()]),
                          concat([subset(a, "val") for a in sites.values()]), base)
    cen = c_index(test["time"], test["event"], predict_risk(central, test))
    local = {}
    for name, a in sites.items():
        m = build_model(ens.cfg, seed=args.seed)
        train_with_validation(m, subset(a, "train"), subset(a, "val"), base)
        local[name] = round(c_index(test["time"], test["event"], predict_risk(m, test)), 4)
    mean_local = float(np.mean(list(local.values())))
    local_dp = {name: round(_local_dp(ens.cfg, a, test, args), 4) for name, a in sites.items()}
    eps = {s["name"]: s["epsilon_spent"] for s in summary["sites"]}
    return {"federated_dp": round(fed, 4), "centralized": round(cen, 4), "local_only": local,
            "mean_local": round(mean_local, 4), "local_only_dp": local_dp,
            "mean_local_dp": round(float(np.mean(list(local_dp.values()))), 4),
            "test_patients": int(len(test["time"])), "epsilon_spent": eps,
            "beats_local": bool(fed > mean_local), "within_0.03_of_central": bool(fed >= cen - 0.03)}


def _local_dp(cfg, site: dict, test: dict, args) -> float:
    """Like for like: the site alone under the federated run's privacy and schedule. DP-SGD at the same epsilon
    (Opacus RDP accountant), batch, clipping, learning rate and local epochs, `--rounds` times, the optimizer
    restarted each time as in a round; the best of those by the site's own validation loss, as the federated run
    keeps its best round by the federated validation loss."""
    from evoclone.federated.metrics import c_index
    from evoclone.federated.trainer import TrainConfig, budgeted_dp
    from evoclone.federated.training import build_model, predict_risk, subset, train_with_validation

    train_arrays = subset(site, "train")
    schedule = TrainConfig(epochs=args.rounds * args.local_epochs, batch_size=args.batch, lr=args.lr, seed=args.seed)
    dp = budgeted_dp(len(train_arrays["static"]), schedule, target_epsilon=args.epsilon * (1 - args.arm_shift_share),
                     delta=1e-5, max_grad_norm=args.max_grad_norm)
    model = build_model(cfg, seed=args.seed)
    train_with_validation(model, train_arrays, subset(site, "val"), schedule, dp=dp, check_every=args.local_epochs)
    return float(c_index(test["time"], test["event"], predict_risk(model, test)))


def _mean_sd(xs: list[float]) -> dict:
    return {"mean": round(float(np.mean(xs)), 4), "sd": round(float(np.std(xs, ddof=1)), 4) if len(xs) > 1 else 0.0}


def accuracy(args) -> dict:
    """Each dataset `--reps` times (new site keys, so new splits; new seeds): means and sds."""
    schedules = {"simulator": {k: getattr(args, k) for k in ("rounds", "batch", "lr", "local_epochs")},
                 "gbsg2": {k: getattr(args, f"gbsg2_{k}") for k in ("rounds", "batch", "lr", "local_epochs")}}
    out = {"what": "accuracy", "epsilon": args.epsilon, "strategy": args.strategy, "schedule": schedules,
           "server_lr": args.server_lr, "reps": args.reps}
    # the target is the prognostic model's accuracy at --epsilon per site: by default the whole budget trains it
    # (--arm-shift-share > 0 keeps that share for the post-training arm-effect query, as `evoclone train` does)
    extra = {"server-learning-rate": args.server_lr, "d-model": args.d_model, "arm-shift-share": args.arm_shift_share,
             "max-grad-norm": args.max_grad_norm, "accountant": args.accountant}
    for dataset in args.datasets.split(","):
        reps = []
        for rep in range(args.reps):
            seed = args.seed + rep
            w = Path(args.work) / f"acc-{dataset}-{rep}"
            a = argparse.Namespace(**{**vars(args), "seed": seed, **schedules[dataset]})
            if dataset == "simulator":
                table, events = simulator_table(args.patients, args.sites, seed)
                covariates = COVARIATES_SIM
            else:
                table, events = gbsg2_table(args.sites, seed), None
                covariates = ["age", "menostat", "tsize", "tgrade", "pnodes", "progrec", "estrec"]
            summary = _train(table, events, w, engine="simulation", rounds=a.rounds, epsilon=args.epsilon, args=a,
                             covariates=covariates, strategy=args.strategy, extra_run_config=extra)
            reps.append({**_evaluate(summary, w, a), "best_round": summary["models"]["fusion"]["best_round"]})
            print(dataset, rep, {k: reps[-1][k] for k in ("federated_dp", "mean_local", "mean_local_dp", "centralized")},
                  flush=True)
        fed = [r["federated_dp"] for r in reps]
        loc = [r["mean_local"] for r in reps]
        cen = [r["centralized"] for r in reps]
        loc_dp = [r["mean_local_dp"] for r in reps]
        out[dataset] = {"sites": args.sites, "patients": int(len(table)), "federated_dp": _mean_sd(fed),
                        "mean_local": _mean_sd(loc), "mean_local_dp": _mean_sd(loc_dp), "centralized": _mean_sd(cen),
                        "beats_local": bool(np.mean(fed) > np.mean(loc)),
                        "beats_local_dp": bool(np.mean(fed) > np.mean(loc_dp)),
                        "within_0.03_of_central": bool(np.mean(fed) >= np.mean(cen) - 0.03), "runs": reps}
    return out


def _train_defaults() -> dict:
    """`evoclone train`'s own schedule (TrainOptions' defaults): what a sponsor's rounds run unless told otherwise."""
    d = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    return {"rounds": d["rounds"], "batch": d["batch_size"], "lr": d["learning_rate"], "local_epochs": d["local_epochs"]}


# Each target's schedule where the command line leaves it open. Round wall: `evoclone train`'s defaults, the
# rounds its users get (until 2026-11-30 it ran batch 128, lr 5e-3, 3 local epochs: 4 times fewer, larger steps;
# pass those flags to compare with the older figures). Scale: its earlier measurements' settings. Accuracy: DP-SGD
# does better with large batches, a higher learning rate and more rounds at the same epsilon (fewer, less noisy
# steps; docs/benchmarks.md, 2026-11-30).
DEFAULTS = {"round-wall": _train_defaults(),
            "scale": {"lr": 5e-3, "local_epochs": 3},  # its own --scale-batch and 5 rounds
            "accuracy": {"rounds": 10, "batch": 256, "lr": 2e-2, "local_epochs": 3}}


def with_defaults(args: argparse.Namespace, what: str) -> argparse.Namespace:
    """`args` with the target's own rounds, batch, learning rate and local epochs where none was given."""
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in DEFAULTS[what].items() if getattr(args, k) is None}})


def _default_help(key: str) -> str:
    """The per-target defaults of one schedule setting, for --help (read from DEFAULTS, so it cannot go stale)."""
    return "(default: " + ", ".join(f"{what} {d[key]:g}" for what, d in DEFAULTS.items() if key in d) + ")"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=("round-wall", "scale", "accuracy", "all"), default="all")
    ap.add_argument("--patients", type=int, default=3000)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None, help="rounds " + _default_help("rounds"))
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=None,
                    help="DP batch size on simulator sites " + _default_help("batch"))
    ap.add_argument("--gbsg2-batch", type=int, default=64, help="DP batch size on GBSG2 (about 150 patients a site)")
    ap.add_argument("--gbsg2-lr", type=float, default=5e-3,
                    help="learning rate on GBSG2 (at 2e-2 over 10 rounds one run of three diverged, 2026-11-30)")
    ap.add_argument("--gbsg2-rounds", type=int, default=15,
                    help="rounds on GBSG2 (15 of one local epoch beat 5 of three on the same six splits, 2026-11-30)")
    ap.add_argument("--gbsg2-local-epochs", type=int, default=1, help="local epochs a round on GBSG2")
    ap.add_argument("--local-epochs", type=int, default=None,
                    help="local epochs a round on simulator sites " + _default_help("local_epochs"))
    ap.add_argument("--lr", type=float, default=None,
                    help="local learning rate " + _default_help("lr"))
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD per-example clipping norm")
    ap.add_argument("--accountant", choices=("rdp", "prv"), default="rdp", help="the sites' Opacus accountant")
    ap.add_argument("--strategy", default="fedavg")
    ap.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's server learning rate")
    ap.add_argument("--datasets", default="simulator,gbsg2", help="accuracy: which datasets")
    ap.add_argument("--reps", type=int, default=3, help="accuracy: repetitions (new splits and seeds)")
    ap.add_argument("--baseline-epochs", type=int, default=20)
    ap.add_argument("--d-model", type=int, default=16, help="fusion model width (DP noise grows with parameters)")
    ap.add_argument("--arm-shift-share", type=float, default=0.0,
                    help="accuracy: share of epsilon kept for the arm-effect query (0: all of it trains the model)")
    ap.add_argument("--scale-sites", type=int, default=100)
    ap.add_argument("--scale-patients", type=int, default=8000)
    ap.add_argument("--scale-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", default="bench-out/federated")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results = []
    for what, fn in (("round-wall", round_wall), ("scale", scale), ("accuracy", accuracy)):
        if args.what in (what, "all"):
            t0 = time.perf_counter()
            res = fn(with_defaults(args, what))
            res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(res, indent=1), flush=True)
            results.append(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
