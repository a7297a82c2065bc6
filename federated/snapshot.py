"""Training snapshots: the anonymized canonical records a site hands to its ClientApp.

A snapshot holds records, not tensors: the feature spec and the twin vocabulary of a
federated study are fitted from the sites' merged summaries at the start of each run, so
encoding happens in the ClientApp with the study's spec. The file is gzip JSON lines (a
header line, then one record per line), written atomically with mode 0600.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .record import PatientRecord

FORMAT = "evoclone-snapshot/2"


def write_snapshot(path: Path, records: Iterable[PatientRecord], *, site: str) -> int:
    """Write records atomically (mode 0600); returns how many were written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    n = 0
    with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write((json.dumps({"format": FORMAT, "site": site}) + "\n").encode())
        for r in records:
            f.write((r.model_dump_json() + "\n").encode())
            n += 1
    os.replace(tmp, path)
    return n


def read_snapshot(path: Path) -> tuple[list[PatientRecord], dict[str, str]]:
    """(records, header) of a snapshot; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training snapshot {path} does not exist; run `evoclone site export-snapshot`")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            header = json.loads(f.readline() or "{}")
            if header.get("format") != FORMAT:
                raise ValueError(f"{path}: not an EvoClone training snapshot (format {header.get('format')!r}); "
                                 "re-export it with `evoclone site export-snapshot`")
            records = [PatientRecord.model_validate_json(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable training snapshot ({exc}); re-export it") from None
    return records, header
