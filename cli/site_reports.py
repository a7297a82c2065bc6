"""`evoclone site report ...`: what a site sends the coordinator (drift, compliance), signed, aggregates only.

The coordinator's address and CA come from the site's settings (`coordinator_url`,
`tls_ca_cert` in site.json or EVOCLONE_ variables); the site's API token (issued by the
coordinator's admin) from `EVOCLONE_SITE_TOKEN` or `--token-file`. `--dry-run` prints the
payload instead of sending it, so a data steward can read exactly what would leave the site.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

report_app = typer.Typer(no_args_is_help=True,
                         help="Signed aggregate reports to the coordinator: drift against the training reference, "
                              "the compliance self-check.")
err = Console(stderr=True)
SiteDir = Annotated[Path, typer.Option("--site-dir", help="the site directory")]
TokenFile = Annotated[Path | None, typer.Option(help="file holding the site's coordinator API token "
                                                     "(default: $EVOCLONE_SITE_TOKEN)")]
DryRun = Annotated[bool, typer.Option(help="print the payload (JSON) instead of sending it")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _send(site_dir: Path, payload, *, path: str, token_file: Path | None, method: str = "POST") -> dict:
    import httpx

    from evoclone.site_node.compliance import post_payload, report_settings

    rs = report_settings(site_dir)
    if not rs.coordinator_url:
        raise _fail(f"{site_dir}: no coordinator_url in the site settings; add it to site.json or set "
                    "EVOCLONE_COORDINATOR_URL")
    try:
        token = token_file.read_text().strip() if token_file else os.environ.get("EVOCLONE_SITE_TOKEN", "")
    except OSError as exc:
        raise _fail(f"{token_file}: {exc.strerror}") from None
    if not token:
        raise _fail("no site token: pass --token-file or set EVOCLONE_SITE_TOKEN (the coordinator's admin issues it)")
    try:
        with httpx.Client(base_url=rs.coordinator_url.rstrip("/"), verify=str(rs.tls_ca_cert or True),
                          timeout=30) as http:
            r = post_payload(payload, http=http, path=path, token=token, method=method)
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the coordinator at {rs.coordinator_url} ({exc}); check the address and the CA", 1) \
            from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text[:200]
        raise _fail(f"the coordinator refused the report: {r.status_code} {detail}", 2 if r.status_code < 500 else 1)
    return r.json() if r.content else {}


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError as exc:
        raise _fail(f"{exc.filename or exc}: missing; create it first (see `evoclone site report --help`)") from None
    except ValueError as exc:
        raise _fail(str(exc).splitlines()[0]) from None


@report_app.command("reference")
def reference(site_dir: SiteDir) -> None:
    """Seal the training reference drift is measured against (from the exported training snapshot).

    Example: evoclone site report reference --site-dir /srv/evoclone-site
    """
    from evoclone.site_node.drift import create_reference

    doc = _guard(create_reference, site_dir=site_dir)
    err.print(f"reference {doc['reference_id']}: about {doc['patients']} patients, {doc['features']} features "
              "(kept sealed in the site directory; it never leaves the site)")


@report_app.command("key")
def key(site_dir: SiteDir, token_file: TokenFile = None, dry_run: DryRun = False) -> None:
    """Register the site's Ed25519 report key with the coordinator (it pins the first one).

    Example: evoclone site report key --site-dir /srv/evoclone-site --token-file site.token
    """
    from evoclone.site_node.compliance import key_registration

    payload = _guard(key_registration, site_dir=site_dir)
    if dry_run:
        typer.echo(payload.model_dump_json(indent=1))
        return
    _send(site_dir, payload, path="/api/v1/reports/key", token_file=token_file, method="PUT")
    err.print("report key registered with the coordinator")


@report_app.command("drift")
def drift(site_dir: SiteDir, study: Annotated[int | None, typer.Option(help="the study the report is for")] = None,
          token_file: TokenFile = None, dry_run: DryRun = False) -> None:
    """Send the signed drift report of the stored data against the training reference (cells under 10 suppressed).

    Example: evoclone site report drift --site-dir /srv/evoclone-site --study 1 --dry-run
    """
    from evoclone.site_node.drift import drift_report

    payload = _guard(drift_report, site_dir=site_dir, study_id=study)
    if dry_run:
        typer.echo(payload.model_dump_json(indent=1))
        return
    doc = _send(site_dir, payload, path="/api/v1/reports/drift", token_file=token_file)
    retrain = doc.get("retrain_requests") or []
    err.print(f"drift report {doc.get('id')} sent ({len(payload.features)} features)"
              + (f"; the coordinator opened retraining request(s) {retrain}" if retrain else ""))


@report_app.command("compliance")
def compliance(site_dir: SiteDir, token_file: TokenFile = None, dry_run: DryRun = False) -> None:
    """Run the site's compliance self-check and send it signed.

    Example: evoclone site report compliance --site-dir /srv/evoclone-site --token-file site.token
    """
    from evoclone.site_node.compliance import self_check

    payload = _guard(self_check, site_dir=site_dir)
    if dry_run:
        typer.echo(payload.model_dump_json(indent=1))
        return
    _send(site_dir, payload, path="/api/v1/reports/compliance", token_file=token_file)
    failed = [f"{c.id} ({c.reason})" for c in payload.checks if not c.passed]
    err.print("compliance self-check sent: " + ("all checks passed" if not failed else f"failed: {', '.join(failed)}"))
