"""Flower ServerApp: FedAvg over the sites' DP updates, one model directory per round.

It writes under the run config's `out-dir` (the coordinator's directory): each round's
aggregated model with its manifest and `rounds.json` with per-round metrics and per-site
privacy spend. Nothing patient-level ever arrives here: replies carry weights and
aggregate metrics only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..artifacts import save_predictor, update_manifest
from ..features import FeatureSpec
from .common import STATUS_OK, model_config, new_model

app = ServerApp()


def weighted_mean(pairs: Iterable[tuple[float, float]]) -> float:
    """Mean of values weighted by counts, ignoring NaN values and zero weights."""
    pairs = [(v, w) for v, w in pairs if w > 0 and not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


class RecordingFedAvg(FedAvg):
    """FedAvg that skips refusals, keeps per-site privacy spend and persists every round."""

    def __init__(self, *, out_dir: Path, run_id: int, model_cfg, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.run_id = run_id
        self.model_cfg = model_cfg
        self.rounds: list[dict] = []
        self.sites: dict[str, dict] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        accepted, participation = [], []
        for msg in replies:
            if msg.has_error():
                participation.append({"node_id": msg.metadata.src_node_id, "status": "error",
                                      "reason": msg.error.reason})
                continue
            site = msg.content.config_records.get("site", ConfigRecord())
            privacy = msg.content.config_records.get("privacy", ConfigRecord())
            metrics = msg.content.metric_records.get("metrics", MetricRecord())
            name = str(site.get("site", f"node-{msg.metadata.src_node_id}"))
            entry = {"site": name, "status": str(site.get("status", "")), "examples": int(metrics.get("num-examples", 0)),
                     "epsilon_spent": float(metrics.get("epsilon", 0.0)), "train_loss": metrics.get("train_loss")}
            if "reason" in site:
                entry["reason"] = str(site["reason"])
            participation.append(entry)
            self.sites[name] = {"name": name, "epsilon_budget": float(privacy.get("epsilon-budget", float("nan"))),
                                "epsilon_spent": entry["epsilon_spent"], "delta": float(privacy.get("delta", float("nan"))),
                                "examples": entry["examples"]}
            if entry["status"] == STATUS_OK:
                accepted.append(msg)
        record = {"round": server_round, "participation": participation,
                  "train_loss": weighted_mean((float(p["train_loss"]), p["examples"]) for p in participation
                                              if p.get("status") == STATUS_OK),
                  "val_c_index": float("nan")}
        self.rounds.append(record)
        if not accepted:
            self._persist()
            raise RuntimeError(f"round {server_round}: no site trained ({participation}); nothing to aggregate")
        arrays, agg = super().aggregate_train(server_round, accepted)
        if arrays is not None:
            save_predictor(self.round_dir(server_round), arrays.to_torch_state_dict(), config=self.model_cfg,
                           feature_spec=FeatureSpec().fingerprint(),
                           extra={"round": server_round, "run_id": self.run_id, "training": "federated_dp_fedavg",
                                  "sites": sorted(self.sites.values(), key=lambda s: s["name"]),
                                  "metrics": {"train_loss": record["train_loss"]}})
        self._persist()
        return arrays, agg

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        pairs, losses = [], []
        for msg in replies:
            if msg.has_error():
                continue
            m = msg.content.metric_records.get("metrics", MetricRecord())
            n = float(m.get("num-examples", 0))
            if "c_index" in m:
                pairs.append((float(m["c_index"]), n))
            losses.append((float(m.get("val_loss", float("nan"))), n))
        c = weighted_mean(pairs)
        loss = weighted_mean(losses)
        if self.rounds and self.rounds[-1]["round"] == server_round:
            self.rounds[-1]["val_c_index"] = c
            self.rounds[-1]["val_loss"] = loss
            if (self.round_dir(server_round) / "manifest.json").is_file():
                update_manifest(self.round_dir(server_round),
                                metrics={"train_loss": self.rounds[-1]["train_loss"], "val_c_index": c, "val_loss": loss})
            self._persist()
        return MetricRecord({"c_index": 0.0 if math.isnan(c) else c, "val_loss": 0.0 if math.isnan(loss) else loss})

    def round_dir(self, server_round: int) -> Path:
        """Where a round's aggregated model lives."""
        return self.out_dir / "models" / f"round-{server_round}"

    def _persist(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / "rounds.json.tmp"
        tmp.write_text(json.dumps({"run_id": self.run_id, "rounds": self.rounds,
                                   "sites": sorted(self.sites.values(), key=lambda s: s["name"])}, indent=1))
        os.replace(tmp, self.out_dir / "rounds.json")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured number of FedAvg rounds."""
    rc = context.run_config
    out_dir = Path(str(rc["out-dir"]))
    if not str(rc["out-dir"]):
        raise ValueError("run config out-dir is empty; pass --run-config \"out-dir='/path'\"")
    min_nodes = int(rc["min-nodes"])
    strategy = RecordingFedAvg(out_dir=out_dir, run_id=int(context.run_id), model_cfg=model_config(rc),
                               fraction_train=float(rc["fraction-train"]), min_train_nodes=min_nodes,
                               min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(new_model(rc).state_dict()),
                   num_rounds=int(rc["num-server-rounds"]), train_config=ConfigRecord({}))
