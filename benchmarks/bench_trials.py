"""In-silico trials against real randomized trials (issue 6).

For each trial shipped with lifelines (GBSG2: hormonal therapy in node-positive breast
cancer, Schumacher et al. 1994; Rossi: financial aid for released prisoners, Rossi et al.
1980), the patients are split at random into three hospitals, a fusion ensemble is trained
federated across them (Flower simulation engine, DP-SGD, epsilon per site), every patient's
twins are run under both arms (`trial simulate`), and the twins' hazard ratio is compared
with the trial's own estimate: the Cox model of the randomized arms on the same patients
(lifelines), the published analysis of these data. Target: the twins' estimate lies inside
the trial's 95% confidence interval. The same model trained centrally without DP is the
in-run baseline.

    python benchmarks/bench_trials.py --seeds 3 --json bench-out/trials.json

With `--decompose`, each federated run also reports what the exact (noise-free) arm-effect estimate on
every patient with the same federated network would have given, and what moved the log hazard ratio
away from it (the twins' hazard ratio scales by exp of the change under proportional hazards): the
query's DP noise (against the noise-free sums of the same patients), the sites' test splits, which the
query does not see, and the follow-up cut at the hazard budget.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from evoclone.cli.train_jobs import TrainOptions, run_train
from evoclone.cli.trial_jobs import SimulateOptions, simulate
from evoclone.cli.twins_jobs import Columns, load_table, train_fusion
from evoclone.federated.effects import estimate_effect
from evoclone.federated.tabular import OutcomeColumns

TRIALS = {
    # name: (loader, treatment, time, event)
    "gbsg2": ("load_gbsg2", "horTh", "time", "cens"),
    "rossi": ("load_rossi", "fin", "week", "arrest"),
}


def trial_table(name: str) -> pd.DataFrame:
    """The trial as shipped with lifelines."""
    import lifelines.datasets as ds

    return getattr(ds, TRIALS[name][0])().reset_index(drop=True)


def run_one(name: str, seed: int, args, work: Path) -> dict:
    """Federated DP model -> twins -> hazard ratio, against the trial's Cox estimate and a central model."""
    _, treatment, t, e = TRIALS[name]
    df = trial_table(name)
    df["hospital"] = np.random.default_rng(seed).choice(["A", "B", "C"], len(df))
    data = work / f"{name}-{seed}.csv"
    df.to_csv(data, index=False)
    cohort = work / f"{name}-cohort.csv"
    df.drop(columns="hospital").to_csv(cohort, index=False)
    outcome = OutcomeColumns(time=t, event=e)
    covariates = [c for c in df.columns if c not in (treatment, t, e, "hospital")]
    arm = (df[treatment].astype(str).str.lower().isin(["yes", "1", "true"])).to_numpy(int)
    ref = estimate_effect("time_to_event", arm=arm, time=df[t].to_numpy(float), event=df[e].to_numpy(float))
    started = time.monotonic()
    fed_dir = work / f"fed-{name}-{seed}"
    run_train(TrainOptions(data=data, site_column="hospital", treatment=treatment, outcome=outcome, out=fed_dir,
                           covariates=covariates, rounds=args.rounds, epsilon=args.epsilon, engine="simulation",
                           local_epochs=args.local_epochs, batch_size=args.batch_size, learning_rate=args.lr,
                           members=args.members, seed=seed, insecure=True, work_dir=work / f"study-{name}-{seed}",
                           force=True, extra_run_config={} if args.arm_shift_share is None
                           else {"arm-shift-share": args.arm_shift_share}))
    fed_seconds = time.monotonic() - started
    fed, _ = simulate(SimulateOptions(model_dir=fed_dir, cohort=cohort, twins=args.twins, seed=seed))
    central_dir = work / f"central-{name}-{seed}"
    cols = Columns(treatment=treatment, outcome=outcome, covariates=covariates)
    train_fusion(load_table(cohort, None, cols), out=central_dir, cols=cols, data_fp="bench", epsilon=None,
                 delta=1e-5, epochs=30, batch_size=32, lr=3e-3, seed=seed, members=args.members)
    central, _ = simulate(SimulateOptions(model_dir=central_dir, cohort=cohort, twins=args.twins, seed=seed))

    def inside(x: dict) -> bool:
        return ref.ci_low <= x["effect"]["estimate"] <= ref.ci_high

    extra = (_decompose(fed_dir, work / f"study-{name}-{seed}", cohort, cols, fed["effect"]["estimate"],
                        args.arm_shift_clip) if args.decompose else {})
    return {**extra, "trial": name, "seed": seed, "patients": len(df),
            "trial_hr": ref.estimate, "trial_ci": [ref.ci_low, ref.ci_high],
            "federated_dp_hr": fed["effect"]["estimate"],
            "federated_dp_ci": [fed["effect"]["ci_low"], fed["effect"]["ci_high"]],
            "federated_inside": inside(fed), "central_hr": central["effect"]["estimate"],
            "central_inside": inside(central), "train_seconds": round(fed_seconds, 1)}


def _decompose(fed_dir: Path, study_dir: Path, cohort: Path, cols, fed_hr: float, clip: float) -> dict:
    """Where the federated arm effect moved from the exact estimate on every patient (federated.arm_shift): the
    query's DP noise (the noised sums against the same sums without noise, on the same patients: each site's
    training and validation splits, read back from the encoding the site kept), the patients the query does not
    see (each site's test split), and the follow-up cut at the hazard budget."""
    import math
    import pickle

    from evoclone.cli.twins_jobs import load_ensemble
    from evoclone.federated.arm_shift import arm_sums, effect_se, estimate, fit_arm_shift
    from evoclone.federated.features import encode_cohort
    from evoclone.federated.training import concat, subset

    ensemble, spec, entry = load_ensemble(fed_dir)
    noised = ensemble.arm_shift
    arrays = subset(encode_cohort(load_table(cohort, None, cols).records, spec), None, "time_to_event")
    exact = fit_arm_shift(ensemble, arrays)
    cut = estimate("time_to_event", arm_sums(ensemble, arrays, clip=clip))  # every patient, follow-up cut
    asked, cov = np.zeros(4), np.zeros((2, 2))  # what the sites' query summed without its noise; the noise's covariance
    for site in sorted((study_dir / "sites").iterdir()):
        with next((site / "flower-encoded").glob("*.pkl")).open("rb") as f:
            data = pickle.load(f)  # noqa: S301 (this bench's own site, written by its ClientApp)
        asked += arm_sums(ensemble, concat([data["train"], data["val"]]), clip=clip)
        kept = json.loads(next((site / "flower-updates").glob("*.arm-shift.json")).read_text())
        cov += np.asarray(kept["noise_cov"])
    same = estimate("time_to_event", asked)
    if noised is None or exact is None or cut is None or same is None:
        return {"decompose": "no arm effect to compare"}
    log_effect = lambda g: g[1] - g[0]  # noqa: E731
    moved = log_effect(noised) - log_effect(exact)
    # the sd of the log HR's move that the query's noise was predicted to cause (the delta method at the same sums)
    noise_sd = math.sqrt(effect_se("time_to_event", asked, cov) ** 2 - effect_se("time_to_event", asked) ** 2)
    return {"query_noise_log_hr": log_effect(noised) - log_effect(same),
            "held_out_log_hr": log_effect(same) - log_effect(cut), "follow_up_cut_log_hr": log_effect(cut) - log_effect(exact),
            "federated_exact_effect_hr": fed_hr * math.exp(-moved), "arm_effect_se": (entry.get("arm_effect") or {}).get("se"),
            "query_noise_sd_predicted": noise_sd, "query_sums_exact": [float(x) for x in asked]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", default="gbsg2,rossi")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--twins", type=int, default=20)
    ap.add_argument("--arm-shift-clip", type=float, default=0.5, help="the app's arm-shift-clip (for --decompose)")
    ap.add_argument("--arm-shift-share", type=float, default=None,
                    help="share of each site's epsilon for the arm-effect query (default: the app's)")
    ap.add_argument("--decompose", action="store_true",
                    help="also report each federated run's exact arm effect and the query noise's share of the error")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-trials-") as tmp:
        for name in args.trials.split(","):
            for seed in range(args.seeds):
                rows.append(run_one(name, seed, args, Path(tmp)))
    t = Table(title=f"In-silico trial vs the real trial (federated DP, epsilon {args.epsilon} per site)")
    for c in ("trial", "seed", "trial HR (95% CI)", "twins HR, federated DP (95% CI)", "inside", "twins HR, central",
              "inside"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["trial"], str(r["seed"]), f"{r['trial_hr']:.3f} ({r['trial_ci'][0]:.3f}-{r['trial_ci'][1]:.3f})",
                  f"{r['federated_dp_hr']:.3f} ({r['federated_dp_ci'][0]:.3f}-{r['federated_dp_ci'][1]:.3f})",
                  "yes" if r["federated_inside"] else "NO", f"{r['central_hr']:.3f}",
                  "yes" if r["central_inside"] else "NO")
    Console().print(t)
    for r in rows:
        if "query_noise_log_hr" in r:
            Console().print(f"{r['trial']} seed {r['seed']}: with the exact arm effect on every patient the federated "
                            f"twins' HR would be {r['federated_exact_effect_hr']:.3f}; the log HR was moved by the "
                            f"query's noise {r['query_noise_log_hr']:+.3f} (predicted sd "
                            f"{r['query_noise_sd_predicted'] or float('nan'):.3f}; the manifest's standard error "
                            f"{r['arm_effect_se'] or float('nan'):.3f}), the sites' test splits, which the query does "
                            f"not see, {r['held_out_log_hr']:+.3f}, the follow-up cut {r['follow_up_cut_log_hr']:+.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
