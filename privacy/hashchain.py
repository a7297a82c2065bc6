"""Hash chains for append-only logs: hash = sha256(prev_hash + canonical JSON of the entry).

An edited entry no longer matches its hash; a removed or reordered one breaks the next
entry's prev_hash or the seq sequence. Pure functions: the caller reads and stores the entries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

GENESIS = "0" * 64


@dataclass(frozen=True)
class ChainReport:
    """Result of verifying a chain: ok, entries checked, the first problem and the last good link."""

    ok: bool
    checked: int
    problem: str = ""
    seq: int | None = None  # the first bad entry's seq (None when ok)
    head_seq: int = 0  # the last entry that verified (0: none)
    head_hash: str = GENESIS


def canonical_time(value: datetime | str) -> str:
    """A timestamp as UTC ISO-8601 with microseconds (naive values are UTC)."""
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def compute_hash(prev_hash: str, entry: Mapping[str, Any]) -> str:
    """sha256 over the previous hash and the entry's canonical JSON (sorted keys, no spaces; `hash` left out)."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(prev_hash.encode() + canonical.encode()).hexdigest()


def verify_chain(entries: Iterable[tuple[Mapping[str, Any], str]], *, what: str = "entry") -> ChainReport:
    """Check (entry, stored hash) pairs: seq continuity from 1, every prev_hash link and every hash."""
    prev_hash, expected, n = GENESIS, 1, 0
    for entry, stored in entries:
        seq = entry["seq"]
        if seq != expected:
            how = "missing or reordered" if seq > expected else "reordered or duplicated"
            return ChainReport(False, n, f"{what} {expected} is {how} (found seq {seq} in its place)", seq,
                               expected - 1, prev_hash)
        if entry["prev_hash"] != prev_hash:
            return ChainReport(False, n, f"{what} {seq} does not link to {what} {seq - 1} "
                                         "(an entry before it was removed, reordered or edited)", seq, seq - 1,
                               prev_hash)
        if compute_hash(entry["prev_hash"], entry) != stored:
            return ChainReport(False, n, f"{what} {seq} was modified after it was written (hash mismatch)", seq,
                               seq - 1, prev_hash)
        prev_hash, expected, n = stored, seq + 1, n + 1
    return ChainReport(True, n, head_seq=expected - 1, head_hash=prev_hash)
