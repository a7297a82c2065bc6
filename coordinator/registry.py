"""The model registry: signed versions with lineage, canary rollouts, promotion and rollback.

Weights and vocabularies go to the object store keyed by their sha256 (written before the
database transaction commits: content-addressed, so a failed registration leaves at most an
unreferenced object, never a row without its files). Every status change happens in the
caller's transaction; the caller audits and commits.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import Session, func, select

from evoclone.federated.payloads import CanaryValidation
from evoclone.federated.signature import MANIFEST, SIGNATURE, SIGNATURE_FORMAT, SignatureError, check_file, \
    manifest_files
from evoclone.federated.stores.objects import LocalObjectStore, MinioObjectStore, ObjectStore

from .audit import append_event
from .errors import Conflict, CoordinatorError, InvalidInput, NotFound
from .models import Run, Site, SiteStatus, Study, StudyStatus
from .registry_models import CanaryReport, CanaryReportPublic, Lineage, ModelStatus, ModelVersion, Rollout, \
    RolloutPublic, SiteAssignment
from .settings import CoordinatorSettings, get_settings
from .signing import load_key, sign

# federated.artifacts.FORMAT and COMPONENTS, not imported from there: that module loads torch.
MODEL_FORMAT = "evoclone-model/2"
COMPONENTS = ("predictor", "generator")
OBJECT_PREFIX = "models/sha256/"
EPS = 1e-12  # a candidate exactly `margin` worse is not "worse by more than the margin" despite rounding


@dataclass(frozen=True)
class Upload:
    """One uploaded file of a model directory."""

    name: str
    data: bytes


@dataclass
class Transition:
    """What one registry call changed: the version, its rollout, and the versions retired or restored."""

    version: ModelVersion
    rollout: Rollout | None = None
    retired: ModelVersion | None = None
    restored: ModelVersion | None = None
    report: CanaryReport | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def object_store(settings: CoordinatorSettings) -> ObjectStore:
    """The configured object store: MinIO when an endpoint is set, else the state directory's objects/."""
    if settings.minio_endpoint:
        return MinioObjectStore(endpoint=settings.minio_endpoint, access_key=settings.minio_access_key,
                                secret_key=settings.minio_secret_key.get_secret_value(),
                                bucket=settings.minio_bucket, secure=settings.minio_secure)
    return LocalObjectStore(root=settings.objects_root)


def _json(raw: bytes, what: str) -> Any:
    """Parse JSON; NaN and infinities become null (PostgreSQL's JSON type rejects them)."""
    try:
        return json.loads(raw, parse_constant=lambda _c: None)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what}: not valid JSON ({exc.__class__.__name__}); upload the file training wrote") \
            from None


def parse_manifest(raw: bytes) -> dict:
    """A model manifest (evoclone-model/2) that names its files well; InvalidInput otherwise."""
    manifest = _json(raw, "manifest")
    if not isinstance(manifest, dict):
        raise InvalidInput("manifest: not a JSON object; upload the manifest.json of a model directory")
    if manifest.get("format") != MODEL_FORMAT:
        raise InvalidInput(f"manifest: format is {manifest.get('format')!r}, expected {MODEL_FORMAT!r}; upload a "
                           "directory written by `evoclone train` or `evoclone twins train`")
    try:
        manifest_files(manifest)
    except SignatureError as exc:
        raise InvalidInput(f"manifest: {exc}") from None
    for name, entry in manifest["components"].items():
        if name not in COMPONENTS or not isinstance(entry.get("kind"), str):
            raise InvalidInput(f"manifest: component {name!r} must be one of {', '.join(COMPONENTS)} with a kind")
    return manifest


def _check_uploads(manifest: dict, uploads: list[Upload]) -> None:
    expected = manifest_files(manifest)
    names = [u.name for u in uploads]
    if len(set(names)) != len(names):
        raise InvalidInput("files: a file name appears twice; upload each file of the model directory once")
    extra, missing = sorted(set(names) - set(expected)), sorted(set(expected) - set(names))
    if extra:
        raise InvalidInput(f"files: {', '.join(extra)} not named by the manifest; upload only its weights and "
                           "vocabulary files")
    if missing:
        raise InvalidInput(f"files: {', '.join(missing)} missing; upload every file the manifest names")
    for up in uploads:
        check, digest = expected[up.name]
        try:
            check_file(up.name, up.data, check, digest)
        except SignatureError:
            what = "sha256" if check == "sha256" else "vocabulary hash"
            raise InvalidInput(f"files: {up.name}: its {what} differs from the manifest; upload the files the "
                               "manifest was written with") from None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def lineage_of(manifest: dict, training: dict | None, *, study_id: int, run_id: int | None) -> Lineage:
    """Lineage from the manifest's components (and training.json, whose ledger totals win for epsilon)."""
    comps: dict[str, dict] = manifest["components"]
    eps: dict[str, float | None] = {}
    for entry in comps.values():
        for s in entry.get("sites") or []:
            if isinstance(s, dict) and isinstance(s.get("name"), str):
                e, prior = _num(s.get("epsilon")), eps.get(s["name"])
                # each component records the site's cumulative ledger: the largest is the latest
                eps[s["name"]] = e if prior is None else prior if e is None else max(prior, e)
    for s in (training or {}).get("sites") or []:
        if isinstance(s, dict) and isinstance(s.get("name"), str) and _num(s.get("epsilon_spent")) is not None:
            eps[s["name"]] = _num(s["epsilon_spent"])
    deltas = [d for d in (_num(e.get("delta")) for e in comps.values()) if d is not None]
    return Lineage(
        study_id=study_id, run_id=run_id,
        run_keys=sorted({e["run_key"] for e in comps.values() if isinstance(e.get("run_key"), str)}),
        rounds={n: _int(e.get("rounds")) for n, e in comps.items()},
        best_round={n: _int(e.get("best_round")) for n, e in comps.items()},
        sites=sorted(eps), epsilon_per_site=eps, delta=max(deltas) if deltas else None,
        data_fingerprints=sorted({e["data_fingerprint"] for e in comps.values()
                                  if isinstance(e.get("data_fingerprint"), str)}),
        metrics={n: e["metrics"] for n, e in comps.items() if isinstance(e.get("metrics"), dict)})


def register_model(*, session: Session, store: ObjectStore, key: Ed25519PrivateKey, study_id: int,
                   run_id: int | None, manifest_raw: bytes, uploads: list[Upload], training_raw: bytes | None,
                   created_by: str) -> ModelVersion:
    """Check every file against the manifest, sign the manifest, store the files, add version v<n> of the study."""
    study = session.get(Study, study_id, with_for_update=True)  # serialises version numbers per study
    if study is None:
        raise NotFound(f"study {study_id} does not exist; list studies with GET /api/v1/studies")
    if study.status == StudyStatus.closed:
        raise Conflict(f"study {study_id} is closed; register models in an open study")
    if run_id is not None:
        run = session.get(Run, run_id)
        if run is None or run.study_id != study_id:
            raise InvalidInput(f"run_id: run {run_id} is not a run of study {study_id}; list its runs first")
    manifest = parse_manifest(manifest_raw)
    _check_uploads(manifest, uploads)
    training = _json(training_raw, "training") if training_raw is not None else None
    if training is not None and not isinstance(training, dict):
        raise InvalidInput("training: not a JSON object; upload the training.json `evoclone train` wrote")
    signed = sign(key, manifest)
    dup = session.exec(select(ModelVersion).where(ModelVersion.study_id == study_id,
                                                  ModelVersion.manifest_sha256 == signed.digest)).first()
    if dup is not None:
        raise Conflict(f"this model is already registered as {dup.id}; a version is registered once")
    number = (session.exec(select(func.max(ModelVersion.number)).where(ModelVersion.study_id == study_id)).one()
              or 0) + 1
    files = {}
    for up in uploads:
        digest = hashlib.sha256(up.data).hexdigest()
        object_key = OBJECT_PREFIX + digest
        if not store.exists(object_key):
            store.put(object_key, up.data)
        files[up.name] = {"sha256": digest, "bytes": len(up.data), "key": object_key}
    version = ModelVersion(
        id=f"s{study_id}-v{number}", study_id=study_id, run_id=run_id, version=f"v{number}", number=number,
        components={n: e["kind"] for n, e in manifest["components"].items()}, manifest=manifest,
        manifest_canonical=signed.canonical.decode("ascii"), manifest_sha256=signed.digest,
        signature=signed.signature, key_fingerprint=signed.key_fingerprint, files=files,
        lineage=lineage_of(manifest, training, study_id=study_id, run_id=run_id).model_dump(), created_by=created_by)
    session.add(version)
    session.flush()
    return version


def register_run_model(*, session: Session, run: Run, model_dir: Path,
                       settings: CoordinatorSettings | None = None) -> ModelVersion:
    """Register the model a finished run wrote (the dispatcher's hook); audited and committed here.

    A model the registry refuses is audited as rejected and the domain error re-raised.
    """
    settings = settings or get_settings()
    actor = f"coordinator:run/{run.id}"
    try:
        manifest_raw = (model_dir / MANIFEST).read_bytes()
        names = manifest_files(parse_manifest(manifest_raw))
        uploads = [Upload(name, (model_dir / name).read_bytes()) for name in names if (model_dir / name).is_file()]
        training = model_dir / "training.json"
        version = register_model(session=session, store=object_store(settings), key=load_key(settings),
                                 study_id=run.study_id, run_id=run.id, manifest_raw=manifest_raw, uploads=uploads,
                                 training_raw=training.read_bytes() if training.is_file() else None,
                                 created_by=actor)
    except (CoordinatorError, SignatureError, OSError) as exc:
        session.rollback()
        append_event(session=session, action="model.register", outcome="rejected", actor=actor,
                     resource=f"run/{run.id}", detail={"study_id": run.study_id, "reason": str(exc)[:300]})
        session.commit()
        raise
    append_event(session=session, action="model.register", outcome="ok", actor=actor, resource=f"model/{version.id}",
                 detail={"study_id": version.study_id, "run_id": run.id, "manifest_sha256": version.manifest_sha256,
                         "key_fingerprint": version.key_fingerprint, "files": sorted(version.files)})
    session.commit()
    return version


def list_models(*, session: Session, study_id: int | None = None, status: ModelStatus | None = None,
                offset: int = 0, limit: int = 100) -> list[ModelVersion]:
    """Versions by study and number (optionally one study or one status)."""
    query = select(ModelVersion).order_by(ModelVersion.study_id, ModelVersion.number).offset(offset).limit(limit)
    if study_id is not None:
        query = query.where(ModelVersion.study_id == study_id)
    if status is not None:
        query = query.where(ModelVersion.status == status)
    return list(session.exec(query).all())


def get_model(*, session: Session, model_id: str, lock: bool = False) -> ModelVersion:
    """The version `model_id` (s<study>-v<n>); NotFound otherwise."""
    version = session.get(ModelVersion, model_id, with_for_update=lock)
    if version is None:
        raise NotFound(f"model {model_id} does not exist; list models with GET /api/v1/models")
    return version


def _open_rollout(session: Session, version_id: str) -> Rollout | None:
    return session.exec(select(Rollout).where(Rollout.version_id == version_id, Rollout.decision.is_(None))
                        .with_for_update()).first()


def start_canary(*, session: Session, model_id: str, sites: list[str], margin: float,
                 started_by: str) -> Transition:
    """Send a registered version to `sites` (active, in its study) first; the rest keep the promoted one."""
    version = get_model(session=session, model_id=model_id, lock=True)
    if version.status != ModelStatus.registered:
        raise Conflict(f"model {model_id} is {version.status.value}; only a registered version can start a canary")
    busy = session.exec(select(ModelVersion).where(ModelVersion.study_id == version.study_id,
                                                   ModelVersion.status == ModelStatus.canary)).first()
    if busy is not None:
        raise Conflict(f"model {busy.id} of study {version.study_id} is already in canary; promote or roll it back "
                       "first")
    known = {s.name: s for s in session.exec(select(Site).where(Site.name.in_(sites))).all()}
    missing = [s for s in sites if s not in known]
    if missing:
        raise InvalidInput(f"sites: {', '.join(missing)} not enrolled; list sites with GET /api/v1/sites")
    inactive = [f"{s} ({known[s].status.value})" for s in sites if known[s].status != SiteStatus.active]
    if inactive:
        raise InvalidInput(f"sites: only active sites can run a canary, not {', '.join(inactive)}")
    study = session.get(Study, version.study_id)
    outside = [s for s in sites if known[s].id not in study.site_ids]
    if outside:
        raise InvalidInput(f"sites: {', '.join(outside)} do not take part in study {study.id}; choose among its sites")
    rollout = Rollout(version_id=version.id, study_id=version.study_id, sites=list(sites), margin=margin,
                      started_by=started_by)
    version.status, version.updated_at = ModelStatus.canary, _now()
    session.add_all([rollout, version])
    session.flush()
    return Transition(version, rollout)


def _promote(session: Session, version: ModelVersion) -> ModelVersion | None:
    """Make `version` the study's promoted one; the one it replaces is retired (and returned)."""
    retired = None
    for current in session.exec(select(ModelVersion).where(ModelVersion.study_id == version.study_id,
                                                           ModelVersion.status == ModelStatus.promoted,
                                                           ModelVersion.id != version.id).with_for_update()).all():
        current.status, current.updated_at = ModelStatus.retired, _now()
        session.add(current)
        retired = current
    version.previous_id = retired.id if retired is not None else version.previous_id
    version.status, version.promoted_at = ModelStatus.promoted, _now()
    version.updated_at = version.promoted_at
    session.add(version)
    return retired


def _close(session: Session, rollout: Rollout | None, decision: str, by: str, summary: dict | None = None) -> None:
    if rollout is None:
        return
    rollout.decision, rollout.decided_by, rollout.decided_at = decision, by, _now()
    if summary is not None:
        rollout.summary = summary
    session.add(rollout)


def _verdict(reports: list[CanaryReport], margin: float) -> dict:
    """Per-site and mean differences (candidate - current); sites worse by more than the margin."""
    compared = {r.site: (r.candidate, r.current) for r in reports if r.current is not None}
    deltas = {s: cand - cur for s, (cand, cur) in compared.items()}
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"metric": reports[0].metric, "margin": margin,
            "deltas": {s: round(d, 6) for s, d in sorted(deltas.items())},
            "worse_sites": sorted(s for s, d in deltas.items() if d < -margin - EPS),
            "mean_candidate": mean([r.candidate for r in reports]),
            "mean_current": mean([c for _, c in compared.values()]),
            "mean_delta": mean(list(deltas.values()))}


def record_report(*, session: Session, model_id: str, site: str, report: CanaryValidation) -> Transition:
    """Store a canary site's report; once every canary site has reported, promote or roll back automatically."""
    if report.version_id != model_id:
        raise InvalidInput(f"version_id: the report is about {report.version_id!r} but was sent for {model_id}; "
                           f"post it to /api/v1/models/{report.version_id}/validation")
    if report.site != site:
        raise InvalidInput(f"site: the report names {report.site!r} but the token belongs to site {site!r}")
    version = get_model(session=session, model_id=model_id, lock=True)
    rollout = _open_rollout(session, model_id) if version.status == ModelStatus.canary else None
    if rollout is None:
        raise Conflict(f"model {model_id} is {version.status.value}, not in canary; reports are taken only while "
                       "its canary runs")
    if site not in rollout.sites:
        raise Conflict(f"site {site!r} is not a canary site of {model_id} ({', '.join(rollout.sites)}); only they "
                       "report")
    reports = list(session.exec(select(CanaryReport).where(CanaryReport.rollout_id == rollout.id)).all())
    if any(r.site == site for r in reports):
        raise Conflict(f"site {site!r} already reported on {model_id}; one report per site and canary")
    if reports and reports[0].metric != report.metric:
        raise InvalidInput(f"metric: this canary compares {reports[0].metric}, not {report.metric}; report "
                           f"{reports[0].metric}")
    row = CanaryReport(rollout_id=rollout.id, site=site, metric=report.metric, candidate=report.candidate,
                       current=report.current, patients=report.patients, sent_at=report.sent_at)
    session.add(row)
    session.flush()
    reports.append(row)
    change = Transition(version, rollout, report=row)
    if len(reports) < len(rollout.sites):
        return change
    verdict = _verdict(reports, rollout.margin)
    if verdict["worse_sites"]:
        version.status, version.updated_at = ModelStatus.rolled_back, _now()
        session.add(version)
        _close(session, rollout, ModelStatus.rolled_back.value, "automatic", verdict)
    else:
        change.retired = _promote(session, version)
        _close(session, rollout, ModelStatus.promoted.value, "automatic", verdict)
    session.flush()
    return change


def promote(*, session: Session, model_id: str, by: str) -> Transition:
    """Promote a version to every site by hand (ending its canary); the promoted one before it is retired."""
    version = get_model(session=session, model_id=model_id, lock=True)
    if version.status == ModelStatus.rolled_back:
        raise Conflict(f"model {model_id} was rolled back and cannot be promoted; register a new version instead")
    if version.status == ModelStatus.promoted:
        raise Conflict(f"model {model_id} is already the promoted version of study {version.study_id}")
    rollout = _open_rollout(session, model_id)
    _close(session, rollout, ModelStatus.promoted.value, by)
    retired = _promote(session, version)
    session.flush()
    return Transition(version, rollout, retired=retired)


def rollback(*, session: Session, model_id: str, by: str) -> Transition:
    """Roll back a canary (sites keep the promoted version) or the promoted version (its predecessor returns)."""
    version = get_model(session=session, model_id=model_id, lock=True)
    if version.status not in (ModelStatus.canary, ModelStatus.promoted):
        raise Conflict(f"model {model_id} is {version.status.value}; only a canary or the promoted version can be "
                       "rolled back")
    change = Transition(version)
    if version.status == ModelStatus.canary:
        change.rollout = _open_rollout(session, model_id)
        _close(session, change.rollout, ModelStatus.rolled_back.value, by)
    elif version.previous_id is not None:
        previous = session.get(ModelVersion, version.previous_id, with_for_update=True)
        if previous is not None and previous.status == ModelStatus.retired:
            previous.status, previous.promoted_at = ModelStatus.promoted, _now()
            previous.updated_at = previous.promoted_at
            session.add(previous)
            change.restored = previous
    version.status, version.updated_at = ModelStatus.rolled_back, _now()
    session.add(version)
    session.flush()
    return change


def rollouts_of(*, session: Session, version_id: str) -> list[RolloutPublic]:
    """A version's rollouts with their reports, newest first."""
    out = []
    for r in session.exec(select(Rollout).where(Rollout.version_id == version_id).order_by(Rollout.id.desc())).all():
        reports = session.exec(select(CanaryReport).where(CanaryReport.rollout_id == r.id)
                               .order_by(CanaryReport.id)).all()
        out.append(RolloutPublic.model_validate(r, update={
            "reports": [CanaryReportPublic.model_validate(x) for x in reports]}))
    return out


def get_site_by_name(*, session: Session, name: str) -> Site:
    """The site called `name`; NotFound otherwise."""
    site = session.exec(select(Site).where(Site.name == name)).first()
    if site is None:
        raise NotFound(f"site {name!r} is not enrolled; list sites with GET /api/v1/sites")
    return site


def _studies_of(session: Session, site: Site, study_id: int | None) -> list[Study]:
    query = select(Study).where(Study.status != StudyStatus.closed).order_by(Study.id)
    if study_id is not None:
        query = query.where(Study.id == study_id)
    return [s for s in session.exec(query).all() if site.id in s.site_ids]


def site_assignments(*, session: Session, site: Site, study_id: int | None = None) -> list[SiteAssignment]:
    """For each open study of the site: the canary version if the site is a canary site, else the promoted one."""
    out = []
    for study in _studies_of(session, site, study_id):
        chosen, channel = None, ""
        canary = session.exec(select(ModelVersion).where(ModelVersion.study_id == study.id,
                                                         ModelVersion.status == ModelStatus.canary)).first()
        if canary is not None:
            rollout = session.exec(select(Rollout).where(Rollout.version_id == canary.id,
                                                         Rollout.decision.is_(None))).first()
            if rollout is not None and site.name in rollout.sites:
                chosen, channel = canary, "canary"
        if chosen is None:
            chosen = session.exec(select(ModelVersion).where(ModelVersion.study_id == study.id,
                                                             ModelVersion.status == ModelStatus.promoted)).first()
            channel = "promoted"
        if chosen is not None:
            out.append(SiteAssignment(site=site.name, study_id=study.id, channel=channel, version_id=chosen.id,
                                      manifest_sha256=chosen.manifest_sha256, key_fingerprint=chosen.key_fingerprint,
                                      download=f"/api/v1/models/{chosen.id}/download"))
    return out


def site_may_fetch(*, session: Session, site: Site, version: ModelVersion) -> bool:
    """Whether a site may download a version: promoted in one of its studies, or a canary it takes part in."""
    if not _studies_of(session, site, version.study_id):
        return False
    if version.status == ModelStatus.promoted:
        return True
    rollout = session.exec(select(Rollout).where(Rollout.version_id == version.id,
                                                 Rollout.decision.is_(None))).first()
    return version.status == ModelStatus.canary and rollout is not None and site.name in rollout.sites


def bundle(*, store: ObjectStore, version: ModelVersion) -> bytes:
    """The signed download: a tar of manifest.json (the signed bytes), the files it names, and signature.json."""
    signature = {"format": SIGNATURE_FORMAT, "algorithm": "Ed25519", "version_id": version.id,
                 "study_id": version.study_id, "manifest_sha256": version.manifest_sha256,
                 "signature": version.signature, "key_fingerprint": version.key_fingerprint}
    members = [(MANIFEST, version.manifest_canonical.encode("ascii"))]
    for name, meta in sorted(version.files.items()):
        try:
            data = store.get(meta["key"])
        except KeyError:
            raise Conflict(f"model {version.id}: {name} is missing from the object store ({meta['key']}); restore "
                           "the object store from its backup") from None
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise Conflict(f"model {version.id}: {name} in the object store differs from its registered sha256; "
                           "restore the object store from its backup")
        members.append((name, data))
    members.append((SIGNATURE, json.dumps(signature, indent=1, sort_keys=True).encode()))
    buf = io.BytesIO()
    created = version.created_at
    mtime = int((created if created.tzinfo else created.replace(tzinfo=timezone.utc)).timestamp())
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
