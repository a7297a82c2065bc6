"""What a federated study trains: the fusion outcome predictor or the GPT twin generator.

Both go through the same ServerApp / ClientApp path; a task knows how to fit its
vocabulary (feature spec or tokenizer) from the sites' merged summary, build its initial
weights, encode a site's records, train one round locally (DP-SGD through `trainer.fit`),
validate, and save the model directory component. Every tunable comes from the run config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ..features import FeatureSpec, encode_cohort, spec_from_summary
from ..record import PatientRecord
from ..summaries import DataSummary, horizon
from ..trainer import DPSettings, TrainConfig, TrainResult, steps_per_epoch
from ..training import subset
from ..predictor import RISK_DEFINITIONS


def train_config(rc: Mapping, *, seed_offset: int = 0, proximal_mu: float = 0.0) -> TrainConfig:
    """Local optimisation settings for one round."""
    return TrainConfig(epochs=int(rc["local-epochs"]), batch_size=int(rc["batch-size"]),
                       lr=float(rc["learning-rate"]), seed=int(rc["seed"]) + seed_offset, proximal_mu=proximal_mu)


def dp_settings(rc: Mapping, *, noise_multiplier: float) -> DPSettings:
    """DP-SGD settings: clipping and per-sample gradient mode from the run config, noise from the ledger."""
    return DPSettings(noise_multiplier=noise_multiplier, max_grad_norm=float(rc["max-grad-norm"]),
                      grad_sample_mode=str(rc["grad-sample-mode"]))


def _metric(endpoint: str, arrays: dict[str, np.ndarray], risk: np.ndarray) -> float:
    from ..evaluation import auroc
    from ..metrics import c_index

    if len(risk) < 2:
        return float("nan")
    if endpoint == "time_to_event":
        return float(c_index(arrays["time"], arrays["event"], risk)) if arrays["event"].any() else float("nan")
    if endpoint == "binary":
        y = arrays["binary"]
        return float(auroc(y, risk)) if 0 < y.sum() < len(y) else float("nan")
    y = arrays["continuous"]
    return float(1 - np.sum((y - risk) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-12))


class FusionTask:
    """The fusion outcome predictor as a deep ensemble of `members` models averaged member by member."""

    name = "fusion"
    component = "predictor"

    def __init__(self, rc: Mapping) -> None:
        self.rc = rc
        self.endpoint = str(rc["endpoint"])
        self.members = int(rc["members"])

    def vocabulary(self, summary: DataSummary) -> dict:
        from ..predictor import PREDICTOR_HORIZON_QUANTILE

        spec = spec_from_summary(FeatureSpec, summary, max_visits=int(self.rc["max-visits"]))
        h = horizon(summary, PREDICTOR_HORIZON_QUANTILE) if self.endpoint == "time_to_event" else 1.0
        return {"spec": spec.to_dict(), "horizon_days": h}

    def config(self, vocab: dict):
        from ..models.fusion import FusionConfig

        spec = FeatureSpec.from_dict(vocab["spec"])
        return FusionConfig(static_dim=spec.static_dim, visit_dim=spec.visit_dim, max_visits=spec.max_visits,
                            d_model=int(self.rc["d-model"]), n_heads=int(self.rc["n-heads"]),
                            n_layers=int(self.rc["n-layers"]), endpoint=self.endpoint,
                            time_bins=int(self.rc["time-bins"]), horizon_days=float(vocab["horizon_days"]))

    def initial_state(self, vocab: dict) -> dict[str, torch.Tensor]:
        from ..predictor import FusionEnsemble
        from ..training import build_model

        cfg = self.config(vocab)
        seed = int(self.rc["seed"])
        return FusionEnsemble(cfg, [build_model(cfg, seed=seed + i) for i in range(self.members)]).state_tensors()

    def _ensemble(self, vocab: dict, state: dict[str, torch.Tensor]):
        from ..predictor import FusionEnsemble

        cfg = self.config(vocab)
        return FusionEnsemble.from_state({"config": asdict(cfg), "members": self.members,
                                          "calibration": [{"scale": 1.0, "shift": 0.0}] * self.members}, state)

    def encode(self, records: list[PatientRecord], vocab: dict) -> dict[str, dict[str, np.ndarray]]:
        arrays = encode_cohort(records, FeatureSpec.from_dict(vocab["spec"]))
        return {split: subset(arrays, split, self.endpoint) for split in ("train", "val")}

    def encode_reference(self, records: list[PatientRecord], vocab: dict) -> dict:
        """Every record as validation data (the coordinator's reference set for server-side evaluation)."""
        return {"val": subset(encode_cohort(records, FeatureSpec.from_dict(vocab["spec"])), None, self.endpoint)}

    def examples(self, data: dict) -> int:
        return len(data["train"]["static"])

    def steps(self, n: int, tcfg: TrainConfig) -> int:
        return self.members * tcfg.epochs * steps_per_epoch(n, tcfg.batch_size)

    def train(self, vocab: dict, state: dict[str, torch.Tensor], data: dict, tcfg: TrainConfig,
              dp: DPSettings | None) -> tuple[dict[str, torch.Tensor], list[TrainResult]]:
        from ..training import train

        ens = self._ensemble(vocab, state)
        results = []
        for i, model in enumerate(ens.models):
            model.train()
            results.append(train(model, data["train"], replace(tcfg, seed=tcfg.seed + 7919 * i), dp=dp))
        return ens.state_tensors(), results

    def validate(self, vocab: dict, state: dict[str, torch.Tensor], data: dict) -> dict[str, float]:
        from ..training import mean_loss

        val = data["val"]
        n = len(val["static"])
        if not n:
            return {"val-examples": 0, "val-loss": 0.0, "val-metric": 0.0, "val-metric-weight": 0}
        ens = self._ensemble(vocab, state)
        loss = float(np.mean([mean_loss(m, val) for m in ens.models]))
        metric = _metric(self.endpoint, val, ens.risk(val))
        defined = not math.isnan(metric)
        return {"val-examples": n, "val-loss": loss, "val-metric": metric if defined else 0.0,
                "val-metric-weight": n if defined else 0}

    def save(self, out: Path, state: dict[str, torch.Tensor], vocab: dict, extra: dict) -> None:
        from ..artifacts import save_component

        from ..arm_shift import arm_index

        ens = self._ensemble(vocab, state)
        shift = extra.pop("arm_shift", None)
        if shift is not None:  # the post-training arm-effect estimate (federated.arm_shift)
            ens.arm_column, ens.arm_shift = arm_index(FeatureSpec.from_dict(vocab["spec"])), tuple(shift)
        meta = ens.meta()
        tertiles, residual_sd = extra.pop("tertiles", None), extra.pop("residual_sd", 0.0)
        extra.setdefault("risk_definition", RISK_DEFINITIONS[self.endpoint].format(h=float(vocab["horizon_days"])))
        if self.endpoint == "continuous":  # risk categories need validation tertiles (federated, if reported)
            meta["tertiles"], meta["residual_sd"] = tertiles, residual_sd
        save_component(out, self.component, ens.state_tensors(), kind="fusion_ensemble", config=meta,
                       vocabulary=vocab["spec"], extra=extra)


class GeneratorTask:
    """The GPT twin generator (one model)."""

    name = "gpt"
    component = "generator"

    def __init__(self, rc: Mapping) -> None:
        self.rc = rc

    def vocabulary(self, summary: DataSummary) -> dict:
        from ..tokenizer import EventTokenizer

        return EventTokenizer.from_summary(summary, max_len=int(self.rc["gpt-max-len"])).to_dict()

    def _tok(self, vocab: dict):
        from ..tokenizer import EventTokenizer

        return EventTokenizer.from_dict(vocab)

    def _model(self, vocab: dict):
        from ..generator_training import build_generator

        return build_generator(self._tok(vocab), size=str(self.rc["gpt-size"]), seed=int(self.rc["seed"]))

    def initial_state(self, vocab: dict) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._model(vocab).state_dict().items()}

    def encode(self, records: list[PatientRecord], vocab: dict) -> dict:
        import warnings

        from ..features import split_records
        from ..generator_training import encode_records

        tok = self._tok(vocab)
        split = split_records(records)
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncation warnings stay at the site
            for name in ("train", "val"):
                recs = [records[i] for i in split[name] if records[i].arm is not None]
                out[name] = encode_records(tok, recs)[0]
                if name == "train":  # which patient each row is: clinician feedback is per patient
                    out["train_ids"] = [r.patient_id for r in recs]
        return out

    def with_feedback(self, vocab: dict, data: dict, verdicts: list, records: Callable[[], list[PatientRecord]], *,
                      rate: float, seed: int):
        """This round's training rows with approved twins swapped in (federated.feedback.mix), or None when no
        verdict concerns a training patient."""
        import warnings

        from ..feedback import mix, twin_record
        from ..generator_training import encode_records

        train_ids = set(data["train_ids"])
        mine = [v for v in verdicts if v.pseudonym in train_ids]
        if not mine:
            return None
        by_id = {r.patient_id: r for r in records() if r.patient_id in train_ids}
        tok = self._tok(vocab)
        twins: dict[str, list] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for v in mine:
                if v.label > 0 and v.pseudonym in by_id:
                    (ids,), _ = encode_records(tok, [twin_record(by_id[v.pseudonym], v)])
                    twins.setdefault(v.pseudonym, []).append((v, ids))
        return mix(train=data["train"], train_ids=data["train_ids"], twins=twins,
                   rejected=[v for v in mine if v.label < 0], rate=rate, seed=seed)

    def encode_reference(self, records: list[PatientRecord], vocab: dict) -> dict:
        """Every record with an arm as validation data (server-side evaluation)."""
        import warnings

        from ..generator_training import encode_records

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {"val": encode_records(self._tok(vocab), [r for r in records if r.arm is not None])[0]}

    def examples(self, data: dict) -> int:
        return len(data["train"])

    def steps(self, n: int, tcfg: TrainConfig) -> int:
        return tcfg.epochs * steps_per_epoch(n, tcfg.batch_size)

    def train(self, vocab: dict, state: dict[str, torch.Tensor], data: dict, tcfg: TrainConfig,
              dp: DPSettings | None) -> tuple[dict[str, torch.Tensor], list[TrainResult]]:
        from ..generator_training import train_generator

        model = self._model(vocab)
        model.load_state_dict(state)
        result = train_generator(model, self._tok(vocab), data["train"], tcfg, dp=dp)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, [result]

    def validate(self, vocab: dict, state: dict[str, torch.Tensor], data: dict) -> dict[str, float]:
        from ..generation import sequence_nlls

        seqs = data["val"]
        if not seqs:
            return {"val-examples": 0, "val-loss": 0.0, "val-metric": 0.0, "val-metric-weight": 0}
        model = self._model(vocab)
        model.load_state_dict(state)
        model.eval()
        loss = float(np.mean(sequence_nlls(model, seqs, pad_id=self._tok(vocab).pad_id)))
        return {"val-examples": len(seqs), "val-loss": loss, "val-metric": math.exp(min(loss, 50.0)),
                "val-metric-weight": len(seqs)}

    def save(self, out: Path, state: dict[str, torch.Tensor], vocab: dict, extra: dict) -> None:
        from ..artifacts import save_component

        model = self._model(vocab)
        model.load_state_dict(state)
        extra.pop("tertiles", None)
        extra.pop("residual_sd", None)
        save_component(out, self.component, model.state_dict(), kind="twin_generator", config=model.cfg.to_dict(),
                       vocabulary=vocab, extra=extra)


TASKS = {"fusion": FusionTask, "gpt": GeneratorTask}


def task_for(rc: Mapping):
    """The task the run config names."""
    name = str(rc["model"])
    if name not in TASKS:
        raise ValueError(f"run config model must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](rc)
