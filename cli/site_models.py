"""`evoclone site model ...`: install a coordinator-signed model bundle at a site, list and promote versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

model_app = typer.Typer(no_args_is_help=True, help="Model versions installed at the site (signed by the coordinator).")

SiteDir = Annotated[Path, typer.Option("--site-dir", help="the site directory")]
AsJson = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]


def _engine(site_dir: Path):
    from evoclone.site_node.db import site_engine
    from evoclone.site_node.migrate import upgrade
    from evoclone.site_node.settings import get_settings

    from .main import fail

    try:
        settings = get_settings(site_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc).splitlines()[0], 2) from None
    engine = site_engine(settings)
    upgrade(engine)
    return settings, engine


def _show(row, as_json: bool) -> None:
    doc = {"version": row.version, "promoted": row.promoted, "manifest_sha256": row.manifest_sha256,
           "key_fingerprint": row.key_fingerprint}
    typer.echo(json.dumps(doc) if as_json else f"{row.version}  promoted={row.promoted}  "
                                                 f"manifest={row.manifest_sha256[:12]}  key={row.key_fingerprint[:19]}")


@model_app.command()
def install(site_dir: SiteDir, bundle: Annotated[Path, typer.Option(help="the bundle (tar) from the coordinator's "
                                                                         "model download")],
            public_key: Annotated[Path | None, typer.Option(help="the coordinator's signing key (PEM); pinned at "
                                                                 "the first install, must match afterwards")] = None,
            promote: Annotated[bool, typer.Option(help="make it the version inference uses")] = True,
            as_json: AsJson = False) -> None:
    """Verify a signed bundle with the pinned coordinator key, unpack it and promote it.

    Example: evoclone site model install --site-dir /srv/evoclone/site --bundle v7.tar --public-key coordinator.pem
    """
    from evoclone.site_node.errors import SiteError
    from evoclone.site_node.local_models import install_bundle

    from .main import fail

    settings, engine = _engine(site_dir)
    try:
        data = bundle.read_bytes()
        pem = public_key.read_bytes() if public_key is not None else None
        row = install_bundle(engine=engine, site_dir=settings.site_dir, bundle=data, public_key_pem=pem,
                             promote=promote)
    except OSError as exc:
        raise fail(f"{exc.filename}: {exc.strerror}; pass a readable file", 2) from None
    except (SiteError, ValueError) as exc:
        raise fail(str(exc).splitlines()[0], 1) from None
    finally:
        engine.dispose()
    _show(row, as_json)


@model_app.command("list")
def list_versions(site_dir: SiteDir, as_json: AsJson = False) -> None:
    """Installed model versions, newest first.

    Example: evoclone site model list --site-dir /srv/evoclone/site
    """
    from evoclone.site_node.local_models import list_models

    _, engine = _engine(site_dir)
    try:
        for row in list_models(engine=engine):
            _show(row, as_json)
    finally:
        engine.dispose()


@model_app.command()
def promote(site_dir: SiteDir, version: Annotated[str, typer.Argument(help="an installed version")],
            as_json: AsJson = False) -> None:
    """Make an installed version the one inference uses (a running server switches at its next request).

    Example: evoclone site model promote --site-dir /srv/evoclone/site v6
    """
    from evoclone.site_node.errors import SiteError
    from evoclone.site_node.local_models import promote_version

    from .main import fail

    _, engine = _engine(site_dir)
    try:
        row = promote_version(engine=engine, version=version)
    except SiteError as exc:
        raise fail(str(exc).splitlines()[0], 1) from None
    finally:
        engine.dispose()
    _show(row, as_json)
