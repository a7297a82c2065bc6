"""The model registry: register signed versions, canary rollouts with site reports, promote, roll back, download."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Path, Query, Request, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool

from evoclone.federated.payloads import CanaryValidation

from ... import registry
from ...audit import append_event
from ...egress import EgressRejected, check_payload, record_rejection
from ...models import MAX_ID
from ...registry_models import CanaryReportPublic, ModelStatus, ModelVersion, ModelVersionDetail, \
    ModelVersionPublic, PublicKey, RolloutCreate, RolloutPublic, SiteAssignment
from ...signing import public_key_info
from ..deps import IdPath, ReaderUser, RequestId, SessionDep, SettingsDep, SponsorUser
from ..registry_deps import CallerDep, CurrentSite, ObjectsDep, SigningKeyDep

router = APIRouter(tags=["models"])

MAX_FILES = 16
ModelId = Annotated[str, Path(pattern=r"^s[0-9]{1,10}-v[0-9]{1,10}$", max_length=32,
                              description="a model version id, s<study>-v<n>", examples=["s1-v2"])]
_REPORT_FIELDS = set(CanaryValidation.model_fields)


def _audit(session, user_or_site: tuple[str, str], action: str, version: ModelVersion, rid: str,
           outcome: str = "ok", **detail) -> None:
    actor, role = user_or_site
    append_event(session=session, action=action, outcome=outcome, actor=actor, role=role,
                 resource=f"model/{version.id}", detail={"study_id": version.study_id, **detail}, request_id=rid)


def _audit_change(session, who: tuple[str, str], change: registry.Transition, rid: str) -> None:
    """The automatic or manual decision a call caused, and the versions it retired or restored."""
    v = change.version
    if v.status in (ModelStatus.promoted, ModelStatus.rolled_back):
        summary = change.rollout.summary if change.rollout is not None else {}
        decided = change.rollout.decided_by if change.rollout is not None else who[0]
        _audit(session, who, "model.promote" if v.status == ModelStatus.promoted else "model.rollback", v, rid,
               decided_by=decided, manifest_sha256=v.manifest_sha256,
               worse_sites=summary.get("worse_sites", []), mean_delta=summary.get("mean_delta"),
               retired=change.retired.id if change.retired else None,
               restored=change.restored.id if change.restored else None)


@router.post("/studies/{study_id}/models", response_model=ModelVersionPublic, status_code=status.HTTP_201_CREATED,
             responses={404: {"description": "unknown study"}, 409: {"description": "already registered"},
                        422: {"description": "a file differs from the manifest, or a bad manifest"}})
def register(study_id: IdPath, user: SponsorUser, session: SessionDep, store: ObjectsDep, key: SigningKeyDep,
             rid: RequestId,
             manifest: Annotated[UploadFile, File(description="manifest.json of the model directory")],
             files: Annotated[list[UploadFile], File(description="every weights and vocabulary file it names")],
             training: Annotated[UploadFile | None, File(description="training.json, when `evoclone train` "
                                                                     "wrote one")] = None,
             run_id: Annotated[int | None, Form(ge=1, le=MAX_ID, description="the run it came from")] = None,
             ) -> ModelVersion:
    """Register a model directory (multipart): every file is checked against the manifest, which is then signed."""
    if len(files) > MAX_FILES:
        raise HTTPException(422, f"files: at most {MAX_FILES} files; upload only what the manifest names")
    uploads = [registry.Upload(name=f.filename or "", data=f.file.read()) for f in files]
    version = registry.register_model(session=session, store=store, key=key, study_id=study_id, run_id=run_id,
                                      manifest_raw=manifest.file.read(), uploads=uploads,
                                      training_raw=training.file.read() if training is not None else None,
                                      created_by=user.username)
    _audit(session, (user.username, user.role), "model.register", version, rid, manifest_sha256=version.manifest_sha256,
           key_fingerprint=version.key_fingerprint, run_id=run_id, files=sorted(version.files))
    session.commit()
    return version


@router.get("/models", response_model=list[ModelVersionPublic])
def list_models(user: ReaderUser, session: SessionDep,
                study: Annotated[int | None, Query(ge=1, le=MAX_ID, description="only this study")] = None,
                status: ModelStatus | None = None, offset: int = Query(0, ge=0, le=MAX_ID),
                limit: int = Query(100, ge=1, le=1000)) -> list[ModelVersion]:
    """Model versions by study and number."""
    return registry.list_models(session=session, study_id=study, status=status, offset=offset, limit=limit)


@router.get("/models/{model_id}", response_model=ModelVersionDetail)
def show(model_id: ModelId, user: ReaderUser, session: SessionDep) -> ModelVersionDetail:
    """One version: manifest, lineage, signature and key fingerprint, status, and its rollouts."""
    version = registry.get_model(session=session, model_id=model_id)
    return ModelVersionDetail.model_validate(version, update={
        "rollouts": registry.rollouts_of(session=session, version_id=model_id)})


@router.get("/models/{model_id}/download", response_class=Response,
            responses={200: {"content": {"application/x-tar": {}}, "description": "the signed bundle"},
                       403: {"description": "the site is not assigned this version"}})
def download(model_id: ModelId, caller: CallerDep, session: SessionDep, store: ObjectsDep) -> Response:
    """The signed bundle (tar: manifest.json, the files it names, signature.json); verify it before loading."""
    version = registry.get_model(session=session, model_id=model_id)
    if caller.site is not None and not registry.site_may_fetch(session=session, site=caller.site, version=version):
        raise HTTPException(403, f"site {caller.site.name!r} is not assigned model {model_id}; ask "
                                 f"GET /api/v1/sites/{caller.site.name}/model which version to run")
    data = registry.bundle(store=store, version=version)
    return Response(data, media_type="application/x-tar", headers={
        "Content-Disposition": f'attachment; filename="{model_id}.tar"',
        "X-Manifest-SHA256": version.manifest_sha256, "X-Signature-Key": version.key_fingerprint})


@router.post("/models/{model_id}/canary", response_model=RolloutPublic, status_code=status.HTTP_201_CREATED,
             responses={409: {"description": "not registered, or another canary runs"},
                        422: {"description": "unknown, inactive or outside site"}})
def canary(model_id: ModelId, body: RolloutCreate, user: SponsorUser, session: SessionDep, settings: SettingsDep,
           rid: RequestId) -> RolloutPublic:
    """Start a canary: these sites run the candidate and report; the others keep the promoted version."""
    margin = settings.canary_margin if body.margin is None else body.margin
    change = registry.start_canary(session=session, model_id=model_id, sites=body.sites, margin=margin,
                                   started_by=user.username)
    _audit(session, (user.username, user.role), "model.canary", change.version, rid, sites=body.sites, margin=margin,
           rollout_id=change.rollout.id)
    session.commit()
    return RolloutPublic.model_validate(change.rollout)


@router.post("/models/{model_id}/validation", response_model=CanaryReportPublic, status_code=status.HTTP_201_CREATED,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": CanaryValidation.model_json_schema()}}}},
             responses={409: {"description": "not in canary, not a canary site, or already reported"},
                        422: {"description": "not a canary report"}})
async def validation(model_id: ModelId, request: Request, site: CurrentSite, session: SessionDep,
                     rid: RequestId) -> CanaryReportPublic:
    """A canary site's validation report (federated.payloads.CanaryValidation; nothing else is accepted)."""
    raw = await request.body()
    who = (f"site:{site.name}", "site")

    def work() -> CanaryReportPublic:
        # the egress guard every site payload passes: shape, identifiers, then the closed schema
        try:
            report = check_payload(raw, CanaryValidation, site=site.name)
        except EgressRejected as exc:
            session.rollback()
            record_rejection(session=session, site=site.name, endpoint="/models/{model_id}/validation",
                             rejection=exc, size=len(raw), request_id=rid)
            session.commit()
            raise
        change = registry.record_report(session=session, model_id=model_id, site=site.name, report=report)
        _audit(session, who, "model.validation", change.version, rid, rollout_id=change.rollout.id,
               metric=report.metric, candidate=report.candidate, current=report.current)
        _audit_change(session, who, change, rid)
        session.commit()
        return CanaryReportPublic.model_validate(change.report)

    return await run_in_threadpool(work)


@router.post("/models/{model_id}/promote", response_model=ModelVersionPublic,
             responses={409: {"description": "rolled back or already promoted"}})
def promote(model_id: ModelId, user: SponsorUser, session: SessionDep, rid: RequestId) -> ModelVersion:
    """Promote a version to every site by hand (ends its canary); the previous promoted version is retired."""
    change = registry.promote(session=session, model_id=model_id, by=user.username)
    _audit_change(session, (user.username, user.role), change, rid)
    session.commit()
    return change.version


@router.post("/models/{model_id}/rollback", response_model=ModelVersionPublic,
             responses={409: {"description": "neither in canary nor promoted"}})
def rollback(model_id: ModelId, user: SponsorUser, session: SessionDep, rid: RequestId) -> ModelVersion:
    """Roll back a canary, or the promoted version (the version it replaced is promoted again)."""
    change = registry.rollback(session=session, model_id=model_id, by=user.username)
    _audit_change(session, (user.username, user.role), change, rid)
    session.commit()
    return change.version


@router.get("/sites/{site}/model", response_model=list[SiteAssignment],
            responses={403: {"description": "a site asking for another site"}})
def site_model(site: Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")],
               caller: CallerDep, session: SessionDep,
               study: Annotated[int | None, Query(ge=1, le=MAX_ID, description="only this study")] = None,
               ) -> list[SiteAssignment]:
    """What a site should run now, per open study: its canary version if it is a canary site, else the promoted one."""
    if caller.site is not None and caller.site.name != site:
        raise HTTPException(403, f"the token belongs to site {caller.site.name!r}; ask for "
                                 f"/api/v1/sites/{caller.site.name}/model")
    row = caller.site or registry.get_site_by_name(session=session, name=site)
    return registry.site_assignments(session=session, site=row, study_id=study)


@router.get("/registry/public-key", response_model=PublicKey)
def public_key(settings: SettingsDep) -> PublicKey:
    """The Ed25519 key that signs every manifest (public: sites pin it and verify bundles with it)."""
    return PublicKey(**public_key_info(settings))
