"""One ASGI middleware around every request: request id, body limit, database retries, metrics, audit,
the response cache of the registry and status reads (response_cache.py), and a generic 500 (never a
traceback).

Every request is appended to the audit chain before its response starts: the middleware holds the
response's first message until the group-committing audit writer (audit_writer.py) has committed the
request's event. When that fails, a response that would have served something becomes a 503; an error
response (5xx) goes out as it is, logged as unaudited."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

import anyio
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from evoclone.federated.api_common import read_body, replay

from ..audit_writer import AuditWriter
from ..db import is_transient
from ..security import ACCESS, TokenClaims, TokenError, decode_token
from .deps import UserCache
from .response_cache import CACHEABLE, ResponseCache

log = logging.getLogger("evoclone.coordinator")
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MODEL_UPLOAD = re.compile(r"^/api/v1/studies/[^/]+/models/?$")
CACHED_ROUTE = "evoclone.cached_route"


class Metrics:
    """Request counts and latency histograms by route template, in the app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("evoclone_coordinator_requests", "HTTP requests handled",
                                ("method", "route", "status"), registry=self.registry)
        self.latency = Histogram("evoclone_coordinator_request_seconds", "HTTP request latency",
                                 ("method", "route"), registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.db_retries = Counter("evoclone_coordinator_db_retries", "requests retried after the database "
                                  "went away", registry=self.registry)


def route_template(scope: Scope) -> str:
    """The matched route's path template (/api/v1/sites/{site_id}), never the raw path: bounded label sets."""
    # FastAPI includes routers lazily: the route object knows only its own path, the context the full one.
    if CACHED_ROUTE in scope:  # answered from the response cache: the route that computed the answer
        return scope[CACHED_ROUTE]
    context = (scope.get("fastapi") or {}).get("effective_route_context")
    return getattr(context, "path", None) or getattr(scope.get("route"), "path", None) or "<unmatched>"


async def _json(send: Send, status: int, body: dict, headers: tuple = ()) -> None:
    """Answer with a JSON body (the caller's send adds X-Request-ID, or `headers` carry it)."""
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class ServiceMiddleware:
    """Wraps the app: see the module docstring. Request bodies are read (bounded) but never stored."""

    def __init__(self, app: ASGIApp, *, settings, engine, metrics: Metrics, audit: AuditWriter,
                 users: UserCache | None = None, cache: ResponseCache | None = None) -> None:
        self.app, self.settings, self.engine, self.metrics, self.audit = app, settings, engine, metrics, audit
        self.users, self.cache = users, cache

    def _vouched(self, scope: Scope, headers: dict) -> tuple[str, str] | None:
        """(user, role) for a cacheable read whose access token verifies and whose user the process's user check
        vouches for with the token's role (the route's own rule, deps.get_current_user); None: the route decides."""
        if self.cache is None or self.users is None or scope.get("method") != "GET" \
                or not CACHEABLE.match(scope.get("path", "")):
            return None
        claims = self._claims(headers)
        if not isinstance(claims, TokenClaims):
            return None
        return (claims.subject, claims.role) if self.users.confirms(claims.subject, claims.role) else None

    async def _serve(self, scope: Scope, headers: dict, body: bytes, receive: Receive, send: Send, rid: str,
                     sent: dict) -> None:
        """The app's answer, or for a vouched-for cacheable read the kept one (response_cache.py)."""
        who = self._vouched(scope, headers)
        if who is None:
            await self._call_with_retries(scope, body, receive, send, rid, sent)
            return
        key = (who[1], scope["path"], scope.get("query_string", b""))
        version = self.cache.version.current()  # before computing: a write from now on changes it
        entry = self.cache.get(key, version)
        if entry is not None:
            scope["state"]["actor"], scope["state"]["role"] = who
            scope[CACHED_ROUTE] = entry.route
            await send({"type": "http.response.start", "status": 200, "headers": list(entry.headers)})
            await send({"type": "http.response.body", "body": entry.body})
            return
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        await self._call_with_retries(scope, body, receive, capture, rid, sent)
        if start.get("status") == 200 and not sent["dropped"]:
            self.cache.put(key, version, start.get("headers", []), b"".join(chunks), route_template(scope))

    def _claims(self, headers: dict) -> TokenClaims | str | None:
        """The bearer access token's verified claims; None when no JWT is sent (site API tokens are not JWTs: the
        site dependency names that caller); a note when the token does not verify."""
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not auth.lower().startswith("bearer ") or auth[7:].strip().startswith("evs_"):
            return None
        try:
            return decode_token(auth[7:].strip(), settings=self.settings, type=ACCESS)
        except TokenError:
            return "invalid or expired token"

    def _caller(self, scope: Scope) -> tuple[str, str, str]:
        """(actor, role, note) from a bearer token, when one is sent."""
        claims = self._claims(dict(scope.get("headers") or []))
        if isinstance(claims, TokenClaims):
            return claims.subject, claims.role, ""
        return "", "", claims or ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        t0 = time.perf_counter()
        sent = {"status": 500, "started": False, "audited": False, "dropped": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"], sent["audited"] = message["status"], True
                audited = await self._audit(scope, rid, message["status"], time.perf_counter() - t0)
                sent["started"] = True
                if not audited and message["status"] < 500:  # never serve a request the trail does not hold
                    sent["status"], sent["dropped"] = 503, True
                    await _json(send, 503, {"detail": "the database is not reachable; retry in a few seconds "
                                                      f"(the request could not be audited; request id {rid})"},
                                headers=((b"x-request-id", rid.encode()),))
                    return
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif sent["dropped"]:
                return
            await send(message)

        try:
            body = await self._read_body(headers, receive, send_wrapper, scope)
            if body is not None:
                await self._serve(scope, headers, body, receive, send_wrapper, rid, sent)
        finally:
            seconds = time.perf_counter() - t0
            self._observe(scope, sent["status"], seconds)
            if not sent["audited"]:  # no response was sent (the client went away): the request is still recorded
                await self._audit(scope, rid, sent["status"], seconds)

    async def _read_body(self, headers: dict, receive: Receive, send: Send, scope: Scope) -> bytes | None:
        """The whole body, or None after answering 413 (model uploads have their own, larger limit)."""
        upload = scope.get("method") == "POST" and MODEL_UPLOAD.match(scope.get("path", "")) is not None
        limit = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes
        knob = "EVOCLONE_COORDINATOR_MAX_UPLOAD_BYTES" if upload else "EVOCLONE_COORDINATOR_MAX_BODY_BYTES"
        return await read_body(headers, receive, send, limit=limit, knob=knob)

    async def _call_with_retries(self, scope: Scope, body: bytes, receive: Receive, send: Send, rid: str,
                                 sent: dict) -> None:
        """Run the app; while the database is away and nothing was sent yet, run it again (the failed
        attempt's transaction was rolled back, so nothing is written twice)."""
        deadline = time.monotonic() + self.settings.db_retry_seconds
        delay = 0.05
        while True:
            try:
                await self.app(scope, replay(body, receive), send)
                return
            except Exception as exc:  # noqa: BLE001 (the one place that turns any failure into JSON)
                if sent["started"]:
                    log.exception("request %s failed after its response started", rid)
                    return
                if is_transient(exc) and time.monotonic() + delay < deadline:
                    self.metrics.db_retries.inc()
                    log.warning("request %s: database unavailable (%s); retrying", rid, type(exc).__name__)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                if is_transient(exc):
                    await _json(send, 503, {"detail": "the database is not reachable; retry in a few seconds "
                                                      f"(request id {rid})"})
                    return
                log.exception("request %s failed", rid)
                await _json(send, 500, {"detail": f"internal error; give the operator request id {rid}",
                                        "request_id": rid})
                return

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        """Metrics by route template."""
        route, method = route_template(scope), scope.get("method", "")
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(method, route).observe(seconds)

    async def _audit(self, scope: Scope, rid: str, status: int, seconds: float) -> bool:
        """Append the request's event (never the body) and wait for its commit; False when it failed."""
        method = scope.get("method", "")
        state = scope.get("state", {})
        actor, role, note = state.get("actor"), state.get("role", ""), ""
        if actor is None:  # no dependency named the caller: say who the token claims to be, or why it failed
            actor, role, note = self._caller(scope)
        detail = {"method": method, "path": scope.get("path", "")[:512], "status": status,
                  "ms": round(seconds * 1000, 1)}
        if note:
            detail["note"] = note
        outcome = "ok" if status < 400 else "denied" if status in (401, 403) else "error" if status >= 500 \
            else "rejected"
        try:
            await self.audit.record(action=f"http.{method.lower()}", resource=route_template(scope), outcome=outcome,
                                    actor=actor, role=role, detail=detail, request_id=rid)
        except Exception:  # noqa: BLE001 (the writer logged why; the caller decides what to answer)
            log.error("request %s could not be audited", rid)
            return False
        return True
