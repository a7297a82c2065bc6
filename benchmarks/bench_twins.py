"""Twin-model quality targets, each against a baseline measured in the same run.

1. Simulator, GPT twin generator at epsilon E (default 3) vs the same model trained without
   DP: unigram/bigram R² of future-event frequencies, TSTR vs TRTR (Cox C-index on held-out
   patients), membership-inference AUC and NNAA. Targets at epsilon 3: unigram R² >= 0.95,
   bigram R² >= 0.85, TSTR >= 0.9 x TRTR, MIA AUC <= 0.6.
2. GBSG2 (a real randomized trial shipped with lifelines): held-out C-index of the fusion
   ensemble (non-private, and DP at epsilon E) against lifelines' Cox model on the same split.
   Target: fusion >= Cox - 0.02.

    python benchmarks/bench_twins.py --patients 3000 --epsilon 3 --json bench-out/twins.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evoclone.federated.features import FeatureSpec, encode_cohort, split_of, split_records
from evoclone.federated.generation import SamplingConfig
from evoclone.federated.generator_training import build_generator, encode_records, perplexity, train_generator
from evoclone.federated.metrics import c_index
from evoclone.federated.predictor import PREDICTOR_HORIZON_QUANTILE, ensemble_dp, ensemble_history, train_ensemble
from evoclone.federated.simulator import cohort_records, simulate_cohort
from evoclone.federated.tokenizer import EventTokenizer, default_horizon
from evoclone.federated.trainer import TrainConfig, budgeted_dp
from evoclone.federated.training import subset
from evoclone.federated.twin_eval import evaluate_generator
from evoclone.privacy.accounting import epsilon_of

SIM_COVARIATES = ["age", "sex", "bmi", "genotype", "diabetes", "hypertension", "ckd", "prior_mi"]


def simulator(args) -> list[dict]:
    """GPT generator quality, DP at args.epsilon vs non-private, on the simulator."""
    records = cohort_records(simulate_cohort(patients=args.patients, sites=3, seed=args.seed))
    train, val, test = ([records[i] for i in idx] for idx in split_records(records).values())
    tok = EventTokenizer.fit(train, covariates=SIM_COVARIATES, max_len=args.max_len)
    seqs, _ = encode_records(tok, train)
    val_seqs, _ = encode_records(tok, val)
    rows = []
    for eps in (None, args.epsilon):
        tcfg = TrainConfig(epochs=args.epochs if eps is None else args.dp_epochs, batch_size=args.batch,
                           lr=args.lr, seed=args.seed)
        dp = None if eps is None else budgeted_dp(len(seqs), tcfg, target_epsilon=eps, delta=args.delta,
                                                  max_grad_norm=args.clip, grad_sample_mode=args.grad_sample_mode)
        model = build_generator(tok, size=args.size, seed=args.seed).to(args.device)
        t0 = time.perf_counter()
        result = train_generator(model, tok, seqs, tcfg, dp=dp)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = evaluate_generator(model, tok, train, test, sampling=SamplingConfig(batch_size=256, seed=args.seed),
                                    seed=args.seed)
        eval_s = time.perf_counter() - t0
        u, p, f = report["utility"], report["privacy"], report["fidelity"]
        rows.append({
            "setting": "non-private" if eps is None else f"DP epsilon {eps}",
            "epsilon": round(epsilon_of(result.history, delta=args.delta), 3) if eps else None,
            "noise_multiplier": round(dp.noise_multiplier, 4) if dp else None,
            "val_perplexity": round(perplexity(model, val_seqs, pad_id=tok.pad_id), 3),
            "unigram_r2": f["unigram_r2"], "bigram_r2": f["bigram_r2"], "tstr": u["tstr"], "trtr": u["trtr"],
            "tstr_over_trtr": (u["tstr"] / u["trtr"]) if u["tstr"] and u["trtr"] else None,
            "mia_auc": p["mia_auc"], "nnaa": p["nnaa"], "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
            "failed_gate": report["patients"]["twins_failed_gate"]})
    return rows


def gbsg2(args) -> list[dict]:
    """Fusion ensemble vs lifelines' Cox on GBSG2's held-out patients."""
    import pandas as pd
    from lifelines import CoxPHFitter
    from lifelines.datasets import load_gbsg2

    from evoclone.federated.tabular import OutcomeColumns, records_from_frames

    df = load_gbsg2()
    table = records_from_frames(df, None, treatment="horTh", outcome=OutcomeColumns(time="time", event="cens"),
                                covariates=None, source="gbsg2")
    recs = table.records
    train_recs = [r for r in recs if split_of(r.patient_id) == 0]
    spec = FeatureSpec.fit(train_recs, covariates=table.covariates)
    arrays = encode_cohort(recs, spec)
    tr, va, te = (subset(arrays, s) for s in ("train", "val", "test"))
    split = np.array([split_of(r.patient_id) for r in recs])
    X = pd.get_dummies(df.drop(columns=["time", "cens"]), drop_first=True).astype(float)
    cox = CoxPHFitter(penalizer=0.01).fit(pd.concat([X[split != 2], df[["time", "cens"]][split != 2]], axis=1),
                                          duration_col="time", event_col="cens")
    cox_c = c_index(df["time"][split == 2].to_numpy(), df["cens"][split == 2].to_numpy(),
                    cox.predict_partial_hazard(X[split == 2]).to_numpy())
    from evoclone.federated.models.fusion import FusionConfig

    horizon = default_horizon(train_recs, PREDICTOR_HORIZON_QUANTILE)
    rows = [{"model": "lifelines CoxPH (train+val)", "test_c_index": round(float(cox_c), 4), "epsilon": None}]
    for eps in (None, args.epsilon):
        cfg = FusionConfig(static_dim=spec.static_dim, visit_dim=spec.visit_dim, max_visits=spec.max_visits,
                           endpoint="time_to_event", horizon_days=horizon)
        tcfg = TrainConfig(epochs=args.fusion_epochs, batch_size=32, lr=3e-3, seed=args.seed)
        dp = None if eps is None else ensemble_dp(len(tr["static"]), tcfg, members=args.members, target_epsilon=eps,
                                                   delta=args.delta, max_grad_norm=1.0)
        ens, results = train_ensemble(cfg, tr, va, tcfg, members=args.members, dp=dp)
        c = c_index(te["time"], te["event"], ens.predict(te)["risk"])
        spent = epsilon_of(ensemble_history(results), delta=args.delta) if dp else None
        rows.append({"model": f"fusion ensemble x{args.members}" + ("" if eps is None else f", DP"),
                     "test_c_index": round(float(c), 4), "epsilon": None if spent is None else round(spent, 3)})
    rows.append({"test_patients": int(len(te["static"])), "train_patients": int(len(tr["static"])),
                 "val_patients": int(len(va["static"]))})
    return rows


def _table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=3000)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int, default=30, help="non-private generator epochs")
    ap.add_argument("--dp-epochs", type=int, default=30, help="DP generator epochs")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--grad-sample-mode", default="hooks")
    ap.add_argument("--size", default="small")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--fusion-epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip", choices=("simulator", "gbsg2"), action="append", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"args": vars(args) | {"json": str(args.json)}, "date": time.strftime("%Y-%m-%d"),
           "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"}
    if "gbsg2" not in args.skip:
        out["gbsg2"] = gbsg2(args)
        _table("GBSG2: held-out C-index (target: fusion >= Cox - 0.02)", out["gbsg2"])
        sys.stdout.flush()
    if "simulator" not in args.skip:
        out["simulator"] = simulator(args)
        _table(f"Simulator ({args.patients} patients): GPT twins, DP vs non-private "
               "(targets at eps 3: uni>=0.95, bi>=0.85, TSTR>=0.9 TRTR, MIA<=0.6)", out["simulator"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
