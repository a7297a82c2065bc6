"""Flower ServerApp: one federated study run, resumable, for either model.

1. Ask every site for its coarsened data summary and fit the study's vocabulary (feature
   spec or tokenizer) from their merge; refuse mismatched covariates before any training.
2. Rounds of FedAvg, FedProx or FedAdam (Flower's strategies aggregate): every connected
   site trains; refusals (privacy budget) and failures are recorded, the round goes on
   with the others when at least `min-nodes` trained; early stopping on the federated
   validation loss.
3. A checkpoint after every round (`checkpoint.json` + weights) lets a resubmitted run
   with the same `run-key` continue from the last completed round after a SuperLink
   restart; `rounds.json` holds per-round metrics, participation and privacy spend.
4. The best round (lowest federated validation loss) becomes the model directory
   `<out-dir>/model`, with its lineage in the manifest.

Nothing patient-level arrives here: replies carry weights and aggregate metrics only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from .common import STATUS_OK, run_key
from .packing import layout_of, pack, unpack

app = ServerApp()
CHECKPOINT = "checkpoint.json"


class StudyError(RuntimeError):
    """The study cannot go on (bad input across sites, too few sites); the message says why."""


def weighted_mean(pairs: Iterable[tuple[float, float]]) -> float:
    """Mean of values weighted by counts, ignoring NaN values and zero weights."""
    pairs = [(v, w) for v, w in pairs if w > 0 and not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def make_strategy(rc, min_nodes: int):
    """FedAvg, FedProx or FedAdam from the run config; every connected site trains."""
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_nodes,
                  min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes)
    name = str(rc["strategy"])
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=float(rc["proximal-mu"]), **common)
    if name == "fedadam":
        return FedAdam(eta=float(rc["server-learning-rate"]), eta_l=float(rc["learning-rate"]), **common)
    raise StudyError(f"run config strategy must be fedavg, fedprox or fedadam, got {name!r}")


class Study:
    """The coordinator-side record of one run: rounds, sites, checkpoint, final model."""

    def __init__(self, out: Path, key: str, run_id: int) -> None:
        self.out, self.key, self.run_id = out, key, run_id
        self.rounds: list[dict] = []
        self.sites: dict[str, dict] = {}
        self.vocabulary: dict | None = None
        self.status = "running"
        self.error = ""
        self.resumed_from = 0
        self.runs: list[int] = [run_id]
        self.best_round: int | None = None
        self.not_joined: list[str] = []  # sites that refused the study (e.g. app not approved)
        self.arm_shift: dict | None = None  # the post-training arm-effect query (federated.arm_shift)
        self.prepare: dict | None = None  # the sites' encoding of their records before the first round

    # -- persistence --------------------------------------------------------------------
    def persist(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"run_key": self.key, "run_id": self.run_id, "flower_runs": self.runs, "status": self.status,
               "error": self.error, "resumed_from": self.resumed_from, "best_round": self.best_round,
               "not_joined": self.not_joined, "prepare": self.prepare, "rounds": self.rounds,
               "arm_shift": self.arm_shift,
               "sites": sorted(self.sites.values(), key=lambda s: s["name"])}
        _write_json(self.out / "rounds.json", doc)

    def checkpoint(self, server_round: int, state) -> None:
        from safetensors.torch import save_file

        self.out.mkdir(parents=True, exist_ok=True)
        weights = self.out / "checkpoint.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights) + ".tmp")
        os.replace(str(weights) + ".tmp", weights)
        _write_json(self.out / CHECKPOINT, {"run_key": self.key, "round": server_round, "vocabulary": self.vocabulary,
                                            "rounds": self.rounds, "sites": self.sites, "runs": self.runs})

    def resume(self):
        """(round, weights) of the last completed round when a checkpoint of this run key exists."""
        from safetensors.torch import load_file

        path = self.out / CHECKPOINT
        if not path.is_file():
            return None
        doc = json.loads(path.read_text())
        if doc["run_key"] != self.key:
            raise StudyError(f"{self.out} holds a checkpoint of run {doc['run_key']}, not {self.key}; "
                             "use another out-dir or the same run-key")
        self.vocabulary, self.rounds, self.sites = doc["vocabulary"], doc["rounds"], doc["sites"]
        self.runs = [*doc.get("runs", []), self.run_id]
        self.resumed_from = int(doc["round"])
        return int(doc["round"]), load_file(str(self.out / "checkpoint.safetensors"))

    def round_dir(self, server_round: int) -> Path:
        return self.out / "models" / f"round-{server_round}"


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    os.replace(tmp, path)


def _wait_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    t0 = time.monotonic()
    delay = 0.2
    while len(nodes := list(grid.get_node_ids())) < n:
        if time.monotonic() - t0 > timeout:
            raise StudyError(f"only {len(nodes)} of {n} sites connected within {timeout:.0f}s; "
                             "check that every site's SuperNode runs and can reach the SuperLink")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    return nodes


def send_and_receive(grid: Grid, messages: list[Message], *, timeout: float, interval: float = 0.1) -> list[Message]:
    """Flower's Grid.send_and_receive with a shorter poll (Flower's waits 3 s between pulls; a pull is a small
    request to the SuperLink next to this process)."""
    ids = set(grid.push_messages(messages))
    end = time.monotonic() + timeout
    replies: list[Message] = []
    while ids and time.monotonic() < end:
        got = list(grid.pull_messages(ids))
        replies += got
        ids -= {m.metadata.reply_to_message_id for m in got}
        if ids:
            time.sleep(interval)
    return replies


def ask_sites(grid: Grid, records: dict, *, message_type: str, timeout: float,
              nodes: list[int] | None = None) -> list[Message]:
    """The same records (built once, the model packed once) to every connected site, or to `nodes`; the replies."""
    nodes = list(grid.get_node_ids()) if nodes is None else nodes
    msgs = [Message(RecordDict(records), dst_node_id=nid, message_type=message_type) for nid in nodes]
    return send_and_receive(grid, msgs, timeout=timeout)


def _site_name(msg: Message) -> str:
    if msg.has_error():
        return f"node-{msg.metadata.src_node_id}"
    return str(msg.content.config_records.get("site", ConfigRecord()).get("site", f"node-{msg.metadata.src_node_id}"))


def _summaries(grid: Grid, rc, nodes: list[int], timeout: float, min_nodes: int):
    """Merged summary of the sites that answered; sites that refused (unapproved app) sit the study out."""
    from ..summaries import DataSummary, merge

    cfg = ConfigRecord({"covariates": str(rc["covariates"]), "history-days": float(rc["history-days"]),
                        "min-count": int(rc["min-count"])})
    replies = ask_sites(grid, {"config": cfg}, message_type=MessageType.QUERY, timeout=timeout, nodes=nodes)
    failed = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error()]
    ok = [m for m in replies if not m.has_error()]
    if len(ok) < min_nodes:
        raise StudyError(f"only {len(ok)} of {len(nodes)} sites summarized their data, fewer than min-nodes "
                         f"{min_nodes} ({'; '.join(failed) or 'no reply'})")
    summaries, names, counts = [], {}, {}
    for m in ok:
        rec = m.content.config_records["summary"]
        summaries.append(DataSummary.from_dict(json.loads(str(rec["json"]))))
        names[_site_name(m)] = tuple(json.loads(str(rec["covariates"])))
        counts[_site_name(m)] = summaries[-1].records
    if len(set(names.values())) > 1:
        ref_site, ref = next(iter(names.items()))
        diff = next((s, sorted(set(c) ^ set(ref))) for s, c in names.items() if c != ref)
        raise StudyError(f"sites have different covariates: {diff[0]} differs from {ref_site} in {diff[1]}; "
                         "give every site the same columns (or pass --covariates)")
    return merge(summaries), counts, failed


def _prepare(grid: Grid, vocabulary: dict, rounds: int, timeout: float) -> dict:
    """Have every connected site encode its records for the study's vocabulary before the first round.

    Encoding is the sites' one-off cost of a study (a few seconds per 10,000 patients), and each site
    fixes its noise plan for the run; done here, in parallel at every site, the rounds time training.
    Each site keeps both, so a resumed run asks again at little cost. A site that fails here (or notes
    that it cannot train) is not dropped: the round records its refusal or failure.
    """
    t0 = time.monotonic()
    cfg = ConfigRecord({"phase": "prepare", "vocabulary": json.dumps(vocabulary), "planned-rounds": rounds})
    sites = []
    for m in ask_sites(grid, {"config": cfg}, message_type=MessageType.QUERY, timeout=timeout):
        if m.has_error():
            sites.append({"site": _site_name(m), "status": "error", "reason": m.error.reason})
            continue
        site, _, metrics = _reply_records(m)
        sites.append({"site": _site_name(m), "status": STATUS_OK, "examples": int(metrics.get("num-examples", 0)),
                      "seconds": round(float(metrics.get("prepare-seconds", 0.0)), 3),
                      **({"note": str(site["note"])} if "note" in site else {})})
    return {"wall_seconds": round(time.monotonic() - t0, 3), "sites": sorted(sites, key=lambda s: s["site"])}


def _reply_records(msg: Message) -> tuple[ConfigRecord, ConfigRecord, MetricRecord]:
    """A site reply's status, privacy budget and metrics records (empty when missing)."""
    c = msg.content
    return (c.config_records.get("site", ConfigRecord()), c.config_records.get("privacy", ConfigRecord()),
            c.metric_records.get("metrics", MetricRecord()))


def site_entry(study: Study, name: str, status: str, m, *, reason=None, budget=None, delta=None) -> dict:
    """One site's participation in a round from its reply metrics; keeps the study's site table current."""
    entry = {"site": name, "status": status, "examples": int(m.get("num-examples", 0)),
             "epsilon_spent": float(m.get("epsilon", 0.0))}
    if reason is not None:
        entry["reason"] = str(reason)
    if status == STATUS_OK:
        entry.update(train_loss=float(m["train_loss"]), train_seconds=float(m.get("train-seconds", 0.0)),
                     start_latency_seconds=float(m.get("start-latency-seconds", 0.0)),
                     handler_seconds=float(m.get("handler-seconds", 0.0)),
                     warm_start=bool(m.get("warm-start", 0)), val_examples=int(m["val-examples"]),
                     val_loss=float(m["val-loss"]), val_metric=float(m["val-metric"]),
                     val_metric_weight=int(m["val-metric-weight"]))
    known = study.sites.get(name, {})
    study.sites[name] = {"name": name, "epsilon_budget": float("nan" if budget is None else budget),
                         "epsilon_spent": entry["epsilon_spent"], "delta": float("nan" if delta is None else delta),
                         "examples": max(entry["examples"], known.get("examples", 0)), "records": known.get("records", 0)}
    return entry


def round_record(study: Study, server_round: int, participation: list[dict]) -> dict:
    """A round's record; the sites' replies also validate the previous round's model (what they started from)."""
    ok = [p for p in participation if p["status"] == STATUS_OK]
    record = {"round": server_round, "participation": sorted(participation, key=lambda p: p["site"]),
              "trained": len(ok), "train_loss": weighted_mean((p["train_loss"], p["examples"]) for p in ok),
              "val_loss": float("nan"), "val_metric": float("nan")}
    prev = next((r for r in study.rounds if r["round"] == server_round - 1), None)
    if prev is not None and ok:
        prev["val_loss"] = weighted_mean((p["val_loss"], p["val_examples"]) for p in ok)
        prev["val_metric"] = weighted_mean((p["val_metric"], p["val_metric_weight"]) for p in ok)
    return record


def _train_round(study: Study, strategy, grid: Grid, state, server_round: int, cfg: ConfigRecord, *,
                 min_nodes: int, timeout: float, join_timeout: float):
    _wait_nodes(grid, min_nodes, join_timeout)
    t0 = time.monotonic()
    msgs = list(strategy.configure_train(server_round, pack(state), cfg, grid))
    replies = send_and_receive(grid, msgs, timeout=timeout)
    answered = {m.metadata.src_node_id for m in replies}
    participation, accepted = [], []
    for m in msgs:
        if m.metadata.dst_node_id not in answered:
            participation.append({"site": f"node-{m.metadata.dst_node_id}", "status": "timeout",
                                  "reason": f"no reply within {timeout:.0f}s"})
    for msg in replies:
        if msg.has_error():
            participation.append({"site": _site_name(msg), "status": "error", "reason": msg.error.reason})
            continue
        site, privacy, metrics = _reply_records(msg)
        entry = site_entry(study, _site_name(msg), str(site.get("status", "")), metrics, reason=site.get("reason"),
                           budget=privacy.get("epsilon-budget"), delta=privacy.get("delta"))
        if entry["status"] == STATUS_OK:
            accepted.append(msg)
        participation.append(entry)
    record = round_record(study, server_round, participation)
    if len(accepted) < min_nodes:
        record["status"] = "skipped"
        record["wall_seconds"] = time.monotonic() - t0
        study.rounds.append(record)
        return None, record
    arrays, _ = strategy.aggregate_train(server_round, accepted)
    new_state = {k: v.to(state[k].dtype) for k, v in unpack(arrays, str(cfg["layout"])).items()}
    record["status"] = "aggregated"
    record["wall_seconds"] = time.monotonic() - t0  # messages out, local training, replies in, aggregation
    study.rounds.append(record)
    return new_state, record


def _evaluate(grid: Grid, state, cfg: ConfigRecord, timeout: float) -> dict:
    from ..summaries import NumericSummary

    replies = [m for m in ask_sites(grid, {"arrays": pack(state), "config": cfg}, message_type=MessageType.EVALUATE,
                                    timeout=timeout) if not m.has_error()]
    ms = [m.content.metric_records["metrics"] for m in replies]
    out = {"val_loss": weighted_mean((float(m["val-loss"]), float(m["val-examples"])) for m in ms),
           "val_metric": weighted_mean((float(m["val-metric"]), float(m["val-metric-weight"])) for m in ms),
           "sites": len(replies)}
    preds = [m.content.config_records["predictions"] for m in replies if "predictions" in m.content.config_records]
    if preds:
        merged = NumericSummary.merge([NumericSummary.from_dict(json.loads(str(p["json"]))) for p in preds])
        out["tertiles"] = [float(x) for x in merged.quantile([1 / 3, 2 / 3])]
        out["residual_sd"] = math.sqrt(sum(float(p["sse"]) for p in preds) / merged.n)
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) one study run; see the module docstring."""
    from ..predictor import METRICS
    from .backoff import apply_backoffs
    from .tasks import task_for

    apply_backoffs()  # this ServerApp process pulls the sites' replies: retries from 0.1 s, not 1 s
    rc = context.run_config
    if not str(rc["out-dir"]):
        raise ValueError("run config out-dir is empty; pass --run-config \"out-dir='/path'\"")
    study = Study(Path(str(rc["out-dir"])), run_key(context), int(context.run_id))
    task = task_for(rc)
    rounds, min_nodes = int(rc["num-server-rounds"]), int(rc["min-nodes"])
    expected = max(int(rc["expected-nodes"]), min_nodes)
    timeout, join_timeout = float(rc["round-timeout"]), float(rc["join-timeout"])
    patience, min_delta = int(rc["patience"]), float(rc["min-delta"])
    try:
        resumed = study.resume()
        if resumed is None:
            nodes = _wait_nodes(grid, expected, join_timeout)
            summary, counts, failed = _summaries(grid, rc, nodes, timeout, min_nodes)
            study.vocabulary = task.vocabulary(summary)
            study.sites = {n: {"name": n, "epsilon_spent": 0.0, "examples": 0, "records": counts[n]}
                           for n in sorted(counts)}
            study.not_joined = failed
            start, state = 0, task.initial_state(study.vocabulary)
            study.checkpoint(0, state)
        else:
            start, state = resumed
        study.persist()
        strategy = make_strategy(rc, min_nodes)
        secure = bool(rc.get("secure-aggregation", False))
        if secure and str(rc["strategy"]) == "fedadam":
            raise StudyError("secure aggregation (SecAgg+) runs with fedavg or fedprox in this release; "
                             "FedAdam's server optimizer is not applied to the masked sum")
        if start < rounds:
            study.prepare = _prepare(grid, study.vocabulary, rounds, timeout)
            study.persist()
        reference = _reference(task, rc, study.vocabulary)
        cfg = ConfigRecord({"vocabulary": json.dumps(study.vocabulary), "planned-rounds": rounds,
                            "layout": layout_of(state)})
        done = start
        for server_round in range(start + 1, rounds + 1):
            if secure:
                from .secure_round import train_round_secure

                new_state, record = train_round_secure(study, grid, context, state, server_round, cfg, rc=rc,
                                                        min_nodes=min_nodes, timeout=timeout, join_timeout=join_timeout)
            else:
                new_state, record = _train_round(study, strategy, grid, state, server_round, cfg, min_nodes=min_nodes,
                                                 timeout=timeout, join_timeout=join_timeout)
            if new_state is None:
                study.persist()
                if record["trained"] == 0 and all(p["status"] == "refused" for p in record["participation"]):
                    study.error = f"round {server_round}: every site refused (privacy budgets spent); stopping"
                    break
                continue
            state = new_state
            done = server_round
            if reference is not None:  # server-side evaluation on the coordinator's reference set
                ev = task.validate(study.vocabulary, state, reference)
                record["server_val_loss"], record["server_val_metric"] = ev["val-loss"], ev["val-metric"]
            task.save(study.round_dir(server_round), state, study.vocabulary,
                      {"round": server_round, "run_key": study.key, "metrics": {"train_loss": record["train_loss"]}})
            study.checkpoint(server_round, state)
            study.persist()
            if patience and _stalled([r for r in study.rounds if r["status"] == "aggregated"], patience, min_delta):
                study.error = f"early stopping after round {server_round}: validation loss did not improve for {patience} rounds"
                break
        final = study.round_dir(done) if done else None
        if final is not None:
            ev = _evaluate(grid, state, ConfigRecord({"vocabulary": json.dumps(study.vocabulary),
                                                      "min-count": int(rc["min-count"]),
                                                      "layout": layout_of(state)}), timeout)
            last = next(r for r in study.rounds if r["round"] == done)
            last["val_loss"], last["val_metric"] = ev["val_loss"], ev["val_metric"]
            _finish(study, task, rc, ev, metric=METRICS.get(str(rc["endpoint"]), "perplexity")
                    if task.name == "fusion" else "perplexity", grid=grid, timeout=timeout, min_nodes=min_nodes)
        study.status = "completed" if final is not None else "failed"
        if final is None and not study.error:
            study.error = "no round was aggregated"
        study.persist()
    except StudyError as exc:
        study.status, study.error = "failed", str(exc)
        study.persist()
        raise


def _reference(task, rc, vocabulary: dict):
    """The encoded reference set for server-side evaluation (run config server-eval), if any.

    It is data the coordinator may hold (a public or synthetic cohort, never a site's rows),
    written as a snapshot by `evoclone train --server-eval`.
    """
    path = str(rc.get("server-eval", ""))
    if not path:
        return None
    from ..snapshot import read_snapshot

    return task.encode_reference(read_snapshot(Path(path))[0], vocabulary)


def _stalled(rounds: list[dict], patience: int, min_delta: float) -> bool:
    """True when the last `patience` validated rounds did not beat the best before them by min_delta."""
    losses = [r["val_loss"] for r in rounds if not math.isnan(r.get("val_loss", float("nan")))]
    if len(losses) <= patience:
        return False
    best_before = min(losses[:-patience])
    return min(losses[-patience:]) > best_before - min_delta


def _finish(study: Study, task, rc, ev: dict, *, metric: str, grid: Grid | None = None, timeout: float = 0.0,
            min_nodes: int = 1) -> None:
    """Copy the best round (lowest federated validation loss) to <out>/model with its lineage; for fusion
    time-to-event and binary models, re-estimate the arm's effect on it first (federated.arm_shift)."""
    from ..arm_shift import query_share
    from ..artifacts import load_component

    aggregated = [r for r in study.rounds if r["status"] == "aggregated"]
    scored = [r for r in aggregated if not math.isnan(r.get("val_loss", float("nan")))]
    best = min(scored, key=lambda r: r["val_loss"]) if scored else aggregated[-1]
    tensors, _, vocab = load_component(study.round_dir(best["round"]), task.component)
    arm = None
    if grid is not None and query_share(task.name, rc) > 0:
        from .arm_query import ask

        arm = ask(study, grid, rc, tensors, timeout=timeout, min_nodes=min_nodes)
        study.arm_shift = arm
        study.persist()
    model_dir = study.out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    sites = sorted(study.sites.values(), key=lambda s: s["name"])
    extra = {"training": f"federated_dp_{rc['strategy']}", "run_key": study.key, "flower_runs": study.runs,
             "rounds": len(aggregated), "best_round": best["round"],
             "sites": [{"name": s["name"], "epsilon": s.get("epsilon_spent"), "delta": s.get("delta"),
                        "examples": s.get("examples")} for s in sites],
             "epsilon": max((s.get("epsilon_spent") or 0.0) for s in sites) if sites else None,
             "delta": float(rc.get("delta", 0.0)) or None,
             "metrics": {f"val_{metric}": _num(best.get("val_metric")), "val_loss": _num(best.get("val_loss"))},
             "tertiles": ev.get("tertiles"), "residual_sd": ev.get("residual_sd", 0.0)}
    if arm is not None:
        extra["arm_effect"] = {k: arm[k] for k in ("status", "reason", "log_effect", "se", "sites") if k in arm}
        if arm["status"] == "fitted":
            extra["arm_shift"] = (arm["control"], arm["treatment"])
    extra.update(json.loads(str(rc.get("manifest-extra", "")) or "{}"))
    task.save(model_dir, tensors, study.vocabulary, extra)
    study.best_round = best["round"]


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)
