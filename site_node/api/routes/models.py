"""Model versions installed at the site: list, install a coordinator-signed bundle, promote, purge the cache."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from ...errors import InvalidInput
from ...local_models import LocalModelPublic, install_bundle, list_models, promote_version
from ..deps import AdminUser, CurrentUser, EngineDep, NowDep, SettingsDep
from ..twin_deps import ServicesDep

router = APIRouter(prefix="/models", tags=["models"])
MAX_BUNDLE = 512 << 20


class PurgePublic(BaseModel):
    """How many cached results were removed (-1: the cache is unavailable)."""

    removed: int


def _public(rows) -> list[LocalModelPublic]:
    return [LocalModelPublic.model_validate(r, from_attributes=True) for r in rows]


@router.get("", response_model=list[LocalModelPublic])
def read_models(_user: CurrentUser, engine: EngineDep) -> list[LocalModelPublic]:
    """Installed model versions, newest first; `promoted` marks the one inference uses."""
    return _public(list_models(engine=engine))


@router.post("", response_model=LocalModelPublic, status_code=201,
             openapi_extra={"requestBody": {"required": True, "content": {"application/x-tar": {
                 "schema": {"type": "string", "format": "binary"}}}}},
             responses={409: {"description": "already installed"}, 422: {"description": "the bundle was refused"},
                        503: {"description": "no coordinator key is pinned yet (install once with the CLI)"}})
async def install_model(request: Request, _user: AdminUser, engine: EngineDep, settings: SettingsDep,
                        services: ServicesDep, now: NowDep) -> LocalModelPublic:
    """Install and promote a signed bundle (the coordinator's download), verified with the pinned coordinator key."""
    bundle = await request.body()
    if not bundle:
        raise InvalidInput("send the bundle (application/x-tar) from the coordinator's model download as the body")

    def work():
        row = install_bundle(engine=engine, site_dir=settings.site_dir, bundle=bundle, now=now)
        services.cache.purge()  # the inference workers switch by themselves: each task names the promoted version
        return row

    return _public([await run_in_threadpool(work)])[0]


@router.post("/{version}/promote", response_model=LocalModelPublic, responses={404: {"description": "unknown"}})
def promote_model(version: str, _user: AdminUser, engine: EngineDep, services: ServicesDep,
                  now: NowDep) -> LocalModelPublic:
    """Make an installed version the one inference uses (cached results of other versions are dropped)."""
    row = promote_version(engine=engine, version=version, now=now)
    services.cache.purge()
    return _public([row])[0]


@router.delete("/cache", response_model=PurgePublic)
def purge_cache(_user: AdminUser, services: ServicesDep) -> PurgePublic:
    """Remove every cached twin and prediction."""
    return PurgePublic(removed=services.cache.purge())
