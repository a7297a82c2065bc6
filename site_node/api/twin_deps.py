"""The twin services of one app (model holder, result cache, background jobs) as Annotated dependencies."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from evoclone.federated.stores.cache import open_cache

from ..inference import JobRunner, SiteCache
from ..local_models import ModelHolder

T = TypeVar("T")
_INIT = threading.Lock()  # guards the first creation only; the services live on app.state


@dataclass
class TwinServices:
    """What twin routes share: the promoted model (loaded once per version), the cache and the job runner."""

    models: ModelHolder
    cache: SiteCache
    jobs: JobRunner
    # model work runs on its own thread: requests waiting for the (serialised) model must not occupy the
    # shared threadpool, or cached lookups queue behind them
    model_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "site-model"))

    async def run_model(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the model thread and await its result."""
        return await asyncio.wrap_future(self.model_pool.submit(fn))


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
