"""`evoclone demo`: hospitals keep their patients; Flower trains a DP twin outcome model across them."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from evoclone.coordinator.superlink import SuperLink, fab_hash
from evoclone.federated.artifacts import load_component, sha256_file
from evoclone.federated.features import FeatureSpec, encode_cohort
from evoclone.federated.flower.runtime import ProcessGroup, free_port, require_free
from evoclone.federated.metrics import c_index, kaplan_meier, risk_groups
from evoclone.federated.models.fusion import FusionConfig, survival_curve
from evoclone.federated.simulator import simulate_cohort, write_cohort
from evoclone.federated.snapshot import read_snapshot
from evoclone.federated.training import (TrainConfig, build_model, concat, predict_logits, predict_risk,
                                         subset, train_with_validation)
from evoclone.site_node.approvals import ApprovalStore
from evoclone.site_node.pipeline import export_snapshot, ingest_extract
from evoclone.site_node.settings import init_site
from evoclone.site_node.supernode import start_supernode, supernode_healthy

from .report import GROUP_NAMES, write_report

MARKER = ".evoclone-demo"


class DemoInputError(ValueError):
    """Bad demo arguments: reported in one line, exit code 2, nothing written."""


@dataclass(frozen=True)
class DemoOptions:
    """Everything `evoclone demo` takes."""

    out: Path
    sites: int = 3
    rounds: int = 3
    patients: int = 600
    epsilon: float = 3.0
    delta: float = 1e-5
    seed: int = 7
    port: int = 0
    force: bool = False
    local_epochs: int = 2
    baseline_epochs: int = 20
    run_timeout: float = 1800.0


def validate(opts: DemoOptions) -> None:
    """Check every argument before anything is written."""
    if opts.sites < 2:
        raise DemoInputError(f"--sites must be at least 2 for a federation, got {opts.sites}")
    if opts.rounds < 1:
        raise DemoInputError(f"--rounds must be at least 1, got {opts.rounds}")
    if not (opts.epsilon > 0 and np.isfinite(opts.epsilon)):
        raise DemoInputError(f"--epsilon must be a positive number, got {opts.epsilon}")
    if not 0 < opts.delta < 1:
        raise DemoInputError(f"--delta must be in (0, 1), got {opts.delta}")
    if opts.patients < 30 * opts.sites:
        raise DemoInputError(f"--patients must be at least 30 per site ({30 * opts.sites} for "
                             f"{opts.sites} sites), got {opts.patients}")
    if not 0 <= opts.port <= 65535 - opts.sites:
        raise DemoInputError(f"--port must be between 1 and {65535 - opts.sites} (0 picks free ports)")
    out = opts.out
    if out.exists() and not out.is_dir():
        raise DemoInputError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not opts.force:
            raise DemoInputError(f"--out {out} is not empty; pass --force to replace a previous demo or choose another path")
        if not (out / MARKER).is_file():
            raise DemoInputError(f"--out {out} holds files not written by `evoclone demo`; refusing to delete them with --force")
    parent = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    try:  # a real probe: access() says yes to root even on read-only or virtual file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise DemoInputError(f"--out {out} is not writable ({parent}: {exc.strerror}); choose another path") from None
    if opts.port:
        try:
            require_free(list(range(opts.port, opts.port + opts.sites + 1)))
        except RuntimeError as exc:
            raise DemoInputError(str(exc)) from exc


def _prepare_out(opts: DemoOptions) -> None:
    if opts.out.is_dir() and opts.force:
        shutil.rmtree(opts.out)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / MARKER).write_text("written by `evoclone demo`; safe to delete\n")


def _ports(opts: DemoOptions) -> list[int]:
    if opts.port:
        return list(range(opts.port, opts.port + opts.sites + 1))
    ports: list[int] = []
    while len(ports) < opts.sites + 1:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def run_config(opts: DemoOptions, coordinator_dir: Path) -> dict:
    """The Flower run config for this demo (every other tunable keeps the app's default)."""
    return {"num-server-rounds": opts.rounds, "target-epsilon": float(opts.epsilon), "delta": float(opts.delta),
            "seed": opts.seed, "local-epochs": opts.local_epochs, "min-nodes": opts.sites,
            "expected-nodes": opts.sites, "out-dir": str(coordinator_dir.resolve()),
            # every site must have a full batch of training patients (small demos: 16)
            "batch-size": 32 if opts.patients // opts.sites >= 100 else 16}


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def run_demo(opts: DemoOptions, *, console: Console) -> dict:
    """Run the whole demo and return the summary; stops every process it started."""
    validate(opts)
    started = time.monotonic()
    # Flower processes run in other working directories: every path they get is absolute
    opts = replace(opts, out=opts.out.absolute())
    _prepare_out(opts)
    out = opts.out
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    group = ProcessGroup(out / "logs")
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=console, transient=False)
    try:
        with progress:
            task = progress.add_task("simulating the hospitals' extracts", total=1)
            cohort = simulate_cohort(patients=opts.patients, sites=opts.sites, seed=opts.seed)
            write_cohort(cohort, out / "input")
            progress.update(task, completed=1)

            task = progress.add_task("ingesting + anonymizing at each site", total=opts.sites)
            site_settings, patients = [], {}
            for name in cohort.patients:
                site_dir = out / "sites" / name
                settings = init_site(site_dir, name=name, epsilon_budget=opts.epsilon, delta=opts.delta)
                counts = ingest_extract(site_dir=site_dir, patients_csv=out / "input" / name / "patients.csv",
                                        events_csv=out / "input" / name / "events.csv")
                export_snapshot(site_dir=site_dir)
                # the demo operates every site: each approves the demo's app bundle by its hash
                approvals = ApprovalStore(url=settings.db_url)
                approvals.approve(fab_hash(), admin="evoclone demo", note="the demo's own training app")
                approvals.close()
                site_settings.append(settings)
                patients[name] = counts["patients"]
                progress.advance(task)

            task = progress.add_task("starting the Flower SuperLink and SuperNodes", total=opts.sites + 1)
            ports = _ports(opts)
            coordinator_dir = out / "coordinator"
            link = SuperLink(flower_dir=coordinator_dir / "flower", port=ports[0], group=group)
            link.start()
            progress.advance(task)
            names = [start_supernode(s, superlink=link.address, port=p, group=group)
                     for s, p in zip(site_settings, ports[1:])]  # started together, checked together
            for name, port in zip(names, ports[1:]):
                group.wait_for(lambda port=port: supernode_healthy(port=port), f"{name} to answer /health",
                               timeout=60, watch=tuple(names))
                progress.advance(task)
            # the ServerApp itself waits until every SuperNode has registered

            task = progress.add_task("federated DP training rounds", total=opts.rounds)
            rounds_file = coordinator_dir / "rounds.json"

            def show_rounds() -> None:
                if rounds_file.is_file():
                    try:
                        done = json.loads(rounds_file.read_text())["rounds"]
                    except (json.JSONDecodeError, KeyError):
                        return
                    progress.update(task, completed=len(done))

            outcome = link.submit(run_config=run_config(opts, coordinator_dir), timeout=opts.run_timeout, on_poll=show_rounds)
            show_rounds()
            doc = json.loads(rounds_file.read_text()) if rounds_file.is_file() else {}
            if not outcome.ok or doc.get("status") != "completed":
                why = doc.get("error") or outcome.details[:300] or outcome.status
                raise RuntimeError(f"federated run {outcome.run_id} ended {outcome.status}: {why}; see {out / 'logs'}")
            group.stop()

            task = progress.add_task("evaluating federated vs centralized vs local-only", total=opts.sites + 2)
            summary, km = evaluate(opts, coordinator_dir, site_settings, patients, progress, task)
        summary["wall_seconds"] = round(time.monotonic() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        write_report(out / "report.html", summary, km_curves=km, horizon=1095.0)
        return summary
    finally:
        survivors = group.stop()
        signal.signal(signal.SIGTERM, previous)
        if survivors:
            console.print(f"[red]warning: processes {survivors} did not stop[/red]")


def evaluate(opts: DemoOptions, coordinator_dir: Path, site_settings, patients: dict[str, int],
             progress: Progress, task) -> tuple[dict, list[dict]]:
    """Held-out C-index of the federated model and of the centralized and local-only baselines.

    Only the demo can pool data this way (it simulated every hospital): in production the
    baselines do not exist and evaluation stays federated.
    """
    from evoclone.federated.predictor import FusionEnsemble

    rounds_doc = json.loads((coordinator_dir / "rounds.json").read_text())
    final_dir = coordinator_dir / "model"
    tensors, manifest, vocab = load_component(final_dir, "predictor")
    ensemble = FusionEnsemble.from_state(manifest["config"], tensors)
    cfg, spec = ensemble.cfg, FeatureSpec.from_dict(vocab)
    # every model is compared on the federated study's feature spec
    snaps = {s.name: encode_cohort(read_snapshot(s.snapshot_path)[0], spec) for s in site_settings}
    test = subset(concat([subset(a, "test") for a in snaps.values()]))
    fed_risk = ensemble.predict(test)["risk"]
    model = ensemble.models[0]
    progress.advance(task)
    base_cfg = TrainConfig(epochs=opts.baseline_epochs, batch_size=32, lr=3e-3, seed=opts.seed)
    central = build_model(cfg, seed=opts.seed)
    train_with_validation(central, concat([subset(a, "train") for a in snaps.values()]),
                          concat([subset(a, "val") for a in snaps.values()]), base_cfg)
    progress.advance(task)
    local = {}
    for name, a in snaps.items():
        m = build_model(cfg, seed=opts.seed)
        train_with_validation(m, subset(a, "train"), subset(a, "val"), base_cfg)
        local[name] = round(c_index(test["time"], test["event"], predict_risk(m, test)), 4)
        progress.advance(task)
    spent = {s["name"]: s for s in rounds_doc["sites"]}
    summary = {
        "sites": [{"name": s.name, "patients": patients[s.name], "epsilon_budget": s.epsilon_budget,
                   "epsilon_spent": round(float(spent.get(s.name, {}).get("epsilon_spent", 0.0)), 4),
                   "delta": s.delta} for s in site_settings],
        "rounds": [{"round": r["round"], "train_loss": round(r["train_loss"], 4),
                    "val_c_index": round(r["val_metric"], 4)} for r in rounds_doc["rounds"]],
        "evaluation": {"metric": "c_index", "federated_dp": round(c_index(test["time"], test["event"], fed_risk), 4),
                       "centralized": round(c_index(test["time"], test["event"], predict_risk(central, test)), 4),
                       "local_only": local, "test_patients": int(len(test["time"]))},
        "model": {"path": str((final_dir / manifest["weights"]).relative_to(opts.out)),
                  "sha256": sha256_file(final_dir / manifest["weights"])},
    }
    return summary, km_curves(cfg, model, test, fed_risk)


def km_curves(cfg: FusionConfig, model, test: dict[str, np.ndarray], risk: np.ndarray) -> list[dict]:
    """Observed Kaplan-Meier and mean predicted survival per predicted-risk tertile."""
    groups = risk_groups(risk, 3)
    surv = survival_curve(cfg, torch.from_numpy(predict_logits(model, test))).numpy()
    edges = np.linspace(0, cfg.horizon_days, cfg.time_bins + 1)
    curves = []
    for g in range(3):
        idx = groups == g
        if idx.sum() < 2:
            continue
        t, s = kaplan_meier(test["time"][idx], test["event"][idx], horizon=cfg.horizon_days)
        curves.append({"label": GROUP_NAMES[g], "n": int(idx.sum()), "km_time": t.tolist(), "km_survival": s.tolist(),
                       "pred_time": edges.tolist(), "pred_survival": [1.0, *surv[idx].mean(axis=0).tolist()]})
    return curves


def print_summary(summary: dict, console: Console) -> None:
    """Human-readable result tables."""
    ev = summary["evaluation"]
    t = Table(title="Held-out C-index (time-to-event)")
    t.add_column("model")
    t.add_column("C-index", justify="right")
    t.add_row("federated, DP", f"{ev['federated_dp']:.3f}")
    t.add_row("centralized, non-private", f"{ev['centralized']:.3f}")
    for name, c in ev["local_only"].items():
        t.add_row(f"local only: {name}", f"{c:.3f}")
    console.print(t)
    p = Table(title="Privacy spent per site")
    for col in ("site", "patients", "epsilon budget", "epsilon spent", "delta"):
        p.add_column(col, justify="right")
    for s in summary["sites"]:
        p.add_row(s["name"], str(s["patients"]), f"{s['epsilon_budget']:g}", f"{s['epsilon_spent']:.3f}", f"{s['delta']:g}")
    console.print(p)
