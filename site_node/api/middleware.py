"""One ASGI middleware around every request of the site API: request id, body limit, no-store caching,
a Server-Timing header, metrics by route template, one log line (never the raw path: it may hold what a
user typed), and a generic 500 that names only the request id (never a traceback)."""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from evoclone.federated.api_common import read_body, replay, route_template, send_json

log = logging.getLogger("evoclone.site.api")
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class Metrics:
    """Request counts, latency and login outcomes, in the app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("evoclone_site_requests", "HTTP requests handled", ("method", "route", "status"),
                                registry=self.registry)
        self.latency = Histogram("evoclone_site_request_seconds", "HTTP request latency", ("method", "route"),
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.logins = Counter("evoclone_site_logins", "login attempts by outcome", ("outcome",),
                              registry=self.registry)
        self.access_entries = Counter("evoclone_site_access_log_entries", "patient-data accesses logged",
                                      ("action", "outcome"), registry=self.registry)


class ServiceMiddleware:
    """Wraps the app: see the module docstring. Request bodies are read (bounded) but never stored."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        sent = {"status": 500, "started": False}
        api = scope.get("path", "").startswith("/api/")

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"], sent["started"] = message["status"], True
                # the time this process spent on the request: a client or load generator tells its own
                # queueing apart from the server's (W3C Server-Timing; no detail beyond the duration)
                extra = [(b"x-request-id", rid.encode()),
                         (b"server-timing", f"app;dur={(time.perf_counter() - t0) * 1000:.1f}".encode())]
                if api:  # patient data must not linger in browser or proxy caches
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            body = await self._read_body(headers, receive, send_wrapper)
            if body is not None:
                await self._call(scope, body, receive, send_wrapper, rid, sent)
        finally:
            self._observe(scope, rid, sent["status"], time.perf_counter() - t0)

    async def _read_body(self, headers: dict, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 (or when the client went away)."""
        return await read_body(headers, receive, send, limit=self.max_body_bytes, knob="max_body_bytes in site.json")

    async def _call(self, scope: Scope, body: bytes, receive: Receive, send: Send, rid: str, sent: dict) -> None:
        try:
            await self.app(scope, replay(body, receive), send)
        except Exception as exc:  # noqa: BLE001 (the one place that turns any failure into JSON)
            # the exception's text may quote what a caller sent: the log gets its type and frames only
            log.error("request %s failed: %s\n%s", rid, type(exc).__name__,
                      "".join(traceback.format_tb(exc.__traceback__)))
            if not sent["started"]:
                await send_json(send, 500, {"detail": f"internal error; give the operator request id {rid}",
                                            "request_id": rid})

    def _observe(self, scope: Scope, rid: str, status: int, seconds: float) -> None:
        route, method = route_template(scope), scope.get("method", "")
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(method, route).observe(seconds)
        state = scope.get("state", {})
        log.info("%s %s %s %.1f ms actor=%s request=%s", method, route, status, seconds * 1000,
                 state.get("actor", "-"), rid)
