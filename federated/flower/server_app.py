"""Flower ServerApp: FedAvg over the sites' DP updates, one model directory per round.

It writes under the run config's `out-dir` (the coordinator's directory): each round's
aggregated model with its manifest and `rounds.json` with per-round metrics and per-site
privacy spend. Nothing patient-level ever arrives here: replies carry weights and
aggregate metrics only.
"""

from __future__ import annotations

from dataclasses import asdict

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..artifacts import save_predictor, update_component
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

    def __init__(self, *, out_dir: Path, run_id: int, model_cfg, num_rounds: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_rounds = num_rounds
        self.initial_validation: dict | None = None
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
        # train replies carry the validation metrics of the model they started from: the
        # previous round's aggregate (round 0: the initial weights)
        val_c, val_loss = self._validation(msg for msg in replies if not msg.has_error())
        if server_round > 1 and self.rounds:
            self._set_validation(server_round - 1, val_c, val_loss)
        else:
            self.initial_validation = {"val_c_index": val_c, "val_loss": val_loss}
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
                           feature_spec=asdict(FeatureSpec()),
                           extra={"round": server_round, "run_id": self.run_id, "training": "federated_dp_fedavg",
                                  "sites": sorted(self.sites.values(), key=lambda s: s["name"]),
                                  "metrics": {"train_loss": record["train_loss"]}})
        self._persist()
        return arrays, agg

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Only the last round needs evaluate messages; earlier ones are validated in training."""
        if server_round < self.num_rounds:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = [msg for msg in replies if not msg.has_error()]
        if not replies:
            return None
        c, loss = self._validation(replies)
        self._set_validation(server_round, c, loss)
        return MetricRecord({"c_index": 0.0 if math.isnan(c) else c, "val_loss": 0.0 if math.isnan(loss) else loss})

    @staticmethod
    def _validation(replies: Iterable[Message]) -> tuple[float, float]:
        pairs, losses = [], []
        for msg in replies:
            m = msg.content.metric_records.get("metrics", MetricRecord())
            if "val-c-weight" in m:
                pairs.append((float(m["val-c-index"]), float(m["val-c-weight"])))
                losses.append((float(m["val-loss"]), float(m["val-examples"])))
        return weighted_mean(pairs), weighted_mean(losses)

    def _set_validation(self, server_round: int, c: float, loss: float) -> None:
        record = next((r for r in self.rounds if r["round"] == server_round), None)
        if record is None:
            return
        record["val_c_index"], record["val_loss"] = c, loss
        if (self.round_dir(server_round) / "manifest.json").is_file():
            update_component(self.round_dir(server_round), "predictor",
                             metrics={"train_loss": record["train_loss"], "val_c_index": c, "val_loss": loss})
        self._persist()

    def round_dir(self, server_round: int) -> Path:
        """Where a round's aggregated model lives."""
        return self.out_dir / "models" / f"round-{server_round}"

    def _persist(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / "rounds.json.tmp"
        tmp.write_text(json.dumps({"run_id": self.run_id, "rounds": self.rounds,
                                   "initial": self.initial_validation,
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
                               num_rounds=int(rc["num-server-rounds"]),
                               fraction_train=float(rc["fraction-train"]), min_train_nodes=min_nodes,
                               min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(new_model(rc).state_dict()),
                   num_rounds=int(rc["num-server-rounds"]), train_config=ConfigRecord({}),
                   timeout=float(rc["round-timeout"]))
