"""Coordinator settings: `coordinator.json` in the state directory, overridable by EVOCLONE_COORDINATOR_ variables."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "EVOCLONE_COORDINATOR_"
SETTINGS_FILE = "coordinator.json"
JWT_SECRET_FILE = "jwt.secret"


class CoordinatorSettings(BaseSettings):
    """Everything the coordinator service reads at start; secrets have no usable default."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    state_dir: Path
    database_url: str = ""  # postgresql+psycopg://... in production; SQLite in the state directory by default
    jwt_secret: SecretStr = Field(min_length=32)
    access_token_minutes: int = Field(15, ge=1, le=24 * 60)
    refresh_token_days: int = Field(7, ge=1, le=90)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    superlink_host: str = "127.0.0.1"
    superlink_port: int = Field(9093, ge=0, le=65535)
    superlink_database: Path | None = None  # the SuperLink's persistent state; under the state dir by default
    objects_dir: Path | None = None  # local object store; used unless minio_endpoint is set
    minio_endpoint: str = ""
    minio_access_key: str = ""
    minio_secret_key: SecretStr = SecretStr("")
    minio_bucket: str = "evoclone-coordinator"
    minio_secure: bool = True
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # model uploads (POST /studies/{id}/models) carry weights: their own, larger limit
    max_upload_bytes: int = Field(512 << 20, ge=1024)
    suppression_min_count: int = Field(10, ge=1)
    canary_margin: float = Field(0.02, ge=0, le=1)
    db_retry_seconds: float = Field(10.0, ge=0)  # how long a request waits for the database to come back
    # how long an API process trusts its last check that a token's user exists, is enabled and has the token's
    # role: disabling a user or changing a role takes effect within this many seconds (0: check every request)
    user_cache_seconds: float = Field(5.0, ge=0, le=60)
    # how long an API process may serve a kept answer of a registry or status read (api/response_cache.py); any
    # write through the coordinator invalidates it at once, this bounds writes made around it (0: no cache)
    response_cache_seconds: float = Field(5.0, ge=0, le=60)
    # drift: a feature is flagged when a statistic exceeds its threshold (None: that statistic never flags);
    # PSI above 0.2 is the usual "major shift" rule of thumb
    drift_psi_threshold: float | None = Field(0.2, gt=0)
    drift_ks_threshold: float | None = Field(None, gt=0, le=1)
    drift_mmd_threshold: float | None = Field(None, gt=0)
    drift_outcome_threshold: float | None = Field(0.1, gt=0, le=1)  # absolute change of an outcome rate
    drift_retrain_min_flags: int = Field(1, ge=0)  # flags in one report that request retraining (0: never)
    # relaunch the study's last finished run when drift opens a retraining request (spends budget)
    drift_auto_retrain: bool = False
    compliance_max_age_days: int = Field(30, ge=1)  # an older self-check no longer counts as evidence

    @field_validator("jwt_secret")
    @classmethod
    def _not_an_example_value(cls, v: SecretStr) -> SecretStr:
        if len(set(v.get_secret_value())) < 8:
            raise ValueError("jwt_secret looks like an example value (changeme, secret, ...); run `evoclone coordinator init` to generate one")
        return v

    @model_validator(mode="after")
    def _pairs(self) -> CoordinatorSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key (or neither, for plain HTTP behind a TLS proxy)")
        if self.minio_endpoint and not (self.minio_access_key and self.minio_secret_key.get_secret_value()):
            raise ValueError("minio_endpoint is set but minio_access_key or minio_secret_key is empty; set "
                             "EVOCLONE_COORDINATOR_MINIO_ACCESS_KEY and EVOCLONE_COORDINATOR_MINIO_SECRET_KEY")
        return self

    @property
    def db_url(self) -> str:
        """The transactional store: SQLite inside the state directory unless configured."""
        return self.database_url or f"sqlite:///{(self.state_dir / 'coordinator.db').resolve()}"

    @property
    def flower_dir(self) -> Path:
        """Where the SuperLink keeps its state, logs and CLI configuration."""
        return self.state_dir / "flower"

    @property
    def superlink_db(self) -> Path:
        """The SuperLink's persistent state database."""
        return self.superlink_database or self.flower_dir / "superlink-state.db"

    @property
    def pki_dir(self) -> Path:
        """The study CA (ca.key, ca.pem) and the certificates issued for the coordinator itself."""
        return self.state_dir / "pki"

    @property
    def node_keys_dir(self) -> Path:
        """One OpenSSH public key per active site: the SuperNodes the SuperLink accepts."""
        return self.state_dir / "supernode-keys"

    @property
    def signing_key_path(self) -> Path:
        """The coordinator's Ed25519 key that signs model manifests."""
        return self.state_dir / "signing.key"

    @property
    def objects_root(self) -> Path:
        """The local object store's root."""
        return self.objects_dir or self.state_dir / "objects"

    @property
    def tls_enabled(self) -> bool:
        """Whether the API serves HTTPS."""
        return self.tls_cert is not None and self.tls_key is not None


def read_secret_file(path: Path) -> str:
    """A secret from a file that only its owner may read."""
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by others; run `chmod 600 {path}`")
    return path.read_text().strip()


def load_settings(state_dir: Path) -> CoordinatorSettings:
    """Settings of an initialised state directory; EVOCLONE_COORDINATOR_* variables win over the file."""
    path = state_dir / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{state_dir} is not a coordinator state directory (no {SETTINGS_FILE}); "
                                f"run `evoclone coordinator init --state-dir {state_dir}`")
    values = {k: v for k, v in json.loads(path.read_text()).items() if f"{ENV_PREFIX}{k.upper()}" not in os.environ}
    secret = state_dir / JWT_SECRET_FILE
    if f"{ENV_PREFIX}JWT_SECRET" not in os.environ and secret.is_file():
        values["jwt_secret"] = read_secret_file(secret)
    values.pop("state_dir", None)
    return CoordinatorSettings(state_dir=state_dir, **values)


@lru_cache(maxsize=8)
def get_settings(state_dir: Path | None = None) -> CoordinatorSettings:
    """The coordinator's settings (cached): the given state directory or $EVOCLONE_COORDINATOR_STATE_DIR."""
    if state_dir is None:
        env = os.environ.get(f"{ENV_PREFIX}STATE_DIR")
        if not env:
            raise RuntimeError(f"no coordinator state directory: set {ENV_PREFIX}STATE_DIR or pass --state-dir")
        state_dir = Path(env)
    return load_settings(Path(state_dir))
