"""Pieces both FastAPI services share: one-line JSON errors, route templates for metrics, raw JSON answers.

Every error a service returns is `{"detail": "<one line>"}`; domain errors map to statuses by class.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send


def freeze_startup_objects() -> None:
    """Move what startup made (modules, routes, schemas, pools) out of the garbage collector's sight.

    A served API process keeps those objects for its whole life; frozen, the collector's full passes skip
    them. Unfrozen, each full pass walked them all while every request in flight waited (50-60 ms pauses
    under load, which set the p99 latency). Call once, at the end of a served app's startup.
    """
    gc.collect()
    gc.freeze()


def one_line(text: object) -> str:
    """Collapse a message to one line of at most 500 characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= 500 else line[:497] + "..."


def _where(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) if parts else "body"


def validation_message(exc: RequestValidationError) -> str:
    """The first few validation problems as 'where: what' on one line (never the rejected value)."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON; send a JSON object with Content-Type: application/json"
    parts = []
    for e in errors[:3]:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{_where(tuple(e.get('loc', ())))}: {msg}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return one_line("invalid request: " + "; ".join(parts) + more)


def install_error_handlers(app: FastAPI, *, domain_error: type[Exception],
                           statuses: Mapping[type[Exception], int]) -> None:
    """Turn validation, HTTP and domain errors (`domain_error` subclasses, by `statuses`) into one-line JSON."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint; see /docs for the API"
        elif exc.status_code == 405:
            detail = "method not allowed on this endpoint; see /docs for the API"
        return JSONResponse({"detail": one_line(detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(domain_error)
    async def _domain(_request: Request, exc: Exception) -> JSONResponse:
        status = next((code for cls, code in statuses.items() if isinstance(exc, cls)), 400)
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return JSONResponse({"detail": one_line(exc)}, status_code=status, headers=headers or None)


def route_template(scope: Scope) -> str:
    """The matched route's path template (/api/v1/sites/{site_id}), never the raw path: bounded label sets."""
    # FastAPI includes routers lazily: the route object knows only its own path, the context the full one.
    context = (scope.get("fastapi") or {}).get("effective_route_context")
    return getattr(context, "path", None) or getattr(scope.get("route"), "path", None) or "<unmatched>"


async def send_json(send: Send, status: int, body: dict, headers: Mapping[str, str] | None = None) -> None:
    """Answer an ASGI request with a JSON body (for middleware, before the app runs)."""
    data = json.dumps(body).encode()
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": data})


async def read_body(headers: dict, receive: Receive, send: Send, *, limit: int, knob: str) -> bytes | None:
    """The whole request body, or None after answering 413 (or when the client went away).

    `knob` names the setting that raises the limit, for the one-line error.
    """
    too_big = {"detail": f"the request body is larger than the {limit}-byte limit; send less ({knob} sets the limit)"}
    declared = headers.get(b"content-length", b"").decode("latin-1")
    if declared.isdigit() and int(declared) > limit:
        await send_json(send, 413, too_big)
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            await send_json(send, 413, too_big)
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the already-read body first, then the connection's own messages."""
    sent = False

    async def receive_again() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
