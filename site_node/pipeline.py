"""Site-side operations the CLI and the demo call: ingest an extract, export a snapshot."""

from __future__ import annotations

from pathlib import Path

from evoclone.federated.features import FeatureSpec, encode_cohort
from evoclone.federated.snapshot import write_snapshot
from evoclone.privacy.pseudonym import Pseudonymizer

from .ingest import read_extract
from .settings import get_settings, load_key
from .store import SiteStore


def ingest_extract(*, site_dir: Path, patients_csv: Path, events_csv: Path | None) -> dict[str, int]:
    """Validate, anonymize and store one extract atomically; returns the store's counts."""
    settings = get_settings(site_dir)
    records = read_extract(patients_csv, events_csv, site=settings.name,
                           pseudonymizer=Pseudonymizer(key=load_key(settings)))
    store = SiteStore(url=settings.db_url)
    try:
        written = store.upsert_records(records=records)
        return {"accepted": len(records), "written": written, **store.counts()}
    finally:
        store.close()


def export_snapshot(*, site_dir: Path, out: Path | None = None, spec: FeatureSpec | None = None) -> Path:
    """Encode every stored record into the training snapshot the ClientApp reads."""
    settings = get_settings(site_dir)
    spec = spec or FeatureSpec()
    store = SiteStore(url=settings.db_url)
    try:
        records = store.records()
    finally:
        store.close()
    if not records:
        raise ValueError(f"site {settings.name} has no patients; ingest an extract first")
    path = out or settings.snapshot_path
    write_snapshot(path, encode_cohort(records, spec), spec=spec, site=settings.name)
    return path
