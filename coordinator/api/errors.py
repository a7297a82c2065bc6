"""Every error the API returns is JSON `{"detail": "<one line>"}` with a fitting status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AuthenticationFailed, Conflict, CoordinatorError, InvalidInput, NotFound

STATUS = {NotFound: 404, Conflict: 409, InvalidInput: 422, AuthenticationFailed: 401}


def one_line(text: object) -> str:
    """Collapse a message to one line of at most 500 characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= 500 else line[:497] + "..."


def _where(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) if parts else "body"


def validation_message(exc: RequestValidationError) -> str:
    """The first few validation problems as 'where: what' on one line."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON; send a JSON object with Content-Type: application/json"
    parts = []
    for e in errors[:3]:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{_where(tuple(e.get('loc', ())))}: {msg}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return one_line("invalid request: " + "; ".join(parts) + more)


def install(app: FastAPI) -> None:
    """Register the handlers that turn errors into one-line JSON."""

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

    @app.exception_handler(CoordinatorError)
    async def _domain(_request: Request, exc: CoordinatorError) -> JSONResponse:
        status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 400)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": one_line(exc)}, status_code=status, headers=headers)
