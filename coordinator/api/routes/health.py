"""Liveness, readiness (the database answers) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from evoclone.federated.stores.engine import ping

from ..deps import EngineDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "the database is not reachable"}})
def ready(engine: EngineDep) -> Response:
    """The database answers."""
    try:
        ping(engine)
    except Exception:  # noqa: BLE001 (any failure means not ready; the reason goes to the log, not the client)
        return JSONResponse({"detail": "not ready: the database is not reachable"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: request counts and latency by route template and status."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
