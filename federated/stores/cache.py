"""Cache and sessions: in-process by default, Redis in production. Values are bytes with a TTL."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod


class Cache(ABC):
    """Bytes by key, with expiry; keys live under a namespace so several users can share a server."""

    blocking = True  # whether a call may wait on I/O (an async caller runs it off the event loop)

    def __init__(self, *, namespace: str) -> None:
        if not namespace or ":" in namespace:
            raise ValueError("cache namespace must be non-empty and contain no ':'")
        self.namespace = namespace

    def _k(self, key: str) -> str:
        return f"{self.namespace}:{key}"

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired."""

    @abstractmethod
    def set(self, key: str, value: bytes, *, ttl: float) -> None:
        """Store a value for `ttl` seconds."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove a key; True when it existed."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with `prefix` (e.g. all results of a model version)."""

    def close(self) -> None:
        """Release connections."""


def _check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError("ttl must be a positive number of seconds")


class MemoryCache(Cache):
    """A dict with deadlines, guarded by a lock (one process only)."""

    blocking = False

    def __init__(self, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self._data: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._data.get(self._k(key))
            if item is None:
                return None
            if item[0] <= time.monotonic():
                del self._data[self._k(key)]
                return None
            return item[1]

    def set(self, key: str, value: bytes, *, ttl: float) -> None:
        _check_ttl(ttl)
        with self._lock:
            self._data[self._k(key)] = (time.monotonic() + ttl, bytes(value))

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._data.pop(self._k(key), None) is not None

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._data if k.startswith(self._k(prefix))]
            for k in doomed:
                del self._data[k]
            return len(doomed)


class RedisCache(Cache):
    """Redis (redis-py): SET with PX expiry, SCAN + UNLINK for prefix invalidation."""

    def __init__(self, *, url: str, namespace: str) -> None:
        import redis

        super().__init__(namespace=namespace)
        self.client = redis.Redis.from_url(url, socket_timeout=5)

    def get(self, key: str) -> bytes | None:
        return self.client.get(self._k(key))

    def set(self, key: str, value: bytes, *, ttl: float) -> None:
        _check_ttl(ttl)
        self.client.set(self._k(key), bytes(value), px=max(1, int(ttl * 1000)))

    def delete(self, key: str) -> bool:
        return bool(self.client.delete(self._k(key)))

    def delete_prefix(self, prefix: str) -> int:
        n = 0
        batch: list[bytes] = []
        for k in self.client.scan_iter(match=self._k(prefix).replace("*", r"\*") + "*", count=500):
            batch.append(k)
            if len(batch) >= 500:
                n += self.client.unlink(*batch)
                batch.clear()
        if batch:
            n += self.client.unlink(*batch)
        return n

    def close(self) -> None:
        self.client.close()


def open_cache(url: str, *, namespace: str) -> Cache:
    """`redis://...` selects Redis; empty or `memory://` the in-process cache."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisCache(url=url, namespace=namespace)
    if url in ("", "memory://"):
        return MemoryCache(namespace=namespace)
    raise ValueError(f"unsupported cache URL scheme in {url.split('://')[0]!r}; use redis:// or memory://")
