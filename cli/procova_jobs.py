"""The work behind `evoclone analyze procova`: prognostic covariate adjustment of a trial.

A prognostic model is trained on historical patients (federated across their sites through
`evoclone train`'s Flower path when a site column is given, else on this machine), scores
every trial patient under control, and the trial's effect is estimated without and with
that score as a covariate (`federated.effects.procova`). Every input problem raises
`TrialInputError` before training starts.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from evoclone.federated.record import Arm
from evoclone.federated.tabular import OutcomeColumns

from .trial_jobs import TrialInputError, _twins_error

Progress = Callable[[str, int, int], None]
SCORE_CLIP = 1e-6  # probabilities are kept off 0 and 1 before the logit / log-log transform


@dataclass(frozen=True)
class ProcovaOptions:
    """Everything `evoclone analyze procova` takes."""

    history: Path
    trial: Path
    treatment: str
    outcome: OutcomeColumns
    covariates: list[str] | None = None
    site_column: str | None = None
    epsilon: float | None = None  # None: non-private local training; federated training always uses DP
    delta: float = 1e-5
    alpha: float = 0.05
    rounds: int = 5
    engine: str = "simulation"
    members: int = 5
    epochs: int = 30
    seed: int = 0
    model_out: Path | None = None  # keep the prognostic model here (default: a temporary directory)


def _frames(opts: ProcovaOptions) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    from .twins_jobs import _read_csv

    hist = _twins_error(_read_csv, opts.history, "--history")
    trial = _twins_error(_read_csv, opts.trial, "--trial")
    outcome_cols = list(opts.outcome.columns)
    for frame, path, extra in ((hist, opts.history, [opts.site_column] if opts.site_column else []),
                               (trial, opts.trial, [opts.treatment])):
        missing = [c for c in outcome_cols + extra if c not in frame.columns]
        if missing:
            raise TrialInputError(f"{path}: columns {missing} are missing; name the columns that hold them")
    skip = set(outcome_cols) | {opts.treatment} | ({opts.site_column} if opts.site_column else set())
    covariates = opts.covariates or [c for c in hist.columns if c not in skip]
    missing = [c for c in covariates if c not in hist.columns]
    if missing:
        raise TrialInputError(f"{opts.history}: covariate columns {missing} are missing; fix --covariates")
    missing = [c for c in covariates if c not in trial.columns]
    if missing:
        raise TrialInputError(f"{opts.trial}: covariate columns {missing} the prognostic model needs are missing; "
                              "add them (empty cells count as missing values)")
    if not covariates:
        raise TrialInputError(f"{opts.history}: no covariate columns left to train a prognostic model on")
    return hist, trial, covariates


def _trial_arms(trial: pd.DataFrame, opts: ProcovaOptions) -> tuple[np.ndarray, dict]:
    """0/1 arm per trial row with the same labelling rule as training (control labels, else sorted)."""
    from evoclone.federated.tabular import _arms

    try:
        arms, levels = _arms(trial[opts.treatment], str(opts.trial), opts.treatment)
    except ValueError as exc:
        raise TrialInputError(str(exc).splitlines()[0]) from None
    if len(set(arms)) < 2:
        raise TrialInputError(f"{opts.trial}: column '{opts.treatment}' holds one arm only; a trial needs a "
                              "control and a treatment arm")
    return np.asarray([int(a) for a in arms]), {str(k): int(v) for k, v in levels.items()}


def _outcome_arrays(trial: pd.DataFrame, opts: ProcovaOptions) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The trial's outcome columns as floats, and which rows have all of them."""
    o = opts.outcome
    cols = {"time": o.time, "event": o.event} if o.endpoint == "time_to_event" else {"y": o.binary or o.continuous}
    values = {}
    for key, col in cols.items():
        raw = trial[col]
        num = pd.to_numeric(raw, errors="coerce")
        bad = num.isna() & raw.notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise TrialInputError(f"{opts.trial} row {row} column '{col}': {raw.iloc[row]!r} is not a number; "
                                  "fix the value or leave the cell empty")
        values[key] = num.to_numpy(float)
    complete = np.all([np.isfinite(v) for v in values.values()], axis=0)
    return values, complete


def _history_with_treatment(hist: pd.DataFrame, opts: ProcovaOptions, levels: dict, work: Path) -> Path:
    """The history file itself, or a copy marking every patient control when it has no treatment column."""
    if opts.treatment in hist.columns:
        return opts.history
    control = next(k for k, v in levels.items() if v == int(Arm.CONTROL))
    path = work / "history-with-arm.csv"
    hist.assign(**{opts.treatment: control}).to_csv(path, index=False)
    return path


def _train(opts: ProcovaOptions, history: Path, covariates: list[str], model_dir: Path, work: Path,
           progress: Progress) -> dict:
    """Train the prognostic fusion ensemble; returns what the report says about it."""
    if opts.site_column:
        from .train_jobs import TrainInputError, TrainOptions, run_train

        topts = TrainOptions(data=history, site_column=opts.site_column, treatment=opts.treatment,
                             outcome=opts.outcome, out=model_dir, covariates=covariates, model="fusion",
                             rounds=opts.rounds, epsilon=opts.epsilon or 3.0, delta=opts.delta, engine=opts.engine,
                             members=1, seed=opts.seed, insecure=opts.engine == "simulation",
                             work_dir=work / "study", force=True)
        try:
            summary = run_train(topts, on_progress=lambda m, d, t: progress("federated rounds", d, t))
        except TrainInputError as exc:
            raise TrialInputError(f"--history: {exc}") from None
        return {"federated": True, "sites": len(summary["sites"]), "engine": opts.engine,
                "epsilon": max(s["epsilon_spent"] for s in summary["sites"]),
                "patients": sum(s["patients"] for s in summary["sites"])}
    from .twins_jobs import Columns, fingerprint, load_table, train_fusion

    cols = Columns(treatment=opts.treatment, outcome=opts.outcome, covariates=covariates)
    table = _twins_error(load_table, history, None, cols)
    summary = _twins_error(train_fusion, table, out=model_dir, cols=cols, data_fp=fingerprint(opts.history),
                           epsilon=opts.epsilon, delta=opts.delta, epochs=opts.epochs, batch_size=32, lr=3e-3,
                           seed=opts.seed, members=opts.members,
                           on_step=lambda d, t: progress("training the prognostic model", d, t or d))
    return {"federated": False, "sites": 1, "engine": "local", "epsilon": summary["epsilon"],
            "patients": len(table.records)}


def _scores(model_dir: Path, trial: pd.DataFrame, opts: ProcovaOptions, covariates: list[str]):
    """(natural-scale prediction under control, its regression-scale transform, horizon, manifest entry)."""
    from evoclone.federated.features import encode_cohort
    from evoclone.federated.tabular import records_from_frames

    from .twins_jobs import load_ensemble

    ensemble, spec, entry = _twins_error(load_ensemble, model_dir)
    try:
        table = records_from_frames(trial, None, treatment=None, outcome=None, covariates=covariates,
                                    id_column=None, source=str(opts.trial), events_source="<events>")
        arrays = encode_cohort([r.model_copy(update={"arm": Arm.CONTROL}) for r in table.records], spec)
    except ValueError as exc:
        raise TrialInputError(f"{opts.trial}: {str(exc).splitlines()[0]}; give each covariate the type it had "
                              "in the history") from None
    natural = ensemble.predict(arrays)["risk"].astype(float)
    endpoint = ensemble.cfg.endpoint
    if endpoint == "continuous":
        linear = natural
    else:  # the scale the outcome model is linear on: logit, or log cumulative hazard at the horizon
        p = np.clip(natural, SCORE_CLIP, 1 - SCORE_CLIP)
        linear = np.log(p / (1 - p)) if endpoint == "binary" else np.log(-np.log1p(-p))
    horizon = ensemble.cfg.horizon_days if endpoint == "time_to_event" else None
    return natural, linear, horizon, entry


def procova(opts: ProcovaOptions, *, on_progress: Progress | None = None) -> tuple[dict, dict]:
    """Train, score and analyse; returns (the --json document, report data)."""
    from evoclone.federated.effects import EffectInputError, estimate_effect
    from evoclone.federated.effects import procova as analyse
    from evoclone.federated.sample_size import curve

    progress = on_progress or (lambda *_: None)
    if not 0 < opts.alpha <= 0.2:
        raise TrialInputError(f"--alpha must be in (0, 0.2], got {opts.alpha}")
    if opts.epsilon is not None and opts.epsilon <= 0:
        raise TrialInputError(f"--epsilon must be positive, got {opts.epsilon}")
    if opts.engine not in ("simulation", "deployment"):
        raise TrialInputError(f"--engine must be simulation or deployment, got {opts.engine!r}")
    hist, trial, covariates = _frames(opts)
    arm, levels = _trial_arms(trial, opts)
    values, complete = _outcome_arrays(trial, opts)
    kept = {k: v[complete] for k, v in values.items()}
    try:  # the trial's own problems (one arm left, too few events) stop here, before any training
        estimate_effect(opts.outcome.endpoint, arm=arm[complete], alpha=opts.alpha, **kept)
    except EffectInputError as exc:
        raise TrialInputError(f"{opts.trial}: {exc}") from None
    work = Path(tempfile.mkdtemp(prefix="evoclone-procova-"))
    try:
        model_dir = opts.model_out.absolute() if opts.model_out else work / "model"
        if opts.model_out and model_dir.exists():
            shutil.rmtree(model_dir)
        history = _history_with_treatment(hist, opts, levels, work)
        trained = _train(opts, history, covariates, model_dir, work, progress)
        natural, linear, horizon, entry = _scores(model_dir, trial, opts, covariates)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = complete & np.isfinite(linear)
    try:
        doc = analyse(opts.outcome.endpoint, arm=arm[ok], score=linear[ok], alpha=opts.alpha,
                      **{k: v[ok] for k, v in values.items()})
    except EffectInputError as exc:
        raise TrialInputError(f"{opts.trial}: {exc}") from None
    doc["dropped_missing"] = int((~ok).sum())
    doc["model"] = {"dir": str(opts.model_out) if opts.model_out else None, "sha256": entry.get("sha256"),
                    **trained}
    # the sample-size curve of a trial powered like this one: its minimal detectable effect (80% power) in SD units
    n0, n1 = int((arm[ok] == 0).sum()), int((arm[ok] == 1).sum())
    mde = (norm.ppf(1 - opts.alpha / 2) + norm.ppf(0.8)) * np.sqrt(1 / n0 + 1 / n1)
    report = {"arm": arm[ok], "score": natural[ok], "horizon": horizon,
              **{k: v[ok] for k, v in values.items()},
              "curve": curve(effect=float(mde), alpha=opts.alpha, ratio=n1 / n0)}
    return doc, report
