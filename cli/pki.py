"""`evoclone pki ...`: a private CA, TLS server certificates and Flower SuperNode keys.

The CA secures Flower SuperLink TLS and the coordinator / site API servers; node key pairs
authenticate Flower SuperNodes to the SuperLink.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Annotated

import typer

pki_app = typer.Typer(no_args_is_help=True, help="Private CA: TLS certificates and Flower SuperNode keys.")
issue_app = typer.Typer(no_args_is_help=True, help="Issue a TLS server certificate or a SuperNode key pair.")
pki_app.add_typer(issue_app, name="issue")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED = {"ca"}  # DIR/ca.key and DIR/ca.pem belong to the CA

PkiDir = Annotated[Path, typer.Option("--dir", help="the PKI directory (holds ca.key and ca.pem)")]
AsJson = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    from .main import fail

    return fail(message, code)


def _check_name(name: str, what: str) -> None:
    if not NAME_RE.match(name) or len(name) > 64:
        raise _fail(f"{what} name {name!r} is invalid: use letters, digits, '_', '.', '-' "
                    "(starting with a letter or digit, at most 64 characters)")


def _write_all(files: list[tuple[Path, bytes, int]]) -> None:
    """Write every file to a temporary name (O_EXCL, given mode), then move them all into place.

    Nothing is left behind when writing fails before the moves.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            temps.append((tmp, path))
            try:
                os.fchmod(fd, mode)  # exact mode whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _fail(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise _fail(f"cannot read {what} {path}: {exc.strerror}") from None


def _load_ca(pki_dir: Path) -> tuple[bytes, bytes]:
    key, cert = pki_dir / "ca.key", pki_dir / "ca.pem"
    if not key.is_file() or not cert.is_file():
        raise _fail(f"no CA in {pki_dir} (ca.key and ca.pem); create one with `evoclone pki init --dir {pki_dir}`")
    return _read(key, "CA key"), _read(cert, "CA certificate")


def _refuse_existing(paths: list[Path], force: bool, what: str) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise _fail(f"{existing[0]} already exists; pass --force to replace the {what}")


def _print(doc: dict, as_json: bool, lines: list[str], *, stdout: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps(doc, indent=1))
    elif stdout:
        for line in lines:
            typer.echo(line)
    else:
        from .main import err

        for line in lines:
            err.print(line, highlight=False, soft_wrap=True)


def _info_lines(info: dict) -> list[str]:
    return [f"subject:     {info['subject']}",
            f"issuer:      {info['issuer']}",
            f"valid:       {info['not_before']} to {info['not_after']}",
            f"dns:         {', '.join(info['dns']) or '-'}",
            f"ips:         {', '.join(info['ips']) or '-'}",
            f"sha256:      {info['fingerprint_sha256']}"]


@pki_app.command()
def init(pki_dir: PkiDir,
         name: Annotated[str, typer.Option(help="the CA's common name")] = "EvoClone CA",
         days: Annotated[int, typer.Option(help="validity in days")] = 3650,
         force: Annotated[bool, typer.Option(help="replace an existing CA (every certificate it issued stops verifying)")] = False,
         as_json: AsJson = False) -> None:
    """Create the CA: DIR/ca.key (mode 0600) and DIR/ca.pem; an existing CA is kept unless --force.

    Example: evoclone pki init --dir /srv/evoclone/pki --name "EvoClone CA" --days 3650
    """
    from evoclone.privacy.pki import certificate_info, new_ca

    key_path, cert_path = pki_dir / "ca.key", pki_dir / "ca.pem"
    _refuse_existing([key_path, cert_path], force, "CA (certificates it issued will no longer verify)")
    try:
        key, cert = new_ca(name, days=days)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_all([(key_path, key, 0o600), (cert_path, cert, 0o644)])
    except OSError as exc:
        raise _fail(f"cannot write the CA into {pki_dir}: {exc.strerror}") from None
    info = certificate_info(cert)
    _print({"ca_key": str(key_path), "ca_cert": str(cert_path), **info}, as_json,
           [f"CA {info['subject']} written to {cert_path} (key {key_path}, mode 0600)", *_info_lines(info)])


@issue_app.command("server")
def issue_server_cmd(name: Annotated[str, typer.Argument(help="server name, e.g. superlink or coordinator")],
                     pki_dir: PkiDir,
                     dns: Annotated[list[str] | None, typer.Option("--dns", help="DNS name SAN (repeatable)")] = None,
                     ip: Annotated[list[str] | None, typer.Option("--ip", help="IP address SAN (repeatable)")] = None,
                     days: Annotated[int, typer.Option(help="validity in days (at most the CA's remaining validity)")] = 825,
                     force: Annotated[bool, typer.Option(help="replace an existing certificate and key of this name")] = False,
                     as_json: AsJson = False) -> None:
    """Issue a TLS server certificate: DIR/NAME.key (mode 0600) and DIR/NAME.pem, signed by DIR's CA.

    Without --dns/--ip the certificate names localhost, 127.0.0.1 and ::1.

    Example: evoclone pki issue server superlink --dir /srv/evoclone/pki --dns coord.example.org --ip 10.0.0.5
    """
    from evoclone.privacy.pki import certificate_info, issue_server

    _check_name(name, "server")
    if name.lower() in RESERVED or name.lower().endswith(".node"):
        raise _fail(f"server name {name!r} would clash with the CA's or a node's files; choose another name")
    if not dns and not ip:
        dns, ip = ["localhost"], ["127.0.0.1", "::1"]
    ca_key, ca_cert = _load_ca(pki_dir)
    key_path, cert_path = pki_dir / f"{name}.key", pki_dir / f"{name}.pem"
    _refuse_existing([key_path, cert_path], force, "server certificate")
    try:
        key, cert = issue_server(ca_key, ca_cert, name, dns=list(dns or []), ips=list(ip or []), days=days)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        _write_all([(key_path, key, 0o600), (cert_path, cert, 0o644)])
    except OSError as exc:
        raise _fail(f"cannot write into {pki_dir}: {exc.strerror}") from None
    info = certificate_info(cert)
    _print({"key": str(key_path), "cert": str(cert_path), "ca_cert": str(pki_dir / "ca.pem"), **info}, as_json,
           [f"server certificate written to {cert_path} (key {key_path}, mode 0600)", *_info_lines(info)])


@issue_app.command("node")
def issue_node_cmd(name: Annotated[str, typer.Argument(help="SuperNode name, e.g. st-mary")],
                   pki_dir: PkiDir,
                   force: Annotated[bool, typer.Option(help="replace an existing key pair of this name")] = False,
                   as_json: AsJson = False) -> None:
    """Create a Flower SuperNode key pair (ECDSA P-384, OpenSSH): DIR/NAME.node.key (0600) and DIR/NAME.node.pub.

    Pass the private key to `flower-supernode --auth-supernode-private-key` and register the
    public key with `flwr supernode register`.

    Example: evoclone pki issue node st-mary --dir /srv/evoclone/pki
    """
    from evoclone.privacy.pki import public_key_fingerprint, new_node_keypair

    _check_name(name, "node")
    key_path, pub_path = pki_dir / f"{name}.node.key", pki_dir / f"{name}.node.pub"
    _refuse_existing([key_path, pub_path], force, "node key pair")
    private, public = new_node_keypair(f"evoclone-node-{name}")
    try:
        pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_all([(key_path, private, 0o600), (pub_path, public, 0o644)])
    except OSError as exc:
        raise _fail(f"cannot write into {pki_dir}: {exc.strerror}") from None
    fingerprint = public_key_fingerprint(public)
    _print({"private_key": str(key_path), "public_key": str(pub_path), "key_type": "ecdsa-sha2-nistp384",
            "fingerprint": fingerprint}, as_json,
           [f"node key pair written to {key_path} (mode 0600) and {pub_path}"])
    if not as_json:
        typer.echo(fingerprint)


@pki_app.command()
def show(file: Annotated[Path, typer.Argument(help="a certificate (.pem) or a node public key (.node.pub)")],
         ca: Annotated[Path | None, typer.Option(help="verify against this CA certificate (DIR/ca.pem)")] = None,
         host: Annotated[str | None, typer.Option(help="with --ca: also check the certificate names this host or IP")] = None,
         as_json: AsJson = False) -> None:
    """Print a certificate's subject, validity, SANs and fingerprint; with --ca, verify it (exit 2 if invalid).

    Example: evoclone pki show /srv/evoclone/pki/superlink.pem --ca /srv/evoclone/pki/ca.pem --host coord.example.org
    """
    from evoclone.privacy.pki import PKIError, certificate_info, public_key_fingerprint, verify_server_cert

    if host is not None and ca is None:
        raise _fail("--host needs --ca (the CA to verify against)")
    data = _read(file, "file")
    if data.lstrip().startswith(b"ecdsa-sha2-") or data.lstrip().startswith(b"ssh-"):
        if ca is not None:
            raise _fail(f"{file} is an OpenSSH public key, not a certificate; --ca does not apply")
        try:
            doc = {"key_type": data.split()[0].decode("ascii", "replace"), "fingerprint": public_key_fingerprint(data)}
        except ValueError as exc:
            raise _fail(f"{file}: {exc}") from None
        _print(doc, as_json, [f"type:        {doc['key_type']}", f"fingerprint: {doc['fingerprint']}"], stdout=True)
        return
    try:
        if ca is None:
            info, verified = certificate_info(data), False
        else:
            info, verified = verify_server_cert(data, _read(ca, "CA certificate"), host=host), True
    except PKIError as exc:
        raise _fail(f"{file}: {exc}") from None
    _print({**info, "verified": verified, **({"host": host} if host else {})}, as_json,
           [*_info_lines(info), f"verified:    {'yes, against ' + str(ca) if verified else 'no (pass --ca)'}"
            + (f" for host {host}" if host else "")], stdout=True)
