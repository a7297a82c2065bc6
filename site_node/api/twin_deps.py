"""The twin services of one app (inference workers, result cache, background jobs) as an Annotated dependency."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from evoclone.federated.stores.cache import open_cache

from ..inference import CacheStatus, InferencePool, JobRunner, ModelRef, SiteCache, cache_key, default_workers, \
    promoted_model
from .deps import remembered

_INIT = threading.Lock()  # guards the first creation only; the services live on app.state


@dataclass
class TwinServices:
    """What twin routes share: the inference worker pool (the only place the model runs), the result cache and
    the cohort job runner."""

    engine: sa.Engine
    inference: InferencePool
    cache: SiteCache
    jobs: JobRunner

    async def lookup(self, request: Request, kind: str, pseudonym: str, params: dict[str, Any]
                     ) -> tuple[ModelRef, str, bytes | None, CacheStatus]:
        """The promoted version (from the request memo: a promotion in any process is seen at once), the result's
        cache key, its cached JSON (None: compute it) and the cache status; no thread hop with the in-process
        cache and a kept version."""
        ref = await remembered(request, "promoted model", lambda: promoted_model(engine=self.engine))
        key = cache_key(ref.version, kind, pseudonym, params)
        if self.cache.backend.blocking:  # Redis: off the event loop
            raw, status = await run_in_threadpool(self.cache.lookup_raw, key)
        else:
            raw, status = self.cache.lookup_raw(key)
        return ref, key, raw, status

    def close(self) -> None:
        """Stop the cohort jobs and the inference workers."""
        self.jobs.shutdown()
        self.inference.close()


def services_of(app: FastAPI) -> TwinServices:
    """The app's twin services, created on first use from its settings."""
    state = app.state
    services = getattr(state, "twins", None)
    if services is None:
        with _INIT:
            services = getattr(state, "twins", None)
            if services is None:
                s = state.settings
                backend = open_cache(s.redis_url, namespace=f"evoclone-twins-{s.name}")
                workers = s.inference_workers or default_workers(getattr(state, "api_workers", 1))
                services = TwinServices(
                    engine=state.engine, inference=InferencePool(site_dir=s.site_dir, workers=workers),
                    cache=SiteCache(backend=backend, ttl_seconds=s.twin_cache_minutes * 60), jobs=JobRunner())
                state.twins = services
    return services


async def twin_services(request: Request) -> TwinServices:
    """The app's twin services (a dependency)."""
    return services_of(request.app)


ServicesDep = Annotated[TwinServices, Depends(twin_services)]
