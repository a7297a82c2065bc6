"""Request dependencies and login-body reading that both FastAPI services share.

Each service keeps its own Annotated aliases in its `api/deps.py` (typed with its own settings class and
principal); the functions behind them live here. The dependencies do no I/O, so they are `async def`
(FastAPI would run a plain `def` in the thread pool, and that hop costs more than they do).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from fastapi import Depends, HTTPException, Request, status
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


async def app_settings(request: Request) -> Any:
    """The settings the app was created with (its `state.settings`)."""
    return request.app.state.settings


async def app_engine(request: Request) -> sa.Engine:
    """The app's database engine."""
    return request.app.state.engine


async def request_id(request: Request) -> str:
    """The id of this request (set by the service middleware; echoed in X-Request-ID)."""
    return getattr(request.state, "request_id", "")


def unauthorized(message: str) -> HTTPException:
    """A 401 with `message` that asks for a Bearer token."""
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def role_gate(current_user: Callable[..., Any], roles: Sequence[str]) -> Callable[..., Awaitable[Any]]:
    """A dependency that lets the caller from `current_user` through only with one of `roles` (403 otherwise);
    the message lists `roles` in the order given."""
    async def check(user: Any = Depends(current_user)) -> Any:
        if user.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"role {user.role!r} may not do this; it needs one of: {', '.join(roles)}")
        return user

    return check


def form_or_json_body(model: type[BaseModel], media_types: Sequence[str]) -> dict[str, Any]:
    """The `openapi_extra` of a route whose required body is `model`, sent as any of `media_types`."""
    return {"requestBody": {"required": True,
                            "content": {t: {"schema": model.model_json_schema()} for t in media_types}}}


async def read_form_or_json(request: Request, model: type[M], *, invalid: str, unsupported: str) -> M:
    """`model` from a JSON body or a form (its fields by name); 422 with `invalid`, or 415 with `unsupported`
    for any other content type."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if ctype == "application/json":
            return model.model_validate(json.loads(await request.body() or b"null"))
        if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.form()
            return model.model_validate({k: form.get(k) for k in model.model_fields})
    except (ValueError, ValidationError):
        raise HTTPException(422, invalid) from None
    raise HTTPException(415, unsupported)
