"""The site's signed compliance self-check, its report-signing key, and sending reports to the coordinator.

Each check reads the site's own state (key files, stores, settings) and answers pass or fail with a
reason from the closed vocabulary of `federated.payloads.CheckReason`; nothing patient-level is read
into the result. The report is signed with the site's Ed25519 report key (`report-signing.key`,
0600, created on first use), whose public half the coordinator pins at the first registration.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from evoclone.federated.payloads import (CHECK_IDS, CheckResult, ComplianceSelfCheck, ReportKeyRegistration,
                                         SitePayload, canonical_bytes)
from evoclone.privacy.accounting import epsilon_of

from .settings import SETTINGS_FILE, SiteSettings, get_settings

REPORT_KEY_FILE = "report-signing.key"
LEDGER_TOLERANCE = 1e-5  # the ledger stores epsilon_after rounded to 6 digits


class ReportSettings(BaseSettings):
    """What the reports need beyond SiteSettings: `site.json` keys (or EVOCLONE_ variables) of their own."""

    model_config = SettingsConfigDict(env_prefix="EVOCLONE_", extra="ignore")

    coordinator_url: str = ""  # https://coordinator.example.org:8443
    tls_ca_cert: Path | None = None  # the study CA that verifies the coordinator and the SuperLink
    retention_days: int | None = Field(None, ge=1, le=36_500)  # how long ingested data may be kept


def report_settings(site_dir: Path) -> ReportSettings:
    """The report settings of a site directory (environment variables win over site.json)."""
    path = Path(site_dir) / SETTINGS_FILE
    doc = json.loads(path.read_text()) if path.is_file() else {}
    keys = ReportSettings.model_fields
    values = {k: v for k, v in doc.items() if k in keys and f"EVOCLONE_{k.upper()}" not in os.environ}
    return ReportSettings(**values)


# --------------------------------------------------------------------------- the report key


def report_key(site_dir: Path) -> Ed25519PrivateKey:
    """The site's Ed25519 report-signing key, created (mode 0600) on first use; refused when others can read it."""
    path = Path(site_dir) / REPORT_KEY_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return report_key(site_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return key
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by others; run `chmod 600 {path}`")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key; move it away and a new one is created")
    return key


def public_key_hex(key: Ed25519PrivateKey) -> str:
    """The raw 32-byte public key as hex (what the coordinator pins)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_fingerprint(key: Ed25519PrivateKey) -> str:
    """sha256 of the raw public key, hex."""
    return hashlib.sha256(bytes.fromhex(public_key_hex(key))).hexdigest()


def sign(payload: SitePayload, key: Ed25519PrivateKey) -> SitePayload:
    """The payload with its key fingerprint and the Ed25519 signature of its canonical bytes."""
    unsigned = payload.model_copy(update={"key_fingerprint": key_fingerprint(key), "signature": None})
    return unsigned.model_copy(update={"signature": key.sign(canonical_bytes(unsigned)).hex()})


def key_registration(*, site_dir: Path, now: datetime | None = None) -> ReportKeyRegistration:
    """The payload that registers the site's report key with the coordinator."""
    settings = get_settings(Path(site_dir))
    return ReportKeyRegistration(site=settings.name, sent_at=now or datetime.now(timezone.utc),
                                 public_key=public_key_hex(report_key(settings.site_dir)))


def post_payload(payload: SitePayload, *, http: Any, path: str, token: str, method: str = "POST") -> Any:
    """Send a payload to the coordinator with an httpx-like client (its base URL set); returns the response.

    The body is exactly the payload's JSON: what the coordinator's egress guard validates.
    """
    return http.request(method, path, content=payload.model_dump_json().encode(),
                        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


# --------------------------------------------------------------------------- checks


def _exposed(path: Path) -> bool:
    return path.exists() and bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def _check_encryption(settings: SiteSettings, engine: sa.Engine) -> str:
    from .keyring import KEYRING_FILE, load_keyring

    site_dir = settings.site_dir
    if not (site_dir / KEYRING_FILE).is_file() or not settings.key_path.is_file():
        return "keyring_missing"
    if _exposed(site_dir / KEYRING_FILE) or _exposed(settings.key_path) or _exposed(site_dir / REPORT_KEY_FILE):
        return "key_file_exposed"
    ring = load_keyring(site_dir)
    insp = sa.inspect(engine)
    if insp.has_table("patient"):
        with engine.connect() as conn:
            keys = {r.id: r.master_id for r in conn.execute(sa.text("SELECT id, master_id FROM data_key"))}
            ids = [r[0] for r in conn.execute(sa.text("SELECT DISTINCT data_key_id FROM patient"))]
        if any(keys.get(i) not in ring.keys for i in ids):
            return "unwrapped_rows"  # a record whose data key no active master key can unwrap
    from .drift import REFERENCE_FILE

    if _exposed(settings.snapshot_path) or _exposed(site_dir / REFERENCE_FILE) or _exposed(site_dir / SETTINGS_FILE):
        return "file_exposed"
    return "ok"


def _check_tls(report: ReportSettings) -> str:
    if not report.coordinator_url or report.tls_ca_cert is None:
        return "not_configured"
    if not report.coordinator_url.lower().startswith("https://"):
        return "plaintext_url"
    if not Path(report.tls_ca_cert).is_file():
        return "ca_missing"
    try:
        cert = x509.load_pem_x509_certificate(Path(report.tls_ca_cert).read_bytes())
    except ValueError:
        return "ca_invalid"
    if cert.not_valid_after_utc < datetime.now(timezone.utc):
        return "ca_invalid"
    return "ok"


def _ledger(settings: SiteSettings) -> dict:
    from evoclone.federated.stores.ledger import SqlLedgerStore

    store = SqlLedgerStore(url=settings.db_url)
    try:
        return store.summary()
    finally:
        store.close()


def _check_budget(settings: SiteSettings, ledger: dict) -> str:
    if ledger["epsilon_budget"] is None:
        return "no_records"
    if (ledger["epsilon_budget"], ledger["delta"]) != (settings.epsilon_budget, settings.delta):
        return "budget_changed"
    return "ok" if ledger["epsilon_spent"] <= ledger["epsilon_budget"] + 1e-9 else "budget_exceeded"


def _check_ledger_chain(ledger: dict) -> str:
    """Each charge's stored epsilon must be what the accountant gives for the charges up to it: an edited,
    removed or reordered charge breaks every later one (the site keeps no separate hash chain)."""
    charges = ledger["charges"]
    if not charges:
        return "no_records"
    history: list[tuple[float, float, int]] = []
    for c in charges:
        history.append((c["noise_multiplier"], c["sample_rate"], c["steps"]))
        expected = epsilon_of(history, delta=ledger["delta"], accountant=ledger["accountant"])
        if abs(expected - c["epsilon_after"]) > LEDGER_TOLERANCE * max(1.0, expected):
            return "ledger_inconsistent"
    spent = ledger["epsilon_spent"]
    if abs(spent - charges[-1]["epsilon_after"]) > LEDGER_TOLERANCE * max(1.0, spent):
        return "ledger_inconsistent"
    return "ok"


def _expired(settings: SiteSettings, engine: sa.Engine, retention_days: int, now: datetime) -> bool:
    """Whether data older than the retention period is still kept (ingest batches, quarantine, snapshot)."""
    cutoff = now - timedelta(days=retention_days)
    insp = sa.inspect(engine)
    with engine.connect() as conn:
        stamps: list[Any] = []
        if insp.has_table("patient"):
            stamps += [r[0] for r in conn.execute(sa.text(
                "SELECT d.created_at FROM data_key d "
                "WHERE EXISTS (SELECT 1 FROM patient p WHERE p.data_key_id = d.id)"))]
        if insp.has_table("quarantine"):
            stamps += [r[0] for r in conn.execute(sa.text("SELECT created_at FROM quarantine"))]
    for s in stamps:
        at = s if isinstance(s, datetime) else datetime.fromisoformat(str(s))
        if (at if at.tzinfo else at.replace(tzinfo=timezone.utc)) < cutoff:
            return True
    snap = settings.snapshot_path
    return snap.is_file() and datetime.fromtimestamp(snap.stat().st_mtime, timezone.utc) < cutoff


def _check_apps(settings: SiteSettings) -> tuple[str, list[str]]:
    from .approvals import ApprovalStore

    store = ApprovalStore(url=settings.db_url)
    try:
        approved = sorted(a["fab_hash"] for a in store.list())
        last: dict[str, str] = {}
        for d in store.history():
            last[d["fab_hash"]] = d["action"]
    finally:
        store.close()
    if not approved:
        return "none_approved", []
    if any(last.get(h) != "approve" for h in approved):
        return "approval_log_inconsistent", approved
    return "ok", approved


def self_check(*, site_dir: Path, now: datetime | None = None) -> ComplianceSelfCheck:
    """Run every check on the site and return the signed self-check."""
    now = now or datetime.now(timezone.utc)
    settings = get_settings(Path(site_dir))
    report = report_settings(settings.site_dir)
    engine = sa.create_engine(settings.db_url)
    reasons: dict[str, str] = {}
    facts: dict[str, Any] = {"retention_days": report.retention_days}
    approved: list[str] = []
    try:
        checks = {
            "encryption_at_rest": lambda: _check_encryption(settings, engine),
            "transport_tls": lambda: _check_tls(report),
        }
        for cid, fn in checks.items():
            reasons[cid] = _guarded(fn)
        ledger = _guarded(lambda: _ledger(settings))
        if isinstance(ledger, dict):
            reasons["privacy_budget"] = _guarded(lambda: _check_budget(settings, ledger))
            reasons["audit_chain"] = _guarded(lambda: _check_ledger_chain(ledger))
            if ledger["epsilon_budget"] is not None:
                facts.update(epsilon_budget=float(ledger["epsilon_budget"]),
                             epsilon_spent=round(float(ledger["epsilon_spent"]), 3))
        else:
            reasons["privacy_budget"] = reasons["audit_chain"] = "check_failed"
        if report.retention_days is None:
            reasons["retention"] = "not_configured"
        else:
            expired = _guarded(lambda: _expired(settings, engine, report.retention_days, now))
            facts["expired_data"] = expired if isinstance(expired, bool) else None
            reasons["retention"] = "check_failed" if not isinstance(expired, bool) else \
                "expired_data_present" if expired else "ok"
        apps = _guarded(lambda: _check_apps(settings))
        if isinstance(apps, tuple):
            reasons["approved_apps"], approved = apps
        else:
            reasons["approved_apps"] = "check_failed"
    finally:
        engine.dispose()
    results = tuple(CheckResult(id=cid, passed=reasons[cid] in ("ok", "no_records"), reason=reasons[cid])
                    for cid in CHECK_IDS)
    key = report_key(settings.site_dir)
    unsigned = ComplianceSelfCheck.model_construct(
        site=settings.name, sent_at=now, kind="compliance_self_check", checks=results, approved_apps=tuple(approved),
        key_fingerprint=key_fingerprint(key), signature=None, expired_data=facts.get("expired_data"),
        retention_days=facts["retention_days"], epsilon_budget=facts.get("epsilon_budget"),
        epsilon_spent=facts.get("epsilon_spent"))
    # validated from its JSON, exactly as the coordinator will: nothing unchecked leaves the site
    return ComplianceSelfCheck.model_validate_json(sign(unsigned, key).model_dump_json())


def _guarded(fn: Any) -> Any:
    """A check's answer, or "check_failed" when the check itself could not run (the reason stays at the site)."""
    try:
        return fn()
    except (OSError, ValueError, sa.exc.SQLAlchemyError):
        return "check_failed"
