"""Answers of the registry and status GETs, kept per API process while the database has not changed.

Sponsors' dashboards and sites poll these endpoints; without a cache every poll runs the routing, the
dependencies, the queries and the response model again for an answer that has not changed. An answer is
kept under (role, path, query) with the data version (`federated/stores/data_version.py`) read *before* it was
computed, and served again only while the version is the same and for at most `response_cache_seconds`:
a write committed in any process changes the version, so the next read anywhere recomputes (a write
that slipped in while an answer was computed left a version the answer does not carry).

A kept answer is served only to a caller whose access token verifies (signature, expiry, type) and
whose user the process's user check vouches for with the same role (`deps.UserCache`, the route's own
rule); anyone else goes through the route. Only 200 answers of the listed read endpoints are kept; each
served request is audited and counted like any other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from evoclone.federated.stores.data_version import DataVersion, Memo

# the registry and status reads: their answers depend on the database and the caller's role only
CACHEABLE = re.compile(r"^/api/v1/(runs|studies|models|sites)(/[0-9]{1,10})?/?$")
MAX_BODY = 1 << 20  # larger answers are not kept


@dataclass(frozen=True)
class Entry:
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    route: str  # the route template, for the metrics and the audit trail


class ResponseCache:
    """Bounded map (role, path, query) -> Entry, kept with the data version (a Memo)."""

    def __init__(self, version: DataVersion, *, seconds: float, size: int = 2048) -> None:
        self.version = version
        self._memo = Memo(version, seconds=seconds, size=size)

    def get(self, key: tuple[str, str, bytes], version: bytes) -> Entry | None:
        entry = self._memo.get(key, version)
        return None if entry is Memo.MISS else entry

    def put(self, key: tuple[str, str, bytes], version: bytes, headers, body: bytes, route: str) -> None:
        if len(body) <= MAX_BODY:
            self._memo.put(key, Entry(tuple(headers), body, route), version)
