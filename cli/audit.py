"""`evoclone audit report` and `evoclone drift report`: what the sites reported, from the coordinator.

With `--state-dir` the commands read the coordinator's own database (an operator on the coordinator
host); without it they ask the coordinator's API with the `evoclone login` session (an auditor or
sponsor anywhere).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

audit_app = typer.Typer(no_args_is_help=True, help="Compliance audits: the sites' signed self-checks mapped to "
                                                   "HIPAA, GDPR and 21 CFR Part 11.")
drift_app = typer.Typer(no_args_is_help=True, help="Drift of the sites' data against their training references.")
err = Console(stderr=True)
StateDir = Annotated[Path | None, typer.Option("--state-dir", help="read this coordinator state directory's "
                                                                   "database instead of asking the API")]
FORMATS = ("json", "html")


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _local(state_dir: Path, fn):
    """Run `fn(session, settings)` against a state directory's database."""
    import sqlalchemy as sa
    from sqlmodel import Session

    from evoclone.coordinator.db import create_tables, make_engine

    from .coordinator import _settings

    settings = _settings(state_dir)
    engine = make_engine(settings)
    try:
        create_tables(engine)
        with Session(engine) as session:
            return fn(session, settings)
    except sa.exc.SQLAlchemyError as exc:  # a database that cannot be read is one line, not a traceback
        raise _fail(f"cannot read the coordinator database of {state_dir}: {type(exc).__name__}; check "
                    "EVOCLONE_COORDINATOR_DATABASE_URL and that the database is up", 1) from None
    finally:
        engine.dispose()


def _api(method: str, path: str, **kw):
    from .client import ClientError, Coordinator

    try:
        return Coordinator.from_env().request(method, path, **kw)
    except ClientError as exc:
        raise _fail(str(exc), exc.code) from None


def _write(text: str, out: Path | None) -> None:
    if out is None:
        typer.echo(text)
        return
    try:
        out.write_text(text)
    except OSError as exc:
        raise _fail(f"cannot write {out}: {exc.strerror}; choose another --out", 1) from None
    err.print(f"report written to {out}")


@audit_app.command("report")
def audit_report(
    fmt: Annotated[str, typer.Option("--format", help="json or html")] = "json",
    out: Annotated[Path | None, typer.Option("--out", help="write the report to this file (default: stdout)")] = None,
    state_dir: StateDir = None,
) -> None:
    """The compliance audit report: each active site's latest signed self-check and the coordinator's controls,
    mapped to HIPAA Security Rule safeguards, GDPR articles 5, 25, 30 and 32, and FDA 21 CFR Part 11.

    Example: evoclone audit report --format html --out audit.html --state-dir /srv/evoclone-coordinator
    """
    from evoclone.coordinator.compliance import AuditReport, build_audit_report, render_html

    if fmt not in FORMATS:
        raise _fail(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if state_dir is not None:
        report = _local(state_dir, lambda session, settings: build_audit_report(session=session, settings=settings))
    else:
        report = AuditReport.model_validate(_api("GET", "/api/v1/audit/compliance", params={"format": "json"}))
    _write(render_html(report) if fmt == "html" else report.model_dump_json(indent=1), out)
    s = report.summary
    err.print(f"requirements: {s['met']} met, {s['not_met']} not met, {s['no_evidence']} without evidence; "
              f"{s['sites_current']} of {s['sites']} active sites with a current self-check")


@drift_app.command("report")
def drift_report(
    site: Annotated[str | None, typer.Option(help="only this site")] = None,
    feature: Annotated[str | None, typer.Option(help="only this feature, e.g. age or lab:4548-4")] = None,
    since: Annotated[datetime | None, typer.Option(help="only reports received since (ISO date)")] = None,
    flagged: Annotated[bool, typer.Option("--flagged", help="only features over a drift threshold")] = False,
    limit: Annotated[int, typer.Option(min=1, max=5000, help="at most this many rows")] = 500,
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")] = False,
) -> None:
    """Drift per site and feature over time (PSI, KS, MMD, missingness), and the retraining requests it raised.

    Example: evoclone drift report --site st-mary --feature age --json
    """
    if state_dir is not None:
        def read(session, _settings):
            from evoclone.coordinator import drift

            rows = drift.list_feature_drift(session=session, site=site, feature=feature, since=since,
                                            flagged=True if flagged else None, limit=limit)
            reqs = drift.list_retrain_requests(session=session)
            return ([json.loads(r.model_dump_json()) for r in rows], [json.loads(r.model_dump_json()) for r in reqs])

        rows, requests = _local(state_dir, read)
    else:
        params = {k: v for k, v in {"site": site, "feature": feature, "limit": limit,
                                    "since": since.isoformat() if since else None,
                                    "flagged": "true" if flagged else None}.items() if v is not None}
        rows = _api("GET", "/api/v1/drift", params=params)
        requests = _api("GET", "/api/v1/drift/retrain")
    doc = {"drift": rows, "retrain_requests": requests}
    if as_json:
        typer.echo(json.dumps(doc))
        return
    t = Table("received", "site", "feature", "kind", "psi", "ks", "mmd", "missing", "flags", title="drift")
    for r in rows:
        def num(v):
            return "-" if v is None else f"{v:.3g}"

        t.add_row(str(r["received_at"])[:19], r["site"], r["feature"], r["kind"],
                  "suppressed" if r["suppressed"] else num(r["psi"]), num(r["ks"]), num(r["mmd"]),
                  num(r["missing_rate"]), ", ".join(r["flags"]) or "-")
    Console().print(t)
    if requests:
        q = Table("id", "study", "status", "reason", "run", title="retraining requests")
        for r in requests:
            q.add_row(str(r["id"]), str(r["study_id"]), r["status"], r["reason"], str(r["run_id"] or "-"))
        Console().print(q)
