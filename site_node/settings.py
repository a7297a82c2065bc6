"""Site node settings: a `site.json` in the site directory, overridable by EVOCLONE_ variables."""

from __future__ import annotations

import json
import os
import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SETTINGS_FILE = "site.json"
KEY_FILE = "secret.key"


class SiteSettings(BaseSettings):
    """Where a site keeps its data and what it is called."""

    model_config = SettingsConfigDict(env_prefix="EVOCLONE_", extra="ignore")

    site_dir: Path
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    database_url: str = ""
    events_url: str = ""  # mongodb://... in production; SQLite JSON in the site directory by default
    epsilon_budget: float = Field(3.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)

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


def init_site(site_dir: Path, *, name: str, epsilon_budget: float = 3.0, delta: float = 1e-5) -> SiteSettings:
    """Create a site directory with its settings file and a fresh 256-bit secret key."""
    settings = SiteSettings(site_dir=site_dir, name=name, epsilon_budget=epsilon_budget, delta=delta)
    site_dir.mkdir(parents=True, exist_ok=True)
    key = settings.key_path
    if key.exists():
        raise FileExistsError(f"{key} already exists; a site key is never overwritten")
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    from .keyring import create_keyring

    create_keyring(site_dir)
    cfg = {"name": name, "epsilon_budget": epsilon_budget, "delta": delta}
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
    return SiteSettings(site_dir=site_dir, **json.loads(path.read_text()))


def load_key(settings: SiteSettings) -> bytes:
    """The site's secret key; refuses a key file others can read."""
    path = settings.key_path
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by others; run `chmod 600 {path}`")
    return path.read_bytes()
