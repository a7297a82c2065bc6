"""Site node settings: a `site.json` in the site directory, overridable by EVOCLONE_ variables."""

from __future__ import annotations

import json
import os
import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SETTINGS_FILE = "site.json"
KEY_FILE = "secret.key"
JWT_SECRET_FILE = "jwt.secret"  # signs the site API's access tokens (0600, written at init)


class SiteSettings(BaseSettings):
    """Where a site keeps its data and what it is called."""

    model_config = SettingsConfigDict(env_prefix="EVOCLONE_", extra="ignore")

    site_dir: Path
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    database_url: str = ""
    events_url: str = ""  # mongodb://... in production; SQLite JSON in the site directory by default
    epsilon_budget: float = Field(3.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    # the site API (`evoclone site serve`); jwt_secret comes from jwt.secret, never from site.json
    jwt_secret: SecretStr | None = None
    redis_url: str = ""  # sessions, login counters (and the twin cache); in-process when empty
    tls_cert: Path | None = None
    tls_key: Path | None = None
    access_token_minutes: int = Field(5, ge=1, le=60)
    session_idle_minutes: int = Field(30, ge=1, le=24 * 60)  # a session unused this long ends
    session_max_hours: int = Field(12, ge=1, le=7 * 24)  # and every session ends this long after login
    login_max_failures: int = Field(5, ge=1, le=100)  # failed logins of one username before it is locked
    lockout_minutes: int = Field(15, ge=1, le=24 * 60)
    login_rate_per_minute: int = Field(20, ge=1, le=10_000)  # login attempts per client address
    max_body_bytes: int = Field(1 << 20, ge=1024)
    twin_cache_minutes: int = Field(15, ge=1, le=24 * 60)  # cached twins and predictions live this long
    # model inference runs in this many worker processes per API worker process; 0: one per core but one (left to
    # the API), divided among the API's worker processes (`evoclone site serve --workers`)
    inference_workers: int = Field(0, ge=0, le=64)
    # an API process keeps an API token's owner, a session user's row and the promoted version while no process
    # of the site has written users, tokens or models since (site_node/db.py), and for at most this long (the
    # bound for SQL typed into the database by hand); 0: read them from the database on every request
    request_memo_seconds: float = Field(5.0, ge=0, le=60)

    @field_validator("jwt_secret")
    @classmethod
    def _not_an_example_value(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and (len(v.get_secret_value()) < 32 or len(set(v.get_secret_value())) < 8):
            raise ValueError("jwt_secret is shorter than 32 characters or looks like an example value (changeme, secret, ...); delete "
                             "jwt.secret in the site directory and run `evoclone site serve` to generate one")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> "SiteSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key (or neither, for plain HTTP behind a TLS proxy)")
        return self

    @property
    def db_url(self) -> str:
        """The transactional store: SQLite inside the site directory unless configured."""
        return self.database_url or f"sqlite:///{(self.site_dir / 'site.db').resolve()}"

    @property
    def event_log_url(self) -> str:
        """The events and logs store."""
        return self.events_url or f"sqlite:///{(self.site_dir / 'events.db').resolve()}"

    @property
    def key_path(self) -> Path:
        """The site's secret key file (mode 0600)."""
        return self.site_dir / KEY_FILE

    @property
    def snapshot_path(self) -> Path:
        """Where the training snapshot is exported for the ClientApp."""
        return self.site_dir / "snapshot.jsonl.gz"

    @property
    def jwt_secret_path(self) -> Path:
        """The site API's token-signing secret (mode 0600)."""
        return self.site_dir / JWT_SECRET_FILE

    @property
    def tls_enabled(self) -> bool:
        """Whether the site API serves HTTPS."""
        return self.tls_cert is not None and self.tls_key is not None


def ensure_jwt_secret(site_dir: Path) -> Path:
    """Create the site API's 0600 token-signing secret unless it exists (site directories from before the API)."""
    path = site_dir / JWT_SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48))
    return path


def init_site(site_dir: Path, *, name: str, epsilon_budget: float = 3.0, delta: float = 1e-5,
              tls_cert: Path | None = None, tls_key: Path | None = None, redis_url: str = "") -> SiteSettings:
    """Create a site directory with its settings file, a fresh 256-bit secret key and the API's JWT secret."""
    api = {k: v for k, v in (("tls_cert", tls_cert), ("tls_key", tls_key), ("redis_url", redis_url)) if v}
    settings = SiteSettings(site_dir=site_dir, name=name, epsilon_budget=epsilon_budget, delta=delta, **api)
    site_dir.mkdir(parents=True, exist_ok=True)
    key = settings.key_path
    if key.exists():
        raise FileExistsError(f"{key} already exists; a site key is never overwritten")
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    from .keyring import create_keyring

    create_keyring(site_dir)
    ensure_jwt_secret(site_dir)
    cfg = {"name": name, "epsilon_budget": epsilon_budget, "delta": delta,
           **{k: str(Path(v).absolute()) if k.startswith("tls") else v for k, v in api.items()}}
    path = site_dir / SETTINGS_FILE
    path.write_text(json.dumps(cfg, indent=1) + "\n")
    path.chmod(0o600)
    return settings


@lru_cache(maxsize=32)
def get_settings(site_dir: Path) -> SiteSettings:
    """Settings of an initialised site directory."""
    path = site_dir / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{site_dir} is not a site directory (no {SETTINGS_FILE}); run `evoclone site init`")
    values = json.loads(path.read_text())
    values.pop("jwt_secret", None)  # a secret lives in its own 0600 file, never in site.json
    secret = site_dir / JWT_SECRET_FILE
    if "EVOCLONE_JWT_SECRET" not in os.environ and secret.is_file():
        if secret.stat().st_mode & 0o077:
            raise PermissionError(f"{secret} is readable by others; run `chmod 600 {secret}`")
        values["jwt_secret"] = secret.read_text().strip()
    return SiteSettings(site_dir=site_dir, **values)


def load_key(settings: SiteSettings) -> bytes:
    """The site's secret key; refuses a key file others can read."""
    path = settings.key_path
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by others; run `chmod 600 {path}`")
    return path.read_bytes()
