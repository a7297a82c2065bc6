"""The coordinator's FastAPI app: `create_app(settings)`; serve it with `evoclone coordinator serve`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from evoclone.federated.api_common import freeze_startup_objects

from ..audit_writer import AuditWriter
from evoclone.federated.stores.data_version import version_of
from ..db import create_tables, make_engine, with_retry
from ..settings import CoordinatorSettings, get_settings
from . import errors
from .deps import UserCache
from .middleware import Metrics, ServiceMiddleware
from .response_cache import ResponseCache
from .routes import audit, auth, health, models, reports, runs, site_tokens, sites, studies

API_PREFIX = "/api/v1"


def api_router() -> APIRouter:
    """Every resource router under /api/v1 (later resources add theirs here)."""
    router = APIRouter(prefix=API_PREFIX)
    for module in (auth, sites, site_tokens, studies, runs, models, audit, reports):
        router.include_router(module.router)
    return router


def create_app(settings: CoordinatorSettings | None = None, *, serving: bool = False) -> FastAPI:
    """Build the app for `settings` (by default the cached get_settings()); tables are created at start.
    `serving` (a process that serves only this app): what startup made is frozen out of the collector's passes."""
    settings = settings or get_settings()
    engine = make_engine(settings)
    audit = AuditWriter(settings.db_url, retry=lambda write: with_retry(write, seconds=settings.db_retry_seconds))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        with_retry(lambda: create_tables(engine), seconds=max(settings.db_retry_seconds, 30))
        if serving:
            freeze_startup_objects()
        yield
        audit.stop()
        engine.dispose()

    app = FastAPI(title="EvoClone coordinator", version="1", lifespan=lifespan,
                  summary="Sites, studies, runs and the model registry of a federated EvoClone study; "
                          "never a patient-level record.")
    app.state.settings, app.state.engine, app.state.metrics, app.state.audit = settings, engine, Metrics(), audit
    app.state.users = UserCache(settings.user_cache_seconds)
    from ..runs import retrain_launcher

    app.state.on_retrain = retrain_launcher(engine, enabled=settings.drift_auto_retrain)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(api_router())
    version = version_of(engine)
    cache = ResponseCache(version, seconds=settings.response_cache_seconds) \
        if version is not None and settings.response_cache_seconds > 0 else None
    app.add_middleware(ServiceMiddleware, settings=settings, engine=engine, metrics=app.state.metrics, audit=audit,
                       users=app.state.users, cache=cache)
    return app


def app_from_env() -> FastAPI:
    """The app for $EVOCLONE_COORDINATOR_STATE_DIR (uvicorn's factory with --workers > 1)."""
    return create_app(serving=True)
