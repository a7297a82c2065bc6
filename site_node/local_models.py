"""Model versions installed at the site: coordinator-signed bundles, verified, unpacked and promoted.

A bundle is checked in memory against the pinned coordinator key (`coordinator-signing.pem` in the
site directory, pinned at the first install) before a byte is written; the unpacked directory is
verified again each time it is loaded, so a file changed on disk is refused, never loaded.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Column, Field, Session, SQLModel, select

from evoclone.federated.signature import SIGNATURE, SignatureError, key_fingerprint, load_public_key, \
    manifest_digest, verify_bundle, verify_model_dir

from .errors import Conflict, InvalidInput, NotFound, StoreUnavailable

COORDINATOR_KEY = "coordinator-signing.pem"
MODELS_DIR = "models"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ModelUnavailable(StoreUnavailable):
    """The promoted model failed verification or loading (503, never 500)."""


class NoModelInstalled(Conflict):
    """No model version is promoted at this site yet (409: the site's state, not a server failure)."""


class LocalModelBase(SQLModel):
    """An installed model version as the site knows it."""

    version: str = Field(max_length=64)
    manifest_sha256: str = Field(max_length=64)
    key_fingerprint: str = Field(max_length=80)
    promoted: bool = False


class LocalModel(LocalModelBase, table=True):
    """A row per installed version; at most one is promoted."""

    __tablename__ = "local_model"

    version: str = Field(primary_key=True, max_length=64)
    installed_at: datetime = Field(sa_column=Column(sa.DateTime(timezone=True), nullable=False))
    promoted_at: datetime | None = Field(default=None, sa_column=Column(sa.DateTime(timezone=True), nullable=True))


class LocalModelPublic(LocalModelBase):
    """An installed model version as the API shows it."""

    installed_at: datetime
    promoted_at: datetime | None


def models_root(site_dir: Path) -> Path:
    """Where installed versions are unpacked."""
    return Path(site_dir) / MODELS_DIR


def pin_coordinator_key(site_dir: Path, public_key_pem: bytes) -> str:
    """Pin the coordinator's signing key at the first install; later keys must be the same. Its fingerprint."""
    load_public_key(public_key_pem)  # SignatureError for anything but an Ed25519 PEM
    path = Path(site_dir) / COORDINATOR_KEY
    if path.is_file():
        if key_fingerprint(path.read_bytes()) != key_fingerprint(public_key_pem):
            raise Conflict(f"the key differs from the pinned coordinator key in {path}; if the coordinator rotated "
                           "its key, replace that file deliberately, then install again")
    else:
        path.write_bytes(public_key_pem)
        path.chmod(0o644)
    return key_fingerprint(public_key_pem)


def pinned_key(site_dir: Path) -> bytes:
    """The pinned coordinator key; ModelUnavailable when no model was ever installed."""
    path = Path(site_dir) / COORDINATOR_KEY
    if not path.is_file():
        raise ModelUnavailable("model failed to load: no coordinator key is pinned at this site; install a model "
                               "with `evoclone site model install`")
    return path.read_bytes()


def _version_of(bundle: bytes, manifest: dict) -> str:
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as tar:
        doc = json.loads(tar.extractfile(SIGNATURE).read())
    version = str(doc.get("version_id") or manifest_digest(manifest)[:16])
    if not re.match(VERSION_PATTERN, version):
        raise InvalidInput("the bundle's version id is not a plain name; download it from the coordinator again")
    return version


def install_bundle(*, engine: sa.Engine, site_dir: Path, bundle: bytes, public_key_pem: bytes | None = None,
                   promote: bool = True, now: datetime | None = None) -> LocalModel:
    """Verify a signed bundle, unpack it under models/<version>/ and record it (promoted unless told not to)."""
    pem = public_key_pem if public_key_pem is not None else pinned_key(site_dir)
    try:
        manifest = verify_bundle(bundle, public_key_pem=pem)
    except SignatureError as exc:
        raise InvalidInput(f"the bundle was refused: {exc}") from None
    fingerprint = pin_coordinator_key(site_dir, pem)
    version = _version_of(bundle, manifest)
    target = models_root(site_dir) / version
    with Session(engine, expire_on_commit=False) as session:
        if session.get(LocalModel, version) is not None:
            raise Conflict(f"model version {version} is already installed; promote it with "
                           f"POST /api/v1/models/{version}/promote")
    staging = models_root(site_dir) / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as tar:
        for m in tar.getmembers():  # verify_bundle allowed plain file names only
            (staging / m.name).write_bytes(tar.extractfile(m).read())
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    when = now or datetime.now(timezone.utc)
    with Session(engine, expire_on_commit=False) as session:
        row = LocalModel(version=version, manifest_sha256=manifest_digest(manifest), key_fingerprint=fingerprint,
                         installed_at=when)
        session.add(row)
        session.commit()
    return promote_version(engine=engine, version=version, now=when) if promote else row


def promote_version(*, engine: sa.Engine, version: str, now: datetime | None = None) -> LocalModel:
    """Make `version` the one inference uses (the others stay installed for a rollback)."""
    with Session(engine, expire_on_commit=False) as session:
        row = session.get(LocalModel, version)
        if row is None:
            raise NotFound("no installed model version with that id; list them with GET /api/v1/models")
        for other in session.exec(select(LocalModel).where(LocalModel.promoted == True)).all():  # noqa: E712
            other.promoted = False
            session.add(other)
        row.promoted, row.promoted_at = True, now or datetime.now(timezone.utc)
        session.add(row)
        session.commit()
        return row


def list_models(*, engine: sa.Engine) -> list[LocalModel]:
    """Installed versions, newest first."""
    with Session(engine) as session:
        return list(session.exec(select(LocalModel).order_by(LocalModel.installed_at.desc())).all())


@dataclass(frozen=True)
class LoadedModel:
    """A verified, loaded model version: the generator and the outcome ensemble with their manifest entries."""

    version: str
    generator: Any
    tokenizer: Any
    generator_entry: dict
    ensemble: Any
    spec: Any
    predictor_entry: dict
    lock: threading.Lock  # torch modules are not safe to share between concurrent forward passes


def load_version(*, site_dir: Path, version: str, expected_digest: str | None = None) -> LoadedModel:
    """Verify an installed version against the pinned key and load both components."""
    from evoclone.federated.model_dir import ModelLoadError, load_ensemble, load_generator

    directory = models_root(site_dir) / version
    try:
        verify_model_dir(directory, public_key_pem=pinned_key(site_dir), expected_digest=expected_digest)
        generator, tok, gen_entry = load_generator(directory)
        ensemble, spec, pred_entry = load_ensemble(directory)
    except (SignatureError, ModelLoadError, OSError, KeyError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelUnavailable(f"model failed to load: version {version}: {first}; reinstall it or promote "
                               "another version") from None
    return LoadedModel(version, generator, tok, gen_entry, ensemble, spec, pred_entry, threading.Lock())
