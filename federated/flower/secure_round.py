"""One federated round through Flower's SecAgg+ protocol (`evoclone train --secure-aggregation`)."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid

from .server_app import Study, _wait_nodes, round_record, site_entry


def train_round_secure(study: Study, grid: Grid, context: Context, state, server_round: int, cfg: ConfigRecord, *,
                        rc, min_nodes: int, timeout: float, join_timeout: float):
    """One round through Flower's SecAgg+ protocol: the coordinator learns only the weighted mean update.

    flwr 1.42 offers SecAgg+ only as the legacy `SecAggPlusWorkflow` (legacy Strategy,
    FitIns / FitRes); its counterpart for the Message API strategies is not released
    (flwrlabs/flower#4615). This round therefore runs the legacy workflow with a FedAvg
    that takes the protocol's unmasked weighted mean as the aggregate; sites send their
    update (local - global), masked by Flower's `secaggplus_mod`, and their plaintext
    aggregate metrics (epsilon, losses). FedProx works unchanged (the proximal term is
    local); FedAdam's server optimizer is not applied under SecAgg+.
    """
    import numpy as np
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, parameters_to_arrayrecord
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    nodes = _wait_nodes(grid, min_nodes, join_timeout)
    t0 = time.monotonic()
    names = list(state)
    fit_config = {k: v for k, v in cfg.items()}
    fit_config["server-round"] = server_round
    if str(rc["strategy"]) == "fedprox":
        fit_config["proximal-mu"] = float(rc["proximal-mu"])
    captured: dict = {}

    class MeanOfUpdates(LegacyFedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            clients = list(client_manager.all().values())
            return [(c, FitIns(parameters, dict(fit_config))) for c in clients]

        def aggregate_fit(self, server_round, results, failures):
            captured["results"], captured["failures"] = results, failures
            if not results:
                return None, {}
            return results[0][1].parameters, {}  # every result carries the unmasked weighted mean

    manager = SimpleClientManager()
    for nid in nodes:
        manager.register(GridClientProxy(nid, grid, context.run_id))
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1, round_timeout=timeout),
                           strategy=MeanOfUpdates(min_fit_clients=min_nodes, min_available_clients=min_nodes),
                           client_manager=manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    global_arrays = [v.detach().cpu().numpy() for v in state.values()]
    legacy.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
        ndarrays_to_parameters(global_arrays), keep_input=True)
    # weights are each site's examples: bounded by its record count (from the summaries)
    max_weight = max([s.get("records", 0) for s in study.sites.values()] + [1])
    workflow = SecAggPlusWorkflow(num_shares=float(rc["secagg-num-shares"]),
                                  reconstruction_threshold=float(rc["secagg-threshold"]),
                                  max_weight=float(max_weight),
                                  clipping_range=float(rc["secagg-clipping-range"]), timeout=timeout)
    workflow(grid, legacy)
    participation = []
    for proxy, res in captured.get("results", []):
        m = res.metrics
        participation.append(site_entry(study, str(m.get("site", f"node-{proxy.node_id}")), str(m.get("status", "")),
                                        {**m, "num-examples": res.num_examples}, reason=m.get("reason"),
                                        budget=m.get("epsilon-budget"), delta=m.get("delta")))
    for failure in captured.get("failures", []):
        participation.append({"site": "unknown", "status": "error", "reason": str(failure)[:200]})
    record = round_record(study, server_round, participation)
    record["secure_aggregation"] = "secagg+"
    if record["trained"] < min_nodes or "results" not in captured:
        record["status"] = "skipped"
        record["wall_seconds"] = time.monotonic() - t0
        study.rounds.append(record)
        return None, record
    mean_update = parameters_to_ndarrays(arrayrecord_to_parameters(
        legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
    new_state = {k: torch_from(np.asarray(g) + u, like=state[k]) for k, g, u in zip(names, global_arrays, mean_update)}
    record["status"] = "aggregated"
    record["wall_seconds"] = time.monotonic() - t0
    study.rounds.append(record)
    return new_state, record


def torch_from(array, *, like):
    """A tensor with `like`'s dtype from a numpy array."""
    import torch

    return torch.as_tensor(array, dtype=like.dtype)
