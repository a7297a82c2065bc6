"""The work behind `evoclone train`: split a table by site, stand up one site node per part,
and train the study's model(s) through Flower, on separate processes (deployment engine)
or Flower's simulation runtime.

Each part becomes a site directory with its own secret key, database (privacy ledger,
app approvals) and snapshot; each site's records are pseudonymized with its own key
before the snapshot is written. Only the site's own SuperNode (or simulated node) reads a
snapshot; the ServerApp gets summaries, weights and aggregate metrics. In deployment the
SuperLink speaks TLS with a study CA, SuperNodes authenticate with registered keys, and
each site approves the app bundle by its hash (this command operates the sites it stands
up; a real hospital's admin runs `evoclone site approve` on their own node).

Every input problem raises `TrainInputError` (one line) before anything is started,
written or charged.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from evoclone.federated.tabular import OutcomeColumns

MODELS = ("fusion", "gpt", "both")
ENGINES = ("deployment", "simulation")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
STUDY_MARKER = ".evoclone-study"
OPERATOR = "evoclone train (sponsor-operated site nodes)"
MIN_REMAINING = 0.01  # a site with less than 1% of its epsilon budget left counts as spent


class TrainInputError(ValueError):
    """Bad input to `evoclone train` (exit code 2); nothing was started or charged."""


@dataclass(frozen=True)
class TrainOptions:
    """Everything `evoclone train` takes."""

    data: Path
    site_column: str
    treatment: str
    outcome: OutcomeColumns
    out: Path
    events: Path | None = None
    covariates: list[str] | None = None
    id_column: str | None = None
    model: str = "fusion"
    rounds: int = 5
    epsilon: float = 3.0
    delta: float = 1e-5
    engine: str = "deployment"
    strategy: str = "fedavg"
    local_epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 3e-3
    members: int = 1
    min_sites: int = 0  # 0: every site must train each round
    patience: int = 0
    seed: int = 0
    insecure: bool = False
    round_timeout: float = 900.0
    work_dir: Path | None = None
    force: bool = False
    threads: int = 1
    server_eval: Path | None = None  # a reference cohort the coordinator may hold (never a site's rows)
    secure_aggregation: bool = False  # SecAgg+: the coordinator sees only the weighted mean update
    extra_run_config: dict = field(default_factory=dict)

    @property
    def study_dir(self) -> Path:
        """Site nodes, PKI and coordinator state (never inside the model directory, which is shareable)."""
        return (self.work_dir or self.out.parent / f".{self.out.name}.study").absolute()


@dataclass
class SitePart:
    name: str
    rows: int
    train_rows: int
    settings: object = None


def _read(opts: TrainOptions) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    from .twins_jobs import TwinsInputError, _read_csv

    try:
        return _read_csv(opts.data, "--data"), (_read_csv(opts.events, "--events") if opts.events else None)
    except TwinsInputError as exc:
        raise TrainInputError(str(exc)) from None


def validate(opts: TrainOptions) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str]]:
    """Check every argument and the table; returns (patients, events, site names)."""
    if opts.model not in MODELS:
        raise TrainInputError(f"--model must be one of {', '.join(MODELS)}, got {opts.model!r}")
    if opts.engine not in ENGINES:
        raise TrainInputError(f"--engine must be one of {', '.join(ENGINES)}, got {opts.engine!r}")
    if opts.strategy not in STRATEGIES:
        raise TrainInputError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {opts.strategy!r}")
    if opts.secure_aggregation and opts.strategy == "fedadam":
        raise TrainInputError("--secure-aggregation runs with --strategy fedavg or fedprox (FedAdam's server "
                              "optimizer is not applied to the masked sum in this release)")
    if not (opts.epsilon > 0 and math.isfinite(opts.epsilon)):
        raise TrainInputError(f"--epsilon must be a positive number, got {opts.epsilon}")
    if not 0 < opts.delta < 1:
        raise TrainInputError(f"--delta must be in (0, 1), got {opts.delta}")
    if opts.rounds < 1:
        raise TrainInputError(f"--rounds must be at least 1, got {opts.rounds}")
    if opts.batch_size < 2 or opts.local_epochs < 1 or opts.members < 1:
        raise TrainInputError("--batch-size must be at least 2, --local-epochs and --members at least 1")
    out = opts.out
    if out.exists() and not out.is_dir():
        raise TrainInputError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not opts.force:
            raise TrainInputError(f"--out {out} is not empty; pass --force to replace the model there or choose another path")
        if not (out / "manifest.json").is_file():
            raise TrainInputError(f"--out {out} holds files that are not a model directory; refusing to delete them "
                                  "with --force, choose another path")
    patients, events = _read(opts)
    if opts.site_column not in patients.columns:
        raise TrainInputError(f"{opts.data}: no site column {opts.site_column!r}; columns are "
                              f"{', '.join(map(str, patients.columns[:12]))}")
    sites = patients[opts.site_column]
    if sites.isna().any():
        row = int(sites.isna().to_numpy().argmax())
        raise TrainInputError(f"{opts.data} row {row} column '{opts.site_column}': site is missing; "
                              "give every row its hospital")
    names = sorted({str(s) for s in sites})
    if len(names) < 2:
        raise TrainInputError(f"{opts.data} column '{opts.site_column}' has one value ({names[0]!r}); a federated "
                              "study needs at least two sites (train one site with `evoclone twins train`)")
    bad = [n for n in names if not n.replace("-", "").replace("_", "").replace(".", "").isalnum()]
    if bad:
        raise TrainInputError(f"{opts.data} column '{opts.site_column}': site name {bad[0]!r} may only hold letters, "
                              "digits, '-', '_' and '.'")
    if opts.covariates is not None:
        missing = [c for c in opts.covariates if c not in patients.columns]
        if missing:
            raise TrainInputError(f"{opts.data}: covariate columns {missing} do not exist")
        if opts.site_column in opts.covariates:
            raise TrainInputError(f"--covariates: the site column {opts.site_column!r} cannot be a covariate")
    if events is not None and opts.site_column in events.columns:
        events = events.drop(columns=[opts.site_column])
    return patients, events, names


def _covariates(opts: TrainOptions, patients: pd.DataFrame) -> list[str]:
    if opts.covariates is not None:
        return list(opts.covariates)
    reserved = {opts.site_column, opts.treatment, opts.id_column or "patient_id", *opts.outcome.columns}
    return [c for c in patients.columns if c not in reserved]


def _site_records(opts: TrainOptions, patients: pd.DataFrame, events: pd.DataFrame | None, site: str,
                  covariates: list[str]):
    """One site's records, ids pseudonymized later with the site's own key."""
    from evoclone.federated.tabular import EVENT_ID, records_from_frames

    part = patients[patients[opts.site_column].astype(str) == site].drop(columns=[opts.site_column])
    id_col = opts.id_column or (EVENT_ID if EVENT_ID in part.columns else None)
    ev = None
    if events is not None:
        if id_col is None:
            raise TrainInputError("--events needs a patient id column in --data (patient_id, or --id-column) to "
                                  "join events to patients")
        ev = events[events[EVENT_ID if EVENT_ID in events.columns else id_col].astype(str)
                    .isin(part[id_col].astype(str))]
    try:
        table = records_from_frames(part, ev, treatment=opts.treatment, outcome=opts.outcome, covariates=covariates,
                                    id_column=id_col, site=site, source=f"{opts.data} (site {site})",
                                    events_source=str(opts.events))
    except ValueError as exc:
        raise TrainInputError(str(exc).splitlines()[0]) from None
    return table


def _check_budget(settings) -> None:
    """A site whose ledger has no budget left is an input error (nothing is charged)."""
    from evoclone.federated.stores.ledger import SqlLedgerStore

    store = SqlLedgerStore(url=settings.db_url)
    try:
        ledger = store.stored()
    finally:
        store.close()
    if ledger is not None and ledger.remaining() < MIN_REMAINING * ledger.epsilon_budget:
        raise TrainInputError(f"site {settings.name}: its privacy budget (epsilon {ledger.epsilon_budget:g}) is "
                              f"already spent ({ledger.spent():.3f}); a site admin decides whether to reset it "
                              "(`evoclone site reset-budget`)")


def prepare_sites(opts: TrainOptions, patients: pd.DataFrame, events: pd.DataFrame | None,
                  names: list[str]) -> tuple[list[SitePart], list[str], dict]:
    """Validate every part, then create or reuse one site node per part (own key, db, snapshot)."""
    from evoclone.federated.features import split_records
    from evoclone.federated.snapshot import write_snapshot
    from evoclone.privacy.pseudonym import Pseudonymizer
    from evoclone.site_node.settings import get_settings, init_site, load_key

    covariates = _covariates(opts, patients)
    tables = {}
    for site in names:
        table = _site_records(opts, patients, events, site, covariates)
        split = split_records(table.records)
        n_train = len(split["train"])
        if n_train < opts.batch_size:
            raise TrainInputError(f"site {site} has {n_train} training rows (of {len(table.records)}), fewer than the "
                                  f"batch size {opts.batch_size}; lower --batch-size or merge small sites")
        tables[site] = table
    arm_levels: dict = {}
    for t in tables.values():
        arm_levels.update({str(k): int(v) for k, v in t.arm_levels.items()})
    parts = []
    for site, table in tables.items():
        site_dir = opts.study_dir / "sites" / site
        if (site_dir / "site.json").is_file():
            settings = get_settings(site_dir)
            if (settings.epsilon_budget, settings.delta) != (opts.epsilon, opts.delta):
                raise TrainInputError(f"site {site} already exists in {opts.study_dir} with budget epsilon "
                                      f"{settings.epsilon_budget:g}, delta {settings.delta:g}; a site's budget is fixed")
            _check_budget(settings)
        else:
            settings = init_site(site_dir, name=site, epsilon_budget=opts.epsilon, delta=opts.delta)
        pseudo = Pseudonymizer(key=load_key(settings))
        records = [r.model_copy(update={"patient_id": pseudo.pseudonym(r.patient_id), "site": site})
                   for r in table.records]
        write_snapshot(settings.snapshot_path, records, site=site)
        parts.append(SitePart(site, len(records), len(split_records(records)["train"]), settings))
    return parts, covariates, arm_levels


def run_config(opts: TrainOptions, model: str, *, out_dir: Path, covariates: list[str], sites: int,
               manifest_extra: dict, run_key: str) -> dict:
    """The Flower run config of one model's training."""
    rc = {"model": model, "num-server-rounds": opts.rounds, "strategy": opts.strategy,
          "local-epochs": opts.local_epochs, "batch-size": opts.batch_size, "learning-rate": opts.learning_rate,
          "target-epsilon": float(opts.epsilon) / (2 if opts.model == "both" else 1), "delta": float(opts.delta),
          "seed": opts.seed, "endpoint": opts.outcome.endpoint, "members": opts.members,
          "covariates": json.dumps(covariates), "min-nodes": opts.min_sites or sites, "expected-nodes": sites,
          "round-timeout": float(opts.round_timeout), "patience": opts.patience, "threads-per-node": opts.threads,
          "run-key": run_key, "manifest-extra": json.dumps(manifest_extra), "out-dir": str(out_dir),
          "secure-aggregation": bool(opts.secure_aggregation)}
    rc.update(opts.extra_run_config)
    return rc


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def run_train(opts: TrainOptions, *, on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train the requested model(s) across the table's sites; returns the --json summary."""
    from evoclone.cli.twins_jobs import fingerprint

    started = time.monotonic()
    opts = replace(opts, out=opts.out.absolute())
    patients, events, names = validate(opts)
    if opts.engine == "deployment" and not opts.insecure:
        from .federation import ensure_pki

        try:  # the study PKI (created on first use): an expired or foreign certificate stops here
            ensure_pki(opts.study_dir / "pki", names)
        except ValueError as exc:
            raise TrainInputError(str(exc).splitlines()[0]) from None
    server_eval = _server_eval(opts, _covariates(opts, patients), opts.study_dir) if opts.server_eval else None
    parts, covariates, arm_levels = prepare_sites(opts, patients, events, names)
    progress = on_progress or (lambda *_: None)
    manifest_extra = {"data_fingerprint": fingerprint(opts.data, opts.events),
                      "columns": {"treatment": opts.treatment, "outcome": vars(opts.outcome), "covariates": covariates,
                                  "id_column": opts.id_column, "site_column": opts.site_column},
                      "arm_levels": arm_levels}
    study = opts.study_dir
    (study / STUDY_MARKER).write_text("written by `evoclone train`; holds site nodes with patient data\n")
    models = ["fusion", "gpt"] if opts.model == "both" else [opts.model]
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    results = {}
    try:
        from .federation import Federation

        fed = Federation(study, parts, insecure=opts.insecure, engine=opts.engine)
        with fed:
            for model in models:
                key = f"{model}-{uuid.uuid4().hex[:12]}"
                coord = study / "coordinator" / key
                rc = run_config(opts, model, out_dir=coord, covariates=covariates, sites=len(parts),
                                manifest_extra=manifest_extra, run_key=key)
                if server_eval is not None:
                    rc["server-eval"] = str(server_eval)
                if len(arm_levels) < 2:  # one arm (a history table, say): there is no arm effect to re-estimate
                    rc["arm-shift-share"] = 0.0
                results[model] = fed.train(rc, coord, rounds=opts.rounds,
                                           on_round=lambda done, total, m=model: progress(m, done, total))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if opts.out.is_dir():
        shutil.rmtree(opts.out)
    opts.out.mkdir(parents=True)
    for model, res in results.items():
        _merge_model_dir(Path(res["coordinator"]) / "model", opts.out)
    summary = {"model_dir": str(opts.out), "engine": opts.engine, "strategy": opts.strategy,
               "endpoint": opts.outcome.endpoint, "sites": _site_summary(parts, results),
               "models": {m: {k: v for k, v in r.items() if k not in ("coordinator",)} for m, r in results.items()},
               "wall_seconds": round(time.monotonic() - started, 1)}
    (opts.out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _server_eval(opts: TrainOptions, covariates: list[str], study: Path) -> Path:
    """The reference cohort as a snapshot in the coordinator's directory (same columns as --data)."""
    from evoclone.federated.snapshot import write_snapshot
    from evoclone.federated.tabular import EVENT_ID, records_from_frames

    try:
        ref = pd.read_csv(opts.server_eval)
    except (FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TrainInputError(f"--server-eval {opts.server_eval}: not a readable CSV ({exc})") from None
    ref = ref.drop(columns=[opts.site_column], errors="ignore")
    try:
        table = records_from_frames(ref, None, treatment=opts.treatment, outcome=opts.outcome, covariates=covariates,
                                    id_column=opts.id_column or (EVENT_ID if EVENT_ID in ref.columns else None),
                                    site="coordinator", source=str(opts.server_eval))
    except ValueError as exc:
        raise TrainInputError(str(exc).splitlines()[0]) from None
    path = study / "coordinator" / "server-eval.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_snapshot(path, table.records, site="coordinator")
    return path


def _merge_model_dir(src: Path, dst: Path) -> None:
    """Copy one model's component files into the output directory and merge the manifests."""
    from evoclone.federated.artifacts import MANIFEST, read_manifest

    if not (src / MANIFEST).is_file():
        raise RuntimeError(f"the federated run wrote no model ({src}); see the logs under {src.parent}")
    theirs = read_manifest(src)
    for f in src.iterdir():
        if f.name != MANIFEST:
            shutil.copy2(f, dst / f.name)
    if (dst / MANIFEST).is_file():
        mine = read_manifest(dst)
        mine["components"].update(theirs["components"])
        theirs = mine
    (dst / MANIFEST).write_text(json.dumps(theirs, indent=1) + "\n")


def _site_summary(parts: list[SitePart], results: dict) -> list[dict]:
    from evoclone.federated.stores.ledger import SqlLedgerStore

    out = []
    for p in parts:
        store = SqlLedgerStore(url=p.settings.db_url)
        try:
            ledger = store.stored()
        finally:
            store.close()
        out.append({"name": p.name, "patients": p.rows, "train_rows": p.train_rows,
                    "epsilon_budget": p.settings.epsilon_budget, "delta": p.settings.delta,
                    "epsilon_spent": round(ledger.spent(), 4) if ledger else 0.0,
                    "rounds_trained": {m: sum(1 for r in res["rounds"] for x in r["participation"]
                                              if x["site"] == p.name and x["status"] == "ok")
                                       for m, res in results.items()}})
    return out
