"""The post-training arm-effect query (federated.arm_shift): the site's answer, charged to its ledger once, and
the coordinator's question and estimate from the answers.

The final model's per-arm sums over the site's patients with the endpoint (training and
validation splits): observed and expected events, or score and information; each patient's
terms bounded, released through a fixed linear map with Gaussian noise (federated.arm_shift):
one Gaussian mechanism (sample rate 1, one step). Its noise multiplier is the smallest that keeps
the site's spend for this run within the run's target epsilon, composed by the ledger's Opacus
accountant with the run's training rounds (which left `arm-shift-share` of the target for it).
The charge is the run's round 0. The noised sums are kept at the site, so a query repeated after
a coordinator restart gets the same answer without a second charge (a fresh draw would average
the noise away).
"""

from __future__ import annotations

import json
import os
import secrets
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from .common import STATUS_OK, STATUS_REFUSED, run_key
from .packing import layout_of, pack, unpack

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from .server_app import Study

ARM_SHIFT_ROUND = 0  # the ledger's (run, round) key of the query: training rounds count from 1


def answer(msg: Message, context: Context, node: dict, encoded) -> Message:
    """Reply to an arm-shift query: the noised sums, or a typed refusal with the reason."""
    from evoclone.privacy.accounting import LedgerEntry, calibrate_noise, epsilon_of

    from ..arm_shift import arm_index, b_bound, noise_cov, noised_sums, sensitivity
    from ..features import FeatureSpec
    from ..stores.ledger import LedgerMismatchError, SqlLedgerStore
    from ..training import concat
    from .tasks import task_for

    rc = context.run_config
    cfg = msg.content["config"]
    endpoint, clip = str(rc["endpoint"]), float(cfg["clip"])
    noise_sd = lambda sigma: sigma * sensitivity(endpoint, clip)  # noqa: E731
    key = run_key(context)
    store = SqlLedgerStore(url=node["ledger"])
    ledger = None
    try:
        try:
            ledger = store.open(epsilon_budget=node["budget"], delta=node["delta"], accountant=str(rc["accountant"]))
        except LedgerMismatchError as exc:
            return _reply(msg, node, store.stored(), refused=str(exc))
        kept_path = node["state_dir"] / "flower-updates" / f"{_safe(key)}.arm-shift.json"
        if kept_path.is_file():
            kept = json.loads(kept_path.read_text())
            try:
                store.charge(LedgerEntry(run_id=key, round=ARM_SHIFT_ROUND, **kept["charge"]))
            except ValueError as exc:
                return _reply(msg, node, ledger, refused=str(exc))
            sigma = kept["charge"]["noise_multiplier"]
            # sums kept before the release went through a map were noised independently: (1 + b^2) sigma^2 each
            cov = kept.get("noise_cov") or (sigma ** 2 * (1 + b_bound(endpoint, clip) ** 2) * np.eye(2)).tolist()
            return _reply(msg, node, store.open(epsilon_budget=node["budget"], delta=node["delta"],
                                                accountant=ledger.accountant), sums=kept["sums"],
                          noise_sd=noise_sd(sigma), noise_cov=cov)
        task = task_for(rc)
        vocab = json.loads(str(cfg["vocabulary"]))
        data = encoded(task, node, vocab)
        pooled = concat([data["train"], data["val"]])
        if len(pooled["static"]) == 0:
            return _reply(msg, node, ledger, refused="no patients with the endpoint at this site")
        before = epsilon_of(_history(ledger, exclude=key), delta=ledger.delta,
                            accountant=ledger.accountant)
        target = min(node["budget"], before + float(rc["target-epsilon"]))
        try:
            sigma = calibrate_noise(prior=ledger.history, target_epsilon=target, delta=ledger.delta,
                                    sample_rate=1.0, steps=1, accountant=ledger.accountant)
        except ValueError as exc:
            return _reply(msg, node, ledger, refused=f"the arm-effect query does not fit the privacy budget ({exc})")
        ensemble = task._ensemble(vocab, unpack(msg.content["arrays"], str(cfg["layout"])))
        ensemble.arm_column = arm_index(FeatureSpec.from_dict(vocab["spec"]))
        rng = np.random.default_rng(secrets.randbits(128))  # OS entropy: the noise must not be predictable
        sums = noised_sums(ensemble, pooled, clip=clip, noise_multiplier=sigma, rng=rng).tolist()
        charge = {"noise_multiplier": sigma, "sample_rate": 1.0, "steps": 1}
        cov = noise_cov(endpoint, clip, noise_sd(sigma)).tolist()
        kept_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = kept_path.with_name(kept_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"sums": sums, "charge": charge, "noise_cov": cov}, f)
        os.replace(tmp, kept_path)
        try:
            store.charge(LedgerEntry(run_id=key, round=ARM_SHIFT_ROUND, **charge))
        except ValueError as exc:
            kept_path.unlink(missing_ok=True)
            return _reply(msg, node, ledger, refused=str(exc))
        return _reply(msg, node, store.open(epsilon_budget=node["budget"], delta=node["delta"],
                                            accountant=ledger.accountant), sums=sums, noise_sd=noise_sd(sigma),
                      noise_cov=cov)
    finally:
        store.close()


def _history(ledger, *, exclude: str) -> list[tuple[float, float, int]]:
    """The accountant history of every charge but those of run `exclude` (what the site spent before it)."""
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries if e.run_id != exclude]


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def _reply(msg: Message, node: dict, ledger, *, sums: list[float] | None = None, noise_sd: float = 0.0,
           noise_cov: list[list[float]] | None = None, refused: str = "") -> Message:
    site = ConfigRecord({"site": node["site"], "status": STATUS_REFUSED if refused else STATUS_OK})
    if refused:
        site["reason"] = refused
    content = RecordDict({
        "site": site,
        "metrics": MetricRecord({"epsilon": ledger.spent() if ledger else 0.0}),
        "privacy": ConfigRecord({"epsilon-budget": ledger.epsilon_budget if ledger else node["budget"],
                                 "delta": ledger.delta if ledger else node["delta"]}),
    })
    if sums is not None:
        # the noise is public (the noise multiplier times the sensitivity, through the release's map): the
        # covariance of each arm's (a, b) sums gives the coordinator's standard error
        content["arm-shift"] = ConfigRecord({"sums": json.dumps(sums), "noise-sd": float(noise_sd),
                                             "noise-cov": json.dumps(noise_cov)})
    return Message(content=content, reply_to=msg)


def ask(study: Study, grid: Grid, rc, tensors: dict, *, timeout: float, min_nodes: int) -> dict:
    """Per-arm gammas of the final model from the sites' noised sums (observed and expected events, or score and
    information; federated.arm_shift); each site charges the query to its ledger. {"status": ...} says what
    happened. The coordinator's side of the query; `answer` is the site's."""
    from ..arm_shift import effect_se, estimate
    from .server_app import _reply_records, _site_name, ask_sites

    cfg = ConfigRecord({"phase": "arm-shift", "vocabulary": json.dumps(study.vocabulary),
                        "layout": layout_of(tensors), "clip": float(rc.get("arm-shift-clip", 0.5))})
    replies = ask_sites(grid, {"arrays": pack(tensors), "config": cfg}, message_type=MessageType.QUERY,
                        timeout=timeout)
    participation, total, noise = [], np.zeros(4), np.zeros((2, 2))
    for msg in replies:
        if msg.has_error():
            participation.append({"site": _site_name(msg), "status": "error", "reason": msg.error.reason})
            continue
        site, privacy, m = _reply_records(msg)
        name, status = _site_name(msg), str(site.get("status", ""))
        if name in study.sites:
            study.sites[name]["epsilon_spent"] = float(m.get("epsilon", study.sites[name]["epsilon_spent"]))
        entry = {"site": name, "status": status, "epsilon_spent": float(m.get("epsilon", 0.0)),
                 "epsilon_budget": privacy.get("epsilon-budget")}
        if status == STATUS_OK:
            answer = msg.content.config_records["arm-shift"]
            total += np.asarray(json.loads(str(answer["sums"])), dtype=float)
            noise += arm_noise_cov(answer)
        else:
            entry["reason"] = str(site.get("reason", ""))
        participation.append(entry)
    ok = sum(p["status"] == STATUS_OK for p in participation)
    doc = {"participation": sorted(participation, key=lambda p: p["site"]), "sites": ok}
    if ok < min_nodes:
        return {**doc, "status": "skipped", "reason": f"only {ok} sites answered, fewer than min-nodes {min_nodes}"}
    step = estimate(str(rc["endpoint"]), total)
    if step is None:
        return {**doc, "status": "skipped", "reason": "too little information in an arm (few events or patients)"}
    return {**doc, "status": "fitted", "control": step[0], "treatment": step[1], "log_effect": step[1] - step[0],
            "se": effect_se(str(rc["endpoint"]), total, noise)}


def arm_noise_cov(answer) -> np.ndarray:
    """The covariance of the noise on each arm's (a, b) sums in a site's arm-shift answer; a site that sends only
    its noise sd (an EvoClone release before 2026-11-30) noised the sums independently."""
    if "noise-cov" in answer:
        return np.asarray(json.loads(str(answer["noise-cov"])), dtype=float).reshape(2, 2)
    return float(answer.get("noise-sd", 0.0)) ** 2 * np.eye(2)
