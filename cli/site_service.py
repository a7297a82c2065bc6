"""`evoclone site node|serve|migrate`: what the site's systemd units and upgrades run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .site import AsJson, SiteDir, _settings, site_app

@site_app.command()
def node(site_dir: SiteDir, superlink: Annotated[str, typer.Option(help="SuperLink Fleet API host:port")],
         ca: Annotated[Path | None, typer.Option(help="study CA certificate (verifies the SuperLink)")] = None,
         node_key: Annotated[Path | None, typer.Option(help="this node's private key (`evoclone pki issue node`)")] = None,
         port: Annotated[int, typer.Option(help="the SuperNode's local API port")] = 9094,
         insecure: Annotated[bool, typer.Option(help="test mode: no TLS, no node authentication")] = False) -> None:
    """Run the site's guarded Flower SuperNode in the foreground (what the systemd unit runs).

    It trains only app bundles approved with `evoclone site approve`, on the site's exported snapshot.

    Example: evoclone site node --site-dir /srv/evoclone/site --superlink coordinator.example.org:9093 --ca ca.pem --node-key site.node.key
    """
    import os

    from evoclone.federated.flower.runtime import flower_env
    from evoclone.site_node.supernode import NodeSecurity, supernode_command

    from .main import err, fail

    settings = _settings(site_dir)
    if not insecure and (ca is None or node_key is None):
        raise fail("pass --ca and --node-key (from `evoclone pki`), or --insecure for a loopback test", 2)
    if not settings.snapshot_path.is_file():  # a new site connects first; rounds need the snapshot
        err.print(f"[yellow]warning:[/yellow] {settings.snapshot_path} does not exist yet: the node connects, and "
                  "training rounds fail at this site until `evoclone site export-snapshot` writes it")
    security = None if insecure else NodeSecurity(ca_cert=ca, node_key=node_key)
    try:
        cmd = supernode_command(settings, superlink=superlink, port=port, security=security)
    except FileNotFoundError as exc:
        raise fail(str(exc), 2) from None
    os.execvpe(cmd[0], cmd, flower_env(settings.site_dir / "flower"))


@site_app.command()
def migrate(site_dir: SiteDir,
            backup: Annotated[Path | None, typer.Option(help="first copy a SQLite site database here (consistent "
                                                           "while the services run)")] = None,
            as_json: AsJson = False) -> None:
    """Bring the site database to this version's schema (what an upgrade runs before restarting the services).

    Example: evoclone site migrate --site-dir /srv/evoclone/site --backup /opt/evoclone/backups/site-0.1.0.db
    """
    from evoclone.site_node.db import site_engine
    from evoclone.site_node.keyring import load_keyring
    from evoclone.site_node.migrate import backup_sqlite, current, upgrade
    from evoclone.site_node.review import seal_legacy_reviews

    from .main import err, fail

    settings = _settings(site_dir)
    engine = site_engine(settings)
    try:
        before = current(engine)
        if backup is not None:
            if engine.dialect.name != "sqlite":
                raise fail("--backup copies a SQLite database; back a PostgreSQL site database up with pg_dump", 2)
            backup_sqlite(engine, backup)
        upgrade(engine)
        sealed = seal_legacy_reviews(engine=engine, keyring=load_keyring(settings.site_dir))
        after = current(engine)
    except OSError as exc:
        raise fail(f"cannot migrate {site_dir}: {exc}", 1) from None
    finally:
        engine.dispose()
    doc = {"from": before, "to": after, "changed": before != after, "backup": str(backup) if backup else None,
           "twins_sealed": sealed}
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        err.print(f"site database at revision {after}" + (f" (was {before})" if before != after else " (unchanged)"))


@site_app.command()
def serve(site_dir: SiteDir, host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="port to listen on")] = 8444,
          workers: Annotated[int, typer.Option(min=1, max=64, help="uvicorn worker processes")] = 1) -> None:
    """Serve the site API (HTTPS when site.json names tls_cert and tls_key) until SIGTERM.

    Example: evoclone site serve --site-dir /srv/evoclone/site --host 0.0.0.0 --port 8444 --workers 4
    """
    import logging
    import sys

    from evoclone.federated.flower.runtime import PortInUseError, require_free
    from evoclone.site_node.service import serve as run

    from .main import fail

    settings = _settings(site_dir)
    if settings.tls_enabled and not (settings.tls_cert.is_file() and settings.tls_key.is_file()):
        raise fail(f"TLS certificate {settings.tls_cert} or key {settings.tls_key} does not exist; fix tls_cert "
                   f"and tls_key in {site_dir / 'site.json'}", 2)
    if workers > 1 and not settings.redis_url:
        raise fail("--workers above 1 needs redis_url in site.json: in-process sessions are not shared between "
                   "workers", 2)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        require_free([port], host)
        run(settings, host=host, port=port, workers=workers)
    except PortInUseError as exc:
        raise fail(str(exc), 2) from None
    except (RuntimeError, OSError) as exc:
        raise fail(" ".join(str(exc).split())[:500], 1) from None
