"""Twin generation and outcome prediction for one patient with the promoted model, behind the site cache.

Cache keys are `<model version>:<kind>:<pseudonym>:<sha256 of the parameters>`: a new promoted
version never reads an older version's results, and `purge` empties the namespace on install.
When the cache (Redis) fails, results are computed uncached and the caller is told so
("unavailable"); the next call tries the cache again, so service recovers when Redis does.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from evoclone.federated.grammar import Constraints
from evoclone.federated.record import Arm, PatientRecord
from evoclone.federated.stores.cache import Cache

from .errors import InvalidInput, NotFound
from .local_models import LoadedModel

log = logging.getLogger("evoclone.site.inference")
CacheStatus = Literal["hit", "miss", "unavailable"]
RETRY_AFTER_FAILURE_S = 1.0  # while Redis is down, skip it for this long instead of paying a timeout per call


class SiteCache:
    """The twin/prediction cache with failure isolation: a broken backend degrades to uncached service."""

    def __init__(self, *, backend: Cache, ttl_seconds: float, retry_after_s: float = RETRY_AFTER_FAILURE_S) -> None:
        self.backend, self.ttl, self.retry_after_s = backend, ttl_seconds, retry_after_s
        self._down_until = 0.0

    def _usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + self.retry_after_s
        log.warning("twin cache unavailable (%s); serving uncached", type(exc).__name__)

    def lookup(self, key: str) -> tuple[dict | None, CacheStatus]:
        """The cached value of `key` (None when absent) and how the cache answered."""
        if not self._usable():
            return None, "unavailable"
        try:
            raw = self.backend.get(key)
        except Exception as exc:  # noqa: BLE001 (any backend failure means: serve uncached)
            self._failed(exc)
            return None, "unavailable"
        return (json.loads(raw), "hit") if raw is not None else (None, "miss")

    def store(self, key: str, value: dict, status: CacheStatus) -> CacheStatus:
        """Cache a computed value after a miss; the status to report."""
        if status != "miss":
            return status
        try:
            self.backend.set(key, json.dumps(value, separators=(",", ":")).encode(), ttl=self.ttl)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return "unavailable"
        return "miss"

    def get_or_compute(self, key: str, compute: Callable[[], dict]) -> tuple[dict, CacheStatus]:
        """The cached value of `key`, or `compute()` stored for the TTL; with how it was served."""
        value, status = self.lookup(key)
        if value is not None:
            return value, status
        value = compute()
        return value, self.store(key, value, status)

    def purge(self, prefix: str = "") -> int:
        """Remove cached results (all, or those under a prefix such as a model version); -1 when unavailable."""
        try:
            return self.backend.delete_prefix(prefix)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return -1


def cache_key(version: str, kind: str, pseudonym: str, params: dict) -> str:
    """The key of one result: model version, kind, pseudonym and a digest of the parameters."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:24]
    return f"{version}:{kind}:{pseudonym}:{digest}"


def parse_arm(arm: str) -> Arm:
    """control or treatment."""
    try:
        return Arm.CONTROL if arm == "control" else Arm.TREATMENT if arm == "treatment" else Arm[arm]
    except KeyError:
        raise InvalidInput("arm must be control or treatment") from None


def generate(*, model: LoadedModel, record: PatientRecord, arm: str, count: int, horizon_days: float | None = None,
             seed: int = 0, max_tries: int = 3, constraints: Constraints | None = None) -> dict[str, Any]:
    """Gated twins of one patient: each with its quality score and its generated events (days after index)."""
    from evoclone.federated.generation import SamplingConfig
    from evoclone.federated.quality import generate_twins

    tok = model.tokenizer
    horizon = float(tok.spec.horizon_days)
    if horizon_days is not None and horizon_days > horizon:
        raise InvalidInput(f"horizon_days may be at most {horizon:g} for this model (its training horizon)")
    cut = horizon if horizon_days is None else float(horizon_days)
    with model.lock:
        twins, failed, stats = generate_twins(model.generator, tok, [record], arm=parse_arm(arm), n=count,
                                              sampling=SamplingConfig(seed=seed, batch_size=min(64, count)),
                                              max_tries=max_tries, meta=model.generator_entry.get("meta") or None,
                                              constraints=constraints)
    out = []
    for t in twins:
        o = t.record.outcomes
        within = o.time_to_event is not None and o.time_to_event <= cut
        out.append({"copy_index": t.copy, "quality": t.quality, "tries": t.tries,
                    "outcome": {"time": min(o.time_to_event, cut) if o.time_to_event is not None else None,
                                "event": bool(o.event) and within},
                    "events": [[e.time, e.code, e.value, e.unit] for e in t.record.events if 0 < e.time <= cut]})
    return {"model_version": model.version, "arm": arm, "count": count, "horizon_days": cut,
            "passed": stats["passed"], "failed": stats["failed"], "twins": out,
            "failures": [{"copy_index": f.copy, "tries": f.tries, "reasons": list(f.reasons)} for f in failed]}


def predict(*, model: LoadedModel, record: PatientRecord, arm: str) -> dict[str, Any]:
    """Risk with its 95% interval, the risk category and the top features, for one patient under one arm."""
    from evoclone.federated.features import encode_cohort
    from evoclone.federated.predictor import feature_groups, top_features

    chosen = record.model_copy(update={"arm": parse_arm(arm)})
    try:
        arrays = encode_cohort([chosen], model.spec)
    except ValueError as exc:
        raise InvalidInput(f"the patient's record does not fit this model's features ({str(exc).splitlines()[0]})"
                           ) from None
    groups = feature_groups(model.spec)
    with model.lock:
        pred = model.ensemble.predict(arrays)
        top = top_features(model.ensemble.explain(arrays, groups), groups.names, k=3)
    return {"model_version": model.version, "arm": arm, "risk": round(float(pred["risk"][0]), 4),
            "ci_low": round(float(pred["ci_low"][0]), 4), "ci_high": round(float(pred["ci_high"][0]), 4),
            "interval": 0.95, "category": str(pred["category"][0]), "top_features": list(top[0]),
            "risk_definition": model.predictor_entry.get("risk_definition")}


def value_bins(tok, code: str, value: float) -> int:
    """The value token of a code's measurement."""
    c = tok.codes[code]
    return tok.value_ids[code][bisect.bisect_right(c.edges, value)]


@dataclass
class Job:
    """A background cohort job: progress, cancellation and a summary (no per-patient rows)."""

    id: str
    kind: str
    total: int = 0
    done: int = 0
    status: str = "running"  # running, done, cancelled, failed
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)


class JobRunner:
    """Runs cohort jobs on daemon threads, one at a time per job, with progress and cancellation."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, work: Callable[[Job], None]) -> Job:
        """Start `work(job)` on a thread; it updates job.done/total and checks job.cancel."""
        job = Job(id=uuid.uuid4().hex, kind=kind)
        with self._lock:
            self.jobs[job.id] = job

        def run() -> None:
            try:
                work(job)
                job.status = "cancelled" if job.cancel.is_set() else "done"
            except Exception as exc:  # noqa: BLE001 (a failed job reports why; it must not kill the server)
                job.status, job.error = "failed", (str(exc).splitlines() or [type(exc).__name__])[0][:300]

        threading.Thread(target=run, name=f"cohort-job-{job.id[:8]}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        """A job by id; NotFound otherwise."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound("no such job at this site; start one with POST /api/v1/jobs/cohort-predictions")
        return job

    def shutdown(self) -> None:
        """Ask every running job to stop."""
        for job in list(self.jobs.values()):
            job.cancel.set()
