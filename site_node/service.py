"""`evoclone site serve`: the site API on uvicorn (HTTPS when the settings name a certificate), and the
account and access-log operations the CLI runs against the same stores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlmodel import Session

from .access_log import chain_head
from .auth import create_user, provisioning_uri, totp_key
from .auth_models import UserCreate
from .db import site_engine
from .migrate import upgrade
from .settings import SiteSettings, ensure_jwt_secret, get_settings


def prepare(settings: SiteSettings) -> SiteSettings:
    """Create the JWT secret of a site directory from before the API, and migrate the schema; fresh settings."""
    ensure_jwt_secret(settings.site_dir)
    get_settings.cache_clear()
    settings = get_settings(settings.site_dir) if settings.jwt_secret is None else settings
    engine = site_engine(settings)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return settings


def serve(settings: SiteSettings, *, host: str, port: int, workers: int = 1, log_level: str = "info") -> None:
    """Run the API until SIGTERM or SIGINT (uvicorn shuts down gracefully)."""
    import uvicorn

    from .api.main import API_WORKERS_ENV, SITE_DIR_ENV

    settings = prepare(settings)
    os.environ[SITE_DIR_ENV] = str(Path(settings.site_dir).absolute())  # every worker's app factory reads it
    os.environ[API_WORKERS_ENV] = str(workers)  # they share the cores: each sizes its inference pool to its part
    tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)} \
        if settings.tls_enabled else {}
    # no uvicorn access log: a raw path may hold whatever a user typed; the app logs route templates instead
    uvicorn.run("evoclone.site_node.api.main:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, access_log=False, proxy_headers=False, server_header=False,
                timeout_graceful_shutdown=10, **tls)


def add_user(settings: SiteSettings, data: UserCreate) -> dict[str, str]:
    """Add a user to the site's database; its TOTP secret and provisioning URI (to show once)."""
    engine = site_engine(settings)
    try:
        upgrade(engine)
        with Session(engine) as session:
            user, secret = create_user(session=session, data=data, totp_key=totp_key(settings))
            session.commit()
            return {"username": user.username, "role": user.role, "totp_secret": secret,
                    "totp_uri": provisioning_uri(secret, username=user.username, site=settings.name)}
    finally:
        engine.dispose()


def access_log_head(settings: SiteSettings) -> dict[str, Any]:
    """Verify the site's access log; its verified head and the first problem (see access_log.chain_head)."""
    engine = site_engine(settings)
    try:
        upgrade(engine)
        return chain_head(engine)
    finally:
        engine.dispose()
