"""The work behind `evoclone trial simulate`: twins of a cohort under each arm, and their effect.

Kept apart from the typer command so tests and benchmarks call the same code. Every input
problem raises `TrialInputError` (one line: what, where, what to do) before any file is
written.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from evoclone.federated.artifacts import ArtifactError, read_manifest
from evoclone.federated.record import Arm
from evoclone.federated.tabular import OutcomeColumns

Progress = Callable[[str, int, int], None]
MIN_COHORT = 10
MAX_TWINS = 1000
SUBGROUP_MAX_LEVELS = 8  # numeric columns with more distinct values are split at the median


class TrialInputError(ValueError):
    """Bad input to a trial or analysis command (exit code 2)."""


@dataclass(frozen=True)
class SimulateOptions:
    """Everything `evoclone trial simulate` takes."""

    model_dir: Path
    cohort: Path
    events: Path | None = None
    twins: int = 20
    arms: list[str] | None = None  # [reference, comparator]
    subgroups: list[str] = field(default_factory=list)
    source: str = "auto"  # auto, predictor or generator
    bootstrap: int = 200
    alpha: float = 0.05
    seed: int = 0
    max_tries: int = 3
    temperature: float = 1.0


def _twins_error(fn, *args, **kwargs):
    from .twins_jobs import TwinsInputError

    try:
        return fn(*args, **kwargs)
    except (TwinsInputError, ArtifactError) as exc:
        raise TrialInputError(str(exc)) from None


def _source(opts: SimulateOptions) -> str:
    comps = _twins_error(read_manifest, opts.model_dir)["components"]
    if opts.source not in ("auto", "predictor", "generator"):
        raise TrialInputError(f"--source must be auto, predictor or generator, got {opts.source!r}")
    if opts.source == "auto":
        # the ensemble's members carry model uncertainty into the interval; the generator has one model
        if "predictor" in comps:
            return "predictor"
        if "generator" in comps:
            return "generator"
        raise TrialInputError(f"{opts.model_dir} holds no trained model; train one with `evoclone train`")
    if opts.source not in comps:
        raise TrialInputError(f"{opts.model_dir} holds no {opts.source} (it holds {', '.join(sorted(comps))}); "
                              "pick another --source or train that model")
    return opts.source


def _arms(opts: SimulateOptions, entry: dict) -> tuple[Arm, Arm]:
    from .twins_jobs import parse_arm

    names = opts.arms or ["control", "treatment"]
    if len(names) != 2:
        raise TrialInputError(f"--arms takes two arms (reference,comparator), got {len(names)}: {','.join(names)}")
    ref, comp = (_twins_error(parse_arm, a, entry) for a in names)
    if ref == comp:
        raise TrialInputError(f"--arms {','.join(names)} names the same arm twice; give the reference and another arm")
    return ref, comp


def _check_treatment(frame: pd.DataFrame, entry: dict, source: Path) -> None:
    """The cohort's own treatment column (used for the real comparison) must hold the model's two arms."""
    col = entry["columns"]["treatment"]
    if col not in frame.columns:
        return
    known = {str(k).strip().lower() for k in entry.get("arm_levels", {})}
    values = {str(v).strip().lower() for v in frame[col].dropna().unique()}
    if known and values - known:
        raise TrialInputError(f"{source}: column '{col}' holds {sorted(values - known)[:3]}, arms the model was not "
                              f"trained with ({', '.join(sorted(known))}); recode them or drop the column")
    if len(values) == 1:
        raise TrialInputError(f"{source}: column '{col}' holds one arm only ({values.pop()}); drop the column to run "
                              "every patient under both arms, or give a cohort with both arms")


def subgroup_labels(frame: pd.DataFrame, columns: list[str], source: Path) -> dict[str, np.ndarray]:
    """Each patient's subgroup label per column: the value, or a median split for continuous columns."""
    out = {}
    for col in columns:
        if col not in frame.columns:
            raise TrialInputError(f"{source}: --subgroups column '{col}' is not in the cohort; "
                                  f"use one of: {', '.join(map(str, frame.columns[:12]))}")
        s = frame[col]
        numeric = pd.to_numeric(s, errors="coerce")
        if s.notna().sum() and numeric.notna().sum() == s.notna().sum() and s.nunique() > SUBGROUP_MAX_LEVELS:
            med = float(numeric.median())
            labels = [None if pd.isna(v) else (f"<= {med:g}" if v <= med else f"> {med:g}") for v in numeric]
        else:
            labels = [None if pd.isna(v) else (f"{v:g}" if isinstance(v, float) else str(v)) for v in s]
        out[col] = np.asarray(labels, dtype=object)
    return out


def _real(frame: pd.DataFrame, entry: dict, alpha: float, source: Path) -> dict | None:
    """The cohort's observed effect by its own arms, when it has the treatment and outcome columns."""
    from evoclone.federated.effects import EffectInputError, estimate_effect

    cols = entry["columns"]
    outcome = OutcomeColumns(**cols["outcome"]) if cols.get("outcome") else None
    if outcome is None or cols["treatment"] not in frame.columns or any(c not in frame.columns for c in outcome.columns):
        return None
    arm_of = {str(k).strip().lower(): int(v) for k, v in entry.get("arm_levels", {}).items()}
    arm = frame[cols["treatment"]].map(lambda v: arm_of.get(str(v).strip().lower(), np.nan))
    data = pd.DataFrame({"arm": arm, **{c: pd.to_numeric(frame[c], errors="coerce") for c in outcome.columns}})
    complete = data.dropna()
    kw = ({"time": complete[outcome.time].to_numpy(float), "event": complete[outcome.event].to_numpy(float)}
          if outcome.endpoint == "time_to_event" else
          {"y": complete[outcome.binary or outcome.continuous].to_numpy(float)})
    try:
        eff = estimate_effect(outcome.endpoint, arm=complete["arm"].to_numpy(int), alpha=alpha, **kw)
    except EffectInputError as exc:
        raise TrialInputError(f"{source}: the cohort's observed outcomes: {exc}") from None
    arms = {}
    for a in (0, 1):
        sel = complete["arm"].to_numpy() == a
        entry_a = {"n": int(sel.sum())}
        if outcome.endpoint != "continuous":
            entry_a["events"] = int(kw.get("event", kw.get("y"))[sel].sum())
        arms[str(a)] = entry_a
    outcomes = {a: {k: v[complete["arm"].to_numpy() == a] for k, v in kw.items()} for a in (0, 1)}
    return {"effect": eff.to_dict(), "arms": arms, "dropped_missing": int(len(data) - len(complete)),
            "outcomes": outcomes}


def _predictor_twins(opts: SimulateOptions, records, arms: tuple[Arm, Arm], source_path: Path):
    from evoclone.federated.features import encode_cohort
    from evoclone.federated.insilico import predictor_twins

    from .twins_jobs import load_ensemble

    ensemble, spec, entry = _twins_error(load_ensemble, opts.model_dir)
    outputs = {}
    for code, arm in enumerate(arms):
        try:
            arrays = encode_cohort([r.model_copy(update={"arm": arm}) for r in records], spec)
        except ValueError as exc:
            raise TrialInputError(f"{source_path}: {str(exc).splitlines()[0]}; give each covariate the type it "
                                  "had in training") from None
        outputs[code] = ensemble.member_outputs(arrays)
    tt = predictor_twins(outputs, endpoint=ensemble.cfg.endpoint, n=opts.twins, horizon=ensemble.cfg.horizon_days,
                         residual_sd=ensemble.residual_sd, seed=opts.seed)
    return tt, entry, ensemble.cfg.horizon_days if ensemble.cfg.endpoint == "time_to_event" else None


def _generator_twins(opts: SimulateOptions, records, arms: tuple[Arm, Arm], on_progress: Progress):
    from evoclone.federated.generation import SamplingConfig
    from evoclone.federated.insilico import generator_table
    from evoclone.federated.quality import generate_twins

    from .twins_jobs import load_generator

    model, tok, entry = _twins_error(load_generator, opts.model_dir)
    rows, arm_codes, times, events, rejected = [], [], [], [], 0
    for code, arm in enumerate(arms):
        done = 0

        def advance(k: int, _label=arm.name.lower()) -> None:
            nonlocal done
            done += k
            on_progress(f"twins under {_label}", done, len(records) * opts.twins)

        sampling = SamplingConfig(temperature=opts.temperature, seed=opts.seed + 104729 * code)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twins, failed, _ = generate_twins(model, tok, records, arm=arm, n=opts.twins, sampling=sampling,
                                              max_tries=opts.max_tries, meta=entry.get("meta") or None,
                                              on_progress=advance)
        rejected += len(failed)
        for t in twins:
            rows.append(t.row)
            arm_codes.append(code)
            times.append(t.record.outcomes.time_to_event)
            events.append(bool(t.record.outcomes.event))
    return generator_table(rows, arm_codes, times, events, rejected=rejected), entry, tok.spec.horizon_days


def simulate(opts: SimulateOptions, *, on_progress: Progress | None = None) -> tuple[dict, dict]:
    """Run every cohort patient's twins under both arms; returns (the --json document, report data)."""
    from evoclone.federated.insilico import trial_effect

    from .twins_jobs import _input_table, _read_csv

    progress = on_progress or (lambda *_: None)
    if not 1 <= opts.twins <= MAX_TWINS:
        raise TrialInputError(f"--twins must be between 1 and {MAX_TWINS}, got {opts.twins}")
    if opts.bootstrap < 20:
        raise TrialInputError(f"--bootstrap must be at least 20 replicates, got {opts.bootstrap}")
    if not 0 < opts.alpha < 0.5:
        raise TrialInputError(f"--alpha must be in (0, 0.5), got {opts.alpha}")
    source = _source(opts)
    name = "predictor" if source == "predictor" else "generator"
    entry = _twins_error(lambda: read_manifest(opts.model_dir)["components"][name])
    endpoint = OutcomeColumns(**entry["columns"]["outcome"]).endpoint if entry["columns"].get("outcome") else None
    if source == "generator" and endpoint not in (None, "time_to_event"):
        raise TrialInputError(f"{opts.model_dir}: the generator writes time-to-event twins, but the model's endpoint "
                              f"is {endpoint}; use --source predictor")
    arms = _arms(opts, entry)
    frame = _twins_error(_read_csv, opts.cohort, "--cohort")
    _check_treatment(frame, entry, opts.cohort)
    labels = subgroup_labels(frame, opts.subgroups, opts.cohort)
    table = _twins_error(_input_table, opts.cohort, opts.events, entry, need_treatment=False)
    if len(table.records) < MIN_COHORT:
        raise TrialInputError(f"{opts.cohort}: {len(table.records)} patients; an in-silico trial needs at least "
                              f"{MIN_COHORT} for a bootstrap interval")
    real = _real(frame, entry, opts.alpha, opts.cohort)
    if source == "predictor":
        tt, entry, horizon = _predictor_twins(opts, table.records, arms, opts.cohort)
    else:
        tt, entry, horizon = _generator_twins(opts, table.records, arms, progress)
    if len(np.unique(tt.patient)) < MIN_COHORT:
        raise TrialInputError(f"{opts.cohort}: the quality gate rejected the twins of all but "
                              f"{len(np.unique(tt.patient))} patients; retrain the generator or raise --max-tries")
    rows = np.asarray(table.row_ids)
    subgroups = {c: v[rows] for c, v in labels.items()}
    # the re-estimated arm effect's own uncertainty (sampling and, federated, the DP noise of its query)
    effect = entry.get("arm_effect") or {}
    effect_se = float(effect.get("se") or 0.0) if tt.endpoint == "time_to_event" and source == "predictor" else 0.0
    try:
        doc = trial_effect(tt, n_patients=len(table.records), subgroups=subgroups, bootstrap=opts.bootstrap,
                           alpha=opts.alpha, seed=opts.seed, log_effect_se=effect_se,
                           on_progress=lambda d, t: progress("bootstrap", d, t))
    except ValueError as exc:
        raise TrialInputError(str(exc)) from None
    arm_names = {str(i): a.name.lower() for i, a in enumerate(arms)}
    for k, v in doc["arms"].items():
        v["label"] = arm_names[k]
    out = {"endpoint": tt.endpoint, "comparison": f"{arm_names['1']} vs {arm_names['0']}", **doc,
           "twins_per_patient": opts.twins, "rejected_by_quality_gate": tt.rejected, "source": source,
           "model_uncertainty": (f"bootstrap over {tt.members} ensemble members" if tt.members > 1 else
                                 "one model: the interval covers patient and twin sampling only")
           + (f"; the arm effect's standard error ({effect_se:.3f} on the log scale)" if effect_se else ""),
           "patients": len(table.records), "dropped_missing": 0, "horizon_days": horizon,
           "model": {"dir": str(opts.model_dir), "sha256": entry.get("sha256"), "epsilon": entry.get("epsilon")}}
    report = {"twins": {str(a): {k: v[tt.arm == a] for k, v in tt.outcome().items()} for a in (0, 1)}, "real": None}
    if real is not None:
        outcomes = real.pop("outcomes")
        if [a.value for a in arms] == [1, 0]:  # the comparison is reversed: the cohort's arms follow it
            outcomes = {0: outcomes[1], 1: outcomes[0]}
            real["arms"] = {"0": real["arms"]["1"], "1": real["arms"]["0"]}
            real["effect"] = _reverse(real["effect"])
        out["real"] = real
        report["real"] = {str(a): outcomes[a] for a in (0, 1)}
    return out, report


def _reverse(effect: dict) -> dict:
    """The same effect with the arms swapped."""
    if effect["measure"] == "hazard_ratio":
        return {**effect, "estimate": 1 / effect["estimate"], "ci_low": 1 / effect["ci_high"],
                "ci_high": 1 / effect["ci_low"]}
    return {**effect, "estimate": -effect["estimate"], "ci_low": -effect["ci_high"], "ci_high": -effect["ci_low"]}

