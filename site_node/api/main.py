"""The site's FastAPI app: `create_app(settings)`; serve it with `evoclone site serve`."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from evoclone.federated.api_common import freeze_startup_objects
from evoclone.federated.stores.data_version import Memo, version_of

from ..access_log import AccessLogWriter
from ..auth import totp_key
from ..db import site_engine
from ..migrate import upgrade
from ..sessions import SessionBackend, open_backend
from ..settings import SiteSettings, get_settings
from . import errors
from .middleware import Metrics, ServiceMiddleware
from .routes import audit, auth, health, jobs, models, pages, patients, reviews, tokens, twins, users

API_PREFIX = "/api/v1"
SITE_DIR_ENV = "EVOCLONE_SITE_DIR"
API_WORKERS_ENV = "EVOCLONE_SITE_API_WORKERS"  # how many API processes share the cores (set by `site serve`)
WARM_JOIN_SECONDS = 60  # how long a shutdown waits for a warm-up still starting the workers
log = logging.getLogger("evoclone.site.api")
API_MODULES = (auth, users, tokens, patients, twins, reviews, jobs, models, audit)  # their routers, under /api/v1


def utc_now() -> datetime:
    """The real clock (timezone-aware UTC)."""
    return datetime.now(timezone.utc)


def add_routes(app: FastAPI, router: APIRouter, prefix: str = "") -> None:
    """Register `router`'s routes on the app itself, under `prefix`: the same operations as `include_router`."""
    # FastAPI (0.138) resolves an included router's route on every request (matching through each nested
    # router, and building the route's request handler anew); a route of the app's own router is built once
    for route in router.routes:
        if not isinstance(route, APIRoute):
            raise TypeError(f"{route!r}: only API routes can be added to the site app")
        app.router.add_api_route(
            prefix + route.path, route.endpoint, response_model=route.response_model, status_code=route.status_code,
            tags=route.tags, dependencies=route.dependencies, summary=route.summary, description=route.description,
            response_description=route.response_description, responses=route.responses, deprecated=route.deprecated,
            methods=route.methods, operation_id=route.operation_id, name=route.name,
            response_model_include=route.response_model_include, response_model_exclude=route.response_model_exclude,
            response_model_by_alias=route.response_model_by_alias,
            response_model_exclude_unset=route.response_model_exclude_unset,
            response_model_exclude_defaults=route.response_model_exclude_defaults,
            response_model_exclude_none=route.response_model_exclude_none, include_in_schema=route.include_in_schema,
            response_class=route.response_class, callbacks=route.callbacks, openapi_extra=route.openapi_extra,
            generate_unique_id_function=route.generate_unique_id_function,
            strict_content_type=route.strict_content_type)


def create_app(settings: SiteSettings, *, clock: Callable[[], datetime] = utc_now,
               sessions: SessionBackend | None = None, api_workers: int = 1, warm: bool = False) -> FastAPI:
    """Build the app over a site's stores; the schema is migrated at start. `clock` and `sessions` are for tests;
    `warm` starts the inference workers (with the promoted model loaded) at start instead of at first use."""
    if settings.jwt_secret is None:
        raise RuntimeError(f"{settings.jwt_secret_path} is missing; `evoclone site serve` creates it, or run "
                           "`evoclone site init` for a new site")
    engine = site_engine(settings)
    store = sessions or open_backend(settings.redis_url, namespace=f"evoclone-site-{settings.name}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upgrade(engine)  # Alembic: the same migrations on SQLite and PostgreSQL (a no-op when current)
        warming = None
        if warm:
            warming = _warm_in_background(app)
            freeze_startup_objects()
        yield
        if warming is not None:  # a shutdown during the warm-up lets it finish before the workers are stopped
            warming.join(timeout=WARM_JOIN_SECONDS)
        services = getattr(app.state, "twins", None)
        if services is not None:
            services.close()
        app.state.access_log.close()
        engine.dispose()
        if sessions is None:
            store.close()

    app = FastAPI(title=f"EvoClone site {settings.name}", version="1", lifespan=lifespan,
                  summary="A hospital's site node: its anonymized patients, twins and reviews, behind password + "
                          "TOTP logins, with every patient-data access in a hash-chained log.")
    app.state.settings, app.state.engine, app.state.sessions = settings, engine, store
    app.state.clock, app.state.metrics = clock, Metrics()
    app.state.access_log, app.state.api_workers = AccessLogWriter(engine=engine), api_workers
    app.state.jwt_secret = settings.jwt_secret.get_secret_value()
    app.state.totp_key = totp_key(settings)
    version = version_of(engine)  # None: the site directory's data version could not be opened (logged)
    app.state.memo = Memo(version, seconds=settings.request_memo_seconds) \
        if version is not None and settings.request_memo_seconds > 0 else None
    errors.install(app)
    add_routes(app, health.router)
    for module in API_MODULES:
        add_routes(app, module.router, API_PREFIX)
    add_routes(app, pages.router)
    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.max_body_bytes, metrics=app.state.metrics)
    return app


def _warm(app: FastAPI) -> None:
    """Start the inference workers and load the promoted model in them, if there is one (errors wait for a request)."""
    from ..errors import SiteError
    from ..inference import promoted_model
    from .twin_deps import services_of

    try:
        ref = promoted_model(engine=app.state.engine)
    except SiteError:
        ref = None
    services_of(app).inference.warm(ref)


def _warm_in_background(app: FastAPI) -> threading.Thread:
    """Run `_warm` on a thread: starting the workers blocks for as long as their forkserver takes to import torch
    and the models (3.5 s on an idle 2-core server, longer on a busy one), and the API (health, logins, reviews)
    need not wait for that; a twin request made meanwhile queues for the workers."""
    def run() -> None:
        try:
            _warm(app)
        except Exception:  # noqa: BLE001 (a warm-up is an optimization; the first request reports the error)
            log.warning("starting the inference workers in advance failed; the first twin request starts them",
                        exc_info=True)

    thread = threading.Thread(target=run, name="evoclone-inference-warm", daemon=True)
    thread.start()
    return thread


def app_from_env() -> FastAPI:
    """The app for $EVOCLONE_SITE_DIR (uvicorn's factory, one per worker)."""
    site_dir = os.environ.get(SITE_DIR_ENV)
    if not site_dir:
        raise RuntimeError(f"no site directory: set {SITE_DIR_ENV} or run `evoclone site serve --site-dir DIR`")
    return create_app(get_settings(Path(site_dir)), api_workers=int(os.environ.get(API_WORKERS_ENV) or 1), warm=True)
