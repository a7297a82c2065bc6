"""The clinician review page (server-rendered): TOTP login, the queue, a twin beside the real history, verdicts.

The page authenticates with the same access token and server-side session as the API, held in an
HttpOnly, SameSite=Strict cookie; every form also carries a per-session CSRF token. Reads of a twin are
access-logged with the reason `review` (this page is the review tool).
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from html import escape
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from ...access_log import AccessEntryCreate, record_access
from ...auth import authenticate, check_rate, create_access_token
from ...errors import SiteError
from ...keyring import load_keyring
from ...patients import get_record
from ...review import decide, get_review, list_reviews, views
from ...review_models import RejectReason, ReviewStatus
from ...sessions import create_session, end_session
from ..deps import NowDep, Principal, SessionDep, SettingsDep, StoreDep, authenticate_bearer
from ..twin_deps import ServicesDep
from .reviews import regenerate

router = APIRouter(prefix="/review", tags=["review page"], include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent.parent / "templates"))
COOKIE = "evs_review"
CLINICAL = {"clinician", "site_admin"}


def _csrf(request: Request, sid: str | None) -> str:
    key = request.app.state.jwt_secret.encode()
    return hmac.new(key, f"csrf:{sid}".encode(), hashlib.sha256).hexdigest()[:32]


def _render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    resp = templates.TemplateResponse(request, name, {"title": "Review", "user": None, "message": None,
                                                      "error": False, **ctx}, status_code=status)
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
    return resp


def _principal(request: Request, settings, store, now) -> Principal | None:
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    try:
        user = authenticate_bearer(request, request.app.state.engine, settings, store, now, token)
    except (SiteError, HTTPException):
        return None
    return user if user.role in CLINICAL else None


def _to_login(message: str | None = None) -> RedirectResponse:
    return RedirectResponse("/review" + ("?expired=1" if message else ""), status_code=303)


@router.get("", response_class=HTMLResponse)
def queue_page(request: Request, session: SessionDep, settings: SettingsDep, store: StoreDep, now: NowDep,
               study: Annotated[str | None, Query(max_length=64)] = None,
               min_quality: Annotated[float | None, Query(ge=0, le=1)] = None,
               done: Annotated[str | None, Query(max_length=200)] = None,
               expired: Annotated[int | None, Query()] = None) -> HTMLResponse:
    """The login form, or the pending queue of a logged-in clinician."""
    user = _principal(request, settings, store, now)
    if user is None:
        return _render(request, "login.html", title="Log in",
                       message="Your session ended; log in again." if expired else None)
    rows, total = list_reviews(session=session, status=ReviewStatus.pending, study=study or None,
                               min_quality=min_quality, limit=200)
    return _render(request, "queue.html", title="Queue", user=user.name, csrf=_csrf(request, user.sid),
                   items=views(session=session, rows=rows, keyring=load_keyring(settings.site_dir)), count=total,
                   study=study, min_quality=min_quality,
                   message=done)


@router.post("/login", response_class=HTMLResponse)
def login_page(request: Request, session: SessionDep, settings: SettingsDep, store: StoreDep, now: NowDep,
               username: Annotated[str, Form(max_length=64)], password: Annotated[str, Form(max_length=256)],
               totp_code: Annotated[str, Form(max_length=10)]) -> Response:
    """Check password and TOTP code; on success the session's access token goes into an HttpOnly cookie."""
    client = request.client.host if request.client else "unknown"
    try:
        check_rate(store=store, client=client, now=now, per_minute=settings.login_rate_per_minute)
        user = authenticate(session=session, store=store, username=username, password=password, code=totp_code.strip(),
                            key=request.app.state.totp_key, now=now, max_failures=settings.login_max_failures,
                            lockout=timedelta(minutes=settings.lockout_minutes))
    except SiteError as exc:
        return _render(request, "login.html", status=401, title="Log in", message=str(exc), error=True)
    if user.role not in CLINICAL:
        return _render(request, "login.html", status=403, title="Log in", error=True,
                       message=f"role {user.role!r} does not review twins; log in as a clinician")
    s, _refresh = create_session(store=store, username=user.username, role=user.role, now=now,
                                 max_seconds=settings.session_max_hours * 3600)
    # the page session lives as long as the server-side session allows (idle and absolute limits)
    token, _ = create_access_token(secret=request.app.state.jwt_secret, subject=user.username, role=user.role,
                                   sid=s.sid, now=now, minutes=settings.session_idle_minutes)
    resp = RedirectResponse("/review", status_code=303)
    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=settings.tls_enabled, path="/review",
                    max_age=settings.session_idle_minutes * 60)
    return resp


@router.post("/logout")
def logout_page(request: Request, session: SessionDep, settings: SettingsDep, store: StoreDep, now: NowDep,
                csrf: Annotated[str, Form(max_length=64)] = "") -> Response:
    """End the page's session."""
    user = _principal(request, settings, store, now)
    if user is not None and hmac.compare_digest(csrf, _csrf(request, user.sid)):
        end_session(store=store, sid=user.sid, username=user.name)
    resp = RedirectResponse("/review", status_code=303)
    resp.delete_cookie(COOKIE, path="/review")
    return resp


def timeline_svg(history: list[tuple[float, str, float]], future: list[tuple[float, str, float]], *,
                 width: int = 980, panel: int = 120) -> str:
    """An inline SVG with one panel per code: real history (blue) before day 0, the twin's future (orange) after."""
    codes = sorted({c for _, c, _ in history + future})
    if not codes:
        return "<p>No measurements to plot.</p>"
    times = [t for t, _, _ in history + future]
    t0, t1 = min(times + [0.0]), max(times + [1.0])
    left, right = 90, 20
    x = lambda t: left + (t - t0) / ((t1 - t0) or 1) * (width - left - right)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{panel * len(codes) + 20}" '
             f'role="img" aria-label="timeline">']
    for k, code in enumerate(codes):
        top = k * panel + 10
        pts = [(t, v, "h") for t, c, v in history if c == code] + [(t, v, "f") for t, c, v in future if c == code]
        lo, hi = min(v for _, v, _ in pts), max(v for _, v, _ in pts)
        y = lambda v: top + panel - 25 - (v - lo) / ((hi - lo) or 1) * (panel - 40)  # noqa: E731
        parts.append(f'<text x="4" y="{top + 14}">{escape(code)}</text>'
                     f'<text x="4" y="{top + 28}">{hi:.4g}</text><text x="4" y="{top + panel - 25}">{lo:.4g}</text>'
                     f'<line x1="{left}" x2="{width - right}" y1="{top + panel - 15}" y2="{top + panel - 15}" '
                     f'stroke="#ccd"/><line x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{top}" y2="{top + panel - 15}" '
                     f'stroke="#889" stroke-dasharray="4 3"/>')
        for kind, color in (("h", "#1f77b4"), ("f", "#ff7f0e")):
            seq = sorted((t, v) for t, v, w in pts if w == kind)
            if len(seq) > 1:
                path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in seq)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            parts += [f'<circle class="{"real" if kind == "h" else "twin"}" cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" '
                      f'fill="{color}"><title>day {t:.0f}: {v:.4g}</title></circle>' for t, v in seq]
    parts.append(f'<text x="{left}" y="{panel * len(codes) + 15}">day {t0:.0f}</text>'
                 f'<text x="{width - right - 60}" y="{panel * len(codes) + 15}">day {t1:.0f}</text></svg>')
    return "".join(parts)


@router.get("/twins/{review_id}", response_class=HTMLResponse)
def twin_page(review_id: int, request: Request, session: SessionDep, settings: SettingsDep, store: StoreDep,
              now: NowDep) -> Response:
    """A twin next to the patient's real history, with approve and reject forms."""
    user = _principal(request, settings, store, now)
    if user is None:
        return _to_login("expired")
    try:
        keyring = load_keyring(settings.site_dir)
        row = views(session=session, rows=[get_review(session=session, review_id=review_id)], keyring=keyring)[0]
        record = get_record(engine=request.app.state.engine, keyring=keyring,
                            pseudonym=row.pseudonym)
    except SiteError as exc:
        return _render(request, "queue.html", status=404, user=user.name, csrf=_csrf(request, user.sid), items=[],
                       count=0, message=str(exc), error=True)
    record_access(engine=request.app.state.engine, at=now, data=AccessEntryCreate(
        actor=user.name, role=user.role, action="review.read", pseudonym=row.pseudonym, reason="review",
        request_id=getattr(request.state, "request_id", "")))
    history = [(e.time, e.code, e.value) for e in record.history(until=0.0) if e.value is not None]
    future = [(float(t), str(c), float(v)) for t, c, v, *_ in row.events if v is not None]
    return _render(request, "twin.html", title=f"Twin {row.id}", user=user.name, csrf=_csrf(request, user.sid), r=row,
                   outcome=row.outcome, svg=timeline_svg(history, future), reasons=[r.value for r in RejectReason])


@router.post("/twins/{review_id}/{verdict}")
async def verdict_page(review_id: int, verdict: str, request: Request, session: SessionDep, settings: SettingsDep,
                       store: StoreDep, services: ServicesDep, now: NowDep,
                       csrf: Annotated[str, Form(max_length=64)], reason: Annotated[str | None, Form()] = None,
                       text: Annotated[str, Form(max_length=2000)] = "") -> Response:
    """Approve or reject (with a reason and regeneration) from the page; back to the queue with the outcome."""
    user = _principal(request, settings, store, now)
    if user is None:
        return _to_login("expired")
    if verdict not in ("approve", "reject") or not hmac.compare_digest(csrf, _csrf(request, user.sid)):
        return _render(request, "queue.html", status=403, user=user.name, csrf=_csrf(request, user.sid), items=[],
                       count=0, message="the form expired or came from elsewhere; open the twin again", error=True)
    rid = getattr(request.state, "request_id", "")
    engine = request.app.state.engine

    async def work() -> str:
        if verdict == "approve":
            await run_in_threadpool(lambda: decide(engine=engine, review_id=review_id, status=ReviewStatus.approved,
                                                   actor=user.name, role=user.role, reason="review", request_id=rid,
                                                   now=now))
            return f"Twin {review_id} approved."
        why = RejectReason(reason or "")
        row = await run_in_threadpool(lambda: decide(
            engine=engine, review_id=review_id, status=ReviewStatus.rejected, actor=user.name, role=user.role,
            reason="review", request_id=rid, reject_reason=why, text=text, now=now))
        new, why_not = await regenerate(services=services, engine=engine, settings=settings, row=row, why=why,
                                        actor=user.name, role=user.role, reason="review", rid=rid, now=now)
        return f"Twin {review_id} rejected; " + (f"twin {new.id} regenerated and queued." if new else why_not)

    try:
        message = await work()
    except (SiteError, ValueError) as exc:
        message = str(exc).splitlines()[0]
    return RedirectResponse("/review?" + urlencode({"done": message[:200]}), status_code=303)
