"""Site-side operations the CLI and the demo call: ingest an extract, export a snapshot."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path

from evoclone.federated.snapshot import write_snapshot
from evoclone.privacy.pseudonym import Pseudonymizer

from .ingest import read_extract
from .keyring import Keyring, load_keyring, next_key_id, save_keyring
from .settings import SiteSettings, get_settings, load_key
from .store import RecordPayload, SiteStore


def open_store(settings: SiteSettings) -> SiteStore:
    """The site's store with its keyring and content-MAC key."""
    mac_key = hmac.new(load_key(settings), b"evoclone content mac", hashlib.sha256).digest()
    return SiteStore(url=settings.db_url, keyring=load_keyring(settings.site_dir), mac_key=mac_key)


def rotate_master_key(*, site_dir: Path) -> dict[str, object]:
    """Add a new master key, re-wrap every data key with it, then drop the old versions.

    Crash-safe order: the keyring holds both versions before the database changes, and
    loses the old ones only after the re-wrap committed.
    """
    from evoclone.privacy.envelope import new_key

    settings = get_settings(site_dir)
    old = load_keyring(site_dir)
    new_id = next_key_id(old)
    both = Keyring(keys={**old.keys, new_id: new_key()}, active=new_id)
    save_keyring(site_dir, both)
    store = open_store(settings)
    try:
        n = store.rewrap_data_keys(new_keyring=both)
    finally:
        store.close()
    save_keyring(site_dir, Keyring(keys={new_id: both.keys[new_id]}, active=new_id))
    return {"active": new_id, "rewrapped_data_keys": n, "retired": sorted(old.keys)}


def ingest_extract(*, site_dir: Path, patients_csv: Path, events_csv: Path | None,
                   mapping_file: Path | None = None, allow_partial: bool = False,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, object]:
    """Validate, anonymize and store one CSV extract atomically; returns counts and rejected rows.
    `progress(phase, done, total)` is told how far each phase got (bytes of events validated, patients stored)."""
    from .ingest import load_mapping

    settings = get_settings(site_dir)
    records, issues = read_extract(patients_csv, events_csv, site=settings.name,
                                   pseudonymizer=Pseudonymizer(key=load_key(settings)),
                                   mapping=load_mapping(mapping_file), allow_partial=allow_partial,
                                   progress=progress)
    with records:
        counts = _store(settings, records.payloads(), quarantine=[(i.source, i.location, i.field, i.reason) for i in issues],
                        progress=None if progress is None else (lambda n: progress("storing patients", n, len(records))))
    return {**counts, "rejected": len(issues), "errors": [vars(i) for i in issues]}


def ingest_fhir(*, site_dir: Path, paths: list[Path]) -> dict[str, object]:
    """Validate, anonymize and store FHIR Bundles / NDJSON atomically."""
    from .fhir import read_fhir

    settings = get_settings(site_dir)
    result = read_fhir(paths, site=settings.name, pseudonymizer=Pseudonymizer(key=load_key(settings)))
    return {**_store(settings, result.records), "skipped_resources": dict(result.skipped)}


def ingest_omop(*, site_dir: Path, paths: list[Path]) -> dict[str, object]:
    """Validate, anonymize and store an OMOP CDM CSV export atomically."""
    from .omop import read_omop

    settings = get_settings(site_dir)
    return _store(settings, read_omop(paths, site=settings.name, pseudonymizer=Pseudonymizer(key=load_key(settings))))


def _store(settings: SiteSettings, records, quarantine=(), progress: Callable[[int], None] | None = None
           ) -> dict[str, int]:
    import uuid

    from evoclone.federated.stores.eventlog import open_event_log

    batch = uuid.uuid4().hex
    store = open_store(settings)
    tally = {"records": 0, "events": 0}

    def counted(items):
        for r in items:
            r = RecordPayload.of(r)
            tally["records"] += 1
            tally["events"] += r.n_events
            if progress is not None and tally["records"] % 1000 == 0:
                progress(tally["records"])
            yield r
        if progress is not None:
            progress(tally["records"])

    try:
        quarantine = list(quarantine)
        written = store.upsert_records(records=counted(records), quarantine=quarantine, batch=batch)
        log = open_event_log(settings.event_log_url)
        try:  # an aggregate, identifier-free trace of the batch
            log.append(kind="ingest", document={"batch": batch, "records": tally["records"], "written": written,
                                                "quarantined": len(quarantine), "events": tally["events"]})
        finally:
            log.close()
        return {"accepted": tally["records"], "written": written, **store.counts()}
    finally:
        store.close()


def export_snapshot(*, site_dir: Path, out: Path | None = None) -> Path:
    """Write every stored (anonymized) record into the training snapshot the ClientApp reads, and the clinicians'
    verdicts on twins into the feedback file beside it (federated.feedback)."""
    from evoclone.federated.feedback import feedback_path

    from .review import write_feedback

    settings = get_settings(site_dir)
    store = open_store(settings)
    try:
        records = store.records()
        if not records:
            raise ValueError(f"site {settings.name} has no patients; ingest an extract first")
        path = out or settings.snapshot_path
        write_snapshot(path, records, site=settings.name)
        write_feedback(engine=store.engine, keyring=store.keyring, path=feedback_path(path))
    finally:
        store.close()
    return path
