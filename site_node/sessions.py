"""Server-side sessions of the site API, and the counters of its login limits.

A session lives in Redis when the site settings name one (every worker sees it, so a logout
or an admin's revocation stops a token at once everywhere), else in this process. Expiry
decisions use the caller's clock (so tests move time instead of sleeping); the stores' own
TTLs only collect garbage. When Redis does not answer, StoreUnavailable is raised: without
the store a revoked session cannot be told from a live one, so authentication fails closed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from datetime import datetime

from .errors import AuthenticationFailed, StoreUnavailable

REFRESH_PREFIX = "evr_"


class SessionBackend(ABC):
    """Bytes by key with a garbage-collection TTL, atomic counters and prefix listing."""

    blocking = True  # whether a call may wait on I/O (an async caller runs it off the event loop)

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value, or None."""

    @abstractmethod
    def set(self, key: str, value: bytes, *, ttl: float) -> None:
        """Store a value, dropped after `ttl` seconds."""

    @abstractmethod
    def delete(self, *keys: str) -> int:
        """Remove keys; how many existed."""

    @abstractmethod
    def incr(self, key: str, *, ttl: float) -> int:
        """Add one to a counter (created at 0 with `ttl`) and return it."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Every key starting with `prefix` (without the namespace)."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable when the store does not answer."""

    def close(self) -> None:
        """Release connections."""


class MemoryBackend(SessionBackend):
    """A dict with deadlines, guarded by a lock: one process only."""

    blocking = False

    def __init__(self) -> None:
        self._data: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is not None and item[0] <= time.monotonic():
            del self._data[key]
            return None
        return None if item is None else item[1]

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._live(key)

    def set(self, key: str, value: bytes, *, ttl: float) -> None:
        with self._lock:
            self._data[key] = (time.monotonic() + ttl, bytes(value))

    def delete(self, *keys: str) -> int:
        with self._lock:
            return sum(self._data.pop(k, None) is not None for k in keys)

    def incr(self, key: str, *, ttl: float) -> int:
        with self._lock:
            value = int(self._live(key) or 0) + 1
            deadline = self._data[key][0] if key in self._data else time.monotonic() + ttl
            self._data[key] = (deadline, str(value).encode())
            return value

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            return [k for k in list(self._data) if k.startswith(prefix) and self._live(k) is not None]

    def ping(self) -> None:
        return None


class RedisBackend(SessionBackend):
    """Redis under a namespace; connection failures become StoreUnavailable."""

    def __init__(self, *, url: str, namespace: str) -> None:
        import redis

        self.ns = namespace
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors:
            raise StoreUnavailable("the session store (Redis) does not answer; logins and sessions are refused "
                                   "until it returns; check EVOCLONE_REDIS_URL / redis_url in site.json") from None

    def get(self, key: str) -> bytes | None:
        return self._call(self.client.get, f"{self.ns}:{key}")

    def set(self, key: str, value: bytes, *, ttl: float) -> None:
        self._call(self.client.set, f"{self.ns}:{key}", bytes(value), px=max(1, int(ttl * 1000)))

    def delete(self, *keys: str) -> int:
        return int(self._call(self.client.delete, *(f"{self.ns}:{k}" for k in keys))) if keys else 0

    def incr(self, key: str, *, ttl: float) -> int:
        def run() -> int:
            pipe = self.client.pipeline()  # MULTI: the count and its expiry are set together
            pipe.incr(f"{self.ns}:{key}")
            pipe.pexpire(f"{self.ns}:{key}", max(1, int(ttl * 1000)), nx=True)
            return int(pipe.execute()[0])

        return self._call(run)

    def keys(self, prefix: str) -> list[str]:
        pattern = f"{self.ns}:{prefix}".replace("*", r"\*").replace("?", r"\?").replace("[", r"\[") + "*"
        found = self._call(lambda: list(self.client.scan_iter(match=pattern, count=500)))
        return [k.decode()[len(self.ns) + 1:] for k in found]

    def ping(self) -> None:
        self._call(self.client.ping)

    def close(self) -> None:
        self.client.close()


def open_backend(url: str, *, namespace: str) -> SessionBackend:
    """`redis://...` selects Redis; empty or `memory://` the in-process store."""
    if not namespace or ":" in namespace:
        raise ValueError("the session namespace must be non-empty and contain no ':'")
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBackend(url=url, namespace=namespace)
    if url in ("", "memory://"):
        return MemoryBackend()
    raise ValueError(f"unsupported session store URL scheme {url.split('://')[0]!r} in redis_url; use redis:// "
                     "or leave it empty for the in-process store")


@dataclass(frozen=True)
class SiteSession:
    """One login: who, with which role, since when, when last refreshed, and its current refresh secret's hash."""

    sid: str
    username: str
    role: str
    created: float  # epoch seconds by the service clock
    last_seen: float
    refresh_hash: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _save(store: SessionBackend, s: SiteSession, *, max_seconds: float) -> None:
    ttl = max(1.0, max_seconds)
    store.set(f"sess:{s.sid}", json.dumps(asdict(s)).encode(), ttl=ttl)
    store.set(f"usess:{s.username}:{s.sid}", b"1", ttl=ttl)


def create_session(*, store: SessionBackend, username: str, role: str, now: datetime,
                   max_seconds: float) -> tuple[SiteSession, str]:
    """A new session and its refresh token (`evr_<sid>.<secret>`, shown once; only its hash is kept)."""
    sid, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
    s = SiteSession(sid=sid, username=username, role=role, created=now.timestamp(), last_seen=now.timestamp(),
                    refresh_hash=_digest(secret))
    _save(store, s, max_seconds=max_seconds)
    return s, f"{REFRESH_PREFIX}{sid}.{secret}"


def get_session(*, store: SessionBackend, sid: str, now: datetime, idle_seconds: float,
                max_seconds: float) -> SiteSession | None:
    """The live session `sid`, or None when it ended (logout, revocation, idle or absolute expiry)."""
    raw = store.get(f"sess:{sid}")
    if raw is None:
        return None
    s = SiteSession(**json.loads(raw))
    t = now.timestamp()
    if t - s.created > max_seconds or t - s.last_seen > idle_seconds:
        end_session(store=store, sid=s.sid, username=s.username)
        return None
    return s


def rotate_refresh(*, store: SessionBackend, refresh_token: str, now: datetime, idle_seconds: float,
                   max_seconds: float) -> tuple[SiteSession, str]:
    """Exchange a refresh token for a new one of the same session; a reused (stolen) one ends the session."""
    sid, _, secret = refresh_token.removeprefix(REFRESH_PREFIX).partition(".")
    s = get_session(store=store, sid=sid, now=now, idle_seconds=idle_seconds, max_seconds=max_seconds) \
        if refresh_token.startswith(REFRESH_PREFIX) and sid and secret else None
    if s is None:
        raise AuthenticationFailed("the refresh token's session has ended (logout, revocation or expiry); log in "
                                   "again at /api/v1/auth/login")
    if not hmac.compare_digest(s.refresh_hash, _digest(secret)):
        end_session(store=store, sid=s.sid, username=s.username)
        raise AuthenticationFailed("the refresh token was already used; the session was ended, log in again at "
                                   "/api/v1/auth/login")
    new_secret = secrets.token_urlsafe(32)
    s = SiteSession(**{**asdict(s), "last_seen": now.timestamp(), "refresh_hash": _digest(new_secret)})
    _save(store, s, max_seconds=max_seconds - (now.timestamp() - s.created))
    return s, f"{REFRESH_PREFIX}{s.sid}.{new_secret}"


def end_session(*, store: SessionBackend, sid: str, username: str) -> None:
    """Delete one session (logout)."""
    store.delete(f"sess:{sid}", f"usess:{username}:{sid}")


def end_user_sessions(*, store: SessionBackend, username: str) -> int:
    """Delete every session of `username` (revocation); how many there were."""
    index = store.keys(f"usess:{username}:")
    sids = [k.rsplit(":", 1)[1] for k in index]
    n = store.delete(*(f"sess:{sid}" for sid in sids)) if sids else 0
    store.delete(*index)
    return n
