"""Training snapshots: the anonymized, encoded arrays a site hands to its ClientApp."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .features import FeatureSpec

FORMAT = "evoclone-snapshot/1"


def write_snapshot(path: Path, arrays: dict[str, np.ndarray], *, spec: FeatureSpec, site: str) -> None:
    """Write arrays atomically with the feature spec fingerprint in the header."""
    meta = {"format": FORMAT, "site": site, "rows": str(len(arrays["static"])),
            "feature_spec": spec.fingerprint(), "spec": json.dumps({"max_visits": spec.max_visits})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_snapshot(path: Path, *, spec: FeatureSpec | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load a snapshot; refuse one encoded with another feature spec."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an EvoClone training snapshot (format {meta.get('format')!r})")
    if spec is not None and meta.get("feature_spec") != spec.fingerprint():
        raise ValueError(f"{path}: snapshot was encoded with another feature spec; re-export it")
    return load_file(str(path)), meta
