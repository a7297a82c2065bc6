"""Flower ClientApp: a site trains the fusion predictor on its own snapshot with DP-SGD.

The site's snapshot, ledger and budget come from the SuperNode's node config; every
training tunable comes from the run config. Only weights and aggregate metrics are
returned. Before training, the round's privacy cost is checked against the site's
ledger; a round that does not fit is refused with a typed reply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..features import FeatureSpec
from ..metrics import c_index
from ..snapshot import read_snapshot
from ..training import TrainConfig, mean_loss, predict_risk, steps_per_epoch, subset
from .common import STATUS_OK, STATUS_REFUSED, dp_settings, model_config, new_model, train_config

app = ClientApp()


def _node(context: Context) -> dict:
    nc = context.node_config
    missing = [k for k in ("site-name", "snapshot", "ledger", "epsilon-budget", "delta") if k not in nc]
    if missing:
        raise ValueError(f"SuperNode started without node config {missing}; see `evoclone site` docs")
    return {"site": str(nc["site-name"]), "snapshot": Path(str(nc["snapshot"])), "ledger": Path(str(nc["ledger"])),
            "budget": float(nc["epsilon-budget"]), "delta": float(nc["delta"])}


def _load_ledger(path: Path, *, budget: float, delta: float, accountant: str):
    from evoclone.privacy.accounting import PrivacyLedger

    if path.is_file():
        state = json.loads(path.read_text())
        return PrivacyLedger.from_state_dict(state["ledger"]), state.get("plans", {})
    return PrivacyLedger(epsilon_budget=budget, delta=delta, accountant=accountant), {}


def _save_ledger(path: Path, ledger, plans: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"ledger": ledger.state_dict(), "plans": plans}, indent=1))
    os.replace(tmp, path)  # a crash leaves the old ledger or the new one, never half of one


def _load_model(msg: Message, context: Context):
    model = new_model(context.run_config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local DP-SGD, charged to the site's privacy ledger."""
    # Opacus is imported only where it is used: evaluate messages start faster without it
    from evoclone.privacy.accounting import LedgerEntry, calibrate_noise

    from ..training import TrainResult, train

    torch.set_num_threads(1)  # several SuperNodes share the host's cores
    node = _node(context)
    rc = context.run_config
    arrays, _ = read_snapshot(node["snapshot"], spec=FeatureSpec())
    data = subset(arrays, "train", model_config(rc).endpoint)
    tcfg: TrainConfig = train_config(rc, seed_offset=int(msg.content["config"]["server-round"]))
    n = len(data["static"])
    per_epoch = steps_per_epoch(n, tcfg.batch_size)
    q, steps = 1.0 / per_epoch, tcfg.epochs * per_epoch
    ledger, plans = _load_ledger(node["ledger"], budget=node["budget"], delta=node["delta"],
                                 accountant=str(rc["accountant"]))
    run_key = str(context.run_id)
    server_round = int(msg.content["config"]["server-round"])
    reply_site = ConfigRecord({"site": node["site"]})
    if run_key not in plans:
        rounds = int(rc["num-server-rounds"])
        already = ledger.spent()
        target = min(node["budget"], already + float(rc["target-epsilon"]))
        try:
            plans[run_key] = calibrate_noise(prior=ledger.history, target_epsilon=target, delta=ledger.delta,
                                             sample_rate=q, steps=steps * rounds, accountant=ledger.accountant)
        except ValueError as exc:
            return _refusal(msg, reply_site, ledger, str(exc))
        _save_ledger(node["ledger"], ledger, plans)
    sigma = float(plans[run_key])
    if not ledger.would_fit(noise_multiplier=sigma, sample_rate=q, steps=steps):
        return _refusal(msg, reply_site, ledger, "round does not fit the remaining privacy budget")
    model = _load_model(msg, context)
    # validating the incoming global model here spares a separate evaluate message (and
    # a ClientApp process start) in every round but the last
    validation = _validation(model, arrays, model_config(rc).endpoint)
    result: TrainResult = train(model, data, tcfg, dp=dp_settings(rc, noise_multiplier=sigma))
    spent = ledger.charge(LedgerEntry(run_id=run_key, round=server_round, noise_multiplier=sigma,
                                      sample_rate=result.sample_rate, steps=result.steps))
    _save_ledger(node["ledger"], ledger, plans)
    reply_site["status"] = STATUS_OK
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": n, "train_loss": result.loss, "epsilon": spent,
                                 "noise-multiplier": sigma, "steps": result.steps, **validation}),
        "site": reply_site,
        "privacy": ConfigRecord({"epsilon-budget": ledger.epsilon_budget, "delta": ledger.delta}),
    })
    return Message(content=content, reply_to=msg)


def _refusal(msg: Message, site: ConfigRecord, ledger, reason: str) -> Message:
    site["status"] = STATUS_REFUSED
    site["reason"] = reason
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": 0, "epsilon": ledger.spent()}),
        "site": site,
        "privacy": ConfigRecord({"epsilon-budget": ledger.epsilon_budget, "delta": ledger.delta}),
    })
    return Message(content=content, reply_to=msg)


def _validation(model, arrays, endpoint: str) -> dict[str, float]:
    """Validation metrics of a model on the site's validation split (always the same keys)."""
    data = subset(arrays, "val", endpoint)
    n = len(data["static"])
    c = c_index(data["time"], data["event"], predict_risk(model, data)) if n else float("nan")
    defined = c == c  # a split without events gives no C-index
    return {"val-examples": n, "val-loss": mean_loss(model, data) if n else 0.0,
            "val-c-index": c if defined else 0.0, "val-c-weight": n if defined else 0}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation metrics of the global model on the site's own validation split."""
    torch.set_num_threads(1)
    node = _node(context)
    arrays, _ = read_snapshot(node["snapshot"], spec=FeatureSpec())
    model = _load_model(msg, context)
    metrics = {"num-examples": 0, **_validation(model, arrays, model_config(context.run_config).endpoint)}
    metrics["num-examples"] = metrics["val-examples"]
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site": node["site"]})})
    return Message(content=content, reply_to=msg)
