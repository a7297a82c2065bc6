"""The work behind `evoclone twins ...`: read tables, train, predict, generate, evaluate.

Kept apart from the typer commands so tests and benchmarks call the same code. Every
input problem raises `TwinsInputError` (one line: what, where, what to do) before any
file is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from evoclone.federated import model_dir as model_dir_loaders
from evoclone.federated.artifacts import save_component, sha256_file
from evoclone.federated.features import split_records
from evoclone.federated.record import Arm
from evoclone.federated.tabular import OutcomeColumns, TabularData, records_from_frames
from evoclone.federated.trainer import DPSettings, TrainConfig

Progress = Callable[[int, int], None]
MIN_TRAIN = 20


class TwinsInputError(ValueError):
    """Bad input to a twins command (exit code 2)."""


@dataclass(frozen=True)
class Columns:
    """How a table maps to the model: id, treatment, outcome and covariate columns."""

    treatment: str | None
    outcome: OutcomeColumns | None
    covariates: list[str] | None = None
    id_column: str | None = None

    def to_dict(self) -> dict:
        """JSON form stored in the manifest."""
        return {"treatment": self.treatment, "outcome": asdict(self.outcome) if self.outcome else None,
                "covariates": self.covariates, "id_column": self.id_column}


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise TwinsInputError(f"{what} file {path} does not exist; pass the path of a CSV file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TwinsInputError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]}); export it as UTF-8 CSV") from None


def fingerprint(*paths: Path | None) -> str:
    """sha256 over the input files' hashes (which data a model was trained on, without keeping it)."""
    return hashlib.sha256("\0".join(sha256_file(p) for p in paths if p is not None).encode()).hexdigest()


def load_table(data: Path, events: Path | None, cols: Columns, *, patients: pd.DataFrame | None = None) -> TabularData:
    """Records from a patients CSV (or its already-read frame) and an optional events CSV."""
    patients = _read_csv(data, "patients") if patients is None else patients
    ev = _read_csv(events, "events") if events is not None else None
    try:
        return records_from_frames(patients, ev, treatment=cols.treatment, outcome=cols.outcome,
                                   covariates=cols.covariates, id_column=cols.id_column, source=str(data),
                                   events_source=str(events) if events else "<events>")
    except ValueError as exc:
        raise TwinsInputError(str(exc).splitlines()[0]) from None


def _privacy(epsilon: float | None, delta: float, n: int, tcfg: TrainConfig, runs: int = 1) -> DPSettings | None:
    """Noise for `runs` trainings of `tcfg` on n examples to spend `epsilon` in total, or None without DP."""
    from evoclone.federated.trainer import budgeted_dp

    if epsilon is None:
        return None
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise TwinsInputError(f"--epsilon must be a positive number, got {epsilon}")
    try:
        return budgeted_dp(n, tcfg, runs=runs, target_epsilon=epsilon, delta=delta, max_grad_norm=1.0)
    except ValueError as exc:
        raise TwinsInputError(f"--epsilon {epsilon}: {exc}") from None


def _spent(histories: list[list[tuple[float, float, int]]], delta: float) -> float | None:
    from evoclone.privacy.accounting import epsilon_of

    history = [h for hist in histories for h in hist]
    return round(epsilon_of(history, delta=delta), 4) if history else None


# -- GPT twin generator ------------------------------------------------------------------------

def train_gpt(table: TabularData, *, out: Path, cols: Columns, data_fp: str, epsilon: float | None, delta: float,
              epochs: int, size: str, batch_size: int, lr: float, seed: int, max_len: int,
              meta: dict[str, str] | None, on_step: Progress | None = None) -> dict:
    """Tokenize, train the generator (DP when epsilon is set), save it; returns the --json summary."""
    import torch

    from evoclone.federated.generator_training import build_generator, encode_records, perplexity, train_generator
    from evoclone.federated.tokenizer import EventTokenizer

    records = table.records
    split = split_records(records)
    train = [records[i] for i in split["train"] if records[i].arm is not None]
    val = [records[i] for i in split["val"] if records[i].arm is not None]
    if len(train) < MIN_TRAIN:
        raise TwinsInputError(f"only {len(train)} training patients with an arm; the generator needs at least {MIN_TRAIN}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = EventTokenizer.fit(train, covariates=table.covariates, meta=meta, max_len=max_len)
        seqs, info = encode_records(tok, train, meta=meta)
        val_seqs, _ = encode_records(tok, val, meta=meta)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    dp = _privacy(epsilon, delta, len(seqs), tcfg)
    torch.manual_seed(seed)
    model = build_generator(tok, size=size, seed=seed)
    result = train_generator(model, tok, seqs, tcfg, dp=dp, on_step=on_step)
    ppl = perplexity(model, val_seqs, pad_id=tok.pad_id) if val_seqs else float("nan")
    spent = _spent([result.history], delta)
    save_component(out, "generator", model.state_dict(), kind="twin_generator", config=model.cfg.to_dict(),
                   vocabulary=tok.to_dict(), extra={
                       "epsilon": spent, "delta": delta if spent is not None else None,
                       "noise_multiplier": dp.noise_multiplier if dp else None, "data_fingerprint": data_fp,
                       "columns": {**cols.to_dict(), "covariates": table.covariates}, "arm_levels": {str(k): int(v) for k, v in table.arm_levels.items()},
                       "meta": meta or {}, "train": asdict(tcfg), "patients": {"train": len(train), "val": len(val)},
                       "tokenizer": {"unknown": info["unknown"], "truncated": info["truncated"]},
                       "metrics": {"val_perplexity": round(ppl, 4), "train_loss": round(result.loss, 4)}})
    return {"metric": "perplexity", "value": round(ppl, 4), "epsilon": spent, "delta": delta if spent else None,
            "warnings": [str(w.message) for w in caught]}


def load_generator(model_dir: Path):
    """(model, tokenizer, manifest entry) from a model directory."""
    try:
        return model_dir_loaders.load_generator(model_dir)
    except model_dir_loaders.ModelLoadError as exc:
        raise TwinsInputError(str(exc)) from None


def _columns_of(entry: dict, *, with_outcome: bool) -> Columns:
    c = entry["columns"]
    outcome = OutcomeColumns(**c["outcome"]) if with_outcome and c.get("outcome") else None
    return Columns(treatment=c["treatment"], outcome=outcome, covariates=c["covariates"], id_column=c["id_column"])


def parse_arm(arm: str, entry: dict) -> Arm:
    """An arm name (control/treatment) or one of the treatment column's values seen in training."""
    key = arm.strip().lower()
    if key in ("control", "treatment"):
        return Arm.CONTROL if key == "control" else Arm.TREATMENT
    levels = {str(k).lower(): v for k, v in entry.get("arm_levels", {}).items()}
    if key in levels:
        return Arm(levels[key])
    known = ", ".join(["control", "treatment", *sorted(levels)])
    raise TwinsInputError(f"--arm {arm!r} is not an arm this model was trained with; use one of: {known}")


def _input_table(path: Path, events: Path | None, entry: dict, *, need_treatment: bool) -> TabularData:
    cols = _columns_of(entry, with_outcome=False)
    patients = _read_csv(path, "patients")
    treatment = cols.treatment if cols.treatment in patients.columns else None
    if need_treatment and treatment is None:
        raise TwinsInputError(f"{path}: no treatment column {cols.treatment!r}; add it or pass --arm")
    missing = [c for c in cols.covariates or [] if c not in patients.columns]
    if missing:
        raise TwinsInputError(f"{path}: covariate columns {missing} the model was trained with are missing; "
                              "add them (empty cells count as missing values)")
    return load_table(path, events, replace(cols, treatment=treatment), patients=patients)


def generate(model_dir: Path, patients: Path, events: Path | None, *, arm: str, n: int, temperature: float,
             top_p: float, max_tries: int, seed: int, on_batch: Callable[[int], None] | None = None) -> dict:
    """Gated twins of every input patient under one arm; returns the document written to --out."""
    from evoclone.federated.generation import SamplingConfig
    from evoclone.federated.quality import generate_twins

    model, tok, entry = load_generator(model_dir)
    chosen = parse_arm(arm, entry)
    table = _input_table(patients, events, entry, need_treatment=False)
    try:
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as exc:
        raise TwinsInputError(str(exc)) from None
    if n < 1 or max_tries < 1:
        raise TwinsInputError("--n and --max-tries must be at least 1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twins, failed, stats = generate_twins(model, tok, table.records, arm=chosen, n=n, sampling=sampling,
                                              max_tries=max_tries, meta=entry.get("meta") or None,
                                              on_progress=on_batch)
    unknown = {k: v for k, v in stats["unknown_tokens"].items() if v}
    if unknown:
        caught_unknown = ", ".join(f"{v} {k}" for k, v in unknown.items())
        stats["warning_unknown"] = (f"inputs held values the model never saw in training ({caught_unknown}); they were "
                                    "read as unknown tokens")
    if stats["truncated_histories"]:
        stats["warning"] = (f"{stats['truncated_histories']} patients had more history than the prompt holds; "
                            "their oldest visits were left out")
    doc = {
        "model": {"sha256": entry["sha256"], "vocabulary_hash": entry["vocabulary_hash"], "epsilon": entry.get("epsilon")},
        "arm": chosen.name.lower(), "n": n, "horizon_days": tok.spec.horizon_days, "stats": stats,
        "warnings": [str(w.message) for w in caught],
        "twins": [{"row": t.row, "twin": t.copy, "arm": t.arm.name.lower(), "quality": t.quality, "tries": t.tries,
                   "outcome": {"time": t.record.outcomes.time_to_event, "event": t.record.outcomes.event},
                   "events": [[e.time, e.code, e.value, e.unit] for e in t.record.events if e.time > 0]}
                  for t in twins],
        "failed": [{"row": f.row, "twin": f.copy, "tries": f.tries, "reasons": list(f.reasons)} for f in failed],
    }
    return doc


def evaluate(model_dir: Path, real: Path, events: Path | None, *, seed: int,
             on_batch: Callable[[int], None] | None = None) -> dict:
    """Fidelity, utility and privacy of the generator against a real table.

    When the table is the one the model was trained on (same fingerprint), its training
    split are the members and its test split the held-out patients; otherwise every row
    is held out and the membership attacks cannot run (privacy is null).
    """
    from evoclone.federated.generation import SamplingConfig
    from evoclone.federated.twin_eval import evaluate_generator

    model, tok, entry = load_generator(model_dir)
    table = load_table(real, events, _columns_of(entry, with_outcome=True))
    same = fingerprint(real, events) == entry.get("data_fingerprint")
    split = split_records(table.records)
    recs = table.records
    members = [recs[i] for i in split["train"]] if same else []
    held = [recs[i] for i in split["test"]] if same else recs
    try:
        report = evaluate_generator(model, tok, members, held, sampling=SamplingConfig(seed=seed),
                                    meta=entry.get("meta") or None, seed=seed, on_progress=on_batch)
    except ValueError as exc:
        raise TwinsInputError(f"{real}: {exc}") from None
    report["data"] = {"same_as_training": same, "members": len(members), "held_out": len(held)}
    return report


# -- fusion outcome predictor -----------------------------------------------------------------

from evoclone.federated.predictor import METRICS, RISK_DEFINITIONS  # noqa: E402 (re-exported for callers)


def _metric(endpoint: str, arrays: dict[str, np.ndarray], risk: np.ndarray) -> float:
    from evoclone.federated.evaluation import auroc
    from evoclone.federated.metrics import c_index

    if len(risk) < 2:
        return float("nan")
    if endpoint == "time_to_event":
        return float(c_index(arrays["time"], arrays["event"], risk))
    if endpoint == "binary":
        y = arrays["binary"]
        return float(auroc(y, risk)) if 0 < y.sum() < len(y) else float("nan")
    y = arrays["continuous"]
    return float(1 - np.sum((y - risk) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-12))


def train_fusion(table: TabularData, *, out: Path, cols: Columns, data_fp: str, epsilon: float | None, delta: float,
                 epochs: int, batch_size: int, lr: float, seed: int, members: int,
                 on_step: Progress | None = None) -> dict:
    """Fit the feature spec, train a calibrated (DP) deep ensemble, save it; returns the --json summary."""
    from evoclone.federated.arm_shift import ENDPOINTS as ARM_SHIFT_ENDPOINTS
    from evoclone.federated.arm_shift import arm_index, arm_sums, effect_se, fit_arm_shift
    from evoclone.federated.features import FeatureSpec, encode_cohort
    from evoclone.federated.models.fusion import FusionConfig
    from evoclone.federated.predictor import PREDICTOR_HORIZON_QUANTILE, ensemble_history, train_ensemble
    from evoclone.federated.tokenizer import default_horizon
    from evoclone.federated.training import subset

    endpoint = table.endpoint
    records = table.records
    split = split_records(records)
    train_recs = [records[i] for i in split["train"]]
    if members < 1:
        raise TwinsInputError(f"--members must be at least 1, got {members}")
    spec = FeatureSpec.fit(train_recs, covariates=table.covariates)
    arrays = encode_cohort(records, spec)
    train, val = subset(arrays, "train", endpoint), subset(arrays, "val", endpoint)
    if len(train["static"]) < MIN_TRAIN:
        raise TwinsInputError(f"only {len(train['static'])} training rows have the endpoint; need at least {MIN_TRAIN}")
    tte = [r for r in train_recs if r.outcomes.time_to_event is not None]
    horizon = default_horizon(tte, PREDICTOR_HORIZON_QUANTILE) \
        if endpoint == "time_to_event" else 1.0
    cfg = FusionConfig(static_dim=spec.static_dim, visit_dim=spec.visit_dim, max_visits=spec.max_visits,
                       endpoint=endpoint, horizon_days=horizon)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    dp = _privacy(epsilon, delta, len(train["static"]), tcfg, runs=members)  # members compose
    ensemble, results = train_ensemble(cfg, train, val, tcfg, members=members, dp=dp, on_step=on_step)
    arm_effect = None
    if dp is None and endpoint in ARM_SHIFT_ENDPOINTS:  # the arm's effect, unshrunk (federated.arm_shift)
        ensemble.arm_column = arm_index(spec)
        pooled = subset(arrays, None, endpoint)
        ensemble.arm_shift = fit_arm_shift(ensemble, pooled)
        if ensemble.arm_shift is not None:  # its standard error goes into the in-silico trials' intervals
            arm_effect = {"status": "fitted", "log_effect": ensemble.arm_shift[1] - ensemble.arm_shift[0],
                          "se": effect_se(endpoint, arm_sums(ensemble, pooled))}
    spent = _spent([ensemble_history(results)], delta)
    value = _metric(endpoint, val, ensemble.predict(val)["risk"]) if len(val["static"]) else float("nan")
    metric = METRICS[endpoint]
    save_component(out, "predictor", ensemble.state_tensors(), kind="fusion_ensemble", config=ensemble.meta(),
                   vocabulary=spec.to_dict(), extra={
                       "epsilon": spent, "delta": delta if spent is not None else None,
                       "noise_multiplier": dp.noise_multiplier if dp else None, "data_fingerprint": data_fp,
                       "columns": {**cols.to_dict(), "covariates": table.covariates}, "arm_levels": {str(k): int(v) for k, v in table.arm_levels.items()},
                       "train": asdict(tcfg), "risk_definition": RISK_DEFINITIONS[endpoint].format(h=horizon),
                       "patients": {"train": len(train["static"]), "val": len(val["static"])},
                       "metrics": {f"val_{metric}": None if math.isnan(value) else round(value, 4)},
                       **({"arm_effect": arm_effect} if arm_effect else {})})
    return {"metric": metric, "value": None if math.isnan(value) else round(value, 4), "epsilon": spent,
            "delta": delta if spent is not None else None}


def load_ensemble(model_dir: Path):
    """(ensemble, feature spec, manifest entry) from a model directory."""
    try:
        return model_dir_loaders.load_ensemble(model_dir)
    except model_dir_loaders.ModelLoadError as exc:
        raise TwinsInputError(str(exc)) from None


def predict(model_dir: Path, patients: Path, events: Path | None, *, arm: str | None) -> dict:
    """Risk, interval, category and top features of every row, in input order."""
    from evoclone.federated.features import encode_cohort
    from evoclone.federated.predictor import feature_groups, top_features

    ensemble, spec, entry = load_ensemble(model_dir)
    table = _input_table(patients, events, entry, need_treatment=arm is None)
    records = table.records
    if arm is not None:
        chosen = parse_arm(arm, entry)
        records = [r.model_copy(update={"arm": chosen}) for r in records]
    try:
        arrays = encode_cohort(records, spec)
    except ValueError as exc:
        raise TwinsInputError(f"{patients}: {str(exc).splitlines()[0]}; give each covariate the type it had in training") from None
    pred = ensemble.predict(arrays)
    groups = feature_groups(spec)
    top = top_features(ensemble.explain(arrays, groups), groups.names, k=3)
    return {"risk_definition": entry.get("risk_definition"), "predictions": [
        {"row": int(table.row_ids[i]), "risk": round(float(pred["risk"][i]), 4),
         "ci_low": round(float(pred["ci_low"][i]), 4), "ci_high": round(float(pred["ci_high"][i]), 4),
         "category": str(pred["category"][i]), "top_features": top[i]} for i in range(len(records))]}


def write_json(path: Path, doc: dict) -> None:
    """Write a JSON document (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")
