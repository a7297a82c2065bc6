"""Liveness, readiness (the database and the session store answer) and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from evoclone.federated.stores.engine import ping

from ..deps import EngineDep, StoreDep

router = APIRouter(tags=["health"])
log = logging.getLogger("evoclone.site.api")


@router.get("/health")
def health() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "the database or the session store is not reachable"}})
def ready(engine: EngineDep, store: StoreDep) -> Response:
    """The database and the session store answer."""
    down = []
    try:
        ping(engine)
    except Exception as exc:  # noqa: BLE001 (any failure means not ready; the reason goes to the log)
        log.warning("readiness: database unreachable (%s)", type(exc).__name__)
        down.append("the database")
    try:
        store.ping()
    except Exception as exc:  # noqa: BLE001
        log.warning("readiness: session store unreachable (%s)", type(exc).__name__)
        down.append("the session store (Redis)")
    if down:
        return JSONResponse({"detail": f"not ready: {' and '.join(down)} not reachable"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: requests by route template and status, latency, logins, access-log entries."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
