"""Benchmark: PROCOVA statistics on simulated trials with a known effect, against the unadjusted analysis.

PROCOVA's setting: one prognostic model, fitted once per endpoint on a historical control
cohort (OLS, Logit or Cox on a few baseline covariates; the score is its linear predictor),
scores every patient of many fresh 1:1 randomized trials. Each replicate draws a trial with
a true effect and one without, and runs `effects.procova` on both; the unadjusted analysis of
the same trial is the in-run baseline.

- continuous: y = 10 + X b + delta * arm + N(0, 1.2^2); truth delta.
- binary: logit P(y) = -0.5 + X b + log_or * arm; truth the marginal risk difference,
  computed by Monte Carlo over 2e6 covariate draws from the generating model.
- time_to_event: exponential Cox model whose log hazard is the score plus log(HR) * arm
  (the score is the true linear predictor, so the adjusted Cox model is correct and its
  truth is the conditional HR), administrative censoring at 2 plus exponential drop-out.
  The unadjusted HR estimates a different, marginal quantity: it gets type-I error only.

Targets: 95% CI coverage 93-97%, type-I error <= 5.5% (two-sided 0.05), and for the
continuous endpoint the mean adjusted/unadjusted variance ratio within 10% (relative) of
1 - R^2, R^2 the score's within-arm r2 in the trial (Schuler et al. 2022).

    .venv/bin/python benchmarks/bench_procova.py [--replicates 1000] [--n 200] [--seed 0] [--workers 2] [--json]
"""

from __future__ import annotations

import os

# One BLAS thread per worker: the fits are tiny and the workers already fill the cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from datetime import date  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import binomtest  # noqa: E402

from evoclone.federated.effects import procova  # noqa: E402

BETA = {"continuous": np.array([1.0, 0.6, -0.5, 0.8]), "binary": np.array([1.0, 0.5, -0.5, 0.6]),
        "time_to_event": np.array([0.8, 0.5, -0.4, 0.5])}
EFFECT = {"continuous": 0.4, "binary": 0.6, "time_to_event": np.log(0.7)}  # delta, log OR, log HR
SIGMA, BASE_HAZARD, FOLLOW_UP, DROPOUT = 1.2, 0.5, 2.0, 0.1
COVERAGE, TYPE1, VAR_REL = (0.93, 0.97), 0.055, 0.10


def covariates(n: int, rng: np.random.Generator) -> np.ndarray:
    """Baseline covariates: three standard normal (age, a lab, a biomarker) and one binary (sex)."""
    return np.column_stack([rng.normal(size=(n, 3)), rng.random(n) < 0.5]).astype(float)


def outcomes(endpoint: str, lin: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Outcome columns given each patient's linear predictor (arm effect included)."""
    n = len(lin)
    if endpoint == "continuous":
        return {"y": 10.0 + lin + rng.normal(scale=SIGMA, size=n)}
    if endpoint == "binary":
        return {"y": (rng.random(n) < 1 / (1 + np.exp(0.5 - lin))).astype(float)}
    t_event = rng.exponential(size=n) / (BASE_HAZARD * np.exp(lin))
    t_cens = np.minimum(FOLLOW_UP, rng.exponential(1 / DROPOUT, size=n))
    return {"time": np.minimum(t_event, t_cens), "event": (t_event <= t_cens).astype(float)}


def prognostic_models(n_hist: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Coefficients of each endpoint's prognostic model, fitted once on historical controls."""
    import statsmodels.api as sm
    from lifelines import CoxPHFitter

    x = covariates(n_hist, rng)
    models = {}
    for endpoint, beta in BETA.items():
        out = outcomes(endpoint, x @ beta, rng)
        if endpoint == "continuous":
            models[endpoint] = sm.OLS(out["y"], sm.add_constant(x)).fit().params
        elif endpoint == "binary":
            models[endpoint] = sm.Logit(out["y"], sm.add_constant(x)).fit(disp=0).params
        else:
            df = pd.DataFrame(x, columns=[f"x{j}" for j in range(x.shape[1])]).assign(**out)
            cox = CoxPHFitter().fit(df, "time", "event")
            models[endpoint] = np.concatenate([[0.0], cox.params_.to_numpy()])  # Cox has no intercept
    return models


def true_risk_difference(log_or: float, rng: np.random.Generator, draws: int = 2_000_000) -> float:
    """Marginal risk difference of the binary generating model, by Monte Carlo."""
    total = 0.0
    for _ in range(draws // 500_000):
        lin = covariates(500_000, rng) @ BETA["binary"]
        total += float(np.sum(1 / (1 + np.exp(0.5 - lin - log_or)) - 1 / (1 + np.exp(0.5 - lin))))
    return total / (draws // 500_000 * 500_000)


def replicate(seed: np.random.SeedSequence, n_per_arm: int, models: dict[str, np.ndarray]) -> dict:
    """One replicate: per endpoint, a trial with the effect and one without, each through procova."""
    rng = np.random.default_rng(seed)
    rec = {}
    for endpoint in BETA:
        for scenario, effect in (("alt", EFFECT[endpoint]), ("null", 0.0)):
            x = covariates(2 * n_per_arm, rng)
            arm = rng.permutation(np.repeat([0.0, 1.0], n_per_arm))
            score = models[endpoint][0] + x @ models[endpoint][1:]
            # The Cox trials use the score itself as the true log hazard (see the module docstring).
            lin = (score if endpoint == "time_to_event" else x @ BETA[endpoint]) + effect * arm
            rec[endpoint, scenario] = procova(endpoint, arm=arm, score=score, **outcomes(endpoint, lin, rng))
    return rec


def run_chunk(seeds: list[np.random.SeedSequence], n_per_arm: int, models: dict[str, np.ndarray]) -> list[dict]:
    """Replicates for one worker process."""
    return [replicate(s, n_per_arm, models) for s in seeds]


def summarize(recs: list[dict], truth: dict[str, float]) -> list[dict]:
    """Table rows: coverage, type-I error, power and efficiency, unadjusted against adjusted."""
    def col(endpoint, scenario, analysis, field):
        return np.array([r[endpoint, scenario][analysis][field] for r in recs])

    def covered(endpoint, analysis):
        lo, hi = col(endpoint, "alt", analysis, "ci_low"), col(endpoint, "alt", analysis, "ci_high")
        return float(np.mean((lo <= truth[endpoint]) & (truth[endpoint] <= hi)))

    def rejects(endpoint, scenario, analysis):
        return float(np.mean(col(endpoint, scenario, analysis, "p_value") < 0.05))

    rows = []
    for endpoint in BETA:
        unadj_cov = None if endpoint == "time_to_event" else covered(endpoint, "unadjusted")
        rows.append({"endpoint": endpoint, "metric": f"95% CI coverage of {truth[endpoint]:.4g}",
                     "unadjusted": unadj_cov, "adjusted": covered(endpoint, "adjusted"), "target": "93-97%",
                     "pass": all(v is None or COVERAGE[0] <= v <= COVERAGE[1]
                                 for v in (unadj_cov, covered(endpoint, "adjusted")))})
        t1 = [rejects(endpoint, "null", a) for a in ("unadjusted", "adjusted")]
        # One-sided exact binomial p of the worse rate against a true 5%: tells a miss by chance from a real one.
        worst = binomtest(round(max(t1) * len(recs)), len(recs), 0.05, alternative="greater").pvalue
        rows.append({"endpoint": endpoint, "metric": "type-I error (null)", "unadjusted": t1[0], "adjusted": t1[1],
                     "target": "<= 5.5%", "pass": max(t1) <= TYPE1, "binom_p": float(worst)})
        rows.append({"endpoint": endpoint, "metric": "power (alternative)", "unadjusted": rejects(endpoint, "alt", "unadjusted"),
                     "adjusted": rejects(endpoint, "alt", "adjusted"), "target": "", "pass": None})
        rows.append({"endpoint": endpoint, "metric": "mean variance_reduction", "unadjusted": None,
                     "adjusted": float(np.mean([r[endpoint, "alt"]["variance_reduction"] for r in recs])),
                     "target": "", "pass": None})
        rows.append({"endpoint": endpoint, "metric": "mean sample_size_reduction", "unadjusted": None,
                     "adjusted": float(np.mean([r[endpoint, "alt"]["sample_size_reduction"] for r in recs])),
                     "target": "", "pass": None})
    r2 = np.array([r["continuous", "alt"]["prognostic"]["value"] for r in recs])
    ratio = (col("continuous", "alt", "adjusted", "se") / col("continuous", "alt", "unadjusted", "se")) ** 2
    rel = float(np.mean(ratio) / np.mean(1 - r2) - 1)
    rows.append({"endpoint": "continuous", "metric": f"variance ratio vs 1 - R^2 = {np.mean(1 - r2):.4f}",
                 "unadjusted": None, "adjusted": float(np.mean(ratio)), "target": "within 10%", "rel": rel,
                 "pass": abs(rel) <= VAR_REL})
    empirical = float(np.var(col("continuous", "alt", "adjusted", "estimate"))
                      / np.var(col("continuous", "alt", "unadjusted", "estimate")))
    rows.append({"endpoint": "continuous", "metric": "empirical Var(adj)/Var(unadj) of estimates",
                 "unadjusted": None, "adjusted": empirical, "target": "", "rel": empirical / np.mean(1 - r2) - 1,
                 "pass": None})
    return rows


def render(rows: list[dict], title: str, replicates: int, stream) -> None:
    """The rich table of `rows`."""
    from rich.console import Console
    from rich.table import Table

    def pct(v, metric):
        if v is None:
            return "n/a"
        return f"{v:.4f}" if "ratio" in metric or "Var" in metric else f"{100 * v:.1f}%"

    table = Table(title=title)
    for name in ("endpoint", "metric", "unadjusted", "adjusted", "target", "result"):
        table.add_column(name, justify="left" if name in ("endpoint", "metric") else "right")
    for r in rows:
        result = "" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
        if "rel" in r:
            result = f"{100 * r['rel']:+.1f}% {result}".strip()
        if r["pass"] is False and "binom_p" in r:
            result += f" (binomial p vs 5% = {r['binom_p']:.2f})"
        table.add_row(r["endpoint"], r["metric"], pct(r["unadjusted"], r["metric"]), pct(r["adjusted"], r["metric"]),
                      r["target"], result)
    console = Console(file=stream, width=150)
    console.print(table)
    console.print(f"Monte Carlo standard error with {replicates} replicates: {100 * mc_se(0.05, replicates):.2f} points "
                  f"for a 5% rate, {100 * mc_se(0.95, replicates):.2f} for 95% coverage.")


def mc_se(rate: float, replicates: int) -> float:
    """Binomial standard error of a rate estimated from `replicates` trials."""
    return float(np.sqrt(rate * (1 - rate) / replicates))


def main() -> None:
    """Parse arguments, fit the prognostic models, run the replicates, print the table (and JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--n", type=int, default=200, help="patients per arm in each trial")
    ap.add_argument("--historical", type=int, default=2000, help="historical control patients")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    args = ap.parse_args()
    start = time.perf_counter()
    root = np.random.SeedSequence(args.seed)
    hist_seed, truth_seed, trial_seed = root.spawn(3)
    models = prognostic_models(args.historical, np.random.default_rng(hist_seed))
    truth = {"continuous": EFFECT["continuous"],
             "binary": true_risk_difference(EFFECT["binary"], np.random.default_rng(truth_seed)),
             "time_to_event": float(np.exp(EFFECT["time_to_event"]))}
    seeds = trial_seed.spawn(args.replicates)
    chunks = [seeds[i::args.workers] for i in range(args.workers)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        recs = [r for part in pool.map(run_chunk, chunks, [args.n] * len(chunks), [models] * len(chunks)) for r in part]
    seconds = time.perf_counter() - start
    rows = summarize(recs, truth)
    title = (f"PROCOVA on {args.replicates} simulated trials of {args.n}+{args.n} patients (seed {args.seed}), "
             f"{date.today()} on {platform.machine()}, {args.workers} workers, {seconds:.0f} s")
    render(rows, title, args.replicates, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"config": vars(args), "truth": truth, "seconds": seconds, "rows": rows}))


if __name__ == "__main__":
    main()
