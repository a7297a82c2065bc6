"""`evoclone site ...`: a hospital's site node (init, ingest, stats, snapshot, key rotation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

site_app = typer.Typer(no_args_is_help=True, help="Run a hospital's site node: ingest, anonymize, store, export.")

SiteDir = Annotated[Path, typer.Option("--site-dir", help="the site directory")]
AsJson = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]


def _settings(site_dir: Path):
    from evoclone.site_node.settings import get_settings

    from .main import fail

    try:
        return get_settings(site_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc).splitlines()[0], 2) from None


@site_app.command()
def init(site_dir: SiteDir, name: Annotated[str, typer.Option(help="site name, e.g. st-mary")],
         epsilon: Annotated[float, typer.Option(help="privacy budget (epsilon) for this site")] = 3.0,
         delta: Annotated[float, typer.Option(help="DP delta for this site")] = 1e-5,
         tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM) for `evoclone site serve`")] = None,
         tls_key: Annotated[Path | None, typer.Option(help="its private key (PEM); give both or neither")] = None,
         redis_url: Annotated[str, typer.Option(help="Redis for the API's sessions (default: in-process)")] = "",
         ) -> None:
    """Create a site directory with its settings, a fresh secret key, master key and API JWT secret (mode 0600).

    Example: evoclone site init --site-dir /srv/evoclone/site --name st-mary --epsilon 3 --tls-cert site.pem --tls-key site.key
    """
    from pydantic import ValidationError

    from evoclone.site_node.settings import init_site

    from .main import err, fail

    if (site_dir / "site.json").exists() or (site_dir / "secret.key").exists():
        raise fail(f"{site_dir} is already a site directory; its keys are never replaced", 2)
    try:
        init_site(site_dir, name=name, epsilon_budget=epsilon, delta=delta, tls_cert=tls_cert, tls_key=tls_key,
                  redis_url=redis_url)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = f"--{first['loc'][0]}: ".replace("_", "-") if first["loc"] else ""
        raise fail(f"{where}{first['msg'].removeprefix('Value error, ')}".replace("epsilon-budget", "epsilon"), 2) \
            from None
    except OSError as exc:
        raise fail(f"cannot create {site_dir}: {exc.strerror}", 2) from None
    err.print(f"site {name} initialised in {site_dir}")


def _csv_pair(paths: list[Path]) -> tuple[Path, Path | None]:
    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*.csv")) if p.is_dir() else [p]
    patients = [f for f in files if f.name.startswith("patients")]
    events = [f for f in files if f.name.startswith("events")]
    if len(patients) != 1 or len(events) > 1 or len(files) != len(patients) + len(events):
        raise ValueError("CSV ingest takes one patients*.csv and at most one events*.csv (files or a directory)")
    return patients[0], events[0] if events else None


@site_app.command()
def ingest(paths: Annotated[list[Path], typer.Argument(help="extract files or a directory")], site_dir: SiteDir,
           fmt: Annotated[str | None, typer.Option("--format", help="fhir, omop or csv (default: from the file names)")] = None,
           mapping: Annotated[Path | None, typer.Option(help="YAML column mapping for CSV extracts")] = None,
           allow_partial: Annotated[bool, typer.Option(help="store good rows; quarantine bad ones with their reasons")] = False,
           as_json: AsJson = False) -> None:
    """Validate, anonymize, encrypt and store an extract; all or nothing.

    Example: evoclone site ingest ./extract/patients.csv ./extract/events.csv --site-dir /srv/evoclone/site --json
    """
    from evoclone.site_node.ingest import IngestError
    from evoclone.site_node.omop import CLINICAL
    from evoclone.site_node.pipeline import ingest_extract, ingest_fhir, ingest_omop

    from .main import err, fail
    from .progress import StageBars

    _settings(site_dir)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise fail(f"{missing[0]}: no such file or directory", 2)
    files = [f for p in paths for f in (sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p])]
    if not files:
        raise fail("no files to ingest in the given paths", 2)
    omop_tables = {"person", *CLINICAL}
    kinds = {"fhir" if f.suffix.lower() in (".json", ".ndjson") else
             "omop" if f.suffix.lower() == ".csv" and f.stem.lower() in omop_tables else
             "csv" if f.suffix.lower() == ".csv" else "?" for f in files}
    fmt = fmt or (kinds.pop() if len(kinds) == 1 else None)
    if fmt not in ("fhir", "omop", "csv"):
        raise fail("cannot tell the format from mixed or unknown file types; pass --format fhir|omop|csv and one kind of file", 2)
    try:
        if fmt == "fhir":
            counts = ingest_fhir(site_dir=site_dir, paths=files)
        elif fmt == "omop":
            counts = ingest_omop(site_dir=site_dir, paths=files)
        else:
            patients_csv, events_csv = _csv_pair(files)
            with StageBars(percent=True) as progress:  # events are counted in bytes
                counts = ingest_extract(site_dir=site_dir, patients_csv=patients_csv, events_csv=events_csv,
                                        mapping_file=mapping, allow_partial=allow_partial, progress=progress)
    except IngestError as exc:
        if as_json:
            typer.echo(json.dumps({"accepted": 0, "rejected": len(exc.issues), "patients": None, "events": None,
                                   "errors": [vars(i) for i in exc.issues]}))
        raise fail(str(exc), 2) from None
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    doc = {"accepted": counts["accepted"], "rejected": counts.get("rejected", 0), "patients": counts["patients"],
           "events": counts["events"], "errors": counts.get("errors", []), **({"skipped_resources": counts["skipped_resources"]} if "skipped_resources" in counts else {})}
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        err.print(f"accepted {doc['accepted']} patients; the site now holds {doc['patients']} patients, {doc['events']} events")


@site_app.command()
def stats(site_dir: SiteDir, as_json: AsJson = False) -> None:
    """Patients and events stored.

    Example: evoclone site stats --site-dir /srv/evoclone/site --json
    """
    from evoclone.site_node.pipeline import open_store

    store = open_store(_settings(site_dir))
    try:
        doc = store.counts()
    finally:
        store.close()
    typer.echo(json.dumps(doc) if as_json else
               f"patients {doc['patients']}  events {doc['events']}  quarantined {doc['quarantined']}")


@site_app.command("export-snapshot")
def export_snapshot_cmd(site_dir: SiteDir, out: Annotated[Path | None, typer.Option(help="snapshot file")] = None) -> None:
    """Write the anonymized training snapshot (canonical records) the ClientApp reads.

    Example: evoclone site export-snapshot --site-dir /srv/evoclone/site --out snapshot.jsonl.gz
    """
    from evoclone.site_node.pipeline import export_snapshot

    from .main import err, fail

    _settings(site_dir)
    try:
        path = export_snapshot(site_dir=site_dir, out=out)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    err.print(f"snapshot written to {path}")


@site_app.command("rotate-key")
def rotate_key(site_dir: SiteDir, as_json: AsJson = False) -> None:
    """Replace the master key: every data key is re-wrapped, the data is not re-encrypted.

    Example: evoclone site rotate-key --site-dir /srv/evoclone/site
    """
    from evoclone.site_node.pipeline import rotate_master_key

    _settings(site_dir)
    result = rotate_master_key(site_dir=site_dir)
    typer.echo(json.dumps(result) if as_json else
               f"master key {result['active']} active; {result['rewrapped_data_keys']} data keys re-wrapped")


@site_app.command("privacy-report")
def privacy_report(site_dir: SiteDir,
                   k: Annotated[int, typer.Option(help="target k of k-anonymity")] = 5,
                   quasi: Annotated[str, typer.Option(help="quasi-identifiers, comma separated")] = "age,sex,zip3",
                   sensitive: Annotated[str | None, typer.Option(help="sensitive attribute for l-diversity")] = None,
                   max_suppression: Annotated[float, typer.Option(help="largest share of records to suppress")] = 0.05,
                   as_json: AsJson = False) -> None:
    """k-anonymity and l-diversity of the stored baseline, and the generalization that reaches k.

    Example: evoclone site privacy-report --site-dir /srv/evoclone/site --k 5 --sensitive diabetes --json
    """
    from evoclone.privacy.kanon import anonymize, measure
    from evoclone.site_node.pipeline import open_store

    from .main import fail

    if k < 1 or not 0 <= max_suppression < 1:
        raise fail("--k must be at least 1 and --max-suppression in [0, 1)", 2)
    qis = [q.strip() for q in quasi.split(",") if q.strip()]
    store = open_store(_settings(site_dir))
    try:
        rows = [{**r.baseline} for r in store.records()]
    finally:
        store.close()
    if not rows:
        raise fail(f"site {site_dir} holds no patients; ingest first", 2)
    unknown = [q for q in [*qis, *([sensitive] if sensitive else [])] if all(q not in r for r in rows)]
    if unknown:
        raise fail(f"unknown attribute {unknown[0]!r}; baseline attributes are {sorted(rows[0])}", 2)
    before = measure(rows, qis, k=k, sensitive=sensitive)
    _, after = anonymize(rows, qis, k=k, sensitive=sensitive, max_suppression=max_suppression)
    doc = {"as_stored": before.to_dict(), "to_reach_k": after.to_dict()}
    if as_json:
        typer.echo(json.dumps(doc))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"k-anonymity over {', '.join(qis)} (target k={k})")
    for col in ("", "classes", "smallest class", "records below k", "min l", "suppressed", "generalization"):
        t.add_column(col)
    for label, r in (("as stored", before), ("after generalization", after)):
        t.add_row(label, str(r.equivalence_classes), str(r.min_class_size), str(r.records_below_k),
                  "-" if r.min_l is None else str(r.min_l), str(r.suppressed),
                  ", ".join(f"{a}: {g}" for a, g in r.generalization.items()) or "-")
    Console().print(t)


@site_app.command()
def budget(site_dir: SiteDir, as_json: AsJson = False) -> None:
    """The site's privacy budget, what federated training has spent of it, and every charge.

    Example: evoclone site budget --site-dir /srv/evoclone/site --json
    """
    from rich.table import Table

    from evoclone.federated.stores.ledger import SqlLedgerStore

    from .main import err

    settings = _settings(site_dir)
    store = SqlLedgerStore(url=settings.db_url)
    try:
        doc = store.summary()
    finally:
        store.close()
    if doc["epsilon_budget"] is None:  # nothing trained yet: the configured budget, untouched
        doc.update(epsilon_budget=settings.epsilon_budget, delta=settings.delta,
                   epsilon_remaining=settings.epsilon_budget)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    err.print(f"epsilon spent {doc['epsilon_spent']:.4f} of {doc['epsilon_budget']} (delta {doc['delta']}), "
              f"remaining {doc['epsilon_remaining']:.4f}")
    t = Table("run", "round", "noise", "sample rate", "steps", "epsilon after", "at", title="charges")
    for c in doc["charges"]:
        t.add_row(c["run_id"], str(c["round"]), f"{c['noise_multiplier']:.4f}", f"{c['sample_rate']:.4f}",
                  str(c["steps"]), f"{c['epsilon_after']:.4f}", c["at"])
    err.print(t)


@site_app.command("reset-budget")
def reset_budget(site_dir: SiteDir,
                 admin: Annotated[str, typer.Option(help="the administrator taking this decision (audited)")],
                 reason: Annotated[str, typer.Option(help="why the site may spend a budget again (audited)")],
                 yes: Annotated[bool, typer.Option("--yes", help="confirm: every recorded charge is cleared")] = False,
                 as_json: AsJson = False) -> None:
    """Clear the privacy ledger (an audited administrator decision, e.g. for a new dataset).

    The cleared charges are kept in the ledger's audit log with the administrator and reason.
    Example: evoclone site reset-budget --site-dir /srv/evoclone/site --admin "J. Doe" --reason "new dataset, DPO ticket 42" --yes
    """
    from evoclone.federated.stores.ledger import SqlLedgerStore

    from .main import err, fail

    if not yes:
        raise fail("reset-budget clears every recorded privacy charge; add --yes to confirm", 2)
    settings = _settings(site_dir)
    store = SqlLedgerStore(url=settings.db_url)
    try:
        before = store.reset(admin=admin, reason=reason)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    finally:
        store.close()
    doc = {"cleared_charges": len(before["charges"]), "epsilon_spent_before": before["epsilon_spent"],
           "admin": admin.strip(), "reason": reason.strip()}
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        err.print(f"ledger cleared ({doc['cleared_charges']} charges, epsilon {doc['epsilon_spent_before']:.4f}); "
                  "recorded in the ledger's audit log")


@site_app.command()
def approve(fab_hash: Annotated[str, typer.Argument(help="sha256 of the Flower App bundle (`evoclone app hash`)")],
            site_dir: SiteDir, admin: Annotated[str, typer.Option(help="who approves (recorded)")],
            note: Annotated[str, typer.Option(help="why, e.g. the review it passed")] = "",
            as_json: AsJson = False) -> None:
    """Let federated runs of this app bundle train on the site's data (recorded with who and why).

    Example: evoclone site approve 3f5a...c2 --site-dir /srv/evoclone/site --admin "J. Doe" --note "reviewed v0.2"
    """
    _approval(site_dir, "approve", fab_hash, admin, note, as_json)


@site_app.command()
def revoke(fab_hash: Annotated[str, typer.Argument(help="sha256 of an approved app bundle")], site_dir: SiteDir,
           admin: Annotated[str, typer.Option(help="who revokes (recorded)")],
           note: Annotated[str, typer.Option(help="why")] = "", as_json: AsJson = False) -> None:
    """Withdraw an approval: later runs of that bundle are refused before they read data.

    Example: evoclone site revoke 3f5a...c2 --site-dir /srv/evoclone/site --admin "J. Doe" --note "superseded"
    """
    _approval(site_dir, "revoke", fab_hash, admin, note, as_json)


def _approval(site_dir: Path, action: str, fab_hash: str, admin: str, note: str, as_json: bool) -> None:
    from evoclone.site_node.approvals import ApprovalStore

    from .main import err, fail

    settings = _settings(site_dir)
    store = ApprovalStore(url=settings.db_url)
    try:
        doc = getattr(store, action)(fab_hash, admin=admin, note=note)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        err.print(f"{'approved' if doc['approved'] else 'revoked'}: {doc['fab_hash']}")


@site_app.command()
def approvals(site_dir: SiteDir, as_json: AsJson = False) -> None:
    """Approved app bundles, the approval decisions and the runs refused at this site.

    Example: evoclone site approvals --site-dir /srv/evoclone/site --json
    """
    from rich.table import Table

    from evoclone.site_node.approvals import ApprovalStore

    from .main import err

    store = ApprovalStore(url=_settings(site_dir).db_url)
    try:
        doc = {"approved": store.list(), "decisions": store.history(), "refused_runs": store.refused()}
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps(doc))
        return
    t = Table("fab sha256", "approved by", "at", "note", title="approved app bundles")
    for a in doc["approved"]:
        t.add_row(a["fab_hash"], a["approved_by"], a["at"], a["note"])
    err.print(t)
    r = Table("run", "fab sha256", "app", "at", title="refused runs")
    for x in doc["refused_runs"]:
        r.add_row(x["run_id"], x["fab_hash"], x["fab_id"], x["at"])
    err.print(r)


user_app = typer.Typer(no_args_is_help=True, help="Users of the site API (clinician, site_admin, auditor).")
site_app.add_typer(user_app, name="user")
audit_app = typer.Typer(no_args_is_help=True, help="The site's hash-chained access log.")
site_app.add_typer(audit_app, name="audit")
SITE_ROLES = ("clinician", "site_admin", "auditor")


@user_app.command("add")
def user_add(site_dir: SiteDir,
             username: Annotated[str, typer.Option(help="login name (letters, digits, '_', '.', '-')")],
             role: Annotated[str, typer.Option(help="clinician, site_admin or auditor")],
             password_stdin: Annotated[bool, typer.Option("--password-stdin",
                                                          help="read the password from standard input")] = False,
             as_json: AsJson = False) -> None:
    """Add a user of the site API; prints the TOTP secret and provisioning URI once (scan it into an authenticator app).

    Example: evoclone site user add --site-dir ./site --username ana --role clinician --password-stdin
    """
    import sys

    from pydantic import ValidationError

    from evoclone.site_node.auth_models import UserCreate
    from evoclone.site_node.errors import Conflict
    from evoclone.site_node.service import add_user

    from .main import fail

    if role not in SITE_ROLES:
        raise fail(f"--role {role!r} is not one of {', '.join(SITE_ROLES)}", 2)
    settings = _settings(site_dir)
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else \
        typer.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        data = UserCreate(username=username, role=role, password=password)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise fail(f"--{where}: {exc.errors()[0]['msg']}", 2) from None
    try:
        doc = add_user(settings, data)
    except Conflict as exc:
        raise fail(str(exc), 1) from None
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        typer.echo(f"user {username} ({role}) added; enrol this TOTP in an authenticator app now, it is not shown "
                   "again:", err=True)
        typer.echo(f"secret: {doc['totp_secret']}\nuri: {doc['totp_uri']}")


@audit_app.command("verify")
def audit_verify(site_dir: SiteDir, as_json: AsJson = False) -> None:
    """Verify the access log's hash chain: exit 1 at the first edited, removed or reordered entry; print the head.

    Example: evoclone site audit verify --site-dir /srv/evoclone/site --json
    """
    from evoclone.site_node.service import access_log_head

    from .main import err, fail

    doc = access_log_head(_settings(site_dir))
    if as_json:
        typer.echo(json.dumps(doc))
    elif doc["ok"]:
        err.print(f"access log intact: {doc['entries']} entries")
        typer.echo(f"head seq {doc['seq']} hash {doc['hash']}")
    if not doc["ok"]:
        raise fail(f"access log broken: {doc['problem']}; the last verified entry is seq {doc['seq']} "
                   f"(hash {doc['hash']})", 1)


from . import site_service  # noqa: E402,F401  (registers node, serve and migrate on site_app)
