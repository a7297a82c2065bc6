"""The twin services of one app (model holder, result cache, background jobs) as Annotated dependencies."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from evoclone.federated.stores.cache import open_cache

from ..inference import JobRunner, SiteCache
from ..local_models import ModelHolder

_INIT = threading.Lock()  # guards the first creation only; the services live on app.state


@dataclass
class TwinServices:
    """What twin routes share: the promoted model (loaded once per version), the cache and the job runner."""

    models: ModelHolder
    cache: SiteCache
    jobs: JobRunner


def twin_services(request: Request) -> TwinServices:
    """The app's twin services, created on first use from its settings."""
    state = request.app.state
    services = getattr(state, "twins", None)
    if services is None:
        with _INIT:
            services = getattr(state, "twins", None)
            if services is None:
                s = state.settings
                backend = open_cache(s.redis_url, namespace=f"evoclone-twins-{s.name}")
                services = TwinServices(ModelHolder(engine=state.engine, site_dir=s.site_dir),
                                        SiteCache(backend=backend, ttl_seconds=s.twin_cache_minutes * 60),
                                        JobRunner())
                state.twins = services
    return services


ServicesDep = Annotated[TwinServices, Depends(twin_services)]
