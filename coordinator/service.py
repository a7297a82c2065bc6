"""`evoclone coordinator serve`: uvicorn for the API and a supervised Flower SuperLink whose authorised
SuperNodes follow the active sites (the keys in the state directory's supernode-keys/)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

from sqlmodel import Session

from .db import make_engine, with_retry
from .migrate import upgrade
from .settings import ENV_PREFIX, CoordinatorSettings
from .sites import sync_node_keys

log = logging.getLogger("evoclone.coordinator")


class LinkSupervisor:
    """Starts the SuperLink, restarts it when it dies, and keeps its SuperNode registrations in step
    with supernode-keys/ (register new keys, unregister removed ones)."""

    def __init__(self, settings: CoordinatorSettings, *, poll_seconds: float = 2.0) -> None:
        from evoclone.federated.flower.runtime import ProcessGroup

        from .superlink import LinkSecurity, SuperLink

        pki = settings.pki_dir
        security = LinkSecurity(ca_cert=pki / "ca.pem", cert=pki / "superlink.pem", key=pki / "superlink.key")
        self.settings, self.poll_seconds = settings, poll_seconds
        self.group = ProcessGroup(settings.flower_dir / "logs")
        self.link = SuperLink(flower_dir=settings.flower_dir, port=settings.superlink_port, group=self.group,
                              host=settings.superlink_host, security=security, database=settings.superlink_db)
        self.registry = settings.flower_dir / "registered-nodes.json"  # site name -> [fingerprint, node id]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, *, timeout: float = 60) -> None:
        """Start the SuperLink, register the active sites' keys, then watch in a thread."""
        self.link.start(timeout=timeout)
        self.sync()
        self._thread = threading.Thread(target=self._watch, name="superlink-supervisor", daemon=True)
        self._thread.start()

    def _load(self) -> dict[str, list[str | None]]:
        try:
            return json.loads(self.registry.read_text())
        except (OSError, ValueError):
            return {}

    def sync(self) -> None:
        """Register keys that appeared in supernode-keys/ and unregister those that left (revoked sites)."""
        from evoclone.privacy.pki import public_key_fingerprint

        known = self._load()
        wanted = {}
        for path in sorted(self.settings.node_keys_dir.glob("*.pub")):
            wanted[path.stem] = (path, public_key_fingerprint(path.read_bytes()))
        for name, (fingerprint, node_id) in list(known.items()):
            if name not in wanted or wanted[name][1] != fingerprint:
                if node_id:
                    self.link.unregister_node(str(node_id))
                del known[name]
                log.info("SuperNode of site %s unregistered", name)
        for name, (path, fingerprint) in wanted.items():
            if name not in known:
                known[name] = [fingerprint, self.link.register_node_id(path, name=name)]
                log.info("SuperNode of site %s registered", name)
        tmp = self.registry.with_name(self.registry.name + ".tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, self.registry)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                if self.group.procs[self.link.name].poll() is not None:
                    log.error("the SuperLink exited (%s); restarting it", self.group.log_tail(self.link.name))
                    self.link.start()
                self.sync()
            except Exception:  # noqa: BLE001 (the supervisor must outlive one failed attempt; retried next poll)
                log.exception("SuperLink supervision step failed; retrying in %.0f s", self.poll_seconds)

    def stop(self) -> None:
        """Stop watching, then stop the SuperLink and all its helpers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.group.stop()


class StopRequested(Exception):
    """SIGTERM arrived: unwind so that the SuperLink is stopped too."""


def _stop_requested(_signum, _frame) -> None:
    raise StopRequested


def prepare(settings: CoordinatorSettings) -> None:
    """Migrate the database to this release's schema (a no-op after `evoclone coordinator migrate`) and write the
    active sites' SuperNode keys before anything starts."""
    engine = make_engine(settings)
    try:
        with_retry(lambda: upgrade(engine), seconds=30)
        with Session(engine) as session:
            sync_node_keys(session=session, node_keys_dir=settings.node_keys_dir)
    finally:
        engine.dispose()


def serve(settings: CoordinatorSettings, *, host: str, port: int, workers: int = 1, superlink: bool = True,
          log_level: str = "info") -> None:
    """Run the API until SIGTERM or SIGINT (uvicorn shuts down gracefully), then stop the SuperLink."""
    import uvicorn

    prepare(settings)
    # uvicorn shuts down gracefully on SIGTERM and then re-raises it to the handler it found; with Python's
    # default that kills the process before the SuperLink is stopped, so the handler found is this one.
    previous = signal.signal(signal.SIGTERM, _stop_requested)
    os.environ[f"{ENV_PREFIX}STATE_DIR"] = str(Path(settings.state_dir).absolute())  # the workers' app factory
    supervisor = LinkSupervisor(settings) if superlink else None
    dispatcher = None
    try:
        if supervisor is not None:
            from .dispatcher import RunDispatcher

            supervisor.start()
            dispatcher = RunDispatcher(settings, supervisor.link,
                                       on_finished=lambda s, run, d: _register_model(s, run, d, settings))
            dispatcher.start()
        tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)} \
            if settings.tls_enabled else {}
        # no access log: every request is in the audit chain (method, path, status, caller, request id) and in
        # the Prometheus metrics, and a log line per request costs more than the rest of a cached read
        uvicorn.run("evoclone.coordinator.api.main:app_from_env", factory=True, host=host, port=port,
                    workers=workers, log_level=log_level, proxy_headers=False, server_header=False,
                    timeout_graceful_shutdown=10, access_log=False, **tls)
    except StopRequested:
        log.info("SIGTERM: stopping")
    finally:
        if dispatcher is not None:
            dispatcher.stop()
        if supervisor is not None:
            supervisor.stop()
        signal.signal(signal.SIGTERM, previous)


def _register_model(session: Session, run, model_dir: Path, settings: CoordinatorSettings) -> None:
    """A finished run's model goes into the registry (when the registry is installed)."""
    try:
        from .registry import register_run_model
    except ImportError:
        log.warning("run %s finished; no model registry to record %s in", run.id, model_dir)
        return
    register_run_model(session=session, run=run, model_dir=model_dir, settings=settings)
