"""Flower ClientApp: a site trains the fusion predictor on its own snapshot with DP-SGD.

The site's snapshot, ledger and budget come from the SuperNode's node config; every
training tunable comes from the run config. Only weights and aggregate metrics are
returned. Before training, the round's privacy cost is checked against the site's
ledger; a round that does not fit is refused with a typed reply.
"""

from __future__ import annotations

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
    return {"site": str(nc["site-name"]), "snapshot": Path(str(nc["snapshot"])), "ledger": str(nc["ledger"]),
            "budget": float(nc["epsilon-budget"]), "delta": float(nc["delta"])}


def _open_ledger(url: str):
    """The site's ledger store (SQL, in the site's own database)."""
    from ..stores.ledger import SqlLedgerStore

    return SqlLedgerStore(url=url)


def _load_model(msg: Message, context: Context):
    model = new_model(context.run_config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local DP-SGD, charged to the site's privacy ledger."""
    torch.set_num_threads(1)  # several SuperNodes share the host's cores
    node = _node(context)
    rc = context.run_config
    arrays, _ = read_snapshot(node["snapshot"], spec=FeatureSpec())
    data = subset(arrays, "train", model_config(rc).endpoint)
    tcfg: TrainConfig = train_config(rc, seed_offset=int(msg.content["config"]["server-round"]))
    n = len(data["static"])
    per_epoch = steps_per_epoch(n, tcfg.batch_size)
    q, steps = 1.0 / per_epoch, tcfg.epochs * per_epoch
    store = _open_ledger(node["ledger"])
    reply_site = ConfigRecord({"site": node["site"]})
    try:
        return _train_round(msg, context, node, store, reply_site, tcfg=tcfg, data=data, arrays=arrays, n=n, q=q,
                            steps=steps)
    finally:
        store.close()


def _train_round(msg: Message, context: Context, node: dict, store, reply_site: ConfigRecord, *, tcfg, data, arrays,
                 n: int, q: float, steps: int) -> Message:
    # Opacus is imported only where it is used: evaluate messages start faster without it
    from evoclone.privacy.accounting import LedgerEntry, calibrate_noise

    from ..stores.ledger import LedgerMismatchError
    from ..training import TrainResult, train

    rc = context.run_config
    try:
        ledger = store.open(epsilon_budget=node["budget"], delta=node["delta"], accountant=str(rc["accountant"]))
    except LedgerMismatchError as exc:  # report what the stored ledger says, not the request
        return _refusal(msg, reply_site, store.stored(), str(exc))
    run_key = str(context.run_id)
    server_round = int(msg.content["config"]["server-round"])
    sigma = store.plan(run_id=run_key)
    if sigma is None:
        rounds = int(rc["num-server-rounds"])
        target = min(node["budget"], ledger.spent() + float(rc["target-epsilon"]))
        try:
            planned = calibrate_noise(prior=ledger.history, target_epsilon=target, delta=ledger.delta,
                                      sample_rate=q, steps=steps * rounds, accountant=ledger.accountant)
        except ValueError as exc:
            return _refusal(msg, reply_site, ledger, str(exc))
        sigma = store.set_plan(run_id=run_key, noise_multiplier=planned)
    if not ledger.would_fit(noise_multiplier=sigma, sample_rate=q, steps=steps):
        return _refusal(msg, reply_site, ledger, "round does not fit the remaining privacy budget")
    model = _load_model(msg, context)
    # validating the incoming global model here spares a separate evaluate message (and
    # a ClientApp process start) in every round but the last
    validation = _validation(model, arrays, model_config(rc).endpoint)
    result: TrainResult = train(model, data, tcfg, dp=dp_settings(rc, noise_multiplier=sigma))
    try:  # one transaction: checked against the stored charges, written once per (run, round)
        spent = store.charge(LedgerEntry(run_id=run_key, round=server_round, noise_multiplier=sigma,
                                         sample_rate=result.sample_rate, steps=result.steps))
    except ValueError as exc:
        return _refusal(msg, reply_site, store.open(epsilon_budget=node["budget"], delta=node["delta"],
                                                    accountant=ledger.accountant), str(exc))
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
