"""Flower ClientApp: a site summarizes, trains (DP-SGD) and validates on its own snapshot.

The site's snapshot, ledger and budget come from the node config (a SuperNode's
`--node-config` file, or the simulation index for `--engine simulation`); every training
tunable comes from the run config. Replies carry weights and aggregate metrics only.

Privacy: before a round, its cost is checked against the site's ledger; a round that does
not fit is refused with a typed reply. A round's update is kept at the site (already
privatized: resending it is post-processing) and charged once per (run key, round), so a
round repeated after a coordinator restart returns the same update without touching data
or charging twice.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .common import STATUS_OK, STATUS_REFUSED, node_settings, run_key
from .packing import pack, unpack


def _secure_aggregation_or_plain(msg: Message, ctxt: Context, call_next):
    """Flower's SecAgg+ client protocol for runs with secure aggregation, the plain path otherwise."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


app = ClientApp(mods=[_secure_aggregation_or_plain])
ENCODING_VERSION = 2  # part of the kept encoding's key: bump when a task's encode() output changes


def _records(node: dict):
    from ..snapshot import read_snapshot

    return read_snapshot(node["snapshot"])[0]


def _encoded(task, node: dict, vocab: dict) -> dict:
    """The site's records encoded for this study, kept between rounds in the site's state dir.

    Reading and encoding a snapshot costs about a second per 2,000 patients in every round;
    the encoding depends only on the snapshot and the study's vocabulary, so it is kept
    (mode 0600, next to the snapshot it came from) and reused until either changes.
    """
    import hashlib
    import pickle

    st = node["snapshot"].stat()
    key = hashlib.sha256(json.dumps([ENCODING_VERSION, str(node["snapshot"]), st.st_size, st.st_mtime_ns, st.st_ino,
                                     task.name, getattr(task, "endpoint", ""), vocab],
                                    sort_keys=True).encode()).hexdigest()[:32]
    cache_dir = node["state_dir"] / "flower-encoded"
    path = cache_dir / f"{key}.pkl"
    if path.is_file():
        try:
            with path.open("rb") as f:
                return pickle.load(f)  # noqa: S301 (the site's own file, written below)
        except (OSError, pickle.UnpicklingError, EOFError):
            path.unlink(missing_ok=True)
    data = task.encode(_records(node), vocab)
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in cache_dir.glob("*.pkl"):
        old.unlink(missing_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return data


def _reply_site(node: dict, status: str, reason: str = "") -> ConfigRecord:
    rec = ConfigRecord({"site": node["site"], "status": status})
    if reason:
        rec["reason"] = reason
    return rec


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's coarsened data summary (aggregate statistics only) for fitting the study's vocabulary."""
    from ..summaries import summarize

    torch.set_num_threads(1)
    node = node_settings(context)
    cfg = msg.content["config"]
    phase = str(cfg.get("phase", ""))
    if phase == "arm-shift":  # after training: the arm's effect on the final model
        from .arm_query import answer

        return answer(msg, context, node, _encoded)
    if phase == "prepare":  # before the first round: encode the records for the study's vocabulary, once
        return _prepare(msg, context, node)
    covariates = json.loads(str(cfg["covariates"])) or None
    records = _records(node)
    summary = summarize(records, covariates=covariates, history_days=float(cfg["history-days"]),
                        min_count=int(cfg["min-count"]), coarse=True)
    names = sorted({k for r in records for k in r.baseline})
    content = RecordDict({
        "summary": ConfigRecord({"json": json.dumps(summary.to_dict()), "covariates": json.dumps(names)}),
        "metrics": MetricRecord({"num-examples": len(records)}),
        "site": _reply_site(node, STATUS_OK),
    })
    return Message(content=content, reply_to=msg)


def _prepare(msg: Message, context: Context, node: dict) -> Message:
    """Encode the site's records for the study and keep them (see _encoded), and fix the run's noise plan, so
    that the rounds start training at once.

    Replies with the number of training examples; nothing is trained and nothing is charged.
    """
    from ..stores.ledger import LedgerMismatchError, SqlLedgerStore
    from .tasks import task_for, train_config

    t0 = time.perf_counter()
    rc, cfg = context.run_config, msg.content["config"]
    task = task_for(rc)
    data = _encoded(task, node, json.loads(str(cfg["vocabulary"])))
    n = task.examples(data)
    note = ""
    if n >= train_config(rc).batch_size:  # else the rounds refuse, with the reason
        store = SqlLedgerStore(url=node["ledger"])
        try:
            ledger = store.open(epsilon_budget=node["budget"], delta=node["delta"], accountant=str(rc["accountant"]))
            _noise_plan(store, ledger, run_key(context), task, n, cfg, rc, node)
        except (LedgerMismatchError, ValueError) as exc:  # the rounds refuse with the same reason
            note = str(exc)
        finally:
            store.close()
    reply = _reply_site(node, STATUS_OK)
    if note:
        reply["note"] = note
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": n, "prepare-seconds": time.perf_counter() - t0}),
        "site": reply,
    })
    return Message(content=content, reply_to=msg)


class _Cache:
    """The site's kept round updates: <state-dir>/flower-updates/<run key>.<round>.*"""

    def __init__(self, state_dir: Path, key: str, server_round: int) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        self.dir = state_dir / "flower-updates"
        self.weights = self.dir / f"{safe}.{server_round}.safetensors"
        self.meta = self.dir / f"{safe}.{server_round}.json"

    def load(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        from safetensors.torch import load_file

        if not (self.weights.is_file() and self.meta.is_file()):
            return None
        return load_file(str(self.weights)), json.loads(self.meta.read_text())

    def save(self, state: dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_file({k: v.contiguous() for k, v in state.items()}, str(self.weights) + ".tmp")
        os.replace(str(self.weights) + ".tmp", self.weights)
        self.meta.write_text(json.dumps(meta))

    def drop(self) -> None:
        for p in (self.weights, self.meta):
            p.unlink(missing_ok=True)


@dataclass
class RoundResult:
    """What one training round at this site produced (encoded into a reply by the caller)."""

    ok: bool
    ledger: object
    state: dict | None = None
    metrics: dict | None = None
    reason: str = ""




@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local DP-SGD, charged to the site's privacy ledger once.

    Plain runs get the trained weights back; SecAgg+ runs (legacy FitIns inside Flower's
    protocol) get the update (local - global), which Flower's mod masks before it leaves.
    """
    from ..stores.ledger import SqlLedgerStore

    started = time.time()
    torch.set_num_threads(int(context.run_config.get("threads-per-node", 1)))
    node = node_settings(context)
    store = SqlLedgerStore(url=node["ledger"])
    try:
        if "fitins.parameters" in msg.content.array_records:
            return _train_secure(msg, context, node, store)
        cfg = msg.content["config"]
        result = _round(cfg, lambda: unpack(msg.content["arrays"], str(cfg["layout"])), context, node, store)
        if not result.ok:
            return _refusal(msg, node, result.ledger, result.reason)
        # how long the message took from the coordinator to this code (delivery + process start)
        result.metrics["start-latency-seconds"] = max(0.0, started - msg.metadata.created_at)
        result.metrics["warm-start"] = int(os.environ.get("EVOCLONE_ZYGOTE_CHILD") == "1")
        # the handler's own time (validation, training, the ledger's transaction), to split the round's wall time
        result.metrics["handler-seconds"] = time.time() - started
        return _reply(msg, node, result.state, result.metrics, result.ledger)
    finally:
        store.close()


def _train_secure(msg: Message, context: Context, node: dict, store) -> Message:
    from flwr.common import FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common import Code as FlwrCode
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    from .tasks import task_for

    fitins = msg.content
    cfg = fitins.config_records["fitins.config"]
    vocab = json.loads(str(cfg["vocabulary"]))
    names = list(task_for(context.run_config).initial_state(vocab))  # the model's key order
    arrays = parameters_to_ndarrays(_parameters(fitins))
    incoming = {k: torch.from_numpy(a.copy()) for k, a in zip(names, arrays)}
    result = _round(cfg, lambda: incoming, context, node, store)
    if result.ok:
        update = [(result.state[k].detach().cpu() - incoming[k]).numpy() for k in names]
        metrics = {k: v for k, v in result.metrics.items()}
        n = int(metrics["num-examples"])
    else:  # a refusing site still completes the protocol, with weight 0: it adds nothing to the sum
        update = [a * 0 for a in arrays]
        metrics = {"epsilon": result.ledger.spent() if result.ledger else 0.0, "reason": result.reason}
        n = 0
    metrics.update(site=node["site"], status=STATUS_OK if result.ok else STATUS_REFUSED,
                   **{"epsilon-budget": result.ledger.epsilon_budget, "delta": result.ledger.delta})
    res = FitRes(status=Status(code=FlwrCode.OK, message=""), parameters=ndarrays_to_parameters(update),
                 num_examples=n, metrics=metrics)
    return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def _parameters(content: RecordDict):
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters

    return arrayrecord_to_parameters(content.array_records["fitins.parameters"], keep_input=True)


def _round(cfg, incoming_state, context: Context, node: dict, store) -> RoundResult:
    # Opacus and the models are imported only where used: query/evaluate start faster
    from evoclone.privacy.accounting import LedgerEntry

    from ..stores.ledger import LedgerMismatchError
    from .tasks import dp_settings, task_for, train_config

    rc = context.run_config
    server_round = int(cfg["server-round"])
    key = run_key(context)
    try:
        ledger = store.open(epsilon_budget=node["budget"], delta=node["delta"], accountant=str(rc["accountant"]))
    except LedgerMismatchError as exc:  # report what the stored ledger says, not the request
        return RoundResult(False, store.stored(), reason=str(exc))
    cache = _Cache(node["state_dir"], key, server_round)
    kept = cache.load()
    if kept is not None:  # this round was trained before (coordinator restarted): same update, one charge
        state, meta = kept
        try:
            meta["metrics"]["epsilon"] = store.charge(LedgerEntry(run_id=key, round=server_round, **meta["charge"]))
        except ValueError as exc:
            cache.drop()
            return RoundResult(False, ledger, reason=str(exc))
        _record_feedback(node, key, server_round, meta.get("feedback"))
        return RoundResult(True, ledger, state, meta["metrics"])

    task = task_for(rc)
    vocab = json.loads(str(cfg["vocabulary"]))
    data = _encoded(task, node, vocab)
    n = task.examples(data)
    tcfg = train_config(rc, seed_offset=server_round, proximal_mu=float(cfg.get("proximal-mu", 0.0)))
    if n < tcfg.batch_size:
        return RoundResult(False, ledger, reason=f"only {n} training examples, fewer than the batch size "
                                                 f"{tcfg.batch_size}")
    try:
        sigma, q, per_round = _noise_plan(store, ledger, key, task, n, cfg, rc, node)
    except ValueError as exc:
        return RoundResult(False, ledger, reason=str(exc))
    if not ledger.would_fit(noise_multiplier=sigma, sample_rate=q, steps=per_round):
        return RoundResult(False, ledger, reason="round does not fit the remaining privacy budget")
    incoming = incoming_state()
    # validating the incoming global model here spares a separate evaluate message (and a
    # ClientApp start) in every round but the last
    validation = task.validate(vocab, incoming, data)
    feedback = None
    if task.name == "gpt":  # clinicians' verdicts on twins: approved ones swapped in, rejected held out
        from ..feedback import read_feedback

        try:
            verdicts = read_feedback(node["feedback"])
        except ValueError:
            return RoundResult(False, ledger, reason="the site's feedback file is damaged; export it again with "
                                                     "`evoclone site export-snapshot`")
        mixed = task.with_feedback(vocab, data, verdicts, lambda: _records(node),
                                   rate=float(rc.get("feedback-mix", 0.5)), seed=tcfg.seed)
        if mixed is not None:
            data = {**data, "train": mixed.train}
            feedback = {"used": sorted({v.review_id for v in mixed.used}),
                        "held_out": sorted({v.review_id for v in mixed.held_out})}
    t0 = time.perf_counter()
    state, results = task.train(vocab, incoming, data, tcfg, dp_settings(rc, noise_multiplier=sigma))
    train_seconds = time.perf_counter() - t0
    steps = sum(r.steps for r in results)
    loss = float(sum(r.loss for r in results) / len(results))
    metrics = {"num-examples": n, "train_loss": loss, "noise-multiplier": sigma, "steps": steps,
               "train-seconds": train_seconds, **validation}
    charge = {"noise_multiplier": sigma, "sample_rate": results[0].sample_rate, "steps": steps}
    cache.save(state, {"metrics": metrics, "charge": charge, "feedback": feedback})
    try:  # one transaction: checked against the stored charges, written once per (run, round)
        metrics["epsilon"] = store.charge(LedgerEntry(run_id=key, round=server_round, **charge))
    except ValueError as exc:
        cache.drop()
        return RoundResult(False, store.open(epsilon_budget=node["budget"], delta=node["delta"],
                                             accountant=ledger.accountant), reason=str(exc))
    _record_feedback(node, key, server_round, feedback)
    return RoundResult(True, ledger, state, metrics)


def _noise_plan(store, ledger, key: str, task, n: int, cfg, rc, node: dict) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, steps per round) of the run at this site. The noise is fixed once per run
    key (the first plan wins), calibrated by the Opacus accountant so that the planned rounds spend the run's
    target after whatever the ledger already holds. ValueError when no noise reaches the target."""
    from evoclone.privacy.accounting import calibrate_noise

    from ..arm_shift import query_share
    from ..trainer import steps_per_epoch
    from .tasks import train_config

    tcfg = train_config(rc)
    q = 1.0 / steps_per_epoch(n, tcfg.batch_size)  # Poisson rate, as trainer.fit samples
    per_round = task.steps(n, tcfg)
    sigma = store.plan(run_id=key)
    if sigma is None:
        rounds = int(cfg.get("planned-rounds", rc["num-server-rounds"]))
        # training leaves `arm-shift-share` of the run's target for the arm-effect query after it (arm_query)
        share = float(rc["target-epsilon"]) * (1.0 - query_share(task.name, rc))
        target = min(node["budget"], ledger.spent() + share)
        sigma = store.set_plan(run_id=key, noise_multiplier=calibrate_noise(
            prior=ledger.history, target_epsilon=target, delta=ledger.delta, sample_rate=q,
            steps=per_round * rounds, accountant=ledger.accountant))
    return sigma, q, per_round


def _record_feedback(node: dict, key: str, server_round: int, feedback: dict | None) -> None:
    """Record in the site's database which verdicts this round trained on and held out (once per round)."""
    if not feedback:
        return
    from ..stores.feedback import FeedbackUseStore

    uses = FeedbackUseStore(url=node["ledger"])
    try:
        uses.record(run_id=key, round=server_round, used=feedback["used"], held_out=feedback["held_out"])
    finally:
        uses.close()


def _reply(msg: Message, node: dict, state: dict[str, torch.Tensor], metrics: dict, ledger) -> Message:
    content = RecordDict({
        "arrays": pack(state),
        "metrics": MetricRecord({k: float(v) if isinstance(v, float) else int(v) for k, v in metrics.items()}),
        "site": _reply_site(node, STATUS_OK),
        "privacy": ConfigRecord({"epsilon-budget": ledger.epsilon_budget, "delta": ledger.delta}),
    })
    return Message(content=content, reply_to=msg)


def _refusal(msg: Message, node: dict, ledger, reason: str) -> Message:
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": 0, "epsilon": ledger.spent() if ledger else 0.0}),
        "site": _reply_site(node, STATUS_REFUSED, reason),
        "privacy": ConfigRecord({"epsilon-budget": ledger.epsilon_budget if ledger else node["budget"],
                                 "delta": ledger.delta if ledger else node["delta"]}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation metrics of the global model on the site's own validation split.

    For continuous endpoints it also returns a coarse summary of the validation
    predictions and the squared-error sum, from which the coordinator derives the risk
    category tertiles and the residual spread (aggregates only).
    """
    from ..summaries import NumericSummary
    from .tasks import task_for

    torch.set_num_threads(int(context.run_config.get("threads-per-node", 1)))
    node = node_settings(context)
    rc = context.run_config
    task = task_for(rc)
    vocab = json.loads(str(msg.content["config"]["vocabulary"]))
    data = _encoded(task, node, vocab)
    state = unpack(msg.content["arrays"], str(msg.content["config"]["layout"]))
    metrics = task.validate(vocab, state, data)
    metrics["num-examples"] = metrics["val-examples"]
    content = RecordDict({"metrics": MetricRecord(metrics), "site": _reply_site(node, STATUS_OK)})
    min_count = int(msg.content["config"].get("min-count", 10))
    if task.name == "fusion" and task.endpoint == "continuous" and metrics["val-examples"] >= min_count:
        val = data["val"]
        pred = task._ensemble(vocab, state).risk(val)
        content["predictions"] = ConfigRecord({
            "json": json.dumps(NumericSummary.of(pred).coarse().to_dict()),
            "sse": float(((val["continuous"] - pred) ** 2).sum())})
    return Message(content=content, reply_to=msg)
