"""Twin generation and outcome prediction for one patient with the promoted model, behind the site cache.

The model runs in a small pool of inference worker processes (`InferencePool`), never in the API
process: a generation holds a CPU for seconds, and in the API process it would hold the GIL too, so
every cached lookup would queue behind it. Each worker verifies and loads a version once (cached by
version and manifest digest, so a promotion is picked up by the next task) and runs at a lower CPU
priority, so interactive requests win when the cores are busy.

Cache keys are `<model version>:<kind>:<pseudonym>:<sha256 of the parameters>`: a new promoted
version never reads an older version's results, and `purge` empties the namespace on install.
When the cache (Redis) fails, results are computed uncached and the caller is told so
("unavailable"); the next call tries the cache again, so service recovers when Redis does.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import sqlalchemy as sa

from evoclone.federated.grammar import Constraints
from evoclone.federated.record import Arm, PatientRecord
from evoclone.federated.stores.cache import Cache

from .errors import InvalidInput, NotFound, StoreUnavailable
from .local_models import LoadedModel, LocalModel, NoModelInstalled, load_version

log = logging.getLogger("evoclone.site.inference")
CacheStatus = Literal["hit", "miss", "unavailable"]
RETRY_AFTER_FAILURE_S = 1.0  # while Redis is down, skip it for this long instead of paying a timeout per call
WORKER_NICE = 10  # inference workers yield the CPU to the API process (and its cached lookups) when both want it
# imported once by the fork server, so a new or restarted worker starts in milliseconds, not seconds
PRELOAD = ("torch", "evoclone.site_node.inference", "evoclone.federated.model_dir", "evoclone.federated.quality",
           "evoclone.federated.features", "evoclone.federated.predictor", "evoclone.federated.models.twin_gpt")
T = TypeVar("T")


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

    def lookup_raw(self, key: str) -> tuple[bytes | None, CacheStatus]:
        """The cached JSON of `key` as stored (None when absent) and how the cache answered."""
        if not self._usable():
            return None, "unavailable"
        try:
            raw = self.backend.get(key)
        except Exception as exc:  # noqa: BLE001 (any backend failure means: serve uncached)
            self._failed(exc)
            return None, "unavailable"
        return (raw, "hit") if raw is not None else (None, "miss")

    def lookup(self, key: str) -> tuple[dict | None, CacheStatus]:
        """The cached value of `key` (None when absent) and how the cache answered."""
        raw, status = self.lookup_raw(key)
        return (json.loads(raw) if raw is not None else None), status

    def store_raw(self, key: str, raw: bytes, status: CacheStatus) -> CacheStatus:
        """Cache a computed value's JSON after a miss; the status to report."""
        if status != "miss":
            return status
        try:
            self.backend.set(key, raw, ttl=self.ttl)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return "unavailable"
        return "miss"

    def store(self, key: str, value: dict, status: CacheStatus) -> CacheStatus:
        """Cache a computed value after a miss; the status to report."""
        return self.store_raw(key, json.dumps(value, separators=(",", ":")).encode(), status)

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


@dataclass(frozen=True)
class ModelRef:
    """The promoted version as the workers load it: its id and the manifest digest it must verify against."""

    version: str
    digest: str


def promoted_model(*, engine: sa.Engine) -> ModelRef:
    """The promoted version (one indexed read, no ORM objects); NoModelInstalled when none is."""
    q = sa.select(LocalModel.version, LocalModel.manifest_sha256).where(LocalModel.promoted == sa.true()).limit(1)
    with engine.connect() as conn:
        row = conn.execute(q).first()
    if row is None:
        raise NoModelInstalled("no model version is promoted at this site; install one with "
                               "`evoclone site model install`")
    return ModelRef(row[0], row[1])


class InferenceUnavailable(StoreUnavailable):
    """An inference worker process died (killed, out of memory) while it held a request (503, retry)."""


def usable_cores() -> int:
    """The cores this process may use (containers, taskset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(api_workers: int = 1) -> int:
    """One worker per core but one (left to the API process), shared among the API's worker processes."""
    return max(1, (usable_cores() - 1) // max(1, api_workers))


def _start_worker(nice: int, threads: int) -> None:
    """Initializer of an inference worker: a lower CPU priority, and torch threads sized to its share of cores."""
    import torch

    if nice:
        os.nice(nice)
    torch.set_num_threads(threads)


@lru_cache(maxsize=1)  # one version per worker: a promotion replaces it (the next task names the new version)
def _worker_model(site_dir: str, version: str, digest: str) -> LoadedModel:
    return load_version(site_dir=Path(site_dir), version=version, expected_digest=digest)


def worker_check(site_dir: str, ref: ModelRef) -> str:
    """(In a worker) verify and load `ref`; its version (ModelUnavailable with the reason otherwise)."""
    return _worker_model(site_dir, ref.version, ref.digest).version


def worker_generate(site_dir: str, ref: ModelRef, record: PatientRecord, arm: str, count: int,
                    horizon_days: float | None = None, seed: int = 0) -> dict[str, Any]:
    """(In a worker) `generate` with version `ref`."""
    return generate(model=_worker_model(site_dir, ref.version, ref.digest), record=record, arm=arm, count=count,
                    horizon_days=horizon_days, seed=seed)


def worker_regenerate(site_dir: str, ref: ModelRef, record: PatientRecord, arm: str, reason: str,
                      events: list[list[Any]], seed: int) -> dict[str, Any]:
    """(In a worker) one twin in place of a rejected one, under the constraint its rejection reason sets."""
    from .review import reason_constraints
    from .review_models import RejectReason

    model = _worker_model(site_dir, ref.version, ref.digest)
    cons = reason_constraints(reason=RejectReason(reason), tok=model.tokenizer, patient=record, events=events)
    return generate(model=model, record=record, arm=arm, count=1, seed=seed, constraints=cons)


def worker_predict(site_dir: str, ref: ModelRef, record: PatientRecord, arm: str) -> dict[str, Any]:
    """(In a worker) `predict` with version `ref`."""
    return predict(model=_worker_model(site_dir, ref.version, ref.digest), record=record, arm=arm)


class InferencePool:
    """Model inference in `workers` worker processes of one API process, started on first use.

    Tasks are the module-level `worker_*` functions; their arguments travel pickled (a pseudonymized
    record, never an identifier). A domain error raised in a worker (ModelUnavailable, InvalidInput)
    reaches the caller as itself; a worker that dies takes its task with it: the caller gets
    InferenceUnavailable and the next task starts a fresh pool.
    """

    def __init__(self, *, site_dir: Path, workers: int, nice: int = WORKER_NICE) -> None:
        if workers < 1:
            raise ValueError("an inference pool needs at least one worker")
        self.site_dir, self.workers, self.nice = str(Path(site_dir).absolute()), workers, nice
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Tasks submitted and not finished (running or queued)."""
        return self._pending

    def _done(self, _fut: Future) -> None:
        with self._lock:
            self._pending -= 1

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                methods = multiprocessing.get_all_start_methods()
                # never plain fork: the API process runs threads (event loop, threadpool, Redis, SQLite)
                ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
                if ctx.get_start_method() == "forkserver":
                    ctx.set_forkserver_preload(list(PRELOAD))
                threads = max(1, (usable_cores() - 1) // self.workers)  # no worker oversubscribes the cores
                self._executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_start_worker,
                                                     initargs=(self.nice, threads))
            return self._executor

    def _submit(self, fn: Callable[..., T], *args: Any) -> tuple[ProcessPoolExecutor, Future]:
        executor = self._pool()
        try:
            fut = executor.submit(fn, self.site_dir, *args)
        except BrokenProcessPool:  # a worker died since the last task: start afresh
            self._reset(executor)
            executor = self._pool()
            fut = executor.submit(fn, self.site_dir, *args)
        with self._lock:
            self._pending += 1
        fut.add_done_callback(self._done)
        return executor, fut

    def _reset(self, executor: ProcessPoolExecutor) -> InferenceUnavailable:
        """Replace a broken pool (once, however many of its tasks report it); the error for their callers."""
        with self._lock:
            broken = self._executor is executor
            if broken:
                self._executor = None
        if broken:
            log.error("an inference worker process ended unexpectedly; starting a new pool")
            executor.shutdown(wait=False, cancel_futures=True)
        return InferenceUnavailable("the inference worker ended unexpectedly (killed or out of memory) and the "
                                    "request was not completed; retry, and check the site's memory if it repeats")

    def submit(self, fn: Callable[..., T], *args: Any) -> Future:
        """Queue `fn(site_dir, *args)` on a worker."""
        return self._submit(fn, *args)[1]

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(site_dir, *args)` on a worker and wait (for threads: cohort jobs)."""
        executor, fut = self._submit(fn, *args)
        try:
            return fut.result()
        except BrokenProcessPool:
            raise self._reset(executor) from None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(site_dir, *args)` on a worker without blocking the event loop."""
        executor, fut = self._submit(fn, *args)
        try:
            return await asyncio.wrap_future(fut)
        except BrokenProcessPool:
            raise self._reset(executor) from None

    def warm(self, ref: ModelRef | None) -> None:
        """Start the workers now (and load `ref` in them) instead of at the first request; errors are left for it."""
        for _ in range(self.workers):
            if ref is None:
                self._pool().submit(os.getpid)
            else:
                self.submit(worker_check, ref)

    def close(self) -> None:
        """Stop the workers (queued tasks are cancelled; a running one finishes first)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


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
