"""`evoclone coordinator ...`: initialise the coordinator's state, add users, serve the API and the SuperLink."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

coordinator_app = typer.Typer(no_args_is_help=True,
                              help="The coordinator service: sites, studies, runs, the SuperLink.")
user_app = typer.Typer(no_args_is_help=True, help="Users of the coordinator's API (sponsor, auditor, admin).")
coordinator_app.add_typer(user_app, name="user")

StateDir = Annotated[Path, typer.Option("--state-dir", help="the coordinator's state directory")]
ROLES = ("sponsor", "auditor", "admin")


def _fail(message: str, code: int = 2) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _settings(state_dir: Path):
    from evoclone.coordinator.settings import load_settings

    try:
        return load_settings(state_dir)
    except (FileNotFoundError, PermissionError) as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:  # pydantic's ValidationError: bad settings file or variables
        raise _fail(f"invalid coordinator settings in {state_dir}: {' '.join(str(exc).split())[:400]}") from None


@coordinator_app.command("init")
def init(state_dir: StateDir,
         database_url: Annotated[str, typer.Option(help="PostgreSQL URL (default: SQLite in the state directory)")] = "",
         dns: Annotated[list[str], typer.Option("--dns", help="DNS name of this host for its TLS certificates")] = [],
         ip: Annotated[list[str], typer.Option("--ip", help="IP address of this host for its TLS certificates")] = [],
         superlink_port: Annotated[int, typer.Option(help="port of the Flower SuperLink")] = 9093,
         no_tls: Annotated[bool, typer.Option("--no-tls", help="serve the API over plain HTTP (tests only)")] = False,
         as_json: Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")] = False) -> None:
    """Create a state directory: settings, JWT secret, study CA, TLS certificates, Ed25519 signing key (0600).

    Example: evoclone coordinator init --state-dir /srv/evoclone-coordinator --dns coord.example.org
    """
    from evoclone.coordinator.state import init_state

    try:
        settings = init_state(state_dir, database_url=database_url, dns=dns, ips=ip, superlink_port=superlink_port,
                              tls=not no_tls)
    except FileExistsError as exc:
        raise _fail(str(exc), 1) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    out = {"state_dir": str(settings.state_dir), "database": settings.db_url.split("@")[-1],
           "ca": str(settings.pki_dir / "ca.pem"), "tls": settings.tls_enabled}
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"coordinator state directory ready: {settings.state_dir}", err=True)
        typer.echo(f"next: evoclone coordinator user add --state-dir {state_dir} --username admin --role admin",
                   err=True)


@coordinator_app.command("migrate")
def migrate(state_dir: StateDir,
            backup: Annotated[Path | None, typer.Option(help="first copy a SQLite coordinator database here "
                                                           "(consistent while the services run)")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")] = False) -> None:
    """Bring the coordinator database to this version's schema (what an upgrade runs before restarting the services).

    A database made before migrations existed is adopted; one migrated by a newer release is refused (exit 2).

    Example: evoclone coordinator migrate --state-dir /srv/evoclone-coordinator --backup /var/backups/coordinator.db
    """
    import sqlalchemy as sa

    from evoclone.coordinator.db import make_engine
    from evoclone.coordinator.migrate import SchemaError, backup_sqlite, current, upgrade

    settings = _settings(state_dir)
    engine = make_engine(settings)
    where = engine.url.render_as_string(hide_password=True)
    try:
        if backup is not None and engine.dialect.name != "sqlite":
            raise _fail("--backup copies a SQLite database; back a PostgreSQL coordinator database up with pg_dump")
        # nothing to copy before the first start (SQLite creates the file on first connection)
        backed_up = backup is not None and Path(engine.url.database or "").is_file()
        if backed_up:
            backup_sqlite(engine, backup)
        before = current(engine)
        after = upgrade(engine)
    except SchemaError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot migrate the coordinator database {where}: {exc}", 1) from None
    except sa.exc.SQLAlchemyError as exc:
        raise _fail(f"cannot migrate the coordinator database {where}: {' '.join(str(exc).split())[:300]}", 1) \
            from None
    finally:
        engine.dispose()
    doc = {"from": before, "to": after, "changed": before != after, "backup": str(backup) if backed_up else None}
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        typer.echo(f"coordinator database at revision {after}" + (f" (was {before})" if before != after
                                                                  else " (unchanged)")
                   + (f"; backup in {backup}" if backed_up else ""), err=True)


@user_app.command("add")
def user_add(state_dir: StateDir,
             username: Annotated[str, typer.Option(help="login name (letters, digits, '_', '.', '-')")],
             role: Annotated[str, typer.Option(help="sponsor, auditor or admin")],
             password_stdin: Annotated[bool, typer.Option("--password-stdin",
                                                          help="read the password from standard input")] = False,
             ) -> None:
    """Add a user; the password (12+ characters) is prompted for or read from stdin.

    Example: evoclone coordinator user add --state-dir ./coord --username ana --role sponsor
    """
    from pydantic import ValidationError
    from sqlmodel import Session

    from evoclone.coordinator.db import create_tables, make_engine
    from evoclone.coordinator.errors import Conflict
    from evoclone.coordinator.models import UserCreate
    from evoclone.coordinator.users import create_user

    if role not in ROLES:
        raise _fail(f"--role {role!r} is not one of {', '.join(ROLES)}")
    settings = _settings(state_dir)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        data = UserCreate(username=username, role=role, password=password)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise _fail(f"--{where}: {exc.errors()[0]['msg']}") from None
    engine = make_engine(settings)
    try:
        create_tables(engine)
        with Session(engine) as session:
            create_user(session=session, data=data)
            session.commit()
    except Conflict as exc:
        raise _fail(str(exc), 1) from None
    finally:
        engine.dispose()
    typer.echo(f"user {username} ({role}) added", err=True)


@coordinator_app.command("serve")
def serve(state_dir: StateDir,
          host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="port to listen on")] = 8443,
          workers: Annotated[int, typer.Option(min=1, max=64, help="uvicorn worker processes")] = 1,
          no_superlink: Annotated[bool, typer.Option("--no-superlink",
                                                     help="do not start the Flower SuperLink")] = False) -> None:
    """Serve the API (HTTPS when a certificate is configured) and supervise the Flower SuperLink; SIGTERM stops both.

    Example: evoclone coordinator serve --state-dir /srv/evoclone-coordinator --host 0.0.0.0 --port 8443
    """
    import logging

    from evoclone.coordinator.service import serve as run
    from evoclone.federated.flower.runtime import PortInUseError, require_free

    settings = _settings(state_dir)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        require_free([port], host)
        if not no_superlink:
            require_free([settings.superlink_port], settings.superlink_host)
        run(settings, host=host, port=port, workers=workers, superlink=not no_superlink)
    except PortInUseError as exc:
        raise _fail(str(exc)) from None
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise _fail(" ".join(str(exc).split())[:500], 1) from None
