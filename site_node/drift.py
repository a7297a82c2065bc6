"""The site's drift report: its current data against the training reference it keeps, aggregates only.

The training reference is taken from the training snapshot (what the model was trained on):
per-feature values and outcomes, in no particular order and without pseudonyms, sealed with
AES-256-GCM under a key derived from the site's secret key (not a master-key version, so a
master-key rotation never orphans it) in `drift-reference.json` (mode 0600). It never leaves
the site; the report does, built by `federated.drift` with every small cell suppressed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from evoclone.federated.drift import categorical_drift, is_missing, numeric_drift, outcome_rate
from evoclone.federated.payloads import MAX_ITEMS, MIN_COUNT, DriftReport, identifier_kind, round_count
from evoclone.federated.record import PatientRecord
from evoclone.privacy.envelope import open_sealed, seal

from .compliance import report_key, sign
from .settings import SiteSettings, get_settings, load_key

REFERENCE_FILE = "drift-reference.json"
FORMAT = "evoclone-drift-reference/1"
HISTORY_DAYS = 730.0  # a lab feature is the latest value in this window before the index date
FEATURE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")


@dataclass
class DriftReference:
    """Per-feature values and outcomes of the training data (patient-level: kept sealed at the site)."""

    reference_id: str
    created_at: str
    patients: int
    kinds: dict[str, str]  # feature -> numeric | categorical
    features: dict[str, list] = field(default_factory=dict)
    outcomes: dict[str, list] = field(default_factory=dict)
    withheld: int = 0  # features whose name reads like an identifier or breaks the name rules


def _lab_values(record: PatientRecord) -> dict[str, float]:
    """The latest valued event of each code within the history window before the index."""
    out: dict[str, float] = {}
    for e in record.history(until=0.0):
        if e.value is not None and e.time >= -HISTORY_DAYS:
            out[e.code] = e.value
    return out


def _columns(records: list[PatientRecord]) -> dict[str, list]:
    """Every candidate feature as a column over the records: baseline covariates, then `lab:<code>`."""
    labs = [_lab_values(r) for r in records]
    names = list(dict.fromkeys(k for r in records for k in r.baseline))
    cols = {n: [r.baseline.get(n) for r in records] for n in names}
    for code in sorted({c for lv in labs for c in lv}):
        cols[f"lab:{code}"] = [lv.get(code) for lv in labs]
    return cols


def _outcomes(records: list[PatientRecord]) -> dict[str, list]:
    return {"binary": [r.outcomes.binary for r in records],
            "event": [None if r.outcomes.event is None else int(r.outcomes.event) for r in records]}


def _kind(values: list) -> str:
    seen = [v for v in values if not is_missing(v)]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seen)
    return "numeric" if numeric and not all(v in (0, 1) for v in seen) else "categorical"


def build_reference(records: list[PatientRecord], *, min_count: int = MIN_COUNT) -> DriftReference:
    """The reference of the training records: features observed in at least `min_count` of them."""
    if not records:
        raise ValueError("a drift reference needs the training records; export a snapshot with patients first")
    kinds: dict[str, str] = {}
    features: dict[str, list] = {}
    withheld = 0
    for name, values in _columns(records).items():
        if sum(not is_missing(v) for v in values) < min_count:
            continue
        if not FEATURE_NAME.match(name) or identifier_kind(name) is not None:
            withheld += 1  # the coordinator's egress guard would refuse the whole report for this name
            continue
        kinds[name], features[name] = _kind(values), values
        if len(kinds) == MAX_ITEMS:
            break
    return DriftReference(reference_id=uuid.uuid4().hex, created_at=datetime.now(timezone.utc).isoformat(),
                          patients=len(records), kinds=kinds, features=features, outcomes=_outcomes(records),
                          withheld=withheld)


def _sealing_key(settings: SiteSettings) -> bytes:
    return hmac.new(load_key(settings), b"evoclone drift reference", hashlib.sha256).digest()


def save_reference(*, site_dir: Path, reference: DriftReference) -> Path:
    """Seal and write the reference atomically (mode 0600), replacing the previous one."""
    settings = get_settings(Path(site_dir))
    plain = json.dumps({"patients": reference.patients, "kinds": reference.kinds, "features": reference.features,
                        "outcomes": reference.outcomes, "withheld": reference.withheld}).encode()
    context = f"drift-reference:{reference.reference_id}".encode()
    doc = {"format": FORMAT, "reference_id": reference.reference_id, "created_at": reference.created_at,
           "sealed": base64.b64encode(seal(plain, data_key=_sealing_key(settings), context=context)).decode()}
    path = settings.site_dir / REFERENCE_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    return path


def load_reference(*, site_dir: Path) -> DriftReference:
    """The site's sealed training reference; a clear error when there is none or it was altered."""
    settings = get_settings(Path(site_dir))
    path = settings.site_dir / REFERENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; create the training reference with "
                                "site_node.drift.create_reference after exporting the training snapshot")
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by others; run `chmod 600 {path}`")
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} file; create the reference again")
    context = f"drift-reference:{doc['reference_id']}".encode()
    plain = json.loads(open_sealed(base64.b64decode(doc["sealed"]), data_key=_sealing_key(settings), context=context))
    return DriftReference(reference_id=doc["reference_id"], created_at=doc["created_at"], patients=plain["patients"],
                          kinds=plain["kinds"], features=plain["features"], outcomes=plain["outcomes"],
                          withheld=plain["withheld"])


def create_reference(*, site_dir: Path, records: list[PatientRecord] | None = None) -> dict:
    """Take the training reference from `records` (default: the exported training snapshot) and keep it sealed.

    Returns what may be shown: its id, patients rounded to tens and how many features it covers.
    """
    if records is None:
        from evoclone.federated.snapshot import read_snapshot

        records, _ = read_snapshot(get_settings(Path(site_dir)).snapshot_path)
    ref = build_reference(records)
    save_reference(site_dir=site_dir, reference=ref)
    return {"reference_id": ref.reference_id, "patients": round_count(ref.patients), "features": len(ref.kinds)}


def _current_records(settings: SiteSettings) -> list[PatientRecord]:
    from .pipeline import open_store

    store = open_store(settings)
    try:
        return store.records()
    finally:
        store.close()


def drift_report(*, site_dir: Path, records: list[PatientRecord] | None = None, study_id: int | None = None,
                 now: datetime | None = None) -> DriftReport:
    """The signed drift report of the site's current data (default: every stored record) against its reference."""
    settings = get_settings(Path(site_dir))
    ref = load_reference(site_dir=settings.site_dir)
    current = _current_records(settings) if records is None else records
    cols = _columns(current) if current else {}
    features = []
    for name, kind in ref.kinds.items():
        now_values = cols.get(name, [None] * len(current))
        if kind == "numeric":  # a value that is no longer a number counts as missing, not as a crash
            now_values = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in now_values]
            features.append(numeric_drift(name, ref.features[name], now_values))
        else:
            features.append(categorical_drift(name, ref.features[name], now_values))
    outcomes_now = _outcomes(current)
    outcomes = tuple(outcome_rate(name, ref.outcomes.get(name, []), outcomes_now[name]) for name in ("binary", "event"))
    report = DriftReport(site=settings.name, sent_at=now or datetime.now(timezone.utc), study_id=study_id,
                         reference_id=ref.reference_id, reference_count=round_count(ref.patients),
                         current_count=round_count(len(current)), features=tuple(features), outcomes=outcomes,
                         features_withheld=ref.withheld)
    return DriftReport.model_validate_json(sign(report, report_key(settings.site_dir)).model_dump_json())
