"""Drift between a site's training reference and its current data: PSI, KS, MMD, missingness, outcome rates.

Pure: samples in, payload parts out. A cell counting 1 to MIN_COUNT - 1 patients never shapes a
reported number: numeric bins merge with a neighbour and rare levels pool until every cell counts
zero or at least MIN_COUNT patients in both samples (a zero cell reveals no one: a new category
is drift worth seeing). A feature with fewer than MIN_COUNT observed patients in either sample is
reported suppressed, its statistics withheld. Statistics leave rounded to three significant
digits, like the data summaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .payloads import MIN_COUNT, DriftFeature, OutcomeRate
from .summaries import _sig, level

BINS = 10  # PSI bins: the reference's deciles
MMD_SAMPLES = 500  # per sample: the kernel matrix stays small whatever the cohort
PSI_FLOOR = 1e-4  # proportion used for an empty cell, so a new or vanished cell gives a large, finite PSI


def is_missing(v: object) -> bool:
    """None, an empty string or NaN."""
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def _small(count: int, min_count: int) -> bool:
    return 0 < count < min_count


def _sig3(x: float) -> float:
    return _sig(float(x), 3)


def merge_small_cells(reference: Sequence[int], current: Sequence[int], *,
                      min_count: int = MIN_COUNT) -> tuple[list[int], list[int], int]:
    """Ordered cells merged with a neighbour until none counts 1..min_count-1 in either sample.

    Returns (reference counts, current counts, merges); cells empty in both samples are dropped.
    """
    if len(reference) != len(current):
        raise ValueError(f"reference and current have {len(reference)} and {len(current)} cells; bin both alike")
    ref, cur = [], []
    for r, c in zip(reference, current):
        if r or c:
            ref.append(int(r))
            cur.append(int(c))
    merges = 0
    while len(ref) > 1:
        bad = next((i for i in range(len(ref)) if _small(ref[i], min_count) or _small(cur[i], min_count)), None)
        if bad is None:
            break
        if bad == 0:
            other = 1
        elif bad == len(ref) - 1:
            other = bad - 1
        else:  # the smaller neighbour keeps the merged bins balanced
            other = bad - 1 if ref[bad - 1] + cur[bad - 1] <= ref[bad + 1] + cur[bad + 1] else bad + 1
        lo, hi = min(bad, other), max(bad, other)
        ref[lo:hi + 1] = [ref[lo] + ref[hi]]
        cur[lo:hi + 1] = [cur[lo] + cur[hi]]
        merges += 1
    return ref, cur, merges


def pool_rare_levels(reference: dict[str, int], current: dict[str, int], *,
                     min_count: int = MIN_COUNT) -> tuple[list[int], list[int], int]:
    """Category counts as cells: levels counting 1..min_count-1 in either sample pooled into one cell, and a
    cell still small merged into the smallest other one; (reference counts, current counts, levels pooled)."""
    levels = sorted(set(reference) | set(current), key=lambda k: (-reference.get(k, 0), -current.get(k, 0), k))
    ref, cur, pool_r, pool_c, pooled = [], [], 0, 0, 0
    for k in levels:
        r, c = reference.get(k, 0), current.get(k, 0)
        if _small(r, min_count) or _small(c, min_count):
            pool_r, pool_c, pooled = pool_r + r, pool_c + c, pooled + 1
        else:
            ref.append(r)
            cur.append(c)
    if pool_r or pool_c:
        ref.append(pool_r)
        cur.append(pool_c)
    while len(ref) > 1:  # a small cell joins the smallest cell that makes it large enough, else the smallest
        bad = next((i for i in range(len(ref)) if _small(ref[i], min_count) or _small(cur[i], min_count)), None)
        if bad is None:
            break
        others = [i for i in range(len(ref)) if i != bad]
        enough = [i for i in others if not _small(ref[i] + ref[bad], min_count)
                  and not _small(cur[i] + cur[bad], min_count)]
        other = min(enough or others, key=lambda i: ref[i] + cur[i])
        ref[other] += ref[bad]
        cur[other] += cur[bad]
        del ref[bad], cur[bad]
    return ref, cur, pooled


def psi(reference: Sequence[int], current: Sequence[int]) -> float:
    """Population stability index of two count vectors over the same cells (0 for a single cell)."""
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(current, dtype=np.float64)
    if r.shape != c.shape or r.sum() <= 0 or c.sum() <= 0:
        raise ValueError("psi needs two count vectors of the same length, each with a positive total")
    p = np.maximum(r / r.sum(), PSI_FLOOR)
    q = np.maximum(c / c.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_statistic(reference: Sequence[float], current: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(current, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        raise ValueError("ks_statistic needs two non-empty samples")
    grid = np.concatenate([a, b])
    gap = np.abs(np.searchsorted(a, grid, side="right") / a.size - np.searchsorted(b, grid, side="right") / b.size)
    return float(gap.max())


def mmd_rbf(reference: Sequence[float], current: Sequence[float], *, max_samples: int = MMD_SAMPLES,
            seed: int = 0) -> float:
    """Squared MMD (unbiased, clipped at 0) with an RBF kernel whose bandwidth is the median pairwise
    distance of the pooled sample; each sample is subsampled to `max_samples` without replacement."""
    if max_samples < 2:
        raise ValueError(f"max_samples must be at least 2, got {max_samples}")
    rng = np.random.default_rng(seed)

    def sub(values: Sequence[float]) -> np.ndarray:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        return rng.choice(arr, size=max_samples, replace=False) if arr.size > max_samples else arr

    x, y = sub(reference), sub(current)
    n, m = x.size, y.size
    if n < 2 or m < 2:
        raise ValueError("mmd_rbf needs at least two values in each sample")
    z = np.concatenate([x, y])
    d2 = (z[:, None] - z[None, :]) ** 2  # [n+m, n+m]
    med = float(np.median(d2[np.triu_indices(n + m, k=1)]))
    if med <= 0:  # over half the pairs tie: fall back to the mean distance, then to unit width
        med = float(d2.mean()) or 1.0
    k = np.exp(-d2 / (2 * med))
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    value = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
             - 2 * kxy.mean())
    return max(0.0, float(value))


def share(count: int, total: int, *, min_count: int = MIN_COUNT) -> float | None:
    """count / total, or None when either cell (count, total - count) holds 1..min_count-1 patients."""
    if total <= 0 or _small(count, min_count) or _small(total - count, min_count):
        return None
    return _sig3(count / total)


def _missing_rates(reference: Sequence, current: Sequence, min_count: int) -> tuple[float | None, float | None]:
    ref = share(sum(map(is_missing, reference)), len(reference), min_count=min_count)
    cur = share(sum(map(is_missing, current)), len(current), min_count=min_count)
    return ref, cur


def numeric_drift(name: str, reference: Sequence, current: Sequence, *, min_count: int = MIN_COUNT,
                  bins: int = BINS, mmd_samples: int = MMD_SAMPLES, seed: int = 0) -> DriftFeature:
    """PSI on the reference's quantile bins, KS and MMD of one numeric feature (missing values skipped)."""
    ref = np.asarray([float(v) for v in reference if not is_missing(v)], dtype=np.float64)
    cur = np.asarray([float(v) for v in current if not is_missing(v)], dtype=np.float64)
    ref_missing, cur_missing = _missing_rates(reference, current, min_count)
    if ref.size < min_count or cur.size < min_count:
        return DriftFeature(name=name, kind="numeric", suppressed=True, missing_rate=cur_missing,
                            reference_missing_rate=ref_missing)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
    cur_counts = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1)
    r, c, merged = merge_small_cells(ref_counts.tolist(), cur_counts.tolist(), min_count=min_count)
    return DriftFeature(name=name, kind="numeric", psi=_sig3(psi(r, c)), ks=_sig3(ks_statistic(ref, cur)),
                        mmd=_sig3(mmd_rbf(ref, cur, max_samples=mmd_samples, seed=seed)),
                        missing_rate=cur_missing, reference_missing_rate=ref_missing, cells=len(r),
                        suppressed_cells=merged)


def categorical_drift(name: str, reference: Sequence, current: Sequence, *,
                      min_count: int = MIN_COUNT) -> DriftFeature:
    """PSI over the levels of one categorical feature, rare levels pooled (missing values skipped)."""
    ref_levels: dict[str, int] = {}
    cur_levels: dict[str, int] = {}
    for values, counts in ((reference, ref_levels), (current, cur_levels)):
        for v in values:
            if not is_missing(v):
                counts[level(v)] = counts.get(level(v), 0) + 1
    ref_missing, cur_missing = _missing_rates(reference, current, min_count)
    if sum(ref_levels.values()) < min_count or sum(cur_levels.values()) < min_count:
        return DriftFeature(name=name, kind="categorical", suppressed=True, missing_rate=cur_missing,
                            reference_missing_rate=ref_missing)
    r, c, pooled = pool_rare_levels(ref_levels, cur_levels, min_count=min_count)
    return DriftFeature(name=name, kind="categorical", psi=_sig3(psi(r, c)), missing_rate=cur_missing,
                        reference_missing_rate=ref_missing, cells=len(r), suppressed_cells=pooled)


def outcome_rate(name: str, reference: Sequence, current: Sequence, *, min_count: int = MIN_COUNT) -> OutcomeRate:
    """The share of 1s among known 0/1 outcomes in each sample; None where a cell is small."""
    def rate(values: Sequence) -> float | None:
        known = [int(v) for v in values if not is_missing(v)]
        return share(sum(known), len(known), min_count=min_count) if len(known) >= min_count else None

    ref, cur = rate(reference), rate(current)
    return OutcomeRate(name=name, reference=ref, current=cur, suppressed=ref is None or cur is None)
