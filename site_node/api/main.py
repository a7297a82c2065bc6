"""The site's FastAPI app: `create_app(settings)`; serve it with `evoclone site serve`."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, FastAPI

from evoclone.federated.stores.engine import make_engine

from ..auth import totp_key
from ..migrate import upgrade
from ..sessions import SessionBackend, open_backend
from ..settings import SiteSettings, get_settings
from . import errors
from .middleware import Metrics, ServiceMiddleware
from .routes import audit, auth, health, jobs, models, pages, patients, reviews, tokens, twins, users

API_PREFIX = "/api/v1"
SITE_DIR_ENV = "EVOCLONE_SITE_DIR"


def utc_now() -> datetime:
    """The real clock (timezone-aware UTC)."""
    return datetime.now(timezone.utc)


def api_router() -> APIRouter:
    """Every resource router under /api/v1 (later resources add theirs here)."""
    router = APIRouter(prefix=API_PREFIX)
    for module in (auth, users, tokens, patients, twins, reviews, jobs, models, audit):
        router.include_router(module.router)
    return router


def create_app(settings: SiteSettings, *, clock: Callable[[], datetime] = utc_now,
               sessions: SessionBackend | None = None) -> FastAPI:
    """Build the app over a site's stores; the schema is migrated at start. `clock` and `sessions` are for tests."""
    if settings.jwt_secret is None:
        raise RuntimeError(f"{settings.jwt_secret_path} is missing; `evoclone site serve` creates it, or run "
                           "`evoclone site init` for a new site")
    engine = make_engine(settings.db_url)
    store = sessions or open_backend(settings.redis_url, namespace=f"evoclone-site-{settings.name}")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        upgrade(engine)  # Alembic: the same migrations on SQLite and PostgreSQL (a no-op when current)
        yield
        engine.dispose()
        if sessions is None:
            store.close()

    app = FastAPI(title=f"EvoClone site {settings.name}", version="1", lifespan=lifespan,
                  summary="A hospital's site node: its anonymized patients, twins and reviews, behind password + "
                          "TOTP logins, with every patient-data access in a hash-chained log.")
    app.state.settings, app.state.engine, app.state.sessions = settings, engine, store
    app.state.clock, app.state.metrics = clock, Metrics()
    app.state.jwt_secret = settings.jwt_secret.get_secret_value()
    app.state.totp_key = totp_key(settings)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(api_router())
    app.include_router(pages.router)
    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.max_body_bytes, metrics=app.state.metrics)
    return app


def app_from_env() -> FastAPI:
    """The app for $EVOCLONE_SITE_DIR (uvicorn's factory, one per worker)."""
    site_dir = os.environ.get(SITE_DIR_ENV)
    if not site_dir:
        raise RuntimeError(f"no site directory: set {SITE_DIR_ENV} or run `evoclone site serve --site-dir DIR`")
    return create_app(get_settings(Path(site_dir)))
