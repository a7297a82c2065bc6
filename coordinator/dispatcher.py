"""The process that owns the SuperLink submits the runs the API queued, one at a time.

Runs go through `flwr run` against the supervised SuperLink (Flower's Control API), in
launch order: one Flower run at a time keeps every site's compute and privacy budget on
one study. While a run goes on, its rounds.json is read every poll and its new rounds are
stored; a stop request is passed to the SuperLink. When the SuperLink dies mid-run the
supervisor restarts it and the run is resubmitted (the ServerApp resumes from its
checkpoint).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from sqlmodel import Session, select

from .db import make_engine
from .models import Run, RunStatus, Study
from .runs import finish_run, flower_config, ingest_rounds, run_dir
from .settings import CoordinatorSettings

log = logging.getLogger("evoclone.coordinator.runs")
RESUBMITS = 3
RUN_TIMEOUT = 7 * 24 * 3600.0


class RunDispatcher:
    """Takes pending runs from the store, submits them to the SuperLink, records their rounds and end."""

    def __init__(self, settings: CoordinatorSettings, link, *, poll_seconds: float = 1.0,
                 on_finished: Callable[[Session, Run, Path], None] | None = None) -> None:
        self.settings, self.link, self.poll_seconds = settings, link, poll_seconds
        self.engine = make_engine(settings)
        self.runs_dir = Path(settings.state_dir) / "runs"
        self.on_finished = on_finished
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: int | None = None
        self._flower_id: str | None = None

    def start(self) -> None:
        """Recover runs a previous process left running, then dispatch in a thread."""
        with Session(self.engine) as s:
            for run in s.exec(select(Run).where(Run.status == RunStatus.running)):
                run.status = RunStatus.pending  # resubmitted: the ServerApp resumes from its checkpoint
                s.add(run)
            s.commit()
        self._thread = threading.Thread(target=self._loop, name="run-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop dispatching (a run in progress keeps its row as running and resumes at the next start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.dispose()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 (the dispatcher must outlive one failed step; retried next poll)
                log.exception("run dispatch step failed; retrying in %.0f s", self.poll_seconds)

    def tick(self) -> None:
        """Run the oldest pending run to its end (blocking); returns at once when none is pending."""
        with Session(self.engine) as s:
            run = s.exec(select(Run).where(Run.status == RunStatus.pending).order_by(Run.id)).first()
            if run is None:
                return
            run.status = RunStatus.running
            s.add(run)
            s.commit()
            run_id = run.id
        self._execute(run_id)

    def _poll(self, run_id: int, rounds_file: Path) -> None:
        try:
            doc = json.loads(rounds_file.read_text())
        except (OSError, ValueError):
            doc = None
        with Session(self.engine) as s:
            run = s.get(Run, run_id)
            if doc is not None:
                ingest_rounds(session=s, run_id=run_id, doc=doc)
                if doc.get("run_id") and run.flower_run_id != str(doc["run_id"]):
                    run.flower_run_id = self._flower_id = str(doc["run_id"])
                    s.add(run)
                    s.commit()
            if run.config.get("_stop_requested") and self._flower_id:
                log.info("stopping run %s (Flower run %s) as requested", run_id, self._flower_id)
                self.link.stop_run(self._flower_id)

    def _execute(self, run_id: int) -> None:
        from .superlink import SuperLinkDied

        self._current, self._flower_id = run_id, None
        with Session(self.engine) as s:
            run = s.get(Run, run_id)
            out = run_dir(self.runs_dir, run_id)
            out.mkdir(parents=True, exist_ok=True)
            rc = flower_config(run=run, study=s.get(Study, run.study_id), out_dir=out)
        rounds_file = out / "rounds.json"
        outcome = None
        for attempt in range(RESUBMITS + 1):
            try:
                outcome = self.link.submit(run_config=rc, timeout=RUN_TIMEOUT,
                                           on_poll=lambda: self._poll(run_id, rounds_file))
                break
            except SuperLinkDied:
                log.warning("the SuperLink died during run %s (attempt %d); resubmitting", run_id, attempt + 1)
                self.link.start()
        self._poll(run_id, rounds_file)
        doc = json.loads(rounds_file.read_text()) if rounds_file.is_file() else {}
        with Session(self.engine) as s:
            stop_requested = bool(s.get(Run, run_id).config.get("_stop_requested"))
            ok = outcome is not None and outcome.ok and doc.get("status") == "completed"
            status = RunStatus.finished if ok else RunStatus.stopped if stop_requested else RunStatus.failed
            run = finish_run(session=s, run_id=run_id, status=status,
                             flower_run_id=str(outcome.run_id) if outcome is not None and outcome.run_id else None)
            log.info("run %s ended %s", run_id, status.value)
            if ok and self.on_finished is not None and (out / "model").is_dir():
                self.on_finished(s, run, out / "model")
        self._current = None
